//! The Caption and Words panel: the (editable) BLIP caption, the source word with the caption's
//! nouns as candidates, the target word with known words as suggestions, and a swap button.

use crate::app::commands::AppCommand;
use crate::app::dump::mark;
use crate::app::state::AppState;

/// Words of a caption that are not worth offering as the thing to change.
const STOP_WORDS: [&str; 40] = [
    "a", "an", "the", "of", "on", "in", "at", "with", "and", "or", "to", "is", "are", "its", "his",
    "her", "their", "this", "that", "there", "it", "by", "for", "from", "up", "down", "over",
    "under", "next", "near", "front", "back", "top", "picture", "photo", "image", "sitting",
    "standing", "lying", "laying",
];

/// Candidate source words from a caption: its words minus stop words, in order, once each.
pub fn candidates(caption: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for word in caption.split(|c: char| !c.is_alphanumeric()) {
        let word = word.to_lowercase();
        if word.len() < 3 || STOP_WORDS.contains(&word.as_str()) || out.contains(&word) {
            continue;
        }
        out.push(word);
    }
    out
}

/// Whether `word` is one of the caption's words (or its plural is).
pub fn in_caption(caption: &str, word: &str) -> bool {
    let word = word.trim().to_lowercase();
    caption
        .split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .any(|w| w == word || w == format!("{word}s") || w == format!("{word}es"))
}

/// Draws the panel.
pub fn show(ui: &mut egui::Ui, state: &mut AppState, commands: &mut Vec<AppCommand>) {
    ui.heading("Caption");
    let caption = egui::TextEdit::multiline(&mut state.caption)
        .hint_text("describe the photo, e.g. a cat sitting on a sofa")
        .desired_rows(2)
        .desired_width(f32::INFINITY);
    let label = ui.label("Caption (conditions the inversion)");
    let response = ui.add(caption).labelled_by(label.id);
    mark(ui, "Caption", &response);
    if let Some(note) = &state.caption_note {
        ui.weak(note.as_str());
    }
    ui.horizontal(|ui| {
        if ui.button("Caption with BLIP").clicked() {
            commands.push(AppCommand::Caption {
                allow_download: false,
            });
        }
        if state.caption_note.is_some() && ui.button("Download BLIP").clicked() {
            commands.push(AppCommand::Caption {
                allow_download: true,
            });
        }
    });
    ui.separator();
    ui.heading("Words");
    let p = &mut state.persisted;
    egui::Grid::new("words").num_columns(2).show(ui, |ui| {
        let label = ui.label("Source word");
        let response = ui
            .add(egui::TextEdit::singleline(&mut p.from).hint_text("in the photo"))
            .labelled_by(label.id);
        mark(ui, "Source word", &response);
        ui.end_row();
        let label = ui.label("Target word");
        let response = ui
            .add(egui::TextEdit::singleline(&mut p.to).hint_text("what it becomes"))
            .labelled_by(label.id);
        mark(ui, "Target word", &response);
        ui.end_row();
    });
    let from = state.persisted.from.trim();
    let uses_words = state.persisted.direction_file.trim().is_empty();
    let has_caption = !state.caption.trim().is_empty();
    if uses_words && !from.is_empty() && has_caption && !in_caption(&state.caption, from) {
        ui.colored_label(
            ui.visuals().warn_fg_color,
            format!(
                "\"{from}\" is not in the caption. The guidance keeps the caption's words in \
                 place, so the edit works best on one of them: add \"{from}\" to the caption, \
                 or pick a caption word below."
            ),
        );
    }
    ui.horizontal_wrapped(|ui| {
        if ui.button("Swap words").clicked() {
            commands.push(AppCommand::SwapWords);
        }
        for word in candidates(&state.caption) {
            let chosen = state.persisted.from == word;
            if ui
                .selectable_label(chosen, word.as_str())
                .on_hover_text("use as the source word")
                .clicked()
            {
                state.persisted.from = word;
            }
        }
    });
    if !state.known_words.is_empty() {
        ui.horizontal_wrapped(|ui| {
            ui.weak("Known:");
            for word in state.known_words.clone() {
                if ui
                    .small_button(word.as_str())
                    .on_hover_text("cached direction: use as the target word")
                    .clicked()
                {
                    state.persisted.to = word;
                }
            }
        });
    }
    ui.add_space(4.0);
    let label = ui.label("Direction file (optional, .safetensors or the authors' .pt)");
    let field = egui::TextEdit::singleline(&mut state.persisted.direction_file)
        .hint_text("empty: the words give the direction")
        .desired_width(ui.available_width());
    ui.add(field).labelled_by(label.id);
    if !state.persisted.direction_file.trim().is_empty() {
        ui.horizontal_wrapped(|ui| {
            ui.weak("The edit follows this file; the words only label it.");
            if ui.small_button("Use the words").clicked() {
                state.persisted.direction_file.clear();
            }
        });
    }
    if !state.persisted.recent_directions.is_empty() {
        ui.horizontal_wrapped(|ui| {
            ui.weak("Imported:");
            for path in state.persisted.recent_directions.clone() {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                if ui
                    .small_button(name)
                    .on_hover_text(path.display().to_string())
                    .clicked()
                {
                    state.persisted.direction_file = path.display().to_string();
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_word_is_in_the_caption_as_itself_or_its_plural() {
        assert!(super::in_caption("A Cat on a sofa", "cat"));
        assert!(super::in_caption("two cats, one dog", "cat"));
        assert!(!super::in_caption("a kitten on a sofa", "cat"));
        assert!(!super::in_caption("a category", "cat"));
    }

    #[test]
    fn candidates_skip_stop_words_and_repeats() {
        assert_eq!(
            super::candidates("a cat sitting on a sofa with a cat toy"),
            vec!["cat", "sofa", "toy"]
        );
    }
}
