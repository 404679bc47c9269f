//! Prompts → CLIP `last_hidden_state`: the tokenizer and the text encoder.
//!
//! The tokenizer is built with the `tokenizers` crate from `tokenizer/tokenizer.json` when the
//! folder has one, else from `vocab.json` + `merges.txt` (what the Stable Diffusion repos ship),
//! with CLIP's normalisation and pre-tokenisation. Prompts are padded to 77 tokens with the pad
//! token the folder names (`<|endoftext|>` for SD 1.x, `!` for SD 2.x), as diffusers does.
//!
//! The encoder is ours (a small CLIP text transformer) because candle's SD-flavoured CLIP fails on
//! batches and hides its config, and its generic CLIP has no exact GELU (needed for SD 2.x).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result as CandleResult, Tensor, D};
use candle_nn::{Embedding, LayerNorm};
use serde_json::Value;

use super::config::{ClipActivation, TextEncoderConfig};
use super::error::{Error, Result};
use super::grad_ops::Linear;
use super::weights::{MappedF32, WeightSource};

/// CLIP's context length: every prompt becomes exactly this many tokens.
pub const MAX_TOKENS: usize = 77;

/// CLIP's pre-tokenisation pattern (from OpenAI's `simple_tokenizer.py`).
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP BPE tokenizer with Stable Diffusion's padding.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("max_len", &self.max_len)
            .finish()
    }
}

/// A special token as `special_tokens_map.json` or `tokenizer_config.json` write it: a string or
/// `{"content": ...}`.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The `tokenizer.json` equivalent of CLIP's slow tokenizer, for `vocab` and `merges` lines.
pub fn clip_tokenizer_json(vocab: Value, merges: Vec<String>) -> Value {
    let added = |id: u64, content: &str| {
        serde_json::json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": true, "special": true
        })
    };
    let id_of = |name: &str| vocab.get(name).and_then(Value::as_u64);
    let added_tokens: Vec<Value> = ["<|startoftext|>", "<|endoftext|>"]
        .iter()
        .filter_map(|name| id_of(name).map(|id| added(id, name)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_PATTERN}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    })
}

impl ClipTokenizer {
    /// Loads the tokenizer of a diffusers `tokenizer/` folder.
    pub fn load(dir: &Path, max_len: usize) -> Result<Self> {
        let err = |path: &Path, message: String| Error::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                hint: "a Stable Diffusion folder has tokenizer/ with vocab.json and merges.txt"
                    .into(),
            });
        }
        let json_path = dir.join("tokenizer.json");
        let inner = if json_path.is_file() {
            super::load_tokenizer_json(&json_path)?
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            for path in [&vocab_path, &merges_path] {
                if !path.is_file() {
                    return Err(Error::MissingFile {
                        path: path.clone(),
                        hint: "the tokenizer needs tokenizer.json, or vocab.json and merges.txt"
                            .into(),
                    });
                }
            }
            let vocab: Value = serde_json::from_str(&std::fs::read_to_string(&vocab_path)?)
                .map_err(|e| err(&vocab_path, e.to_string()))?;
            let merges: Vec<String> = std::fs::read_to_string(&merges_path)?
                .lines()
                .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
                .map(str::to_string)
                .collect();
            let json = clip_tokenizer_json(vocab, merges).to_string();
            tokenizers::Tokenizer::from_bytes(json.as_bytes())
                .map_err(|e| err(dir, e.to_string()))?
        };
        let special = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let named = |key: &str, default: &str| {
            special
                .as_ref()
                .and_then(|s| token_text(s.get(key)))
                .or_else(|| config.as_ref().and_then(|c| token_text(c.get(key))))
                .unwrap_or_else(|| default.to_string())
        };
        let id = |token: String| {
            inner
                .token_to_id(&token)
                .ok_or_else(|| err(dir, format!("token `{token}` is not in the vocabulary")))
        };
        Ok(Self {
            bos: id(named("bos_token", "<|startoftext|>"))?,
            eos: id(named("eos_token", "<|endoftext|>"))?,
            pad: id(named("pad_token", "<|endoftext|>"))?,
            inner,
            max_len,
        })
    }

    /// The padding token id (49407 for SD 1.x, 0 for SD 2.x).
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// `[bos] + tokens (truncated) + [eos]` padded to the context length.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(prompt, false)
            .map_err(|e| Error::Tokenizer {
                path: PathBuf::from("tokenizer"),
                message: e.to_string(),
            })?;
        let content = encoding.get_ids();
        let keep = content.len().min(self.max_len - 2);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&content[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }

    /// The token string at each key position a prompt fills: BOS, the prompt's tokens (truncated
    /// as [`Self::encode`] truncates them), EOS. Index `i` is key `i` of the cross-attention maps.
    pub fn positions(&self, prompt: &str) -> Result<Vec<String>> {
        let encoding = self
            .inner
            .encode(prompt, false)
            .map_err(|e| Error::Tokenizer {
                path: PathBuf::from("tokenizer"),
                message: e.to_string(),
            })?;
        let token = |id: u32| {
            self.inner
                .id_to_token(id)
                .unwrap_or_else(|| format!("#{id}"))
        };
        let content = encoding.get_tokens();
        let keep = content.len().min(self.max_len - 2);
        let mut out = Vec::with_capacity(keep + 2);
        out.push(token(self.bos));
        out.extend_from_slice(&content[..keep]);
        out.push(token(self.eos));
        Ok(out)
    }

    /// Serialises the tokenizer as a `tokenizer.json` file.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// One CLIP encoder layer: pre-norm self-attention with a causal mask, pre-norm MLP.
#[derive(Debug)]
struct ClipLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// CLIP's text transformer (`CLIPTextModel`), returning `last_hidden_state`.
#[derive(Debug)]
pub struct ClipTextEncoder {
    config: TextEncoderConfig,
    token_embedding: TokenEmbedding,
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_norm: LayerNorm,
}

/// The token embedding table: in place in a mapped f32 file where it can be (CLIP's is 152 MB,
/// of which a prompt reads 77 rows), else a tensor of its own.
#[derive(Debug)]
enum TokenEmbedding {
    Mapped {
        table: MappedF32,
        vocab: usize,
        dim: usize,
    },
    Tensor(Embedding),
}

impl TokenEmbedding {
    fn load(vb: &WeightSource, vocab: usize, dim: usize) -> CandleResult<Self> {
        let name = "token_embedding.weight";
        Ok(match vb.mapped_f32((vocab, dim), name)? {
            Some(table) => Self::Mapped { table, vocab, dim },
            None => Self::Tensor(Embedding::new(vb.get((vocab, dim), name)?, dim)),
        })
    }

    /// `(b, n)` token ids → `(b, n, dim)` rows of the table.
    fn forward(&self, ids: &Tensor) -> CandleResult<Tensor> {
        let (table, vocab, dim) = match self {
            Self::Tensor(embedding) => return embedding.forward(ids),
            Self::Mapped { table, vocab, dim } => (table.as_slice(), *vocab, *dim),
        };
        let (b, n) = ids.dims2()?;
        let mut rows = Vec::with_capacity(b * n * dim);
        for id in ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()? {
            let id = id as usize;
            if id >= vocab {
                candle_core::bail!("token id {id} is outside the text encoder's {vocab} tokens");
            }
            rows.extend_from_slice(&table[id * dim..(id + 1) * dim]);
        }
        Tensor::from_vec(rows, (b, n, dim), ids.device())
    }
}

impl ClipTextEncoder {
    /// Loads the encoder from transformers' weights (`text_model.` prefix optional).
    pub fn load(vb: WeightSource, config: TextEncoderConfig) -> CandleResult<Self> {
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let (d, eps) = (config.hidden_size, config.layer_norm_eps);
        let ln = |vb: WeightSource| -> CandleResult<LayerNorm> {
            Ok(LayerNorm::new(
                vb.get(d, "weight")?,
                vb.get(d, "bias")?,
                eps,
            ))
        };
        let linear = |vb: WeightSource, c_in, c_out| Linear::load(vb, c_in, c_out, true);
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layers.{i}"));
                let attn = vb.pp("self_attn");
                Ok(ClipLayer {
                    norm1: ln(vb.pp("layer_norm1"))?,
                    q: linear(attn.pp("q_proj"), d, d)?,
                    k: linear(attn.pp("k_proj"), d, d)?,
                    v: linear(attn.pp("v_proj"), d, d)?,
                    out: linear(attn.pp("out_proj"), d, d)?,
                    norm2: ln(vb.pp("layer_norm2"))?,
                    fc1: linear(vb.pp("mlp.fc1"), d, config.intermediate_size)?,
                    fc2: linear(vb.pp("mlp.fc2"), config.intermediate_size, d)?,
                })
            })
            .collect::<CandleResult<_>>()?;
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: TokenEmbedding::load(&emb, config.vocab_size, d)?,
            position_embedding: emb.get(
                (config.max_position_embeddings, d),
                "position_embedding.weight",
            )?,
            layers,
            final_norm: ln(vb.pp("final_layer_norm"))?,
            config,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &TextEncoderConfig {
        &self.config
    }

    /// `ids`: `(b, n)` token ids → `(b, n, d)` `last_hidden_state`.
    pub fn forward(&self, ids: &Tensor) -> CandleResult<Tensor> {
        let (b, n) = ids.dims2()?;
        let heads = self.config.num_attention_heads;
        let d = self.config.hidden_size;
        let hd = d / heads;
        let mut x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.narrow(0, 0, n)?)?;
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (n, n), ids.device())?.to_dtype(x.dtype())?;
        let split = |t: Tensor| t.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous();
        for layer in &self.layers {
            let h = layer.norm1.forward(&x)?;
            let q = split((layer.q.forward(&h)? * (hd as f64).powf(-0.5))?)?;
            let k = split(layer.k.forward(&h)?)?;
            let v = split(layer.v.forward(&h)?)?;
            let scores = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
            x = (x + layer.out.forward(&attn)?)?;
            let h = layer.fc1.forward(&layer.norm2.forward(&x)?)?;
            let h = match self.config.hidden_act {
                ClipActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
                ClipActivation::Gelu => h.gelu_erf()?,
            };
            x = (x + layer.fc2.forward(&h)?)?;
        }
        self.final_norm.forward(&x)
    }
}

/// A tokenizer and its text encoder: prompts in, embeddings out.
#[derive(Debug)]
pub struct TextEncoder {
    /// The tokenizer.
    pub tokenizer: ClipTokenizer,
    /// The CLIP text transformer.
    pub encoder: ClipTextEncoder,
}

impl TextEncoder {
    /// Token ids `(b, 77)` (u32) for a batch of prompts.
    pub fn token_ids(&self, prompts: &[&str], device: &Device) -> Result<Tensor> {
        let ids: Vec<u32> = prompts
            .iter()
            .map(|p| self.tokenizer.encode(p))
            .collect::<Result<Vec<_>>>()?
            .concat();
        Ok(Tensor::from_vec(ids, (prompts.len(), MAX_TOKENS), device)?)
    }

    /// `last_hidden_state` `(b, 77, d)` for a batch of prompts, in `dtype`.
    pub fn embed(&self, prompts: &[&str], device: &Device, dtype: DType) -> Result<Tensor> {
        let ids = self.token_ids(prompts, device)?;
        Ok(self.encoder.forward(&ids)?.to_dtype(dtype)?)
    }
}

/// Mean over the batch of `(b, 77, d)` embeddings, keeping the batch dimension: `(1, 77, d)`.
pub fn mean_embedding(embeddings: &Tensor) -> CandleResult<Tensor> {
    embeddings.mean_keepdim(D::Minus(3))
}
