//! Sentences about a word written by a local Flan-T5, as the authors' demo offered
//! (`shared/docs/pix2pix-zero.md` §B.5): the same prompt, sampled at temperature 0.95, 15 to 128
//! tokens, cleaned and made to contain the word.
//!
//! Sampling uses our seeded generator, so a seed gives the same sentences every time.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::t5;

use crate::engine::rng::Rng;
use crate::engine::source::{self, DownloadProgress, ResolveOptions};
use crate::engine::{Error, Result};

/// Files a T5 folder needs.
const REQUIRED_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];
/// The demo's sampling temperature.
const TEMPERATURE: f64 = 0.95;
/// The demo's length limits, in decoder tokens.
const MIN_TOKENS: usize = 15;
const MAX_TOKENS: usize = 128;
/// Characters the demo's cleaning removes from generated sentences.
const REMOVED: [char; 4] = ['.', '-', ')', '('];

/// The authors' demo prompt for a word.
pub fn prompt(word: &str) -> String {
    format!(
        "Provide a caption for images containing a {word}. The captions should be in English and \
         should be no longer than 150 characters. The caption must contain the word {word}. Caption:"
    )
}

/// A loaded Flan-T5 that writes captions.
pub struct SentenceWriter {
    model: t5::T5ForConditionalGeneration,
    tokenizer: tokenizers::Tokenizer,
    start: u32,
    eos: u32,
    device: Device,
}

impl std::fmt::Debug for SentenceWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceWriter")
            .field("eos", &self.eos)
            .finish()
    }
}

impl SentenceWriter {
    /// Finds (and if needed downloads) a T5 model: a folder or a repo id.
    pub fn locate(
        spec: &str,
        options: &ResolveOptions,
        progress: &mut dyn DownloadProgress,
    ) -> Result<PathBuf> {
        source::resolve_files(spec, &REQUIRED_FILES, &[], options, progress)
    }

    /// Loads a T5 folder (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: t5::Config = crate::engine::config::read_json(&config_path)?;
        if !config.is_encoder_decoder {
            return Err(Error::Unsupported(format!(
                "`{}` is not an encoder-decoder T5 (e.g. google/flan-t5-base)",
                config_path.display()
            )));
        }
        let tokenizer = crate::engine::load_tokenizer_json(&dir.join("tokenizer.json"))?;
        let weights = dir.join("model.safetensors");
        let vb = crate::engine::open_weights(&weights, DType::F32, device)?.var_builder();
        let model = t5::T5ForConditionalGeneration::load(vb, &config)
            .map_err(crate::engine::weights_error(&weights, &config_path))?;
        Ok(Self {
            model,
            tokenizer,
            start: config.decoder_start_token_id.unwrap_or(config.pad_token_id) as u32,
            eos: config.eos_token_id as u32,
            device: device.clone(),
        })
    }

    /// Token ids of `text` as the T5 tokenizer gives them (with the final `</s>`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer {
                path: PathBuf::from("tokenizer.json"),
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer {
                path: PathBuf::from("tokenizer.json"),
                message: e.to_string(),
            })
    }

    /// Decodes `prompt_ids` token by token, `choose` picking each next token from the logits;
    /// returns the decoder's tokens after the start token, up to and without `</s>`.
    fn generate(
        &mut self,
        prompt_ids: &[u32],
        max_tokens: usize,
        mut choose: impl FnMut(&[f32], usize) -> u32,
    ) -> Result<Vec<u32>> {
        self.model.clear_kv_cache();
        let input = Tensor::new(prompt_ids, &self.device)?.unsqueeze(0)?;
        let encoded = self.model.encode(&input)?;
        let mut out = vec![self.start];
        while out.len() < max_tokens {
            // The decoder caches keys and values, so each step feeds only the newest token.
            let last = Tensor::new(&out[out.len() - 1..], &self.device)?.unsqueeze(0)?;
            let logits = self
                .model
                .decode(&last, &encoded)?
                .flatten_all()?
                .to_dtype(DType::F32)?;
            let token = choose(&logits.to_vec1::<f32>()?, out.len());
            if token == self.eos {
                break;
            }
            out.push(token);
        }
        self.model.clear_kv_cache();
        Ok(out[1..].to_vec())
    }

    /// Greedy decoding, for checks against the reference implementation.
    pub fn greedy(&mut self, prompt_ids: &[u32], max_tokens: usize) -> Result<Vec<u32>> {
        self.generate(prompt_ids, max_tokens, |logits, _| {
            logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap_or(0)
        })
    }

    /// One sampled caption for `word` (raw, before cleaning).
    fn sample_one(&mut self, word: &str, rng: &mut Rng) -> Result<String> {
        let ids = self.encode(&prompt(word))?;
        let eos = self.eos as usize;
        let tokens = self.generate(&ids, MAX_TOKENS, |logits, len| {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let weights: Vec<f64> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| {
                    // `</s>` is barred until the minimum length, as `min_length` does.
                    if i == eos && len < MIN_TOKENS {
                        0.0
                    } else {
                        ((l as f64 - max) / TEMPERATURE).exp()
                    }
                })
                .collect();
            let total: f64 = weights.iter().sum();
            let mut pick = rng.uniform() * total;
            for (i, w) in weights.iter().enumerate() {
                pick -= w;
                if pick <= 0.0 {
                    return i as u32;
                }
            }
            (weights.len() - 1) as u32
        })?;
        self.decode(&tokens)
    }

    /// `count` distinct cleaned captions about `word`, sampled with `seed`.
    pub fn sentences(&mut self, word: &str, count: usize, seed: u64) -> Result<Vec<String>> {
        let word = super::sentences::check_word(word)?;
        let mut rng = Rng::new(seed);
        let mut seen = HashSet::new();
        let mut out = vec![];
        let mut attempts = 0;
        while out.len() < count && attempts < count * 4 {
            attempts += 1;
            let sentence = clean(&self.sample_one(word, &mut rng)?, word);
            if !sentence.is_empty() && seen.insert(sentence.clone()) {
                out.push(sentence);
            }
        }
        if out.is_empty() {
            return Err(Error::Input(format!(
                "the sentence model wrote nothing usable about `{word}`"
            )));
        }
        Ok(out)
    }
}

/// The demo's cleaning: digits and `.-()` removed, whitespace collapsed, and `, {word}` appended
/// when the sentence does not contain the word.
pub fn clean(sentence: &str, word: &str) -> String {
    let kept: String = sentence
        .chars()
        .filter(|c| !c.is_ascii_digit() && !REMOVED.contains(c))
        .collect();
    let kept = kept.split_whitespace().collect::<Vec<_>>().join(" ");
    if kept.is_empty() || kept.to_lowercase().contains(&word.to_lowercase()) {
        kept
    } else {
        format!("{kept}, {word}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_removes_digits_and_marks_and_adds_the_word() {
        assert_eq!(clean("A dog (2) on a bed.", "dog"), "A dog on a bed");
        assert_eq!(clean("a sunny   beach", "dog"), "a sunny beach, dog");
        assert_eq!(clean("...", "dog"), "");
    }
}
