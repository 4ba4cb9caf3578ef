"""The checks that run INSIDE the VM (tests/vm/harness.py boots it), as PID 1's job, as root.

Standard library only (python starts ~15x slower in the TCG guest; every import counts). The
topology, as design.md section 9 and an OpenWrt router have it, all in 198.18.0.0/15:

  lan   (the speaker, guarded by MAC and address)  198.18.10.2   \\
  phone (an unguarded LAN host)                    198.18.10.3   -- br-lan 198.18.10.1 in gw
  gw    (the router: forwarding, a minimal fw4 table with masquerade, hushgate's table)
  wan   (the cloud: TCP and UDP servers that count what reaches them)  198.19.0.2, gw 198.19.0.1

The cloud's plain servers and clients run in this one process: a thread enters a namespace with
setns(2) just long enough to open its socket, and the socket stays in that namespace.

The relay checks run the real guard: `hushgate run --config /vmout/config.toml` (backend
nftables, tcp_hold relay, the speaker strict) in gw, after fw4 loaded hushgate's include; the
project's TLS cloud (hushsim/cloud.py, one address per vendor host, certificates from the
harness) in wan, and its speaker simulator (hushsim/speaker.py) in lan. What left the house is
read from the TLS cloud's own counters (its control socket), never from the guard. The guard is
driven through its CLI (`hushgate pending --json`, `allow`, `deny`, `status --json`). As on an
OpenWrt router with fw4, there is no iptables in the guest (it is renamed in the overlay), so
nothing iptables-shaped cleans up behind the nftables backend.

The sabotaged pass (job "sabotage_pass"): after every check, the fail-closed ones run again with
the rendered rules sabotaged (the guard's own rules are replaced by the sabotaged fw4 include
through an fw4 reload, as fw4 would load it); each must then fail. Results in "sabotaged".

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
import shutil
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
# The TLS cloud (hushsim/cloud.py): one wan address per vendor host, :443.
VOICE = "bob-dispatch-prod-na.amazon.com"  # voice: held until a person decides
SMART_HOME = "api.amazonalexa.com"  # smart-home events: an allowed category, relayed at once
MESSAGING = "alexa-comms-mobile-service.amazon.com"  # messaging: refused
TLS_HOSTS = {VOICE: "198.19.0.10", SMART_HOME: "198.19.0.11", MESSAGING: "198.19.0.12"}
CLOUD_SOCKET = "/run/hushgate-vm-cloud.sock"
GUARD_SOCKET = "/run/hushgate/control.sock"  # the config's guard.socket
# Run again, sabotaged, in the second pass; each must fail there.
SABOTAGE_PASS_CHECKS = ("fail_closed_without_guard", "queue_without_consumer_drops",
                        "relay_fail_closed_after_kill9")


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
        here = TOPOLOGY["cloud"]  # the TLS cloud's :443 is on its own addresses
        with netns("wan"):
            for p in TCP_PORTS:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((here, p))
                s.listen(64)
                socks.append(("tcp", p, s))
            for p in UDP_PORTS:
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                u.bind((here, p))
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
        self.files = OUT  # the rendered rules; OUT / "sabotaged" in the sabotaged pass
        self.sabotaged = bool(job.get("sabotage"))  # the whole run's rules (--sabotage)
        self.tls_cloud: subprocess.Popen | None = None
        self.tls_cloud_ready = False
        self.guard: subprocess.Popen | None = None
        self.guard_starts = 0
        self.speakers: list[Speaker] = []
        self.cli_times: list[float] = []  # seconds per hushgate CLI call, for the report

    def file(self, name: str) -> Path:
        return self.files / name

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

    # the real guard and the TLS cloud

    def start_tls_cloud(self) -> None:
        """Start hushsim/cloud.py in wan (not waited for: it comes up while others run)."""
        self.tls_cloud = subprocess.Popen(
            ["ip", "netns", "exec", "wan", self.job["python"], "-m", "hushsim.cloud",
             "--config", self.job["cloud"]["config"]],
            stdout=open(OUT / "tls-cloud.log", "w"), stderr=subprocess.STDOUT,
            cwd=self.job["repo"])

    def need_tls_cloud(self) -> None:
        if self.tls_cloud_ready:
            return
        if self.tls_cloud is None:
            self.start_tls_cloud()
        assert self.tls_cloud is not None
        end = time.monotonic() + self.t(10)
        while time.monotonic() < end:
            if self.tls_cloud.poll() is not None:
                raise Failed(f"the TLS cloud exited ({self.tls_cloud.returncode}): "
                             + (OUT / "tls-cloud.log").read_text()[-600:])
            if os.path.exists(CLOUD_SOCKET):
                try:
                    cloud_request({"cmd": "ping"}, timeout=2.0)
                    self.tls_cloud_ready = True
                    return
                except (OSError, ValueError):
                    pass
            time.sleep(0.1)
        raise Failed(f"the TLS cloud was not up within {self.t(10):.0f} s")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`hushgate ARGS --socket S` (the control socket needs no namespace)."""
        t0 = time.monotonic()
        res = subprocess.run([self.job["hushgate"], *args, "--socket", GUARD_SOCKET],
                             capture_output=True, text=True, timeout=self.t(10))
        self.cli_times.append(time.monotonic() - t0)
        if check and res.returncode != 0:
            raise Failed(f"hushgate {' '.join(args)}: exit {res.returncode}: "
                         f"{(res.stderr or res.stdout).strip()[-400:]}; " + self.guard_tail())
        return res

    def cli_json(self, *args: str):
        return json.loads(self.cli(*args, "--json").stdout)

    def guard_tail(self, n: int = 8) -> str:
        try:
            lines = (OUT / "guard.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no guard log)"
        return "guard log: " + " | ".join(lines[-n:])

    def guard_running(self) -> bool:
        return self.guard is not None and self.guard.poll() is None

    def ensure_guard(self) -> str:
        """`hushgate run` in gw, ready (status answers); then an fw4 reload (fw4 reloads its
        include whenever the firewall restarts), which must leave the guard's table as it was.
        In the sabotaged pass that reload is what puts the sabotaged rules in."""
        self.need_tls_cloud()
        if self.guard_running():
            return "guard running"
        self.guard_starts += 1
        t0 = time.monotonic()
        with open(OUT / "guard.log", "a") as log:
            log.write(f"--- start {self.guard_starts} (sabotaged pass: {self.sabotaged})\n")
            log.flush()
            self.guard = subprocess.Popen(
                ["ip", "netns", "exec", "gw", self.job["hushgate"], "run", "--config",
                 "/vmout/config.toml"], stdout=log, stderr=subprocess.STDOUT)
        end = t0 + self.t(12)
        status = None
        while time.monotonic() < end and status is None:
            if self.guard.poll() is not None:
                raise Failed(f"hushgate run exited ({self.guard.returncode}) before it was "
                             "ready; " + self.guard_tail())
            if os.path.exists(GUARD_SOCKET):
                res = self.cli("status", "--json", check=False)
                if res.returncode == 0:
                    status = json.loads(res.stdout)
                    break
            time.sleep(0.2)
        if status is None:
            raise Failed(f"hushgate run not ready within {self.t(12):.0f} s; " + self.guard_tail())
        took = time.monotonic() - t0
        expect(status.get("tcp_hold") == "relay" and (status.get("relay") or {}).get("listening"),
               f"the relay is not listening: {status.get('tcp_hold')}, {status.get('relay')}")
        loaded = self.table()
        tag = "sabotaged-" if self.sabotaged else ""
        (OUT / f"{tag}loaded-by-run.nft").write_text(loaded)
        expect("tproxy" in loaded and "queue" in nft("list chain inet hushgate queue_up").stdout,
               "hushgate run loaded no tproxy or queue rule")
        Path("/var/etc/hushgate/fw4.nft").write_text(self.file("hushgate-fw4.nft").read_text())
        nft("-f /tmp/fw4.nft")  # fw4 reload, with hushgate's include
        reloaded = self.table()
        (OUT / f"{tag}loaded-after-fw4-reload.nft").write_text(reloaded)
        if not self.sabotaged:
            expect(_normalized(reloaded) == _normalized(loaded),
                   "an fw4 reload changed the table `hushgate run` loaded (see "
                   "loaded-by-run.nft and loaded-after-fw4-reload.nft)")
        rules = sh("ip rule", ns="gw").stdout
        route = sh(f"ip route show table {self.job['relay_table']}", ns="gw").stdout
        expect(f"lookup {self.job['relay_table']}" in rules and "local default" in route,
               f"the relay's policy routing is missing: {rules.strip()!r}, {route.strip()!r}")
        return (f"hushgate run ready in {took:.1f} s (relay listening on "
                f":{status['relay'].get('port', self.job['relay_port'])}); an fw4 reload "
                + ("put the sabotaged include in" if self.sabotaged else "left its table as it was"))

    def kill9_guard(self) -> None:
        assert self.guard is not None
        self.guard.send_signal(signal.SIGKILL)
        self.guard.wait(timeout=10)

    def wait_pending(self, timeout: float) -> list[dict]:
        end = time.monotonic() + timeout
        while True:
            pend = self.cli_json("pending")
            if pend or time.monotonic() >= end:
                return pend
            time.sleep(0.1)

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


# ------------------------------------------------------------------------------------ the real guard


def _json_line(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise Failed("no JSON line printed")
    return json.loads(lines[-1])


class Speaker:
    """hushsim/speaker.py in lan, connecting to `host` at its TLS cloud address: started at
    once; `ready()` waits for its TLS connection, `go()` releases a --wait-file one."""

    n = 0

    def __init__(self, ctx: Ctx, host: str, head: list[str], mode: list[str],
                 wait: bool = False) -> None:
        Speaker.n += 1
        self.ctx = ctx
        self.ready_file = Path(f"/tmp/speaker{Speaker.n}.ready")
        self.go_file = Path(f"/tmp/speaker{Speaker.n}.go")
        self.err_path = OUT / f"speaker{Speaker.n}.err"
        argv = [ctx.job["python"], "-m", "hushsim.speaker", "--ca", ctx.job["cloud"]["ca"],
                "--host", host, "--addr", TLS_HOSTS[host], "-4",
                "--ready-file", str(self.ready_file), *head, *mode]
        if wait:
            argv += ["--wait-file", str(self.go_file)]
        self.started = time.monotonic()
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(["ip", "netns", "exec", "lan", *argv],
                                         stdout=subprocess.PIPE, stderr=err, text=True,
                                         cwd=ctx.job["repo"])
        ctx.speakers.append(self)
        self._result: dict | None = None

    def ready(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.ready_file.exists() and self.ready_file.read_text().strip():
                try:
                    return json.loads(self.ready_file.read_text())
                except ValueError:
                    pass
            if self.proc.poll() is not None:
                raise Failed(f"the speaker exited before it connected: {self.result(5)}")
            time.sleep(0.1)
        raise Failed(f"the speaker was not connected within {timeout:.0f} s")

    def go(self) -> float:
        self.go_file.touch()
        return time.time()

    def result(self, timeout: float) -> dict:
        if self._result is None:
            try:
                out, _ = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise Failed(f"the speaker was still running after {timeout:.0f} s") from None
            try:
                self._result = _json_line(out)
            except (Failed, ValueError):
                raise Failed(f"the speaker printed no result (exit {self.proc.returncode}): "
                             + self.err_path.read_text()[-600:]) from None
        return self._result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def cloud_request(req: dict, timeout: float = 10.0) -> dict:
    """One request to the TLS cloud's control socket (Unix sockets ignore namespaces)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(CLOUD_SOCKET)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        for _ in range(10_000):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
            if buf.endswith(b"\n"):
                break
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise Failed(f"the TLS cloud: {answer.get('error')}")
    return answer


def cloud_conns(host: str | None = None, since: float = 0.0) -> list[dict]:
    return [c for c in cloud_request({"cmd": "stats"})["tcp"]
            if (host is None or c["host"] == host) and c["opened"] >= since]


def cloud_conn_since(host: str, since: float, timeout: float, handshake: bool = False) -> dict:
    """The TLS cloud's newest connection to `host` opened at or after `since` (through the
    relay the cloud sees the router's upstream socket, not the speaker's port)."""
    end = time.monotonic() + timeout
    while True:
        found = [c for c in cloud_conns(host, since)
                 if not handshake or c["handshake_done"] is not None]
        if found:
            return max(found, key=lambda c: c["id"])
        if time.monotonic() >= end:
            raise Failed(f"the cloud saw no connection to {host} within {timeout:.0f} s")
        time.sleep(0.1)


def cloud_conn_by_id(conn_id: int) -> dict:
    return next(c for c in cloud_request({"cmd": "stats"})["tcp"] if c["id"] == conn_id)


def cloud_wait(pred: Callable[[dict], bool], conn_id: int, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while True:
        c = cloud_conn_by_id(conn_id)
        if pred(c) or time.monotonic() >= end:
            return c
        time.sleep(0.1)


def _normalized(table: str) -> str:
    """A listed table without its counters' values (traffic between two listings)."""
    import re
    return re.sub(r"counter packets \d+ bytes \d+", "counter", table)


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
for a in {tls_addrs}; do ip -n wan addr add $a/24 dev eth0; done
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
    sh(TOPOLOGY_SCRIPT.format(**TOPOLOGY, tls_addrs=" ".join(TLS_HOSTS.values())))
    ctx.start_tls_cloud()  # comes up while the next checks run
    # OpenWrt's fw4 routers have no iptables: nothing iptables-shaped may clean up behind the
    # nftables backend (`firewall remove` cleans iptables too when the tool is there).
    hidden = []
    for tool in ("iptables", "ip6tables"):
        path = shutil.which(tool)
        if path:
            os.rename(path, path + ".hidden-as-on-openwrt")
            hidden.append(path)
    os.makedirs("/var/etc/hushgate", exist_ok=True)
    fw4 = FW4.format(include=ctx.job["fw4_include_file"])
    Path("/tmp/fw4.nft").write_text(fw4)
    nft("-f /tmp/fw4.nft")
    ctx.cloud = Cloud()
    return "; ".join([ctx.speaker_passes(ns="phone"), ctx.speaker_passes(ns="lan"),
                      f"hidden as on OpenWrt: {', '.join(hidden) or 'no iptables found'}"])


@check
def rules_load(ctx: Ctx) -> str:
    """The packaged fw4 include loads hushgate's persistent table live (nft -f, as fw4 does on
    start), and an fw4 reload leaves it exactly as it was."""
    ctx.fw4_before = nft("list table inet fw4").stdout
    Path("/var/etc/hushgate/fw4.nft").write_text(ctx.file("hushgate-fw4.nft").read_text())
    nft("-f /tmp/fw4.nft")
    first = ctx.table()
    expect("chain safety_net" in first and "chain up" in first,
           "table inet hushgate is missing or incomplete after the fw4 load")
    nft("-f /tmp/fw4.nft")  # an fw4 reload
    second = ctx.table()
    expect(first == second, "an fw4 reload changed table inet hushgate")
    tag = "sabotaged-" if ctx.sabotaged else ""
    (OUT / f"{tag}loaded-persistent.nft").write_text(second)
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
    nft(f"-f {ctx.file('dynamic-install.nft')}")
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
    cloud, every datagram seen in userspace (the speaker's TCP never passes without the relay:
    its SYN waits in the queue for the relay's connect, design.md 5a.3, and a plain accept
    sends it on unintercepted, to forward's reset)."""
    started = ctx.start_consumer()
    detail = ctx.udp_passes(5000, 20)
    time.sleep(0.3)
    seen = ctx.consumer_counts()
    expect(seen.get(5000, 0) == 20, f"the consumer saw {seen.get(5000, 0)} of 20 datagrams")
    if ctx.job.get("relayed"):
        err = tcp_send("lan", 80, 100, timeout=ctx.DROP_WAIT)
        time.sleep(0.2)
        syns = ctx.consumer_counts().get(80, 0)
        expect(err is not None and syns >= 1,
               f"the speaker's TCP :80 passed without the relay, or its SYN was not queued "
               f"({err}, {syns} queued)")
        detail += f"; relayed TCP: {syns} SYN(s) queued, then refused without the relay ({err})"
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
    nft(f"-f {ctx.file('dynamic-remove.nft')}")
    chain = nft("list chain inet hushgate queue_up").stdout
    expect("queue" not in chain.replace("chain queue_up", ""), "queue_up still holds a rule")
    before = ctx.counter("safety_net")
    detail = ctx.speaker_blocked()
    expect(ctx.counter("safety_net") > before, "the safety net counted nothing")
    return detail


@check
def run_starts_relay(ctx: Ctx) -> str:
    """`hushgate run` (nftables backend, tcp_hold relay) starts on top of fw4's include: the
    relay listens, its tproxy, queue and policy routing are loaded, and an fw4 reload keeps the
    table exactly as the guard loaded it (copies: loaded-by-run.nft, loaded-after-fw4-reload.nft)."""
    return ctx.ensure_guard()


@check
def relay_fast_path_allowed_category(ctx: Ctx) -> str:
    """A smart-home host (api.amazonalexa.com, an allowed category) is relayed at once: every
    byte at the cloud (SHA-256 equal at both ends), nothing pending, no decision asked."""
    ctx.ensure_guard()
    since = time.time()
    sp = Speaker(ctx, SMART_HOME, ["--max-seconds", str(ctx.t(4))], ["events", "--count", "2"])
    res = sp.result(ctx.t(8))
    expect(res["error"] is None and not res["reset"], f"the speaker failed: {res}")
    conn = cloud_conn_since(SMART_HOME, since, ctx.t(2))
    conn = cloud_wait(lambda c: c["sha256"] == res["sha256"], conn["id"], ctx.t(1))
    expect(conn["sha256"] == res["sha256"] and conn["app_bytes"] == res["bytes_sent"],
           f"the cloud got {conn['app_bytes']} B (sha {conn['sha256'][:12]}), the speaker sent "
           f"{res['bytes_sent']} B (sha {res['sha256'][:12]})")
    expect(conn["sni"] == SMART_HOME, f"the cloud saw SNI {conn['sni']!r}")
    relay = ctx.cli_json("status")["relay"]
    expect(relay["passed"] >= 1 and relay["bytes_up"] > 0, f"relay stats: {relay}")
    pend = ctx.cli_json("pending")
    expect(pend == [], f"pending: {pend}")
    lag = (conn["first_byte_at"] or 0) - (res["connected_at"] or 0)
    return (f"{res['bytes_sent']} B in 2 events relayed, SHA-256 equal at both ends, nothing "
            f"pending; first byte at the cloud {lag:.2f} s after the speaker's handshake; relay "
            f"passed {relay['passed']}")


@check
def relay_messaging_refused(ctx: Ctx) -> str:
    """A connection to the messaging host (alexa-comms-mobile-service.amazon.com) is refused
    before any byte reaches the cloud. The speaker here connects by address (no DNS name for the
    guard to learn), so the SYN hold (design.md 5a.3) opens the upstream TCP handshake before
    the ClientHello names the host: the cloud may see that handshake, never a byte, and the
    connection is closed."""
    ctx.ensure_guard()
    since = time.time()
    rejected0 = ctx.cli_json("status")["relay"]["rejected"]
    sp = Speaker(ctx, MESSAGING, ["--max-seconds", str(ctx.t(2))], ["events", "--count", "1"])
    res = sp.result(ctx.t(6))
    expect(res["error"] is not None or res["reset"], f"the speaker was not refused: {res}")
    expect(res["bytes_sent"] == 0, f"the speaker sent {res['bytes_sent']} B")
    time.sleep(0.5)
    conns = cloud_conns(MESSAGING, since)
    expect(all(c["app_bytes"] == 0 and c["closed"] is not None for c in conns),
           f"the cloud got bytes of, or still holds, a connection to {MESSAGING}: "
           f"{[(c['id'], c['app_bytes'], c['closed']) for c in conns]}")
    rejected = ctx.cli_json("status")["relay"]["rejected"]
    expect(rejected > rejected0, f"the relay counted no rejection ({rejected0} -> {rejected})")
    how = "reset" if res["reset"] else res["error"]
    return f"speaker refused ({how}), 0 B sent, 0 B at the cloud ({len(conns)} bare " \
           f"handshake(s), closed); relay rejected +" \
           f"{rejected - rejected0}"


@check
def relay_syn_answered_as_the_path(ctx: Ctx) -> str:
    """The SYN hold (design.md 5a.3) on nft: a SYN to a port the cloud refuses is answered with
    a reset, not with a handshake from the router's listener that "succeeds" at once."""
    ctx.ensure_guard()
    held0 = ctx.cli_json("status")["relay"]["syn_held"]
    t0 = time.monotonic()
    err = tcp_send("lan", 444, 1, timeout=ctx.t(2))
    took = time.monotonic() - t0
    expect(err is not None and "ConnectionRefused" in err and took < 1.0,
           f"a connect to a refused port: {err or 'connected'} after {took:.2f} s")
    relay = ctx.cli_json("status")["relay"]
    expect(relay["syn_held"] > held0 and relay["syn_refused"] >= 1, f"relay stats: {relay}")
    return f"refused in {took * 1000:.0f} ms ({err}); relay syn_refused {relay['syn_refused']}"


def _held_upload(ctx: Ctx, *head: str) -> tuple[Speaker, dict, dict, float, float]:
    """A speaker connected through the relay to the voice host, then released: (speaker, the
    cloud's record of the relay's upstream connection, the pending upload, go time, the time
    it was seen pending)."""
    ctx.ensure_guard()
    since = time.time()
    sp = Speaker(ctx, VOICE, ["--max-seconds", str(ctx.t(8)), *head],
                 ["upload", "--profile", "echo-opus-118"], wait=True)
    sp.ready(ctx.t(8))
    conn = cloud_conn_since(VOICE, since, ctx.t(2), handshake=True)
    expect(conn["app_bytes"] == 0, f"the cloud got {conn['app_bytes']} B before the upload")
    went = sp.go()
    pend = ctx.wait_pending(ctx.t(2))
    seen = time.time()
    expect(len(pend) == 1 and pend[0]["device"] == "speaker",
           f"pending {seen - went:.1f} s after the upload began: {pend}; " + ctx.guard_tail())
    # the whole upload (2.7 s of audio) has been written by now or soon: nothing may arrive
    end = max(time.monotonic() + 1.0, time.monotonic() + went + 3.5 - time.time())
    while True:
        got = cloud_conn_by_id(conn["id"])["app_bytes"]
        expect(got == 0, f"the cloud received {got} B of the held upload")
        if time.monotonic() >= end:
            break
        time.sleep(0.1)
    return sp, conn, pend[0], went, seen


def _pending_timing(pend: dict, went: float, seen: float) -> str:
    """When the engine made the upload pending ("started" in `pending --json`), after the
    speaker was released (it starts writing within its 0.2-s poll), and when the CLI saw it."""
    at = pend.get("started")
    engine = f"pending {at - went:.2f} s after the go" if at else "pending"
    return f"{engine} (seen by the CLI {seen - went:.1f} s after the go)"


@check
def relay_upload_held_then_allowed(ctx: Ctx) -> str:
    """The speaker's upload to the voice host is pending with 0 bytes at the cloud (the whole
    upload written, sampled for >= 1 s); `hushgate allow ID` delivers every byte: SHA-256 and
    length equal at both ends, one upload frame, the cloud's ack back at the speaker."""
    # --hold-open: the speaker waits for the cloud's ack 2 s after its last write, and the
    # guest's CLI takes ~1.5 s a call: reading on keeps the ack countable after a late allow
    sp, conn, pend, went, seen = _held_upload(ctx, "--hold-open", str(ctx.t(0.4)))
    held = cloud_conn_by_id(conn["id"])["app_bytes"]
    ctx.cli("allow", str(pend["id"]))
    res = sp.result(ctx.t(8))
    expect(res["error"] is None and not res["reset"], f"the speaker failed: {res}")
    c = cloud_wait(lambda c: c["sha256"] == res["sha256"], conn["id"], ctx.t(2))
    expect(c["sha256"] == res["sha256"] and c["app_bytes"] == res["bytes_sent"],
           f"the cloud got {c['app_bytes']} B (sha {c['sha256'][:12]}), the speaker sent "
           f"{res['bytes_sent']} B (sha {res['sha256'][:12]})")
    expect(c["upload_frames"] == 1 and res["acks"] == 1,
           f"upload frames at the cloud {c['upload_frames']}, acks at the speaker {res['acks']}")
    return (f"{_pending_timing(pend, went, seen)} ({pend['held_bytes']} B held, "
            f"{held} B at the cloud); allowed: {res['bytes_sent']} B delivered, SHA-256 "
            f"{res['sha256'][:16]} equal at both ends, acked")


@check
def relay_deny_resets(ctx: Ctx) -> str:
    """`hushgate deny ID`: the speaker is reset, the cloud got nothing of the upload and its
    connection is closed; the log says denied."""
    sp, conn, pend, went, seen = _held_upload(ctx, "--hold-open", str(ctx.t(4)))
    t0 = time.time()
    ctx.cli("deny", str(pend["id"]))
    t1 = time.time()
    res = sp.result(ctx.t(4))
    expect(res["reset"], f"the speaker was not reset: {res}")
    c = cloud_wait(lambda c: c["closed"] is not None, conn["id"], ctx.t(1))
    expect(c["app_bytes"] == 0, f"the cloud got {c['app_bytes']} B of the denied upload")
    expect(c["closed"] is not None, "the cloud's connection is still open")
    pend_after = ctx.cli_json("pending")
    expect(pend_after == [], f"still pending: {pend_after}")
    log = ctx.cli_json("log")
    if isinstance(log, dict):
        log = next((v for v in log.values() if isinstance(v, list)), [])
    expect(any(r.get("outcome") == "denied" for r in log), f"no denied record: {log[:3]}")
    return (f"{_pending_timing(pend, went, seen)}; reset "
            f"{res['reset_at'] - t1:+.2f} s after `deny` returned (the call took "
            f"{t1 - t0:.1f} s); 0 B at the cloud, its connection closed; logged denied")


@check
def relay_fail_closed_after_kill9(ctx: Ctx) -> str:
    """`hushgate run` killed with SIGKILL (its rules stay, the relay's listener is gone): the
    speaker's new TCP connection for an upload gets nothing through, 0 bytes at the cloud (the
    SYN hold's queue with no reader, the explicit drop after nft `tproxy`, FORWARD's reset
    behind them). In the sabotaged pass the killed guard's queue rules are the sabotaged ones
    (`bypass`), so each layer is seen to matter."""
    started = ctx.ensure_guard()
    pid = ctx.guard.pid if ctx.guard else None
    ctx.kill9_guard()
    if ctx.sabotaged:
        nft(f"-f {ctx.file('dynamic-install.nft')}")
    drop0 = ctx.counter("relay")
    since = time.time()
    sp = Speaker(ctx, VOICE, ["--max-seconds", str(ctx.t(0.5))],
                 ["upload", "--profile", "echo-opus-118"])
    res = sp.result(ctx.t(4))
    time.sleep(0.5)
    conns = cloud_conns(None, since)
    got = sum(c["app_bytes"] for c in conns)
    whole = any(c["sha256"] == res["sha256"] and c["app_bytes"] for c in conns)
    expect(not conns and res["bytes_sent"] == 0,
           f"the speaker's TCP reached the cloud ({len(conns)} connection(s), {got} app B"
           f"{', the whole upload: SHA-256 equal' if whole else ''}; the speaker sent "
           f"{res['bytes_sent']} B, error {res['error']})")
    expect(res["error"] is not None, f"the speaker reports no error: {res}")
    plain = ctx.speaker_blocked()
    return (f"{'' if started == 'guard running' else started + '; '}guard (pid {pid}) killed "
            f"-9; speaker: {res['error']}, 0 B sent, no connection at the TLS cloud; "
            f"{ctx.counter('relay') - drop0} packet(s) counted at the no-listener rule after "
            f"tproxy; {plain}")


@check
def firewall_remove_leaves_nothing(ctx: Ctx) -> str:
    """`hushgate firewall remove` (the CLI), after the real guard's run and kill -9 left its
    rules and the relay's policy routing: no hushgate table, chain or set is left, fw4's table
    is untouched, no ip rule or route of the relay remains, and the speaker reaches the cloud."""
    table = ctx.job["relay_table"]
    before = sh(f"ip rule; ip route show table {table}", ns="gw", check=False).stdout
    routing_before = f"lookup {table}" in before and "local default" in before
    if ctx.guard_starts:
        expect(routing_before, f"the killed guard left no relay routing to remove: {before!r}")
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
    routes = sh(f"ip route show table {table}; ip -6 route show table {table}", ns="gw",
                check=False).stdout
    expect(not routes.strip(), f"the relay's routes are left in table {table}: {routes.strip()}")
    tables = [ln.strip(" {") for ln in ruleset.splitlines() if ln.startswith("table ")]
    detail = ctx.speaker_passes()
    had = ("the relay's ip rule and route were there before" if routing_before else
           "NOTE: no relay routing was loaded before (the real guard did not run)")
    return (f"{res.stdout.strip()!r} in {took:.1f} s; {had}; tables left: {', '.join(tables)}; "
            f"no fwmark rule, table {table} empty; {detail}")


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

    def run(c: Check) -> dict:
        t0 = time.monotonic()
        try:
            detail, ok = c.fn(ctx), True
        except Failed as exc:
            detail, ok = str(exc), False
        except Exception as exc:  # a broken check is a failed one, with its reason
            detail, ok = f"{type(exc).__name__}: {exc}", False
        return {"name": c.name, "ok": ok, "detail": detail, "seconds": time.monotonic() - t0}

    # A check others build on runs even when not asked for; only asked-for ones are reported.
    needed = {"topology", "rules_load"} if wanted else set()
    for c in CHECKS:
        if wanted and c.name not in wanted and c.name not in needed:
            continue
        rec = run(c)
        print(("PASS " if rec["ok"] else "FAIL ") + f"{c.name}: {rec['detail']}", flush=True)
        if not wanted or c.name in wanted:
            results["checks"].append(rec)
        elif not rec["ok"]:
            results["checks"].append(rec)  # a prerequisite that failed explains the rest
        save()

    # The sabotaged pass: from a clean router (no guard, no hushgate table), fw4 loads the
    # sabotaged include, and the fail-closed checks run again; each must fail.
    if job.get("sabotage_pass"):
        results["sabotage_pass"] = job["sabotage_pass"]
        results["sabotaged"] = []
        ctx.sabotaged, ctx.files = True, OUT / "sabotaged"
        if ctx.guard_running():
            ctx.kill9_guard()
        if ctx.consumer is not None and ctx.consumer.poll() is None:
            ctx.consumer.kill()
        nft("delete table inet hushgate", check=False)
        names = ("rules_load", *job.get("sabotage_pass_checks", ()))
        for c in CHECKS:
            if c.name not in names:
                continue
            rec = run(c)
            print(("sabotaged: PASS " if rec["ok"] else "sabotaged: FAIL ")
                  + f"{c.name}: {rec['detail']}", flush=True)
            if c.name == "rules_load":
                if not rec["ok"]:
                    results["error"] = f"the sabotaged pass could not load its rules: {rec}"
                    break
                continue
            results["sabotaged"].append(rec)
            save()

    for sp in ctx.speakers:
        sp.kill()
    for proc in (ctx.guard, ctx.tls_cloud, ctx.consumer):
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    results["cli_seconds"] = [round(x, 2) for x in ctx.cli_times]
    results["guest_seconds"] = time.time() - t_start
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
