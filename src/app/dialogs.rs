//! Native file dialogs (rfd) on their own threads, so the UI never blocks on one.
//!
//! Where no dialog can be shown (no XDG portal, no zenity) rfd returns `None` at once; the app
//! then points the user at the path fields and drag-and-drop, which always work.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

/// What a dialog was opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialogPurpose {
    /// Pick a photo to open.
    OpenImage,
    /// Pick a diffusers-format model folder.
    ModelFolder,
    /// Pick where to export.
    ExportPath,
    /// Pick a generator file to import.
    Generator,
}

/// A dialog's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct DialogAnswer {
    /// What it was for.
    pub purpose: DialogPurpose,
    /// The chosen path; `None` when cancelled or unavailable.
    pub path: Option<PathBuf>,
    /// Whether it answered `None` too fast for a person: no dialog could be shown.
    pub unavailable: bool,
}

/// Answers faster than this are no person's: the dialog never appeared.
const INSTANT_ANSWER: Duration = Duration::from_millis(1000);

/// Runs dialogs on helper threads and collects their answers.
#[derive(Debug)]
pub struct Dialogs {
    answers_tx: Sender<DialogAnswer>,
    answers: Receiver<DialogAnswer>,
    open: bool,
}

impl Default for Dialogs {
    fn default() -> Self {
        let (answers_tx, answers) = crossbeam_channel::unbounded();
        Self {
            answers_tx,
            answers,
            open: false,
        }
    }
}

impl Dialogs {
    /// Opens a dialog for `purpose` unless one is already open; `start_dir` seeds it.
    pub fn open(
        &mut self,
        purpose: DialogPurpose,
        start_dir: Option<PathBuf>,
        ctx: &egui::Context,
    ) {
        if self.open {
            return;
        }
        self.open = true;
        let tx = self.answers_tx.clone();
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("p2pz-dialog".into())
            .spawn(move || {
                let started = Instant::now();
                let mut dialog = rfd::FileDialog::new();
                if let Some(dir) = start_dir {
                    dialog = dialog.set_directory(dir);
                }
                let path = match purpose {
                    DialogPurpose::OpenImage => dialog
                        .add_filter("Images", &["png", "jpg", "jpeg", "webp"])
                        .pick_file(),
                    DialogPurpose::ModelFolder => dialog.pick_folder(),
                    DialogPurpose::ExportPath => dialog
                        .add_filter("Images", &["png", "jpg", "jpeg", "webp"])
                        .save_file(),
                    DialogPurpose::Generator => dialog
                        .add_filter("Generators", &["safetensors"])
                        .pick_file(),
                };
                let unavailable = path.is_none() && started.elapsed() < INSTANT_ANSWER;
                let _ = tx.send(DialogAnswer {
                    purpose,
                    path,
                    unavailable,
                });
                ctx.request_repaint();
            });
        if spawned.is_err() {
            self.open = false;
        }
    }

    /// The next answer, if one arrived.
    pub fn poll(&mut self) -> Option<DialogAnswer> {
        let answer = self.answers.try_recv().ok()?;
        self.open = false;
        Some(answer)
    }
}
