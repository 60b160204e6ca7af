"""Integrity end to end: checksums recorded at the source, verified on arrival and by verify_inputs, repaired.

The first tests check the integrity functions on plain files. The module's campaign
then runs the demo workflow (``butler`` backend) up to RAL's verified inputs
(``snakemake work/markers/inputs/ral/c0000.json``: the repositories, the survey, the plan,
the raws hand-off and ``verify_inputs``), damages four of RAL's raws (flipped bytes,
truncated, swapped for another raw of the same size, deleted) and takes the
operator's path: ``verify_inputs`` and a rerun of the hand-off name each file and the
repair; ``multisite repair`` fetches them again from USDF; the workflow then
completes, with no dataset imported twice. The Rucio path is in ``test_rucio.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
from lsst.daf.butler import Butler

from multisite.cli import main
from multisite.config import load_campaign
from multisite.errors import DamagedFilesError, HandoffError, event_kind
from multisite.handoff import received_handoffs
from multisite.integrity import (
    FileRecord,
    Manifest,
    adler32_of,
    check_files,
    copy_verified,
    damaged_files,
    repair_command,
)
from multisite.layout import Layout
from multisite.markers import read_marker
from multisite.states import EventKind

from .conftest import BIN, demo_config, scheduled_jobs, snakemake

LAYOUT = Layout(Path("work"))
INPUTS = str(LAYOUT.inputs_marker("ral", "c0000"))
RAWS_HANDOFF = str(LAYOUT.handoff_marker("raws", "ral", "c0000"))
MANIFEST = "handoff_exports/demo/raws/ral/c0000.manifest.json"


# ---------------------------------------------------------------------------------------- the functions
def test_adler32_is_rucios(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 9000)  # more than the 1 MiB read size
    assert adler32_of(big) == f"{zlib.adler32(big.read_bytes()) & 0xFFFFFFFF:08x}"
    (tmp_path / "empty").write_bytes(b"")
    assert adler32_of(tmp_path / "empty") == "00000001"


def _recorded(path: Path, **fields) -> FileRecord:
    return FileRecord(path.name, **fields).measured(path)


def test_check_files_names_each_kind_of_damage(tmp_path):
    files = {}
    for name in ("good", "flipped", "truncated", "swapped", "deleted"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode() * 100)
    records = {name: _recorded(path) for name, path in files.items()}
    flipped = bytearray(files["flipped"].read_bytes())
    flipped[10] ^= 0xFF
    files["flipped"].write_bytes(bytes(flipped))
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:-1])
    files["swapped"].write_bytes(b"x" * len(files["swapped"].read_bytes()))
    files["deleted"].unlink()
    damage = {d.record.name: d.problem for d in check_files((records[n], p) for n, p in files.items())}
    assert set(damage) == {"flipped", "truncated", "swapped", "deleted"}
    assert "same size, other content" in damage["flipped"] and "same size" in damage["swapped"]
    assert damage["truncated"] == "899 bytes, the source recorded 900"
    assert damage["deleted"] == "missing"


def test_manifest_is_byte_stable_and_a_damaged_one_is_named(tmp_path):
    source = tmp_path / "raw.npz"
    source.write_bytes(b"pixels")
    record = _recorded(source, dataset_type="raw", data_id="{exposure: 1}", dataset_id="d1")
    zipped = FileRecord("h/ral/00000.zip", 1, "00000002", zipped=("d2", "d3"))
    manifest = Manifest("raws/ral/c0000", (record, zipped))
    first = manifest.write(tmp_path / "m1.json").read_bytes()
    # Same content, same bytes (a manifest registered in Rucio keeps its adler32 when rewritten).
    assert Manifest("raws/ral/c0000", manifest.files[::-1]).write(tmp_path / "m2.json").read_bytes() == first
    assert Manifest.read(tmp_path / "m1.json").files == tuple(sorted(manifest.files, key=lambda r: r.name))
    assert Manifest.read(tmp_path / "m1.json").dataset_ids() == ["d1", "d2", "d3"]
    assert zipped.describe() == "Butler zip of 2 datasets"
    (tmp_path / "m1.json").write_bytes(first[: len(first) // 2])
    with pytest.raises(HandoffError, match="m1.json is not a readable hand-off manifest"):
        Manifest.read(tmp_path / "m1.json")


def test_damaged_files_error_names_path_dataset_data_id_and_repair(tmp_path):
    root = tmp_path / "repo"
    path = root / "DemoCam" / "raw" / "r.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"abc")
    record = FileRecord("DemoCam/raw/r.npz", 4, "00000001", "raw", "{exposure: 7, detector: 1}", "id")
    (damage,) = check_files([(record, path)])
    error = damaged_files("Hand-off raws/ral/c0000", "ral", [damage], root)
    message = str(error)
    # A hand-off that did not deliver: the workflow records it as failed, like any other.
    assert (
        isinstance(error, DamagedFilesError)
        and isinstance(error, HandoffError)
        and event_kind(error) is EventKind.FAILED
    )
    assert "DemoCam/raw/r.npz (raw {exposure: 7, detector: 1}): 3 bytes, the source recorded 4" in message
    assert repair_command("ral") == "multisite repair <campaign config> --site ral"
    assert f"Repair: {repair_command('ral')}" in message and str(root) in message


def test_copy_verified_puts_a_file_back_and_refuses_a_bad_source(tmp_path):
    source, destination = tmp_path / "source", tmp_path / "dest" / "sub" / "file"
    source.write_bytes(b"the raw")
    record = _recorded(source)
    assert copy_verified(source, destination, record) is None
    assert destination.read_bytes() == b"the raw"
    destination.write_bytes(b"the rav")
    source.write_bytes(b"bad raw")
    problem = copy_verified(source, destination, record)
    assert problem and "the source's copy" in problem and "adler32" in problem
    assert destination.read_bytes() == b"the rav"  # left as it was, nothing half-written
    assert [p.name for p in destination.parent.iterdir()] == ["file"]


def test_each_site_repairs_what_it_receives_from_another_repository(campaign_dir):
    campaign = load_campaign(campaign_dir / "config.yaml")
    received = [label for label, _, _ in received_handoffs(campaign, "ral")]
    assert received == ["raws/ral/c0000", "fanout_step3/ral/t0p2", "fanout_step3/ral/t0p5"]
    central = [label for label, _, _ in received_handoffs(campaign, "usdf")]
    # USDF processes units too, in its own repository: nothing of its own to repair.
    assert central == [
        *(f"fanin_step2/{s}/c0000" for s in ("in2p3", "ral", "lancs")),
        *("final/in2p3/t0p1", "final/in2p3/t0p4", "final/ral/t0p2", "final/ral/t0p5", "final/lancs/t0p3"),
    ]


def test_repair_command_refuses_an_unknown_site(campaign_dir, capsys):
    assert main(["repair", str(campaign_dir / "config.yaml"), "--site", "nowhere"]) == 2
    assert "--site: 'nowhere' is not a site of this campaign" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the campaign
@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> Path:
    """Run a demo campaign up to RAL's verified inputs (the raws hand-off and verify_inputs)."""
    directory = tmp_path_factory.mktemp("integrity")
    demo_config(directory)
    snakemake(directory, INPUTS)
    return directory


def repos(directory: Path) -> tuple[Path, Path]:
    """Return the datastore roots of USDF (the source) and RAL."""
    sites = directory / "work" / "sites"
    return sites / "usdf" / "repo", sites / "ral" / "repo"


def raw_count(repo: Path) -> tuple[int, int]:
    """Count the raws of a repository: in every collection, and distinct dataset IDs."""
    refs = Butler.from_config(str(repo)).query_datasets("raw", collections="*", find_first=False, limit=None)
    return len(refs), len({ref.id for ref in refs})


@pytest.fixture(scope="module")
def damaged(campaign) -> dict[str, FileRecord]:
    """Damage four of RAL's raws four ways, and the zip of its placement share; return their records."""
    usdf, ral = repos(campaign)
    records = [r for r in Manifest.read(ral / MANIFEST).files if r.dataset_type == "raw"]
    # Another valid raw of the same size, from USDF's: the swap that a size check cannot see.
    by_size: dict[int, list[Path]] = {}
    for path in usdf.rglob("raw_*.npz"):
        by_size.setdefault(path.stat().st_size, []).append(path)
    swaps = [
        (record, other)
        for record in records
        for other in by_size.get(record.bytes, [])
        if other.read_bytes() != (usdf / record.name).read_bytes()
    ]
    assert swaps, "the demo survey has no two raws of the same size at USDF, one of them RAL's"
    swapped, other = swaps[0]
    flipped, truncated, deleted = [r for r in records if r is not swapped][:3]
    path = ral / flipped.name
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    path = ral / truncated.name
    path.write_bytes(path.read_bytes()[:-100])
    shutil.copyfile(other, ral / swapped.name)
    (ral / deleted.name).unlink()
    (zipped,) = [r for r in Manifest.read(ral / MANIFEST).files if r.zipped]
    path = ral / zipped.name
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    return {"flipped": flipped, "truncated": truncated, "swapped": swapped, "deleted": deleted, "zip": zipped}


def assert_names_each(output: str, damaged: dict[str, FileRecord]) -> None:
    """Check that the error names every damaged file, its dataset, what is wrong, and the repair."""
    for kind, record in damaged.items():
        line = next((line for line in output.splitlines() if record.name in line), None)
        assert line is not None, f"{kind} {record.name} not named in:\n{output}"
        assert f"({record.describe()})" in line, line
        expected = {"deleted": "missing", "truncated": "bytes, the source recorded"}.get(
            kind, "other content"
        )
        assert expected in line, line
    assert "multisite repair <campaign config> --site ral" in output
    assert "IntegrityError" not in output and "Traceback" not in output


def test_1_raws_handoff_records_checksums_at_the_source_and_verifies_them(campaign):
    usdf, ral = repos(campaign)
    manifest = Manifest.read(usdf / MANIFEST)
    # The destination keeps the same manifest, for verify_inputs and repairs.
    assert (ral / MANIFEST).read_bytes() == (usdf / MANIFEST).read_bytes()
    # The raws as files, the site's share of the placement in a Butler zip, kept under the same name.
    raws, zips = [r for r in manifest.files if not r.zipped], [r for r in manifest.files if r.zipped]
    assert {r.dataset_type for r in raws} == {"raw"} and all(r.data_id.startswith("{") for r in raws)
    assert len(zips) == 1 and len(zips[0].zipped) == 1 and zips[0].name.endswith("/raws/ral/c0000/00000.zip")
    placement = Butler.from_config(str(ral)).get_dataset(zips[0].zipped[0])
    assert placement.datasetType.name == "campaign_placement"
    for record in manifest.files:
        assert record.adler32 == adler32_of(usdf / record.name) == adler32_of(ral / record.name)
        assert record.bytes == (usdf / record.name).stat().st_size
    marker = read_marker(campaign / RAWS_HANDOFF)
    details = marker["backend_details"]
    assert details["verified_files"] == len(manifest.files) == details["files"] + details["zips"]
    assert read_marker(campaign / INPUTS)["files_verified"] == len(manifest.files)


def test_2_verify_inputs_names_each_damaged_file_and_the_repair(campaign, damaged):
    result = snakemake(campaign, INPUTS, "--forcerun", "verify_inputs", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "ral: inputs of raws piece c0000: 5 file(s) at ral are missing or differ" in output, output[-3000:]
    assert_names_each(output, damaged)


def test_3_a_rerun_of_the_handoff_reverifies_and_names_each_damaged_file(campaign, damaged):
    result = snakemake(campaign, RAWS_HANDOFF, "--forcerun", "handoff", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Hand-off raws/ral/c0000: 5 file(s) at ral are missing or differ" in output, output[-3000:]
    assert_names_each(output, damaged)
    assert not (campaign / RAWS_HANDOFF).exists()


def test_4_repair_then_the_workflow_completes_with_no_duplicate(campaign, damaged):
    usdf, ral = repos(campaign)
    files = Manifest.read(ral / MANIFEST).files
    raws = sum(r.dataset_type == "raw" for r in files)
    before = raw_count(ral)
    command = [str(BIN / "multisite"), "repair", str(campaign / "config.yaml"), "--site", "ral"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=campaign)
    assert result.returncode == 0, result.stderr
    assert f"{'raws/ral/c0000':24s} from usdf     repaired" in result.stdout, result.stdout
    assert "5 fetched again and verified" in result.stdout
    assert all(record.name in result.stdout for record in damaged.values())
    assert f"{'fanout_step3/ral/t0p2':24s} from usdf     not sent" in result.stdout
    for record in damaged.values():
        assert (ral / record.name).read_bytes() == (usdf / record.name).read_bytes()

    # The workflow goes on: the hand-off and verify_inputs run again, and nothing else.
    result = snakemake(campaign, INPUTS)
    assert sorted(rule for rule, _ in scheduled_jobs(result.stdout + result.stderr).values()) == [
        "handoff",
        "verify_inputs",
    ]
    details = read_marker(campaign / RAWS_HANDOFF)["backend_details"]
    assert details["transferred"] == 0 and details["verified_files"] == len(files)
    assert raw_count(ral) == before == (raws, raws)
    assert read_marker(campaign / INPUTS)["files_verified"] == len(files)

    # A repair of intact files changes nothing.
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=campaign)
    assert f"{'raws/ral/c0000':24s} from usdf     intact: {len(files)} files checked" in result.stdout
    assert "ral: 0 file(s) repaired" in result.stdout
    assert json.loads((ral / MANIFEST).read_text())["handoff"] == "raws/ral/c0000"
