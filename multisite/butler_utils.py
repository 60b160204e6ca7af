"""Small Butler helpers shared by hand-offs, stages and QA."""

from __future__ import annotations

__all__ = (
    "collection_exists",
    "ensure_in_chain",
    "open_butler",
    "repo_write_lock",
    "run_tool",
    "stream_datasets",
)

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import sqlalchemy.exc
from lsst.daf.butler import Butler, CollectionType, DatasetRef, MissingCollectionError

_LOG = logging.getLogger(__name__)


def open_butler(repo: str, writeable: bool = False) -> Butler:
    """Open a repository, with an error that names it when it is not there.

    A process killed in the middle of a write to an SQLite registry leaves a
    journal that only a writeable connection may roll back; until one does, every
    read-only open fails with "attempt to write a readonly database". A read-only
    open that meets one opens the repository writeable once, which rolls the
    unfinished write back as any later writer would, and then opens it as asked.
    """
    try:
        return Butler.from_config(repo, writeable=writeable)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"No Butler repository at {repo}: {err}") from None
    except sqlalchemy.exc.OperationalError as err:
        if writeable or "readonly database" not in str(err.orig):
            raise
    _LOG.warning("Rolling back a write to %s that a killed process left unfinished.", repo)
    Butler.from_config(repo, writeable=True).close()
    return Butler.from_config(repo, writeable=False)


def stream_datasets(
    butler: Butler, dataset_type: str, collections: list[str], with_records: bool
) -> Iterator[DatasetRef]:
    """Yield a dataset type's datasets (the first found in ``collections``) in data ID order.

    The registry sends them a page at a time, so memory does not grow with their
    number; the order is the same on every call, so a rerun cuts them the same way.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The repository; other work goes through another Butler while the caller
        iterates (the query holds a cursor open until its last page).
    dataset_type : `str`
        Dataset type name.
    collections : `list` [`str`]
        Collections to search, in order.
    with_records : `bool`
        Attach the data IDs' dimension records (which a Butler zip carries).
    """
    with butler.query() as query:
        results = query.datasets(dataset_type, collections, find_first=True)
        results = results.order_by(*butler.get_dataset_type(dataset_type).dimensions.required)
        yield from results.with_dimension_records() if with_records else results


def collection_exists(butler: Butler, name: str) -> bool:
    """Whether a collection of any type exists."""
    try:
        butler.collections.get_info(name)
    except MissingCollectionError:
        return False
    return True


def ensure_in_chain(butler: Butler, chain: str, children: Iterable[str]) -> None:
    """Put ``children`` at the front of CHAINED collection ``chain``, creating it if needed.

    Children already in the chain are left where they are, so calling this again
    changes nothing.
    """
    butler.collections.register(chain, CollectionType.CHAINED)
    present = set(butler.collections.get_info(chain).children)
    new = [child for child in dict.fromkeys(children) if child not in present]
    if new:
        butler.collections.prepend_chain(chain, new)


@contextlib.contextmanager
def repo_write_lock(repo: str, *, imports: bool = False) -> Iterator[None]:
    """Serialise writers of a local repository across processes.

    SQLite allows one writer at a time; campaign rules that write the same local
    SQLite repository (hand-offs arriving together at the central site) take turns.
    Imports (``imports``) take turns in a local repository of any registry:
    hand-off pieces can carry the same datasets (the fan-out pieces of neighbouring
    patches), and two receives that looked up what is present at the same moment
    would both insert it. Other writers behind a database server get no lock.
    """
    root = Path(repo)
    if root.name == "butler.yaml":
        root = root.parent
    sqlite = (root / "gen3.sqlite3").exists()
    if "://" in repo or not (sqlite or (imports and (root / "butler.yaml").exists())):
        yield
        return
    with open(root / ".campaign-write.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_tool(command: list[str], log_path: str | Path) -> tuple[int, str]:
    """Run a middleware command-line tool (``bps``, ``pipetask``) from this environment.

    The command is a list (no shell), so no configuration value is ever parsed by
    a shell. Its output goes to ``log_path`` as it runs (to follow a long BPS
    submission live) and is returned.

    Returns
    -------
    returncode : `int`
        The tool's exit code.
    output : `str`
        What it printed (stdout and stderr).
    """
    # The tool, and every job it starts, must come from this same environment.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    _LOG.info("Running %s (output in %s)", " ".join(command), log_path)
    with open(log_path, "w") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    return result.returncode, Path(log_path).read_text()
