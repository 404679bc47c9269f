//! `p2pz doctor`: will this machine work, and how fast? It lists the devices candle sees and the
//! CPU features, checks a UNet forward and the guidance gradient on the chosen device against
//! tensors diffusers and torch computed (in f32 and f16), and times one step of the full-size
//! UNet with random weights. It needs no download: the tiny model and the reference tensors are
//! built into the binary (about 10 MB).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::safetensors::load_buffer;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use clap::Args;
use pix2pix_zero::edit::guidance::cross_attention_loss;
use pix2pix_zero::engine::config::{RawUNetConfig, UNetConfig};
use pix2pix_zero::engine::control::{AttentionKind, Keep, Recorder};
use pix2pix_zero::engine::cpu::{self, Products};
use pix2pix_zero::engine::kernel_cache;
use pix2pix_zero::engine::rng::Rng;
use pix2pix_zero::engine::unet::UNet;

use super::full_size::{random_weights, sd15_unet};
use super::{describe_device as describe, DeviceChoice};

/// The tiny fixture UNet (random weights, the full SD block structure) and its config.
const TINY_UNET_CONFIG: &str = include_str!("../../tests/fixtures/tiny-sd/unet/config.json");
const TINY_UNET_WEIGHTS: &[u8] =
    include_bytes!("../../tests/fixtures/tiny-sd/unet/diffusion_pytorch_model.safetensors");
/// What diffusers and torch computed on it (`tests/fixtures/make_doctor_reference.py`).
const REFERENCE: &[u8] = include_bytes!("../../tests/fixtures/reference/doctor.safetensors");

/// The timestep of the reference gradient (`grad.*` in the fixtures).
const GRADIENT_T: f64 = 481.0;

/// Arguments of `p2pz doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The device to check.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Image side of the full-size timing step (default: 512 on a GPU, 256 on the CPU; 0: skip).
    #[arg(long)]
    timing_size: Option<usize>,
    /// Check against this reference file instead of the built-in one (same tensor names).
    #[arg(long)]
    reference: Option<PathBuf>,
}

/// One comparison with its limit.
struct Check {
    name: String,
    error: f64,
    limit: f64,
    detail: String,
}

impl Check {
    fn passed(&self) -> bool {
        self.error <= self.limit
    }
}

/// How close each precision must come to the reference: `(UNet output, loss, gradient)`
/// relative to the reference's largest magnitude, and the gradient's `1 - cosine`. The f32
/// limits are the parity tests' (`tests/parity.rs`, `tests/gradients.rs`). bf16 keeps 8 bits of
/// mantissa to f16's 11, so bf16 products get 3× f16's limits on the output and the gradient.
fn limits(dtype: DType, products: Products) -> (f64, f64, f64, f64) {
    match (dtype, products) {
        (DType::F32, Products::F32) => (1e-5, 1e-5, 1e-4, 1e-5),
        (_, Products::Bf16) => (3e-2, 1e-2, 1e-1, 1e-3),
        _ => (1e-2, 1e-2, 3e-2, 1e-3),
    }
}

/// Whether `--precision bf16` can run on `device`, or why not.
fn bf16_products_available(device: &Device) -> std::result::Result<(), String> {
    if !device.is_cpu() {
        return Err("it is for CPUs".into());
    }
    cpu::with_products(Products::Bf16, || ())
}

/// Runs `p2pz doctor`.
pub fn run(args: DoctorArgs) -> Result<()> {
    println!("p2pz doctor {}", env!("CARGO_PKG_VERSION"));
    println!(
        "CPU: {}, {} threads; features: {}",
        std::env::consts::ARCH,
        candle_core::utils::get_num_threads(),
        cpu_features().join(" ")
    );
    println!(
        "CPU kernels: {} for matrix products, {} for the rest (P2PZ_CPU=avx2, portable or \
         candle picks a narrower path)",
        cpu_kernels(),
        pix2pix_zero::engine::cpu::isa().name()
    );
    println!("devices: {}", devices().join(", "));
    match kernel_cache::default_root() {
        Some(root) => println!(
            "kernel cache: {} ({:.0} MB; safe to delete; {}=off turns it off)",
            root.display(),
            kernel_cache::bytes_under(&root) as f64 / 1e6,
            kernel_cache::CACHE_DIR_VAR
        ),
        None => println!("kernel cache: off ({}=off)", kernel_cache::CACHE_DIR_VAR),
    }
    let device = args.device.open()?;
    let reference = match &args.reference {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read the reference file `{}`", path.display()))?;
            load_reference(&bytes, &device)
                .with_context(|| format!("the reference file `{}`", path.display()))?
        }
        None => load_reference(REFERENCE, &device)?,
    };
    let mut checks = vec![];
    let mut precisions = vec![
        ("f32", DType::F32, Products::F32),
        ("f16", DType::F16, Products::F32),
    ];
    match bf16_products_available(&device) {
        Ok(()) => precisions.push(("bf16 products", DType::F32, Products::Bf16)),
        Err(why) => println!("bf16 products (--precision bf16): not here, {why}"),
    }
    for (label, dtype, products) in precisions {
        println!(
            "checking the tiny UNet on the {} in {label}:",
            describe(&device)
        );
        for check in parity(&device, (dtype, products), &reference)? {
            println!(
                "  {:<34} error {:>9.2e}  limit {:>9.2e}  {}  {}",
                check.name,
                check.error,
                check.limit,
                if check.passed() { "pass" } else { "FAIL" },
                check.detail
            );
            checks.push(check);
        }
    }
    let gpu = !device.is_cpu();
    let timing_size = args.timing_size.unwrap_or(if gpu { 512 } else { 256 });
    if timing_size > 0 {
        if !timing_size.is_multiple_of(64) {
            bail!("--timing-size {timing_size} is not a multiple of 64");
        }
        time_full_size(&device, timing_size, gpu)?;
    }
    let failed: Vec<&Check> = checks.iter().filter(|c| !c.passed()).collect();
    if failed.is_empty() {
        println!("result: all {} checks passed", checks.len());
        return Ok(());
    }
    let names: Vec<&str> = failed.iter().map(|c| c.name.as_str()).collect();
    bail!(
        "{} of {} checks failed ({}): this device does not compute what diffusers computes. \
         Run with --device cpu to compare, and report the output above",
        failed.len(),
        checks.len(),
        names.join(", ")
    )
}

/// The reference tensors on `device`, each checked to exist with the expected shape.
fn load_reference(
    bytes: &[u8],
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let tensors = load_buffer(bytes, device)
        .context("it is damaged (not a readable safetensors file); reinstall p2pz")?;
    let expected: [(&str, &[usize]); 10] = [
        ("unet.sample", &[1, 4, 16, 16]),
        ("unet.context", &[2, 77, 32]),
        ("unet.t981.out", &[2, 4, 16, 16]),
        ("unet.t21.out", &[2, 4, 16, 16]),
        ("grad.x", &[1, 4, 16, 16]),
        ("grad.x_ref", &[1, 4, 16, 16]),
        ("grad.context_ref", &[2, 77, 32]),
        ("grad.context_edit", &[2, 77, 32]),
        ("grad.loss", &[1]),
        ("grad.dx", &[2, 4, 16, 16]),
    ];
    for (name, shape) in expected {
        let tensor = tensors
            .get(name)
            .with_context(|| format!("the reference tensor `{name}` is missing"))?;
        if tensor.dims() != shape {
            bail!(
                "the reference tensor `{name}` has shape {:?}, not {shape:?}",
                tensor.dims()
            );
        }
    }
    Ok(tensors)
}

/// The UNet forward at two timesteps and the guidance loss and gradient, in `dtype`.
fn parity(
    device: &Device,
    (dtype, products): (DType, Products),
    r: &std::collections::HashMap<String, Tensor>,
) -> Result<Vec<Check>> {
    let raw: RawUNetConfig = serde_json::from_str(TINY_UNET_CONFIG)?;
    let vb =
        VarBuilder::from_buffered_safetensors(TINY_UNET_WEIGHTS.to_vec(), dtype, device)?.into();
    let config = UNetConfig::from_raw(&raw)?;
    let unet =
        cpu::with_products(products, || UNet::load(vb, config)).map_err(anyhow::Error::msg)??;
    let input = |name: &str| r[name].to_dtype(dtype);
    let (unet_limit, loss_limit, grad_limit, cosine_limit) = limits(dtype, products);
    let mut checks = vec![];

    let sample = input("unet.sample")?;
    let x = Tensor::cat(&[&sample, &sample], 0)?;
    let context = input("unet.context")?;
    for t in [981usize, 21] {
        let out = unet.forward(&x, t as f64, &context, None)?;
        let expected = &r[&format!("unet.t{t}.out")];
        checks.push(relative_check(
            format!("UNet forward, t={t}"),
            &out,
            expected,
            unet_limit,
        )?);
    }

    // The guidance loss of the paper on the cross-attention maps, and ∂L/∂x.
    let x = input("grad.x")?;
    let x_ref = input("grad.x_ref")?;
    let mut recorder = Recorder::new(AttentionKind::CrossAttention, Keep::Detached(dtype));
    let pair = Tensor::cat(&[&x_ref, &x_ref], 0)?;
    unet.forward(
        &pair,
        GRADIENT_T,
        &input("grad.context_ref")?,
        Some(&mut recorder),
    )?;
    let reference_maps = recorder.take();
    let leaf = Var::from_tensor(&Tensor::cat(&[&x, &x], 0)?)?;
    let mut edited = Recorder::new(AttentionKind::CrossAttention, Keep::Graph);
    unet.forward(
        leaf.as_tensor(),
        GRADIENT_T,
        &input("grad.context_edit")?,
        Some(&mut edited),
    )?;
    let loss = cross_attention_loss(edited.maps(), &reference_maps)?;
    checks.push(relative_check(
        "guidance loss".into(),
        &loss.reshape(1)?,
        &r["grad.loss"],
        loss_limit,
    )?);
    let grads = loss.backward()?;
    let dx = grads
        .get(leaf.as_tensor())
        .context("no gradient reached the latent")?;
    let expected = &r["grad.dx"];
    checks.push(relative_check(
        "guidance gradient dL/dx".into(),
        dx,
        expected,
        grad_limit,
    )?);
    let cosine = cosine(dx, expected)?;
    checks.push(Check {
        name: "guidance gradient direction".into(),
        error: 1.0 - cosine,
        limit: cosine_limit,
        detail: format!("(1 - cosine; cosine {cosine:.7})"),
    });
    Ok(checks)
}

/// `max |a - b| / max |b|`, with both in f32 on the CPU.
fn relative_check(name: String, a: &Tensor, b: &Tensor, limit: f64) -> Result<Check> {
    let a = a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let b = b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let error = if diff.is_nan() {
        f64::INFINITY
    } else {
        diff / scale.max(1e-30)
    };
    Ok(Check {
        name,
        error,
        limit,
        detail: format!("(max |diff| {diff:.2e} of max |ref| {scale:.2e})"),
    })
}

fn cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?;
    let b = b
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?;
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f64>()?;
    let norms = a.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()
        * b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if norms > 0.0 { dot / norms } else { 0.0 })
}

/// Times one UNet forward of the full-size SD-1.5 architecture (random weights) at `size`².
fn time_full_size(device: &Device, size: usize, warm_up: bool) -> Result<()> {
    let start = Instant::now();
    let unet = UNet::load(random_weights(DType::F32, device).pp("unet"), sd15_unet()?)?;
    let built = start.elapsed().as_secs_f64();
    let mut rng = Rng::new(0);
    let latent = size / 8;
    let x = rng.randn((1, 4, latent, latent), DType::F32, device)?;
    let context = rng.randn((1, 77, 768), DType::F32, device)?;
    let step = || -> Result<f64> {
        let start = Instant::now();
        let out = unet.forward(&x, 500.0, &context, None)?;
        // Reading one value waits for a GPU to finish.
        out.flatten_all()?
            .get(0)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        Ok(start.elapsed().as_secs_f64())
    };
    if warm_up {
        step()?;
    }
    let seconds = step()?;
    println!(
        "timing: one full-size SD-1.5 UNet step (random weights, {size}², batch 1, f32) on the {}: \
         {seconds:.2} s (building the weights took {built:.1} s)",
        describe(device)
    );
    Ok(())
}

/// Every device candle can open here.
fn devices() -> Vec<String> {
    let mut found = vec!["cpu".to_string()];
    if candle_core::utils::cuda_is_available() {
        found.extend(
            (0..16)
                .map_while(|i| Device::new_cuda(i).ok().map(|_| format!("cuda:{i}")))
                .collect::<Vec<_>>(),
        );
        if found.len() == 1 {
            found.push("no CUDA device opened (driver missing?)".into());
        }
    } else {
        found.push("CUDA not compiled in".into());
    }
    if candle_core::utils::metal_is_available() {
        if Device::new_metal(0).is_ok() {
            found.push("metal:0".into());
        }
    } else {
        found.push("Metal not compiled in".into());
    }
    found
}

/// The SIMD features this CPU has that matter for the kernels, detected at run time.
fn cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut found = vec![];
        macro_rules! detect {
            ($($feature:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($feature) {
                    found.push($feature);
                }
            )*};
        }
        detect!(
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512bf16"
        );
        // AMX detection is not stable in std yet; Linux names it in /proc/cpuinfo.
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags: Vec<&str> = flags
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        for (flag, name) in [("amx_tile", "amx-tile"), ("amx_bf16", "amx-bf16")] {
            if flags.contains(&flag) {
                found.push(name);
            }
        }
        found
    }
    #[cfg(target_arch = "aarch64")]
    {
        let mut found = vec![];
        if std::arch::is_aarch64_feature_detected!("neon") {
            found.push("neon");
        }
        if std::arch::is_aarch64_feature_detected!("fp16") {
            found.push("fp16");
        }
        found
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        vec![]
    }
}

/// Which matrix kernels candle's GEMM (the `gemm` crate) picks here at run time.
fn cpu_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                "AVX-512"
            } else {
                "AVX2 + FMA"
            }
        } else {
            "SSE (no AVX2: expect slow runs)"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "portable scalar code"
    }
}
