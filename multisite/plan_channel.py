"""How site instances learn a moved plan: the central site's instance publishes it through the backend.

Site instances share nothing but the transfer backend. ``multisite move``, at the
central site's instance, publishes the moved plan to every other site's instance as
hand-off ``plan/<site>/m<move>-<plan version>``: the plan's record and the site's
placement share, moved like any hand-off. A site's instance adopts the newest
published plan when it starts (`multisite.move.adopt_published_plan`), and before
each send checks that no newer plan was published (`check_plan_current`): a site
drained while its instance runs never sends the data of units that left it.
"""

from __future__ import annotations

__all__ = (
    "PLAN_HANDOFF",
    "check_plan_current",
    "in_backend",
    "newest_published_plan",
    "plan_label",
    "publish_plan",
    "receive_plan",
)

import re
from collections.abc import Callable
from datetime import UTC, datetime

from .backends import HandoffPayload, TransferBackend
from .config import Campaign
from .errors import HandoffError
from .flow import HandoffPiece
from .handoff import arrived, make_backend
from .markers import provenance, write_marker
from .metadata import store_placement_share, store_plan_record
from .placement import read_placement
from .plan_version import plan_version

PLAN_HANDOFF = "plan"
"""The hand-off that carries a moved plan to a site's instance."""

_PIECE = re.compile(r"m(\d{4,})-([0-9a-f]{16})")


def plan_label(site: str, piece: str) -> str:
    """Return the hand-off label of a plan published to ``site``'s instance."""
    return f"{PLAN_HANDOFF}/{site}/{piece}"


def _piece(campaign: Campaign) -> str:
    """Return the name of the campaign's plan as a piece: its last move's number and its version."""
    return f"m{max(unit.move for unit in campaign.units):04d}-{plan_version(campaign)}"


def newest_published_plan(campaign: Campaign, backend: TransferBackend) -> tuple[str, str] | None:
    """Return (piece, plan version) of the newest plan published for this instance's site, if any."""
    site = campaign.sites[campaign.instance]
    found = [
        _PIECE.fullmatch(name) for name in backend.begun_pieces(campaign.central, PLAN_HANDOFF, site.name)
    ]
    newest = max((match for match in found if match), key=lambda match: int(match[1]), default=None)
    return (newest[0], newest[2]) if newest else None


def publish_plan(campaign: Campaign, backend: TransferBackend | None = None) -> list[str]:
    """Publish the campaign's plan to every other site's instance that does not have it yet.

    Each gets its placement share and the plan's record; a sent marker
    (``markers/sent/plan/<site>/<piece>.json``) says it was published, so a
    publication cut short (an outage) is finished by the next ``multisite move``.

    Returns
    -------
    labels : `list` [`str`]
        The publications sent now.
    """
    backend = backend or make_backend(campaign)
    placement = read_placement(campaign.layout.placement_table)
    central, piece = campaign.central, _piece(campaign)
    labels = []
    for site in campaign.processing_sites:
        marker = campaign.layout.sent_marker(PLAN_HANDOFF, site.name, piece)
        if campaign.runs_here(site.name) or marker.exists():
            continue
        started = datetime.now(UTC)
        refs = [
            store_placement_share(campaign, central, site.name, placement),
            store_plan_record(campaign, central, site.name, piece),
        ]
        label = plan_label(site.name, piece)
        details = backend.send(central, site, HandoffPayload([], refs), label)
        write_marker(
            marker,
            {"plan": label, "plan_version": plan_version(campaign), "backend_details": details}
            | provenance(started),
        )
        labels.append(label)
    return labels


def receive_plan(campaign: Campaign, piece: str, backend: TransferBackend) -> None:
    """Bring a published plan into this instance's repository (once: its marker says it arrived)."""
    site = campaign.sites[campaign.instance]
    marker = campaign.layout.handoff_marker(PLAN_HANDOFF, site.name, piece)
    if marker.exists():
        return
    started = datetime.now(UTC)
    label = plan_label(site.name, piece)
    if not backend.published(campaign.central, site, label):
        raise HandoffError(
            f"Plan {label} is still being published by {campaign.central.name}'s instance (its "
            "`multisite move` has not ended): run this instance again once it has."
        )
    details, dataset_ids = backend.receive(campaign.central, site, label)
    record = arrived(campaign, label, site, dataset_ids)
    write_marker(marker, {"plan": label, "backend_details": details} | record | provenance(started))


def check_plan_current(campaign: Campaign, backend: TransferBackend | None = None) -> None:
    """Refuse to send from a site's instance whose plan is older than the newest published one.

    Raises
    ------
    HandoffError
        Raised naming both plans and what to do: run the instance again, which
        adopts the new plan first.
    """
    if campaign.instance is None or campaign.runs_here(campaign.central.name):
        return
    newest = newest_published_plan(campaign, backend or make_backend(campaign))
    own = plan_version(campaign)
    if newest is not None and newest[1] != own:
        raise HandoffError(
            f"{campaign.central.name}'s instance published plan {newest[0]} (a `multisite move`), and this "
            f"instance runs plan {own}: nothing is sent on a plan that changed. Run this instance again: "
            "it adopts the new plan when it starts, and retires what the move took from it."
        )


def in_backend(campaign: Campaign, backend: TransferBackend | None = None) -> Callable[[HandoffPiece], bool]:
    """Return whether a hand-off piece's sending has begun, as the transfer backend shows it.

    What site instances know of each other's sends. The backend is asked once per
    hand-off and site.
    """
    backend = backend or make_backend(campaign)
    begun: dict[tuple[str, str], set[str]] = {}

    def sent(piece: HandoffPiece) -> bool:
        key = (piece.handoff.name, piece.site)
        if key not in begun:
            sender, _ = piece.handoff.ends(campaign, piece.site)
            begun[key] = backend.begun_pieces(campaign.sites[sender], *key)
        return piece.name in begun[key]

    return sent
