//! What the worker thread does with each command: the state it owns (model, captioner, photo,
//! session, directions, last result) and one handler per command.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use crossbeam_channel::{Receiver, Sender};

use super::attention::reduce_step;
use super::{
    Command, EditRequest, EditResult, Event, ExportFormat, ExportRequest, ModelInfo, OpenedImage,
    WorkerConfig,
};
use crate::edit::caption::Captioner;
use crate::edit::direction::{self, EmbeddingCache};
use crate::edit::image::{self as photo, WorkingImage};
use crate::edit::inversion::InversionParams;
use crate::edit::noise_reg::NoiseRegularization;
use crate::edit::sentences;
use crate::edit::session::{Session, SessionHeader, SessionSource, SESSION_FORMAT};
use crate::edit::{self, EditObserver, EditStep, EditorProgress, PhotoSettings};
use crate::engine::ddim::InverseSchedule;
use crate::engine::generate::latent_to_rgb;
use crate::engine::source::{self, DownloadProgress};
use crate::engine::vae::LatentDraw;
use crate::engine::{self, Error as EngineError, StableDiffusion};
use crate::export::{encode_png, same_file, write_atomically};

/// Sends events and wakes the app after each.
pub(super) struct Outbox {
    events: Sender<Event>,
    wake: Box<dyn Fn() + Send>,
}

impl Outbox {
    pub(super) fn new(events: Sender<Event>, wake: Box<dyn Fn() + Send>) -> Self {
        Self { events, wake }
    }

    fn send(&self, event: Event) {
        let _ = self.events.send(event);
        (self.wake)();
    }
}

/// The worker's loop: one command at a time until `Shutdown` or the app goes away.
pub(super) fn run(
    config: WorkerConfig,
    commands: Receiver<Command>,
    outbox: Outbox,
    cancel: Arc<Mutex<Arc<AtomicBool>>>,
) {
    let mut state = State::new(config);
    while let Ok(mut command) = commands.recv() {
        // Of several queued edits (a slider being scrubbed) only the newest matters.
        while matches!(command, Command::Edit(_)) {
            match commands.try_recv() {
                Ok(Command::Edit(newer)) => command = Command::Edit(newer),
                Ok(other) => {
                    state.handle_safely(command, &outbox, &cancel);
                    command = other;
                }
                Err(_) => break,
            }
        }
        if matches!(command, Command::Shutdown) {
            break;
        }
        state.handle_safely(command, &outbox, &cancel);
    }
}

/// A photo at working size and where it came from.
struct Photo {
    path: PathBuf,
    size: usize,
    image: WorkingImage,
}

/// What the last edit left for export.
struct LastEdit {
    image: image::RgbImage,
    original_size: (u32, u32),
    source: PathBuf,
    record: serde_json::Value,
}

/// Everything the worker owns.
struct State {
    config: WorkerConfig,
    model: Option<StableDiffusion>,
    captioner: Option<Captioner>,
    photo: Option<Photo>,
    session: Option<Session>,
    directions: HashMap<(String, String, u64, usize), Tensor>,
    last: Option<LastEdit>,
}

/// Forwards download progress as events.
struct DownloadEvents<'a>(&'a Outbox);

impl DownloadProgress for DownloadEvents<'_> {
    fn progress(&mut self, file: &str, done: u64, total: u64) {
        self.0.send(Event::Download {
            file: file.to_string(),
            done,
            total,
        });
    }
}

impl State {
    fn new(config: WorkerConfig) -> Self {
        Self {
            config,
            model: None,
            captioner: None,
            photo: None,
            session: None,
            directions: HashMap::new(),
            last: None,
        }
    }

    /// Runs one command with a fresh cancel flag; errors and panics become events.
    fn handle_safely(
        &mut self,
        command: Command,
        outbox: &Outbox,
        slot: &Arc<Mutex<Arc<AtomicBool>>>,
    ) {
        self.guarded(outbox, slot, |state, cancel| {
            state.handle(command, outbox, cancel)
        });
    }

    /// Runs `job` with a fresh cancel flag in `slot`; its error or panic becomes an event, and
    /// `Idle` follows in every case.
    fn guarded(
        &mut self,
        outbox: &Outbox,
        slot: &Arc<Mutex<Arc<AtomicBool>>>,
        job: impl FnOnce(&mut Self, &AtomicBool) -> Result<()>,
    ) {
        let cancel = Arc::new(AtomicBool::new(false));
        if let Ok(mut current) = slot.lock() {
            *current = cancel.clone();
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| job(self, &cancel)));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(error)) => match error.downcast_ref::<EngineError>() {
                Some(EngineError::Cancelled) => outbox.send(Event::Cancelled),
                _ => outbox.send(Event::Error {
                    message: format!("{error:#}"),
                }),
            },
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                // The session may be half-updated: drop it so the next edit starts clean.
                self.session = None;
                outbox.send(Event::Error {
                    message: format!(
                        "internal error: {what}. The editor recovered; please try again, and report \
                         this if it repeats"
                    ),
                });
            }
        }
        outbox.send(Event::Idle);
    }

    fn handle(&mut self, command: Command, outbox: &Outbox, cancel: &AtomicBool) -> Result<()> {
        match command {
            Command::LoadModel {
                spec,
                allow_download,
            } => self.load_model(&spec, allow_download, outbox),
            Command::Open { path, size } => {
                self.open(&path, size, outbox)?;
                self.caption(false, outbox)
            }
            Command::Caption { allow_download } => self.caption(allow_download, outbox),
            Command::Tokenize { caption } => self.tokenize(&caption, outbox).map(drop),
            Command::Edit(request) => self.edit(&request, outbox, cancel),
            Command::Export(request) => self.export(request, outbox),
            Command::Shutdown => Ok(()),
        }
    }

    fn model(&self) -> Result<&StableDiffusion> {
        self.model.as_ref().context(
            "no model is loaded: choose a diffusers-format folder or a repo id in the Model panel",
        )
    }

    fn load_model(&mut self, spec: &str, allow_download: bool, outbox: &Outbox) -> Result<()> {
        outbox.send(Event::ModelLoading {
            spec: spec.to_string(),
        });
        let mut options = self.config.resolve.clone();
        options.offline |= !allow_download;
        let files = match source::resolve(spec, &options, &mut DownloadEvents(outbox)) {
            Ok(files) => files,
            Err(error) => {
                let downloadable = matches!(error, EngineError::NotCached { .. });
                outbox.send(Event::ModelMissing {
                    spec: spec.to_string(),
                    message: error.to_string(),
                    downloadable,
                });
                return Ok(());
            }
        };
        let device = engine::pick_device(self.config.cpu)?;
        let root = files.root.clone();
        let model = match StableDiffusion::load(files, &device, candle_core::DType::F32) {
            Ok(model) => model,
            Err(error) => {
                outbox.send(Event::ModelMissing {
                    spec: spec.to_string(),
                    message: format!("loading `{}`: {error}", root.display()),
                    downloadable: false,
                });
                return Ok(());
            }
        };
        let info = ModelInfo {
            spec: spec.to_string(),
            root,
            device: describe(&device),
            default_side: model.default_image_side(),
        };
        // Sessions and directions belong to the previous model.
        self.session = None;
        self.directions.clear();
        self.model = Some(model);
        outbox.send(Event::ModelReady(info));
        Ok(())
    }

    fn working_side(&self, size: Option<usize>) -> usize {
        size.or_else(|| self.model.as_ref().map(|m| m.default_image_side()))
            .unwrap_or(photo::DEFAULT_WORKING_SIZE)
    }

    fn open(&mut self, path: &Path, size: Option<usize>, outbox: &Outbox) -> Result<()> {
        let side = self.working_side(size);
        let image = photo::load(path, side)?;
        self.photo = Some(Photo {
            path: path.to_path_buf(),
            size: side,
            image,
        });
        self.session = None;
        self.last = None;
        let photo = self.photo.as_ref().expect("just set");
        outbox.send(Event::Opened(OpenedImage {
            path: path.to_path_buf(),
            original_size: photo.image.original_size,
            working: photo.image.pixels.clone(),
        }));
        Ok(())
    }

    fn caption(&mut self, allow_download: bool, outbox: &Outbox) -> Result<()> {
        let Some(photo) = &self.photo else {
            bail!("open a photo first");
        };
        if self.captioner.is_none() {
            let mut options = self.config.resolve.clone();
            options.offline |= !allow_download;
            let located = Captioner::locate(
                &self.config.captioner,
                &options,
                &mut DownloadEvents(outbox),
            );
            let loaded = located.and_then(|dir| Captioner::load(&dir, &Device::Cpu));
            match loaded {
                Ok(captioner) => self.captioner = Some(captioner),
                Err(error) => {
                    outbox.send(Event::CaptionUnavailable {
                        message: format!(
                            "BLIP ({}) is not available: {error}. Type a caption, or download \
                             BLIP from the Caption menu",
                            self.config.captioner
                        ),
                    });
                    return Ok(());
                }
            }
        }
        let captioner = self.captioner.as_mut().expect("just loaded");
        let caption = captioner.caption(&photo.image.pixels)?;
        outbox.send(Event::Captioned {
            caption: caption.clone(),
        });
        self.tokenize(&caption, outbox).map(drop)
    }

    /// Sends the caption's tokens to the app; returns how many key positions they fill.
    fn tokenize(&self, caption: &str, outbox: &Outbox) -> Result<usize> {
        let Some(model) = &self.model else {
            return Ok(0);
        };
        let tokens = model.text.tokenizer.positions(caption)?;
        let count = tokens.len();
        outbox.send(Event::Tokens {
            caption: caption.to_string(),
            tokens,
        });
        Ok(count)
    }

    /// The session a request needs: the cached one when its header matches, else a new
    /// inversion. Returns whether it inverted.
    fn ensure_session(
        &mut self,
        request: &EditRequest,
        outbox: &Outbox,
        cancel: &AtomicBool,
    ) -> Result<bool> {
        let side = self.working_side(request.size);
        let reopen = self.photo.as_ref().is_some_and(|p| p.size != side);
        if reopen {
            let path = self.photo.as_ref().expect("checked").path.clone();
            self.open(&path, Some(side), outbox)?;
        }
        let model = self.model.as_ref().context("no model is loaded")?;
        let Some(photo) = &self.photo else {
            bail!("open a photo first (File → Open, or drop one on the window)");
        };
        let settings = photo_settings(request);
        let (w, h) = photo.image.pixels.dimensions();
        let expected = SessionHeader {
            format: SESSION_FORMAT,
            model: model.files.origin.clone(),
            model_key: edit::model_key(model),
            caption: request.caption.clone(),
            steps: request.steps,
            source: SessionSource::Photo {
                image_hash: format!("{:016x}", photo.image.hash),
                working_size: (w as usize, h as usize),
                latent_draw: settings.latent_draw,
                inversion: settings.inversion,
                seed: settings.seed,
            },
        };
        if self.session.as_ref().is_some_and(|s| s.header == expected) {
            return Ok(false);
        }
        self.session = None;
        let tensor = photo::to_tensor(&photo.image.pixels, &model.device)?;
        let session = edit::photo_session(
            model,
            &tensor,
            photo.image.hash,
            &request.caption,
            request.steps,
            &settings,
            &mut |p: EditorProgress| send_progress(outbox, p),
            cancel,
        )?;
        self.session = Some(session);
        Ok(true)
    }

    /// Δc for `from → to`, from memory, the disk cache, or computed.
    fn direction(&mut self, request: &EditRequest, outbox: &Outbox) -> Result<Tensor> {
        let key = (
            request.from.clone(),
            request.to.clone(),
            request.seed,
            self.config.sentences,
        );
        if let Some(delta) = self.directions.get(&key) {
            return Ok(delta.clone());
        }
        let model = self.model()?;
        let (from, to) = (
            sentences::check_word(&request.from)?,
            sentences::check_word(&request.to)?,
        );
        if from.eq_ignore_ascii_case(to) {
            bail!(
                "the source and target words are both `{from}`: an edit needs two different words"
            );
        }
        let cache = EmbeddingCache::new(self.config.embedding_cache.clone());
        let mut means = Vec::with_capacity(2);
        for (i, word) in [from, to].into_iter().enumerate() {
            let list = sentences::generate(word, self.config.sentences, request.seed)?;
            means.push(cache.mean_embedding(model, word, &list)?);
            outbox.send(Event::Progress {
                stage: "direction".into(),
                step: i + 1,
                total: 2,
                loss: None,
            });
        }
        let delta = direction::direction(&means[0], &means[1])?;
        self.directions.insert(key, delta.clone());
        Ok(delta)
    }

    fn edit(&mut self, request: &EditRequest, outbox: &Outbox, cancel: &AtomicBool) -> Result<()> {
        let start = Instant::now();
        if request.caption.trim().is_empty() {
            bail!("the caption is empty: describe the photo (it conditions the inversion)");
        }
        let delta = match &request.direction {
            Some(path) => direction::load_direction(path, self.model()?)?,
            None => self.direction(request, outbox)?,
        };
        let inverted = self.ensure_session(request, outbox, cancel)?;
        let tokens = self.tokenize(&request.caption, outbox)?;
        let model = self.model.as_ref().expect("checked");
        let photo = self.photo.as_ref().expect("checked by ensure_session");
        let session = self.session.as_mut().expect("ensured");
        let mut observer = StepEvents {
            model,
            outbox,
            tokens,
            preview_every: self.config.preview_every,
        };
        let outcome = edit::edit_observed(
            model,
            session,
            &delta,
            &request.settings,
            &mut observer,
            cancel,
        )?;
        outbox.send(Event::Progress {
            stage: "decode".into(),
            step: 1,
            total: 1,
            loss: None,
        });
        let image = latent_to_rgb(model, &outcome.latent)?;
        let reconstruction = match &session.reconstruction {
            Some(latent) => Some(latent_to_rgb(model, latent)?),
            None => None,
        };
        let record = serde_json::json!({
            "command": "gui edit",
            "model": model.files.origin,
            "image": photo.path,
            "from": request.from,
            "to": request.to,
            "direction": request.direction,
            "caption": session.header.caption,
            "steps": session.header.steps,
            "source": session.header.source,
            "edit": request.settings,
            "sentences": self.config.sentences,
            "inverted": inverted,
            "reused_reference": outcome.reused_reference,
        });
        self.last = Some(LastEdit {
            image: image.clone(),
            original_size: photo.image.original_size,
            source: photo.path.clone(),
            record: record.clone(),
        });
        outbox.send(Event::Edited(EditResult {
            image,
            reconstruction,
            inverted,
            reused_reference: outcome.reused_reference,
            losses: outcome.losses,
            elapsed: start.elapsed(),
            record,
        }));
        Ok(())
    }

    fn export(&self, request: ExportRequest, outbox: &Outbox) -> Result<()> {
        let Some(last) = &self.last else {
            bail!("nothing to export yet: run an edit first");
        };
        let paths = export(last, &request)?;
        outbox.send(Event::Exported { paths });
        Ok(())
    }
}

/// The inversion settings of the GUI: the authors' defaults with the request's steps and seed.
fn photo_settings(request: &EditRequest) -> PhotoSettings {
    PhotoSettings {
        latent_draw: LatentDraw::Mean,
        inversion: InversionParams {
            steps: request.steps,
            schedule: InverseSchedule::Authors,
            regularization: Some(NoiseRegularization::default()),
        },
        seed: request.seed,
    }
}

fn send_progress(outbox: &Outbox, p: EditorProgress) {
    outbox.send(Event::Progress {
        stage: p.stage.to_string(),
        step: p.step,
        total: p.total,
        loss: p.loss,
    });
}

/// Turns edit steps into progress, attention and preview events.
struct StepEvents<'a> {
    model: &'a StableDiffusion,
    outbox: &'a Outbox,
    tokens: usize,
    preview_every: usize,
}

impl EditObserver for StepEvents<'_> {
    fn progress(&mut self, progress: EditorProgress) {
        send_progress(self.outbox, progress);
    }

    fn wants_maps(&self) -> bool {
        true
    }

    fn step(&mut self, step: &EditStep<'_>) -> crate::engine::Result<()> {
        let reference = step.reference.half(1)?;
        let reduced = reduce_step(
            step.index,
            step.total,
            step.timestep,
            &reference,
            step.edited,
            self.tokens,
        )?;
        self.outbox.send(Event::Attention(reduced));
        let last = step.index + 1 == step.total;
        if self.preview_every > 0 && (step.index + 1) % self.preview_every == 0 && !last {
            let image = latent_to_rgb(self.model, step.predicted_x0)?;
            self.outbox.send(Event::Preview {
                step: step.index,
                image,
            });
        }
        Ok(())
    }
}

fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "CPU".into(),
        Device::Cuda(_) => "CUDA GPU".into(),
        Device::Metal(_) => "Metal GPU".into(),
    }
}

/// Encodes `image` in `format`; PNG carries `record` in an `iTXt` chunk.
fn encode(
    image: &image::RgbImage,
    format: ExportFormat,
    record: &serde_json::Value,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    match format {
        ExportFormat::Png => return encode_png(image, &[("p2pz", record.to_string())]),
        ExportFormat::Jpeg => {
            let encoder =
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY);
            image.write_with_encoder(encoder)?;
        }
        ExportFormat::WebP => {
            let encoder = image::codecs::webp::WebPEncoder::new_lossless(&mut bytes);
            image.write_with_encoder(encoder)?;
        }
    }
    Ok(bytes)
}

/// JPEG quality of exports: visually lossless for photos.
const JPEG_QUALITY: u8 = 95;

/// Writes the edited image at the photo's original size, its JSON sidecar, and optionally the
/// overlay and the attention maps. Refuses to write over the source, and over any existing file
/// unless the request allows it.
fn export(last: &LastEdit, request: &ExportRequest) -> Result<Vec<PathBuf>> {
    let path = &request.path;
    if same_file(path, &last.source) {
        bail!(
            "`{}` is the photo being edited: choose another name, the source is never overwritten",
            path.display()
        );
    }
    if path.exists() && !request.overwrite {
        bail!(
            "`{}` exists: confirm the overwrite or choose another name",
            path.display()
        );
    }
    let mut written = Vec::new();
    let image = photo::to_original_size(&last.image, last.original_size);
    write_atomically(path, &encode(&image, request.format, &last.record)?)
        .with_context(|| format!("exporting `{}`", path.display()))?;
    written.push(path.clone());
    let sidecar = path.with_extension("json");
    write_atomically(
        &sidecar,
        serde_json::to_string_pretty(&last.record)?.as_bytes(),
    )?;
    written.push(sidecar);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "export".into());
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Some(overlay) = &request.overlay {
        let overlay = photo::to_original_size(overlay, last.original_size);
        let overlay_path = dir.join(format!("{stem}-overlay.png"));
        write_atomically(
            &overlay_path,
            &encode_png(&overlay, &[("p2pz", last.record.to_string())])?,
        )?;
        written.push(overlay_path);
    }
    if !request.maps.is_empty() {
        let maps_dir = dir.join(format!("{stem}-attention"));
        std::fs::create_dir_all(&maps_dir)
            .with_context(|| format!("creating `{}`", maps_dir.display()))?;
        for (i, (label, map)) in request.maps.iter().enumerate() {
            let name = format!("{i:02}-{}.png", file_safe(label));
            let map_path = maps_dir.join(name);
            let mut bytes = Vec::new();
            map.write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )?;
            write_atomically(&map_path, &bytes)?;
            written.push(map_path);
        }
    }
    Ok(written)
}

/// A token label made safe for a file name.
fn file_safe(label: &str) -> String {
    let cleaned: String = label
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { '_' })
        .collect();
    cleaned.trim_matches('_').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig {
            captioner: "none".into(),
            embedding_cache: std::env::temp_dir(),
            sentences: 4,
            resolve: source::ResolveOptions::from_env(),
            cpu: true,
            preview_every: 0,
        }
    }

    /// An outbox with its receiving end, and a cancel slot.
    fn wiring() -> (Outbox, Receiver<Event>, Arc<Mutex<Arc<AtomicBool>>>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let slot = Arc::new(Mutex::new(Arc::new(AtomicBool::new(false))));
        (Outbox::new(tx, Box::new(|| {})), rx, slot)
    }

    #[test]
    fn a_panicking_job_becomes_an_error_event_and_the_state_survives() {
        let (outbox, rx, slot) = wiring();
        let mut state = State::new(config());
        state.guarded(&outbox, &slot, |_, _| panic!("boom"));
        let events: Vec<Event> = rx.try_iter().collect();
        assert!(
            matches!(&events[0], Event::Error { message } if message.contains("boom")),
            "{events:?}"
        );
        assert!(matches!(events[1], Event::Idle));
        // The next command runs normally and reports its own error.
        state.handle_safely(
            Command::Caption {
                allow_download: false,
            },
            &outbox,
            &slot,
        );
        let events: Vec<Event> = rx.try_iter().collect();
        assert!(
            matches!(&events[0], Event::Error { message } if message.contains("open a photo")),
            "{events:?}"
        );
    }

    #[test]
    fn a_cancelled_job_reports_cancelled_not_an_error() {
        let (outbox, rx, slot) = wiring();
        let mut state = State::new(config());
        state.guarded(&outbox, &slot, |_, _| Err(EngineError::Cancelled.into()));
        let events: Vec<Event> = rx.try_iter().collect();
        assert!(matches!(events[0], Event::Cancelled), "{events:?}");
    }

    #[test]
    fn file_safe_names_keep_letters_only() {
        assert_eq!(file_safe("<|startoftext|>"), "startoftext");
        assert_eq!(file_safe("cat</w>"), "cat__w");
    }
}
