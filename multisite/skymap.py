"""The placement as a sky map: where each unit is, and an SVG of the units coloured by site.

A unit's position is the mean direction of its cells' centres (tracts, or
patches). Positions come from one of two sources (`unit_positions`):

- a tract geometry the caller holds (`multisite.geometry.TractGeometry`: the
  planner's `~multisite.source_inventory.skymap_tracts` or
  `~multisite.geometry.tracts_from_raws`, or the synthetic DR1's tracts); a
  patch unit then gets its tract's centre;
- otherwise the skymap registered in the repository this instance reads: the
  central one when one instance runs every site (or this is the central
  instance), else the instance's own site's, which holds the tract and patch
  records of that site's units (they come with its raws). The centres are
  those of the records' regions, so the demo's patches are placed exactly.

Units without a position are left out (the report counts them); when no unit
has one, `PositionsUnavailable` says why, and the report says it instead of
drawing a map.

The map (`placement_figure`, drawn with Rubin's `skyproj` on matplotlib) is a
McBryde-Thomas flat-polar quartic projection (equal-area: a site's share of the
map is its share of the sky) centred on the footprint, right ascension
increasing to the left as on the sky, zoomed to the units. Each unit is one
cell the size of the units' spacing, so neighbouring tracts tile the
footprint. `placement_svg` embeds it in the report as SVG: text and grid as
vector, the cells as vector paths for a few hundred units, else as one
rasterized image, which keeps DR1's 8,000 tracts near 52 kB (as paths they
would take 1.4 MB).
"""

from __future__ import annotations

__all__ = (
    "SITE_PALETTE",
    "PositionsUnavailable",
    "placement_figure",
    "placement_svg",
    "positions_from_tracts",
    "site_colours",
    "unit_positions",
)

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .config import Campaign
from .figures import figure_svg
from .geometry import TractGeometry, nearest_spacing, unit_vectors

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_LOG = logging.getLogger(__name__)

SITE_PALETTE = ("#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f")
"""Colours of the sites, in the campaign's site order, in every chart of the report."""
_OTHER_SITE = "#9e9e9e"
#: Columns of a positions table.
_COLUMNS = ["unit", "ra", "dec", "site"]
#: A rasterized unit's cell is this much wider than the spacing: neighbours overlap, leaving no seams.
_MARK_OVERLAP = 0.1
#: Unit names are written on their cells up to this many units, when the cells are this big (px).
_MAX_LABELLED_UNITS, _MIN_LABELLED_PX = 60, 24
#: Figures are sized in CSS pixels (96 an inch), so ``width`` pixels of the report are ``width`` here.
_PX_PER_INCH = 96
#: Margins around the map, pixels: left (Dec labels), right (legend), top (RA labels), bottom (RA, caption).
_MARGINS = (70, 180, 30, 64)
#: The legend's top and the height of its rows, pixels.
_LEGEND_TOP, _LEGEND_ROW = 24, 20
#: Up to this many units the cells are vector paths (about 175 bytes each in SVG); above, one image.
_VECTOR_MAX_UNITS = 500


class PositionsUnavailable(RuntimeError):
    """No unit of the campaign has a position; the message says why and how to get them."""


def site_colours(sites: Sequence[str]) -> dict[str, str]:
    """Return each site's colour: `SITE_PALETTE` in the order given (the campaign's site order)."""
    return {site: SITE_PALETTE[index % len(SITE_PALETTE)] for index, site in enumerate(sites)}


def _units_table(campaign: Campaign) -> pd.DataFrame:
    """One row per cell of the campaign's units: ``unit, tract, patch, site`` (patch -1: whole tract)."""
    rows = [
        (unit.name, tract, -1 if patch is None else patch, unit.site)
        for unit in campaign.units
        for tract, patch in unit.cells
    ]
    return pd.DataFrame(rows, columns=["unit", "tract", "patch", "site"])


def _mean_positions(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean direction per unit of cells with columns ``unit, site, ra, dec``, in first-seen unit order."""
    cells = cells[np.isfinite(cells["ra"]) & np.isfinite(cells["dec"])]
    if cells.empty:
        return pd.DataFrame(columns=_COLUMNS)
    vectors = pd.DataFrame(
        unit_vectors(cells["ra"].to_numpy(float), cells["dec"].to_numpy(float)),
        columns=["x", "y", "z"],
        index=cells.index,
    )
    sums = vectors.groupby(cells["unit"], sort=False).sum()
    x, y, z = sums["x"].to_numpy(), sums["y"].to_numpy(), sums["z"].to_numpy()
    site = cells.groupby("unit", sort=False)["site"].first()
    return pd.DataFrame(
        {
            "unit": sums.index.to_numpy(),
            "ra": np.degrees(np.arctan2(y, x)) % 360.0,
            "dec": np.degrees(np.arctan2(z, np.hypot(x, y))),
            "site": site.loc[sums.index].to_numpy(),
        }
    )


def positions_from_tracts(units: pd.DataFrame, tracts: TractGeometry) -> pd.DataFrame:
    """Place units at the mean direction of their tracts' centres.

    Parameters
    ----------
    units : `pandas.DataFrame`
        A units table: one row per cell, columns ``unit``, ``tract`` and ``site``
        (``patch`` is ignored: a patch unit gets its tract's centre), e.g. the
        planner's `~multisite.planner.Plan.campaign_units`.
    tracts : `~multisite.geometry.TractGeometry`
        Centres of the tracts, indexed by tract id.

    Returns
    -------
    positions : `pandas.DataFrame`
        ``unit, ra, dec, site`` (degrees), one row per unit with a tract the
        geometry holds, in the table's unit order.
    """
    tract = units["tract"].to_numpy(np.int64)
    known = (tract >= 0) & (tract < tracts.n_tracts)
    ra = np.full(len(units), np.nan)
    dec = np.full(len(units), np.nan)
    ra[known] = np.asarray(tracts.ra, dtype=float)[tract[known]]
    dec[known] = np.asarray(tracts.dec, dtype=float)[tract[known]]
    cells = pd.DataFrame({"unit": units["unit"].astype(str).to_numpy(), "site": units["site"].to_numpy()})
    cells["ra"], cells["dec"] = ra, dec
    positions = _mean_positions(cells)
    positions.attrs["source"] = "the tract centres of the planner's geometry"
    return positions


def _positions_repo(campaign: Campaign) -> str:
    """Return the repository whose skymap this instance reads: the central one, or its own site's."""
    if campaign.instance is None or campaign.instance == campaign.central.name:
        return campaign.central.repo
    return campaign.sites[campaign.instance].repo


def _region_centre(region) -> tuple[float, float]:
    """Centre (ra, dec) of an `lsst.sphgeom` region, degrees: a polygon's centroid, else its box's centre."""
    from lsst.sphgeom import LonLat

    if hasattr(region, "getCentroid"):
        centre = LonLat(region.getCentroid())
    else:
        centre = region.getBoundingBox().getCenter()
    return centre.getLon().asDegrees() % 360.0, centre.getLat().asDegrees()


def _positions_from_butler(campaign: Campaign, cells: pd.DataFrame) -> pd.DataFrame:
    """Place units at the mean centre of their cells' regions in the skymap registered in the repository."""
    from .butler_utils import open_butler

    repo = _positions_repo(campaign)
    if "://" not in repo and not (Path(repo) / "butler.yaml").exists():
        raise PositionsUnavailable(
            f"no Butler repository at {repo} yet, whose skymap {campaign.skymap!r} would place the units "
            "(it is created by the campaign's first steps)"
        )
    try:
        butler = open_butler(repo)
        skymap = {"skymap": campaign.skymap}
        tract_centres = {
            record.id: _region_centre(record.region)
            for record in butler.query_dimension_records("tract", data_id=skymap, limit=None, explain=False)
        }
        patch_centres = {}
        # Patches only of the tracts that have patch units (a campaign of whole tracts reads none).
        for tract in sorted(set(cells.loc[cells["patch"] >= 0, "tract"])):
            for record in butler.query_dimension_records(
                "patch", data_id=skymap | {"tract": int(tract)}, limit=None, explain=False
            ):
                patch_centres[(int(tract), record.id)] = _region_centre(record.region)
    except Exception as err:  # noqa: BLE001 - a report must say why, whatever the Butler raised
        raise PositionsUnavailable(
            f"the skymap {campaign.skymap!r} could not be read from {repo}: {type(err).__name__}: {err}"
        ) from err
    if not tract_centres:
        raise PositionsUnavailable(
            f"the skymap {campaign.skymap!r} has no tract records in {repo} "
            "(they are registered with the survey's raws)"
        )
    nan = (math.nan, math.nan)
    centres = [
        tract_centres.get(t, nan) if p < 0 else patch_centres.get((t, p), nan)
        for t, p in zip(cells["tract"], cells["patch"], strict=True)
    ]
    located = cells.assign(ra=[c[0] for c in centres], dec=[c[1] for c in centres])
    positions = _mean_positions(located)
    what = "tract and patch" if patch_centres else "tract"
    positions.attrs["source"] = f"the {what} centres of skymap {campaign.skymap!r} in {repo}"
    return positions


def unit_positions(campaign: Campaign, tracts: TractGeometry | None = None) -> pd.DataFrame:
    """Return where each unit of the campaign is, and its site.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    tracts : `~multisite.geometry.TractGeometry`, optional
        Tract centres to use (the planner's geometry). Without it, the skymap
        registered in the repository this instance reads: the central one for
        the central instance and a single instance, else the instance's own
        site's, which holds the records of that site's units only.

    Returns
    -------
    positions : `pandas.DataFrame`
        ``unit, ra, dec, site`` (degrees, the mean direction of the unit's
        cells' centres), one row per unit with a position, in the campaign's
        unit order; ``positions.attrs["source"]`` says where they come from.

    Raises
    ------
    PositionsUnavailable
        Raised when no unit has a position, saying why (no repository yet, no
        skymap records, a Butler error).
    """
    cells = _units_table(campaign)
    if tracts is not None:
        positions = positions_from_tracts(cells, tracts)
        where = "the tract geometry given"
    else:
        positions = _positions_from_butler(campaign, cells)
        where = _positions_repo(campaign)
    if positions.empty:
        raise PositionsUnavailable(
            f"none of the {len(campaign.units)} units' cells is in {where} "
            f"(skymap {campaign.skymap!r}); check the units table's tract and patch ids"
        )
    return positions


# ---------------------------------------------------------------------------------------------- drawing


def _ra_centre(ra: np.ndarray) -> float:
    """Right ascension at the middle of the footprint: half-way round from the widest gap between units."""
    ordered = np.sort(np.asarray(ra, dtype=float) % 360.0)
    gaps = np.diff(np.append(ordered, ordered[0] + 360.0))
    widest = int(np.argmax(gaps))
    start = ordered[(widest + 1) % len(ordered)]
    return float((start + 0.5 * (360.0 - gaps[widest])) % 360.0)


def _spacing(ra: np.ndarray, dec: np.ndarray) -> float:
    """Median distance from a unit to its nearest neighbour, degrees (1 for a single unit)."""
    spacing = nearest_spacing(ra, dec) if len(ra) >= 2 else 0.0
    return spacing if spacing > 0 else 1.0


def _cell_corners(
    ra: np.ndarray, dec: np.ndarray, ra_centre: float, spacing: float, overlap: float
) -> tuple[np.ndarray, np.ndarray]:
    """Corners ``(n, 4)`` (RA, Dec; degrees) of each unit's cell: a square of the spacing on the sky.

    The cell spans the spacing along the meridian and along the parallel, plus
    ``overlap`` of it. Its RA is kept within 180 degrees of the map's centre: a
    unit at the map's edge keeps a cell of its size instead of wrapping round
    to the other edge.
    """
    half = 0.5 * spacing * (1.0 + overlap)
    half_ra = np.minimum(half / np.maximum(np.cos(np.radians(dec)), 1e-3), 179.0)
    lon = (np.asarray(ra, dtype=float) - ra_centre + 180.0) % 360.0 - 180.0
    edge = 180.0 - 1e-6
    east, west = np.minimum(lon + half_ra, edge), np.maximum(lon - half_ra, -edge)
    corner_lon = np.stack([west, east, east, west], axis=1) + ra_centre
    south, north = np.maximum(dec - half, -90.0), np.minimum(dec + half, 90.0)
    corner_lat = np.stack([south, south, north, north], axis=1)
    return corner_lon, corner_lat


def placement_figure(
    positions: pd.DataFrame, sites: Sequence[str], *, width: int = 760, max_height: int = 460
) -> Figure:
    """Draw the placement as a sky map with `skyproj`: one cell per unit, coloured by its site.

    Parameters
    ----------
    positions : `pandas.DataFrame`
        ``unit, ra, dec, site`` (degrees), as `unit_positions` returns;
        rows without a finite position are left out.
    sites : `~collections.abc.Sequence` [`str`]
        The campaign's sites, in order: their colours (`site_colours`) and
        legend order. A unit of another site is grey.
    width, max_height : `int`
        Size of the figure, CSS pixels (its height follows the footprint's shape).

    Returns
    -------
    figure : `matplotlib.figure.Figure`
        A McBryde-Thomas flat-polar quartic map (equal-area: a site's share of
        the map is its share of the sky) centred on the footprint, RA
        increasing to the left, zoomed to the units, with skyproj's RA/Dec
        grid. Each site with units is one `~matplotlib.collections.PolyCollection`
        (gid ``units-<site>``, in ``positions``' order) of one cell per unit,
        sized to the units' spacing so that neighbouring tracts tile the
        footprint; rasterized above `_VECTOR_MAX_UNITS` units. The legend
        gives each site's colour and unit count. The figure has an Agg canvas
        and no pyplot state: nothing to close.

    Raises
    ------
    ValueError
        Raised when no unit has a finite position.
    """
    # Imported here: matplotlib and skyproj take a second to import, which the CLI's other commands skip.
    import skyproj
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    positions = positions[np.isfinite(positions["ra"]) & np.isfinite(positions["dec"])]
    if positions.empty:
        raise ValueError("no unit has a position")
    ra = positions["ra"].to_numpy(float)
    dec = positions["dec"].to_numpy(float)
    ra_centre = _ra_centre(ra)
    spacing = _spacing(ra, dec)
    # Thousands of cells as paths cost about 175 bytes each in SVG: above a few hundred, one image.
    rasterized = len(positions) > _VECTOR_MAX_UNITS
    # Rasterized cells overlap a little, leaving no seams; vector ones touch and get a white edge.
    corner_lon, corner_lat = _cell_corners(ra, dec, ra_centre, spacing, _MARK_OVERLAP if rasterized else 0.0)

    # A Figure, not pyplot: no global figure registry to leak into, and an explicit non-interactive canvas.
    figure = Figure(figsize=(width / _PX_PER_INCH, max_height / _PX_PER_INCH), dpi=_PX_PER_INCH)
    FigureCanvasAgg(figure)
    sky = skyproj.McBrydeSkyproj(ax=figure.add_subplot(), lon_0=ra_centre)
    sky.set_extent(sky.compute_extent(corner_lon.ravel(), corner_lat.ravel()))
    x, y = sky.proj(corner_lon.ravel(), corner_lat.ravel())
    cells = np.stack([x.reshape(-1, 4), y.reshape(-1, 4)], axis=-1)

    colours = site_colours(sites)
    site_names = positions["site"].astype(str).to_numpy()
    legend = [*sites, *sorted(set(site_names) - set(sites))]

    # Fit the figure's height to the footprint (skyproj's axes keep an equal aspect), leaving the
    # right margin to the legend, like the report's other charts.
    left, right, top, bottom = _MARGINS
    (x0, x1), (y0, y1) = sky.ax.get_xlim(), sky.ax.get_ylim()
    aspect = abs(y1 - y0) / abs(x1 - x0)
    plot_width = width - left - right
    plot_height = min(plot_width * aspect, max_height - top - bottom)
    plot_width = min(plot_width, plot_height / aspect)
    height = max(plot_height + top + bottom, _LEGEND_TOP + _LEGEND_ROW * (len(legend) + 2))
    figure.set_size_inches(width / _PX_PER_INCH, height / _PX_PER_INCH)
    sky.ax.set_position([left / width, bottom / height, plot_width / width, plot_height / height])
    sky.ax.set_xlabel("Right Ascension", fontsize=10)
    sky.ax.set_ylabel("Declination", fontsize=10)
    for axis in ("x", "y"):  # one at a time: skyproj's tick_params(axis="both") sizes only the x labels
        sky.ax.tick_params(axis=axis, labelsize=8)

    for site in legend:
        mine = np.flatnonzero(site_names == site)
        if not len(mine):
            continue
        collection = PolyCollection(
            cells[mine],
            facecolors=colours.get(site, _OTHER_SITE),
            # A few cells get a white edge to tell them apart; thousands would only grey the map.
            edgecolors="none" if rasterized else "white",
            linewidths=0.5,
            antialiased=not rasterized,  # anti-aliased edges of touching cells show as seams
            rasterized=rasterized,
            gid=f"units-{site}",
            label=site,
        )
        # Cells are already projected: skyproj's lonlat transform would also apply to them (and wrap them).
        sky.ax.add_collection(collection, lonlat=False, transform=sky.ax.transData, autolim=False)

    # Few, big cells: each carries its unit's name.
    cell_px = np.ptp(sky.ax.transData.transform(cells.reshape(-1, 2)).reshape(-1, 4, 2), axis=1)
    if len(positions) <= _MAX_LABELLED_UNITS and cell_px.min() >= _MIN_LABELLED_PX:
        for unit, unit_ra, unit_dec in zip(positions["unit"].astype(str), ra, dec, strict=True):
            sky.ax.text(unit_ra, unit_dec, unit, ha="center", va="center", fontsize=8, color="white")

    handles = [
        Patch(facecolor=colours.get(site, _OTHER_SITE), label=f"{site}: {int((site_names == site).sum()):,}")
        for site in legend
    ]
    figure.legend(
        handles=handles,
        title="units per site",
        loc="upper left",
        bbox_to_anchor=((left + plot_width + 16) / width, 1 - _LEGEND_TOP / height),  # beside the map
        frameon=False,
        fontsize=9,
        title_fontsize=9,
        alignment="left",
    )
    figure.text(
        4 / width,
        4 / height,
        f"Equal-area McBryde-Thomas projection centred on RA {ra_centre:.1f}\N{DEGREE SIGN}, "
        f"RA increasing to the left; one cell per unit, {spacing:.2g}\N{DEGREE SIGN} wide",
        fontsize=7.5,
        color="#555",
    )
    return figure


def placement_svg(
    positions: pd.DataFrame, sites: Sequence[str], *, width: int = 760, max_height: int = 460
) -> str:
    """Draw the placement as a sky map (`placement_figure`) in an inline SVG.

    Parameters
    ----------
    positions : `pandas.DataFrame`
        ``unit, ra, dec, site`` (degrees), as `unit_positions` returns;
        rows without a finite position are left out.
    sites : `~collections.abc.Sequence` [`str`]
        The campaign's sites, in order: their colours and legend order.
    width, max_height : `int`
        Size of the SVG, CSS pixels (its height follows the footprint's shape).

    Returns
    -------
    svg : `str`
        An inline ``<svg id="placement-map">``: up to `_VECTOR_MAX_UNITS`
        units, each site's cells as paths (one a unit) in a group
        ``<g id="units-<site>">``; above, all cells in one embedded PNG
        (DR1's 8,000 tracts: about 52 kB in all); grid, labels and the
        legend's ``<site>: <count>`` as ``<text>``. Or a paragraph saying no
        unit has a position.
    """
    finite = np.isfinite(positions["ra"]) & np.isfinite(positions["dec"])
    if not finite.any():
        return "<p>No unit has a position.</p>"
    figure = placement_figure(positions, sites, width=width, max_height=max_height)
    return figure_svg(figure, "placement-map", f"placement of {int(finite.sum())} units by site")
