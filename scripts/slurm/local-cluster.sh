#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, to run the job-array scripts against
# (scripts/slurm-check.sh). Debian's slurm-wlm and munge, installed when missing. Everything it
# makes lives in a folder of its own, $P2PZ_SLURM_DIR (default /tmp/p2pz-slurm-$USER): slurm.conf,
# the munge key and socket, controller state, spool, pid files and logs. The daemons run as the
# calling user without systemd or cgroups (containers rarely delegate cgroup v2), and talk only
# over 127.0.0.1.
#
# Usage: scripts/slurm/local-cluster.sh start|stop|status
#   start   install the packages if missing, start munged, slurmctld and slurmd, wait for the node
#           to be idle (already running: says so and succeeds)
#   stop    cancel the jobs left, stop the three daemons (nothing running: succeeds)
#   status  each daemon's state and sinfo; exits 3 unless all three are up
# The client commands need the config: export SLURM_CONF=$P2PZ_SLURM_DIR/slurm.conf
set -euo pipefail
dir=${P2PZ_SLURM_DIR:-/tmp/p2pz-slurm-$(id -un)}
export SLURM_CONF=$dir/slurm.conf
partition=p2pz
daemons=(munged slurmctld slurmd)

install_packages() {
    local p missing=() sudo_cmd=()
    for p in slurm-wlm munge; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"
}

# Whether a process lives; a zombie does not (a container's PID 1 may reap late, or never).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# The pid of a daemon of ours that is running (from its pid file), or nothing.
daemon_pid() {
    local pid
    pid=$(cat "$dir/run/$1.pid" 2>/dev/null) || return 0
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" &&
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1"* ]] && echo "$pid"
    return 0
}

all_running() {
    local d
    for d in "${daemons[@]}"; do
        [ -n "$(daemon_pid "$d")" ] || return 1
    done
}

write_conf() {
    local user node
    user=$(id -un)
    # This machine's real sockets, cores and memory, under the name the node registers with.
    node=$(env -u SLURM_CONF slurmd -C | head -n1 |
        sed -E 's/^NodeName=[^ ]+/NodeName=localhost NodeAddr=127.0.0.1/')
    cat > "$SLURM_CONF" <<EOF
# Written by scripts/slurm/local-cluster.sh; remade at each start.
ClusterName=p2pz-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
MpiDefault=none
# slurmd and srun listen on 127.0.0.1 only (slurmctld 22.05 still binds every address).
CommunicationParameters=NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
$node
PartitionName=$partition Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

print_logs() {
    local f
    for f in "$dir"/munge/munged.log "$dir"/log/slurmctld.log "$dir"/log/slurmd.log; do
        [ -e "$f" ] && { echo "--- $f (last 30 lines)"; tail -n 30 "$f"; }
    done >&2
}

start() {
    install_packages
    if all_running; then
        echo "local SLURM already running ($dir)"
        return 0
    fi
    stop >/dev/null
    local t0=$SECONDS state
    # A fresh controller state each start; the munge key is kept.
    rm -rf "$dir"/{state,spool,run,log}
    mkdir -p "$dir"/{state,spool,run,log}
    # munged refuses a socket folder that others cannot enter, and a key that others can read.
    mkdir -p "$dir/munge"
    chmod 755 "$dir" "$dir/munge"
    if [ ! -s "$dir/munge/munge.key" ]; then
        (umask 077 && dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 400 "$dir/munge/munge.key"
    munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    write_conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N localhost
    for _ in $(seq 120); do
        state=$(sinfo -h -N -n localhost -o %T 2>/dev/null || true)
        [ "$state" = idle ] && break
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        echo "local SLURM did not come up (node state: '${state:-none}')" >&2
        print_logs
        stop >/dev/null
        return 1
    fi
    echo "local SLURM up in $((SECONDS - t0)) s ($dir); for the client commands:"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    local d pid
    if [ -n "$(daemon_pid slurmctld)" ]; then
        scancel --partition="$partition" 2>/dev/null || true
        for _ in $(seq 20); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    for d in slurmd slurmctld munged; do
        pid=$(daemon_pid "$d")
        [ -n "$pid" ] || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 40); do
            alive "$pid" || break
            sleep 0.25
        done
        alive "$pid" && kill -9 "$pid"
    done
    rm -f "$dir"/run/*.pid
    echo "local SLURM stopped"
}

status() {
    local d pid up=0
    for d in "${daemons[@]}"; do
        pid=$(daemon_pid "$d")
        if [ -n "$pid" ]; then
            echo "$d: running (pid $pid)"
            up=$((up + 1))
        else
            echo "$d: stopped"
        fi
    done
    [ -n "$(daemon_pid slurmctld)" ] && { sinfo || true; }
    [ "$up" -eq ${#daemons[@]} ] || return 3
}

case ${1:-} in
    start | stop | status) "$1" ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
