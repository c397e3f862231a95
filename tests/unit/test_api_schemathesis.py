"""Property test over the daemon's OpenAPI document (schemathesis + Hypothesis): whatever the
generated request, valid or not, the API never answers 5xx.

The app is the real one (real Supervisor, journal, catalog with real DCP checkpoints); the trainer
is a stand-in and a light command does not wait for an acknowledgement that cannot come."""

from __future__ import annotations

import io

import pytest
import schemathesis
import structlog
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from supervisor.api import build_app
from supervisor.directives import DirectiveChannel
from tests.control_fixtures import FakeGen, make_sup, make_tokens

STATE: dict = {}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema")
    tokens = make_tokens(tmp)
    sup = make_sup(tmp, tokens, logger=structlog.wrap_logger(structlog.PrintLogger(io.StringIO())))
    with pytest.MonkeyPatch.context() as mp:
        async def no_wait(self, directive_id, timeout_s, alive=None):
            return None
        mp.setattr(DirectiveChannel, "wait", no_wait)
        STATE.update(sup=sup, tokens=tokens)
        yield schemathesis.openapi.from_asgi("/openapi.json", build_app(sup))
    sup.journal.close()


def test_no_request_makes_the_api_fail(api_schema):
    """Every operation, with schema-valid and schema-violating requests (the pytest plugin of
    schemathesis 4.32 does not run under pytest 9, so the operations are driven here)."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    from fastapi.testclient import TestClient

    sup, admin = STATE["sup"], STATE["tokens"]["admin"]
    ran = []
    http = TestClient(api_schema.app, base_url="http://127.0.0.1").__enter__()

    def send(case):
        # schemathesis' own transport needs urllib3 internals that urllib3-future (pulled in by the
        # trainer's dependencies) replaces, so the generated request is sent with the app's TestClient
        kw = case.as_transport_kwargs(base_url="http://testserver", headers={"Authorization": f"Bearer {admin}"})
        body = {"json": kw["json"]} if "json" in kw else {"content": kw.get("data")} if kw.get("data") else {}
        return http.request(kw["method"], kw["url"], headers=kw["headers"], params=kw.get("params"),
                            cookies=kw.get("cookies"), **body)

    for result in api_schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                # every example starts from a live run with nothing in flight: accepting paths run too
                sup.action, sup.state, sup.gen = None, "running", FakeGen(sup.generation)
                response = send(case)
                assert response.status_code < 500, (op.label, mode, case.body, response.text[:500])
                case.validate_response(response, checks=[not_a_server_error])

            try:
                check()
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE, op.label  # nothing in it can be made invalid
                continue
            ran.append((op.label, mode))
    http.__exit__(None, None, None)
    assert len(ran) >= 2 * 20
    assert sup.journal.counts()["commands"] > 0  # commands were really exercised (and journaled)


def test_the_document_covers_the_control_plane(api_schema):
    paths = set(api_schema.raw_schema["paths"])
    for p in ("/v1/status", "/v1/incidents", "/v1/incidents/{incident_id}", "/v1/incidents/{incident_id}/ack",
              "/v1/checkpoints", "/v1/audit", "/v1/policy", "/v1/proposals", "/v1/proposals/{decision_id}/confirm",
              "/v1/alerts", *(f"/v1/commands/{c}" for c in ("rollback", "pause", "resume", "lr", "skip-data",
                                                               "checkpoint-now", "decay-now", "extend"))):
        assert p in paths, p
    body = api_schema.raw_schema["paths"]["/v1/commands/rollback"]["post"]["requestBody"]
    assert "reason" in body["content"]["application/json"]["schema"]["required"]
    assert "HTTPBearer" in api_schema.raw_schema["components"]["securitySchemes"]
