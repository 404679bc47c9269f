//! The VAE: images in `[-1, 1]` ↔ latents scaled by the config's `scaling_factor` (0.18215).
//!
//! The encoder and decoder are ours ([`blocks`]), on the layers the UNet uses: candle's
//! `AutoEncoderKL` keeps the posterior mean private and samples it with the unseedable CPU
//! generator (pix2pix-zero wants the mean by default and a seeded sample as an option), and its
//! blocks would not run on our CPU kernels.

mod blocks;

use crate::engine::weights::WeightSource;
use candle_core::{Module, Result, Tensor};

use super::config::VaeConfig;
use super::grad_ops::{Conv2d, GroupNorm};
use super::rng::Rng;
use blocks::{DownBlock, MidBlock, UpBlock, VAE_NORM_EPS};

/// How an image becomes a latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LatentDraw {
    /// The posterior mean: deterministic (our default).
    Mean,
    /// `mean + σ·n` with `n` drawn from our generator with this seed (the authors' behaviour,
    /// made reproducible).
    Sample(u64),
}

/// The encoder's Gaussian posterior over latents (unscaled).
#[derive(Debug, Clone)]
pub struct Posterior {
    /// `(b, c, h/8, w/8)`.
    pub mean: Tensor,
    /// `(b, c, h/8, w/8)`, clamped to `[-30, 20]` as diffusers does.
    pub logvar: Tensor,
}

impl Posterior {
    /// The unscaled latent for `draw`.
    pub fn draw(&self, draw: LatentDraw) -> Result<Tensor> {
        match draw {
            LatentDraw::Mean => Ok(self.mean.clone()),
            LatentDraw::Sample(seed) => {
                let noise = Rng::new(seed).randn(
                    self.mean.shape(),
                    self.mean.dtype(),
                    self.mean.device(),
                )?;
                &self.mean + (self.logvar.clone() * 0.5)?.exp()?.mul(&noise)?
            }
        }
    }
}

fn conv3(vb: WeightSource, c_in: usize, c_out: usize) -> Result<Conv2d> {
    Conv2d::load(vb, c_in, c_out, 3, 1, 1)
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: WeightSource, c: &VaeConfig) -> Result<Self> {
        let chans = &c.block_out_channels;
        let down = (0..chans.len())
            .map(|i| {
                DownBlock::load(
                    vb.pp(format!("down_blocks.{i}")),
                    (chans[i.saturating_sub(1)], chans[i]),
                    c.layers_per_block,
                    c.norm_num_groups,
                    i + 1 < chans.len(),
                )
            })
            .collect::<Result<_>>()?;
        let last = *chans.last().expect("validated non-empty");
        Ok(Self {
            conv_in: conv3(vb.pp("conv_in"), c.in_channels, chans[0])?,
            down,
            mid: MidBlock::load(vb.pp("mid_block"), last, c.norm_num_groups)?,
            norm_out: GroupNorm::load(
                vb.pp("conv_norm_out"),
                c.norm_num_groups,
                last,
                VAE_NORM_EPS,
            )?,
            conv_out: conv3(vb.pp("conv_out"), last, 2 * c.latent_channels)?,
        })
    }

    /// The features after `conv_in` and after each of the first `blocks` down blocks.
    fn features(&self, x: &Tensor, blocks: usize) -> Result<Vec<Tensor>> {
        let mut features = vec![self.conv_in.forward(x)?];
        for block in self.down.iter().take(blocks) {
            let h = block.forward(features.last().expect("non-empty"))?;
            features.push(h);
        }
        Ok(features)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down {
            h = block.forward(&h)?;
        }
        self.norm_out
            .then_conv(&self.conv_out, &self.mid.forward(&h)?, None)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: WeightSource, c: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let up = (0..reversed.len())
            .map(|i| {
                UpBlock::load(
                    vb.pp(format!("up_blocks.{i}")),
                    (reversed[i.saturating_sub(1)], reversed[i]),
                    c.layers_per_block + 1,
                    c.norm_num_groups,
                    i + 1 < reversed.len(),
                )
            })
            .collect::<Result<_>>()?;
        let first = c.block_out_channels[0];
        Ok(Self {
            conv_in: conv3(vb.pp("conv_in"), c.latent_channels, reversed[0])?,
            mid: MidBlock::load(vb.pp("mid_block"), reversed[0], c.norm_num_groups)?,
            up,
            norm_out: GroupNorm::load(
                vb.pp("conv_norm_out"),
                c.norm_num_groups,
                first,
                VAE_NORM_EPS,
            )?,
            conv_out: conv3(vb.pp("conv_out"), first, c.out_channels)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for block in &self.up {
            h = block.forward(&h)?;
        }
        self.norm_out.then_conv(&self.conv_out, &h, None)
    }
}

/// The autoencoder of a Stable Diffusion model.
#[derive(Debug)]
pub struct Vae {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl Vae {
    /// Loads the VAE described by `config` from diffusers-named weights.
    pub fn load(vb: WeightSource, config: VaeConfig) -> Result<Self> {
        let lc = config.latent_channels;
        let one_by_one = |name: &str, c: usize| Conv2d::load(vb.pp(name), c, c, 1, 0, 1);
        Ok(Self {
            encoder: Encoder::load(vb.pp("encoder"), &config)?,
            decoder: Decoder::load(vb.pp("decoder"), &config)?,
            quant_conv: if config.use_quant_conv {
                Some(one_by_one("quant_conv", 2 * lc)?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(one_by_one("post_quant_conv", lc)?)
            } else {
                None
            },
            config,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The posterior for `image`: `(b, 3, h, w)` in `[-1, 1]`, `h` and `w` multiples of 8.
    pub fn posterior(&self, image: &Tensor) -> Result<Posterior> {
        let moments = self.encoder.forward(image)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments)?,
            None => moments,
        };
        let lc = self.config.latent_channels;
        Ok(Posterior {
            mean: moments.narrow(1, 0, lc)?,
            logvar: moments.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?,
        })
    }

    /// The encoder's features of `image` (in `[-1, 1]`) after its first convolution and each of
    /// its first `blocks` down blocks: what the distillation's perceptual loss compares.
    pub fn encoder_features(&self, image: &Tensor, blocks: usize) -> Result<Vec<Tensor>> {
        self.encoder.features(image, blocks)
    }

    /// `image` in `[-1, 1]` → latent `(b, 4, h/8, w/8)` scaled by `scaling_factor`.
    pub fn encode(&self, image: &Tensor, draw: LatentDraw) -> Result<Tensor> {
        self.posterior(image)?.draw(draw)? * self.config.scaling_factor
    }

    /// Scaled latent `(b, 4, h, w)` → image `(b, 3, 8h, 8w)`, roughly in `[-1, 1]` (not clamped).
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        let z = (latent / self.config.scaling_factor)?;
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(&z)?,
            None => z,
        };
        self.decoder.forward(&z)
    }
}
