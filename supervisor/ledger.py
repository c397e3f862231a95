"""The checkpoint ledger: every command on the checkpoint folder, mirrored into the journal.

`supervisor.checkpoints.Catalog` answers questions (what is valid, what is newest, what is in
quarantine) and executes file moves; this module decides nothing either, but it is the one place
that *changes* the checkpoint folder on the daemon's behalf, so each change is journaled where an
operator will look for it: quarantine (corrupt, or rolled back past), the last-known-good pin, and
retention (the only deletion, never of a pinned checkpoint).

Queries never mutate: `valid_steps`, `newest_valid_step` and `last_known_good` only read.
"""

from __future__ import annotations

from supervisor.checkpoints import Catalog, CheckpointInfo


class CheckpointLedger:
    def __init__(self, catalog: Catalog, journal, log) -> None:
        self.catalog = catalog
        self._journal = journal
        self._log = log
        self._valid: list[int] | None = None  # cache of catalog.valid_steps(), dropped on any change

    # -- queries -----------------------------------------------------------------------------
    def valid_steps(self) -> list[int]:
        if self._valid is None:
            self._valid = self.catalog.valid_steps()
        return self._valid

    def changed(self) -> None:
        """The folder changed under us (a save landed): forget what was cached."""
        self._valid = None

    def newest_valid_step(self, at_or_before: int | None = None) -> int | None:
        info = self.catalog.newest_valid(at_or_before=at_or_before)
        return info.step if info else None

    @property
    def last_known_good(self) -> int | None:
        return self._journal.get_meta("last_known_good")

    # -- commands ----------------------------------------------------------------------------
    def quarantine_corrupt(self) -> list[int]:
        moved = self.catalog.quarantine_corrupt()
        for info, m in moved:
            self._journal.record_checkpoint(info.step, path=str(m.dst), state="corrupt", note=info.reason)
            self._log.warning("corrupt checkpoint set aside", step=info.step, reason=info.reason)
        if moved:
            self.changed()
        return [info.step for info, _ in moved]

    def load_target(self, at_or_before: int | None = None) -> int | None:
        """The checkpoint a new generation should load: corrupt ones are set aside first, then
        the newest valid one at or before `at_or_before` (None: nothing valid)."""
        self.quarantine_corrupt()
        return self.newest_valid_step(at_or_before)

    def quarantine_newer_than(self, step: int, action_id: int) -> list[int]:
        moved = self.catalog.quarantine_newer_than(step, reason=f"rollback to step {step} (action {action_id})",
                                                   tag=f"rollback-a{action_id}")
        for m in moved:
            self._journal.record_checkpoint(m.step, path=str(m.dst), state="quarantined",
                                            note=f"rolled back past it (action {action_id})")
        if moved:
            self.changed()
        return [m.step for m in moved]

    def saved(self, step: int, path: str, seconds: float | None, at: float) -> None:
        self._journal.record_checkpoint(step, path=path, state="valid", save_seconds=seconds, at=at)
        self.changed()

    def apply_retention(self) -> list[CheckpointInfo]:
        removed = self.catalog.apply_retention()
        for info in removed:
            self._journal.record_checkpoint(info.step, state="deleted_by_retention")
        if removed:
            self.changed()
        return removed

    def pin_last_known_good(self, step: int) -> bool:
        """Pin `step` as the last-known-good and unpin the previous one (retention may then
        reclaim it). False, with a warning, if the checkpoint is gone."""
        old = set(self.catalog.pinned)
        try:
            self.catalog.pin(step)
        except (LookupError, ValueError) as e:
            self._log.warning("cannot pin last-known-good", step=step, error=str(e))
            return False
        for s in old - {step}:
            self.catalog.unpin(s)
            self._journal.record_checkpoint(s, pinned=False)
        self._journal.record_checkpoint(step, pinned=True, note="last-known-good")
        self._journal.set_meta("last_known_good", step)
        return True
