//! Linear layers (`y = x·Wᵀ`) on AMX tiles: bf16 operands, f32 accumulation.
//!
//! `Wᵀ` is packed into `b` tiles at load time; the rows of `x` are rounded to bf16 on each call,
//! which is the layout of `a` tiles already. The input gradient's `W` is packed on its first use.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::amx::{
    bf16, round_up, sum_of_products, Operand, Term, TileWalk, Tiles, BLOCK, TILE, TILE_K,
};

/// A `(out_features, in_features)` weight as AMX tiles.
#[derive(Debug)]
pub struct TileLinear {
    /// `Wᵀ`: `k` = input feature, column = output feature.
    transposed: Tiles,
    /// `W`: `k` = output feature, column = input feature, for the input gradient.
    weight: OnceLock<Tiles>,
}

impl TileLinear {
    /// Packs a row-major `(out_features, in_features)` weight.
    pub fn pack(weight: &[f32], out_features: usize, in_features: usize) -> Self {
        assert_eq!(weight.len(), out_features * in_features, "weight size");
        super::amx::require();
        Self {
            transposed: Tiles::pack(Operand::B, in_features, out_features, |i, o| {
                weight[o * in_features + i]
            }),
            weight: OnceLock::new(),
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.transposed.cols
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.transposed.rows
    }

    /// The weight back as row-major f32 (the values of its bf16 elements).
    pub fn unpack(&self) -> Vec<f32> {
        let (o_n, i_n) = (self.out_features(), self.in_features());
        let mut weight = vec![0f32; o_n * i_n];
        for (o, row) in weight.chunks_mut(i_n).enumerate() {
            for (i, w) in row.iter_mut().enumerate() {
                *w = self.transposed.get(i, o);
            }
        }
        weight
    }

    /// `x·Wᵀ + bias` for the rows of `x` (`rows × in_features`).
    pub fn forward(&self, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        apply(&self.transposed, x, bias)
    }

    /// `g·W`: the input gradient, for the rows of `g` (`rows × out_features`).
    pub fn input_grad(&self, g: &[f32]) -> Vec<f32> {
        let weight = self.weight.get_or_init(|| {
            let t = &self.transposed;
            Tiles::pack(Operand::B, t.cols, t.rows, |o, i| t.get(i, o))
        });
        apply(weight, g, None)
    }
}

/// `x·b + bias` for the rows of `x`, `b.rows` wide.
fn apply(b: &Tiles, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (k, n) = (b.rows, b.cols);
    assert_eq!(x.len() % k, 0, "rows of {k} features");
    let rows = x.len() / k;
    let k_padded = b.k_blocks() * TILE_K;
    let (rows_padded, n_padded) = (round_up(rows, BLOCK), round_up(n, BLOCK));
    let mut a = vec![0u16; rows_padded * k_padded];
    a.par_chunks_mut(k_padded)
        .zip(x.par_chunks(k))
        .for_each(|(dst, src)| {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = bf16(*s);
            }
        });
    let walk = TileWalk {
        row_stride: k_padded * 2,
        tile_step: TILE * k_padded * 2,
        k_step: TILE_K * 2,
    };
    let mut wide = vec![0f32; rows_padded * n_padded];
    let term = Term {
        a: a.as_ptr().cast(),
        b: b.as_ptr(),
    };
    // SAFETY: `a` is `rows_padded × k_padded` bf16, `b` covers `k_blocks × n_padded`, `wide` is
    // `rows_padded × n_padded`.
    unsafe {
        sum_of_products(
            wide.as_mut_ptr(),
            n_padded,
            (rows_padded, n_padded),
            b.k_blocks(),
            &[term],
            walk,
            b.walk(),
        )
    };
    let mut out = if n_padded == n {
        wide.truncate(rows * n);
        wide
    } else {
        let mut out = vec![0f32; rows * n];
        out.par_chunks_mut(n)
            .zip(wide.par_chunks(n_padded))
            .for_each(|(d, s)| d.copy_from_slice(&s[..n]));
        out
    };
    if let Some(bias) = bias {
        out.par_chunks_mut(n).for_each(|row| {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::amx::{enable, f32_of};
    use crate::engine::cpu::test_support::{random, values};

    /// Forward and input gradient against f32 sums over the same bf16-rounded operands.
    #[test]
    fn matches_plain_sums_of_the_rounded_operands() {
        if enable().is_err() {
            eprintln!("skipped: no AMX on this machine");
            return;
        }
        let (rows, i_n, o_n) = (19, 45, 37);
        let w = values(&random(&[o_n, i_n], 1));
        let x = values(&random(&[rows, i_n], 2));
        let g = values(&random(&[rows, o_n], 3));
        let bias = values(&random(&[o_n], 4));
        let layer = TileLinear::pack(&w, o_n, i_n);
        let round = |v: f32| f32_of(bf16(v)) as f64;
        assert_eq!(
            layer.unpack(),
            w.iter().map(|v| round(*v) as f32).collect::<Vec<_>>()
        );
        let y = layer.forward(&x, Some(&bias));
        let dx = layer.input_grad(&g);
        for r in 0..rows {
            for o in 0..o_n {
                let want: f64 = (0..i_n)
                    .map(|i| round(x[r * i_n + i]) * round(w[o * i_n + i]))
                    .sum::<f64>()
                    + bias[o] as f64;
                assert!((y[r * o_n + o] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
            }
            for i in 0..i_n {
                let want: f64 = (0..o_n)
                    .map(|o| round(g[r * o_n + o]) * round(w[o * i_n + i]))
                    .sum();
                assert!((dx[r * i_n + i] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
            }
        }
    }
}
