"""``multisite`` command: check a campaign config, show its status, write its report."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Campaign, load_campaign
from .errors import CampaignConfigError, InventoryError, PlacementError, PlanInputError
from .eta import estimate_completion, format_completion
from .flow import stage_chunks, workflow_pieces
from .markers import read_marker
from .report import render_report
from .status import campaign_events, campaign_status, format_status
from .validate import validate_campaign

if TYPE_CHECKING:
    from lsst.daf.butler import Butler

    from .geometry import TractGeometry
    from .inventory import Inventory


def _summary(config: str) -> int:
    campaign = load_campaign(config)
    layout = campaign.layout
    print(f"Campaign {campaign.name}: central site {campaign.central.name}, markers in {layout.markers}")
    for stage in campaign.stages:
        for site in campaign.stage_sites(stage):
            chunks = list(stage_chunks(campaign, site.name, stage))
            paths = [layout.chunk_marker(site.name, stage.name, chunk) for chunk in chunks]
            done = [read_marker(path) for path in paths if path.exists()]
            line = f"  {stage.name:8s} {site.name:8s} {len(done)}/{len(chunks)} chunks done"
            if done:
                quanta = sum(marker["quanta_run"] for marker in done)
                seconds = sum(marker["duration_s"] for marker in done)
                line += f"  ({quanta} quanta in their last runs, {seconds:.0f} s)"
            print(line)
    for piece in workflow_pieces(campaign):
        path = layout.piece_marker(piece)
        where = f"  {piece.handoff.name:14s} {piece.site:8s} {piece.name:10s}"
        if path.exists():
            marker = read_marker(path)
            print(f"{where} {sum(marker['datasets'].values())} datasets ({marker['backend']})")
        else:
            print(f"{where} not done")
    qa = layout.qa_marker
    print(f"  QA: {read_marker(qa)['summary']}" if qa.exists() else "  QA: not done")
    return 0


def _unlock(campaign: Campaign, config: Path) -> int:
    """Clear the hold a killed or lost instance left on the campaign work directory."""
    from .lock import HoldRefused, InstanceHold

    try:
        holder = InstanceHold(campaign.layout.instance_lock, config).clear()
    except HoldRefused as err:
        print(err, file=sys.stderr)
        return 1
    if holder is None:
        print(f"{campaign.workdir}: no instance holds it; nothing to clear")
    else:
        print(f"{campaign.workdir}: cleared the hold of {holder}; the next snakemake run takes it")
    return 0


def _move(campaign: Campaign, args: argparse.Namespace) -> int:
    """Move units, or drain a site, in a running campaign; print the move unit by unit."""
    from .lock import HoldRefused
    from .move import MoveRefused, format_move, move_units

    try:
        move = move_units(
            campaign,
            str(args.config),
            units=args.unit,
            to=[site.strip() for site in args.to.split(",") if site.strip()],
            from_site=args.from_site,
            dry_run=args.dry_run,
        )
    except (MoveRefused, HoldRefused) as err:
        print(f"Nothing was moved: {err}", file=sys.stderr)
        return 1
    print(format_move(move))
    if move.moves and args.dry_run:
        print("Preview only: nothing written.")
    elif move.moves:
        profile = f" --profile {move.after.instance}" if move.after.instance else ""
        print(
            f"Written: {campaign.units_table} and the plan. Go on: snakemake{profile} -n, then "
            f"snakemake{profile}."
            + (" Each other site's instance adopts the plan when it starts." if move.published else "")
        )
    return 0


def _add_move_parser(commands: argparse._SubParsersAction) -> None:
    move = commands.add_parser(
        "move",
        help="move units to another site, or drain a site, in a running campaign "
        "(units whose data has not left their site; begun chunks are retired)",
    )
    move.add_argument("config", type=Path, help="campaign config YAML")
    which = move.add_mutually_exclusive_group(required=True)
    which.add_argument("--unit", nargs="+", help="the units to move (to the one site of --to)")
    which.add_argument(
        "--from",
        dest="from_site",
        metavar="SITE",
        help="drain SITE: move its units whose data has not left it",
    )
    move.add_argument("--to", required=True, help="the new site; for --from, SITE,SITE,... shared by cores")
    move.add_argument("-n", "--dry-run", action="store_true", help="print the move, write nothing")


def _pairs(values: list[str], option: str, form: str) -> dict[str, str]:
    """Parse the values of a repeated ``option`` of the ``form`` ``KEY=VALUE``, each key once."""
    pairs: dict[str, str] = {}
    for value in values:
        key, equals, item = value.partition("=")
        if not (equals and key and item):
            raise PlanInputError(f"{option}: {value!r} is not {form}; give {option} {form}")
        if key in pairs:
            raise PlanInputError(f"{option}: {key!r} is given twice; give it once")
        pairs[key] = item
    return pairs


def _shares(values: list[str]) -> dict[str, float]:
    """Return the site shares of the ``--share`` options."""
    from .planner import SITE_NAME, SITE_NAME_RULE

    shares = {}
    for site, value in _pairs(values, "--share", "SITE=FRACTION").items():
        if not SITE_NAME.fullmatch(site):
            raise PlanInputError(
                f"--share: site name {site!r} is not a plain name; name it with {SITE_NAME_RULE}"
            )
        try:
            shares[site] = float(value)
        except ValueError:
            raise PlanInputError(
                f"--share: {site}={value} has no number; give SITE=FRACTION, e.g. {site}=0.35"
            ) from None
    return shares


def _open_source_butler(repo: str) -> Butler:
    """Open the ``--butler`` repository."""
    from .butler_utils import open_butler

    try:
        return open_butler(repo)
    except FileNotFoundError as err:
        raise PlanInputError(f"--butler: {err}") from None


def _plan_inputs(args: argparse.Namespace) -> tuple[Inventory, TractGeometry]:
    """Return the inventory and the tract geometry the ``plan`` options name."""
    from .geometry import tracts_from_raws
    from .inventory import read_visits_table
    from .source_inventory import inventory_from_butler, skymap_tracts

    if args.synthetic_dr1 is not None:
        from .demo.synthetic import scaled_dr1_inventory

        if args.butler or args.skymap or args.collection or args.instrument:
            raise PlanInputError(
                "--synthetic-dr1 makes its own raws and tracts; leave out --butler, --collection, "
                "--instrument and --skymap"
            )
        try:
            return scaled_dr1_inventory(args.synthetic_dr1)
        except InventoryError as err:
            raise PlanInputError(f"--synthetic-dr1: {err}") from None
    if args.visits_table is not None:
        if args.collection or args.instrument:
            raise PlanInputError(
                "--collection and --instrument choose raws in --butler; with --visits-table the raws are "
                "the table's: leave them out"
            )
        if bool(args.butler) != bool(args.skymap):
            raise PlanInputError(
                "with --visits-table, --butler REPO and --skymap NAME go together (the tracts of a "
                "skymap registered there); without both, the tracts' centres come from the table's raws"
            )
        inventory = read_visits_table(args.visits_table)
        if args.butler:
            return inventory, skymap_tracts(_open_source_butler(args.butler), args.skymap)
        return inventory, tracts_from_raws(inventory)
    if not args.butler:
        raise PlanInputError(
            "no raws: give --visits-table TABLE, --butler REPO (with --collection, --instrument and "
            "--skymap) or --synthetic-dr1 SCALE"
        )
    if not (args.collection and args.instrument and args.skymap):
        raise PlanInputError("--butler needs --collection, --instrument and --skymap to read the raws")
    butler = _open_source_butler(args.butler)
    tracts = skymap_tracts(butler, args.skymap)
    return inventory_from_butler(butler, args.collection, args.instrument, args.skymap), tracts


def _plan(args: argparse.Namespace) -> int:
    """Assign units to sites at scale; write the assignment, the manifests and the config's units table."""
    from .planner import check_sites, make_plan, make_units, write_plan

    try:
        shares = _shares(args.share)
        pins = _pairs(args.pin, "--pin", "UNIT=SITE")
        check_sites(shares, pins)
        inventory, tracts = _plan_inputs(args)
        plan = make_plan(inventory, tracts, shares, units=make_units(tracts, args.tracts_per_unit), pins=pins)
    except (PlanInputError, InventoryError, PlacementError) as err:
        print(err, file=sys.stderr)
        return 2
    try:
        paths = write_plan(plan, args.output)
    except OSError as err:
        print(f"-o {args.output}: cannot write the plan there ({err}); give a directory", file=sys.stderr)
        return 2
    print(plan.summary.to_string(index=False))
    print(f"duplication factor {plan.duplication_factor:.4f}; units table: {paths['units']}")
    return 0


def _add_plan_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``plan`` subcommand and its options."""
    plan = commands.add_parser(
        "plan", help="assign a large inventory's units to sites by target shares; write units.tsv"
    )
    source = plan.add_mutually_exclusive_group()
    source.add_argument(
        "--visits-table",
        type=Path,
        help="visit, detector, ra, dec, bytes, tract: one row per raw and tract (parquet, csv or tsv)",
    )
    source.add_argument("--synthetic-dr1", type=float, metavar="SCALE", help="a synthetic DR1 inventory")
    plan.add_argument(
        "--butler",
        metavar="REPO",
        help="a source Butler: its raws (with --collection, --instrument, --skymap), or with --visits-table "
        "the tracts of --skymap",
    )
    plan.add_argument("--collection", help="with --butler: the raws' collection")
    plan.add_argument("--instrument", help="with --butler: the instrument")
    plan.add_argument("--skymap", help="with --butler: the skymap whose tracts are the units")
    plan.add_argument(
        "--share", action="append", required=True, metavar="SITE=FRACTION", help="repeat per site"
    )
    plan.add_argument("--pin", action="append", default=[], metavar="UNIT=SITE", help="keep a unit at a site")
    plan.add_argument("--tracts-per-unit", type=int, default=1, help="group neighbouring tracts into units")
    plan.add_argument("-o", "--output", type=Path, required=True, help="directory for the plan and units.tsv")


def _repair(campaign: Campaign, site: str) -> int:
    """Fetch the damaged or missing files a site received again from their source, and verify them."""
    import logging

    from .errors import HandoffError
    from .handoff import make_backend, repair_site

    if _unknown_site(campaign, site):
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("multisite").setLevel(logging.INFO)
    try:
        outcomes = repair_site(campaign, site, make_backend(campaign))
    except HandoffError as err:
        print(f"repair {site}: {err}", file=sys.stderr)
        return 1
    for outcome in outcomes:
        line = f"  {outcome['handoff']:24s} from {outcome['source']:8s} {outcome['state']}"
        if outcome["files"]:
            line += f": {outcome['files']} files checked"
        if outcome["repaired"]:
            line += f", {len(outcome['repaired'])} fetched again and verified"
        print(line)
        for name in outcome["repaired"]:
            print(f"      {name}")
    repaired = sum(len(outcome["repaired"]) for outcome in outcomes)
    print(f"{site}: {repaired} file(s) repaired; rerun the workflow to go on (nothing is imported twice)")
    return 0


def _unknown_site(campaign: Campaign, site: str | None) -> bool:
    """Whether ``--site`` names a site the campaign does not have (then say so on stderr)."""
    if site is None:
        return False
    try:
        campaign.require_site(site)
    except ValueError as err:
        print(err, file=sys.stderr)
        return True
    return False


def _consistency(campaign: Campaign, args: argparse.Namespace) -> int:
    """``check``: markers against the Butlers (1 when inconsistent); ``orphans``: files no registry knows."""
    from .consistency import check_campaign, find_orphans, format_check, format_orphans
    from .errors import HandoffError

    if _unknown_site(campaign, args.site):
        return 2
    if args.command == "check":
        report = check_campaign(campaign, site=args.site)
        print(format_check(report, campaign))
        return 0 if report.consistent else 1
    try:
        print(format_orphans(find_orphans(campaign, args.site, delete=args.delete), args.config))
    except HandoffError as err:
        print(f"orphans {args.site}: {err}", file=sys.stderr)
        return 1
    return 0


def _add_forecast_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``forecast`` subcommand and its options."""
    forecast = commands.add_parser(
        "forecast",
        help="simulate the campaign on the sites' cores and links: when each stage and hand-off runs, "
        "the makespan against its lower bound, per-chunk and per-site hand-offs",
    )
    forecast.add_argument("config", type=Path, help="campaign config YAML")
    forecast.add_argument(
        "--flow",
        choices=("per_chunk", "per_site", "both"),
        default="both",
        help="hand-offs cut along chunks (the workflow's), one per site, or both and the gain (default)",
    )
    forecast.add_argument(
        "--chunks-per-handoff",
        type=int,
        metavar="N",
        help="chunks in one hand-off of the per-chunk flow "
        "(default the config's transfer.chunks_per_handoff, else 1)",
    )
    forecast.add_argument("--svg", type=Path, metavar="PATH", help="also write the timeline (Gantt SVG) here")


def _forecast(campaign: Campaign, args: argparse.Namespace) -> int:
    """Forecast the campaign in one flow or both; print the timeline table, the figures and the gain."""
    from .forecast import ForecastError, forecast_campaign, format_forecast, format_gain, timeline_svg

    if args.chunks_per_handoff is not None and args.chunks_per_handoff < 1:
        print(
            f"--chunks-per-handoff: {args.chunks_per_handoff} is below 1; "
            "give 1 (a hand-off per chunk) or more",
            file=sys.stderr,
        )
        return 2
    flows = ("per_chunk", "per_site") if args.flow == "both" else (args.flow,)
    try:
        forecasts = [forecast_campaign(campaign, flow, args.chunks_per_handoff) for flow in flows]
    except ForecastError as err:
        print(f"{args.config}: {err}", file=sys.stderr)
        return 2
    print(
        f"Forecast of campaign {campaign.name}: {len(campaign.units)} units, {len(forecasts[0].sites)} sites"
    )
    for forecast in forecasts:
        print(format_forecast(forecast))
    if len(forecasts) == 2:
        print(format_gain(*forecasts))
    if args.svg:
        try:
            args.svg.write_text(timeline_svg(forecasts))
        except OSError as err:
            print(
                f"--svg {args.svg}: cannot write the timeline there ({err}); give a writable file",
                file=sys.stderr,
            )
            return 2
        print(f"timeline: {args.svg}")
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
            ("unlock", "clear the hold of an instance that no longer runs on the campaign work directory"),
            ("check", "compare the markers with what the Butlers hold; print what to redo and how"),
            ("orphans", "list, or --delete, a site's datastore files that no registry row refers to"),
        ]
    }
    for sub in subs.values():
        sub.add_argument("config", type=Path, help="campaign config YAML")
    _add_plan_parser(commands)
    _add_forecast_parser(commands)
    _add_move_parser(commands)
    repair = commands.add_parser(
        "repair",
        help="fetch the damaged or missing files a site received again from their source; verify them",
    )
    repair.add_argument("config", type=Path, help="campaign config YAML")
    repair.add_argument("--site", required=True, help="the site whose received files to repair")
    subs["status"].add_argument("--site", help="show one site's view only")
    subs["check"].add_argument("--site", help="check one site's stages and hand-offs only")
    subs["orphans"].add_argument("--site", required=True, help="the site whose datastore to look at")
    subs["orphans"].add_argument(
        "--delete",
        action="store_true",
        help="delete them (never a file the registry knows, nor a hand-off export)",
    )
    subs["report"].add_argument("-o", "--output", type=Path, help="HTML file (default <workdir>/report.html)")
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    try:
        if args.command == "validate":
            # Every check the workflow makes before its first job (the same function).
            campaign = validate_campaign(args.config)
            print(f"{args.config}: valid; {len(campaign.sites)} sites, {len(campaign.units)} units")
            return 0
        campaign = load_campaign(args.config)
        if args.command == "forecast":
            return _forecast(campaign, args)
        if args.command == "repair":
            return _repair(campaign, args.site)
        if args.command == "move":
            return _move(campaign, args)
        if args.command in ("check", "orphans"):
            return _consistency(campaign, args)
        if args.command == "status":
            if _unknown_site(campaign, args.site):
                return 2
            events = campaign_events(campaign)
            cells = campaign_status(campaign, events, site=args.site)
            print(format_status(cells, campaign))
            completion = estimate_completion(cells, events, datetime.now(UTC))
            print(format_completion(completion, campaign=args.site is None))
            return 0
        if args.command == "report":
            print(render_report(campaign, args.output or campaign.layout.report))
            return 0
        if args.command == "unlock":
            return _unlock(campaign, args.config)
        return _summary(str(args.config))
    except CampaignConfigError as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
