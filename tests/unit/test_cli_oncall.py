"""The on-call CLI against the real API over real HTTP (uvicorn in a thread, a real Supervisor
with a real journal and real DCP checkpoints; the trainer is a stand-in, see
tests/control_fixtures.py)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from supervisor import cli, client as C
from supervisor.api import build_app
from supervisor.oncall import render_status
from supervisor.service import _Server
from tests.control_fixtures import make_sup, make_tokens

STATUS_KEYS = {"schema", "run_id", "state", "mode", "generation", "step", "total_steps", "loss", "grad_norm",
               "tokens_per_s", "lr", "lr_scale", "last_known_good", "newest_checkpoint", "open_incidents",
               "action", "policy_now", "proposals", "pending_directives", "trainer_pids", "layout", "updated_at",
               "checkpoint_interval", "recommended_checkpoint_interval", "nodes"}


@pytest.fixture
def tokens(tmp_path):
    return make_tokens(tmp_path)


@pytest.fixture
def sup(tmp_path, tokens):
    import io

    import structlog

    # keep stdout for the CLI's output
    sup = make_sup(tmp_path, tokens, logger=structlog.wrap_logger(structlog.PrintLogger(io.StringIO())))
    yield sup
    sup.journal.close()


@pytest.fixture
def url(sup):
    import uvicorn

    server = _Server(uvicorn.Config(build_app(sup), host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


@pytest.fixture
def run(url, tokens, capsys, monkeypatch):
    for var in ("TITAN_SUPERVISOR_TOKEN", "TITAN_SUPERVISOR_TOKEN_FILE", "TITAN_SUPERVISOR_URL",
                "TITAN_SUPERVISOR_CLIENT_CONFIG"):
        monkeypatch.delenv(var, raising=False)

    def go(*argv, role="operator", with_url=True):
        args = list(argv)
        if with_url:
            args += ["--url", url]
        if role:
            args += ["--token", tokens[role]]
        code = cli.main(args)
        out = capsys.readouterr()
        return code, out.out, out.err
    return go


def test_status_json_is_the_documented_document(run):
    code, out, _ = run("status", "--json", role="viewer")
    st = json.loads(out)
    assert code == 0 and set(st) == STATUS_KEYS and st["schema"] == 1 and st["step"] == 33


def test_human_status_fits_80_columns(sup):
    from rich.console import Console

    st = {"schema": 1, "run_id": "llmjp3-172b-pretrain-phase2-restart", "state": "recovering", "mode": "advise",
          "generation": 12, "step": 1234567, "total_steps": 2500000, "loss": 2.123456, "grad_norm": 0.9,
          "tokens_per_s": 12345678.9, "lr": 0.0002, "lr_scale": 0.5, "last_known_good": 1234000,
          "newest_checkpoint": 1234500, "action": {"id": 77, "kind": "rollback_lr_down", "actor": "policy",
                                                    "since": time.time() - 30, "params": {}},
          "policy_now": "acting: rollback_lr_down (action 77, by policy) with a rather long explanation attached",
          "open_incidents": [{"id": i, "kind": "loss_spike", "onset_step": 1234560 + i, "state": "acked",
                              "acked_by": "alice.on-call", "opened_at": time.time(), "summary": ""}
                             for i in range(6)],
          "proposals": 0, "pending_directives": [], "trainer_pids": {}, "updated_at": time.time() - 2}
    con = Console(width=80, record=True, color_system=None)
    con.print(render_status(st))
    text = con.export_text()
    lines = text.splitlines()
    assert lines and max(len(x) for x in lines) <= 80
    for needle in ("1234567 / 2500000", "2.1235", "12,345,679", "step 1234000", "#77 rollback_lr_down",
                   "#0 loss_spike @1234560 acked", "2 more", "recovering"):
        assert needle in text, (needle, text)


def test_cli_rollback_cold_waits_and_is_audited(run, sup):
    sup.gen, sup.state = None, "paused"
    code, out, err = run("rollback", "--to-step", "20", "--skip-batches", "5", "--reason", "bad data at 24",
                         "--yes", "--json")
    body = json.loads(out)
    assert code == 0, err
    assert body["action"]["state"] == "done" and body["action"]["outcome"]["mode"] == "cold"
    spec = sup.generations.launcher.specs[-1]
    assert (spec.load_step, spec.skip_batches) == (20, 5)
    code, out, _ = run("audit", "--json", role="viewer")
    row = json.loads(out)[0]
    assert (row["actor"], row["command"], row["reason"], row["accepted"]) == ("alice", "rollback", "bad data at 24",
                                                                             True)
    assert row["action"]["state"] == "done"
    code, out, _ = run("audit", role="viewer")
    assert "alice" in out and "rollback" in out and "bad data at 24" in out


@pytest.mark.parametrize("argv, role, code, needle", [
    (["rollback", "--to-step", "15", "--reason", "x", "--yes"], "operator", C.EXIT_USAGE, "no checkpoint step-15"),
    (["rollback", "--to-step", "20", "--reason", "x", "--yes"], "viewer", C.EXIT_AUTH, "needs operator"),
    (["rollback", "--to-step", "20", "--reason", "x", "--yes"], None, C.EXIT_AUTH, "missing bearer token"),
    (["policy", "--mode", "off", "--reason", "x", "--yes"], "operator", C.EXIT_AUTH, "needs admin"),
    (["resume", "--reason", "x", "--yes"], "operator", C.EXIT_CONFLICT, "resume applies to a paused"),
    (["incidents", "99"], "viewer", C.EXIT_NOT_FOUND, "no incident 99"),
    (["extend", "--steps", "5", "--reason", "x"], "operator", C.EXIT_USAGE, "already at step 33"),
])
def test_exit_codes_mean_something(run, sup, argv, role, code, needle):
    before = sup.journal.counts()["actions"]
    got, out, err = run(*argv, role=role)
    assert got == code, (out, err)
    assert needle in err
    assert sup.journal.counts()["actions"] == before


def test_local_usage_errors_exit_2(run):
    for argv in (["rollback", "--to-step", "../etc", "--reason", "x"], ["rollback", "--to-step", "5"],
                 ["skip-data", "--batches", "-1", "--reason", "x"], ["explode"],
                 # found by an adversarial review: tracebacks (exit 1, read as "the action failed")
                 # or a Unicode digit read as a step
                 ["status", "--timeout", "nan"], ["status", "--timeout", "-1"], ["status", "--timeout", "inf"],
                 ["lr", "--scale", "0.5", "--wait", "nan", "--reason", "x"],
                 ["lr", "--scale", "inf", "--reason", "x"],
                 ["rollback", "--to-step", "\uff14\uff12".encode().decode("unicode_escape"), "--reason", "x"],
                 ["rollback", "--to-step", "1_0", "--reason", "x"], ["incidents", "+1"]):
        with pytest.raises(SystemExit) as e:
            run(*argv)
        assert e.value.code == 2


def test_unreachable_supervisor_exits_3(run):
    code, _, err = run("status", "--url", "http://127.0.0.1:1", with_url=False)
    assert code == C.EXIT_UNREACHABLE and "cannot reach the supervisor" in err


def test_dry_run_prints_the_plan_and_changes_nothing(run, sup):
    code, out, _ = run("rollback", "--to-step", "20", "--reason", "x", "--dry-run")
    assert code == 0 and "would roll back from step 33 to step 20" in out and "quarantine" in out
    assert sup.journal.actions() == [] and sup.action is None


def test_tty_confirmation_declined_does_nothing(run, sup, monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt="": "n")
    code, out, err = run("pause", "--reason", "maybe")
    assert code == C.EXIT_DECLINED and "would pause at step 33" in out and "nothing done" in err
    assert sup.journal.actions() == [] and sup.pending == {}


def test_lr_light_command_reports_queued(run, sup):
    code, out, _ = run("lr", "--scale", "0.5", "--reason", "cool down", "--wait", "0", "--json")
    body = json.loads(out)
    assert code == 0 and body["applied"] is None and sup.pending[body["directive"]].scale == 0.5


def test_incidents_checkpoints_and_policy_tables(run, sup):
    iid = sup.journal.open_incident("hang", 12, summary="hang", generation=0)
    code, out, _ = run("incidents", role="viewer")
    assert code == 0 and "hang" in out and str(iid) in out
    code, out, _ = run("incidents", str(iid), role="viewer")
    assert code == 0 and f"incident #{iid} hang at step 12" in out
    code, out, _ = run("checkpoints", role="viewer")
    assert code == 0 and "corrupt" in out and "quarantine" in out
    code, out, _ = run("ack", str(iid), "--reason", "mine")
    assert code == 0 and "acknowledged by alice" in out
    code, out, _ = run("policy", "--mode", "advise", "--reason", "night", "--yes", role="admin")
    assert code == 0 and sup.mode == "advise"
    code, out, _ = run("policy", role="viewer")
    assert code == 0 and "policy mode: advise" in out


def test_every_subcommand_help_has_an_example(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        assert "example:" in p.format_help(), name
    for name in ("status", "incidents", "checkpoints", "rollback", "pause", "resume", "lr", "skip-data",
                 "checkpoint-now", "decay-now", "extend", "ack", "policy", "audit", "token", "completion"):
        assert name in sub.choices


def test_completion_script(run):
    code, out, _ = run("completion", "bash", role=None, with_url=False)
    assert code == 0 and "titan-supervisor" in out and "complete" in out


def test_token_commands_store_only_hashes(tmp_path, capsys):
    f = tmp_path / "tok.jsonl"
    assert cli.main(["token", "add", "bob", "--role", "viewer", "--file", str(f)]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("tsv_") and token not in f.read_text()
    assert cli.main(["token", "list", "--file", str(f), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "bob", "role": "viewer"}]
    assert cli.main(["token", "add", "bob", "--role", "admin", "--file", str(f)]) == C.EXIT_USAGE
    assert cli.main(["token", "revoke", "bob", "--file", str(f)]) == 0
    assert cli.main(["token", "revoke", "bob", "--file", str(f)]) == C.EXIT_NOT_FOUND


def test_client_config_precedence(tmp_path):
    cfg = tmp_path / "client.toml"
    tf = tmp_path / "tok"
    tf.write_text("tsv_fromfile\n")
    cfg.write_text(f'url = "http://file:1"\ntoken_file = "{tf}"\n')
    env = {"TITAN_SUPERVISOR_CLIENT_CONFIG": str(cfg)}
    c = C.ClientConfig.resolve(env=env)
    assert (c.url, c.token) == ("http://file:1", "tsv_fromfile")
    c = C.ClientConfig.resolve(env=env | {"TITAN_SUPERVISOR_URL": "http://env:2", "TITAN_SUPERVISOR_TOKEN": "e"})
    assert (c.url, c.token) == ("http://env:2", "e")
    c = C.ClientConfig.resolve(url="http://flag:3", token="f", env=env | {"TITAN_SUPERVISOR_URL": "http://env:2"})
    assert (c.url, c.token) == ("http://flag:3", "f")
    with pytest.raises(C.ClientError) as e:
        C.ClientConfig.resolve(config_file=str(tmp_path / "missing.toml"), env={})
    assert e.value.exit_code == C.EXIT_USAGE
    with pytest.raises(C.ClientError):
        C.ClientConfig.resolve(url="ftp://x", env={})


def test_status_watch_refreshes_until_ctrl_c(run, sup, monkeypatch):
    import supervisor.oncall as oncall

    fetched = []
    real_render = oncall.render_status

    def counting_render(st):
        fetched.append(st["step"])
        sup.last_step += 1  # the run moves on between refreshes
        return real_render(st)

    sleeps = iter([None, None, KeyboardInterrupt])

    def fake_sleep(s):
        nxt = next(sleeps)
        if nxt is KeyboardInterrupt:
            raise KeyboardInterrupt

    monkeypatch.setattr(oncall, "render_status", counting_render)
    import types

    monkeypatch.setattr(oncall, "time", types.SimpleNamespace(sleep=fake_sleep, time=time.time))
    code, out, _ = run("status", "--watch", "--interval", "0.1", role="viewer")
    assert code == 0 and fetched == [33, 34, 35]  # three fetches, each showing the newer step
