"""A warm spare rank: started ahead of need, parked after its imports, handed its launch later.

Why: a cold restart spends its first seconds (~5 s on an idle 2-core machine, far more under
load) on torchrun's start-up and rendezvous, `import torch` and torchtitan, none of which
depends on what the restart is for. A spare generation is a ``torchrun ... -m training.run
--spare DIR`` started by the daemon's launcher while the current generation trains: each rank
does those imports (and CPU patching) and then waits for one file, ``DIR/launch.json``, the
trainer argv of the generation it is to become (generation number, load step, data skip, LR
scale, layout flags...). That file is written atomically by the launcher when a restart needs
it; each rank then runs exactly what a cold rank would run with that argv. The process group,
the model, the data and the checkpoint all come after the hand-off, so nothing run-specific is
decided before it.

Failure model: a spare is disposable. Nothing is written while parked. A rank exits by itself
(``DISCARDED``) once the daemon that started it is gone (``OWNER_ENV`` names its pid and start
time) or its torchrun is, so a SIGKILLed daemon leaves no parked spare behind for long; a rank that dies while
parked ends the whole spare (torchrun), and the launcher then starts cold. A malformed launch
file is an error naming the file (the rank exits non-zero), never a guess.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

LAUNCH_FILE = "launch.json"
OWNER_ENV = "TITAN_SPARE_OWNER"  # "<pid>:<process start time>" of the daemon that started the spare
DISCARDED = 3  # exit code of a spare rank whose owner went away before a launch came


def owner_alive(owner: str) -> bool:
    """The process named ``"<pid>:<start time>"`` still runs (a reused pid does not count)."""
    import psutil

    try:
        pid, started = owner.split(":", 1)
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.01
    except (ValueError, psutil.Error):
        return False


def read_launch(path: Path) -> list[str]:
    """The trainer argv in a launch file: ``{"argv": [str, ...]}``."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"spare launch file {path} is unreadable: {e}") from None
    argv = body.get("argv") if isinstance(body, dict) else None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"spare launch file {path} must hold {{\"argv\": [strings]}}")
    return argv


def wait_for_launch(folder: Path, owner: str | None, *, poll_s: float = 0.02,
                    owner_check_s: float = 1.0) -> list[str] | None:
    """Block until ``folder/launch.json`` appears (its argv) or the owner is gone (None)."""
    path = folder / LAUNCH_FILE
    parent = os.getppid()  # torchrun: a rank whose torchrun is gone can never be launched
    next_check = 0.0
    while True:
        if path.exists():
            return read_launch(path)
        now = time.monotonic()
        if os.getppid() != parent:
            return None
        if owner and now >= next_check:
            if not owner_alive(owner):
                return None
            next_check = now + owner_check_s
        time.sleep(poll_s)


def warm_up(idle_priority: bool = True) -> None:
    """The imports a rank needs before it knows its launch, at the lowest CPU priority.

    Linux nice values and policies are per thread: the imports run in a helper thread at nice 19
    and SCHED_IDLE, so a spare starting beside a training generation takes only CPU the generation
    leaves idle, while the
    main thread (which will train after the hand-off) keeps the priority it was started with;
    an unprivileged process could not raise it back. The modules are shared by every thread.
    """
    import threading

    error: list[BaseException] = []

    def work() -> None:
        try:
            if idle_priority:
                tid = threading.get_native_id()
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, 19)
                except (OSError, AttributeError):
                    pass  # no per-thread nice here: import at the normal priority
                try:  # below nice 19: a waking trainer thread preempts it at once (gloo's
                    # round trips are latency-bound; at nice 19 the steps beside it ran ~25 % slower)
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                except (OSError, AttributeError):
                    pass
            from training import cpu

            cpu.enable()
            import training.presets  # noqa: F401 - the trainer, torchtitan's models and components, datasets
            from torchtitan.config import ConfigManager  # noqa: F401
        except BaseException as e:  # noqa: BLE001 - raised again in the main thread
            error.append(e)

    t = threading.Thread(target=work, name="spare-warm-up", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]


def park(args: list[str]) -> list[str] | None:
    """``--spare DIR``: warm up, then wait here for the launch."""
    if len(args) != 1:
        raise ValueError("--spare takes exactly one folder and nothing else (the argv comes in its launch file)")
    yield_cpu()
    warm_up()
    rank = os.environ.get("RANK", "?")
    print(f"[spare rank{rank}] parked {time.time() - _t0():.2f} s after start (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    argv = wait_for_launch(Path(args[0]), os.environ.get(OWNER_ENV))
    if argv is not None:
        print(f"[spare rank{rank}] launched: {' '.join(argv[:12])} ...", file=sys.stderr, flush=True)
        why = reclaim_cpu()
        if why:
            print(f"[spare rank{rank}] {why}", file=sys.stderr, flush=True)
    return argv


def yield_cpu(path: str = "/proc/self/autogroup") -> None:
    """This rank's session to the lowest CPU share while it imports and parks.

    torchrun starts every rank in a session of its own, and Linux with ``sched_autogroup_enabled``
    shares the CPU fairly between sessions before it looks at a thread's nice: the nice-19
    import thread of ``warm_up`` alone still took a full share beside each training rank (steps at
    0.8-1.0 s instead of 0.41-0.48 s while a spare imported, preset small on 2 cores). Raising
    one's own nice value is always allowed; ``reclaim_cpu`` undoes it at the hand-off."""
    try:
        with open(path, "w") as f:
            f.write("19")
    except OSError:
        pass  # no autogroup here: the per-thread nice of warm_up is what applies


def reclaim_cpu(path: str = "/proc/self/autogroup") -> str | None:
    """At the hand-off: this rank's session back to autogroup nice 0 (``yield_cpu`` set it to 19 so
    the parked spare yielded the CPU to the generation then training; the torchrun agent's own
    session, set by the launcher, stays at 19). Lowering a nice value needs CAP_SYS_NICE (root has
    it; the hardened deploy/ units drop every capability); without it the generation trains at
    autogroup nice 19, which costs nothing while no other session wants the CPU (a GPU node's idle
    cores) and shares it evenly with the next spare's imports, as every spare did before. None
    when done or when there is nothing to undo; else the line to log."""
    try:
        with open(path) as f:
            now = f.read()  # "/autogroup-123 nice 19"
        if now.split()[-1] == "0":
            return None
        with open(path, "w") as f:
            f.write("0")
        return None
    except PermissionError:
        return "still at low CPU priority (autogroup nice 19): raising it back needs CAP_SYS_NICE"
    except (OSError, ValueError, IndexError):
        return None


def _t0() -> float:
    import psutil

    return psutil.Process().create_time()
