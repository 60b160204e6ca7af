"""Target selection, the file layout and site selections, without Snakemake or a Butler.

What each instance runs and what its steps wait for used to be reachable only through
the end-to-end runs; these are the same decisions, checked in milliseconds.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pandas as pd
import pytest
from lsst.daf.butler import DataCoordinate, DimensionUniverse

from multisite.config import load_campaign
from multisite.errors import HandoffError
from multisite.layout import Layout, step_id
from multisite.placement import SiteSelection
from multisite.targets import Targets

from .conftest import REPO

LAYOUT = Layout(Path("work"))


@pytest.fixture(scope="module")
def demo():
    return load_campaign(REPO / "config" / "config.yaml", base=REPO)


def targets(campaign, instance: str | None = None) -> Targets:
    return Targets(dataclasses.replace(campaign, instance=instance), LAYOUT)


def names(paths) -> set[str]:
    return {str(p.relative_to(LAYOUT.markers)) for p in paths if LAYOUT.markers in p.parents}


def test_one_instance_sends_and_receives_everything(demo):
    one = targets(demo)
    assert all(one.sends(h, s) for h in one.handoffs for s in one.processing)
    inputs = one.handoff_inputs("fanin_step2", "ral", "c0000")
    assert inputs["producers"] == [LAYOUT.chunk_marker("ral", "step1", "c0000")]
    # A final piece waits for its own step3 chunk (and the site's step1), not the site's other chunks.
    final = one.handoff_inputs("final", "ral", "t0p2")["producers"]
    assert final == [LAYOUT.stage_marker("ral", "step1"), LAYOUT.chunk_marker("ral", "step3", "t0p2")]
    assert inputs["source_repo"] == LAYOUT.repo_marker("ral") and "own_work" not in inputs
    assert one.sent_pieces == [] and one.sent_handoffs == {}
    assert LAYOUT.qa_marker in one.campaign_targets()
    assert one.plan_inputs() == {"survey": LAYOUT.survey_marker()}
    assert one.piece("final", "ral", "t0p2").units == ("t0p2",)
    with pytest.raises(HandoffError, match=r"final/ral has no piece 't0p9' .*\(its pieces: t0p2, t0p5\)"):
        one.piece("final", "ral", "t0p9")


def test_a_site_instance_receives_what_others_send_after_its_own_work(demo):
    in2p3 = targets(demo, "in2p3")
    assert not in2p3.sends("raws", "in2p3") and in2p3.sends("fanin_step2", "in2p3")
    # Nothing before the raws; the fan-out only after its own step1.
    assert in2p3.handoff_inputs("raws", "in2p3", "c0000") == {
        "destination_repo": LAYOUT.repo_marker("in2p3"),
        "own_work": [],
    }
    # The fan-out only after its own step1 and its fan-in sent: the central stage needs that.
    assert in2p3.handoff_inputs("fanout_step3", "in2p3", "t0p1")["own_work"] == [
        LAYOUT.stage_marker("in2p3", "step1"),
        LAYOUT.handoff_sent_marker("fanin_step2", "in2p3"),
    ]
    # A hand-off is all sent once each of its pieces is.
    assert in2p3.sent_markers("final", "in2p3") == [
        LAYOUT.sent_marker("final", "in2p3", chunk) for chunk in ("t0p1", "t0p4")
    ]
    assert in2p3.plan_inputs() == {"raws": LAYOUT.handoff_marker("raws", "in2p3", "c0000")}
    share = names(in2p3.campaign_targets())
    assert share == {
        "sent/fanin_step2/in2p3.json",
        "sent/final/in2p3.json",
        "stage/in2p3/step1.json",
        "stage/in2p3/step3.json",
    }
    assert {p.parent.name for p in in2p3.submit_yamls()} == {"step1", "step3"}
    assert {p.parent.parent.name for p in in2p3.submit_yamls()} == {"in2p3"}


def test_the_central_instance_waits_for_fanins_after_its_own_step1(demo):
    usdf = targets(demo, "usdf")
    # After its own step1 and every raws piece it sends: the fan-ins come from them.
    assert usdf.handoff_inputs("fanin_step2", "ral", "c0000")["own_work"] == [
        LAYOUT.stage_marker("usdf", "step1"),
        *(LAYOUT.handoff_sent_marker("raws", site) for site in ("in2p3", "ral", "lancs")),
    ]
    assert usdf.sends("fanout_step3", "lancs") and not usdf.sends("final", "lancs")
    assert names(usdf.campaign_targets()) >= {
        "qa/qa.json",
        "sent/raws/in2p3.json",
        "sent/raws/ral.json",
        "sent/raws/lancs.json",
        "sent/fanout_step3/in2p3.json",
    }
    assert usdf.sent_markers("raws", "ral") == [LAYOUT.sent_marker("raws", "ral", "c0000")]
    # The central stage waits for every site's fan-in; a site stage for its own hand-offs.
    step2 = usdf.chunk_inputs("usdf", "step2", "global")
    assert step2["handoffs"] == [LAYOUT.handoff_marker("fanin_step2", s, "c0000") for s in usdf.processing]
    step3 = usdf.chunk_inputs("ral", "step3", "t0p2")
    # A step3 chunk waits for its own fan-out piece only.
    assert step3["handoffs"] == [LAYOUT.handoff_marker("fanout_step3", "ral", "t0p2")]
    assert step3["earlier"] == [LAYOUT.stage_marker("ral", "step1")]
    assert usdf.stage_marker("ral", "step2") == LAYOUT.stage_marker("usdf", "step2")


def test_step_ids_follow_the_rules_path_patterns():
    """The event log's step names are the rule and its wildcards in path order: built once, here."""
    patterns = {
        "handoff": (LAYOUT.handoff_marker("{handoff}", "{site}", "{piece}"), Layout.handoff_step),
        "send_handoff": (LAYOUT.sent_marker("{handoff}", "{site}", "{piece}"), Layout.send_step),
        "run_stage": (LAYOUT.chunk_marker("{site}", "{stage}", "{chunk}"), Layout.chunk_step),
    }
    values = {"handoff": "fanin_step2", "site": "ral", "piece": "all", "stage": "step1", "chunk": "c0000"}
    for rule, (pattern, helper) in patterns.items():
        order = re.findall(r"{(\w+)}", str(pattern))
        wildcards = {name: values[name] for name in order}
        assert step_id(rule, wildcards) == helper(*wildcards.values())
    assert Layout.stage_step("ral", "step1") == "step1_ral"


def _placement() -> pd.DataFrame:
    # Visit 1's detector 0 is at usdf only; detector 1 is on a boundary: usdf owns it, ral needs it.
    rows = [
        (1, 1, 0, "usdf", "usdf", "t0p0"),
        (1, 1, 1, "usdf", "usdf", "t0p0"),
        (1, 1, 1, "ral", "usdf", "t0p2"),
        (2, 2, 0, "ral", "ral", "t0p2"),
    ]
    return pd.DataFrame.from_records(rows, columns=["exposure", "visit", "detector", "site", "owner", "unit"])


def test_site_selection_tells_owned_from_needed(demo):
    universe = DimensionUniverse()

    def data_id(**values):
        return DataCoordinate.standardize(values, universe=universe)

    ral = SiteSelection.from_placement(demo, _placement(), "ral")
    usdf = SiteSelection.from_placement(demo, _placement(), "usdf")
    boundary = data_id(instrument="DemoCam", exposure=1, detector=1)
    assert ral.accepts(boundary, owned=False) and not ral.accepts(boundary, owned=True)
    assert usdf.accepts(boundary, owned=True)
    visit_1 = data_id(instrument="DemoCam", visit=1)
    # A visit is owned by the site owning its lowest detector: usdf, though ral needs it.
    assert ral.accepts(visit_1, owned=False) and not ral.accepts(visit_1, owned=True)
    assert ral.accepts(data_id(instrument="DemoCam", visit=2), owned=True)
    assert ral.accepts(data_id(skymap="demo", tract=0, patch=2), owned=True)
    assert not ral.accepts(data_id(skymap="demo", tract=0, patch=1), owned=False)
    # Instrument-level datasets are the central site's, needed everywhere.
    assert ral.accepts(data_id(instrument="DemoCam"), owned=False)
    assert not ral.accepts(data_id(instrument="DemoCam"), owned=True)


def test_a_piece_selects_what_belongs_to_its_units(demo):
    """Each owned dataset of a site belongs to exactly one of its pieces (the unit of its data)."""
    universe = DimensionUniverse()

    def data_id(**values):
        return DataCoordinate.standardize(values, universe=universe)

    placement = pd.concat(
        [
            _placement(),
            pd.DataFrame.from_records([(3, 3, 0, "ral", "ral", "t0p5")], columns=_placement().columns),
        ]
    )
    t0p2, t0p5 = (SiteSelection.from_placement(demo, placement, "ral", [unit]) for unit in ("t0p2", "t0p5"))
    owned = {
        "visit 2": data_id(instrument="DemoCam", visit=2),
        "visit 3 detector 0": data_id(instrument="DemoCam", visit=3, detector=0),
        "patch 5": data_id(skymap="demo", tract=0, patch=5),
        "tract 0": data_id(skymap="demo", tract=0),  # the piece of ral's first unit in the tract
    }
    assert {
        name: (t0p2.accepts(d, owned=True), t0p5.accepts(d, owned=True)) for name, d in owned.items()
    } == {
        "visit 2": (True, False),
        "visit 3 detector 0": (False, True),
        "patch 5": (False, True),
        "tract 0": (True, False),
    }
    assert t0p2.raws_needed == {(1, 1), (2, 0)} and t0p5.raws_needed == {(3, 0)}


def test_earlier_stages_are_scheduled_first(demo):
    """A site's raws, first chunks and fan-in go before a later stage's jobs (the fan-in is the barrier)."""
    one = targets(demo)
    first, central, last = (one.priority(stage) for stage in ("step1", "step2", "step3"))
    assert first > central > last > 0
    assert one.handoff_priority("raws") == one.handoff_priority("fanin_step2") == first
    assert one.handoff_priority("fanout_step3") == one.handoff_priority("final") == last
