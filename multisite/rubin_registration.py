"""Registration of a hand-off's files in Rucio through Rubin's own tool, ``lsst-rucio-register``.

Its `~lsst.rucio.register.rucio_interface.RucioInterface` registers each file as a
replica with Rubin's DID metadata, ``rubin_butler`` (what the file is: a data
product, a raw, a zip or a dimension-records file) and ``rubin_sidecar`` (a
dataset's `~lsst.daf.butler.DatasetRef` as JSON), which the facilities' ingest
daemons (``ctrl_ingestd``, fed by Rucio's Hermes) read to ingest files as they
land, and attaches it to a Rucio dataset. `RubinRegistrar` wraps it for the
workflow: its calls go through the backend's outage handling, and a concurrent
hand-off registering the same file first (a raw needed at two sites) is tolerated.
`multisite.rucio_backend` registers through it only the files with no replica at
the RSE yet, and attaches the others as they are, so a rerun adds nothing.
"""

from __future__ import annotations

__all__ = ("RubinRegistrar", "rubin_butler_type")

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lsst.daf.butler import Butler, DatasetRef
from lsst.resources import ResourcePath
from lsst.rucio.register.data_type import DataType
from lsst.rucio.register.rucio_interface import RucioInterface

from .errors import RucioHandoffError

_LOG = logging.getLogger(__name__)


def rubin_butler_type(ref: DatasetRef) -> str:
    """Return the ``rubin_butler`` type of a dataset's file: a raw, or a data product."""
    return DataType.RAW_FILE if ref.datasetType.name == "raw" else DataType.DATA_PRODUCT


class RubinRegistrar:
    """Registers one hand-off's files at the source RSE, with Rubin's metadata, into its Rucio dataset.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The source repository.
    rse : `str`
        The source site's RSE.
    scope : `str`
        Rucio scope.
    root : `pathlib.Path`
        The source datastore root, ``<RSE prefix>/<scope>``: a file's Rucio name is
        its path relative to it.
    pfn_base : `str`
        What Rucio puts before ``/<scope>/<name>`` in the RSE's PFNs (``file:///prefix``).
    call : `~collections.abc.Callable`
        The backend's way to call Rucio (`multisite.rucio_backend.RucioBackend._call`):
        it rides out an unreachable server and keeps secrets out of errors.
    """

    def __init__(
        self,
        butler: Butler,
        rse: str,
        scope: str,
        root: Path,
        pfn_base: str,
        call: Callable[..., Any],
    ):
        self.butler, self.rse, self.scope, self.root, self.pfn_base = butler, rse, scope, root, pfn_base
        self._call = call
        self._interfaces: dict[str, RucioInterface] = {}

    def _interface(self, kind: str) -> RucioInterface:
        """Return the `RucioInterface` registering files of ``rubin_butler`` type ``kind`` (made once)."""
        if kind not in self._interfaces:
            # It names a file by its path minus ``<rse_root>/<scope>/``; its clients read RUCIO_CONFIG.
            self._interfaces[kind] = RucioInterface(
                self.butler, self.rse, self.scope, str(self.root.parent), self.pfn_base, kind
            )
        return self._interfaces[kind]

    def register_refs(self, dataset: str, refs: Sequence[DatasetRef]) -> int:
        """Register the files of ``refs`` (none registered at the RSE yet) with their dataset refs.

        Returns
        -------
        registered : `int`
            Files registered.
        """
        count = 0
        for kind in (DataType.RAW_FILE, DataType.DATA_PRODUCT):
            mine = [ref for ref in refs if rubin_butler_type(ref) == kind]
            if mine:
                count += self._register(
                    f"register {len(mine)} {kind} replicas at {self.rse} in {self.scope}:{dataset}",
                    self._interface(kind).register_as_replicas,
                    dataset,
                    mine,
                )
        return count

    def register_files(self, dataset: str, paths: Sequence[Path], zips: bool = False) -> int:
        """Register files that need no sidecar (none registered at the RSE yet).

        Parameters
        ----------
        dataset : `str`
            The Rucio dataset to attach them to.
        paths : `~collections.abc.Sequence` [`pathlib.Path`]
            The files.
        zips : `bool`
            Whether they are Butler zips (``zip_file``: each carries its own refs);
            otherwise the hand-off's own files, its Butler export and manifest (``dim_file``).
        """
        if not paths:
            return 0
        interface = self._interface(DataType.ZIP_FILE if zips else DataType.DIM_FILE)
        what = "zips" if zips else "hand-off files"
        return self._register(
            f"register {len(paths)} {what} at {self.rse} in {self.scope}:{dataset}",
            interface.register_zips if zips else interface.register_dims,
            dataset,
            [ResourcePath(path) for path in paths],
        )

    def _register(self, what: str, register: Callable[..., Any], dataset: str, items: list) -> int:
        try:
            return self._call(what, register, dataset, items) or 0
        except RucioHandoffError as err:
            # Another hand-off of the same files (a raw needed at two sites) registered one
            # first: the bulk call fails as a whole; the caller attaches what is there now.
            if not any(word in str(err) for word in ("Duplicate", "already exists", "UniqueViolation")):
                raise
            _LOG.info("Rucio: some of %d files were registered concurrently.", len(items))
            return 0
