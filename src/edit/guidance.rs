//! Cross-attention guidance: the loss that keeps the edited image's attention maps on the
//! reference maps (`shared/docs/pix2pix-zero.md` §B.8).

use std::collections::BTreeMap;

use candle_core::{Result, Tensor};

use crate::engine::control::RecordedMap;

/// `L = Σ_layers (1/(B·heads)) Σ_{b,h,i,j} (M_edit − M_ref)²` over the layers both sides have.
///
/// `edited` and `reference` hold `(B·heads, queries, keys)` probabilities by layer name; the
/// edited maps may be attached to a graph, the reference maps are treated as constants. Layers
/// missing on either side are an error, so a silent mismatch cannot shrink the loss.
pub fn cross_attention_loss(
    edited: &BTreeMap<String, RecordedMap>,
    reference: &BTreeMap<String, RecordedMap>,
) -> Result<Tensor> {
    if edited.is_empty() {
        candle_core::bail!("cross-attention loss: no edited maps were recorded")
    }
    let mut total: Option<Tensor> = None;
    for (name, map) in edited {
        let Some(reference) = reference.get(name) else {
            candle_core::bail!("cross-attention loss: no reference map for layer {name}")
        };
        let rows = map.probs.dim(0)? as f64;
        let reference = reference.probs.detach().to_dtype(map.probs.dtype())?;
        let term = ((&map.probs - reference)?.sqr()?.sum_all()? / rows)?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    if edited.len() != reference.len() {
        candle_core::bail!(
            "cross-attention loss: {} edited layers against {} reference layers",
            edited.len(),
            reference.len()
        )
    }
    Ok(total.expect("non-empty"))
}
