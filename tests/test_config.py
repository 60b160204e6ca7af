"""Bad campaign input gets a clear error naming the field and the fix, before any repository is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from multisite.config import load_campaign
from multisite.errors import CampaignConfigError
from multisite.sites import prepare_repo

from .conftest import demo_config, snakemake


def _load(directory: Path, edit=None, units: str | None = None):
    path = directory / "config.yaml"
    config = yaml.safe_load(path.read_text())
    if edit:
        edit(config)
    if units is not None:
        (directory / "units.tsv").write_text(units)
    return load_campaign(config)


def _problems(directory: Path, edit=None, units: str | None = None) -> str:
    with pytest.raises(CampaignConfigError) as caught:
        _load(directory, edit, units)
    return str(caught.value)


def test_demo_config_is_valid(campaign_dir):
    campaign = _load(campaign_dir)
    assert campaign.central.name == "usdf"
    assert [s.name for s in campaign.processing_sites] == ["usdf", "in2p3", "ral", "lancs"]
    assert [u.name for u in campaign.units_of("in2p3")] == ["t0p1", "t0p4"]
    assert campaign.stage_chain("ral", "step3") == "DemoCam/runs/demo/ral/step3"


def test_real_3x3_config_is_valid():
    root = Path(__file__).resolve().parent.parent
    campaign = load_campaign(root / "config" / "3x3" / "config.yaml", base=root)
    assert campaign.central.name == "usdf"
    assert {s.name for s in campaign.processing_sites} == {"in2p3", "ral", "lancs"}
    assert all(len(campaign.units_of(s)) == 2 for s in ("in2p3", "ral", "lancs"))
    assert campaign.sites["in2p3"].bps["computeSite"] == "CC-IN2P3"


def test_invalid_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("campaign: demo\nsites: [unclosed\n")
    with pytest.raises(CampaignConfigError, match="not valid YAML") as caught:
        load_campaign(path)
    assert "line" in str(caught.value)


def test_unknown_site(campaign_dir):
    message = _problems(campaign_dir, units="unit\ttract\tpatch\tsite\nt0p0\t0\t0\tfrdf\n")
    assert "unknown site 'frdf'" in message and "known sites" in message and "line 2" in message


def test_instance_site_must_be_a_campaign_site(campaign_dir, tmp_path):
    message = _problems(campaign_dir, lambda c: c.update(site="cern"))
    assert "site: 'cern' is not a site of this campaign" in message and "profile" in message
    # The same from the command line, as a profile's `--config site=...` gives it, before any job.
    result = snakemake(campaign_dir, "-n", "--config", "site=cern", check=False)
    assert result.returncode != 0 and "'cern' is not a site of this campaign" in result.stderr + result.stdout
    assert _load(campaign_dir, lambda c: c.update(site="ral")).instance == "ral"


def test_patch_assigned_to_two_sites(campaign_dir):
    units = "unit\ttract\tpatch\tsite\nt0p0\t0\t0\tusdf\nt0p0\t0\t0\tral\n"
    assert "assigned to two sites ('usdf' and 'ral'); give all its rows one site" in _problems(
        campaign_dir, units=units
    )


def test_unit_of_several_rows_is_a_group(campaign_dir):
    units = "unit\ttract\tpatch\tsite\nring0\t0\t\tusdf\nring0\t1\t\tusdf\nt2\t2\t\tral\n"
    campaign = _load(campaign_dir, units=units)
    group = campaign.units_of("usdf")[0]
    assert group.name == "ring0" and group.cells == ((0, None), (1, None))
    assert group.contains(1, 57) and not group.contains(2, 0)
    assert "tract 1 patch None is also unit 'ring0'" in _problems(
        campaign_dir, units=units + "ring0\t1\t\tusdf\n"
    )


def test_same_patch_in_two_units(campaign_dir):
    units = "unit\ttract\tpatch\tsite\na\t0\t0\tusdf\nb\t0\t0\tral\n"
    assert "tract 0 patch 0 is also unit 'a'" in _problems(campaign_dir, units=units)


def test_patch_assigned_to_no_site(campaign_dir):
    units = "unit\ttract\tpatch\tsite\nt0p0\t0\t0\t\n"
    assert "assigned to no site" in _problems(campaign_dir, units=units)


def test_malformed_collection_name(campaign_dir):
    def edit(config):
        config["collections"]["root"] = "DemoCam//runs demo"

    message = _problems(campaign_dir, edit)
    assert "collections.root" in message and "path-like Butler collection name" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("instrument", "DemoCam' OR instrument != 'x"),
        ("skymap", "demo'; drop"),
        ("campaign", "Demo Campaign"),
    ],
)
def test_values_that_would_reach_a_query_are_checked(campaign_dir, field, value):
    def edit(config):
        config[field] = value

    assert f"{field}: " in _problems(campaign_dir, edit)


@pytest.mark.parametrize(
    ("registry", "named"),
    [
        ({"db": "postgresql://butler:secret@db.example.org/butler", "namespace": "ral"}, "registry.db"),
        ({"db": "postgresql://butler@db.example.org/butler; rm -rf /", "namespace": "ral"}, "registry.db"),
        ({"db": "postgresql://butler@db.example.org/butler", "namespace": "RAL repo"}, "registry.namespace"),
        ({"db": "postgresql://butler@db.example.org/butler"}, "registry"),
    ],
)
def test_registry_database_is_a_postgresql_url_without_password_and_a_plain_namespace(
    campaign_dir, registry, named
):
    def edit(config):
        config["sites"]["ral"]["registry"] = registry

    message = _problems(campaign_dir, edit)
    assert f"sites.ral.{named}" in message and "secret" not in message


def test_two_central_sites_and_typos(campaign_dir):
    def edit(config):
        config["sites"]["ral"]["role"] = "central"
        config["sites"]["in2p3"]["reppo"] = "x"

    message = _problems(campaign_dir, edit)
    assert "sites.in2p3: Additional properties are not allowed ('reppo'" in message
    assert "remove it or check its spelling" in message


def test_one_central_site_required(campaign_dir):
    def edit(config):
        config["sites"]["ral"]["role"] = "central"

    assert "exactly one site must have role: central" in _problems(campaign_dir, edit)


def test_missing_repository_is_reported_not_created(campaign_dir):
    def edit(config):
        config["sites"]["ral"]["create_repo"] = False

    campaign = _load(campaign_dir, edit)
    with pytest.raises(FileNotFoundError, match=r"sites\.ral\.repo: no Butler repository at .*create_repo"):
        prepare_repo(campaign, "ral")
    assert not Path(campaign.sites["ral"].repo).exists()


def test_snakemake_refuses_bad_config_before_any_job(tmp_path):
    demo_config(tmp_path, collections={"raw": "DemoCam/raw/all", "root": "bad name"})
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    assert "collections.root" in result.stderr + result.stdout
    assert not (tmp_path / "work").exists()


def test_snakemake_missing_repo_stops_before_data_moves(tmp_path):
    config_path = demo_config(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    config["sites"]["ral"]["create_repo"] = False
    config_path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, check=False)
    assert result.returncode != 0
    assert "sites.ral.repo: no Butler repository" in result.stderr
    markers = tmp_path / "work" / "markers"
    assert not list((markers / "handoff" / "raws").glob("ral/*.json"))
    assert not list((markers / "stage").glob("ral/**/*.json"))


def test_stage_subset_missing_from_pipeline(tmp_path):
    config_path = demo_config(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    config["stages"][1]["subset"] = "step2x"
    config_path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    assert "has no subset(s) ['step2x']" in result.stderr + result.stdout
