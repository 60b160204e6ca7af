"""Campaign status: site by unit by stage, from the markers and the event log.

Works from any site's view (its own markers and events) and, at the central
site, for the whole campaign: event logs that hand-offs carried there are read
from the central Butler.
"""

from __future__ import annotations

__all__ = ("Cell", "campaign_events", "campaign_status", "format_status")

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .config import Campaign
from .events import Event, read_events
from .flow import CENTRAL_CHUNK, handoffs, stage_chunks, stage_dependencies
from .markers import read_marker

_LOG = logging.getLogger(__name__)

DONE, RUNNING, WAITING, FAILED, NOT_STARTED = "done", "running", "waiting", "failed", "not started"


@dataclass(frozen=True)
class Cell:
    """State of one step (a stage for a unit at a site, or a hand-off for a site)."""

    site: str
    unit: str
    step: str
    state: str
    since: str = ""
    detail: str = ""
    log: str = ""


def campaign_events(campaign: Campaign, from_butler: bool = True) -> list[Event]:
    """Every event this instance knows: its own logs, and those carried to the central repository."""
    events = read_events(sorted(campaign.events.glob("*.jsonl")))
    if not from_butler:
        return events
    from .butler_utils import open_butler
    from .transfer import EVENTS_DATASET_TYPE

    repo = campaign.central.repo
    if "://" not in repo and not (Path(repo) / "butler.yaml").exists():
        return events
    butler = open_butler(repo)
    if not butler.registry.queryDatasetTypes(EVENTS_DATASET_TYPE):
        return events
    carried = butler.query_datasets(
        EVENTS_DATASET_TYPE,
        collections=f"{campaign.root_collection}/*/events/*",
        find_first=False,
        explain=False,
    )
    merged = {(e.time, e.instance, e.step, e.kind): e for e in events}
    for ref in carried:
        for data in butler.get(ref)["events"]:
            event = Event(**data)
            merged.setdefault((event.time, event.instance, event.step, event.kind), event)
    return sorted(merged.values(), key=lambda e: (e.time, e.instance, e.step))


def _latest(events: Iterable[Event]) -> dict[tuple[str, str], Event]:
    latest: dict[tuple[str, str], Event] = {}
    for event in events:
        if event.kind in ("started", "done", "failed", "waiting", "stuck"):
            latest[(event.step, event.site)] = event
    return latest


def _state(marker: Path, step: str, site: str, latest: dict) -> Cell | None:
    """State from the marker (done) or the last event (running, failed, waiting)."""
    if marker.exists():
        content = read_marker(marker)
        return Cell(site, "", step, DONE, content.get("finished", ""), content.get("backend", ""))
    event = latest.get((step, site))
    if event is None or event.kind == "done":
        return None
    state = {"started": RUNNING, "failed": FAILED, "stuck": FAILED, "waiting": WAITING}[event.kind]
    log = event.details.get("log", "")
    detail = _last_line(log) if state == RUNNING else event.message
    if event.kind == "stuck":
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
    """Return the state of every stage (per unit) and hand-off (per site).

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
    latest = _latest(events)
    markers = campaign.markers
    done_at: dict[str, str] = {}
    cells: list[Cell] = []
    for handoff in handoffs(campaign):
        for processing in campaign.processing_sites:
            step = f"handoff {handoff.name} {processing.name}"
            marker = markers / "handoff" / handoff.name / f"{processing.name}.json"
            sent = markers / "sent" / handoff.name / f"{processing.name}.json"
            # A site instance knows a hand-off it sent to another instance by its "sent" marker.
            cell = _state(
                marker if marker.exists() or not sent.exists() else sent, step, processing.name, latest
            )
            source = processing.name if handoff.to_central else campaign.central.name
            if cell is None:
                cell = _handoff_waiting(campaign, handoff, processing.name, source, markers)
            cells.append(
                Cell(processing.name, handoff.name, step, cell.state, cell.since, cell.detail, cell.log)
            )
            if cell.state == DONE:
                done_at[step] = cell.since
    for stage in campaign.stages:
        earlier, incoming = stage_dependencies(campaign, stage)
        for runner in campaign.stage_sites(stage):
            for chunk, units in stage_chunks(campaign, runner.name, stage).items():
                step = f"run_stage {runner.name} {stage.name} {chunk}"
                marker = markers / "stage" / runner.name / stage.name / f"{chunk}.json"
                cell = _state(marker, step, runner.name, latest)
                if cell is None:
                    cell = _waiting(campaign, stage.is_central, runner.name, incoming, done_at)
                for unit in [CENTRAL_CHUNK] if stage.is_central else units:
                    cells.append(
                        Cell(runner.name, unit, stage.name, cell.state, cell.since, cell.detail, cell.log)
                    )
    if site is not None:
        # A site's view: its own steps, and the central stages it depends on.
        cells = [c for c in cells if c.site == site or c.unit == CENTRAL_CHUNK]
    return cells


def _handoff_waiting(campaign: Campaign, handoff, site: str, source: str, markers: Path) -> Cell:
    """Return the state of a hand-off not yet started: waiting for its producing stages, or not started."""
    pending = []
    for name in handoff.producers:
        runner = campaign.central.name if campaign.stage(name).is_central else site
        if not (markers / "stage" / runner / f"{name}.json").exists():
            pending.append(f"{name} at {runner}")
    if pending:
        return Cell(site, "", "", WAITING, detail=f"from {source}: waiting for {', '.join(pending)}")
    return Cell(site, "", "", NOT_STARTED, detail=f"from {source}")


def _waiting(campaign: Campaign, central: bool, site: str, incoming, done_at: dict[str, str]) -> Cell:
    """Return the state of a stage without marker or event: waiting for a hand-off, or not started."""
    sites = [s.name for s in campaign.processing_sites] if central else [site]
    expected = [(h, s) for h in incoming for s in sites]
    missing = [(h, s) for h, s in expected if f"handoff {h.name} {s}" not in done_at]
    if not missing:
        return Cell(site, "", "", NOT_STARTED)
    arrived = [done_at[f"handoff {h.name} {s}"] for h, s in expected if (h, s) not in missing]
    names = ", ".join(f"{h.name} from {s if h.to_central else campaign.central.name}" for h, s in missing[:4])
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    return Cell(site, "", "", WAITING, min(arrived) if arrived else "", f"waiting for {names}{more}")


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
    handoff_cells = [c for c in cells if c.step.startswith("handoff ")]
    lines += ["", "hand-offs: " + ", ".join(f"{c.unit}/{c.site}={c.state}" for c in handoff_cells)]
    for cell in cells:
        if cell.state in (RUNNING, WAITING, FAILED):
            what = cell.step if cell.step.startswith("handoff") else f"{cell.step} {cell.unit}"
            since = f" since {cell.since}" if cell.since else ""
            log = f" (log: {cell.log})" if cell.log else ""
            lines.append(f"  {cell.state.upper()}: {what} at {cell.site}{since}: {cell.detail}{log}")
    return "\n".join(lines)
