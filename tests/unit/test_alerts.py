"""alerts/: the real promtool and amtool binaries check the rule files, run the promtool unit
tests, check the Alertmanager example and its routing; every alert has a firing and a quiet
test and an existing runbook. Skipped only where the binaries are missing (`.ci/run` installs
them from apt: packages prometheus and prometheus-alertmanager)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "alerts"
RULE_FILES = sorted((ALERTS / "rules").glob("*.yml"))
TEST_FILES = sorted((ALERTS / "tests").glob("*.yml"))

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing: apt-get install prometheus")
needs_amtool = pytest.mark.skipif(shutil.which("amtool") is None,
                                  reason="amtool missing: apt-get install prometheus-alertmanager")


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    return [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
            if "alert" in r]


def test_rules_folder_holds_only_plain_rule_files():
    """A PrometheusRule is generated from this folder: plain `groups:` files and nothing else."""
    assert RULE_FILES
    for f in (ALERTS / "rules").iterdir():
        assert f.suffix == ".yml", f"{f.name}: only rule files belong in alerts/rules/"
        assert set(yaml.safe_load(f.read_text())) == {"groups"}, f.name


@needs_promtool
def test_promtool_check_rules():
    r = run("promtool", "check", "rules", *map(str, RULE_FILES))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_unit_tests_pass():
    r = run("promtool", "test", "rules", *[f.name for f in TEST_FILES], cwd=ALERTS / "tests")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_every_alert_has_labels_annotations_a_firing_and_a_quiet_test():
    tested: dict[str, dict[str, int]] = {}
    for f in TEST_FILES:
        for t in yaml.safe_load(f.read_text())["tests"]:
            for a in t.get("alert_rule_test", []):
                c = tested.setdefault(a["alertname"], {"fires": 0, "quiet": 0})
                c["fires" if a.get("exp_alerts") else "quiet"] += 1
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("page", "critical", "warning"), name
        url = rule["annotations"]["runbook_url"]
        assert (ROOT / url).is_file(), f"{name}: runbook {url} missing"
        assert {"summary", "description"} <= set(rule["annotations"]), name
        counts = tested.get(name, {"fires": 0, "quiet": 0})
        assert counts["fires"] >= 1 and counts["quiet"] >= 1, f"{name}: needs a firing and a quiet test ({counts})"


def test_runbooks_say_what_it_means_what_was_done_and_what_to_run():
    for f in (ALERTS / "runbooks").glob("*.md"):
        text = f.read_text()
        for heading in ("## What it means", "## What the supervisor already did", "## What to run"):
            assert heading in text, f"{f.name}: {heading}"


@needs_amtool
def test_amtool_check_config():
    r = run("amtool", "check-config", str(ALERTS / "alertmanager.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_amtool
@pytest.mark.parametrize("labels, receivers", [
    (["alertname=TitanGpuXidError", "hardware=true", "severity=critical", "node=gpu-07"],
     "titan-supervisor,oncall-page"),
    (["alertname=TitanHumanNeeded", "severity=page", "run_id=r1"], "oncall-page"),
    (["alertname=TitanStraggler", "severity=warning", "run_id=r1"], "oncall-ticket"),
])
def test_alertmanager_routes(labels, receivers):
    r = run("amtool", "config", "routes", "test", "--config.file", str(ALERTS / "alertmanager.yml"), *labels)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == receivers
