//! The Flan-T5 sentence writer against transformers on a tiny random-weight T5
//! (`tests/fixtures/make_t5_fixture.py`).
//!
//! candle 0.11's T5 decoder buckets relative positions as if the decoder were bidirectional, so
//! its logits agree with transformers' for the first 9 decoder positions only; the fixture
//! records the greedy ids stock candle must give (transformers patched with candle's buckets), and
//! both are checked here.

use std::path::PathBuf;

use candle_core::Device;
use pix2pix_zero::edit::flan_t5::{prompt, SentenceWriter};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn list(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_and_greedy_decoding_match_the_reference() {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/t5.json")).unwrap(),
    )
    .unwrap();
    let mut writer = SentenceWriter::load(&fixtures().join("tiny-t5"), &Device::Cpu).unwrap();
    for case in json["cases"].as_array().unwrap() {
        let word = case["word"].as_str().unwrap();
        assert_eq!(prompt(word), case["prompt"].as_str().unwrap());
        let ids = writer.encode(&prompt(word)).unwrap();
        assert_eq!(ids, list(&case["input_ids"]), "{word}: prompt ids");
        let ours = writer.greedy(&ids, 40).unwrap();
        let transformers = list(&case["greedy"]["generated_ids_without_start_and_eos"]);
        assert_eq!(
            ours[..8],
            transformers[..8],
            "{word}: the first decoder positions agree with transformers"
        );
        let candle = list(&case["candle_0_11_emulation"]["greedy_ids"]);
        let candle: Vec<u32> = candle[1..]
            .iter()
            .copied()
            .take_while(|&t| t != 1)
            .collect();
        assert_eq!(
            ours, candle,
            "{word}: the whole greedy decode, as candle's buckets give it"
        );
    }
}

#[test]
fn sampled_sentences_are_seeded_clean_and_name_the_word() {
    let mut writer = SentenceWriter::load(&fixtures().join("tiny-t5"), &Device::Cpu).unwrap();
    let a = writer.sentences("dog", 3, 7).unwrap();
    let b = writer.sentences("dog", 3, 7).unwrap();
    assert_eq!(a, b, "a seed gives the same sentences");
    assert!(!a.is_empty());
    for sentence in &a {
        assert!(sentence.to_lowercase().contains("dog"), "{sentence}");
        assert!(
            !sentence.chars().any(|c| c.is_ascii_digit() || c == '.'),
            "{sentence}"
        );
    }
}
