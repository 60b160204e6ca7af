"""Trust under faults, fast: preflight refusals, the first real error of a failed submission, orphans.

A read-only registry and a full disk are refused before anything is submitted,
naming the site, the repository, the numbers and the fix; a failed submission names
the first line of its jobs' logs that says why; datastore files no registry row
refers to are listed and deleted, and nothing else; a hand-off's import that crashes
between batches keeps the batches before, and its rerun adds only the rest; a zip
damaged at the source is refused before any of it is ingested. The tests that need a finished
demo campaign (``multisite check``, the rerun recipe, a real killed submission) are
at the end of ``test_campaign.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from lsst.daf.butler import Butler, Config, DatasetType

from multisite.backends import ButlerBackend, HandoffPayload, datastore_root, import_export, write_export
from multisite.bps import Preflight, first_error, run_stage
from multisite.cli import main
from multisite.config import load_campaign
from multisite.consistency import Finding, check_campaign, find_orphans
from multisite.errors import CampaignConfigError, DamagedFilesError, StageFailed
from multisite.integrity import Manifest
from multisite.markers import write_marker
from multisite.sites import make_demo_survey, prepare_repo

from .conftest import demo_config

SITE = "ral"


def _campaign(directory: Path, **overrides):
    """Return the demo campaign in ``directory``, with ``SITE``'s repository created (empty)."""
    campaign = load_campaign(demo_config(directory, **overrides))
    Butler.makeRepo(campaign.sites[SITE].repo, config=Config(campaign.repo_seed))
    return campaign


def _nothing_submitted(campaign) -> bool:
    layout = campaign.layout
    return (
        not layout.qgraph_dir(SITE, "step1", "c0000").exists()
        and not layout.submit_dir(SITE, "step1", "c0000").exists()
    )


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """Make a file read-only for this process: mode 0444, and immutable when running as root."""
    mode = path.stat().st_mode
    path.chmod(0o444)
    immutable = os.geteuid() == 0
    try:
        if immutable:  # root writes through file modes; the immutable flag stops it
            chattr = shutil.which("chattr")
            if chattr is None or subprocess.run([chattr, "+i", str(path)], check=False).returncode:
                pytest.skip("running as root without chattr +i: cannot make a file read-only")
        yield
    finally:
        if immutable and shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(path)], check=False)
        path.chmod(mode)


def test_read_only_registry_is_refused_before_submission(tmp_path):
    campaign = _campaign(tmp_path)
    database = Path(campaign.sites[SITE].repo) / "gen3.sqlite3"
    with _read_only(database), pytest.raises(StageFailed) as caught:
        run_stage(campaign, SITE, "step1", "c0000", tmp_path / "unused.yaml", pd.DataFrame())
    message = str(caught.value)
    assert message.startswith("step1 at ral (chunk c0000): preflight: the registry of site ral's repository ")
    assert campaign.sites[SITE].repo in message and str(database) in message
    assert "attempt to write a readonly database" in message
    assert "Nothing was submitted. Fix: make the registry writable" in message
    assert _nothing_submitted(campaign)
    # Writable again, the probe leaves nothing behind: its RUN was rolled back.
    butler = Butler.from_config(campaign.sites[SITE].repo)
    assert not butler.collections.query("*/preflight/*")


def test_full_disk_is_refused_before_submission(tmp_path):
    free_gb = shutil.disk_usage(tmp_path).free / 1e9
    campaign = _campaign(tmp_path, preflight={"space_reserve_gb": free_gb + 1000})
    with pytest.raises(StageFailed) as caught:
        run_stage(campaign, SITE, "step1", "c0000", tmp_path / "unused.yaml", pd.DataFrame())
    message = str(caught.value)
    assert message.startswith(
        f"step1 at ral (chunk c0000): preflight: not enough free space for site ral's datastore "
        f"{Path(campaign.sites[SITE].repo).resolve()} (repository {campaign.sites[SITE].repo}): "
    )
    assert " TB kept free (preflight.space_reserve_gb)" in message and "GB free, " in message
    assert "multisite orphans CONFIG --site ral --delete" in message and "Nothing was submitted" in message
    assert _nothing_submitted(campaign)


def test_space_needed_is_the_estimate_with_its_margin_and_the_reserve(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    checks = Preflight("step1 at ral (chunk c0000)", SITE, "repo", tmp_path, margin=0.5, reserve=1000)
    figures = checks.require(2000, "a test")
    assert figures == {
        "datastore": str(tmp_path),
        "checked": True,
        "free_bytes": figures["free_bytes"],
        "estimated_bytes": 2000,
        "estimate_from": "a test",
        "required_bytes": 4000,
    }
    with pytest.raises(
        StageFailed, match=r"needed = the chunk's outputs, estimated at .* \(a test\), \+ 50%"
    ):
        checks.require(free, "a test")
    assert Preflight("x", SITE, "s3://bucket/repo", None, 0.5, 10**20).require(10**20) == {
        "datastore": None,
        "checked": False,
    }


def test_preflight_settings_are_validated(tmp_path):
    assert (
        load_campaign(demo_config(tmp_path, preflight={"space_margin": 0.2})).preflight["space_margin"] == 0.2
    )
    with pytest.raises(
        CampaignConfigError, match="preflight.space_reserve_gb: -1 is less than the minimum of 0"
    ):
        load_campaign(demo_config(tmp_path, preflight={"space_reserve_gb": -1}))
    with pytest.raises(CampaignConfigError, match="preflight: Additional properties are not allowed"):
        load_campaign(demo_config(tmp_path, preflight={"margin": 1}))


def _job_log(submit_dir: Path, job: str, text: str, suffix: str = ".stderr") -> None:
    path = submit_dir / "logs" / job / f"{job}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_first_error_is_the_root_cause_in_job_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    submit = tmp_path / "submit" / "20261202T000000Z"
    _job_log(submit, "pipetaskInit", "VERBOSE 2026 lsst.x ()(x.py:1) - Permission denied is fine here\n")
    _job_log(
        submit,
        "step1",
        "INFO 2026 lsst.y ()(y.py:2) - starting\n"
        "ERROR 2026-12-02T08:01:48.672+00:00 lsst.pipe.base.single_quantum_executor (makeCoadd:{patch: 2})"
        "(single_quantum_executor.py:316) - Execution of task 'makeCoadd' failed.\n"
        "Traceback (most recent call last):\n  File 'x.py', line 1\n"
        "OSError: [Errno 28] No space left on device\n",
    )
    _job_log(submit, "finalJob", "+ butler aggregate-graph\nsqlite3.OperationalError: database is locked\n")
    error = first_error(submit)
    assert error is not None and error.text == "OSError: [Errno 28] No space left on device"
    assert error.path == submit / "logs" / "step1" / "step1.stderr" and error.line == 5
    assert str(error).endswith(f"(first error: {error.path} line 5)")

    # A known cause wins wherever it is; without one, the first exception line; without one, the
    # first ERROR line, shortened.
    _job_log(submit, "step1", "ERROR 2026 lsst.z (q)(z.py:3) - it broke\nRuntimeError: Injected failure\n")
    assert first_error(submit).text == "sqlite3.OperationalError: database is locked"
    _job_log(submit, "finalJob", "lsst.pipe.base.mp_graph_executor.MPGraphExecutorError: tasks failed\n")
    assert first_error(submit).text == "RuntimeError: Injected failure"
    _job_log(submit, "finalJob", "")
    _job_log(submit, "step1", "ERROR 2026 lsst.z (q)(z.py:3) - it broke\n")
    assert first_error(submit).text == "ERROR lsst.z: it broke"

    # parsl's log of this submission (in runinfo/ of the directory BPS ran in), then the bps output.
    _job_log(submit, "step1", "all fine\n")
    parsl = tmp_path / "runinfo" / "000" / "parsl.log"
    parsl.parent.mkdir(parents=True)
    parsl.write_text(
        f"1.0 2026 MainProcess x:1 f INFO: logs in {submit}\n2.0 2026 MainProcess x:2 f ERROR: lost\n"
    )
    (tmp_path / "runinfo" / "001").mkdir()
    (tmp_path / "runinfo" / "001" / "parsl.log").write_text("3.0 2026 MainProcess x:2 f ERROR: another run\n")
    assert first_error(submit).path == parsl
    bps_log = tmp_path / "bps.log"
    bps_log.write_text("subprocess.CalledProcessError: Command 'final_job.bash' returned 1\n")
    assert first_error(None, [bps_log]).text.startswith("subprocess.CalledProcessError")
    parsl.write_text("nothing of this submission\n")
    assert first_error(submit) is None


def test_findings_name_the_target_and_force_only_its_job(tmp_path):
    marker = tmp_path / "work" / "markers" / "stage" / "ral" / "step3" / "t0p2.json"
    missing = Finding("ral", "chunk t0p2 of step3 at ral", "its marker is missing", marker)
    assert missing.command(tmp_path) == "snakemake --cores 2 work/markers/stage/ral/step3/t0p2.json"
    wrong = Finding("ral", "chunk t0p2 of step3 at ral", "datasets missing", marker, force=True)
    assert wrong.snakemake_args(tmp_path) == ["work/markers/stage/ral/step3/t0p2.json", "--force"]


def test_check_reads_only_what_the_markers_there_need(tmp_path):
    campaign = load_campaign(demo_config(tmp_path))  # no repository exists: none is opened
    report = check_campaign(campaign)
    assert report.consistent and not report.checked
    write_marker(campaign.layout.stage_marker(SITE, "step1"), {"output_chain": "x", "chunks": ["c0000"]})
    findings = check_campaign(campaign).findings
    assert [(finding.what, finding.force) for finding in findings] == [
        ("chunk c0000 of step1 at ral", False),
        ("repository of ral", True),
    ]
    assert findings[1].problem.startswith("cannot be opened (No Butler repository at ")


def test_orphans_are_listed_and_deleted_and_nothing_else(tmp_path, capsys):
    campaign = _campaign(tmp_path)
    repo = Path(campaign.sites[SITE].repo)
    butler = Butler.from_config(str(repo), writeable=True)
    butler.registry.registerDatasetType(
        DatasetType("notes", (), "StructuredDataDict", universe=butler.dimensions)
    )
    butler.collections.register("demo/run1")
    ref = butler.put({"a": 1}, "notes", {}, run="demo/run1")
    known = Path(butler.getURI(ref).ospath)
    (repo / ".campaign-write.lock").touch()  # the repository's own files at the top stay
    export = repo / "handoff_exports" / "demo" / "final" / "ral.yaml"
    export.parent.mkdir(parents=True)
    export.write_text("exported\n")
    orphans = [known.parent / "notes_partial.yaml", repo / "demo" / "never_registered" / "x" / "y.fits"]
    for path in orphans:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"0123456789")
    config = str(tmp_path / "config.yaml")

    assert main(["orphans", config, "--site", SITE]) == 0
    listing = capsys.readouterr().out
    expected = sorted(str(path.relative_to(repo.resolve())) for path in orphans)
    assert [line.strip() for line in listing.splitlines()[:2]] == expected
    assert f"2 orphaned files (20 bytes) in ral's datastore {repo}" in listing
    assert f"Delete them with: multisite orphans {config} --site ral --delete" in listing
    assert all(path.exists() for path in orphans)

    assert main(["orphans", config, "--site", SITE, "--delete"]) == 0
    assert "Deleted 2 orphaned files (20 bytes)" in capsys.readouterr().out
    assert not any(path.exists() for path in orphans) and not (repo / "demo" / "never_registered").exists()
    assert known.exists() and export.exists() and (repo / "gen3.sqlite3").exists()
    assert Butler.from_config(str(repo)).get("notes", {}, collections="demo/run1") == {"a": 1}
    assert find_orphans(campaign, SITE).files == ()

    assert main(["orphans", config, "--site", "nowhere"]) == 2
    assert "--site: 'nowhere' is not a site of this campaign" in capsys.readouterr().err


def test_a_repository_appears_whole_or_not_at_all(tmp_path):
    """A kill in the middle of creating a site's repository leaves nothing a rerun takes for one."""
    campaign = load_campaign(demo_config(tmp_path))
    repo = Path(campaign.sites["ral"].repo)
    # What a kill inside Butler.makeRepo leaves: the half-made repository beside the real path.
    leftover = repo.with_name(f"{repo.name}_partial")
    leftover.mkdir(parents=True)
    (leftover / "butler.yaml").write_text("registry: {}\n")
    assert prepare_repo(campaign, "ral")["created"]
    assert not leftover.exists()
    assert Butler.from_config(str(repo)).registry.queryDatasetTypes() == []
    assert not prepare_repo(campaign, "ral")["created"]

    # A directory of other files is not made a repository, and is left as it was.
    lancs = Path(campaign.sites["lancs"].repo)
    lancs.mkdir(parents=True)
    (lancs / "notes.txt").write_text("not a repository")
    with pytest.raises(FileExistsError, match="sites.lancs.repo: .* holds files but no butler.yaml"):
        prepare_repo(campaign, "lancs")
    assert sorted(p.name for p in lancs.iterdir()) == ["notes.txt"]


def test_a_survey_killed_half_way_is_made_again_whole(tmp_path):
    """What a kill inside the demo survey left (an empty raw RUN, staged files) is cleared; it is made."""
    campaign = load_campaign(demo_config(tmp_path))
    prepare_repo(campaign, "usdf")
    repo = Path(campaign.central.repo)
    with Butler.from_config(str(repo), writeable=True) as butler:
        butler.registry.registerRun(campaign.raw_collection)
    (repo / "raws-leftover").mkdir()
    (repo / "raws-leftover" / "raw_1000_0.npz").write_bytes(b"half")
    made = make_demo_survey(campaign)
    assert made["raws"] > 0 and not (repo / "raws-leftover").exists()
    again = make_demo_survey(campaign)
    assert again["raws"] == made["raws"]
    butler = Butler.from_config(str(repo))
    assert len(butler.query_datasets("raw", collections=campaign.raw_collection)) == made["raws"]
    assert sorted(p.name for p in repo.glob("raws-*")) == []


def test_a_crash_between_import_batches_loses_nothing_and_the_rerun_goes_on(tmp_path, monkeypatch, caplog):
    """An export in parts, each imported alone, in batches that commit alone.

    A crash keeps the batches before it, a rerun adds the rest.
    """
    campaign = load_campaign(demo_config(tmp_path))
    for site in ("usdf", SITE):
        prepare_repo(campaign, site)
    make_demo_survey(campaign)
    central = Butler.from_config(campaign.central.repo)
    refs = central.query_datasets("raw", collections=campaign.raw_collection, limit=None)[:11]
    root = datastore_root(central)
    parts = write_export(central, root, HandoffPayload.of(refs), "handoff_exports/demo/batches/ral.yaml", 6)
    assert [path.name for path in parts] == ["ral.00001.yaml", "ral.yaml"]  # the head last
    in_parts = [yaml.safe_load(path.read_text())["data"] for path in parts]
    in_each = [sum(len(item["records"]) for item in data if item["type"] == "dataset") for data in in_parts]
    assert in_each == [6, 5]
    butler_class = type(central)  # the class whose import_ a repository's Butler runs
    real_import = butler_class.import_
    calls = []

    def crash_on_the_third(self, *args, **kwargs):
        calls.append(kwargs["filename"])
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_import(self, *args, **kwargs)

    monkeypatch.setattr(butler_class, "import_", crash_on_the_third)
    with pytest.raises(RuntimeError, match="killed"):
        import_export(campaign.sites[SITE], root, parts, "copy", batch=4)
    at_ral = Butler.from_config(campaign.sites[SITE].repo)
    kept = {ref.id for ref in at_ral.get_many_datasets([ref.id for ref in refs])}
    assert len(kept) == 6 and all(at_ral.stored_many([ref for ref in refs if ref.id in kept]).values())

    calls.clear()
    caplog.clear()
    caplog.set_level("INFO", logger="multisite.backends")
    assert import_export(campaign.sites[SITE], root, parts, "copy", batch=4) == 5
    assert len(calls) == 2 and "Imported part 2 of 2, batch 2 of 2, into ral" in caplog.text
    assert "Imported part 1 of 2" not in caplog.text  # the first part, all there, is not read again
    at_ral = Butler.from_config(campaign.sites[SITE].repo)
    found = at_ral.query_datasets("raw", collections=campaign.raw_collection, limit=None)
    assert sorted(ref.id for ref in found) == sorted(ref.id for ref in refs)
    assert all(at_ral.stored_many(found).values())
    assert import_export(campaign.sites[SITE], root, parts, "copy", batch=4) == 0


def test_products_travel_in_zips_and_a_damaged_zip_is_refused_before_any_of_it_is_ingested(tmp_path, caplog):
    """Processed datasets go in Butler zips of ``datasets_per_zip`` (raws as files), butler backend."""
    campaign = load_campaign(demo_config(tmp_path))
    for site in ("usdf", SITE):
        prepare_repo(campaign, site)
    make_demo_survey(campaign)
    central, ral = campaign.central, campaign.sites[SITE]
    with Butler.from_config(central.repo, writeable=True) as butler:
        blob = DatasetType(
            "zip_probe", ["instrument", "detector"], "StructuredDataDict", universe=butler.dimensions
        )
        butler.registry.registerDatasetType(blob)
        butler.collections.register("probes/run")
        products = [
            butler.put({"detector": d}, blob, instrument=campaign.instrument, detector=d, run="probes/run")
            for d in range(4)
        ]
        truths = butler.query_all_datasets(campaign.truth_collection, limit=None)
        raws = butler.query_datasets("raw", collections=campaign.raw_collection, limit=2)
    payload, label = HandoffPayload.of([*raws, *products, *truths]), "zips/ral/all"
    backend = ButlerBackend(campaign.name, datasets_per_zip=2)
    root = Path(central.repo)
    # The processed datasets are read once, as a stream (a query's pages in a workflow), and counted.
    streamed = HandoffPayload(raws, iter([*products, *truths]))
    with pytest.raises(RuntimeError, match="not been zipped yet"):
        streamed.counts()
    sent = backend.send(central, ral, streamed, label)
    assert (sent["files"], sent["zips"]) == (2, 3)
    # What a site instance's move sees of the send: the piece, from its export, manifest and zips.
    assert backend.begun_pieces(central, "zips", "ral") == {"all"}
    assert not backend.begun_pieces(central, "zips", "lancs")
    # A site whose instance has not created its repository yet has sent nothing: wait for it.
    assert not backend.begun_pieces(campaign.sites["lancs"], "zips", "usdf")
    assert not backend.published(campaign.sites["lancs"], central, "zips/usdf/all")
    assert streamed.counts() == dict(Counter(ref.datasetType.name for ref in [*raws, *products, *truths]))
    zips = [root / f"handoff_exports/demo/zips/ral/all/{i:05d}.zip" for i in range(3)]
    assert all(path.is_file() for path in zips)
    first = [path.read_bytes() for path in zips]
    backend.send(central, ral, payload, label)  # a rerun keeps each zip as it is
    assert [path.read_bytes() for path in zips] == first

    # A zip goes bad at the source after it was sent: refused by its checksum, nothing of it ingested.
    damaged = bytearray(first[1])
    damaged[len(damaged) // 2] ^= 0xFF
    zips[1].write_bytes(bytes(damaged))
    with pytest.raises(DamagedFilesError) as caught:
        backend.receive(central, ral, label)
    message = str(caught.value)
    assert "handoff_exports/demo/zips/ral/all/00001.zip" in message and "Butler zip of 2 datasets" in message
    assert f"Delete {zips[1]} at usdf and send the hand-off again" in message
    in_bad_zip = Manifest.read(root / backend.manifest_name(label)).files[1].zipped
    assert not Butler.from_config(ral.repo).get_many_datasets(in_bad_zip)

    # The documented fix: the zip deleted and the hand-off sent again, then received whole.
    zips[1].unlink()
    backend.send(central, ral, payload, label)
    details, dataset_ids = backend.receive(central, ral, label)
    assert sorted(dataset_ids) == sorted(str(ref.id) for ref in [*raws, *products, *truths])
    at_ral = Butler.from_config(ral.repo)
    assert len(at_ral.get_many_datasets(dataset_ids)) == 8 and details["verified_files"] == 5
    for ref in products:  # read from the zip, which keeps its source name in RAL's datastore
        assert at_ral.get(ref) == {"detector": ref.dataId["detector"]}
        assert "handoff_exports/demo/zips/ral/all/0000" in str(at_ral.getURI(ref))
    assert backend.receive(central, ral, label)[0]["transferred"] == 0  # a rerun adds nothing

    # Damaged at the source after a complete hand-off, a zip keeps its first checksum when the
    # hand-off is sent again: RAL's good copy still verifies, and the damage is named, not spread.
    manifest = (root / backend.manifest_name(label)).read_bytes()
    damaged = bytearray(zips[2].read_bytes())
    damaged[struct.unpack("<I", damaged[-6:-2])[0] - 1] ^= 0xFF  # its last file's, before the zip's directory
    zips[2].write_bytes(bytes(damaged))
    backend.send(central, ral, payload, label)
    assert (root / backend.manifest_name(label)).read_bytes() == manifest
    assert backend.receive(central, ral, label)[0]["verified_files"] == 5

    # Another piece's zip holds two datasets RAL has and two it has not (two chunks' fan-out pieces
    # both carry what both read): only the new ones are ingested, in a zip Butler makes of them.
    with Butler.from_config(central.repo, writeable=True) as butler:
        butler.collections.register("probes/more")
        more = [
            butler.put({"detector": d}, blob, instrument=campaign.instrument, detector=d, run="probes/more")
            for d in range(2)
        ]
    both = ButlerBackend(campaign.name, datasets_per_zip=10)
    both.send(central, ral, HandoffPayload([], [*products[:2], *more]), "zips/ral/more")
    caplog.set_level("INFO", logger="multisite.backends")
    details, dataset_ids = both.receive(central, ral, "zips/ral/more")
    assert "into ral: 2 datasets new, 2 there already." in caplog.text
    at_ral = Butler.from_config(ral.repo)
    assert len(at_ral.get_many_datasets(dataset_ids)) == 4, details
    assert [at_ral.get(ref) for ref in more] == [{"detector": 0}, {"detector": 1}]
    assert "handoff_exports" not in str(at_ral.getURI(more[0]))  # in the zip made of the new ones
    assert "handoff_exports/demo/zips/ral/all/0000" in str(at_ral.getURI(products[0]))  # where it was
    assert both.receive(central, ral, "zips/ral/more")[0]["transferred"] == 0
