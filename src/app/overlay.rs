//! The cross-attention overlay on the GPU: a wgpu paint callback that runs
//! `shaders/overlay.wgsl` inside egui's render pass.
//!
//! The pipeline, sampler, uniform buffer and textures are made once and kept in egui-wgpu's
//! callback resources. The photo, the heat map and the colour table are uploaded only when their
//! revision changes; every other frame writes a 16-byte uniform and draws one triangle, so the
//! cost per frame does not grow with the photo. The CPU twin of the blend is
//! [`heatmap::blend`](super::heatmap::blend).

use std::num::NonZeroU64;
use std::sync::Arc;

use eframe::egui_wgpu::{self, wgpu};

use super::heatmap::HeatMap;

/// The WGSL source, compiled into the binary.
pub const SHADER: &str = include_str!("../../shaders/overlay.wgsl");

/// What one frame of the overlay draws. Revisions tell `prepare` what to upload.
#[derive(Debug, Clone)]
pub struct OverlayFrame {
    /// The photo under the map.
    pub photo: Arc<image::RgbImage>,
    /// Changes whenever `photo` does.
    pub photo_revision: u64,
    /// The normalised heat map.
    pub map: Arc<HeatMap>,
    /// Changes whenever `map` does.
    pub map_revision: u64,
    /// The colour lookup table (256 RGBA entries).
    pub lut: Arc<Vec<[u8; 4]>>,
    /// Changes whenever `lut` does.
    pub lut_revision: u64,
    /// Weight of the map's colour, `[0, 1]`.
    pub opacity: f32,
    /// Whether to draw the map at all.
    pub show_map: bool,
}

/// The uniform block of the shader (16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Uniforms {
    opacity: f32,
    srgb_target: f32,
    show_map: f32,
    padding: f32,
}

/// A texture and the revision of the data in it.
struct Uploaded {
    revision: u64,
    size: (u32, u32),
    texture: wgpu::Texture,
    view: wgpu::TextureView,
}

/// GPU objects that live as long as the renderer.
struct OverlayResources {
    pipeline: wgpu::RenderPipeline,
    layout: wgpu::BindGroupLayout,
    sampler: wgpu::Sampler,
    uniforms: wgpu::Buffer,
    srgb_target: bool,
    photo: Option<Uploaded>,
    map: Option<Uploaded>,
    lut: Option<Uploaded>,
    bind_group: Option<wgpu::BindGroup>,
}

/// Creates the pipeline and registers the overlay's resources with egui's renderer.
pub fn install(render_state: &egui_wgpu::RenderState) {
    let device = &render_state.device;
    let shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("p2pz overlay"),
        source: wgpu::ShaderSource::Wgsl(SHADER.into()),
    });
    let texture_entry = |binding: u32| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::FRAGMENT,
        ty: wgpu::BindingType::Texture {
            sample_type: wgpu::TextureSampleType::Float { filterable: true },
            view_dimension: wgpu::TextureViewDimension::D2,
            multisampled: false,
        },
        count: None,
    };
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("p2pz overlay"),
        entries: &[
            wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: NonZeroU64::new(std::mem::size_of::<Uniforms>() as u64),
                },
                count: None,
            },
            texture_entry(1),
            texture_entry(2),
            texture_entry(3),
            wgpu::BindGroupLayoutEntry {
                binding: 4,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Sampler(wgpu::SamplerBindingType::Filtering),
                count: None,
            },
        ],
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("p2pz overlay"),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
        label: Some("p2pz overlay"),
        layout: Some(&pipeline_layout),
        vertex: wgpu::VertexState {
            module: &shader,
            entry_point: Some("vs_main"),
            buffers: &[],
            compilation_options: wgpu::PipelineCompilationOptions::default(),
        },
        fragment: Some(wgpu::FragmentState {
            module: &shader,
            entry_point: Some("fs_main"),
            targets: &[Some(render_state.target_format.into())],
            compilation_options: wgpu::PipelineCompilationOptions::default(),
        }),
        primitive: wgpu::PrimitiveState::default(),
        depth_stencil: None,
        multisample: wgpu::MultisampleState::default(),
        multiview_mask: None,
        cache: None,
    });
    let sampler = device.create_sampler(&wgpu::SamplerDescriptor {
        label: Some("p2pz overlay"),
        address_mode_u: wgpu::AddressMode::ClampToEdge,
        address_mode_v: wgpu::AddressMode::ClampToEdge,
        mag_filter: wgpu::FilterMode::Linear,
        min_filter: wgpu::FilterMode::Linear,
        ..Default::default()
    });
    let uniforms = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("p2pz overlay"),
        size: std::mem::size_of::<Uniforms>() as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    render_state
        .renderer
        .write()
        .callback_resources
        .insert(OverlayResources {
            pipeline,
            layout,
            sampler,
            uniforms,
            srgb_target: render_state.target_format.is_srgb(),
            photo: None,
            map: None,
            lut: None,
            bind_group: None,
        });
}

/// Uploads `bytes` (tightly packed rows) into `slot`, recreating the texture when the size
/// changed. Returns whether anything was uploaded.
fn upload(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    slot: &mut Option<Uploaded>,
    revision: u64,
    (width, height): (u32, u32),
    format: wgpu::TextureFormat,
    bytes: impl FnOnce() -> Vec<u8>,
) -> bool {
    if slot.as_ref().is_some_and(|u| u.revision == revision) {
        return false;
    }
    let size = wgpu::Extent3d {
        width,
        height,
        depth_or_array_layers: 1,
    };
    let reusable = slot.take().filter(|u| u.size == (width, height));
    let (texture, view) = match reusable {
        Some(u) => (u.texture, u.view),
        None => {
            let texture = device.create_texture(&wgpu::TextureDescriptor {
                label: Some("p2pz overlay"),
                size,
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format,
                usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                view_formats: &[],
            });
            let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
            (texture, view)
        }
    };
    let bytes_per_texel = format.block_copy_size(None).unwrap_or(4);
    queue.write_texture(
        wgpu::TexelCopyTextureInfo {
            texture: &texture,
            mip_level: 0,
            origin: wgpu::Origin3d::ZERO,
            aspect: wgpu::TextureAspect::All,
        },
        &bytes(),
        wgpu::TexelCopyBufferLayout {
            offset: 0,
            bytes_per_row: Some(width * bytes_per_texel),
            rows_per_image: Some(height),
        },
        size,
    );
    *slot = Some(Uploaded {
        revision,
        size: (width, height),
        texture,
        view,
    });
    true
}

impl egui_wgpu::CallbackTrait for OverlayFrame {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        _screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(res) = resources.get_mut::<OverlayResources>() else {
            return Vec::new();
        };
        let photo = &self.photo;
        let mut changed = upload(
            device,
            queue,
            &mut res.photo,
            self.photo_revision,
            photo.dimensions(),
            wgpu::TextureFormat::Rgba8Unorm,
            || {
                photo
                    .pixels()
                    .flat_map(|p| [p.0[0], p.0[1], p.0[2], 255])
                    .collect()
            },
        );
        let map = &self.map;
        changed |= upload(
            device,
            queue,
            &mut res.map,
            self.map_revision,
            (map.width as u32, map.height as u32),
            wgpu::TextureFormat::R16Float,
            || {
                map.values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect()
            },
        );
        let lut = &self.lut;
        changed |= upload(
            device,
            queue,
            &mut res.lut,
            self.lut_revision,
            (lut.len() as u32, 1),
            wgpu::TextureFormat::Rgba8Unorm,
            || lut.iter().flatten().copied().collect(),
        );
        if changed || res.bind_group.is_none() {
            fn view(u: &Option<Uploaded>) -> &wgpu::TextureView {
                &u.as_ref().expect("uploaded above").view
            }
            res.bind_group = Some(device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("p2pz overlay"),
                layout: &res.layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: res.uniforms.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: wgpu::BindingResource::TextureView(view(&res.photo)),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: wgpu::BindingResource::TextureView(view(&res.map)),
                    },
                    wgpu::BindGroupEntry {
                        binding: 3,
                        resource: wgpu::BindingResource::TextureView(view(&res.lut)),
                    },
                    wgpu::BindGroupEntry {
                        binding: 4,
                        resource: wgpu::BindingResource::Sampler(&res.sampler),
                    },
                ],
            }));
        }
        let uniforms = Uniforms {
            opacity: self.opacity.clamp(0.0, 1.0),
            srgb_target: if res.srgb_target { 1.0 } else { 0.0 },
            show_map: if self.show_map { 1.0 } else { 0.0 },
            padding: 0.0,
        };
        queue.write_buffer(&res.uniforms, 0, bytemuck::bytes_of(&uniforms));
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        render_pass: &mut wgpu::RenderPass<'static>,
        resources: &egui_wgpu::CallbackResources,
    ) {
        let Some(res) = resources.get::<OverlayResources>() else {
            return;
        };
        let Some(bind_group) = &res.bind_group else {
            return;
        };
        render_pass.set_pipeline(&res.pipeline);
        render_pass.set_bind_group(0, bind_group, &[]);
        render_pass.draw(0..3, 0..1);
    }
}

/// Adds the overlay to `ui`'s painter over `rect`.
pub fn paint(ui: &egui::Ui, rect: egui::Rect, frame: OverlayFrame) {
    ui.painter()
        .add(egui_wgpu::Callback::new_paint_callback(rect, frame));
}
