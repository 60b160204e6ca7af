"""Benchmark: the forecast of a whole DR1 campaign, per-chunk against per-site hand-offs.

Builds the DR1 campaign of ``bench_dryrun`` (a synthetic inventory of 240,000 visits x
189 detectors, 8,000 tracts, the planner's placement on usdf 0.35, in2p3 0.40, lancs
0.10, ral 0.15, drp_pipe's nine stages chunked under 100,000 quanta, the facilities'
cores and links), weighs each unit from the plan (`multisite.forecast.unit_work_from_plan`:
its raws, raw bytes and core-hours, 40M core-hours in all) and simulates the campaign in
both flows. Prints the makespans, the lower bound and both ratios (goal: per-chunk within
1.15 of the bound), the hand-offs by kind, the largest hand-off in files and bytes, and
how long the planning and each forecast took.

Run: ``make bench-forecast`` (or ``.venv/bin/python benchmarks/bench_forecast.py --svg dr1.svg``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dryrun  # noqa: E402

from multisite.config import load_campaign  # noqa: E402
from multisite.forecast import (  # noqa: E402
    Forecast,
    forecast_campaign,
    format_gain,
    timeline_svg,
    unit_work_from_plan,
)
from multisite.planner import Plan  # noqa: E402

GOAL = 1.15


def plan_campaign(directory: Path, scale: float) -> tuple[Path, Plan]:
    """Write the campaign with ``bench_dryrun.write_campaign``; return its config and the plan it made.

    ``write_campaign`` keeps its plan to itself; planning again would double the
    benchmark's time, so its call to the planner is watched instead.
    """
    made: list[Plan] = []
    planner = bench_dryrun.make_plan

    def keep(*args, **kwargs) -> Plan:
        made.append(planner(*args, **kwargs))
        return made[-1]

    bench_dryrun.make_plan = keep
    try:
        (config,), _ = bench_dryrun.write_campaign(directory, scale, [1])
    finally:
        bench_dryrun.make_plan = planner
    return config, made[0]


def _size(value: float) -> str:
    return f"{value / 1e12:,.1f} TB"


def _describe(forecast: Forecast, seconds: float) -> list[str]:
    largest_bytes, largest_files = forecast.largest_by_bytes, forecast.largest_by_files
    largest_raws = max((t for t in forecast.tasks if t.kind == "raws"), key=lambda t: t.bytes)
    return [
        f"{forecast.flow} flow: makespan {forecast.makespan / 24:.1f} d, lower bound "
        f"{forecast.lower_bound / 24:.1f} d, ratio {forecast.ratio:.3f} "
        f"({'within' if forecast.ratio <= GOAL else 'NOT within'} {GOAL}); forecast in {seconds:.2f} s",
        "  hand-offs: "
        + ", ".join(
            f"{name} {n} ({forecast.transfer_counts.get(name, 0)} between sites)"
            for name, n in forecast.handoff_counts.items()
        ),
        f"  largest hand-off by bytes: {largest_bytes.name} to/from {largest_bytes.site} "
        f"({largest_bytes.files:,} files, {_size(largest_bytes.bytes)})",
        f"  largest hand-off by files: {largest_files.name} to/from {largest_files.site} "
        f"({largest_files.files:,} files, {_size(largest_files.bytes)})",
        f"  largest raws hand-off: to {largest_raws.site} ({largest_raws.files:,} files, "
        f"{_size(largest_raws.bytes)})",
    ]


def main() -> None:
    """Plan the DR1 campaign, forecast it in both flows and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of DR1 (default 1)")
    parser.add_argument("--chunks-per-handoff", type=int, default=1, help="per-chunk flow's coarsening")
    parser.add_argument("--svg", type=Path, help="also write both timelines to this SVG file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-forecast-") as tmp:
        start = time.perf_counter()
        config, plan = plan_campaign(Path(tmp), args.scale)
        campaign = load_campaign(config)
        work = unit_work_from_plan(plan)
        planning = time.perf_counter() - start
    print(
        f"DR1 x {args.scale:g}: {len(campaign.units):,} units at {len(campaign.processing_sites)} sites, "
        f"{work['raws'].sum() / 1e6:.1f}M raws shipped ({work['bytes'].sum() / 1e15:.2f} PB), "
        f"{work['core_hours'].sum() / 1e6:.1f}M core-hours; planned in {planning:.1f} s"
    )
    for site in campaign.processing_sites:
        units = [unit.name for unit in campaign.units_of(site.name)]
        print(
            f"  {site.name:6s} {len(units):5d} units, {work.loc[units, 'core_hours'].sum() / 1e6:5.1f}M "
            f"core-hours on {site.cores:,} cores, {_size(work.loc[units, 'bytes'].sum())} of raws"
            + (f" over {site.wan_mb_per_s:g} MB/s" if site.wan_mb_per_s else "")
        )
    forecasts = {}
    for flow in ("per_chunk", "per_site"):
        start = time.perf_counter()
        forecasts[flow] = forecast_campaign(
            campaign, flow, chunks_per_handoff=args.chunks_per_handoff, unit_work=work
        )
        seconds = time.perf_counter() - start
        print("\n".join(_describe(forecasts[flow], seconds)))
    print(f"bottleneck: {forecasts['per_chunk'].bottleneck}")
    print(format_gain(forecasts["per_chunk"], forecasts["per_site"]))
    if args.svg:
        args.svg.write_text(timeline_svg([forecasts["per_chunk"], forecasts["per_site"]]))
        print(f"timeline: {args.svg}")


if __name__ == "__main__":
    main()
