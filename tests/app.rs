//! The desktop editor, driven through egui_kittest on the tiny fixture model: open, edit,
//! re-edit from the cache, pick overlay tokens, export, cancel, missing weights, and the WGSL
//! overlay against its CPU twin on a real wgpu renderer (lavapipe on CI).
#![cfg(feature = "gui")]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use pix2pix_zero::app::panels::attention::token_label;
use pix2pix_zero::app::panels::sliders::cache_hint;
use pix2pix_zero::app::state::{CompareMode, ModelStatus, Notice, ResultState};
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
        generators: dir.join("generators"),
        sentences: 16,
        resolve: ResolveOptions {
            cache_dir: dir.join("hub"),
            offline: true,
            prefer_fp16_download: false,
        },
        cpu: true,
        bf16_products: false,
        preview_every: 2,
    };
    let mut options = AppOptions::new(worker);
    options.model = Some(model.to_string());
    options.steps = Some(STEPS);
    options.persist = false;
    options
}

fn harness(dir: &Path, model: &str, wgpu: bool) -> Harness<'static, P2pzApp> {
    harness_sized(dir, model, wgpu, egui::vec2(1360.0, 820.0))
}

fn harness_sized(
    dir: &Path,
    model: &str,
    wgpu: bool,
    window: egui::Vec2,
) -> Harness<'static, P2pzApp> {
    let options = options(dir, model);
    let mut builder = Harness::builder().with_size(window);
    if wgpu {
        builder = builder.wgpu();
    }
    builder.build_eframe(move |cc| P2pzApp::new(cc, options))
}

/// Steps the UI until `done` holds, as a person would wait.
fn wait(h: &mut Harness<'static, P2pzApp>, what: &str, done: impl Fn(&P2pzApp) -> bool) {
    let deadline = Instant::now()
        + Duration::from_secs(
            std::env::var("P2PZ_TEST_WAIT_S")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(600),
        );
    while !done(h.state()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; messages: {:?}",
            h.state().state.notices
        );
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
}

fn idle_with_result(app: &P2pzApp) -> bool {
    app.state.result.is_some() && !app.state.busy()
}

/// Clicks the widget labelled `label`, scrolling it into view first, as a person would (the
/// scroll is animated over a few frames).
fn click(h: &mut Harness<'static, P2pzApp>, label: &str) {
    h.get_by_label(label).scroll_to_me();
    for _ in 0..10 {
        h.step();
    }
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

/// Drops `photo` on the window once the model is ready, and waits for the worker.
fn drop_photo(h: &mut Harness<'static, P2pzApp>, photo: &Path) {
    wait(h, "the model", |app| {
        matches!(app.state.model, ModelStatus::Ready(_))
    });
    h.input_mut()
        .dropped_files
        .push(std::sync::Arc::new(Dropped(photo.to_path_buf())));
    h.step();
    wait(h, "the photo", |app| !app.state.busy());
}

/// Opens the photo by dropping it on the window, then sets caption and words in their fields.
fn open_and_describe(h: &mut Harness<'static, P2pzApp>, photo: &Path) {
    drop_photo(h, photo);
    assert!(h.state().state.photo.is_some(), "the photo opened");
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

/// The error messages showing.
fn errors(h: &Harness<'static, P2pzApp>) -> Vec<String> {
    let notices = &h.state().state.notices;
    notices
        .iter()
        .filter(|n| n.error)
        .map(|n| n.text.clone())
        .collect()
}

/// Width over height of where the canvas drew the image in the last frame.
fn drawn_aspect(h: &Harness<'static, P2pzApp>) -> f32 {
    let rect = h.state().view.image_rect.expect("the image is drawn");
    rect.width() / rect.height()
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

    // The resolution filter names each latent grid as columns × rows: 128×64 is 16×8.
    click(&mut h, "Resolution");
    assert!(
        h.query_by_label("16×8 layers").is_some(),
        "the largest grid"
    );
    assert!(h.query_by_label("8×8 layers").is_none());
    h.key_press(egui::Key::Escape);
    h.step();

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

    // The overlay starts on the source word; pick another caption token: the heat map changes.
    let app = h.state_mut();
    assert_eq!(app.state.overlay_token(), Some(2), "the source word, cat");
    let before = app.view.heat_map(&app.state).expect("a heat map");
    let before_overlay = app.view.overlay_image(&app.state).unwrap();
    let sofa = format!("6: {}", token_label(&h.state().state.tokens.1[6]));
    assert_eq!(sofa, "6: sofa");
    click(&mut h, "Token");
    let option = h
        .query_all_by_label(&sofa)
        .last()
        .expect("the token in the list");
    option.click();
    h.step();
    h.step();
    let app = h.state_mut();
    assert_eq!(app.state.persisted.overlay.token_word, "sofa");
    assert_eq!(app.state.overlay_token(), Some(6));
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
    let maps: Vec<PathBuf> = std::fs::read_dir(dir.path().join("chelsea-dog-attention"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(maps.len(), h.state().state.tokens.1.len());
    for map in &maps {
        let map = image::open(map).unwrap();
        assert_eq!(
            (map.width(), map.height()),
            (451, 300),
            "maps at the photo's size"
        );
    }

    // Exporting again asks before replacing the file.
    let written = std::fs::metadata(&out).unwrap().modified().unwrap();
    click(&mut h, "Export");
    h.step();
    assert!(!h.state().state.export.confirm_overwrite.is_empty());
    assert_eq!(
        std::fs::metadata(&out).unwrap().modified().unwrap(),
        written
    );
    click(&mut h, "Overwrite");
    wait(&mut h, "the overwrite", |app| {
        app.state.export.confirm_overwrite.is_empty() && !app.state.busy()
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

    // A new export replaces that error with its own question.
    h.get_by_label("Export path")
        .set_text_value_accesskit(&out.display().to_string());
    h.step();
    click(&mut h, "Export");
    assert!(!h.state().state.export.confirm_overwrite.is_empty());
    assert_eq!(errors(&h), Vec::<String>::new());
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
    // The panel gives the fix once, in the app's words: no command-line flags.
    assert!(
        !message.contains("--model") && !message.contains("HF_HUB_OFFLINE"),
        "{message}"
    );
    let advice = h
        .get_all_by_label_contains("diffusers-format folder")
        .count();
    assert_eq!(advice, 1, "the advice is given once");
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
    assert!(!message.contains("--model"), "{message}");
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
    // A 2:1 photo is edited at 128×64 on the tiny model: drawn at actual pixels, its shape and
    // the working image's are the same, so shader and CPU blend can be compared pixel by pixel.
    let photo = dir.path().join("wide.png");
    let sample = image::open(photo_in(dir.path())).unwrap();
    sample
        .resize_exact(256, 128, image::imageops::FilterType::Triangle)
        .save(&photo)
        .unwrap();
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

#[test]
fn a_new_working_size_keeps_the_users_work_and_every_view_keeps_the_photos_shape() {
    let dir = tempfile::tempdir().unwrap();
    let photo = photo_in(dir.path());
    let model = fixtures().join("tiny-sd").display().to_string();
    let mut h = harness(dir.path(), &model, false);
    open_and_describe(&mut h, &photo);
    let photo_aspect = 451.0 / 300.0;
    click(&mut h, "Run edit");
    wait(&mut h, "the first edit", idle_with_result);
    assert_eq!(
        result(&h).image.dimensions(),
        (128, 64),
        "the tiny model's own size"
    );

    // Edited, Original and Split are all drawn at the photo's shape, not the working 2:1.
    let labels = |h: &Harness<'static, P2pzApp>| {
        let count = |label: &str| h.query_all_by_label(label).count();
        (count("Original"), count("Edited"))
    };
    let (original, edited) = labels(&h);
    for (mode, name) in [
        (CompareMode::Edited, "edited"),
        (CompareMode::Original, "original"),
        (CompareMode::Split(0.5), "split"),
    ] {
        h.state_mut().state.compare = mode;
        h.step();
        let aspect = drawn_aspect(&h);
        assert!(
            (aspect - photo_aspect).abs() < 0.02,
            "{name}: drawn at {aspect}"
        );
    }
    // The split view says which side is which, over the image.
    assert_eq!(labels(&h), (original + 1, edited + 1));
    h.state_mut().state.compare = CompareMode::Edited;
    h.step();

    // Choose another working size after the edit: nothing the user did is lost, and the panel
    // says that the next run inverts again.
    let export_path = h.state().state.export.path.clone();
    click(&mut h, "Working size");
    click(&mut h, "256 px");
    let state = &h.state().state;
    assert_eq!(state.persisted.size, Some(256));
    let hint = cache_hint(state);
    assert!(
        hint.contains("working size") && hint.contains("inverts"),
        "{hint}"
    );
    click(&mut h, "Run edit");
    wait(&mut h, "the photo at the new size", |app| {
        app.state.photo.as_ref().unwrap().working.dimensions() == (256, 192)
    });
    let state = &h.state().state;
    assert_eq!(
        state.caption, "a cat sitting on a sofa",
        "the caption stays"
    );
    assert_eq!(
        (state.persisted.from.as_str(), state.persisted.to.as_str()),
        ("cat", "dog")
    );
    assert_eq!(state.export.path, export_path);
    assert!(
        state.result.is_some(),
        "the last result stays until a new one replaces it"
    );
    wait(&mut h, "the edit at 256 px", |app| {
        idle_with_result(app) && app.state.result.as_ref().unwrap().record["working_side"] == 256
    });
    let second = result(&h);
    assert!(second.inverted, "a new size inverts again");
    assert_eq!(second.image.dimensions(), (256, 192));
    assert_eq!(h.state().state.caption, "a cat sitting on a sofa");
    assert!((drawn_aspect(&h) - photo_aspect).abs() < 0.02);

    // Scrubbing λ_xa afterwards re-edits from the new session.
    h.state_mut().state.persisted.sliders.lambda_xa = 0.2;
    click(&mut h, "Run edit");
    wait(&mut h, "the re-edit", |app| {
        idle_with_result(app)
            && app.state.result.as_ref().unwrap().record["edit"]["guidance"]["lambda_xa"] == 0.2
    });
    let third = result(&h);
    assert!(!third.inverted && third.reused_reference);
    assert_eq!(errors(&h), Vec::<String>::new());

    // A name without an extension gets the format's.
    let typed = dir.path().join("out2.");
    h.get_by_label("Export path")
        .set_text_value_accesskit(&typed.display().to_string());
    h.step();
    click(&mut h, "Export");
    wait(&mut h, "the export", |app| {
        !app.state.export.written.is_empty() && !app.state.busy()
    });
    let out = dir.path().join("out2.png");
    assert_eq!(h.state().state.export.written[0], out);
    let decoded = image::open(&out).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (451, 300));

    // Replacing only the sidecar asks too, and names it; nothing is written until confirmed.
    std::fs::remove_file(&out).unwrap();
    let sidecar = dir.path().join("out2.json");
    std::fs::write(&sidecar, "the user's notes").unwrap();
    click(&mut h, "Export");
    h.step();
    assert_eq!(
        h.state().state.export.confirm_overwrite,
        vec![sidecar.clone()]
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_to_string(&sidecar).unwrap(),
        "the user's notes"
    );
    click(&mut h, "Keep existing");
    assert!(h.state().state.export.confirm_overwrite.is_empty());
    assert_eq!(
        std::fs::read_to_string(&sidecar).unwrap(),
        "the user's notes"
    );
}

#[test]
fn an_error_goes_when_its_action_succeeds_or_another_starts() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-sd").display().to_string();
    let mut h = harness(dir.path(), &model, false);
    let fake = dir.path().join("fake.png");
    std::fs::write(&fake, "not an image").unwrap();
    drop_photo(&mut h, &fake);
    let shown = errors(&h);
    assert!(
        shown.len() == 1 && shown[0].contains("not a readable image"),
        "{shown:?}"
    );
    // A good photo opens: the bad one's error goes.
    let photo = photo_in(dir.path());
    drop_photo(&mut h, &photo);
    assert!(h.state().state.photo.is_some());
    assert_eq!(errors(&h), Vec::<String>::new());

    // Run with no caption: an error; captioning again replaces it.
    h.state_mut().state.caption.clear();
    click(&mut h, "Run edit");
    assert!(errors(&h)[0].contains("caption is empty"));
    click(&mut h, "Caption with BLIP");
    wait(&mut h, "the caption", |app| {
        !app.state.busy() && !app.state.caption.is_empty()
    });
    assert_eq!(errors(&h), Vec::<String>::new());

    // A source word that is not in the caption gets a hint; the guidance keys on its tokens.
    h.get_by_label("Caption (conditions the inversion)")
        .set_text_value_accesskit("a kitten on a sofa");
    h.get_by_label("Source word")
        .set_text_value_accesskit("cat");
    h.step();
    h.step();
    assert!(h.query_by_label_contains("is not in the caption").is_some());
    h.get_by_label("Caption (conditions the inversion)")
        .set_text_value_accesskit("a cat on a sofa");
    h.step();
    h.step();
    assert!(h.query_by_label_contains("is not in the caption").is_none());
}

#[test]
fn at_1280_by_720_the_scrubbed_controls_run_and_progress_are_in_view() {
    let dir = tempfile::tempdir().unwrap();
    let photo = photo_in(dir.path());
    // A model in a long folder: its path must not widen the panel (it did, while loading).
    let long = dir
        .path()
        .join("a-folder-with-a-rather-long-name-for-its-model");
    std::fs::create_dir_all(&long).unwrap();
    let model = long.join("tiny-sd");
    std::os::unix::fs::symlink(fixtures().join("tiny-sd"), &model).unwrap();
    let model = model.display().to_string();
    let window = egui::vec2(1280.0, 720.0);
    let mut h = harness_sized(dir.path(), &model, false, window);
    drop_photo(&mut h, &photo);
    let screen = egui::Rect::from_min_size(egui::Pos2::ZERO, window);
    let in_view = |h: &Harness<'static, P2pzApp>, label: &str| {
        let rect = h
            .query_all_by_label(label)
            .next()
            .unwrap_or_else(|| panic!("{label}"))
            .rect();
        assert!(
            screen.contains_rect(rect),
            "{label} at {rect:?} is outside the 1280×720 window"
        );
    };
    for label in [
        "Guidance λ_xa",
        "Edit strength",
        "CFG scale",
        "Steps",
        "Run edit",
        "Ready",
    ] {
        in_view(&h, label);
    }
    // The canvas keeps most of the width.
    let rect = h.state().view.image_rect.unwrap();
    assert!(
        rect.width() > 0.5 * window.x,
        "the image is {} px wide",
        rect.width()
    );

    // Hiding the inspector gives its room to the canvas.
    h.state_mut().state.persisted.panels.inspector = false;
    for _ in 0..30 {
        h.step(); // the panel slides shut
    }
    let wider = h.state().view.image_rect.unwrap();
    assert!(
        wider.width() > rect.width() + 100.0,
        "{} → {}",
        rect.width(),
        wider.width()
    );
}

/// A cat → dog generator file whose output differs from its input (its last layer is not zero).
fn cat_to_dog_generator(path: &Path) {
    use pix2pix_zero::distill::file::{encode, GeneratorHeader, HeldOutScores};
    use pix2pix_zero::distill::generator::{Generator, GeneratorConfig, ARCHITECTURE};
    use pix2pix_zero::distill::params::{sorted, SeededParams};
    let device = candle_core::Device::Cpu;
    let vars = candle_nn::VarMap::new();
    let config = GeneratorConfig {
        width: 4,
        blocks: 1,
    };
    Generator::new(SeededParams::builder(&vars, 1, &device), config).unwrap();
    let weights: Vec<(String, candle_core::Tensor)> = sorted(&vars)
        .into_iter()
        .map(|(name, var)| {
            let t = var.as_tensor().clone();
            let t = if name.starts_with("head.") {
                (t + 0.05).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    let header = GeneratorHeader {
        architecture: ARCHITECTURE.into(),
        config,
        train_size: 64,
        from: Some("cat".into()),
        to: Some("dog".into()),
        direction: None,
        model: None,
        pairs: 12,
        iterations: 1,
        scores: Some(HeldOutScores {
            pairs: 3,
            psnr: 21.0,
            identity_psnr: 9.0,
        }),
    };
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, encode(&weights, &header).unwrap()).unwrap();
}

/// Whether the app shows a finished instant result.
fn showing_instant(app: &P2pzApp) -> bool {
    app.state
        .result
        .as_ref()
        .is_some_and(|r| r.instant.is_some())
        && !app.state.busy()
}

#[test]
fn a_generator_for_the_words_shows_an_instant_result_that_the_toggle_and_refine_control() {
    let dir = tempfile::tempdir().unwrap();
    let imported = dir.path().join("downloads/cat2dog.generator.safetensors");
    cat_to_dog_generator(&imported);
    let mut h = harness(
        dir.path(),
        &fixtures().join("tiny-sd").display().to_string(),
        false,
    );
    let photo = photo_in(dir.path());
    open_and_describe(&mut h, &photo);
    assert!(
        h.state().state.result.is_none(),
        "no generator yet, so no result"
    );
    h.get_by_label("Generator file")
        .set_text_value_accesskit(&imported.display().to_string());
    h.step();
    click(&mut h, "Import");
    wait(&mut h, "the instant result", showing_instant);
    let state = &h.state().state;
    assert_eq!(
        state.generators.len(),
        1,
        "the import landed in the generator folder"
    );
    assert!(state.generators[0]
        .path
        .starts_with(dir.path().join("generators")));
    let shown = result(&h);
    let working = h.state().state.photo.as_ref().unwrap().working.clone();
    assert_eq!(shown.image.dimensions(), working.dimensions());
    assert_ne!(*shown.image, *working, "the generator changed the photo");
    assert!(
        last_notice(&h)
            .text
            .contains("instant result of the cat to dog generator"),
        "{:?}",
        last_notice(&h)
    );

    // Off: the instant result goes, and new words bring none.
    click(&mut h, "Instant results");
    assert!(!h.state().state.persisted.instant);
    assert!(h.state().state.result.is_none());
    h.get_by_label("Target word")
        .set_text_value_accesskit("cow");
    h.step();
    h.get_by_label("Target word")
        .set_text_value_accesskit("dog");
    for _ in 0..20 {
        h.step();
    }
    assert!(
        h.state().state.result.is_none(),
        "no instant result while the toggle is off"
    );

    // On again: it comes back at once, and export writes it at the photo's size.
    click(&mut h, "Instant results");
    wait(&mut h, "the instant result again", showing_instant);
    let out = dir.path().join("instant.png");
    h.get_by_label("Export path")
        .set_text_value_accesskit(&out.display().to_string());
    h.step();
    click(&mut h, "Export");
    wait(&mut h, "the export", |app| {
        !app.state.busy() && !app.state.export.written.is_empty()
    });
    let exported = image::open(&out).unwrap().to_rgb8();
    let original = image::open(&photo).unwrap().to_rgb8();
    assert_eq!(exported.dimensions(), original.dimensions());
    assert_eq!(png_record(&out)["command"], "gui apply");

    // Refine runs the diffusion edit, whose result then stays.
    click(&mut h, "Refine with diffusion");
    wait(&mut h, "the diffusion edit", |app| {
        app.state
            .result
            .as_ref()
            .is_some_and(|r| r.instant.is_none())
            && !app.state.busy()
    });
    for _ in 0..20 {
        h.step();
    }
    assert!(
        result(&h).instant.is_none(),
        "an instant result does not replace the diffusion one"
    );
}

#[test]
fn distill_this_edit_makes_pairs_trains_and_then_offers_the_instant_result() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(
        dir.path(),
        &fixtures().join("tiny-sd").display().to_string(),
        false,
    );
    let photo = photo_in(dir.path());
    open_and_describe(&mut h, &photo);
    h.state_mut().state.persisted.distill = pix2pix_zero::app::state::DistillForm {
        pairs: 4,
        size: 64,
        steps: 3,
        iterations: 4,
    };
    click(&mut h, "Distill this edit…");
    click(&mut h, "Start distilling");
    wait(&mut h, "the first pair", |app| {
        app.state
            .job
            .as_ref()
            .is_some_and(|j| j.stage == "pairs" && j.step >= 1)
    });
    // Esc stops it; the pairs made so far stay for the next run.
    h.key_press(egui::Key::Escape);
    wait(&mut h, "the cancel", |app| !app.state.busy());
    assert!(
        last_notice(&h).text.contains("cancelled"),
        "{:?}",
        last_notice(&h)
    );
    assert!(h.state().state.generators.is_empty());
    let work = dir.path().join("generators/work");
    let made = |dir: &Path| walk_count(dir, "png");
    let before = made(&work);
    assert!(
        before >= 2,
        "at least one pair (two images) was kept, found {before}"
    );
    click(&mut h, "Distill this edit…");
    click(&mut h, "Start distilling");
    wait(
        &mut h,
        "the instant result of the new generator",
        showing_instant,
    );
    let state = &h.state().state;
    assert_eq!(state.generators.len(), 1);
    assert!(state.generators[0].makes("cat", "dog"));
    assert_eq!(made(&work), 8, "four pairs, two images each");
    assert!(errors(&h).is_empty(), "{:?}", errors(&h));
}

/// Files ending in `.ext` under `dir`, at any depth.
fn walk_count(dir: &Path, ext: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .map(|p| {
            if p.is_dir() {
                walk_count(&p, ext)
            } else {
                usize::from(p.extension().is_some_and(|e| e == ext))
            }
        })
        .sum()
}
