"""Matplotlib figures as inline SVG for the campaign report (the sky map, the forecast's timeline)."""

from __future__ import annotations

__all__ = ("figure_svg",)

import html
import io
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Resolution of rasterized artists, dots per inch: twice CSS pixels, sharp on high-density screens.
_RASTER_DPI = 192
#: Geometry attributes of an SVG, and numbers in them with more than one decimal.
_GEOMETRY = re.compile(r'\b(?:d|x|y|width|height|transform)="[^"]*"')
_DECIMALS = re.compile(r"-?\d+\.\d{2,}")


def figure_svg(figure: Figure, svg_id: str, label: str, *, raster_dpi: float = _RASTER_DPI) -> str:
    """Return a figure as an inline ``<svg>`` element for the report.

    Parameters
    ----------
    figure : `matplotlib.figure.Figure`
        The figure.
    svg_id : `str`
        ``id`` of the ``<svg>`` element; also salts matplotlib's ids inside it,
        so that two figures in one page never share a clip path.
    label : `str`
        Its ``aria-label``.
    raster_dpi : `float`
        Resolution of the figure's rasterized artists (its text and lines stay vector).

    Returns
    -------
    svg : `str`
        The ``<svg>`` element, without the XML declaration, doctype and
        metadata of a standalone file; text as ``<text>`` (the browser's
        fonts), not glyph paths.
    """
    import matplotlib

    buffer = io.StringIO()
    # Text as <text> elements (a tenth of the size of glyph paths, and searchable in the page) with a
    # short font list; the salt makes matplotlib's ids (clip paths...) unique to this figure.
    rc = {"svg.fonttype": "none", "svg.hashsalt": svg_id, "font.sans-serif": ["DejaVu Sans", "Arial"]}
    with matplotlib.rc_context(rc):
        figure.savefig(buffer, format="svg", dpi=raster_dpi, metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)
    # Coordinates to a tenth of a point (matplotlib writes six decimals): a third off the grid's curves.
    # Only in geometry attributes: text (tick labels) and image data are left as they are.
    svg = _GEOMETRY.sub(
        lambda attribute: _DECIMALS.sub(lambda number: f"{float(number.group()):.1f}", attribute.group()), svg
    )
    return svg.replace(
        "<svg ", f'<svg id="{html.escape(svg_id)}" role="img" aria-label="{html.escape(label)}" ', 1
    )
