//! Export of the last edit: the image at the photo's own size with its parameters, the JSON
//! sidecar, and, when asked, the overlay and one gray attention map per caption token.
//!
//! Which files an export writes is decided in one place, [`export_targets`]. The app asks it
//! before it sends the export, so that replacing *any* of those files asks the user first, and
//! the worker asks it again before it writes, so that nothing is replaced without that answer.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::edit::image as photo;
use crate::export::{encode_png, same_file, write_atomically};

/// Image formats an export can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExportFormat {
    /// Lossless, with the parameters in an `iTXt` chunk.
    Png,
    /// Quality 95.
    Jpeg,
    /// Lossless WebP.
    WebP,
}

impl ExportFormat {
    /// Every format, for pickers.
    pub const ALL: [ExportFormat; 3] = [ExportFormat::Png, ExportFormat::Jpeg, ExportFormat::WebP];

    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            ExportFormat::Png => "png",
            ExportFormat::Jpeg => "jpg",
            ExportFormat::WebP => "webp",
        }
    }

    /// The format a file extension names (`png`, `jpg`, `jpeg`, `webp`, any case).
    pub fn from_extension(extension: &str) -> Option<Self> {
        let extension = extension.to_ascii_lowercase();
        if extension == "jpeg" {
            return Some(ExportFormat::Jpeg);
        }
        Self::ALL.into_iter().find(|f| f.extension() == extension)
    }

    /// The path an export of `typed` goes to, and its format. A name without an extension
    /// (`out`, `out.`) gets `default`'s; an extension that names no format is refused with a
    /// message that lists the ones that work.
    pub fn resolve(typed: &Path, default: ExportFormat) -> Result<(PathBuf, ExportFormat)> {
        match typed.extension().and_then(|e| e.to_str()) {
            None | Some("") => Ok((typed.with_extension(default.extension()), default)),
            Some(extension) => match Self::from_extension(extension) {
                Some(format) => Ok((typed.to_path_buf(), format)),
                None => bail!(
                    "`.{extension}` is not an image format the editor writes: end the export \
                     name in .png, .jpg or .webp"
                ),
            },
        }
    }
}

/// The files an export of the image at `path` writes, the image first: its `.json` sidecar,
/// `<stem>-overlay.png` when `overlay`, and `<stem>-attention/NN-<token>.png` for each of
/// `map_labels`.
pub fn export_targets(path: &Path, overlay: bool, map_labels: &[String]) -> Vec<PathBuf> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "export".into());
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut targets = vec![path.to_path_buf(), path.with_extension("json")];
    if overlay {
        targets.push(dir.join(format!("{stem}-overlay.png")));
    }
    let maps_dir = dir.join(format!("{stem}-attention"));
    for (i, label) in map_labels.iter().enumerate() {
        targets.push(maps_dir.join(format!("{i:02}-{}.png", file_safe(label))));
    }
    targets
}

/// What the last edit left for export.
pub(super) struct LastEdit {
    /// The edited image at working size.
    pub image: image::RgbImage,
    /// The photo's size on disk, which the export is written at.
    pub original_size: (u32, u32),
    /// The photo, never a valid target.
    pub source: PathBuf,
    /// The parameters, written into the PNG and the sidecar.
    pub record: serde_json::Value,
}

/// Writes the export `request` asks for of `last`; returns every file written. Refuses to write
/// over the source, and over any existing file unless the request allows it.
pub(super) fn export(last: &LastEdit, request: &super::ExportRequest) -> Result<Vec<PathBuf>> {
    let labels: Vec<String> = request.maps.iter().map(|(l, _)| l.clone()).collect();
    let targets = export_targets(&request.path, request.overlay.is_some(), &labels);
    if let Some(source) = targets.iter().find(|t| same_file(t, &last.source)) {
        bail!(
            "`{}` is the photo being edited: choose another name, the source is never overwritten",
            source.display()
        );
    }
    let existing: Vec<String> = targets
        .iter()
        .filter(|t| t.exists())
        .map(|t| format!("`{}`", t.display()))
        .collect();
    if !existing.is_empty() && !request.overwrite {
        bail!(
            "{} already exist: confirm the overwrite or choose another name",
            existing.join(", ")
        );
    }
    let image = photo::to_original_size(&last.image, last.original_size);
    let mut files: Vec<Vec<u8>> = vec![
        encode(&image, request.format, &last.record)?,
        serde_json::to_string_pretty(&last.record)?.into_bytes(),
    ];
    if let Some(overlay) = &request.overlay {
        let overlay = photo::to_original_size(overlay, last.original_size);
        files.push(encode_png(&overlay, &[("p2pz", last.record.to_string())])?);
    }
    if let Some(maps_dir) = targets
        .last()
        .filter(|_| !labels.is_empty())
        .and_then(|t| t.parent())
    {
        std::fs::create_dir_all(maps_dir)
            .with_context(|| format!("creating `{}`", maps_dir.display()))?;
    }
    for (_, map) in &request.maps {
        let mut bytes = Vec::new();
        map.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )?;
        files.push(bytes);
    }
    for (target, bytes) in targets.iter().zip(&files) {
        write_atomically(target, bytes)
            .with_context(|| format!("exporting `{}`", target.display()))?;
    }
    Ok(targets)
}

/// Encodes `image` in `format`; PNG carries `record` in an `iTXt` chunk.
fn encode(
    image: &image::RgbImage,
    format: ExportFormat,
    record: &serde_json::Value,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    match format {
        ExportFormat::Png => return encode_png(image, &[("p2pz", record.to_string())]),
        ExportFormat::Jpeg => {
            let encoder =
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY);
            image.write_with_encoder(encoder)?;
        }
        ExportFormat::WebP => {
            let encoder = image::codecs::webp::WebPEncoder::new_lossless(&mut bytes);
            image.write_with_encoder(encoder)?;
        }
    }
    Ok(bytes)
}

/// JPEG quality of exports: visually lossless for photos.
const JPEG_QUALITY: u8 = 95;

/// A token label made safe for a file name.
fn file_safe(label: &str) -> String {
    let cleaned: String = label
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { '_' })
        .collect();
    cleaned.trim_matches('_').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_safe_names_keep_letters_only() {
        assert_eq!(file_safe("<|startoftext|>"), "startoftext");
        assert_eq!(file_safe("cat</w>"), "cat__w");
    }

    #[test]
    fn targets_list_every_file_an_export_writes() {
        let labels = vec!["[start]".to_string(), "cat".to_string()];
        let targets = export_targets(Path::new("/out/dog.png"), true, &labels);
        let expected = [
            "/out/dog.png",
            "/out/dog.json",
            "/out/dog-overlay.png",
            "/out/dog-attention/00-start.png",
            "/out/dog-attention/01-cat.png",
        ];
        assert_eq!(targets, expected.map(PathBuf::from));
        assert_eq!(export_targets(Path::new("dog.jpg"), false, &[]).len(), 2);
    }

    #[test]
    fn a_name_without_an_extension_gets_the_format_and_a_wrong_one_is_refused() {
        let png = ExportFormat::Png;
        for typed in ["out2", "out2."] {
            let (path, format) = ExportFormat::resolve(Path::new(typed), png).unwrap();
            assert_eq!((path, format), (PathBuf::from("out2.png"), png));
        }
        let (path, format) = ExportFormat::resolve(Path::new("a/b.JPEG"), png).unwrap();
        assert_eq!(
            (path, format),
            (PathBuf::from("a/b.JPEG"), ExportFormat::Jpeg)
        );
        let error = ExportFormat::resolve(Path::new("out2.txt"), png).unwrap_err();
        assert!(error.to_string().contains(".txt"), "{error}");
    }
}
