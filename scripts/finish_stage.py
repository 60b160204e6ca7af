"""Snakemake shim: gather a stage's verified chunks at a site into its output chain."""

from multisite.bps import finish_stage
from multisite.workflow import run_rule

run_rule(
    snakemake,
    lambda campaign: finish_stage(
        campaign, snakemake.params.site, snakemake.params.stage, list(snakemake.input.chunks)
    ),
)
