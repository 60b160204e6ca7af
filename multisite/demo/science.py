"""The demo's science checks: what the campaign recovered against the truth the survey injected.

`multisite.qa` runs them, through its one hook for checks against a campaign's
truth collection (``collections.truth``), and adds their rows (check
``science``) to the QA table:

- zero points: the visits' recovered zero points against the injected ones
  (rms of the differences, limit ``qa.max_zeropoint_rms``);
- coadd photometry: per patch, the median magnitude offset of the catalogue's
  bright stars from their true magnitudes (limit ``qa.max_photometry_offset``).
"""

from __future__ import annotations

__all__ = ("BRIGHT_MAG", "MATCH_RADIUS_DEG", "science_checks")

import numpy as np
from lsst.daf.butler import Butler

from ..config import Campaign
from ..qa_table import QARow

#: Objects brighter than this (mag) are compared with the true stars.
BRIGHT_MAG = 19.5
#: Largest distance between an object and its true star, degrees (per coordinate difference, in quadrature).
MATCH_RADIUS_DEG = 0.0015
#: Default limits, when the config's ``qa`` section does not give them (mag).
_MAX_ZEROPOINT_RMS = 0.02
_MAX_PHOTOMETRY_OFFSET = 0.05


def science_checks(campaign: Campaign, butler: Butler, collections: list[str]) -> list[QARow]:
    """Check the demo's zero points and coadd photometry against the injected truth.

    Parameters
    ----------
    campaign : `multisite.config.Campaign`
        The campaign (its truth collection and ``qa`` limits).
    butler : `lsst.daf.butler.Butler`
        The central repository.
    collections : `list` [`str`]
        Collections holding the campaign's products at the central site.

    Returns
    -------
    rows : `list` [`multisite.qa_table.QARow`]
        One zero-point row, then one photometry row per object catalogue; none
        when the repository holds no demo truth.
    """
    if not butler.registry.queryDatasetTypes("demo_truth_zeropoints"):
        return []
    truth = butler.get(
        "demo_truth_zeropoints", instrument=campaign.instrument, collections=campaign.truth_collection
    )
    solved = {
        ref.dataId["visit"]: butler.get(ref)["delta_mag"]
        for ref in butler.query_datasets(
            "visit_zeropoint", collections=collections, limit=None, explain=False
        )
    }
    visits = sorted(solved)
    injected = np.array([truth[str(v)] for v in visits])
    recovered = np.array([solved[v] for v in visits])
    # The solution fixes the mean offset to zero; compare offsets relative to the mean.
    rms = float(np.std((recovered - recovered.mean()) - (injected - injected.mean())))
    limit = float(campaign.qa.get("max_zeropoint_rms", _MAX_ZEROPOINT_RMS))
    rows = [
        QARow(
            "science",
            "visit_zeropoint",
            f"{len(visits)} visits",
            "central",
            "pass" if rms <= limit else "fail",
            value=rms,
            detail=f"rms vs truth (mag), limit {limit}",
        )
    ]
    return rows + _photometry_checks(campaign, butler, collections, float(injected.mean()))


def _photometry_checks(
    campaign: Campaign, butler: Butler, collections: list[str], mean_offset: float
) -> list[QARow]:
    """Compare each object catalogue's bright stars with the true stars (one row per catalogue).

    Calibrated magnitudes carry the mean injected offset ``mean_offset`` (the
    zero-point solution fixes the mean to zero), which is taken off.
    """
    stars = butler.get(
        "demo_truth_stars", instrument=campaign.instrument, collections=campaign.truth_collection
    )
    limit = float(campaign.qa.get("max_photometry_offset", _MAX_PHOTOMETRY_OFFSET))
    rows = []
    for ref in butler.query_datasets("object_catalog", collections=collections, limit=None, explain=False):
        objects = butler.get(ref)
        bright = objects[objects["mag"] < BRIGHT_MAG]
        distance = np.hypot(
            np.asarray(bright["ra"])[:, None] - np.asarray(stars["ra"])[None, :],
            np.asarray(bright["dec"])[:, None] - np.asarray(stars["dec"])[None, :],
        )
        matched = distance.min(axis=1, initial=np.inf) < MATCH_RADIUS_DEG
        nearest = distance.argmin(axis=1) if len(bright) else np.array([], dtype=int)
        difference = np.asarray(bright["mag"])[matched] - np.asarray(stars["mag"])[nearest[matched]]
        offset = float(np.median(difference) - mean_offset) if matched.any() else float("inf")
        rows.append(
            QARow(
                "science",
                "object_catalog",
                str(ref.dataId.required),
                campaign.site_of_run(ref.run),
                "pass" if abs(offset) <= limit else "fail",
                value=offset,
                detail=f"coadd photometry: median offset vs truth of {int(matched.sum())} bright stars (mag)",
            )
        )
    return rows
