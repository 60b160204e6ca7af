"""Snakemake shim: compute the placement table (which raws each site needs)."""

from multisite.placement import plan_placement
from multisite.workflow import run_rule

run_rule(
    snakemake,
    lambda campaign: plan_placement(campaign, snakemake.output.placement, snakemake.output.summary),
)
