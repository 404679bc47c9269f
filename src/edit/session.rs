//! What a re-edit of one image needs, in memory and on disk.
//!
//! After the first edit a session holds the inverted latent, the caption's embedding, and per
//! timestep the reference cross-attention maps (f16, one CFG half for real photos, whose halves
//! are identical). A re-edit with another word, λ_xa, strength or CFG scale then runs only the
//! edited pass. On disk a session is a safetensors file whose header records the model, the
//! image hash, the caption, the steps and the inversion settings; a file that does not match
//! the request, or that is damaged, is refused with a message, never silently used.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::guidance::StepMaps;
use super::inversion::InversionParams;
use super::tensor_file;
use crate::engine::control::RecordedMap;
use crate::engine::vae::LatentDraw;
use crate::engine::{Error, Result};

/// Bumped whenever the file layout changes; older files are refused.
pub const SESSION_FORMAT: u32 = 1;
/// The metadata key holding the JSON header.
const HEADER_KEY: &str = "pix2pix-zero.session";
/// Precision of stored reference maps: probabilities in [0, 1] lose nothing that matters in f16.
pub const MAP_DTYPE: DType = DType::F16;

/// Where the image of a session came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SessionSource {
    /// A photo, identified by the FNV-1a hash of its file.
    Photo {
        /// Hash of the file's bytes, hex.
        image_hash: String,
        /// Working size `(width, height)`.
        working_size: (usize, usize),
        /// How the photo became a latent.
        latent_draw: LatentDraw,
        /// The inversion settings.
        inversion: InversionParams,
        /// Seed of the regularization's shifts.
        seed: u64,
    },
    /// An image generated from a prompt and a seed.
    Synthetic {
        /// The generation prompt (also the caption).
        prompt: String,
        /// Seed of the initial noise.
        seed: u64,
        /// Image size `(width, height)`.
        size: (usize, usize),
        /// The reference pass's CFG scale: its maps depend on it.
        guidance_scale: f64,
    },
}

/// The header of a session: everything its tensors depend on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionHeader {
    /// [`SESSION_FORMAT`].
    pub format: u32,
    /// The model, as given to `--model`.
    pub model: String,
    /// A key of the model's weight files (paths and sizes).
    pub model_key: String,
    /// The caption that conditions inversion and the reference pass.
    pub caption: String,
    /// DDIM steps.
    pub steps: usize,
    /// The image.
    pub source: SessionSource,
}

/// A session: the header and the tensors a re-edit needs.
#[derive(Debug, Clone)]
pub struct Session {
    /// What the tensors depend on.
    pub header: SessionHeader,
    /// x_T: the inverted latent (or the initial noise of a synthetic image), `(1, 4, h, w)`.
    pub start: Tensor,
    /// The caption's embedding, `(1, 77, d)`.
    pub caption_embedding: Tensor,
    /// The CFG negative's embedding, `(1, 77, d)`.
    pub negative_embedding: Tensor,
    /// Reference maps per timestep; complete once it has `steps` entries.
    pub reference: Vec<StepMaps>,
    /// The reference pass's final latent (decodes to the reconstruction), once complete.
    pub reconstruction: Option<Tensor>,
    /// Precision the reference maps are kept in ([`MAP_DTYPE`]; f32 for parity checks).
    pub map_dtype: DType,
}

impl Session {
    /// Whether every timestep's reference maps are cached.
    pub fn is_complete(&self) -> bool {
        self.reference.len() == self.header.steps && self.reconstruction.is_some()
    }

    /// Bytes the cached tensors occupy.
    pub fn bytes(&self) -> usize {
        let tensor_bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.reference.iter().map(StepMaps::bytes).sum::<usize>()
            + tensor_bytes(&self.start)
            + tensor_bytes(&self.caption_embedding)
            + tensor_bytes(&self.negative_embedding)
            + self.reconstruction.as_ref().map(tensor_bytes).unwrap_or(0)
    }

    /// Refuses a session made for another request, naming the difference.
    pub fn check_matches(&self, expected: &SessionHeader, path: &Path) -> Result<()> {
        let found = &self.header;
        let what = if found.model_key != expected.model_key {
            format!("model `{}`, not `{}`", found.model, expected.model)
        } else if found.source != expected.source {
            match (&found.source, &expected.source) {
                (
                    SessionSource::Photo { image_hash: a, .. },
                    SessionSource::Photo { image_hash: b, .. },
                ) if a != b => "another image".to_string(),
                _ => format!("other image settings ({:?})", found.source),
            }
        } else if found.caption != expected.caption {
            format!(
                "the caption \"{}\", not \"{}\"",
                found.caption, expected.caption
            )
        } else if found.steps != expected.steps {
            format!("{} steps, not {}", found.steps, expected.steps)
        } else {
            return Ok(());
        };
        Err(Error::Input(format!(
            "session `{}` was made for {what}: pass another --session file (or none) to start afresh",
            path.display()
        )))
    }

    /// Writes the session atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut layers: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
        let mut named: Vec<(String, Tensor)> = vec![
            ("start".into(), self.start.clone()),
            ("caption_embedding".into(), self.caption_embedding.clone()),
            ("negative_embedding".into(), self.negative_embedding.clone()),
        ];
        if let Some(r) = &self.reconstruction {
            named.push(("reconstruction".into(), r.clone()));
        }
        let mut shared = vec![];
        for (step, maps) in self.reference.iter().enumerate() {
            shared.push(maps.shared);
            for (name, map) in &maps.layers {
                layers.insert(name.clone(), (map.spatial.0, map.spatial.1, map.heads));
                named.push((format!("maps.{step}.{name}"), map.probs.clone()));
            }
        }
        let mut metadata = BTreeMap::new();
        metadata.insert(
            HEADER_KEY.to_string(),
            serde_json::to_string(&self.header).expect("serializable"),
        );
        metadata.insert(
            "layers".into(),
            serde_json::to_string(&layers).expect("serializable"),
        );
        metadata.insert(
            "shared".into(),
            serde_json::to_string(&shared).expect("serializable"),
        );
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let bytes = tensor_file::encode(&refs, metadata)?;
        crate::export::write_atomically(path, &bytes).map_err(|e| Error::Input(format!("{e:#}")))
    }

    /// Reads a session, refusing damaged files and other formats with a message.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let damaged = |why: String| {
            Error::Input(format!(
                "session `{}` is damaged or not a pix2pix-zero session ({why}): delete it or pass another --session file",
                path.display()
            ))
        };
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Input(format!("cannot read session `{}`: {e}", path.display())))?;
        let (mut tensors, metadata) =
            tensor_file::decode(&bytes, device).map_err(|e| damaged(e.to_string()))?;
        let header: SessionHeader = metadata
            .get(HEADER_KEY)
            .ok_or_else(|| damaged("no session header".into()))
            .and_then(|h| serde_json::from_str(h).map_err(|e| damaged(e.to_string())))?;
        if header.format != SESSION_FORMAT {
            return Err(damaged(format!(
                "format {} but this version reads {SESSION_FORMAT}",
                header.format
            )));
        }
        let layers: BTreeMap<String, (usize, usize, usize)> = metadata
            .get("layers")
            .map(|l| serde_json::from_str(l))
            .transpose()
            .map_err(|e| damaged(e.to_string()))?
            .unwrap_or_default();
        let shared: Vec<bool> = metadata
            .get("shared")
            .map(|l| serde_json::from_str(l))
            .transpose()
            .map_err(|e| damaged(e.to_string()))?
            .unwrap_or_default();
        let mut take = |name: &str| {
            tensors
                .remove(name)
                .ok_or_else(|| damaged(format!("no tensor `{name}`")))
        };
        let start = take("start")?;
        let caption_embedding = take("caption_embedding")?;
        let negative_embedding = take("negative_embedding")?;
        let reconstruction = take("reconstruction").ok();
        let mut reference = Vec::with_capacity(shared.len());
        for (step, &is_shared) in shared.iter().enumerate() {
            let mut maps = BTreeMap::new();
            for (name, &(h, w, heads)) in &layers {
                let probs = take(&format!("maps.{step}.{name}"))?;
                maps.insert(
                    name.clone(),
                    RecordedMap {
                        spatial: (h, w),
                        heads,
                        probs,
                    },
                );
            }
            reference.push(StepMaps {
                layers: maps,
                shared: is_shared,
            });
        }
        Ok(Self {
            header,
            start,
            caption_embedding,
            negative_embedding,
            map_dtype: reference
                .first()
                .and_then(|m| m.layers.values().next())
                .map(|m| m.probs.dtype())
                .unwrap_or(MAP_DTYPE),
            reference,
            reconstruction,
        })
    }
}
