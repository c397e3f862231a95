"""Host names and addresses that come from outside: one grammar, one port-stripper.

Why one module: a node name (an agent's report, an Alertmanager label), a node's address (it goes
into every node's torchrun argv), a ``Host`` header and a rendezvous host were each checked by a
pattern or a parser of their own, and the copies drifted (one allowed ``@``, one forgot ``..``).
Pure functions, no I/O: no name is ever resolved here.
"""

from __future__ import annotations

import ipaddress
import re

#: a node's name: a host name, an IP address, or an agent's ``name@host``
NODE_NAME_PATTERN = r"^[A-Za-z0-9_.:@-]{1,255}$"
#: where a node is reached: a host name or a bare IP address (no ``@``, no brackets, no port)
ADDRESS_PATTERN = r"^[A-Za-z0-9_.:-]{1,255}$"
# fullmatch, not match: Python's ``$`` also matches before a trailing newline ("node1\n" passed)
_NODE_NAME, _ADDRESS = re.compile(NODE_NAME_PATTERN), re.compile(ADDRESS_PATTERN)


def strip_port(hostport: str) -> str:
    """``host:port`` or ``[v6]:port`` -> the host; a bare v6 address (several colons) stays whole."""
    if hostport.startswith("["):
        return hostport[1:].split("]", 1)[0]
    if hostport.count(":") == 1:
        return hostport.rsplit(":", 1)[0]
    return hostport


def is_node_name(name: str) -> bool:
    """A node name the daemon keeps: it becomes an `exclude_node` target (a Kubernetes Node name, a
    registry key) and a page's text, so it carries no path (``..``), markup or line break."""
    return bool(_NODE_NAME.fullmatch(name)) and ".." not in name


def is_address(host: str) -> bool:
    """A host name or a bare IP address, safe to put into a command line."""
    return bool(_ADDRESS.fullmatch(host)) and ".." not in host


def is_loopback(host: str) -> bool:
    """``host`` (a name or an address, with or without a port) names this machine's loopback."""
    h = strip_port(host.strip()).lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
