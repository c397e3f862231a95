"""Dashboards as code: the committed JSON is exactly the generator's output, validates against
Grafana's JSON schemas (vendored in alerts/dashboards/schema/ from grafana-foundation-sdk; no
Grafana server can run here), and every PromQL query parses (the real promtool, via a temporary
rule file) and names only series of the metrics contract, the recording rules, or the DCGM /
node-exporter series the alert rules use."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from alerts.dashboards.generate import DASHBOARDS, render
from supervisor.metrics import SERIES

ROOT = Path(__file__).resolve().parents[2]
DASH = ROOT / "alerts" / "dashboards"
SCHEMA = DASH / "schema"


def load(name: str) -> dict:
    return json.loads((SCHEMA / name).read_text())


def panels(d: dict) -> list[dict]:
    return [p for p in d["panels"] if p.get("type") != "row"]


def queries(d: dict) -> list[str]:
    return [t["expr"] for p in panels(d) for t in p.get("targets", [])]


def test_committed_json_is_the_generator_output():
    for name, text in render().items():
        assert (DASH / name).read_text() == text, f"{name} is stale: python -m alerts.dashboards.generate"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_validates_against_grafana_schemas(name):
    d = json.loads((DASH / name).read_text())
    jsonschema.Draft7Validator(load("dashboard.jsonschema.json")).validate(d)
    for kind in ("timeseries", "stat"):
        schema = load(f"{kind}.jsonschema.json")
        opts = jsonschema.Draft7Validator({**schema, "$ref": "#/definitions/Options"})
        for p in (p for p in panels(d) if p["type"] == kind):
            opts.validate(p["options"])
            if kind == "timeseries":
                jsonschema.Draft7Validator({**schema, "$ref": "#/definitions/FieldConfig"}).validate(
                    p["fieldConfig"]["defaults"].get("custom", {}))
    assert len({p["title"] for p in panels(d)}) == len(panels(d)), "duplicate panel titles"


def test_schema_validation_catches_a_broken_dashboard():
    d = json.loads((DASH / "run-overview.json").read_text())
    d["panels"][1]["gridPos"] = {"h": "tall"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(load("dashboard.jsonschema.json")).validate(d)


def test_run_overview_has_incident_annotations_by_run_tag():
    d = json.loads((DASH / "run-overview.json").read_text())
    tags = [a["target"]["tags"] for a in d["annotations"]["list"] if a.get("name") == "Incidents"]
    assert tags == [["titan-supervisor", "run:$run_id"]]


def known_series() -> set[str]:
    names = {f"titan_{s.name}" for s in SERIES} | {"titan_run_info", "up"}
    for f in (ROOT / "alerts" / "rules").glob("*.yml"):
        for g in yaml.safe_load(f.read_text())["groups"]:
            names |= {r["record"] for r in g["rules"] if "record" in r}
            names |= {m for r in g["rules"] for m in re.findall(r"\b(DCGM_\w+|node_\w+)", r["expr"])}
    return names


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_queries_use_only_known_series(name):
    d = json.loads((DASH / name).read_text())
    known = known_series()
    for expr in queries(d):
        for m in re.findall(r"\b(titan[_:][\w:]*|DCGM_\w+|node_\w+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            assert m in known or base in known, f"{name}: {expr!r} uses unknown series {m}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: apt-get install prometheus")
def test_every_query_parses_with_promtool(tmp_path):
    rules = []
    for name in sorted(DASHBOARDS):
        for i, expr in enumerate(queries(json.loads((DASH / name).read_text())), 1):
            concrete = expr.replace("$run_id", ".*").replace("$__range", "1h").replace("$__rate_interval", "1m")
            rules.append({"record": f"dash:{Path(name).stem.replace('-', '_')}:{i}", "expr": concrete})
    f = tmp_path / "queries.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
