"""Snakemake shim: write the BPS submit YAML of one chunk of a stage at one site."""

from multisite.bps import write_stage_yaml
from multisite.placement import read_placement
from multisite.workflow import run_rule

run_rule(
    snakemake,
    lambda campaign: write_stage_yaml(
        campaign,
        snakemake.wildcards.site,
        snakemake.wildcards.stage,
        snakemake.wildcards.chunk,
        read_placement(snakemake.input.placement),
        snakemake.output.submit_yaml,
    ),
)
