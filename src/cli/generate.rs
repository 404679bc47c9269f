//! `p2pz generate`: text to image with classifier-free guidance and DDIM.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use clap::Args;
use pix2pix_zero::engine::generate::{generate, latent_to_rgb, GenerateParams};
use pix2pix_zero::export::save_png;

use super::{shown, step_bar, ModelArgs};

/// Arguments of `p2pz generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// DDIM steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (1 turns it off).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Width in pixels, a multiple of 64 (default: the model's native size).
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels, a multiple of 64 (default: the model's native size).
    #[arg(long)]
    height: Option<usize>,
    /// Where to write the PNG.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `p2pz generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let model = args.model.load()?;
    let side = model.default_image_side();
    let params = GenerateParams {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        width: args.width.unwrap_or(side),
        height: args.height.unwrap_or(side),
    };
    let bar = step_bar(params.steps, "generate");
    let latent = generate(
        &model,
        &params,
        &mut |p| bar.set_position(p.step as u64),
        &AtomicBool::new(false),
    )?;
    bar.finish();
    let image = latent_to_rgb(&model, &latent)?;
    let record =
        serde_json::json!({ "command": "generate", "model": model.files.origin, "params": params });
    save_png(&args.out, &image, &[("p2pz", record.to_string())])
        .with_context(|| format!("writing {}", shown(&args.out).display()))?;
    eprintln!("wrote {}", shown(&args.out).display());
    Ok(())
}
