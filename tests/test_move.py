"""Moving units in a running campaign: what may move, what stays, and what the move writes.

On the demo's config with a small synthetic placement (raws and the patches they
overlap), marker files standing for work begun, and a real repository where a chunk
is retired. The end-to-end move (a site drained
in the middle of its step1 onto a fifth site, the campaign ending with the single-site
reference's results) is in test_per_chunk, on its campaign.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import yaml
from lsst.daf.butler import Butler

from multisite.butler_utils import collection_exists, ensure_in_chain
from multisite.cli import main
from multisite.config import load_campaign
from multisite.errors import CampaignConfigError, PlanChangedError
from multisite.layout import step_id
from multisite.lock import HEARTBEAT_MISSES, Owner, live_steps, write_heartbeat
from multisite.markers import read_marker, write_marker
from multisite.move import (
    MoveRefused,
    apply_move,
    drain,
    format_move,
    move_units,
    plan_move,
    recorded_placement,
)
from multisite.placement import place_raws, read_placement, write_plan
from multisite.plan_version import check_plan_unchanged, plan_version, recorded_plan

from .conftest import demo_config

# (exposure, visit, detector, tract, patch): a raw and a patch it overlaps.
ROWS = [
    (1, 1, 0, 0, 2),  # ral's t0p2 and t0p5
    (1, 1, 0, 0, 5),
    (1, 1, 1, 0, 2),  # t0p2 (ral) and t0p3 (lancs): owned by ral
    (1, 1, 1, 0, 3),
    (2, 2, 0, 0, 5),  # t0p5 only
    (3, 3, 0, 0, 1),  # t0p1 (in2p3) and t0p5: owned by in2p3
    (3, 3, 0, 0, 5),
    (4, 4, 0, 0, 4),  # t0p4 (in2p3) only
    (5, 5, 0, 0, 0),  # t0p0 (usdf)
]


def _campaign(tmp_path, step1_units_per_chunk: int = 2, **site_cores: int):
    path = demo_config(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["stages"][0]["units_per_chunk"] = step1_units_per_chunk
    for site, cores in site_cores.items():
        config["sites"][site]["cores"] = cores
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return load_campaign(path)


def _with_sites(campaign, **sites: str):
    """Return the campaign with some units at other sites (as a hand-edited table would have them)."""
    units = tuple(dataclasses.replace(u, site=sites.get(u.name, u.site)) for u in campaign.units)
    return dataclasses.replace(campaign, units=units)


def _planned(campaign) -> pd.DataFrame:
    """Write the campaign's plan (placement, summary, plan marker) as its plan rule would."""
    placement = place_raws(ROWS, campaign).assign(bytes=100)
    layout = campaign.layout
    layout.placement_table.parent.mkdir(parents=True, exist_ok=True)
    record = write_plan(
        campaign, placement, campaign.processing_sites, layout.placement_table, layout.placement_summary
    )
    write_marker(layout.placement_marker, record)
    return placement


def _place(placement: pd.DataFrame):
    return lambda after: place_raws(ROWS, after, previous=placement).assign(bytes=100)


def _done(path) -> None:
    write_marker(path, {"done": True})


def test_a_raw_keeps_its_owner_while_that_site_still_needs_it(tmp_path):
    campaign = _campaign(tmp_path)
    before = place_raws(ROWS, campaign)
    owner = before.drop_duplicates(["exposure", "detector"]).set_index(["exposure", "detector"])["owner"]
    assert owner[(1, 1)] == "ral" and owner[(3, 0)] == "in2p3"
    # t0p3 moves from lancs to in2p3: raw (1, 1) is needed by in2p3 (first in order) and ral.
    moved = _with_sites(campaign, t0p3="in2p3")
    assert place_raws(ROWS, moved).query("exposure == 1 and detector == 1")["owner"].iloc[0] == "in2p3"
    kept = place_raws(ROWS, moved, previous=before)
    assert set(kept.query("exposure == 1 and detector == 1")["owner"]) == {"ral"}
    assert set(kept.query("exposure == 1 and detector == 1")["site"]) == {"ral", "in2p3"}
    # A raw whose owner no longer needs it goes to the first site that does (a hand-edited table)...
    gone = _with_sites(campaign, t0p1="lancs")
    assert set(place_raws(ROWS, gone, previous=before).query("exposure == 3")["owner"]) == {"ral"}
    # ... and, after a move, to the site of the moved unit that needs it: into its new chunk,
    # leaving ral's chunk of t0p5, which may have begun, as it was.
    units = tuple(
        dataclasses.replace(u, site="lancs", move=1) if u.name == "t0p1" else u for u in campaign.units
    )
    moved = dataclasses.replace(campaign, units=units)
    assert set(place_raws(ROWS, moved, previous=before).query("exposure == 3")["owner"]) == {"lancs"}


def test_a_move_that_changes_data_that_left_its_site_is_refused_naming_it(tmp_path):
    campaign = _campaign(tmp_path)  # step1: ral's one chunk c0000 holds t0p2 and t0p5
    placement = _planned(campaign)
    layout = campaign.layout
    # A chunk done, its raws arrived: it is retired, the raws stay (t0p2 still needs some).
    _done(layout.chunk_marker("ral", "step1", "c0000"))
    _done(layout.handoff_marker("raws", "ral", "c0000"))
    move = plan_move(campaign, {"t0p5": "lancs"}, placement, _place(placement))
    assert move.retired == {("ral", "step1", "c0000"): "done"}
    assert ("ral", "step1", "c0000") in move.remade  # t0p2 runs again, alone
    assert "retire step1 c0000 at ral (done): never sent; its RUNs go to DemoCam/runs/demo/ral/retired/" in (
        format_move(move)
    )
    # Its fan-in sent: the data left ral, the move is refused naming the piece.
    _done(layout.sent_marker("fanin_step2", "ral", "c0000"))
    with pytest.raises(
        MoveRefused, match=r"hand-off fanin_step2/ral/c0000 \(units t0p2, t0p5\): sent; "
    ) as refused:
        plan_move(campaign, {"t0p5": "lancs"}, placement, _place(placement))
    assert "multisite move --from SITE" in str(refused.value)
    # Raws on their way to lancs (an attempt's log, no marker) would change: refused.
    layout.sent_marker("fanin_step2", "ral", "c0000").unlink()
    log = layout.handoff_log("raws", "lancs", "c0000")
    log.parent.mkdir(parents=True)
    log.write_text("importing\n")
    with pytest.raises(MoveRefused, match=r"hand-off raws/lancs/c0000 \(units t0p3\): attempted; "):
        plan_move(campaign, {"t0p3": "ral"}, placement, _place(placement))
    with pytest.raises(MoveRefused, match="unit 't0p9' is not in the units table"):
        plan_move(campaign, {"t0p9": "lancs"}, placement, _place(placement))
    with pytest.raises(MoveRefused, match="site 'cam' is not in the config; add its block"):
        plan_move(campaign, {"t0p5": "cam"}, placement, _place(placement))


def test_a_unit_whose_final_products_were_delivered_stays_and_nothing_is_written(tmp_path):
    campaign = _campaign(tmp_path)
    placement = _planned(campaign)
    _done(campaign.layout.handoff_marker("final", "ral", "t0p2"))
    move = plan_move(campaign, {"t0p2": "lancs"}, placement, _place(placement))
    assert not move.moves and not move.retired and move.after is campaign
    assert move.stays == {"t0p2": "delivered (hand-off final/ral/t0p2 arrived)"}
    assert "nothing to move" in format_move(move)
    assert drain(campaign, "ral", ["lancs"]) == (
        {"t0p5": "lancs"},
        {"t0p2": "delivered (hand-off final/ral/t0p2 arrived)"},
    )


def test_a_retired_chunk_leaves_the_campaign_with_nothing_deleted(tmp_path):
    """Its RUNs leave its chain (and the stage's) for the retired chain; its files go aside."""
    campaign = _campaign(tmp_path)
    placement = _planned(campaign)
    layout = campaign.layout
    repo = Butler.makeRepo(campaign.sites["ral"].repo)
    chunk_chain, stage_chain = (
        campaign.stage_chain("ral", "step1", "c0000"),
        campaign.stage_chain("ral", "step1"),
    )
    run = f"{chunk_chain}/20261203T000000Z"
    with Butler.from_config(repo, writeable=True) as butler:
        butler.collections.register(run)
        ensure_in_chain(butler, chunk_chain, [run])
        ensure_in_chain(butler, stage_chain, [chunk_chain])
    files = [
        layout.chunk_marker("ral", "step1", "c0000"),
        layout.stage_marker("ral", "step1"),
        layout.submit_dir("ral", "step1", "c0000") / "attempt" / "job.log",
    ]
    for path in files:
        _done(path)
    version = plan_version(campaign)

    move = plan_move(campaign, {"t0p5": "lancs"}, placement, _place(placement))
    apply_move(move)
    with Butler.from_config(repo) as butler:
        assert not collection_exists(butler, chunk_chain)
        assert butler.collections.get_info(stage_chain).children == ()
        retired = f"{campaign.root_collection}/ral/retired/{version}/step1/c0000"
        assert butler.collections.get_info(retired).children == (run,)
    for path in files:
        assert not path.exists()
        assert (layout.retired_dir(version) / path.relative_to(layout.workdir)).is_file()
    assert read_marker(layout.placement_marker)["moves"][0]["retired"] == [["ral", "step1", "c0000"]]


def test_a_move_of_units_not_begun_rewrites_the_plan_and_the_changed_chunks_yamls(tmp_path):
    campaign = _campaign(tmp_path)
    placement = _planned(campaign)
    layout = campaign.layout
    # ral's step1 YAML was written (not submitted); lancs's chunk ran.
    yaml_path = layout.submit_yaml("ral", "step1", "c0000")
    yaml_path.parent.mkdir(parents=True)
    yaml_path.write_text("# chunk c0000: t0p2, t0p5\n")
    _done(layout.chunk_marker("lancs", "step1", "c0000"))

    # The table's comments: a preamble, one before t0p5's row and one on it, one at the end.
    header, *rows = campaign.units_table.read_text().splitlines()
    t0p5 = rows.pop()
    lines = [
        "# sky units of the demo",
        header,
        *rows,
        "# the last patch",
        f"{t0p5} # one of two at ral",
        "# end",
    ]
    campaign.units_table.write_text("\n".join(lines) + "\n")

    move = plan_move(campaign, {"t0p5": "lancs"}, placement, _place(placement))
    assert move.moves == {"t0p5": ("ral", "lancs")}
    # lancs's t0p5 goes after its t0p3, in a chunk of its own: lancs's done chunk keeps its unit.
    assert ("lancs", "step1", "c0001") in move.remade and ("ral", "step1", "c0000") in move.remade
    assert ("lancs", "step1", "c0000") not in move.remade
    preview = format_move(move)
    assert "move  t0p5: ral -> lancs (its raws go from usdf)" in preview

    apply_move(move)
    after = load_campaign(tmp_path / "config.yaml")
    assert [(u.name, u.site) for u in after.units_of("lancs")] == [("t0p3", "lancs"), ("t0p5", "lancs")]
    check_plan_unchanged(after)  # the units table is the plan now
    written_lines = campaign.units_table.read_text().splitlines()
    assert written_lines[:2] == ["# sky units of the demo", "unit\ttract\tpatch\tsite\tmove"]
    at = written_lines.index("t0p5\t0\t5\tlancs\t1 # one of two at ral")
    assert written_lines[at - 2 : at] == ["t0p3\t0\t3\tlancs\t", "# the last patch"]
    assert written_lines[-2:] == ["t0p4\t0\t4\tin2p3\t", "# end"]
    marker = read_marker(layout.placement_marker)
    assert marker["plan_version"] == plan_version(after) != plan_version(campaign)
    assert marker["moves"][0]["units"] == {"t0p5": ["ral", "lancs"]}
    assert not yaml_path.exists()
    written = read_placement(layout.placement_table)
    assert set(written.query("exposure == 2")["site"]) == {"lancs"}
    assert set(written.query("exposure == 1 and detector == 1")["owner"]) == {"ral"}


def test_a_drain_moves_what_has_not_begun_and_shares_it_by_cores(tmp_path):
    campaign = _campaign(tmp_path, step1_units_per_chunk=1, lancs=3000)
    placement = _planned(campaign)
    layout = campaign.layout
    _done(layout.sent_marker("fanin_step2", "in2p3", "t0p1"))  # t0p1's fan-in sent: it stays
    destinations, stays = drain(campaign, "in2p3", ["ral", "lancs"])
    assert destinations == {"t0p4": "ral"} and stays == {"t0p1": "hand-off fanin_step2/in2p3/t0p1: sent"}
    layout.sent_marker("fanin_step2", "in2p3", "t0p1").unlink()
    _done(layout.handoff_marker("raws", "in2p3", "t0p1"))  # arrived raws, a chunk done: they move
    _done(layout.chunk_marker("in2p3", "step1", "t0p1"))
    destinations, _ = drain(campaign, "in2p3", ["ral", "lancs"])
    assert destinations == {"t0p1": "ral", "t0p4": "lancs"}  # equal cores: one each, in order
    move = plan_move(campaign, destinations, placement, _place(placement), stays)
    assert set(move.moves) == {"t0p1", "t0p4"} and set(move.retired) == {("in2p3", "step1", "t0p1")}


def test_a_changed_units_table_is_refused_naming_the_units_and_the_move_command(tmp_path):
    campaign = _campaign(tmp_path)
    _planned(campaign)
    table = campaign.units_table.read_text().replace("t0p5\t0\t5\tral", "t0p5\t0\t5\tlancs")
    campaign.units_table.write_text(table)
    with pytest.raises(PlanChangedError) as refused:
        check_plan_unchanged(load_campaign(tmp_path / "config.yaml"))
    assert "unit t0p5 moved from ral to lancs" in str(refused.value)
    assert "multisite move <config> --unit U... --to SITE" in str(refused.value)


def test_a_move_cut_short_before_its_plan_marker_is_done_again_whole(tmp_path, monkeypatch):
    campaign = _campaign(tmp_path)
    placement = _planned(campaign)
    move = plan_move(campaign, {"t0p5": "lancs"}, placement, _place(placement))

    def full_disk_at_the_plan_marker(path, content):
        if Path(path) == campaign.layout.placement_marker:
            raise OSError(28, "No space left on device")
        write_marker(path, content)

    monkeypatch.setattr("multisite.move.write_marker", full_disk_at_the_plan_marker)
    with pytest.raises(OSError, match="No space left"):
        apply_move(move)
    monkeypatch.undo()
    # The table and the placement were rewritten, the plan marker was not: the workflow refuses.
    edited = load_campaign(tmp_path / "config.yaml")
    with pytest.raises(CampaignConfigError, match="cut short before it wrote the plan") as refused:
        check_plan_unchanged(edited)
    assert "t0p5 ral -> lancs" in str(refused.value)
    assert "`multisite move <config> --unit t0p5 --to lancs`" in str(refused.value)
    # The move starts again from the recorded plan and its placement, kept aside.
    recorded = recorded_plan(edited)
    assert recorded is not None and recorded.units == campaign.units
    assert recorded_placement(recorded).equals(placement)
    again = plan_move(recorded, {"t0p5": "lancs"}, recorded_placement(recorded), _place(placement))
    assert again.moves == move.moves and again.placement.equals(move.placement)
    apply_move(again)
    assert not campaign.layout.move_in_progress.exists()
    check_plan_unchanged(load_campaign(tmp_path / "config.yaml"))
    assert read_marker(campaign.layout.placement_marker)["plan_version"] == plan_version(move.after)
    # A table with other units is no move: nothing to start from.
    table = campaign.units_table.read_text().replace("t0p5\t0\t5", "t0p9\t0\t5")
    campaign.units_table.write_text(table)
    assert recorded_plan(load_campaign(tmp_path / "config.yaml")) is None


def test_a_move_is_made_at_the_central_sites_instance_only(tmp_path):
    """The plan marker names the instance of its work directory; another site's instance is refused."""
    campaign = _campaign(tmp_path)
    _planned(campaign)
    layout = campaign.layout
    marker = read_marker(layout.placement_marker)
    write_marker(layout.placement_marker, marker | {"instance": "ral"})
    with pytest.raises(MoveRefused, match="a move is made at the central site's instance \\(usdf\\)"):
        move_units(campaign, "ral.yaml", from_site="ral", to=["lancs"])
    # A plan marker made before markers named their instance, in a work directory that sends to others.
    write_marker(layout.placement_marker, {k: v for k, v in marker.items() if k != "instance"})
    (layout.markers / "sent").mkdir()
    with pytest.raises(MoveRefused, match='add "instance": "<this instance\'s site>" to it'):
        move_units(campaign, "usdf.yaml", from_site="ral", to=["lancs"])


def test_a_move_waits_for_jobs_that_outlived_their_workflow(tmp_path, capsys, monkeypatch):
    """A batch job goes on after its Snakemake was killed: its live heartbeat refuses the move."""
    campaign = _campaign(tmp_path)
    _planned(campaign)
    layout = campaign.layout
    table = campaign.units_table.read_text()
    heartbeat = layout.heartbeat(
        "all", step_id("run_stage", {"site": "ral", "stage": "step1", "chunk": "c0000"})
    )
    job = Owner.this_process("all")  # alive, like a job still running on a batch node
    write_heartbeat(heartbeat, job, 30)
    monkeypatch.chdir(tmp_path)
    assert main(["move", "config.yaml", "--unit", "t0p5", "--to", "lancs"]) == 1
    refused = capsys.readouterr().err
    assert refused.startswith("Nothing was moved: config.yaml: jobs of ") and "scancel, condor_rm" in refused
    assert f"heartbeats/all/run_stage.ral.step1.c0000: process {job.pid} on {job.host}" in refused
    assert campaign.units_table.read_text() == table
    assert read_marker(layout.placement_marker)["plan_version"] == plan_version(campaign)

    # Silent for longer than its beats allow, or its process gone: no longer running.
    assert [step for step, _ in live_steps(layout.heartbeats)] == ["all/run_stage.ral.step1.c0000"]
    assert not live_steps(layout.heartbeats, now=heartbeat.stat().st_mtime + 30 * (HEARTBEAT_MISSES + 1))
    write_heartbeat(heartbeat, dataclasses.replace(job, pid=job.pid + 1_000_000), 30)
    assert not live_steps(layout.heartbeats)
