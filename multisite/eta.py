"""Estimated completion of a running campaign, from the pace measured in its event log.

The work is the status grid's steps (`multisite.status.Cell`: a stage for a unit
at a site, a hand-off for a site): done and total come from the grid. The pace
of a site is the number of its grid steps finished over a recent window (24 h
by default, shortened to the time since the site's first event): each ``done``
event of a stage chunk finishes the grid steps of its units (the chunk marker's
``chunk_units``, carried in the event), each ``done`` event of a hand-off its
one step. A site's finish is now + remaining steps / pace; the campaign's is
the latest site's.

It is an extrapolation, good for "days or weeks?": it assumes each site keeps
its recent pace, counts every step alike (a step1 chunk and a hand-off), and
ignores the campaign's barriers (a central stage waits for every site's
fan-in). With fewer than two finished steps in the window there is no pace to
measure, and the estimate says so. The forecast (``multisite forecast``)
simulates the campaign instead.
"""

from __future__ import annotations

__all__ = ("CAMPAIGN", "FINISHED", "Completion", "Estimate", "estimate_completion", "format_completion")

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .events import Event
from .layout import Layout
from .states import EventKind, StepState
from .status import Cell

CAMPAIGN = "campaign"
"""The `Estimate.site` of the whole campaign's estimate."""

FINISHED = "finished"
"""The `Estimate.note` of a site, or the campaign, whose every step is done."""

_CHUNK_RULE = "run_stage"


@dataclass(frozen=True)
class Estimate:
    """Progress and estimated finish of one site, or of the whole campaign.

    Attributes
    ----------
    site : `str`
        The site, or `CAMPAIGN`.
    done, total : `int`
        Grid steps done, and in all.
    failed : `int`
        Grid steps failed or dead: they need an operator before the site can finish.
    finished_in_window : `int`
        Steps (chunks, hand-offs) whose ``done`` event falls in the window.
    rate_per_hour : `float` or `None`
        Grid steps finished per hour over the window; `None` without enough data.
    finish : `datetime.datetime` or `None`
        Estimated finish (UTC); for a site that is done, when its last step
        finished (`None` if no event says); `None` without an estimate.
    note : `str`
        Why there is no estimate, or what to keep in mind about it.
    """

    site: str
    done: int
    total: int
    failed: int = 0
    finished_in_window: int = 0
    rate_per_hour: float | None = None
    finish: datetime | None = None
    note: str = ""

    @property
    def remaining(self) -> int:
        """Grid steps not done."""
        return self.total - self.done

    @property
    def is_done(self) -> bool:
        """Whether every step is done."""
        return self.done == self.total


@dataclass(frozen=True)
class Completion:
    """Estimated completion of every site and of the campaign, at one moment.

    Attributes
    ----------
    sites : `tuple` [`Estimate`, ...]
        One estimate per site, in the grid's order.
    campaign : `Estimate`
        The whole campaign: the sums, and the latest site's finish.
    now : `datetime.datetime`
        When it was estimated.
    window : `datetime.timedelta`
        How far back finished steps were counted.
    """

    sites: tuple[Estimate, ...]
    campaign: Estimate
    now: datetime
    window: timedelta


def _time(text: str) -> datetime | None:
    """Parse an ISO time (naive times are UTC); `None` for an empty or unreadable one."""
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class _SiteGrid:
    """A site's grid steps, indexed to find what a ``done`` event finished."""

    def __init__(self, cells: Sequence[Cell]):
        self.cells = cells
        self.handoffs = {c.step for c in cells if Layout.is_handoff_step(c.step)}
        self.units: dict[str, set[str]] = defaultdict(set)
        for cell in cells:
            if not Layout.is_handoff_step(cell.step):
                self.units[cell.step].add(cell.unit)

    def finished_by(self, event: Event) -> int:
        """Return how many grid steps a ``done`` event finished (0 for a step the grid does not show)."""
        if Layout.is_handoff_step(event.step):
            return int(event.step in self.handoffs)
        words = event.step.split(" ")
        if len(words) != 4 or words[0] != _CHUNK_RULE or Layout.chunk_step(*words[1:]) != event.step:
            return 0  # not a stage chunk: repositories, placement, a stage gathering its chunks...
        stage, chunk = words[2:]
        marker = event.details.get("marker") or {}
        # A chunk's units are in its marker; a chunk named after its unit (or the central one) is that unit.
        units = set(marker.get("chunk_units") or [chunk])
        return len(units & self.units.get(stage, set()))

    def estimate(
        self,
        site: str,
        done_events: Sequence[Event],
        start: datetime | None,
        now: datetime,
        min_finished: int,
    ) -> Estimate:
        """Estimate the site's finish from the ``done`` events of its steps since ``start``."""
        cells = self.cells
        done = sum(1 for c in cells if c.state == StepState.DONE)
        failed = sum(1 for c in cells if c.state.is_bad)
        total = len(cells)
        in_window = [e for e in done_events if start is not None and start <= _time(e.time) <= now]
        counts = [n for n in map(self.finished_by, in_window) if n]
        finished, steps = sum(counts), len(counts)
        if done == total:
            times = [t for t in (_time(c.since) for c in cells) if t is not None]
            times += [_time(e.time) for e in done_events]
            return Estimate(site, done, total, failed, steps, None, max(times, default=None), FINISHED)
        hours = (now - start).total_seconds() / 3600.0 if start is not None else 0.0
        if steps < min_finished or finished == 0 or hours <= 0:
            said = f"{steps} step{'s' if steps != 1 else ''}"
            note = f"not enough data yet: {said} finished ({min_finished} needed)"
            return Estimate(site, done, total, failed, steps, note=note)
        rate = finished / hours
        note = f"{failed} failed: rerun them first" if failed else ""
        finish = now + timedelta(hours=(total - done) / rate)
        return Estimate(site, done, total, failed, steps, rate, finish, note)


def estimate_completion(
    cells: Iterable[Cell],
    events: Iterable[Event],
    now: datetime,
    *,
    window: timedelta = timedelta(hours=24),
    min_finished: int = 2,
) -> Completion:
    """Estimate when each site and the campaign will finish, from the pace in the event log.

    Parameters
    ----------
    cells : `~collections.abc.Iterable` [`~multisite.status.Cell`]
        The status grid (`multisite.status.campaign_status`): what is done, and the total.
    events : `~collections.abc.Iterable` [`~multisite.events.Event`]
        The campaign's events (`multisite.status.campaign_events`).
    now : `datetime.datetime`
        The present (a naive time is UTC).
    window : `datetime.timedelta`
        How far back finished steps count; a site's window starts no earlier
        than its first event, so a young campaign is not measured over time it
        did not run.
    min_finished : `int`
        Finished steps (chunks, hand-offs) in the window needed for an estimate.

    Returns
    -------
    completion : `Completion`
        Per site: done/total, steps per hour, estimated finish (UTC) or why
        there is none; and the same for the campaign, whose finish is the
        latest site's (none until every unfinished site has one).
    """
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    cells = list(cells)
    by_site: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        by_site[cell.site].append(cell)
    first: dict[str, datetime] = {}
    last_done: dict[tuple[str, str], Event] = {}
    for event in events:
        moment = _time(event.time)
        if moment is None or moment > now:
            continue
        first[event.site] = min(first.get(event.site, moment), moment)
        if event.kind == EventKind.DONE:
            # A step finished twice (a forced rerun) counts once, at its last finish.
            last_done[(event.step, event.site)] = event
    done_events: dict[str, list[Event]] = defaultdict(list)
    for (_, site), event in last_done.items():
        done_events[site].append(event)
    estimates = []
    for site, mine in by_site.items():
        start = max(now - window, first[site]) if site in first else None
        estimates.append(_SiteGrid(mine).estimate(site, done_events[site], start, now, min_finished))
    return Completion(tuple(estimates), _campaign_estimate(estimates), now, window)


def _campaign_estimate(sites: Sequence[Estimate]) -> Estimate:
    """Sum the sites' estimates: the campaign finishes with its latest site."""
    done, total = sum(e.done for e in sites), sum(e.total for e in sites)
    failed = sum(e.failed for e in sites)
    steps = sum(e.finished_in_window for e in sites)
    rates = [e.rate_per_hour for e in sites if e.rate_per_hour is not None]
    rate = sum(rates) if rates else None
    finishes = [e.finish for e in sites if e.finish is not None]
    if done == total:
        return Estimate(CAMPAIGN, done, total, failed, steps, rate, max(finishes, default=None), FINISHED)
    if missing := [e.site for e in sites if not e.is_done and e.rate_per_hour is None]:
        return Estimate(
            CAMPAIGN, done, total, failed, steps, rate, None, f"no estimate yet for {', '.join(missing)}"
        )
    note = "when the last site finishes; central stages' waits not modelled"
    return Estimate(CAMPAIGN, done, total, failed, steps, rate, max(finishes), note)


def format_completion(completion: Completion, *, campaign: bool = True) -> str:
    """Format the estimate as lines for ``multisite status``: one per site, then the campaign.

    Parameters
    ----------
    completion : `Completion`
        The estimate.
    campaign : `bool`
        Whether to add the campaign's line (not for one site's view, which
        does not see the other sites' steps).
    """
    hours = completion.window.total_seconds() / 3600.0
    lines = [f"estimated completion (pace of the steps finished in the last {hours:g} h):"]
    for estimate in (*completion.sites, *([completion.campaign] if campaign else [])):
        rate = f"{estimate.rate_per_hour:.3g} steps/h" if estimate.rate_per_hour is not None else "-"
        finish = estimate.finish.isoformat(timespec="minutes") if estimate.finish else "-"
        note = f"  ({estimate.note})" if estimate.note else ""
        done = f"{estimate.done}/{estimate.total}"
        lines.append(f"  {estimate.site:8s} {done:>13s} {rate:>15s}  finish {finish}{note}")
    return "\n".join(lines)
