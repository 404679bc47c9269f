//! Training pairs for distillation: deterministic, shardable, resumable, in the paired layout
//! that img2img-turbo's `PairedDataset` reads.
//!
//! ```text
//! DIR/train_A/000000.png   source image of pair 0
//! DIR/train_B/000000.png   its edit
//! DIR/train_prompts.json   {"000000.png": "<target caption>", ...}
//! DIR/test_A/ test_B/ test_prompts.json   the held-out pairs (every `test_every`-th)
//! DIR/pairs.jsonl          one line per pair: everything needed to remake it
//! ```
//!
//! Pair `k` depends only on the [`PairSettings`] and `k`, so shards (`k ≡ i mod N`) written to one
//! folder, or merged from several, give the same bytes as one run. Each pair's record travels in
//! an `iTXt` chunk of its B image, which is written last: a B image on disk means a finished
//! pair, which is never made again. The index files are rebuilt from those records under a lock.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::rng::Rng;
use crate::export::{encode_png, write_atomically};

/// The PNG text key of a pair's record.
pub const RECORD_KEY: &str = "p2pz-pair";
/// Held-out pairs by default: every tenth.
pub const DEFAULT_TEST_EVERY: usize = 10;
/// The lock file that serialises index rebuilds of shards writing to one folder.
const LOCK_FILE: &str = ".pairs.lock";

/// Where the images of a set of pairs come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PairOrigin {
    /// Generated from captions that hold the source word (the paper's way).
    Synthetic {
        /// FNV-1a of the captions file, when captions came from one.
        captions_hash: Option<String>,
    },
    /// Real photos, inverted and edited.
    Photos {
        /// The photo folder, as given.
        folder: String,
    },
}

/// How the edit direction was found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DirectionSpec {
    /// Mean embeddings of generated sentences about the two words.
    Words {
        /// Sentences per word.
        sentences: usize,
        /// Seed of the sentence generator.
        seed: u64,
    },
    /// A direction file.
    File {
        /// The file, as given.
        path: String,
        /// FNV-1a of its bytes.
        hash: String,
    },
}

/// Everything that decides the pairs' pixels (but not how many there are).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairSettings {
    /// The Stable Diffusion model, as given.
    pub model: String,
    /// The word in the source images.
    pub from: String,
    /// The word it becomes.
    pub to: String,
    /// Synthetic or real.
    pub origin: PairOrigin,
    /// The edit direction.
    pub direction: DirectionSpec,
    /// Long side of the images, a multiple of 64.
    pub size: usize,
    /// DDIM steps.
    pub steps: usize,
    /// The run's seed; pair `k`'s own seed is [`pair_seed`]`(seed, k)`.
    pub seed: u64,
    /// Cross-attention guidance step λ_xa.
    pub lambda_xa: f64,
    /// Multiplier of the direction.
    pub strength: f64,
    /// CFG scale of the edited pass (and of a synthetic source's generation).
    pub guidance_scale: f64,
    /// Every `test_every`-th pair is held out.
    pub test_every: usize,
}

impl PairSettings {
    /// Whether pair `k` is held out.
    pub fn is_test(&self, k: usize) -> bool {
        self.test_every > 0 && k % self.test_every == self.test_every - 1
    }
}

/// The record of one pair: its settings and what it was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    /// The pair's index.
    pub index: usize,
    /// The file name in `*_A/` and `*_B/`.
    pub file: String,
    /// `train` or `test`.
    pub split: String,
    /// The pair's own seed (initial noise, regularization shifts).
    pub pair_seed: u64,
    /// The caption of the source image.
    pub source_caption: String,
    /// The caption with the source word replaced by the target word.
    pub target_caption: String,
    /// For real pairs, the photo's file name.
    pub photo: Option<String>,
    /// The settings of the whole run.
    pub settings: PairSettings,
}

/// Which pairs one process makes: `k ≡ index (mod count)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, from 0.
    pub index: usize,
    /// Shards in all.
    pub count: usize,
}

impl Shard {
    /// The whole run as one shard.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Parses `i/N`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            anyhow::anyhow!(
                "--shard `{text}` is not `i/N` with 0 ≤ i < N (e.g. --shard 0/4 for the first of four)"
            )
        };
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// The pairs of this shard among `0..total`.
    pub fn pairs(self, total: usize) -> impl Iterator<Item = usize> {
        (self.index..total).step_by(self.count)
    }
}

/// Pair `k`'s own seed, mixed from the run's seed so that neighbouring pairs share nothing.
pub fn pair_seed(seed: u64, k: usize) -> u64 {
    let mut rng = Rng::new(seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.next_u64() >> 1
}

/// Byte offsets of the whole-word, any-case occurrences of `word` in `text`.
fn word_occurrences(text: &str, word: &str) -> Vec<usize> {
    let lower = text.to_lowercase();
    let needle = word.to_lowercase();
    // Lower-casing can change byte lengths outside ASCII; then only exact matches count.
    let (haystack, needle) = if lower.len() == text.len() && needle.len() == word.len() {
        (lower, needle)
    } else {
        (text.to_string(), word.to_string())
    };
    if needle.is_empty() {
        return vec![];
    }
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
    let mut found = vec![];
    let mut next_free = 0;
    for (at, _) in haystack.match_indices(&needle) {
        let before = text[..at].chars().next_back();
        let after = text[at + needle.len()..].chars().next();
        if at >= next_free && !is_word(before) && !is_word(after) {
            found.push(at);
            next_free = at + needle.len();
        }
    }
    found
}

/// Whether `text` holds `word` as a whole word, in any case.
pub fn holds_word(text: &str, word: &str) -> bool {
    !word_occurrences(text, word).is_empty()
}

/// `caption` with every whole-word `from` (any case) replaced by `to`.
pub fn replace_word(caption: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(caption.len());
    let mut last = 0;
    for at in word_occurrences(caption, from) {
        out.push_str(&caption[last..at]);
        out.push_str(to);
        last = at + from.len();
    }
    out.push_str(&caption[last..]);
    out
}

/// A pairs folder.
#[derive(Debug, Clone)]
pub struct PairFolder {
    root: PathBuf,
}

impl PairFolder {
    /// The folder at `root`, created with its four image folders when missing.
    pub fn create(root: &Path) -> Result<Self> {
        for split in ["train", "test"] {
            for side in ["A", "B"] {
                let dir = root.join(format!("{split}_{side}"));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create `{}`", dir.display()))?;
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// An existing folder, which must hold `train_A` and `train_B`.
    pub fn open(root: &Path) -> Result<Self> {
        for side in ["train_A", "train_B"] {
            if !root.join(side).is_dir() {
                bail!(
                    "`{}` is not a pairs folder: it has no `{side}/` (make one with `p2pz pairs`)",
                    root.display()
                );
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file name of pair `k`.
    pub fn file_name(k: usize) -> String {
        format!("{k:06}.png")
    }

    /// The A and B paths of pair `k`.
    pub fn paths(&self, settings: &PairSettings, k: usize) -> (PathBuf, PathBuf) {
        let split = if settings.is_test(k) { "test" } else { "train" };
        let name = Self::file_name(k);
        (
            self.root.join(format!("{split}_A")).join(&name),
            self.root.join(format!("{split}_B")).join(&name),
        )
    }

    /// Whether pair `k` is finished (its B image, written last, exists).
    pub fn is_done(&self, settings: &PairSettings, k: usize) -> bool {
        self.paths(settings, k).1.is_file()
    }

    /// Refuses a run whose settings differ from those of the pairs already in the folder.
    pub fn check_settings(&self, settings: &PairSettings) -> Result<()> {
        if let Some(existing) = self.records()?.into_iter().next() {
            if existing.settings != *settings {
                bail!(
                    "`{}` already holds pairs made with other settings ({}): use another --out, \
                     or the same settings to add pairs or resume",
                    self.root.display(),
                    settings_difference(&existing.settings, settings)
                );
            }
        }
        Ok(())
    }

    /// Writes pair `k` atomically: A first, then B with the record.
    pub fn write(
        &self,
        record: &PairRecord,
        source: &image::RgbImage,
        edited: &image::RgbImage,
    ) -> Result<()> {
        let (a, b) = self.paths(&record.settings, record.index);
        write_atomically(&a, &encode_png(source, &[])?)?;
        let text = serde_json::to_string(record)?;
        write_atomically(&b, &encode_png(edited, &[(RECORD_KEY, text)])?)?;
        Ok(())
    }

    /// Every finished pair's record, by index.
    pub fn records(&self) -> Result<Vec<PairRecord>> {
        let mut records = BTreeMap::new();
        for split in ["train", "test"] {
            let dir = self.root.join(format!("{split}_B"));
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "png") {
                    let record = read_record(&path)?;
                    records.insert(record.index, record);
                }
            }
        }
        Ok(records.into_values().collect())
    }

    /// Rebuilds `pairs.jsonl` and the two prompt files from the records, under the folder's lock.
    pub fn write_index(&self) -> Result<usize> {
        let lock = File::create(self.root.join(LOCK_FILE))?;
        lock.lock()
            .with_context(|| format!("cannot lock `{}`", self.root.display()))?;
        let records = self.records()?;
        let mut lines = String::new();
        let mut prompts: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
        prompts.insert("train", BTreeMap::new());
        prompts.insert("test", BTreeMap::new());
        for record in &records {
            lines.push_str(&serde_json::to_string(record)?);
            lines.push('\n');
            prompts
                .entry(record.split.as_str())
                .or_default()
                .insert(&record.file, &record.target_caption);
        }
        write_atomically(&self.root.join("pairs.jsonl"), lines.as_bytes())?;
        for (split, map) in prompts {
            let json = serde_json::to_string_pretty(&map)? + "\n";
            write_atomically(
                &self.root.join(format!("{split}_prompts.json")),
                json.as_bytes(),
            )?;
        }
        Ok(records.len())
    }

    /// Copies the finished pairs of `other` into this folder; a pair both hold must be identical.
    pub fn merge_from(&self, other: &PairFolder) -> Result<usize> {
        let mut copied = 0;
        let mine = self.records()?;
        for record in other.records()? {
            if let Some(first) = mine.first() {
                if first.settings != record.settings {
                    bail!(
                        "`{}` holds pairs made with other settings than `{}` ({})",
                        other.root.display(),
                        self.root.display(),
                        settings_difference(&first.settings, &record.settings)
                    );
                }
            }
            let (from_a, from_b) = other.paths(&record.settings, record.index);
            let (to_a, to_b) = self.paths(&record.settings, record.index);
            if to_b.is_file() {
                if std::fs::read(&to_b)? != std::fs::read(&from_b)? {
                    bail!(
                        "pair {} differs between `{}` and `{}`: were they made with other \
                         versions of p2pz?",
                        record.index,
                        other.root.display(),
                        self.root.display()
                    );
                }
                continue;
            }
            write_atomically(&to_a, &std::fs::read(&from_a)?)?;
            write_atomically(&to_b, &std::fs::read(&from_b)?)?;
            copied += 1;
        }
        Ok(copied)
    }
}

/// Reads the record in a B image's text chunk.
pub fn read_record(path: &Path) -> Result<PairRecord> {
    let file = File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("`{}` is not a readable PNG", path.display()))?;
    let text = reader
        .info()
        .utf8_text
        .iter()
        .find(|t| t.keyword == RECORD_KEY)
        .and_then(|t| t.get_text().ok())
        .with_context(|| {
            format!(
                "`{}` has no pair record: was it made by `p2pz pairs`? Remove it or the folder",
                path.display()
            )
        })?;
    serde_json::from_str(&text).with_context(|| format!("the pair record of `{}`", path.display()))
}

/// The first setting that differs, in words.
fn settings_difference(a: &PairSettings, b: &PairSettings) -> String {
    let (a, b) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (key, value) in a {
            if b.get(key) != Some(value) {
                let other = b.get(key).cloned().unwrap_or_default();
                return format!("{key}: {value} there, {other} now");
            }
        }
    }
    "they differ".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_pairs() {
        let mut all: Vec<usize> = (0..4)
            .flat_map(|i| Shard { index: i, count: 4 }.pairs(10))
            .collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(Shard::parse("2/4").unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1", "a/2", "0/0"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn words_are_replaced_whole() {
        assert_eq!(
            replace_word("A Cat and a cat, not a catalog", "cat", "dog"),
            "A dog and a dog, not a catalog"
        );
        assert_eq!(replace_word("a cat", "bird", "dog"), "a cat");
        assert!(holds_word("Two Cats and a cat.", "cat"));
        assert!(!holds_word("a catalog", "cat"));
    }

    #[test]
    fn pair_seeds_differ() {
        let seeds: std::collections::HashSet<u64> = (0..1000).map(|k| pair_seed(3, k)).collect();
        assert_eq!(seeds.len(), 1000);
        assert_eq!(pair_seed(3, 7), pair_seed(3, 7));
    }
}
