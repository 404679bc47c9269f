//! The pix2pix-zero method, one stage a file, built on the [`engine`](crate::engine):
//! [`image`] intake, [`inversion`] with [`noise_reg`], edit [`direction`]s from [`sentences`],
//! the reference and guided passes of [`guidance`], and the [`session`] that makes re-edits
//! fast. This module strings them together: a session per image, then edits of it.

pub mod caption;
pub mod direction;
pub mod flan_t5;
pub mod guidance;
pub mod image;
pub mod inversion;
pub mod noise_reg;
pub mod sentences;
pub mod session;
pub mod tensor_file;

use std::sync::atomic::{AtomicBool, Ordering};

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::engine::control::RecordedMap;
use crate::engine::generate::{check_image_size, initial_noise};
use crate::engine::rng::Rng;
use crate::engine::vae::LatentDraw;
use crate::engine::{Error, Result, StableDiffusion};
use guidance::{guided_step, reference_step, GuidanceParams, PassEmbeddings, StepMaps};
use inversion::{invert, InversionParams};
use noise_reg::{RandomShifts, ShiftRange};
use session::{Session, SessionHeader, SessionSource, MAP_DTYPE, SESSION_FORMAT};

/// A key of the model's weights: origin, paths and sizes of the UNet and text-encoder files.
pub fn model_key(model: &StableDiffusion) -> String {
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let files = &model.files;
    let key = format!(
        "{}|{}|{}|{}|{}",
        files.origin,
        files.unet.1.display(),
        size(&files.unet.1),
        files.text_encoder.1.display(),
        size(&files.text_encoder.1)
    );
    format!("{:016x}", direction::fnv1a(key.as_bytes()))
}

/// How a photo becomes the start of its edits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhotoSettings {
    /// How the VAE's posterior becomes a latent (the mean by default).
    pub latent_draw: LatentDraw,
    /// DDIM inversion settings.
    pub inversion: InversionParams,
    /// Seed of the regularization's random shifts.
    pub seed: u64,
}

/// One step of a long editor computation, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EditorProgress {
    /// What runs: "invert", "reference + edit" (first edit) or "edit" (re-edit from the cache).
    pub stage: &'static str,
    /// Steps done, from 1.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
    /// The cross-attention loss of this step, for edit stages.
    pub loss: Option<f64>,
}

/// Inverts a photo (`(1, 3, h, w)` in `[-1, 1]`) under `caption` into a new session.
#[allow(clippy::too_many_arguments)]
pub fn photo_session(
    model: &StableDiffusion,
    image: &Tensor,
    image_hash: u64,
    caption: &str,
    steps: usize,
    settings: &PhotoSettings,
    progress: &mut dyn FnMut(EditorProgress),
    cancel: &AtomicBool,
) -> Result<Session> {
    let (_, _, h, w) = image.dims4()?;
    check_image_size(model, w, h)?;
    if caption.trim().is_empty() {
        return Err(Error::Input(
            "the caption is empty: describe the photo, e.g. --caption \"a cat on a sofa\"".into(),
        ));
    }
    let x0 = model
        .vae
        .encode(&image.to_dtype(model.dtype)?, settings.latent_draw)?;
    let caption_embedding = model.text.embed(&[caption], &model.device, model.dtype)?;
    let range = settings
        .inversion
        .regularization
        .map(|r| r.shift_range)
        .unwrap_or(ShiftRange::FromOne);
    let mut shifts = RandomShifts {
        rng: Rng::new(settings.seed),
        range,
    };
    let start = invert(
        model,
        &x0,
        &caption_embedding,
        &settings.inversion,
        &mut shifts,
        &mut |s| {
            progress(EditorProgress {
                stage: "invert",
                step: s.step,
                total: s.total,
                loss: None,
            })
        },
        cancel,
    )?;
    Ok(Session {
        header: SessionHeader {
            format: SESSION_FORMAT,
            model: model.files.origin.clone(),
            model_key: model_key(model),
            caption: caption.to_string(),
            steps,
            source: SessionSource::Photo {
                image_hash: format!("{image_hash:016x}"),
                working_size: (w, h),
                latent_draw: settings.latent_draw,
                inversion: settings.inversion,
                seed: settings.seed,
            },
        },
        start,
        negative_embedding: caption_embedding.clone(),
        caption_embedding,
        reference: vec![],
        reconstruction: None,
        map_dtype: MAP_DTYPE,
    })
}

/// A session for an image generated from `prompt` and `seed` (no caption, no inversion).
pub fn synthetic_session(
    model: &StableDiffusion,
    prompt: &str,
    seed: u64,
    (width, height): (usize, usize),
    steps: usize,
    guidance_scale: f64,
) -> Result<Session> {
    check_image_size(model, width, height)?;
    let embeddings = model
        .text
        .embed(&["", prompt], &model.device, model.dtype)?;
    Ok(Session {
        header: SessionHeader {
            format: SESSION_FORMAT,
            model: model.files.origin.clone(),
            model_key: model_key(model),
            caption: prompt.to_string(),
            steps,
            source: SessionSource::Synthetic {
                prompt: prompt.to_string(),
                seed,
                size: (width, height),
                guidance_scale,
            },
        },
        start: initial_noise(model, seed, width, height)?,
        negative_embedding: embeddings.narrow(0, 0, 1)?,
        caption_embedding: embeddings.narrow(0, 1, 1)?,
        reference: vec![],
        reconstruction: None,
        map_dtype: MAP_DTYPE,
    })
}

/// The knobs of one edit.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EditSettings {
    /// λ_xa and the CFG scale.
    pub guidance: GuidanceParams,
    /// Multiplier of Δc (the demo's "edit multiplier", 1 by default).
    pub strength: f64,
}

/// What an edit produced.
#[derive(Debug, Clone)]
pub struct EditOutcome {
    /// The edited latent, `(1, 4, h, w)`.
    pub latent: Tensor,
    /// The cross-attention loss at every step.
    pub losses: Vec<f64>,
    /// Whether the reference maps came from the session cache (a re-edit).
    pub reused_reference: bool,
}

/// What one finished timestep of an edit exposes to an [`EditObserver`].
#[derive(Debug)]
pub struct EditStep<'a> {
    /// The step, from 0.
    pub index: usize,
    /// Steps in all.
    pub total: usize,
    /// The DDIM timestep `t`.
    pub timestep: usize,
    /// The reference pass's maps of this step (cached or fresh).
    pub reference: &'a StepMaps,
    /// The edited pass's conditional maps, `(heads, h·w, 77)` by layer, when
    /// [`EditObserver::wants_maps`] asked for them.
    pub edited: Option<&'a BTreeMap<String, RecordedMap>>,
    /// The edited latent after this step, `(1, 4, h, w)`.
    pub latent: &'a Tensor,
    /// The clean latent x̂₀ this step predicts, `(1, 4, h, w)`: a preview of the result.
    pub predicted_x0: &'a Tensor,
}

/// Watches an edit: progress for every step, and optionally each step's maps and latents.
///
/// Any `FnMut(EditorProgress)` is an observer that only wants progress.
pub trait EditObserver {
    /// Called after every step.
    fn progress(&mut self, progress: EditorProgress);

    /// Whether [`EditObserver::step`] wants the edited pass's maps, which costs recording them.
    fn wants_maps(&self) -> bool {
        false
    }

    /// Called after every step, before [`EditObserver::progress`].
    fn step(&mut self, _step: &EditStep<'_>) -> Result<()> {
        Ok(())
    }
}

impl<F: FnMut(EditorProgress)> EditObserver for F {
    fn progress(&mut self, progress: EditorProgress) {
        self(progress)
    }
}

/// Edits the image of `session` along `direction` `(1, 77, d)`.
///
/// The first edit runs the reference pass in lockstep with the edited pass and caches its maps
/// in the session; later edits replay them and run only the edited pass. A cancel stops within
/// one step and leaves the session as it was before the call.
pub fn edit(
    model: &StableDiffusion,
    session: &mut Session,
    direction: &Tensor,
    settings: &EditSettings,
    progress: &mut dyn FnMut(EditorProgress),
    cancel: &AtomicBool,
) -> Result<EditOutcome> {
    edit_observed(
        model,
        session,
        direction,
        settings,
        &mut |p| progress(p),
        cancel,
    )
}

/// [`edit`] with an observer that may also watch each step's maps and predicted image.
pub fn edit_observed(
    model: &StableDiffusion,
    session: &mut Session,
    direction: &Tensor,
    settings: &EditSettings,
    observer: &mut dyn EditObserver,
    cancel: &AtomicBool,
) -> Result<EditOutcome> {
    let steps = session.header.steps;
    if let SessionSource::Synthetic { guidance_scale, .. } = &mut session.header.source {
        // A synthetic image's reference pass uses CFG, so its maps depend on the scale.
        if *guidance_scale != settings.guidance.guidance_scale {
            *guidance_scale = settings.guidance.guidance_scale;
            session.reference.clear();
            session.reconstruction = None;
        }
    }
    let dtype = model.dtype;
    let direction = direction.to_device(&model.device)?.to_dtype(dtype)?;
    let edited = (&session.caption_embedding + (direction * settings.strength)?)?;
    let embeddings = PassEmbeddings {
        negative: session.negative_embedding.clone(),
        caption: session.caption_embedding.clone(),
        edited,
        negative_is_caption: matches!(session.header.source, SessionSource::Photo { .. }),
    };
    let reuse = session.is_complete();
    let mut fresh_maps = vec![];
    let stage = if reuse { "edit" } else { "reference + edit" };
    let timesteps = model.scheduler.timesteps(steps);
    let mut x = session.start.clone();
    let mut x_ref = session.start.clone();
    let mut losses = Vec::with_capacity(steps);
    for (i, &t) in timesteps.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        if !reuse {
            let (eps, maps) = reference_step(
                model,
                &x_ref,
                t,
                &embeddings,
                settings.guidance.guidance_scale,
                session.map_dtype,
            )?;
            x_ref = model.scheduler.step(&eps, t, &x_ref, steps)?;
            fresh_maps.push(maps);
        }
        let maps = if reuse {
            &session.reference[i]
        } else {
            &fresh_maps[i]
        };
        let record = observer.wants_maps().then_some(DType::F32);
        let step = guided_step(
            model,
            &x,
            t,
            steps,
            maps,
            &embeddings,
            &settings.guidance,
            record,
        )?;
        let carried = step.moved.narrow(0, 0, 1)?;
        let predicted_x0 = model.scheduler.predicted_x0(&step.eps, &carried, t)?;
        observer.step(&EditStep {
            index: i,
            total: timesteps.len(),
            timestep: t,
            reference: maps,
            edited: step.edited_maps.as_ref(),
            latent: &step.next,
            predicted_x0: &predicted_x0,
        })?;
        x = step.next;
        losses.push(step.loss);
        observer.progress(EditorProgress {
            stage,
            step: i + 1,
            total: timesteps.len(),
            loss: Some(step.loss),
        });
    }
    if !reuse {
        session.reference = fresh_maps;
        session.reconstruction = Some(x_ref);
    }
    Ok(EditOutcome {
        latent: x,
        losses,
        reused_reference: reuse,
    })
}
