"""Run Rucio's judge-injector, -evaluator and -repairer, conveyor submitter, poller and finisher, necromancer.

Runs inside the Rucio server's virtual environment, with ``RUCIO_CONFIG`` pointing
at the server configuration (it talks to the database like the real daemons do).
Each pass calls the real daemon functions once, with no partition wait, so a rule
goes REPLICATING -> OK in a few seconds instead of minutes. The necromancer turns
a replica declared bad (``declare_bad_file_replicas``) into a recovery transfer
from a good replica, which the conveyor then copies; the judge-repairer retries
rules that stay STUCK (after ``[repairer] updated_at_delta`` seconds, 1800 by
default, as the daemon does). While the file named by ``--pause-file`` exists,
passes are skipped (tests use this to hold transfers back). The judge-injector makes
the locks of rules Rucio creates asynchronously (those on 10,000 files or more).
Stop it with SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
import time
from pathlib import Path

STOP = False


def _stop(signum, frame):
    global STOP
    STOP = True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pause-file", required=True)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import localcopy
    from rucio.common.config import config_get_int
    from rucio.daemons.badreplicas import necromancer
    from rucio.daemons.common import run_daemon
    from rucio.daemons.conveyor.finisher import finisher
    from rucio.daemons.conveyor.poller import poller
    from rucio.daemons.conveyor.submitter import submitter
    from rucio.daemons.judge import injector, repairer
    from rucio.daemons.judge.evaluator import re_evaluator

    def once(daemon, **arguments) -> None:
        """Run one pass of a daemon's own ``run_once``, as its entry point does.

        Without the partition wait the entry points hard-code (10 s for the necromancer).
        """
        run_daemon(
            once=True,
            graceful_stop=daemon.graceful_stop,
            executable=daemon.DAEMON_NAME,
            partition_wait_time=0,
            sleep_time=60,
            run_once_fnc=functools.partial(daemon.run_once, **arguments),
        )

    localcopy.register()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    pause = Path(args.pause_file)
    paused_rules: dict = {}  # the judge-repairer's memory of rules it backs off from, across passes
    paused_injections: dict = {}  # the judge-injector's
    passes = [
        # Rucio creates a rule on 10,000 files or more asynchronously: this daemon makes its locks.
        ("judge-injector", lambda: once(injector, paused_rules=paused_injections)),
        ("judge-evaluator", lambda: re_evaluator(once=True, did_limit=1000)),
        # Before the conveyor: a replica declared bad becomes a transfer in the same pass.
        ("necromancer", lambda: once(necromancer, bulk=1000)),
        (
            "conveyor-submitter",
            lambda: submitter(
                once=True, partition_wait_time=0, bulk=1000, transfertools=[localcopy.NAME], sleep_time=0
            ),
        ),
        (
            "conveyor-poller",
            lambda: poller(
                once=True,
                partition_wait_time=0,
                older_than=0,
                db_bulk=1000,
                fts_bulk=1000,
                transfertool=localcopy.NAME,
                sleep_time=0,
            ),
        ),
        ("conveyor-finisher", lambda: finisher(once=True, partition_wait_time=0, bulk=1000, db_bulk=1000)),
        (
            "judge-repairer",
            lambda: once(
                repairer,
                paused_rules=paused_rules,
                delta=config_get_int("repairer", "updated_at_delta", default=1800),
            ),
        ),
    ]
    logging.info("daemon loop started")
    paused = pause.with_suffix(".ack")
    while not STOP:
        if pause.exists():
            # Acknowledge, so that the test knows no pass is half-way through.
            paused.touch()
            time.sleep(args.interval)
            continue
        paused.unlink(missing_ok=True)
        for name, run in passes:
            if STOP or pause.exists():
                break
            try:
                run()
            except Exception:
                logging.exception("%s pass failed", name)
        time.sleep(args.interval)
    logging.info("daemon loop stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
