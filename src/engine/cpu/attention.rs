//! Scaled dot-product attention a block of queries at a time, on the projections' own layout.
//!
//! Each task is one head of one image and a block of queries: its scores (`block × keys`) stay
//! in a buffer of about a megabyte, softmaxed in place and multiplied into the output, so the
//! `(heads, queries, keys)` probability tensor never exists; a block holds whole rows of keys,
//! so the softmax is exact in one pass. Queries, keys, values and the output are read and
//! written as `(batch, tokens, heads·d)`, the layout the projections produce, so no head is
//! split off or merged back by copying.
//!
//! The backward recomputes each block's probabilities and needs only `q`, `k`, `v` and the
//! output gradient; it runs one task per head, which owns that head's `∂k` and `∂v`.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::matmul::{product, Matrix};
use super::simd::{self, dispatch};
use super::{tensor, with_f32, Products};

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch.
    pub batch: usize,
    /// Query tokens.
    pub queries: usize,
    /// Key (and value) tokens.
    pub keys: usize,
    /// Heads.
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// The sizes for `q`: `(b, n, heads·d)` and `k`: `(b, m, heads·d)`.
    pub fn of(q: &Tensor, k: &Tensor, heads: usize) -> Result<Self> {
        let (batch, queries, width) = q.dims3()?;
        Ok(Self {
            batch,
            queries,
            keys: k.dim(1)?,
            heads,
            head_dim: width / heads,
        })
    }

    pub(super) fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Queries per block: a block's scores fill about four megabytes (fewer, larger blocks pack
    /// the keys and values fewer times).
    pub(super) fn block(&self) -> usize {
        (1_048_576 / self.keys.max(1))
            .clamp(16, 1024)
            .min(self.queries.max(1))
    }
}

dispatch! {
    /// Each row of `scores` (already scaled) becomes `exp(s − max)`, and its `1/Σ` goes to
    /// `inverse_sums`, so that the caller normalises whichever is smaller: the probabilities,
    /// or the output rows they are multiplied into.
    pub(super) fn exp_rows(scores: &mut [f32], row: usize, inverse_sums: &mut [f32]) {
        for (r, inv) in scores.chunks_mut(row).zip(inverse_sums.iter_mut()) {
            let max = simd::max(r);
            let mut lanes = [0f32; simd::LANES];
            let mut chunks = r.chunks_exact_mut(simd::LANES);
            for chunk in &mut chunks {
                for (v, l) in chunk.iter_mut().zip(lanes.iter_mut()) {
                    *v = simd::exp(*v - max);
                    *l += *v;
                }
            }
            let mut total: f32 = 0.0;
            for v in chunks.into_remainder() {
                *v = simd::exp(*v - max);
                total += *v;
            }
            *inv = 1.0 / (total + lanes.iter().sum::<f32>());
        }
    }
}

dispatch! {
    /// Multiplies each row of `rows` by its factor.
    fn scale_rows(rows: &mut [f32], row: usize, factors: &[f32]) {
        for (r, f) in rows.chunks_mut(row).zip(factors) {
            for v in r {
                *v *= f;
            }
        }
    }
}

/// Each row of `scores` (already scaled) becomes its softmax.
pub(super) fn softmax_rows(scores: &mut [f32], row: usize, inverse_sums: &mut [f32]) {
    exp_rows(scores, row, inverse_sums);
    scale_rows(scores, row, inverse_sums);
}

dispatch! {
    /// `ds = p ⊙ (dp − Σ_row dp⊙p) · scale`, in place of `dp`.
    pub(super) fn softmax_grad_rows(dp: &mut [f32], p: &[f32], row: usize, scale: f32) {
        for (d, p) in dp.chunks_mut(row).zip(p.chunks(row)) {
            let inner = simd::sum_zip(d, p, |a, b| a * b) as f32;
            for (d, p) in d.iter_mut().zip(p) {
                *d = p * (*d - inner) * scale;
            }
        }
    }
}

/// Raw pointers shared by the tasks; each task writes only its own rows and head columns.
#[derive(Clone, Copy)]
pub(super) struct Shared(pub(super) *mut f32);
// SAFETY: tasks write disjoint elements through it (see each use).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that closures capture the whole `Shared`, which is `Sync`).
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// One head of one image: where its `(tokens, d)` slice of a `(batch, tokens, heads·d)` tensor
/// starts.
pub(super) fn head_offset(s: &AttentionShape, image: usize, tokens: usize, head: usize) -> usize {
    image * tokens * s.width() + head * s.head_dim
}

/// `softmax(q·kᵀ·scale)·v` for `q`: `(batch, queries, heads·d)`, `k`, `v`: `(batch, keys,
/// heads·d)`. Returns `(batch, queries, heads·d)`.
pub fn attend(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape, scale: f32) -> Vec<f32> {
    let w = s.width();
    assert_eq!(q.len(), s.batch * s.queries * w, "attention: query size");
    assert_eq!(k.len(), s.batch * s.keys * w, "attention: key size");
    assert_eq!(v.len(), k.len(), "attention: value size");
    let mut out = vec![0f32; q.len()];
    let out_ptr = Shared(out.as_mut_ptr());
    let block = s.block();
    let blocks = s.queries.div_ceil(block);
    (0..s.batch * s.heads * blocks)
        .into_par_iter()
        .for_each_init(
            || (vec![0f32; block * s.keys], vec![0f32; block]),
            |(scores, inverse_sums), task| {
                let (image, head, b) = (
                    task / (s.heads * blocks),
                    (task / blocks) % s.heads,
                    task % blocks,
                );
                let start = b * block;
                let rows = block.min(s.queries - start);
                let q_at = head_offset(&s, image, s.queries, head) + start * w;
                let kv_at = head_offset(&s, image, s.keys, head);
                let scores = &mut scores[..rows * s.keys];
                // SAFETY: the views stay inside `q`, `k`, `v` (rows·w from their offsets); the
                // output rows `start..start + rows` of this head are written by this task only.
                unsafe {
                    product(
                        scores.as_mut_ptr(),
                        s.keys,
                        false,
                        (rows, s.keys, s.head_dim),
                        Matrix::rows(q[q_at..].as_ptr(), w),
                        Matrix::transposed(k[kv_at..].as_ptr(), w),
                        scale,
                        1,
                    );
                    let inverse_sums = &mut inverse_sums[..rows];
                    exp_rows(scores, s.keys, inverse_sums);
                    let out_rows = out_ptr.get().add(q_at);
                    product(
                        out_rows,
                        w,
                        false,
                        (rows, s.head_dim, s.keys),
                        Matrix::rows(scores.as_ptr(), s.keys),
                        Matrix::rows(v[kv_at..].as_ptr(), w),
                        1.0,
                        1,
                    );
                    // The softmax's normalisation, on the `rows × d` output instead of the
                    // `rows × keys` probabilities.
                    // Other tasks write other heads' columns of these rows, so no slice
                    // over the rows is formed: each element is reached through the pointer.
                    for (i, f) in inverse_sums.iter().enumerate() {
                        let start = out_rows.add(i * w);
                        for j in 0..s.head_dim {
                            *start.add(j) *= f;
                        }
                    }
                }
            },
        );
    out
}

/// [`attend`] on f32 CPU tensors `q`: `(b, n, heads·d)`, `k`, `v`: `(b, m, heads·d)`, outside
/// any graph, its products in `products`.
pub fn attend_tensors(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    products: Products,
) -> Result<Tensor> {
    let shape = AttentionShape::of(q, k, heads)?;
    let attend = match products {
        Products::F32 => attend,
        Products::Bf16 => {
            super::amx::enable().map_err(candle_core::Error::Msg)?;
            super::attention_amx::attend
        }
    };
    let out = with_f32(q, |q| {
        with_f32(k, |k| with_f32(v, |v| attend(q, k, v, shape, scale as f32)))
    })???;
    tensor(out, q.shape())
}

/// [`attend_backward`] with its products in `products`.
pub fn attend_backward_in(
    products: Products,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    s: AttentionShape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    match products {
        Products::F32 => attend_backward(q, k, v, g, s, scale),
        Products::Bf16 => {
            super::amx::require();
            super::attention_amx::attend_backward(q, k, v, g, s, scale)
        }
    }
}

/// `(∂L/∂q, ∂L/∂k, ∂L/∂v)` of [`attend`] given `∂L/∂out` (`g`, the shape of `q`).
pub fn attend_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    s: AttentionShape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = s.width();
    assert_eq!(g.len(), q.len(), "attention backward: gradient size");
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    let (dq_ptr, dk_ptr, dv_ptr) = (
        Shared(dq.as_mut_ptr()),
        Shared(dk.as_mut_ptr()),
        Shared(dv.as_mut_ptr()),
    );
    let block = s.block();
    (0..s.batch * s.heads).into_par_iter().for_each(|task| {
        let (image, head) = (task / s.heads, task % s.heads);
        let mut p = vec![0f32; block * s.keys];
        let mut dp = vec![0f32; block * s.keys];
        let mut inverse_sums = vec![0f32; block];
        let kv_at = head_offset(&s, image, s.keys, head);
        for (b, start) in (0..s.queries).step_by(block).enumerate() {
            let rows = block.min(s.queries - start);
            let q_at = head_offset(&s, image, s.queries, head) + start * w;
            let (p, dp) = (&mut p[..rows * s.keys], &mut dp[..rows * s.keys]);
            let (dq_base, dk_base, dv_base) = (dq_ptr.get(), dk_ptr.get(), dv_ptr.get());
            // SAFETY: reads stay inside `q`, `k`, `v`, `g` as in `attend`; this task alone
            // writes head `head` of image `image` in `dq`, `dk` and `dv`.
            unsafe {
                product(
                    p.as_mut_ptr(),
                    s.keys,
                    false,
                    (rows, s.keys, s.head_dim),
                    Matrix::rows(q[q_at..].as_ptr(), w),
                    Matrix::transposed(k[kv_at..].as_ptr(), w),
                    scale,
                    1,
                );
                softmax_rows(p, s.keys, &mut inverse_sums[..rows]);
                // ∂v += pᵀ·g
                product(
                    dv_base.add(kv_at),
                    w,
                    b > 0,
                    (s.keys, s.head_dim, rows),
                    Matrix::transposed(p.as_ptr(), s.keys),
                    Matrix::rows(g[q_at..].as_ptr(), w),
                    1.0,
                    1,
                );
                // ∂p = g·vᵀ, then ∂s in place.
                product(
                    dp.as_mut_ptr(),
                    s.keys,
                    false,
                    (rows, s.keys, s.head_dim),
                    Matrix::rows(g[q_at..].as_ptr(), w),
                    Matrix::transposed(v[kv_at..].as_ptr(), w),
                    1.0,
                    1,
                );
                softmax_grad_rows(dp, p, s.keys, scale);
                // ∂q = ∂s·k
                product(
                    dq_base.add(q_at),
                    w,
                    false,
                    (rows, s.head_dim, s.keys),
                    Matrix::rows(dp.as_ptr(), s.keys),
                    Matrix::rows(k[kv_at..].as_ptr(), w),
                    1.0,
                    1,
                );
                // ∂k += ∂sᵀ·q
                product(
                    dk_base.add(kv_at),
                    w,
                    b > 0,
                    (s.keys, s.head_dim, rows),
                    Matrix::transposed(dp.as_ptr(), s.keys),
                    Matrix::rows(q[q_at..].as_ptr(), w),
                    1.0,
                    1,
                );
            }
        }
    });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use candle_core::{Var, D};

    use super::*;
    use crate::engine::cpu::test_support::{assert_close, random, values};

    /// `(b, n, heads·d)` → `(b, heads, n, d)`.
    fn heads_of(t: &Tensor, heads: usize) -> Tensor {
        let (b, n, c) = t.dims3().unwrap();
        t.reshape((b, n, heads, c / heads))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    }

    /// Output and the three gradients against candle's matmuls and a softmax of basic ops
    /// (which its autograd differentiates), with blocks that don't divide the queries.
    #[test]
    fn matches_candle_attention_and_its_gradients() {
        // (batch, queries, keys, heads, head_dim)
        for (seed, &(batch, queries, keys, heads, head_dim)) in [
            (1, 37, 37, 2, 8),
            (2, 300, 77, 3, 5),
            (1, 2000, 130, 1, 4),
            (2, 1, 9, 4, 3),
        ]
        .iter()
        .enumerate()
        {
            let what = format!("b{batch} n{queries} m{keys} h{heads} d{head_dim}");
            let seed = seed as u64 * 10;
            let width = heads * head_dim;
            let q = random(&[batch, queries, width], seed);
            let k = random(&[batch, keys, width], seed + 1);
            let v = random(&[batch, keys, width], seed + 2);
            let g = random(&[batch, queries, width], seed + 3);
            let scale = 1.0 / (head_dim as f64).sqrt();
            let shape = AttentionShape {
                batch,
                queries,
                keys,
                heads,
                head_dim,
            };

            let vars: Vec<Var> = [&q, &k, &v]
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let (qh, kh, vh) = (
                heads_of(vars[0].as_tensor(), heads),
                heads_of(vars[1].as_tensor(), heads),
                heads_of(vars[2].as_tensor(), heads),
            );
            let scores = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap();
            let shifted = scores
                .broadcast_sub(&scores.max_keepdim(D::Minus1).unwrap().detach())
                .unwrap()
                .exp()
                .unwrap();
            let probs = shifted
                .broadcast_div(&shifted.sum_keepdim(D::Minus1).unwrap())
                .unwrap();
            let reference = probs
                .matmul(&vh)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((batch, queries, width))
                .unwrap();
            let out = attend(&values(&q), &values(&k), &values(&v), shape, scale as f32);
            assert_close(&out, &values(&reference), 3e-5, &format!("{what}: output"));

            let grads = (reference * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (dq, dk, dv) = attend_backward(
                &values(&q),
                &values(&k),
                &values(&v),
                &values(&g),
                shape,
                scale as f32,
            );
            for (name, ours, var) in [
                ("dq", dq, &vars[0]),
                ("dk", dk, &vars[1]),
                ("dv", dv, &vars[2]),
            ] {
                let reference = values(grads.get(var.as_tensor()).unwrap());
                assert_close(&ours, &reference, 3e-5, &format!("{what}: {name}"));
            }
        }
    }
}
