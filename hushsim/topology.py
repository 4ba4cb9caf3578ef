r"""The simulated home: LAN hosts, a router and a cloud in network namespaces (design.md section 9).

Rules of this module: every namespace, process, file and rule it makes carries this instance's
unique prefix (`hg<pid>x<n>`), so parallel runs never collide and leftovers of a crashed run are
found by name (`cleanup_stale`). Cleanup always runs (context manager exit, atexit, SIGTERM) and
always deletes the namespaces and kills, by PID, every process it started or that lives in them.
Every external command has a timeout; every wait has a bound. Addresses are 198.18.0.0/15
(RFC 2544 benchmarking) and 2001:2::/48 (RFC 5180) only.

Layout (a real home router's, so the router sees each speaker's own MAC):

    [lan]  [echo]  [homepod] ...    one namespace per LAN host, eth0 with its own MAC
       \      |      /
        br-lan (gw)  198.18.10.1/24, 2001:2:0:10::1/64; dnsmasq; forwarding; iptables
        wan0   (gw)  198.19.0.1/24,  2001:2:0:20::1/64; IPv4 MASQUERADE out of wan0
          |
        eth0  (wan)  198.19.0.10+ and 2001:2:0:20::10+, one address pair per vendor host

IPv6 is routed without NAT by default (as home routers do with a delegated prefix: the cloud sees
the speaker's own address and has a route back to the LAN prefix via the router); `nat66=True`
masquerades IPv6 too.
"""

from __future__ import annotations

import atexit
import ctypes
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from hushsim.certs import TestCA
from hushsim.cloud import CloudClient

T = TypeVar("T")

# --- addresses -----------------------------------------------------------------------------------
LAN_V4_NET = "198.18.10.0/24"
LAN_V6_NET = "2001:2:0:10::/64"
WAN_V4_NET = "198.19.0.0/24"
WAN_V6_NET = "2001:2:0:20::/64"
GW_LAN_V4 = "198.18.10.1"
GW_LAN_V6 = "2001:2:0:10::1"
GW_WAN_V4 = "198.19.0.1"
GW_WAN_V6 = "2001:2:0:20::1"
UNGUARDED_V4 = "198.18.10.2"
UNGUARDED_V6 = "2001:2:0:10::2"
BRIDGE = "br-lan"
WAN_IF = "wan0"
GW_MAC = "02:68:67:0a:00:01"  # locally administered; 68:67 = "hg"

# Vendor host names the simulated cloud serves (design.md sections 1 and 7), in address order.
VENDOR_HOST_NAMES: tuple[str, ...] = (
    "bob-dispatch-prod-na.amazon.com",  # voice (AVS)
    "api.amazonalexa.com",  # smart-home / events
    "alexa-comms-mobile-service.amazon.com",  # messaging (calls, Drop-In)
    "device-metrics-us.amazon.com",  # telemetry
    "unagi-na.amazon.com",  # telemetry look-alike
    "amzdigital-a.akamaihd.net",  # media
    "guzzoni.apple.com",  # HomePod voice
    "mesu.apple.com",  # Apple update
    "embeddedassistant.googleapis.com",  # Google voice (QUIC)
    "www.gstatic.com",  # connectivity check
)


def default_hosts() -> dict[str, tuple[str, str]]:
    """name -> (IPv4, IPv6) on the wan side: 198.19.0.10+ and 2001:2:0:20::10+."""
    return {
        name: (f"198.19.0.{10 + i}", f"2001:2:0:20::{10 + i}")
        for i, name in enumerate(VENDOR_HOST_NAMES)
    }


# --- bounds ----------------------------------------------------------------------------------------
COMMAND_TIMEOUT_S = 10.0  # any single `ip`/`iptables` call; they take milliseconds
READY_TIMEOUT_S = 10.0  # dnsmasq and the cloud answering after start
TERM_GRACE_S = 2.0  # SIGTERM -> SIGKILL
DEFAULT_LIFETIME_S = 900.0  # dnsmasq and the cloud exit on their own after this
MAX_LAN_HOSTS = 200

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_RESERVED = {"gw", "wan", "lan"}
CLONE_NEWNET = 0x40000000

_counter = itertools.count()
_live: set[Topology] = set()
_live_lock = threading.Lock()
_hooks_installed = False


class TopologyError(RuntimeError):
    """A command building or driving the topology failed (the message has its stderr)."""


@dataclass(frozen=True, slots=True)
class Host:
    """A LAN host: its own namespace, MAC and addresses, one bridge port on the router."""

    name: str
    ns: str
    v4: str
    v6: str
    mac: str
    port: str  # the bridge port in gw (what `-m physdev` or tcpdump on gw would name)


def _repo_root() -> Path:
    import guard

    return Path(guard.__file__).resolve().parent.parent


def _iptables_commands() -> tuple[str, str]:
    """(iptables, ip6tables) command names: the `iptables` alternative if present (legacy or nft,
    whatever the system chose), else iptables-nft, else iptables-legacy. Detection only reads
    versions: listing tables with the wrong variant would create them in the namespace."""
    for v4, v6 in (
        ("iptables", "ip6tables"),
        ("iptables-nft", "ip6tables-nft"),
        ("iptables-legacy", "ip6tables-legacy"),
    ):
        if shutil.which(v4) and shutil.which(v6):
            return v4, v6
    raise TopologyError("no iptables command (apt-get install iptables)")


def iptables_variant(command: str = "iptables") -> str:
    """'nf_tables' or 'legacy', from `iptables --version`."""
    out = subprocess.run(
        [command, "--version"],
        check=False,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    ).stdout
    return "nf_tables" if "nf_tables" in out else "legacy"


def missing_tools() -> list[str]:
    """Commands the topology needs that are not installed."""
    needed = ("ip", "dnsmasq", "timeout")
    out = [c for c in needed if shutil.which(c) is None]
    if not (
        shutil.which("iptables") or shutil.which("iptables-nft") or shutil.which("iptables-legacy")
    ):
        out.append("iptables")
    return out


def _pid_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill_pids(pids: Iterable[int], grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM each pid, wait up to `grace_s` for all, then SIGKILL the rest."""
    pids = [p for p in set(pids) if p > 1 and p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for _ in range(int(grace_s / 0.02) + 1):
        if not any(_pid_alive(p) for p in pids) or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    for pid in pids:
        if _pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _netns_list() -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "list"],
        check=False,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", ns],
        check=False,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    ).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _delete_netns(ns: str) -> None:
    """Kill what lives in `ns`, delete it and its /etc/netns folder. Never raises."""
    try:
        _kill_pids(_netns_pids(ns))
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        subprocess.run(
            ["ip", "netns", "del", ns],
            check=False,
            capture_output=True,
            timeout=COMMAND_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError):
        pass
    shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def cleanup_stale(prefix: str = "hg") -> list[str]:
    """Delete namespaces (and temp dirs) left by crashed runs: names `<prefix><pid>x<n>-...`
    whose creating process is gone. Returns the namespaces deleted."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)x\d+-")
    removed: list[str] = []
    try:
        names = _netns_list()
    except (OSError, subprocess.SubprocessError):
        names = []
    for ns in names:
        m = pattern.match(ns)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        _delete_netns(ns)
        removed.append(ns)
    tmp = Path(tempfile.gettempdir())
    for path in tmp.glob(f"{prefix}*x*-*"):
        m = pattern.match(path.name)
        if m is not None and path.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    return removed


def _cleanup_all() -> None:
    with _live_lock:
        live = list(_live)
    for topo in live:
        topo.close()


def _on_sigterm(signum: int, _frame: Any) -> None:
    # SystemExit runs atexit handlers (and context-manager exits) on the way out.
    raise SystemExit(128 + signum)


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_cleanup_all)
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
        if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
            signal.signal(signal.SIGHUP, _on_sigterm)


def _run_in_netns(ns: str, fn: Callable[[], T], timeout_s: float = COMMAND_TIMEOUT_S) -> T:
    """Call `fn` in a fresh thread that has joined network namespace `ns` (setns is per thread,
    so the rest of the process stays where it is). Sockets made there stay in `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    box: dict[str, Any] = {}

    def target() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns {ns}: {os.strerror(err)}")
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=target, daemon=True, name=f"netns-{ns}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"call in {ns} did not finish in {timeout_s} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _dns_query(name: str, qtype: int = 1, qid: int = 0x4847) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


class Topology:
    """The simulated home. Use as a context manager; see the module docstring for the layout.

    `hosts` maps vendor host names to (IPv4, IPv6) wan addresses: each gets DNS records in
    dnsmasq, an address on the wan side and (with `cloud=True`) a TLS server and a UDP/443 server.
    `speakers` are (name, v4, v6, mac) tuples added at start (any part may be None).
    """

    def __init__(
        self,
        hosts: Mapping[str, tuple[str, str]] | None = None,
        *,
        speakers: Sequence[tuple[str, str | None, str | None, str | None]] = (),
        cloud: bool = True,
        nat66: bool = False,
        tcp_timestamps: bool = False,
        dns_ttl_s: int = 300,
        lifetime_s: float = DEFAULT_LIFETIME_S,
        prefix: str = "hg",
    ) -> None:
        self.hosts: dict[str, tuple[str, str]] = dict(hosts or default_hosts())
        for name, (v4, v6) in self.hosts.items():
            if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", name):
                raise ValueError(f"bad host name {name!r}")
            if ipaddress.ip_address(v4) not in ipaddress.ip_network(WAN_V4_NET) or (
                ipaddress.ip_address(v6) not in ipaddress.ip_network(WAN_V6_NET)
            ):
                raise ValueError(f"{name}: cloud addresses must be in {WAN_V4_NET}, {WAN_V6_NET}")
        self.prefix = f"{prefix}{os.getpid()}x{next(_counter)}"
        self.nat66 = nat66
        # Off by default: the captured speakers send 1,460-B segments (no TCP timestamps), so
        # profile sizes map onto segments one to one.
        self.tcp_timestamps = tcp_timestamps
        self.dns_ttl_s = dns_ttl_s
        self.lifetime_s = lifetime_s
        self.want_cloud = cloud
        self._initial_speakers = list(speakers)
        self.iptables, self.ip6tables = "iptables", "ip6tables"
        self.lan_hosts: dict[str, Host] = {}
        self.tmp = Path("/nonexistent")
        self.ca_path: Path | None = None
        self.cloud: CloudClient | None = None
        self.cloud_pid: int | None = None
        self.dnsmasq_pid: int | None = None
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        self._started = False
        self._lock = threading.Lock()
        self._env = dict(os.environ)
        root = str(_repo_root())
        self._env["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p
        )
        self._env["PYTHONDONTWRITEBYTECODE"] = "1"

    # --- names --------------------------------------------------------------------------------

    def ns(self, role: str) -> str:
        """The full namespace name of a role ('gw', 'wan', 'lan', a speaker's name); full names
        pass through."""
        if role.startswith(self.prefix + "-"):
            return role
        if role in _RESERVED or role in self.lan_hosts:
            return f"{self.prefix}-{role}"
        raise KeyError(f"no namespace {role!r} in this topology")

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        missing = missing_tools()
        if missing:
            raise TopologyError(f"missing commands: {', '.join(missing)}")
        _install_hooks()
        with _live_lock:
            _live.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        os.chmod(self.tmp, 0o755)
        self.iptables, self.ip6tables = _iptables_commands()
        for role in ("gw", "wan"):
            self._add_netns(role)
        gw = self.ns("gw")
        # The router.
        self._ip(f"-n {gw} link add {BRIDGE} address {GW_MAC} type bridge")
        self._ip(f"-n {gw} addr add {GW_LAN_V4}/24 dev {BRIDGE}")
        self._ip(f"-n {gw} addr add {GW_LAN_V6}/64 dev {BRIDGE} nodad")
        self._ip(f"-n {gw} link set {BRIDGE} up")
        self._sysctl(
            "gw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
        )
        # br_netfilter may be loaded on the host: keep bridged LAN-to-LAN frames out of iptables
        # (OpenWrt does not load it), so only routed traffic meets the guard's rules.
        for key in (
            "bridge-nf-call-iptables",
            "bridge-nf-call-ip6tables",
            "bridge-nf-call-arptables",
        ):
            self.run(
                "gw",
                "sh",
                "-c",
                f"[ ! -e /proc/sys/net/bridge/{key} ] || echo 0 > /proc/sys/net/bridge/{key}",
            )
        # The uplink.
        wan = self.ns("wan")
        self._ip(f"link add {WAN_IF} netns {gw} type veth peer name eth0 netns {wan}")
        self._ip(f"-n {gw} addr add {GW_WAN_V4}/24 dev {WAN_IF}")
        self._ip(f"-n {gw} addr add {GW_WAN_V6}/64 dev {WAN_IF} nodad")
        self._ip(f"-n {gw} link set {WAN_IF} up")
        self._ip(f"-n {wan} link set eth0 up")
        for v4, v6 in self.hosts.values():
            self._ip(f"-n {wan} addr add {v4}/24 dev eth0")
            self._ip(f"-n {wan} addr add {v6}/64 dev eth0 nodad")
        self._ip(f"-n {gw} route add default via 198.19.0.254 dev {WAN_IF} onlink")
        masquerade = ("-t", "nat", "-A", "POSTROUTING", "-o", WAN_IF, "-j", "MASQUERADE")
        self.run("gw", self.iptables, *masquerade)
        if self.nat66:
            self.run("gw", self.ip6tables, *masquerade)
        else:
            self._ip(f"-n {wan} -6 route add {LAN_V6_NET} via {GW_WAN_V6}")
        # LAN hosts: the unguarded one, then the speakers asked for.
        self.add_host("lan", UNGUARDED_V4, UNGUARDED_V6, "02:68:67:0a:00:02")
        for name, v4, v6, mac in self._initial_speakers:
            self.add_speaker(name, v4, v6, mac)
        self._start_dnsmasq()
        if self.want_cloud:
            self.start_cloud()

    def close(self) -> None:
        """Kill every process this topology started or that lives in its namespaces, delete the
        namespaces and the temp dir. Idempotent; never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        procs = list(self._procs)
        pids = [p.pid for p in procs if p.poll() is None]
        # dnsmasq runs under `timeout`: kill it first so `timeout` reaps it (no zombie for PID 1).
        if self.dnsmasq_pid:
            _kill_pids([self.dnsmasq_pid])
        _kill_pids(pids)
        for p in procs:
            try:
                p.wait(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        for ns in reversed(self._namespaces):
            _delete_netns(ns)
        if self.tmp.exists() and self.tmp.name.startswith(self.prefix):
            shutil.rmtree(self.tmp, ignore_errors=True)
        with _live_lock:
            _live.discard(self)

    # --- commands -----------------------------------------------------------------------------

    def _add_netns(self, role: str) -> str:
        ns = f"{self.prefix}-{role}"
        subprocess.run(
            ["ip", "netns", "add", ns], check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S
        )
        self._namespaces.append(ns)
        # No DAD: addresses are usable at once (they are unique by construction).
        self._sysctl_ns(
            ns,
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_ra=0",
            "net.ipv6.conf.default.accept_ra=0",
        )
        self._ip(f"-n {ns} link set lo up")
        return ns

    def _ip(self, line: str) -> None:
        """Run `ip LINE` (words split on spaces: every name here is validated, none has one)."""
        proc = subprocess.run(
            ["ip", *line.split()],
            check=False,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        if proc.returncode != 0:
            raise TopologyError(f"ip {line}: {proc.stderr.strip()}")

    def _sysctl_ns(self, ns: str, *settings: str) -> None:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings],
            check=False,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        if proc.returncode != 0:
            raise TopologyError(f"sysctl in {ns}: {proc.stderr.strip()}")

    def _sysctl(self, role: str, *settings: str) -> None:
        self._sysctl_ns(self.ns(role), *settings)

    def run(
        self,
        ns: str,
        *cmd: str,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_S,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in namespace `ns` (a role or full name) and wait, at most `timeout` s."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.ns(ns), *cmd],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=self._env,
        )
        if check and proc.returncode != 0:
            raise TopologyError(
                f"[{ns}] {' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )
        return proc

    def popen(self, ns: str, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start `cmd` in namespace `ns`; the topology kills it (SIGTERM, then SIGKILL, by PID)
        on close. stdout/stderr default to pipes (text): read them, or pass files, for chatty
        commands."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        kw.setdefault("env", self._env)
        kw.setdefault("stdin", subprocess.DEVNULL)
        if self._closed:
            raise TopologyError("topology is closed")
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(ns), *cmd], **kw)
        self._procs.append(proc)
        return proc

    def ns_exec_python(
        self, ns: str, code: str, *, timeout: float = 20.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run Python `code` (with this repository importable) in namespace `ns`."""
        return self.run(ns, sys.executable, "-c", code, timeout=timeout, check=check)

    def call_in(self, ns: str, fn: Callable[[], T], timeout_s: float = COMMAND_TIMEOUT_S) -> T:
        """Call `fn` in this process, in a thread that joined namespace `ns` (fast: no fork).
        Sockets created by `fn` stay in `ns`."""
        return _run_in_netns(self.ns(ns), fn, timeout_s)

    def socket_in(
        self, ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket that lives in namespace `ns`, usable from this process."""
        return self.call_in(ns, lambda: socket.socket(family, type))

    # --- LAN hosts ----------------------------------------------------------------------------

    def add_host(self, name: str, v4: str, v6: str, mac: str) -> Host:
        """A LAN host in its own namespace, on its own bridge port, default routes via gw."""
        if self._closed:
            raise TopologyError("topology is closed")
        if name in self.lan_hosts:
            raise ValueError(f"LAN host {name!r} exists")
        if not _MAC_RE.match(mac):
            raise ValueError(f"bad MAC {mac!r}")
        if ipaddress.ip_address(v4) not in ipaddress.ip_network(LAN_V4_NET) or ipaddress.ip_address(
            v6
        ) not in ipaddress.ip_network(LAN_V6_NET):
            raise ValueError(f"LAN host addresses must be in {LAN_V4_NET} and {LAN_V6_NET}")
        if len(self.lan_hosts) >= MAX_LAN_HOSTS:
            raise ValueError("too many LAN hosts")
        port = f"lp{len(self.lan_hosts)}"
        self.lan_hosts[name] = host = Host(name, f"{self.prefix}-{name}", v4, v6, mac.lower(), port)
        try:
            ns = self._add_netns(name)
            gw = self.ns("gw")
            self._ip(
                f"link add eth0 netns {ns} address {mac} type veth peer name {port} netns {gw}"
            )
            self._ip(f"-n {gw} link set {port} master {BRIDGE} up")
            self._ip(f"-n {ns} addr add {v4}/24 dev eth0")
            self._ip(f"-n {ns} addr add {v6}/64 dev eth0 nodad")
            self._ip(f"-n {ns} link set eth0 up")
            self._ip(f"-n {ns} route add default via {GW_LAN_V4}")
            self._ip(f"-n {ns} -6 route add default via {GW_LAN_V6}")
            if not self.tcp_timestamps:
                self._sysctl_ns(ns, "net.ipv4.tcp_timestamps=0")
            # `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf:
            # the host's resolver is the router's dnsmasq, as with DHCP at home.
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(
                f"nameserver {GW_LAN_V4}\nnameserver {GW_LAN_V6}\noptions timeout:1 attempts:2\n"
            )
            (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
        except BaseException:
            del self.lan_hosts[name]
            raise
        return host

    def add_speaker(
        self, name: str, v4: str | None = None, v6: str | None = None, mac: str | None = None
    ) -> Host:
        """A speaker: its own namespace `name`; addresses default to the next free 198.18.10.10+
        (and 2001:2:0:10::<same digits>), the MAC to 02:68:67:0a:00:<octet>."""
        if not _NAME_RE.match(name) or name in _RESERVED:
            raise ValueError(f"bad speaker name {name!r} (lower-case, <= 20 chars, not gw/wan/lan)")
        used = {h.v4 for h in self.lan_hosts.values()}
        octet = (
            next((o for o in range(10, 255) if f"198.18.10.{o}" not in used), None)
            if v4 is None
            else int(v4.rsplit(".", 1)[1])
        )
        if octet is None:
            raise ValueError("no free LAN address")
        v4 = v4 or f"198.18.10.{octet}"
        v6 = v6 or f"2001:2:0:10::{octet}"
        mac = mac or f"02:68:67:0a:00:{octet:02x}"
        return self.add_host(name, v4, v6, mac)

    # --- services -----------------------------------------------------------------------------

    def _start_dnsmasq(self) -> None:
        pid_file = self.tmp / "dnsmasq.pid"
        args = [
            "timeout",
            "-k",
            "5",
            str(int(self.lifetime_s)),
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            f"--listen-address={GW_LAN_V4}",
            f"--listen-address={GW_LAN_V6}",
            "--port=53",
            f"--pid-file={pid_file}",
            "--user=root",
            "--group=root",
            "--log-queries",
            f"--log-facility={self.tmp / 'dnsmasq.log'}",
            f"--local-ttl={self.dns_ttl_s}",
            # No upstream: unknown names get NXDOMAIN at once (not REFUSED and a resolver retry).
            "--local=/#/",
        ]
        args += [f"--host-record={name},{v4},{v6}" for name, (v4, v6) in self.hosts.items()]
        log = (self.tmp / "dnsmasq.out").open("w")
        self.popen("gw", *args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        # Ready when the pid file exists and a query for the first name gets an answer.
        first = next(iter(self.hosts), None)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for _ in range(int(READY_TIMEOUT_S / 0.05) + 1):
            if pid_file.exists() and pid_file.read_text().strip().isdigit():
                self.dnsmasq_pid = int(pid_file.read_text().strip())
                if first is None or self._dns_answers("lan", first):
                    return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        out = (self.tmp / "dnsmasq.out").read_text()[-1000:]
        raise TopologyError(f"dnsmasq did not come up in {READY_TIMEOUT_S} s: {out}")

    def _dns_answers(self, ns: str, name: str) -> bool:
        def query() -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(0.2)
                s.sendto(_dns_query(name), (GW_LAN_V4, 53))
                try:
                    data = s.recv(4096)
                except (TimeoutError, ConnectionRefusedError):
                    return False
                return (
                    len(data) >= 12
                    and data[3] & 0x0F == 0
                    and struct.unpack("!H", data[6:8])[0] > 0
                )

        return self.call_in(ns, query)

    def resolve(self, ns: str, name: str, family: int = socket.AF_INET) -> list[str]:
        """Addresses of `name` as a process in `ns` resolves them (its resolv.conf: dnsmasq)."""
        code = (
            "import json, socket, sys\n"
            f"infos = socket.getaddrinfo({name!r}, 443, {int(family)}, socket.SOCK_STREAM)\n"
            "print(json.dumps(sorted({i[4][0] for i in infos})))\n"
        )
        return json.loads(self.ns_exec_python(ns, code).stdout)

    def start_cloud(self, max_seconds: float | None = None) -> CloudClient:
        """Certificates from a fresh test CA, then the cloud process in wan; returns its client."""
        if self.cloud is not None:
            return self.cloud
        ca = TestCA(f"hushgate test CA {self.prefix}")
        files = ca.write(self.tmp / "certs", list(self.hosts))
        self.ca_path = files.ca_path
        control = self.tmp / "cloud.sock"
        config = {
            "hosts": [
                {
                    "name": name,
                    "addrs": [v4, v6],
                    "cert": str(files.servers[name][0]),
                    "key": str(files.servers[name][1]),
                }
                for name, (v4, v6) in self.hosts.items()
            ],
            "control": str(control),
            "max_seconds": max_seconds or self.lifetime_s,
        }
        config_path = self.tmp / "cloud.json"
        config_path.write_text(json.dumps(config, indent=1))
        log = (self.tmp / "cloud.log").open("w")
        proc = self.popen(
            "wan",
            sys.executable,
            "-m",
            "hushsim.cloud",
            "--config",
            str(config_path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        client = CloudClient(control, timeout_s=5.0)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for _ in range(int(READY_TIMEOUT_S / 0.05) + 1):
            if proc.poll() is not None:
                break
            if control.exists():
                try:
                    self.cloud_pid = int(client.ping()["pid"])
                    self.cloud = client
                    return client
                except (OSError, RuntimeError, ValueError):
                    pass
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        out = (self.tmp / "cloud.log").read_text()[-2000:]
        raise TopologyError(f"cloud did not come up in {READY_TIMEOUT_S} s: {out}")

    # --- the speaker simulator ----------------------------------------------------------------

    def speaker_cmd(self, *args: str) -> list[str]:
        """`python -m hushsim.speaker --ca <test CA> ARGS...`."""
        ca = ["--ca", str(self.ca_path)] if self.ca_path else []
        return [sys.executable, "-m", "hushsim.speaker", *ca, *args]

    def speaker_popen(self, host: str, *args: str) -> subprocess.Popen[str]:
        """Start the speaker simulator in LAN host `host`'s namespace (tracked and killed)."""
        return self.popen(host, *self.speaker_cmd(*args))

    def run_speaker(self, host: str, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run the speaker simulator to completion and return its JSON result."""
        proc = self.speaker_popen(host, *args)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_pids([proc.pid])
            out, err = proc.communicate(timeout=TERM_GRACE_S)
        return parse_speaker_output(out, err)


def parse_speaker_output(out: str, err: str = "") -> dict[str, Any]:
    """The speaker's one JSON line (the last non-empty stdout line)."""
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines:
        raise TopologyError(f"speaker printed nothing; stderr: {err.strip()[-2000:]}")
    return json.loads(lines[-1])
