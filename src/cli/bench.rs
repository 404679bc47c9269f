//! `p2pz bench`: seconds and peak memory of the UNet and VAE on a full-size SD-1.5 architecture
//! with random weights built here (no download), the numbers `bench/bench_diffusers.py` measures
//! for diffusers.
//!
//! Each case runs in a fresh child process (`p2pz bench --worker CASE SIZE`), so that its peak
//! resident memory (`VmHWM`) is its own.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use clap::Args;
use pix2pix_zero::distill::generator::{Generator, GeneratorConfig};
use pix2pix_zero::distill::params::SeededParams;
use pix2pix_zero::edit::guidance::cross_attention_loss;
use pix2pix_zero::engine::control::{AttentionKind, Keep, Recorder};
use pix2pix_zero::engine::rng::Rng;
use pix2pix_zero::engine::unet::UNet;
use pix2pix_zero::engine::vae::{LatentDraw, Vae};

use super::full_size::{random_weights, sd15_unet, sd15_vae, RandomWeights};
use super::{describe_device, DeviceChoice, Precision};

/// Every case, in the order they run.
const CASES: [&str; 8] = [
    "unet_fwd_b1",
    "unet_fwd_b2",
    "unet_fwdbwd_b1",
    "guidance_b1",
    "vae_encode",
    "vae_decode",
    "unet_fwdbwd_b2",
    "generator",
];

/// Arguments of `p2pz bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Image sides to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    sizes: Vec<usize>,
    /// Timed repeats after one warm-up run.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Cases to run (default: all): unet_fwd_b1, unet_fwd_b2, unet_fwdbwd_b1, unet_fwdbwd_b2,
    /// guidance_b1, vae_encode, vae_decode, generator (the distilled generator, f32, one image).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Time the editor instead: inversion, first edit, re-edit and the session's size, on the tiny
    /// fixture model (128², 10 steps) and on a full-size SD-1.5 with random weights (at --sizes,
    /// --editor-steps steps).
    #[arg(long)]
    editor: bool,
    /// DDIM steps of the full-size editor benchmark (the paper uses 50; each costs minutes on a CPU).
    #[arg(long, default_value_t = 3)]
    editor_steps: usize,
    /// The device to run on.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    device: DeviceChoice,
    /// Precision of weights and activations.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Internal: run one case in this process and print its result as JSON.
    #[arg(long, num_args = 2, value_names = ["CASE", "SIZE"], hide = true)]
    worker: Vec<String>,
}

/// Peak resident memory of this process so far, in MB (`VmHWM`), when the OS tells.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// One measured case.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Measurement {
    case: String,
    size: usize,
    build_s: f64,
    seconds: Vec<f64>,
    peak_rss_mb: Option<f64>,
}

/// Runs `f` once to warm up, then `repeats` timed times, each until `device` finished it.
fn time(device: &Device, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    f()?;
    device.synchronize()?;
    (0..repeats)
        .map(|_| {
            let start = Instant::now();
            f()?;
            device.synchronize()?;
            Ok(start.elapsed().as_secs_f64())
        })
        .collect()
}

/// Runs one case in this process.
fn worker(
    case: &str,
    size: usize,
    repeats: usize,
    dev: &Device,
    dtype: DType,
) -> Result<Measurement> {
    let dev = dev.clone();
    let vb = || random_weights(dtype, &dev);
    let latent = size / 8;
    let mut rng = Rng::new(0);
    let start = Instant::now();
    let seconds = if case == "generator" {
        let vars = candle_nn::VarMap::new();
        let generator = Generator::new(
            SeededParams::builder(&vars, 0, &dev),
            GeneratorConfig::default(),
        )?;
        let build_s = start.elapsed().as_secs_f64();
        let image = (rng.randn((1, 3, size, size), DType::F32, &dev)? * 0.5)?;
        let seconds = time(&dev, repeats, || {
            generator.forward(&image).map(drop).map_err(Into::into)
        })?;
        (build_s, seconds)
    } else if case.starts_with("vae") {
        let vae = Vae::load(vb().pp("vae"), sd15_vae()?)?;
        let build_s = start.elapsed().as_secs_f64();
        let image = (rng.randn((1, 3, size, size), dtype, &dev)? * 0.5)?;
        let z = rng.randn((1, 4, latent, latent), dtype, &dev)?;
        let seconds = match case {
            "vae_encode" => time(&dev, repeats, || {
                vae.encode(&image, LatentDraw::Mean)
                    .map(drop)
                    .map_err(Into::into)
            })?,
            "vae_decode" => time(&dev, repeats, || {
                vae.decode(&z).map(drop).map_err(Into::into)
            })?,
            other => bail!("unknown case {other}"),
        };
        (build_s, seconds)
    } else {
        let unet = UNet::load(vb().pp("unet"), sd15_unet()?)?;
        let build_s = start.elapsed().as_secs_f64();
        let batch = if case.ends_with("b2") { 2 } else { 1 };
        let x = rng.randn((batch, 4, latent, latent), dtype, &dev)?;
        let context = rng.randn((batch, 77, 768), dtype, &dev)?;
        let t = 500.0;
        let seconds = match case {
            "unet_fwd_b1" | "unet_fwd_b2" => time(&dev, repeats, || {
                unet.forward(&x, t, &context, None)
                    .map(drop)
                    .map_err(Into::into)
            })?,
            "unet_fwdbwd_b1" | "unet_fwdbwd_b2" => time(&dev, repeats, || {
                // The loss diffusers' benchmark uses: mean(out²), gradient w.r.t. the latent only.
                let leaf = Var::from_tensor(&x)?;
                let out = unet.forward(leaf.as_tensor(), t, &context, None)?;
                let grads = out.sqr()?.mean_all()?.backward()?;
                grads
                    .get(leaf.as_tensor())
                    .context("no gradient reached the latent")?;
                Ok(())
            })?,
            "guidance_b1" => {
                // One pix2pix-zero guidance step: cross-attention maps kept in the graph, the
                // loss against reference maps, its gradient w.r.t. the latent.
                let mut reference =
                    Recorder::new(AttentionKind::CrossAttention, Keep::Detached(dtype));
                let x_ref = rng.randn((1, 4, latent, latent), dtype, &dev)?;
                unet.forward(&x_ref, t, &context, Some(&mut reference))?;
                let reference = reference.take();
                time(&dev, repeats, || {
                    let leaf = Var::from_tensor(&x)?;
                    let mut edited = Recorder::new(AttentionKind::CrossAttention, Keep::Graph);
                    unet.forward(leaf.as_tensor(), t, &context, Some(&mut edited))?;
                    let grads = cross_attention_loss(edited.maps(), &reference)?.backward()?;
                    grads
                        .get(leaf.as_tensor())
                        .context("no gradient reached the latent")?;
                    Ok(())
                })?
            }
            other => bail!("unknown case {other}"),
        };
        (build_s, seconds)
    };
    Ok(Measurement {
        case: case.to_string(),
        size,
        build_s: seconds.0,
        seconds: seconds.1,
        peak_rss_mb: peak_rss_mb(),
    })
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `p2pz bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let device = args.device.open()?;
    args.precision.prepare(&device)?;
    let dtype = args.precision.dtype();
    if let [case, size] = args.worker.as_slice() {
        let measurement = worker(case, size.parse()?, args.repeats.max(1), &device, dtype)?;
        println!("{}", serde_json::to_string(&measurement)?);
        return Ok(());
    }
    if args.editor {
        return editor_bench(&args, &device, dtype);
    }
    let cases: Vec<String> = if args.cases.is_empty() {
        CASES.iter().map(|c| c.to_string()).collect()
    } else {
        args.cases.clone()
    };
    if let Some(unknown) = cases.iter().find(|c| !CASES.contains(&c.as_str())) {
        bail!(
            "unknown case `{unknown}`; the cases are {}",
            CASES.join(", ")
        );
    }
    if let Some(bad) = args.sizes.iter().find(|s| *s == &0 || *s % 64 != 0) {
        bail!("size {bad} is not a positive multiple of 64");
    }
    let exe = std::env::current_exe()?;
    println!(
        "p2pz bench: SD-1.5 architecture, random weights, {}, {}, {} CPU threads",
        args.precision.name(),
        describe_device(&device),
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<16} {:>5} {:>10} {:>10} {:>12}",
        "case", "size", "median s", "build s", "peak RSS MB"
    );
    let mut results = vec![];
    for &size in &args.sizes {
        for case in &cases {
            let output = std::process::Command::new(&exe)
                .args([
                    "bench",
                    "--repeats",
                    &args.repeats.to_string(),
                    "--device",
                    args.device.name(),
                    "--precision",
                    args.precision.name(),
                    "--worker",
                    case,
                    &size.to_string(),
                ])
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running case {case}"))?;
            if !output.status.success() {
                println!("{case:<16} {size:>5} failed ({})", output.status);
                continue;
            }
            let m: Measurement = serde_json::from_slice(&output.stdout)?;
            println!(
                "{:<16} {:>5} {:>10.3} {:>10.1} {:>12.0}",
                m.case,
                m.size,
                median(&m.seconds),
                m.build_s,
                m.peak_rss_mb.unwrap_or(f64::NAN)
            );
            results.push(m);
        }
    }
    if let Some(path) = args.json {
        pix2pix_zero::export::write_atomically(
            &path,
            serde_json::to_string_pretty(&results)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// Random weights that also keep every tensor they hand out, so a model built from them can be
/// written to disk.
struct RecordingWeights {
    kept: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Tensor>>>,
}

impl SimpleBackend for RecordingWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = RandomWeights.get(shape, name, init, dtype, dev)?;
        self.kept
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        RandomWeights.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // Say no to the optional `text_model.` prefix and to new-style VAE attention names, so
        // the files get the names real SD 1.5 repos use.
        !name.starts_with("text_model.") && !name.ends_with("to_q.weight")
    }
}

/// Writes a diffusers-format SD-1.5 folder with random weights (about 4.3 GB) into `dir`,
/// reusing the fixture's tokenizer and scheduler config.
fn write_random_sd15(dir: &std::path::Path) -> Result<()> {
    use pix2pix_zero::engine::config::TextEncoderConfig;
    use pix2pix_zero::engine::text::ClipTextEncoder;
    let fixture = tiny_fixture()?;
    let text_config = serde_json::json!({
        "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 768,
        "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
    });
    let unet_config = serde_json::json!({
        "_class_name": "UNet2DConditionModel", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2, "sample_size": 64
    });
    let vae_config = serde_json::json!({
        "block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "layers_per_block": 2,
        "norm_num_groups": 32, "scaling_factor": 0.18215
    });
    let components: [(&str, &str, serde_json::Value); 3] = [
        ("text_encoder", "model.safetensors", text_config.clone()),
        (
            "unet",
            "diffusion_pytorch_model.safetensors",
            unet_config.clone(),
        ),
        (
            "vae",
            "diffusion_pytorch_model.safetensors",
            vae_config.clone(),
        ),
    ];
    for (component, file, config) in components {
        let folder = dir.join(component);
        std::fs::create_dir_all(&folder)?;
        std::fs::write(folder.join("config.json"), config.to_string())?;
        let kept = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let backend = RecordingWeights { kept: kept.clone() };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu).into();
        match component {
            "text_encoder" => drop(ClipTextEncoder::load(
                vb,
                serde_json::from_value::<TextEncoderConfig>(text_config.clone())?,
            )?),
            "unet" => drop(UNet::load(vb, sd15_unet()?)?),
            _ => drop(Vae::load(vb, sd15_vae()?)?),
        }
        let kept = std::mem::take(&mut *kept.lock().expect("not poisoned"));
        candle_core::safetensors::save(&kept, folder.join(file))?;
    }
    for (from, to) in [("tokenizer", "tokenizer"), ("scheduler", "scheduler")] {
        std::fs::create_dir_all(dir.join(to))?;
        for entry in std::fs::read_dir(fixture.join(from))?.flatten() {
            std::fs::copy(entry.path(), dir.join(to).join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// The repo's tiny fixture model, found from the working directory (a binary carried to another
/// machine runs in a copy of the tree) or where this binary was built.
fn tiny_fixture() -> Result<PathBuf> {
    let relative = PathBuf::from("tests/fixtures/tiny-sd");
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(&relative);
    [relative, built]
        .into_iter()
        .find(|dir| dir.join("model_index.json").is_file())
        .context(
            "the editor benchmark needs the repo's tests/fixtures/tiny-sd (its tokenizer and \
             scheduler): run it from the repo's root",
        )
}

/// Times inversion, a first edit, a re-edit and reports the session's size for one model.
fn editor_case(
    model_dir: &std::path::Path,
    label: &str,
    side: usize,
    steps: usize,
    device: &Device,
    dtype: DType,
) -> Result<()> {
    use pix2pix_zero::edit::guidance::GuidanceParams;
    use pix2pix_zero::edit::inversion::InversionParams;
    use pix2pix_zero::edit::noise_reg::NoiseRegularization;
    use pix2pix_zero::edit::{edit, photo_session, EditSettings, PhotoSettings};
    use pix2pix_zero::engine::ddim::InverseSchedule;
    use std::sync::atomic::AtomicBool;

    let files = pix2pix_zero::engine::source::from_folder(model_dir, label)?;
    let model = pix2pix_zero::engine::StableDiffusion::load(files, device, dtype)?;
    let mut rng = Rng::new(1);
    let image = (rng.randn((1, 3, side, side), DType::F32, device)? * 0.3)?.clamp(-1f32, 1f32)?;
    let d = model.text.encoder.config().hidden_size;
    let direction = (rng.randn((1, 77, d), DType::F32, device)? * 0.3)?;
    let never = AtomicBool::new(false);
    let photo = PhotoSettings {
        latent_draw: LatentDraw::Mean,
        inversion: InversionParams {
            steps,
            schedule: InverseSchedule::Authors,
            regularization: Some(NoiseRegularization::default()),
        },
        seed: 0,
    };
    let settings = |xa| EditSettings {
        guidance: GuidanceParams {
            lambda_xa: xa,
            guidance_scale: 5.0,
        },
        strength: 1.0,
    };
    let start = Instant::now();
    let mut session = photo_session(
        &model,
        &image,
        0,
        "a photo of a cat",
        steps,
        &photo,
        &mut |_| {},
        &never,
    )?;
    let invert_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    edit(
        &model,
        &mut session,
        &direction,
        &settings(0.1),
        &mut |_| {},
        &never,
    )?;
    let first_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let again = edit(
        &model,
        &mut session,
        &direction,
        &settings(0.15),
        &mut |_| {},
        &never,
    )?;
    let re_edit_s = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        again.reused_reference,
        "the re-edit did not reuse the cache"
    );
    println!(
        "{label:<22} {side:>5} {steps:>5} {invert_s:>10.1} {first_s:>12.1} {re_edit_s:>10.1} {:>10.1}",
        session.bytes() as f64 / 1e6
    );
    Ok(())
}

/// `p2pz bench --editor`.
fn editor_bench(args: &BenchArgs, device: &Device, dtype: DType) -> Result<()> {
    println!(
        "p2pz bench --editor: {}, {}, {} CPU threads",
        args.precision.name(),
        describe_device(device),
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<22} {:>5} {:>5} {:>10} {:>12} {:>10} {:>10}",
        "model", "size", "steps", "invert s", "first edit s", "re-edit s", "cache MB"
    );
    let fixture = tiny_fixture()?;
    editor_case(&fixture, "tiny fixture", 128, 10, device, dtype)?;
    let dir = tempfile::tempdir()?;
    write_random_sd15(dir.path())?;
    for &side in &args.sizes {
        editor_case(
            dir.path(),
            "SD-1.5, random weights",
            side,
            args.editor_steps,
            device,
            dtype,
        )?;
    }
    Ok(())
}
