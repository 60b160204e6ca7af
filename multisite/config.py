"""Campaign configuration: load, validate and expose it as typed objects.

Everything is checked here, before any rule touches a repository: the YAML against
``schemas/config.schema.yaml``, the units table, and the relations between them
(one central site, every unit at exactly one known site). Repositories are
checked by the first rule that opens them, since a site's instance sees only its own.
Errors name the field and say how to fix it.
"""

from __future__ import annotations

__all__ = (
    "Campaign",
    "CampaignConfigError",
    "Site",
    "Stage",
    "Unit",
    "load_campaign",
    "load_config_file",
)

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml

_UNIT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CampaignConfigError(ValueError):
    """The campaign configuration is invalid; the message lists every problem and its fix."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{source}: invalid campaign configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass(frozen=True)
class Site:
    """A data facility taking part in the campaign."""

    name: str
    role: str
    repo: str
    create_repo: bool
    bps: Mapping[str, Any]

    @property
    def is_central(self) -> bool:
        return self.role == "central"


@dataclass(frozen=True)
class Stage:
    """A pipeline subset run either at every site or centrally."""

    name: str
    subset: str
    location: str
    bps: Mapping[str, Any] = field(default_factory=dict)
    units_per_chunk: int | None = None
    quanta_per_unit: int = 1

    @property
    def is_central(self) -> bool:
        return self.location == "central"


@dataclass(frozen=True)
class Unit:
    """A unit of sky and its site: one patch, one tract, or a group of tracts or patches.

    Attributes
    ----------
    name : `str`
        Unit name.
    cells : `tuple` [`tuple` [`int`, `int` or `None`], ...]
        Its (tract, patch) cells; patch `None` is the whole tract.
    site : `str`
        Site that processes it.
    """

    name: str
    cells: tuple[tuple[int, int | None], ...]
    site: str

    def contains(self, tract: int, patch: int | None) -> bool:
        """Whether the unit covers a patch (or, with ``patch`` `None`, a whole tract)."""
        return (tract, None) in self.cells or (patch is not None and (tract, patch) in self.cells)


@dataclass(frozen=True)
class Campaign:
    """A validated campaign configuration."""

    name: str
    instrument: str
    pipeline: str
    workdir: Path
    repo_seed: str | None
    skymap: str
    raw_collection: str
    root_collection: str
    truth_collection: str | None
    transfer_backend: str
    transfer_mode: str
    stages: tuple[Stage, ...]
    sites: Mapping[str, Site]
    units: tuple[Unit, ...]
    bps: Mapping[str, Any]
    qa: Mapping[str, Any]
    demo: Mapping[str, Any]
    max_quanta: int = 100_000
    notify: Mapping[str, Any] = field(default_factory=dict)
    rucio: Mapping[str, Any] = field(default_factory=dict)
    instance: str | None = None
    """The site this instance of the workflow runs for (`None`: one instance runs every site)."""
    wait_timeout: float = 7 * 86400.0
    """Seconds a site instance waits for a hand-off another instance sends."""
    wait_interval: float = 30.0
    """Seconds between two looks for a hand-off another instance sends."""

    def runs_here(self, site: str) -> bool:
        """Whether this instance does ``site``'s work (every site's when no instance site is set)."""
        return self.instance is None or self.instance == site

    @property
    def central(self) -> Site:
        return next(site for site in self.sites.values() if site.is_central)

    @property
    def processing_sites(self) -> list[Site]:
        """Sites that process units, in configuration order."""
        used = {unit.site for unit in self.units}
        return [site for name, site in self.sites.items() if name in used]

    def units_of(self, site: str) -> list[Unit]:
        return [unit for unit in self.units if unit.site == site]

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    def stage_sites(self, stage: Stage) -> list[Site]:
        """Sites that run ``stage``."""
        return [self.central] if stage.is_central else self.processing_sites

    def stage_chain(self, site: str, stage: str, chunk: str | None = None) -> str:
        """CHAINED collection of a stage's outputs at a site, or of one chunk (its attempts' RUNs)."""
        return f"{self.root_collection}/{site}/{stage}" + (f"/{chunk}" if chunk else "")

    def handoff_chain(self, site: str) -> str:
        """CHAINED collection of every RUN handed to ``site`` by other sites."""
        return f"{self.root_collection}/{site}/handoffs"

    @property
    def reference_chain(self) -> str:
        """Output collection of the single-site reference run at the central site."""
        return f"{self.root_collection}/reference"

    @property
    def markers(self) -> Path:
        return self.workdir / "markers"

    @property
    def events(self) -> Path:
        """Directory of the campaign's event logs."""
        return self.workdir / "events"


@cache
def _schema() -> dict[str, Any]:
    text = resources.files("multisite").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a campaign YAML file, turning parse errors into `CampaignConfigError`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CampaignConfigError(str(path), ["file not found: pass an existing config file"]) from None
    except yaml.YAMLError as err:
        raise CampaignConfigError(str(path), [f"not valid YAML: {err}"]) from None
    if not isinstance(data, dict):
        raise CampaignConfigError(str(path), ["the file must hold a mapping of settings"])
    return data


def _schema_problems(config: Mapping[str, Any]) -> list[str]:
    problems = []
    validator = jsonschema.Draft202012Validator(_schema())
    for error in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        hint = error.schema.get("description")
        message = error.message
        if error.validator == "additionalProperties":
            message += "; remove it or check its spelling"
        problems.append(f"{where}: {message}" + (f" (expected: {hint})" if hint else ""))
    return problems


def _read_units(path: Path, sites: Mapping[str, Any]) -> tuple[list[Unit], list[str]]:
    where = f"units table {path}"
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except FileNotFoundError:
        return [], [
            f"{where}: file not found; set 'units' to a tab-separated file with unit, tract, patch, site"
        ]
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        return [], [f"{where}: cannot be read as a tab-separated table: {err}"]
    missing = {"unit", "tract", "site"} - set(table.columns)
    if missing:
        return [], [f"{where}: missing column(s) {sorted(missing)}; columns are unit, tract, patch, site"]
    if table.empty:
        return [], [f"{where}: no units; add one row per unit of sky"]
    problems: list[str] = []
    sites_of: dict[str, str] = {}
    cells_of: dict[str, list[tuple[int, int | None]]] = {}
    cells: dict[tuple[int, int | None], str] = {}
    for row_number, row in enumerate(table.to_dict("records"), start=2):
        at = f"{where} line {row_number}"
        name, site = row["unit"].strip(), row["site"].strip()
        if not _UNIT.match(name):
            problems.append(f"{at}: unit name {name!r} must be 1-64 letters, digits, _ or -")
            continue
        if not site:
            problems.append(f"{at}: unit {name!r} is assigned to no site; put one site name in 'site'")
            continue
        if site not in sites:
            problems.append(f"{at}: unit {name!r} names unknown site {site!r}; known sites: {sorted(sites)}")
            continue
        if sites_of.get(name, site) != site:
            problems.append(
                f"{at}: unit {name!r} is assigned to two sites ({sites_of[name]!r} and {site!r}); "
                "give all its rows one site"
            )
            continue
        try:
            tract = int(row["tract"])
            patch_text = row.get("patch", "").strip()
            patch = int(patch_text) if patch_text else None
        except ValueError:
            problems.append(
                f"{at}: tract and patch must be whole numbers (patch may be empty for a whole tract)"
            )
            continue
        key = (tract, patch)
        if key in cells:
            problems.append(
                f"{at}: tract {tract} patch {patch} is also unit {cells[key]!r}; list each sky cell once"
            )
            continue
        sites_of[name] = site
        cells[key] = name
        cells_of.setdefault(name, []).append(key)
    # A unit of several rows is a group of tracts (or patches), processed as one.
    return [Unit(name, tuple(cells_of[name]), site) for name, site in sites_of.items()], problems


def load_campaign(config: Mapping[str, Any] | str | Path, base: str | Path = ".") -> Campaign:
    """Validate a campaign configuration and return it as a `Campaign`.

    Parameters
    ----------
    config : `~collections.abc.Mapping` or `str` or `pathlib.Path`
        The configuration, or the path of its YAML file.
    base : `str` or `pathlib.Path`
        Directory that relative paths in the configuration are relative to.

    Returns
    -------
    campaign : `Campaign`
        The validated campaign.

    Raises
    ------
    CampaignConfigError
        Raised with every problem found, each naming its field and its fix.
    """
    source = str(config) if isinstance(config, str | Path) else "config"
    data = load_config_file(config) if isinstance(config, str | Path) else dict(config)
    base = Path(base)
    problems = _schema_problems(data)
    if problems:
        raise CampaignConfigError(source, problems)

    sites_cfg = data["sites"]
    central = [name for name, site in sites_cfg.items() if site["role"] == "central"]
    if len(central) != 1:
        problems.append(
            f"sites: exactly one site must have role: central, found {len(central) or 'none'} {central}"
        )
    stage_names = [stage["name"] for stage in data["stages"]]
    if len(set(stage_names)) != len(stage_names):
        problems.append(f"stages: stage names must be unique, got {stage_names}")
    if data["stages"][0]["location"] != "site":
        problems.append("stages: the first stage must run at the sites (location: site), where the raws are")
    if data.get("site") is not None and data["site"] not in sites_cfg:
        problems.append(
            f"site: {data['site']!r} is not a site of this campaign; use one of {sorted(sites_cfg)} "
            "(the site profile sets it) or leave it unset to run every site in one instance"
        )
    units, unit_problems = _read_units(base / data["units"], sites_cfg)
    problems += unit_problems
    if problems:
        raise CampaignConfigError(source, problems)

    collections = data["collections"]
    transfer = data.get("transfer", {})

    def resolve(path: str) -> str:
        # Environment variables (e.g. $DRP_PIPE_DIR in a stack) expand where they are set.
        path = os.path.expandvars(path)
        if "://" in path or path.startswith("$") or Path(path).is_absolute():
            return path
        return str((base / path).resolve())

    return Campaign(
        name=data["campaign"],
        instrument=data["instrument"],
        pipeline=resolve(data["pipeline"]),
        workdir=Path(resolve(data["workdir"])),
        repo_seed=resolve(data["repo_seed"]) if "repo_seed" in data else None,
        skymap=data["skymap"],
        raw_collection=collections["raw"],
        root_collection=collections["root"],
        truth_collection=collections.get("truth"),
        transfer_backend=transfer.get("backend", "butler"),
        transfer_mode=transfer.get("mode", "copy"),
        stages=tuple(
            Stage(
                s["name"],
                s["subset"],
                s["location"],
                s.get("bps", {}),
                s.get("units_per_chunk"),
                s.get("quanta_per_unit", 1),
            )
            for s in data["stages"]
        ),
        max_quanta=data.get("max_quanta", 100_000),
        sites={
            name: Site(name, s["role"], resolve(s["repo"]), s.get("create_repo", False), s["bps"])
            for name, s in sites_cfg.items()
        },
        units=tuple(units),
        bps=data.get("bps", {}),
        qa=data.get("qa", {}),
        demo=data.get("demo", {}),
        notify=data.get("notify", {}),
        rucio=transfer.get("rucio", {}),
        instance=data.get("site"),
        wait_timeout=float(transfer.get("wait", {}).get("timeout_s", Campaign.wait_timeout)),
        wait_interval=float(transfer.get("wait", {}).get("interval_s", Campaign.wait_interval)),
    )
