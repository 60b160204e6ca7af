"""A real, local single-node Slurm for the tests (Debian's slurm-wlm 22.05, munge).

Test-only: nothing in the ``multisite`` package imports it. ``slurm_local.sh`` does the
work (``install``, ``up DIR``, ``down DIR``); `start` brings a cluster up with all its state
in a directory and returns a `LocalSlurm` whose ``env`` points Slurm's clients (and so
Snakemake's Slurm executor) at it; `LocalSlurm.stop` stops its daemons by process id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "slurm_local.sh"
PARTITION = "local"


@dataclass
class LocalSlurm:
    """A Slurm cluster whose config, state and logs are under ``directory``."""

    directory: Path
    started: bool  # False when the cluster was already up: then stop() leaves it running

    @property
    def conf(self) -> Path:
        return self.directory / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm's clients (sbatch, squeue, ...) and for Snakemake's Slurm executor.

        ``SLURM_CONF`` names the cluster; ``PATH`` starts with the directory of an ``srun`` that
        sets it again, since the jobstep executor removes every ``SLURM_*`` variable before its
        ``srun`` inside a job.
        """
        return {
            "SLURM_CONF": str(self.conf),
            "PATH": f"{self.directory / 'bin'}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        }

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=dict(os.environ, **self.env),
            timeout=30,
            check=check,
        )

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` of a job as a dict (JobState, JobName, ExitCode, ...)."""
        text = self.run("scontrol", "--oneliner", "show", "job", str(job_id)).stdout
        fields = {}
        for word in text.split():
            key, sep, value = word.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def stop(self, force: bool = False) -> None:
        """Stop the daemons by the pids recorded in the directory (unless started by someone else)."""
        if self.started or force:
            subprocess.run([str(SCRIPT), "down", str(self.directory)], check=True, timeout=60)


def missing_commands() -> list[str]:
    return [c for c in ("munged", "slurmctld", "slurmd", "sbatch", "squeue") if not shutil.which(c)]


def install() -> None:
    """Install Debian's Slurm and munge packages when missing (needs root)."""
    subprocess.run([str(SCRIPT), "install"], check=True, timeout=900)


def start(directory: Path | str, timeout: float = 300) -> LocalSlurm:
    """Bring up (or reuse) the cluster of ``directory``; fail with its daemons' logs if it does not."""
    directory = Path(directory).resolve()
    if missing_commands():
        install()
    already = (
        subprocess.run([str(SCRIPT), "status", str(directory)], capture_output=True, timeout=60).returncode
        == 0
    )
    result = subprocess.run(
        [str(SCRIPT), "up", str(directory)], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        if not already:  # leave no half-started daemons behind
            subprocess.run([str(SCRIPT), "down", str(directory)], capture_output=True, timeout=60)
        raise RuntimeError(f"Slurm did not come up in {directory}:\n{result.stdout}\n{result.stderr}")
    return LocalSlurm(directory, started=not already)
