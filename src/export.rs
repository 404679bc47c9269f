//! Writing result images: atomically (a temporary file renamed into place, so a crash or a
//! cancel never leaves a half-written file) and with the parameters that made them in PNG text
//! chunks.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "cannot write `{}`: folder `{}` does not exist",
            path.display(),
            dir.display()
        );
    }
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in `{}`", dir.display()))?;
    tmp.write_all(bytes)?;
    #[cfg(unix)]
    {
        // tempfile creates files readable by the owner only; results are ordinary files.
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot write `{}`", path.display()))?;
    Ok(())
}

/// Whether two paths name the same existing file (after resolving links and `..`).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Encodes an RGB image as PNG with `tEXt`/`iTXt` chunks for `text` (key, value) pairs.
pub fn encode_png(image: &image::RgbImage, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            encoder.add_itxt_chunk(key.to_string(), value.clone())?;
        }
        let mut writer = encoder.write_header()?;
        writer.write_image_data(image.as_raw())?;
        writer.finish()?;
    }
    Ok(out)
}

/// Writes `image` as a PNG at `path` atomically, with `text` chunks.
pub fn save_png(path: &Path, image: &image::RgbImage, text: &[(&str, String)]) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext != "png" {
        bail!(
            "`{}`: only .png output is supported here; name the file *.png",
            path.display()
        );
    }
    write_atomically(path, &encode_png(image, text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips_pixels_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        let image =
            image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        save_png(&path, &image, &[("p2pz", "{\"seed\":3}".into())]).unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let reader = decoder.read_info().unwrap();
        let text = &reader.info().utf8_text;
        assert_eq!(text.len(), 1);
        assert_eq!(text[0].keyword, "p2pz");
        assert_eq!(text[0].get_text().unwrap(), "{\"seed\":3}");
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, image);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file is left"
        );
    }

    #[test]
    fn missing_folder_is_named() {
        let err = save_png(
            Path::new("/no/such/dir/x.png"),
            &image::RgbImage::new(1, 1),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("/no/such/dir"), "{err}");
    }
}
