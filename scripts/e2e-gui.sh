#!/usr/bin/env bash
# Drives the real editor window as a person would, on the tiny fixture models: a real X server
# (Xvfb), real mouse and keyboard events (xdotool), and no shortcut through the code.
#
#   open a photo → type caption and words → run → scrub λ_xa → change the working size → run
#   → export → export again (asks) → overwrite → import a distilled generator (instant result)
#   → instant off → on
#
# It asserts on the exported files and on the app's own state dump (`p2pz gui --state-dump`),
# which also says where the widgets are, so the clicks land on them at any layout.
#
# Needs: xvfb, xdotool, python3, Mesa's Vulkan or GL driver (see .ci/run), and a built p2pz
# (target/debug/p2pz, as `cargo test` leaves it; P2PZ_BIN picks another).
# Usage: scripts/e2e-gui.sh            (prints each stage; exits non-zero on the first failure)
#        E2E_SCREENSHOT=end.png scripts/e2e-gui.sh   (also saves the window as the flow ends)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${P2PZ_BIN:-target/debug/p2pz}
[ -x "$bin" ] || { echo "no $bin: build it first (cargo build)" >&2; exit 1; }

work=$(mktemp -d)
state=$work/state.json
cleanup() {
    kill "${app:-0}" "${xvfb:-0}" 2>/dev/null || true
    wait 2>/dev/null || true
    if [ "${keep:-0}" = 1 ]; then echo "left $work for a look"; else rm -rf "$work"; fi
}
trap cleanup EXIT
export XDG_CACHE_HOME=$work/cache XDG_DATA_HOME=$work/data XDG_CONFIG_HOME=$work/config
export HF_HUB_OFFLINE=1
cp assets/chelsea.png "$work/"
# A tiny cat → dog generator from the command line, for the Instant part of the flow.
( "$bin" pairs --model tests/fixtures/tiny-sd --from cat --to dog --count 4 --size 64 --steps 3 \
      --sentences 16 --test-every 2 --out "$work/pairs" &&
  "$bin" distill "$work/pairs" --out "$work/cat2dog.generator.safetensors" --size 64 --iters 3 \
      --width 4 --blocks 1 --perceptual 0 ) >"$work/distill.log" 2>&1 &
distilling=$!

# Xvfb picks a free display and writes its number once it accepts clients.
Xvfb -displayfd 3 -screen 0 1280x720x24 -nolisten tcp 3>"$work/display" 2>"$work/xvfb.log" &
xvfb=$!
for _ in $(seq 100); do [ -s "$work/display" ] && break; sleep 0.1; done
[ -s "$work/display" ] || { cat "$work/xvfb.log" >&2; echo "Xvfb did not start" >&2; exit 1; }
export DISPLAY=:$(cat "$work/display")

"$bin" gui --model tests/fixtures/tiny-sd --captioner tests/fixtures/tiny-blip --cpu \
    --sentences 16 --steps 6 --state-dump "$state" >"$work/app.log" 2>&1 &
app=$!

passed=0
fail() {
    keep=1
    echo "e2e: $passed passed, 1 failed" >&2
    echo "FAILED: $*" >&2
    echo "--- state" >&2
    python3 -m json.tool "$state" >&2 2>/dev/null || true
    echo "--- app log" >&2
    tail -20 "$work/app.log" >&2
    import -window root "$work/failure.png" 2>/dev/null && echo "screenshot: $work/failure.png" >&2
    exit 1
}

# Evaluates a Python expression over the state dump `s`.
query() {
    python3 - "$state" "$1" <<'EOF'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(2)
value = eval(sys.argv[2], {"s": s})
print(value if not isinstance(value, bool) else int(value))
EOF
}

# Waits until the expression holds (at most $2 seconds, default 120).
until_state() {
    local what=$1 expr=$2 limit=${3:-120}
    local deadline=$((SECONDS + limit))
    while [ "$(query "$expr" 2>/dev/null || echo 0)" != 1 ]; do
        kill -0 "$app" 2>/dev/null || fail "the app exited while waiting for $what"
        [ $SECONDS -lt $deadline ] || fail "timed out waiting for $what ($expr)"
        sleep 0.2
    done
    echo "ok: $what"
    passed=$((passed + 1))
}

check() {
    [ "$(query "$2")" = 1 ] || fail "$1 ($2)"
    echo "ok: $1"
    passed=$((passed + 1))
}

# The window: found by its title, given the keyboard focus (there is no window manager).
# Focus only takes once the window is mapped (before that X answers BadMatch).
focused=0
for _ in $(seq 300); do
    window=$(xdotool search --onlyvisible --name '^pix2pix-zero$' 2>/dev/null | head -1) || true
    if [ -n "${window:-}" ] && xdotool windowfocus --sync "$window" 2>/dev/null; then
        focused=1
        break
    fi
    sleep 0.1
done
[ "$focused" = 1 ] || fail "no window appeared, or it could not take the keyboard focus"

at() { query "s['widgets']['$1']" | tr -d '[],' ; }
click() {
    local checks=$passed
    until_state "the $1 widget" "'$1' in s['widgets']" 30 >/dev/null
    passed=$checks
    # shellcheck disable=SC2046
    xdotool mousemove --window "$window" $(at "$1") sleep 0.1 click 1 sleep 0.3
}
type_into() {
    click "$1"
    xdotool key --clearmodifiers ctrl+a sleep 0.1 type --delay 20 "$2"
    sleep 0.3
}

until_state "the model" "s['model'] == 'ready'"

type_into "Image path" "$work/chelsea.png"
xdotool key Return
until_state "the photo" "s['photo'] is not None and not s['busy']"
check "the photo's own size" "s['photo']['original_size'] == [451, 300]"

type_into "Caption" "a cat sitting on a sofa"
type_into "Source word" "cat"
type_into "Target word" "dog"
check "caption and words typed" \
    "(s['caption'], s['from'], s['to']) == ('a cat sitting on a sofa', 'cat', 'dog')"

click "Run edit"
until_state "the first edit" "s['result'] is not None and not s['busy']" 300
check "it inverted" "s['result']['inverted']"

# Scrub λ_xa: press on the slider, move in small steps, let go.
read -r x y < <(at "Guidance λ_xa")
xdotool mousemove --window "$window" "${x%.*}" "${y%.*}" mousedown 1
for dx in $(seq 4 4 40); do xdotool mousemove --window "$window" $((${x%.*} + dx)) "${y%.*}"; sleep 0.03; done
xdotool mouseup 1
until_state "the re-edit from the cache" \
    "not s['busy'] and s['result']['record']['edit']['guidance']['lambda_xa'] != 0.1 and s['result']['reused_reference']" 300
check "λ_xa moved" "s['sliders']['lambda_xa'] > 0.1"

# A new working size keeps the caption, the words, the result and the export path.
export_path=$(query "s['export']['path']")
click "Working size"
click "size: 256"
check "size 256 chosen" "s['size'] == 256"
check "the panel says the next run inverts" "'inverts' in s['cache_hint'] and 'working size' in s['cache_hint']"
check "the result is still there" "s['result'] is not None"
click "Run edit"
until_state "the edit at 256 px" \
    "not s['busy'] and s['result'] is not None and s['result']['record'].get('working_side') == 256" 300
check "the caption survived the size change" "s['caption'] == 'a cat sitting on a sofa'"
check "the words survived" "(s['from'], s['to']) == ('cat', 'dog')"
check "the export path survived" "s['export']['path'] == '$export_path'"
check "it inverted again" "s['result']['inverted'] and s['result']['size'] == [256, 192]"
check "no error showing" "not any(n['error'] for n in s['notices'])"

# Export, then export again: the second asks first.
out=$work/out.png
type_into "Export path" "$out"
click "Export"
until_state "the export" "len(s['export']['written']) >= 2 and not s['busy']"
python3 - "$out" "$work/out.json" <<'EOF' || fail "the exported file"
import json, struct, sys
png = open(sys.argv[1], "rb").read()
assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
width, height = struct.unpack(">II", png[16:24])
assert (width, height) == (451, 300), (width, height)
record = json.load(open(sys.argv[2]))
assert record["working_side"] == 256 and record["caption"] == "a cat sitting on a sofa", record
assert b"iTXt" in png, "no parameters chunk"
EOF
echo "ok: exported 451×300 with its record"
passed=$((passed + 1))
# Atomic writes replace a file by renaming a new one over it, so its inode tells a rewrite.
inodes() { stat -c %i "$out" "$work/out.json" | tr '\n' ' '; }
before=$(inodes)
click "Export"
until_state "the overwrite question" "len(s['export']['confirm_overwrite']) == 2"
[ "$(inodes)" = "$before" ] || fail "files were replaced before the answer"
click "Overwrite"
until_state "the overwrite" "len(s['export']['confirm_overwrite']) == 0 and not s['busy']"
for _ in $(seq 100); do [ "$(inodes)" != "$before" ] && break; sleep 0.1; done
[ "$(inodes)" != "$before" ] || fail "Overwrite did not replace the files"
echo "ok: the second export asked, then replaced both files"
passed=$((passed + 1))
# A distilled generator for the words: its result shows without a run, and the toggle hides it.
wait "$distilling" || { cat "$work/distill.log" >&2; fail "making the generator"; }
# The Instant panel is below the words: scroll the controls down to it, as a person would.
read -r x y < <(at "Caption")
xdotool mousemove --window "$window" "${x%.*}" "${y%.*}" click --repeat 15 --delay 30 5
sleep 0.5
type_into "Generator file" "$work/cat2dog.generator.safetensors"
click "Import"
until_state "the instant result" \
    "not s['busy'] and s['result'] is not None and s['result']['instant'] == 'cat to dog'"
check "the generator was imported into the cache" \
    "len(s['generators']) == 1 and '/cache/pix2pix-zero/generators/' in s['generators'][0]"
click "Instant results"
until_state "instant off, back to the photo" "not s['instant_on'] and s['result'] is None"
click "Instant results"
until_state "instant on, the result again" \
    "s['instant_on'] and not s['busy'] and s['result'] is not None and s['result']['instant'] == 'cat to dog'"
if [ -n "${E2E_SCREENSHOT:-}" ]; then
    import -window root "$E2E_SCREENSHOT" && echo "screenshot: $E2E_SCREENSHOT"
fi
echo "e2e: $passed passed, 0 failed"
