# Configuration, validated before any rule runs, and the input functions.
import os

from multisite.config import CampaignConfigError, load_campaign
from multisite.flow import handoffs, stage_chunks, stage_dependencies
from multisite.pipeline import missing_subsets
from snakemake.exceptions import WorkflowError

try:
    campaign = load_campaign(config, base=os.getcwd())
except CampaignConfigError as err:
    raise WorkflowError(str(err)) from None
if missing := missing_subsets(campaign):
    raise WorkflowError(
        f"stages[].subset: pipeline {campaign.pipeline} has no subset(s) {missing}; "
        "name subsets defined in the pipeline YAML"
    )

MARKERS = os.path.relpath(campaign.markers)
LOGS = os.path.relpath(campaign.workdir / "logs")
BPS_DIR = os.path.relpath(campaign.workdir / "bps")
CENTRAL = campaign.central.name
PROCESSING = [site.name for site in campaign.processing_sites]
HANDOFFS = {handoff.name: handoff for handoff in handoffs(campaign)}


wildcard_constraints:
    site="|".join(campaign.sites),
    stage="|".join(stage.name for stage in campaign.stages),
    handoff="|".join(HANDOFFS),
    chunk="[A-Za-z0-9_-]+",


def chunks(site, stage):
    """Chunk names of a stage at a site (one BPS workflow each)."""
    return list(stage_chunks(campaign, site, campaign.stage(stage)))


def chunk_markers(site, stage):
    return [f"{MARKERS}/stage/{site}/{stage}/{chunk}.json" for chunk in chunks(site, stage)]


def stage_marker(site, stage):
    """The marker of a stage complete at a site (the central site for a central stage)."""
    return f"{MARKERS}/stage/{CENTRAL if campaign.stage(stage).is_central else site}/{stage}.json"


def handoff_marker(name, site):
    return f"{MARKERS}/handoff/{name}/{site}.json"


def survey_marker():
    """The demo survey marker when the config has a demo section, else the central repo's."""
    if campaign.demo:
        return f"{MARKERS}/demo/survey.json"
    return f"{MARKERS}/repos/{CENTRAL}.json"


def sending_inputs(wildcards):
    """Sending a hand-off waits for the placement, the source repository and the producing stages."""
    handoff = HANDOFFS[wildcards.handoff]
    sender, _ = handoff.ends(campaign, wildcards.site)
    return {
        "placement": f"{MARKERS}/placement/raws.tsv",
        "source_repo": f"{MARKERS}/repos/{sender}.json",
        "producers": [stage_marker(sender, stage) for stage in handoff.producers],
    }


def handoff_inputs(wildcards):
    """A hand-off waits for its destination repository and, if this instance sends it, what sending waits for.

    One that another site's instance sends is awaited through the transfer backend, once
    this instance's own work before it is done: a waiting rule holds a job slot.
    """
    handoff = HANDOFFS[wildcards.handoff]
    sender, receiver = handoff.ends(campaign, wildcards.site)
    inputs = {"destination_repo": f"{MARKERS}/repos/{receiver}.json"}
    if campaign.runs_here(sender):
        inputs |= sending_inputs(wildcards)
    else:
        if handoff.to_central:
            before = handoff.producers
        else:
            before, _ = stage_dependencies(campaign, campaign.stage(handoff.consumers[0]))
        inputs["own_work"] = [stage_marker(receiver, stage) for stage in before if receiver in PROCESSING]
    return inputs


def plan_inputs(wildcards):
    """The central site plans from its repository; another site's instance gets its share with its raws."""
    if campaign.runs_here(CENTRAL):
        return {"survey": survey_marker()}
    return {"raws": handoff_marker("raws", campaign.instance)}


def chunk_inputs(wildcards):
    """A chunk waits for its site's verified inputs, earlier stages there and incoming hand-offs."""
    site, stage_name = wildcards.site, wildcards.stage
    stage = campaign.stage(stage_name)
    earlier, incoming = stage_dependencies(campaign, stage)
    inputs = {
        "placement": f"{MARKERS}/placement/raws.tsv",
        "submit_yaml": f"{BPS_DIR}/{site}/{stage_name}/{wildcards.chunk}.yaml",
        "earlier": [stage_marker(site, name) for name in earlier],
    }
    if stage.is_central:
        inputs["handoffs"] = [handoff_marker(h.name, s) for h in incoming for s in PROCESSING]
    else:
        inputs["verified_inputs"] = f"{MARKERS}/inputs/{site}.json"
        inputs["handoffs"] = [handoff_marker(h.name, site) for h in incoming if h.name != "raws"]
    return inputs


def bps_yamls():
    return [
        f"{BPS_DIR}/{site.name}/{stage.name}/{chunk}.yaml"
        for stage in campaign.stages
        for site in campaign.stage_sites(stage)
        if campaign.runs_here(site.name)
        for chunk in chunks(site.name, stage.name)
    ]


def sent_markers():
    """Hand-offs this instance sends to another site's instance."""
    return [
        f"{MARKERS}/sent/{name}/{site}.json"
        for name, handoff in HANDOFFS.items()
        for site in PROCESSING
        for sender, receiver in [handoff.ends(campaign, site)]
        if campaign.runs_here(sender) and not campaign.runs_here(receiver)
    ]


def campaign_targets():
    """This instance's share: the QA at the central site (which needs the whole campaign),
    the hand-offs it sends to other instances, and its BPS YAMLs."""
    qa = [f"{MARKERS}/qa/qa.json"] if campaign.runs_here(CENTRAL) else []
    return [*qa, *sent_markers(), *bps_yamls()]


def write_report():
    """Write <workdir>/report.html; a report that cannot be written never fails the run."""
    from multisite.report import render_report

    try:
        print(f"Campaign report: {render_report(campaign, campaign.workdir / 'report.html')}")
    except Exception as err:
        print(f"Campaign report not written: {err}")
