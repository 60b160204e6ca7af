"""Snakemake shim: run the single-site reference at the central site."""

from multisite.reference import run_reference
from multisite.workflow import run_rule

run_rule(snakemake, lambda campaign: run_reference(campaign, snakemake.log.pipetask))
