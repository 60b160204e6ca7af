# Multi-site data-release production campaign: placement, transfers, BPS stages, QA.
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


# Refresh the campaign report after every run, successful or not.
onsuccess:
    write_report()


onerror:
    write_report()
