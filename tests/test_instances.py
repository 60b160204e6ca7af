"""Site instances: one Snakemake per facility, each in its own directory, meeting only through the backend.

Four instances (usdf, in2p3, ral, lancs), started together with their site profiles
(the executor set to local: the batch paths are proven in test_slurm and
test_htcondor), run the demo campaign through the test Rucio. Each instance's config
names only its own repository: the other sites' repositories are paths that lead
nowhere, so an instance that reached into another site's files would fail. In one
campaign, RAL's instance is killed in the middle of its step1 and the others wait and say
so; RAL's instance is restarted with one of its step3 chunks failing while transfers are
held back, and the Rucio server is stopped for a minute while USDF's rule for a fan-in is
pending, then started again on the same port with its data: the instances ride the outage
out, the final products of RAL's other chunk reach USDF on their own, and once RAL is
restarted again the campaign ends with the final outputs of a single-instance run
(test_faults' campaign, shared through the session fixture ``demo_through_faults``),
nothing that was finished done again, every hand-off in one Rucio rule on its container
of closed datasets of at most ``MAX_FILES`` files, and a forced rerun of the fan-in
registers, rules and imports nothing. A second campaign, with one unit a step1 chunk,
shows the per-chunk flow between instances: a chunk runs on its own raws piece and
its fan-in leaves before the next chunk's raws are sent. A third drains ral in the
middle of its step1 between five instances (cam, a fifth site, joins). The same drain
with one instance, through either backend, is test_per_chunk's.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import yaml
from lsst.daf.butler import Butler

from multisite.config import load_campaign
from multisite.demo.tasks import FAILURE_ENV
from multisite.handoff import make_backend
from multisite.layout import step_id
from multisite.lock import Owner, write_heartbeat
from multisite.markers import read_marker
from multisite.plan_version import plan_version
from multisite.rucio_backend import RucioBackend
from multisite.status import campaign_status

from .conftest import BIN, JOINING_RSES, REPO, RSES, rucio_config, scheduled_jobs

SITES = ("usdf", "in2p3", "ral", "lancs")
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
OUTAGE_S = 60
MAX_FILES = 10


def rucio_client(rucio, scope: str):
    """Return a client of the test Rucio, as the campaigns' own (``scope`` only names where they write)."""
    return RucioBackend(
        "demo", {"scope": scope, "rses": RSES, "client_config": str(rucio.client_config)}
    ).client


def instance_configs(
    base: Path,
    rucio,
    storage: Path,
    scope: str,
    step1_units_per_chunk: int | None = None,
    joining: tuple[str, ...] = (),
    **poll,
) -> dict[str, Path]:
    """One config per instance: its own work area, units table and repository (at ``<RSE>/<scope>``).

    Rucio datasets hold at most `MAX_FILES` files, so the larger hand-offs take several,
    and an instance's config names only its own repository: the other sites' are paths
    that lead nowhere. ``joining`` sites (their RSEs in ``JOINING_RSES``) are config
    blocks with lancs's cores and no units, each with an instance and a profile of its
    own (lancs's, its site changed).
    """
    template = yaml.safe_load(
        rucio_config(base, rucio, storage, max_files_per_dataset=MAX_FILES, scope=scope, **poll).read_text()
    )
    template["transfer"]["rucio"]["rses"] |= {site: JOINING_RSES[site] for site in joining}
    template["transfer"]["wait"] = {"timeout_s": 1800, "interval_s": 2}
    registry = template["sites"]["lancs"]["registry"]
    for site in joining:
        template["sites"][site] = {
            **template["sites"]["lancs"],
            "repo": str(storage / site / scope),
            "registry": dict(registry, namespace=registry["namespace"].removesuffix("lancs") + site),
        }
    paths = {}
    for site in (*SITES, *joining):
        directory = base / site
        directory.mkdir()
        config = copy.deepcopy(template)
        config["workdir"] = str(directory / "work")
        units = directory / "units.tsv"
        units.write_text(Path(template["units"]).read_text())
        config["units"] = str(units)
        if step1_units_per_chunk:
            config["stages"][0]["units_per_chunk"] = step1_units_per_chunk
        for name, entry in config["sites"].items():
            if name != site:
                entry["repo"] = str(directory / "nowhere" / name)
            entry["create_repo"] = name == site
        if site in joining:
            profile = (REPO / "profiles" / "lancs" / "config.v8+.yaml").read_text()
            (directory / "profile").mkdir()
            (directory / "profile" / "config.v8+.yaml").write_text(profile.replace("=lancs", f"={site}"))
        paths[site] = directory / "config.yaml"
        paths[site].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


def command(site: str, config: Path) -> list[str]:
    """Return one site's instance: its profile, its own directory (executor local: see the module doc)."""
    return [
        str(BIN / "snakemake"),
        "--configfile",  # first: it takes every value up to the next option, targets included
        str(config),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--profile",
        str(config.parent / "profile" if site not in SITES else REPO / "profiles" / site),
        "--executor",
        "local",
        "--cores",
        "3",  # a rule waiting for another site's hand-off holds a slot while it waits
        "--directory",
        str(config.parent),
    ]


def start(site: str, config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start one site's instance in its own process group, its output in its directory.

    ``args`` (targets, options) come after the instance's command; ``env`` adds to its environment.
    """
    with open(config.parent / "snakemake.log", "a") as log:
        return subprocess.Popen(
            [*command(site, config), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV | (env or {}),
            start_new_session=True,
        )


def finish(processes: dict[str, subprocess.Popen], configs: dict[str, Path], timeout: float = 2400) -> None:
    """Wait for every instance to end; each must succeed.

    The first that fails fails the test at once (the others, waiting for what it would
    have sent, would wait out their timeouts); any still running is killed.
    """
    deadline = time.monotonic() + timeout
    try:
        while True:
            for site, process in processes.items():
                code = process.poll()
                log = configs[site].parent / "snakemake.log"
                assert code in (None, 0), f"{site}: {log.read_text()[-4000:]}"
            if all(process.returncode == 0 for process in processes.values()):
                return
            assert time.monotonic() < deadline, f"instances still running after {timeout} s"
            time.sleep(2)
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def status(config: Path) -> str:
    result = subprocess.run(
        [str(BIN / "multisite"), "status", str(config)], capture_output=True, text=True, check=True
    )
    return result.stdout


def wait_for(
    what: str,
    condition,
    processes: dict[str, subprocess.Popen],
    timeout: float = 1200,
    interval: float = 2,
) -> None:
    """Poll ``condition`` until true; fail early if an instance stopped on an error."""
    deadline = time.monotonic() + timeout
    while not condition():
        for site, process in processes.items():
            code = process.poll()
            assert code in (None, 0), f"{site}'s instance failed (exit {code}) while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(interval)


def event_lines(config: Path) -> list[dict]:
    """Return an instance's own event log, in order (an instance's log is named after its site)."""
    path = config.parent / "work" / "events" / f"{config.parent.name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_campaign(configs: dict[str, Path]) -> Path:
    """Check a finished four-instance campaign; return USDF's work directory."""
    for site, config in configs.items():
        # Markers stay with each instance: the central QA at USDF only, each site's own stages.
        markers = config.parent / "work" / "markers"
        assert (markers / "qa" / "qa.json").exists() == (site == "usdf")
        assert {p.name for p in (markers / "stage").iterdir()} == {site}
    usdf = configs["usdf"].parent / "work"
    qa = read_marker(usdf / "markers" / "qa" / "qa.json")
    assert all(set(counts) == {"pass"} for counts in qa["summary"].values()), qa["summary"]
    for marker in (usdf / "markers" / "handoff").glob("*/*/*.json"):
        content = read_marker(marker)
        if content["source"] != content["destination"]:
            assert content["backend"] == "rucio" and content["backend_details"]["rucio"]["rule_id"]
    return usdf


def rules_by_handoff(client, scope: str) -> dict[str, list[str]]:
    """Return each hand-off piece's container (``multisite.demo.<handoff>.<site>.<piece>``), its rules."""
    names = client.list_dids(scope, {"name": "multisite.demo.*.*"}, did_type="container")
    return {name: sorted(r["id"] for r in client.list_did_rules(scope, name)) for name in names}


def fanins(client, scope: str) -> list[str]:
    """Return the fan-in hand-offs' containers registered so far."""
    return list(client.list_dids(scope, {"name": "multisite.demo.fanin_step2.*"}, did_type="container"))


def pending_fanin_rule(client, scope: str) -> tuple[str, str] | None:
    """Return the sending site and rule id of a fan-in whose Rucio rule exists and is not OK yet."""
    for name in fanins(client, scope):
        for rule in client.list_did_rules(scope, name):
            if str(rule["state"]) != "OK":
                return name.split(".")[3], rule["id"]
    return None


def run_to(site: str, config: Path, marker: Path, *flags: str) -> list[str]:
    """Run a site's instance up to one marker; return the rules that ran.

    With ``--force``, the README's recipe to redo one finished job.
    """
    result = subprocess.run(
        [*command(site, config), *flags, str(marker.relative_to(config.parent))],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
    )
    assert result.returncode == 0, f"{site}: {(result.stdout + result.stderr)[-4000:]}"
    return [rule for rule, _ in scheduled_jobs(result.stdout + result.stderr).values()]


def _final_outputs(work: Path) -> pd.DataFrame:
    """QA table of a finished campaign, without paths: products compared to the reference.

    Without the checks of each chunk's outputs: test_faults' campaign cuts step1 into a
    chunk per unit, these instances a chunk per site.
    """
    table = pd.read_csv(work / "logs" / "qa" / "qa.csv")
    table = table[table["check"] != "stage_completeness"]
    return table.drop(columns=["detail"]).sort_values(["check", "dataset_type", "data_id", "site"])


def test_profiles_by_name_run_their_site_share():
    """`snakemake --profile in2p3`, exactly so, previews in2p3's share (profiles installed by make setup)."""
    for site in SITES:
        result = subprocess.run(
            [str(BIN / "snakemake"), "--profile", site, "-n"],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=ENV,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        stages = set(re.findall(r"^(step\d_\w+)\s+\d+$", result.stdout, re.M))
        assert stages and all(name.endswith(f"_{site}") for name in stages), (site, stages)


def test_four_instances_ride_out_a_killed_instance_and_a_rucio_outage_and_end_like_one_instance(
    local_rucio, tmp_path_factory, demo_through_faults
):
    rucio, storage = local_rucio
    scope = "sites"
    # The calls that meet the outage retry for up to poll.timeout_s: well beyond the outage.
    configs = instance_configs(tmp_path_factory.mktemp("instances"), rucio, storage, scope, timeout_s=600)
    client = rucio_client(rucio, scope)
    processes = {site: start(site, config) for site, config in configs.items()}
    ral_work = configs["ral"].parent / "work"
    try:
        # Killed while its step1 is with BPS: nothing of step1 reaches the others.
        wait_for(
            "ral's step1 submission",
            lambda: any((ral_work / "qgraph" / "ral" / "step1").glob("*/*.bps.log")),
            processes,
        )
        os.killpg(processes["ral"].pid, signal.SIGKILL)
        assert processes.pop("ral").wait() == -signal.SIGKILL
        finished = {path: path.stat().st_mtime_ns for path in (ral_work / "markers").rglob("*.json")}
        events_at_kill = {site: event_lines(config) for site, config in configs.items()}

        # The others wait and say what for, from whom and since when: USDF for RAL's fan-in,
        # the other sites for USDF's fan-out (which needs RAL's fan-in).
        waits = {
            "usdf": ("fanin_step2", "ral", "c0000", "ral"),
            "in2p3": ("fanout_step3", "in2p3", r"t0p[14]", "usdf"),
            "lancs": ("fanout_step3", "lancs", "t0p3", "usdf"),
        }
        for site, (handoff, at, piece, sender) in waits.items():
            said = re.compile(
                rf"WAITING: handoff {handoff} {at} {piece} at {at} since \S+: "
                rf"waiting for {handoff} from {sender} since "
            )
            wait_for(
                f"{site} saying it waits", lambda s=site, r=said: r.search(status(configs[s])), processes
            )
        assert all(process.poll() is None for process in processes.values())
        assert not (configs["usdf"].parent / "work" / "markers" / "stage" / "usdf" / "step2.json").exists()

        subprocess.run(
            [*command("ral", configs["ral"]), "--unlock"], check=True, capture_output=True, env=ENV
        )
        # Transfers held back before RAL comes back, so that USDF's rule for RAL's fan-in (or
        # one still in flight) stays pending; then the Rucio server stops for OUTAGE_S.
        rucio.pause_daemons()
        try:
            # Restarted with its step3 chunk t0p5 failing: the final products of its other
            # chunk (t0p2) still reach USDF, through Rucio, on their own.
            failing = start("ral", configs["ral"], "--keep-going", env={FAILURE_ENV: "makeCoadd:patch=5"})
            pending = []  # what each poll found; the last one is the rule
            wait_for(
                "USDF's rule for a fan-in",
                lambda: pending.append(pending_fanin_rule(client, scope)) or pending[-1],
                processes | {"ral": failing},
                interval=0.5,
            )
            sender, rule_id = pending[-1]
            rucio.stop_server()
            try:
                time.sleep(OUTAGE_S)
                stopped = {site: process.poll() for site, process in (processes | {"ral": failing}).items()}
            finally:
                rucio.start_server()  # on the same port, with its data
        finally:
            rucio.resume_daemons()
        assert set(stopped.values()) == {None}, f"instances stopped during the outage: {stopped}"
        assert failing.wait(timeout=2400) != 0
        usdf_layout = load_campaign(configs["usdf"]).layout
        wait_for(
            "ral's final t0p2 at usdf", usdf_layout.handoff_marker("final", "ral", "t0p2").exists, processes
        )
        assert not (ral_work / "markers" / "stage" / "ral" / "step3" / "t0p5.json").exists()
        assert not usdf_layout.handoff_marker("final", "ral", "t0p5").exists()
        processes["ral"] = start("ral", configs["ral"])
        finish(processes, configs)
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

    usdf = check_campaign(configs)
    # The final outputs of one instance: test_faults' campaign, the demo run to its end through faults.
    pd.testing.assert_frame_equal(
        _final_outputs(usdf).reset_index(drop=True),
        _final_outputs(demo_through_faults.work).reset_index(drop=True),
    )
    # USDF's fan-in said it waited for the server, and went on when it came back.
    log = (usdf / "logs" / "handoff" / "fanin_step2" / sender / "c0000.log").read_text()
    assert re.search(r"Rucio unreachable for \d+ s", log) and "Rucio reachable again" in log, log[-4000:]
    rules = rules_by_handoff(client, scope)
    assert rule_id in rules[f"multisite.demo.fanin_step2.{sender}.c0000"]
    assert all(len(ids) == 1 for ids in rules.values()), rules
    # Every hand-off's files in closed datasets of at most MAX_FILES files, the raws' in several.
    parts = {
        name: [d["name"] for d in client.list_content(scope, name)] for name in rules if ".raws." in name
    }
    assert len(parts) == 3 and all(len(names) > 1 for names in parts.values()), parts
    sizes = [len(list(client.list_files(scope, part))) for names in parts.values() for part in names]
    assert max(sizes) == MAX_FILES, sizes

    # Nothing finished before the kill was done again: RAL's markers are untouched, and no
    # instance started again a step it had done (its event log, after the kill).
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    for site, before in events_at_kill.items():
        done = {event["step"] for event in before if event["kind"] == "done"}
        assert done, site
        after = event_lines(configs[site])[len(before) :]
        assert after, site
        assert not [e["step"] for e in after if e["kind"] == "started" and e["step"] in done], site
    # The killed chunk ran again without duplicating a dataset.
    ral = load_campaign(configs["ral"])
    butler = Butler.from_config(ral.sites["ral"].repo)
    runs = butler.collections.query(ral.stage_chain("ral", "step1"), flatten_chains=True)
    stars = butler.query_datasets("single_visit_star", collections=runs, find_first=False)
    assert stars and len(stars) == len({ref.dataId for ref in stars})

    # A forced rerun of the finished fan-in, both halves, sends what it sent before (its event
    # snapshot included): Rucio's dataset matches, nothing is registered, ruled or imported again.
    dids = sorted(client.list_dids(scope, {"name": "*"}, did_type="all"))
    sent = configs[sender].parent / "work" / "markers" / "sent" / "fanin_step2" / sender / "c0000.json"
    received = usdf / "markers" / "handoff" / "fanin_step2" / sender / "c0000.json"
    assert run_to(sender, configs[sender], sent, "--force") == ["send_handoff"]
    assert run_to("usdf", configs["usdf"], received, "--force") == ["handoff"]
    assert read_marker(sent)["backend_details"]["rucio"]["files_registered_now"] == 0
    again = read_marker(received)["backend_details"]
    assert again["rucio"]["rule_id"] == rule_id and not again["rucio"]["rule_created"]
    assert again["imported_datasets"] == 0
    assert rules_by_handoff(client, scope) == rules
    assert sorted(client.list_dids(scope, {"name": "*"}, did_type="all")) == dids


def test_a_site_instances_step1_chunk_runs_and_sends_its_fanin_before_the_next_chunks_raws_leave(
    local_rucio, tmp_path_factory
):
    """Per chunk through Rucio between site instances, one unit a step1 chunk.

    in2p3's first step1 chunk (t0p1) runs with its own raws piece and its fan-in
    leaves, while the raws of its second chunk (t0p4) are not even registered. Its
    instance, killed while the piece's Rucio rule is pending, reruns with
    ``--rerun-incomplete`` on the same rule, with no raw twice.
    """
    rucio, storage = local_rucio
    scope = "perchunk"
    configs = instance_configs(tmp_path_factory.mktemp("perchunk"), rucio, storage, scope, 1)
    layout = {site: load_campaign(configs[site]).layout for site in ("usdf", "in2p3")}

    raws = layout["usdf"].sent_marker("raws", "in2p3", "t0p1")
    assert run_to("usdf", configs["usdf"], raws).count("send_handoff") == 1
    fanin = layout["in2p3"].sent_marker("fanin_step2", "in2p3", "t0p1")
    client = rucio_client(rucio, scope)
    container = "multisite.demo.raws.in2p3.t0p1"

    # in2p3's instance killed in the middle of its raws piece: its rule made, transfers held back.
    rucio.pause_daemons()
    try:
        process = start("in2p3", configs["in2p3"], str(fanin.relative_to(configs["in2p3"].parent)))
        try:
            wait_for(
                "in2p3's rule for its raws piece",
                lambda: list(client.list_did_rules(scope, container)),
                {"in2p3": process},
                interval=0.5,
            )
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    finally:
        rucio.resume_daemons()
    (rule,) = [r["id"] for r in client.list_did_rules(scope, container)]
    assert not layout["in2p3"].handoff_marker("raws", "in2p3", "t0p1").exists()
    subprocess.run(
        [*command("in2p3", configs["in2p3"]), "--unlock"], check=True, capture_output=True, env=ENV
    )
    ran = run_to("in2p3", configs["in2p3"], fanin, "--rerun-incomplete")
    assert ran.count("handoff") == 1 and ran.count("send_handoff") == 1, ran
    # The rerun went on with the same rule, and every raw arrived once.
    assert [r["id"] for r in client.list_did_rules(scope, container)] == [rule]
    campaign = load_campaign(configs["in2p3"])
    butler = Butler.from_config(campaign.sites["in2p3"].repo)
    found = butler.query_datasets("raw", collections=campaign.handoff_chain("in2p3"), find_first=False)
    assert found and len(found) == len({ref.dataId for ref in found})

    chunk = read_marker(layout["in2p3"].chunk_marker("in2p3", "step1", "t0p1"))
    assert chunk["quanta_run"] > 0
    assert read_marker(fanin)["datasets"]["single_visit_star"] > 0
    assert not layout["in2p3"].chunk_marker("in2p3", "step1", "t0p4").exists()
    assert not layout["usdf"].sent_marker("raws", "in2p3", "t0p4").exists()
    containers = set(client.list_dids(scope, {"name": "multisite.demo.*.*"}, did_type="container"))
    assert containers == {"multisite.demo.raws.in2p3.t0p1", "multisite.demo.fanin_step2.in2p3.t0p1"}


def test_a_site_drained_in_the_middle_of_its_step1_onto_a_new_site_and_another_between_instances(
    local_rucio, tmp_path_factory
):
    """A site drained onto a fifth site and another by a move at USDF's instance, the others learning it.

    The instances meet only through Rucio. One unit a step1 chunk, each facility with
    its own copy of the units table, in which ral has three units (t0p4 is ral's here)
    and cam, a fifth site, is a config block and a profile with no units. ral's instance
    ran two of its three step1 chunks and sent t0p2's fan-in, which USDF has not
    received: the move sees it in the backend (a move of t0p2 is refused, naming it),
    and the drain keeps t0p2 at ral and moves t0p4 (not begun) and t0p5 (done, not sent)
    to cam and lancs, and publishes the plan. ral's instance, started before the move,
    refuses to send t0p5's fan-in; while a job of it still runs (its heartbeat fresh), it
    does not adopt the plan either; started again, each site's instance adopts the plan
    (ral retires its t0p5 chunk, cam's first start creates its repository) and stops,
    and the campaign then ends with the QA equal to the single-site reference, nothing
    ral sent redone and no dataset twice at USDF. Moving the delivered t0p2 then changes
    nothing.
    """
    rucio, storage = local_rucio
    scope = "drain"
    sites = (*SITES, "cam")
    configs = instance_configs(tmp_path_factory.mktemp("drain"), rucio, storage, scope, 1, joining=("cam",))
    for config in configs.values():
        units = config.parent / "units.tsv"
        units.write_text(units.read_text().replace("t0p4\t0\t4\tin2p3", "t0p4\t0\t4\tral"))
    layout = {site: load_campaign(configs[site]).layout for site in sites}
    raws = [layout["usdf"].sent_marker("raws", "ral", chunk) for chunk in ("t0p2", "t0p5")]
    run_to("usdf", configs["usdf"], raws[0], str(raws[1].relative_to(configs["usdf"].parent)))
    fanin = layout["ral"].sent_marker("fanin_step2", "ral", "t0p2")
    begun = layout["ral"].chunk_marker("ral", "step1", "t0p5")
    run_to("ral", configs["ral"], fanin, str(begun.relative_to(configs["ral"].parent)))
    sent_at = fanin.stat().st_mtime_ns
    version = plan_version(load_campaign(configs["ral"]))

    def move(site: str, *args: str) -> subprocess.CompletedProcess:
        command = [str(BIN / "multisite"), "move", str(configs[site]), *args]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    drain = ("--from", "ral", "--to", "cam,lancs")
    elsewhere = move("ral", *drain)
    assert elsewhere.returncode == 1 and "a move is made at the central site's instance" in elsewhere.stderr
    refused = move("usdf", "--unit", "t0p2", "--to", "lancs")
    assert refused.returncode == 1 and refused.stderr.startswith("Nothing was moved"), refused.stderr
    assert "hand-off fanin_step2/ral/t0p2 (units t0p2): sent (in the transfer backend); " in refused.stderr
    preview = move("usdf", *drain, "--dry-run")
    assert "stays t0p2: hand-off fanin_step2/ral/t0p2: sent (in the transfer backend)" in preview.stdout, (
        preview
    )
    moved = move("usdf", *drain)
    assert moved.returncode == 0, moved.stderr
    to = dict(re.findall(r"move  (t0p[45]): ral -> (\w+)", moved.stdout))
    assert sorted(to.values()) == ["cam", "lancs"], moved.stdout
    # The raws ral owned that lancs's t0p3 reads go with the moved units: t0p3 is not changed.
    assert "t0p3" not in moved.stdout, moved.stdout
    published = re.findall(r"published plan/(\w+)/m0001-", moved.stdout)
    assert sorted(published) == ["cam", "in2p3", "lancs", "ral"], moved.stdout

    # ral's instance as it was when the move was made (started before it: no start hook) sends nothing.
    unsent = layout["ral"].sent_marker("fanin_step2", "ral", "t0p5").relative_to(configs["ral"].parent)
    late = subprocess.run(
        [*command("ral", configs["ral"]), "--no-hooks", str(unsent)],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
    )
    assert late.returncode != 0 and "nothing is sent on a plan that changed" in late.stdout + late.stderr
    central = load_campaign(configs["usdf"])
    transfers = make_backend(central)
    assert transfers.begun_pieces(central.sites["ral"], "fanin_step2", "ral") == {"t0p2"}
    units_before = (configs["ral"].parent / "units.tsv").read_text()

    # A job of ral's killed instance still running in its batch system (its heartbeat, this
    # process's): ral's instance does not adopt the plan under it, and says so.
    job = layout["ral"].heartbeat("ral", step_id("verify_inputs", {"site": "ral", "piece": "t0p5"}))
    write_heartbeat(job, Owner.this_process("ral"), 30)
    refused = subprocess.run(command("ral", configs["ral"]), capture_output=True, text=True, env=ENV)
    assert refused.returncode == 1, refused.stdout[-3000:]
    assert f"jobs of {layout['ral'].workdir} still run" in refused.stdout + refused.stderr
    assert "heartbeats/ral/verify_inputs.ral.t0p5: process" in refused.stdout + refused.stderr
    assert (configs["ral"].parent / "units.tsv").read_text() == units_before
    job.unlink()  # the job ended

    # Started again, each instance adopts the plan and stops; then the campaign runs to its end.
    processes = {site: start(site, configs[site]) for site in sites}
    for site in ("in2p3", "ral", "lancs", "cam"):
        assert processes[site].wait(timeout=600) == 1
        log = (configs[site].parent / "snakemake.log").read_text()
        assert "This instance adopted the plan usdf's instance published" in log, log[-3000:]
        processes[site] = start(site, configs[site])
    finish(processes, configs)
    usdf = check_campaign(configs)

    assert (layout["ral"].retired_dir(version) / begun.relative_to(layout["ral"].workdir)).is_file()
    assert fanin.stat().st_mtime_ns == sent_at
    units = (configs["ral"].parent / "units.tsv").read_text()
    assert all(f"{unit}\t0\t{unit[-1]}\t{site}\t1" in units for unit, site in to.items()), units
    for unit, site in to.items():
        assert read_marker(layout[site].chunk_marker(site, "step1", unit))["quanta_run"] > 0
        assert unit in transfers.begun_pieces(central.sites["usdf"], "raws", site)
    # Nothing of the moved units left ral, and t0p4's raws never went there.
    assert transfers.begun_pieces(central.sites["ral"], "fanin_step2", "ral") == {"t0p2"}
    assert transfers.begun_pieces(central.sites["usdf"], "raws", "ral") == {"t0p2", "t0p5"}
    client = rucio_client(rucio, scope)
    rules = rules_by_handoff(client, scope)
    assert all(len(found) == 1 for found in rules.values()), rules
    # cam joined with its own RSE: its raws came in a dataset of their own, ruled there.
    (to_cam,) = [unit for unit, site in to.items() if site == "cam"]
    (rule,) = client.list_did_rules(scope, f"multisite.demo.raws.cam.{to_cam}")
    assert rule["rse_expression"] == JOINING_RSES["cam"] and str(rule["state"]) == "OK", rule
    butler = Butler.from_config(central.central.repo)
    for dataset_type in ("single_visit_star", "deep_coadd"):
        refs = butler.query_datasets(
            dataset_type, collections=central.handoff_chain("usdf"), find_first=False, limit=None
        )
        assert refs and len(refs) == len({ref.dataId for ref in refs}), dataset_type
    cells = {(cell.step, cell.unit): cell for cell in campaign_status(central)}
    for unit, site in to.items():
        assert (cells[("step1", unit)].site, cells[("step1", unit)].state) == (site, "done")
    assert cells[("step1", "t0p2")].site == "ral" and (usdf / "markers" / "qa" / "qa.json").is_file()

    # Once delivered, a unit moved stays where it ran: nothing written, nothing left to do.
    table = (configs["usdf"].parent / "units.tsv").read_text()
    again = move("usdf", "--unit", "t0p2", "--to", "in2p3")
    assert "stays t0p2: delivered (hand-off final/ral/t0p2 arrived)" in again.stdout, again
    assert "nothing to move" in again.stdout and (configs["usdf"].parent / "units.tsv").read_text() == table
    for site in ("usdf", "ral"):
        idle = subprocess.run([*command(site, configs[site]), "-n"], capture_output=True, text=True, env=ENV)
        assert "Nothing to be done" in idle.stdout + idle.stderr, (site, idle.stdout[-3000:])
