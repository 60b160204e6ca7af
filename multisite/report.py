"""A static HTML campaign report: one file a person opens in a browser, no server.

It shows the status grid, progress per site over time, data moved per hand-off,
stage durations and the QA results. Plots are inline SVG, drawn here, so the
report needs nothing but a browser.
"""

from __future__ import annotations

__all__ = ("render_report",)

import html
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from .config import Campaign
from .events import Event
from .flow import CENTRAL_CHUNK, handoffs, stage_chunks
from .markers import read_marker
from .states import EventKind, StepState
from .status import campaign_events, campaign_status

COLOURS = {
    StepState.DONE: "#2e7d32",
    StepState.RUNNING: "#1565c0",
    StepState.WAITING: "#ef6c00",
    StepState.FAILED: "#c62828",
    StepState.DEAD: "#4a148c",
    StepState.NOT_STARTED: "#9e9e9e",
}
PALETTE = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f"]

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
    for index, site in enumerate(s for s in sites if s in series):
        colour = PALETTE[index % len(PALETTE)]
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


def render_report(campaign: Campaign, path: str | Path) -> Path:
    """Write the campaign report as one HTML file.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    path : `str` or `pathlib.Path`
        The HTML file to write.

    Returns
    -------
    path : `pathlib.Path`
        The file written.
    """
    events = campaign_events(campaign)
    cells = campaign_status(campaign, events)
    layout = campaign.layout
    stages = [s.name for s in campaign.stages]
    counts = pd.Series([c.state for c in cells]).value_counts().to_dict()
    body = [
        f"<h1>Campaign {_e(campaign.name)}</h1>",
        f"<p>Report of {datetime.now(UTC).isoformat(timespec='seconds')}; central site "
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

    body.append("<h2>Progress per site</h2>")
    body.append(_progress_svg(events, list(campaign.sites)))

    body.append(
        "<h2>Data moved per hand-off</h2><table id='handoffs'><tr><th>hand-off</th><th>site</th>"
        "<th>from</th><th>to</th><th>datasets</th><th>bytes</th><th>duration (s)</th><th>backend</th></tr>"
    )
    for handoff in handoffs(campaign):
        for site in campaign.processing_sites:
            marker = layout.handoff_marker(handoff.name, site.name)
            if marker.exists():
                m = read_marker(marker)
                values = [
                    handoff.name,
                    site.name,
                    m["source"],
                    m["destination"],
                    sum(m["datasets"].values()),
                    f"{m.get('bytes', 0):,}",
                    f"{m['duration_s']:.1f}",
                    m["backend"],
                ]
            else:
                values = [handoff.name, site.name, "not done", "", "", "", "", ""]
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
