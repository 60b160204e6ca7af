"""The campaign forecast: hand-computed makespans, per-chunk against per-site flows, the CLI."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from multisite.cli import main
from multisite.config import load_campaign
from multisite.errors import CampaignConfigError
from multisite.forecast import (
    ForecastError,
    estimate_unit_work,
    forecast_campaign,
    stage_work_fractions,
    timeline_figure,
    timeline_svg,
)

from .conftest import REPO, demo_config

HOUR = 3600.0


def _config(directory: Path, units: dict[str, str], **changes) -> dict:
    """Return a campaign config: a central usdf, the sites of ``units`` (unit -> site), three stages."""
    sites = {"usdf": {"role": "central", "repo": str(directory / "usdf"), "bps": {}, "cores": 100}}
    for site in sorted(set(units.values()) - {"usdf"}):
        sites[site] = {
            "role": "remote",
            "repo": str(directory / site),
            "bps": {},
            "cores": 50,
            "wan_mb_per_s": 10,
        }
    rows = "".join(f"{unit}\t0\t{index}\t{site}\n" for index, (unit, site) in enumerate(units.items()))
    (directory / "units.tsv").write_text("unit\ttract\tpatch\tsite\n" + rows)
    config = {
        "campaign": "fc",
        "instrument": "DemoCam",
        "pipeline": "resource://multisite/demo/pipeline.yaml",
        "workdir": str(directory / "work"),
        "units": "units.tsv",
        "skymap": "demo",
        "collections": {"raw": "DemoCam/raw/all", "root": "DemoCam/runs/fc"},
        "stages": [
            {
                "name": "step1",
                "subset": "step1",
                "location": "site",
                "units_per_chunk": 1,
                "work_fraction": 0.5,
            },
            {"name": "step2", "subset": "step2", "location": "central", "work_fraction": 0.2},
            {
                "name": "step3",
                "subset": "step3",
                "location": "site",
                "units_per_chunk": 1,
                "work_fraction": 0.3,
            },
        ],
        "sites": sites,
        "forecast": {
            "handoff_overhead_s": 600,
            "raws_per_unit": 1000,
            "bytes_per_raw": 1e6,
            "core_hours_per_raw": 1.0,
            "product_fraction": {"fanin": 0.1, "fanout": 0.05, "final": 0.5},
        },
    }
    for key, value in changes.items():
        config[key] = value
    return config


def _campaign(directory: Path, units: dict[str, str], **changes):
    return load_campaign(_config(directory, units, **changes), base=directory)


def _tasks(forecast, kind=None, name=None, site=None):
    return [
        t
        for t in forecast.tasks
        if (kind is None or t.kind == kind)
        and (name is None or t.name == name)
        and (site is None or t.site == site)
    ]


def test_one_site_one_chunk_equals_the_hand_computed_makespan(tmp_path):
    campaign = _campaign(tmp_path, {"u0": "ral"})
    # 1,000 raws of 1 MB (1 GB) and 1,000 core-hours; ral: 50 cores, 10 MB/s to usdf (100 cores).
    compute = 500 / 50 + 200 / 100 + 300 / 50  # step1, step2 (central), step3
    transfer = (1e9 + 0.1e9 + 0.05e9 + 0.5e9) / 10e6 / HOUR  # raws, fan-in, fan-out, final
    overheads = 4 * 600 / HOUR
    for flow in ("per_chunk", "per_site"):
        forecast = forecast_campaign(campaign, flow)
        assert forecast.makespan == pytest.approx(compute + transfer + overheads, rel=1e-9)
        assert forecast.lower_bound == pytest.approx((500 + 300) / 50)  # ral's compute
        assert "compute at ral" in forecast.bottleneck
        assert forecast.ratio == pytest.approx(forecast.makespan / forecast.lower_bound)
        assert forecast.handoff_counts == {"raws": 1, "fanin_step2": 1, "fanout_step3": 1, "final": 1}
        largest = forecast.largest_by_bytes
        assert (largest.name, largest.files, largest.bytes) == ("raws", 1000, pytest.approx(1e9))


def test_link_bound_and_bottleneck(tmp_path):
    sites = _config(tmp_path, {"u0": "ral"})["sites"]
    sites["ral"]["wan_mb_per_s"] = 0.01  # 1.65 GB at 10 kB/s: about 46 hours
    campaign = _campaign(tmp_path, {"u0": "ral"}, sites=sites)
    forecast = forecast_campaign(campaign)
    assert forecast.lower_bound == pytest.approx(1.65e9 / 1e4 / HOUR)
    assert forecast.bottleneck.startswith("link ral-usdf")
    assert forecast.lower_bound <= forecast.makespan


def test_per_chunk_streams_raws_and_products_per_site_waits(tmp_path):
    units = {f"u{i}": "ral" for i in range(6)} | {"c0": "usdf"}
    campaign = _campaign(tmp_path, units)
    per_chunk, per_site = forecast_campaign(campaign, "per_chunk"), forecast_campaign(campaign, "per_site")
    assert per_chunk.makespan < per_site.makespan
    for forecast in (per_chunk, per_site):
        assert forecast.lower_bound <= forecast.makespan
        # The central stage starts after every fan-in piece from every site.
        (central,) = _tasks(forecast, kind="central")
        assert central.start >= max(t.end for t in _tasks(forecast, kind="fanin"))
    # Per chunk: a step1 chunk starts while later chunks' raws are still on their way to ral.
    raws = _tasks(per_chunk, kind="raws", site="ral")
    assert len(raws) == 6
    first_step1 = min(t.start for t in _tasks(per_chunk, kind="stage", name="step1", site="ral"))
    assert first_step1 < max(t.end for t in raws)
    # ... and the first final piece leaves before ral's last step3 chunk is done.
    last_step3 = max(t.end for t in _tasks(per_chunk, kind="stage", name="step3", site="ral"))
    assert min(t.start for t in _tasks(per_chunk, kind="final", site="ral")) < last_step3
    # Per site: every step1 chunk waits for all of the raws; the final products leave together.
    (site_raws,) = _tasks(per_site, kind="raws", site="ral")
    assert min(t.start for t in _tasks(per_site, kind="stage", name="step1", site="ral")) >= site_raws.end
    (site_final,) = _tasks(per_site, kind="final", site="ral")
    assert site_final.start >= max(t.end for t in _tasks(per_site, kind="stage", name="step3", site="ral"))
    # The central site's own hand-offs move nothing and take no time.
    for task in _tasks(per_chunk, site="usdf"):
        if task.is_handoff:
            assert not task.moved and task.bytes == 0 and task.end == task.start


def test_coarsening_groups_chunks_and_all_in_one_is_per_site(tmp_path):
    campaign = _campaign(tmp_path, {f"u{i}": "ral" for i in range(6)})
    per_site = forecast_campaign(campaign, "per_site")
    pairs = forecast_campaign(campaign, "per_chunk", chunks_per_handoff=2)
    assert [t.piece for t in _tasks(pairs, kind="raws")] == ["u0..u1", "u2..u3", "u4..u5"]
    assert pairs.handoff_counts["final"] == 3
    whole = forecast_campaign(campaign, "per_chunk", chunks_per_handoff=6)
    (whole_raws,), (site_raws,) = _tasks(whole, kind="raws"), _tasks(per_site, kind="raws")
    assert (whole_raws.start, whole_raws.end, whole_raws.files, whole_raws.bytes) == (
        site_raws.start,
        site_raws.end,
        site_raws.files,
        site_raws.bytes,
    )
    assert whole.makespan == pytest.approx(per_site.makespan)
    assert forecast_campaign(campaign, "per_chunk").makespan <= pairs.makespan <= whole.makespan


def test_demo_config_per_chunk_not_longer_than_per_site():
    campaign = load_campaign(REPO / "config" / "config.yaml", base=REPO)
    per_chunk, per_site = forecast_campaign(campaign, "per_chunk"), forecast_campaign(campaign, "per_site")
    assert per_chunk.makespan <= per_site.makespan
    assert 0 < per_chunk.lower_bound <= per_chunk.makespan
    assert per_site.lower_bound == pytest.approx(per_chunk.lower_bound)
    # step3 has a chunk per patch: two fan-out and two final pieces for in2p3 and ral.
    assert per_chunk.handoff_counts["final"] == 6 and per_site.handoff_counts["final"] == 4
    assert [p.site for p in per_chunk.phases()][0] == "usdf"


def test_unit_work_from_the_units_table_columns(tmp_path):
    config = _config(tmp_path, {"u0": "ral", "u1": "ral"})
    (tmp_path / "units.tsv").write_text(
        "unit\ttract\tpatch\tsite\traws\tcore_hours\nu0\t0\t0\tral\t10\t40\nu1\t0\t1\tral\t30\t\n"
    )
    with pytest.raises(ForecastError, match=r"line 3: core_hours '' is not a non-negative number"):
        estimate_unit_work(load_campaign(config, base=tmp_path))
    (tmp_path / "units.tsv").write_text(
        "unit\ttract\tpatch\tsite\traws\tcore_hours\nu0\t0\t0\tral\t10\t40\nu1\t0\t1\tral\t30\t60\n"
    )
    work = estimate_unit_work(load_campaign(config, base=tmp_path))
    assert work.loc["u0"].to_dict() == {"raws": 10, "bytes": 10e6, "core_hours": 40}
    assert work.loc["u1", "core_hours"] == 60
    forecast = forecast_campaign(load_campaign(config, base=tmp_path), "per_site")
    step1 = {t.piece: t for t in _tasks(forecast, name="step1")}
    assert step1["u0"].core_hours == pytest.approx(0.5 * 40)
    assert step1["u1"].end - step1["u1"].start == pytest.approx(0.5 * 60 / 50)


def test_work_fractions_default_and_validation(tmp_path):
    stages = [
        {"name": "step1", "subset": "step1", "location": "site", "quanta_per_unit": 3},
        {"name": "step2", "subset": "step2", "location": "central", "work_fraction": 0.2},
        {"name": "step3", "subset": "step3", "location": "site", "quanta_per_unit": 1},
    ]
    campaign = _campaign(tmp_path, {"u0": "ral"}, stages=stages)
    assert stage_work_fractions(campaign) == pytest.approx({"step1": 0.6, "step2": 0.2, "step3": 0.2})
    stages[0]["work_fraction"] = 0.9
    with pytest.raises(CampaignConfigError, match="work_fraction add up to 1.1, more than 1"):
        _campaign(tmp_path, {"u0": "ral"}, stages=stages)
    stages[2]["work_fraction"] = -0.1
    with pytest.raises(CampaignConfigError, match=r"stages\.2\.work_fraction"):
        _campaign(tmp_path, {"u0": "ral"}, stages=stages)
    sites = _config(tmp_path, {"u0": "ral"})["sites"]
    sites["ral"]["cores"] = 0
    with pytest.raises(CampaignConfigError, match=r"sites\.ral\.cores"):
        _campaign(tmp_path, {"u0": "ral"}, sites=sites)


def test_missing_capacities_and_bad_options_are_named(tmp_path):
    sites = _config(tmp_path, {"u0": "ral"})["sites"]
    del sites["ral"]["wan_mb_per_s"], sites["usdf"]["cores"]
    campaign = _campaign(tmp_path, {"u0": "ral"}, sites=sites)
    with pytest.raises(ForecastError) as caught:
        forecast_campaign(campaign, "streaming", chunks_per_handoff=0)
    message = str(caught.value)
    for expected in (
        "flow: 'streaming'",
        "chunks_per_handoff: 0",
        "sites.usdf.cores",
        "sites.ral.wan_mb_per_s",
    ):
        assert expected in message


def _lanes(figure) -> dict[str, list[tuple[float, float]]]:
    """Return each lane's bars (start, width) by gid ``timeline-<flow>-<site>-<name>``, from the figure."""
    lanes = {}
    for ax in figure.axes:
        for collection in ax.collections:
            if (collection.get_gid() or "").startswith("timeline-"):
                bars = [path.vertices[:, 0] for path in collection.get_paths()]
                lanes[collection.get_gid()] = [(x.min(), x.max() - x.min()) for x in bars]
    return lanes


def test_timeline_merges_thousands_of_chunks(tmp_path):
    units = {f"u{i}": "ral" for i in range(400)} | {f"v{i}": "lancs" for i in range(400)}
    campaign = _campaign(tmp_path, units)
    forecasts = [forecast_campaign(campaign, "per_chunk"), forecast_campaign(campaign, "per_site")]
    assert len(forecasts[0].tasks) > 3000
    figure = timeline_figure(forecasts)
    # One panel per flow, sharing the time axis; a lane per site and step, both flows, every site.
    per_chunk, per_site = figure.axes
    assert per_chunk.get_shared_x_axes().joined(per_chunk, per_site)
    lanes = _lanes(figure)
    for forecast in forecasts:
        expected = {
            f"timeline-{forecast.flow}-{task.site}-{task.name}"
            for task in forecast.tasks
            if not task.is_handoff or task.moved
        }
        assert {gid for gid in lanes if gid.startswith(f"timeline-{forecast.flow}-")} == expected
        assert {f"timeline-{forecast.flow}-{site}" for site in ("usdf", "ral", "lancs")} <= {
            text.get_gid() for ax in figure.axes for text in ax.texts
        }
    # Thousands of chunks, a few merged bars, all within the time axis and at least a pixel wide.
    bars = [bar for lane in lanes.values() for bar in lane]
    assert 0 < len(bars) < 200
    low, high = per_chunk.get_xlim()
    assert low == 0 and high > max(f.makespan for f in forecasts) / 24.0  # days
    assert all(start >= 0 and start + width <= high and width > 0 for start, width in bars)
    svg = timeline_svg(forecasts)
    root = ET.fromstring(svg)  # well-formed, standalone
    assert root.get("id") == "forecast-timeline" and len(svg) < 60_000, len(svg)
    assert all(f">{site}</text>" in svg for site in ("usdf", "ral", "lancs")) and "per_site" in svg


def test_cli_prints_both_flows_and_the_gain(tmp_path, capsys):
    config = demo_config(tmp_path)
    svg = tmp_path / "timeline.svg"
    assert main(["forecast", str(config), "--svg", str(svg)]) == 0
    out = capsys.readouterr().out
    for expected in (
        "per_chunk flow",
        "per_site flow",
        "makespan",
        "lower bound",
        "ratio",
        "bottleneck",
        "gain:",
    ):
        assert expected in out
    assert "in2p3    raws" in out and "usdf     central  step2" in out
    assert svg.read_text().startswith("<svg")
    assert main(["forecast", str(config), "--flow", "per_site"]) == 0
    out = capsys.readouterr().out
    assert "per_site flow" in out and "per_chunk flow" not in out and "gain" not in out
    # The makespan printed is the simulated one.
    makespan = forecast_campaign(load_campaign(config), "per_site").makespan
    assert f"makespan {makespan:.2f} h" in out or f"makespan {makespan / 24:.2f} d" in out


def test_cli_exits_2_naming_the_problem(tmp_path, capsys):
    config = demo_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    del data["sites"]["ral"]["cores"]
    config.write_text(yaml.safe_dump(data))
    assert main(["forecast", str(config)]) == 2
    err = capsys.readouterr().err
    assert "sites.ral.cores: not set" in err and "cores: 3000" in err
    data["sites"]["ral"]["cores"] = "many"
    config.write_text(yaml.safe_dump(data))
    assert main(["forecast", str(config)]) == 2
    assert "sites.ral.cores" in capsys.readouterr().err
    data["sites"]["ral"]["cores"] = 3000
    config.write_text(yaml.safe_dump(data))
    assert main(["forecast", str(config), "--chunks-per-handoff", "0"]) == 2
    assert "--chunks-per-handoff: 0 is below 1" in capsys.readouterr().err
    assert math.isfinite(forecast_campaign(load_campaign(config)).ratio)
