//! DDIM inversion with noise regularization (`shared/docs/pix2pix-zero.md` §B.3–B.4): the
//! clean latent of the photo is walked up the noise schedule with the caption as the only
//! condition (no CFG), each predicted noise map regularized towards white noise first.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;

use super::noise_reg::{NoiseRegularization, ShiftSource};
use crate::engine::config::PredictionType;
use crate::engine::ddim::InverseSchedule;
use crate::engine::{Error, Result, StableDiffusion};

/// How to invert.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InversionParams {
    /// DDIM steps (the same count the edit uses).
    pub steps: usize,
    /// The authors' N−2-step schedule or diffusers' exact reverse.
    pub schedule: InverseSchedule,
    /// The noise regularization; `None` inverts plainly.
    pub regularization: Option<NoiseRegularization>,
}

/// What one inversion step produced, for progress reports and tests.
#[derive(Debug)]
pub struct InversionStep<'a> {
    /// Steps done, from 1.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
    /// The timestep the UNet was evaluated at.
    pub timestep: usize,
    /// The prediction after regularization, `(1, 4, h, w)`.
    pub prediction: &'a Tensor,
    /// The latent after the step.
    pub latent: &'a Tensor,
}

/// Inverts the scaled clean latent `x0` `(1, 4, h, w)` under `caption` `(1, 77, d)`.
///
/// `shifts` supplies the auto-correlation shifts; `observe` sees every step; `cancel` stops the
/// inversion within one step with [`Error::Cancelled`].
pub fn invert(
    model: &StableDiffusion,
    x0: &Tensor,
    caption: &Tensor,
    params: &InversionParams,
    shifts: &mut dyn ShiftSource,
    observe: &mut dyn FnMut(InversionStep<'_>),
    cancel: &AtomicBool,
) -> Result<Tensor> {
    let scheduler = &model.scheduler;
    let plan = scheduler.inversion_plan(params.steps, params.schedule);
    let prediction_type = scheduler.config().prediction_type;
    let mut x = x0.clone();
    for (i, step) in plan.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let mut prediction = model.unet.forward(&x, step.unet_t as f64, caption, None)?;
        if let Some(regularization) = &params.regularization {
            // diffusers' `get_epsilon`: the prediction as noise, an affine map of it, at ᾱ of
            // the UNet's timestep.
            let alpha = scheduler.alphas_cumprod()[step.unet_t] as f64;
            let (scale, offset) = match prediction_type {
                PredictionType::Epsilon => (1.0, None),
                PredictionType::VPrediction => (alpha.sqrt(), Some((&x * (1.0 - alpha).sqrt())?)),
                PredictionType::Sample => {
                    let s = (1.0 - alpha).sqrt();
                    (-alpha.sqrt() / s, Some((&x / s)?))
                }
            };
            prediction = regularization.apply(&prediction, (scale, offset.as_ref()), shifts)?;
        }
        x = scheduler.inverse_step(&prediction, step, &x)?;
        observe(InversionStep {
            step: i + 1,
            total: plan.len(),
            timestep: step.unet_t,
            prediction: &prediction,
            latent: &x,
        });
    }
    Ok(x)
}
