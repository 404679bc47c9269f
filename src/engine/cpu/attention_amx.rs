//! [`super::attention`]'s forward on AMX tiles: `q·kᵀ` and `p·v` with bf16 operands and f32
//! sums, the softmax in f32.
//!
//! Each head's `kᵀ` and `v` are packed into `b` tiles once per call; each task then takes a
//! block of queries of one head, rounds them (scaled) to bf16, computes its scores, softmaxes
//! them in place, rounds the probabilities to bf16 and multiplies them into the output rows, which
//! it normalises as the f32 path does.

use rayon::prelude::*;

use super::amx::{
    bf16, round_up, sum_of_products_here, PackedB, Term, TileWalk, BLOCK, TILE, TILE_K,
};
use super::attention::{head_offset, AttentionShape, Shared};
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
    let packed: Vec<(PackedB, PackedB)> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|task| {
            let at = head_offset(&s, task / s.heads, s.keys, task % s.heads);
            (
                PackedB::pack(d, s.keys, |j, key| k[at + key * w + j]),
                PackedB::pack(s.keys, d, |key, j| v[at + key * w + j]),
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
    fn matches_the_f32_attention_within_bf16_rounding() {
        if enable().is_err() {
            eprintln!("skipped: no AMX on this machine");
            return;
        }
        for (batch, queries, keys, heads, head_dim) in [(2, 77, 45, 3, 40), (1, 300, 300, 2, 80)] {
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
        }
    }
}
