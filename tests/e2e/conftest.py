"""Fixtures for the namespace-based end-to-end suite: the simulated home of hushsim.topology.

Rules of this file: kernel-level tests run in CI (as root) and must pass there. They are skipped
only when not root AND $CI is not "true"; in CI a missing privilege or tool FAILS them, so a green
CI never hides an untested kernel path. All addresses are in 198.18.0.0/15 and 2001:2::/48.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from hushsim.topology import Topology, cleanup_stale, missing_tools
from tests.ci import need_root
from tests.e2e.guardkit import Guard, MakeGuard, device

# The speakers every module's topology has, with their vendors' real OUIs (the Echo Dot's and the
# HomePod's MACs are the ones in ../shared/captures/smart-speakers-study; the Nest has a Google OUI)
# so OUI-based discovery sees what it would at home.
SPEAKERS: tuple[tuple[str, str | None, str | None, str | None], ...] = (
    ("echo", "198.18.10.10", "2001:2:0:10::10", "68:db:f5:90:19:64"),
    ("homepod", "198.18.10.11", "2001:2:0:10::11", "d4:a3:3d:6b:1e:97"),
    ("nest", "198.18.10.12", "2001:2:0:10::12", "f4:f5:d8:0a:00:12"),
)


def require_kernel_world() -> None:
    """Skip (only off CI, only without root) or fail when the namespace world cannot be built."""
    need_root("the end-to-end suite")
    missing = missing_tools()
    if missing:
        pytest.fail(
            f"missing commands for the end-to-end suite: {', '.join(missing)} "
            "(apt-get install iproute2 iptables dnsmasq-base coreutils)"
        )


@pytest.fixture(scope="session")
def kernel_world() -> None:
    """Root and tools are there; leftovers of crashed earlier runs are removed (once)."""
    require_kernel_world()
    cleanup_stale("hg")


@pytest.fixture(scope="module")
def topology(kernel_world: None) -> Iterator[Topology]:
    """A fresh simulated home per test module: lan/gw/wan, the three speakers, dnsmasq and the
    cloud. Deleted (namespaces and every process) when the module ends, pass or fail."""
    topo = Topology(speakers=SPEAKERS)
    try:
        topo.start()
        yield topo
    finally:
        topo.close()


@pytest.fixture
def guards(topology: Topology, request: pytest.FixtureRequest) -> Iterator[MakeGuard]:
    """Start guards on the test module's queue (its QUEUE), guarding the echo in strict mode
    unless told otherwise; all are stopped and their rules removed when the test ends, pass or
    fail. A failing test shows the daemons' log tails."""
    made: list[Guard] = []
    failed_before = request.session.testsfailed
    queue = request.module.QUEUE

    def make(devices: list[dict[str, Any]] | None = None, **kw: Any) -> Guard:
        devices = devices if devices is not None else [device(topology, "echo")]
        g = Guard(topology, devices, queue=queue, **kw)
        made.append(g)
        return g.__enter__()  # starts it unless autostart=False

    try:
        yield make
    finally:
        for g in made:
            if request.session.testsfailed > failed_before:
                print(f"\n{g.log_tail(40)}")
            g.close()
        if made:
            _kill_leftover_sockets(topology)


def _kill_leftover_sockets(topology: Topology) -> None:
    """A speaker killed while its upload was held leaves a socket in its namespace that keeps
    retransmitting the held bytes for minutes; the next test's guard would see them as a
    connection from before it started (and hold them, as it should). Each test starts clean."""
    for host in topology.lan_hosts.values():
        subprocess.run(["ip", "netns", "exec", host.ns, "ss", "-K", "-t", "state", "all"],
                       capture_output=True, timeout=10, check=False)
