"""Benchmark: placement planning on a DR1-sized synthetic inventory.

Generates the inventory (240,000 visits x 189 LSSTCam detectors = 45 million raws,
8,000 tracts of 2.1 square degrees) and plans it for four sites (USDF 0.35, IN2P3
0.40, LANCS 0.10, RAL 0.15), then prints:

- inventory generation time and the inventory's memory;
- planning time (assignment, every site's manifest of raws, and the chunks
  the workflow would cut, of at most 100,000 quanta each estimated as the
  largest unit's raws) -- goal under 60 s -- and the process's peak memory
  (``ru_maxrss``, inventory included) -- goal under 4 GB;
- each site's share of the work against its target (goal within 2 points), its
  raws, bytes and estimated core-hours;
- the duplication factor (raw bytes shipped / unique raw bytes) of the planner,
  of each of its two paths, and of the two naive baselines (round-robin by tract
  id, contiguous blocks of tract ids).

Run: ``.venv/bin/python benchmarks/bench_planner.py [--scale 0.1]`` (``--scale``
multiplies the visit and tract counts; 0.1 and 0.01 give the growth).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from multisite.demo.synthetic import LSSTCAM_DETECTORS, scaled_dr1_inventory
from multisite.planner import make_plan, plan_chunks, write_plan

SHARES = {"usdf": 0.35, "in2p3": 0.40, "lancs": 0.10, "ral": 0.15}


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (``ru_maxrss`` is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of DR1's visits and tracts")
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument("--max-quanta", type=int, default=100_000, help="quantum cap of one workflow")
    parser.add_argument("--write", action="store_true", help="also time writing the plan and manifests")
    args = parser.parse_args()

    start = time.perf_counter()
    inventory, tracts = scaled_dr1_inventory(args.scale, seed=args.seed)
    generation_s = time.perf_counter() - start
    generation_peak = peak_rss_gb()

    start = time.perf_counter()
    plan = make_plan(inventory, tracts, SHARES)
    assignment_s = time.perf_counter() - start
    manifests = {site: plan.manifest(site) for site in plan.sites}
    chunks = plan_chunks(plan, max_quanta=args.max_quanta, quanta_per_unit=int(plan.unit_raws.max()))
    planning_s = time.perf_counter() - start
    planning_peak = peak_rss_gb()

    print(
        f"scale {args.scale:g}: {inventory.n_visits:,} visits x {LSSTCAM_DETECTORS} detectors = "
        f"{len(inventory):,} raws, "
        f"{tracts.n_tracts:,} tracts ({tracts.area / tracts.n_tracts:.2f} sq deg unique each, "
        f"footprint {tracts.area:,.0f} sq deg), {plan.units.n_units:,} units, {len(SHARES)} sites"
    )
    print(
        f"inventory generation:                      {generation_s:8.2f} s   "
        f"(inventory {inventory.nbytes / 1e9:.2f} GB in memory, {len(inventory.tract_sets):,} tract sets)"
    )
    print(f"planning (assignment only):                {assignment_s:8.2f} s")
    print(f"planning (assignment, manifests, chunks):  {planning_s:8.2f} s   (goal < 60 s)")
    print(
        f"peak memory (ru_maxrss, whole process):    {planning_peak:8.2f} GB  (goal < 4 GB; "
        f"{generation_peak:.2f} GB after generation)"
    )
    print(f"method: {plan.method}; raws shipped nowhere (off every tract): {plan.unneeded_raws:,}")
    print()
    print(
        f"{'site':8s} {'target':>7s} {'share':>7s} {'diff pp':>8s} {'units':>6s} {'raws':>12s} "
        f"{'TB':>9s} {'core-hours':>12s} {'manifest':>12s} {'chunks':>6s} {'max quanta':>10s}"
    )
    for row in plan.summary.itertuples():
        site_chunks = chunks[chunks.site == row.site].groupby("chunk").raws.sum()
        print(
            f"{row.site:8s} {row.target:7.3f} {row.share:7.3f} {row.share_minus_target_pp:+8.2f} "
            f"{row.units:6d} {row.raws:12,d} {row.bytes / 1e12:9.1f} {row.core_hours:12,.0f} "
            f"{len(manifests[row.site]):12,d} {len(site_chunks):6d} {site_chunks.max():10,d}"
        )
    print(
        f"{'total':8s} {'':7s} {'':7s} {'':8s} {plan.units.n_units:6d} {int(plan.site_raws.sum()):12,d} "
        f"{plan.shipped_bytes / 1e12:9.1f} {plan.site_core_hours.sum():12,.0f}"
    )
    print(f"largest share error: {100 * plan.max_share_error:.2f} points (goal < 2)")
    print()
    print(
        f"{'duplication factor (shipped / unique raw bytes)':52s} {'factor':>7s} {'max share err pp':>17s} "
        f"{'time s':>7s}"
    )
    rows = [(f"planner ({plan.method})", plan.duplication_factor, plan.max_share_error, assignment_s)]
    for label, kwargs in (
        ("planner, rings path only", {"order": "rings"}),
        ("planner, columns path only", {"order": "columns"}),
        ("baseline: round-robin by tract id", {"method": "round_robin"}),
        ("baseline: contiguous blocks of tract ids", {"method": "id_blocks"}),
    ):
        start = time.perf_counter()
        other = make_plan(inventory, tracts, SHARES, **kwargs)
        rows.append((label, other.duplication_factor, other.max_share_error, time.perf_counter() - start))
    for label, factor, error, seconds in rows:
        print(f"{label:52s} {factor:7.4f} {100 * error:17.2f} {seconds:7.2f}")
    print(
        f"unique raw bytes {plan.unique_bytes / 1e12:.1f} TB; "
        f"planner ships {plan.shipped_bytes / 1e12:.1f} TB"
    )

    if args.write:
        with tempfile.TemporaryDirectory(prefix="bench-planner-") as tmp:
            start = time.perf_counter()
            paths = write_plan(plan, Path(tmp))
            size = sum(p.stat().st_size for p in paths.values())
            print(f"writing the plan and manifests: {time.perf_counter() - start:.1f} s, {size / 1e6:.0f} MB")
    print(f"peak memory at the end (ru_maxrss): {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
