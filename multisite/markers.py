"""Marker files: one JSON file per verified product, written atomically.

A marker exists only once its product has been verified in the target Butler, so
Snakemake's view of what is done is exactly what is really there. Its content is
the product's provenance.
"""

from __future__ import annotations

__all__ = ("read_marker", "write_marker", "provenance")

import getpass
import json
import os
import shlex
import socket
import tempfile
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


def write_marker(path: str | Path, content: dict[str, Any]) -> None:
    """Write ``content`` as JSON to ``path`` atomically (never half-written).

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        Marker path; parent directories are created.
    content : `dict`
        JSON-serialisable provenance.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
