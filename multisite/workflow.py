"""The bridge between Snakemake rules and the package: one call per script.

Scripts under ``scripts/`` are one-liners over `run_rule`: it logs to the rule's
log file, loads the validated campaign, runs the step and writes its provenance
to every marker the rule declares, atomically and only if the step succeeded.
While the step runs, its heartbeat file is touched every ``status.heartbeat_s``
seconds, so that ``multisite status`` tells a killed step from a running one.
"""

from __future__ import annotations

__all__ = ("run_rule",)

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Campaign, load_campaign
from .errors import event_kind
from .events import EventLog, notify
from .layout import step_id
from .lock import Heartbeat, Owner
from .markers import write_marker
from .states import EventKind


def run_rule(snakemake: Any, step: Callable[[Campaign], dict[str, Any] | None]) -> None:
    """Run one workflow step from a Snakemake ``script:``.

    Parameters
    ----------
    snakemake : `snakemake.script.Snakemake`
        The object Snakemake hands to scripts.
    step : `~collections.abc.Callable`
        Function of the campaign returning the provenance for the rule's markers
        (``.json`` outputs), or `None` when the step writes its outputs itself.
    """
    log_path = Path(snakemake.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler, logging.StreamHandler(sys.stderr)], force=True)
    log = logging.getLogger("multisite.rule")
    campaign = load_campaign(snakemake.config)
    wildcards = dict(snakemake.wildcards.items())
    step_name = step_id(snakemake.rule, wildcards)
    site = wildcards.get("site") or getattr(snakemake.params, "site", None) or campaign.central.name
    instance = campaign.instance or "all"
    events = EventLog(campaign.layout.events, instance)
    heartbeat = Heartbeat(
        campaign.layout.heartbeat(instance, step_name), campaign.heartbeat_s, Owner.this_process(instance)
    )
    # The heartbeat file exists from before the started event to after the done or failed one.
    with heartbeat:
        log_file = str(log_path.resolve())
        events.record(EventKind.STARTED, step_name, site, log=log_file, heartbeat_s=campaign.heartbeat_s)
        try:
            content = step(campaign)
        except Exception as err:
            log.error("%s failed: %s", step_name, err)
            message = (str(err).splitlines() or [type(err).__name__])[0]
            event = events.record(event_kind(err), step_name, site, message, log=log_file, error=str(err))
            notify(campaign.notify, event, campaign.name)
            # One clear message for the operator instead of a traceback through Snakemake's script wrapper.
            print(f"\n{snakemake.rule}: {err}\n(log: {log_path})", file=sys.stderr)
            sys.exit(1)
        if content is not None:
            for output in snakemake.output:
                if output.endswith(".json"):
                    write_marker(output, content | {"rule": snakemake.rule, "marker": str(output)})
        event = events.record(EventKind.DONE, step_name, site, _summary(content), marker=content or {})
    notify(campaign.notify, event, campaign.name)
    log.info("%s done.", step_name)


def _summary(content: dict[str, Any] | None) -> str:
    """One line about a finished step, from its marker content."""
    if not content:
        return ""
    parts = []
    if "quanta_run" in content:
        parts.append(f"{content['quanta_run']} quanta")
    if "datasets" in content:
        parts.append(f"{sum(content['datasets'].values())} datasets")
    if "duration_s" in content:
        parts.append(f"{content['duration_s']:.0f} s")
    return ", ".join(parts)
