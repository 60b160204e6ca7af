"""Closed-loop hand-offs through Rucio: register, replicate, wait, ingest, verify.

Every site's Butler datastore is that site's Rucio storage element (RSE): the RSE
is deterministic with ``lfn2pfn_algorithm=identity`` and its protocol prefix is
chosen so that ``<prefix>/<scope>`` is the datastore root. A file's Rucio name is
then its Butler-relative path, identical at every site (as Rubin's
``rucio-register`` does), and a replica Rucio writes at the destination RSE is
already inside the destination Butler's datastore.

One hand-off piece (``label`` ``<handoff>/<site>/<piece>``) is, on the sending side:

1. its raws and the Butler zips of its processed datasets (`multisite.backends.write_zips`)
   registered where they are with Rubin's ``lsst-rucio-register``
   (`multisite.rubin_registration`: replicas at the source RSE, with size, adler32
   and the ``rubin_butler``/``rubin_sidecar`` metadata of the facilities' ingest
   daemons), plus the hand-off's Butler export (the raws' refs, with their
   dataset types and RUN collections, and the dimension records the site needs, in
   parts of ``import_batch`` raws: `multisite.backends.write_export`) and
   its manifest (each file's and zip's datasets, size and adler32:
   `multisite.integrity`), in Rucio datasets of at
   most ``max_files_per_dataset`` files each (``multisite.<campaign>.<handoff>.<site>.<piece>.<part>``,
   the hand-off's files in name order, so a rerun puts each file where the first run
   did), inside the piece's container ``multisite.<campaign>.<handoff>.<site>.<piece>``,
   inside ``multisite.<campaign>.<handoff>``, inside ``multisite.<campaign>``;
2. its datasets closed, then its container: a closed container is a sent hand-off;

and on the receiving side, once the container is closed:

3. one replication rule of that container to the destination RSE (activity, lifetime,
   account, grouping from config);
4. a wait for the rule, polling with back-off and logging files and bytes done, that
   stops with an error naming the files and Rucio's reasons on STUCK or timeout;
5. on OK, every file checked at the destination against Rucio's size and adler32
   (`multisite.integrity.check_files`, on every run: a rerun re-verifies), then the
   export imported part by part and the zips ingested into the destination Butler with
   ``transfer=None`` (the files are already in its datastore).

A damaged or deleted file at the destination is repaired through Rucio
(`RucioBackend.repair`, ``multisite repair``): its replica is declared bad, Rucio's
necromancer recovers it (a new transfer of the file into the rule's lock, from a
good replica), the conveyor copies it, and the repair waits for the rule and
verifies the file again.

Reruns look up what exists (files in the dataset, replicas, the rule) and add only
what is missing; a rerun after a failure or timeout resumes waiting on the same
rule. Lists go to Rucio in bulk calls (chunks of ``chunk_size``). Credentials stay
in the Rucio client configuration: they are never logged, returned or put in an
error message (messages from Rucio are scrubbed of them).
"""

from __future__ import annotations

__all__ = ("RucioBackend", "RucioSettings")

import configparser
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lsst.daf.butler import Butler, DatasetRef

from .backends import (
    IMPORT_BATCH,
    ZIP_DATASETS,
    HandoffPayload,
    TransferBackend,
    datastore_root,
    export_part_names,
    import_export,
    ingest_zips,
    repair_outcome,
    write_export,
    write_zips,
)
from .butler_utils import open_butler
from .config import Site
from .errors import RucioHandoffError, RucioTransferStuck
from .integrity import (
    Damage,
    FileRecord,
    Manifest,
    check_files,
    damaged_files,
    datastore_files,
    repair_command,
    with_descriptions,
)

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class RucioSettings:
    """The ``transfer.rucio`` section of a campaign configuration.

    Attributes
    ----------
    scope : `str`
        Rucio scope of every file, dataset and container.
    rses : `dict` [`str`, `str`]
        RSE of each site, by site name.
    account : `str` or `None`
        Account owning the rules (the client's account when `None`).
    activity : `str`
        Transfer activity of the rules.
    lifetime : `int` or `None`
        Rule lifetime in seconds; `None` keeps the replicas forever (recommended: a
        Butler datastore's files must not be deleted under it).
    grouping : `str`
        Rule grouping: ``DATASET``, ``ALL`` or ``NONE``.
    client_config : `str` or `None`
        Rucio client configuration file (``RUCIO_CONFIG``); the environment's when `None`.
    poll_interval : `float`
        First wait between polls of the rule, in seconds.
    poll_max_interval : `float`
        Longest wait between polls.
    poll_backoff : `float`
        Factor the wait grows by after each poll without progress.
    timeout : `float`
        Seconds to wait for the rule before giving up (a rerun resumes the wait).
    chunk_size : `int`
        Largest list sent in one Rucio call.
    max_files_per_dataset : `int`
        Most files in one Rucio dataset; a larger hand-off is several datasets
        under its container.
    ingest : `str`
        Who registers the arrived files in the destination Butler: ``workflow``
        (the receiving rule imports them) or ``facility`` (the facility's ingest
        daemon, ``ctrl_ingestd``, does, from each file's Rubin metadata; the
        rule waits for its datasets and verifies them).
    """

    scope: str
    rses: Mapping[str, str]
    account: str | None = None
    activity: str = "Data Consolidation"
    lifetime: int | None = None
    grouping: str = "DATASET"
    client_config: str | None = None
    poll_interval: float = 1.0
    poll_max_interval: float = 30.0
    poll_backoff: float = 1.5
    timeout: float = 3600.0
    chunk_size: int = 1000
    max_files_per_dataset: int = 10_000
    ingest: str = "workflow"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> RucioSettings:
        """Build the settings from the validated ``transfer.rucio`` mapping."""
        poll = section.get("poll", {})
        client_config = section.get("client_config")
        if client_config:
            client_config = str(Path(os.path.expandvars(client_config)).expanduser().resolve())
        return cls(
            scope=section["scope"],
            rses=dict(section["rses"]),
            account=section.get("account"),
            activity=section.get("activity", cls.activity),
            lifetime=section.get("lifetime"),
            grouping=section.get("grouping", cls.grouping),
            client_config=client_config,
            poll_interval=float(poll.get("interval_s", cls.poll_interval)),
            poll_max_interval=float(poll.get("max_interval_s", cls.poll_max_interval)),
            poll_backoff=float(poll.get("backoff", cls.poll_backoff)),
            timeout=float(poll.get("timeout_s", cls.timeout)),
            chunk_size=int(section.get("chunk_size", cls.chunk_size)),
            max_files_per_dataset=int(section.get("max_files_per_dataset", cls.max_files_per_dataset)),
            ingest=section.get("ingest", cls.ingest),
        )


@dataclass
class _File:
    """One file of a hand-off: its Rucio name, local path at the source, size and adler32."""

    name: str
    path: Path
    bytes: int | None = None
    adler32: str | None = None


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _unreachable(err: BaseException) -> bool:
    """Whether a Rucio client error means the server could not be reached (worth retrying)."""
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import Timeout
    from rucio.common.exception import ServerConnectionException

    return isinstance(err, (RequestsConnectionError, Timeout, ServerConnectionException, ConnectionError))


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = list(names)
    text = "\n".join(f"    {name}" for name in names[:limit])
    if len(names) > limit:
        text += f"\n    ... and {len(names) - limit} more"
    return text


class RucioBackend(TransferBackend):
    """Hand-offs through Rucio replication rules, closed by ingest into the destination Butler.

    Parameters
    ----------
    campaign : `str`
        Campaign name (part of every Rucio dataset and container name).
    settings : `RucioSettings` or `~collections.abc.Mapping`
        The ``transfer.rucio`` configuration.
    client : `rucio.client.Client`, optional
        Client to use (tests, benchmarks); one is made from the configuration otherwise.
    import_batch : `int`
        Files per import transaction at the destination.
    datasets_per_zip : `int`
        Most datasets in one Butler zip.
    """

    name = "rucio"

    def __init__(
        self,
        campaign: str,
        settings: RucioSettings | Mapping[str, Any],
        client: Any = None,
        import_batch: int = IMPORT_BATCH,
        datasets_per_zip: int = ZIP_DATASETS,
    ):
        super().__init__(campaign, import_batch, datasets_per_zip)
        self.settings = (
            settings if isinstance(settings, RucioSettings) else RucioSettings.from_config(settings)
        )
        self._client = client
        self._secrets = self._read_secrets()

    # ------------------------------------------------------------------ client
    def _read_secrets(self) -> list[str]:
        """Values of the client configuration that must never be shown."""
        path = self.settings.client_config or os.environ.get("RUCIO_CONFIG")
        found: list[str] = []
        if path and Path(path).exists():
            parser = configparser.ConfigParser(interpolation=None)
            parser.read(path)
            for section in parser.sections():
                for key, value in parser.items(section):
                    if value and any(
                        word in key for word in ("password", "pwd", "token", "proxy", "secret", "key")
                    ):
                        found.append(value)
        return [value for value in found if len(value) >= 4]

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        # Token file contents may appear in a server's answer; hide anything that looks like one.
        return text

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from rucio.client import Client
                from rucio.common import config as rucio_config
            except ImportError as err:
                raise RucioHandoffError(
                    "transfer.backend is rucio but rucio-clients is not installed: pip install rucio-clients"
                ) from err
            if self.settings.client_config:
                if not Path(self.settings.client_config).exists():
                    raise RucioHandoffError(
                        f"transfer.rucio.client_config: no file at {self.settings.client_config}"
                    )
                os.environ["RUCIO_CONFIG"] = self.settings.client_config
                rucio_config.clean_cached_config()
            self._client = self._call("connect to the Rucio server", Client)
        return self._client

    def _call(self, what: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the Rucio API, turning any failure into a `RucioHandoffError` free of secrets.

        An unreachable server (an outage, a restart) is retried with back-off for up
        to ``poll.timeout_s``: every call is safe to repeat (the callers tolerate what
        an earlier attempt did), so a hand-off rides out an outage instead of failing.
        """
        unreachable_since: float | None = None
        delay = self.settings.poll_interval
        while True:
            try:
                result = function(*args, **kwargs)
                # Listing calls return generators: consume them here so errors surface here.
                if isinstance(result, Iterator):
                    result = list(result)
                if unreachable_since is not None:
                    _LOG.warning(
                        "Rucio reachable again after %.0f s; continuing to %s.",
                        time.monotonic() - unreachable_since,
                        what,
                    )
                return result
            except RucioHandoffError:
                raise
            except Exception as err:
                host = getattr(self._client, "host", None) or "the Rucio server"
                message = self._scrub(f"{type(err).__name__}: {err}")
                if _unreachable(err):
                    now = time.monotonic()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since < self.settings.timeout:
                        _LOG.warning(
                            "Rucio unreachable for %.0f s while trying to %s (%s): %s; retrying in %.0f s "
                            "(up to transfer.rucio.poll.timeout_s = %g s).",
                            now - unreachable_since,
                            what,
                            host,
                            message,
                            delay,
                            self.settings.timeout,
                        )
                        time.sleep(delay)
                        delay = min(delay * self.settings.poll_backoff, self.settings.poll_max_interval)
                        continue
                    message = f"unreachable for {now - unreachable_since:.0f} s; last error {message}"
                raise RucioHandoffError(
                    f"Rucio call failed while trying to {what} ({host}): {message}\n"
                    "Check that the Rucio server is reachable, then rerun: what is already registered "
                    "is found again and a pending rule is waited for, not created twice."
                ) from None

    # ------------------------------------------------------------------ naming
    def names(self, label: str) -> dict[str, str]:
        """Rucio container names of a hand-off piece ``<handoff>/<site>/<piece>`` (its own: ``handoff``)."""
        handoff, site, piece = label.split("/")
        campaign = f"multisite.{self.campaign}"
        return {
            "campaign_container": campaign,
            "stage_container": f"{campaign}.{handoff}",
            "handoff": f"{campaign}.{handoff}.{site}.{piece}",
            "export": self.export_name(label),
            "manifest": self.manifest_name(label),
            "zips": self.zip_directory(label),
        }

    def parts(self, container: str, names: Iterable[str]) -> dict[str, list[str]]:
        """Split a hand-off's file names, in name order, into its datasets of ``max_files_per_dataset``."""
        ordered, size = sorted(names), self.settings.max_files_per_dataset
        return {f"{container}.{i // size:05d}": ordered[i : i + size] for i in range(0, len(ordered), size)}

    def _rse(self, site: Site) -> str:
        try:
            return self.settings.rses[site.name]
        except KeyError:
            raise RucioHandoffError(
                f"transfer.rucio.rses has no RSE for site {site.name!r}; add '{site.name}: <RSE name>'"
            ) from None

    def _check_rse(self, site: Site, butler: Butler) -> Path:
        """Check that the site's RSE stores ``scope:name`` at ``<datastore root>/<name>``; return the root."""
        rse = self._rse(site)
        root = datastore_root(butler)
        info = self._call(f"read RSE {rse}", self.client.get_rse, rse)
        attributes = self._call(f"read attributes of RSE {rse}", self.client.list_rse_attributes, rse)
        prefixes = [
            Path(p["prefix"]).resolve() for p in info.get("protocols", []) if p.get("scheme") == "file"
        ]
        problems = []
        if attributes.get("lfn2pfn_algorithm") != "identity":
            problems.append("set RSE attribute lfn2pfn_algorithm=identity")
        if not info.get("deterministic", True):
            problems.append("the RSE must be deterministic")
        if not any(prefix / self.settings.scope == root for prefix in prefixes):
            problems.append(
                f"its file protocol prefix + scope must be the datastore root {root} "
                f"(prefix {root.parent}/ with scope {root.name}); found prefixes "
                f"{[str(p) for p in prefixes]} and scope {self.settings.scope}"
            )
        if problems:
            raise RucioHandoffError(
                f"RSE {rse} of site {site.name} cannot serve its Butler: " + "; ".join(problems)
            )
        return root

    # ------------------------------------------------------------------ the two halves
    def send(self, source: Site, destination: Site, payload: HandoffPayload, label: str) -> dict[str, Any]:
        started = time.monotonic()
        names = self.names(label)
        scope = self.settings.scope
        source_butler = open_butler(source.repo)
        src_root = self._check_rse(source, source_butler)
        src_rse = self._rse(source)
        if self.published(source, destination, label):
            self._check_export_parts(src_root, names, len(payload.raws), label)
        registered = self._register(source_butler, src_root, src_rse, payload, names, label)
        for name in [*registered["datasets"], names["handoff"]]:  # the container last: then it is sent
            if self._call(f"read {scope}:{name}", self.client.get_did, scope, name).get("open", True):
                self._call(f"close {scope}:{name}", self.client.close, scope, name)
        return {
            "rucio": {
                "scope": scope,
                "campaign_container": f"{scope}:{names['campaign_container']}",
                "stage_container": f"{scope}:{names['stage_container']}",
                "container": f"{scope}:{names['handoff']}",
                "datasets": len(registered["datasets"]),
                "export_file": f"{scope}:{names['export']}",
                "source_rse": src_rse,
                "files": len(registered["files"]),
                "zips": registered["zips"],
                "export_parts": registered["export_parts"],
                "bytes": registered["bytes"],
                "files_registered_now": registered["added"],
            },
            "timings_s": {"register": round(time.monotonic() - started, 3)},
        }

    def _check_export_parts(self, root: Path, names: dict[str, str], raws: int, label: str) -> None:
        """Refuse to send a sent hand-off again with its raws' export cut in other parts.

        Its files are registered, and its datasets and container closed: they cannot change.
        """
        sent = Manifest.read(root / names["manifest"]).exports
        now = export_part_names(names["export"], raws, self.import_batch)
        if list(sent) != now:
            raise RucioHandoffError(
                f"Rucio {label}: it was sent with its raws' Butler export in {len(sent)} part(s), and "
                f"transfer.import_batch ({self.import_batch}) now cuts it in {len(now)}; the files of a sent "
                "hand-off are registered and cannot change. Set transfer.import_batch back to the value it "
                "was sent with, then rerun: nothing was changed."
            )

    def published(self, source: Site, destination: Site, label: str) -> bool:
        """Whether the hand-off's Rucio container exists and is closed (its sender is done)."""
        from rucio.common.exception import DataIdentifierNotFound

        scope, container = self.settings.scope, self.names(label)["handoff"]

        def get_did() -> dict[str, Any] | None:
            try:
                return self.client.get_did(scope, container)
            except DataIdentifierNotFound:
                return None  # not sent yet

        did = self._call(f"read {scope}:{container}", get_did)
        return did is not None and not did.get("open", True)

    def begun_pieces(self, source: Site, handoff: str, site: str) -> set[str]:
        """Return the pieces whose Rucio container exists, closed or not."""
        scope, prefix = self.settings.scope, self.names(f"{handoff}/{site}/")["handoff"]
        found = self._call(
            f"list {scope}:{prefix}*",
            self.client.list_dids,
            scope,
            {"name": f"{prefix}*"},
            did_type="container",
        )
        # Rucio's name filter is an SQL LIKE, where an underscore matches any character.
        return {name.removeprefix(prefix) for name in found if name.startswith(prefix)}

    def receive(self, source: Site, destination: Site, label: str) -> tuple[dict[str, Any], list[str]]:
        started = time.monotonic()
        names = self.names(label)
        scope = self.settings.scope
        with open_butler(destination.repo) as dest_butler:
            dst_root = self._check_rse(destination, dest_butler)
        src_rse, dst_rse = self._rse(source), self._rse(destination)
        files = self._dataset_files(names["handoff"], dst_root)
        rule_id, created = self._ensure_rule(names["handoff"], src_rse, dst_rse, label)
        self._wait(rule_id, files, label, dst_rse)
        t_ok = time.monotonic()
        self._check_arrived(destination, dst_root, files, label)
        manifest = Manifest.read(dst_root / names["manifest"])
        if self.settings.ingest == "facility":
            imported = 0
            self._wait_for_facility(destination, manifest.dataset_ids(), label)
        else:
            exports = [dst_root / name for name in manifest.exports]
            imported = import_export(destination, dst_root, exports, None, self.import_batch)
            zips = [(record, dst_root / record.name) for record in manifest.files if record.zipped]
            imported += ingest_zips(destination, zips)
            _LOG.info("Rucio %s: %d datasets ingested into %s.", label, imported, destination.name)
        details = {
            "rucio": {
                "container": f"{scope}:{names['handoff']}",
                "rule_id": rule_id,
                "rule_created": created,
                "source_rse": src_rse,
                "destination_rse": dst_rse,
                "files": len(files),
                "bytes": sum(f.bytes or 0 for f in files.values()),
            },
            "imported_datasets": imported,
            "ingested_by": self.settings.ingest,
            "verified_files": len(files),
            "timings_s": {
                "rule_to_ok": round(t_ok - started, 3),
                "ingest": round(time.monotonic() - t_ok, 3),
            },
        }
        return details, manifest.dataset_ids()

    def _wait_for_facility(self, destination: Site, ids: list[str], label: str) -> None:
        """Wait, polling with back-off, until the facility's ingest daemon registered the hand-off's datasets.

        Raises
        ------
        RucioHandoffError
            Raised after ``poll.timeout_s`` naming the datasets still missing
            (a rerun waits again).
        """
        deadline = time.monotonic() + self.settings.timeout
        interval = self.settings.poll_interval
        while True:
            with open_butler(destination.repo) as butler:
                missing = sorted(set(ids) - {str(ref.id) for ref in butler.get_many_datasets(ids)})
            if not missing:
                _LOG.info(
                    "Rucio %s: %s's ingest daemon registered all %d datasets.",
                    label,
                    destination.name,
                    len(ids),
                )
                return
            _LOG.info(
                "Rucio %s: waiting for %s's ingest daemon: %d of %d datasets registered.",
                label,
                destination.name,
                len(ids) - len(missing),
                len(ids),
            )
            if time.monotonic() >= deadline:
                raise RucioHandoffError(
                    f"Hand-off {label}: its files are at {destination.name} and verified, but the facility's "
                    f"ingest daemon (transfer.rucio.ingest: facility) has not registered {len(missing)} of "
                    f"{len(ids)} datasets after {self.settings.timeout:g} s "
                    f"(transfer.rucio.poll.timeout_s):\n"
                    f"{_listing(missing)}\nCheck {destination.name}'s ctrl_ingestd (its log and its message "
                    "feed), or set transfer.rucio.ingest: workflow; then rerun: the wait starts again."
                )
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * self.settings.poll_backoff, self.settings.poll_max_interval)

    # ------------------------------------------------------------------ registration
    def _files_of(self, butler: Butler, root: Path, refs: list[DatasetRef]) -> dict[str, FileRecord]:
        """Return the records (no checksums yet) of the files of ``refs``, all under ``root``, by name."""
        inside, outside = datastore_files(butler, root, refs)
        if outside:
            raise RucioHandoffError(
                f"{len(outside)} file(s) are outside the source datastore root {root} and cannot be "
                "registered in Rucio by their Butler path:\n"
                + _listing(f"{record.describe()}: {path}" for record, path in outside)
            )
        return {record.name: record for record, _ in inside}

    def _dataset_files(self, did: str, root: Path) -> dict[str, _File]:
        """Return the files of a hand-off's Rucio container, with Rucio's size and adler32, under ``root``."""
        return {
            name: _File(name, root / name, f["bytes"], f["adler32"]) for name, f in self._content(did).items()
        }

    def _register(
        self,
        butler: Butler,
        root: Path,
        rse: str,
        payload: HandoffPayload,
        names: dict[str, str],
        label: str,
    ) -> dict[str, Any]:
        """Register the hand-off's files and zips (where they are) in its Rucio datasets; idempotent.

        The raws go first, with their refs as Rubin metadata, and the zips
        (`multisite.rubin_registration`); then the manifest, from the sizes and
        checksums Rucio holds for them, and the Butler export. A file already in
        the hand-off's container stays in the dataset it is in.
        """
        client, scope, container = self.client, self.settings.scope, names["handoff"]
        records = self._files_of(butler, root, payload.raws)
        # A zip registered already is kept as it is: Rucio holds its checksum.
        zip_records, _ = write_zips(butler, root, payload.zipped(), names["zips"], self.datasets_per_zip)
        zips = {record.name: record for record in zip_records}
        exports = export_part_names(names["export"], len(payload.raws), self.import_batch)
        own = (names["manifest"], *exports)
        parts = self.parts(container, [*records, *zips, *own])
        self._ensure_did(client.add_container, names["campaign_container"])
        self._ensure_did(client.add_container, names["stage_container"])
        self._ensure_did(client.add_container, container)
        for dataset in parts:
            self._ensure_did(client.add_dataset, dataset)
        self._attach(names["campaign_container"], [names["stage_container"]])
        self._attach(names["stage_container"], [container])
        self._attach(container, list(parts))

        content = self._content(container)
        extra = sorted(set(content) - set(records) - set(zips) - set(own))
        if extra:
            raise RucioHandoffError(
                f"Rucio container {scope}:{container} holds {len(extra)} file(s) this hand-off does not "
                f"move (was the hand-off's content changed since it was registered?):\n{_listing(extra)}"
            )
        # Imported here: lsst-rucio-register needs rucio-clients, which a butler-backend campaign may lack.
        from .rubin_registration import RubinRegistrar

        registrar = RubinRegistrar(butler, rse, scope, root, self._pfn_base(rse), self._call)
        by_id = {str(ref.id): ref for ref in payload.raws}
        for dataset, members in parts.items():
            self._add_to_dataset(
                registrar.rse,
                dataset,
                [n for n in members if n in records and n not in content],
                lambda part, dataset=dataset: registrar.register_refs(
                    dataset, [by_id[records[n].dataset_id] for n in part]
                ),
            )
            self._add_to_dataset(
                registrar.rse,
                dataset,
                [n for n in members if n in zips and n not in content],
                lambda part, dataset=dataset: registrar.register_files(
                    dataset, [root / n for n in part], zips=True
                ),
            )
        before, content = content, self._content(container)
        # The hand-off's own files, written once: their registered checksums must stay true.
        if names["manifest"] not in content:
            Manifest(
                label,
                tuple(
                    replace(r, bytes=content[n]["bytes"], adler32=content[n]["adler32"])
                    for n, r in (records | zips).items()
                ),
                tuple(exports),
            ).write(root / names["manifest"])
        write_export(butler, root, payload, names["export"], self.import_batch, keep=set(content))
        for dataset, members in parts.items():
            if unregistered := [root / name for name in own if name in members and name not in content]:
                registrar.register_files(dataset, unregistered)
        content = self._content(container)
        absent = sorted((set(records) | set(zips) | set(own)) - set(content))
        if absent:
            raise RucioHandoffError(
                f"Rucio {label}: {len(absent)} file(s) are not in {scope}:{container} after "
                f"registration:\n{_listing(absent)}\nRerun the rule; what is registered is kept."
            )
        added = len(set(content) - set(before))
        files = {name: _File(name, root / name, f["bytes"], f["adler32"]) for name, f in content.items()}
        total = sum(f.bytes or 0 for f in files.values())
        _LOG.info(
            "Rucio %s: %d files (%d bytes) in %d datasets of %s:%s, %d registered now.",
            label,
            len(files),
            total,
            len(parts),
            scope,
            container,
            added,
        )
        return {
            "files": files,
            "zips": len(zips),
            "export_parts": len(exports),
            "bytes": total,
            "added": added,
            "datasets": list(parts),
        }

    def _content(self, dataset: str) -> dict[str, dict]:
        """Files of a Rucio dataset or container (its datasets'), with Rucio's size and adler32, by name."""
        scope = self.settings.scope
        found = self._call(f"list the files of {scope}:{dataset}", self.client.list_files, scope, dataset)
        return {f["name"]: f for f in found}

    def _pfn_base(self, rse: str) -> str:
        """Return what the RSE's PFNs start with before ``/<scope>/<name>`` (``file:///prefix``)."""
        scope, probe = self.settings.scope, "multisite.probe"
        pfns = self._call(
            f"read the PFNs of RSE {rse}", self.client.lfns2pfns, rse, [f"{scope}:{probe}"], operation="write"
        )
        return pfns[f"{scope}:{probe}"].removesuffix(f"/{scope}/{probe}")

    def _add_to_dataset(
        self, rse: str, dataset: str, names: list[str], register: Callable[[list[str]], Any]
    ) -> None:
        """Put files in the hand-off's dataset: attach those registered at the RSE, ``register`` the others.

        A file registered by another hand-off (a raw going to two sites), or by an
        attempt killed before it attached it, is attached as it is; a concurrent
        hand-off registering the same file first only sends the loop round once more.
        """
        if not names:
            return
        client, scope, chunk = self.client, self.settings.scope, self.settings.chunk_size
        for _ in range(3):
            content = self._content(dataset)
            todo = sorted(name for name in names if name not in content)
            if not todo:
                return
            present: dict[str, dict] = {}
            for part in _chunks(todo, chunk):
                present |= self._replicas_at(rse, [_File(name, Path(name)) for name in part])
            for part in _chunks([name for name in todo if name in present], chunk):
                self._call(
                    f"attach {len(part)} files to {scope}:{dataset}",
                    client.attach_dids,
                    scope,
                    dataset,
                    [{"scope": scope, "name": name} for name in part],
                )
            for part in _chunks([name for name in todo if name not in present], chunk):
                register(part)

    def _replicas_at(self, rse: str, files: list[_File]) -> dict[str, dict]:
        """Replicas of ``files`` registered at ``rse`` (in any state), by name."""
        scope = self.settings.scope
        replicas = self._call(
            f"look up replicas at {rse}",
            self.client.list_replicas,
            [{"scope": scope, "name": f.name} for f in files],
            rse_expression=rse,
            all_states=True,
            ignore_availability=True,
        )
        return {replica["name"]: replica for replica in replicas}

    def _ensure_did(self, add: Callable[..., Any], name: str) -> None:
        from rucio.common.exception import DataIdentifierAlreadyExists

        def add_once() -> None:
            try:
                add(self.settings.scope, name)
            except DataIdentifierAlreadyExists:
                pass  # made before, or by an attempt whose reply an outage lost

        self._call(f"create {self.settings.scope}:{name}", add_once)

    def _attach(self, parent: str, children: list[str]) -> None:
        from rucio.common.exception import DuplicateContent, FileAlreadyExists

        scope = self.settings.scope
        present = {
            d["name"] for d in self._call(f"list {scope}:{parent}", self.client.list_content, scope, parent)
        }
        missing = [{"scope": scope, "name": name} for name in children if name not in present]
        if not missing:
            return

        def attach_once() -> None:
            try:
                self.client.attach_dids(scope, parent, missing)
            except (DuplicateContent, FileAlreadyExists):
                pass  # attached by an attempt whose reply an outage lost

        self._call(f"attach to {scope}:{parent}", attach_once)

    # ------------------------------------------------------------------ rule
    def _account(self) -> str | None:
        return self.settings.account or getattr(self.client, "account", None)

    def _find_rule(self, dataset: str, dst_rse: str) -> str | None:
        """Return the id of the hand-off's rule to ``dst_rse`` (of the configured account), if any."""
        scope, account = self.settings.scope, self._account()
        rules = self._call(f"list rules of {scope}:{dataset}", self.client.list_did_rules, scope, dataset)
        for rule in rules:
            if rule["rse_expression"] == dst_rse and (account is None or rule["account"] == account):
                return rule["id"]
        return None

    def _ensure_rule(self, dataset: str, src_rse: str, dst_rse: str, label: str) -> tuple[str, bool]:
        """Return the hand-off's rule id, creating the rule only if there is none."""
        scope, client = self.settings.scope, self.client
        account = self._account()
        rule_id = self._find_rule(dataset, dst_rse)
        if rule_id:
            _LOG.info("Rucio %s: rule %s to %s exists; resuming the wait.", label, rule_id, dst_rse)
            return rule_id, False
        from rucio.common.exception import DuplicateRule

        rule = {
            "dids": [{"scope": scope, "name": dataset}],
            "copies": 1,
            "rse_expression": dst_rse,
            "source_replica_expression": src_rse,
            "lifetime": self.settings.lifetime,
            "grouping": self.settings.grouping,
            "account": account,
            "activity": self.settings.activity,
            "comment": f"multisite {self.campaign} hand-off {label}",
        }

        def add_once() -> str | None:
            try:
                return client.add_replication_rule(**rule)[0]
            except DuplicateRule:
                return None  # made by an attempt whose reply an outage lost

        rule_id = self._call(f"add a rule of {scope}:{dataset} to {dst_rse}", add_once)
        if rule_id is None:
            rule_id = self._find_rule(dataset, dst_rse)
            if rule_id is None:
                raise RucioHandoffError(
                    f"Rucio reports a rule of {scope}:{dataset} to {dst_rse} but none is listed for account "
                    f"{account}; check transfer.rucio.account"
                )
            return rule_id, False
        _LOG.info("Rucio %s: created rule %s of %s:%s to %s.", label, rule_id, scope, dataset, dst_rse)
        return rule_id, True

    def _wait(
        self,
        rule_id: str,
        files: dict[str, _File],
        label: str,
        dst_rse: str,
        recovering: Callable[[], list[str]] | None = None,
        note: str = "Nothing from this hand-off was ingested.",
    ) -> None:
        """Poll the rule with back-off until OK; raise on STUCK, SUSPENDED or timeout.

        Parameters
        ----------
        rule_id : `str`
            The hand-off's rule.
        files : `dict` [`str`, `_File`]
            Its files, by name.
        label : `str`
            The hand-off, for messages.
        dst_rse : `str`
            The rule's RSE.
        recovering : `~collections.abc.Callable`, optional
            Names of files Rucio is still recovering (declared bad); the wait also
            lasts until it returns none (a rule reads OK until the necromancer has
            turned a bad replica into a transfer).
        note : `str`
            Sentence on what the failure leaves behind, for the error message.
        """
        client, settings = self.client, self.settings
        total_bytes = sum(f.bytes or 0 for f in files.values())
        deadline = time.monotonic() + settings.timeout
        interval = settings.poll_interval
        last_done = -1
        while True:
            rule = self._call(f"read rule {rule_id}", client.get_replication_rule, rule_id)
            state = str(rule["state"])
            pending_recovery = recovering() if recovering is not None else []
            if state == "OK" and not pending_recovery:
                _LOG.info(
                    "Rucio %s: rule %s OK: %d/%d files, %d/%d bytes at %s.",
                    label,
                    rule_id,
                    len(files),
                    len(files),
                    total_bytes,
                    total_bytes,
                    dst_rse,
                )
                return
            locks = self._call(f"list the locks of rule {rule_id}", client.list_replica_locks, rule_id)
            by_state: dict[str, list[str]] = {}
            for lock in locks:
                by_state.setdefault(str(lock["state"]), []).append(lock["name"])
            done = [name for name in by_state.get("OK", []) if name not in pending_recovery]
            done_bytes = sum(files[name].bytes or 0 for name in done if name in files)
            _LOG.info(
                "Rucio %s: rule %s %s: %d/%d files, %d/%d bytes at %s (%d replicating, %d stuck).",
                label,
                rule_id,
                state,
                len(done),
                len(files),
                done_bytes,
                total_bytes,
                dst_rse,
                len(by_state.get("REPLICATING", [])),
                len(by_state.get("STUCK", [])),
            )
            if state in ("STUCK", "SUSPENDED"):
                stuck = sorted(by_state.get("STUCK", [])) or sorted(set(files) - set(done))
                reason = self._scrub(str(rule.get("error") or "no reason given"))
                raise RucioTransferStuck(
                    f"Hand-off {label}: Rucio rule {rule_id} to {dst_rse} is {state}: {len(stuck)} of "
                    f"{len(files)} file(s) could not be transferred. Rucio's reason: {reason}\n"
                    f"Files:\n{_listing(stuck)}\n"
                    f"{note} Fix the source files (or the storage), "
                    "let Rucio retry the rule (rucio update-rule --stuck), then rerun."
                )
            if time.monotonic() >= deadline:
                pending = sorted(set(files) - set(done))
                raise RucioTransferStuck(
                    f"Hand-off {label}: Rucio rule {rule_id} to {dst_rse} still {state} after "
                    f"{settings.timeout:g} s (transfer.rucio.poll.timeout_s): "
                    f"{len(done)}/{len(files)} files, {done_bytes}/{total_bytes} bytes done. "
                    f"Pending:\n{_listing(pending)}\n"
                    "Rerun to resume waiting on the same rule."
                )
            interval = settings.poll_interval if len(done) > last_done >= 0 else interval
            last_done = len(done)
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * settings.poll_backoff, settings.poll_max_interval)

    # ------------------------------------------------------------------ arrival and repair
    def _damage(
        self, root: Path, files: dict[str, _File], label: str, only: Iterable[str] | None = None
    ) -> list[Damage]:
        """Check a hand-off's files at ``root`` against Rucio's size and adler32 (all, or those ``only``).

        Damaged files are described (dataset type, data ID) from the hand-off's manifest.
        """
        chosen = files.values() if only is None else [files[name] for name in only]
        damage = check_files((FileRecord(f.name, f.bytes, f.adler32), f.path) for f in chosen)
        return with_descriptions(damage, root / self.manifest_name(label)) if damage else damage

    def _check_arrived(self, destination: Site, root: Path, files: dict[str, _File], label: str) -> None:
        """Check every file at the destination against Rucio's size and adler32, before any import."""
        if damage := self._damage(root, files, label):
            raise damaged_files(
                f"Hand-off {label}",
                destination.name,
                damage,
                root,
                note="Rucio reports the rule OK, but these files differ from what Rucio registered at the "
                "source; nothing was imported by this attempt.",
            )

    def _replica_states(self, rse: str, names: list[str]) -> dict[str, str]:
        """Rucio's state (``AVAILABLE``, ``BAD``, ``COPYING``, ...) of each file's replica at ``rse``."""
        scope, states = self.settings.scope, {}
        for part in _chunks(names, self.settings.chunk_size):
            for replica in self._call(
                f"look up replica states at {rse}",
                self.client.list_replicas,
                [{"scope": scope, "name": name} for name in part],
                rse_expression=rse,
                all_states=True,
                ignore_availability=True,
            ):
                states[replica["name"]] = str(replica.get("states", {}).get(rse))
        return states

    def repair(self, source: Site, destination: Site, label: str) -> dict[str, Any]:
        """Have Rucio recover each damaged or missing file of a received hand-off, then verify it.

        No copy behind Rucio's back: each destination replica that Rucio holds as
        available but that is missing or differs from its registered size and
        adler32 is declared bad (``declare_bad_file_replicas``); Rucio's necromancer
        then queues a transfer from a good replica into the rule's lock, the conveyor
        copies it, and the rule returns to OK. The repair waits for that (replicas
        already being recovered, e.g. after an interrupted repair, are waited for
        too) and checks the files again. Registry entries at the destination are
        left as they are. The Rucio account needs the right to declare bad replicas
        (``root`` or an admin in Rucio's generic permission policy).
        """
        names, scope = self.names(label), self.settings.scope
        if not self.published(source, destination, label):
            return repair_outcome("not sent")
        dst_rse = self._rse(destination)
        rule_id = self._find_rule(names["handoff"], dst_rse)
        if rule_id is None:
            return repair_outcome("not received")
        with open_butler(destination.repo) as butler:
            root = self._check_rse(destination, butler)
        files = self._dataset_files(names["handoff"], root)
        states = self._replica_states(dst_rse, list(files))
        held = [name for name in files if states.get(name) == "AVAILABLE"]
        in_recovery = [name for name in files if states.get(name) in ("BAD", "COPYING")]
        damage = self._damage(root, files, label, held)
        if not damage and not in_recovery:
            return repair_outcome("intact", len(files))
        bad = [d.record.name for d in damage]
        if bad:
            refused = self._call(
                f"declare {len(bad)} replica(s) at {dst_rse} bad",
                self.client.declare_bad_file_replicas,
                [{"scope": scope, "name": name, "rse": dst_rse} for name in bad],
                f"multisite repair: {destination.name}'s copy is missing or differs from its registered "
                f"size and adler32 (hand-off {label})",
            )
            problems = [f"{rse}: {entry}" for rse, entries in (refused or {}).items() for entry in entries]
            if problems := [p for p in problems if "Already declared" not in p]:
                raise RucioHandoffError(
                    f"Repair of hand-off {label}: Rucio did not accept these replicas at {dst_rse} as bad:\n"
                    f"{_listing(problems)}\nNothing was changed for them. A Rucio admin can declare them: "
                    f"rucio replica state update bad --reason REASON --lfn --scope {scope} --rse {dst_rse} "
                    "FILE_OF_NAMES; then rerun the repair."
                )
            _LOG.info(
                "Rucio %s: declared %d replica(s) at %s bad for Rucio to recover:\n%s",
                label,
                len(bad),
                dst_rse,
                _listing(f"{d.record.name}: {d.problem}" for d in damage),
            )
        waited = bad + in_recovery

        def recovering() -> list[str]:
            return [n for n, state in self._replica_states(dst_rse, waited).items() if state != "AVAILABLE"]

        self._wait(
            rule_id,
            files,
            label,
            dst_rse,
            recovering=recovering,
            note=f"The damaged files at {destination.name} are not repaired yet.",
        )
        if still := self._damage(root, files, label, waited):
            raise damaged_files(
                f"Repair of hand-off {label}",
                destination.name,
                still,
                root,
                note="Rucio reports them recovered, yet they still differ.",
                fix=f"Check their replicas at the source RSE {self._rse(source)} (rucio replica list file "
                f"{scope}:NAME), then run {repair_command(destination.name)} again.",
            )
        return repair_outcome("repaired", len(files), waited)
