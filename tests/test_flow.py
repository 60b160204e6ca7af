"""The campaign's shape and hand-offs, from the stage locations and the pipeline."""

from __future__ import annotations

from pathlib import Path

from multisite.config import load_campaign
from multisite.flow import handoffs, stage_dependencies
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
