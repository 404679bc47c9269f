//! Shared helpers for the integration tests: the tiny fixture model and its reference tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use pix2pix_zero::engine::{source, StableDiffusion};

/// `tests/fixtures/tiny-sd`: a diffusers-format SD 1.x model with random weights.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd")
}

/// The tiny model, loaded in f32 on the CPU.
pub fn tiny_model() -> StableDiffusion {
    let dir = fixture_dir();
    let files = source::from_folder(&dir, &dir.display().to_string()).expect("fixture files");
    StableDiffusion::load(files, &Device::Cpu, DType::F32).expect("fixture model loads")
}

/// The reference tensors diffusers computed on the tiny model (`make_fixtures.py`).
pub fn reference() -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference/engine.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).expect("reference tensors")
}

/// Fetches one reference tensor by name.
pub fn get(reference: &HashMap<String, Tensor>, name: &str) -> Tensor {
    reference
        .get(name)
        .unwrap_or_else(|| panic!("reference tensor {name}"))
        .clone()
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The largest absolute value of a tensor.
pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `|a − b| ≤ atol + rtol·max|b|` everywhere, printing the error.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f32, rtol: f32) {
    let err = max_abs_diff(a, b);
    let scale = max_abs(b);
    let bound = atol + rtol * scale;
    eprintln!("{what}: max |diff| = {err:.3e} (max |ref| = {scale:.3e}, bound {bound:.3e})");
    assert!(err <= bound, "{what}: max |diff| {err:e} exceeds {bound:e}");
}

/// Cosine similarity of two flattened tensors.
pub fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
    let b = b.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
    let dot = (&a * &b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let na = a
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    let nb = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    (dot / (na * nb)) as f32
}
