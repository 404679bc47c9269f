//! 2D convolution on the CPU as a sum of matrix products over shifted views.
//!
//! A `k×k` convolution with stride 1 is `Σ_taps W_tap · shift_tap(x)`, where `W_tap` is the
//! `(c_out, c_in)` slice of the kernel at one tap. On a zero-padded image whose rows are laid end
//! to end, shifting by a tap is adding a constant to the flat index, so each shifted view is a
//! plain `(c_in, rows·padded_width)` matrix: the product writes a "wide" output that carries
//! `k − 1` junk columns per row, which the final pass drops while it adds the bias. A stride `s`
//! splits the padded image into its `s²` phases (every `s`-th row and column from each offset),
//! after which every tap is again a constant shift, in one phase.
//!
//! The input gradient of a stride-1 convolution is the same product with the kernel turned and
//! transposed (a strided view of the packed weights, so no second copy). With a stride it is
//! computed phase by phase of the padded input gradient, each phase a sum over the taps that land
//! on it.
//!
//! The weights are packed once, at load time, as `(k·k, c_out, c_in)`; the products run on
//! `gemm`, which picks its AVX-512, AVX2 or portable kernels at run time. Wider stride-1 layers
//! take other forms (see `F32Form`): a 3×3 layer of 128 to 640 channels is transformed for
//! Winograd's F(2×2, 3×3) ([`super::winograd`]); the wider ones keep PyTorch's layout, which a
//! 1×1 kernel has too, so that neither is copied out of its weights file: their 3×3 kernels are
//! transformed for Winograd block by block on every call where the output is large enough, and
//! otherwise run one product over im2col columns ([`super::columns`]). With bf16 products
//! ([`super::Products::Bf16`]) the sums run on AMX tiles ([`super::conv_amx`]).

use rayon::prelude::*;

use super::columns;
use super::conv_amx::TileTaps;
use super::matmul::{product, Matrix};
use super::winograd::{self, WinogradKernel};
use super::Products;
use crate::engine::weights::F32Values;

/// A square convolution's geometry and its weights, packed tap by tap.
#[derive(Debug, Clone)]
pub struct PackedConv {
    weights: Weights,
    /// Output channels.
    pub c_out: usize,
    /// Input channels.
    pub c_in: usize,
    /// Kernel side.
    pub kernel: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Stride of both axes.
    pub stride: usize,
}

/// A kernel packed for the products that run it.
#[derive(Debug, Clone)]
enum Weights {
    /// `(k·k, c_out, c_in)`, row-major, for `gemm` (a 1×1 kernel's may lie in place in its
    /// weights file, since that is PyTorch's layout too).
    F32(F32Values),
    /// Tap by tap as AMX tiles.
    Bf16(TileTaps),
    /// Transformed for Winograd's F(2×2, 3×3) (3×3, stride 1, f32 products).
    Winograd(WinogradKernel),
    /// PyTorch's `(c_out, c_in·k·k)`, for Winograd transforming it block by block or one product
    /// over the image's im2col columns (stride 1, f32 products, too wide for a Winograd copy);
    /// usually in place in its weights file.
    Columns(F32Values),
}

/// The form an f32 kernel takes for its layer's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum F32Form {
    Taps,
    Winograd,
    Columns,
}

/// Stride-1 layers with fewer channels than this, in or out, keep packing their kernel tap by
/// tap: a copy of a few MB at most, and the products the small layers were measured fast with.
const COLUMNS_MIN_CHANNELS: usize = 128;

impl F32Form {
    /// Winograd's F(2×2, 3×3) for the 3×3 stride-1 layers it [suits](WinogradKernel::suits),
    /// the kernel in place for the other wide stride-1 layers (the UNet's 1280-channel levels),
    /// tap by tap for the rest: strided and narrow layers, 1×1 kernels.
    fn of((c_out, c_in, kernel): (usize, usize, usize), padding: usize, stride: usize) -> Self {
        if kernel == 3 && stride == 1 && padding <= 2 && WinogradKernel::suits(c_out, c_in) {
            Self::Winograd
        } else if kernel > 1 && stride == 1 && c_in.min(c_out) >= COLUMNS_MIN_CHANNELS {
            Self::Columns
        } else {
            Self::Taps
        }
    }
}

/// The shape of an NCHW activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nchw {
    /// Batch.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

impl Nchw {
    /// Elements in one image (`c·h·w`).
    pub(super) fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Elements in all images.
    pub fn len(&self) -> usize {
        self.n * self.image()
    }

    /// Whether the tensor holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An image split into the `s²` phases of its zero-padded version, each phase a stack of
/// channel planes whose rows are laid end to end with room for every tap's shift.
pub(super) struct Phases {
    data: Vec<f32>,
    stride: usize,
    /// Row length of a phase plane.
    width: usize,
    /// Elements per channel plane (rows · width).
    plane: usize,
    channels: usize,
}

impl Phases {
    /// Splits `x` (`c × h × w`, one image) padded by `pad_before` rows/columns at the top/left
    /// into `s²` phases of `rows × width` planes (zero where the padded image has no pixel).
    pub(super) fn split(
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        pad_before: usize,
        stride: usize,
        (rows, width): (usize, usize),
    ) -> Self {
        let plane = rows * width;
        let phase_len = c * plane;
        let mut data = vec![0f32; stride * stride * phase_len];
        data.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(index, dst)| {
                let (phase, channel) = (index / c, index % c);
                let (a, b) = (phase / stride, phase % stride);
                let src = &x[channel * h * w..(channel + 1) * h * w];
                for i in 0..rows {
                    let Some(r) = phase_source((stride, a), i, pad_before, h) else {
                        continue;
                    };
                    let row = &src[r * w..(r + 1) * w];
                    let dst_row = &mut dst[i * width..(i + 1) * width];
                    if stride == 1 {
                        let start = pad_before;
                        let len = w.min(width - start);
                        dst_row[start..start + len].copy_from_slice(&row[..len]);
                    } else {
                        for (j, d) in dst_row.iter_mut().enumerate() {
                            if let Some(col) = phase_source((stride, b), j, pad_before, w) {
                                *d = row[col];
                            }
                        }
                    }
                }
            });
        Self {
            data,
            stride,
            width,
            plane,
            channels: c,
        }
    }

    /// `len` elements of channel `channel`'s plane of a stride-1 split (one phase), starting
    /// at pixel `(dy, dx)` of the padded image.
    pub(super) fn channel_run(
        &self,
        channel: usize,
        (dy, dx): (usize, usize),
        len: usize,
    ) -> &[f32] {
        debug_assert_eq!(self.stride, 1, "one phase");
        let start = channel * self.plane + dy * self.width + dx;
        &self.data[start..start + len]
    }

    /// The `(channels, ·)` matrix of phase `(a, b)` shifted by `(dy, dx)` phase pixels.
    pub(super) fn shifted(&self, (a, b): (usize, usize), (dy, dx): (usize, usize)) -> Matrix {
        let phase = a * self.stride + b;
        let offset = phase * self.channels * self.plane + dy * self.width + dx;
        // Callers keep `offset + (channels−1)·plane + n` in bounds by sizing the planes with a
        // spare row.
        Matrix::rows(self.data[offset..].as_ptr(), self.plane)
    }
}

impl PackedConv {
    /// Packs a PyTorch-layout kernel `(c_out, c_in, k, k)` for `products`.
    pub fn pack(
        weight: &[f32],
        c_out: usize,
        c_in: usize,
        kernel: usize,
        products: Products,
    ) -> Self {
        assert_eq!(weight.len(), c_out * c_in * kernel * kernel, "kernel size");
        let taps_n = kernel * kernel;
        let weights = match products {
            Products::F32 => {
                let mut taps = vec![0f32; weight.len()];
                taps.par_chunks_mut(c_out * c_in)
                    .enumerate()
                    .for_each(|(tap, dst)| {
                        for (i, d) in dst.iter_mut().enumerate() {
                            *d = weight[i * taps_n + tap];
                        }
                    });
                Weights::F32(F32Values::Owned(taps))
            }
            Products::Bf16 => Weights::Bf16(TileTaps::pack(weight, c_out, c_in, kernel)),
        };
        Self {
            weights,
            c_out,
            c_in,
            kernel,
            padding: 0,
            stride: 1,
        }
    }

    /// An f32 kernel in PyTorch's `(c_out, c_in, k, k)` layout for a layer of this padding and
    /// stride: kept as it is where its layer reads that layout (1×1 kernels, and stride-1 layers
    /// outside Winograd's range), else packed.
    pub fn from_pytorch(
        weight: F32Values,
        (c_out, c_in, kernel): (usize, usize, usize),
        padding: usize,
        stride: usize,
    ) -> Self {
        assert_eq!(weight.len(), c_out * c_in * kernel * kernel, "kernel size");
        let weights = match F32Form::of((c_out, c_in, kernel), padding, stride) {
            F32Form::Columns => Weights::Columns(weight),
            F32Form::Taps if kernel == 1 => Weights::F32(weight),
            F32Form::Taps => Self::pack(&weight, c_out, c_in, kernel, Products::F32).weights,
            F32Form::Winograd => {
                Weights::Winograd(WinogradKernel::from_pytorch(&weight, c_out, c_in))
            }
        };
        Self {
            weights,
            c_out,
            c_in,
            kernel,
            padding,
            stride,
        }
    }

    /// How many values the transformed kernel of a layer of this shape, padding and stride
    /// holds, if that layer runs on Winograd's transformed kernel from f32 weights (see
    /// [`Self::from_pytorch`]); `None` for the other forms.
    pub fn transformed_len(
        (c_out, c_in, kernel): (usize, usize, usize),
        padding: usize,
        stride: usize,
    ) -> Option<usize> {
        (F32Form::of((c_out, c_in, kernel), padding, stride) == F32Form::Winograd)
            .then(|| WinogradKernel::transformed_len(c_out, c_in))
    }

    /// The 3×3 stride-1 layer that runs on `transformed`, a kernel that
    /// [`Self::transformed_kernel`] gave earlier for the same weights and geometry.
    pub fn from_transformed(
        transformed: F32Values,
        (c_out, c_in): (usize, usize),
        padding: usize,
    ) -> Self {
        assert_eq!(
            Self::transformed_len((c_out, c_in, 3), padding, 1),
            Some(transformed.len()),
            "not a transformed kernel of this layer"
        );
        Self {
            weights: Weights::Winograd(WinogradKernel::from_transformed(transformed, c_out, c_in)),
            c_out,
            c_in,
            kernel: 3,
            padding,
            stride: 1,
        }
    }

    /// The kernel transformed for Winograd's F(2×2, 3×3), when the layer runs on one: the values
    /// worth keeping for the next load, since [`Self::from_transformed`] takes them back.
    pub fn transformed_kernel(&self) -> Option<&[f32]> {
        match &self.weights {
            Weights::Winograd(kernel) => Some(kernel.transformed()),
            _ => None,
        }
    }

    /// Whether the kernel still holds values borrowed from its weights file (it runs in PyTorch's
    /// layout as it lies there); otherwise it was packed, and the file's pages can go.
    pub fn borrows_file(&self) -> bool {
        matches!(
            &self.weights,
            Weights::F32(F32Values::Mapped(_)) | Weights::Columns(F32Values::Mapped(_))
        )
    }

    /// The same kernel with another padding and stride, in the form that geometry runs (see
    /// [`Self::from_pytorch`]).
    pub fn with_geometry(mut self, padding: usize, stride: usize) -> Self {
        assert!(stride >= 1, "stride 0");
        self.padding = padding;
        self.stride = stride;
        let shape = (self.c_out, self.c_in, self.kernel);
        match (&self.weights, F32Form::of(shape, padding, stride)) {
            (Weights::Bf16(_), _)
            | (Weights::F32(_), F32Form::Taps)
            | (Weights::Winograd(_), F32Form::Winograd)
            | (Weights::Columns(_), F32Form::Columns) => self,
            (Weights::F32(taps), F32Form::Winograd) => {
                self.weights = Weights::Winograd(WinogradKernel::from_taps(taps, shape.0, shape.1));
                self
            }
            _ => Self::from_pytorch(F32Values::Owned(self.unpack()), shape, padding, stride),
        }
    }

    /// Back to PyTorch's `(c_out, c_in, k, k)` layout (for other devices and tests); bf16
    /// weights come back as the f32 values they hold.
    pub fn unpack(&self) -> Vec<f32> {
        let taps_n = self.kernel * self.kernel;
        let transformed;
        let taps: &[f32] = match &self.weights {
            Weights::F32(taps) => taps,
            Weights::Winograd(kernel) => {
                transformed = kernel.to_taps();
                &transformed
            }
            Weights::Bf16(tiles) => return tiles.unpack(self.c_out, self.c_in, self.kernel),
            Weights::Columns(values) => return values.to_vec(),
        };
        let mut weight = vec![0f32; taps.len()];
        for (tap, chunk) in taps.chunks(self.c_out * self.c_in).enumerate() {
            for (i, v) in chunk.iter().enumerate() {
                weight[i * taps_n + tap] = *v;
            }
        }
        weight
    }

    /// The output size for an input of `h × w`.
    pub fn output_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let side = |x: usize| {
            (x + 2 * self.padding)
                .checked_sub(self.kernel)
                .map(|d| d / self.stride + 1)
        };
        Some((side(h)?, side(w)?))
    }

    /// The `(c_out, c_in)` f32 slice of one tap.
    fn tap(&self, tap: usize) -> &[f32] {
        let Weights::F32(taps) = &self.weights else {
            unreachable!("tap products on bf16, Winograd or column weights")
        };
        &taps[tap * self.c_out * self.c_in..(tap + 1) * self.c_out * self.c_in]
    }

    /// The f32 kernel as one `(c_out, c_in)` matrix (a 1×1 convolution's).
    fn pointwise_weights(&self) -> *const f32 {
        self.tap(0).as_ptr()
    }

    /// A wide 3×3 layer's kernel in PyTorch's layout as Winograd's, transformed block by block,
    /// when an output of `output`'s shape has tiles enough for that to beat the im2col product.
    fn in_place_winograd<'a>(
        &self,
        weight: &'a [f32],
        output: Nchw,
    ) -> Option<winograd::Kernel<'a>> {
        (self.kernel == 3 && winograd::runs_in_place(self.padding, output)).then_some(
            winograd::Kernel::InPlace {
                weight,
                c_out: self.c_out,
                c_in: self.c_in,
            },
        )
    }

    /// `conv2d(x) + bias` (+ `extra[n, c_out]` per image and channel, e.g. a time embedding).
    ///
    /// `x`: NCHW of shape `input`. Returns the NCHW output and its shape.
    pub fn forward(
        &self,
        x: &[f32],
        input: Nchw,
        bias: Option<&[f32]>,
        extra: Option<&[f32]>,
    ) -> (Vec<f32>, Nchw) {
        assert_eq!(input.c, self.c_in, "input channels");
        assert_eq!(x.len(), input.len(), "input size");
        let (ho, wo) = self
            .output_size(input.h, input.w)
            .expect("input smaller than the kernel");
        let output = Nchw {
            n: input.n,
            c: self.c_out,
            h: ho,
            w: wo,
        };
        match &self.weights {
            Weights::Bf16(tiles) => {
                return (tiles.forward(self, x, input, bias, extra, output), output)
            }
            Weights::Winograd(kernel) => {
                let kernel = winograd::Kernel::Transformed(kernel);
                let y = kernel.forward(x, input, self.padding, (bias, extra), output);
                return (y, output);
            }
            Weights::Columns(weight) => {
                let y = match self.in_place_winograd(weight, output) {
                    Some(kernel) => kernel.forward(x, input, self.padding, (bias, extra), output),
                    None => columns::forward(self, weight, x, input, (bias, extra), output),
                };
                return (y, output);
            }
            Weights::F32(_) => {}
        }
        let mut out = vec![0f32; output.len()];
        if self.is_pointwise() {
            self.pointwise_forward(x, input, bias, extra, &mut out);
            return (out, output);
        }
        let (k, s) = (self.kernel, self.stride);
        let reach = (k - 1) / s;
        // Phase planes: `wo + reach` columns hold every tap's shift of a wide output row, and one
        // spare row keeps the last shifted view in bounds.
        let width = wo + reach;
        let rows = ho + reach + 1;
        let wide = ho * width;
        let threads = super::threads();
        let mut wide_out = vec![0f32; self.c_out * wide];
        for image in 0..input.n {
            let src = &x[image * input.image()..(image + 1) * input.image()];
            let phases = Phases::split(
                src,
                (input.c, input.h, input.w),
                self.padding,
                s,
                (rows, width),
            );
            for tap in 0..k * k {
                let (kh, kw) = (tap / k, tap % k);
                let rhs = phases.shifted((kh % s, kw % s), (kh / s, kw / s));
                let lhs = Matrix::rows(self.tap(tap).as_ptr(), self.c_in);
                // SAFETY: `wide_out` is `c_out × wide`; the tap is `c_out × c_in`; the shifted
                // view reads `c_in` rows of `wide` elements, the furthest ending at
                // `(reach·width + reach) + wide ≤ rows·width` inside its plane.
                unsafe {
                    product(
                        wide_out.as_mut_ptr(),
                        wide,
                        tap > 0,
                        (self.c_out, wide, self.c_in),
                        lhs,
                        rhs,
                        1.0,
                        threads,
                    )
                }
            }
            let dst = &mut out[image * output.image()..(image + 1) * output.image()];
            let offsets = Offsets { bias, extra, image };
            crop_wide(&wide_out, wide, width, dst, output, offsets);
        }
        (out, output)
    }

    /// `∂L/∂x` for an input of shape `input`, given `∂L/∂y` (`g`, the output's shape).
    pub fn input_grad(&self, g: &[f32], input: Nchw) -> Vec<f32> {
        let (ho, wo) = self
            .output_size(input.h, input.w)
            .expect("input smaller than the kernel");
        assert_eq!(g.len(), input.n * self.c_out * ho * wo, "gradient size");
        match &self.weights {
            Weights::Bf16(tiles) => return tiles.input_grad(self, g, input, (ho, wo)),
            Weights::Winograd(kernel) => {
                let kernel = winograd::Kernel::Transformed(kernel);
                return kernel.input_grad(g, input, self.padding, (ho, wo));
            }
            Weights::Columns(weight) => {
                let output = Nchw {
                    n: input.n,
                    c: self.c_out,
                    h: ho,
                    w: wo,
                };
                return match self.in_place_winograd(weight, output) {
                    Some(kernel) => kernel.input_grad(g, input, self.padding, (ho, wo)),
                    None => columns::input_grad(self, weight, g, input, (ho, wo)),
                };
            }
            Weights::F32(_) => {}
        }
        if self.is_pointwise() {
            return self.pointwise_input_grad(g, input);
        }
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        // The padded input gradient, phase by phase: phase `(a, b)` pixel `(i, j)` is padded pixel
        // `(s·i + a, s·j + b)`, and gets `Σ W[kh,kw]ᵀ · g[i − kh/s][j − kw/s]` over the taps
        // with `kh ≡ a`, `kw ≡ b (mod s)`. Shifts go backwards, so `g` is padded by `reach` at
        // the top and left.
        let reach = (k - 1) / s;
        let (hp, wp) = (input.h + 2 * p, input.w + 2 * p);
        let (phase_h, phase_w) = (hp.div_ceil(s), wp.div_ceil(s));
        let width = phase_w.max(wo) + reach;
        let rows = phase_h.max(ho) + reach + 1;
        let wide = phase_h * width;
        let threads = super::threads();
        let out_image = input.image();
        let mut dx = vec![0f32; input.len()];
        let mut wide_out = vec![0f32; self.c_in * wide];
        for image in 0..input.n {
            let g_image = &g[image * self.c_out * ho * wo..(image + 1) * self.c_out * ho * wo];
            let padded_g = Phases::split(g_image, (self.c_out, ho, wo), reach, 1, (rows, width));
            let dst = &mut dx[image * out_image..(image + 1) * out_image];
            for a in 0..s {
                for b in 0..s {
                    let taps: Vec<usize> = (0..k * k)
                        .filter(|t| (t / k) % s == a && (t % k) % s == b)
                        .collect();
                    if taps.is_empty() {
                        continue;
                    }
                    for (n, &tap) in taps.iter().enumerate() {
                        let (qh, qw) = ((tap / k) / s, (tap % k) / s);
                        let rhs = padded_g.shifted((0, 0), (reach - qh, reach - qw));
                        // Wᵀ of this tap: `(c_in, c_out)` read column-major from `(c_out, c_in)`.
                        let lhs = Matrix::transposed(self.tap(tap).as_ptr(), self.c_in);
                        // SAFETY: `wide_out` is `c_in × wide`; the view reads `c_out` rows of
                        // `wide` elements from offsets up to `reach·(width + 1)`, within `rows`.
                        unsafe {
                            product(
                                wide_out.as_mut_ptr(),
                                wide,
                                n > 0,
                                (self.c_in, wide, self.c_out),
                                lhs,
                                rhs,
                                1.0,
                                threads,
                            )
                        }
                    }
                    scatter_phase(
                        &wide_out,
                        wide,
                        dst,
                        (input.h, input.w),
                        (a, b),
                        (s, p),
                        (phase_h, width),
                    );
                }
            }
        }
        dx
    }
}

impl PackedConv {
    /// A 1×1 convolution with stride 1 and no padding: one product per image, no copies.
    pub(super) fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    fn pointwise_forward(
        &self,
        x: &[f32],
        input: Nchw,
        bias: Option<&[f32]>,
        extra: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let pixels = input.h * input.w;
        let threads = super::threads();
        for (image, (dst, src)) in out
            .chunks_mut(self.c_out * pixels)
            .zip(x.chunks(input.image()))
            .enumerate()
        {
            let has_offset = bias.is_some() || extra.is_some();
            if has_offset {
                dst.par_chunks_mut(pixels)
                    .enumerate()
                    .for_each(|(channel, plane)| {
                        plane.fill(
                            bias.map_or(0.0, |b| b[channel])
                                + extra.map_or(0.0, |e| e[image * self.c_out + channel]),
                        )
                    });
            }
            let (lhs, rhs) = (
                Matrix::rows(self.pointwise_weights(), self.c_in),
                Matrix::rows(src.as_ptr(), pixels),
            );
            // SAFETY: `dst` is `c_out × pixels`, `lhs` `c_out × c_in`, `rhs` `c_in × pixels`.
            unsafe {
                product(
                    dst.as_mut_ptr(),
                    pixels,
                    has_offset,
                    (self.c_out, pixels, self.c_in),
                    lhs,
                    rhs,
                    1.0,
                    threads,
                )
            }
        }
    }

    fn pointwise_input_grad(&self, g: &[f32], input: Nchw) -> Vec<f32> {
        let pixels = input.h * input.w;
        let threads = super::threads();
        let mut dx = vec![0f32; input.len()];
        for (dst, src) in dx
            .chunks_mut(input.image())
            .zip(g.chunks(self.c_out * pixels))
        {
            let (lhs, rhs) = (
                Matrix::transposed(self.pointwise_weights(), self.c_in),
                Matrix::rows(src.as_ptr(), pixels),
            );
            // SAFETY: `dst` is `c_in × pixels`, `lhs` (Wᵀ) `c_in × c_out`, `rhs` `c_out × pixels`.
            unsafe {
                product(
                    dst.as_mut_ptr(),
                    pixels,
                    false,
                    (self.c_in, pixels, self.c_out),
                    lhs,
                    rhs,
                    1.0,
                    threads,
                )
            }
        }
        dx
    }
}

/// Where element `index` of the phase at `offset` (every `stride`-th element from there) of a
/// signal padded by `pad` at its start comes from in the `len` unpadded ones, if anywhere.
pub(super) fn phase_source(
    (stride, offset): (usize, usize),
    index: usize,
    pad: usize,
    len: usize,
) -> Option<usize> {
    (stride * index + offset)
        .checked_sub(pad)
        .filter(|&i| i < len)
}

/// What the last pass of a forward adds to every pixel of a channel: the bias and a per-image
/// offset (`extra[image, channel]`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Offsets<'a> {
    pub bias: Option<&'a [f32]>,
    pub extra: Option<&'a [f32]>,
    pub image: usize,
}

/// Drops the junk columns of a wide output (channel rows `stride` apart, pixel rows `width`
/// apart) into the `output`-shaped image `dst`, adding the offsets.
pub(super) fn crop_wide(
    wide_out: &[f32],
    stride: usize,
    width: usize,
    dst: &mut [f32],
    output: Nchw,
    offsets: Offsets<'_>,
) {
    let (ho, wo) = (output.h, output.w);
    dst.par_chunks_mut(ho * wo)
        .zip(wide_out.par_chunks(stride))
        .enumerate()
        .for_each(|(channel, (dst, src))| {
            let add = offsets.bias.map_or(0.0, |b| b[channel])
                + offsets
                    .extra
                    .map_or(0.0, |e| e[offsets.image * output.c + channel]);
            for (row, dst_row) in dst.chunks_mut(wo).enumerate() {
                let src_row = &src[row * width..row * width + wo];
                for (d, v) in dst_row.iter_mut().zip(src_row) {
                    *d = v + add;
                }
            }
        });
}

/// Writes the valid pixels of one phase of the padded input gradient into `dx` (`c × h × w`);
/// the phase's channel rows are `stride` apart in `wide_out`.
pub(super) fn scatter_phase(
    wide_out: &[f32],
    stride: usize,
    dx: &mut [f32],
    (h, w): (usize, usize),
    (a, b): (usize, usize),
    (s, p): (usize, usize),
    (phase_h, width): (usize, usize),
) {
    dx.par_chunks_mut(h * w)
        .zip(wide_out.par_chunks(stride))
        .for_each(|(dst, src)| {
            for i in 0..phase_h {
                let Some(r) = phase_source((s, a), i, p, h) else {
                    continue;
                };
                let src_row = &src[i * width..(i + 1) * width];
                let dst_row = &mut dst[r * w..(r + 1) * w];
                if s == 1 {
                    // Columns `p..p + w` of the padded gradient are the input's.
                    dst_row.copy_from_slice(&src_row[p..p + w]);
                } else {
                    for (j, v) in src_row.iter().enumerate() {
                        if let Some(col) = phase_source((s, b), j, p, w) {
                            dst_row[col] = *v;
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use candle_core::{Tensor, Var};

    use super::*;
    use crate::engine::cpu::test_support::{assert_close, random, values, CONV_CASES};

    /// Forward, bias, offset and input gradient against candle's conv2d and its autograd, on
    /// odd sizes, both strides, both kernels and several paddings.
    #[test]
    fn matches_candle_forward_and_input_gradient() {
        for (seed, &(n, ci, co, h, w, k, p, s)) in CONV_CASES.iter().enumerate() {
            let what = format!("n{n} ci{ci} co{co} {h}x{w} k{k} p{p} s{s}");
            let seed = seed as u64 * 10;
            let x = random(&[n, ci, h, w], seed);
            let weight = random(&[co, ci, k, k], seed + 1);
            let bias = random(&[co], seed + 2);
            let offset = random(&[n, co], seed + 3);
            let packed =
                PackedConv::pack(&values(&weight), co, ci, k, Products::F32).with_geometry(p, s);
            let winograd = k == 3 && s == 1 && p <= 2 && WinogradKernel::suits(co, ci);
            let path = |packed: &PackedConv| match packed.weights {
                Weights::Winograd(_) => "winograd",
                Weights::Columns(_) => "columns",
                _ => "taps",
            };
            let expected = match (winograd, s, k, ci.min(co) >= COLUMNS_MIN_CHANNELS) {
                (true, ..) => "winograd",
                (false, 1, 3, true) => "columns",
                _ => "taps",
            };
            assert_eq!(
                path(&packed),
                expected,
                "{what}: the form its geometry runs"
            );
            // The same kernel tap by tap, and every stride-1 one in place too (im2col columns,
            // or Winograd transforming it on the fly where the output has tiles enough).
            let taps = PackedConv {
                padding: p,
                stride: s,
                ..PackedConv::pack(&values(&weight), co, ci, k, Products::F32)
            };
            let columns = PackedConv {
                weights: Weights::Columns(F32Values::Owned(values(&weight))),
                ..taps.clone()
            };
            let mut variants = vec![packed];
            if expected != "taps" {
                variants.push(taps);
            }
            if s == 1 && k > 1 && expected != "columns" {
                variants.push(columns);
            }
            for packed in variants {
                let path = path(&packed);
                let what = format!("{what} {path}");
                check_against_candle(&packed, (&x, &weight, &bias, &offset), (p, s), seed, &what);
            }
        }
    }

    /// Forward, bias, offset, unpacking and input gradient of one packed kernel against candle.
    fn check_against_candle(
        packed: &PackedConv,
        (x, weight, bias, offset): (&Tensor, &Tensor, &Tensor, &Tensor),
        (p, s): (usize, usize),
        seed: u64,
        what: &str,
    ) {
        let (n, ci, h, w) = x.dims4().unwrap();
        let co = weight.dim(0).unwrap();
        assert_close(
            &packed.unpack(),
            &values(weight),
            1e-6,
            &format!("{what}: unpack"),
        );

        let shape = Nchw { n, c: ci, h, w };
        let (y, out) = packed.forward(
            &values(x),
            shape,
            Some(&values(bias)),
            Some(&values(offset)),
        );
        let x_var = Var::from_tensor(x).unwrap();
        let reference = x_var
            .as_tensor()
            .conv2d(weight, p, s, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&offset.reshape((n, co, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(
            reference.dims(),
            &[out.n, out.c, out.h, out.w],
            "{what}: shape"
        );
        assert_close(&y, &values(&reference), 2e-5, &format!("{what}: forward"));

        let g = random(reference.dims(), seed + 4);
        let dx = packed.input_grad(&values(&g), shape);
        // candle's backward of a strided convolution fails when the stride leaves input
        // rows or columns unused (its transposed convolution comes out a size short);
        // there the adjoint identity below is the check.
        if let Ok(grads) = (reference * &g).unwrap().sum_all().unwrap().backward() {
            let dx_reference = grads.get(x_var.as_tensor()).unwrap();
            assert_close(
                &dx,
                &values(dx_reference),
                2e-5,
                &format!("{what}: input gradient"),
            );
        }
        // ⟨conv(x'), g⟩ = ⟨x', ∂⟩ for every x' when ∂ is the adjoint applied to g.
        for probe in 0..4 {
            let x_probe = values(&random(&[n, ci, h, w], seed + 100 + probe));
            let (y_probe, _) = packed.forward(&x_probe, shape, None, None);
            let dot = |a: &[f32], b: &[f32]| -> f64 {
                a.iter().zip(b).map(|(u, v)| *u as f64 * *v as f64).sum()
            };
            let (lhs, rhs) = (dot(&y_probe, &values(&g)), dot(&x_probe, &dx));
            assert!(
                (lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0),
                "{what}: adjoint identity {lhs} vs {rhs}"
            );
        }
    }

    /// `conv2d` with padding 1 in f64, the reference both paths are measured against.
    fn exact(
        x: &[f32],
        weight: &[f32],
        (c_in, c_out, h, w): (usize, usize, usize, usize),
    ) -> Vec<f64> {
        let mut y = vec![0f64; c_out * h * w];
        for (o, plane) in y.chunks_mut(h * w).enumerate() {
            for i in 0..c_in {
                let src = &x[i * h * w..(i + 1) * h * w];
                for tap in 0..9 {
                    let k = weight[(o * c_in + i) * 9 + tap] as f64;
                    let (dy, dx) = (tap / 3, tap % 3);
                    for r in 0..h {
                        let Some(sr) = (r + dy).checked_sub(1).filter(|&v| v < h) else {
                            continue;
                        };
                        for c in 0..w {
                            if let Some(sc) = (c + dx).checked_sub(1).filter(|&v| v < w) {
                                plane[r * w + c] += k * src[sr * w + sc] as f64;
                            }
                        }
                    }
                }
            }
        }
        y
    }

    /// Winograd's rounding is larger than the taps' (its sums run over transformed values that
    /// partly cancel); at a full-size layer's width it stays within a small factor of theirs, as
    /// the single im2col product's (its sums run over the taps and channels at once) does.
    #[test]
    fn rounding_stays_within_a_small_factor_of_the_taps() {
        let (c_in, c_out, h, w) = (256, 256, 10, 9);
        let x = values(&random(&[1, c_in, h, w], 7));
        let weight = values(&random(&[c_out, c_in, 3, 3], 8));
        let reference = exact(&x, &weight, (c_in, c_out, h, w));
        let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs()));
        let shape = Nchw {
            n: 1,
            c: c_in,
            h,
            w,
        };
        let error = |conv: &PackedConv| {
            let (y, _) = conv.forward(&x, shape, None, None);
            let worst = y
                .iter()
                .zip(&reference)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            worst / scale
        };
        let winograd = PackedConv::pack(&weight, c_out, c_in, 3, Products::F32).with_geometry(1, 1);
        let taps = PackedConv {
            padding: 1,
            ..PackedConv::pack(&weight, c_out, c_in, 3, Products::F32)
        };
        let columns = PackedConv {
            weights: Weights::Columns(F32Values::Owned(weight.clone())),
            ..taps.clone()
        };
        let (ours, plain, one_product) = (error(&winograd), error(&taps), error(&columns));
        eprintln!(
            "relative error: winograd {ours:.2e}, taps {plain:.2e}, columns {one_product:.2e}"
        );
        assert!(ours < 1e-6, "winograd error {ours:e}");
        for (name, error) in [("winograd", ours), ("columns", one_product)] {
            assert!(
                error < 4.0 * plain.max(1e-8),
                "{name} {error:e} against taps {plain:e}"
            );
        }
    }
}
