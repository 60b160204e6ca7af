# Configuration, validated before any rule runs, and the input functions.
import os
from pathlib import Path

from multisite.errors import CampaignConfigError
from multisite.layout import Layout
from multisite.targets import Targets
from multisite.validate import validate_campaign
from snakemake.exceptions import WorkflowError

# The same checks as `multisite validate`, all of them before any job.
try:
    campaign = validate_campaign(config, base=os.getcwd())
except CampaignConfigError as err:
    raise WorkflowError(str(err)) from None

# Every path the rules use comes from the layout, relative to the directory Snakemake runs in;
# what each rule waits for, and what this instance runs, from `Targets`.
LAYOUT = Layout(Path(os.path.relpath(campaign.workdir)))
TARGETS = Targets(campaign, LAYOUT)
CENTRAL = campaign.central.name
PROCESSING = TARGETS.processing


wildcard_constraints:
    site="|".join(campaign.sites),
    stage="|".join(stage.name for stage in campaign.stages),
    handoff="|".join(TARGETS.handoffs),
    chunk="[A-Za-z0-9_-]+",
    # A chunk's name, or <first>..<last> of several chunks.
    piece=r"[A-Za-z0-9_-]+(?:\.\.[A-Za-z0-9_-]+)?",


def stage_priority(wildcards):
    return TARGETS.priority(wildcards.stage)


def handoff_priority(wildcards):
    return TARGETS.handoff_priority(wildcards.handoff)


def placement_ancient(inputs):
    """Wait for the placement table for order only.

    It changes only with `multisite move`, which removes what the move changes (the submit
    YAMLs of changed chunks): a newer table is no reason to redo what it did not change.
    """
    return inputs | {"placement": ancient(inputs["placement"])}


def sending_inputs(wildcards):
    return placement_ancient(TARGETS.sending_inputs(wildcards.handoff, wildcards.site, wildcards.piece))


def sent_markers(wildcards):
    return TARGETS.sent_markers(wildcards.handoff, wildcards.site)


def handoff_inputs(wildcards):
    inputs = TARGETS.handoff_inputs(wildcards.handoff, wildcards.site, wildcards.piece)
    if "placement" in inputs:
        inputs = placement_ancient(inputs)
    # A receive waits for its instance's own work for order only (a waiting rule holds a job
    # slot): work finished after the hand-off arrived is no reason to receive it again.
    if "own_work" in inputs:
        inputs["own_work"] = [ancient(path) for path in inputs["own_work"]]
    return inputs


def plan_inputs(wildcards):
    # The plan reruns only when it is missing: it is versioned (multisite.plan_version), and a
    # raws marker newer than it (another instance's) says nothing about it.
    return {name: ancient(path) for name, path in TARGETS.plan_inputs().items()}


def chunk_inputs(wildcards):
    return placement_ancient(TARGETS.chunk_inputs(wildcards.site, wildcards.stage, wildcards.chunk))


def write_report():
    """Write <workdir>/report.html; a report that cannot be written never fails the run."""
    from multisite.report import render_report

    try:
        print(f"Campaign report: {render_report(campaign, campaign.layout.report)}")
    except Exception as err:
        print(f"Campaign report not written: {err}")
