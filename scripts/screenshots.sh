#!/usr/bin/env bash
# Takes the README's screenshots of the real app: starts `p2pz gui` under Xvfb on the tiny fixture
# model, lets it open the sample photo, caption it, run the edit and show the overlay, and has the
# app save its own window (`--screenshot`), at the default window size and at 1280×720, and one
# instant result of a distilled generator. Also
# records the UI frame time while the worker ran.
#
# Needs: xvfb and Mesa's Vulkan driver (see .ci/run and shared docs); a release build.
# Usage: scripts/screenshots.sh            (writes screenshots/*.png and screenshots/frame-times.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
bin=target/release/p2pz
out=screenshots
mkdir -p "$out"

work=$(mktemp -d)
trap 'kill "${xvfb:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
# A clean embedding cache, and no network.
export XDG_CACHE_HOME="$work/cache" HF_HUB_OFFLINE=1
cp assets/chelsea.png "$work/"

display=:97
Xvfb "$display" -screen 0 1400x860x24 -nolisten tcp &
xvfb=$!
export DISPLAY=$display
for _ in $(seq 50); do xdpyinfo >/dev/null 2>&1 && break; sleep 0.1; done

common=(--model tests/fixtures/tiny-sd --captioner tests/fixtures/tiny-blip --cpu
        --caption "a cat sitting on a sofa" --from cat --to dog --sentences 64 --steps 25 --size 256)
shot() {
    local name=$1
    shift
    echo "== $name"
    # Each shot starts from default settings (persisted ones would carry over between shots).
    XDG_DATA_HOME="$work/data-$name" "$bin" gui "$work/chelsea.png" "${common[@]}" "$@" --screenshot "$out/$name.png" 2>&1 |
        tee -a "$work/log.txt"
}
shot 01-opened
shot 02-edited-overlay --run --overlay-token cat
shot 03-difference --run --overlay-token cat --overlay-view difference
shot 04-split --run --compare split
shot 05-light-reconstruction --run --compare reconstruction --theme light
# A smaller window: the scrubbed controls, Run and the progress stay in view.
shot 06-1280x720 --run --overlay-token cat --window 1280x720
# An instant result: a tiny cat → dog generator distilled on the command line, in the cache of
# this shot only (in the others it would replace the photo as soon as it opened).
"$bin" pairs --model tests/fixtures/tiny-sd --from cat --to dog --count 8 --size 64 --steps 3 \
    --sentences 16 --test-every 4 --out "$work/pairs" >>"$work/log.txt" 2>&1
mkdir -p "$work/cache-instant/pix2pix-zero/generators"
"$bin" distill "$work/pairs" --out "$work/cache-instant/pix2pix-zero/generators/cat2dog.generator.safetensors" \
    --size 64 --iters 20 --perceptual 0 >>"$work/log.txt" 2>&1
XDG_CACHE_HOME="$work/cache-instant" shot 07-instant
grep "UI frame time" "$work/log.txt" > "$out/frame-times.txt" || true
echo "screenshots in $out/:"
ls -1 "$out"
