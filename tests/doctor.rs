//! `p2pz doctor` on the CPU: its checks pass on the built-in tiny model and reference tensors,
//! and a corrupted or damaged reference file makes it fail with a message that says which check
//! or which file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

fn reference_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/doctor.safetensors")
}

/// Runs the doctor on the CPU without the full-size timing step.
fn doctor(extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_p2pz"))
        .args(["doctor", "--device", "cpu", "--timing-size", "0"])
        .args(extra)
        .output()
        .expect("p2pz runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// f32 and f16 everywhere, and bf16 products where the CPU has AMX (it says which).
#[test]
fn the_built_in_tiny_model_passes_on_the_cpu_in_every_precision() {
    let out = doctor(&[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("devices: cpu"), "{stdout}");
    assert!(stdout.contains("features:"), "{stdout}");
    let bf16 = stdout.contains("on the CPU in bf16 products:");
    assert!(
        bf16 || stdout.contains("bf16 products (--precision bf16): not here"),
        "{stdout}"
    );
    let precisions = if bf16 { 3 } else { 2 };
    for check in [
        "UNet forward, t=981",
        "UNet forward, t=21",
        "guidance loss",
        "guidance gradient dL/dx",
        "guidance gradient direction",
    ] {
        assert_eq!(
            stdout.matches(check).count(),
            precisions,
            "{check} in each precision:\n{stdout}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    let all = format!("result: all {} checks passed", 5 * precisions);
    assert!(stdout.contains(&all), "{stdout}");
}

/// A copy of the reference with `name` replaced by `f(name's tensor)`.
fn corrupted(dir: &Path, name: &str, f: impl Fn(&Tensor) -> Tensor) -> PathBuf {
    let mut tensors = candle_core::safetensors::load(reference_file(), &Device::Cpu).unwrap();
    let changed = f(&tensors[name]);
    tensors.insert(name.to_string(), changed);
    let path = dir.join("corrupted.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn a_corrupted_reference_tensor_fails_the_check_that_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    // The gradient's sign flipped: magnitude and direction both disagree.
    let path = corrupted(dir.path(), "grad.dx", |t| t.neg().unwrap());
    let out = doctor(&["--reference", path.to_str().unwrap()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{stdout}");
    let precisions = if stdout.contains("in bf16 products:") {
        3
    } else {
        2
    };
    let failed: Vec<&str> = stdout.lines().filter(|l| l.contains("FAIL")).collect();
    assert_eq!(
        failed.len(),
        2 * precisions,
        "two gradient checks in each precision:\n{stdout}"
    );
    assert!(
        failed.iter().all(|l| l.contains("guidance gradient")),
        "{stdout}"
    );
    assert!(stdout.contains("UNet forward, t=981") && stdout.contains("pass"));
    assert!(
        stderr.contains(&format!(
            "{} of {} checks failed",
            2 * precisions,
            5 * precisions
        )) && stderr.contains("guidance gradient"),
        "{stderr}"
    );
}

#[test]
fn a_damaged_or_wrong_reference_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    let bytes = std::fs::read(reference_file()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = doctor(&["--reference", truncated.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("truncated.safetensors") && stderr.contains("damaged"),
        "{stderr}"
    );

    let reshaped = corrupted(dir.path(), "unet.sample", |t| t.flatten_all().unwrap());
    let out = doctor(&["--reference", reshaped.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("`unet.sample` has shape [1024]"),
        "{stderr}"
    );
}
