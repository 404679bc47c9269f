//! The Instant panel: a distilled generator's result for the words, shown as soon as the photo
//! opens or the words change; importing generators; and *Distill this edit*.

use crate::app::commands::AppCommand;
use crate::app::dump::mark;
use crate::app::state::AppState;

/// Draws the panel.
pub fn show(ui: &mut egui::Ui, state: &mut AppState, commands: &mut Vec<AppCommand>) {
    ui.heading("Instant");
    let mut on = state.persisted.instant;
    let toggle = ui.checkbox(&mut on, "Instant results").on_hover_text(
        "Show a distilled generator's edit at once when one makes these words' edit",
    );
    mark(ui, "Instant results", &toggle);
    if toggle.changed() {
        commands.push(AppCommand::SetInstant(on));
    }
    let (from, to) = (state.persisted.from.trim(), state.persisted.to.trim());
    match state.matching_generator() {
        Some(generator) => {
            let scores = generator
                .scores
                .map(|(psnr, identity)| {
                    format!(", held-out PSNR {psnr:.1} dB (unedited {identity:.1} dB)")
                })
                .unwrap_or_default();
            ui.label(format!(
                "Generator for {}: {} pairs{scores}",
                generator.edit_name(),
                generator.pairs
            ));
            super::path_label(
                ui,
                egui::RichText::new(generator.path.display().to_string()).weak(),
            );
            let shown = state.result.as_ref().is_some_and(|r| r.instant.is_some());
            if shown {
                let refine = ui
                    .button("Refine with diffusion")
                    .on_hover_text("Run the full pix2pix-zero edit (Ctrl+Enter)");
                mark(ui, "Refine with diffusion", &refine);
                if refine.clicked() {
                    commands.push(AppCommand::Run);
                }
            }
        }
        None if !from.is_empty() && !to.is_empty() => {
            ui.weak(format!("No generator turns {from} into {to} yet."));
        }
        None => {}
    }
    ui.horizontal(|ui| {
        let field = egui::TextEdit::singleline(&mut state.generator_path)
            .hint_text("a .generator.safetensors file")
            .desired_width(ui.available_width() - 130.0);
        let label = ui.label("Generator file");
        let response = ui.add(field).labelled_by(label.id);
        mark(ui, "Generator file", &response);
        if response.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
            commands.push(AppCommand::ImportGenerator);
        }
    });
    ui.horizontal(|ui| {
        let import = ui.button("Import");
        mark(ui, "Import", &import);
        if import.clicked() {
            commands.push(AppCommand::ImportGenerator);
        }
        if ui.button("Find file…").clicked() {
            commands.push(AppCommand::PickGenerator);
        }
        let distill = ui.button("Distill this edit…").on_hover_text(
            "Make training pairs with the model and train a generator for these words",
        );
        mark(ui, "Distill this edit…", &distill);
        if distill.clicked() {
            state.distill_open = !state.distill_open;
        }
    });
    if state.distill_open {
        distill_form(ui, state, commands);
    }
}

/// The settings of a distillation and its Start button.
fn distill_form(ui: &mut egui::Ui, state: &mut AppState, commands: &mut Vec<AppCommand>) {
    let form = &mut state.persisted.distill;
    egui::Grid::new("distill").num_columns(2).show(ui, |ui| {
        ui.label("Pairs");
        ui.add(egui::DragValue::new(&mut form.pairs).range(2..=100_000));
        ui.end_row();
        ui.label("Image size");
        ui.add(
            egui::DragValue::new(&mut form.size)
                .range(64..=1024)
                .speed(64.0),
        );
        ui.end_row();
        ui.label("Steps per pair");
        ui.add(egui::DragValue::new(&mut form.steps).range(3..=100));
        ui.end_row();
        ui.label("Iterations");
        ui.add(egui::DragValue::new(&mut form.iterations).range(1..=1_000_000));
        ui.end_row();
    });
    form.size = (form.size / 64).max(1) * 64;
    ui.weak(
        "Each pair is a diffusion edit of a generated image: minutes each on a CPU. Cancel keeps \
         the pairs and a checkpoint; starting again continues.",
    );
    let start = ui.button("Start distilling");
    mark(ui, "Start distilling", &start);
    if start.clicked() {
        commands.push(AppCommand::Distill);
    }
}
