#!/usr/bin/env bash
# Builds the CUDA binary of p2pz on a machine with no CUDA install and no GPU: the compiler,
# headers and libraries come from NVIDIA's Python wheels (pinned below), installed into .cuda/
# (git-ignored). The binary is for compute capability 9.0 (H100/H200) by default.
#
# At run time the binary needs the NVIDIA driver (libcuda.so.1) and the CUDA 13 libraries it
# links: libcudart.so.13, libcublas.so.13 (which loads libcublasLt.so.13) and libcurand.so.10.
# PyTorch's CUDA 13 wheels (nvidia-cuda-runtime, nvidia-cublas, nvidia-curand) ship them under
# site-packages/nvidia/cu13/lib: put that folder on LD_LIBRARY_PATH (scripts/gpu-check.sh finds
# it by itself).
#
# Usage: scripts/build-cuda.sh [check]
#   (no argument)  the release binary with --features cuda and without the desktop editor,
#                  stripped, in target/cuda/release/p2pz, and an xz copy to carry (p2pz.xz);
#                  prints the sizes and the libraries it needs
#   check          cargo check --features cuda only
# Environment: CUDA_COMPUTE_CAP (default 90), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-build}
python=${PYTHON:-python3}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# CUDA 13.0: what driver 580 runs, and what PyTorch's CUDA 13 wheels bring to the GPU machine.
wheels=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
)
prefix=.cuda/wheels
toolkit=$prefix/nvidia/cu13
stamp=.cuda/installed-$(printf '%s\n' "${wheels[@]}" | sha256sum | cut -c1-12)
started=$SECONDS
if [ ! -e "$stamp" ]; then
    echo "== installing the CUDA 13.0 toolchain from pip wheels into .cuda/"
    rm -rf "$prefix" .cuda/installed-*
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$prefix" "${wheels[@]}"
    touch "$stamp"
fi

# A toolkit tree as the build scripts expect it: the linker wants unversioned names, and
# libcuda.so, which only the driver provides, is a stub here (as the CUDA toolkit's own
# lib/stubs/libcuda.so is): it names every driver function cudarc declares, and records
# libcuda.so.1 as the library to load at run time.
cd "$toolkit"
[ -e lib64 ] || ln -s lib lib64
for so in lib/*.so.[0-9]*; do
    base=${so%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
done
if [ ! -e lib/stubs/libcuda.so ]; then
    mkdir -p lib/stubs
    # On a fresh machine cudarc's source is not unpacked yet (the CPU build does not need it),
    # and ls failing there must not end the script under pipefail: fetch it, then look again.
    cudarc_source() { ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1 || true; }
    cudarc=$(cudarc_source)
    if [ -z "$cudarc" ]; then
        (cd - >/dev/null && cargo fetch --locked)
        cudarc=$(cudarc_source)
        [ -n "$cudarc" ] || { echo "cudarc 0.19 is not in the cargo registry after cargo fetch" >&2; exit 1; }
    fi
    grep -o 'load::<_F>("cu[A-Za-z0-9_]*")' "$cudarc/src/driver/sys/mod.rs" |
        sed 's/.*("\(.*\)")/\1/' | sort -u | sed 's/.*/void &(void) {}/' >lib/stubs/libcuda.c
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o lib/stubs/libcuda.so lib/stubs/libcuda.c
fi
cd - >/dev/null
export CUDA_PATH=$PWD/$toolkit CUDA_ROOT=$PWD/$toolkit
export PATH=$CUDA_PATH/bin:$PATH
export LIBRARY_PATH=$CUDA_PATH/lib:$CUDA_PATH/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
nvcc --version | tail -2
echo "toolchain ready in $((SECONDS - started)) s"

# Its own target folder, so the CPU build in target/ is not rebuilt.
export CARGO_TARGET_DIR=target/cuda
started=$SECONDS
if [ "$mode" = check ]; then
    cargo check --locked --features cuda
    echo "cargo check --features cuda: $((SECONDS - started)) s"
    exit 0
fi
# Without the desktop editor: the GPU machine runs the command line, and every MB counts there.
cargo build --locked --release --no-default-features --features cuda --bin p2pz
bin=$CARGO_TARGET_DIR/release/p2pz
strip "$bin"
echo "built $bin in $((SECONDS - started)) s: $(du -m "$bin" | cut -f1) MB stripped"
echo "needs at run time: $(readelf -d "$bin" | grep NEEDED | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' ')"
# Its kernels (PTX text and sm_90 code) compress well: this is the file to carry.
xz -9 -T0 -c "$bin" >"$bin.xz"
echo "to carry: $bin.xz, $(du -m "$bin.xz" | cut -f1) MB (scripts/gpu-check.sh --bin takes it as is)"
