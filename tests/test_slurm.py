"""The demo campaign's first rules as jobs of a real, local Slurm.

The module fixture starts the single-node Slurm of ``tests/slurm_harness`` (munged, slurmctld,
slurmd; Debian's packages, installed when missing) and stops it by process id at the end; a
missing piece fails loudly, it is never skipped. Snakemake runs with the profile
``tests/profiles/slurm`` (``snakemake-executor-plugin-slurm``): every job of a rule without
``localrule: True`` must become a Slurm job that completes, no job of a local rule may.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter

import pytest
import yaml

from multisite.config import load_campaign
from multisite.layout import step_id
from tests import slurm_harness
from tests.conftest import BIN, REPO, demo_config, scheduled_jobs, snakemake, snakemake_command

PROFILE = REPO / "tests" / "profiles" / "slurm"


def rule_locality() -> dict[str, bool]:
    """Rule name -> ``localrule: True``?, for the rules of rules/*.smk named in a ``rule NAME:`` line."""
    rules = {}
    for smk in (REPO / "rules").glob("*.smk"):
        for block in re.split(r"^(?=\s*rule\b)", smk.read_text(), flags=re.M):
            if name := re.match(r"\s*rule (\w+):", block):
                rules[name.group(1)] = bool(re.search(r"^\s+localrule:\s*True", block, re.M))
    return rules


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Run a Slurm for this module, its clients' environment (SLURM_CONF, PATH) set meanwhile."""
    cluster = slurm_harness.start(tmp_path_factory.mktemp("slurm"))
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in cluster.env.items():
                patch.setenv(name, value)
            yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_run(slurm, tmp_path_factory):
    """Run the demo campaign up to every site's verified inputs through Slurm."""
    directory = tmp_path_factory.mktemp("slurm-campaign")
    sites = list(yaml.safe_load(demo_config(directory).read_text())["sites"])
    # Every site's verified inputs: repositories, survey, placement, raws hand-offs, verify_inputs.
    targets = [f"work/markers/inputs/{site}/c0000.json" for site in sites]  # one step1 chunk a site
    result = snakemake(directory, "--profile", str(PROFILE), *targets, timeout=600)
    return directory, targets, result.stdout + result.stderr


def test_node_is_up(slurm):
    line = slurm.run("sinfo", "--noheader", "--Node", "--format", "%N %P %T").stdout.split()
    assert line == [socket.gethostname().split(".")[0], f"{slurm_harness.PARTITION}*", "idle"]


def test_non_local_rules_run_as_slurm_jobs(slurm, slurm_run):
    directory, targets, output = slurm_run
    for target in targets:
        assert (directory / target).is_file(), target

    jobs = scheduled_jobs(output)
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", output))
    assert jobs, output[-5000:]

    # Snakemake's view: the jobs of exactly the non-local rules were submitted, each once.
    locality = rule_locality()
    for jobid, (rule, is_local) in jobs.items():
        assert is_local == locality.get(rule, is_local), f"{rule}: local={is_local}, not as in rules/*.smk"
        assert (jobid in submitted) == (not is_local), f"{rule} (job {jobid}) local={is_local}"
    assert set(submitted) <= set(jobs)
    assert len(set(submitted.values())) == len(submitted)
    in_slurm = Counter(jobs[jobid][0] for jobid in submitted)
    assert in_slurm["verify_inputs"] == len(targets), in_slurm
    assert {"prepare_repo", "plan"} <= {rule for rule, is_local in jobs.values() if is_local}

    # Slurm's view: each of those jobs ran on the node, for its rule, and completed.
    for jobid, slurm_id in submitted.items():
        rule = jobs[jobid][0]
        info = slurm.job(slurm_id)
        assert info["JobState"] == "COMPLETED", (rule, info)
        assert info["ExitCode"] == "0:0", (rule, info)
        assert info["Comment"].startswith(f"rule_{rule}"), (rule, info)
        assert info["Partition"] == slurm_harness.PARTITION, info
        assert info["NodeList"] == socket.gethostname().split(".")[0], info
        [log] = (directory / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob(f"{slurm_id}.log")
        assert "1 of 1 steps (100%) done" in log.read_text(), log

    # Nothing else reached Slurm: every job the cluster knows is one that Snakemake submitted.
    queue = slurm.run("squeue", "--states=all", "--noheader", "--format", "%i %T").stdout
    assert dict(line.split() for line in queue.splitlines()) == dict.fromkeys(
        submitted.values(), "COMPLETED"
    ), queue


def test_a_move_waits_for_a_slurm_job_that_outlived_its_killed_workflow(slurm, slurm_run):
    """Killed while ral's input check runs in Slurm: the job goes on, and a move is refused until it ends.

    The job is suspended once the workflow is killed, so it is still there when the move
    looks (its heartbeat, written every 30 s, stays fresh for three of them).
    """
    directory, _, _ = slurm_run
    config = directory / "config.yaml"
    layout = load_campaign(config).layout
    heartbeat = layout.heartbeat("all", step_id("verify_inputs", {"site": "ral", "piece": "c0000"}))
    target = layout.inputs_marker("ral", "c0000").relative_to(directory)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    workflow = subprocess.Popen(
        snakemake_command(directory, "--profile", str(PROFILE), "--force", str(target)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not heartbeat.exists():
        assert workflow.poll() is None and time.monotonic() < deadline, "ral's input check never started"
        time.sleep(0.1)
    os.killpg(workflow.pid, signal.SIGKILL)
    workflow.wait()
    queue = slurm.run("squeue", "--noheader", "--states=RUNNING", "--format", "%i %k").stdout
    (job,) = [line.split()[0] for line in queue.splitlines() if "rule_verify_inputs" in line]
    slurm.run("scontrol", "suspend", job)

    def move() -> subprocess.CompletedProcess:
        command = [str(BIN / "multisite"), "move", str(config), "--unit", "t0p2", "--to", "lancs"]
        return subprocess.run(command, capture_output=True, text=True, env=env, check=False)

    refused = move()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"heartbeats/all/{heartbeat.name}: process " in refused.stderr and "scancel" in refused.stderr
    slurm.run("scancel", job)
    while slurm.job(job)["JobState"] != "CANCELLED":
        assert time.monotonic() < deadline, slurm.job(job)
        time.sleep(0.5)
    moved = move()
    assert moved.returncode == 0 and "move  t0p2: ral -> lancs" in moved.stdout, moved.stdout + moved.stderr
