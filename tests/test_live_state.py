"""Trust under faults: a killed step shows dead, one instance per campaign work directory, readable files.

Through the operator's paths: ``snakemake`` on the demo config (a few early targets,
never the whole campaign), ``multisite status`` and ``multisite unlock``. Heartbeats
beat every half second here (``status.heartbeat_s``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from multisite.cli import main
from multisite.config import load_campaign
from multisite.events import Event, EventLog
from multisite.layout import Layout
from multisite.lock import (
    Heartbeat,
    HoldRefused,
    InstanceHold,
    Owner,
    stale_heartbeat,
    write_heartbeat,
)
from multisite.markers import write_marker
from multisite.report import render_report
from multisite.states import EventKind, StepState
from multisite.status import campaign_status

from .conftest import BIN, REPO, demo_config, snakemake_command

HEARTBEAT_S = 0.5
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
HOST = socket.gethostname()


def _config(directory: Path) -> Path:
    """Write the demo config into ``directory``, with fast heartbeats."""
    return demo_config(directory, status={"heartbeat_s": HEARTBEAT_S})


def _command(config: Path, directory: Path, *args: str) -> list[str]:
    """``snakemake`` on ``config``'s campaign, started in ``directory``."""
    command = snakemake_command(config.parent, *args)
    command[command.index("--directory") + 1] = str(directory)
    return command


@contextmanager
def _running(command: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """Run a command in its own process group, output to ``log``; kill the group if it outlives the block."""
    with log.open("a") as stream:
        process = subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_for(
    what: str, condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 300
) -> None:
    """Poll ``condition`` until true; fail if ``process`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"snakemake ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def _events(layout: Layout, instance: str) -> list[dict]:
    path = layout.event_log(instance)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _kinds(layout: Layout, instance: str, step: str) -> list[str]:
    return [event["kind"] for event in _events(layout, instance) if event["step"] == step]


def _status(config: Path, *args: str) -> str:
    """Return ``multisite status``'s output, as an operator runs it."""
    result = subprocess.run(
        [str(BIN / "multisite"), "status", str(config), *args], capture_output=True, text=True, env=ENV
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _mtimes(directory: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def test_killed_instance_shows_dead_with_how_to_resume_and_resumes(tmp_path, capsys):
    """A site instance killed while its hand-off waits; the documented restart takes its stale hold over."""
    from multisite.sites import prepare_repo

    config = _config(tmp_path)
    campaign = load_campaign(config)
    prepare_repo(campaign, "usdf")  # the sender's repository (USDF's instance), where in2p3 awaits the raws
    layout = campaign.layout
    step = Layout.handoff_step("raws", "in2p3", "c0000")
    target = os.path.relpath(layout.handoff_marker("raws", "in2p3", "c0000"), tmp_path)
    instance = ("--config", "site=in2p3")  # last: --config takes every value after it
    log = tmp_path / "snakemake.log"
    with _running(_command(config, tmp_path, target, *instance), log) as first:
        _wait_for(
            "the raws hand-off waiting",
            lambda: _kinds(layout, "in2p3", step) == ["started", "waiting"],
            first,
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    (waiting,) = [e for e in _events(layout, "in2p3") if e["kind"] == "waiting"]
    assert (waiting["host"], waiting["details"]) == (HOST, {"source": "usdf"})

    status = _status(config, "--site", "in2p3")
    dead = re.compile(
        rf"^  DEAD \(last seen (\S+)\): {step} at in2p3 since {re.escape(waiting['time'])}: "
        rf"its process {waiting['pid']} on {re.escape(HOST)} is gone; "
        rf"resume its instance in {re.escape(str(tmp_path))} with "
        r"`snakemake --profile in2p3 --unlock`, then `snakemake --profile in2p3` .* "
        r"\(log: \S+in2p3/c0000.log\)$",
        re.M,
    )
    assert dead.search(status), status
    assert "raws/in2p3/c0000=dead" in status

    # The documented restart: Snakemake's lock cleared, then the same command again.
    unlock = subprocess.run(
        _command(config, tmp_path, "--unlock", *instance), capture_output=True, text=True, env=ENV
    )
    assert unlock.returncode == 0, unlock.stderr[-3000:]
    with _running(_command(config, tmp_path, "--rerun-incomplete", target, *instance), log) as restarted:
        _wait_for(
            "the restarted hand-off waiting",
            lambda: _kinds(layout, "in2p3", step) == ["started", "waiting"] * 2,
            restarted,
        )
        holder = InstanceHold(layout.instance_lock).holder()
        assert (holder.host, holder.pid, holder.instance) == (HOST, restarted.pid, "in2p3")
        assert main(["status", str(config), "--site", "in2p3"]) == 0
        status = capsys.readouterr().out
        assert "DEAD" not in status and re.search(rf"^  WAITING: {step} at in2p3 since ", status, re.M), (
            status
        )
    assert f"Took over the hold of {layout.workdir} from process {first.pid} on {HOST}" in log.read_text()


def test_second_instance_started_elsewhere_is_refused_before_any_job(tmp_path):
    """Two instances of one config from two directories: the second stops, naming the first; -n works."""
    config = _config(tmp_path)
    layout = load_campaign(config).layout
    elsewhere, preview_directory = tmp_path / "elsewhere", tmp_path / "preview"
    elsewhere.mkdir()
    preview_directory.mkdir()
    target = layout.handoff_marker("raws", "in2p3", "c0000")
    with _running(
        _command(config, tmp_path, os.path.relpath(target, tmp_path)), tmp_path / "first.log"
    ) as first:
        # Its first marker finished: Snakemake touches a job's outputs once it ends, before the next job.
        _wait_for("the first instance's second job", lambda: _kinds(layout, "all", "demo_survey"), first)
        holder = InstanceHold(layout.instance_lock).holder()
        assert (holder.host, holder.pid, holder.directory) == (HOST, first.pid, str(tmp_path))
        markers = _mtimes(layout.markers)
        assert markers
        runs = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
            for command in (
                _command(config, elsewhere, os.path.relpath(target, elsewhere)),
                _command(config, preview_directory, "-n", os.path.relpath(target, preview_directory)),
            )
        ]
        second, preview = (run.communicate(timeout=600)[0] for run in runs)
        assert first.poll() is None, (
            "the first instance ended before the second was refused: test inconclusive"
        )
        assert runs[0].returncode != 0, second[-3000:]
        assert (
            f"is held by another instance: process {first.pid} on {HOST} "
            f"(instance all, started in {tmp_path}) since {holder.since}" in second
        ), second[-3000:]
        assert f"clear its hold with `multisite unlock {config}`" in second
        assert runs[1].returncode == 0 and "This was a dry-run" in preview, preview[-3000:]
        # Nothing the first instance wrote was touched, and no job of the second ran.
        assert {path: mtime for path, mtime in _mtimes(layout.markers).items() if path in markers} == markers
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert target.exists()
    started = [event["step"] for event in _events(layout, "all") if event["kind"] == "started"]
    assert len(started) == len(set(started)) == 5, started
    assert InstanceHold(layout.instance_lock).holder() is None  # given back at the end


HOLDER = "import sys, time\nfrom multisite.lock import InstanceHold\n" + (
    "InstanceHold(sys.argv[1]).acquire('ral')\nprint('held', flush=True)\ntime.sleep(600)"
)


def test_hold_of_a_killed_process_is_taken_over_and_a_live_one_kept(tmp_path):
    path = tmp_path / "work" / "instance.lock"
    env = dict(ENV, PYTHONPATH=str(REPO))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        assert holder.stdout.readline() == "held\n"
        hold = InstanceHold(path, "campaign.yaml")
        with pytest.raises(HoldRefused) as refused:
            hold.acquire("all")
        assert re.search(
            rf"held by another instance: process {holder.pid} on {re.escape(HOST)} "
            rf"\(instance ral, started in {tmp_path}\) since \S+\. .*`multisite unlock campaign.yaml`",
            str(refused.value),
        ), refused.value
        with pytest.raises(HoldRefused, match=rf"still runs on this host: stop it \(kill {holder.pid}\)"):
            hold.clear()
        # The same pid, but a process started at another time: the holder is gone, its pid reused.
        owner = hold.holder()
        path.write_text(json.dumps(asdict(replace(owner, start_ticks=owner.start_ticks + 1))))
        assert hold.acquire("all").pid == holder.pid
        assert hold.release()
        path.write_text(json.dumps(asdict(owner)))
    finally:
        holder.kill()
        holder.wait()
    taken = hold.acquire("all")
    assert taken == owner
    mine = hold.holder()
    assert (mine.host, mine.pid, mine.instance) == (HOST, os.getpid(), "all")
    assert hold.acquire("all") is None  # the holder itself asking again
    assert hold.release() and hold.holder() is None and not hold.release()


def test_multisite_unlock_clears_a_hold_left_on_another_host(tmp_path, capsys):
    config = _config(tmp_path)
    path = load_campaign(config).layout.instance_lock
    path.parent.mkdir(parents=True)
    lost = Owner("lost-node", 4242, "2026-11-25T16:39:20+00:00", instance="all", directory="/data/demo")
    path.write_text(json.dumps(asdict(lost)))
    hold = InstanceHold(path, config)
    with pytest.raises(HoldRefused, match="process 4242 on lost-node"):
        hold.acquire("all")  # another host's process cannot be checked: kept
    assert main(["unlock", str(config)]) == 0
    assert f"cleared the hold of {lost}" in capsys.readouterr().out
    assert hold.acquire("all") is None
    assert hold.release()
    assert main(["unlock", str(config)]) == 0
    assert "no instance holds it" in capsys.readouterr().out
    # A file naming no holder is never taken as free.
    path.write_text("garbage")
    with pytest.raises(HoldRefused, match=rf"names no holder .*`multisite unlock {config}`"):
        hold.acquire("all")


def test_stale_heartbeat_from_another_host_shows_dead_in_status_and_report(tmp_path, capsys):
    config = _config(tmp_path)
    campaign = load_campaign(config)
    layout = campaign.layout
    step = Layout.chunk_step("ral", "step1", "c0000")
    owner = Owner("ral-node07", 4242, "2026-11-25T16:00:00+00:00", instance="ral", directory="/data/ral")
    started = Event(
        EventKind.STARTED,
        step,
        "ral",
        "ral",
        owner.since,
        "",
        {"heartbeat_s": HEARTBEAT_S},
        owner.host,
        owner.pid,
    )
    layout.events.mkdir(parents=True)
    layout.event_log("ral").write_text(json.dumps(asdict(started)) + "\n")
    heartbeat = layout.heartbeat("ral", step)
    write_heartbeat(heartbeat, owner, HEARTBEAT_S)
    assert main(["status", str(config)]) == 0
    status = capsys.readouterr().out
    assert "DEAD" not in status and re.search(
        rf"^  RUNNING: step1 \S+ at ral since {re.escape(owner.since)}", status, re.M
    )

    silent = time.time() - 10
    os.utime(heartbeat, (silent, silent))
    assert main(["status", str(config)]) == 0
    status = capsys.readouterr().out
    line = (
        rf"^  DEAD \(last seen {re.escape(_iso(silent))}\): step1 \S+ at ral since {re.escape(owner.since)}: "
        r"no heartbeat from its "
        r"process 4242 on ral-node07 for 10 s \(one every 0.5 s expected\); "
        r"resume its instance in /data/ral with `snakemake --profile ral --unlock`, "
        r"then `snakemake --profile ral`"
    )
    assert len(re.findall(line, status, re.M)) == len(campaign.units_of("ral")), status
    report = render_report(campaign, tmp_path / "report.html").read_text()
    assert re.search(rf"dead \(last seen {re.escape(_iso(silent))}\): step1 \S+ at ral", report)
    assert "background:#4a148c" in report


def test_step_whose_process_is_gone_from_this_host_is_dead_at_once(tmp_path):
    campaign = load_campaign(_config(tmp_path))
    layout = campaign.layout
    ended = subprocess.Popen(["true"])
    ended.wait()
    step = Layout.handoff_step("raws", "ral", "c0000")
    EventLog(layout.events, "all").record(EventKind.WAITING, step, "ral", "waiting for raws from usdf")
    owner = replace(Owner.this_process("all"), pid=ended.pid, directory=str(tmp_path))
    write_heartbeat(layout.heartbeat("all", step), owner, 30.0)  # fresh: the pid alone tells
    (cell,) = [c for c in campaign_status(campaign) if c.step == step]
    assert cell.state is StepState.DEAD and cell.last_seen
    assert cell.detail == (
        f"its process {ended.pid} on {HOST} is gone; resume its instance in {tmp_path} with "
        "`snakemake --unlock`, then `snakemake --rerun-incomplete` (with the first run's other options)"
    )
    # No heartbeat file: the step ended (its last event not yet read) or ran for another work directory.
    layout.heartbeat("all", step).unlink()
    (cell,) = [c for c in campaign_status(campaign) if c.step == step]
    assert cell.state is StepState.WAITING


def test_heartbeat_beats_while_the_step_runs_and_goes_with_it(tmp_path):
    path = Layout(tmp_path).heartbeat("all", "plan")
    with Heartbeat(path, 0.1, Owner.this_process("all")):
        first = path.stat().st_mtime_ns
        time.sleep(0.5)
        assert path.stat().st_mtime_ns > first
        assert stale_heartbeat(path) is None
        path.unlink()  # removed by someone: written again at the next beat
        time.sleep(0.3)
        assert path.exists()
    assert not path.exists()
    assert stale_heartbeat(path) is None


def test_step_names_from_a_log_stay_inside_the_heartbeat_directory(tmp_path):
    layout = Layout(tmp_path)
    assert (
        layout.heartbeat("ral", "run_stage ral step1 c0000")
        == tmp_path / "heartbeats/ral/run_stage.ral.step1.c0000"
    )
    for instance, step in [("../..", "x"), ("all", "../../etc/passwd"), ("a/b", "..")]:
        assert layout.heartbeats in layout.heartbeat(instance, step).parents


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)], ids=["umask022", "umask002"])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    marker = tmp_path / "markers" / "plan.json"
    hold = InstanceHold(tmp_path / "instance.lock")
    old = os.umask(umask)
    try:
        write_marker(marker, {"rule": "plan"})
        event_log = EventLog(tmp_path / "events", "all")
        event_log.record(EventKind.DONE, "plan", "usdf")
        hold.acquire("all")
        with Heartbeat(tmp_path / "heartbeat", 30, Owner.this_process()) as heartbeat:
            modes = {
                path: stat.S_IMODE(path.stat().st_mode) for path in (marker, event_log.path, heartbeat.path)
            }
    finally:
        os.umask(old)
        hold.release()
    modes[hold.path] = stat.S_IMODE(hold.path.stat().st_mode)
    assert modes == dict.fromkeys(modes, mode)
    assert list(marker.parent.iterdir()) == [marker]  # no temporary file left
