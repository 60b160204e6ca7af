"""Each facility's BPS settings in ``config/3x3`` prepared by its own WMS plugin.

For every site of the production 3x3 config, a real step1 chunk of the demo
campaign is prepared with that site's ``bps`` block (and the config's common
``bps``): ``bps prepare`` through PanDA (USDF, IN2P3), HTCondor (RAL) and parsl on
Slurm (Lancaster). The demo keeps its repositories and paths; only the BPS
settings are the facility's. The tests check what each plugin wrote: the
HTCondor DAG and submit files, the PanDA (IDDS) workflow with its compute site
and cloud, and the parsl Slurm provider with the sbatch script it would submit.

Not checked here (no service on a test machine): PanDA's submission checks
(``PANDA_URL`` and a ping of the IDDS server), and any real submission (IDDS,
an HTCondor schedd, ``sbatch``).
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import pytest
import yaml
from lsst.daf.butler import Butler

from multisite.bps import PreparedChunk, prepare_stage, write_stage_yaml
from multisite.config import Campaign, load_campaign
from multisite.errors import StageFailed
from multisite.placement import read_placement

from .conftest import REPO, demo_config, snakemake

PRODUCTION = yaml.safe_load((REPO / "config" / "3x3" / "config.yaml").read_text())
SITE, STAGE, CHUNK = "in2p3", "step1", "c0000"  # the demo chunk every facility prepares
PANDA = "lsst.ctrl.bps.panda.PanDAService"
HTCONDOR = "lsst.ctrl.bps.htcondor.HTCondorService"
PARSL = "lsst.ctrl.bps.parsl.ParslService"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Campaign, object]:
    """Run a demo campaign up to what its step1 chunk at SITE needs: verified raws, the BPS YAML."""
    directory = tmp_path_factory.mktemp("facilities")
    demo_config(directory)
    snakemake(directory, f"work/markers/inputs/{SITE}/{CHUNK}.json", f"work/bps/{SITE}/{STAGE}/{CHUNK}.yaml")
    campaign = load_campaign(directory / "config.yaml")
    return campaign, read_placement(campaign.layout.placement_table)


def at_facility(campaign: Campaign, facility: str) -> Campaign:
    """Return the demo campaign with the BPS settings of a facility of the 3x3 config at SITE.

    The 3x3 config's common ``bps`` and stage settings replace the demo's (so no
    demo clustering: a job per quantum); the site's ``bps`` is the facility's block.
    """
    stage_bps = {stage["name"]: stage.get("bps", {}) for stage in PRODUCTION["stages"]}
    site = dataclasses.replace(campaign.sites[SITE], bps=PRODUCTION["sites"][facility]["bps"])
    return dataclasses.replace(
        campaign,
        bps=PRODUCTION.get("bps", {}),
        sites={**campaign.sites, SITE: site},
        stages=tuple(dataclasses.replace(s, bps=stage_bps.get(s.name, {})) for s in campaign.stages),
    )


def prepare(campaign: Campaign, placement, facility: str, **kwargs) -> PreparedChunk:
    """Write the chunk's submit YAML with the facility's settings and prepare it."""
    campaign = at_facility(campaign, facility)
    path = campaign.workdir / "bps" / SITE / STAGE / f"{CHUNK}.{facility}.yaml"
    write_stage_yaml(campaign, SITE, STAGE, CHUNK, placement, path)
    submitted = yaml.safe_load((campaign.workdir / "bps" / SITE / STAGE / f"{CHUNK}.yaml").read_text())
    config = yaml.safe_load(path.read_text())
    # The facility changes how the chunk runs, never what it processes.
    assert config["payload"] == submitted["payload"]
    assert config["pipelineYaml"] == submitted["pipelineYaml"]
    assert config["wmsServiceClass"] == PRODUCTION["sites"][facility]["bps"]["wmsServiceClass"]
    return prepare_stage(campaign, SITE, STAGE, CHUNK, path, placement, **kwargs)


def expected_jobs(prepared: PreparedChunk) -> set[str]:
    """Payload job names, without their quantum ID, of a graph of per-(visit, detector) quanta."""
    jobs = {
        f"{label}_{data_id['visit']}_{data_id['detector']}"
        for label, by_data_id in prepared.graph.quanta.items()
        for data_id in by_data_id
    }
    assert len(jobs) == prepared.graph.n_quanta == 40  # 10 visits x 4 detectors of the chunk's patches
    return jobs


def payload_name(job: str) -> str:
    """Strip the quantum ID from a BPS job name (``<quantum ID>_<label>_<data ID values>``)."""
    return job.split("_", 1)[1]


def check_htcondor(prepared: PreparedChunk, block: dict, tmp_path: Path) -> None:
    """Check the DAG runs pipetaskInit, a job per quantum, the final job; jobs retry as configured."""
    submit_dir = prepared.submit_dir
    (dag,) = submit_dir.glob("*.dag")
    text = dag.read_text()
    nodes = {
        name: submit_dir / directory / sub
        for name, sub, directory in re.findall(r'^JOB (\S+) "(\S+)" DIR "(\S+)"$', text, re.MULTILINE)
    }
    assert "pipetaskInit" in nodes
    assert {payload_name(n) for n in nodes if n != "pipetaskInit"} == expected_jobs(prepared)
    assert re.search(r"^FINAL finalJob ", text, re.MULTILINE)
    assert all(path.is_file() for path in nodes.values())
    sub = next(path for name, path in nodes.items() if name != "pipetaskInit").read_text()
    common = PRODUCTION["bps"]
    assert f"max_retries={common['numberOfRetries']}" in sub
    assert f"retry_until=member(ExitCode, {{{','.join(map(str, common['retryUnlessExit']))}}})" in sub
    assert f"{common['requestMemory']} * pow({common['memoryMultiplier']}" in sub  # memory grows on retry
    assert re.search(rf"run-qbb \S+/{SITE}/repo \S+\.qg --qgraph-node-id ", sub)
    assert type(prepared.wms_workflow).__name__ == "HTCondorWorkflow"
    assert not block.get("provisionResources") and not (submit_dir / "provisioningJob.bash").exists()


def check_panda(prepared: PreparedChunk, block: dict, tmp_path: Path) -> None:
    """Check the IDDS workflow PanDA would get: a task per label at the facility's site and cloud."""
    with open(prepared.submit_dir / "panda_workflow.pickle", "rb") as stream:
        workflow = pickle.load(stream)
    works = workflow.idds_client_workflow.get_all_works()
    tasks = {work.task_name.rsplit("_", 2)[1]: work for work in works}
    assert set(tasks) == {"pipetaskInit", "measureStars", "finalJob"}
    for work in works:
        assert (work.task_site, work.task_cloud) == (block["computeSite"], block["computeCloud"])
    jobs = {payload_name(entry["name"].split("+", 1)[0]) for entry in tasks["measureStars"].dependency_map}
    assert jobs == expected_jobs(prepared)
    assert tasks["measureStars"].task_rss == PRODUCTION["bps"]["requestMemory"]
    # The quantum graph is staged for the jobs; the workflow names it.
    assert workflow.files_to_pre_stage["runQgraphFile"].startswith(str(prepared.submit_dir))


def check_parsl(prepared: PreparedChunk, block: dict, tmp_path: Path) -> None:
    """Check the parsl workflow's Slurm provider, and the sbatch script it would submit for a block."""
    from lsst.ctrl.bps.parsl.workflow import ParslWorkflow
    from parsl.providers import SlurmProvider

    site = block["site"][block["computeSite"]]
    workflow = ParslWorkflow.read(str(prepared.submit_dir))
    site_class = type(workflow.site)
    assert f"{site_class.__module__.rsplit('.', 1)[0]}.{site_class.__name__}" == site["class"]
    assert {payload_name(name) for name in workflow.jobs if name != "pipetaskInit"} == expected_jobs(prepared)
    assert "pipetaskInit" in workflow.jobs and workflow.final is not None
    (executor,) = workflow.parsl_config.executors
    provider = executor.provider
    assert isinstance(provider, SlurmProvider)
    assert (provider.nodes_per_block, provider.walltime) == (site["nodes"], site["walltime"])
    # Render the block's sbatch script as parsl would submit it, with sbatch answered here.
    provider.script_dir = str(tmp_path)
    commands = []

    def sbatch(command, timeout=None):
        commands.append(command)
        return 0, "Submitted batch job 7", ""

    provider.execute_wait = sbatch
    assert provider.submit("process_worker_pool.py", tasks_per_node=1, job_name="block") == "7"
    (script,) = tmp_path.glob("block.*[0-9]")
    assert commands == [f"sbatch {script}"]
    text = script.read_text()
    assert "#SBATCH --partition=" in site["scheduler_options"]
    for line in site["scheduler_options"].splitlines():
        assert re.search(rf"^{re.escape(line)}$", text, re.MULTILINE)
    hours, minutes, _ = (int(part) for part in site["walltime"].split(":"))
    for directive in [
        f"--account={site['account']}",
        f"--nodes={site['nodes']}",
        f"--time={hours * 60 + minutes}",
        f"--mem={site['mem_per_node']}g",
        f"--cpus-per-task={site['cores_per_node']}",
    ]:
        assert re.search(rf"^#SBATCH {re.escape(directive)}$", text, re.MULTILINE), directive


CHECKS = {HTCONDOR: check_htcondor, PANDA: check_panda, PARSL: check_parsl}


def test_each_facility_names_a_checked_wms():
    wms = {name: site["bps"].get("wmsServiceClass") for name, site in PRODUCTION["sites"].items()}
    assert wms == {"usdf": PANDA, "in2p3": PANDA, "ral": HTCONDOR, "lancs": PARSL}
    assert "wmsServiceClass" not in PRODUCTION["bps"]  # each facility chooses its own


@pytest.mark.parametrize("facility", list(PRODUCTION["sites"]))
def test_facility_prepares(demo, facility, tmp_path, monkeypatch):
    campaign, placement = demo
    block = PRODUCTION["sites"][facility]["bps"]
    wms = block["wmsServiceClass"]
    if wms == PANDA:
        # The PanDA client looks its cache server up in DNS on import, unless told it sits
        # behind a load balancer; and its submission checks need the IDDS server.
        monkeypatch.setenv("PANDA_BEHIND_REAL_LB", "1")
    prepared = prepare(campaign, placement, facility, submission_checks=wms != PANDA)
    assert prepared.submit_dir.is_dir()
    assert prepared.submit_dir.parent == campaign.workdir / "submit" / SITE / STAGE / CHUNK
    assert (prepared.submit_dir / f"{CHUNK}.{facility}.yaml").is_file()  # BPS keeps the YAML it ran
    assert prepared.config["wmsServiceClass"] == wms
    CHECKS[wms](prepared, block, tmp_path)


def test_panda_submission_checks_need_the_service(demo, monkeypatch):
    campaign, placement = demo
    monkeypatch.setenv("PANDA_BEHIND_REAL_LB", "1")
    monkeypatch.delenv("PANDA_URL", raising=False)
    with pytest.raises(StageFailed, match=r"step1 at in2p3 \(chunk c0000\): bps prepare .*PANDA_URL"):
        prepare(campaign, placement, "usdf")


def test_prepare_leaves_no_trace_in_the_campaign(demo):
    campaign, _ = demo
    assert not (campaign.workdir / "qgraph").exists()  # what run_stage counts as attempts
    butler = Butler.from_config(campaign.sites[SITE].repo)
    assert not butler.collections.query(campaign.stage_chain(SITE, STAGE) + "*")
