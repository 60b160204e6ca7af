"""Snakemake shim: verify every input a site's raws piece brought is in its repository."""

from multisite.placement import read_placement, verify_site_inputs
from multisite.workflow import run_rule

run_rule(
    snakemake,
    lambda campaign: verify_site_inputs(
        campaign,
        snakemake.wildcards.site,
        snakemake.wildcards.piece,
        read_placement(snakemake.input.placement),
    ),
)
