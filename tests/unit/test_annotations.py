"""Grafana annotations: the real `grafana-client` posts to a small local HTTP server that records
each request and checks it against Grafana's annotation API (POST /api/annotations, bearer
token, JSON with `time` in ms, `tags`, `text`, optional `dashboardUID`). No Grafana server can
run on this machine, so that server stands in for it."""

from __future__ import annotations

import time

import pytest

from supervisor.annotations import GrafanaAnnotator
from tests.fake_grafana import FakeGrafana


@pytest.fixture
def grafana():
    servers = []

    def make(**kw) -> FakeGrafana:
        servers.append(FakeGrafana(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def annotator(url: str, **kw) -> GrafanaAnnotator:
    cfg = dict(url=url, token="glsa_test", dashboard_uid="titan-run-overview", backoff_initial_s=0.01,
               backoff_max_s=0.05)
    cfg.update(kw)
    return GrafanaAnnotator(GrafanaAnnotator.Config(**cfg))


def test_opened_acted_resolved_are_posted_with_tags_in_grafana_shape(grafana):
    g = grafana()
    a = annotator(g.url)
    a.post("opened", run_id="r1", kind="divergence", text="loss 9.1 at step 61", at=1_700_000_000.5, incident_id=4)
    a.post("acted", run_id="r1", kind="divergence", action="rollback", text="hot rollback to 50", at=1_700_000_001.0)
    a.post("resolved", run_id="r1", kind="divergence", text="training resumed at 62", at=1_700_000_002.0)
    assert wait_for(lambda: a.sent == 3)
    assert [r["auth"] for r in g.requests] == ["Bearer glsa_test"] * 3
    first, acted, _ = g.accepted
    assert first["time"] == 1_700_000_000_500 and first["dashboardUID"] == "titan-run-overview"
    assert first["tags"] == ["titan-supervisor", "run:r1", "event:opened", "kind:divergence"]
    assert "incident 4" in first["text"] and "loss 9.1" in first["text"]
    assert acted["tags"][-1] == "action:rollback"
    a.close()


def test_retried_with_backoff_until_grafana_answers(grafana):
    g = grafana(fail_first=2)
    a = annotator(g.url)
    a.post("opened", run_id="r1", kind="hang", text="rank 1 silent")
    assert wait_for(lambda: a.sent == 1)
    assert len(g.requests) == 3 and len(g.accepted) == 1 and a.failed == 0
    a.close()


def test_gives_up_after_the_attempts_and_counts_it(grafana):
    g = grafana(always_fail=True)
    results = []
    a = annotator(g.url, attempts=3)
    a.on_result = lambda ev, ok: results.append(ok)
    a.post("opened", run_id="r1", kind="hang", text="x")
    assert wait_for(lambda: results == [False])
    assert len(g.requests) == 3 and a.failed == 1 and a.sent == 0
    a.close()


def test_post_never_blocks_and_a_full_queue_drops(grafana):
    g = grafana(delay_s=0.5)  # a slow Grafana
    a = annotator(g.url, queue_size=2)
    t0 = time.perf_counter()
    results = [a.post("opened", run_id="r1", kind="hang", text=str(i)) for i in range(6)]
    assert time.perf_counter() - t0 < 0.1
    assert results.count(False) >= 3 and a.dropped == results.count(False)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="http"):
        GrafanaAnnotator.Config(url="grafana:3000")
    a = annotator("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="event"):
        a.post("exploded", run_id="r1", kind="hang", text="x")
    a.close()


def test_text_from_outside_reaches_grafana_inert():
    """A trainer's directive ack `detail` (free text) ended up raw in an annotation: HTML, a
    Markdown link and a newline. What Grafana receives now shows them as text."""

    g = FakeGrafana()
    try:
        a = annotator(g.url)
        hostile = '<img src=x onerror=alert(1)> [click](http://evil.example) **PWNED**\n<script>alert(2)</script>\u202e'
        a.post("acted", run_id="r1", kind="operator", action="checkpoint_now", text=f"detail={hostile}", at=1_700_000_000.0)
        assert wait_for(lambda: a.sent == 1)
        text = g.accepted[0]["text"]
        assert "<" not in text and ">" not in text and "](" not in text and "**" not in text
        assert "\n" not in text and "\u202e" not in text
        assert "&lt;script&gt;alert\\(2\\)" in text and "\\[click\\]" in text  # still readable
        a.close()
    finally:
        g.close()
