//! The status bar: stage and step, time left, loss, Cancel, messages and the UI frame time.

use crate::app::commands::AppCommand;
use crate::app::state::{AppState, FrameStats, JobState};

/// What a job is doing, in words: its stage and step, the time left and the loss.
pub fn job_text(job: &JobState, steps: usize) -> String {
    if job.stage.is_empty() {
        let what = match job.kind {
            "edit" => "edit",
            "open" => "opening the photo",
            "model" => "loading the model",
            "caption" => "captioning",
            "export" => "exporting",
            other => other,
        };
        return format!("{what}: starting…");
    }
    let stage = match job.stage.as_str() {
        "invert" if job.total + 2 == steps => {
            "inverting (two steps fewer than Steps: the authors' schedule)".to_string()
        }
        "invert" => "inverting".to_string(),
        "direction" => "edit direction".to_string(),
        "reference + edit" => "reference and edited passes".to_string(),
        "edit" => "edited pass".to_string(),
        "decode" => "decoding".to_string(),
        other => other.to_string(),
    };
    let mut text = format!("{stage}: step {}/{}", job.step, job.total);
    if let Some(left) = job.time_left() {
        text.push_str(&format!(", {:.1} s left", left.as_secs_f64()));
    }
    if let Some(loss) = job.loss {
        text.push_str(&format!(", loss {loss:.4}"));
    }
    if job.cancelling {
        text.push_str(" (stopping…)");
    }
    text
}

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
                let text = job_text(job, state.persisted.sliders.steps);
                if job.stage.is_empty() {
                    ui.spinner();
                }
                ui.add(
                    egui::ProgressBar::new(fraction)
                        .desired_width(420.0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_says_what_it_does_before_its_first_step_and_why_inversion_is_shorter() {
        let mut job = JobState::new("edit");
        assert_eq!(job_text(&job, 15), "edit: starting…");
        job.report("invert".into(), 3, 13, None);
        let text = job_text(&job, 15);
        assert!(text.starts_with("inverting (two steps fewer"), "{text}");
        assert!(text.contains("step 3/13"), "{text}");
    }
}
