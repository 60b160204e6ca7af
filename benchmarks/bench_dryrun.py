"""Benchmark: ``snakemake -n`` of a whole data-release campaign, at DR1 size and below.

Plans a DR1-sized synthetic inventory (240,000 visits x 189 detectors, 8,000 tracts,
four sites with USDF 0.35, IN2P3 0.40, LANCS 0.10, RAL 0.15) with the planner,
writes the units table (one unit per tract, in each site's contiguous order) and a
campaign config with drp_pipe's stages, each split into chunks of at most 100,000
estimated quanta, then times Snakemake's dry run of the whole campaign and counts
its jobs and its hand-off pieces by kind (``multisite.flow.workflow_pieces``, checked
against the dry run's ``handoff`` jobs), for each ``--chunks-per-handoff`` (default 1
and 2: a piece per chunk, and per two chunks). ``--scale`` runs 1/10 and 1/100 of the
size, for the growth. ``--sites`` times the preview of each named site's instance too
(``--config site=<site>``, what ``snakemake --profile <site> -n`` plans).

Run: ``make bench-dryrun`` (or ``.venv/bin/python benchmarks/bench_dryrun.py --scale 1 0.1 0.01``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from multisite.config import load_campaign
from multisite.demo.synthetic import scaled_dr1_inventory
from multisite.flow import workflow_pieces
from multisite.planner import make_plan

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHARES = {"usdf": 0.35, "in2p3": 0.40, "lancs": 0.10, "ral": 0.15}
COMPUTE_SITES = {"usdf": "SLAC", "in2p3": "CC-IN2P3", "lancs": "LANCS", "ral": "RAL"}
# The facilities' capacities of the design documents (as in config/config.yaml), for `multisite forecast`:
# cores, and each site's link to USDF in MB/s (Rucio: "several hundred MB/s for large moves").
CORES = {"usdf": 6000, "in2p3": 3000, "lancs": 1000, "ral": 3000}
WAN_MB_PER_S = {"in2p3": 300, "lancs": 300, "ral": 300}

# drp_pipe's LSSTCam steps with estimated quanta per tract at DR1 density
# (about 5,700 detector-visits, 30 visits and 100 patches x 6 bands per tract).
STAGES = [
    ("step1", "site", 5_700),
    ("step2a", "site", 30),
    ("step2b", "site", 1),
    ("step2c", "central", 1),
    ("step2d", "site", 5_700),
    ("step2e", "central", 1),
    ("step3", "site", 600),
    ("step4", "site", 5_700),
    ("step7", "central", 1),
]


def write_campaign(directory: Path, scale: float, chunks_per_handoff: list[int]) -> tuple[list[Path], int]:
    """Plan a campaign at ``scale`` of DR1; write its units table and a config per hand-off cut."""
    plan = make_plan(*scaled_dr1_inventory(scale), SHARES)
    plan.campaign_units.to_csv(directory / "units.tsv", sep="\t", index=False)
    config = {
        "campaign": "dr1",
        "instrument": "LSSTCam",
        "pipeline": "${DRP_PIPE_DIR}/pipelines/LSSTCam/DRP.yaml",
        "workdir": str(directory / "work"),
        "units": str(directory / "units.tsv"),
        "skymap": "lsst_cells_v1",
        "collections": {"raw": "LSSTCam/raw/all", "root": "LSSTCam/runs/DR1"},
        "max_quanta": 100_000,
        "stages": [
            {"name": name, "subset": name, "location": location, "quanta_per_unit": quanta}
            for name, location, quanta in STAGES
        ],
        "bps": {"wmsServiceClass": "lsst.ctrl.bps.panda.PanDAService"},
        "sites": {
            site: {
                "role": "central" if site == "usdf" else "remote",
                "repo": f"/repo/{site}",
                "bps": {"computeSite": compute, "computeCloud": "US" if site == "usdf" else "EU"},
                "cores": CORES[site],
                **({"wan_mb_per_s": WAN_MB_PER_S[site]} if site in WAN_MB_PER_S else {}),
            }
            for site, compute in COMPUTE_SITES.items()
        },
    }
    paths = []
    for chunks in chunks_per_handoff:
        config["transfer"] = {"chunks_per_handoff": chunks}
        paths.append(directory / f"config-{chunks}.yaml")
        paths[-1].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths, plan.units.n_units


def dry_run(directory: Path, config: Path, site: str | None = None) -> tuple[float, dict[str, int]]:
    """Time ``snakemake -n`` of the whole campaign (or of ``site``'s instance).

    Return the seconds and the job count by rule (and total).
    """
    command = [
        str(BIN / "snakemake"),
        "-n",
        "--quiet",
        "rules",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(directory),
        "--configfile",
        str(config),
        "--cores",
        "2",
        *(["--config", f"site={site}"] if site else []),
    ]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    counts = re.findall(r"^(\w+)\s+(\d+)$", result.stdout + result.stderr, re.MULTILINE)
    return seconds, {rule: int(count) for rule, count in counts}


def pieces_by_kind(config: Path) -> dict[str, int]:
    """Return the campaign's hand-off pieces by kind (raws, fanin, fanout, final)."""
    pieces = workflow_pieces(load_campaign(config))
    return dict(collections.Counter(piece.handoff.name.split("_")[0] for piece in pieces))


def main() -> None:
    """Run the benchmark at each requested scale and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    parser.add_argument(
        "--chunks-per-handoff", type=int, nargs="+", default=[1, 2], help="transfer.chunks_per_handoff values"
    )
    parser.add_argument("--sites", nargs="*", default=["usdf", "in2p3"], help="site instances to preview too")
    args = parser.parse_args()
    header = f"{'scale':>6s} {'units':>7s} {'chunks/piece':>12s} {'instance':>8s} {'jobs':>7s} {'-n (s)':>7s}"
    print(f"{header}  hand-off pieces by kind")
    for scale in args.scale:
        with tempfile.TemporaryDirectory(prefix="bench-dryrun-") as tmp:
            directory = Path(tmp)
            configs, n_units = write_campaign(directory, scale, args.chunks_per_handoff)
            for chunks, config in zip(args.chunks_per_handoff, configs, strict=True):
                seconds, jobs = dry_run(directory, config)
                kinds = pieces_by_kind(config)
                if sum(kinds.values()) != jobs.get("handoff"):
                    raise SystemExit(f"the dry run plans {jobs.get('handoff')} hand-offs, the flow {kinds}")
                pieces = ", ".join(f"{kind} {count}" for kind, count in kinds.items())
                row = f"{scale:6g} {n_units:7d} {chunks:12d}"
                print(f"{row} {'all':>8s} {jobs['total']:7d} {seconds:7.1f}  {pieces}")
                for site in args.sites:
                    seconds, jobs = dry_run(directory, config, site)
                    print(f"{row} {site:>8s} {jobs['total']:7d} {seconds:7.1f}")


if __name__ == "__main__":
    main()
