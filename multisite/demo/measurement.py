"""Star detection, aperture photometry and position matching on `SkyImage`."""

from __future__ import annotations

__all__ = ("measure_stars", "match_positions", "solve_zeropoints", "ZERO_POINT")

import numpy as np
from astropy.table import Table

from .images import SkyImage

ZERO_POINT = 27.0
"""Nominal magnitude of one count per exposure, for every visit."""


def measure_stars(image: SkyImage, threshold: float = 5.0, radius: int = 3) -> Table:
    """Detect point sources and measure their aperture fluxes.

    Parameters
    ----------
    image : `SkyImage`
        Background-subtracted image with a variance plane.
    threshold : `float`
        Detection threshold in units of the pixel noise.
    radius : `int`
        Half-size of the square aperture, in pixels.

    Returns
    -------
    stars : `astropy.table.Table`
        Columns ``ra``, ``dec`` (degrees), ``x``, ``y`` (pixels), ``inst_flux`` and
        ``inst_flux_err`` (counts), sorted by position.
    """
    pixels = image.pixels
    variance = image.variance if image.variance is not None else np.full_like(pixels, np.var(pixels))
    sigma = np.sqrt(variance)
    ny, nx = pixels.shape
    # A pixel is a peak when it is above threshold and the largest of its 3x3 neighbours.
    padded = np.pad(pixels, 1, constant_values=-np.inf)
    neighbours = np.stack(
        [padded[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    )
    peaks = (pixels >= neighbours.max(axis=0)) & (pixels > threshold * sigma)
    ys, xs = np.nonzero(peaks)
    inside = (xs >= radius) & (xs < nx - radius) & (ys >= radius) & (ys < ny - radius)
    xs, ys = xs[inside], ys[inside]
    offsets = np.arange(-radius, radius + 1)
    box_y = ys[:, None, None] + offsets[None, :, None]
    box_x = xs[:, None, None] + offsets[None, None, :]
    cutouts = pixels[box_y, box_x]
    flux = cutouts.sum(axis=(1, 2))
    flux_err = np.sqrt(variance[box_y, box_x].sum(axis=(1, 2)))
    weights = np.clip(cutouts, 0, None)
    total = weights.sum(axis=(1, 2))
    good = (flux > 0) & (total > 0)
    xc = xs[good] + (weights[good] * offsets[None, None, :]).sum(axis=(1, 2)) / total[good]
    yc = ys[good] + (weights[good] * offsets[None, :, None]).sum(axis=(1, 2)) / total[good]
    ra, dec = image.pixel_to_sky(xc, yc)
    stars = Table(
        {"ra": ra, "dec": dec, "x": xc, "y": yc, "inst_flux": flux[good], "inst_flux_err": flux_err[good]}
    )
    stars.sort(["ra", "dec"])
    return stars


def match_positions(ra: np.ndarray, dec: np.ndarray, radius: float) -> np.ndarray:
    """Group positions that lie within ``radius`` of each other.

    Parameters
    ----------
    ra, dec : `numpy.ndarray`
        Positions in degrees (a small field: a flat approximation is used).
    radius : `float`
        Match radius in degrees.

    Returns
    -------
    group : `numpy.ndarray`
        Group index for each position; positions of one source share an index.
    """
    order = np.lexsort((dec, ra))
    group = np.full(len(ra), -1, dtype=np.int64)
    centres: list[tuple[float, float]] = []
    for i in order:
        if centres:
            c = np.asarray(centres)
            distance = np.hypot((c[:, 0] - ra[i]) * np.cos(np.radians(dec[i])), c[:, 1] - dec[i])
            nearest = int(np.argmin(distance))
            if distance[nearest] < radius:
                group[i] = nearest
                continue
        group[i] = len(centres)
        centres.append((ra[i], dec[i]))
    return group


def solve_zeropoints(
    visit: np.ndarray, star: np.ndarray, mag: np.ndarray, mag_err: np.ndarray, n_iter: int = 50
) -> dict[int, tuple[float, int]]:
    """Solve per-visit magnitude offsets from repeated measurements of stars.

    Models ``mag = m_star + delta_visit`` with the mean ``delta`` fixed to zero, by
    alternating weighted means (the linear least-squares solution).

    Parameters
    ----------
    visit, star : `numpy.ndarray`
        Visit id and star group of each measurement.
    mag, mag_err : `numpy.ndarray`
        Instrumental magnitude and its error.
    n_iter : `int`
        Number of alternating iterations.

    Returns
    -------
    offsets : `dict` [`int`, `tuple` [`float`, `int`]]
        Visit id to (magnitude offset, number of stars used).
    """
    # Only stars seen in at least two visits constrain the offsets.
    n_visits_per_star = np.bincount(star, minlength=star.max() + 1 if len(star) else 0)
    keep = n_visits_per_star[star] >= 2
    visit, star, mag, weight = visit[keep], star[keep], mag[keep], 1.0 / mag_err[keep] ** 2
    visits, visit_index = np.unique(visit, return_inverse=True)
    stars, star_index = np.unique(star, return_inverse=True)
    delta = np.zeros(len(visits))
    for _ in range(n_iter):
        star_mag = np.bincount(star_index, weight * (mag - delta[visit_index])) / np.bincount(
            star_index, weight
        )
        delta = np.bincount(visit_index, weight * (mag - star_mag[star_index])) / np.bincount(
            visit_index, weight
        )
        delta -= delta.mean()
    counts = np.bincount(visit_index, minlength=len(visits))
    return {int(v): (float(d), int(n)) for v, d, n in zip(visits, delta, counts, strict=True)}
