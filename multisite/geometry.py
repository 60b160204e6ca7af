"""Tract geometry as the planner needs it: where each tract is, and its declination ring.

The planner (`multisite.planner`) orders units along paths over the sky, so it
needs each tract's centre and the declination ring it lies in (`TractGeometry`).
Tract ids index the geometry's arrays (``0 .. n_tracts - 1``); an id the geometry
does not hold has a NaN centre and ring -1, and no unit is made of it.

Two sources of geometry, both `TractCentres`:

- a skymap registered in a Butler (`multisite.source_inventory.skymap_tracts`):
  the centres of the tracts' regions;
- the raws themselves (`tracts_from_raws`), when an inventory lists each raw's
  tracts but no skymap is at hand: a tract's centre is the mean direction of the
  raws overlapping it, and rings are declination bands as tall as the tracts'
  spacing.
"""

from __future__ import annotations

__all__ = ("TractCentres", "TractGeometry", "nearest_spacing", "tracts_from_raws", "unit_vectors")

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import InventoryError
from .inventory import Inventory

#: Tracts whose nearest neighbour is looked for to measure the tracts' spacing (evenly chosen).
_SPACING_SAMPLE = 2_000
#: Raws handled at once when summing their directions, which bounds temporary memory.
_RAWS_PER_BLOCK = 4_000_000
#: Ring heights tried, as fractions of the tracts' nearest-neighbour spacing.
_RING_HEIGHTS = np.linspace(0.75, 1.35, 241)


@runtime_checkable
class TractGeometry(Protocol):
    """What the planner needs to know about a tract tessellation.

    Tract ``i`` has centre ``(ra[i], dec[i])`` (degrees; NaN for an id the
    geometry does not hold) and lies in declination ring ``ring[i]``; tract ids
    are ``0 .. n_tracts - 1``. ``ra_min`` is where the footprint starts in right
    ascension (0 for a whole-sky skymap), so that orderings along a ring do not
    cut the footprint in the middle.
    """

    @property
    def n_tracts(self) -> int: ...

    @property
    def ra(self) -> np.ndarray: ...

    @property
    def dec(self) -> np.ndarray: ...

    @property
    def ring(self) -> np.ndarray: ...

    @property
    def ra_min(self) -> float: ...


@dataclass(frozen=True)
class TractCentres:
    """Tract geometry given by each tract's centre and ring.

    Attributes
    ----------
    ra, dec : `numpy.ndarray`
        Centre of each tract (degrees), indexed by tract id; NaN for an id
        that is not a tract of the geometry.
    ring : `numpy.ndarray`
        Declination ring of each tract (-1 for an id that is not a tract).
    ra_min : `float`
        Where orderings along a ring start, degrees (0: whole-sky rings).
    """

    ra: np.ndarray
    dec: np.ndarray
    ring: np.ndarray
    ra_min: float = 0.0

    @property
    def n_tracts(self) -> int:
        return len(self.ra)


def tracts_from_raws(inventory: Inventory) -> TractCentres:
    """Derive the tract geometry from the raws overlapping each tract.

    A tract's centre is the mean direction of the detector centres of the raws
    overlapping it; tracts without raws are not in the geometry. Rings are
    declination bands whose height is the spacing of the tracts (the median
    distance to the nearest other tract, tuned so that the bands line up with
    the centres' declinations, as the rings of a ring skymap do); the footprint
    starts in right ascension in the middle of the widest gap between centres.

    Parameters
    ----------
    inventory : `multisite.inventory.Inventory`
        The raws and the tracts each overlaps.

    Returns
    -------
    tracts : `TractCentres`
        Centres and rings of the tracts some raw overlaps, indexed by tract id.

    Raises
    ------
    InventoryError
        Raised when no raw overlaps a tract.
    """
    n_tracts = inventory.n_tracts
    sets = inventory.tract_sets
    # Sums of the raws' unit vectors per tract set, then per tract.
    set_sums = np.zeros((len(sets), 3))
    for start in range(0, inventory.n_raws, _RAWS_PER_BLOCK):
        part = slice(start, start + _RAWS_PER_BLOCK)
        codes = inventory.tract_set[part]
        vectors = unit_vectors(inventory.ra[part].astype(np.float64), inventory.dec[part].astype(np.float64))
        for axis in range(3):
            set_sums[:, axis] += np.bincount(codes, weights=vectors[:, axis], minlength=len(sets))
    sums = np.zeros((n_tracts, 3))
    counts = np.zeros(n_tracts)
    for column in range(sets.shape[1]):
        member = sets[:, column] >= 0
        tract = sets[member, column]
        counts += np.bincount(tract, weights=inventory.set_counts[member], minlength=n_tracts)
        for axis in range(3):
            sums[:, axis] += np.bincount(tract, weights=set_sums[member, axis], minlength=n_tracts)
    known = counts > 0
    if not known.any():
        raise InventoryError(
            "inventory: no raw overlaps a tract (every tract id is -1 or empty), so there is no tract to "
            "plan; give each raw's tracts in the visits table's 'tract' column"
        )
    ra = np.full(n_tracts, np.nan)
    dec = np.full(n_tracts, np.nan)
    x, y, z = sums[known].T
    ra[known] = np.degrees(np.arctan2(y, x)) % 360.0
    dec[known] = np.degrees(np.arctan2(z, np.hypot(x, y)))
    ring = np.full(n_tracts, -1, dtype=np.int64)
    ring[known] = _declination_rings(ra[known], dec[known])
    return TractCentres(ra, dec, ring, ra_min=_footprint_start(ra[known]))


def unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Return the unit vectors ``(n, 3)`` of positions given in degrees."""
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)


def nearest_spacing(ra: np.ndarray, dec: np.ndarray) -> float:
    """Median angular distance from a position to its nearest neighbour, degrees (of a sample of them)."""
    vectors = unit_vectors(ra, dec)
    sample = np.unique(np.linspace(0, len(ra) - 1, min(len(ra), _SPACING_SAMPLE)).astype(np.int64))
    nearest = np.empty(len(sample))
    for start in range(0, len(sample), 256):
        rows = sample[start : start + 256]
        cosines = vectors[rows] @ vectors.T
        cosines[np.arange(len(rows)), rows] = -2.0  # not itself
        nearest[start : start + 256] = cosines.max(axis=1)
    return float(np.degrees(np.median(np.arccos(np.clip(nearest, -1.0, 1.0)))))


def _declination_rings(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Rings ``0 ..`` of tract centres: declination bands lined up with the centres.

    The bands' height is the one near the tracts' spacing at which the
    declinations line up best (like a ring skymap's rings, all the same height),
    and the bands' edges fall half-way between the lined-up declinations.
    """
    if len(dec) < 2:
        return np.zeros(len(dec), dtype=np.int64)
    spacing = nearest_spacing(ra, dec)
    if spacing <= 0:
        return np.zeros(len(dec), dtype=np.int64)
    heights = spacing * _RING_HEIGHTS
    phases = np.exp(2j * np.pi * dec[None, :] / heights[:, None]).mean(axis=1)
    best = int(np.argmax(np.abs(phases)))
    height = heights[best]
    offset = np.angle(phases[best]) / (2 * np.pi) * height
    _, ring = np.unique(np.rint((dec - offset) / height).astype(np.int64), return_inverse=True)
    return ring.astype(np.int64)


def _footprint_start(ra: np.ndarray) -> float:
    """Right ascension in the middle of the widest gap between tract centres, degrees."""
    ordered = np.sort(ra)
    gaps = np.diff(np.append(ordered, ordered[0] + 360.0))
    widest = int(np.argmax(gaps))
    return float((ordered[widest] + 0.5 * gaps[widest]) % 360.0)
