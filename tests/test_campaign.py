"""The whole demo campaign, end to end, through real Butler repositories and real ``bps submit``.

One campaign is run through the failures an operator meets: a failing quantum at
one site (others go on), a run killed mid-way, reruns of finished rules. At the end
the multi-site products must equal the single-site reference.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from lsst.daf.butler import Butler, CollectionType

from multisite.butler_utils import open_butler
from multisite.cli import main
from multisite.config import load_campaign
from multisite.consistency import check_campaign, find_orphans
from multisite.demo.images import SkyImageFormatter
from multisite.errors import QAFailed
from multisite.handoff import run_handoff
from multisite.layout import Layout
from multisite.markers import read_marker
from multisite.placement import read_placement
from multisite.qa import run_qa
from multisite.status import campaign_status, format_status

from .conftest import BIN, REPO, Webhook, browser_dom, demo_config, snakemake, snakemake_command


def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table."""
    table = output.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


@pytest.fixture(scope="module")
def webhook():
    """Return a local webhook receiving the campaign's notifications."""
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory, webhook) -> Path:
    """One demo campaign shared by the tests of this module, which run in order."""
    directory = tmp_path_factory.mktemp("campaign")
    demo_config(directory, notify={"webhook": webhook.url})
    return directory


@pytest.fixture(scope="module")
def campaign(campaign_dir):
    """Return the validated campaign config."""
    return load_campaign(campaign_dir / "config.yaml")


def markers(campaign_dir: Path) -> Path:
    """Marker directory of a campaign."""
    return campaign_dir / "work" / "markers"


def test_1_dry_run_lists_the_whole_campaign(campaign_dir):
    result = snakemake(campaign_dir, "-n")
    counts = job_counts(result.stdout)
    assert counts == {
        "prepare_repo": 4,
        "demo_survey": 1,
        "plan": 1,
        "reference": 1,
        "bps_yaml": 11,  # step1: a chunk per site; step2: one; step3: a chunk per patch
        "handoff": 20,  # raws and fan-in: a piece per step1 chunk; fan-out and final: per step3 chunk
        "verify_inputs": 4,
        "run_stage": 11,
        "step1_in2p3": 1,
        "step1_lancs": 1,
        "step1_ral": 1,
        "step1_usdf": 1,
        "step2_usdf": 1,
        "step3_in2p3": 1,
        "step3_lancs": 1,
        "step3_ral": 1,
        "step3_usdf": 1,
        "qa": 1,
        "all": 1,
        "total": 64,
    }
    assert not (campaign_dir / "work").exists()


def test_2_failed_quantum_fails_its_site_only(campaign_dir, campaign, webhook):
    result = snakemake(
        campaign_dir, "--keep-going", env={"MULTISITE_DEMO_FAIL": "makeCoadd:patch=4"}, check=False
    )
    assert result.returncode != 0
    error = result.stderr
    assert "step3 at in2p3 (chunk t0p4): 1 of 1 quanta failed" in error
    assert re.search(
        r"makeCoadd \{skymap: 'demo', tract: 0, patch: 4\} -- log: file://\S+makeCoadd_log", error
    )
    done = markers(campaign_dir)
    for site, unit in [("usdf", "t0p0"), ("ral", "t0p2"), ("ral", "t0p5")]:
        assert (done / "stage" / site / "step3" / f"{unit}.json").exists()
        assert (done / "handoff" / "final" / site / f"{unit}.json").exists()
    assert (done / "stage" / "in2p3" / "step3" / "t0p1.json").exists()  # the site's other chunk
    assert not (done / "stage" / "in2p3" / "step3" / "t0p4.json").exists()
    # The products of in2p3's chunk that succeeded left on their own; the failed chunk's wait.
    assert (done / "handoff" / "final" / "in2p3" / "t0p1.json").exists()
    assert not (done / "handoff" / "final" / "in2p3" / "t0p4.json").exists()
    assert not (done / "qa" / "qa.json").exists()
    # The BPS YAML an operator would submit by hand is there, for every site and stage.
    submit = (campaign_dir / "work" / "bps" / "in2p3" / "step3" / "t0p4.yaml").read_text()
    assert "pipelineYaml: resource://multisite/demo/pipeline.yaml#step3" in submit
    assert "(tract = 0 AND patch IN (4))" in submit
    step1 = (campaign_dir / "work" / "bps" / "in2p3" / "step1" / "c0000.yaml").read_text()
    assert "--data-id-table" in step1 and "(tract = 0 AND patch IN (1, 4))" in step1

    # Status and report show the failure, and the hand-off that waits for it.
    cells = {(c.step, c.unit, c.site): c for c in campaign_status(campaign)}
    failed = cells[("step3", "t0p4", "in2p3")]
    assert (
        failed.state == "failed" and "1 of 1 quanta failed" in failed.detail and failed.log.endswith(".log")
    )
    assert cells[("step3", "t0p0", "usdf")].state == cells[("step3", "t0p1", "in2p3")].state == "done"
    waiting = cells[(Layout.handoff_step("final", "in2p3", "t0p4"), "final/in2p3/t0p4", "in2p3")]
    assert waiting.state == "waiting" and waiting.detail == "from in2p3: waiting for step3 t0p4 at in2p3"
    text = format_status(list(cells.values()), campaign)
    assert "FAILED: step3 t0p4 at in2p3" in text and "WAITING: handoff final in2p3 t0p4" in text
    dom = browser_dom(campaign_dir / "work" / "report.html")  # written by the workflow's onerror
    assert re.search(r"<td>in2p3</td><td>t0p4</td>.*?>failed</td>", dom, re.S)
    assert "failed: step3 t0p4 at in2p3" in dom and "waiting: handoff final in2p3" in dom

    # The webhook heard about the failure, with what failed, and about finished stages.
    failures = [p for p in webhook.received if p["event"]["kind"] == "failed"]
    assert any(
        p["event"]["step"] == Layout.chunk_step("in2p3", "step3", "t0p4")
        and "patch: 4" in p["event"]["details"]["error"]
        for p in failures
    )
    assert any(p["event"]["step"] == "step1_ral" and p["event"]["kind"] == "done" for p in webhook.received)


def test_3_killed_run_finishes_with_rerun_incomplete(campaign_dir):
    submit_root = campaign_dir / "work" / "submit" / "in2p3" / "step3" / "t0p4"
    before = set(submit_root.iterdir())
    command = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(campaign_dir),
        "--configfile",
        str(campaign_dir / "config.yaml"),
        "--cores",
        "2",
    ]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (set(submit_root.iterdir()) - before) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.5)
    time.sleep(3)  # mid-way through bps submit
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (markers(campaign_dir) / "stage" / "in2p3" / "step3" / "t0p4.json").exists()

    # What the README tells an operator after a crash: release the lock, then resume.
    snakemake(campaign_dir, "--unlock")
    resumed = snakemake(campaign_dir, "--rerun-incomplete")
    assert "wildcards: site=in2p3, stage=step3, chunk=t0p4" in resumed.stderr + resumed.stdout
    assert (markers(campaign_dir) / "qa" / "qa.json").exists()


def test_4_results_equal_the_single_site_reference(campaign_dir, campaign, capsys):
    qa = read_marker(markers(campaign_dir) / "qa" / "qa.json")
    assert qa["summary"]["site_independence"] == {"pass": 72}
    assert qa["summary"]["completeness"] == {"pass": 72}
    assert qa["summary"]["science"] == {"pass": 7}  # zero points, and coadd photometry of 6 patches
    assert qa["summary"]["stage_completeness"] == {"pass": 21}  # 11 chunks, their output types
    assert qa["summary"]["unit_completeness"] == {"pass": 12}
    table = pd.read_csv(qa["table"])
    coadds = table[(table.check == "completeness") & (table.dataset_type == "deep_coadd")]
    assert sorted(coadds.site) == ["in2p3", "in2p3", "lancs", "ral", "ral", "usdf"]
    science = table[table.check == "science"]
    assert len(science) == 7 and (science.status == "pass").all()

    assert all(c.state == "done" for c in campaign_status(campaign))
    config = str(campaign_dir / "config.yaml")
    assert main(["summary", config]) == 0
    summary = capsys.readouterr().out
    assert "step3    in2p3    2/2 chunks done" in summary
    assert "final          ral      t0p2       3 datasets" in summary
    assert main(["status", config, "--site", "ral"]) == 0
    status = capsys.readouterr().out
    assert "ral      t0p5       done        done        done" in status and "t0p1" not in status
    dom = browser_dom(campaign_dir / "work" / "report.html")
    assert "Every QA check passed." in dom and ">failed<" not in dom
    assert dom.count(">done</td>") == 18  # 6 units x 3 stages


def test_6_qa_fails_when_a_site_output_is_altered(campaign_dir, campaign):
    usdf = Butler.from_config(campaign.central.repo)
    ref = usdf.find_dataset(
        "deep_coadd", skymap="demo", tract=0, patch=4, collections=campaign.handoff_chain("usdf")
    )
    # The coadd came back to USDF in a Butler zip: change its file inside the zip.
    uri = usdf.getURI(ref)
    path, member = Path(uri.ospath), uri.fragment.removeprefix("zip-path=")
    original = path.read_bytes()
    coadd = usdf.get(ref)
    coadd.pixels[10:20, 10:20] *= 1.01
    with zipfile.ZipFile(io.BytesIO(original)) as before, zipfile.ZipFile(path, "w") as after:
        for item in before.infolist():
            altered = SkyImageFormatter.to_bytes(None, coadd) if item.filename == member else None
            after.writestr(item, altered or before.read(item))
    try:
        with pytest.raises(QAFailed) as caught:
            run_qa(campaign, campaign_dir / "qa-altered.csv")
    finally:
        path.write_bytes(original)
    message = str(caught.value)
    assert "site_independence: deep_coadd {skymap: 'demo', tract: 0, patch: 4} site=in2p3" in message
    assert "patch: 1}" not in message


def test_5_reruns_duplicate_nothing(campaign_dir, campaign):
    in2p3 = Butler.from_config(campaign.sites["in2p3"].repo)
    chain = campaign.stage_chain("in2p3", "step3", "t0p4")
    runs = [c for c in in2p3.collections.get_info(chain).children if c.startswith(chain)]
    assert len(runs) >= 2, runs  # the failed attempt and the one that finished it
    stage_runs = in2p3.collections.query(campaign.stage_chain("in2p3", "step3"), flatten_chains=True)
    all_coadds = in2p3.query_datasets("deep_coadd", collections=stage_runs, find_first=False)
    assert sorted(ref.dataId["patch"] for ref in all_coadds) == [1, 4]
    # The attempt after the failure ran only the failed quantum (or nothing, if the killed one finished it).
    marker = read_marker(markers(campaign_dir) / "stage" / "in2p3" / "step3" / "t0p4.json")
    assert marker["quanta_run"] in (0, 1)

    # Forcing a finished stage again redoes nothing and adds no RUN collection.
    step1 = markers(campaign_dir) / "stage" / "ral" / "step1" / "c0000.json"
    ral = Butler.from_config(campaign.sites["ral"].repo)
    runs_before = ral.collections.get_info(campaign.stage_chain("ral", "step1", "c0000")).children
    snakemake(campaign_dir, "--forcerun", "run_stage", "--", str(step1.relative_to(campaign_dir)))
    assert json.loads(step1.read_text())["quanta_run"] == 0
    ral = Butler.from_config(campaign.sites["ral"].repo)
    assert ral.collections.get_info(campaign.stage_chain("ral", "step1", "c0000")).children == runs_before

    # A hand-off run again moves nothing twice.
    placement = read_placement(markers(campaign_dir) / "placement" / "raws.tsv")
    again = run_handoff(campaign, "fanin_step2", "in2p3", "c0000", placement)
    usdf = Butler.from_config(campaign.central.repo)
    stars = usdf.query_datasets("single_visit_star", collections=again["runs"], find_first=False)
    assert len(stars) == len({ref.dataId for ref in stars}) == again["datasets"]["single_visit_star"]

    # The forced chunk's dependants run again, re-verify, and redo nothing; then nothing is left.
    forced_at = time.time()
    snakemake(campaign_dir)
    rewritten = [
        m for m in (markers(campaign_dir) / "stage").glob("*/*/*.json") if m.stat().st_mtime > forced_at
    ]
    assert any(m.parent.name == "step2" for m in rewritten)
    assert all(read_marker(m)["quanta_run"] == 0 for m in rewritten)
    assert read_marker(markers(campaign_dir) / "qa" / "qa.json")["summary"]["site_independence"] == {
        "pass": 72
    }
    result = snakemake(campaign_dir, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.parametrize("site", ["usdf", "in2p3", "ral", "lancs"])
def test_5b_a_site_preview_after_one_instance_lists_nothing_left_for_it(campaign_dir, site):
    """A facility reads its preview as what is left for it, though one instance did all the work."""
    result = snakemake(campaign_dir, "-n", "--config", f"site={site}")
    assert "Nothing to be done" in result.stdout + result.stderr, result.stdout[-3000:]


RAL_STEP1 = "work/markers/stage/ral/step1/c0000.json"
"""A finished chunk of the first stage, as Snakemake names it from the campaign directory."""
RAL_T0P2 = "work/markers/stage/ral/step3/t0p2.json"
"""A finished chunk of the last stage (what depends on it: its stage, a hand-off and the QA)."""
RECIPE = ("--force", RAL_T0P2)
"""The README's recipe to rerun a finished chunk on purpose: force that one job."""


def _check(capsys) -> tuple[int, str]:
    """Run ``multisite check`` on the campaign (from its directory); return its exit code and output."""
    code = main(["check", "config.yaml"])
    return code, capsys.readouterr().out


def _start(campaign_dir: Path, *args: str) -> subprocess.Popen:
    """Start the workflow in a session of its own, to be killed with everything it started."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.Popen(
        snakemake_command(campaign_dir, *args),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _kill_once(process: subprocess.Popen, happened, timeout: float = 600) -> None:
    """SIGKILL a run's whole session as soon as ``happened()`` is true."""
    deadline = time.monotonic() + timeout
    while not happened():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "what the kill waits for did not happen"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _files(directory: Path) -> set[Path]:
    return {path for path in directory.rglob("*") if path.is_file()}


def test_7_check_finds_the_finished_campaign_consistent(campaign_dir, capsys, monkeypatch):
    monkeypatch.chdir(campaign_dir)
    code, out = _check(capsys)
    assert code == 0, out
    assert (
        out == "Campaign demo: consistent; 11 chunk, 9 stage, 20 hand-off markers match the repositories.\n"
    )
    # Before its submission, every chunk checked its site's registry and datastore (never refused here).
    marker = read_marker(markers(campaign_dir) / "stage" / "lancs" / "step1" / "c0000.json")
    space = marker["preflight"]
    assert space["checked"] and 0 < space["estimated_bytes"] < space["required_bytes"] < space["free_bytes"]
    assert marker["output_bytes"]["single_visit_star"] > 0


def test_8_the_rerun_recipe_runs_one_chunk_and_recovers_from_a_kill(campaign_dir, capsys, monkeypatch):
    # The old recipe: --forcerun reads the target as one more rule; every chunk and what follows would run.
    wrong = job_counts(snakemake(campaign_dir, "-n", "--forcerun", "run_stage", RAL_STEP1).stdout)
    assert wrong["run_stage"] == 11 and wrong["total"] == 38
    # The target first is right for a chunk of the first stage only: --forcerun forces every run_stage
    # job the target needs, so a step3 chunk brings the four step1 chunks and step2 with it.
    first = job_counts(snakemake(campaign_dir, "-n", RAL_STEP1, "--forcerun", "run_stage").stdout)
    assert first == {"run_stage": 1, "total": 1}
    later = job_counts(snakemake(campaign_dir, "-n", RAL_T0P2, "--forcerun", "run_stage").stdout)
    assert later["run_stage"] == 6 and later["total"] > 6
    # --force forces the target's own job only.
    assert job_counts(snakemake(campaign_dir, "-n", *RECIPE).stdout) == {"run_stage": 1, "total": 1}

    # Killed mid-way: Snakemake deleted the marker before the job, and nothing shows it is gone.
    marker = campaign_dir / RAL_T0P2
    _kill_once(_start(campaign_dir, *RECIPE), lambda: not marker.exists())
    assert not marker.exists()
    dry = snakemake(campaign_dir, "-n", check=False)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    monkeypatch.chdir(campaign_dir)
    assert main(["summary", "config.yaml"]) == 0
    assert "step3    ral      1/2 chunks done" in capsys.readouterr().out
    # multisite check names it, and the command that restores it.
    code, out = _check(capsys)
    assert code == 1
    assert "chunk t0p2 of step3 at ral: its marker is missing while the stage marker" in out
    assert f"    redo: snakemake --cores 2 {RAL_T0P2}\n" in out

    # The README: after a kill, unlock, then the same command again.
    snakemake(campaign_dir, "--unlock")
    rerun = snakemake(campaign_dir, *RECIPE)
    assert job_counts(rerun.stdout + rerun.stderr) == {"run_stage": 1, "total": 1}
    assert read_marker(marker)["quanta_run"] == 0
    assert _check(capsys)[0] == 0


def test_9_check_names_a_removed_chunk_marker_and_its_command_restores_it_alone(
    campaign_dir, campaign, capsys, monkeypatch
):
    monkeypatch.chdir(campaign_dir)
    marker = markers(campaign_dir) / "stage" / "usdf" / "step3" / "t0p0.json"
    before = read_marker(marker)
    marker.unlink()
    code, out = _check(capsys)
    [finding] = check_campaign(campaign).findings
    assert code == 1 and finding.what == "chunk t0p0 of step3 at usdf" and finding.target == marker
    assert "  chunk t0p0 of step3 at usdf: its marker is missing" in out
    assert f"    redo: {finding.command()}\n" in out and finding.command().endswith("step3/t0p0.json")

    restored = snakemake(campaign_dir, *finding.snakemake_args())
    assert job_counts(restored.stdout + restored.stderr) == {"run_stage": 1, "total": 1}
    after = read_marker(marker)
    assert (
        after["quanta_run"] == 0
        and after["runs"] == before["runs"]
        and after["datasets"] == before["datasets"]
    )
    assert _check(capsys)[0] == 0


def test_10_a_failed_job_names_its_cause_and_a_killed_ones_files_go_with_its_next_attempt(
    campaign_dir, campaign, capsys, monkeypatch
):
    monkeypatch.chdir(campaign_dir)
    config = "config.yaml"
    # The outputs of a chunk are lost at its site: check tells it from the markers and the repository.
    ral = Butler.from_config(campaign.sites["ral"].repo, writeable=True)
    chain = campaign.stage_chain("ral", "step3", "t0p5")
    runs = [run for run in ral.collections.get_info(chain).children if run.startswith(f"{chain}/")]
    ral.collections.remove_from_chain(chain, runs)
    ral.removeRuns(runs)
    [finding] = check_campaign(campaign).findings
    assert finding.what == "chunk t0p5 of step3 at ral"
    assert f"{chain} holds 0 deep_coadd of the 1 its marker records" in finding.problem
    assert finding.snakemake_args() == ["work/markers/stage/ral/step3/t0p5.json", "--force"]

    # Redone while its task fails: the rule's error and the status name the task's exception.
    failed = snakemake(
        campaign_dir, *finding.snakemake_args(), env={"MULTISITE_DEMO_FAIL": "makeCoadd:patch=5"}, check=False
    )
    assert failed.returncode != 0
    cause = "RuntimeError: Injected failure for makeCoadd patch=5 (MULTISITE_DEMO_FAIL). (first error: "
    assert f"run_stage: step3 at ral (chunk t0p5): 1 of 1 quanta failed: {cause}" in failed.stderr
    assert re.search(re.escape(cause) + r"\S+/logs/step3/step3_demo\.stderr line \d+\)", failed.stderr)
    assert main(["status", config, "--site", "ral"]) == 0
    status = capsys.readouterr().out
    assert "FAILED: step3 t0p5 at ral" in status and cause in status

    # Redone again, killed while BPS writes the chunk's first files: a RUN never registered.
    root = Path(campaign.sites["ral"].repo).resolve()
    before = _files(root / chain)
    _kill_once(_start(campaign_dir, *finding.snakemake_args()), lambda: bool(_files(root / chain) - before))
    killed = sorted(path.relative_to(root) for path in _files(root / chain) - before)
    fake = root / chain / "20000101T000000Z" / "deep_coadd" / "0" / "5" / "fake.fits"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"orphan")
    stray = root / "DemoCam" / "runs" / "stray" / "left.fits"  # outside any chunk's RUNs
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"orphan")
    registry = open_butler(campaign.sites["ral"].repo)  # rolls back a write the kill left unfinished
    refs = registry.query_all_datasets(
        registry.collections.query("*", collection_types=CollectionType.RUN), find_first=False, limit=None
    )
    known = {Path(uris.primaryURI.ospath) for uris in registry.get_many_uris(refs).values()}
    exports = _files(root / "handoff_exports")
    assert main(["orphans", config, "--site", "ral"]) == 0
    listing = capsys.readouterr().out
    listed = find_orphans(campaign, "ral").files
    in_chunk = {*killed, fake.relative_to(root)}
    assert in_chunk | {stray.relative_to(root)} <= set(listed), (killed, listed)
    assert all(f"  {path}\n" in listing for path in listed)
    assert f"Delete them with: multisite orphans {config} --site ral --delete" in listing

    # The documented recovery restores the chunk; its next attempt first deletes what killed ones left.
    snakemake(campaign_dir, "--unlock")
    snakemake(campaign_dir, *finding.snakemake_args())
    assert not any((root / path).exists() for path in in_chunk)
    left = find_orphans(campaign, "ral").files
    assert stray.relative_to(root) in left and not in_chunk & set(left), left
    # What lies outside every chunk's RUNs is the operator's to delete.
    assert main(["orphans", config, "--site", "ral", "--delete"]) == 0
    assert f"Deleted {len(left)} orphaned files" in capsys.readouterr().out
    assert not stray.exists() and not stray.parent.exists()
    assert all(path.exists() for path in known) and _files(root / "handoff_exports") == exports
    assert find_orphans(campaign, "ral").files == ()
    assert read_marker(markers(campaign_dir) / "stage" / "ral" / "step3" / "t0p5.json")["quanta_run"] == 1
    code, out = _check(capsys)
    assert code == 0, out
