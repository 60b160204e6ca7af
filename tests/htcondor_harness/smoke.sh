#!/usr/bin/env bash
# End-to-end check of the local HTCondor harness: install (cached), up, a two-rule
# Snakefile through `snakemake --executor htcondor` run by THIS host process (root) with the
# project's venv, down. Usage: smoke.sh [POOL_DIR] (default $HTCONDOR_POOL or /var/tmp/htcondor-pool).
# Env: VENV (default: <repo>/.venv), KEEP_UP=1 to leave the pool running.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
POOL=${1:-${HTCONDOR_POOL:-/var/tmp/htcondor-pool}}
PROFILE="$REPO/tests/profiles/htcondor"
VENV=${VENV:-$REPO/.venv}
H="$HERE/htcondor_local.sh"

# What jobs need at the same path in the chroot: the interpreter's base prefix (pyenv),
# the venv, the repository (profile, Snakefiles). Read-only. /tmp (work dirs) read-write.
BASE=$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)')
binds="$BASE $REPO"
case "$VENV/" in "$REPO"/*) ;; *) binds="$binds $VENV" ;; esac
export HTCONDOR_BINDS="$binds" HTCONDOR_RW_BINDS=/tmp
JOB_UID=${HTCONDOR_UID:-4242}

t0=$SECONDS
"$H" install "$POOL"
t1=$SECONDS
"$H" up "$POOL"
t2=$SECONDS
[[ -n "${KEEP_UP:-}" ]] || trap '"$H" down "$POOL"' EXIT

WORK=$(mktemp -d /tmp/htcondor-smoke.XXXXXX)
cat > "$WORK/Snakefile" <<'EOF'
rule all:
    input: "out/b.txt"

rule a:
    output: "out/a.txt"
    shell: "echo hello from $(id -un) > {output}"

rule b:
    input: "out/a.txt"
    output: "out/b.txt"
    shell: "cat {input} > {output}; echo b >> {output}"
EOF
# The jobs run as uid $JOB_UID and write into dirs that this (root) snakemake creates:
# give the work dir to that uid's group, setgid, and run snakemake with umask 002.
chown "$JOB_UID:$JOB_UID" "$WORK"
chmod 2775 "$WORK"
(
    umask 002
    export CONDOR_CONFIG="$POOL/host_condor_config"
    export HTC_JOB_PATH="$VENV/bin:/usr/bin:/bin" HTC_JOB_HOME="$WORK"
    cd "$WORK"
    "$VENV/bin/snakemake" --profile "$PROFILE" > "$WORK/snakemake.log" 2>&1
) || { tail -30 "$WORK/snakemake.log"; echo "SMOKE FAILED (work dir $WORK)"; exit 1; }
t3=$SECONDS
grep -q "hello from condortest" "$WORK/out/b.txt" || { cat "$WORK/out/b.txt"; echo "SMOKE FAILED: unexpected output"; exit 1; }
echo "SMOKE OK: install $((t1 - t0)) s, up $((t2 - t1)) s, 2-rule snakemake $((t3 - t2)) s (work dir $WORK)"
