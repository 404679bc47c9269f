//! The reference pass and the edited pass with cross-attention guidance
//! (`shared/docs/pix2pix-zero.md` §B.7–B.8), one timestep at a time so the editor can run them in
//! lockstep or replay cached reference maps.
//!
//! The order of operations is the authors' (`edit_pipeline.py`; diffusers' is identical): a
//! gradient step of size λ_xa on `[x; x]` against the reference maps, a new noise prediction at
//! the moved latents, the *unconditional* copy carried on, CFG with the caption as the negative
//! prompt, and a DDIM step.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, Var};

use crate::engine::control::{AttentionKind, Keep, RecordedMap, Recorder};
use crate::engine::generate::classifier_free_guidance;
use crate::engine::StableDiffusion;

/// `L = Σ_layers (1/rows) Σ_{rows,i,j} (M_edit − M_ref)²` over the layers both sides have, where
/// `rows` is the number of `batch·heads` rows of each map.
///
/// `edited` and `reference` hold `(rows, queries, keys)` probabilities by layer name; the edited
/// maps may be attached to a graph, the reference maps are treated as constants. A layer missing
/// on either side is an error, so a silent mismatch cannot shrink the loss.
pub fn cross_attention_loss(
    edited: &BTreeMap<String, RecordedMap>,
    reference: &BTreeMap<String, RecordedMap>,
) -> Result<Tensor> {
    if edited.is_empty() {
        candle_core::bail!("cross-attention loss: no edited maps were recorded")
    }
    if edited.len() != reference.len() {
        candle_core::bail!(
            "cross-attention loss: {} edited layers against {} reference layers",
            edited.len(),
            reference.len()
        )
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
    Ok(total.expect("at least one layer"))
}

/// The text embeddings of both passes, each `(1, 77, d)`.
#[derive(Debug, Clone)]
pub struct PassEmbeddings {
    /// The CFG negative: the caption itself for real images, `""` for synthetic ones.
    pub negative: Tensor,
    /// The caption (or the prompt of a synthetic image).
    pub caption: Tensor,
    /// `caption + strength·Δc`: the conditional half of the edited pass.
    pub edited: Tensor,
    /// Whether `negative` is the caption, so both CFG halves of the reference pass are the same
    /// and one UNet call (and one stored map per layer) serves both.
    pub negative_is_caption: bool,
}

/// One timestep's reference cross-attention maps.
#[derive(Debug, Clone)]
pub struct StepMaps {
    /// Layer name → `(items·heads, h·w, 77)`.
    pub layers: BTreeMap<String, RecordedMap>,
    /// Whether the maps hold one batch item that stands for both CFG halves.
    pub shared: bool,
}

impl StepMaps {
    /// The maps of CFG half `item` (0: unconditional, 1: conditional), `(heads, h·w, 77)`.
    pub fn half(&self, item: usize) -> Result<BTreeMap<String, RecordedMap>> {
        if self.shared {
            return Ok(self.layers.clone());
        }
        self.layers
            .iter()
            .map(|(name, map)| {
                let probs = map.probs.narrow(0, item * map.heads, map.heads)?;
                Ok((
                    name.clone(),
                    RecordedMap {
                        probs,
                        ..map.clone()
                    },
                ))
            })
            .collect()
    }

    /// Bytes the maps occupy.
    pub fn bytes(&self) -> usize {
        self.layers
            .values()
            .map(|m| m.probs.elem_count() * m.probs.dtype().size_in_bytes())
            .sum()
    }
}

/// One step of the reference pass: the guided noise prediction at `x` and the maps, stored in
/// `store` precision.
pub fn reference_step(
    model: &StableDiffusion,
    x: &Tensor,
    t: usize,
    embeddings: &PassEmbeddings,
    guidance_scale: f64,
    store: DType,
) -> Result<(Tensor, StepMaps)> {
    let mut recorder = Recorder::new(AttentionKind::CrossAttention, Keep::Detached(store));
    let eps = if embeddings.negative_is_caption {
        // Both halves are identical, and CFG of two equal predictions is the prediction.
        model
            .unet
            .forward(x, t as f64, &embeddings.caption, Some(&mut recorder))?
    } else {
        let context = Tensor::cat(&[&embeddings.negative, &embeddings.caption], 0)?;
        let out = model.unet.forward(
            &Tensor::cat(&[x, x], 0)?,
            t as f64,
            &context,
            Some(&mut recorder),
        )?;
        classifier_free_guidance(&out, guidance_scale)?
    };
    let maps = StepMaps {
        layers: recorder.take(),
        shared: embeddings.negative_is_caption,
    };
    Ok((eps, maps))
}

/// The knobs of the edited pass.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GuidanceParams {
    /// Cross-attention guidance step size λ_xa (0.1 for real images, 0.15 for synthetic).
    pub lambda_xa: f64,
    /// CFG scale of the edited pass (5 in the authors' code).
    pub guidance_scale: f64,
}

/// What one guided step produced.
#[derive(Debug)]
pub struct GuidedStep {
    /// The cross-attention loss before the gradient step, `Σ_layers` over both CFG halves.
    pub loss: f64,
    /// `[x_u; x_c]` after the gradient step, `(2, 4, h, w)`.
    pub moved: Tensor,
    /// The CFG noise prediction at the moved latents, `(1, 4, h, w)`.
    pub eps: Tensor,
    /// The latent of the next timestep.
    pub next: Tensor,
    /// The conditional half's cross-attention maps of the edited pass, `(heads, h·w, 77)` by
    /// layer, when they were asked for (the GUI's overlay; the CLI does not ask).
    pub edited_maps: Option<BTreeMap<String, RecordedMap>>,
}

/// The gradient of one CFG half's share of the loss at `x` `(1, 4, h, w)`.
///
/// The loss normalises by `B·heads` with `B = 2`; each half is differentiated on its own (batch
/// items do not interact in the UNet), which halves the peak memory of the backward.
fn half_gradient(
    model: &StableDiffusion,
    x: &Tensor,
    t: usize,
    context: &Tensor,
    reference: &BTreeMap<String, RecordedMap>,
) -> Result<(f64, Tensor)> {
    let leaf = Var::from_tensor(&x.detach())?;
    let mut recorder = Recorder::new(AttentionKind::CrossAttention, Keep::Graph);
    model
        .unet
        .forward(leaf.as_tensor(), t as f64, context, Some(&mut recorder))?;
    let loss = (cross_attention_loss(recorder.maps(), reference)? * 0.5)?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let grads = loss.backward()?;
    let grad = match grads.get(leaf.as_tensor()) {
        Some(g) => g.clone(),
        None => candle_core::bail!("the cross-attention loss does not reach the latent"),
    };
    Ok((value, grad))
}

/// One step of the edited pass at timestep `t` of a `steps`-step schedule.
///
/// With `record_edited: Some(dtype)` the noise prediction at the moved latents also records the
/// conditional half's cross-attention maps, detached, in `dtype`.
#[allow(clippy::too_many_arguments)]
pub fn guided_step(
    model: &StableDiffusion,
    x: &Tensor,
    t: usize,
    steps: usize,
    reference: &StepMaps,
    embeddings: &PassEmbeddings,
    params: &GuidanceParams,
    record_edited: Option<DType>,
) -> Result<GuidedStep> {
    let halves = [&embeddings.negative, &embeddings.edited];
    let mut moved = Vec::with_capacity(2);
    let mut loss = 0.0;
    for (item, context) in halves.iter().enumerate() {
        if params.lambda_xa == 0.0 {
            moved.push(x.clone());
            continue;
        }
        let (value, grad) = half_gradient(model, x, t, context, &reference.half(item)?)?;
        loss += value;
        moved.push((x - (grad * params.lambda_xa)?)?);
    }
    let moved = Tensor::cat(&moved, 0)?;
    let context = Tensor::cat(&halves, 0)?;
    let mut recorder = record_edited.map(|dtype| {
        Recorder::new(AttentionKind::CrossAttention, Keep::Detached(dtype))
            .only_batch_items(vec![1])
    });
    let out = model.unet.forward(
        &moved,
        t as f64,
        &context,
        recorder
            .as_mut()
            .map(|r| r as &mut dyn crate::engine::control::AttentionControl),
    )?;
    let eps = classifier_free_guidance(&out, params.guidance_scale)?;
    // The authors carry the *unconditional* copy of the moved latents on.
    let carried = moved.narrow(0, 0, 1)?;
    let next = model.scheduler.step(&eps, t, &carried, steps)?;
    Ok(GuidedStep {
        loss,
        moved,
        eps,
        next,
        edited_maps: recorder.map(|mut r| r.take()),
    })
}
