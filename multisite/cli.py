"""``multisite`` command: check a campaign config, show its status, write its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import CampaignConfigError, load_campaign
from .flow import handoffs
from .markers import read_marker
from .report import render_report
from .status import campaign_status, format_status


def _summary(config: str) -> int:
    campaign = load_campaign(config)
    markers = campaign.markers
    print(f"Campaign {campaign.name}: central site {campaign.central.name}, markers in {markers}")
    for stage in campaign.stages:
        for site in campaign.stage_sites(stage):
            units = ["global"] if stage.is_central else [u.name for u in campaign.units_of(site.name)]
            done = [u for u in units if (markers / "stage" / site.name / stage.name / f"{u}.json").exists()]
            line = f"  {stage.name:8s} {site.name:8s} {len(done)}/{len(units)} units done"
            if done:
                marker = read_marker(markers / "stage" / site.name / stage.name / f"{done[0]}.json")
                line += f"  ({marker['quanta_run']} quanta in last run, {marker['duration_s']:.0f} s)"
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
    subs["status"].add_argument("--site", help="show one site's view only")
    subs["report"].add_argument("-o", "--output", type=Path, help="HTML file (default <workdir>/report.html)")
    args = parser.parse_args(argv)
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
