//! `p2pz distill` (train a generator on a pairs folder) and `p2pz apply` (run one on a photo).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pix2pix_zero::distill::discriminator::DEFAULT_WIDTH;
use pix2pix_zero::distill::file::{self, GeneratorHeader};
use pix2pix_zero::distill::generator::{GeneratorConfig, ARCHITECTURE, MAX_APPLY_SIDE, STRIDE};
use pix2pix_zero::distill::losses::Perceptual;
use pix2pix_zero::distill::pairs::PairRecord;
use pix2pix_zero::distill::train::{
    self, LossWeights, PairFiles, TrainEnd, TrainSettings, Trainer,
};
use pix2pix_zero::engine::source::{self, ResolveOptions, DEFAULT_MODEL};
use pix2pix_zero::export::write_atomically;

use super::editing::{cancel_on_ctrl_c, write_result};
use super::{pick_device, shown};

/// Arguments of `p2pz distill`.
#[derive(Debug, Args)]
pub struct DistillArgs {
    /// A pairs folder: train_A/ and train_B/ (and test_A/, test_B/), e.g. from `p2pz pairs`.
    dir: PathBuf,
    /// The generator file to write (e.g. cat2dog.generator.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Side of the square training crops (a multiple of 8, at least 32).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Training iterations.
    #[arg(long, default_value_t = 5000)]
    iters: usize,
    /// Pairs per iteration.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Learning rate of both networks (AdamW).
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Weight of the L1 loss.
    #[arg(long, default_value_t = LossWeights::default().l1)]
    l1: f64,
    /// Weight of the perceptual loss (features of the Stable Diffusion VAE's encoder; 0: off).
    #[arg(long, default_value_t = LossWeights::default().perceptual)]
    perceptual: f64,
    /// Weight of the adversarial loss (PatchGAN, hinge; 0: no critic).
    #[arg(long, default_value_t = LossWeights::default().adversarial)]
    adversarial: f64,
    /// The model whose VAE the perceptual loss uses (default: the one the pairs came from). It is
    /// looked up locally only; when missing, the perceptual loss is off.
    #[arg(long)]
    perceptual_model: Option<String>,
    /// Generator channels at full size.
    #[arg(long, default_value_t = GeneratorConfig::default().width)]
    width: usize,
    /// Generator residual blocks.
    #[arg(long, default_value_t = GeneratorConfig::default().blocks)]
    blocks: usize,
    /// Seed of the initial weights and of the batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Score the held-out pairs every N iterations.
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Write a checkpoint every N iterations (and on Ctrl-C).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    /// Continue from the checkpoint beside --out.
    #[arg(long)]
    resume: bool,
    /// Replace --out when it exists.
    #[arg(long)]
    overwrite: bool,
    /// The edit's source word, for folders whose pairs do not record it.
    #[arg(long = "from")]
    from: Option<String>,
    /// The edit's target word, for folders whose pairs do not record it.
    #[arg(long = "to")]
    to: Option<String>,
    /// Train on the CPU even when a GPU is available.
    #[arg(long)]
    cpu: bool,
}

/// The checkpoint that belongs to a generator file.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".safetensors")
        .unwrap_or(&name)
        .to_string();
    out.with_file_name(format!("{stem}.checkpoint.safetensors"))
}

/// The first record of `pairs.jsonl`, when the folder is ours.
fn first_record(dir: &Path) -> Option<PairRecord> {
    let text = std::fs::read_to_string(dir.join("pairs.jsonl")).ok()?;
    serde_json::from_str(text.lines().next()?).ok()
}

/// The VAE of `spec` for the perceptual loss, from local files only.
fn perceptual_vae(spec: &str, device: &candle_core::Device) -> Result<Perceptual> {
    let options = ResolveOptions {
        offline: true,
        ..ResolveOptions::from_env()
    };
    let files = source::resolve(spec, &options, &mut ())?;
    let vae = pix2pix_zero::engine::load_vae(&files, device, candle_core::DType::F32)?;
    Ok(Perceptual::new(vae, 1))
}

/// Runs `p2pz distill`.
pub fn run_distill(args: DistillArgs) -> Result<()> {
    let checkpoint = checkpoint_path(&args.out);
    if args.out.exists() && !args.overwrite && !args.resume {
        bail!(
            "`{}` exists: pass --overwrite to replace it, or choose another --out",
            shown(&args.out).display()
        );
    }
    if args.resume && !checkpoint.is_file() {
        bail!(
            "--resume found no checkpoint at `{}`: start without --resume",
            shown(&checkpoint).display()
        );
    }
    let files = PairFiles::find(&args.dir)?;
    let record = first_record(&args.dir);
    let settings = TrainSettings {
        size: args.size,
        iterations: args.iters,
        batch: args.batch,
        learning_rate: args.lr,
        weights: LossWeights {
            l1: args.l1,
            perceptual: args.perceptual,
            adversarial: args.adversarial,
        },
        generator: GeneratorConfig {
            width: args.width,
            blocks: args.blocks,
        },
        discriminator_width: DEFAULT_WIDTH,
        seed: args.seed,
    };
    settings.check()?;
    let device = pick_device(args.cpu)?;
    let perceptual = if args.perceptual > 0.0 {
        let spec = args
            .perceptual_model
            .clone()
            .or_else(|| record.as_ref().map(|r| r.settings.model.clone()))
            .unwrap_or_else(|| DEFAULT_MODEL.to_string());
        match perceptual_vae(&spec, &device) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!(
                    "note: the perceptual loss is off: the VAE of `{spec}` is not here ({e:#}); \
                     pass --perceptual-model FOLDER to use one, or --perceptual 0 to silence this"
                );
                None
            }
        }
    } else {
        None
    };
    let mut trainer = Trainer::new(settings, perceptual, &device)?;
    if args.resume {
        trainer.load_checkpoint(&checkpoint)?;
        eprintln!(
            "resuming at iteration {} of {}",
            trainer.iteration, args.iters
        );
    }
    eprintln!(
        "training a {ARCHITECTURE} generator ({:.2} GMACs at 512²) on {} pairs ({} held out) at \
         {}², batch {}, losses: L1 {}{}{}",
        settings.generator.macs(512, 512) as f64 / 1e9,
        files.train.len(),
        files.test.len(),
        args.size,
        args.batch,
        args.l1,
        if trainer.has_perceptual() {
            format!(", perceptual {}", args.perceptual)
        } else {
            String::new()
        },
        if args.adversarial > 0.0 {
            format!(", adversarial {}", args.adversarial)
        } else {
            String::new()
        },
    );
    let cancel = cancel_on_ctrl_c();
    let bar = ProgressBar::new(args.iters as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:25}] {pos}/{len} it, {elapsed} elapsed, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(trainer.iteration as u64);
    let started = Instant::now();
    let (end, scores) = train::run(
        &mut trainer,
        &files,
        (args.eval_every, args.checkpoint_every),
        &checkpoint,
        &mut |p| {
            let held_out = p
                .scores
                .map(|s| {
                    format!(
                        ", held-out PSNR {:.2} dB (identity {:.2})",
                        s.psnr, s.identity_psnr
                    )
                })
                .unwrap_or_default();
            bar.set_message(format!(
                "L1 {:.4} P {:.4} G {:.3} D {:.3}, {:.2} it/s{held_out}",
                p.losses.l1,
                p.losses.perceptual,
                p.losses.adversarial,
                p.losses.discriminator,
                p.rate
            ));
            bar.set_position(p.iteration as u64);
        },
        &cancel,
    )?;
    if end == TrainEnd::Stopped {
        bar.abandon();
        bail!(
            "stopped at iteration {}; the checkpoint is `{}`: add --resume to continue",
            trainer.iteration,
            shown(&checkpoint).display()
        );
    }
    bar.finish();
    let header = GeneratorHeader {
        architecture: ARCHITECTURE.into(),
        config: settings.generator,
        train_size: args.size,
        from: args
            .from
            .clone()
            .or_else(|| record.as_ref().map(|r| r.settings.from.clone())),
        to: args
            .to
            .clone()
            .or_else(|| record.as_ref().map(|r| r.settings.to.clone())),
        direction: record.as_ref().map(|r| r.settings.direction.clone()),
        model: record.as_ref().map(|r| r.settings.model.clone()),
        pairs: files.train.len(),
        iterations: trainer.iteration,
        scores,
    };
    write_atomically(
        &args.out,
        &file::encode(&trainer.generator_weights(), &header)?,
    )?;
    trainer.save_checkpoint(&checkpoint)?;
    eprintln!(
        "wrote {} ({}, {} iterations in {:.1} s)",
        shown(&args.out).display(),
        header.edit_name(),
        trainer.iteration,
        started.elapsed().as_secs_f64()
    );
    if let Some(s) = scores {
        eprintln!(
            "held-out PSNR {:.2} dB on {} pairs; the unedited inputs score {:.2} dB",
            s.psnr, s.pairs, s.identity_psnr
        );
    }
    Ok(())
}

/// Arguments of `p2pz apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The photo.
    image: PathBuf,
    /// The generator file (from `p2pz distill`).
    #[arg(long)]
    generator: PathBuf,
    /// Where to write the result (PNG, at the photo's own size, with a JSON sidecar).
    #[arg(long)]
    out: PathBuf,
    /// The long side the generator works at (default: the photo's own, up to 1024).
    #[arg(long)]
    size: Option<usize>,
    /// Replace --out (and its sidecar) when they exist.
    #[arg(long)]
    overwrite: bool,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    cpu: bool,
}

/// Runs `p2pz apply`.
pub fn run_apply(args: ApplyArgs) -> Result<()> {
    if pix2pix_zero::export::same_file(&args.out, &args.image) {
        bail!(
            "`{}` is the input image: choose another --out, the source is never overwritten",
            args.out.display()
        );
    }
    let sidecar = args.out.with_extension("json");
    if !args.overwrite {
        if let Some(existing) = [&args.out, &sidecar].into_iter().find(|p| p.exists()) {
            bail!(
                "`{}` exists: pass --overwrite to replace it, or choose another --out",
                shown(existing).display()
            );
        }
    }
    if let Some(size) = args.size {
        if size < STRIDE {
            bail!("--size {size} is too small: use at least {STRIDE}");
        }
    }
    let device = pick_device(args.cpu)?;
    let (generator, header) = file::load(&args.generator, &device)?;
    let (photo, _) = pix2pix_zero::edit::image::load_oriented(&args.image)?;
    let (w, h) = photo.dimensions();
    let side = args.size.or_else(|| {
        let long = w.max(h) as usize;
        (long > MAX_APPLY_SIDE).then_some(MAX_APPLY_SIDE)
    });
    let started = Instant::now();
    let result = generator.edit_photo(&photo, side, &device)?;
    let took = started.elapsed().as_secs_f64();
    let record = serde_json::json!({
        "command": "apply",
        "image": args.image,
        "generator": args.generator,
        "edit": header.edit_name(),
        "generator_header": header,
        "working_long_side": side.unwrap_or(w.max(h) as usize),
    });
    write_result(&args.out, &result, &record)
        .with_context(|| format!("writing the result of {}", header.edit_name()))?;
    eprintln!(
        "{} applied to {w}×{h} in {:.0} ms",
        header.edit_name(),
        took * 1e3
    );
    Ok(())
}
