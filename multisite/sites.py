"""Site repositories: create the ones a demo or test campaign owns, and seed the demo survey."""

from __future__ import annotations

__all__ = ("prepare_repo", "make_demo_survey")

import dataclasses
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lsst.daf.butler import Butler, Config
from lsst.daf.butler.registry.interfaces import SchemaAlreadyDefinedError

from .butler_utils import collection_exists, open_butler, repo_write_lock
from .config import Campaign
from .markers import provenance

_LOG = logging.getLogger(__name__)


def prepare_repo(campaign: Campaign, site: str) -> dict[str, Any]:
    """Make sure a site's repository exists, creating it when the config allows.

    Raises
    ------
    FileNotFoundError
        Raised when the repository is missing and ``create_repo`` is false.
    FileExistsError
        Raised when the repository's directory holds files but no repository, or
        when the registry's PostgreSQL namespace already holds tables.
    """
    started = datetime.now(UTC)
    repo = campaign.sites[site].repo
    created = False
    if "://" not in repo and not (Path(repo) / "butler.yaml").exists():
        if not campaign.sites[site].create_repo:
            raise FileNotFoundError(
                f"sites.{site}.repo: no Butler repository at {repo}; create it or set create_repo: true"
            )
        seed = Config(campaign.repo_seed) if campaign.repo_seed else Config()
        if registry := campaign.sites[site].registry:
            seed["registry", "db"] = registry["db"]
            seed["registry", "namespace"] = registry["namespace"]
        # Made beside it, then renamed into place: a kill in the middle leaves no half-made
        # repository (a butler.yaml without its registry's tables) for a rerun to take as whole.
        partial = Path(repo).with_name(f"{Path(repo).name}_partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            Butler.makeRepo(str(partial), config=seed)
        except SchemaAlreadyDefinedError as err:
            shutil.rmtree(partial, ignore_errors=True)
            db, namespace = registry["db"], registry["namespace"]  # SQLite's file is new: always empty
            raise FileExistsError(
                f"sites.{site}.registry: namespace {namespace} of {db} already holds a registry ({err}): "
                "another repository's, or one whose creation was killed. If it is no other repository's, "
                f"drop it (psql {db} -c 'DROP SCHEMA {namespace} CASCADE') and rerun; else name another "
                "namespace."
            ) from None
        try:
            partial.rename(repo)
        except OSError as err:
            raise FileExistsError(
                f"sites.{site}.repo: {repo} holds files but no butler.yaml ({err}); empty it, or point "
                "repo at a new directory"
            ) from None
        created = True
        _LOG.info("Created Butler repository %s for %s.", repo, site)
    with open_butler(repo) as butler:
        n_datasets_types = len(butler.registry.queryDatasetTypes())
    return {
        "site": site,
        "repo": repo,
        "created": created,
        "dataset_types": n_datasets_types,
        **provenance(started),
    }


def make_demo_survey(campaign: Campaign) -> dict[str, Any]:
    """Write the synthetic demo survey into the central repository (once)."""
    from .demo.survey import SurveySpec, make_survey

    started = datetime.now(UTC)
    central = campaign.central
    spec = SurveySpec(**campaign.demo.get("survey", {}))
    truth = campaign.truth_collection or f"{campaign.instrument}/truth"
    with repo_write_lock(central.repo), open_butler(central.repo, writeable=True) as butler:
        if _survey_written(butler, truth):
            n_raws = len(butler.query_datasets("raw", collections=campaign.raw_collection, limit=None))
            _LOG.info("%s already holds %d raws; not generating again.", campaign.raw_collection, n_raws)
        else:
            # A survey is whole once its truth, written last, is there; what a kill left before is
            # removed, and the survey made again (its dimension records are synced, not inserted).
            _remove_partial_survey(butler, Path(central.repo), [campaign.raw_collection, truth])
            n_raws = make_survey(butler, spec, campaign.raw_collection, truth)
    return {
        "repo": central.repo,
        "raw_collection": campaign.raw_collection,
        "truth_collection": truth,
        "raws": n_raws,
        "survey": dataclasses.asdict(spec),
        **provenance(started),
    }


def _survey_written(butler: Butler, truth: str) -> bool:
    """Whether the demo survey is whole: its truth zero points, written last, are there."""
    if not collection_exists(butler, truth) or not butler.registry.queryDatasetTypes("demo_truth_zeropoints"):
        return False
    return bool(butler.query_datasets("demo_truth_zeropoints", collections=truth, explain=False, limit=1))


def _remove_partial_survey(butler: Butler, repo: Path, runs: list[str]) -> None:
    """Remove what a killed survey left: its RUNs, their files and its staging directories."""
    for run in runs:
        if not collection_exists(butler, run):
            continue
        # removeRuns needs some dataset type registered; an empty RUN is only a collection.
        if butler.registry.queryDatasetTypes():
            butler.removeRuns([run])
        else:
            butler.registry.removeCollection(run)
    for leftover in [*(repo / run for run in runs), *repo.glob("raws-*")]:
        if leftover.is_dir():
            _LOG.info("Removing %s, left by a survey that did not finish.", leftover)
            shutil.rmtree(leftover)
