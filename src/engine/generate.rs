//! Text-to-image sampling with classifier-free guidance and DDIM: the synthetic-image path of
//! the paper starts here, and `p2pz generate` runs it.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{IndexOp, Tensor};

use super::error::{Error, Result};
use super::rng::Rng;
use super::StableDiffusion;

/// Latent channels of Stable Diffusion.
pub const LATENT_CHANNELS: usize = 4;

/// What to generate.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerateParams {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (empty: unconditional).
    pub negative_prompt: String,
    /// DDIM steps.
    pub steps: usize,
    /// Classifier-free guidance scale; 1 turns guidance off.
    pub guidance: f64,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Image width in pixels, a multiple of 64.
    pub width: usize,
    /// Image height in pixels, a multiple of 64.
    pub height: usize,
}

/// One unit of progress of a long computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// What is running, e.g. "denoise".
    pub stage: &'static str,
    /// Steps done.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
}

/// Checks an image size against what the UNet can take.
pub fn check_image_size(model: &StableDiffusion, width: usize, height: usize) -> Result<()> {
    let multiple = model.vae_scale() * model.unet.config().downsample_factor();
    if width == 0
        || height == 0
        || !width.is_multiple_of(multiple)
        || !height.is_multiple_of(multiple)
    {
        return Err(Error::Input(format!(
            "image size {width}x{height} is not a positive multiple of {multiple}: pick e.g. 512x512"
        )));
    }
    Ok(())
}

/// Seeded initial noise `(1, 4, h/8, w/8)` for an image of `width`×`height`.
pub fn initial_noise(
    model: &StableDiffusion,
    seed: u64,
    width: usize,
    height: usize,
) -> Result<Tensor> {
    let s = model.vae_scale();
    Ok(Rng::new(seed).randn(
        (1, LATENT_CHANNELS, height / s, width / s),
        model.dtype,
        &model.device,
    )?)
}

/// `ε_u + w·(ε_c − ε_u)` from a `[uncond; cond]` batch prediction.
pub fn classifier_free_guidance(prediction: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let uncond = prediction.i(0..1)?;
    let cond = prediction.i(1..2)?;
    &uncond + ((cond - &uncond)? * scale)?
}

/// Samples a latent for `params`, reporting each step and stopping within one step of `cancel`.
pub fn generate(
    model: &StableDiffusion,
    params: &GenerateParams,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Tensor> {
    check_image_size(model, params.width, params.height)?;
    if params.steps == 0 {
        return Err(Error::Input("--steps must be at least 1".into()));
    }
    let guided = params.guidance > 1.0;
    let prompts: Vec<&str> = if guided {
        vec![&params.negative_prompt, &params.prompt]
    } else {
        vec![&params.prompt]
    };
    let context = model.text.embed(&prompts, &model.device, model.dtype)?;
    let mut x = initial_noise(model, params.seed, params.width, params.height)?;
    let timesteps = model.scheduler.timesteps(params.steps);
    for (i, &t) in timesteps.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let eps = if guided {
            let out = model
                .unet
                .forward(&Tensor::cat(&[&x, &x], 0)?, t as f64, &context, None)?;
            classifier_free_guidance(&out, params.guidance)?
        } else {
            model.unet.forward(&x, t as f64, &context, None)?
        };
        x = model.scheduler.step(&eps, t, &x, params.steps)?;
        progress(Progress {
            stage: "denoise",
            step: i + 1,
            total: timesteps.len(),
        });
    }
    Ok(x)
}

/// Decodes a latent to 8-bit RGB: `clamp(x/2 + 0.5, 0, 1)·255`, rounded, as diffusers does.
pub fn latent_to_rgb(model: &StableDiffusion, latent: &Tensor) -> Result<image::RgbImage> {
    let image = model.vae.decode(latent)?;
    let (_, _, h, w) = image.dims4()?;
    let pixels = ((image.i(0)?.to_dtype(candle_core::DType::F32)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .affine(255.0, 0.0)?
        .round()?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes: Vec<u8> = pixels.into_iter().map(|v| v as u8).collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| Error::Input("decoded image has an unexpected size".into()))
}
