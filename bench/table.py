"""Prints the README's benchmark table from bench/results/{p2pz,diffusers}.json (bench/run.sh).

Usage: bench/table.py [bf16]   (bf16: p2pz's bf16 products against torch in bfloat16, from
p2pz-bf16.json and diffusers-bf16.json)
"""
import json
import pathlib
import sys

results = pathlib.Path(__file__).parent / "results"
suffix = "-bf16" if sys.argv[1:] == ["bf16"] else ""
ours = {(r["case"], r["size"]): r for r in json.loads((results / f"p2pz{suffix}.json").read_text())}
theirs = {
    (r["case"], r["size"]): r
    for r in json.loads((results / f"diffusers{suffix}.json").read_text())["results"]
}
names = {
    "unet_fwd_b1": "UNet forward, batch 1",
    "unet_fwd_b2": "UNet forward, batch 2 (CFG)",
    "unet_fwdbwd_b1": "UNet forward + backward w.r.t. the latent, batch 1",
    "guidance_b1": "one guidance gradient (maps in the graph, loss, backward), batch 1",
    "vae_encode": "VAE encode",
    "vae_decode": "VAE decode",
}
print("| case | image | p2pz s | diffusers s | ratio | p2pz peak MB | diffusers peak MB |")
print("|---|---|---|---|---|---|---|")
for (case, size), r in sorted(ours.items(), key=lambda kv: (kv[0][1], list(names).index(kv[0][0]))):
    t = theirs.get((case, size))
    mine = sorted(r["seconds"])[len(r["seconds"]) // 2]
    if t:
        other = f"{t['median_s']:.2f} | {mine / t['median_s']:.2f}"
        other_mb = f"{t['peak_rss_mb']:.0f}"
    else:
        other, other_mb = "– | –", "–"
    print(f"| {names[case]} | {size}² | {mine:.2f} | {other} | {r['peak_rss_mb']:.0f} | {other_mb} |")
