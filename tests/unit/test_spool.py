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
