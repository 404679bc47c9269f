//! [`super::conv`]'s convolution on AMX tiles: the same sums over shifted views, with bf16
//! operands and f32 accumulation.
//!
//! The image is converted once per call into bf16 "pair planes": the channels two by two,
//! interleaved pixel by pixel, which is the layout of a `b` tile. A tap's shift is then still a
//! constant offset, and all the taps of an output block add up in the tile registers, with no
//! partial sums written out. Each tap's `(c_out, c_in)` kernel is an `a` tile matrix packed at
//! load time; the transposed taps of the input gradient are packed on its first use, so
//! inference never holds them.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::amx::{
    bf16, round_up, sum_of_products, Operand, Term, TileWalk, Tiles, BLOCK, TILE, TILE_K,
};
use super::conv::{crop_wide, phase_source, scatter_phase, Nchw, Offsets, PackedConv};

/// A kernel as AMX tiles, tap by tap.
#[derive(Debug)]
pub struct TileTaps {
    /// `W_tap`, `(c_out, c_in)`, for the forward.
    taps: Vec<Tiles>,
    /// `W_tapᵀ`, `(c_in, c_out)`, for the input gradient.
    transposed: OnceLock<Vec<Tiles>>,
}

impl Clone for TileTaps {
    fn clone(&self) -> Self {
        Self {
            taps: self.taps.clone(),
            transposed: OnceLock::new(),
        }
    }
}

impl TileTaps {
    /// Packs a PyTorch-layout kernel `(c_out, c_in, k, k)`.
    pub fn pack(weight: &[f32], c_out: usize, c_in: usize, kernel: usize) -> Self {
        super::amx::require();
        let taps_n = kernel * kernel;
        let taps = Tiles::pack_each(Operand::A, c_out, c_in, taps_n, |o, i, values| {
            values.copy_from_slice(&weight[(o * c_in + i) * taps_n..][..taps_n]);
        });
        Self {
            taps,
            transposed: OnceLock::new(),
        }
    }

    /// The kernel back in PyTorch's layout, as the f32 values of its bf16 elements.
    pub fn unpack(&self, c_out: usize, c_in: usize, kernel: usize) -> Vec<f32> {
        let taps_n = kernel * kernel;
        let mut weight = vec![0f32; c_out * c_in * taps_n];
        for (tap, packed) in self.taps.iter().enumerate() {
            for o in 0..c_out {
                for i in 0..c_in {
                    weight[(o * c_in + i) * taps_n + tap] = packed.get(o, i);
                }
            }
        }
        weight
    }

    fn transposed(&self) -> &[Tiles] {
        self.transposed.get_or_init(|| {
            self.taps
                .iter()
                .map(|t| Tiles::pack(Operand::A, t.cols, t.rows, |i, o| t.get(o, i)))
                .collect()
        })
    }

    /// [`PackedConv::forward`] on the tiles.
    pub fn forward(
        &self,
        conv: &PackedConv,
        x: &[f32],
        input: Nchw,
        bias: Option<&[f32]>,
        extra: Option<&[f32]>,
        output: Nchw,
    ) -> Vec<f32> {
        let (k, s) = (conv.kernel, conv.stride);
        let reach = (k - 1) / s;
        let width = output.w + reach;
        let rows = output.h + reach + 1;
        let wide = round_up(output.h * width, BLOCK);
        let channels = round_up(conv.c_out, BLOCK);
        let mut wide_out = vec![0f32; channels * wide];
        let mut out = vec![0f32; output.len()];
        for image in 0..input.n {
            let src = &x[image * input.image()..(image + 1) * input.image()];
            let planes = PairPlanes::split(
                src,
                (input.c, input.h, input.w),
                conv.padding,
                s,
                (rows, width),
                reach * (width + 1) + wide,
            );
            let terms: Vec<Term> = (0..k * k)
                .map(|tap| {
                    let (kh, kw) = (tap / k, tap % k);
                    Term {
                        a: self.taps[tap].as_ptr(),
                        b: planes.at((kh % s, kw % s), (kh / s) * width + kw / s),
                    }
                })
                .collect();
            // SAFETY: the taps are `channels × k_blocks` tiles; every plane holds the shifted
            // reads of `wide` pixels and `k_blocks·32` channels; `wide_out` is `channels × wide`.
            unsafe {
                sum_of_products(
                    wide_out.as_mut_ptr(),
                    wide,
                    (channels, wide),
                    self.taps[0].k_blocks(),
                    &terms,
                    self.taps[0].walk(),
                    planes.walk(),
                )
            }
            let dst = &mut out[image * output.image()..(image + 1) * output.image()];
            let offsets = Offsets { bias, extra, image };
            crop_wide(&wide_out, wide, width, dst, output, offsets);
        }
        out
    }

    /// [`PackedConv::input_grad`] on the tiles; `(ho, wo)` is the output size.
    pub fn input_grad(
        &self,
        conv: &PackedConv,
        g: &[f32],
        input: Nchw,
        (ho, wo): (usize, usize),
    ) -> Vec<f32> {
        let (k, s, p) = (conv.kernel, conv.stride, conv.padding);
        let reach = (k - 1) / s;
        let (phase_h, phase_w) = ((input.h + 2 * p).div_ceil(s), (input.w + 2 * p).div_ceil(s));
        let width = phase_w.max(wo) + reach;
        let rows = phase_h.max(ho) + reach + 1;
        let wide = round_up(phase_h * width, BLOCK);
        let transposed = self.transposed();
        let channels = round_up(conv.c_in, BLOCK);
        let mut dx = vec![0f32; input.len()];
        let mut wide_out = vec![0f32; channels * wide];
        let g_image = conv.c_out * ho * wo;
        for image in 0..input.n {
            let planes = PairPlanes::split(
                &g[image * g_image..(image + 1) * g_image],
                (conv.c_out, ho, wo),
                reach,
                1,
                (rows, width),
                reach * (width + 1) + wide,
            );
            let dst = &mut dx[image * input.image()..(image + 1) * input.image()];
            for a in 0..s {
                for b in 0..s {
                    let terms: Vec<Term> = (0..k * k)
                        .filter(|t| (t / k) % s == a && (t % k) % s == b)
                        .map(|tap| {
                            let (qh, qw) = ((tap / k) / s, (tap % k) / s);
                            Term {
                                a: transposed[tap].as_ptr(),
                                b: planes.at((0, 0), (reach - qh) * width + (reach - qw)),
                            }
                        })
                        .collect();
                    if terms.is_empty() {
                        continue;
                    }
                    // SAFETY: as in the forward, with `c_out` channels read and `c_in` written.
                    unsafe {
                        sum_of_products(
                            wide_out.as_mut_ptr(),
                            wide,
                            (channels, wide),
                            transposed[0].k_blocks(),
                            &terms,
                            transposed[0].walk(),
                            planes.walk(),
                        )
                    }
                    let geometry = (phase_h, width);
                    scatter_phase(
                        &wide_out,
                        wide,
                        dst,
                        (input.h, input.w),
                        (a, b),
                        (s, p),
                        geometry,
                    );
                }
            }
        }
        dx
    }
}

/// A zero-padded image in bf16 as `b` tiles read it: per phase, per channel pair, `plane`
/// pixels of two interleaved channels, rows laid end to end.
struct PairPlanes {
    data: Vec<u16>,
    stride: usize,
    /// Channel pairs, padded to whole `k` blocks.
    pairs: usize,
    /// Pixels per plane.
    plane: usize,
}

impl PairPlanes {
    /// Like the f32 phases of [`super::conv`]: `x` (`c × h × w`) padded by `pad_before` at the
    /// top and left, split into `stride²` phases of `rows × width` pixels, each plane at least
    /// `min_plane` pixels long so that every shifted tile stays inside it.
    fn split(
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        pad_before: usize,
        stride: usize,
        (rows, width): (usize, usize),
        min_plane: usize,
    ) -> Self {
        let plane = (rows * width).max(min_plane);
        let pairs = round_up(c, TILE_K) / 2;
        let mut data = vec![0u16; stride * stride * pairs * plane * 2];
        data.par_chunks_mut(plane * 2)
            .enumerate()
            .for_each(|(index, dst)| {
                let (phase, pair) = (index / pairs, index % pairs);
                let (a, b) = (phase / stride, phase % stride);
                for half in 0..2 {
                    let channel = 2 * pair + half;
                    if channel >= c {
                        break;
                    }
                    let src = &x[channel * h * w..(channel + 1) * h * w];
                    for i in 0..rows {
                        let Some(r) = phase_source((stride, a), i, pad_before, h) else {
                            continue;
                        };
                        let row = &src[r * w..(r + 1) * w];
                        let dst_row = &mut dst[2 * i * width..2 * (i + 1) * width];
                        for (j, d) in dst_row.chunks_exact_mut(2).enumerate() {
                            if let Some(col) = phase_source((stride, b), j, pad_before, w) {
                                d[half] = bf16(row[col]);
                            }
                        }
                    }
                }
            });
        Self {
            data,
            stride,
            pairs,
            plane,
        }
    }

    /// Tile `(0, 0)` of phase `(a, b)` shifted by `shift` pixels.
    fn at(&self, (a, b): (usize, usize), shift: usize) -> *const u8 {
        let phase = a * self.stride + b;
        self.data[(phase * self.pairs * self.plane + shift) * 2..]
            .as_ptr()
            .cast()
    }

    /// Where the tiles lie: a tile row is one channel pair, 16 pixels on.
    fn walk(&self) -> TileWalk {
        TileWalk {
            row_stride: self.plane * 4,
            tile_step: TILE * 4,
            k_step: TILE * self.plane * 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::amx::{enable, f32_of};
    use crate::engine::cpu::test_support::{assert_close, random, values, CONV_CASES};
    use crate::engine::cpu::Products;

    /// Rounds every element to bf16, so f32 sums over the result are what the tiles compute.
    fn rounded(v: Vec<f32>) -> Vec<f32> {
        v.into_iter().map(|x| f32_of(bf16(x))).collect()
    }

    /// Forward and input gradient on the tiles against the f32 kernel given the same
    /// bf16-rounded operands, on the f32 kernel's odd sizes, strides and paddings.
    #[test]
    fn matches_the_f32_kernel_on_rounded_operands() {
        if enable().is_err() {
            eprintln!("skipped: no AMX on this machine");
            return;
        }
        for (seed, &(n, ci, co, h, w, k, p, s)) in CONV_CASES.iter().enumerate() {
            let what = format!("n{n} ci{ci} co{co} {h}x{w} k{k} p{p} s{s}");
            let seed = seed as u64 * 10;
            let x = rounded(values(&random(&[n, ci, h, w], seed)));
            let weight = rounded(values(&random(&[co, ci, k, k], seed + 1)));
            let bias = values(&random(&[co], seed + 2));
            let offset = values(&random(&[n, co], seed + 3));
            let tiles = PackedConv::pack(&weight, co, ci, k, Products::Bf16).with_geometry(p, s);
            let exact = PackedConv::pack(&weight, co, ci, k, Products::F32).with_geometry(p, s);
            assert_eq!(tiles.unpack(), weight, "{what}: unpack");
            let shape = Nchw { n, c: ci, h, w };
            let (y, out) = tiles.forward(&x, shape, Some(&bias), Some(&offset));
            let (y_exact, out_exact) = exact.forward(&x, shape, Some(&bias), Some(&offset));
            assert_eq!(out, out_exact, "{what}: shape");
            assert_close(&y, &y_exact, 1e-5, &format!("{what}: forward"));
            let g = rounded(values(&random(&[out.n, out.c, out.h, out.w], seed + 4)));
            let dx = tiles.input_grad(&g, shape);
            let dx_exact = exact.input_grad(&g, shape);
            assert_close(&dx, &dx_exact, 1e-5, &format!("{what}: input gradient"));
        }
    }
}
