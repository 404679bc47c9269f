//! The full-size SD-1.5 architecture with random weights built here: what `p2pz bench` times
//! and `p2pz doctor` takes one step of, with no download. The configs are the model's own JSON.

use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use pix2pix_zero::engine::config::{RawUNetConfig, UNetConfig, VaeConfig};
use pix2pix_zero::engine::rng::Rng;
use pix2pix_zero::engine::weights::WeightSource;

/// SD 1.5's `unet/config.json`.
pub fn sd15_unet() -> Result<UNetConfig> {
    let raw: RawUNetConfig = serde_json::from_value(serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "sample_size": 64
    }))?;
    Ok(UNetConfig::from_raw(&raw)?)
}

/// SD 1.5's `vae/config.json`.
pub fn sd15_vae() -> Result<VaeConfig> {
    Ok(serde_json::from_value(serde_json::json!({
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32
    }))?)
}

/// Random weights for any name and shape: uniform with variance `1/fan_in` for matrices and
/// kernels, ones for norm scales, zeros for biases. Deterministic per tensor name.
pub struct RandomWeights;

/// A weight source that makes [`RandomWeights`] in `dtype` on `device`.
pub fn random_weights(dtype: DType, device: &Device) -> WeightSource {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone()).into()
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        if dims.len() == 1 {
            let is_scale = name.ends_with("weight");
            return if is_scale {
                Tensor::ones(shape, dtype, dev)
            } else {
                Tensor::zeros(shape, dtype, dev)
            };
        }
        let fan_in: usize = dims[1..].iter().product();
        let bound = (3.0 / fan_in as f64).sqrt();
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = Rng::new(seed);
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
            .collect();
        Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
