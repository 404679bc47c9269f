// The cross-attention overlay: a heat map, coloured through a lookup table, blended over the
// photo. The CPU twin of this shader is `blend` in src/app/heatmap.rs; keep the two in step.
//
// All colour values are the gamma-encoded (sRGB) numbers of the images, sampled from Unorm
// textures without conversion, and the blend happens in that space, as on the CPU. When the
// render target is an *Srgb format the hardware encodes what we write, so we write linear.

struct Uniforms {
    // Weight of the heat-map colour in [0, 1].
    opacity: f32,
    // 1 when the target format is sRGB-encoding, else 0.
    srgb_target: f32,
    // 1 to draw the heat map, 0 to show the photo alone.
    show_map: f32,
    _padding: f32,
};

@group(0) @binding(0) var<uniform> uniforms: Uniforms;
@group(0) @binding(1) var photo: texture_2d<f32>;
@group(0) @binding(2) var heat: texture_2d<f32>;
@group(0) @binding(3) var colour_lut: texture_2d<f32>;
@group(0) @binding(4) var linear_clamp: sampler;

struct VertexOut {
    @builtin(position) position: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

// One triangle that covers the viewport egui sets to the callback's rectangle.
@vertex
fn vs_main(@builtin(vertex_index) index: u32) -> VertexOut {
    let x = f32((index << 1u) & 2u);
    let y = f32(index & 2u);
    var out: VertexOut;
    out.position = vec4<f32>(x * 2.0 - 1.0, 1.0 - y * 2.0, 0.0, 1.0);
    out.uv = vec2<f32>(x, y);
    return out;
}

fn srgb_to_linear(c: vec3<f32>) -> vec3<f32> {
    let low = c / 12.92;
    let high = pow((c + 0.055) / 1.055, vec3<f32>(2.4));
    return select(high, low, c <= vec3<f32>(0.04045));
}

@fragment
fn fs_main(in: VertexOut) -> @location(0) vec4<f32> {
    let base = textureSample(photo, linear_clamp, in.uv).rgb;
    let value = clamp(textureSample(heat, linear_clamp, in.uv).r, 0.0, 1.0);
    // Texel centres of the 256-entry LUT: 0 → first entry, 1 → last, linear between.
    let lut_u = (value * 255.0 + 0.5) / 256.0;
    let colour = textureSample(colour_lut, linear_clamp, vec2<f32>(lut_u, 0.5)).rgb;
    var rgb = mix(base, colour, uniforms.opacity * uniforms.show_map);
    if (uniforms.srgb_target > 0.5) {
        rgb = srgb_to_linear(rgb);
    }
    return vec4<f32>(rgb, 1.0);
}
