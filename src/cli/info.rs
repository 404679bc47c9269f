//! `p2pz info`: what a model folder holds and how our UNet sees it.

use std::fmt::Write;
use std::path::Path;

use anyhow::Result;
use clap::Args;
use pix2pix_zero::engine::control::AttentionKind;
use pix2pix_zero::engine::StableDiffusion;

use super::ModelArgs;

/// Arguments of `p2pz info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image side (pixels) for which attention resolutions are listed.
    #[arg(long, default_value_t = 512)]
    size: usize,
}

/// Stored dtypes and parameter count of a safetensors file.
fn weight_summary(path: &Path) -> Result<(String, usize)> {
    // SAFETY: read-only memory map of a weight file that is not modified while we read it.
    let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(path)? };
    let mut dtypes = std::collections::BTreeSet::new();
    let mut params = 0;
    for (_, view) in file.tensors() {
        dtypes.insert(format!("{:?}", view.dtype()));
        params += view.shape().iter().product::<usize>();
    }
    Ok((dtypes.into_iter().collect::<Vec<_>>().join("+"), params))
}

/// Runs `p2pz info`.
pub fn run(args: InfoArgs) -> Result<()> {
    let model: StableDiffusion = args.model.load()?;
    print!("{}", describe(&model, args.size)?);
    Ok(())
}

/// The report `p2pz info` prints.
pub fn describe(model: &StableDiffusion, size: usize) -> Result<String> {
    let mut out = String::new();
    let files = &model.files;
    writeln!(out, "model     {}", files.origin)?;
    writeln!(out, "folder    {}", files.root.display())?;
    writeln!(
        out,
        "device    {:?}, computing in {:?}",
        model.device, model.dtype
    )?;
    writeln!(out, "\ncomponent      stored   parameters  file")?;
    for (name, (_, weights)) in [
        ("unet", &files.unet),
        ("vae", &files.vae),
        ("text_encoder", &files.text_encoder),
    ] {
        let (dtypes, params) = weight_summary(weights)?;
        let relative = weights.strip_prefix(&files.root).unwrap_or(weights);
        writeln!(
            out,
            "{name:<14} {dtypes:<8} {:>10.1}M  {}",
            params as f64 / 1e6,
            relative.display()
        )?;
    }
    let scheduler = model.scheduler.config();
    writeln!(
        out,
        "scheduler      {:?}, {:?} schedule, offset {}, alpha-to-one {}",
        scheduler.prediction_type,
        scheduler.beta_schedule,
        scheduler.steps_offset,
        scheduler.set_alpha_to_one
    )?;
    let text = model.text.encoder.config();
    writeln!(
        out,
        "text encoder   {} layers, width {}, {:?}, pad token id {}",
        text.num_hidden_layers,
        text.hidden_size,
        text.hidden_act,
        model.text.tokenizer.pad_id()
    )?;
    let latent = size / model.vae_scale();
    let layers = model.unet.attention_layers((latent, latent));
    let cross = layers
        .iter()
        .filter(|l| l.kind == AttentionKind::CrossAttention)
        .count();
    writeln!(
        out,
        "\nattention layers at {size}x{size} (latent {latent}x{latent}): {} self, {cross} cross",
        layers.len() - cross
    )?;
    for layer in layers
        .iter()
        .filter(|l| l.kind == AttentionKind::CrossAttention)
    {
        let (h, w) = layer.spatial;
        writeln!(
            out,
            "  {:<14} {h:>3}x{w:<3} {} heads, {} queries x 77 tokens",
            layer.name,
            layer.heads,
            h * w
        )?;
    }
    Ok(out)
}
