"""Planning at data-release scale: which site processes which tracts, and what it needs.

The planner takes an `~multisite.inventory.Inventory` (detector-level raws and the
tracts each overlaps), the tract geometry (`~multisite.geometry.TractGeometry`),
and the sites with their target shares, and returns a `Plan`:

- the assignment: each *unit* (a tract, or a group of tracts) at exactly one site
  (`Plan.assignment`; the campaign config's units table is `Plan.campaign_units`);
- each site's input manifest: every raw overlapping one of its tracts (a raw
  overlapping tracts at two sites is shipped to both);
- a summary: per site the raws, bytes and estimated core-hours (proportional to
  the detector-visits it processes) against its target share, and the
  duplication factor (raw bytes shipped to all sites / unique raw bytes).

Assignment is explicit (every unit given a site), or automatic: ``contiguous``
(the default) orders the units along a space-filling path -- declination rings
walked in alternating directions (``rings``), or right-ascension columns
walked up and down (``columns``) -- and cuts the path into one contiguous block
per site, choosing the order of the sites along the path, the path (``auto``:
whichever duplicates less) and the cut points so that each site's share of the
work lands within ``share_tolerance`` of its target. Pinned units stay where
they are pinned; the other units fill each site's remaining capacity. Two naive
baselines, for comparison: ``round_robin`` (units by tract id dealt to the site
furthest below its share, a share-weighted round-robin) and ``id_blocks``
(contiguous blocks of tract ids, sites in configuration order).

Everything per raw is done once, vectorised: raws are grouped by the set of
tracts they overlap (`Inventory.tract_sets`, a few tens of thousands at DR1
size), so evaluating an assignment costs a pass over those sets, not over 45
million raws; manifests are materialised only when asked for.

Shares are shares of the work: a site's core-hours over the sum of all sites'
core-hours, counting a raw processed at two sites twice (as step 1 is).

The assignment is not the workflow's placement (`multisite.placement`: which
raws each site needs, found from the central Butler's regions once the
campaign runs with the units table written here); chunks of the assigned units
follow the workflow's own rule (`multisite.flow.chunk_units`).
"""

from __future__ import annotations

__all__ = (
    "DR1_CORE_HOURS_PER_RAW",
    "METHODS",
    "ORDERS",
    "SITE_NAME",
    "SITE_NAME_RULE",
    "Plan",
    "UnitMap",
    "check_sites",
    "make_plan",
    "make_units",
    "plan_chunks",
    "write_plan",
)

import itertools
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import PlacementError
from .flow import chunk_units
from .geometry import TractGeometry
from .inventory import Inventory

_LOG = logging.getLogger(__name__)

#: DR1 projection: 40 million core-hours over 240,000 visits x 189 detectors.
DR1_CORE_HOURS_PER_RAW = 40e6 / (240_000 * 189)
#: Assignment methods of `make_plan`.
METHODS = ("contiguous", "round_robin", "id_blocks")
#: Paths along which ``contiguous`` cuts the footprint.
ORDERS = ("auto", "rings", "columns")
#: Site orders tried exhaustively up to this many sites (6! = 720 permutations per path).
_MAX_PERMUTED_SITES = 6
#: Share-refinement rounds for one candidate (site order and path).
_REFINE_ROUNDS = 12
#: Candidates (path and site order) whose cuts are refined, least duplication first.
_REFINED_CANDIDATES = 8
#: Tolerance on the sum of shares.
_SHARE_SUM_TOLERANCE = 1e-6
#: A site name, as in the campaign config: it names files (``manifests/<site>.parquet``) and config entries.
SITE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: What `SITE_NAME` accepts, for messages.
SITE_NAME_RULE = (
    "a lower-case letter, then lower-case letters, digits or '_' (32 at most), as in the campaign config"
)


@dataclass(frozen=True, eq=False)
class UnitMap:
    """The units of sky the planner places: each tract in at most one unit.

    Parameters
    ----------
    names : `tuple` [`str`, ...]
        Unit names, in unit index order.
    unit_of_tract : `numpy.ndarray`
        ``int32`` unit index of each tract, -1 for a tract in no unit (not
        processed by this campaign).
    """

    names: tuple[str, ...]
    unit_of_tract: np.ndarray

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise PlacementError(["units: unit names must be unique"])
        if self.unit_of_tract.size and self.unit_of_tract.max() >= len(self.names):
            raise PlacementError(["units: unit_of_tract refers to a unit index beyond the names"])

    @property
    def n_units(self) -> int:
        return len(self.names)

    def index(self) -> dict[str, int]:
        """Return the unit index of each name."""
        return {name: i for i, name in enumerate(self.names)}

    def tracts_of(self, unit: str) -> np.ndarray:
        """Tracts of one unit, increasing."""
        return np.flatnonzero(self.unit_of_tract == self.index()[unit])

    @classmethod
    def from_table(cls, table: pd.DataFrame, n_tracts: int) -> UnitMap:
        """Units from a table with columns ``unit`` and ``tract`` (e.g. config's units table).

        Parameters
        ----------
        table : `pandas.DataFrame`
            One row per (unit, tract); a tract in at most one unit.
        n_tracts : `int`
            Number of tracts of the geometry.

        Returns
        -------
        units : `UnitMap`
            Units in order of first appearance; tracts not listed are in no unit.
        """
        problems = []
        missing = {"unit", "tract"} - set(table.columns)
        if missing:
            raise PlacementError([f"units: missing column(s) {sorted(missing)}; give unit and tract"])
        tracts = table["tract"].to_numpy(np.int64)
        if len(tracts) and (tracts.min() < 0 or tracts.max() >= n_tracts):
            problems.append(f"units: tract ids must be in 0..{n_tracts - 1}; fix the table's tract column")
        duplicated = table[table.duplicated("tract", keep=False)]
        if len(duplicated):
            problems.append(
                f"units: tract {int(duplicated['tract'].iloc[0])} is in more than one unit "
                f"({sorted(set(duplicated['unit'].astype(str)))[:4]}); list each tract once"
            )
        if problems:
            raise PlacementError(problems)
        names = tuple(dict.fromkeys(table["unit"].astype(str)))
        index = {name: i for i, name in enumerate(names)}
        unit_of_tract = np.full(n_tracts, -1, dtype=np.int32)
        unit_of_tract[tracts] = [index[u] for u in table["unit"].astype(str)]
        return cls(names, unit_of_tract)


def make_units(tracts: TractGeometry, tracts_per_unit: int = 1) -> UnitMap:
    """Units of one tract (``t<tract>``), or of runs of neighbouring tracts along each ring.

    Parameters
    ----------
    tracts : `~multisite.geometry.TractGeometry`
        The tract geometry; ids it does not hold (NaN centre) are in no unit.
    tracts_per_unit : `int`
        Tracts per unit: 1 for tract units; more groups consecutive tracts of
        a ring (by right ascension) into units ``g<index>``, the last of a
        ring possibly smaller.

    Returns
    -------
    units : `UnitMap`
        Every tract of the geometry in exactly one unit.
    """
    if tracts_per_unit < 1:
        raise PlacementError([f"tracts_per_unit: must be at least 1, got {tracts_per_unit}"])
    members = np.flatnonzero(np.isfinite(np.asarray(tracts.ra, dtype=np.float64)))
    unit_of_tract = np.full(tracts.n_tracts, -1, dtype=np.int32)
    n = len(members)
    if tracts_per_unit == 1:
        unit_of_tract[members] = np.arange(n)
        return UnitMap(tuple(f"t{t}" for t in members), unit_of_tract)
    ring = np.asarray(tracts.ring, dtype=np.int64)[members]
    x = _ra_offset(tracts)[members]
    order = np.lexsort((x, ring))
    rank_in_ring = np.empty(n, dtype=np.int64)
    ring_sorted = ring[order]
    starts = np.flatnonzero(np.r_[True, ring_sorted[1:] != ring_sorted[:-1]])
    rank_in_ring[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    group_key = ring * (n + 1) + rank_in_ring // tracts_per_unit
    _, unit_of_member = np.unique(group_key, return_inverse=True)
    unit_of_tract[members] = unit_of_member
    n_units = int(unit_of_member.max(initial=-1)) + 1
    width = len(str(max(n_units - 1, 0)))
    return UnitMap(tuple(f"g{i:0{width}d}" for i in range(n_units)), unit_of_tract)


def _ra_offset(tracts: TractGeometry) -> np.ndarray:
    """Right ascension of tract centres measured from the footprint's start, degrees in [0, 360)."""
    return (np.asarray(tracts.ra, dtype=np.float64) - tracts.ra_min) % 360.0


@dataclass(frozen=True, eq=False)
class _Problem:
    """The planner's inputs reduced to tract sets and units, for evaluating assignments fast."""

    n_sites: int
    targets: np.ndarray
    unit_sets: np.ndarray  # (G, K) unit of each member tract, n_units for none
    set_counts: np.ndarray
    set_bytes: np.ndarray
    unit_weight: np.ndarray  # raws per unit, a raw shared by k units counting 1/k to each
    unit_raws: np.ndarray  # raws overlapping each unit

    @classmethod
    def build(cls, inventory: Inventory, units: UnitMap, targets: np.ndarray) -> _Problem:
        n_units = units.n_units
        sets = inventory.tract_sets
        unit_ext = np.append(units.unit_of_tract, -1)
        unit_sets = unit_ext[np.where(sets < 0, len(units.unit_of_tract), sets)]
        unit_sets = np.sort(np.where(unit_sets < 0, n_units, unit_sets), axis=1)
        # A raw overlapping two tracts of one unit counts once for it.
        distinct = unit_sets < n_units
        distinct[:, 1:] &= unit_sets[:, 1:] != unit_sets[:, :-1]
        n_distinct = distinct.sum(axis=1)
        counts = inventory.set_counts
        rows, cols = np.nonzero(distinct)
        unit_raws = np.bincount(unit_sets[rows, cols], weights=counts[rows], minlength=n_units)
        unit_weight = np.bincount(
            unit_sets[rows, cols], weights=counts[rows] / n_distinct[rows], minlength=n_units
        )
        return cls(
            n_sites=len(targets),
            targets=targets,
            unit_sets=unit_sets,
            set_counts=counts,
            set_bytes=inventory.set_bytes,
            unit_weight=unit_weight,
            unit_raws=np.rint(unit_raws).astype(np.int64),
        )

    def needs(self, unit_site: np.ndarray) -> np.ndarray:
        """``(n_sets, n_sites)`` whether each site needs the raws of each tract set."""
        site_ext = np.append(unit_site, -1)
        set_sites = site_ext[self.unit_sets]
        return np.stack([(set_sites == s).any(axis=1) for s in range(self.n_sites)], axis=1)

    def evaluate(self, unit_site: np.ndarray) -> tuple[float, np.ndarray]:
        """Duplication factor and per-site shares of the work for an assignment."""
        needs = self.needs(unit_site)
        site_raws = self.set_counts @ needs
        site_bytes = self.set_bytes @ needs
        unique = self.set_bytes[needs.any(axis=1)].sum()
        total = site_raws.sum()
        shares = site_raws / total if total else np.zeros(self.n_sites)
        return (float(site_bytes.sum() / unique) if unique else 1.0), shares


@dataclass(frozen=True, eq=False)
class Plan:
    """A plan: every unit assigned to one site, and what each site needs.

    Build it with `make_plan`. Per-site figures come from the inventory's
    tract sets; `manifest` lists the raws themselves.
    """

    inventory: Inventory = field(repr=False)
    units: UnitMap = field(repr=False)
    sites: tuple[str, ...]
    targets: np.ndarray
    unit_site: np.ndarray = field(repr=False)
    unit_order: np.ndarray = field(repr=False)
    unit_raws: np.ndarray = field(repr=False)
    pinned: frozenset[str] = field(repr=False)
    method: str
    core_hours_per_raw: float
    set_needs: np.ndarray = field(repr=False)
    _manifests: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    @property
    def site_raws(self) -> np.ndarray:
        """Raws each site needs (its detector-visits to process)."""
        return self.inventory.set_counts @ self.set_needs

    @property
    def site_bytes(self) -> np.ndarray:
        """Bytes of raws shipped to each site."""
        return self.inventory.set_bytes @ self.set_needs

    @property
    def site_core_hours(self) -> np.ndarray:
        """Estimated core-hours of each site: its raws x core-hours per raw."""
        return self.site_raws * self.core_hours_per_raw

    @property
    def shares(self) -> np.ndarray:
        """Each site's share of the work (core-hours over all sites' core-hours)."""
        raws = self.site_raws
        return raws / raws.sum() if raws.sum() else np.zeros(len(self.sites))

    @property
    def max_share_error(self) -> float:
        """Largest distance of a site's share from its target (a fraction, not points)."""
        return float(np.abs(self.shares - self.targets).max())

    @property
    def unique_raws(self) -> int:
        """Raws needed by at least one site."""
        return int(self.inventory.set_counts[self.set_needs.any(axis=1)].sum())

    @property
    def unique_bytes(self) -> int:
        """Bytes of the raws needed by at least one site."""
        return int(self.inventory.set_bytes[self.set_needs.any(axis=1)].sum())

    @property
    def unneeded_raws(self) -> int:
        """Raws overlapping no unit of the campaign (off the footprint's edge): shipped nowhere."""
        return int(self.inventory.n_raws - self.unique_raws)

    @property
    def shipped_bytes(self) -> int:
        """Bytes shipped to all sites together (a raw needed at two sites counts twice)."""
        return int(self.site_bytes.sum())

    @property
    def duplication_factor(self) -> float:
        """Raw bytes shipped to all sites over unique raw bytes (1 when nothing is shipped twice)."""
        unique = self.unique_bytes
        return self.shipped_bytes / unique if unique else 1.0

    def _site_order(self, site: int) -> np.ndarray:
        """Return the unit indices of site number ``site``, in the order of the planner's path."""
        return self.unit_order[self.unit_site[self.unit_order] == site]

    def site_units(self, site: str) -> list[str]:
        """Units of one site, in the order of the planner's path (neighbours together)."""
        return [self.units.names[u] for u in self._site_order(self.sites.index(site))]

    @property
    def assignment(self) -> pd.DataFrame:
        """The assignment: one row per tract of a unit, ``unit, tract, site``, by tract id."""
        tracts = np.flatnonzero(self.units.unit_of_tract >= 0)
        return self._unit_rows(tracts)

    @property
    def campaign_units(self) -> pd.DataFrame:
        """The campaign config's units table (``units:``): ``unit, tract, patch, site``.

        Sites in order, each site's units along the planner's path (so that
        chunks, consecutive units of a site, hold neighbours), a unit's tracts
        by id; ``patch`` is empty (whole tracts).
        """
        order = np.concatenate([self._site_order(s) for s in range(len(self.sites))])
        position = np.empty(self.units.n_units, dtype=np.int64)
        position[order] = np.arange(len(order))
        tracts = np.flatnonzero(self.units.unit_of_tract >= 0)
        tracts = tracts[np.argsort(position[self.units.unit_of_tract[tracts]], kind="stable")]
        table = self._unit_rows(tracts)
        table.insert(2, "patch", "")
        return table

    def _unit_rows(self, tracts: np.ndarray) -> pd.DataFrame:
        """Return ``unit, tract, site`` of some tracts of units, in the order given."""
        unit = self.units.unit_of_tract[tracts]
        return pd.DataFrame(
            {
                "unit": np.asarray(self.units.names, dtype=object)[unit],
                "tract": tracts,
                "site": np.asarray(self.sites, dtype=object)[self.unit_site[unit]],
            }
        )

    @property
    def unit_table(self) -> pd.DataFrame:
        """One row per unit: ``unit, site, tracts, raws, core_hours, pinned``.

        ``raws`` counts the raws overlapping the unit (its step-1 quanta if run on
        its own); ``core_hours`` is their estimate.
        """
        return pd.DataFrame(
            {
                "unit": self.units.names,
                "site": np.asarray(self.sites, dtype=object)[self.unit_site],
                "tracts": np.bincount(
                    self.units.unit_of_tract[self.units.unit_of_tract >= 0], minlength=self.units.n_units
                ),
                "raws": self.unit_raws,
                "core_hours": self.unit_raws * self.core_hours_per_raw,
                "pinned": [name in self.pinned for name in self.units.names],
            }
        )

    @property
    def summary(self) -> pd.DataFrame:
        """One row per site: units, tracts, raws, bytes, core-hours, share, target and their gap."""
        tracts_per_unit = np.bincount(
            self.units.unit_of_tract[self.units.unit_of_tract >= 0], minlength=self.units.n_units
        )
        shares = self.shares
        return pd.DataFrame(
            {
                "site": self.sites,
                "units": np.bincount(self.unit_site, minlength=len(self.sites)),
                "tracts": np.bincount(
                    self.unit_site, weights=tracts_per_unit, minlength=len(self.sites)
                ).astype(np.int64),
                "raws": self.site_raws,
                "bytes": self.site_bytes,
                "core_hours": self.site_core_hours,
                "share": shares,
                "target": self.targets,
                "share_minus_target_pp": 100 * (shares - self.targets),
            }
        )

    def manifest(self, site: str) -> np.ndarray:
        """Raws one site needs, as indices into the inventory (``int32``, increasing).

        Parameters
        ----------
        site : `str`
            Site name.

        Returns
        -------
        raws : `numpy.ndarray`
            Index of every raw overlapping a tract of one of the site's units.
        """
        if site not in self.sites:
            raise PlacementError([f"site: unknown site {site!r}; sites are {list(self.sites)}"])
        if site not in self._manifests:
            needed = self.set_needs[:, self.sites.index(site)]
            tract_set = self.inventory.tract_set
            parts = []
            step = 8_000_000
            for start in range(0, len(tract_set), step):
                mask = needed[tract_set[start : start + step]]
                parts.append((np.flatnonzero(mask) + start).astype(np.int32))
            self._manifests[site] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return self._manifests[site]

    def manifest_frame(self, site: str) -> pd.DataFrame:
        """One site's manifest as a table: ``visit, detector, bytes`` of each raw it needs."""
        rows = self.manifest(site)
        inventory = self.inventory
        return pd.DataFrame(
            {
                "visit": inventory.visit_ids[inventory.visit_index[rows]],
                "detector": inventory.detector[rows],
                "bytes": inventory.bytes[rows],
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as plain data, for a marker or JSON."""
        return {
            "method": self.method,
            "units": self.units.n_units,
            "raws": int(self.inventory.n_raws),
            "unique_raws": self.unique_raws,
            "unneeded_raws": self.unneeded_raws,
            "unique_bytes": self.unique_bytes,
            "shipped_bytes": self.shipped_bytes,
            "duplication_factor": round(self.duplication_factor, 6),
            "max_share_error": round(self.max_share_error, 6),
            "core_hours_per_raw": self.core_hours_per_raw,
            "sites": [
                {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
                for row in self.summary.to_dict("records")
            ],
        }


def check_sites(shares: Mapping[str, float], pins: Mapping[str, str] | None = None) -> None:
    """Check the sites and their shares, and the sites units are pinned to.

    `make_plan` checks the same; this checks them before an inventory is read.

    Parameters
    ----------
    shares : `~collections.abc.Mapping` [`str`, `float`]
        Target share of each site.
    pins : `~collections.abc.Mapping` [`str`, `str`], optional
        Units forced to a site.

    Raises
    ------
    PlacementError
        Raised, listing every problem, for: no sites, a site name that is not
        a plain lower-case name (`SITE_NAME`: it names files and config
        entries), shares that are not numbers, negative or do not sum to 1, a
        pin to an unknown site.
    """
    problems = _site_problems(shares, {"pins": pins or {}})
    if problems:
        raise PlacementError(problems)


def _site_problems(shares: Mapping[str, float], mappings: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Return the problems of the sites, their shares, and the sites of pins or assignment (``mappings``)."""
    problems: list[str] = []
    if not shares:
        problems.append("shares: no sites; give each site's target share, e.g. {'usdf': 0.35, ...}")
    for site, share in shares.items():
        if not (isinstance(site, str) and SITE_NAME.fullmatch(site)):
            problems.append(f"shares: site name {site!r} is not a plain name; name it with {SITE_NAME_RULE}")
        if not isinstance(share, int | float) or not math.isfinite(share):
            problems.append(f"shares: site {site!r} has share {share!r}; give a number between 0 and 1")
        elif share < 0:
            problems.append(
                f"shares: site {site!r} has negative share {share}; shares are fractions of the "
                "campaign between 0 and 1 (use 0 for a site that gets only pinned units)"
            )
    values = [v for v in shares.values() if isinstance(v, int | float) and math.isfinite(v)]
    if shares and len(values) == len(shares) and abs(sum(values) - 1.0) > _SHARE_SUM_TOLERANCE:
        problems.append(
            f"shares: they sum to {sum(values):.6g}, not 1; scale them so they add up to 1 "
            f"(tolerance {_SHARE_SUM_TOLERANCE:g})"
        )
    for what, mapping in mappings.items():
        for unit, site in mapping.items():
            if site not in shares:
                verb, fix = ("pinned", "pin") if what == "pins" else ("assigned", "assignment")
                problems.append(
                    f"{what}: unit {unit!r} is {verb} to unknown site {site!r}; known sites: "
                    f"{sorted(shares)}; add the site to shares or fix the {fix}"
                )
    return problems


def _check_inputs(
    inventory: Inventory,
    tracts: TractGeometry,
    shares: Mapping[str, float],
    units: UnitMap,
    assignment: Mapping[str, str] | None,
    pins: Mapping[str, str] | None,
    method: str,
    order: str,
    core_hours_per_raw: float,
) -> None:
    problems = _site_problems(shares, {"pins": pins or {}, "assignment": assignment or {}})
    if inventory.n_raws == 0:
        problems.append("inventory: no raws; check the source query or visits table (it selected nothing)")
    if inventory.n_tracts > tracts.n_tracts:
        problems.append(
            f"inventory: its tract ids go up to {inventory.n_tracts - 1} but the geometry has "
            f"{tracts.n_tracts} tracts; use the geometry the inventory was made with"
        )
    if len(units.unit_of_tract) != tracts.n_tracts:
        problems.append(
            f"units: they map {len(units.unit_of_tract)} tracts but the geometry has {tracts.n_tracts}; "
            "build them from the same geometry (make_units)"
        )
    if units.n_units == 0:
        problems.append("units: no units to place; give at least one unit")
    if method not in METHODS:
        problems.append(f"method: unknown method {method!r}; choose one of {list(METHODS)}")
    if order not in ORDERS:
        problems.append(f"order: unknown order {order!r}; choose one of {list(ORDERS)}")
    if not (isinstance(core_hours_per_raw, int | float) and core_hours_per_raw > 0):
        problems.append(f"core_hours_per_raw: must be a positive number, got {core_hours_per_raw!r}")
    known_units = set(units.names)
    for what, mapping in (("pins", pins or {}), ("assignment", assignment or {})):
        for unit in mapping:
            if unit not in known_units:
                problems.append(
                    f"{what}: unknown unit {unit!r}; units are named like {units.names[:3]} "
                    "(check the unit granularity)"
                )
    if assignment is not None:
        missing = [u for u in units.names if u not in assignment]
        if missing:
            problems.append(
                f"assignment: {len(missing)} unit(s) have no site, e.g. {missing[:5]}; an explicit "
                "assignment gives every unit a site (or leave it out for automatic assignment)"
            )
        for unit, site in (pins or {}).items():
            if unit in assignment and assignment[unit] != site:
                problems.append(
                    f"pins: unit {unit!r} is pinned to {site!r} but assigned to {assignment[unit]!r}; "
                    "make them agree"
                )
    if problems:
        raise PlacementError(problems)


def _unit_positions(tracts: TractGeometry, units: UnitMap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each unit's ring (lowest of its tracts'), RA offset from the footprint's start and dec (means)."""
    n = units.n_units
    member = units.unit_of_tract >= 0
    unit = units.unit_of_tract[member]
    counts = np.maximum(np.bincount(unit, minlength=n), 1)
    x = np.bincount(unit, weights=_ra_offset(tracts)[member], minlength=n) / counts
    dec = np.bincount(unit, weights=np.asarray(tracts.dec, dtype=np.float64)[member], minlength=n) / counts
    ring = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(ring, unit, np.asarray(tracts.ring, dtype=np.int64)[member])
    return ring, x, dec


def _paths(tracts: TractGeometry, units: UnitMap, order: str) -> dict[str, np.ndarray]:
    """Orders of the units along the contiguous paths asked for."""
    ring, x, dec = _unit_positions(tracts, units)
    paths = {}
    if order in ("auto", "rings"):
        # Rings south to north, alternately west-east and east-west, so the path never jumps.
        _, ring_rank = np.unique(ring, return_inverse=True)
        paths["rings"] = np.lexsort((np.where(ring_rank % 2 == 0, x, -x), ring_rank))
    if order in ("auto", "columns"):
        # Columns about as wide as a tract, each walked north then south alternately.
        n_rings = len(np.unique(ring))
        n_columns = max(1, round(units.n_units / max(n_rings, 1)))
        span = x.max() - x.min()
        column = np.minimum(
            ((x - x.min()) / (span if span > 0 else 1.0) * n_columns).astype(np.int64), n_columns - 1
        )
        paths["columns"] = np.lexsort((np.where(column % 2 == 0, dec, -dec), column))
    return paths


def _cut(path: np.ndarray, weight: np.ndarray, site_order: Sequence[int], capacity: np.ndarray) -> np.ndarray:
    """Cut the units of ``path`` into consecutive blocks, one per site, of about ``capacity`` weight."""
    if len(path) == 0:
        return np.zeros(0, dtype=np.int64)
    cumulative = np.cumsum(weight[path])
    bounds = np.cumsum(capacity[list(site_order)])[:-1]
    # The first unit whose cumulative weight reaches each bound: split after it or before it,
    # whichever leaves the cumulative weight nearer the bound.
    reach = np.minimum(np.searchsorted(cumulative, bounds), len(path) - 1)
    reach_before = np.where(reach > 0, cumulative[np.maximum(reach - 1, 0)], 0.0)
    split = np.where(np.abs(cumulative[reach] - bounds) <= np.abs(bounds - reach_before), reach + 1, reach)
    split = np.maximum.accumulate(np.minimum(split, len(path)))
    block = np.searchsorted(split, np.arange(len(path)), side="right")
    return np.asarray(site_order)[block]


def _capacities(problem: _Problem, effective: np.ndarray, pinned_load: np.ndarray, free: float) -> np.ndarray:
    """Weight each site should take from the free units: its share minus its pinned load."""
    total = problem.unit_weight.sum()
    capacity = np.maximum(effective * total - pinned_load, 0.0)
    if capacity.sum() > 0:
        return capacity * (free / capacity.sum())
    return problem.targets * free


def _fill(
    problem: _Problem, path: np.ndarray, pinned: np.ndarray, site_order: Sequence[int], effective: np.ndarray
) -> np.ndarray:
    """Assign pinned units as pinned, and cut the others in blocks along ``path``."""
    unit_site = pinned.copy()
    free_path = path[pinned[path] < 0]
    pinned_load = np.bincount(
        pinned[pinned >= 0], weights=problem.unit_weight[pinned >= 0], minlength=problem.n_sites
    )
    capacity = _capacities(problem, effective, pinned_load, problem.unit_weight[free_path].sum())
    unit_site[free_path] = _cut(free_path, problem.unit_weight, site_order, capacity)
    return unit_site


def _refine(
    problem: _Problem, path: np.ndarray, pinned: np.ndarray, site_order: Sequence[int], tolerance: float
) -> tuple[np.ndarray, float, float]:
    """Move the cut points until every site's share (duplicates included) is near its target.

    Returns the best assignment found, its largest share error and its duplication factor.
    """
    targets = problem.targets
    effective = targets.copy()
    best: tuple[np.ndarray, float, float] | None = None
    for _ in range(_REFINE_ROUNDS):
        unit_site = _fill(problem, path, pinned, site_order, effective)
        duplication, shares = problem.evaluate(unit_site)
        error = float(np.abs(shares - targets).max())
        if best is None or error < best[1]:
            best = (unit_site, error, duplication)
        if error <= tolerance / 10:
            break
        # Sites over their target (boundary raws processed twice count for both) get a smaller block.
        effective = np.where(shares > 0, effective * targets / np.maximum(shares, 1e-12), targets)
        effective = effective / effective.sum() if effective.sum() > 0 else targets.copy()
    assert best is not None
    return best


def _site_orders(n_sites: int, targets: np.ndarray) -> list[tuple[int, ...]]:
    """Orders of the sites along the path to try: all of them for a few sites."""
    if n_sites <= _MAX_PERMUTED_SITES:
        return list(itertools.permutations(range(n_sites)))
    by_share = tuple(int(i) for i in np.argsort(-targets, kind="stable"))
    natural = tuple(range(n_sites))
    return [natural, natural[::-1], by_share, by_share[::-1]]


def _contiguous(
    problem: _Problem, paths: dict[str, np.ndarray], pinned: np.ndarray, tolerance: float
) -> tuple[np.ndarray, np.ndarray, str]:
    """Automatic assignment: the path, site order and cuts with the least duplication within tolerance."""
    candidates = []
    for name, path in paths.items():
        for site_order in _site_orders(problem.n_sites, problem.targets):
            unit_site = _fill(problem, path, pinned, site_order, problem.targets)
            duplication, shares = problem.evaluate(unit_site)
            candidates.append((duplication, name, site_order))
    candidates.sort(key=lambda c: c[0])
    best = None
    for rank, (_, name, site_order) in enumerate(candidates):
        if rank >= _REFINED_CANDIDATES and best is not None and best[1] <= tolerance:
            break  # sorted by first-cut duplication, which refining the cuts hardly changes
        unit_site, error, refined_duplication = _refine(problem, paths[name], pinned, site_order, tolerance)
        key = (error > tolerance, refined_duplication if error <= tolerance else error)
        if best is None or key < best[3]:
            best = (unit_site, error, refined_duplication, key, name, site_order)
    assert best is not None
    unit_site, error, duplication, _, name, site_order = best
    _LOG.info(
        "Contiguous assignment along %s, site order %s: duplication %.4f, largest share error %.2f points "
        "(%d candidates).",
        name,
        site_order,
        duplication,
        100 * error,
        len(candidates),
    )
    return unit_site, paths[name], f"contiguous:{name}"


def _round_robin(problem: _Problem, by_id: np.ndarray, pinned: np.ndarray) -> np.ndarray:
    """Baseline: units by tract id, each to the site furthest below its share so far."""
    unit_site = pinned.copy()
    weight = problem.unit_weight
    assigned = np.bincount(pinned[pinned >= 0], weights=weight[pinned >= 0], minlength=problem.n_sites)
    done = assigned.sum()
    for unit in by_id[pinned[by_id] < 0]:
        done += weight[unit]
        site = int(np.argmax(problem.targets * done - assigned))
        unit_site[unit] = site
        assigned[site] += weight[unit]
    return unit_site


def make_plan(
    inventory: Inventory,
    tracts: TractGeometry,
    shares: Mapping[str, float],
    *,
    units: UnitMap | None = None,
    assignment: Mapping[str, str] | None = None,
    pins: Mapping[str, str] | None = None,
    method: str = "contiguous",
    order: str = "auto",
    core_hours_per_raw: float = DR1_CORE_HOURS_PER_RAW,
    share_tolerance: float = 0.02,
) -> Plan:
    """Place every unit at one site and work out what each site needs.

    Parameters
    ----------
    inventory : `~multisite.inventory.Inventory`
        The raws and the tracts each overlaps.
    tracts : `~multisite.geometry.TractGeometry`
        The tract geometry the inventory refers to (centres and rings, for the paths).
    shares : `~collections.abc.Mapping` [`str`, `float`]
        Target share of the work of each site, summing to 1; the order is the
        sites' order in the outputs (and in ``id_blocks``).
    units : `UnitMap`, optional
        The units to place; by default one per tract (`make_units`).
    assignment : `~collections.abc.Mapping` [`str`, `str`], optional
        Explicit site of every unit (e.g. from configuration); ``method`` is
        then not used.
    pins : `~collections.abc.Mapping` [`str`, `str`], optional
        Units forced to a site; the automatic methods place the others around
        them, each site's pinned work counting towards its share.
    method : `str`
        ``contiguous`` (the planner), or a baseline: ``round_robin`` or ``id_blocks``.
    order : `str`
        Path for ``contiguous``: ``rings``, ``columns`` or ``auto`` (the one
        duplicating less).
    core_hours_per_raw : `float`
        Core-hours to process one detector-visit (default: DR1's 40M core-hours
        over 240,000 x 189 raws).
    share_tolerance : `float`
        Largest acceptable distance of a site's share from its target
        (0.02 = 2 percentage points); a warning says when it is not met.

    Returns
    -------
    plan : `Plan`
        The assignment, manifests and summary.

    Raises
    ------
    PlacementError
        Raised, listing every problem, for: site names or shares `check_sites`
        refuses, an empty inventory, pins or assignments naming unknown units
        or sites, an incomplete assignment, a pin contradicting the assignment,
        an unknown method or order, or units from another geometry.
    """
    units = units if units is not None else make_units(tracts)
    _check_inputs(inventory, tracts, shares, units, assignment, pins, method, order, core_hours_per_raw)
    sites = tuple(shares)
    site_index = {s: i for i, s in enumerate(sites)}
    unit_index = units.index()
    targets = np.array([float(shares[s]) for s in sites])
    problem = _Problem.build(inventory, units, targets)
    pinned = np.full(units.n_units, -1, dtype=np.int64)
    for unit, site in (pins or {}).items():
        pinned[unit_index[unit]] = site_index[site]
    paths = _paths(tracts, units, "auto" if assignment is not None or method != "contiguous" else order)
    # Units by their lowest tract id: the order of the baselines.
    first_tract = np.full(units.n_units, np.iinfo(np.int64).max)
    member = np.flatnonzero(units.unit_of_tract >= 0)
    np.minimum.at(first_tract, units.unit_of_tract[member], member)
    by_id = np.argsort(first_tract, kind="stable")

    if assignment is not None:
        unit_site = np.array([site_index[assignment[u]] for u in units.names], dtype=np.int64)
        unit_order, label = paths["rings"], "explicit"
    elif method == "contiguous":
        unit_site, unit_order, label = _contiguous(problem, paths, pinned, share_tolerance)
    elif method == "round_robin":
        unit_site, unit_order, label = _round_robin(problem, by_id, pinned), by_id, "round_robin"
    else:
        unit_site = _fill(problem, by_id, pinned, range(len(sites)), targets)
        unit_order, label = by_id, "id_blocks"

    plan = Plan(
        inventory=inventory,
        units=units,
        sites=sites,
        targets=targets,
        unit_site=unit_site.astype(np.int16),
        unit_order=unit_order,
        unit_raws=problem.unit_raws,
        pinned=frozenset(pins or ()),
        method=label,
        core_hours_per_raw=float(core_hours_per_raw),
        set_needs=problem.needs(unit_site),
    )
    error = plan.max_share_error
    if error > share_tolerance:
        _LOG.warning(
            "%s assignment: a site's share is %.2f points from its target (tolerance %.2f)%s.",
            label,
            100 * error,
            100 * share_tolerance,
            "; pins or the explicit assignment may leave no room" if pins or assignment else "",
        )
    _LOG.info(
        "%s assignment of %d units at %d sites: duplication factor %.4f, shares %s.",
        label,
        units.n_units,
        len(sites),
        plan.duplication_factor,
        ", ".join(f"{s} {100 * v:.1f}%" for s, v in zip(sites, plan.shares, strict=True)),
    )
    return plan


def plan_chunks(
    plan: Plan, *, max_quanta: int, quanta_per_unit: int, units_per_chunk: int | None = None
) -> pd.DataFrame:
    """Chunks of every site's units, as the workflow will cut them (`multisite.flow.chunk_units`).

    Parameters
    ----------
    plan : `Plan`
        The plan; each site's units are taken along the planner's path, the
        order of the units table it writes (`Plan.campaign_units`).
    max_quanta : `int`
        Largest quantum graph of one workflow (the config's ``max_quanta``).
    quanta_per_unit : `int`
        The stage's estimate of a unit's quanta (its ``quanta_per_unit``).
    units_per_chunk : `int`, optional
        The stage's ``units_per_chunk``, when it gives one.

    Returns
    -------
    chunks : `pandas.DataFrame`
        One row per unit: ``site, chunk, unit, raws`` (the raws overlapping
        the unit: its step-1 quanta).
    """
    raws = dict(zip(plan.units.names, plan.unit_raws.tolist(), strict=True))
    rows = [
        (site, chunk, unit, raws[unit])
        for site in plan.sites
        for chunk, units in chunk_units(
            plan.site_units(site),
            max_quanta=max_quanta,
            quanta_per_unit=quanta_per_unit,
            units_per_chunk=units_per_chunk,
        ).items()
        for unit in units
    ]
    return pd.DataFrame.from_records(rows, columns=["site", "chunk", "unit", "raws"])


def write_plan(plan: Plan, directory: str | Path, *, manifests: bool = True) -> dict[str, Path]:
    """Write a plan: its assignment, summary, figures, units table and the sites' manifests.

    Parameters
    ----------
    plan : `Plan`
        The plan.
    directory : `str` or `pathlib.Path`
        Output directory (created).
    manifests : `bool`
        Also write each site's manifest (``visit, detector, bytes``; needs ``pyarrow``).

    Returns
    -------
    paths : `dict` [`str`, `pathlib.Path`]
        What was written, by name: ``assignment`` (``assignment.tsv``, `Plan.assignment`),
        ``summary`` (``summary.tsv``, `Plan.summary`), ``planner`` (``planner.json``,
        `Plan.to_dict`), ``units`` (``units.tsv``, `Plan.campaign_units`, for the
        campaign config's ``units:``) and ``manifest:<site>`` (``manifests/<site>.parquet``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "assignment": directory / "assignment.tsv",
        "summary": directory / "summary.tsv",
        "planner": directory / "planner.json",
        "units": directory / "units.tsv",
    }
    plan.assignment.to_csv(paths["assignment"], sep="\t", index=False)
    plan.summary.to_csv(paths["summary"], sep="\t", index=False)
    paths["planner"].write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
    plan.campaign_units.to_csv(paths["units"], sep="\t", index=False)
    if manifests:
        (directory / "manifests").mkdir(exist_ok=True)
        for site in plan.sites:
            path = directory / "manifests" / f"{site}.parquet"
            plan.manifest_frame(site).to_parquet(path, index=False)
            paths[f"manifest:{site}"] = path
    return paths
