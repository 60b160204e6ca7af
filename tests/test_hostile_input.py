"""Hostile or mistaken input is refused before anything is written, naming the field and the fix.

BPS puts submit YAML values on its jobs' command lines unquoted (the parsl plugin
runs them with bash), so a path holding shell syntax would run it; a system
directory as workdir would be written into as root; and a few gaps let a config
through that fails late. `multisite validate` and the workflow run the same checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from multisite.cli import main
from multisite.config import load_campaign, shell_unsafe
from multisite.errors import CampaignConfigError
from multisite.validate import validate_campaign

from .conftest import REPO, demo_config, snakemake

PWNED = "repo$(touch${IFS}pwned)"
"""A repository path that creates a file named ``pwned`` if a shell ever sees it."""


def _write(directory: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """Write the demo config into ``directory``, changed by ``edit``; return its path."""
    path = demo_config(directory)
    config = yaml.safe_load(path.read_text())
    if edit:
        edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``multisite validate`` on a config; return its exit code and what it printed."""
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _refused(directory: Path, edit: Callable[[dict], None]) -> str:
    """Return the message with which the full validation refuses the demo config changed by ``edit``."""
    with pytest.raises(CampaignConfigError) as caught:
        validate_campaign(_write(directory, edit))
    return str(caught.value)


def _no_pwned(*directories: Path) -> bool:
    return not any(list(directory.rglob("pwned")) for directory in directories)


@pytest.mark.parametrize("value", [PWNED, "my repo", "repo;touch pwned", "repo'x", 'repo"x', "r`id`", "r\tx"])
@pytest.mark.parametrize("field", ["sites.ral.repo", "workdir"])
def test_shell_syntax_in_paths_refused_by_validate(tmp_path, monkeypatch, capsys, field, value):
    monkeypatch.chdir(tmp_path)

    def edit(config):
        if field == "workdir":
            config["workdir"] = str(tmp_path / value)
        else:
            config["sites"]["ral"]["repo"] = str(tmp_path / value)

    code, output = _validate(_write(tmp_path, edit), capsys)
    assert code == 2
    assert f"{field}: " in output and "which BPS would pass unquoted to a shell; use only letters" in output
    assert _no_pwned(tmp_path) and not (tmp_path / "work").exists()


def test_shell_syntax_in_paths_refused_by_the_workflow(tmp_path):
    """The operator's way in: snakemake -n refuses both fields before any job, and nothing runs them."""

    def edit(config):
        config["workdir"] = str(tmp_path / "work dir")
        config["sites"]["ral"]["repo"] = str(tmp_path / PWNED)

    _write(tmp_path, edit)
    result = snakemake(tmp_path, "-n", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "workdir: " in output and "sites.ral.repo: " in output and "use only letters" in output
    assert _no_pwned(tmp_path, Path.cwd())
    assert not (tmp_path / "work dir").exists() and not (tmp_path / "work").exists()


def test_shell_unsafe():
    assert shell_unsafe("/data/rubin/repo_main-1.2/x@y:z,w=v+%") is None
    assert shell_unsafe("resource://multisite/demo/pipeline.yaml") is None
    assert "starts with '-'" in shell_unsafe("-rf")
    assert "starts with '-'" in shell_unsafe("")
    assert "'$'" in shell_unsafe("$(id)") and "' '" in shell_unsafe("a b") and "'~'" in shell_unsafe("~/x")


def test_submit_yaml_refuses_values_that_bypassed_the_config(tmp_path):
    """Defence in depth: a Campaign changed in code never reaches BPS with shell syntax in it."""
    from multisite.bps import write_stage_yaml

    campaign = load_campaign(demo_config(tmp_path))
    sites = dict(campaign.sites, ral=dataclasses.replace(campaign.sites["ral"], repo=str(tmp_path / PWNED)))
    bad = dataclasses.replace(campaign, sites=sites, workdir=tmp_path / "work dir")
    target = tmp_path / "bps" / "ral" / "step3" / "t0p2.yaml"
    with pytest.raises(CampaignConfigError) as caught:
        write_stage_yaml(bad, "ral", "step3", "t0p2", pd.DataFrame(), target)
    message = str(caught.value)
    assert "payload.butlerConfig (config field sites.ral.repo)" in message
    assert "submitPath (config field workdir)" in message
    assert not target.exists() and _no_pwned(tmp_path)
    # The same chunk of the valid campaign is written.
    write_stage_yaml(campaign, "ral", "step3", "t0p2", pd.DataFrame(), target)
    assert yaml.safe_load(target.read_text())["payload"]["butlerConfig"] == campaign.sites["ral"].repo


def test_submit_values_checked_one_by_one(tmp_path):
    from multisite.bps import _refuse_unsafe_values

    payload = {
        "payloadName": "demo_ral_step1_c0000",
        "butlerConfig": "/data/ral/repo",
        "inCollection": "DemoCam/runs/demo/ral/handoffs,DemoCam/raw/all",
        "output": "DemoCam/runs/demo/ral/step1/c0000",
        "outputRun": "{output}/{timestamp}",
        "dataQuery": "skymap = 'demo' AND (tract = 0 AND patch IN (2, 5))",
    }
    config = {
        "pipelineYaml": "resource://multisite/demo/pipeline.yaml#step1",
        "campaign": "demo",
        "submitPath": "/data/work/submit/ral/step1/c0000/{timestamp}",
        "payload": payload,
    }
    _refuse_unsafe_values(config, "ral", tmp_path / "c0000.dataids.ecsv", tmp_path / "c0000.yaml")
    with pytest.raises(
        CampaignConfigError, match=r"extraQgraphOptions --data-id-table \(config field workdir\)"
    ):
        _refuse_unsafe_values(config, "ral", tmp_path / "a b.ecsv", tmp_path / "c0000.yaml")
    quoted = dict(config, payload=dict(payload, dataQuery='tract = 0" $(touch pwned) "'))
    with pytest.raises(CampaignConfigError, match="payload.dataQuery"):
        _refuse_unsafe_values(quoted, "ral", None, tmp_path / "c0000.yaml")


@pytest.mark.parametrize(
    ("workdir", "system"),
    [
        ("/etc", "/etc"),
        ("/etc/../etc/campaign", "/etc"),
        ("{tmp}/etc-link/campaign", "/etc"),
        ("/usr/local/campaign", "/usr"),
        ("/var/log", "/var/log"),
        ("/", "/"),
        ("{home}", "($HOME)"),
    ],
)
def test_system_directory_as_workdir_refused(tmp_path, monkeypatch, capsys, workdir, system):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "etc-link").symlink_to("/etc")
    value = workdir.format(tmp=tmp_path, home=tmp_path / "home")
    code, output = _validate(_write(tmp_path, lambda c: c.update(workdir=value)), capsys)
    assert code == 2
    assert f"workdir: {value!r}" in output and "is or lies in the system directory" in output
    assert system in output
    assert not Path("/etc/markers").exists()


@pytest.mark.parametrize("create_repo", [True, False])
def test_created_repo_in_system_directory_refused(tmp_path, create_repo):
    def edit(config):
        config["sites"]["ral"].update(repo="/usr/lib/ral-repo", create_repo=create_repo)

    if create_repo:
        assert "sites.ral.repo: '/usr/lib/ral-repo' (resolved: /usr/lib/ral-repo)" in _refused(tmp_path, edit)
    else:  # an existing repository, only opened, may be anywhere
        assert load_campaign(_write(tmp_path, edit)).sites["ral"].repo == "/usr/lib/ral-repo"


@pytest.mark.parametrize(
    "pipeline", ["{tmp}/nope.yaml", "resource://multisite/demo/nope.yaml", "$DEMO_PIPE_DIR/nope.yaml"]
)
def test_missing_pipeline_refused(tmp_path, monkeypatch, pipeline):
    monkeypatch.setenv("DEMO_PIPE_DIR", str(REPO / "multisite" / "demo"))
    message = _refused(tmp_path, lambda c: c.update(pipeline=pipeline.format(tmp=tmp_path)))
    assert "pipeline: no pipeline file at" in message and "nope.yaml" in message


def test_pipeline_under_a_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DEMO_PIPE_DIR", str(REPO / "multisite" / "demo"))
    campaign = validate_campaign(
        _write(tmp_path, lambda c: c.update(pipeline="${DEMO_PIPE_DIR}/pipeline.yaml"))
    )
    assert campaign.pipeline == str(REPO / "multisite" / "demo" / "pipeline.yaml")
    # Not set here (a stack's variable, previewed without the stack): read where it is set.
    monkeypatch.delenv("DEMO_PIPE_DIR")
    campaign = validate_campaign(_write(tmp_path, lambda c: c.update(pipeline="$DEMO_PIPE_DIR/p.yaml")))
    assert campaign.pipeline == "$DEMO_PIPE_DIR/p.yaml"
    # Any other path naming an unset variable is refused.
    message = _refused(tmp_path, lambda c: c.update(workdir="$DEMO_PIPE_DIR/work"))
    assert (
        "workdir: '$DEMO_PIPE_DIR/work' uses environment variable(s) ['$DEMO_PIPE_DIR'], not set" in message
    )


def test_rucio_backend_needs_its_block_and_an_rse_per_site(tmp_path):
    message = _refused(tmp_path, lambda c: c.update(transfer={"backend": "rucio"}))
    assert "transfer: 'rucio' is a required property" in message and "rses" in message
    rucio = {"scope": "demo", "rses": {"usdf": "USDF_DISK", "ral": "RAL_DISK", "cern": "CERN_DISK"}}
    message = _refused(tmp_path, lambda c: c.update(transfer={"backend": "rucio", "rucio": rucio}))
    assert "transfer.rucio.rses: no RSE for site(s) ['in2p3', 'lancs']" in message
    assert "transfer.rucio.rses: ['cern'] are not sites of this campaign" in message


def test_repeated_units_column_refused(tmp_path):
    units = tmp_path / "units-repeated.tsv"
    units.write_text("unit\ttract\tpatch\tsite\tsite\nt0p0\t0\t0\tusdf\tral\n")
    message = _refused(tmp_path, lambda c: c.update(units=str(units)))
    assert f"units table {units}: column(s) ['site'] appear more than once" in message


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("qa.rtol", float("nan")),
        ("transfer.wait.timeout_s", float("inf")),
        ("bps.requestMemory", float("-inf")),
        ("stages.0.bps.cluster.step1.x", float("nan")),
    ],
)
def test_non_finite_numbers_refused(tmp_path, where, value):
    def edit(config):
        *parents, leaf = where.split(".")
        node = config
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[leaf] = value

    assert f"{where}: {value} is not a finite number" in _refused(tmp_path, edit)


def test_non_finite_number_in_yaml_refused_by_validate(tmp_path, capsys):
    path = _write(tmp_path)
    path.write_text(path.read_text().replace("rtol: 1.0e-06", "rtol: .nan"))
    code, output = _validate(path, capsys)
    assert code == 2 and "qa.rtol: nan is not a finite number" in output


def test_two_sites_sharing_a_repository_refused(tmp_path):
    message = _refused(tmp_path, lambda c: c["sites"]["ral"].update(repo=c["sites"]["usdf"]["repo"]))
    assert "sites.ral.repo: the same repository as sites.usdf.repo" in message
    # Also through a symbolic link to the same directory.
    (tmp_path / "alias").symlink_to(tmp_path / "work" / "sites" / "usdf")
    message = _refused(tmp_path, lambda c: c["sites"]["lancs"].update(repo=str(tmp_path / "alias" / "repo")))
    assert "sites.lancs.repo: the same repository as sites.usdf.repo" in message


def test_validate_checks_the_pipeline_subsets_like_the_workflow(tmp_path, capsys):
    code, output = _validate(_write(tmp_path, lambda c: c["stages"][1].update(subset="step2x")), capsys)
    assert code == 2 and "stages[].subset: pipeline" in output and "has no subset(s) ['step2x']" in output


def test_status_of_an_unknown_site_fails(tmp_path, capsys):
    code = main(["status", str(_write(tmp_path)), "--site", "nosuch"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--site: 'nosuch' is not a site of this campaign; choose one of usdf, in2p3, ral, lancs" in err


@pytest.mark.parametrize("config", ["config/config.yaml", "config/3x3/config.yaml"])
def test_shipped_configs_validate(monkeypatch, capsys, config):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("DRP_PIPE_DIR", raising=False)
    code, output = _validate(Path(config), capsys)
    assert code == 0 and f"{config}: valid" in output
