"""Hand-offs per chunk, and a site drained in the middle of its step1, on one campaign.

The demo with one unit per step1 chunk (and a fifth site, cam, with no units yet):
in2p3's two chunks (t0p1, t0p4) each get their own ``raws`` piece and their own
``fanin_step2`` piece. Asking Snakemake for one chunk's fan-in (t0p4's, the site's
second) brings only that chunk's raws, runs that chunk and sends its products; the
other chunk's come when asked for, and nothing moves twice. Then ral runs both its
step1 chunks, is drained with ``multisite move`` onto cam and lancs (both its chunks
retired), and the campaign ends with the single-site reference's results; moving a
delivered unit then changes nothing. The drain runs twice: on this campaign, and on the
same campaign through the test Rucio (its own scope; cam with an RSE of its own).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from lsst.daf.butler import Butler

from multisite.butler_utils import collection_exists
from multisite.config import load_campaign
from multisite.events import read_events
from multisite.layout import Layout
from multisite.markers import read_marker
from multisite.placement import read_placement
from multisite.plan_version import plan_version
from multisite.rucio_backend import RucioBackend
from multisite.status import campaign_status

from .conftest import BIN, JOINING_RSES, REPO, RSES, demo_config, rucio_config, snakemake


def _raws_at(campaign, site: str) -> list[tuple[int, int]]:
    butler = Butler.from_config(campaign.sites[site].repo)
    chain = campaign.handoff_chain(site)
    found = butler.query_datasets("raw", collections=chain, find_first=False, limit=None)
    return sorted((ref.dataId["exposure"], ref.dataId["detector"]) for ref in found)


def _one_unit_a_chunk_and_cam(path: Path, cam: dict) -> Path:
    """Give the demo config at ``path`` one unit a step1 chunk, and cam: a fifth site, with lancs's cores."""
    config = yaml.safe_load(path.read_text())
    config["stages"][0]["units_per_chunk"] = 1
    config["sites"]["cam"] = {"role": "remote", "create_repo": True, "bps": {}, "cores": 1000, **cam}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path.parent


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory) -> Path:
    """Return the demo (butler backend) with one unit a step1 chunk, and cam (own repository)."""
    directory = tmp_path_factory.mktemp("per_chunk")
    return _one_unit_a_chunk_and_cam(
        demo_config(directory), {"repo": str(directory / "work" / "sites" / "cam" / "repo")}
    )


@pytest.fixture(scope="module")
def rucio_campaign_dir(local_rucio, tmp_path_factory) -> Path:
    """Return the same campaign through the test Rucio, in its own scope; cam has its own RSE."""
    rucio, storage = local_rucio
    directory = tmp_path_factory.mktemp("per_chunk_rucio")
    scope = "move"
    path = rucio_config(directory, rucio, storage, scope=scope)
    config = yaml.safe_load(path.read_text())
    config["transfer"]["rucio"]["rses"] |= JOINING_RSES
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    usdf_registry = config["sites"]["usdf"]["registry"]
    registry = dict(usdf_registry, namespace=usdf_registry["namespace"].removesuffix("usdf") + "cam")
    return _one_unit_a_chunk_and_cam(path, {"repo": str(storage / "cam" / scope), "registry": registry})


def test_a_step1_chunk_runs_and_sends_its_fanin_before_the_other_chunks_raws_arrive(campaign_dir):
    campaign = load_campaign(campaign_dir / "config.yaml")
    layout = campaign.layout

    preview = snakemake(campaign_dir, "-n").stdout
    for piece in ("t0p1", "t0p4"):
        assert f"wildcards: handoff=raws, site=in2p3, piece={piece}" in preview, preview[-3000:]

    first, fanin = (
        layout.chunk_marker("in2p3", "step1", "t0p4"),
        layout.handoff_marker("fanin_step2", "in2p3", "t0p4"),
    )
    snakemake(campaign_dir, str(fanin.relative_to(campaign_dir)))
    assert first.exists() and read_marker(first)["quanta_run"] > 0
    # The chunk's products reached the central site, before the site's other chunk ran.
    assert read_marker(fanin)["datasets"]["single_visit_star"] > 0
    assert not layout.chunk_marker("in2p3", "step1", "t0p1").exists()
    assert layout.handoff_marker("raws", "in2p3", "t0p4").exists()
    assert not layout.handoff_marker("raws", "in2p3", "t0p1").exists()
    # The piece held exactly its chunk's raws.
    placement = read_placement(layout.placement_table)
    at_in2p3 = placement[placement["site"] == "in2p3"]

    def share(units: list[str]) -> list[tuple[int, int]]:
        rows = at_in2p3[at_in2p3["unit"].isin(units)]
        return sorted(zip(rows["exposure"].astype(int), rows["detector"].astype(int), strict=True))

    assert _raws_at(campaign, "in2p3") == share(["t0p4"]) != []
    # Its raws are of two of the camera's four detectors; its visits' regions name all four.
    assert len({detector for _, detector in share(["t0p4"])}) < 4
    events = read_events([layout.event_log("all")])
    steps = {event.step for event in events}
    assert Layout.chunk_step("in2p3", "step1", "t0p4") in steps
    assert Layout.handoff_step("fanin_step2", "in2p3", "t0p4") in steps
    assert Layout.handoff_step("raws", "in2p3", "t0p1") not in steps

    # The other chunk brings its own pieces, and nothing moves twice.
    finished = {path: path.stat().st_mtime_ns for path in (first, fanin)}
    second = layout.handoff_marker("fanin_step2", "in2p3", "t0p1")
    snakemake(campaign_dir, str(second.relative_to(campaign_dir)))
    assert second.exists() and {path: path.stat().st_mtime_ns for path in finished} == finished
    usdf = Butler.from_config(campaign.central.repo)
    stars = usdf.query_datasets(
        "single_visit_star", collections=campaign.handoff_chain("usdf"), find_first=False, limit=None
    )
    ids = [ref.dataId for ref in stars]
    sent = [read_marker(m)["datasets"]["single_visit_star"] for m in (fanin, second)]
    assert len(ids) == len(set(ids)) == sum(sent)
    assert _raws_at(campaign, "in2p3") == share(["t0p1", "t0p4"])
    verified = [read_marker(layout.inputs_marker("in2p3", piece))["raws"] for piece in ("t0p1", "t0p4")]
    assert verified == [len(share(["t0p1"])), len(share(["t0p4"]))]


def _multisite(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "multisite"), *args], capture_output=True, text=True, check=False)
    assert not check or result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("backend", ["butler", "rucio"])
def test_a_site_drained_in_the_middle_of_its_step1_onto_a_new_site_and_another_ends_like_the_reference(
    backend, request
):
    """Drained in the middle of its step1, ral's units go to cam, a fifth site, and to lancs.

    Through either backend: with Rucio, cam's pieces are new datasets and rules to its
    own RSE, and no name ral used is used again.

    ral ran both its step1 chunks and sent nothing (a site that goes down). cam is a
    new site block (its own repository, as many cores as lancs) and nothing else: the
    drain shares ral's two units between cam and lancs by cores, retires both ral's
    chunks (their RUNs out of every chain ral sends from), sends their raws from USDF,
    and the campaign's QA passes against the single-site reference, with the raws ral
    received left as they were and no dataset twice at USDF. Moving a unit once
    delivered then changes nothing. The same drain between site instances, through
    Rucio, is test_instances'.
    """
    campaign_dir = request.getfixturevalue({"butler": "campaign_dir", "rucio": "rucio_campaign_dir"}[backend])
    path = campaign_dir / "config.yaml"
    campaign = load_campaign(path)
    layout = campaign.layout
    begun = [layout.chunk_marker("ral", "step1", unit) for unit in ("t0p2", "t0p5")]
    snakemake(campaign_dir, *(str(marker.relative_to(campaign_dir)) for marker in begun))
    arrived = [layout.handoff_marker("raws", "ral", unit) for unit in ("t0p2", "t0p5")]
    finished = {marker: marker.stat().st_mtime_ns for marker in arrived}
    version = plan_version(campaign)

    table = (campaign_dir / "units.tsv").read_text()
    preview = _multisite("move", str(path), "--from", "ral", "--to", "cam,lancs", "--dry-run").stdout
    assert "move  t0p2: ral -> cam" in preview and "move  t0p5: ral -> lancs" in preview, preview
    assert "retire step1 t0p2 at ral (done): never sent" in preview
    assert "retire step1 t0p5 at ral (done): never sent" in preview
    assert (campaign_dir / "units.tsv").read_text() == table
    _multisite("move", str(path), "--from", "ral", "--to", "cam,lancs")
    moved = (campaign_dir / "units.tsv").read_text()
    assert "t0p2\t0\t2\tcam\t1" in moved and "t0p5\t0\t5\tlancs\t1" in moved
    assert all((layout.retired_dir(version) / m.relative_to(layout.workdir)).is_file() for m in begun)

    planned = snakemake(campaign_dir, "-n").stdout
    assert "wildcards: handoff=raws, site=cam, piece=t0p2" in planned
    assert "wildcards: handoff=raws, site=lancs, piece=t0p5" in planned
    assert "site=ral" not in planned
    snakemake(campaign_dir)
    campaign = load_campaign(path)
    assert read_marker(layout.qa_marker)  # the QA passed: equal to the single-site reference
    assert {marker: marker.stat().st_mtime_ns for marker in arrived} == finished
    assert not any(marker.exists() for marker in begun)
    for site, unit in (("cam", "t0p2"), ("lancs", "t0p5")):
        assert read_marker(layout.chunk_marker(site, "step1", unit))["quanta_run"] > 0
        assert layout.handoff_marker("final", site, unit).exists()
    central = Butler.from_config(campaign.central.repo)
    for dataset_type in ("single_visit_star", "deep_coadd"):
        refs = central.query_datasets(
            dataset_type, collections=campaign.handoff_chain("usdf"), find_first=False, limit=None
        )
        assert refs and len(refs) == len({ref.dataId for ref in refs}), dataset_type
    # ral's retired chunks kept their outputs, out of the chains it sends from (gone).
    ral = Butler.from_config(campaign.sites["ral"].repo)
    for unit in ("t0p2", "t0p5"):
        retired = f"{campaign.root_collection}/ral/retired/{version}/step1/{unit}"
        assert ral.query_datasets("single_visit_star", collections=retired, limit=None)
        assert not collection_exists(ral, campaign.stage_chain("ral", "step1", unit))
    cells = {(c.step, c.unit): c for c in campaign_status(campaign)}
    assert (cells[("step1", "t0p2")].site, cells[("step1", "t0p2")].state) == ("cam", "done")
    assert (cells[("step1", "t0p5")].site, cells[("step1", "t0p5")].state) == ("lancs", "done")
    assert not any(cell.site == "ral" for cell in cells.values())
    if backend == "rucio":
        _check_rucio_after_the_drain(campaign)

    # Once delivered, a unit moved stays where it ran: nothing written, nothing to do.
    table = (campaign_dir / "units.tsv").read_text()
    again = _multisite("move", str(path), "--unit", "t0p2", "--to", "ral").stdout
    assert "stays t0p2: delivered (hand-off final/cam/t0p2 arrived)" in again and "nothing to move" in again
    assert (campaign_dir / "units.tsv").read_text() == table
    idle = snakemake(campaign_dir, "-n")
    assert "Nothing to be done" in idle.stdout + idle.stderr


def _check_rucio_after_the_drain(campaign) -> None:
    """Check that the moved units' pieces are datasets of their own, to their new sites' RSEs."""
    client = RucioBackend(campaign.name, campaign.rucio).client
    scope = campaign.rucio["scope"]
    containers = sorted(client.list_dids(scope, {"name": "multisite.demo.*.*"}, did_type="container"))
    rules = {name: list(client.list_did_rules(scope, name)) for name in containers}
    (to_cam,) = rules["multisite.demo.raws.cam.t0p2"]
    assert to_cam["rse_expression"] == JOINING_RSES["cam"] and to_cam["state"] == "OK"
    (to_lancs,) = rules["multisite.demo.raws.lancs.t0p5"]
    assert to_lancs["rse_expression"] == RSES["lancs"] and to_lancs["state"] == "OK"
    # The raws ral received stay where they arrived, their datasets and rules untouched.
    for unit in ("t0p2", "t0p5"):
        (to_ral,) = rules[f"multisite.demo.raws.ral.{unit}"]
        assert to_ral["rse_expression"] == RSES["ral"]
    assert not [name for name in rules if name.split(".")[2] != "raws" and ".ral." in name]
    for name in ("fanin_step2.cam.t0p2", "final.cam.t0p2", "fanin_step2.lancs.t0p5", "final.lancs.t0p5"):
        assert f"multisite.demo.{name}" in rules
    assert all(len(found) <= 1 for found in rules.values()), {n: len(r) for n, r in rules.items()}


def test_chunks_per_handoff_coarsens_the_pieces(tmp_path):
    """Two step1 chunks a piece: in2p3's raws and fan-in each travel as one piece ``t0p1..t0p4``."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["stages"][0]["units_per_chunk"] = 1
    transfer = config["transfer"] | {"chunks_per_handoff": 2}
    demo_config(tmp_path, stages=config["stages"], transfer=transfer)
    preview = snakemake(tmp_path, "-n").stdout
    pieces = set(re.findall(r"wildcards: handoff=(\w+), site=in2p3, piece=(\S+)$", preview, re.M))
    assert pieces == {
        ("raws", "t0p1..t0p4"),
        ("fanin_step2", "t0p1..t0p4"),
        ("fanout_step3", "t0p1..t0p4"),
        ("final", "t0p1..t0p4"),
    }, preview[-3000:]
