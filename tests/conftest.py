"""Shared fixtures: campaign configs in temporary directories, and running Snakemake."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from multisite.rucio_backend import RucioBackend

from .demo_config import relocate_config
from .rucio_harness.local_rucio import LocalRucio

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def demo_config(directory: Path, **overrides) -> Path:
    """Write the demo campaign config into ``directory``, its work area there too."""
    return relocate_config(REPO / "config" / "config.yaml", directory, base=REPO, **overrides)


def snakemake_command(directory: Path, *args: str) -> list[str]:
    """Return the command line running the campaign workflow with ``directory``'s config."""
    return [
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(directory),
        "--configfile",
        str(directory / "config.yaml"),
        "--cores",
        "2",
        *args,
    ]


def scheduled_jobs(output: str) -> dict[str, tuple[str, bool]]:
    """Return Snakemake job id -> (rule, run locally?) from the job headers of a run's log."""
    jobs = {}
    for match in re.finditer(r"^(local)?rule (\w+):\n((?:    .*\n)+)", output, re.M):
        if jobid := re.search(r"^    jobid: (\d+)$", match.group(3), re.M):
            jobs[jobid.group(1)] = (match.group(2), bool(match.group(1)))
    return jobs


def snakemake(directory: Path, *args: str, env: dict | None = None, check: bool = True, timeout: float = 900):
    """Run the campaign workflow with ``directory``'s config; return the completed process."""
    command = snakemake_command(directory, *args)
    full_env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {}))
    result = subprocess.run(
        command, capture_output=True, text=True, env=full_env, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout[-5000:]}\n{result.stderr[-8000:]}"
        )
    return result


@pytest.fixture
def campaign_dir(tmp_path: Path) -> Path:
    """Return a directory holding a demo campaign config."""
    demo_config(tmp_path)
    return tmp_path


class Webhook:
    """A local HTTP server that records what is posted to it."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/campaign"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def browser_dom(html_path: Path) -> str:
    """Render a page in headless Chromium (Debian's package) and return the DOM it built."""
    chromium = shutil.which("chromium")
    assert chromium, "Chromium is needed to check the report: install it with 'make system-deps'"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
        "--dump-dom",
        html_path.resolve().as_uri(),
    ]
    result = subprocess.run([chromium, *flags], capture_output=True, text=True, timeout=120, check=True)
    return result.stdout


SCOPE = "demo"
RSES = {
    "usdf": "USDF_BUTLER_DISK",
    "in2p3": "IN2P3_BUTLER_DISK",
    "ral": "RAL_BUTLER_DISK",
    "lancs": "LANCS_BUTLER_DISK",
}


JOINING_RSES = {"cam": "CAM_BUTLER_DISK"}
"""The RSE of a facility that joins a campaign while it runs (test_instances' fifth site)."""


@pytest.fixture(scope="session")
def local_rucio(tmp_path_factory):
    """Run a local Rucio whose RSEs are ``<storage>/<site>/`` (Butler roots ``<storage>/<site>/demo``)."""
    storage = tmp_path_factory.mktemp("rucio-storage")
    rses = {rse: str(storage / site) for site, rse in (RSES | JOINING_RSES).items()}
    rucio = LocalRucio(tmp_path_factory.mktemp("rucio"), rses, SCOPE)
    rucio.start()
    try:
        yield rucio, storage
    finally:
        rucio.stop()


@pytest.fixture(scope="session")
def demo_through_faults(tmp_path_factory):
    """Run the demo campaign (butler backend, one instance) to its end through test_faults' faults.

    test_faults checks the recovery; test_instances compares the final outputs of four site
    instances with those of this single-instance run: one campaign for both.
    """
    from .test_faults import run_through_faults, small_filesystem

    directory = tmp_path_factory.mktemp("faults")
    with small_filesystem(directory) as small:
        yield run_through_faults(directory, small)


def rucio_config(
    directory: Path,
    rucio: LocalRucio,
    storage: Path,
    max_files_per_dataset: int = 10_000,
    import_batch: int = 10_000,
    scope: str = SCOPE,
    **poll,
) -> Path:
    """Demo campaign config with the rucio backend and the repositories at the RSEs' roots.

    The repositories' registries are PostgreSQL, as at the facilities: the test Rucio's
    cluster, one namespace per repository (named after ``directory`` and the site). A
    small ``max_files_per_dataset`` splits the demo's hand-offs into several Rucio datasets,
    a small ``import_batch`` their raws' Butler exports into several parts. A campaign
    in a ``scope`` of its own (added here) has its repositories at ``<storage>/<site>/<scope>``,
    its RSEs' roots for that scope.
    """
    client_config = rucio.write_client_config(directory / "rucio.cfg", directory / "rucio-token")
    if scope != SCOPE:
        settings = {"scope": SCOPE, "rses": RSES, "client_config": str(rucio.client_config)}
        RucioBackend(SCOPE, settings).client.add_scope("root", scope)
    path = demo_config(
        directory,
        transfer={
            "backend": "rucio",
            "import_batch": import_batch,
            "rucio": {
                "scope": scope,
                "account": "root",
                "activity": "Data Consolidation",
                "grouping": "DATASET",
                "client_config": str(client_config),
                "rses": RSES,
                "max_files_per_dataset": max_files_per_dataset,
                "poll": {"interval_s": 0.5, "max_interval_s": 2, "backoff": 1.5, "timeout_s": 120, **poll},
            },
        },
    )
    config = yaml.safe_load(path.read_text())
    prefix = re.sub(r"[^a-z0-9_]", "_", directory.name.lower())
    for name, site in config["sites"].items():
        site["repo"] = str(storage / name / scope)
        site["registry"] = {"db": rucio.butler_db, "namespace": f"{prefix}_{name}"}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
