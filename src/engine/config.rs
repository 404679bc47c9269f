//! diffusers' JSON configs → our config structs, refusing what our networks cannot run.
//!
//! Configs are read from the model folder rather than taken from hard-coded presets, so that any
//! Stable Diffusion 1.x/2.x-shaped model loads, tiny test models included. Field names and
//! defaults follow diffusers' `UNet2DConditionModel`, `AutoencoderKL` and `DDIMScheduler`, and
//! transformers' `CLIPTextConfig`.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::{Error, Result};

/// Reads and parses one JSON config file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            path: path.to_path_buf(),
            hint: "every diffusers model folder has one; download the model again, or use a \
                   complete diffusers-format folder"
                .into(),
        },
        _ => Error::Io(e),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// An integer given either once for every block or as one value per block.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value for every block.
    Same(usize),
    /// One value per down block.
    Each(Vec<usize>),
}

impl PerBlock {
    fn resolve(&self, blocks: usize, what: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::Same(v) => Ok(vec![*v; blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::Unsupported(format!(
                "{what} lists {} values for {blocks} blocks",
                v.len()
            ))),
        }
    }
}

/// `model_index.json`: which pipeline and components the folder holds.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    /// The pipeline class, e.g. `StableDiffusionPipeline`.
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    /// The diffusers version that wrote the folder.
    #[serde(rename = "_diffusers_version", default)]
    pub diffusers_version: Option<String>,
    /// Present in SDXL folders only.
    #[serde(default)]
    pub text_encoder_2: Option<serde_json::Value>,
}

impl ModelIndex {
    /// Refuses pipelines that are not Stable Diffusion 1.x/2.x text-to-image models.
    pub fn check_supported(&self) -> Result<()> {
        let class = self.class_name.as_str();
        if class.contains("XL") || self.text_encoder_2.is_some() {
            return Err(Error::Unsupported(format!(
                "model_index.json names `{class}` with a second text encoder (SDXL); pix2pix-zero \
                 runs Stable Diffusion 1.x and 2.x models, e.g. CompVis/stable-diffusion-v1-4"
            )));
        }
        if !class.is_empty() && !class.starts_with("StableDiffusion") {
            return Err(Error::Unsupported(format!(
                "model_index.json names `{class}`; expected a StableDiffusionPipeline folder"
            )));
        }
        Ok(())
    }
}

/// `unet/config.json` as diffusers writes it (the fields we read).
#[derive(Debug, Clone, Deserialize)]
pub struct RawUNetConfig {
    #[serde(rename = "_class_name", default)]
    class_name: String,
    #[serde(default = "default_4")]
    in_channels: usize,
    #[serde(default = "default_4")]
    out_channels: usize,
    #[serde(default)]
    sample_size: Option<usize>,
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    #[serde(default)]
    mid_block_type: Option<String>,
    #[serde(default = "default_2")]
    layers_per_block: usize,
    #[serde(default)]
    attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    num_attention_heads: Option<PerBlock>,
    cross_attention_dim: PerBlock,
    #[serde(default)]
    transformer_layers_per_block: Option<PerBlock>,
    #[serde(default = "default_32")]
    norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    norm_eps: f64,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default = "default_true")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default = "default_1")]
    downsample_padding: usize,
    #[serde(default = "default_1f")]
    mid_block_scale_factor: f64,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default)]
    upcast_attention: bool,
    #[serde(default)]
    only_cross_attention: Option<serde_json::Value>,
    #[serde(default)]
    dual_cross_attention: bool,
    #[serde(default = "default_silu")]
    act_fn: String,
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    encoder_hid_dim: Option<usize>,
    #[serde(default)]
    time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    time_embedding_type: Option<String>,
    #[serde(default)]
    resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    conv_in_kernel: Option<usize>,
    #[serde(default)]
    conv_out_kernel: Option<usize>,
    #[serde(default)]
    attention_type: Option<String>,
}

fn default_1() -> usize {
    1
}
fn default_2() -> usize {
    2
}
fn default_4() -> usize {
    4
}
fn default_32() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_1f() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_silu() -> String {
    "silu".into()
}

/// One level of the UNet: a down block and its mirrored up block.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetLevel {
    /// Output channels of the down block (and input channels of the mirrored up block).
    pub channels: usize,
    /// Whether the blocks at this level carry attention (`CrossAttn*Block2D`).
    pub attention: bool,
    /// Attention heads at this level.
    pub heads: usize,
    /// Transformer blocks per attention module at this level.
    pub transformer_layers: usize,
}

/// The UNet architecture, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    /// Latent channels in (4 for SD).
    pub in_channels: usize,
    /// Predicted channels out (4 for SD).
    pub out_channels: usize,
    /// Latent side the model was trained at (64 for SD 1.x at 512²), when the config says.
    pub sample_size: Option<usize>,
    /// The levels, from the highest resolution down.
    pub levels: Vec<UNetLevel>,
    /// Resnets per down block; up blocks have one more.
    pub layers_per_block: usize,
    /// Width of the text embeddings the cross-attention reads (768 for SD 1.x, 1024 for 2.x).
    pub cross_attention_dim: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Epsilon of the resnets' group norms.
    pub norm_eps: f64,
    /// SD 2.x projects in and out of the transformers with linear layers instead of 1×1 convs.
    pub use_linear_projection: bool,
    /// Timestep embedding: cos before sin.
    pub flip_sin_to_cos: bool,
    /// Timestep embedding frequency shift.
    pub freq_shift: f64,
    /// Padding of the down-sampling convolutions.
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    pub mid_block_scale_factor: f64,
    /// Whether the input is mapped from [0,1] to [-1,1] first.
    pub center_input_sample: bool,
    /// SD 2.1 computes attention scores in f32 even in f16 models.
    pub upcast_attention: bool,
}

impl UNetConfig {
    /// Validates diffusers' config and maps it to ours. Refuses SDXL, class-conditioned and
    /// other architectures with a message that says what was found.
    pub fn from_raw(raw: &RawUNetConfig) -> Result<Self> {
        let refuse = |what: String| Err(Error::Unsupported(format!("unet/config.json: {what}")));
        if !raw.class_name.is_empty() && raw.class_name != "UNet2DConditionModel" {
            return refuse(format!(
                "`{}` is not a UNet2DConditionModel",
                raw.class_name
            ));
        }
        if let Some(kind) = &raw.addition_embed_type {
            return refuse(format!(
                "addition_embed_type `{kind}` (extra embeddings, as in SDXL) is not supported"
            ));
        }
        if let Some(kind) = &raw.class_embed_type {
            return refuse(format!("class_embed_type `{kind}` is not supported"));
        }
        if raw.encoder_hid_dim.is_some() || raw.time_cond_proj_dim.is_some() {
            return refuse("encoder_hid_dim / time_cond_proj_dim are not supported".into());
        }
        if raw.dual_cross_attention
            || matches!(&raw.only_cross_attention, Some(v) if v != &serde_json::Value::Bool(false))
        {
            return refuse("dual or cross-only attention is not supported".into());
        }
        if raw.act_fn != "silu" {
            return refuse(format!("act_fn `{}` (expected silu)", raw.act_fn));
        }
        for (name, value, expected) in [
            (
                "time_embedding_type",
                &raw.time_embedding_type,
                "positional",
            ),
            (
                "resnet_time_scale_shift",
                &raw.resnet_time_scale_shift,
                "default",
            ),
            ("attention_type", &raw.attention_type, "default"),
        ] {
            if let Some(v) = value {
                if v != expected {
                    return refuse(format!("{name} `{v}` (expected {expected})"));
                }
            }
        }
        for (name, k) in [
            ("conv_in_kernel", raw.conv_in_kernel),
            ("conv_out_kernel", raw.conv_out_kernel),
        ] {
            if let Some(k) = k {
                if k != 3 {
                    return refuse(format!("{name} {k} (expected 3)"));
                }
            }
        }
        let n = raw.block_out_channels.len();
        if n == 0 || raw.down_block_types.len() != n || raw.up_block_types.len() != n {
            return refuse(format!(
                "{n} block_out_channels, {} down blocks and {} up blocks do not match",
                raw.down_block_types.len(),
                raw.up_block_types.len()
            ));
        }
        let mut attention = Vec::with_capacity(n);
        for (i, kind) in raw.down_block_types.iter().enumerate() {
            let up = &raw.up_block_types[n - 1 - i];
            let has = match kind.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => return refuse(format!("down block type `{other}` is not supported")),
            };
            let up_has = match up.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => return refuse(format!("up block type `{other}` is not supported")),
            };
            if has != up_has {
                return refuse(format!("down block `{kind}` is mirrored by `{up}`"));
            }
            attention.push(has);
        }
        match raw.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => {}
            Some(other) => return refuse(format!("mid block type `{other}` is not supported")),
        }
        // diffusers' naming quirk: in SD configs `attention_head_dim` is the number of heads;
        // `num_attention_heads` wins when it is present.
        let heads_field = raw
            .num_attention_heads
            .as_ref()
            .or(raw.attention_head_dim.as_ref())
            .cloned()
            .unwrap_or(PerBlock::Same(8));
        let heads = heads_field.resolve(n, "attention heads")?;
        let cross_attention_dim = match &raw.cross_attention_dim {
            PerBlock::Same(d) => *d,
            PerBlock::Each(v) if !v.is_empty() && v.iter().all(|d| *d == v[0]) => v[0],
            PerBlock::Each(v) => return refuse(format!("per-block cross_attention_dim {v:?}")),
        };
        let transformer_layers = raw
            .transformer_layers_per_block
            .clone()
            .unwrap_or(PerBlock::Same(1))
            .resolve(n, "transformer_layers_per_block")?;
        let levels = (0..n)
            .map(|i| {
                let channels = raw.block_out_channels[i];
                if !channels.is_multiple_of(raw.norm_num_groups) || !channels.is_multiple_of(heads[i]) {
                    return Err(Error::Unsupported(format!(
                        "unet/config.json: {channels} channels do not split into {} groups and {} heads",
                        raw.norm_num_groups, heads[i]
                    )));
                }
                Ok(UNetLevel {
                    channels,
                    attention: attention[i],
                    heads: heads[i],
                    transformer_layers: transformer_layers[i],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            sample_size: raw.sample_size,
            levels,
            layers_per_block: raw.layers_per_block,
            cross_attention_dim,
            norm_num_groups: raw.norm_num_groups,
            norm_eps: raw.norm_eps,
            use_linear_projection: raw.use_linear_projection,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            center_input_sample: raw.center_input_sample,
            upcast_attention: raw.upcast_attention,
        })
    }

    /// Reads and validates `unet/config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_raw(&read_json(path)?)
    }

    /// The factor by which the UNet down-samples its input: latents must be multiples of it.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.levels.len() - 1)
    }
}

/// `vae/config.json` (an `AutoencoderKL`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VaeConfig {
    /// Image channels in (3).
    #[serde(default = "default_3")]
    pub in_channels: usize,
    /// Image channels out (3).
    #[serde(default = "default_3")]
    pub out_channels: usize,
    /// Channels of each encoder level; the decoder mirrors them.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block; decoder blocks have one more.
    #[serde(default = "default_1")]
    pub layers_per_block: usize,
    /// Latent channels (4).
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    /// Groups of every group norm.
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding (0.18215 for SD 1.x and 2.x).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// Whether a 1×1 conv follows the encoder.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether a 1×1 conv precedes the decoder.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks carry self-attention.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    down_block_types: Vec<String>,
    #[serde(default)]
    up_block_types: Vec<String>,
}

fn default_3() -> usize {
    3
}
/// Stable Diffusion's latent scale: `vae/config.json`'s `scaling_factor` in SD 1.x and 2.x.
pub const SD_LATENT_SCALE: f64 = 0.18215;
fn default_scaling() -> f64 {
    SD_LATENT_SCALE
}

impl VaeConfig {
    /// Reads and validates `vae/config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        let bad = |what: String| Err(Error::Unsupported(format!("vae/config.json: {what}")));
        if config.block_out_channels.is_empty() {
            return bad("no block_out_channels".into());
        }
        if let Some(t) = config
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return bad(format!("down block type `{t}` is not supported"));
        }
        if let Some(t) = config
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return bad(format!("up block type `{t}` is not supported"));
        }
        if !config.mid_block_add_attention {
            return bad("mid blocks without attention are not supported".into());
        }
        Ok(config)
    }

    /// Image side / latent side (8 for SD).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The activation of CLIP's MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ClipActivation {
    /// `x·σ(1.702x)`, SD 1.x (OpenAI CLIP).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact GELU, SD 2.x (OpenCLIP).
    #[serde(rename = "gelu")]
    Gelu,
}

/// `text_encoder/config.json` (a transformers `CLIPTextModel`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TextEncoderConfig {
    /// Token vocabulary (49408).
    pub vocab_size: usize,
    /// Width of the hidden states (768 for SD 1.x, 1024 for 2.x).
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Positions (77).
    #[serde(default = "default_77")]
    pub max_position_embeddings: usize,
    /// MLP activation.
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: ClipActivation,
    /// Layer norm epsilon.
    #[serde(default = "default_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    architectures: Option<Vec<String>>,
}

fn default_77() -> usize {
    77
}
fn default_quick_gelu() -> ClipActivation {
    ClipActivation::QuickGelu
}

impl TextEncoderConfig {
    /// Reads and validates `text_encoder/config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        if let Some(arch) = config.architectures.as_ref().and_then(|a| a.first()) {
            if arch != "CLIPTextModel" {
                return Err(Error::Unsupported(format!(
                    "text_encoder/config.json: `{arch}` is not a CLIPTextModel"
                )));
            }
        }
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(Error::Unsupported(format!(
                "text_encoder/config.json: hidden size {} does not split into {} heads",
                config.hidden_size, config.num_attention_heads
            )));
        }
        Ok(config)
    }
}

/// How β grows over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `β_i = linspace(β_start, β_end)_i`.
    Linear,
    /// `β_i = linspace(√β_start, √β_end)_i²` (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise ε (SD 1.x, SD 2.x base).
    Epsilon,
    /// The velocity `v = √ᾱ·ε − √(1−ᾱ)·x₀` (SD 2.x at 768²).
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

/// How inference timesteps are spread over the training range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `k·(T/N) + offset`, the Stable Diffusion default.
    Leading,
    /// Counted down from T.
    Trailing,
    /// Evenly spaced over `[0, T−1]`, rounded.
    Linspace,
}

/// `scheduler/scheduler_config.json`, read the way `DDIMScheduler.from_config` reads it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SchedulerConfig {
    /// Training timesteps T (1000).
    #[serde(default = "default_1000")]
    pub num_train_timesteps: usize,
    /// First β.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// Last β.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// β schedule.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: BetaSchedule,
    /// Explicit βs, overriding the schedule.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// Whether ᾱ before the first timestep is 1 (else ᾱ₀). SD's config says false.
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// Added to every inference timestep (1 for SD).
    #[serde(default)]
    pub steps_offset: usize,
    /// What the UNet predicts.
    #[serde(default = "default_prediction")]
    pub prediction_type: PredictionType,
    /// Timestep spacing.
    #[serde(default = "default_spacing")]
    pub timestep_spacing: TimestepSpacing,
    /// Whether x̂₀ is clipped (false for SD).
    #[serde(default)]
    pub clip_sample: bool,
    /// Clip range when `clip_sample`.
    #[serde(default = "default_1f")]
    pub clip_sample_range: f64,
}

fn default_1000() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn default_prediction() -> PredictionType {
    PredictionType::Epsilon
}
fn default_spacing() -> TimestepSpacing {
    TimestepSpacing::Leading
}

impl SchedulerConfig {
    /// Reads `scheduler/scheduler_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        read_json(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15_unet_json() -> serde_json::Value {
        serde_json::json!({
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": false,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
        })
    }

    #[test]
    fn sd1_attention_head_dim_means_heads() {
        let raw: RawUNetConfig = serde_json::from_value(sd15_unet_json()).unwrap();
        let config = UNetConfig::from_raw(&raw).unwrap();
        assert_eq!(config.levels.len(), 4);
        assert!(config.levels.iter().all(|l| l.heads == 8));
        assert_eq!(config.levels.iter().filter(|l| l.attention).count(), 3);
        assert_eq!(config.cross_attention_dim, 768);
        assert_eq!(config.downsample_factor(), 8);
    }

    #[test]
    fn sd2_per_block_heads() {
        let mut json = sd15_unet_json();
        json["attention_head_dim"] = serde_json::json!([5, 10, 20, 20]);
        json["use_linear_projection"] = serde_json::json!(true);
        json["cross_attention_dim"] = serde_json::json!(1024);
        let raw: RawUNetConfig = serde_json::from_value(json).unwrap();
        let config = UNetConfig::from_raw(&raw).unwrap();
        let heads: Vec<_> = config.levels.iter().map(|l| l.heads).collect();
        assert_eq!(heads, vec![5, 10, 20, 20]);
        assert!(config.use_linear_projection);
    }

    #[test]
    fn sdxl_is_refused_with_what_was_found() {
        let mut json = sd15_unet_json();
        json["addition_embed_type"] = serde_json::json!("text_time");
        let raw: RawUNetConfig = serde_json::from_value(json).unwrap();
        let err = UNetConfig::from_raw(&raw).unwrap_err().to_string();
        assert!(err.contains("addition_embed_type `text_time`"), "{err}");

        let index: ModelIndex = serde_json::from_value(serde_json::json!({
            "_class_name": "StableDiffusionXLPipeline",
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]
        }))
        .unwrap();
        let err = index.check_supported().unwrap_err().to_string();
        assert!(err.contains("StableDiffusionXLPipeline"), "{err}");
    }

    #[test]
    fn scheduler_defaults_follow_ddim() {
        let config: SchedulerConfig = serde_json::from_value(serde_json::json!({
            "_class_name": "PNDMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "trained_betas": null,
            "clip_sample": false
        }))
        .unwrap();
        assert_eq!(config.prediction_type, PredictionType::Epsilon);
        assert_eq!(config.timestep_spacing, TimestepSpacing::Leading);
        assert_eq!(config.beta_schedule, BetaSchedule::ScaledLinear);
        assert!(!config.set_alpha_to_one);
    }
}
