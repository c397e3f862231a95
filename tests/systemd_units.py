"""Read the unit files under deploy/systemd/ (shared by the unit and drill tests)."""

from __future__ import annotations

from pathlib import Path

UNIT_DIR = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
UNITS = sorted(UNIT_DIR.glob("*.service"))


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}} (systemd allows a key more than once)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def service(path: Path, key: str) -> str:
    return unit_settings(path)["Service"][key][-1]


def seconds(value: str) -> float:
    """systemd time spans used here: '5s', '90s', '2min', '500ms', plain seconds."""
    for suffix, mult in (("ms", 0.001), ("min", 60.0), ("s", 1.0)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * mult
    return float(value)
