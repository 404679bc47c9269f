//! The convolutional pieces of the UNet and the VAE: the resnet block and the two resamplers.
//!
//! They are ours rather than candle-transformers' so that their convolutions and norms are the
//! latent-only-gradient ops of [`crate::engine::grad_ops`] (and run on its CPU kernels); the
//! weight names follow diffusers.

use crate::engine::weights::WeightSource;
use candle_core::{Module, Result, Tensor};

use crate::engine::grad_ops::{self, Conv2d, GroupNorm, Linear};

/// diffusers' `ResnetBlock2D` with SiLU, and a timestep embedding in the UNet.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale: f64,
}

/// What a resnet block needs to know besides its weights.
#[derive(Debug, Clone, Copy)]
pub struct ResnetShape {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Width of the timestep embedding (the UNet's blocks; the VAE's have none).
    pub temb: Option<usize>,
    /// Group-norm groups.
    pub groups: usize,
    /// Group-norm epsilon.
    pub eps: f64,
    /// The output is divided by this (the mid block's `mid_block_scale_factor`).
    pub output_scale: f64,
}

impl ResnetBlock {
    /// Loads the block from `vb` (`norm1`, `conv1`, `time_emb_proj` with a timestep embedding,
    /// `norm2`, `conv2`, and `conv_shortcut` when the channel count changes).
    pub fn load(vb: WeightSource, s: ResnetShape) -> Result<Self> {
        let conv_shortcut = if s.c_in != s.c_out {
            Some(Conv2d::load(
                vb.pp("conv_shortcut"),
                s.c_in,
                s.c_out,
                1,
                0,
                1,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(vb.pp("norm1"), s.groups, s.c_in, s.eps)?,
            conv1: Conv2d::load(vb.pp("conv1"), s.c_in, s.c_out, 3, 1, 1)?,
            time_emb_proj: s
                .temb
                .map(|temb| Linear::load(vb.pp("time_emb_proj"), temb, s.c_out, true))
                .transpose()?,
            norm2: GroupNorm::load(vb.pp("norm2"), s.groups, s.c_out, s.eps)?,
            conv2: Conv2d::load(vb.pp("conv2"), s.c_out, s.c_out, 3, 1, 1)?,
            conv_shortcut,
            output_scale: s.output_scale,
        })
    }

    /// `x`: `(b, c_in, h, w)`, `temb`: `(b, temb)` (in the UNet) → `(b, c_out, h, w)`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&candle_nn::ops::silu(temb)?)?),
            (None, None) => None,
            _ => candle_core::bail!("resnet block: a timestep embedding is needed exactly when the block has time_emb_proj"),
        };
        let h = self.norm1.then_conv(&self.conv1, x, t.as_ref())?;
        let h = self.norm2.then_conv(&self.conv2, &h, None)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale
        }
    }
}

/// A stride-2 3×3 convolution that halves the spatial size.
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
    padding: usize,
}

impl Downsample {
    /// Loads `conv` from `vb` (diffusers' `downsamplers.0`).
    pub fn load(vb: WeightSource, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(vb.pp("conv"), channels, channels, 3, padding, 2)?,
            padding,
        })
    }
}

impl Module for Downsample {
    /// Without padding, the input gets one zero row and column at the bottom and right first,
    /// as diffusers' `Downsample2D` does (the VAE encoder's layout).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour ×2 up-sampling (or to a given size) followed by a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// Loads `conv` from `vb` (diffusers' `upsamplers.0`).
    pub fn load(vb: WeightSource, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// Up-samples `x` to twice its size.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.forward_to(x, (2 * h, 2 * w))
    }

    /// Up-samples `x` to `(h, w)`.
    pub fn forward_to(&self, x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        self.conv.forward(&grad_ops::upsample_nearest2d(x, (h, w))?)
    }
}
