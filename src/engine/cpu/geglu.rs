//! The GEGLU of the transformer's feed-forward, `a · gelu(gate)` with `[a, gate]` the two
//! halves of each row, in one pass instead of candle's view, GELU and product passes; and its
//! backward, which needs only the rows.

use rayon::prelude::*;

use super::simd::{self, dispatch};

/// `erf(x)` to about 5e-7 in f32 (Abramowitz and Stegun 7.1.26, 1.5e-7 in exact arithmetic),
/// branch-free.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let t = 1.0 / (1.0 + P * x.abs());
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * simd::exp(-x * x);
    y.copysign(x)
}

/// `gelu(z) = z·Φ(z)` with the exact (erf) Φ, as diffusers' GEGLU uses.
#[inline(always)]
fn gelu_and_derivative(z: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    // 1/√(2π)
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf(z * FRAC_1_SQRT_2));
    let pdf = INV_SQRT_2PI * simd::exp(-0.5 * z * z);
    (z * cdf, cdf + z * pdf)
}

/// Rows per task.
const ROWS_PER_TASK: usize = 64;

dispatch! {
    fn geglu_rows(out: &mut [f32], h: &[f32], inner: usize) {
        for (out, row) in out.chunks_mut(inner).zip(h.chunks(2 * inner)) {
            let (a, gate) = row.split_at(inner);
            for ((o, a), z) in out.iter_mut().zip(a).zip(gate) {
                *o = a * gelu_and_derivative(*z).0;
            }
        }
    }
}

dispatch! {
    fn geglu_grad_rows(dh: &mut [f32], h: &[f32], g: &[f32], inner: usize) {
        for ((dh, row), g) in dh.chunks_mut(2 * inner).zip(h.chunks(2 * inner)).zip(g.chunks(inner)) {
            let (a, gate) = row.split_at(inner);
            let (da, dgate) = dh.split_at_mut(inner);
            for i in 0..inner {
                let (gelu, slope) = gelu_and_derivative(gate[i]);
                da[i] = g[i] * gelu;
                dgate[i] = g[i] * a[i] * slope;
            }
        }
    }
}

/// `a · gelu(gate)` for `h`: rows of `[a, gate]`, each half `inner` wide. Returns rows of `inner`.
pub fn forward(h: &[f32], inner: usize) -> Vec<f32> {
    assert!(
        inner > 0 && h.len().is_multiple_of(2 * inner),
        "geglu: row width"
    );
    let mut out = vec![0f32; h.len() / 2];
    out.par_chunks_mut(ROWS_PER_TASK * inner)
        .zip(h.par_chunks(ROWS_PER_TASK * 2 * inner))
        .for_each(|(out, h)| geglu_rows(out, h, inner));
    out
}

/// `∂L/∂h` given `∂L/∂out` (`g`, rows of `inner`).
pub fn backward(h: &[f32], g: &[f32], inner: usize) -> Vec<f32> {
    assert_eq!(h.len(), 2 * g.len(), "geglu backward: sizes");
    let mut dh = vec![0f32; h.len()];
    dh.par_chunks_mut(ROWS_PER_TASK * 2 * inner)
        .zip(h.par_chunks(ROWS_PER_TASK * 2 * inner))
        .zip(g.par_chunks(ROWS_PER_TASK * inner))
        .for_each(|((dh, h), g)| geglu_grad_rows(dh, h, g, inner));
    dh
}

#[cfg(test)]
mod tests {
    use candle_core::{Var, D};

    use super::*;
    use crate::engine::cpu::test_support::{max_error, random, values};

    #[test]
    fn erf_is_close_to_the_library_one() {
        let worst = (-3000..=3000)
            .map(|i| {
                let x = i as f32 * 1e-3;
                (erf(x) as f64 - series_erf(x as f64)).abs()
            })
            .fold(0f64, f64::max);
        assert!(worst < 6e-7, "{worst}");
        for x in [3.5f32, 5.0, 9.0, 40.0] {
            assert!(
                (erf(x) - 1.0).abs() < 1e-6 && (erf(-x) + 1.0).abs() < 1e-6,
                "{x}"
            );
        }
    }

    /// erf by its Maclaurin series in f64 (accurate to 1e-12 for |x| ≤ 3).
    fn series_erf(x: f64) -> f64 {
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// Against candle's `gelu_erf` and product, and its autograd, on a row count that doesn't
    /// divide the task size.
    #[test]
    fn matches_candle_geglu_and_its_gradient() {
        let (rows, inner) = (150, 24);
        let h = (random(&[rows, 2 * inner], 7) * 2.0).unwrap();
        let g = random(&[rows, inner], 8);
        let h_var = Var::from_tensor(&h).unwrap();
        let (a, gate) = (
            h_var.as_tensor().narrow(D::Minus1, 0, inner).unwrap(),
            h_var.as_tensor().narrow(D::Minus1, inner, inner).unwrap(),
        );
        let reference = (a * gate.gelu_erf().unwrap()).unwrap();
        let out = forward(&values(&h), inner);
        let error = max_error(&out, &values(&reference));
        assert!(error < 1e-5, "forward error {error}");
        let grads = (reference * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dh_reference = values(grads.get(h_var.as_tensor()).unwrap());
        let dh = backward(&values(&h), &values(&g), inner);
        let error = max_error(&dh, &dh_reference);
        assert!(error < 2e-5, "gradient error {error}");
    }
}
