//! The `p2pz` command line: one file per subcommand, shared options here.

pub mod bench;
pub mod distill;
pub mod doctor;
pub mod editing;
pub mod full_size;
pub mod generate;
pub mod gui;
pub mod info;
pub mod pairs;

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pix2pix_zero::engine::source::{self, DownloadProgress, ResolveOptions, DEFAULT_MODEL};
use pix2pix_zero::engine::{ModelFiles, StableDiffusion, TextModel};

/// Numeric precision of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// f32 everywhere: the reference precision, and the fastest on CPUs.
    F32,
    /// f16 weights and activations (attention and norms still in f32): for GPUs.
    F16,
    /// f32, but convolutions and linear layers multiply in bf16 (with f32 sums) on AMX tiles:
    /// 2–3× faster on CPUs that have them (Intel Xeon Sapphire Rapids and newer), less exact.
    Bf16,
}

impl Precision {
    /// The dtype of weights and activations it stands for.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 | Precision::Bf16 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }

    /// Readies the kernels for it on `device`, before any weights are loaded.
    pub fn prepare(self, device: &Device) -> Result<()> {
        if self != Precision::Bf16 {
            return Ok(());
        }
        if !device.is_cpu() {
            anyhow::bail!("--precision bf16 is for CPUs with AMX; on a GPU use --precision f16")
        }
        pix2pix_zero::engine::cpu::use_bf16_products()
            .map_err(|why| anyhow::anyhow!("--precision bf16: {why}; use --precision f32"))
    }
}

/// A device named on the command line (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// A GPU when one is compiled in and present, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The first NVIDIA GPU (a `--features cuda` build).
    Cuda,
    /// The Apple GPU (a `--features metal` build).
    Metal,
}

impl DeviceChoice {
    /// Opens the device, or says why it cannot be had and what to do.
    pub fn open(self) -> Result<Device> {
        Ok(match self {
            DeviceChoice::Auto => pick_device(false)?,
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda => {
                if !candle_core::utils::cuda_is_available() {
                    anyhow::bail!(
                        "this p2pz was built without CUDA: build it with `cargo build --release \
                         --features cuda` (scripts/build-cuda.sh does it with pip's CUDA wheels)"
                    );
                }
                Device::new_cuda(0).context(
                    "no CUDA device could be opened: check that the NVIDIA driver is installed \
                     (nvidia-smi) and that the CUDA runtime, cuBLAS, cuRAND and NVRTC libraries \
                     can be loaded (LD_LIBRARY_PATH)",
                )?
            }
            DeviceChoice::Metal => {
                if !candle_core::utils::metal_is_available() {
                    anyhow::bail!(
                        "this p2pz was built without Metal: build it with `--features metal`"
                    );
                }
                Device::new_metal(0)?
            }
        })
    }

    /// The name `--device` takes.
    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Metal => "metal",
        }
    }
}

/// The device, in words.
pub fn describe_device(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "CPU",
        Device::Cuda(_) => "CUDA GPU 0",
        Device::Metal(_) => "Metal GPU",
    }
}

/// Options every model-using command takes.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A diffusers-format folder or a Hugging Face repo id (looked up in the HF cache, downloaded
    /// when missing unless HF_HUB_OFFLINE is set).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    pub cpu: bool,
    /// Precision of weights and activations.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// When downloading, prefer the `*.fp16.safetensors` files (half the download).
    #[arg(long)]
    pub fp16_download: bool,
}

/// A terminal progress bar for downloads: bytes, speed and time left.
#[derive(Default)]
pub struct DownloadBar {
    bar: Option<(String, ProgressBar)>,
}

impl DownloadProgress for DownloadBar {
    fn progress(&mut self, file: &str, done: u64, total: u64) {
        if self.bar.as_ref().is_none_or(|(f, _)| f != file) {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(file.to_string());
            if let Some((_, old)) = self.bar.replace((file.to_string(), bar)) {
                old.finish();
            }
        }
        if let Some((_, bar)) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
            if done >= total {
                bar.finish();
            }
        }
    }
}

impl ModelArgs {
    /// The device to run on.
    pub fn device(&self) -> Result<Device> {
        pick_device(self.cpu)
    }

    /// The dtype for `--precision`.
    pub fn dtype(&self) -> DType {
        self.precision.dtype()
    }

    /// Finds (and if needed downloads) the model's files.
    pub fn files(&self) -> Result<ModelFiles> {
        let mut options = ResolveOptions::from_env();
        options.prefer_fp16_download = self.fp16_download;
        let mut bar = DownloadBar::default();
        Ok(source::resolve(&self.model, &options, &mut bar)?)
    }

    /// Finds the model and loads its tokenizer and text encoder only.
    pub fn load_text(&self) -> Result<TextModel> {
        let files = self.files()?;
        let device = self.device()?;
        self.precision.prepare(&device)?;
        let root = files.root.clone();
        TextModel::load(files, &device, self.dtype())
            .with_context(|| format!("loading the text encoder from `{}`", root.display()))
    }

    /// Finds and loads the model.
    pub fn load(&self) -> Result<StableDiffusion> {
        let files = self.files()?;
        let device = self.device()?;
        self.precision.prepare(&device)?;
        let root = files.root.clone();
        StableDiffusion::load(files, &device, self.dtype())
            .with_context(|| format!("loading the model from `{}`", root.display()))
    }
}

/// CUDA or Metal when compiled in and present (unless `cpu`), else the CPU.
pub fn pick_device(cpu: bool) -> Result<Device> {
    Ok(pix2pix_zero::engine::pick_device(cpu)?)
}

/// A step progress bar with the stage name and time left.
pub fn step_bar(total: usize, stage: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] step {pos}/{len}, {elapsed} elapsed, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(stage.to_string());
    bar
}

/// Resolves a relative output path against the working directory, for messages.
pub fn shown(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
