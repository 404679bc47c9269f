//! The Sliders panel: λ_xa, edit strength, CFG scale, steps, seed and working size, and the
//! Run button. Moving λ_xa, strength or CFG after an edit re-runs only the edited pass.

use crate::app::commands::AppCommand;
use crate::app::dump::mark;
use crate::app::state::AppState;

/// Working sizes offered besides the model's default.
const SIZES: [usize; 5] = [256, 384, 512, 640, 768];

/// The names the size choices are marked by in the state dump.
const SIZE_MARKS: [&str; 5] = [
    "size: 256",
    "size: 384",
    "size: 512",
    "size: 640",
    "size: 768",
];

/// What the next run will reuse, in words.
pub fn cache_hint(state: &AppState) -> String {
    let Some(r) = &state.session_record else {
        return "First run: inverts the photo, then runs the reference and edited passes.".into();
    };
    let mut changed = vec![];
    if r["caption"].as_str() != Some(state.caption.trim()) {
        changed.push("caption");
    }
    if r["steps"].as_u64() != Some(state.persisted.sliders.steps as u64) {
        changed.push("steps");
    }
    if r["source"]["seed"].as_u64() != Some(state.persisted.sliders.seed) {
        changed.push("seed");
    }
    if r["working_side"].as_u64() != state.working_side().map(|s| s as u64) {
        changed.push("working size");
    }
    match changed.as_slice() {
        [] => "Next run reuses the session cache: only the edited pass runs.".into(),
        [one] => format!("The {one} changed: the next run inverts the photo again."),
        many => format!(
            "The {} changed: the next run inverts the photo again.",
            many.join(", ")
        ),
    }
}

/// A labelled slider row of the grid; true when its value settled on a new one (a drag ended,
/// or a value was typed or clicked), not on every frame of a drag.
fn scrub_row(ui: &mut egui::Ui, label: &'static str, slider: egui::Slider<'_>, hint: &str) -> bool {
    let label_response = ui.label(label);
    let response = ui
        .add(slider)
        .labelled_by(label_response.id)
        .on_hover_text(hint);
    mark(ui, label, &response);
    ui.end_row();
    response.drag_stopped() || (response.changed() && !response.dragged())
}

/// Draws the panel.
pub fn show(ui: &mut egui::Ui, state: &mut AppState, commands: &mut Vec<AppCommand>) {
    ui.heading("Edit");
    // Scrubbing re-runs a diffusion edit, not an instant result (that is Refine's job).
    let has_result = state.result.as_ref().is_some_and(|r| r.instant.is_none());
    let s = &mut state.persisted.sliders;
    let mut rerun = false;
    egui::Grid::new("sliders").num_columns(2).show(ui, |ui| {
        rerun |= scrub_row(
            ui,
            "Guidance λ_xa",
            egui::Slider::new(&mut s.lambda_xa, 0.0..=0.5).step_by(0.005),
            "cross-attention guidance step: keeps the structure of the photo",
        );
        rerun |= scrub_row(
            ui,
            "Edit strength",
            egui::Slider::new(&mut s.strength, 0.0..=2.0).step_by(0.05),
            "multiplier of the edit direction Δc",
        );
        rerun |= scrub_row(
            ui,
            "CFG scale",
            egui::Slider::new(&mut s.guidance_scale, 1.0..=12.0).step_by(0.5),
            "classifier-free guidance of the edited pass",
        );
        let label = ui.label("Steps");
        let response = ui
            .add(egui::Slider::new(&mut s.steps, 2..=100))
            .labelled_by(label.id)
            .on_hover_text(
                "DDIM steps; changing them inverts the photo again. Inversion takes two steps \
                 fewer (the authors' schedule)",
            );
        mark(ui, "Steps", &response);
        ui.end_row();
        let label = ui.label("Seed");
        ui.add(egui::DragValue::new(&mut s.seed))
            .labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Working size");
        let size = &mut state.persisted.size;
        let shown = |s: &Option<usize>| match s {
            Some(side) => format!("{side} px"),
            None => "model default".to_string(),
        };
        let combo = egui::ComboBox::from_id_salt("working size")
            .selected_text(shown(size))
            .show_ui(ui, |ui| {
                let choice = ui.selectable_value(size, None, shown(&None));
                mark(ui, "size: model default", &choice);
                for (side, name) in SIZES.into_iter().zip(SIZE_MARKS) {
                    let choice = ui.selectable_value(size, Some(side), shown(&Some(side)));
                    mark(ui, name, &choice);
                }
            })
            .response
            .labelled_by(label.id)
            .on_hover_text("long side the photo is edited at; results export at the photo's size");
        mark(ui, "Working size", &combo);
        ui.end_row();
    });
    ui.weak(cache_hint(state));
    if rerun && has_result {
        commands.push(AppCommand::Run);
    }
}

/// The Run row, pinned under the controls so it is always in reach.
pub fn run_row(ui: &mut egui::Ui, state: &AppState, commands: &mut Vec<AppCommand>) {
    ui.horizontal(|ui| {
        let run = egui::Button::new("Run edit").min_size(egui::vec2(120.0, 28.0));
        let editing = state.job.as_ref().is_some_and(|j| j.kind == "edit");
        let response = ui
            .add_enabled(!state.busy() || editing, run)
            .on_hover_text("Ctrl+Enter");
        mark(ui, "Run edit", &response);
        if response.clicked() {
            commands.push(AppCommand::Run);
        }
        if ui
            .button("Before / after")
            .on_hover_text("Ctrl+B")
            .clicked()
        {
            commands.push(AppCommand::ToggleCompare);
        }
    });
}
