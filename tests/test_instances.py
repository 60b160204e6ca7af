"""Site instances: one Snakemake per facility, each in its own directory, meeting only through Rucio.

Four instances (usdf, in2p3, ral, lancs), started together with their site profiles
(the executor set to local: the batch paths are proven in test_slurm and
test_htcondor), run the demo campaign through the test Rucio. Each instance's config
names only its own repository: the other sites' repositories are paths that lead
nowhere, so an instance that reached into another site's files would fail. A first
campaign runs untouched and ends with the final outputs of a single-instance run; in a
second, RAL's instance is killed in the middle, the others wait and say so, and the
campaign completes once it is restarted, with nothing that was finished done again.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import yaml
from lsst.daf.butler import Butler

from multisite.config import load_campaign
from multisite.markers import read_marker
from multisite.rucio_backend import RucioBackend

from .conftest import BIN, REPO, RSES, SCOPE, demo_config, rucio_config, snakemake

SITES = ("usdf", "in2p3", "ral", "lancs")
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def instance_configs(base: Path, rucio, storage: Path, scope: str) -> dict[str, Path]:
    """One config per instance: its own work area, its own repository only (at ``<RSE>/<scope>``)."""
    RucioBackend(
        "demo", {"scope": SCOPE, "rses": RSES, "client_config": str(rucio.client_config)}
    ).client.add_scope("root", scope)
    template = yaml.safe_load(rucio_config(base, rucio, storage).read_text())
    template["transfer"]["rucio"]["scope"] = scope
    template["transfer"]["wait"] = {"timeout_s": 1800, "interval_s": 2}
    paths = {}
    for site in SITES:
        directory = base / site
        directory.mkdir()
        config = copy.deepcopy(template)
        config["workdir"] = str(directory / "work")
        for name, entry in config["sites"].items():
            mine = name == site
            entry["repo"] = str(storage / name / scope) if mine else str(directory / "nowhere" / name)
            entry["create_repo"] = mine
        paths[site] = directory / "config.yaml"
        paths[site].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


def command(site: str, config: Path) -> list[str]:
    """Return one site's instance: its profile, its own directory (executor local: see the module doc)."""
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


def finish(processes: dict[str, subprocess.Popen], configs: dict[str, Path]) -> None:
    """Wait for every instance to end; each must succeed (any still running is killed on failure)."""
    try:
        for site, process in processes.items():
            code = process.wait(timeout=2400)
            assert code == 0, f"{site}: {(configs[site].parent / 'snakemake.log').read_text()[-4000:]}"
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


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


def event_lines(config: Path) -> list[dict]:
    """Return an instance's own event log, in order (an instance's log is named after its site)."""
    path = config.parent / "work" / "events" / f"{config.parent.name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_campaign(configs: dict[str, Path]) -> Path:
    """Check a finished four-instance campaign; return USDF's work directory."""
    for site, config in configs.items():
        # Markers stay with each instance: the central QA at USDF only, each site's own stages.
        markers = config.parent / "work" / "markers"
        assert (markers / "qa" / "qa.json").exists() == (site == "usdf")
        assert {p.name for p in (markers / "stage").iterdir()} == {site}
    usdf = configs["usdf"].parent / "work"
    qa = read_marker(usdf / "markers" / "qa" / "qa.json")
    assert all(set(counts) == {"pass"} for counts in qa["summary"].values()), qa["summary"]
    for marker in (usdf / "markers" / "handoff").glob("*/*.json"):
        content = read_marker(marker)
        if content["source"] != content["destination"]:
            assert content["backend"] == "rucio" and content["backend_details"]["rucio"]["rule_id"]
    return usdf


def _final_outputs(work: Path) -> pd.DataFrame:
    """QA table of a finished campaign, without paths: products compared to the reference."""
    table = pd.read_csv(work / "logs" / "qa" / "qa.csv")
    return table.drop(columns=["detail"]).sort_values(["check", "dataset_type", "data_id", "site"])


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


def test_four_instances_started_together_end_like_one_instance(local_rucio, tmp_path_factory):
    rucio, storage = local_rucio
    configs = instance_configs(tmp_path_factory.mktemp("instances"), rucio, storage, "sites")
    finish({site: start(site, config) for site, config in configs.items()}, configs)
    usdf = check_campaign(configs)
    single = tmp_path_factory.mktemp("single-instance")
    demo_config(single)
    snakemake(single, timeout=1800)
    pd.testing.assert_frame_equal(
        _final_outputs(usdf).reset_index(drop=True), _final_outputs(single / "work").reset_index(drop=True)
    )


def test_killed_instance_is_waited_for_and_restarted_without_redoing_anything(local_rucio, tmp_path_factory):
    rucio, storage = local_rucio
    configs = instance_configs(tmp_path_factory.mktemp("killed"), rucio, storage, "killed")
    processes = {site: start(site, config) for site, config in configs.items()}
    ral_work = configs["ral"].parent / "work"
    try:
        # Killed while its step1 is with BPS: nothing of step1 reaches the others.
        wait_for(
            "ral's step1 submission",
            lambda: any((ral_work / "qgraph" / "ral" / "step1").glob("*/*.bps.log")),
            processes,
        )
        os.killpg(processes["ral"].pid, signal.SIGKILL)
        assert processes.pop("ral").wait() == -signal.SIGKILL
        finished = {path: path.stat().st_mtime_ns for path in (ral_work / "markers").rglob("*.json")}
        events_at_kill = {site: event_lines(config) for site, config in configs.items()}

        # The others wait and say what for, from whom and since when: USDF for RAL's fan-in,
        # the other sites for USDF's fan-out (which needs RAL's fan-in).
        waits = {
            "usdf": ("fanin_step2", "ral", "ral"),
            "in2p3": ("fanout_step3", "in2p3", "usdf"),
            "lancs": ("fanout_step3", "lancs", "usdf"),
        }
        for site, (handoff, at, sender) in waits.items():
            said = re.compile(
                rf"WAITING: handoff {handoff} {at} at {at} since \S+: "
                rf"waiting for {handoff} from {sender} since "
            )
            wait_for(
                f"{site} saying it waits", lambda s=site, r=said: r.search(status(configs[s])), processes
            )
        assert all(process.poll() is None for process in processes.values())
        assert not (configs["usdf"].parent / "work" / "markers" / "stage" / "usdf" / "step2.json").exists()

        subprocess.run(
            [*command("ral", configs["ral"]), "--unlock"], check=True, capture_output=True, env=ENV
        )
        processes["ral"] = start("ral", configs["ral"])
        finish(processes, configs)
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

    # Nothing finished before the kill was done again: RAL's markers are untouched, and no
    # instance started again a step it had done (its event log, after the kill).
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    for site, before in events_at_kill.items():
        done = {event["step"] for event in before if event["kind"] == "done"}
        assert done, site
        after = event_lines(configs[site])[len(before) :]
        assert after, site
        assert not [e["step"] for e in after if e["kind"] == "started" and e["step"] in done], site
    check_campaign(configs)
    # The killed chunk ran again without duplicating a dataset.
    ral = load_campaign(configs["ral"])
    butler = Butler.from_config(ral.sites["ral"].repo)
    runs = butler.collections.query(ral.stage_chain("ral", "step1"), flatten_chains=True)
    stars = butler.query_datasets("single_visit_star", collections=runs, find_first=False)
    assert stars and len(stars) == len({ref.dataId for ref in stars})
