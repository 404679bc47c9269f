//! `p2pz bench`: seconds and peak memory of the UNet and VAE on a full-size SD-1.5 architecture
//! with random weights built here (no download), the numbers `bench/bench_diffusers.py` measures
//! for diffusers.
//!
//! Each case runs in a fresh child process (`p2pz bench --worker CASE SIZE`), so that its peak
//! resident memory (`VmHWM`) is its own.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use clap::Args;
use pix2pix_zero::edit::guidance::cross_attention_loss;
use pix2pix_zero::engine::config::{RawUNetConfig, UNetConfig, VaeConfig};
use pix2pix_zero::engine::control::{AttentionKind, Keep, Recorder};
use pix2pix_zero::engine::rng::Rng;
use pix2pix_zero::engine::unet::UNet;
use pix2pix_zero::engine::vae::{LatentDraw, Vae};

/// Every case, in the order they run.
const CASES: [&str; 7] = [
    "unet_fwd_b1",
    "unet_fwd_b2",
    "unet_fwdbwd_b1",
    "guidance_b1",
    "vae_encode",
    "vae_decode",
    "unet_fwdbwd_b2",
];

/// Arguments of `p2pz bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Image sides to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    sizes: Vec<usize>,
    /// Timed repeats after one warm-up run.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Cases to run (default: all): unet_fwd_b1, unet_fwd_b2, unet_fwdbwd_b1, unet_fwdbwd_b2,
    /// guidance_b1, vae_encode, vae_decode.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run one case in this process and print its result as JSON.
    #[arg(long, num_args = 2, value_names = ["CASE", "SIZE"], hide = true)]
    worker: Vec<String>,
}

/// SD 1.5's `unet/config.json`.
fn sd15_unet() -> Result<UNetConfig> {
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
fn sd15_vae() -> Result<VaeConfig> {
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
struct RandomWeights;

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

/// Peak resident memory of this process so far, in MB (`VmHWM`), when the OS tells.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// One measured case.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Measurement {
    case: String,
    size: usize,
    build_s: f64,
    seconds: Vec<f64>,
    peak_rss_mb: Option<f64>,
}

/// Runs `f` once to warm up, then `repeats` timed times.
fn time(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    f()?;
    (0..repeats)
        .map(|_| {
            let start = Instant::now();
            f()?;
            Ok(start.elapsed().as_secs_f64())
        })
        .collect()
}

/// Runs one case in this process.
fn worker(case: &str, size: usize, repeats: usize) -> Result<Measurement> {
    let dev = Device::Cpu;
    let vb = || VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone());
    let latent = size / 8;
    let mut rng = Rng::new(0);
    let start = Instant::now();
    let seconds = if case.starts_with("vae") {
        let vae = Vae::load(vb().pp("vae"), sd15_vae()?)?;
        let build_s = start.elapsed().as_secs_f64();
        let image = (rng.randn((1, 3, size, size), DType::F32, &dev)? * 0.5)?;
        let z = rng.randn((1, 4, latent, latent), DType::F32, &dev)?;
        let seconds = match case {
            "vae_encode" => time(repeats, || Ok(drop(vae.encode(&image, LatentDraw::Mean)?)))?,
            "vae_decode" => time(repeats, || Ok(drop(vae.decode(&z)?)))?,
            other => bail!("unknown case {other}"),
        };
        (build_s, seconds)
    } else {
        let unet = UNet::load(vb().pp("unet"), sd15_unet()?)?;
        let build_s = start.elapsed().as_secs_f64();
        let batch = if case.ends_with("b2") { 2 } else { 1 };
        let x = rng.randn((batch, 4, latent, latent), DType::F32, &dev)?;
        let context = rng.randn((batch, 77, 768), DType::F32, &dev)?;
        let t = 500.0;
        let seconds = match case {
            "unet_fwd_b1" | "unet_fwd_b2" => {
                time(repeats, || Ok(drop(unet.forward(&x, t, &context, None)?)))?
            }
            "unet_fwdbwd_b1" | "unet_fwdbwd_b2" => time(repeats, || {
                // The loss diffusers' benchmark uses: mean(out²), gradient w.r.t. the latent only.
                let leaf = Var::from_tensor(&x)?;
                let out = unet.forward(leaf.as_tensor(), t, &context, None)?;
                let grads = out.sqr()?.mean_all()?.backward()?;
                grads
                    .get(leaf.as_tensor())
                    .context("no gradient reached the latent")?;
                Ok(())
            })?,
            "guidance_b1" => {
                // One pix2pix-zero guidance step: cross-attention maps kept in the graph, the
                // loss against reference maps, its gradient w.r.t. the latent.
                let mut reference =
                    Recorder::new(AttentionKind::CrossAttention, Keep::Detached(DType::F32));
                let x_ref = rng.randn((1, 4, latent, latent), DType::F32, &dev)?;
                unet.forward(&x_ref, t, &context, Some(&mut reference))?;
                let reference = reference.take();
                time(repeats, || {
                    let leaf = Var::from_tensor(&x)?;
                    let mut edited = Recorder::new(AttentionKind::CrossAttention, Keep::Graph);
                    unet.forward(leaf.as_tensor(), t, &context, Some(&mut edited))?;
                    let grads = cross_attention_loss(edited.maps(), &reference)?.backward()?;
                    grads
                        .get(leaf.as_tensor())
                        .context("no gradient reached the latent")?;
                    Ok(())
                })?
            }
            other => bail!("unknown case {other}"),
        };
        (build_s, seconds)
    };
    Ok(Measurement {
        case: case.to_string(),
        size,
        build_s: seconds.0,
        seconds: seconds.1,
        peak_rss_mb: peak_rss_mb(),
    })
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `p2pz bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    if let [case, size] = args.worker.as_slice() {
        let measurement = worker(case, size.parse()?, args.repeats.max(1))?;
        println!("{}", serde_json::to_string(&measurement)?);
        return Ok(());
    }
    let cases: Vec<String> = if args.cases.is_empty() {
        CASES.iter().map(|c| c.to_string()).collect()
    } else {
        args.cases.clone()
    };
    if let Some(unknown) = cases.iter().find(|c| !CASES.contains(&c.as_str())) {
        bail!(
            "unknown case `{unknown}`; the cases are {}",
            CASES.join(", ")
        );
    }
    if let Some(bad) = args.sizes.iter().find(|s| *s == &0 || *s % 64 != 0) {
        bail!("size {bad} is not a positive multiple of 64");
    }
    let exe = std::env::current_exe()?;
    println!(
        "p2pz bench: SD-1.5 architecture, random weights, f32, CPU, {} threads",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<16} {:>5} {:>10} {:>10} {:>12}",
        "case", "size", "median s", "build s", "peak RSS MB"
    );
    let mut results = vec![];
    for &size in &args.sizes {
        for case in &cases {
            let output = std::process::Command::new(&exe)
                .args([
                    "bench",
                    "--repeats",
                    &args.repeats.to_string(),
                    "--worker",
                    case,
                    &size.to_string(),
                ])
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running case {case}"))?;
            if !output.status.success() {
                println!("{case:<16} {size:>5} failed ({})", output.status);
                continue;
            }
            let m: Measurement = serde_json::from_slice(&output.stdout)?;
            println!(
                "{:<16} {:>5} {:>10.2} {:>10.1} {:>12.0}",
                m.case,
                m.size,
                median(&m.seconds),
                m.build_s,
                m.peak_rss_mb.unwrap_or(f64::NAN)
            );
            results.push(m);
        }
    }
    if let Some(path) = args.json {
        pix2pix_zero::export::write_atomically(
            &path,
            serde_json::to_string_pretty(&results)?.as_bytes(),
        )?;
    }
    Ok(())
}
