//! The distilled generator: a small image-to-image network that makes one edit in one pass.
//!
//! A ResNet generator in the spirit of GAN Compression's mobile variant, made only of
//! depthwise-separable convolutions. The photo is folded into half-size planes (each 2×2 block
//! of pixels becomes 12 channels), so nothing runs at full size; two more folds go down to an
//! eighth; residual blocks work there; two nearest-neighbour upsamplings come back, each adding
//! the encoder's features of its size (U-Net-style skips that carry the photo's detail). The
//! last layer makes 12 channels that unfold into a full-size RGB change; it starts at zero and
//! the change is added to the input, so an untrained generator is the identity and training
//! learns only what the edit changes.
//!
//! With the default width of 24 it costs about 0.9 GMACs at 512² (see [`GeneratorConfig::macs`]).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::depthwise::depthwise3x3;

/// The architecture's name in generator files.
pub const ARCHITECTURE: &str = "p2pz-mobile-resnet-v1";
/// Image sides must be multiples of this (the fold and two stride-2 stages).
pub const STRIDE: usize = 8;

/// The generator's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneratorConfig {
    /// Channels at half size; twice that at a quarter and four times at an eighth.
    pub width: usize,
    /// Residual blocks at an eighth of the size.
    pub blocks: usize,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            width: 24,
            blocks: 6,
        }
    }
}

impl GeneratorConfig {
    /// Multiply-accumulates of one image of `width × height`.
    pub fn macs(&self, width: usize, height: usize) -> u64 {
        let half = (width * height) as u64 / 4;
        let (quarter, eighth) = (half / 4, half / 16);
        let c = self.width as u64;
        let separable = |pixels: u64, c_in: u64, c_out: u64| pixels * c_in * (9 + c_out);
        separable(half, 12, c)
            + separable(quarter, 4 * c, 2 * c)
            + separable(eighth, 8 * c, 4 * c)
            + self.blocks as u64 * 2 * separable(eighth, 4 * c, 4 * c)
            + separable(quarter, 4 * c, 2 * c)
            + separable(half, 2 * c, c)
            + separable(half, c, 12)
    }
}

/// A depthwise 3×3 convolution followed by a 1×1 convolution.
///
/// The depthwise kernels are stored as their difference from the identity kernel (a one in the
/// centre), which starts small: each layer starts by passing its input through nearly
/// unchanged instead of scrambling it spatially, and learns much faster for it.
#[derive(Debug, Clone)]
struct Separable {
    depthwise: Tensor,
    identity: Tensor,
    depthwise_bias: Tensor,
    pointwise: Tensor,
    pointwise_bias: Tensor,
}

impl Separable {
    /// He-initialised; with `zero_output` the pointwise weights start at zero, so a residual
    /// branch ending in it starts as nothing and activations do not grow with depth.
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, zero_output: bool) -> Result<Self> {
        let normal = |fan_in: usize| Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_in as f64).sqrt(),
        };
        let pointwise_init = if zero_output {
            Init::Const(0.0)
        } else {
            normal(c_in)
        };
        Ok(Self {
            depthwise: vb.get_with_hints(
                (c_in, 1, 3, 3),
                "depthwise.weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.1,
                },
            )?,
            identity: Tensor::new(&[0f32, 0., 0., 0., 1., 0., 0., 0., 0.], vb.device())?
                .reshape((1, 1, 3, 3))?,
            depthwise_bias: vb.get_with_hints(c_in, "depthwise.bias", Init::Const(0.0))?,
            pointwise: vb.get_with_hints((c_out, c_in), "pointwise.weight", pointwise_init)?,
            pointwise_bias: vb.get_with_hints(c_out, "pointwise.bias", Init::Const(0.0))?,
        })
    }
}

impl Module for Separable {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let kernel = self.depthwise.broadcast_add(&self.identity)?;
        let x =
            depthwise3x3(x, &kernel)?.broadcast_add(&self.depthwise_bias.reshape((1, c, 1, 1))?)?;
        let c_out = self.pointwise.dim(0)?;
        self.pointwise
            .broadcast_matmul(&x.reshape((n, c, h * w))?)?
            .broadcast_add(&self.pointwise_bias.reshape((1, c_out, 1))?)?
            .reshape((n, c_out, h, w))
    }
}

/// Two separable convolutions around a ReLU, added to the input.
#[derive(Debug, Clone)]
struct ResidualBlock {
    first: Separable,
    second: Separable,
}

impl Module for ResidualBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.first.forward(x)?.relu()?;
        x + self.second.forward(&h)?
    }
}

/// Nearest-neighbour 2× upsampling as a broadcast, whose gradient is a plain sum (candle's own
/// upsampling back-propagates through a grouped convolution, one channel at a time).
fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((n, c, 2 * h, 2 * w))
}

/// Folds each 2×2 block of pixels into channels: `(n, c, h, w)` → `(n, 4c, h/2, w/2)`.
fn fold(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h / 2, 2, w / 2, 2))?
        .permute((0, 1, 3, 5, 2, 4))?
        .contiguous()?
        .reshape((n, 4 * c, h / 2, w / 2))
}

/// The inverse of [`fold`]: `(n, 4c, h, w)` → `(n, c, 2h, 2w)`.
fn unfold(x: &Tensor) -> Result<Tensor> {
    let (n, c4, h, w) = x.dims4()?;
    let c = c4 / 4;
    x.reshape((n, c, 2, 2, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .contiguous()?
        .reshape((n, c, 2 * h, 2 * w))
}

/// The generator.
#[derive(Debug, Clone)]
pub struct Generator {
    config: GeneratorConfig,
    stem: Separable,
    down: [Separable; 2],
    blocks: Vec<ResidualBlock>,
    up: [Separable; 2],
    head: Separable,
}

impl Generator {
    /// Builds the generator from `vb`: a file's weights, or new seeded variables for training.
    pub fn new(vb: VarBuilder, config: GeneratorConfig) -> Result<Self> {
        let c = config.width;
        if c == 0 || config.blocks == 0 {
            candle_core::bail!("a generator needs a width and blocks, not {config:?}");
        }
        let blocks = (0..config.blocks)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok(ResidualBlock {
                    first: Separable::new(vb.pp("first"), 4 * c, 4 * c, false)?,
                    second: Separable::new(vb.pp("second"), 4 * c, 4 * c, true)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            stem: Separable::new(vb.pp("stem"), 12, c, false)?,
            down: [
                Separable::new(vb.pp("down.0"), 4 * c, 2 * c, false)?,
                Separable::new(vb.pp("down.1"), 8 * c, 4 * c, false)?,
            ],
            blocks,
            up: [
                Separable::new(vb.pp("up.0"), 4 * c, 2 * c, false)?,
                Separable::new(vb.pp("up.1"), 2 * c, c, false)?,
            ],
            head: Separable::new(vb.pp("head"), c, 12, true)?,
        })
    }

    /// Its size.
    pub fn config(&self) -> GeneratorConfig {
        self.config
    }

    /// Edits `images` `(n, 3, h, w)` in `[-1, 1]`; `h` and `w` must be multiples of [`STRIDE`].
    /// The result is not clamped (training needs the gradient beyond the range).
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        if h % STRIDE != 0 || w % STRIDE != 0 {
            candle_core::bail!(
                "the generator needs sides that are multiples of {STRIDE}, not {w}×{h}"
            );
        }
        let half = self.stem.forward(&fold(images)?)?.relu()?;
        let quarter = self.down[0].forward(&fold(&half)?)?.relu()?;
        let mut x = self.down[1].forward(&fold(&quarter)?)?.relu()?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let x = (self.up[0].forward(&upsample2(&x)?)?.relu()? + quarter)?;
        let x = (self.up[1].forward(&upsample2(&x)?)?.relu()? + half)?;
        images + unfold(&self.head.forward(&x)?)?
    }
}

/// The long side above which [`Generator::edit_photo`] works at a smaller size by default.
pub const MAX_APPLY_SIDE: usize = 1024;

impl Generator {
    /// Edits a photo at `long_side` (its own size when `None`) and returns it at its own size.
    /// Sides are padded by repeating the edge up to a multiple of [`STRIDE`] and cropped after.
    pub fn edit_photo(
        &self,
        photo: &image::RgbImage,
        long_side: Option<usize>,
        device: &candle_core::Device,
    ) -> Result<image::RgbImage> {
        let (w, h) = photo.dimensions();
        let scaled = match long_side {
            Some(side) if side != w.max(h) as usize => {
                let scale = side as f64 / w.max(h) as f64;
                let (sw, sh) = (
                    ((w as f64 * scale).round() as u32).max(1),
                    ((h as f64 * scale).round() as u32).max(1),
                );
                image::imageops::resize(photo, sw, sh, image::imageops::FilterType::Lanczos3)
            }
            _ => photo.clone(),
        };
        let (sw, sh) = scaled.dimensions();
        let pad = |v: u32| v.div_ceil(STRIDE as u32) * STRIDE as u32;
        let (pw, ph) = (pad(sw), pad(sh));
        let padded = image::RgbImage::from_fn(pw, ph, |x, y| {
            *scaled.get_pixel(x.min(sw - 1), y.min(sh - 1))
        });
        let input = Tensor::from_vec(padded.into_raw(), (ph as usize, pw as usize, 3), device)?
            .permute((2, 0, 1))?
            .to_dtype(candle_core::DType::F32)?
            .affine(1.0 / 127.5, -1.0)?
            .unsqueeze(0)?;
        let pixels: Vec<u8> = self
            .forward(&input)?
            .squeeze(0)?
            .clamp(-1f32, 1f32)?
            .affine(127.5, 127.5)?
            .round()?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| v as u8)
            .collect();
        let out = image::RgbImage::from_raw(pw, ph, pixels).expect("the generator keeps the size");
        let out = image::imageops::crop_imm(&out, 0, 0, sw, sh).to_image();
        Ok(if (sw, sh) == (w, h) {
            out
        } else {
            image::imageops::resize(&out, w, h, image::imageops::FilterType::Lanczos3)
        })
    }
}

/// PSNR in dB of images in `[-1, 1]` `(n, 3, h, w)` against `target`, over the whole batch.
pub fn psnr(images: &Tensor, target: &Tensor) -> Result<f64> {
    let images = images.clamp(-1f32, 1f32)?;
    let mse = (images - target)?
        .sqr()?
        .flatten_all()?
        .mean(D::Minus1)?
        .to_scalar::<f32>()? as f64
        / 4.0;
    Ok(10.0 * (1.0 / mse.max(1e-12)).log10())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::params::SeededParams;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn starts_as_the_identity_and_keeps_any_stride_multiple_size() {
        let vars = VarMap::new();
        let g = Generator::new(
            SeededParams::builder(&vars, 1, &Device::Cpu),
            GeneratorConfig::default(),
        )
        .unwrap();
        for (h, w) in [(8, 16), (40, 24)] {
            let x = crate::engine::rng::Rng::new(2)
                .randn((2, 3, h, w), DType::F32, &Device::Cpu)
                .unwrap();
            let y = g.forward(&x).unwrap();
            assert_eq!(y.dims(), x.dims());
            assert!(
                psnr(
                    &y.clamp(-1f32, 1f32).unwrap(),
                    &x.clamp(-1f32, 1f32).unwrap()
                )
                .unwrap()
                    > 100.0
            );
        }
        assert!(g
            .forward(&Tensor::zeros((1, 3, 10, 8), DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }

    #[test]
    fn folding_is_undone_and_upsampling_matches_candle() {
        let total_difference = |a: Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let x = crate::engine::rng::Rng::new(3)
            .randn((2, 3, 4, 5), DType::F32, &Device::Cpu)
            .unwrap();
        let candle_up = x.upsample_nearest2d(8, 10).unwrap();
        let folded = fold(&candle_up).unwrap();
        assert_eq!(folded.dims(), &[2, 12, 4, 5]);
        assert_eq!(total_difference(unfold(&folded).unwrap(), &candle_up), 0.0);
        assert_eq!(total_difference(upsample2(&x).unwrap(), &candle_up), 0.0);
    }

    #[test]
    fn the_default_is_well_under_five_gigamacs_at_512() {
        let macs = GeneratorConfig::default().macs(512, 512);
        assert!((0.5e9..5e9).contains(&(macs as f64)), "{macs}");
    }
}
