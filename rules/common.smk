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


def sending_inputs(wildcards):
    return TARGETS.sending_inputs(wildcards.handoff, wildcards.site)


def handoff_inputs(wildcards):
    return TARGETS.handoff_inputs(wildcards.handoff, wildcards.site)


def plan_inputs(wildcards):
    return TARGETS.plan_inputs()


def chunk_inputs(wildcards):
    return TARGETS.chunk_inputs(wildcards.site, wildcards.stage, wildcards.chunk)


def write_report():
    """Write <workdir>/report.html; a report that cannot be written never fails the run."""
    from multisite.report import render_report

    try:
        print(f"Campaign report: {render_report(campaign, campaign.layout.report)}")
    except Exception as err:
        print(f"Campaign report not written: {err}")
