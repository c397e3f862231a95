import subprocess
import sys

import pytest

from supervisor.spool import SpoolError, read_spool
from tests.trainer_harness import ROOT, trainer_env


def test_a_torn_last_line_is_skipped_when_recovering_and_named_when_strict(tmp_path):
    p = tmp_path / "spool.jsonl"
    p.write_text('{"step": 1}\n\n{"kind": "started", "step": 0}\n{"step": 2, "lo')  # crash mid-write
    assert read_spool(p, strict=False) == [{"step": 1}, {"kind": "started", "step": 0}]
    with pytest.raises(SpoolError, match=r"spool.jsonl:4: not JSON"):
        read_spool(p, strict=True)
    assert read_spool(tmp_path / "missing.jsonl", strict=False) == []
    with pytest.raises(SpoolError, match="does not exist"):
        read_spool(tmp_path / "missing.jsonl", strict=True)


@pytest.mark.parametrize("content, needle", [
    ('{"step": 1}\n[1, 2]\n', "spool.jsonl:2: not a JSON object"),
    ('{"step": 1}\nnope\n', "spool.jsonl:2: not JSON"),
])
def test_replay_cli_names_the_bad_line(tmp_path, content, needle):
    p = tmp_path / "spool.jsonl"
    p.write_text(content)
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "replay", str(p)], env=trainer_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and needle in r.stderr


@pytest.mark.parametrize("bad", [b"[" * 200_000, b'{"step": 3, "x": "\xff"}', b'{"step": 3, "pad": "' + b"a" * (17 << 20)])
def test_a_corrupt_line_is_skipped_when_recovering_and_named_when_strict(tmp_path, bad):
    """Found by an adversarial review: a line nested 200,000 deep (RecursionError) or holding a
    byte that is not UTF-8 (UnicodeDecodeError) escaped as a traceback, from replay and from the
    daemon's catch-up at start; an endless line was read whole. Lines split on \\n only: a raw
    U+2028 inside a JSON string is data."""
    p = tmp_path / "spool.jsonl"
    p.write_bytes(b'{"step": 1}\n' + bad + b'\n{"step": 2, "s": "a\xe2\x80\xa8b"}\n')
    assert read_spool(p, strict=False) == [{"step": 1}, {"step": 2, "s": "a\u2028b"}]
    with pytest.raises(SpoolError, match=r"spool.jsonl:2: not JSON"):
        read_spool(p, strict=True)
