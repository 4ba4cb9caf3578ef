"""The stream hold's relay against kernel forwarding and C relays, side by side in one run.

Rules of this file: like bench/forwarding.py (namespaces it creates through its `World`, prefix
`hgb`, addresses in 198.18.0.0/15 only, every process started through the topology and killed by
PID, namespaces deleted on any exit, a hard time bound with `--max-seconds`). Every client loop is
bounded by a count and a time. Paths are measured in the same run, interleaved round by round.

    python bench/relay.py [--runs 3] [--json] [--quick] [--cpu N] [--profile]

One `hushgate run` with `tcp_hold = "relay"` guards the speaker `echo` (strict, by MAC and
address) for the whole run. A Python server in the wan namespace listens on every wan address:
an echo (epoll, one process), "once" echoes (echo 64 B, then close: the server closes first, on a
port no earlier run used; see ONCE_PORTS), a source (sends the N bytes asked for, then FIN) and a
sink (reads to EOF, answers the count). The paths, all to the smart-home host (api.amazonalexa.com, learned
by the guard from the DNS answer, category allowed: relayed at once) unless said otherwise:

  kernel      the unconfigured LAN host `lan`: plain forwarding and masquerade through gw, with
              the guard's rules in place (the same path a device that is not guarded takes)
  relay       the speaker `echo`: TPROXY to the relay in `hushgate run`, which connects upstream
  voice       `echo` to the voice host (bob-dispatch-prod-na.amazon.com): inspected. A request
              of at most `control_record_bytes` (80 B) with nothing held before it is released at
              once (the 64-B rows); `voice-200B` sends 200 B, a tiny message that is kept and
              released after the quiet gap (detector quiet_s, 0.2 s): a release delay by design
  floor       `lan` to another wan address (FLOOR_ADDR): its SYN held in a queue and TPROXY, as
              for the speaker, by FLOOR, the least Python that does the SYN hold and relays (no
              engine, no rules, no bookkeeping; 64-B workloads only). What design.md 5a.3 costs
              in Python here: relay - floor is what the relay's own code adds on top
  haproxy     `lan` -> haproxy (mode tcp, nbthread 1, no splice) on gw's LAN address -> wan
  socat       `lan` -> `socat -b 65536 TCP-LISTEN,fork` on gw's LAN address -> wan (bulk only)

Figures (issue 13, "Benchmarks"; design.md 5a.3 and 5a.7):
  1. new connection: connect() start to the first byte of the echo of a 64-B request (the
     upstream connect is in it: the relay connects while the speaker's SYN waits in the
     guard's queue, design.md 5a.3), p50/p95 of `--conns` sequential connections per round.
     Target: relay - kernel <= +0.1 ms p50.
  2. request/response on an open connection: 64-B ping-pong, `--rounds` per round (50 warm-up).
     Target: relay - kernel <= +50 us p50.
  3. new connections per second: `--rate-procs` clients x `--rate-conc` connections in flight,
     each connect / 64 B / echo / close, completions counted over `--rate-seconds` after 1 s of
     warm-up. Target: relay >= 5,000/s.
  4. bulk download (cloud -> speaker, `--bulk-mb`) and upload (speaker -> cloud, allowed host),
     connect to last byte. Target: relay >= 0.5 x the C relay (the faster of haproxy and socat).
  5. VmRSS of `hushgate run` idle (after start), with 200 relayed connections open, and VmHWM
     at the end (the run's peak). Target < 40 MB.

`--profile` then runs each relay workload again against a daemon started under cProfile (one
daemon per workload) and prints the top functions by own time: where the relay's time goes.
Client namespaces and gw get `tcp_tw_reuse = 1` and ports 1024-65535, and gw's conntrack keeps
TIME_WAIT entries 5 s: tens of thousands of short connections per run would otherwise run out of
ephemeral ports and fill gw's table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.forwarding import (  # noqa: E402
    SMART_HOME,
    UNKNOWN2_V4,
    VOICE,
    TimeBound,
    World,
    loadavg,
    log,
    machine,
    median,
)
from hushsim.topology import GW_LAN_V4, UNGUARDED_V4  # noqa: E402

RELAY_PORT = 7421
# once ports: echo REQUEST bytes, then close (the server closes first, as an HTTP server does, so
# the TIME_WAIT sockets of tens of thousands of short connections sit on the server's side and
# not on the clients' ephemeral ports, where they slow every connect() down to milliseconds).
# Each newconn/rate run takes the next once port: a fresh server port is a fresh tuple space, so a
# run's SYNs never meet the TIME_WAIT sockets an earlier run left behind (their collisions cost a
# challenge ACK and a 1-s SYN retransmission).
ECHO_PORT, SOURCE_PORT, SINK_PORT = 7101, 7102, 7103
ONCE_PORTS = tuple(range(7110, 7190))
HAPROXY_OFFSET = 200  # haproxy listens on gw at port + 200 for each server port
HAPROXY_PORTS = {"echo": 7301, "source": 7302, "sink": 7303}
SOCAT_PORTS = {"source": 7401, "sink": 7402}
REQUEST = 64
VOICE_BIG = 200  # above control_record_bytes (80): kept until the quiet gap
HOLD_CONNS = 200

# ---------------------------------------------------------------------------------------------
# the wan side: echo (epoll), source, sink; exits by itself after max_s

SERVER = r"""
import os, select, socket, sys, threading
echo_port, source_port, sink_port, once_lo, once_hi, once_n, max_s = map(int, sys.argv[1:8])
threading.Timer(max_s, os._exit, args=(0,)).start()
def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.bind(("0.0.0.0", port)); s.listen(4096)
    return s
CHUNK = memoryview(b"d" * (1 << 20))
def source(c):
    try:
        with c:
            c.settimeout(60); line = b""
            while not line.endswith(b"\n") and len(line) < 32:
                d = c.recv(32)
                if not d:
                    return
                line += d
            left = int(line)
            while left > 0:
                left -= c.send(CHUNK[:min(left, len(CHUNK))])
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):
                pass
    except (OSError, ValueError):
        pass
def sink(c):
    try:
        with c:
            c.settimeout(60); buf = bytearray(1 << 20); total = 0
            while True:
                n = c.recv_into(buf)
                if not n:
                    break
                total += n
            c.sendall(b"%d\n" % total)
    except OSError:
        pass
def serve(ls, fn):
    while True:
        c, _ = ls.accept()
        threading.Thread(target=fn, args=(c,), daemon=True).start()
for port, fn in ((source_port, source), (sink_port, sink)):
    threading.Thread(target=serve, args=(listener(port), fn), daemon=True).start()
ep = select.epoll(); lfds = {}
for port in (echo_port, *range(once_lo, once_hi)):
    ls = listener(port); ls.setblocking(False); lfds[ls.fileno()] = (ls, port != echo_port)
    ep.register(ls.fileno(), select.EPOLLIN)
conns = {}  # fd -> [socket, bytes left before closing (None: echo until EOF)]
print("ready", flush=True)
while True:
    for fd, ev in ep.poll():
        if fd in lfds:
            ls, once = lfds[fd]
            for _ in range(256):
                try:
                    c, _ = ls.accept()
                except OSError:
                    break
                c.setblocking(False)
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[c.fileno()] = [c, once_n if once else None]
                ep.register(c.fileno(), select.EPOLLIN)
            continue
        st = conns.get(fd)
        if st is None:
            continue
        c = st[0]
        try:
            d = c.recv(65536)
            if d:
                c.send(d)  # requests are small: they fit in the send buffer
                if st[1] is None:
                    continue
                st[1] -= len(d)
                if st[1] > 0:
                    continue
        except OSError:
            pass
        ep.unregister(fd); del conns[fd]; c.close()
"""

# ---------------------------------------------------------------------------------------------
# the LAN side: one mode per run, JSON on stdout

CLIENT = r"""
import errno, json, select, socket, sys, time
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
a = sys.argv[4:]
ND = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def read_n(s, n):
    got = 0
    while got < n:
        d = s.recv(65536)
        if not d:
            raise OSError("eof")
        got += len(d)
if mode == "newconn":
    n, size, max_s = int(a[0]), int(a[1]), float(a[2])
    msg = b"q" * size; first, conn, errors = [], [], 0
    end = time.monotonic() + max_s
    for _ in range(n):
        if time.monotonic() > end:
            break
        s = socket.socket(); s.setsockopt(*ND); s.settimeout(5)
        t0 = time.perf_counter()
        try:
            s.connect((addr, port)); t1 = time.perf_counter()
            s.sendall(msg); d = s.recv(65536); t2 = time.perf_counter()
            if not d:
                raise OSError("eof")
            if len(d) < size:
                read_n(s, size - len(d))
            if s.recv(64):  # the server closes first
                raise OSError("more than the echo")
        except OSError:
            errors += 1; s.close(); continue
        s.close()
        conn.append((t1 - t0) * 1e6); first.append((t2 - t0) * 1e6)
    print(json.dumps({"first": first, "connect": conn, "errors": errors}))
elif mode == "rr":
    n, size, max_s = int(a[0]), int(a[1]), float(a[2])
    msg = b"r" * size; lat = []
    end = time.monotonic() + max_s
    s = socket.create_connection((addr, port), timeout=5); s.setsockopt(*ND)
    for _ in range(50):
        s.sendall(msg); read_n(s, size)
    for _ in range(n):
        t = time.perf_counter(); s.sendall(msg); read_n(s, size)
        lat.append((time.perf_counter() - t) * 1e6)
        if time.monotonic() > end:
            break
    s.close()
    print(json.dumps({"lat": lat}))
elif mode == "rate":
    seconds, conc, size, warm = float(a[0]), int(a[1]), int(a[2]), float(a[3])
    msg = b"c" * size; ep = select.epoll(); socks = {}
    counted = errors = total = 0; lat = []
    t_meas = time.monotonic() + warm; t_end = t_meas + seconds
    def new():
        s = socket.socket(); s.setblocking(False); s.setsockopt(*ND)
        e = s.connect_ex((addr, port))
        if e not in (0, errno.EINPROGRESS):
            s.close(); return
        socks[s.fileno()] = [s, 0, 0, time.perf_counter()]
        ep.register(s.fileno(), select.EPOLLOUT)
    for _ in range(conc):
        new()
    while socks and time.monotonic() < t_end + 2.0:  # then let the ones in flight finish
        for fd, ev in ep.poll(0.2):
            st = socks.get(fd)
            if st is None:
                continue
            s = st[0]; ok = False
            try:
                if st[1] == 0:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, "connect")
                    s.send(msg); st[1] = 1; ep.modify(fd, select.EPOLLIN)
                    continue
                d = s.recv(65536)
                if d:
                    st[2] += len(d)
                    continue
                if st[2] < size:  # the server closes first, once the echo is out
                    raise OSError("eof before the echo")
                ok = True
            except OSError:
                errors += 1
            ep.unregister(fd); del socks[fd]; s.close()
            now = time.monotonic()
            total += ok
            if ok and t_meas <= now < t_end:
                counted += 1
                if counted % 16 == 0:
                    lat.append((time.perf_counter() - st[3]) * 1e3)
            if now < t_end:
                new()
    for st in socks.values():
        st[0].close()
    lat.sort()
    print(json.dumps({"completed": counted, "total": total, "seconds": seconds, "errors": errors,
                      "p50_ms": lat[len(lat) // 2] if lat else None}))
elif mode == "down":
    nbytes = int(a[0]); buf = memoryview(bytearray(1 << 20)); got = 0
    t0 = time.perf_counter()
    s = socket.create_connection((addr, port), timeout=30); s.sendall(b"%d\n" % nbytes)
    while got < nbytes:
        k = s.recv_into(buf)
        if not k:
            break
        got += k
    t1 = time.perf_counter(); s.close()
    print(json.dumps({"bytes": got, "seconds": t1 - t0}))
elif mode == "up":
    nbytes = int(a[0]); data = memoryview(b"u" * (1 << 20)); sent = 0
    t0 = time.perf_counter()
    s = socket.create_connection((addr, port), timeout=30)
    while sent < nbytes:
        sent += s.send(data[:min(len(data), nbytes - sent)])
    s.shutdown(socket.SHUT_WR); reply = b""
    while not reply.endswith(b"\n"):
        d = s.recv(64)
        if not d:
            break
        reply += d
    t1 = time.perf_counter(); s.close()
    print(json.dumps({"bytes": int(reply or b"0"), "sent": sent, "seconds": t1 - t0}))
elif mode == "hold":
    n, size, max_s = int(a[0]), int(a[1]), float(a[2])
    msg = b"h" * size; socks = []
    for _ in range(n):
        s = socket.create_connection((addr, port), timeout=5); s.setsockopt(*ND)
        s.sendall(msg); read_n(s, size); socks.append(s)
    print(json.dumps({"open": len(socks)}), flush=True)
    select.select([sys.stdin], [], [], max_s)
    for s in socks:
        s.close()
"""

# ---------------------------------------------------------------------------------------------
# the floor: the least Python that does design.md 5a.3's SYN hold and relays, on gw. No engine,
# no rules, no counters, no timers, no caps, no backpressure (64-B messages only: the newconn, rr
# and rate workloads). What this design costs in Python on this machine, measured beside the relay:
# the part of the relay's added latency its own code could still save is relay - floor.

FLOOR = r"""
import errno, os, select, socket, struct, sys, threading
from netfilterqueue import NetfilterQueue, COPY_PACKET
queue, port, passed, max_s = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3], 0), int(sys.argv[4])
threading.Timer(max_s, os._exit, args=(0,)).start()
ep = select.epoll()
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1); ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ls.bind(("0.0.0.0", port)); ls.listen(4096); ls.setblocking(False)
ep.register(ls.fileno(), select.EPOLLIN)
ready = {}    # (device addr, port) -> the upstream leg its SYN connected
waiting = {}  # fd -> (upstream leg, held SYN, device)
peer = {}     # fd -> [socket, the other socket, eof seen]
def answer(pkt, up, dev):
    ready[dev] = up; pkt.set_mark(pkt.get_mark() | passed); pkt.repeat(); accept()
def on_syn(pkt):
    p = pkt.get_payload(); ihl = (p[0] & 15) * 4
    sport, dport = struct.unpack_from("!HH", p, ihl)
    up = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = up.connect_ex((socket.inet_ntoa(p[16:20]), dport))
    dev = (socket.inet_ntoa(p[12:16]), sport)
    if err == errno.EINPROGRESS and up.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1:
        err = 0  # connected within connect(): the state is ESTABLISHED
    if err == 0:
        answer(pkt, up, dev)
    elif err == errno.EINPROGRESS:
        waiting[up.fileno()] = (up, pkt, dev); ep.register(up.fileno(), select.EPOLLOUT)
    else:
        up.close(); pkt.drop()
def accept():
    while True:
        try:
            c, addr = ls.accept()
        except BlockingIOError:
            return
        up = ready.pop(addr, None)
        if up is None:
            c.close(); continue
        c.setblocking(False)
        for a, b in ((c, up), (up, c)):
            peer[a.fileno()] = [a, b, False]; ep.register(a.fileno(), select.EPOLLIN)
def readable(fd):
    st = peer[fd]; s, o = st[0], st[1]
    try:
        d = s.recv(65536)
    except OSError:
        d = b""
    if d:
        o.send(d); return
    st[2] = True; ep.unregister(fd)
    try:
        o.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    if peer[o.fileno()][2]:
        del peer[fd], peer[o.fileno()]; s.close(); o.close()
nfq = NetfilterQueue(); nfq.bind(queue, on_syn, max_len=4096, mode=COPY_PACKET)
qfd = nfq.get_fd(); ep.register(qfd, select.EPOLLIN)
print("ready", flush=True)
while True:
    for fd, ev in ep.poll(1.0):
        if fd == qfd:
            nfq.run(block=False)
        elif fd == ls.fileno():
            accept()
        elif fd in waiting:
            up, pkt, dev = waiting.pop(fd); ep.unregister(fd)
            if up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                up.close(); pkt.drop()
            else:
                answer(pkt, up, dev)
        elif fd in peer and not peer[fd][2]:
            readable(fd)
"""
FLOOR_QUEUE, FLOOR_PORT, FLOOR_TABLE = 25, 7431, 7431
FLOOR_TPROXY_MARK, FLOOR_PASSED_MARK = 0x04000000, 0x08000000  # outside the guard's marks
FLOOR_ADDR = UNKNOWN2_V4  # a wan address the wan server answers on; only the floor's rules match it

HAPROXY_CFG = """global
    maxconn 8000
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


@dataclass(frozen=True)
class Route:
    name: str
    ns: str
    addr: str
    ports: dict[str, int]


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def proc_mem(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1])
    return out


def cpu_s(pid: int | None) -> float | None:
    """CPU seconds of a process and its reaped children (socat forks one per connection)."""
    if pid is None:
        return None
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, world: World, args: argparse.Namespace) -> None:
        self.world = world
        self.topo = world.topo
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="hgb-relay-"))
        self.paths: dict[str, Route] = {}
        self.pids: dict[str, int | None] = {}
        self.next_once = 0

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- set-up -----------------------------------------------------------------------------

    def start_servers(self) -> None:
        topo = self.topo
        for ns in ("gw", "lan", "echo"):
            topo.run(ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                     "net.ipv4.ip_local_port_range=1024 65535")
        # gw's conntrack: tens of thousands of closed connections per second would stay 120 s
        # in TIME_WAIT; keep gw's table small (per namespace, against the host-wide maximum)
        topo.run("gw", "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=5",
                 check=False)
        server = topo.popen("wan", sys.executable, "-c", SERVER, str(ECHO_PORT),
                            str(SOURCE_PORT), str(SINK_PORT), str(ONCE_PORTS[0]),
                            str(ONCE_PORTS[-1] + 1), str(REQUEST),
                            str(int(self.args.max_seconds)))
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the wan server did not start")
        sh = self.world.addr(SMART_HOME)
        cfg = HAPROXY_CFG
        for kind, port in HAPROXY_PORTS.items():
            back = {"echo": ECHO_PORT, "source": SOURCE_PORT, "sink": SINK_PORT}[kind]
            cfg += (f"listen {kind}\n    bind {GW_LAN_V4}:{port}\n"
                    f"    server s1 {sh}:{back}\n")
        for port in ONCE_PORTS:
            cfg += (f"listen once{port}\n    bind {GW_LAN_V4}:{port + HAPROXY_OFFSET}\n"
                    f"    server s1 {sh}:{port}\n")
        (self.tmp / "haproxy.cfg").write_text(cfg)
        if shutil.which("haproxy"):
            with (self.tmp / "haproxy.log").open("w") as hlog:
                self.pids["haproxy"] = topo.popen(
                    "gw", "haproxy", "-db", "-f", str(self.tmp / "haproxy.cfg"), stdout=hlog,
                    stderr=subprocess.STDOUT).pid
        if shutil.which("socat"):
            for kind, port in SOCAT_PORTS.items():
                back = SOURCE_PORT if kind == "source" else SINK_PORT
                self.pids[f"socat-{kind}"] = topo.popen(
                    "gw", "socat", "-b", "65536",
                    f"TCP4-LISTEN:{port},bind={GW_LAN_V4},reuseaddr,fork,backlog=512",
                    f"TCP4:{sh}:{back}", stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL).pid
        time.sleep(0.5)

    def start_guard(self, profile_to: Path | None = None) -> Any:
        self.world.setup("guard", start=False, tcp_hold="relay", relay_port=RELAY_PORT)
        g = self.world.guard
        assert g is not None
        if profile_to is not None:
            g.command = ("-m", "cProfile", "-o", str(profile_to), "-m", "guard.tools.cli", "run")
        g.start()
        self.pids["relay"] = self.pids["voice"] = g.pid
        # the guard learns the names from the DNS answers the speaker gets
        sh = self.world.resolve("echo", SMART_HOME)
        voice = self.world.resolve("echo", VOICE)
        std = {"echo": ECHO_PORT, "source": SOURCE_PORT, "sink": SINK_PORT}
        self.paths = {
            "kernel": Route("kernel", "lan", sh, std),
            "relay": Route("relay", "echo", sh, std),
            "voice": Route("voice", "echo", voice, {"echo": ECHO_PORT}),
            "haproxy": Route("haproxy", "lan", GW_LAN_V4, dict(HAPROXY_PORTS)),
            "socat": Route("socat", "lan", GW_LAN_V4, dict(SOCAT_PORTS)),
        }
        if "floor" not in self.pids:  # once per run: it outlives the guards of --profile
            self.start_floor()
        self.paths["floor"] = Route("floor", "lan", FLOOR_ADDR, std)
        if not shutil.which("haproxy"):
            del self.paths["haproxy"]
        if not shutil.which("socat"):
            del self.paths["socat"]
        return g

    def start_floor(self) -> None:
        """The floor (FLOOR) on gw, for `lan`'s TCP to FLOOR_ADDR: its SYN to the floor's queue,
        back with the passed mark to TPROXY, as firewall.relay_rules does for a guarded device."""
        topo = self.topo
        match = f"-s {UNGUARDED_V4} -d {FLOOR_ADDR} -p tcp"
        m, b = FLOOR_TPROXY_MARK, FLOOR_PASSED_MARK
        for i, rule in enumerate((
                f"{match} --tcp-flags FIN,SYN,RST,ACK SYN -m mark ! --mark {b:#x}/{b:#x} "
                f"-j NFQUEUE --queue-num {FLOOR_QUEUE}",
                f"{match} -j TPROXY --on-port {FLOOR_PORT} --on-ip 0.0.0.0 "
                f"--tproxy-mark {m:#x}/{m:#x}")):
            topo.run("gw", "iptables", "-t", "mangle", "-I", "PREROUTING", str(i + 1),
                     *rule.split())
        topo.run("gw", "ip", "rule", "add", "fwmark", f"{m:#x}/{m:#x}", "lookup",
                 str(FLOOR_TABLE), "priority", "899")
        topo.run("gw", "ip", "route", "add", "local", "default", "dev", "lo", "table",
                 str(FLOOR_TABLE))
        floor = topo.popen("gw", sys.executable, "-c", FLOOR, str(FLOOR_QUEUE), str(FLOOR_PORT),
                           hex(b), str(int(self.args.max_seconds)))
        assert floor.stdout is not None
        if floor.stdout.readline().strip() != "ready":
            raise RuntimeError("the floor relay did not start")
        self.pids["floor"] = floor.pid

    # -- clients ----------------------------------------------------------------------------

    def client(self, path: Route, mode: str, port_kind: str, *a: Any,
               timeout: float = 120.0) -> dict[str, Any]:
        out = self.topo.run(path.ns, sys.executable, "-c", CLIENT, mode, path.addr,
                            str(path.ports[port_kind]), *map(str, a), timeout=timeout)
        return json.loads(out.stdout)

    def once_port(self, path: Route) -> int:
        """A once port no earlier run used (see ONCE_PORTS), as `path` reaches it."""
        port = ONCE_PORTS[self.next_once % len(ONCE_PORTS)]
        self.next_once += 1
        return port + HAPROXY_OFFSET if path.name == "haproxy" else port

    def newconn(self, path: Route, n: int, size: int) -> dict[str, Any]:
        out = self.topo.run(path.ns, sys.executable, "-c", CLIENT, "newconn", path.addr,
                            str(self.once_port(path)), str(n), str(size), str(60.0 + n * 0.01),
                            timeout=90.0 + n * 0.3)
        return dict(json.loads(out.stdout))

    def rr(self, path: Route, n: int) -> dict[str, Any]:
        return self.client(path, "rr", "echo", n, REQUEST, 60.0, timeout=90.0)

    def rate(self, path: Route, seconds: float) -> dict[str, Any]:
        port = self.once_port(path)
        procs = [self.topo.popen(path.ns, sys.executable, "-c", CLIENT, "rate", path.addr,
                                 str(port), str(seconds), str(self.args.rate_conc),
                                 str(REQUEST), "1.0")
                 for _ in range(self.args.rate_procs)]
        outs = []
        for p in procs:
            stdout, _ = p.communicate(timeout=seconds + 30)
            outs.append(json.loads(stdout))
        done = sum(o["completed"] for o in outs)
        return {"per_s": done / seconds, "completed": done, "seconds": seconds,
                "total": sum(o["total"] for o in outs),
                "errors": sum(o["errors"] for o in outs),
                "p50_ms": median([o["p50_ms"] for o in outs if o["p50_ms"] is not None])}

    def bulk(self, path: Route, direction: str, nbytes: int) -> dict[str, Any]:
        kind = "source" if direction == "down" else "sink"
        res = self.client(path, direction, kind, nbytes, timeout=180.0)
        if res["bytes"] != nbytes:
            raise RuntimeError(f"{path.name} {direction}: {res['bytes']} of {nbytes} bytes")
        res["gbit_s"] = nbytes * 8 / res["seconds"] / 1e9
        return res

    def timed(self, path: Route, fn: Any, *a: Any, kind: str = "echo") -> dict[str, Any]:
        """Run fn(path, *a) and add the CPU seconds the relaying process spent meanwhile."""
        key = path.name if path.name != "socat" else f"socat-{kind}"
        pid = self.pids.get(key)
        before = cpu_s(pid)
        res = fn(path, *a)
        after = cpu_s(pid)
        res["cpu_s"] = after - before if before is not None and after is not None else None
        return res

    def probe(self) -> None:
        """One exchange on every path, so a broken path fails loudly before the rounds."""
        for path in self.paths.values():
            if "echo" in path.ports:
                r = self.newconn(path, 3, REQUEST)
                if r["errors"] or len(r["first"]) != 3:
                    hl = self.tmp / "haproxy.log"
                    note = hl.read_text()[-1000:] if path.name == "haproxy" and hl.exists() else ""
                    raise RuntimeError(f"path {path.name} does not answer: {r} {note}")
            else:
                self.bulk(path, "down", 1 << 20)

    def relay_status(self) -> dict[str, Any]:
        g = self.world.guard
        assert g is not None
        return dict(g.cli_json("status")["relay"])


# ---------------------------------------------------------------------------------------------


NEWCONN_PATHS = ("kernel", "relay", "floor", "voice", "haproxy")
RR_PATHS = ("kernel", "relay", "floor", "voice", "haproxy")
RATE_PATHS = ("kernel", "relay", "floor", "haproxy")
BULK_PATHS = ("kernel", "relay", "haproxy", "socat")


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "load_start": loadavg(),
                              "uptime": Path("/proc/loadavg").read_text().split()[:3]}
    loads: list[float] = []
    raw: dict[str, dict[str, list[Any]]] = {t: {} for t in
                                            ("newconn", "voice_big", "rr", "rate", "down", "up")}
    nbytes = int(args.bulk_mb * 1e6)
    with TimeBound(args.max_seconds), World(iperf=False) as world:
        bench = Bench(world, args)
        try:
            bench.start_servers()
            g = bench.start_guard()
            pid = g.pid
            assert pid is not None
            time.sleep(1.0)
            report["rss_idle_kb"] = proc_mem(pid)["VmRSS"]
            bench.probe()
            report.update(hold_open(world, bench, pid))
            status0 = bench.relay_status()
            paths = bench.paths
            # Latency first, then connection rate, then bulk, each phase in rounds with the
            # paths interleaved: the rate phase leaves tens of thousands of TIME_WAIT sockets
            # (reused by tcp_tw_reuse) that would delay the latency phase's SYNs.
            for r in range(args.runs):
                loads.append(loadavg())
                for name in NEWCONN_PATHS:
                    if name in paths:
                        res = bench.timed(paths[name], bench.newconn, args.conns, REQUEST)
                        raw["newconn"].setdefault(name, []).append(res)
                        log(f"round {r + 1} newconn {name:8s} p50 {pct(res['first'], 50):.0f} us "
                            f"errors {res['errors']}")
                res = bench.newconn(paths["voice"], args.voice_big_conns, VOICE_BIG)
                raw["voice_big"].setdefault("voice", []).append(res)
                log(f"round {r + 1} newconn voice-200B p50 {pct(res['first'], 50) or 0:.0f} us")
                for name in RR_PATHS:
                    if name in paths:
                        res = bench.timed(paths[name], bench.rr, args.rounds)
                        raw["rr"].setdefault(name, []).append(res)
                        log(f"round {r + 1} rr {name:8s} p50 {pct(res['lat'], 50):.0f} us")
            for r in range(args.runs):
                loads.append(loadavg())
                for name in RATE_PATHS:
                    if name in paths:
                        res = bench.timed(paths[name], bench.rate, args.rate_seconds)
                        res["load"] = loadavg()
                        raw["rate"].setdefault(name, []).append(res)
                        log(f"round {r + 1} rate {name:8s} {res['per_s']:.0f}/s errors "
                            f"{res['errors']} load {res['load']:.2f}")
            for r in range(args.runs):
                loads.append(loadavg())
                for direction in ("down", "up"):
                    kind = "source" if direction == "down" else "sink"
                    for name in BULK_PATHS:
                        if name in paths:
                            res = bench.timed(paths[name], bench.bulk, direction, nbytes,
                                              kind=kind)
                            raw[direction].setdefault(name, []).append(res)
                            log(f"round {r + 1} {direction:4s} {name:8s} "
                                f"{res['gbit_s']:.2f} Gbit/s")
            status1 = bench.relay_status()
            report["relay_counters"] = {k: status1[k] - status0.get(k, 0) for k in status1
                                        if isinstance(status1[k], int) and k != "port"
                                        and not isinstance(status1[k], bool)}
            mem = proc_mem(pid)
            report["rss_after_kb"], report["hwm_kb"] = mem["VmRSS"], mem["VmHWM"]
            report["engine_flows"] = sum(d.get("flows", 0) for d in g.cli_json("devices"))
            report["relay_log"] = relay_log_lines(world)
            world.teardown()
            if args.profile:
                report["profile"] = profile(world, bench, args)
        finally:
            bench.close()
    report["load_end"] = loadavg()
    report["load"] = {"median": median(loads), "min": min(loads), "max": max(loads)}
    report["summary"] = summarize(raw)
    report["raw_rate"] = raw["rate"]
    return report


def hold_open(world: World, bench: Bench, pid: int) -> dict[str, Any]:
    """VmRSS with HOLD_CONNS relayed connections open (each did one 64-B exchange), before any
    bulk traffic has grown the daemon's heap."""
    holder = world.topo.popen("echo", sys.executable, "-c", CLIENT, "hold",
                              bench.paths["relay"].addr, str(ECHO_PORT), str(HOLD_CONNS),
                              str(REQUEST), "120", stdin=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdin is not None
    before = proc_mem(pid)["VmRSS"]
    try:
        line = holder.stdout.readline()
        opened = json.loads(line)["open"] if line.strip() else 0
        time.sleep(0.5)
        rss = proc_mem(pid)["VmRSS"]
        in_relay = bench.relay_status()["connections_open"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    time.sleep(0.5)
    return {"rss_before_200_kb": before, "rss_200_kb": rss, "open_during_200": in_relay,
            "held_open": opened, "rss_after_200_kb": proc_mem(pid)["VmRSS"]}


def relay_log_lines(world: World) -> list[str]:
    """The daemon's relay complaints (connection failures), distinct, first few."""
    g = world.guard
    if g is None:
        return []
    try:
        text = Path(g.log_path).read_text(errors="replace")
    except OSError:
        return []
    seen: dict[str, int] = {}
    for line in text.splitlines():
        if "relay" in line:
            key = line.split("failed:", 1)[-1].strip()[:160]
            seen[key] = seen.get(key, 0) + 1
    return [f"{n} x {k}" for k, n in list(seen.items())[:8]]


def summarize(raw: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for test, key in (("newconn", "first"), ("voice_big", "first"), ("rr", "lat")):
        s[test] = {}
        for name, runs in raw[test].items():
            # each round's percentiles, then the median of the rounds: one round disturbed by a
            # neighbour on the machine does not decide the figure
            s[test][name] = {
                "p50": median([pct(r[key], 50) for r in runs]),
                "p95": median([pct(r[key], 95) for r in runs]),
                "p50_rounds": [round(pct(r[key], 50) or 0) for r in runs],
                "n": sum(len(r[key]) for r in runs),
                "errors": sum(r.get("errors", 0) for r in runs)}
            if test == "newconn":
                s[test][name]["connect_p50"] = median([pct(r["connect"], 50) for r in runs])
    cpu: dict[str, dict[str, float | None]] = {}
    for name, runs in raw["newconn"].items():
        n = sum(len(r["first"]) for r in runs)
        c = [r["cpu_s"] for r in runs if r.get("cpu_s") is not None]
        cpu.setdefault(name, {})["us_per_conn_seq"] = sum(c) / n * 1e6 if c and n else None
    for name, runs in raw["rate"].items():
        n = sum(r["total"] for r in runs)
        c = [r["cpu_s"] for r in runs if r.get("cpu_s") is not None]
        cpu.setdefault(name, {})["us_per_conn_rate"] = sum(c) / n * 1e6 if c and n else None
        cpu[name]["cpu_share_rate"] = (sum(c) / sum(r["seconds"] + 1.0 for r in runs)
                                       if c else None)
    for name, runs in raw["rr"].items():
        n = sum(len(r["lat"]) + 50 for r in runs)
        c = [r["cpu_s"] for r in runs if r.get("cpu_s") is not None]
        cpu.setdefault(name, {})["us_per_rr"] = sum(c) / n * 1e6 if c and n else None
    for d in ("down", "up"):
        for name, runs in raw[d].items():
            c = [r["cpu_s"] for r in runs if r.get("cpu_s") is not None]
            gb = sum(r["bytes"] for r in runs) / 1e9
            cpu.setdefault(name, {})[f"s_per_gb_{d}"] = sum(c) / gb if c and gb else None
    s["cpu"] = cpu
    s["rate"] = {name: {"per_s": median([r["per_s"] for r in runs]),
                        "errors": sum(r["errors"] for r in runs),
                        "p50_ms": median([r["p50_ms"] for r in runs if r["p50_ms"]]),
                        "runs": [round(r["per_s"]) for r in runs]}
                 for name, runs in raw["rate"].items()}
    for d in ("down", "up"):
        s[d] = {name: {"gbit_s": median([r["gbit_s"] for r in runs]),
                       "runs": [round(r["gbit_s"], 3) for r in runs]}
                for name, runs in raw[d].items()}
    return s


# ---------------------------------------------------------------------------------------------
# where the relay's time goes: each workload against a daemon under cProfile


def profile(world: World, bench: Bench, args: argparse.Namespace) -> dict[str, str]:
    out: dict[str, str] = {}
    workloads = {
        "newconn": lambda: bench.newconn(bench.paths["relay"], 500, REQUEST),
        "rr": lambda: bench.rr(bench.paths["relay"], 2000),
        "rate": lambda: bench.rate(bench.paths["relay"], 3.0),
        "down": lambda: bench.bulk(bench.paths["relay"], "down", int(200e6)),
    }
    for name, work in workloads.items():
        prof = (Path(args.profile_dir) if args.profile_dir else bench.tmp) / f"{name}.prof"
        try:
            bench.start_guard(profile_to=prof)
            time.sleep(0.5)
            res = work()
            g = world.guard
            assert g is not None
            g.stop(timeout_s=15.0)
            s = io.StringIO()
            st = pstats.Stats(str(prof), stream=s)
            st.sort_stats("tottime").print_stats(args.profile_top)
            s.write("\n  the relay's and the daemon's functions, by cumulative time:\n")
            st.sort_stats("cumulative").print_stats(r"guard/(relay|daemon|engine)\.py|selectors",
                                                    args.profile_top)
            summary = {k: v for k, v in res.items() if k in ("per_s", "gbit_s", "errors")}
            out[name] = f"(under cProfile: {summary})\n" + trim_profile(s.getvalue())
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            out[name] = f"profile failed: {exc!r}"
        finally:
            world.teardown()
    return out


def trim_profile(text: str) -> str:
    lines = text.splitlines()
    keep = [ln for ln in lines if ln.strip() and not ln.startswith("   Ordered by")]
    return "\n".join(ln.replace(str(REPO) + "/", "") for ln in keep)


# ---------------------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "MISSED")


def print_report(rep: dict[str, Any], args: argparse.Namespace) -> None:
    m = rep["machine"]
    s = rep["summary"]
    print(f"machine: {m['nproc']} vCPU, {m['cpu']}, kernel {m['kernel']}, Python {m['python']}"
          + (f"; everything on CPU {args.cpu} (--cpu)" if args.cpu is not None else ""))
    ld = rep["load"]
    print(f"1-min load: {rep['load_start']:.2f} at start, {rep['load_end']:.2f} at end "
          f"(rounds: median {ld['median']:.2f}, max {ld['max']:.2f}); {args.runs} round(s), "
          "paths interleaved in each\n")
    nc, vb, rr = s["newconn"], s["voice_big"], s["rr"]
    k_nc, k_rr = nc.get("kernel"), rr.get("kernel")
    print("1. new connection: connect() start -> first byte of the 64-B echo, µs "
          "(upstream connect included; median of the rounds' percentiles)")
    print(f"{'path':14s}{'p50':>8s}{'p95':>8s}{'+p50':>8s}{'+p95':>8s}{'x p50':>7s}"
          f"{'conn p50':>10s}{'n':>6s}{'err':>5s}")
    for name, row in nc.items():
        add50 = row["p50"] - k_nc["p50"] if k_nc else None
        add95 = row["p95"] - k_nc["p95"] if k_nc else None
        x = row["p50"] / k_nc["p50"] if k_nc else None
        print(f"{name:14s}{fmt(row['p50']):>8s}{fmt(row['p95']):>8s}{fmt(add50, '+.0f'):>8s}"
              f"{fmt(add95, '+.0f'):>8s}{fmt(x, '.2f'):>7s}{fmt(row.get('connect_p50')):>10s}"
              f"{row['n']:>6d}{row['errors']:>5d}  p50 by round {row['p50_rounds']}")
    big = vb.get("voice")
    if big:
        print(f"{'voice-200B':14s}p50 {big['p50'] / 1000:.1f} ms, p95 {big['p95'] / 1000:.1f} ms "
              f"(n {big['n']}, errors {big['errors']})")
    print("  voice: 64 B <= control_record_bytes (80) passes at once; voice-200B is a tiny "
          "message kept until the quiet gap (0.2 s by design)")
    print("\n2. request/response on an open connection, 64 B each way, µs (median of the "
          "rounds' percentiles)")
    print(f"{'path':14s}{'p50':>8s}{'p95':>8s}{'+p50':>8s}{'+p95':>8s}{'x p50':>7s}{'n':>7s}")
    for name, row in rr.items():
        add50 = row["p50"] - k_rr["p50"] if k_rr else None
        add95 = row["p95"] - k_rr["p95"] if k_rr else None
        x = row["p50"] / k_rr["p50"] if k_rr else None
        print(f"{name:14s}{fmt(row['p50']):>8s}{fmt(row['p95']):>8s}{fmt(add50, '+.0f'):>8s}"
              f"{fmt(add95, '+.0f'):>8s}{fmt(x, '.2f'):>7s}{row['n']:>7d}  p50 by round "
              f"{row['p50_rounds']}")
    print(f"\n3. new connections per second ({args.rate_procs} clients x {args.rate_conc} in "
          f"flight, {args.rate_seconds:g} s; median of rounds)")
    k_rate = s["rate"].get("kernel", {}).get("per_s")
    for name, row in s["rate"].items():
        x = row["per_s"] / k_rate if k_rate else None
        print(f"{name:14s}{row['per_s']:>9.0f}/s  x kernel {fmt(x, '.2f'):>5s}  conn p50 "
              f"{fmt(row['p50_ms'], '.2f')} ms  errors {row['errors']}  rounds {row['runs']}")
    print(f"\n4. bulk, {args.bulk_mb:g} MB, Gbit/s (median of rounds; runs in brackets)")
    for d, label in (("down", "download (cloud -> speaker)"), ("up", "upload (speaker -> cloud)")):
        print(f"  {label}")
        for name, row in s[d].items():
            print(f"  {name:12s}{row['gbit_s']:>8.2f}  {row['runs']}")
    mib = 1024.0
    per = (rep["rss_200_kb"] - rep["rss_before_200_kb"]) / max(1, rep["held_open"])
    print(f"\n5. daemon VmRSS, MiB: idle {rep['rss_idle_kb'] / mib:.1f}; "
          f"{rep['held_open']} relayed connections open ({rep['open_during_200']} in the relay): "
          f"{rep['rss_200_kb'] / mib:.1f} (from {rep['rss_before_200_kb'] / mib:.1f}, "
          f"{per:.0f} KiB per connection), {rep['rss_after_200_kb'] / mib:.1f} once closed; "
          f"after all rounds {rep['rss_after_kb'] / mib:.1f} with {rep['engine_flows']} "
          f"flows in the engine (closed TCP flows stay for TCP_IDLE_S), peak (VmHWM) "
          f"{rep['hwm_kb'] / mib:.1f}")
    print("\nCPU of the relaying process (relay: `hushgate run`; haproxy; socat and its "
          "children), from /proc/PID/stat")
    print(f"{'path':10s}{'us/conn seq':>12s}{'us/conn rate':>13s}{'share rate':>11s}"
          f"{'us/rr':>8s}{'s/GB down':>11s}{'s/GB up':>9s}")
    for name, c in s["cpu"].items():
        if name == "kernel":
            continue
        print(f"{name:10s}{fmt(c.get('us_per_conn_seq')):>12s}{fmt(c.get('us_per_conn_rate')):>13s}"
              f"{fmt(c.get('cpu_share_rate'), '.0%'):>11s}{fmt(c.get('us_per_rr')):>8s}"
              f"{fmt(c.get('s_per_gb_down'), '.2f'):>11s}{fmt(c.get('s_per_gb_up'), '.2f'):>9s}")
    rc_ = s["cpu"].get("relay", {}).get("us_per_conn_rate")
    if rc_:
        print(f"  relay: {rc_:.0f} us of CPU per connection = at most {1e6 / rc_:.0f} new "
              "connections/s on one core")
    rc = rep.get("relay_counters", {})
    print("relay counters over the rounds: " + ", ".join(f"{k} {v}" for k, v in rc.items() if v))
    for line in rep.get("relay_log", []):
        print(f"  daemon log: {line}")

    print("\nratios and targets (issue 13), measured in this run:")
    rows: list[tuple[str, str, str, bool | None]] = []
    if k_nc and "relay" in nc:
        add = nc["relay"]["p50"] - k_nc["p50"]
        rows.append(("new conn +p50 relay - kernel", f"{add:+.0f} us", "<= +100 us", add <= 100))
        rows.append(("new conn p50 relay / kernel", f"{nc['relay']['p50'] / k_nc['p50']:.2f}",
                     "", None))
        if "floor" in nc:
            add = nc["floor"]["p50"] - k_nc["p50"]
            rows.append(("new conn +p50 floor - kernel", f"{add:+.0f} us", "", None))
            add = nc["relay"]["p50"] - nc["floor"]["p50"]
            rows.append(("new conn p50 relay - floor", f"{add:+.0f} us", "", None))
        if "haproxy" in nc:
            rows.append(("new conn p50 relay / haproxy",
                         f"{nc['relay']['p50'] / nc['haproxy']['p50']:.2f}", "", None))
        if "voice" in nc:
            add = nc["voice"]["p50"] - k_nc["p50"]
            rows.append(("new conn +p50 voice 64 B", f"{add:+.0f} us", "", None))
        if vb.get("voice"):
            add = vb["voice"]["p50"] - k_nc["p50"]
            rows.append(("new conn +p50 voice 200 B", f"{add / 1000:+.1f} ms", "~ +200 ms (gap)",
                         None))
    if k_rr and "relay" in rr:
        add = rr["relay"]["p50"] - k_rr["p50"]
        rows.append(("req/resp +p50 relay - kernel", f"{add:+.0f} us", "<= +50 us", add <= 50))
        rows.append(("req/resp p50 relay / kernel", f"{rr['relay']['p50'] / k_rr['p50']:.2f}",
                     "", None))
        if "floor" in rr:
            add = rr["floor"]["p50"] - k_rr["p50"]
            rows.append(("req/resp +p50 floor - kernel", f"{add:+.0f} us", "", None))
        if "haproxy" in rr:
            rows.append(("req/resp p50 relay / haproxy",
                         f"{rr['relay']['p50'] / rr['haproxy']['p50']:.2f}", "", None))
    rate = s["rate"]
    if "relay" in rate:
        v = rate["relay"]["per_s"]
        rows.append(("conn/s relay", f"{v:.0f}", ">= 5000", v >= 5000))
        if k_rate:
            rows.append(("conn/s relay / kernel", f"{v / k_rate:.2f}", "", None))
        if "floor" in rate:
            rows.append(("conn/s floor", f"{rate['floor']['per_s']:.0f}", "", None))
        if "haproxy" in rate:
            rows.append(("conn/s relay / haproxy", f"{v / rate['haproxy']['per_s']:.2f}", "",
                         None))
    for d in ("down", "up"):
        b = s[d]
        if "relay" not in b:
            continue
        v = b["relay"]["gbit_s"]
        if "kernel" in b:
            rows.append((f"bulk {d} relay / kernel", f"{v / b['kernel']['gbit_s']:.2f}", "", None))
        cs = {n: b[n]["gbit_s"] for n in ("haproxy", "socat") if n in b}
        for n, c in cs.items():
            rows.append((f"bulk {d} relay / {n}", f"{v / c:.2f}", "", None))
        if cs:
            best = max(cs, key=lambda n: cs[n])
            rows.append((f"bulk {d} relay / best C ({best})", f"{v / cs[best]:.2f}", ">= 0.5",
                         v / cs[best] >= 0.5 if d == "down" else None))
    for label, kb in (("RSS idle", rep["rss_idle_kb"]), (f"RSS {HOLD_CONNS} conns",
                                                         rep["rss_200_kb"])):
        mb = kb * 1024 / 1e6
        rows.append((label, f"{mb:.1f} MB", "< 40 MB", mb < 40))
    for label, value, target, ok in rows:
        print(f"  {label:36s}{value:>12s}  {target:16s}{verdict(ok)}")
    if "profile" in rep:
        for name, text in rep["profile"].items():
            print(f"\n--- cProfile of `hushgate run`, relay workload {name} (top by own time) ---")
            print(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds, paths interleaved in each")
    ap.add_argument("--conns", type=int, default=500, help="new connections per path per round")
    ap.add_argument("--voice-big-conns", type=int, default=20,
                    help="200-B requests to the voice host per round (each waits ~0.2 s)")
    ap.add_argument("--rounds", type=int, default=2000, help="ping-pongs per path per round")
    ap.add_argument("--rate-seconds", type=float, default=6.0)
    ap.add_argument("--rate-procs", type=int, default=2)
    ap.add_argument("--rate-conc", type=int, default=32, help="connections in flight per client")
    ap.add_argument("--bulk-mb", type=float, default=400.0)
    ap.add_argument("--quick", action="store_true",
                    help="1 round, 3-s rate, 150 MB bulk (about 1 minute)")
    ap.add_argument("--profile", action="store_true",
                    help="then profile the relay workloads (daemon under cProfile)")
    ap.add_argument("--profile-top", type=int, default=22)
    ap.add_argument("--profile-dir", default="",
                    help="keep the .prof files there (default: deleted with the run)")
    ap.add_argument("--cpu", type=int, default=None,
                    help="run everything (clients, servers, guard, relays) on this one CPU, as on "
                         "a single-core router: no wake-up crosses cores")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="hard bound on the run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.rate_seconds, args.bulk_mb, args.voice_big_conns = 1, 3.0, 150.0, 10
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})  # every process started from here inherits it
    if os.geteuid() != 0:
        print("relay.py needs root (network namespaces, iptables, TPROXY)", file=sys.stderr)
        return 1
    rep = run(args)
    if args.json:
        print(json.dumps(rep, indent=1, default=str))
    else:
        print_report(rep, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
