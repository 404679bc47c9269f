//! Sentences about a word, whose mean CLIP embedding stands for the word in an edit direction
//! (`shared/docs/pix2pix-zero.md` §B.5).
//!
//! The authors generate about a thousand captions per word with a language model; fewer,
//! less varied sentences give more entangled directions. Offline we compose captions from a
//! built-in grammar: photo framings, attributes, poses, places, light and styles, combined
//! without repetition by a seeded generator. Users can always bring their own file.

use std::collections::HashSet;
use std::path::Path;

use crate::engine::rng::Rng;
use crate::engine::{Error, Result};

/// How many sentences the built-in generator writes by default (the authors used 1000).
pub const DEFAULT_SENTENCES: usize = 1000;

const FRAMINGS: &[&str] = &[
    "a photo of",
    "a picture of",
    "an image of",
    "a close-up photo of",
    "a blurry photo of",
    "a black and white photo of",
    "a bright photo of",
    "a dark photo of",
    "a cropped photo of",
    "a good photo of",
    "a candid photo of",
    "a professional photo of",
    "a snapshot of",
    "a low resolution photo of",
    "a high quality photo of",
    "a wide shot of",
    "a portrait of",
    "a detailed photo of",
    "an old photo of",
    "a nice picture of",
];

const ATTRIBUTES: &[&str] = &[
    "",
    "",
    "",
    "small",
    "large",
    "young",
    "old",
    "cute",
    "beautiful",
    "fluffy",
    "happy",
    "sleepy",
    "curious",
    "calm",
    "lonely",
    "tiny",
    "big",
    "playful",
    "wet",
    "dirty",
    "clean",
    "friendly",
];

const POSES: &[&str] = &[
    "sitting",
    "lying",
    "standing",
    "sleeping",
    "resting",
    "looking at the camera",
    "looking away",
    "playing",
    "walking",
    "waiting",
    "relaxing",
    "peeking out",
];

const PLACES: &[&str] = &[
    "on a couch",
    "on a sofa",
    "in the grass",
    "on a wooden floor",
    "next to a window",
    "in a garden",
    "on a bed",
    "in the snow",
    "on the beach",
    "in a kitchen",
    "on a street",
    "in a living room",
    "on a rug",
    "in a field",
    "on a table",
    "in front of a fence",
    "under a tree",
    "on a porch",
    "in a park",
    "by the door",
    "on a blanket",
    "in the sun",
];

const LIGHT: &[&str] = &[
    "",
    "",
    "",
    "in the morning",
    "at sunset",
    "at night",
    "in soft light",
    "on a sunny day",
    "on a rainy day",
    "in the afternoon",
    "in warm light",
    "in the shade",
];

const STYLES: &[&str] = &[
    "",
    "",
    "",
    "",
    ", shot on film",
    ", high resolution",
    ", award winning photograph",
    ", natural light",
    ", shallow depth of field",
    ", 4k",
    ", bokeh",
];

fn article(word: &str) -> &'static str {
    match word.chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

fn pick<'a>(rng: &mut Rng, list: &[&'a str]) -> &'a str {
    list[rng.int_inclusive(0, list.len() as i64 - 1) as usize]
}

/// Checks a word the user typed: non-empty, one line.
pub fn check_word(word: &str) -> Result<&str> {
    let word = word.trim();
    if word.is_empty() {
        return Err(Error::Input(
            "the word is empty: give the word to edit, e.g. --from cat --to dog".into(),
        ));
    }
    if word.contains('\n') {
        return Err(Error::Input(format!(
            "`{word}` spans several lines; give one word or phrase"
        )));
    }
    Ok(word)
}

/// `count` distinct captions containing `word`, the same for the same `seed`.
pub fn generate(word: &str, count: usize, seed: u64) -> Result<Vec<String>> {
    let word = check_word(word)?;
    let mut rng = Rng::new(seed);
    let mut seen = HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    // The grammar has millions of combinations; the cap only guards against a tiny count loop.
    let mut attempts = 0;
    while out.len() < count && attempts < count * 50 {
        attempts += 1;
        let attribute = pick(&mut rng, ATTRIBUTES);
        let noun = if attribute.is_empty() {
            word.to_string()
        } else {
            format!("{attribute} {word}")
        };
        let sentence = match rng.int_inclusive(0, 4) {
            0 => format!(
                "{} {} {} {} {}{}",
                pick(&mut rng, FRAMINGS),
                article(&noun),
                noun,
                pick(&mut rng, POSES),
                pick(&mut rng, PLACES),
                pick(&mut rng, STYLES)
            ),
            1 => format!(
                "{} {} {} {}{}",
                article(&noun),
                noun,
                pick(&mut rng, PLACES),
                pick(&mut rng, LIGHT),
                pick(&mut rng, STYLES)
            ),
            2 => format!(
                "{} {} {} {}",
                article(&noun),
                noun,
                pick(&mut rng, POSES),
                pick(&mut rng, PLACES)
            ),
            3 => format!(
                "there is {} {} {} {}",
                article(&noun),
                noun,
                pick(&mut rng, PLACES),
                pick(&mut rng, LIGHT)
            ),
            _ => format!(
                "{} {} {}{}",
                pick(&mut rng, FRAMINGS),
                article(&noun),
                noun,
                pick(&mut rng, STYLES)
            ),
        };
        let sentence = sentence
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace(" ,", ",");
        if seen.insert(sentence.clone()) {
            out.push(sentence);
        }
    }
    Ok(out)
}

/// Reads a sentence file: one sentence per line, blank lines skipped.
pub fn read_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Input(format!(
            "cannot read the sentence file `{}`: {e}",
            path.display()
        ))
    })?;
    let sentences: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if sentences.is_empty() {
        return Err(Error::Input(format!(
            "the sentence file `{}` has no sentences: write one sentence per line",
            path.display()
        )));
    }
    Ok(sentences)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hundreds_of_distinct_sentences_that_all_name_the_word() {
        let sentences = generate("dog", DEFAULT_SENTENCES, 0).unwrap();
        assert_eq!(sentences.len(), DEFAULT_SENTENCES);
        assert!(sentences.iter().all(|s| s.contains("dog")));
        let distinct: HashSet<_> = sentences.iter().collect();
        assert_eq!(distinct.len(), sentences.len());
        assert_eq!(
            sentences,
            generate("dog", DEFAULT_SENTENCES, 0).unwrap(),
            "seeded"
        );
        let elephants = generate("elephant", 50, 0).unwrap();
        assert!(
            elephants.iter().any(|s| s.contains("an elephant")),
            "{elephants:?}"
        );
        assert!(
            !elephants.iter().any(|s| s.contains("a elephant")),
            "{elephants:?}"
        );
    }

    #[test]
    fn empty_words_are_refused() {
        assert!(generate("  ", 10, 0).is_err());
    }
}
