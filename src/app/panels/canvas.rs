//! The canvas: the photo, the edit, their split view or the reconstruction, with the
//! cross-attention overlay on top (the WGSL callback on wgpu, the CPU blend elsewhere).

use std::sync::Arc;

use crate::app::heatmap::{self, HeatMap};
use crate::app::overlay::{self, OverlayFrame};
use crate::app::panels::attention::token_label;
use crate::app::state::{AppState, CompareMode};

/// An image's identity as a cheap revision: a new `Arc` is a new image.
fn revision_of<T>(value: &Arc<T>) -> u64 {
    Arc::as_ptr(value) as usize as u64
}

/// A texture and the identity of the image it was made from.
type CachedTexture = Option<(u64, egui::TextureHandle)>;

/// What the canvas keeps between frames: textures, the current heat map and LUT.
#[derive(Default)]
pub struct CanvasView {
    /// Whether the wgpu overlay is installed (else the CPU blend is drawn).
    pub gpu_overlay: bool,
    /// Draw the image at one image pixel per screen pixel instead of fitting the window.
    pub actual_size: bool,
    base: CachedTexture,
    second: CachedTexture,
    blended: CachedTexture,
    heat: Option<(HeatKey, Arc<HeatMap>, u64)>,
    lut: Option<(crate::app::heatmap::Colormap, Arc<Vec<[u8; 4]>>)>,
    heat_revisions: u64,
    /// Where the image was drawn last frame, in points.
    pub image_rect: Option<egui::Rect>,
}

impl std::fmt::Debug for CanvasView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CanvasView")
            .field("gpu_overlay", &self.gpu_overlay)
            .field("image_rect", &self.image_rect)
            .finish_non_exhaustive()
    }
}

/// What selects a heat map.
#[derive(Debug, Clone, Copy, PartialEq)]
struct HeatKey {
    attention_revision: u64,
    token: usize,
    step: Option<usize>,
    view: heatmap::MapView,
    resolution: heatmap::ResolutionFilter,
}

fn texture(
    ctx: &egui::Context,
    cache: &mut CachedTexture,
    name: &str,
    image: &Arc<image::RgbImage>,
) -> egui::TextureId {
    let key = revision_of(image);
    if cache.as_ref().is_none_or(|(k, _)| *k != key) {
        let size = [image.width() as usize, image.height() as usize];
        let color = egui::ColorImage::from_rgb(size, image.as_raw());
        *cache = Some((
            key,
            ctx.load_texture(name, color, egui::TextureOptions::LINEAR),
        ));
    }
    cache.as_ref().expect("just set").1.id()
}

impl CanvasView {
    /// The image the canvas shows as its base in the current mode.
    pub fn base_image(state: &AppState) -> Option<Arc<image::RgbImage>> {
        let photo = state.photo.as_ref()?.working.clone();
        let edited = state
            .preview
            .as_ref()
            .map(|(_, image)| image.clone())
            .or_else(|| state.result.as_ref().map(|r| r.image.clone()));
        Some(match state.compare {
            CompareMode::Original | CompareMode::Split(_) => photo,
            CompareMode::Edited => edited.unwrap_or(photo),
            CompareMode::Reconstruction => state
                .result
                .as_ref()
                .and_then(|r| r.reconstruction.clone())
                .unwrap_or(photo),
        })
    }

    /// The heat map the overlay shows now, cached until its selection changes.
    pub fn heat_map(&mut self, state: &AppState) -> Option<Arc<HeatMap>> {
        let o = &state.persisted.overlay;
        let token = state.overlay_token()?;
        let key = HeatKey {
            attention_revision: state.attention_revision,
            token,
            step: o.step,
            view: o.view,
            resolution: o.resolution,
        };
        if let Some((k, map, _)) = &self.heat {
            if *k == key {
                return Some(map.clone());
            }
        }
        let step = state.overlay_step()?;
        let raw = heatmap::raw_map(step, token, o.view, o.resolution)?;
        let map = Arc::new(heatmap::normalise(raw, o.view));
        self.heat_revisions += 1;
        self.heat = Some((key, map.clone(), self.heat_revisions));
        Some(map)
    }

    fn heat_revision(&self) -> u64 {
        self.heat.as_ref().map(|h| h.2).unwrap_or(0)
    }

    fn lut(&mut self, state: &AppState) -> Arc<Vec<[u8; 4]>> {
        let colormap = state.persisted.overlay.colormap;
        if self.lut.as_ref().is_none_or(|(c, _)| *c != colormap) {
            self.lut = Some((colormap, Arc::new(colormap.lut())));
        }
        self.lut.as_ref().expect("just set").1.clone()
    }

    /// The overlay as shown, blended on the CPU at working size (for export).
    pub fn overlay_image(&mut self, state: &AppState) -> Option<image::RgbImage> {
        let base = Self::base_image(state)?;
        let map = self.heat_map(state)?;
        let lut = self.lut(state);
        Some(heatmap::blend(
            &base,
            &map,
            &lut,
            state.persisted.overlay.opacity,
        ))
    }

    /// One gray map per caption token at the photo's own size, like the exported edit.
    pub fn token_maps(&self, state: &AppState) -> Vec<(String, image::GrayImage)> {
        let Some(photo) = &state.photo else {
            return vec![];
        };
        let Some(step) = state.overlay_step() else {
            return vec![];
        };
        let (w, h) = photo.original_size;
        let o = &state.persisted.overlay;
        state
            .current_tokens()
            .iter()
            .enumerate()
            .filter_map(|(i, token)| {
                let raw = heatmap::raw_map(step, i, o.view, o.resolution)?;
                let map = heatmap::normalise(raw, o.view);
                Some((token_label(token), heatmap::to_gray(&map, w, h)))
            })
            .collect()
    }

    /// Draws the canvas into `ui`.
    pub fn show(&mut self, ui: &mut egui::Ui, state: &mut AppState) {
        let Some(base) = Self::base_image(state) else {
            self.image_rect = None;
            ui.centered_and_justified(|ui| {
                ui.label(
                    "Open a photo: Ctrl+O, drop a file on this window, or type its path on the left.",
                );
            });
            return;
        };
        // Every view is drawn at the photo's own shape: the working image's sides are rounded
        // to multiples of 64, which would stretch it. "Actual pixels" keeps the working width.
        let (ow, oh) = state.photo.as_ref().map_or((1, 1), |p| p.original_size);
        let image_size = egui::vec2(
            base.width() as f32,
            base.width() as f32 * oh as f32 / ow as f32,
        );
        // Room under the image for the colour legend.
        let available = ui.available_size() - egui::vec2(0.0, 24.0);
        let scale = if self.actual_size {
            1.0 / ui.ctx().pixels_per_point()
        } else {
            (available.x / image_size.x)
                .min(available.y / image_size.y)
                .max(0.01)
        };
        let size = image_size * scale;
        let offset = ((available - size) * 0.5).max(egui::Vec2::ZERO);
        let top_left = (ui.cursor().min + offset).round();
        let rect = egui::Rect::from_min_size(top_left, size);
        let response = ui.allocate_rect(rect, egui::Sense::click_and_drag());
        self.image_rect = Some(rect);
        let full_uv = egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0));

        if let CompareMode::Split(at) = state.compare {
            self.show_split(ui, state, &response, rect, at, &base);
            return;
        }
        let map = if state.persisted.overlay.enabled {
            self.heat_map(state)
        } else {
            None
        };
        if let Some(map) = &map {
            self.legend(ui, state, rect, map);
        }
        match map {
            Some(map) if self.gpu_overlay => {
                let lut = self.lut(state);
                let colormap = state.persisted.overlay.colormap as u64;
                overlay::paint(
                    ui,
                    rect,
                    OverlayFrame {
                        photo_revision: revision_of(&base),
                        photo: base,
                        map_revision: self.heat_revision(),
                        map,
                        lut,
                        lut_revision: colormap,
                        opacity: state.persisted.overlay.opacity,
                        show_map: true,
                    },
                );
            }
            Some(map) => {
                // The CPU fallback re-blends only when an input changed.
                let key = revision_of(&base)
                    ^ self.heat_revision().rotate_left(32)
                    ^ (state.persisted.overlay.opacity.to_bits() as u64).rotate_left(16)
                    ^ state.persisted.overlay.colormap as u64;
                if self.blended.as_ref().is_none_or(|(k, _)| *k != key) {
                    let lut = self.lut(state);
                    let opacity = state.persisted.overlay.opacity;
                    let blended = heatmap::blend(&base, &map, &lut, opacity);
                    let size = [blended.width() as usize, blended.height() as usize];
                    let color = egui::ColorImage::from_rgb(size, blended.as_raw());
                    let options = egui::TextureOptions::LINEAR;
                    let handle = ui.ctx().load_texture("p2pz-overlay", color, options);
                    self.blended = Some((key, handle));
                }
                let id = self.blended.as_ref().expect("just set").1.id();
                ui.painter().image(id, rect, full_uv, egui::Color32::WHITE);
            }
            None => {
                let id = texture(ui.ctx(), &mut self.base, "p2pz-base", &base);
                ui.painter().image(id, rect, full_uv, egui::Color32::WHITE);
            }
        }
        if response.double_clicked() {
            self.actual_size = !self.actual_size;
        }
    }

    /// A colour strip under the image with the raw probabilities its ends stand for.
    fn legend(&mut self, ui: &egui::Ui, state: &AppState, image: egui::Rect, map: &HeatMap) {
        let lut = self.lut(state);
        let width = image.width().clamp(120.0, 260.0);
        let strip = egui::Rect::from_min_size(
            egui::pos2(image.left(), image.bottom() + 6.0),
            egui::vec2(width, 10.0),
        );
        let painter = ui.painter();
        let segments = 64;
        for i in 0..segments {
            let t = (i as f32 + 0.5) / segments as f32;
            let [r, g, b] = heatmap::lut_colour(&lut, t).map(|c| (c * 255.0).round() as u8);
            let x0 = strip.left() + strip.width() * i as f32 / segments as f32;
            let x1 = strip.left() + strip.width() * (i + 1) as f32 / segments as f32;
            let cell = egui::Rect::from_x_y_ranges(x0..=x1, strip.y_range());
            painter.rect_filled(cell, 0.0, egui::Color32::from_rgb(r, g, b));
        }
        let text = format!(
            "{} attention: {}",
            state.persisted.overlay.view.label(),
            heatmap::range_label(map.low, map.high)
        );
        painter.text(
            egui::pos2(strip.right() + 8.0, strip.center().y),
            egui::Align2::LEFT_CENTER,
            text,
            egui::FontId::proportional(12.0),
            ui.visuals().text_color(),
        );
    }

    fn show_split(
        &mut self,
        ui: &mut egui::Ui,
        state: &mut AppState,
        response: &egui::Response,
        rect: egui::Rect,
        at: f32,
        photo: &Arc<image::RgbImage>,
    ) {
        let edited = state
            .result
            .as_ref()
            .map(|r| r.image.clone())
            .unwrap_or_else(|| photo.clone());
        let left = texture(ui.ctx(), &mut self.base, "p2pz-base", photo);
        let right = texture(ui.ctx(), &mut self.second, "p2pz-edited", &edited);
        let x = rect.left() + rect.width() * at;
        let left_rect = egui::Rect::from_min_max(rect.min, egui::pos2(x, rect.bottom()));
        let right_rect = egui::Rect::from_min_max(egui::pos2(x, rect.top()), rect.max);
        let uv = |a: f32, b: f32| egui::Rect::from_min_max(egui::pos2(a, 0.0), egui::pos2(b, 1.0));
        let painter = ui.painter();
        painter.image(left, left_rect, uv(0.0, at), egui::Color32::WHITE);
        painter.image(right, right_rect, uv(at, 1.0), egui::Color32::WHITE);
        painter.vline(
            x,
            rect.y_range(),
            egui::Stroke::new(2.0, egui::Color32::WHITE),
        );
        // Which side is which, as labels a screen reader (and a test) can find.
        let tag = egui::vec2(76.0, 22.0);
        let inset = egui::vec2(8.0, 8.0);
        let corners = [
            ("Original", rect.left_top() + inset),
            (
                "Edited",
                rect.right_top() + egui::vec2(-inset.x - tag.x, inset.y),
            ),
        ];
        for (text, corner) in corners {
            let text = egui::RichText::new(text)
                .color(egui::Color32::WHITE)
                .background_color(egui::Color32::from_black_alpha(160));
            ui.put(
                egui::Rect::from_min_size(corner, tag),
                egui::Label::new(text),
            );
        }
        if let Some(pos) = response.interact_pointer_pos() {
            if response.dragged() || response.clicked() {
                let at = ((pos.x - rect.left()) / rect.width()).clamp(0.0, 1.0);
                state.compare = CompareMode::Split(at);
            }
        }
    }
}
