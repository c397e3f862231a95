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
