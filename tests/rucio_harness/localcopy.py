"""A Rucio transfer tool for tests: copies ``file://`` replicas and verifies adler32.

FTS3 cannot run on a test machine. This tool is registered with Rucio's conveyor
(``rucio.core.transfer.TRANSFERTOOL_CLASSES_BY_NAME``) by the daemon runner, so
Rucio's own submitter, poller and finisher drive it exactly as they drive FTS3:
the submitter hands it the transfers of queued requests, the poller asks it for
their states, the finisher turns them into replica and rule states.

It runs inside the Rucio server's virtual environment (it imports ``rucio``).
Each submission copies its files synchronously and records the outcome of every
request in a JSON file under ``$LOCALCOPY_STATE_DIR``, which ``bulk_query`` reads.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rucio.core.request import get_transfer_error
from rucio.db.sqla.constants import RequestState
from rucio.transfertool.transfertool import TransferStatusReport, Transfertool, TransferToolBuilder

NAME = "localcopy"


def _state_dir() -> Path:
    path = Path(os.environ.get("LOCALCOPY_STATE_DIR", "/tmp/localcopy-state"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _path(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise ValueError(f"{NAME} copies file:// URLs only, got {url}")
    return Path(parsed.path)


def adler32_of(path: Path) -> str:
    """Return the adler32 of a file as Rucio writes it (8 lower-case hex digits).

    The same as `multisite.rucio_backend.adler32_of`: this module runs inside the Rucio
    server's own environment, where the multisite package is not installed.
    """
    value = 1
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            value = zlib.adler32(chunk, value)
    return f"{value & 0xFFFFFFFF:08x}"


def copy_verified(source: Path, destination: Path, size: int | None, adler32: str | None) -> str | None:
    """Copy ``source`` to ``destination`` if it has the expected size and adler32.

    Returns
    -------
    reason : `str` or `None`
        Why the copy was refused, or `None` when the file is in place.
    """
    if not source.exists():
        return f"source file {source} does not exist"
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.part")
    try:
        shutil.copyfile(source, partial)
        got_size = partial.stat().st_size
        if size is not None and got_size != size:
            return f"size mismatch for {source}: {got_size} bytes, Rucio expects {size}"
        got = adler32_of(partial)
        if adler32 and got != adler32.lower().zfill(8):
            return f"checksum mismatch for {source}: adler32 {got}, Rucio expects {adler32}"
        os.replace(partial, destination)
        return None
    finally:
        partial.unlink(missing_ok=True)


class LocalCopyStatusReport(TransferStatusReport):
    """State of one request, as recorded at submission."""

    supported_db_fields = ["state", "external_id", "err_msg", "transferred_at"]

    def __init__(self, request_id: str, external_id: str, done: bool, reason: str | None):
        super().__init__(request_id)
        self.state = RequestState.DONE if done else RequestState.FAILED
        self.external_id = external_id
        self.err_msg = None if done else get_transfer_error(RequestState.FAILED, reason)
        self.transferred_at = datetime.datetime.utcnow()

    def initialize(self, session, logger=logging.log) -> None:
        pass

    def get_monitor_msg_fields(self, session, logger=logging.log) -> dict[str, Any]:
        return {}


class LocalCopyTransfertool(Transfertool):
    """Copies ``file://`` sources to ``file://`` destinations, checking size and adler32."""

    external_name = NAME
    required_rse_attrs = ()
    supported_schemes = {"file"}

    def __init__(self, external_host: str = NAME, logger=logging.log, **_kwargs):
        super().__init__(external_host, logger)

    @classmethod
    def submission_builder_for_path(cls, transfer_path, logger=logging.log):
        return transfer_path, TransferToolBuilder(cls, external_host=NAME)

    def group_into_submit_jobs(self, transfer_paths):
        return [{"transfers": list(itertools.chain.from_iterable(transfer_paths)), "job_params": {}}]

    def submit(self, transfers, job_params, timeout=None) -> str:
        external_id = uuid.uuid4().hex
        outcome = {}
        for transfer in transfers:
            rws = transfer.rws
            reasons = []
            for source in transfer.sources:
                reason = copy_verified(
                    _path(transfer.source_url(source)), _path(transfer.dest_url), rws.byte_count, rws.adler32
                )
                if reason is None:
                    break
                reasons.append(reason)
            else:
                outcome[rws.request_id] = {"done": False, "reason": "; ".join(reasons) or "no source"}
                self.logger(logging.WARNING, "%s: %s", NAME, outcome[rws.request_id]["reason"])
                continue
            outcome[rws.request_id] = {"done": True, "reason": None}
        state = _state_dir() / f"{external_id}.json"
        state.write_text(json.dumps(outcome))
        return external_id

    def bulk_query(self, requests_by_eid, timeout=None):
        response: dict[str, dict[str, TransferStatusReport]] = {}
        for external_id, requests in requests_by_eid.items():
            state = _state_dir() / f"{external_id}.json"
            outcome = json.loads(state.read_text()) if state.exists() else {}
            for request_id in requests:
                result = outcome.get(request_id, {"done": False, "reason": f"{NAME}: unknown transfer"})
                response.setdefault(external_id, {})[request_id] = LocalCopyStatusReport(
                    request_id, external_id, result["done"], result["reason"]
                )
        return response

    def cancel(self, transfer_ids, timeout=None) -> bool:
        return True

    def update_priority(self, transfer_id, priority, timeout=None) -> bool:
        return True


def register() -> None:
    """Make the tool known to Rucio's conveyor under the name ``localcopy``."""
    from rucio.core import transfer

    transfer.TRANSFERTOOL_CLASSES_BY_NAME[NAME] = LocalCopyTransfertool
