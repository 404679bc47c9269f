#!/usr/bin/env bash
# Runs our benchmark and diffusers' one after the other on this machine, so the numbers compare.
# Usage: bench/run.sh [PYTHON]   (PYTHON: a Python with tests/fixtures/requirements.txt installed;
# the text-to-image comparison writes a 4.3 GB random model folder to target/sd15-random once;
# on a CPU with AMX it then compares p2pz's bf16 products with torch in bfloat16)
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
echo "== text-to-image, end to end, on a full-size random model folder =="
model=target/sd15-random
[ -d "$model" ] || "$python" bench/make_random_model.py "$model"
# p2pz_generate LABEL ARGS...: one untimed run (it fills p2pz's kernel cache on a first load and
# brings the model's files into the page cache, as diffusers' untimed run does for it), then the
# timed one.
p2pz_generate() {
    local label=$1 seconds
    shift
    for run in warm-up timed; do
        rm -f target/bench-generate.png target/bench-generate.json
        local start=$(date +%s.%N)
        target/release/p2pz generate --model "$model" --prompt "a photo of a cat" --width 256 \
            --height 256 --steps 3 --out target/bench-generate.png "$@" 2>/dev/null
        seconds=$(awk "BEGIN { printf \"%.2f\", $(date +%s.%N) - $start }")
    done
    echo "p2pz text-to-image 256x256, 3 steps$label: total $seconds s"
}
p2pz_generate "" | tee bench/results/generate.txt
"$python" bench/generate_diffusers.py "$model" --size 256 --steps 3 >/dev/null
"$python" bench/generate_diffusers.py "$model" --size 256 --steps 3 | tee -a bench/results/generate.txt
"$python" bench/table.py

echo "== bf16 products (p2pz --precision bf16) against torch in bfloat16 =="
if target/release/p2pz bench --sizes 256,512 --repeats 1 --cases "$cases,guidance_b1" \
    --precision bf16 --json bench/results/p2pz-bf16.json; then
    "$python" bench/bench_diffusers.py --sizes 256,512 --repeats 1 --cases "$cases" --dtype bfloat16 \
        --json bench/results/diffusers-bf16.json
    target/release/p2pz bench --editor --sizes 256 --editor-steps 3 --precision bf16 \
        | tee bench/results/editor-bf16.txt
    "$python" bench/edit_diffusers.py --size 256 --steps 3 --dtype bfloat16 \
        --json bench/results/edit_diffusers-bf16.json
    p2pz_generate ", bf16 products" --precision bf16 | tee -a bench/results/generate.txt
    "$python" bench/table.py bf16
else
    echo "(no AMX here: the bf16 comparison is skipped)"
fi
