"""Campaign forecast: the campaign simulated on the sites' capacities, per-chunk and per-site.

`forecast_campaign` runs a discrete-event simulation (SimPy) of the campaign's shape as
the workflow has it -- the chunks of every stage at every site (`multisite.flow.stage_chunks`)
and the hand-offs between the sites (`multisite.flow.handoffs`) -- and returns when each
chunk and each hand-off starts and ends, the makespan, its lower bound and the bottleneck.

Two flows:

- ``per_site``: each hand-off to or from a site is one piece. The
  ``raws`` reach a site in one piece and every chunk of its first stage waits for all of
  it; a fan-in leaves a site when the site's whole producing stage is done; a fan-out
  reaches a site in one piece; ``final`` leaves when all the site's last-stage chunks are
  done.
- ``per_chunk`` (the workflow's cut, `multisite.flow.cut_pieces`): each hand-off is cut
  along the chunks of the stage it feeds
  (``raws``: the first site stage; ``fanout_<stage>``: ``<stage>``) or comes from
  (``fanin_<stage>`` and ``final``: the last stage before it at the site). A piece leaves
  as soon as its producing chunks are done and the chunk it feeds starts as soon as its
  own piece has arrived. ``chunks_per_handoff`` groups that many consecutive chunks into
  one piece; a group of all chunks is the per-site flow, which is how it is simulated.

In both flows a central stage waits for every fan-in piece from every site (the one true
barrier), and a chunk waits for every chunk of the earlier stages of the same place (as
`multisite.flow.stage_dependencies` says, like the workflow's stage markers).

The model
---------
Work. A unit has raws, raw bytes and core-hours: the units table's ``raws`` and
``core_hours`` (and ``bytes``) columns where it has them (summed over a unit's rows),
else ``forecast.raws_per_unit`` raws of ``forecast.bytes_per_raw`` bytes and
``forecast.core_hours_per_raw`` core-hours each. A stage takes ``work_fraction`` of its
units' core-hours; the stages without one share what the others leave in proportion to
their ``quanta_per_unit``. A central stage's work is its fraction of every unit's.

Compute. A site is a pool of ``cores``; chunks run one after the other in the order they
become ready (central-stage chunks first, since every site waits for them), each on all
the site's cores: a chunk of ``h`` core-hours takes ``h / cores`` hours. A chunk holds up
to ``max_quanta`` quanta, more than a site's cores, so one chunk can fill the site; the
site is never idle while a chunk is ready (work-conserving), so its total throughput is the
same as chunks sharing the cores, and chunks finish -- and their hand-offs leave -- as
early as any order allows. A chunk with fewer quanta than cores is not slowed down (a
limit of the model). The central site runs its own units' chunks and the central stages
on the same cores.

Data. Each non-central site has one WAN link to the central site, of ``wan_mb_per_s``,
shared by both directions. A hand-off piece first pays ``forecast.handoff_overhead_s``
(registration, Rucio rule, transfer queue, ingest and verification: latency, not
bandwidth, so pieces pay it concurrently), then moves its bytes over the link; pieces
use the link one at a time in the order they are ready, at its full throughput (the same
bytes per second as sharing it; earlier pieces arrive first). A ``raws`` piece moves its
units' raw bytes; a fan-in, fan-out or ``final`` piece ``forecast.product_fraction.<kind>``
of them; the central site's hand-offs to itself move nothing and take no time. Files: a
``raws`` piece holds its raws, a piece of products at least one file per quantum of the
last stage it carries outputs of (that stage's ``quanta_per_unit`` for each of its units).

Lower bound. The campaign cannot end before the busiest site has done its core-hours on
its cores, nor before the busiest link has moved its bytes: the bound is the larger of
the two, ignoring every dependency and overhead; the bottleneck is the resource that
sets it.
"""

from __future__ import annotations

__all__ = (
    "FLOWS",
    "Forecast",
    "ForecastError",
    "Phase",
    "Task",
    "forecast_campaign",
    "format_forecast",
    "format_gain",
    "stage_work_fractions",
    "timeline_figure",
    "timeline_svg",
    "estimate_unit_work",
    "unit_work_from_plan",
)

import math
from collections import Counter, defaultdict
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import simpy

from .config import Campaign, Stage
from .figures import figure_svg
from .flow import Handoff, cut_pieces, handoffs, stage_chunks, stage_dependencies
from .planner import DR1_CORE_HOURS_PER_RAW

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .planner import Plan

#: The flows `forecast_campaign` simulates.
FLOWS = ("per_chunk", "per_site")
#: Kinds of tasks: site stages, central stages and the four kinds of hand-off.
KINDS = ("stage", "central", "raws", "fanin", "fanout", "final")

#: Rucio: "about half an hour of overhead for a small move".
DEFAULT_OVERHEAD_S = 1800.0
#: A DR1 tract: about 5,700 detector-visits.
DEFAULT_RAWS_PER_UNIT = 5_700.0
#: A compressed LSSTCam raw (one detector of one exposure).
DEFAULT_BYTES_PER_RAW = 32e6
#: DR1 projection: 40 million core-hours over 240,000 visits x 189 detectors.
DEFAULT_CORE_HOURS_PER_RAW = DR1_CORE_HOURS_PER_RAW
#: Bytes a piece of products moves per unit, as a fraction of the unit's raw bytes:
#: star catalogues and visit summaries in, calibrations out, final products about the raws' size.
DEFAULT_PRODUCT_FRACTION = {"fanin": 0.02, "fanout": 0.01, "final": 1.0}

_CENTRAL_PRIORITY, _SITE_PRIORITY = 0, 1


class ForecastError(ValueError):
    """The campaign cannot be forecast as configured; the message lists every problem and its fix.

    Parameters
    ----------
    problems : `list` [`str`]
        One sentence per problem, naming the field and how to fix it.
    """

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("cannot forecast the campaign:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Task:
    """One chunk of a stage, or one piece of a hand-off, as simulated.

    Attributes
    ----------
    site : `str`
        The site a chunk runs at; for a hand-off, the processing site at its far end
        (as in its marker path ``handoff/<name>/<site>``).
    kind : `str`
        ``stage``, ``central``, ``raws``, ``fanin``, ``fanout`` or ``final``.
    name : `str`
        Stage or hand-off name.
    piece : `str`
        Chunk name, or the chunks a hand-off piece holds (``first..last``; ``all`` per site).
    ready : `float`
        Hours from the campaign's start when its inputs were all there.
    start : `float`
        Hours when it started: a chunk when it got the site's cores, a hand-off when sent.
    end : `float`
        Hours when it ended: a chunk done, a hand-off arrived.
    units : `int`
        Units it covers.
    core_hours : `float`
        Core-hours of a chunk (0 for a hand-off).
    files : `int`
        Files a hand-off piece moves (0 for a chunk).
    bytes : `float`
        Bytes a hand-off piece moves (0 for a chunk, and for the central site's own hand-offs).
    moved : `bool`
        Whether it is a hand-off between two sites (over a WAN link).
    """

    site: str
    kind: str
    name: str
    piece: str
    ready: float
    start: float
    end: float
    units: int
    core_hours: float = 0.0
    files: int = 0
    bytes: float = 0.0
    moved: bool = False

    @property
    def is_handoff(self) -> bool:
        return self.kind not in ("stage", "central")


@dataclass(frozen=True)
class Phase:
    """A stage or a hand-off at one site, from its first task's start to its last task's end."""

    site: str
    kind: str
    name: str
    pieces: int
    start: float
    end: float
    core_hours: float
    bytes: float


@dataclass(frozen=True)
class Forecast:
    """A simulated campaign: every task and the figures that sum it up.

    Attributes
    ----------
    campaign : `str`
        Campaign name.
    flow : `str`
        ``per_chunk`` or ``per_site``.
    chunks_per_handoff : `int` or `None`
        Chunks per hand-off piece of the per-chunk flow (`None` per site: all).
    sites : `tuple` [`str`, ...]
        Sites that run something, the central site first.
    tasks : `tuple` [`Task`, ...]
        Every chunk and hand-off piece, in the order they were built.
    makespan : `float`
        Hours from the start to the last task's end.
    lower_bound : `float`
        Hours the busiest site or link needs at least (see the module's docstring).
    bottleneck : `str`
        The resource that sets the lower bound, with its figures.
    site_compute : `dict` [`str`, `float`]
        Hours of each site's core-hours on its cores.
    link_transfer : `dict` [`str`, `float`]
        Hours of the bytes over each non-central site's link.
    """

    campaign: str
    flow: str
    chunks_per_handoff: int | None
    sites: tuple[str, ...]
    tasks: tuple[Task, ...]
    makespan: float
    lower_bound: float
    bottleneck: str
    site_compute: dict[str, float]
    link_transfer: dict[str, float]

    @property
    def ratio(self) -> float:
        """Makespan over its lower bound (1 is the best any flow can do)."""
        return self.makespan / self.lower_bound if self.lower_bound > 0 else math.inf

    @property
    def handoff_counts(self) -> dict[str, int]:
        """Hand-off pieces by hand-off name (``raws``, ``fanin_<stage>``, ...), the central site's own too."""
        return dict(Counter(task.name for task in self.tasks if task.is_handoff))

    @property
    def transfer_counts(self) -> dict[str, int]:
        """Hand-off pieces by name that cross a WAN link (between two sites)."""
        return dict(Counter(task.name for task in self.tasks if task.is_handoff and task.moved))

    @property
    def largest_by_bytes(self) -> Task | None:
        """The hand-off piece that moves the most bytes."""
        moved = [task for task in self.tasks if task.moved]
        return max(moved, key=lambda task: (task.bytes, task.files)) if moved else None

    @property
    def largest_by_files(self) -> Task | None:
        """The hand-off piece that moves the most files."""
        moved = [task for task in self.tasks if task.moved]
        return max(moved, key=lambda task: (task.files, task.bytes)) if moved else None

    def phases(self) -> list[Phase]:
        """Each stage and hand-off at each site, from its first start to its last end.

        Returns
        -------
        phases : `list` [`Phase`]
            Sites in `sites` order, each site's phases by start.
        """
        groups: dict[tuple[str, str, str], list[Task]] = defaultdict(list)
        for task in self.tasks:
            groups[(task.site, task.kind, task.name)].append(task)
        phases = [
            Phase(
                site,
                kind,
                name,
                len(tasks),
                min(t.start for t in tasks),
                max(t.end for t in tasks),
                sum(t.core_hours for t in tasks),
                sum(t.bytes for t in tasks),
            )
            for (site, kind, name), tasks in groups.items()
        ]
        order = {site: index for index, site in enumerate(self.sites)}
        return sorted(phases, key=lambda p: (order[p.site], p.start, p.end))


# ---------------------------------------------------------------------------------------- work estimates
def stage_work_fractions(campaign: Campaign) -> dict[str, float]:
    """Return the fraction of a unit's core-hours each stage takes.

    Stages with a ``work_fraction`` take it; the others share what is left in
    proportion to their ``quanta_per_unit``.

    Parameters
    ----------
    campaign : `~multisite.config.Campaign`
        The campaign.

    Returns
    -------
    fractions : `dict` [`str`, `float`]
        Stage name to fraction, in stage order.
    """
    given = {s.name: s.work_fraction for s in campaign.stages if s.work_fraction is not None}
    rest = max(0.0, 1.0 - sum(given.values()))
    others = [s for s in campaign.stages if s.work_fraction is None]
    quanta = sum(s.quanta_per_unit for s in others)
    return {
        s.name: given[s.name] if s.name in given else rest * s.quanta_per_unit / quanta
        for s in campaign.stages
    }


def _setting(campaign: Campaign, name: str, default: float) -> float:
    return float(campaign.forecast.get(name, default))


def estimate_unit_work(campaign: Campaign) -> pd.DataFrame:
    """Return every unit's raws, raw bytes and core-hours, from the units table or the config.

    The units table may carry ``raws``, ``core_hours`` and ``bytes`` columns (the
    planner's unit table has the first two), summed over a unit's rows; what it lacks
    comes from ``forecast.raws_per_unit``, ``forecast.bytes_per_raw`` and
    ``forecast.core_hours_per_raw``.

    Parameters
    ----------
    campaign : `~multisite.config.Campaign`
        The campaign.

    Returns
    -------
    work : `pandas.DataFrame`
        Indexed by unit name, in the campaign's unit order: ``raws``, ``bytes``, ``core_hours``.

    Raises
    ------
    ForecastError
        Raised when a column holds something other than non-negative numbers.
    """
    names = [unit.name for unit in campaign.units]
    table = pd.DataFrame(index=pd.Index(names, name="unit"))
    path = campaign.units_table
    if path is not None and path.is_file():
        raw = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
        problems = []
        for column in ("raws", "core_hours", "bytes"):
            if column not in raw.columns:
                continue
            values = pd.to_numeric(raw[column].str.strip(), errors="coerce")
            bad = ~np.isfinite(values) | (values < 0)
            if bad.any():
                line = int(np.flatnonzero(bad.to_numpy())[0]) + 2
                problems.append(
                    f"units table {path} line {line}: {column} {raw[column].iloc[line - 2]!r} is not a "
                    f"non-negative number; give one per row (or drop the column to use forecast defaults)"
                )
                continue
            table[column] = values.groupby(raw["unit"].str.strip()).sum().reindex(names).fillna(0.0)
        if problems:
            raise ForecastError(problems)
    if "raws" not in table:
        table["raws"] = _setting(campaign, "raws_per_unit", DEFAULT_RAWS_PER_UNIT)
    if "bytes" not in table:
        table["bytes"] = table["raws"] * _setting(campaign, "bytes_per_raw", DEFAULT_BYTES_PER_RAW)
    if "core_hours" not in table:
        table["core_hours"] = table["raws"] * _setting(
            campaign, "core_hours_per_raw", DEFAULT_CORE_HOURS_PER_RAW
        )
    return table[["raws", "bytes", "core_hours"]].astype(float)


def unit_work_from_plan(plan: Plan) -> pd.DataFrame:
    """Return every unit's raws, raw bytes and core-hours from a planner's plan.

    The plan's unit table counts a raw once for each unit it overlaps, while a site
    receives and processes it once (the planner's shares count it so): each site's
    units are scaled so that they add up to the site's raws, bytes and core-hours.

    Parameters
    ----------
    plan : `~multisite.planner.Plan`
        The plan whose ``campaign_units`` the campaign's units table holds.

    Returns
    -------
    work : `pandas.DataFrame`
        Indexed by unit name: ``raws``, ``bytes``, ``core_hours`` (the input of
        `forecast_campaign`'s ``unit_work``).
    """
    table = plan.unit_table
    site_raws = dict(zip(plan.sites, plan.site_raws.astype(float), strict=True))
    site_bytes = dict(zip(plan.sites, plan.site_bytes.astype(float), strict=True))
    per_site = table.groupby("site")["raws"].transform("sum").astype(float).replace(0.0, 1.0)
    share = table["raws"] / per_site
    raws = share * table["site"].map(site_raws)
    return pd.DataFrame(
        {
            "raws": raws.to_numpy(),
            "bytes": (share * table["site"].map(site_bytes)).to_numpy(),
            "core_hours": (raws * plan.core_hours_per_raw).to_numpy(),
        },
        index=pd.Index(table["unit"], name="unit"),
    )


def _capacity_problems(campaign: Campaign) -> list[str]:
    """Say which site lacks the capacity the forecast needs, and how to give it."""
    problems = []
    central = campaign.central.name
    running = {central, *(site.name for site in campaign.processing_sites)}
    for name in (n for n in campaign.sites if n in running):
        site = campaign.sites[name]
        if site.cores is None:
            problems.append(
                f"sites.{name}.cores: not set; give the cores {name} has for the campaign "
                f"(e.g. 'cores: 3000' under sites.{name})"
            )
        if name != central and site.wan_mb_per_s is None:
            problems.append(
                f"sites.{name}.wan_mb_per_s: not set; give the throughput of {name}'s link to "
                f"{central} in MB/s (e.g. 'wan_mb_per_s: 300' under sites.{name})"
            )
    return problems


def _check_unit_work(campaign: Campaign, work: pd.DataFrame) -> pd.DataFrame:
    """Return ``work`` for the campaign's units with the three columns, or raise naming what is wrong."""
    names = [unit.name for unit in campaign.units]
    problems = []
    if missing := [name for name in names if name not in work.index]:
        problems.append(f"unit_work: no figures for unit(s) {missing[:5]}; give a row for every unit")
    if absent := {"raws", "bytes", "core_hours"} - set(work.columns):
        problems.append(f"unit_work: missing column(s) {sorted(absent)}; give raws, bytes and core_hours")
    if problems:
        raise ForecastError(problems)
    work = work.loc[names, ["raws", "bytes", "core_hours"]].astype(float)
    if not np.isfinite(work.to_numpy()).all() or (work.to_numpy() < 0).any():
        raise ForecastError(["unit_work: every figure must be a finite, non-negative number"])
    return work


# ---------------------------------------------------------------------------------------- simulation
class _Record:
    """A task's figures, filled in while the simulation runs."""

    __slots__ = (
        "site",
        "kind",
        "name",
        "piece",
        "units",
        "core_hours",
        "files",
        "bytes",
        "moved",
        "ready",
        "start",
        "end",
    )

    def __init__(self, site: str, kind: str, name: str, piece: str, units: int, **figures: Any):
        self.site, self.kind, self.name, self.piece, self.units = site, kind, name, piece, units
        self.core_hours = figures.get("core_hours", 0.0)
        self.files = figures.get("files", 0)
        self.bytes = figures.get("bytes", 0.0)
        self.moved = figures.get("moved", False)
        self.ready = self.start = self.end = math.nan

    def task(self) -> Task:
        return Task(
            self.site,
            self.kind,
            self.name,
            self.piece,
            self.ready,
            self.start,
            self.end,
            self.units,
            float(self.core_hours),
            int(round(self.files)),
            float(self.bytes),
            bool(self.moved),
        )


def _handoff_kind(handoff: Handoff) -> str:
    return handoff.name.split("_", 1)[0]


class _Simulation:
    """The campaign's chunks and hand-off pieces as SimPy processes on sites and links."""

    def __init__(self, campaign: Campaign, work: pd.DataFrame, group_size: int | None):
        self.campaign = campaign
        self.central = campaign.central.name
        self.processing = [site.name for site in campaign.processing_sites]
        self.group_size = group_size
        self.env = simpy.Environment()
        settings = campaign.forecast
        self.overhead = float(settings.get("handoff_overhead_s", DEFAULT_OVERHEAD_S)) / 3600.0
        self.product_fraction = DEFAULT_PRODUCT_FRACTION | dict(settings.get("product_fraction", {}))
        self.fractions = stage_work_fractions(campaign)
        self.core_hours = work["core_hours"].to_dict()
        self.bytes = work["bytes"].to_dict()
        self.raws = work["raws"].to_dict()
        runners = [self.central, *(s for s in self.processing if s != self.central)]
        self.sites = tuple(runners)
        self.cores = {site: float(campaign.sites[site].cores or 0) for site in runners}
        self.compute = {site: simpy.PriorityResource(self.env, capacity=1) for site in runners}
        # Bytes per hour of each non-central site's link.
        self.rate = {
            site: float(campaign.sites[site].wan_mb_per_s or 0) * 1e6 * 3600.0
            for site in runners
            if site != self.central
        }
        self.links = {site: simpy.Resource(self.env, capacity=1) for site in self.rate}
        self.records: list[_Record] = []
        # (site, stage) -> chunk name -> (units, process); central stages at the central site.
        self.chunks: dict[tuple[str, str], dict[str, tuple[tuple[str, ...], simpy.Process]]] = {}
        # (handoff, site) -> pieces: (chunk names it holds, process).
        self.pieces: dict[tuple[str, str], list[tuple[tuple[str, ...], simpy.Process]]] = {}
        # (handoff, site) -> chunk of the stage it is cut along -> the piece holding it.
        self.piece_of: dict[tuple[str, str], dict[str, simpy.Process]] = {}
        # (site, stage) or (handoff, site) -> the event of all its chunks or pieces done.
        self.done: dict[tuple[str, str], simpy.Event] = {}

    # -------------------------------------------------------------- processes
    def _run_chunk(
        self, record: _Record, site: str, needs: list[simpy.Event], priority: int
    ) -> Generator[simpy.Event, Any, None]:
        yield self.env.all_of(needs)
        record.ready = self.env.now
        with self.compute[site].request(priority=priority) as slot:
            yield slot
            record.start = self.env.now
            yield self.env.timeout(record.core_hours / self.cores[site])
        record.end = self.env.now

    def _move(self, record: _Record, needs: list[simpy.Event]) -> Generator[simpy.Event, Any, None]:
        yield self.env.all_of(needs)
        record.ready = record.start = self.env.now
        if record.moved:
            yield self.env.timeout(self.overhead)
            with self.links[record.site].request() as link:
                yield link
                yield self.env.timeout(record.bytes / self.rate[record.site])
        record.end = self.env.now

    # -------------------------------------------------------------- building
    def _stage_done(self, site: str, stage: str) -> simpy.Event:
        """Return the event of every chunk of a stage at a site done (one event: thousands wait on it)."""
        if (site, stage) not in self.done:
            processes = [process for _, process in self.chunks[(site, stage)].values()]
            self.done[(site, stage)] = self.env.all_of(processes)
        return self.done[(site, stage)]

    def _arrived(self, handoff: str, site: str) -> simpy.Event:
        """Return the event of every piece of a hand-off to or from a site arrived."""
        if (handoff, site) not in self.done:
            self.done[(handoff, site)] = self.env.all_of(
                [process for _, process in self.pieces[(handoff, site)]]
            )
        return self.done[(handoff, site)]

    def _add_handoff(self, handoff: Handoff) -> None:
        kind = _handoff_kind(handoff)
        stages = [self.campaign.stage(name) for name in handoff.producers]
        # Each quantum of the last producing stage writes at least one file that moves.
        quanta_per_unit = stages[-1].quanta_per_unit if stages else 0
        for site in self.processing:
            sender, receiver = handoff.ends(self.campaign, site)
            moved = sender != receiver
            pieces = []
            for piece in cut_pieces(self.campaign, handoff, site, self.group_size):
                raw_bytes = sum(self.bytes[unit] for unit in piece.units)
                if kind == "raws":
                    files, size, needs = sum(self.raws[unit] for unit in piece.units), raw_bytes, []
                else:
                    files = quanta_per_unit * len(piece.units)
                    size = self.product_fraction[kind] * raw_bytes
                    if handoff.to_central:
                        cut = self.chunks[(site, handoff.cut_stage)]
                        needs = [cut[chunk][1] for chunk in piece.chunks]
                    else:
                        needs = [self._stage_done(self.central, stage.name) for stage in stages]
                record = _Record(
                    site,
                    kind,
                    handoff.name,
                    piece.name,
                    len(piece.units),
                    files=files if moved else 0,
                    bytes=size if moved else 0.0,
                    moved=moved,
                )
                self.records.append(record)
                pieces.append((piece.chunks, self.env.process(self._move(record, needs))))
            self.pieces[(handoff.name, site)] = pieces
            self.piece_of[(handoff.name, site)] = {
                chunk: process for group, process in pieces for chunk in group
            }

    def _incoming(self, handoff: Handoff, site: str, stage: Stage, chunk: str) -> list[simpy.Event]:
        """Return the pieces of ``handoff`` to ``site`` that ``chunk`` of ``stage`` waits for."""
        if handoff.cut_stage == stage.name:
            return [self.piece_of[(handoff.name, site)][chunk]]
        return [self._arrived(handoff.name, site)]

    def _add_stage(self, stage: Stage) -> None:
        earlier, incoming = stage_dependencies(self.campaign, stage)
        fraction = self.fractions[stage.name]
        sites = [self.central] if stage.is_central else self.processing
        for site in sites:
            before = [self._stage_done(site, name) for name in earlier]
            chunks = {}
            for chunk, units in stage_chunks(self.campaign, site, stage).items():
                needs = list(before)
                if stage.is_central:
                    needs += [self._arrived(h.name, s) for h in incoming for s in self.processing]
                    kind, priority = "central", _CENTRAL_PRIORITY
                else:
                    needs += [p for h in incoming for p in self._incoming(h, site, stage, chunk)]
                    kind, priority = "stage", _SITE_PRIORITY
                record = _Record(
                    site,
                    kind,
                    stage.name,
                    chunk,
                    len(units),
                    core_hours=fraction * sum(self.core_hours[unit] for unit in units),
                )
                self.records.append(record)
                chunks[chunk] = (units, self.env.process(self._run_chunk(record, site, needs, priority)))
            self.chunks[(site, stage.name)] = chunks

    def run(self) -> list[Task]:
        """Build every process in the order things happen, run them and return the tasks."""
        flows = handoffs(self.campaign)
        for stage in self.campaign.stages:
            for handoff in flows:
                if handoff.consumers and handoff.consumers[0] == stage.name:
                    self._add_handoff(handoff)
            self._add_stage(stage)
        for handoff in flows:
            if not handoff.consumers:
                self._add_handoff(handoff)
        self.env.run()
        return [record.task() for record in self.records]


def _lower_bound(
    campaign: Campaign, tasks: Sequence[Task], cores: Mapping[str, float], rate: Mapping[str, float]
) -> tuple[float, str, dict[str, float], dict[str, float]]:
    """Return the lower bound, the bottleneck, and each site's compute and each link's transfer hours."""
    core_hours: dict[str, float] = defaultdict(float)
    link_bytes: dict[str, float] = defaultdict(float)
    for task in tasks:
        core_hours[task.site] += task.core_hours
        if task.moved:
            link_bytes[task.site] += task.bytes
    compute = {site: core_hours[site] / cores[site] for site in cores}
    transfer = {site: link_bytes[site] / rate[site] for site in rate}
    busiest = max(compute, key=lambda s: compute[s])
    bound = compute[busiest]
    bottleneck = f"compute at {busiest} ({_core_hours(core_hours[busiest])} on {cores[busiest]:,.0f} cores)"
    if transfer and max(transfer.values()) > bound:
        link = max(transfer, key=lambda s: transfer[s])
        bound = transfer[link]
        mb_per_s = rate[link] / 3.6e9
        bottleneck = (
            f"link {link}-{campaign.central.name} ({_size(link_bytes[link])} at {mb_per_s:,.0f} MB/s)"
        )
    return bound, bottleneck, compute, transfer


def forecast_campaign(
    campaign: Campaign,
    flow: str = "per_chunk",
    chunks_per_handoff: int | None = None,
    unit_work: pd.DataFrame | None = None,
) -> Forecast:
    """Simulate the campaign on its sites' capacities.

    Parameters
    ----------
    campaign : `~multisite.config.Campaign`
        The campaign, with ``cores`` for every site that runs something and
        ``wan_mb_per_s`` for every non-central one.
    flow : `str`
        ``per_chunk`` (hand-offs cut along chunks) or ``per_site`` (one piece per
        hand-off and site, as the workflow does today).
    chunks_per_handoff : `int`, optional
        Chunks in one hand-off piece of the per-chunk flow (default the config's
        ``transfer.chunks_per_handoff``); not used per site.
    unit_work : `pandas.DataFrame`, optional
        ``raws``, ``bytes`` and ``core_hours`` of every unit, indexed by unit name
        (e.g. `unit_work_from_plan`); default `estimate_unit_work` (the units
        table, then the config's estimates).

    Returns
    -------
    forecast : `Forecast`
        Every task, the makespan, the lower bound and the bottleneck.

    Raises
    ------
    ForecastError
        Raised, with every problem and its fix, for an unknown flow, a
        ``chunks_per_handoff`` below 1, a site without ``cores`` or
        ``wan_mb_per_s``, or unit figures that are missing or not numbers.
    """
    problems = []
    if flow not in FLOWS:
        problems.append(f"flow: {flow!r} is not a flow; choose one of {', '.join(FLOWS)}")
    if chunks_per_handoff is None:
        chunks_per_handoff = campaign.chunks_per_handoff
    if chunks_per_handoff < 1:
        problems.append(
            f"chunks_per_handoff: {chunks_per_handoff} is below 1; give 1 (a hand-off per chunk) or more"
        )
    problems += _capacity_problems(campaign)
    if problems:
        raise ForecastError(problems)
    work = _check_unit_work(campaign, estimate_unit_work(campaign) if unit_work is None else unit_work)
    group_size = chunks_per_handoff if flow == "per_chunk" else None
    simulation = _Simulation(campaign, work, group_size)
    tasks = simulation.run()
    bound, bottleneck, compute, transfer = _lower_bound(campaign, tasks, simulation.cores, simulation.rate)
    return Forecast(
        campaign=campaign.name,
        flow=flow,
        chunks_per_handoff=group_size,
        sites=simulation.sites,
        tasks=tuple(tasks),
        makespan=max((task.end for task in tasks), default=0.0),
        lower_bound=bound,
        bottleneck=bottleneck,
        site_compute=compute,
        link_transfer=transfer,
    )


# ---------------------------------------------------------------------------------------- text
def _size(value: float) -> str:
    """Bytes in a readable decimal unit."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def _core_hours(value: float) -> str:
    """Core-hours in millions from a million up, else in full."""
    return f"{value / 1e6:.3g}M core-hours" if value >= 1e6 else f"{value:,.0f} core-hours"


def _time_unit(hours: float) -> tuple[str, float]:
    """Days for a campaign of more than two days, else hours: the unit's symbol and its hours."""
    return ("d", 24.0) if hours > 48 else ("h", 1.0)


def _piece_text(task: Task | None) -> str:
    if task is None:
        return "none (every hand-off stays at the central site)"
    return f"{task.name} {task.site} {task.piece} ({task.files:,} files, {_size(task.bytes)})"


def format_forecast(forecast: Forecast, unit: str | None = None) -> str:
    """Describe a forecast: each site's stages and hand-offs, makespan, bound, ratio, bottleneck.

    Parameters
    ----------
    forecast : `Forecast`
        The forecast.
    unit : `str`, optional
        ``d`` or ``h``; default days for a campaign of more than two days.

    Returns
    -------
    text : `str`
        Lines for a terminal.
    """
    symbol, scale = (unit, 24.0 if unit == "d" else 1.0) if unit else _time_unit(forecast.makespan)
    cut = (
        "one hand-off per site"
        if forecast.chunks_per_handoff is None
        else f"{forecast.chunks_per_handoff} chunk(s) per hand-off"
    )
    lines = [
        f"{forecast.flow} flow ({cut}); times in {'days' if symbol == 'd' else 'hours'} from the start",
        f"  {'site':8s} {'kind':8s} {'name':16s} {'pieces':>6s} {'start':>9s} {'end':>9s}  work",
    ]
    for phase in forecast.phases():
        work = (
            f"{phase.core_hours:,.0f} core-hours"
            if phase.kind in ("stage", "central")
            else _size(phase.bytes)
        )
        lines.append(
            f"  {phase.site:8s} {phase.kind:8s} {phase.name:16s} {phase.pieces:6d} "
            f"{phase.start / scale:9.2f} {phase.end / scale:9.2f}  {work}"
        )
    counts = forecast.handoff_counts
    moved = forecast.transfer_counts
    lines += [
        f"  makespan {forecast.makespan / scale:.2f} {symbol}; "
        f"lower bound {forecast.lower_bound / scale:.2f} {symbol}; ratio {forecast.ratio:.3f}",
        f"  bottleneck: {forecast.bottleneck}",
        "  hand-offs: "
        + ", ".join(f"{name} {n} ({moved.get(name, 0)} between sites)" for name, n in counts.items()),
        f"  largest hand-off by bytes: {_piece_text(forecast.largest_by_bytes)}",
    ]
    if forecast.largest_by_files is not forecast.largest_by_bytes:
        lines.append(f"  largest hand-off by files: {_piece_text(forecast.largest_by_files)}")
    return "\n".join(lines)


def format_gain(per_chunk: Forecast, per_site: Forecast) -> str:
    """Say how much shorter the per-chunk flow makes the campaign than the per-site flow."""
    symbol, scale = _time_unit(per_site.makespan)
    saved = per_site.makespan - per_chunk.makespan
    percent = 100 * saved / per_site.makespan if per_site.makespan else 0.0
    return (
        f"gain: per-chunk {per_chunk.makespan / scale:.2f} {symbol} against per-site "
        f"{per_site.makespan / scale:.2f} {symbol}: {saved / scale:.2f} {symbol} shorter ({percent:.1f} %); "
        f"ratio to the bound {per_chunk.ratio:.3f} against {per_site.ratio:.3f}"
    )


# ---------------------------------------------------------------------------------------- timeline
COLOURS = {
    "stage": "#1565c0",
    "central": "#6a1b9a",
    "raws": "#ef6c00",
    "fanin": "#2e7d32",
    "fanout": "#00838f",
    "final": "#c62828",
}
#: Layout of the timeline, CSS pixels: a lane's height, the margin left of the bars (site and lane
#: names) and right of them, the legend above the panels, a panel's title and its time axis.
_LANE_PX, _LEFT, _RIGHT, _LEGEND_PX, _TITLE_PX, _AXIS_PX = 11, 170, 20, 26, 22, 30
#: Space between two sites' rows, and the least height of a row (its site's name), in lanes.
_SITE_GAP, _MIN_SITE_LANES = 0.4, 1.6
#: Figures are sized in CSS pixels (96 an inch), so ``width`` pixels of the report are ``width`` here.
_PX_PER_INCH = 96


def _merged(tasks: Sequence[Task], slack: float) -> list[tuple[float, float, int]]:
    """Merge tasks whose times touch or overlap (within ``slack`` hours) into bars: start, end, count."""
    bars: list[list[float]] = []
    for task in sorted(tasks, key=lambda t: t.start):
        if bars and task.start <= bars[-1][1] + slack:
            bars[-1][1] = max(bars[-1][1], task.end)
            bars[-1][2] += 1
        else:
            bars.append([task.start, task.end, 1])
    return [(start, end, int(count)) for start, end, count in bars]


def _lanes(forecast: Forecast) -> dict[str, dict[tuple[str, str], list[Task]]]:
    """Group a forecast's tasks by site (in `Forecast.sites` order) and lane (kind, name), by first start."""
    lanes: dict[str, dict[tuple[str, str], list[Task]]] = {site: {} for site in forecast.sites}
    for task in sorted(forecast.tasks, key=lambda t: t.start):
        if task.is_handoff and not task.moved:
            continue  # the central site's own hand-offs take no time
        lanes[task.site].setdefault((task.kind, task.name), []).append(task)
    return lanes


def _panel_height(lanes: dict[str, dict[tuple[str, str], list[Task]]]) -> float:
    """Height of a panel in lanes: each site's lanes (room for its name at least) and the gaps."""
    rows = sum(max(_MIN_SITE_LANES, len(site_lanes)) for site_lanes in lanes.values())
    return rows + _SITE_GAP * len(lanes)


def timeline_figure(forecasts: Forecast | Sequence[Forecast], width: int = 1000) -> Figure:
    """Draw forecasts as a Gantt-style timeline: a panel per flow, a row per site, a lane per step.

    A site's row holds one lane per stage and hand-off, in the order they start
    (`~matplotlib.axes.Axes.broken_barh`); each lane's chunks or pieces that
    touch or overlap (within a pixel) are drawn as one bar, so thousands of
    chunks stay readable and the SVG small. Bars are coloured by kind
    (`COLOURS`); the panels share one time axis so that flows compare by eye,
    with each flow's makespan (solid) and lower bound (dashed) marked.

    Parameters
    ----------
    forecasts : `Forecast` or `~collections.abc.Sequence` [`Forecast`]
        One forecast, or several (e.g. per chunk and per site) drawn one under the other.
    width : `int`
        Width of the figure, CSS pixels.

    Returns
    -------
    figure : `matplotlib.figure.Figure`
        One axes per forecast, in order; each lane is one collection with gid
        ``timeline-<flow>-<site>-<name>`` and one rectangle per merged bar; each
        site's name is a text with gid ``timeline-<flow>-<site>``. The figure
        has an Agg canvas and no pyplot state: nothing to close.
    """
    # Imported here: matplotlib takes a second to import, which the forecast's text output does without.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    panels = [forecasts] if isinstance(forecasts, Forecast) else list(forecasts)
    span = max((f.makespan for f in panels), default=0.0) or 1.0
    symbol, scale = _time_unit(span)
    plot = width - _LEFT - _RIGHT
    slack = span / plot  # hours a pixel spans: bars closer than a pixel are one
    layouts = [_lanes(forecast) for forecast in panels]
    heights = [_panel_height(lanes) * _LANE_PX for lanes in layouts]
    height = _LEGEND_PX + sum(_TITLE_PX + h + _AXIS_PX for h in heights)
    # A Figure, not pyplot: no global figure registry to leak into, and an explicit non-interactive canvas.
    figure = Figure(figsize=(width / _PX_PER_INCH, height / _PX_PER_INCH), dpi=_PX_PER_INCH)
    FigureCanvasAgg(figure)

    top, first = height - _LEGEND_PX, None
    for forecast, lanes, panel_height in zip(panels, layouts, heights, strict=True):
        figure.text(
            4 / width,
            (top - _TITLE_PX + 6) / height,
            f"{forecast.campaign}: {forecast.flow}, makespan {forecast.makespan / scale:.2f} {symbol}, "
            f"bound {forecast.lower_bound / scale:.2f} {symbol}, ratio {forecast.ratio:.3f}",
            fontsize=9.5,
            fontweight="bold",
        )
        top -= _TITLE_PX
        ax = figure.add_axes(
            (_LEFT / width, (top - panel_height) / height, plot / width, panel_height / height), sharex=first
        )
        first = first or ax
        ticks, names, y = [], [], 0.0
        for index, (site, site_lanes) in enumerate(lanes.items()):
            row_top = y
            for (kind, name), tasks in site_lanes.items():
                # At least a pixel wide: a short hand-off stays visible next to days of processing.
                bars = [
                    (start / scale, max(end - start, slack) / scale)
                    for start, end, _ in _merged(tasks, slack)
                ]
                ax.broken_barh(
                    bars,
                    (y + 0.15, 0.7),
                    facecolors=COLOURS[kind],
                    linewidth=0,
                    gid=f"timeline-{forecast.flow}-{site}-{name}",
                )
                ticks.append(y + 0.5)
                names.append(name)
                y += 1
            y = max(y, row_top + _MIN_SITE_LANES)
            # Rows shaded in turn, the site's name at the left edge of the figure.
            ax.axhspan(
                row_top - _SITE_GAP / 2,
                y + _SITE_GAP / 2,
                color="#f2f2f2" if index % 2 == 0 else "white",
                zorder=0,
                linewidth=0,
            )
            ax.text(
                -(_LEFT - 4) / plot,
                row_top + 0.1,
                site,
                transform=ax.get_yaxis_transform(),
                fontsize=9,
                fontweight="bold",
                va="top",
                gid=f"timeline-{forecast.flow}-{site}",
            )
            y += _SITE_GAP
        ax.set_ylim(y - _SITE_GAP / 2, -_SITE_GAP / 2)  # first site at the top
        ax.set_yticks(ticks, names, fontsize=7)
        ax.tick_params(axis="y", length=0)
        ax.axvline(forecast.makespan / scale, color="#333", linewidth=1.0)
        ax.axvline(forecast.lower_bound / scale, color="#333", linewidth=0.8, linestyle="--")
        ax.grid(axis="x", color="#bbb", linestyle=":", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        ax.tick_params(axis="x", labelsize=8, labelbottom=True)
        top -= panel_height + _AXIS_PX

    if first is not None:
        first.set_xlim(0, 1.01 * span / scale)  # the longest makespan's line just inside
        first.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g} {symbol}"))
    handles = [Patch(facecolor=colour, label=kind) for kind, colour in COLOURS.items()]
    handles += [
        Line2D([], [], color="#333", linewidth=1.0, label="makespan"),
        Line2D([], [], color="#333", linewidth=0.8, linestyle="--", label="lower bound"),
    ]
    figure.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(_LEFT / width, 1.0),
        ncol=len(handles),
        frameon=False,
        fontsize=8,
        handlelength=1.2,
        columnspacing=1.4,
    )
    return figure


def timeline_svg(forecasts: Forecast | Sequence[Forecast], width: int = 1000) -> str:
    """Draw forecasts as a Gantt-style timeline (`timeline_figure`) in an SVG.

    Parameters
    ----------
    forecasts : `Forecast` or `~collections.abc.Sequence` [`Forecast`]
        One forecast, or several (e.g. per chunk and per site) drawn one under the other.
    width : `int`
        Width of the drawing, CSS pixels.

    Returns
    -------
    svg : `str`
        An ``<svg id="forecast-timeline">`` element, to embed in a page or write as a file.
    """
    return figure_svg(timeline_figure(forecasts, width), "forecast-timeline", "campaign forecast timeline")
