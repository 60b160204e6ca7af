"""Benchmark: the demo campaign against a single-site ``pipetask run`` of the same pipeline.

Prints the campaign's wall time from an empty directory (four sites, every
hand-off, BPS at every site, the reference and QA), the wall time of one
``pipetask run`` of the whole pipeline on the same data in one repository, their
ratio, and how many Butler/BPS command invocations and Python-API rule processes
the campaign made.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/bench_demo.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lsst.daf.butler import Butler, Config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from multisite.config import load_campaign  # noqa: E402
from multisite.demo.survey import SurveySpec, make_survey  # noqa: E402
from multisite.placement import units_query  # noqa: E402
from tests.demo_config import relocate_config  # noqa: E402

BIN = Path(sys.executable).parent
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def run_campaign(directory: Path) -> tuple[float, str]:
    """Run the demo campaign from scratch; return its wall time and Snakemake's log."""
    relocate_config(REPO / "config" / "config.yaml", directory, base=REPO)
    command = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(directory),
        "--configfile",
        str(directory / "config.yaml"),
        "--cores",
        "2",
    ]
    start = time.perf_counter()
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, result.stderr + result.stdout


def run_single_site(directory: Path) -> float:
    """Time one ``pipetask run`` of the whole pipeline on the same survey in one repository."""
    campaign = load_campaign(relocate_config(REPO / "config" / "config.yaml", directory, base=REPO))
    repo = str(directory / "single")
    Butler.makeRepo(repo, config=Config(campaign.repo_seed))
    with Butler.from_config(repo, writeable=True) as butler:
        make_survey(butler, SurveySpec(), campaign.raw_collection, "truth")
    where = units_query(campaign, [cell for u in campaign.units for cell in u.cells])
    command = [
        "pipetask",
        "run",
        "-b",
        repo,
        "-p",
        campaign.pipeline,
        "-i",
        campaign.raw_collection,
        "-o",
        "single",
        "-d",
        where,
        "--register-dataset-types",
        "-j",
        "1",
    ]
    start = time.perf_counter()
    subprocess.run(command, env=ENV, capture_output=True, check=True)
    return time.perf_counter() - start


def count_invocations(work: Path, log: str) -> dict[str, int]:
    """Count the middleware commands and rule processes the campaign ran."""
    submit = work / "submit"
    return {
        "bps submit": len(list((work / "qgraph").rglob("*.bps.log"))),
        "pipetask/butler commands run by BPS jobs": len(list(submit.rglob("*.stdout"))),
        "pipetask run (reference)": 1,
        "rule processes using the Butler Python API": log.count("Finished jobid") - 1,
    }


def main() -> None:
    """Run the benchmark and print its figures."""
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        tmp = Path(tmp)
        (tmp / "campaign").mkdir()
        (tmp / "single").mkdir()
        campaign_s, log = run_campaign(tmp / "campaign")
        single_s = run_single_site(tmp / "single")
        counts = count_invocations(tmp / "campaign" / "work", log)
    print(f"demo campaign, 4 sites, from scratch (snakemake --cores 2): {campaign_s:7.1f} s")
    print(f"single-site pipetask run, same pipeline and data:             {single_s:7.1f} s")
    print(f"ratio campaign / single-site:                                 {campaign_s / single_s:7.1f}")
    for name, count in counts.items():
        print(f"{name + ':':61s}{count:7d}")


if __name__ == "__main__":
    main()
