"""Moving units between sites in a running campaign (``multisite move``).

A move changes the plan: the units table, the placement and the plan marker. Markers
mean what the plan says (``stage/ral/step1/c0000.json`` is ral's units of that chunk,
and a fan-in piece carries the data its site owns), so nothing that has left a site
may change: every hand-off piece whose content differs between the two plans must not
have begun (no marker, no attempt's log), except a raws piece that arrived with more
raws than its site now needs. What has begun keeps its meaning: a raw keeps its owner
while that site still needs it, so a fan-in already delivered is never sent again by
another site, and moved units go after the last unit of their new site, so its
earlier chunks keep their units.

A chunk whose content changes though it has begun (done or submitted at a site being
drained) is retired: its RUNs leave the chunk's chain for one under
``<root>/<site>/retired/<plan_version>/``, so no hand-off ever sends them, and its
markers, logs and BPS directories go under ``<workdir>/retired/<plan_version>/``;
nothing is deleted. A unit whose final products reached the central site stays where
it ran: there is nothing left to move.

What a moved unit needs then follows from the new plan: its raws go from the central
site (which holds them all) in new pieces, it runs in new chunks at its new site, and
the chunks it left are no longer part of the campaign.

A campaign run as site instances is moved at the central site's instance. What the
other instances have begun to send it sees in the transfer backend, and it publishes
the moved plan to them (`multisite.plan_channel`); each adopts it when it starts
(`adopt_published_plan`), retiring its own begun chunks the plan changes.
"""

from __future__ import annotations

__all__ = (
    "Move",
    "MoveRefused",
    "adopt_published_plan",
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

from .butler_utils import collection_exists, ensure_in_chain, open_butler
from .config import Campaign, Unit
from .errors import CampaignConfigError
from .flow import HandoffPiece, stage_chunks, workflow_pieces
from .handoff import make_backend
from .layout import Layout
from .lock import InstanceHold, live_steps
from .markers import read_marker, read_marker_if_written, write_marker
from .metadata import read_placement_share, read_plan_record
from .placement import SiteSelection, compute_placement, read_placement, write_plan
from .plan_channel import in_backend, newest_published_plan, plan_label, publish_plan, receive_plan
from .plan_version import check_plan_unchanged, plan_version, recorded_plan, recorded_units
from .sites import prepare_repo


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
    retired : `dict` [`tuple` [`str`, `str`, `str`], `str`]
        (site, stage, chunk) of the begun chunks whose content changes, to how they
        had begun: taken out of the campaign, their units run again.
    notes : `tuple` [`str`, ...]
        What the operator should know (the units table differed from the plan).
    published : `tuple` [`str`, ...]
        The plan's publications to other sites' instances sent now (``plan/<site>/<piece>``).
    """

    before: Campaign
    after: Campaign
    moves: dict[str, tuple[str, str]]
    stays: dict[str, str]
    placement: pd.DataFrame
    remade: list[tuple[str, str, str]]
    retired: dict[tuple[str, str, str], str] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()
    published: tuple[str, ...] = ()


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


def _begun_pieces(
    campaign: Campaign, sent: Callable[[HandoffPiece], bool] | None = None, site: str | None = None
) -> dict[tuple[str, str, str], tuple[HandoffPiece, str]]:
    """Return the hand-off pieces that have begun, by (hand-off, site, piece), each with how.

    Site instances see only their own markers: ``sent`` (`multisite.plan_channel.in_backend`)
    says whether the transfer backend holds a piece another instance sent, or one only
    attempted here (a receive that waited, a send refused) began to move. With
    ``site``, only the pieces to or from it.
    """
    begun = {}
    for piece in workflow_pieces(campaign):
        if site is not None and piece.site != site:
            continue
        how = _begun_piece(campaign.layout, piece)
        if sent is not None and how in (None, "attempted"):
            how = "sent (in the transfer backend)" if sent(piece) else None
        if how:
            begun[(piece.handoff.name, piece.site, piece.name)] = (piece, how)
    return begun


def _raws_delivered(piece: HandoffPiece, how: str) -> bool:
    """Whether a piece is raws that left the central site: more raws than its site needs stay unused."""
    return piece.handoff.name == "raws" and how in ("arrived", "sent")


def _units_delivered(begun: Mapping[tuple[str, str, str], tuple[HandoffPiece, str]]) -> dict[str, str]:
    """Return the units whose final products are at the central site, each with where that shows.

    Every site's final products travel in pieces of the ``final`` hand-off, the
    central site's own included; ``begun`` is `_begun_pieces`.
    """
    delivered = {}
    for piece, how in begun.values():
        if piece.handoff.name == "final" and how == "arrived":
            delivered |= dict.fromkeys(piece.units, f"delivered (hand-off {piece.label} arrived)")
    return delivered


def _units_held(begun: Mapping[tuple[str, str, str], tuple[HandoffPiece, str]]) -> dict[str, str]:
    """Return, for each unit that must stay at its site, why: a piece carrying it has begun.

    A unit stays once its data has begun to leave its site (a fan-in or final piece) or
    to come to it from the central site (a fan-out piece, or a raws piece on its way);
    raws that arrived or were sent to another instance, and chunks begun, do not hold
    it (a chunk is retired).
    Delivered units say so. ``begun`` is `_begun_pieces`.
    """
    held = _units_delivered(begun)
    for piece, how in begun.values():
        if not _raws_delivered(piece, how):
            for unit in piece.units:
                held.setdefault(unit, f"hand-off {piece.label}: {how}")
    return held


def drain(
    campaign: Campaign,
    site: str,
    to: list[str],
    sent: Callable[[HandoffPiece], bool] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Return the units of ``site`` that can leave it, each with its new site, and those that stay.

    A unit whose data has begun to leave ``site``, or to come to it from the central
    site beyond its raws, stays (`_units_held`); the others, their chunks begun or
    not, are shared among ``to`` in proportion to their ``cores`` (equal shares when a
    site gives none), in order. ``sent`` is `_begun_pieces`'.
    """
    held = _units_held(_begun_pieces(campaign, sent))
    weights = {name: float(campaign.sites[name].cores or 1) for name in to}
    given = dict.fromkeys(to, 0)
    destinations, stays = {}, {}
    for unit in campaign.units_of(site):
        if unit.name in held:
            stays[unit.name] = held[unit.name]
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
    sent: Callable[[HandoffPiece], bool] | None = None,
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
    sent : `~collections.abc.Callable`, optional
        Whether the transfer backend holds a piece, for site instances (`_begun_pieces`).

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
    begun_pieces = _begun_pieces(campaign, sent)
    delivered = _units_delivered(begun_pieces)
    stays = dict(stays or {}) | {name: delivered[name] for name in destinations if name in delivered}
    old_site = {unit.name: unit.site for unit in campaign.units}
    moves = {
        name: (old_site[name], site)
        for name, site in destinations.items()
        if old_site[name] != site and name not in delivered
    }
    if not moves:
        return Move(campaign, campaign, {}, stays, placement, [])
    after = _moved_campaign(campaign, {name: to for name, (_, to) in moves.items()})
    new_placement = place(after)

    # Only the sites whose units or placement rows change can see their chunks or pieces change.
    columns = ["exposure", "detector", "site", "owner", "unit"]
    rows = pd.concat([placement[columns], new_placement[columns]]).drop_duplicates(keep=False)
    touched = set(rows["site"]) | {site for pair in moves.values() for site in pair}
    remade, retired = _changes(campaign, after, placement, new_placement, touched, begun_pieces)
    return Move(campaign, after, moves, stays, new_placement, remade, retired)


def _changes(
    before: Campaign,
    after: Campaign,
    placement: pd.DataFrame,
    new_placement: pd.DataFrame,
    sites: set[str],
    begun_pieces: Mapping[tuple[str, str, str], tuple[HandoffPiece, str]],
) -> tuple[list[tuple[str, str, str]], dict[tuple[str, str, str], str]]:
    """Return the chunks at ``sites`` a new plan changes (made again), and those of them begun (retired).

    Raises
    ------
    MoveRefused
        Raised naming each hand-off piece at ``sites`` whose content changes though it
        has begun (``begun_pieces``, `_begun_pieces`), but raws more than their site needs.
    """
    before_contents = _contents(before, placement, sites)
    after_contents = _contents(after, new_placement, sites)
    changed = [key for key, content in before_contents.items() if after_contents.get(key) != content]
    refusals, retired = [], {}
    for key in changed:
        if key[0] == "chunk":
            if how := _begun_chunk(before.layout, *key[1:]):
                retired[key[1:]] = how
            continue
        if key[1:] not in begun_pieces:
            continue
        piece, how = begun_pieces[key[1:]]
        left = after_contents.get(key, ((),))[0]
        if _raws_delivered(piece, how) and set(left) <= set(piece.units):
            continue  # raws its site no longer needs: they stay in its repository, unused
        units = ", ".join(before_contents[key][0])
        refusals.append(f"hand-off {piece.label} (units {units}): {how}; the move would change what it holds")
    if refusals:
        raise MoveRefused(
            "the move changes data that has begun to move between sites:\n"
            + "\n".join(f"    {line}" for line in refusals)
            + "\n  Move only units none of whose data has left their site "
            "(`multisite move --from SITE --to ...` picks those)."
        )
    remade = sorted(
        (key[1], key[2], key[3])
        for key, content in after_contents.items()
        if key[0] == "chunk" and before_contents.get(key) != content
    )
    return remade, retired


def format_move(move: Move) -> str:
    """Return the move's preview: unit by unit what moves, what stays and why, what is made again."""
    lines = [*move.notes, f"Plan {plan_version(move.before)} -> {plan_version(move.after)}:"]
    for name, (old, new) in move.moves.items():
        lines.append(f"  move  {name}: {old} -> {new} (its raws go from {move.before.central.name})")
    for name, why in move.stays.items():
        lines.append(f"  stays {name}: {why}")
    if not move.moves:
        lines.append("  nothing to move")
    for (site, stage, chunk), how in move.retired.items():
        lines.append(
            f"  retire {stage} {chunk} at {site} ({how}): never sent; its RUNs go to "
            f"{_retired_chain(move.before, site, stage, chunk)}"
        )
    for site, stage, chunk in move.remade:
        lines.append(f"  new or changed chunk: {stage} {chunk} at {site}")
    for label in move.published:
        lines.append(f"  published {label}: that site's instance adopts the plan when it starts")
    kept = [u.name for u in move.before.units if u.name not in move.moves]
    lines.append(
        f"  kept where they are: {len(kept)} units; nothing that left its site is redone"
        + (", the retired chunks' units run again" if move.retired else "")
    )
    return "\n".join(lines)


def _retired_chain(campaign: Campaign, site: str, stage: str, chunk: str) -> str:
    """Return the CHAINED collection that keeps the RUNs of a chunk retired from ``campaign``'s plan."""
    return f"{campaign.root_collection}/{site}/retired/{plan_version(campaign)}/{stage}/{chunk}"


def _retire_chunk(campaign: Campaign, site: str, stage: str, chunk: str) -> None:
    """Take a begun chunk out of the campaign, deleting nothing.

    Its RUNs move from the chunk's chain (which the stage's chain and the hand-offs
    read) to `_retired_chain`; its marker, log, BPS directories and submit YAML, and
    the stage's marker at the site, go under ``<workdir>/retired/<plan_version>/``.
    Done again after an interruption, it finishes what is left.
    """
    chain = campaign.stage_chain(site, stage, chunk)
    with open_butler(campaign.sites[site].repo, writeable=True) as butler:
        if collection_exists(butler, chain):
            info = butler.collections.get_info(chain, include_parents=True)
            ensure_in_chain(butler, _retired_chain(campaign, site, stage, chunk), info.children)
            for parent in info.parents:
                butler.collections.remove_from_chain(parent, chain)
            butler.collections.x_remove(chain)
    layout = campaign.layout
    aside = layout.retired_dir(plan_version(campaign))
    for path in (
        layout.chunk_marker(site, stage, chunk),
        layout.stage_marker(site, stage),
        layout.chunk_log(site, stage, chunk),
        layout.qgraph_dir(site, stage, chunk),
        layout.submit_dir(site, stage, chunk),
        layout.submit_yaml(site, stage, chunk),
    ):
        if path.exists():
            target = aside / path.relative_to(layout.workdir)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)


def _comments_by_row(lines: list[str]) -> tuple[list[str], list[list[str]], list[str], list[str]]:
    """Return a units table's comments: lines before its header and before each row, inline, at the end.

    Blank and ``#`` lines before the header stay at the top; those between rows go
    with the row after them; a row's inline comment (from ``#``, after a space: a
    tab would make it a field) stays on its row.
    """
    top: list[str] = []
    before: list[list[str]] = []
    inline: list[str] = []
    pending: list[str] | None = None  # None until the header is read
    for line in lines:
        data, mark, comment = line.partition("#")
        if not data.strip():
            (top if pending is None else pending).append(line)
        elif pending is None:
            pending = []
        else:
            before.append(pending)
            inline.append(f" {mark}{comment}" if mark else "")
            pending = []
    return top, before, inline, pending or []


def _write_units_table(move: Move) -> None:
    """Rewrite the units table in the new plan's order, with its sites and moves.

    Other columns are kept, and so are its comments (`_comments_by_row`): a row's go
    with it to its new place.
    """
    path = move.before.units_table
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    top, before, inline, end = _comments_by_row(path.read_text().splitlines())
    order = {unit.name: index for index, unit in enumerate(move.after.units)}
    names = table["unit"].str.strip()
    table["site"] = names.map({unit.name: unit.site for unit in move.after.units})
    table["move"] = names.map({unit.name: str(unit.move) if unit.move else "" for unit in move.after.units})
    header, *rows = table.to_csv(sep="\t", index=False).splitlines()
    lines = [*top, header]
    for row in sorted(range(len(rows)), key=lambda row: order[names.iloc[row]]):
        lines += [*before[row], rows[row] + inline[row]]
    temporary = path.with_name(f".{path.name}.move")
    temporary.write_text("\n".join([*lines, *end]) + "\n")
    os.replace(temporary, path)


def recorded_placement(campaign: Campaign) -> pd.DataFrame:
    """Return the placement table of the campaign's recorded plan (kept aside by a move begun on it)."""
    layout = campaign.layout
    kept = layout.replaced_placement_table(plan_version(campaign))
    return read_placement(kept if kept.is_file() else layout.placement_table)


def apply_move(move: Move, adopted: str | None = None) -> None:
    """Write the moved plan; the plan marker last, so that a move cut short is done again whole.

    The placement table of the plan it replaces is kept aside (what the same move, run
    again after an interruption, starts from). The retired chunks are taken out of the
    campaign (`_retire_chunk`), and the submit YAMLs of the chunks made again removed,
    so the workflow writes them for the new plan; the units table, the placement and
    the plan marker (with the move's record) follow. Until the marker
    is written, the workflow refuses to run (`multisite.plan_version.check_plan_unchanged`
    finds the move in progress).

    ``adopted`` names the published plan (``plan/<site>/<piece>``) a site's instance
    adopts (`multisite.plan_channel.adopt_published_plan`): its placement is its site's
    share, and an adoption cut short is done again when the instance starts again.
    """
    layout = move.before.layout
    moving = {"units": {name: list(pair) for name, pair in move.moves.items()}}
    write_marker(layout.move_in_progress, moving | ({"adopting": adopted} if adopted else {}))
    kept = layout.replaced_placement_table(plan_version(move.before))
    if layout.placement_table.is_file() and not kept.is_file():
        temporary = kept.with_name(f".{kept.name}.copy")
        shutil.copyfile(layout.placement_table, temporary)
        os.replace(temporary, kept)
    for site, stage, chunk in move.retired:
        _retire_chunk(move.before, site, stage, chunk)
    for site, stage, chunk in move.remade:
        layout.submit_yaml(site, stage, chunk).unlink(missing_ok=True)
    _write_units_table(move)
    marker = read_marker_if_written(layout.placement_marker)
    record = write_plan(
        move.after,
        move.placement,
        [move.after.sites[move.after.instance]] if adopted else move.after.processing_sites,
        layout.placement_table,
        layout.placement_summary,
    )
    history = [
        *marker.get("moves", []),
        {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "from_version": plan_version(move.before),
            "units": {name: list(pair) for name, pair in move.moves.items()},
            "retired": [list(key) for key in move.retired],
            "remade": [list(key) for key in move.remade],
            **({"adopted": adopted} if adopted else {}),
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
        Raised, with nothing written, for a campaign with no plan yet or at a site
        instance other than the central site's, a running workflow or job (a live
        heartbeat), unknown units or sites, or a move that would change work that has
        begun.
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
    # The plan marker names the site of the instance that runs the work directory.
    marker = read_marker(layout.placement_marker)
    if "instance" not in marker and (layout.markers / "sent").exists():
        raise MoveRefused(
            f"{config}: this work directory sends to other site instances, and its plan marker "
            f"{layout.placement_marker} was made before plan markers named their instance: add "
            f'"instance": "<this instance\'s site>" to it, then move again'
        )
    campaign = dataclasses.replace(campaign, instance=marker.get("instance"))
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
    sent = None
    if campaign.instance is not None:
        if not campaign.runs_here(campaign.central.name):
            raise MoveRefused(
                f"{config}: a move is made at the central site's instance ({campaign.central.name}); "
                f"{campaign.instance}'s instance learns the moved plan when it starts"
            )
        sent = in_backend(campaign)
    if from_site is not None:
        if from_site not in campaign.sites or from_site in to:
            raise MoveRefused(f"--from {from_site}: name a site of the campaign that is not in --to")
        destinations, stays = drain(campaign, from_site, to, sent)
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
        _refuse_while_steps_run(layout, config)
        move = plan_move(campaign, destinations, placement, place, stays, sent)
        move = dataclasses.replace(move, notes=notes)
        if not dry_run:
            if move.moves:
                apply_move(move)
            if campaign.instance is not None and any(unit.move for unit in move.after.units):
                # Also a plan whose publication an outage cut short.
                move = dataclasses.replace(move, published=tuple(publish_plan(move.after)))
    finally:
        hold.release()
    return move


def _refuse_while_steps_run(layout: Layout, where: str) -> None:
    """Refuse to change the plan while a job of the work directory runs, its workflow gone or not.

    The batch job of a rule that is not local (a hand-off, an input check) outlives
    the Snakemake that submitted it, and would end by writing its marker under the
    new plan. (A stage's BPS workflow is not such a job: its rule is local.)
    """
    if live := live_steps(layout.heartbeats):
        raise MoveRefused(
            f"{where}: jobs of {layout.workdir} still run, their heartbeats fresh (a batch job goes on "
            "after the workflow that submitted it was killed): "
            + "; ".join(f"heartbeats/{step}: {owner}" for step, owner in live)
            + ". Wait for them to end, or cancel them (scancel, condor_rm), then move again."
        )


def adopt_published_plan(campaign: Campaign) -> Move | None:
    """Adopt the newest plan the central site's instance published for this site's instance, if newer.

    What the plan changes at this site is done as a move does it (`apply_move`): its
    begun chunks the plan changes are retired, the submit YAMLs of changed chunks
    removed, and its units table, placement share and plan marker written. Run at the
    instance's start, before any job.

    Returns
    -------
    move : `Move` or `None`
        What changed here, `None` when the instance runs the newest plan (or is the
        central site's, or the only one).

    Raises
    ------
    MoveRefused
        Raised when a piece this site has begun to send would change (the central
        site moved units whose data had left this site), naming it, or while a job
        of this instance still runs (a live heartbeat).
    CampaignConfigError
        Raised when the published plan and this instance's config differ in more
        than their units' sites and order.
    """
    site = campaign.instance
    if site is None or campaign.runs_here(campaign.central.name):
        return None
    backend = make_backend(campaign)
    before = recorded_plan(campaign) or campaign
    newest = newest_published_plan(campaign, backend)
    if newest is None or newest[1] == plan_version(before):
        return None
    piece, version = newest
    _refuse_while_steps_run(campaign.layout, f"instance {site}")
    if not campaign.layout.repo_marker(site).exists():
        prepare_repo(campaign, site)  # an instance that had not begun: the plan arrives in its repository
    receive_plan(campaign, piece, backend)
    record = read_plan_record(campaign, site, piece)
    after = dataclasses.replace(before, units=recorded_units(record["plan"]))
    if plan_version(after) != version:
        raise CampaignConfigError(
            f"instance {site}",
            [
                f"plan {piece} published by {campaign.central.name}'s instance differs from this instance's "
                "config in more than its units' sites: give this instance the central site's stages and "
                "units table, then run it again"
            ],
        )
    placement = recorded_placement(before) if campaign.layout.placement_table.is_file() else None
    share = read_placement_share(after, site)
    remade, retired = [], {}
    if placement is not None:
        begun = _begun_pieces(before, in_backend(campaign, backend), site)
        remade, retired = _changes(before, after, placement, share, {site}, begun)
    old_sites = {unit.name: unit.site for unit in before.units}
    moves = {u.name: (old_sites[u.name], u.site) for u in after.units if old_sites.get(u.name) != u.site}
    move = Move(before, after, moves, {}, share, remade, retired)
    apply_move(move, adopted=plan_label(site, piece))
    return move
