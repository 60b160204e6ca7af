"""A parsl site for the demo's local "facilities": each BPS job is a thread of ``bps submit``.

`lsst.ctrl.bps.parsl.sites.Local` starts a HighThroughputExecutor (an interchange
and a worker pool, two more Python processes) for every submission, and its first
job waits about ten seconds for the pool to connect. The demo submits eleven
workflows of one job each on a two-core machine, so that wait, not the work, set
its pace. Threads start at once; each job is still its own ``pipetask`` or
``butler`` process, as it is on a facility's batch system.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lsst.ctrl.bps.parsl.configuration import get_bps_config_value
from lsst.ctrl.bps.parsl.site import SiteConfig
from parsl.executors import ThreadPoolExecutor

if TYPE_CHECKING:
    from lsst.ctrl.bps.parsl.job import ParslJob
    from parsl.executors.base import ParslExecutor

__all__ = ("LocalThreads",)


class LocalThreads(SiteConfig):
    """Run a workflow's jobs on this machine, at most ``site.<computeSite>.cores`` at once."""

    def get_executors(self) -> list[ParslExecutor]:
        """Return the one executor: a pool of ``cores`` threads labelled ``local``."""
        cores = get_bps_config_value(self.site, "cores", int, required=True)
        return [ThreadPoolExecutor(label="local", max_threads=cores)]

    def select_executor(self, job: ParslJob) -> str:
        """Run every job on the thread pool."""
        return "local"
