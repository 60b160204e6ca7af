"""Site instances: one Snakemake per facility, each in its own directory, meeting only through Rucio.

Four instances (usdf, in2p3, ral, lancs), started together with their site
profiles (the executor set to local: this machine has no HTCondor for RAL's, and
the Slurm profiles are proven in test_slurm), run the demo campaign through the
test Rucio. Each instance's config names only its own repository: the other sites'
repositories are paths that lead nowhere, so an instance that reached into another
site's files would fail. RAL's instance is killed in the middle; the others wait
for it and say so; it is restarted, and the campaign completes with nothing that
was finished done again, and with the final outputs of a single-instance run.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from lsst.daf.butler import Butler

from multisite.config import load_campaign
from multisite.markers import read_marker
from multisite.rucio_backend import RucioBackend

from .conftest import BIN, REPO, RSES, SCOPE, demo_config, rucio_config, snakemake

SITES = ("usdf", "in2p3", "ral", "lancs")
INSTANCE_SCOPE = "sites"


def instance_configs(base: Path, rucio, storage: Path) -> dict[str, Path]:
    """One config per instance: its own work area, its own repository only."""
    template = yaml.safe_load(rucio_config(base, rucio, storage).read_text())
    template["transfer"]["rucio"]["scope"] = INSTANCE_SCOPE
    template["transfer"]["wait"] = {"timeout_s": 1800, "interval_s": 2}
    paths = {}
    for site in SITES:
        directory = base / site
        directory.mkdir()
        config = copy.deepcopy(template)
        config["workdir"] = str(directory / "work")
        for name, entry in config["sites"].items():
            mine = name == site
            entry["repo"] = (
                str(storage / name / INSTANCE_SCOPE) if mine else str(directory / "nowhere" / name)
            )
            entry["create_repo"] = mine
        paths[site] = directory / "config.yaml"
        paths[site].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def command(site: str, config: Path) -> list[str]:
    """One site's instance: its profile, its own directory (executor local: see the module doc)."""
    return [
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--profile",
        str(REPO / "profiles" / site),
        "--executor",
        "local",
        "--cores",
        "3",  # a rule waiting for another site's hand-off holds a slot while it waits
        "--directory",
        str(config.parent),
        "--configfile",
        str(config),
    ]


def start(site: str, config: Path) -> subprocess.Popen:
    """Start one site's instance in its own process group, its output in its directory."""
    with open(config.parent / "snakemake.log", "a") as log:
        return subprocess.Popen(
            command(site, config), stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )


def status(config: Path) -> str:
    result = subprocess.run(
        [str(BIN / "multisite"), "status", str(config)], capture_output=True, text=True, check=True
    )
    return result.stdout


def wait_for(what: str, condition, processes: dict[str, subprocess.Popen], timeout: float = 1200) -> None:
    """Poll ``condition`` until true; fail early if an instance stopped on an error."""
    deadline = time.monotonic() + timeout
    while not condition():
        for site, process in processes.items():
            code = process.poll()
            assert code in (None, 0), f"{site}'s instance failed (exit {code}) while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(2)


def _final_outputs(work: Path) -> pd.DataFrame:
    """QA table of a finished campaign, without paths: products compared to the reference."""
    table = pd.read_csv(work / "logs" / "qa" / "qa.csv")
    return table.drop(columns=["detail"]).sort_values(["check", "dataset_type", "data_id", "site"])


@pytest.fixture(scope="module")
def instances(local_rucio, tmp_path_factory):
    rucio, storage = local_rucio
    RucioBackend(
        "demo", {"scope": SCOPE, "rses": RSES, "client_config": str(rucio.client_config)}
    ).client.add_scope("root", INSTANCE_SCOPE)
    return instance_configs(tmp_path_factory.mktemp("instances"), rucio, storage)


def test_profiles_by_name_run_their_site_share():
    """`snakemake --profile in2p3`, exactly so, previews in2p3's share (profiles installed by make setup)."""
    for site in SITES:
        result = subprocess.run(
            [str(BIN / "snakemake"), "--profile", site, "-n"],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=ENV,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        stages = set(re.findall(r"^(step\d_\w+)\s+\d+$", result.stdout, re.M))
        assert stages and all(name.endswith(f"_{site}") for name in stages), (site, stages)


def test_four_instances_one_killed_and_restarted_complete_the_campaign(instances, tmp_path_factory):
    processes = {site: start(site, config) for site, config in instances.items()}
    try:
        ral_markers = instances["ral"].parent / "work" / "markers"
        wait_for("ral's step1", lambda: (ral_markers / "stage" / "ral" / "step1.json").exists(), processes)
        os.killpg(processes["ral"].pid, signal.SIGKILL)
        processes["ral"].wait()
        killed = processes.pop("ral")
        assert killed.returncode == -signal.SIGKILL
        finished = {path: path.stat().st_mtime_ns for path in ral_markers.rglob("*.json")}

        # USDF's instance waits for what RAL has not sent, and says what, from whom and since when.
        waiting = re.compile(r"WAITING: handoff (\w+) ral at ral since \S+: waiting for \1 from ral since ")
        wait_for("USDF saying it waits for ral", lambda: waiting.search(status(instances["usdf"])), processes)
        assert processes["usdf"].poll() is None

        subprocess.run(
            [*command("ral", instances["ral"]), "--unlock"], check=True, capture_output=True, env=ENV
        )
        processes["ral"] = start("ral", instances["ral"])
        for site, process in processes.items():
            assert process.wait(timeout=2400) == 0, (
                f"{site}: {(instances[site].parent / 'snakemake.log').read_text()[-4000:]}"
            )
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

    # Nothing RAL had finished was done again.
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    ral = load_campaign(instances["ral"])
    name = ral.stage_chain("ral", "step1", "c0000")
    chain = Butler.from_config(ral.sites["ral"].repo).collections.get_info(name)
    assert len([run for run in chain.children if run.startswith(name)]) == 1, chain.children

    # Markers stay with each instance: the central QA at USDF only, each site's own stages.
    for site, config in instances.items():
        markers = config.parent / "work" / "markers"
        assert (markers / "qa" / "qa.json").exists() == (site == "usdf")
        assert {p.name for p in (markers / "stage").iterdir()} == {site}
    usdf = instances["usdf"].parent / "work"
    qa = read_marker(usdf / "markers" / "qa" / "qa.json")
    assert all(set(counts) == {"pass"} for counts in qa["summary"].values()), qa["summary"]
    for marker in (usdf / "markers" / "handoff").glob("*/*.json"):
        content = read_marker(marker)
        if content["source"] != content["destination"]:
            assert content["backend"] == "rucio" and content["backend_details"]["rucio"]["rule_id"]

    # The same final outputs as one instance running every site.
    single = tmp_path_factory.mktemp("single-instance")
    demo_config(single)
    snakemake(single, timeout=1800)
    pd.testing.assert_frame_equal(
        _final_outputs(usdf).reset_index(drop=True), _final_outputs(single / "work").reset_index(drop=True)
    )
