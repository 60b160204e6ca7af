"""Event log and webhook notifications, against a local HTTP server."""

from __future__ import annotations

import time

import pytest

from multisite.events import EventLog, notify, read_events

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
