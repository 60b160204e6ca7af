"""Snakemake shim: bring one hand-off piece to its destination and verify it arrived.

This instance sends it too when it runs the source site; otherwise it waits for
the source site's instance to send it.
"""

from multisite.handoff import bring_handoff
from multisite.workflow import run_rule

run_rule(
    snakemake,
    lambda campaign: bring_handoff(
        campaign,
        snakemake.wildcards.handoff,
        snakemake.wildcards.site,
        snakemake.wildcards.piece,
        snakemake.input.get("placement"),
    ),
)
