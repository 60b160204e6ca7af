"""Event log and webhook notifications, against a local HTTP server."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import replace

import pytest

from multisite.events import Event, EventLog, notify, read_events
from multisite.layout import Layout, step_id
from multisite.markers import write_marker

from .conftest import Webhook


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def test_event_log_appends_and_reads_back(tmp_path):
    log = EventLog(tmp_path, "in2p3")
    log.record("started", "step1_in2p3", "in2p3")
    log.record("done", "step1_in2p3", "in2p3", "40 quanta", marker={"quanta_run": 40})
    events = read_events([log.path, tmp_path / "missing.jsonl"])
    assert [e.kind for e in events] == ["started", "done"]
    assert events[1].details["marker"]["quanta_run"] == 40
    assert events[1].instance == "in2p3"
    # Which process recorded it: the status tells a killed step by it (with its heartbeat).
    assert {(e.host, e.pid) for e in events} == {(socket.gethostname(), os.getpid())}


def test_logs_written_before_events_named_their_process_still_read(tmp_path):
    line = {
        "kind": "done",
        "step": "qa",
        "site": "usdf",
        "instance": "all",
        "time": "2026-11-25T16:39:20+00:00",
    }
    (tmp_path / "all.jsonl").write_text(json.dumps(line) + "\n")
    (event,) = read_events([tmp_path / "all.jsonl"])
    assert (event.kind, event.host, event.pid, event.details) == ("done", "", 0, {})


def test_notifications_reach_the_webhook(tmp_path, webhook):
    log = EventLog(tmp_path, "all")
    settings = {"webhook": webhook.url}
    assert notify(settings, log.record("failed", "step3_in2p3", "in2p3", "1 of 2 quanta failed"), "demo")
    assert not notify(settings, log.record("started", "step3_in2p3", "in2p3"), "demo")  # not a notified kind
    assert len(webhook.received) == 1
    posted = webhook.received[0]
    assert posted["text"].startswith(":x: [demo] step3_in2p3 at in2p3: failed. 1 of 2 quanta failed")
    assert posted["event"]["kind"] == "failed"


def test_broken_webhook_never_fails(tmp_path, caplog):
    closed = Webhook()
    url = closed.url
    closed.close()
    event = EventLog(tmp_path, "all").record("done", "qa", "usdf")
    start = time.monotonic()
    assert notify({"webhook": url + "?token=s3cret"}, event, "demo", timeout=2) is False
    assert time.monotonic() - start < 5
    assert "s3cret" not in caplog.text and "the campaign goes on" in caplog.text


def test_running_step_shows_its_live_log_line_and_stuck_transfers_are_flagged(tmp_path):
    from multisite.config import load_campaign
    from multisite.status import campaign_status

    from .conftest import demo_config

    campaign = load_campaign(demo_config(tmp_path))
    log = tmp_path / "handoff.log"
    log.write_text("start\nRucio raws/in2p3/c0000: rule r1: 12/40 files, 3/9 MB done\n")
    events = EventLog(campaign.layout.events, "all")
    # The step names the workflow records (multisite.workflow.run_rule: rule and wildcards).
    at_in2p3, at_ral = (
        step_id("handoff", {"handoff": "raws", "site": "in2p3", "piece": "c0000"}),
        Layout.handoff_step("raws", "ral", "c0000"),
    )
    started = events.record("started", at_in2p3, "in2p3", log=str(log))
    stuck = events.record("stuck", at_ral, "ral", "rule r2 is STUCK", log=str(log))
    cells = {c.step: c for c in campaign_status(campaign, [started, stuck])}
    assert cells[at_in2p3].state == "running"
    assert cells[at_in2p3].detail == "Rucio raws/in2p3/c0000: rule r1: 12/40 files, 3/9 MB done"
    assert cells[at_ral].state == "failed"
    assert cells[at_ral].detail == "stuck transfer: rule r2 is STUCK"
    assert notify({"webhook": "http://127.0.0.1:9/none"}, stuck, "demo", timeout=1) is False


def test_another_instances_chunk_is_done_by_its_carried_event_and_this_ones_by_its_marker(tmp_path):
    """At the central site's work directory: in2p3's instance's chunk done, and its own without a marker."""
    from multisite.config import load_campaign
    from multisite.status import campaign_status

    from .conftest import demo_config

    campaign = load_campaign(demo_config(tmp_path))
    theirs, ours = Layout.chunk_step("in2p3", "step1", "c0000"), Layout.chunk_step("usdf", "step1", "c0000")
    carried = Event("done", theirs, "in2p3", "in2p3", "2026-12-04T05:00:00+00:00", "12 quanta")
    own = EventLog(campaign.layout.events, "usdf").record("done", ours, "usdf", "3 quanta")
    cells = {(c.site, c.step, c.unit): c for c in campaign_status(campaign, [carried, own])}
    for unit in ("t0p1", "t0p4"):  # in2p3's chunk c0000
        cell = cells[("in2p3", "step1", unit)]
        assert (cell.state, cell.since, cell.detail) == ("done", carried.time, "at in2p3's instance")
    assert cells[("usdf", "step1", "t0p0")].state == "waiting"  # here, its marker says done

    # A move made here after it changed the chunk: its instance retires it and runs it again.
    move = {"at": "2026-12-04T06:00:00+00:00", "remade": [["in2p3", "step1", "c0000"]]}
    write_marker(campaign.layout.placement_marker, {"moves": [move]})
    cells = {(c.site, c.step, c.unit): c for c in campaign_status(campaign, [carried, own])}
    assert cells[("in2p3", "step1", "t0p1")].state != "done"
    again = replace(carried, time="2026-12-04T07:00:00+00:00")
    cells = {(c.site, c.step, c.unit): c for c in campaign_status(campaign, [carried, own, again])}
    assert (cells[("in2p3", "step1", "t0p1")].state, cells[("in2p3", "step1", "t0p1")].since) == (
        "done",
        again.time,
    )
