"""Event kinds and step states, the exception each failure raises and the event it records, the lint check."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from multisite import errors
from multisite.errors import (
    CampaignConfigError,
    HandoffError,
    InventoryError,
    PlacementError,
    QAFailed,
    RucioHandoffError,
    RucioTransferStuck,
    StageFailed,
    event_kind,
)
from multisite.events import NOTIFY_KINDS, EventLog, read_events
from multisite.layout import Layout
from multisite.lint import IGNORED_LINTS, check_workflow, unexpected_lints
from multisite.states import LIVE_EVENT_KINDS, STATE_OF_EVENT, EventKind, StepState

CONDA = "Specify a conda environment or container for each rule."


def test_step_states_in_order_of_progress():
    assert list(StepState) == [
        StepState.FAILED,
        StepState.DEAD,
        StepState.WAITING,
        StepState.NOT_STARTED,
        StepState.RUNNING,
        StepState.DONE,
    ]
    assert [state.rank for state in StepState] == [-1, -1, 0, 1, 2, 3]
    assert sorted(StepState, key=lambda state: state.rank)[-1] is StepState.DONE


def test_step_state_properties():
    assert [state for state in StepState if state.is_bad] == [StepState.FAILED, StepState.DEAD]
    assert {state for state in StepState if state.is_terminal} == {
        StepState.DONE,
        StepState.FAILED,
        StepState.DEAD,
    }
    assert {state for state in StepState if state.needs_attention} == {
        StepState.RUNNING,
        StepState.WAITING,
        StepState.FAILED,
        StepState.DEAD,
    }
    # Only a step whose process should be alive (running, or waiting for another site) can be dead.
    assert {STATE_OF_EVENT[kind] for kind in LIVE_EVENT_KINDS} == {StepState.RUNNING, StepState.WAITING}


def test_values_are_the_strings_of_the_log_the_status_and_the_report():
    assert [kind.value for kind in EventKind] == ["started", "waiting", "done", "failed", "stuck"]
    assert [state.value for state in StepState] == [
        "failed",
        "dead",
        "waiting",
        "not started",
        "running",
        "done",
    ]
    # Serialised as the plain value: f-strings, str(), format specs, JSON values and keys.
    assert (
        f"{StepState.NOT_STARTED}|{StepState.DONE:6s}|{StepState.FAILED.upper()}"
        == "not started|done  |FAILED"
    )
    assert str(EventKind.STUCK) == "stuck"
    assert (
        json.dumps({EventKind.DONE: [EventKind.FAILED, StepState.RUNNING]})
        == '{"done": ["failed", "running"]}'
    )
    # Strings read back from a log compare, hash and look up equal to the members.
    assert "done" == EventKind.DONE and StepState("not started") is StepState.NOT_STARTED
    assert STATE_OF_EVENT["started"] is StepState.RUNNING
    assert {"done", "failed", "stuck"} == NOTIFY_KINDS


def test_state_of_a_step_by_its_last_event():
    assert set(STATE_OF_EVENT) == set(EventKind)
    assert dict(STATE_OF_EVENT) == {
        EventKind.STARTED: StepState.RUNNING,
        EventKind.WAITING: StepState.WAITING,
        EventKind.DONE: StepState.DONE,
        EventKind.FAILED: StepState.FAILED,
        EventKind.STUCK: StepState.FAILED,
    }
    assert "unknown" not in STATE_OF_EVENT


def test_event_log_writes_plain_kinds(tmp_path):
    event = EventLog(tmp_path, "all").record(
        EventKind.WAITING, Layout.handoff_step("raws", "ral", "c0000"), "ral", "waiting for raws"
    )
    line = json.loads((tmp_path / "all.jsonl").read_text())
    assert line["kind"] == "waiting" and type(line["kind"]) is str
    assert json.dumps(asdict(event), default=str) == json.dumps(
        asdict(read_events([tmp_path / "all.jsonl"])[0])
    )


def test_exceptions_keep_their_bases():
    for error, base in [
        (CampaignConfigError, ValueError),
        (InventoryError, ValueError),
        (PlacementError, ValueError),
        (HandoffError, RuntimeError),
        (StageFailed, RuntimeError),
        (QAFailed, RuntimeError),
        (RucioHandoffError, HandoffError),
        (RucioTransferStuck, RucioHandoffError),
    ]:
        assert issubclass(error, base), error
    assert CampaignConfigError("c.yaml", ["a", "b"]).problems == ["a", "b"]
    assert str(PlacementError(["shares: sum to 1"])) == "cannot plan the placement:\n  - shares: sum to 1"
    # The event kind is decided by `event_kind`, not by an attribute of the class.
    assert not [name for name in errors.__all__ if hasattr(getattr(errors, name), "event_kind")]


@pytest.mark.parametrize(
    "error, kind",
    [
        (RucioTransferStuck("rule r1 is STUCK"), EventKind.STUCK),
        (RucioHandoffError("Rucio call failed"), EventKind.FAILED),
        (HandoffError("missing datasets"), EventKind.FAILED),
        (StageFailed("1 of 2 quanta failed"), EventKind.FAILED),
        (QAFailed("QA failed"), EventKind.FAILED),
        (CampaignConfigError("config", ["sites: none"]), EventKind.FAILED),
        (KeyError("anything else"), EventKind.FAILED),
    ],
)
def test_event_kind_of_an_exception(error, kind):
    assert event_kind(error) is kind


def test_unexpected_lints_drop_only_the_conda_lint():
    assert IGNORED_LINTS == {CONDA}
    report = {
        "snakefiles": [
            {
                "for": {"snakefile": "/w/Snakefile"},
                "lints": [{"title": "Absolute path", "body": "b", "links": []}],
            }
        ],
        "rules": [
            {
                "for": {"rule": "a", "line": 3, "snakefile": "/w/Snakefile"},
                "lints": [{"title": CONDA, "body": ""}],
            },
            {
                "for": {"rule": "b", "line": 9, "snakefile": "/w/Snakefile"},
                "lints": [
                    {"title": CONDA, "body": ""},
                    {"title": "No log directive defined", "body": "Add one."},
                ],
            },
        ],
    }
    assert unexpected_lints(report) == [
        "snakefile /w/Snakefile: Absolute path b",
        "rule b (line 9, /w/Snakefile): No log directive defined Add one.",
    ]
    assert unexpected_lints({"snakefiles": [], "rules": []}) == []


def test_check_workflow_runs_snakemake_lint(tmp_path):
    cwd = Path.cwd()
    # Only the conda lint: passes.
    (tmp_path / "Snakefile").write_text(
        'rule a:\n    output: "a.txt"\n    log: "a.log"\n    shell: "touch {output}"\n'
    )
    assert check_workflow(tmp_path / "Snakefile", tmp_path) == []
    # A rule without log that reads its input by index: two findings, named with the rule.
    (tmp_path / "Other").write_text(
        'rule b:\n    input: "a.txt"\n    output: "b.txt"\n    shell: "cat {input[0]} > {output}"\n'
    )
    findings = check_workflow(tmp_path / "Other", tmp_path)
    assert len(findings) == 2 and all(f.startswith("rule b (line 1, ") for f in findings), findings
    assert not [f for f in findings if CONDA in f]
    assert Path.cwd() == cwd
