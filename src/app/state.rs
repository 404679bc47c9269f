//! The app's plain data: what the panels read and write, and how worker events change it.
//! No tensors, no models, no drawing.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::heatmap::{Colormap, MapView, ResolutionFilter};
use super::panels::attention::token_label;
use crate::worker::{Event, ExportFormat, GeneratorInfo, ModelInfo, StepAttention, DEFAULT_MODEL};

/// Recent files kept in the Open menu.
pub const RECENT_FILES: usize = 8;

/// The knobs of an edit, as the sliders show them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sliders {
    /// Cross-attention guidance step λ_xa (the authors' 0.1 for real photos).
    pub lambda_xa: f64,
    /// Multiplier of Δc.
    pub strength: f64,
    /// CFG scale of the edited pass.
    pub guidance_scale: f64,
    /// DDIM steps of inversion and editing.
    pub steps: usize,
    /// Seed of the regularization's shifts and the sentence generator.
    pub seed: u64,
}

impl Default for Sliders {
    fn default() -> Self {
        Self {
            lambda_xa: 0.1,
            strength: 1.0,
            guidance_scale: 5.0,
            steps: 50,
            seed: 0,
        }
    }
}

/// How the overlay is drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OverlaySettings {
    /// Whether the heat map is drawn.
    pub enabled: bool,
    /// The caption token shown, as a person reads it (`cat`, `[start]`); remembered by its
    /// text so that it follows the word when the caption changes. Empty: the source word.
    pub token_word: String,
    /// Step to show; `None` follows the newest step.
    pub step: Option<usize>,
    /// Reference, edited or difference.
    pub view: MapView,
    /// Which resolutions are averaged.
    pub resolution: ResolutionFilter,
    /// Weight of the colour, `[0, 1]`.
    pub opacity: f32,
    /// Colour scale.
    pub colormap: Colormap,
}

impl Default for OverlaySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            token_word: String::new(),
            step: None,
            view: MapView::Reference,
            resolution: ResolutionFilter::All,
            opacity: 0.6,
            colormap: Colormap::Inferno,
        }
    }
}

/// What the canvas shows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum CompareMode {
    /// The edited image (or the newest preview while an edit runs).
    Edited,
    /// The photo as opened.
    Original,
    /// The photo left of the divider, the edit right of it; the divider at this fraction.
    Split(f32),
    /// The reference pass's image: what inversion reconstructs.
    Reconstruction,
}

/// Light or dark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThemeChoice {
    /// Dark panels.
    Dark,
    /// Light panels.
    Light,
}

/// Which side panels are shown; the canvas takes the room of a hidden one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PanelsShown {
    /// The controls on the left: model, photo, caption, words, edit.
    pub controls: bool,
    /// The inspector on the right: view, cross-attention, export.
    pub inspector: bool,
}

impl Default for PanelsShown {
    fn default() -> Self {
        Self {
            controls: true,
            inspector: true,
        }
    }
}

/// Everything that survives a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Persisted {
    /// Folder or repo id of the model.
    pub model_spec: String,
    /// Most recent first.
    pub recent: Vec<PathBuf>,
    /// Last source word.
    pub from: String,
    /// Last target word.
    pub to: String,
    /// A direction file to edit along instead of the words (empty: use the words).
    pub direction_file: String,
    /// Direction files used before, most recent first.
    pub recent_directions: Vec<PathBuf>,
    /// Slider values.
    pub sliders: Sliders,
    /// Working long side (`None`: the model's default).
    pub size: Option<usize>,
    /// Overlay settings.
    pub overlay: OverlaySettings,
    /// Export format.
    pub export_format: ExportFormat,
    /// Theme.
    pub theme: ThemeChoice,
    /// Which side panels are shown.
    pub panels: PanelsShown,
    /// Whether a distilled generator's result is shown as soon as the photo or words allow.
    pub instant: bool,
    /// The settings of *Distill this edit*.
    pub distill: DistillForm,
}

/// The settings of *Distill this edit*.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DistillForm {
    /// Pairs to make (a tenth held out).
    pub pairs: usize,
    /// Side of the pairs' images.
    pub size: usize,
    /// DDIM steps per pair.
    pub steps: usize,
    /// Training iterations.
    pub iterations: usize,
}

impl Default for DistillForm {
    fn default() -> Self {
        Self {
            pairs: 200,
            size: 256,
            steps: 20,
            iterations: 3000,
        }
    }
}

impl Default for Persisted {
    fn default() -> Self {
        Self {
            model_spec: DEFAULT_MODEL.to_string(),
            recent: vec![],
            from: "cat".into(),
            to: "dog".into(),
            direction_file: String::new(),
            recent_directions: vec![],
            sliders: Sliders::default(),
            size: None,
            overlay: OverlaySettings::default(),
            export_format: ExportFormat::Png,
            theme: ThemeChoice::Dark,
            panels: PanelsShown::default(),
            instant: true,
            distill: DistillForm::default(),
        }
    }
}

/// Where the model stands.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelStatus {
    /// Nothing asked yet.
    NotLoaded,
    /// Being found and loaded.
    Loading(String),
    /// Ready.
    Ready(ModelInfo),
    /// Not found or broken: what happened and the fix.
    Missing {
        /// Folder or repo id.
        spec: String,
        /// Where we looked and what to do.
        message: String,
        /// Whether a download would help.
        downloadable: bool,
    },
}

/// A download in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadState {
    /// The file.
    pub file: String,
    /// Bytes so far.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
    /// When this file started.
    pub started: Instant,
}

impl DownloadState {
    /// Bytes per second so far.
    pub fn speed(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }
}

/// The open photo.
#[derive(Debug, Clone)]
pub struct PhotoState {
    /// Its path.
    pub path: PathBuf,
    /// Its size on disk.
    pub original_size: (u32, u32),
    /// At working size.
    pub working: Arc<image::RgbImage>,
}

/// A command the worker is running.
#[derive(Debug, Clone)]
pub struct JobState {
    /// What the user asked for ("edit", "open", "model", "caption", "export").
    pub kind: &'static str,
    /// The worker's current stage; empty until the first progress report.
    pub stage: String,
    /// Steps done in this stage.
    pub step: usize,
    /// Steps in this stage.
    pub total: usize,
    /// The newest loss.
    pub loss: Option<f64>,
    /// When the last step of this stage was reported (or the stage started).
    last_step_at: Instant,
    /// How long the recent steps of this stage took, oldest first.
    step_times: VecDeque<Duration>,
    /// Whether the user asked it to stop.
    pub cancelling: bool,
}

impl JobState {
    /// Steps whose durations the time-left estimate looks at.
    const RECENT_STEPS: usize = 5;

    /// A new job of `kind`.
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            stage: String::new(),
            step: 0,
            total: 0,
            loss: None,
            last_step_at: Instant::now(),
            step_times: VecDeque::new(),
            cancelling: false,
        }
    }

    /// Records a progress report: a new stage restarts the step clock.
    pub fn report(&mut self, stage: String, step: usize, total: usize, loss: Option<f64>) {
        let now = Instant::now();
        if self.stage != stage {
            self.stage = stage;
            self.step_times.clear();
        } else if step > self.step {
            let per_step = (now - self.last_step_at) / (step - self.step) as u32;
            if self.step_times.len() == Self::RECENT_STEPS {
                self.step_times.pop_front();
            }
            self.step_times.push_back(per_step);
        }
        self.last_step_at = now;
        self.step = step;
        self.total = total;
        self.loss = loss;
    }

    /// Time left in this stage: the median of the recent steps' durations times the steps left.
    /// The median ignores a step that also decoded a preview. `None` before a step was timed,
    /// and while the job is stopping (the remaining steps will not run).
    pub fn time_left(&self) -> Option<Duration> {
        if self.cancelling || self.step_times.is_empty() || self.total <= self.step {
            return None;
        }
        let mut recent: Vec<Duration> = self.step_times.iter().copied().collect();
        recent.sort();
        Some(recent[recent.len() / 2] * (self.total - self.step) as u32)
    }
}

/// The newest edit.
#[derive(Debug, Clone)]
pub struct ResultState {
    /// The edited image at working size.
    pub image: Arc<image::RgbImage>,
    /// The reconstruction, when there is one.
    pub reconstruction: Option<Arc<image::RgbImage>>,
    /// Whether this edit inverted the photo (false: reused the session).
    pub inverted: bool,
    /// Whether the reference maps came from the cache.
    pub reused_reference: bool,
    /// Wall time.
    pub elapsed: Duration,
    /// Loss per step.
    pub losses: Vec<f64>,
    /// The parameters.
    pub record: serde_json::Value,
    /// The generator that made it, for an instant result.
    pub instant: Option<GeneratorInfo>,
}

/// A line in the message area.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// Whether it reports a failure.
    pub error: bool,
    /// The text.
    pub text: String,
}

/// The export form.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportForm {
    /// Target path, as typed.
    pub path: String,
    /// Also write the overlay image.
    pub overlay: bool,
    /// Also write one gray image per caption token.
    pub maps: bool,
    /// The existing files the export would replace: while not empty, the user must confirm.
    pub confirm_overwrite: Vec<PathBuf>,
    /// Files the last export wrote.
    pub written: Vec<PathBuf>,
}

/// Frame times of the UI thread's own work, for the status bar and for reports.
#[derive(Debug, Clone, Default)]
pub struct FrameStats {
    /// Recent frames, milliseconds.
    pub recent: VecDeque<f32>,
    /// Every frame drawn while the worker was busy, milliseconds.
    pub busy: Vec<f32>,
}

impl FrameStats {
    /// Frames kept in `recent`.
    const WINDOW: usize = 120;

    /// Records one frame.
    pub fn record(&mut self, ms: f32, busy: bool) {
        if self.recent.len() == Self::WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(ms);
        if busy {
            self.busy.push(ms);
        }
    }

    /// `(mean, 95th percentile, max)` of `samples`, milliseconds.
    pub fn summary(samples: &[f32]) -> Option<(f32, f32, f32)> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let mean = sorted.iter().sum::<f32>() / sorted.len() as f32;
        let p95 = sorted[((sorted.len() - 1) as f32 * 0.95).round() as usize];
        Some((mean, p95, *sorted.last().expect("not empty")))
    }
}

/// The whole app state.
#[derive(Debug, Clone)]
pub struct AppState {
    /// What survives restarts.
    pub persisted: Persisted,
    /// The model's status.
    pub model: ModelStatus,
    /// A download in flight.
    pub download: Option<DownloadState>,
    /// The path field of the Open panel.
    pub open_path: String,
    /// The open photo.
    pub photo: Option<PhotoState>,
    /// Bumped whenever the displayed base image may change.
    pub image_revision: u64,
    /// The caption (BLIP's, or typed).
    pub caption: String,
    /// Why there is no BLIP caption, when there is none.
    pub caption_note: Option<String>,
    /// The caption's CLIP tokens and the caption they belong to.
    pub tokens: (String, Vec<String>),
    /// Words with cached embeddings, offered as targets.
    pub known_words: Vec<String>,
    /// The running command.
    pub job: Option<JobState>,
    /// The newest edit.
    pub result: Option<ResultState>,
    /// The newest preview during an edit: `(step, image)`.
    pub preview: Option<(usize, Arc<image::RgbImage>)>,
    /// Reduced attention per step: of the shown result, or of the running edit as it arrives.
    pub attention: Vec<StepAttention>,
    /// The shown result's maps while a running edit's replace them in `attention`; put back
    /// if that edit is cancelled or fails, so that the overlay always matches the image.
    kept_attention: Option<Vec<StepAttention>>,
    /// Bumped whenever `attention` changes.
    pub attention_revision: u64,
    /// The canvas mode.
    pub compare: CompareMode,
    /// The export form.
    pub export: ExportForm,
    /// Messages, newest last.
    pub notices: Vec<Notice>,
    /// UI frame times.
    pub frames: FrameStats,
    /// Whether the native file dialog failed to appear (then only the path field works).
    pub dialog_unavailable: bool,
    /// The kinds of the commands sent to the worker whose `Idle` has not come back, oldest
    /// (the one running) first.
    pub in_flight: VecDeque<&'static str>,
    /// The user's distilled generators.
    pub generators: Vec<GeneratorInfo>,
    /// The generator path field of the Instant panel.
    pub generator_path: String,
    /// What the last instant result was asked for: (photo, working size, generator).
    pub instant_asked: Option<(PathBuf, (u32, u32), PathBuf)>,
    /// Whether the *Distill this edit* form is open.
    pub distill_open: bool,
    /// The parameters of the last diffusion edit of this photo, which the worker's session
    /// cache holds (an instant result shown since does not change it).
    pub session_record: Option<serde_json::Value>,
}

impl AppState {
    /// A fresh state from persisted settings.
    pub fn new(persisted: Persisted) -> Self {
        Self {
            persisted,
            model: ModelStatus::NotLoaded,
            download: None,
            open_path: String::new(),
            photo: None,
            image_revision: 0,
            caption: String::new(),
            caption_note: None,
            tokens: (String::new(), vec![]),
            known_words: vec![],
            job: None,
            result: None,
            preview: None,
            attention: vec![],
            kept_attention: None,
            attention_revision: 0,
            compare: CompareMode::Edited,
            export: ExportForm {
                path: String::new(),
                overlay: false,
                maps: false,
                confirm_overwrite: vec![],
                written: vec![],
            },
            notices: vec![],
            frames: FrameStats::default(),
            dialog_unavailable: false,
            in_flight: VecDeque::new(),
            generators: vec![],
            generator_path: String::new(),
            instant_asked: None,
            distill_open: false,
            session_record: None,
        }
    }

    /// The generator that makes the words' edit, if the user has one.
    pub fn matching_generator(&self) -> Option<&GeneratorInfo> {
        let p = &self.persisted;
        self.generators
            .iter()
            .rev()
            .find(|g| g.makes(&p.from, &p.to))
    }

    /// What an instant result now would be of: (photo, working size, generator), when the
    /// photo is open and a generator makes the words' edit.
    pub fn instant_key(&self) -> Option<(PathBuf, (u32, u32), PathBuf)> {
        let photo = self.photo.as_ref()?;
        let generator = self.matching_generator()?;
        Some((
            photo.path.clone(),
            photo.working.dimensions(),
            generator.path.clone(),
        ))
    }

    /// Whether the worker is running a command.
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// Removes the error messages: the action that caused them succeeded, or another started.
    pub fn clear_errors(&mut self) {
        self.notices.retain(|n| !n.error);
    }

    /// Whether the running command is an edit that a newer edit replaces: its progress and
    /// previews are not shown, and its cancel is a restart, not the user's.
    fn running_superseded_edit(&self) -> bool {
        self.in_flight.front() == Some(&"edit")
            && self.in_flight.iter().skip(1).any(|k| *k == "edit")
    }

    /// Adds a message.
    pub fn notify(&mut self, error: bool, text: impl Into<String>) {
        self.notices.push(Notice {
            error,
            text: text.into(),
        });
        if self.notices.len() > 20 {
            self.notices.remove(0);
        }
    }

    /// Whether the tokens belong to the current caption.
    pub fn tokens_current(&self) -> bool {
        self.tokens.0 == self.caption
    }

    /// The caption's tokens, when they belong to the current caption.
    pub fn current_tokens(&self) -> &[String] {
        if self.tokens_current() {
            &self.tokens.1
        } else {
            &[]
        }
    }

    /// The key position of the overlay's token: the remembered word, else the source word, else
    /// the caption's first word. `None` before the caption's tokens arrived.
    pub fn overlay_token(&self) -> Option<usize> {
        let tokens = self.current_tokens();
        let find = |word: &str| tokens.iter().position(|t| token_label(t) == word);
        let source = self.persisted.from.trim().to_lowercase();
        find(&self.persisted.overlay.token_word)
            .or_else(|| find(&source))
            .or_else(|| (!tokens.is_empty()).then(|| 1.min(tokens.len() - 1)))
    }

    /// The working long side the next edit runs at: the chosen size, else the model's.
    pub fn working_side(&self) -> Option<usize> {
        self.persisted.size.or(match &self.model {
            ModelStatus::Ready(info) => Some(info.default_side),
            _ => None,
        })
    }

    /// The step the overlay shows: the chosen one, else the newest.
    pub fn overlay_step(&self) -> Option<&StepAttention> {
        match self.persisted.overlay.step {
            Some(i) => self.attention.get(i).or(self.attention.last()),
            None => self.attention.last(),
        }
    }

    /// A default export path beside the photo: `<stem>-<to>.<ext>`.
    pub fn default_export_path(&self) -> Option<PathBuf> {
        let photo = self.photo.as_ref()?;
        let stem = photo.path.file_stem()?.to_string_lossy();
        let word: String = self
            .persisted
            .to
            .chars()
            .filter(|c| c.is_alphanumeric())
            .collect();
        let name = format!(
            "{stem}-{}.{}",
            if word.is_empty() { "edit" } else { &word },
            self.persisted.export_format.extension()
        );
        Some(photo.path.with_file_name(name))
    }

    /// Applies one worker event.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::ModelLoading { spec } => {
                self.model = ModelStatus::Loading(spec);
            }
            Event::Download { file, done, total } => {
                let same = self.download.as_ref().is_some_and(|d| d.file == file);
                if !same {
                    self.download = Some(DownloadState {
                        file: file.clone(),
                        done: 0,
                        total,
                        started: Instant::now(),
                    });
                }
                if let Some(d) = &mut self.download {
                    d.done = done;
                    d.total = total;
                }
            }
            Event::ModelReady(info) => {
                self.clear_errors();
                self.download = None;
                self.persisted.model_spec = info.spec.clone();
                self.model = ModelStatus::Ready(info);
            }
            Event::ModelMissing {
                spec,
                message,
                downloadable,
            } => {
                self.download = None;
                self.model = ModelStatus::Missing {
                    spec,
                    message,
                    downloadable,
                };
            }
            Event::Opened(opened) => {
                self.clear_errors();
                let recent = &mut self.persisted.recent;
                recent.retain(|p| p != &opened.path);
                recent.insert(0, opened.path.clone());
                recent.truncate(RECENT_FILES);
                self.open_path = opened.path.display().to_string();
                self.photo = Some(PhotoState {
                    path: opened.path,
                    original_size: opened.original_size,
                    working: Arc::new(opened.working),
                });
                self.result = None;
                self.instant_asked = None;
                self.session_record = None;
                self.preview = None;
                self.attention.clear();
                self.kept_attention = None;
                self.attention_revision += 1;
                self.image_revision += 1;
                // The old photo's caption would condition the new one's inversion.
                self.caption.clear();
                self.caption_note = None;
                self.compare = CompareMode::Edited;
                self.export.written.clear();
                self.export.path = self
                    .default_export_path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
            }
            Event::Resized(resized) => {
                // Same photo, new working size: keep everything the user set and sees.
                if let Some(photo) = &mut self.photo {
                    photo.working = Arc::new(resized.working);
                    self.image_revision += 1;
                }
            }
            Event::KnownWords(words) => self.known_words = words,
            Event::Captioned { caption } => {
                self.clear_errors();
                self.caption = caption;
                self.caption_note = None;
            }
            Event::CaptionUnavailable { message } => {
                self.caption_note = Some(message);
            }
            Event::Tokens { caption, tokens } => {
                self.tokens = (caption, tokens);
            }
            Event::Progress {
                stage,
                step,
                total,
                loss,
            } => {
                if !self.running_superseded_edit() {
                    let job = self.job.get_or_insert_with(|| JobState::new("edit"));
                    job.report(stage, step, total, loss);
                }
            }
            Event::Attention(step) => {
                if step.index == 0 {
                    let shown = std::mem::take(&mut self.attention);
                    self.kept_attention.get_or_insert(shown);
                }
                self.attention.push(step);
                self.attention_revision += 1;
            }
            Event::Preview { step, image } => {
                if !self.running_superseded_edit() {
                    self.preview = Some((step, Arc::new(image)));
                    self.image_revision += 1;
                }
            }
            Event::Generators(list) => self.generators = list,
            Event::GeneratorAdded(info) => {
                self.clear_errors();
                self.notify(
                    false,
                    format!(
                        "generator {} ready: {}",
                        info.edit_name(),
                        info.path.display()
                    ),
                );
            }
            Event::Edited(result) => {
                let how: String = if let Some(generator) = &result.instant {
                    format!("instant result of the {} generator", generator.edit_name())
                } else if result.reused_reference {
                    "re-edit from the session cache (inversion and reference pass skipped)".into()
                } else if result.inverted {
                    "first edit (inverted the photo, ran the reference pass)".into()
                } else {
                    "edit (inversion reused from the session cache)".into()
                };
                self.clear_errors();
                self.notify(
                    false,
                    if result.instant.is_some() {
                        format!("{how}: {:.0} ms", result.elapsed.as_secs_f64() * 1e3)
                    } else {
                        format!("{how}: {:.1} s", result.elapsed.as_secs_f64())
                    },
                );
                self.kept_attention = None;
                if result.instant.is_none() {
                    // A diffusion result of this photo is not replaced by an instant one.
                    self.instant_asked = self.instant_key();
                    self.session_record = Some(result.record.clone());
                } else {
                    // The maps shown belong to a diffusion edit, not to this image.
                    self.attention.clear();
                    self.attention_revision += 1;
                }
                self.result = Some(ResultState {
                    image: Arc::new(result.image),
                    reconstruction: result.reconstruction.map(Arc::new),
                    inverted: result.inverted,
                    reused_reference: result.reused_reference,
                    elapsed: result.elapsed,
                    losses: result.losses,
                    record: result.record,
                    instant: result.instant,
                });
                self.preview = None;
                self.image_revision += 1;
            }
            Event::Exported { paths } => {
                let first = paths
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                self.clear_errors();
                self.notify(false, format!("exported {} file(s): {first}", paths.len()));
                self.export.written = paths;
                self.export.confirm_overwrite.clear();
            }
            Event::Cancelled => {
                if !self.running_superseded_edit() {
                    let kept = if self.result.is_some() {
                        "the last finished result is kept"
                    } else {
                        "there is no finished result yet"
                    };
                    self.notify(false, format!("cancelled: {kept}"));
                }
                self.discard_running_edit();
            }
            Event::Error { message } => {
                self.notify(true, message);
                self.discard_running_edit();
            }
            Event::Idle => {
                // A cancelled edit's Idle must not end the edit queued behind it.
                self.in_flight.pop_front();
                if self.in_flight.is_empty() {
                    self.job = None;
                    self.download = None;
                }
            }
        }
    }
}

impl AppState {
    /// Drops what a cancelled or failed edit left: its preview and its maps, so the canvas and
    /// the overlay show the last finished result again.
    fn discard_running_edit(&mut self) {
        if self.preview.take().is_some() {
            self.image_revision += 1;
        }
        if let Some(kept) = self.kept_attention.take() {
            self.attention = kept;
            self.attention_revision += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_summary_reports_mean_p95_and_max() {
        let samples: Vec<f32> = (1..=100).map(|v| v as f32).collect();
        let (mean, p95, max) = FrameStats::summary(&samples).unwrap();
        assert!((mean - 50.5).abs() < 1e-4);
        assert_eq!((p95, max), (95.0, 100.0));
        assert!(FrameStats::summary(&[]).is_none());
    }

    #[test]
    fn progress_resets_the_stage_clock_and_the_last_idle_ends_the_job() {
        let mut state = AppState::new(Persisted::default());
        state.job = Some(JobState::new("edit"));
        state.in_flight = ["open", "edit"].into();
        for step in 1..=2 {
            state.apply(Event::Progress {
                stage: "invert".into(),
                step,
                total: 4,
                loss: None,
            });
        }
        let job = state.job.as_ref().unwrap();
        assert_eq!((job.stage.as_str(), job.step, job.total), ("invert", 2, 4));
        assert!(job.time_left().is_some());
        // Two commands in flight: the first Idle leaves the second running.
        state.apply(Event::Idle);
        assert!(state.busy());
        state.apply(Event::Idle);
        assert!(!state.busy());
    }

    fn step_maps(index: usize, value: f32) -> StepAttention {
        StepAttention {
            index,
            total: 2,
            timestep: 900 - index,
            grids: vec![crate::worker::AttentionGrid {
                height: 1,
                width: 1,
                layers: 1,
                tokens: 1,
                reference: vec![value],
                edited: None,
            }],
        }
    }

    fn progress(step: usize) -> Event {
        Event::Progress {
            stage: "edit".into(),
            step,
            total: 10,
            loss: None,
        }
    }

    #[test]
    fn a_replaced_edits_progress_and_previews_are_not_shown() {
        let mut state = AppState::new(Persisted::default());
        // Edit A runs; the user moved a slider, so edit B waits behind it.
        state.in_flight = ["edit", "edit"].into();
        state.job = Some(JobState::new("edit"));
        state.apply(progress(4));
        state.apply(Event::Preview {
            step: 4,
            image: image::RgbImage::new(2, 2),
        });
        assert_eq!(state.job.as_ref().unwrap().step, 0, "A's step 4 is not B's");
        assert!(state.preview.is_none());
        state.apply(Event::Cancelled);
        assert!(
            state.notices.is_empty(),
            "a restart is not the user's cancel"
        );
        state.apply(Event::Idle);
        // Now B runs, and its progress shows.
        state.apply(progress(1));
        assert_eq!(state.job.as_ref().unwrap().step, 1);
    }

    #[test]
    fn a_cancelled_edit_leaves_the_maps_of_the_image_shown() {
        let mut state = AppState::new(Persisted::default());
        state.in_flight = ["edit"].into();
        for i in 0..2 {
            state.apply(Event::Attention(step_maps(i, 0.25)));
        }
        let finished = state.attention.clone();
        state.apply(Event::Edited(crate::worker::EditResult {
            image: image::RgbImage::new(2, 2),
            reconstruction: None,
            inverted: true,
            reused_reference: false,
            losses: vec![0.0, 0.0],
            elapsed: Duration::from_secs(1),
            record: serde_json::json!({}),
            instant: None,
        }));
        state.apply(Event::Idle);
        // A re-edit starts, shows its first step live, and is cancelled.
        state.in_flight = ["edit"].into();
        state.apply(Event::Attention(step_maps(0, 0.75)));
        assert_eq!(
            state.attention,
            vec![step_maps(0, 0.75)],
            "live maps while it runs"
        );
        let revision = state.attention_revision;
        state.apply(Event::Cancelled);
        assert_eq!(
            state.attention, finished,
            "the finished result's maps are back"
        );
        assert!(state.attention_revision > revision, "the overlay redraws");
        assert!(state
            .notices
            .last()
            .unwrap()
            .text
            .contains("result is kept"));
    }

    #[test]
    fn the_overlay_token_follows_its_word_into_a_new_caption() {
        let mut state = AppState::new(Persisted::default());
        let tokens = |caption: &str| -> (String, Vec<String>) {
            let mut tokens = vec!["<|startoftext|>".to_string()];
            tokens.extend(caption.split(' ').map(|w| format!("{w}</w>")));
            tokens.push("<|endoftext|>".into());
            (caption.to_string(), tokens)
        };
        state.caption = "a cat on a sofa".into();
        state.tokens = tokens(&state.caption);
        assert_eq!(state.overlay_token(), Some(2), "the source word by default");
        state.persisted.overlay.token_word = "sofa".into();
        assert_eq!(state.overlay_token(), Some(5));
        state.caption = "a small cat on a big sofa".into();
        state.tokens = tokens(&state.caption);
        assert_eq!(state.overlay_token(), Some(7), "still the sofa");
        state.caption = "a cat".into();
        assert_eq!(
            state.overlay_token(),
            None,
            "no tokens for this caption yet"
        );
    }

    #[test]
    fn time_left_comes_from_step_times_and_is_not_shown_while_stopping() {
        let mut job = JobState::new("edit");
        assert!(job.time_left().is_none(), "no step timed yet");
        for step in 1..=3 {
            std::thread::sleep(Duration::from_millis(5));
            job.report("edit".into(), step, 10, None);
        }
        let left = job.time_left().unwrap();
        assert!(left >= Duration::from_millis(5 * 7), "{left:?}");
        job.cancelling = true;
        assert!(job.time_left().is_none());
    }

    #[test]
    fn default_export_path_sits_beside_the_photo() {
        let mut state = AppState::new(Persisted::default());
        state.photo = Some(PhotoState {
            path: PathBuf::from("/photos/chelsea.png"),
            original_size: (4, 4),
            working: Arc::new(image::RgbImage::new(4, 4)),
        });
        state.persisted.to = "dog".into();
        assert_eq!(
            state.default_export_path().unwrap(),
            PathBuf::from("/photos/chelsea-dog.png")
        );
    }
}
