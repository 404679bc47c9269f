//! Image intake and export: any photo in, a working-size tensor out, and back to the photo's
//! own size at the end.
//!
//! Intake honours EXIF orientation, lays transparent pixels over white, accepts grey and 16-bit
//! images, and resizes so that the long side is the working size (512 by default) with both
//! sides multiples of 64, which the VAE (÷8) and the UNet (÷8 more) need.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::engine::{Error, Result};

/// Image sides must be multiples of this: the VAE divides by 8 and the UNet by 8 again.
pub const SIDE_MULTIPLE: usize = 64;
/// The paper's working size (long side).
pub const DEFAULT_WORKING_SIZE: usize = 512;

/// A photo prepared for the model.
#[derive(Debug, Clone)]
pub struct WorkingImage {
    /// The photo at working size, RGB.
    pub pixels: RgbImage,
    /// The photo's own size after EXIF orientation, `(width, height)`: results are exported at it.
    pub original_size: (u32, u32),
    /// FNV-1a of the file's bytes: identifies the photo in sessions.
    pub hash: u64,
}

/// Working size `(width, height)` for a photo of `(w, h)`: the long side becomes `size`, the short
/// side keeps the aspect ratio, both rounded to multiples of 64 (at least 64).
pub fn working_size((w, h): (u32, u32), size: usize) -> Result<(usize, usize)> {
    if size < SIDE_MULTIPLE || !size.is_multiple_of(SIDE_MULTIPLE) {
        return Err(Error::Input(format!(
            "working size {size} is not a multiple of {SIDE_MULTIPLE}: use e.g. --size 512 or --size 256"
        )));
    }
    let round = |v: f64| ((v / SIDE_MULTIPLE as f64).round() as usize).max(1) * SIDE_MULTIPLE;
    let (w, h) = (w as f64, h as f64);
    Ok(if w >= h {
        (size, round(h * size as f64 / w).min(size))
    } else {
        (round(w * size as f64 / h).min(size), size)
    })
}

/// Lays an image with alpha over white and drops the alpha; grey and 16-bit become 8-bit RGB.
fn flatten_to_rgb(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba32f();
    let (w, h) = rgba.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let over = |c: f32| ((c * a + (1.0 - a)) * 255.0).round().clamp(0.0, 255.0) as u8;
        image::Rgb([over(r), over(g), over(b)])
    })
}

/// Reads a photo at its own size: EXIF orientation applied, flattened to RGB. Also returns the
/// FNV-1a hash of the file's bytes.
pub fn load_oriented(path: &Path) -> Result<(RgbImage, u64)> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Input(format!("cannot read image `{}`: {e}", path.display())))?;
    let unreadable = |e: &dyn std::fmt::Display| {
        Error::Input(format!(
            "`{}` is not a readable image ({e}); use a PNG, JPEG or WebP file",
            path.display()
        ))
    };
    let mut decoder = ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| unreadable(&e))?
        .into_decoder()
        .map_err(|e| unreadable(&e))?;
    let orientation = decoder.orientation().map_err(|e| unreadable(&e))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| unreadable(&e))?;
    image.apply_orientation(orientation);
    Ok((flatten_to_rgb(image), crate::edit::direction::fnv1a(&bytes)))
}

/// Reads a photo, applies its EXIF orientation, flattens it to RGB and resizes it to `size`.
pub fn load(path: &Path, size: usize) -> Result<WorkingImage> {
    let (rgb, hash) = load_oriented(path)?;
    let original_size = rgb.dimensions();
    let (w, h) = working_size(original_size, size)?;
    let pixels = image::imageops::resize(
        &rgb,
        w as u32,
        h as u32,
        image::imageops::FilterType::Lanczos3,
    );
    Ok(WorkingImage {
        pixels,
        original_size,
        hash,
    })
}

/// `(1, 3, h, w)` in `[-1, 1]`, as the VAE expects.
pub fn to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let data: Vec<f32> = image.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    let t = Tensor::from_vec(data, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?;
    Ok(((t * 2.0)? - 1.0)?)
}

/// Resizes a result back to the photo's own size.
pub fn to_original_size(result: &RgbImage, original_size: (u32, u32)) -> RgbImage {
    if result.dimensions() == original_size {
        return result.clone();
    }
    image::imageops::resize(
        result,
        original_size.0,
        original_size.1,
        image::imageops::FilterType::Lanczos3,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_sizes_keep_the_aspect_in_multiples_of_64() {
        assert_eq!(working_size((640, 480), 512).unwrap(), (512, 384));
        assert_eq!(working_size((480, 640), 512).unwrap(), (384, 512));
        assert_eq!(working_size((1000, 1000), 256).unwrap(), (256, 256));
        assert_eq!(working_size((4000, 100), 512).unwrap(), (512, 64));
        assert!(working_size((100, 100), 500).is_err());
    }

    #[test]
    fn exif_orientation_is_applied() {
        use image::ImageEncoder;
        // Left half red, right half blue; EXIF orientation 6 says "rotate 90° clockwise".
        let image = RgbImage::from_fn(64, 32, |x, _| {
            if x < 32 {
                image::Rgb([250, 0, 0])
            } else {
                image::Rgb([0, 0, 250])
            }
        });
        let exif = vec![
            0x49, 0x49, 0x2A, 0x00, 0x08, 0x00, 0x00, 0x00, 0x01, 0x00, 0x12, 0x01, 0x03, 0x00,
            0x01, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        let mut bytes = vec![];
        let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95);
        encoder.set_exif_metadata(exif).unwrap();
        encoder
            .write_image(image.as_raw(), 64, 32, image::ExtendedColorType::Rgb8)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rotated.jpg");
        std::fs::write(&path, bytes).unwrap();
        let loaded = load(&path, 64).unwrap();
        assert_eq!(loaded.original_size, (32, 64), "portrait after rotation");
        assert_eq!(loaded.pixels.dimensions(), (64, 64));
        let top = loaded.pixels.get_pixel(16, 8).0;
        let bottom = loaded.pixels.get_pixel(16, 56).0;
        assert!(
            top[0] > 200 && top[2] < 50,
            "the left (red) half is on top: {top:?}"
        );
        assert!(bottom[2] > 200 && bottom[0] < 50, "{bottom:?}");
    }

    #[test]
    fn transparency_becomes_white_and_greys_become_rgb() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([255, 0, 0, 255]));
        let rgb = flatten_to_rgb(DynamicImage::ImageRgba8(rgba));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 0, 0]);
        let grey16 =
            image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(1, 1, image::Luma([65535u16]));
        assert_eq!(
            flatten_to_rgb(DynamicImage::ImageLuma16(grey16))
                .get_pixel(0, 0)
                .0,
            [255, 255, 255]
        );
    }
}
