"""Snakemake shim: bring one hand-off piece to its destination and verify it arrived.

This instance sends it too when it runs the source site; otherwise it waits for
the source site's instance to send it.
"""

from multisite.handoff import receive_handoff, run_handoff
from multisite.placement import read_placement
from multisite.targets import Targets
from multisite.workflow import run_rule

handoff, site, piece = snakemake.wildcards.handoff, snakemake.wildcards.site, snakemake.wildcards.piece


def step(campaign):
    """Both halves when this instance sends the hand-off, else only the receiving half."""
    if Targets(campaign, campaign.layout).sends(handoff, site):
        return run_handoff(campaign, handoff, site, piece, read_placement(snakemake.input.placement))
    return receive_handoff(campaign, handoff, site, piece)


run_rule(snakemake, step)
