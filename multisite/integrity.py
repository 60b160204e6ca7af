"""Integrity of what hand-offs deliver: checksums, manifests, verification, repair.

Every file a hand-off moves is recorded at its source when the hand-off is sent:
its Butler-relative path, size and adler32 (Rucio's checksum), with its dataset
type, data ID and dataset ID (for a Butler zip, the IDs of the datasets in it), in
the hand-off's *manifest*; a rerun keeps what was first recorded. The manifest is a small
JSON file beside the hand-off's Butler export file
(``handoff_exports/<campaign>/<handoff>/<site>/<piece>.manifest.json`` under the source
datastore root); it travels with the hand-off (the Rucio backend registers it in
the hand-off's Rucio dataset, the butler backend copies it) and stays at the same
place in the destination's datastore. Files are checked against it:

- by the receiving half of every hand-off, before its marker is written, on every
  run (a rerun re-verifies what an earlier run delivered);
- by ``verify_inputs``, for the raws of a site's share (and its zip of the placement);
- by `multisite.handoff.repair_site` (``multisite repair``), which fetches each damaged or missing
  file of the hand-offs a site received again from its source, through the backend
  (a copy from the source datastore, or Rucio's own recovery of a bad replica),
  and verifies it.

A mismatch raises `DamagedFilesError`, which names each file (Butler-relative
path, dataset type and data ID) and the command that repairs it.
"""

from __future__ import annotations

__all__ = (
    "Damage",
    "damaged_files",
    "FileRecord",
    "Manifest",
    "adler32_of",
    "check_files",
    "copy_verified",
    "datastore_files",
    "held_files",
    "repair_command",
    "with_descriptions",
)

import json
import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lsst.daf.butler import Butler, DatasetRef
from lsst.resources import ResourcePath

from .errors import DamagedFilesError, HandoffError

_LOG = logging.getLogger(__name__)

MANIFEST_FORMAT = "multisite hand-off manifest 2"
"""The ``format`` field of every manifest this version writes and reads."""


def adler32_of(path: Path) -> str:
    """Return a file's adler32 as Rucio writes it (8 lower-case hex digits).

    Parameters
    ----------
    path : `pathlib.Path`
        The file.

    Returns
    -------
    adler32 : `str`
        The checksum.
    """
    value = 1
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            value = zlib.adler32(chunk, value)
    return f"{value & 0xFFFFFFFF:08x}"


@dataclass(frozen=True)
class FileRecord:
    """One file of a hand-off as its source recorded it.

    Attributes
    ----------
    name : `str`
        Path relative to the source datastore root (the file's Rucio name); an
        absolute path for a file stored outside the root.
    bytes : `int` or `None`
        Size.
    adler32 : `str` or `None`
        Checksum (8 lower-case hex digits).
    dataset_type, data_id, dataset_id : `str` or `None`
        The dataset the file stores (`None` for a Butler zip and the hand-off's own files).
    component : `str` or `None`
        The component, for a dataset stored as several files.
    zipped : `tuple` [`str`, ...]
        For a Butler zip, the IDs of the datasets it stores.
    """

    name: str
    bytes: int | None = None
    adler32: str | None = None
    dataset_type: str | None = None
    data_id: str | None = None
    dataset_id: str | None = None
    component: str | None = None
    zipped: tuple[str, ...] = ()

    def describe(self) -> str:
        """Return the dataset the file stores, e.g. ``raw {instrument: 'X', exposure: 1, detector: 0}``."""
        if self.zipped:
            return f"Butler zip of {len(self.zipped)} datasets"
        if self.dataset_type is None:
            return ""
        kind = self.dataset_type + (f".{self.component}" if self.component else "")
        return f"{kind} {self.data_id}" if self.data_id else kind

    def measured(self, path: Path) -> FileRecord:
        """Return this record with the size and adler32 of the file at ``path``."""
        return replace(self, bytes=path.stat().st_size, adler32=adler32_of(path))


@dataclass(frozen=True)
class Manifest:
    """The files of one hand-off with their size and checksum, as its source recorded them.

    Attributes
    ----------
    label : `str`
        The hand-off, ``<handoff>/<site>/<piece>``.
    files : `tuple` [`FileRecord`, ...]
        Its dataset files.
    exports : `tuple` [`str`, ...]
        The parts of its Butler export (Butler-relative paths), in import order.
    """

    label: str
    files: tuple[FileRecord, ...]
    exports: tuple[str, ...] = ()

    def write(self, path: Path) -> Path:
        """Write the manifest as JSON, atomically, byte for byte the same for the same content.

        The same bytes matter: a rewrite of a manifest already registered in Rucio
        must keep its registered adler32.
        """
        content = {
            "format": MANIFEST_FORMAT,
            "handoff": self.label,
            "files": [asdict(record) for record in sorted(self.files, key=lambda r: r.name)],
            "exports": list(self.exports),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        partial.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
        os.replace(partial, path)
        return path

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Read a manifest written by `write`.

        Raises
        ------
        HandoffError
            Raised when the file is not a manifest (damaged), naming it.
        """
        try:
            content = json.loads(Path(path).read_text())
            if content.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {content.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            files = tuple(
                FileRecord(**{**record, "zipped": tuple(record.get("zipped", ()))})
                for record in content["files"]
            )
            return cls(content["handoff"], files, tuple(content["exports"]))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise HandoffError(f"{path} is not a readable hand-off manifest ({err})") from None

    def dataset_ids(self) -> list[str]:
        """Return the IDs of the datasets the hand-off moves, in files and in zips, sorted."""
        in_files = {r.dataset_id for r in self.files if r.dataset_id}
        return sorted(in_files | {i for r in self.files for i in r.zipped})


def datastore_files(
    butler: Butler, root: Path, refs: Iterable[DatasetRef]
) -> tuple[list[tuple[FileRecord, Path]], list[tuple[FileRecord, Path]]]:
    """Return the files that store ``refs`` in a repository, without their checksums.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The repository.
    root : `pathlib.Path`
        Its datastore root.
    refs : `~collections.abc.Iterable` [`lsst.daf.butler.DatasetRef`]
        Datasets stored there.

    Returns
    -------
    inside : `list` [`tuple` [`FileRecord`, `pathlib.Path`]]
        Files under the root (named by their path relative to it), and where they are.
    outside : `list` [`tuple` [`FileRecord`, `pathlib.Path`]]
        Files stored elsewhere (e.g. raws ingested in place), named by their absolute path.
    """
    root_uri = ResourcePath(f"{root}/", forceDirectory=True)
    inside: dict[str, tuple[FileRecord, Path]] = {}
    outside: dict[str, tuple[FileRecord, Path]] = {}
    for ref, uris in butler.get_many_uris(list(refs)).items():
        parts = [(None, uris.primaryURI), *uris.componentURIs.items()]
        for component, uri in parts:
            if uri is None:
                continue
            name = uri.relative_to(root_uri)
            record = FileRecord(
                name or uri.ospath,
                dataset_type=ref.datasetType.name,
                data_id="{" + ", ".join(f"{k}: {v!r}" for k, v in ref.dataId.required.items()) + "}",
                dataset_id=str(ref.id),
                component=component,
            )
            (inside if name else outside)[record.name] = (record, Path(uri.ospath))
    return list(inside.values()), list(outside.values())


def held_files(
    butler: Butler, records: Iterable[FileRecord]
) -> tuple[list[tuple[FileRecord, Path]], list[FileRecord]]:
    """Return where a repository keeps each recorded dataset file.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The repository (a hand-off's destination).
    records : `~collections.abc.Iterable` [`FileRecord`]
        Dataset files and Butler zips as their source recorded them.

    Returns
    -------
    held : `list` [`tuple` [`FileRecord`, `pathlib.Path`]]
        Each record whose dataset the repository knows, with where its file is (or
        should be: a deleted file keeps its datastore record); a zip is where its
        first dataset is. A zip none of whose datasets the repository keeps in it
        (another hand-off's zip brought them all first) is neither held nor unknown.
    unknown : `list` [`FileRecord`]
        Records whose dataset the repository does not know (not received).
    """
    records = [r for r in records if r.dataset_id or r.zipped]
    first = _locations(butler, [_stored(r) for r in records], records)
    held, unknown, elsewhere = [], [], []
    for record in records:
        path = first.get((_stored(record), record.component))
        if path is None:
            unknown.append(record)
        elif record.zipped and not path.as_posix().endswith(f"/{record.name}"):
            elsewhere.append(record)
        else:
            held.append((record, path))
    # A visit that two chunks need travels in both their pieces' zips and is kept in one.
    for record in elsewhere:
        paths = _locations(butler, list(record.zipped), [record]).values()
        held += [(record, path) for path in {p for p in paths if p.as_posix().endswith(f"/{record.name}")}]
    return held, unknown


def _locations(
    butler: Butler, dataset_ids: list[str], records: list[FileRecord]
) -> dict[tuple[str, str | None], Path]:
    """Return where the repository keeps each of some datasets, by (ID, the records' component)."""
    refs = {str(ref.id): ref for ref in butler.get_many_datasets(set(dataset_ids))}
    uris = butler.get_many_uris(list(refs.values()), allow_missing=True)
    components = {r.component for r in records}
    found = {}
    for dataset_id, ref in refs.items():
        if (located := uris.get(ref)) is None:
            continue
        for component in components:
            uri = located.componentURIs.get(component) if component else located.primaryURI
            if uri is not None:
                found[(dataset_id, component)] = Path(uri.ospath)
    return found


def _stored(record: FileRecord) -> str:
    """Return the ID of a dataset whose file is the record's (a zip's first)."""
    return record.dataset_id or record.zipped[0]


@dataclass(frozen=True)
class Damage:
    """A file that is not what its source recorded.

    Attributes
    ----------
    record : `FileRecord`
        What the source recorded.
    path : `pathlib.Path`
        Where the file is (or should be).
    problem : `str`
        What is wrong: missing, its size, or its checksum.
    """

    record: FileRecord
    path: Path
    problem: str


def _problem(record: FileRecord, path: Path) -> str | None:
    """Return what is wrong with the file at ``path`` for ``record``, or `None`."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if record.bytes is not None and size != record.bytes:
        return f"{size} bytes, the source recorded {record.bytes}"
    if record.adler32:
        found = adler32_of(path)
        if found != record.adler32.lower().zfill(8):
            return f"adler32 {found}, the source recorded {record.adler32} (same size, other content)"
    return None


def check_files(files: Iterable[tuple[FileRecord, Path]]) -> list[Damage]:
    """Check files against their records: present, same size, same adler32.

    The one verification of the campaign: both backends' receiving halves,
    ``verify_inputs`` and the repair call it.

    Parameters
    ----------
    files : `~collections.abc.Iterable` [`tuple` [`FileRecord`, `pathlib.Path`]]
        Each record with where its file is.

    Returns
    -------
    damage : `list` [`Damage`]
        The files that are missing or differ.
    """
    damage = []
    for record, path in files:
        if (problem := _problem(record, path)) is not None:
            damage.append(Damage(record, path, problem))
    return damage


def with_descriptions(damage: list[Damage], manifest: Path) -> list[Damage]:
    """Add the dataset type and data ID a manifest records to damaged files known by name only.

    A manifest that is itself damaged or missing adds nothing (it is named among the damage).
    """
    if any(d.path == manifest for d in damage) or not manifest.is_file():
        return damage
    try:
        recorded = {r.name: r for r in Manifest.read(manifest).files}
    except HandoffError:
        return damage
    described = []
    for d in damage:
        known = recorded.get(d.record.name)
        if known is not None:
            d = replace(d, record=replace(known, bytes=d.record.bytes, adler32=d.record.adler32))
        described.append(d)
    return described


def repair_command(site: str) -> str:
    """Return the command that repairs the files a site received."""
    return f"multisite repair <campaign config> --site {site}"


def damaged_files(
    context: str,
    site: str,
    damage: list[Damage],
    root: Path,
    note: str = "",
    fix: str | None = None,
) -> DamagedFilesError:
    """Return the error naming each damaged or missing file at a site and how to repair it.

    Parameters
    ----------
    context : `str`
        What found them (``Hand-off raws/ral``, ``ral: inputs``, ...).
    site : `str`
        The site holding them.
    damage : `list` [`Damage`]
        The files.
    root : `pathlib.Path`
        The datastore root their paths are named relative to.
    note : `str`, optional
        A sentence on the state the step left things in.
    fix : `str`, optional
        How to repair them; by default, `repair_command` then a rerun.
    """
    lines = []
    for d in damage[:50]:
        try:
            where = str(d.path.relative_to(root))
        except ValueError:
            where = str(d.path)
        about = d.record.describe()
        lines.append(f"    {where}" + (f" ({about})" if about else "") + f": {d.problem}")
    if len(damage) > 50:
        lines.append(f"    ... and {len(damage) - 50} more")
    fix = fix or (
        f"Repair: {repair_command(site)} fetches each of them again from its source and "
        "verifies it (registry entries are kept); then rerun the workflow."
    )
    return DamagedFilesError(
        f"{context}: {len(damage)} file(s) at {site} are missing or differ from what their source "
        f"recorded (size and adler32), in {root}:\n"
        + "\n".join(lines)
        + (f"\n{note}" if note else "")
        + f"\n{fix}",
        site,
        damage,
    )


def copy_verified(source: Path, destination: Path, record: FileRecord) -> str | None:
    """Copy a file over (or back to) ``destination`` if the source matches its record.

    The copy is written beside the destination and renamed into place once
    verified, so the destination is never half-written.

    Returns
    -------
    problem : `str` or `None`
        Why nothing was copied (the source's own copy is missing or differs), or
        `None` once the verified copy is in place.
    """
    if (problem := _problem(record, source)) is not None:
        return f"the source's copy {source}: {problem}"
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.part")
    try:
        shutil.copyfile(source, partial)
        if (problem := _problem(record, partial)) is not None:
            return f"the copy of {source}: {problem}"
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
    return None
