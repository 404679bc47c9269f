//! Stride-1 convolutions as one matrix product over the image's im2col columns, on PyTorch's
//! `(c_out, c_in·k·k)` kernel layout as it lies in the weights file.
//!
//! The layers too wide for a Winograd copy of their kernel (the UNet's 1280-channel levels, most
//! of its weights) keep that kernel in place, so loading them costs no fresh memory; their 3×3
//! convolutions run here on outputs too small for Winograd in place
//! ([`super::winograd::runs_in_place`]), and their other kernel sizes always. Row
//! `ci·k² + t` of the columns is channel `ci` of the zero-padded image shifted by tap `t`, laid
//! out "wide" as in [`super::conv`] (rows of `wo + k − 1` pixels, junk past `wo`), so the forward
//! is `W · columns` and the input gradient is `Wᵀ · g` scattered back tap by tap (col2im).

use rayon::prelude::*;

use super::conv::{crop_wide, Nchw, Offsets, PackedConv, Phases};
use super::matmul::{product, Matrix};

/// The wide geometry of a stride-1 layer: `(width, rows, wide)`, where a wide row holds
/// `width` pixels, the padded planes have `rows` rows (one spare) and a wide output `wide`
/// elements per channel.
fn wide_geometry(conv: &PackedConv, (ho, wo): (usize, usize)) -> (usize, usize, usize) {
    let reach = conv.kernel - 1;
    let width = wo + reach;
    (width, ho + reach + 1, ho * width)
}

/// `conv2d(x) + bias + extra` for `weight` in PyTorch's layout; `x` is NCHW of shape `input`.
pub(super) fn forward(
    conv: &PackedConv,
    weight: &[f32],
    x: &[f32],
    input: Nchw,
    (bias, extra): (Option<&[f32]>, Option<&[f32]>),
    output: Nchw,
) -> Vec<f32> {
    assert_eq!(conv.stride, 1, "im2col columns are for stride-1 layers");
    let (k, taps) = (conv.kernel, conv.kernel * conv.kernel);
    let (width, rows, wide) = wide_geometry(conv, (output.h, output.w));
    let depth = taps * conv.c_in;
    let threads = super::threads();
    let mut columns = vec![0f32; depth * wide];
    let mut wide_out = vec![0f32; conv.c_out * wide];
    let mut out = vec![0f32; output.len()];
    for image in 0..input.n {
        let src = &x[image * input.image()..(image + 1) * input.image()];
        let padded = Phases::split(
            src,
            (input.c, input.h, input.w),
            conv.padding,
            1,
            (rows, width),
        );
        columns
            .par_chunks_mut(taps * wide)
            .enumerate()
            .for_each(|(channel, dst)| {
                for (tap, row) in dst.chunks_mut(wide).enumerate() {
                    row.copy_from_slice(padded.channel_run(channel, (tap / k, tap % k), wide));
                }
            });
        // SAFETY: `wide_out` is `c_out × wide`, `weight` `c_out × depth` and `columns`
        // `depth × wide`, all row-major.
        unsafe {
            product(
                wide_out.as_mut_ptr(),
                wide,
                false,
                (conv.c_out, wide, depth),
                Matrix::rows(weight.as_ptr(), depth),
                Matrix::rows(columns.as_ptr(), wide),
                1.0,
                threads,
            )
        }
        let dst = &mut out[image * output.image()..(image + 1) * output.image()];
        let offsets = Offsets { bias, extra, image };
        crop_wide(&wide_out, wide, width, dst, output, offsets);
    }
    out
}

/// `∂L/∂x` for an input of shape `input` given `∂L/∂y` (`g`, `(n, c_out, ho, wo)`).
pub(super) fn input_grad(
    conv: &PackedConv,
    weight: &[f32],
    g: &[f32],
    input: Nchw,
    (ho, wo): (usize, usize),
) -> Vec<f32> {
    assert_eq!(conv.stride, 1, "im2col columns are for stride-1 layers");
    let (k, taps, p) = (conv.kernel, conv.kernel * conv.kernel, conv.padding);
    let (width, rows, wide) = wide_geometry(conv, (ho, wo));
    let depth = taps * conv.c_in;
    let threads = super::threads();
    let mut d_columns = vec![0f32; depth * wide];
    let mut dx = vec![0f32; input.len()];
    let g_image = conv.c_out * ho * wo;
    for image in 0..input.n {
        // `g` laid out wide, with zeros in the junk columns, so they add nothing below.
        let g_wide = Phases::split(
            &g[image * g_image..(image + 1) * g_image],
            (conv.c_out, ho, wo),
            0,
            1,
            (ho, width),
        );
        // SAFETY: `d_columns` is `depth × wide`; `weight` read transposed is `depth × c_out`;
        // `g_wide` is `c_out` planes of `ho·width = wide` elements.
        unsafe {
            product(
                d_columns.as_mut_ptr(),
                wide,
                false,
                (depth, wide, conv.c_out),
                Matrix::transposed(weight.as_ptr(), depth),
                g_wide.shifted((0, 0), (0, 0)),
                1.0,
                threads,
            )
        }
        let dst = &mut dx[image * input.image()..(image + 1) * input.image()];
        dst.par_chunks_mut(input.h * input.w)
            .zip(d_columns.par_chunks(taps * wide))
            .for_each_init(
                || vec![0f32; rows * width],
                |padded, (dst, d_channel)| {
                    padded.fill(0.0);
                    // Each tap's column goes back to where the forward read it from.
                    for (tap, d_row) in d_channel.chunks(wide).enumerate() {
                        let start = (tap / k) * width + tap % k;
                        for (acc, v) in padded[start..start + wide].iter_mut().zip(d_row) {
                            *acc += v;
                        }
                    }
                    for (y, dst_row) in dst.chunks_mut(input.w).enumerate() {
                        let start = (y + p) * width + p;
                        dst_row.copy_from_slice(&padded[start..start + input.w]);
                    }
                },
            );
    }
    dx
}
