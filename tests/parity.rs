//! Parity of every engine component with diffusers/transformers on the tiny fixture model.
//!
//! The reference tensors come from `tests/fixtures/make_fixtures.py` (torch 2.15, diffusers
//! 0.42.1, transformers 5.24, f32). Tolerances are absolute unless said otherwise and sit a few
//! times above the float32 noise we measured, so a real numerical change fails them.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{assert_close, get, reference, tiny_model};
use pix2pix_zero::engine::control::{AttentionKind, Keep, Recorder};
use pix2pix_zero::engine::ddim::InverseSchedule;
use pix2pix_zero::engine::vae::LatentDraw;

const PROMPTS: [&str; 4] = [
    "a photo of a cat",
    "",
    "a cat sitting on a couch next to a window",
    "A highly detailed, photorealistic photograph of a fluffy orange tabby cat's face, sitting on an old wooden windowsill in the late afternoon sun, with soft golden light, shallow depth of field, a blurred garden full of red roses and tall green trees in the background, small water droplets on the glass, and a blue ceramic vase with white flowers next to it; shot on 35mm film, 85mm lens, f/1.8, award-winning composition",
];

#[test]
fn tokenizer_gives_the_clip_ids() {
    let model = tiny_model();
    let ids = model.text.tokenizer.encode("a photo of a cat").unwrap();
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(
        ids[7..].iter().all(|&id| id == 49407),
        "SD 1.x pads with <|endoftext|>"
    );

    let reference = reference();
    let expected = get(&reference, "tokens.ids").to_dtype(DType::U32).unwrap();
    let ours = model.text.token_ids(&PROMPTS, &Device::Cpu).unwrap();
    assert_eq!(
        ours.to_vec2::<u32>().unwrap(),
        expected.to_vec2::<u32>().unwrap()
    );
}

#[test]
fn tokenizer_json_gives_the_same_ids_as_vocab_and_merges() {
    let model = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        std::fs::copy(
            common::fixture_dir().join("tokenizer").join(file),
            dir.path().join(file),
        )
        .unwrap();
    }
    model
        .text
        .tokenizer
        .save_json(&dir.path().join("tokenizer.json"))
        .unwrap();
    let from_json = pix2pix_zero::engine::text::ClipTokenizer::load(dir.path(), 77).unwrap();
    for prompt in PROMPTS {
        assert_eq!(
            from_json.encode(prompt).unwrap(),
            model.text.tokenizer.encode(prompt).unwrap()
        );
    }
}

#[test]
fn clip_hidden_states_match_transformers() {
    let model = tiny_model();
    let reference = reference();
    let ours = model
        .text
        .embed(&PROMPTS, &Device::Cpu, DType::F32)
        .unwrap();
    assert_close(
        "clip last_hidden_state",
        &ours,
        &get(&reference, "clip.hidden"),
        2e-5,
        0.0,
    );
}

#[test]
fn unet_outputs_and_cross_attention_maps_match_diffusers() {
    let model = tiny_model();
    let reference = reference();
    let sample = get(&reference, "unet.sample");
    let x = Tensor::cat(&[&sample, &sample], 0).unwrap();
    let context = get(&reference, "unet.context");
    for t in [981usize, 21] {
        let plain = model.unet.forward(&x, t as f64, &context, None).unwrap();
        assert_close(
            &format!("unet t={t}"),
            &plain,
            &get(&reference, &format!("unet.t{t}.out")),
            2e-5,
            0.0,
        );

        let mut recorder = Recorder::new(AttentionKind::CrossAttention, Keep::Detached(DType::F32));
        let recorded = model
            .unet
            .forward(&x, t as f64, &context, Some(&mut recorder))
            .unwrap();
        assert_close(
            &format!("unet t={t} with recorder"),
            &recorded,
            &plain,
            1e-6,
            0.0,
        );
        let maps = recorder.maps();
        assert_eq!(maps.len(), 16, "SD 1.x has 16 cross-attention layers");
        for (name, map) in maps {
            let expected = get(&reference, &format!("unet.t{t}.probs.{name}"));
            assert_close(
                &format!("probs t={t} {name}"),
                &map.probs,
                &expected,
                1e-6,
                0.0,
            );
            assert_eq!(map.heads, 4);
        }
    }
}

#[test]
fn vae_posterior_and_decode_match_diffusers() {
    let model = tiny_model();
    let reference = reference();
    let posterior = model.vae.posterior(&get(&reference, "vae.image")).unwrap();
    assert_close(
        "vae mean",
        &posterior.mean,
        &get(&reference, "vae.mean"),
        2e-5,
        0.0,
    );
    assert_close(
        "vae logvar",
        &posterior.logvar,
        &get(&reference, "vae.logvar"),
        2e-5,
        0.0,
    );
    let decoded = model
        .vae
        .decode(&(get(&reference, "vae.decode_in") * 0.18215).unwrap())
        .unwrap();
    assert_close(
        "vae decode",
        &decoded,
        &get(&reference, "vae.decoded"),
        5e-5,
        0.0,
    );

    let encoded = model
        .vae
        .encode(&get(&reference, "vae.image"), LatentDraw::Mean)
        .unwrap();
    assert_close(
        "scaled mean",
        &encoded,
        &get(&reference, "invert.x0"),
        5e-6,
        0.0,
    );
    let a = model
        .vae
        .encode(&get(&reference, "vae.image"), LatentDraw::Sample(3))
        .unwrap();
    let b = model
        .vae
        .encode(&get(&reference, "vae.image"), LatentDraw::Sample(3))
        .unwrap();
    let c = model
        .vae
        .encode(&get(&reference, "vae.image"), LatentDraw::Sample(4))
        .unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0, "a seeded sample repeats");
    assert!(
        common::max_abs_diff(&a, &c) > 0.0,
        "another seed draws another sample"
    );
}

#[test]
fn ddim_schedule_and_trajectory_match_diffusers() {
    let model = tiny_model();
    let reference = reference();
    let ac = Tensor::new(model.scheduler.alphas_cumprod(), &Device::Cpu).unwrap();
    assert_close(
        "alphas_cumprod",
        &ac,
        &get(&reference, "ddim.alphas_cumprod"),
        1e-6,
        0.0,
    );
    let steps = 10;
    let timesteps: Vec<i64> = model
        .scheduler
        .timesteps(steps)
        .iter()
        .map(|&t| t as i64)
        .collect();
    assert_eq!(
        timesteps,
        get(&reference, "ddim.timesteps").to_vec1::<i64>().unwrap()
    );

    let context = model
        .text
        .embed(&["", "a photo of a cat"], &Device::Cpu, DType::F32)
        .unwrap();
    let expected = get(&reference, "ddim.latents");
    let mut x = get(&reference, "ddim.init");
    for (k, t) in model.scheduler.timesteps(steps).into_iter().enumerate() {
        let out = model
            .unet
            .forward(
                &Tensor::cat(&[&x, &x], 0).unwrap(),
                t as f64,
                &context,
                None,
            )
            .unwrap();
        let (uncond, cond) = (out.i(0..1).unwrap(), out.i(1..2).unwrap());
        let guided = (&uncond + ((cond - &uncond).unwrap() * 7.5).unwrap()).unwrap();
        x = model.scheduler.step(&guided, t, &x, steps).unwrap();
        assert_close(
            &format!("ddim step {k}"),
            &x,
            &expected.i(k + 1..k + 2).unwrap(),
            1e-5,
            2e-5,
        );
    }
}

#[test]
fn ddim_inversion_matches_both_schedules() {
    let model = tiny_model();
    let reference = reference();
    let caption = model
        .text
        .embed(&["a photo of a cat"], &Device::Cpu, DType::F32)
        .unwrap();
    for (schedule, name) in [
        (InverseSchedule::Exact, "exact"),
        (InverseSchedule::Authors, "authors"),
    ] {
        let expected = get(&reference, &format!("invert.{name}.latents"));
        let plan = model.scheduler.inversion_plan(10, schedule);
        let timesteps: Vec<i64> = plan.iter().map(|s| s.unet_t as i64).collect();
        assert_eq!(
            timesteps,
            get(&reference, &format!("invert.{name}.timesteps"))
                .to_vec1::<i64>()
                .unwrap()
        );
        assert_eq!(plan.len() + 1, expected.dim(0).unwrap());
        let mut x = get(&reference, "invert.x0");
        for (k, step) in plan.iter().enumerate() {
            let eps = model
                .unet
                .forward(&x, step.unet_t as f64, &caption, None)
                .unwrap();
            x = model.scheduler.inverse_step(&eps, step, &x).unwrap();
            assert_close(
                &format!("{name} inversion step {k}"),
                &x,
                &expected.i(k + 1..k + 2).unwrap(),
                2e-5,
                5e-5,
            );
        }
    }
}
