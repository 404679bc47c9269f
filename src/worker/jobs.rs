//! What the worker thread does with each command: the state it owns (model, captioner, photo,
//! session, directions, last result, the generator last run) and one handler per command.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::attention::reduce_step;
use super::export::{export, LastEdit};
use super::generators::{self, DistillRequest, LoadedGenerator};
use super::{
    Command, EditRequest, EditResult, Event, ExportRequest, ModelInfo, OpenedImage, WorkerConfig,
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
    while let Some(mut command) = next_command(&commands) {
        // Of several queued edits (a slider being scrubbed) only the newest matters.
        while matches!(command, Command::Edit(_)) {
            match commands.try_recv() {
                Ok(Command::Edit(newer)) => {
                    // The replaced edit is answered all the same: one Idle per command.
                    outbox.send(Event::Idle);
                    command = Command::Edit(newer);
                }
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

/// How long the worker waits idle before it gives freed memory back: long enough that the
/// re-edits of a slider being dragged reuse it instead of faulting it in again.
const IDLE_BEFORE_RELEASE: Duration = Duration::from_secs(20);

/// The next command, or `None` when the app has gone; after [`IDLE_BEFORE_RELEASE`] without
/// one, what the last commands freed goes back to the system first.
fn next_command(commands: &Receiver<Command>) -> Option<Command> {
    match commands.recv_timeout(IDLE_BEFORE_RELEASE) {
        Ok(command) => Some(command),
        Err(RecvTimeoutError::Timeout) => {
            engine::cpu::allocator::release_freed_memory();
            commands.recv().ok()
        }
        Err(RecvTimeoutError::Disconnected) => None,
    }
}

/// A photo at working size and where it came from.
struct Photo {
    path: PathBuf,
    size: usize,
    image: WorkingImage,
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
    generator: LoadedGenerator,
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
            generator: LoadedGenerator::default(),
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
            Command::ListGenerators => {
                outbox.send(Event::Generators(generators::list(&self.config.generators)));
                Ok(())
            }
            Command::ImportGenerator { path } => {
                let info = generators::import(&self.config.generators, &path)?;
                outbox.send(Event::GeneratorAdded(info));
                outbox.send(Event::Generators(generators::list(&self.config.generators)));
                Ok(())
            }
            Command::Apply { generator } => self.apply(&generator, outbox),
            Command::Distill(request) => self.distill(&request, outbox, cancel),
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
                    message: model_problem(&error),
                    downloadable,
                });
                return Ok(());
            }
        };
        let device = engine::pick_device(self.config.cpu)?;
        let root = files.root.clone();
        let mut device_words = describe(&device);
        let load = |files| StableDiffusion::load(files, &device, candle_core::DType::F32);
        let loaded = if self.config.bf16_products && device.is_cpu() {
            match engine::cpu::with_products(engine::cpu::Products::Bf16, || load(files.clone())) {
                Ok(loaded) => {
                    device_words.push_str(", bf16 products");
                    loaded
                }
                Err(why) => {
                    device_words.push_str(&format!(" in f32 (no bf16 products: {why})"));
                    load(files)
                }
            }
        } else {
            load(files)
        };
        let model = match loaded {
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
            device: device_words,
            default_side: model.default_image_side(),
        };
        // Sessions and directions belong to the previous model.
        self.session = None;
        self.directions.clear();
        self.model = Some(model);
        outbox.send(Event::ModelReady(info));
        self.send_known_words(outbox);
        Ok(())
    }

    /// Tells the app which words have cached embeddings.
    fn send_known_words(&self, outbox: &Outbox) {
        let cache = EmbeddingCache::new(self.config.embedding_cache.clone());
        outbox.send(Event::KnownWords(cache.cached_words()));
    }

    fn working_side(&self, size: Option<usize>) -> usize {
        size.or_else(|| self.model.as_ref().map(|m| m.default_image_side()))
            .unwrap_or(photo::DEFAULT_WORKING_SIZE)
    }

    /// Opens a new photo: the last photo's session and result are dropped.
    fn open(&mut self, path: &Path, size: Option<usize>, outbox: &Outbox) -> Result<()> {
        let opened = self.read_photo(path, self.working_side(size))?;
        self.last = None;
        outbox.send(Event::Opened(opened));
        Ok(())
    }

    /// Reads `path` at working side `side` as the open photo; the session, made at another
    /// size or of another photo, is dropped.
    fn read_photo(&mut self, path: &Path, side: usize) -> Result<OpenedImage> {
        let image = photo::load(path, side)?;
        let opened = OpenedImage {
            path: path.to_path_buf(),
            original_size: image.original_size,
            working: image.pixels.clone(),
        };
        self.photo = Some(Photo {
            path: path.to_path_buf(),
            size: side,
            image,
        });
        self.session = None;
        Ok(opened)
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
        let resized = self.photo.as_ref().filter(|p| p.size != side);
        if let Some(path) = resized.map(|p| p.path.clone()) {
            // The same photo at another size: the user's caption, words and last result stay.
            let opened = self.read_photo(&path, side)?;
            outbox.send(Event::Resized(opened));
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
        outbox.send(Event::Progress {
            stage: "direction".into(),
            step: 0,
            total: 2,
            loss: None,
        });
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
            "working_side": photo.size,
            "sentences": self.config.sentences,
            "inverted": inverted,
            "reused_reference": outcome.reused_reference,
        });
        let result = EditResult {
            image,
            reconstruction,
            inverted,
            reused_reference: outcome.reused_reference,
            losses: outcome.losses,
            elapsed: start.elapsed(),
            record,
            instant: None,
        };
        self.publish(result, outbox);
        self.send_known_words(outbox);
        Ok(())
    }

    /// Keeps `result` of the open photo as what an export writes, and sends it.
    fn publish(&mut self, result: EditResult, outbox: &Outbox) {
        let photo = self
            .photo
            .as_ref()
            .expect("a result belongs to the open photo");
        self.last = Some(LastEdit {
            image: result.image.clone(),
            original_size: photo.image.original_size,
            source: photo.path.clone(),
            record: result.record.clone(),
        });
        outbox.send(Event::Edited(result));
    }

    /// Runs a generator on the open photo at working size: the instant result.
    fn apply(&mut self, path: &Path, outbox: &Outbox) -> Result<()> {
        let start = Instant::now();
        let photo = self.photo.as_ref().context("open a photo first")?;
        let device = match &self.model {
            Some(model) => model.device.clone(),
            None => engine::pick_device(self.config.cpu)?,
        };
        let (image, header) = self.generator.apply(path, &photo.image.pixels, &device)?;
        let info = generators::list(&self.config.generators)
            .into_iter()
            .find(|g| g.path == path)
            .unwrap_or_else(|| generators::GeneratorInfo {
                path: path.to_path_buf(),
                from: header.from.clone(),
                to: header.to.clone(),
                scores: header.scores.map(|s| (s.psnr, s.identity_psnr)),
                pairs: header.pairs,
            });
        let record = serde_json::json!({
            "command": "gui apply",
            "image": photo.path,
            "generator": path,
            "edit": header.edit_name(),
            "generator_header": header,
            "working_side": photo.size,
        });
        let result = EditResult {
            image,
            reconstruction: None,
            inverted: false,
            reused_reference: false,
            losses: vec![],
            elapsed: start.elapsed(),
            record,
            instant: Some(info),
        };
        self.publish(result, outbox);
        Ok(())
    }

    /// Makes pairs with the loaded model and trains a generator on them.
    fn distill(
        &mut self,
        request: &DistillRequest,
        outbox: &Outbox,
        cancel: &AtomicBool,
    ) -> Result<()> {
        let model = self.model()?;
        let info = generators::distill(
            model,
            request,
            (
                &self.config.generators,
                &self.config.embedding_cache,
                self.config.sentences,
            ),
            &mut |stage, step, total| {
                outbox.send(Event::Progress {
                    stage: stage.into(),
                    step,
                    total,
                    loss: None,
                })
            },
            cancel,
        )?;
        outbox.send(Event::GeneratorAdded(info));
        outbox.send(Event::Generators(generators::list(&self.config.generators)));
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
        if self.preview_every > 0 && (step.index + 1).is_multiple_of(self.preview_every) && !last {
            let image = latent_to_rgb(self.model, step.predicted_x0)?;
            self.outbox.send(Event::Preview {
                step: step.index,
                image,
            });
        }
        Ok(())
    }
}

/// What is wrong with a model the user named, in the app's words: where we looked, not which
/// command-line flag to pass (the Model panel says what to do).
fn model_problem(error: &EngineError) -> String {
    match error {
        EngineError::MissingFolder(path) => format!("`{}` does not exist.", path.display()),
        EngineError::NotCached { repo, looked_in } => {
            format!("`{repo}` is not in the Hugging Face cache (looked in {looked_in}).")
        }
        EngineError::Download {
            repo,
            file,
            message,
        } => format!(
            "could not download `{file}` of `{repo}`: {message}. Check the network and the repo id."
        ),
        other => other.to_string(),
    }
}

fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "CPU".into(),
        Device::Cuda(_) => "CUDA GPU".into(),
        Device::Metal(_) => "Metal GPU".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig {
            captioner: "none".into(),
            embedding_cache: std::env::temp_dir(),
            generators: std::env::temp_dir().join("p2pz-test-generators"),
            sentences: 4,
            resolve: source::ResolveOptions::from_env(),
            cpu: true,
            bf16_products: false,
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
}
