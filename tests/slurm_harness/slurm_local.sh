#!/usr/bin/env bash
# A real single-node Slurm (Debian 12's slurm-wlm 22.05) for tests and people, no systemd needed.
#
#   slurm_local.sh install     apt-get the packages (slurm-wlm munge slurm-client) if missing (root)
#   slurm_local.sh up DIR      munged + slurmctld + slurmd with all state under DIR; waits for the node
#   slurm_local.sh down DIR    stop the daemons by the pids recorded in DIR
#   slurm_local.sh status DIR  exit 0 when the cluster of DIR answers and its node is up
#
# Everything (munge key and socket, slurm.conf, state, spool, logs, pid files) lives in DIR; nothing
# in /etc is used. Clients find the cluster through SLURM_CONF=DIR/slurm.conf, and `srun` through
# DIR/bin/srun too (a wrapper that sets SLURM_CONF): snakemake-executor-plugin-slurm-jobstep
# (0.6.1) drops every SLURM_* variable, SLURM_CONF included, before the `srun` it runs inside a job.
# `up` prints both settings (`export SLURM_CONF=...`, `export PATH=DIR/bin:$PATH`).
# Ports are picked free on the first `up` and kept in DIR/slurm.conf, so several clusters (one
# per DIR) can run side by side on one machine.
# Daemons and jobs run as root: this is a throw-away test cluster. The node has MinJobAge=300 so
# that `squeue` still shows finished jobs (there is no slurmdbd, hence no working `sacct`).
set -euo pipefail

UP_TIMEOUT=${SLURM_UP_TIMEOUT:-180}
PACKAGES=(slurm-wlm munge slurm-client)

die() {
    echo "slurm_local.sh: $*" >&2
    exit 1
}

need_dir() {
    [[ -n "${1:-}" ]] || die "usage: $0 {up|down|status} DIR"
    mkdir -p "$1"
    cd "$1" && pwd -P
}

install() {
    local missing=()
    for cmd in munged slurmctld slurmd sinfo sbatch squeue scontrol; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}: run as root, or apt-get install ${PACKAGES[*]}"
    echo "Installing ${PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # The package scripts try to start services; this machine has no systemd.
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null; }
}

pid_alive() { # pid_alive PIDFILE NAME: the pid in PIDFILE is a live process called NAME
    local pid
    [[ -s "$1" ]] || return 1
    pid=$(<"$1")
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
        [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]
}

port_free() { # nothing accepts connections on 127.0.0.1:PORT
    ! timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

free_port_pair() { # two consecutive free TCP ports, from 6817 (Slurm's default) upwards
    local p
    for ((p = 6817; p < 6917; p += 2)); do
        if port_free "$p" && port_free $((p + 1)); then
            echo "$p"
            return
        fi
    done
    die "no free port pair for slurmctld/slurmd in 6817-6916"
}

write_config() {
    local dir=$1 host cpus mem port cluster
    host=$(hostname -s)
    # The node as slurmd sees it: its CPUs and memory (MB).
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    [[ -n "$cpus" && -n "$mem" ]] || die "could not read CPUs/RealMemory from 'slurmd -C'"
    port=$(free_port_pair)
    cluster=ms$(echo "$dir" | md5sum | cut -c1-8)
    cat >"$dir/slurm.conf" <<EOF
# Written by tests/slurm_harness/slurm_local.sh: a single-node test cluster, state in $dir
ClusterName=$cluster
# Addresses given, so the host name need not resolve.
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/run/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$dir/plugstack.conf
MailProg=/bin/true
# No cgroups, no systemd: track processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that asks no memory gets 1 GB a CPU (not the whole node).
DefMemPerCPU=1000
# Keep finished jobs visible to squeue/scontrol (no slurmdbd: sacct does not work).
MinJobAge=300
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
# Up to 4 jobs share a core: small, short jobs of a test run side by side even on 2 cores.
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    cat >"$dir/cgroup.conf" <<EOF
# Unused (proctrack/linuxproc, task/none), present so that no daemon looks for /etc/slurm/cgroup.conf.
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
EOF
    : >"$dir/plugstack.conf"
}

write_srun_wrapper() {
    local dir=$1 srun
    srun=$(command -v srun) || die "srun not found"
    [[ "$srun" != "$dir/bin/srun" ]] || srun=/usr/bin/srun
    mkdir -p "$dir/bin"
    cat >"$dir/bin/srun" <<EOF
#!/bin/sh
# srun of the Slurm in $dir, also where SLURM_CONF was removed from the environment.
SLURM_CONF=\${SLURM_CONF:-$dir/slurm.conf} exec $srun "\$@"
EOF
    chmod 755 "$dir/bin/srun"
}

print_env() {
    echo "export SLURM_CONF=$1/slurm.conf"
    echo "export PATH=$1/bin:\$PATH"
}

log_tail() {
    local dir=$1 f
    for f in "$dir"/log/munged.log "$dir"/log/slurmctld.log "$dir"/log/slurmd.log; do
        [[ -f "$f" ]] && { echo "--- tail $f"; tail -n 25 "$f"; }
    done >&2
}

node_state() { # the node's state as sinfo reports it (idle, mixed, alloc, down*, ...), or nothing
    SLURM_CONF="$1/slurm.conf" timeout 3 sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null | head -1
}

status() {
    local dir=$1 state
    pid_alive "$dir/run/munged.pid" munged && pid_alive "$dir/run/slurmctld.pid" slurmctld &&
        pid_alive "$dir/run/slurmd.pid" slurmd || return 1
    state=$(node_state "$dir" || true)
    [[ "$state" =~ ^(idle|mixed|allocated|completing) ]]
}

up() {
    local dir start state cmd d
    dir=$(need_dir "${1:-}")
    start=$SECONDS
    for cmd in munged slurmctld slurmd sinfo; do
        command -v "$cmd" >/dev/null || die "$cmd not found: run '$0 install' (as root) first"
    done
    write_srun_wrapper "$dir"
    if status "$dir"; then
        echo "Slurm already up in $dir"
        print_env "$dir"
        return 0
    fi
    mkdir -p "$dir"/{munge,state,spool,run,log}
    chmod 700 "$dir/munge"
    # munged wants its key owned by the user running it, readable by nobody else.
    if [[ ! -s "$dir/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$dir/munge/munge.key"
    [[ -f "$dir/slurm.conf" ]] || write_config "$dir"
    export SLURM_CONF=$dir/slurm.conf

    if ! pid_alive "$dir/run/munged.pid" munged; then
        rm -f "$dir/run/munge.socket"* "$dir/run/munged.pid"
        munged --force --socket="$dir/run/munge.socket" --key-file="$dir/munge/munge.key" \
            --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
            --seed-file="$dir/munge/munged.seed" ||
            { log_tail "$dir"; die "munged did not start"; }
    fi
    if ! pid_alive "$dir/run/slurmctld.pid" slurmctld; then
        rm -f "$dir/run/slurmctld.pid"
        # -i: ignore state files a previous run left that no longer fit.
        slurmctld -i -f "$SLURM_CONF" || { log_tail "$dir"; die "slurmctld did not start"; }
    fi
    if ! pid_alive "$dir/run/slurmd.pid" slurmd; then
        rm -f "$dir/run/slurmd.pid"
        slurmd -f "$SLURM_CONF" || { log_tail "$dir"; die "slurmd did not start"; }
    fi

    # Wait for the controller to answer and the node to register as idle.
    while :; do
        for d in munged slurmctld slurmd; do
            # A daemon writes its pid file a moment after it forks: no file yet is "starting".
            if [[ -s "$dir/run/$d.pid" ]] || ((SECONDS - start > 15)); then
                pid_alive "$dir/run/$d.pid" "$d" || { log_tail "$dir"; die "$d exited (see $dir/log)"; }
            fi
        done
        state=$(node_state "$dir" || true)
        case "$state" in
        idle* | mixed* | allocated*) break ;;
        down* | drain* | fail*)
            # A node that was down when slurmctld last saved its state: resume it.
            SLURM_CONF=$dir/slurm.conf scontrol update NodeName="$(hostname -s)" State=RESUME \
                >/dev/null 2>&1 || true
            ;;
        esac
        if ((SECONDS - start > UP_TIMEOUT)); then
            log_tail "$dir"
            die "node not idle after ${UP_TIMEOUT}s (sinfo state: '${state:-no answer}')"
        fi
        sleep 0.5
    done
    echo "Slurm up in $dir after $((SECONDS - start))s: node $(hostname -s) $state, partition local"
    print_env "$dir"
}

stop_daemons() { # stop_daemons DIR NAME...: TERM them together, wait up to 10 s, then KILL
    local dir=$1 d pid pids=() alive
    shift
    for d in "$@"; do
        pid_alive "$dir/run/$d.pid" "$d" && pids+=("$(<"$dir/run/$d.pid")")
    done
    if ((${#pids[@]})); then
        kill "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 100); do
            alive=()
            for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
            ((${#alive[@]})) || break
            sleep 0.1
        done
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && { echo "killing $pid (-9)" >&2; kill -9 "$pid" 2>/dev/null; }
        done
    fi
    for d in "$@"; do rm -f "$dir/run/$d.pid"; done
}

cancel_jobs() { # cancel the cluster's unfinished jobs, so that no slurmstepd outlives slurmd
    local dir=$1 jobs
    pid_alive "$dir/run/slurmctld.pid" slurmctld && pid_alive "$dir/run/slurmd.pid" slurmd || return 0
    export SLURM_CONF=$dir/slurm.conf
    jobs=$(timeout 10 squeue -h -t PD,R,CG,S -o %i 2>/dev/null || true)
    [[ -n "$jobs" ]] || return 0
    echo "Cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086 # one job id a word
    timeout 10 scancel $jobs || true
    for _ in $(seq 50); do
        [[ -z "$(timeout 5 squeue -h -t R,CG -o %i 2>/dev/null || true)" ]] && break
        sleep 0.2
    done
}

down() {
    local dir
    [[ -d "${1:-}" ]] || { echo "Slurm down: no directory '${1:-}'"; return 0; }
    dir=$(need_dir "$1")
    cancel_jobs "$dir"
    stop_daemons "$dir" slurmd slurmctld # both still need munge to shut down cleanly
    stop_daemons "$dir" munged
    echo "Slurm down in $dir"
}

case "${1:-}" in
install) install ;;
up) up "${2:-}" ;;
down) down "${2:-}" ;;
status) [[ -d "${2:-}" ]] && status "$(need_dir "$2")" ;;
*) die "usage: $0 {install|up DIR|down DIR|status DIR}" ;;
esac
