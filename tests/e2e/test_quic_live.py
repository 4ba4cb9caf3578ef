"""QUIC refused by default, live (design.md 5, issue 13 point 4): a guarded speaker's QUIC gets
port-unreachable so it falls back to TCP, which the relay holds whole; a speaker that keeps trying
QUIC and never opens TCP instead is flagged in `status` (it has no voice service then), and the
flag clears once it falls back. Counts come from the kernel's rule counters, read every 10 s."""

from __future__ import annotations

import time
from typing import Any

from hushsim.topology import Topology
from tests.e2e.guardkit import MakeGuard, device

GOOGLE_VOICE = "embeddedassistant.googleapis.com"
QUEUE = 31  # this module's NFQUEUE number (other modules use their own)
CHECK_WITHIN_S = 25.0  # the daemon reads the QUIC counters every 10 s


def _nest(status: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in status["devices"] if d["name"] == "nest")


def test_quic_is_refused_and_a_speaker_that_never_falls_back_is_flagged_until_it_does(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards([device(topology, "nest")], tcp_hold="relay", quic="block")
    assert _nest(g.cli_json("status"))["quic"] == "block"
    sent_at = time.time()
    res = topology.run_speaker("nest", "--host", GOOGLE_VOICE, "-4", "--max-seconds", "8",
                               "quic-upload", timeout=20.0)
    assert res["refused"] and res["refused_at"] - sent_at < 2.0, res
    assert topology.cloud is not None
    udp = [f for f in topology.cloud.stats()["udp"] if f["opened"] >= sent_at]
    assert sum(f["app_bytes"] for f in udp) == 0, udp

    deadline = time.monotonic() + CHECK_WITHIN_S
    nest = _nest(g.cli_json("status"))
    while not nest["quic_no_tcp_fallback"] and time.monotonic() < deadline:
        time.sleep(0.5)
        nest = _nest(g.cli_json("status"))
    assert nest["quic_no_tcp_fallback"] and nest["quic_refused"] >= 1, nest
    assert "keeps trying QUIC" in g.log_tail(200)

    # It falls back: a TCP connection through the relay (a short event on the voice host) and a
    # QUIC retry in the same period; the flag clears at the next look.
    res = topology.run_speaker("nest", "--host", GOOGLE_VOICE, "-4", "--max-seconds", "10",
                               "events", "--count", "1", timeout=20.0)
    assert res["error"] is None and not res["reset"], res
    topology.run_speaker("nest", "--host", GOOGLE_VOICE, "-4", "--max-seconds", "3",
                         "quic-upload", timeout=10.0)
    deadline = time.monotonic() + CHECK_WITHIN_S
    while nest["quic_no_tcp_fallback"] and time.monotonic() < deadline:
        time.sleep(0.5)
        nest = _nest(g.cli_json("status"))
    assert not nest["quic_no_tcp_fallback"], nest
    assert g.cli_json("status")["relay"]["connections_total"] >= 1
