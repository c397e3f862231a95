"""Node health as one agent sees it: memory, disk, load (psutil), GPUs (NVML), kernel log (Xid, ECC).

Why here and not in the ranks: a GPU that fell off the bus, an uncorrectable ECC error or a full
disk is a fact about the node, seen whether or not a rank is alive to report it; the daemon
turns kernel-log matches into hardware findings naming the node (the policy may exclude it).

Failure model: every source is optional and best-effort. NVML is used only when `pynvml`
(package ``nvidia-ml-py``) imports and finds a GPU; the kernel log only when readable
(``/dev/kmsg`` needs no privilege on most distributions but may be restricted; ``dmesg`` may be
refused by ``kernel.dmesg_restrict``). A source that fails is reported once in the agent's log
and skipped from then on; it never stops the agent's reports.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import psutil

from supervisor.detect.hardware import DEFAULT_HARDWARE_PATTERNS

GIB = 1024 ** 3
# The kernel-side subset of the hardware patterns (the NCCL ones only appear in rank logs).
KERNEL_PATTERNS = tuple((n, rx) for n, rx in DEFAULT_HARDWARE_PATTERNS
                        if n in ("xid", "ecc", "fell_off_bus", "nvlink", "row_remap")) + (
    ("mce", r"Machine Check Exception|mce: \[Hardware Error\]"),)
MAX_EVENTS = 100  # per report (NodeHealth.kernel's bound)


def scan_kernel_lines(lines, patterns=KERNEL_PATTERNS) -> list[dict]:
    """The lines that match a hardware pattern, as `KernelEvent` dicts (first pattern wins)."""
    compiled = [(name, re.compile(rx, re.IGNORECASE)) for name, rx in patterns]
    out = []
    for raw in lines:
        line = _kmsg_text(raw.rstrip("\n"))
        for name, rx in compiled:
            if rx.search(line):
                out.append({"pattern": name, "line": line[:2000]})
                break
        if len(out) >= MAX_EVENTS:
            break
    return out


def _kmsg_text(line: str) -> str:
    """``/dev/kmsg`` records are ``prio,seq,usec,flags;message``: the message."""
    head, sep, rest = line.partition(";")
    return rest if sep and re.match(r"^\d+,\d+,\d+", head) else line


class KernelLog:
    """New kernel-log lines since the last read: from ``/dev/kmsg``, a file (a fixture, or a
    syslog copy), ``dmesg``, or nothing (``none``). Starts at the end: old lines were some
    earlier boot's or agent's business."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problem: str | None = None
        self._fd: int | None = None
        self._offset = 0
        self._dmesg_seen = 0
        if source in ("", "none"):
            return
        try:
            if source == "dmesg":
                self._dmesg_seen = len(self._dmesg())
            elif source == "/dev/kmsg":
                self._fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK)
                os.lseek(self._fd, 0, os.SEEK_END)
            else:
                self._offset = Path(source).stat().st_size if Path(source).exists() else 0
        except (OSError, subprocess.SubprocessError) as e:
            self.problem = f"kernel log {source} unreadable: {e}"

    def _dmesg(self) -> list[str]:
        r = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5, check=True)
        return r.stdout.splitlines()

    def read(self) -> list[str]:
        if self.problem is not None or self.source in ("", "none"):
            return []
        try:
            if self.source == "dmesg":
                lines = self._dmesg()
                new, self._dmesg_seen = lines[self._dmesg_seen:], len(lines)
                return new
            if self._fd is not None:
                out = []
                while len(out) < 10_000:
                    try:
                        out.append(os.read(self._fd, 8192).decode(errors="replace"))
                    except BlockingIOError:
                        break
                    except BrokenPipeError:  # overwritten records: continue with the next
                        continue
                return out
            p = Path(self.source)
            if not p.exists():
                return []
            size = p.stat().st_size
            if size < self._offset:  # rotated or truncated: start over
                self._offset = 0
            with open(p, "rb") as f:
                f.seek(self._offset)
                data = f.read(1024 * 1024)
            self._offset += len(data)
            return data.decode(errors="replace").splitlines()
        except (OSError, subprocess.SubprocessError) as e:
            self.problem = f"kernel log {self.source} unreadable: {e}"
            return []


def gpu_health() -> tuple[list[dict], str | None]:
    """Per-GPU memory, uncorrected ECC count and temperature through NVML; ([], why) without."""
    try:
        import pynvml  # package nvidia-ml-py: optional, only on GPU nodes
    except ImportError:
        return [], "NVML: nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound / DriverNotLoaded: no GPU here
        return [], f"NVML: {e}"
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            row = {"index": i, "name": str(pynvml.nvmlDeviceGetName(h))[:128],
                   "mem_used_gib": mem.used / GIB, "mem_total_gib": mem.total / GIB}
            try:
                row["ecc_uncorrected"] = int(pynvml.nvmlDeviceGetTotalEccErrors(
                    h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC))
            except Exception:  # noqa: BLE001 - ECC not supported on this GPU
                pass
            try:
                row["temperature_c"] = float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
            except Exception:  # noqa: BLE001
                pass
            out.append(row)
    finally:
        pynvml.nvmlShutdown()
    return out, None if out else "NVML: no GPU"


class HealthProbe:
    """One `NodeHealth` dict per report."""

    def __init__(self, disk_path: Path, kernel_source: str, *, log=None) -> None:
        self.disk_path = Path(disk_path)
        self.kernel = KernelLog(kernel_source)
        self._log = log
        self._nvml = True
        self._told: set[str] = set()

    def _tell(self, problem: str | None) -> None:
        if problem and problem not in self._told and self._log is not None:
            self._told.add(problem)
            self._log(problem)

    def collect(self) -> dict:
        vm = psutil.virtual_memory()
        try:
            free = psutil.disk_usage(str(self.disk_path)).free / GIB
        except OSError:
            free = 0.0
        gpus: list[dict] = []
        if self._nvml:
            gpus, why = gpu_health()
            if not gpus:
                self._nvml = False  # no NVML or no GPU: do not ask again every second
                self._tell(why)
        events = scan_kernel_lines(self.kernel.read())
        self._tell(self.kernel.problem)
        return {"mem_total_gib": vm.total / GIB, "mem_available_gib": vm.available / GIB, "disk_free_gib": free,
                "load_1m": os.getloadavg()[0], "gpus": gpus, "kernel": events}
