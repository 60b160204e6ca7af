"""Snakemake shim: run one chunk of a stage at one site through BPS and verify its outputs."""

from multisite.bps import run_stage
from multisite.placement import read_placement
from multisite.workflow import run_rule

run_rule(
    snakemake,
    lambda campaign: run_stage(
        campaign,
        snakemake.wildcards.site,
        snakemake.wildcards.stage,
        snakemake.wildcards.chunk,
        snakemake.input.submit_yaml,
        read_placement(snakemake.input.placement),
    ),
)
