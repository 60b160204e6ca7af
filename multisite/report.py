"""A static HTML campaign report: one file a person opens in a browser, no server.

It shows the status grid, the estimated completion (from the pace in the event
log, `multisite.eta`), the forecast's timeline (`multisite.forecast`, matplotlib),
the placement as a sky map (`multisite.skymap`, skyproj), progress per site over
time, data moved per hand-off, stage durations and the QA results. Every plot is
inline SVG, so the report needs nothing but a browser.
"""

from __future__ import annotations

__all__ = ("render_report",)

import html
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from .config import Campaign
from .eta import estimate_completion
from .events import Event
from .flow import CENTRAL_CHUNK, stage_chunks, workflow_pieces
from .forecast import FLOWS, ForecastError, forecast_campaign, format_gain, timeline_svg
from .geometry import TractGeometry
from .markers import read_marker
from .skymap import PositionsUnavailable, placement_svg, site_colours, unit_positions
from .states import EventKind, StepState
from .status import Cell, campaign_events, campaign_status

COLOURS = {
    StepState.DONE: "#2e7d32",
    StepState.RUNNING: "#1565c0",
    StepState.WAITING: "#ef6c00",
    StepState.FAILED: "#c62828",
    StepState.DEAD: "#4a148c",
    StepState.NOT_STARTED: "#9e9e9e",
}

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.state { color: white; font-weight: bold; }
.fail { color: #c62828; font-weight: bold; }
h2 { border-bottom: 1px solid #ccc; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _progress_svg(events: list[Event], sites: list[str], width: int = 640, height: int = 260) -> str:
    """Completed steps per site against time since the first event, as an SVG line chart."""
    done = [e for e in events if e.kind == EventKind.DONE]
    if not done:
        return "<p>No step has finished yet.</p>"
    start = min(_time(e.time) for e in events)
    end = max(_time(e.time) for e in done)
    span = max((end - start).total_seconds(), 1.0)
    series: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for event in done:
        points = series[event.site]
        points.append(((_time(event.time) - start).total_seconds(), len(points) + 1))
    top = max(len(points) for points in series.values())
    left, bottom = 50, height - 30

    def x(t: float) -> float:
        return left + (width - left - 120) * t / span

    def y(n: int) -> float:
        return bottom - (bottom - 20) * n / top

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="progress per site">',
        f'<line x1="{left}" y1="{bottom}" x2="{width - 120}" y2="{bottom}" stroke="#333"/>',
        f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="20" stroke="#333"/>',
        f'<text x="{left}" y="{height - 8}" font-size="12">0 s</text>',
        f'<text x="{left + 60}" y="{height - 8}" font-size="12">time since the campaign started</text>',
        f'<text x="{left + 6}" y="16" font-size="12">steps done</text>',
        f'<text x="{width - 160}" y="{height - 8}" font-size="12">{span:.0f} s</text>',
        f'<text x="5" y="24" font-size="12">{top}</text>',
        f'<text x="5" y="{bottom}" font-size="12">0</text>',
    ]
    colours = site_colours(sites)  # the same colour per site as in the sky map
    for index, site in enumerate(s for s in sites if s in series):
        colour = colours[site]
        path = [(x(0), y(0))]
        for t, n in series[site]:
            path += [(x(t), path[-1][1]), (x(t), y(n))]
        d = " ".join(f"{px:.1f},{py:.1f}" for px, py in path)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{d}"/>')
        parts.append(
            f'<text x="{width - 110}" y="{30 + 18 * index}" font-size="13" fill="{colour}">'
            f"{_e(site)}: {len(series[site])} steps</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _bars_svg(rows: list[tuple[str, float]], unit: str, width: int = 640) -> str:
    """Horizontal bar chart of labelled values."""
    if not rows:
        return "<p>Nothing yet.</p>"
    top = max(value for _, value in rows) or 1.0
    height = 22 * len(rows) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for index, (label, value) in enumerate(rows):
        y = 5 + 22 * index
        length = (width - 260) * value / top
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">{_e(label)}</text>')
        parts.append(f'<rect x="160" y="{y}" width="{length:.1f}" height="16" fill="#1565c0"/>')
        parts.append(f'<text x="{165 + length:.1f}" y="{y + 13}" font-size="12">{value:.1f} {unit}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _completion_section(cells: list[Cell], events: list[Event], now: datetime) -> list[str]:
    """Return the estimated completion section: per site and for the campaign, done/total, pace, finish."""
    completion = estimate_completion(cells, events, now)
    hours = completion.window.total_seconds() / 3600.0
    parts = [
        "<h2>Estimated completion</h2>",
        f"<p>From the pace of the steps finished in the last {hours:g} h (or since the site started): "
        "remaining steps / steps per hour. An extrapolation: every step counts alike, and central "
        "stages waiting for every site's fan-in are not modelled.</p>",
        "<table id='eta'><tr><th>site</th><th>steps done / total</th><th>steps per hour</th>"
        "<th>estimated finish (UTC)</th><th>note</th></tr>",
    ]
    for estimate in (*completion.sites, completion.campaign):
        rate = f"{estimate.rate_per_hour:.3g}" if estimate.rate_per_hour is not None else ""
        finish = estimate.finish.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if estimate.finish else ""
        name = f"<b>{_e(estimate.site)}</b>" if estimate is completion.campaign else _e(estimate.site)
        parts.append(
            f"<tr data-site='{_e(estimate.site)}'><td>{name}</td><td>{estimate.done} / {estimate.total}</td>"
            f"<td>{rate}</td><td class='finish'>{finish}</td><td class='note'>{_e(estimate.note)}</td></tr>"
        )
    parts.append("</table>")
    return parts


def _forecast_section(campaign: Campaign) -> list[str]:
    """Return the "Forecast" section: the timeline of both flows (a Gantt chart), or why there is none."""
    parts = ["<h2>Forecast</h2>"]
    try:
        forecasts = [forecast_campaign(campaign, flow) for flow in FLOWS]
    except ForecastError as err:
        return [*parts, f"<p id='forecast-missing'>No forecast: {_e(err)}</p>"]
    parts.append(f"<pre id='forecast-gain'>{_e(format_gain(*forecasts))}</pre>")
    return [*parts, timeline_svg(forecasts)]


def _placement_section(campaign: Campaign, tracts: TractGeometry | None) -> list[str]:
    """Return the placement section: the sky map of the units by site, or why there is none."""
    parts = ["<h2>Placement</h2>"]
    try:
        positions = unit_positions(campaign, tracts)
    except PositionsUnavailable as err:
        return [*parts, f"<p id='placement-missing'>No sky map of the placement: {_e(err)}.</p>"]
    missing = len(campaign.units) - len(positions)
    note = f"; {missing} of {len(campaign.units)} units have no position there" if missing else ""
    parts.append(
        f"<p id='placement-source'>Units placed at {_e(positions.attrs.get('source', ''))}{note}.</p>"
    )
    parts.append(placement_svg(positions, list(campaign.sites)))
    return parts


def render_report(
    campaign: Campaign,
    path: str | Path,
    *,
    tracts: TractGeometry | None = None,
    now: datetime | None = None,
) -> Path:
    """Write the campaign report as one HTML file.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    path : `str` or `pathlib.Path`
        The HTML file to write.
    tracts : `~multisite.geometry.TractGeometry`, optional
        Tract centres for the sky map; by default the skymap registered in the
        repository this instance reads (`multisite.skymap.unit_positions`).
    now : `datetime.datetime`, optional
        The report's time, for the estimated completion (default: now, UTC).

    Returns
    -------
    path : `pathlib.Path`
        The file written.
    """
    now = now or datetime.now(UTC)
    events = campaign_events(campaign)
    cells = campaign_status(campaign, events)
    layout = campaign.layout
    stages = [s.name for s in campaign.stages]
    counts = pd.Series([c.state for c in cells]).value_counts().to_dict()
    body = [
        f"<h1>Campaign {_e(campaign.name)}</h1>",
        f"<p>Report of {now.isoformat(timespec='seconds')}; central site "
        f"{_e(campaign.central.name)}; steps: "
        + ", ".join(f"{n} {_e(state)}" for state, n in sorted(counts.items()))
        + "</p>",
    ]

    body.append(
        "<h2>Status</h2><table id='status'><tr><th>site</th><th>unit</th>"
        + "".join(f"<th>{_e(s)}</th>" for s in stages)
        + "</tr>"
    )
    central = {c.step: c for c in cells if c.unit == CENTRAL_CHUNK}
    rows: dict[tuple[str, str], dict] = {}
    for cell in cells:
        if cell.step in stages and cell.unit != CENTRAL_CHUNK:
            rows.setdefault((cell.site, cell.unit), dict(central))[cell.step] = cell
    for (site, unit), by_stage in rows.items():
        body.append(f"<tr><td>{_e(site)}</td><td>{_e(unit)}</td>")
        for stage in stages:
            cell = by_stage.get(stage)
            state = cell.state if cell else ""
            title = _e(f"{cell.last_seen_note} {cell.detail} {cell.log}".strip()) if cell else ""
            body.append(
                f"<td class='state' style='background:{COLOURS.get(state, '#fff')}' "
                f"title='{title}'>{_e(state)}</td>"
            )
        body.append("</tr>")
    body.append("</table>")
    problems = [c for c in cells if c.state.needs_attention]
    if problems:
        body.append("<ul id='attention'>")
        for cell in problems:
            log = f" &mdash; log: <code>{_e(cell.log)}</code>" if cell.log else ""
            since = f" since {_e(cell.since)}" if cell.since else ""
            css = " class='fail'" if cell.state.is_bad else ""
            body.append(
                f"<li{css}>{_e(cell.state)}{_e(cell.last_seen_note)}: {_e(cell.step)} {_e(cell.unit)} "
                f"at {_e(cell.site)}{since}: {_e(cell.detail)}{log}</li>"
            )
        body.append("</ul>")

    body += _completion_section(cells, events, now)
    body += _forecast_section(campaign)
    body += _placement_section(campaign, tracts)

    body.append("<h2>Progress per site</h2>")
    body.append(_progress_svg(events, list(campaign.sites)))

    body.append(
        "<h2>Data moved per hand-off</h2><table id='handoffs'><tr><th>hand-off</th><th>site</th>"
        "<th>piece</th><th>from</th><th>to</th><th>datasets</th><th>bytes</th><th>duration (s)</th>"
        "<th>backend</th></tr>"
    )
    for piece in workflow_pieces(campaign):
        marker = layout.piece_marker(piece)
        values = [piece.handoff.name, piece.site, piece.name]
        if marker.exists():
            m = read_marker(marker)
            values += [
                m["source"],
                m["destination"],
                sum(m["datasets"].values()),
                f"{m.get('bytes', 0):,}",
                f"{m['duration_s']:.1f}",
                m["backend"],
            ]
        else:
            values += ["not done", "", "", "", "", ""]
        body.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in values) + "</tr>")
    body.append("</table>")

    durations = []
    for stage in campaign.stages:
        for site in campaign.stage_sites(stage):
            for chunk in stage_chunks(campaign, site.name, stage):
                chunk_marker = layout.chunk_marker(site.name, stage.name, chunk)
                if chunk_marker.exists():
                    duration = read_marker(chunk_marker)["duration_s"]
                    durations.append((f"{stage.name} {chunk} at {site.name}", duration))
    body.append("<h2>Stage durations</h2>")
    body.append(_bars_svg(durations, "s"))

    body.append("<h2>QA</h2>")
    qa_table = campaign.layout.qa_table
    if qa_table.exists():
        table = pd.read_csv(qa_table)
        summary = table.groupby(["check", "status"]).size().unstack(fill_value=0)
        body.append(summary.to_html(table_id="qa-summary"))
        failed = table[table["status"] == "fail"]
        if failed.empty:
            body.append("<p id='qa-verdict'>Every QA check passed.</p>")
        else:
            body.append(f"<p id='qa-verdict' class='fail'>{len(failed)} QA checks failed:</p>")
            body.append(failed.to_html(index=False, table_id="qa-failed"))
        science = table[table["check"] == "science"]
        if not science.empty:
            body.append(science.to_html(index=False, table_id="qa-science"))
    else:
        body.append("<p id='qa-verdict'>QA has not run yet.</p>")

    text = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Campaign {_e(campaign.name)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
