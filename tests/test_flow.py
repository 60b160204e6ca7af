"""The campaign's shape and hand-offs, from the stage locations and the pipeline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from multisite.config import load_campaign
from multisite.flow import handoffs, stage_chunks, stage_dependencies, workflow_pieces
from multisite.pipeline import PipelineFlow, missing_subsets

ROOT = Path(__file__).resolve().parent.parent


def test_demo_handoffs_follow_the_pipeline(campaign_dir):
    campaign = load_campaign(campaign_dir / "config.yaml")
    flow = PipelineFlow(campaign)
    moved = {h.name: flow.handoff_types(h) for h in handoffs(campaign)}
    assert moved == {
        "raws": ["raw"],
        "fanin_step2": ["single_visit_star"],
        "fanout_step3": ["visit_zeropoint"],
        "final": ["deep_coadd", "object_catalog"],
    }
    assert missing_subsets(campaign) == []


def test_3x3_shape():
    campaign = load_campaign(ROOT / "config" / "3x3" / "config.yaml", base=ROOT)
    names = [(h.name, h.direction, h.producers, h.consumers) for h in handoffs(campaign)]
    assert names == [
        ("raws", "to_sites", (), ("step1", "step2a", "step2b", "step2d", "step3", "step4")),
        ("fanin_step2c", "to_central", ("step1", "step2a", "step2b"), ("step2c",)),
        ("fanout_step2d", "to_sites", ("step2c",), ("step2d", "step3", "step4")),
        ("final", "to_central", ("step1", "step2a", "step2b", "step2d", "step3", "step4"), ()),
    ]
    earlier, incoming = stage_dependencies(campaign, campaign.stage("step3"))
    assert earlier == ["step1", "step2a", "step2b", "step2d"]
    assert [h.name for h in incoming] == ["raws", "fanout_step2d"]
    earlier, incoming = stage_dependencies(campaign, campaign.stage("step2c"))
    assert earlier == [] and [h.name for h in incoming] == ["fanin_step2c"]


def test_stage_chunks(campaign_dir):
    campaign = load_campaign(campaign_dir / "config.yaml")
    step1, step2, step3 = campaign.stages
    assert stage_chunks(campaign, "in2p3", step3) == {"t0p1": ("t0p1",), "t0p4": ("t0p4",)}
    assert stage_chunks(campaign, "in2p3", step1) == {"c0000": ("t0p1", "t0p4")}
    assert stage_chunks(campaign, "usdf", step2) == {"global": tuple(u.name for u in campaign.units)}
    # Without units_per_chunk, chunks hold as many units as the quantum estimate allows.
    sized = replace(campaign, max_quanta=250)
    assert list(stage_chunks(sized, "ral", replace(step1, units_per_chunk=None, quanta_per_unit=200))) == [
        "t0p2",
        "t0p5",
    ]
    assert stage_chunks(sized, "ral", replace(step1, units_per_chunk=None, quanta_per_unit=100)) == {
        "c0000": ("t0p2", "t0p5")
    }


def test_every_handoff_is_cut_along_the_chunks_it_feeds_or_comes_from(campaign_dir):
    campaign = load_campaign(campaign_dir / "config.yaml")
    step1 = campaign.stage("step1")
    per_unit = replace(campaign, stages=(replace(step1, units_per_chunk=1), *campaign.stages[1:]))
    pieces = [(p.handoff.name, p.name, p.chunks, p.units) for p in workflow_pieces(per_unit, site="in2p3")]
    assert pieces == [
        ("raws", "t0p1", ("t0p1",), ("t0p1",)),  # the chunks of step1, which it feeds
        ("raws", "t0p4", ("t0p4",), ("t0p4",)),
        ("fanin_step2", "t0p1", ("t0p1",), ("t0p1",)),  # the chunks of step1, which it comes from
        ("fanin_step2", "t0p4", ("t0p4",), ("t0p4",)),
        ("fanout_step3", "t0p1", ("t0p1",), ("t0p1",)),  # the chunks of step3, which it feeds
        ("fanout_step3", "t0p4", ("t0p4",), ("t0p4",)),
        ("final", "t0p1", ("t0p1",), ("t0p1",)),  # the chunks of step3
        ("final", "t0p4", ("t0p4",), ("t0p4",)),
    ]
    raws = handoffs(campaign)[0]
    assert [p.label for p in workflow_pieces(per_unit, raws, "ral")] == ["raws/ral/t0p2", "raws/ral/t0p5"]
    # transfer.chunks_per_handoff coarsens the cut: two chunks a piece, named after both.
    coarse = replace(per_unit, chunks_per_handoff=2)
    (raws,) = [p for p in workflow_pieces(coarse, site="in2p3") if p.handoff.name == "raws"]
    assert (raws.name, raws.units) == ("t0p1..t0p4", ("t0p1", "t0p4"))
    # Every site's units are in exactly one piece of each hand-off.
    for handoff in handoffs(campaign):
        for site in campaign.processing_sites:
            units = [u for p in workflow_pieces(per_unit, handoff, site.name) for u in p.units]
            assert units == [u.name for u in campaign.units_of(site.name)]
