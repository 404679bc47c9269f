//! The generator's losses: L1 to the teacher's edit, a perceptual distance in the features of
//! the Stable Diffusion VAE's encoder, and the hinge adversarial loss of the PatchGAN.

use candle_core::{Result, Tensor};

use crate::engine::vae::Vae;

/// Mean absolute difference.
pub fn l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.abs()?.mean_all()
}

/// The critic's hinge loss: real scores pushed above 1, made ones below −1.
pub fn discriminator_hinge(real: &Tensor, made: &Tensor) -> Result<Tensor> {
    let real = (1.0 - real)?.relu()?.mean_all()?;
    let made = (made + 1.0)?.relu()?.mean_all()?;
    real + made
}

/// The generator's hinge loss: raise the critic's scores of its images.
pub fn generator_hinge(made: &Tensor) -> Result<Tensor> {
    made.mean_all()?.neg()
}

/// A perceptual distance: L1 between the features of the VAE encoder's first layers, each
/// normalised per position over channels, as LPIPS does with VGG's.
pub struct Perceptual {
    vae: Vae,
    blocks: usize,
}

impl Perceptual {
    /// Compares the features after `conv_in` and the first `blocks` down blocks of `vae`.
    pub fn new(vae: Vae, blocks: usize) -> Self {
        Self { vae, blocks }
    }

    /// The distance between `images` and `targets` `(n, 3, h, w)` in `[-1, 1]`.
    pub fn distance(&self, images: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let made = self.vae.encoder_features(images, self.blocks)?;
        let wanted = self.vae.encoder_features(&targets.detach(), self.blocks)?;
        let mut total: Option<Tensor> = None;
        for (a, b) in made.iter().zip(&wanted) {
            let term = l1(&unit_channels(a)?, &unit_channels(&b.detach())?)?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        total.expect("at least conv_in's features") / made.len() as f64
    }
}

/// Each position's channel vector scaled to unit length.
fn unit_channels(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)? + 1e-10)?.sqrt()?;
    x.broadcast_div(&norm)
}
