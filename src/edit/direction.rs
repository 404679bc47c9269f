//! Edit directions (`shared/docs/pix2pix-zero.md` §B.5): Δc = mean CLIP `last_hidden_state` of
//! sentences about the target − the same for the source, a full `(1, 77, d)` tensor added to the
//! caption embedding.
//!
//! Mean embeddings are cached on disk per model and sentence set, so a word costs its sentences
//! once. Directions can also be imported: the authors' published `.pt` files (`1×77×768`, f32 or
//! f16) and our own `.safetensors`.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::sentences;
use crate::engine::text::MAX_TOKENS;
use crate::engine::{Error, Result, TextSide};

/// Prompts embedded per text-encoder call.
const EMBED_BATCH: usize = 32;
/// The tensor name inside our direction and embedding files.
const TENSOR_NAME: &str = "direction";

/// 64-bit FNV-1a: a small stable hash for cache keys (the same on every platform and version).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Mean `last_hidden_state` over `sentences`, `(1, 77, d)`, in f32.
pub fn mean_embedding<'a>(model: impl Into<TextSide<'a>>, sentences: &[String]) -> Result<Tensor> {
    let model = model.into();
    if sentences.is_empty() {
        return Err(Error::Input("no sentences to embed".into()));
    }
    let mut sum: Option<Tensor> = None;
    for chunk in sentences.chunks(EMBED_BATCH) {
        let prompts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let embedded = model
            .text
            .embed(&prompts, model.device, DType::F32)?
            .sum_keepdim(0)?;
        sum = Some(match sum {
            Some(s) => (s + embedded)?,
            None => embedded,
        });
    }
    Ok((sum.expect("non-empty") / sentences.len() as f64)?)
}

/// Where the sentences about one word come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SentenceSource {
    /// A user file, one sentence per line.
    File(PathBuf),
    /// The built-in generator: `count` sentences from `seed`.
    Generated {
        /// Sentences to write.
        count: usize,
        /// Seed of the generator.
        seed: u64,
    },
    /// A local Flan-T5 folder sampling `count` captions with `seed`.
    Model {
        /// The T5 folder (`config.json`, `model.safetensors`, `tokenizer.json`).
        dir: PathBuf,
        /// Sentences to write.
        count: usize,
        /// Seed of the sampling.
        seed: u64,
    },
}

impl SentenceSource {
    /// The sentences about `word`.
    pub fn sentences(&self, word: &str) -> Result<Vec<String>> {
        match self {
            SentenceSource::File(path) => sentences::read_file(path),
            SentenceSource::Generated { count, seed } => sentences::generate(word, *count, *seed),
            SentenceSource::Model { dir, count, seed } => {
                super::flan_t5::SentenceWriter::load(dir, &Device::Cpu)?
                    .sentences(word, *count, *seed)
            }
        }
    }
}

/// A disk cache of mean embeddings, keyed by model and sentence set.
#[derive(Debug, Clone)]
pub struct EmbeddingCache {
    dir: PathBuf,
}

impl EmbeddingCache {
    /// A cache rooted at `dir` (created on first write).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The default cache: `$XDG_CACHE_HOME/pix2pix-zero/embeddings`, else
    /// `~/.cache/pix2pix-zero/embeddings`.
    pub fn default_location() -> Self {
        Self::new(crate::engine::source::cache_home().join("embeddings"))
    }

    /// The folder the cache lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A key that changes whenever the text encoder's weights or the sentences change.
    fn key(model: TextSide<'_>, word: &str, sentences: &[String]) -> Result<String> {
        let weights = &model.files.text_encoder.1;
        let meta = std::fs::metadata(weights)?;
        let model_key = format!(
            "{}:{}:{}",
            model.files.origin,
            weights.display(),
            meta.len()
        );
        let sentence_key = sentences.join("\n");
        let safe_word: String = word
            .chars()
            .map(|c| if c.is_alphanumeric() { c } else { '_' })
            .take(40)
            .collect();
        Ok(format!(
            "{safe_word}-{:016x}-{:016x}.safetensors",
            fnv1a(model_key.as_bytes()),
            fnv1a(sentence_key.as_bytes())
        ))
    }

    /// The mean embedding of `sentences` about `word`, from the cache or computed and stored.
    pub fn mean_embedding<'a>(
        &self,
        model: impl Into<TextSide<'a>>,
        word: &str,
        sentences: &[String],
    ) -> Result<Tensor> {
        let model = model.into();
        let path = self.dir.join(Self::key(model, word, sentences)?);
        if let Ok(tensor) = load_direction(&path, model) {
            return Ok(tensor);
        }
        let embedding = mean_embedding(model, sentences)?;
        // A cache that cannot be written only costs time next run.
        let _ = std::fs::create_dir_all(&self.dir).and_then(|_| {
            save_direction(&path, &embedding).map_err(|e| std::io::Error::other(e.to_string()))
        });
        Ok(embedding)
    }

    /// Words with a cached embedding, for suggestions.
    pub fn cached_words(&self) -> Vec<String> {
        let mut words: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        name.strip_suffix(".safetensors")
                            .and_then(|stem| stem.rsplitn(3, '-').nth(2).map(str::to_string))
                    })
                    .collect()
            })
            .unwrap_or_default();
        words.sort();
        words.dedup();
        words
    }
}

/// `Δc = mean(target) − mean(source)`, `(1, 77, d)`.
pub fn direction(source: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok((target - source)?)
}

/// Checks that `direction` fits `model`'s text embeddings: `(1, 77, d)`.
pub fn check_shape<'a>(
    direction: &Tensor,
    model: impl Into<TextSide<'a>>,
    origin: &Path,
) -> Result<()> {
    let model = model.into();
    let d = model.text.encoder.config().hidden_size;
    if direction.dims() != [1, MAX_TOKENS, d] {
        return Err(Error::Input(format!(
            "direction `{}` has shape {:?}, but this model needs (1, {MAX_TOKENS}, {d}): it was made for \
             another text encoder (SD 1.x directions are 1x77x768, SD 2.x 1x77x1024)",
            origin.display(),
            direction.dims()
        )));
    }
    Ok(())
}

/// Saves a direction (or mean embedding) as `.safetensors`, atomically.
pub fn save_direction(path: &Path, direction: &Tensor) -> Result<()> {
    let bytes = crate::edit::tensor_file::encode(&[(TENSOR_NAME, direction)], Default::default())?;
    crate::export::write_atomically(path, &bytes).map_err(|e| Error::Input(format!("{e:#}")))
}

/// Loads a direction from our `.safetensors` or the authors' `.pt`, checks its shape against
/// `model`, and returns it in f32 on the model's device.
pub fn load_direction<'a>(path: &Path, model: impl Into<TextSide<'a>>) -> Result<Tensor> {
    let model = model.into();
    let tensor = match path.extension().and_then(|e| e.to_str()) {
        Some("pt") | Some("pth") => read_torch_tensor(path)?,
        Some("safetensors") => {
            let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
                Error::Input(format!(
                    "cannot read direction `{}`: {}",
                    path.display(),
                    crate::engine::error::candle_message(&e)
                ))
            })?;
            if let Some(t) = tensors.remove(TENSOR_NAME) {
                t
            } else if tensors.len() == 1 {
                tensors.into_values().next().expect("one tensor")
            } else {
                return Err(Error::Input(format!(
                    "direction `{}` holds {} tensors and none is named `{TENSOR_NAME}`",
                    path.display(),
                    tensors.len()
                )));
            }
        }
        _ => {
            return Err(Error::Input(format!(
                "direction `{}`: expected a .pt file (the authors') or a .safetensors file",
                path.display()
            )))
        }
    };
    check_shape(&tensor, model, path)?;
    Ok(tensor.to_dtype(DType::F32)?.to_device(model.device)?)
}

/// Reads the single tensor of a `torch.save(tensor, path)` file (a zip holding a pickle and the
/// raw storage), as the authors published their directions.
pub fn read_torch_tensor(path: &Path) -> Result<Tensor> {
    let fail = |message: String| {
        Error::Input(format!(
            "cannot read `{}` as a torch tensor: {message}",
            path.display()
        ))
    };
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut zip =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| fail(e.to_string()))?;
    let pickle_name = (0..zip.len())
        .filter_map(|i| {
            zip.name_for_index(i)
                .and_then(|n| n.ok())
                .map(|n| n.to_string())
        })
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| fail("no data.pkl inside".into()))?;
    let dir = PathBuf::from(pickle_name.strip_suffix(".pkl").expect("checked suffix"));
    let object = {
        let entry = zip.by_name(&pickle_name).map_err(|e| fail(e.to_string()))?;
        let mut reader = std::io::BufReader::new(entry);
        let mut stack = candle_core::pickle::Stack::empty();
        stack
            .read_loop(&mut reader)
            .map_err(|e| fail(e.to_string()))?;
        stack.finalize().map_err(|e| fail(e.to_string()))?
    };
    let info = object
        .into_tensor_info(
            candle_core::pickle::Object::Unicode(TENSOR_NAME.into()),
            &dir,
        )
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| {
            fail("the pickle holds no tensor (a state dict? save the tensor itself)".into())
        })?;
    let mut bytes = vec![];
    zip.by_name(&info.path)
        .map_err(|e| fail(e.to_string()))?
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    let size = info.dtype.size_in_bytes();
    let storage = Tensor::from_raw_buffer(&bytes, info.dtype, &[bytes.len() / size], &Device::Cpu)?;
    let layout = &info.layout;
    let start = layout.start_offset() / size;
    let shape = layout.shape().clone();
    if !layout.is_contiguous() {
        return Err(fail("the stored tensor is not contiguous".into()));
    }
    Ok(storage
        .narrow(0, start, shape.elem_count())?
        .reshape(shape)?)
}
