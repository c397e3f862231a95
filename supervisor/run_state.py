"""The run's observable state: one owner of its transitions (docs/architecture.md, "Who owns what").

Every part that needs to know whether the run is running, paused or finished reads it here, and
every state change goes through `RunStatus.set`, which mirrors it into the journal (so a restarted
daemon knows where the run was) and into the `titan_run_state` metric.
"""

from __future__ import annotations

import asyncio
import math

#: the trainer should be making progress
ACTIVE = ("starting", "running", "recovering")
#: nothing runs and nothing should until an operator says so
AT_REST = ("paused", "stopped", "finished")
#: an operator `resume` may start a generation
RESUMABLE = ("paused", "stopped", "failed")
STATES = ACTIVE + AT_REST + ("failed",)


def json_number(x: float) -> float | str:
    """JSON has no NaN: a non-finite number is reported as the string "nan"/"inf"/"-inf"."""
    return x if math.isfinite(x) else str(x)


class RunStatus:
    """State, step, LR scale and planned length of the run, as the daemon last saw them."""

    def __init__(self, journal, metrics, log, *, total_steps: int | None) -> None:
        self._journal, self._metrics, self._log = journal, metrics, log
        self.state = "starting"
        self.last_step = 0
        self.lr_scale = 1.0
        self.total_steps = total_steps
        self.trainer_finished: tuple[int, str] | None = None  # (step, reason) from the trainer's "finished"
        self.finished = asyncio.Event()

    def set(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        if state != self.state:
            self._log.info("state", state=state, previous=self.state)
        self.state = state
        self._metrics.set_state(state)
        self._journal.set_meta("state", state)

    @property
    def at_rest(self) -> bool:
        return self.state in AT_REST

    def finish(self) -> None:
        self.set("finished")
        self.finished.set()
