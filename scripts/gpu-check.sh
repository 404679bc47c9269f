#!/usr/bin/env bash
# The GPU check: one script that runs on a machine with an NVIDIA GPU and writes everything into
# one folder. It needs the CUDA binary built elsewhere (scripts/build-cuda.sh), this working tree,
# and, for diffusers' side, a Python with torch (diffusers and its pure-Python needs can come as
# wheels in a folder: --wheels).
#
#   1. p2pz doctor: parity of the UNet and the guidance gradient on the GPU, f32 and f16
#   2. p2pz bench at --size: UNet forward batch 1 and 2, forward + backward w.r.t. the latent,
#      the guidance gradient, VAE encode and decode, in f32 and f16, each with its peak memory
#   3. p2pz bench --editor at --size with --steps: inversion, first edit, re-edit
#   4. diffusers on the same architecture (random weights built there): the same UNet and VAE
#      cases, and a whole pix2pix-zero edit (inversion + edit) at --size with --steps
#   5. summary.md: the tables and the ratios p2pz / diffusers
#
# Usage: scripts/gpu-check.sh [--device cuda|cpu] [--size 512] [--steps 50] [--out DIR]
#                             [--bin target/cuda/release/p2pz] [--python python3] [--wheels DIR]
#                             [--repeats 2]
# A dry run on a machine without a GPU: scripts/gpu-check.sh --device cpu --size 64 --steps 2
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda size=512 steps=50 out=gpu-check bin="" python=python3 wheels="" repeats=2
while [ $# -gt 0 ]; do
    case $1 in
        --device) device=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --wheels) wheels=$2; shift 2 ;;
        --repeats) repeats=$2; shift 2 ;;
        *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
if [ -z "$bin" ]; then
    bin=target/release/p2pz
    [ "$device" = cuda ] && bin=target/cuda/release/p2pz
fi
[ -e "$bin" ] || { echo "no p2pz at $bin: build it (scripts/build-cuda.sh) or pass --bin" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [[ $bin == *.xz ]]; then
    # The carried, compressed binary (scripts/build-cuda.sh): unpack it beside the results.
    "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$bin" "$out/p2pz"
    chmod +x "$out/p2pz"
    bin=$out/p2pz
fi
log=$out/log.txt
: >"$log"
started=$SECONDS
say() { echo "$*" | tee -a "$log"; }
stage() { say "== [$((SECONDS - started)) s] $*"; }

# The CUDA libraries the binary loads come from the Python's nvidia-* wheels (PyTorch's).
if [ "$device" = cuda ]; then
    libs=$("$python" - <<'EOF' 2>/dev/null || true
import glob, os
import nvidia
roots = [os.path.dirname(p) for p in nvidia.__path__]
print(":".join(sorted({os.path.dirname(f) for r in roots for f in glob.glob(f"{r}/nvidia/**/lib/*.so*", recursive=True)})))
EOF
)
    export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log" || true
    say "the binary needs: $(ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc' | tr -s ' \t' ' ' | tr '\n' ';')"
fi

# Runs a command; on the GPU, nvidia-smi samples the memory in use every 50 ms and the peak (MB)
# goes to $out/NAME.peak-mb.
peak_gpu() {
    local name=$1
    shift
    local samples=$out/.gpu-samples
    if [ "$device" != cuda ] || ! command -v nvidia-smi >/dev/null; then
        "$@"
        return
    fi
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$samples" &
    local sampler=$!
    local status=0
    "$@" || status=$?
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    sort -n "$samples" | tail -1 >"$out/$name.peak-mb"
    say "peak GPU memory of $name: $(cat "$out/$name.peak-mb") MB"
    return $status
}

stage "1. p2pz doctor --device $device"
"$bin" doctor --device "$device" --timing-size "$size" 2>&1 | tee "$out/doctor.txt" | tee -a "$log" || say "doctor FAILED"

stage "2. p2pz bench at ${size}², f32 and f16"
cases=(unet_fwd_b1 unet_fwd_b2 unet_fwdbwd_b1 guidance_b1 vae_encode vae_decode)
for precision in f32 f16; do
    for case in "${cases[@]}"; do
        peak_gpu "p2pz-$precision-$case" "$bin" bench --device "$device" --precision "$precision" --sizes "$size" \
            --repeats "$repeats" --cases "$case" --json "$out/p2pz-$precision-$case.json" \
            2>&1 | tee -a "$log" || say "p2pz $case $precision FAILED"
    done
done

stage "3. p2pz bench --editor at ${size}², $steps steps"
peak_gpu p2pz-editor "$bin" bench --editor --device "$device" --sizes "$size" --editor-steps "$steps" \
    2>&1 | tee "$out/p2pz-editor.txt" | tee -a "$log" || say "p2pz editor FAILED"

stage "4. diffusers on the same architecture"
if [ -n "$wheels" ]; then
    "$python" -m pip install --quiet --no-index --no-deps --target "$out/.pylib" "$wheels"/*.whl
    export PYTHONPATH=$out/.pylib${PYTHONPATH:+:$PYTHONPATH}
fi
torch_device=$([ "$device" = cuda ] && echo cuda || echo cpu)
for dtype in float32 float16; do
    "$python" bench/bench_diffusers.py --device "$torch_device" --dtype "$dtype" --sizes "$size" --threads "$(nproc)" \
        --repeats "$repeats" --cases unet_fwd_b1,unet_fwd_b2,unet_fwdbwd_b1,vae_encode,vae_decode \
        --json "$out/diffusers-$dtype.json" 2>&1 | tee -a "$log" || say "diffusers $dtype FAILED"
done
"$python" bench/edit_diffusers.py --device "$torch_device" --size "$size" --steps "$steps" --threads "$(nproc)" \
    --json "$out/diffusers-edit.json" 2>&1 | tee -a "$log" || say "diffusers edit FAILED"

stage "5. summary"
"$python" bench/gpu_summary.py "$out" | tee "$out/summary.md"
say "done in $((SECONDS - started)) s; everything is in $out"
