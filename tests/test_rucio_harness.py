"""`make rucio-up` / `rucio-down` (``scripts/rucio_local.sh``) are safe to repeat.

``up`` on a running local Rucio reuses it; a server that died, or a Rucio brought
``down``, comes back on its recorded port with its data; ``down --purge`` deletes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from multisite.rucio_backend import RucioBackend

from .conftest import REPO

SCRIPT = REPO / "scripts" / "rucio_local.sh"


def local_rucio(action: str, directory: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(SCRIPT), action, str(directory), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def state(directory: Path) -> dict:
    return json.loads((directory / "state.json").read_text())


def datasets(directory: Path) -> list[str]:
    backend = RucioBackend(
        "harness", {"scope": "demo", "rses": {}, "client_config": str(directory / "client" / "rucio.cfg")}
    )
    return sorted(backend.client.list_dids("demo", {"name": "kept.*"}, did_type="dataset"))


def test_up_and_down_are_idempotent_and_keep_the_data(tmp_path):
    directory = tmp_path / "rucio"
    try:
        local_rucio("up", directory)
        first = state(directory)
        RucioBackend(
            "harness", {"scope": "demo", "rses": {}, "client_config": str(directory / "client" / "rucio.cfg")}
        ).client.add_dataset("demo", "kept.dataset")

        # Up again: the same server, not a second one.
        local_rucio("up", directory)
        assert {k: state(directory)[k] for k in ("port", "server_pid", "daemons_pid", "pg_port")} == {
            k: first[k] for k in ("port", "server_pid", "daemons_pid", "pg_port")
        }

        # A server that died comes back on its port, with its data.
        os.killpg(first["server_pid"], signal.SIGKILL)
        local_rucio("up", directory)
        assert (
            state(directory)["port"] == first["port"]
            and state(directory)["server_pid"] != first["server_pid"]
        )
        assert datasets(directory) == ["kept.dataset"]

        # Down keeps the data; up brings everything back on the recorded ports.
        local_rucio("down", directory)
        assert not state(directory)["server_pid"] and not state(directory)["daemons_pid"]
        local_rucio("up", directory)
        assert (state(directory)["port"], state(directory)["pg_port"]) == (first["port"], first["pg_port"])
        assert datasets(directory) == ["kept.dataset"]

        # Only the server, restarted by hand.
        local_rucio("restart-server", directory)
        assert datasets(directory) == ["kept.dataset"]
    finally:
        local_rucio("down", directory, "--purge")
    assert not (directory / "state.json").exists()
