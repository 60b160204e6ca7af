"""A Rucio outage in the middle of a campaign, through the workflow an operator runs.

The demo campaign runs in one instance with the rucio backend. When a fan-in's Rucio
rule exists and is waited for (transfers held back), the Rucio server is stopped for a
minute and started again on the same port with its data. The campaign must finish on
its own, with every hand-off in one rule, and a forced rerun of the fan-in afterwards
must find everything it registered and move nothing again.
"""

from __future__ import annotations

import os
import subprocess
import time

import yaml

from multisite.markers import read_marker
from multisite.rucio_backend import RucioBackend

from .conftest import BIN, RSES, rucio_config, snakemake, snakemake_command

SCOPE = "outage"
OUTAGE_S = 60


def _client(config: dict):
    return RucioBackend(config["campaign"], config["transfer"]["rucio"]).client


def _rules_by_dataset(client) -> dict[str, list[str]]:
    names = [n for n in client.list_dids(SCOPE, {"name": "multisite.*"}, did_type="dataset")]
    return {name: sorted(r["id"] for r in client.list_did_rules(SCOPE, name)) for name in names}


def _fanin_rule(client) -> str | None:
    for name in client.list_dids(SCOPE, {"name": "multisite.demo.fanin_step2.*"}, did_type="dataset"):
        if rules := list(client.list_did_rules(SCOPE, name)):
            return rules[0]["id"]
    return None


def test_server_stopped_during_a_fanin_wait_then_restarted(local_rucio, tmp_path):
    rucio, storage = local_rucio
    _client(
        {
            "campaign": "demo",
            "transfer": {"rucio": {"scope": SCOPE, "rses": RSES, "client_config": str(rucio.client_config)}},
        }
    ).add_scope("root", SCOPE)
    path = rucio_config(tmp_path, rucio, storage, timeout_s=600, max_interval_s=5)
    config = yaml.safe_load(path.read_text())
    config["transfer"]["rucio"]["scope"] = SCOPE
    for name, site in config["sites"].items():
        site["repo"] = str(storage / name / SCOPE)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    client = _client(config)

    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    log = (tmp_path / "snakemake.log").open("w")
    run = subprocess.Popen(snakemake_command(tmp_path), stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        # Hold transfers back as soon as a fan-in is registered, so its rule stays pending.
        deadline = time.monotonic() + 900
        while not list(client.list_dids(SCOPE, {"name": "multisite.demo.fanin_step2.*"}, did_type="dataset")):
            assert run.poll() is None, (tmp_path / "snakemake.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "no fan-in registered"
            time.sleep(0.5)
        rucio.pause_daemons()
        try:
            while (rule_id := _fanin_rule(client)) is None:
                assert run.poll() is None, (tmp_path / "snakemake.log").read_text()[-5000:]
                time.sleep(0.5)
            rucio.stop_server()
            time.sleep(OUTAGE_S)
            assert run.poll() is None, "the campaign stopped during the outage"
            rucio.start_server()
        finally:
            rucio.resume_daemons()
        assert run.wait(timeout=1800) == 0, (tmp_path / "snakemake.log").read_text()[-5000:]
    finally:
        if run.poll() is None:
            run.kill()
        log.close()

    markers = tmp_path / "work" / "markers"
    qa = read_marker(markers / "qa" / "qa.json")
    assert all(set(counts) == {"pass"} for counts in qa["summary"].values()), qa["summary"]
    logs = "\n".join(
        p.read_text() for p in (tmp_path / "work" / "logs" / "handoff").glob("fanin_step2/*.log")
    )
    assert "Rucio unreachable" in logs and "Rucio reachable again" in logs
    rules = _rules_by_dataset(client)
    assert rule_id in {r for ids in rules.values() for r in ids}
    assert all(len(ids) == 1 for ids in rules.values()), rules

    # A forced rerun of a finished fan-in sends what it sent before (its event snapshot
    # included): Rucio's dataset matches, nothing is registered, ruled or imported again.
    fanin = next(markers.glob("handoff/fanin_step2/*.json"))
    target = str(fanin.relative_to(tmp_path))
    snakemake(tmp_path, target, "--forcerun", "handoff")
    again = read_marker(fanin)["backend_details"]
    assert again["rucio"]["files_registered_now"] == 0 and not again["rucio"]["rule_created"]
    assert again["imported_datasets"] == 0
    assert _rules_by_dataset(client) == rules
