"""A synthetic survey of data-release size, for previews, benchmarks and tests of the planner.

`make_dr1_inventory` generates an `~multisite.inventory.Inventory` of DR1 size
with its tract geometry: visits drawn uniformly on the sphere over a footprint
(declination -70 to +10 degrees at full size, with a gap in right ascension
standing for the Galactic plane), each carrying the 189 detectors of the
LSSTCam focal plane (`focal_plane`) at a random rotation. The tract geometry
(`RingTracts`, from `make_ring_tracts`) is a ring tessellation with LSST-like
sizes: tracts of about 2.1 unique square degrees, declination rings cut into
right-ascension segments, each tract overlapping its neighbours by 15% of its
side.

Overlap approximation: a raw overlaps a tract when the detector's bounding box
-- its centre +/- ``margin`` degrees in declination and ``margin / cos(dec)``
in right ascension, ``margin`` being the detector's half-diagonal, 0.16
degrees for LSSTCam -- intersects the tract's outer (RA, Dec) box, which
includes the overlap with its neighbours. Like the Butler's regions, this is
conservative: a raw may be sent to a tract it only borders, never missed.
"""

from __future__ import annotations

__all__ = (
    "DETECTOR_MARGIN_DEG",
    "DETECTOR_PITCH_DEG",
    "DR1_TRACTS",
    "DR1_VISITS",
    "LSSTCAM_DETECTORS",
    "MAX_SCALE",
    "RAW_BYTES",
    "RingTracts",
    "focal_plane",
    "make_dr1_inventory",
    "make_ring_tracts",
    "scaled_dr1_inventory",
)

import logging
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import InventoryError
from ..inventory import MAX_RAWS, Inventory, TractSetEncoder

_LOG = logging.getLogger(__name__)

#: Distance between neighbouring LSSTCam detector centres (42.25 mm at 20"/mm), degrees.
DETECTOR_PITCH_DEG = 0.2347
#: Half-diagonal of an LSSTCam detector (about 4k x 4k pixels of 0.2"), degrees.
DETECTOR_MARGIN_DEG = 0.16
#: Typical size of one compressed LSSTCam raw (one detector of one exposure), bytes.
RAW_BYTES = 32_000_000

#: DR1's visits, each of LSSTCam's science detectors, and tracts: the full-size synthetic survey.
DR1_VISITS = 240_000
LSSTCAM_DETECTORS = 189
DR1_TRACTS = 8_000
#: Largest multiple of DR1 one inventory holds (`~multisite.inventory.MAX_RAWS` raws).
MAX_SCALE = MAX_RAWS / (DR1_VISITS * LSSTCAM_DETECTORS)
#: Declination band of the full-size synthetic footprint.
_DR1_DEC_RANGE = (-70.0, 10.0)
#: Right ascension of the Galactic centre: the synthetic footprint's RA gap is centred there.
_GALACTIC_CENTRE_RA = 266.4
_SQDEG_PER_SR = (180.0 / math.pi) ** 2
#: Visits generated per block, which bounds the generator's temporary memory.
_VISITS_PER_BLOCK = 4_000


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
    n_tracts: int = DR1_TRACTS,
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
        scale = math.sqrt(n_tracts / DR1_TRACTS)
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


def focal_plane(n_detectors: int = LSSTCAM_DETECTORS) -> tuple[np.ndarray, np.ndarray]:
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
    n_visits: int = DR1_VISITS,
    n_detectors: int = LSSTCAM_DETECTORS,
    n_tracts: int = DR1_TRACTS,
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
    if n_raws > MAX_RAWS:
        raise InventoryError(
            f"{n_visits} visits x {n_detectors} detectors = {n_raws:,} raws, more than an inventory holds "
            f"({MAX_RAWS:,}); generate fewer visits"
        )
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
    encoder = TractSetEncoder(tracts.n_tracts)
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


def scaled_dr1_inventory(scale: float, seed: int = 20260101) -> tuple[Inventory, RingTracts]:
    """Generate a synthetic inventory of ``scale`` times DR1's visits and tracts (`make_dr1_inventory`).

    Parameters
    ----------
    scale : `float`
        Multiple of DR1's size: 1 for DR1, 0.01 for a hundredth of it (at
        least one visit and four tracts).
    seed : `int`
        Random seed.

    Returns
    -------
    inventory : `~multisite.inventory.Inventory`
        The raws of LSSTCam's detectors.
    tracts : `RingTracts`
        Their tract geometry.

    Raises
    ------
    InventoryError
        Raised when ``scale`` is not a number above 0 and at most `MAX_SCALE`.
    """
    if not 0 < scale <= MAX_SCALE:  # NaN fails both comparisons
        raise InventoryError(
            f"scale {scale!r}: give a number above 0 and at most {MAX_SCALE:.1f} (1 for DR1's size, "
            "0.01 for a hundredth of it)"
        )
    return make_dr1_inventory(
        n_visits=max(1, round(DR1_VISITS * scale)), n_tracts=max(4, round(DR1_TRACTS * scale)), seed=seed
    )
