//! The generator's depthwise 3×3 convolution (stride 1, padding 1), with its gradients.
//!
//! candle runs a grouped convolution as one small convolution per channel, which makes a
//! depthwise layer dozens of times slower than its arithmetic. On the CPU in f32 this module does
//! it directly instead, one thread per image plane: the forward pass and the input gradient are
//! the same correlation (the latter with the kernel turned by 180°), and the kernel gradient sums
//! nine shifted products per plane. The loops are compiled twice, plain and for AVX2, and the
//! CPU picks at run time. Other devices and dtypes take candle's grouped convolution.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Depthwise 3×3 correlation of `x` `(n, c, h, w)` with `kernel` `(c, 1, 3, 3)`, zero-padded to
/// keep the size. Differentiable in both arguments.
pub fn depthwise3x3(x: &Tensor, kernel: &Tensor) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let kernel_dims = kernel.dims4()?;
    if kernel_dims != (c, 1, 3, 3) {
        candle_core::bail!("depthwise kernel {kernel_dims:?} does not match {c} channels");
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && kernel.dtype() == DType::F32 {
        x.contiguous()?.apply_op2(&kernel.contiguous()?, Depthwise)
    } else {
        x.conv2d(kernel, 1, 1, 1, c)
    }
}

/// Runs `body` compiled for AVX2 where the CPU has it (checked at run time), else as built.
/// The kernels are plain loops that LLVM vectorises; AVX2 doubles their width on x86-64.
fn dispatch<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn wide<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU was just checked to have AVX2.
            return unsafe { wide(body) };
        }
    }
    body()
}

/// The 3×3 correlation of one `h × w` plane with `taps` (row-major), written into `out`.
#[inline(always)]
fn correlate_plane(src: &[f32], taps: &[f32], out: &mut [f32], h: usize, w: usize) {
    let zeros = vec![0f32; w];
    let row = |y: isize| -> &[f32] {
        if y < 0 || y >= h as isize {
            &zeros
        } else {
            &src[y as usize * w..(y as usize + 1) * w]
        }
    };
    let k: [f32; 9] = std::array::from_fn(|i| taps[i]);
    for y in 0..h {
        let rows = [row(y as isize - 1), row(y as isize), row(y as isize + 1)];
        let out_row = &mut out[y * w..(y + 1) * w];
        // The edges, where a tap falls outside the row.
        for x in [0, w - 1] {
            let mut acc = 0f32;
            for (a, r) in rows.iter().enumerate() {
                for b in 0..3 {
                    let sx = x as isize + b as isize - 1;
                    if sx >= 0 && sx < w as isize {
                        acc += k[a * 3 + b] * r[sx as usize];
                    }
                }
            }
            out_row[x] = acc;
        }
        if w > 2 {
            let n = w - 2;
            let [r0, r1, r2] = rows.map(|r| (&r[..n], &r[1..n + 1], &r[2..n + 2]));
            for (i, o) in out_row[1..n + 1].iter_mut().enumerate() {
                *o = k[0] * r0.0[i]
                    + k[1] * r0.1[i]
                    + k[2] * r0.2[i]
                    + k[3] * r1.0[i]
                    + k[4] * r1.1[i]
                    + k[5] * r1.2[i]
                    + k[6] * r2.0[i]
                    + k[7] * r2.1[i]
                    + k[8] * r2.2[i];
            }
        }
    }
}

/// `Σ a[i]·b[i]` with eight partial sums, so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f32; 8];
    let (chunks_a, chunks_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for l in 0..8 {
            lanes[l] += ca[l] * cb[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The nine sums `Σ grad[y, x] · src[y + a − 1, x + b − 1]` of one plane.
#[inline(always)]
fn kernel_gradient_plane(src: &[f32], grad: &[f32], h: usize, w: usize) -> [f64; 9] {
    let mut sums = [0f64; 9];
    for y in 0..h {
        let g = &grad[y * w..(y + 1) * w];
        for a in 0..3 {
            let Some(sy) = (y + a).checked_sub(1).filter(|&sy| sy < h) else {
                continue;
            };
            let row = &src[sy * w..(sy + 1) * w];
            sums[a * 3 + 1] += dot(g, row) as f64;
            if w > 1 {
                sums[a * 3] += dot(&g[1..], &row[..w - 1]) as f64;
                sums[a * 3 + 2] += dot(&g[..w - 1], &row[1..]) as f64;
            }
        }
    }
    sums
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("the depthwise kernel needs contiguous tensors"),
    }
}

/// The forward correlation.
struct Depthwise;

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise3x3"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = x_layout.shape().dims4()?;
        let (x, k) = (f32_slice(x, x_layout)?, f32_slice(k, k_layout)?);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w))
            .enumerate()
            .for_each(|(plane, (out, src))| {
                let channel = plane % c;
                let taps = &k[channel * 9..channel * 9 + 9];
                dispatch(|| correlate_plane(src, taps, out, h, w));
            });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = kernel.dim(0)?;
        let turned: Vec<u32> = (0..9).rev().collect();
        let turned = Tensor::new(turned.as_slice(), kernel.device())?;
        let turned_kernel = kernel
            .reshape((c, 9))?
            .index_select(&turned, 1)?
            .reshape((c, 1, 3, 3))?;
        let grad = grad.contiguous()?;
        let grad_x = grad.apply_op2_no_bwd(&turned_kernel, &Depthwise)?;
        let grad_kernel = x.apply_op2_no_bwd(&grad, &KernelGradient)?;
        Ok((Some(grad_x), Some(grad_kernel)))
    }
}

/// The kernel's gradient from the input and the output's gradient: `(c, 1, 3, 3)`.
struct KernelGradient;

impl CustomOp2 for KernelGradient {
    fn name(&self) -> &'static str {
        "depthwise3x3-kernel-gradient"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = x_layout.shape().dims4()?;
        let (x, grad) = (f32_slice(x, x_layout)?, f32_slice(grad, grad_layout)?);
        let planes: Vec<[f64; 9]> = x
            .par_chunks(h * w)
            .zip(grad.par_chunks(h * w))
            .map(|(src, g)| dispatch(|| kernel_gradient_plane(src, g, h, w)))
            .collect();
        let mut out = vec![0f64; c * 9];
        for (plane, sums) in planes.iter().enumerate() {
            let channel = plane % c;
            for (o, s) in out[channel * 9..channel * 9 + 9].iter_mut().zip(sums) {
                *o += s;
            }
        }
        let out = out.into_iter().map(|v| v as f32).collect();
        Ok((CpuStorage::F32(out), Shape::from((c, 1, 3, 3))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The plain candle computation, which the kernel is tested against.
    fn depthwise3x3_reference(x: &Tensor, kernel: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        x.conv2d(kernel, 1, 1, 1, c)
    }

    fn random(shape: &[usize], seed: u64) -> Tensor {
        crate::engine::rng::Rng::new(seed)
            .randn(shape.to_vec(), DType::F32, &Device::Cpu)
            .unwrap()
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn matches_candle_forward_and_backward_on_odd_shapes() {
        for (i, &(n, c, h, w)) in [(1, 1, 1, 1), (2, 3, 5, 7), (1, 8, 9, 2), (3, 4, 16, 13)]
            .iter()
            .enumerate()
        {
            let x = Var::from_tensor(&random(&[n, c, h, w], i as u64)).unwrap();
            let k = Var::from_tensor(&random(&[c, 1, 3, 3], 100 + i as u64)).unwrap();
            let weights = random(&[n, c, h, w], 200 + i as u64);
            let ours = depthwise3x3(&x, &k).unwrap();
            let theirs = depthwise3x3_reference(&x, &k).unwrap();
            assert!(
                max_difference(&ours, &theirs) < 1e-5,
                "forward {n}x{c}x{h}x{w}"
            );
            let grads = |out: &Tensor| {
                let loss = (out * &weights).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                (
                    g.get(x.as_tensor()).unwrap().clone(),
                    g.get(k.as_tensor()).unwrap().clone(),
                )
            };
            let (ours_x, ours_k) = grads(&ours);
            let (theirs_x, theirs_k) = grads(&theirs);
            assert!(
                max_difference(&ours_x, &theirs_x) < 1e-4,
                "input gradient {n}x{c}x{h}x{w}"
            );
            assert!(
                max_difference(&ours_k, &theirs_k) < 1e-3,
                "kernel gradient {n}x{c}x{h}x{w}"
            );
        }
    }
}
