//! The desktop editor: an eframe app that never touches a model.
//!
//! Each frame it drains the worker's events into [`state::AppState`], draws the panels (which
//! push [`commands::AppCommand`]s), and carries the commands out in one place
//! ([`P2pzApp::execute`]). The worker thread ([`crate::worker`]) owns the models and the session
//! cache and wakes the UI when an event arrives.

pub mod commands;
pub mod dialogs;
pub mod dump;
pub mod heatmap;
pub mod overlay;
pub mod panels;
pub mod state;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use commands::AppCommand;
use dialogs::{DialogPurpose, Dialogs};
use panels::canvas::CanvasView;
use state::{AppState, Persisted, ThemeChoice};

use crate::worker::{Worker, WorkerConfig};

/// The window title and the key of persisted settings.
pub const APP_NAME: &str = "pix2pix-zero";

/// The window's inner size at first start, in points.
pub const DEFAULT_WINDOW: [f32; 2] = [1360.0, 820.0];

/// How the app starts.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// A photo to open at start.
    pub image: Option<PathBuf>,
    /// A model to load at start (else the persisted one); looked up locally, never downloaded
    /// without a click.
    pub model: Option<String>,
    /// The caption to use instead of BLIP's.
    pub caption: Option<String>,
    /// Source word.
    pub from: Option<String>,
    /// Target word.
    pub to: Option<String>,
    /// DDIM steps.
    pub steps: Option<usize>,
    /// Working long side (a multiple of 64).
    pub size: Option<usize>,
    /// Run the edit as soon as the photo, caption and model are ready.
    pub run: bool,
    /// Show the overlay of this caption token (by its text, e.g. `cat`).
    pub overlay_token: Option<String>,
    /// Which pass the overlay shows.
    pub overlay_view: Option<heatmap::MapView>,
    /// What the canvas shows.
    pub compare: Option<state::CompareMode>,
    /// Light or dark.
    pub theme: Option<ThemeChoice>,
    /// Take a screenshot of the window here once the app is settled, then quit.
    pub screenshot: Option<PathBuf>,
    /// Write a JSON picture of the state here whenever it changes, for scripted checks.
    pub state_dump: Option<PathBuf>,
    /// The window's inner size in points (`None`: the default, or the last one used).
    pub window_size: Option<[f32; 2]>,
    /// Use persisted settings (off in tests).
    pub persist: bool,
    /// The worker's configuration.
    pub worker: WorkerConfig,
}

impl AppOptions {
    /// Defaults for a user's machine: BLIP from the hub cache, the default embedding cache.
    pub fn new(worker: WorkerConfig) -> Self {
        Self {
            image: None,
            model: None,
            caption: None,
            from: None,
            to: None,
            steps: None,
            size: None,
            run: false,
            overlay_token: None,
            overlay_view: None,
            compare: None,
            theme: None,
            screenshot: None,
            state_dump: None,
            window_size: None,
            persist: true,
            worker,
        }
    }
}

/// Where the scripted start (`--run`, `--screenshot`) stands.
#[derive(Debug, Default)]
struct Script {
    ran: bool,
    settled_frames: usize,
    screenshot_requested: bool,
    screenshot_done: Arc<AtomicBool>,
}

/// The eframe app.
pub struct P2pzApp {
    /// The state the panels draw.
    pub state: AppState,
    /// The canvas's textures and caches.
    pub view: CanvasView,
    worker: Worker,
    dialogs: Dialogs,
    options: AppOptions,
    script: Script,
    /// Commands produced outside the panels (dialog answers), run next frame.
    pending: Vec<AppCommand>,
    /// The last state picture written to `options.state_dump`.
    last_dump: String,
}

impl std::fmt::Debug for P2pzApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2pzApp").finish_non_exhaustive()
    }
}

/// Applies a theme to the context.
pub fn apply_theme(ctx: &egui::Context, theme: ThemeChoice) {
    ctx.set_theme(match theme {
        ThemeChoice::Dark => egui::Theme::Dark,
        ThemeChoice::Light => egui::Theme::Light,
    });
}

impl P2pzApp {
    /// Builds the app: restores settings, installs the GPU overlay when wgpu renders, starts
    /// the worker and asks it for the model (and the photo, when one was given).
    pub fn new(cc: &eframe::CreationContext<'_>, options: AppOptions) -> Self {
        let persisted: Persisted = match (options.persist, cc.storage) {
            (true, Some(storage)) => {
                eframe::get_value(storage, eframe::APP_KEY).unwrap_or_default()
            }
            _ => Persisted::default(),
        };
        let mut state = AppState::new(persisted);
        let p = &mut state.persisted;
        if let Some(model) = &options.model {
            p.model_spec = model.clone();
        }
        if let Some(from) = &options.from {
            p.from = from.clone();
        }
        if let Some(to) = &options.to {
            p.to = to.clone();
        }
        if let Some(steps) = options.steps {
            p.sliders.steps = steps;
        }
        if let Some(size) = options.size {
            p.size = Some(size);
        }
        if let Some(view) = options.overlay_view {
            p.overlay.view = view;
        }
        if let Some(token) = &options.overlay_token {
            p.overlay.token_word = token.clone();
        }
        if let Some(theme) = options.theme {
            p.theme = theme;
        }
        if let Some(compare) = options.compare {
            state.compare = compare;
        }
        apply_theme(&cc.egui_ctx, state.persisted.theme);

        let mut view = CanvasView::default();
        if let Some(render_state) = &cc.wgpu_render_state {
            overlay::install(render_state);
            view.gpu_overlay = true;
        }
        let ctx = cc.egui_ctx.clone();
        let worker = Worker::spawn(options.worker.clone(), move || ctx.request_repaint())
            .expect("the worker thread starts");
        let mut app = Self {
            state,
            view,
            worker,
            dialogs: Dialogs::default(),
            options,
            script: Script::default(),
            pending: vec![],
            last_dump: String::new(),
        };
        app.execute(
            AppCommand::LoadModel {
                allow_download: false,
            },
            &cc.egui_ctx,
        );
        app.send(crate::worker::Command::ListGenerators);
        if let Some(image) = app.options.image.clone() {
            app.execute(AppCommand::OpenPath(image), &cc.egui_ctx);
        }
        app
    }

    /// Drains worker events and dialog answers into the state.
    fn poll(&mut self) {
        while let Some(event) = self.worker.try_recv() {
            let captioned = matches!(event, crate::worker::Event::Captioned { .. });
            let idle = matches!(event, crate::worker::Event::Idle);
            self.state.apply(event);
            if captioned {
                if let Some(caption) = &self.options.caption {
                    self.state.caption = caption.clone();
                }
            }
            if idle && !self.state.tokens_current() && !self.state.caption.trim().is_empty() {
                self.send(crate::worker::Command::Tokenize {
                    caption: self.state.caption.clone(),
                });
            }
        }
        while let Some(answer) = self.dialogs.poll() {
            if answer.unavailable {
                self.state.dialog_unavailable = true;
                self.state.notify(
                    true,
                    "no file dialog could be shown (no desktop portal or zenity): type the path \
                     in the field, or drop the file on the window",
                );
            }
            let Some(path) = answer.path else { continue };
            match answer.purpose {
                DialogPurpose::OpenImage => self.state.open_path = path.display().to_string(),
                DialogPurpose::ModelFolder => {
                    self.state.persisted.model_spec = path.display().to_string()
                }
                DialogPurpose::ExportPath => self.state.export.path = path.display().to_string(),
                DialogPurpose::Generator => self.state.generator_path = path.display().to_string(),
            }
            self.state.export.confirm_overwrite.clear();
            match answer.purpose {
                DialogPurpose::OpenImage => self.pending.push(AppCommand::OpenPath(path)),
                DialogPurpose::ModelFolder => self.pending.push(AppCommand::LoadModel {
                    allow_download: false,
                }),
                DialogPurpose::ExportPath => {}
                DialogPurpose::Generator => self.pending.push(AppCommand::ImportGenerator),
            }
        }
    }
}

impl P2pzApp {
    /// Drives a scripted start: run once ready, pick the overlay token, take the screenshot.
    fn script_step(&mut self, ctx: &egui::Context) {
        let ready = matches!(self.state.model, state::ModelStatus::Ready(_))
            && self.state.photo.is_some()
            && !self.state.busy();
        if let Some(caption) = &self.options.caption {
            if ready && self.state.caption != *caption && self.state.result.is_none() {
                self.state.caption = caption.clone();
            }
        }
        if self.options.run && !self.script.ran && ready && !self.state.caption.trim().is_empty() {
            self.script.ran = true;
            self.execute(AppCommand::Run, ctx);
        }
        let Some(path) = self.options.screenshot.clone() else {
            return;
        };
        if self.script.screenshot_done.load(Ordering::Relaxed) {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            return;
        }
        let settled = !self.state.busy()
            && self.state.in_flight.is_empty()
            && self.state.photo.is_some()
            && (!self.options.run
                || self.state.result.is_some()
                || self.state.notices.iter().any(|n| n.error));
        // Worker events wake the UI; only the countdown below needs frames of its own.
        if !settled || self.script.screenshot_requested {
            return;
        }
        if let Some(compare) = self.options.compare {
            self.state.compare = compare;
        }
        self.script.settled_frames += 1;
        ctx.request_repaint();
        if self.script.settled_frames < 5 {
            return;
        }
        self.script.screenshot_requested = true;
        let done = self.script.screenshot_done.clone();
        let repaint = ctx.clone();
        ctx.request_screenshot(move |image| {
            let rgba = image::RgbaImage::from_raw(
                image.size[0] as u32,
                image.size[1] as u32,
                image.pixels.iter().flat_map(|c| c.to_array()).collect(),
            );
            match rgba {
                Some(rgba) => {
                    let mut bytes = Vec::new();
                    let written = rgba
                        .write_to(
                            &mut std::io::Cursor::new(&mut bytes),
                            image::ImageFormat::Png,
                        )
                        .map_err(anyhow::Error::from)
                        .and_then(|_| crate::export::write_atomically(&path, &bytes));
                    match written {
                        Ok(()) => eprintln!("screenshot: {}", path.display()),
                        Err(error) => eprintln!("screenshot failed: {error:#}"),
                    }
                }
                None => eprintln!("screenshot failed: the image had an unexpected size"),
            }
            done.store(true, Ordering::Relaxed);
            repaint.request_repaint();
        });
    }

    fn menu_bar(&mut self, ui: &mut egui::Ui, commands: &mut Vec<AppCommand>) {
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("File", |ui| {
                if ui.button("Open…  (Ctrl+O)").clicked() {
                    commands.push(AppCommand::PickImage);
                }
                if ui.button("Export  (Ctrl+S)").clicked() {
                    commands.push(AppCommand::Export { overwrite: false });
                }
                if ui.button("Quit").clicked() {
                    ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
                }
            });
            ui.menu_button("View", |ui| {
                if ui.button("Light theme").clicked() {
                    commands.push(AppCommand::SetTheme(ThemeChoice::Light));
                }
                if ui.button("Dark theme").clicked() {
                    commands.push(AppCommand::SetTheme(ThemeChoice::Dark));
                }
                ui.checkbox(&mut self.view.actual_size, "Actual pixels");
                ui.separator();
                let panels = self.state.persisted.panels;
                if ui
                    .checkbox(&mut { panels.controls }, "Controls panel")
                    .clicked()
                {
                    commands.push(AppCommand::ToggleControls);
                }
                if ui
                    .checkbox(&mut { panels.inspector }, "Inspector panel")
                    .clicked()
                {
                    commands.push(AppCommand::ToggleInspector);
                }
            });
            ui.menu_button("Help", |ui| {
                for (shortcut, _, what) in commands::shortcuts() {
                    ui.label(format!("{}: {what}", ui.ctx().format_shortcut(&shortcut)));
                }
            });
        });
    }

    /// `(mean, p95, max)` milliseconds and the count of the frames drawn while the worker was
    /// busy, for reports.
    pub fn busy_frame_summary(&self) -> Option<(f32, f32, f32, usize)> {
        let busy = &self.state.frames.busy;
        state::FrameStats::summary(busy).map(|(mean, p95, max)| (mean, p95, max, busy.len()))
    }
}

impl eframe::App for P2pzApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let started = Instant::now();
        let ctx = ui.ctx().clone();
        self.poll();
        self.request_instant();
        let mut commands = std::mem::take(&mut self.pending);
        let dropped = ctx.input(|i| i.raw.dropped_files.first().map(|f| f.path().to_path_buf()));
        if let Some(path) = dropped {
            commands.push(AppCommand::OpenPath(path));
        }
        for (shortcut, command, _) in commands::shortcuts() {
            if ctx.input_mut(|i| i.consume_shortcut(&shortcut)) {
                commands.push(command);
            }
        }
        egui::Panel::top("menu").show(ui, |ui| self.menu_bar(ui, &mut commands));
        egui::Panel::bottom("status").show(ui, |ui| {
            panels::progress::show(ui, &mut self.state, &mut commands)
        });
        // Side panels take at most a third of the window each, so the canvas keeps most of it;
        // each can be resized, dragged shut, or hidden from the View menu.
        let width = ui.max_rect().width();
        let side = |share: f32, widest: f32| (width * share).clamp(220.0, widest);
        let mut shown = self.state.persisted.panels;
        egui::Panel::left("controls")
            .resizable(true)
            .default_size(side(0.22, 340.0))
            .size_range(200.0..=side(0.34, 520.0))
            .show_collapsible(ui, &mut shown.controls, |ui| {
                // What a person scrubs, and Run, stay in view; the rest scrolls above them.
                egui::Panel::bottom("edit")
                    .show_separator_line(true)
                    .show(ui, |ui| {
                        ui.add_space(4.0);
                        panels::sliders::show(ui, &mut self.state, &mut commands);
                        panels::sliders::run_row(ui, &self.state, &mut commands);
                        ui.add_space(2.0);
                    });
                egui::ScrollArea::vertical().show(ui, |ui| {
                    panels::model::show(ui, &mut self.state, &mut commands);
                    ui.separator();
                    panels::photo::show(ui, &mut self.state, &mut commands);
                    ui.separator();
                    panels::words::show(ui, &mut self.state, &mut commands);
                    ui.separator();
                    panels::instant::show(ui, &mut self.state, &mut commands);
                });
            });
        egui::Panel::right("inspect")
            .resizable(true)
            .default_size(side(0.20, 320.0))
            .size_range(200.0..=side(0.34, 520.0))
            .show_collapsible(ui, &mut shown.inspector, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    panels::attention::show(ui, &mut self.state);
                    ui.separator();
                    panels::export::show(ui, &mut self.state, &mut commands);
                });
            });
        // A panel dragged shut stays shut, like one hidden from the View menu.
        self.state.persisted.panels = shown;
        egui::CentralPanel::default().show(ui, |ui| {
            self.view.show(ui, &mut self.state);
            if ctx.input(|i| !i.raw.hovered_files.is_empty()) {
                let rect = ui.max_rect();
                ui.painter()
                    .rect_filled(rect, 0.0, egui::Color32::from_black_alpha(160));
                ui.painter().text(
                    rect.center(),
                    egui::Align2::CENTER_CENTER,
                    "Drop to open",
                    egui::FontId::proportional(28.0),
                    egui::Color32::WHITE,
                );
            }
        });
        for command in commands {
            self.execute(command, &ctx);
        }
        self.script_step(&ctx);
        if let Some(path) = &self.options.state_dump {
            let picture = dump::picture(&self.state, &ctx).to_string();
            if picture != self.last_dump {
                if let Err(error) = crate::export::write_atomically(path, picture.as_bytes()) {
                    eprintln!("state dump: {error:#}");
                }
                self.last_dump = picture;
            }
        }
        let busy = self.state.busy();
        let ms = started.elapsed().as_secs_f32() * 1000.0;
        self.state.frames.record(ms, busy);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        if self.options.persist {
            eframe::set_value(storage, eframe::APP_KEY, &self.state.persisted);
        }
    }
}

/// Opens the editor window and blocks until it closes.
pub fn run(options: AppOptions) -> anyhow::Result<()> {
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title(APP_NAME)
            .with_app_id("p2pz")
            .with_inner_size(options.window_size.unwrap_or(DEFAULT_WINDOW))
            .with_min_inner_size([900.0, 560.0])
            .with_drag_and_drop(true),
        persist_window: options.persist && options.window_size.is_none(),
        ..Default::default()
    };
    eframe::run_native(
        APP_NAME,
        native,
        Box::new(move |cc| Ok(Box::new(P2pzApp::new(cc, options)))),
    )
    .map_err(|error| {
        anyhow::anyhow!(
            "cannot open the editor window: {error}. The editor needs a desktop session (X11 or \
             Wayland); on a headless machine use the command-line stages (`p2pz edit --help`)"
        )
    })
}

impl Drop for P2pzApp {
    /// Scripted runs (`--screenshot`) report the UI frame time measured while the worker ran.
    fn drop(&mut self) {
        if self.options.screenshot.is_none() {
            return;
        }
        if let Some((mean, p95, max, n)) = self.busy_frame_summary() {
            eprintln!(
                "UI frame time while the worker ran: mean {mean:.2} ms, p95 {p95:.2} ms, max {max:.2} ms over {n} frames"
            );
        }
    }
}
