"""What the router forwards with and without the guard: bulk TCP and 64-byte UDP, side by side.

Rules of this file: all traffic stays inside namespaces this script creates (hushsim.topology,
prefix `hgb`, addresses in 198.18.0.0/15); every process is started through the topology and
killed by PID, and the namespaces are deleted on exit, on an exception, on SIGTERM and when the
overall time bound (`--max-seconds`) runs out. Every mode is measured in the same run, rounds
interleaved (round 1: a b c d e, round 2: a b c d e, ...), and the median of the rounds is
reported, so a busy neighbour on the machine hurts all modes alike.

    python bench/forwarding.py [--runs 3] [--seconds 4] [--json] [--scaling]

Traffic is a LAN host (the speaker `echo`, configured in the guard by MAC and address) -> gw
(forwarding, masquerade, the guard's rules in mangle FORWARD) -> wan (iperf3 servers):
  tcp_up    iperf3 TCP, the speaker sends (every upstream segment meets the queue rule)
  tcp_down  iperf3 TCP -R, the cloud sends: data is accepted in the kernel (the guard does not
            queue downstream packets), the speaker's ACKs meet the queue rule
  udp64     iperf3 UDP, 64-byte payloads, unlimited rate: packets per second that arrive
Modes (the persistent ruleset of `hushgate firewall apply` is in place in all of them):
  none      no queue: the dynamic queue chains hold ACCEPT instead of NFQUEUE (conntrack,
            dispatch, connmark fast-path rules and the fail-closed safety net all in force)
  bare      the NFQUEUE rule of `hushgate run` at the same position, a consumer that accepts
  dpkt      the same, and the consumer parses IP/TCP/UDP with dpkt before it accepts
  fast      `hushgate run`, the speaker's flow to a media host (amzdigital-a.akamaihd.net,
            named by the DNS answer the guard observed): connmark fast path
  inspected `hushgate run`, a voice flow (bob-dispatch-prod-na.amazon.com) for tcp_down, an
            unknown host for udp64 (tcp_up on a voice flow is an upload: it is held, not timed)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from guard.core.config import parse_config  # noqa: E402
from guard.shell.firewall import IptablesBackend, netns_runner  # noqa: E402
from guard.shell.fwspec import spec_from_config  # noqa: E402
from hushsim.topology import Topology, TopologyError, cleanup_stale  # noqa: E402
from tests.e2e.guardkit import Guard, device, queue_counters  # noqa: E402

PREFIX = "hgb"
QUEUE = 21
SPEAKER = ("echo", "198.18.10.10", "2001:2:0:10::10", "68:db:f5:90:19:64")
VOICE = "bob-dispatch-prod-na.amazon.com"
MEDIA = "amzdigital-a.akamaihd.net"
SMART_HOME = "api.amazonalexa.com"
UNKNOWN_V4 = "198.19.0.200"  # an address on the wan side with no DNS name
# A second one: --queue-balance spreads by address pair (and protocol), not by port, so two
# flows between the same two hosts always share a queue.
UNKNOWN2_V4 = "198.19.0.201"
IPERF_PORTS = (5201, 5202)
MAX_LEN = 4096 + 1024  # what the daemon binds with (max_held_packets_total + 1024)
COPY_RANGE = 4016  # what the daemon copies (guard.shell.nfqueue.COPY_RANGE)

MODES = ("none", "bare", "dpkt", "fast", "inspected")
WORKLOADS = ("tcp_up", "tcp_down", "udp64")

# The two reference consumers. Same bind arguments as the daemon (queue length, copy mode and
# range); `q.run()` is the tightest loop netfilterqueue offers. A verdict is always given.
CONSUMER = r"""
import sys
from netfilterqueue import COPY_PACKET, NetfilterQueue
kind, number, max_len, copy_range = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if kind == "dpkt":
    import dpkt
    IP, TCP, UDP = dpkt.ip.IP, dpkt.tcp.TCP, dpkt.udp.UDP

    def cb(p):
        try:
            ip = IP(p.get_payload())
            l4 = ip.data
            if isinstance(l4, (TCP, UDP)):
                _ = (ip.src, ip.dst, l4.sport, l4.dport, len(l4.data))
        except Exception:
            pass
        finally:
            p.accept()
else:
    def cb(p):
        p.accept()
q = NetfilterQueue()
q.bind(number, cb, max_len=max_len, mode=COPY_PACKET, range=copy_range)
print("ready", flush=True)
try:
    q.run()
finally:
    q.unbind()
"""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def loadavg() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


def wait_for_load(limit: float, max_wait_s: float) -> float:
    """Wait (bounded) until the 1-minute load is under `limit`; the load seen at the end."""
    deadline = time.monotonic() + max_wait_s
    load = loadavg()
    while load >= limit and time.monotonic() < deadline:
        log(f"1-min load {load:.2f} >= {limit}: waiting")
        time.sleep(10)
        load = loadavg()
    return load


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": os.uname().release,
            "python": sys.version.split()[0]}


def median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


class TimeBound:
    """SIGALRM after `seconds`: raises, so every `with` block below cleans up on the way out."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> TimeBound:
        def expired(signum: int, frame: Any) -> None:
            raise TimeoutError(f"benchmark exceeded its bound of {self.seconds:.0f} s")

        signal.signal(signal.SIGALRM, expired)
        signal.alarm(max(1, int(self.seconds)))
        return self

    def __exit__(self, *exc: object) -> None:
        signal.alarm(0)


class World:
    """The simulated home for benchmarks: gw, wan, the unguarded `lan` host and the speakers,
    dnsmasq (the guard learns names from its answers), iperf3 servers in wan, and helpers to put
    the router in each mode. A context manager; closing deletes everything."""

    def __init__(self, speakers: Sequence[tuple[str, str | None, str | None, str | None]] = (
            SPEAKER,), iperf: bool = True, dns_ttl_s: int = 3600) -> None:
        cleanup_stale(PREFIX)
        self.topo = Topology(speakers=list(speakers), cloud=False, prefix=PREFIX,
                             dns_ttl_s=dns_ttl_s, lifetime_s=3600)
        self.iperf = iperf
        self.device_names: list[str] = [speakers[0][0]] if speakers else []
        self.consumer: subprocess.Popen[str] | None = None
        self.guard: Guard | None = None
        self.backend: IptablesBackend | None = None

    def __enter__(self) -> World:
        self.topo.start()
        try:
            for addr in (UNKNOWN_V4, UNKNOWN2_V4):
                self.topo.run("wan", "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            if self.iperf:
                # One server per address: a UDP server that is not bound to the address the
                # client used answers from the interface's first address, which the client's
                # connected socket (and the router's NAT) ignore.
                for addr in (self.addr(MEDIA), self.addr(VOICE), UNKNOWN_V4, UNKNOWN2_V4):
                    for port in IPERF_PORTS:
                        self.topo.popen("wan", "iperf3", "-s", "-B", addr, "-p", str(port),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.3)
        except BaseException:
            self.topo.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.teardown()
        finally:
            self.topo.close()

    # -- addresses ------------------------------------------------------------------------

    def addr(self, name: str) -> str:
        return self.topo.hosts[name][0]

    def resolve(self, host: str, name: str) -> str:
        """Resolve `name` from LAN host `host` through dnsmasq (the guard observes the answer)."""
        out = self.topo.run(host, "getent", "ahostsv4", name, timeout=5).stdout
        return out.split()[0]

    # -- modes ----------------------------------------------------------------------------

    def config(self, devices: Sequence[dict[str, Any]], **guard_keys: Any) -> Any:
        return parse_config({"guard": {"queue": QUEUE, **guard_keys}, "device": list(devices)})

    def devices(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """[[device]] tables (strict, by MAC and address) of the guarded LAN hosts."""
        return [device(self.topo, n) for n in (names or self.device_names)]

    def _backend(self, queue: int | str = QUEUE) -> IptablesBackend:
        spec = spec_from_config(self.config(self.devices(), queue=queue))
        return IptablesBackend(spec, run=netns_runner(self.topo.ns("gw")),
                               binaries=(self.topo.iptables, self.topo.ip6tables))

    def setup(self, mode: str, queue: int | str = QUEUE, start: bool = True,
              **guard_keys: Any) -> None:
        """Put gw in `mode` (none, bare, dpkt, guard); `teardown` undoes it."""
        self.teardown()
        if mode in ("none", "bare", "dpkt"):
            self.backend = self._backend()
            self.backend.install_dynamic()
            if mode == "none":
                text = "*mangle\n"
                for chain in ("HUSHGATE_QUEUE", "HUSHGATE_DNS"):
                    text += f":{chain} - [0:0]\n-A {chain} -j ACCEPT\n"
                text += "COMMIT\n"
                for tool in (self.topo.iptables, self.topo.ip6tables):
                    self.topo.run("gw", f"{tool}-restore", "-w", "--noflush", input=text)
            else:
                self.consumer = self.topo.popen(
                    "gw", sys.executable, "-c", CONSUMER, mode, str(QUEUE), str(MAX_LEN),
                    str(COPY_RANGE))
                assert self.consumer.stdout is not None
                line = self.consumer.stdout.readline()
                if line.strip() != "ready":
                    raise TopologyError(f"{mode} consumer did not start: {line!r} "
                                        f"{self.consumer.stderr.read() if self.consumer.stderr else ''}")
        elif mode == "guard":
            keys = {"hold_timeout_s": 20.0, **guard_keys}
            self.guard = Guard(self.topo, self.devices(), queue=queue, autostart=False, **keys)
            self.guard.__enter__()
            if start:
                self.guard.start()
        else:
            raise ValueError(mode)

    def teardown(self) -> None:
        if self.consumer is not None:
            proc, self.consumer = self.consumer, None
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        if self.guard is not None:
            guard, self.guard = self.guard, None
            guard.close()
        if self.backend is not None:
            backend, self.backend = self.backend, None
            backend.remove_all()

    # -- traffic --------------------------------------------------------------------------

    def nfqueue_stats(self) -> dict[int, dict[str, int]]:
        """/proc/net/netfilter/nfnetlink_queue of gw, per queue number: packets waiting for a
        verdict, dropped because the queue was full, and queued in all (id_sequence)."""
        text = self.topo.run("gw", "cat", "/proc/net/netfilter/nfnetlink_queue").stdout
        out = {}
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 8:
                out[int(f[0])] = {"waiting": int(f[2]), "queue_dropped": int(f[5]),
                                  "user_dropped": int(f[6]), "queued": int(f[7])}
        return out

    def wan_rx_packets(self) -> int:
        out = self.topo.run("wan", "ip", "-j", "-s", "link", "show", "dev", "eth0").stdout
        return int(json.loads(out)[0]["stats64"]["rx"]["packets"])

    def queued(self) -> int:
        return sum(queue_counters(self.topo).values())

    def iperf3(self, host: str, target: str, workload: str, seconds: float,
               port: int = IPERF_PORTS[0], extra: Sequence[str] = ()) -> dict[str, Any]:
        """One iperf3 run from LAN host `host`; {"value", "unit", "queued", ...}."""
        args = ["iperf3", "-c", target, "-p", str(port), "-J", "-t", str(seconds),
                "--connect-timeout", "3000", *extra]
        if workload == "tcp_down":
            args += ["-R", "-O", "1"]
        elif workload == "udp64":
            args += ["-u", "-b", "0", "-l", "64"]
        else:
            args += ["-O", "1"]
        before = self.queued()
        rx_before = self.wan_rx_packets()
        proc = self.topo.run(host, *args, check=False, timeout=seconds + 30)
        rx = self.wan_rx_packets() - rx_before
        queued = self.queued() - before
        try:
            out = json.loads(proc.stdout)
        except ValueError:
            return {"value": None, "error": (proc.stderr or proc.stdout)[-300:], "queued": queued}
        if out.get("error"):
            return {"value": None, "error": out["error"], "queued": queued}
        end = out["end"]
        if workload == "udp64":
            # What the router delivered: packets the cloud's interface received while the sender
            # sent for `seconds` (iperf3's own loss count is unreliable at this rate).
            s = end["sum"]
            return {"value": rx / seconds / 1e3, "unit": "kpps",
                    "sent_kpps": s["packets"] / s["seconds"] / 1e3, "queued": queued}
        bps = end["sum_received"]["bits_per_second"]
        return {"value": bps / 1e9, "unit": "Gbit/s", "queued": queued,
                "retransmits": end.get("sum_sent", {}).get("retransmits")}


# ---------------------------------------------------------------------------------------------


def targets(world: World, mode: str) -> dict[str, str | None]:
    """Where each workload goes in `mode` (None: not measured)."""
    media = world.addr(MEDIA)
    if mode == "fast":
        return {w: media for w in WORKLOADS}
    if mode == "inspected":
        return {"tcp_up": None, "tcp_down": world.addr(VOICE), "udp64": UNKNOWN_V4}
    return {w: media for w in WORKLOADS}


def run_forwarding(world: World, modes: Sequence[str], workloads: Sequence[str], runs: int,
                   seconds: float) -> dict[str, Any]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {w: [] for w in workloads} for m in modes}
    loads: list[float] = []
    for r in range(runs):
        for mode in modes:
            loads.append(loadavg())
            world.setup("guard" if mode in ("fast", "inspected") else mode)
            try:
                where = targets(world, mode)
                if mode == "fast":
                    where = {w: world.resolve("echo", MEDIA) if a else None
                             for w, a in where.items()}
                elif mode == "inspected":
                    world.resolve("echo", VOICE)  # names the voice address for the guard
                for w in workloads:
                    target = where.get(w)
                    if target is None:
                        continue
                    res = world.iperf3("echo", target, w, seconds)
                    res["load"] = loadavg()
                    results[mode][w].append(res)
                    v = res["value"]
                    log(f"round {r + 1} {mode:9s} {w:8s} "
                        f"{'-' if v is None else f'{v:.3f}'} {res.get('unit', '')} "
                        f"queued={res['queued']} load={res['load']:.2f}"
                        + (f" error={res.get('error')}" if res.get("error") else ""))
            finally:
                world.teardown()
    table: dict[str, dict[str, Any]] = {}
    for mode in modes:
        table[mode] = {}
        for w in workloads:
            vals = [x["value"] for x in results[mode][w]]
            if not vals:
                continue
            table[mode][w] = {
                "median": median(vals), "runs": vals,
                "unit": next((x.get("unit") for x in results[mode][w] if x.get("unit")), ""),
                "queued_median": median([x["queued"] for x in results[mode][w]]),
            }
    return {"table": table, "raw": results, "load": {"min": min(loads), "max": max(loads),
                                                     "median": median(loads)}}


def ratio(table: dict[str, Any], a: str, b: str, w: str) -> float | None:
    x = table.get(a, {}).get(w, {}).get("median")
    y = table.get(b, {}).get(w, {}).get("median")
    return x / y if x is not None and y else None


RATIOS = (  # (numerator, denominator, workload, target or None)
    ("fast", "none", "tcp_up", 0.9),
    ("fast", "none", "tcp_down", 0.9),
    ("fast", "none", "udp64", 0.9),
    ("inspected", "dpkt", "tcp_down", 1.0),
    ("inspected", "dpkt", "udp64", 1.0),
    ("inspected", "bare", "tcp_down", None),
    ("inspected", "bare", "udp64", None),
    ("bare", "none", "tcp_up", None),
    ("dpkt", "bare", "tcp_up", None),
)


def print_forwarding(res: dict[str, Any]) -> None:
    table = res["table"]
    head = f"{'mode':10s}" + "".join(f"{w + ' (' + u + ')':>24s}" for w, u in
                                     (("tcp_up", "Gbit/s"), ("tcp_down", "Gbit/s"),
                                      ("udp64", "kpps")))
    print(head)
    for mode, row in table.items():
        cells = ""
        for w in WORKLOADS:
            c = row.get(w)
            if c is None:
                cells += f"{'held (upload)' if mode == 'inspected' and w == 'tcp_up' else '-':>24s}"
            else:
                cells += f"{c['median']:>14.3f} q={int(c['queued_median']):>7d}"
        print(f"{mode:10s}{cells}")
    print("(median of runs; q = packets that reached userspace per run, from the NFQUEUE "
          "rule counters)")
    print()
    print(f"{'ratio':34s}{'value':>8s}{'target':>8s}")
    for a, b, w, target in RATIOS:
        r = ratio(table, a, b, w)
        if r is None:
            continue
        mark = "" if target is None else (" ok" if r >= target else " MISSED")
        t = f">={target}" if target is not None else ""
        print(f"{a + '/' + b + ' ' + w:34s}{r:>8.2f}{t:>8s}{mark}")
    ld = res["load"]
    print(f"\n1-min load during the runs: median {ld['median']:.2f}, "
          f"min {ld['min']:.2f}, max {ld['max']:.2f}")


# -- scaling across queues -------------------------------------------------------------------


def run_scaling(world: World, runs: int, seconds: float) -> dict[str, Any]:
    """Two parallel 64-B UDP senders to two unknown hosts (two address pairs, so --queue-balance
    can spread them) through the inspected path, with one queue vs a range of two queues
    (queue = "21-22"; the daemon binds both and serves them from its one packet thread)."""
    out: dict[str, list[float]] = {"1 queue": [], "2 queues (queue-balance)": []}
    spread: dict[str, list[dict[str, int]]] = {k: [] for k in out}
    for _ in range(runs):
        for label, queue in (("1 queue", QUEUE), ("2 queues (queue-balance)", f"{QUEUE}-{QUEUE + 1}")):
            world.setup("guard", queue=queue)
            try:
                assert world.guard is not None
                procs = []
                before = world.nfqueue_stats()
                rx_before = world.wan_rx_packets()
                for target in (UNKNOWN_V4, UNKNOWN2_V4):
                    args = ["iperf3", "-c", target, "-p", str(IPERF_PORTS[0]), "-J", "-t", str(seconds),
                            "-u", "-b", "0", "-l", "64"]
                    procs.append(world.topo.popen("echo", *args))
                for p in procs:
                    p.communicate(timeout=seconds + 30)
                total = (world.wan_rx_packets() - rx_before) / seconds / 1e3
                out[label].append(total)
                after = world.nfqueue_stats()
                spread[label].append({q: after[q]["queued"] - before.get(q, {}).get("queued", 0)
                                      for q in after})
                log(f"scaling {label}: {total:.1f} kpps, queued per queue {spread[label][-1]}")
            finally:
                world.teardown()
    return {"kpps": {k: median(v) for k, v in out.items()}, "runs": out, "per_queue": spread}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="iperf3 -t (1 s more is omitted)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--scaling", action="store_true", help="also: 1 queue vs --queue-balance 2")
    ap.add_argument("--wait-load", type=float, default=0.0,
                    help="first wait (up to 10 min) for the 1-min load to drop under this")
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="hard bound on the run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("forwarding.py needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 1
    modes = [m for m in args.modes.split(",") if m]
    workloads = [w for w in args.workloads.split(",") if w]
    if args.wait_load:
        wait_for_load(args.wait_load, 600)
    report: dict[str, Any] = {"machine": machine(), "load_start": loadavg()}
    with TimeBound(args.max_seconds), World() as world:
        report["forwarding"] = run_forwarding(world, modes, workloads, args.runs, args.seconds)
        if args.scaling:
            report["scaling"] = run_scaling(world, args.runs, args.seconds)
    report["load_end"] = loadavg()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    m = report["machine"]
    print(f"machine: {m['nproc']} vCPU, {m['cpu']}, kernel {m['kernel']}, Python {m['python']}")
    print(f"runs: {args.runs} x {args.seconds:g} s per cell (TCP: iperf3's first second omitted; "
          "UDP: packets the wan interface received during the run)\n")
    print_forwarding(report["forwarding"])
    if args.scaling:
        sc = report["scaling"]["kpps"]
        print("\n64-B UDP, two flows, inspected path (kpps, median):")
        for k, v in sc.items():
            print(f"  {k:28s}{v:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
