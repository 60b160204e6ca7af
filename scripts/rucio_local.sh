#!/usr/bin/env bash
# Bring a local, real Rucio up or down for a person (tests use the same harness).
#
#   scripts/rucio_local.sh up [DIR]     # default DIR work/rucio
#   scripts/rucio_local.sh down [DIR] [--purge]
#   scripts/rucio_local.sh restart-server [DIR]
#
# "up" creates the Rucio server's own venv (.rucio-venv, from requirements-rucio-server.txt)
# the first time, starts a private PostgreSQL 15 cluster, the Rucio server (gunicorn on
# 127.0.0.1), RSEs USDF/IN2P3/RAL/LANCS_BUTLER_DISK on DIR/storage/<site>/ (scope "demo",
# so Butler repositories live at DIR/storage/<site>/demo) and the judge and conveyor daemons
# with a file-copy transfer tool. It prints the client config to name in a campaign's
# transfer.rucio.client_config. "up" again reuses a running Rucio, or restarts what is not
# running on its recorded ports with its data. "down" stops everything by the process ids it
# recorded and keeps the data ("--purge" deletes it); "restart-server" restarts only the server.
set -euo pipefail
cd "$(dirname "$0")/.."
action="${1:?usage: scripts/rucio_local.sh up|down|restart-server [DIR] [--purge]}"
dir="${2:-work/rucio}"
exec .venv/bin/python tests/rucio_harness/local_rucio.py "$action" --dir "$dir" "${@:3}"
