//! The desktop editor, driven through egui_kittest on the tiny fixture model: open, edit,
//! re-edit from the cache, pick overlay tokens, export, cancel, missing weights, and the WGSL
//! overlay against its CPU twin on a real wgpu renderer (lavapipe on CI).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use pix2pix_zero::app::panels::attention::token_label;
use pix2pix_zero::app::state::{ModelStatus, Notice, ResultState};
use pix2pix_zero::app::{AppOptions, P2pzApp};
use pix2pix_zero::engine::source::ResolveOptions;
use pix2pix_zero::worker::WorkerConfig;

const STEPS: usize = 4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn options(dir: &Path, model: &str) -> AppOptions {
    let worker = WorkerConfig {
        captioner: fixtures().join("tiny-blip").display().to_string(),
        embedding_cache: dir.join("embeddings"),
        sentences: 16,
        resolve: ResolveOptions {
            cache_dir: dir.join("hub"),
            offline: true,
            prefer_fp16_download: false,
        },
        cpu: true,
        preview_every: 2,
    };
    let mut options = AppOptions::new(worker);
    options.model = Some(model.to_string());
    options.steps = Some(STEPS);
    options.persist = false;
    options
}

fn harness(dir: &Path, model: &str, wgpu: bool) -> Harness<'static, P2pzApp> {
    let options = options(dir, model);
    let mut builder = Harness::builder().with_size(egui::vec2(1360.0, 820.0));
    if wgpu {
        builder = builder.wgpu();
    }
    builder.build_eframe(move |cc| P2pzApp::new(cc, options))
}

/// Steps the UI until `done` holds, as a person would wait.
fn wait(h: &mut Harness<'static, P2pzApp>, what: &str, done: impl Fn(&P2pzApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !done(h.state()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
}

fn idle_with_result(app: &P2pzApp) -> bool {
    app.state.result.is_some() && !app.state.busy()
}

/// Clicks the widget labelled `label`, scrolling it into view first, as a person would.
fn click(h: &mut Harness<'static, P2pzApp>, label: &str) {
    h.get_by_label(label).scroll_to_me();
    h.step();
    h.get_by_label(label).click();
    h.step();
    h.step();
}

/// A copy of the sample photo in `dir`, so exports beside it stay in the temp folder.
fn photo_in(dir: &Path) -> PathBuf {
    let photo = dir.join("chelsea.png");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/chelsea.png"),
        &photo,
    )
    .unwrap();
    photo
}

/// A file dropped on the window, as the windowing layer hands it over.
#[derive(Debug)]
struct Dropped(PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

/// Opens the photo by dropping it on the window, then sets caption and words in their fields.
fn open_and_describe(h: &mut Harness<'static, P2pzApp>, photo: &Path) {
    wait(h, "the model", |app| {
        matches!(app.state.model, ModelStatus::Ready(_))
    });
    h.input_mut()
        .dropped_files
        .push(std::sync::Arc::new(Dropped(photo.to_path_buf())));
    wait(h, "the photo", |app| {
        app.state.photo.is_some() && !app.state.busy()
    });
    h.get_by_label("Caption (conditions the inversion)")
        .set_text_value_accesskit("a cat sitting on a sofa");
    h.get_by_label("Source word")
        .set_text_value_accesskit("cat");
    h.get_by_label("Target word")
        .set_text_value_accesskit("dog");
    h.step();
    h.step();
    let state = &h.state().state;
    assert_eq!(state.caption, "a cat sitting on a sofa");
    assert_eq!(
        (state.persisted.from.as_str(), state.persisted.to.as_str()),
        ("cat", "dog")
    );
}

/// The newest message in the status bar.
fn last_notice(h: &Harness<'static, P2pzApp>) -> Notice {
    h.state().state.notices.last().expect("a message").clone()
}

/// The message and downloadability of a missing model.
fn missing(h: &Harness<'static, P2pzApp>) -> (String, bool) {
    match &h.state().state.model {
        ModelStatus::Missing {
            message,
            downloadable,
            ..
        } => (message.clone(), *downloadable),
        other => panic!("the model is not missing: {other:?}"),
    }
}

fn result(h: &Harness<'static, P2pzApp>) -> ResultState {
    h.state().state.result.clone().expect("a result")
}

/// The `p2pz` iTXt chunk of a PNG file, parsed.
fn png_record(path: &Path) -> serde_json::Value {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let chunk = reader
        .info()
        .utf8_text
        .iter()
        .find(|c| c.keyword == "p2pz")
        .expect("a p2pz text chunk");
    serde_json::from_str(&chunk.get_text().unwrap()).unwrap()
}

#[test]
fn open_edit_scrub_pick_a_token_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let photo = photo_in(dir.path());
    let source_bytes = std::fs::read(&photo).unwrap();
    let model = fixtures().join("tiny-sd").display().to_string();
    let mut h = harness(dir.path(), &model, false);
    open_and_describe(&mut h, &photo);

    // First edit: inversion, reference pass and edited pass, with live maps.
    click(&mut h, "Run edit");
    wait(&mut h, "the first edit", idle_with_result);
    let first = result(&h);
    assert!(first.inverted && !first.reused_reference);
    assert_eq!(first.losses.len(), STEPS);
    let state = &h.state().state;
    assert_eq!(state.attention.len(), STEPS, "one map set per step");
    assert!(state
        .attention
        .iter()
        .all(|s| s.grids.iter().all(|g| g.edited.is_some())));
    assert!(state.tokens_current(), "the caption's tokens arrived");
    // Token i is key position i of the maps: BOS first, EOS last, one column each.
    let tokens = &state.tokens.1;
    assert_eq!(tokens.first().unwrap(), "<|startoftext|>");
    assert_eq!(tokens.last().unwrap(), "<|endoftext|>");
    assert_eq!(tokens[2], "cat</w>");
    assert!(state.attention[0]
        .grids
        .iter()
        .all(|g| g.tokens == tokens.len()));

    // Scrub λ_xa: the edit re-runs from the session cache, skipping inversion.
    // The slider and its number field share the label; the slider comes first.
    let rect = h
        .query_all_by_label("Guidance λ_xa")
        .next()
        .expect("the λ_xa slider")
        .rect();
    let start = rect.left_center() + egui::vec2(rect.width() * 0.2, 0.0);
    h.hover_at(start);
    h.drag_at(start);
    h.step();
    h.drop_at(start + egui::vec2(rect.width() * 0.3, 0.0));
    h.step();
    let lambda = h.state().state.persisted.sliders.lambda_xa;
    assert!(lambda > 0.1, "the drag moved λ_xa to {lambda}");
    wait(&mut h, "the re-edit", |app| {
        idle_with_result(app)
            && app.state.result.as_ref().unwrap().record["edit"]["guidance"]["lambda_xa"].as_f64()
                == Some(app.state.persisted.sliders.lambda_xa)
    });
    let second = result(&h);
    assert!(!second.inverted && second.reused_reference);
    assert_ne!(
        first.image.as_raw(),
        second.image.as_raw(),
        "λ_xa changes the edit"
    );
    let notice = last_notice(&h).text;
    assert!(notice.contains("session cache"), "{notice}");

    // Pick another caption token: the overlay's heat map changes.
    let app = h.state_mut();
    let before = app.view.heat_map(&app.state).expect("a heat map");
    let before_overlay = app.view.overlay_image(&app.state).unwrap();
    let second = format!("2: {}", token_label(&h.state().state.tokens.1[2]));
    assert_eq!(second, "2: cat");
    click(&mut h, "Token");
    let option = h
        .query_all_by_label(&second)
        .last()
        .expect("the token in the list");
    option.click();
    h.step();
    h.step();
    let app = h.state_mut();
    assert_eq!(app.state.persisted.overlay.token, 2);
    let after = app.view.heat_map(&app.state).expect("a heat map");
    assert_ne!(before.values, after.values);
    assert_ne!(
        before_overlay.as_raw(),
        app.view.overlay_image(&app.state).unwrap().as_raw()
    );

    // Export with the overlay and the maps, at the photo's own size, parameters inside.
    let out = dir.path().join("chelsea-dog.png");
    h.get_by_label("Export path")
        .set_text_value_accesskit(&out.display().to_string());
    click(&mut h, "Also export the overlay");
    click(&mut h, "Also export attention maps (one per token)");
    h.step();
    click(&mut h, "Export");
    wait(&mut h, "the export", |app| {
        !app.state.export.written.is_empty() && !app.state.busy()
    });
    let decoded = image::open(&out).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (451, 300));
    let record = png_record(&out);
    assert_eq!(record["to"], "dog");
    assert_eq!(
        record["edit"]["guidance"]["lambda_xa"].as_f64(),
        Some(lambda)
    );
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    assert_eq!(sidecar, record);
    let overlay = image::open(dir.path().join("chelsea-dog-overlay.png")).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (451, 300));
    let maps = std::fs::read_dir(dir.path().join("chelsea-dog-attention"))
        .unwrap()
        .count();
    assert_eq!(maps, h.state().state.tokens.1.len());

    // Exporting again asks before replacing the file.
    let written = std::fs::metadata(&out).unwrap().modified().unwrap();
    click(&mut h, "Export");
    h.step();
    assert!(h.state().state.export.confirm_overwrite);
    assert_eq!(
        std::fs::metadata(&out).unwrap().modified().unwrap(),
        written
    );
    click(&mut h, "Overwrite");
    wait(&mut h, "the overwrite", |app| {
        !app.state.export.confirm_overwrite && !app.state.busy()
    });

    // The source photo is never a valid export target.
    h.get_by_label("Export path")
        .set_text_value_accesskit(&photo.display().to_string());
    h.step();
    click(&mut h, "Export");
    h.step();
    let notice = last_notice(&h);
    assert!(
        notice.error && notice.text.contains("never overwritten"),
        "{notice:?}"
    );
    assert_eq!(std::fs::read(&photo).unwrap(), source_bytes);
}

#[test]
fn escape_cancels_within_a_step_and_keeps_the_app_usable() {
    let dir = tempfile::tempdir().unwrap();
    let photo = photo_in(dir.path());
    let model = fixtures().join("tiny-sd").display().to_string();
    let mut h = harness(dir.path(), &model, false);
    h.state_mut().state.persisted.sliders.steps = 40;
    open_and_describe(&mut h, &photo);
    click(&mut h, "Run edit");
    wait(&mut h, "the inversion to start", |app| {
        app.state
            .job
            .as_ref()
            .is_some_and(|j| j.stage == "invert" && j.step >= 1)
    });
    h.key_press(egui::Key::Escape);
    h.step();
    assert!(h.state().state.job.as_ref().unwrap().cancelling);
    wait(&mut h, "the cancel", |app| !app.state.busy());
    let state = &h.state().state;
    assert!(state.result.is_none());
    let notice = state.notices.last().unwrap();
    assert!(notice.text.starts_with("cancelled"), "{notice:?}");

    // The worker is alive: a shorter edit runs to the end.
    h.state_mut().state.persisted.sliders.steps = STEPS;
    click(&mut h, "Run edit");
    wait(&mut h, "an edit after the cancel", idle_with_result);
    assert!(result(&h).inverted);
}

#[test]
fn missing_weights_say_where_we_looked_and_offer_the_download() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path(), "someone/not-a-cached-model", false);
    wait(&mut h, "the model lookup", |app| {
        matches!(app.state.model, ModelStatus::Missing { .. }) && !app.state.busy()
    });
    let (message, downloadable) = missing(&h);
    assert!(downloadable);
    assert!(
        message.contains(&dir.path().join("hub").display().to_string()),
        "{message}"
    );
    h.get_by_label("Download someone/not-a-cached-model");
    click(&mut h, "Run edit");
    h.step();
    let notice = last_notice(&h);
    assert!(
        notice.error && notice.text.contains("no model is loaded"),
        "{notice:?}"
    );

    // A folder without weights is not downloadable, and the message names the folder.
    let empty = dir.path().join("empty-model");
    std::fs::create_dir_all(&empty).unwrap();
    h.get_by_label("Model folder or repo id")
        .set_text_value_accesskit(&empty.display().to_string());
    h.step();
    click(&mut h, "Load");
    wait(&mut h, "the folder lookup", |app| {
        matches!(&app.state.model, ModelStatus::Missing { spec, .. } if spec.contains("empty-model"))
            && !app.state.busy()
    });
    let (message, downloadable) = missing(&h);
    assert!(!downloadable);
    assert!(message.contains("empty-model"), "{message}");
}

#[test]
fn browse_without_a_file_dialog_falls_back_to_the_path_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-sd").display().to_string();
    let mut h = harness(dir.path(), &model, false);
    wait(&mut h, "the model", |app| {
        matches!(app.state.model, ModelStatus::Ready(_))
    });
    // No desktop portal or zenity runs here, so the dialog cannot appear.
    click(&mut h, "Browse…");
    wait(&mut h, "the dialog's answer", |app| {
        app.state.dialog_unavailable
    });
    let photo = photo_in(dir.path());
    h.get_by_label("Image path")
        .set_text_value_accesskit(&photo.display().to_string());
    h.step();
    click(&mut h, "Open");
    wait(&mut h, "the photo", |app| {
        app.state.photo.is_some() && !app.state.busy()
    });
    assert_eq!(h.state().state.persisted.recent, vec![photo]);
}

/// The WGSL overlay, drawn by wgpu through egui's paint callback, against the CPU blend.
#[test]
fn wgsl_overlay_matches_the_cpu_blend() {
    let dir = tempfile::tempdir().unwrap();
    let photo = photo_in(dir.path());
    let model = fixtures().join("tiny-sd").display().to_string();
    let mut h = harness(dir.path(), &model, true);
    assert!(
        h.state().view.gpu_overlay,
        "wgpu render state reached the app"
    );
    h.state_mut().view.actual_size = true;
    open_and_describe(&mut h, &photo);
    click(&mut h, "Run edit");
    wait(&mut h, "the edit", idle_with_result);

    let compare = |h: &mut Harness<'static, P2pzApp>, name: &str| {
        h.step();
        let rendered = h.render().expect("a wgpu frame");
        let app = h.state_mut();
        let expected = app.view.overlay_image(&app.state).unwrap();
        let rect = app.view.image_rect.unwrap();
        let crop = image::imageops::crop_imm(
            &rendered,
            rect.min.x as u32,
            rect.min.y as u32,
            expected.width(),
            expected.height(),
        )
        .to_image();
        assert_eq!(
            crop.dimensions(),
            expected.dimensions(),
            "{name}: the image is on screen"
        );
        let mut worst = 0u8;
        for (got, want) in crop.pixels().zip(expected.pixels()) {
            for c in 0..3 {
                worst = worst.max(got.0[c].abs_diff(want.0[c]));
            }
        }
        assert!(
            worst <= 2,
            "{name}: shader and CPU blend differ by {worst} levels"
        );
        egui_kittest::image_snapshot(&crop, name);
        worst
    };
    compare(&mut h, "overlay_reference");
    let app = h.state_mut();
    app.state.persisted.overlay.view = pix2pix_zero::app::heatmap::MapView::Difference;
    app.state.persisted.overlay.colormap = pix2pix_zero::app::heatmap::Colormap::Viridis;
    app.state.persisted.overlay.opacity = 0.9;
    compare(&mut h, "overlay_difference_viridis");
}

#[test]
fn an_imported_direction_file_drives_the_edit() {
    let dir = tempfile::tempdir().unwrap();
    let photo = photo_in(dir.path());
    let model = fixtures().join("tiny-sd").display().to_string();
    let mut h = harness(dir.path(), &model, false);
    open_and_describe(&mut h, &photo);

    // A path that does not exist is named in the message, and nothing runs.
    let missing = dir.path().join("no-such-direction.pt");
    h.get_by_label("Direction file (optional, .safetensors or the authors' .pt)")
        .set_text_value_accesskit(&missing.display().to_string());
    h.step();
    click(&mut h, "Run edit");
    let notice = last_notice(&h);
    assert!(
        notice.error && notice.text.contains("no-such-direction.pt"),
        "{notice:?}"
    );
    assert!(!h.state().state.busy());

    // The authors' .pt format, made for the tiny model's text width.
    let file = fixtures().join("reference/direction-f32.pt");
    h.get_by_label("Direction file (optional, .safetensors or the authors' .pt)")
        .set_text_value_accesskit(&file.display().to_string());
    h.step();
    click(&mut h, "Run edit");
    wait(&mut h, "the edit along the file", idle_with_result);
    let record = result(&h).record;
    assert_eq!(record["direction"].as_str(), Some(file.to_str().unwrap()));
    assert_eq!(h.state().state.persisted.recent_directions, vec![file]);
    // No sentences were embedded for the words: the file replaced them.
    assert!(!dir.path().join("embeddings").exists());
}
