"""A stand-in for a facility's ingest daemon (``ctrl_ingestd``), for ``transfer.rucio.ingest: facility``.

Test-only, like the file-copy tool that stands in for FTS3. At a facility,
``ctrl_ingestd`` reads the messages Rucio's Hermes sends as replicas arrive and
ingests each file into the facility's Butler from its Rucio metadata alone
(``rubin_butler``, ``rubin_sidecar``: what ``lsst-rucio-register`` registered).
Hermes is not run here, so Rucio's own rule states stand in for the messages:
every file of a rule to the facility's RSE that is OK has arrived. Each is then
ingested as ``ctrl_ingestd`` does it (``RseButler.ingest``):

* ``dim_file`` (a hand-off's Butler export): its dimension records, dataset types
  and RUN collections imported (its datasets are left to their own files' entries);
* ``zip_file`` (processed datasets): ``Butler.ingest_zip`` where it lies, with the
  dimension records it carries;
* ``raw_file`` and ``data_product``: ``Butler.ingest`` of the file where it lies, with
  the `~lsst.daf.butler.DatasetRef` of its sidecar (same dataset ID as at the source).

A file that cannot be ingested yet (its dimension records not there) is tried
again on the next pass; one already registered is skipped.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import lsst.daf.butler.transfers  # noqa: F401 - registers the !uuid YAML tag of Butler exports
import yaml
from lsst.daf.butler import Butler, DatasetRef, FileDataset

_LOG = logging.getLogger(__name__)
# What a Butler export holds apart from its datasets: the dimension file's share.
_DIMENSION_ITEMS = ("dimension", "collection", "dataset_type")


class StandInIngester:
    """Ingest what Rucio delivered to one RSE into the Butler whose datastore it is.

    Parameters
    ----------
    client : `rucio.client.Client`
        A Rucio client.
    scope : `str`
        The scope of the files.
    rse : `str`
        The facility's RSE.
    repo : `str`
        The facility's Butler repository; its datastore root is ``<RSE prefix>/<scope>``.
    """

    def __init__(self, client: Any, scope: str, rse: str, repo: str):
        self.client, self.scope, self.rse, self.repo = client, scope, rse, repo
        self.done: set[str] = set()
        self.stop = threading.Event()

    def arrived(self) -> list[str]:
        """Return the names of files not ingested yet whose rule to the RSE is OK."""
        rules = self.client.list_replication_rules({"rse_expression": self.rse})
        names = []
        for rule in rules:
            if rule["scope"] == self.scope and str(rule["state"]) == "OK":
                names += [f["name"] for f in self.client.list_files(self.scope, rule["name"])]
        return sorted(set(names) - self.done)

    def run_once(self) -> int:
        """Ingest what arrived; return how many files were dealt with."""
        by_type: dict[str, list[tuple[str, dict]]] = {}
        for name in self.arrived():
            meta = self.client.get_metadata(self.scope, name, plugin="ALL")
            by_type.setdefault(meta.get("rubin_butler") or "", []).append((name, meta))
        with Butler.from_config(self.repo, writeable=True) as butler:
            root = Path(next(iter(butler.get_datastore_roots().values())).ospath)
            for name, _ in by_type.get("dim_file", []):
                self._import_dimensions(butler, root / name)
                self.done.add(name)
            for name, _ in by_type.get("zip_file", []):
                if self._ingest_zip(butler, root / name):
                    self.done.add(name)
            for kind in ("raw_file", "data_product"):
                for name, meta in by_type.get(kind, []):
                    if self._ingest(butler, root / name, meta["rubin_sidecar"]):
                        self.done.add(name)
        return sum(len(entries) for entries in by_type.values())

    def run(self, interval: float = 0.5) -> None:
        """Ingest in passes until `stop` is set."""
        while not self.stop.wait(interval):
            try:
                self.run_once()
            except Exception:  # a daemon logs and goes on, as ctrl_ingestd does
                _LOG.exception("stand-in ingester pass failed")

    @staticmethod
    def _import_dimensions(butler: Butler, export: Path) -> None:
        content = yaml.safe_load(export.read_text())
        if not isinstance(content, dict) or "data" not in content:
            # The hand-off's manifest is registered with it; ctrl_ingestd's import fails on it and goes on.
            _LOG.info("stand-in ingester: %s is no Butler export; skipped", export.name)
            return
        content["data"] = [item for item in content["data"] if item["type"] in _DIMENSION_ITEMS]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as records:
            yaml.dump(content, records)
            records.flush()
            butler.import_(filename=records.name, format="yaml", transfer=None)

    @staticmethod
    def _ingest_zip(butler: Butler, path: Path) -> bool:
        try:
            butler.ingest_zip(path, transfer=None, transfer_dimensions=True, skip_existing=True)
        except Exception as err:  # noqa: BLE001 - as for a file, a later pass tries again
            _LOG.info("stand-in ingester: %s not ingested yet: %s", path.name, err)
            return False
        return True

    @staticmethod
    def _ingest(butler: Butler, path: Path, sidecar: str) -> bool:
        ref = DatasetRef.from_json(sidecar, universe=butler.dimensions)
        if butler.get_dataset(ref.id) is not None:
            return True
        try:
            butler.ingest(FileDataset(path=str(path), refs=[ref]), transfer="auto")
        except Exception as err:  # noqa: BLE001 - its records may come with a later pass
            _LOG.info("stand-in ingester: %s not ingested yet: %s", path.name, err)
            return False
        return True
