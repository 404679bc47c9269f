//! Winograd's F(2×2, 3×3): a 3×3 stride-1 convolution as 16 matrix products over a quarter of
//! the pixels each, 2.25× fewer multiplications than the nine taps of [`super::conv`].
//!
//! Each 2×2 block of output pixels (a *tile*) is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`, where `d` is the
//! 4×4 patch of input under the tile and `g` the 3×3 kernel. Summed over the input channels, the
//! elementwise product becomes, at each of the 16 positions `(ξ, ν)` of a 4×4 block, one matrix
//! product `M_ξν = U_ξν · V_ξν`: `U_ξν` is the `(c_out, c_in)` kernel transformed once, at load
//! time, and `V_ξν` the `(c_in, tiles)` input transformed on every call. The output transform then
//! folds each tile's 16 sums back into its four pixels and adds the bias and offsets in the same
//! pass.
//!
//! The input gradient of such a convolution is a convolution of the output gradient, padded by
//! `2 − p`, with the kernel turned and transposed. Turning `g` reverses the columns of `G`, which
//! swaps `G`'s rows 0 and 3, so the turned kernel's transform is `U` with positions 0 and 3
//! swapped on both axes: the backward reads the same weights, transposed.
//!
//! The transformed kernel is 16/9 the size of the plain one; [`WinogradKernel::suits`] says which
//! layers are worth it.

use rayon::prelude::*;

use super::conv::Nchw;
use super::matmul::{product, Matrix};
use super::simd::dispatch;
use super::DisjointWrites;
use crate::engine::weights::F32Values;

/// Positions of a transformed 4×4 block.
const POSITIONS: usize = 16;

/// Channel pairs one task of the load-time kernel transform takes at least.
const PAIRS_PER_TASK: usize = 1 << 12;

/// A 3×3 kernel transformed for F(2×2, 3×3): `U = G g Gᵀ`, as `(16, c_out, c_in)`.
#[derive(Debug, Clone)]
pub(super) struct WinogradKernel {
    transformed: F32Values,
    c_out: usize,
    c_in: usize,
}

/// What one convolution reads: a source of `channels` planes, the zero padding before its first
/// row and column, and the size of the result it makes.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    source: Nchw,
    padding: usize,
    /// Result rows and columns.
    out: (usize, usize),
    /// Result channels.
    out_channels: usize,
}

impl Geometry {
    /// Tiles down and across one image.
    fn tiles(&self) -> (usize, usize) {
        (self.out.0.div_ceil(2), self.out.1.div_ceil(2))
    }
}

impl WinogradKernel {
    /// Whether a 3×3 stride-1 layer of these channels should run here. From 128 channels in and
    /// out the products are large enough for the saving to pay for the transforms (on this
    /// project's machine 1.5–1.9× faster than the taps at 128–640 channels; below 128 as often
    /// slower as faster); above 640 output channels the transformed kernel's extra 7/9 would
    /// cost a UNet's lowest levels about 1.5 GB.
    pub(super) fn suits(c_out: usize, c_in: usize) -> bool {
        (128..=640).contains(&c_out) && (128..=1920).contains(&c_in)
    }

    /// Transforms `(9, c_out, c_in)` taps: `U = G g Gᵀ` for every channel pair.
    pub(super) fn from_taps(taps: &[f32], c_out: usize, c_in: usize) -> Self {
        let pairs = c_out * c_in;
        assert_eq!(taps.len(), 9 * pairs, "kernel size");
        Self::transform(|pair, tap| taps[tap * pairs + pair], c_out, c_in)
    }

    /// Transforms a kernel in PyTorch's `(c_out, c_in, 3, 3)` layout, as it lies in its file.
    pub(super) fn from_pytorch(weight: &[f32], c_out: usize, c_in: usize) -> Self {
        assert_eq!(weight.len(), 9 * c_out * c_in, "kernel size");
        Self::transform(|pair, tap| weight[pair * 9 + tap], c_out, c_in)
    }

    /// `U = G g Gᵀ` for every channel pair, `tap(pair, kh·3 + kw)` giving `g`.
    ///
    /// Each pair's nine taps are read once and its `G g` rows computed once; its 16 values go
    /// to the 16 positions' matrices. (Going position by position instead read every kernel 16
    /// times and redid `G g` for each position: most of a model's loading time.)
    fn transform(tap: impl Fn(usize, usize) -> f32 + Sync, c_out: usize, c_in: usize) -> Self {
        let pairs = c_out * c_in;
        let mut transformed = vec![0f32; POSITIONS * pairs];
        let out = DisjointWrites(transformed.as_mut_ptr());
        (0..pairs)
            .into_par_iter()
            .with_min_len(PAIRS_PER_TASK)
            .for_each(|pair| {
                // `gg[kh][nu]`: row `nu` of G applied to row `kh` of g.
                let gg: [[f32; 4]; 3] = std::array::from_fn(|kh| {
                    let row = [
                        tap(pair, kh * 3),
                        tap(pair, kh * 3 + 1),
                        tap(pair, kh * 3 + 2),
                    ];
                    std::array::from_fn(|nu| g_row(nu, row))
                });
                for position in 0..POSITIONS {
                    let (xi, nu) = (position / 4, position % 4);
                    let value = g_row(xi, [gg[0][nu], gg[1][nu], gg[2][nu]]);
                    // SAFETY: `position · pairs + pair` is inside `transformed`, and only this
                    // pair's task writes it.
                    unsafe { *out.ptr().add(position * pairs + pair) = value };
                }
            });
        Self {
            transformed: F32Values::Owned(transformed),
            c_out,
            c_in,
        }
    }

    /// A kernel transformed earlier: `(16, c_out, c_in)` values as [`Self::transformed`] gives.
    pub(super) fn from_transformed(transformed: F32Values, c_out: usize, c_in: usize) -> Self {
        assert_eq!(
            transformed.len(),
            Self::transformed_len(c_out, c_in),
            "kernel size"
        );
        Self {
            transformed,
            c_out,
            c_in,
        }
    }

    /// The transformed values, `(16, c_out, c_in)`.
    pub(super) fn transformed(&self) -> &[f32] {
        &self.transformed
    }

    /// How many values a transformed `(c_out, c_in)` kernel holds.
    pub(super) fn transformed_len(c_out: usize, c_in: usize) -> usize {
        POSITIONS * c_out * c_in
    }

    /// Back to `(9, c_out, c_in)` taps: `g = L U Lᵀ` with `L G = I` (exact up to rounding).
    pub(super) fn to_taps(&self) -> Vec<f32> {
        let pairs = self.c_out * self.c_in;
        let u = |position: usize, pair: usize| self.transformed[position * pairs + pair];
        let mut taps = vec![0f32; 9 * pairs];
        for (tap, dst) in taps.chunks_mut(pairs).enumerate() {
            let (kh, kw) = (tap / 3, tap % 3);
            for (pair, d) in dst.iter_mut().enumerate() {
                let row = |xi: usize| l_row(kw, std::array::from_fn(|nu| u(xi * 4 + nu, pair)));
                *d = l_row(kh, std::array::from_fn(row));
            }
        }
        taps
    }

    /// `conv2d(x) + bias (+ extra[n, c_out])` with zero padding `padding` (at most 2).
    pub(super) fn forward(
        &self,
        x: &[f32],
        input: Nchw,
        padding: usize,
        offsets: (Option<&[f32]>, Option<&[f32]>),
        output: Nchw,
    ) -> Vec<f32> {
        let geometry = Geometry {
            source: input,
            padding,
            out: (output.h, output.w),
            out_channels: self.c_out,
        };
        let pairs = self.c_out * self.c_in;
        convolve(
            x,
            geometry,
            |position| Matrix::rows(self.transformed[position * pairs..].as_ptr(), self.c_in),
            offsets,
        )
    }

    /// `∂L/∂x` of [`Self::forward`] for an input of shape `input`, given `∂L/∂y` (`g`, of
    /// `c_out × ho × wo` per image).
    pub(super) fn input_grad(
        &self,
        g: &[f32],
        input: Nchw,
        padding: usize,
        (ho, wo): (usize, usize),
    ) -> Vec<f32> {
        let geometry = Geometry {
            source: Nchw {
                n: input.n,
                c: self.c_out,
                h: ho,
                w: wo,
            },
            padding: 2 - padding,
            out: (input.h, input.w),
            out_channels: self.c_in,
        };
        let pairs = self.c_out * self.c_in;
        let turned = |i: usize| [3, 1, 2, 0][i];
        convolve(
            g,
            geometry,
            |position| {
                let (xi, nu) = (turned(position / 4), turned(position % 4));
                let start = (xi * 4 + nu) * pairs;
                Matrix::transposed(self.transformed[start..].as_ptr(), self.c_in)
            },
            (None, None),
        )
    }
}

/// Row `i` of `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]` times `v`.
fn g_row(i: usize, [a, b, c]: [f32; 3]) -> f32 {
    match i {
        0 => a,
        1 => 0.5 * (a + b + c),
        2 => 0.5 * (a - b + c),
        _ => c,
    }
}

/// Row `i` of `L = [[1, 0, 0, 0], [−1, 2, 0, −1], [0, 0, 0, 1]]` (a left inverse of `G`) times `v`.
fn l_row(i: usize, [a, b, _, d]: [f32; 4]) -> f32 {
    match i {
        0 => a,
        1 => 2.0 * b - a - d,
        _ => d,
    }
}

/// How many bytes the transformed input of one slab of tiles may take (and its sums as many):
/// large enough for products that run at full speed, small enough that a high-resolution layer
/// holds two slabs instead of four times its input and output. The unit tests take a few
/// kilobytes, so that their small images span several slabs, and slabs span images.
const SLAB_BYTES: usize = if cfg!(test) { 4 << 10 } else { 32 << 20 };

/// The convolution behind both directions, a slab of tile rows at a time: the slab's source
/// transformed, the 16 products with the `(out_channels, channels)` matrices `weights(position)`,
/// the sums folded back into the output.
fn convolve(
    source: &[f32],
    geometry: Geometry,
    weights: impl Fn(usize) -> Matrix,
    (bias, extra): (Option<&[f32]>, Option<&[f32]>),
) -> Vec<f32> {
    let Geometry {
        source: shape,
        out_channels,
        out: (h, w),
        ..
    } = geometry;
    assert_eq!(source.len(), shape.len(), "source size");
    let (th, tw) = geometry.tiles();
    let tile_rows = shape.n * th;
    let widest = shape.c.max(out_channels);
    let slab_rows = (SLAB_BYTES / (POSITIONS * 4 * widest * tw)).clamp(1, tile_rows);
    let mut out = vec![0f32; shape.n * out_channels * h * w];
    let threads = super::threads();
    let mut buffers = SlabBuffers::take(
        POSITIONS * shape.c * slab_rows * tw,
        POSITIONS * out_channels * slab_rows * tw,
    );
    let (transformed, sums) = (&mut buffers.transformed, &mut buffers.sums);
    for first_row in (0..tile_rows).step_by(slab_rows) {
        let slab = first_row..tile_rows.min(first_row + slab_rows);
        let columns = slab.len() * tw;
        transform_slab(source, geometry, slab.clone(), transformed);
        for position in 0..POSITIONS {
            let rhs = Matrix::rows(
                transformed[position * shape.c * columns..].as_ptr(),
                columns,
            );
            // SAFETY: `sums` has room for 16 `(out_channels, columns)` blocks; `weights` gives
            // an `(out_channels, c)` matrix and `transformed` holds 16 `(c, columns)` blocks.
            unsafe {
                product(
                    sums[position * out_channels * columns..].as_mut_ptr(),
                    columns,
                    false,
                    (out_channels, columns, shape.c),
                    weights(position),
                    rhs,
                    1.0,
                    threads,
                )
            }
        }
        fold_slab(sums, geometry, slab, &mut out, (bias, extra));
    }
    buffers.give_back();
    out
}

/// The slab buffers of a convolution. Every element is written before it is read, so a thread
/// keeps the last pair it used for its next convolution instead of zeroing fresh ones (at most
/// `2·SLAB_BYTES` while slabs fit the budget).
#[derive(Default)]
struct SlabBuffers {
    transformed: Vec<f32>,
    sums: Vec<f32>,
}

thread_local! {
    static KEPT: std::cell::Cell<SlabBuffers> = std::cell::Cell::new(SlabBuffers::default());
}

impl SlabBuffers {
    /// This thread's kept buffers, grown to at least these lengths.
    fn take(transformed: usize, sums: usize) -> Self {
        let mut buffers = KEPT.take();
        for (buffer, len) in [
            (&mut buffers.transformed, transformed),
            (&mut buffers.sums, sums),
        ] {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
        }
        buffers
    }

    /// Keeps the buffers for this thread's next convolution.
    fn give_back(self) {
        KEPT.set(self);
    }
}

/// `V = Bᵀ d B` for the tiles of tile rows `slab` (counted across images): 16
/// `(channels, columns)` blocks at the start of `transformed`, tiles row by row.
fn transform_slab(
    source: &[f32],
    geometry: Geometry,
    slab: std::ops::Range<usize>,
    transformed: &mut [f32],
) {
    let shape = geometry.source;
    let (th, tw) = geometry.tiles();
    let columns = slab.len() * tw;
    let block = shape.c * columns;
    assert!(transformed.len() >= POSITIONS * block, "slab buffer");
    let dst = DisjointWrites(transformed.as_mut_ptr());
    let width = 2 * tw + 2;
    (0..shape.c).into_par_iter().for_each_init(
        || (vec![0f32; 4 * width], vec![0f32; POSITIONS * tw]),
        |(padded, scratch), channel| {
            for (local, tile_row) in slab.clone().enumerate() {
                let (image, ty) = (tile_row / th, tile_row % th);
                let plane = (image * shape.c + channel) * shape.h * shape.w;
                let plane = &source[plane..plane + shape.h * shape.w];
                pad_rows(plane, (shape.h, shape.w), geometry.padding, 2 * ty, padded);
                let first = channel * columns + local * tw;
                // SAFETY: this channel's tiles of this tile row are `tw` columns from `first` in
                // each of the 16 blocks, which no other task writes; `transformed` outlives the
                // loop.
                let out: [&mut [f32]; POSITIONS] = std::array::from_fn(|position| unsafe {
                    std::slice::from_raw_parts_mut(dst.ptr().add(position * block + first), tw)
                });
                transform_tile_row(padded, out, scratch);
            }
        },
    );
}

/// Rows `top..top + 4` of a `h × w` plane zero-padded by `pad` on every side, each cut or
/// zero-filled to the `padded.len() / 4` columns the tiles read.
fn pad_rows(plane: &[f32], (h, w): (usize, usize), pad: usize, top: usize, padded: &mut [f32]) {
    let width = padded.len() / 4;
    let len = w.min(width - pad);
    for (i, row) in padded.chunks_exact_mut(width).enumerate() {
        row.fill(0.0);
        if let Some(y) = (top + i).checked_sub(pad).filter(|&y| y < h) {
            row[pad..pad + len].copy_from_slice(&plane[y * w..y * w + len]);
        }
    }
}

/// `Aᵀ M A + offsets` for the tiles of tile rows `slab`, written into `out`.
fn fold_slab(
    sums: &[f32],
    geometry: Geometry,
    slab: std::ops::Range<usize>,
    out: &mut [f32],
    (bias, extra): (Option<&[f32]>, Option<&[f32]>),
) {
    let Geometry {
        out_channels,
        out: (h, w),
        ..
    } = geometry;
    let (th, tw) = geometry.tiles();
    let columns = slab.len() * tw;
    let block = out_channels * columns;
    assert_eq!(
        out.len(),
        geometry.source.n * out_channels * h * w,
        "output size"
    );
    let dst = DisjointWrites(out.as_mut_ptr());
    (0..out_channels).into_par_iter().for_each_init(
        || vec![0f32; 10 * tw],
        |scratch, channel| {
            for (local, tile_row) in slab.clone().enumerate() {
                let (image, ty) = (tile_row / th, tile_row % th);
                let add = bias.map_or(0.0, |b| b[channel])
                    + extra.map_or(0.0, |e| e[image * out_channels + channel]);
                let first = channel * columns + local * tw;
                let m: [&[f32]; POSITIONS] =
                    std::array::from_fn(|p| &sums[p * block + first..p * block + first + tw]);
                let y = 2 * ty;
                let rows = 2.min(h - y);
                // SAFETY: output rows `y..y + rows` of this image's plane of this channel are
                // this task's alone; `out` outlives the loop.
                let rows = unsafe {
                    let plane = dst
                        .ptr()
                        .add(((image * out_channels + channel) * h + y) * w);
                    std::slice::from_raw_parts_mut(plane, rows * w)
                };
                fold_tile_row(m, rows, w, add, scratch);
            }
        },
    );
}

dispatch! {
    /// The 16 transformed values of each tile of one tile row, from the four padded input rows
    /// under it (`padded`, `4 × (2·tw + 2)`), into `out` (one `tw`-long row per position).
    /// `scratch` holds `16·tw` values.
    fn transform_tile_row(padded: &[f32], out: [&mut [f32]; POSITIONS], scratch: &mut [f32]) {
        let tw = out[0].len();
        let width = padded.len() / 4;
        // Bᵀ on the columns of each of the four rows, over all the tiles: row `i`'s results at
        // `scratch[(4i + ν)·tw + tx]`.
        for (row, columns) in padded.chunks_exact(width).zip(scratch.chunks_exact_mut(4 * tw)) {
            let (c0, rest) = columns.split_at_mut(tw);
            let (c1, rest) = rest.split_at_mut(tw);
            let (c2, c3) = rest.split_at_mut(tw);
            let patches = row.chunks_exact(2).zip(row[2..].chunks_exact(2));
            let columns = c0.iter_mut().zip(c1.iter_mut()).zip(c2.iter_mut().zip(c3));
            for ((here, next), ((a, b), (c, d))) in patches.zip(columns) {
                *a = here[0] - next[0];
                *b = here[1] + next[0];
                *c = next[0] - here[1];
                *d = here[1] - next[1];
            }
        }
        // Bᵀ on the rows: position `(ξ, ν)` from the four rows' `ν` results.
        let row = |i: usize, nu: usize| &scratch[(4 * i + nu) * tw..(4 * i + nu + 1) * tw];
        let combine = |dst: &mut [f32], a: &[f32], b: &[f32], sign: f32| {
            for ((d, a), b) in dst.iter_mut().zip(a).zip(b) {
                *d = a + sign * b;
            }
        };
        for nu in 0..4 {
            let (r0, r1, r2, r3) = (row(0, nu), row(1, nu), row(2, nu), row(3, nu));
            combine(out[nu], r0, r2, -1.0);
            combine(out[4 + nu], r1, r2, 1.0);
            combine(out[8 + nu], r2, r1, -1.0);
            combine(out[12 + nu], r1, r3, -1.0);
        }
    }
}

dispatch! {
    /// `Aᵀ m A + add` for each tile of one tile row, whose sums are `m` (one `tw`-long row per
    /// position), into the output rows under it (`dst`: one or two rows of `w` pixels; pixels
    /// past the edge are dropped). `scratch` holds `10·tw` values.
    fn fold_tile_row(
        m: [&[f32]; POSITIONS],
        dst: &mut [f32],
        w: usize,
        add: f32,
        scratch: &mut [f32],
    ) {
        let tw = m[0].len();
        let (folded, pixels) = scratch.split_at_mut(8 * tw);
        // Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]] on the columns of each row `ξ` of m: its two
        // results at `folded[(2ξ + j)·tw + tx]`.
        for (xi, pair) in folded.chunks_exact_mut(2 * tw).enumerate() {
            let (left, right) = pair.split_at_mut(tw);
            let (m0, m1, m2, m3) = (m[4 * xi], m[4 * xi + 1], m[4 * xi + 2], m[4 * xi + 3]);
            let sums = m0.iter().zip(m1).zip(m2.iter().zip(m3));
            for ((l, r), ((a, b), (c, d))) in left.iter_mut().zip(right.iter_mut()).zip(sums) {
                *l = a + b + c;
                *r = b - c - d;
            }
        }
        // And on the rows, for each output row.
        let f = |xi: usize, j: usize| &folded[(2 * xi + j) * tw..(2 * xi + j + 1) * tw];
        for (out_row, dst_row) in dst.chunks_exact_mut(w).enumerate() {
            let (left, right) = pixels.split_at_mut(tw);
            for (j, half) in [left, right].into_iter().enumerate() {
                let (f0, f1, f2, f3) = (f(0, j), f(1, j), f(2, j), f(3, j));
                let terms = f0.iter().zip(f1).zip(f2.iter().zip(f3));
                for (p, ((a, b), (c, d))) in half.iter_mut().zip(terms) {
                    *p = if out_row == 0 { a + b + c } else { b - c - d } + add;
                }
            }
            let (left, right) = pixels.split_at(tw);
            let mut pairs = dst_row.chunks_exact_mut(2);
            for ((pair, l), r) in (&mut pairs).zip(left).zip(right) {
                pair[0] = *l;
                pair[1] = *r;
            }
            if let [last] = pairs.into_remainder() {
                *last = left[tw - 1];
            }
        }
    }
}
