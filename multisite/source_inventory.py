"""The planner's inputs read from a source Butler: its raws and its skymap's tracts.

For campaigns small enough to query at once; larger ones export a visits table
(`multisite.inventory.read_visits_table`) in pieces, and may still take the tract
geometry from the Butler (`skymap_tracts`).
"""

from __future__ import annotations

__all__ = ("inventory_from_butler", "skymap_tracts")

import logging

import numpy as np
import pandas as pd
from lsst.daf.butler import Butler, ButlerUserError

from .errors import InventoryError
from .geometry import TractCentres
from .inventory import Inventory, inventory_from_frame

_LOG = logging.getLogger(__name__)


def skymap_tracts(butler: Butler, skymap: str) -> TractCentres:
    """Read a skymap's tracts from the Butler's dimension records.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The source repository.
    skymap : `str`
        Name of a skymap registered there.

    Returns
    -------
    tracts : `multisite.geometry.TractCentres`
        The centres of the tracts' regions, and their rings: tracts whose
        centres share a declination (as in a ring skymap).

    Raises
    ------
    InventoryError
        Raised when the skymap is unknown or has no tracts, or their ids are not ``0 .. N-1``.
    """
    try:
        records = butler.query_dimension_records(
            "tract", data_id={"skymap": skymap}, limit=None, explain=False
        )
    except ButlerUserError as err:
        raise InventoryError(f"skymap {skymap!r}: {err}; give a skymap registered in the Butler") from None
    if not records:
        raise InventoryError(f"skymap {skymap!r}: no tract records; register the skymap in the source Butler")
    ids = np.array([r.id for r in records])
    if sorted(ids) != list(range(len(ids))):
        raise InventoryError(f"skymap {skymap!r}: tract ids are not 0..{len(ids) - 1}; cannot index them")
    centres = [r.region.getBoundingBox().getCenter() for r in records]
    ra = np.empty(len(ids))
    dec = np.empty(len(ids))
    ra[ids] = [c.getLon().asDegrees() for c in centres]
    dec[ids] = [c.getLat().asDegrees() for c in centres]
    # Ring skymaps give every tract of a ring the same centre declination.
    _, ring = np.unique(np.round(dec, 6), return_inverse=True)
    return TractCentres(ra, dec, ring.astype(np.int64))


def inventory_from_butler(butler: Butler, raw_collection: str, instrument: str, skymap: str) -> Inventory:
    """Read every raw of a collection with the tracts it overlaps, its detector centre and its size.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The source repository.
    raw_collection : `str`
        Collection of the raws.
    instrument, skymap : `str`
        Instrument and skymap names.

    Returns
    -------
    inventory : `multisite.inventory.Inventory`
        The raws, one per (exposure, detector), with their overlapping tracts.

    Raises
    ------
    InventoryError
        Raised when the Butler refuses the names, or no raw overlaps a tract.
    """
    try:
        with butler.query() as query:
            query = query.join_dataset_search("raw", [raw_collection]).where(
                instrument=instrument, skymap=skymap
            )
            rows = [
                (d["exposure"], d["visit"], d["detector"], d["tract"])
                for d in query.data_ids(["exposure", "visit", "detector", "tract"])
            ]
    except ButlerUserError as err:
        raise InventoryError(
            f"raws of {raw_collection!r} ({instrument}, skymap {skymap!r}): {err}; check the names"
        ) from None
    if not rows:
        raise InventoryError(f"no raws in {raw_collection!r} overlap a tract of {skymap!r}; check the names")
    table = pd.DataFrame(rows, columns=["exposure", "visit", "detector", "tract"])
    regions = {
        (r.visit, r.detector): r.region.getBoundingBox().getCenter()
        for r in butler.query_dimension_records(
            "visit_detector_region", data_id={"instrument": instrument}, limit=None, explain=False
        )
    }
    refs = butler.query_datasets("raw", collections=raw_collection, limit=None, explain=False)
    uris = butler.get_many_uris(refs)
    size = {(ref.dataId["exposure"], ref.dataId["detector"]): uris[ref].primaryURI.size() for ref in refs}
    centre = [regions[(v, d)] for v, d in zip(table["visit"], table["detector"], strict=True)]
    table["ra"] = [c.getLon().asDegrees() for c in centre]
    table["dec"] = [c.getLat().asDegrees() for c in centre]
    table["bytes"] = [size[(e, d)] for e, d in zip(table["exposure"], table["detector"], strict=True)]
    _LOG.info("%d raws, %d (raw, tract) overlaps from %s.", len(size), len(table), raw_collection)
    return inventory_from_frame(table.drop(columns="exposure"), f"raws of {raw_collection}")
