"""The simulated world itself, with no guard: plain forwarding and NAT, real TLS, real DNS.

These pin what every guarded end-to-end test builds on: an upload reaches the cloud intact (same
byte count and SHA-256 at both ends), the cloud sees one TCP segment per profile record, names
resolve through the router's dnsmasq, the router sees each speaker's own MAC, resets are noticed
within a second, and nothing (namespace, process, file) outlives a topology.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hushsim import profiles
from hushsim.topology import (
    GW_WAN_V4,
    Topology,
    _netns_list,
    _pid_alive,
    cleanup_stale,
)
from tests.ci import missing_or_fail

VOICE = "bob-dispatch-prod-na.amazon.com"


def _conn_with_sha(topology: Topology, sha: str) -> dict[str, Any]:
    """The cloud's record of the connection whose received bytes hash to `sha` (waits for it
    to be complete: the speaker may exit a moment before the cloud's last read)."""
    assert topology.cloud is not None
    stats = topology.cloud.wait_for(
        lambda s: any(c["sha256"] == sha for c in s["tcp"]), timeout_s=5.0
    )
    return next(c for c in stats["tcp"] if c["sha256"] == sha)


@pytest.mark.parametrize("family", [4, 6])
def test_tls_upload_reaches_cloud_with_same_bytes_and_hash(topology: Topology, family: int) -> None:
    result = topology.run_speaker("echo", "--host", VOICE, f"-{family}", "upload")
    assert result["error"] is None, result
    assert not result["reset"]
    profile = profiles.BUILTIN["echo-opus-118"]
    assert result["records"] == len(profile.items)
    assert result["acks"] == 1  # the cloud answered the upload: the session goes on

    conn = _conn_with_sha(topology, result["sha256"])
    assert conn["app_bytes"] == result["bytes_sent"]
    assert conn["sni"] == VOICE
    assert conn["family"] == family
    if family == 4:
        assert conn["peer"].startswith(GW_WAN_V4 + ":")  # masqueraded by the router
    else:
        assert conn["peer"].startswith("[2001:2:0:10::10]:")  # routed, no NAT66
    # One TLS record per write and one segment per record: the cloud's kernel counted as many
    # data segments as the profile has records, plus the client's two handshake flights.
    assert conn["tcp_data_segs_in"] == result["records"] + 2
    if family == 4:  # MSS 1460 (no timestamps): every profile size fits one segment unchanged
        assert result["wire_bytes"] == profile.total_bytes


def test_capture_profile_replays_the_labelled_upload_size(topology: Topology) -> None:
    captures = profiles.default_captures_dir()
    if captures is None:
        missing_or_fail("../shared/captures is not beside the repository")
    name = "capture:sean_kennedy__flip_a_coin_5_30s#1"
    profile = profiles.resolve(name, captures)
    result = topology.run_speaker(
        "echo", "--host", VOICE, "-4", "--captures", str(captures), "upload", "--profile", name
    )
    assert result["error"] is None, result
    assert result["wire_bytes"] == profile.total_bytes == 47906  # labels.toml's byte count
    conn = _conn_with_sha(topology, result["sha256"])
    assert conn["app_bytes"] == result["bytes_sent"]


def test_vendor_names_resolve_through_the_routers_dnsmasq(topology: Topology) -> None:
    import socket

    for name in (VOICE, "guzzoni.apple.com", "embeddedassistant.googleapis.com"):
        v4, v6 = topology.hosts[name]
        assert topology.resolve("echo", name, socket.AF_INET) == [v4]
        assert topology.resolve("nest", name, socket.AF_INET6) == [v6]
    log = (topology.tmp / "dnsmasq.log").read_text()
    assert "query[AAAA] guzzoni.apple.com from 198.18.10.12" in log


def test_router_sees_each_speakers_own_mac(topology: Topology) -> None:
    import socket

    def poke() -> None:  # any packet to the router makes it learn the sender's MAC
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", ("198.18.10.1", 9))

    topology.call_in("homepod", poke)
    time.sleep(0.05)
    out = topology.run("gw", "ip", "neigh", "show", "198.18.10.11").stdout
    assert "d4:a3:3d:6b:1e:97" in out


def test_rtt_mode_reports_percentiles(topology: Topology) -> None:
    result = topology.run_speaker("echo", "--host", "api.amazonalexa.com", "-4", "rtt", "200")
    assert result["error"] is None, result
    rtt = result["rtt_ms"]
    assert rtt["n"] == 200
    assert 0 < rtt["p50"] <= rtt["p99"] <= rtt["max"]
    assert rtt["p50"] < 20  # no guard: kernel forwarding between namespaces, well under 1 ms
    print(f"\nno guard: RTT p50 {rtt['p50']} ms, p99 {rtt['p99']} ms")


def test_download_mode_reports_throughput(topology: Topology) -> None:
    size = 50_000_000
    result = topology.run_speaker(
        "echo", "--host", "amzdigital-a.akamaihd.net", "-4", "download", str(size)
    )
    assert result["error"] is None, result
    assert result["download"]["bytes"] == size
    assert result["download"]["mbit_s"] > 100
    print(f"\nno guard: download {result['download']['mbit_s']} Mbit/s")


def test_quic_upload_arrives_at_udp_server_with_its_sni(topology: Topology) -> None:
    host = "embeddedassistant.googleapis.com"
    result = topology.run_speaker("nest", "--host", host, "-4", "quic-upload")
    assert result["error"] is None, result
    assert not result["refused"]
    assert topology.cloud is not None
    stats = topology.cloud.wait_for(
        lambda s: any(f["sha256"] == result["sha256"] for f in s["udp"]), timeout_s=5.0
    )
    flow = next(f for f in stats["udp"] if f["sha256"] == result["sha256"])
    assert flow["datagrams"] == result["records"] == len(profiles.BUILTIN["nest-quic"].items) + 1
    assert flow["bytes"] == result["bytes_sent"]
    assert flow["initial_sni"] == host
    assert flow["sizes_head"][0] >= 1200 and set(flow["sizes_head"][1:]) == {1350}
    assert result["replies"] >= 1
    assert result["acked"] >= result["records"] - 1  # the cloud acknowledges every 2nd datagram
    assert result["probes"] == 0 and result["stalled_s"] < 0.5


def test_held_quic_sender_stops_after_its_first_window(topology: Topology) -> None:
    """The router drops the data datagrams (as a held flow's would wait): the speaker sends its
    Initial, then one congestion window, then only probes - not the whole 200 KB upload."""
    rule = ["FORWARD", "-p", "udp", "--dport", "443", "-m", "length", "--length", "1300:1500",
            "-j", "DROP"]  # fmt: skip
    topology.run("gw", topology.iptables, "-I", *rule)
    try:
        result = topology.run_speaker(
            "nest", "--host", "embeddedassistant.googleapis.com", "-4", "--max-seconds", "2.5",
            "quic-upload",
        )  # fmt: skip
    finally:
        topology.run("gw", topology.iptables, "-D", *rule, check=False)
    assert result["error"] == "max-seconds"
    assert result["acked"] == 0
    # Initial + 9 data datagrams fill the 10-datagram window; probes at 1 s (and 3 s).
    assert result["records"] == 10 + result["probes"] and 1 <= result["probes"] <= 2


def test_reset_is_noticed_within_a_second_while_blocked_in_send(topology: Topology) -> None:
    """The router drops the speaker's segments (as a held flow would be), so the speaker's send
    buffer fills and it blocks; then the cloud resets the connection."""
    assert topology.cloud is not None
    go = topology.tmp / "go-reset"
    proc = topology.speaker_popen(
        "echo",
        "--host",
        VOICE,
        "-4",
        "--max-seconds",
        "20",
        "upload",
        "--profile",
        "echo-dot-pcm",
        "--wait-file",
        str(go),
    )
    rule = ["FORWARD", "-s", "198.18.10.10", "-p", "tcp", "--dport", "443", "-j", "DROP"]
    try:
        stats = topology.cloud.wait_for(
            lambda s: any(
                c["handshake_done"] and c["closed"] is None and c["app_bytes"] == 0
                for c in s["tcp"]
            ),
            timeout_s=5.0,
        )
        conn_id = next(
            c["id"]
            for c in stats["tcp"]
            if c["handshake_done"] and c["closed"] is None and c["app_bytes"] == 0
        )
        topology.run("gw", topology.iptables, "-I", *rule)
        go.touch()
        time.sleep(1.5)  # the 44 KB start burst fills the send buffer: the speaker is blocked
        assert topology.cloud.abort(id=conn_id) == [conn_id]
        out, err = proc.communicate(timeout=10)
    finally:
        topology.run("gw", topology.iptables, "-D", *rule, check=False)
    from hushsim.topology import parse_speaker_output

    result = parse_speaker_output(out, err)
    assert result["reset"], result
    closed = next(c for c in topology.cloud.stats()["tcp"] if c["id"] == conn_id)
    assert closed["close_reason"] == "aborted"
    assert 0 <= result["reset_at"] - closed["closed"] < 1.0
    assert result["bytes_sent"] < profiles.BUILTIN["echo-dot-pcm"].total_bytes  # it was blocked


def test_close_leaves_no_namespace_process_or_file(kernel_world: None) -> None:
    topo = Topology(speakers=[("spk", None, None, None)])
    with topo:
        sleeper = topo.popen("lan", "sleep", "30")
        holder = topo.speaker_popen(
            "spk", "--host", VOICE, "--hold-open", "30", "events", "--count", "1"
        )
        # A process the topology did not start itself but that lives in its namespace.
        stray = subprocess.Popen(["ip", "netns", "exec", topo.ns("wan"), "sleep", "30"])
        assert topo.cloud is not None
        topo.cloud.wait_for(lambda s: any(c["upload_frames"] for c in s["tcp"]), timeout_s=10)
        pids = [sleeper.pid, holder.pid, stray.pid, topo.cloud_pid, topo.dnsmasq_pid]
        names, tmp = topo.namespaces, topo.tmp
        assert all(pid and _pid_alive(pid) for pid in pids)
    stray.wait(timeout=5)
    assert not set(names) & set(_netns_list())
    assert not any(_pid_alive(pid) for pid in pids if pid)
    assert not tmp.exists()
    assert not any(Path("/etc/netns", ns).exists() for ns in names)


def test_cleanup_stale_removes_namespaces_of_dead_runs(kernel_world: None) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ns = f"hg{dead.pid}x0-gw"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    mine = f"hg{os.getpid()}x999-gw"  # a live run's namespace must survive
    subprocess.run(["ip", "netns", "add", mine], check=True, timeout=10)
    try:
        removed = cleanup_stale("hg")
        assert ns in removed and mine not in removed
        assert ns not in _netns_list() and mine in _netns_list()
    finally:
        for name in (ns, mine):
            subprocess.run(
                ["ip", "netns", "del", name], check=False, capture_output=True, timeout=10
            )
