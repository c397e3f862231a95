"""deploy/systemd/: every unit passes `systemd-analyze verify` with nothing on stderr, has the
exposure score we report, and says what the daemon relies on (Type=notify, KillMode=process...).

Real `systemd-analyze` (systemd 252 here; .ci/run installs it where missing). systemd is not
PID 1 on this machine, so `verify` runs with `--root` on a temporary tree holding a copy of this
machine's own system units and an executable at the unit's ExecStart path (the package is not
installed system-wide here); the unit file itself is verified unchanged.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.systemd_units import UNITS, service, unit_settings

SYSTEMD_UNITS = Path("/usr/lib/systemd/system")
MAX_EXPOSURE = 2.5  # `systemd-analyze security` scale 0 (locked down) .. 10 (unprotected)

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze missing: `make deploy-tools` installs it")


def _verify(unit: Path, root: Path) -> subprocess.CompletedProcess:
    (root / "usr/lib/systemd").mkdir(parents=True, exist_ok=True)
    if not (root / "usr/lib/systemd/system").exists():
        shutil.copytree(SYSTEMD_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True, exist_ok=True)
    shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    exe = root / service(unit, "ExecStart").split()[0].lstrip("/")
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", unit.name],
                          capture_output=True, text=True, timeout=60)


def test_there_are_the_daemon_and_the_agent_units():
    assert [u.name for u in UNITS] == ["titan-supervisor-agent.service", "titan-supervisor.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_prints_nothing(unit, tmp_path):
    out = _verify(unit, tmp_path / "root")
    assert (out.returncode, out.stderr, out.stdout) == (0, "", "")


def test_verify_does_catch_a_mistake(tmp_path):
    """The check above can fail: a misspelt key is reported on stderr."""
    broken = tmp_path / "titan-supervisor.service"
    broken.write_text(UNITS[1].read_text().replace("KillMode=process", "KillMod=process"))
    out = _verify(broken, tmp_path / "root")
    assert "Unknown key 'KillMod'" in out.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_security_exposure_score(unit):
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    print(f"{unit.name}: exposure {m.group(1)}")
    assert float(m.group(1)) <= MAX_EXPOSURE


def test_daemon_unit_says_what_the_daemon_relies_on():
    s = unit_settings(UNITS[1])["Service"]
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"][0].endswith(" run /etc/titan-supervisor/config.toml")
    # the ranks must outlive a daemon stop/restart/watchdog kill: only the main process is signalled
    assert s["KillMode"] == ["process"] and s["Restart"] == ["on-failure"]
    assert "WatchdogSec" in s and "EnvironmentFile" in s
    assert "PrivateDevices" not in s and "RemoveIPC" not in s  # would break the ranks it launches


def test_agent_unit_runs_the_agent_and_spares_its_ranks():
    s = unit_settings(UNITS[0])["Service"]
    assert " agent " in s["ExecStart"][0] and s["KillMode"] == ["process"] and s["Restart"] == ["on-failure"]


def test_agent_unit_command_is_the_real_agent_cli_and_its_state_dir_is_the_agents_default():
    """The unit's ExecStart parses with the real `titan-supervisor` parser as `agent CONFIG`, the
    state directory it may write is the agent's default workdir, and /dev/kmsg stays readable
    (the agent reads Xid / ECC lines there)."""
    import shlex

    from supervisor.agent.main import AgentConfig
    from supervisor.cli import build_parser

    s = unit_settings(UNITS[0])["Service"]
    argv = shlex.split(s["ExecStart"][0])
    args = build_parser().parse_args(argv[1:])
    assert args.command == "agent" and args.config == "/etc/titan-supervisor/agent.toml"
    assert s["ReadWritePaths"] == [str(AgentConfig.__dataclass_fields__["workdir"].default)]
    assert s.get("ProtectKernelLogs", ["no"]) == ["no"]


def test_every_deployed_agent_toml_is_a_valid_agent_config_of_its_run():
    """Each Kubernetes agent.toml loads with the agent's own loader and names the run of the daemon
    config next to it (an agent of another run is refused by the daemon)."""
    import tomllib

    from supervisor.agent.main import load_agent_config

    root = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
    tomls = sorted(root.rglob("agent.toml"))
    assert len(tomls) == 3
    for path in tomls:
        cfg = load_agent_config(str(path), {}, {})
        daemon = tomllib.loads((path.parent / "config.toml").read_text())
        assert cfg.run_id == daemon["run"]["run_id"], path
        assert cfg.daemon_url.startswith("https://")
