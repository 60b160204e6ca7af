"""The campaign's flow: which stage runs where, and the hand-offs between sites.

The shape follows from the stage locations alone (no pipeline import), so the
Snakemake DAG and its dry run are cheap; which dataset types each hand-off moves
follows from the pipeline (`multisite.pipeline`).

Hand-offs, named as in marker paths:

- ``raws``: the pipeline's overall inputs, central site -> each processing site;
- ``fanin_<stage>``: before a central stage, each processing site -> central site;
- ``fanout_<stage>``: before a site stage that follows a central stage,
  central site -> each processing site;
- ``final``: the products of the last stages, each processing site -> central site.
"""

from __future__ import annotations

__all__ = (
    "CENTRAL_CHUNK",
    "WHOLE_SITE",
    "Handoff",
    "HandoffPiece",
    "chunk_units",
    "cut_pieces",
    "handoffs",
    "stage_chunks",
    "stage_dependencies",
    "workflow_pieces",
)

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .config import Campaign, Stage

CENTRAL_CHUNK = "global"
"""The one chunk of a central stage: all units at once."""

WHOLE_SITE = "all"
"""The one piece of a hand-off that moves a site's share at once."""

TO_SITES = "to_sites"
TO_CENTRAL = "to_central"


@dataclass(frozen=True)
class Handoff:
    """One kind of data movement between the central site and the processing sites.

    Attributes
    ----------
    name : `str`
        ``raws``, ``fanin_<stage>``, ``fanout_<stage>`` or ``final``.
    direction : `str`
        ``to_sites`` (central -> each site) or ``to_central`` (each site -> central).
    producers : `tuple` [`str`, ...]
        Stages whose outputs move (empty for ``raws``: the raw collection moves).
    consumers : `tuple` [`str`, ...]
        Stages that read what arrives (empty for ``final``).
    """

    name: str
    direction: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]

    @property
    def to_central(self) -> bool:
        return self.direction == TO_CENTRAL

    @property
    def cut_stage(self) -> str:
        """The stage whose chunks this hand-off is cut along: the one it comes from, or feeds."""
        return self.producers[-1] if self.to_central else self.consumers[0]

    def ends(self, campaign: Campaign, site: str) -> tuple[str, str]:
        """Return the sending and the receiving site of this hand-off for processing site ``site``."""
        central = campaign.central.name
        return (site, central) if self.to_central else (central, site)


@dataclass(frozen=True)
class HandoffPiece:
    """One piece of a hand-off for one processing site: the data of some chunks of its cut stage.

    Attributes
    ----------
    handoff : `Handoff`
        The hand-off.
    site : `str`
        The processing site at the far end from the central site.
    name : `str`
        The piece's name: its chunk's, ``<first>..<last>`` of several chunks, or
        `WHOLE_SITE` for the site's whole share.
    chunks : `tuple` [`str`, ...]
        The chunks of the cut stage at ``site`` whose data it moves.
    units : `tuple` [`str`, ...]
        Their units, in order.
    """

    handoff: Handoff
    site: str
    name: str
    chunks: tuple[str, ...]
    units: tuple[str, ...]

    @property
    def label(self) -> str:
        """``<handoff>/<site>/<piece>``: the piece's name in file names, Rucio names and messages."""
        return f"{self.handoff.name}/{self.site}/{self.name}"


def handoffs(campaign: Campaign) -> list[Handoff]:
    """Return every hand-off of the campaign, in the order they happen.

    A run of consecutive central stages gets one fan-in before it; the site stages
    after it (up to the next central stage) get one fan-out before them.
    """
    stages = campaign.stages
    site_stages = tuple(s.name for s in stages if not s.is_central)
    result = [Handoff("raws", TO_SITES, (), site_stages)]
    index = 1
    while index < len(stages):
        run_end = index
        while run_end < len(stages) and stages[run_end].is_central == stages[index].is_central:
            run_end += 1
        run = tuple(s.name for s in stages[index:run_end])
        earlier = stages[:index]
        if stages[index].is_central:
            producers = tuple(s.name for s in earlier if not s.is_central)
            result.append(Handoff(f"fanin_{run[0]}", TO_CENTRAL, producers, run))
        elif any(s.is_central for s in earlier):
            producers = tuple(s.name for s in earlier if s.is_central)
            result.append(Handoff(f"fanout_{run[0]}", TO_SITES, producers, run))
        index = run_end
    result.append(Handoff("final", TO_CENTRAL, site_stages, ()))
    return result


def stage_dependencies(campaign: Campaign, stage: Stage) -> tuple[list[str], list[Handoff]]:
    """Return what a stage waits for at the site that runs it.

    Returns
    -------
    stages : `list` [`str`]
        Earlier stages that run at the same site (or centrally, for a central stage).
    incoming : `list` [`Handoff`]
        Hand-offs that deliver this stage's inputs (``raws`` included for site stages).
    """
    index = campaign.stages.index(stage)
    same_place = [s.name for s in campaign.stages[:index] if s.is_central == stage.is_central]
    incoming = [h for h in handoffs(campaign) if stage.name in h.consumers]
    return same_place, incoming


def stage_chunks(campaign: Campaign, site: str, stage: Stage) -> dict[str, tuple[str, ...]]:
    """Split a stage's units at a site into chunks, one BPS workflow each.

    A chunk takes ``units_per_chunk`` consecutive units of the site, or as many
    as keep its estimated quanta (``quanta_per_unit`` each) under the campaign's
    ``max_quanta``. Chunks are named after their unit when each holds one unit
    (the demo's per-patch markers), ``c0000``, ``c0001``, ... otherwise.

    Returns
    -------
    chunks : `dict` [`str`, `tuple` [`str`, ...]]
        Chunk name to unit names, in order (``global`` with all units for a central stage).
    """
    if stage.is_central:
        return {CENTRAL_CHUNK: tuple(u.name for u in campaign.units)}
    units = campaign.units_of(site)
    return chunk_units(
        [u.name for u in units],
        max_quanta=campaign.max_quanta,
        quanta_per_unit=stage.quanta_per_unit,
        units_per_chunk=stage.units_per_chunk,
        moves=[u.move for u in units],
    )


def chunk_units(
    units: Sequence[str],
    *,
    max_quanta: int,
    quanta_per_unit: int,
    units_per_chunk: int | None = None,
    moves: Sequence[int] | None = None,
) -> dict[str, tuple[str, ...]]:
    """Split a site's ordered units into chunks of consecutive units, one BPS workflow each.

    The one chunking rule of the campaign: `stage_chunks` applies it to a
    stage's units at a site, the planner (`multisite.planner.plan_chunks`) to
    the units it assigns.

    Parameters
    ----------
    units : `~collections.abc.Sequence` [`str`]
        The site's units, in order.
    max_quanta : `int`
        Largest quantum graph of one workflow.
    quanta_per_unit : `int`
        Estimated quanta of one unit: a chunk holds ``max_quanta // quanta_per_unit``
        units (at least one).
    units_per_chunk : `int`, optional
        Units of a chunk, when given instead of the estimate.
    moves : `~collections.abc.Sequence` [`int`], optional
        The move that brought each unit to the site (0: the first plan). A chunk
        holds units of one move, so units moved in keep the site's chunks as they were.

    Returns
    -------
    chunks : `dict` [`str`, `tuple` [`str`, ...]]
        Chunk name to unit names, in order: a chunk is named after its unit when
        each chunk holds one unit (the demo's per-patch markers), ``c0000``,
        ``c0001``, ... otherwise.
    """
    per_chunk = units_per_chunk or max(1, max_quanta // quanta_per_unit)
    groups = []
    for _, run in itertools.groupby(zip(units, moves or [0] * len(units), strict=True), key=lambda u: u[1]):
        names = [name for name, _ in run]
        groups += [tuple(names[i : i + per_chunk]) for i in range(0, len(names), per_chunk)]
    if per_chunk == 1:
        return {group[0]: group for group in groups}
    return {f"c{index:04d}": group for index, group in enumerate(groups)}


def cut_pieces(
    campaign: Campaign, handoff: Handoff, site: str, chunks_per_piece: int | None
) -> list[HandoffPiece]:
    """Cut a hand-off for a site along the chunks of its cut stage there.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    handoff : `Handoff`
        The hand-off.
    site : `str`
        The processing site.
    chunks_per_piece : `int` or `None`
        Consecutive chunks in one piece; `None` for one piece of the site's whole share.

    Returns
    -------
    pieces : `list` [`HandoffPiece`]
        In chunk order; together they hold every unit of the site once.
    """
    chunks = stage_chunks(campaign, site, campaign.stage(handoff.cut_stage))
    names = list(chunks)
    if chunks_per_piece is None:
        groups = [tuple(names)]
    else:
        groups = [tuple(names[i : i + chunks_per_piece]) for i in range(0, len(names), chunks_per_piece)]
    pieces = []
    for group in groups:
        if chunks_per_piece is None:
            name = WHOLE_SITE
        else:
            name = group[0] if len(group) == 1 else f"{group[0]}..{group[-1]}"
        units = tuple(unit for chunk in group for unit in chunks[chunk])
        pieces.append(HandoffPiece(handoff, site, name, group, units))
    return pieces


def workflow_pieces(
    campaign: Campaign, handoff: Handoff | None = None, site: str | None = None
) -> list[HandoffPiece]:
    """Return the pieces the workflow moves: of one hand-off for one site, or of every one.

    Every hand-off is cut along the chunks of its cut stage, ``transfer.chunks_per_handoff``
    chunks a piece: ``raws`` and fan-outs along the chunks they feed, so a chunk starts
    once its own pieces are there; fan-ins and ``final`` along the chunks they come
    from, so a piece leaves as soon as its chunks are done.
    """
    every = handoffs(campaign) if handoff is None else [handoff]
    sites = [s.name for s in campaign.processing_sites] if site is None else [site]
    return [
        piece
        for h in every
        for s in sites
        for piece in cut_pieces(campaign, h, s, campaign.chunks_per_handoff)
    ]
