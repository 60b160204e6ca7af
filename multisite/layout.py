"""Where a campaign keeps its files, and what its steps are called.

Every path under a campaign's work directory (markers, logs, submit YAMLs, quantum
graphs, events, the report) and every step identifier (the name a step has in the
event log and the status) is spelled here and nowhere else. The rules build their
patterns by passing wildcards (``"{site}"``) as the arguments, so the rules, the
status, the report and the tests all read the same names.

A step identifier is the rule's name followed by its wildcards in the order they
appear in its output path (``handoff fanin_step2 in2p3 all``, ``run_stage ral step1
c0000``); a stage's gathering rule is named ``<stage>_<site>`` and has no wildcards.
"""

from __future__ import annotations

__all__ = ("Layout", "step_id")

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .flow import HandoffPiece


def step_id(rule: str, wildcards: Mapping[str, str] | None = None) -> str:
    """Return a step's identifier: the rule name, then its wildcard values in path order."""
    return " ".join([rule, *(wildcards or {}).values()])


@dataclass(frozen=True)
class Layout:
    """The files of one campaign work directory.

    Parameters
    ----------
    workdir : `pathlib.Path`
        The campaign's work directory; relative (to the directory Snakemake runs in)
        for the rules, absolute for every other reader.
    """

    workdir: Path

    # ------------------------------------------------------------------ directories
    @property
    def markers(self) -> Path:
        """Markers: one JSON file per verified product."""
        return self.workdir / "markers"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def events(self) -> Path:
        """Event logs, one JSON-lines file per instance."""
        return self.workdir / "events"

    @property
    def report(self) -> Path:
        return self.workdir / "report.html"

    def event_log(self, instance: str) -> Path:
        return self.events / f"{instance}.jsonl"

    @property
    def instance_lock(self) -> Path:
        """The hold of the one instance running on this work directory (`multisite.lock.InstanceHold`)."""
        return self.workdir / "instance.lock"

    @property
    def heartbeats(self) -> Path:
        """Heartbeat files of the steps running now, one directory per instance."""
        return self.workdir / "heartbeats"

    def heartbeat(self, instance: str, step: str) -> Path:
        """Return the heartbeat file of a running step: ``heartbeats/<instance>/<step, spaces as .>``.

        Names read from an event log stay inside the directory: ``/`` becomes ``_``, and
        leading dots are dropped.
        """
        names = (instance, step.replace(" ", "."))
        return self.heartbeats.joinpath(*(name.replace("/", "_").lstrip(".") or "_" for name in names))

    def qgraph_dir(self, site: str, stage: str, chunk: str) -> Path:
        """Quantum graphs and BPS submit directories of a chunk's attempts."""
        return self.workdir / "qgraph" / site / stage / chunk

    def submit_yaml(self, site: str, stage: str, chunk: str) -> Path:
        return self.workdir / "bps" / site / stage / f"{chunk}.yaml"

    def submit_dir(self, site: str, stage: str, chunk: str) -> Path:
        """BPS submit directories of a chunk (one per attempt, named by BPS's timestamp)."""
        return self.workdir / "submit" / site / stage / chunk

    def prepare_dir(self, site: str, stage: str, chunk: str) -> Path:
        """Where `multisite.bps.prepare_stage` prepares a chunk without submitting it."""
        return self.workdir / "prepare" / site / stage / chunk

    # ------------------------------------------------------------------ markers
    def repo_marker(self, site: str) -> Path:
        return self.markers / "repos" / f"{site}.json"

    def survey_marker(self) -> Path:
        return self.markers / "demo" / "survey.json"

    @property
    def placement_table(self) -> Path:
        """One row per (raw, site that needs it), with its owner."""
        return self.markers / "placement" / "raws.tsv"

    @property
    def move_in_progress(self) -> Path:
        """Written by ``multisite move`` before it changes the plan, removed once the plan marker is."""
        return self.markers / "placement" / "move.json"

    def retired_dir(self, plan_version: str) -> Path:
        """Where a move puts the files of the chunks it retires from plan ``plan_version``."""
        return self.workdir / "retired" / plan_version

    def replaced_placement_table(self, plan_version: str) -> Path:
        """Return the placement table of an earlier plan version, kept by the move that replaced it."""
        return self.markers / "placement" / f"raws.{plan_version}.tsv"

    @property
    def placement_summary(self) -> Path:
        return self.markers / "placement" / "summary.tsv"

    @property
    def placement_marker(self) -> Path:
        return self.markers / "placement" / "plan.json"

    def handoff_marker(self, handoff: str, site: str, piece: str) -> Path:
        """Return the marker of a hand-off piece arrived and verified (in the instance that receives it)."""
        return self.markers / "handoff" / handoff / site / f"{piece}.json"

    def sent_marker(self, handoff: str, site: str, piece: str) -> Path:
        """Return the marker of a hand-off piece published by its sending instance for another instance."""
        return self.markers / "sent" / handoff / site / f"{piece}.json"

    def handoff_sent_marker(self, handoff: str, site: str) -> Path:
        """Return the marker of every piece of a hand-off for a processing site sent by this instance."""
        return self.markers / "sent" / handoff / f"{site}.json"

    def piece_marker(self, piece: HandoffPiece, sent: bool = False) -> Path:
        """Return `handoff_marker` (or `sent_marker`) of a hand-off piece."""
        marker = self.sent_marker if sent else self.handoff_marker
        return marker(piece.handoff.name, piece.site, piece.name)

    def inputs_marker(self, site: str, piece: str) -> Path:
        """Return the marker of a site's inputs verified, those its ``raws`` piece ``piece`` brought."""
        return self.markers / "inputs" / site / f"{piece}.json"

    def chunk_marker(self, site: str, stage: str, chunk: str) -> Path:
        return self.markers / "stage" / site / stage / f"{chunk}.json"

    def stage_marker(self, site: str, stage: str) -> Path:
        return self.markers / "stage" / site / f"{stage}.json"

    @property
    def reference_marker(self) -> Path:
        return self.markers / "reference" / "reference.json"

    @property
    def qa_marker(self) -> Path:
        return self.markers / "qa" / "qa.json"

    @property
    def qa_table(self) -> Path:
        """The QA table (a log, not an output: a failed QA's table is the one to read)."""
        return self.logs / "qa" / "qa.csv"

    # ------------------------------------------------------------------ logs
    def handoff_log(self, handoff: str, site: str, piece: str) -> Path:
        return self.logs / "handoff" / handoff / site / f"{piece}.log"

    def send_log(self, handoff: str, site: str, piece: str) -> Path:
        return self.logs / "send_handoff" / handoff / site / f"{piece}.log"

    def chunk_log(self, site: str, stage: str, chunk: str) -> Path:
        return self.logs / "stage" / site / stage / f"{chunk}.log"

    def stage_log(self, site: str, stage: str) -> Path:
        return self.logs / "stage" / site / f"{stage}.log"

    def rule_log(self, rule: str, *wildcards: str) -> Path:
        """Return a rule's log, named after it and its wildcards: ``logs/<rule>/<w1>/<w2>.log``."""
        if not wildcards:
            return self.logs / f"{rule}.log"
        return self.logs.joinpath(rule, *wildcards[:-1], f"{wildcards[-1]}.log")

    @property
    def reference_pipetask_log(self) -> Path:
        return self.logs / "reference.pipetask.log"

    # ------------------------------------------------------------------ step identifiers
    @staticmethod
    def handoff_step(handoff: str, site: str, piece: str) -> str:
        return step_id("handoff", {"handoff": handoff, "site": site, "piece": piece})

    @staticmethod
    def is_handoff_step(step: str) -> bool:
        """Whether a step identifier is a received hand-off's."""
        return step.startswith("handoff ")

    @staticmethod
    def send_step(handoff: str, site: str, piece: str) -> str:
        return step_id("send_handoff", {"handoff": handoff, "site": site, "piece": piece})

    @staticmethod
    def chunk_step(site: str, stage: str, chunk: str) -> str:
        return step_id("run_stage", {"site": site, "stage": stage, "chunk": chunk})

    @staticmethod
    def stage_step(site: str, stage: str) -> str:
        """Return the step (rule) that gathers a stage's chunks at a site."""
        return step_id(f"{stage}_{site}")
