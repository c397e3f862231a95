"""The observability wiring around incidents, without a trainer: `[grafana]` settings, the
incident/action listener posting to a stand-in Grafana (tests/fake_grafana.py: no Grafana server
can run here), the journal write-error counter (a real SQLite lock held by a second connection)
and the excluded-nodes gauge. The daemon-level proof is tests/e2e/test_grafana_annotations.py."""

from __future__ import annotations

import sqlite3
import time

import pytest

from supervisor.annotations import GrafanaAnnotator, IncidentAnnotations
from supervisor.detect.findings import Finding
from supervisor.incidents import IncidentTracker
from supervisor.journal import Journal
from supervisor.metrics import Metrics
from supervisor.settings import ConfigError, Settings
from tests.fake_grafana import FakeGrafana


def _wait(pred, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def grafana():
    g = FakeGrafana()
    yield g
    g.close()


def test_grafana_settings_are_validated(tmp_path):
    token = tmp_path / "grafana.token"
    token.write_text("glsa_abc\n")
    g = Settings.load(grafana={"url": "https://grafana.example.com/", "token_file": str(token)}).grafana
    assert g.url == "https://grafana.example.com" and g.read_token() == "glsa_abc"
    assert Settings.load().grafana.url == ""  # off by default
    bad = [({"url": "grafana:3000"}, "grafana.url: must be an http"),
           ({"url": "http://g:3000", "token_file": str(tmp_path / "missing")}, "No such file"),
           ({"token_file": str(token)}, "token_file is set but url is empty"),
           ({"url": "http://g:3000", "attempts": 0}, "grafana.attempts"),
           ({"url": "http://g:3000", "timeout_s": float("nan")}, "grafana.timeout_s"),
           ({"url": "http://g:3000", "dashboard_uid": "a b"}, "grafana.dashboard_uid"),
           ({"url": "http://g:3000", "colour": "red"}, "grafana.colour: unknown setting")]
    two = tmp_path / "two.token"
    two.write_text("a b")
    bad.append(({"url": "http://g:3000", "token_file": str(two)}, "one token alone"))
    for section, message in bad:
        with pytest.raises(ConfigError, match=message):
            Settings.load(grafana=section)


def test_incident_and_action_events_become_annotations(tmp_path, grafana):
    annotator = GrafanaAnnotator(GrafanaAnnotator.Config(url=grafana.url, token="glsa_t", backoff_initial_s=0.01))
    listener = IncidentAnnotations(annotator, "r1")
    j, m = Journal.open(tmp_path / "j.sqlite"), Metrics()
    tracker = IncidentTracker(j, m, listener=listener)
    assert tracker.open_for(Finding("divergence", 61, "critical", 1_700_000_000.25), generation=0)
    listener.action_finished("rollback", 7, True, {"mode": "hot", "load_step": 50, "nested": {"x": 1}})
    listener.action_finished("record", 8, True, {})  # not an act: not posted
    tracker.close("rollback done; training resumed at step 51")
    listener.action_finished("lr", 9, False, {"error": "refused"})  # an operator's, no incident
    assert _wait(lambda: annotator.sent == 4), grafana.requests
    opened, acted, resolved, operator = grafana.accepted
    assert opened["tags"] == ["titan-supervisor", "run:r1", "event:opened", "kind:divergence"]
    assert opened["time"] == 1_700_000_000_250 and "step 61" in opened["text"]
    assert acted["tags"][2:] == ["event:acted", "kind:divergence", "action:rollback"]
    assert "mode=hot" in acted["text"] and "nested" not in acted["text"]
    assert resolved["tags"][2:] == ["event:resolved", "kind:divergence"] and "step 51" in resolved["text"]
    assert operator["tags"][2:] == ["event:acted", "kind:operator", "action:lr"] and "FAILED" in operator["text"]
    assert {r["auth"] for r in grafana.requests} == {"Bearer glsa_t"}
    annotator.close()
    j.close()


def test_a_listener_that_raises_changes_nothing(tmp_path):
    class Broken:
        def incident_opened(self, *a):
            raise RuntimeError("grafana client bug")

        incident_closed = incident_opened

    j = Journal.open(tmp_path / "j.sqlite")
    tracker = IncidentTracker(j, Metrics(), listener=Broken())
    assert tracker.open_for(Finding("hang", 3, "critical", 1.0), generation=0)
    tracker.close("restarted")
    assert tracker.current is None and j.incidents(state="unresolved") == []
    assert j.incidents()[0]["kind"] == "hang"
    j.close()


def test_journal_write_errors_are_counted(tmp_path):
    path = tmp_path / "j.sqlite"
    j = Journal.open(path, Journal.Config(busy_timeout_ms=50))
    m = Metrics()
    j.on_write_error = lambda e: m.observe_journal_write_error()
    j.set_meta("a", 1)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another writer holds the database: every write fails "locked"
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        j.set_meta("b", 2)
    with pytest.raises(sqlite3.OperationalError):
        j.open_incident("hang", 1)
    assert m.registry.get_sample_value("titan_journal_write_errors_total") == 2
    other.execute("ROLLBACK")
    other.close()
    j.set_meta("c", 3)  # the journal works again; nothing more counted
    assert m.registry.get_sample_value("titan_journal_write_errors_total") == 2
    assert j.get_meta("c") == 3 and j.get_meta("b") is None
    j.close()


def test_excluded_nodes_gauge_follows_exclude_node_outcomes():
    m = Metrics()
    value = lambda: m.registry.get_sample_value("titan_nodes_excluded")  # noqa: E731
    assert value() == 0
    m.observe_action("exclude_node", "done", {"excluded": False, "node": "n1"})  # single node: refused
    m.observe_action("exclude_node", "failed", {"excluded": True, "node": "n1"})
    assert value() == 0
    m.observe_action("exclude_node", "done", {"excluded": True, "node": "n1"})
    m.observe_action("exclude_node", "done", {"excluded": True, "node": "n1"})  # same node once
    m.observe_action("exclude_node", "done", {"excluded": True, "node": "n2"})
    assert value() == 2
    m.set_excluded_nodes({"n3"})  # restored from the journal by a restarted daemon
    assert value() == 1


def test_a_failed_annotation_is_logged_and_the_sender_lives_on(capsys):
    """With the daemon's real structlog logger: a give-up is logged and the next event still goes."""
    from supervisor import log

    g = FakeGrafana(fail_first=2)
    a = GrafanaAnnotator(GrafanaAnnotator.Config(url=g.url, attempts=2, backoff_initial_s=0.01),
                         logger=log.get())
    a.post("opened", run_id="r1", kind="hang", text="first: given up")
    a.post("resolved", run_id="r1", kind="hang", text="second: sent")
    assert _wait(lambda: a.sent == 1 and a.failed == 1), (a.sent, a.failed)
    assert [b["text"].split(": ", 1)[1] for b in g.accepted] == ["second: sent"]
    assert "grafana annotation failed" in capsys.readouterr().out
    a.close()
    g.close()
