"""Snakemake shim: bring one hand-off to its destination and verify it arrived.

This instance sends it too when it runs the source site; otherwise it waits for
the source site's instance to send it.
"""

from multisite.placement import read_placement
from multisite.transfer import receive_handoff, run_handoff
from multisite.workflow import run_rule

handoff, site = snakemake.wildcards.handoff, snakemake.wildcards.site
if "placement" in snakemake.input.keys():
    run_rule(snakemake, lambda c: run_handoff(c, handoff, site, read_placement(snakemake.input.placement)))
else:
    run_rule(snakemake, lambda campaign: receive_handoff(campaign, handoff, site))
