//! The overlay's data on the CPU: which heat map to show (token, step, view, resolution),
//! the colour scales, and the blend of a heat map over a photo.
//!
//! [`blend`] is the CPU twin of `shaders/overlay.wgsl`: the same bilinear sampling, colour
//! lookup and mix, so it is the shader's test oracle, the export path, and the fallback when the
//! renderer has no wgpu.

use crate::worker::StepAttention;

/// Which pass's attention the overlay shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MapView {
    /// The reference pass (the photo as inverted).
    Reference,
    /// The edited pass.
    Edited,
    /// `|edited − reference|`: where the edit moved the attention.
    Difference,
}

impl MapView {
    /// Every view, for pickers.
    pub const ALL: [MapView; 3] = [MapView::Reference, MapView::Edited, MapView::Difference];

    /// The label shown in the UI.
    pub fn label(self) -> &'static str {
        match self {
            MapView::Reference => "Reference",
            MapView::Edited => "Edited",
            MapView::Difference => "Difference",
        }
    }
}

/// Which UNet resolutions are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResolutionFilter {
    /// Every resolution, each upsampled to the largest grid.
    All,
    /// Only the layers whose latent grid has this many rows.
    Rows(usize),
}

/// A heat map normalised to `[0, 1]`, with the raw range it was stretched from.
#[derive(Debug, Clone, PartialEq)]
pub struct HeatMap {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Row-major values in `[0, 1]`.
    pub values: Vec<f32>,
    /// The raw value that became 0.
    pub low: f32,
    /// The raw value that became 1.
    pub high: f32,
}

/// Upsamples a `(h, w)` grid to `(height, width)` by repeating cells (the factors are integers
/// for UNet resolutions).
fn upsample_nearest(
    values: &[f32],
    (h, w): (usize, usize),
    (height, width): (usize, usize),
) -> Vec<f32> {
    let mut out = Vec::with_capacity(height * width);
    for y in 0..height {
        let sy = y * h / height;
        for x in 0..width {
            out.push(values[sy * w + x * w / width]);
        }
    }
    out
}

/// The raw (un-normalised) map of `token` in `step` for `view` and `resolution`; `None` when
/// the step has no grid of that resolution or the view has no edited maps.
pub fn raw_map(
    step: &StepAttention,
    token: usize,
    view: MapView,
    resolution: ResolutionFilter,
) -> Option<(usize, usize, Vec<f32>)> {
    let grids: Vec<_> = step
        .grids
        .iter()
        .filter(|g| match resolution {
            ResolutionFilter::All => true,
            ResolutionFilter::Rows(rows) => g.height == rows,
        })
        .collect();
    let largest = grids.first()?;
    let size = (largest.height, largest.width);
    let mut sum = vec![0.0f32; size.0 * size.1];
    for grid in &grids {
        let reference = grid.token_map(&grid.reference, token);
        let values = match view {
            MapView::Reference => reference,
            MapView::Edited => grid.token_map(grid.edited.as_ref()?, token),
            MapView::Difference => {
                let edited = grid.token_map(grid.edited.as_ref()?, token);
                edited
                    .iter()
                    .zip(&reference)
                    .map(|(e, r)| (e - r).abs())
                    .collect()
            }
        };
        let up = upsample_nearest(&values, (grid.height, grid.width), size);
        for (s, v) in sum.iter_mut().zip(up) {
            *s += v / grids.len() as f32;
        }
    }
    Some((size.0, size.1, sum))
}

/// Stretches `values` to `[0, 1]` (min–max; the difference view keeps 0 at 0).
pub fn normalise((height, width, values): (usize, usize, Vec<f32>), view: MapView) -> HeatMap {
    let high = values.iter().copied().fold(f32::MIN, f32::max);
    let low = match view {
        MapView::Difference => 0.0,
        _ => values.iter().copied().fold(f32::MAX, f32::min),
    };
    let span = high - low;
    let values = values
        .iter()
        .map(|v| {
            if span > 0.0 {
                ((v - low) / span).clamp(0.0, 1.0)
            } else {
                0.0
            }
        })
        .collect();
    HeatMap {
        width,
        height,
        values,
        low,
        high,
    }
}

/// A map's raw range for its legend, with the digits it takes to tell the ends apart:
/// `0.012 to 0.480`, `0.20012 to 0.20047`, `0 to 3.1e-5`.
pub fn range_label(low: f32, high: f32) -> String {
    let largest = low.abs().max(high.abs());
    if largest == 0.0 {
        return "0 to 0".into();
    }
    if largest < 1e-3 {
        let small = |v: f32| {
            if v == 0.0 {
                "0".to_string()
            } else {
                format!("{v:.1e}")
            }
        };
        return format!("{} to {}", small(low), small(high));
    }
    let span = (high - low).abs();
    let decimals = if span > 0.0 {
        (1 - span.log10().floor() as i32).clamp(3, 8) as usize
    } else {
        3
    };
    format!("{low:.decimals$} to {high:.decimals$}")
}

/// A colour scale for heat maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Colormap {
    /// Black → purple → orange → pale yellow (perceptually uniform).
    Inferno,
    /// Purple → teal → yellow (perceptually uniform).
    Viridis,
    /// Black → white.
    Gray,
}

/// Samples of matplotlib's inferno at nine even stops.
const INFERNO: [[u8; 3]; 9] = [
    [0, 0, 4],
    [31, 12, 72],
    [85, 15, 109],
    [136, 34, 106],
    [186, 54, 85],
    [227, 89, 51],
    [249, 140, 10],
    [249, 201, 50],
    [252, 255, 164],
];

/// Samples of matplotlib's viridis at nine even stops.
const VIRIDIS: [[u8; 3]; 9] = [
    [68, 1, 84],
    [71, 45, 123],
    [59, 82, 139],
    [44, 114, 142],
    [33, 145, 140],
    [40, 174, 128],
    [94, 201, 98],
    [173, 220, 48],
    [253, 231, 37],
];

/// Entries of a colour lookup table.
pub const LUT_SIZE: usize = 256;

impl Colormap {
    /// Every scale, for pickers.
    pub const ALL: [Colormap; 3] = [Colormap::Inferno, Colormap::Viridis, Colormap::Gray];

    /// The label shown in the UI.
    pub fn label(self) -> &'static str {
        match self {
            Colormap::Inferno => "Inferno",
            Colormap::Viridis => "Viridis",
            Colormap::Gray => "Gray",
        }
    }

    /// The scale as a 256-entry RGBA lookup table (what the shader samples).
    pub fn lut(self) -> Vec<[u8; 4]> {
        (0..LUT_SIZE)
            .map(|i| {
                let t = i as f32 / (LUT_SIZE - 1) as f32;
                let [r, g, b] = match self {
                    Colormap::Gray => {
                        let v = (t * 255.0).round() as u8;
                        [v, v, v]
                    }
                    Colormap::Inferno => interpolate(&INFERNO, t),
                    Colormap::Viridis => interpolate(&VIRIDIS, t),
                };
                [r, g, b, 255]
            })
            .collect()
    }
}

/// Piecewise-linear interpolation between evenly spaced colour stops.
fn interpolate(stops: &[[u8; 3]], t: f32) -> [u8; 3] {
    let x = t.clamp(0.0, 1.0) * (stops.len() - 1) as f32;
    let i = (x.floor() as usize).min(stops.len() - 2);
    let f = x - i as f32;
    let mut out = [0u8; 3];
    for c in 0..3 {
        let v = stops[i][c] as f32 * (1.0 - f) + stops[i + 1][c] as f32 * f;
        out[c] = v.round() as u8;
    }
    out
}

/// Bilinear sample of a `(height, width)` grid at texture coordinates `(u, v)` in `[0, 1]`,
/// with texel centres at `(i + ½)/n` and clamped edges: what a GPU's linear sampler does.
pub fn sample_bilinear(values: &[f32], width: usize, height: usize, u: f32, v: f32) -> f32 {
    let x = (u * width as f32 - 0.5).clamp(0.0, (width - 1) as f32);
    let y = (v * height as f32 - 0.5).clamp(0.0, (height - 1) as f32);
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(width - 1), (y0 + 1).min(height - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let at = |xx: usize, yy: usize| values[yy * width + xx];
    let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
    let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// The colour of `value` in `[0, 1]`, linearly interpolated between LUT entries, as the shader
/// samples the LUT texture at `(value·255 + ½)/256`. Channels in `[0, 1]`.
pub fn lut_colour(lut: &[[u8; 4]], value: f32) -> [f32; 3] {
    let x = value.clamp(0.0, 1.0) * (lut.len() - 1) as f32;
    let i = (x.floor() as usize).min(lut.len() - 2);
    let f = x - i as f32;
    let mut out = [0.0; 3];
    for (c, o) in out.iter_mut().enumerate() {
        *o = (lut[i][c] as f32 * (1.0 - f) + lut[i + 1][c] as f32 * f) / 255.0;
    }
    out
}

/// Blends `map` over `photo` with `opacity`, per pixel in gamma-encoded space:
/// `mix(photo, lut(bilinear(map)), opacity)`. The result has the photo's size.
pub fn blend(
    photo: &image::RgbImage,
    map: &HeatMap,
    lut: &[[u8; 4]],
    opacity: f32,
) -> image::RgbImage {
    let (w, h) = photo.dimensions();
    let a = opacity.clamp(0.0, 1.0);
    image::RgbImage::from_fn(w, h, |x, y| {
        let u = (x as f32 + 0.5) / w as f32;
        let v = (y as f32 + 0.5) / h as f32;
        let value = sample_bilinear(&map.values, map.width, map.height, u, v);
        let colour = lut_colour(lut, value);
        let p = photo.get_pixel(x, y).0;
        let mut out = [0u8; 3];
        for c in 0..3 {
            let base = p[c] as f32 / 255.0;
            out[c] = ((base * (1.0 - a) + colour[c] * a) * 255.0).round() as u8;
        }
        image::Rgb(out)
    })
}

/// The heat map alone as a gray image of `(width, height)`, bilinearly upsampled.
pub fn to_gray(map: &HeatMap, width: u32, height: u32) -> image::GrayImage {
    image::GrayImage::from_fn(width, height, |x, y| {
        let u = (x as f32 + 0.5) / width as f32;
        let v = (y as f32 + 0.5) / height as f32;
        let value = sample_bilinear(&map.values, map.width, map.height, u, v);
        image::Luma([(value.clamp(0.0, 1.0) * 255.0).round() as u8])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::AttentionGrid;

    fn step() -> StepAttention {
        // Two tokens; a 2×2 grid and a 1×1 grid.
        StepAttention {
            index: 0,
            total: 1,
            timestep: 981,
            grids: vec![
                AttentionGrid {
                    height: 2,
                    width: 2,
                    layers: 1,
                    tokens: 2,
                    reference: vec![0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6],
                    edited: Some(vec![0.1, 0.9, 0.5, 0.5, 0.3, 0.7, 0.4, 0.6]),
                },
                AttentionGrid {
                    height: 1,
                    width: 1,
                    layers: 1,
                    tokens: 2,
                    reference: vec![0.5, 0.5],
                    edited: None,
                },
            ],
        }
    }

    #[test]
    fn resolution_filter_and_views_pick_the_right_values() {
        let s = step();
        let (h, w, v) = raw_map(&s, 0, MapView::Reference, ResolutionFilter::Rows(2)).unwrap();
        assert_eq!((h, w), (2, 2));
        assert_eq!(v, vec![0.1, 0.2, 0.3, 0.4]);
        let (_, _, d) = raw_map(&s, 0, MapView::Difference, ResolutionFilter::Rows(2)).unwrap();
        assert!((d[1] - 0.3).abs() < 1e-6 && d[0] == 0.0);
        // "All" averages the 1×1 grid in, upsampled; the 1×1 grid has no edited maps.
        let (_, _, all) = raw_map(&s, 0, MapView::Reference, ResolutionFilter::All).unwrap();
        assert!((all[0] - 0.3).abs() < 1e-6);
        assert!(raw_map(&s, 0, MapView::Edited, ResolutionFilter::All).is_none());
        assert!(raw_map(&s, 0, MapView::Reference, ResolutionFilter::Rows(8)).is_none());
    }

    #[test]
    fn range_labels_show_the_difference_between_their_ends() {
        assert_eq!(range_label(0.012, 0.48), "0.012 to 0.480");
        assert_eq!(range_label(0.20012, 0.20047), "0.20012 to 0.20047");
        assert_eq!(range_label(0.0, 3.1e-5), "0 to 3.1e-5");
        assert_eq!(range_label(0.0, 0.0), "0 to 0");
    }

    #[test]
    fn normalise_stretches_to_unit_range() {
        let m = normalise((1, 3, vec![0.25, 0.5, 0.75]), MapView::Reference);
        assert_eq!(m.values, vec![0.0, 0.5, 1.0]);
        assert_eq!((m.low, m.high), (0.25, 0.75));
        let d = normalise((1, 2, vec![0.125, 0.25]), MapView::Difference);
        assert_eq!(d.values, vec![0.5, 1.0]);
    }

    #[test]
    fn bilinear_matches_texel_centres_and_interpolates_between() {
        let v = [0.0, 1.0];
        assert_eq!(sample_bilinear(&v, 2, 1, 0.25, 0.5), 0.0);
        assert_eq!(sample_bilinear(&v, 2, 1, 0.75, 0.5), 1.0);
        assert!((sample_bilinear(&v, 2, 1, 0.5, 0.5) - 0.5).abs() < 1e-6);
        assert_eq!(sample_bilinear(&v, 2, 1, 0.0, 0.5), 0.0);
    }

    #[test]
    fn blend_mixes_photo_and_colour_by_opacity() {
        let photo = image::RgbImage::from_pixel(2, 2, image::Rgb([200, 100, 0]));
        let map = HeatMap {
            width: 1,
            height: 1,
            values: vec![1.0],
            low: 0.0,
            high: 1.0,
        };
        let lut = Colormap::Gray.lut();
        assert_eq!(
            blend(&photo, &map, &lut, 0.0).get_pixel(0, 0).0,
            [200, 100, 0]
        );
        assert_eq!(
            blend(&photo, &map, &lut, 1.0).get_pixel(1, 1).0,
            [255, 255, 255]
        );
        assert_eq!(
            blend(&photo, &map, &lut, 0.5).get_pixel(0, 1).0,
            [228, 178, 128]
        );
    }

    #[test]
    fn colour_scales_run_from_dark_to_light() {
        for map in Colormap::ALL {
            let lut = map.lut();
            let luma = |c: [u8; 4]| c[0] as u32 * 3 + c[1] as u32 * 6 + c[2] as u32;
            assert!(
                luma(lut[0]) < luma(lut[128]) && luma(lut[128]) < luma(lut[255]),
                "{map:?}"
            );
        }
    }
}
