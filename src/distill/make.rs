//! Making pairs: the loop over a shard's missing pairs that asks the [`teacher`](super::teacher)
//! for each one and writes it, shared by `p2pz pairs` and the app's *Distill this edit*.

use std::sync::atomic::AtomicBool;

use candle_core::Tensor;
use image::RgbImage;

use super::pairs::{pair_seed, replace_word, PairFolder, PairRecord, PairSettings};
use super::teacher;
use crate::edit::EditorProgress;
use crate::engine::{Result, StableDiffusion};

/// The source of one pair, as the caller finds it for pair `k`.
pub enum PairSource {
    /// Generate the source image from this caption.
    Caption(String),
    /// Invert and edit this photo (at working size) under this caption.
    Photo {
        /// The photo at working size.
        image: RgbImage,
        /// FNV-1a of its file.
        hash: u64,
        /// Its caption.
        caption: String,
        /// Its file name, for the record.
        name: String,
    },
}

/// Where pair making stands, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairProgress {
    /// The pair being made.
    pub pair: usize,
    /// Pairs of this run made so far.
    pub done: usize,
    /// Pairs this run makes.
    pub total: usize,
    /// The teacher's step within the pair.
    pub step: EditorProgress,
}

/// The record of pair `k` with `caption`.
pub fn record(
    settings: &PairSettings,
    k: usize,
    caption: String,
    photo: Option<String>,
) -> PairRecord {
    PairRecord {
        index: k,
        file: PairFolder::file_name(k),
        split: if settings.is_test(k) { "test" } else { "train" }.into(),
        pair_seed: pair_seed(settings.seed, k),
        target_caption: replace_word(&caption, &settings.from, &settings.to),
        source_caption: caption,
        photo,
        settings: settings.clone(),
    }
}

/// Makes and writes the pairs `todo` in order. `source` says what pair `k` starts from (it gets
/// `k` and the pair's seed). A cancel stops within one diffusion step; the pairs finished
/// before it stay, and the pair in progress is not written.
#[allow(clippy::too_many_arguments)]
pub fn make_pairs(
    model: &StableDiffusion,
    settings: &PairSettings,
    folder: &PairFolder,
    todo: &[usize],
    direction: &Tensor,
    source: &mut dyn FnMut(usize, u64) -> Result<PairSource>,
    progress: &mut dyn FnMut(PairProgress),
    cancel: &AtomicBool,
) -> Result<()> {
    for (done, &k) in todo.iter().enumerate() {
        let mut report = |step: EditorProgress| {
            progress(PairProgress {
                pair: k,
                done,
                total: todo.len(),
                step,
            })
        };
        let (record, source_image, edited) = match source(k, pair_seed(settings.seed, k))? {
            PairSource::Caption(caption) => {
                let record = record(settings, k, caption, None);
                let (a, b) =
                    teacher::synthetic_pair(model, &record, direction, &mut report, cancel)?;
                (record, a, b)
            }
            PairSource::Photo {
                image,
                hash,
                caption,
                name,
            } => {
                let record = record(settings, k, caption, Some(name));
                let b = teacher::photo_pair(
                    model,
                    &record,
                    &image,
                    hash,
                    direction,
                    &mut report,
                    cancel,
                )?;
                (record, image, b)
            }
        };
        folder
            .write(&record, &source_image, &edited)
            .map_err(|e| crate::engine::Error::Input(format!("{e:#}")))?;
    }
    Ok(())
}
