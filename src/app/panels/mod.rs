//! One file per panel. Each reads and writes [`AppState`](super::state::AppState) and pushes
//! [`AppCommand`](super::commands::AppCommand)s; none talks to the worker.

pub mod attention;
pub mod canvas;
pub mod export;
pub mod instant;
pub mod model;
pub mod photo;
pub mod progress;
pub mod sliders;
pub mod words;

/// A one-line label for text that holds a path: cut with "…" to the panel's width, the whole of it
/// on hover. A long path must not widen the panel and squeeze the canvas.
pub fn path_label(ui: &mut egui::Ui, text: impl Into<egui::WidgetText>) -> egui::Response {
    let text = text.into();
    let full = text.text().to_string();
    ui.add(egui::Label::new(text).truncate())
        .on_hover_text(full)
}

/// Formats a byte count for people: `1.5 GB`, `340 MB`.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_bytes_picks_a_unit() {
        assert_eq!(super::human_bytes(512.0), "512 B");
        assert_eq!(super::human_bytes(3_440_000_000.0), "3.4 GB");
    }
}
