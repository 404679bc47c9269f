//! The app's plain data: what the panels read and write, and how worker events change it.
//! No tensors, no models, no drawing.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::heatmap::{Colormap, MapView, ResolutionFilter};
use crate::worker::{Event, ExportFormat, ModelInfo, StepAttention};

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
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OverlaySettings {
    /// Whether the heat map is drawn.
    pub enabled: bool,
    /// Token index into the caption's tokens.
    pub token: usize,
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
            token: 1,
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
}

impl Default for Persisted {
    fn default() -> Self {
        Self {
            model_spec: crate::engine::source::DEFAULT_MODEL.to_string(),
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
    /// What the user asked for ("edit", "open", "model", "export").
    pub kind: &'static str,
    /// The worker's current stage.
    pub stage: String,
    /// Steps done in this stage.
    pub step: usize,
    /// Steps in this stage.
    pub total: usize,
    /// The newest loss.
    pub loss: Option<f64>,
    /// When the stage started.
    pub stage_started: Instant,
    /// Whether the user asked it to stop.
    pub cancelling: bool,
}

impl JobState {
    /// A new job of `kind`.
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            stage: "starting".into(),
            step: 0,
            total: 0,
            loss: None,
            stage_started: Instant::now(),
            cancelling: false,
        }
    }

    /// Time left in this stage, from the average step time so far.
    pub fn time_left(&self) -> Option<Duration> {
        if self.step == 0 || self.total <= self.step {
            return None;
        }
        let per_step = self.stage_started.elapsed().as_secs_f64() / self.step as f64;
        Some(Duration::from_secs_f64(
            per_step * (self.total - self.step) as f64,
        ))
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
    /// Set when the path exists and the user must confirm.
    pub confirm_overwrite: bool,
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
    /// Reduced attention per step of the newest edit.
    pub attention: Vec<StepAttention>,
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
    /// Commands sent to the worker whose `Idle` has not come back.
    pub in_flight: usize,
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
            attention_revision: 0,
            compare: CompareMode::Edited,
            export: ExportForm {
                path: String::new(),
                overlay: false,
                maps: false,
                confirm_overwrite: false,
                written: vec![],
            },
            notices: vec![],
            frames: FrameStats::default(),
            dialog_unavailable: false,
            in_flight: 0,
        }
    }

    /// Whether the worker is running a command.
    pub fn busy(&self) -> bool {
        self.job.is_some()
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
                self.preview = None;
                self.attention.clear();
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
            Event::Captioned { caption } => {
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
                let job = self.job.get_or_insert_with(|| JobState::new("edit"));
                if job.stage != stage {
                    job.stage = stage;
                    job.stage_started = Instant::now();
                }
                job.step = step;
                job.total = total;
                job.loss = loss;
            }
            Event::Attention(step) => {
                if step.index == 0 {
                    self.attention.clear();
                }
                self.attention.push(step);
                self.attention_revision += 1;
            }
            Event::Preview { step, image } => {
                self.preview = Some((step, Arc::new(image)));
                self.image_revision += 1;
            }
            Event::Edited(result) => {
                let how = if result.reused_reference {
                    "re-edit from the session cache (inversion and reference pass skipped)"
                } else if result.inverted {
                    "first edit (inverted the photo, ran the reference pass)"
                } else {
                    "edit (inversion reused from the session cache)"
                };
                self.notify(
                    false,
                    format!("{how}: {:.1} s", result.elapsed.as_secs_f64()),
                );
                self.result = Some(ResultState {
                    image: Arc::new(result.image),
                    reconstruction: result.reconstruction.map(Arc::new),
                    inverted: result.inverted,
                    reused_reference: result.reused_reference,
                    elapsed: result.elapsed,
                    losses: result.losses,
                    record: result.record,
                });
                self.preview = None;
                self.image_revision += 1;
            }
            Event::Exported { paths } => {
                let first = paths
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                self.notify(false, format!("exported {} file(s): {first}", paths.len()));
                self.export.written = paths;
                self.export.confirm_overwrite = false;
            }
            Event::Cancelled => {
                self.notify(false, "cancelled: the last finished result is kept");
                self.preview = None;
                self.image_revision += 1;
            }
            Event::Error { message } => {
                self.notify(true, message);
            }
            Event::Idle => {
                // A cancelled edit's Idle must not end the edit queued behind it.
                self.in_flight = self.in_flight.saturating_sub(1);
                if self.in_flight == 0 {
                    self.job = None;
                    self.download = None;
                }
            }
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
        state.in_flight = 2;
        state.apply(Event::Progress {
            stage: "invert".into(),
            step: 2,
            total: 4,
            loss: None,
        });
        let job = state.job.as_ref().unwrap();
        assert_eq!((job.stage.as_str(), job.step, job.total), ("invert", 2, 4));
        assert!(job.time_left().is_some());
        // Two commands in flight: the first Idle leaves the second running.
        state.apply(Event::Idle);
        assert!(state.busy());
        state.apply(Event::Idle);
        assert!(!state.busy());
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
