"""The transfer backend interface, and the backend for repositories on a shared filesystem.

A `TransferBackend` moves one hand-off's payload (dataset refs and dimension
records) from a source site's Butler to a destination site's, in a sending and a
receiving half, the way Rubin moves Butler data between facilities: processed
datasets in Butler zips (`write_zips`: each zip holds its datasets' files, refs and
dimension records, so it is ingested anywhere as it is), raws as their own files
with a Butler export of their refs and of the extra dimension records the site
needs, in parts of ``import_batch`` raws (`write_export`). The sender writes both
under the source datastore root (``<EXPORT_DIR>/<campaign>/<handoff>/<site>/<piece>/NNNNN.zip``,
``<site>.NNNNN.yaml`` and, last, ``<site>.yaml``) with
the hand-off's manifest beside them (``<site>.manifest.json``: each file's and
zip's size and adler32, recorded at the source, the datasets in it, and the
export's parts; `multisite.integrity`); the receiver imports the export part by
part, ingests the zips
(`ingest_zips`) and verifies every file at the destination against the manifest,
which the destination keeps at the same place in its own datastore.
`ButlerBackend` copies from repository to repository; ``multisite.rucio_backend``
replicates with Rucio. Each backend also repairs a received hand-off
(`TransferBackend.repair`).
"""

from __future__ import annotations

__all__ = (
    "EXPORT_DIR",
    "IMPORT_BATCH",
    "MANIFEST_SUFFIX",
    "ZIP_DATASETS",
    "ButlerBackend",
    "HandoffPayload",
    "TransferBackend",
    "datastore_root",
    "delete_datastore_files",
    "export_part_names",
    "handoff_file_name",
    "import_export",
    "ingest_zips",
    "orphaned_files",
    "repair_outcome",
    "verify_received",
    "write_export",
    "write_zips",
)

import abc
import contextlib
import itertools
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lsst.daf.butler.transfers  # noqa: F401 - registers the !uuid YAML tag of Butler exports
import yaml
from lsst.daf.butler import Butler, CollectionType, DatasetRef, DimensionRecord
from lsst.daf.butler.datastores.file_datastore.retrieve_artifacts import ZipIndex
from lsst.resources import ResourcePath

from .butler_utils import open_butler, repo_write_lock
from .config import Campaign, Site
from .errors import HandoffError
from .integrity import (
    Damage,
    FileRecord,
    Manifest,
    check_files,
    copy_verified,
    damaged_files,
    datastore_files,
    held_files,
    repair_command,
)

_LOG = logging.getLogger(__name__)
IMPORT_BATCH = Campaign.import_batch
"""Files per import transaction at a destination, unless ``transfer.import_batch`` says otherwise."""
ZIP_DATASETS = Campaign.datasets_per_zip
"""Most datasets in one Butler zip, unless ``transfer.datasets_per_zip`` says otherwise."""

EXPORT_DIR = "handoff_exports"
"""Directory, in the source datastore, of the Butler export files that publish hand-offs."""

MANIFEST_SUFFIX = ".manifest.json"
"""Suffix of a hand-off's manifest, beside its export file (``<site>.yaml``)."""

_PIECE_FILE = re.compile(r"(\.manifest\.json|(\.\d{5})?\.yaml)$")
"""What follows a piece's name in the names of its export parts and manifest."""


def handoff_file_name(campaign: str, label: str, suffix: str) -> str:
    """Return the datastore-relative name of a hand-off's own file (its export or its manifest).

    Parameters
    ----------
    campaign : `str`
        Campaign name.
    label : `str`
        The hand-off piece, ``<handoff>/<site>/<piece>``.
    suffix : `str`
        ``.yaml`` for the export file, `MANIFEST_SUFFIX` for the manifest, ``""``
        for the directory of its zips.
    """
    return f"{EXPORT_DIR}/{campaign}/{label}{suffix}"


@dataclass
class HandoffPayload:
    """What one hand-off moves: raws as their own files, processed datasets in Butler zips, and records.

    The processed datasets are an iterable that a send reads once, in its order
    (a query's pages, `multisite.butler_utils.stream_datasets`), so that a
    hand-off of any size is zipped without holding its refs.

    Attributes
    ----------
    raws : `list` [`lsst.daf.butler.DatasetRef`]
        Datasets that travel as their own files, as the instrument wrote them.
    products : `~collections.abc.Iterable` [`lsst.daf.butler.DatasetRef`]
        Processed datasets, which travel in zips, in a fixed order (a rerun zips them the same way).
    records : `dict` [`str`, `list` [`lsst.daf.butler.DimensionRecord`]]
        Extra dimension records by element, in insertion order.
    """

    raws: list[DatasetRef]
    products: Iterable[DatasetRef] = ()
    records: dict[str, list[DimensionRecord]] = field(default_factory=dict)
    _zipped: Counter[str] | None = field(default=None, init=False, repr=False)

    @classmethod
    def of(cls, refs: Iterable[DatasetRef]) -> HandoffPayload:
        """Return the payload of datasets held in memory, raws split from the rest."""
        refs = list(refs)
        return cls(
            [r for r in refs if r.datasetType.name == "raw"], [r for r in refs if r.datasetType.name != "raw"]
        )

    def zipped(self) -> Iterator[DatasetRef]:
        """Yield the processed datasets, in their order, counting them (`counts`)."""
        counted: Counter[str] = Counter()
        for ref in self.products:
            counted[ref.datasetType.name] += 1
            yield ref
        self._zipped = counted

    def counts(self) -> dict[str, int]:
        """Return how many datasets of each type moved; the processed ones are counted as they are zipped.

        Raises
        ------
        RuntimeError
            Raised when the processed datasets were not read to their end yet.
        """
        if self._zipped is None:
            raise RuntimeError("HandoffPayload.counts: the processed datasets have not been zipped yet")
        return dict(sorted((Counter(ref.datasetType.name for ref in self.raws) + self._zipped).items()))


class TransferBackend(abc.ABC):
    """Moves hand-offs between sites' Butlers, in a sending and a receiving half, and repairs them.

    ``label`` names a hand-off piece for one site, ``<handoff>/<site>/<piece>``; its export's head
    (its last part) is ``<EXPORT_DIR>/<campaign>/<handoff>/<site>/<piece>.yaml`` under a
    datastore root, its other parts ``<piece>.NNNNN.yaml``, its manifest
    ``<piece>.manifest.json`` and its zips' directory ``<piece>/`` beside it.

    Parameters
    ----------
    campaign : `str`
        Campaign name (part of the hand-off's file names).
    import_batch : `int`
        Raws per part of the export (`write_export`) and files per import
        transaction at the destination (`import_export`).
    datasets_per_zip : `int`
        Most datasets in one Butler zip (`write_zips`).
    """

    name: str

    def __init__(self, campaign: str, import_batch: int = IMPORT_BATCH, datasets_per_zip: int = ZIP_DATASETS):
        self.campaign = campaign
        self.import_batch = import_batch
        self.datasets_per_zip = datasets_per_zip

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
    def begun_pieces(self, source: Site, handoff: str, site: str) -> set[str]:
        """Return the pieces of ``handoff`` for ``site`` whose sending half has begun at ``source``.

        What a site's instance has begun to send, as the other instances see it.
        """

    @abc.abstractmethod
    def receive(self, source: Site, destination: Site, label: str) -> tuple[dict[str, Any], list[str]]:
        """Bring a published hand-off's files to the destination and import them; idempotent.

        Returns
        -------
        provenance : `dict`
            Backend-specific facts for the marker.
        dataset_ids : `list` [`str`]
            The hand-off's datasets (from its manifest), which must now be in the destination Butler.
        """

    @abc.abstractmethod
    def repair(self, source: Site, destination: Site, label: str) -> dict[str, Any]:
        """Fetch the damaged or missing files of a received hand-off again from its source; verify them.

        Registry entries at the destination are kept as they are.

        Returns
        -------
        outcome : `dict`
            `repair_outcome`'s fields.

        Raises
        ------
        DamagedFilesError
            Raised when a file cannot be repaired, naming it.
        """

    def deliver(
        self, source: Site, destination: Site, payload: HandoffPayload, label: str
    ) -> tuple[dict[str, Any], list[str]]:
        """Both halves, for an instance that runs both sites."""
        provenance = self.send(source, destination, payload, label)
        received, dataset_ids = self.receive(source, destination, label)
        for key, value in received.items():
            both = isinstance(value, dict) and isinstance(provenance.get(key), dict)
            provenance[key] = provenance[key] | value if both else value
        return provenance, dataset_ids

    def export_name(self, label: str) -> str:
        return handoff_file_name(self.campaign, label, ".yaml")

    def manifest_name(self, label: str) -> str:
        return handoff_file_name(self.campaign, label, MANIFEST_SUFFIX)

    def zip_directory(self, label: str) -> str:
        return handoff_file_name(self.campaign, label, "")


class ButlerBackend(TransferBackend):
    """Repository to repository on a shared filesystem: the receiver copies from the source datastore.

    Parameters
    ----------
    campaign : `str`
        Campaign name (part of the hand-off's file names).
    mode : `str`
        File transfer mode (``copy``, ``link``, ...).
    import_batch : `int`
        Files per import transaction at the destination.
    datasets_per_zip : `int`
        Most datasets in one Butler zip.
    """

    name = "butler"

    def __init__(
        self,
        campaign: str,
        mode: str = "copy",
        import_batch: int = IMPORT_BATCH,
        datasets_per_zip: int = ZIP_DATASETS,
    ):
        super().__init__(campaign, import_batch, datasets_per_zip)
        self.mode = mode

    def send(self, source: Site, destination: Site, payload: HandoffPayload, label: str) -> dict[str, Any]:
        butler = open_butler(source.repo)
        root = datastore_root(butler)
        zips, written = write_zips(
            butler, root, payload.zipped(), self.zip_directory(label), self.datasets_per_zip
        )
        # The manifest first: the export's head is what tells a receiver the hand-off is sent.
        exports = export_part_names(self.export_name(label), len(payload.raws), self.import_batch)
        manifest = self._write_manifest(butler, root, payload, zips, written, exports, label)
        parts = write_export(butler, root, payload, self.export_name(label), self.import_batch)
        return {
            "mode": self.mode,
            "export": str(parts[-1]),
            "export_parts": len(parts),
            "manifest": str(root / self.manifest_name(label)),
            "files": len(manifest.files) - len(zips),
            "zips": len(zips),
        }

    def _write_manifest(
        self,
        butler: Butler,
        root: Path,
        payload: HandoffPayload,
        zips: list[FileRecord],
        written: set[str],
        exports: list[str],
        label: str,
    ) -> Manifest:
        """Record the size and adler32 of the payload's files and zips at the source, once per content.

        A file or zip keeps the checksum first recorded for it, unless it is new to
        the hand-off or a zip written again now (``written``: deleted after damage):
        a file damaged at the source since it was recorded must not pass as good.
        """
        path = root / self.manifest_name(label)
        inside, outside = datastore_files(butler, root, payload.raws)
        existing = None
        if path.exists():
            with contextlib.suppress(HandoffError):
                existing = Manifest.read(path)
        recorded = {r.name: r for r in existing.files} if existing and existing.label == label else {}

        def checked(record: FileRecord, where: Path) -> FileRecord:
            old = recorded.get(record.name)
            unchanged = old is not None and replace(old, bytes=None, adler32=None) == record
            return old if unchanged and record.name not in written else record.measured(where)

        every = [*inside, *outside, *((record, root / record.name) for record in zips)]
        manifest = Manifest(label, tuple(checked(record, where) for record, where in every), tuple(exports))
        if existing is None or (set(manifest.files), manifest.exports) != (
            set(existing.files),
            existing.exports,
        ):
            manifest.write(path)
        return manifest

    def published(self, source: Site, destination: Site, label: str) -> bool:
        root = _sent_root(source)
        return root is not None and (root / self.export_name(label)).exists()

    def begun_pieces(self, source: Site, handoff: str, site: str) -> set[str]:
        """Return the pieces with a file or zip directory in the source's export area."""
        root = _sent_root(source)
        if root is None:
            return set()
        folder = root / handoff_file_name(self.campaign, handoff, f"/{site}")
        return {_PIECE_FILE.sub("", entry.name) for entry in folder.iterdir()} if folder.is_dir() else set()

    def receive(self, source: Site, destination: Site, label: str) -> tuple[dict[str, Any], list[str]]:
        root = datastore_root(open_butler(source.repo))
        manifest = self._sent_manifest(root, source, label)
        with open_butler(destination.repo) as butler:
            dst_root = datastore_root(butler)
        kept = dst_root / self.manifest_name(label)
        # The destination keeps the manifest, for verify_inputs and repairs.
        record = FileRecord(self.manifest_name(label)).measured(root / self.manifest_name(label))
        if problem := copy_verified(root / record.name, kept, record):
            raise HandoffError(f"Hand-off {label}: cannot keep its manifest at {destination.name}: {problem}")
        zips = [(record, dst_root / record.name) for record in manifest.files if record.zipped]

        def fetch(record: FileRecord, path: Path) -> None:
            # Checked as it is copied: a zip is ingested whole, so a bad one must not get in.
            if problem := copy_verified(root / record.name, path, record):
                raise damaged_files(
                    f"Hand-off {label}",
                    source.name,
                    [Damage(record, root / record.name, problem)],
                    root,
                    note="The zip at the source differs from what its manifest recorded when the hand-off "
                    "was sent; nothing from it was ingested.",
                    fix=f"Delete {root / record.name} at {source.name} and send the hand-off again (its "
                    "rule with --forcerun): the zip is written again from the source's datasets; then rerun.",
                )

        exports = [root / name for name in manifest.exports]
        imported = import_export(destination, root, exports, self.mode, self.import_batch)
        imported += ingest_zips(destination, zips, fetch)
        verified = verify_received(destination, manifest, f"Hand-off {label}")
        details = {"mode": self.mode, "transferred": imported, "verified_files": verified, "zips": len(zips)}
        return details, manifest.dataset_ids()

    def _sent_manifest(self, root: Path, source: Site, label: str) -> Manifest:
        path = root / self.manifest_name(label)
        if not path.exists():
            raise HandoffError(
                f"Hand-off {label}: {source.name} published it without a manifest ({path} is missing), so "
                "its files cannot be verified. Rerun its sending half (the hand-off rule, or send_handoff "
                "in the sending instance): it records the files' sizes and checksums."
            )
        return Manifest.read(path)

    def repair(self, source: Site, destination: Site, label: str) -> dict[str, Any]:
        root = datastore_root(open_butler(source.repo))
        if not (root / self.export_name(label)).exists() or not (root / self.manifest_name(label)).exists():
            return repair_outcome("not sent")
        manifest = Manifest.read(root / self.manifest_name(label))
        with open_butler(destination.repo) as butler:
            dst_root = datastore_root(butler)
            held, unknown = held_files(butler, manifest.files)
        if not held:
            return repair_outcome("not received", not_received=len(unknown))
        own = FileRecord(self.manifest_name(label)).measured(root / self.manifest_name(label))
        damage = check_files([*held, (own, dst_root / own.name)])
        refused = []
        for damaged in damage:
            if problem := copy_verified(root / damaged.record.name, damaged.path, damaged.record):
                refused.append(replace(damaged, problem=problem))
            else:
                _LOG.info("Repaired %s (%s) from %s.", damaged.path, damaged.problem, source.name)
        if refused:
            raise damaged_files(
                f"Repair of hand-off {label}",
                destination.name,
                refused,
                dst_root,
                fix=f"Restore these files at {source.name} (the hand-off's source) first, then run "
                f"{repair_command(destination.name)} again.",
            )
        return repair_outcome(
            "repaired" if damage else "intact", len(held), [d.record.name for d in damage], len(unknown)
        )


def repair_outcome(
    state: str, files: int = 0, repaired: list[str] | None = None, not_received: int = 0
) -> dict[str, Any]:
    """Return what `TransferBackend.repair` did to one hand-off.

    Parameters
    ----------
    state : `str`
        ``not sent``, ``not received``, ``intact`` or ``repaired``.
    files : `int`
        Dataset files checked at the destination.
    repaired : `list` [`str`], optional
        Names (source Butler-relative paths) of the files fetched again.
    not_received : `int`
        Files of datasets the destination's registry does not have yet (the hand-off's rule brings them).
    """
    return {"state": state, "files": files, "repaired": repaired or [], "not_received": not_received}


def verify_received(destination: Site, manifest: Manifest, context: str) -> int:
    """Check every file of a received hand-off at the destination against its manifest.

    Returns
    -------
    files : `int`
        How many files were verified.

    Raises
    ------
    DamagedFilesError
        Raised naming each file that is missing or differs, and the repair command.
    """
    with open_butler(destination.repo) as butler:
        root = datastore_root(butler)
        held, _ = held_files(butler, manifest.files)
    if damage := check_files(held):
        raise damaged_files(context, destination.name, damage, root)
    return len(held)


def _sent_root(source: Site) -> Path | None:
    """Return where a sending site's hand-offs are, or `None` before its instance created its repository."""
    if not ResourcePath(source.repo).exists():
        return None
    return datastore_root(open_butler(source.repo))


def datastore_root(butler: Butler) -> Path:
    """Return the one local directory of a repository's file datastore."""
    roots = [root for root in butler.get_datastore_roots().values() if root is not None]
    if len(roots) != 1 or roots[0].scheme not in ("file", ""):
        raise HandoffError(f"hand-offs need one local file datastore per repository, found roots {roots}")
    return Path(roots[0].ospath).resolve()


def _known_files(butler: Butler, runs: list[str]) -> set[str]:
    """Return the real paths of every file the registry refers to (stored or predicted) in ``runs``."""
    refs = butler.query_all_datasets(runs, find_first=False, limit=None) if runs else []
    known = set()
    for uris in butler.get_many_uris(refs, predict=True).values():
        for uri in (uris.primaryURI, *uris.componentURIs.values()):
            if uri is not None and uri.isLocal:
                known.add(os.path.realpath(uri.ospath))
    return known


def _files_under(top: Path) -> Iterator[Path]:
    for directory, _, names in os.walk(top):
        yield from (Path(directory) / name for name in names)


def orphaned_files(butler: Butler, root: Path, prefix: str | None = None) -> list[Path]:
    """Return the datastore files that no registry row refers to, stored or predicted.

    A dataset's file lies under its RUN's name, so the files of failed or killed
    attempts of RUNs ``<prefix>/...`` (a chunk's attempts) are the orphans under
    ``root/<prefix>``, found against those RUNs alone. Without a prefix, every
    directory of the datastore is looked at, apart from the hand-off exports
    (`EXPORT_DIR`); files at the top (``butler.yaml``, ``gen3.sqlite3``, locks)
    are the repository's own.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The repository.
    root : `pathlib.Path`
        Its datastore root (`datastore_root`).
    prefix : `str`, optional
        Look only at RUNs named ``<prefix>/...`` and their files.

    Returns
    -------
    files : `list` [`pathlib.Path`]
        The orphaned files, sorted.
    """
    if prefix is None:
        runs = butler.collections.query("*", collection_types=CollectionType.RUN)
        tops = [top for top in sorted(root.iterdir()) if top.is_dir() and not top.is_symlink()]
        files = (path for top in tops if top.name != EXPORT_DIR for path in _files_under(top))
    else:
        runs = butler.collections.query(f"{prefix}/*", collection_types=CollectionType.RUN)
        files = _files_under(root / prefix)
    known = _known_files(butler, list(runs))
    return sorted(path for path in files if os.path.realpath(path) not in known)


def delete_datastore_files(files: list[Path], root: Path) -> None:
    """Delete datastore files and the directories they leave empty, up to ``root`` (kept)."""
    for path in files:
        path.unlink()
        for parent in path.parents:
            if parent == root or root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break


def export_part_names(head: str, raws: int, per_part: int) -> list[str]:
    """Return the names of a hand-off's export parts, in the order they are written and imported.

    ``<head stem>.NNNNN.yaml`` for each ``per_part`` raws but the last, then
    ``head``, which holds the last raws and the payload's extra records (visits
    refer to the exposures of every part), so that no process reads or writes
    more than one part's refs at once.
    """
    stem = head.removesuffix(".yaml")
    return [*(f"{stem}.{number:05d}.yaml" for number in range(1, -(-raws // per_part))), head]


def write_export(
    butler: Butler, root: Path, payload: HandoffPayload, head: str, per_part: int, keep: Collection[str] = ()
) -> list[Path]:
    """Write the Butler export of the payload's raws and extra records, in parts, under ``root``.

    Each part (`export_part_names`) is a Butler export of its raws' refs (with
    their dataset types, RUNs and data IDs' records); the head, written last,
    also holds the payload's extra dimension records. Zipped datasets carry their
    own. Each part appears complete or not at all; the head is what tells a
    receiver the hand-off is sent.

    Parameters
    ----------
    keep : `~collections.abc.Collection` [`str`]
        Names of parts not to write again (registered in Rucio with their checksums).

    Returns
    -------
    paths : `list` [`pathlib.Path`]
        Every part, in import order.
    """
    names = export_part_names(head, len(payload.raws), per_part)
    parts = list(itertools.batched(payload.raws, per_part)) or [()]
    for name, raws in zip(names, parts, strict=True):
        if name in keep:
            continue
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.tmp.yaml")
        with butler.export(filename=str(partial), format="yaml", transfer=None) as export:
            export.saveDatasets(raws)
            extra = payload.records if name == head else {}
            for element, records in extra.items():
                if records:
                    export.saveDimensionData(element, records)
        os.replace(partial, path)
    return [root / name for name in names]


def _read_export(export: Path) -> dict[str, Any]:
    with export.open() as stream:
        return yaml.safe_load(stream)


def _zip_ids(path: Path) -> tuple[str, ...] | None:
    """Return the sorted IDs of the datasets in a Butler zip; `None` if it is no readable zip."""
    try:
        index = ZipIndex.from_zip_file(ResourcePath(path))
    except Exception:  # noqa: BLE001 - a zip cut short by a crash, to write again
        return None
    return tuple(sorted({str(i) for info in index.artifact_map.values() for i in info.ids}))


def write_zips(
    butler: Butler, root: Path, refs: Iterable[DatasetRef], directory: str, per_zip: int
) -> tuple[list[FileRecord], set[str]]:
    """Write datasets in Butler zips of at most ``per_zip`` each, ``<directory>/NNNNN.zip`` under ``root``.

    The datasets are zipped in the order they come (a fixed one, so a rerun
    makes the same zips), ``per_zip`` at a time: only one zip's refs are held.
    Each zip holds its datasets' files and an index of their refs and dimension
    records (`lsst.daf.butler.Butler.retrieve_artifacts_zip`). A zip already
    there with the same datasets is kept as it is: its bytes may be registered in
    Rucio. Each zip appears complete or not at all.

    Returns
    -------
    zips : `list` [`FileRecord`]
        A record per zip (its name and datasets, no checksum yet).
    written : `set` [`str`]
        The names of the zips written by this call.
    """
    top = root / directory
    top.mkdir(parents=True, exist_ok=True)
    for stale in top.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    records, written = [], set()
    for number, group in enumerate(itertools.batched(refs, per_zip)):
        record = FileRecord(f"{directory}/{number:05d}.zip", zipped=tuple(sorted(str(r.id) for r in group)))
        path = root / record.name
        if _zip_ids(path) != record.zipped:
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=top))
            try:
                made = butler.retrieve_artifacts_zip(_expanded(butler, group), staging)
                os.replace(made.ospath, path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            written.add(record.name)
        records.append(record)
    return records, written


def _expanded(butler: Butler, refs: Iterable[DatasetRef]) -> list[DatasetRef]:
    """Return refs with their dimension records, which a zip carries to its destination."""
    return [
        ref if ref.dataId.hasRecords() else ref.expanded(butler.registry.expandDataId(ref.dataId))
        for ref in refs
    ]


def ingest_zips(
    destination: Site,
    zips: list[tuple[FileRecord, Path]],
    fetch: Callable[[FileRecord, Path], None] | None = None,
) -> int:
    """Ingest a hand-off's Butler zips where they lie in the destination datastore; return new datasets.

    Each zip keeps the name it had at the source, under the destination's
    datastore root, whichever backend brought it there, and carries its datasets'
    dimension records. A zip whose datasets the destination already has (a rerun)
    is left out, and of a zip whose datasets it has in part (two pieces of a fan-out
    to one site both carry what both chunks read) only the others are ingested
    (`_ingest_new_of_zip`). Each zip is one transaction: a crash loses at most the
    zip in flight.

    Parameters
    ----------
    destination : `Site`
        The receiving site.
    zips : `list` [`tuple` [`FileRecord`, `pathlib.Path`]]
        Each zip's manifest record and where it is (or is to be) in the destination datastore.
    fetch : `~collections.abc.Callable`, optional
        Called with a zip's record and path to bring it there first (the butler
        backend); Rucio delivered them already.
    """
    if not zips:
        return 0
    new = 0
    with (
        repo_write_lock(destination.repo, imports=True),
        open_butler(destination.repo, writeable=True) as dest,
    ):
        for record, path in zips:
            # Asked zip by zip, so that only one zip's refs are held.
            present = len(dest.get_many_datasets(record.zipped))
            if present < len(record.zipped):
                if fetch is not None:
                    fetch(record, path)
                if present:
                    _ingest_new_of_zip(dest, path)
                else:
                    dest.ingest_zip(ResourcePath(path), transfer=None, transfer_dimensions=True)
                _LOG.info(
                    "Ingested %s into %s: %d datasets new, %d there already.",
                    record.name,
                    destination.name,
                    len(record.zipped) - present,
                    present,
                )
                new += len(record.zipped) - present
    return new


def _ingest_new_of_zip(dest: Butler, path: Path) -> None:
    """Ingest the datasets of a zip that ``dest`` does not have, though it has some of the others.

    Butler ingests no zip whose datasets it knows in part, so Butler makes one of
    the new ones: the zip goes into a scratch repository beside it, which zips
    them again (`lsst.daf.butler.Butler.retrieve_artifacts_zip`), and that zip is
    ingested. The zip as it arrived stays where it is, as its manifest lists it.
    """
    refs = ZipIndex.from_zip_file(ResourcePath(path)).refs.to_refs(universe=dest.dimensions)
    known = {ref.id for ref in dest.get_many_datasets([ref.id for ref in refs])}
    with tempfile.TemporaryDirectory(prefix=".scratch-", dir=path.parent) as scratch:
        # The destination's dimension universe: a facility's repository may have an older one.
        repo = Butler.makeRepo(os.path.join(scratch, "repo"), dimensionConfig=dest.dimensions.dimensionConfig)
        with Butler.from_config(repo, writeable=True) as butler:
            for dataset_type in {ref.datasetType for ref in refs}:
                butler.registry.registerDatasetType(dataset_type)
            butler.ingest_zip(ResourcePath(path), transfer="copy", transfer_dimensions=True)
            new = [ref for ref in refs if ref.id not in known]
            made = butler.retrieve_artifacts_zip(_expanded(butler, new), os.path.join(scratch, "zip"))
        dest.ingest_zip(made, transfer="copy", transfer_dimensions=True)


def _dataset_ids(content: dict[str, Any]) -> list[str]:
    return [
        str(dataset_id)
        for item in content["data"]
        if item["type"] == "dataset"
        for record in item["records"]
        for dataset_id in record["dataset_id"]
    ]


def _import_batches(content: dict[str, Any], present: set[str], size: int) -> list[dict[str, Any]]:
    """Split an export into exports of at most ``size`` file records, without the datasets ``present``.

    The first holds the dimension records, dataset types and RUNs too; every
    later one only datasets, which the first made importable.
    """
    header = {key: value for key, value in content.items() if key != "data"}
    others = [item for item in content["data"] if item["type"] != "dataset"]
    pending = [
        (item, record)
        for item in content["data"]
        if item["type"] == "dataset"
        for record in item["records"]
        if not {str(i) for i in record["dataset_id"]} <= present
    ]
    batches = []
    for start in range(0, len(pending), size):
        by_item = itertools.groupby(pending[start : start + size], key=lambda pair: id(pair[0]))
        data = [
            {**group[0][0], "records": [record for _, record in group]}
            for group in map(list, (g for _, g in by_item))
        ]
        batches.append({**header, "data": (others if not batches else []) + data})
    return batches


def import_export(
    destination: Site, directory: Path, exports: list[Path], transfer: str | None, batch: int = IMPORT_BATCH
) -> int:
    """Import an export's parts, whose paths are relative to ``directory``; return how many datasets were new.

    Each part is read alone, so memory holds one part's refs. Datasets the
    destination's registry already has (a rerun, or an earlier hand-off of the
    same datasets) are left out of the import, whether or not their files are
    still right: the caller verifies the files, and a damaged or deleted one is
    repaired in place (`TransferBackend.repair`), never imported twice. The rest
    goes in batches of at most ``batch`` files, each its own transaction: a crash
    loses at most the batch in flight, and a rerun goes on from there.
    """
    new = 0
    with (
        repo_write_lock(destination.repo, imports=True),
        open_butler(destination.repo, writeable=True) as dest,
    ):
        for part, export in enumerate(exports, 1):
            content = _read_export(export)
            ids = _dataset_ids(content)
            present = {str(ref.id) for ref in dest.get_many_datasets(ids)}
            if len(present) == len(ids):
                continue
            batches = _import_batches(content, present, batch)
            # Written apart: the export may sit in another site's datastore.
            with tempfile.TemporaryDirectory() as scratch:
                for number, batch_content in enumerate(batches, 1):
                    path = Path(scratch) / f"batch{number}.yaml"
                    with path.open("w") as stream:
                        yaml.dump(batch_content, stream)
                    dest.import_(
                        directory=str(directory), filename=str(path), format="yaml", transfer=transfer
                    )
                    _LOG.info(
                        "Imported part %d of %d, batch %d of %d, into %s (%s).",
                        part,
                        len(exports),
                        number,
                        len(batches),
                        destination.name,
                        export.name,
                    )
            new += len(ids) - len(present)
    return new
