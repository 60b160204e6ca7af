"""Campaign QA at the central site: completeness, site independence, multi-site fraction.

- *completeness*: every data ID the single-site reference produced for a dataset
  type that reaches the central site is there, from the site that should own it;
  and every output the sites' quantum graphs predicted was produced (per stage
  and per unit);
- *site independence*: each multi-site dataset equals the reference within ``rtol``;
- *multi-site fraction*: the fraction of raws processed at more than one site;
- checks against the campaign's truth, when its config names a truth collection
  (``collections.truth``): the demo's science (`multisite.demo.science`).
"""

from __future__ import annotations

__all__ = ("compare_datasets", "run_qa")

import logging
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from astropy.table import Table
from lsst.daf.butler import Butler, FileIntegrityError

from .butler_utils import open_butler
from .config import Campaign
from .demo.science import science_checks
from .errors import QAFailed
from .flow import handoffs, stage_chunks
from .markers import provenance, read_marker
from .pipeline import PipelineFlow
from .qa_table import QARow
from .states import EventKind

_LOG = logging.getLogger(__name__)


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
            site = campaign.site_of_run(got.run) if got else ""
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
    rows += _truth_checks(campaign, butler, campaign_collections)
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
        if event.kind == EventKind.DONE and "chunk" in marker and "expected" in marker:
            done[(marker["site"], marker["stage"], marker["chunk"])] = marker
    rows = []
    for stage in campaign.stages:
        for site in campaign.stage_sites(stage):
            for chunk in stage_chunks(campaign, site.name, stage):
                path = campaign.layout.chunk_marker(site.name, stage.name, chunk)
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
    path = campaign.layout.placement_table
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


def _truth_checks(campaign: Campaign, butler: Butler, collections: list[str]) -> list[QARow]:
    """Run the checks against the campaign's truth collection: the demo's science; none without one."""
    if not campaign.truth_collection:
        return []
    return science_checks(campaign, butler, collections)
