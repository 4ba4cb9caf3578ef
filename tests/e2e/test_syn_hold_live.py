"""The SYN hold, live (design.md 5a.3): the router does not answer a guarded device's SYN that the
cloud would not answer. The SYN waits in the guard's queue while the relay connects upstream and
is answered as that connect was: a refused port gives the speaker a reset, an unreachable address
an ICMP unreachable, a silent one silence; a hung guard answers nothing at all (no listener that
ACKs into a void). Before the SYN hold every one of these connects "succeeded" at once.

Sockets are opened in the speaker's namespace from this process (bounded timeouts); the routes and
rules this module adds are removed when each test ends, failed or not.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from hushsim.topology import Topology
from tests.e2e.guardkit import Guard, MakeGuard

QUEUE = 73  # this module's NFQUEUE number (other modules use their own)
SMART_HOME = "api.amazonalexa.com"
CLOSED_PORT = 444  # nothing listens there at the cloud
SILENT_PORT = 445  # the cloud drops SYNs to it
UNROUTED_V4 = "198.19.1.250"  # the router has an `unreachable` route for it
UNROUTED_V6 = "2001:2:0:21::250"


def _connect(topology: Topology, addr: str, port: int, timeout_s: float) -> tuple[str, float]:
    """('connected' | 'refused' | 'unreachable' | 'timeout' | 'error N', seconds taken)."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET

    def attempt() -> tuple[str, float]:
        t0 = time.monotonic()
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            try:
                s.connect((addr, port))
                outcome = "connected"
            except TimeoutError:
                outcome = "timeout"
            except ConnectionRefusedError:
                outcome = "refused"
            except OSError as exc:
                outcome = ("unreachable" if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
                           else f"error {exc.errno}")
        return outcome, time.monotonic() - t0

    return topology.call_in("echo", attempt, timeout_s=timeout_s + 5.0)


def _cloud_addr(topology: Topology, family: int) -> str:
    v4, v6 = topology.hosts[SMART_HOME]
    return v4 if family == 4 else v6


@pytest.fixture
def paths(topology: Topology) -> Iterator[None]:
    """An unreachable route at the router and a port the cloud drops SYNs to."""
    drop = ["-p", "tcp", "--dport", str(SILENT_PORT), "-j", "DROP"]
    try:
        topology.run("gw", "ip", "-4", "route", "add", "unreachable", f"{UNROUTED_V4}/32")
        topology.run("gw", "ip", "-6", "route", "add", "unreachable", f"{UNROUTED_V6}/128")
        for tool in (topology.iptables, topology.ip6tables):
            topology.run("wan", tool, "-I", "INPUT", *drop)
        yield
    finally:
        topology.run("gw", "ip", "-4", "route", "del", "unreachable", f"{UNROUTED_V4}/32",
                     check=False)
        topology.run("gw", "ip", "-6", "route", "del", "unreachable", f"{UNROUTED_V6}/128",
                     check=False)
        for tool in (topology.iptables, topology.ip6tables):
            topology.run("wan", tool, "-D", "INPUT", *drop, check=False)


def _relay(g: Guard) -> dict[str, int]:
    return g.cli_json("status")["relay"]


@pytest.mark.parametrize("family", [4, 6])
def test_a_syn_is_answered_as_the_path_answered_the_relay(
    topology: Topology, guards: MakeGuard, paths: None, family: int
) -> None:
    g = guards(tcp_hold="relay")
    cloud = _cloud_addr(topology, family)
    unrouted = UNROUTED_V4 if family == 4 else UNROUTED_V6

    outcome, took = _connect(topology, cloud, CLOSED_PORT, 3.0)
    assert outcome == "refused" and took < 1.0, (outcome, took)
    outcome, took = _connect(topology, unrouted, 443, 3.0)
    assert outcome == "unreachable" and took < 1.0, (outcome, took)
    outcome, took = _connect(topology, cloud, SILENT_PORT, 1.5)
    assert outcome == "timeout", (outcome, took)

    outcome, took = _connect(topology, cloud, 443, 3.0)
    assert outcome == "connected", (outcome, took)
    time.sleep(0.5)  # the relay opens the connection (no first bytes: after 0.3 s)
    relay = _relay(g)
    # the relay's upstream leg was connected before the speaker's SYN was answered, and the
    # accept took that leg
    assert relay["preconnected_used"] >= 1, relay
    assert relay["syn_refused"] >= 1 and relay["syn_unreachable"] >= 1, relay
    assert relay["syn_connected"] >= 1 and relay["syn_held"] >= 4, relay


def test_a_hung_guard_answers_no_syn_and_a_running_one_does_again(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards(tcp_hold="relay")
    pid = g.pid
    assert pid is not None
    cloud = _cloud_addr(topology, 4)
    assert _connect(topology, cloud, 443, 3.0)[0] == "connected"
    stopped: Callable[[], None] = lambda: os.kill(pid, signal.SIGCONT)  # noqa: E731
    os.kill(pid, signal.SIGSTOP)
    try:
        outcome, took = _connect(topology, cloud, 443, 1.5)
        assert outcome == "timeout", (outcome, took)  # no SYN-ACK from a hung guard
    finally:
        stopped()
    outcome, took = _connect(topology, cloud, 443, 3.0)
    assert outcome == "connected", (outcome, took)
