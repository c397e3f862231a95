import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _hermetic_hf_cache(tmp_path_factory):
    """`datasets` caches Arrow files under HF_HOME: keep them out of the user's home."""
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    yield
