"""The stream hold, live: a real `hushgate run` with `tcp_hold = "relay"` in the simulated home.

Guarded devices' TCP is intercepted by TPROXY and relayed by the guard; what left the house is
read from the cloud's own counters (through the relay the cloud sees the router's upstream socket,
so its connection is found by host and opening time, never by the speaker's port). Every wait is
bounded; processes are the Guard's and the speakers', killed by PID when the test ends.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from hushsim.topology import GW_LAN_V4, Topology
from tests.e2e.guardkit import (
    Guard,
    MakeGuard,
    SpeakerRun,
    cloud_bytes_stay,
    cloud_conn_by_id,
    cloud_conn_since,
    record,
    ruleset,
)

VOICE = "bob-dispatch-prod-na.amazon.com"
SMART_HOME = "api.amazonalexa.com"
MESSAGING = "alexa-comms-mobile-service.amazon.com"
QUEUE = 23  # this module's NFQUEUE number (other modules use their own)
RELAY_PORT = 7411
RESET_WITHIN_S = 0.2  # issue 13: deny resets the speaker within 0.2 s
PENDING_WITHIN_S = 1.0


def _relay_guard(guards: MakeGuard, **kw: Any) -> Guard:
    return guards(tcp_hold="relay", relay_port=RELAY_PORT, **kw)


def _connected_upload(g: Guard, *args: str) -> tuple[SpeakerRun, dict[str, Any]]:
    """A speaker connected through the relay to the voice host and waiting for `go()`; (the run,
    the cloud's record of the relay's upstream connection, with no application byte yet)."""
    since = time.time()
    sp = g.speaker("echo", "--host", VOICE, "-4", *args, wait_file=True)
    sp.ready(timeout_s=10.0)
    conn = cloud_conn_since(g.topo, VOICE, since, handshake=True)
    assert conn["app_bytes"] == 0, conn
    return sp, conn


def _cloud_conns_since(topology: Topology, host: str, since: float) -> list[dict[str, Any]]:
    assert topology.cloud is not None
    return [c for c in topology.cloud.stats()["tcp"] if c["host"] == host and c["opened"] >= since]


def test_relay_rules_installed_and_the_relay_port_is_not_reachable_directly(
    topology: Topology, guards: MakeGuard
) -> None:
    g = _relay_guard(guards)
    status = g.cli_json("status")
    assert status["tcp_hold"] == "relay" and status["relay"]["listening"], status
    rules = ruleset(topology)
    for fam in (4, 6):
        assert "-j TPROXY --on-port 7411" in rules[fam], rules[fam]
        assert "HUSHGATE_RELAYFWD" in rules[fam]
    ip_rules = topology.run("gw", "ip", "rule").stdout
    assert "lookup 7411" in ip_rules, ip_rules

    def direct() -> str:
        with socket.socket() as s:
            s.settimeout(1.0)
            try:
                s.connect((GW_LAN_V4, RELAY_PORT))
            except TimeoutError:
                return "timeout"
            except OSError as exc:
                return f"error {exc.errno}"
            return "connected"

    assert topology.call_in("echo", direct, timeout_s=5.0) == "timeout"


@pytest.mark.parametrize("family", [4, 6])
def test_smart_home_host_is_relayed_at_once(
    topology: Topology, guards: MakeGuard, family: int
) -> None:
    g = _relay_guard(guards)
    since = time.time()
    res = topology.run_speaker("echo", "--host", SMART_HOME, f"-{family}", "--max-seconds", "20",
                               "events", "--count", "2", timeout=30.0)
    assert res["error"] is None and not res["reset"], res
    conn = cloud_conn_since(topology, SMART_HOME, since)
    assert conn["family"] == family
    final = topology.cloud.wait_for(  # type: ignore[union-attr]
        lambda s: any(c["id"] == conn["id"] and c["sha256"] == res["sha256"] for c in s["tcp"]),
        timeout_s=5.0)
    assert next(c for c in final["tcp"] if c["id"] == conn["id"])["app_bytes"] == res["bytes_sent"]
    relay = g.cli_json("status")["relay"]
    assert relay["passed"] >= 1 and relay["bytes_up"] > 0 and relay["bytes_down"] > 0, relay
    assert g.pending() == []


def test_messaging_is_refused_before_any_byte_reaches_the_cloud(
    topology: Topology, guards: MakeGuard
) -> None:
    g = _relay_guard(guards)
    since = time.time()
    res = topology.run_speaker("echo", "--host", MESSAGING, "-4", "--max-seconds", "10",
                               "events", "--count", "1", timeout=20.0)
    assert res["error"] is not None or res["reset"], res
    assert res["bytes_sent"] == 0, res
    time.sleep(0.3)
    assert _cloud_conns_since(topology, MESSAGING, since) == []  # never even connected
    assert g.cli_json("status")["relay"]["rejected"] >= 1


def test_upload_is_pending_with_nothing_at_the_cloud_then_allow_delivers_every_byte(
    topology: Topology, guards: MakeGuard
) -> None:
    g = _relay_guard(guards)
    sp, conn = _connected_upload(g, "--max-seconds", "40", "upload", "--profile",
                                 "echo-opus-118")
    went = sp.go()
    pend, seen_at = g.wait_pending(1, timeout_s=5.0)
    assert len(pend) == 1 and pend[0]["device"] == "echo", pend
    cloud_bytes_stay(topology, conn["id"], 0, 1.0, "held upload")
    g.cli_ok("allow", str(pend[0]["id"]))
    result = sp.result(timeout_s=30.0)
    assert result["error"] is None and not result["reset"], result
    final = topology.cloud.wait_for(  # type: ignore[union-attr]
        lambda s: any(c["id"] == conn["id"] and c["sha256"] == result["sha256"]
                      for c in s["tcp"]), timeout_s=10.0)
    c = next(c for c in final["tcp"] if c["id"] == conn["id"])
    assert c["app_bytes"] == result["bytes_sent"] and c["upload_frames"] == 1, c
    assert result["acks"] == 1, result
    record("relay_allow", pending_after_go_s=round(seen_at - went, 3),
           held_bytes=pend[0]["held_bytes"], upload_bytes=result["bytes_sent"])
    assert seen_at - went <= PENDING_WITHIN_S + 0.2 + (g.cli_rtt_s or 0)  # + the go-file poll


def test_deny_resets_the_speaker_at_once_and_the_cloud_gets_nothing(
    topology: Topology, guards: MakeGuard
) -> None:
    g = _relay_guard(guards)
    sp, conn = _connected_upload(g, "--hold-open", "20", "--max-seconds", "30", "upload",
                                 "--profile", "echo-opus-118")
    sp.go()
    pend, _ = g.wait_pending(1, timeout_s=5.0)
    cloud_bytes_stay(topology, conn["id"], 0, 0.3, "before deny")
    denied_at = time.time()
    g.cli_ok("deny", str(pend[0]["id"]))
    result = sp.result(timeout_s=10.0)
    assert result["reset"], f"the speaker was not reset: {result}"
    reset_after = result["reset_at"] - denied_at
    record("relay_deny", reset_after_deny_s=round(reset_after, 3))
    # the speaker notices a reset within its poll (0.2 s); the CLI round trip is in there too
    assert 0 <= reset_after < RESET_WITHIN_S + 0.2 + (g.cli_rtt_s or 0), reset_after
    topology.cloud.wait_for(  # type: ignore[union-attr]
        lambda s: any(c["id"] == conn["id"] and c["closed"] for c in s["tcp"]), timeout_s=3.0)
    assert cloud_conn_by_id(topology, conn["id"])["app_bytes"] == 0
    assert g.pending() == []
    assert g.wait_log(lambda r: r.get("outcome") == "denied")["device"] == "echo"


def test_killed_guard_lets_nothing_through_and_a_restart_relays_again(
    topology: Topology, guards: MakeGuard
) -> None:
    g = _relay_guard(guards)
    g.kill9()
    since = time.time()
    res = topology.run_speaker("echo", "--host", SMART_HOME, "-4", "--max-seconds", "3",
                               "events", "--count", "1", timeout=15.0)
    assert res["error"] is not None and res["bytes_sent"] == 0, res
    assert _cloud_conns_since(topology, SMART_HOME, since) == []
    g.start()
    since = time.time()
    res = topology.run_speaker("echo", "--host", SMART_HOME, "-4", "--max-seconds", "20",
                               "events", "--count", "1", timeout=30.0)
    assert res["error"] is None and not res["reset"], res
    conn = cloud_conn_since(topology, SMART_HOME, since)
    topology.cloud.wait_for(  # type: ignore[union-attr]
        lambda s: any(c["id"] == conn["id"] and c["sha256"] == res["sha256"] for c in s["tcp"]),
        timeout_s=5.0)
