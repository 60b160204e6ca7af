"""Benchmark one Rucio hand-off of many small datasets through a real local Rucio.

Starts the test harness's Rucio (PostgreSQL, server, judge and conveyor daemons,
file-copy transfer tool), makes a source Butler with ``--datasets`` small datasets,
both Butlers' registries in that PostgreSQL (as at the facilities), moves them to
an empty destination Butler with the rucio backend and prints: files and zips
registered, Rucio datasets, registration time, rule-to-OK time, ingest time,
datasets per second end to end, Rucio API calls per dataset (every HTTP request the
client sends is counted), and the peak memory of the sending and of the receiving
process (each half runs in a fresh process, as each runs in its own rule).

``--kind product`` (processed datasets) travels in Butler zips of at most
``--datasets-per-zip`` datasets, registered with ``lsst-rucio-register`` and
ingested with ``Butler.ingest_zip``; ``--kind raw`` as one file per dataset,
registered with its ref and imported in batches of ``--import-batch``. Either way
the files are in Rucio datasets of at most ``--max-files-per-dataset``.

    .venv/bin/python benchmarks/bench_rucio.py [--kind product] [--datasets 100000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml
from lsst.daf.butler import Butler, Config, DatasetRef, DatasetType, FileDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from multisite.backends import HandoffPayload  # noqa: E402
from multisite.butler_utils import stream_datasets  # noqa: E402
from multisite.config import Site  # noqa: E402
from multisite.rucio_backend import RucioBackend  # noqa: E402
from tests.rucio_harness.local_rucio import LocalRucio  # noqa: E402

SCOPE = "bench"
RSES = {"usdf": "USDF_BUTLER_DISK", "in2p3": "IN2P3_BUTLER_DISK"}


def make_repo(repo: Path, db: str) -> None:
    """Create an empty repository whose registry is a namespace of PostgreSQL database ``db``."""
    Butler.makeRepo(str(repo), config=Config({"registry": {"db": db, "namespace": repo.parent.name}}))


def peak_mb() -> float:
    """Peak resident memory of this process so far, MB.

    The kernel's high-water mark of this process's memory (``VmHWM``), which a new
    program starts afresh (``getrusage``'s ``ru_maxrss`` carries the parent's over
    fork and exec).
    """
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


PATCHES_PER_TRACT = 100
"""Patches of each tract of the benchmark's sky map (10 x 10)."""


def make_source(repo: Path, n_files: int, name: str) -> list[DatasetRef]:
    """Fill a repository with ``n_files`` small YAML datasets of type ``name``, ingested in place.

    One per patch, as coadds are, of as many tracts as it takes: data IDs of
    elements the Butler does not cache (it keeps a whole table of small elements,
    such as detectors, in memory, which would grow with the benchmark's size).
    """
    butler = Butler.from_config(str(repo), writeable=True, run="bench/run")
    tracts = range((n_files + PATCHES_PER_TRACT - 1) // PATCHES_PER_TRACT)
    butler.registry.insertDimensionData(
        "skymap",
        {
            "name": "BenchMap",
            "hash": b"bench",
            "tract_max": len(tracts),
            "patch_nx_max": 10,
            "patch_ny_max": 10,
        },
    )
    butler.registry.insertDimensionData("tract", *[{"skymap": "BenchMap", "id": t} for t in tracts])
    data_ids = [
        {"skymap": "BenchMap", "tract": i // PATCHES_PER_TRACT, "patch": i % PATCHES_PER_TRACT}
        for i in range(n_files)
    ]
    butler.registry.insertDimensionData(
        "patch",
        *[
            {
                "skymap": "BenchMap",
                "tract": d["tract"],
                "id": d["patch"],
                "cell_x": d["patch"] % 10,
                "cell_y": d["patch"] // 10,
            }
            for d in data_ids
        ],
    )
    dataset_type = DatasetType(
        name, ["skymap", "tract", "patch"], "StructuredDataDict", universe=butler.dimensions
    )
    butler.registry.registerDatasetType(dataset_type)
    butler.registry.registerRun("bench/run")
    directory = repo / "bench" / "run" / name
    directory.mkdir(parents=True)
    datasets = []
    for i, data_id in enumerate(data_ids):
        path = directory / f"{name}_{i:06d}.yaml"
        path.write_text(yaml.safe_dump({**data_id, "payload": "x" * 200}))
        datasets.append(
            FileDataset(path=str(path), refs=[DatasetRef(dataset_type, data_id, run="bench/run")])
        )
    butler.ingest(*datasets, transfer=None)
    return [dataset.refs[0] for dataset in datasets]


def run_half(half: str, settings: dict, args: argparse.Namespace, src_repo: Path, dst_repo: Path) -> dict:
    """Run one half of the hand-off in this process; return its details, seconds, API calls and peak memory.

    Run in a fresh process (``spawn``), so that its peak memory is its own.
    """
    from rucio.client.baseclient import BaseClient

    calls: Counter[str] = Counter()
    original = BaseClient._send_request

    def counting(self, url, method, *a, **k):
        path = url.split("://", 1)[-1].split("/", 1)[-1].split("?")[0]
        calls[f"{method} /{path.split('/')[0]}"] += 1
        return original(self, url, method, *a, **k)

    BaseClient._send_request = counting
    backend = RucioBackend(
        "bench", settings, import_batch=args.import_batch, datasets_per_zip=args.datasets_per_zip
    )
    source = Site("usdf", "central", str(src_repo), False, {})
    destination = Site("in2p3", "remote", str(dst_repo), False, {})
    started = time.monotonic()
    if half == "send":
        # The sending rule's own query: raws listed, processed datasets streamed with their records.
        name, butler = dataset_type_name(args), Butler.from_config(str(src_repo))
        found = stream_datasets(butler, name, ["bench/run"], with_records=name != "raw")
        payload = HandoffPayload(list(found)) if name == "raw" else HandoffPayload([], found)
        details = backend.send(source, destination, payload, "bench/in2p3/all")
    else:
        details, _ = backend.receive(source, destination, "bench/in2p3/all")
    return {
        "details": details,
        "seconds": time.monotonic() - started,
        "calls": dict(calls),
        "peak_mb": peak_mb(),
    }


def dataset_type_name(args: argparse.Namespace) -> str:
    """Return the benchmark's dataset type: a raw travels as a file, anything else in a zip."""
    return "raw" if args.kind == "raw" else "bench_blob"


def in_fresh_process(function, *args):
    """Return what ``function(*args)`` returns, run in a new Python process (``spawn``)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=("product", "raw"), default="product")
    parser.add_argument("--datasets", type=int, default=10_000)
    parser.add_argument("--max-files-per-dataset", type=int, default=10_000)
    parser.add_argument("--import-batch", type=int, default=10_000)
    parser.add_argument("--datasets-per-zip", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rucio-") as tmp:
        tmp = Path(tmp)
        storage = tmp / "storage"
        rucio = LocalRucio(tmp / "rucio", {rse: str(storage / site) for site, rse in RSES.items()}, SCOPE)
        t0 = time.monotonic()
        rucio.start()
        print(f"local Rucio up in {time.monotonic() - t0:.1f} s at {rucio.url}")
        try:
            src_repo, dst_repo = storage / "usdf" / SCOPE, storage / "in2p3" / SCOPE
            t0 = time.monotonic()
            make_repo(src_repo, rucio.butler_db)
            make_repo(dst_repo, rucio.butler_db)
            refs = make_source(src_repo, args.datasets, dataset_type_name(args))
            print(f"source repository with {len(refs)} datasets made in {time.monotonic() - t0:.1f} s")
            settings = {
                "scope": SCOPE,
                "rses": RSES,
                "account": "root",
                "client_config": str(rucio.write_client_config(tmp / "client.cfg", tmp / "token")),
                "max_files_per_dataset": args.max_files_per_dataset,
                "poll": {"interval_s": 0.5, "max_interval_s": 5, "timeout_s": 3600},
            }
            sent = in_fresh_process(run_half, "send", settings, args, src_repo, dst_repo)
            received = in_fresh_process(run_half, "receive", settings, args, src_repo, dst_repo)
            idle = in_fresh_process(peak_mb)
        finally:
            rucio.stop()
    timings = sent["details"]["timings_s"] | received["details"]["timings_s"]
    total = sent["seconds"] + received["seconds"]
    calls = Counter(sent["calls"]) + Counter(received["calls"])
    n_calls = sum(calls.values())
    n_files = received["details"]["rucio"]["files"]
    n_bytes = received["details"]["rucio"]["bytes"]
    n_zips, n_parts = sent["details"]["rucio"]["zips"], sent["details"]["rucio"]["export_parts"]
    print(
        f"hand-off of {len(refs)} {args.kind} datasets: {n_files} files registered ({n_zips} zips, "
        f"{n_files - n_zips - n_parts - 1} single files, {n_parts} export parts and the manifest), "
        f"{n_bytes} bytes"
    )
    print(
        f"  Rucio datasets        {sent['details']['rucio']['datasets']:8d}  "
        f"(at most {args.max_files_per_dataset} files each)"
    )
    written = " (with the zips written)" if n_zips else ""
    print(f"  registration          {timings['register']:8.2f} s{written}")
    print(f"  rule to OK            {timings['rule_to_ok']:8.2f} s")
    print(f"  ingest                {timings['ingest']:8.2f} s")
    print(f"  end to end            {total:8.2f} s  ->  {len(refs) / total:.1f} datasets/s")
    print(f"  Rucio API calls       {n_calls} ({n_calls / len(refs):.4f} per dataset)")
    for key, count in sorted(calls.items(), key=lambda kv: -kv[1]):
        print(f"    {count:5d}  {key}")
    print(
        f"  peak memory           {sent['peak_mb']:8.0f} MB the sending process, "
        f"{received['peak_mb']:.0f} MB the receiving one ({idle:.0f} MB a process that only imported)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
