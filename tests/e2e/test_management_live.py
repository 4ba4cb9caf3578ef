"""Managing hushgate from the CLI, live (issue 15): a real `hushgate run` with the relay in the
simulated home; mutes lifted, always-rules revoked, blocked messaging attempts and true upload
sizes in `hushgate log`, a mode changed at run time.

What left the house is read from the cloud's own counters; through the relay the cloud sees the
router's upstream socket, so its connection is found by host and opening time. Every wait is
bounded; the guard and the speakers are killed by PID when the test ends (the `guards` fixture).
"""

from __future__ import annotations

import time
from typing import Any

from hushsim.topology import Topology
from tests.e2e.guardkit import (
    Guard,
    MakeGuard,
    SpeakerRun,
    cloud_conn_by_id,
    cloud_conn_since,
    record,
    ruleset,
)

QUEUE = 53  # this module's NFQUEUE number (other modules use their own)
RELAY_PORT = 7453
VOICE = "bob-dispatch-prod-na.amazon.com"
MESSAGING = "alexa-comms-mobile-service.amazon.com"


def _guard(guards: MakeGuard, **kw: Any) -> Guard:
    return guards(tcp_hold="relay", quic="block", relay_port=RELAY_PORT, **kw)


def _upload(g: Guard, *extra: str) -> tuple[SpeakerRun, dict[str, Any]]:
    """An Echo upload started now; (the run, the cloud's record of its connection)."""
    since = time.time()
    sp = g.speaker("echo", "--host", VOICE, "-4", "--max-seconds", "30", *extra, "upload",
                   "--profile", "echo-opus-118", wait_file=True)
    sp.ready(timeout_s=10.0)
    conn = cloud_conn_since(g.topo, VOICE, since, handshake=True)
    sp.go()
    return sp, conn


def _newest(g: Guard, **filters: str) -> list[dict[str, Any]]:
    args = [x for k, v in filters.items() for x in (f"--{k}", v)]
    return list(g.cli_json("log", *args))


def _wait_outcome(g: Guard, outcome: str, after: set[Any], timeout_s: float = 8.0
                  ) -> dict[str, Any]:
    """The first log entry with `outcome` that was not there before (ids in `after`)."""
    return g.wait_log(lambda r: r.get("outcome") == outcome and r.get("id") not in after,
                      timeout_s=timeout_s)


def _ids(g: Guard) -> set[Any]:
    return {r.get("id") for r in g.log()}


def test_a_mute_is_lifted_and_an_always_rule_revoked(topology: Topology,
                                                     guards: MakeGuard) -> None:
    g = _guard(guards)
    # muted: the upload is denied at once, logged quiet, nothing reaches the cloud
    out = g.cli_ok("deny", "--device", "echo", "--for", "1h").stdout
    assert "quiet window for echo" in out and "(1h)" in out, out
    before = _ids(g)
    sp, conn = _upload(g)
    quiet = _wait_outcome(g, "quiet", before)
    assert quiet["device"] == "echo" and quiet["via"] == "quiet"
    result = sp.result(timeout_s=15.0)
    assert result["reset"] or result["error"], result
    assert cloud_conn_by_id(topology, conn["id"])["app_bytes"] == 0
    [mute] = g.cli_json("rules", "list")
    assert mute["kind"] == "mute" and mute["duration_text"] == "1h"

    # lifted by an allow window of one second: the mute ends at once, and once the second is over
    # the next upload waits for a person (before the fix: still quiet)
    out = g.cli_ok("allow", "--device", "echo", "--for", "1s").stdout
    assert f"ended the mute {mute['id']}" in out, out
    time.sleep(1.2)
    assert g.cli_json("rules", "list") == []
    sp, conn = _upload(g)
    [pending], _ = g.wait_pending(1, timeout_s=5.0)
    # answered with an always-rule: it passes, and the next upload passes by the rule
    out = g.cli_ok("allow", str(pending["id"]), "--always").stdout
    assert "always, as a standing rule [r" in out, out
    assert not sp.result(timeout_s=20.0)["reset"]
    [rule] = g.cli_json("rules", "list", "--device", "echo")
    assert rule["kind"] == "always-allow" and rule["host"] == VOICE and rule["until"] is None
    before = _ids(g)
    sp, conn = _upload(g)
    by_rule = _wait_outcome(g, "rule", before)
    assert by_rule["via"] == "rule"
    assert not sp.result(timeout_s=20.0)["reset"]

    # revoked: the next upload waits for a person again
    out = g.cli_ok("rules", "revoke", rule["id"]).stdout
    assert out.startswith(f"revoked {rule['id']}: always-allow for echo"), out
    assert g.cli_json("rules", "list") == []
    again = g.cli("rules", "revoke", rule["id"])
    assert again.returncode == 1 and f"no active window or rule '{rule['id']}'" in again.stderr
    sp, conn = _upload(g)
    [pending], _ = g.wait_pending(1, timeout_s=5.0)

    # a mute while it waits, then `unmute`: mutes of the device listed, then none
    g.cli_ok("deny", str(pending["id"]))
    sp.result(timeout_s=10.0)
    g.cli_ok("deny", "--device", "echo", "--for", "2h")
    assert g.cli_ok("unmute", "--device", "echo").stdout.startswith("unmuted echo (ended w")
    sp, conn = _upload(g)
    [pending], _ = g.wait_pending(1, timeout_s=5.0)
    g.cli_ok("deny", str(pending["id"]))
    sp.result(timeout_s=10.0)
    devices = g.cli_json("devices")
    [echo] = [d for d in devices if d["name"] == "echo"]
    assert echo["uploads"] >= 5 and echo["mute_until"] is None and echo["online"], echo
    assert echo["counts_24h"].get("quiet") == 1 and echo["counts_24h"].get("rule") == 1, echo


def test_a_blocked_messaging_attempt_is_in_the_log_with_nothing_at_the_cloud(
        topology: Topology, guards: MakeGuard) -> None:
    g = _guard(guards)
    since = time.time()
    res = topology.run_speaker("echo", "--host", MESSAGING, "-4", "--max-seconds", "10",
                               "events", "--count", "1", timeout=20.0)
    assert res["bytes_sent"] == 0 and (res["error"] is not None or res["reset"]), res
    entry = g.wait_log(lambda r: r.get("outcome") == "blocked", timeout_s=5.0)
    assert entry["device"] == "echo" and entry["host"] == MESSAGING, entry
    assert entry["category"] == "messaging" and entry["bytes"] == 0 and entry["id"] is None
    assert entry["decided_at"] >= since - 1
    assert [r["host"] for r in _newest(g, outcome="blocked", text="comms")] == [MESSAGING]
    assert _newest(g, outcome="blocked", text="no-such-host") == []
    time.sleep(0.3)
    assert [c for c in topology.cloud.stats()["tcp"]  # type: ignore[union-attr]
            if c["host"] == MESSAGING and c["opened"] >= since] == []
    table = g.cli_ok("log", "--outcome", "blocked").stdout
    assert MESSAGING in table and "0 B, 1 attempt" in table and "blocked" in table, table
    [echo] = [d for d in g.cli_json("devices") if d["name"] == "echo"]
    assert echo["counts_24h"].get("blocked") == 1, echo


def test_the_log_size_of_an_allowed_upload_is_what_the_cloud_received(
        topology: Topology, guards: MakeGuard) -> None:
    """Issue 15: an upload the cloud received as 23,984 B was logged "10 pkt/10 KB": its size
    when it was decided, not what it sent after the allow."""
    g = _guard(guards)
    sp, conn = _upload(g)
    [pending], _ = g.wait_pending(1, timeout_s=5.0)
    g.cli_ok("allow", str(pending["id"]))
    result = sp.result(timeout_s=20.0)
    assert result["error"] is None and not result["reset"], result
    cloud = topology.cloud.wait_for(  # type: ignore[union-attr]
        lambda s: any(c["id"] == conn["id"] and c["sha256"] == result["sha256"]
                      for c in s["tcp"]), timeout_s=10.0)
    app_bytes = next(c for c in cloud["tcp"] if c["id"] == conn["id"])["app_bytes"]
    assert app_bytes == result["bytes_sent"]
    # the upload ends a second after its last record; its size is then written
    entry = g.wait_log(lambda r: r.get("id") == pending["id"]
                       and r["bytes"] >= app_bytes, timeout_s=8.0)
    overhead = entry["bytes"] - app_bytes
    record("management_true_size", cloud_app_bytes=app_bytes, log_bytes=entry["bytes"],
           log_records=entry["packets"], record_overhead=result["record_overhead"],
           cloud_tcp_bytes=cloud_conn_by_id(topology, conn["id"])["tcp_bytes_received"],
           held_bytes_at_decision=pending["held_bytes"])
    # every byte the speaker wrote is in one of the upload's TLS records, and each record adds
    # exactly its framing (the cipher the handshake chose: with TLS 1.2 AES-GCM a 5-byte header,
    # an 8-byte explicit nonce and a 16-byte tag): the logged size is the cloud's count plus
    # that, record for record; the handshake (before the upload) is not in it
    assert entry["packets"] == result["records"], (entry, result)
    assert overhead == result["record_overhead"] * entry["packets"], (entry, app_bytes, result)
    assert entry["bytes"] == result["wire_bytes"]
    assert entry["bytes"] > pending["held_bytes"]  # not the size when it was decided
    table = g.cli_ok("log", "--device", "echo").stdout
    assert f"{entry['packets']} pkt/" in table


def test_a_mode_changed_at_run_time_applies_at_once_and_survives_a_restart(
        topology: Topology, guards: MakeGuard) -> None:
    g = _guard(guards)
    out = g.cli_ok("mode", "--device", "echo", "monitor").stdout
    assert "mode monitor (the config file says strict" in out, out
    [echo] = g.cli_json("status")["devices"]
    assert echo["mode"] == "monitor" and echo["mode_overridden"], echo
    rules = ruleset(topology)  # the kernel follows: the echo is no longer relayed
    assert all("-j HUSHGATE_RELAY" not in rules[fam] for fam in (4, 6)), rules
    before = _ids(g)
    sp, conn = _upload(g)
    monitored = _wait_outcome(g, "monitored", before)
    result = sp.result(timeout_s=20.0)
    assert result["error"] is None and not result["reset"], result
    assert g.pending() == []
    # monitored on the queue (not relayed): the logged size is the TCP payload the cloud got
    cloud = topology.cloud.wait_for(  # type: ignore[union-attr]
        lambda s: any(c["id"] == conn["id"] and c["sha256"] == result["sha256"]
                      for c in s["tcp"]), timeout_s=10.0)
    app_bytes = next(c for c in cloud["tcp"] if c["id"] == conn["id"])["app_bytes"]
    entry = g.wait_log(lambda r: r.get("id") == monitored["id"] and r["bytes"] >= app_bytes,
                       timeout_s=8.0)
    tcp_bytes = cloud_conn_by_id(topology, conn["id"])["tcp_bytes_received"]
    record("management_monitor_size", cloud_app_bytes=app_bytes, log_bytes=entry["bytes"],
           log_packets=entry["packets"], speaker_wire_bytes=result["wire_bytes"],
           cloud_tcp_bytes=tcp_bytes)
    # on the queue the engine counts TCP payload: every TLS record of the upload, within what
    # the cloud's socket received in all (which adds the handshake before it)
    assert result["wire_bytes"] <= entry["bytes"] <= tcp_bytes, (entry, result, tcp_bytes)
    g.restart()
    [echo] = g.cli_json("status")["devices"]
    assert echo["mode"] == "monitor" and echo["mode_overridden"], echo
    g.cli_ok("mode", "--device", "echo", "config")
    [echo] = g.cli_json("status")["devices"]
    assert echo["mode"] == "strict" and not echo["mode_overridden"], echo
    sp, conn = _upload(g)
    [pending], _ = g.wait_pending(1, timeout_s=5.0)  # relayed and held again
    g.cli_ok("deny", str(pending["id"]))
    sp.result(timeout_s=10.0)
