"""Moving units between sites in a running campaign (``multisite move``).

A move changes the plan: the units table, the placement and the plan marker. Markers
mean what the plan says (``stage/ral/step1/c0000.json`` is ral's units of that chunk,
and a fan-in piece carries the data its site owns), so a move may change nothing that
has begun: every chunk and hand-off piece whose content differs between the two plans
must not have started (no marker, no submission, no attempt's log). What has begun
keeps its meaning: a raw keeps its owner while that site still needs it, so a fan-in
already delivered is never sent again by another site, and moved units go after the
last unit of their new site, so its earlier chunks keep their units.

What a moved unit needs then follows from the new plan: its raws go from the central
site (which holds them all) in new pieces, it runs in new chunks at its new site, and
the chunks it left are no longer part of the campaign.
"""

from __future__ import annotations

__all__ = (
    "Move",
    "MoveRefused",
    "apply_move",
    "drain",
    "format_move",
    "move_units",
    "plan_move",
    "recorded_placement",
)

import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd

from .butler_utils import open_butler
from .config import Campaign, Unit
from .flow import HandoffPiece, stage_chunks, workflow_pieces
from .layout import Layout
from .lock import InstanceHold
from .markers import read_marker, write_marker
from .placement import SiteSelection, compute_placement, read_placement, write_plan
from .plan_version import check_plan_unchanged, plan_version, recorded_plan


class MoveRefused(ValueError):
    """A move that would change what has begun, or that names what does not exist."""


@dataclass(frozen=True)
class Move:
    """A move of units, checked against what has begun.

    Attributes
    ----------
    before, after : `Campaign`
        The campaign with its recorded plan, and with the units moved.
    moves : `dict` [`str`, `tuple` [`str`, `str`]]
        Unit name to (old site, new site).
    stays : `dict` [`str`, `str`]
        Units a drain leaves where they are, and why.
    placement : `pandas.DataFrame`
        The new placement table.
    remade : `list` [`tuple` [`str`, `str`, `str`]]
        (site, stage, chunk) of the chunks whose units or data change: their BPS
        submit YAMLs are made again.
    notes : `tuple` [`str`, ...]
        What the operator should know (the units table differed from the plan).
    """

    before: Campaign
    after: Campaign
    moves: dict[str, tuple[str, str]]
    stays: dict[str, str]
    placement: pd.DataFrame
    remade: list[tuple[str, str, str]]
    notes: tuple[str, ...] = ()


def _begun_chunk(layout: Layout, site: str, stage: str, chunk: str) -> str | None:
    """Return how a chunk has begun (done, submitted, planned), or `None` if it has not."""
    if layout.chunk_marker(site, stage, chunk).exists():
        return "done"
    if layout.qgraph_dir(site, stage, chunk).exists() or layout.submit_dir(site, stage, chunk).exists():
        return "submitted to BPS"
    return None


def _begun_piece(layout: Layout, piece: HandoffPiece) -> str | None:
    """Return how a hand-off piece has begun (arrived, sent, attempted), or `None` if it has not."""
    h, s, p = piece.handoff.name, piece.site, piece.name
    if layout.piece_marker(piece).exists():
        return "arrived"
    if layout.piece_marker(piece, sent=True).exists():
        return "sent"
    if layout.handoff_log(h, s, p).exists() or layout.send_log(h, s, p).exists():
        return "attempted"
    return None


def _moved_campaign(campaign: Campaign, destinations: Mapping[str, str]) -> Campaign:
    """Return the campaign with units moved, each after the last unit of its new site.

    Moved units carry the move's number, so they never share a chunk with the units
    their new site had (`multisite.flow.chunk_units`).
    """
    number = 1 + max(unit.move for unit in campaign.units)
    kept = [unit for unit in campaign.units if unit.name not in destinations]
    moved = [
        dataclasses.replace(u, site=destinations[u.name], move=number)
        for u in campaign.units
        if u.name in destinations
    ]
    units: list[Unit] = []
    for unit in kept:
        units.append(unit)
        if unit is [u for u in kept if u.site == unit.site][-1]:
            units += [u for u in moved if u.site == unit.site]
    units += [u for u in moved if u not in units]  # to a site with no units yet
    return dataclasses.replace(campaign, units=tuple(units))


def _units_begun(campaign: Campaign) -> dict[str, str]:
    """Return, for each unit with something begun at its site, what (a chunk or a raws piece)."""
    layout, begun = campaign.layout, {}
    for stage in campaign.stages:
        if stage.is_central:
            continue
        for site in campaign.stage_sites(stage):
            for chunk, units in stage_chunks(campaign, site.name, stage).items():
                if how := _begun_chunk(layout, site.name, stage.name, chunk):
                    for unit in units:
                        begun.setdefault(unit, f"{stage.name} {chunk} at {site.name}: {how}")
    for piece in workflow_pieces(campaign):
        if piece.handoff.name == "raws" and (how := _begun_piece(layout, piece)):
            for unit in piece.units:
                begun.setdefault(unit, f"hand-off {piece.label}: {how}")
    return begun


def drain(campaign: Campaign, site: str, to: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Return the units of ``site`` that can leave it, each with its new site, and those that stay.

    A unit whose work at ``site`` has begun stays; the others are shared among ``to``
    in proportion to their ``cores`` (equal shares when a site gives none), in order.
    """
    begun = _units_begun(campaign)
    weights = {name: float(campaign.sites[name].cores or 1) for name in to}
    given = dict.fromkeys(to, 0)
    destinations, stays = {}, {}
    for unit in campaign.units_of(site):
        if unit.name in begun:
            stays[unit.name] = begun[unit.name]
            continue
        target = min(to, key=lambda name: ((given[name] + 1) / weights[name], to.index(name)))
        given[target] += 1
        destinations[unit.name] = target
    return destinations, stays


def _contents(campaign: Campaign, placement: pd.DataFrame, sites: set[str]) -> dict[tuple, object]:
    """Return what each chunk and hand-off piece at ``sites`` holds, by key, for comparing plans."""
    selections: dict[tuple[str, tuple[str, ...]], SiteSelection] = {}

    def selection(site: str, units: tuple[str, ...]) -> tuple[tuple[str, ...], SiteSelection]:
        if (site, units) not in selections:
            selections[(site, units)] = SiteSelection.from_placement(campaign, placement, site, units)
        return units, selections[(site, units)]

    contents: dict[tuple, object] = {}
    for stage in campaign.stages:
        for site in campaign.stage_sites(stage):
            if stage.is_central or site.name not in sites:
                continue
            for chunk, units in stage_chunks(campaign, site.name, stage).items():
                contents[("chunk", site.name, stage.name, chunk)] = selection(site.name, units)
    for piece in workflow_pieces(campaign):
        if piece.site in sites:
            contents[("piece", piece.handoff.name, piece.site, piece.name)] = selection(
                piece.site, piece.units
            )
    return contents


def plan_move(
    campaign: Campaign,
    destinations: Mapping[str, str],
    placement: pd.DataFrame,
    place: Callable[[Campaign], pd.DataFrame],
    stays: Mapping[str, str] | None = None,
) -> Move:
    """Check a move of units against what has begun, and return it.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign, its units as its recorded plan has them.
    destinations : `~collections.abc.Mapping` [`str`, `str`]
        Unit name to its new site.
    placement : `pandas.DataFrame`
        The placement table the campaign runs with.
    place : `~collections.abc.Callable`
        Returns the placement of the campaign with its units moved
        (`multisite.placement.compute_placement` with ``previous=placement``).
    stays : `~collections.abc.Mapping` [`str`, `str`], optional
        Units a drain leaves where they are, and why (for the preview).

    Raises
    ------
    MoveRefused
        Raised naming each unknown unit or site, and each chunk or piece the move
        would change though it has begun.
    """
    known = {unit.name for unit in campaign.units}
    problems = [f"unit {name!r} is not in the units table" for name in destinations if name not in known]
    problems += [
        f"site {site!r} is not in the config; add its block (and profile) first, then move units to it"
        for site in sorted(set(destinations.values()) - set(campaign.sites))
    ]
    if problems:
        raise MoveRefused("\n".join(problems))
    old_site = {unit.name: unit.site for unit in campaign.units}
    moves = {name: (old_site[name], site) for name, site in destinations.items() if old_site[name] != site}
    after = _moved_campaign(campaign, {name: to for name, (_, to) in moves.items()})
    new_placement = place(after)

    # Only the sites whose units or placement rows change can see their chunks or pieces change.
    columns = ["exposure", "detector", "site", "owner", "unit"]
    rows = pd.concat([placement[columns], new_placement[columns]]).drop_duplicates(keep=False)
    touched = set(rows["site"]) | {site for pair in moves.values() for site in pair}
    before_contents = _contents(campaign, placement, touched)
    after_contents = _contents(after, new_placement, touched)
    changed = [key for key, content in before_contents.items() if after_contents.get(key) != content]
    layout = campaign.layout
    pieces = {("piece", p.handoff.name, p.site, p.name): p for p in workflow_pieces(campaign)}
    begun = []
    for key in changed:
        if key[0] == "chunk":
            _, site, stage, chunk = key
            how, what = _begun_chunk(layout, site, stage, chunk), f"{stage} {chunk} at {site}"
        else:
            piece = pieces[key]
            how, what = _begun_piece(layout, piece), f"hand-off {piece.label}"
        if how:
            units = ", ".join(before_contents[key][0])
            begun.append(f"{what} (units {units}): {how}; the move would change what it holds")
    if begun:
        raise MoveRefused(
            "the move changes work that has begun:\n"
            + "\n".join(f"    {line}" for line in begun)
            + "\n  Move only units none of whose chunks or raws pieces has begun at their site "
            "(`multisite move --from SITE --to ...` picks those)."
        )
    remade = sorted(
        (key[1], key[2], key[3])
        for key, content in after_contents.items()
        if key[0] == "chunk" and before_contents.get(key) != content
    )
    return Move(campaign, after, moves, dict(stays or {}), new_placement, remade)


def format_move(move: Move) -> str:
    """Return the move's preview: unit by unit what moves, what stays and why, what is made again."""
    lines = [*move.notes, f"Plan {plan_version(move.before)} -> {plan_version(move.after)}:"]
    for name, (old, new) in move.moves.items():
        lines.append(f"  move  {name}: {old} -> {new} (its raws go from {move.before.central.name})")
    for name, why in move.stays.items():
        lines.append(f"  stays {name}: {why}")
    if not move.moves:
        lines.append("  nothing to move")
    for site, stage, chunk in move.remade:
        lines.append(f"  new or changed chunk: {stage} {chunk} at {site}")
    kept = [u.name for u in move.before.units if u.name not in move.moves]
    lines.append(f"  kept where they are: {len(kept)} units; nothing begun is redone")
    return "\n".join(lines)


def _write_units_table(move: Move) -> None:
    """Rewrite the units table in the new plan's order, with its sites and moves (other columns kept)."""
    path = move.before.units_table
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    order = {unit.name: index for index, unit in enumerate(move.after.units)}
    names = table["unit"].str.strip()
    table["site"] = names.map({unit.name: unit.site for unit in move.after.units})
    table["move"] = names.map({unit.name: str(unit.move) if unit.move else "" for unit in move.after.units})
    table = table.iloc[sorted(range(len(table)), key=lambda row: order[table["unit"].iloc[row].strip()])]
    temporary = path.with_name(f".{path.name}.move")
    table.to_csv(temporary, sep="\t", index=False)
    os.replace(temporary, path)


def recorded_placement(campaign: Campaign) -> pd.DataFrame:
    """Return the placement table of the campaign's recorded plan (kept aside by a move begun on it)."""
    layout = campaign.layout
    kept = layout.replaced_placement_table(plan_version(campaign))
    return read_placement(kept if kept.is_file() else layout.placement_table)


def apply_move(move: Move) -> None:
    """Write the moved plan; the plan marker last, so that a move cut short is done again whole.

    The placement table of the plan it replaces is kept aside (what the same move, run
    again after an interruption, starts from). The submit YAMLs of the chunks made again
    are removed first, so the workflow writes them for the new plan; the units table,
    the placement and the plan marker (with the move's record) follow. Until the marker
    is written, the workflow refuses to run (`multisite.plan_version.check_plan_unchanged`
    finds the move in progress).
    """
    layout = move.before.layout
    write_marker(layout.move_in_progress, {"units": {name: list(pair) for name, pair in move.moves.items()}})
    kept = layout.replaced_placement_table(plan_version(move.before))
    if not kept.is_file():
        temporary = kept.with_name(f".{kept.name}.copy")
        shutil.copyfile(layout.placement_table, temporary)
        os.replace(temporary, kept)
    for site, stage, chunk in move.remade:
        layout.submit_yaml(site, stage, chunk).unlink(missing_ok=True)
    _write_units_table(move)
    marker = read_marker(layout.placement_marker)
    record = write_plan(
        move.after,
        move.placement,
        move.after.processing_sites,
        layout.placement_table,
        layout.placement_summary,
    )
    history = [
        *marker.get("moves", []),
        {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "from_version": plan_version(move.before),
            "units": {name: list(pair) for name, pair in move.moves.items()},
        },
    ]
    write_marker(layout.placement_marker, marker | record | {"moves": history})
    layout.move_in_progress.unlink()


def move_units(
    campaign: Campaign,
    config: str,
    *,
    units: list[str] | None = None,
    to: list[str],
    from_site: str | None = None,
    dry_run: bool = False,
) -> Move:
    """Move ``units`` (or drain ``from_site``) to ``to`` in a running campaign: ``multisite move``.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign; the move starts from the units its plan marker records.
    config : `str`
        The campaign config (named in messages).
    units : `list` [`str`], optional
        Units to move, all to the one site of ``to``.
    to : `list` [`str`]
        The new site, or the sites a drain shares the units among.
    from_site : `str`, optional
        The site to drain (instead of ``units``): its units none of whose work has begun.
    dry_run : `bool`
        Check and return the move without writing anything.

    Raises
    ------
    MoveRefused
        Raised, with nothing written, for a campaign with no plan yet or run as site
        instances, a running workflow, unknown units or sites, or a move that would
        change work that has begun.
    PlanChangedError
        Raised when the units table has other units or cells than the recorded plan
        (one that differs only in its units' sites is rewritten from the plan).
    """
    layout = campaign.layout
    if not layout.placement_marker.is_file():
        raise MoveRefused(
            f"{config}: the campaign has no plan yet ({layout.placement_marker}); change its units table "
            "instead, moves are for a campaign that has begun"
        )
    recorded = recorded_plan(campaign)
    if recorded is None:
        check_plan_unchanged(campaign, config)  # other units or fields: no move, refused
        recorded = campaign
    notes = ()
    if recorded.units != campaign.units:
        notes = (
            f"The units table {campaign.units_table} differs from the plan the campaign runs in its "
            "units' sites (an interrupted move, or an edit): this move starts from the plan and "
            "rewrites the table.",
        )
    campaign = recorded
    if (layout.markers / "sent").exists():
        raise MoveRefused(
            f"{config}: this campaign runs as site instances ({layout.markers / 'sent'}); moving units "
            "between site instances is not supported yet"
        )
    if from_site is not None:
        if from_site not in campaign.sites or from_site in to:
            raise MoveRefused(f"--from {from_site}: name a site of the campaign that is not in --to")
        destinations, stays = drain(campaign, from_site, to)
    elif len(to) != 1 or not units:
        raise MoveRefused("--unit U... --to SITE moves units to one site; --from SITE --to A,B drains a site")
    else:
        destinations, stays = dict.fromkeys(units, to[0]), {}
    placement = recorded_placement(campaign)
    sizes = placement.drop_duplicates(["exposure", "detector"]).set_index(["exposure", "detector"])["bytes"]

    def place(after: Campaign) -> pd.DataFrame:
        with open_butler(campaign.central.repo) as butler:
            moved = compute_placement(butler, after, previous=placement)
        keys = pd.MultiIndex.from_frame(moved[["exposure", "detector"]])
        return moved.assign(bytes=sizes.reindex(keys).to_numpy())

    hold = InstanceHold(layout.instance_lock, config)
    hold.acquire("move")  # a running workflow holds it: refused
    try:
        move = dataclasses.replace(plan_move(campaign, destinations, placement, place, stays), notes=notes)
        if move.moves and not dry_run:
            apply_move(move)
    finally:
        hold.release()
    return move
