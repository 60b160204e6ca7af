"""What the pipeline says about the campaign: dataset types per stage and hand-off."""

from __future__ import annotations

__all__ = ("PipelineFlow", "missing_subsets")

from functools import cached_property

from lsst.daf.butler import DimensionUniverse
from lsst.pipe.base import Pipeline
from lsst.pipe.base.pipeline_graph import PipelineGraph
from lsst.pipe.base.pipelineIR import PipelineIR
from lsst.resources import ResourcePath

from .config import Campaign
from .flow import Handoff


def missing_subsets(campaign: Campaign) -> list[str] | None:
    """Return the stages' subsets that the pipeline lacks.

    Reads the pipeline YAML only (no task is imported). Returns `None` when the
    pipeline cannot be read here, e.g. a production pipeline previewed on a
    machine without that stack.
    """
    uri = ResourcePath(campaign.pipeline)
    if not uri.exists():
        return None
    subsets = PipelineIR.from_uri(uri).labeled_subsets
    return [stage.subset for stage in campaign.stages if stage.subset not in subsets]


class PipelineFlow:
    """Dataset types produced and consumed by each stage of a campaign's pipeline.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign; its stages name subsets of its pipeline.
    universe : `lsst.daf.butler.DimensionUniverse`, optional
        Dimension universe to resolve the pipeline with.
    """

    def __init__(self, campaign: Campaign, universe: DimensionUniverse | None = None):
        self.campaign = campaign
        self.graph: PipelineGraph = Pipeline.from_uri(campaign.pipeline).to_graph()
        missing = [s.subset for s in campaign.stages if s.subset not in self.graph.task_subsets]
        if missing:
            raise ValueError(
                f"pipeline {campaign.pipeline} has no subset(s) {missing}; its subsets are "
                f"{sorted(self.graph.task_subsets)}: fix 'stages[].subset' in the campaign config"
            )
        self.graph.resolve(dimensions=universe or DimensionUniverse())

    def subset_uri(self, stage: str) -> str:
        """Pipeline URI restricted to a stage's subset (``pipeline.yaml#subset``)."""
        return f"{self.campaign.pipeline}#{self.campaign.stage(stage).subset}"

    def tasks(self, stage: str) -> list[str]:
        return sorted(self.graph.task_subsets[self.campaign.stage(stage).subset])

    @cached_property
    def _producer(self) -> dict[str, str]:
        """Dataset type name to the stage whose task writes it (regular outputs only)."""
        producer = {}
        for stage in self.campaign.stages:
            for label in self.tasks(stage.name):
                for edge in self.graph.tasks[label].outputs.values():
                    producer[edge.parent_dataset_type_name] = stage.name
        return producer

    def inputs(self, stage: str) -> set[str]:
        """Dataset types a stage reads (regular and prerequisite inputs)."""
        names = set()
        for label in self.tasks(stage):
            node = self.graph.tasks[label]
            for edge in [*node.inputs.values(), *node.prerequisite_inputs.values()]:
                names.add(edge.parent_dataset_type_name)
        return names

    def outputs(self, stage: str) -> set[str]:
        """Regular output dataset types of a stage (no configs, metadata or logs)."""
        return {name for name, producer in self._producer.items() if producer == stage}

    def is_sky_stage(self, stage: str) -> bool:
        """Whether a stage's quanta have sky-map dimensions (per patch or tract), not per visit."""
        return any("tract" in self.graph.tasks[label].dimensions.names for label in self.tasks(stage))

    def handoff_types(self, handoff: Handoff) -> list[str]:
        """Dataset types that a hand-off moves, as the pipeline dictates.

        ``raws`` moves the overall inputs its consumers read; a fan-in or fan-out
        moves what its consumers read from the producing stages; ``final`` moves
        the producing stages' outputs that no stage reads.
        """
        read = set().union(*(self.inputs(s) for s in handoff.consumers))
        if handoff.name == "raws":
            return sorted(n for n in read if n not in self._producer)
        if handoff.consumers:
            return sorted(n for n in read if self._producer.get(n) in handoff.producers)
        read_anywhere = set().union(*(self.inputs(s.name) for s in self.campaign.stages))
        return sorted(n for s in handoff.producers for n in self.outputs(s) if n not in read_anywhere)
