"""Hand-offs through a real Rucio: server, PostgreSQL, judge and conveyor daemons, all local.

The session fixture starts the Rucio of ``tests/rucio_harness`` (and stops it by
process id at the end); a missing piece fails loudly, it is never skipped. The
tests of this module run in order on the demo's repositories, their registries in
the test Rucio's PostgreSQL (one namespace each), with Rucio datasets of at most
``MAX_FILES`` files: a hand-off end to end, an idempotent rerun, a corrupted source
file, the server stopped in the middle, no secret anywhere, site instances waiting
for each other, a file damaged and one deleted at the destination, caught by the
rerun's verification and repaired through Rucio's own recovery (``multisite
repair``), and a facility's ingest daemon (the stand-in of ``rucio_harness.ingester``)
registering what arrives while the rule waits for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from lsst.daf.butler import Butler, DatasetRef
from lsst.daf.butler.datastores.file_datastore.retrieve_artifacts import ZipIndex
from lsst.resources import ResourcePath
from lsst.rucio.register.rubin_meta import RubinMeta

from multisite.backends import HandoffPayload
from multisite.cli import main
from multisite.config import load_campaign
from multisite.demo.survey import SurveySpec, make_survey
from multisite.errors import DamagedFilesError, HandoffError, RucioHandoffError
from multisite.events import read_events
from multisite.handoff import make_backend, receive_handoff, run_handoff, send_handoff
from multisite.integrity import Manifest, adler32_of
from multisite.layout import Layout
from multisite.placement import compute_placement
from multisite.rucio_backend import RucioBackend
from multisite.sites import prepare_repo
from multisite.status import campaign_status

from .conftest import RSES, SCOPE, rucio_config
from .rucio_harness.ingester import StandInIngester

MAX_FILES = 8  # files per Rucio dataset: the demo's hand-offs take several
IMPORT_BATCH = 7  # raws per part of a hand-off's Butler export: the raws hand-offs take several


@pytest.fixture(scope="module")
def setup(local_rucio, tmp_path_factory):
    rucio, storage = local_rucio
    directory = tmp_path_factory.mktemp("rucio-campaign")
    campaign = load_campaign(
        rucio_config(directory, rucio, storage, max_files_per_dataset=MAX_FILES, import_batch=IMPORT_BATCH)
    )
    for site in campaign.sites:
        prepare_repo(campaign, site)  # on PostgreSQL registries
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
    marker = run_handoff(campaign, "raws", "in2p3", "c0000", placement)
    details = marker["backend_details"]
    assert marker["backend"] == "rucio"
    info = details["rucio"]
    assert info["rule_id"] and info["rule_created"]
    assert info["container"] == f"{SCOPE}:multisite.demo.raws.in2p3.c0000"
    c = client(campaign)
    rule = c.get_replication_rule(info["rule_id"])
    assert rule["state"] == "OK" and rule["rse_expression"] == "IN2P3_BUTLER_DISK"
    assert rule["activity"] == "Data Consolidation" and rule["grouping"] == "DATASET"
    files = list(c.list_files(SCOPE, "multisite.demo.raws.in2p3.c0000"))
    # every raw and the zip of the site's share of the placement, plus the parts of the Butler export
    # of the raws (IMPORT_BATCH raws each) and the manifest
    n_raws = marker["datasets"]["raw"]
    assert marker["datasets"] == {"campaign_placement": 1, "raw": n_raws}
    exports = [  # the head, with the extra records, last
        *(
            f"handoff_exports/demo/raws/in2p3/c0000.{i:05d}.yaml"
            for i in range(1, math.ceil(n_raws / IMPORT_BATCH))
        ),
        "handoff_exports/demo/raws/in2p3/c0000.yaml",
    ]
    assert len(exports) > 1
    own = {*exports, "handoff_exports/demo/raws/in2p3/c0000.manifest.json"}
    assert len(files) == n_raws + 1 + len(own) == info["files"] == details["verified_files"]
    names = {f["name"] for f in files}
    assert own <= names
    assert all(len(f["adler32"]) == 8 and f["bytes"] > 0 for f in files)
    # The manifest, replicated with the files, records what Rucio registered, with each file's dataset.
    manifest = Manifest.read(
        Path(campaign.sites["in2p3"].repo) / "handoff_exports/demo/raws/in2p3/c0000.manifest.json"
    )
    registered = {f["name"]: (f["bytes"], f["adler32"]) for f in files}
    assert manifest.exports == tuple(exports)
    assert {r.name: (r.bytes, r.adler32) for r in manifest.files} == {
        name: value for name, value in registered.items() if name not in own
    }
    raw_files = [r for r in manifest.files if not r.zipped]
    (zipped,) = [r for r in manifest.files if r.zipped]
    assert {r.dataset_type for r in raw_files} == {"raw"} and len(raw_files) == n_raws
    # Registered by lsst-rucio-register: each raw carries Rubin's metadata, which its own models
    # parse back into the very DatasetRef the central Butler holds; the zip is registered as one,
    # and its own index holds that DatasetRef.
    central = Butler.from_config(campaign.central.repo)
    for record in raw_files[:5]:
        meta = RubinMeta.model_validate(c.get_metadata(SCOPE, record.name, plugin="ALL"))
        ref = DatasetRef.from_json(meta.rubin_sidecar, universe=central.dimensions)
        assert ref == central.get_dataset(record.dataset_id)
        assert meta.rubin_butler == "raw_file"
    meta = RubinMeta.model_validate(c.get_metadata(SCOPE, zipped.name, plugin="ALL"))
    assert meta.rubin_butler == "zip_file"
    assert zipped.name == "handoff_exports/demo/raws/in2p3/c0000/00000.zip"
    index = ZipIndex.from_zip_file(ResourcePath(Path(campaign.central.repo) / zipped.name))
    (placement_ref,) = index.refs.to_refs(universe=central.dimensions)
    assert placement_ref == central.get_dataset(zipped.zipped[0])
    assert placement_ref.datasetType.name == "campaign_placement"
    for export in exports:  # each part holds at most IMPORT_BATCH raws' refs
        assert c.get_metadata(SCOPE, export, plugin="ALL")["rubin_butler"] == "dim_file"
        data = yaml.safe_load((Path(campaign.central.repo) / export).read_text())["data"]
        assert 0 < sum(len(item["records"]) for item in data if item["type"] == "dataset") <= IMPORT_BATCH
    # The container hierarchy: campaign > stage > hand-off > its datasets of at most MAX_FILES files,
    # every file in one of them, each closed (the hand-off was sent), the rule on the hand-off's container.
    assert [d["name"] for d in c.list_content(SCOPE, "multisite.demo")] == ["multisite.demo.raws"]
    container = "multisite.demo.raws.in2p3.c0000"
    assert container in [d["name"] for d in c.list_content(SCOPE, "multisite.demo.raws")]
    parts = sorted(d["name"] for d in c.list_content(SCOPE, container))
    assert parts == [f"{container}.{i:05d}" for i in range(math.ceil(len(files) / MAX_FILES))]
    assert len(parts) > 1
    by_part = {part: sorted(f["name"] for f in c.list_files(SCOPE, part)) for part in parts}
    assert all(len(names) == MAX_FILES for names in list(by_part.values())[:-1])
    assert sorted(name for names in by_part.values() for name in names) == sorted(names)
    assert not any(c.get_did(SCOPE, did)["open"] for did in [*parts, "multisite.demo.raws.in2p3.c0000"])
    assert [r["id"] for r in c.list_did_rules(SCOPE, "multisite.demo.raws.in2p3.c0000")] == [info["rule_id"]]
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
    marker = run_handoff(campaign, "raws", "in2p3", "c0000", placement)
    info = marker["backend_details"]["rucio"]
    assert not info["rule_created"] and info["files_registered_now"] == 0
    assert marker["backend_details"]["imported_datasets"] == 0
    assert scope_state(campaign) == before
    dest = Butler.from_config(campaign.sites["in2p3"].repo)
    assert len(dest.query_datasets("raw", collections=campaign.raw_collection, limit=None)) == n_before
    # Sent again with its export cut otherwise (transfer.import_batch changed): refused, nothing changed.
    other = RucioBackend(campaign.name, campaign.rucio, import_batch=IMPORT_BATCH * 100)
    with pytest.raises(
        RucioHandoffError, match="Set transfer.import_batch back to the value it was sent with"
    ):
        run_handoff(campaign, "raws", "in2p3", "c0000", placement, backend=other)
    assert scope_state(campaign) == before


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
    truths = butler.query_all_datasets(campaign.truth_collection, limit=None)  # processed: in a zip
    paths = [
        Path(butler.getURI(refs[0]).ospath),
        Path(central.repo) / "handoff_exports/demo/corrupt/ral/all/00000.zip",
    ]
    backend = make_backend(campaign)
    rucio.pause_daemons()
    try:
        payload = HandoffPayload.of([*refs, *truths])
        thread, outcome = _deliver_in_thread(backend, central, ral, payload, "corrupt/ral/all")
        _wait_for_rule(campaign, "multisite.demo.corrupt.ral.all")
        # A raw and the zip go bad at the source after registration (same size, other bytes).
        originals = [path.read_bytes() for path in paths]
        for path, original in zip(paths, originals, strict=True):
            damaged = bytearray(original)
            damaged[len(damaged) // 2] ^= 0xFF
            path.write_bytes(bytes(damaged))
    finally:
        rucio.resume_daemons()
    thread.join(300)
    for path, original in zip(paths, originals, strict=True):
        path.write_bytes(original)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, RucioHandoffError), outcome
    message = str(error)
    assert "STUCK" in message and "checksum mismatch" in message, message
    assert all(str(path.relative_to(central.repo)) in message for path in paths), message
    assert "Nothing from this hand-off was ingested" in message
    assert nothing_of(ral.repo, [*refs, *truths])
    assert rucio.password not in message


def test_4_server_outage_is_ridden_out_or_named_then_rerun_completes_without_duplicates(setup, caplog):
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
    # An outage longer than the wait's timeout: a clear error naming it, nothing ingested.
    short = dataclasses.replace(make_backend(campaign).settings, timeout=3.0, poll_interval=0.5)
    rucio.pause_daemons()
    try:
        thread, outcome = _deliver_in_thread(
            RucioBackend(campaign.name, short, import_batch=campaign.import_batch),
            central,
            lancs,
            HandoffPayload.of(refs),
            "outage/lancs/all",
        )
        rule_id = _wait_for_rule(campaign, "multisite.demo.outage.lancs.all")
        rucio.stop_server()
        thread.join(300)
        assert not thread.is_alive()
        error = outcome.get("error")
        assert isinstance(error, RucioHandoffError), outcome
        assert "Rucio call failed" in str(error) and "unreachable for" in str(error), str(error)
        assert "rerun" in str(error) and rucio.password not in str(error)
        assert nothing_of(lancs.repo, refs)

        # The rerun starts while the server is still down, and rides the outage out.
        caplog.set_level(logging.WARNING, logger="multisite.rucio_backend")
        thread, outcome = _deliver_in_thread(
            make_backend(campaign), central, lancs, HandoffPayload.of(refs), "outage/lancs/all"
        )
        time.sleep(5)
        assert thread.is_alive(), outcome
        rucio.start_server()
    finally:
        rucio.resume_daemons()
    before = scope_state(campaign)
    thread.join(300)
    assert not thread.is_alive()
    assert "result" in outcome, outcome
    info = outcome["result"][0]["rucio"]
    assert info["rule_id"] == rule_id and not info["rule_created"] and info["files_registered_now"] == 0
    assert any("Rucio unreachable" in r.getMessage() for r in caplog.records)
    assert scope_state(campaign) == before
    assert [r["id"] for r in client(campaign).list_did_rules(SCOPE, "multisite.demo.outage.lancs.all")] == [
        rule_id
    ]
    dest = Butler.from_config(lancs.repo, writeable=True)
    assert all(dest.stored_many(refs).values())
    assert len(dest.query_datasets("raw", collections=campaign.raw_collection, limit=None)) == len(refs)


def test_5_no_secret_in_logs_or_markers(setup, caplog, tmp_path):
    campaign, placement, rucio = setup
    caplog.set_level(logging.DEBUG)
    marker = run_handoff(campaign, "raws", "ral", "c0000", placement)
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


def test_6_site_instances_wait_for_what_another_sends(setup, caplog):
    """The receiving half waits for the sender, says so, and times out clearly; then the halves meet."""
    campaign, placement, rucio = setup
    # As the ral instance sees it: a short wait, and the events of that instance.
    at_ral = dataclasses.replace(campaign, instance="ral", wait_timeout=3.0, wait_interval=0.5)
    with pytest.raises(HandoffError, match="usdf has not sent it after 3 s") as failure:
        receive_handoff(at_ral, "fanout_step3", "ral", "t0p2")
    assert "transfer.wait.timeout_s" in str(failure.value)
    (waiting,) = [e for e in read_events([at_ral.layout.event_log("ral")]) if e.kind == "waiting"]
    assert waiting.step == Layout.handoff_step("fanout_step3", "ral", "t0p2")
    assert waiting.details["source"] == "usdf"
    assert "waiting for fanout_step3 from usdf since" in waiting.message
    cells = campaign_status(at_ral, read_events([at_ral.layout.event_log("ral")]), site="ral")
    (cell,) = [c for c in cells if c.step == Layout.handoff_step("fanout_step3", "ral", "t0p2")]
    assert cell.state == "waiting" and "from usdf" in cell.detail and cell.since

    # The USDF instance sends the raws; the lancs instance, started first, receives them when they come.
    at_usdf = dataclasses.replace(campaign, instance="usdf")
    at_lancs = dataclasses.replace(campaign, instance="lancs", wait_timeout=300.0, wait_interval=0.5)
    outcome: dict = {}
    receiver = threading.Thread(
        target=lambda: outcome.update(marker=receive_handoff(at_lancs, "raws", "lancs", "c0000"))
    )
    receiver.start()
    time.sleep(2)
    assert receiver.is_alive(), outcome
    sent = send_handoff(at_usdf, "raws", "lancs", "c0000", placement)
    receiver.join(300)
    marker = outcome["marker"]
    assert sent["datasets"] == marker["datasets"] and marker["datasets"]["campaign_placement"] == 1
    assert marker["backend_details"]["rucio"]["destination_rse"] == "LANCS_BUTLER_DISK"
    # The lancs instance now has its share of the placement, from its own repository only.
    share = Butler.from_config(campaign.sites["lancs"].repo).get(
        "campaign_placement", collections=campaign.handoff_chain("lancs")
    )
    assert set(share["site"]) >= {"lancs"} and set(share[share["site"] == "lancs"]["unit"]) == {"t0p3"}


def test_7_damaged_files_at_the_destination_are_caught_then_repaired_through_rucio(setup, capsys):
    """A rerun re-verifies against Rucio's adler32; ``multisite repair`` has Rucio recover the files."""
    campaign, placement, rucio = setup
    in2p3 = campaign.sites["in2p3"]
    root, central = Path(in2p3.repo), Path(campaign.central.repo)
    dest = Butler.from_config(in2p3.repo)
    refs = dest.query_datasets("raw", collections=campaign.raw_collection, limit=None)
    n_datasets = len(dest.query_datasets("raw", collections="*", find_first=False, limit=None))
    flipped, deleted = (Path(dest.getURI(ref).ospath) for ref in refs[:2])
    damaged = bytearray(flipped.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    flipped.write_bytes(bytes(damaged))
    deleted.unlink()
    names = [str(path.relative_to(root)) for path in (flipped, deleted)]

    # A rerun of the hand-off does not say "nothing to do": it re-verifies, and names both files.
    with pytest.raises(DamagedFilesError) as caught:
        run_handoff(campaign, "raws", "in2p3", "c0000", placement)
    message = str(caught.value)
    for name, ref, problem in zip(names, refs[:2], ("same size, other content", "missing"), strict=True):
        line = next(line for line in message.splitlines() if name in line)
        assert "(raw {" in line and f"exposure: {ref.dataId['exposure']}" in line and problem in line, line
    assert "multisite repair <campaign config> --site in2p3" in message
    assert rucio.password not in message

    # The operator's repair: Rucio's own recovery, no copy behind its back.
    before = scope_state(campaign)
    config = Path(campaign.workdir).parent / "config.yaml"
    assert main(["repair", str(config), "--site", "in2p3"]) == 0
    out = capsys.readouterr().out
    assert f"{'raws/in2p3/c0000':24s} from usdf     repaired" in out, out
    assert "2 fetched again and verified" in out, out
    for name in names:
        assert name in out
        assert adler32_of(root / name) == adler32_of(central / name)
        assert (root / name).read_bytes() == (central / name).read_bytes()
    daemons_log = (rucio.logs / "daemons.log").read_text()
    assert all(f"File {SCOPE}:{name} can be recovered" in daemons_log for name in names)
    c = client(campaign)
    states = {
        r["name"]: r["states"].get("IN2P3_BUTLER_DISK")
        for r in c.list_replicas([{"scope": SCOPE, "name": name} for name in names], all_states=True)
    }
    assert states == dict.fromkeys(names, "AVAILABLE")
    assert scope_state(campaign) == before  # no new DID, no new rule: the same rule, back to OK

    # The hand-off now verifies, and imports nothing twice.
    marker = run_handoff(campaign, "raws", "in2p3", "c0000", placement)
    assert marker["backend_details"]["imported_datasets"] == 0
    assert marker["backend_details"]["verified_files"] == marker["backend_details"]["rucio"]["files"]
    assert not marker["backend_details"]["rucio"]["rule_created"]
    dest = Butler.from_config(in2p3.repo)
    assert len(dest.query_datasets("raw", collections="*", find_first=False, limit=None)) == n_datasets


def test_8_the_facility_ingests_what_arrives_and_the_rule_waits_for_it(setup):
    """``transfer.rucio.ingest: facility``: the facility's daemon registers the files, the rule verifies."""
    campaign, placement, rucio = setup
    central, ral = campaign.central, campaign.sites["ral"]
    butler = Butler.from_config(central.repo)
    at_ral = Butler.from_config(ral.repo)
    raws_elsewhere = [
        ref
        for ref in butler.query_datasets("raw", collections=campaign.raw_collection, limit=None)
        if at_ral.get_dataset(ref.id) is None
    ]
    truths = butler.query_all_datasets(campaign.truth_collection, limit=None)  # processed: in a zip
    assert truths and nothing_of(ral.repo, truths)
    # two Rucio datasets with the zip, the export and the manifest
    refs = raws_elsewhere[: MAX_FILES + 1] + truths
    assert len(refs) == MAX_FILES + 1 + len(truths)
    facility = dataclasses.replace(make_backend(campaign).settings, ingest="facility", timeout=30.0)
    # No daemon: the files arrive and are verified, then the wait ends naming what is missing; the
    # workflow registered nothing itself.
    with pytest.raises(RucioHandoffError) as failure:
        RucioBackend(campaign.name, facility).deliver(
            central, ral, HandoffPayload.of(refs), "facility/ral/all"
        )
    message = str(failure.value)
    assert "ingest daemon (transfer.rucio.ingest: facility) has not registered" in message, message
    assert f"{len(refs)} of {len(refs)} datasets" in message and str(truths[0].id) in message
    assert "transfer.rucio.ingest: workflow" in message
    assert nothing_of(ral.repo, refs)

    # The stand-in daemon ingests from the Rucio metadata alone; the rerun waits for it and completes.
    ingester = StandInIngester(client(campaign), SCOPE, campaign.rucio["rses"]["ral"], ral.repo)
    daemon = threading.Thread(target=ingester.run)
    daemon.start()
    try:
        details, _ = RucioBackend(campaign.name, dataclasses.replace(facility, timeout=120.0)).deliver(
            central, ral, HandoffPayload.of(refs), "facility/ral/all"
        )
    finally:
        ingester.stop.set()
        daemon.join(60)
    assert details["ingested_by"] == "facility" and details["imported_datasets"] == 0
    assert not details["rucio"]["rule_created"]  # the rule of the first attempt
    dest = Butler.from_config(ral.repo)
    assert all(dest.stored_many(refs).values())
    for ref in refs[:3]:
        assert dest.get_dataset(ref.id) == ref
        assert (dest.get(ref).pixels == butler.get(ref).pixels).all()
    for ref in truths:  # ingested by the daemon from the zip, where Rucio put it
        assert dest.get_dataset(ref.id) == ref
        assert "handoff_exports/demo/facility/ral/all/" in str(dest.getURI(ref))
        got, sent = dest.get(ref), butler.get(ref)
        assert (got.as_array() == sent.as_array()).all() if hasattr(got, "as_array") else got == sent


def _reply_lost(function):
    """Return ``function``, doing its work on the server but losing its first reply (a server restart)."""
    calls = []

    def call(*args, **kwargs):
        result = function(*args, **kwargs)
        calls.append(args)
        if len(calls) == 1:
            raise requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected())")
        return result

    return call


def _down_once(function):
    """Return ``function``, failing its first call as an unreachable server does."""
    calls = []

    def call(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise requests.exceptions.ConnectionError("Connection refused")
        return function(*args, **kwargs)

    return call


def test_9_a_call_whose_reply_an_outage_lost_finds_its_work_done_when_retried(setup, monkeypatch):
    """Retried after a lost reply, a creation that had happened is taken as done, not as a failure.

    As when the server stops in the middle of a call (test_instances met it): the DID,
    the attachment and the rule exist once; and a hand-off not sent yet, looked up again
    once the server is back, reads as not sent.
    """
    campaign, _, _ = setup
    backend = RucioBackend(campaign.name, campaign.rucio)
    c = backend.client
    container, dataset = "multisite.demo.lost_reply.lancs.t0p3", "multisite.demo.lost_reply.lancs.t0p3.00000"
    backend._ensure_did(_reply_lost(c.add_container), container)
    backend._ensure_did(_reply_lost(c.add_dataset), dataset)
    monkeypatch.setattr(c, "attach_dids", _reply_lost(c.attach_dids))
    backend._attach(container, [dataset])
    assert [d["name"] for d in c.list_content(SCOPE, container)] == [dataset]
    monkeypatch.setattr(c, "add_replication_rule", _reply_lost(c.add_replication_rule))
    rule_id, created = backend._ensure_rule(dataset, RSES["usdf"], RSES["lancs"], "lost_reply/lancs/t0p3")
    assert not created and [r["id"] for r in c.list_did_rules(SCOPE, dataset)] == [rule_id]
    monkeypatch.setattr(c, "get_did", _down_once(c.get_did))
    central, lancs = campaign.central, campaign.sites["lancs"]
    assert not backend.published(central, lancs, "lost_reply/lancs/t0p9")
    c.delete_replication_rule(rule_id, purge_replicas=False)
