"""A plan changed under a running campaign is refused before anything runs, naming what changed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from lsst.daf.butler import Butler

from multisite.butler_utils import ensure_in_chain
from multisite.cli import main
from multisite.config import load_campaign
from multisite.errors import CampaignConfigError, PlanChangedError
from multisite.markers import write_marker
from multisite.metadata import read_placement_share, store_placement_share
from multisite.plan_version import plan_record, plan_version
from multisite.validate import validate_campaign

from .conftest import demo_config, snakemake


def _planned(directory: Path) -> Path:
    """Write the demo config into ``directory`` and a plan marker for it, as the plan rule does."""
    path = demo_config(directory)
    campaign = load_campaign(path)
    write_marker(campaign.layout.placement_marker, {"sites": []} | plan_record(campaign))
    return path


def _edit_units(path: Path, edit) -> None:
    units_path = Path(yaml.safe_load(path.read_text())["units"])
    units = pd.read_csv(units_path, sep="\t")
    edited = edit(units)
    (units if edited is None else edited).to_csv(units_path, sep="\t", index=False)


def _move(units: pd.DataFrame, unit: str, site: str) -> None:
    units.loc[units["unit"] == unit, "site"] = site


def test_unchanged_plan_passes_and_its_version_is_stable(tmp_path):
    path = _planned(tmp_path)
    campaign = validate_campaign(path)
    marker = json.loads(campaign.layout.placement_marker.read_text())
    assert marker["plan_version"] == plan_version(campaign) == plan_version(load_campaign(path))
    assert [u[0] for u in marker["plan"]["units"]] == [u.name for u in campaign.units]


def test_moved_added_and_removed_units_are_named(tmp_path):
    path = _planned(tmp_path)
    first, second, *_ = pd.read_csv(Path(yaml.safe_load(path.read_text())["units"]), sep="\t")["unit"]

    def edit(units):
        _move(units, first, "lancs" if units.loc[units["unit"] == first, "site"].item() != "lancs" else "ral")
        return units[units["unit"] != second]

    _edit_units(path, edit)
    with pytest.raises(PlanChangedError) as caught:
        validate_campaign(path)
    message = str(caught.value)
    assert f"unit {first} moved from " in message
    assert f"unit {second} removed" in message
    assert "Nothing was run" in message and "plan.json" in message


def test_reordered_units_and_changed_chunking_are_refused(tmp_path):
    path = _planned(tmp_path)
    units_path = Path(yaml.safe_load(path.read_text())["units"])
    units = pd.read_csv(units_path, sep="\t")
    units.iloc[::-1].to_csv(units_path, sep="\t", index=False)
    with pytest.raises(PlanChangedError, match="in another order"):
        validate_campaign(path)
    units.to_csv(units_path, sep="\t", index=False)
    validate_campaign(path)

    config = yaml.safe_load(path.read_text())
    config["stages"][0]["units_per_chunk"] = 1
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(PlanChangedError, match="stages changed"):
        validate_campaign(path)


def test_a_plan_marker_from_before_versions_is_not_checked(tmp_path):
    path = demo_config(tmp_path)
    campaign = load_campaign(path)
    write_marker(campaign.layout.placement_marker, {"sites": []})
    _edit_units(path, lambda units: _move(units, units["unit"].iloc[0], "lancs"))
    validate_campaign(path)


def test_changed_units_refused_by_validate_and_by_the_workflow(tmp_path, capsys):
    """The operator's ways in: ``multisite validate`` and ``snakemake -n`` refuse, and nothing runs."""
    path = _planned(tmp_path)
    unit = pd.read_csv(Path(yaml.safe_load(path.read_text())["units"]), sep="\t")["unit"].iloc[0]
    _edit_units(path, lambda units: _move(units, unit, "ral" if units["site"].iloc[0] != "ral" else "lancs"))
    assert main(["validate", str(path)]) == 2
    assert f"unit {unit} moved from" in capsys.readouterr().err

    result = snakemake(tmp_path, "-n", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"unit {unit} moved from" in output and "Nothing was run" in output
    markers = load_campaign(path).layout.markers
    assert sorted(p.name for p in markers.rglob("*") if p.is_file()) == ["plan.json"]


def test_a_site_instance_refuses_a_placement_share_of_another_plan(tmp_path):
    """The plan version travels with the raws: an instance whose units table differs is told so."""
    path = demo_config(tmp_path)
    campaign = load_campaign(path)
    ral = campaign.sites["ral"]
    Butler.makeRepo(ral.repo)
    placement = pd.DataFrame(
        {"exposure": [1], "visit": [1], "detector": [0], "site": ["ral"], "owner": ["ral"]}
    )
    # Stored where the raws hand-off brings it: a RUN in ral's repository, in its hand-offs chain.
    ref = store_placement_share(campaign, ral, "ral", placement)
    with Butler.from_config(ral.repo, writeable=True) as butler:
        ensure_in_chain(butler, campaign.handoff_chain("ral"), [ref.run])
    assert ref.run.split("/")[-2] == plan_version(campaign)
    pd.testing.assert_frame_equal(read_placement_share(campaign, "ral"), placement)

    _edit_units(path, lambda units: _move(units, units["unit"].iloc[0], "lancs"))
    with pytest.raises(CampaignConfigError, match=f"central site's plan is version {plan_version(campaign)}"):
        read_placement_share(load_campaign(path), "ral")
