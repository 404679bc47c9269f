//! Attention with the controller seam, the transformer block, and the spatial transformer.
//!
//! Every attention layer can take three paths:
//! - the controller wants this kind of layer: the probabilities are materialised with a
//!   differentiable softmax and handed to the controller, which may keep them in the graph;
//! - self-attention inside a graph: a recomputing op that rebuilds the probabilities head by
//!   head during the backward (keeping only its input, or on the CPU its projections);
//! - cross-attention inside a graph: on the CPU the same op, elsewhere the controller's path
//!   without a controller;
//! - otherwise: the fast fused path, attending a few heads at a time to bound memory.

use crate::engine::weights::WeightSource;
use candle_core::{Module, Result, Tensor, D};

use crate::engine::control::{AttentionControl, AttentionKind, AttentionSite, PassThrough};
use crate::engine::cpu::{self, attention::AttentionShape};
use crate::engine::grad_ops::{
    self, compute_dtype, with_vjp, Conv2d, GroupNorm, LayerNorm, Linear, RecomputedAttention,
};

/// Heads attended together on the fast path and in the recomputing backward.
const HEAD_CHUNK: usize = 4;

/// One attention layer (`attn1` or `attn2` of a transformer block), diffusers' `Attention`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    kind: AttentionKind,
    name: String,
    /// The precision of the CPU attention's products, chosen at load like the layers'.
    products: cpu::Products,
}

/// `(b, n, heads·d)` → `(b·heads, n, d)`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    x.reshape((b, n, heads, c / heads))?
        .transpose(1, 2)?
        .reshape((b * heads, n, c / heads))
}

/// `(b·heads, n, d)` → `(b, n, heads·d)`.
fn merge_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (bh, n, d) = x.dims3()?;
    x.reshape((bh / heads, heads, n, d))?
        .transpose(1, 2)?
        .reshape((bh / heads, n, heads * d))
}

impl Attention {
    /// Loads `to_q`, `to_k`, `to_v` (no bias) and `to_out.0` from `vb`.
    ///
    /// `query_dim`: width of the image tokens; `context_dim`: width of the keys' source (the
    /// text embeddings for cross-attention, `query_dim` for self-attention).
    pub fn load(
        vb: WeightSource,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        kind: AttentionKind,
        name: String,
    ) -> Result<Self> {
        let inner = query_dim;
        Ok(Self {
            to_q: Linear::load(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            scale: 1.0 / ((inner / heads) as f64).sqrt(),
            kind,
            name,
            products: cpu::products(),
        })
    }

    /// The stable name the controller sees, e.g. `up.2.attn2.1`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `x`: `(b, h·w, c)`; `context`: `(b, keys, d)` for cross-attention. Returns `(b, h·w, c)`.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        spatial: (usize, usize),
        control: &mut dyn AttentionControl,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let context = match (self.kind, context) {
            (AttentionKind::CrossAttention, Some(c)) => c,
            (AttentionKind::CrossAttention, None) => {
                candle_core::bail!("{}: cross-attention needs a context", self.name)
            }
            (AttentionKind::SelfAttention, _) => x,
        };
        let out = match () {
            _ if control.wants(self.kind) => self.controlled(x, context, spatial, control)?,
            _ if self.kind == AttentionKind::SelfAttention && x.track_op() => {
                if cpu::handles(x) {
                    self.recomputed_cpu(x)?
                } else {
                    self.recomputed(x)?
                }
            }
            _ if x.track_op() || context.track_op() => {
                if cpu::handles(x) && !context.track_op() {
                    self.cross_in_graph_cpu(x, context)?
                } else {
                    self.controlled(x, context, spatial, &mut PassThrough)?
                }
            }
            _ if cpu::handles(x) => {
                let q = self.to_q.forward(x)?;
                let (k, v) = (self.to_k.forward(context)?, self.to_v.forward(context)?);
                cpu::attention::attend_tensors(&q, &k, &v, self.heads, self.scale, self.products)?
            }
            _ => {
                let (q, k, v) = self.project(x, context)?;
                merge_heads(&self.fast().attend(&q, &k, &v)?, self.heads)?
            }
        };
        self.to_out.forward(&out.to_dtype(dtype)?)
    }

    /// Split-head `q`, `k`, `v`, upcast to at least f32 (half-precision attention is always
    /// computed in f32, as diffusers' `upcast_attention` does for SD 2.1).
    fn project(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let up = |t: Tensor| t.to_dtype(compute_dtype(x.dtype()));
        Ok((
            split_heads(&up(self.to_q.forward(x)?)?, self.heads)?,
            split_heads(&up(self.to_k.forward(context)?)?, self.heads)?,
            split_heads(&up(self.to_v.forward(context)?)?, self.heads)?,
        ))
    }

    fn fast(&self) -> RecomputedAttention {
        RecomputedAttention {
            chunk: HEAD_CHUNK,
            scale: self.scale,
        }
    }

    /// Materialises the probabilities, shows them to the controller and continues with what it
    /// returns. The softmax is differentiable, so a controller may keep them in the graph.
    fn controlled(
        &self,
        x: &Tensor,
        context: &Tensor,
        spatial: (usize, usize),
        control: &mut dyn AttentionControl,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x, context)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let probs = grad_ops::softmax_last_dim(&scores)?;
        let site = AttentionSite {
            layer: &self.name,
            kind: self.kind,
            spatial,
            heads: self.heads,
        };
        let probs = control.attention(&site, probs)?;
        merge_heads(&probs.matmul(&v)?, self.heads)
    }

    /// Self-attention inside a graph: keeps only `x`, recomputes everything in the backward.
    fn recomputed(&self, x: &Tensor) -> Result<Tensor> {
        let x_detached = x.detach();
        let (q, k, v) = self.project(&x_detached, &x_detached)?;
        let out = merge_heads(&self.fast().attend(&q, &k, &v)?, self.heads)?;
        let w_qkv = [
            self.to_q.weight()?,
            self.to_k.weight()?,
            self.to_v.weight()?,
        ];
        let (heads, attention) = (self.heads, self.fast());
        with_vjp("self_attention", x, out, move |x, _, g| {
            let dt = compute_dtype(x.dtype());
            let x32 = x.to_dtype(dt)?;
            let w32: Vec<Tensor> = w_qkv
                .iter()
                .map(|w| w.to_dtype(dt))
                .collect::<Result<_>>()?;
            let proj = |w: &Tensor| split_heads(&x32.broadcast_matmul(&w.t()?)?, heads);
            let (q, k, v) = (proj(&w32[0])?, proj(&w32[1])?, proj(&w32[2])?);
            let g = split_heads(&g.to_dtype(dt)?, heads)?;
            let (dq, dk, dv) = attention.backward(&q, &k, &v, &g)?;
            let back = |d: &Tensor, w: &Tensor| merge_heads(d, heads)?.broadcast_matmul(w);
            let dx = ((back(&dq, &w32[0])? + back(&dk, &w32[1])?)? + back(&dv, &w32[2])?)?;
            dx.to_dtype(x.dtype())
        })
    }
}

impl Attention {
    /// [`Self::recomputed`] on the CPU kernels, with the heads never split off by copying. It
    /// keeps the projections `q`, `k`, `v` (three times the size of `x`, where recomputing them
    /// took a quarter of the backward) and recomputes only the probabilities.
    fn recomputed_cpu(&self, x: &Tensor) -> Result<Tensor> {
        let x_detached = x.detach();
        let (q, k, v) = project_with(self, &x_detached)?;
        let out =
            cpu::attention::attend_tensors(&q, &k, &v, self.heads, self.scale, self.products)?;
        let this = self.clone();
        with_vjp("self_attention", x, out, move |x, _, g| {
            let (dq, dk, dv) = this.cpu_backward(&q, &k, &v, g)?;
            let back = |d: Vec<f32>, layer: &Linear| layer.input_grad(&cpu::tensor(d, x.shape())?);
            (back(dq, &this.to_q)? + back(dk, &this.to_k)?)? + back(dv, &this.to_v)?
        })
    }

    /// Cross-attention inside a graph that the context is outside of, on the CPU kernels: `x`
    /// reaches the output through the queries only. The node keeps the queries, keys and values,
    /// as [`Self::recomputed_cpu`] does.
    fn cross_in_graph_cpu(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(&x.detach())?;
        let (k, v) = (self.to_k.forward(context)?, self.to_v.forward(context)?);
        let out =
            cpu::attention::attend_tensors(&q, &k, &v, self.heads, self.scale, self.products)?;
        let this = self.clone();
        with_vjp("cross_attention", x, out, move |x, _, g| {
            let (dq, _, _) = this.cpu_backward(&q, &k, &v, g)?;
            this.to_q.input_grad(&cpu::tensor(dq, x.shape())?)
        })
    }

    /// `(∂L/∂q, ∂L/∂k, ∂L/∂v)` of the CPU attention, given `∂L/∂out` (`g`).
    fn cpu_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let shape = AttentionShape::of(q, k, self.heads)?;
        let (scale, products) = (self.scale as f32, self.products);
        cpu::with_f32(q, |q| {
            cpu::with_f32(k, |k| {
                cpu::with_f32(v, |v| {
                    cpu::with_f32(g, |g| {
                        cpu::attention::attend_backward_in(products, q, k, v, g, shape, scale)
                    })
                })
            })
        })???
    }
}

/// `(q, k, v)` of self-attention on `x`, projected by `attention`'s layers, outside any graph.
fn project_with(attention: &Attention, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        attention.to_q.forward(x)?,
        attention.to_k.forward(x)?,
        attention.to_v.forward(x)?,
    ))
}

/// Tokens the CPU feed-forward takes at a time.
const FF_TOKENS: usize = 256;

/// `(start, len)` of each block of [`FF_TOKENS`] tokens among `n`.
fn token_blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(FF_TOKENS)
        .map(move |start| (start, FF_TOKENS.min(n - start)))
}

/// GEGLU feed-forward: `Linear(d → 2·4d)`, `a·gelu(b)`, `Linear(4d → d)`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn load(vb: WeightSource, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: Linear::load(vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            proj_out: Linear::load(vb.pp("net.2"), inner, dim, true)?,
        })
    }
}

impl FeedForward {
    /// On the CPU: the GEGLU in one pass, [`FF_TOKENS`] tokens at a time, so that outside a
    /// graph the hidden rows (8× as wide as `x`) fit in a few megabytes that the allocator hands
    /// back for the next block. Inside a graph it is one node that keeps each block's hidden rows
    /// for the backward: recomputing them there took 40 % of the backward's products, and
    /// keeping them costs about 340 MB in a 512² guidance gradient.
    fn forward_cpu(&self, x: &Tensor) -> Result<Tensor> {
        let kept_for_backward = x.track_op();
        let (detached, mut outputs, mut hidden) = (x.detach(), vec![], vec![]);
        for (start, len) in token_blocks(x.dim(1)?) {
            let (h, u) = self.hidden(&detached.narrow(1, start, len)?)?;
            outputs.push(self.proj_out.forward(&u)?);
            if kept_for_backward {
                hidden.push(h);
            }
        }
        let y = Tensor::cat(&outputs, 1)?;
        let this = self.clone();
        with_vjp("feed_forward", x, y, move |_, _, g| {
            let mut dx = Vec::with_capacity(hidden.len());
            for (h, (start, len)) in hidden.iter().zip(token_blocks(g.dim(1)?)) {
                let d_u = this.proj_out.input_grad(&g.narrow(1, start, len)?)?;
                let inner = d_u.dim(D::Minus1)?;
                let dh = cpu::with_f32(h, |h| {
                    cpu::with_f32(&d_u, |d| cpu::geglu::backward(h, d, inner))
                })??;
                dx.push(this.proj_in.input_grad(&cpu::tensor(dh, h.shape())?)?);
            }
            Tensor::cat(&dx, 1)
        })
    }

    /// The hidden rows `[a, gate]` of `x` and their GEGLU.
    fn hidden(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.proj_in.forward(x)?;
        let inner = h.dim(D::Minus1)? / 2;
        let mut dims = h.dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = inner;
        let u = cpu::with_f32(&h, |h| cpu::geglu::forward(h, inner))?;
        Ok((h, cpu::tensor(u, dims)?))
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if cpu::handles(x) {
            return self.forward_cpu(x);
        }
        let h = self.proj_in.forward(x)?;
        let half = h.dim(D::Minus1)? / 2;
        let (a, gate) = (
            h.narrow(D::Minus1, 0, half)?,
            h.narrow(D::Minus1, half, half)?,
        );
        self.proj_out.forward(&(a * gate.gelu_erf()?)?)
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, feed-forward.
#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

/// Epsilon of the transformer blocks' layer norms.
const LAYER_NORM_EPS: f64 = 1e-5;
/// Epsilon of the spatial transformer's group norm.
const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;

impl TransformerBlock {
    fn load(
        vb: WeightSource,
        dim: usize,
        context_dim: usize,
        heads: usize,
        names: [String; 2],
    ) -> Result<Self> {
        let [self_name, cross_name] = names;
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, LAYER_NORM_EPS)?,
            attn1: Attention::load(
                vb.pp("attn1"),
                dim,
                dim,
                heads,
                AttentionKind::SelfAttention,
                self_name,
            )?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, LAYER_NORM_EPS)?,
            attn2: Attention::load(
                vb.pp("attn2"),
                dim,
                context_dim,
                heads,
                AttentionKind::CrossAttention,
                cross_name,
            )?,
            norm3: LayerNorm::load(vb.pp("norm3"), dim, LAYER_NORM_EPS)?,
            ff: FeedForward::load(vb.pp("ff"), dim)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        spatial: (usize, usize),
        control: &mut dyn AttentionControl,
    ) -> Result<Tensor> {
        let x = (self
            .attn1
            .forward(&self.norm1.forward(x)?, None, spatial, control)?
            + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context), spatial, control)?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// How a spatial transformer enters and leaves token space.
#[derive(Debug, Clone)]
enum Projection {
    /// 1×1 convolutions (SD 1.x).
    Conv(Conv2d),
    /// Linear layers on tokens (SD 2.x, `use_linear_projection`).
    Linear(Linear),
}

/// diffusers' `Transformer2DModel`: group norm, projection in, transformer blocks, projection
/// out, residual.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

/// The shape of a spatial transformer.
#[derive(Debug, Clone, Copy)]
pub struct TransformerShape {
    /// Channels in and out.
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of the text embeddings.
    pub context_dim: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Group-norm groups.
    pub groups: usize,
    /// Linear instead of 1×1-conv projections.
    pub linear_projection: bool,
}

impl SpatialTransformer {
    /// Loads the module; `name` is the layer-name prefix and index, e.g. `("down.1", 0)`.
    pub fn load(
        vb: WeightSource,
        s: TransformerShape,
        (prefix, index): (&str, usize),
    ) -> Result<Self> {
        let c = s.channels;
        let projection = |name: &str| -> Result<Projection> {
            Ok(if s.linear_projection {
                Projection::Linear(Linear::load(vb.pp(name), c, c, true)?)
            } else {
                Projection::Conv(Conv2d::load(vb.pp(name), c, c, 1, 0, 1)?)
            })
        };
        let blocks = (0..s.layers)
            .map(|k| {
                let n = index * s.layers + k;
                let names = [format!("{prefix}.attn1.{n}"), format!("{prefix}.attn2.{n}")];
                TransformerBlock::load(
                    vb.pp(format!("transformer_blocks.{k}")),
                    c,
                    s.context_dim,
                    s.heads,
                    names,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), s.groups, c, TRANSFORMER_GROUP_NORM_EPS)?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    /// The names of this module's cross-attention layers.
    pub fn cross_attention_names(&self) -> impl Iterator<Item = &str> {
        self.blocks.iter().map(|b| b.attn2.name())
    }

    /// `x`: `(b, c, h, w)`, `context`: `(b, 77, d)` → `(b, c, h, w)`.
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        control: &mut dyn AttentionControl,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let to_image = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        let normed = self.norm.forward(x)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, (h, w), control)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?.contiguous()?)?,
            Projection::Linear(linear) => to_image(&linear.forward(&tokens)?)?,
        };
        out + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::test_support::{random, values};
    use candle_core::{DType, Device, Var};
    use candle_nn::VarBuilder;

    /// `∂L/∂x` through one attention layer given no controller, against the same layer with the
    /// controller's path (candle's ops and autograd, a differentiable softmax).
    fn gradient_matches_the_controllers_path(kind: AttentionKind) {
        let (query_dim, context_dim, heads, tokens) = (32, 24, 2, 20);
        let device = Device::Cpu;
        let mut seed = 0;
        let mut random = |shape: &[usize]| {
            seed += 1;
            (random(shape, seed) * 0.3).unwrap()
        };
        let keys_dim = match kind {
            AttentionKind::CrossAttention => context_dim,
            AttentionKind::SelfAttention => query_dim,
        };
        let weights = [
            ("to_q.weight", random(&[query_dim, query_dim])),
            ("to_k.weight", random(&[query_dim, keys_dim])),
            ("to_v.weight", random(&[query_dim, keys_dim])),
            ("to_out.0.weight", random(&[query_dim, query_dim])),
            ("to_out.0.bias", random(&[query_dim])),
        ];
        let vb = VarBuilder::from_tensors(
            weights
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect(),
            DType::F32,
            &device,
        );
        let layer =
            Attention::load(vb.into(), query_dim, keys_dim, heads, kind, "a".into()).unwrap();
        let x = Var::from_tensor(&random(&[1, tokens, query_dim])).unwrap();
        let context = random(&[1, 7, context_dim]);
        let weight_of_output = random(&[1, tokens, query_dim]);
        let gradient = |out: Tensor| {
            let loss = (out * &weight_of_output).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            values(grads.get(x.as_tensor()).expect("a gradient reaches x"))
        };
        let spatial = (4, 5);
        let fast = layer
            .forward(x.as_tensor(), Some(&context), spatial, &mut PassThrough)
            .unwrap();
        let context = match kind {
            AttentionKind::CrossAttention => &context,
            AttentionKind::SelfAttention => x.as_tensor(),
        };
        let reference = layer
            .controlled(x.as_tensor(), context, spatial, &mut PassThrough)
            .and_then(|out| layer.to_out.forward(&out))
            .unwrap();
        let (fast, reference) = (gradient(fast), gradient(reference));
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in fast.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 1e-5 * scale, "{kind:?} x[{i}]: {a} vs {b}");
        }
    }

    #[test]
    fn cross_attention_passes_the_gradient_to_its_queries() {
        gradient_matches_the_controllers_path(AttentionKind::CrossAttention);
    }

    #[test]
    fn self_attention_recomputed_matches_the_controllers_path() {
        gradient_matches_the_controllers_path(AttentionKind::SelfAttention);
    }
}
