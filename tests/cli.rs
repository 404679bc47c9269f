//! The `p2pz` binary end to end on the tiny fixture model.

mod common;

use std::process::Command;

/// Asserts that a command succeeded, showing its stderr otherwise, and returns the stderr.
fn succeeded(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    err
}

fn p2pz() -> Command {
    Command::new(env!("CARGO_BIN_EXE_p2pz"))
}

#[test]
fn info_lists_components_and_the_sixteen_cross_attention_layers() {
    let out = p2pz()
        .args(["info", "--model"])
        .arg(common::fixture_dir())
        .args(["--size", "128"])
        .output()
        .unwrap();
    succeeded(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("16 self, 16 cross"), "{text}");
    assert!(
        text.contains("up.3.attn2.2") && text.contains("16x16"),
        "{text}"
    );
    assert!(
        text.contains("text_encoder") && text.contains("F32"),
        "{text}"
    );
}

#[test]
fn generate_writes_a_png_that_records_its_parameters_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let path = dir.path().join(name);
        let out = p2pz()
            .args(["generate", "--model"])
            .arg(common::fixture_dir())
            .args([
                "--prompt",
                "a photo of a cat",
                "--steps",
                "3",
                "--seed",
                "7",
                "--width",
                "128",
                "--height",
                "64",
                "--out",
            ])
            .arg(&path)
            .output()
            .unwrap();
        succeeded(&out);
        path
    };
    let (a, b) = (run("a.png"), run("b.png"));
    let image = image::open(&a).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (128, 64));
    assert_eq!(
        image,
        image::open(&b).unwrap().to_rgb8(),
        "same seed, same image"
    );
    let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&a).unwrap()))
        .read_info()
        .unwrap();
    let record = reader.info().utf8_text[0].get_text().unwrap();
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["params"]["seed"], 7);
    assert_eq!(record["params"]["prompt"], "a photo of a cat");
}

#[test]
fn bad_input_fails_with_a_message_and_a_nonzero_exit() {
    let out = p2pz()
        .args(["info", "--model", "/no/such/model"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/no/such/model") && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        !err.contains("stack backtrace") && !err.contains(" 0: "),
        "no backtrace for users: {err}"
    );

    let out = p2pz()
        .args(["generate", "--model"])
        .arg(common::fixture_dir())
        .args([
            "--prompt",
            "x",
            "--width",
            "100",
            "--height",
            "64",
            "--out",
            "/tmp/never.png",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("100x64") && err.contains("multiple of 64"),
        "{err}"
    );
}

/// Writes the editor fixture's photo as a PNG (128×96, so the working size differs from it).
fn write_photo(dir: &std::path::Path) -> std::path::PathBuf {
    let image = image::RgbImage::from_fn(160, 120, |x, y| {
        image::Rgb([
            (x * 255 / 160) as u8,
            (y * 255 / 120) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    let path = dir.join("photo.png");
    image.save(&path).unwrap();
    path
}

fn edit_command(dir: &std::path::Path, photo: &std::path::Path) -> Command {
    edit_words(dir, photo, ("cat", "dog"))
}

fn edit_words(dir: &std::path::Path, photo: &std::path::Path, (from, to): (&str, &str)) -> Command {
    let mut cmd = p2pz();
    cmd.env("XDG_CACHE_HOME", dir.join("cache"))
        .arg("edit")
        .arg(photo)
        .arg("--model")
        .arg(common::fixture_dir())
        .args([
            "--caption",
            "a photo of a cat",
            "--from",
            from,
            "--to",
            to,
            "--sentences",
            "16",
        ])
        .args(["--steps", "3", "--size", "128"]);
    cmd
}

#[test]
fn edit_writes_the_result_at_the_photo_size_and_a_re_edit_reuses_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let photo = write_photo(dir.path());
    let session = dir.path().join("s.safetensors");
    let out = edit_command(dir.path(), &photo)
        .arg("--session")
        .arg(&session)
        .arg("--out")
        .arg(dir.path().join("edited.png"))
        .arg("--reconstruction")
        .arg(dir.path().join("recon.png"))
        .output()
        .unwrap();
    succeeded(&out);
    for name in ["edited.png", "recon.png"] {
        let image = image::open(dir.path().join(name)).unwrap();
        assert_eq!(
            (image.width(), image.height()),
            (160, 120),
            "exported at the photo's own size"
        );
    }
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("edited.json")).unwrap())
            .unwrap();
    assert_eq!(sidecar["to"], "dog");
    assert_eq!(sidecar["edit"]["guidance"]["lambda_xa"], 0.1);
    assert!(session.is_file());

    let out = edit_command(dir.path(), &photo)
        .args(["--xa", "0.2", "--session"])
        .arg(&session)
        .arg("--out")
        .arg(dir.path().join("edited2.png"))
        .output()
        .unwrap();
    let err = succeeded(&out);
    assert!(
        err.contains("inversion skipped") && err.contains("from the session cache"),
        "{err}"
    );
}

#[test]
fn editor_bad_input_gets_a_message_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let photo = write_photo(dir.path());
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "should fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let out = dir.path().join("out.png");

    let truncated = dir.path().join("truncated.png");
    let bytes = std::fs::read(&photo).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let err = run(edit_command(dir.path(), &truncated).arg("--out").arg(&out));
    assert!(
        err.contains("truncated.png") && err.contains("not a readable image"),
        "{err}"
    );

    let err = run(edit_words(dir.path(), &photo, ("cat", "Cat"))
        .arg("--out")
        .arg(&out));
    assert!(err.contains("both `cat`"), "{err}");

    let err = run(edit_words(dir.path(), &photo, (" ", "dog"))
        .arg("--out")
        .arg(&out));
    assert!(err.contains("empty"), "{err}");

    let err = run(edit_command(dir.path(), &photo).arg("--out").arg(&photo));
    assert!(err.contains("never overwritten"), "{err}");

    let wrong = dir.path().join("wrong.safetensors");
    pix2pix_zero::edit::tensor_file::encode(
        &[(
            "direction",
            &candle_core::Tensor::zeros(
                (1, 77, 768),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap(),
        )],
        Default::default(),
    )
    .map(|b| std::fs::write(&wrong, b).unwrap())
    .unwrap();
    let err = run(edit_command(dir.path(), &photo)
        .arg("--direction")
        .arg(&wrong)
        .arg("--out")
        .arg(&out));
    assert!(
        err.contains("(1, 77, 32)") && err.contains("[1, 77, 768]"),
        "{err}"
    );

    // A session made for another photo is refused.
    let session = dir.path().join("s.safetensors");
    let ok = p2pz()
        .arg("invert")
        .arg(&photo)
        .arg("--model")
        .arg(common::fixture_dir())
        .args([
            "--caption",
            "a photo of a cat",
            "--steps",
            "3",
            "--size",
            "128",
            "--session",
        ])
        .arg(&session)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let other = dir.path().join("other.png");
    image::RgbImage::from_pixel(160, 120, image::Rgb([9, 9, 9]))
        .save(&other)
        .unwrap();
    let err = run(edit_command(dir.path(), &other)
        .arg("--session")
        .arg(&session)
        .arg("--out")
        .arg(&out));
    assert!(err.contains("another image"), "{err}");
    assert!(!out.exists(), "nothing is written on failure");
}

#[test]
fn caption_prints_blips_caption_and_edit_uses_it_when_none_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let photo = write_photo(dir.path());
    let blip = common::fixture_dir().parent().unwrap().join("tiny-blip");
    let out = p2pz()
        .arg("caption")
        .arg(&photo)
        .args(["--size", "128", "--captioner"])
        .arg(&blip)
        .output()
        .unwrap();
    succeeded(&out);
    let caption = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        !caption.is_empty() && !caption.starts_with("a picture of"),
        "{caption:?}"
    );

    let out = p2pz()
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .arg("invert")
        .arg(&photo)
        .arg("--model")
        .arg(common::fixture_dir())
        .arg("--captioner")
        .arg(&blip)
        .args(["--steps", "3", "--size", "128", "--session"])
        .arg(dir.path().join("s.safetensors"))
        .output()
        .unwrap();
    let err = succeeded(&out);
    assert!(err.contains(&format!("caption: \"{caption}\"")), "{err}");

    let out = p2pz()
        .arg("caption")
        .arg(&photo)
        .args(["--captioner", "/no/such/blip"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--caption") && err.contains("/no/such/blip"),
        "{err}"
    );
}
