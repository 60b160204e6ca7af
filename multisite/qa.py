"""Campaign QA at the central site: completeness, site independence, demo science.

- *completeness*: every data ID the single-site reference produced for a dataset
  type that reaches the central site is there, from the site that should own it;
- *site independence*: each multi-site dataset equals the reference within ``rtol``;
- *science* (when truth is present): recovered zero points against the injected ones.
"""

from __future__ import annotations

__all__ = ("QAFailed", "compare_datasets", "run_qa")

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from astropy.table import Table
from lsst.daf.butler import FileIntegrityError

from .butler_utils import open_butler
from .config import Campaign
from .flow import handoffs, stage_chunks
from .markers import provenance, read_marker
from .pipeline import PipelineFlow

_LOG = logging.getLogger(__name__)


class QAFailed(RuntimeError):
    """A QA check failed; the message summarises which product and why."""


@dataclass
class QARow:
    """One line of the QA table."""

    check: str
    dataset_type: str
    data_id: str
    site: str
    status: str
    value: float | None = None
    detail: str = ""


def compare_datasets(a: Any, b: Any, rtol: float) -> float:
    """Largest relative difference between two datasets of the same kind.

    Supports objects with ``pixels`` (images), astropy tables (numeric columns),
    mappings of numbers and numpy arrays. Returns ``inf`` when shapes differ.
    """
    if hasattr(a, "pixels"):
        return compare_datasets(a.pixels, b.pixels, rtol)
    if isinstance(a, Table):
        if a.colnames != b.colnames or len(a) != len(b):
            return float("inf")
        return max(
            (compare_datasets(np.asarray(a[c]), np.asarray(b[c]), rtol) for c in a.colnames), default=0.0
        )
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max((compare_datasets(np.asarray(a[k]), np.asarray(b[k]), rtol) for k in a), default=0.0)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        return float("inf")
    finite = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = np.maximum(np.abs(a[finite]), np.abs(b[finite])).max() or 1.0
    return float(np.abs(a[finite] - b[finite]).max() / scale)


def _site_of_run(campaign: Campaign, run: str) -> str:
    prefix = campaign.root_collection + "/"
    return run[len(prefix) :].split("/", 1)[0] if run.startswith(prefix) else "central"


def _owner(campaign: Campaign, data_id) -> str | None:
    keys = data_id.dimensions.names
    if "patch" in keys:
        for unit in campaign.units:
            if unit.contains(data_id["tract"], data_id["patch"]):
                return unit.site
    return None


def run_qa(campaign: Campaign, table_path: str | Path) -> dict[str, Any]:
    """Run the QA checks and write their table.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    table_path : `str` or `pathlib.Path`
        CSV file for the QA table (one row per check and dataset).

    Returns
    -------
    marker : `dict`
        Summary for the QA marker.

    Raises
    ------
    QAFailed
        Raised after the table is written, when any check failed.
    """
    started = datetime.now(UTC)
    flow = PipelineFlow(campaign)
    rtol = float(campaign.qa.get("rtol", 1e-6))
    central = campaign.central
    campaign_collections = [
        *(campaign.stage_chain(central.name, s.name) for s in reversed(campaign.stages) if s.is_central),
        campaign.handoff_chain(central.name),
    ]
    at_central = sorted(
        {t for h in handoffs(campaign) if h.to_central for t in flow.handoff_types(h)}
        | {t for s in campaign.stages if s.is_central for t in flow.outputs(s.name)}
    )
    rows: list[QARow] = []
    butler = open_butler(central.repo)
    for dataset_type in at_central:
        reference = {
            r.dataId: r
            for r in butler.query_datasets(dataset_type, collections=campaign.reference_chain, limit=None)
        }
        produced = {
            r.dataId: r
            for r in butler.query_datasets(
                dataset_type, collections=campaign_collections, limit=None, explain=False
            )
        }
        for data_id in sorted(reference.keys() | produced.keys()):
            label = str(data_id.required)
            ref, got = reference.get(data_id), produced.get(data_id)
            site = _site_of_run(campaign, got.run) if got else ""
            if got is None or ref is None:
                status = "missing" if got is None else "unexpected"
                rows.append(QARow("completeness", dataset_type, label, site, "fail", detail=status))
                continue
            owner = _owner(campaign, data_id)
            wrong_site = owner is not None and owner != site
            rows.append(
                QARow(
                    "completeness",
                    dataset_type,
                    label,
                    site,
                    "fail" if wrong_site else "pass",
                    detail=f"expected from {owner}" if wrong_site else "",
                )
            )
            detail = f"rtol={rtol:g}"
            try:
                difference = compare_datasets(butler.get(got), butler.get(ref), rtol)
            except FileIntegrityError as err:
                # A product whose file no longer matches what was ingested fails QA; it does not stop it.
                difference, detail = float("inf"), f"unreadable: {err}"
            rows.append(
                QARow(
                    "site_independence",
                    dataset_type,
                    label,
                    site,
                    "pass" if difference <= rtol else "fail",
                    value=difference,
                    detail=detail,
                )
            )
    rows += _stage_completeness(campaign)
    rows += _multi_site_fraction(campaign)
    rows += _science_checks(campaign, butler, campaign_collections)
    table = pd.DataFrame([asdict(r) for r in rows])
    Path(table_path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(table_path, index=False)
    failed = table[table["status"] == "fail"]
    summary = table.groupby(["check", "status"]).size().unstack(fill_value=0).to_dict(orient="index")
    if not failed.empty:
        listing = "\n".join(
            f"    {r.check}: {r.dataset_type} {r.data_id} site={r.site or '-'} {r.detail} "
            + (f"value={r.value:.3g}" if pd.notna(r.value) else "")
            for r in failed.head(30).itertuples()
        )
        raise QAFailed(f"QA failed: {len(failed)} of {len(table)} checks (table: {table_path}):\n{listing}")
    return {
        "checks": len(table),
        "summary": summary,
        "table": str(Path(table_path).resolve()),
        **provenance(started),
    }


def _stage_completeness(campaign: Campaign) -> list[QARow]:
    """Compare outputs predicted by each site's quantum graphs with those produced.

    Per stage, dataset type and unit.

    Read from the stage markers, or from the ``done`` events that hand-offs carried
    to the central site when the stage ran in another instance.
    """
    from .status import campaign_events

    done = {}
    for event in campaign_events(campaign):
        marker = event.details.get("marker", {})
        if event.kind == "done" and "chunk" in marker and "expected" in marker:
            done[(marker["site"], marker["stage"], marker["chunk"])] = marker
    rows = []
    for stage in campaign.stages:
        for site in campaign.stage_sites(stage):
            for chunk in stage_chunks(campaign, site.name, stage):
                path = campaign.markers / "stage" / site.name / stage.name / f"{chunk}.json"
                marker = read_marker(path) if path.exists() else done.get((site.name, stage.name, chunk))
                where = f"{stage.name} {chunk}"
                if not marker or not marker.get("expected"):
                    rows.append(
                        QARow(
                            "stage_completeness",
                            "",
                            where,
                            site.name,
                            "fail",
                            detail="no quantum-graph prediction for this chunk; rerun it",
                        )
                    )
                    continue
                for name, expected in marker["expected"].items():
                    produced = marker["datasets"].get(name, 0)
                    rows.append(
                        QARow(
                            "stage_completeness",
                            name,
                            where,
                            site.name,
                            "pass" if produced >= expected > 0 else "fail",
                            value=produced,
                            detail=f"{produced} of {expected} predicted by the quantum graphs",
                        )
                    )
                for unit, by_type in marker.get("units", {}).items():
                    for name, (expected, produced) in by_type.items():
                        rows.append(
                            QARow(
                                "unit_completeness",
                                name,
                                f"{stage.name} {unit}",
                                site.name,
                                "pass" if produced == expected else "fail",
                                value=produced,
                                detail=f"{produced} of {expected}",
                            )
                        )
    return rows


def _multi_site_fraction(campaign: Campaign) -> list[QARow]:
    """Report the fraction of raws processed at more than one site (information, never a failure)."""
    path = campaign.markers / "placement" / "raws.tsv"
    if not path.exists():
        return []
    placement = pd.read_csv(path, sep="\t")
    sites_per_raw = placement.groupby(["exposure", "detector"])["site"].nunique()
    fraction = float((sites_per_raw > 1).mean())
    return [
        QARow(
            "multi_site_fraction",
            "raw",
            f"{len(sites_per_raw)} raws",
            "all",
            "pass",
            value=fraction,
            detail="fraction processed at more than one site",
        )
    ]


def _science_checks(campaign: Campaign, butler, collections: list[str]) -> list[QARow]:
    """Check the demo science: recovered zero points and coadd photometry against the injected truth."""
    truth_collection = campaign.truth_collection
    if not truth_collection or not butler.registry.queryDatasetTypes("demo_truth_zeropoints"):
        return []
    truth = butler.get("demo_truth_zeropoints", instrument=campaign.instrument, collections=truth_collection)
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
    limit = float(campaign.qa.get("max_zeropoint_rms", 0.02))
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
    # Calibrated magnitudes carry the mean injected offset (the solution fixes the mean to zero).
    stars = butler.get("demo_truth_stars", instrument=campaign.instrument, collections=truth_collection)
    offset_limit = float(campaign.qa.get("max_photometry_offset", 0.05))
    for ref in butler.query_datasets("object_catalog", collections=collections, limit=None, explain=False):
        objects = butler.get(ref)
        bright = objects[objects["mag"] < 19.5]
        distance = np.hypot(
            np.asarray(bright["ra"])[:, None] - np.asarray(stars["ra"])[None, :],
            np.asarray(bright["dec"])[:, None] - np.asarray(stars["dec"])[None, :],
        )
        matched = distance.min(axis=1, initial=np.inf) < 0.0015
        nearest = distance.argmin(axis=1) if len(bright) else np.array([], dtype=int)
        difference = np.asarray(bright["mag"])[matched] - np.asarray(stars["mag"])[nearest[matched]]
        offset = float(np.median(difference) - injected.mean()) if matched.any() else float("inf")
        rows.append(
            QARow(
                "science",
                "object_catalog",
                str(ref.dataId.required),
                _site_of_run(campaign, ref.run),
                "pass" if abs(offset) <= offset_limit else "fail",
                value=offset,
                detail=f"coadd photometry: median offset vs truth of {int(matched.sum())} bright stars (mag)",
            )
        )
    return rows
