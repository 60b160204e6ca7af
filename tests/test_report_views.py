"""The report's placement sky map and estimated completion, on synthetic inputs (seconds, no campaign run)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from lsst.daf.butler import Butler, Config
from matplotlib.colors import to_hex

from multisite.cli import main
from multisite.config import load_campaign
from multisite.demo.survey import SurveySpec, insert_skymap
from multisite.demo.synthetic import make_ring_tracts
from multisite.eta import CAMPAIGN, FINISHED, estimate_completion
from multisite.events import Event
from multisite.geometry import TractCentres
from multisite.layout import Layout
from multisite.markers import write_marker
from multisite.report import render_report
from multisite.skymap import (
    PositionsUnavailable,
    placement_figure,
    placement_svg,
    positions_from_tracts,
    site_colours,
    unit_positions,
)
from multisite.states import EventKind, StepState
from multisite.status import Cell

from .conftest import REPO, demo_config

SITES = ["usdf", "in2p3", "lancs", "ral"]
#: Largest SVG of DR1's 8,000-tract sky map accepted; measured 51,568 bytes (cells in one embedded PNG).
DR1_SVG_LIMIT = 80_000
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _map_cells(figure) -> dict[str, tuple[str, np.ndarray]]:
    """Return each site's fill and its cells' corners in pixels ``(n, 4, 2)``, from the map's collections.

    Pixels as matplotlib counts them: x to the right, y up.
    """
    (sky,) = figure.axes
    cells = {}
    for collection in sky.collections:
        gid = collection.get_gid() or ""
        if gid.startswith("units-"):
            corners = np.array([path.vertices[:4] for path in collection.get_paths()])
            pixels = collection.get_transform().transform(corners.reshape(-1, 2)).reshape(-1, 4, 2)
            cells[gid.removeprefix("units-")] = (to_hex(collection.get_facecolor()[0]), pixels)
    return cells


def _centres(figure) -> dict[str, np.ndarray]:
    """Return each site's cells' centres in pixels ``(n, 2)``."""
    return {site: pixels.mean(axis=1) for site, (_, pixels) in _map_cells(figure).items()}


def _legend(figure) -> list[str]:
    (legend,) = figure.legends
    return [text.get_text() for text in legend.get_texts()]


def _positions(rows: list[tuple[str, float, float, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["unit", "ra", "dec", "site"])


# ------------------------------------------------------------------------------------------- sky map


def test_sky_map_draws_one_mark_per_unit_in_its_sites_colour():
    rows = [(f"u{i}", 30.0 + i, -20.0 + (i % 3), SITES[i % 3]) for i in range(11)]
    rows.append(("stray", 45.0, -18.0, "elsewhere"))  # a site the campaign does not list
    figure = placement_figure(_positions(rows), SITES)
    cells = _map_cells(figure)
    colours = site_colours(SITES)
    assert set(cells) == {"usdf", "in2p3", "lancs", "elsewhere"}  # ral has no unit: no collection
    for site, (fill, pixels) in cells.items():
        assert len(pixels) == sum(1 for row in rows if row[3] == site), site
        assert fill == colours.get(site, "#9e9e9e")
    assert len({fill for fill, _ in cells.values()}) == 4
    # The legend gives every site (listed or not) with its unit count, in the campaign's order.
    assert _legend(figure) == ["usdf: 4", "in2p3: 4", "lancs: 3", "ral: 0", "elsewhere: 1"]
    # Few units: the SVG has one path per unit in its site's group, the legend and the names as text.
    svg = placement_svg(_positions(rows), SITES)
    assert svg.startswith('<svg id="placement-map"') and "<?xml" not in svg
    for site, (fill, pixels) in cells.items():
        group = re.search(rf'<g id="units-{site}">(.*?)</g>', svg, re.S).group(1)
        assert group.count("<path") == len(pixels) and f"fill: {fill}" in group, site
    assert all(f">{entry}</text>" in svg for entry in _legend(figure))
    assert all(f">{unit}</text>" in svg for unit, *_ in rows)  # few, big cells: named on the map


def test_sky_map_has_ra_increasing_to_the_left_and_north_up():
    rows = [("east", 20.0, 0.0, "usdf"), ("west", 10.0, 0.0, "in2p3"), ("north", 15.0, 8.0, "lancs")]
    centres = _centres(placement_figure(_positions(rows), SITES))
    (east,), (west,), (north,) = (centres[s] for s in ("usdf", "in2p3", "lancs"))
    assert east[0] < west[0]  # larger RA drawn to the left
    assert north[1] > east[1]  # larger Dec drawn higher (matplotlib's y goes up)
    # Across RA 0: RA 1 is east of RA 359, so it is drawn to its left too.
    rows = [("after", 1.0, -30.0, "usdf"), ("before", 359.0, -30.0, "in2p3")]
    centres = _centres(placement_figure(_positions(rows), SITES))
    assert centres["usdf"][0][0] < centres["in2p3"][0][0]


def test_sky_map_of_the_whole_sky_keeps_its_marks_small():
    # Two full rings: units sit on the map's left and right edges (RA centre +- 180), and those at
    # dec 60 are wider in RA than their distance to the edge.
    rows = [
        (f"u{r}_{i}", i * 3.0, dec, SITES[i % 4]) for r, dec in enumerate((0.0, 60.0)) for i in range(120)
    ]
    cells = _map_cells(placement_figure(_positions(rows), SITES))
    widths = np.concatenate([np.ptp(pixels[:, :, 0], axis=1) for _, pixels in cells.values()])
    assert len(widths) == 240 and widths.max() < 3 * np.median(widths), (widths.max(), np.median(widths))


def _dr1_units(n_tracts: int = 8_000) -> tuple[pd.DataFrame, TractCentres]:
    """Units of one tract each, sites in contiguous RA blocks of the DR1 shares, on a ring tessellation."""
    tracts = make_ring_tracts(n_tracts)
    order = np.argsort((tracts.ra - tracts.ra_min) % 360.0, kind="stable")
    bounds = np.cumsum([0.35, 0.40, 0.10, 0.15]) * n_tracts
    site = np.empty(n_tracts, dtype=object)
    site[order] = np.asarray(SITES, dtype=object)[np.searchsorted(bounds, np.arange(n_tracts), side="right")]
    units = pd.DataFrame(
        {"unit": [f"t{i}" for i in range(n_tracts)], "tract": np.arange(n_tracts), "patch": "", "site": site}
    )
    return units, TractCentres(tracts.ra, tracts.dec, tracts.ring.astype(np.int64), tracts.ra_min)


def test_dr1_sky_map_stays_small():
    units, tracts = _dr1_units()
    positions = positions_from_tracts(units, tracts)
    figure = placement_figure(positions, SITES)
    cells = _map_cells(figure)
    assert {site: len(pixels) for site, (_, pixels) in cells.items()} == {
        "usdf": 2_800,
        "in2p3": 3_200,
        "lancs": 800,
        "ral": 1_200,
    }
    assert _legend(figure) == ["usdf: 2,800", "in2p3: 3,200", "lancs: 800", "ral: 1,200"]
    # Tracts of about 1.45 degrees are drawn as cells of a few pixels: they tile, they do not vanish.
    widths = np.concatenate([np.ptp(pixels[:, :, 0], axis=1) for _, pixels in cells.values()])
    assert 2.0 < np.median(widths) < 8.0
    # Thousands of cells go into the SVG as one image; the grid and the legend stay text and lines.
    svg = placement_svg(positions, SITES)
    size = len(svg.encode())
    assert size < DR1_SVG_LIMIT, size
    assert svg.count("<image") == 1 and "<path" in svg and ">usdf: 2,800</text>" in svg


def test_positions_average_a_units_tracts():
    tracts = TractCentres(np.array([10.0, 12.0, 359.0, 1.0]), np.zeros(4), np.zeros(4, dtype=np.int64))
    units = pd.DataFrame(
        {"unit": ["a", "a", "b", "b", "c"], "tract": [0, 1, 2, 3, 9], "site": ["usdf"] * 2 + ["ral"] * 3}
    )
    positions = positions_from_tracts(units, tracts).set_index("unit")
    assert list(positions.index) == ["a", "b"]  # c's tract is not in the geometry
    assert positions.loc["a", "ra"] == pytest.approx(11.0)
    assert (positions.loc["b", "ra"] + 180.0) % 360.0 - 180.0 == pytest.approx(0.0, abs=1e-9)
    assert positions.loc["b", "site"] == "ral"


def _demo_skymap_repo(campaign) -> SurveySpec:
    """Create the central repository holding the demo skymap's tract and patches (no raws)."""
    spec = SurveySpec()
    Butler.makeRepo(campaign.central.repo, config=Config(str(REPO / "multisite" / "demo" / "repo_seed.yaml")))
    insert_skymap(Butler.from_config(campaign.central.repo, writeable=True), spec)
    return spec


def test_unit_positions_from_the_registered_skymap_or_why_not(tmp_path):
    campaign = load_campaign(demo_config(tmp_path))
    with pytest.raises(PositionsUnavailable, match=re.escape(campaign.central.repo)):
        unit_positions(campaign)
    spec = _demo_skymap_repo(campaign)
    positions = unit_positions(campaign).set_index("unit")
    assert "patch" in positions.attrs["source"]
    assert len(positions) == len(campaign.units) == 6
    for unit in campaign.units:
        ((_, patch),) = unit.cells
        ix, iy = patch % spec.patches_x, patch // spec.patches_x
        centre = (spec.ra0 + (ix + 0.5) * 0.1, spec.dec0 + (iy + 0.5) * 0.1)  # 100 px of 0.001 deg
        assert tuple(positions.loc[unit.name, ["ra", "dec"]]) == pytest.approx(centre, abs=1e-4)
        assert positions.loc[unit.name, "site"] == unit.site
    # A site instance reads its own repository, which does not exist here.
    ral = replace(campaign, instance="ral")
    with pytest.raises(PositionsUnavailable, match=re.escape(campaign.sites["ral"].repo)):
        unit_positions(ral)


# ------------------------------------------------------------------------------ estimated completion


def _cells(site: str, units: int, done: int, stage: str = "step1") -> list[Cell]:
    return [
        Cell(site, f"{site}{i}", stage, StepState.DONE if i < done else StepState.NOT_STARTED)
        for i in range(units)
    ]


def _done(site: str, chunk: str, at: datetime, units: list[str] | None = None, stage: str = "step1") -> Event:
    details = {"marker": {"chunk_units": units}} if units else {}
    return Event(
        EventKind.DONE, Layout.chunk_step(site, stage, chunk), site, "all", at.isoformat(), "", details
    )


def _started(site: str, at: datetime) -> Event:
    return Event(EventKind.STARTED, f"prepare_repo {site}", site, "all", at.isoformat())


def test_eta_from_known_rates():
    # usdf: started at T0, one unit done per hour for 4 h; 6 left at 1/h -> finishes 6 h after now.
    now = T0 + timedelta(hours=4)
    events = [_started("usdf", T0)] + [
        _done("usdf", f"usdf{i}", T0 + timedelta(hours=i + 1)) for i in range(4)
    ]
    # ral: a chunk of 3 units every 2 hours (its marker names them): 1.5 units/h; 2 chunks in 4 h.
    events += [_started("ral", T0)]
    events += [
        _done("ral", f"c000{k}", T0 + timedelta(hours=2 * (k + 1)), [f"ral{3 * k + i}" for i in range(3)])
        for k in range(2)
    ]
    # Not grid steps: they finish nothing the grid counts.
    events += [Event(EventKind.DONE, "step1_ral", "ral", "all", now.isoformat())]
    cells = (
        _cells("usdf", 10, 4)
        + _cells("ral", 9, 6)
        + [Cell("ral", "raws", "handoff raws ral", StepState.DONE)]
    )
    completion = estimate_completion(cells, events, now)
    usdf, ral = completion.sites
    assert (usdf.site, usdf.done, usdf.total, usdf.finished_in_window) == ("usdf", 4, 10, 4)
    assert usdf.rate_per_hour == pytest.approx(1.0)
    assert abs(usdf.finish - (now + timedelta(hours=6))) < timedelta(minutes=1)
    assert (ral.done, ral.total, ral.finished_in_window) == (7, 10, 2)
    assert ral.rate_per_hour == pytest.approx(1.5)
    assert abs(ral.finish - (now + timedelta(hours=2))) < timedelta(minutes=1)
    total = completion.campaign
    assert (total.site, total.done, total.total) == (CAMPAIGN, 11, 20)
    assert total.rate_per_hour == pytest.approx(2.5)
    assert total.finish == usdf.finish  # the latest site


def test_eta_measures_the_recent_window_only():
    # 20 units done on the first day, 2 in the last 24 h of a three-day-old campaign: 2 per 24 h.
    now = T0 + timedelta(days=3)
    events = [_started("usdf", T0)]
    events += [_done("usdf", f"usdf{i}", T0 + timedelta(minutes=30 * (i + 1))) for i in range(20)]
    events += [_done("usdf", f"usdf{20 + i}", now - timedelta(hours=10 * (i + 1))) for i in range(2)]
    estimate = estimate_completion(_cells("usdf", 34, 22), events, now).sites[0]
    assert estimate.rate_per_hour == pytest.approx(2 / 24)
    assert abs(estimate.finish - (now + timedelta(hours=12 * 24 / 2))) < timedelta(minutes=1)


def test_eta_says_when_there_is_not_enough_data():
    now = T0 + timedelta(hours=1)
    events = [_started("usdf", T0), _done("usdf", "usdf0", T0 + timedelta(minutes=30))]
    completion = estimate_completion(_cells("usdf", 5, 1) + _cells("ral", 3, 0), events, now)
    usdf, ral = completion.sites
    assert usdf.rate_per_hour is None and usdf.finish is None
    assert usdf.note == "not enough data yet: 1 step finished (2 needed)"
    assert ral.finish is None and "not enough data" in ral.note
    assert completion.campaign.finish is None
    assert completion.campaign.note == "no estimate yet for usdf, ral"


def test_eta_reports_done_when_everything_is_done():
    last = T0 + timedelta(hours=3)
    events = [
        _started("usdf", T0),
        _done("usdf", "usdf0", T0 + timedelta(hours=1)),
        _done("usdf", "usdf1", last),
    ]
    completion = estimate_completion(_cells("usdf", 2, 2), events, T0 + timedelta(days=5))
    (usdf,) = completion.sites
    assert usdf.is_done and usdf.note == FINISHED and usdf.finish == last
    assert completion.campaign.is_done and completion.campaign.note == FINISHED
    assert completion.campaign.finish == last


# ------------------------------------------------------------------------------------------ the report


def _running_demo(tmp_path):
    """Return the demo campaign with step1 done at every site, by its markers and event log (nothing ran)."""
    campaign = load_campaign(demo_config(tmp_path))
    layout = campaign.layout
    events = []
    for index, site in enumerate(campaign.processing_sites):
        events.append(_started(site.name, T0))
        arrived, finished = T0 + timedelta(minutes=5), T0 + timedelta(minutes=10 + index)
        handoff = {"source": campaign.central.name, "destination": site.name, "datasets": {"raw": 8}}
        handoff |= {"bytes": 1000, "duration_s": 1.0, "backend": "butler", "finished": arrived.isoformat()}
        write_marker(layout.handoff_marker("raws", site.name, "c0000"), handoff)
        raws = Layout.handoff_step("raws", site.name, "c0000")
        events.append(Event(EventKind.DONE, raws, site.name, "all", arrived.isoformat()))
        chunk = {"duration_s": 60.0, "finished": finished.isoformat()}
        write_marker(layout.chunk_marker(site.name, "step1", "c0000"), chunk)
        events.append(_done(site.name, "c0000", finished, [u.name for u in campaign.units_of(site.name)]))
    layout.events.mkdir(parents=True, exist_ok=True)
    layout.event_log("all").write_text("".join(json.dumps(asdict(e)) + "\n" for e in events))
    return campaign


def test_report_shows_the_estimate_and_the_sky_map(tmp_path):
    campaign = _running_demo(tmp_path)
    now = T0 + timedelta(minutes=20)
    # No repository yet: the report says why there is no map, and still has the estimate.
    text = render_report(campaign, tmp_path / "report.html", now=now).read_text()
    assert "<h2>Estimated completion</h2>" in text and "<table id='eta'>" in text
    for site in campaign.processing_sites:
        assert f"<tr data-site='{site.name}'>" in text
    # Two steps finished per site in 20 minutes: every site has an estimate, so the campaign too.
    (row,) = re.findall(r"<tr data-site='campaign'>.*?</tr>", text)
    assert re.search(r"<td class='finish'>2026-12-01 \d\d:\d\d</td>", row), row
    assert "<h2>Placement</h2>" in text
    assert "No sky map of the placement: no Butler repository at" in text and "placement-map" not in text
    assert ">done</td>" not in text.split("<table id='eta'>")[1].split("</table>")[0]

    # With the demo skymap registered at the central site: one cell per unit, in its site's colour.
    _demo_skymap_repo(campaign)
    text = render_report(campaign, tmp_path / "report.html", now=now).read_text()
    assert text.count('<svg id="placement-map"') == 1
    colours = site_colours(list(campaign.sites))
    for site in campaign.processing_sites:
        group = re.search(rf'<g id="units-{site.name}">(.*?)</g>', text, re.S).group(1)
        assert group.count("<path") == len(campaign.units_of(site.name)), site.name
        assert f"fill: {colours[site.name]}" in group
        assert f">{site.name}: {len(campaign.units_of(site.name))}</text>" in text
    assert "placement-source" in text and "tract and patch centres of skymap &#x27;demo&#x27;" in text
    assert all(f">{unit.name}</text>" in text for unit in campaign.units)  # few units: named on the map


def test_status_command_prints_the_estimate(tmp_path, capsys):
    campaign = _running_demo(tmp_path)
    assert main(["status", str(tmp_path / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "estimated completion" in out
    for site in campaign.processing_sites:
        assert re.search(rf"^  {site.name} +\d+/\d+ ", out, re.M), out
    assert re.search(r"^  campaign +\d+/\d+ ", out, re.M)
    # One site's view sees only its steps (and the central ones): no campaign line.
    assert main(["status", str(tmp_path / "config.yaml"), "--site", "ral"]) == 0
    out = capsys.readouterr().out.split("estimated completion")[1]
    assert re.search(r"^  ral +\d+/\d+ ", out, re.M) and "campaign" not in out
