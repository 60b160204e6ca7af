"""Snakemake shim: QA of the campaign's products at the central site."""

from multisite.qa import run_qa
from multisite.workflow import run_rule

run_rule(snakemake, lambda campaign: run_qa(campaign, snakemake.params.table))
