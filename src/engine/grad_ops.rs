//! Layers whose backward pass computes only the gradient with respect to their input.
//!
//! pix2pix-zero differentiates a loss on cross-attention maps with respect to the latent `x_t`,
//! never with respect to the weights. candle's `matmul` and `conv2d` backward always computes the
//! gradient of both operands, and its fused softmax and layer norm silently cut the graph (see
//! `shared/docs/candle-notes.md`). Each op here therefore runs its forward on the fast, fused path
//! with the input detached, and attaches a hand-written vector-Jacobian product (VJP) that returns
//! the input gradient only, recomputing what is cheap to recompute instead of storing it.
//!
//! Every function falls back to the plain forward when its input does not take part in a graph
//! (`!x.track_op()`), so inference pays nothing for the seam.
//!
//! This module does not know about UNets or attention controllers; it only offers differentiable
//! building blocks.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Layout, MetalStorage, Module, Result, Shape,
    Storage, Tensor, D,
};

use super::cpu::{
    self, conv::Nchw, conv::PackedConv, linear::LinearShape, linear_amx::TileLinear,
    norm::GroupNormParams, Products,
};
use super::kernel_cache::{CachedKernel, KernelForm};
use super::weights::{F32Values, WeightSource};

/// The backward of one [`with_vjp`] node: `(input, output, output gradient) -> input gradient`.
type Vjp = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// A graph node whose forward result was computed beforehand and whose backward is a closure.
struct VjpNode {
    name: &'static str,
    /// The precomputed output, handed over (once) when candle runs the forward.
    output: Mutex<Option<Tensor>>,
    vjp: Box<Vjp>,
}

impl VjpNode {
    /// Takes the precomputed output; candle calls the forward exactly once per node.
    fn take_output(&self) -> Result<Tensor> {
        self.output
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned vjp node".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }
}

/// Returns a tensor whose storage is a fresh, contiguous copy with no offset.
fn standalone(t: Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t)
    } else {
        t.contiguous()?.copy()
    }
}

impl CustomOp1 for VjpNode {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = standalone(self.take_output()?)?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: output is not on the cpu", self.name),
        }
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = standalone(self.take_output()?)?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: output is not on the cuda device", self.name),
        }
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        let out = standalone(self.take_output()?)?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Metal(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: output is not on the metal device", self.name),
        }
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        (self.vjp)(arg, res, grad_res).map(Some)
    }
}

/// Attaches `output = f(input)`, already computed without a graph, to the graph of `input`, with
/// `vjp(input, output, d_output) -> d_input` as its backward.
///
/// When `input` is not part of a graph, `output` is returned as it is.
pub fn with_vjp(
    name: &'static str,
    input: &Tensor,
    output: Tensor,
    vjp: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !input.track_op() {
        return Ok(output);
    }
    input.apply_op1(VjpNode {
        name,
        output: Mutex::new(Some(output)),
        vjp: Box::new(vjp),
    })
}

/// A linear layer, `y = x·Wᵀ + b`, whose backward returns `∂L/∂x` only.
///
/// With bf16 products ([`cpu::products`]) f32 CPU weights are packed into AMX tiles instead.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    /// `(out_features,)`.
    bias: Option<Tensor>,
}

/// A linear layer's weight in the form its products want.
#[derive(Debug, Clone)]
enum LinearWeight {
    /// `(out_features, in_features)`, for candle's products.
    Tensor(Tensor),
    /// `(out_features, in_features)` f32 values for the CPU kernels: in place in the weights
    /// file, or in memory of their own when they came as a tensor.
    Cpu {
        values: Arc<F32Values>,
        out_features: usize,
        in_features: usize,
    },
    /// Packed for bf16 products.
    Tiles(Arc<TileLinear>),
}

impl LinearWeight {
    /// `(out_features, in_features)` f32 values in the form [`cpu::products`] wants: as they
    /// are for f32 products, packed into tiles (and the mapped pages let go) for bf16.
    fn for_cpu(values: F32Values, out_features: usize, in_features: usize) -> Self {
        match cpu::products() {
            Products::Bf16 => {
                let tiles = TileLinear::pack(&values, out_features, in_features);
                if let F32Values::Mapped(mapped) = values {
                    mapped.release();
                }
                Self::Tiles(Arc::new(tiles))
            }
            Products::F32 => Self::Cpu {
                values: Arc::new(values),
                out_features,
                in_features,
            },
        }
    }
}

impl Linear {
    /// Wraps weights laid out like PyTorch's `nn.Linear`. An f32 weight on the CPU is copied
    /// out for the CPU kernels, as a loaded one is used in place.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let cpu_values = match weight.dims2() {
            Ok(dims) if cpu::handles(&weight) => cpu::with_f32(&weight, <[f32]>::to_vec)
                .ok()
                .map(|values| (values, dims)),
            _ => None,
        };
        let weight = match cpu_values {
            Some((values, (out_features, in_features))) => {
                LinearWeight::for_cpu(F32Values::Owned(values), out_features, in_features)
            }
            None => LinearWeight::Tensor(weight),
        };
        Self { weight, bias }
    }

    /// The weight, `(out_features, in_features)` (a copy when the CPU kernels hold it).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Tensor(w) => Ok(w.clone()),
            LinearWeight::Cpu {
                values,
                out_features,
                in_features,
            } => cpu::tensor(values.to_vec(), (*out_features, *in_features)),
            LinearWeight::Tiles(t) => cpu::tensor(t.unpack(), (t.out_features(), t.in_features())),
        }
    }

    /// The tiles, when they run `x`.
    fn tiles_for(&self, x: &Tensor) -> Option<&TileLinear> {
        match &self.weight {
            LinearWeight::Tiles(t) if cpu::handles(x) => Some(t),
            _ => None,
        }
    }

    /// Loads `weight` (and `bias` when `with_bias`) from `vb`. For the CPU kernels in f32 the
    /// weight stays where it lies in a mapped file, and bf16 tiles are packed from there.
    pub fn load(
        vb: WeightSource,
        in_features: usize,
        out_features: usize,
        with_bias: bool,
    ) -> Result<Self> {
        let bias = if with_bias {
            Some(vb.get(out_features, "bias")?)
        } else {
            None
        };
        let Some(values) = vb.mapped_f32((out_features, in_features), "weight")? else {
            let weight = vb.get((out_features, in_features), "weight")?;
            return Ok(Self::new(weight, bias));
        };
        let weight = LinearWeight::for_cpu(F32Values::Mapped(values), out_features, in_features);
        Ok(Self { weight, bias })
    }

    /// The CPU kernels' weight and the sizes of its product with `t`, when they run `t` on it;
    /// `t`'s last dimension must be `features` (`in_features` forward, `out_features` backward).
    fn cpu_weight_for(
        &self,
        t: &Tensor,
        features: impl Fn(usize, usize) -> usize,
    ) -> Option<Result<(&[f32], LinearShape)>> {
        let LinearWeight::Cpu {
            values,
            out_features,
            in_features,
        } = &self.weight
        else {
            return None;
        };
        if !cpu::handles(t) {
            return None;
        }
        let wanted = features(*in_features, *out_features);
        let last = t.dims().last().copied().unwrap_or(0);
        if last != wanted {
            return Some(Err(candle_core::Error::Msg(format!(
                "linear: a tensor of shape {:?} where the layer wants {wanted} features last",
                t.dims()
            ))));
        }
        let shape = LinearShape {
            rows: t.elem_count() / wanted.max(1),
            in_features: *in_features,
            out_features: *out_features,
        };
        Some(Ok((values, shape)))
    }

    /// The bias as f32 values, for the CPU kernels.
    fn bias_values(&self) -> Result<Option<Vec<f32>>> {
        self.bias
            .as_ref()
            .map(|b| cpu::with_f32(b, <[f32]>::to_vec))
            .transpose()
    }

    fn plain(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(weight) = self.cpu_weight_for(x, |in_features, _| in_features) {
            let (values, shape) = weight?;
            let mut dims = x.dims().to_vec();
            *dims.last_mut().expect("rank ≥ 1") = shape.out_features;
            let bias = self.bias_values()?;
            let y = cpu::with_f32(x, |x| {
                cpu::linear::forward(x, values, bias.as_deref(), shape)
            })?;
            return cpu::tensor(y, dims);
        }
        if let Some(tiles) = self.tiles_for(x) {
            let mut dims = x.dims().to_vec();
            *dims.last_mut().expect("rank ≥ 1") = tiles.out_features();
            let bias = self.bias_values()?;
            let y = cpu::with_f32(x, |x| tiles.forward(x, bias.as_deref()))?;
            return cpu::tensor(y, dims);
        }
        let y = x.broadcast_matmul(&self.weight()?.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Linear {
    /// `∂L/∂x` given `∂L/∂y`: `g·W`.
    pub fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        if let Some(weight) = self.cpu_weight_for(g, |_, out_features| out_features) {
            let (values, shape) = weight?;
            let mut dims = g.dims().to_vec();
            *dims.last_mut().expect("rank ≥ 1") = shape.in_features;
            let dx = cpu::with_f32(g, |g| cpu::linear::input_grad(g, values, shape))?;
            return cpu::tensor(dx, dims);
        }
        if let Some(tiles) = self.tiles_for(g) {
            let mut dims = g.dims().to_vec();
            *dims.last_mut().expect("rank ≥ 1") = tiles.in_features();
            return cpu::tensor(cpu::with_f32(g, |g| tiles.input_grad(g))?, dims);
        }
        g.broadcast_matmul(&self.weight()?)
    }
}

impl Module for Linear {
    /// `x`: `(..., in_features)` → `(..., out_features)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.plain(&x.detach())?;
        let this = self.clone();
        with_vjp("linear", x, y, move |_, _, g| this.input_grad(g))
    }
}

/// A 2D convolution whose backward returns `∂L/∂x` only.
///
/// f32 weights on the CPU are packed once, here, for [`cpu::conv`]; everything else runs
/// candle's convolution.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weights: ConvWeights,
    /// `(c_out,)`.
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
}

/// A convolution's kernel in the layout its path wants.
#[derive(Debug, Clone)]
enum ConvWeights {
    /// PyTorch's `(c_out, c_in, k, k)`, for candle's convolution.
    Candle(Tensor),
    /// Packed tap by tap for the CPU kernel.
    Packed(Arc<PackedConv>),
}

/// The NCHW shape of a 4-D tensor.
fn nchw(t: &Tensor) -> Result<Nchw> {
    let (n, c, h, w) = t.dims4()?;
    Ok(Nchw { n, c, h, w })
}

/// The f32 CPU kernel of a convolution: a transformed kernel comes from `cached` when it holds
/// one for these weights (which are then never read), else `weight` reads them, the kernel is
/// prepared and stored there for the next load (a failure to store only costs that load its
/// speed-up).
fn f32_kernel(
    weight: impl FnOnce() -> Result<F32Values>,
    dims: (usize, usize, usize),
    padding: usize,
    stride: usize,
    cached: Option<&CachedKernel>,
) -> Result<PackedConv> {
    let (c_out, c_in, _) = dims;
    let on_kept =
        |kept| PackedConv::from_transformed(F32Values::Mapped(kept), (c_out, c_in), padding);
    let cached = cached.zip(PackedConv::transformed_len(dims, padding, stride));
    if let Some(kept) = cached.and_then(|(cache, len)| cache.load(len)) {
        return Ok(on_kept(kept));
    }
    let packed = PackedConv::from_pytorch(weight()?, dims, padding, stride);
    let stored = cached
        .zip(packed.transformed_kernel())
        .and_then(|((cache, _), transformed)| cache.store(transformed).ok());
    // Run on the page cache's copy, so this load's own copy goes back to the allocator.
    Ok(stored.map_or(packed, on_kept))
}

impl Conv2d {
    /// Loads a square-kernel convolution laid out like PyTorch's `nn.Conv2d`. For the CPU
    /// kernels in f32, a kernel that runs in that layout stays where it lies in a mapped file.
    pub fn load(
        vb: WeightSource,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let bias = Some(vb.get(c_out, "bias")?);
        let shape = (c_out, c_in, kernel, kernel);
        let weights = if vb.feeds_cpu_kernels() {
            // From the mapping where the file holds f32, else read (and converted) here.
            let mapped = vb.mapped_f32(shape, "weight")?;
            let weight = || match &mapped {
                Some(values) => Ok(F32Values::Mapped(values.clone())),
                None => cpu::with_f32(&vb.get(shape, "weight")?, |w| F32Values::Owned(w.to_vec())),
            };
            let dims = (c_out, c_in, kernel);
            let packed = match cpu::products() {
                Products::F32 => {
                    let cached = vb.cached_kernel("weight", KernelForm::Winograd);
                    f32_kernel(weight, dims, padding, stride, cached.as_ref())?
                }
                products => PackedConv::pack(&weight()?, c_out, c_in, kernel, products)
                    .with_geometry(padding, stride),
            };
            if let Some(values) = mapped.filter(|_| !packed.borrows_file()) {
                // Packed from the mapping: its pages are no longer needed.
                values.release();
            }
            ConvWeights::Packed(Arc::new(packed))
        } else {
            ConvWeights::Candle(vb.get(shape, "weight")?)
        };
        Ok(Self {
            weights,
            bias,
            padding,
            stride,
        })
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        match &self.weights {
            ConvWeights::Candle(w) => w.dtype(),
            ConvWeights::Packed(_) => DType::F32,
        }
    }

    /// The kernel in PyTorch's layout (a copy when it is packed).
    fn candle_weight(&self) -> Result<Tensor> {
        match &self.weights {
            ConvWeights::Candle(w) => Ok(w.clone()),
            ConvWeights::Packed(p) => {
                cpu::tensor(p.unpack(), (p.c_out, p.c_in, p.kernel, p.kernel))
            }
        }
    }

    fn plain(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.candle_weight()?, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }

    /// `conv2d(x) + bias + offset[n, c]`, where `offset` (`(n, c_out)`, outside any graph) is
    /// added in the convolution's last pass when the CPU kernel runs.
    pub fn forward_with_offset(&self, x: &Tensor, offset: Option<&Tensor>) -> Result<Tensor> {
        let packed = match &self.weights {
            ConvWeights::Packed(p) if cpu::handles(x) && offset.is_none_or(|o| !o.track_op()) => {
                p.clone()
            }
            _ => {
                let y = self.forward_candle(x)?;
                return match offset {
                    Some(o) => y.broadcast_add(&o.unsqueeze(2)?.unsqueeze(3)?),
                    None => Ok(y),
                };
            }
        };
        let shape = nchw(x)?;
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(DType::F32))
            .transpose()?;
        let offset = offset.map(|o| o.to_dtype(DType::F32)).transpose()?;
        let (y, out_shape) = cpu::with_f32(&x.detach(), |x| {
            let bias = bias
                .as_ref()
                .map(|b| cpu::with_f32(b, <[f32]>::to_vec))
                .transpose()?;
            let offset = offset
                .as_ref()
                .map(|o| cpu::with_f32(o, <[f32]>::to_vec))
                .transpose()?;
            Ok::<_, candle_core::Error>(packed.forward(
                x,
                shape,
                bias.as_deref(),
                offset.as_deref(),
            ))
        })??;
        let y = cpu::tensor(y, (out_shape.n, out_shape.c, out_shape.h, out_shape.w))?;
        with_vjp("conv2d", x, y, move |x, _, g| {
            let shape = nchw(x)?;
            let dx = cpu::with_f32(g, |g| packed.input_grad(g, shape))?;
            cpu::tensor(dx, x.shape())
        })
    }

    fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.plain(&x.detach())?;
        let (weight, padding, stride) = (self.candle_weight()?, self.padding, self.stride);
        with_vjp("conv2d", x, y, move |x, _, g| {
            conv2d_input_grad(&weight, padding, stride, x.dims4()?, g)
        })
    }
}

impl Module for Conv2d {
    /// `x`: `(b, c_in, h, w)` → `(b, c_out, h', w')`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_offset(x, None)
    }
}

/// `∂L/∂x` of `conv2d(x, weight, padding, stride)` given `∂L/∂y`.
fn conv2d_input_grad(
    weight: &Tensor,
    padding: usize,
    stride: usize,
    (_, _, h_in, w_in): (usize, usize, usize, usize),
    g: &Tensor,
) -> Result<Tensor> {
    let k = weight.dim(2)?;
    if stride == 1 && padding < k {
        // A stride-1 convolution's adjoint is the convolution with the flipped, transposed kernel;
        // candle's direct conv2d is much faster than its conv_transpose2d loop.
        let flipped = weight.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        return g.conv2d(&flipped, k - 1 - padding, 1, 1, 1);
    }
    let (_, _, h_out, w_out) = g.dims4()?;
    let natural_h = (h_out - 1) * stride + k - 2 * padding;
    let natural_w = (w_out - 1) * stride + k - 2 * padding;
    if h_in < natural_h || w_in < natural_w || h_in - natural_h != w_in - natural_w {
        candle_core::bail!("conv2d backward: unsupported shape {h_in}x{w_in} for stride {stride}")
    }
    g.conv_transpose2d(weight, padding, h_in - natural_h, stride, 1)
}

/// Nearest-neighbour up-sampling of NCHW `x` to `(h, w)`, whole multiples of its size in a
/// graph; the backward sums each block of the output gradient back onto its source pixel.
///
/// candle's own backward is a grouped convolution with a kernel of ones, which its CPU backend
/// runs as one convolution per channel, each working out its thread count anew (on Linux, by
/// parsing `/proc/cpuinfo`): 3200 convolutions per backward of SD-1.5's UNet.
pub fn upsample_nearest2d(x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let y = x.detach().upsample_nearest2d(h, w)?;
    with_vjp("upsample_nearest2d", x, y, |x, _, g| {
        let (n, c, h_in, w_in) = x.dims4()?;
        let (_, _, h, w) = g.dims4()?;
        if h % h_in != 0 || w % w_in != 0 {
            candle_core::bail!(
                "upsample_nearest2d: no gradient from {h_in}×{w_in} to {h}×{w}, which is not a \
                 whole multiple"
            )
        }
        g.reshape((n, c, h_in, h / h_in, w_in, w / w_in))?
            .sum(5)?
            .sum(3)
    })
}

/// Softmax over the last dimension: fused forward, `y ⊙ (g − Σ g⊙y)` backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    with_vjp("softmax", x, y, |_, y, g| {
        let inner = (g * y)?.sum_keepdim(D::Minus1)?;
        y * g.broadcast_sub(&inner)?
    })
}

/// Layer normalisation over the last dimension with an affine transform, exact backward.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of shape `(dim,)`.
    pub fn load(vb: WeightSource, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

/// The dtype that norms and attention compute in: f64 stays f64, everything else is upcast
/// to f32 (half-precision statistics and softmaxes lose too much).
pub fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `x̂ = (x − μ)/σ` over the last dimension, with `1/σ` kept for the backward.
fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(compute_dtype(x.dtype()))?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    Ok((centered.broadcast_mul(&inv_std)?, inv_std))
}

/// `∂L/∂x` of `x̂ = normalize(x)` given `∂L/∂x̂`, over the last dimension.
fn normalize_last_dim_grad(x_hat: &Tensor, inv_std: &Tensor, g_hat: &Tensor) -> Result<Tensor> {
    let mean_g = g_hat.mean_keepdim(D::Minus1)?;
    let mean_gx = (g_hat * x_hat)?.mean_keepdim(D::Minus1)?;
    let inner = (g_hat.broadcast_sub(&mean_g)? - x_hat.broadcast_mul(&mean_gx)?)?;
    inner.broadcast_mul(inv_std)
}

impl Module for LayerNorm {
    /// `x`: `(..., dim)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if x.dtype() == DType::F64 {
            // candle's fused kernel has no f64 version.
            normalize_last_dim(&x.detach(), self.eps)?
                .0
                .broadcast_mul(&self.weight)?
                .broadcast_add(&self.bias)?
        } else {
            candle_nn::ops::layer_norm(&x.detach(), &self.weight, &self.bias, self.eps as f32)?
        };
        let (weight, eps) = (self.weight.clone(), self.eps);
        with_vjp("layer_norm", x, y, move |x, _, g| {
            let (x_hat, inv_std) = normalize_last_dim(x, eps)?;
            let dt = x_hat.dtype();
            let g_hat = g.to_dtype(dt)?.broadcast_mul(&weight.to_dtype(dt)?)?;
            normalize_last_dim_grad(&x_hat, &inv_std, &g_hat)?.to_dtype(x.dtype())
        })
    }
}

/// Group normalisation of `(b, c, h, w)` tensors with a per-channel affine, exact backward.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` of shape `(channels,)`.
    pub fn load(vb: WeightSource, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if !channels.is_multiple_of(groups) {
            candle_core::bail!("group norm: {channels} channels do not split into {groups} groups")
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    /// `(b, c, h, w)` → `(b, groups, c/groups·h·w)`.
    fn grouped(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, _, _) = x.dims4()?;
        x.reshape((b, self.groups, ()))
    }

    fn per_channel(&self, t: &Tensor) -> Result<Tensor> {
        t.reshape((1, (), 1, 1))
    }
}

impl GroupNorm {
    /// `silu(group_norm(x))`, fused into one pass on the CPU.
    fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if cpu::handles(x) {
            self.forward_cpu(x, true)
        } else {
            candle_nn::ops::silu(&self.forward_candle(x)?)
        }
    }

    /// The parameters in the form the CPU kernel takes.
    fn cpu_params(&self, silu: bool) -> Result<GroupNormParams> {
        let f32_vec = |t: &Tensor| cpu::with_f32(&t.to_dtype(DType::F32)?, <[f32]>::to_vec);
        Ok(GroupNormParams {
            weight: f32_vec(&self.weight)?,
            bias: f32_vec(&self.bias)?,
            groups: self.groups,
            eps: self.eps as f32,
            silu,
        })
    }

    /// `conv(silu(norm(x))) + offset`, the opening of every resnet branch.
    ///
    /// Inside a graph on the CPU it is one node that keeps only `x`: a convolution's input
    /// gradient needs only its weights, so nothing in between is kept for the backward, where
    /// separate nodes would keep the normalised activation too (a resnet block then holds two
    /// activations for the backward instead of four).
    pub fn then_conv(&self, conv: &Conv2d, x: &Tensor, offset: Option<&Tensor>) -> Result<Tensor> {
        let packed = match &conv.weights {
            ConvWeights::Packed(p)
                if cpu::handles(x) && x.track_op() && offset.is_none_or(|o| !o.track_op()) =>
            {
                p.clone()
            }
            _ => return conv.forward_with_offset(&self.forward_silu(x)?, offset),
        };
        let params = self.cpu_params(true)?;
        let y = conv.forward_with_offset(&self.forward_silu(&x.detach())?, offset)?;
        with_vjp("group_norm_silu_conv2d", x, y, move |x, _, g| {
            let shape = nchw(x)?;
            let d_activation = cpu::with_f32(g, |g| packed.input_grad(g, shape))?;
            let dx = cpu::with_f32(x, |x| params.backward(x, &d_activation, shape))?;
            cpu::tensor(dx, x.shape())
        })
    }

    fn forward_cpu(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let params = self.cpu_params(silu)?;
        let shape = nchw(x)?;
        let y = cpu::with_f32(&x.detach(), |x| params.forward(x, shape))?;
        let y = cpu::tensor(y, x.shape())?;
        with_vjp("group_norm", x, y, move |x, _, g| {
            let shape = nchw(x)?;
            let dx = cpu::with_f32(x, |x| cpu::with_f32(g, |g| params.backward(x, g, shape)))??;
            cpu::tensor(dx, x.shape())
        })
    }

    fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let (x_hat, _) = normalize_last_dim(&self.grouped(&x.detach())?, self.eps)?;
        let y = x_hat
            .reshape(x.shape())?
            .to_dtype(dtype)?
            .broadcast_mul(&self.per_channel(&self.weight)?)?
            .broadcast_add(&self.per_channel(&self.bias)?)?;
        let this = self.clone();
        with_vjp("group_norm", x, y, move |x, _, g| {
            let (x_hat, inv_std) = normalize_last_dim(&this.grouped(x)?, this.eps)?;
            let dt = x_hat.dtype();
            let g_hat = g
                .to_dtype(dt)?
                .broadcast_mul(&this.per_channel(&this.weight.to_dtype(dt)?)?)?;
            let g_hat = this.grouped(&g_hat)?;
            normalize_last_dim_grad(&x_hat, &inv_std, &g_hat)?
                .reshape(x.shape())?
                .to_dtype(dtype)
        })
    }
}

impl Module for GroupNorm {
    /// `x`: `(b, c, h, w)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if cpu::handles(x) {
            self.forward_cpu(x, false)
        } else {
            self.forward_candle(x)
        }
    }
}

/// Scaled dot-product attention whose backward keeps only `q`, `k`, `v` and recomputes the
/// probabilities in chunks of heads: the `(heads, queries, keys)` probability tensor is never
/// stored, which is what makes a backward through 4096-token self-attention fit in memory.
///
/// `q`: `(bh, n, d)`, `k`, `v`: `(bh, m, d)`, all from one input `x` through `project`, which
/// maps `x` to `(q, k, v)` and is linear in each output, so its adjoint is `project_adjoint`.
pub struct RecomputedAttention {
    /// Heads handled together in the backward: bounds its memory to `chunk·n·m` floats.
    pub chunk: usize,
    /// `1/√d`.
    pub scale: f64,
}

impl RecomputedAttention {
    /// Forward without a graph: `softmax(q·kᵀ·scale)·v`, `(bh, n, d)`.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let bh = q.dim(0)?;
        let mut outs = Vec::with_capacity(bh.div_ceil(self.chunk));
        for start in (0..bh).step_by(self.chunk) {
            let len = self.chunk.min(bh - start);
            let (q, k, v) = (
                q.narrow(0, start, len)?,
                k.narrow(0, start, len)?,
                v.narrow(0, start, len)?,
            );
            let scores = (q.matmul(&k.t()?)? * self.scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            outs.push(probs.matmul(&v)?);
        }
        Tensor::cat(&outs, 0)
    }

    /// `(∂L/∂q, ∂L/∂k, ∂L/∂v)` given `∂L/∂out`, recomputing the probabilities chunk by chunk.
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let bh = q.dim(0)?;
        let (mut dq, mut dk, mut dv) = (vec![], vec![], vec![]);
        for start in (0..bh).step_by(self.chunk) {
            let len = self.chunk.min(bh - start);
            let (q, k, v, g) = (
                q.narrow(0, start, len)?,
                k.narrow(0, start, len)?,
                v.narrow(0, start, len)?,
                g.narrow(0, start, len)?,
            );
            let probs = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * self.scale)?)?;
            dv.push(probs.t()?.matmul(&g)?);
            let dp = g.matmul(&v.t()?)?;
            let inner = (&dp * &probs)?.sum_keepdim(D::Minus1)?;
            let ds = ((probs * dp.broadcast_sub(&inner)?)? * self.scale)?;
            dq.push(ds.matmul(&k)?);
            dk.push(ds.t()?.matmul(&q)?);
        }
        Ok((
            Tensor::cat(&dq, 0)?,
            Tensor::cat(&dk, 0)?,
            Tensor::cat(&dv, 0)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The input gradient of [`upsample_nearest2d`] is candle's own, for a square factor (the
    /// only kind candle differentiates), and a non-square one sums the blocks it spreads.
    #[test]
    fn upsample_gradient_sums_each_block() {
        let x = Var::randn(0f32, 1.0, (2, 3, 4, 5), &Device::Cpu).unwrap();
        let g = Tensor::randn(0f32, 1.0, (2, 3, 8, 10), &Device::Cpu).unwrap();
        let ours = (upsample_nearest2d(x.as_tensor(), (8, 10)).unwrap() * &g).unwrap();
        let candles = (x.as_tensor().upsample_nearest2d(8, 10).unwrap() * &g).unwrap();
        let ours = ours.sum_all().unwrap().backward().unwrap();
        let candles = candles.sum_all().unwrap().backward().unwrap();
        let (ours, candles) = (ours.get(&x).unwrap(), candles.get(&x).unwrap());
        let diff = (ours - candles).unwrap().abs().unwrap();
        let max: f32 = diff.max_all().unwrap().to_scalar().unwrap();
        assert!(max < 1e-6, "largest difference {max}");

        let y = upsample_nearest2d(x.as_tensor(), (4, 15)).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let dx: Vec<f32> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            dx.iter().all(|&v| v == 3.0),
            "each pixel spread to three: {dx:?}"
        );

        let odd = upsample_nearest2d(x.as_tensor(), (6, 5)).unwrap();
        let error = odd.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(error.contains("not a whole multiple"), "{error}");
    }
}
