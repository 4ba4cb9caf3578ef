"""The relay's upstream leg and the router's routing policy, live (design.md 5a.2).

Through the relay a guarded device's TCP leaves as the router's own traffic, so a policy that
routes the device by packet mark (pbr, mwan3, a VPN kill switch) no longer sees it. A device's
`route_mark` goes with its upstream leg instead. Here the router routes mark 0x100 by table 100,
which holds a `prohibit` default (the VPN is down: nothing may leave), then an on-link route to
the cloud (the VPN is up). Every wait is bounded; the ip rules and the counter rule this test adds
are removed when it ends, failed or not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from hushsim.topology import WAN_IF, WAN_V4_NET, WAN_V6_NET, Topology
from tests.e2e.guardkit import MakeGuard, cloud_conn_since, device

QUEUE = 71  # this module's NFQUEUE number (other modules use their own)
MARK = 0x100
TABLE = "100"
PRIORITY = "1500"  # after the relay's own rule (900), like pbr's and mwan3's
SMART_HOME = "api.amazonalexa.com"  # relayed at once: no hold in the way
COUNTER = ["-m", "mark", "--mark", f"{MARK:#x}/{MARK:#x}", "-m", "comment", "--comment",
           "test-route-mark", "-j", "RETURN"]


@pytest.fixture
def kill_switch(topology: Topology) -> Iterator[dict[str, Any]]:
    """Mark 0x100 routes by table 100 (a prohibit default: the VPN is down), per family, and a
    mangle OUTPUT rule counts the router's own packets that carry the mark."""
    tools = {4: topology.iptables, 6: topology.ip6tables}
    try:
        for fam in (4, 6):
            topology.run("gw", "ip", f"-{fam}", "rule", "add", "fwmark", f"{MARK:#x}/{MARK:#x}",
                         "lookup", TABLE, "priority", PRIORITY)
            topology.run("gw", "ip", f"-{fam}", "route", "replace", "prohibit", "default",
                         "table", TABLE)
            topology.run("gw", tools[fam], "-t", "mangle", "-I", "OUTPUT", *COUNTER)
        yield {"tools": tools}
    finally:
        for fam in (4, 6):
            topology.run("gw", "ip", f"-{fam}", "rule", "del", "fwmark", f"{MARK:#x}/{MARK:#x}",
                         "lookup", TABLE, "priority", PRIORITY, check=False)
            topology.run("gw", "ip", f"-{fam}", "route", "flush", "table", TABLE, check=False)
            topology.run("gw", tools[fam], "-t", "mangle", "-D", "OUTPUT", *COUNTER, check=False)


def _marked_packets(topology: Topology, tool: str) -> int:
    out = topology.run("gw", tool, "-t", "mangle", "-L", "OUTPUT", "-v", "-n", "-x").stdout
    for line in out.splitlines():
        if "test-route-mark" in line:
            return int(line.split()[0])
    raise AssertionError(f"counter rule missing:\n{out}")


def _connect(topology: Topology, family: int) -> dict[str, Any]:
    return topology.run_speaker("echo", "--host", SMART_HOME, f"-{family}", "--max-seconds",
                                "10", "events", "--count", "1", timeout=20.0)


def _cloud_conns(topology: Topology, since: float) -> list[dict[str, Any]]:
    assert topology.cloud is not None
    return [c for c in topology.cloud.stats()["tcp"]
            if c["host"] == SMART_HOME and c["opened"] >= since]


@pytest.mark.parametrize("family", [4, 6])
def test_a_devices_route_mark_keeps_its_kill_switch_through_the_relay(
    topology: Topology, guards: MakeGuard, kill_switch: dict[str, Any], family: int
) -> None:
    tool = kill_switch["tools"][family]
    # Without route_mark the relayed leg leaves by the main table: the kill switch is bypassed.
    # This is what the relay did before route_mark existed (design.md 5a.2's warning).
    g = guards(tcp_hold="relay")
    since = time.time()
    res = _connect(topology, family)
    assert res["error"] is None and not res["reset"], res
    assert len(_cloud_conns(topology, since)) == 1
    g.stop()

    g = guards([device(topology, "echo", "strict", route_mark=MARK)], tcp_hold="relay")
    # The VPN is down: the marked upstream leg has no route, so the speaker's SYN is answered
    # as that path answers (design.md 5a.3): host unreachable, and nothing reaches the cloud.
    since = time.time()
    res = _connect(topology, family)
    assert res["error"] is not None and "no route to host" in res["error"].lower(), res
    time.sleep(0.3)
    assert _cloud_conns(topology, since) == []
    assert g.cli_json("status")["relay"]["syn_unreachable"] >= 1

    # The VPN is up (here an on-link route to the cloud in table 100): the leg goes that way,
    # carrying the mark (the router's OUTPUT counts it).
    net = WAN_V4_NET if family == 4 else WAN_V6_NET
    topology.run("gw", "ip", f"-{family}", "route", "flush", "table", TABLE)
    topology.run("gw", "ip", f"-{family}", "route", "add", net, "dev", WAN_IF, "table", TABLE)
    before = _marked_packets(topology, tool)
    since = time.time()
    res = _connect(topology, family)
    assert res["error"] is None and not res["reset"], res
    conn = cloud_conn_since(topology, SMART_HOME, since)
    assert conn["app_bytes"] == res["bytes_sent"] > 0
    assert _marked_packets(topology, tool) > before


def test_the_relayed_upstream_leg_advertises_the_mss_of_the_wan_route(
    topology: Topology, guards: MakeGuard
) -> None:
    """fw4 clamps a forwarded SYN's MSS to the WAN path (mtu_fix); the relay's upstream leg is
    the router's own socket, whose MSS the kernel takes from the route's MTU: a PPPoE-sized WAN
    (1492) gives 1452 without any clamp rule."""
    guards(tcp_hold="relay")
    import subprocess

    try:
        topology.run("gw", "ip", "link", "set", WAN_IF, "mtu", "1492")
        dump = subprocess.Popen(
            ["ip", "netns", "exec", topology.ns("wan"), "timeout", "15", "tcpdump", "-l", "-n",
             "-v", "-c", "1", "-i", "eth0", "tcp[tcpflags] & tcp-syn != 0 and dst port 443"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            time.sleep(1.0)  # tcpdump attached
            res = _connect(topology, 4)
            assert res["error"] is None and not res["reset"], res
            out, _ = dump.communicate(timeout=15)
        finally:
            if dump.poll() is None:
                dump.kill()
                dump.wait(timeout=5)
        assert "mss 1452" in out, out
    finally:
        topology.run("gw", "ip", "link", "set", WAN_IF, "mtu", "1500", check=False)
