#!/usr/bin/env python3
"""Seconds and peak memory of one whole pix2pix-zero edit with diffusers' pipeline, on CPU or CUDA.

Runs diffusers' StableDiffusionPix2PixZeroPipeline (diffusers 0.42.1,
pipelines/deprecated/stable_diffusion_variants, the same import as
tests/fixtures/make_editor_reference.py) on the full-size SD-1.5 architecture with random
weights, built from configs with no download:

  UNet, VAE       UNet2DConditionModel / AutoencoderKL from the SD-1.5 configs of bench_diffusers.py
  text encoder    CLIPTextModel with SD-1.5's config (768 hidden, 12 layers, 12 heads, 3072
                  intermediate, quick_gelu, 77 positions, 49408 tokens), random init
  tokenizer       CLIPTokenizer from tests/fixtures/tiny-sd/tokenizer (vocab.json + merges.txt:
                  the real CLIP vocabulary)
  schedulers      DDIMScheduler / DDIMInverseScheduler.from_config of
                  tests/fixtures/tiny-sd/scheduler/scheduler_config.json (SD's: scaled_linear
                  0.00085..0.012, leading spacing, steps_offset 1, set_alpha_to_one false)
  no safety checker, no BLIP captioner (the caption is given)

on a random image of --size x --size, and times (time.perf_counter; on CUDA each stage is
bracketed by torch.cuda.synchronize()):

  invert          pipe.invert(prompt=caption, image, num_inference_steps=steps, output_type="pt")
                  with diffusers' default noise regularisation (lambda_auto_corr 20, lambda_kl
                  20, num_reg_steps 5, num_auto_corr_rolls 5): VAE encode (posterior sample),
                  `steps` batch-1 UNet forwards, each followed by 5 x (5 auto-correlation + 1 KL)
                  gradient steps on the noise, and the decode of the inverted latent that
                  invert() always does
  source_embeds   pipe.get_embeds(4 source sentences): one batched text-encoder forward, mean
  target_embeds   pipe.get_embeds(4 target sentences)
  edit            pipe(prompt=caption, negative_prompt=caption, source_embeds, target_embeds,
                  num_inference_steps=steps, latents=inverted, guidance_scale=5,
                  cross_attention_guidance_amount=0.1, output_type="pt"): the reference pass
                  (`steps` batch-2 UNet forwards; diffusers copies every cross-attention map to
                  the CPU), the guided pass (`steps` x (batch-2 forward + backward to the latent
                  through the attention-map loss, then a batch-2 forward)), and the VAE decode

total is the sum of the four. Before them an untimed warm-up edit of --warmup-steps steps (default
1; 0: none) runs the same code once, so CUDA/cuDNN initialisation is not counted. Reported: seconds
per stage, total, build seconds, peak RSS (getrusage ru_maxrss, whole process), and on CUDA
torch.cuda.max_memory_allocated() per stage (peak stats reset before each; includes the weights,
gpu_after_build_mb) and its maximum, peak_gpu_mb. The random weights make the images noise (in
float16 possibly inf/NaN, recorded as `finite`); only the cost is meaningful.

Usage (tests/fixtures/requirements.txt, or on a GPU machine its own torch plus bench/gpu_wheels.txt):

    python bench/edit_diffusers.py --device cuda --dtype float16 --json edit-fp16.json
    python bench/edit_diffusers.py --device cuda --dtype float32 --size 512 --steps 50 --json edit-fp32.json
    /work/venv-ref/bin/python bench/edit_diffusers.py --size 64 --steps 2        # CPU smoke test
"""

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.deprecated.stable_diffusion_variants import (  # noqa: E402
    pipeline_stable_diffusion_pix2pix_zero as p2pz_module,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_diffusers import SD15_UNET_CONFIG, SD15_VAE_CONFIG, maxrss_mb, write_json  # noqa: E402

FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "tiny-sd")

SD15_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}

CAPTION = "a photo of a cat"
SOURCE_SENTENCES = [
    "a cat sitting on a couch",
    "a photo of a cat in the garden",
    "a close-up of a cat's face",
    "a cat playing with a ball of yarn",
]
TARGET_SENTENCES = [s.replace("cat", "dog") for s in SOURCE_SENTENCES]
GUIDANCE_SCALE = 5.0
XA_GUIDANCE = 0.1
STAGES = ["invert", "source_embeds", "target_embeds", "edit"]


def build_pipeline(device, dtype):
    """The pipeline on `device` in `dtype`, every model randomly initialised (seed 0) on the CPU."""
    torch.manual_seed(0)
    sched_cfg = DDIMScheduler.load_config(os.path.join(FIXTURE, "scheduler"))
    pipe = p2pz_module.StableDiffusionPix2PixZeroPipeline(
        vae=AutoencoderKL(**SD15_VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(FIXTURE, "tokenizer")),
        unet=UNet2DConditionModel(**SD15_UNET_CONFIG),
        scheduler=DDIMScheduler.from_config(sched_cfg),
        feature_extractor=None,
        safety_checker=None,
        inverse_scheduler=DDIMInverseScheduler.from_config(sched_cfg),
        caption_generator=None,
        caption_processor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.eval().requires_grad_(False)
    return pipe.to(device=device, dtype=dtype)


def run_edit(pipe, image, size, steps, timed):
    """One invert + embeds + edit; `timed(name, fn)` runs each stage and returns its result."""
    inv = timed("invert", lambda: pipe.invert(
        prompt=CAPTION, image=image, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    ))
    src = timed("source_embeds", lambda: pipe.get_embeds(SOURCE_SENTENCES))
    tgt = timed("target_embeds", lambda: pipe.get_embeds(TARGET_SENTENCES))
    out = timed("edit", lambda: pipe(
        prompt=CAPTION, negative_prompt=CAPTION, source_embeds=src, target_embeds=tgt,
        height=size, width=size, num_inference_steps=steps, latents=inv.latents,
        guidance_scale=GUIDANCE_SCALE, cross_attention_guidance_amount=XA_GUIDANCE, output_type="pt",
    ))
    return bool(torch.isfinite(inv.latents).all() and torch.isfinite(out.images).all())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--size", type=int, default=512, help="image side, a multiple of 64 (latent = size/8)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of the inversion and of the edit")
    ap.add_argument("--warmup-steps", type=int, default=1, help="steps of the untimed warm-up edit (0: none)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (matters on CPU)")
    ap.add_argument("--json", help="write the result to this JSON file")
    args = ap.parse_args()
    if args.size % 64:
        ap.error(f"size {args.size} must be a multiple of 64 (UNet needs latent divisible by 8)")

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    pipe = build_pipeline(device, getattr(torch, args.dtype))
    sync()
    build_s = time.perf_counter() - t0
    gpu_build = torch.cuda.memory_allocated(device) / 2**20 if cuda else None
    g = torch.Generator().manual_seed(1)
    image = torch.rand((1, 3, args.size, args.size), generator=g)  # [0,1], preprocess maps to [-1,1]

    if args.warmup_steps > 0:
        run_edit(pipe, image, args.size, args.warmup_steps, lambda name, fn: fn())

    seconds, peak_gpu = {}, {}

    def timed(name, fn):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        seconds[name] = time.perf_counter() - start
        if cuda:
            peak_gpu[name] = torch.cuda.max_memory_allocated(device) / 2**20
        return result

    finite = run_edit(pipe, image, args.size, args.steps, timed)
    total_s = sum(seconds.values())
    peak_gpu_mb = max(peak_gpu.values()) if cuda else None
    gpu_name = torch.cuda.get_device_name(device) if cuda else None

    where = f"{args.device} {gpu_name}" if cuda else f"cpu, {args.threads} threads"
    line = (f"diffusers pix2pix-zero, SD-1.5 random weights, {args.size}x{args.size}, {args.steps} steps, "
            f"{args.dtype}, {where}: " + ", ".join(f"{k} {seconds[k]:.2f} s" for k in STAGES)
            + f", total {total_s:.2f} s (build {build_s:.1f} s), peak RSS {maxrss_mb():.0f} MB")
    if cuda:
        line += f", peak GPU {peak_gpu_mb:.0f} MB (weights {gpu_build:.0f} MB)"
    print(line + ("" if finite else ", outputs not finite"), flush=True)

    if args.json:
        doc = {
            "tool": "bench/edit_diffusers.py",
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "device": args.device,
            "dtype": args.dtype,
            "gpu": gpu_name,
            "cuda": torch.version.cuda if cuda else None,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32 if cuda else None,
            "threads": args.threads,
            "size": args.size,
            "latent": args.size // 8,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "caption": CAPTION,
            "source_sentences": SOURCE_SENTENCES,
            "target_sentences": TARGET_SENTENCES,
            "guidance_scale": GUIDANCE_SCALE,
            "cross_attention_guidance_amount": XA_GUIDANCE,
            "params": {name: sum(p.numel() for p in m.parameters())
                       for name, m in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder))},
            "seconds": seconds,
            "total_s": total_s,
            "build_s": build_s,
            "peak_rss_mb": maxrss_mb(),
            "gpu_after_build_mb": gpu_build,
            "peak_gpu_mb_by_stage": peak_gpu if cuda else None,
            "peak_gpu_mb": peak_gpu_mb,
            "finite": finite,
        }
        write_json(args.json, doc)


if __name__ == "__main__":
    main()
