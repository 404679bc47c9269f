//! The attention-control seam: every attention layer of our UNet reports its probabilities here.
//!
//! This mirrors prompt-to-prompt's attention controller and diffusers' attention processors: the
//! UNet calls [`AttentionControl::attention`] with a stable layer name and the post-softmax
//! probabilities, and the controller decides what to do with them: nothing ([`PassThrough`]),
//! keep a detached copy ([`Recorder`]), or keep them inside the autograd graph so that a loss on
//! them can be differentiated back to the latent (`Recorder` with [`Keep::Graph`]).
//!
//! The seam knows nothing about editing; the pix2pix-zero loss lives in the editor.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor};

/// Which of the two attention layers of a transformer block is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionKind {
    /// `attn1`: the image attends to itself; keys are the `h·w` latent positions.
    SelfAttention,
    /// `attn2`: the image attends to the text; keys are the 77 token positions.
    CrossAttention,
}

/// Where a call to the controller comes from.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSite<'a> {
    /// A stable layer name: `down.{block}.attn{1|2}.{index}`, `mid.attn{1|2}.0` or
    /// `up.{block}.attn{1|2}.{index}`, where `index` counts the attention modules of the block.
    pub layer: &'a str,
    /// Self- or cross-attention.
    pub kind: AttentionKind,
    /// Spatial size `(h, w)` of the queries at this layer; `h·w` queries.
    pub spatial: (usize, usize),
    /// Number of heads; the probabilities have `batch·heads` rows, batch-major.
    pub heads: usize,
}

/// A controller that every attention layer calls with its probabilities.
pub trait AttentionControl {
    /// Whether the controller wants to see layers of this kind. When it does not, the layer takes
    /// its fastest path and never materialises its probabilities for the controller.
    fn wants(&self, kind: AttentionKind) -> bool;

    /// Called with `probs`: `(batch·heads, queries, keys)`, rows summing to one, batch-major as
    /// in diffusers. Returns the probabilities the layer continues with (usually `probs` itself).
    fn attention(&mut self, site: &AttentionSite<'_>, probs: Tensor) -> Result<Tensor>;
}

/// A controller that sees nothing and changes nothing: the reference for "no controller".
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough;

impl AttentionControl for PassThrough {
    fn wants(&self, _: AttentionKind) -> bool {
        false
    }

    fn attention(&mut self, _: &AttentionSite<'_>, probs: Tensor) -> Result<Tensor> {
        Ok(probs)
    }
}

/// How a [`Recorder`] keeps what it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// A detached copy in the given dtype (f16 halves the memory of stored maps).
    Detached(DType),
    /// The tensor itself, still attached to the autograd graph.
    Graph,
}

/// One recorded layer.
#[derive(Debug, Clone)]
pub struct RecordedMap {
    /// Spatial size `(h, w)` of the queries.
    pub spatial: (usize, usize),
    /// Number of heads.
    pub heads: usize,
    /// `(batch·heads, h·w, keys)`, or only the rows of the kept batch items.
    pub probs: Tensor,
}

/// Records the probabilities of the layers of one kind, by layer name.
#[derive(Debug, Clone)]
pub struct Recorder {
    kind: AttentionKind,
    keep: Keep,
    /// Keep only these batch items (e.g. the conditional half of a CFG batch); `None` keeps all.
    batch_items: Option<Vec<usize>>,
    maps: BTreeMap<String, RecordedMap>,
}

impl Recorder {
    /// Records every layer of `kind`, keeping the maps as `keep` says.
    pub fn new(kind: AttentionKind, keep: Keep) -> Self {
        Self {
            kind,
            keep,
            batch_items: None,
            maps: BTreeMap::new(),
        }
    }

    /// Keeps only the rows of these batch items (each item owns `heads` consecutive rows).
    pub fn only_batch_items(mut self, items: Vec<usize>) -> Self {
        self.batch_items = Some(items);
        self
    }

    /// The recorded maps, by layer name, in name order.
    pub fn maps(&self) -> &BTreeMap<String, RecordedMap> {
        &self.maps
    }

    /// Takes the recorded maps out, leaving the recorder empty for the next UNet call.
    pub fn take(&mut self) -> BTreeMap<String, RecordedMap> {
        std::mem::take(&mut self.maps)
    }
}

/// Selects the rows of the given batch items from `(batch·heads, n, m)` probabilities.
fn select_batch_items(probs: &Tensor, heads: usize, items: &[usize]) -> Result<Tensor> {
    let rows: Vec<Tensor> = items
        .iter()
        .map(|&item| probs.narrow(0, item * heads, heads))
        .collect::<Result<_>>()?;
    Tensor::cat(&rows, 0)
}

impl AttentionControl for Recorder {
    fn wants(&self, kind: AttentionKind) -> bool {
        kind == self.kind
    }

    fn attention(&mut self, site: &AttentionSite<'_>, probs: Tensor) -> Result<Tensor> {
        if site.kind != self.kind {
            return Ok(probs);
        }
        let kept = match &self.batch_items {
            Some(items) => select_batch_items(&probs, site.heads, items)?,
            None => probs.clone(),
        };
        let kept = match self.keep {
            Keep::Graph => kept,
            Keep::Detached(dtype) => kept.detach().to_dtype(dtype)?,
        };
        self.maps.insert(
            site.layer.to_string(),
            RecordedMap {
                spatial: site.spatial,
                heads: site.heads,
                probs: kept,
            },
        );
        Ok(probs)
    }
}
