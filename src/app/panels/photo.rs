//! The Open panel: a path field that always works, the native dialog, and recent files.

use std::path::PathBuf;

use crate::app::commands::AppCommand;
use crate::app::dump::mark;
use crate::app::state::AppState;

/// Draws the panel.
pub fn show(ui: &mut egui::Ui, state: &mut AppState, commands: &mut Vec<AppCommand>) {
    ui.heading("Photo");
    let label = ui.label("Image path");
    let field = egui::TextEdit::singleline(&mut state.open_path)
        .hint_text("path of a PNG, JPEG or WebP")
        .desired_width(ui.available_width());
    let response = ui.add(field).labelled_by(label.id);
    mark(ui, "Image path", &response);
    let entered = response.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
    ui.horizontal(|ui| {
        if ui.button("Open").clicked() || entered {
            commands.push(AppCommand::OpenPath(PathBuf::from(state.open_path.trim())));
        }
        if ui.button("Browse…").on_hover_text("Ctrl+O").clicked() {
            commands.push(AppCommand::PickImage);
        }
    });
    if state.dialog_unavailable {
        ui.weak(
            "No file dialog is available here: type a path above or drop a file on the window.",
        );
    }
    if let Some(photo) = &state.photo {
        let (w, h) = photo.original_size;
        let (ww, wh) = photo.working.dimensions();
        ui.weak(format!("{w}×{h}, edited at {ww}×{wh}"));
    }
    if !state.persisted.recent.is_empty() {
        egui::CollapsingHeader::new("Recent files").show(ui, |ui| {
            for path in &state.persisted.recent {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| path.display().to_string());
                if ui
                    .button(name)
                    .on_hover_text(path.display().to_string())
                    .clicked()
                {
                    commands.push(AppCommand::OpenPath(path.clone()));
                }
            }
        });
    }
}
