//! Distilled generators on the worker: the ones the user has, importing one, running one on the
//! open photo (the app's Instant result), and distilling a new one from the loaded model.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use crate::distill::file::{self, GeneratorHeader, EXTENSION};
use crate::distill::generator::{Generator, ARCHITECTURE};
use crate::distill::losses::Perceptual;
use crate::distill::make::{make_pairs, PairSource};
use crate::distill::pairs::{DirectionSpec, PairFolder, PairOrigin, PairSettings, Shard};
use crate::distill::train::{self, LossWeights, PairFiles, TrainEnd, TrainSettings, Trainer};
use crate::edit::direction::{self, EmbeddingCache};
use crate::edit::sentences;
use crate::engine::{Error as EngineError, StableDiffusion};
use crate::export::write_atomically;

/// A generator file the app can offer, in plain words.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorInfo {
    /// The file.
    pub path: PathBuf,
    /// The word its edit starts from, when the file says.
    pub from: Option<String>,
    /// The word it makes, when the file says.
    pub to: Option<String>,
    /// Held-out PSNR against the teacher and of the identity, dB, when it was scored.
    pub scores: Option<(f64, f64)>,
    /// Training pairs.
    pub pairs: usize,
}

impl GeneratorInfo {
    fn new(path: PathBuf, header: &GeneratorHeader) -> Self {
        Self {
            path,
            from: header.from.clone(),
            to: header.to.clone(),
            scores: header.scores.map(|s| (s.psnr, s.identity_psnr)),
            pairs: header.pairs,
        }
    }

    /// Whether it makes `from` → `to` (words compared without case).
    pub fn makes(&self, from: &str, to: &str) -> bool {
        let same = |a: &Option<String>, b: &str| {
            a.as_deref()
                .is_some_and(|a| !b.trim().is_empty() && a.trim().eq_ignore_ascii_case(b.trim()))
        };
        same(&self.from, from) && same(&self.to, to)
    }

    /// The edit in words, e.g. `cat to dog` (plain words: the app's font has no arrows).
    pub fn edit_name(&self) -> String {
        format!(
            "{} to {}",
            self.from.as_deref().unwrap_or("?"),
            self.to.as_deref().unwrap_or("?")
        )
    }
}

/// The generators in `dir` (its own files, not its subfolders), by file name; files that are
/// not readable generators are left out.
pub fn list(dir: &Path) -> Vec<GeneratorInfo> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut found: Vec<GeneratorInfo> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(".safetensors"))
        .filter_map(|p| {
            let header = file::read_header(&p).ok()?;
            Some(GeneratorInfo::new(p, &header))
        })
        .collect();
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// A free file name `stem.generator.safetensors` in `dir` (`stem-2…` when taken).
fn free_name(dir: &Path, stem: &str) -> PathBuf {
    let mut candidate = dir.join(format!("{stem}.{EXTENSION}"));
    let mut n = 2;
    while candidate.exists() {
        candidate = dir.join(format!("{stem}-{n}.{EXTENSION}"));
        n += 1;
    }
    candidate
}

/// Checks that `path` is a generator this build runs, and copies it into `dir`.
pub fn import(dir: &Path, path: &Path) -> Result<GeneratorInfo> {
    let (_, header) = file::load(path, &Device::Cpu)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the generator folder `{}`", dir.display()))?;
    let already = list(dir)
        .into_iter()
        .find(|g| std::fs::read(&g.path).is_ok_and(|b| b == bytes));
    if let Some(existing) = already {
        return Ok(existing);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .split('.')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("generator");
    let target = free_name(dir, stem);
    write_atomically(&target, &bytes)?;
    Ok(GeneratorInfo::new(target, &header))
}

/// The generator last run, kept so that a scrub of words or photos does not reload it.
#[derive(Default)]
pub struct LoadedGenerator {
    loaded: Option<(PathBuf, Option<SystemTime>, Generator, GeneratorHeader)>,
}

impl LoadedGenerator {
    /// Runs the generator in `path` on `image` (at its size) and returns the result and header.
    pub fn apply(
        &mut self,
        path: &Path,
        image: &image::RgbImage,
        device: &Device,
    ) -> Result<(image::RgbImage, GeneratorHeader)> {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let current = self
            .loaded
            .as_ref()
            .is_some_and(|(p, m, _, _)| p == path && *m == modified);
        if !current {
            let (generator, header) = file::load(path, device)?;
            self.loaded = Some((path.to_path_buf(), modified, generator, header));
        }
        let (_, _, generator, header) = self.loaded.as_ref().expect("just loaded");
        Ok((generator.edit_photo(image, None, device)?, header.clone()))
    }
}

/// What the app's *Distill this edit* asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillRequest {
    /// The word in the photos.
    pub from: String,
    /// The word it becomes.
    pub to: String,
    /// Training pairs to make (the held-out ones among them).
    pub pairs: usize,
    /// Side of the pairs' images.
    pub size: usize,
    /// DDIM steps per pair.
    pub steps: usize,
    /// Training iterations.
    pub iterations: usize,
}

/// Where a distillation's pairs and checkpoint live: one folder per edit and settings, so a
/// stopped run picks up where it was.
fn work_folder(generators: &Path, request: &DistillRequest) -> PathBuf {
    let name = format!(
        "{}2{}-{}px-{}steps",
        request.from, request.to, request.size, request.steps
    )
    .replace(|c: char| !c.is_alphanumeric() && c != '-', "_");
    generators.join("work").join(name)
}

/// Makes the pairs (synthetic, the paper's way) and trains a generator on them, reporting
/// `(stage, step, total)`; writes the generator into `generators` and returns its info. A cancel
/// keeps the finished pairs and a checkpoint, and the same request later continues from them.
pub fn distill(
    model: &StableDiffusion,
    request: &DistillRequest,
    (generators, embeddings, sentence_count): (&Path, &Path, usize),
    progress: &mut dyn FnMut(&str, usize, usize),
    cancel: &AtomicBool,
) -> Result<GeneratorInfo> {
    let (from, to) = (
        sentences::check_word(&request.from)?.to_string(),
        sentences::check_word(&request.to)?.to_string(),
    );
    if from.eq_ignore_ascii_case(&to) {
        bail!("the source and target words are both `{from}`: an edit needs two different words");
    }
    if request.pairs < 2 || request.iterations == 0 {
        bail!("distilling needs at least 2 pairs and 1 iteration");
    }
    let settings = PairSettings {
        model: model.files.origin.clone(),
        from: from.clone(),
        to: to.clone(),
        origin: PairOrigin::Synthetic {
            captions_hash: None,
        },
        direction: DirectionSpec::Words {
            sentences: sentence_count,
            seed: 0,
        },
        size: request.size,
        steps: request.steps,
        seed: 0,
        lambda_xa: 0.15,
        strength: 1.0,
        guidance_scale: 5.0,
        test_every: 10.min(request.pairs),
    };
    let work = work_folder(generators, request);
    let folder = PairFolder::create(&work)?;
    folder.check_settings(&settings)?;
    let todo: Vec<usize> = Shard::ALL
        .pairs(request.pairs)
        .filter(|&k| !folder.is_done(&settings, k))
        .collect();
    if !todo.is_empty() {
        let cache = EmbeddingCache::new(embeddings.to_path_buf());
        let mean = |word: &str| -> crate::engine::Result<candle_core::Tensor> {
            cache.mean_embedding(model, word, &sentences::generate(word, sentence_count, 0)?)
        };
        let delta = direction::direction(&mean(&from)?, &mean(&to)?)?;
        let before = request.pairs - todo.len();
        let result = make_pairs(
            model,
            &settings,
            &folder,
            &todo,
            &delta,
            &mut |_, seed| {
                Ok(PairSource::Caption(
                    sentences::generate(&from, 1, seed)?.remove(0),
                ))
            },
            &mut |p| progress("pairs", before + p.done, request.pairs),
            cancel,
        );
        folder.write_index()?;
        result?;
    }
    folder.write_index()?;
    let files = PairFiles::find(&work)?;
    let train_settings = TrainSettings {
        size: request.size.min(256),
        iterations: request.iterations,
        batch: 4,
        learning_rate: 5e-4,
        weights: LossWeights::default(),
        generator: Default::default(),
        discriminator_width: crate::distill::discriminator::DEFAULT_WIDTH,
        seed: 0,
    };
    let new_trainer = || -> Result<Trainer> {
        let vae = crate::engine::load_vae(&model.files, &model.device, candle_core::DType::F32)?;
        Ok(Trainer::new(
            train_settings,
            Some(Perceptual::new(vae, 1)),
            &model.device,
        )?)
    };
    let mut trainer = new_trainer()?;
    let checkpoint = work.join("generator.checkpoint.safetensors");
    if checkpoint.is_file() && trainer.load_checkpoint(&checkpoint).is_err() {
        // A checkpoint of other settings: start again rather than fail.
        trainer = new_trainer()?;
    }
    let (end, scores) = train::run(
        &mut trainer,
        &files,
        (100, 200),
        &checkpoint,
        &mut |p| progress("train", p.iteration, p.total),
        cancel,
    )?;
    if end == TrainEnd::Stopped {
        return Err(EngineError::Cancelled.into());
    }
    let header = GeneratorHeader {
        architecture: ARCHITECTURE.into(),
        config: train_settings.generator,
        train_size: train_settings.size,
        from: Some(from.clone()),
        to: Some(to.clone()),
        direction: Some(settings.direction.clone()),
        model: Some(settings.model.clone()),
        pairs: files.train.len(),
        iterations: trainer.iteration,
        scores,
    };
    std::fs::create_dir_all(generators)?;
    let target = free_name(generators, &format!("{from}2{to}"));
    write_atomically(
        &target,
        &file::encode(&trainer.generator_weights(), &header)?,
    )?;
    Ok(GeneratorInfo::new(target, &header))
}
