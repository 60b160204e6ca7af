"""Placement: which raws each site needs, and which site owns each piece of data.

A raw is needed at every site holding a unit (patch or tract) that its detector
region overlaps; so a raw on a boundary goes to two sites. Each raw still has one
*owner* (the first of its sites in configuration order): hand-offs towards the
central site carry only owned data, so the central site never receives the same
data ID twice.
"""

from __future__ import annotations

__all__ = (
    "SiteSelection",
    "chunk_data_ids",
    "compute_placement",
    "place_raws",
    "plan_placement",
    "read_placement",
    "units_query",
    "verify_site_inputs",
    "write_placement",
    "write_plan",
)

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from astropy.table import Table
from lsst.daf.butler import Butler, DataCoordinate, DimensionRecord

from .backends import MANIFEST_SUFFIX, datastore_root, handoff_file_name
from .butler_utils import open_butler
from .config import Campaign, Site, Unit
from .errors import HandoffError
from .flow import handoffs, workflow_pieces
from .integrity import Manifest, check_files, damaged_files, held_files, repair_command
from .markers import provenance
from .metadata import read_placement_share
from .plan_version import plan_record

_LOG = logging.getLogger(__name__)

COLUMNS = ["exposure", "visit", "detector", "site", "owner", "unit"]


def compute_placement(
    butler: Butler, campaign: Campaign, previous: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Find the raws each site needs from the central repository's regions.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Butler of the central repository, holding the raws and their visits.
    campaign : `Campaign`
        The campaign; its units say which site processes which part of the sky.
    previous : `pandas.DataFrame`, optional
        The placement the campaign ran with before its units moved: a raw keeps its
        owner while that site still needs it, so what the owner already delivered is
        never sent by another site. A raw whose owner no longer needs it goes to the
        site of the newest move's units that need it, if any.

    Returns
    -------
    placement : `pandas.DataFrame`
        One row per (raw, site that needs it): ``exposure``, ``visit``,
        ``detector``, ``site``, ``owner`` (the raw's owning site) and ``unit``
        (the first of the site's units it overlaps, which decides its chunk).
    """
    tracts = sorted({tract for u in campaign.units for tract, _ in u.cells})
    with butler.query() as query:
        query = query.join_dataset_search("raw", [campaign.raw_collection]).where(
            "tract IN (:tracts)",
            bind={"tracts": tracts},
            instrument=campaign.instrument,
            skymap=campaign.skymap,
        )
        rows = [
            (d["exposure"], d["visit"], d["detector"], d["tract"], d["patch"])
            for d in query.data_ids(["exposure", "visit", "detector", "tract", "patch"])
        ]
    return place_raws(rows, campaign, previous)


def place_raws(
    rows: Iterable[tuple[int, int, int, int, int]], campaign: Campaign, previous: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Return the placement of raws from the sky cells each overlaps (see `compute_placement`).

    Parameters
    ----------
    rows : `~collections.abc.Iterable` [`tuple`]
        ``(exposure, visit, detector, tract, patch)``: one per raw and patch it overlaps.
    campaign : `Campaign`
        The campaign, whose units say which site processes which cell.
    previous : `pandas.DataFrame`, optional
        The placement before a move, whose owners are kept where they still need the raw.
    """
    unit_index = {cell: i for i, u in enumerate(campaign.units) for cell in u.cells}
    order = {site.name: index for index, site in enumerate(campaign.processing_sites)}
    # For each raw and each site needing it, the first of that site's units it overlaps.
    needed: dict[tuple[int, int, int], dict[str, int]] = {}
    for exposure, visit, detector, tract, patch in rows:
        index = unit_index.get((tract, patch), unit_index.get((tract, None)))
        if index is not None:
            site = campaign.units[index].site
            first = needed.setdefault((exposure, visit, detector), {})
            first[site] = min(first.get(site, index), index)
    owners = {}
    if previous is not None:
        keys = zip(previous["exposure"], previous["detector"], strict=True)
        owners = dict(zip(keys, previous["owner"], strict=True))
    records = []
    for (exposure, visit, detector), sites in sorted(needed.items()):
        owner = owners.get((exposure, detector))
        if owner not in sites:
            # Of the newest move's units first: the raw goes into a moved unit's new chunk, and the
            # chunks that had begun at the sites needing it keep what they hold.
            owner = min(sites, key=lambda site: (-campaign.units[sites[site]].move, order[site]))
        records += [
            (exposure, visit, detector, site, owner, campaign.units[sites[site]].name)
            for site in sorted(sites, key=order.__getitem__)
        ]
    placement = pd.DataFrame.from_records(records, columns=COLUMNS)
    _LOG.info(
        "%d raws needed by %d sites; %d site copies in all.",
        len(needed),
        placement["site"].nunique(),
        len(placement),
    )
    return placement


def _first_unit_of_tracts(units: Iterable[Unit]) -> dict[int, str]:
    """Return, for each tract of a site's units, the first of them (in order) that covers it."""
    first: dict[int, str] = {}
    for unit in units:
        for tract, _ in unit.cells:
            first.setdefault(tract, unit.name)
    return first


@dataclass(frozen=True)
class SiteSelection:
    """The data IDs that belong to one site, for choosing what a hand-off moves.

    A data ID is *needed* by a site when the site processes it, and *owned* when
    the site is the one that reports it to the central site. Made for some of the
    site's units (a hand-off piece's), it holds what belongs to those: a raw
    belongs to the unit of its placement row, a visit to that of its first
    detector, a tract-level dataset to the first of the site's units in the tract.
    """

    site: str
    units: frozenset[tuple[int, int | None]]
    raws_needed: frozenset[tuple[int, int]]
    raws_owned: frozenset[tuple[int, int]]
    visit_detectors_needed: frozenset[tuple[int, int]]
    visit_detectors_owned: frozenset[tuple[int, int]]
    visits_needed: frozenset[int]
    visits_owned: frozenset[int]
    tracts_owned: frozenset[int]

    @classmethod
    def from_placement(
        cls, campaign: Campaign, placement: pd.DataFrame, site: str, units: Iterable[str] | None = None
    ) -> SiteSelection:
        """Return the data IDs of a site's units: all of them, or ``units`` (a hand-off piece's)."""
        site_units = campaign.units_of(site)
        names = {u.name for u in site_units} if units is None else set(units)
        mine = placement[(placement["site"] == site) & placement["unit"].isin(names)]
        owned = mine[mine["owner"] == site]

        def pairs(frame: pd.DataFrame, first: str) -> frozenset[tuple[int, int]]:
            return frozenset(zip(frame[first].astype(int), frame["detector"].astype(int), strict=True))

        # A visit is owned by the site owning its lowest-numbered detector held anywhere (and
        # belongs to the unit of that detector's raw there).
        first_detector = placement.sort_values(["visit", "detector"]).drop_duplicates("visit")
        visits_owned = frozenset(owned.merge(first_detector[["visit", "detector"]])["visit"].astype(int))
        return cls(
            site=site,
            units=frozenset(cell for u in site_units if u.name in names for cell in u.cells),
            raws_needed=pairs(mine, "exposure"),
            raws_owned=pairs(owned, "exposure"),
            visit_detectors_needed=pairs(mine, "visit"),
            visit_detectors_owned=pairs(owned, "visit"),
            visits_needed=frozenset(mine["visit"].astype(int)),
            visits_owned=visits_owned,
            tracts_owned=frozenset(
                tract for tract, unit in _first_unit_of_tracts(site_units).items() if unit in names
            ),
        )

    def accepts(self, data_id: DataCoordinate, owned: bool) -> bool:
        """Whether a dataset with this data ID belongs to the site.

        Parameters
        ----------
        data_id : `lsst.daf.butler.DataCoordinate`
            The dataset's data ID.
        owned : `bool`
            Ask whether the site owns it (for hand-offs to the central site)
            rather than whether it needs it (for hand-offs to the site).
        """
        keys = data_id.dimensions.names
        if "patch" in keys:
            return (data_id["tract"], data_id["patch"]) in self.units or (
                data_id["tract"],
                None,
            ) in self.units
        if "tract" in keys:
            if owned:
                return data_id["tract"] in self.tracts_owned
            return any(tract == data_id["tract"] for tract, _ in self.units)
        if "exposure" in keys and "detector" in keys:
            raws = self.raws_owned if owned else self.raws_needed
            return (data_id["exposure"], data_id["detector"]) in raws
        if "visit" in keys and "detector" in keys:
            pairs = self.visit_detectors_owned if owned else self.visit_detectors_needed
            return (data_id["visit"], data_id["detector"]) in pairs
        if "visit" in keys:
            return data_id["visit"] in (self.visits_owned if owned else self.visits_needed)
        # Global datasets (instrument-level): the central site's, needed everywhere.
        return not owned

    def data_query(self, campaign: Campaign) -> str:
        """Butler query expression selecting the quanta of this site's units."""
        return units_query(campaign, self.units)

    def overlapping(self, butler: Butler, campaign: Campaign, units: Iterable[str]) -> SiteSelection:
        """Return what of the site's needs touches some of its units: what a chunk of them reads.

        A visit on the edge of two of the site's units is needed by both, though its
        raws belong to one: the visits and (visit, detector)s are those whose regions
        overlap the units in ``butler`` (the spatial join of the chunk's quantum graph).
        """
        names = set(units)
        cells = frozenset(cell for u in campaign.units_of(self.site) if u.name in names for cell in u.cells)
        where = units_query(campaign, cells)
        pairs = {
            (data_id["visit"], data_id["detector"])
            for data_id in butler.query_data_ids(
                ["visit", "detector", "patch"], where=where, limit=None, explain=False
            )
        }
        visits = {v for v, _ in pairs} | {
            data_id["visit"]
            for data_id in butler.query_data_ids(["visit", "patch"], where=where, limit=None, explain=False)
        }
        return replace(
            self,
            units=cells,
            visit_detectors_needed=self.visit_detectors_needed & pairs,
            visits_needed=self.visits_needed & visits,
        )


def chunk_data_ids(campaign: Campaign, placement: pd.DataFrame, site: str, units: Iterable[str]) -> Table:
    """Return the (visit, detector) data IDs a per-visit stage's chunk processes at a site.

    Each raw a site needs belongs to the chunk of the first of the site's units it
    overlaps, so the chunks of a stage never process a raw twice.
    """
    mine = placement[(placement["site"] == site) & placement["unit"].isin(list(units))]
    return Table(
        {
            "instrument": [campaign.instrument] * len(mine),
            "visit": mine["visit"].to_numpy(dtype=np.int64),
            "detector": mine["detector"].to_numpy(dtype=np.int64),
        }
    )


def units_query(campaign: Campaign, units: Iterable[tuple[int, int | None]]) -> str:
    """Butler query expression restricting quanta to those touching some units.

    Quanta without sky-map dimensions (per visit and detector, say) are selected
    through their regions' overlap with the units, the same spatial join that
    decides placement. Values are integers and schema-checked names, so the
    expression carries no free text from configuration.
    """
    whole_tracts = sorted({int(t) for t, p in units if p is None})
    by_tract: dict[int, list[int]] = {}
    for tract, patch in units:
        if patch is not None and tract not in whole_tracts:
            by_tract.setdefault(int(tract), []).append(int(patch))
    cells = [f"tract = {t}" for t in whole_tracts]
    for tract, patches in sorted(by_tract.items()):
        cells.append(f"(tract = {tract} AND patch IN ({', '.join(map(str, sorted(patches)))}))")
    return f"instrument = '{campaign.instrument}' AND skymap = '{campaign.skymap}' AND ({' OR '.join(cells)})"


def write_placement(placement: pd.DataFrame, path: Path) -> None:
    """Write the placement table as TSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    placement.to_csv(path, sep="\t", index=False)


def read_placement(path: Path) -> pd.DataFrame:
    """Read a placement table written by `write_placement`."""
    return pd.read_csv(path, sep="\t")


def plan_placement(campaign: Campaign, placement_path: str | Path, summary_path: str | Path) -> dict:
    """Write the placement table and its per-site summary for this instance.

    The central site's instance (or the only instance) computes it from the
    central repository; another site's instance takes its share of it from the
    ``raws`` hand-off that the central site sent it.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    placement_path, summary_path : `str` or `pathlib.Path`
        TSV outputs: one row per (raw, site); one row per site.

    Returns
    -------
    marker : `dict`
        The per-site summary and the plan's version and shape
        (`multisite.plan_version.plan_record`), for the plan marker.
    """
    started = datetime.now(UTC)
    if not campaign.runs_here(campaign.central.name):
        placement = read_placement_share(campaign, campaign.instance)
        sites = [campaign.sites[campaign.instance]]
    else:
        with open_butler(campaign.central.repo) as butler:
            placement = compute_placement(butler, campaign)
            refs = butler.query_datasets(
                "raw", collections=campaign.raw_collection, limit=None, explain=False
            )
            uris = butler.get_many_uris(refs)
            sizes = {
                (ref.dataId["exposure"], ref.dataId["detector"]): uris[ref].primaryURI.size() for ref in refs
            }
        placement["bytes"] = [
            sizes[(e, d)] for e, d in zip(placement["exposure"], placement["detector"], strict=True)
        ]
        sites = campaign.processing_sites
    return write_plan(campaign, placement, sites, placement_path, summary_path) | provenance(started)


def write_plan(
    campaign: Campaign,
    placement: pd.DataFrame,
    sites: Iterable[Site],
    placement_path: str | Path,
    summary_path: str | Path,
) -> dict[str, Any]:
    """Write a placement table (with a ``bytes`` column) and its summary for ``sites``.

    Returns
    -------
    record : `dict`
        The per-site summary, the totals, the instance's site and the plan's version and
        shape, for the plan marker.
    """
    write_placement(placement, Path(placement_path))
    rows = []
    for site in sites:
        mine = placement[placement["site"] == site.name]
        rows.append(
            {
                "site": site.name,
                "units": len(campaign.units_of(site.name)),
                "raws": len(mine),
                "raws_owned": int((mine["owner"] == site.name).sum()),
                "visits": mine["visit"].nunique(),
                "bytes": int(mine["bytes"].sum()),
            }
        )
    pd.DataFrame(rows).to_csv(summary_path, sep="\t", index=False)
    unique_bytes = int(placement.drop_duplicates(["exposure", "detector"])["bytes"].sum())
    return {
        "sites": rows,
        "unique_raws": int(placement[["exposure", "detector"]].drop_duplicates().shape[0]),
        "duplication_factor": round(float(placement["bytes"].sum()) / unique_bytes, 4)
        if unique_bytes
        else None,
        # The site of the instance that runs this work directory (None: one instance runs every site).
        "instance": campaign.instance,
        **plan_record(campaign),
    }


def _records_in(
    butler: Butler, element: str, data_id: dict[str, str], key: str, values: list[int]
) -> list[DimensionRecord]:
    """Return the records of ``element`` whose ``key`` is one of ``values`` (none for none)."""
    if not values:
        return []
    return butler.query_dimension_records(
        element,
        data_id=data_id,
        where=f"{key} IN (:values)",
        bind={"values": values},
        limit=None,
        explain=False,
    )


def verify_site_inputs(campaign: Campaign, site: str, piece: str, placement: pd.DataFrame) -> dict[str, Any]:
    """Check that every raw, visit and sky unit of a raws piece is in its site's repository, and intact.

    Every file the site's ``raws`` piece delivered (each raw of its units, and with
    the first piece the site's share of the placement) is checked against the size
    and adler32 its source recorded when sending (the piece's manifest, which the
    site keeps in its datastore), unless the site's repository is the central one
    (its raws are the originals).

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    site : `str`
        The processing site.
    piece : `str`
        The ``raws`` piece (`multisite.flow.workflow_pieces`): its units' inputs are checked.
    placement : `pandas.DataFrame`
        The placement table (this instance's share of it).

    Returns
    -------
    marker : `dict`
        What was checked, for the inputs marker.

    Raises
    ------
    DamagedFilesError
        Raised naming each raw that is missing from the datastore or differs from
        its source, and the repair command (and any missing input too).
    HandoffError
        Raised listing every missing input.
    """
    started = datetime.now(UTC)
    raws_handoff = next(h for h in handoffs(campaign) if h.name == "raws")
    (wanted,) = [p for p in workflow_pieces(campaign, raws_handoff, site) if p.name == piece]
    selection = SiteSelection.from_placement(campaign, placement, site, wanted.units)
    butler = open_butler(campaign.sites[site].repo)
    chain = campaign.handoff_chain(site)
    # Only this piece's: a site's other pieces may still be on their way.
    exposures = sorted({e for e, _ in selection.raws_needed})
    found = (
        butler.query_datasets(
            "raw",
            collections=chain,
            data_id={"instrument": campaign.instrument},
            where="exposure IN (:values)",
            bind={"values": exposures},
            limit=None,
            explain=False,
        )
        if exposures
        else []
    )
    raws = {(ref.dataId["exposure"], ref.dataId["detector"]) for ref in found}
    problems = [f"raw exposure={e} detector={d}" for e, d in sorted(selection.raws_needed - raws)]
    visits = _records_in(
        butler, "visit", {"instrument": campaign.instrument}, "visit", sorted(selection.visits_needed)
    )
    problems += [f"visit record {v}" for v in sorted(selection.visits_needed - {r.id for r in visits})]
    found = _records_in(
        butler, "patch", {"skymap": campaign.skymap}, "tract", sorted({t for t, _ in selection.units})
    )
    patches = {(r.tract, r.id) for r in found}
    problems += [
        f"patch record tract={t} patch={p}"
        for t, p in sorted(selection.units)
        if p is not None and (t, p) not in patches
    ]
    damage, checked, root = [], "the central repository's own raws (no copy to check)", None
    if campaign.sites[site].repo != campaign.central.repo:
        root = datastore_root(butler)
        manifest = root / handoff_file_name(campaign.name, wanted.label, MANIFEST_SUFFIX)
        held = []
        if not manifest.is_file():
            problems.append(f"the raws piece's manifest {manifest} (each raw's recorded size and checksum)")
        else:
            try:
                held, _ = held_files(butler, Manifest.read(manifest).files)
            except HandoffError as err:
                problems.append(f"a readable raws hand-off manifest: {err}")
        damage = check_files(held)
        checked = len(held)
    listing = "\n".join(f"    {p}" for p in problems[:50])
    repo = campaign.sites[site].repo
    if damage:
        raise damaged_files(
            f"{site}: inputs of raws piece {piece}",
            site,
            damage,
            root,
            note=f"Also missing:\n{listing}" if problems else "",
        )
    if problems:
        raise HandoffError(
            f"{site}: {len(problems)} expected input(s) missing from {repo} (collection {chain}):\n"
            f"{listing}\nRerun the hand-off {wanted.label}; a file that is registered there but deleted "
            f"or damaged is put back by {repair_command(site)}."
        )
    return {
        "site": site,
        "piece": piece,
        "raws": len(selection.raws_needed),
        "visits": len(selection.visits_needed),
        "units": len(selection.units),
        "collection": chain,
        "files_verified": checked,
        **provenance(started),
    }
