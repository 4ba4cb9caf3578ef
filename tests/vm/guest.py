"""The checks that run INSIDE the VM (tests/vm/harness.py boots it), as PID 1's job, as root.

Standard library only (python starts ~15x slower in the TCG guest; every import counts). The
topology, as design.md section 9 and an OpenWrt router have it, all in 198.18.0.0/15:

  lan   (the speaker, guarded by MAC and address)  198.18.10.2   \\
  phone (an unguarded LAN host)                    198.18.10.3   -- br-lan 198.18.10.1 in gw
  gw    (the router: forwarding, a minimal fw4 table with masquerade, hushgate's table)
  wan   (the cloud: TCP and UDP servers that count what reaches them)  198.19.0.2, gw 198.19.0.1

The cloud's servers and the clients run in this one process: a thread enters a namespace with
setns(2) just long enough to open its socket, and the socket stays in that namespace.

Checks are functions registered in order with @check; each returns a one-line detail or raises
Failed. They share state (the rules loaded, the queue consumer), so later ones build on earlier
ones; a check that needs an earlier one's state says so in its detail when it is missing. Add a
check by writing one more function; tests/vm/test_nft_live.py turns each into a test.
Results go to /vmout/results.json after every check, so a crash still reports what ran.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TOPOLOGY = {
    "speaker": "198.18.10.2",
    "speaker_mac": "02:00:5e:10:00:02",
    "phone": "198.18.10.3",
    "phone_mac": "02:00:5e:10:00:03",
    "router_lan": "198.18.10.1",
    "router_wan": "198.19.0.1",
    "cloud": "198.19.0.2",
    "queue": 7,
}
TCP_PORTS = (80, 443, 8443)
UDP_PORTS = (443, 5000, 5001, 5002)
# The queue consumer's verdicts by the cloud port: plain accept, accept with the allow mark
# (the connmark fast path takes over), accept with the block mark (the kernel rejects the rest).
PLAIN, ALLOW, BLOCK = (80, 5000), (443, 5001), (5002,)
OUT = Path("/vmout")


class Failed(AssertionError):
    pass


@dataclass(frozen=True)
class Check:
    name: str
    doc: str
    fn: Callable[[Ctx], str]


CHECKS: list[Check] = []


def check(fn: Callable[[Ctx], str]) -> Callable[[Ctx], str]:
    CHECKS.append(Check(fn.__name__, (fn.__doc__ or "").strip().split("\n")[0], fn))
    return fn


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise Failed(msg)


# ------------------------------------------------------------------------------------ plumbing

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class netns:
    """Move the calling thread into network namespace `name` (and back on exit)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {self.name}")
        finally:
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        _libc.setns(self.orig, CLONE_NEWNET)
        os.close(self.orig)


def sh(cmd: str | list[str], ns: str | None = None, check: bool = True, input: str | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess:
    argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        shown = cmd if isinstance(cmd, str) else " ".join(cmd)
        raise Failed(f"`{shown}` failed ({res.returncode}): "
                     f"{(res.stderr or res.stdout).strip()[-600:]}")
    return res


def nft(args: str, ns: str = "gw", input: str | None = None, check: bool = True):
    return sh(["nft", *args.split()], ns=ns, input=input, check=check)


class Cloud:
    """Servers in `wan` that count what reaches them, per port."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tcp: dict[int, int] = {}
        self.tcp_conns: dict[int, int] = {}
        self.udp: dict[int, int] = {}
        socks = []
        with netns("wan"):
            for p in TCP_PORTS:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", p))
                s.listen(64)
                socks.append(("tcp", p, s))
            for p in UDP_PORTS:
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                u.bind(("0.0.0.0", p))
                socks.append(("udp", p, u))
        self.reset()
        self.listeners = {s: (kind, p) for kind, p, s in socks}
        self.error: str | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # every later check says so instead of timing out blind
            self.error = f"the cloud's server loop died: {type(exc).__name__}: {exc}"
            raise

    def reset(self) -> None:
        if getattr(self, "error", None):
            raise Failed(self.error)
        with self.lock:
            self.tcp = dict.fromkeys(TCP_PORTS, 0)
            self.tcp_conns = dict.fromkeys(TCP_PORTS, 0)
            self.udp = dict.fromkeys(UDP_PORTS, 0)

    def _loop(self) -> None:
        conns: dict[socket.socket, int] = {}
        while True:
            r, _, _ = select.select([*self.listeners, *conns], [], [], 1.0)
            for s in r:
                if s in self.listeners:
                    kind, p = self.listeners[s]
                    if kind == "tcp":
                        c, _ = s.accept()
                        conns[c] = p
                        with self.lock:
                            self.tcp_conns[p] += 1
                    else:
                        s.recvfrom(65536)
                        with self.lock:
                            self.udp[p] += 1
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    conns.pop(s)
                    s.close()
                    continue
                with self.lock:
                    self.tcp[conns[s]] += len(data)

    def wait_tcp(self, port: int, nbytes: int, timeout: float) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.tcp[port] < nbytes:
            time.sleep(0.05)
        return self.tcp[port]

    def wait_udp(self, port: int, n: int, timeout: float) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.udp[port] < n:
            time.sleep(0.05)
        return self.udp[port]


def tcp_send(ns: str, port: int, nbytes: int, timeout: float) -> str | None:
    """Connect from `ns` to the cloud and send `nbytes`; None on success, else the error."""
    with netns(ns):
        s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((TOPOLOGY["cloud"], port))
        s.sendall(b"x" * nbytes)
        s.shutdown(socket.SHUT_WR)
        return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        s.close()


def udp_send(ns: str, port: int, n: int, gap: float = 0.02, size: int = 200) -> None:
    with netns(ns):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.connect((TOPOLOGY["cloud"], port))
        for _ in range(n):
            try:
                u.send(b"u" * size)
            except ConnectionRefusedError:
                pass  # an ICMP error from an earlier datagram
            time.sleep(gap)
    finally:
        u.close()


def udp_refused(ns: str, port: int, timeout: float) -> bool:
    """Does a datagram to the cloud's `port` get ICMP port-unreachable back?"""
    with netns(ns):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(timeout)
    try:
        u.connect((TOPOLOGY["cloud"], port))
        u.send(b"q" * 1200)
        u.recv(100)
        return False
    except ConnectionRefusedError:
        return True
    except TimeoutError:
        return False
    finally:
        u.close()


# ------------------------------------------------------------------------------------ context


class Ctx:
    def __init__(self, job: dict) -> None:
        self.job = job
        self.scale = float(job.get("time_scale", 1.0))
        self.cloud: Cloud | None = None
        self.consumer: subprocess.Popen | None = None
        self.fw4_before: str | None = None

    def t(self, seconds: float) -> float:
        """A time limit for CPU-bound work (process start-up), scaled to the guest's speed."""
        return seconds * self.scale

    # the network waits are not CPU-bound; a fixed limit with margin
    DROP_WAIT = 1.5  # how long a packet that should not arrive is given to arrive anyway
    PASS_WAIT = 10.0  # how long one that should arrive may take

    def table(self) -> str:
        res = nft("list table inet hushgate", check=False)
        return res.stdout if res.returncode == 0 else ""

    def counter(self, chain: str) -> int:
        """Packets counted by the rules of one chain of table inet hushgate."""
        res = nft(f"list chain inet hushgate {chain}", check=False)
        total = 0
        for word in res.stdout.split("packets ")[1:]:
            total += int(word.split()[0])
        return total

    def start_consumer(self) -> str:
        q = self.job["queue"]
        m = self.job["marks"]
        state = OUT / "consumer.json"
        state.unlink(missing_ok=True)
        argv = [self.job["python"], str(Path(self.job["repo"]) / "tests/vm/nfq_consumer.py"),
                str(q), str(m["mask"]), str(m["allow"]), str(m["block"]), TOPOLOGY["speaker"],
                ",".join(map(str, PLAIN)), ",".join(map(str, ALLOW)),
                ",".join(map(str, BLOCK)), str(state)]
        t0 = time.monotonic()
        self.consumer = subprocess.Popen(["ip", "netns", "exec", "gw", *argv],
                                         stdout=open(OUT / "consumer.log", "w"),
                                         stderr=subprocess.STDOUT)
        end = t0 + self.t(2.0)
        while time.monotonic() < end:
            if state.exists():
                return f"consumer bound queue {q} in {time.monotonic() - t0:.1f} s"
            if self.consumer.poll() is not None:
                raise Failed(f"the queue consumer exited ({self.consumer.returncode}): "
                             + (OUT / "consumer.log").read_text()[-400:])
            time.sleep(0.05)
        raise Failed(f"the queue consumer was not ready after {self.t(2.0):.0f} s")

    def consumer_counts(self) -> dict[int, int]:
        try:
            data = json.loads((OUT / "consumer.json").read_text())
        except (OSError, ValueError):
            return {}
        return {int(k): v for k, v in data.get("up", {}).items()}

    def speaker_blocked(self, port_tcp: int = 80, port_udp: int = 5000) -> str:
        """Raise unless the speaker's TCP and UDP to the cloud go nowhere; the detail."""
        assert self.cloud is not None
        self.cloud.reset()
        relay0 = self.counter("relay") if self.job.get("relayed") else 0
        err = tcp_send("lan", port_tcp, 2000, timeout=self.DROP_WAIT)
        udp_send("lan", port_udp, 5)
        time.sleep(0.3)
        got_tcp, got_udp = self.cloud.tcp[port_tcp], self.cloud.udp[port_udp]
        conns = self.cloud.tcp_conns[port_tcp]
        leaks = []
        if err is None or conns or got_tcp:
            leaks.append(f"the speaker's TCP reached the cloud ({conns} connection(s), "
                         f"{got_tcp} B)")
        if got_udp:
            leaks.append(f"{got_udp} of 5 of the speaker's UDP datagrams reached the cloud")
        expect(not leaks, "; ".join(leaks))
        how = ""
        if self.job.get("relayed"):
            # the relay chain counts only at its last rule, the explicit drop after tproxy
            how = f", {self.counter('relay') - relay0} fell through tproxy to its drop"
        return f"speaker TCP :{port_tcp} ({err}{how}), UDP :{port_udp} 0/5 at the cloud"

    def udp_passes(self, port: int, n: int = 5, ns: str = "lan") -> str:
        assert self.cloud is not None
        self.cloud.reset()
        udp_send(ns, port, n)
        got = self.cloud.wait_udp(port, n, self.PASS_WAIT)
        expect(got == n, f"{ns}: {got} of {n} UDP datagrams reached the cloud on :{port}")
        return f"{ns}: UDP :{port} {n}/{n} at the cloud"

    def speaker_passes(self, port_tcp: int = 80, port_udp: int = 5000, ns: str = "lan") -> str:
        assert self.cloud is not None
        self.cloud.reset()
        err = tcp_send(ns, port_tcp, 20000, timeout=self.PASS_WAIT)
        expect(err is None, f"{ns}: TCP :{port_tcp} failed: {err}")
        got = self.cloud.wait_tcp(port_tcp, 20000, self.PASS_WAIT)
        expect(got == 20000, f"{ns}: the cloud got {got} of 20000 B on :{port_tcp}")
        udp_send(ns, port_udp, 5)
        n = self.cloud.wait_udp(port_udp, 5, self.PASS_WAIT)
        expect(n == 5, f"{ns}: {n} of 5 UDP datagrams reached the cloud on :{port_udp}")
        return f"{ns}: TCP :{port_tcp} 20000 B and UDP :{port_udp} 5/5 at the cloud"


# ------------------------------------------------------------------------------------ topology

TOPOLOGY_SCRIPT = """
set -e
for n in lan phone gw wan; do ip netns add $n; ip -n $n link set lo up; done
ip -n gw link add br-lan type bridge
ip -n gw link set br-lan up
ip -n gw addr add {router_lan}/24 dev br-lan
ip link add eth0 netns lan address {speaker_mac} type veth peer name lan-spk netns gw
ip link add eth0 netns phone address {phone_mac} type veth peer name lan-phone netns gw
ip link add eth0 netns wan type veth peer name wan0 netns gw
for p in lan-spk lan-phone; do ip -n gw link set $p master br-lan up; done
ip -n gw link set wan0 up
ip -n gw addr add {router_wan}/24 dev wan0
ip -n lan addr add {speaker}/24 dev eth0
ip -n phone addr add {phone}/24 dev eth0
ip -n wan addr add {cloud}/24 dev eth0
for n in lan phone wan; do ip -n $n link set eth0 up; done
ip -n lan route add default via {router_lan}
ip -n phone route add default via {router_lan}
ip netns exec gw sysctl -qw net.ipv4.ip_forward=1
"""

# A minimal fw4: what OpenWrt's firewall4 generates for a lan->wan zone pair, and, as fw4 does
# (ruleset-post), the include that hushgate's package installs.
FW4 = """
table inet fw4
flush table inet fw4
table inet fw4 {{
	chain forward {{
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		iifname "br-lan" oifname "wan0" accept
	}}
	chain srcnat {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname "wan0" masquerade
	}}
}}
include "{include}"
"""


@check
def topology(ctx: Ctx) -> str:
    """LAN/router/WAN namespaces, a fw4-like table with masquerade; the unguarded phone and
    (no hushgate rules yet) the speaker reach the cloud."""
    sh(TOPOLOGY_SCRIPT.format(**TOPOLOGY))
    os.makedirs("/var/etc/hushgate", exist_ok=True)
    fw4 = FW4.format(include=ctx.job["fw4_include_file"])
    Path("/tmp/fw4.nft").write_text(fw4)
    nft("-f /tmp/fw4.nft")
    ctx.cloud = Cloud()
    return "; ".join([ctx.speaker_passes(ns="phone"), ctx.speaker_passes(ns="lan")])


@check
def rules_load(ctx: Ctx) -> str:
    """The packaged fw4 include loads hushgate's persistent table live (nft -f, as fw4 does on
    start), and an fw4 reload leaves it exactly as it was."""
    ctx.fw4_before = nft("list table inet fw4").stdout
    Path("/var/etc/hushgate/fw4.nft").write_text((OUT / "hushgate-fw4.nft").read_text())
    nft("-f /tmp/fw4.nft")
    first = ctx.table()
    expect("chain safety_net" in first and "chain up" in first,
           "table inet hushgate is missing or incomplete after the fw4 load")
    nft("-f /tmp/fw4.nft")  # an fw4 reload
    second = ctx.table()
    expect(first == second, "an fw4 reload changed table inet hushgate")
    (OUT / "loaded-persistent.nft").write_text(second)
    rules = sum(1 for ln in second.splitlines() if ln.startswith("\t\t") and "type " not in ln)
    return f"table inet hushgate loaded, {rules} rule lines; an fw4 reload left it unchanged"


@check
def fail_closed_without_guard(ctx: Ctx) -> str:
    """No guard (persistent rules only): the speaker's TCP and UDP go nowhere (TCP dropped after
    tproxy when relayed, UDP by the safety net), the phone's pass."""
    before = ctx.counter("safety_net")
    detail = ctx.speaker_blocked()
    after = ctx.counter("safety_net")
    expect(after > before, f"the safety net counted nothing ({before} -> {after})")
    return f"{detail}; safety net dropped {after - before} packet(s); " + ctx.speaker_passes(
        ns="phone")


@check
def quic_refused(ctx: Ctx) -> str:
    """guard.quic = "block": the speaker's UDP :443 is answered with port-unreachable and never
    reaches the cloud, guard running or not."""
    assert ctx.cloud is not None
    ctx.cloud.reset()
    refused = udp_refused("lan", 443, timeout=ctx.DROP_WAIT)
    expect(refused, "the speaker's QUIC datagram was not refused (no ICMP port-unreachable)")
    time.sleep(0.2)
    expect(ctx.cloud.udp[443] == 0, f"{ctx.cloud.udp[443]} QUIC datagram(s) reached the cloud")
    return "UDP :443 from the speaker: ICMP port-unreachable, 0 at the cloud"


@check
def queue_without_consumer_drops(ctx: Ctx) -> str:
    """`hushgate run`'s queue rules (nft `queue`, no bypass) with nobody bound to the queue: the
    speaker's UDP is dropped by the kernel (its TCP is the relay's, dropped after tproxy)."""
    nft("-f /vmout/dynamic-install.nft")
    chain = nft("list chain inet hushgate queue_up").stdout
    expect("queue" in chain.replace("chain queue_up", ""), "queue_up holds no queue rule")
    stmt = next(ln.strip() for ln in chain.splitlines() if "queue" in ln and "chain" not in ln)
    before = ctx.counter("safety_net")
    detail = ctx.speaker_blocked()
    expect(ctx.counter("safety_net") == before,
           "the safety net counted the speaker's UDP: the queue did not take it")
    return f"{stmt!r} loaded; {detail}"


@check
def queue_with_consumer_passes(ctx: Ctx) -> str:
    """A process bound to the queue (netfilterqueue) that accepts: the speaker's UDP reaches the
    cloud, every datagram seen in userspace (the speaker's TCP is never queued when relayed)."""
    started = ctx.start_consumer()
    detail = ctx.udp_passes(5000, 20)
    time.sleep(0.3)
    seen = ctx.consumer_counts()
    expect(seen.get(5000, 0) == 20, f"the consumer saw {seen.get(5000, 0)} of 20 datagrams")
    if ctx.job.get("relayed"):
        err = tcp_send("lan", 80, 100, timeout=ctx.DROP_WAIT)
        time.sleep(0.2)
        expect(err is not None and ctx.consumer_counts().get(80, 0) == 0,
               f"the speaker's TCP :80 was queued or passed without the relay ({err})")
        detail += "; relayed TCP not queued (no relay: dropped)"
    else:
        detail += "; " + ctx.speaker_passes()
    return f"{started}; {detail}; consumer saw {seen.get(5000)} datagrams"


@check
def ct_mark_fast_path(ctx: Ctx) -> str:
    """A verdict with the allow mark is saved to the connection: the rest of the flow passes in
    the kernel, not queued; the block mark makes the kernel refuse the rest of the flow."""
    assert ctx.cloud is not None
    expect(ctx.consumer is not None and ctx.consumer.poll() is None, "no queue consumer running")
    ctx.cloud.reset()
    n = 200
    udp_send("lan", 5001, n, gap=0.002, size=1200)
    n_allow = ctx.cloud.wait_udp(5001, n, ctx.PASS_WAIT)
    udp_send("lan", 5002, 10, gap=0.05)
    time.sleep(0.3)
    n_block = ctx.cloud.udp[5002]
    seen = ctx.consumer_counts()
    expect(n_allow == n and seen.get(5001, 0) <= 2,
           f"allowed UDP: {n_allow}/{n} at the cloud, {seen.get(5001)} queued")
    expect(n_block == 1 and seen.get(5002, 0) == 1,
           f"blocked UDP: {n_block}/10 at the cloud (1 expected), {seen.get(5002)} queued")
    return (f"allowed UDP flow {n}/{n} at the cloud with {seen.get(5001)} datagram(s) queued; "
            f"blocked flow 1/10 (the one queued) at the cloud, the rest refused in the kernel")


@check
def fail_closed_after_kill9(ctx: Ctx) -> str:
    """The queue consumer killed with SIGKILL: the speaker's new packets are dropped again."""
    expect(ctx.consumer is not None and ctx.consumer.poll() is None, "no queue consumer running")
    assert ctx.consumer is not None
    ctx.consumer.send_signal(signal.SIGKILL)
    ctx.consumer.wait(timeout=10)
    return "consumer killed (-9); " + ctx.speaker_blocked()


@check
def fail_closed_after_run_exits(ctx: Ctx) -> str:
    """`hushgate run`'s exit script (queue chains flushed): the safety net still drops."""
    nft("-f /vmout/dynamic-remove.nft")
    chain = nft("list chain inet hushgate queue_up").stdout
    expect("queue" not in chain.replace("chain queue_up", ""), "queue_up still holds a rule")
    before = ctx.counter("safety_net")
    detail = ctx.speaker_blocked()
    expect(ctx.counter("safety_net") > before, "the safety net counted nothing")
    return detail


@check
def firewall_remove_leaves_nothing(ctx: Ctx) -> str:
    """`hushgate firewall remove` (the CLI): no hushgate table, chain or set is left, fw4's table
    is untouched, no policy route of the relay remains, and the speaker reaches the cloud."""
    t0 = time.monotonic()
    res = sh([ctx.job["hushgate"], "firewall", "remove", "--config", "/vmout/config.toml"],
             ns="gw", timeout=ctx.t(10))
    took = time.monotonic() - t0
    ruleset = nft("list ruleset").stdout
    (OUT / "ruleset-after-remove.nft").write_text(ruleset)
    expect("hushgate" not in ruleset, "a hushgate table, chain or set is still loaded")
    if ctx.fw4_before is not None:
        expect(nft("list table inet fw4").stdout == ctx.fw4_before, "fw4's table changed")
    rules = sh("ip rule; ip -6 rule", ns="gw").stdout
    expect("fwmark" not in rules, f"a policy rule is left: {rules.strip()}")
    tables = [ln.strip(" {") for ln in ruleset.splitlines() if ln.startswith("table ")]
    detail = ctx.speaker_passes()
    return (f"{res.stdout.strip()!r} in {took:.1f} s; tables left: {', '.join(tables)}; "
            f"no fwmark rule; {detail}")


# ------------------------------------------------------------------------------------ main


def main(job_path: str) -> int:
    t_start = time.time()
    job = json.loads(Path(job_path).read_text())
    ctx = Ctx(job)
    wanted = set(job.get("checks") or [])
    results: dict = {
        "guest_start_unix": t_start,
        "kernel": os.uname().release,
        "nft": sh("nft --version", check=False).stdout.strip(),
        "time_scale": ctx.scale,
        "relayed": bool(job.get("relayed")),
        "sabotage": job.get("sabotage", []),
        "checks": [],
    }

    def save() -> None:
        tmp = OUT / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(OUT / "results.json")

    # A check others build on runs even when not asked for; only asked-for ones are reported.
    needed = {"topology", "rules_load"} if wanted else set()
    for c in CHECKS:
        if wanted and c.name not in wanted and c.name not in needed:
            continue
        t0 = time.monotonic()
        try:
            detail, ok = c.fn(ctx), True
        except Failed as exc:
            detail, ok = str(exc), False
        except Exception as exc:  # a broken check is a failed one, with its reason
            detail, ok = f"{type(exc).__name__}: {exc}", False
        rec = {"name": c.name, "ok": ok, "detail": detail, "seconds": time.monotonic() - t0}
        print(("PASS " if ok else "FAIL ") + f"{c.name}: {detail}", flush=True)
        if not wanted or c.name in wanted:
            results["checks"].append(rec)
        elif not ok:
            results["checks"].append(rec)  # a prerequisite that failed explains the rest
        save()
    if ctx.consumer is not None and ctx.consumer.poll() is None:
        ctx.consumer.kill()
    results["guest_seconds"] = time.time() - t_start
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
