"""Hand-offs: what moves between sites, and the sending and receiving halves.

A hand-off has two halves. The sending half decides what moves (the pipeline's
dataset types, restricted to the site's data IDs, with the dimension records and
campaign metadata the destination needs) and publishes it through a transfer
backend (`multisite.backends`), with a manifest of every file's size and adler32
recorded at the source (`multisite.integrity`). The receiving half waits for that
publication, brings the files to the destination and imports them into the
destination Butler, verifies every file there against its source's size and
checksum (on every run: a rerun re-verifies what an earlier run delivered), then
checks that every dataset is stored there. A file that fails is named with the
command that repairs it (``multisite repair``, `repair_site`).

`run_handoff` does both halves, in an instance that runs both sites;
`send_handoff` and `receive_handoff` do one half each, in the instances of the
sending and the receiving site, which see nothing of each other but what the
backend carries.
"""

from __future__ import annotations

__all__ = (
    "arrived",
    "bring_handoff",
    "make_backend",
    "receive_handoff",
    "received_handoffs",
    "repair_site",
    "run_handoff",
    "send_handoff",
)

import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from lsst.daf.butler import Butler, DatasetRef
from lsst.resources import ResourcePath

from .backends import ButlerBackend, HandoffPayload, TransferBackend
from .butler_utils import ensure_in_chain, open_butler, repo_write_lock, stream_datasets
from .config import Campaign, Site
from .errors import HandoffError
from .events import EventLog
from .flow import HandoffPiece, workflow_pieces
from .layout import Layout
from .markers import provenance
from .metadata import store_events_snapshot, store_placement_share
from .pipeline import PipelineFlow
from .placement import SiteSelection, read_placement
from .rucio_backend import RucioBackend
from .states import EventKind
from .targets import Targets

_LOG = logging.getLogger(__name__)

# Dimension records a site needs beyond the data IDs of the datasets it receives:
# visits (with their detector regions, for spatial joins) and its sky units.
VISIT_ELEMENTS = (
    "visit_system",
    # Every detector: a visit's regions name detectors whose raws may travel in another piece.
    "detector",
    "visit",
    "visit_definition",
    "visit_detector_region",
    "visit_system_membership",
)
SKY_ELEMENTS = ("skymap", "tract", "patch")

ARRIVAL_PAGE = 10_000
"""Datasets looked up at once when a hand-off's arrival is checked."""


def make_backend(campaign: Campaign) -> TransferBackend:
    """Return the transfer backend the campaign is configured for."""
    if campaign.transfer_backend == "butler":
        return ButlerBackend(
            campaign.name, campaign.transfer_mode, campaign.import_batch, campaign.datasets_per_zip
        )
    if campaign.transfer_backend == "rucio":
        return RucioBackend(
            campaign.name,
            campaign.rucio,
            import_batch=campaign.import_batch,
            datasets_per_zip=campaign.datasets_per_zip,
        )
    raise ValueError(
        f"transfer.backend {campaign.transfer_backend!r} is not available; use 'butler' or 'rucio'"
    )


def _site_records(butler: Butler, campaign: Campaign, selection: SiteSelection) -> dict[str, list]:
    """Return the visit and sky-unit records a site needs to run its stages."""
    records: dict[str, list] = {}
    visits = {"visits": sorted(selection.visits_needed)}
    for element in VISIT_ELEMENTS:
        where = "" if element in ("visit_system", "detector") else "visit IN (:visits)"
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


def _endpoints(campaign: Campaign, piece: HandoffPiece) -> tuple[Site, Site, list[str]]:
    """Return the source site, destination site and source collections of a hand-off piece."""
    handoff = piece.handoff
    sender, receiver = handoff.ends(campaign, piece.site)
    if handoff.name == "raws":
        collections = [campaign.raw_collection]
    else:
        collections = [campaign.stage_chain(sender, stage) for stage in reversed(handoff.producers)]
        if handoff.to_central:
            # The piece's own chunks of the stage it comes from, which the site may still run.
            collections[:1] = [campaign.stage_chain(sender, handoff.cut_stage, c) for c in piece.chunks]
    return campaign.sites[sender], campaign.sites[receiver], collections


@dataclass
class _Outgoing:
    """What one hand-off for one site moves, from where to where."""

    label: str
    source: Site
    destination: Site
    collections: list[str]
    payload: HandoffPayload


def _outgoing(campaign: Campaign, piece: HandoffPiece, placement: pd.DataFrame) -> _Outgoing:
    """Return what a hand-off piece moves: source, destination, source collections, payload.

    The raws are listed; the processed datasets are a stream the send reads once.
    """
    handoff, site = piece.handoff, piece.site
    source, destination, collections = _endpoints(campaign, piece)
    source_butler = open_butler(source.repo)
    if handoff.to_central or handoff.name == "raws":
        selection = SiteSelection.from_placement(campaign, placement, site, piece.units)
    else:
        # A fan-out piece: what its chunks' units overlap, of the site's share.
        whole = SiteSelection.from_placement(campaign, placement, site)
        selection = whole.overlapping(source_butler, campaign, piece.units)
    types = PipelineFlow(campaign).handoff_types(handoff)

    def selected(dataset_type: str, butler: Butler) -> Iterator[DatasetRef]:
        # A zip carries its datasets' dimension records; a raws export finds its own.
        found = stream_datasets(butler, dataset_type, collections, with_records=dataset_type != "raw")
        return (ref for ref in found if selection.accepts(ref.dataId, owned=handoff.to_central))

    payload = HandoffPayload(list(selected("raw", source_butler)) if "raw" in types else [])
    extras = []
    if source.repo != destination.repo:
        if handoff.name == "raws":
            payload.records = _site_records(source_butler, campaign, selection)
            if piece == workflow_pieces(campaign, handoff, site)[0]:
                # The site's instance learns its share of the placement with its first raws.
                extras.append(store_placement_share(campaign, source, site, placement))
        if handoff.to_central:
            # The sending instance's event log travels with its data, for the central status.
            extras.append(store_events_snapshot(campaign, source, f"{handoff.name}/{piece.name}"))
    # The stream's own Butler: it holds a cursor open while the backend zips with another.
    streaming = open_butler(source.repo)
    products = (selected(t, streaming) for t in types if t != "raw")
    payload.products = itertools.chain(itertools.chain.from_iterable(products), extras)
    _LOG.info(
        "Hand-off %s: %d raws and the processed datasets of %d types, %s -> %s.",
        piece.label,
        len(payload.raws),
        len(types) - ("raw" in types),
        source.name,
        destination.name,
    )
    return _Outgoing(piece.label, source, destination, collections, payload)


def arrived(campaign: Campaign, label: str, destination: Site, dataset_ids: list[str]) -> dict[str, Any]:
    """Check every dataset of a hand-off is stored at the destination; chain its RUNs there.

    The datasets are looked up a page at a time, so that a large hand-off's refs are never all held.
    """
    missing: list[str] = []
    runs: set[str] = set()
    counts: Counter[str] = Counter()
    files: dict[str, ResourcePath] = {}
    with (
        repo_write_lock(destination.repo, imports=True),
        open_butler(destination.repo, writeable=True) as dest,
    ):
        for page in itertools.batched(dataset_ids, ARRIVAL_PAGE):
            known = {str(ref.id): ref for ref in dest.get_many_datasets(page)}
            stored = dest.stored_many(known.values())
            missing += [i for i in page if i not in known or not stored[known[i]]]
            runs.update(ref.run for ref in known.values())
            counts.update(ref.datasetType.name for ref in known.values())
            # A zip is the file of all its datasets: count it once.
            files.update(
                (u.primaryURI.ospath, u.primaryURI) for u in dest.get_many_uris(known.values()).values()
            )
        if missing:
            raise HandoffError(
                f"Hand-off {label}: {len(missing)} of {len(dataset_ids)} datasets are missing in "
                f"{destination.name}'s repository {destination.repo} after the transfer:\n"
                + "\n".join(f"    dataset {i}" for i in missing[:20])
                + "\nRerun the rule; already delivered datasets are not moved again."
            )
        ensure_in_chain(dest, campaign.handoff_chain(destination.name), sorted(runs))
    return {
        "datasets": dict(sorted(counts.items())),
        "bytes": sum(uri.size() for uri in files.values()),
        "destination_chain": campaign.handoff_chain(destination.name),
        "runs": sorted(runs),
    }


def _identity(
    label: str, source: Site, destination: Site, backend: TransferBackend, same_repo: bool = False
) -> dict[str, str]:
    """Return the first fields of every hand-off marker: what, for which site, from where to where, how."""
    handoff, site, piece = label.split("/")
    return {
        "handoff": handoff,
        "site": site,
        "piece": piece,
        "source": source.name,
        "destination": destination.name,
        "backend": "none (same repository)" if same_repo else backend.name,
    }


def run_handoff(
    campaign: Campaign,
    handoff_name: str,
    site: str,
    piece: str,
    placement: pd.DataFrame,
    backend: TransferBackend | None = None,
) -> dict[str, Any]:
    """Move one piece of a hand-off for one site and verify it arrived (both halves in this instance).

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    handoff_name : `str`
        ``raws``, ``fanin_<stage>``, ``fanout_<stage>`` or ``final``.
    site : `str`
        The processing site at the far end from the central site.
    piece : `str`
        The piece's name (`multisite.flow.workflow_pieces`).
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
    multisite.errors.DamagedFilesError
        Raised naming each file at the destination that is missing or differs from
        its source's size and checksum, and the repair command.
    HandoffError
        Raised when a dataset is missing at the destination after the transfer.
    """
    wanted = Targets(campaign, campaign.layout).piece(handoff_name, site, piece)
    return _deliver(campaign, wanted, placement, backend or make_backend(campaign))


def _deliver(
    campaign: Campaign, piece: HandoffPiece, placement: pd.DataFrame, backend: TransferBackend
) -> dict[str, Any]:
    """Do both halves of a hand-off piece (`run_handoff`)."""
    started = datetime.now(UTC)
    out = _outgoing(campaign, piece, placement)
    same_repo = out.source.repo == out.destination.repo
    if same_repo:
        details = {}
        dataset_ids = [str(ref.id) for ref in itertools.chain(out.payload.raws, out.payload.zipped())]
    else:
        details, dataset_ids = backend.deliver(out.source, out.destination, out.payload, out.label)
    return {
        **_identity(out.label, out.source, out.destination, backend, same_repo),
        "backend_details": details,
        "source_collections": out.collections,
        "dimension_records": {element: len(records) for element, records in out.payload.records.items()},
        **arrived(campaign, out.label, out.destination, dataset_ids),
        **provenance(started),
    }


def send_handoff(
    campaign: Campaign,
    handoff_name: str,
    site: str,
    piece: str,
    placement: pd.DataFrame,
    backend: TransferBackend | None = None,
) -> dict[str, Any]:
    """Do the sending half of a hand-off, in the instance of its source site.

    Parameters are those of `run_handoff`. Returns the provenance of the ``sent`` marker.
    """
    started = datetime.now(UTC)
    backend = backend or make_backend(campaign)
    out = _outgoing(campaign, Targets(campaign, campaign.layout).piece(handoff_name, site, piece), placement)
    details = backend.send(out.source, out.destination, out.payload, out.label)
    return {
        **_identity(out.label, out.source, out.destination, backend),
        "backend_details": details,
        "source_collections": out.collections,
        "datasets": out.payload.counts(),
        **provenance(started),
    }


def receive_handoff(
    campaign: Campaign, handoff_name: str, site: str, piece: str, backend: TransferBackend | None = None
) -> dict[str, Any]:
    """Do the receiving half of a hand-off, in the instance of its destination site.

    Waits (up to ``transfer.wait.timeout_s``) for the source site's instance to
    send it, recording a ``waiting`` event that names the hand-off, the sender and
    since when; then brings and imports it, and verifies it.

    Raises
    ------
    multisite.errors.DamagedFilesError
        Raised naming each file at the destination that is missing or differs from
        its source's size and checksum, and the repair command.
    HandoffError
        Raised on timeout, naming the site to look at, or when a dataset is missing.
    """
    wanted = Targets(campaign, campaign.layout).piece(handoff_name, site, piece)
    return _receive(campaign, wanted, backend or make_backend(campaign))


def bring_handoff(
    campaign: Campaign, handoff_name: str, site: str, piece: str, placement_table: str | None
) -> dict[str, Any]:
    """Bring a hand-off piece here: both halves when this instance sends it too, else the receiving one.

    The hand-off rule's step. Parameters are those of `run_handoff`, but the
    placement table's path (read only to send; `None` for a piece this instance
    only receives).
    """
    targets = Targets(campaign, campaign.layout)
    wanted = targets.piece(handoff_name, site, piece)
    if targets.sends(handoff_name, site):
        if placement_table is None:
            raise ValueError(f"Hand-off {wanted.label}: sending it needs the placement table")
        return _deliver(campaign, wanted, read_placement(placement_table), make_backend(campaign))
    return _receive(campaign, wanted, make_backend(campaign))


def _receive(campaign: Campaign, wanted: HandoffPiece, backend: TransferBackend) -> dict[str, Any]:
    """Do the receiving half of a hand-off piece (`receive_handoff`)."""
    started = datetime.now(UTC)
    source, destination, _ = _endpoints(campaign, wanted)
    label = wanted.label
    if not backend.published(source, destination, label):
        _wait_until_published(campaign, backend, source, destination, label, started)
    details, dataset_ids = backend.receive(source, destination, label)
    return {
        **_identity(label, source, destination, backend),
        "backend_details": details,
        **arrived(campaign, label, destination, dataset_ids),
        **provenance(started),
    }


def _wait_until_published(
    campaign: Campaign,
    backend: TransferBackend,
    source: Site,
    destination: Site,
    label: str,
    started: datetime,
) -> None:
    """Wait for the sending instance to publish a hand-off, saying so in the event log."""
    handoff_name, site, piece = label.split("/")
    message = (
        f"waiting for {handoff_name} from {source.name} since {started:%Y-%m-%d %H:%M:%S} UTC "
        f"(timeout {campaign.wait_timeout:g} s)"
    )
    EventLog(campaign.layout.events, campaign.instance or "all").record(
        EventKind.WAITING, Layout.handoff_step(handoff_name, site, piece), site, message, source=source.name
    )
    deadline = time.monotonic() + campaign.wait_timeout
    while not backend.published(source, destination, label):
        _LOG.info("Hand-off %s: %s.", label, message)
        if time.monotonic() >= deadline:
            raise HandoffError(
                f"Hand-off {label}: {source.name} has not sent it after {campaign.wait_timeout:g} s "
                "(transfer.wait.timeout_s). Look at that site's instance (multisite status there); "
                "rerun this rule to wait again."
            )
        time.sleep(min(campaign.wait_interval, max(0.0, deadline - time.monotonic())))


def received_handoffs(campaign: Campaign, site: str) -> list[tuple[str, Site, Site]]:
    """Return the hand-off pieces a site receives from another repository.

    Returns
    -------
    handoffs : `list` [`tuple` [`str`, `Site`, `Site`]]
        Label (``<handoff>/<site>/<piece>``), source and destination of each.
    """
    received = []
    for piece in workflow_pieces(campaign):
        sender, receiver = piece.handoff.ends(campaign, piece.site)
        source, destination = campaign.sites[sender], campaign.sites[receiver]
        if receiver == site and source.repo != destination.repo:
            received.append((piece.label, source, destination))
    return received


def repair_site(campaign: Campaign, site: str, backend: TransferBackend) -> list[dict[str, Any]]:
    """Fetch the damaged or missing files of every hand-off a site received again, and verify them.

    Each hand-off the site received (raws, fan-outs; at the central site the
    fan-ins and final products) is checked file by file against what its source
    recorded; each file that is missing or differs is fetched again through the
    backend (`TransferBackend.repair`) and verified. Registry entries are kept as
    they are, so the workflow goes on afterwards with no duplicate dataset.
    Hand-offs not received yet are left to the workflow.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    site : `str`
        The site whose received files to repair.
    backend : `TransferBackend`
        The campaign's transfer backend.

    Returns
    -------
    outcomes : `list` [`dict`]
        One per hand-off: ``handoff``, ``source``, ``state`` (``not sent``,
        ``not received``, ``intact`` or ``repaired``), ``files`` checked and the
        names ``repaired``.

    Raises
    ------
    DamagedFilesError
        Raised when a file could not be repaired (its source's copy differs too),
        naming it.
    ValueError
        Raised when ``site`` is not a site of the campaign.
    """
    campaign.require_site(site)
    outcomes = []
    for label, source, destination in received_handoffs(campaign, site):
        outcome = {"handoff": label, "source": source.name} | backend.repair(source, destination, label)
        _LOG.info("Repair %s at %s: %s.", label, site, outcome["state"])
        outcomes.append(outcome)
    return outcomes
