"""Campaign status: site by unit by stage, from the markers, the event log and the heartbeats.

Works from any site's view (its own markers and events) and, at the central
site, for the whole campaign: event logs that hand-offs carried there are read
from the central Butler. A step whose last event says it runs (or waits) is dead
when its heartbeat file names a process gone from this host or stopped beating
(`multisite.lock.stale_heartbeat`); the status then says how to resume its instance.
"""

from __future__ import annotations

__all__ = ("Cell", "campaign_events", "campaign_status", "format_status", "resume_command")

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from .config import Campaign
from .events import Event, read_events
from .flow import CENTRAL_CHUNK, HandoffPiece, stage_chunks, stage_dependencies
from .layout import Layout
from .lock import Owner, stale_heartbeat
from .markers import read_marker, read_marker_if_written
from .metadata import carried_events
from .states import LIVE_EVENT_KINDS, STATE_OF_EVENT, EventKind, StepState
from .targets import Targets

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """State of one step (a stage for a unit at a site, or a hand-off for a site).

    ``last_seen`` is the time of a dead step's last heartbeat.
    """

    site: str
    unit: str
    step: str
    state: StepState
    since: str = ""
    detail: str = ""
    log: str = ""
    last_seen: str = ""

    @property
    def last_seen_note(self) -> str:
        """`` (last seen <time>)`` for a dead step, else nothing."""
        return f" (last seen {self.last_seen})" if self.last_seen else ""


def resume_command(owner: Owner) -> str:
    """Return how to resume the instance of a dead step: unlock Snakemake, then run again, where it ran."""
    if owner.instance and owner.instance != "all":
        run = f"snakemake --profile {owner.instance}"
        unlock = f"{run} --unlock"
    else:
        unlock, run = "snakemake --unlock", "snakemake --rerun-incomplete"
    where = f" in {owner.directory}" if owner.directory else ""
    return f"resume its instance{where} with `{unlock}`, then `{run}` (with the first run's other options)"


def campaign_events(campaign: Campaign, from_butler: bool = True) -> list[Event]:
    """Every event this instance knows: its own logs, and those carried to the central repository."""
    events = read_events(sorted(campaign.layout.events.glob("*.jsonl")))
    if not from_butler:
        return events
    merged = {(e.time, e.instance, e.step, e.kind): e for e in events}
    for event in carried_events(campaign):
        merged.setdefault((event.time, event.instance, event.step, event.kind), event)
    return sorted(merged.values(), key=lambda e: (e.time, e.instance, e.step))


def _latest(events: Iterable[Event]) -> dict[tuple[str, str], Event]:
    """Return the last event of each (step, site), with the log of its run when it names none (waiting)."""
    latest: dict[tuple[str, str], Event] = {}
    for event in events:
        if event.kind in STATE_OF_EVENT:
            key = (event.step, event.site)
            earlier = latest.get(key)
            if "log" not in event.details and earlier is not None and "log" in earlier.details:
                event = replace(event, details={**event.details, "log": earlier.details["log"]})
            latest[key] = event
    return latest


def _carried_done(layout: Layout, latest: dict[tuple[str, str], Event]) -> dict[tuple[str, str], Event]:
    """Drop the done events that say nothing without their step's marker.

    A done event stands for its marker when another site's instance recorded it (its
    marker is there, its event carried here by a hand-off) after the last move made
    here that changed its chunk (that instance retires the chunk and runs it again).
    This work directory's own steps are done by their markers only.
    """
    own = {path.stem for path in layout.events.glob("*.jsonl")}
    moves = read_marker_if_written(layout.placement_marker).get("moves", [])
    remade = {Layout.chunk_step(*chunk): move["at"] for move in moves for chunk in move.get("remade", [])}
    return {
        (step, site): event
        for (step, site), event in latest.items()
        if event.kind != EventKind.DONE or (event.instance not in own and event.time > remade.get(step, ""))
    }


def _state(layout: Layout, marker: Path, step: str, site: str, latest: dict) -> Cell | None:
    """State from the marker (done), or the last event (running, failed, waiting) and the heartbeat (dead).

    Another site instance's step is done by its last event, carried here by a hand-off.
    """
    if marker.exists():
        content = read_marker(marker)
        return Cell(site, "", step, StepState.DONE, content.get("finished", ""), content.get("backend", ""))
    event = latest.get((step, site))
    if event is None:
        return None
    if event.kind == EventKind.DONE:  # another instance's step: `_carried_done` kept only those
        return Cell(site, "", step, StepState.DONE, event.time, f"at {event.instance}'s instance")
    state = STATE_OF_EVENT[event.kind]
    log = event.details.get("log", "")
    if event.kind in LIVE_EVENT_KINDS and (dead := stale_heartbeat(layout.heartbeat(event.instance, step))):
        detail = f"{dead.reason}; {resume_command(dead.owner)}"
        return Cell(site, "", step, StepState.DEAD, event.time, detail, log, dead.last_seen)
    detail = _last_line(log) if state == StepState.RUNNING else event.message
    if event.kind == EventKind.STUCK:
        detail = f"stuck transfer: {detail}"
    return Cell(site, "", step, state, event.time, detail, log)


def _last_line(log: str) -> str:
    """Return the live state of a running step: its last log line (BPS submission, Rucio progress)."""
    path = Path(log)
    if not log or not path.exists():
        return ""
    with path.open("rb") as stream:
        stream.seek(max(0, path.stat().st_size - 4096))
        lines = stream.read().decode(errors="replace").strip().splitlines()
    return lines[-1][-300:] if lines else ""


def campaign_status(
    campaign: Campaign, events: list[Event] | None = None, site: str | None = None
) -> list[Cell]:
    """Return the state of every stage (per unit) and hand-off piece (per site; its unit is its label).

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    events : `list` [`Event`], optional
        Events to use; read with `campaign_events` if not given.
    site : `str`, optional
        Restrict to one site's view.
    """
    events = campaign_events(campaign) if events is None else events
    latest = _carried_done(campaign.layout, _latest(events))
    layout = campaign.layout
    done_at: dict[str, str] = {}
    cells: list[Cell] = []
    targets = Targets(campaign, layout)
    for piece in (piece for of_site in targets.pieces.values() for piece in of_site):
        handoff, far_end = piece.handoff, piece.site
        step = _step(piece)
        marker = layout.piece_marker(piece)
        sent = layout.piece_marker(piece, sent=True)
        # A site instance knows a hand-off it sent to another instance by its "sent" marker.
        known = marker if marker.exists() or not sent.exists() else sent
        cell = _state(layout, known, step, far_end, latest)
        source = far_end if handoff.to_central else campaign.central.name
        if cell is None:
            cell = _handoff_waiting(targets, piece, source)
        cells.append(replace(cell, site=far_end, unit=piece.label, step=step))
        if cell.state == StepState.DONE:
            done_at[step] = cell.since
    for stage in campaign.stages:
        _, incoming = stage_dependencies(campaign, stage)
        for runner in campaign.stage_sites(stage):
            for chunk, units in stage_chunks(campaign, runner.name, stage).items():
                step = Layout.chunk_step(runner.name, stage.name, chunk)
                marker = layout.chunk_marker(runner.name, stage.name, chunk)
                cell = _state(layout, marker, step, runner.name, latest)
                if cell is None:
                    sites = [s.name for s in campaign.processing_sites] if stage.is_central else [runner.name]
                    awaited = [
                        p
                        for h in incoming
                        for s in sites
                        for p in targets.awaited_pieces(h, s, stage.name, chunk)
                    ]
                    cell = _waiting(campaign, runner.name, awaited, done_at)
                for unit in [CENTRAL_CHUNK] if stage.is_central else units:
                    cells.append(replace(cell, site=runner.name, unit=unit, step=stage.name))
    if site is not None:
        # A site's view: its own steps, and the central stages it depends on.
        cells = [c for c in cells if c.site == site or c.unit == CENTRAL_CHUNK]
    return cells


def _step(piece: HandoffPiece) -> str:
    return Layout.handoff_step(piece.handoff.name, piece.site, piece.name)


def _handoff_waiting(targets: Targets, piece: HandoffPiece, source: str) -> Cell:
    """Return the state of a hand-off piece not yet started: waiting for its producing stages, or not."""
    site = piece.site
    pending = [what for what, marker in targets.producers(piece).items() if not marker.exists()]
    if pending:
        return Cell(
            site, "", "", StepState.WAITING, detail=f"from {source}: waiting for {', '.join(pending)}"
        )
    return Cell(site, "", "", StepState.NOT_STARTED, detail=f"from {source}")


def _waiting(campaign: Campaign, site: str, awaited: list[HandoffPiece], done_at: dict[str, str]) -> Cell:
    """Return the state of a chunk without marker or event: waiting for hand-off pieces, or not started."""
    missing = [p for p in awaited if _step(p) not in done_at]
    if not missing:
        return Cell(site, "", "", StepState.NOT_STARTED)
    arrived = [done_at[_step(p)] for p in awaited if p not in missing]
    names = ", ".join(
        f"{p.label} from {p.site if p.handoff.to_central else campaign.central.name}" for p in missing[:4]
    )
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    return Cell(
        site, "", "", StepState.WAITING, min(arrived) if arrived else "", f"waiting for {names}{more}"
    )


def format_status(cells: list[Cell], campaign: Campaign) -> str:
    """Format the status as a grid (site and unit by stage), then what runs, waits or failed."""
    stages = [s.name for s in campaign.stages]
    central = {c.step: c.state for c in cells if c.unit == CENTRAL_CHUNK}
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for cell in cells:
        if cell.step in stages and cell.unit != CENTRAL_CHUNK:
            rows.setdefault((cell.site, cell.unit), dict(central))[cell.step] = cell.state
    width = max([len(s) for s in stages] + [11])
    lines = [f"{'site':8s} {'unit':10s} " + " ".join(f"{s:{width}s}" for s in stages)]
    for (site, unit), states in rows.items():
        lines.append(f"{site:8s} {unit:10s} " + " ".join(f"{states.get(s, ''):{width}s}" for s in stages))
    handoff_cells = [c for c in cells if Layout.is_handoff_step(c.step)]
    lines += ["", "hand-offs: " + ", ".join(f"{c.unit}={c.state}" for c in handoff_cells)]
    for cell in cells:
        if cell.state.needs_attention:
            what = cell.step if Layout.is_handoff_step(cell.step) else f"{cell.step} {cell.unit}"
            since = f" since {cell.since}" if cell.since else ""
            log = f" (log: {cell.log})" if cell.log else ""
            state = f"{cell.state.upper()}{cell.last_seen_note}"
            lines.append(f"  {state}: {what} at {cell.site}{since}: {cell.detail}{log}")
    return "\n".join(lines)
