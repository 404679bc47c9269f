//! Loading models from folders and the Hugging Face cache, and the errors for bad input.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture_dir, get, reference};
use pix2pix_zero::engine::source::{self, ResolveOptions};
use pix2pix_zero::engine::{Error, StableDiffusion};

/// Copies the fixture model into a fresh temporary folder.
fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    copy_dir(&fixture_dir(), &root);
    (dir, root)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn load(root: &Path) -> Result<StableDiffusion, Error> {
    let files = source::from_folder(root, &root.display().to_string())?;
    StableDiffusion::load(files, &Device::Cpu, DType::F32)
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
}

#[test]
fn fp16_variant_files_load_and_compute_in_f32() {
    let (_tmp, root) = fixture_copy();
    for (component, name) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ] {
        let full = root.join(component).join(format!("{name}.safetensors"));
        let tensors = candle_core::safetensors::load(&full, &Device::Cpu).unwrap();
        let half: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| {
                let v = if v.dtype() == DType::F32 {
                    v.to_dtype(DType::F16).unwrap()
                } else {
                    v
                };
                (k, v)
            })
            .collect();
        candle_core::safetensors::save(
            &half,
            root.join(component)
                .join(format!("{name}.fp16.safetensors")),
        )
        .unwrap();
        std::fs::remove_file(full).unwrap();
    }
    let model = load(&root).unwrap();
    assert!(model
        .files
        .unet
        .1
        .ends_with("unet/diffusion_pytorch_model.fp16.safetensors"));
    let r = reference();
    let sample = get(&r, "unet.sample");
    let x = Tensor::cat(&[&sample, &sample], 0).unwrap();
    let out = model
        .unet
        .forward(&x, 981.0, &get(&r, "unet.context"), None)
        .unwrap();
    // f16 weights round at about 1e-3 relative; the output stays within that of f32's.
    assert_close(
        "unet from fp16 weights",
        &out,
        &get(&r, "unet.t981.out"),
        0.0,
        5e-3,
    );
}

#[test]
fn missing_pieces_are_named() {
    let err = load(Path::new("/definitely/not/here"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/definitely/not/here") && err.contains("--model"),
        "{err}"
    );

    let (_tmp, root) = fixture_copy();
    std::fs::remove_dir_all(root.join("scheduler")).unwrap();
    let err = load(&root).unwrap_err().to_string();
    assert!(
        err.contains("scheduler") && err.contains("is missing"),
        "{err}"
    );

    let (_tmp, root) = fixture_copy();
    std::fs::remove_file(root.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(root.join("unet/diffusion_pytorch_model.bin"), b"pickle").unwrap();
    let err = load(&root).unwrap_err().to_string();
    assert!(err.contains(".bin") && err.contains("safetensors"), "{err}");

    let (_tmp, root) = fixture_copy();
    std::fs::remove_file(root.join("tokenizer/merges.txt")).unwrap();
    let err = load(&root).unwrap_err().to_string();
    assert!(err.contains("merges.txt"), "{err}");
}

#[test]
fn a_config_that_does_not_match_the_weights_names_the_tensor() {
    let (_tmp, root) = fixture_copy();
    edit_json(&root.join("unet/config.json"), |v| {
        v["cross_attention_dim"] = 48.into()
    });
    edit_json(&root.join("text_encoder/config.json"), |v| {
        v["hidden_size"] = 48.into()
    });
    let err = load(&root).unwrap_err();
    assert!(matches!(err, Error::Weights { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("shape mismatch") && text.contains("config.json"),
        "{text}"
    );

    let (_tmp, root) = fixture_copy();
    std::fs::write(
        root.join("vae/diffusion_pytorch_model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = load(&root).unwrap_err().to_string();
    assert!(
        err.contains("vae/diffusion_pytorch_model.safetensors")
            && err.contains("download it again"),
        "{err}"
    );
}

#[test]
fn sdxl_and_broken_configs_are_refused() {
    let (_tmp, root) = fixture_copy();
    edit_json(&root.join("model_index.json"), |v| {
        v["_class_name"] = "StableDiffusionXLPipeline".into();
        v["text_encoder_2"] = serde_json::json!(["transformers", "CLIPTextModelWithProjection"]);
    });
    let err = load(&root).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");

    let (_tmp, root) = fixture_copy();
    std::fs::write(root.join("vae/config.json"), "{ not json").unwrap();
    let err = load(&root).unwrap_err().to_string();
    assert!(err.contains("vae/config.json"), "{err}");
}

#[test]
fn sd2_tokenizers_pad_with_the_exclamation_mark() {
    let (_tmp, root) = fixture_copy();
    edit_json(&root.join("tokenizer/special_tokens_map.json"), |v| {
        v["pad_token"] = "!".into()
    });
    let model = load(&root).unwrap();
    let ids = model.text.tokenizer.encode("a photo of a cat").unwrap();
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(ids[7..].iter().all(|&id| id == 0), "`!` is token 0");
}

#[test]
fn repo_ids_resolve_from_the_hub_cache_and_offline_misses_say_where_we_looked() {
    let cache = tempfile::tempdir().unwrap();
    let repo_dir = cache.path().join("models--tiny--sd");
    copy_dir(&fixture_dir(), &repo_dir.join("snapshots").join("0123abc"));
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), "0123abc").unwrap();
    let options = ResolveOptions {
        cache_dir: cache.path().to_path_buf(),
        offline: true,
        prefer_fp16_download: false,
    };
    let files = source::resolve("tiny/sd", &options, &mut ()).unwrap();
    assert_eq!(files.root, repo_dir.join("snapshots/0123abc"));
    assert_eq!(files.origin, "tiny/sd");
    StableDiffusion::load(files, &Device::Cpu, DType::F32).unwrap();

    let err = source::resolve("someone/missing-model", &options, &mut ()).unwrap_err();
    assert!(matches!(err, Error::NotCached { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&cache.path().display().to_string()) && text.contains("HF_HUB_OFFLINE"),
        "{text}"
    );
}

#[test]
fn v_prediction_models_generate() {
    let (_tmp, root) = fixture_copy();
    edit_json(&root.join("scheduler/scheduler_config.json"), |v| {
        v["prediction_type"] = "v_prediction".into()
    });
    let model = load(&root).unwrap();
    let params = pix2pix_zero::engine::generate::GenerateParams {
        prompt: "a photo of a cat".into(),
        negative_prompt: String::new(),
        steps: 4,
        guidance: 5.0,
        seed: 1,
        width: 128,
        height: 128,
    };
    let mut steps = vec![];
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let latent = pix2pix_zero::engine::generate::generate(
        &model,
        &params,
        &mut |p| steps.push(p.step),
        &cancel,
    )
    .unwrap();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert_eq!(latent.dims(), &[1, 4, 16, 16]);
    let values = latent.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    let image = pix2pix_zero::engine::generate::latent_to_rgb(&model, &latent).unwrap();
    assert_eq!(image.dimensions(), (128, 128));
}
