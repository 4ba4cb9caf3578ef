"""Kernel rules that send configured devices' packets to NFQUEUE: iptables (tested) and nftables.

Rules of this module:
- The guard only takes away. Its queue, fast path and safety net live in its own chains of the
  *mangle* table (nftables: a base chain at priority mangle), so an ACCEPT there, or a verdict from
  userspace, only means "no objection": the router's own filter policy (zones, isolated IoT
  VLANs, fw4/fw3) still decides afterwards. The one rule in *filter* only rejects.
- Two lifetimes. Persistent (`apply_safety_net`, kept when `run` stops, removed by `remove_all`):
  device dispatch, connmark fast path, the fail-closed safety net. Dynamic (`install_dynamic` /
  `remove_dynamic`, owned by `run`): the NFQUEUE rules. The dynamic rules sit in chains of their own
  that the persistent pipeline always jumps to, so per packet the order is fixed whatever was
  installed first: fast path, then queue, then safety net.
- Every change is one `iptables-restore --noflush` transaction per family (atomic in both the
  legacy and the nft flavour); re-applying flushes and refills our own chains, so nothing is ever
  duplicated. Nothing here decides a verdict; all commands go through a `Runner`, so the generated
  commands are unit-tested without root.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from guard.core.detector import DetectorConfig

DEFAULT_MARK_MASK = 0x00FF0000

__all__ = [
    "DEFAULT_MARK_MASK",
    "Completed",
    "DeviceMatch",
    "FirewallError",
    "FirewallSpec",
    "IptablesBackend",
    "MarkKind",
    "Marks",
    "NftCheck",
    "NftablesBackend",
    "Rule",
    "compose_mark",
    "mark_value",
    "netns_runner",
    "parse_save",
    "run_command",
    "with_neighbour_macs",
    "neighbour_table",
    "mac_sharers",
]


# --------------------------------------------------------------------------- runner


@dataclass(frozen=True, slots=True)
class Completed:
    """What a command did: the shell boundary of this module."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


Runner = Callable[[Sequence[str], "str | None"], Completed]


def run_command(argv: Sequence[str], input: str | None = None) -> Completed:
    """The real runner: no shell, text IO, bounded time. A missing binary is exit code 127."""
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError as exc:
        return Completed(tuple(argv), 127, "", str(exc))
    except subprocess.TimeoutExpired:
        return Completed(tuple(argv), 124, "", f"timed out: {' '.join(argv)}")
    return Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def netns_runner(namespace: str, base: Runner = run_command) -> Runner:
    """A runner that executes every command inside `ip netns exec NAMESPACE` (tests, doctor)."""

    def run(argv: Sequence[str], input: str | None = None) -> Completed:
        return base(["ip", "netns", "exec", namespace, *argv], input)

    return run


class FirewallError(RuntimeError):
    """A firewall command failed; the message is one line naming the command and its error."""

    @classmethod
    def from_result(cls, what: str, result: Completed) -> FirewallError:
        detail = (result.stderr or result.stdout).strip().splitlines()
        first = detail[0] if detail else f"exit code {result.returncode}"
        return cls(f"{what}: {' '.join(result.argv)}: {first}")


# --------------------------------------------------------------------------- marks

# A UDP payload below the detector's min_mean_datagram_bytes cannot carry an audio codec frame
# plus its framing: what a control-marked flow may send past the queue (the engine applies the
# same bound, so `analyze` decides as the kernel does). As IP lengths:
CONTROL_MAX_PAYLOAD_BYTES = DetectorConfig().min_mean_datagram_bytes - 1
_CONTROL_MAX_IP_LEN = {4: 20 + 8 + CONTROL_MAX_PAYLOAD_BYTES, 6: 40 + 8 + CONTROL_MAX_PAYLOAD_BYTES}
# TCP segments of a control-marked connection flagged ACK alone (no PSH, SYN, FIN, RST, URG) and
# no longer than an IP header and the largest TCP header: pure ACKs and keepalives (at most 40
# bytes of payload without options, far below a TLS record carrying audio)
_ACK_MAX_IP_LEN = {4: 20 + 60, 6: 40 + 60}


class MarkKind(str, Enum):
    """Connmark bits the guard owns inside `mark_mask`."""

    ALLOW = "allow"  # decided for the flow's lifetime: accepted in the kernel
    BLOCK = "block"  # decided for the flow's lifetime: rejected in the kernel
    # Still inspected, but its first window was control datagrams: from now on the kernel passes
    # its upstream datagrams too small to carry a codec frame (CONTROL_MAX_PAYLOAD_BYTES) and
    # queues the rest. The value is both verdict bits together, which no other rule matches.
    CONTROL = "control"
    DEVICE = "device"  # the connection belongs to a configured device (matches its return traffic)


@dataclass(frozen=True, slots=True)
class Marks:
    """Bit values inside a mask. ALLOW is the lowest set bit of the mask, BLOCK the next, DEVICE
    the one after: the mask is configurable because fw4, mwan3 and SQM use marks too."""

    mask: int
    allow: int
    block: int
    device: int

    @classmethod
    def from_mask(cls, mask: int) -> Marks:
        if not 0 < mask <= 0xFFFFFFFF:
            raise ValueError(f"mark_mask {mask:#x} is not a 32-bit mask")
        bits = [1 << i for i in range(32) if mask & (1 << i)]
        if len(bits) < 3:
            raise ValueError(f"mark_mask {mask:#010x} needs at least 3 bits (allow, block, device)")
        return cls(mask=mask, allow=bits[0], block=bits[1], device=bits[2])

    @property
    def verdict_mask(self) -> int:
        """The two verdict bits: a connection is allowed, blocked or undecided (0)."""
        return self.allow | self.block

    def value(self, kind: MarkKind | str) -> int:
        kind = MarkKind(kind)
        return {MarkKind.ALLOW: self.allow, MarkKind.BLOCK: self.block,
                MarkKind.CONTROL: self.allow | self.block}.get(kind, self.device)

    def compose(self, current: int, kind: MarkKind | str) -> int:
        """The packet mark to give with a verdict (netfilterqueue `set_mark`): our verdict bits set,
        every bit outside them kept, since other software may own them."""
        kind = MarkKind(kind)
        if kind is MarkKind.DEVICE:
            return (current | self.device) & 0xFFFFFFFF
        return ((current & ~self.verdict_mask) | self.value(kind)) & 0xFFFFFFFF


def mark_value(kind: MarkKind | str, mask: int = DEFAULT_MARK_MASK) -> int:
    """The connmark value the daemon sets for `kind` ("allow", "block", "device")."""
    return Marks.from_mask(mask).value(kind)


def compose_mark(current: int, kind: MarkKind | str, mask: int = DEFAULT_MARK_MASK) -> int:
    """`current` packet mark with the verdict bits for `kind` set; see `Marks.compose`."""
    return Marks.from_mask(mask).compose(current, kind)


# --------------------------------------------------------------------------- spec

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_TAG_RE = re.compile(r"^[a-z][a-z0-9_]{0,15}$")
_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]")


def _oneline(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)


def _safe(text: str) -> str:
    """Device names end up in comments and labels: keep them to a harmless alphabet."""
    return _SAFE_RE.sub("_", text)[:48] or "_"


@dataclass(frozen=True, slots=True)
class DeviceMatch:
    """How the kernel recognises one configured device. MAC is preferred (it also covers rotating
    IPv6 privacy addresses); `address`/`address6` match by IP, in both directions."""

    name: str
    address: str | None = None
    mac: str | None = None
    address6: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in self.name):
            raise ValueError(f"device name {self.name!r} is empty or has control characters")
        if self.mac is not None:
            mac = self.mac.strip().lower().replace("-", ":")
            if not _MAC_RE.match(mac):
                raise ValueError(f"device {self.name}: bad MAC {self.mac!r}")
            object.__setattr__(self, "mac", mac)
        if self.address is not None:
            try:
                addr = ipaddress.IPv4Address(self.address.strip())
            except ValueError:
                raise ValueError(f"device {self.name}: bad IPv4 address {self.address!r}") from None
            object.__setattr__(self, "address", str(addr))
        six: list[str] = []
        for a in self.address6:
            try:
                six.append(str(ipaddress.IPv6Address(a.strip())))
            except ValueError:
                raise ValueError(f"device {self.name}: bad IPv6 address {a!r}") from None
        object.__setattr__(self, "address6", tuple(six))
        if self.mac is None and self.address is None and not self.address6:
            raise ValueError(f"device {self.name}: needs a mac or an address")


@dataclass(frozen=True, slots=True)
class FirewallSpec:
    """Everything the rules depend on. `queue_downstream` sends established downstream packets of
    configured devices to userspace too; by default they are accepted in the kernel (the engine
    never holds downstream packets, design 4/5) and only DNS answers are queued."""

    devices: tuple[DeviceMatch, ...]
    queue: int
    queue_count: int = 1
    fail_open: bool = False
    mark_mask: int = DEFAULT_MARK_MASK
    quic_block_devices: tuple[str, ...] = ()
    ipv6: bool = True
    tag: str = "hushgate"
    queue_downstream: bool = False
    # The stream hold (design.md 5): these devices' TCP is intercepted (TPROXY) and relayed by
    # the guard instead of queued; see relay_rules.
    relay_devices: tuple[str, ...] = ()
    relay_port: int = 7411
    tproxy_mark: int = 0x20000000
    relay_mark: int = 0x40000000
    relay_table: int = 7411
    relay_priority: int = 900

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "quic_block_devices", tuple(self.quic_block_devices))
        object.__setattr__(self, "relay_devices", tuple(self.relay_devices))
        for bit in (self.tproxy_mark, self.relay_mark):
            if bit <= 0 or bit > 0xFFFFFFFF or bit & (bit - 1) or bit & self.mark_mask:
                raise ValueError(f"relay mark {bit:#x} must be one bit outside mark_mask")
        if self.tproxy_mark == self.relay_mark:
            raise ValueError("tproxy_mark and relay_mark must differ")
        if not 0 < self.relay_port <= 65535:
            raise ValueError(f"bad relay port {self.relay_port}")
        if not 0 <= self.queue <= 65535 or self.queue_count < 1:
            raise ValueError(f"bad queue {self.queue} x {self.queue_count}")
        if self.queue + self.queue_count - 1 > 65535:
            raise ValueError("queue range exceeds 65535")
        if not _TAG_RE.match(self.tag):
            raise ValueError(f"tag {self.tag!r} must match {_TAG_RE.pattern}")
        Marks.from_mask(self.mark_mask)  # validates
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError("device names must be unique")
        unknown = set(self.quic_block_devices) - set(names)
        if unknown:
            raise ValueError(f"quic_block_devices not configured: {sorted(unknown)}")
        unknown = set(self.relay_devices) - set(names)
        if unknown:
            raise ValueError(f"relay_devices not configured: {sorted(unknown)}")

    @property
    def relay(self) -> bool:
        """Some device's TCP is relayed: the interception rules and policy routing exist."""
        return bool(self.relay_devices)

    @property
    def marks(self) -> Marks:
        return Marks.from_mask(self.mark_mask)

    def mark_value(self, kind: MarkKind | str) -> int:
        return self.marks.value(kind)

    @property
    def fail_mode(self) -> str:
        return "open" if self.fail_open else "closed"

    @property
    def queue_last(self) -> int:
        return self.queue + self.queue_count - 1

    def warnings(self) -> list[str]:
        """Configuration gaps the rules cannot close; doctor prints them."""
        out: list[str] = []
        for d in self.devices:
            if d.mac is None and not d.address6:
                out.append(
                    f"{d.name}: no mac and no address6, so its IPv6 packets cannot be recognised "
                    "(neither guarded nor blocked); set mac (see with_neighbour_macs)"
                )
            if d.mac is None:
                out.append(
                    f"{d.name}: matched by address only; a new DHCP lease escapes the guard "
                    "(prefer mac)"
                )
        return out


_LLADDR_RE = re.compile(r"lladdr ([0-9a-f]{2}(?::[0-9a-f]{2}){5})")


def neighbour_mac(address: str, run: Runner = run_command) -> str | None:
    """The MAC the router's neighbour table (`ip -4 neigh`) holds for an IPv4 address, or None.
    FAILED and INCOMPLETE entries carry no lladdr: only a resolved entry counts."""
    try:
        res = run(["ip", "-4", "neigh", "show", address], None)
    except OSError:
        return None
    m = _LLADDR_RE.search(res.stdout.lower()) if res.ok else None
    return m.group(1) if m else None


def neighbour_table(run: Runner = run_command) -> dict[str, str]:
    """IPv4 address -> MAC of every resolved entry of the router's neighbour table (`ip -4
    neigh`); {} when it cannot be read. FAILED and INCOMPLETE entries carry no lladdr."""
    try:
        res = run(["ip", "-4", "neigh", "show"], None)
    except OSError:
        return {}
    out: dict[str, str] = {}
    if not res.ok:
        return out
    for line in res.stdout.lower().splitlines():
        fields = line.split()
        m = _LLADDR_RE.search(line)
        if fields and m:
            out[fields[0]] = m.group(1)
    return out


def mac_sharers(table: dict[str, str], mac: str, address: str) -> tuple[str, ...]:
    """The other IPv4 addresses the neighbour table holds under `mac`: a MAC that stands for
    several hosts (a MAC-rewriting Wi-Fi extender, a bridge doing MAC NAT, a proxy-ARP box) must
    never be matched for one address-only device, or every host behind it is guarded too."""
    mac = mac.lower()
    return tuple(sorted(a for a, m in table.items() if m == mac and a != address))


def with_neighbour_macs(spec: FirewallSpec, run: Runner = run_command) -> FirewallSpec:
    """Fill in missing MACs from the router's neighbour table (`ip neigh`), so an address-only
    device's IPv6 traffic (and its traffic after a new lease) is matched too. Devices whose
    address is not in the table, or whose MAC the table also holds for another address (hosts
    behind a MAC-rewriting extender), are left as they are: matched by address alone."""
    table = neighbour_table(run)
    devices = []
    for d in spec.devices:
        if d.mac is None and d.address is not None:
            mac = table.get(d.address)
            if mac and not mac_sharers(table, mac, d.address):
                d = replace(d, mac=mac)
        devices.append(d)
    return replace(spec, devices=tuple(devices))


# --------------------------------------------------------------------------- iptables rules


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule in iptables-save canonical form (what `iptables-save` prints back), so the live
    state can be compared text for text. `label` names it for counters and status."""

    table: str
    chain: str
    spec: str
    label: str
    dynamic: bool = False

    @property
    def line(self) -> str:
        return f"-A {self.chain} {self.spec}"


@dataclass(frozen=True, slots=True)
class Chains:
    """Our chain names, derived from the tag (HUSHGATE, HUSHGATE_UP, ...)."""

    entry: str  # mangle FORWARD: dispatch configured devices' packets
    up: str  # device is the source
    down: str  # device is the destination
    net: str  # the persistent safety net
    queue: str  # dynamic: NFQUEUE for upstream packets
    dns: str  # dynamic: NFQUEUE for DNS answers (observed, accepted at once)
    downq: str  # dynamic: downstream packets (kernel accept, or NFQUEUE)
    input: str  # mangle INPUT: tag device connections to the router's resolver
    output: str  # mangle OUTPUT: the router's own DNS answers to devices
    post: str  # mangle POSTROUTING: save verdict marks given by userspace
    reject: str  # filter FORWARD: reject connections marked BLOCK
    tproxy: str = ""  # mangle PREROUTING: relayed devices' TCP (stream hold)
    relay: str = ""  # mangle: which destinations are intercepted, which bypass
    relayfwd: str = ""  # filter: relayed devices' TCP that reaches FORWARD is reset
    syn: str = ""  # dynamic, mangle: a relayed device's SYN waits in the queue (design 5a.3)
    relay_on: bool = False
    # fail = "open": the interception lives only while `run` does (dynamic), since with no
    # listener TPROXY drops; fail-closed keeps it in the persistent safety net.
    relay_dynamic: bool = False

    @classmethod
    def for_tag(cls, tag: str, relay_on: bool = False, relay_dynamic: bool = False) -> Chains:
        t = tag.upper()
        return cls(
            tproxy=f"{t}_TPROXY",
            relay=f"{t}_RELAY",
            relayfwd=f"{t}_RELAYFWD",
            syn=f"{t}_SYN",
            relay_on=relay_on,
            relay_dynamic=relay_dynamic,
            entry=t,
            up=f"{t}_UP",
            down=f"{t}_DOWN",
            net=f"{t}_NET",
            queue=f"{t}_QUEUE",
            dns=f"{t}_DNS",
            downq=f"{t}_DOWNQ",
            input=f"{t}_INPUT",
            output=f"{t}_OUTPUT",
            post=f"{t}_POST",
            reject=f"{t}_REJECT",
        )

    def persistent(self) -> list[tuple[str, str]]:
        """(table, chain) of the persistent chains, in declaration order."""
        m = "mangle"
        return [
            ("filter", self.reject),
            (m, self.entry),
            (m, self.up),
            (m, self.down),
            (m, self.net),
            (m, self.input),
            (m, self.output),
            (m, self.post),
        ] + (self._relay_chains() if self.relay_on and not self.relay_dynamic else [])

    def dynamic(self) -> list[tuple[str, str]]:
        return [("mangle", self.queue), ("mangle", self.dns), ("mangle", self.downq)] + (
            self._relay_chains() if self.relay_on and self.relay_dynamic else []) + (
            [("mangle", self.syn)] if self.relay_on else [])

    def _relay_chains(self) -> list[tuple[str, str]]:
        return [("filter", self.relayfwd), ("mangle", self.tproxy), ("mangle", self.relay)]

    def hooks(self) -> list[tuple[str, str, str]]:
        """(table, built-in chain, our chain): each jumped to from position 1."""
        return [
            ("filter", "FORWARD", self.reject),
            ("mangle", "FORWARD", self.entry),
            ("mangle", "INPUT", self.input),
            ("mangle", "OUTPUT", self.output),
            ("mangle", "POSTROUTING", self.post),
        ] + ([("mangle", "PREROUTING", self.tproxy)] if self.relay_on else [])

    def all_names(self) -> set[str]:
        return {c for _, c in self.persistent() + self.dynamic()}


def _chains(spec: FirewallSpec) -> Chains:
    return Chains.for_tag(spec.tag, spec.relay, spec.fail_open)


# Destinations a relayed device reaches without interception (design.md 5a.2): the router's
# own addresses (addrtype LOCAL, matched separately), private, shared, link-local, loopback and
# multicast ranges. 198.18.0.0/15 (benchmarking) is deliberately NOT here: the test "WAN".
RELAY_BYPASS_NETS = {
    4: ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "255.255.255.255/32"),
    6: ("::1/128", "fc00::/7", "fe80::/10", "ff00::/8"),
}


TABLES = ("filter", "mangle")  # filter first: the REJECT for BLOCK exists before mangle passes it


def _queue_target(spec: FirewallSpec) -> str:
    if spec.queue_count == 1:
        target = f"-j NFQUEUE --queue-num {spec.queue}"
    else:
        target = f"-j NFQUEUE --queue-balance {spec.queue}:{spec.queue_last}"
    # Without bypass a packet with no listener is dropped by the kernel: fail-closed (design 4).
    return target + (" --queue-bypass" if spec.fail_open else "")


def build_rules(spec: FirewallSpec, family: int) -> list[Rule]:
    """The complete rule set for one family (4 or 6), persistent and dynamic, in chain order."""
    ch = _chains(spec)
    mk = spec.marks
    V, ALLOW, BLOCK, DEV = mk.verdict_mask, mk.allow, mk.block, mk.device
    rules: list[Rule] = []

    def add(table: str, chain: str, label: str, text: str, dynamic: bool = False) -> None:
        rules.append(Rule(table, chain, text, label, dynamic))

    unreachable = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    set_dev = f"-j CONNMARK --set-xmark {DEV:#x}/{DEV:#x}"
    set_block = f"-j CONNMARK --set-xmark {BLOCK:#x}/{V:#x}"
    save_verdict = f"-j CONNMARK --save-mark --nfmask {V:#x} --ctmask {V:#x}"
    # IPv6 off means "blocked", never "open" (design 4): the device's v6 connections get BLOCK.
    block_family = family == 6 and not spec.ipv6

    def sources(d: DeviceMatch) -> list[tuple[str, str]]:
        out = []
        if d.mac:
            out.append(("mac", f"-m mac --mac-source {d.mac}"))
        if family == 4 and d.address:
            out.append(("addr", f"-s {d.address}/32"))
        if family == 6:
            out += [(f"addr6.{i}", f"-s {a}/128") for i, a in enumerate(d.address6)]
        return out

    def destinations(d: DeviceMatch) -> list[tuple[str, str]]:
        if family == 4:
            return [("addr", f"-d {d.address}/32")] if d.address else []
        return [(f"addr6.{i}", f"-d {a}/128") for i, a in enumerate(d.address6)]

    # The stream hold first: its FORWARD reset precedes every other filter rule of ours.
    relayed = spec.relay and not block_family
    if relayed:
        rules += relay_rules(spec, family, ch, sources)

    # filter FORWARD: the only place REJECT is allowed; it acts on connections marked BLOCK
    # (by a verdict, by quic = "block", or by IPv6 being off) and lets everything else go on.
    # A packet conntrack has no entry for (invalid, untracked) fails every connmark match, even
    # a negated one: it is none of our business here, the router's own policy decides.
    add("filter", ch.reject, "reject.untracked",
        "-m conntrack --ctstate INVALID,UNTRACKED -j RETURN")
    add("filter", ch.reject, "reject.pass", f"-m connmark ! --mark {BLOCK:#x}/{V:#x} -j RETURN")
    add("filter", ch.reject, "reject.tcp", "-p tcp -j REJECT --reject-with tcp-reset")
    add("filter", ch.reject, "reject.udp", f"-p udp -j REJECT --reject-with {unreachable}")
    add("filter", ch.reject, "reject.other", "-j DROP")

    # mangle FORWARD entry: unconfigured hosts fall off the end untouched (never queued).
    for d in spec.devices:
        n = _safe(d.name)
        for kind, match in sources(d):
            if relayed and d.name in spec.relay_devices:
                # Its TCP is relayed: what reaches FORWARD bypasses interception on purpose
                # (a local destination) or is reset in filter (relay_rules); never queued.
                add("mangle", ch.entry, f"dispatch.{n}.{kind}.tcp", f"{_tcp(match)} -j ACCEPT")
            if block_family:
                add("mangle", ch.entry, f"dispatch.{n}.{kind}.v6block", f"{match} {set_block}")
            elif d.name in spec.quic_block_devices:
                # quic = "block": UDP 443 gets port-unreachable, Google speakers fall back to TCP.
                add(
                    "mangle",
                    ch.entry,
                    f"dispatch.{n}.{kind}.quic",
                    f"{_proto(match, 'udp')} -m udp --dport 443 {set_block}",
                )
            add("mangle", ch.entry, f"dispatch.{n}.{kind}.up", f"{match} -g {ch.up}")
    for d in spec.devices:
        n = _safe(d.name)
        for kind, match in destinations(d):
            add("mangle", ch.entry, f"dispatch.{n}.{kind}.down", f"{match} -g {ch.down}")
    # Return traffic of connections a device opened (needs no address: MAC-only devices, rotating
    # IPv6 privacy addresses, new leases).
    add(
        "mangle",
        ch.entry,
        "dispatch.device_conn.down",
        f"-m connmark --mark {DEV:#x}/{DEV:#x} -g {ch.down}",
    )

    # Upstream pipeline: tag the connection, fast path, queue, safety net.
    add("mangle", ch.up, "up.device_bit", f"-m connmark ! --mark {DEV:#x}/{DEV:#x} {set_dev}")
    # A `repeat` verdict with a mark comes back here: store the verdict on the connection.
    add("mangle", ch.up, "up.save_verdict", f"-m mark ! --mark 0x0/{V:#x} {save_verdict}")
    add("mangle", ch.up, "up.fast_allow", f"-m connmark --mark {ALLOW:#x}/{V:#x} -j ACCEPT")
    # BLOCK passes mangle on purpose: filter FORWARD rejects it with a reset (REJECT is filter-only).
    add("mangle", ch.up, "up.fast_block", f"-m connmark --mark {BLOCK:#x}/{V:#x} -j ACCEPT")
    # An inspected UDP flow marked CONTROL: its small datagrams (no room for audio) stay in the
    # kernel, anything larger is queued and judged (a QUIC download's ACKs, keep-alives).
    add("mangle", ch.up, "up.fast_control",
        f"-p udp -m connmark --mark {V:#x}/{V:#x} "
        f"-m length --length 0:{_CONTROL_MAX_IP_LEN[family]} -j ACCEPT")
    add("mangle", ch.up, "up.fast_ack",
        f"-p tcp -m connmark --mark {V:#x}/{V:#x} -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG ACK "
        f"-m length --length 0:{_ACK_MAX_IP_LEN[family]} -j ACCEPT")
    add("mangle", ch.up, "up.queue", f"-j {ch.queue}")
    add("mangle", ch.up, "up.net", f"-j {ch.net}")

    # Downstream pipeline.
    add("mangle", ch.down, "down.fast_allow", f"-m connmark --mark {ALLOW:#x}/{V:#x} -j ACCEPT")
    add("mangle", ch.down, "down.fast_block", f"-m connmark --mark {BLOCK:#x}/{V:#x} -j ACCEPT")
    # A connection opened from outside toward a device is not ours to accept: the router's own
    # policy decides (IPv6 has no NAT to stop it). Its upstream packets are still queued.
    add(
        "mangle",
        ch.down,
        "down.not_established",
        "-m conntrack ! --ctstate RELATED,ESTABLISHED -j RETURN",
    )
    add("mangle", ch.down, "down.dns_udp", f"-p udp -m udp --sport 53 -j {ch.dns}")
    add("mangle", ch.down, "down.dns_tcp", f"-p tcp -m tcp --sport 53 -j {ch.dns}")
    add("mangle", ch.down, "down.queue", f"-j {ch.downq}")
    add("mangle", ch.down, "down.net", f"-j {ch.net}")

    if spec.fail_open:
        net = '-m comment --comment "hushgate safety net: fail-open, counts only" -j RETURN'
        add("mangle", ch.net, "net.open", net)
    else:
        net = '-m comment --comment "hushgate safety net: fail-closed" -j DROP'
        add("mangle", ch.net, "net.drop", net)

    # The router's own resolver: queries arrive in INPUT, answers leave in OUTPUT.
    for d in spec.devices:
        n = _safe(d.name)
        for kind, match in sources(d):
            add("mangle", ch.input, f"input.{n}.{kind}", f"{match} {set_dev}")
    for proto in ("udp", "tcp"):
        add(
            "mangle",
            ch.output,
            f"output.dns_{proto}",
            f"-p {proto} -m {proto} --sport 53 -m connmark --mark {DEV:#x}/{DEV:#x} -j {ch.dns}",
        )

    # An `accept` verdict with a mark: save it to the connection before the packet leaves.
    add(
        "mangle",
        ch.post,
        "post.save_verdict",
        f"-m connmark --mark {DEV:#x}/{DEV:#x} -m mark ! --mark 0x0/{V:#x} {save_verdict}",
    )

    # Dynamic: what `run` owns.
    queue = _queue_target(spec)
    if not block_family:
        add("mangle", ch.queue, "queue.up", queue, dynamic=True)
        if spec.queue_downstream:
            add("mangle", ch.downq, "queue.down", queue, dynamic=True)
        else:
            add("mangle", ch.downq, "queue.down_kernel", "-j ACCEPT", dynamic=True)
    add("mangle", ch.dns, "queue.dns", queue, dynamic=True)
    return rules


def _proto(match: str, proto: str) -> str:
    """`match` and `-p PROTO` in iptables-save's canonical order (addresses first, then -p, then
    other matches), so `doctor` finds the rule as the kernel prints it."""
    return f"{match} -p {proto}" if match.startswith(("-s ", "-d ")) else f"-p {proto} {match}"


def _tcp(match: str) -> str:
    return _proto(match, "tcp")


def relay_rules(spec: FirewallSpec, family: int, ch: Chains,
                sources: Callable[[DeviceMatch], list[tuple[str, str]]]) -> list[Rule]:
    """The stream hold's kernel side for one family (design.md 5 and 5a): relayed devices' TCP to
    a WAN destination is delivered to the relay's transparent listener (TPROXY, which drops when
    nothing listens: fail-closed); to any other destination it gets the bypass connmark; and in
    filter FORWARD, a relayed device's TCP without that mark is reset (the guarantee: nothing
    of it is forwarded, whatever failed before). The relay port is reachable only by tproxied
    packets (a direct connect would loop)."""
    dyn = spec.fail_open
    M, B = spec.tproxy_mark, spec.relay_mark
    on_ip = "0.0.0.0" if family == 4 else "::"
    out: list[Rule] = []

    def add(table: str, chain: str, label: str, text: str) -> None:
        out.append(Rule(table, chain, text, label, dyn))

    relayed = [d for d in spec.devices if d.name in spec.relay_devices]
    # the jump is persistent (a dynamic chain may be empty, never missing)
    out.append(Rule("filter", ch.reject, f"-j {ch.relayfwd}", "relay.forward", False))
    # A SYN the relay could not connect upstream for (design.md 5a.3) comes back from its queue
    # with the packet mark B and is answered as the path answered the relay; a refused one comes
    # back unmarked and meets the reset below, like any TCP that was not intercepted.
    unreachable = "icmp-host-unreachable" if family == 4 else "icmp6-addr-unreachable"
    add("filter", ch.relayfwd, "relayfwd.syn_unreachable",
        f"-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m mark --mark {B:#x}/{B:#x} "
        f"-j REJECT --reject-with {unreachable}")
    for d in relayed:
        n = _safe(d.name)
        for kind, match in sources(d):
            add("filter", ch.relayfwd, f"relayfwd.{n}.{kind}.untracked",
                f"{_tcp(match)} -m conntrack --ctstate INVALID,UNTRACKED -j DROP")
            add("filter", ch.relayfwd, f"relayfwd.{n}.{kind}.reset",
                f"{_tcp(match)} -m connmark ! --mark {B:#x}/{B:#x} "
                "-j REJECT --reject-with tcp-reset")
    add("mangle", ch.tproxy, "tproxy.local", "-m addrtype --dst-type LOCAL -j RETURN")
    for d in relayed:
        n = _safe(d.name)
        for kind, match in sources(d):
            add("mangle", ch.tproxy, f"tproxy.{n}.{kind}", f"{_tcp(match)} -j {ch.relay}")
    for i, net in enumerate(RELAY_BYPASS_NETS[family]):
        add("mangle", ch.relay, f"relay.bypass.{i}",
            f"-d {net} -j CONNMARK --set-xmark {B:#x}/{B:#x}")
    add("mangle", ch.relay, "relay.bypassed", f"-m connmark --mark {B:#x}/{B:#x} -j RETURN")
    # Do not answer a SYN the cloud would not answer (design.md 5a.3): the SYN waits in the
    # guard's queue while the relay connects upstream, and comes back (`repeat`, packet mark B)
    # to be delivered to the relay only when that connect succeeded. No guard: no verdict, the
    # kernel drops it (fail-closed; `--queue-bypass` with fail = "open").
    add("mangle", ch.relay, "relay.syn",
        f"-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m mark ! --mark {B:#x}/{B:#x} "
        f"-j {ch.syn}")
    # the queue is `run`'s (dynamic): without a guard the chain is empty and the SYN meets
    # TPROXY with no listener, which drops it
    out.append(Rule("mangle", ch.syn, _queue_target(spec), "relay.syn_hold", True))
    add("mangle", ch.relay, "relay.tproxy",
        f"-p tcp -j TPROXY --on-port {spec.relay_port} --on-ip {on_ip} "
        f"--tproxy-mark {M:#x}/{M:#x}")
    # persistent either way: a direct connect to the relay port is never legitimate
    out.append(Rule("mangle", ch.input,
                    f"-p tcp -m tcp --dport {spec.relay_port} -m mark ! --mark {M:#x}/{M:#x} "
                    "-j DROP", "input.relay_port", False))
    return out


# --------------------------------------------------------------------------- iptables-save


@dataclass(frozen=True, slots=True)
class SavedRule:
    chain: str
    spec: str
    packets: int
    bytes: int


@dataclass(slots=True)
class SavedTable:
    chains: dict[str, str] = field(default_factory=dict)  # name -> policy ("-" for user chains)
    rules: list[SavedRule] = field(default_factory=list)

    def chain_rules(self, chain: str) -> list[SavedRule]:
        return [r for r in self.rules if r.chain == chain]


_COUNTED = re.compile(r"^\[(\d+):(\d+)\]\s+-A\s+(\S+)\s*(.*)$")
_PLAIN = re.compile(r"^-A\s+(\S+)\s*(.*)$")


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse `iptables-save [-c]` output into tables of chains and ordered rules."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], SavedTable())
        elif current is None or line == "COMMIT":
            continue
        elif line.startswith(":"):
            parts = line[1:].split()
            current.chains[parts[0]] = parts[1] if len(parts) > 1 else "-"
        elif m := _COUNTED.match(line):
            current.rules.append(SavedRule(m[3], m[4], int(m[1]), int(m[2])))
        elif m := _PLAIN.match(line):
            current.rules.append(SavedRule(m[1], m[2], 0, 0))
    return tables


# --------------------------------------------------------------------------- iptables backend


@dataclass(frozen=True, slots=True)
class _Tools:
    family: int
    binary: str

    def _derived(self, suffix: str) -> str:
        # iptables -> iptables-save; iptables-legacy -> iptables-legacy-save
        return f"{self.binary}-{suffix}"

    @property
    def save(self) -> str:
        return self._derived("save")

    @property
    def restore(self) -> str:
        return self._derived("restore")


class IptablesBackend:
    """Owns hushgate's iptables/ip6tables rules. `variant` is None (the system's `iptables`,
    whichever flavour it is), "legacy" or "nft"; `binaries` overrides the names outright.
    `families=(4,)` only for a kernel without IPv6 (no /proc/sys/net/ipv6): anywhere else the
    IPv6 rules are required, since a device's IPv6 must be guarded or blocked, never open."""

    def __init__(
        self,
        spec: FirewallSpec,
        run: Runner = run_command,
        variant: str | None = None,
        binaries: tuple[str, str] | None = None,
        families: tuple[int, ...] = (4, 6),
    ) -> None:
        if variant not in (None, "legacy", "nft"):
            raise ValueError(f"variant must be legacy or nft, not {variant!r}")
        self.spec = spec
        self.run = run
        self.variant = variant
        if binaries is None:
            suffix = f"-{variant}" if variant else ""
            binaries = (f"iptables{suffix}", f"ip6tables{suffix}")
        if not families or set(families) - {4, 6}:
            raise ValueError(f"families must be a subset of (4, 6), not {families!r}")
        self._by_family = {4: _Tools(4, binaries[0]), 6: _Tools(6, binaries[1])}
        self.tools = tuple(self._by_family[f] for f in sorted(set(families)))
        self.chains = _chains(spec)

    # -- rendering ----------------------------------------------------------------------

    def rules(self, family: int) -> list[Rule]:
        return build_rules(self.spec, family)

    def restore_text(
        self,
        family: int,
        current: dict[str, SavedTable] | None = None,
        *,
        dynamic: bool | None = True,
    ) -> str:
        """The `iptables-restore --noflush` input that brings the kernel from `current` to the
        spec. dynamic=True: everything (run's start); None: persistent only, existing dynamic
        chains kept as they are (apply while a run may be active)."""
        current = current or {}
        rules = self.rules(family)
        out: list[str] = []
        for table in TABLES:
            cur = current.get(table, SavedTable())
            lines = [f"*{table}"]
            for t, chain in self.chains.persistent():
                if t == table:
                    lines.append(f":{chain} - [0:0]")  # declares or flushes
            for t, chain in self.chains.dynamic():
                if t == table and (dynamic or chain not in cur.chains):
                    lines.append(f":{chain} - [0:0]")
            for r in rules:
                if r.table == table and (not r.dynamic or dynamic):
                    lines.append(r.line)
            for t, hook, chain in self.chains.hooks():
                if t != table:
                    continue
                positions = _jump_positions(cur, hook, chain)
                if positions != [1]:
                    lines += [f"-D {hook} -j {chain}"] * len(positions)
                    lines.append(f"-I {hook} 1 -j {chain}")
            if not self.chains.relay_on:
                # No device relayed any more (a mode changed at run time, or the config): the
                # relay chains of before are emptied and unhooked, or they would still steer
                # the device's TCP to the relay (and reset what bypasses it).
                for t, chain in self.chains._relay_chains():
                    if t == table and chain in cur.chains:
                        lines.append(f":{chain} - [0:0]")
                if table == "mangle":
                    lines += [f"-D PREROUTING -j {self.chains.tproxy}"] * len(
                        _jump_positions(cur, "PREROUTING", self.chains.tproxy))
            lines.append("COMMIT")
            out += lines
        return "\n".join(out) + "\n"

    def render(self) -> str:
        """The exact rules, as the restore input applied on a router without them (iptables-save
        syntax, with the hook jumps as `-I CHAIN 1`). Runs nothing."""
        head = [
            (
                f"# hushgate iptables rules, fail mode {self.spec.fail_mode}, queue "
                f"{self.spec.queue}-{self.spec.queue_last}; apply with "
                "`iptables-restore --noflush` / `ip6tables-restore --noflush`."
            ),
            "# Rules in *_QUEUE, *_DNS and *_DOWNQ are dynamic (installed by `hushgate run`);",
            "# everything else, including the safety net, stays until `hushgate firewall remove`.",
        ]
        head += [f"# warning: {_oneline(w)}" for w in self.spec.warnings()]
        parts = ["\n".join(head)]
        for t in self.tools:
            parts.append(f"# IPv{t.family}: {t.restore} --noflush\n" + self.restore_text(t.family))
        return "\n".join(parts)

    # -- kernel state -------------------------------------------------------------------

    def quic_refusals(self) -> dict[str, int]:
        """Packets each device's QUIC block rules refused so far (the kernel's rule counters;
        {} when nothing is blocked): how `status` tells a device that never falls back to TCP."""
        names = {_safe(d.name): d.name for d in self.spec.devices}
        out: dict[str, int] = {}
        for t in self.tools:
            mangle = self.saved(t.family).get("mangle")
            if mangle is None:
                continue
            counts = {(r.chain, r.spec): r.packets for r in mangle.rules}
            for rule in self.rules(t.family):
                if rule.label.startswith("dispatch.") and rule.label.endswith(".quic"):
                    name = names.get(rule.label.split(".")[1])
                    if name is not None:
                        out[name] = out.get(name, 0) + counts.get((rule.chain, rule.spec), 0)
        return out

    def backend_name(self) -> str:
        """ "iptables-nft" or "iptables-legacy", from `iptables --version`."""
        res = self.run([self._by_family[4].binary, "--version"], None)
        if not res.ok:
            raise FirewallError.from_result("iptables not usable", res)
        return "iptables-nft" if "nf_tables" in res.stdout else "iptables-legacy"

    def saved(self, family: int) -> dict[str, SavedTable]:
        t = self._by_family[family]
        res = self.run([t.save, "-c"], None)
        if not res.ok:
            raise FirewallError.from_result("cannot read rules", res)
        return parse_save(res.stdout)

    def _restore(self, family: int, text: str) -> None:
        t = self._by_family[family]
        res = self.run([t.restore, "-w", "--noflush"], text)
        if not res.ok:
            raise FirewallError.from_result("cannot apply rules", res)

    def apply_safety_net(self) -> None:
        """Install or refresh the persistent rules (dispatch, fast path, safety net) in one
        transaction per family, keeping whatever dynamic rules a running guard has installed."""
        for t in self.tools:
            self._restore(t.family, self.restore_text(t.family, self.saved(t.family), dynamic=None))
        if self.spec.relay and not self.spec.fail_open:
            self.install_relay_routing()

    # -- policy routing of the relay (TPROXY needs it: kernel-facts.md) -----------------------

    def _ip(self, family: int, *args: str) -> Completed:
        return self.run(["ip", f"-{family}", *args], None)

    def relay_routing_status(self) -> dict[str, bool]:
        """{"ipv4": present, ...}: the fwmark rule and the local route of the relay's table."""
        s = self.spec
        out: dict[str, bool] = {}
        for t in self.tools:
            rules = self._ip(t.family, "rule", "show", "priority", str(s.relay_priority))
            route = self._ip(t.family, "route", "show", "table", str(s.relay_table))
            has_rule = rules.ok and any(
                f"fwmark {s.tproxy_mark:#x}/{s.tproxy_mark:#x}" in ln
                and f"lookup {s.relay_table}" in ln for ln in rules.stdout.splitlines())
            has_route = route.ok and any(ln.startswith("local default") and "dev lo" in ln
                                         for ln in route.stdout.splitlines())
            out[f"ipv{t.family}"] = has_rule and has_route
        return out

    def install_relay_routing(self) -> None:
        """`ip rule fwmark M/M lookup T` and `local default dev lo` in T, per family; added only
        when missing, so it is never duplicated (a missing rule means TPROXY'd packets are
        routed on, to FORWARD, where the relay's reject resets them: still closed)."""
        s = self.spec
        present = self.relay_routing_status()
        # local delivery goes through lo: always up on a router, down in a fresh namespace
        self.run(["ip", "link", "set", "lo", "up"], None)
        for t in self.tools:
            fam = t.family
            res = self._ip(fam, "route", "replace", "local", "default", "dev", "lo", "table",
                           str(s.relay_table))
            if not res.ok:
                raise FirewallError.from_result("cannot add the relay's route", res)
            if not present.get(f"ipv{fam}"):
                self._del_relay_rule(fam)
                res = self._ip(fam, "rule", "add", "fwmark", f"{s.tproxy_mark:#x}/{s.tproxy_mark:#x}",
                               "lookup", str(s.relay_table), "priority", str(s.relay_priority))
                if not res.ok:
                    raise FirewallError.from_result("cannot add the relay's ip rule", res)

    def _del_relay_rule(self, family: int) -> None:
        s = self.spec
        for _ in range(8):  # every copy, bounded
            res = self._ip(family, "rule", "del", "fwmark", f"{s.tproxy_mark:#x}/{s.tproxy_mark:#x}",
                           "lookup", str(s.relay_table), "priority", str(s.relay_priority))
            if not res.ok:
                return

    def remove_relay_routing(self) -> None:
        for t in self.tools:
            self._del_relay_rule(t.family)
            self._ip(t.family, "route", "flush", "table", str(self.spec.relay_table))

    def install_dynamic(self) -> None:
        """`run` start: the persistent rules refreshed to this spec plus fresh queue rules, in one
        transaction, so stale dynamic rules of a crashed run are replaced, never duplicated."""
        for t in self.tools:
            self._restore(t.family, self.restore_text(t.family, self.saved(t.family), dynamic=True))
        if self.spec.relay:
            self.install_relay_routing()

    def remove_dynamic(self) -> None:
        """`run` exit: empty the dynamic chains; the safety net stays."""
        if self.spec.relay and self.spec.fail_open:
            self.remove_relay_routing()
        for t in self.tools:
            cur = self.saved(t.family)
            lines: list[str] = []
            for table in TABLES:
                have = cur.get(table, SavedTable()).chains
                flush = [
                    f":{c} - [0:0]" for tb, c in self.chains.dynamic() if tb == table and c in have
                ]
                if flush:
                    lines += [f"*{table}", *flush, "COMMIT"]
            if lines:
                self._restore(t.family, "\n".join(lines) + "\n")

    def _ours(self, chain: str) -> bool:
        tag = self.chains.entry
        return chain == tag or chain.startswith(tag + "_")

    def remove_all(self) -> None:
        """`firewall remove`: delete every jump to our chains, then flush and delete them (any
        chain named TAG or TAG_*, so leftovers of older layouts go too). Conntrack marks stay on
        live connections but no rule reads them any more."""
        if self.spec.relay:
            self.remove_relay_routing()
        for t in self.tools:
            cur = self.saved(t.family)
            lines: list[str] = []
            for table in ("mangle", "filter", "raw"):
                tab = cur.get(table)
                if tab is None:
                    continue
                ours = [c for c in tab.chains if self._ours(c)]
                jumps = [
                    r for r in tab.rules if not self._ours(r.chain) and _target(r.spec) in ours
                ]
                if not ours and not jumps:
                    continue
                lines.append(f"*{table}")
                lines += [f"-D {r.chain} {r.spec}" for r in jumps]
                lines += [f"-F {c}" for c in ours]
                lines += [f"-X {c}" for c in ours]
                lines.append("COMMIT")
            if lines:
                self._restore(t.family, "\n".join(lines) + "\n")

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Which rules are present (text for text against the spec), hook positions, per-rule
        counters, and the fail mode actually in force."""
        out: dict[str, Any] = {
            "backend": self.backend_name(),
            "fail_mode": self.spec.fail_mode,
            "families": {},
            "warnings": self.spec.warnings(),
        }
        for t in self.tools:
            out["families"][f"ipv{t.family}"] = self._family_status(t.family, self.saved(t.family))
        fams = out["families"].values()
        out["safety_net"] = all(f["safety_net"] for f in fams)
        out["dynamic"] = all(f["dynamic"] for f in fams)
        modes = {f["installed_fail_mode"] for f in fams}
        out["installed_fail_mode"] = modes.pop() if len(modes) == 1 else "mixed"
        return out

    def _family_status(self, family: int, cur: dict[str, SavedTable]) -> dict[str, Any]:
        rules = []
        for r in self.rules(family):
            found = [
                s for s in cur.get(r.table, SavedTable()).chain_rules(r.chain) if s.spec == r.spec
            ]
            rules.append(
                {
                    "label": r.label,
                    "table": r.table,
                    "chain": r.chain,
                    "rule": r.line,
                    "dynamic": r.dynamic,
                    "present": bool(found),
                    "duplicates": max(len(found) - 1, 0),
                    "packets": sum(s.packets for s in found),
                    "bytes": sum(s.bytes for s in found),
                }
            )
        expected = {(r.table, r.line) for r in self.rules(family)}
        unexpected = [
            f"{table}: -A {s.chain} {s.spec}"
            for table, tab in cur.items()
            for s in tab.rules
            if self._ours(s.chain) and (table, f"-A {s.chain} {s.spec}") not in expected
        ]
        hooks = {}
        for table, hook, chain in self.chains.hooks():
            hooks[f"{table}/{hook}"] = {
                "chain": chain,
                "positions": _jump_positions(cur.get(table, SavedTable()), hook, chain),
            }
        persistent_ok = all(r["present"] for r in rules if not r["dynamic"]) and all(
            h["positions"] == [1] for h in hooks.values()
        )
        dynamic_rules = [r for r in rules if r["dynamic"]]
        dynamic_ok = bool(dynamic_rules) and all(r["present"] for r in dynamic_rules)
        net = cur.get("mangle", SavedTable()).chain_rules(self.chains.net)
        if any(s.spec.endswith("-j DROP") for s in net):
            installed = "closed"
        elif net:
            installed = "open"
        else:
            installed = "none"
        return {
            "safety_net": persistent_ok,
            "dynamic": dynamic_ok,
            "installed_fail_mode": installed,
            "hooks": hooks,
            "missing": [r["rule"] for r in rules if not r["present"]],
            "unexpected": unexpected,
            "rules": rules,
        }

    def counters(self) -> dict[str, dict[str, tuple[int, int]]]:
        """{"ipv4": {label: (packets, bytes)}, "ipv6": {...}} for every expected rule."""
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for t in self.tools:
            st = self._family_status(t.family, self.saved(t.family))
            out[f"ipv{t.family}"] = {r["label"]: (r["packets"], r["bytes"]) for r in st["rules"]}
        return out

    # -- verdict helpers ---------------------------------------------------------------------

    def conntrack_mark_argv(
        self, proto: str, src: str, dst: str, sport: int, dport: int, kind: MarkKind | str
    ) -> list[str]:
        """`conntrack -U` for one connection (full original 5-tuple, the only form this kernel
        honours): sets our verdict bits, keeps the rest of the connmark."""
        mk = self.spec.marks
        value = mk.value(kind)
        mask = mk.device if MarkKind(kind) is MarkKind.DEVICE else mk.verdict_mask
        fam = "ipv6" if ":" in src else "ipv4"
        return [
            "conntrack",
            "-U",
            "-f",
            fam,
            "-p",
            proto,
            "-s",
            src,
            "-d",
            dst,
            "--sport",
            str(sport),
            "--dport",
            str(dport),
            "-m",
            f"{value:#x}/{mask:#x}",
        ]


def _target(spec: str) -> str | None:
    m = re.search(r"(?:^|\s)-[jg]\s+(\S+)", spec)
    return m.group(1) if m else None


def _jump_positions(table: SavedTable, hook: str, chain: str) -> list[int]:
    """1-based positions of the bare `-j CHAIN` jump in a built-in chain."""
    return [i for i, r in enumerate(table.chain_rules(hook), start=1) if r.spec == f"-j {chain}"]


# --------------------------------------------------------------------------- nftables


@dataclass(frozen=True, slots=True)
class NftCheck:
    """What `nft -c` said. `full_ok` is the ruleset as rendered (None when not run); `rest_ok`
    is the ruleset with every `queue` statement replaced by `counter accept`, which validates
    everything else on a kernel without CONFIG_NFT_QUEUE."""

    ok: bool
    full_ok: bool | None
    rest_ok: bool | None
    syntax_ok: bool
    queue_supported: bool | None
    message: str
    replaced: tuple[str, ...] = ()


class NftablesBackend:
    """Generates `table inet hushgate` as fw4 on OpenWrt would load it. Same layout as the
    iptables backend, with two differences nftables allows: REJECT works at priority mangle, and
    an `accept` in our base chain never skips fw4's own chains at priority filter (our accepts
    are "no objection"). Generated and syntax-checked here, not run: this kernel lacks the nft
    queue statement (CONFIG_NFT_QUEUE off)."""

    def __init__(self, spec: FirewallSpec, run: Runner = run_command) -> None:
        self.spec = spec
        self.run = run

    @property
    def table(self) -> str:
        return self.spec.tag

    def quic_refusals(self) -> dict[str, int]:
        """Not counted with nftables yet (its rules carry no counters): {}."""
        return {}

    def queue_statement(self) -> str:
        s = self.spec
        flags = ([] if s.queue_count == 1 else ["fanout"]) + (["bypass"] if s.fail_open else [])
        num = f"{s.queue}" if s.queue_count == 1 else f"{s.queue}-{s.queue_last}"
        # nft 0.9-1.0 syntax, which fw4's nft understands: `queue num 7-8 fanout,bypass`
        return f"queue num {num}" + (f" {','.join(flags)}" if flags else "")

    def offload_rule(self) -> str:
        """A flow-offload rule that keeps configured devices' connections out of a flowtable."""
        dev = self.spec.marks.device
        return f"ct mark & {dev:#x} == 0 meta l4proto {{ tcp, udp }} flow add @ft"

    def render(self) -> str:
        s = self.spec
        mk = s.marks
        V, ALLOW, BLOCK, DEV = mk.verdict_mask, mk.allow, mk.block, mk.device
        keep = 0xFFFFFFFF & ~V
        macs = sorted({d.mac for d in s.devices if d.mac})
        v4 = sorted({d.address for d in s.devices if d.address})
        v6 = sorted({a for d in s.devices for a in d.address6})
        quic = [d for d in s.devices if d.name in s.quic_block_devices]
        q_macs = sorted({d.mac for d in quic if d.mac})
        q_v4 = sorted({d.address for d in quic if d.address})
        q_v6 = sorted({a for d in quic for a in d.address6})
        set_block = f"ct mark set ct mark & {keep:#010x} | {BLOCK:#x}"

        def nset(name: str, typ: str, elems: list[str]) -> list[str]:
            body = f"\t\ttype {typ}"
            if elems:
                body += f"\n\t\telements = {{ {', '.join(elems)} }}"
            return [f"\tset {name} {{", body, "\t}"]

        L: list[str] = [
            f"# hushgate nftables ruleset (fw4 style), fail mode {s.fail_mode}.",
            "# Chains queue_up, queue_down, dns and syn_hold are dynamic: `hushgate run` fills them and",
            "# flushes them on exit; the safety net stays until `hushgate firewall remove`.",
            "# fw4 flow offloading moves established flows past every forward chain, this one",
            "# included: turn it off (uci set firewall.@defaults[0].flow_offloading=0), or offload",
            f"# only other flows: {self.offload_rule()}",
        ]
        L += [f"# warning: {_oneline(w)}" for w in s.warnings()]
        L.append(f"table inet {self.table} {{")
        L += nset("dev_mac", "ether_addr", macs)
        L += nset("dev_v4", "ipv4_addr", v4)
        L += nset("dev_v6", "ipv6_addr", v6)
        L += nset("quic_block_mac", "ether_addr", q_macs)
        L += nset("quic_block_v4", "ipv4_addr", q_v4)
        L += nset("quic_block_v6", "ipv6_addr", q_v6)
        relayed = [d for d in s.devices if d.name in s.relay_devices]
        if s.relay:
            L += nset("relay_mac", "ether_addr", sorted({d.mac for d in relayed if d.mac}))
            L += nset("relay_v4", "ipv4_addr", sorted({d.address for d in relayed if d.address}))
            L += nset("relay_v6", "ipv6_addr", sorted({a for d in relayed for a in d.address6}))

        def chain(name: str, body: list[str], hook: str | None = None) -> None:
            L.append(f"\tchain {name} {{")
            if hook:
                L.append(f"\t\ttype filter hook {hook} priority mangle; policy accept;")
            L.extend(f"\t\t{b}" for b in body)
            L.append("\t}")

        relay_src = ("ether saddr @relay_mac", "ip saddr @relay_v4", "ip6 saddr @relay_v6")
        M, B = s.tproxy_mark, s.relay_mark
        fwd: list[str] = []
        if s.relay:
            # A SYN the relay could not connect upstream for: answered as the path answered
            # (design.md 5a.3); a refused one meets the reset below.
            fwd.append(f"meta l4proto tcp tcp flags & (syn | ack) == syn meta mark & {B:#x} == "
                       f"{B:#x} counter reject with icmpx type host-unreachable")
            # The guarantee (design.md 5a.1): a relayed device's TCP that reaches forward was
            # not intercepted; only a bypass-marked connection (a local destination) may pass.
            # Fail-open: nft's tproxy falls through with no listener, and the packet goes on.
            for src in relay_src:
                if not s.fail_open:
                    fwd += [f"meta l4proto tcp {src} ct state invalid,untracked counter drop",
                            f"meta l4proto tcp {src} ct mark & {B:#x} != {B:#x} "
                            "counter reject with tcp reset"]
                fwd.append(f"meta l4proto tcp {src} ct mark & {B:#x} == {B:#x} accept")
        fwd += [
            f"ether saddr @quic_block_mac udp dport 443 {set_block}",
            f"ip saddr @quic_block_v4 udp dport 443 {set_block}",
            f"ip6 saddr @quic_block_v6 udp dport 443 {set_block}",
        ]
        if not s.ipv6:
            fwd += [
                f"meta nfproto ipv6 ether saddr @dev_mac {set_block}",
                f"ip6 saddr @dev_v6 {set_block}",
            ]
        fwd += [
            "ether saddr @dev_mac goto up",
            "ip saddr @dev_v4 goto up",
            "ip6 saddr @dev_v6 goto up",
            "ip daddr @dev_v4 goto down",
            "ip6 daddr @dev_v6 goto down",
            f"ct mark & {DEV:#x} == {DEV:#x} goto down",
        ]
        chain("forward", fwd, hook="forward")
        save = [
            f"meta mark & {V:#x} == {ALLOW:#x} ct mark set ct mark & {keep:#010x} | {ALLOW:#x}",
            f"meta mark & {V:#x} == {BLOCK:#x} ct mark set ct mark & {keep:#010x} | {BLOCK:#x}",
            f"meta mark & {V:#x} == {V:#x} ct mark set ct mark | {V:#x}",
        ]
        control = [
            f"meta nfproto ipv{fam} meta l4proto udp ct mark & {V:#x} == {V:#x} "
            f"meta length <= {_CONTROL_MAX_IP_LEN[fam]} counter accept"
            for fam in (4, 6)
        ] + [
            f"meta nfproto ipv{fam} meta l4proto tcp ct mark & {V:#x} == {V:#x} "
            f"tcp flags & (syn | fin | rst | psh | urg | ack) == ack "
            f"meta length <= {_ACK_MAX_IP_LEN[fam]} counter accept"
            for fam in (4, 6)
        ]
        chain(
            "up",
            [
                f"ct mark & {DEV:#x} == 0 ct mark set ct mark | {DEV:#x}",
                *save,
                f"ct mark & {V:#x} == {ALLOW:#x} counter accept",
                f"ct mark & {V:#x} == {BLOCK:#x} goto reject_blocked",
                *control,
                "jump queue_up",
                "jump safety_net",
            ],
        )
        chain(
            "down",
            [
                f"ct mark & {V:#x} == {ALLOW:#x} counter accept",
                f"ct mark & {V:#x} == {BLOCK:#x} goto reject_blocked",
                "ct state != { established, related } return",
                "udp sport 53 jump dns",
                "tcp sport 53 jump dns",
                "jump queue_down",
                "jump safety_net",
            ],
        )
        chain(
            "reject_blocked",
            [
                "meta l4proto tcp counter reject with tcp reset",
                "meta l4proto udp counter reject with icmpx type port-unreachable",
                "counter drop",
            ],
        )
        q = self.queue_statement()
        chain("queue_up", [q] if s.ipv6 else ["meta nfproto ipv4 " + q])
        chain("queue_down", [q if s.queue_downstream else "counter accept"])
        chain("dns", [q])
        if s.relay:
            chain("syn_hold", [q])
        if s.fail_open:
            chain("safety_net", ['counter comment "hushgate safety net: fail-open, counts only"'])
        else:
            chain("safety_net", ['counter drop comment "hushgate safety net: fail-closed"'])
        if s.relay:
            nets4 = ", ".join(RELAY_BYPASS_NETS[4])
            nets6 = ", ".join(RELAY_BYPASS_NETS[6])
            chain("prerouting", [
                "fib daddr type local return",
                *[f"meta l4proto tcp {src} jump relay" for src in relay_src],
            ], hook="prerouting")
            P = s.relay_port
            chain("relay", [
                f"ip daddr {{ {nets4} }} ct mark set ct mark | {B:#x}",
                f"ip6 daddr {{ {nets6} }} ct mark set ct mark | {B:#x}",
                f"ct mark & {B:#x} == {B:#x} return",
                # the SYN waits for the relay's upstream connect (design.md 5a.3); syn_hold is
                # dynamic: empty without a guard, and the SYN meets tproxy with no listener
                f"meta l4proto tcp tcp flags & (syn | ack) == syn meta mark & {B:#x} != {B:#x} "
                "jump syn_hold",
                f"meta l4proto tcp tproxy ip to :{P} meta mark set meta mark | {M:#x} accept",
                f"meta l4proto tcp tproxy ip6 to :{P} meta mark set meta mark | {M:#x} accept",
                # nft's tproxy does NOT drop when no socket listens (the rule breaks, the packet
                # goes on unproxied: OpenWrt #23480): the drop is explicit when fail-closed.
                ('counter comment "hushgate relay: fail-open, no listener"' if s.fail_open else
                 'meta l4proto tcp counter drop comment "hushgate relay: no listener, fail-closed"'),
            ])
        chain(
            "input",
            ([f"tcp dport {s.relay_port} meta mark & {M:#x} != {M:#x} counter drop"]
             if s.relay else []) + [
                f"ether saddr @dev_mac ct mark set ct mark | {DEV:#x}",
                f"ip saddr @dev_v4 ct mark set ct mark | {DEV:#x}",
                f"ip6 saddr @dev_v6 ct mark set ct mark | {DEV:#x}",
            ],
            hook="input",
        )
        chain(
            "output",
            [
                f"ct mark & {DEV:#x} == {DEV:#x} udp sport 53 jump dns",
                f"ct mark & {DEV:#x} == {DEV:#x} tcp sport 53 jump dns",
            ],
            hook="output",
        )
        chain(
            "postrouting",
            [f"ct mark & {DEV:#x} == {DEV:#x} {r}" for r in save],
            hook="postrouting",
        )
        L.append("}")
        return "\n".join(L) + "\n"

    def render_without_queue(self) -> tuple[str, tuple[str, ...]]:
        """The ruleset with each `queue` statement replaced by `counter accept`."""
        replaced: list[str] = []
        out = []
        for line in self.render().splitlines():
            stripped = line.strip()
            if not stripped.startswith("#") and re.search(r"(^|\s)queue num ", stripped):
                replaced.append(stripped)
                line = re.sub(r"queue num .*$", "counter accept", line)
            out.append(line)
        return "\n".join(out) + "\n", tuple(replaced)

    def _nft_check(self, text: str) -> Completed:
        return self.run(["nft", "-c", "-f", "-"], text)

    def check(self) -> NftCheck:
        """Validate the ruleset with `nft -c` (needs nft and CAP_NET_ADMIN; nothing is loaded).

        Checked: the full syntax (nft parses every statement, `queue` included, before it asks
        the kernel), and, against this kernel, every set, chain, hook, priority, match, ct mark
        expression, reject and counter. Not checked against a kernel when it lacks the nft queue
        statement (CONFIG_NFT_QUEUE off, as here): the `queue` statements themselves, which are
        then replaced by `counter accept` for a second run. On OpenWrt, `kmod-nft-queue` provides
        them."""
        full = self._nft_check(self.render())
        if full.returncode == 127:
            return NftCheck(False, None, None, False, None, "nft not found: nothing was checked")
        if full.ok:
            return NftCheck(
                True,
                True,
                True,
                True,
                True,
                "nft -c accepted the complete ruleset, queue statements included",
            )
        err = full.stderr
        syntax_ok = "syntax error" not in err
        queue_missing = syntax_ok and _only_queue_errors(err)
        text, replaced = self.render_without_queue()
        rest = self._nft_check(text)
        if rest.ok and queue_missing:
            msg = (
                "syntax of the complete ruleset OK; this kernel lacks the nft queue statement "
                "(CONFIG_NFT_QUEUE off), so the queue statements were NOT checked against a "
                f"kernel; with {len(replaced)} queue statement(s) replaced by `counter accept`, "
                "the kernel accepted everything else"
            )
            return NftCheck(True, False, True, True, False, msg, replaced)
        detail = (rest.stderr or err).strip().splitlines()
        msg = "nft -c rejected the ruleset: " + (" | ".join(detail[:4]) or "unknown error")
        return NftCheck(False, False, rest.ok, syntax_ok, None, msg, replaced)

    def offload_status(self) -> dict[str, Any]:
        """Is flow offloading on (it moves established flows past the queue)? Looks at nft's
        flowtables and, on OpenWrt, uci's firewall defaults."""
        out: dict[str, Any] = {
            "flowtables": [],
            "uci_flow_offloading": None,
            "uci_flow_offloading_hw": None,
        }
        res = self.run(["nft", "list", "flowtables"], None)
        if res.ok:
            table = None
            for line in res.stdout.splitlines():
                m = re.match(r"\s*table (\S+ \S+)", line)
                if m:
                    table = m.group(1)
                m = re.match(r"\s*flowtable (\S+)", line)
                if m:
                    out["flowtables"].append(f"{table} {m.group(1)}" if table else m.group(1))
        for key, opt in (
            ("uci_flow_offloading", "flow_offloading"),
            ("uci_flow_offloading_hw", "flow_offloading_hw"),
        ):
            r = self.run(["uci", "-q", "get", f"firewall.@defaults[0].{opt}"], None)
            if r.ok and r.stdout.strip():
                out[key] = r.stdout.strip() == "1"
        out["offloading"] = bool(
            out["flowtables"] or out["uci_flow_offloading"] or out["uci_flow_offloading_hw"]
        )
        if out["offloading"]:
            out["detail"] = (
                "flow offloading is on: configured devices' established flows can bypass the "
                f"guard; disable it or offload only with `{self.offload_rule()}`"
            )
        else:
            out["detail"] = "no flow offloading found"
        return out

    def dynamic_script(self, install: bool = True) -> str:
        """`nft -f` input for `run`: refill (or just flush) the dynamic chains."""
        t = f"inet {self.table}"
        q = self.queue_statement()
        lines = [f"flush chain {t} queue_up", f"flush chain {t} queue_down", f"flush chain {t} dns"]
        if self.spec.relay:
            lines.append(f"flush chain {t} syn_hold")
        if install:
            lines += [
                f"add rule {t} queue_up {q if self.spec.ipv6 else 'meta nfproto ipv4 ' + q}",
                f"add rule {t} queue_down {q if self.spec.queue_downstream else 'counter accept'}",
                f"add rule {t} dns {q}",
            ]
            if self.spec.relay:
                lines.append(f"add rule {t} syn_hold {q}")
        return "\n".join(lines) + "\n"


def _only_queue_errors(stderr: str) -> bool:
    """True when every error nft reported points at a `queue` statement (kernel lacks it)."""
    errors = [ln for ln in stderr.splitlines() if "Error:" in ln]
    if not errors:
        return False
    lines = stderr.splitlines()
    for i, ln in enumerate(lines):
        if "Error:" in ln:
            source = lines[i + 1] if i + 1 < len(lines) else ""
            if "queue" not in source or "No such file or directory" not in ln:
                return False
    return True
