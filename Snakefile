# Multi-site data-release production campaign: placement, transfers, BPS stages, QA.
import os

from multisite.errors import CampaignConfigError, HandoffError
from multisite.lock import HoldRefused, InstanceHold
from multisite.move import MoveRefused, adopt_published_plan, format_move
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")


# The demo config unless a campaign config is given (--configfile); --config values
# (a site profile's `site`) apply on top of either.
if "campaign" not in config:

    configfile: "config/config.yaml"



include: "rules/common.smk"
include: "rules/setup.smk"
include: "rules/placement.smk"
include: "rules/handoffs.smk"
include: "rules/bps.smk"
include: "rules/stages.smk"
include: "rules/qa.smk"


rule all:
    input:
        TARGETS.campaign_targets(),
    default_target: True


# One instance per campaign work directory, wherever it was started from: Snakemake's own lock
# covers only the directory it runs in. `onstart` runs in the main process only: never for a
# dry run (-n), nor in the job processes executors start (they get --no-hooks). Raising there
# stops the run before any job, and Snakemake releases its own lock.
INSTANCE_HOLD = InstanceHold(
    campaign.layout.instance_lock, os.path.abspath(workflow.configfiles[-1]) if workflow.configfiles else None
)


onstart:
    try:
        stale = INSTANCE_HOLD.acquire(campaign.instance or "all")
    except HoldRefused as err:
        raise WorkflowError(str(err)) from None
    if stale is not None:
        print(f"Took over the hold of {campaign.workdir} from {stale}: that process is gone.")
    # A site's instance first adopts a plan the central site's instance published (a move),
    # then stops: this run's jobs were planned on the old one.
    try:
        adopted = adopt_published_plan(campaign)
    except (CampaignConfigError, HandoffError, MoveRefused) as err:
        INSTANCE_HOLD.release()
        raise WorkflowError(str(err)) from None
    if adopted is not None:
        INSTANCE_HOLD.release()
        raise WorkflowError(
            f"{format_move(adopted)}\nThis instance adopted the plan {campaign.central.name}'s instance "
            "published, and nothing ran: run it again to go on with the new plan."
        )


# Refresh the campaign report after every run, successful or not; then give the hold back.
onsuccess:
    try:
        write_report()
    finally:
        INSTANCE_HOLD.release()


onerror:
    try:
        write_report()
    finally:
        INSTANCE_HOLD.release()
