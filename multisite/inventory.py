"""Source inventory at data-release scale: detector-level raws and the tracts they overlap.

The planner (`multisite.planner`) works from an `Inventory`: one row per raw, i.e.
per (visit, detector), with the detector centre, the raw's size in bytes and the
set of tracts the raw overlaps. At DR1 size (240,000 visits x 189 detectors = 45
million raws) the inventory is held as compact numpy columns (``int32``,
``int16``, ``float32``), about 22 bytes per raw, and the tracts each raw overlaps
are dictionary-encoded: a raw overlaps one to four tracts and the distinct *tract
sets* (one tract, two neighbours, a corner of four...) number only five or six per tract,
so each raw stores one ``int32`` code into a small table of tract sets.

Two sources:

- `make_dr1_inventory`: a synthetic survey of DR1 size, for previews,
  benchmarks and tests. Visits are drawn uniformly on the sphere over a
  footprint (declination -70 to +10 degrees at full size, with a gap in right
  ascension standing for the Galactic plane); each visit carries the 189
  detectors of the LSSTCam focal plane at a random rotation. The tract geometry
  (`RingTracts`, from `make_ring_tracts`) is a ring tessellation with
  LSST-like sizes: tracts of about 2.1 unique square degrees, declination rings
  cut into right-ascension segments, each tract overlapping its neighbours by
  15% of its side.
- `read_visits_table`: a real campaign's visits table (Parquet, CSV or TSV) with
  ``visit, detector, ra, dec, bytes`` and optionally ``tract`` (one row per
  overlapping tract, as a Butler query of ``visit, detector, tract`` returns),
  for campaigns too large to query from the Butler at once.

Overlap approximation: when tracts are computed here (not given by the table),
a raw overlaps a tract when the detector's bounding box -- its centre +/-
``margin`` degrees in declination and ``margin / cos(dec)`` in right ascension,
``margin`` being the detector's half-diagonal, 0.16 degrees for LSSTCam --
intersects the tract's outer (RA, Dec) box, which includes the overlap with
its neighbours. Like the Butler's regions, this is conservative: a raw may be
sent to a tract it only borders, never missed.
"""

from __future__ import annotations

__all__ = (
    "DETECTOR_MARGIN_DEG",
    "DETECTOR_PITCH_DEG",
    "FOV_RADIUS_DEG",
    "RAW_BYTES",
    "Inventory",
    "InventoryError",
    "RingTracts",
    "TractGeometry",
    "encode_tract_sets",
    "focal_plane",
    "make_dr1_inventory",
    "make_ring_tracts",
    "read_visits_table",
)

import logging
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

_LOG = logging.getLogger(__name__)

#: Distance between neighbouring LSSTCam detector centres (42.25 mm at 20"/mm), degrees.
DETECTOR_PITCH_DEG = 0.2347
#: Half-diagonal of an LSSTCam detector (about 4k x 4k pixels of 0.2"), degrees.
DETECTOR_MARGIN_DEG = 0.16
#: Radius of the circle of the LSSTCam field of view's area (9.6 square degrees), degrees.
FOV_RADIUS_DEG = 1.75
#: Typical size of one compressed LSSTCam raw (one detector of one exposure), bytes.
RAW_BYTES = 32_000_000

#: Full-size synthetic footprint: the DR1 tract count, and the declination band it spans.
_DR1_TRACTS = 8_000
_DR1_DEC_RANGE = (-70.0, 10.0)
#: Right ascension of the Galactic centre: the synthetic footprint's RA gap is centred there.
_GALACTIC_CENTRE_RA = 266.4
_SQDEG_PER_SR = (180.0 / math.pi) ** 2
#: Visits generated per block, which bounds the generator's temporary memory.
_VISITS_PER_BLOCK = 4_000


class InventoryError(ValueError):
    """An inventory or visits table cannot be used; the message names the problem and its fix."""


@runtime_checkable
class TractGeometry(Protocol):
    """What the planner needs to know about a tract tessellation.

    Tract ``i`` has centre ``(ra[i], dec[i])`` (degrees) and lies in declination
    ring ``ring[i]``; tract ids are ``0 .. n_tracts - 1``. ``ra_min`` is where
    the footprint starts in right ascension (0 for a whole-sky skymap), so that
    orderings along a ring do not cut the footprint in the middle.
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
class RingTracts:
    """A ring tessellation: declination rings, each cut into equal right-ascension segments.

    Tract ids run ring by ring from the south, and by increasing right
    ascension (from ``ra_min``) within a ring, as in ``hsc_rings_v1``. The
    *unique* area of a tract is its ring's band between ``ra_min + j * w`` and
    ``ra_min + (j + 1) * w``; its *outer* box extends that by ``overlap / 2``
    of its side on every side, so neighbouring tracts overlap by ``overlap``
    of their side.

    Parameters
    ----------
    dec_edges : `numpy.ndarray`
        Declinations of the ring boundaries, degrees, increasing (``n_rings + 1``).
    ring_counts : `numpy.ndarray`
        Number of tracts in each ring (``n_rings``).
    ra_min : `float`
        Right ascension where every ring's first tract starts, degrees.
    ra_width : `float`
        Right-ascension extent of the footprint, degrees (360 for whole rings).
    overlap : `float`
        Fraction of a tract's side shared with each neighbour.
    """

    dec_edges: np.ndarray
    ring_counts: np.ndarray
    ra_min: float
    ra_width: float
    overlap: float = 0.15

    def __post_init__(self) -> None:
        edges = np.asarray(self.dec_edges, dtype=np.float64)
        counts = np.asarray(self.ring_counts, dtype=np.int64)
        if edges.ndim != 1 or len(edges) != len(counts) + 1 or len(counts) == 0:
            raise InventoryError("RingTracts: dec_edges must have one more entry than ring_counts (>= 1)")
        if np.any(np.diff(edges) <= 0) or edges[0] < -90 or edges[-1] > 90:
            raise InventoryError("RingTracts: dec_edges must increase within [-90, 90]")
        if np.any(counts < 1):
            raise InventoryError("RingTracts: every ring needs at least one tract")
        if not 0 < self.ra_width <= 360:
            raise InventoryError(f"RingTracts: ra_width {self.ra_width} must be in (0, 360]")
        if not 0 <= self.overlap < 1:
            raise InventoryError(f"RingTracts: overlap {self.overlap} must be in [0, 1)")
        object.__setattr__(self, "dec_edges", edges)
        object.__setattr__(self, "ring_counts", counts)

    @property
    def n_rings(self) -> int:
        return len(self.ring_counts)

    @property
    def n_tracts(self) -> int:
        return int(self.ring_counts.sum())

    @property
    def full_circle(self) -> bool:
        """Whether rings go all the way round (no gap in right ascension)."""
        return self.ra_width >= 360.0

    @cached_property
    def first_tract(self) -> np.ndarray:
        """Id of each ring's first tract, and the total at the end (``n_rings + 1``)."""
        return np.concatenate([[0], np.cumsum(self.ring_counts)])

    @cached_property
    def ring(self) -> np.ndarray:
        """Ring of each tract."""
        return np.repeat(np.arange(self.n_rings, dtype=np.int32), self.ring_counts)

    @cached_property
    def segment(self) -> np.ndarray:
        """Index of each tract within its ring."""
        return (np.arange(self.n_tracts) - self.first_tract[self.ring]).astype(np.int32)

    @cached_property
    def ra_step(self) -> np.ndarray:
        """Right-ascension width of each ring's tracts, degrees."""
        return self.ra_width / self.ring_counts

    @cached_property
    def ra(self) -> np.ndarray:
        """Right ascension of each tract's centre, degrees in [0, 360)."""
        return (self.ra_min + (self.segment + 0.5) * self.ra_step[self.ring]) % 360.0

    @cached_property
    def dec(self) -> np.ndarray:
        """Declination of each tract's centre (middle of its ring), degrees."""
        return (0.5 * (self.dec_edges[:-1] + self.dec_edges[1:]))[self.ring]

    @cached_property
    def unique_area(self) -> np.ndarray:
        """Unique (non-overlapping) area of each tract, square degrees."""
        band = np.diff(np.sin(np.radians(self.dec_edges)))
        return (np.radians(self.ra_step) * band * _SQDEG_PER_SR)[self.ring]

    @property
    def area(self) -> float:
        """Area of the footprint the tracts tile, square degrees."""
        return float(self.unique_area.sum())

    def tracts_near(self, ra: np.ndarray, dec: np.ndarray, margin: float = DETECTOR_MARGIN_DEG) -> np.ndarray:
        """Tracts whose outer box intersects a box of half-size ``margin`` around each point.

        Parameters
        ----------
        ra, dec : `numpy.ndarray`
            Positions, degrees.
        margin : `float`
            Half-size of the box around each position, degrees of declination
            (``margin / cos(dec)`` degrees of right ascension).

        Returns
        -------
        tracts : `numpy.ndarray`
            ``int32`` array of shape ``(len(ra), k)``: each row's tract ids in
            increasing order, padded with -1; ``k`` is the largest count found
            (0 columns when no position is near any tract).
        """
        ra = np.asarray(ra, dtype=np.float64)
        dec = np.asarray(dec, dtype=np.float64)
        n_tracts = self.n_tracts
        heights = np.diff(self.dec_edges)
        outer_lo = self.dec_edges[:-1] - 0.5 * self.overlap * heights
        outer_hi = self.dec_edges[1:] + 0.5 * self.overlap * heights
        # Rings' outer bands increase with their index, so the rings a box meets are a range.
        r_lo = np.searchsorted(outer_hi, dec - margin, side="left")
        r_hi = np.searchsorted(outer_lo, dec + margin, side="right") - 1
        m_ra = margin / np.maximum(np.cos(np.radians(dec)), 1e-3)
        x = (ra - self.ra_min) % 360.0
        if not self.full_circle:
            # Measure from the footprint's start, cutting the circle in the middle of the gap.
            x = np.where(x > self.ra_width + 0.5 * (360.0 - self.ra_width), x - 360.0, x)
        columns = []
        n_ring_candidates = int((r_hi - r_lo + 1).max(initial=0))
        for dr in range(n_ring_candidates):
            r = r_lo + dr
            in_ring = (r <= r_hi) & (r >= 0) & (r < self.n_rings)
            rc = np.clip(r, 0, self.n_rings - 1)
            step = self.ra_step[rc]
            count = self.ring_counts[rc]
            extra = 0.5 * self.overlap * step + m_ra
            # Segment j's outer range is [j*step - ov, (j+1)*step + ov]; it meets [x - m, x + m] for:
            j_lo = np.ceil((x - extra) / step - 1.0).astype(np.int64)
            j_hi = np.floor((x + extra) / step).astype(np.int64)
            if self.full_circle:
                # A tiny ring may be met all the way round: never list a segment twice.
                j_hi = np.minimum(j_hi, j_lo + count - 1)
            else:
                j_lo = np.maximum(j_lo, 0)
                j_hi = np.minimum(j_hi, count - 1)
            n_segment_candidates = int(np.where(in_ring, j_hi - j_lo + 1, 0).max(initial=0))
            for ds in range(n_segment_candidates):
                j = j_lo + ds
                valid = in_ring & (j <= j_hi)
                if self.full_circle:
                    j = j % count
                columns.append(np.where(valid, self.first_tract[rc] + j, n_tracts))
        if not columns:
            return np.empty((len(ra), 0), dtype=np.int32)
        matrix = np.stack(columns, axis=1)
        matrix.sort(axis=1)
        width = int((matrix < n_tracts).sum(axis=1).max(initial=0))
        matrix = matrix[:, :width].astype(np.int32)
        matrix[matrix == n_tracts] = -1
        return matrix


def make_ring_tracts(
    n_tracts: int = _DR1_TRACTS,
    *,
    tract_area: float = 2.1,
    overlap: float = 0.15,
    dec_range: tuple[float, float] | None = None,
    ra_gap_centre: float = _GALACTIC_CENTRE_RA,
) -> RingTracts:
    """Build a ring tessellation of ``n_tracts`` tracts of about ``tract_area`` square degrees.

    The footprint is a declination band with a gap in right ascension, sized so
    that ``n_tracts`` tracts of ``tract_area`` tile it. At full size (8,000
    tracts) the band is -70 to +10 degrees and the footprint covers 263 degrees
    of right ascension; smaller tract counts shrink the band about -30 degrees
    by ``sqrt(n_tracts / 8000)``, so scaled-down surveys keep the shape.

    Parameters
    ----------
    n_tracts : `int`
        Number of tracts.
    tract_area : `float`
        Unique area of a tract, square degrees. When the band cannot hold the
        tracts even going all the way round, rings close and tracts grow.
    overlap : `float`
        Fraction of a tract's side it shares with each neighbour.
    dec_range : `tuple` [`float`, `float`], optional
        Declination band, degrees; by default as described above.
    ra_gap_centre : `float`
        Right ascension at the middle of the footprint's gap, degrees.

    Returns
    -------
    tracts : `RingTracts`
        The tessellation: exactly ``n_tracts`` tracts.
    """
    if n_tracts < 1:
        raise InventoryError(f"n_tracts must be at least 1, got {n_tracts}")
    if dec_range is None:
        scale = math.sqrt(n_tracts / _DR1_TRACTS)
        centre = 0.5 * sum(_DR1_DEC_RANGE)
        half = min(0.5 * (_DR1_DEC_RANGE[1] - _DR1_DEC_RANGE[0]) * scale, 89.0 - abs(centre))
        dec_range = (centre - half, centre + half)
    dec_min, dec_max = dec_range
    side = math.sqrt(tract_area)
    n_rings = max(1, round((dec_max - dec_min) / side))
    edges = np.linspace(dec_min, dec_max, n_rings + 1)
    band = np.diff(np.sin(np.radians(edges)))  # area of each ring per radian of RA, steradians
    ra_width = min(360.0, math.degrees(n_tracts * tract_area / _SQDEG_PER_SR / band.sum()))
    ideal = n_tracts * band / band.sum()
    counts = np.maximum(np.floor(ideal).astype(np.int64), 1)
    # Largest remainders take the tracts left (or give back the excess from the smallest rings).
    while counts.sum() < n_tracts:
        counts[np.argmax(ideal - counts)] += 1
    while counts.sum() > n_tracts:
        spare = np.where(counts > 1, ideal - counts, np.inf)
        counts[np.argmin(spare)] -= 1
    ra_min = (ra_gap_centre + 0.5 * (360.0 - ra_width)) % 360.0 if ra_width < 360.0 else 0.0
    tracts = RingTracts(edges, counts, ra_min=ra_min, ra_width=ra_width, overlap=overlap)
    _LOG.debug(
        "%d tracts in %d rings, dec %.1f..%.1f, RA width %.1f, mean unique area %.2f sq deg",
        tracts.n_tracts,
        n_rings,
        dec_min,
        dec_max,
        ra_width,
        tracts.area / n_tracts,
    )
    return tracts


def focal_plane(n_detectors: int = 189) -> tuple[np.ndarray, np.ndarray]:
    """Detector centres in the focal plane, degrees from the boresight.

    For 189 detectors this is the LSSTCam science array: a 5 x 5 grid of rafts
    without its corners, each raft 3 x 3 detectors, numbered raft by raft. For
    another count, the ``n_detectors`` positions of a square grid of the same
    pitch nearest the boresight.

    Parameters
    ----------
    n_detectors : `int`
        Number of detectors.

    Returns
    -------
    x, y : `numpy.ndarray`
        Offsets of detector ``0 .. n_detectors - 1`` along the focal plane's
        axes, degrees.
    """
    if n_detectors < 1:
        raise InventoryError(f"n_detectors must be at least 1, got {n_detectors}")
    if n_detectors == 189:
        corners = {(0, 0), (0, 4), (4, 0), (4, 4)}
        cells = [
            (3 * rx + sx - 7, 3 * ry + sy - 7)
            for ry in range(5)
            for rx in range(5)
            if (rx, ry) not in corners
            for sy in range(3)
            for sx in range(3)
        ]
    else:
        half = math.ceil(math.sqrt(n_detectors)) // 2 + 1
        grid = [(i, j) for j in range(-half, half + 1) for i in range(-half, half + 1)]
        cells = sorted(grid, key=lambda c: (c[0] ** 2 + c[1] ** 2, math.atan2(c[1], c[0])))[:n_detectors]
    offsets = np.array(cells, dtype=np.float64) * DETECTOR_PITCH_DEG
    return offsets[:, 0], offsets[:, 1]


def encode_tract_sets(matrix: np.ndarray, n_tracts: int) -> tuple[np.ndarray, np.ndarray]:
    """Dictionary-encode rows of tract ids (padded with -1) into codes and a table of sets.

    Parameters
    ----------
    matrix : `numpy.ndarray`
        ``(n, k)`` integer array, each row a raw's tracts padded with -1.
    n_tracts : `int`
        Number of tracts (every id is below it).

    Returns
    -------
    codes : `numpy.ndarray`
        ``int32`` code of each row.
    sets : `numpy.ndarray`
        ``int32`` table of shape ``(n_sets, k)``: row ``codes[i]`` holds row
        ``i``'s tracts in increasing order, padded with -1.
    """
    encoder = _TractSetEncoder(n_tracts)
    codes = encoder.add(np.asarray(matrix))
    remap, sets = encoder.finish()
    return remap[codes].astype(np.int32), sets


class _TractSetEncoder:
    """Encode blocks of tract-set rows with block-local codes, then merge their dictionaries.

    A row (sorted tract ids) is packed into one ``int64``: tract ``t`` at
    position ``p`` contributes ``(t + 1) * (n_tracts + 1) ** p`` (absent = 0),
    which is exact while ``(n_tracts + 1) ** k < 2 ** 63`` (k up to 4 with
    55,000 tracts). Wider rows fall back to `numpy.unique` over rows.
    """

    def __init__(self, n_tracts: int):
        self.base = n_tracts + 1
        self.keys: list[np.ndarray] = []  # each block's distinct keys (ints, or rows for wide sets)
        self.width = 0

    def _packable(self, width: int) -> bool:
        return self.base**width < 2**63

    def add(self, matrix: np.ndarray) -> np.ndarray:
        """Encode one block; return its block-local codes (remapped by `finish`)."""
        matrix = np.sort(np.where(matrix < 0, np.iinfo(np.int64).max, matrix.astype(np.int64)), axis=1)
        matrix[matrix == np.iinfo(np.int64).max] = -1
        width = matrix.shape[1]
        offset = sum(len(k) for k in self.keys)
        if self._packable(width):
            keys = np.zeros(len(matrix), dtype=np.int64)
            for p in range(width):
                keys += (matrix[:, p] + 1) * self.base**p
            unique, inverse = np.unique(keys, return_inverse=True)
        else:
            unique, inverse = np.unique(matrix, axis=0, return_inverse=True)
            unique = [tuple(int(t) for t in row if t >= 0) for row in unique]
        self.width = max(self.width, width)
        self.keys.append(unique)
        return (inverse.reshape(-1) + offset).astype(np.int64)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the map from block-local codes to global codes, and the table of sets."""
        if self._packable(self.width):
            local = np.concatenate(self.keys) if self.keys else np.zeros(0, dtype=np.int64)
            unique, remap = np.unique(local, return_inverse=True)
            sets = np.full((len(unique), self.width), -1, dtype=np.int32)
            rest = unique.copy()
            for p in range(self.width):
                sets[:, p] = rest % self.base - 1
                rest //= self.base
            return remap.reshape(-1), sets
        rows = [row if isinstance(row, tuple) else self._unpack(int(row)) for k in self.keys for row in k]
        table: dict[tuple[int, ...], int] = {}
        remap = np.array([table.setdefault(row, len(table)) for row in rows], dtype=np.int64)
        sets = np.full((len(table), self.width), -1, dtype=np.int32)
        for row, code in table.items():
            sets[code, : len(row)] = row
        return remap, sets

    def _unpack(self, key: int) -> tuple[int, ...]:
        tracts = []
        while key:
            key, digit = divmod(key, self.base)
            if digit:
                tracts.append(digit - 1)
        return tuple(tracts)


@dataclass(frozen=True, eq=False)
class Inventory:
    """Detector-level raws: one entry per (visit, detector), as compact numpy columns.

    Parameters
    ----------
    visit_ids : `numpy.ndarray`
        ``int64`` id of each visit (``n_visits``).
    visit_ra, visit_dec : `numpy.ndarray`
        Boresight of each visit, degrees (``n_visits``).
    visit_index : `numpy.ndarray`
        ``int32`` index into ``visit_ids`` of each raw (``n_raws``).
    detector : `numpy.ndarray`
        ``int16`` detector id of each raw.
    ra, dec : `numpy.ndarray`
        ``float32`` detector centre of each raw, degrees.
    bytes : `numpy.ndarray`
        ``int32`` size of each raw, bytes (``int64`` if a raw exceeds 2 GB).
    tract_set : `numpy.ndarray`
        ``int32`` row of ``tract_sets`` listing each raw's tracts.
    tract_sets : `numpy.ndarray`
        ``int32`` table ``(n_sets, k)`` of distinct tract sets, ids increasing,
        padded with -1 (a row of -1 for raws outside every tract).
    n_tracts : `int`
        Number of tracts of the geometry the tract ids refer to.
    """

    visit_ids: np.ndarray
    visit_ra: np.ndarray
    visit_dec: np.ndarray
    visit_index: np.ndarray
    detector: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    bytes: np.ndarray
    tract_set: np.ndarray
    tract_sets: np.ndarray
    n_tracts: int
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        n_raws = len(self.visit_index)
        for name in ("detector", "ra", "dec", "bytes", "tract_set"):
            if len(getattr(self, name)) != n_raws:
                raise InventoryError(
                    f"Inventory: column {name!r} has {len(getattr(self, name))} rows, not {n_raws}"
                )
        for name in ("visit_ra", "visit_dec"):
            if len(getattr(self, name)) != len(self.visit_ids):
                raise InventoryError(f"Inventory: {name!r} must have one entry per visit")
        if self.tract_sets.ndim != 2:
            raise InventoryError("Inventory: tract_sets must be a 2-d table (n_sets, k)")
        if n_raws and (self.tract_set.min() < 0 or self.tract_set.max() >= len(self.tract_sets)):
            raise InventoryError("Inventory: tract_set codes must index rows of tract_sets")
        if self.tract_sets.size and self.tract_sets.max() >= self.n_tracts:
            raise InventoryError(
                f"Inventory: tract id {int(self.tract_sets.max())} is not below n_tracts={self.n_tracts}"
            )

    def __len__(self) -> int:
        return len(self.visit_index)

    @property
    def n_raws(self) -> int:
        return len(self.visit_index)

    @property
    def n_visits(self) -> int:
        return len(self.visit_ids)

    @property
    def visit(self) -> np.ndarray:
        """Visit id of each raw (``int64``; computed on demand, 8 bytes a raw)."""
        return self.visit_ids[self.visit_index]

    @property
    def nbytes(self) -> int:
        """Memory held by the inventory's arrays, bytes."""
        names = ("visit_ids", "visit_ra", "visit_dec", "visit_index", "detector", "ra", "dec", "bytes")
        return sum(getattr(self, n).nbytes for n in names) + self.tract_set.nbytes + self.tract_sets.nbytes

    @property
    def total_bytes(self) -> int:
        """Size of all raws, bytes."""
        return int(self.set_bytes.sum())

    @property
    def set_counts(self) -> np.ndarray:
        """Number of raws with each tract set (``int64``, one per row of ``tract_sets``)."""
        if "set_counts" not in self._cache:
            self._cache["set_counts"] = np.bincount(self.tract_set, minlength=len(self.tract_sets))
        return self._cache["set_counts"]

    @property
    def set_bytes(self) -> np.ndarray:
        """Bytes of the raws with each tract set (``int64``)."""
        if "set_bytes" not in self._cache:
            total = np.zeros(len(self.tract_sets), dtype=np.int64)
            step = 4_000_000  # bincount's float64 weights: bounded temporaries, exact sums per block
            for start in range(0, self.n_raws, step):
                part = slice(start, start + step)
                total += np.rint(
                    np.bincount(self.tract_set[part], weights=self.bytes[part], minlength=len(total))
                ).astype(np.int64)
            self._cache["set_bytes"] = total
        return self._cache["set_bytes"]

    def tracts_of(self, raw: int) -> list[int]:
        """Tracts raw number ``raw`` overlaps."""
        row = self.tract_sets[self.tract_set[raw]]
        return [int(t) for t in row if t >= 0]

    def frame(self, rows: np.ndarray | slice | None = None, *, tracts: bool = False) -> pd.DataFrame:
        """Return the inventory (or some rows of it) as a table.

        Parameters
        ----------
        rows : `numpy.ndarray` or `slice`, optional
            Raws to include (indices, mask or slice); all by default.
        tracts : `bool`
            Add a ``tract`` column in long form: one row per (raw, tract it
            overlaps), ``tract`` -1 for a raw outside every tract. This is the
            form `read_visits_table` reads back.

        Returns
        -------
        table : `pandas.DataFrame`
            Columns ``visit, detector, ra, dec, bytes, visit_ra, visit_dec``
            (and ``tract``).
        """
        rows = slice(None) if rows is None else rows
        index = self.visit_index[rows]
        table = pd.DataFrame(
            {
                "visit": self.visit_ids[index],
                "detector": self.detector[rows],
                "ra": self.ra[rows],
                "dec": self.dec[rows],
                "bytes": self.bytes[rows],
                "visit_ra": self.visit_ra[index],
                "visit_dec": self.visit_dec[index],
            }
        )
        if not tracts:
            return table
        sets = self.tract_sets[self.tract_set[rows]]
        if sets.shape[1] == 0:
            return table.assign(tract=np.int32(-1))
        count = np.maximum((sets >= 0).sum(axis=1), 1)
        long = table.loc[table.index.repeat(count)].reset_index(drop=True)
        keep = (sets >= 0) | (np.arange(sets.shape[1]) == 0)
        long["tract"] = sets[keep].astype(np.int32)
        return long


def _deproject(
    ra0: np.ndarray, dec0: np.ndarray, xi: np.ndarray, eta: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sky positions of tangent-plane offsets ``(xi, eta)`` (radians) around ``(ra0, dec0)`` (radians)."""
    sin_d0, cos_d0 = np.sin(dec0), np.cos(dec0)
    denominator = cos_d0 - eta * sin_d0
    ra = ra0 + np.arctan2(xi, denominator)
    dec = np.arctan2(sin_d0 + eta * cos_d0, np.hypot(xi, denominator))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def _visit_ids(n_visits: int, per_night: int = 700) -> np.ndarray:
    """LSSTCam-like visit ids ``YYYYMMDDnnnnn``: ``per_night`` visits a night from 2026-01-01."""
    night = np.arange(n_visits) // per_night
    days = np.datetime64("2026-01-01") + night.astype("timedelta64[D]")
    day_obs = np.char.replace(np.datetime_as_string(days, unit="D"), "-", "").astype(np.int64)
    return day_obs * 100_000 + np.arange(n_visits) % per_night + 1


def make_dr1_inventory(
    n_visits: int = 240_000,
    n_detectors: int = 189,
    n_tracts: int = _DR1_TRACTS,
    seed: int = 20260101,
    *,
    tracts: RingTracts | None = None,
    raw_bytes: int = RAW_BYTES,
    margin: float = DETECTOR_MARGIN_DEG,
) -> tuple[Inventory, RingTracts]:
    """Generate a synthetic survey inventory of DR1 size and its tract geometry.

    Visit boresights are uniform on the sphere over the footprint of
    ``tracts`` (by default `make_ring_tracts` ``(n_tracts)``), each visit at a
    random rotation; detector centres follow `focal_plane`; raw sizes are
    normal around ``raw_bytes`` (5% scatter, as compression varies). Raws are
    ordered by visit, then detector. Generation works on blocks of visits, so
    its memory is the inventory's (about 22 bytes a raw, 1 GB at DR1 size)
    plus a few hundred MB.

    Parameters
    ----------
    n_visits : `int`
        Number of visits.
    n_detectors : `int`
        Detectors per visit (189: LSSTCam).
    n_tracts : `int`
        Number of tracts of the default geometry (ignored if ``tracts`` is given).
    seed : `int`
        Random seed; the same arguments give the same inventory.
    tracts : `RingTracts`, optional
        Tract geometry to use instead of the default.
    raw_bytes : `int`
        Mean size of a raw, bytes.
    margin : `float`
        Detector half-size for the overlap test (see the module's docstring), degrees.

    Returns
    -------
    inventory : `Inventory`
        The raws.
    tracts : `RingTracts`
        The tract geometry the inventory's tract ids refer to.
    """
    if n_visits < 0:
        raise InventoryError(f"n_visits must not be negative, got {n_visits}")
    tracts = tracts if tracts is not None else make_ring_tracts(n_tracts)
    rng = np.random.default_rng(seed)
    x_fp, y_fp = (np.radians(a) for a in focal_plane(n_detectors))
    n_raws = n_visits * n_detectors
    if n_raws >= 2**31:
        raise InventoryError(f"{n_raws} raws exceed the int32 raw index; split the campaign")
    dec_lo, dec_hi = np.radians(tracts.dec_edges[[0, -1]])
    visit_dec = np.degrees(np.arcsin(rng.uniform(np.sin(dec_lo), np.sin(dec_hi), n_visits)))
    visit_ra = (tracts.ra_min + rng.uniform(0.0, tracts.ra_width, n_visits)) % 360.0
    rotation = rng.uniform(0.0, 2 * np.pi, n_visits)

    visit_index = np.repeat(np.arange(n_visits, dtype=np.int32), n_detectors)
    detector = np.tile(np.arange(n_detectors, dtype=np.int16), n_visits)
    ra = np.empty(n_raws, dtype=np.float32)
    dec = np.empty(n_raws, dtype=np.float32)
    sizes = np.empty(n_raws, dtype=np.int32 if raw_bytes * 2 < 2**31 else np.int64)
    tract_set = np.empty(n_raws, dtype=np.int32)
    encoder = _TractSetEncoder(tracts.n_tracts)
    for start in range(0, n_visits, _VISITS_PER_BLOCK):
        stop = min(start + _VISITS_PER_BLOCK, n_visits)
        part = slice(start * n_detectors, stop * n_detectors)
        cos_r, sin_r = np.cos(rotation[start:stop, None]), np.sin(rotation[start:stop, None])
        xi = x_fp * cos_r - y_fp * sin_r
        eta = x_fp * sin_r + y_fp * cos_r
        d_ra, d_dec = _deproject(
            np.radians(visit_ra[start:stop, None]), np.radians(visit_dec[start:stop, None]), xi, eta
        )
        d_ra, d_dec = d_ra.reshape(-1), d_dec.reshape(-1)
        ra[part], dec[part] = d_ra, d_dec
        sizes[part] = np.clip(
            rng.normal(raw_bytes, 0.05 * raw_bytes, len(d_ra)), 0.5 * raw_bytes, 1.5 * raw_bytes
        )
        # Overlaps from the float32 positions actually stored, so a table written and read back agrees.
        tract_set[part] = encoder.add(tracts.tracts_near(ra[part], dec[part], margin))
    remap, tract_sets = encoder.finish()
    for start in range(0, n_raws, 8_000_000):
        block = slice(start, start + 8_000_000)
        tract_set[block] = remap[tract_set[block]]
    inventory = Inventory(
        visit_ids=_visit_ids(n_visits),
        visit_ra=visit_ra,
        visit_dec=visit_dec,
        visit_index=visit_index,
        detector=detector,
        ra=ra,
        dec=dec,
        bytes=sizes,
        tract_set=tract_set,
        tract_sets=tract_sets,
        n_tracts=tracts.n_tracts,
    )
    _LOG.info(
        "Synthetic inventory: %d visits x %d detectors = %d raws, %.1f TB, %d tracts, %d tract sets, "
        "%.0f MB in memory.",
        n_visits,
        n_detectors,
        n_raws,
        inventory.total_bytes / 1e12,
        tracts.n_tracts,
        len(tract_sets),
        inventory.nbytes / 1e6,
    )
    return inventory, tracts


_REQUIRED = ("visit", "detector", "ra", "dec", "bytes")


def read_visits_table(
    path: str | Path,
    tracts: RingTracts | None = None,
    *,
    margin: float = DETECTOR_MARGIN_DEG,
) -> Inventory:
    """Read a campaign's raws from a visits table (Parquet, CSV or TSV).

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        The table: ``.parquet``/``.pq``, ``.tsv``/``.tsv.gz`` (tab-separated) or
        CSV. Columns ``visit, detector, ra, dec, bytes`` (detector centre in
        degrees, raw size in bytes); optionally ``visit_ra, visit_dec`` (the
        boresight; else the mean of the visit's detector centres) and
        ``tract``: with it, one row per (raw, tract it overlaps), e.g. from a
        Butler query of ``visit, detector, tract`` (-1 or empty for a raw
        outside every tract); without it, one row per raw, and the tracts are
        computed from ``tracts`` with a detector box of half-size ``margin``.
    tracts : `RingTracts`, optional
        Tract geometry; needed when the table has no ``tract`` column, and
        used to check tract ids when it has one.
    margin : `float`
        Detector half-size for computing overlaps, degrees.

    Returns
    -------
    inventory : `Inventory`
        The raws, ordered by visit and detector.

    Raises
    ------
    InventoryError
        Raised when the file is missing or unreadable, a column is missing,
        values are missing or negative, a raw is listed twice, or tracts can
        be neither read nor computed.
    """
    path = Path(path)
    where = f"visits table {path}"
    if not path.exists():
        raise InventoryError(f"{where}: file not found; pass the path of a Parquet or CSV visits table")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, sep="\t" if ".tsv" in name else ",", comment="#")
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad file for the operator
        raise InventoryError(f"{where}: cannot be read ({err}); write it as Parquet or CSV") from None
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise InventoryError(
            f"{where}: missing column(s) {missing}; the table needs {list(_REQUIRED)} "
            "(optional: tract, visit_ra, visit_dec)"
        )
    if table.empty:
        raise InventoryError(f"{where}: no rows; export one row per raw (or per raw and tract)")
    for column in _REQUIRED:
        if table[column].isna().any():
            raise InventoryError(f"{where}: column {column!r} has empty values; every raw needs {column}")
    if (table["bytes"] < 0).any():
        raise InventoryError(f"{where}: column 'bytes' has negative sizes; give each raw's file size")
    long = "tract" in table.columns
    if long:
        table["tract"] = table["tract"].fillna(-1).astype(np.int64)
        table = table.sort_values(["visit", "detector", "tract"], kind="stable", ignore_index=True)
    else:
        table = table.sort_values(["visit", "detector"], kind="stable", ignore_index=True)
    visit = table["visit"].to_numpy(np.int64)
    detector = table["detector"].to_numpy(np.int64)
    new_raw = np.ones(len(table), dtype=bool)
    new_raw[1:] = (visit[1:] != visit[:-1]) | (detector[1:] != detector[:-1])
    if not long and not new_raw.all():
        first = int(np.flatnonzero(~new_raw)[0])
        raise InventoryError(
            f"{where}: visit {visit[first]} detector {detector[first]} is listed twice; "
            "keep one row per raw, or add a 'tract' column for one row per (raw, tract)"
        )
    starts = np.flatnonzero(new_raw)
    raws = table.iloc[starts]
    if long:
        tract = table["tract"].to_numpy(np.int64)
        n_tracts = tracts.n_tracts if tracts is not None else int(tract.max()) + 1
        if tracts is not None and tract.max() >= n_tracts:
            raise InventoryError(
                f"{where}: tract {int(tract.max())} is not in the tract geometry ({n_tracts} tracts); "
                "use the skymap the table was made with"
            )
        raw_of_row = np.cumsum(new_raw) - 1
        position = np.arange(len(table)) - starts[raw_of_row]
        matrix = np.full((len(starts), int(position.max()) + 1), -1, dtype=np.int64)
        matrix[raw_of_row, position] = np.where(tract >= 0, tract, -1)
    else:
        if tracts is None:
            raise InventoryError(
                f"{where}: no 'tract' column and no tract geometry; add a 'tract' column "
                "(one row per raw and overlapping tract) or pass tracts="
            )
        n_tracts = tracts.n_tracts
        matrix = tracts.tracts_near(raws["ra"].to_numpy(), raws["dec"].to_numpy(), margin)
    codes, sets = encode_tract_sets(matrix, max(n_tracts, 1))
    visit_ids, visit_index = np.unique(raws["visit"].to_numpy(np.int64), return_inverse=True)
    if "visit_ra" in raws.columns and "visit_dec" in raws.columns:
        first = np.unique(visit_index, return_index=True)[1]
        visit_ra = raws["visit_ra"].to_numpy(np.float64)[first]
        visit_dec = raws["visit_dec"].to_numpy(np.float64)[first]
    else:
        # Mean of the detector centres: RA through unit vectors, so visits across RA 0 come out right.
        ra_rad = np.radians(raws["ra"].to_numpy(np.float64))
        cos_sum = np.bincount(visit_index, weights=np.cos(ra_rad))
        sin_sum = np.bincount(visit_index, weights=np.sin(ra_rad))
        visit_ra = np.degrees(np.arctan2(sin_sum, cos_sum)) % 360.0
        visit_dec = np.bincount(visit_index, weights=raws["dec"].to_numpy(np.float64)) / np.bincount(
            visit_index
        )
    sizes = raws["bytes"].to_numpy(np.int64)
    inventory = Inventory(
        visit_ids=visit_ids,
        visit_ra=visit_ra,
        visit_dec=visit_dec,
        visit_index=visit_index.astype(np.int32),
        detector=raws["detector"].to_numpy(np.int16),
        ra=raws["ra"].to_numpy(np.float32),
        dec=raws["dec"].to_numpy(np.float32),
        bytes=sizes.astype(np.int32) if sizes.max() < 2**31 else sizes,
        tract_set=codes,
        tract_sets=sets,
        n_tracts=n_tracts,
    )
    _LOG.info("%s: %d raws of %d visits, %d tract sets.", where, len(inventory), len(visit_ids), len(sets))
    return inventory
