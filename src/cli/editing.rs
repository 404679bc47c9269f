//! `p2pz direction`, `p2pz invert` and `p2pz edit`: the pix2pix-zero stages from the shell.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::{Args, ValueEnum};
use pix2pix_zero::edit::caption::{Captioner, DEFAULT_CAPTIONER};
use pix2pix_zero::edit::direction::{self, EmbeddingCache, SentenceSource};
use pix2pix_zero::edit::flan_t5::SentenceWriter;
use pix2pix_zero::edit::guidance::GuidanceParams;
use pix2pix_zero::edit::image as photo;
use pix2pix_zero::edit::inversion::InversionParams;
use pix2pix_zero::edit::noise_reg::{NoiseRegularization, ShiftRange};
use pix2pix_zero::edit::sentences::{self, DEFAULT_SENTENCES};
use pix2pix_zero::edit::session::{Session, SessionSource};
use pix2pix_zero::edit::{self, EditSettings, EditorProgress, PhotoSettings};
use pix2pix_zero::engine::ddim::InverseSchedule;
use pix2pix_zero::engine::generate::latent_to_rgb;
use pix2pix_zero::engine::source::ResolveOptions;
use pix2pix_zero::engine::vae::LatentDraw;
use pix2pix_zero::engine::{StableDiffusion, TextSide};
use pix2pix_zero::export::{save_png, write_atomically};

use super::{shown, step_bar, DownloadBar, ModelArgs};

/// The authors' λ_xa for real photos (`edit_real.py`).
pub(super) const XA_REAL: f64 = 0.1;
/// The authors' λ_xa for synthetic images (`edit_synthetic.py`).
pub(super) const XA_SYNTHETIC: f64 = 0.15;

/// Where the source and target sentences come from.
#[derive(Debug, Clone, Args)]
pub struct WordArgs {
    /// The word in the image (e.g. cat).
    #[arg(long = "from")]
    pub from: Option<String>,
    /// The word it should become (e.g. dog).
    #[arg(long = "to")]
    pub to: Option<String>,
    /// A file of sentences about the source word, one per line (default: built-in generator).
    #[arg(long)]
    pub source_sentences: Option<PathBuf>,
    /// A file of sentences about the target word, one per line (default: built-in generator).
    #[arg(long)]
    pub target_sentences: Option<PathBuf>,
    /// Sentences to write per word (built-in generator or --sentence-model).
    #[arg(long, default_value_t = DEFAULT_SENTENCES)]
    pub sentences: usize,
    /// A local Flan-T5 (folder or repo id, e.g. google/flan-t5-base) that writes the sentences
    /// instead of the built-in generator, as the authors' demo did.
    #[arg(long)]
    pub sentence_model: Option<String>,
}

impl WordArgs {
    /// Δc for `--from`/`--to`, from the embedding cache or computed.
    fn direction<'a>(&self, model: impl Into<TextSide<'a>>, seed: u64) -> Result<Tensor> {
        let model = model.into();
        let (Some(from), Some(to)) = (&self.from, &self.to) else {
            bail!("give --from and --to (the word in the image and the word it should become), or --direction FILE");
        };
        let (from, to) = (sentences::check_word(from)?, sentences::check_word(to)?);
        if from.eq_ignore_ascii_case(to) {
            bail!("--from and --to are both `{from}`: an edit needs two different words");
        }
        let writer = match &self.sentence_model {
            Some(spec) => Some(SentenceWriter::locate(
                spec,
                &ResolveOptions::from_env(),
                &mut DownloadBar::default(),
            )?),
            None => None,
        };
        let source = |file: &Option<PathBuf>| match (file, &writer) {
            (Some(path), _) => SentenceSource::File(path.clone()),
            (None, Some(dir)) => SentenceSource::Model {
                dir: dir.clone(),
                count: self.sentences,
                seed,
            },
            (None, None) => SentenceSource::Generated {
                count: self.sentences,
                seed,
            },
        };
        let cache = EmbeddingCache::default_location();
        let embed = |word: &str, src: SentenceSource| -> Result<Tensor> {
            let list = src.sentences(word)?;
            eprintln!("embedding {} sentences about `{word}`", list.len());
            Ok(cache.mean_embedding(model, word, &list)?)
        };
        let source_mean = embed(from, source(&self.source_sentences))?;
        let target_mean = embed(to, source(&self.target_sentences))?;
        Ok(direction::direction(&source_mean, &target_mean)?)
    }
}

/// `--inverse-schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    /// The authors' N−2-step inverse schedule (the default).
    Authors,
    /// diffusers' exact reverse of the forward schedule.
    Exact,
}

/// `--shift-range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShiftArg {
    /// Shifts from 1 (the authors' code and the paper).
    One,
    /// Shifts from 0 (diffusers).
    Zero,
}

/// How a photo is inverted.
#[derive(Debug, Clone, Args)]
pub struct InvertArgs {
    /// The caption: the text that conditions inversion and reconstruction (default: BLIP's).
    #[arg(long)]
    pub caption: Option<String>,
    /// The BLIP captioner used when no --caption is given: a folder or a repo id.
    #[arg(long, default_value = DEFAULT_CAPTIONER)]
    pub captioner: String,
    /// Working size of the long side, a multiple of 64 (smaller sizes make CPU runs practical).
    #[arg(long, default_value_t = photo::DEFAULT_WORKING_SIZE)]
    pub size: usize,
    /// DDIM steps of inversion and editing.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Seed of the regularization's random shifts (and of --vae-sample).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Auto-correlation step size λ_ac (0 turns it off).
    #[arg(long, default_value_t = 20.0)]
    pub lambda_ac: f64,
    /// KL step size λ_kl (0 turns it off).
    #[arg(long, default_value_t = 20.0)]
    pub lambda_kl: f64,
    /// Regularization iterations per inversion step.
    #[arg(long, default_value_t = 5)]
    pub reg_steps: usize,
    /// Auto-correlation steps per iteration.
    #[arg(long, default_value_t = 5)]
    pub ac_rolls: usize,
    /// Where the auto-correlation shifts start.
    #[arg(long, value_enum, default_value_t = ShiftArg::One)]
    pub shift_range: ShiftArg,
    /// Inverse DDIM schedule.
    #[arg(long, value_enum, default_value_t = ScheduleArg::Authors)]
    pub inverse_schedule: ScheduleArg,
    /// Sample the VAE posterior (seeded) instead of taking its mean.
    #[arg(long)]
    pub vae_sample: bool,
}

impl InvertArgs {
    fn settings(&self) -> PhotoSettings {
        let regularization = NoiseRegularization {
            lambda_ac: self.lambda_ac,
            lambda_kl: self.lambda_kl,
            reg_steps: self.reg_steps,
            ac_rolls: self.ac_rolls,
            shift_range: match self.shift_range {
                ShiftArg::One => ShiftRange::FromOne,
                ShiftArg::Zero => ShiftRange::FromZero,
            },
        };
        let off = self.reg_steps == 0 || (self.lambda_ac == 0.0 && self.lambda_kl == 0.0);
        PhotoSettings {
            latent_draw: if self.vae_sample {
                LatentDraw::Sample(self.seed)
            } else {
                LatentDraw::Mean
            },
            inversion: InversionParams {
                steps: self.steps,
                schedule: match self.inverse_schedule {
                    ScheduleArg::Authors => InverseSchedule::Authors,
                    ScheduleArg::Exact => InverseSchedule::Exact,
                },
                regularization: (!off).then_some(regularization),
            },
            seed: self.seed,
        }
    }
}

/// Stops a computation cleanly on Ctrl-C: the first press asks it to stop within one step.
pub(super) fn cancel_on_ctrl_c() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // Only one handler per process; a second registration (tests calling run twice) is harmless.
    let _ = ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: stopping after this step");
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    cancel
}

/// A progress reporter that draws one bar per stage.
fn reporter() -> impl FnMut(EditorProgress) {
    let mut bar: Option<(&'static str, indicatif::ProgressBar)> = None;
    move |p: EditorProgress| {
        if bar.as_ref().is_none_or(|(stage, _)| *stage != p.stage) {
            if let Some((_, old)) = bar.take() {
                old.finish();
            }
            bar = Some((p.stage, step_bar(p.total, p.stage)));
        }
        if let Some((_, b)) = &bar {
            b.set_position(p.step as u64);
            if let Some(loss) = p.loss {
                b.set_message(format!("{} (loss {loss:.4})", p.stage));
            }
            if p.step == p.total {
                b.finish();
            }
        }
    }
}

/// Refuses to write over the input image.
fn check_output(out: &Path, input: Option<&Path>) -> Result<()> {
    if let Some(input) = input {
        let same = pix2pix_zero::export::same_file(out, input);
        if same {
            bail!(
                "`{}` is the input image: choose another --out, the source is never overwritten",
                out.display()
            );
        }
    }
    Ok(())
}

/// Loads a photo, reuses a matching session or inverts it, and returns the session.
fn photo_session(
    model: &StableDiffusion,
    image_path: &Path,
    args: &InvertArgs,
    session_path: Option<&Path>,
    cancel: &AtomicBool,
) -> Result<(Session, photo::WorkingImage, bool)> {
    let image = photo::load(image_path, args.size)?;
    let caption = match &args.caption {
        Some(caption) => caption.clone(),
        None => {
            let caption = blip_caption(&args.captioner, &image.pixels, &model.device)?;
            eprintln!("caption: \"{caption}\" (BLIP; pass --caption to change it)");
            caption
        }
    };
    let settings = args.settings();
    let (w, h) = image.pixels.dimensions();
    let expected = pix2pix_zero::edit::session::SessionHeader {
        format: pix2pix_zero::edit::session::SESSION_FORMAT,
        model: model.files.origin.clone(),
        model_key: edit::model_key(model),
        caption: caption.clone(),
        steps: args.steps,
        source: SessionSource::Photo {
            image_hash: format!("{:016x}", image.hash),
            working_size: (w as usize, h as usize),
            latent_draw: settings.latent_draw,
            inversion: settings.inversion,
            seed: settings.seed,
        },
    };
    if let Some(path) = session_path.filter(|p| p.exists()) {
        let session = Session::load(path, &model.device)?;
        session.check_matches(&expected, path)?;
        eprintln!(
            "reusing session {} (inversion skipped)",
            shown(path).display()
        );
        return Ok((session, image, true));
    }
    let tensor = photo::to_tensor(&image.pixels, &model.device)?;
    let session = edit::photo_session(
        model,
        &tensor,
        image.hash,
        &caption,
        args.steps,
        &settings,
        &mut reporter(),
        cancel,
    )?;
    Ok((session, image, false))
}

/// Captions a photo with BLIP, explaining how to do without it when it is not available.
fn blip_caption(
    captioner: &str,
    image: &image::RgbImage,
    device: &candle_core::Device,
) -> Result<String> {
    Ok(load_captioner(captioner, device)?.caption(image)?)
}

/// Finds and loads the BLIP captioner, explaining how to do without it when it is not available.
pub(super) fn load_captioner(captioner: &str, device: &candle_core::Device) -> Result<Captioner> {
    let options = ResolveOptions::from_env();
    let dir = Captioner::locate(captioner, &options, &mut DownloadBar::default()).with_context(|| {
        format!("no caption was given and the captioner `{captioner}` is not available; pass --caption \"...\" (--captions FILE for pairs) or --captioner FOLDER")
    })?;
    Ok(Captioner::load(&dir, device)?)
}

/// Arguments of `p2pz caption`.
#[derive(Debug, Args)]
pub struct CaptionCommand {
    /// The photo.
    image: PathBuf,
    /// The BLIP captioner: a folder or a repo id.
    #[arg(long, default_value = DEFAULT_CAPTIONER)]
    captioner: String,
    /// Working size of the long side (BLIP sees the photo as the editor does).
    #[arg(long, default_value_t = photo::DEFAULT_WORKING_SIZE)]
    size: usize,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    cpu: bool,
}

/// Runs `p2pz caption`: prints the caption on standard output.
pub fn run_caption(args: CaptionCommand) -> Result<()> {
    let image = photo::load(&args.image, args.size)?;
    let caption = blip_caption(
        &args.captioner,
        &image.pixels,
        &super::pick_device(args.cpu)?,
    )?;
    println!("{caption}");
    Ok(())
}

/// Writes an image PNG plus a JSON sidecar with the parameters.
pub(super) fn write_result(
    path: &Path,
    image: &image::RgbImage,
    record: &serde_json::Value,
) -> Result<()> {
    save_png(path, image, &[("p2pz", record.to_string())])
        .with_context(|| format!("writing {}", shown(path).display()))?;
    let sidecar = path.with_extension("json");
    write_atomically(&sidecar, serde_json::to_string_pretty(record)?.as_bytes())?;
    eprintln!(
        "wrote {} (+ {})",
        shown(path).display(),
        sidecar.file_name().unwrap_or_default().to_string_lossy()
    );
    Ok(())
}

/// Arguments of `p2pz direction`.
#[derive(Debug, Args)]
pub struct DirectionArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    words: WordArgs,
    /// Seed of the built-in sentence generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the direction (.safetensors).
    #[arg(long)]
    out: PathBuf,
}

/// Runs `p2pz direction`.
pub fn run_direction(args: DirectionArgs) -> Result<()> {
    // Only the text encoder: the UNet and VAE would take nine tenths of the memory for nothing.
    let model = args.model.load_text()?;
    let delta = args.words.direction(&model, args.seed)?;
    direction::save_direction(&args.out, &delta)?;
    eprintln!("wrote {}", shown(&args.out).display());
    Ok(())
}

/// Arguments of `p2pz invert`.
#[derive(Debug, Args)]
pub struct InvertCommand {
    #[command(flatten)]
    model: ModelArgs,
    /// The photo.
    image: PathBuf,
    #[command(flatten)]
    invert: InvertArgs,
    /// Where to write the session (inverted latent and settings).
    #[arg(long)]
    session: PathBuf,
}

/// Runs `p2pz invert`.
pub fn run_invert(args: InvertCommand) -> Result<()> {
    let model = args.model.load()?;
    let cancel = cancel_on_ctrl_c();
    let (session, _, _) = photo_session(&model, &args.image, &args.invert, None, &cancel)?;
    session.save(&args.session)?;
    eprintln!("wrote {}", shown(&args.session).display());
    Ok(())
}

/// Arguments of `p2pz edit`.
#[derive(Debug, Args)]
pub struct EditCommand {
    #[command(flatten)]
    model: ModelArgs,
    /// The photo to edit (or give --prompt for a synthetic image).
    image: Option<PathBuf>,
    /// Edit an image generated from this prompt instead of a photo.
    #[arg(long, conflicts_with = "image")]
    prompt: Option<String>,
    #[command(flatten)]
    words: WordArgs,
    /// A precomputed direction (.safetensors, or the authors' .pt); then --from/--to are optional.
    #[arg(long)]
    direction: Option<PathBuf>,
    #[command(flatten)]
    invert: InvertArgs,
    /// CFG scale of the edited pass (the caption is the negative prompt).
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// Cross-attention guidance step λ_xa (default 0.1 for photos, 0.15 for synthetic images).
    #[arg(long)]
    xa: Option<f64>,
    /// Multiplier of the edit direction.
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
    /// A session file: reused when it matches (inversion and reference pass skipped), written after.
    #[arg(long)]
    session: Option<PathBuf>,
    /// Where to write the edited image (PNG, at the photo's own size).
    #[arg(long)]
    out: PathBuf,
    /// Also write the reconstruction (the reference pass: the inversion quality check).
    #[arg(long)]
    reconstruction: Option<PathBuf>,
}

/// Runs `p2pz edit`.
pub fn run_edit(args: EditCommand) -> Result<()> {
    check_output(&args.out, args.image.as_deref())?;
    if let Some(r) = &args.reconstruction {
        check_output(r, args.image.as_deref())?;
    }
    let model = args.model.load()?;
    let cancel = cancel_on_ctrl_c();
    let delta = match &args.direction {
        Some(path) => direction::load_direction(path, &model)?,
        None => args.words.direction(&model, args.invert.seed)?,
    };
    let (mut session, original_size, reused) = match (&args.image, &args.prompt) {
        (Some(image), None) => {
            let (session, image, reused) = photo_session(
                &model,
                image,
                &args.invert,
                args.session.as_deref(),
                &cancel,
            )?;
            (session, Some(image.original_size), reused)
        }
        (None, Some(prompt)) => {
            let side = args.invert.size;
            let session = edit::synthetic_session(
                &model,
                prompt,
                args.invert.seed,
                (side, side),
                args.invert.steps,
                args.guidance,
            )?;
            (session, None, false)
        }
        _ => bail!("give a photo to edit, or --prompt for a synthetic image"),
    };
    let lambda_xa = args.xa.unwrap_or(if args.prompt.is_some() {
        XA_SYNTHETIC
    } else {
        XA_REAL
    });
    let settings = EditSettings {
        guidance: GuidanceParams {
            lambda_xa,
            guidance_scale: args.guidance,
        },
        strength: args.strength,
    };
    let outcome = edit::edit(
        &model,
        &mut session,
        &delta,
        &settings,
        &mut reporter(),
        &cancel,
    )?;
    if outcome.reused_reference {
        eprintln!("reference maps came from the session cache");
    }
    let record = serde_json::json!({
        "command": "edit",
        "model": model.files.origin,
        "image": args.image,
        "prompt": args.prompt,
        "from": args.words.from,
        "to": args.words.to,
        "direction": args.direction,
        "caption": session.header.caption,
        "steps": session.header.steps,
        "source": session.header.source,
        "edit": settings,
        "session_reused": reused,
    });
    let to_output = |latent: &Tensor| -> Result<image::RgbImage> {
        let rgb = latent_to_rgb(&model, latent)?;
        Ok(match original_size {
            Some(size) => photo::to_original_size(&rgb, size),
            None => rgb,
        })
    };
    write_result(&args.out, &to_output(&outcome.latent)?, &record)?;
    if let (Some(path), Some(latent)) = (&args.reconstruction, &session.reconstruction) {
        write_result(path, &to_output(latent)?, &record)?;
    }
    if let Some(path) = &args.session {
        session.save(path)?;
        eprintln!(
            "session {} ({:.1} MB)",
            shown(path).display(),
            session.bytes() as f64 / 1e6
        );
    }
    Ok(())
}
