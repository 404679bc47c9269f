//! Captioning with BLIP (`shared/docs/pix2pix-zero.md` §B.1), decoded like the authors' code:
//! the prompt "a picture of ", beam search with 3 beams, 10 to 30 tokens (prompt included), the
//! prompt stripped from the result. candle's BLIP example decodes greedily; the beam search is
//! ours, written to follow Hugging Face's `generate` so captions match the reference.
//!
//! The caption is only a starting point: it is the text that conditions inversion and the
//! reconstruction, and users can always replace it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_transformers::models::blip;
use serde::Deserialize;

use crate::engine::source::{self, DownloadProgress, ResolveOptions};
use crate::engine::{Error, Result};

/// The captioner of the paper's setup: BLIP base, COCO-finetuned.
pub const DEFAULT_CAPTIONER: &str = "Salesforce/blip-image-captioning-base";
/// The text the decoder starts from; it is removed from the caption.
pub const PROMPT: &str = "a picture of ";
/// Files a BLIP folder needs.
const REQUIRED_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];
/// Files used when present.
const OPTIONAL_FILES: [&str; 3] = [
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Which version of Hugging Face's beam search to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeamScoring {
    /// transformers 4.25–4.27, what the authors' LAVIS captioner ran: a finished hypothesis is
    /// scored over its whole length (prompt included, `[SEP]` not), running beams are added at
    /// the maximum length, and the search stops when no candidate can beat the worst finished one.
    Authors,
    /// transformers 5: scored over the generated tokens (`[SEP]` included), a beam that reaches
    /// the maximum length finishes like one that ends with `[SEP]`.
    Transformers,
}

/// How the decoder searches for a caption.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamSettings {
    /// The beam-search variant.
    pub scoring: BeamScoring,
    /// Beams kept (3).
    pub beams: usize,
    /// Minimum length in tokens, the prompt included (10).
    pub min_length: usize,
    /// Maximum length in tokens, the prompt included (30).
    pub max_length: usize,
    /// Exponent of the length normalisation (1).
    pub length_penalty: f64,
}

impl Default for BeamSettings {
    /// LAVIS' `BlipCaption.generate` defaults, as the authors ran it.
    fn default() -> Self {
        Self {
            scoring: BeamScoring::Authors,
            beams: 3,
            min_length: 10,
            max_length: 30,
            length_penalty: 1.0,
        }
    }
}

fn default_text_vocab() -> usize {
    30524
}
fn default_768() -> usize {
    768
}
fn default_3072() -> usize {
    3072
}
fn default_12() -> usize {
    12
}
fn default_8() -> usize {
    8
}
fn default_512() -> usize {
    512
}
fn default_384() -> usize {
    384
}
fn default_16() -> usize {
    16
}
fn default_256() -> usize {
    256
}
fn default_gelu() -> candle_nn::Activation {
    candle_nn::Activation::Gelu
}
fn default_bert_eps() -> f64 {
    1e-12
}
fn default_vit_eps() -> f64 {
    1e-5
}
fn default_bos() -> u32 {
    30522
}
fn default_sep() -> u32 {
    102
}

/// `text_config` of transformers' `BlipConfig`, with its defaults (saved configs omit them).
#[derive(Debug, Clone, Deserialize)]
struct TextConfig {
    #[serde(default = "default_text_vocab")]
    vocab_size: usize,
    #[serde(default = "default_768")]
    hidden_size: usize,
    #[serde(default = "default_768")]
    encoder_hidden_size: usize,
    #[serde(default = "default_3072")]
    intermediate_size: usize,
    #[serde(default = "default_768")]
    projection_dim: usize,
    #[serde(default = "default_12")]
    num_hidden_layers: usize,
    #[serde(default = "default_8")]
    num_attention_heads: usize,
    #[serde(default = "default_512")]
    max_position_embeddings: usize,
    #[serde(default = "default_gelu")]
    hidden_act: candle_nn::Activation,
    #[serde(default = "default_bert_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_bos")]
    bos_token_id: u32,
    #[serde(default = "default_sep")]
    sep_token_id: u32,
}

/// `vision_config` of transformers' `BlipConfig`, with its defaults.
#[derive(Debug, Clone, Deserialize)]
struct VisionConfig {
    #[serde(default = "default_768")]
    hidden_size: usize,
    #[serde(default = "default_3072")]
    intermediate_size: usize,
    #[serde(default = "default_512")]
    projection_dim: usize,
    #[serde(default = "default_12")]
    num_hidden_layers: usize,
    #[serde(default = "default_12")]
    num_attention_heads: usize,
    #[serde(default = "default_384")]
    image_size: usize,
    #[serde(default = "default_16")]
    patch_size: usize,
    #[serde(default = "default_gelu")]
    hidden_act: candle_nn::Activation,
    #[serde(default = "default_vit_eps")]
    layer_norm_eps: f64,
}

/// transformers' `BlipConfig`.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    text_config: TextConfig,
    vision_config: VisionConfig,
    #[serde(default = "default_512")]
    projection_dim: usize,
    #[serde(default = "default_256")]
    image_text_hidden_size: usize,
}

/// `preprocessor_config.json` (`BlipImageProcessor`).
#[derive(Debug, Clone, Deserialize)]
struct Preprocessor {
    #[serde(default = "clip_mean")]
    image_mean: [f32; 3],
    #[serde(default = "clip_std")]
    image_std: [f32; 3],
}

fn clip_mean() -> [f32; 3] {
    [0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn clip_std() -> [f32; 3] {
    [0.268_629_54, 0.261_302_6, 0.275_777_1]
}

/// The finished hypotheses of transformers 4.25–4.27's beam search (`BeamHypotheses`): the best
/// `beams` by score, and the worst kept score as it tracks it.
struct LegacyHypotheses {
    kept: Vec<(Vec<u32>, f64)>,
    worst: f64,
    beams: usize,
}

impl LegacyHypotheses {
    /// Keeps `seq` with its length-normalised `score` if it is among the best.
    fn add(&mut self, seq: Vec<u32>, score: f64) {
        if self.kept.len() < self.beams || score > self.worst {
            self.kept.push((seq, score));
            if self.kept.len() > self.beams {
                let (drop, _) = self
                    .kept
                    .iter()
                    .enumerate()
                    .min_by(|x, y| x.1 .1.total_cmp(&y.1 .1))
                    .expect("non-empty");
                self.kept.remove(drop);
                self.worst = self.kept.iter().map(|f| f.1).fold(f64::INFINITY, f64::min);
            } else {
                self.worst = self.worst.min(score);
            }
        }
    }
}

/// A loaded BLIP captioner.
pub struct Captioner {
    model: blip::BlipForConditionalGeneration,
    tokenizer: tokenizers::Tokenizer,
    image_size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    bos: u32,
    eos: u32,
    device: Device,
}

impl std::fmt::Debug for Captioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captioner")
            .field("image_size", &self.image_size)
            .finish()
    }
}

impl Captioner {
    /// Finds (and if needed downloads) a BLIP model: a folder or a repo id, as for `--model`.
    pub fn locate(
        spec: &str,
        options: &ResolveOptions,
        progress: &mut dyn DownloadProgress,
    ) -> Result<PathBuf> {
        source::resolve_files(spec, &REQUIRED_FILES, &OPTIONAL_FILES, options, progress)
    }

    /// Loads BLIP from a folder with `config.json`, `model.safetensors` and `tokenizer.json`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let raw: RawConfig = crate::engine::config::read_json(&dir.join("config.json"))?;
        let preprocessor: Preprocessor = match dir.join("preprocessor_config.json") {
            p if p.is_file() => crate::engine::config::read_json(&p)?,
            _ => serde_json::from_str("{}").expect("all defaults"),
        };
        let tokenizer = crate::engine::load_tokenizer_json(&dir.join("tokenizer.json"))?;
        let t = &raw.text_config;
        let v = &raw.vision_config;
        let config = blip::Config {
            text_config: candle_transformers::models::blip_text::Config {
                vocab_size: t.vocab_size,
                hidden_size: t.hidden_size,
                encoder_hidden_size: t.encoder_hidden_size,
                intermediate_size: t.intermediate_size,
                projection_dim: t.projection_dim,
                num_hidden_layers: t.num_hidden_layers,
                num_attention_heads: t.num_attention_heads,
                max_position_embeddings: t.max_position_embeddings,
                hidden_act: t.hidden_act,
                layer_norm_eps: t.layer_norm_eps,
                is_decoder: true,
            },
            vision_config: blip::VisionConfig {
                hidden_size: v.hidden_size,
                intermediate_size: v.intermediate_size,
                projection_dim: v.projection_dim,
                num_hidden_layers: v.num_hidden_layers,
                num_attention_heads: v.num_attention_heads,
                image_size: v.image_size,
                patch_size: v.patch_size,
                hidden_act: v.hidden_act,
                layer_norm_eps: v.layer_norm_eps,
            },
            projection_dim: raw.projection_dim,
            image_text_hidden_size: raw.image_text_hidden_size,
        };
        let weights = dir.join("model.safetensors");
        let vb = crate::engine::open_weights(&weights, DType::F32, device)?.var_builder();
        // transformers ties the LM head to the word embeddings and may not save it separately.
        let head = "text_decoder.cls.predictions.decoder.weight";
        let vb = if vb.contains_tensor(head) {
            vb
        } else {
            vb.rename_f(move |name| {
                if name == head {
                    "text_decoder.bert.embeddings.word_embeddings.weight".to_string()
                } else {
                    name.to_string()
                }
            })
        };
        let model = blip::BlipForConditionalGeneration::new(&config, vb).map_err(
            crate::engine::weights_error(&weights, &dir.join("config.json")),
        )?;
        Ok(Self {
            model,
            tokenizer,
            image_size: v.image_size,
            mean: preprocessor.image_mean,
            std: preprocessor.image_std,
            bos: t.bos_token_id,
            eos: t.sep_token_id,
            device: device.clone(),
        })
    }

    /// BLIP's input: bicubic resize to the model's square size, scaled to `[0, 1]`, normalised
    /// with CLIP's mean and std, `(1, 3, s, s)`.
    pub fn preprocess(&self, image: &image::RgbImage) -> Result<Tensor> {
        let s = self.image_size as u32;
        let resized = image::imageops::resize(image, s, s, image::imageops::FilterType::CatmullRom);
        let data: Vec<f32> = resized.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
        let t = Tensor::from_vec(data, (s as usize, s as usize, 3), &self.device)?
            .permute((2, 0, 1))?;
        let mean = Tensor::new(&self.mean, &self.device)?.reshape((3, 1, 1))?;
        let std = Tensor::new(&self.std, &self.device)?.reshape((3, 1, 1))?;
        Ok(t.broadcast_sub(&mean)?.broadcast_div(&std)?.unsqueeze(0)?)
    }

    /// The prompt's token ids as BLIP feeds them: the first id replaced by the decoder's BOS,
    /// the trailing `[SEP]` dropped.
    pub fn prompt_ids(&self) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(PROMPT, true)
            .map_err(|e| Error::Tokenizer {
                path: PathBuf::from("tokenizer.json"),
                message: e.to_string(),
            })?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() < 2 {
            return Err(Error::Input(
                "the BLIP tokenizer gave an empty prompt".into(),
            ));
        }
        ids[0] = self.bos;
        ids.pop();
        Ok(ids)
    }

    /// The vision encoder's output for preprocessed pixels, `(1, patches + 1, d)`.
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.model.vision_model().forward(pixels)?)
    }

    /// Log-probabilities of the next token after each of `sequences`, `(n, vocab)` in f64.
    fn next_log_probs(
        &mut self,
        image_embeds: &Tensor,
        sequences: &[Vec<u32>],
    ) -> Result<Vec<Vec<f64>>> {
        let mut rows = Vec::with_capacity(sequences.len());
        for sequence in sequences {
            let len = sequence.len();
            let ids = Tensor::new(sequence.as_slice(), &self.device)?.unsqueeze(0)?;
            // candle's BLIP decoder takes one sequence at a time and caches keys and values for a
            // single growing sequence; beams are reordered every step, so each step runs each
            // (short) sequence from the start.
            self.model.reset_kv_cache();
            let logits = self.model.text_decoder().forward(&ids, image_embeds)?;
            let last = logits
                .narrow(1, len - 1, 1)?
                .flatten_all()?
                .to_dtype(DType::F64)?;
            rows.push(candle_nn::ops::log_softmax(&last, D::Minus1)?.to_vec1::<f64>()?);
        }
        Ok(rows)
    }

    /// Beam search from `prompt` over `image_embeds`; returns the whole sequence, the prompt and
    /// a final `[SEP]` included.
    pub fn beam_search(
        &mut self,
        image_embeds: &Tensor,
        prompt: &[u32],
        settings: &BeamSettings,
    ) -> Result<Vec<u32>> {
        match settings.scoring {
            BeamScoring::Authors => self.beam_search_legacy(image_embeds, prompt, settings),
            BeamScoring::Transformers => self.beam_search_current(image_embeds, prompt, settings),
        }
    }

    /// The best `2·beams` continuations of `running`, `(score, beam, token)`, best first, with
    /// `[SEP]` barred below the minimum length.
    fn candidates(
        &mut self,
        image_embeds: &Tensor,
        running: &[(Vec<u32>, f64)],
        settings: &BeamSettings,
    ) -> Result<Vec<(f64, usize, u32)>> {
        let cur_len = running[0].0.len();
        let sequences: Vec<Vec<u32>> = running.iter().map(|b| b.0.clone()).collect();
        let log_probs = self.next_log_probs(image_embeds, &sequences)?;
        let mut candidates: Vec<(f64, usize, u32)> = vec![];
        for (b, row) in log_probs.iter().enumerate() {
            for (token, &lp) in row.iter().enumerate() {
                let token = token as u32;
                let barred = cur_len < settings.min_length && token == self.eos;
                let lp = if barred { f64::NEG_INFINITY } else { lp };
                candidates.push((running[b].1 + lp, b, token));
            }
        }
        candidates.sort_by(|x, y| y.0.total_cmp(&x.0));
        candidates.truncate(2 * settings.beams.max(1));
        Ok(candidates)
    }

    /// transformers 4.25–4.27's `BeamSearchScorer` with `early_stopping=False`: a hypothesis
    /// finishes only with `[SEP]` and is scored over its whole length (prompt included, `[SEP]`
    /// not); the search is done when the best candidate cannot beat the worst finished one; at
    /// the maximum length the running beams join the finished ones.
    fn beam_search_legacy(
        &mut self,
        image_embeds: &Tensor,
        prompt: &[u32],
        settings: &BeamSettings,
    ) -> Result<Vec<u32>> {
        let beams = settings.beams.max(1);
        let per_length = |len: usize| (len.max(1) as f64).powf(settings.length_penalty);
        let mut running: Vec<(Vec<u32>, f64)> = vec![(prompt.to_vec(), 0.0)];
        let mut finished = LegacyHypotheses {
            kept: vec![],
            worst: 1e9,
            beams,
        };
        let mut cur_len = prompt.len();
        let mut done = false;
        while !done && cur_len < settings.max_length {
            let candidates = self.candidates(image_embeds, &running, settings)?;
            let mut next = vec![];
            for (rank, &(score, b, token)) in candidates.iter().enumerate() {
                if token == self.eos {
                    if rank < beams {
                        finished.add(running[b].0.clone(), score / per_length(cur_len));
                    }
                } else {
                    let mut seq = running[b].0.clone();
                    seq.push(token);
                    next.push((seq, score));
                }
                if next.len() == beams {
                    break;
                }
            }
            if finished.kept.len() >= beams {
                let best = candidates.first().map(|c| c.0).unwrap_or(f64::NEG_INFINITY);
                done = finished.worst >= best / per_length(cur_len + 1);
            }
            running = next;
            cur_len += 1;
        }
        if !done {
            for (seq, score) in std::mem::take(&mut running) {
                let normalised = score / per_length(seq.len());
                finished.add(seq, normalised);
            }
        }
        let (mut best, _) = finished
            .kept
            .into_iter()
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .ok_or_else(|| Error::Input("beam search produced no caption".into()))?;
        if best.len() < settings.max_length {
            best.push(self.eos);
        }
        Ok(best)
    }

    /// transformers 5's `_beam_search` with `early_stopping=False`: each step keeps the best
    /// `2·beams` continuations; those among the first `beams` that end (by `[SEP]` or by reaching
    /// the maximum length) become finished hypotheses scored over their generated length
    /// (`[SEP]` counted); the best `beams` that do not end keep running. The search stops once
    /// every finished slot is taken and the best running beam, normalised at its current length,
    /// cannot beat the worst of them.
    fn beam_search_current(
        &mut self,
        image_embeds: &Tensor,
        prompt: &[u32],
        settings: &BeamSettings,
    ) -> Result<Vec<u32>> {
        let prompt_len = prompt.len();
        let beams = settings.beams.max(1);
        let per_length = |len: usize| (len.max(1) as f64).powf(settings.length_penalty);
        let mut running: Vec<(Vec<u32>, f64)> = vec![(prompt.to_vec(), 0.0)];
        let mut finished: Vec<(Vec<u32>, f64)> = vec![];
        let mut cur_len = prompt_len;
        while cur_len < settings.max_length && !running.is_empty() {
            let candidates = self.candidates(image_embeds, &running, settings)?;
            let extend = |b: usize, token: u32| {
                let mut seq = running[b].0.clone();
                seq.push(token);
                seq
            };
            let ends = |token: u32| token == self.eos || cur_len + 1 >= settings.max_length;
            for &(score, b, token) in candidates.iter().take(beams).filter(|c| ends(c.2)) {
                finished.push((
                    extend(b, token),
                    score / per_length(cur_len + 1 - prompt_len),
                ));
            }
            finished.sort_by(|x, y| y.1.total_cmp(&x.1));
            finished.truncate(beams);
            let next: Vec<(Vec<u32>, f64)> = candidates
                .iter()
                .filter(|c| !ends(c.2))
                .take(beams)
                .map(|&(score, b, token)| (extend(b, token), score))
                .collect();
            running = next;
            cur_len += 1;
            if finished.len() == beams {
                let worst = finished.last().expect("full").1;
                let best_running = running
                    .first()
                    .map(|r| r.1 / per_length(cur_len - prompt_len));
                if best_running.is_none_or(|best| best <= worst) {
                    break;
                }
            }
        }
        finished
            .into_iter()
            .next()
            .map(|(seq, _)| seq)
            .ok_or_else(|| Error::Input("beam search produced no caption".into()))
    }

    /// Decodes token ids to text without special tokens, and strips the prompt.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer {
                path: PathBuf::from("tokenizer.json"),
                message: e.to_string(),
            })?;
        let text = text.trim();
        Ok(text
            .strip_prefix(PROMPT.trim_end())
            .unwrap_or(text)
            .trim()
            .to_string())
    }

    /// A caption for `image` (the photo at working size, as the authors feed it).
    pub fn caption(&mut self, image: &image::RgbImage) -> Result<String> {
        let pixels = self.preprocess(image)?;
        let embeds = self.encode_image(&pixels)?;
        let ids = self.beam_search(&embeds, &self.prompt_ids()?, &BeamSettings::default())?;
        self.decode(&ids)
    }
}
