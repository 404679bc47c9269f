//! Group normalisation of NCHW activations, optionally fused with the SiLU after it.
//!
//! candle's path takes about ten passes over memory on one thread (mean, centring, square, mean,
//! add, sqrt, reciprocal, scale, affine, SiLU); the forward here takes three (mean, variance,
//! normalise-affine-activate) and the backward five, each group of channels on its own thread.
//! The backward needs only the input: it recomputes the statistics instead of storing the
//! normalised activation and the SiLU's input.

use rayon::prelude::*;

use super::conv::Nchw;
use super::simd::{self, dispatch, LANES};

/// A group norm's parameters: `(channels,)` scale and shift, groups and epsilon.
#[derive(Debug, Clone)]
pub struct GroupNormParams {
    /// γ, one per channel.
    pub weight: Vec<f32>,
    /// β, one per channel.
    pub bias: Vec<f32>,
    /// Number of groups (divides the channel count).
    pub groups: usize,
    /// Added to the variance.
    pub eps: f32,
    /// Whether a SiLU follows the affine transform.
    pub silu: bool,
}

/// What one channel's elements are mapped with: `z = (x − mean)·inv_std·γ + β`, then the SiLU.
#[derive(Debug, Clone, Copy)]
struct ChannelMap {
    mean: f32,
    inv_std: f32,
    gamma: f32,
    beta: f32,
    silu: bool,
}

dispatch! {
    /// `(mean, 1/σ)` of a group's elements, the variance taken about the mean.
    fn moments(x: &[f32], eps: f32) -> (f32, f32) {
        let n = x.len() as f64;
        let mean = (simd::sum(x) / n) as f32;
        let var = simd::sum_map(x, |v| (v - mean) * (v - mean)) / n;
        (mean, 1.0 / (var as f32 + eps).sqrt())
    }
}

dispatch! {
    /// `y = silu?(x̂·γ + β)` for one channel.
    fn normalize_channel(y: &mut [f32], x: &[f32], map: ChannelMap) {
        let a = map.inv_std * map.gamma;
        let b = map.beta - map.mean * a;
        if map.silu {
            for (y, x) in y.iter_mut().zip(x) {
                let z = x * a + b;
                *y = z * simd::sigmoid(z);
            }
        } else {
            for (y, x) in y.iter_mut().zip(x) {
                *y = x * a + b;
            }
        }
    }
}

/// `∂L/∂x̂` of one element: the output gradient through the SiLU and the scale.
#[inline(always)]
fn normalized_grad(x_hat: f32, g: f32, map: &ChannelMap) -> f32 {
    if map.silu {
        let z = x_hat * map.gamma + map.beta;
        let s = simd::sigmoid(z);
        g * s * (1.0 + z * (1.0 - s)) * map.gamma
    } else {
        g * map.gamma
    }
}

dispatch! {
    /// `(Σ ∂L/∂x̂, Σ ∂L/∂x̂ · x̂)` over one channel.
    fn grad_sums(x: &[f32], g: &[f32], map: ChannelMap) -> (f64, f64) {
        let (mut lanes_g, mut lanes_gx) = ([0f32; LANES], [0f32; LANES]);
        let (mut cx, mut cg) = (x.chunks_exact(LANES), g.chunks_exact(LANES));
        for (xs, gs) in (&mut cx).zip(&mut cg) {
            for i in 0..LANES {
                let x_hat = (xs[i] - map.mean) * map.inv_std;
                let gh = normalized_grad(x_hat, gs[i], &map);
                lanes_g[i] += gh;
                lanes_gx[i] += gh * x_hat;
            }
        }
        let (mut sum_g, mut sum_gx) = (0f64, 0f64);
        for (x, g) in cx.remainder().iter().zip(cg.remainder()) {
            let x_hat = (x - map.mean) * map.inv_std;
            let gh = normalized_grad(x_hat, *g, &map);
            sum_g += gh as f64;
            sum_gx += (gh * x_hat) as f64;
        }
        let total = |lanes: [f32; LANES]| lanes.iter().map(|v| *v as f64).sum::<f64>();
        (sum_g + total(lanes_g), sum_gx + total(lanes_gx))
    }
}

dispatch! {
    /// `dx = (∂L/∂x̂ − mean_g − x̂·mean_gx)/σ` for one channel.
    fn write_grad(dx: &mut [f32], x: &[f32], g: &[f32], map: ChannelMap, means: (f32, f32)) {
        let (mean_g, mean_gx) = means;
        for ((d, x), g) in dx.iter_mut().zip(x).zip(g) {
            let x_hat = (x - map.mean) * map.inv_std;
            let gh = normalized_grad(x_hat, *g, &map);
            *d = (gh - mean_g - x_hat * mean_gx) * map.inv_std;
        }
    }
}

impl GroupNormParams {
    fn check(&self, x: &[f32], shape: Nchw) {
        assert_eq!(x.len(), shape.len(), "group norm: input size");
        assert!(
            shape.c.is_multiple_of(self.groups) && self.weight.len() == shape.c,
            "group norm: channels"
        );
    }

    /// Each group's elements with its map per channel, on the thread pool.
    fn for_each_group(
        &self,
        shape: Nchw,
        x: &[f32],
        out: &mut [f32],
        per_group: impl Fn(&mut [f32], &[f32], &[ChannelMap], usize) + Sync,
    ) {
        let per_group_channels = shape.c / self.groups;
        let plane = shape.h * shape.w;
        let group_len = per_group_channels * plane;
        out.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each(|(index, (out, x))| {
                let (mean, inv_std) = moments(x, self.eps);
                let first = (index % self.groups) * per_group_channels;
                let maps: Vec<ChannelMap> = (first..first + per_group_channels)
                    .map(|c| ChannelMap {
                        mean,
                        inv_std,
                        gamma: self.weight[c],
                        beta: self.bias[c],
                        silu: self.silu,
                    })
                    .collect();
                per_group(out, x, &maps, index);
            });
    }

    /// `silu?(group_norm(x))` of an NCHW tensor.
    pub fn forward(&self, x: &[f32], shape: Nchw) -> Vec<f32> {
        self.check(x, shape);
        let plane = shape.h * shape.w;
        let mut y = vec![0f32; x.len()];
        self.for_each_group(shape, x, &mut y, |y, x, maps, _| {
            for ((y, x), map) in y.chunks_mut(plane).zip(x.chunks(plane)).zip(maps) {
                normalize_channel(y, x, *map);
            }
        });
        y
    }

    /// `∂L/∂x` given `∂L/∂y` (`g`, the shape of `x`).
    pub fn backward(&self, x: &[f32], g: &[f32], shape: Nchw) -> Vec<f32> {
        self.check(x, shape);
        assert_eq!(g.len(), x.len(), "group norm: gradient size");
        let plane = shape.h * shape.w;
        let group_len = plane * shape.c / self.groups;
        let mut dx = vec![0f32; x.len()];
        self.for_each_group(shape, x, &mut dx, |dx, x, maps, index| {
            let g = &g[index * group_len..(index + 1) * group_len];
            let (mut sum_g, mut sum_gx) = (0f64, 0f64);
            for ((x, g), map) in x.chunks(plane).zip(g.chunks(plane)).zip(maps) {
                let (a, b) = grad_sums(x, g, *map);
                sum_g += a;
                sum_gx += b;
            }
            let n = group_len as f64;
            let means = ((sum_g / n) as f32, (sum_gx / n) as f32);
            for (((dx, x), g), map) in dx
                .chunks_mut(plane)
                .zip(x.chunks(plane))
                .zip(g.chunks(plane))
                .zip(maps)
            {
                write_grad(dx, x, g, *map, means);
            }
        });
        dx
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Module, Var};

    use super::*;
    use crate::engine::cpu::test_support::{max_error, random, values};

    /// Forward and backward, with and without the SiLU, against candle-nn's group norm and
    /// candle's autograd, on odd plane sizes and an offset, scaled input.
    #[test]
    fn matches_candle_group_norm_and_its_gradient() {
        // (n, c, h, w, groups)
        for (seed, &(n, c, h, w, groups)) in [
            (1, 8, 5, 7, 4),
            (2, 12, 3, 3, 3),
            (1, 32, 16, 16, 32),
            (2, 6, 1, 17, 2),
        ]
        .iter()
        .enumerate()
        {
            let seed = seed as u64 * 10;
            let x = ((random(&[n, c, h, w], seed) * 3.0).unwrap() + 1.5).unwrap();
            let weight = random(&[c], seed + 1);
            let bias = random(&[c], seed + 2);
            let g = random(&[n, c, h, w], seed + 3);
            let norm =
                candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, 1e-5).unwrap();
            for silu in [false, true] {
                let what = format!("n{n} c{c} {h}x{w} g{groups} silu {silu}");
                let params = GroupNormParams {
                    weight: values(&weight),
                    bias: values(&bias),
                    groups,
                    eps: 1e-5,
                    silu,
                };
                let shape = Nchw { n, c, h, w };
                let x_var = Var::from_tensor(&x).unwrap();
                let mut reference = norm.forward(x_var.as_tensor()).unwrap();
                if silu {
                    reference = candle_nn::ops::silu(&reference).unwrap();
                }
                let y = params.forward(&values(&x), shape);
                let error = max_error(&y, &values(&reference));
                assert!(error < 2e-5, "{what}: forward error {error}");

                let grads = (reference * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let dx_reference = values(grads.get(x_var.as_tensor()).unwrap());
                let dx = params.backward(&values(&x), &values(&g), shape);
                let scale = dx_reference.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let error = max_error(&dx, &dx_reference);
                assert!(
                    error < 5e-5 * scale,
                    "{what}: gradient error {error} at {scale}"
                );
            }
        }
    }
}
