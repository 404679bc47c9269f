//! The `p2pz` binary end to end on the tiny fixture model.

mod common;

use std::process::Command;

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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
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
