"""The demo campaign's first rules as jobs of a real, personal HTCondor pool.

The module fixture installs (once per machine, ~1-2 min with network) and starts the pool of
``tests/htcondor_harness``: HTCondor's daemons in a Debian 13 chroot, this checkout, its venv
and a work area bound into it. A pool that cannot be installed or started fails the tests
with the harness's log; they are never skipped. Snakemake runs in the chroot as the pool's
job user with the profile ``tests/profiles/htcondor`` (``snakemake-executor-plugin-htcondor``):
every job of a rule without ``localrule: True`` must become an HTCondor job that completes,
no job of a local rule may.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest

from tests import htcondor_harness
from tests.conftest import REPO, demo_config, scheduled_jobs, snakemake_command

PROFILE = REPO / "tests" / "profiles" / "htcondor"
SITES = ("usdf", "in2p3", "ral", "lancs")
# Every site's verified inputs: repositories, survey, placement, the raws hand-offs, verify_inputs.
TARGETS = [f"work/markers/inputs/{site}/c0000.json" for site in SITES]  # the demo: one step1 chunk a site
# With the default (butler) transfer backend; rules/*.smk say which rules are local.
REMOTE_RULES = {"demo_survey": 1, "handoff": len(SITES), "verify_inputs": len(SITES)}
LOCAL_RULES = {"prepare_repo": len(SITES), "plan": 1}
JOB_DIR = ".snakemake/htcondor"


@pytest.fixture(scope="module")
def pool():
    """Run the HTCondor pool for this module."""
    local_pool = htcondor_harness.start()
    try:
        yield local_pool
    finally:
        local_pool.stop()


@pytest.fixture(scope="module")
def htcondor_run(pool):
    """Run the demo campaign up to every site's verified inputs through HTCondor; return (dir, log)."""
    directory = pool.workspace / "campaign"
    directory.mkdir()
    demo_config(directory)
    pool.give_to_job_user(directory)
    command = snakemake_command(directory, "--profile", str(PROFILE), *TARGETS)
    # HTCondor starts jobs with an empty environment: the profile gives them these.
    env = {"HTC_JOB_PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HTC_JOB_HOME": str(directory)}
    result = pool.run(*command, cwd=directory, env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"snakemake failed:\n{output[-10000:]}"
    return directory, output


def test_pool_is_up(pool):
    slots = pool.condor("condor_status", "-af", "Name", "State").split("\n")
    assert slots[0].startswith("slot1@") and slots[0].endswith(" Unclaimed"), slots
    # jobs see this checkout and the venv at the same path
    assert (pool.rootfs / str(REPO).lstrip("/") / "Snakefile").is_file()
    assert (pool.rootfs / sys.executable.lstrip("/")).exists()


def test_non_local_rules_run_as_htcondor_jobs(pool, htcondor_run):
    with warnings.catch_warnings():  # reading an event log needs no CONDOR_CONFIG
        warnings.simplefilter("ignore")
        from htcondor2 import JobEventLog, JobEventType

    directory, output = htcondor_run
    for target in TARGETS:
        assert (directory / target).is_file(), target

    # Snakemake's view: the jobs of exactly the non-local rules were submitted, each once.
    jobs = scheduled_jobs(output)
    submitted = {
        jobid: int(cluster)
        for jobid, cluster, _ in re.findall(
            r"Job (\d+) submitted to HTCondor Cluster ID (\d+) with batch name (\S+)", output
        )
    }
    assert Counter(rule for rule, is_local in jobs.values() if not is_local) == REMOTE_RULES, output[-5000:]
    assert Counter(rule for rule, is_local in jobs.values() if is_local) == LOCAL_RULES, output[-5000:]
    assert {jobid for jobid, (_, is_local) in jobs.items() if not is_local} == set(submitted), output[-5000:]
    assert len(set(submitted.values())) == len(submitted)
    clusters = {cluster: jobs[jobid][0] for jobid, cluster in submitted.items()}

    # HTCondor's view, the job event log the plugin asked for: each job submitted, run and
    # terminated normally with exit code 0; no other job in it.
    events: dict[int, dict] = {}
    for event in JobEventLog(str(directory / JOB_DIR / "snakemake-rules.log")).events(stop_after=0):
        events.setdefault(event.cluster, {})[event.type] = event
    assert set(events) == set(clusters), (events, clusters)
    for cluster, rule in clusters.items():
        assert {JobEventType.SUBMIT, JobEventType.EXECUTE, JobEventType.JOB_TERMINATED} <= set(
            events[cluster]
        )
        terminated = events[cluster][JobEventType.JOB_TERMINATED]
        assert terminated["TerminatedNormally"] and terminated["ReturnValue"] == 0, (rule, terminated)

    # The schedd's history: the run's jobs (and no others from its directory) finished there,
    # owned by the job user, with exit code 0, under the plugin's batch names; each job's
    # stderr (the Snakemake running the rule in the job) shows the rule done.
    history = pool.history(f'Iwd == "{directory}"')
    assert {ad["ClusterId"] for ad in history} == set(clusters), history
    for ad in history:
        rule = clusters[ad["ClusterId"]]
        jobid = next(jobid for jobid, cluster in submitted.items() if cluster == ad["ClusterId"])
        assert ad["JobBatchName"] == f"{rule}-{jobid}", ad
        assert (ad["JobStatus"], ad["ExitCode"], ad["Owner"]) == (4, 0, htcondor_harness.JOB_USER), ad
        assert ad["LastRemoteHost"].startswith("slot1_"), ad
        err = directory / JOB_DIR / rule / f"{rule}-{jobid}_{ad['ClusterId']}.err"
        assert "1 of 1 steps (100%) done" in err.read_text(), err
        assert ad["Err"] == str(err) or directory / ad["Err"] == err, ad

    # Local rules did not go to HTCondor: no job of theirs in the pool's history, no job
    # directory for them; and nothing is left in the queue.
    batches = [ad["JobBatchName"] for ad in pool.history()]
    assert not [name for name in batches if name.rsplit("-", 1)[0] in LOCAL_RULES], batches
    for rule in LOCAL_RULES:
        assert not (directory / JOB_DIR / rule).exists(), rule
    assert pool.condor("condor_q", "-allusers", "-af", "ClusterId").strip() == ""
