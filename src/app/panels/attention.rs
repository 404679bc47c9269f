//! The Attention panel: which cross-attention map the overlay shows (token, step, view,
//! resolution), its opacity and colour scale, and the compare modes of the canvas.

use crate::app::heatmap::{Colormap, MapView, ResolutionFilter};
use crate::app::state::{AppState, CompareMode};

/// A CLIP token as a person reads it: `cat</w>` → `cat`.
pub fn token_label(token: &str) -> String {
    match token {
        "<|startoftext|>" => "[start]".into(),
        "<|endoftext|>" => "[end]".into(),
        t => t.trim_end_matches("</w>").to_string(),
    }
}

/// Draws the panel.
pub fn show(ui: &mut egui::Ui, state: &mut AppState) {
    ui.heading("View");
    ui.horizontal_wrapped(|ui| {
        let c = &mut state.compare;
        let split = matches!(c, CompareMode::Split(_));
        if ui
            .selectable_label(*c == CompareMode::Edited, "Edited")
            .clicked()
        {
            *c = CompareMode::Edited;
        }
        if ui
            .selectable_label(*c == CompareMode::Original, "Original")
            .clicked()
        {
            *c = CompareMode::Original;
        }
        if ui.selectable_label(split, "Split").clicked() {
            *c = CompareMode::Split(0.5);
        }
        if ui
            .selectable_label(*c == CompareMode::Reconstruction, "Reconstruction")
            .on_hover_text("the reference pass: how well the inversion reproduces the photo")
            .clicked()
        {
            *c = CompareMode::Reconstruction;
        }
    });
    ui.separator();
    ui.heading("Cross-attention");
    let source_word = state.persisted.from.trim().to_lowercase();
    let target_word = state.persisted.to.trim().to_string();
    let labels: Vec<String> = state
        .current_tokens()
        .iter()
        .map(|t| token_label(t))
        .collect();
    let chosen = state.overlay_token();
    let steps = state.attention.len();
    // (rows, columns) of each resolution the UNet attends at, largest first.
    let resolutions: Vec<(usize, usize)> = state
        .attention
        .last()
        .map(|s| s.grids.iter().map(|g| (g.height, g.width)).collect())
        .unwrap_or_default();
    let o = &mut state.persisted.overlay;
    ui.checkbox(&mut o.enabled, "Show overlay");
    egui::Grid::new("attention").num_columns(2).show(ui, |ui| {
        let label = ui.label("Token");
        let view = o.view;
        let name = |i: usize| -> String {
            let shown = &labels[i];
            if *shown == source_word && view != MapView::Reference {
                format!("{i}: {shown} -> {target_word}")
            } else {
                format!("{i}: {shown}")
            }
        };
        let selected = chosen.map(name).unwrap_or_else(|| "no caption yet".into());
        egui::ComboBox::from_id_salt("token")
            .selected_text(selected)
            .show_ui(ui, |ui| {
                for (i, label) in labels.iter().enumerate() {
                    if ui.selectable_label(chosen == Some(i), name(i)).clicked() {
                        o.token_word = label.clone();
                    }
                }
            })
            .response
            .labelled_by(label.id);
        ui.end_row();

        let label = ui.label("Step");
        ui.horizontal(|ui| {
            let mut follow = o.step.is_none();
            if ui.checkbox(&mut follow, "newest").changed() {
                o.step = if follow {
                    None
                } else {
                    Some(steps.saturating_sub(1))
                };
            }
            if let Some(step) = &mut o.step {
                let last = steps.saturating_sub(1);
                *step = (*step).min(last);
                ui.add(egui::Slider::new(step, 0..=last))
                    .labelled_by(label.id);
            } else {
                ui.weak(format!("{steps} recorded"));
            }
        });
        ui.end_row();

        let label = ui.label("Pass");
        ui.horizontal(|ui| {
            for view in MapView::ALL {
                ui.radio_value(&mut o.view, view, view.label());
            }
        })
        .response
        .labelled_by(label.id);
        ui.end_row();

        let label = ui.label("Resolution");
        // Latent grids are written columns × rows, as image sizes are.
        let shown = |r: &ResolutionFilter| match r {
            ResolutionFilter::All => "all layers".to_string(),
            ResolutionFilter::Rows(n) => match resolutions.iter().find(|(rows, _)| rows == n) {
                Some((rows, columns)) => format!("{columns}×{rows} layers"),
                None => format!("{n} rows"),
            },
        };
        egui::ComboBox::from_id_salt("resolution")
            .selected_text(shown(&o.resolution))
            .show_ui(ui, |ui| {
                ui.selectable_value(
                    &mut o.resolution,
                    ResolutionFilter::All,
                    shown(&ResolutionFilter::All),
                );
                for &(rows, _) in &resolutions {
                    let r = ResolutionFilter::Rows(rows);
                    ui.selectable_value(&mut o.resolution, r, shown(&r));
                }
            })
            .response
            .labelled_by(label.id);
        ui.end_row();

        let label = ui.label("Opacity");
        ui.add(egui::Slider::new(&mut o.opacity, 0.0..=1.0))
            .labelled_by(label.id);
        ui.end_row();

        let label = ui.label("Colour scale");
        egui::ComboBox::from_id_salt("colormap")
            .selected_text(o.colormap.label())
            .show_ui(ui, |ui| {
                for c in Colormap::ALL {
                    ui.selectable_value(&mut o.colormap, c, c.label());
                }
            })
            .response
            .labelled_by(label.id);
        ui.end_row();
    });
    if steps == 0 {
        ui.weak("Maps appear here while an edit runs.");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_labels_drop_clip_markers() {
        assert_eq!(super::token_label("cat</w>"), "cat");
        assert_eq!(super::token_label("<|startoftext|>"), "[start]");
    }
}
