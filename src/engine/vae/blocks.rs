//! The VAE's blocks, built from the UNet's resnet block and resamplers and the layers of
//! [`crate::engine::grad_ops`], so that the VAE runs on the same CPU kernels and its encoder
//! can be differentiated with respect to the image (the distillation's perceptual loss).
//! Weight names follow diffusers, in its current and its older attention naming.

use crate::engine::weights::WeightSource;
use candle_core::{Module, Result, Tensor};

use crate::engine::cpu;
use crate::engine::grad_ops::{self, GroupNorm, Linear, RecomputedAttention};
use crate::engine::unet::resnet::{Downsample, ResnetBlock, ResnetShape, Upsample};

/// Epsilon of every group norm in the VAE.
pub const VAE_NORM_EPS: f64 = 1e-6;

/// A VAE resnet block: no timestep embedding.
pub fn resnet(vb: WeightSource, c_in: usize, c_out: usize, groups: usize) -> Result<ResnetBlock> {
    ResnetBlock::load(
        vb,
        ResnetShape {
            c_in,
            c_out,
            temb: None,
            groups,
            eps: VAE_NORM_EPS,
            output_scale: 1.0,
        },
    )
}

/// `resnets.0` (`c_in` → `c_out`) to `resnets.{layers − 1}` (`c_out` → `c_out`).
fn resnets(
    vb: &WeightSource,
    (c_in, c_out): (usize, usize),
    layers: usize,
    groups: usize,
) -> Result<Vec<ResnetBlock>> {
    (0..layers)
        .map(|i| {
            let c = if i == 0 { c_in } else { c_out };
            resnet(vb.pp(format!("resnets.{i}")), c, c_out, groups)
        })
        .collect()
}

/// `x` through the resnets in turn.
fn through(resnets: &[ResnetBlock], x: &Tensor) -> Result<Tensor> {
    resnets
        .iter()
        .try_fold(x.clone(), |h, resnet| resnet.forward(&h, None))
}

/// diffusers' `DownEncoderBlock2D`: resnets, then a stride-2 convolution (except the last).
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Downsample>,
}

impl DownBlock {
    /// Loads `resnets.{i}` and `downsamplers.0`.
    pub fn load(
        vb: WeightSource,
        (c_in, c_out): (usize, usize),
        layers: usize,
        groups: usize,
        downsample: bool,
    ) -> Result<Self> {
        let resnets = resnets(&vb, (c_in, c_out), layers, groups)?;
        let downsample = if downsample {
            Some(Downsample::load(vb.pp("downsamplers.0"), c_out, 0)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            downsample,
        })
    }
}

impl Module for DownBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = through(&self.resnets, x)?;
        match &self.downsample {
            Some(down) => down.forward(&h),
            None => Ok(h),
        }
    }
}

/// diffusers' `UpDecoderBlock2D`: resnets, then ×2 nearest up-sampling and a convolution
/// (except the last).
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Upsample>,
}

impl UpBlock {
    /// Loads `resnets.{i}` and `upsamplers.0`.
    pub fn load(
        vb: WeightSource,
        (c_in, c_out): (usize, usize),
        layers: usize,
        groups: usize,
        upsample: bool,
    ) -> Result<Self> {
        let resnets = resnets(&vb, (c_in, c_out), layers, groups)?;
        let upsample = if upsample {
            Some(Upsample::load(vb.pp("upsamplers.0"), c_out)?)
        } else {
            None
        };
        Ok(Self { resnets, upsample })
    }
}

impl Module for UpBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = through(&self.resnets, x)?;
        match &self.upsample {
            Some(up) => up.forward(&h),
            None => Ok(h),
        }
    }
}

/// The mid block's single-head self-attention over all pixels, with a residual.
#[derive(Debug, Clone)]
struct PixelAttention {
    norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
    /// The precision of the CPU attention's products, chosen at load like the layers'.
    products: cpu::Products,
}

/// A `(c, c)` projection stored as a linear layer or as a 1×1 convolution (older files).
fn projection(vb: WeightSource, c: usize) -> Result<Linear> {
    let weight = match vb.get((c, c), "weight") {
        Ok(w) => w,
        Err(_) => vb.get((c, c, 1, 1), "weight")?.reshape((c, c))?,
    };
    Ok(Linear::new(weight, Some(vb.get(c, "bias")?)))
}

impl PixelAttention {
    fn load(vb: WeightSource, channels: usize, groups: usize) -> Result<Self> {
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        Ok(Self {
            norm: GroupNorm::load(vb.pp("group_norm"), groups, channels, VAE_NORM_EPS)?,
            to_q: projection(vb.pp(names[0]), channels)?,
            to_k: projection(vb.pp(names[1]), channels)?,
            to_v: projection(vb.pp(names[2]), channels)?,
            to_out: projection(vb.pp(names[3]), channels)?,
            scale: 1.0 / (channels as f64).sqrt(),
            products: cpu::products(),
        })
    }
}

impl Module for PixelAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k, v) = (
            self.to_q.forward(&tokens)?,
            self.to_k.forward(&tokens)?,
            self.to_v.forward(&tokens)?,
        );
        let attended = if cpu::handles(&q) && !q.track_op() {
            cpu::attention::attend_tensors(&q, &k, &v, 1, self.scale, self.products)?
        } else if q.track_op() {
            // Differentiable: the probabilities stay in the graph.
            let scores = (q.matmul(&k.t()?)? * self.scale)?;
            grad_ops::softmax_last_dim(&scores)?.matmul(&v)?
        } else {
            let up = |t: &Tensor| t.to_dtype(grad_ops::compute_dtype(t.dtype()));
            RecomputedAttention {
                chunk: 1,
                scale: self.scale,
            }
            .attend(&up(&q)?, &up(&k)?, &up(&v)?)?
            .to_dtype(q.dtype())?
        };
        let out = self
            .to_out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + x
    }
}

/// diffusers' `UNetMidBlock2D` of the VAE: resnet, attention, resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnet_in: ResnetBlock,
    attention: PixelAttention,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    /// Loads `resnets.0`, `attentions.0` and `resnets.1`.
    pub fn load(vb: WeightSource, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            resnet_in: resnet(vb.pp("resnets.0"), channels, channels, groups)?,
            attention: PixelAttention::load(vb.pp("attentions.0"), channels, groups)?,
            resnet_out: resnet(vb.pp("resnets.1"), channels, channels, groups)?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.resnet_in.forward(x, None)?;
        let h = self.attention.forward(&h)?;
        self.resnet_out.forward(&h, None)
    }
}
