"""Snakemake shim: send one hand-off piece to another site's instance (the sending half).

Nothing is sent on a plan that a move at the central site replaced.
"""

from multisite.handoff import send_handoff
from multisite.placement import read_placement
from multisite.plan_channel import check_plan_current
from multisite.workflow import run_rule


def send(campaign):
    """Check that this instance runs the newest plan, then send."""
    check_plan_current(campaign)
    return send_handoff(
        campaign,
        snakemake.wildcards.handoff,
        snakemake.wildcards.site,
        snakemake.wildcards.piece,
        read_placement(snakemake.input.placement),
    )


run_rule(snakemake, send)
