//! The PatchGAN critic: a few strided convolutions that score each patch of an (input, output)
//! pair as real (the teacher's edit) or made (the generator's).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Init, VarBuilder};

/// Channels of the first layer by default.
pub const DEFAULT_WIDTH: usize = 32;

/// A conditional PatchGAN: three stride-2 4×4 convolutions and a 3×3 scoring layer, so each
/// score sees a patch of about 46 pixels.
#[derive(Debug, Clone)]
pub struct Discriminator {
    layers: Vec<Conv2d>,
    score: Conv2d,
}

/// A `kernel × kernel` convolution with He-initialised weights and a zero bias.
fn conv(vb: VarBuilder, c_in: usize, c_out: usize, stride: usize, kernel: usize) -> Result<Conv2d> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: (2.0 / (c_in * kernel * kernel) as f64).sqrt(),
    };
    let weight = vb.get_with_hints((c_out, c_in, kernel, kernel), "weight", init)?;
    let bias = vb.get_with_hints(c_out, "bias", Init::Const(0.0))?;
    let config = Conv2dConfig {
        padding: (kernel - 1) / 2,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, Some(bias), config))
}

fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    x.maximum(&(x * 0.2)?)
}

impl Discriminator {
    /// Builds it from `vb` with `width` channels in the first layer.
    pub fn new(vb: VarBuilder, width: usize) -> Result<Self> {
        let channels = [6, width, 2 * width, 4 * width];
        let layers = (0..3)
            .map(|i| {
                conv(
                    vb.pp(format!("layers.{i}")),
                    channels[i],
                    channels[i + 1],
                    2,
                    4,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            score: conv(vb.pp("score"), 4 * width, 1, 1, 3)?,
        })
    }

    /// Patch scores `(n, 1, h/8, w/8)` of `output` as an edit of `input`, both `(n, 3, h, w)`.
    pub fn forward(&self, input: &Tensor, output: &Tensor) -> Result<Tensor> {
        let mut x = Tensor::cat(&[input, output], 1)?;
        for layer in &self.layers {
            x = leaky_relu(&layer.forward(&x)?)?;
        }
        self.score.forward(&x)
    }
}
