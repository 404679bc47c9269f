//! Stable Diffusion on candle, with an attention-control seam. Knows nothing about editing.
//!
//! [`StableDiffusion::load`] turns [`ModelFiles`] into the four components: the tokenizer and
//! CLIP text encoder ([`text`]), our UNet ([`unet`]), the VAE ([`vae`]) and the DDIM scheduler
//! ([`ddim`]). The attention seam is in [`control`]; [`grad_ops`] holds the latent-only-gradient
//! layers that make a backward through the full UNet fit in memory.

pub mod config;
pub mod control;
pub mod cpu;
pub mod ddim;
pub mod error;
pub mod generate;
pub mod grad_ops;
pub mod kernel_cache;
pub mod rng;
pub mod source;
pub mod text;
pub mod unet;
pub mod vae;
pub mod weights;

use std::path::Path;

use candle_core::{DType, Device};

pub use error::{Error, Result};
pub use source::ModelFiles;

use config::{ModelIndex, SchedulerConfig, TextEncoderConfig, UNetConfig, VaeConfig};
use ddim::Ddim;
use text::{ClipTextEncoder, ClipTokenizer, TextEncoder, MAX_TOKENS};
use unet::UNet;
use vae::Vae;
use weights::WeightSource;

/// A loaded Stable Diffusion 1.x/2.x model.
#[derive(Debug)]
pub struct StableDiffusion {
    /// Where the files came from.
    pub files: ModelFiles,
    /// Tokenizer and CLIP text encoder.
    pub text: TextEncoder,
    /// The noise-prediction network.
    pub unet: UNet,
    /// The autoencoder.
    pub vae: Vae,
    /// The DDIM scheduler built from the model's scheduler config.
    pub scheduler: Ddim,
    /// The device every tensor lives on.
    pub device: Device,
    /// The dtype of the weights and activations.
    pub dtype: DType,
}

/// CUDA or Metal when compiled in and present (unless `cpu`), else the CPU.
pub fn pick_device(cpu: bool) -> candle_core::Result<Device> {
    if cpu {
        return Ok(Device::Cpu);
    }
    if candle_core::utils::cuda_is_available() {
        return Device::new_cuda(0);
    }
    if candle_core::utils::metal_is_available() {
        return Device::new_metal(0);
    }
    Ok(Device::Cpu)
}

/// Opens a safetensors file as a [`WeightSource`], converting to `dtype` on load.
pub fn open_weights(path: &Path, dtype: DType, device: &Device) -> Result<WeightSource> {
    WeightSource::open(path, dtype, device).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        message: format!(
            "{}; the file is unreadable or not safetensors: download it again",
            error::candle_message(&e)
        ),
    })
}

/// Turns candle's "cannot find tensor" / "shape mismatch" into an error naming both files.
pub fn weights_error<'a>(
    weights: &'a Path,
    config: &'a Path,
) -> impl Fn(candle_core::Error) -> Error + 'a {
    move |e| Error::Weights {
        path: weights.to_path_buf(),
        message: format!(
            "{}. The weights do not match `{}`: the two come from different models, or the \
             download is incomplete; download the model again",
            error::candle_message(&e),
            config.display()
        ),
    }
}

/// Loads a `tokenizer.json` with the `tokenizers` crate.
pub fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Loads only the VAE of `files`, for commands that need nothing else.
pub fn load_vae(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Vae> {
    let (cfg, w) = (&files.vae.0, &files.vae.1);
    Vae::load(open_weights(w, dtype, device)?, VaeConfig::load(cfg)?).map_err(weights_error(w, cfg))
}

/// What embedding text needs: the text encoder, the files it came from (cache keys) and its
/// device. A [`StableDiffusion`] and a [`TextModel`] both give one.
#[derive(Debug, Clone, Copy)]
pub struct TextSide<'a> {
    /// Tokenizer and CLIP text encoder.
    pub text: &'a TextEncoder,
    /// Where the model came from.
    pub files: &'a ModelFiles,
    /// The encoder's device.
    pub device: &'a Device,
}

impl<'a> From<&'a StableDiffusion> for TextSide<'a> {
    fn from(model: &'a StableDiffusion) -> Self {
        Self {
            text: &model.text,
            files: &model.files,
            device: &model.device,
        }
    }
}

/// A model's tokenizer and text encoder alone, for work that only embeds text (computing a
/// direction): a tenth of the whole model's memory.
#[derive(Debug)]
pub struct TextModel {
    /// Where the files came from.
    pub files: ModelFiles,
    /// Tokenizer and CLIP text encoder.
    pub text: TextEncoder,
    /// The device the encoder lives on.
    pub device: Device,
}

impl TextModel {
    /// Loads the tokenizer and text encoder of `files`.
    pub fn load(files: ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        let text = load_text_encoder(&files, device, dtype)?;
        Ok(Self {
            files,
            text,
            device: device.clone(),
        })
    }
}

impl<'a> From<&'a TextModel> for TextSide<'a> {
    fn from(model: &'a TextModel) -> Self {
        Self {
            text: &model.text,
            files: &model.files,
            device: &model.device,
        }
    }
}

/// The tokenizer and text encoder of `files`.
fn load_text_encoder(files: &ModelFiles, device: &Device, dtype: DType) -> Result<TextEncoder> {
    let text_config = TextEncoderConfig::load(&files.text_encoder.0)?;
    let max_len = text_config.max_position_embeddings.min(MAX_TOKENS);
    let tokenizer = ClipTokenizer::load(&files.tokenizer, max_len)?;
    let (cfg, w) = (&files.text_encoder.0, &files.text_encoder.1);
    let encoder = ClipTextEncoder::load(open_weights(w, dtype, device)?, text_config)
        .map_err(weights_error(w, cfg))?;
    Ok(TextEncoder { tokenizer, encoder })
}

impl StableDiffusion {
    /// Loads every component of `files` onto `device` in `dtype` (f32 on the CPU).
    pub fn load(files: ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        if let Some(index) = &files.model_index {
            config::read_json::<ModelIndex>(index)?.check_supported()?;
        }
        let unet_config = UNetConfig::load(&files.unet.0)?;
        let vae_config = VaeConfig::load(&files.vae.0)?;
        let text_config = TextEncoderConfig::load(&files.text_encoder.0)?;
        let scheduler_config = SchedulerConfig::load(&files.scheduler)?;
        if text_config.hidden_size != unet_config.cross_attention_dim {
            return Err(Error::Unsupported(format!(
                "the text encoder's width {} differs from the UNet's cross_attention_dim {}",
                text_config.hidden_size, unet_config.cross_attention_dim
            )));
        }
        let text = load_text_encoder(&files, device, dtype)?;
        let (cfg, w) = (&files.unet.0, &files.unet.1);
        let unet = UNet::load(open_weights(w, dtype, device)?, unet_config)
            .map_err(weights_error(w, cfg))?;
        let (cfg, w) = (&files.vae.0, &files.vae.1);
        let vae = Vae::load(open_weights(w, dtype, device)?, vae_config)
            .map_err(weights_error(w, cfg))?;
        let scheduler = Ddim::new(scheduler_config)?;
        Ok(Self {
            files,
            text,
            unet,
            vae,
            scheduler,
            device: device.clone(),
            dtype,
        })
    }

    /// Image pixels per latent pixel (8).
    pub fn vae_scale(&self) -> usize {
        self.vae.config().downsample_factor()
    }

    /// The side of a generated image when the user gives none: the UNet's trained sample size
    /// times the VAE factor (512 for SD 1.x), or 512 when the config does not say.
    pub fn default_image_side(&self) -> usize {
        self.unet
            .config()
            .sample_size
            .map(|s| s * self.vae_scale())
            .unwrap_or(512)
    }
}
