//! Loops written once in plain Rust and compiled for each instruction set, chosen at run time.
//!
//! [`dispatch!`] turns a function into three copies, for AVX-512, AVX2+FMA and no extension, and
//! calls the one [`super::isa`] picked. The bodies are plain loops over slices that LLVM
//! vectorizes; what it can't vectorize by itself (sums, whose order it must keep, and `exp`,
//! which is a library call) is written here in a form it can: sums in [`LANES`] independent
//! accumulators, and an `exp` of its own.

/// Independent accumulators of a vectorizable sum: one AVX-512 register of f32.
pub const LANES: usize = 16;

/// Defines `fn name(args) -> ret` whose body runs compiled for the best instruction set
/// [`super::isa`] allows.
macro_rules! dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match $crate::engine::cpu::isa() {
                    // SAFETY: `isa()` picks a path only when the CPU has its features.
                    $crate::engine::cpu::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::engine::cpu::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// `Σ x`, in f64 across blocks of f32 lanes (accurate for millions of elements).
#[inline(always)]
pub fn sum(x: &[f32]) -> f64 {
    sum_map(x, |v| v)
}

/// `Σ f(x)`, as [`sum`].
#[inline(always)]
pub fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    const BLOCK: usize = 64 * LANES;
    let mut total = 0f64;
    for block in x.chunks(BLOCK) {
        let mut lanes = [0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(chunk) {
                *l += f(*v);
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|v| f(*v)).sum();
        total += (lanes.iter().sum::<f32>() + tail) as f64;
    }
    total
}

/// `Σ f(x, y)` over two slices of one length, as [`sum`].
#[inline(always)]
pub fn sum_zip(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    const BLOCK: usize = 64 * LANES;
    let mut total = 0f64;
    for (bx, by) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
        let mut lanes = [0f32; LANES];
        let mut cx = bx.chunks_exact(LANES);
        let mut cy = by.chunks_exact(LANES);
        for (a, b) in (&mut cx).zip(&mut cy) {
            for ((l, u), v) in lanes.iter_mut().zip(a).zip(b) {
                *l += f(*u, *v);
            }
        }
        let tail: f32 = cx
            .remainder()
            .iter()
            .zip(cy.remainder())
            .map(|(u, v)| f(*u, *v))
            .sum();
        total += (lanes.iter().sum::<f32>() + tail) as f64;
    }
    total
}

/// `max x` (−∞ for an empty slice).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l = l.max(*v);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(lanes.iter())
        .fold(f32::NEG_INFINITY, |m, v| m.max(*v))
}

/// `eˣ` to about 2 ulp, branch-free so that loops over it vectorize; 0 below −87, and the
/// largest finite-range value above 88.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two (Cody and Waite) so that `k·LN2_HI` is exact.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer held in the low mantissa bits: `k` as a float and as
    // an integer without a float-to-int conversion (Rust's saturating `as` doesn't vectorize).
    const ROUNDER: f32 = 12_582_912.0;
    let below = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2_E + ROUNDER;
    let k = shifted - ROUNDER;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Taylor to r⁷ on |r| ≤ ln2/2: truncation below 1e-8.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let k_int = shifted.to_bits().wrapping_sub(ROUNDER.to_bits());
    let scale = f32::from_bits(k_int.wrapping_add(127) << 23);
    if below {
        0.0
    } else {
        p * scale
    }
}

/// The logistic function `1 / (1 + e⁻ˣ)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_the_library_one() {
        let mut worst = 0f64;
        for i in -100_000..=100_000 {
            let x = i as f32 * 8.7e-4;
            let (ours, reference) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((ours - reference).abs() / reference);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(-200.0), 0.0);
        assert!(exp(88.0).is_finite());
    }

    #[test]
    fn sums_and_max_match_plain_loops_on_ragged_lengths() {
        for n in [0, 1, 15, 16, 17, 1023, 1024, 5000] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32) * 0.01 - 0.4)
                .collect();
            let y: Vec<f32> = x.iter().map(|v| v * 1.5 + 0.1).collect();
            let plain: f64 = x.iter().map(|v| *v as f64).sum();
            assert!((sum(&x) - plain).abs() < 1e-3, "{n}");
            let plain_zip: f64 = x.iter().zip(&y).map(|(a, b)| (a * b) as f64).sum();
            assert!(
                (sum_zip(&x, &y, |a, b| a * b) - plain_zip).abs() < 1e-3,
                "{n}"
            );
            let plain_max = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
            assert_eq!(max(&x), plain_max, "{n}");
        }
    }
}
