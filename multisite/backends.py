"""The transfer backend interface, and the backend for repositories on a shared filesystem.

A `TransferBackend` moves one hand-off's payload (dataset refs and dimension
records) from a source site's Butler to a destination site's, in a sending and a
receiving half. Both publish the payload as a Butler export file written beside the
source files (``<EXPORT_DIR>/<campaign>/<handoff>/<site>.yaml`` under the source
datastore root) and import it at the destination. `ButlerBackend` copies the files
from repository to repository; ``multisite.rucio_backend`` replicates them with Rucio.
"""

from __future__ import annotations

__all__ = (
    "EXPORT_DIR",
    "ButlerBackend",
    "HandoffPayload",
    "TransferBackend",
    "datastore_root",
    "exported_dataset_ids",
    "import_export",
    "write_export",
)

import abc
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lsst.daf.butler.transfers  # noqa: F401 - registers the !uuid YAML tag of Butler exports
import yaml
from lsst.daf.butler import Butler, DatasetRef, DimensionRecord

from .butler_utils import open_butler, repo_write_lock
from .config import Site
from .errors import HandoffError

EXPORT_DIR = "handoff_exports"
"""Directory, in the source datastore, of the Butler export files that publish hand-offs."""


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
