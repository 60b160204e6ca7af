"""The planning command: from an inventory to a units table a campaign runs with."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import yaml

from multisite.cli import main
from multisite.config import load_campaign
from multisite.demo.synthetic import scaled_dr1_inventory
from multisite.flow import stage_chunks
from multisite.planner import make_plan, plan_chunks, write_plan

from .conftest import REPO, snakemake

SHARES = ["--share", "usdf=0.35", "--share", "in2p3=0.4", "--share", "lancs=0.1", "--share", "ral=0.15"]


def test_plan_writes_a_units_table_of_tract_groups_that_a_campaign_previews(tmp_path, capsys):
    out = tmp_path / "plan"
    assert (
        main(
            [
                "plan",
                "--synthetic-dr1",
                "0.01",
                *SHARES,
                "--tracts-per-unit",
                "2",
                "--pin",
                "g05=ral",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    units = pd.read_csv(out / "units.tsv", sep="\t")
    assert units.groupby("unit")["site"].nunique().max() == 1  # a group is at one site
    assert set(units[units.unit == "g05"].site) == {"ral"}
    assert units.tract.is_unique and len(units) == 80
    assert "duplication factor" in capsys.readouterr().out

    config = yaml.safe_load((REPO / "config" / "3x3" / "config.yaml").read_text())
    config.update(workdir=str(tmp_path / "work"), units=str(out / "units.tsv"), max_quanta=100_000)
    config["sites"]["lancs"]["bps"] = {"computeSite": "LANCS"}
    for stage in config["stages"]:
        stage["quanta_per_unit"] = 20_000
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    campaign = load_campaign(tmp_path / "config.yaml")
    assert len(campaign.units) == units.unit.nunique() and all(len(u.cells) <= 2 for u in campaign.units)
    result = snakemake(tmp_path, "-n", "--quiet", "rules")
    assert "run_stage" in result.stdout and "bps_yaml" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--share", "usdf=0.5", "--share", "in2p3=0.4"], "they sum to 0.9, not 1"),
        ([*SHARES, "--pin", "t5=nowhere"], "unknown site 'nowhere'"),
    ],
)
def test_plan_bad_input(tmp_path, capsys, arguments, message):
    assert main(["plan", "--synthetic-dr1", "0.01", *arguments, "-o", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def _visits(tracts: bool = True) -> pd.DataFrame:
    """Return a visits table over tracts 9,813 and 10,221 of a large skymap: 12 visits of 4 detectors."""
    rng = np.random.default_rng(3)
    rows = []
    for visit in range(12):
        tract, (ra, dec) = (9_813, (150.0, -30.0)) if visit % 2 else (10_221, (152.0, -28.0))
        for detector in range(4):
            position = (ra + rng.uniform(-0.5, 0.5), dec + rng.uniform(-0.5, 0.5), 30_000_000 + visit)
            rows.append((2026_01_01_00000 + visit, detector, *position, tract))
            if visit == 0 and detector == 0:  # one raw on both tracts
                rows.append((2026_01_01_00000 + visit, detector, *position, 9_813))
    table = pd.DataFrame(rows, columns=["visit", "detector", "ra", "dec", "bytes", "tract"])
    return table if tracts else table.drop(columns="tract").drop_duplicates(["visit", "detector"])


def _plan(tmp_path, *arguments: str) -> int:
    return main(
        ["plan", *arguments, "--share", "usdf=0.5", "--share", "in2p3=0.5", "-o", str(tmp_path / "out")]
    )


def test_plan_from_a_visits_table_takes_the_tracts_where_its_raws_are(tmp_path, capsys):
    table = tmp_path / "visits.parquet"
    _visits().to_parquet(table)
    assert _plan(tmp_path, "--visits-table", str(table)) == 0
    out = tmp_path / "out"
    units = pd.read_csv(out / "units.tsv", sep="\t")
    assert sorted(units.tract) == [9_813, 10_221] and set(units.unit) == {"t9813", "t10221"}
    assert sorted(units.site) == ["in2p3", "usdf"]  # one tract each
    site_of = dict(zip(units.tract, units.site, strict=True))
    manifests = {site: pd.read_parquet(out / "manifests" / f"{site}.parquet") for site in ("usdf", "in2p3")}
    assert len(manifests[site_of[9_813]]) == 25 and len(manifests[site_of[10_221]]) == 24  # one raw on both
    assert (out / "assignment.tsv").exists() and (out / "planner.json").exists()
    assert "duplication factor" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (_visits(tracts=False), r"missing column(s) ['tract']; the table needs"),
        (_visits().drop(columns=["ra"]), r"missing column(s) ['ra']"),
        (_visits().astype({"dec": str}).assign(dec="south"), "column 'dec' is not numeric (e.g. 'south')"),
        (_visits().assign(bytes=np.nan), "column 'bytes' has empty values"),
        (_visits().iloc[:0], "no rows"),
        (_visits().assign(tract=-1), "no raw overlaps a tract"),
    ],
)
def test_plan_refuses_a_visits_table_it_cannot_plan_and_says_what_it_needs(tmp_path, capsys, table, message):
    path = tmp_path / "visits.parquet"
    table.to_parquet(path)
    assert _plan(tmp_path, "--visits-table", str(path)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale", ["nan", "inf", "-5", "0", "1e300"])
def test_plan_refuses_a_bad_synthetic_scale(tmp_path, capsys, scale):
    assert _plan(tmp_path, "--synthetic-dr1", scale) == 2
    err = capsys.readouterr().err
    assert err.startswith("--synthetic-dr1: ") and "give a number above 0 and at most 47.3" in err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--share", "../../etc=1"],
            "--share: site name '../../etc' is not a plain name; name it with a lower",
        ),
        (["--share", "USDF=1"], "--share: site name 'USDF' is not a plain name"),
        (["--share", "usdf/x=1"], "--share: site name 'usdf/x' is not a plain name"),
        (["--share", "usdf"], "--share: 'usdf' is not SITE=FRACTION"),
        (["--share", "=1"], "--share: '=1' is not SITE=FRACTION"),
        (["--share", "usdf=lots"], "--share: usdf=lots has no number"),
        (["--share", "usdf=0.5", "--share", "usdf=0.5"], "--share: 'usdf' is given twice"),
        (["--share", "usdf=nan"], "shares: site 'usdf' has share nan"),
        ([*SHARES, "--pin", "t5"], "--pin: 't5' is not UNIT=SITE"),
        ([*SHARES, "--pin", "t5=../../etc"], "pins: unit 't5' is pinned to unknown site '../../etc'"),
        ([*SHARES, "--pin", "t5=ral", "--pin", "t5=usdf"], "--pin: 't5' is given twice"),
        ([*SHARES, "--pin", "../t5=ral"], "pins: unknown unit '../t5'"),
        ([*SHARES, "--tracts-per-unit", "0"], "tracts_per_unit: must be at least 1"),
    ],
)
def test_plan_refuses_bad_sites_and_pins_before_writing(tmp_path, capsys, arguments, message):
    out = tmp_path / "out" / "plan"
    assert main(["plan", "--synthetic-dr1", "0.001", *arguments, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written, anywhere


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "no raws: give --visits-table TABLE, --butler REPO"),
        (["--synthetic-dr1", "0.001", "--butler", "repo"], "--synthetic-dr1 makes its own raws and tracts"),
        (["--visits-table", "{table}", "--collection", "raw"], "--collection and --instrument choose raws"),
        (["--visits-table", "{table}", "--skymap", "rings"], "--butler REPO and --skymap NAME go together"),
        (["--butler", "{tmp}/nowhere"], "--butler needs --collection, --instrument and --skymap"),
        (["--visits-table", "{table}", "--butler", "{tmp}/nowhere", "--skymap", "x"], "--butler: No Butler"),
        (["--visits-table", "{tmp}/absent.csv"], "file not found"),
    ],
)
def test_plan_refuses_options_that_do_not_go_together(tmp_path, capsys, arguments, message):
    table = tmp_path / "visits.parquet"
    _visits().to_parquet(table)
    arguments = [a.format(table=table, tmp=tmp_path) for a in arguments]
    assert _plan(tmp_path, *arguments) == 2
    assert message in capsys.readouterr().err


def test_plan_output_that_is_not_a_directory(tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    assert _plan(tmp_path, "--synthetic-dr1", "0.001") == 2
    assert "-o " in capsys.readouterr().err


def test_plan_chunks_are_those_the_campaign_runs(tmp_path):
    plan = make_plan(*scaled_dr1_inventory(0.005), {"usdf": 0.35, "in2p3": 0.4, "lancs": 0.1, "ral": 0.15})
    paths = write_plan(plan, tmp_path / "plan", manifests=False)
    config = yaml.safe_load((REPO / "config" / "3x3" / "config.yaml").read_text())
    config.update(workdir=str(tmp_path / "work"), units=str(paths["units"]), max_quanta=10_000)
    config["sites"]["lancs"]["bps"] = {"computeSite": "LANCS"}
    for stage, quanta in zip(config["stages"], itertools.cycle([3_000, 20_000, 1]), strict=False):
        stage["quanta_per_unit"] = quanta
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    campaign = load_campaign(tmp_path / "config.yaml")
    for stage in campaign.stages:
        if stage.is_central:
            continue
        chunks = plan_chunks(plan, max_quanta=10_000, quanta_per_unit=stage.quanta_per_unit)
        for site in plan.sites:
            mine = chunks[chunks.site == site]
            expected = {c: tuple(group.unit) for c, group in mine.groupby("chunk", sort=False)}
            assert stage_chunks(campaign, site, stage) == expected
