//! The diffusion teacher: one training pair from the pix2pix-zero editor.
//!
//! A synthetic pair is the paper's: the source image is generated from a caption that holds the
//! source word, and the edit starts from the same noise, so the reference pass *is* the source
//! image. A real pair inverts a photo and edits it.

use std::sync::atomic::AtomicBool;

use candle_core::Tensor;
use image::RgbImage;

use super::pairs::{PairRecord, PairSettings};
use crate::edit::guidance::GuidanceParams;
use crate::edit::inversion::InversionParams;
use crate::edit::noise_reg::NoiseRegularization;
use crate::edit::{self, EditSettings, EditorProgress, PhotoSettings};
use crate::engine::ddim::InverseSchedule;
use crate::engine::generate::latent_to_rgb;
use crate::engine::vae::LatentDraw;
use crate::engine::{Error, Result, StableDiffusion};

fn edit_settings(settings: &PairSettings) -> EditSettings {
    EditSettings {
        guidance: GuidanceParams {
            lambda_xa: settings.lambda_xa,
            guidance_scale: settings.guidance_scale,
        },
        strength: settings.strength,
    }
}

/// Generates the source image of `record` from its caption and edits it along `direction`.
pub fn synthetic_pair(
    model: &StableDiffusion,
    record: &PairRecord,
    direction: &Tensor,
    progress: &mut dyn FnMut(EditorProgress),
    cancel: &AtomicBool,
) -> Result<(RgbImage, RgbImage)> {
    let settings = &record.settings;
    let side = settings.size;
    let mut session = edit::synthetic_session(
        model,
        &record.source_caption,
        record.pair_seed,
        (side, side),
        settings.steps,
        settings.guidance_scale,
    )?;
    let outcome = edit::edit(
        model,
        &mut session,
        direction,
        &edit_settings(settings),
        progress,
        cancel,
    )?;
    let source = session
        .reconstruction
        .as_ref()
        .ok_or_else(|| Error::Input("the edit made no reference image".into()))?;
    Ok((
        latent_to_rgb(model, source)?,
        latent_to_rgb(model, &outcome.latent)?,
    ))
}

/// Inverts `photo` (already at working size) under the record's caption and edits it.
pub fn photo_pair(
    model: &StableDiffusion,
    record: &PairRecord,
    photo: &RgbImage,
    photo_hash: u64,
    direction: &Tensor,
    progress: &mut dyn FnMut(EditorProgress),
    cancel: &AtomicBool,
) -> Result<RgbImage> {
    let settings = &record.settings;
    let photo_settings = PhotoSettings {
        latent_draw: LatentDraw::Mean,
        inversion: InversionParams {
            steps: settings.steps,
            schedule: InverseSchedule::Authors,
            regularization: Some(NoiseRegularization::default()),
        },
        seed: record.pair_seed,
    };
    let tensor = crate::edit::image::to_tensor(photo, &model.device)?;
    let mut session = edit::photo_session(
        model,
        &tensor,
        photo_hash,
        &record.source_caption,
        settings.steps,
        &photo_settings,
        progress,
        cancel,
    )?;
    let outcome = edit::edit(
        model,
        &mut session,
        direction,
        &edit_settings(settings),
        progress,
        cancel,
    )?;
    latent_to_rgb(model, &outcome.latent)
}
