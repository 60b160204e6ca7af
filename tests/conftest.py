"""Shared fixtures: campaign configs in temporary directories, and running Snakemake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from multisite.demo.campaign import relocate_config

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def demo_config(directory: Path, **overrides) -> Path:
    """Write the demo campaign config into ``directory``, its work area there too."""
    return relocate_config(REPO / "config" / "config.yaml", directory, base=REPO, **overrides)


def snakemake(directory: Path, *args: str, env: dict | None = None, check: bool = True, timeout: float = 900):
    """Run the campaign workflow with ``directory``'s config; return the completed process."""
    command = [
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
