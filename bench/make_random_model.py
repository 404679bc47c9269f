#!/usr/bin/env python3
"""Writes a full-size SD-1.5 model folder with random weights (diffusers layout, f32, ~4.3 GB).

The architecture, tokenizer and schedulers are edit_diffusers.py's (SD-1.5 configs, the real CLIP
vocabulary from tests/fixtures/tiny-sd, seed 0). It is what the README's memory measurements run
`p2pz` on: a real model's sizes without a download.

Usage: bench/make_random_model.py OUT_DIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_diffusers  # noqa: E402


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    if os.path.exists(out):
        sys.exit(f"{out} exists: give a new folder")
    pipe = edit_diffusers.build_pipeline("cpu", edit_diffusers.torch.float32)
    pipe.unet.save_pretrained(os.path.join(out, "unet"))
    pipe.vae.save_pretrained(os.path.join(out, "vae"))
    pipe.text_encoder.save_pretrained(os.path.join(out, "text_encoder"))
    pipe.tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    pipe.scheduler.save_pretrained(os.path.join(out, "scheduler"))
    fixture_index = os.path.join(edit_diffusers.FIXTURE, "model_index.json")
    with open(fixture_index) as src, open(os.path.join(out, "model_index.json"), "w") as dst:
        dst.write(src.read())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
