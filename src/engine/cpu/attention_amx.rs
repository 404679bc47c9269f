//! [`super::attention`]'s forward on AMX tiles: `q·kᵀ` and `p·v` with bf16 operands and f32
//! sums, the softmax in f32.
//!
//! Each head's `kᵀ` and `v` are packed into `b` tiles once per call; each task then takes a
//! block of queries of one head, rounds them (scaled) to bf16, computes its scores, softmaxes
//! them in place, rounds the probabilities to bf16 and multiplies them into the output rows, which
//! it normalises as the f32 path does.
//!
//! The backward follows [`super::attention::attend_backward`]: one task per head, each block's
//! probabilities recomputed, its five products on the tiles and the softmax's gradient in f32.

use rayon::prelude::*;

use super::amx::{
    bf16, round_up, sum_of_products_here, Operand, Term, TileWalk, Tiles, BLOCK, TILE, TILE_K,
};
use super::attention::{head_offset, softmax_grad_rows, softmax_rows, AttentionShape, Shared};
use super::simd::{self, dispatch};

dispatch! {
    /// `exp(s − max)` of a row of (scaled) scores, rounded to bf16 into `probs`; returns the
    /// `1/Σ` that normalises the row.
    fn exp_row_to_bf16(scores: &[f32], probs: &mut [u16]) -> f32 {
        let max = simd::max(scores);
        let mut lanes = [0f32; simd::LANES];
        let mut scores = scores.chunks_exact(simd::LANES);
        let mut probs = probs.chunks_exact_mut(simd::LANES);
        for (s, p) in (&mut scores).zip(&mut probs) {
            for ((x, out), lane) in s.iter().zip(p.iter_mut()).zip(lanes.iter_mut()) {
                let e = simd::exp(*x - max);
                *lane += e;
                *out = bf16(e);
            }
        }
        let mut total = 0f32;
        for (x, out) in scores.remainder().iter().zip(probs.into_remainder()) {
            let e = simd::exp(*x - max);
            total += e;
            *out = bf16(e);
        }
        1.0 / (total + lanes.iter().sum::<f32>())
    }
}

dispatch! {
    /// `x·scale` rounded to bf16 into `dst`.
    fn scaled_to_bf16(x: &[f32], scale: f32, dst: &mut [u16]) {
        for (d, v) in dst.iter_mut().zip(x) {
            *d = bf16(v * scale);
        }
    }
}

/// Row-major bf16 rows as `a` tiles: rows `columns` elements apart.
fn rows_walk(columns: usize) -> TileWalk {
    TileWalk {
        row_stride: columns * 2,
        tile_step: TILE * columns * 2,
        k_step: TILE_K * 2,
    }
}

/// `softmax(q·kᵀ·scale)·v`, as [`super::attention::attend`], on the tiles.
pub fn attend(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape, scale: f32) -> Vec<f32> {
    let (w, d) = (s.width(), s.head_dim);
    assert_eq!(q.len(), s.batch * s.queries * w, "attention: query size");
    assert_eq!(k.len(), s.batch * s.keys * w, "attention: key size");
    assert_eq!(v.len(), k.len(), "attention: value size");
    let packed: Vec<(Tiles, Tiles)> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|task| {
            let at = head_offset(&s, task / s.heads, s.keys, task % s.heads);
            (
                Tiles::pack(Operand::B, d, s.keys, |j, key| k[at + key * w + j]),
                Tiles::pack(Operand::B, s.keys, d, |key, j| v[at + key * w + j]),
            )
        })
        .collect();
    let (d_padded, keys_padded) = (round_up(d, TILE_K), round_up(s.keys, BLOCK));
    let d_out = round_up(d, BLOCK);
    let block = round_up(s.block(), BLOCK);
    let blocks = s.queries.div_ceil(block);
    let mut out = vec![0f32; q.len()];
    let out_ptr = Shared(out.as_mut_ptr());
    (0..s.batch * s.heads * blocks)
        .into_par_iter()
        .for_each_init(
            || Scratch::new(block, d_padded, keys_padded, d_out),
            |scratch, task| {
                let (image, head, b) = (
                    task / (s.heads * blocks),
                    (task / blocks) % s.heads,
                    task % blocks,
                );
                let (k_tiles, v_tiles) = &packed[image * s.heads + head];
                let start = b * block;
                let rows = block.min(s.queries - start);
                let rows_padded = round_up(rows, BLOCK);
                let q_at = head_offset(&s, image, s.queries, head) + start * w;
                for (i, dst) in scratch.queries.chunks_mut(d_padded).take(rows).enumerate() {
                    scaled_to_bf16(&q[q_at + i * w..q_at + i * w + d], scale, dst);
                }
                // SAFETY: the query rows are `rows_padded × d_padded` bf16, `k_tiles` covers its
                // `k` blocks and `keys_padded` columns, the scores are `rows_padded × keys_padded`.
                unsafe {
                    sum_of_products_here(
                        scratch.scores.as_mut_ptr(),
                        keys_padded,
                        (rows_padded, keys_padded),
                        k_tiles.k_blocks(),
                        &[Term {
                            a: scratch.queries.as_ptr().cast(),
                            b: k_tiles.as_ptr(),
                        }],
                        rows_walk(d_padded),
                        k_tiles.walk(),
                    )
                };
                for (i, row) in scratch.scores.chunks(keys_padded).take(rows).enumerate() {
                    let probs = &mut scratch.probs[i * keys_padded..i * keys_padded + s.keys];
                    scratch.inverse_sums[i] = exp_row_to_bf16(&row[..s.keys], probs);
                }
                // SAFETY: the probabilities are `rows_padded × keys_padded` bf16 (zero past the
                // keys), `v_tiles` covers those `k` blocks and `d_out` columns.
                unsafe {
                    sum_of_products_here(
                        scratch.out.as_mut_ptr(),
                        d_out,
                        (rows_padded, d_out),
                        v_tiles.k_blocks(),
                        &[Term {
                            a: scratch.probs.as_ptr().cast(),
                            b: v_tiles.as_ptr(),
                        }],
                        rows_walk(keys_padded),
                        v_tiles.walk(),
                    )
                };
                // SAFETY: rows `start..start + rows` of this head's columns are this task's
                // alone; other tasks write other columns of the same rows, so no slice is formed.
                unsafe {
                    let out_rows = out_ptr.get().add(q_at);
                    for (i, f) in scratch.inverse_sums[..rows].iter().enumerate() {
                        let src = &scratch.out[i * d_out..i * d_out + d];
                        for (j, x) in src.iter().enumerate() {
                            *out_rows.add(i * w + j) = x * f;
                        }
                    }
                }
            },
        );
    out
}

dispatch! {
    /// Rounds `x` to bf16 into `dst`.
    fn to_bf16(x: &[f32], dst: &mut [u16]) {
        for (d, v) in dst.iter_mut().zip(x) {
            *d = bf16(*v);
        }
    }
}

dispatch! {
    /// Rows `2r` and `2r + 1` of `x` (`stride` wide) interleaved element by element into row `r`
    /// of `dst`, bf16: the `b`-tile layout of `x` as a `(padded_rows, stride)` operand whose rows
    /// past `rows` are zero.
    fn row_pairs(x: &[f32], rows: usize, padded_rows: usize, stride: usize, dst: &mut [u16]) {
        for (pair, out) in dst.chunks_mut(2 * stride).take(padded_rows / 2).enumerate() {
            if 2 * pair >= rows {
                out.fill(0);
                continue;
            }
            let first = &x[2 * pair * stride..(2 * pair + 1) * stride];
            if 2 * pair + 1 < rows {
                let second = &x[(2 * pair + 1) * stride..(2 * pair + 2) * stride];
                for ((o, a), b) in out.chunks_exact_mut(2).zip(first).zip(second) {
                    o[0] = bf16(*a);
                    o[1] = bf16(*b);
                }
            } else {
                for (o, a) in out.chunks_exact_mut(2).zip(first) {
                    o[0] = bf16(*a);
                    o[1] = 0;
                }
            }
        }
    }
}

/// Where the tiles of [`row_pairs`]' output lie.
fn pairs_walk(stride: usize) -> TileWalk {
    TileWalk {
        row_stride: stride * 4,
        tile_step: TILE * 4,
        k_step: TILE * stride * 4,
    }
}

/// Head columns `0..d` of `rows` rows of `x` (rows `w` apart from `at`), transposed into `dst`
/// as bf16 rows `dst_stride` long: `dst[j][i] = x[at + i·w + j]`.
fn columns_to_bf16(
    x: &[f32],
    at: usize,
    (rows, d, w): (usize, usize, usize),
    dst: &mut [u16],
    dst_stride: usize,
) {
    for (i, src) in (0..rows)
        .map(|i| &x[at + i * w..at + i * w + d])
        .enumerate()
    {
        for (j, v) in src.iter().enumerate() {
            dst[j * dst_stride + i] = bf16(*v);
        }
    }
}

/// `dst (m × n) = a · b` on this thread, `a` row-major bf16 with `a_columns` columns.
///
/// # Safety
/// `a` must hold `m` rows of `b.k_blocks()·32` elements (`a_columns` apart), `dst` `m × n` f32,
/// and `m`, `n` be multiples of [`BLOCK`] within `b`'s padded columns.
unsafe fn rows_times(
    dst: &mut [f32],
    (m, n): (usize, usize),
    a: &[u16],
    a_columns: usize,
    b: &Tiles,
) {
    debug_assert!(dst.len() >= m * n && a.len() >= m * a_columns);
    // SAFETY: forwarded from the caller.
    unsafe {
        sum_of_products_here(
            dst.as_mut_ptr(),
            n,
            (m, n),
            b.k_blocks(),
            &[Term {
                a: a.as_ptr().cast(),
                b: b.as_ptr(),
            }],
            rows_walk(a_columns),
            b.walk(),
        )
    }
}

/// `dst (m × n) = a · b` on this thread, `a` row-major bf16 (`a_columns` wide), `b` as
/// [`row_pairs`] wrote it (`n` wide, `a_columns` rows).
///
/// # Safety
/// The operands must hold those sizes, and `m`, `n`, `a_columns` be multiples of [`BLOCK`].
unsafe fn columns_times_pairs(
    dst: &mut [f32],
    (m, n): (usize, usize),
    a: &[u16],
    a_columns: usize,
    b: &[u16],
) {
    debug_assert!(dst.len() >= m * n && a.len() >= m * a_columns && b.len() >= a_columns * n);
    // SAFETY: forwarded from the caller.
    unsafe {
        sum_of_products_here(
            dst.as_mut_ptr(),
            n,
            (m, n),
            a_columns / TILE_K,
            &[Term {
                a: a.as_ptr().cast(),
                b: b.as_ptr().cast(),
            }],
            rows_walk(a_columns),
            pairs_walk(n),
        )
    }
}

/// `sum += xᵀ·y` for one block of queries on the tiles, where `x` is the block's head columns
/// and `y` its `rows × keys_padded` f32 rows: a key or value gradient, transposed
/// (`d_out × keys_padded`).
struct TransposedProducts {
    columns: Vec<u16>,
    pairs: Vec<u16>,
    out: Vec<f32>,
    /// Head width, tensor width, and head width padded to whole blocks.
    widths: (usize, usize, usize),
    keys_padded: usize,
}

impl TransposedProducts {
    fn new(block: usize, widths: (usize, usize, usize), keys_padded: usize) -> Self {
        Self {
            columns: vec![0; widths.2 * block],
            pairs: vec![0; block * keys_padded],
            out: vec![0.0; widths.2 * keys_padded],
            widths,
            keys_padded,
        }
    }

    /// Adds the block's product to `sum`; `x`'s rows start at `at`, `rows` of them
    /// (`rows_padded` with the padding).
    fn add(
        &mut self,
        sum: &mut [f32],
        x: &[f32],
        at: usize,
        y: &[f32],
        (rows, rows_padded): (usize, usize),
    ) {
        let (d, w, d_out) = self.widths;
        columns_to_bf16(x, at, (rows, d, w), &mut self.columns, rows_padded);
        row_pairs(y, rows, rows_padded, self.keys_padded, &mut self.pairs);
        // SAFETY: `columns` is `d_out × rows_padded`, the pairs `rows_padded × keys_padded`;
        // columns past `rows` meet the zero pairs past it.
        unsafe {
            columns_times_pairs(
                &mut self.out,
                (d_out, self.keys_padded),
                &self.columns,
                rows_padded,
                &self.pairs,
            )
        };
        add(sum, &self.out);
    }
}

/// `(∂L/∂q, ∂L/∂k, ∂L/∂v)` of [`attend`], as [`super::attention::attend_backward`], on the tiles.
pub fn attend_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    s: AttentionShape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (w, d) = (s.width(), s.head_dim);
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
    let (d_padded, keys_padded, d_out) = (
        round_up(d, TILE_K),
        round_up(s.keys, BLOCK),
        round_up(d, BLOCK),
    );
    let block = round_up(s.block(), BLOCK);
    (0..s.batch * s.heads).into_par_iter().for_each(|task| {
        let (image, head) = (task / s.heads, task % s.heads);
        let kv_at = head_offset(&s, image, s.keys, head);
        let k_t = Tiles::pack(Operand::B, d, s.keys, |j, key| k[kv_at + key * w + j]);
        let v_t = Tiles::pack(Operand::B, d, s.keys, |j, key| v[kv_at + key * w + j]);
        let k_rows = Tiles::pack(Operand::B, s.keys, d, |key, j| k[kv_at + key * w + j]);
        let mut rows_bf16 = vec![0u16; block * d_padded];
        let mut p = vec![0f32; block * keys_padded];
        let mut dp = vec![0f32; block * keys_padded];
        let mut wide_bf16 = vec![0u16; block * keys_padded];
        let mut inverse_sums = vec![0f32; block];
        let mut narrow = vec![0f32; keys_padded.max(block) * d_out];
        let mut transposed = TransposedProducts::new(block, (d, w, d_out), keys_padded);
        let (mut dk_sum, mut dv_sum) = (
            vec![0f32; keys_padded * d_out],
            vec![0f32; keys_padded * d_out],
        );
        for start in (0..s.queries).step_by(block) {
            let rows = block.min(s.queries - start);
            let rows_padded = round_up(rows, BLOCK);
            let q_at = head_offset(&s, image, s.queries, head) + start * w;
            let row = |i: usize| q_at + i * w..q_at + i * w + d;
            // SAFETY (every `rows_times` below): the bf16 rows hold `rows_padded` rows of their
            // operand's padded `k`, the outputs `rows_padded` or `keys_padded` rows of the
            // padded width; padding rows and columns are zero or finite leftovers that meet
            // zero padding in the other operand.
            for i in 0..rows {
                scaled_to_bf16(
                    &q[row(i)],
                    scale,
                    &mut rows_bf16[i * d_padded..(i + 1) * d_padded],
                );
            }
            unsafe {
                rows_times(
                    &mut p,
                    (rows_padded, keys_padded),
                    &rows_bf16,
                    d_padded,
                    &k_t,
                )
            };
            for i in 0..rows {
                let row = &mut p[i * keys_padded..i * keys_padded + s.keys];
                softmax_rows(row, s.keys, &mut inverse_sums[i..i + 1]);
            }
            // ∂vᵀ += gᵀ·p
            transposed.add(&mut dv_sum, g, q_at, &p, (rows, rows_padded));
            // ∂p = g·vᵀ, then ∂s in place.
            for i in 0..rows {
                to_bf16(&g[row(i)], &mut rows_bf16[i * d_padded..(i + 1) * d_padded]);
            }
            unsafe {
                rows_times(
                    &mut dp,
                    (rows_padded, keys_padded),
                    &rows_bf16,
                    d_padded,
                    &v_t,
                )
            };
            for i in 0..rows {
                let range = i * keys_padded..i * keys_padded + s.keys;
                softmax_grad_rows(&mut dp[range.clone()], &p[range], s.keys, scale);
            }
            // ∂q = ∂s·k
            for i in 0..rows {
                let range = i * keys_padded..i * keys_padded + s.keys;
                to_bf16(&dp[range.clone()], &mut wide_bf16[range]);
            }
            unsafe {
                rows_times(
                    &mut narrow,
                    (rows_padded, d_out),
                    &wide_bf16,
                    keys_padded,
                    &k_rows,
                )
            };
            // SAFETY: this task alone writes head `head` of image `image` in `dq`, `dk`, `dv`.
            unsafe {
                for i in 0..rows {
                    for j in 0..d {
                        *dq_ptr.get().add(q_at + i * w + j) = narrow[i * d_out + j];
                    }
                }
            }
            // ∂kᵀ += qᵀ·∂s
            transposed.add(&mut dk_sum, q, q_at, &dp, (rows, rows_padded));
        }
        // SAFETY: as above.
        unsafe {
            for key in 0..s.keys {
                for j in 0..d {
                    *dk_ptr.get().add(kv_at + key * w + j) = dk_sum[j * keys_padded + key];
                    *dv_ptr.get().add(kv_at + key * w + j) = dv_sum[j * keys_padded + key];
                }
            }
        }
    });
    (dq, dk, dv)
}

dispatch! {
    /// `sum += x`.
    fn add(sum: &mut [f32], x: &[f32]) {
        for (s, v) in sum.iter_mut().zip(x) {
            *s += v;
        }
    }
}

/// One task's buffers, reused from block to block.
struct Scratch {
    /// `block × d_padded` bf16 queries (zero past `d`).
    queries: Vec<u16>,
    /// `block × keys_padded` f32 scores.
    scores: Vec<f32>,
    /// `block × keys_padded` bf16 probabilities (zero past the keys).
    probs: Vec<u16>,
    /// `block × d_out` f32 output rows.
    out: Vec<f32>,
    inverse_sums: Vec<f32>,
}

impl Scratch {
    fn new(block: usize, d_padded: usize, keys_padded: usize, d_out: usize) -> Self {
        Self {
            queries: vec![0; block * d_padded],
            scores: vec![0.0; block * keys_padded],
            probs: vec![0; block * keys_padded],
            out: vec![0.0; block * d_out],
            inverse_sums: vec![0.0; block],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::amx::enable;
    use crate::engine::cpu::test_support::{assert_close, random, values};

    /// Against the f32 path, on a head width and key counts that need padding.
    #[test]
    fn matches_the_f32_attention_and_its_gradients_within_bf16_rounding() {
        if enable().is_err() {
            eprintln!("skipped: no AMX on this machine");
            return;
        }
        // The last: several blocks of queries, the last one partial.
        for (batch, queries, keys, heads, head_dim) in [
            (2, 77, 45, 3, 40),
            (1, 300, 300, 2, 80),
            (1, 300, 4100, 1, 40),
        ] {
            let s = AttentionShape {
                batch,
                queries,
                keys,
                heads,
                head_dim,
            };
            let w = heads * head_dim;
            let q = values(&random(&[batch * queries * w], 1));
            let k = values(&random(&[batch * keys * w], 2));
            let v = values(&random(&[batch * keys * w], 3));
            let scale = 1.0 / (head_dim as f32).sqrt();
            let ours = attend(&q, &k, &v, s, scale);
            let exact = super::super::attention::attend(&q, &k, &v, s, scale);
            assert_close(&ours, &exact, 2e-2, &format!("{s:?}"));
            let g = values(&random(&[batch * queries * w], 4));
            let ours = attend_backward(&q, &k, &v, &g, s, scale);
            let exact = super::super::attention::attend_backward(&q, &k, &v, &g, s, scale);
            for (name, a, b) in [
                ("dq", &ours.0, &exact.0),
                ("dk", &ours.1, &exact.1),
                ("dv", &ours.2, &exact.2),
            ] {
                assert_close(a, b, 3e-2, &format!("{name} {s:?}"));
            }
        }
    }
}
