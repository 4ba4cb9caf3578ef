"""Latency a queued packet pays: live (request/response through the router) and offline (the
daemon's own callback, timed and profiled without a kernel).

Rules of this file: like bench/forwarding.py (namespaces it creates, prefix `hgb`, addresses in
198.18.0.0/15, processes killed by PID, namespaces deleted on any exit, a hard time bound); every
mode is measured in the same run, rounds interleaved, medians reported.

    python bench/latency.py [--rounds 2000] [--runs 3] [--json]     # live, through gw
    python bench/latency.py --offline [--packets 200000] [--profile]  # the callback alone

Live: a TCP echo client in the speaker's namespace sends a 32-byte request and waits for the
32-byte answer from an echo server on the wan side (TCP_NODELAY, one connection, `--rounds`
round trips; socat is the echo server when installed); p50/p99 of the round trip per mode:
  none       no queue (the ruleset without the NFQUEUE rule, as forwarding.py's `none`)
  bare       accept-all netfilterqueue consumer at the queue rule's position
  dpkt       the same, parsing IP/TCP with dpkt
  inspected  `hushgate run`, the connection to the voice host (bob-dispatch-prod-na.amazon.com):
             every request is an upstream payload packet that the engine inspects (a record of
             <= 46 bytes ends a message at once, so it is not held) and accepts; the answer and
             the ACKs' other half are downstream (kernel)
  fast       `hushgate run`, the smart-home host (api.amazonalexa.com): connmark fast path
Added latency = p50/p99 of the mode minus those of `none`. A UDP request to an unknown host
would be held provisionally until the burst is judged (quiet_s, 200 ms): that is the release
delay of design.md section 5, not a per-packet cost, and `--udp` shows it.

Offline: the daemon's real callback (Daemon._callback -> QueueHandler -> parse_ip ->
Engine.receive -> actions -> metrics) on fake netfilterqueue packets, against an accept-only
callback and a dpkt-parsing one, in µs per packet, for the packets the live inspected cases send
to userspace: pure ACKs of an inspected TCP flow and 64-byte UDP datagrams to an unknown host
(bursts of 10 held and released as control datagrams). `--profile` prints cProfile's top entries.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ECHO_PORT = 7007

ECHO_SERVER = r"""
import socket, sys, threading
protos, port, addrs = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3:]
def tcp(addr):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(16)
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(c,), daemon=True).start()
def serve(c):
    with c:
        while True:
            d = c.recv(4096)
            if not d:
                return
            c.sendall(d)
def udp(addr):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, port))
    while True:
        d, a = s.recvfrom(4096); s.sendto(d, a)
for a in addrs:
    if "tcp" in protos:
        threading.Thread(target=tcp, args=(a,), daemon=True).start()
    if "udp" in protos:
        threading.Thread(target=udp, args=(a,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

ECHO_CLIENT = r"""
import json, socket, sys, time
addr, port, rounds, size, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
msg = b"r" * size
lat = []
if proto == "tcp":
    s = socket.create_connection((addr, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(20):  # warm-up: handshake done, flow state settled
        s.sendall(msg); n = 0
        while n < size: n += len(s.recv(4096))
    for _ in range(rounds):
        t = time.perf_counter(); s.sendall(msg); n = 0
        while n < size: n += len(s.recv(4096))
        lat.append((time.perf_counter() - t) * 1e6)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.connect((addr, port))
    for _ in range(rounds):
        t = time.perf_counter(); s.send(msg); s.recv(4096)
        lat.append((time.perf_counter() - t) * 1e6)
        time.sleep(0.25)  # each request its own burst
lat.sort()
print(json.dumps({"n": len(lat), "p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99) - 1] if len(lat) >= 100 else lat[-1], "min": lat[0]}))
"""


# ---------------------------------------------------------------------------------------------
# live


def run_live(args: argparse.Namespace) -> dict[str, Any]:
    from bench.forwarding import (
        SMART_HOME,
        UNKNOWN_V4,
        VOICE,
        TimeBound,
        World,
        loadavg,
        machine,
        median,
    )

    modes = [m for m in args.modes.split(",") if m]
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    loads: list[float] = []
    with TimeBound(args.max_seconds), World(iperf=False) as world:
        topo = world.topo
        addrs = [world.addr(VOICE), world.addr(SMART_HOME), UNKNOWN_V4]
        # TCP echo: socat (C, one process per connection: little jitter of its own) when
        # installed, else the Python server; UDP echo: the Python server.
        protos = "udp" if shutil.which("socat") else "tcp,udp"
        if protos == "udp":
            for addr in addrs:
                topo.popen("wan", "socat", f"TCP4-LISTEN:{ECHO_PORT},bind={addr},reuseaddr,fork",
                           "PIPE", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = topo.popen("wan", sys.executable, "-c", ECHO_SERVER, protos, str(ECHO_PORT),
                            *addrs)
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("echo server did not start")
        time.sleep(0.3)
        for r in range(args.runs):
            for mode in modes:
                loads.append(loadavg())
                world.setup("guard" if mode in ("fast", "inspected") else mode)
                try:
                    if mode == "fast":
                        target = world.resolve("echo", SMART_HOME)
                    elif mode == "inspected":
                        target = world.resolve("echo", VOICE)
                    else:
                        target = world.addr(VOICE)
                    before = world.queued()
                    out = topo.run("echo", sys.executable, "-c", ECHO_CLIENT, target,
                                   str(ECHO_PORT), str(args.rounds), "32", "tcp",
                                   timeout=60 + args.rounds * 0.01)
                    res = json.loads(out.stdout)
                    res["queued"] = world.queued() - before
                    if args.udp and mode in ("none", "inspected"):
                        u = topo.run("echo", sys.executable, "-c", ECHO_CLIENT, UNKNOWN_V4,
                                     str(ECHO_PORT), "8", "64", "udp", timeout=60)
                        res["udp"] = json.loads(u.stdout)
                    results[mode].append(res)
                    print(f"[bench] run {r + 1} {mode:9s} p50 {res['p50']:.1f} µs p99 "
                          f"{res['p99']:.1f} µs queued {res['queued']}", file=sys.stderr)
                finally:
                    world.teardown()
    table = {}
    for mode in modes:
        rows = results[mode]
        table[mode] = {k: median([x[k] for x in rows]) for k in ("p50", "p99", "min")}
        table[mode]["queued"] = median([x["queued"] for x in rows])
        if rows and "udp" in rows[0]:
            table[mode]["udp_p50"] = median([x["udp"]["p50"] for x in rows])
    return {"machine": machine(), "table": table, "raw": results,
            "load": {"median": median(loads), "min": min(loads), "max": max(loads)}}


def print_live(res: dict[str, Any], args: argparse.Namespace) -> None:
    m = res["machine"]
    print(f"machine: {m['nproc']} vCPU, {m['cpu']}, kernel {m['kernel']}")
    print(f"TCP echo, 32-B request/answer, {args.rounds} rounds x {args.runs} runs "
          "(medians of the runs), µs")
    t = res["table"]
    base = t.get("none")
    print(f"{'mode':10s}{'p50':>9s}{'p99':>9s}{'+p50':>9s}{'+p99':>9s}{'queued':>9s}")
    for mode, row in t.items():
        add50 = row["p50"] - base["p50"] if base else float("nan")
        add99 = row["p99"] - base["p99"] if base else float("nan")
        print(f"{mode:10s}{row['p50']:>9.1f}{row['p99']:>9.1f}{add50:>9.1f}{add99:>9.1f}"
              f"{int(row['queued']):>9d}")
        if "udp_p50" in row:
            print(f"{'':10s}UDP 64-B request to an unknown host: p50 {row['udp_p50'] / 1000:.1f} ms")
    ld = res["load"]
    print(f"1-min load during the runs: median {ld['median']:.2f} (min {ld['min']:.2f}, "
          f"max {ld['max']:.2f})")


# ---------------------------------------------------------------------------------------------
# offline


DEVICE_MAC = "68:db:f5:90:19:64"
DEVICE_IP = "198.18.10.10"
VOICE_IP = "198.19.0.10"
UNKNOWN_IP = "198.19.0.200"


def _csum_free_ip4(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    total = 20 + len(l4)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, proto, 0,
                       bytes(map(int, src.split("."))), bytes(map(int, dst.split(".")))) + l4


def tcp_packet(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
               payload: bytes = b"") -> bytes:
    l4 = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload
    return _csum_free_ip4(src, dst, 6, l4)


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return _csum_free_ip4(src, dst, 17, l4)


def dns_answer(name: str, addr: str) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    msg = struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0) + q + struct.pack("!HH", 1, 1)
    msg += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 3600, 4) + bytes(map(int, addr.split(".")))
    return udp_packet("198.18.10.1", DEVICE_IP, 53, 40000, msg)


class FakePacket:
    """What QueueHandler and the daemon call on a netfilterqueue Packet."""

    __slots__ = ("payload", "hw", "mark", "verdict")

    def __init__(self, payload: bytes, hw: bytes | None) -> None:
        self.payload = payload
        self.hw = hw
        self.mark = 0
        self.verdict: str | None = None

    def get_payload(self) -> bytes:
        return self.payload

    def get_hw(self) -> bytes | None:
        return self.hw

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"

    def repeat(self) -> None:
        self.verdict = "repeat"

    def retain(self) -> None:
        pass


def make_daemon(tmp: str) -> Any:
    from guard.core.config import parse_config
    from guard.shell.daemon import Daemon
    from guard.shell.nfqueue import QueueHandler

    config = parse_config({
        "guard": {"queue": 7, "socket": os.path.join(tmp, "s.sock"),
                  "state_db": os.path.join(tmp, "state.db")},
        "device": [{"name": "echo", "mac": DEVICE_MAC, "address": DEVICE_IP, "mode": "strict"}],
    })

    class NoFirewall:
        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    daemon = Daemon(config, backend=NoFirewall())  # type: ignore[arg-type]
    daemon.handler = QueueHandler(daemon._receive, daemon._after_packet, config.fail_open,
                                  observe=daemon.metrics.packet)
    return daemon


def workload_packets(kind: str, n: int) -> list[tuple[bytes, bytes | None]]:
    hw = bytes.fromhex(DEVICE_MAC.replace(":", "")) + b"\0\0"
    if kind == "tcp_ack":
        return [(tcp_packet(DEVICE_IP, VOICE_IP, 40001, 443, 1000, 5000 + 1448 * i, 0x10), hw)
                for i in range(n)]
    if kind == "tcp_msg":
        # 32-byte requests on the voice connection: each is a burst of one record that ends a
        # message at once (<= 46 bytes), held and released within its own callback
        return [(tcp_packet(DEVICE_IP, VOICE_IP, 40001, 443, 1000 + 32 * i, 5000, 0x18,
                            b"r" * 32), hw) for i in range(n)]
    if kind == "udp64":
        return [(udp_packet(DEVICE_IP, UNKNOWN_IP, 40002, 5201, bytes([0x40]) * 64), hw)
                for _ in range(n)]
    raise ValueError(kind)


def prime(daemon: Any, clock: list[float]) -> None:
    """The voice name learned from DNS, the TCP flow opened with a SYN."""
    hw = bytes.fromhex(DEVICE_MAC.replace(":", "")) + b"\0\0"
    for raw, h in ((dns_answer("bob-dispatch-prod-na.amazon.com", VOICE_IP), None),
                   (tcp_packet(DEVICE_IP, VOICE_IP, 40001, 443, 999, 0, 0x02), hw),
                   (tcp_packet(DEVICE_IP, VOICE_IP, 40001, 443, 1000, 5000, 0x10), hw)):
        daemon._callback(FakePacket(raw, h))


def time_callbacks(kind: str, n: int, profile: bool = False) -> dict[str, Any]:
    """µs per packet: the daemon's callback vs accept-only vs dpkt parse + accept."""
    import dpkt

    from guard.shell import nfqueue

    packets = workload_packets(kind, n)
    out: dict[str, Any] = {}

    def bare(p: FakePacket) -> None:
        p.accept()

    IP, TCP, UDP = dpkt.ip.IP, dpkt.tcp.TCP, dpkt.udp.UDP

    def with_dpkt(p: FakePacket) -> None:
        try:
            ip = IP(p.get_payload())
            l4 = ip.data
            if isinstance(l4, (TCP, UDP)):
                _ = (ip.src, ip.dst, l4.sport, l4.dport, len(l4.data))
        finally:
            p.accept()

    for name, cb in (("bare", bare), ("dpkt", with_dpkt)):
        fakes = [FakePacket(raw, hw) for raw, hw in packets]
        t = time.perf_counter()
        for f in fakes:
            cb(f)
        out[name] = (time.perf_counter() - t) / n * 1e6
    with tempfile.TemporaryDirectory(prefix="hgb-offline-") as tmp:
        daemon = make_daemon(tmp)
        clock = [time.time()]
        # a fast virtual clock: bursts of UDP datagrams arrive 10 µs apart, as under load
        daemon.handler.clock = lambda: clock[0]
        prime(daemon, clock)
        fakes = [FakePacket(raw, hw) for raw, hw in packets]
        callback = daemon._callback
        prof = cProfile.Profile() if profile else None
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        for f in fakes:
            clock[0] += 1e-5
            callback(f)
        if prof is not None:
            prof.disable()
        out["hushgate"] = (time.perf_counter() - t) / n * 1e6
        verdicts: dict[str, int] = {}
        for f in fakes:
            verdicts[str(f.verdict)] = verdicts.get(str(f.verdict), 0) + 1
        daemon.engine.handle_timer(clock[0] + 5)
        daemon._apply(daemon.engine.take_actions())
        out["verdicts"] = verdicts
        out["late"] = sum(1 for f in fakes if f.verdict is not None) - n
        daemon.store.close()
        if prof is not None:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            out["profile"] = s.getvalue()
    del nfqueue
    return out


KINDS = ("tcp_ack", "tcp_msg", "udp64")


def run_offline(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for kind in KINDS:
        runs = [time_callbacks(kind, args.packets) for _ in range(args.runs)]
        res[kind] = {k: statistics.median(r[k] for r in runs) for k in ("bare", "dpkt", "hushgate")}
        res[kind]["verdicts"] = runs[0]["verdicts"]
        if args.profile:
            res[kind]["profile"] = time_callbacks(kind, args.packets, profile=True)["profile"]
    return res


def print_offline(res: dict[str, Any]) -> None:
    print("offline callback cost, µs per packet (median of runs; no kernel, no syscalls)")
    print(f"{'packets':10s}{'accept':>9s}{'dpkt':>9s}{'hushgate':>10s}{'hg/dpkt':>9s}  verdicts")
    for kind in KINDS:
        r = res[kind]
        print(f"{kind:10s}{r['bare']:>9.2f}{r['dpkt']:>9.2f}{r['hushgate']:>10.2f}"
              f"{r['hushgate'] / r['dpkt']:>9.2f}  {r['verdicts']}")
    for kind in KINDS:
        if "profile" in res[kind]:
            print(f"\n--- cProfile, {kind} ---")
            print(res[kind]["profile"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--offline", action="store_true", help="time the callback without a kernel")
    ap.add_argument("--profile", action="store_true", help="with --offline: cProfile top entries")
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="none,bare,dpkt,inspected,fast")
    ap.add_argument("--udp", action="store_true", help="also a UDP request to an unknown host")
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.offline:
        res = run_offline(args)
        if args.json:
            print(json.dumps(res, indent=1))
        else:
            print_offline(res)
        return 0
    if os.geteuid() != 0:
        print("latency.py needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 1
    res = run_live(args)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_live(res, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
