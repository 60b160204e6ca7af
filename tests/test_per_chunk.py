"""Hand-offs per chunk: a step1 chunk runs with its own raws, and its fan-in leaves on its own.

The demo with one unit per step1 chunk: in2p3's two chunks (t0p1, t0p4) each get
their own ``raws`` piece and their own ``fanin_step2`` piece. Asking Snakemake for
one chunk's fan-in (t0p4's, the site's second) brings only that chunk's raws, runs
that chunk and sends its products; the other chunk's come when asked for, and
nothing moves twice.
"""

from __future__ import annotations

import re

import yaml
from lsst.daf.butler import Butler

from multisite.config import load_campaign
from multisite.events import read_events
from multisite.layout import Layout
from multisite.markers import read_marker
from multisite.placement import read_placement

from .conftest import REPO, demo_config, snakemake


def _raws_at(campaign, site: str) -> list[tuple[int, int]]:
    butler = Butler.from_config(campaign.sites[site].repo)
    chain = campaign.handoff_chain(site)
    found = butler.query_datasets("raw", collections=chain, find_first=False, limit=None)
    return sorted((ref.dataId["exposure"], ref.dataId["detector"]) for ref in found)


def test_a_step1_chunk_runs_and_sends_its_fanin_before_the_other_chunks_raws_arrive(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["stages"][0]["units_per_chunk"] = 1
    campaign = load_campaign(demo_config(tmp_path, stages=config["stages"]))
    layout = campaign.layout

    preview = snakemake(tmp_path, "-n").stdout
    for piece in ("t0p1", "t0p4"):
        assert f"wildcards: handoff=raws, site=in2p3, piece={piece}" in preview, preview[-3000:]

    first, fanin = (
        layout.chunk_marker("in2p3", "step1", "t0p4"),
        layout.handoff_marker("fanin_step2", "in2p3", "t0p4"),
    )
    snakemake(tmp_path, str(fanin.relative_to(tmp_path)))
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
    snakemake(tmp_path, str(second.relative_to(tmp_path)))
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
