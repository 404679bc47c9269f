//! What the kernels' tests share: seeded random tensors and error measures.

use candle_core::{DType, Device, Tensor};

use crate::engine::rng::Rng;

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
