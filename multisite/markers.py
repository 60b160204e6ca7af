"""Marker files: one JSON file per verified product, written atomically.

A marker exists only once its product has been verified in the target Butler, so
Snakemake's view of what is done is exactly what is really there. Its content is
the product's provenance.
"""

from __future__ import annotations

__all__ = ("read_marker", "read_marker_if_written", "write_marker", "provenance")

import getpass
import json
import os
import secrets
import shlex
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def provenance(started: datetime, command: list[str] | None = None) -> dict[str, Any]:
    """Return the provenance fields every marker has: who, where, when, and the tool command run."""
    fields = {"command": shlex.join(command)} if command else {}
    return fields | {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(UTC) - started).total_seconds(), 3),
        "host": socket.gethostname(),
        "user": getpass.getuser(),
    }


def _new_temporary(path: Path) -> tuple[int, Path]:
    """Create a hidden temporary file beside ``path``, open for writing, with the mode the umask gives.

    `tempfile.mkstemp` makes its files 0600 whatever the umask, and `os.replace`
    keeps that mode: the group could not read the marker.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue


def write_marker(path: str | Path, content: dict[str, Any]) -> None:
    """Write ``content`` as JSON to ``path`` atomically (never half-written).

    The file gets the mode the umask gives (0644 under umask 022, 0664 under 002).

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        Marker path; parent directories are created.
    content : `dict`
        JSON-serialisable provenance.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temporary(path)
    try:
        with os.fdopen(fd, "w") as stream:
            json.dump(content, stream, indent=2, sort_keys=True, default=str)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_marker(path: str | Path) -> dict[str, Any]:
    """Read a marker written by `write_marker`."""
    return json.loads(Path(path).read_text())


def read_marker_if_written(path: str | Path) -> dict[str, Any]:
    """Read a marker, or return an empty one when it has not been written yet."""
    return read_marker(path) if Path(path).is_file() else {}
