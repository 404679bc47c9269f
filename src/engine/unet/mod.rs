//! Our Stable Diffusion UNet (diffusers' `UNet2DConditionModel`), built so that every attention
//! layer reports to an [`AttentionControl`](crate::engine::control::AttentionControl).
//!
//! candle-transformers' UNet keeps its children private and computes attention probabilities in
//! a local variable, so the skeleton, the blocks and the attention are ours. The weights load from
//! diffusers' safetensors unchanged.

mod attention;
pub mod resnet;

use crate::engine::weights::WeightSource;
use candle_core::{DType, Module, Result, Tensor};

use attention::{SpatialTransformer, TransformerShape};
use resnet::{Downsample, ResnetBlock, ResnetShape, Upsample};

use super::config::UNetConfig;
use super::control::{AttentionControl, AttentionKind, PassThrough};
use super::grad_ops::{Conv2d, GroupNorm, Linear};

/// One attention layer as `p2pz info` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionLayerInfo {
    /// The stable name the controller sees.
    pub name: String,
    /// Self- or cross-attention.
    pub kind: AttentionKind,
    /// Spatial size of the queries for the latent size asked about.
    pub spatial: (usize, usize),
    /// Heads.
    pub heads: usize,
}

/// A down level: resnets (each followed by a spatial transformer when the level has attention)
/// and an optional down-sampler.
#[derive(Debug, Clone)]
struct DownLevel {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsample: Option<Downsample>,
}

/// An up level: resnets fed with skip connections, optional transformers, optional up-sampler.
#[derive(Debug, Clone)]
struct UpLevel {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsample: Option<Upsample>,
}

/// The mid block: resnet, spatial transformer, resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: SpatialTransformer,
    resnet_out: ResnetBlock,
}

/// Stable Diffusion's noise-prediction network.
#[derive(Debug, Clone)]
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownLevel>,
    mid: MidBlock,
    up: Vec<UpLevel>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the UNet described by `config` from weights named as diffusers names them.
    pub fn load(vb: WeightSource, config: UNetConfig) -> Result<Self> {
        let levels = &config.levels;
        let n = levels.len();
        let c0 = levels[0].channels;
        let temb = 4 * c0;
        let resnet = |c_in, c_out| ResnetShape {
            c_in,
            c_out,
            temb: Some(temb),
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            output_scale: 1.0,
        };
        let transformer = |level: usize| TransformerShape {
            channels: levels[level].channels,
            heads: levels[level].heads,
            context_dim: config.cross_attention_dim,
            layers: levels[level].transformer_layers,
            groups: config.norm_num_groups,
            linear_projection: config.use_linear_projection,
        };

        let mut down = Vec::with_capacity(n);
        for (i, level) in levels.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let prefix = format!("down.{i}");
            let c_in = if i == 0 { c0 } else { levels[i - 1].channels };
            let mut resnets = vec![];
            let mut attentions = vec![];
            for j in 0..config.layers_per_block {
                let from = if j == 0 { c_in } else { level.channels };
                resnets.push(ResnetBlock::load(
                    vb.pp(format!("resnets.{j}")),
                    resnet(from, level.channels),
                )?);
                if level.attention {
                    attentions.push(SpatialTransformer::load(
                        vb.pp(format!("attentions.{j}")),
                        transformer(i),
                        (&prefix, j),
                    )?);
                }
            }
            let downsample = if i + 1 < n {
                Some(Downsample::load(
                    vb.pp("downsamplers.0"),
                    level.channels,
                    config.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownLevel {
                resnets,
                attentions,
                downsample,
            });
        }

        let c_last = levels[n - 1].channels;
        let vb_mid = vb.pp("mid_block");
        let mid_resnet = ResnetShape {
            output_scale: config.mid_block_scale_factor,
            ..resnet(c_last, c_last)
        };
        let mid = MidBlock {
            resnet_in: ResnetBlock::load(vb_mid.pp("resnets.0"), mid_resnet)?,
            attention: SpatialTransformer::load(
                vb_mid.pp("attentions.0"),
                transformer(n - 1),
                ("mid", 0),
            )?,
            resnet_out: ResnetBlock::load(vb_mid.pp("resnets.1"), mid_resnet)?,
        };

        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let level = n - 1 - i;
            let vb = vb.pp(format!("up_blocks.{i}"));
            let prefix = format!("up.{i}");
            let c_out = levels[level].channels;
            let c_prev = if i == 0 {
                c_last
            } else {
                levels[level + 1].channels
            };
            let c_skip_last = levels[level.saturating_sub(1)].channels;
            let mut resnets = vec![];
            let mut attentions = vec![];
            for j in 0..=config.layers_per_block {
                let skip = if j == config.layers_per_block {
                    c_skip_last
                } else {
                    c_out
                };
                let from = if j == 0 { c_prev } else { c_out };
                resnets.push(ResnetBlock::load(
                    vb.pp(format!("resnets.{j}")),
                    resnet(from + skip, c_out),
                )?);
                if levels[level].attention {
                    attentions.push(SpatialTransformer::load(
                        vb.pp(format!("attentions.{j}")),
                        transformer(level),
                        (&prefix, j),
                    )?);
                }
            }
            let upsample = if i + 1 < n {
                Some(Upsample::load(vb.pp("upsamplers.0"), c_out)?)
            } else {
                None
            };
            up.push(UpLevel {
                resnets,
                attentions,
                upsample,
            });
        }

        Ok(Self {
            conv_in: Conv2d::load(vb.pp("conv_in"), config.in_channels, c0, 3, 1, 1)?,
            time_linear_1: Linear::load(vb.pp("time_embedding.linear_1"), c0, temb, true)?,
            time_linear_2: Linear::load(vb.pp("time_embedding.linear_2"), temb, temb, true)?,
            down,
            mid,
            up,
            conv_norm_out: GroupNorm::load(
                vb.pp("conv_norm_out"),
                config.norm_num_groups,
                c0,
                config.norm_eps,
            )?,
            conv_out: Conv2d::load(vb.pp("conv_out"), c0, config.out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Every attention layer in call order, with its query size for a `latent` of `(h, w)`.
    pub fn attention_layers(&self, (h, w): (usize, usize)) -> Vec<AttentionLayerInfo> {
        let n = self.config.levels.len();
        let at = |level: usize| (h >> level, w >> level);
        let mut out = vec![];
        let mut push = |t: &SpatialTransformer, level: usize| {
            for cross in t.cross_attention_names() {
                let heads = self.config.levels[level].heads;
                let own = cross.replacen(".attn2.", ".attn1.", 1);
                out.push(AttentionLayerInfo {
                    name: own,
                    kind: AttentionKind::SelfAttention,
                    spatial: at(level),
                    heads,
                });
                out.push(AttentionLayerInfo {
                    name: cross.to_string(),
                    kind: AttentionKind::CrossAttention,
                    spatial: at(level),
                    heads,
                });
            }
        };
        for (i, level) in self.down.iter().enumerate() {
            level.attentions.iter().for_each(|t| push(t, i));
        }
        push(&self.mid.attention, n - 1);
        for (i, level) in self.up.iter().enumerate() {
            level.attentions.iter().for_each(|t| push(t, n - 1 - i));
        }
        out
    }

    /// The sinusoidal timestep features (diffusers' `Timesteps`), `(b, c0)` in f32.
    fn time_features(&self, t: f64, batch: usize, device: &candle_core::Device) -> Result<Tensor> {
        let half = self.config.levels[0].channels / 2;
        let denom = half as f64 - self.config.freq_shift;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f64.ln()) * i as f64 / denom).exp() as f32)
            .collect();
        let args = (Tensor::new(freqs, device)? * t)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let features = if self.config.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 0)?
        } else {
            Tensor::cat(&[sin, cos], 0)?
        };
        features.unsqueeze(0)?.repeat((batch, 1))
    }

    /// Predicts the noise (or v, or x₀, as the scheduler config says).
    ///
    /// `x`: `(b, 4, h, w)` latents with `h`, `w` multiples of
    /// [`UNetConfig::downsample_factor`]; `t`: the timestep; `context`: `(b, 77, d)` text
    /// embeddings. Returns `(b, 4, h, w)`. With `control: None` every layer takes its fastest
    /// path; a controller sees the layers it [wants](crate::engine::control::AttentionControl::wants).
    pub fn forward(
        &self,
        x: &Tensor,
        t: f64,
        context: &Tensor,
        control: Option<&mut dyn AttentionControl>,
    ) -> Result<Tensor> {
        let mut pass = PassThrough;
        let control: &mut dyn AttentionControl = match control {
            Some(control) => control,
            None => &mut pass,
        };
        let (b, _, h, w) = x.dims4()?;
        let factor = self.config.downsample_factor();
        if h % factor != 0 || w % factor != 0 {
            candle_core::bail!("latent {h}x{w} is not a multiple of {factor}: use image sides that are multiples of {}", factor * 8)
        }
        if context.dim(0)? != b {
            candle_core::bail!("latent batch {b} and text batch {} differ", context.dim(0)?)
        }
        let dtype = x.dtype();
        let temb = self.time_features(t, b, x.device())?.to_dtype(dtype)?;
        let temb = self
            .time_linear_2
            .forward(&candle_nn::ops::silu(&self.time_linear_1.forward(&temb)?)?)?;
        let context = context.to_dtype(dtype)?;
        let x = if self.config.center_input_sample {
            ((x * 2.0)? - 1.0)?
        } else {
            x.clone()
        };

        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for level in &self.down {
            for (j, resnet) in level.resnets.iter().enumerate() {
                h = resnet.forward(&h, Some(&temb))?;
                if let Some(t) = level.attentions.get(j) {
                    h = t.forward(&h, &context, control)?;
                }
                skips.push(h.clone());
            }
            if let Some(down) = &level.downsample {
                h = down.forward(&h)?;
                skips.push(h.clone());
            }
        }

        h = self.mid.resnet_in.forward(&h, Some(&temb))?;
        h = self.mid.attention.forward(&h, &context, control)?;
        h = self.mid.resnet_out.forward(&h, Some(&temb))?;

        for level in &self.up {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, Some(&temb))?;
                if let Some(t) = level.attentions.get(j) {
                    h = t.forward(&h, &context, control)?;
                }
            }
            if let Some(up) = &level.upsample {
                let (_, _, sh, sw) = skips.last().expect("skips remain below the top").dims4()?;
                h = up.forward_to(&h, (sh, sw))?;
            }
        }

        self.conv_norm_out.then_conv(&self.conv_out, &h, None)
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.conv_in.dtype()
    }
}
