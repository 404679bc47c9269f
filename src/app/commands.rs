//! Every user intent as one [`AppCommand`], handled in one `match`: panels, menus and keyboard
//! shortcuts only push commands; this is where they turn into worker commands and state changes.

use std::path::PathBuf;

use super::dialogs::DialogPurpose;
use super::state::{AppState, CompareMode, JobState, ModelStatus, ThemeChoice};
use super::P2pzApp;
use crate::edit::guidance::GuidanceParams;
use crate::edit::EditSettings;
use crate::export::same_file;
use crate::worker::{
    export_targets, Command, DistillRequest, EditRequest, ExportFormat, ExportRequest,
};

/// A user intent.
#[derive(Debug, Clone, PartialEq)]
pub enum AppCommand {
    /// Show the native open dialog.
    PickImage,
    /// Open this photo.
    OpenPath(PathBuf),
    /// Show the native folder dialog for a model.
    PickModelFolder,
    /// Load the model named in the Model field.
    LoadModel {
        /// Whether a missing repo may be downloaded.
        allow_download: bool,
    },
    /// Caption the photo again with BLIP.
    Caption {
        /// Whether a missing captioner may be downloaded.
        allow_download: bool,
    },
    /// Swap the source and target words.
    SwapWords,
    /// Run the edit (inverting first when the session cache cannot serve it).
    Run,
    /// Stop the running command within one step.
    Cancel,
    /// Show the native save dialog for the export path.
    PickExportPath,
    /// Export the last result.
    Export {
        /// The user confirmed replacing an existing file.
        overwrite: bool,
    },
    /// Toggle between the photo and the edit.
    ToggleCompare,
    /// Switch the theme.
    SetTheme(ThemeChoice),
    /// Show or hide the controls panel (left).
    ToggleControls,
    /// Show or hide the inspector panel (right).
    ToggleInspector,
    /// Turn instant results on or off.
    SetInstant(bool),
    /// Show the native open dialog for a generator file.
    PickGenerator,
    /// Import the generator named in the generator field.
    ImportGenerator,
    /// Make pairs with the loaded model and distill the words' edit into a generator.
    Distill,
}

impl AppCommand {
    /// Whether this intent starts an action of its own, whose success or failure replaces the
    /// messages of earlier ones (opening, loading, captioning, running, exporting).
    fn starts_an_action(&self) -> bool {
        matches!(
            self,
            AppCommand::OpenPath(_)
                | AppCommand::LoadModel { .. }
                | AppCommand::Caption { .. }
                | AppCommand::Run
                | AppCommand::Export { .. }
                | AppCommand::ImportGenerator
                | AppCommand::Distill
        )
    }
}

/// Shortcuts: (modifiers, key, command). The Help panel lists them from here.
pub fn shortcuts() -> Vec<(egui::KeyboardShortcut, AppCommand, &'static str)> {
    use egui::{Key, KeyboardShortcut, Modifiers};
    vec![
        (
            KeyboardShortcut::new(Modifiers::COMMAND, Key::O),
            AppCommand::PickImage,
            "open a photo",
        ),
        (
            KeyboardShortcut::new(Modifiers::COMMAND, Key::Enter),
            AppCommand::Run,
            "run the edit",
        ),
        (
            KeyboardShortcut::new(Modifiers::COMMAND, Key::S),
            AppCommand::Export { overwrite: false },
            "export",
        ),
        (
            KeyboardShortcut::new(Modifiers::NONE, Key::Escape),
            AppCommand::Cancel,
            "cancel",
        ),
        (
            KeyboardShortcut::new(Modifiers::COMMAND, Key::B),
            AppCommand::ToggleCompare,
            "before / after",
        ),
    ]
}

impl P2pzApp {
    /// Sends a command to the worker and keeps it in the in-flight list until its `Idle`
    /// comes back.
    pub(super) fn send(&mut self, command: Command) {
        self.state.in_flight.push_back(command.kind());
        self.worker.send(command);
    }

    /// Carries out one intent.
    pub fn execute(&mut self, command: AppCommand, ctx: &egui::Context) {
        if command.starts_an_action() {
            self.state.clear_errors();
        }
        match command {
            AppCommand::PickImage => {
                let dir = self
                    .state
                    .photo
                    .as_ref()
                    .and_then(|p| p.path.parent().map(PathBuf::from));
                self.dialogs.open(DialogPurpose::OpenImage, dir, ctx);
            }
            AppCommand::OpenPath(path) => {
                if !path.is_file() {
                    self.state.notify(
                        true,
                        format!(
                            "`{}` is not a file: type the path of a PNG, JPEG or WebP photo",
                            path.display()
                        ),
                    );
                    return;
                }
                self.state.job = Some(JobState::new("open"));
                self.send(Command::Open {
                    path,
                    size: self.state.persisted.size,
                });
            }
            AppCommand::PickModelFolder => self.dialogs.open(DialogPurpose::ModelFolder, None, ctx),
            AppCommand::LoadModel { allow_download } => {
                let spec = self.state.persisted.model_spec.trim().to_string();
                if spec.is_empty() {
                    self.state
                        .notify(true, "the Model field is empty: type a folder or a repo id");
                    return;
                }
                self.state.job = Some(JobState::new("model"));
                self.send(Command::LoadModel {
                    spec,
                    allow_download,
                });
            }
            AppCommand::Caption { allow_download } => {
                if self.state.photo.is_none() {
                    self.state.notify(true, "open a photo first");
                    return;
                }
                self.state.job = Some(JobState::new("caption"));
                self.send(Command::Caption { allow_download });
            }
            AppCommand::SwapWords => {
                let p = &mut self.state.persisted;
                std::mem::swap(&mut p.from, &mut p.to);
            }
            AppCommand::Run => {
                if let Some(problem) = run_blocker(&self.state) {
                    self.state.notify(true, problem);
                    return;
                }
                if self.state.busy() {
                    // A slider moved during an edit: stop it and run the newest settings.
                    self.worker.cancel();
                }
                let file = self.state.persisted.direction_file.trim().to_string();
                let direction = (!file.is_empty()).then(|| PathBuf::from(file));
                if let Some(path) = &direction {
                    if !path.is_file() {
                        self.state.notify(
                            true,
                            format!(
                                "the direction file `{}` does not exist: fix the path, or clear \
                                 the field to edit along the words",
                                path.display()
                            ),
                        );
                        return;
                    }
                    let recent = &mut self.state.persisted.recent_directions;
                    recent.retain(|p| p != path);
                    recent.insert(0, path.clone());
                    recent.truncate(super::state::RECENT_FILES);
                }
                let p = &self.state.persisted;
                let request = EditRequest {
                    caption: self.state.caption.trim().to_string(),
                    from: p.from.trim().to_string(),
                    to: p.to.trim().to_string(),
                    steps: p.sliders.steps,
                    seed: p.sliders.seed,
                    size: p.size,
                    settings: EditSettings {
                        guidance: GuidanceParams {
                            lambda_xa: p.sliders.lambda_xa,
                            guidance_scale: p.sliders.guidance_scale,
                        },
                        strength: p.sliders.strength,
                    },
                    direction,
                };
                self.state.job = Some(JobState::new("edit"));
                self.state.compare = CompareMode::Edited;
                self.send(Command::Edit(request));
            }
            AppCommand::Cancel => {
                if let Some(job) = &mut self.state.job {
                    job.cancelling = true;
                    self.worker.cancel();
                }
            }
            AppCommand::PickExportPath => {
                let dir = self
                    .state
                    .photo
                    .as_ref()
                    .and_then(|p| p.path.parent().map(PathBuf::from));
                self.dialogs.open(DialogPurpose::ExportPath, dir, ctx);
            }
            AppCommand::Export { overwrite } => self.export(overwrite),
            AppCommand::ToggleCompare => {
                self.state.compare = match self.state.compare {
                    CompareMode::Original => CompareMode::Edited,
                    _ => CompareMode::Original,
                };
            }
            AppCommand::SetTheme(theme) => {
                self.state.persisted.theme = theme;
                super::apply_theme(ctx, theme);
            }
            AppCommand::ToggleControls => {
                let shown = &mut self.state.persisted.panels.controls;
                *shown = !*shown;
            }
            AppCommand::ToggleInspector => {
                let shown = &mut self.state.persisted.panels.inspector;
                *shown = !*shown;
            }
            AppCommand::SetInstant(on) => {
                self.state.persisted.instant = on;
                self.state.instant_asked = None;
                if !on
                    && self
                        .state
                        .result
                        .as_ref()
                        .is_some_and(|r| r.instant.is_some())
                {
                    // Off means no instant result on screen: back to the photo.
                    self.state.result = None;
                    self.state.image_revision += 1;
                }
            }
            AppCommand::PickGenerator => self.dialogs.open(DialogPurpose::Generator, None, ctx),
            AppCommand::ImportGenerator => {
                let path = PathBuf::from(self.state.generator_path.trim());
                if !path.is_file() {
                    self.state.notify(
                        true,
                        format!(
                            "`{}` is not a file: type the path of a .generator.safetensors file                              (made by `p2pz distill`)",
                            path.display()
                        ),
                    );
                    return;
                }
                self.state.job = Some(JobState::new("import"));
                self.send(Command::ImportGenerator { path });
            }
            AppCommand::Distill => {
                if !matches!(self.state.model, ModelStatus::Ready(_)) {
                    self.state.notify(
                        true,
                        "no model is loaded: distilling makes its pairs with the model in the                          Model panel",
                    );
                    return;
                }
                let p = &self.state.persisted;
                let (from, to) = (p.from.trim().to_string(), p.to.trim().to_string());
                if from.is_empty() || to.is_empty() {
                    self.state.notify(
                        true,
                        "type the word to change and the word it becomes first",
                    );
                    return;
                }
                let form = p.distill;
                self.state.job = Some(JobState::new("distill"));
                self.state.distill_open = false;
                self.send(Command::Distill(DistillRequest {
                    from,
                    to,
                    pairs: form.pairs,
                    size: form.size,
                    steps: form.steps,
                    iterations: form.iterations,
                }));
            }
        }
    }

    /// Asks the worker for an instant result when the photo, the words or the generators
    /// changed and a generator makes the words' edit. Not while an edit runs: its result would
    /// be replaced.
    pub(super) fn request_instant(&mut self) {
        if !self.state.persisted.instant || self.state.in_flight.contains(&"edit") {
            return;
        }
        let Some(key) = self.state.instant_key() else {
            return;
        };
        if self.state.instant_asked.as_ref() == Some(&key) {
            return;
        }
        let generator = key.2.clone();
        self.state.instant_asked = Some(key);
        self.state.compare = CompareMode::Edited;
        self.send(Command::Apply { generator });
    }

    fn export(&mut self, overwrite: bool) {
        self.state.export.confirm_overwrite.clear();
        if self.state.result.is_none() {
            self.state
                .notify(true, "nothing to export yet: run an edit first");
            return;
        }
        let typed = PathBuf::from(self.state.export.path.trim());
        if typed.as_os_str().is_empty() {
            self.state
                .notify(true, "the Export path is empty: type a file name");
            return;
        }
        let (path, format) = match ExportFormat::resolve(&typed, self.state.persisted.export_format)
        {
            Ok(resolved) => resolved,
            Err(problem) => {
                self.state.notify(true, problem.to_string());
                return;
            }
        };
        self.state.export.path = path.display().to_string();
        let overlay = if self.state.export.overlay {
            self.view.overlay_image(&self.state)
        } else {
            None
        };
        let maps = if self.state.export.maps {
            self.view.token_maps(&self.state)
        } else {
            vec![]
        };
        let labels: Vec<String> = maps.iter().map(|(label, _)| label.clone()).collect();
        let targets = export_targets(&path, overlay.is_some(), &labels);
        if let Some(photo) = &self.state.photo {
            if targets.iter().any(|t| same_file(t, &photo.path)) {
                self.state.notify(
                    true,
                    "the export would write over the photo being edited: choose another name, \
                     the source is never overwritten",
                );
                return;
            }
        }
        let existing: Vec<PathBuf> = targets.into_iter().filter(|t| t.exists()).collect();
        if !existing.is_empty() && !overwrite {
            self.state.export.confirm_overwrite = existing;
            return;
        }
        self.state.job = Some(JobState::new("export"));
        self.send(Command::Export(ExportRequest {
            path,
            format,
            overwrite,
            overlay,
            maps,
        }));
    }
}

/// Why an edit cannot start yet, if it cannot.
fn run_blocker(state: &AppState) -> Option<&'static str> {
    if !matches!(state.model, ModelStatus::Ready(_)) {
        return Some("no model is loaded: choose a model folder or repo id in the Model panel");
    }
    if state.photo.is_none() {
        return Some("open a photo first (Ctrl+O, drop a file on the window, or type its path)");
    }
    if state.caption.trim().is_empty() {
        return Some("the caption is empty: describe the photo in a few words");
    }
    let words = !state.persisted.from.trim().is_empty() && !state.persisted.to.trim().is_empty();
    if !words && state.persisted.direction_file.trim().is_empty() {
        return Some("type the word in the photo and the word it should become");
    }
    None
}
