"""Event kinds of the campaign event log, and states of steps in the status and the report.

Both are `enum.StrEnum`: a member is its value, so the JSON event log, the status
text and the HTML report hold the same plain strings as before (``json.dumps``
and f-strings write ``done``, never ``EventKind.DONE``), and plain strings read
back from a log compare and look up equal to the members.
"""

from __future__ import annotations

__all__ = ("LIVE_EVENT_KINDS", "STATE_OF_EVENT", "EventKind", "StepState")

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class EventKind(StrEnum):
    """What an event of the campaign event log says happened to a step."""

    STARTED = "started"
    """A rule started the step."""

    WAITING = "waiting"
    """The step waits for another site's instance (a hand-off not yet sent)."""

    DONE = "done"
    """The step finished and its markers are written."""

    FAILED = "failed"
    """The step failed; rerunning its rule resumes it."""

    STUCK = "stuck"
    """A transfer stopped moving (a Rucio rule STUCK, SUSPENDED or out of time)."""


class StepState(StrEnum):
    """State of a step (a stage chunk at a site, or a hand-off for a site), in order of progress.

    Like the ``StatusEnum`` of ``lsst-dm/cm-service``, the bad states come first
    (`rank` -1), then the states of progress from 0: waiting for prerequisites,
    ready but not started, running, done. Members iterate in that order. Comparison
    operators stay those of `str` (the report sorts its state counts by name); use
    `rank` to compare progress.
    """

    FAILED = "failed"
    """The step failed, or its transfer is stuck: an operator must look at it."""

    DEAD = "dead"
    """The step's last event says it runs, but its process is gone or its heartbeat stopped:
    its instance was killed or its host lost; an operator must restart the instance."""

    WAITING = "waiting"
    """The step waits for its inputs: an earlier step, or a hand-off from another site."""

    NOT_STARTED = "not started"
    """The step's inputs are there; it has not started."""

    RUNNING = "running"
    """The step runs."""

    DONE = "done"
    """The step's marker is written."""

    @property
    def rank(self) -> int:
        """Progress of the state: -1 for `FAILED` and `DEAD`, then 0 (`WAITING`) to 3 (`DONE`)."""
        return _RANK[self]

    @property
    def is_bad(self) -> bool:
        """Whether the step needs an operator (`FAILED`, `DEAD`)."""
        return self.rank < 0

    @property
    def is_terminal(self) -> bool:
        """Whether the step will not change without an operator: `DONE`, or a bad state until rerun."""
        return self is StepState.DONE or self.is_bad

    @property
    def needs_attention(self) -> bool:
        """Whether the status and the report list the step below the grid: running, waiting, failed, dead."""
        return self in (StepState.RUNNING, StepState.WAITING) or self.is_bad


_BAD: frozenset[StepState] = frozenset({StepState.FAILED, StepState.DEAD})
_RANK: Mapping[StepState, int] = MappingProxyType(
    {
        **dict.fromkeys(_BAD, -1),
        **{state: rank for rank, state in enumerate(s for s in StepState if s not in _BAD)},
    }
)

STATE_OF_EVENT: Mapping[str, StepState] = MappingProxyType(
    {
        EventKind.STARTED: StepState.RUNNING,
        EventKind.WAITING: StepState.WAITING,
        EventKind.DONE: StepState.DONE,
        EventKind.FAILED: StepState.FAILED,
        EventKind.STUCK: StepState.FAILED,
    }
)
"""State of a step by the kind of its last event (a stuck transfer shows as failed).

Keys are `EventKind` members; plain strings read from an event log look up the same.
`StepState.DEAD` comes from no event: the status finds it from a running step's
heartbeat (`multisite.lock.stale_heartbeat`).
"""

LIVE_EVENT_KINDS: frozenset[str] = frozenset({EventKind.STARTED, EventKind.WAITING})
"""Kinds of a step's last event while its process runs: the status checks its heartbeat (dead or not)."""
