"""Campaign metadata that travels as Butler datasets: placement shares, moved plans and event logs.

The central site sends each site's instance the rows of the placement table it
needs (dataset ``campaign_placement``) with its raws, and after a move the moved
plan (dataset ``campaign_plan``) with its new share; every instance sends its
event log (dataset ``campaign_events``) with its hand-offs to the central site, so
the central status and report show the whole campaign. Both are stored once per
content or per hand-off: what a hand-off moves must not change when it is rerun.
"""

from __future__ import annotations

__all__ = (
    "EVENTS_DATASET_TYPE",
    "PLACEMENT_DATASET_TYPE",
    "PLAN_DATASET_TYPE",
    "carried_events",
    "read_placement_share",
    "read_plan_record",
    "store_events_snapshot",
    "store_placement_share",
    "store_plan_record",
)

import hashlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from lsst.daf.butler import DatasetRef, DatasetType

from .butler_utils import open_butler, repo_write_lock
from .config import Campaign, Site
from .errors import CampaignConfigError
from .events import Event, read_events
from .plan_version import plan_record, plan_version

EVENTS_DATASET_TYPE = "campaign_events"
"""Dataset type of an instance's event log, carried to the central site by hand-offs."""

PLACEMENT_DATASET_TYPE = "campaign_placement"
"""Dataset type of a site's share of the placement table, carried to the site with its raws."""

PLAN_DATASET_TYPE = "campaign_plan"
"""Dataset type of a moved plan's record, carried with its placement share to every site instance."""


def store_events_snapshot(campaign: Campaign, site: Site, handoff: str) -> DatasetRef:
    """Store this instance's event log in the site's repository, once per hand-off piece.

    ``handoff`` names the piece, ``<handoff>/<piece>``.

    The snapshot is part of what the hand-off moves, so a rerun reuses it: a new
    one would change a hand-off that may already be registered (and closed) in Rucio.
    """
    run = f"{campaign.root_collection}/{site.name}/events/{handoff}"

    def snapshot() -> dict:
        return {"events": [asdict(e) for e in read_events(sorted(campaign.layout.events.glob("*.jsonl")))]}

    return _store_once(site.repo, run, EVENTS_DATASET_TYPE, "StructuredDataDict", snapshot)


def _store_once(
    repo: str, run: str, dataset_type_name: str, storage_class: str, content: Callable[[], Any]
) -> DatasetRef:
    """Store a dataset with no dimensions in ``run`` of ``repo``, unless the RUN has one already.

    ``content`` is called only to store it.
    """
    with repo_write_lock(repo), open_butler(repo, writeable=True) as butler:
        dataset_type = DatasetType(dataset_type_name, (), storage_class, universe=butler.dimensions)
        butler.registry.registerDatasetType(dataset_type)
        butler.registry.registerRun(run)
        existing = butler.find_dataset(dataset_type, collections=run)
        return existing or butler.put(content(), dataset_type, run=run)


def carried_events(campaign: Campaign) -> list[Event]:
    """Return the events other instances' hand-offs carried to the central repository."""
    repo = campaign.central.repo
    if "://" not in repo and not (Path(repo) / "butler.yaml").exists():
        return []
    butler = open_butler(repo)
    if not butler.registry.queryDatasetTypes(EVENTS_DATASET_TYPE):
        return []
    refs = butler.query_datasets(
        EVENTS_DATASET_TYPE,
        collections=f"{campaign.root_collection}/*/events/*",
        find_first=False,
        explain=False,
    )
    return [Event(**data) for ref in refs for data in butler.get(ref)["events"]]


def store_placement_share(
    campaign: Campaign, central: Site, site: str, placement: pd.DataFrame
) -> DatasetRef:
    """Store the placement rows a site needs in the central repository (once per content).

    The rows of every visit the site holds: enough for the site to find its raws,
    its chunks and the visits it owns. Its RUN, ``<root>/<site>/placement/<plan
    version>/<digest>``, tells the site's instance which plan it belongs to.
    """
    rows = placement[placement["visit"].isin(placement.loc[placement["site"] == site, "visit"])]
    rows = rows.reset_index(drop=True)
    digest = hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:12]
    run = f"{campaign.root_collection}/{site}/placement/{plan_version(campaign)}/{digest}"
    return _store_once(central.repo, run, PLACEMENT_DATASET_TYPE, "DataFrame", lambda: rows)


def read_placement_share(campaign: Campaign, site: str) -> pd.DataFrame:
    """Read the placement share of this instance's plan, which the central site sent to ``site``.

    The raws hand-off brings the first share, a published plan (`store_plan_record`)
    the share of each moved plan.

    Raises
    ------
    CampaignConfigError
        Raised when no share belongs to the plan this instance's configuration makes
        (the instances' units tables or stages differ).
    """
    butler = open_butler(campaign.sites[site].repo)
    chain = campaign.handoff_chain(site)
    refs = butler.query_datasets(PLACEMENT_DATASET_TYPE, collections=chain, find_first=False, explain=False)
    if not refs:
        raise LookupError(
            f"{site}: no {PLACEMENT_DATASET_TYPE} in {chain}; the raws hand-off from the central site "
            "brings it"
        )
    own_version = plan_version(campaign)
    # A share sent before plans were versioned (``.../placement/<digest>``) is not checked.
    mine = [ref for ref in refs if ref.run.split("/")[-2] in ("placement", own_version)]
    if not mine:
        versions = sorted({ref.run.split("/")[-2] for ref in refs})
        raise CampaignConfigError(
            f"instance {site}",
            [
                f"units / stages: the central site's plan is version {', '.join(versions)}, this "
                f"instance's config makes version {own_version}: the two configs' units tables or stages "
                f"differ. Give {site}'s instance the central site's units table and stages, then run again."
            ],
        )
    return butler.get(mine[0])


def store_plan_record(campaign: Campaign, central: Site, site: str, piece: str) -> DatasetRef:
    """Store the campaign's plan record (`multisite.plan_version.plan_record`) for ``site``'s instance.

    In the central repository, RUN ``<root>/<site>/plan/<piece>``: what a published
    plan (``plan/<site>/<piece>``) carries, with the site's placement share.
    """
    run = f"{campaign.root_collection}/{site}/plan/{piece}"
    return _store_once(
        central.repo, run, PLAN_DATASET_TYPE, "StructuredDataDict", lambda: plan_record(campaign)
    )


def read_plan_record(campaign: Campaign, site: str, piece: str) -> dict:
    """Read the plan record a published plan ``plan/<site>/<piece>`` brought to ``site``."""
    butler = open_butler(campaign.sites[site].repo)
    return butler.get(PLAN_DATASET_TYPE, collections=f"{campaign.root_collection}/{site}/plan/{piece}")
