"""Turns the output folder of scripts/gpu-check.sh into summary.md: the doctor's verdict, the UNet
and VAE cases of p2pz and diffusers side by side with their ratio, and the whole edit.

Usage: python3 bench/gpu_summary.py OUT_DIR      (prints Markdown)
"""

import json
import pathlib
import re
import statistics
import sys

NAMES = {
    "unet_fwd_b1": "UNet forward, batch 1",
    "unet_fwd_b2": "UNet forward, batch 2 (CFG)",
    "unet_fwdbwd_b1": "UNet forward + backward w.r.t. the latent, batch 1",
    "guidance_b1": "one guidance gradient, batch 1",
    "vae_encode": "VAE encode",
    "vae_decode": "VAE decode",
}
PRECISIONS = {"f32": "float32", "f16": "float16"}


def load(path):
    return json.loads(path.read_text()) if path.exists() else None


def peak(out, name):
    path = out / f"{name}.peak-mb"
    return float(path.read_text()) if path.exists() else None


def number(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def main(out):
    out = pathlib.Path(out)
    doctor = out / "doctor.txt"
    verdict = [line for line in doctor.read_text().splitlines() if line.startswith("result")] if doctor.exists() else []
    print("# GPU check\n")
    print(f"doctor: {verdict[0] if verdict else 'did not finish (see doctor.txt and log.txt)'}\n")
    print("| case | precision | image | p2pz s | p2pz peak MB | diffusers s | diffusers peak MB | p2pz / diffusers |")
    print("|---|---|---|---|---|---|---|---|")
    for precision, dtype in PRECISIONS.items():
        theirs = load(out / f"diffusers-{dtype}.json")
        by_case = {r["case"]: r for r in theirs["results"]} if theirs else {}
        for case, name in NAMES.items():
            ours = load(out / f"p2pz-{precision}-{case}.json")
            if not ours:
                continue
            mine = statistics.median(ours[0]["seconds"])
            size = ours[0]["size"]
            mine_peak = peak(out, f"p2pz-{precision}-{case}") or ours[0].get("peak_rss_mb")
            other = by_case.get(case)
            other_s = other["median_s"] if other else None
            other_peak = (other.get("peak_gpu_mb") or other.get("peak_rss_mb")) if other else None
            ratio = f"{mine / other_s:.2f}" if other_s else "–"
            print(
                f"| {name} | {precision} | {size}² | {number(mine)} | {number(mine_peak, 0)} | "
                f"{number(other_s)} | {number(other_peak, 0)} | {ratio} |"
            )
    print()
    editor = out / "p2pz-editor.txt"
    rows = [line for line in editor.read_text().splitlines() if line.startswith("SD-1.5")] if editor.exists() else []
    theirs = load(out / "diffusers-edit.json")
    if rows:
        # model (3 words), size, steps, invert s, first edit s, re-edit s, cache MB
        fields = re.split(r"\s+", rows[-1].strip())
        invert, first, again = (float(v) for v in fields[5:8])
        print("| whole edit | p2pz s | diffusers s | p2pz / diffusers |")
        print("|---|---|---|---|")
        ours = invert + first
        other = theirs["seconds"]["invert"] + theirs["seconds"]["edit"] if theirs else None
        ratio = f"{ours / other:.2f}" if other else "–"
        print(f"| inversion + first edit, {fields[3]}², {fields[4]} steps | {ours:.1f} | {number(other, 1)} | {ratio} |")
        print(f"| re-edit from the session cache | {again:.1f} | – | – |")
        print("\nThe edit direction is excluded on both sides (p2pz's benchmark takes a random one).")


if __name__ == "__main__":
    main(sys.argv[1])
