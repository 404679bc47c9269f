#!/usr/bin/env python3
"""Seconds of text-to-image with diffusers' StableDiffusionPipeline, end to end, on the CPU.

Loads MODEL_DIR (a diffusers folder, e.g. the one bench/make_random_model.py writes) with a DDIM
scheduler and generates one --size x --size image in --steps steps at guidance 7.5, as
`p2pz generate` does; prints the load time, the generation time and their total, which bench/run.sh
compares with the wall time of `p2pz generate` on the same folder.

Usage: bench/generate_diffusers.py MODEL_DIR [--size 256] [--steps 3] [--threads 2]
"""
import argparse
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    with torch.no_grad():
        image = pipe(
            "a photo of a cat", height=args.size, width=args.size, num_inference_steps=args.steps,
            guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="np",
        ).images[0]
    done = time.perf_counter()
    finite = bool(torch.isfinite(torch.from_numpy(image)).all())
    print(f"diffusers text-to-image {args.size}x{args.size}, {args.steps} steps, {args.threads} threads: "
          f"load {loaded - start:.2f} s, generate {done - loaded:.2f} s, total {done - start:.2f} s"
          f"{'' if finite else ' (NOT FINITE)'}")


if __name__ == "__main__":
    main()
