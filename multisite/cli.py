"""``multisite`` command: check a campaign config, show its status, write its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import CampaignConfigError, load_campaign
from .flow import handoffs, stage_chunks
from .markers import read_marker
from .report import render_report
from .status import campaign_status, format_status


def _summary(config: str) -> int:
    campaign = load_campaign(config)
    markers = campaign.markers
    print(f"Campaign {campaign.name}: central site {campaign.central.name}, markers in {markers}")
    for stage in campaign.stages:
        for site in campaign.stage_sites(stage):
            chunks = list(stage_chunks(campaign, site.name, stage))
            paths = [markers / "stage" / site.name / stage.name / f"{chunk}.json" for chunk in chunks]
            done = [read_marker(path) for path in paths if path.exists()]
            line = f"  {stage.name:8s} {site.name:8s} {len(done)}/{len(chunks)} chunks done"
            if done:
                quanta = sum(marker["quanta_run"] for marker in done)
                seconds = sum(marker["duration_s"] for marker in done)
                line += f"  ({quanta} quanta in their last runs, {seconds:.0f} s)"
            print(line)
    for handoff in handoffs(campaign):
        for site in campaign.processing_sites:
            path = markers / "handoff" / handoff.name / f"{site.name}.json"
            if path.exists():
                marker = read_marker(path)
                moved = sum(marker["datasets"].values())
                print(f"  {handoff.name:14s} {site.name:8s} {moved} datasets ({marker['backend']})")
            else:
                print(f"  {handoff.name:14s} {site.name:8s} not done")
    qa = markers / "qa" / "qa.json"
    print(f"  QA: {read_marker(qa)['summary']}" if qa.exists() else "  QA: not done")
    return 0


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = dict(value.split("=", 1) for value in values if "=" in value)
    if len(pairs) != len(values):
        raise SystemExit(f"--{what} takes NAME=VALUE, got {values}")
    return pairs


def _plan(args: argparse.Namespace) -> int:
    """Plan placement at scale and write the plan, the manifests and a units table for the config."""
    from .inventory import make_dr1_inventory, make_ring_tracts, read_visits_table
    from .planner import PlacementError, make_plan, make_units, write_plan

    try:
        shares = {site: float(value) for site, value in _pairs(args.share, "share").items()}
    except ValueError:
        raise SystemExit(f"--share takes SITE=FRACTION with a number, got {args.share}") from None
    if args.butler:
        from .butler_utils import open_butler
        from .source_inventory import inventory_from_butler, skymap_tracts

        if not (args.collection and args.instrument and args.skymap):
            raise SystemExit("--butler needs --collection, --instrument and --skymap")
        butler = open_butler(args.butler)
        tracts = skymap_tracts(butler, args.skymap)
        inventory = inventory_from_butler(butler, args.collection, args.instrument, args.skymap, tracts)
    elif args.visits_table:
        # Tracts in the DR1 ring geometry; a table with a `tract` column keeps its own assignment.
        tracts = make_ring_tracts()
        inventory = read_visits_table(args.visits_table, tracts)
    else:
        inventory, tracts = make_dr1_inventory(
            n_visits=max(1, round(240_000 * args.synthetic_dr1)),
            n_tracts=max(4, round(8_000 * args.synthetic_dr1)),
        )
    try:
        plan = make_plan(
            inventory,
            tracts,
            shares,
            units=make_units(tracts, args.tracts_per_unit),
            pins=_pairs(args.pin, "pin"),
        )
    except PlacementError as err:
        print(err, file=sys.stderr)
        return 2
    write_plan(plan, args.output)
    rows = ["unit\ttract\tpatch\tsite"]
    placement = plan.placement
    for site in plan.sites:
        for unit in plan.site_units(site):
            rows += [f"{unit}\t{tract}\t\t{site}" for tract in placement[placement["unit"] == unit]["tract"]]
    (args.output / "units.tsv").write_text("\n".join(rows) + "\n")
    print(plan.summary.to_string(index=False))
    print(f"duplication factor {plan.duplication_factor:.4f}; units table: {args.output / 'units.tsv'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``multisite`` command."""
    parser = argparse.ArgumentParser(prog="multisite", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    subs = {
        name: commands.add_parser(name, help=text)
        for name, text in [
            ("validate", "check a campaign config"),
            ("summary", "hand-offs and stages done, by the markers"),
            ("status", "the campaign grid: site and unit by stage, with what runs, waits or failed"),
            ("report", "write the static HTML campaign report"),
        ]
    }
    for sub in subs.values():
        sub.add_argument("config", type=Path, help="campaign config YAML")
    plan = commands.add_parser(
        "plan", help="place a large inventory on sites by target shares; write units.tsv"
    )
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--visits-table", type=Path, help="visit, detector, ra, dec, bytes (parquet or csv)")
    source.add_argument("--synthetic-dr1", type=float, metavar="SCALE", help="a synthetic DR1 inventory")
    source.add_argument("--butler", metavar="REPO", help="the raws of a source Butler repository")
    plan.add_argument("--collection", help="with --butler: the raws' collection")
    plan.add_argument("--instrument", help="with --butler: the instrument")
    plan.add_argument("--skymap", help="with --butler: the skymap whose tracts are the units")
    plan.add_argument(
        "--share", action="append", required=True, metavar="SITE=FRACTION", help="repeat per site"
    )
    plan.add_argument("--pin", action="append", default=[], metavar="UNIT=SITE", help="keep a unit at a site")
    plan.add_argument("--tracts-per-unit", type=int, default=1, help="group neighbouring tracts into units")
    plan.add_argument("-o", "--output", type=Path, required=True, help="directory for the plan and units.tsv")
    subs["status"].add_argument("--site", help="show one site's view only")
    subs["report"].add_argument("-o", "--output", type=Path, help="HTML file (default <workdir>/report.html)")
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    try:
        campaign = load_campaign(args.config)
        if args.command == "validate":
            print(f"{args.config}: valid; {len(campaign.sites)} sites, {len(campaign.units)} units")
            return 0
        if args.command == "status":
            print(format_status(campaign_status(campaign, site=args.site), campaign))
            return 0
        if args.command == "report":
            print(render_report(campaign, args.output or campaign.workdir / "report.html"))
            return 0
        return _summary(str(args.config))
    except CampaignConfigError as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
