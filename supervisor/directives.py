"""The directive channel, daemon -> trainer (docs/architecture.md, "Directives").

A directive is queued here and handed to rank 0 in the reply to its next telemetry post; rank 0
broadcasts it and every rank applies it at the same step boundary, then rank 0 reports a
`directive_applied` event (ok or refused, with a detail). This module only sends and waits: it
never chooses what to send.

Failure model: the daemon may die between queueing and the acknowledgement. The directive is
journaled (meta `action_<id>_directive`) before it is queued, and the trainer writes every
acknowledgement to its spool, so a restarted daemon can tell whether it landed
(`applied_in_spool`). Directive ids are `a<action id>`: the trainer applies an id at most once,
so re-sending one is harmless.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable

from supervisor.protocol import Directive, DirectiveApplied
from supervisor.spool import read_spool


class DirectiveChannel:
    """Queue directives for the running generation and collect their acknowledgements."""

    def __init__(self, journal, spool: Path, *, max_acks: int = 1000, poll_s: float = 0.05) -> None:
        self._journal = journal
        self._spool = spool
        self._poll_s = poll_s
        self._max_acks = max_acks  # acknowledgements kept for operator commands that poll for them
        self.pending: dict[str, Directive] = {}
        self._acks: dict[str, DirectiveApplied] = {}

    def send(self, action_id: int, **fields) -> Directive:
        d = Directive(id=f"a{action_id}", **fields)
        self._journal.set_meta(f"action_{action_id}_directive", d.model_dump())
        self.pending[d.id] = d
        return d

    def is_pending(self, directive_id: str | None) -> bool:
        return directive_id is not None and directive_id in self.pending

    def drop(self, directive_id: str | None) -> None:
        self.pending.pop(directive_id or "", None)

    def clear(self) -> None:
        """A new generation starts: nothing queued for the old one is delivered."""
        self.pending.clear()

    def applied(self, ev: DirectiveApplied) -> None:
        """The trainer's acknowledgement arrived (from telemetry)."""
        self.pending.pop(ev.directive_id, None)
        self._acks[ev.directive_id] = ev
        if len(self._acks) > self._max_acks:
            self._acks.pop(next(iter(self._acks)))

    def ack(self, directive_id: str) -> DirectiveApplied | None:
        return self._acks.get(directive_id)

    async def wait(self, directive_id: str, timeout_s: float,
                   alive: Callable[[], bool] | None = None) -> DirectiveApplied | None:
        """The acknowledgement, or None after `timeout_s` or as soon as `alive()` turns false."""
        deadline = time.monotonic() + timeout_s
        while True:
            ack = self._acks.get(directive_id)
            if ack is not None or time.monotonic() >= deadline or (alive is not None and not alive()):
                return ack
            await asyncio.sleep(self._poll_s)

    def journaled(self, action_id: int) -> dict | None:
        """The directive journaled for an action, if one was sent."""
        return self._journal.get_meta(f"action_{action_id}_directive")

    def applied_in_spool(self, directive_id: str) -> tuple[bool, str] | None:
        """(ok, detail) of the trainer's acknowledgement written to its spool, if any."""
        found = None
        for ev in read_spool(self._spool, strict=False):
            if ev.get("kind") == "directive_applied" and ev.get("directive_id") == directive_id:
                if found is None or ev.get("ok"):
                    found = (bool(ev.get("ok")), str(ev.get("detail", "")))
        return found
