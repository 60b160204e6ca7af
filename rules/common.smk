# Configuration, validated before any rule runs, and the input functions.
import os

from multisite.config import CampaignConfigError, load_campaign
from multisite.flow import handoffs, stage_dependencies
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


def stage_unit_markers(site, stage):
    """Per-unit markers of a stage at a site (one 'global' unit for a central stage)."""
    units = ["global"] if campaign.stage(stage).is_central else [u.name for u in campaign.units_of(site)]
    return [f"{MARKERS}/stage/{site}/{stage}/{unit}.json" for unit in units]


def stage_done(site, stage):
    """Markers that say a stage is complete (at every site that runs it)."""
    if campaign.stage(stage).is_central:
        return stage_unit_markers(CENTRAL, stage)
    return stage_unit_markers(site, stage)


def handoff_marker(name, site):
    return f"{MARKERS}/handoff/{name}/{site}.json"


def survey_marker():
    """The demo survey marker when the config has a demo section, else the central repo's."""
    if campaign.demo:
        return f"{MARKERS}/demo/survey.json"
    return f"{MARKERS}/repos/{CENTRAL}.json"


def handoff_inputs(wildcards):
    """A hand-off waits for the placement, both repositories and its producing stages."""
    handoff = HANDOFFS[wildcards.handoff]
    site = wildcards.site
    inputs = {
        "placement": f"{MARKERS}/placement/raws.tsv",
        "repos": [f"{MARKERS}/repos/{site}.json", f"{MARKERS}/repos/{CENTRAL}.json"],
    }
    producer_site = site if handoff.to_central else CENTRAL
    inputs["producers"] = [m for stage in handoff.producers for m in stage_done(producer_site, stage)]
    return inputs


def stage_inputs(site, stage_name):
    """A stage waits for its site's verified inputs, earlier stages there and incoming hand-offs."""
    stage = campaign.stage(stage_name)
    earlier, incoming = stage_dependencies(campaign, stage)
    inputs = {
        "placement": f"{MARKERS}/placement/raws.tsv",
        "submit_yaml": f"{BPS_DIR}/{site}/{stage_name}.yaml",
        "earlier": [m for name in earlier for m in stage_unit_markers(site, name)],
    }
    if stage.is_central:
        inputs["handoffs"] = [handoff_marker(h.name, s) for h in incoming for s in PROCESSING]
    else:
        inputs["verified_inputs"] = f"{MARKERS}/inputs/{site}.json"
        inputs["handoffs"] = [handoff_marker(h.name, site) for h in incoming if h.name != "raws"]
    return inputs


def bps_yamls():
    return [
        f"{BPS_DIR}/{site.name}/{stage.name}.yaml"
        for stage in campaign.stages
        for site in campaign.stage_sites(stage)
    ]


def campaign_targets():
    """Everything: the QA at the central site, which needs the whole campaign, and every BPS YAML."""
    return [f"{MARKERS}/qa/qa.json", *bps_yamls()]


def write_report():
    """Write <workdir>/report.html; a report that cannot be written never fails the run."""
    from multisite.report import render_report

    try:
        print(f"Campaign report: {render_report(campaign, campaign.workdir / 'report.html')}")
    except Exception as err:
        print(f"Campaign report not written: {err}")
