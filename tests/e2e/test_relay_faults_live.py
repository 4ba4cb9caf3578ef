"""The stream hold's failure cases, live (issue 13 point 5, design.md 5): connections that predate
the guard are reset at their next packet and reconnect through the relay; a killed guard delivers
nothing it kept and its pending upload is logged `lost` after the restart; a stopped guard
(fail-closed) lets no guarded TCP out; with `fail = "open"` a stopped guard takes the
interception away. What left the house is read from the cloud's own counters."""

from __future__ import annotations

import time
from typing import Any

from hushsim.topology import Topology
from tests.e2e.guardkit import (
    Guard,
    MakeGuard,
    SpeakerRun,
    cloud_bytes_stay,
    cloud_conn_by_id,
    cloud_conn_since,
    record,
)

VOICE = "bob-dispatch-prod-na.amazon.com"
SMART_HOME = "api.amazonalexa.com"
QUEUE = 37  # this module's NFQUEUE number (other modules use their own)


def _relay_guard(guards: MakeGuard, **kw: Any) -> Guard:
    return guards(tcp_hold="relay", **kw)


def _connected(g: Guard, *args: str) -> tuple[SpeakerRun, dict[str, Any]]:
    since = time.time()
    sp = g.speaker("echo", "--host", VOICE, "-4", *args, wait_file=True)
    sp.ready(timeout_s=10.0)
    return sp, cloud_conn_since(g.topo, VOICE, since, handshake=True)


def test_a_connection_from_before_the_guard_is_reset_and_the_next_one_is_relayed(
    topology: Topology, guards: MakeGuard
) -> None:
    g = _relay_guard(guards, autostart=False)
    sp, conn = _connected(g, "--max-seconds", "20", "upload", "--profile", "echo-opus-118")
    assert conn["sni"] == VOICE  # connected straight to the cloud: no guard yet
    g.start()
    sp.go()
    result = sp.result(timeout_s=15.0)
    assert result["reset"], f"the old connection was not reset: {result}"
    time.sleep(0.3)
    assert cloud_conn_by_id(topology, conn["id"])["app_bytes"] == 0  # nothing of it left
    # the speaker reconnects: through the relay now, and its upload is held
    sp2, conn2 = _connected(g, "--max-seconds", "30", "upload", "--profile", "echo-opus-118")
    sp2.go()
    pend, _ = g.wait_pending(1, timeout_s=5.0)
    assert pend and pend[0]["device"] == "echo", pend
    cloud_bytes_stay(topology, conn2["id"], 0, 0.5, "held upload on the new connection")
    g.cli_ok("deny", str(pend[0]["id"]))
    assert sp2.result(timeout_s=10.0)["reset"]


def test_kill_9_during_a_hold_delivers_nothing_and_the_upload_is_logged_lost(
    topology: Topology, guards: MakeGuard
) -> None:
    g = _relay_guard(guards)
    sp, conn = _connected(g, "--hold-open", "5", "--max-seconds", "30", "upload", "--profile",
                          "echo-opus-118")
    sp.go()
    pend, _ = g.wait_pending(1, timeout_s=5.0)
    upload_id = pend[0]["id"]
    g.kill9()
    result = sp.result(timeout_s=10.0)
    assert result["reset"], f"the speaker was not told: {result}"
    time.sleep(0.5)
    assert cloud_conn_by_id(topology, conn["id"])["app_bytes"] == 0
    g.start()
    lost = g.wait_log(lambda r: r.get("outcome") == "lost")
    assert lost["id"] == upload_id, lost
    assert g.pending() == []
    # and the speaker's next connection works through the relay
    since = time.time()
    res = topology.run_speaker("echo", "--host", SMART_HOME, "-4", "--max-seconds", "15",
                               "events", "--count", "1", timeout=25.0)
    assert res["error"] is None and not res["reset"], res
    assert cloud_conn_since(topology, SMART_HOME, since)["app_bytes"] == res["bytes_sent"]


def test_a_stopped_guard_lets_no_guarded_tcp_out(topology: Topology,
                                                 guards: MakeGuard) -> None:
    g = _relay_guard(guards)
    g.stop()
    since = time.time()
    res = topology.run_speaker("echo", "--host", SMART_HOME, "-4", "--max-seconds", "3",
                               "events", "--count", "1", timeout=15.0)
    assert res["error"] is not None and res["bytes_sent"] == 0, res
    assert topology.cloud is not None
    assert [c for c in topology.cloud.stats()["tcp"] if c["opened"] >= since] == []


def test_fail_open_takes_the_interception_away_when_the_guard_stops(
    topology: Topology, guards: MakeGuard
) -> None:
    g = _relay_guard(guards, fail="open")
    assert g.cli_json("status")["fail_mode"] == "open"
    g.stop()
    since = time.time()
    started = time.monotonic()
    res = topology.run_speaker("echo", "--host", SMART_HOME, "-4", "--max-seconds", "15",
                               "events", "--count", "1", timeout=25.0)
    assert res["error"] is None and not res["reset"], res
    conn = cloud_conn_since(topology, SMART_HOME, since)
    assert conn["app_bytes"] == res["bytes_sent"]
    record("relay_fail_open", direct_after_stop_s=round(time.monotonic() - started, 3))
