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
//! layers keep one from load time. The wider layers (a UNet's 1280-channel levels, where those
//! copies would add 1.4 GB) keep PyTorch's kernel where it lies in the weights file and transform
//! it on every call, a block of channels at a time just before that block's products
//! ([`Kernel::InPlace`]), when their output has tiles enough for that to pay.

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
}

/// The kernel of one Winograd convolution.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kernel<'a> {
    /// Transformed at load.
    Transformed(&'a WinogradKernel),
    /// PyTorch's `(c_out, c_in, 3, 3)` weights as they lie in the weights file, transformed a
    /// block of channels at a time on every call ([`runs_in_place`] says when).
    InPlace {
        weight: &'a [f32],
        c_out: usize,
        c_in: usize,
    },
}

/// Which convolution [`convolve`] computes with a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// The layer's own: `U · V` at every position.
    Forward,
    /// Its input gradient: the turned kernel's `Uᵀ · V`.
    InputGrad,
}

impl Kernel<'_> {
    /// `(c_out, c_in)` of the layer.
    fn channels(&self) -> (usize, usize) {
        match *self {
            Self::Transformed(kernel) => (kernel.c_out, kernel.c_in),
            Self::InPlace { c_out, c_in, .. } => (c_out, c_in),
        }
    }

    /// `conv2d(x) + bias (+ extra[n, c_out])` with zero padding `padding` (at most 2).
    pub(super) fn forward(
        self,
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
            out_channels: self.channels().0,
        };
        convolve(x, geometry, self, Direction::Forward, offsets)
    }

    /// `∂L/∂x` of [`Self::forward`] for an input of shape `input`, given `∂L/∂y` (`g`, of
    /// `c_out × ho × wo` per image).
    pub(super) fn input_grad(
        self,
        g: &[f32],
        input: Nchw,
        padding: usize,
        (ho, wo): (usize, usize),
    ) -> Vec<f32> {
        let (c_out, c_in) = self.channels();
        let geometry = Geometry {
            source: Nchw {
                n: input.n,
                c: c_out,
                h: ho,
                w: wo,
            },
            padding: 2 - padding,
            out: (input.h, input.w),
            out_channels: c_in,
        };
        convolve(g, geometry, self, Direction::InputGrad, (None, None))
    }

    /// The 16 products of one slab: `sums` gets, at each position, the `(out_channels,
    /// columns)` product of the kernel's matrix there with `transformed`'s `(channels,
    /// columns)` block.
    fn multiply(self, direction: Direction, transformed: &[f32], columns: usize, sums: &mut [f32]) {
        let (c_out, c_in) = self.channels();
        let (channels, out_channels) = match direction {
            Direction::Forward => (c_in, c_out),
            Direction::InputGrad => (c_out, c_in),
        };
        let rhs = |position: usize| {
            Matrix::rows(
                transformed[position * channels * columns..].as_ptr(),
                columns,
            )
        };
        match self {
            Self::Transformed(kernel) => {
                let pairs = c_out * c_in;
                let threads = super::threads();
                for position in 0..POSITIONS {
                    let lhs = match direction {
                        Direction::Forward => {
                            Matrix::rows(kernel.transformed[position * pairs..].as_ptr(), c_in)
                        }
                        Direction::InputGrad => Matrix::transposed(
                            kernel.transformed[turned(position) * pairs..].as_ptr(),
                            c_in,
                        ),
                    };
                    // SAFETY: `sums` has room for 16 `(out_channels, columns)` blocks; `lhs` is
                    // an `(out_channels, channels)` matrix inside the transformed kernel and
                    // `transformed` holds 16 `(channels, columns)` blocks.
                    unsafe {
                        product(
                            sums[position * out_channels * columns..].as_mut_ptr(),
                            columns,
                            false,
                            (out_channels, columns, channels),
                            lhs,
                            rhs(position),
                            1.0,
                            threads,
                        )
                    }
                }
            }
            Self::InPlace { weight, .. } => {
                assert_eq!(weight.len(), 9 * c_out * c_in, "kernel size");
                let dst = DisjointWrites(sums.as_mut_ptr());
                let blocks = out_channels.div_ceil(IN_PLACE_BLOCK);
                (0..blocks).into_par_iter().for_each(|block| {
                    let rows =
                        block * IN_PLACE_BLOCK..out_channels.min((block + 1) * IN_PLACE_BLOCK);
                    let (co, ci) = match direction {
                        Direction::Forward => (rows.clone(), 0..c_in),
                        Direction::InputGrad => (0..c_out, rows.clone()),
                    };
                    let size = co.len() * ci.len();
                    let (mut taps, mut u) =
                        take_kept(&KEPT_BLOCK, [15 * ci.len(), POSITIONS * size]);
                    transform_block(weight, c_in, co, ci.clone(), &mut taps, &mut u);
                    for position in 0..POSITIONS {
                        let lhs = match direction {
                            Direction::Forward => Matrix::rows(u[position * size..].as_ptr(), c_in),
                            Direction::InputGrad => {
                                Matrix::transposed(u[turned(position) * size..].as_ptr(), ci.len())
                            }
                        };
                        // SAFETY: rows `rows` of each position's `(out_channels, columns)` block
                        // of `sums` are this block's alone; `lhs` is a `(rows, channels)`
                        // matrix inside `u`, and `rhs` as above.
                        unsafe {
                            product(
                                dst.ptr()
                                    .add((position * out_channels + rows.start) * columns),
                                columns,
                                false,
                                (rows.len(), columns, channels),
                                lhs,
                                rhs(position),
                                1.0,
                                1,
                            )
                        }
                    }
                    KEPT_BLOCK.set((taps, u));
                });
            }
        }
    }
}

/// The position of the turned kernel's transform that position `position` reads: turning `g`
/// swaps `G`'s rows 0 and 3 (see the module's documentation).
fn turned(position: usize) -> usize {
    let swap = |i: usize| [3, 1, 2, 0][i];
    swap(position / 4) * 4 + swap(position % 4)
}

/// Output channels (or, for the input gradient, input channels) whose kernel one task of an
/// in-place convolution transforms and multiplies: 16 blocks of `32 × 2560` values at most
/// (5 MB) for the UNet's widest layers.
const IN_PLACE_BLOCK: usize = 32;

/// Tiles (of all the batch's images together) from which a wide layer's 3×3 stride-1
/// convolution runs on Winograd with its kernel transformed [in place](Kernel::InPlace) rather
/// than as one im2col product: below that the products are too narrow to pay for transforming
/// the kernel on every call. Measured on SD-1.5's 1280-channel layers, forward and input
/// gradient: 8×8 outputs of two images (32 tiles) took 8.5 and 10.7 ms against 12.8 and 15.6 ms
/// on a Zen 5 with AVX-512, and 18 against 34 ms forward on a Zen 3 with AVX2. At 16 tiles the
/// two disagreed (7.5 against 6.3 ms on the Zen 5, 13 against 20 ms on the Zen 3).
const IN_PLACE_MIN_TILES: usize = 32;

/// Whether a wide 3×3 stride-1 layer with zero padding `padding` runs [in
/// place](Kernel::InPlace) on an output of `output`'s shape.
pub(super) fn runs_in_place(padding: usize, output: Nchw) -> bool {
    padding <= 2 && output.n * output.h.div_ceil(2) * output.w.div_ceil(2) >= IN_PLACE_MIN_TILES
}

thread_local! {
    /// A thread's buffers for the kernel blocks of in-place convolutions, kept between them:
    /// one output channel's kernels tap by tap, and the block's transform.
    static KEPT_BLOCK: KeptPair = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
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

dispatch! {
    /// `U = G g Gᵀ` for output channels `co` and input channels `ci` of a PyTorch
    /// `(c_out, c_in, 3, 3)` kernel, into 16 row-major `(co.len(), ci.len())` blocks at the start
    /// of `out`, one per position: the same values as the whole kernel's load-time transform.
    ///
    /// Each output channel's kernels are first laid out tap by tap in `scratch` (`15·ci.len()`
    /// values, the last six rows for the `G g` rows that are not taps), so that every later step
    /// is a pass over whole rows, which vectorizes.
    fn transform_block(
        weight: &[f32],
        c_in: usize,
        co: std::ops::Range<usize>,
        ci: std::ops::Range<usize>,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        let width = ci.len();
        let size = co.len() * width;
        assert!(out.len() >= POSITIONS * size, "block buffer");
        let (taps, mixed) = scratch[..15 * width].split_at_mut(9 * width);
        for (row, channel) in co.enumerate() {
            let first = channel * c_in + ci.start;
            let kernels = &weight[first * 9..(first + width) * 9];
            lay_out_by_tap(kernels, taps);
            let tap = |t: usize| &taps[t * width..(t + 1) * width];
            // Rows 1 and 2 of G on row `kh` of each kernel; rows 0 and 3 are its first and last
            // taps as they are.
            for (kh, pair) in mixed.chunks_exact_mut(2 * width).enumerate() {
                let (one, two) = pair.split_at_mut(width);
                let (a, b, c) = (tap(kh * 3), tap(kh * 3 + 1), tap(kh * 3 + 2));
                g_row_of_rows(1, [a, b, c], one);
                g_row_of_rows(2, [a, b, c], two);
            }
            // `gg(kh, nu)`: row `nu` of G on row `kh` of the kernels.
            let gg = |kh: usize, nu: usize| match nu {
                0 => tap(kh * 3),
                3 => tap(kh * 3 + 2),
                _ => &mixed[(2 * kh + nu - 1) * width..(2 * kh + nu) * width],
            };
            for position in 0..POSITIONS {
                let (xi, nu) = (position / 4, position % 4);
                let at = position * size + row * width;
                g_row_of_rows(xi, [gg(0, nu), gg(1, nu), gg(2, nu)], &mut out[at..at + width]);
            }
        }
    }
}

/// `kernels`' 3×3 kernels (nine values each, one after another) tap by tap into `taps`: tap `t`
/// of kernel `k` at `t · kernels.len() / 9 + k`.
///
/// Kept out of [`transform_block`]'s AVX-512 copy on purpose: compiled there, LLVM reads the
/// stride-9 taps with gathers, and the transform of a 1280-channel kernel took 19 ms on one
/// core of a Zen 5 instead of 7 ms with these plain loads and shuffles.
#[inline(never)]
fn lay_out_by_tap(kernels: &[f32], taps: &mut [f32]) {
    let (kernels, _) = kernels.as_chunks::<9>();
    let width = kernels.len();
    for tap in 0..9 {
        let row = &mut taps[tap * width..(tap + 1) * width];
        for (value, kernel) in row.iter_mut().zip(kernels) {
            *value = kernel[tap];
        }
    }
}

/// [`g_row`] element by element over three rows, into `dst`.
#[inline(always)]
fn g_row_of_rows(i: usize, [a, b, c]: [&[f32]; 3], dst: &mut [f32]) {
    let terms = a.iter().zip(b).zip(c);
    match i {
        0 => dst.copy_from_slice(a),
        1 => {
            for (d, ((a, b), c)) in dst.iter_mut().zip(terms) {
                *d = 0.5 * (a + b + c);
            }
        }
        2 => {
            for (d, ((a, b), c)) in dst.iter_mut().zip(terms) {
                *d = 0.5 * (a - b + c);
            }
        }
        _ => dst.copy_from_slice(c),
    }
}

/// How many bytes the transformed input of one slab of tiles may take (and its sums as many):
/// large enough for products that run at full speed, small enough that a high-resolution layer
/// holds two slabs instead of four times its input and output. The unit tests take a few
/// kilobytes, so that their small images span several slabs, and slabs span images.
const SLAB_BYTES: usize = if cfg!(test) { 4 << 10 } else { 32 << 20 };

/// The convolution behind both directions, a slab of tile rows at a time: the slab's source
/// transformed, the 16 products with the kernel's `(out_channels, channels)` matrices, the sums
/// folded back into the output.
fn convolve(
    source: &[f32],
    geometry: Geometry,
    kernel: Kernel,
    direction: Direction,
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
    let (mut transformed, mut sums) = take_kept(
        &KEPT_SLABS,
        [
            POSITIONS * shape.c * slab_rows * tw,
            POSITIONS * out_channels * slab_rows * tw,
        ],
    );
    for first_row in (0..tile_rows).step_by(slab_rows) {
        let slab = first_row..tile_rows.min(first_row + slab_rows);
        let columns = slab.len() * tw;
        transform_slab(source, geometry, slab.clone(), &mut transformed);
        kernel.multiply(direction, &transformed, columns, &mut sums);
        fold_slab(&sums, geometry, slab, &mut out, (bias, extra));
    }
    KEPT_SLABS.set((transformed, sums));
    out
}

/// Two buffers a thread keeps from one convolution for its next, instead of zeroing fresh
/// ones: every element is written before it is read.
type KeptPair = std::cell::Cell<(Vec<f32>, Vec<f32>)>;

thread_local! {
    /// A convolution's slab buffers: the transformed input and the sums (at most
    /// `2·SLAB_BYTES` while slabs fit the budget).
    static KEPT_SLABS: KeptPair = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// This thread's buffers kept in `kept`, grown to at least `lens`; [`std::cell::Cell::set`]
/// gives them back.
fn take_kept(
    kept: &'static std::thread::LocalKey<KeptPair>,
    lens: [usize; 2],
) -> (Vec<f32>, Vec<f32>) {
    let (mut first, mut second) = kept.take();
    for (buffer, len) in [(&mut first, lens[0]), (&mut second, lens[1])] {
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        }
    }
    (first, second)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::test_support::{assert_close, random, values};

    /// A block transformed on the fly holds exactly the load-time transform's values, on
    /// blocks that start and end mid-row and leave out channels on both sides.
    #[test]
    fn block_transform_matches_the_load_time_transform() {
        let (c_out, c_in) = (37, 21);
        let weight = values(&random(&[c_out, c_in, 3, 3], 1));
        let whole = WinogradKernel::from_pytorch(&weight, c_out, c_in);
        for (co, ci) in [(0..c_out, 0..c_in), (5..17, 3..20), (36..37, 0..1)] {
            let size = co.len() * ci.len();
            let mut scratch = vec![f32::NAN; 15 * ci.len()];
            let mut block = vec![f32::NAN; POSITIONS * size];
            transform_block(
                &weight,
                c_in,
                co.clone(),
                ci.clone(),
                &mut scratch,
                &mut block,
            );
            for position in 0..POSITIONS {
                for (row, o) in co.clone().enumerate() {
                    for (column, i) in ci.clone().enumerate() {
                        let expected =
                            whole.transformed()[(position * c_out + o) * c_in + i].to_bits();
                        let got = block[position * size + row * ci.len() + column].to_bits();
                        assert_eq!(got, expected, "{co:?} × {ci:?}: position {position}");
                    }
                }
            }
        }
    }

    /// The in-place kernel computes what the transformed one does, forward and input gradient,
    /// with channel counts that leave partial blocks, every padding, two images and several
    /// slabs per image.
    #[test]
    fn in_place_kernel_matches_the_transformed_kernel() {
        for (seed, (n, c_in, c_out, h, w, padding)) in [
            (2, 21, 70, 9, 7, 1),
            (1, 70, 33, 6, 5, 2),
            (1, 9, 35, 8, 8, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let what = format!("n{n} ci{c_in} co{c_out} {h}x{w} p{padding}");
            let seed = 10 * seed as u64;
            let weight = values(&random(&[c_out, c_in, 3, 3], seed));
            let x = values(&random(&[n, c_in, h, w], seed + 1));
            let bias = values(&random(&[c_out], seed + 2));
            let extra = values(&random(&[n, c_out], seed + 3));
            let stored = WinogradKernel::from_pytorch(&weight, c_out, c_in);
            let transformed = Kernel::Transformed(&stored);
            let in_place = Kernel::InPlace {
                weight: &weight,
                c_out,
                c_in,
            };
            let input = Nchw { n, c: c_in, h, w };
            let (ho, wo) = (h + 2 * padding - 2, w + 2 * padding - 2);
            let output = Nchw {
                n,
                c: c_out,
                h: ho,
                w: wo,
            };
            let offsets = (Some(&bias[..]), Some(&extra[..]));
            let forward = |k: Kernel| k.forward(&x, input, padding, offsets, output);
            assert_close(
                &forward(in_place),
                &forward(transformed),
                1e-6,
                &format!("{what}: forward"),
            );
            let g = values(&random(&[n, c_out, ho, wo], seed + 4));
            let grad = |k: Kernel| k.input_grad(&g, input, padding, (ho, wo));
            assert_close(
                &grad(in_place),
                &grad(transformed),
                1e-6,
                &format!("{what}: input gradient"),
            );
        }
    }

    /// Small outputs keep the im2col product, larger ones run in place.
    #[test]
    fn in_place_needs_enough_tiles() {
        let shape = |n, h, w| Nchw { n, c: 1280, h, w };
        assert!(!runs_in_place(1, shape(2, 4, 4)));
        assert!(!runs_in_place(1, shape(1, 8, 8)));
        assert!(runs_in_place(1, shape(2, 8, 8)));
        assert!(runs_in_place(1, shape(1, 7, 15)));
        assert!(!runs_in_place(3, shape(2, 8, 8)));
    }
}
