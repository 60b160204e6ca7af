"""Markers against the Butlers: what ``multisite check`` and ``multisite orphans`` report.

Markers say what is verified done; Snakemake trusts them without looking at the
repositories. `check_campaign` looks: every chunk and stage marker's collections and
dataset counts must be in its site's repository, every hand-off marker's datasets
stored at its destination, a stage marker's chunk markers present, and the reverse.
Each problem found is a `Finding` with the Snakemake command that redoes it.

A failed or killed attempt can leave datastore files that no registry row refers to
(a killed ``bps submit`` writes files of a RUN it never registers). `find_orphans`
lists them, and deletes them on request, never touching a file the registry knows
nor the hand-off exports (`multisite.backends.EXPORT_DIR`).
"""

from __future__ import annotations

__all__ = (
    "SNAKEMAKE",
    "CheckReport",
    "Finding",
    "Orphans",
    "check_campaign",
    "find_orphans",
    "format_check",
    "format_orphans",
)

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsst.daf.butler import Butler

from .backends import (
    MANIFEST_SUFFIX,
    datastore_root,
    delete_datastore_files,
    handoff_file_name,
    orphaned_files,
)
from .bps import chunk_refs
from .butler_utils import collection_exists, open_butler, repo_write_lock
from .config import Campaign
from .errors import HandoffError
from .flow import stage_chunks, workflow_pieces
from .integrity import Manifest
from .markers import read_marker

_LOG = logging.getLogger(__name__)

SNAKEMAKE = "snakemake --cores 2"
"""How the commands `check_campaign` gives start (with a profile: ``snakemake --profile <site>``)."""


@dataclass(frozen=True)
class Finding:
    """One marker that disagrees with the repositories or with the other markers, and how to redo it.

    Attributes
    ----------
    site : `str`
        The site it concerns (a hand-off's processing site).
    what : `str`
        The step, for a person: ``chunk c0000 of step1 at ral``.
    problem : `str`
        What is wrong.
    target : `pathlib.Path`
        The marker the fix (re)makes.
    force : `bool`
        Whether the marker exists but is wrong, so that its job must be forced
        (``--force``, which forces that one job, not the jobs before it as
        ``--forcerun RULE`` does); a missing marker only needs asking for.
    """

    site: str
    what: str
    problem: str
    target: Path
    force: bool = False

    def snakemake_args(self, run_dir: Path | None = None) -> list[str]:
        """Return the Snakemake arguments that redo it: the target, then ``--force`` if it must be forced.

        Parameters
        ----------
        run_dir : `pathlib.Path`, optional
            The directory Snakemake runs in (default: the current one); the
            target is given relative to it, as the rules name their outputs.
        """
        target = os.path.relpath(self.target, run_dir or Path.cwd())
        return [target, *(["--force"] if self.force else [])]

    def command(self, run_dir: Path | None = None) -> str:
        """Return the command that redoes it (see `snakemake_args`)."""
        return " ".join([SNAKEMAKE, *self.snakemake_args(run_dir)])


@dataclass
class CheckReport:
    """What `check_campaign` looked at, and what disagrees.

    Attributes
    ----------
    findings : `list` [`Finding`]
        Every problem, in campaign order.
    checked : `collections.Counter` [`str`]
        Markers checked, by kind (``chunk``, ``stage``, ``hand-off``).
    """

    findings: list[Finding] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)

    @property
    def consistent(self) -> bool:
        """Whether nothing disagrees."""
        return not self.findings


class _Repos:
    """The site repositories a check reads, each opened once (read-only), and those it could not open."""

    def __init__(self, campaign: Campaign):
        self.campaign = campaign
        self._open: dict[str, Butler] = {}
        self.unreadable: dict[str, str] = {}

    def get(self, site: str, needed: bool = True) -> Butler | None:
        """Return a site's repository; `None` when it cannot be opened (recorded when ``needed``)."""
        if site not in self._open:
            try:
                self._open[site] = open_butler(self.campaign.sites[site].repo)
            except Exception as err:
                if needed:
                    self.unreadable.setdefault(site, str(err).splitlines()[0])
                return None
        return self._open[site]


def _chain_children(butler: Butler, chain: str) -> list[str] | None:
    """Return a CHAINED collection's children, or `None` when it does not exist."""
    return list(butler.collections.get_info(chain).children) if collection_exists(butler, chain) else None


def _missing_collections(butler: Butler, names: list[str]) -> list[str]:
    return [name for name in names if not collection_exists(butler, name)]


def _chunk_problems(butler: Butler, marker: dict[str, Any]) -> list[str]:
    """Check a chunk marker against its repository: chain, RUNs, dataset counts."""
    chain = marker["output_chain"]
    if _chain_children(butler, chain) is None:
        return [f"its output chain {chain} is not in the repository"]
    problems = []
    if missing := _missing_collections(butler, marker.get("runs", [])):
        problems.append(f"collections of its chain are missing: {', '.join(missing)}")
    for name, count in sorted(marker["datasets"].items()):
        found = len(chunk_refs(butler, name, chain))
        if found < count:
            problems.append(f"{chain} holds {found} {name} of the {count} its marker records")
    return problems


def _stage_problems(butler: Butler, marker: dict[str, Any], chunk_chains: list[str]) -> list[str]:
    """Check a stage marker against its repository: its chain holds every chunk's chain."""
    chain = marker["output_chain"]
    children = _chain_children(butler, chain)
    if children is None:
        return [f"its output chain {chain} is not in the repository"]
    if missing := [c for c in chunk_chains if c not in children]:
        return [f"its output chain {chain} lacks the chunks' chains {', '.join(missing)}"]
    return []


def _manifest_of(campaign: Campaign, repos: _Repos, marker: dict[str, Any]) -> Path | None:
    """Return the hand-off's manifest (the dataset IDs it moved), where it still is; `None` if nowhere."""
    name = handoff_file_name(campaign.name, f"{marker['handoff']}/{marker['site']}", MANIFEST_SUFFIX)
    candidates = [marker.get("backend_details", {}).get("manifest")]
    for site in (marker["destination"], marker["source"]):
        butler = repos.get(site, needed=False) if site in campaign.sites else None
        with contextlib.suppress(HandoffError):
            candidates.append(str(datastore_root(butler) / name) if butler is not None else None)
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def _handoff_problems(campaign: Campaign, repos: _Repos, marker: dict[str, Any]) -> list[str]:
    """Check a hand-off marker: its RUNs chained at the destination, every dataset stored there."""
    dest = repos.get(marker["destination"])
    if dest is None:
        return []  # reported once, as the repository that cannot be read
    chain = marker["destination_chain"]
    children = _chain_children(dest, chain)
    if children is None:
        return [f"{chain} is not in {marker['destination']}'s repository"]
    runs = marker.get("runs", [])
    problems = []
    if missing := _missing_collections(dest, runs):
        problems.append(f"its RUNs are missing at {marker['destination']}: {', '.join(missing)}")
    elif unchained := [run for run in runs if run not in children]:
        problems.append(f"{chain} lacks its RUNs {', '.join(unchained)}")
    manifest = _manifest_of(campaign, repos, marker)
    if manifest is not None:
        ids = Manifest.read(manifest).dataset_ids()
        refs = dest.get_many_datasets(ids)
        stored = dest.stored_many(refs)
        absent = len(ids) - sum(stored.values())
        if absent:
            problems.append(
                f"{absent} of the {len(ids)} datasets of its manifest {manifest} are not stored there"
            )
    elif runs and not problems:
        present = Counter(
            ref.datasetType.name
            for ref in dest.query_all_datasets(runs, find_first=False, limit=None)
            if ref.datasetType.name in marker["datasets"]
        )
        problems += [
            f"its RUNs hold {present[name]} {name} of the {count} it records"
            for name, count in sorted(marker["datasets"].items())
            if present[name] < count
        ]
    return problems


def _check_stage(
    campaign: Campaign, repos: _Repos, report: CheckReport, stage_name: str, site: str
) -> Iterator[Finding]:
    """Check a stage's chunk markers and its stage marker at a site."""
    layout = campaign.layout
    paths = {
        chunk: layout.chunk_marker(site, stage_name, chunk)
        for chunk in stage_chunks(campaign, site, campaign.stage(stage_name))
    }
    stage_path = layout.stage_marker(site, stage_name)
    stage_marker = read_marker(stage_path) if stage_path.exists() else None
    if stage_marker is None and not any(path.exists() for path in paths.values()):
        return  # not started here (or another instance's site, whose repository may be out of reach)
    butler = repos.get(site)
    present = []
    for chunk, path in paths.items():
        what = f"chunk {chunk} of {stage_name} at {site}"
        if not path.exists():
            if stage_marker is not None:
                yield Finding(
                    site,
                    what,
                    f"its marker is missing while the stage marker {stage_path} records the stage done "
                    "(a forced rerun that failed or was killed?); `snakemake -n` does not show it, since "
                    "what depends on it is done",
                    path,
                )
            continue
        present.append(chunk)
        report.checked["chunk"] += 1
        if butler is not None and (problems := _chunk_problems(butler, read_marker(path))):
            yield Finding(site, what, "; ".join(problems), path, force=True)
    what = f"stage {stage_name} at {site}"
    if stage_marker is None:
        if len(present) == len(paths):
            yield Finding(site, what, "every chunk is verified but the stage is not gathered", stage_path)
        return
    report.checked["stage"] += 1
    if unlisted := [chunk for chunk in present if chunk not in stage_marker["chunks"]]:
        yield Finding(
            site, what, f"its marker does not list the chunks {', '.join(unlisted)}", stage_path, force=True
        )
    chains = [campaign.stage_chain(site, stage_name, chunk) for chunk in stage_marker["chunks"]]
    if butler is not None and (problems := _stage_problems(butler, stage_marker, chains)):
        yield Finding(site, what, "; ".join(problems), stage_path, force=True)


def check_campaign(campaign: Campaign, site: str | None = None) -> CheckReport:
    """Compare a campaign's markers with what its site repositories hold.

    Checked: each chunk marker's output chain, RUNs and dataset counts in its
    site's repository; each stage marker's chain holding its chunks' chains; a
    stage marker whose chunk markers are missing (a forced rerun killed mid-way),
    a chunk marker its stage marker does not list, and every chunk verified but
    the stage not gathered; each hand-off marker's RUNs chained at its
    destination and every dataset of its manifest stored there (or, without a
    manifest, its dataset counts in its RUNs). Only this instance's markers are read.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    site : `str`, optional
        Check only this site's stages and hand-offs.

    Returns
    -------
    report : `CheckReport`
        The findings, each with the command that redoes it.
    """
    report = CheckReport()
    repos = _Repos(campaign)
    sites = [site] if site is not None else list(campaign.sites)
    for stage in campaign.stages:
        for runner in campaign.stage_sites(stage):
            if runner.name in sites:
                report.findings += _check_stage(campaign, repos, report, stage.name, runner.name)
    for piece in workflow_pieces(campaign):
        path = campaign.layout.piece_marker(piece)
        if piece.site not in sites or not path.exists():
            continue
        report.checked["hand-off"] += 1
        what = f"hand-off {piece.label}"
        if problems := _handoff_problems(campaign, repos, read_marker(path)):
            report.findings.append(Finding(piece.site, what, "; ".join(problems), path, force=True))
    for name, error in repos.unreadable.items():
        problem = f"cannot be opened ({error}); the markers that need it are not checked"
        target = campaign.layout.repo_marker(name)
        report.findings.append(Finding(name, f"repository of {name}", problem, target, force=True))
    return report


def format_check(report: CheckReport, campaign: Campaign, run_dir: Path | None = None) -> str:
    """Format a `CheckReport`: each finding and its command, or the consistent verdict.

    Parameters
    ----------
    report : `CheckReport`
        What `check_campaign` found.
    campaign : `Campaign`
        The campaign.
    run_dir : `pathlib.Path`, optional
        The directory Snakemake runs in (default: the current one).
    """
    checked = ", ".join(f"{count} {kind}" for kind, count in report.checked.items()) or "no"
    if report.consistent:
        return f"Campaign {campaign.name}: consistent; {checked} markers match the repositories."
    lines = [f"Campaign {campaign.name}: {len(report.findings)} inconsistent ({checked} markers checked):"]
    for finding in report.findings:
        lines += [f"  {finding.what}: {finding.problem}", f"    redo: {finding.command(run_dir)}"]
    lines.append(
        f"Run the commands in {run_dir or Path.cwd()}, the directory Snakemake runs in (with a profile: "
        "snakemake --profile <site> instead of --cores 2); if Snakemake says the directory is locked and no "
        f"run is going on, `snakemake --unlock` first. Then `{SNAKEMAKE}` re-verifies what depends on them "
        "and redoes nothing that is done."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------- orphaned files


@dataclass(frozen=True)
class Orphans:
    """Datastore files of a site that no registry row refers to.

    Attributes
    ----------
    site : `str`
        The site.
    root : `pathlib.Path`
        Its datastore root.
    files : `tuple` [`pathlib.Path`, ...]
        The orphaned files, relative to ``root``.
    nbytes : `int`
        Their size.
    deleted : `bool`
        Whether they were deleted.
    """

    site: str
    root: Path
    files: tuple[Path, ...]
    nbytes: int
    deleted: bool


def find_orphans(campaign: Campaign, site: str, delete: bool = False) -> Orphans:
    """List, and on request delete, the datastore files of a site that no registry row refers to.

    A file is an orphan when it lies in a directory of the datastore (not at its
    top, where the repository's own files are), outside the hand-off exports
    (`multisite.backends.EXPORT_DIR`), and no dataset of any RUN collection refers
    to it, stored or predicted. Deleting holds the repository's write lock, so no
    chunk or hand-off of the campaign writes meanwhile; directories left empty go too.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    site : `str`
        The site whose datastore is looked at.
    delete : `bool`
        Delete the orphans.

    Returns
    -------
    orphans : `Orphans`
        The files, their size, and whether they were deleted.

    Raises
    ------
    HandoffError
        Raised when the site's datastore is not one local directory.
    """
    repo = campaign.sites[site].repo
    with repo_write_lock(repo) if delete else contextlib.nullcontext():
        butler = open_butler(repo)
        root = datastore_root(butler)
        files = orphaned_files(butler, root)
        nbytes = sum(path.lstat().st_size for path in files)
        if delete:
            delete_datastore_files(files, root)
            _LOG.info("Deleted %d orphaned files (%d bytes) of %s under %s.", len(files), nbytes, site, root)
    return Orphans(site, root, tuple(path.relative_to(root) for path in files), nbytes, delete)


def format_orphans(orphans: Orphans, config: str | Path) -> str:
    """Format what `find_orphans` found or deleted, with the command that deletes them."""
    where = f"{orphans.site}'s datastore {orphans.root}"
    if not orphans.files:
        return f"No orphaned files in {where}."
    lines = [f"  {path}" for path in orphans.files]
    size = f"{len(orphans.files)} orphaned files ({orphans.nbytes} bytes) in {where}"
    if orphans.deleted:
        return "\n".join([*lines, f"Deleted {size}."])
    return "\n".join(
        [
            *lines,
            f"{size}: no registry row refers to them (files of failed or killed attempts; while a chunk of "
            f"{orphans.site} runs, its new files are listed too).",
            f"Delete them with: multisite orphans {config} --site {orphans.site} --delete "
            "(it waits for the campaign's writers of the repository to finish)",
        ]
    )
