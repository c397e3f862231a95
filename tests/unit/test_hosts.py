"""The one grammar for host names and addresses from outside (supervisor/hosts.py)."""

import pytest

from supervisor.hosts import is_address, is_loopback, is_node_name, strip_port


@pytest.mark.parametrize("hostport,host", [("10.0.0.7:9100", "10.0.0.7"), ("[fd00::7]:9100", "fd00::7"),
                                           ("fd00::7", "fd00::7"), ("node-3", "node-3"),
                                           ("node-3:8642", "node-3"), ("[::1]", "::1")])
def test_strip_port(hostport, host):
    assert strip_port(hostport) == host


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8642", "app.localhost", "127.0.0.1", "127.9.9.9:1",
                                  "::1", "[::1]:8642", " 127.0.0.1 "])
def test_loopback(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "10.0.0.1", "0.0.0.0", "",
                                  "[fd00::1]:80", "127.0.0.1.nip.io", "localhost@evil"])
def test_not_loopback(host):
    assert not is_loopback(host)


def test_node_names_and_addresses():
    assert is_node_name("gpu-node-17.cluster.local") and is_node_name("agent@node1") and is_node_name("fd00::7")
    for bad in ("", "a" * 256, "../etc", "node 1", "node\n1", "node1\n", "[x]", "nöde", "a/b"):
        assert not is_node_name(bad), bad
    assert is_address("10.0.0.7") and is_address("fd00::7") and is_address("node-1.example")
    for bad in ("", "agent@node1", "[::1]", "a..b", "$(reboot)", "a b", "a" * 256, "10.0.0.7\n"):
        assert not is_address(bad), bad
