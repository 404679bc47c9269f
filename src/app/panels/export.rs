//! The Export panel: path, format, the overlay and maps for people who study them, and the
//! overwrite confirmation.

use super::path_label;
use crate::app::commands::AppCommand;
use crate::app::dump::mark;
use crate::app::state::AppState;
use crate::worker::ExportFormat;

/// Draws the panel.
pub fn show(ui: &mut egui::Ui, state: &mut AppState, commands: &mut Vec<AppCommand>) {
    ui.heading("Export result");
    let label = ui.label("Export path");
    let field =
        egui::TextEdit::singleline(&mut state.export.path).desired_width(ui.available_width());
    let response = ui.add(field).labelled_by(label.id);
    mark(ui, "Export path", &response);
    if ui.button("Choose…").clicked() {
        commands.push(AppCommand::PickExportPath);
    }
    ui.horizontal(|ui| {
        let format = &mut state.persisted.export_format;
        let before = *format;
        for f in ExportFormat::ALL {
            ui.radio_value(format, f, f.extension().to_uppercase());
        }
        if *format != before {
            // Keep the typed name, change its extension.
            let path = std::path::PathBuf::from(state.export.path.trim());
            if !state.export.path.trim().is_empty() {
                state.export.path = path
                    .with_extension(format.extension())
                    .display()
                    .to_string();
            }
        }
    });
    ui.checkbox(&mut state.export.overlay, "Also export the overlay");
    ui.checkbox(
        &mut state.export.maps,
        "Also export attention maps (one per token)",
    );
    if !state.export.confirm_overwrite.is_empty() {
        let existing = &state.export.confirm_overwrite;
        let what = match existing.len() {
            1 => "This file exists:".to_string(),
            n => format!("These {n} files exist:"),
        };
        ui.colored_label(ui.visuals().warn_fg_color, what);
        const LISTED: usize = 4;
        for path in existing.iter().take(LISTED) {
            let name = path.file_name().unwrap_or(path.as_os_str());
            ui.weak(name.to_string_lossy())
                .on_hover_text(path.display().to_string());
        }
        if existing.len() > LISTED {
            ui.weak(format!("and {} more", existing.len() - LISTED));
        }
        ui.horizontal(|ui| {
            let overwrite = ui.button("Overwrite");
            mark(ui, "Overwrite", &overwrite);
            if overwrite.clicked() {
                commands.push(AppCommand::Export { overwrite: true });
            }
            if ui.button("Keep existing").clicked() {
                state.export.confirm_overwrite.clear();
            }
        });
    } else {
        let ready = state.result.is_some();
        let export = ui
            .add_enabled(ready, egui::Button::new("Export"))
            .on_hover_text("Ctrl+S; PNG carries the parameters, a .json sidecar too");
        mark(ui, "Export", &export);
        if export.clicked() {
            commands.push(AppCommand::Export { overwrite: false });
        }
    }
    for path in &state.export.written {
        path_label(ui, egui::RichText::new(path.display().to_string()).weak());
    }
}
