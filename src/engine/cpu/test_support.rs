//! What the kernels' tests share: seeded random tensors and error measures.

use candle_core::{DType, Device, Tensor};

use crate::engine::rng::Rng;

/// `(n, c_in, c_out, h, w, kernel, padding, stride)`.
pub type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize);

/// Convolutions the kernels are tested on: `(n, c_in, c_out, h, w, kernel, padding, stride)`,
/// odd sizes, both strides and kernels, paddings 0–2, channel counts below, at and above one AMX
/// `k` block, and layers wide enough for Winograd's path (the im2col product's variants of the
/// last three run Winograd in place on the first two and im2col on the last, by their tiles).
pub const CONV_CASES: [ConvCase; 14] = [
    (1, 3, 5, 7, 9, 3, 1, 1),
    (2, 4, 6, 8, 8, 3, 1, 2),
    (1, 5, 3, 9, 6, 3, 0, 2),
    (1, 4, 4, 11, 10, 3, 1, 2),
    (1, 40, 36, 11, 10, 3, 1, 2),
    (2, 3, 4, 6, 7, 3, 2, 1),
    (1, 6, 5, 7, 8, 3, 0, 1),
    (1, 8, 16, 5, 5, 1, 0, 1),
    (2, 2, 3, 5, 4, 1, 0, 2),
    (1, 17, 33, 13, 3, 3, 1, 1),
    (1, 70, 33, 13, 3, 3, 1, 1),
    (2, 130, 128, 9, 7, 3, 1, 1),
    (1, 128, 136, 6, 5, 3, 2, 1),
    (1, 128, 130, 3, 4, 3, 1, 1),
];

/// A standard-normal f32 CPU tensor from our seeded generator.
pub fn random(shape: &[usize], seed: u64) -> Tensor {
    Rng::new(seed)
        .randn(shape, DType::F32, &Device::Cpu)
        .unwrap()
}

/// The elements in row-major order.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The largest absolute difference.
pub fn max_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Fails unless every element is within `tolerance` of the reference's largest magnitude.
pub fn assert_close(ours: &[f32], reference: &[f32], tolerance: f32, what: &str) {
    let scale = reference.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    let worst = max_error(ours, reference);
    assert!(
        worst <= tolerance * scale,
        "{what}: max error {worst} at scale {scale}"
    );
}
