"""Hand-offs: moving datasets between sites' Butlers through a transfer backend.

A hand-off has two halves. The sending half decides what moves (the pipeline's
dataset types, restricted to the site's data IDs) and publishes it: a Butler
export file written next to the source files. The receiving half waits for that
publication, brings the files to the destination and imports the export into the
destination Butler, then checks that every exported dataset is stored there.

`run_handoff` does both halves, in an instance that runs both sites;
`send_handoff` and `receive_handoff` do one half each, in the instances of the
sending and the receiving site, which see nothing of each other but what the
backend carries. A `TransferBackend` does the moving: `ButlerBackend` copies
from repository to repository on a shared filesystem (the demo), the Rucio
backend replicates through Rucio rules.
"""

from __future__ import annotations

__all__ = (
    "ButlerBackend",
    "HandoffError",
    "HandoffPayload",
    "TransferBackend",
    "make_backend",
    "receive_handoff",
    "run_handoff",
    "send_handoff",
    "verify_site_inputs",
)

import abc
import hashlib
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lsst.daf.butler.transfers  # noqa: F401 - registers the !uuid YAML tag of Butler exports
import pandas as pd
import yaml
from lsst.daf.butler import Butler, DatasetRef, DatasetType, DimensionRecord

from .butler_utils import ensure_in_chain, open_butler, repo_write_lock
from .config import Campaign, Site
from .events import EventLog, read_events
from .flow import Handoff, handoffs
from .markers import provenance
from .pipeline import PipelineFlow
from .placement import PLACEMENT_DATASET_TYPE, SiteSelection

_LOG = logging.getLogger(__name__)

# Dimension records a site needs beyond the data IDs of the datasets it receives:
# visits (with their detector regions, for spatial joins) and its sky units.
EVENTS_DATASET_TYPE = "campaign_events"
"""Dataset type of an instance's event log, carried to the central site by hand-offs."""

EXPORT_DIR = "handoff_exports"
"""Directory, in the source datastore, of the Butler export files that publish hand-offs."""

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
    """Moves hand-offs between sites' Butlers, in a sending and a receiving half.

    ``label`` names a hand-off for one site, ``<handoff>/<site>``; its export file
    is ``<EXPORT_DIR>/<campaign>/<handoff>/<site>.yaml`` under a datastore root.
    """

    name: str
    campaign: str

    @abc.abstractmethod
    def send(self, source: Site, destination: Site, payload: HandoffPayload, label: str) -> dict[str, Any]:
        """Publish the payload for the destination; idempotent.

        Returns
        -------
        provenance : `dict`
            Backend-specific facts for the marker.
        """

    @abc.abstractmethod
    def published(self, source: Site, destination: Site, label: str) -> bool:
        """Whether the sending half of the hand-off is complete."""

    @abc.abstractmethod
    def receive(self, source: Site, destination: Site, label: str) -> tuple[dict[str, Any], Path]:
        """Bring a published hand-off's files to the destination and import them; idempotent.

        Returns
        -------
        provenance : `dict`
            Backend-specific facts for the marker.
        export : `pathlib.Path`
            The hand-off's export file, whose datasets must now be in the destination Butler.
        """

    def deliver(
        self, source: Site, destination: Site, payload: HandoffPayload, label: str
    ) -> tuple[dict[str, Any], Path]:
        """Both halves, for an instance that runs both sites."""
        provenance = self.send(source, destination, payload, label)
        received, export = self.receive(source, destination, label)
        for key, value in received.items():
            both = isinstance(value, dict) and isinstance(provenance.get(key), dict)
            provenance[key] = provenance[key] | value if both else value
        return provenance, export

    def export_name(self, label: str) -> str:
        handoff, site = label.split("/", 1)
        return f"{EXPORT_DIR}/{self.campaign}/{handoff}/{site}.yaml"


class ButlerBackend(TransferBackend):
    """Repository to repository on a shared filesystem: the receiver copies from the source datastore.

    Parameters
    ----------
    campaign : `str`
        Campaign name (part of the export file names).
    mode : `str`
        File transfer mode (``copy``, ``link``, ...).
    """

    name = "butler"

    def __init__(self, campaign: str, mode: str = "copy"):
        self.campaign = campaign
        self.mode = mode

    def send(self, source: Site, destination: Site, payload: HandoffPayload, label: str) -> dict[str, Any]:
        butler = open_butler(source.repo)
        export = write_export(butler, datastore_root(butler), payload, self.export_name(label))
        return {"mode": self.mode, "export": str(export)}

    def published(self, source: Site, destination: Site, label: str) -> bool:
        return (datastore_root(open_butler(source.repo)) / self.export_name(label)).exists()

    def receive(self, source: Site, destination: Site, label: str) -> tuple[dict[str, Any], Path]:
        root = datastore_root(open_butler(source.repo))
        export = root / self.export_name(label)
        imported = import_export(destination, root, export, self.mode)
        return {"mode": self.mode, "transferred": imported}, export


def datastore_root(butler: Butler) -> Path:
    """Return the one local directory of a repository's file datastore."""
    roots = [root for root in butler.get_datastore_roots().values() if root is not None]
    if len(roots) != 1 or roots[0].scheme not in ("file", ""):
        raise HandoffError(f"hand-offs need one local file datastore per repository, found roots {roots}")
    return Path(roots[0].ospath).resolve()


def write_export(butler: Butler, root: Path, payload: HandoffPayload, name: str) -> Path:
    """Write the payload's Butler export (records, dataset types, RUNs, refs) under ``root``.

    The file appears complete or not at all: it is what tells a receiver the hand-off is sent.
    """
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp.yaml")
    with butler.export(filename=str(partial), format="yaml", transfer=None) as export:
        export.saveDatasets(payload.refs)
        for element, records in payload.records.items():
            if records:
                export.saveDimensionData(element, records)
    os.replace(partial, path)
    return path


def _read_export(export: Path) -> dict[str, Any]:
    with export.open() as stream:
        return yaml.safe_load(stream)


def exported_dataset_ids(export: Path) -> list[str]:
    """Dataset IDs in a Butler YAML export."""
    return _dataset_ids(_read_export(export))


def _dataset_ids(content: dict[str, Any]) -> list[str]:
    return [
        str(dataset_id)
        for item in content["data"]
        if item["type"] == "dataset"
        for record in item["records"]
        for dataset_id in record["dataset_id"]
    ]


def import_export(destination: Site, directory: Path, export: Path, transfer: str | None) -> int:
    """Import an export whose paths are relative to ``directory``; return how many datasets were new.

    Datasets already stored at the destination (a rerun, or an earlier hand-off of
    the same datasets) are left out of the import.
    """
    content = _read_export(export)
    ids = _dataset_ids(content)
    with repo_write_lock(destination.repo), open_butler(destination.repo, writeable=True) as dest:
        found = [ref for ref in (dest.get_dataset(i) for i in ids) if ref is not None]
        present = {str(ref.id) for ref, stored in dest.stored_many(found).items() if stored}
        if len(present) == len(ids):
            return 0
        if present:
            for item in content["data"]:
                if item["type"] == "dataset":
                    item["records"] = [
                        r for r in item["records"] if not {str(i) for i in r["dataset_id"]} <= present
                    ]
        with tempfile.TemporaryDirectory() as scratch:
            if present:
                # Written apart: the export may sit in another site's datastore.
                export = Path(scratch) / export.name
                with export.open("w") as stream:
                    yaml.dump(content, stream)
            dest.import_(directory=str(directory), filename=str(export), format="yaml", transfer=transfer)
    return len(ids) - len(present)


def make_backend(campaign: Campaign) -> TransferBackend:
    """Return the transfer backend the campaign is configured for."""
    if campaign.transfer_backend == "butler":
        return ButlerBackend(campaign.name, campaign.transfer_mode)
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


def _handoff(campaign: Campaign, name: str) -> Handoff:
    return next(h for h in handoffs(campaign) if h.name == name)


def _placement_ref(campaign: Campaign, central: Site, site: str, placement: pd.DataFrame) -> DatasetRef:
    """Store the placement rows a site needs in the central repository (once per content).

    The rows of every visit the site holds: enough for the site to find its raws,
    its chunks and the visits it owns.
    """
    rows = placement[placement["visit"].isin(placement.loc[placement["site"] == site, "visit"])]
    rows = rows.reset_index(drop=True)
    digest = hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:12]
    run = f"{campaign.root_collection}/{site}/placement/{digest}"
    with repo_write_lock(central.repo), open_butler(central.repo, writeable=True) as butler:
        dataset_type = DatasetType(PLACEMENT_DATASET_TYPE, (), "DataFrame", universe=butler.dimensions)
        butler.registry.registerDatasetType(dataset_type)
        butler.registry.registerRun(run)
        existing = butler.find_dataset(dataset_type, collections=run)
        return existing or butler.put(rows, dataset_type, run=run)


def _outgoing(
    campaign: Campaign, handoff: Handoff, site: str, placement: pd.DataFrame, started: datetime
) -> tuple[Site, Site, list[str], HandoffPayload]:
    """Return what a hand-off for ``site`` moves: source, destination, source collections, payload."""
    source, destination, collections = _endpoints(campaign, handoff, site)
    selection = SiteSelection.from_placement(campaign, placement, site)
    source_butler = open_butler(source.repo)
    refs = [
        ref
        for dataset_type in PipelineFlow(campaign).handoff_types(handoff)
        for ref in source_butler.query_datasets(
            dataset_type, collections=collections, limit=None, explain=False
        )
        if selection.accepts(ref.dataId, owned=handoff.to_central)
    ]
    payload = HandoffPayload(refs)
    if source.repo != destination.repo:
        if handoff.name == "raws":
            payload.records = _site_records(source_butler, campaign, selection)
            # The site's instance learns its share of the placement with its raws.
            payload.refs.append(_placement_ref(campaign, source, site, placement))
        if handoff.to_central:
            # The sending instance's event log travels with its data, for the central status.
            payload.refs.append(_snapshot_events(campaign, source, started))
    _LOG.info(
        "Hand-off %s for %s: %d datasets %s -> %s.",
        handoff.name,
        site,
        len(payload.refs),
        source.name,
        destination.name,
    )
    return source, destination, collections, payload


def _arrived(campaign: Campaign, label: str, destination: Site, dataset_ids: list[str]) -> dict[str, Any]:
    """Check every dataset of a hand-off is stored at the destination; chain its RUNs there."""
    with repo_write_lock(destination.repo), open_butler(destination.repo, writeable=True) as dest:
        found = {dataset_id: dest.get_dataset(dataset_id) for dataset_id in dataset_ids}
        refs = [ref for ref in found.values() if ref is not None]
        stored = dest.stored_many(refs)
        missing = [i for i, ref in found.items() if ref is None or not stored[ref]]
        if missing:
            raise HandoffError(
                f"Hand-off {label}: {len(missing)} of {len(dataset_ids)} datasets are missing in "
                f"{destination.name}'s repository {destination.repo} after the transfer:\n"
                + "\n".join(f"    dataset {i}" for i in missing[:20])
                + "\nRerun the rule; already delivered datasets are not moved again."
            )
        runs = sorted({ref.run for ref in refs})
        ensure_in_chain(dest, campaign.handoff_chain(destination.name), runs)
        uris = dest.get_many_uris(refs)
    return {
        "datasets": dict(sorted(Counter(ref.datasetType.name for ref in refs).items())),
        "bytes": sum(uris[ref].primaryURI.size() for ref in refs),
        "destination_chain": campaign.handoff_chain(destination.name),
        "runs": runs,
    }


def _identity(
    label: str, source: Site, destination: Site, backend: TransferBackend, same_repo: bool = False
) -> dict[str, str]:
    """Return the first fields of every hand-off marker: what, for which site, from where to where, how."""
    handoff, site = label.split("/", 1)
    return {
        "handoff": handoff,
        "site": site,
        "source": source.name,
        "destination": destination.name,
        "backend": "none (same repository)" if same_repo else backend.name,
    }


def run_handoff(
    campaign: Campaign,
    handoff_name: str,
    site: str,
    placement: pd.DataFrame,
    backend: TransferBackend | None = None,
) -> dict[str, Any]:
    """Move one hand-off for one site and verify it arrived (both halves in this instance).

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
    handoff = _handoff(campaign, handoff_name)
    backend = backend or make_backend(campaign)
    source, destination, collections, payload = _outgoing(campaign, handoff, site, placement, started)
    label = f"{handoff_name}/{site}"
    same_repo = source.repo == destination.repo
    if same_repo:
        details, dataset_ids = {}, [str(ref.id) for ref in payload.refs]
    else:
        details, export = backend.deliver(source, destination, payload, label)
        dataset_ids = exported_dataset_ids(export)
    return {
        **_identity(label, source, destination, backend, same_repo),
        "backend_details": details,
        "source_collections": collections,
        "dimension_records": {element: len(records) for element, records in payload.records.items()},
        **_arrived(campaign, label, destination, dataset_ids),
        **provenance(started),
    }


def send_handoff(
    campaign: Campaign,
    handoff_name: str,
    site: str,
    placement: pd.DataFrame,
    backend: TransferBackend | None = None,
) -> dict[str, Any]:
    """Do the sending half of a hand-off, in the instance of its source site.

    Parameters are those of `run_handoff`. Returns the provenance of the ``sent`` marker.
    """
    started = datetime.now(UTC)
    backend = backend or make_backend(campaign)
    source, destination, collections, payload = _outgoing(
        campaign, _handoff(campaign, handoff_name), site, placement, started
    )
    label = f"{handoff_name}/{site}"
    details = backend.send(source, destination, payload, label)
    return {
        **_identity(label, source, destination, backend),
        "backend_details": details,
        "source_collections": collections,
        "datasets": payload.counts(),
        **provenance(started),
    }


def receive_handoff(
    campaign: Campaign, handoff_name: str, site: str, backend: TransferBackend | None = None
) -> dict[str, Any]:
    """Do the receiving half of a hand-off, in the instance of its destination site.

    Waits (up to ``transfer.wait.timeout_s``) for the source site's instance to
    send it, recording a ``waiting`` event that names the hand-off, the sender and
    since when; then brings and imports it, and verifies it.

    Raises
    ------
    HandoffError
        Raised on timeout, naming the site to look at, or when a dataset is missing.
    """
    started = datetime.now(UTC)
    handoff = _handoff(campaign, handoff_name)
    backend = backend or make_backend(campaign)
    source, destination, _ = _endpoints(campaign, handoff, site)
    label = f"{handoff_name}/{site}"
    if not backend.published(source, destination, label):
        message = (
            f"waiting for {handoff_name} from {source.name} since {started:%Y-%m-%d %H:%M:%S} UTC "
            f"(timeout {campaign.wait_timeout:g} s)"
        )
        EventLog(campaign.events, campaign.instance or "all").record(
            "waiting", f"handoff {handoff_name} {site}", site, message, source=source.name
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
    details, export = backend.receive(source, destination, label)
    return {
        **_identity(label, source, destination, backend),
        "backend_details": details,
        **_arrived(campaign, label, destination, exported_dataset_ids(export)),
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
