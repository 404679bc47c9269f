//! The status bar: stage and step, time left, loss, Cancel, messages and the UI frame time.

use crate::app::commands::AppCommand;
use crate::app::state::{AppState, FrameStats};

/// Draws the panel.
pub fn show(ui: &mut egui::Ui, state: &mut AppState, commands: &mut Vec<AppCommand>) {
    ui.horizontal(|ui| {
        match &state.job {
            Some(job) => {
                let fraction = if job.total > 0 {
                    job.step as f32 / job.total as f32
                } else {
                    0.0
                };
                let mut text = format!("{}: step {}/{}", job.stage, job.step, job.total);
                if let Some(left) = job.time_left() {
                    text.push_str(&format!(", {:.1} s left", left.as_secs_f64()));
                }
                if let Some(loss) = job.loss {
                    text.push_str(&format!(", loss {loss:.4}"));
                }
                if job.cancelling {
                    text.push_str(" (stopping…)");
                }
                ui.add(
                    egui::ProgressBar::new(fraction)
                        .desired_width(320.0)
                        .text(text),
                );
                if ui
                    .add_enabled(!job.cancelling, egui::Button::new("Cancel"))
                    .on_hover_text("Esc: stops within one step")
                    .clicked()
                {
                    commands.push(AppCommand::Cancel);
                }
            }
            None => {
                ui.label("Ready");
            }
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            let recent: Vec<f32> = state.frames.recent.iter().copied().collect();
            if let Some((mean, _, max)) = FrameStats::summary(&recent) {
                ui.weak(format!("UI {mean:.1} ms/frame (max {max:.1})"));
            }
        });
    });
    if let Some(notice) = state.notices.last() {
        let colour = if notice.error {
            ui.visuals().error_fg_color
        } else {
            ui.visuals().weak_text_color()
        };
        ui.colored_label(colour, notice.text.as_str());
    }
}
