#!/usr/bin/env bash
# Makes the working tree small enough to travel to a borrowed GPU machine whose tool copies the
# tree plus a few named extras, at most 64 MiB in all: removes, from the working tree only, the
# tracked files that scripts/gpu-check.sh does not read (reference tensors of the parity tests,
# the BLIP and T5 fixtures, screenshots), then prints what would travel with the CUDA binary and
# the diffusers wheel. Nothing is committed; `git checkout -- .` brings the files back.
#
# Usage: scripts/gpu-trim.sh [EXTRA ...]     (EXTRA: the ignored paths that will be carried too,
#                                             e.g. target/cuda/release/p2pz .wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "the working tree has uncommitted changes to tracked files: commit or stash them first" >&2
    exit 1
fi
# The check reads tests/fixtures/tiny-sd (the editor benchmark's tiny case, and the tokenizer and
# scheduler of the random full-size model); the doctor's model and references are in the binary.
git ls-files -z tests/fixtures/reference tests/fixtures/tiny-blip tests/fixtures/tiny-t5 screenshots |
    xargs -0 rm -f
# Only the files still there count (stat fails on the removed ones).
tree=$( (git ls-files -z | xargs -0 stat -c %s 2>/dev/null || true) | awk '{s += $1} END {print s + 0}')
extras=0
for extra in "$@"; do
    extras=$((extras + $(du -sb "$extra" | cut -f1)))
done
total=$((tree + extras))
limit=$((64 * 1024 * 1024))
echo "working tree: $((tree / 1024 / 1024)) MiB; extras: $((extras / 1024 / 1024)) MiB; total $((total / 1024 / 1024)) of 64 MiB"
if [ "$total" -gt "$limit" ]; then
    echo "too much to carry: build without the editor (scripts/build-cuda.sh already does) or carry less" >&2
    exit 1
fi
echo "restore the removed files afterwards with: git checkout -- ."
