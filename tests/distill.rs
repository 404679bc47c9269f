//! Distillation: the trainer learns a known image transform, the losses' gradients match finite
//! differences, and generator files are written, read and refused as they should be.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use image::{Rgb, RgbImage};
use pix2pix_zero::distill::discriminator::Discriminator;
use pix2pix_zero::distill::generator::{Generator, GeneratorConfig};
use pix2pix_zero::distill::losses::{discriminator_hinge, generator_hinge, l1};
use pix2pix_zero::distill::params::{sorted, SeededParams};
use pix2pix_zero::distill::train::{
    self, LossWeights, PairFiles, TrainEnd, TrainSettings, Trainer,
};
use pix2pix_zero::engine::rng::Rng;

/// A seeded picture with structure at several scales: a gradient, shapes, and stripes.
fn picture(rng: &mut Rng, side: u32) -> RgbImage {
    let mut colour = || -> [f64; 3] { [rng.uniform(), rng.uniform(), rng.uniform()] };
    let (top, bottom) = (colour(), colour());
    let shapes: Vec<([f64; 3], [f64; 3])> = (0..5).map(|_| (colour(), colour())).collect();
    let stripe = colour();
    let period = 3.0 + 6.0 * stripe[0];
    RgbImage::from_fn(side, side, |x, y| {
        let (u, v) = (x as f64 / side as f64, y as f64 / side as f64);
        let mut c: [f64; 3] = std::array::from_fn(|i| top[i] * (1.0 - v) + bottom[i] * v);
        for (place, fill) in &shapes {
            let (cx, cy, r) = (place[0], place[1], 0.08 + 0.25 * place[2]);
            let inside = if fill[0] > 0.5 {
                (u - cx).powi(2) + (v - cy).powi(2) < r * r
            } else {
                (u - cx).abs() < r && (v - cy).abs() < r * 0.6
            };
            if inside {
                c = *fill;
            }
        }
        if ((x as f64 + y as f64 * stripe[1]) / period).sin() > 0.8 {
            c = std::array::from_fn(|i| 0.5 * c[i] + 0.5 * stripe[i]);
        }
        Rgb(c.map(|v| (v * 255.0).round() as u8))
    })
}

/// The transform the generator has to learn: channels rotated (R←G, G←B, B←R) and a 3×3 box
/// blur, so it needs both a colour mapping and a spatial filter.
fn transform(image: &RgbImage) -> RgbImage {
    let (w, h) = image.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let mut sum = [0u32; 3];
        let mut n = 0;
        for dy in -1i64..=1 {
            for dx in -1i64..=1 {
                let (sx, sy) = (x as i64 + dx, y as i64 + dy);
                if sx >= 0 && sy >= 0 && sx < w as i64 && sy < h as i64 {
                    let p = image.get_pixel(sx as u32, sy as u32);
                    for (s, v) in sum.iter_mut().zip(p.0) {
                        *s += v as u32;
                    }
                    n += 1;
                }
            }
        }
        let mean = sum.map(|s| ((s as f64) / n as f64).round() as u8);
        Rgb([mean[1], mean[2], mean[0]])
    })
}

/// Writes `count` pairs of `transform` in the paired layout, every fourth held out.
fn transform_pairs(dir: &Path, count: usize, side: u32) {
    for split in ["train_A", "train_B", "test_A", "test_B"] {
        std::fs::create_dir_all(dir.join(split)).unwrap();
    }
    let mut rng = Rng::new(11);
    for k in 0..count {
        let a = picture(&mut rng, side);
        let split = if k % 4 == 3 { "test" } else { "train" };
        let name = format!("{k:04}.png");
        a.save(dir.join(format!("{split}_A")).join(&name)).unwrap();
        transform(&a)
            .save(dir.join(format!("{split}_B")).join(&name))
            .unwrap();
    }
}

#[test]
fn the_trainer_learns_a_transform_it_was_not_built_for() {
    let dir = tempfile::tempdir().unwrap();
    transform_pairs(dir.path(), 48, 48);
    let files = PairFiles::find(dir.path()).unwrap();
    assert_eq!((files.train.len(), files.test.len()), (36, 12));
    let settings = TrainSettings {
        size: 48,
        iterations: 300,
        batch: 4,
        learning_rate: 2e-3,
        weights: LossWeights {
            l1: 1.0,
            perceptual: 0.0,
            adversarial: 0.01,
        },
        generator: GeneratorConfig {
            width: 8,
            blocks: 2,
        },
        discriminator_width: 8,
        seed: 0,
    };
    let mut trainer = Trainer::new(settings, None, &Device::Cpu).unwrap();
    let checkpoint = dir.path().join("run.checkpoint.safetensors");
    let mut last = None;
    let (end, scores) = train::run(
        &mut trainer,
        &files,
        (100, 1000),
        &checkpoint,
        &mut |p| last = Some(p),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(end, TrainEnd::Finished);
    let scores = scores.expect("held-out pairs are scored");
    eprintln!("{scores:?}, last {last:?}");
    assert!(
        scores.psnr > scores.identity_psnr + 6.0,
        "the generator scores {:.2} dB on held-out pairs, the identity {:.2} dB: it should beat it by 6 dB",
        scores.psnr,
        scores.identity_psnr
    );
}

/// Central finite differences of `loss` along a few entries of `var`, against autograd.
fn check_gradient(what: &str, var: &Var, loss: &dyn Fn() -> Tensor) {
    let analytic = loss()
        .backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .clone();
    let analytic: Vec<f32> = analytic.flatten_all().unwrap().to_vec1().unwrap();
    let values: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let shape = var.shape().clone();
    let step = 1e-3f32;
    let mut checked = 0;
    for i in (0..values.len()).step_by((values.len() / 6).max(1)).take(6) {
        let at = |delta: f32| -> f64 {
            let mut moved = values.clone();
            moved[i] += delta;
            var.set(&Tensor::from_vec(moved, shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            loss().to_scalar::<f32>().unwrap() as f64
        };
        let numeric = (at(step) - at(-step)) / (2.0 * step as f64);
        var.set(&Tensor::from_vec(values.clone(), shape.clone(), &Device::Cpu).unwrap())
            .unwrap();
        let tolerance = 2e-3 + 0.05 * numeric.abs();
        assert!(
            (numeric - analytic[i] as f64).abs() < tolerance,
            "{what}[{i}]: finite differences {numeric:.6}, autograd {:.6}",
            analytic[i]
        );
        checked += 1;
    }
    assert!(checked > 0);
}

#[test]
fn generator_and_critic_losses_have_the_gradients_of_finite_differences() {
    let device = Device::Cpu;
    let mut rng = Rng::new(5);
    let input = (rng.randn((2, 3, 16, 16), DType::F32, &device).unwrap() * 0.5).unwrap();
    let target = (rng.randn((2, 3, 16, 16), DType::F32, &device).unwrap() * 0.5).unwrap();
    let generator_vars = VarMap::new();
    let generator = Generator::new(
        SeededParams::builder(&generator_vars, 1, &device),
        GeneratorConfig {
            width: 4,
            blocks: 1,
        },
    )
    .unwrap();
    let critic_vars = VarMap::new();
    let critic = Discriminator::new(SeededParams::builder(&critic_vars, 2, &device), 4).unwrap();
    // The head starts at zero, which hides every other layer's gradient: move it first.
    for (name, var) in sorted(&generator_vars) {
        if name.starts_with("head.") || name.contains("second.pointwise") {
            var.set(&(rng.randn(var.shape().clone(), DType::F32, &device).unwrap() * 0.3).unwrap())
                .unwrap();
        }
    }
    let generator_loss = || {
        let made = generator.forward(&input).unwrap();
        let adversarial = generator_hinge(&critic.forward(&input, &made).unwrap()).unwrap();
        (l1(&made, &target).unwrap() + (adversarial * 0.1).unwrap()).unwrap()
    };
    for (name, var) in sorted(&generator_vars) {
        if name.ends_with("weight") {
            check_gradient(&format!("generator {name}"), &var, &generator_loss);
        }
    }
    let made = generator.forward(&input).unwrap().detach();
    let critic_loss = || {
        discriminator_hinge(
            &critic.forward(&input, &target).unwrap(),
            &critic.forward(&input, &made).unwrap(),
        )
        .unwrap()
    };
    for (name, var) in sorted(&critic_vars) {
        check_gradient(&format!("critic {name}"), &var, &critic_loss);
    }
}

fn p2pz() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_p2pz"));
    command.env("HF_HUB_OFFLINE", "1");
    command
}

fn succeeded(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    err
}

fn failed(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "should have failed: {err}");
    err
}

/// `p2pz pairs` on the tiny model: 8 pairs of 64², 3 steps, every fourth held out.
fn pairs(cache: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut command = p2pz();
    command
        .env("XDG_CACHE_HOME", cache)
        .args(["pairs", "--model"])
        .arg(common::fixture_dir())
        .args([
            "--from", "cat", "--to", "dog", "--count", "8", "--size", "64", "--steps", "3",
        ])
        .args([
            "--seed",
            "7",
            "--sentences",
            "20",
            "--test-every",
            "4",
            "--out",
        ])
        .arg(out)
        .args(extra);
    command
}

/// Every file under `dir` by relative path, with its bytes.
fn tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(
                    path.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    files
}

#[test]
fn pairs_are_deterministic_shardable_and_laid_out_as_paired_datasets_are() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let whole = dir.path().join("whole");
    succeeded(&pairs(&cache, &whole, &[]).output().unwrap());
    let files = tree(&whole);
    let names: Vec<String> = files.keys().map(|p| p.display().to_string()).collect();
    let mut expected: Vec<String> = vec![".pairs.lock".into(), "pairs.jsonl".into()];
    for k in 0..8 {
        let split = if k % 4 == 3 { "test" } else { "train" };
        for side in ["A", "B"] {
            expected.push(format!("{split}_{side}/{k:06}.png"));
        }
    }
    expected.extend(["test_prompts.json".into(), "train_prompts.json".into()]);
    expected.sort();
    assert_eq!(names, expected);
    let prompts: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&files[Path::new("train_prompts.json")]).unwrap();
    assert_eq!(prompts.len(), 6);
    assert!(
        prompts
            .values()
            .all(|c| c.contains("dog") && !c.contains("cat")),
        "{prompts:?}"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(files[Path::new("pairs.jsonl")].clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 8);
    assert_eq!(lines[3]["split"], "test");
    assert_eq!(lines[3]["settings"]["steps"], 3);
    assert!(lines[3]["source_caption"].as_str().unwrap().contains("cat"));

    let again = dir.path().join("again");
    succeeded(&pairs(&cache, &again, &[]).output().unwrap());
    assert!(tree(&again) == files, "same settings, same bytes");

    let shared = dir.path().join("shared");
    let shards: Vec<_> = (0..3)
        .map(|i| {
            pairs(&cache, &shared, &["--shard", &format!("{i}/3")])
                .spawn()
                .unwrap()
        })
        .collect();
    for shard in shards {
        assert!(shard.wait_with_output().unwrap().status.success());
    }
    assert!(
        tree(&shared) == files,
        "three concurrent shards in one folder equal one run"
    );

    let parts: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("part{i}")))
        .collect();
    for (i, part) in parts.iter().enumerate() {
        succeeded(
            &pairs(&cache, part, &["--shard", &format!("{i}/2")])
                .output()
                .unwrap(),
        );
        assert_eq!(
            std::fs::read_dir(part.join("train_B")).unwrap().count()
                + std::fs::read_dir(part.join("test_B")).unwrap().count(),
            4
        );
    }
    let merged = dir.path().join("merged");
    succeeded(
        &p2pz()
            .arg("merge-pairs")
            .args(&parts)
            .arg("--out")
            .arg(&merged)
            .output()
            .unwrap(),
    );
    assert!(
        tree(&merged) == files,
        "two merged shard folders equal one run"
    );

    let err = failed(&pairs(&cache, &whole, &["--xa", "0.3"]).output().unwrap());
    assert!(
        err.contains("other settings") && err.contains("lambda_xa"),
        "{err}"
    );
    let err = failed(
        &pairs(&cache, &dir.path().join("bad"), &["--shard", "3/3"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("--shard"), "{err}");
}

#[test]
fn a_killed_pairs_run_resumes_without_remaking_finished_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let whole = dir.path().join("whole");
    succeeded(&pairs(&cache, &whole, &[]).output().unwrap());
    let resumed = dir.path().join("resumed");
    let mut run = pairs(&cache, &resumed, &[]).spawn().unwrap();
    let finished = |k: usize| {
        let split = if k % 4 == 3 { "test" } else { "train" };
        resumed.join(format!("{split}_B/{k:06}.png"))
    };
    let started = std::time::Instant::now();
    while !finished(1).exists() && started.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    run.kill().unwrap();
    run.wait().unwrap();
    let done: Vec<usize> = (0..8).filter(|&k| finished(k).exists()).collect();
    assert!(done.len() >= 2 && done.len() < 8, "killed after {done:?}");
    let kept: Vec<_> = done
        .iter()
        .map(|&k| std::fs::metadata(finished(k)).unwrap().modified().unwrap())
        .collect();
    let err = succeeded(&pairs(&cache, &resumed, &[]).output().unwrap());
    assert!(
        err.contains(&format!("({} already there)", done.len())),
        "{err}"
    );
    for (&k, time) in done.iter().zip(kept) {
        assert_eq!(
            std::fs::metadata(finished(k)).unwrap().modified().unwrap(),
            time,
            "pair {k} was rewritten"
        );
    }
    let mut files = tree(&resumed);
    files.retain(|p, _| !p.to_string_lossy().contains(".tmp"));
    assert!(
        files == tree(&whole),
        "a killed and resumed run gives the same set"
    );
}

#[test]
fn distill_writes_a_generator_that_apply_runs_at_the_photo_size_and_refuses_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs");
    transform_pairs(&data, 8, 32);
    let out = dir.path().join("t.generator.safetensors");
    let train = |extra: &[&str]| {
        p2pz()
            .arg("distill")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args([
                "--size", "32", "--batch", "2", "--width", "4", "--blocks", "1",
            ])
            .args([
                "--eval-every",
                "3",
                "--checkpoint-every",
                "3",
                "--from",
                "cat",
                "--to",
                "dog",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let err = succeeded(&train(&["--iters", "6"]));
    assert!(err.contains("perceptual loss is off"), "{err}");
    assert!(err.contains("held-out PSNR"), "{err}");
    let header = pix2pix_zero::distill::file::read_header(&out).unwrap();
    assert_eq!(
        (header.iterations, header.pairs, header.train_size),
        (6, 6, 32)
    );
    assert!(header.makes("Cat", "dog") && !header.makes("dog", "cat"));
    assert_eq!(header.scores.unwrap().pairs, 2);
    let err = failed(&train(&["--iters", "6"]));
    assert!(err.contains("--overwrite"), "{err}");
    let err = succeeded(&train(&["--resume", "--iters", "9"]));
    assert!(err.contains("resuming at iteration 6"), "{err}");
    assert_eq!(
        pix2pix_zero::distill::file::read_header(&out)
            .unwrap()
            .iterations,
        9
    );

    let photo = dir.path().join("photo.png");
    let image = picture(&mut Rng::new(3), 64);
    let odd = image::imageops::crop_imm(&image, 0, 0, 61, 37).to_image();
    odd.save(&photo).unwrap();
    let apply = |result: &Path, extra: &[&str]| {
        p2pz()
            .arg("apply")
            .arg(&photo)
            .arg("--generator")
            .arg(&out)
            .arg("--out")
            .arg(result)
            .args(extra)
            .output()
            .unwrap()
    };
    let first = dir.path().join("first.png");
    let err = succeeded(&apply(&first, &[]));
    assert!(err.contains("cat → dog"), "{err}");
    let result = image::open(&first).unwrap().to_rgb8();
    assert_eq!(result.dimensions(), (61, 37), "the photo's own size");
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(first.with_extension("json")).unwrap()).unwrap();
    assert_eq!(sidecar["edit"], "cat → dog");
    let second = dir.path().join("second.png");
    succeeded(&apply(&second, &[]));
    assert_eq!(
        image::open(&second).unwrap().to_rgb8(),
        result,
        "deterministic"
    );
    let err = failed(&apply(&first, &[]));
    assert!(err.contains("--overwrite"), "{err}");
    succeeded(&apply(&first, &["--overwrite", "--size", "32"]));
    assert_eq!(
        image::open(&first).unwrap().to_rgb8().dimensions(),
        (61, 37)
    );

    let bad = |bytes: &[u8], name: &str, wanted: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = p2pz()
            .arg("apply")
            .arg(&photo)
            .arg("--generator")
            .arg(&path)
            .arg("--out")
            .arg(dir.path().join(format!("{name}.png")))
            .output()
            .unwrap();
        let err = failed(&out);
        assert!(err.contains(wanted), "{name}: {err}");
    };
    let good = std::fs::read(&out).unwrap();
    bad(
        b"not a generator at all",
        "garbage.safetensors",
        "not a readable safetensors file",
    );
    bad(&good[..good.len() / 2], "cut.safetensors", "damaged");
    let session_like = pix2pix_zero::edit::tensor_file::encode(
        &[("x", &Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())],
        Default::default(),
    )
    .unwrap();
    bad(&session_like, "other.safetensors", "not a p2pz generator");
    let mut header = pix2pix_zero::distill::file::read_header(&out).unwrap();
    header.config.width = 8;
    let (generator, _) = pix2pix_zero::distill::file::load(&out, &Device::Cpu).unwrap();
    let _ = generator;
    let weights: Vec<(String, Tensor)> = candle_core::safetensors::load(&out, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let mismatched = pix2pix_zero::distill::file::encode(&weights, &header).unwrap();
    bad(
        &mismatched,
        "mismatched.safetensors",
        "does not hold the weights its header describes",
    );
}
