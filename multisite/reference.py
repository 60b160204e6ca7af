"""The single-site reference: the whole pipeline on all the campaign's data at the central site.

QA compares the multi-site products with it: science results must not depend on
where they were produced.
"""

from __future__ import annotations

__all__ = ("run_reference",)

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .butler_utils import collection_exists, open_butler, repo_write_lock, run_tool
from .config import Campaign
from .markers import provenance
from .pipeline import PipelineFlow
from .placement import units_query

_LOG = logging.getLogger(__name__)


def run_reference(campaign: Campaign, log_path: str | Path) -> dict[str, Any]:
    """Run the campaign's pipeline with ``pipetask run`` on all the data at the central site.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    log_path : `str` or `pathlib.Path`
        Where ``pipetask``'s output goes.

    Returns
    -------
    marker : `dict`
        Provenance for the reference marker.
    """
    started = datetime.now(UTC)
    flow = PipelineFlow(campaign)
    repo = campaign.central.repo
    where = units_query(campaign, [cell for u in campaign.units for cell in u.cells])
    chain = campaign.reference_chain
    with repo_write_lock(repo):
        with open_butler(repo) as butler:
            resume = collection_exists(butler, chain)
        command = [
            "pipetask",
            "run",
            "-b",
            repo,
            "-p",
            campaign.pipeline,
            "-d",
            where,
            "-o",
            chain,
            "--register-dataset-types",
            "-j",
            "1",
        ]
        # A rerun resumes the same RUN, skipping quanta that already succeeded.
        command += (
            ["--extend-run", "--skip-existing", "--clobber-outputs"]
            if resume
            else ["-i", campaign.raw_collection]
        )
        returncode, output = run_tool(command, log_path)
    # On a resumed run, an empty graph means every quantum already succeeded.
    if returncode != 0 and not (resume and "QuantumGraph was empty" in output):
        raise RuntimeError(f"Reference pipetask run failed (exit {returncode}); see {log_path}.")
    with open_butler(repo) as butler:
        counts = {
            name: len(butler.query_datasets(name, collections=chain, limit=None, explain=False))
            for stage in campaign.stages
            for name in sorted(flow.outputs(stage.name))
        }
    return {
        "repo": repo,
        "output_chain": chain,
        "data_query": where,
        "datasets": counts,
        **provenance(started, command),
    }
