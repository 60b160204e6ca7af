"""A real, personal HTCondor pool for the tests, in a Debian 13 chroot (``minicondor``).

Test-only: nothing in the ``multisite`` package imports it. ``htcondor_local.sh`` does the
work (``install DIR``, ``up DIR``, ``down DIR``, ``run DIR CMD...``); `start` installs the
chroot when missing, bind-mounts what jobs need at the same path (this checkout, its venv,
the venv's base interpreter, and a fresh work area writable by the job user) and brings the
pool up; `LocalPool.stop` stops it by process id and unmounts everything.

Jobs run in the chroot as the job user (uid `JOB_UID`), and so does `LocalPool.run`: a
Snakemake started that way submits to the pool with the venv's HTCondor bindings, and every
file of the workflow, local rules' and jobs' alike, belongs to one user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import multisite

SCRIPT = Path(__file__).resolve().parent / "htcondor_local.sh"
REPO = SCRIPT.parent.parent.parent
DEFAULT_POOL = "/var/tmp/htcondor-pool"
JOB_USER = "condortest"
JOB_UID = 4242


def pool_directory() -> Path:
    """Return where the chroot and the pool's state live: ``$HTCONDOR_POOL`` or `DEFAULT_POOL`."""
    return Path(os.environ.get("HTCONDOR_POOL") or DEFAULT_POOL)


def read_only_binds() -> list[str]:
    """Return the host paths jobs need read-only at the same path.

    The running checkout (Snakefile, scripts), the running venv, the checkout its
    ``multisite`` is installed from (editable; usually the same) and the interpreter the venv
    was made from.
    """
    paths = {path.resolve() for path in (REPO, Path(sys.prefix), Path(multisite.__file__).parent.parent)}
    paths.add(Path(sys.base_prefix))
    # a path inside another one comes with it (and a bind over a bind could not be unmounted)
    return sorted(str(path) for path in paths if not any(path.is_relative_to(p) and path != p for p in paths))


def _script(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        timeout=timeout,
        check=False,
    )


def _failure(what: str, result: subprocess.CompletedProcess) -> RuntimeError:
    return RuntimeError(
        f"{what} (exit {result.returncode}):\n{result.stdout[-5000:]}\n{result.stderr[-8000:]}"
    )


@dataclass
class LocalPool:
    """A running pool whose chroot and state are in ``directory``.

    ``workspace`` is a host directory, bound writable at the same path in the chroot and
    owned by the job user: put workflows there.
    """

    directory: Path
    workspace: Path
    started: bool  # False when the pool was already up: then stop() leaves it running

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"

    def run(
        self, *command: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """Run ``command`` in the chroot as the job user, in ``cwd``, with a clean environment.

        ``PATH`` is the venv's ``bin`` then the chroot's; ``env`` adds variables (values
        without spaces).
        """
        if cwd is not None:
            command = ("sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *command)
        extra = " ".join(f"{name}={value}" for name, value in (env or {}).items())
        return _script(
            "run",
            str(self.directory),
            *command,
            env={
                "HTCONDOR_RUN_PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                "HTCONDOR_RUN_ENV": extra,
            },
            timeout=timeout,
        )

    def condor(self, *command: str) -> str:
        """Run an HTCondor tool (``condor_q``, ``condor_history``...) in the chroot; return its stdout."""
        result = self.run(*command, timeout=60)
        if result.returncode != 0:
            raise _failure(" ".join(command), result)
        return result.stdout

    def history(self, constraint: str = "true") -> list[dict]:
        """Return the ads of the finished jobs that match ``constraint``, from ``condor_history``."""
        text = self.condor("condor_history", "-json", "-constraint", constraint)
        return json.loads(text) if text.strip() else []

    def give_to_job_user(self, path: Path) -> None:
        """Make ``path`` and everything below it belong to the job user (as Snakemake in the chroot needs)."""
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, entry) for entry in dirs + files)]:
                os.lchown(name, JOB_UID, JOB_UID)

    def stop(self) -> None:
        """Stop the pool and unmount everything, then remove the workspace.

        A pool that was already up is left running: only the workspace's bind is unmounted.
        """
        try:
            if self.started:
                result = _script("down", str(self.directory), timeout=120)
                if result.returncode != 0:
                    raise _failure(f"HTCondor pool in {self.directory} did not go down", result)
            else:
                subprocess.run(["umount", str(self.rootfs) + str(self.workspace)], check=True, timeout=60)
        finally:
            if not os.path.ismount(str(self.rootfs) + str(self.workspace)):
                shutil.rmtree(self.workspace, ignore_errors=True)


def install(directory: Path | str | None = None, timeout: float = 900) -> Path:
    """Install the chroot into ``directory`` (default `pool_directory`) unless it is there; return it."""
    directory = Path(directory or pool_directory()).resolve()
    result = _script("install", str(directory), timeout=timeout)
    if result.returncode != 0:
        raise _failure(f"could not install the HTCondor chroot into {directory}", result)
    return directory


def start(directory: Path | str | None = None, timeout: float = 300) -> LocalPool:
    """Install if needed and bring up the pool of ``directory``; fail with the harness's log if it does not.

    Raises
    ------
    RuntimeError
        If the chroot cannot be installed or the pool does not come up.
    """
    directory = install(directory, timeout=max(timeout, 900))
    already = (directory / "condor_master.pid").is_file() and _script(
        "status", str(directory)
    ).returncode == 0
    workspace = Path(tempfile.mkdtemp(prefix="multisite-htcondor-"))
    os.chown(workspace, JOB_UID, JOB_UID)
    os.chmod(workspace, 0o2775)
    binds = {"HTCONDOR_BINDS": " ".join(read_only_binds()), "HTCONDOR_RW_BINDS": str(workspace)}
    result = _script("up", str(directory), env=binds, timeout=timeout)
    if result.returncode != 0:
        shutil.rmtree(workspace, ignore_errors=True)
        raise _failure(f"HTCondor pool in {directory} did not come up", result)
    return LocalPool(directory, workspace, started=not already)
