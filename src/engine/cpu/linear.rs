//! Linear layers on f32 weights in PyTorch's `(out_features, in_features)` layout, read where
//! they lie (usually in place in the weights file's mapping), as `gemm` products.

use super::matmul::{product, Matrix};

/// The sizes of one linear product: `rows` input vectors of `in_features` → `out_features`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    /// Input vectors (every dimension of the input but the last).
    pub rows: usize,
    /// Length of an input vector.
    pub in_features: usize,
    /// Length of an output vector.
    pub out_features: usize,
}

/// `x·Wᵀ + bias`: `x` is `(rows, in_features)`, `weight` `(out_features, in_features)`, both
/// row-major; returns `(rows, out_features)`.
pub fn forward(x: &[f32], weight: &[f32], bias: Option<&[f32]>, shape: LinearShape) -> Vec<f32> {
    let LinearShape {
        rows,
        in_features,
        out_features,
    } = shape;
    assert_eq!(x.len(), rows * in_features, "input size");
    assert_eq!(weight.len(), out_features * in_features, "weight size");
    let mut y = match bias {
        Some(bias) => {
            assert_eq!(bias.len(), out_features, "bias size");
            bias.repeat(rows)
        }
        None => vec![0f32; rows * out_features],
    };
    // SAFETY: `x` is `rows × in_features`, the transposed view of `weight` is
    // `in_features × out_features` and `y` is `rows × out_features`, all checked above.
    unsafe {
        product(
            y.as_mut_ptr(),
            out_features,
            bias.is_some(),
            (rows, out_features, in_features),
            Matrix::rows(x.as_ptr(), in_features),
            Matrix::transposed(weight.as_ptr(), in_features),
            1.0,
            rayon::current_num_threads(),
        );
    }
    y
}

/// `∂L/∂x = g·W` given `g = ∂L/∂y` of shape `(rows, out_features)`; returns
/// `(rows, in_features)`.
pub fn input_grad(g: &[f32], weight: &[f32], shape: LinearShape) -> Vec<f32> {
    let LinearShape {
        rows,
        in_features,
        out_features,
    } = shape;
    assert_eq!(g.len(), rows * out_features, "gradient size");
    assert_eq!(weight.len(), out_features * in_features, "weight size");
    let mut dx = vec![0f32; rows * in_features];
    // SAFETY: `g` is `rows × out_features`, `weight` `out_features × in_features` and `dx`
    // `rows × in_features`, all checked above.
    unsafe {
        product(
            dx.as_mut_ptr(),
            in_features,
            false,
            (rows, in_features, out_features),
            Matrix::rows(g.as_ptr(), out_features),
            Matrix::rows(weight.as_ptr(), in_features),
            1.0,
            rayon::current_num_threads(),
        );
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::test_support::{assert_close, random, values};

    /// Odd sizes, with and without a bias, against candle's matmul on the same values.
    #[test]
    fn forward_and_input_grad_match_candle() {
        for (case, (rows, in_features, out_features)) in
            [(1, 1, 1), (7, 13, 5), (77, 320, 1280), (130, 64, 33)]
                .into_iter()
                .enumerate()
        {
            let shape = LinearShape {
                rows,
                in_features,
                out_features,
            };
            let seed = 10 * case as u64;
            let x = random(&[rows, in_features], seed);
            let w = random(&[out_features, in_features], seed + 1);
            let b = random(&[out_features], seed + 2);
            let g = random(&[rows, out_features], seed + 3);
            let plain = x.matmul(&w.t().unwrap()).unwrap();
            let with_bias = plain.broadcast_add(&b).unwrap();
            let (xv, wv, bv) = (values(&x), values(&w), values(&b));
            let what = format!("case {case}");
            assert_close(
                &forward(&xv, &wv, None, shape),
                &values(&plain),
                1e-6,
                &what,
            );
            let biased = forward(&xv, &wv, Some(&bv), shape);
            assert_close(&biased, &values(&with_bias), 1e-6, &what);
            let dx = input_grad(&values(&g), &wv, shape);
            assert_close(&dx, &values(&g.matmul(&w).unwrap()), 1e-6, &what);
        }
    }
}
