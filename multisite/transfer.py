"""Hand-offs: moving datasets between sites' Butlers through a transfer backend.

`run_handoff` decides what moves (the pipeline's dataset types, restricted to the
site's data IDs) and checks that it arrived; a `TransferBackend` does the moving.
`ButlerBackend` copies repository to repository, for a shared filesystem and the
demo; a Rucio backend fits behind the same interface.
"""

from __future__ import annotations

__all__ = (
    "ButlerBackend",
    "HandoffError",
    "HandoffPayload",
    "TransferBackend",
    "make_backend",
    "run_handoff",
    "verify_site_inputs",
)

import abc
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from lsst.daf.butler import Butler, DatasetRef, DatasetType, DimensionRecord

from .butler_utils import ensure_in_chain, open_butler, repo_write_lock
from .config import Campaign, Site
from .events import read_events
from .flow import Handoff, handoffs
from .markers import provenance
from .pipeline import PipelineFlow
from .placement import SiteSelection

_LOG = logging.getLogger(__name__)

# Dimension records a site needs beyond the data IDs of the datasets it receives:
# visits (with their detector regions, for spatial joins) and its sky units.
EVENTS_DATASET_TYPE = "campaign_events"
"""Dataset type of an instance's event log, carried to the central site by hand-offs."""

VISIT_ELEMENTS = (
    "visit_system",
    "visit",
    "visit_definition",
    "visit_detector_region",
    "visit_system_membership",
)
SKY_ELEMENTS = ("skymap", "tract", "patch")


class HandoffError(RuntimeError):
    """A hand-off did not deliver everything it should have."""

    event_kind = "failed"
    """Kind of the campaign event recorded for it (``stuck`` for a transfer that stopped moving)."""


@dataclass
class HandoffPayload:
    """What one hand-off moves: dataset refs in the source repository, and records.

    Attributes
    ----------
    refs : `list` [`lsst.daf.butler.DatasetRef`]
        Datasets to move (resolved in the source repository).
    records : `dict` [`str`, `list` [`lsst.daf.butler.DimensionRecord`]]
        Extra dimension records by element, in insertion order.
    """

    refs: list[DatasetRef]
    records: dict[str, list[DimensionRecord]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(ref.datasetType.name for ref in self.refs).items()))


class TransferBackend(abc.ABC):
    """Moves a hand-off's datasets and records into the destination Butler."""

    name: str

    @abc.abstractmethod
    def deliver(self, source: Site, destination: Site, payload: HandoffPayload, label: str) -> dict[str, Any]:
        """Make the payload's datasets present in the destination Butler.

        Parameters
        ----------
        source, destination : `Site`
            Sites whose repositories the data moves between.
        payload : `HandoffPayload`
            What to move.
        label : `str`
            Name of the hand-off (for logs and any backend bookkeeping).

        Returns
        -------
        provenance : `dict`
            Backend-specific facts for the hand-off marker.
        """


class ButlerBackend(TransferBackend):
    """Repository-to-repository transfer with `lsst.daf.butler.Butler.transfer_from`.

    Parameters
    ----------
    mode : `str`
        File transfer mode (``copy``, ``link``, ...).
    """

    name = "butler"

    def __init__(self, mode: str = "copy"):
        self.mode = mode

    def deliver(self, source: Site, destination: Site, payload: HandoffPayload, label: str) -> dict[str, Any]:
        source_butler = open_butler(source.repo)
        with repo_write_lock(destination.repo), open_butler(destination.repo, writeable=True) as dest:
            moved = dest.transfer_from(
                source_butler,
                payload.refs,
                transfer=self.mode,
                register_dataset_types=True,
                transfer_dimensions=True,
            )
            for element, records in payload.records.items():
                if records:
                    dest.registry.insertDimensionData(element, *records, skip_existing=True)
        return {"mode": self.mode, "transferred": len(moved)}


def make_backend(campaign: Campaign) -> TransferBackend:
    """Return the transfer backend the campaign is configured for."""
    if campaign.transfer_backend == "butler":
        return ButlerBackend(campaign.transfer_mode)
    if campaign.transfer_backend == "rucio":
        from .rucio_backend import RucioBackend

        return RucioBackend(campaign.name, campaign.rucio)
    raise ValueError(
        f"transfer.backend {campaign.transfer_backend!r} is not available; use 'butler' or 'rucio'"
    )


def _site_records(butler: Butler, campaign: Campaign, selection: SiteSelection) -> dict[str, list]:
    """Visit and sky-unit records a site needs to run its stages."""
    records: dict[str, list] = {}
    visits = {"visits": sorted(selection.visits_needed)}
    for element in VISIT_ELEMENTS:
        where = "" if element == "visit_system" else "visit IN (:visits)"
        records[element] = butler.query_dimension_records(
            element,
            data_id={"instrument": campaign.instrument},
            where=where,
            bind=visits,
            limit=None,
            explain=False,
        )
    tracts = {"tracts": sorted({tract for tract, _ in selection.units})}
    for element in SKY_ELEMENTS:
        where = "" if element == "skymap" else "tract IN (:tracts)"
        found = butler.query_dimension_records(
            element, data_id={"skymap": campaign.skymap}, where=where, bind=tracts, limit=None, explain=False
        )
        if element == "patch":
            found = [
                r for r in found if (r.tract, r.id) in selection.units or (r.tract, None) in selection.units
            ]
        records[element] = found
    return records


def _snapshot_events(campaign: Campaign, site: Site, started: datetime) -> DatasetRef:
    """Store this instance's event log in the site's repository, in a new RUN."""
    events = [asdict(event) for event in read_events(sorted(campaign.events.glob("*.jsonl")))]
    run = f"{campaign.root_collection}/{site.name}/events/{started.strftime('%Y%m%dT%H%M%S%fZ')}"
    with repo_write_lock(site.repo), open_butler(site.repo, writeable=True) as butler:
        dataset_type = DatasetType(EVENTS_DATASET_TYPE, (), "StructuredDataDict", universe=butler.dimensions)
        butler.registry.registerDatasetType(dataset_type)
        butler.registry.registerRun(run)
        return butler.put({"events": events}, dataset_type, run=run)


def _endpoints(campaign: Campaign, handoff: Handoff, site: str) -> tuple[Site, Site, list[str]]:
    """Source site, destination site and source collections of a hand-off for ``site``."""
    central = campaign.central
    if handoff.to_central:
        return (
            campaign.sites[site],
            central,
            [campaign.stage_chain(site, s) for s in reversed(handoff.producers)],
        )
    if handoff.name == "raws":
        return central, campaign.sites[site], [campaign.raw_collection]
    return (
        central,
        campaign.sites[site],
        [campaign.stage_chain(central.name, s) for s in reversed(handoff.producers)],
    )


def run_handoff(
    campaign: Campaign,
    handoff_name: str,
    site: str,
    placement: pd.DataFrame,
    backend: TransferBackend | None = None,
) -> dict[str, Any]:
    """Move one hand-off for one site and verify it arrived.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    handoff_name : `str`
        ``raws``, ``fanin_<stage>``, ``fanout_<stage>`` or ``final``.
    site : `str`
        The processing site at the far end from the central site.
    placement : `pandas.DataFrame`
        The campaign's placement table.
    backend : `TransferBackend`, optional
        Backend to use; the configured one by default.

    Returns
    -------
    marker : `dict`
        Provenance for the hand-off marker.

    Raises
    ------
    HandoffError
        Raised when a dataset is missing at the destination after the transfer.
    """
    started = datetime.now(UTC)
    handoff = next(h for h in handoffs(campaign) if h.name == handoff_name)
    backend = backend or make_backend(campaign)
    flow = PipelineFlow(campaign)
    dataset_types = flow.handoff_types(handoff)
    source, destination, collections = _endpoints(campaign, handoff, site)
    selection = SiteSelection.from_placement(campaign, placement, site)
    source_butler = open_butler(source.repo)
    refs = [
        ref
        for dataset_type in dataset_types
        for ref in source_butler.query_datasets(
            dataset_type, collections=collections, limit=None, explain=False
        )
        if selection.accepts(ref.dataId, owned=handoff.to_central)
    ]
    payload = HandoffPayload(refs)
    if handoff.name == "raws":
        payload.records = _site_records(source_butler, campaign, selection)
    same_repo = source.repo == destination.repo
    if handoff.to_central and not same_repo:
        # The sending instance's event log travels with its data, for the central status.
        payload.refs.append(_snapshot_events(campaign, source, started))
    _LOG.info(
        "Hand-off %s for %s: %d datasets %s -> %s%s.",
        handoff_name,
        site,
        len(refs),
        source.name,
        destination.name,
        " (same repository)" if same_repo else "",
    )
    uris = source_butler.get_many_uris(payload.refs)
    n_bytes = sum(uris[ref].primaryURI.size() for ref in payload.refs)
    details = {} if same_repo else backend.deliver(source, destination, payload, f"{handoff_name}/{site}")
    with repo_write_lock(destination.repo), open_butler(destination.repo, writeable=True) as dest:
        stored = dest.stored_many(refs)
        missing = [ref for ref, present in stored.items() if not present]
        if missing:
            listing = "\n".join(f"    {ref.datasetType.name} {ref.dataId} ({ref.id})" for ref in missing[:20])
            raise HandoffError(
                f"Hand-off {handoff_name} for {site}: {len(missing)} of {len(refs)} datasets are missing in "
                f"{destination.name}'s repository {destination.repo} after the transfer:\n{listing}\n"
                "Rerun the rule; already delivered datasets are not moved again."
            )
        runs = sorted({ref.run for ref in refs})
        ensure_in_chain(dest, campaign.handoff_chain(destination.name), runs)
    return {
        "handoff": handoff_name,
        "site": site,
        "source": source.name,
        "destination": destination.name,
        "backend": "none (same repository)" if same_repo else backend.name,
        "backend_details": details,
        "dataset_types": dataset_types,
        "datasets": payload.counts(),
        "bytes": n_bytes,
        "dimension_records": {element: len(records) for element, records in payload.records.items()},
        "source_collections": collections,
        "destination_chain": campaign.handoff_chain(destination.name),
        "runs": runs,
        **provenance(started),
    }


def verify_site_inputs(campaign: Campaign, site: str, placement: pd.DataFrame) -> dict[str, Any]:
    """Check that every raw, visit and sky unit a site needs is in its repository.

    Raises
    ------
    HandoffError
        Raised listing every missing input.
    """
    started = datetime.now(UTC)
    selection = SiteSelection.from_placement(campaign, placement, site)
    butler = open_butler(campaign.sites[site].repo)
    chain = campaign.handoff_chain(site)
    raws = {
        (ref.dataId["exposure"], ref.dataId["detector"])
        for ref in butler.query_datasets("raw", collections=chain, limit=None, explain=False)
    }
    problems = [f"raw exposure={e} detector={d}" for e, d in sorted(selection.raws_needed - raws)]
    visits = {r.id for r in butler.query_dimension_records("visit", limit=None, explain=False)}
    problems += [f"visit record {v}" for v in sorted(selection.visits_needed - visits)]
    patches = {(r.tract, r.id) for r in butler.query_dimension_records("patch", limit=None, explain=False)}
    problems += [
        f"patch record tract={t} patch={p}"
        for t, p in sorted(selection.units)
        if p is not None and (t, p) not in patches
    ]
    if problems:
        listing = "\n".join(f"    {p}" for p in problems[:50])
        raise HandoffError(
            f"{site}: {len(problems)} expected input(s) missing from {campaign.sites[site].repo} "
            f"(collection {chain}):\n{listing}\nRerun the 'raws' hand-off for {site}."
        )
    return {
        "site": site,
        "raws": len(selection.raws_needed),
        "visits": len(selection.visits_needed),
        "units": len(selection.units),
        "collection": chain,
        **provenance(started),
    }
