"""Snakemake shim: make sure a site's Butler repository exists."""

from multisite.sites import prepare_repo
from multisite.workflow import run_rule

run_rule(snakemake, lambda campaign: prepare_repo(campaign, snakemake.wildcards.site))
