"""Hand-offs through a real Rucio: server, PostgreSQL, judge and conveyor daemons, all local.

The session fixture starts the Rucio of ``tests/rucio_harness`` (and stops it by
process id at the end); a missing piece fails loudly, it is never skipped. The
tests of this module run in order on one pair of demo repositories: a hand-off
end to end, an idempotent rerun, a corrupted source file, the server stopped in
the middle, and no secret anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from lsst.daf.butler import Butler, Config

from multisite.config import load_campaign
from multisite.demo.survey import SurveySpec, make_survey
from multisite.markers import read_marker
from multisite.placement import compute_placement
from multisite.rucio_backend import RucioBackend, RucioHandoffError
from multisite.transfer import HandoffPayload, make_backend, run_handoff

from .conftest import REPO, demo_config, snakemake
from .rucio_harness.local_rucio import LocalRucio

SCOPE = "demo"
RSES = {
    "usdf": "USDF_BUTLER_DISK",
    "in2p3": "IN2P3_BUTLER_DISK",
    "ral": "RAL_BUTLER_DISK",
    "lancs": "LANCS_BUTLER_DISK",
}


@pytest.fixture(scope="session")
def local_rucio(tmp_path_factory):
    """Run a local Rucio whose RSEs are ``<storage>/<site>/`` (Butler roots ``<storage>/<site>/demo``)."""
    storage = tmp_path_factory.mktemp("rucio-storage")
    rucio = LocalRucio(
        tmp_path_factory.mktemp("rucio"), {rse: str(storage / site) for site, rse in RSES.items()}, SCOPE
    )
    rucio.start()
    try:
        yield rucio, storage
    finally:
        rucio.stop()


def rucio_config(directory: Path, rucio: LocalRucio, storage: Path, **poll) -> Path:
    """Demo campaign config with the rucio backend and the repositories at the RSEs' roots."""
    client_config = rucio.write_client_config(directory / "rucio.cfg", directory / "rucio-token")
    path = demo_config(
        directory,
        transfer={
            "backend": "rucio",
            "rucio": {
                "scope": SCOPE,
                "account": "root",
                "activity": "Data Consolidation",
                "grouping": "DATASET",
                "client_config": str(client_config),
                "rses": RSES,
                "poll": {"interval_s": 0.5, "max_interval_s": 2, "backoff": 1.5, "timeout_s": 120, **poll},
            },
        },
    )
    config = yaml.safe_load(path.read_text())
    for name, site in config["sites"].items():
        site["repo"] = str(storage / name / SCOPE)
    config["sites"]["lancs"] = {"role": "remote", "repo": str(storage / "lancs" / SCOPE), "bps": {}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def setup(local_rucio, tmp_path_factory):
    rucio, storage = local_rucio
    directory = tmp_path_factory.mktemp("rucio-campaign")
    campaign = load_campaign(rucio_config(directory, rucio, storage))
    seed = Config(str(REPO / "multisite" / "demo" / "repo_seed.yaml"))
    for site in campaign.sites.values():
        Butler.makeRepo(site.repo, config=seed)
    with Butler.from_config(campaign.central.repo, writeable=True) as butler:
        make_survey(butler, SurveySpec(), campaign.raw_collection, campaign.truth_collection)
        placement = compute_placement(butler, campaign)
    return campaign, placement, rucio


def client(campaign):
    return RucioBackend(campaign.name, campaign.rucio).client


def scope_state(campaign) -> dict:
    """Every DID of the scope and every rule on the hand-off datasets."""
    c = client(campaign)
    dids = sorted(c.list_dids(SCOPE, {"name": "*"}, did_type="all"))
    datasets = [d for d in dids if d.startswith("multisite.")]
    rules = sorted(r["id"] for d in datasets for r in c.list_did_rules(SCOPE, d))
    return {"dids": dids, "rules": rules}


def raws(campaign, butler: Butler, visits: set[int]):
    return [
        ref
        for ref in butler.query_datasets("raw", collections=campaign.raw_collection, limit=None)
        if ref.dataId["exposure"] in visits
    ]


def test_1_handoff_end_to_end(setup, caplog):
    campaign, placement, rucio = setup
    caplog.set_level(logging.DEBUG)
    marker = run_handoff(campaign, "raws", "in2p3", placement)
    details = marker["backend_details"]
    assert marker["backend"] == "rucio"
    info = details["rucio"]
    assert info["rule_id"] and info["rule_created"]
    assert info["dataset"] == f"{SCOPE}:multisite.demo.raws.in2p3"
    c = client(campaign)
    rule = c.get_replication_rule(info["rule_id"])
    assert rule["state"] == "OK" and rule["rse_expression"] == "IN2P3_BUTLER_DISK"
    assert rule["activity"] == "Data Consolidation" and rule["grouping"] == "DATASET"
    files = list(c.list_files(SCOPE, "multisite.demo.raws.in2p3"))
    # every raw, plus the Butler export file
    n_raws = sum(marker["datasets"].values())
    assert len(files) == n_raws + 1 == info["files"]
    assert any(f["name"] == "rucio_exports/demo/raws/in2p3.yaml" for f in files)
    assert all(len(f["adler32"]) == 8 and f["bytes"] > 0 for f in files)
    # The container hierarchy: campaign > stage > hand-off dataset.
    assert [d["name"] for d in c.list_content(SCOPE, "multisite.demo")] == ["multisite.demo.raws"]
    assert "multisite.demo.raws.in2p3" in [d["name"] for d in c.list_content(SCOPE, "multisite.demo.raws")]
    # Same dataset IDs in the same RUN, files inside the destination datastore, visit records there.
    central = Butler.from_config(campaign.central.repo)
    dest = Butler.from_config(campaign.sites["in2p3"].repo)
    src_refs = central.query_datasets("raw", collections=campaign.raw_collection, limit=None)
    dst_refs = dest.query_datasets("raw", collections=campaign.raw_collection, limit=None)
    assert {r.id for r in dst_refs} <= {r.id for r in src_refs} and len(dst_refs) == n_raws
    for ref in dst_refs[:3]:
        uri = dest.getURI(ref)
        assert uri.ospath.startswith(campaign.sites["in2p3"].repo)
        assert (dest.get(ref).pixels == central.get(ref).pixels).all()
    assert dest.query_dimension_records("visit", limit=None)
    # Progress was shown, with files and bytes.
    assert any("files" in r.getMessage() and "bytes" in r.getMessage() for r in caplog.records)
    (Path(campaign.workdir) / "e2e_marker.json").parent.mkdir(parents=True, exist_ok=True)
    (Path(campaign.workdir) / "e2e_marker.json").write_text(json.dumps(marker, default=str))


def test_2_rerun_adds_nothing(setup):
    campaign, placement, rucio = setup
    before = scope_state(campaign)
    dest = Butler.from_config(campaign.sites["in2p3"].repo)
    n_before = len(dest.query_datasets("raw", collections=campaign.raw_collection, limit=None))
    marker = run_handoff(campaign, "raws", "in2p3", placement)
    info = marker["backend_details"]["rucio"]
    assert not info["rule_created"] and info["files_registered_now"] == 0
    assert marker["backend_details"]["imported_datasets"] == 0
    assert scope_state(campaign) == before
    dest = Butler.from_config(campaign.sites["in2p3"].repo)
    assert len(dest.query_datasets("raw", collections=campaign.raw_collection, limit=None)) == n_before


def nothing_of(repo: str, refs) -> bool:
    """Whether none of ``refs`` is known to the repository's registry."""
    butler = Butler.from_config(repo)
    return all(butler.get_dataset(ref.id) is None for ref in refs)


def _deliver_in_thread(backend, source, destination, payload, label):
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = backend.deliver(source, destination, payload, label)
        except Exception as err:  # noqa: BLE001 - handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _wait_for_rule(campaign, dataset: str, timeout: float = 120) -> str:
    c = client(campaign)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rules = list(c.list_did_rules(SCOPE, dataset))
        except Exception:  # noqa: BLE001 - the dataset may not exist yet
            rules = []
        if rules:
            return rules[0]["id"]
        time.sleep(0.3)
    raise AssertionError(f"no rule on {dataset} after {timeout} s")


def test_3_corrupted_source_file_fails_clearly_and_ingests_nothing(setup):
    campaign, placement, rucio = setup
    central, ral = campaign.central, campaign.sites["ral"]
    butler = Butler.from_config(central.repo)
    visits = sorted(
        {
            ref.dataId["exposure"]
            for ref in butler.query_datasets("raw", collections=campaign.raw_collection, limit=None)
        }
    )
    refs = raws(campaign, butler, {visits[0]})
    victim = refs[0]
    path = Path(butler.getURI(victim).ospath)
    name = str(path.relative_to(central.repo))
    original = path.read_bytes()
    backend = make_backend(campaign)
    rucio.pause_daemons()
    try:
        thread, outcome = _deliver_in_thread(backend, central, ral, HandoffPayload(refs), "corrupt/ral")
        _wait_for_rule(campaign, "multisite.demo.corrupt.ral")
        # The source file goes bad after registration (same size, other bytes).
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
    finally:
        rucio.resume_daemons()
    thread.join(300)
    path.write_bytes(original)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, RucioHandoffError), outcome
    message = str(error)
    assert "STUCK" in message and name in message and "checksum mismatch" in message, message
    assert "Nothing from this hand-off was ingested" in message
    assert nothing_of(ral.repo, refs)
    assert rucio.password not in message


def test_4_server_stopped_midway_then_rerun_completes_without_duplicates(setup):
    campaign, placement, rucio = setup
    central, lancs = campaign.central, campaign.sites["lancs"]
    butler = Butler.from_config(central.repo)
    visits = sorted(
        {
            ref.dataId["exposure"]
            for ref in butler.query_datasets("raw", collections=campaign.raw_collection, limit=None)
        }
    )
    refs = raws(campaign, butler, set(visits[1:3]))
    backend = make_backend(campaign)
    rucio.pause_daemons()
    try:
        thread, outcome = _deliver_in_thread(backend, central, lancs, HandoffPayload(refs), "outage/lancs")
        rule_id = _wait_for_rule(campaign, "multisite.demo.outage.lancs")
        rucio.stop_server()
    finally:
        rucio.resume_daemons()
    thread.join(300)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, RucioHandoffError), outcome
    assert "Rucio call failed" in str(error) and "rerun" in str(error), str(error)
    assert rucio.password not in str(error)
    assert nothing_of(lancs.repo, refs)
    rucio.start_server()
    before = scope_state(campaign)
    result = make_backend(campaign).deliver(central, lancs, HandoffPayload(refs), "outage/lancs")
    info = result["rucio"]
    assert info["rule_id"] == rule_id and not info["rule_created"] and info["files_registered_now"] == 0
    assert scope_state(campaign) == before
    assert [r["id"] for r in client(campaign).list_did_rules(SCOPE, "multisite.demo.outage.lancs")] == [
        rule_id
    ]
    dest = Butler.from_config(lancs.repo, writeable=True)
    assert all(dest.stored_many(refs).values())
    assert len(dest.query_datasets("raw", collections=campaign.raw_collection, limit=None)) == len(refs)


def test_5_no_secret_in_logs_or_markers(setup, caplog, tmp_path):
    campaign, placement, rucio = setup
    caplog.set_level(logging.DEBUG)
    marker = run_handoff(campaign, "raws", "ral", placement)
    secrets = list(rucio.secrets())
    token_file = Path(campaign.rucio["client_config"]).parent / "rucio-token"
    for candidate in [token_file, *token_file.parent.glob("rucio-token*")]:
        if candidate.is_file() and candidate.read_text().strip():
            secrets.append(candidate.read_text().strip())
    texts = [json.dumps(marker, default=str), (Path(campaign.workdir) / "e2e_marker.json").read_text()]
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(record.args) for record in caplog.records]
    for secret in secrets:
        assert all(secret not in text for text in texts)
    assert str(token_file) not in json.dumps(marker, default=str)
    assert os.environ.get("RUCIO_CONFIG") is None or "password" not in json.dumps(marker)


def _final_outputs(directory: Path) -> pd.DataFrame:
    """QA table of a finished campaign, without paths: products compared to the reference."""
    table = pd.read_csv(directory / "work" / "logs" / "qa" / "qa.csv")
    return table.drop(columns=["detail"]).sort_values(["check", "dataset_type", "data_id", "site"])


def test_6_whole_demo_campaign_with_rucio_equals_butler_backend(local_rucio, tmp_path_factory):
    """The demo campaign, every hand-off through Rucio, ends with the butler backend's final outputs."""
    rucio, storage = local_rucio
    scope = "camp"
    RucioBackend(
        "demo", {"scope": SCOPE, "rses": RSES, "client_config": str(rucio.client_config)}
    ).client.add_scope("root", scope)
    with_rucio = tmp_path_factory.mktemp("campaign-rucio")
    path = rucio_config(with_rucio, rucio, storage)
    config = yaml.safe_load(path.read_text())
    del config["sites"]["lancs"]
    config["transfer"]["rucio"]["scope"] = scope
    for name, site in config["sites"].items():
        site["repo"] = str(storage / name / scope)
        site["create_repo"] = True
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with_butler = tmp_path_factory.mktemp("campaign-butler")
    demo_config(with_butler)
    snakemake(with_rucio, timeout=1800)
    handoffs = sorted((with_rucio / "work" / "markers" / "handoff").glob("*/*.json"))
    assert len(handoffs) == 12
    for marker in handoffs:
        content = read_marker(marker)
        if content["backend"] == "rucio":
            assert content["backend_details"]["rucio"]["rule_id"]
            assert rucio.password not in marker.read_text()
    snakemake(with_butler, timeout=1800)
    pd.testing.assert_frame_equal(
        _final_outputs(with_rucio).reset_index(drop=True), _final_outputs(with_butler).reset_index(drop=True)
    )
    qa = read_marker(with_rucio / "work" / "markers" / "qa" / "qa.json")
    assert all(set(counts) == {"pass"} for counts in qa["summary"].values()), qa["summary"]
