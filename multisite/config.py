"""Campaign configuration: load, validate and expose it as typed objects.

Everything is checked here, before any rule touches a repository: the YAML against
``schemas/config.schema.yaml``, the units table, and the relations between them
(one central site, every unit at exactly one known site), and every path or name
that reaches a command line (BPS builds job command lines without quoting, and
runs them through a shell). Repositories are checked by the first rule that opens
them, since a site's instance sees only its own. Errors name the field and say how
to fix it. `multisite.validate.validate_campaign` adds the checks that read the pipeline; the workflow
and ``multisite validate`` both run it.
"""

from __future__ import annotations

__all__ = (
    "config_source",
    "Campaign",
    "Site",
    "Stage",
    "Unit",
    "load_campaign",
    "load_config_file",
    "shell_unsafe",
)

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pandas as pd
import yaml

from .errors import CampaignConfigError
from .layout import Layout

_UNIT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SHELL_UNSAFE = re.compile(r"[^A-Za-z0-9._/+:=@%,-]")
"""A character that a path, URI or name reaching a command line unquoted may not hold."""
_SHELL_SAFE_FORM = (
    "use only letters, digits and . _ / + : = @ % , - (no spaces, quotes, $ or other shell syntax), "
    "not starting with -"
)
_ENV_VARIABLE = re.compile(r"\$(?:\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)")
_SYSTEM_TREES = (
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/boot",
    "/dev",
    "/proc",
    "/sys",
    "/run",
    "/snap",
    "/var/lib",
    "/var/log",
    "/var/cache",
    "/var/spool",
    "/var/mail",
    "/var/run",
    "/var/backups",
)
"""System directories a campaign writes neither in nor below."""
_SYSTEM_DIRECTORIES = ("/", "/home", "/root", "/var", "/opt", "/srv", "/mnt", "/media", "/tmp", "/var/tmp")
"""Directories a campaign does not write in directly (a directory of its own below them is fine)."""


@dataclass(frozen=True)
class Site:
    """A data facility taking part in the campaign."""

    name: str
    role: str
    repo: str
    create_repo: bool
    bps: Mapping[str, Any]
    cores: int | None = None
    """Cores the facility gives the campaign (``multisite forecast``)."""
    wan_mb_per_s: float | None = None
    """Throughput of its WAN link to the central site, MB/s (``multisite forecast``)."""
    registry: Mapping[str, str] | None = None
    """Registry database (``db``, ``namespace``) of a repository the campaign creates; `None`: SQLite."""

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
    work_fraction: float | None = None
    """Fraction of a unit's core-hours this stage takes (``multisite forecast``; `None`: not given)."""

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
    move : `int`
        The ``multisite move`` that brought it to its site (0: the first plan).
    """

    name: str
    cells: tuple[tuple[int, int | None], ...]
    site: str
    move: int = 0

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
    import_batch: int = 10_000
    """Files per import transaction at a hand-off's destination (``transfer.import_batch``)."""
    datasets_per_zip: int = 1_000
    """Most datasets in one Butler zip of processed datasets (``transfer.datasets_per_zip``)."""
    chunks_per_handoff: int = 1
    """Chunks whose data one hand-off piece moves (``transfer.chunks_per_handoff``)."""
    preflight: Mapping[str, Any] = field(default_factory=dict)
    """Checks before each chunk is submitted (``space_margin``, ``space_reserve_gb``; see `multisite.bps`)."""
    heartbeat_s: float = 30.0
    """Seconds between two heartbeats of a running step (``status.heartbeat_s``)."""
    forecast: Mapping[str, Any] = field(default_factory=dict)
    """Work and data estimates of ``multisite forecast`` (see `multisite.forecast`)."""
    units_table: Path | None = None
    """The units table file (its optional ``raws`` and ``core_hours`` columns feed the forecast)."""

    def runs_here(self, site: str) -> bool:
        """Whether this instance does ``site``'s work (every site's when no instance site is set)."""
        return self.instance is None or self.instance == site

    def require_site(self, site: str) -> Site:
        """Return a site named on a command line; raise `ValueError` naming the choices if there is none."""
        if site not in self.sites:
            raise ValueError(
                f"--site: {site!r} is not a site of this campaign; choose one of {', '.join(self.sites)}"
            )
        return self.sites[site]

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

    def site_of_run(self, run: str) -> str:
        """Return the site whose stage or hand-off wrote RUN collection ``run`` (``central`` for others)."""
        prefix = self.root_collection + "/"
        return run[len(prefix) :].split("/", 1)[0] if run.startswith(prefix) else "central"

    @property
    def reference_chain(self) -> str:
        """Output collection of the single-site reference run at the central site."""
        return f"{self.root_collection}/reference"

    @property
    def layout(self) -> Layout:
        """Where the campaign's files are (markers, logs, events, submit YAMLs)."""
        return Layout(self.workdir)


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


def _non_finite(value: Any, where: str = "") -> list[str]:
    """Return a problem per NaN or infinity anywhere in ``value`` (JSON Schema numbers accept them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where or '(top level)'}: {value} is not a finite number; give a number (not .nan or .inf)"]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return []
    return [problem for key, item in items for problem in _non_finite(item, f"{where}.{key}".lstrip("."))]


def _schema_problems(config: Mapping[str, Any]) -> list[str]:
    problems = _non_finite(config)
    validator = jsonschema.Draft202012Validator(_schema())
    for error in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        hint = error.schema.get("description")
        # A password in a URL is not echoed back into logs.
        message = re.sub(r"(://[^:/@\s]+):[^@\s]*@", r"\1:***@", error.message)
        if error.validator == "additionalProperties":
            message += "; remove it or check its spelling"
        problems.append(f"{where}: {message}" + (f" (expected: {hint})" if hint else ""))
    return problems


def _read_units(path: Path, sites: Mapping[str, Any]) -> tuple[list[Unit], list[str]]:
    where = f"units table {path}"
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#", header=None)
    except FileNotFoundError:
        return [], [
            f"{where}: file not found; set 'units' to a tab-separated file with unit, tract, patch, site"
        ]
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        return [], [f"{where}: cannot be read as a tab-separated table: {err}"]
    # The header is read as a row: pandas would rename a repeated column (site, site.1) and use one.
    columns = list(table.iloc[0])
    table = table.iloc[1:].set_axis(columns, axis=1)
    if repeated := sorted({name for name in columns if columns.count(name) > 1}):
        return [], [f"{where}: column(s) {repeated} appear more than once; keep one column of each name"]
    missing = {"unit", "tract", "site"} - set(table.columns)
    if missing:
        return [], [f"{where}: missing column(s) {sorted(missing)}; columns are unit, tract, patch, site"]
    if table.empty:
        return [], [f"{where}: no units; add one row per unit of sky"]
    problems: list[str] = []
    sites_of: dict[str, str] = {}
    moves_of: dict[str, int] = {}
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
        move_text = row.get("move", "").strip()
        if move_text and not move_text.isdigit():
            problems.append(
                f"{at}: move {move_text!r} must be a whole number (written by `multisite move`; empty: 0)"
            )
            continue
        key = (tract, patch)
        if key in cells:
            problems.append(
                f"{at}: tract {tract} patch {patch} is also unit {cells[key]!r}; list each sky cell once"
            )
            continue
        sites_of[name] = site
        moves_of[name] = int(move_text or 0)
        cells[key] = name
        cells_of.setdefault(name, []).append(key)
    # A unit of several rows is a group of tracts (or patches), processed as one.
    units = [Unit(name, tuple(cells_of[name]), site, moves_of[name]) for name, site in sites_of.items()]
    return units, problems


def shell_unsafe(value: str) -> str | None:
    """Return why a value must not reach a command line unquoted, or `None` when it may.

    BPS builds its jobs' command lines from submit YAML values (``butlerConfig``,
    ``submitPath``, the ``--data-id-table`` path...) without quoting, and its parsl
    plugin runs them with ``bash``; quotes in a value would reach the shell as they
    are. Paths, URIs and names are therefore held to a conservative character set.

    Parameters
    ----------
    value : `str`
        A path, URI or name.

    Returns
    -------
    reason : `str` or `None`
        What is wrong and the accepted form, or `None` when the value is safe.
    """
    if unsafe := sorted(set(_SHELL_UNSAFE.findall(value))):
        shown = " ".join(repr(char) for char in unsafe)
        return f"contains {shown}, which BPS would pass unquoted to a shell; {_SHELL_SAFE_FORM}"
    if not value or value.startswith("-"):
        return f"is empty or starts with '-', which a command reads as an option; {_SHELL_SAFE_FORM}"
    return None


def _system_directory(real: str) -> str | None:
    """Return the system directory (or ``$HOME``) that a resolved path is or lies in; `None` if none."""
    path = Path(real)
    home = os.environ.get("HOME")
    for top in (*_SYSTEM_DIRECTORIES, *([home] if home else [])):
        if path in {Path(top), Path(os.path.realpath(top))}:
            return f"{top} ($HOME)" if top == home else top
    for top in _SYSTEM_TREES:
        if any(path == root or root in path.parents for root in {Path(top), Path(os.path.realpath(top))}):
            return top
    return None


def _pipeline_problem(pipeline: str) -> str | None:
    """Return the problem of a pipeline that is a missing local file or package resource, else `None`.

    A pipeline under an environment variable not set here (a stack's ``$DRP_PIPE_DIR``
    previewed without the stack) or at a remote URI is read where the workflow runs.
    """
    if _ENV_VARIABLE.search(pipeline):
        return None
    url = urlparse(pipeline) if "://" in pipeline else None
    if url is None or url.scheme == "file":
        found = Path(url.path if url else pipeline).is_file()
    elif url.scheme == "resource":
        try:
            found = resources.files(url.netloc).joinpath(url.path.lstrip("/")).is_file()
        except (ImportError, ValueError):
            found = False
    else:
        return None
    if found:
        return None
    return (
        f"pipeline: no pipeline file at {pipeline!r}; name an existing pipeline YAML "
        "(a path, a resource://<package>/<path> URI or $VARIABLE/<path>)"
    )


def _path_problems(paths: Mapping[str, str], created: set[str]) -> list[str]:
    """Check the campaign's paths: safe on a command line, in no system directory, repositories unshared.

    Parameters
    ----------
    paths : `~collections.abc.Mapping` [`str`, `str`]
        Each path field (``workdir``, ``pipeline``, ``repo_seed``, ``sites.<name>.repo``)
        and its value, environment variables expanded and relative paths resolved.
    created : `set` [`str`]
        The fields of the directories the campaign writes in: the workdir and the
        repositories it creates (``create_repo``).

    Returns
    -------
    problems : `list` [`str`]
        One sentence per problem, naming the field and the fix.
    """
    problems = []
    repos: dict[str, str] = {}
    for name, value in paths.items():
        # Variables left unexpanded are not set here: only the pipeline may name one (a stack's,
        # for a preview without the stack); bps.py refuses it in a submit YAML.
        if shell_unsafe(_ENV_VARIABLE.sub("x", value)):
            problems.append(f"{name}: {value!r} {shell_unsafe(value)}")
            continue
        if (unset := _ENV_VARIABLE.findall(value)) and name != "pipeline":
            problems.append(
                f"{name}: {value!r} uses environment variable(s) {unset}, not set here; "
                "set them or write the path out"
            )
            continue
        if name == "pipeline" and (problem := _pipeline_problem(value)):
            problems.append(problem)
        local = "://" not in value
        real = os.path.realpath(value) if local else value
        if name == "workdir" and not local:
            problems.append(f"workdir: {value!r} is a URI; give a local directory")
        if name in created and local:
            if reason := shell_unsafe(real):
                problems.append(f"{name}: {value!r} resolves to {real!r}, which {reason}")
            if system := _system_directory(real):
                problems.append(
                    f"{name}: {value!r} (resolved: {real}) is or lies in the system directory {system}, "
                    "where the campaign would write; give a directory of its own"
                )
        if name.startswith("sites."):
            if real in repos:
                problems.append(
                    f"{name}: the same repository as {repos[real]} ({real}); "
                    "give each site its own repository"
                )
            repos.setdefault(real, name)
    return problems


def config_source(config: Mapping[str, Any] | str | Path) -> str:
    """Where a configuration comes from, for error messages."""
    return str(config) if isinstance(config, str | Path) else "config"


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
    source = config_source(config)
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
    fractions = [s["work_fraction"] for s in data["stages"] if "work_fraction" in s]
    if sum(fractions) > 1 + 1e-9:
        problems.append(
            f"stages: the stages' work_fraction add up to {sum(fractions):g}, more than 1; "
            "give fractions of a unit's core-hours that add up to 1 at most"
        )
    elif len(fractions) == len(data["stages"]) and abs(sum(fractions) - 1) > 1e-6:
        problems.append(
            f"stages: every stage has a work_fraction and they add up to {sum(fractions):g}; "
            "make them add up to 1, or leave some out to share the rest"
        )
    if data["stages"][0]["location"] != "site":
        problems.append("stages: the first stage must run at the sites (location: site), where the raws are")
    if data.get("site") is not None and data["site"] not in sites_cfg:
        problems.append(
            f"site: {data['site']!r} is not a site of this campaign; use one of {sorted(sites_cfg)} "
            "(the site profile sets it) or leave it unset to run every site in one instance"
        )
    transfer = data.get("transfer", {})
    if transfer.get("backend") == "rucio":
        rses = transfer["rucio"]["rses"]  # the schema requires them with this backend
        if missing := [name for name in sites_cfg if name not in rses]:
            problems.append(
                f"transfer.rucio.rses: no RSE for site(s) {missing}; add '<site>: <RSE name>' for every site"
            )
        if unknown := sorted(set(rses) - set(sites_cfg)):
            problems.append(
                f"transfer.rucio.rses: {unknown} are not sites of this campaign; "
                f"known sites: {sorted(sites_cfg)}"
            )
    units, unit_problems = _read_units(base / data["units"], sites_cfg)
    problems += unit_problems

    def resolve(path: str) -> str:
        # Environment variables (e.g. $DRP_PIPE_DIR in a stack) expand where they are set.
        path = os.path.expandvars(path)
        if "://" in path or path.startswith("$") or Path(path).is_absolute():
            return path
        return str((base / path).resolve())

    paths = {"workdir": resolve(data["workdir"]), "pipeline": resolve(data["pipeline"])}
    if "repo_seed" in data:
        paths["repo_seed"] = resolve(data["repo_seed"])
    paths |= {f"sites.{name}.repo": resolve(site["repo"]) for name, site in sites_cfg.items()}
    created = {
        "workdir",
        *(f"sites.{name}.repo" for name, site in sites_cfg.items() if site.get("create_repo")),
    }
    problems += _path_problems(paths, created)
    if problems:
        raise CampaignConfigError(source, problems)

    collections = data["collections"]
    return Campaign(
        name=data["campaign"],
        instrument=data["instrument"],
        pipeline=paths["pipeline"],
        workdir=Path(paths["workdir"]),
        repo_seed=paths.get("repo_seed"),
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
                s.get("work_fraction"),
            )
            for s in data["stages"]
        ),
        max_quanta=data.get("max_quanta", 100_000),
        sites={
            name: Site(
                name,
                s["role"],
                paths[f"sites.{name}.repo"],
                s.get("create_repo", False),
                s["bps"],
                s.get("cores"),
                s.get("wan_mb_per_s"),
                s.get("registry"),
            )
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
        import_batch=int(transfer.get("import_batch", Campaign.import_batch)),
        datasets_per_zip=int(transfer.get("datasets_per_zip", Campaign.datasets_per_zip)),
        chunks_per_handoff=int(transfer.get("chunks_per_handoff", Campaign.chunks_per_handoff)),
        preflight=data.get("preflight", {}),
        heartbeat_s=float(data.get("status", {}).get("heartbeat_s", Campaign.heartbeat_s)),
        forecast=data.get("forecast", {}),
        units_table=base / data["units"],
    )
