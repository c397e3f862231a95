"""Bearer tokens: hashed storage, roles, env entries, reload, and the settings that guard binds."""

from __future__ import annotations

import json
import os
import stat

import pytest

from supervisor import auth
from supervisor.auth import Principal, TokenError, TokenStore, add_token, hash_token, parse_env, revoke_token
from supervisor.settings import ConfigError, Settings


def test_add_token_stores_only_the_hash_and_authenticates(tmp_path):
    f = tmp_path / "tokens.jsonl"
    token = add_token(f, "alice", "operator")
    assert token.startswith("tsv_") and len(token) > 40
    text = f.read_text()
    assert token not in text
    assert json.loads(text) == {"name": "alice", "role": "operator", "sha256": hash_token(token)}
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    store = TokenStore(f)
    assert store.authenticate(token) == Principal("alice", "operator")
    assert store.authenticate(token + "x") is None
    assert store.authenticate("") is None and store.authenticate(None) is None


def test_tokens_are_random_and_names_unique(tmp_path):
    f = tmp_path / "t.jsonl"
    a, b = add_token(f, "a", "viewer"), add_token(f, "b", "viewer")
    assert a != b
    with pytest.raises(TokenError, match="already exists"):
        add_token(f, "a", "admin")


def test_roles_are_ordered():
    v, o, a = Principal("v", "viewer"), Principal("o", "operator"), Principal("a", "admin")
    assert v.allows("viewer") and not v.allows("operator") and not v.allows("admin")
    assert o.allows("operator") and not o.allows("admin")
    assert a.allows("viewer") and a.allows("operator") and a.allows("admin")


@pytest.mark.parametrize("line, needle", [
    ('{"name": "x", "role": "root", "sha256": "' + "0" * 64 + '"}', "role 'root'"),
    ('{"name": "x", "role": "admin", "sha256": "abc"}', "sha256 must be 64"),
    ('{"name": "../x", "role": "admin", "sha256": "' + "0" * 64 + '"}', "name '../x'"),
    ('{"name": "x", "role": "admin", "sha256": "' + "0" * 64 + '", "token": "plain"}', "expected {name"),
    ("not json", "not JSON"),
])
def test_bad_token_file_lines_name_the_line(tmp_path, line, needle):
    f = tmp_path / "t.jsonl"
    f.write_text("# comment\n" + line + "\n")
    with pytest.raises(TokenError, match="t.jsonl:2") as e:
        auth.load_token_file(f)
    assert needle in str(e.value)


def test_env_entries_and_clash_with_file(tmp_path, monkeypatch):
    token = "tsv_envtoken"
    entries = parse_env(f"ci:viewer:{hash_token(token)}, bot:operator:{hash_token('other')}")
    assert [(e.name, e.role, e.source) for e in entries] == [("ci", "viewer", "env"), ("bot", "operator", "env")]
    store = TokenStore(None, f"ci:viewer:{hash_token(token)}")
    assert store.configured and store.authenticate(token) == Principal("ci", "viewer")
    with pytest.raises(TokenError, match="name:role:sha256"):
        parse_env("ci:viewer")
    f = tmp_path / "t.jsonl"
    add_token(f, "ci", "admin")
    with pytest.raises(TokenError, match="both in"):
        TokenStore(f, f"ci:viewer:{hash_token(token)}")


def test_store_reloads_the_file_and_revocation_takes_effect(tmp_path):
    f = tmp_path / "t.jsonl"
    t1 = add_token(f, "one", "admin")
    store = TokenStore(f)
    assert store.authenticate(t1).name == "one"
    t2 = add_token(f, "two", "viewer")
    os.utime(f, ns=(f.stat().st_mtime_ns + 10**9,) * 2)
    assert store.authenticate(t2) == Principal("two", "viewer")  # no restart needed
    assert revoke_token(f, "one") and not revoke_token(f, "one")
    os.utime(f, ns=(f.stat().st_mtime_ns + 2 * 10**9,) * 2)
    assert store.authenticate(t1) is None and store.authenticate(t2) is not None


def test_a_half_written_file_keeps_the_last_good_tokens(tmp_path):
    f = tmp_path / "t.jsonl"
    t1 = add_token(f, "one", "admin")
    store = TokenStore(f)
    f.write_text("{broken\n")
    os.utime(f, ns=(f.stat().st_mtime_ns + 10**9,) * 2)
    assert store.authenticate(t1) == Principal("one", "admin")


def test_non_loopback_bind_needs_tokens_and_tls(tmp_path):
    with pytest.raises(ConfigError, match="not loopback: set server.token_file"):
        Settings.load(run={"workdir": str(tmp_path)}, server={"host": "0.0.0.0"})
    f = tmp_path / "t.jsonl"
    add_token(f, "a", "admin")
    with pytest.raises(ConfigError, match="tls_cert_file"):
        Settings.load(run={"workdir": str(tmp_path)}, server={"host": "0.0.0.0", "token_file": str(f)})
    s = Settings.load(run={"workdir": str(tmp_path)},
                      server={"host": "0.0.0.0", "token_file": str(f), "plaintext_behind_tls_proxy": True})
    assert not s.server.loopback
    with pytest.raises(ConfigError, match="set together"):
        Settings.load(run={"workdir": str(tmp_path)}, server={"tls_cert_file": str(f)})


def test_missing_or_bad_token_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; create it with `titan-supervisor token add"):
        Settings.load(run={"workdir": str(tmp_path)}, server={"token_file": str(tmp_path / "none.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "a", "role": "boss", "sha256": "' + "1" * 64 + '"}\n')
    with pytest.raises(ConfigError, match="role 'boss'"):
        Settings.load(run={"workdir": str(tmp_path)}, server={"token_file": str(bad)})
