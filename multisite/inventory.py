"""Source inventory at data-release scale: detector-level raws and the tracts they overlap.

The planner (`multisite.planner`) works from an `Inventory`: one row per raw, i.e.
per (visit, detector), with the detector centre, the raw's size in bytes and the
set of tracts the raw overlaps. At DR1 size (240,000 visits x 189 detectors = 45
million raws) the inventory is held as compact numpy columns (``int32``,
``int16``, ``float32``), about 22 bytes per raw, and the tracts each raw overlaps
are dictionary-encoded: a raw overlaps one to four tracts and the distinct *tract
sets* (one tract, two neighbours, a corner of four...) number only five or six per tract,
so each raw stores one ``int32`` code into a small table of tract sets.

Inventories come from a source Butler (`multisite.source_inventory`), from a
visits table (`read_visits_table`: Parquet, CSV or TSV, one row per raw and tract
it overlaps, as a Butler query of ``visit, detector, tract`` returns; for
campaigns too large to query at once) or, for previews, benchmarks and tests,
from the synthetic survey of `multisite.demo.synthetic`. Where the tracts are on
the sky is the tract geometry's business (`multisite.geometry`).
"""

from __future__ import annotations

__all__ = (
    "MAX_RAWS",
    "MAX_TRACT_ID",
    "Inventory",
    "TractSetEncoder",
    "encode_tract_sets",
    "inventory_from_frame",
    "read_visits_table",
)

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InventoryError

_LOG = logging.getLogger(__name__)

#: Most raws one inventory holds: raws are indexed with ``int32``.
MAX_RAWS = 2**31 - 1
#: Largest tract id a visits table may give: ids index arrays, and skymaps have tens of thousands of tracts.
MAX_TRACT_ID = 999_999


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
    encoder = TractSetEncoder(n_tracts)
    codes = encoder.add(np.asarray(matrix))
    remap, sets = encoder.finish()
    return remap[codes].astype(np.int32), sets


class TractSetEncoder:
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


#: Columns of a visits table: one row per (raw, tract it overlaps).
_REQUIRED = ("visit", "detector", "ra", "dec", "bytes", "tract")
#: Optional columns: the visit's boresight.
_OPTIONAL = ("visit_ra", "visit_dec")
#: Columns holding integers.
_INTEGER = ("visit", "detector", "bytes", "tract")
#: Allowed range of each column's values, and what the values are.
_RANGES = {
    "detector": (0, np.iinfo(np.int16).max, "detector ids"),
    "dec": (-90.0, 90.0, "declinations (degrees)"),
    "visit_dec": (-90.0, 90.0, "declinations (degrees)"),
    "bytes": (0, np.inf, "file sizes (bytes)"),
    "tract": (-1, MAX_TRACT_ID, "tract ids (-1 or empty for a raw outside every tract)"),
}


def read_visits_table(path: str | Path) -> Inventory:
    """Read a campaign's raws from a visits table (Parquet, CSV or TSV).

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        The table: ``.parquet``/``.pq``, ``.tsv``/``.tsv.gz`` (tab-separated) or
        CSV, with the columns `inventory_from_frame` reads.

    Returns
    -------
    inventory : `Inventory`
        The raws, ordered by visit and detector.

    Raises
    ------
    InventoryError
        Raised when the file is missing or unreadable, or its table cannot be
        used (see `inventory_from_frame`).
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
    return inventory_from_frame(table, where)


def inventory_from_frame(table: pd.DataFrame, where: str = "visits table") -> Inventory:
    """Make an inventory from a table of raws and the tracts they overlap.

    Parameters
    ----------
    table : `pandas.DataFrame`
        Columns ``visit, detector, ra, dec, bytes, tract`` (detector centre in
        degrees, raw size in bytes), one row per (raw, tract it overlaps), as a
        Butler query of ``visit, detector, tract`` returns (``tract`` -1 or
        empty for a raw outside every tract); optionally ``visit_ra,
        visit_dec`` (the boresight; else the mean of the visit's detector
        centres).
    where : `str`
        What the table is, for messages.

    Returns
    -------
    inventory : `Inventory`
        The raws, ordered by visit and detector.

    Raises
    ------
    InventoryError
        Raised when a column is missing, not numeric, or has missing,
        fractional or out-of-range values, or the table has no rows.
    """
    table = _checked(table, where)
    table = table.sort_values(["visit", "detector", "tract"], kind="stable", ignore_index=True)
    visit = table["visit"].to_numpy(np.int64)
    detector = table["detector"].to_numpy(np.int64)
    new_raw = np.ones(len(table), dtype=bool)
    new_raw[1:] = (visit[1:] != visit[:-1]) | (detector[1:] != detector[:-1])
    starts = np.flatnonzero(new_raw)
    raws = table.iloc[starts]
    tract = table["tract"].to_numpy(np.int64)
    n_tracts = int(tract.max()) + 1
    raw_of_row = np.cumsum(new_raw) - 1
    position = np.arange(len(table)) - starts[raw_of_row]
    matrix = np.full((len(starts), int(position.max()) + 1), -1, dtype=np.int64)
    matrix[raw_of_row, position] = tract
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


def _checked(table: pd.DataFrame, where: str) -> pd.DataFrame:
    """Return the table's columns the inventory reads, as numbers, once each is checked."""
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise InventoryError(
            f"{where}: missing column(s) {missing}; the table needs {list(_REQUIRED)}, one row per raw and "
            "tract it overlaps, as a Butler query of visit, detector, tract returns (tract -1 or empty for "
            f"a raw outside every tract; optional: {', '.join(_OPTIONAL)})"
        )
    if table.empty:
        raise InventoryError(f"{where}: no rows; export one row per raw and tract it overlaps")
    columns = [*_REQUIRED, *(c for c in _OPTIONAL if set(_OPTIONAL) <= set(table.columns))]
    checked = {}
    for column in columns:
        values = table[column]
        numbers = pd.to_numeric(values, errors="coerce")
        text = numbers.isna() & values.notna()
        if pd.api.types.is_bool_dtype(values) or text.any():
            example = values[text].iloc[0] if text.any() else values.iloc[0]
            raise InventoryError(
                f"{where}: column {column!r} is not numeric (e.g. {example!r}); give numbers"
            )
        if column == "tract":
            numbers = numbers.fillna(-1)
        elif numbers.isna().any():
            raise InventoryError(f"{where}: column {column!r} has empty values; every raw needs {column}")
        as_float = numbers.to_numpy(np.float64)
        if not np.isfinite(as_float).all():
            raise InventoryError(f"{where}: column {column!r} has infinite values; give finite numbers")
        fractional = as_float != np.round(as_float)
        if column in _INTEGER and fractional.any():
            raise InventoryError(
                f"{where}: column {column!r} has fractional values (e.g. {as_float[fractional][0]:g}); "
                "give integers"
            )
        if column in _RANGES:
            low, high, what = _RANGES[column]
            outside = (as_float < low) | (as_float > high)
            if outside.any():
                raise InventoryError(
                    f"{where}: column {column!r} has values outside [{low:g}, {high:g}] "
                    f"(e.g. {as_float[outside][0]:g}); give {what}"
                )
        checked[column] = numbers.to_numpy(np.int64) if column in _INTEGER else as_float
    return pd.DataFrame(checked)
