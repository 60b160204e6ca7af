"""BPS: the submit YAML of each chunk of a stage at a site, and running a chunk until verified.

`submit_config` builds the YAML an operator would write by hand for one chunk;
`run_stage` checks the site's repository first (`preflight`: its registry takes
writes, its datastore has room for the chunk's estimated outputs), builds the
quantum graph of what is still missing (`chunk_graph`), submits it with ``bps
submit``, and verifies the outputs, because ``bps submit`` exits 0 even when quanta
fail; a failure names the first real error line of the jobs' logs (`first_error`).
`prepare_stage` stops at ``bps prepare`` on the same graph, to check a facility's
WMS settings; `finish_stage` gathers a stage's verified chunks at a site.
"""

from __future__ import annotations

__all__ = (
    "SPACE_MARGIN",
    "SPACE_RESERVE_GB",
    "ChunkGraph",
    "ChunkQuery",
    "ErrorLine",
    "Preflight",
    "PreparedChunk",
    "check_registry_writable",
    "chunk_graph",
    "chunk_query",
    "chunk_refs",
    "estimate_output_bytes",
    "finish_stage",
    "first_error",
    "preflight",
    "prepare_stage",
    "run_stage",
    "stage_inputs",
    "submit_config",
    "write_stage_yaml",
    "write_submit_yaml",
)

import contextlib
import getpass
import json
import logging
import math
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from astropy.table import Table
from lsst.daf.butler import Butler, CollectionType, DatasetRef
from lsst.pipe.base import Pipeline
from lsst.pipe.base.all_dimensions_quantum_graph_builder import AllDimensionsQuantumGraphBuilder

from .backends import datastore_root, delete_datastore_files, orphaned_files
from .butler_utils import collection_exists, ensure_in_chain, open_butler, repo_write_lock, run_tool
from .config import Campaign, shell_unsafe
from .errors import CampaignConfigError, HandoffError, StageFailed
from .flow import stage_chunks, stage_dependencies
from .markers import provenance, read_marker, read_marker_if_written
from .pipeline import PipelineFlow
from .placement import chunk_data_ids, units_query

_LOG = logging.getLogger(__name__)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def stage_inputs(campaign: Campaign, site: str, stage: str) -> list[str]:
    """Input collections of a stage at a site: its earlier stages there, then what was handed to it."""
    same_place, _ = stage_dependencies(campaign, campaign.stage(stage))
    return [campaign.stage_chain(site, s) for s in reversed(same_place)] + [campaign.handoff_chain(site)]


@dataclass(frozen=True)
class ChunkQuery:
    """What one chunk of a stage processes at a site.

    Attributes
    ----------
    units : `tuple` [`str`, ...]
        The chunk's units.
    where : `str`
        Butler query expression over the chunk's units.
    data_ids : `astropy.table.Table` or `None`
        For a per-visit stage, the (visit, detector) data IDs of the chunk, so that
        the chunks of a stage never process a raw twice.
    """

    units: tuple[str, ...]
    where: str
    data_ids: Table | None


def chunk_query(
    campaign: Campaign, flow: PipelineFlow, site: str, stage: str, chunk: str, placement: pd.DataFrame
) -> ChunkQuery:
    """Return the data selection of one chunk of a stage at a site."""
    units = stage_chunks(campaign, site, campaign.stage(stage))[chunk]
    where = units_query(campaign, [cell for u in campaign.units if u.name in units for cell in u.cells])
    if campaign.stage(stage).is_central or flow.is_sky_stage(stage):
        return ChunkQuery(units, where, None)
    return ChunkQuery(units, where, chunk_data_ids(campaign, placement, site, units))


def submit_config(
    campaign: Campaign,
    flow: PipelineFlow,
    site: str,
    stage: str,
    chunk: str,
    query: ChunkQuery,
    data_id_table: Path | None = None,
) -> dict[str, Any]:
    """Return the BPS submit configuration of one chunk of a stage at one site.

    Settings merge in this order, later winning: the campaign's ``bps``, the site's
    ``bps`` (its WMS, compute site, queues), the stage's ``bps`` (e.g. clustering).
    A per-visit chunk's data IDs are passed to the graph builder as a table file.
    """
    merged = _merge(_merge(campaign.bps, campaign.sites[site].bps), campaign.stage(stage).bps)
    generated: dict[str, Any] = {
        "pipelineYaml": flow.subset_uri(stage),
        "project": campaign.name,
        "campaign": campaign.name,
        "submitPath": str(campaign.layout.submit_dir(site, stage, chunk) / "{timestamp}"),
        "payload": {
            "payloadName": f"{campaign.name}_{site}_{stage}_{chunk}",
            "butlerConfig": campaign.sites[site].repo,
            "inCollection": ",".join(stage_inputs(campaign, site, stage)),
            "output": campaign.stage_chain(site, stage, chunk),
            "outputRun": "{output}/{timestamp}",
            "dataQuery": query.where,
        },
    }
    if data_id_table is not None:
        extra = f"{merged.get('extraQgraphOptions', '')} --data-id-table {data_id_table}".strip()
        generated["extraQgraphOptions"] = extra
    return _merge(merged, generated)


_BPS_PLACEHOLDERS = re.compile(r"\{(?:output|timestamp)\}")
"""The BPS variables that `submit_config` puts in values; BPS itself replaces them."""
_QUOTED_UNSAFE = re.compile(r'["$`\\]|[^\x20-\x7e]')
"""What a value that BPS puts between double quotes (``-d "{dataQuery}"``) may not hold."""


def _refuse_unsafe_values(
    config: Mapping[str, Any], site: str, data_id_table: Path | None, path: Path
) -> None:
    """Refuse a submit configuration whose generated values could reach a shell as syntax.

    BPS puts these values on its jobs' command lines without quoting (the parsl
    plugin runs them with ``bash``). `multisite.config.load_campaign` refuses unsafe
    paths and names already; this checks again what is about to be written, so that
    a value that bypassed it (a `Campaign` built or changed in code, a path resolved
    through a symlink since) never reaches BPS.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        The submit configuration (from `submit_config`).
    site : `str`
        The site it runs at.
    data_id_table : `pathlib.Path` or `None`
        The ``--data-id-table`` file it names, if any.
    path : `pathlib.Path`
        The submit YAML it would be written to.

    Raises
    ------
    CampaignConfigError
        Raised naming each unsafe key, the config field it comes from and the fix.
    """
    payload = config["payload"]
    pipeline, _, subset = config["pipelineYaml"].partition("#")
    values = {
        "pipelineYaml (config field pipeline)": pipeline,
        "pipelineYaml (config field stages[].subset)": subset,
        "project and campaign (config field campaign)": config["campaign"],
        "submitPath (config field workdir)": config["submitPath"],
        "payload.payloadName (campaign, site, stage and unit names)": payload["payloadName"],
        f"payload.butlerConfig (config field sites.{site}.repo)": payload["butlerConfig"],
        "payload.inCollection (config field collections.root)": payload["inCollection"],
        "payload.output (config field collections.root)": payload["output"],
        "payload.outputRun (config field collections.root)": payload["outputRun"],
    }
    if data_id_table is not None:
        values["extraQgraphOptions --data-id-table (config field workdir)"] = str(data_id_table)
    problems = [
        f"{key}: {value!r} {reason}"
        for key, value in values.items()
        if (reason := shell_unsafe(_BPS_PLACEHOLDERS.sub("x", value)))
    ]
    if _QUOTED_UNSAFE.search(payload["dataQuery"]):
        problems.append(
            f"payload.dataQuery (config fields instrument and skymap, units table): {payload['dataQuery']!r} "
            "holds a double quote, $, backquote, backslash or a non-printable character; fix the config"
        )
    if problems:
        raise CampaignConfigError(f"submit YAML {path}", problems)


def write_submit_yaml(config: Mapping[str, Any], path: str | Path, header: str) -> None:
    """Write a BPS submit configuration as YAML with a comment header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(text + yaml.safe_dump(dict(config), sort_keys=False, width=1_000_000))


def chunk_refs(butler: Butler, dataset_type: str, chain: str) -> list[DatasetRef]:
    """Return the datasets of ``dataset_type`` written by a chunk's own attempts.

    Only the chunk's RUNs (``<chain>/<timestamp>``) count: its chain also holds,
    flattened, the input collections it started from, which may include other
    sites' products handed to this site (final products arriving at the central
    site, say).

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The site's repository.
    dataset_type : `str`
        Dataset type name.
    chain : `str`
        The chunk's output CHAINED collection.

    Returns
    -------
    refs : `list` [`lsst.daf.butler.DatasetRef`]
        Empty when the type or the chain is not registered.
    """
    if not butler.registry.queryDatasetTypes(dataset_type) or not collection_exists(butler, chain):
        return []
    runs = [run for run in butler.collections.get_info(chain).children if run.startswith(f"{chain}/")]
    if not runs:
        return []
    return butler.query_datasets(dataset_type, collections=runs, limit=None, explain=False)


def _present(butler: Butler, dataset_type: str, chain: str) -> set:
    """Return the data IDs of ``dataset_type`` written by a chunk's own attempts (see `chunk_refs`)."""
    return {ref.dataId for ref in chunk_refs(butler, dataset_type, chain)}


def _check_outputs(
    butler: Butler, chain: str, quanta: Mapping[str, Any], submit_dir: str | None
) -> list[str]:
    """Return a line per quantum whose metadata (its success flag) is missing in ``chain``."""
    failures = []
    for label, by_data_id in quanta.items():
        done = _present(butler, f"{label}_metadata", chain)
        missing = [data_id for data_id in by_data_id if data_id not in done]
        logs = _present(butler, f"{label}_log", chain) if missing else set()
        for data_id in missing:
            if data_id in logs:
                ref = butler.find_dataset(f"{label}_log", data_id, collections=chain)
                where = f"log: {butler.getURI(ref)}"
            else:
                where = f"logs under {submit_dir}/logs" if submit_dir else "no log (not run)"
            failures.append(f"{label} {data_id.required} -- {where}")
    return failures


def _write_expected(path: Path, graph: Any, outputs: set[str]) -> None:
    """Record the outputs a quantum graph predicts, for completeness checks after every attempt."""
    expected = {
        name: sorted(json.dumps(dict(data_id.required), sort_keys=True) for data_id in by_id)
        for name, by_id in graph.datasets_by_type.items()
        if name in outputs
    }
    path.write_text(json.dumps(expected))


def _read_expected(directory: Path) -> dict[str, set[str]]:
    """Union of the outputs predicted by every attempt's quantum graph of a stage at a site."""
    expected: dict[str, set[str]] = {}
    for path in sorted(directory.glob("*.expected.json")):
        for name, data_ids in json.loads(path.read_text()).items():
            expected.setdefault(name, set()).update(data_ids)
    return expected


def _unit_counts(
    campaign: Campaign, units: tuple[str, ...], expected: dict[str, set[str]], produced: dict[str, set]
) -> dict[str, dict[str, list[int]]]:
    """Return expected and produced counts per unit, for dataset types with sky-map dimensions."""
    keys = {
        name: {json.dumps(dict(d.required), sort_keys=True) for d in ids} for name, ids in produced.items()
    }
    result: dict[str, dict[str, list[int]]] = {}
    for unit in (u for u in campaign.units if u.name in units):
        for name, data_ids in expected.items():
            mine = [d for d in data_ids if unit.contains((v := json.loads(d)).get("tract"), v.get("patch"))]
            if mine:
                found = sum(1 for d in mine if d in keys.get(name, ()))
                result.setdefault(unit.name, {})[name] = [len(mine), found]
    return result


@dataclass(frozen=True)
class ChunkGraph:
    """The quantum graph of what is still missing of one chunk, written for BPS.

    Attributes
    ----------
    label : `str`
        The chunk, for messages ("step1 at in2p3 (chunk c0000)").
    chain : `str`
        The chunk's output CHAINED collection.
    inputs : `list` [`str`]
        The stage's input collections at the site.
    query : `ChunkQuery`
        What the chunk processes.
    resumed : `bool`
        Whether an earlier attempt already wrote to ``chain`` (its quanta with
        outputs there are skipped).
    quanta : `dict` [`str`, `dict`]
        The graph's quanta by task label and data ID.
    n_quanta : `int`
        How many quanta the graph has.
    graph : `lsst.pipe.base.quantum_graph.PredictedQuantumGraph`
        The graph.
    path : `pathlib.Path` or `None`
        The graph file for ``bps -g``; `None` when the graph is empty.
    """

    label: str
    chain: str
    inputs: list[str]
    query: ChunkQuery
    resumed: bool
    quanta: dict[str, dict]
    n_quanta: int
    graph: Any
    path: Path | None


def chunk_graph(
    campaign: Campaign,
    site: str,
    stage: str,
    chunk: str,
    placement: pd.DataFrame,
    directory: Path,
    stamp: str,
    flow: PipelineFlow | None = None,
) -> ChunkGraph:
    """Build the quantum graph of what is missing of one chunk and write it to ``directory``.

    Quanta whose outputs already exist in the chunk's output chain are skipped.
    The graph file is ``<directory>/<stamp>.qg``, for ``bps submit`` or
    ``bps prepare`` with ``-g``; nothing is written when no quantum is missing.

    Raises
    ------
    StageFailed
        Raised when nothing matches the chunk's query on a first attempt, or when
        the graph has more than the campaign's ``max_quanta`` quanta.
    """
    flow = flow or PipelineFlow(campaign)
    chain = campaign.stage_chain(site, stage, chunk)
    inputs = stage_inputs(campaign, site, stage)
    query = chunk_query(campaign, flow, site, stage, chunk, placement)
    label = _chunk_label(site, stage, chunk)
    butler = open_butler(campaign.sites[site].repo)
    resumed = collection_exists(butler, chain)
    builder = AllDimensionsQuantumGraphBuilder(
        Pipeline.from_uri(flow.subset_uri(stage)).to_graph(),
        butler,
        where=query.where,
        data_id_tables=[query.data_ids] if query.data_ids is not None else (),
        input_collections=[chain, *inputs] if resumed else inputs,
        output_run=f"{chain}/{stamp}",
        skip_existing_in=[chain] if resumed else [],
    )
    components = builder.finish(
        chain, metadata={"campaign": campaign.name, "site": site, "stage": stage, "chunk": chunk}
    )
    graph = components.assemble()
    quanta = {task: dict(by_id) for task, by_id in graph.quanta_by_task.items() if by_id}
    n_quanta = sum(len(by_id) for by_id in quanta.values())
    if n_quanta == 0 and not resumed:
        raise StageFailed(
            f"{label}: the quantum graph is empty; no inputs matched {query.where!r} in {inputs}. "
            "Check the hand-offs into this site and the units table."
        )
    if n_quanta > campaign.max_quanta:
        raise StageFailed(
            f"{label}: {n_quanta} quanta, more than max_quanta ({campaign.max_quanta}); "
            f"set a smaller stages[{stage}].units_per_chunk (or a larger quanta_per_unit estimate)."
        )
    path = None
    if n_quanta:
        path = directory / f"{stamp}.qg"
        path.parent.mkdir(parents=True, exist_ok=True)
        components.write(str(path))
    return ChunkGraph(label, chain, inputs, query, resumed, quanta, n_quanta, graph, path)


def _chunk_label(site: str, stage: str, chunk: str) -> str:
    """Name a chunk in messages: ``step1 at ral (chunk c0000)``."""
    return f"{stage} at {site} (chunk {chunk})"


# ---------------------------------------------------------------------- preflight

SPACE_MARGIN = 0.5
"""Default ``preflight.space_margin``: the fraction of a chunk's estimated output bytes added to them."""
SPACE_RESERVE_GB = 0.0
"""Default ``preflight.space_reserve_gb``: free space (GB) a datastore keeps on top of a chunk's outputs."""
_SIZE_SAMPLE = 50
"""Files whose size is read per dataset type to estimate the bytes of all of them."""


class _ProbeDone(Exception):
    """Raised inside the registry probe's transaction to roll its write back."""


def _root_cause(error: BaseException) -> str:
    """Return the first line of the innermost cause of ``error`` (the DBAPI error under SQLAlchemy's)."""
    while True:
        inner = getattr(error, "orig", None) or error.__cause__
        if not isinstance(inner, BaseException) or inner is error:
            break
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def check_registry_writable(campaign: Campaign, site: str, what: str) -> None:
    """Refuse to go on unless a site's registry accepts a write.

    The probe opens the repository for writing and registers a RUN collection of
    a unique name in a transaction that is rolled back, so nothing stays; it
    fails the way the chunk's jobs would (``attempt to write a readonly
    database`` for a read-only SQLite file, a permission error for a PostgreSQL
    account without grants or a read-only replica). Call it holding the
    repository's write lock: another writer would make SQLite answer ``database
    is locked``.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    site : `str`
        The site whose repository is checked.
    what : `str`
        The step, for the message (``step1 at ral (chunk c0000)``).

    Raises
    ------
    StageFailed
        Raised naming the site, the repository, the database's error and the fix.
    """
    repo = campaign.sites[site].repo
    probe = f"{campaign.root_collection}/{site}/preflight/{uuid.uuid4().hex}"
    try:
        with open_butler(repo, writeable=True) as butler:
            with contextlib.suppress(_ProbeDone), butler.transaction():
                butler.collections.register(probe, CollectionType.RUN)
                raise _ProbeDone()
    except FileNotFoundError as err:
        raise StageFailed(f"{what}: preflight: {err}; fix sites.{site}.repo in the campaign config") from None
    except Exception as err:
        database = Path(repo) / "gen3.sqlite3"
        where = (
            f"the SQLite file {database} and its directory (permissions for user {getpass.getuser()}, "
            "a read-only mount, an immutable flag: lsattr)"
            if database.exists()
            else "the database account's grants (INSERT, UPDATE, DELETE) and that it is no read-only replica"
        )
        raise StageFailed(
            f"{what}: preflight: the registry of site {site}'s repository {repo} is not writable: "
            f"{_root_cause(err)}. Nothing was submitted. Fix: make the registry writable (check {where}), "
            "then rerun."
        ) from err


def _size(nbytes: float) -> str:
    """Format a byte count for a person (``1.5 GB``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


@dataclass(frozen=True)
class Preflight:
    """A site's datastore as found before a chunk is submitted, to check it has room for the chunk.

    Attributes
    ----------
    what : `str`
        The chunk, for messages.
    site : `str`
        Its site.
    repo : `str`
        The site's repository.
    datastore : `pathlib.Path` or `None`
        The datastore's local root; `None` when it is not one local file datastore
        (an object store): its space is then not checked.
    margin : `float`
        ``preflight.space_margin``: the fraction of the estimated output bytes added to them.
    reserve : `int`
        ``preflight.space_reserve_gb``, in bytes: kept free on top.
    """

    what: str
    site: str
    repo: str
    datastore: Path | None
    margin: float
    reserve: int

    def require(self, estimated: int = 0, basis: str = "nothing yet") -> dict[str, Any]:
        """Refuse to go on unless the datastore's filesystem has room for ``estimated`` bytes of outputs.

        It needs ``estimated * (1 + margin) + reserve`` bytes free.

        Parameters
        ----------
        estimated : `int`
            The chunk's estimated output bytes (`estimate_output_bytes`).
        basis : `str`
            What the estimate comes from, for the message and the marker.

        Returns
        -------
        figures : `dict`
            What was checked: datastore, free, estimated and required bytes, basis.

        Raises
        ------
        StageFailed
            Raised naming the site, the datastore, the numbers and the fixes.
        """
        figures: dict[str, Any] = {"datastore": None if self.datastore is None else str(self.datastore)}
        if self.datastore is None:
            return figures | {"checked": False}
        existing = next(p for p in (self.datastore, *self.datastore.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        required = math.ceil(estimated * (1 + self.margin)) + self.reserve
        if free < required:
            raise StageFailed(
                f"{self.what}: preflight: not enough free space for site {self.site}'s datastore "
                f"{self.datastore} (repository {self.repo}): {_size(free)} free, {_size(required)} needed = "
                f"the chunk's outputs, estimated at {_size(estimated)} ({basis}), "
                f"+ {self.margin:.0%} (preflight.space_margin) + {_size(self.reserve)} kept free "
                "(preflight.space_reserve_gb). Nothing was submitted. Fix: free space on that filesystem "
                f"(`multisite orphans CONFIG --site {self.site} --delete` removes the files of failed and "
                "killed attempts), or give the datastore more room, or lower preflight.space_reserve_gb or "
                "preflight.space_margin in the campaign config; then rerun."
            )
        return figures | {
            "checked": True,
            "free_bytes": free,
            "estimated_bytes": estimated,
            "estimate_from": basis,
            "required_bytes": required,
        }


def preflight(campaign: Campaign, site: str, what: str) -> Preflight:
    """Check a site's repository before anything of a chunk is submitted.

    The registry must accept a write (`check_registry_writable`) and the
    datastore keep ``preflight.space_reserve_gb`` free; the room for the chunk's
    outputs is checked with `Preflight.require` once its graph is known. Call it
    holding the repository's write lock.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign; its ``preflight`` settings give the margin and the reserve.
    site : `str`
        The site.
    what : `str`
        The chunk, for messages.

    Returns
    -------
    checks : `Preflight`
        The site's datastore and the settings, to check the chunk's needs with.

    Raises
    ------
    StageFailed
        Raised when the registry is not writable or the reserve is not free.
    """
    check_registry_writable(campaign, site, what)
    repo = campaign.sites[site].repo
    try:
        root: Path | None = datastore_root(open_butler(repo))
    except HandoffError:
        _LOG.info(
            "%s: the datastore of %s is not one local directory; its free space is not checked.", what, site
        )
        root = None
    settings = campaign.preflight
    checks = Preflight(
        what,
        site,
        repo,
        root,
        float(settings.get("space_margin", SPACE_MARGIN)),
        round(float(settings.get("space_reserve_gb", SPACE_RESERVE_GB)) * 1e9),
    )
    checks.require()
    return checks


def _bytes_of(butler: Butler, ids: Sequence[Any]) -> int:
    """Estimate the bytes of the files of datasets ``ids`` from an even sample of at most 50 of them."""
    if not ids:
        return 0
    sample = list(ids[:: max(1, len(ids) // _SIZE_SAMPLE)][:_SIZE_SAMPLE])
    total = 0
    for uris in butler.get_many_uris(butler.get_many_datasets(sample), allow_missing=True).values():
        for uri in (uris.primaryURI, *uris.componentURIs.values()):
            if uri is not None:
                with contextlib.suppress(FileNotFoundError):
                    total += uri.size()
    return round(total * len(ids) / len(sample))


def _bytes_per_dataset(campaign: Campaign, stage: str) -> dict[str, float]:
    """Return the mean bytes of each output type of a stage in its chunks verified so far (their markers)."""
    sums: dict[str, list[float]] = {}
    for runner in campaign.stage_sites(campaign.stage(stage)):
        for chunk in stage_chunks(campaign, runner.name, campaign.stage(stage)):
            path = campaign.layout.chunk_marker(runner.name, stage, chunk)
            marker = read_marker_if_written(path)
            for name, nbytes in marker.get("output_bytes", {}).items():
                if count := marker["datasets"].get(name, 0):
                    totals = sums.setdefault(name, [0.0, 0])
                    totals[0] += nbytes
                    totals[1] += count
    return {name: nbytes / count for name, (nbytes, count) in sums.items()}


def estimate_output_bytes(
    campaign: Campaign, flow: PipelineFlow, site: str, stage: str, graph: Any
) -> tuple[int, str]:
    """Estimate the bytes a chunk's quantum graph will write to the datastore, and say from what.

    The graph's predicted output datasets at the mean size of the stage's outputs
    in the chunks verified so far (their markers' ``output_bytes``), when those
    cover every output type; otherwise as many bytes as the graph's overall
    inputs hold (the sizes of a sample of them).

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    flow : `PipelineFlow`
        Its pipeline's dataset types per stage.
    site, stage : `str`
        Where the chunk runs, and its stage.
    graph : `lsst.pipe.base.quantum_graph.PredictedQuantumGraph`
        The chunk's quantum graph (`ChunkGraph.graph`).

    Returns
    -------
    estimated : `int`
        Bytes.
    basis : `str`
        What the estimate comes from, for messages and the marker.
    """
    outputs = flow.outputs(stage)
    predicted = {name: len(by_id) for name, by_id in graph.datasets_by_type.items() if name in outputs}
    per_dataset = _bytes_per_dataset(campaign, stage)
    if predicted and all(name in per_dataset for name in predicted):
        estimated = round(sum(count * per_dataset[name] for name, count in predicted.items()))
        return estimated, f"{sum(predicted.values())} output datasets at their mean size in verified chunks"
    inputs = flow.inputs(stage) - outputs
    butler = open_butler(campaign.sites[site].repo)
    by_type = {name: list(by_id.values()) for name, by_id in graph.datasets_by_type.items() if name in inputs}
    estimated = sum(_bytes_of(butler, ids) for ids in by_type.values())
    n_inputs = sum(len(ids) for ids in by_type.values())
    return estimated, f"as many bytes as its {n_inputs} input datasets"


# ---------------------------------------------------------------------- the first real error

_ROOT_CAUSE = re.compile(
    r"No space left on device|Disk quota exceeded|Read-only file system|readonly database|"
    r"Permission denied|Operation not permitted|database is locked|unable to open database file|"
    r"Too many open files|Cannot allocate memory|MemoryError|Out of memory|Connection refused"
)
"""Words of the errors that are a failure's cause rather than its consequence."""
_EXCEPTION = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Failure|Interrupt|Exit)\b(?::.*)?$"
)
"""The last line of a Python traceback: ``RuntimeError: ...``, ``sqlite3.OperationalError: ...``."""
_ERROR_LEVEL = re.compile(r"^(?:ERROR|CRITICAL|FATAL)\b|\s(?:ERROR|CRITICAL):\s")
"""A log line at an error level: LSST's ``--long-log`` format, or parsl's."""
_QUIET_LEVEL = re.compile(r"^(?:INFO|VERBOSE|DEBUG|TRACE|WARNING)\b|\s(?:INFO|DEBUG|WARNING):\s|^\+ ")
"""A log line that is not an error, whatever it mentions (and a shell's trace of a command)."""
_LONG_LOG = re.compile(r"^(?P<level>[A-Z]+) \S+ (?P<logger>\S+) .*?\(\S+:\d+\) - (?P<message>.*)$")
"""LSST's ``--long-log`` line: level, time, logger, (label)(file:line) - message."""
_LOG_SUFFIXES = (".stderr", ".stdout", ".err", ".out")
_MAX_LOG_BYTES = 20_000_000
"""Bytes read of one log at most."""


@dataclass(frozen=True)
class ErrorLine:
    """The line of a failed submission's logs that says what went wrong.

    Attributes
    ----------
    text : `str`
        The line (an LSST log line shortened to its level, logger and message).
    path : `pathlib.Path`
        The log it is in.
    line : `int`
        Its line number there (from 1).
    """

    text: str
    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.text} (first error: {self.path} line {self.line})"


def _log_files(submit_dir: Path | None, logs: Sequence[Path]) -> list[Path]:
    """Return a submission's logs in the order its jobs ran, then parsl's logs of it, then ``logs``.

    Jobs' logs are the submit directory's ``*.stderr``/``*.stdout`` (``*.err``,
    ``*.out`` for HTCondor), ``pipetaskInit`` first and ``finalJob`` last, each
    job's stderr before its stdout; parsl's are the ``runinfo/*/parsl.log`` files
    of the directory BPS ran in (the rule's) that name the submit directory.
    """

    def job_order(path: Path) -> tuple[int, bool, str]:
        rank = 0 if "pipetaskInit" in path.name else 2 if "finalJob" in path.name else 1
        return rank, path.suffix not in (".stderr", ".err"), str(path)

    found: list[Path] = []
    if submit_dir is not None and submit_dir.is_dir():
        jobs = [p for p in submit_dir.rglob("*") if p.suffix in _LOG_SUFFIXES and p.is_file()]
        found += sorted(jobs, key=job_order)
        for parsl_log in sorted(Path("runinfo").resolve().glob("*/parsl.log")):
            with contextlib.suppress(OSError), parsl_log.open(errors="replace") as stream:
                if str(submit_dir) in stream.read(_MAX_LOG_BYTES):
                    found.append(parsl_log)
    return found + [path for path in logs if path.is_file()]


def _shorten(line: str) -> str:
    """Return a log line without its time and code location, at most 400 characters."""
    if match := _LONG_LOG.match(line):
        line = f"{match['level']} {match['logger']}: {match['message']}"
    return line if len(line) <= 400 else line[:397] + "..."


def first_error(submit_dir: str | Path | None, logs: Sequence[Path] = ()) -> ErrorLine | None:
    """Return the first line of a failed submission's logs that says what went wrong.

    The logs are read in the order the jobs ran (see `_log_files`). The first line
    naming a known root cause (``No space left on device``, ``attempt to write a
    readonly database``, ``Permission denied``, ...) wins; failing that, the first
    exception line of a traceback (``RuntimeError: ...``); failing that, the first
    line logged at ERROR or CRITICAL level. Informational lines (INFO, VERBOSE,
    WARNING, a shell's ``+ command`` trace) never count.

    Parameters
    ----------
    submit_dir : `str` or `pathlib.Path` or `None`
        The BPS submit directory (`None` when BPS stopped before making one).
    logs : `~collections.abc.Sequence` [`pathlib.Path`]
        Further logs to read last (the ``bps submit`` output).

    Returns
    -------
    error : `ErrorLine` or `None`
        `None` when no log holds an error line.
    """
    found: dict[str, ErrorLine] = {}
    for path in _log_files(None if submit_dir is None else Path(submit_dir), logs):
        with contextlib.suppress(OSError), path.open(errors="replace") as stream:
            read = 0
            for number, raw in enumerate(stream, start=1):
                read += len(raw)
                line = raw.strip()
                if read > _MAX_LOG_BYTES or not line or _QUIET_LEVEL.search(line):
                    continue
                for kind, pattern in (
                    ("cause", _ROOT_CAUSE),
                    ("exception", _EXCEPTION),
                    ("error", _ERROR_LEVEL),
                ):
                    if kind not in found and pattern.search(line):
                        found[kind] = ErrorLine(_shorten(line), path, number)
                if "cause" in found:
                    return found["cause"]
    return found.get("exception") or found.get("error")


def _because(error: ErrorLine | None) -> str:
    return f": {error}" if error else ""


@contextlib.contextmanager
def _write_lock(campaign: Campaign, site: str, what: str) -> Iterator[None]:
    """Hold a site repository's write lock (`repo_write_lock`); a lock that cannot be taken is refused."""
    repo = campaign.sites[site].repo
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(repo_write_lock(repo))
        except OSError as err:
            raise StageFailed(
                f"{what}: preflight: cannot take the write lock of site {site}'s repository {repo}: {err}. "
                f"Nothing was submitted. Fix: make {repo} writable for user {getpass.getuser()}, then rerun."
            ) from err
        yield


def _remove_files_of_killed_attempts(repo: str, root: Path, chain: str, what: str) -> None:
    """Delete the files a chunk's earlier attempts wrote and never registered (a killed ``bps submit``'s).

    They lie under the chunk's RUNs (``<chunk chain>/<stamp>``) in the datastore
    at ``root``, which only the chunk's own attempts write, and an attempt's jobs
    end with its ``bps submit``; so the chunk's next attempt removes them before
    it starts, and no killed attempt leaves files behind for ``multisite orphans``.
    """
    butler = open_butler(repo)
    files = orphaned_files(butler, root, chain)
    if files:
        _LOG.warning(
            "%s: deleting %d files of earlier attempts that no registry row refers to "
            "(a killed submission's), e.g. %s.",
            what,
            len(files),
            files[0].relative_to(root),
        )
        delete_datastore_files(files, root)


def run_stage(
    campaign: Campaign, site: str, stage: str, chunk: str, submit_yaml: str | Path, placement: pd.DataFrame
) -> dict[str, Any]:
    """Run what is missing of one chunk of a stage at one site through BPS, and verify it.

    Quanta whose outputs already exist in the chunk's output chain are skipped, so
    a rerun after a failure runs only the failed quanta, in a new RUN collection
    prepended to the chain, and never duplicates a dataset. Before anything is
    submitted, the site's repository is checked (`preflight`): its registry takes
    writes, its datastore has room for the chunk's estimated outputs.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    site, stage, chunk : `str`
        Where and what to run.
    submit_yaml : `str` or `pathlib.Path`
        The chunk's BPS submit YAML (written by `write_stage_yaml`).
    placement : `pandas.DataFrame`
        The campaign's placement table.

    Returns
    -------
    marker : `dict`
        Provenance for the chunk's marker.

    Raises
    ------
    StageFailed
        Raised before anything is submitted when the site's registry is not
        writable or its datastore lacks room (naming the numbers and the fix), or
        when the chunk is larger than the campaign's ``max_quanta``; after the
        submission, naming the first real error line of the jobs' logs
        (`first_error`) and each failed quantum and its log.
    """
    started = datetime.now(UTC)
    flow = PipelineFlow(campaign)
    repo = campaign.sites[site].repo
    stamp = started.strftime("%Y%m%dT%H%M%S%fZ")
    qgraph_dir = campaign.layout.qgraph_dir(site, stage, chunk)
    label = _chunk_label(site, stage, chunk)
    submit_dir = None
    command: list[str] | None = None
    space: dict[str, Any] = {}
    with _write_lock(campaign, site, label):
        checks = preflight(campaign, site, label)
        if checks.datastore is not None:  # else preflight said it is not one local directory
            chain = campaign.stage_chain(site, stage, chunk)
            _remove_files_of_killed_attempts(repo, checks.datastore, chain, label)
        built = chunk_graph(campaign, site, stage, chunk, placement, qgraph_dir, stamp, flow)
        chain, quanta, n_quanta = built.chain, built.quanta, built.n_quanta
        if built.path is not None:
            space = checks.require(*estimate_output_bytes(campaign, flow, site, stage, built.graph))
            _write_expected(built.path.with_suffix(".expected.json"), built.graph, flow.outputs(stage))
            _LOG.info("%s: submitting %d quanta (%s).", label, n_quanta, built.path)
            command = ["bps", "submit", str(submit_yaml), "-g", str(built.path)]
            submit_dir = _bps_submit(command, built.path.with_suffix(".bps.log"), label)
        else:
            _LOG.info("%s: every quantum already has its outputs in %s.", label, chain)
        butler = open_butler(repo)
        failures = _check_outputs(butler, chain, quanta, submit_dir)
    if failures:
        listing = "\n".join(f"    {line}" for line in failures[:50])
        raise StageFailed(
            f"{label}: {len(failures)} of {n_quanta} quanta failed{_because(first_error(submit_dir))}\n"
            f"    bps submit dir: {submit_dir}\n{listing}\n"
            "Fix the cause and rerun: only the failed quanta run again."
        )
    query = built.query
    refs = {name: chunk_refs(butler, name, chain) for name in sorted(flow.outputs(stage))}
    produced = {name: {ref.dataId for ref in found} for name, found in refs.items()}
    expected = _read_expected(qgraph_dir)
    return {
        "site": site,
        "stage": stage,
        "chunk": chunk,
        "chunk_units": list(query.units),
        "expected": {name: len(ids) for name, ids in sorted(expected.items())},
        "units": _unit_counts(campaign, query.units, expected, produced),
        "repo": repo,
        "output_chain": chain,
        "runs": list(butler.collections.get_info(chain).children),
        "input_collections": built.inputs,
        "data_query": query.where,
        "data_ids": None if query.data_ids is None else len(query.data_ids),
        "quanta_run": n_quanta,
        "datasets": {name: len(ids) for name, ids in produced.items()},
        "output_bytes": {name: _bytes_of(butler, [ref.id for ref in found]) for name, found in refs.items()},
        "preflight": space,
        "bps_submit_dir": submit_dir,
        "submit_yaml": str(Path(submit_yaml).resolve()),
        **provenance(started, command),
    }


@dataclass(frozen=True)
class PreparedChunk:
    """What ``bps prepare`` made of one chunk, for checking a facility's WMS settings.

    Attributes
    ----------
    submit_dir : `pathlib.Path`
        The submit directory BPS wrote (the YAML's ``submitPath``): the WMS
        plugin's files (HTCondor's ``.dag`` and ``.sub`` files, PanDA's
        ``panda_workflow.pickle``, parsl's ``parsl_workflow.pickle``) and BPS's own.
    graph : `ChunkGraph`
        The chunk's quantum graph the workflow was prepared from.
    wms_workflow : `lsst.ctrl.bps.BaseWmsWorkflow`
        The plugin's prepared workflow (e.g. its DAG, IDDS workflow or parsl config).
    config : `lsst.ctrl.bps.BpsConfig`
        The BPS configuration as resolved for the workflow.
    """

    submit_dir: Path
    graph: ChunkGraph
    wms_workflow: Any
    config: Any


def prepare_stage(
    campaign: Campaign,
    site: str,
    stage: str,
    chunk: str,
    submit_yaml: str | Path,
    placement: pd.DataFrame,
    submission_checks: bool = True,
) -> PreparedChunk:
    """Prepare what is missing of one chunk through BPS without submitting it.

    The quantum graph is built exactly as `run_stage` builds it (see
    `chunk_graph`), then BPS's ``prepare`` driver (what ``bps prepare <yaml> -g
    <graph>`` runs) turns it into the WMS plugin's workflow in the submit
    directory. Nothing runs and no collection is written; the graph goes to
    ``<workdir>/prepare/<site>/<stage>/<chunk>``, apart from the attempts `run_stage`
    counts.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign.
    site, stage, chunk : `str`
        Where and what to prepare.
    submit_yaml : `str` or `pathlib.Path`
        The chunk's BPS submit YAML (written by `write_stage_yaml`).
    placement : `pandas.DataFrame`
        The campaign's placement table.
    submission_checks : `bool`, optional
        Run the plugin's submission checks, as ``bps prepare`` does. PanDA's
        need ``PANDA_URL`` and answer from the IDDS server; `False` skips them,
        to check a PanDA workflow offline.

    Returns
    -------
    prepared : `PreparedChunk`
        The submit directory and the prepared workflow.

    Raises
    ------
    StageFailed
        Raised when nothing is missing of the chunk, when its graph cannot be
        built (see `chunk_graph`), or when BPS cannot prepare it.
    """
    from lsst.ctrl.bps.drivers import prepare_driver

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    directory = campaign.layout.prepare_dir(site, stage, chunk)
    with repo_write_lock(campaign.sites[site].repo):
        built = chunk_graph(campaign, site, stage, chunk, placement, directory, stamp)
    if built.path is None:
        raise StageFailed(f"{built.label}: nothing to prepare; every quantum has outputs in {built.chain}.")
    _LOG.info("%s: preparing %d quanta (%s).", built.label, built.n_quanta, built.path)
    try:
        with _tools_on_path():
            config, workflow = prepare_driver(
                str(submit_yaml), qgraph=str(built.path), runWmsSubmissionChecks=submission_checks
            )
    except Exception as err:
        raise StageFailed(f"{built.label}: bps prepare {submit_yaml} failed: {err}") from err
    return PreparedChunk(Path(config[".bps_defined.submitPath"]), built, workflow, config)


def finish_stage(campaign: Campaign, site: str, stage: str, chunk_markers: list[str]) -> dict[str, Any]:
    """Gather a stage's chunks at a site into its output chain, once every chunk is verified.

    Returns
    -------
    marker : `dict`
        The stage's totals over its chunks, for the stage marker.
    """
    started = datetime.now(UTC)
    chunks = [read_marker(path) for path in chunk_markers]
    chain = campaign.stage_chain(site, stage)
    repo = campaign.sites[site].repo
    with _write_lock(campaign, site, stage):
        check_registry_writable(campaign, site, f"{stage} at {site}")
        with open_butler(repo, writeable=True) as butler:
            ensure_in_chain(butler, chain, [chunk["output_chain"] for chunk in chunks])
    totals: dict[str, dict[str, int]] = {"datasets": {}, "expected": {}}
    for chunk in chunks:
        for key, counts in totals.items():
            for name, count in chunk[key].items():
                counts[name] = counts.get(name, 0) + count
    return {
        "site": site,
        "stage": stage,
        "output_chain": chain,
        "chunks": [chunk["chunk"] for chunk in chunks],
        "quanta_run": sum(chunk["quanta_run"] for chunk in chunks),
        **totals,
        **provenance(started),
    }


@contextlib.contextmanager
def _tools_on_path() -> Iterator[None]:
    """Put this environment's tools first on ``PATH``, as `run_tool` does for its commands.

    BPS runs ``pipetask`` (to update the graph's output run) while preparing.
    """
    path = os.environ.get("PATH")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path or ''}"
    try:
        yield
    finally:
        if path is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = path


def _bps_submit(command: list[str], log_path: Path, what: str) -> str | None:
    """Run ``bps submit``; return its submit directory.

    Raises
    ------
    StageFailed
        Raised when it fails, naming the first real error line of its jobs' logs
        and its own (`first_error`), where its output is, and its last lines.
    """
    returncode, output = run_tool(command, log_path)
    match = re.search(r"^Submit dir: (.+)$", output, re.MULTILINE)
    submit_dir = match.group(1).strip() if match else None
    if returncode != 0:
        tail = "\n".join(f"    {line}" for line in output.splitlines()[-10:])
        raise StageFailed(
            f"{what}: bps submit failed (exit {returncode}){_because(first_error(submit_dir, [log_path]))}\n"
            f"    bps submit dir: {submit_dir}; full output in {log_path}, which ends:\n{tail}\n"
            "Fix the cause and rerun: the quanta without registered outputs run again."
        )
    return submit_dir


def write_stage_yaml(
    campaign: Campaign, site: str, stage: str, chunk: str, placement: pd.DataFrame, path: str | Path
) -> dict[str, Any]:
    """Write the BPS submit YAML of one chunk of a stage at one site (and its data ID table).

    Raises
    ------
    CampaignConfigError
        Raised, before anything is written, when a value BPS would put on a command
        line is not in a safe form (see `_refuse_unsafe_values`).
    """
    flow = PipelineFlow(campaign)
    path = Path(path)
    query = chunk_query(campaign, flow, site, stage, chunk, placement)
    table = path.with_suffix(".dataids.ecsv").resolve() if query.data_ids is not None else None
    config = submit_config(campaign, flow, site, stage, chunk, query, table)
    _refuse_unsafe_values(config, site, table, path)
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        query.data_ids.write(table, overwrite=True)
    header = (
        f"BPS submit configuration for campaign {campaign.name}, stage {stage} at site {site}, "
        f"chunk {chunk} (units {', '.join(query.units)}).\n"
        "Generated by multisite from the campaign config; edit the config, not this file.\n"
        f"By hand: bps submit {path.name}"
    )
    write_submit_yaml(config, path, header)
    return {
        "site": site,
        "stage": stage,
        "chunk": chunk,
        "submit_yaml": str(path),
        "wms": config.get("wmsServiceClass"),
    }
