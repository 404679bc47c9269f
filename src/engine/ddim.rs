//! DDIM, forward (denoising) and inverse (noising), with η = 0: pure math on noise levels.
//!
//! The noise schedule is computed in f32 exactly as diffusers does, so ᾱ matches its table. Two
//! inverse schedules are offered: the authors' (N−2 UNet evaluations, ᾱ[t−1] → ᾱ[t−1+Δ], the
//! pix2pix-zero default) and diffusers' exact time-reverse of the forward schedule (N steps). See
//! `shared/docs/pix2pix-zero.md` §B.3.

use candle_core::{Result, Tensor};

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};

/// Which inverse schedule DDIM inversion walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InverseSchedule {
    /// The pix2pix-zero authors' loop: `timesteps.flip(0)[1:-1]`, N−2 UNet evaluations.
    #[default]
    Authors,
    /// diffusers' `DDIMInverseScheduler`: the exact reverse of the forward schedule, N steps.
    Exact,
}

/// One step of an inversion: where the UNet is evaluated and which noise levels it moves between.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InverseStep {
    /// The timestep the UNet is evaluated at.
    pub unet_t: usize,
    /// ᾱ of the current latent.
    pub alpha_from: f64,
    /// ᾱ of the latent after the step.
    pub alpha_to: f64,
}

/// A DDIM scheduler built from a model's `scheduler_config.json`.
#[derive(Debug, Clone)]
pub struct Ddim {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
}

/// `torch.linspace(start, end, n)` in f32, computed the way torch does (from both ends).
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// β for the squared-cosine schedule (`betas_for_alpha_bar` in diffusers), capped at 0.999.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

impl Ddim {
    /// Builds the ᾱ table from the config.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n == 0 {
            candle_core::bail!("scheduler config: num_train_timesteps is 0")
        }
        let betas: Vec<f32> = match (&config.trained_betas, config.beta_schedule) {
            (Some(betas), _) if betas.len() == n => betas.iter().map(|b| *b as f32).collect(),
            (Some(betas), _) => candle_core::bail!(
                "scheduler config: {} trained_betas for {n} timesteps",
                betas.len()
            ),
            (None, BetaSchedule::Linear) => {
                linspace_f32(config.beta_start as f32, config.beta_end as f32, n)
            }
            (None, BetaSchedule::ScaledLinear) => linspace_f32(
                (config.beta_start as f32).sqrt(),
                (config.beta_end as f32).sqrt(),
                n,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            (None, BetaSchedule::SquaredCosCapV2) => cosine_betas(n),
        };
        let mut product = 1f32;
        let alphas_cumprod = betas
            .iter()
            .map(|beta| {
                product *= 1.0 - beta;
                product
            })
            .collect();
        Ok(Self {
            config,
            alphas_cumprod,
        })
    }

    /// The scheduler config this was built from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// ᾱ_t for t in `0..num_train_timesteps`.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// ᾱ at timestep `t`, or the value before the first timestep when `t` is negative.
    fn alpha_at(&self, t: i64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[t as usize] as f64
        } else if self.config.set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0] as f64
        }
    }

    /// Timesteps between two inference steps: `T / N`, integer division as in diffusers.
    pub fn step_ratio(&self, steps: usize) -> usize {
        self.config.num_train_timesteps / steps.max(1)
    }

    /// The `steps` inference timesteps of the forward pass, from noisiest to cleanest
    /// (981, 961, …, 1 for SD's config and 50 steps).
    pub fn timesteps(&self, steps: usize) -> Vec<usize> {
        let train = self.config.num_train_timesteps;
        let steps = steps.clamp(1, train);
        let mut ts: Vec<i64> = match self.config.timestep_spacing {
            TimestepSpacing::Leading => {
                let ratio = (train / steps) as i64;
                (0..steps as i64)
                    .rev()
                    .map(|k| k * ratio + self.config.steps_offset as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / steps as f64;
                (0..steps)
                    .map(|k| (train as f64 - k as f64 * ratio).round() as i64 - 1)
                    .collect()
            }
            TimestepSpacing::Linspace => {
                let last = (train - 1) as f64;
                (0..steps)
                    .rev()
                    .map(|k| {
                        let v = if steps == 1 {
                            0.0
                        } else {
                            last * k as f64 / (steps - 1) as f64
                        };
                        v.round() as i64
                    })
                    .collect()
            }
        };
        for t in ts.iter_mut() {
            *t = (*t).clamp(0, train as i64 - 1);
        }
        ts.into_iter().map(|t| t as usize).collect()
    }

    /// One DDIM step (η = 0) from timestep `t` to the next one of a `steps`-step schedule.
    ///
    /// `model_output` is what the UNet predicted at `t` (ε, v or x₀ as the config says); `x` is
    /// the latent at `t`. Returns the latent at `t − T/N`.
    pub fn step(
        &self,
        model_output: &Tensor,
        t: usize,
        x: &Tensor,
        steps: usize,
    ) -> Result<Tensor> {
        let prev = t as i64 - self.step_ratio(steps) as i64;
        self.move_between(
            model_output,
            x,
            self.alpha_at(t as i64),
            self.alpha_at(prev),
        )
    }

    /// The steps of a DDIM inversion with `steps` inference steps, in order.
    pub fn inversion_plan(&self, steps: usize, schedule: InverseSchedule) -> Vec<InverseStep> {
        let ratio = self.step_ratio(steps) as i64;
        let forward = self.timesteps(steps);
        match schedule {
            InverseSchedule::Authors => {
                // `timesteps.flip(0)[1:-1]`: ascending, without the first and last timestep.
                let ascending: Vec<usize> = forward.iter().rev().copied().collect();
                if ascending.len() < 3 {
                    return vec![];
                }
                ascending[1..ascending.len() - 1]
                    .iter()
                    .map(|&t| InverseStep {
                        unet_t: t,
                        alpha_from: self.alpha_at(t as i64 - 1),
                        alpha_to: self.alpha_at(t as i64 - 1 + ratio),
                    })
                    .collect()
            }
            InverseSchedule::Exact => forward
                .iter()
                .rev()
                .map(|&t| {
                    let from = (t as i64 - ratio).min(self.config.num_train_timesteps as i64 - 1);
                    InverseStep {
                        unet_t: t,
                        alpha_from: self.alpha_at(from),
                        alpha_to: self.alpha_at(t as i64),
                    }
                })
                .collect(),
        }
    }

    /// One inverse DDIM step: moves `x` from `step.alpha_from` to `step.alpha_to` along the
    /// UNet's prediction `model_output` made at `step.unet_t`.
    pub fn inverse_step(
        &self,
        model_output: &Tensor,
        step: &InverseStep,
        x: &Tensor,
    ) -> Result<Tensor> {
        self.move_between(model_output, x, step.alpha_from, step.alpha_to)
    }

    /// The UNet's prediction at noise level `alpha` turned into ε (diffusers' `get_epsilon`).
    pub fn epsilon(&self, model_output: &Tensor, x: &Tensor, alpha: f64) -> Result<Tensor> {
        Ok(self.split_prediction(model_output, x, alpha)?.1)
    }

    /// The clean latent x̂₀ that the UNet's prediction `model_output` at timestep `t` implies
    /// for `x`: what the image would be if denoising stopped here (the editor's previews).
    pub fn predicted_x0(&self, model_output: &Tensor, x: &Tensor, t: usize) -> Result<Tensor> {
        Ok(self
            .split_prediction(model_output, x, self.alpha_at(t as i64))?
            .0)
    }

    /// `(x̂₀, ε)` from the UNet's prediction at noise level `alpha`.
    fn split_prediction(&self, out: &Tensor, x: &Tensor, alpha: f64) -> Result<(Tensor, Tensor)> {
        let (sa, s1a) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let (x0, eps) = match self.config.prediction_type {
            PredictionType::Epsilon => (((x - (out * s1a)?)? / sa)?, out.clone()),
            PredictionType::Sample => (out.clone(), ((x - (out * sa)?)? / s1a)?),
            PredictionType::VPrediction => {
                (((x * sa)? - (out * s1a)?)?, ((out * sa)? + (x * s1a)?)?)
            }
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        Ok((x0, eps))
    }

    /// `√ᾱ_to·x̂₀ + √(1−ᾱ_to)·ε`: the deterministic DDIM move between two noise levels.
    fn move_between(
        &self,
        out: &Tensor,
        x: &Tensor,
        alpha_from: f64,
        alpha_to: f64,
    ) -> Result<Tensor> {
        let (x0, eps) = self.split_prediction(out, x, alpha_from)?;
        (x0 * alpha_to.sqrt())? + (eps * (1.0 - alpha_to).sqrt())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn sd_config() -> SchedulerConfig {
        serde_json::from_value(serde_json::json!({
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "steps_offset": 1,
            "clip_sample": false
        }))
        .unwrap()
    }

    #[test]
    fn sd_timesteps_are_leading_with_offset() {
        let ddim = Ddim::new(sd_config()).unwrap();
        let ts = ddim.timesteps(50);
        assert_eq!(ts.len(), 50);
        assert_eq!((ts[0], ts[1], ts[49]), (981, 961, 1));
    }

    #[test]
    fn authors_inversion_skips_first_and_last() {
        let ddim = Ddim::new(sd_config()).unwrap();
        let plan = ddim.inversion_plan(50, InverseSchedule::Authors);
        assert_eq!(plan.len(), 48);
        assert_eq!((plan[0].unet_t, plan[47].unet_t), (21, 961));
        let ac = ddim.alphas_cumprod();
        assert_eq!(plan[0].alpha_from, ac[20] as f64);
        assert_eq!(plan[47].alpha_to, ac[980] as f64);
        let exact = ddim.inversion_plan(50, InverseSchedule::Exact);
        assert_eq!(exact.len(), 50);
        assert_eq!(exact[0].alpha_from, ac[0] as f64);
        assert_eq!(exact[49].alpha_to, ac[981] as f64);
    }

    #[test]
    fn v_prediction_steps_like_the_equivalent_epsilon() {
        let eps_ddim = Ddim::new(sd_config()).unwrap();
        let mut v_config = sd_config();
        v_config.prediction_type = PredictionType::VPrediction;
        let v_ddim = Ddim::new(v_config).unwrap();
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.4f32, -0.8, 1.5], &dev).unwrap();
        let eps = Tensor::new(&[-1.1f32, 0.3, 0.2], &dev).unwrap();
        let a = eps_ddim.alphas_cumprod()[601] as f64;
        let x = ((&x0 * a.sqrt()).unwrap() + (&eps * (1.0 - a).sqrt()).unwrap()).unwrap();
        let v = ((&eps * a.sqrt()).unwrap() - (&x0 * (1.0 - a).sqrt()).unwrap()).unwrap();
        let by_eps = eps_ddim.step(&eps, 601, &x, 50).unwrap();
        let by_v = v_ddim.step(&v, 601, &x, 50).unwrap();
        let err = max_abs_diff(&by_eps, &by_v);
        assert!(err < 1e-5, "{err}");
        let back = v_ddim.epsilon(&v, &x, a).unwrap();
        let err = max_abs_diff(&back, &eps);
        assert!(err < 1e-5, "{err}");
    }

    #[test]
    fn inverse_step_undoes_forward_step_for_a_fixed_prediction() {
        let ddim = Ddim::new(sd_config()).unwrap();
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.3f32, -1.2, 0.7], &dev).unwrap();
        let eps = Tensor::new(&[0.5f32, 0.1, -0.9], &dev).unwrap();
        let down = ddim.step(&eps, 481, &x, 50).unwrap();
        let step = InverseStep {
            unet_t: 481,
            alpha_from: ddim.alphas_cumprod()[461] as f64,
            alpha_to: ddim.alphas_cumprod()[481] as f64,
        };
        let back = ddim.inverse_step(&eps, &step, &down).unwrap();
        let err = max_abs_diff(&back, &x);
        assert!(err < 1e-5, "{err}");
    }
}
