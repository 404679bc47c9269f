//! Sessions: a re-edit replays the cached reference maps and equals a fresh edit; sessions
//! survive a round trip through disk; mismatched, damaged and cancelled sessions are handled.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use common::tiny_model;
use pix2pix_zero::edit::guidance::GuidanceParams;
use pix2pix_zero::edit::inversion::InversionParams;
use pix2pix_zero::edit::noise_reg::NoiseRegularization;
use pix2pix_zero::edit::session::Session;
use pix2pix_zero::edit::{
    edit, photo_session, synthetic_session, EditOutcome, EditSettings, PhotoSettings,
};
use pix2pix_zero::engine::ddim::InverseSchedule;
use pix2pix_zero::engine::vae::LatentDraw;
use pix2pix_zero::engine::{Error, StableDiffusion};

const STEPS: usize = 5;

fn photo() -> Tensor {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference/editor.safetensors");
    let image = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .remove("image")
        .unwrap();
    ((image * 2.0).unwrap() - 1.0).unwrap()
}

fn delta(model: &StableDiffusion, seed: u64) -> Tensor {
    let mut rng = pix2pix_zero::engine::rng::Rng::new(seed);
    (rng.randn((1, 77, 32), DType::F32, &model.device).unwrap() * 0.5).unwrap()
}

fn settings(lambda_xa: f64, strength: f64) -> EditSettings {
    EditSettings {
        guidance: GuidanceParams {
            lambda_xa,
            guidance_scale: 5.0,
        },
        strength,
    }
}

/// Edits `session` along the random direction `seed`, with no progress report and no cancel.
fn edit_with(
    model: &StableDiffusion,
    session: &mut Session,
    seed: u64,
    settings: &EditSettings,
) -> EditOutcome {
    edit(
        model,
        session,
        &delta(model, seed),
        settings,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap()
}

fn new_session(model: &StableDiffusion) -> Session {
    let settings = PhotoSettings {
        latent_draw: LatentDraw::Mean,
        inversion: InversionParams {
            steps: STEPS,
            schedule: InverseSchedule::Authors,
            regularization: Some(NoiseRegularization::default()),
        },
        seed: 3,
    };
    photo_session(
        model,
        &photo(),
        42,
        "a photo of a cat",
        STEPS,
        &settings,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(a, b)
}

#[test]
fn a_re_edit_replays_the_cache_and_equals_a_fresh_edit() {
    let model = tiny_model();
    let never = AtomicBool::new(false);
    let mut cached = new_session(&model);
    let first = edit_with(&model, &mut cached, 1, &settings(0.1, 1.0));
    assert!(!first.reused_reference);
    assert!(cached.is_complete());

    // Another word, λ_xa and strength: only the edited pass runs, from the cached maps.
    let mut stages = vec![];
    let re_edit = edit(
        &model,
        &mut cached,
        &delta(&model, 2),
        &settings(0.2, 0.7),
        &mut |p| stages.push(p.stage),
        &never,
    )
    .unwrap();
    assert!(re_edit.reused_reference);
    assert!(stages.iter().all(|s| *s == "edit"), "{stages:?}");

    let mut fresh = new_session(&model);
    let from_scratch = edit_with(&model, &mut fresh, 2, &settings(0.2, 0.7));
    assert_eq!(
        max_diff(&re_edit.latent, &from_scratch.latent),
        0.0,
        "a re-edit is the same computation"
    );
    assert_eq!(re_edit.losses, from_scratch.losses);
    assert!(
        max_diff(&first.latent, &re_edit.latent) > 1e-3,
        "the new word changed the edit"
    );
}

#[test]
fn sessions_round_trip_through_disk_and_report_their_size() {
    let model = tiny_model();
    let mut session = new_session(&model);
    edit(
        &model,
        &mut session,
        &delta(&model, 1),
        &settings(0.1, 1.0),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    session.save(&path).unwrap();
    let loaded = Session::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.header, session.header);
    assert!(loaded.is_complete());
    assert_eq!(loaded.bytes(), session.bytes());
    assert_eq!(max_diff(&loaded.start, &session.start), 0.0);
    for (a, b) in loaded.reference.iter().zip(&session.reference) {
        assert_eq!(a.layers.len(), 16);
        for (name, map) in &a.layers {
            assert_eq!(map.probs.dtype(), DType::F16, "maps are stored compactly");
            assert_eq!(max_diff(&map.probs, &b.layers[name].probs), 0.0);
            assert_eq!(
                (map.spatial, map.heads),
                (b.layers[name].spatial, b.layers[name].heads)
            );
        }
    }
    eprintln!(
        "tiny-model session: {} steps, {:.2} MB",
        STEPS,
        session.bytes() as f64 / 1e6
    );

    // The loaded session gives the same re-edit as the one in memory.
    let mut loaded = loaded;
    let a = edit_with(&model, &mut session, 5, &settings(0.1, 1.0));
    let b = edit_with(&model, &mut loaded, 5, &settings(0.1, 1.0));
    assert_eq!(max_diff(&a.latent, &b.latent), 0.0);
}

#[test]
fn mismatched_and_damaged_sessions_are_refused() {
    let model = tiny_model();
    let session = new_session(&model);
    let path = std::path::Path::new("s.safetensors");
    let mut other = session.header.clone();
    other.caption = "a photo of a dog".into();
    let err = session.check_matches(&other, path).unwrap_err().to_string();
    assert!(
        err.contains("caption") && err.contains("--session"),
        "{err}"
    );
    let mut other = session.header.clone();
    if let pix2pix_zero::edit::session::SessionSource::Photo { image_hash, .. } = &mut other.source
    {
        *image_hash = "ffff".into();
    }
    let err = session.check_matches(&other, path).unwrap_err().to_string();
    assert!(err.contains("another image"), "{err}");
    let mut other = session.header.clone();
    other.model_key = "elsewhere".into();
    let err = session.check_matches(&other, path).unwrap_err().to_string();
    assert!(err.contains("model"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.safetensors");
    session.save(&file).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = Session::load(&file, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("damaged"), "{err}");
    std::fs::write(&file, b"{}").unwrap();
    assert!(Session::load(&file, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("damaged"));
}

#[test]
fn a_cancelled_edit_leaves_the_session_as_it_was() {
    let model = tiny_model();
    let mut session = new_session(&model);
    let err = edit(
        &model,
        &mut session,
        &delta(&model, 1),
        &settings(0.1, 1.0),
        &mut |_| {},
        &AtomicBool::new(true),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled));
    assert!(session.reference.is_empty() && session.reconstruction.is_none());

    // Cancelled half-way: the partial reference pass is dropped, not half-cached.
    let cancel = AtomicBool::new(false);
    let err = edit(
        &model,
        &mut session,
        &delta(&model, 1),
        &settings(0.1, 1.0),
        &mut |p| {
            if p.step == 2 {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        },
        &cancel,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled));
    assert!(!session.is_complete() && session.reference.is_empty());
}

#[test]
fn synthetic_edits_re_run_the_reference_when_the_cfg_scale_changes() {
    let model = tiny_model();
    let mut session =
        synthetic_session(&model, "a photo of a cat", 4, (128, 128), STEPS, 5.0).unwrap();
    let first = edit_with(&model, &mut session, 1, &settings(0.15, 1.0));
    assert!(!first.reused_reference);
    let same_scale = edit_with(&model, &mut session, 1, &settings(0.15, 1.0));
    assert!(same_scale.reused_reference);
    assert_eq!(max_diff(&first.latent, &same_scale.latent), 0.0);
    let mut other = settings(0.15, 1.0);
    other.guidance.guidance_scale = 7.5;
    let new_scale = edit_with(&model, &mut session, 1, &other);
    assert!(
        !new_scale.reused_reference,
        "the reference pass of a synthetic image depends on the CFG scale"
    );
}
