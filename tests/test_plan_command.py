"""The planning command: from an inventory to a units table a campaign runs with."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from multisite.cli import main
from multisite.config import load_campaign

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
