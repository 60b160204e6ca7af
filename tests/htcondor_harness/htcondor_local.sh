#!/usr/bin/env bash
# Personal HTCondor pool in a Debian 13 (trixie) chroot, for tests on a Debian 12 host
# (Debian 12 has no HTCondor daemons; trixie's `minicondor` package has them).
#
#   htcondor_local.sh install DIR       debootstrap trixie + minicondor into DIR/rootfs (idempotent)
#   htcondor_local.sh up DIR            mount, start condor_master in the chroot, wait for a slot
#   htcondor_local.sh down DIR          stop condor_master (by pid), unmount everything
#   htcondor_local.sh status DIR        condor_status + condor_q from inside the chroot
#   htcondor_local.sh run DIR CMD...    run CMD in the chroot as the job user, clean environment
#   htcondor_local.sh env DIR           print the exports a host-side client needs
#   htcondor_local.sh clean DIR         remove DIR (refuses while anything is mounted below it)
#
# DIR holds the chroot, the pool's config and its tokens: keep it outside every bound path.
# The tests and `make htcondor-setup` use $HTCONDOR_POOL, default /var/tmp/htcondor-pool.
#
# The chroot shares the host's network namespace: collector and schedd listen on
# 127.0.0.1:$HTCONDOR_PORT, and the host's python bindings (htcondor2, e.g. from the project's
# venv, so `snakemake --executor htcondor` on the host) reach them with
# CONDOR_CONFIG=DIR/host_condor_config. That config authenticates with an IDTOKEN for the job
# user, because the schedd refuses jobs owned by root.
#
# Jobs run *inside the chroot* as the job user (uid $HTCONDOR_UID). Host paths they need
# (python, the venv, the repository, the work directory) are bind-mounted at the same path:
# set HTCONDOR_BINDS. NEVER `rm -rf DIR` while the pool is up: DIR/rootfs then contains the
# bound host directories (use `down`, or `clean`, which checks).
#
# Environment:
#   HTCONDOR_PORT        collector port                                       [9618]
#   HTCONDOR_USER        job user's name inside the chroot                    [condortest]
#   HTCONDOR_UID         its uid and gid (numeric on the host, no host user)  [4242]
#   HTCONDOR_BINDS       host paths bind-mounted at the same path, read-only
#                        [this checkout, its .venv if outside it, and the base prefix of .venv's python]
#   HTCONDOR_RW_BINDS    host paths bind-mounted at the same path, writable   [/tmp]
#   HTCONDOR_MIRROR      Debian mirror for debootstrap  [http://deb.debian.org/debian]
#   HTCONDOR_UP_TIMEOUT  seconds to wait for a slot                           [120]
#   HTCONDOR_KEEP_ON_FAIL  if set, a failed 'up' leaves the pool running for inspection
#   HTCONDOR_RUN_PATH, HTCONDOR_RUN_ENV  PATH and extra "A=1 B=2" variables for 'run'
set -euo pipefail

cmd=${1:-}
DIR=${2:-}
if [[ -z "$cmd" || -z "$DIR" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
fi
shift 2
DIR=$(realpath -m "$DIR")
ROOTFS="$DIR/rootfs"
PORT=${HTCONDOR_PORT:-9618}
CUSER=${HTCONDOR_USER:-condortest}
CUID=${HTCONDOR_UID:-4242}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
default_binds() {  # this checkout (repository, .venv) and the interpreter .venv was made from
    local base
    base=$("$REPO/.venv/bin/python" -c 'import sys; print(sys.base_prefix)' 2>/dev/null) || base=""
    echo "$REPO $base"
}
BINDS=${HTCONDOR_BINDS:-$(default_binds)}
RW_BINDS=${HTCONDOR_RW_BINDS:-/tmp}
MIRROR=${HTCONDOR_MIRROR:-http://deb.debian.org/debian}
UP_TIMEOUT=${HTCONDOR_UP_TIMEOUT:-120}
PIDFILE="$DIR/condor_master.pid"
CHROOT_PATH=/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "[htcondor_local] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

in_chroot() { chroot "$ROOTFS" /usr/bin/env -i PATH=$CHROOT_PATH HOME=/root "$@"; }

# mount points at or below DIR, deepest first (from the kernel's table, not from `mount`)
mounts_below() {
    awk -v d="$DIR" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}

ensure_user() {
    # Only inside the chroot; on the host the files simply belong to the numeric uid.
    if ! in_chroot getent group "$CUSER" >/dev/null; then
        in_chroot groupadd -g "$CUID" "$CUSER"
    fi
    if ! in_chroot getent passwd "$CUSER" >/dev/null; then
        in_chroot useradd -u "$CUID" -g "$CUID" -m -d "/home/$CUSER" -s /bin/bash "$CUSER"
    fi
}

write_config() {
    mkdir -p "$ROOTFS/etc/condor/config.d"
    cat > "$ROOTFS/etc/condor/config.d/99-harness.conf" <<EOF
# written by tests/htcondor_harness/htcondor_local.sh
NETWORK_INTERFACE = 127.0.0.1
BIND_ALL_INTERFACES = False
ENABLE_IPV6 = False
CONDOR_HOST = 127.0.0.1
COLLECTOR_HOST = 127.0.0.1:$PORT
USE_SHARED_PORT = False
DAEMON_LIST = MASTER, COLLECTOR, NEGOTIATOR, SCHEDD, STARTD
ALLOW_READ = *
ALLOW_WRITE = *
# FS for condor_* tools inside the chroot; IDTOKENS for the python bindings (the 24.x
# bindings fail FS against these 23.9 daemons: "Directory name doesn't match server's
# network address"), and for host processes, which may be root but submit as $CUSER.
SEC_DEFAULT_AUTHENTICATION_METHODS = FS, IDTOKENS
SEC_CLIENT_AUTHENTICATION_METHODS = FS, IDTOKENS
# fast turnaround for tests
NEGOTIATOR_INTERVAL = 2
NEGOTIATOR_CYCLE_DELAY = 1
SCHEDD_INTERVAL = 5
SCHEDD_MIN_INTERVAL = 1
STARTER_UPDATE_INTERVAL = 5
SHADOW_QUEUE_UPDATE_INTERVAL = 5
UPDATE_INTERVAL = 5
START = TRUE
SUSPEND = FALSE
PREEMPT = FALSE
KILL = FALSE
# No cgroups / systemd here, and the sandbox these machines run in (gVisor) refuses the
# starter's unshare(CLONE_NEWNS): without the next two lines every job is held with
# "Failed to execute ...: (errno=22: 'Invalid argument')" ("Failed to unshare the mount
# namespace" in StarterLog).
MOUNT_UNDER_SCRATCH =
USE_PID_NAMESPACES = False
# one partitionable slot with all the host's cores and memory
NUM_SLOTS = 1
NUM_SLOTS_TYPE_1 = 1
SLOT_TYPE_1 = 100%
SLOT_TYPE_1_PARTITIONABLE = True
EOF
    cat > "$DIR/host_condor_config" <<EOF
# written by tests/htcondor_harness/htcondor_local.sh: host-side clients of the chroot pool
CONDOR_HOST = 127.0.0.1
COLLECTOR_HOST = 127.0.0.1:$PORT
USE_SHARED_PORT = False
# htcondor2.Schedd() without argument finds "the local schedd" through this file
SCHEDD_ADDRESS_FILE = $ROOTFS/var/spool/condor/.schedd_address
# An IDTOKEN for $CUSER (made by 'up'): the schedd refuses jobs owned by root, and with
# this token a root process on the host submits jobs owned by $CUSER.
SEC_CLIENT_AUTHENTICATION_METHODS = IDTOKENS
SEC_DEFAULT_AUTHENTICATION_METHODS = IDTOKENS
SEC_TOKEN_DIRECTORY = $DIR/host_tokens
SEC_TOKEN_SYSTEM_DIRECTORY = $DIR/host_tokens
SEC_PASSWORD_DIRECTORY = $DIR/host_tokens
LOG = $DIR/host_client_log
EOF
    mkdir -p "$DIR/host_client_log" "$DIR/host_tokens"
    chmod 700 "$DIR/host_tokens"
}

do_install() {
    mkdir -p "$DIR"
    [[ -z "$(mounts_below)" ]] || die "something is mounted below $DIR: run '$0 down $DIR' first"
    if [[ -f "$ROOTFS/.harness_installed" ]]; then
        log "already installed in $ROOTFS"
    else
        if ! command -v debootstrap >/dev/null; then
            log "installing debootstrap"
            DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >/dev/null 2>&1 || {
                apt-get update >/dev/null
                DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >/dev/null; }
        fi
        if [[ ! -x "$ROOTFS/usr/bin/apt-get" ]]; then
            log "debootstrap trixie -> $ROOTFS"
            rm -rf "$ROOTFS"
            debootstrap --variant=minbase trixie "$ROOTFS" "$MIRROR" > "$DIR/debootstrap.log" 2>&1 \
                || { tail -20 "$DIR/debootstrap.log" >&2; die "debootstrap failed (log: $DIR/debootstrap.log)"; }
        fi
        cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
        # never let package scripts start services
        printf '#!/bin/sh\nexit 101\n' > "$ROOTFS/usr/sbin/policy-rc.d"
        chmod +x "$ROOTFS/usr/sbin/policy-rc.d"
        log "apt-get install minicondor in the chroot"
        in_chroot env DEBIAN_FRONTEND=noninteractive apt-get update > "$DIR/apt.log" 2>&1 \
            || { tail -20 "$DIR/apt.log" >&2; die "apt-get update in the chroot failed"; }
        in_chroot env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            minicondor procps >> "$DIR/apt.log" 2>&1 \
            || { tail -20 "$DIR/apt.log" >&2; die "apt-get install minicondor failed"; }
        in_chroot apt-get clean
        touch "$ROOTFS/.harness_installed"
    fi
    ensure_user
    write_config
    log "$(in_chroot condor_version | head -1)"
    log "install done: $ROOTFS"
}

is_mounted() { mountpoint -q "$1"; }

bind_same_path() {  # SRC [ro]
    local p=$1 mode=${2:-rw}
    [[ -e "$p" ]] || die "bind source $p does not exist"
    p=$(realpath "$p")
    # Never cover the chroot's own system directories (e.g. an interpreter whose prefix is
    # /usr: it cannot be bound; use one installed elsewhere, like pyenv's).
    case "$p" in
        / | /usr | /usr/lib* | /usr/bin* | /usr/sbin* | /usr/share* | /usr/include* | /bin* | /sbin* | /lib* \
            | /etc* | /var | /var/lib* | /var/log* | /var/spool* | /var/cache* | /proc* | /sys* | /dev* | /run* \
            | /home | /root | "$DIR" | "$DIR"/*)
            die "refusing to bind $p over the chroot's own $p" ;;
    esac
    case "$DIR/" in "$p"/*) die "refusing to bind $p: it contains the pool directory $DIR" ;; esac
    mkdir -p "$ROOTFS$p"
    if ! is_mounted "$ROOTFS$p"; then
        mount --bind "$p" "$ROOTFS$p"
        [[ "$mode" == ro ]] && mount -o remount,bind,ro "$ROOTFS$p"
    fi
    return 0
}

do_mounts() {
    is_mounted "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc"
    is_mounted "$ROOTFS/sys" || mount --rbind /sys "$ROOTFS/sys"
    is_mounted "$ROOTFS/dev" || mount --rbind /dev "$ROOTFS/dev"
    local p
    for p in $BINDS; do bind_same_path "$p" ro; done
    for p in $RW_BINDS; do bind_same_path "$p" rw; done
    # Jobs run as $CUSER: they must traverse the chroot's own /root to reach a bound
    # /root/.pyenv (the host's /root, mode 700, is not touched).
    chmod 711 "$ROOTFS/root"
}

do_umounts() {
    local m
    for m in $(mounts_below); do
        umount "$m" 2>/dev/null || umount -l "$m"
    done
    m=$(mounts_below)
    [[ -z "$m" ]] || die "still mounted: $m"
}

master_running() {
    [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

log_tails() {
    local f
    for f in MasterLog CollectorLog SchedLog StartLog NegotiatorLog; do
        echo "==> $ROOTFS/var/log/condor/$f" >&2
        tail -15 "$ROOTFS/var/log/condor/$f" >&2 2>/dev/null || true
    done
    echo "==> $DIR/condor_master.out" >&2
    tail -15 "$DIR/condor_master.out" >&2 2>/dev/null || true
}

make_tokens() {
    local domain tok
    domain=$(in_chroot condor_config_val UID_DOMAIN)
    if [[ ! -s "$DIR/host_tokens/$CUSER" ]]; then
        tok=$(in_chroot condor_token_create -identity "$CUSER@$domain") \
            || die "condor_token_create failed"
        (umask 077; printf '%s\n' "$tok" > "$DIR/host_tokens/$CUSER")
    fi
    # the same token for clients running in the chroot as $CUSER (their default token dir)
    local td="$ROOTFS/home/$CUSER/.condor/tokens.d"
    install -d -m 700 -o "$CUID" -g "$CUID" "$ROOTFS/home/$CUSER/.condor" "$td"
    install -m 600 -o "$CUID" -g "$CUID" "$DIR/host_tokens/$CUSER" "$td/$CUSER"
}

do_up() {
    [[ -f "$ROOTFS/.harness_installed" ]] || die "not installed: run '$0 install $DIR' first"
    ensure_user
    write_config
    cp /etc/hosts "$ROOTFS/etc/hosts"   # the host name must resolve in the chroot too
    do_mounts
    if master_running; then
        log "condor_master already running (pid $(cat "$PIDFILE"))"
    else
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
            do_umounts
            die "127.0.0.1:$PORT is already in use (another pool?): set HTCONDOR_PORT"
        fi
        # fresh queue and execute dirs each time; logs kept for inspection
        rm -rf "$ROOTFS/var/spool/condor/"* "$ROOTFS/var/lib/condor/execute/"* 2>/dev/null || true
        # -f: stay in the foreground, so $! is condor_master's own pid (chroot and env exec)
        setsid chroot "$ROOTFS" /usr/bin/env -i PATH=$CHROOT_PATH HOME=/root \
            condor_master -f > "$DIR/condor_master.out" 2>&1 < /dev/null &
        echo $! > "$PIDFILE"
        log "condor_master pid $(cat "$PIDFILE")"
    fi
    local t0=$SECONDS
    while (( SECONDS - t0 < UP_TIMEOUT )); do
        if timeout 10 chroot "$ROOTFS" /usr/bin/env -i PATH=$CHROOT_PATH HOME=/root \
                condor_status -af Name 2>/dev/null | grep -q slot; then
            make_tokens
            log "pool up after $((SECONDS - t0)) s: $(in_chroot condor_status -af Name | tr '\n' ' ')(collector 127.0.0.1:$PORT)"
            return 0
        fi
        master_running || { log "condor_master exited"; break; }
        sleep 1
    done
    log "no slot after $((SECONDS - t0)) s; log tails:"
    log_tails
    if [[ -z "${HTCONDOR_KEEP_ON_FAIL:-}" ]]; then
        do_down
    fi
    die "HTCondor pool did not come up (logs: $ROOTFS/var/log/condor; HTCONDOR_KEEP_ON_FAIL=1 keeps it running)"
}

do_down() {
    if master_running; then
        local pid
        pid=$(cat "$PIDFILE")
        log "stopping condor_master pid $pid"
        kill -TERM "$pid"   # the master shuts its daemons (and running jobs) down on SIGTERM
        local i
        for i in $(seq 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "condor_master did not stop in 30 s: SIGQUIT"
            kill -QUIT "$pid" 2>/dev/null || true
            sleep 2
        fi
    fi
    rm -f "$PIDFILE"
    # anything still running with its root in the chroot (an orphaned daemon or job)
    local p left=""
    for p in /proc/[0-9]*; do
        [[ "$(readlink "$p/root" 2>/dev/null)" == "$ROOTFS" ]] && left+=" ${p#/proc/}"
    done
    if [[ -n "$left" ]]; then
        log "processes still in the chroot:$left -> SIGKILL"
        kill -KILL $left 2>/dev/null || true
        sleep 1
    fi
    do_umounts
    log "down"
}

do_run() {
    # CMD as $CUSER in the chroot, with the clean environment a job would get plus what a
    # client needs. Extra variables: HTCONDOR_RUN_ENV="A=1 B=2".
    [[ $# -gt 0 ]] || die "run: no command"
    master_running || die "pool is not up"
    # shellcheck disable=SC2086
    chroot "$ROOTFS" /usr/sbin/runuser -u "$CUSER" -- /usr/bin/env -i \
        PATH="${HTCONDOR_RUN_PATH:-$CHROOT_PATH}" HOME="/home/$CUSER" ${HTCONDOR_RUN_ENV:-} "$@"
}

case "$cmd" in
    install) do_install ;;
    up) do_up ;;
    down) do_down ;;
    status)
        in_chroot condor_status
        in_chroot condor_q -allusers
        ;;
    run) do_run "$@" ;;
    env) echo "export CONDOR_CONFIG=$DIR/host_condor_config" ;;
    clean)
        master_running && die "pool is up: run '$0 down $DIR' first"
        m=$(mounts_below)
        [[ -z "$m" ]] || die "refusing to remove $DIR, still mounted: $m"
        rm -rf --one-file-system "$DIR"
        log "removed $DIR"
        ;;
    *) die "unknown command $cmd" ;;
esac
