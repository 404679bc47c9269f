//! A JSON picture of the app for scripted checks (`p2pz gui --state-dump FILE`): what the user
//! set, what the worker is doing, the shown result's parameters, the messages, and where the
//! main widgets are on screen, so that a script can drive the real window with real input
//! events (`xdotool`) and then assert on what the app holds.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::panels::sliders::cache_hint;
use super::state::{AppState, ModelStatus};

/// Where the marked widgets were drawn in the last frame, in points.
#[derive(Debug, Clone, Default)]
struct Marks(BTreeMap<&'static str, egui::Rect>);

fn marks_id() -> egui::Id {
    egui::Id::unique("p2pz-widget-marks")
}

/// Remembers where the widget `name` was drawn, for [`picture`].
pub fn mark(ui: &egui::Ui, name: &'static str, response: &egui::Response) {
    ui.ctx().data_mut(|d| {
        d.get_temp_mut_or_default::<Marks>(marks_id())
            .0
            .insert(name, response.rect);
    });
}

/// The app's state as JSON. Widget places are `[x, y]` centres in physical pixels of the
/// window, as `xdotool mousemove` takes them.
pub fn picture(state: &AppState, ctx: &egui::Context) -> Value {
    let scale = ctx.pixels_per_point();
    let marks = ctx.data(|d| d.get_temp::<Marks>(marks_id()).unwrap_or_default());
    let widgets: BTreeMap<&str, [f32; 2]> = marks
        .0
        .iter()
        .map(|(name, rect)| (*name, [rect.center().x * scale, rect.center().y * scale]))
        .collect();
    let model = match &state.model {
        ModelStatus::NotLoaded => "none",
        ModelStatus::Loading(_) => "loading",
        ModelStatus::Ready(_) => "ready",
        ModelStatus::Missing { .. } => "missing",
    };
    let p = &state.persisted;
    json!({
        "model": model,
        "photo": state.photo.as_ref().map(|photo| json!({
            "path": photo.path,
            "original_size": photo.original_size,
            "working_size": photo.working.dimensions(),
        })),
        "caption": state.caption,
        "from": p.from,
        "to": p.to,
        "size": p.size,
        "sliders": p.sliders,
        "busy": state.busy(),
        "in_flight": state.in_flight,
        "job": state.job.as_ref().map(|job| json!({
            "kind": job.kind,
            "stage": job.stage,
            "step": job.step,
            "total": job.total,
        })),
        "result": state.result.as_ref().map(|r| json!({
            "record": r.record,
            "inverted": r.inverted,
            "reused_reference": r.reused_reference,
            "size": r.image.dimensions(),
            "instant": r.instant.as_ref().map(|g| g.edit_name()),
        })),
        "attention_steps": state.attention.len(),
        "instant_on": p.instant,
        "generators": state.generators.iter().map(|g| g.path.clone()).collect::<Vec<_>>(),
        "cache_hint": cache_hint(state),
        "notices": state.notices.iter().map(|n| json!({"error": n.error, "text": n.text}))
            .collect::<Vec<_>>(),
        "export": {
            "path": state.export.path,
            "confirm_overwrite": state.export.confirm_overwrite,
            "written": state.export.written,
        },
        "widgets": widgets,
    })
}
