"""Snakemake shim: send one hand-off piece to another site's instance (the sending half)."""

from multisite.handoff import send_handoff
from multisite.placement import read_placement
from multisite.workflow import run_rule

run_rule(
    snakemake,
    lambda campaign: send_handoff(
        campaign,
        snakemake.wildcards.handoff,
        snakemake.wildcards.site,
        snakemake.wildcards.piece,
        read_placement(snakemake.input.placement),
    ),
)
