"""The demo campaign under a sequence of faults, recovered the way the README says.

One campaign (butler backend, one instance) meets, in order: ``kill -9`` of the whole
instance at random moments (seeded, the seed printed), a raw damaged at a site after it
arrived, and a full disk at a site whose repository sits on a small filesystem. After each
fault the operator's documented recovery is applied (``snakemake --unlock`` and
``--rerun-incomplete``; ``multisite repair``; more room, ``multisite orphans --delete``
and a rerun). The campaign must end with every QA check passing (each product equal to
the single-site reference), no dataset stored twice at any site, no orphaned file in any
datastore, and ``multisite check`` finding markers and Butlers consistent.

The campaign is the session fixture ``demo_through_faults`` (conftest), which runs it
with ``run_through_faults``: test_instances compares four site instances' final outputs
with this single-instance run, so one campaign serves both.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy.exc
import yaml
from lsst.daf.butler import Butler

from multisite.butler_utils import open_butler
from multisite.config import Campaign, load_campaign
from multisite.integrity import Manifest
from multisite.markers import read_marker
from multisite.targets import Targets

from .conftest import BIN, REPO, demo_config, snakemake, snakemake_command

SEED = int(os.environ.get("MULTISITE_FAULT_SEED", "20261202"))
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def multisite(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "multisite"), *args], capture_output=True, text=True, env=ENV)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_killed_when(directory: Path, condition: Callable[[], bool], *targets: str) -> bool:
    """Run the workflow and SIGKILL its process group once ``condition()``; return whether it was killed."""
    with open(directory / "snakemake.log", "a") as log:
        process = subprocess.Popen(
            snakemake_command(directory, "--rerun-incomplete", *targets),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
        while process.poll() is None:
            if condition():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                # A killed bps submit leaves its parsl workers for a while; let them go.
                time.sleep(5)
                snakemake(directory, "--unlock")
                return True
            time.sleep(0.05)
        return False


def run_killed_after(directory: Path, seconds: float, *targets: str) -> bool:
    """Run the workflow and SIGKILL its process group after ``seconds``; return whether it was killed."""
    deadline = time.monotonic() + seconds
    return run_killed_when(directory, lambda: time.monotonic() >= deadline, *targets)


@contextmanager
def small_filesystem(directory: Path) -> Iterator[Path]:
    """Mount a 12 MB tmpfs: room for lancs's repository and raws, not for its processing."""
    mount = directory / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, leave_bytes: int) -> Path:
    """Fill a filesystem but for ``leave_bytes``."""
    ballast = mount / "ballast"
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(ballast, "wb") as stream:
        stream.truncate(0)
        stream.write(b"\0" * max(0, free - leave_bytes))
    return ballast


def duplicated(campaign, site: str) -> list[str]:
    """Return the products stored more than once in what a site's stages and hand-offs hold.

    Logs aside: a failed quantum's log stays beside the one of the attempt that redid it.
    """
    butler = Butler.from_config(campaign.sites[site].repo)
    chains = [
        campaign.stage_chain(site, s.name)
        for s in campaign.stages
        if site in {x.name for x in campaign.stage_sites(s)}
    ]
    chains.append(campaign.handoff_chain(site))
    runs = sorted({run for chain in chains for run in butler.collections.query(chain, flatten_chains=True)})
    found = []
    for dataset_type in butler.registry.queryDatasetTypes():
        if dataset_type.name.endswith("_log") or not dataset_type.dimensions.names:
            continue
        refs = butler.query_datasets(
            dataset_type, collections=runs, find_first=False, limit=None, explain=False
        )
        ids = [ref.dataId for ref in refs]
        found += [f"{dataset_type.name} {i}" for i in set(ids) if ids.count(i) > 1]
    return found


@dataclass
class FaultedDemo:
    """A demo campaign run to its end through the faults, and what the operator met on the way."""

    directory: Path
    config: Path
    campaign: Campaign
    damaged: Path
    """The raw damaged at ral after it arrived."""
    failed: subprocess.CompletedProcess
    """The run that met the damaged raw and the full disk."""

    @property
    def work(self) -> Path:
        return self.directory / "work"


def run_through_faults(directory: Path, small: Path) -> FaultedDemo:
    """Run the demo campaign in ``directory``, lancs's repository on ``small``, through the faults.

    Each fault is followed by the README's recovery; what the checks need is returned.
    """
    print(f"fault seed {SEED} (set MULTISITE_FAULT_SEED to replay)")
    rng = random.Random(SEED)
    # One unit a step1 chunk: the raws travel in a piece per chunk, and the kills land among them.
    stages = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["stages"]
    stages[0]["units_per_chunk"] = 1
    config = demo_config(directory, stages=stages)
    text = config.read_text().replace(
        str(directory / "work" / "sites" / "lancs" / "repo"), str(small / "lancs")
    )
    config.write_text(text)
    campaign = load_campaign(config)

    # 1. kill -9 at random moments while the sites are prepared and the raws travel.
    raws = [
        str(path.relative_to(directory))
        for s in campaign.processing_sites
        for path in Targets(campaign, campaign.layout).handoff_markers("raws", s.name)
    ]
    for _ in range(2):
        run_killed_after(directory, rng.uniform(8, 40), *raws)
    # The README's restart after a kill: the steps the kill interrupted are redone.
    snakemake(directory, "--rerun-incomplete", *raws)

    # 2. A raw damaged at ral after it arrived: verification names it, repair fixes it.
    ral = Butler.from_config(campaign.sites["ral"].repo)
    victim = ral.getURI(ral.query_datasets("raw", collections=campaign.handoff_chain("ral"), limit=1)[0])
    path = Path(victim.ospath)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    # 3. lancs's disk fills up before its processing.
    ballast = fill(small, 256 * 1024)

    failed = snakemake(directory, "--keep-going", check=False)

    multisite("repair", str(config), "--site", "ral")
    ballast.unlink()
    multisite("orphans", str(config), "--site", "lancs", "--delete")
    # One more kill in the middle of the recovery run, then the documented restart.
    run_killed_after(directory, rng.uniform(20, 90))
    snakemake(directory, "--rerun-incomplete")
    return FaultedDemo(directory, config, campaign, path, failed)


def test_demo_survives_kills_a_damaged_raw_and_a_full_disk(demo_through_faults):
    demo = demo_through_faults
    # The run that met the faults failed, naming the damaged raw, the repair, and lancs's full disk.
    assert demo.failed.returncode != 0
    output = demo.failed.stdout + demo.failed.stderr
    assert demo.damaged.name in output and "multisite repair" in output, output[-5000:]
    assert "lancs" in output and ("free space" in output or "No space left" in output), output[-5000:]

    # After the recovery, the campaign is complete and clean.
    qa = read_marker(demo.campaign.layout.markers / "qa" / "qa.json")
    assert all(set(counts) == {"pass"} for counts in qa["summary"].values()), qa["summary"]
    for site in demo.campaign.sites.values():
        assert not duplicated(demo.campaign, site.name), site.name
        orphans = multisite("orphans", str(demo.config), "--site", site.name)
        assert "no orphan" in orphans.stdout.lower(), orphans.stdout
    assert multisite("check", str(demo.config)).returncode == 0


def test_a_repository_whose_writer_was_killed_in_the_middle_of_a_write_opens_read_only(tmp_path):
    """A killed writer leaves a hot SQLite journal; a read-only open rolls it back instead of failing."""
    repo = tmp_path / "repo"
    Butler.makeRepo(str(repo))
    with open_butler(str(repo), writeable=True) as butler:
        butler.registry.registerRun("kept")
    # A write big enough to spill into the database file before its commit, then SIGKILL.
    killed_writer = f"""
import os, signal, sqlite3
connection = sqlite3.connect({str(repo / "gen3.sqlite3")!r}, isolation_level=None)
connection.execute("PRAGMA cache_size=1")
connection.execute("BEGIN IMMEDIATE")
connection.execute("CREATE TABLE unfinished (x)")
connection.executemany("INSERT INTO unfinished VALUES (?)", [("x" * 1000,)] * 2000)
os.kill(os.getpid(), signal.SIGKILL)
"""
    subprocess.run([sys.executable, "-c", killed_writer], check=False)
    assert (repo / "gen3.sqlite3-journal").exists()
    with pytest.raises(sqlalchemy.exc.OperationalError, match="readonly database"):
        Butler.from_config(str(repo))
    with open_butler(str(repo)) as butler:
        assert list(butler.collections.query("*")) == ["kept"]
    connection = sqlite3.connect(repo / "gen3.sqlite3")
    tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
    connection.close()
    assert "unfinished" not in tables


def test_a_receiver_killed_in_the_middle_of_its_import_reruns_to_completion_without_duplicates(tmp_path):
    """Killed between two parts of in2p3's raws import; ``--rerun-incomplete`` imports only the rest."""
    config = demo_config(tmp_path, transfer={"backend": "butler", "mode": "copy", "import_batch": 1})
    campaign = load_campaign(config)
    target = str(campaign.layout.handoff_marker("raws", "in2p3", "c0000").relative_to(tmp_path))
    log = campaign.layout.handoff_log("raws", "in2p3", "c0000")
    third_part_in = lambda: log.exists() and "Imported part 3 of" in log.read_text()  # noqa: E731
    assert run_killed_when(tmp_path, third_part_in, target)
    manifest = Path(campaign.central.repo) / "handoff_exports/demo/raws/in2p3/c0000.manifest.json"
    ids = Manifest.read(manifest).dataset_ids()
    # The kill may leave an SQLite journal to roll back: open the way the workflow does.
    at_in2p3 = open_butler(campaign.sites["in2p3"].repo)
    kept = len(at_in2p3.get_many_datasets(ids))
    assert 3 <= kept < len(ids), (kept, len(ids))  # the batches committed before the kill stay

    snakemake(tmp_path, "--rerun-incomplete", target)
    marker = read_marker(tmp_path / target)
    assert marker["backend_details"]["transferred"] == len(ids) - kept
    at_in2p3 = Butler.from_config(campaign.sites["in2p3"].repo)
    found = at_in2p3.get_many_datasets(ids)
    assert sorted(str(ref.id) for ref in found) == sorted(ids)
    assert all(at_in2p3.stored_many(found).values())
    raws = at_in2p3.query_datasets("raw", collections=campaign.raw_collection, find_first=False, limit=None)
    assert raws and len(raws) == len({ref.dataId for ref in raws})
