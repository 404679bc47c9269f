//! Training the generator on a pairs folder: the data, one optimisation step of the generator and
//! its critic, held-out scores, and checkpoints that a run resumes from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use image::{imageops::FilterType, RgbImage};
use serde::{Deserialize, Serialize};

use super::discriminator::Discriminator;
use super::file::HeldOutScores;
use super::generator::{psnr, Generator, GeneratorConfig, STRIDE};
use super::losses::{discriminator_hinge, generator_hinge, l1, Perceptual};
use super::params::{sorted, SeededParams};
use crate::edit::tensor_file;
use crate::engine::rng::Rng;
use crate::engine::{Error, Result};

/// Held-out pairs scored at most (the rest are not needed for a stable PSNR).
const MAX_SCORED: usize = 64;
/// The metadata key of a checkpoint's state.
const CHECKPOINT_KEY: &str = "p2pz-checkpoint";

/// How much each loss counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossWeights {
    /// L1 to the teacher's image.
    pub l1: f64,
    /// The VAE-feature perceptual distance (0 without a VAE).
    pub perceptual: f64,
    /// The hinge adversarial loss (0 trains no critic).
    pub adversarial: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            l1: 1.0,
            perceptual: 0.2,
            adversarial: 0.02,
        }
    }
}

/// The settings of a training run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Side of the square training crops, a multiple of the generator's stride.
    pub size: usize,
    /// Iterations in all.
    pub iterations: usize,
    /// Pairs per iteration.
    pub batch: usize,
    /// AdamW's learning rate, for both networks.
    pub learning_rate: f64,
    /// The losses' weights.
    pub weights: LossWeights,
    /// The generator's size.
    pub generator: GeneratorConfig,
    /// The critic's first-layer channels.
    pub discriminator_width: usize,
    /// Seed of the initial weights, the batches and the flips.
    pub seed: u64,
}

impl TrainSettings {
    /// Refuses settings that cannot train.
    pub fn check(&self) -> Result<()> {
        if self.size < 4 * STRIDE || !self.size.is_multiple_of(STRIDE) {
            return Err(Error::Input(format!(
                "--size {} cannot train: use a multiple of {STRIDE} of at least {} (256 is the default)",
                self.size,
                4 * STRIDE
            )));
        }
        if self.batch == 0 || self.iterations == 0 {
            return Err(Error::Input(
                "--batch and --iters must be at least 1".into(),
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            return Err(Error::Input(format!(
                "--lr {} is not a learning rate: use e.g. 0.0005",
                self.learning_rate
            )));
        }
        let w = self.weights;
        if [w.l1, w.perceptual, w.adversarial]
            .iter()
            .any(|v| v.is_nan() || *v < 0.0)
            || w.l1 + w.perceptual == 0.0
        {
            return Err(Error::Input(
                "loss weights must be ≥ 0, and --l1 or --perceptual must be above 0".into(),
            ));
        }
        Ok(())
    }
}

/// The image files of a pairs folder: `train_A`/`train_B` and `test_A`/`test_B`, matched by name.
#[derive(Debug, Clone)]
pub struct PairFiles {
    /// Training pairs (input, target).
    pub train: Vec<(PathBuf, PathBuf)>,
    /// Held-out pairs.
    pub test: Vec<(PathBuf, PathBuf)>,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["png", "jpg", "jpeg", "webp"].contains(&e.to_ascii_lowercase().as_str()))
}

fn matched(root: &Path, split: &str) -> Result<Vec<(PathBuf, PathBuf)>> {
    let a = root.join(format!("{split}_A"));
    let b = root.join(format!("{split}_B"));
    let Ok(entries) = std::fs::read_dir(&a) else {
        return Ok(vec![]);
    };
    let mut pairs: Vec<(PathBuf, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_image(p))
        .filter_map(|p| {
            let target = b.join(p.file_name()?);
            target.is_file().then_some((p, target))
        })
        .collect();
    pairs.sort();
    Ok(pairs)
}

impl PairFiles {
    /// Finds the pairs of the folder at `root`.
    pub fn find(root: &Path) -> Result<Self> {
        let train = matched(root, "train")?;
        if train.is_empty() {
            return Err(Error::Input(format!(
                "`{}` holds no training pairs: it needs images of the same name in `train_A/` and \
                 `train_B/` (make them with `p2pz pairs`)",
                root.display()
            )));
        }
        Ok(Self {
            train,
            test: matched(root, "test")?,
        })
    }
}

/// Reads a pair, scales its short side to `size` and crops a `size` square at `(fx, fy)` (0 to 1
/// across the slack), flipped when asked: `(3, size, size)` tensors in `[-1, 1]`.
fn load_pair(
    (a, b): &(PathBuf, PathBuf),
    size: usize,
    (fx, fy): (f64, f64),
    flip: bool,
) -> Result<(Tensor, Tensor)> {
    let open = |p: &Path| -> Result<RgbImage> {
        Ok(image::open(p)
            .map_err(|e| {
                Error::Input(format!("cannot read the pair image `{}`: {e}", p.display()))
            })?
            .to_rgb8())
    };
    let a = open(a)?;
    let mut b = open(b)?;
    if b.dimensions() != a.dimensions() {
        b = image::imageops::resize(&b, a.width(), a.height(), FilterType::Triangle);
    }
    let (w, h) = a.dimensions();
    let scale = size as f64 / w.min(h) as f64;
    let (sw, sh) = (
        ((w as f64 * scale).round() as u32).max(size as u32),
        ((h as f64 * scale).round() as u32).max(size as u32),
    );
    let (x0, y0) = (
        ((sw - size as u32) as f64 * fx).round() as u32,
        ((sh - size as u32) as f64 * fy).round() as u32,
    );
    let prepare = |image: &RgbImage| -> Result<Tensor> {
        let scaled = image::imageops::resize(image, sw, sh, FilterType::Triangle);
        let mut crop =
            image::imageops::crop_imm(&scaled, x0, y0, size as u32, size as u32).to_image();
        if flip {
            image::imageops::flip_horizontal_in_place(&mut crop);
        }
        let t = Tensor::from_vec(crop.into_raw(), (size, size, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .to_dtype(DType::F32)?;
        Ok(((t / 127.5)? - 1.0)?)
    };
    Ok((prepare(&a)?, prepare(&b)?))
}

/// The losses of one iteration.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepLosses {
    /// L1 of the generator's images.
    pub l1: f64,
    /// Their perceptual distance (0 when off).
    pub perceptual: f64,
    /// The generator's adversarial loss (0 when off).
    pub adversarial: f64,
    /// The critic's loss (0 when off).
    pub discriminator: f64,
}

/// The state of training after an iteration, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainProgress {
    /// Iterations done.
    pub iteration: usize,
    /// Iterations in all.
    pub total: usize,
    /// This iteration's losses.
    pub losses: StepLosses,
    /// The newest held-out scores.
    pub scores: Option<HeldOutScores>,
    /// Iterations per second in this run.
    pub rate: f64,
}

/// The generator, its critic and their optimisers.
pub struct Trainer {
    settings: TrainSettings,
    device: Device,
    generator_vars: VarMap,
    discriminator_vars: VarMap,
    generator: Generator,
    discriminator: Discriminator,
    generator_optimiser: AdamW,
    discriminator_optimiser: AdamW,
    perceptual: Option<Perceptual>,
    /// Iterations done so far (across resumes).
    pub iteration: usize,
}

fn adam(vars: &VarMap, learning_rate: f64) -> candle_core::Result<AdamW> {
    let vars = sorted(vars).into_iter().map(|(_, v)| v).collect();
    AdamW::new(
        vars,
        ParamsAdamW {
            lr: learning_rate,
            beta1: 0.5,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )
}

impl Trainer {
    /// New networks with seeded weights; `perceptual` is needed when its weight is above 0.
    pub fn new(
        settings: TrainSettings,
        perceptual: Option<Perceptual>,
        device: &Device,
    ) -> Result<Self> {
        settings.check()?;
        let generator_vars = VarMap::new();
        let discriminator_vars = VarMap::new();
        let generator = Generator::new(
            SeededParams::builder(&generator_vars, settings.seed, device),
            settings.generator,
        )?;
        let discriminator = Discriminator::new(
            SeededParams::builder(&discriminator_vars, settings.seed ^ 0xD15C, device),
            settings.discriminator_width,
        )?;
        let perceptual = perceptual.filter(|_| settings.weights.perceptual > 0.0);
        Ok(Self {
            generator_optimiser: adam(&generator_vars, settings.learning_rate)?,
            discriminator_optimiser: adam(&discriminator_vars, settings.learning_rate)?,
            settings,
            device: device.clone(),
            generator_vars,
            discriminator_vars,
            generator,
            discriminator,
            perceptual,
            iteration: 0,
        })
    }

    /// The settings.
    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    /// Whether the perceptual loss is on.
    pub fn has_perceptual(&self) -> bool {
        self.perceptual.is_some()
    }

    /// The generator as it is now.
    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    /// The generator's weights by name, for a generator file.
    pub fn generator_weights(&self) -> Vec<(String, Tensor)> {
        sorted(&self.generator_vars)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect()
    }

    /// One iteration: a critic step (when the adversarial loss is on), then a generator step.
    pub fn step(&mut self, files: &PairFiles) -> Result<StepLosses> {
        let s = self.settings;
        let mut rng =
            Rng::new(s.seed ^ (self.iteration as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
        let mut inputs = Vec::with_capacity(s.batch);
        let mut targets = Vec::with_capacity(s.batch);
        for _ in 0..s.batch {
            let pick = rng.int_inclusive(0, files.train.len() as i64 - 1) as usize;
            let place = (rng.uniform(), rng.uniform());
            let (a, b) = load_pair(&files.train[pick], s.size, place, rng.uniform() < 0.5)?;
            inputs.push(a);
            targets.push(b);
        }
        let input = Tensor::stack(&inputs, 0)?.to_device(&self.device)?;
        let target = Tensor::stack(&targets, 0)?.to_device(&self.device)?;
        let made = self.generator.forward(&input)?;
        let mut losses = StepLosses::default();
        if s.weights.adversarial > 0.0 {
            let real = self.discriminator.forward(&input, &target)?;
            let fake = self.discriminator.forward(&input, &made.detach())?;
            let loss = discriminator_hinge(&real, &fake)?;
            self.discriminator_optimiser.backward_step(&loss)?;
            losses.discriminator = loss.to_scalar::<f32>()? as f64;
        }
        let l1_loss = l1(&made, &target)?;
        losses.l1 = l1_loss.to_scalar::<f32>()? as f64;
        let mut total = (l1_loss * s.weights.l1)?;
        if let Some(perceptual) = &self.perceptual {
            let distance = perceptual.distance(&made, &target)?;
            losses.perceptual = distance.to_scalar::<f32>()? as f64;
            total = (total + (distance * s.weights.perceptual)?)?;
        }
        if s.weights.adversarial > 0.0 {
            let adversarial = generator_hinge(&self.discriminator.forward(&input, &made)?)?;
            losses.adversarial = adversarial.to_scalar::<f32>()? as f64;
            total = (total + (adversarial * s.weights.adversarial)?)?;
        }
        let grads = total.backward()?;
        self.generator_optimiser.step(&grads)?;
        self.iteration += 1;
        Ok(losses)
    }

    /// Scores the generator on up to 64 held-out pairs (centre crops at the training size).
    pub fn evaluate(&self, held_out: &[(Tensor, Tensor)]) -> Result<Option<HeldOutScores>> {
        if held_out.is_empty() {
            return Ok(None);
        }
        let (mut made_sq, mut identity_sq) = (0.0, 0.0);
        for chunk in held_out.chunks(4) {
            let inputs: Vec<Tensor> = chunk.iter().map(|(a, _)| a.clone()).collect();
            let targets: Vec<Tensor> = chunk.iter().map(|(_, b)| b.clone()).collect();
            let input = Tensor::stack(&inputs, 0)?.to_device(&self.device)?;
            let target = Tensor::stack(&targets, 0)?.to_device(&self.device)?;
            let made = self.generator.forward(&input)?.detach();
            let mse = |x: &Tensor| -> Result<f64> { Ok(10f64.powf(-psnr(x, &target)? / 10.0)) };
            made_sq += mse(&made)? * chunk.len() as f64;
            identity_sq += mse(&input)? * chunk.len() as f64;
        }
        let n = held_out.len() as f64;
        let db = |mse: f64| 10.0 * (1.0 / (mse / n).max(1e-12)).log10();
        Ok(Some(HeldOutScores {
            pairs: held_out.len(),
            psnr: db(made_sq),
            identity_psnr: db(identity_sq),
        }))
    }

    /// Writes a checkpoint: both networks' weights, the iteration and the settings.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = vec![];
        for (prefix, vars) in [
            ("generator", &self.generator_vars),
            ("discriminator", &self.discriminator_vars),
        ] {
            for (name, var) in sorted(vars) {
                tensors.push((format!("{prefix}.{name}"), var.as_tensor().detach()));
            }
        }
        let state = serde_json::json!({ "iteration": self.iteration, "settings": self.settings });
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let bytes = tensor_file::encode(
            &named,
            BTreeMap::from([(CHECKPOINT_KEY.into(), state.to_string())]),
        )?;
        crate::export::write_atomically(path, &bytes).map_err(|e| Error::Input(format!("{e:#}")))
    }

    /// Continues from a checkpoint of a run with the same generator, critic and size.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::Input(format!(
                "cannot read the checkpoint `{}`: {e}",
                path.display()
            ))
        })?;
        let (tensors, metadata) = tensor_file::decode(&bytes, &self.device).map_err(|e| {
            Error::Input(format!(
                "the checkpoint `{}` is damaged ({e}): start again without --resume",
                path.display()
            ))
        })?;
        #[derive(Deserialize)]
        struct State {
            iteration: usize,
            settings: TrainSettings,
        }
        let state: State = metadata
            .get(CHECKPOINT_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| {
                Error::Input(format!(
                    "`{}` is not a p2pz training checkpoint",
                    path.display()
                ))
            })?;
        let mine = self.settings;
        if (
            state.settings.generator,
            state.settings.discriminator_width,
            state.settings.size,
        ) != (mine.generator, mine.discriminator_width, mine.size)
        {
            return Err(Error::Input(format!(
                "the checkpoint `{}` trained another network or size ({:?} at {}): resume with its \
                 settings or start again without --resume",
                path.display(),
                state.settings.generator,
                state.settings.size
            )));
        }
        for (prefix, vars) in [
            ("generator", &self.generator_vars),
            ("discriminator", &self.discriminator_vars),
        ] {
            for (name, var) in sorted(vars) {
                let key = format!("{prefix}.{name}");
                let saved = tensors.get(&key).ok_or_else(|| {
                    Error::Input(format!(
                        "the checkpoint `{}` has no `{key}`",
                        path.display()
                    ))
                })?;
                set(&var, saved)?;
            }
        }
        self.iteration = state.iteration;
        Ok(())
    }
}

fn set(var: &Var, value: &Tensor) -> Result<()> {
    if var.shape() != value.shape() {
        return Err(Error::Input(format!(
            "a checkpoint tensor has shape {:?}, the network {:?}",
            value.shape(),
            var.shape()
        )));
    }
    Ok(var.set(value)?)
}

/// The held-out pairs as centre crops at `size`, at most 64 of them.
pub fn held_out(files: &PairFiles, size: usize) -> Result<Vec<(Tensor, Tensor)>> {
    files
        .test
        .iter()
        .take(MAX_SCORED)
        .map(|pair| load_pair(pair, size, (0.5, 0.5), false))
        .collect()
}

/// How a training run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainEnd {
    /// All iterations ran.
    Finished,
    /// A cancel stopped it after a checkpoint was written.
    Stopped,
}

/// Trains until `settings.iterations`, scoring every `eval_every` iterations and writing a
/// checkpoint every `checkpoint_every` and on cancel.
pub fn run(
    trainer: &mut Trainer,
    files: &PairFiles,
    (eval_every, checkpoint_every): (usize, usize),
    checkpoint: &Path,
    progress: &mut dyn FnMut(TrainProgress),
    cancel: &AtomicBool,
) -> Result<(TrainEnd, Option<HeldOutScores>)> {
    let held_out = held_out(files, trainer.settings.size)?;
    let mut scores = trainer.evaluate(&held_out)?;
    let started = (Instant::now(), trainer.iteration);
    let total = trainer.settings.iterations;
    while trainer.iteration < total {
        if cancel.load(Ordering::Relaxed) {
            trainer.save_checkpoint(checkpoint)?;
            return Ok((TrainEnd::Stopped, scores));
        }
        let losses = trainer.step(files)?;
        let i = trainer.iteration;
        if i.is_multiple_of(eval_every.max(1)) || i == total {
            scores = trainer.evaluate(&held_out)?;
        }
        if i.is_multiple_of(checkpoint_every.max(1)) && i < total {
            trainer.save_checkpoint(checkpoint)?;
        }
        let elapsed = started.0.elapsed().as_secs_f64().max(1e-9);
        progress(TrainProgress {
            iteration: i,
            total,
            losses,
            scores,
            rate: (i - started.1) as f64 / elapsed,
        });
    }
    Ok((TrainEnd::Finished, scores))
}
