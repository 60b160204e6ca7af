"""Run Rucio's judge-evaluator and conveyor submitter, poller and finisher in a loop.

Runs inside the Rucio server's virtual environment, with ``RUCIO_CONFIG`` pointing
at the server configuration (it talks to the database like the real daemons do).
Each pass calls the real daemon functions with ``once=True`` and no partition wait,
so a rule goes REPLICATING -> OK in a few seconds instead of minutes. While the
file named by ``--pause-file`` exists, passes are skipped (tests use this to hold
transfers back). Stop it with SIGTERM.
"""

from __future__ import annotations

import argparse
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
    from rucio.daemons.conveyor.finisher import finisher
    from rucio.daemons.conveyor.poller import poller
    from rucio.daemons.conveyor.submitter import submitter
    from rucio.daemons.judge.evaluator import re_evaluator

    localcopy.register()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    pause = Path(args.pause_file)
    passes = [
        ("judge-evaluator", lambda: re_evaluator(once=True, did_limit=1000)),
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
