"""Fixtures shared by the integration drills."""

import pytest

from tests.daemon_harness import DaemonFactory


@pytest.fixture
def make_daemon(tmp_path):
    """``make_daemon(extra=None, **run)``: a drill daemon (not started) on a free port; all cleaned up."""
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.cleanup()
