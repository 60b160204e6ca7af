"""The campaign event log, and notifications of the events that matter to operators.

Each instance appends one JSON line per event to ``<workdir>/events/<instance>.jsonl``:
what changed (``kind``), where (``site``, ``step``), when, by which instance, and which
process (``host``, ``pid``). A running step's liveness is no event: its heartbeat file
(`multisite.lock.Heartbeat`) is touched instead, so the log does not grow while it runs.
Hand-offs to the central site carry the sending instance's log with the data, so
the central status and report show the whole campaign.

Notifications go to a webhook (Slack/Mattermost-style ``{"text": ...}`` JSON) for
stage completion, failures and stuck transfers. A broken webhook is logged and
never fails the campaign.
"""

from __future__ import annotations

__all__ = ("Event", "EventLog", "notify", "read_events")

import json
import logging
import os
import socket
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .states import EventKind

_LOG = logging.getLogger(__name__)

NOTIFY_KINDS = frozenset({EventKind.DONE, EventKind.FAILED, EventKind.STUCK})
"""Event kinds sent to the webhook by default."""


@dataclass(frozen=True)
class Event:
    """One thing that happened in the campaign.

    Attributes
    ----------
    kind : `str`
        An `~multisite.states.EventKind` (``started``, ``done``, ``failed``,
        ``waiting`` or ``stuck``); a plain string when read back from a log.
    step : `str`
        What it happened to: a rule with its wildcards, e.g. ``step3_in2p3`` or
        ``handoff fanin_step2 in2p3``.
    site : `str`
        Site the step works for.
    instance : `str`
        Campaign instance that recorded it.
    time : `str`
        ISO time (UTC).
    message : `str`
        One line for a person.
    details : `dict`
        Extra facts (log path, counts, marker content, heartbeat interval).
    host : `str`
        Host of the process that recorded it (empty in logs older than this field).
    pid : `int`
        Its process id (0 in logs older than this field).
    """

    kind: str
    step: str
    site: str
    instance: str
    time: str
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    host: str = ""
    pid: int = 0


class EventLog:
    """Append-only JSON-lines event log of one instance.

    Parameters
    ----------
    directory : `str` or `pathlib.Path`
        Directory of the campaign's event logs.
    instance : `str`
        Name of this instance (its site, or ``all`` for a single instance).
    """

    def __init__(self, directory: str | Path, instance: str):
        self.directory = Path(directory)
        self.instance = instance
        self.path = self.directory / f"{instance}.jsonl"

    def record(self, kind: EventKind, step: str, site: str, message: str = "", **details: Any) -> Event:
        """Append an event, with this process's host and pid, and return it."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        host, pid = socket.gethostname(), os.getpid()
        event = Event(kind, step, site, self.instance, now, message, details, host, pid)
        self.directory.mkdir(parents=True, exist_ok=True)
        line = json.dumps(asdict(event), default=str, sort_keys=True) + "\n"
        # One write() per line with O_APPEND: lines of concurrent rules never interleave on a local disk.
        # Mode 0666: the umask decides who else reads it, as for every file the campaign writes.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return event


def read_events(paths: Iterable[str | Path]) -> list[Event]:
    """Read events from log files, oldest first, each event once."""
    seen: dict[tuple, Event] = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                data = json.loads(line)
                event = Event(**data)
                seen[(event.time, event.instance, event.step, event.kind)] = event
    return sorted(seen.values(), key=lambda e: (e.time, e.instance, e.step))


def notify(settings: Mapping[str, Any], event: Event, campaign: str, timeout: float = 5.0) -> bool:
    """Post an event to the configured webhook, if it is of a kind to notify.

    Parameters
    ----------
    settings : `~collections.abc.Mapping`
        The campaign's ``notify`` settings: ``webhook`` (URL) and ``events``
        (kinds to send; default done, failed, stuck).
    event : `Event`
        The event.
    campaign : `str`
        Campaign name, for the message.
    timeout : `float`
        Seconds to wait for the webhook.

    Returns
    -------
    sent : `bool`
        Whether the webhook accepted it. Failures are logged, never raised.
    """
    url = settings.get("webhook")
    if not url or event.kind not in set(settings.get("events", NOTIFY_KINDS)):
        return False
    icon = {EventKind.DONE: ":white_check_mark:", EventKind.FAILED: ":x:", EventKind.STUCK: ":warning:"}.get(
        event.kind, ":information_source:"
    )
    payload = {
        "text": f"{icon} [{campaign}] {event.step} at {event.site}: {event.kind}. {event.message}".strip(),
        "username": f"multisite@{socket.gethostname()}",
        "campaign": campaign,
        "event": asdict(event),
    }
    request = urllib.request.Request(
        url, data=json.dumps(payload, default=str).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except Exception as err:  # noqa: BLE001 - a broken webhook must never fail the campaign
        _LOG.warning("Notification to the webhook failed (%s); the campaign goes on.", type(err).__name__)
        return False
