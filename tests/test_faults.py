"""The demo campaign under a sequence of faults, recovered the way the README says.

One campaign (butler backend, one instance) meets, in order: ``kill -9`` of the whole
instance at random moments (seeded, the seed printed), a raw damaged at a site after it
arrived, and a full disk at a site whose repository sits on a small filesystem. After each
fault the operator's documented recovery is applied (``snakemake --unlock`` and
``--rerun-incomplete``; ``multisite repair``; more room, ``multisite orphans --delete``
and a rerun). The campaign must end with every QA check passing (each product equal to
the single-site reference), no dataset stored twice at any site, no orphaned file in any
datastore, and ``multisite check`` finding markers and Butlers consistent.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from lsst.daf.butler import Butler

from multisite.config import load_campaign
from multisite.markers import read_marker

from .conftest import BIN, demo_config, snakemake, snakemake_command

SEED = int(os.environ.get("MULTISITE_FAULT_SEED", "20261202"))
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def multisite(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "multisite"), *args], capture_output=True, text=True, env=ENV)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_killed_after(directory: Path, seconds: float, *targets: str) -> bool:
    """Run the workflow and SIGKILL its process group after ``seconds``; return whether it was killed."""
    with open(directory / "snakemake.log", "a") as log:
        process = subprocess.Popen(
            snakemake_command(directory, "--rerun-incomplete", *targets),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
        try:
            process.wait(timeout=seconds)
            return False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            # A killed bps submit leaves its parsl workers for a while; let them go.
            time.sleep(5)
            snakemake(directory, "--unlock")
            return True


@pytest.fixture
def small_filesystem(tmp_path):
    """Mount a 12 MB tmpfs: room for lancs's repository and raws, not for its processing."""
    mount = tmp_path / "small"
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


def test_demo_survives_kills_a_damaged_raw_and_a_full_disk(tmp_path, small_filesystem):
    print(f"fault seed {SEED} (set MULTISITE_FAULT_SEED to replay)")
    rng = random.Random(SEED)
    config = demo_config(tmp_path)
    text = config.read_text().replace(
        str(tmp_path / "work" / "sites" / "lancs" / "repo"), str(small_filesystem / "lancs")
    )
    config.write_text(text)
    campaign = load_campaign(config)
    markers = campaign.layout.markers

    # 1. kill -9 at random moments while the sites are prepared and the raws travel.
    for _ in range(2):
        run_killed_after(
            tmp_path,
            rng.uniform(8, 40),
            *[
                str(campaign.layout.handoff_marker("raws", s.name).relative_to(tmp_path))
                for s in campaign.processing_sites
            ],
        )
    # The README's restart after a kill: the steps the kill interrupted are redone.
    snakemake(
        tmp_path,
        "--rerun-incomplete",
        *[
            str(campaign.layout.handoff_marker("raws", s.name).relative_to(tmp_path))
            for s in campaign.processing_sites
        ],
    )

    # 2. A raw damaged at ral after it arrived: verification names it, repair fixes it.
    ral = Butler.from_config(campaign.sites["ral"].repo)
    victim = ral.getURI(ral.query_datasets("raw", collections=campaign.handoff_chain("ral"), limit=1)[0])
    path = Path(victim.ospath)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    # 3. lancs's disk fills up before its processing.
    ballast = fill(small_filesystem, 256 * 1024)

    failed = snakemake(tmp_path, "--keep-going", check=False)
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert path.name in output and "multisite repair" in output, output[-5000:]
    assert "lancs" in output and ("free space" in output or "No space left" in output), output[-5000:]

    multisite("repair", str(config), "--site", "ral")
    ballast.unlink()
    multisite("orphans", str(config), "--site", "lancs", "--delete")
    # One more kill in the middle of the recovery run, then the documented restart.
    run_killed_after(tmp_path, rng.uniform(20, 90))
    snakemake(tmp_path, "--rerun-incomplete")

    qa = read_marker(markers / "qa" / "qa.json")
    assert all(set(counts) == {"pass"} for counts in qa["summary"].values()), qa["summary"]
    for site in campaign.sites.values():
        assert not duplicated(campaign, site.name), site.name
        orphans = multisite("orphans", str(config), "--site", site.name)
        assert "no orphan" in orphans.stdout.lower(), orphans.stdout
    assert multisite("check", str(config)).returncode == 0
