//! Noise regularization of the inversion (`shared/docs/pix2pix-zero.md` §B.4): a few gradient
//! steps that push each predicted noise map towards white Gaussian noise, so that the inverted
//! latent stays editable.
//!
//! Both losses are small and their gradients have closed forms, so they are written out here
//! instead of going through autograd:
//! - the auto-correlation loss `Σ_{c,level} mean(n ⊙ roll_H(n, r))² + mean(n ⊙ roll_W(n, r))²`
//!   over a pyramid of 2×2 average-pooled copies of each channel, one random shift `r` per channel
//!   and level, drawn from `1..=S/2−1` (the authors' code since Sept. 2024) or `0..=S/2−1`
//!   (diffusers);
//! - the KL loss `σ² + μ² − 1 − log(σ² + 1e-7)` with the unbiased variance over all elements.

use candle_core::{Result, Tensor};

use crate::engine::rng::Rng;

/// The pyramid stops once a level is this small (8×8 for a 64×64 latent).
const SMALLEST_LEVEL: usize = 8;
/// Added to the variance inside the KL loss's logarithm, as both reference codes do.
const KL_EPS: f64 = 1e-7;

/// Where the auto-correlation shifts are drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShiftRange {
    /// `1..=S/2−1`: a true auto-correlation at every draw (the authors' code, and the paper).
    FromOne,
    /// `0..=S/2−1`: diffusers' pipeline, where a zero shift penalises the variance instead.
    FromZero,
}

/// A source of roll shifts, one per channel and pyramid level, in the order the loss asks.
pub trait ShiftSource {
    /// A shift for a level whose height is `side`.
    fn next_shift(&mut self, side: usize) -> Result<usize>;
}

/// Shifts drawn from a seeded generator.
#[derive(Debug, Clone)]
pub struct RandomShifts {
    /// The generator.
    pub rng: Rng,
    /// The range they are drawn from.
    pub range: ShiftRange,
}

impl ShiftSource for RandomShifts {
    fn next_shift(&mut self, side: usize) -> Result<usize> {
        let high = (side / 2).saturating_sub(1) as i64;
        let low = match self.range {
            ShiftRange::FromOne => 1,
            ShiftRange::FromZero => 0,
        };
        if high < low {
            candle_core::bail!("noise regularization: a {side}-pixel level has no shift to draw")
        }
        Ok(self.rng.int_inclusive(low, high) as usize)
    }
}

/// Shifts replayed from a recording (e.g. the shifts a reference implementation drew).
#[derive(Debug, Clone)]
pub struct ReplayedShifts {
    shifts: std::vec::IntoIter<usize>,
}

impl ReplayedShifts {
    /// Replays `shifts` in order.
    pub fn new(shifts: Vec<usize>) -> Self {
        Self {
            shifts: shifts.into_iter(),
        }
    }
}

impl ReplayedShifts {
    /// Whether every recorded shift has been used.
    pub fn next_shift_is_exhausted(&self) -> bool {
        self.shifts.len() == 0
    }
}

impl ShiftSource for ReplayedShifts {
    fn next_shift(&mut self, _side: usize) -> Result<usize> {
        self.shifts
            .next()
            .ok_or_else(|| candle_core::Error::Msg("the recorded shifts ran out".into()))
    }
}

/// The auto-correlation loss of `noise` `(1, c, h, w)` and its gradient, drawing one shift per
/// channel and level from `shifts`.
pub fn auto_correlation(noise: &Tensor, shifts: &mut dyn ShiftSource) -> Result<(f64, Tensor)> {
    let (b, channels, _, _) = noise.dims4()?;
    if b != 1 {
        candle_core::bail!("noise regularization works on one latent at a time, got a batch of {b}")
    }
    let mut loss = 0.0;
    let mut grads = Vec::with_capacity(channels);
    for c in 0..channels {
        let mut levels = vec![noise.narrow(1, c, 1)?];
        let mut level_grads = vec![];
        loop {
            let level = levels.last().expect("non-empty");
            let (_, _, h, _) = level.dims4()?;
            let shift = shifts.next_shift(h)? as i32;
            let count = level.elem_count() as f64;
            let mut grad = level.zeros_like()?;
            for dim in [2, 3] {
                let forward = level.roll(shift, dim)?;
                let m = (level * &forward)?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?
                    / count;
                loss += m * m;
                // ∂(m²)/∂n = 2m/N · (roll(n, r) + roll(n, −r)).
                let both = (forward + level.roll(-shift, dim)?)?;
                grad = (grad + (both * (2.0 * m / count))?)?;
            }
            level_grads.push(grad);
            if h <= SMALLEST_LEVEL {
                break;
            }
            let next = level.avg_pool2d(2)?;
            levels.push(next);
        }
        // Back down the pyramid: the adjoint of 2×2 average pooling spreads a quarter of each
        // gradient over its four source pixels.
        let mut grad = level_grads.pop().expect("non-empty");
        while let Some(finer) = level_grads.pop() {
            let (_, _, h, w) = finer.dims4()?;
            grad = (finer + (grad.upsample_nearest2d(h, w)? * 0.25)?)?;
        }
        grads.push(grad);
    }
    Ok((loss, Tensor::cat(&grads, 1)?))
}

/// The KL loss of `noise` (any shape) against a standard normal, and its gradient.
pub fn kl_divergence(noise: &Tensor) -> Result<(f64, Tensor)> {
    let n = noise.elem_count() as f64;
    let x = noise.to_dtype(candle_core::DType::F64)?;
    let mean = x.mean_all()?.to_scalar::<f64>()?;
    let centered = (x - mean)?;
    let var = centered.sqr()?.sum_all()?.to_scalar::<f64>()? / (n - 1.0);
    let loss = var + mean * mean - 1.0 - (var + KL_EPS).ln();
    // ∂L/∂x_i = 2(x_i − μ)/(N−1) · (1 − 1/(σ²+ε)) + 2μ/N.
    let grad = ((centered * (2.0 / (n - 1.0) * (1.0 - 1.0 / (var + KL_EPS))))? + 2.0 * mean / n)?;
    Ok((loss, grad.to_dtype(noise.dtype())?))
}

/// The settings of the regularization.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NoiseRegularization {
    /// Step size of the auto-correlation steps (λ_ac, 20).
    pub lambda_ac: f64,
    /// Step size of the KL steps (λ_kl, 20).
    pub lambda_kl: f64,
    /// Outer iterations (5).
    pub reg_steps: usize,
    /// Auto-correlation steps per outer iteration, each with fresh shifts (5).
    pub ac_rolls: usize,
    /// Where the shifts are drawn from.
    pub shift_range: ShiftRange,
}

impl Default for NoiseRegularization {
    /// The paper's settings with the authors' shift range.
    fn default() -> Self {
        Self {
            lambda_ac: 20.0,
            lambda_kl: 20.0,
            reg_steps: 5,
            ac_rolls: 5,
            shift_range: ShiftRange::FromOne,
        }
    }
}

impl NoiseRegularization {
    /// Regularizes a UNet prediction `(1, c, h, w)`.
    ///
    /// The losses are taken on `ε = scale·prediction + offset`, the prediction turned into noise
    /// (`scale = 1`, `offset = 0` for ε-prediction models; diffusers' `get_epsilon` otherwise),
    /// and each gradient step moves the prediction itself, as diffusers does.
    pub fn apply(
        &self,
        prediction: &Tensor,
        to_epsilon: (f64, Option<&Tensor>),
        shifts: &mut dyn ShiftSource,
    ) -> Result<Tensor> {
        let (scale, offset) = to_epsilon;
        let epsilon = |p: &Tensor| -> Result<Tensor> {
            let e = (p * scale)?;
            match offset {
                Some(o) => e + o,
                None => Ok(e),
            }
        };
        let mut p = prediction.clone();
        for _ in 0..self.reg_steps {
            if self.lambda_ac > 0.0 {
                for _ in 0..self.ac_rolls {
                    let (_, grad) = auto_correlation(&epsilon(&p)?, shifts)?;
                    p = (p - (grad * (self.lambda_ac * scale / self.ac_rolls as f64))?)?;
                }
            }
            if self.lambda_kl > 0.0 {
                let (_, grad) = kl_divergence(&epsilon(&p)?)?;
                p = (p - (grad * (self.lambda_kl * scale))?)?;
            }
        }
        Ok(p)
    }
}
