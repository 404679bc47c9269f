//! The gradient of the cross-attention guidance loss with respect to the latent.
//!
//! candle's fused softmax and layer norm have no backward and silently cut the graph, so every
//! gradient our UNet produces is checked two ways: against central finite differences (in f64,
//! where they are accurate to about 1e-7 relative) and against torch's autograd on the same
//! tiny model (`grad.*` reference tensors).

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, cosine, get, reference};
use pix2pix_zero::edit::guidance::cross_attention_loss;
use pix2pix_zero::engine::control::{AttentionKind, Keep, RecordedMap, Recorder};
use pix2pix_zero::engine::{source, StableDiffusion};

const T: f64 = 481.0;

fn model(dtype: DType) -> StableDiffusion {
    let dir = common::fixture_dir();
    let files = source::from_folder(&dir, "fixture").unwrap();
    StableDiffusion::load(files, &Device::Cpu, dtype).unwrap()
}

/// Reference maps from `[x_ref; x_ref]` with `[cap; cap]`, as the guidance's reference pass.
fn reference_maps(
    model: &StableDiffusion,
    x_ref: &Tensor,
    context: &Tensor,
) -> BTreeMap<String, RecordedMap> {
    let mut recorder = Recorder::new(AttentionKind::CrossAttention, Keep::Detached(model.dtype));
    let x = Tensor::cat(&[x_ref, x_ref], 0).unwrap();
    model
        .unet
        .forward(&x, T, context, Some(&mut recorder))
        .unwrap();
    recorder.take()
}

/// The loss at `x_in` (2, 4, 16, 16), with the edited maps kept in the graph.
fn loss_at(
    model: &StableDiffusion,
    x_in: &Tensor,
    context: &Tensor,
    reference: &BTreeMap<String, RecordedMap>,
) -> Tensor {
    let mut recorder = Recorder::new(AttentionKind::CrossAttention, Keep::Graph);
    model
        .unet
        .forward(x_in, T, context, Some(&mut recorder))
        .unwrap();
    cross_attention_loss(recorder.maps(), reference).unwrap()
}

fn inputs(model: &StableDiffusion) -> (Tensor, Tensor, Tensor, Tensor) {
    let r = reference();
    let dt = model.dtype;
    let x = get(&r, "grad.x").to_dtype(dt).unwrap();
    let x_in = Tensor::cat(&[&x, &x], 0).unwrap();
    (
        x_in,
        get(&r, "grad.x_ref").to_dtype(dt).unwrap(),
        get(&r, "grad.context_ref").to_dtype(dt).unwrap(),
        get(&r, "grad.context_edit").to_dtype(dt).unwrap(),
    )
}

#[test]
fn loss_and_gradient_match_torch() {
    let model = model(DType::F32);
    let r = reference();
    let (x_in, x_ref, context_ref, context_edit) = inputs(&model);
    let maps = reference_maps(&model, &x_ref, &context_ref);
    let leaf = Var::from_tensor(&x_in).unwrap();
    let loss = loss_at(&model, leaf.as_tensor(), &context_edit, &maps);
    let expected_loss = get(&r, "grad.loss");
    assert_close(
        "loss",
        &loss.reshape(1).unwrap(),
        &expected_loss,
        2e-6,
        1e-5,
    );
    let grads = loss.backward().unwrap();
    let dx = grads
        .get(leaf.as_tensor())
        .expect("a gradient reaches the latent");
    let expected = get(&r, "grad.dx");
    let cos = cosine(dx, &expected);
    eprintln!("cosine with torch: {cos}");
    assert!(cos > 0.99999, "cosine {cos}");
    assert_close("dL/dx", dx, &expected, 0.0, 1e-4);
}

#[test]
fn gradient_matches_finite_differences_in_f64() {
    let model = model(DType::F64);
    let (x_in, x_ref, context_ref, context_edit) = inputs(&model);
    let maps = reference_maps(&model, &x_ref, &context_ref);
    let leaf = Var::from_tensor(&x_in).unwrap();
    let loss = loss_at(&model, leaf.as_tensor(), &context_edit, &maps);
    let dx = loss
        .backward()
        .unwrap()
        .get(leaf.as_tensor())
        .unwrap()
        .clone();

    let mut rng = pix2pix_zero::engine::rng::Rng::new(11);
    for trial in 0..3 {
        let direction = rng.randn(x_in.shape(), DType::F64, &Device::Cpu).unwrap();
        let h = 1e-4;
        let plus = loss_at(
            &model,
            &(&x_in + (&direction * h).unwrap()).unwrap(),
            &context_edit,
            &maps,
        );
        let minus = loss_at(
            &model,
            &(&x_in - (&direction * h).unwrap()).unwrap(),
            &context_edit,
            &maps,
        );
        let numeric = ((plus - minus).unwrap() / (2.0 * h))
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let analytic = (&dx * &direction)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let rel = (numeric - analytic).abs() / numeric.abs().max(1e-12);
        eprintln!("trial {trial}: finite difference {numeric:.9e}, autograd {analytic:.9e}, rel {rel:.2e}");
        assert!(rel < 1e-6, "directional derivative off by {rel:e}");
    }
}
