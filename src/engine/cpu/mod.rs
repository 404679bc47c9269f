//! The CPU's own kernels behind the layer types, and the instruction set they run on.
//!
//! candle's CPU backend runs most elementwise work and every reduction on one thread, lays
//! convolutions out again on every call and builds each result in a fresh buffer. The layers of
//! [`crate::engine::grad_ops`] send f32 work on the CPU here instead:
//! - [`conv`]: convolutions as matrix products over shifted views, weights packed at load time,
//!   and the wider 3×3 layers by Winograd's F(2×2, 3×3) ([`winograd`]);
//! - [`norm`]: group norm fused with the SiLU that follows it, forward and backward;
//! - [`attention`]: attention a block of queries at a time, never holding all the scores;
//! - [`geglu`]: the feed-forward's gated GELU in one pass.
//!
//! The instruction set is found at run time ([`isa`]): AVX-512 where the CPU has it, AVX2 with FMA
//! otherwise, plain Rust elsewhere (ARM included). `P2PZ_CPU` overrides it: `avx2` and `portable`
//! force a narrower path, `candle` turns these kernels off and runs candle's ops (the reference
//! they are tested against). The matrix products are `gemm`'s, which checks the CPU by itself.
//!
//! The products of convolutions and linear layers may instead run in bf16 on AMX tiles, with f32
//! accumulation ([`amx`], [`Products`]): about 2–3× faster where the CPU has AMX, at bf16's
//! precision. It is a choice a command makes before it loads a model, never the default.

pub mod allocator;
pub mod amx;
pub mod attention;
mod attention_amx;
pub mod candle_pool;
mod columns;
pub mod conv;
mod conv_amx;
pub mod geglu;
pub mod linear;
pub mod linear_amx;
mod matmul;
pub mod norm;
mod simd;
#[cfg(test)]
pub(crate) mod test_support;
mod winograd;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Device, Result, Shape, Storage, Tensor};

/// What the kernels of this module are compiled for and may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// candle's own ops; the kernels here are not used.
    Candle,
    /// The kernels here, in plain Rust (what ARM and old x86-64 run).
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512 (F, BW, DQ, VL).
    Avx512,
}

impl Isa {
    /// The best this CPU has.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// The name `P2PZ_CPU` takes for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Candle => "candle",
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// Reads a `P2PZ_CPU` value; a path the CPU lacks is an error that names what it has.
    pub fn from_setting(value: &str, detected: Self) -> std::result::Result<Self, String> {
        let wanted = match value.trim().to_ascii_lowercase().as_str() {
            "" | "native" | "auto" => return Ok(detected),
            "candle" => Self::Candle,
            "portable" => Self::Portable,
            "avx2" => Self::Avx2,
            "avx512" => Self::Avx512,
            other => {
                return Err(format!(
                "P2PZ_CPU={other} is not a CPU path: use native, avx512, avx2, portable or candle"
            ))
            }
        };
        if wanted > detected {
            return Err(format!(
                "P2PZ_CPU={} asks for more than this CPU has (its best is {}); unset it or pick \
                 a narrower path",
                wanted.name(),
                detected.name()
            ));
        }
        Ok(wanted)
    }
}

/// The path the kernels take in this process: `P2PZ_CPU` if set (a bad value is reported once on
/// stderr and ignored), else [`Isa::detected`].
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let detected = Isa::detected();
        match std::env::var("P2PZ_CPU") {
            Ok(value) => Isa::from_setting(&value, detected).unwrap_or_else(|message| {
                eprintln!("warning: {message}; using {}", detected.name());
                detected
            }),
            Err(_) => detected,
        }
    })
}

/// The precision of the convolutions' and linear layers' matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    /// f32, on `gemm`.
    F32,
    /// bf16 operands with f32 accumulation, on AMX tiles.
    Bf16,
}

static BF16_PRODUCTS: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// [`with_products`]'s choice for this thread, over the process's.
    static SCOPED_PRODUCTS: std::cell::Cell<Option<Products>> = const { std::cell::Cell::new(None) };
}

/// The products that weights loaded now, on this thread, are packed for.
pub fn products() -> Products {
    SCOPED_PRODUCTS
        .get()
        .unwrap_or(if BF16_PRODUCTS.load(Ordering::Relaxed) {
            Products::Bf16
        } else {
            Products::F32
        })
}

/// Whether this process can run `products`; the reason when it can't.
fn check(products: Products) -> std::result::Result<(), String> {
    if products == Products::F32 {
        return Ok(());
    }
    amx::enable()?;
    if isa() != Isa::Avx512 {
        return Err(format!(
            "bf16 products need the AVX-512 path, and this process runs {} (P2PZ_CPU)",
            isa().name()
        ));
    }
    Ok(())
}

/// Packs the weights loaded from now on, on any thread, for bf16 products on AMX tiles. Fails,
/// saying why, when this CPU or operating system has no AMX or the kernels are narrowed
/// (`P2PZ_CPU`).
pub fn use_bf16_products() -> std::result::Result<(), String> {
    check(Products::Bf16)?;
    BF16_PRODUCTS.store(true, Ordering::Relaxed);
    Ok(())
}

/// Runs `f` with the weights it loads on this thread packed for `products` (to compare both in
/// one process); fails like [`use_bf16_products`].
pub fn with_products<R>(
    products: Products,
    f: impl FnOnce() -> R,
) -> std::result::Result<R, String> {
    check(products)?;
    let before = SCOPED_PRODUCTS.replace(Some(products));
    let result = f();
    SCOPED_PRODUCTS.set(before);
    Ok(result)
}

/// An output pointer shared by parallel tasks that each write elements no other task touches.
#[derive(Clone, Copy)]
pub(crate) struct DisjointWrites<T = f32>(pub *mut T);

// SAFETY: only built by callers whose tasks write disjoint elements (see each use).
unsafe impl<T> Send for DisjointWrites<T> {}
unsafe impl<T> Sync for DisjointWrites<T> {}

impl<T> DisjointWrites<T> {
    /// The pointer (a method, so that closures capture the whole value, which is `Send`).
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}

/// The threads a matrix product is split over: candle's count (`RAYON_NUM_THREADS`, else the
/// physical cores), worked out once.
///
/// candle works it out anew on every call, and on Linux that parses `/proc/cpuinfo`: about 300
/// times per UNet call, while the other threads wait.
pub(crate) fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// Whether `t` is work for these kernels: f32 on the CPU, with the kernels turned on.
pub fn handles(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu() && isa() != Isa::Candle
}

/// Runs `f` on the elements of an f32 CPU tensor, in row-major order.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        candle_core::bail!(
            "cpu kernel: expected an f32 tensor on the cpu, got {:?}",
            t.dtype()
        )
    };
    let (start, end) = layout
        .contiguous_offsets()
        .expect("contiguous() gives a contiguous layout");
    Ok(f(&data[start..end]))
}

/// A CPU tensor that owns `data`.
pub fn tensor(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_read_and_checked_against_the_cpu() {
        assert_eq!(Isa::from_setting("", Isa::Avx2), Ok(Isa::Avx2));
        assert_eq!(Isa::from_setting(" AVX2 ", Isa::Avx512), Ok(Isa::Avx2));
        assert_eq!(Isa::from_setting("candle", Isa::Portable), Ok(Isa::Candle));
        let too_much = Isa::from_setting("avx512", Isa::Avx2).unwrap_err();
        assert!(too_much.contains("its best is avx2"), "{too_much}");
        let unknown = Isa::from_setting("sse9", Isa::Avx2).unwrap_err();
        assert!(
            unknown.contains("native, avx512, avx2, portable or candle"),
            "{unknown}"
        );
    }
}
