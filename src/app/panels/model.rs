//! The Model panel: which model is loaded and from where, choosing another, the download bar,
//! and what to do when the weights are missing.

use super::{human_bytes, path_label};
use crate::app::commands::AppCommand;
use crate::app::state::{AppState, ModelStatus};

/// Draws the panel.
pub fn show(ui: &mut egui::Ui, state: &mut AppState, commands: &mut Vec<AppCommand>) {
    ui.heading("Model");
    ui.vertical(|ui| {
        let label = ui.label("Model folder or repo id");
        let field = egui::TextEdit::singleline(&mut state.persisted.model_spec)
            .hint_text("e.g. CompVis/stable-diffusion-v1-4")
            .desired_width(ui.available_width());
        let response = ui.add(field).labelled_by(label.id);
        if response.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
            commands.push(AppCommand::LoadModel {
                allow_download: false,
            });
        }
    });
    ui.horizontal(|ui| {
        if ui.button("Load").clicked() {
            commands.push(AppCommand::LoadModel {
                allow_download: false,
            });
        }
        if ui.button("Folder…").clicked() {
            commands.push(AppCommand::PickModelFolder);
        }
    });
    match &state.model {
        ModelStatus::NotLoaded => {
            ui.weak("No model loaded.");
        }
        ModelStatus::Loading(spec) => {
            ui.horizontal(|ui| {
                ui.spinner();
                path_label(ui, format!("Loading {spec}…"));
            });
        }
        ModelStatus::Ready(info) => {
            path_label(ui, format!("Loaded {} on the {}", info.spec, info.device));
            path_label(
                ui,
                egui::RichText::new(info.root.display().to_string()).weak(),
            );
        }
        ModelStatus::Missing {
            spec,
            message,
            downloadable,
        } => {
            let downloadable = *downloadable;
            let spec = spec.clone();
            let message = message.clone();
            egui::Frame::group(ui.style())
                .stroke(egui::Stroke::new(1.0, ui.visuals().error_fg_color))
                .show(ui, |ui| {
                    ui.colored_label(ui.visuals().error_fg_color, "Model weights not found");
                    ui.label(message);
                    if downloadable {
                        ui.label(
                            "Download it, or type a diffusers-format folder in the Model field.",
                        );
                        if ui.button(format!("Download {spec}")).clicked() {
                            commands.push(AppCommand::LoadModel {
                                allow_download: true,
                            });
                        }
                    } else {
                        ui.label(
                            "Type a diffusers-format folder (one holding model_index.json, unet/, \
                             vae/, text_encoder/, tokenizer/ and scheduler/) or a Hugging Face \
                             repo id such as CompVis/stable-diffusion-v1-4 in the Model field, or \
                             pick a folder with Folder….",
                        );
                    }
                });
        }
    }
    if let Some(download) = &state.download {
        let fraction = if download.total > 0 {
            download.done as f32 / download.total as f32
        } else {
            0.0
        };
        ui.add(egui::ProgressBar::new(fraction).text(format!(
            "{}: {} of {} at {}/s",
            download.file,
            human_bytes(download.done as f64),
            human_bytes(download.total as f64),
            human_bytes(download.speed())
        )));
    }
}
