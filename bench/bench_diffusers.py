#!/usr/bin/env python3
"""Baseline timings of diffusers' full-size SD-1.5 UNet and VAE (random weights), on CPU or CUDA.

Builds UNet2DConditionModel and AutoencoderKL from the standard SD-1.5 configs written below
(no download, random init), moves them to --device in --dtype, and times with time.perf_counter
(1 warm-up + N repeats, reporting best and median; on CUDA each run is bracketed by
torch.cuda.synchronize()):

  unet_fwd_b1 / unet_fwd_b2        UNet forward, batch 1 / 2, context (B, 77, 768), t = 500
  unet_fwdbwd_b1 / unet_fwdbwd_b2  UNet forward + backward w.r.t. the latent only
                                   (weights requires_grad_(False); loss = mean(out**2))
  vae_encode                       AutoencoderKL.encode(image).latent_dist.mean, batch 1
  vae_decode                       AutoencoderKL.decode(latent).sample, batch 1

for each image size in --sizes (latent = size / 8). Every (case, size) runs in its own
subprocess, so the reported peak RSS (getrusage ru_maxrss) is per measurement; it includes the
Python/torch baseline and the model weights (rss_after_build_mb is reported separately). On CUDA
the record also has peak_gpu_mb, torch.cuda.max_memory_allocated() over the timed runs (peak
stats reset after the warm-up; it includes the weights, gpu_after_build_mb), and the JSON header
records the GPU and the TF32 switches (torch defaults: off for matmul, on for cuDNN convolutions).

Usage (pinned environment: tests/fixtures/requirements.txt; on an offline GPU machine, its own
torch plus the wheels of bench/gpu_wheels.txt):

    /work/venv-ref/bin/python bench/bench_diffusers.py --sizes 256,512 --repeats 3 --json out.json
    /work/venv-ref/bin/python bench/bench_diffusers.py --sizes 64 --repeats 1     # smoke test
    python bench/bench_diffusers.py --device cuda --dtype float16 --sizes 512 --json out.json

Options: --cases (comma list, default all), --device cpu|cuda (default cpu), --dtype
float32|float16|bfloat16 (default float32), --threads (CPU threads, default 2), --attn default|classic
(default: diffusers' default processor, i.e. fused SDPA; classic: the original non-fused
AttnProcessor with an explicit softmax, as pix2pix-zero needs to read attention maps).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

CASES = ["unet_fwd_b1", "unet_fwd_b2", "unet_fwdbwd_b1", "unet_fwdbwd_b2", "vae_encode", "vae_decode"]

SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def write_json(path, doc):
    """Writes `doc` as indented JSON and says so."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


def maxrss_mb():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform.startswith("linux") else r / (1024.0 * 1024.0)


def worker(case, size, repeats, threads, attn, device, dtype):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dt = getattr(torch, dtype)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rss_import = maxrss_mb()
    t0 = time.perf_counter()
    lat = size // 8
    g = torch.Generator().manual_seed(1)
    # inputs are drawn on the CPU (same values on every device), then moved
    if case.startswith("unet"):
        model = UNet2DConditionModel(**SD15_UNET_CONFIG).to(device=dev, dtype=dt).eval()
        if attn == "classic":
            model.set_attn_processor(AttnProcessor())
        batch = 2 if case.endswith("_b2") else 1
        x = torch.randn((batch, 4, lat, lat), generator=g).to(device=dev, dtype=dt)
        ctx = torch.randn((batch, 77, 768), generator=g).to(device=dev, dtype=dt)
        t = torch.tensor(500, dtype=torch.int64, device=dev)
        model.requires_grad_(False)
        if case.startswith("unet_fwd_"):

            def run():
                with torch.inference_mode():
                    return model(x, t, encoder_hidden_states=ctx).sample

        else:

            def run():
                xin = x.clone().requires_grad_(True)
                out = model(xin, t, encoder_hidden_states=ctx).sample
                loss = out.square().mean()
                (gx,) = torch.autograd.grad(loss, xin)
                return gx

    else:
        model = AutoencoderKL(**SD15_VAE_CONFIG).to(device=dev, dtype=dt).eval()
        if attn == "classic":
            model.set_attn_processor(AttnProcessor())
        model.requires_grad_(False)
        if case == "vae_encode":
            img = (torch.rand((1, 3, size, size), generator=g) * 2 - 1).to(device=dev, dtype=dt)

            def run():
                with torch.inference_mode():
                    return model.encode(img).latent_dist.mean

        else:
            z = torch.randn((1, 4, lat, lat), generator=g).to(device=dev, dtype=dt)

            def run():
                with torch.inference_mode():
                    return model.decode(z).sample

    sync()
    build_s = time.perf_counter() - t0
    rss_build = maxrss_mb()
    gpu_build = torch.cuda.memory_allocated(dev) / 2**20 if cuda else None
    nparams = sum(p.numel() for p in model.parameters())

    times = []
    for i in range(1 + repeats):
        if i == 1 and cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        sync()
        t0 = time.perf_counter()
        out = run()
        sync()
        elapsed = time.perf_counter() - t0
        if i > 0:
            times.append(elapsed)
        del out
    return {
        "case": case,
        "size": size,
        "latent": lat,
        "device": device,
        "dtype": dtype,
        "threads": threads,
        "attn": attn,
        "params": nparams,
        "repeats": repeats,
        "times_s": times,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "build_s": build_s,
        "rss_after_import_mb": rss_import,
        "rss_after_build_mb": rss_build,
        "peak_rss_mb": maxrss_mb(),
        "gpu_after_build_mb": gpu_build,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256,512", help="image sizes, comma separated (latent = size/8)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after 1 warm-up")
    ap.add_argument("--cases", default=",".join(CASES), help="comma list from: " + ",".join(CASES))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (matters on CPU)")
    ap.add_argument("--attn", choices=["default", "classic"], default="default")
    ap.add_argument("--json", help="write results to this JSON file")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        res = worker(args.worker[0], int(args.worker[1]), args.repeats, args.threads, args.attn, args.device, args.dtype)
        print("RESULT " + json.dumps(res), flush=True)
        return

    sizes = [int(s) for s in args.sizes.split(",") if s]
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c}; choose from {CASES}")
    for s in sizes:
        if s % 64:
            ap.error(f"size {s} must be a multiple of 64 (UNet needs latent divisible by 8)")

    cuda = args.device == "cuda"
    results = []
    print(f"device {args.device}, dtype {args.dtype}, attn {args.attn}, threads {args.threads}")
    hdr = f"{'case':<16}{'size':>6}{'latent':>8}{'best s':>10}{'median s':>10}{'build s':>9}{'rss build MB':>14}{'peak RSS MB':>13}"
    if cuda:
        hdr += f"{'peak GPU MB':>13}"
    print(hdr)
    print("-" * len(hdr))
    for size in sizes:
        for case in cases:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, str(size),
                   "--repeats", str(args.repeats), "--threads", str(args.threads), "--attn", args.attn,
                   "--device", args.device, "--dtype", args.dtype]
            p = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                print(f"{case:<16}{size:>6}  FAILED (rc={p.returncode})\n{p.stderr[-2000:]}", flush=True)
                results.append({"case": case, "size": size, "error": p.stderr[-2000:], "returncode": p.returncode})
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            results.append(r)
            line = (f"{case:<16}{size:>6}{r['latent']:>8}{r['best_s']:>10.3f}{r['median_s']:>10.3f}"
                    f"{r['build_s']:>9.1f}{r['rss_after_build_mb']:>14.0f}{r['peak_rss_mb']:>13.0f}")
            if cuda:
                line += f"{r['peak_gpu_mb']:>13.0f}"
            print(line, flush=True)

    if args.json:
        import diffusers
        import torch

        doc = {
            "tool": "bench/bench_diffusers.py",
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "device": args.device,
            "dtype": args.dtype,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "cuda": torch.version.cuda if cuda else None,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32 if cuda else None,
            "threads": args.threads,
            "attn": args.attn,
            "repeats": args.repeats,
            "results": results,
        }
        write_json(args.json, doc)


if __name__ == "__main__":
    main()
