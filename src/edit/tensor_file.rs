//! Safetensors files with a JSON header of our own: how sessions and directions are stored.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};

use crate::engine::{Error, Result};

/// Encodes named tensors and `metadata` (string to string) as safetensors bytes.
pub fn encode(tensors: &[(&str, &Tensor)], metadata: BTreeMap<String, String>) -> Result<Vec<u8>> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(name, t)| Ok((name.to_string(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let info = if metadata.is_empty() {
        None
    } else {
        Some(metadata.into_iter().collect::<HashMap<_, _>>())
    };
    safetensors::tensor::serialize(contiguous.iter().map(|(n, t)| (n.as_str(), t)), info)
        .map_err(|e| Error::Input(format!("cannot encode tensors: {e}")))
}

/// Decodes safetensors bytes into tensors on `device` and the header's metadata.
pub fn decode(
    bytes: &[u8],
    device: &Device,
) -> Result<(HashMap<String, Tensor>, BTreeMap<String, String>)> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::Input(format!("not a safetensors file: {e}")))?;
    let metadata = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let tensors = candle_core::safetensors::load_buffer(bytes, device)?;
    Ok((tensors, metadata))
}
