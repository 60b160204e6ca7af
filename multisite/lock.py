"""Which process owns what: the one instance on a campaign work directory, and running steps' heartbeats.

Snakemake's own lock is per working directory (``.snakemake/locks``), not per campaign:
two instances of one config started from two directories would both run and delete
each other's markers. `InstanceHold` makes one instance the holder of a campaign work
directory (`~multisite.layout.Layout.instance_lock`). The workflow takes it in its
``onstart`` handler, which Snakemake runs in the main process only (never in a dry run,
nor in the job processes that executors start with ``--no-hooks``), and gives it back
in ``onsuccess`` and ``onerror``, and at exit. A hold whose process is gone from this
host is taken over; ``multisite unlock`` clears one left on another host.

A running step keeps a `Heartbeat`: a small file under
`~multisite.layout.Layout.heartbeats` naming its process, touched by a daemon thread
every ``status.heartbeat_s`` seconds and removed when the step ends, so the event log
gets no line per beat. `stale_heartbeat` tells the status that a step is dead: its
process is gone from this host, or its heartbeat stopped.

Both files name their process with an `Owner`. A process on this host is gone when its
pid runs no more (or is a zombie, or is another process that got the pid since) or the
host rebooted since; a process on another host cannot be checked from here, only its
heartbeat.
"""

from __future__ import annotations

__all__ = (
    "HEARTBEAT_MISSES",
    "Heartbeat",
    "HoldRefused",
    "InstanceHold",
    "Owner",
    "StaleHeartbeat",
    "live_steps",
    "stale_heartbeat",
    "write_heartbeat",
)

import atexit
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .markers import write_marker

HEARTBEAT_MISSES = 3
"""Heartbeats a step may miss before the status shows it dead."""


def _iso(timestamp: float | None = None) -> str:
    """Return the ISO time (UTC, seconds) of a POSIX timestamp, or of now."""
    moment = datetime.now(UTC) if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds")


@cache
def _boot_id() -> str:
    """Return the boot identifier of this host (new at every boot); empty where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str]:
    """Return the fields of ``/proc/<pid>/stat`` from the third (state) on; empty where there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def _start_ticks(pid: int) -> int:
    """Return when process ``pid`` started (clock ticks since boot), 0 where unknown."""
    fields = _proc_stat(pid)
    return int(fields[19]) if len(fields) > 19 else 0


def _runs(pid: int, start_ticks: int = 0) -> bool:
    """Whether process ``pid`` of this host runs, and is the one started at ``start_ticks`` (when known).

    A zombie (killed, not reaped) does not run; a process that got the pid since is another one.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    if _proc_stat(pid)[:1] == ["Z"]:
        return False
    return not start_ticks or _start_ticks(pid) in (0, start_ticks)


@dataclass(frozen=True)
class Owner:
    """A process that holds a work directory or runs a step.

    Attributes
    ----------
    host : `str`
        Host name.
    pid : `int`
        Process id on that host.
    since : `str`
        ISO time (UTC) it started holding or running.
    boot : `str`
        The host's boot identifier then (a reboot ends every process).
    start_ticks : `int`
        When the process started (clock ticks since boot; 0 where unknown), to tell it
        from a later process with the same pid.
    instance : `str`
        Campaign instance (its site, or ``all``).
    directory : `str`
        Its working directory: where Snakemake ran, to restart it there.
    """

    host: str
    pid: int
    since: str
    boot: str = ""
    start_ticks: int = 0
    instance: str = ""
    directory: str = ""

    @classmethod
    def this_process(cls, instance: str = "") -> Self:
        """Return the owner record of the calling process."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _iso(), _boot_id(), _start_ticks(pid), instance, os.getcwd())

    @classmethod
    def from_mapping(cls, data: Any) -> Self | None:
        """Return the owner a file's JSON names, or `None` when it names none (foreign or damaged)."""
        if not isinstance(data, Mapping):
            return None
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        numbers = ("pid", "start_ticks")
        if not all(type(value) is (int if name in numbers else str) for name, value in values.items()):
            return None
        return cls(**values) if {"host", "pid", "since"} <= values.keys() else None

    def is_gone(self) -> bool:
        """Whether the process is known to have ended.

        On this host: its pid runs no more or runs another process, or the host rebooted
        since. A process on another host cannot be checked from here: `False`.
        """
        if self.host != socket.gethostname():
            return False
        return bool(self.boot and self.boot != _boot_id()) or not _runs(self.pid, self.start_ticks)

    def is_this_process(self) -> bool:
        """Whether the record names the calling process."""
        pid = os.getpid()
        same_start = self.start_ticks in (0, _start_ticks(pid))
        return self.host == socket.gethostname() and self.pid == pid and same_start

    def __str__(self) -> str:
        where = f", started in {self.directory}" if self.directory else ""
        instance = f" (instance {self.instance}{where})" if self.instance else ""
        return f"process {self.pid} on {self.host}{instance} since {self.since}"


def _read_json(text: str) -> Any:
    """Parse JSON, `None` when the text is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


class HoldRefused(RuntimeError):
    """The hold cannot be taken or cleared (another instance holds it); the message says why and the fix."""


class InstanceHold:
    """The hold of the one instance running on a campaign work directory.

    The hold file holds the holder's `Owner` as JSON, or nothing when free; every
    change is made under an exclusive ``flock`` of that file, so two instances
    starting together, or taking over the same stale hold, cannot both win.

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        The hold file, `~multisite.layout.Layout.instance_lock`.
    config : `str` or `pathlib.Path`, optional
        The campaign config, named in the command that clears a hold.
    """

    def __init__(self, path: str | Path, config: str | Path | None = None):
        self.path = Path(path)
        self.config = str(config) if config is not None else "<campaign config>"
        self._mine: Owner | None = None

    @contextmanager
    def _locked(self) -> Iterator[int]:
        """Hold the file's exclusive ``flock``; yield its descriptor."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise HoldRefused(
                f"cannot open the instance hold {self.path} ({err.strerror}): make the campaign work "
                "directory writable for this user (its group, with umask 002, for a shared campaign)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the flock

    @staticmethod
    def _read(fd: int) -> tuple[str, Owner | None]:
        """Return the file's text and the owner it names."""
        text = os.pread(fd, 65536, 0).decode(errors="replace")
        return text, Owner.from_mapping(_read_json(text))

    @staticmethod
    def _write(fd: int, text: str) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)

    @property
    def _clear_hint(self) -> str:
        return f"multisite unlock {self.config}"

    def acquire(self, instance: str) -> Owner | None:
        """Take the hold for the calling process, until `release` or its exit.

        Parameters
        ----------
        instance : `str`
            This instance's name (its site, or ``all``).

        Returns
        -------
        taken_over : `Owner` or `None`
            The holder whose process was gone from this host and whose hold was taken
            over; `None` when the hold was free (or already this process's).

        Raises
        ------
        HoldRefused
            Raised when another instance holds it (or the file names no holder), with
            the holder and how to clear a hold that outlived its process.
        """
        me = Owner.this_process(instance)
        with self._locked() as fd:
            text, holder = self._read(fd)
            if text.strip() and holder is None:
                raise HoldRefused(
                    f"{self.path} names no holder ({text[:80]!r}): another program wrote it. If no instance "
                    f"of this campaign runs, clear it with `{self._clear_hint}` and start again."
                )
            if holder is not None and holder.is_this_process():
                me, holder = holder, None
            elif holder is not None and not holder.is_gone():
                raise HoldRefused(
                    f"The campaign work directory {self.path.parent} is held by another instance: {holder}. "
                    "One instance runs per campaign work directory (Snakemake's own lock covers only the "
                    "directory it runs in, and two instances would delete each other's markers): wait for "
                    "it to end or stop it. If it no longer runs (its host crashed or was cut off), clear "
                    f"its hold with `{self._clear_hint}`, then start again."
                )
            else:
                self._write(fd, json.dumps(asdict(me), sort_keys=True) + "\n")
        if self._mine is None:
            atexit.register(self.release)
        self._mine = me
        return holder

    def release(self) -> bool:
        """Give the hold back if this process holds it; return whether it did."""
        if self._mine is None or not self.path.exists():
            self._mine = None
            return False
        with self._locked() as fd:
            _, holder = self._read(fd)
            mine = holder == self._mine
            if mine:
                self._write(fd, "")
        self._mine = None
        return mine

    def holder(self) -> Owner | None:
        """Return the instance holding the work directory, if any."""
        if not self.path.exists():
            return None
        with self._locked() as fd:
            return self._read(fd)[1]

    def clear(self) -> Owner | None:
        """Clear a hold that outlived its instance (``multisite unlock``); return the holder cleared.

        Raises
        ------
        HoldRefused
            Raised when the holder still runs on this host: it is no stale hold.
        """
        if not self.path.exists():
            return None
        with self._locked() as fd:
            _, holder = self._read(fd)
            if holder is not None and holder.host == socket.gethostname() and not holder.is_gone():
                raise HoldRefused(
                    f"{holder} holds {self.path.parent} and still runs on this host: stop it "
                    f"(kill {holder.pid}) or wait for it to end; its hold ends with it."
                )
            self._write(fd, "")
        return holder


@dataclass(frozen=True)
class StaleHeartbeat:
    """Why the status counts a step dead.

    Attributes
    ----------
    owner : `Owner`
        The step's process.
    last_seen : `str`
        ISO time (UTC) of its last heartbeat.
    reason : `str`
        One line for a person.
    """

    owner: Owner
    last_seen: str
    reason: str


def write_heartbeat(path: Path, owner: Owner, interval_s: float) -> None:
    """Write a step's heartbeat file (atomically): its process, and the seconds between two beats.

    Parameters
    ----------
    path : `pathlib.Path`
        The file, `~multisite.layout.Layout.heartbeat`.
    owner : `Owner`
        The step's process.
    interval_s : `float`
        Seconds between two beats.
    """
    write_marker(path, asdict(owner) | {"interval_s": interval_s})


class Heartbeat:
    """The heartbeat file of a running step: written on entry, touched from a daemon thread, removed on exit.

    A process killed (``SIGKILL``, a lost node) leaves the file behind; it stops
    being touched and names a process that is gone.

    Parameters
    ----------
    path : `pathlib.Path`
        The file, `~multisite.layout.Layout.heartbeat`.
    interval_s : `float`
        Seconds between two beats (``status.heartbeat_s``).
    owner : `Owner`
        The step's process.
    """

    def __init__(self, path: Path, interval_s: float, owner: Owner):
        self.path = path
        self.interval_s = interval_s
        self.owner = owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {path.name}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.path.exists():
                    os.utime(self.path)
                else:  # removed by someone: write it again
                    write_heartbeat(self.path, self.owner, self.interval_s)
            except OSError:
                pass  # a passing filesystem error must not stop the step; the next beat tries again

    def __enter__(self) -> Self:
        write_heartbeat(self.path, self.owner, self.interval_s)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def stale_heartbeat(path: Path, now: float | None = None) -> StaleHeartbeat | None:
    """Return why a step whose last event says it runs is dead, or `None` while nothing says so.

    Dead: its heartbeat file names a process gone from this host, or was last touched
    more than `HEARTBEAT_MISSES` intervals ago. No file (the step ended, or ran for
    another work directory) or a file naming no process: `None`.

    Parameters
    ----------
    path : `pathlib.Path`
        The step's heartbeat file.
    now : `float`, optional
        POSIX time to judge at (default now).
    """
    try:
        touched = path.stat().st_mtime
        data = _read_json(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None
    owner = Owner.from_mapping(data)
    interval = data.get("interval_s") if owner is not None else None
    if owner is None or not isinstance(interval, int | float) or interval <= 0:
        return None
    last_seen = _iso(touched)
    if owner.is_gone():
        return StaleHeartbeat(owner, last_seen, f"its process {owner.pid} on {owner.host} is gone")
    silent = (time.time() if now is None else now) - touched
    if silent > HEARTBEAT_MISSES * interval:
        return StaleHeartbeat(
            owner,
            last_seen,
            f"no heartbeat from its process {owner.pid} on {owner.host} for {silent:.0f} s "
            f"(one every {interval:g} s expected)",
        )
    return None


def live_steps(heartbeats: Path, now: float | None = None) -> list[tuple[str, Owner]]:
    """Return the steps under ``heartbeats`` whose heartbeat says they still run, with their processes.

    A batch job (Slurm, HTCondor) goes on after the Snakemake that submitted it was
    killed, and its heartbeat with it, until the job ends or falls silent
    (`stale_heartbeat`).

    Parameters
    ----------
    heartbeats : `pathlib.Path`
        A work directory's heartbeat files (`~multisite.layout.Layout.heartbeats`).
    now : `float`, optional
        POSIX time to judge at (default now).

    Returns
    -------
    steps : `list` [`tuple` [`str`, `Owner`]]
        Each live step as ``<instance>/<step file>``, and its process.
    """
    live = []
    for path in sorted(heartbeats.glob("*/*")):
        try:
            owner = Owner.from_mapping(_read_json(path.read_text()))
        except (OSError, UnicodeDecodeError):
            continue  # ended while listed, or not a heartbeat
        if owner is not None and stale_heartbeat(path, now) is None:
            live.append((f"{path.parent.name}/{path.name}", owner))
    return live
