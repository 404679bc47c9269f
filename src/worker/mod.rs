//! The one thread boundary between the desktop app and the models.
//!
//! The app sends [`Command`]s over a crossbeam channel; one worker thread owns the model, the
//! captioner and the session cache, runs each command, and answers with [`Event`]s (progress,
//! step maps, previews, results, errors). After every event it calls the app's `wake` hook, so
//! the UI repaints only when something arrived. A panic inside a command becomes an
//! [`Event::Error`]; the thread survives it.

pub mod attention;
mod generators;
mod jobs;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::edit::direction::EmbeddingCache;
use crate::edit::EditSettings;
use crate::engine::source::{self, ResolveOptions};
pub use attention::{AttentionGrid, StepAttention};
pub use export::{export_targets, ExportFormat};
pub use generators::{DistillRequest, GeneratorInfo};

mod export;

/// The model the editor looks for when the user has not chosen one: the paper's.
pub const DEFAULT_MODEL: &str = source::DEFAULT_MODEL;

/// How the worker finds its models and caches.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The BLIP captioner: a folder or a repo id.
    pub captioner: String,
    /// Where mean sentence embeddings are cached.
    pub embedding_cache: PathBuf,
    /// Where the user's distilled generators live (imported and distilled ones; the pairs and
    /// checkpoints of distillations in its `work/` folder).
    pub generators: PathBuf,
    /// Sentences written per word for an edit direction.
    pub sentences: usize,
    /// How repo ids are looked up (the cache folder); downloads happen only when a command
    /// allows them.
    pub resolve: ResolveOptions,
    /// Run on the CPU even when a GPU is available.
    pub cpu: bool,
    /// On a CPU with AMX, multiply in bf16 ([`crate::engine::cpu::Products::Bf16`]): 2–3×
    /// faster edits, less exact. Elsewhere the model loads in f32 and says why.
    pub bf16_products: bool,
    /// Decode a preview of the predicted clean image every this many edit steps (0: never).
    pub preview_every: usize,
}

impl WorkerConfig {
    /// The configuration for a user's machine: BLIP and models from the Hugging Face cache
    /// (`HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE` are honoured), embeddings in the user's
    /// cache folder (generators beside them), the default sentence count, a preview every 5
    /// steps.
    pub fn for_user(cpu: bool) -> Self {
        let embeddings = EmbeddingCache::default_location().dir().to_path_buf();
        let generators = embeddings
            .parent()
            .map(|p| p.join("generators"))
            .unwrap_or_else(|| embeddings.join("generators"));
        Self {
            captioner: crate::edit::caption::DEFAULT_CAPTIONER.to_string(),
            embedding_cache: embeddings,
            generators,
            sentences: crate::edit::sentences::DEFAULT_SENTENCES,
            resolve: ResolveOptions::from_env(),
            cpu,
            bf16_products: false,
            preview_every: 5,
        }
    }
}

/// Everything the app can ask of the worker.
#[derive(Debug, Clone)]
pub enum Command {
    /// Find and load a Stable Diffusion model: a folder or a repo id. Without `allow_download`
    /// only local folders and the Hugging Face cache are looked at.
    LoadModel {
        /// Folder or repo id.
        spec: String,
        /// Whether a missing repo may be downloaded.
        allow_download: bool,
    },
    /// Open a photo at working size `size` (long side; `None`: the model's default) and caption
    /// it when a captioner is available.
    Open {
        /// The photo.
        path: PathBuf,
        /// Working long side, a multiple of 64.
        size: Option<usize>,
    },
    /// Caption the open photo with BLIP (downloading BLIP if allowed).
    Caption {
        /// Whether a missing captioner may be downloaded.
        allow_download: bool,
    },
    /// Tokenize a caption, for the overlay's token picker.
    Tokenize {
        /// The caption.
        caption: String,
    },
    /// Invert if needed, then edit the open photo.
    Edit(EditRequest),
    /// Write the last result (and optionally the overlay and maps) to disk.
    Export(ExportRequest),
    /// List the generators in the generator folder.
    ListGenerators,
    /// Check a generator file and copy it into the generator folder.
    ImportGenerator {
        /// The file.
        path: PathBuf,
    },
    /// Run a generator on the open photo: an instant result.
    Apply {
        /// The generator file.
        generator: PathBuf,
    },
    /// Make pairs with the loaded model and train a generator on them.
    Distill(DistillRequest),
    /// Stop the thread.
    Shutdown,
}

impl Command {
    /// A short name of what the command does ("model", "open", "caption", "tokenize", "edit",
    /// "export", "generators", "import", "apply", "distill", "shutdown"), for progress displays
    /// and bookkeeping.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::LoadModel { .. } => "model",
            Command::Open { .. } => "open",
            Command::Caption { .. } => "caption",
            Command::Tokenize { .. } => "tokenize",
            Command::Edit(_) => "edit",
            Command::Export(_) => "export",
            Command::ListGenerators => "generators",
            Command::ImportGenerator { .. } => "import",
            Command::Apply { .. } => "apply",
            Command::Distill(_) => "distill",
            Command::Shutdown => "shutdown",
        }
    }
}

/// One edit of the open photo.
#[derive(Debug, Clone, PartialEq)]
pub struct EditRequest {
    /// The caption that conditions inversion and the reference pass.
    pub caption: String,
    /// The word in the photo.
    pub from: String,
    /// The word it should become.
    pub to: String,
    /// DDIM steps.
    pub steps: usize,
    /// Seed of the regularization's shifts and of the sentence generator.
    pub seed: u64,
    /// Working long side (`None`: the model's default).
    pub size: Option<usize>,
    /// λ_xa, CFG scale and edit strength.
    pub settings: EditSettings,
    /// A direction file (`.safetensors`, or the authors' `.pt`) to edit along instead of the
    /// one the words give.
    pub direction: Option<PathBuf>,
}

/// What to write on export.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// The edited image's path; the sidecar goes beside it with `.json`.
    pub path: PathBuf,
    /// Its format.
    pub format: ExportFormat,
    /// Whether an existing file may be replaced (the app asked the user).
    pub overwrite: bool,
    /// The overlay as shown (any size, RGB; written at the photo's size) as `<stem>-overlay.png`.
    pub overlay: Option<image::RgbImage>,
    /// Attention maps by token label (gray, at the photo's size), written into
    /// `<stem>-attention/`.
    pub maps: Vec<(String, image::GrayImage)>,
}

/// The loaded model, for display.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// What the user asked for.
    pub spec: String,
    /// Where the files are.
    pub root: PathBuf,
    /// The device, in words.
    pub device: String,
    /// The default working side (512 for SD 1.x).
    pub default_side: usize,
}

/// A photo the worker opened.
#[derive(Debug, Clone)]
pub struct OpenedImage {
    /// Its path.
    pub path: PathBuf,
    /// Its size on disk.
    pub original_size: (u32, u32),
    /// The photo at working size.
    pub working: image::RgbImage,
}

/// What an edit produced.
#[derive(Debug, Clone)]
pub struct EditResult {
    /// The edited image at working size.
    pub image: image::RgbImage,
    /// The reference pass's image (inversion quality check), when this edit made or kept one.
    pub reconstruction: Option<image::RgbImage>,
    /// Whether this edit had to invert the photo (false: the session cache served it).
    pub inverted: bool,
    /// Whether the reference maps came from the session cache (a re-edit).
    pub reused_reference: bool,
    /// The cross-attention loss per step.
    pub losses: Vec<f64>,
    /// Wall time of the whole command.
    pub elapsed: Duration,
    /// The parameters, as written into exports.
    pub record: serde_json::Value,
    /// The generator that made it, for an instant result (`None`: the diffusion editor did).
    pub instant: Option<GeneratorInfo>,
}

/// Everything the worker reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A model is being looked up and loaded.
    ModelLoading {
        /// Folder or repo id.
        spec: String,
    },
    /// Bytes of a download arrived.
    Download {
        /// The file.
        file: String,
        /// Bytes so far.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// The model is ready.
    ModelReady(ModelInfo),
    /// The model could not be found or loaded; `message` says what was wrong and where we
    /// looked, in the app's words (the Model panel gives the fix).
    ModelMissing {
        /// Folder or repo id.
        spec: String,
        /// What went wrong and where we looked.
        message: String,
        /// Whether downloading it would help (a repo id that is not cached).
        downloadable: bool,
    },
    /// A photo was opened: a new photo, so the previous one's caption and results are void.
    Opened(OpenedImage),
    /// The open photo was read again at another working size (an edit asked for a new size).
    /// Nothing the user set changes, and the last result stays until a new one replaces it.
    Resized(OpenedImage),
    /// Words whose mean sentence embedding is cached, offered as targets.
    KnownWords(Vec<String>),
    /// BLIP captioned the photo.
    Captioned {
        /// The caption.
        caption: String,
    },
    /// No caption could be made; the user types one.
    CaptionUnavailable {
        /// Why, and the fix.
        message: String,
    },
    /// The caption's CLIP tokens, BOS and EOS included.
    Tokens {
        /// The caption tokenized.
        caption: String,
        /// Token strings, e.g. `["<|startoftext|>", "a</w>", "cat</w>", …]`.
        tokens: Vec<String>,
    },
    /// A step of a long computation finished.
    Progress {
        /// "invert", "direction", "reference + edit", "edit", "decode", "pairs" or "train".
        stage: String,
        /// Steps done.
        step: usize,
        /// Steps in all.
        total: usize,
        /// The cross-attention loss, for edit stages.
        loss: Option<f64>,
    },
    /// One edit step's reduced cross-attention maps.
    Attention(StepAttention),
    /// The predicted clean image after an edit step.
    Preview {
        /// The step, from 0.
        step: usize,
        /// The image at working size.
        image: image::RgbImage,
    },
    /// An edit finished.
    Edited(EditResult),
    /// The generators in the generator folder.
    Generators(Vec<GeneratorInfo>),
    /// A generator was imported or distilled.
    GeneratorAdded(GeneratorInfo),
    /// Files were written.
    Exported {
        /// Every file written.
        paths: Vec<PathBuf>,
    },
    /// A command stopped at the user's request.
    Cancelled,
    /// A command failed; the worker is still alive.
    Error {
        /// What went wrong and the fix.
        message: String,
    },
    /// The worker finished a command and waits for the next. Every command sent is answered by
    /// exactly one `Idle`, including an edit that a newer queued edit replaced before it ran.
    Idle,
}

/// The app's handle on the worker thread: send commands, poll events, cancel.
pub struct Worker {
    commands: Sender<Command>,
    events: Receiver<Event>,
    cancel: Arc<Mutex<Arc<AtomicBool>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts the worker thread. `wake` is called after every event (e.g. egui's
    /// `request_repaint`).
    pub fn spawn(config: WorkerConfig, wake: impl Fn() + Send + 'static) -> std::io::Result<Self> {
        let (command_tx, command_rx) = crossbeam_channel::unbounded();
        let (event_tx, event_rx) = crossbeam_channel::unbounded();
        let cancel = Arc::new(Mutex::new(Arc::new(AtomicBool::new(false))));
        let outbox = jobs::Outbox::new(event_tx, Box::new(wake));
        let slot = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("p2pz-worker".into())
            .spawn(move || jobs::run(config, command_rx, outbox, slot))?;
        Ok(Self {
            commands: command_tx,
            events: event_rx,
            cancel,
            thread: Some(thread),
        })
    }

    /// Queues a command. Commands run one at a time, in order; of several queued edits only
    /// the newest runs.
    pub fn send(&self, command: Command) {
        // The receiver lives as long as the thread; a send fails only after a shutdown.
        let _ = self.commands.send(command);
    }

    /// The next event, if one has arrived.
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Asks the running command to stop; it does so within one step.
    pub fn cancel(&self) {
        if let Ok(current) = self.cancel.lock() {
            current.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.cancel();
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
