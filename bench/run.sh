#!/usr/bin/env bash
# Runs our benchmark and diffusers' one after the other on this machine, so the numbers compare.
# Usage: bench/run.sh [PYTHON]   (PYTHON: a Python with tests/fixtures/requirements.txt installed)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
cases=unet_fwd_b1,unet_fwd_b2,unet_fwdbwd_b1,vae_encode,vae_decode
mkdir -p bench/results
cargo build --release --quiet
echo "== p2pz (candle) =="
target/release/p2pz bench --sizes 256,512 --repeats 1 --cases "$cases,guidance_b1" --json bench/results/p2pz.json
echo "== diffusers (torch) =="
"$python" bench/bench_diffusers.py --sizes 256,512 --repeats 1 --cases "$cases" --json bench/results/diffusers.json
echo "== p2pz editor =="
target/release/p2pz bench --editor --sizes 256 --editor-steps 3 | tee bench/results/editor.txt
echo "== diffusers editor =="
"$python" bench/edit_diffusers.py --size 256 --steps 3 --json bench/results/edit_diffusers.json
"$python" bench/table.py
