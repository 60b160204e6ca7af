"""Snakemake shim: move one hand-off to or from one site and verify it arrived."""

from multisite.placement import read_placement
from multisite.transfer import run_handoff
from multisite.workflow import run_rule

run_rule(
    snakemake,
    lambda campaign: run_handoff(
        campaign,
        snakemake.wildcards.handoff,
        snakemake.wildcards.site,
        read_placement(snakemake.input.placement),
    ),
)
