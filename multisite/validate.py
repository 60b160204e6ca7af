"""The one validation of a campaign config that the workflow and ``multisite validate`` both run."""

from __future__ import annotations

__all__ = ("validate_campaign",)

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import Campaign, config_source, load_campaign
from .errors import CampaignConfigError
from .pipeline import missing_subsets
from .plan_version import check_plan_unchanged


def validate_campaign(config: Mapping[str, Any] | str | Path, base: str | Path = ".") -> Campaign:
    """Run every check of a campaign configuration, including those that read its pipeline.

    The one validation that both the workflow (``rules/common.smk``) and ``multisite
    validate`` run, so that they cannot differ: `load_campaign`'s checks, then each
    stage's subset against the pipeline YAML (read only, no task imported). A
    pipeline that cannot be read here (a stack's ``$DRP_PIPE_DIR`` on a machine
    without that stack, for a preview) is not read.

    Parameters
    ----------
    config : `~collections.abc.Mapping` or `str` or `pathlib.Path`
        The configuration, or the path of its YAML file.
    base : `str` or `pathlib.Path`
        Directory that relative paths in the configuration are relative to.

    Returns
    -------
    campaign : `Campaign`
        The validated campaign.

    Raises
    ------
    CampaignConfigError
        Raised with every problem found, each naming its field and its fix
        (`multisite.errors.PlanChangedError` for a plan changed under a running campaign).
    """
    campaign = load_campaign(config, base)
    check_plan_unchanged(campaign, config_source(config))
    try:
        missing = missing_subsets(campaign)
    except Exception as err:  # whatever reading or parsing the YAML raises, reported against its field
        problem = f"pipeline: {campaign.pipeline} cannot be read as a pipeline YAML: {err}"
    else:
        if not missing:
            return campaign
        problem = (
            f"stages[].subset: pipeline {campaign.pipeline} has no subset(s) {missing}; "
            "name subsets defined in the pipeline YAML"
        )
    raise CampaignConfigError(config_source(config), [problem])
