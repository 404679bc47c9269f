#!/usr/bin/env bash
# The SLURM check: on a real single-node SLURM on localhost (scripts/slurm/local-cluster.sh), a job
# array of 4 tasks (scripts/slurm/pairs-array.sbatch) makes 8 pairs of the tiny model into one
# shared folder, one plain `p2pz pairs` makes the same 8 into another, and the two folders must be
# the same byte for byte. Prints PASS or FAIL; the cluster is stopped on exit.
#
# Usage: scripts/slurm-check.sh            (P2PZ=path/to/p2pz to use another binary than
#                                           target/debug/p2pz; P2PZ_SLURM_DIR as for the cluster)
set -euo pipefail
p2pz=$(realpath -m "${P2PZ:-$(dirname "$0")/../target/debug/p2pz}")
cd "$(dirname "$0")/.."
[ -x "$p2pz" ] || { echo "FAIL: no p2pz at $p2pz: cargo build, or set P2PZ" >&2; exit 1; }
cluster=scripts/slurm/local-cluster.sh
export P2PZ_SLURM_DIR=${P2PZ_SLURM_DIR:-/tmp/p2pz-slurm-$(id -un)}
export SLURM_CONF=$P2PZ_SLURM_DIR/slurm.conf
logs=$P2PZ_SLURM_DIR/log
work=$(mktemp -d)
sbatch_pid=""
cleanup() {
    # sbatch --wait would poll the stopped controller forever.
    [ -z "$sbatch_pid" ] || kill "$sbatch_pid" 2>/dev/null || true
    "$cluster" stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
args=(--model tests/fixtures/tiny-sd --from cat --to dog --count 8 --size 64 --steps 3 --seed 7
      --test-every 4)

# Says what failed, with the array's logs and the end of the daemons' logs.
fail() {
    echo "FAIL: $*" >&2
    local f jobid
    jobid=$(cat "$work/jobid" 2>/dev/null || true)
    for f in "$logs/pairs-${jobid:-none}_"*.out "$logs/slurmctld.log" "$logs/slurmd.log"; do
        [ -e "$f" ] && { echo "--- $f"; tail -n 40 "$f"; }
    done >&2
    exit 1
}

t0=$SECONDS
"$cluster" start
echo "cluster start: $((SECONDS - t0)) s"
t0=$SECONDS
# In the background, so that a signal is not held up until it ends.
P2PZ=$p2pz sbatch --parsable --wait --array=0-3 --chdir="$PWD" --output="$logs/pairs-%A_%a.out" \
    scripts/slurm/pairs-array.sbatch "${args[@]}" --out "$work/array" > "$work/jobid" &
sbatch_pid=$!
wait "$sbatch_pid" || fail "the job array failed"
sbatch_pid=""
echo "job array (4 tasks): $((SECONDS - t0)) s"
t0=$SECONDS
"$p2pz" pairs "${args[@]}" --out "$work/single" || fail "the single-process p2pz pairs failed"
echo "single process: $((SECONDS - t0)) s"
diff -r "$work/array" "$work/single" || fail "the array's folder differs from the single process's"
echo "PASS: 4 SLURM array tasks made the same $(find "$work/single" -type f | wc -l) files as one process"
