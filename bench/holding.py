"""What holding uploads costs the router: queue entries and memory per held upload, over time and
at the caps.

Rules of this file: like bench/forwarding.py (namespaces it creates, prefix `hgb`, addresses in
198.18.0.0/15, every process killed by PID, namespaces deleted on any exit, a hard time bound).

    python bench/holding.py [--hold-seconds 60] [--speakers 4] [--per-speaker 130] [--json]

Part 1, one upload held for `--hold-seconds` (60): the speaker opens a TCP connection to the voice
host (bob-dispatch-prod-na.amazon.com, named by the DNS answer the guard observed) and writes
64 KB; the guard (strict, hold_timeout_s above the hold) holds it. Every 5 s: the daemon's
held_packets/held_bytes (`status --json`), the kernel's own count of packets waiting in the
queue (/proc/net/netfilter/nfnetlink_queue in gw), the retransmissions dropped as duplicates
(engine counter) and the daemon's RSS. Flat lines mean retransmissions cost nothing.

Part 2, as many uploads at once as the caps allow: `--speakers` speakers each open
`--per-speaker` upload connections (20 a second each) with the default caps
(max_held_packets_total 4096, max_held_bytes_total 8 MiB). Reported: the most uploads pending at
once, held packets/bytes and RSS at that plateau, what was refused (uploads whose outcome is
`capped`: denied and reset at once) and, while the caps are full, that other flows still work:
a fast-pathed media transfer, an inspected message on the voice host (released, not held), and a
new upload (refused: reset).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.forwarding import (  # noqa: E402
    MEDIA,
    QUEUE,
    VOICE,
    TimeBound,
    World,
    loadavg,
    machine,
)

SINK_PORT = 8443

# Counts bytes per peer; writes {"peer": bytes} to argv[1] twice a second.
SINK = r"""
import json, os, socket, sys, threading, time
out, port, addrs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
got = {}
lock = threading.Lock()
def serve(c, peer):
    key = f"{peer[0]}:{peer[1]}"
    with c:
        while True:
            try:
                d = c.recv(65536)
            except OSError:
                return
            if not d:
                return
            with lock:
                got[key] = got.get(key, 0) + len(d)
def listen(a):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a, port)); s.listen(1024)
    while True:
        c, peer = s.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()
for a in addrs:
    threading.Thread(target=listen, args=(a,), daemon=True).start()
print("ready", flush=True)
while True:
    time.sleep(0.5)
    with lock:
        text = json.dumps(got)
    with open(out + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(out + ".tmp", out)
"""

# Opens `count` upload connections at `rate` per second, writes `size` bytes on each (what the
# kernel takes: a held sender stops at its window), keeps them `seconds`, reports what happened.
UPLOADER = r"""
import errno, json, select, socket, sys, time
addr, port, count, size, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
data = bytes(range(32, 96)) * (size // 64)
socks, state, t0 = {}, {}, time.monotonic()  # connection index -> socket / what happened
opened = 0
while time.monotonic() - t0 < seconds:
    while opened < count and opened < (time.monotonic() - t0) * rate + 1:
        try:
            s = socket.create_connection((addr, port), timeout=3)
            s.setblocking(False)
            try:
                s.send(data)
            except BlockingIOError:
                pass
            socks[opened] = s
            state[opened] = "open"
        except OSError as e:
            state[opened] = f"connect error {e.errno}"
        opened += 1
    ready = set(select.select(list(socks.values()), [], [], 0.05)[0]) if socks else set()
    for i, s in list(socks.items()):
        if s not in ready:
            continue
        try:
            if not s.recv(4096):
                state[i] = "closed"
                del socks[i]
        except ConnectionResetError:
            state[i] = "reset"
            del socks[i]
        except BlockingIOError:
            pass
    if not socks and opened >= count:
        time.sleep(0.05)
out = {}
for v in state.values():
    out[v] = out.get(v, 0) + 1
print(json.dumps({"opened": opened, "states": out}))
"""

# One probe connection: send `size` bytes, then wait up to `wait` s for an RST; report.
PROBE = r"""
import json, select, socket, sys, time
addr, port, size, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
t = time.monotonic()
s = socket.create_connection((addr, port), timeout=3)
local = "%s:%d" % s.getsockname()
s.sendall(b"m" * size) if size <= 65536 else None
if size > 65536:
    s.settimeout(30)
    s.sendall(b"m" * size)
s.setblocking(False)
sent = time.monotonic() - t
result = "open"
end = time.monotonic() + wait
while time.monotonic() < end:
    r, _, _ = select.select([s], [], [], 0.05)
    if r:
        try:
            if not s.recv(4096):
                result = "closed"; break
        except ConnectionResetError:
            result = "reset"; break
        except BlockingIOError:
            pass
print(json.dumps({"local": local, "result": result, "send_s": round(sent, 4),
                  "after_s": round(time.monotonic() - t, 3)}))
"""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def kernel_queue(world: World, number: int = QUEUE) -> dict[str, int]:
    """Packets waiting for a verdict in gw's queue `number`, as the kernel counts them."""
    return world.nfqueue_stats().get(number, {"waiting": 0})


def status(world: World) -> dict[str, Any]:
    assert world.guard is not None
    return dict(world.guard.cli_json("status"))


def part_one(world: World, hold_s: float, interval_s: float) -> dict[str, Any]:
    world.setup("guard", hold_timeout_s=hold_s + 60)
    assert world.guard is not None and world.guard.pid is not None
    try:
        pid = world.guard.pid
        idle_rss = rss_kb(pid)
        voice = world.resolve("echo", VOICE)
        up = world.topo.popen("echo", sys.executable, "-c", UPLOADER, voice, str(SINK_PORT), "1",
                              "65536", "10", str(hold_s + 5))
        world.guard.wait_pending(1, timeout_s=10)
        samples = []
        t0 = time.monotonic()
        while True:
            st = status(world)
            kq = kernel_queue(world)
            samples.append({
                "t_s": round(time.monotonic() - t0, 1), "pending": st["pending"],
                "held_packets": st["held_packets"], "held_bytes": st["held_bytes"],
                "kernel_waiting": kq["waiting"], "duplicates": st["counters"]["duplicates"],
                "rss_kb": rss_kb(pid)})
            print(f"[bench] hold t={samples[-1]['t_s']:5.1f}s {samples[-1]}", file=sys.stderr)
            if time.monotonic() - t0 >= hold_s:
                break
            time.sleep(max(0.0, interval_s - (time.monotonic() - t0) % interval_s))
        pend = world.guard.pending()
        world.guard.cli_ok("deny", str(pend[0]["id"])) if pend else None
        out, _ = up.communicate(timeout=hold_s + 30)
        return {"idle_rss_kb": idle_rss, "samples": samples,
                "uploader": json.loads(out.strip().splitlines()[-1]) if out.strip() else None}
    finally:
        world.teardown()


def part_two(world: World, speakers: list[str], per_speaker: int, sink_file: Path
             ) -> dict[str, Any]:
    world.setup("guard", hold_timeout_s=120.0)
    assert world.guard is not None and world.guard.pid is not None
    g = world.guard
    try:
        pid = g.pid
        idle_rss = rss_kb(pid)
        voice = media = ""
        for sp in speakers + ["probe"]:
            voice = world.resolve(sp, VOICE)
            media = world.resolve(sp, MEDIA)
        duration = per_speaker / 20 + 25
        ups = [world.topo.popen(sp, sys.executable, "-c", UPLOADER, voice, str(SINK_PORT),
                                str(per_speaker), "65536", "20", str(duration))
               for sp in speakers]
        t0 = time.monotonic()
        timeline = []
        peak: dict[str, Any] = {"pending": -1}
        first_cap = None
        while time.monotonic() - t0 < per_speaker / 20 + 6:
            st = status(world)
            row = {"t_s": round(time.monotonic() - t0, 1), "pending": st["pending"],
                   "held_packets": st["held_packets"], "held_bytes": st["held_bytes"],
                   "caps_hit": st["counters"]["caps_hit"], "rss_kb": rss_kb(pid),
                   "kernel_waiting": kernel_queue(world)["waiting"]}
            timeline.append(row)
            if row["caps_hit"] and first_cap is None:
                first_cap = row
            if row["pending"] > peak["pending"]:
                peak = row
            print(f"[bench] ramp {row}", file=sys.stderr)
            time.sleep(0.5)
        # the caps are full: do other flows still work?
        probes: dict[str, Any] = {}

        def sink() -> dict[str, int]:
            return dict(json.loads(sink_file.read_text())) if sink_file.exists() else {}

        def probe(label: str, addr: str, size: int, wait: float) -> None:
            out = world.topo.run("probe", sys.executable, "-c", PROBE, addr, str(SINK_PORT),
                                 str(size), str(wait), timeout=60).stdout
            res = json.loads(out)
            time.sleep(1.0)  # the sink writes its counts twice a second
            port = res["local"].rsplit(":", 1)[1]
            res["delivered"] = sum(v for k, v in sink().items() if k.endswith(":" + port))
            probes[label] = res

        probe("media transfer 8 MB (fast path)", media, 8 << 20, 1.0)
        probe("voice host, 30-B message (inspected)", voice, 30, 1.5)
        probe("voice host, new 64 KB upload (caps full)", voice, 65536, 3.0)
        final = status(world)
        log = g.cli_json("log", "--limit", "100000")
        outcomes: dict[str, int] = {}
        for rec in log:
            outcomes[rec["outcome"]] = outcomes.get(rec["outcome"], 0) + 1
        results = []
        for p in ups:
            try:
                o, _ = p.communicate(timeout=duration + 30)
                results.append(json.loads(o.strip().splitlines()[-1]))
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                results.append(None)
        return {"idle_rss_kb": idle_rss, "peak": peak, "first_cap": first_cap,
                "timeline": timeline, "probes": probes, "outcomes_logged": outcomes,
                "counters": final["counters"], "uploaders": results,
                # bytes of the held or refused uploads that reached the cloud (must be 0)
                "upload_bytes_delivered": sum(sink().values()) - sum(
                    p.get("delivered", 0) for p in probes.values())}
    finally:
        world.teardown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hold-seconds", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--speakers", type=int, default=4)
    ap.add_argument("--per-speaker", type=int, default=130)
    ap.add_argument("--skip-hold", action="store_true")
    ap.add_argument("--skip-caps", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("holding.py needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 1
    names = ["echo"] + [f"spk{i}" for i in range(2, args.speakers + 1)]
    speakers = [(n, f"198.18.10.{10 + i}", f"2001:2:0:10::{10 + i}", f"02:68:67:0b:00:{10 + i:02x}")
                for i, n in enumerate(names)] + [("probe", "198.18.10.99", "2001:2:0:10::99",
                                                  "02:68:67:0b:00:99")]
    report: dict[str, Any] = {"machine": machine(), "load_start": loadavg()}
    with TimeBound(args.max_seconds), World(speakers=speakers, iperf=False) as world, \
            tempfile.TemporaryDirectory(prefix="hgb-sink-") as tmp:
        world.device_names = names + ["probe"]
        sink_file = Path(tmp) / "sink.json"
        sink = world.topo.popen("wan", sys.executable, "-c", SINK, str(sink_file),
                                str(SINK_PORT), world.addr(VOICE), world.addr(MEDIA))
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError("sink did not start")
        if not args.skip_hold:
            report["hold"] = part_one(world, args.hold_seconds, args.interval)
        if not args.skip_caps:
            report["caps"] = part_two(world, names, args.per_speaker, sink_file)
    report["load_end"] = loadavg()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print_report(report)
    return 0


def print_report(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"machine: {m['nproc']} vCPU, {m['cpu']}, kernel {m['kernel']}; 1-min load "
          f"{r['load_start']:.2f} at start, {r['load_end']:.2f} at end")
    if "hold" in r:
        h = r["hold"]
        print(f"\none upload held {h['samples'][-1]['t_s']:.0f} s (daemon RSS idle "
              f"{h['idle_rss_kb'] / 1024:.1f} MiB)")
        print(f"{'t (s)':>6s}{'pending':>8s}{'held pkts':>10s}{'held B':>9s}{'kernel q':>9s}"
              f"{'dup drops':>10s}{'RSS MiB':>8s}")
        for s in h["samples"]:
            print(f"{s['t_s']:>6.0f}{s['pending']:>8d}{s['held_packets']:>10d}"
                  f"{s['held_bytes']:>9d}{s['kernel_waiting']:>9d}{s['duplicates']:>10d}"
                  f"{s['rss_kb'] / 1024:>8.1f}")
    if "caps" in r:
        c = r["caps"]
        p = c["peak"]
        print("\nmany uploads at once (default caps: 4096 packets, 8 MiB in total)")
        print(f"  most pending at once: {p['pending']} uploads, {p['held_packets']} packets, "
              f"{p['held_bytes']} B held ({p['held_bytes'] / max(1, p['pending']):.0f} B and "
              f"{p['held_packets'] / max(1, p['pending']):.1f} packets per upload); kernel queue "
              f"{p['kernel_waiting']}")
        drss = (p["rss_kb"] - c["idle_rss_kb"]) / max(1, p["pending"])
        print(f"  daemon RSS {c['idle_rss_kb'] / 1024:.1f} MiB idle -> {p['rss_kb'] / 1024:.1f} MiB "
              f"at the plateau ({drss:.1f} KiB per held upload)")
        print(f"  caps hit: {c['counters']['caps_hit']}; outcomes logged: {c['outcomes_logged']}")
        print(f"  uploaders: {c['uploaders']}")
        print(f"  bytes of held or refused uploads that reached the cloud: "
              f"{c['upload_bytes_delivered']}")
        for label, res in c["probes"].items():
            print(f"  while full: {label}: {res['result']}, {res['delivered']} B delivered, "
                  f"send {res['send_s']} s")


if __name__ == "__main__":
    sys.exit(main())
