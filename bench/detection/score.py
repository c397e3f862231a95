"""Score the project's detectors and policy (through `replay`) and the anchors on the curves.

    PYTHONPATH=$PWD .venv/bin/python -m bench.detection.score --split test

For every perturbed run the event is [onset, last perturbed step + labels.K]; its label comes
from labels.py: the band rule (the run's own pre-onset band, the issue's "back in band by
itself"; the default), or with `--label twin` the twin rule (the curve vs its clean twin, which
also counts a lasting setback as diverged; what `--strict` detection is for). Metrics, per rule:

- recall: diverged events with a heavy action (rollback, rollback_lr_down, stop_page; for an
  anchor, its kill/stop) at a step in the event window;
- delay: steps from onset to the first heavy action, median and p90 (nearest rank);
- heavy on benign: benign events (recovered / no_effect) whose run got any heavy action;
- clean alarms: clean runs with any decision that acts (anything but record/none; for an
  anchor, any act, light or heavy).

Pure with respect to the curves: no training, no clock; runs in seconds in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.detection import labels as L
from bench.detection.anchors import ANCHORS, HEAVY
from bench.detection.matrix import Run, runs
from supervisor.detect.loss_spike import LossSpikeDetector
from supervisor.detect.robust import percentile
from supervisor.detect.suite import DetectorSuite
from supervisor.policy import ROLLBACK_ACTIONS, STOP_PAGE
from supervisor.replay import replay

CURVES = Path(__file__).resolve().parent / "curves"
HEAVY_ACTIONS = ROLLBACK_ACTIONS | {STOP_PAGE}
PROJECT = "titan-supervisor"


@dataclass
class Tally:
    diverged: int = 0
    caught: int = 0
    delays: list[int] = field(default_factory=list)
    benign: int = 0
    benign_heavy: int = 0
    clean: int = 0
    clean_alarms: int = 0
    misses: list[str] = field(default_factory=list)
    false_heavy: list[str] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)

    def row(self, name: str) -> dict:
        d = sorted(self.delays)
        return {"rule": name, "recall": f"{self.caught}/{self.diverged}",
                "median_delay": percentile(d, 50) if d else None,
                "p90_delay": percentile(d, 90) if d else None,
                "heavy_on_benign": f"{self.benign_heavy}/{self.benign}",
                "clean_alarms": f"{self.clean_alarms}/{self.clean}"}


def project_acts(lines: list[dict], suite_config: DetectorSuite.Config | None = None) -> list[tuple[int, str, str]]:
    """(step, action, reason) of every acting decision replay makes on the curve."""
    return [(f.step, d.action, d.reason) for f, d in replay(lines, suite_config=suite_config) if d.acts]


def strict_suite() -> DetectorSuite.Config:
    """The detectors with `[detect.loss_spike] strict = true` (loss_spike.py)."""
    return DetectorSuite.Config(loss_spike=LossSpikeDetector.Config(strict=True))


def anchor_acts(rule, lines):
    return [(step, "heavy" if kind == HEAVY else "light", "") for step, kind in rule(lines)]


LABEL_RULES = ("twin", "band")


def label_event(run: Run, lines: list[dict], twin: list[dict], rule: str = "band") -> tuple[str, dict]:
    if rule == "band":
        return L.band_label(L.losses(lines), run.onset, run.last)
    return L.label(L.losses(lines), L.losses(twin), run.onset, run.last)


def score(selected: list[Run], curves: Path = CURVES, rule: str = "band",
          suite_config: DetectorSuite.Config | None = None) -> tuple[dict[str, Tally], list[dict]]:
    tallies = {name: Tally() for name in (PROJECT, *ANCHORS)}
    loaded = {r.id: L.load_curve(curves / f"{r.id}.jsonl.gz") for r in selected}
    twins = {r.twin: L.load_curve(curves / f"{r.twin}.jsonl.gz") for r in selected}
    events = []
    for run in selected:
        lines = loaded[run.id]
        acts = {PROJECT: [(s, "heavy" if a in HEAVY_ACTIONS else "light", why)
                          for s, a, why in project_acts(lines, suite_config)]}
        acts.update({name: anchor_acts(rule, lines) for name, rule in ANCHORS.items()})
        if run.kind == "clean":
            for name, t in tallies.items():
                t.clean += 1
                if acts[name]:
                    t.clean_alarms += 1
                    t.alarms.append(f"{run.id}: {acts[name][0]}")
            continue
        lab, info = label_event(run, lines, twins[run.twin], rule)
        events.append({"id": run.id, "kind": run.kind, "faults": run.faults, "label": lab, **info})
        for name, t in tallies.items():
            heavy = [s for s, k, _ in acts[name] if k == "heavy"]
            if lab == L.DIVERGED:
                t.diverged += 1
                hit = [s for s in heavy if run.onset <= s <= run.last + L.K]
                if hit:
                    t.caught += 1
                    t.delays.append(min(hit) - run.onset)
                else:
                    t.misses.append(run.id)
            else:
                t.benign += 1
                if heavy:
                    t.benign_heavy += 1
                    t.false_heavy.append(f"{run.id} ({lab}) at step {heavy[0]}")
    return tallies, events


def table(tallies: dict[str, Tally]) -> str:
    head = "| rule | diverged acted on | median delay | p90 delay | heavy on benign | clean alarms |"
    rows = [head, "|---|---|---|---|---|---|"]
    for name, t in tallies.items():
        r = t.row(name)
        rows.append(f"| {name} | {r['recall']} | {r['median_delay']} | {r['p90_delay']} | "
                    f"{r['heavy_on_benign']} | {r['clean_alarms']} |")
    return "\n".join(rows)


README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- bench:table -->", "<!-- /bench:table -->"


def write_readme(text: str) -> None:
    body = README.read_text()
    if BEGIN not in body or END not in body:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block to replace")
    pre, rest = body.split(BEGIN, 1)
    post = rest.split(END, 1)[1]
    README.write_text(f"{pre}{BEGIN}\n{text}\n{END}{post}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("tuning", "test", "all"), default="tuning")
    ap.add_argument("--label", choices=LABEL_RULES, default="band",
                    help="labeling rule (labels.py): the run's own band (default), or vs its clean twin")
    ap.add_argument("--strict", action="store_true",
                    help="score the project with [detect.loss_spike] strict = true")
    ap.add_argument("--events", action="store_true", help="print each event's label and the misses")
    ap.add_argument("--write-readme", action="store_true",
                    help="replace the table between the README's bench markers with this one")
    a = ap.parse_args(argv)
    selected = [r for r in runs() if a.split in ("all", r.split)
                and (CURVES / f"{r.id}.jsonl.gz").is_file() and (CURVES / f"{r.twin}.jsonl.gz").is_file()]
    if a.write_readme and (a.label != "band" or a.strict):
        raise SystemExit("--write-readme writes the default table (band labels, default detectors)")
    tallies, events = score(selected, rule=a.label, suite_config=strict_suite() if a.strict else None)
    counts = {lab: sum(e["label"] == lab for e in events) for lab in (L.DIVERGED, L.RECOVERED, L.NO_EFFECT)}
    view = f"{a.label} labels" + (", strict" if a.strict else "")
    head = (f"split {a.split} ({view}): {len(selected)} runs ({sum(r.kind == 'clean' for r in selected)} clean), "
            f"{len(events)} events: " + ", ".join(f"{n} {lab}" for lab, n in counts.items()))
    text = head + "\n\n" + table(tallies)
    print(text)
    if a.write_readme:
        write_readme(text)
    if a.events:
        for e in events:
            print(json.dumps(e))
        for name, t in tallies.items():
            print(f"{name}: misses {t.misses}; heavy on benign {t.false_heavy}; clean alarms {t.alarms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
