"""The trainer pod's first process: run torchrun, pass its output and signals through, and leave a
termination message the daemon can read.

    python -m supervisor.launch.pod_entry -- python -m torch.distributed.run ... -m training.run ...

Why a wrapper: the daemon learns which rank died, and how, from the container's termination
message (supervisor/launch/kubernetes.py). With ``FallbackToLogsOnError`` that message is the last
2 KiB of the log, and torchrun's failure report carries each failed rank's whole traceback: a
collateral rank's traceback filled it and the SIGKILLed rank was never named. This process writes
`torchrun_report.termination_message` (each rank's last lines and the report without tracebacks,
at most 4 KiB) to ``$TITAN_TERMINATION_LOG`` (the container's ``terminationMessagePath``) when
torchrun fails; the kubelet prefers that file to the log.

Failure model: the kubelet signals only the container's first process, so SIGTERM, SIGINT and
SIGHUP are passed to torchrun (which stops its ranks); SIGKILL ends the container whatever runs in
it, and then the kubelet falls back to the log. The exit status is torchrun's (128 + signal when
a signal ended it). Nothing here decides anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from supervisor.launch.torchrun_report import termination_message

ENV_TERMINATION_LOG = "TITAN_TERMINATION_LOG"
TAIL_BYTES = 512 * 1024  # output kept for the message: every rank's last lines and torchrun's report
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def write_message(path: str | None, text: str) -> None:
    if not path:
        return
    try:
        Path(path).write_text(termination_message(text), encoding="utf-8")
    except OSError as e:  # no message file: the kubelet falls back to the log
        print(f"pod_entry: cannot write the termination message to {path}: {e.strerror}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m supervisor.launch.pod_entry -- <torchrun command>", file=sys.stderr)
        return 2
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    tail = bytearray()
    out = sys.stdout.buffer
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(65536):
        try:
            out.write(chunk)
            out.flush()
        except OSError:
            pass  # a closed stdout must not stop the training it only reports on
        tail += chunk
        if len(tail) > 2 * TAIL_BYTES:
            del tail[:-TAIL_BYTES]
    code = proc.wait()
    if code != 0:
        write_message(os.environ.get(ENV_TERMINATION_LOG), tail[-TAIL_BYTES:].decode(errors="replace"))
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
