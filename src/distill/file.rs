//! Generator files: the weights in safetensors, and a JSON header in its metadata that says what
//! the generator is, which edit it makes, and how well it learned it.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::generator::{Generator, GeneratorConfig, ARCHITECTURE};
use super::pairs::DirectionSpec;
use crate::edit::tensor_file;
use crate::engine::{Error, Result};

/// The metadata key of the header.
pub const HEADER_KEY: &str = "p2pz-generator";
/// The file name's usual ending.
pub const EXTENSION: &str = "generator.safetensors";

/// How well the generator matches the teacher on the held-out pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOutScores {
    /// Held-out pairs scored.
    pub pairs: usize,
    /// PSNR of the generator's images against the teacher's, dB.
    pub psnr: f64,
    /// PSNR of the unedited inputs against the teacher's images: the identity baseline.
    pub identity_psnr: f64,
}

/// What a generator file says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratorHeader {
    /// The network, [`ARCHITECTURE`].
    pub architecture: String,
    /// Its size.
    pub config: GeneratorConfig,
    /// The side it was trained at.
    pub train_size: usize,
    /// The word the edit starts from, when known.
    pub from: Option<String>,
    /// The word it makes, when known.
    pub to: Option<String>,
    /// The direction of the pairs, when they were ours.
    pub direction: Option<DirectionSpec>,
    /// The Stable Diffusion model the pairs came from, when known.
    pub model: Option<String>,
    /// Training pairs.
    pub pairs: usize,
    /// Training iterations.
    pub iterations: usize,
    /// The held-out scores at the end, when there were held-out pairs.
    pub scores: Option<HeldOutScores>,
}

impl GeneratorHeader {
    /// Whether this generator makes the edit `from` → `to` (words compared without case).
    pub fn makes(&self, from: &str, to: &str) -> bool {
        let same = |a: &Option<String>, b: &str| {
            a.as_deref()
                .is_some_and(|a| a.trim().eq_ignore_ascii_case(b.trim()))
        };
        same(&self.from, from) && same(&self.to, to)
    }

    /// The edit in words, e.g. `cat → dog`.
    pub fn edit_name(&self) -> String {
        format!(
            "{} → {}",
            self.from.as_deref().unwrap_or("?"),
            self.to.as_deref().unwrap_or("?")
        )
    }
}

/// Encodes a generator's weights `(name, tensor)` and header as file bytes.
pub fn encode(
    weights: &[(String, candle_core::Tensor)],
    header: &GeneratorHeader,
) -> Result<Vec<u8>> {
    let json = serde_json::to_string(header).map_err(|e| Error::Input(e.to_string()))?;
    let named: Vec<(&str, &candle_core::Tensor)> =
        weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tensor_file::encode(&named, BTreeMap::from([(HEADER_KEY.to_string(), json)]))
}

/// Reads only the header of a generator file.
pub fn read_header(path: &Path) -> Result<GeneratorHeader> {
    let bytes = read(path)?;
    header_of(&bytes, path)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Input(format!("cannot read `{}`: {e}", path.display())))
}

fn header_of(bytes: &[u8], path: &Path) -> Result<GeneratorHeader> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        Error::Input(format!(
            "`{}` is not a generator file: it is not a readable safetensors file ({e}); it may \
             be damaged or cut short. Make one with `p2pz distill`",
            path.display()
        ))
    })?;
    let json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(HEADER_KEY))
        .ok_or_else(|| {
            Error::Input(format!(
                "`{}` is a safetensors file but not a p2pz generator (its header has no \
                 `{HEADER_KEY}` entry). Make one with `p2pz distill`",
                path.display()
            ))
        })?;
    let header: GeneratorHeader = serde_json::from_str(json).map_err(|e| {
        Error::Input(format!(
            "the generator header of `{}` is damaged ({e}): distill it again",
            path.display()
        ))
    })?;
    if header.architecture != ARCHITECTURE {
        return Err(Error::Input(format!(
            "`{}` is a `{}` generator; this p2pz runs `{ARCHITECTURE}`: a newer p2pz may read it",
            path.display(),
            header.architecture
        )));
    }
    Ok(header)
}

/// Loads a generator file onto `device`, refusing a damaged or mismatched one.
pub fn load(path: &Path, device: &Device) -> Result<(Generator, GeneratorHeader)> {
    let bytes = read(path)?;
    let header = header_of(&bytes, path)?;
    let (tensors, _) = tensor_file::decode(&bytes, device).map_err(|e| {
        Error::Input(format!(
            "the weights of `{}` cannot be read ({e}): the file is damaged; distill it again",
            path.display()
        ))
    })?;
    let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, device);
    let generator = Generator::new(vb, header.config).map_err(|e| {
        Error::Input(format!(
            "`{}` does not hold the weights its header describes ({}): the file is damaged or \
             was changed; distill it again",
            path.display(),
            crate::engine::error::candle_message(&e)
        ))
    })?;
    Ok((generator, header))
}
