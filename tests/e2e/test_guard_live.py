"""The real `hushgate run` in the simulated home: the issue's acceptance, end to end.

Every test starts a fresh daemon in the router namespace (tests/e2e/guardkit.py) of one module-wide
topology, drives the speaker simulator, and reads what left the house from the cloud's own
counters. Timings are measured against the same clock (time.time() in every process); measured
numbers are printed and appended to artifacts/e2e-guard-live.jsonl. A CLI poll costs one round
trip (~0.07 s), reported as `cli_rtt_s`: "pending within 1 s" allows exactly that much for the
observer.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hushsim import profiles, quic
from hushsim.topology import GW_LAN_V4, Topology
from tests.e2e.guardkit import (
    POLL_S,
    Guard,
    MakeGuard,
    SpeakerRun,
    cloud_bytes_stay,
    cloud_conn,
    cloud_conn_by_id,
    cloud_conn_since,
    device,
    hushgate_rules,
    queue_counters,
    record,
    ruleset,
    udp_flow,
)

VOICE = "bob-dispatch-prod-na.amazon.com"
SMART_HOME = "api.amazonalexa.com"
MESSAGING = "alexa-comms-mobile-service.amazon.com"
MEDIA = "amzdigital-a.akamaihd.net"
APPLE_VOICE = "guzzoni.apple.com"
GOOGLE_VOICE = "embeddedassistant.googleapis.com"
QUEUE = 11  # this module's NFQUEUE number (other modules use their own)

PENDING_WITHIN_S = 1.0  # an upload is pending within 1 s of its start (issue acceptance)
RESET_WITHIN_S = 1.0  # a deny resets the speaker within 1 s
BLOCK_WITHIN_S = 0.5  # a messaging connection is refused at once
RELEASE_WITHIN_S = 1.0  # a non-audio burst reaches the cloud within 1 s
RTT_P99_MARGIN_MS = 5.0
THROUGHPUT_RATIO = 0.90
MEASURE_ROUNDS = 5  # speed comparisons are repeated only while they fail
# kernel-facts.md: with the connmark fast path a bulk flow showed 83 packets in userspace in 10 s
# (about 20 per direction before the mark); allowed-at-SNI flows should need even fewer.
MAX_QUEUED_PER_FAST_FLOW = 100
DOWNLOAD_BYTES = 300_000_000  # ~1.4 s at the ~1.7 Gbit/s these namespaces forward TLS at
INITIAL_BYTES = len(quic.build_initial(GOOGLE_VOICE, bytes(8), bytes(8)))  # 1,200: RFC 9000 14.1

CAPTURES = profiles.default_captures_dir()
CAPTURE_PROFILE = "capture:sean_kennedy__flip_a_coin_5_30s#1"





# --- helpers -----------------------------------------------------------------------------------


def _remote(topology: Topology, host: str, family: int, port: int = 443) -> set[str]:
    addr = topology.hosts[host][0 if family == 4 else 1]
    return {f"{addr}:{port}", f"[{addr}]:{port}"}


def _connected_speaker(
    g: Guard, host: str, *args: str, remote_host: str = VOICE
) -> tuple[SpeakerRun, dict[str, Any]]:
    """A speaker that connects, then waits for `go()`; (the run, the cloud's record of its
    connection at setup, when the cloud has received no application byte yet). Found by host
    and opening time, which also holds through the relay (the cloud sees the router's socket)."""
    since = time.time()
    sp = g.speaker(host, *args, wait_file=True)
    sp.ready(timeout_s=10.0)
    conn = cloud_conn_since(g.topo, remote_host, since, handshake=True)
    assert conn["handshake_done"] and conn["app_bytes"] == 0, conn
    return sp, conn


def _check_pending_entry(
    topology: Topology, up: dict[str, Any], dev: str, host: str | None, family: int
) -> None:
    assert up["device"] == dev, up
    assert up["remote"] in _remote(topology, VOICE if host is None else host, family), up
    if host is not None:
        assert up["host"] == host and up["category"] == "voice", up
    assert up["held_packets"] > 0 and up["held_bytes"] > 0, up
    assert up["expires"] > up["started"], up


def _allow_and_check_delivery(
    topology: Topology,
    g: Guard,
    sp: SpeakerRun,
    conn: dict[str, Any],
    *,
    test: str,
    family: int,
    host: str | None = VOICE,
    uploads: int = 1,
) -> dict[str, Any]:
    """The shared core of the strict tests: go, pending within 1 s with 0 bytes at the cloud,
    allow (each of `uploads` uploads on the connection), then every byte arrived in order."""
    sp.go()
    pend, seen_at = g.wait_pending(1, timeout_s=4.0)
    assert len(pend) == 1, pend
    up = pend[0]
    _check_pending_entry(topology, up, "echo", host, family)
    cloud_bytes_stay(topology, conn["id"], 0, 0.5, "first upload")
    g.cli_ok("allow", str(up["id"]))
    delivered_before: list[int] = []
    decided = {up["id"]}
    for k in range(1, uploads):
        # The next upload on the same (TLS) connection is held again: strict = every upload.
        pend2, _ = g.wait_pending(1, timeout_s=10.0, exclude=decided)
        up2 = pend2[0]
        assert up2["remote"] == up["remote"], (up, up2)
        c = cloud_conn_by_id(topology, conn["id"])
        cloud_bytes_stay(topology, conn["id"], c["app_bytes"], 0.3, f"upload {k + 1}")
        delivered_before.append(c["app_bytes"])
        g.cli_ok("allow", str(up2["id"]))
        decided.add(up2["id"])
    result = sp.result(timeout_s=30.0)
    assert result["error"] is None and not result["reset"], result
    latency = seen_at - result["uploads"][0]["start"]
    record(test, pending_after_s=round(latency, 3), cli_rtt_s=round(g.cli_rtt_s or 0, 3),
           held_packets=up["held_packets"], held_bytes=up["held_bytes"],
           upload_bytes=result["bytes_sent"])  # fmt: skip
    assert latency <= PENDING_WITHIN_S + (g.cli_rtt_s or 0), f"pending after {latency:.3f} s"
    # Every byte, in order: the cloud's hash of the connection is the speaker's.
    final = topology.cloud.wait_for(  # type: ignore[union-attr]
        lambda s: any(c["id"] == conn["id"] and c["sha256"] == result["sha256"] for c in s["tcp"]),
        timeout_s=5.0,
    )
    c = next(c for c in final["tcp"] if c["id"] == conn["id"])
    assert c["app_bytes"] == result["bytes_sent"]
    assert c["upload_frames"] == uploads
    # The session went on after the allow: the cloud's ack of every upload came back.
    assert result["acks"] == uploads, result
    # While upload k+1 was held the cloud had exactly uploads 1..k.
    for k, got in enumerate(delivered_before, start=1):
        assert got == sum(u["plaintext_bytes"] for u in result["uploads"][:k])
    return result


def _voice_upload_args() -> tuple[list[str], list[str]]:
    """(global args, upload args): a real capture's upload when ../shared/captures is there."""
    if CAPTURES is not None:
        return ["--captures", str(CAPTURES)], ["--profile", CAPTURE_PROFILE]
    return [], ["--profile", "echo-opus-118"]


def _stable_queue_counters(topology: Topology, timeout_s: float = 5.0) -> dict[str, int]:
    """Queue counters once two reads 0.3 s apart agree (leftover retransmissions die down)."""
    prev = queue_counters(topology)
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.3) + 1):
        time.sleep(0.3)
        cur = queue_counters(topology)
        if cur == prev or time.monotonic() >= deadline:
            return cur
        prev = cur
    return prev


# --- tests -------------------------------------------------------------------------------------


def test_unconfigured_lan_hosts_packets_never_reach_the_queue(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards()
    rules = "\n".join(ruleset(topology).values())
    assert "NFQUEUE" in rules, "the guard installed no queue rule"
    # Positive control: the configured echo's packets are counted by the queue rules.
    before = _stable_queue_counters(topology)
    res = topology.run_speaker("echo", "--host", VOICE, "-4", "events", "--count", "1")
    assert res["error"] is None, res
    after_echo = queue_counters(topology)
    assert sum(after_echo.values()) > sum(before.values()), (before, after_echo)
    # The unguarded LAN host: TCP over both families to the voice host, QUIC to Google, media.
    base = _stable_queue_counters(topology)
    runs = [
        g.speaker("lan", "--host", VOICE, "-4", "events", "--count", "1"),
        g.speaker("lan", "--host", VOICE, "-6", "events", "--count", "1"),
        g.speaker("lan", "--host", GOOGLE_VOICE, "-4", "quic-upload"),
        g.speaker("lan", "--host", MEDIA, "-6", "download", "5000000"),
    ]
    results = [sp.result(timeout_s=20.0) for sp in runs]
    for r in results:
        assert r["error"] is None, r
    after = queue_counters(topology)
    record("unconfigured_host", queue_packets_before=sum(base.values()),
           queue_packets_after=sum(after.values()),
           echo_packets_queued=sum(after_echo.values()) - sum(before.values()))  # fmt: skip
    assert after == base, f"the unguarded host's packets reached the queue: {base} -> {after}"


def test_strict_upload_is_held_then_allowed_intact_ipv4(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards()
    glob, up_args = _voice_upload_args()
    sp, conn = _connected_speaker(
        g, "echo", "--host", VOICE, "-4", *glob, "--max-seconds", "45",
        "upload", *up_args, "--count", "2", "--gap", "1.5",
    )  # fmt: skip
    result = _allow_and_check_delivery(
        topology, g, sp, conn, test="strict_ipv4", family=4, uploads=2
    )
    if CAPTURES is not None:
        assert result["uploads"][0]["profile"] == CAPTURE_PROFILE
    assert g.pending() == []
    log = g.log()
    assert sum(1 for r in log if r.get("outcome") == "approved") == 2, log


def test_strict_upload_is_held_then_allowed_intact_ipv6(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards()
    sp, conn = _connected_speaker(
        g, "echo", "--host", VOICE, "-6", "--max-seconds", "30", "upload", "--profile",
        "echo-opus-118",
    )  # fmt: skip
    assert conn["family"] == 6
    _allow_and_check_delivery(topology, g, sp, conn, test="strict_ipv6", family=6)


def test_strict_quic_upload_is_held_then_allowed_intact(
    topology: Topology, guards: MakeGuard
) -> None:
    assert topology.cloud is not None
    g = guards([device(topology, "nest", quic="hold")])
    sp = g.speaker("nest", "--host", GOOGLE_VOICE, "-4", "--max-seconds", "30", "quic-upload")
    pend, seen_at = g.wait_pending(1, timeout_s=4.0)
    up = pend[0]
    assert up["device"] == "nest" and up["remote"] in _remote(topology, GOOGLE_VOICE, 4), up
    assert up["held_packets"] > 0, up

    def data_datagrams() -> int:
        assert topology.cloud is not None
        flows = [f for f in topology.cloud.stats()["udp"] if f["host"] == GOOGLE_VOICE]
        flow = max(flows, key=lambda f: f["id"]) if flows else None
        if flow is None:
            return 0
        return flow["datagrams"] - sum(1 for s in flow["sizes_head"] if s == INITIAL_BYTES)

    end = time.monotonic() + 1.0
    for _ in range(40):
        assert data_datagrams() == 0, "the cloud received datagrams of the held QUIC upload"
        if time.monotonic() >= end:
            break
        time.sleep(0.05)
    g.cli_ok("allow", str(up["id"]))
    result = sp.result(timeout_s=30.0)
    assert result["error"] is None and not result["refused"], result
    latency = seen_at - result["uploads"][0]["start"]
    flow = udp_flow(topology, result["local"], GOOGLE_VOICE)
    assert flow is not None
    record("strict_quic", pending_after_s=round(latency, 3), cli_rtt_s=round(g.cli_rtt_s or 0, 3),
           held_packets=up["held_packets"], datagrams_sent=result["records"],
           datagrams_received=flow["datagrams"])  # fmt: skip
    assert latency <= PENDING_WITHIN_S + (g.cli_rtt_s or 0), f"pending after {latency:.3f} s"
    # Everything the speaker sent arrived, in order (same hash), after the allow.
    assert flow["datagrams"] == result["records"], (flow, result)
    assert flow["bytes"] == result["bytes_sent"] and flow["sha256"] == result["sha256"]


def test_upload_on_connection_opened_before_the_guard_started_is_held(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards(autostart=False)
    sp, conn = _connected_speaker(
        g, "echo", "--host", VOICE, "-4", "--max-seconds", "40", "upload", "--profile",
        "echo-opus-118",
    )  # fmt: skip
    g.start()  # the connection (and its DNS lookup and TLS handshake) predates the guard
    _allow_and_check_delivery(topology, g, sp, conn, test="strict_preexisting", family=4, host=None)


def test_event_burst_on_the_voice_connection_passes_without_prompt(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards()
    sp = g.speaker(
        "echo", "--host", VOICE, "-4", "--max-seconds", "20", "events", "--count", "2",
        "--gap", "1.5",
    )  # fmt: skip
    deadline = time.monotonic() + 15.0
    for _ in range(1000):
        assert g.pending() == [], "a non-audio event burst raised a prompt"
        if sp.done or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)  # a poll is a control request (ms): the deadline bounds the loop
    result = sp.result(timeout_s=5.0)
    assert result["error"] is None and not result["reset"], result
    assert result["acks"] == 2, result
    conn = cloud_conn(topology, result["local"], VOICE)
    conn = cloud_conn_by_id(topology, conn["id"])
    assert conn["sha256"] == result["sha256"]
    timeline = conn["timeline"]
    delays, total = [], 0
    for burst in result["uploads"]:
        total += burst["plaintext_bytes"]
        arrived = next(t for t, n in timeline if n >= total)
        delays.append(round(arrived - burst["start"], 3))
    record("event_burst", release_delay_s=delays)
    assert max(delays) < RELEASE_WITHIN_S, delays
    log = g.log()
    assert [r for r in log if r.get("outcome")] == [], f"an event burst was logged: {log}"


def test_deny_resets_the_speaker_at_once_and_nothing_leaks(
    topology: Topology, guards: MakeGuard
) -> None:
    assert topology.cloud is not None
    g = guards()
    sp, conn = _connected_speaker(
        g, "echo", "--host", VOICE, "-4", "--hold-open", "20", "--max-seconds", "30",
        "upload", "--profile", "echo-opus-118",
    )  # fmt: skip
    sp.go()
    pend, _ = g.wait_pending(1, timeout_s=4.0)
    up = pend[0]
    cloud_bytes_stay(topology, conn["id"], 0, 0.3, "before deny")
    denied_at = time.time()
    g.cli_ok("deny", str(up["id"]))
    result = sp.result(timeout_s=10.0)
    assert result["reset"], f"the speaker was not reset: {result}"
    reset_after = result["reset_at"] - denied_at
    record("deny", reset_after_deny_s=round(reset_after, 3))
    assert 0 <= reset_after < RESET_WITHIN_S, reset_after
    # The reset reached the cloud too (both ends), and not one byte of the upload did.
    topology.cloud.wait_for(
        lambda s: any(c["id"] == conn["id"] and c["closed"] for c in s["tcp"]), timeout_s=3.0
    )
    assert cloud_conn_by_id(topology, conn["id"])["app_bytes"] == 0
    assert g.pending() == []
    rec = g.wait_log(lambda r: r.get("outcome") == "denied")
    assert rec["device"] == "echo", rec


def test_unanswered_upload_expires_as_deny(topology: Topology, guards: MakeGuard) -> None:
    assert topology.cloud is not None
    g = guards(hold_timeout_s=3)
    sp, conn = _connected_speaker(
        g, "echo", "--host", VOICE, "-4", "--hold-open", "20", "--max-seconds", "30",
        "upload", "--profile", "echo-opus-118",
    )  # fmt: skip
    sp.go()
    pend, _ = g.wait_pending(1, timeout_s=4.0)
    up = pend[0]
    assert abs(up["expires"] - up["started"] - 3.0) < 0.5, up
    result = sp.result(timeout_s=15.0)
    assert result["reset"], f"the expired upload's connection was not reset: {result}"
    after_expiry = result["reset_at"] - up["expires"]
    since_start = result["reset_at"] - result["uploads"][0]["start"]
    record("expiry", hold_timeout_s=3, reset_after_expiry_s=round(after_expiry, 3),
           reset_after_upload_start_s=round(since_start, 3))  # fmt: skip
    assert -0.3 <= after_expiry < RESET_WITHIN_S, after_expiry
    assert cloud_conn_by_id(topology, conn["id"])["app_bytes"] == 0
    rec = g.wait_log(lambda r: r.get("outcome") == "expired")
    assert rec["device"] == "echo", rec
    assert not [r for r in g.log() if r.get("outcome") in ("denied", "approved")]


def test_smart_home_and_media_run_at_full_speed_while_an_upload_is_held(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards(hold_timeout_s=40)
    sp, conn = _connected_speaker(
        g, "echo", "--host", VOICE, "-4", "--hold-open", "30", "--max-seconds", "60",
        "upload", "--profile", "echo-opus-118",
    )  # fmt: skip
    sp.go()
    pend, _ = g.wait_pending(1, timeout_s=4.0)
    held = pend[0]

    def rtt(host: str) -> dict[str, Any]:
        r = topology.run_speaker(host, "--host", SMART_HOME, "-4", "rtt", "100", timeout=30)
        assert r["error"] is None and r["rtt_ms"]["n"] == 100, r
        return dict(r["rtt_ms"])

    def download(host: str) -> float:
        r = topology.run_speaker(host, "--host", MEDIA, "-4", "download", str(DOWNLOAD_BYTES),
                                 timeout=30)  # fmt: skip
        assert r["error"] is None and r["download"]["bytes"] == DOWNLOAD_BYTES, r
        return float(r["download"]["mbit_s"])

    # Alternate unguarded and guarded runs; more rounds (up to MEASURE_ROUNDS) only while the
    # comparison fails: this 2-vCPU box has millisecond hiccups, and throughput on it is
    # bimodal (1.3 or 2.6-3.1 Gbit/s between identical runs of either host, by where the
    # scheduler puts the two ends). Both sides get the same tries. Latency is compared best to
    # best (the best p99 of each side); throughput round by round (a guarded download against
    # the unguarded one just before it), so that one lucky unguarded run (4.7 against 2.0-2.5
    # Gbit/s in its other rounds, seen in CI) cannot fail every round after it. That the media
    # flow runs in the kernel is checked separately, by the packets it sent to userspace.
    rtt_free: list[dict[str, Any]] = []
    rtt_echo: list[dict[str, Any]] = []
    for _ in range(MEASURE_ROUNDS):
        rtt_free.append(rtt("lan"))
        rtt_echo.append(rtt("echo"))
        if min(r["p99"] for r in rtt_echo) <= min(r["p99"] for r in rtt_free) + RTT_P99_MARGIN_MS:
            break
    dl_free: list[float] = []
    dl_echo: list[float] = []
    queued: list[int] = []
    for _ in range(MEASURE_ROUNDS):
        dl_free.append(download("lan"))
        before = sum(queue_counters(topology).values())
        dl_echo.append(download("echo"))
        queued.append(sum(queue_counters(topology).values()) - before)
        if dl_echo[-1] >= THROUGHPUT_RATIO * dl_free[-1]:
            break
    p99_free = min(r["p99"] for r in rtt_free)
    p99_echo = min(r["p99"] for r in rtt_echo)
    record("while_held", rtt_unguarded_ms=rtt_free, rtt_guarded_ms=rtt_echo,
           download_unguarded_mbit_s=dl_free, download_guarded_mbit_s=dl_echo,
           download_bytes=DOWNLOAD_BYTES, download_packets_queued=queued)  # fmt: skip
    # The upload stayed held the whole time and leaked nothing.
    assert [p["id"] for p in g.pending()] == [held["id"]]
    assert cloud_conn_by_id(topology, conn["id"])["app_bytes"] == 0
    assert p99_echo <= p99_free + RTT_P99_MARGIN_MS, (
        f"smart-home p99 {p99_echo} ms vs unguarded {p99_free} ms"
    )
    assert any(e >= THROUGHPUT_RATIO * f for f, e in zip(dl_free, dl_echo, strict=True)), (
        f"media {dl_echo} Mbit/s vs unguarded {dl_free} Mbit/s, round by round"
    )
    # Kernel speed by construction: a 300 MB download is ~200,000 packets; the fast path leaves
    # only its first few (handshake, SNI, request) to userspace.
    assert max(queued) <= MAX_QUEUED_PER_FAST_FLOW, f"packets queued per download: {queued}"
    g.cli_ok("deny", str(held["id"]))
    final = sp.result(timeout_s=10.0)
    assert final["reset"], final


def test_messaging_connection_is_rejected_at_once(topology: Topology, guards: MakeGuard) -> None:
    assert topology.cloud is not None
    g = guards()
    before = {c["id"] for c in topology.cloud.stats()["tcp"]}
    result = topology.run_speaker(
        "echo", "--host", MESSAGING, "-4", "--max-seconds", "5", "events", "--count", "1"
    )
    elapsed = result["ended_at"] - result["started_at"]
    error = (result["error"] or "").lower()
    record("messaging_block", rejected_after_s=round(elapsed, 3), outcome=result["error"]
           or ("reset" if result["reset"] else "ok"))  # fmt: skip
    assert result["reset"] or "refused" in error or "reset" in error, result
    assert elapsed < BLOCK_WITHIN_S, f"rejected after {elapsed:.3f} s"
    time.sleep(0.3)  # anything in flight would have arrived by now
    new = [c for c in topology.cloud.stats()["tcp"] if c["id"] not in before]
    leaked = [c for c in new if c["host"] == MESSAGING and c["app_bytes"] > 0]
    assert leaked == [], leaked
    assert g.pending() == []


@pytest.mark.parametrize("tcp_hold", ["relay", "packet"])
def test_followups_mode_passes_a_first_turn_and_holds_a_follow_up(
    topology: Topology, guards: MakeGuard, tcp_hold: str
) -> None:
    g = guards([device(topology, "echo", mode="followups")], tcp_hold=tcp_hold)
    sp, conn = _connected_speaker(
        g, "echo", "--host", VOICE, "-4", "--hold-open", "20", "--max-seconds", "40", "upload",
        "--profile", "echo-opus-118", "--count", "2", "--gap", "3",
    )  # fmt: skip
    went = sp.go()
    # Turn 1: nothing is ever pending, and the cloud gets the whole upload.
    deadline = time.monotonic() + 10.0
    first: dict[str, Any] = {}
    for _ in range(1000):
        pend = g.pending()
        first = cloud_conn_by_id(topology, conn["id"])
        assert pend == [], (
            f"the first turn was held {time.time() - went:.2f} s after it started, with "
            f"{first['app_bytes']} bytes at the cloud: {pend}; log: {g.log()}"
        )
        if first["upload_frames"] >= 1 or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    assert first["upload_frames"] == 1, "the first turn did not reach the cloud in 10 s"
    turn1_bytes = first["app_bytes"]
    # Turn 2, ~3 s later: held.
    pend, _ = g.wait_pending(1, timeout_s=8.0)
    cloud_bytes_stay(topology, conn["id"], turn1_bytes, 0.5, "follow-up turn")
    g.cli_ok("deny", str(pend[0]["id"]))
    result = sp.result(timeout_s=10.0)
    assert result["reset"], result
    u1, u2 = result["uploads"]
    gap = u2["start"] - u1["end"]
    record("followups", turn_gap_s=round(gap, 3), first_turn_bytes=turn1_bytes)
    assert 2.5 < gap < 4.5, f"the follow-up started {gap:.2f} s after the first turn"
    assert turn1_bytes == u1["plaintext_bytes"]  # all of turn 1, none of turn 2
    assert cloud_conn_by_id(topology, conn["id"])["app_bytes"] == turn1_bytes


def test_kill_9_during_a_hold_leaks_nothing_and_restart_resets_it_as_lost(
    topology: Topology, guards: MakeGuard
) -> None:
    assert topology.cloud is not None
    g = guards([device(topology, "echo"), device(topology, "homepod")])
    # A decision made before the crash: the HomePod may talk for 30 minutes.
    g.cli_ok("allow", "--device", "homepod", "--for", "30m")
    sp, conn = _connected_speaker(
        g, "echo", "--host", VOICE, "-4", "--hold-open", "30", "--max-seconds", "45",
        "upload", "--profile", "echo-opus-118",
    )  # fmt: skip
    sp.go()
    pend, _ = g.wait_pending(1, timeout_s=4.0)
    lost_id = pend[0]["id"]
    g.kill9()
    cloud_bytes_stay(topology, conn["id"], 0, 1.0, "after kill -9")
    restarted_at = time.time()
    g.start()
    result = sp.result(timeout_s=25.0)  # the next retransmission after the restart is reset
    assert result["reset"], f"the lost upload's connection was not reset: {result}"
    record("kill9_restart", reset_after_restart_s=round(result["reset_at"] - restarted_at, 3))
    assert result["reset_at"] >= restarted_at
    assert cloud_conn_by_id(topology, conn["id"])["app_bytes"] == 0
    rec = g.wait_log(lambda r: r.get("outcome") == "lost")
    assert rec["device"] == "echo", rec
    assert all(p["id"] != lost_id for p in g.pending())
    # The allow window survived the crash: a HomePod upload passes with no prompt.
    sp2 = g.speaker("homepod", "--host", APPLE_VOICE, "-4", "--max-seconds", "20", "upload",
                    "--profile", "echo-opus-118")  # fmt: skip
    deadline = time.monotonic() + 15.0
    for _ in range(1000):
        assert g.pending() == [], "the allow window was lost in the crash"
        if sp2.done or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    r2 = sp2.result(timeout_s=5.0)
    assert r2["error"] is None and not r2["reset"] and r2["acks"] == 1, r2
    c2 = cloud_conn(topology, r2["local"], APPLE_VOICE)
    assert c2["sha256"] == r2["sha256"]
    rec2 = g.wait_log(lambda r: r.get("device") == "homepod")
    assert rec2["outcome"] == "window", rec2


def test_fail_open_lets_traffic_pass_when_the_guard_is_stopped(
    topology: Topology, guards: MakeGuard
) -> None:
    assert topology.cloud is not None
    g = guards(fail="open")
    assert g.cli_json("status")["fail_mode"] == "open"
    assert g.stop() == 0
    res = topology.run_speaker("echo", "--host", VOICE, "-4", "--max-seconds", "10",
                               "events", "--count", "1")  # fmt: skip
    assert res["error"] is None and res["acks"] == 1, res
    assert cloud_conn(topology, res["local"], VOICE)["sha256"] == res["sha256"]
    assert hushgate_rules(topology) == [], "fail = open: `run` removes all of its rules on exit"


def test_fail_closed_keeps_the_safety_net_until_firewall_remove(
    topology: Topology, guards: MakeGuard
) -> None:
    assert topology.cloud is not None
    g = guards(fail="closed")
    assert g.cli_json("status")["fail_mode"] == "closed"
    assert g.stop() == 0
    left = hushgate_rules(topology)
    assert any("-j DROP" in line for line in left), f"no safety net after SIGTERM: {left}"
    assert not any("NFQUEUE" in line for line in left), f"queue rules left: {left}"
    before = {c["id"] for c in topology.cloud.stats()["tcp"]}
    blocked = [
        g.speaker("echo", "--host", VOICE, f"-{fam}", "--max-seconds", "2", "events",
                  "--count", "1")
        for fam in (4, 6)
    ]  # fmt: skip
    free = g.speaker("lan", "--host", VOICE, "-4", "--max-seconds", "10", "events", "--count", "1")
    assert free.result(timeout_s=10.0)["error"] is None  # other hosts are not affected
    for sp in blocked:
        r = sp.result(timeout_s=10.0)
        assert r["error"] is not None and r["connected_at"] is None, r
    free_port = free.result()["local"].rsplit(":", 1)[1]
    new = [c for c in topology.cloud.stats()["tcp"] if c["id"] not in before]
    assert [c["peer"].rsplit(":", 1)[1] for c in new] == [free_port], (
        f"the cloud saw connections from the stopped guard's device: {new}"
    )
    # `hushgate firewall remove` takes everything away, both families.
    g.cli_ok("firewall", "remove", "--config", str(g.config_path), socket=False)
    assert hushgate_rules(topology) == []
    res = topology.run_speaker("echo", "--host", VOICE, "-6", "--max-seconds", "10",
                               "events", "--count", "1")  # fmt: skip
    assert res["error"] is None, res


def test_run_exits_cleanly_on_sigterm_without_releasing_a_held_upload(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards()
    sp, conn = _connected_speaker(
        g, "echo", "--host", VOICE, "-4", "--max-seconds", "20", "upload", "--profile",
        "echo-opus-118",
    )  # fmt: skip
    sp.go()
    g.wait_pending(1, timeout_s=4.0)
    t0 = time.monotonic()
    rc = g.stop(signal.SIGTERM, timeout_s=10.0)
    record("sigterm", exit_code=rc, exit_after_s=round(time.monotonic() - t0, 3))
    assert rc == 0, g.log_tail()
    cloud_bytes_stay(topology, conn["id"], 0, 1.0, "after SIGTERM")
    left = hushgate_rules(topology)
    assert not any("NFQUEUE" in line for line in left), f"queue rules left: {left}"
    assert any("-j DROP" in line for line in left), f"no safety net after SIGTERM: {left}"


def test_small_datagrams_of_a_control_flow_stay_in_the_kernel_and_big_ones_are_held(
    topology: Topology, guards: MakeGuard
) -> None:
    """A QUIC-shaped flow whose first window is control datagrams (ACK-sized, as while a
    speaker downloads) is marked: its later small datagrams pass in the kernel without visiting
    userspace, and a window of full datagrams on the same flow is still held as an upload."""
    assert topology.cloud is not None
    g = guards([device(topology, "nest", quic="hold")])
    remote = topology.hosts[GOOGLE_VOICE][0]
    sock = topology.socket_in("nest", socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect((remote, 443))
        local = "%s:%d" % sock.getsockname()

        def send(n: int, size: int, gap_s: float) -> None:
            for i in range(n):
                sock.send(bytes([0x40]) + bytes([i & 0xFF]) * (size - 1))  # QUIC short header
                time.sleep(gap_s)

        def cloud_flow() -> dict[str, Any]:
            assert topology.cloud is not None
            flows = [f for f in topology.cloud.stats()["udp"] if f["peer"].endswith(
                local.split(":")[1]) and f["host"] == GOOGLE_VOICE]
            return flows[0] if flows else {"datagrams": 0}

        send(10, 40, 0.002)  # the first window: judged control datagrams, released, marked
        deadline = time.monotonic() + 2.0
        while cloud_flow()["datagrams"] < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cloud_flow()["datagrams"] == 10, cloud_flow()
        queued_before = sum(queue_counters(topology).values())
        send(500, 60, 0.001)  # 500 more small ones
        deadline = time.monotonic() + 2.0
        while cloud_flow()["datagrams"] < 510 and time.monotonic() < deadline:
            time.sleep(0.02)
        queued_small = sum(queue_counters(topology).values()) - queued_before
        assert cloud_flow()["datagrams"] == 510, cloud_flow()
        assert queued_small <= 2, f"{queued_small} small datagrams of a control flow were queued"
        send(12, 1300, 0.002)  # full datagrams: room for audio, judged in userspace
        pend, _ = g.wait_pending(1, timeout_s=4.0)
        assert pend[0]["device"] == "nest" and pend[0]["held_packets"] >= 10, pend
        time.sleep(0.3)
        assert cloud_flow()["datagrams"] == 510, "a datagram of the held upload reached the cloud"
        record("control_flow_in_kernel", small_datagrams=500, small_queued=queued_small,
               held_packets=pend[0]["held_packets"])  # fmt: skip
        g.cli_ok("deny", str(pend[0]["id"]))
    finally:
        sock.close()


def test_a_download_on_an_inspected_connection_runs_in_the_kernel(
    topology: Topology, guards: MakeGuard
) -> None:
    """A connection to the voice host (inspected: its payload is judged) that downloads: the
    speaker's pure ACKs stay in the kernel once the guard saw the connection from its SYN, so a
    download of 300 MB sends a handful of packets to userspace, not the ~100,000 ACKs."""
    g = guards()
    before = sum(queue_counters(topology).values())
    r = topology.run_speaker("echo", "--host", VOICE, "-4", "download", str(DOWNLOAD_BYTES),
                             timeout=60)  # fmt: skip
    assert r["error"] is None and r["download"]["bytes"] == DOWNLOAD_BYTES, r
    queued = sum(queue_counters(topology).values()) - before
    flows = [f for f in g.cli_json("flows") if f["host"] == VOICE]
    record("inspected_download", mbit_s=r["download"]["mbit_s"], packets_queued=queued)
    assert flows and flows[0]["category"] == "voice", flows  # inspected, not fast-pathed
    assert queued <= MAX_QUEUED_PER_FAST_FLOW, f"{queued} packets of the download were queued"
    assert not g.pending(), "a download raised a prompt"


def test_a_slow_paced_upload_is_held_although_its_sender_stalls_before_the_window_fills(
    topology: Topology, guards: MakeGuard
) -> None:
    """The HomePod streams ~21 records/s on a new connection: its sender's retransmission timer
    (~200 ms) fires before ten segments are out, and from then on it only retransmits (cwnd 1).
    The guard must read that quiet as its own hold, not the end of a message: nothing of the
    upload reaches the cloud but its first record, a 38-byte one that ends a message at once
    (an HTTP/2 frame header: no room for audio)."""
    assert topology.cloud is not None
    g = guards([device(topology, "homepod")])
    sp, conn = _connected_speaker(g, "homepod", "--host", APPLE_VOICE, "-4", "--max-seconds",
                                  "30", "upload", "--profile", "homepod",
                                  remote_host=APPLE_VOICE)  # fmt: skip
    sp.go()
    pend, seen_at = g.wait_pending(1, timeout_s=4.0)
    time.sleep(0.5)
    at_cloud = cloud_conn_by_id(topology, conn["id"])["app_bytes"]
    first_record = profiles.BUILTIN["homepod"].items[0][1]
    g.cli_ok("deny", str(pend[0]["id"]))
    result = sp.result(timeout_s=10.0)
    record("homepod_paced", pending_after_s=round(seen_at - result["uploads"][0]["start"], 3),
           held_packets=pend[0]["held_packets"], at_cloud=at_cloud)  # fmt: skip
    assert at_cloud <= first_record - result["record_overhead"], (
        f"{at_cloud} B of the held upload reached the cloud")
    assert result["reset"], result


@contextlib.contextmanager
def _restart_window(topology: Topology, host: str, segments: int) -> Iterator[None]:
    """The LAN host's kernel sends at most `segments` segments per flight after idle (its route's
    initcwnd, which slow start after idle returns to). A real 2018 Echo's first flight after
    idle is 5-8 segments (../shared/captures): fewer than the detector's 10-segment window."""
    ns = topology.lan_hosts[host].ns
    base = ["ip", "-n", ns, "route", "change", "default", "via", GW_LAN_V4]
    subprocess.run([*base, "initcwnd", str(segments)], check=True, timeout=10)
    try:
        shown = subprocess.run(["ip", "-n", ns, "route", "show", "default"], check=True,
                               capture_output=True, text=True, timeout=10).stdout
        assert f"initcwnd {segments}" in shown, shown
        yield
    finally:
        subprocess.run(base, check=True, timeout=10)


@pytest.mark.parametrize("segments", [4, 6])
def test_an_upload_from_a_sender_with_a_small_window_is_held_whole(
    topology: Topology, guards: MakeGuard, segments: int
) -> None:
    """The held sender stops after its first flight, short of the detector's window, then sends
    one new segment (its tail-loss probe: it has more) and retransmits. That quiet is the hold's:
    the guard nudges the sender (releases the run's first segment, an HTTP/2 HEADERS record on an
    Echo), the cloud's ACK gives it room, it sends new data at once, and the upload is pending
    with nothing of it at the cloud but that first record. A real 2018 Echo's first flight after
    idle is 5-8 segments (../shared/captures); before the nudge, 7.5 KB (4 segments) and 10.3 KB
    (6) of this upload leaked, released as a message."""
    first_record = profiles.BUILTIN["echo-preroll"].items[0][1]
    with _restart_window(topology, "echo", segments):
        g = guards()
        sp, conn = _connected_speaker(
            g, "echo", "--host", VOICE, "-4", "--max-seconds", "30",
            "upload", "--profile", "echo-preroll", "--count", "1",
        )  # fmt: skip
        time.sleep(1.0)  # idle: the next flight starts from the restart window
        sp.go()
        pend, seen_at = g.wait_pending(1, timeout_s=4.0)
        up = pend[0]
        at_cloud = cloud_conn_by_id(topology, conn["id"])["app_bytes"]
        cloud_bytes_stay(topology, conn["id"], at_cloud, 0.5, "upload from a small window")
        g.cli_ok("deny", str(up["id"]))
        result = sp.result(timeout_s=10.0)
    latency = seen_at - result["uploads"][0]["start"]
    record(f"small_window_{segments}", pending_after_s=round(latency, 3), at_cloud=at_cloud,
           held_packets=up["held_packets"], held_bytes=up["held_bytes"])  # fmt: skip
    assert at_cloud <= first_record - result["record_overhead"], (
        f"{at_cloud} B of the held upload reached the cloud")
    assert latency <= PENDING_WITHIN_S + (g.cli_rtt_s or 0), f"pending after {latency:.3f} s"
    assert result["reset"], result


def test_event_bursts_from_a_sender_with_a_small_window_pass_without_prompt(
    topology: Topology, guards: MakeGuard
) -> None:
    """The other side of the same question: an event that fits the sender's first flight is
    released (~0.2 s) and raises no prompt, burst after burst, from a 4-segment window."""
    with _restart_window(topology, "echo", 4):
        g = guards()
        sp = g.speaker(
            "echo", "--host", VOICE, "-4", "--max-seconds", "20", "events", "--count", "3",
            "--gap", "1.5",
        )  # fmt: skip
        deadline = time.monotonic() + 15.0
        for _ in range(1000):
            assert g.pending() == [], "a non-audio event burst raised a prompt"
            if sp.done or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        result = sp.result(timeout_s=5.0)
    assert result["error"] is None and not result["reset"], result
    conn = cloud_conn_by_id(topology, cloud_conn(topology, result["local"], VOICE)["id"])
    assert conn["sha256"] == result["sha256"]
    delays, total = [], 0
    for burst in result["uploads"]:
        total += burst["plaintext_bytes"]
        arrived = next(t for t, n in conn["timeline"] if n >= total)
        delays.append(round(arrived - burst["start"], 3))
    record("event_burst_small_window", release_delay_s=delays)
    assert len(delays) == 3 and max(delays) < RELEASE_WITHIN_S, delays
