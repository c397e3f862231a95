"""The typed settings tree: every field reachable from TOML, environment and flags, validated,
and printable as TOML that loads back. Real files, real environment, the real CLI in a
subprocess; nothing mocked.

The tree is walked programmatically (`leaves`), so a field added to any component's Config is
covered without touching this file; `changed` must find a valid non-default value for it or the
walk fails naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import pytest
from pydantic import BaseModel

from supervisor.preflight import Layout
from supervisor.run_plan import build_plan, trainer_flags
from supervisor.settings import ConfigError, Settings
from supervisor.settings_toml import value

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "TITAN_SUPERVISOR_"

# Fields whose valid values have a format no generic rule can guess (not a list of the tree).
SAMPLES: dict[str, Any] = {
    "run.preset": "small",  # must be a known preset
    "run.faults": "nan@5",  # KIND@STEP
    "server.host": "localhost",  # an IP address or localhost
    "preflight.device": "H100",
    "launch.kubernetes.api_server": "https://k8s.example:6443",  # http(s)://host[:port]
    "grafana.url": "http://127.0.0.1:3000",  # an http(s) URL
    "fault_tolerance.min_replica_size": 2,  # at most fault_tolerance.groups (2)
    "fault_tolerance.lighthouse.min_replicas": 2,  # likewise
}
# Fields that must name existing, valid files (covered by the server tests, the launcher tests and
# tests/unit/test_incident_annotations.py).
NEEDS_FILES = {"server.token_file", "server.tls_cert_file", "server.tls_key_file",
               "launch.kubernetes.token_file", "launch.kubernetes.ca_file", "grafana.token_file"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(PREFIX):
            monkeypatch.delenv(k)


def _hints(node) -> dict[str, Any]:
    if isinstance(node, BaseModel):
        return {n: f.annotation for n, f in type(node).model_fields.items()}
    return typing.get_type_hints(type(node), include_extras=True)


def _is_table(v) -> bool:
    return isinstance(v, BaseModel) or (dataclasses.is_dataclass(v) and not isinstance(v, type))


def leaves(node, prefix: tuple[str, ...] = ()):
    """(path, default value, annotation) of every leaf field under `node`."""
    hints = _hints(node)
    names = (type(node).model_fields if isinstance(node, BaseModel)
             else [f.name for f in dataclasses.fields(node)])
    for name in names:
        v = getattr(node, name)
        if _is_table(v):
            yield from leaves(v, prefix + (name,))
        else:
            yield prefix + (name,), v, hints[name]


def _base(tp):
    """Strip Annotated and Optional: the type a value must have."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        args = typing.get_args(tp)
        if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
            tp = next(a for a in args if a is not type(None))
            continue
        return tp


def changed(dotted: str, v, tp):
    """A valid value different from the default `v` (TOML-native: str, int, float, bool, lists, dicts)."""
    if dotted in SAMPLES:
        return SAMPLES[dotted]
    t = _base(tp)
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return next(a for a in args if a != v)
    if t is bool:
        return not v if v is not None else True
    if t is int:
        return 7 if v is None else v + 1
    if t is float:
        return 0.5 if not v else v / 2
    if t is str:
        return (v or "") + "x"
    if t is Path:
        return str(v or "some/file") + "x"
    if origin is dict:
        return {"SOME_VAR": "1"}
    if origin is list and _base(args[0]) is Layout:
        return [{"dp": 2, "micro_batch": 4, "name": "walk"}]
    if origin is tuple:
        item = _base(args[0])
        if typing.get_origin(item) is tuple:  # pairs: (name, regex) or (params, lr)
            kinds = [_base(a) for a in typing.get_args(item)]
            extra = ["x", "y"] if kinds[0] is str else [1e13, 1e-5]
            return [list(p) for p in v] + [extra]
        if item is str:
            return list(v) + ["x"]
        return [x / 2 for x in v]  # a (low, high) range
    raise AssertionError(f"{dotted}: no rule to change a {t!r}; add one (or a SAMPLES entry)")


def norm(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (list, tuple)):
        return [norm(i) for i in x]
    if dataclasses.is_dataclass(x):
        return {k: norm(i) for k, i in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {k: norm(i) for k, i in x.items()}
    return x


def get(settings, path):
    for p in path:
        settings = getattr(settings, p)
    return settings


def nested(path, v) -> dict:
    for p in reversed(path):
        v = {p: v}
    return v


def toml_for(path, v) -> str:
    if len(path) == 1:
        return f"{path[0]} = {value(v)}\n"
    return f"[{'.'.join(path[:-1])}]\n{path[-1]} = {value(v)}\n"


def env_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def expected(v):
    if isinstance(v, list) and v and isinstance(v[0], dict):
        return norm([Layout(**d) for d in v])
    return norm(v)


WALK = [(p, v, t) for p, v, t in leaves(Settings.defaults()) if ".".join(p) not in NEEDS_FILES]


def test_the_walk_reaches_every_component_config():
    tops = {p[0] for p, _, _ in WALK}
    assert {"run", "training", "server", "launch", "daemon", "checkpoints", "journal", "page", "optimizer",
            "preflight", "convergence", "detect", "policy", "mode", "log_level"} <= tops
    dotted = {".".join(p) for p, _, _ in WALK}
    for must in ("detect.stall.heartbeat_timeout", "detect.loss_spike.z_threshold", "policy.max_restarts",
                 "preflight.thresholds.eps_max", "checkpoints.catalog.keep_last", "journal.keep_every",
                 "launch.local.exitcode_wait_s", "training.local_batch_size"):
        assert must in dotted
    assert len(WALK) > 100


@pytest.mark.parametrize("path,default,tp", WALK, ids=[".".join(p) for p, _, _ in WALK])
def test_every_setting_round_trips_toml_env_and_flag(path, default, tp, tmp_path, monkeypatch):
    dotted = ".".join(path)
    new = changed(dotted, default, tp)
    want = expected(new)
    assert want != norm(default), f"{dotted}: the walk picked the default"

    cfg = tmp_path / "run.toml"
    cfg.write_text(toml_for(path, new))
    assert norm(get(Settings.load(cfg), path)) == want, "TOML"

    monkeypatch.setenv(PREFIX + "__".join(p.upper() for p in path), env_value(new))
    assert norm(get(Settings.load(), path)) == want, "environment"
    monkeypatch.delenv(PREFIX + "__".join(p.upper() for p in path))

    assert norm(get(Settings.load(**nested(path, new)), path)) == want, "flag"
    # precedence: flags over environment over the file
    other = changed(dotted, new if not isinstance(new, list) else default, tp)
    if norm(other) not in (want, norm(default)) and not isinstance(new, (list, dict)):
        monkeypatch.setenv(PREFIX + "__".join(p.upper() for p in path), env_value(other))
        assert norm(get(Settings.load(cfg), path)) == expected(other), "environment over file"


NUMBERS = [(p, v, t) for p, v, t in WALK if _base(t) in (int, float)]


@pytest.mark.parametrize("path,default,tp", NUMBERS, ids=[".".join(p) for p, _, _ in NUMBERS])
def test_every_number_rejects_nan_inf_negative_and_text(path, default, tp, tmp_path):
    dotted = ".".join(path)
    bad = ["-1", '"a string"', "true", '"7"']  # a quoted number is a typo in a file (only env is text)
    if _base(tp) is float:
        bad += ["nan", "inf"]
    else:
        bad += ["2.5"]
    for b in bad:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(toml_for(path, 0).rsplit("=", 1)[0] + f"= {b}\n")
        with pytest.raises(ConfigError) as e:
            Settings.load(cfg)
        assert str(e.value).startswith(f"{dotted}: "), (b, str(e.value))


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**clean, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=60)


@pytest.mark.parametrize("command,bad,why", [
    ("run", "nan", "greater than 0"), ("preflight", "-1", "greater than 0"),
    ("config", '"soon"', "expected a number, got the string 'soon'"), ("config", "0", "greater than 0"), ("run", "inf", "finite number")])
def test_bad_nested_value_is_a_config_error_through_the_cli(command, bad, why, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"[run]\nworkdir = \"{tmp_path / 'w'}\"\n\n[detect.stall]\nheartbeat_timeout = {bad}\n")
    p = _cli(command, str(cfg))
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("config error: detect.stall.heartbeat_timeout: "), p.stderr
    assert why in p.stderr
    assert not (tmp_path / "w").exists()  # nothing was started or written


def test_unknown_key_and_cross_field_rules_are_config_errors(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[detect.stall]\nheartbeat_timeot = 2.0\n")
    p = _cli("config", str(cfg))
    assert (p.returncode, p.stderr.strip()) == (2, "config error: detect.stall.heartbeat_timeot: unknown setting")
    cfg.write_text("[detect.stall]\nfloor_seconds = 30.0\nceiling_seconds = 10.0\n")
    p = _cli("config", str(cfg))
    assert p.returncode == 2 and p.stderr.startswith("config error: detect.stall: floor_seconds 30.0 > ceiling"), p.stderr
    cfg.write_text("[detect.hardware]\npatterns = [[\"xid\", \"(\"]]\n")
    p = _cli("config", str(cfg))
    assert p.returncode == 2 and "not a valid regex" in p.stderr, p.stderr
    p = _cli("config", str(cfg), env={PREFIX + "POLICY__MAX_RESTARTS": "-3"})
    assert p.returncode == 2


def test_trainer_args_is_gone_with_a_pointer_to_training(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[run]\ntrainer_args = ["--debug.seed", "7"]\n')
    p = _cli("config", str(cfg))
    assert p.returncode == 2 and "trainer_args" in p.stderr and "[training]" in p.stderr, p.stderr


def test_defaults_print_as_toml_that_loads_back_to_the_defaults(tmp_path):
    p = _cli("config", "--defaults", env={PREFIX + "SERVER__PORT": "1234"})  # env does not leak in
    assert p.returncode == 0, p.stderr
    parsed = tomllib.loads(p.stdout)
    assert parsed["server"]["port"] == 8642
    assert parsed["detect"]["stall"]["heartbeat_timeout"] == 5.0
    assert parsed["detect"]["stall"]["startup_timeout"] == 180.0
    # every field carries its doc as a comment
    assert "# a rank silent this long is missing" in p.stdout
    assert "# rollbacks allowed over the whole run; then stop" in p.stdout
    (tmp_path / "d.toml").write_text(p.stdout)
    assert Settings.load(tmp_path / "d.toml") == Settings.defaults()
    # every leaf with a value is in the output (None has no TOML spelling: commented out)
    for path, v, _ in leaves(Settings.defaults()):
        node = parsed
        for part in path[:-1]:
            node = node[part]
        assert (path[-1] in node) == (v is not None), path


def test_config_prints_the_effective_tree(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[detect.stall]\nheartbeat_timeout = 2.5\n[training]\nseed = 9\n")
    p = _cli("config", str(cfg), env={PREFIX + "POLICY__MAX_RESTARTS": "11"})
    assert p.returncode == 0, p.stderr
    parsed = tomllib.loads(p.stdout)
    assert parsed["detect"]["stall"]["heartbeat_timeout"] == 2.5
    assert parsed["detect"]["stall"]["startup_timeout"] == 180.0  # a partial table keeps the daemon default
    assert parsed["policy"]["max_restarts"] == 11
    assert parsed["training"]["seed"] == 9
    assert _cli("config").returncode == 2


def test_preflight_lints_the_batch_the_trainer_gets(tmp_path):
    """The bug this replaces: preflight linted micro-batch 4 while trainer_args passed 8."""
    from supervisor.daemon import Supervisor

    s = Settings.load(run={"workdir": str(tmp_path / "w")}, training={"local_batch_size": 8, "seq_len": 128, "seed": 3})
    plan = build_plan(s, host_memory_gib=16.0)
    flags = trainer_flags(s)
    got = dict(zip(flags[::2], flags[1::2]))
    assert got == {"--debug.seed": "3", "--training.local_batch_size": "8", "--training.seq_len": "128"}
    assert plan.layouts[0].micro_batch == 8 and plan.seq_len == 128
    assert plan.global_batch == s.run.nproc_per_node * 8
    sup = Supervisor(s)
    try:  # what the daemon hands the launcher is exactly that
        assert sup._spec(0, load_step=None, skip_batches=0, lr_scale=1.0).extra_args == flags
    finally:
        sup.journal.close()
    assert trainer_flags(Settings.load()) == []  # unset: the preset's own values, nothing passed
    s = Settings.load(training={"global_batch_size": 32})
    assert build_plan(s, 16.0).global_batch == 32 and trainer_flags(s) == ["--training.global_batch_size", "32"]


def test_preflight_thresholds_reach_the_lint():
    from supervisor.preflight import preflight

    s = Settings.load(optimizer={"eps": 1e-7})
    plan = build_plan(s, 16.0)
    assert not [i for i in preflight(plan, s.preflight.thresholds).all_issues() if i.field == "optimizer.eps"
                and i.level == "error"]
    strict = Settings.load(optimizer={"eps": 1e-7}, preflight={"thresholds": {"eps_max": 1e-8}})
    assert [i for i in preflight(plan, strict.preflight.thresholds).all_issues()
            if i.field == "optimizer.eps" and i.level == "error"]


def test_no_float_default_is_nan_or_inf():
    for path, v, _ in leaves(Settings.defaults()):
        if isinstance(v, float):
            assert math.isfinite(v), path


def test_a_step_count_no_run_could_reach_is_a_config_error():
    """Steps are bounded like every step on the wire (< 2**53): 10**29 was accepted."""
    for field in ("steps", "checkpoint_interval"):
        with pytest.raises(ConfigError, match=f"run.{field}: Input should be less than"):
            Settings.load(run={field: 10**29})
    assert Settings.load(run={"steps": 2**53 - 1}).run.steps == 2**53 - 1


def test_a_config_with_text_beyond_the_bmp_prints_as_toml_that_loads_back(tmp_path):
    """json.dumps wrote the emoji of a workdir as a surrogate pair, which TOML refuses: the printed
    config did not load back (found by an adversarial review). Hidden characters print escaped."""
    from supervisor.settings_toml import toml_string

    cfg = tmp_path / "run.toml"
    cfg.write_text('[run]\nworkdir = "/tmp/wd-\U0001f680-\u202e"\nenv = {"K\u00e9" = "a\\"b\\\\c"}\n')
    p = _cli("config", str(cfg))
    assert p.returncode == 0, p.stderr
    assert "\\U0001f680" in p.stdout and "\\u202e" in p.stdout and "\u202e" not in p.stdout
    back = tomllib.loads(p.stdout)
    assert back["run"]["workdir"] == "/tmp/wd-\U0001f680-\u202e" and back["run"]["env"] == {"K\u00e9": 'a"b\\c'}
    with pytest.raises(ValueError, match="surrogate"):
        toml_string("\ud800")


BOOLS = [(p, v, t) for p, v, t in WALK if _base(t) is bool]


@pytest.mark.parametrize("path,default,tp", BOOLS, ids=[".".join(p) for p, _, _ in BOOLS])
def test_every_boolean_rejects_a_quoted_word(path, default, tp, tmp_path):
    """"false" in a file is a quoted value, and pydantic's lax mode would read "0" as False."""
    cfg = tmp_path / "bad.toml"
    for b in ('"false"', '"0"', '"yes"'):
        cfg.write_text(toml_for(path, False).rsplit("=", 1)[0] + f"= {b}\n")
        with pytest.raises(ConfigError) as e:
            Settings.load(cfg)
        assert str(e.value).startswith(f"{'.'.join(path)}: expected true or false, got the string "), str(e.value)
