"""Campaign metadata that travels as Butler datasets: a site's placement share and event logs.

The central site sends each site's instance the rows of the placement table it
needs (dataset ``campaign_placement``) with its raws; every instance sends its
event log (dataset ``campaign_events``) with its hand-offs to the central site, so
the central status and report show the whole campaign. Both are stored once per
content or per hand-off: what a hand-off moves must not change when it is rerun.
"""

from __future__ import annotations

__all__ = (
    "EVENTS_DATASET_TYPE",
    "PLACEMENT_DATASET_TYPE",
    "carried_events",
    "read_placement_share",
    "store_events_snapshot",
    "store_placement_share",
)

import hashlib
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from lsst.daf.butler import DatasetRef, DatasetType

from .butler_utils import open_butler, repo_write_lock
from .config import Campaign, Site
from .errors import CampaignConfigError
from .events import Event, read_events
from .plan_version import plan_version

EVENTS_DATASET_TYPE = "campaign_events"
"""Dataset type of an instance's event log, carried to the central site by hand-offs."""

PLACEMENT_DATASET_TYPE = "campaign_placement"
"""Dataset type of a site's share of the placement table, carried to the site with its raws."""


def store_events_snapshot(campaign: Campaign, site: Site, handoff: str) -> DatasetRef:
    """Store this instance's event log in the site's repository, once per hand-off piece.

    ``handoff`` names the piece, ``<handoff>/<piece>``.

    The snapshot is part of what the hand-off moves, so a rerun reuses it: a new
    one would change a hand-off that may already be registered (and closed) in Rucio.
    """
    run = f"{campaign.root_collection}/{site.name}/events/{handoff}"
    with repo_write_lock(site.repo), open_butler(site.repo, writeable=True) as butler:
        dataset_type = DatasetType(EVENTS_DATASET_TYPE, (), "StructuredDataDict", universe=butler.dimensions)
        butler.registry.registerDatasetType(dataset_type)
        butler.registry.registerRun(run)
        if existing := butler.find_dataset(dataset_type, collections=run):
            return existing
        events = [asdict(event) for event in read_events(sorted(campaign.layout.events.glob("*.jsonl")))]
        return butler.put({"events": events}, dataset_type, run=run)


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
    with repo_write_lock(central.repo), open_butler(central.repo, writeable=True) as butler:
        dataset_type = DatasetType(PLACEMENT_DATASET_TYPE, (), "DataFrame", universe=butler.dimensions)
        butler.registry.registerDatasetType(dataset_type)
        butler.registry.registerRun(run)
        existing = butler.find_dataset(dataset_type, collections=run)
        return existing or butler.put(rows, dataset_type, run=run)


def read_placement_share(campaign: Campaign, site: str) -> pd.DataFrame:
    """Read the placement share the central site sent to ``site`` with its raws.

    Raises
    ------
    CampaignConfigError
        Raised when the share belongs to another plan than this instance's
        configuration makes (the instances' units tables or stages differ).
    """
    butler = open_butler(campaign.sites[site].repo)
    ref = butler.find_dataset(PLACEMENT_DATASET_TYPE, collections=campaign.handoff_chain(site))
    if ref is None:
        raise LookupError(
            f"{site}: no {PLACEMENT_DATASET_TYPE} in {campaign.handoff_chain(site)}; the raws hand-off "
            "from the central site brings it"
        )
    central_version, own_version = ref.run.split("/")[-2], plan_version(campaign)
    # A share sent before plans were versioned (``.../placement/<digest>``) is not checked.
    if central_version not in ("placement", own_version):
        raise CampaignConfigError(
            f"instance {site}",
            [
                f"units / stages: the central site's plan is version {central_version} ({ref.run}), this "
                f"instance's config makes version {own_version}: the two configs' units tables or stages "
                f"differ. Give {site}'s instance the central site's units table and stages, then run again."
            ],
        )
    return butler.get(ref)
