"""The engine: parsed packets and `now` in, verdicts and actions out.

Rules of this module: no IO, no clock (every entry point takes `now`, and time that runs
backwards is clamped, never trusted); the shell calls `receive`, `decide` and `handle_timer`, asks
`next_timer()` when to call again, and drains `take_actions()`. Held packets are opaque tokens the
shell gave us: the engine only ever releases them in arrival order or discards them, never
reorders, alters or partially releases an upload. A flow and an upload change state only by an
event, as `FLOW_TABLE` and `UPLOAD_TABLE` say ((state, event) -> state); a pair they do not list
raises `IllegalTransition`. The evidence about a held burst is the detector's (`Burst`, one per
burst); upload ids are allocated here (`UploadIds`), from a floor the shell gives.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import lru_cache
from typing import Any, NamedTuple

from guard.core.config import DeviceConfig, GuardConfig, normalize_mac
from guard.core.detector import (
    CONTROL_DATAGRAMS,
    UNDECIDED,
    Burst,
    DetectorConfig,
    Judgement,
    StreamConfig,
)
from guard.core.detector import Verdict as Judged
from guard.core.names import NameCache
from guard.core.packet import ACK, FIN, RST, SYN, TCP, UDP, Hint, Malformed, Packet
from guard.core.policy import (
    CategoryAction,
    Decision,
    Mode,
    Outcome,
    StandingRule,
    UploadAction,
    Verb,
    Window,
    standing_decision,
    standing_for,
    supersedes,
)
from guard.core.ruleset import RuleSet
from guard.core.sni import SniAssembler

# A pause under 1 s inside an upload does not start a new turn (design.md section 6).
UPLOAD_END_GAP_S = 1.0
# Idle flows are forgotten after these (conntrack's own defaults are longer; we only need the
# flow long enough to keep its name, category and sequence numbers).
TCP_IDLE_S = 900.0
UDP_IDLE_S = 120.0
MAX_FLOWS = 16384
# A burst's packet that finds the caps in total full: the burst is judged an upload at its cap.
NO_ROOM = Judged(Judgement.AUDIO, "no room in total")
# Real-time media from a speaker (calls, Drop-In): STUN and DTLS on UDP (design.md section 7).
REALTIME_HINTS = frozenset({Hint.STUN, Hint.DTLS})
# Ports whose UDP is infrastructure, never an upload: DNS, NTP, DHCP, mDNS, SSDP.
INFRA_UDP_PORTS = frozenset({53, 67, 68, 123, 5353, 1900})
HOST_MAX = 253


class Verdict(str, Enum):
    ACCEPT = "accept"
    DROP = "drop"  # silently (a duplicate of a held segment, a denied flow's leftovers)
    REJECT = "reject"  # drop and tell the sender (TCP reset / ICMP unreachable)
    HOLD = "hold"  # no verdict yet: the engine keeps the token


class FlowState(str, Enum):
    IDLE = "idle"  # inspected, nothing held
    PROVISIONAL = "provisional"  # a new burst is held while the detector watches it
    PENDING = "pending"  # an upload is held, waiting for a decision
    PASSING = "passing"  # an upload that may pass (allowed, window, monitor, first turn)
    DENIED = "denied"  # an upload was denied: its leftovers are dropped until it goes quiet
    ALLOWED = "allowed"  # decided for its lifetime: allowed category (the kernel passes it)
    # an allowed category by its DNS name alone: its first payload names it for sure (SNI)
    ALLOWED_UNCONFIRMED = "allowed-unconfirmed"
    BLOCKED = "blocked"  # decided for its lifetime: blocked category
    # An upload of this connection was pending when the guard last stopped: its first upstream
    # packet resets it (LOST), and every packet of it is dropped until it goes quiet (LOST_RESET)
    LOST = "lost"
    LOST_RESET = "lost-reset"


class FlowEvent(str, Enum):
    """What happens to a flow: each moves it as `FLOW_TABLE` says, or raises."""

    CATEGORY_ALLOWED = "category allowed"  # its category passes: decided for its lifetime
    NAME_ALLOWED = "name allowed"  # its DNS name's category passes, before any payload
    CONFIRMED = "confirmed"  # its first payload (SNI) confirmed an allowed category
    INSPECT = "inspect"  # its name (SNI) turned out to be an inspected category after all
    BURST_STARTED = "burst started"  # a new burst is held for the detector
    BURST_RELEASED = "burst released"  # judged a message: released in order
    BURST_DISCARDED = "burst discarded"  # its connection died while it was held
    UPLOAD_HELD = "upload held"  # an upload (or a first turn that ran too long) waits for a person
    UPLOAD_PASSED = "upload passed"  # an upload may pass (allowed, window, monitor, first turn)
    UPLOAD_DENIED = "upload denied"  # denied, expired, capped, lost: leftovers are dropped
    ACTIVITY_ENDED = "activity ended"  # an upload's traffic went quiet (UPLOAD_END_GAP_S)
    MIDSTREAM_RESET = "midstream reset"  # a connection older than the guard, reset when quiet
    LOST_RESET = "lost reset"  # the first packet of a connection lost across a restart
    BLOCKED = "blocked"  # a blocked category (or QUIC, or real-time media): for its lifetime


_F, _E = FlowState, FlowEvent
# (state, event) -> state. Any pair not in the table is illegal and raises IllegalTransition.
FLOW_TABLE: dict[tuple[FlowState, FlowEvent], FlowState] = {
    (_F.IDLE, _E.CATEGORY_ALLOWED): _F.ALLOWED,
    (_F.IDLE, _E.NAME_ALLOWED): _F.ALLOWED_UNCONFIRMED,
    (_F.IDLE, _E.BURST_STARTED): _F.PROVISIONAL,
    (_F.IDLE, _E.MIDSTREAM_RESET): _F.DENIED,
    (_F.IDLE, _E.BLOCKED): _F.BLOCKED,
    (_F.PROVISIONAL, _E.BURST_RELEASED): _F.IDLE,
    (_F.PROVISIONAL, _E.BURST_DISCARDED): _F.IDLE,
    (_F.PROVISIONAL, _E.UPLOAD_HELD): _F.PENDING,
    (_F.PROVISIONAL, _E.UPLOAD_PASSED): _F.PASSING,
    (_F.PROVISIONAL, _E.UPLOAD_DENIED): _F.DENIED,
    (_F.PROVISIONAL, _E.BLOCKED): _F.BLOCKED,
    (_F.PENDING, _E.UPLOAD_PASSED): _F.PASSING,
    (_F.PENDING, _E.UPLOAD_DENIED): _F.DENIED,
    (_F.PASSING, _E.UPLOAD_HELD): _F.PENDING,  # followups: a first turn that runs too long
    (_F.PASSING, _E.UPLOAD_DENIED): _F.DENIED,
    (_F.PASSING, _E.ACTIVITY_ENDED): _F.IDLE,
    (_F.PASSING, _E.BLOCKED): _F.BLOCKED,
    (_F.DENIED, _E.ACTIVITY_ENDED): _F.IDLE,
    (_F.DENIED, _E.BLOCKED): _F.BLOCKED,  # a blocked category overrides an upload's leftovers
    (_F.ALLOWED, _E.BLOCKED): _F.BLOCKED,
    (_F.ALLOWED_UNCONFIRMED, _E.CONFIRMED): _F.ALLOWED,
    (_F.ALLOWED_UNCONFIRMED, _E.INSPECT): _F.IDLE,
    (_F.ALLOWED_UNCONFIRMED, _E.BLOCKED): _F.BLOCKED,
    (_F.LOST, _E.LOST_RESET): _F.LOST_RESET,
    (_F.LOST, _E.BLOCKED): _F.BLOCKED,
    (_F.LOST_RESET, _E.ACTIVITY_ENDED): _F.IDLE,
    (_F.LOST_RESET, _E.BLOCKED): _F.BLOCKED,
    # BLOCKED is final
}
del _F, _E


class UploadState(str, Enum):
    PENDING = "pending"
    PASSING = "passing"  # allowed (by anyone) or passed by policy: the rest goes through
    # followups: passed as a dialogue's first turn; held if it runs past max_turn_s
    FIRST_TURN = "first-turn"
    MONITORED = "monitored"
    DENIED = "denied"
    ENDED = "ended"


class UploadEvent(str, Enum):
    """What happens to an upload: each moves it as `UPLOAD_TABLE` says, or raises. An upload
    starts PENDING (held), PASSING (passed by a standing decision), FIRST_TURN (passed by the
    followups mode) or MONITORED (monitor mode)."""

    ALLOWED = "allowed"  # a person, a hook or a window let it through
    DENIED = "denied"  # denied, expired, capped, lost, or a rule or quiet window
    LONG_TURN = "long turn"  # followups: a first turn longer than max_turn_s is held from then
    ENDED = "ended"  # its traffic went quiet


_U, _V = UploadState, UploadEvent
UPLOAD_TABLE: dict[tuple[UploadState, UploadEvent], UploadState] = {
    (_U.PENDING, _V.ALLOWED): _U.PASSING,
    (_U.PENDING, _V.DENIED): _U.DENIED,
    (_U.PASSING, _V.DENIED): _U.DENIED,
    (_U.PASSING, _V.ENDED): _U.ENDED,
    (_U.FIRST_TURN, _V.LONG_TURN): _U.PENDING,
    (_U.FIRST_TURN, _V.DENIED): _U.DENIED,
    (_U.FIRST_TURN, _V.ENDED): _U.ENDED,
    (_U.MONITORED, _V.ENDED): _U.ENDED,
    (_U.DENIED, _V.ENDED): _U.ENDED,
    # ENDED is final
}
UPLOAD_START_STATES = frozenset({_U.PENDING, _U.PASSING, _U.FIRST_TURN, _U.MONITORED})
del _U, _V

# States whose upstream packets `_decided` answers (the packet path's common states skip them in
# one set lookup)
_DECIDED = frozenset({FlowState.LOST, FlowState.LOST_RESET, FlowState.BLOCKED, FlowState.ALLOWED,
                      FlowState.ALLOWED_UNCONFIRMED})
# States whose upstream traffic is an activity that ends after UPLOAD_END_GAP_S of quiet
_DROPPING_OR_PASSING = frozenset({FlowState.PASSING, FlowState.DENIED, FlowState.LOST_RESET})
# States that hold nothing and wait for nothing: an idle flow may be forgotten
_FORGETTABLE = frozenset({FlowState.IDLE, FlowState.ALLOWED, FlowState.ALLOWED_UNCONFIRMED,
                          FlowState.BLOCKED, FlowState.LOST})


class IllegalTransition(RuntimeError):
    """A (state, event) pair the table does not list: a bug in the engine, never input's fault."""


class UnknownUpload(KeyError):
    pass


# ---------------------------------------------------------------------------------------------
# Values


class FlowKey(NamedTuple):
    """A flow seen from its device: (proto, device address/port, remote address/port). A
    named tuple, not a frozen dataclass: the flow and stream tables hash it several times per
    packet and connection, and a tuple's hash and equality run in C."""

    proto: int
    device_addr: str
    device_port: int
    remote_addr: str
    remote_port: int

    @property
    def remote(self) -> str:
        return _join(self.remote_addr, self.remote_port)


def _join(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass(frozen=True, slots=True)
class StreamBytes:
    """A held token of a relayed TCP stream: the relay's kept bytes of connection `conn` up to
    stream offset `end` (offset 0 is the connection's first upstream byte). Releasing or
    discarding a token acts on every kept byte before `end`: the engine only ever does either
    in order."""

    conn: int
    end: int


# TLS record types that carry no application data: change_cipher_spec, alert, handshake.
_TLS_HANDSHAKE_TYPES = frozenset({20, 21, 22})


@dataclass(slots=True)
class Held:
    token: Any
    size: int  # bytes of the packet (IP length): what memory caps count
    payload: int
    seq: int
    time: float


@dataclass(slots=True)
class Upload:
    id: int
    device: str
    device_addr: str
    key: FlowKey
    host: str | None
    category: str
    start: float
    end: float
    decided: float  # when the detector judged it an upload (capture time in analyze)
    decided_after_packets: int
    action: UploadAction
    turn: int
    bytes: int = 0
    packets: int = 0
    leaked_bytes: int = 0
    state: UploadState = UploadState.PENDING
    outcome: Outcome | None = None
    decided_by: str | None = None
    decision_time: float | None = None
    expires: float | None = None
    held: list[Held] = field(default_factory=list)
    held_bytes: int = 0
    seqs: set[tuple[int, int]] = field(default_factory=set)
    reason: str = ""
    # Held in a relayed stream: bounded in bytes only (the relay keeps bytes, not packets, and
    # a speaker that the router ACKs keeps sending: 20 s of 60 records/s)
    stream: bool = False

    def __post_init__(self) -> None:
        if self.state not in UPLOAD_START_STATES:
            raise IllegalTransition(f"upload {self.id}: cannot start {self.state.value}")

    def move(self, event: UploadEvent) -> UploadState:
        """The one way an upload changes state: as `UPLOAD_TABLE` says, or IllegalTransition."""
        state = UPLOAD_TABLE.get((self.state, event))
        if state is None:
            raise IllegalTransition(
                f"upload {self.id}: {event.value} is illegal when {self.state.value}")
        self.state = state
        return state

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "device": self.device,
            "device_addr": self.device_addr,
            "remote": self.key.remote,
            "proto": "tcp" if self.key.proto == TCP else "udp",
            "host": self.host,
            "category": self.category,
            "start": self.start,
            "end": self.end,
            "bytes": self.bytes,
            "packets": self.packets,
            "held_packets": len(self.held),
            "held_bytes": self.held_bytes,
            "action": self.action.value,
            "state": self.state.value,
            "outcome": self.outcome.value if self.outcome else None,
            "decided_by": self.decided_by,
            "expires": self.expires,
            "turn": self.turn,
            "leaked_bytes": self.leaked_bytes,
            "decided": self.decided,
            "decided_after_packets": self.decided_after_packets,
        }


@dataclass(slots=True)
class Flow:
    key: FlowKey
    device: DeviceConfig
    first: float
    last: float
    state: FlowState = FlowState.IDLE
    host: str | None = None
    category: str = "unknown"
    midstream: bool = True  # no SYN seen: it predates the guard (or the capture)
    bytes_up: int = 0
    bytes_down: int = 0
    packets_up: int = 0
    packets_down: int = 0
    last_up: float = -1.0  # last upstream payload packet
    sni: SniAssembler | None = None
    syn_seq: int | None = None
    # exact sequence numbers for resets (kernel-facts: only the latest ACKs are accepted)
    device_ack: int | None = None  # what the device acknowledged: the seq a RST to it needs
    remote_ack: int | None = None  # what the remote acknowledged: the seq a RST to it needs
    device_next: int | None = None
    # the held burst the detector is watching: its tokens, and its evidence (None when no
    # burst is being judged: the state is not PROVISIONAL)
    burst: list[Held] = field(default_factory=list)
    evidence: Burst | None = None
    # the current activity: upstream payload with gaps under UPLOAD_END_GAP_S
    activity_start: float = 0.0
    activity_bytes: int = 0
    activity_packets: int = 0
    activity_passed: int = 0
    upload: Upload | None = None
    deadline: float | None = None
    # A UDP flow whose first window was judged control datagrams: what it learnt about the
    # flow, as its category is, in every state: from then on its datagrams too small to carry a
    # codec frame pass without a hold (live: in the kernel, by connmark).
    control_run: bool = False
    control_marked: bool = False  # the kernel was told (MarkFlow "control")
    # The held burst's first segment, released to see whether its sender has more (the token
    # that went out: a copy of it again is a duplicate); when it went is the evidence's
    nudged: Held | None = None
    # A relayed TCP connection (design.md 5): the relay's id for it; its bursts are judged whole
    stream: int | None = None

    def move(self, event: FlowEvent) -> FlowState:
        """The one way a flow changes state: as `FLOW_TABLE` says, or IllegalTransition."""
        state = FLOW_TABLE.get((self.state, event))
        if state is None:
            raise IllegalTransition(
                f"flow {self.key}: {event.value} is illegal when {self.state.value}")
        self.state = state
        return state

    def summary(self) -> dict[str, Any]:
        return {
            "device": self.key.device_addr,
            "device_name": self.device.name,
            "remote": self.key.remote,
            "proto": "tcp" if self.key.proto == TCP else "udp",
            "host": self.host,
            "category": self.category,
            "state": self.state.value,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "packets_up": self.packets_up,
            "packets_down": self.packets_down,
            "first": self.first,
            "last": self.last,
        }


# ---------------------------------------------------------------------------------------------
# Actions (imperatives) and notifications (past-tense facts), drained by the shell


@dataclass(frozen=True, slots=True)
class Release:
    tokens: tuple[Any, ...]
    upload_id: int | None = None


@dataclass(frozen=True, slots=True)
class Discard:
    tokens: tuple[Any, ...]
    upload_id: int | None = None
    # UDP: the last held datagram goes back to the kernel marked blocked, whose reject rule
    # answers it with ICMP port-unreachable, so a stalled QUIC sender learns at once instead of
    # at its next retransmission probe
    reject_last: bool = False


@dataclass(frozen=True, slots=True)
class Reset:
    """Reset a TCP connection toward both ends with exact sequence numbers."""

    key: FlowKey
    seq_to_device: int | None  # = the device's latest ACK
    seq_to_remote: int | None  # = the remote's latest ACK
    reason: str
    # A second candidate toward the remote, sent after the first, when the exact number cannot
    # be known from one packet (a TCP keepalive carries SND.NXT - 1, an ACK carries SND.NXT).
    also_to_remote: int | None = None


@dataclass(frozen=True, slots=True)
class Unreachable:
    """Tell the device its UDP flow is dead (ICMP port unreachable), so QUIC fails fast."""

    key: FlowKey
    reason: str


@dataclass(frozen=True, slots=True)
class MarkFlow:
    """Decide a flow for its lifetime in the kernel (connmark fast path)."""

    key: FlowKey
    verdict: str  # "allow" | "block" | "control" (what cannot carry audio passes in the kernel)
    # set on the connection by the shell directly (conntrack), not by the current packet's
    # verdict: that packet may be dropped, and its mark with it
    direct: bool = False


@dataclass(frozen=True, slots=True)
class UploadHeld:
    upload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UploadDecided:
    upload: dict[str, Any]
    outcome: Outcome
    by: str


@dataclass(frozen=True, slots=True)
class UploadSeen:
    """An upload the policy did not hold (pass, monitor, window, rule): logged all the same."""

    upload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UploadEnded:
    upload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BurstReleased:
    key: FlowKey
    device: str
    host: str | None
    start: float
    decided: float
    delay_s: float
    bytes: int
    packets: int
    reason: str


@dataclass(frozen=True, slots=True)
class FlowBlocked:
    key: FlowKey
    device: str
    host: str | None
    category: str
    reason: str


@dataclass(frozen=True, slots=True)
class MacLearned:
    """A device configured by address showed its MAC: from now on it is known by it (its IPv6
    traffic, new leases), and the firewall should match it by MAC too."""

    device: str
    mac: str


@dataclass(frozen=True, slots=True)
class HeldCapHit:
    upload_id: int
    which: str


@dataclass(frozen=True, slots=True)
class ReserveUploadIds:
    """Make upload ids up to `through` durable before any later fact is handled: the guard's next
    start begins after them (the shell's store keeps the mark). Comes ahead of the fact that
    first announces an id of the new block."""

    through: int


class UploadIds:
    """Upload ids, allocated in the core: never reused, also across restarts. The shell gives the
    first one at start (`floor`: the store's mark + 1). With `block`, ids go in blocks the shell
    reserves durably: one `ReserveUploadIds` at start, and one for the next block when half of
    the current one is used, so an id is durable long before it is announced, and the packet
    path never waits for a disk write per upload. Without `block` (analyze, tests) nothing is
    reserved."""

    __slots__ = ("next", "block", "reserved", "requests")

    def __init__(self, floor: int = 1, block: int | None = None) -> None:
        if floor < 1 or (block is not None and block < 2):
            raise ValueError(f"upload ids: floor {floor} and block {block} must be >= 1 and >= 2")
        self.next = floor
        self.block = block
        self.reserved = floor - 1  # the last id asked to be durable
        self.requests: list[ReserveUploadIds] = []  # not yet handed to the shell
        if block is not None:
            self._reserve()

    def _reserve(self) -> None:
        assert self.block is not None
        self.reserved = max(self.reserved, self.next - 1) + self.block
        self.requests.append(ReserveUploadIds(self.reserved))

    def take(self) -> int:
        upload_id = self.next
        self.next += 1
        if self.block is not None and self.reserved - upload_id < self.block // 2:
            self._reserve()
        return upload_id

    def at_least(self, floor: int) -> None:
        """Ids from here on are at least `floor` (an id handed out elsewhere)."""
        self.next = max(self.next, floor)


# ---------------------------------------------------------------------------------------------


class Devices:
    """Which configured device a packet belongs to, and in which direction."""

    def __init__(self, devices: Iterable[DeviceConfig]) -> None:
        self.by_name: dict[str, DeviceConfig] = {}
        self.by_mac: dict[str, DeviceConfig] = {}
        self.by_addr: dict[str, DeviceConfig] = {}
        self.learned: dict[str, DeviceConfig] = {}  # addresses seen from MAC-configured devices
        self.macs_learned: list[tuple[str, str]] = []  # (device, mac) not yet announced
        # Whether an address-only device may be known by the MAC its packets came from (the
        # shell's word: that MAC stands for that one address, not for every host behind a
        # MAC-rewriting extender); None: always (analyze)
        self.mac_gate: Callable[[str, str], bool] | None = None
        for device in devices:
            self.add(device)

    def add(self, device: DeviceConfig) -> None:
        self.by_name[device.name] = device
        if device.mac:
            self.by_mac[normalize_mac(device.mac)] = device
        for addr in (device.address, *device.address6):
            if addr:
                self.by_addr[_canon(addr)] = device

    def replace(self, device: DeviceConfig) -> None:
        self.by_name[device.name] = device
        for table in (self.by_mac, self.by_addr, self.learned):
            for key, value in list(table.items()):
                if value.name == device.name:
                    table[key] = device

    def learn_mac(self, name: str, mac: str) -> DeviceConfig:
        """An address-only device's MAC, seen on its IPv4 packets: known by it from now on."""
        device = replace(self.by_name[name], mac=mac)
        self.replace(device)
        self.by_mac[mac] = device
        self.macs_learned.append((name, mac))
        return device

    def upstream(self, pkt: Packet) -> DeviceConfig | None:
        if pkt.src_mac is not None and self.by_mac:
            device = self.by_mac.get(pkt.src_mac)
            if device is not None:
                if pkt.src not in self.learned and len(self.learned) < 4096:
                    self.learned[pkt.src] = device
                return device
        device = self.by_addr.get(pkt.src)
        if device is not None:
            # A device configured by MAC is known only by its MAC: a LAN host that claims its
            # address from another MAC is somebody else (and gets nothing of its windows).
            if device.mac and pkt.src_mac is not None and pkt.src_mac != device.mac:
                return None
            if (device.mac is None and pkt.src_mac is not None and pkt.version == 4
                    and (self.mac_gate is None or self.mac_gate(device.name, pkt.src_mac))):
                device = self.learn_mac(device.name, pkt.src_mac)
            return device
        if pkt.src_mac is None:
            return self.learned.get(pkt.src)  # router-originated paths carry no MAC
        return None

    def find(self, address: str, mac: str | None) -> DeviceConfig | None:
        """The device behind a relayed connection: by MAC (the neighbour table's, when the shell
        knows it), else by address."""
        if mac is not None and self.by_mac:
            device = self.by_mac.get(normalize_mac(mac))
            if device is not None:
                return device
        return self.by_addr.get(address) or self.learned.get(address)

    def downstream(self, pkt: Packet) -> DeviceConfig | None:
        return self.by_addr.get(pkt.dst) or self.learned.get(pkt.dst)


@lru_cache(maxsize=4096)  # per new flow and relayed connection; addresses repeat
def _canon(addr: str) -> str:
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return addr


_HOST_KEEP = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")
# Cleaned names and their categories are memoised per engine: a speaker names the same few hosts
# in every connection (bounded: a flood of made-up names clears the memo).
_MAX_NAMED = 4096


def _clean_host(name: str | None) -> str | None:
    """Names come from the speaker (SNI, DNS) and are attacker-controlled: keep them inert."""
    if not name:
        return None
    cleaned = "".join(ch if ch in _HOST_KEEP else "?" for ch in name[:HOST_MAX].lower())
    return cleaned[:HOST_MAX]


_COUNTER_OF = {Verdict.ACCEPT: "accepted", Verdict.DROP: "dropped", Verdict.REJECT: "rejected",
               Verdict.HOLD: "held"}


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """The slice of the configuration the engine reads (issue 14: the core takes what it needs;
    the rest of GuardConfig is the shell's: sockets, kernel marks, the web page, hooks)."""

    devices: tuple[DeviceConfig, ...]
    hold_timeout_s: float
    max_turn_s: float
    followup_window_s: float
    window_segments: int
    quic: str
    max_held_packets_per_upload: int
    max_held_bytes_per_upload: int
    max_held_packets_total: int
    max_held_bytes_total: int

    @classmethod
    def of(cls, config: GuardConfig | EngineSettings) -> EngineSettings:
        if isinstance(config, EngineSettings):
            return config
        return cls(**{f: getattr(config, f) for f in cls.__slots__})  # type: ignore[arg-type]

    def quic_for(self, device: DeviceConfig) -> str:
        """What a device's QUIC gets: its own setting, else the guard's."""
        return device.quic or self.quic


class Engine:
    """The facade of the core. One instance per guard (or per `analyze` run)."""

    def __init__(
        self,
        config: GuardConfig | EngineSettings,
        rules: RuleSet,
        *,
        windows: Iterable[Window] = (),
        standing: Iterable[StandingRule] = (),
        next_upload_id: int = 1,
        expire_on_idle: bool = False,
        detector: DetectorConfig | None = None,
        id_source: Callable[[], int] | None = None,
        reset_midstream: bool = False,
        forget_closed: bool = False,
        id_block: int | None = None,
    ) -> None:
        self.config = EngineSettings.of(config)
        self.rules = rules
        self.devices = Devices(config.devices)
        self.detector = detector or DetectorConfig(window_segments=config.window_segments)
        self.stream_detector = StreamConfig()
        self._named: dict[str, tuple[str, str]] = {}  # name -> (cleaned, category)
        self._named_rules: RuleSet | None = None  # the rule set those categories came from
        # the daemon forgets a relayed connection's flow once it closed with nothing pending
        # (analyze keeps them all for its report)
        self.forget_closed = forget_closed
        self.streams: dict[int, Flow] = {}  # relayed connections by the relay's id
        self.last_stream: dict[str, float] = {}  # device -> when it last opened a relayed one
        self.names = NameCache()
        self.flows: dict[FlowKey, Flow] = {}
        self.uploads: dict[int, Upload] = {}  # pending or passing: the live ones
        self.windows: list[Window] = list(windows)
        self.standing: list[StandingRule] = list(standing)
        # Upload ids come from the core (UploadIds): the daemon gives the first one (the store's
        # mark + 1) and `id_block`, and makes each block durable (ReserveUploadIds) before the
        # facts that announce its ids. `id_source` (ids from outside, one call per upload) is
        # kept for callers that still pass one; nothing in the guard does.
        self.ids = UploadIds(next_upload_id, id_block)
        self.id_source = id_source
        # live only: connections that predate the guard are reset when quiet (design.md 4)
        self.reset_midstream = reset_midstream
        # analyze: nobody answers, so a held upload expires when its traffic ends, and what
        # follows on its flow is inspected as the speaker's reconnection would be.
        self.expire_on_idle = expire_on_idle
        self.now = float("-inf")
        self.actions: list[Any] = []
        self._take_id_requests()
        self.last_upload: dict[str, tuple[float, int]] = {}  # device -> (end, turn)
        self.held_packets = 0
        self.held_bytes = 0
        self._decided_after = 1
        self._current: Held | None = None
        self._timers: list[tuple[float, int, FlowKey]] = []
        self._timer_seq = 0
        self._lost: dict[tuple[int, str, int, str, int], int] = {}
        self.counters: dict[str, int] = {
            "packets_in": 0, "accepted": 0, "dropped": 0, "rejected": 0, "held": 0,
            "malformed": 0, "not_ours": 0, "duplicates": 0, "bursts_released": 0,
            "flows_blocked": 0, "caps_hit": 0, "dns_answers": 0, "midstream_resets": 0,
            "nudges": 0, "streams": 0, "stream_records": 0,
        }

    # -- time ---------------------------------------------------------------------------------

    def _tick(self, now: float) -> float:
        self.now = max(self.now, now)
        return self.now

    def next_timer(self) -> float | None:
        while self._timers:
            when, _, key = self._timers[0]
            flow = self.flows.get(key)
            if flow is None or flow.deadline is None or flow.deadline != when:
                heapq.heappop(self._timers)
                continue
            return when
        return None

    def _schedule(self, flow: Flow, when: float | None) -> None:
        if when == flow.deadline:
            return
        flow.deadline = when
        if when is not None:
            self._timer_seq += 1
            heapq.heappush(self._timers, (when, self._timer_seq, flow.key))

    def _reschedule(self, flow: Flow) -> None:
        when: float | None = None
        if flow.state is FlowState.PROVISIONAL:
            if flow.evidence is not None:
                when = flow.evidence.deadline(self.now)
        elif flow.state is FlowState.PENDING and flow.upload is not None:
            when = flow.upload.expires
            if self.expire_on_idle:
                idle = flow.last_up + UPLOAD_END_GAP_S
                when = idle if when is None else min(when, idle)
        elif flow.state in _DROPPING_OR_PASSING:
            when = flow.last_up + UPLOAD_END_GAP_S
            upload = flow.upload
            if upload is not None and upload.state is UploadState.FIRST_TURN:
                when = min(when, upload.start + self.config.max_turn_s)
        self._schedule(flow, when)

    def handle_timer(self, now: float) -> None:
        now = self._tick(now)
        while self._timers and self._timers[0][0] <= now:
            when, _, key = heapq.heappop(self._timers)
            flow = self.flows.get(key)
            if flow is None or flow.deadline != when:
                continue
            flow.deadline = None
            # each deadline is handled at its own time: a virtual clock steps through them
            self._on_deadline(flow, when)
            if flow.deadline is None:
                self._reschedule(flow)
            if flow.deadline is not None and flow.deadline <= when:
                # never loop on a deadline that did not move: try again a moment later
                self._schedule(flow, when + 1e-3)

    def _rejudge(self, flow: Flow, now: float) -> None:
        """New evidence about a held run's sender without a new packet of the run (it finished,
        or it retransmitted): judge again now."""
        verdict = self._judge(flow, now)
        if verdict.judgement is Judgement.NUDGE:
            if len(flow.burst) > 1 and flow.device.mode is not Mode.MONITOR:
                self._nudge(flow, now)
            else:
                # nothing held to nudge with (monitor mode lets runs through): quiet is the end
                self._release_burst(flow, now, "quiet")
        elif verdict.judgement is Judgement.MESSAGE:
            self._release_burst(flow, now, verdict.reason)
        elif verdict.judgement is Judgement.AUDIO:
            self._upload_detected(flow, now, verdict.reason)
        else:
            self._reschedule(flow)

    def _judge(self, flow: Flow, now: float) -> Judged:
        """The detector's verdict on the flow's current burst (its evidence judges itself)."""
        if flow.evidence is None:
            return UNDECIDED
        return flow.evidence.judge(now)

    def _new_evidence(self, flow: Flow) -> Burst:
        """A new burst's evidence: whole records for a relayed stream, what a held sender can
        emit for the packet hold."""
        if flow.stream is not None:
            return Burst(stream_config=self.stream_detector)
        return Burst(tcp=flow.key.proto == TCP, config=self.detector)

    def _nudge(self, flow: Flow, now: float) -> None:
        """Release the held run's first segment only: the cloud's ACK of it gives the sender
        room, and whether it then sends new data tells a cut-off upload from a finished
        message (guard/core/detector.py)."""
        first = flow.burst.pop(0)
        self.actions.append(Release((first.token,)))
        self._unhold([first])
        flow.activity_passed += first.payload
        flow.nudged = first
        if flow.evidence is not None:
            flow.evidence.nudged(now)
        self.counters["nudges"] += 1
        self._reschedule(flow)

    def _on_deadline(self, flow: Flow, now: float) -> None:
        if flow.state is FlowState.PROVISIONAL:
            self._rejudge(flow, now)
        elif flow.state is FlowState.PENDING and flow.upload is not None:
            upload = flow.upload
            ended = self.expire_on_idle and now >= flow.last_up + UPLOAD_END_GAP_S
            if ended or upload.expires is not None and now >= upload.expires:
                self._deny(upload, now, Outcome.EXPIRED, "expiry")
            if ended:
                # analyze: the upload's traffic ended (nobody answers a capture); what follows
                # is a new activity, as after a person's answer live, not a denied
                # connection's leftovers
                self._end_activity(flow)
        elif flow.state in _DROPPING_OR_PASSING:
            upload = flow.upload
            if now >= flow.last_up + UPLOAD_END_GAP_S:
                self._end_activity(flow)
            elif (upload is not None and upload.state is UploadState.FIRST_TURN
                  and now >= upload.start + self.config.max_turn_s):
                self._hold_long_turn(flow, upload, now)

    # -- standing decisions ---------------------------------------------------------------------

    def set_windows(self, windows: Iterable[Window]) -> None:
        self.windows = list(windows)

    def set_standing(self, rules: Iterable[StandingRule]) -> None:
        self.standing = list(rules)

    def set_mode(self, device_name: str, mode: Mode) -> None:
        device = self.devices.by_name[device_name]
        updated = device.with_mode(mode)
        self.devices.replace(updated)
        for flow in self.flows.values():
            if flow.device.name == device_name:
                flow.device = updated

    def expect_lost(self, records: Iterable[tuple[int, int, str, int, str, int]]) -> None:
        """Uploads that were pending when the guard stopped: (id, proto, dev, dport, rem, rport).

        Their connections are reset as `lost-on-restart` at their first packet, and nothing of
        them is delivered.
        """
        for upload_id, proto, dev, dport, rem, rport in records:
            self._lost[(proto, _canon(dev), dport, _canon(rem), rport)] = upload_id

    # -- the packet path -----------------------------------------------------------------------

    def receive(self, pkt: Packet | Malformed | None, now: float, token: Any = None) -> Verdict:
        """One packet in; its verdict out (HOLD: the engine keeps `token` for later)."""
        # The hot path (every queued packet): same steps as the helpers it inlines (_tick,
        # _count), without their calls. Time that runs backwards is clamped.
        if now > self.now:
            self.now = now
        else:
            now = self.now
        counters = self.counters
        counters["packets_in"] += 1
        timers = self._timers
        if timers and timers[0][0] <= now:
            self.handle_timer(now)
        if pkt is None or isinstance(pkt, Malformed):
            counters["malformed"] += 1
            # The shell applies the fail mode to what it could not parse; the core says drop.
            counters["dropped"] += 1
            return Verdict.DROP
        if pkt.dns:
            for answer in pkt.dns:
                self.names.learn(answer.address, answer.name, answer.ttl_s, now)
            counters["dns_answers"] += len(pkt.dns)
        devices = self.devices
        device = devices.upstream(pkt)
        if device is not None:
            verdict = self._upstream(pkt, device, now, token)
        else:
            device = devices.downstream(pkt)
            if device is not None:
                verdict = self._downstream(pkt, device, now)
            else:
                counters["not_ours"] += 1
                verdict = Verdict.ACCEPT
        if verdict is Verdict.ACCEPT:
            counters["accepted"] += 1
        elif verdict is Verdict.HOLD:
            counters["held"] += 1
        elif verdict is Verdict.DROP:
            counters["dropped"] += 1
        else:
            counters["rejected"] += 1
        return verdict

    def _count(self, verdict: Verdict) -> Verdict:
        self.counters[_COUNTER_OF[verdict]] += 1
        return verdict

    def _flow(self, key: FlowKey, device: DeviceConfig, now: float, stream: bool = False
              ) -> Flow:
        flow = self.flows.get(key)
        if flow is not None:
            return flow
        if len(self.flows) >= MAX_FLOWS:
            self._evict(now)
        lost = self._lost.pop(key, None)  # a FlowKey is the tuple it was stored under
        # a relayed connection is a new one: nothing of the lost one's bytes is in it
        flow = Flow(key, device, now, now,
                    state=FlowState.LOST if lost is not None and not stream else FlowState.IDLE)
        name = self.names.lookup(key.remote_addr, now)
        if name:
            self._name_flow(flow, name)
        if lost is not None:
            flow.activity_start = now
            self.actions.append(UploadDecided(
                {"id": lost, "device": device.name, "device_addr": key.device_addr,
                 "remote": key.remote, "host": flow.host, "category": flow.category},
                Outcome.LOST, "restart"))
        self.flows[key] = flow
        return flow

    def _named_of(self, name: str) -> tuple[str, str]:
        """(cleaned host, category) of a name, memoised; ("", "") when nothing is left of it."""
        if self._named_rules is not self.rules:  # a reload: categories may have changed
            self._named.clear()
            self._named_rules = self.rules
        named = self._named.get(name)
        if named is None:
            host = _clean_host(name)
            named = (host, self.rules.category_for_host(host).value) if host else ("", "")
            if len(self._named) >= _MAX_NAMED:
                self._named.clear()
            self._named[name] = named
        return named

    def _name_flow(self, flow: Flow, name: str) -> None:
        named = self._named_of(name)
        if named[0]:
            flow.host, flow.category = named
        else:
            flow.host = None

    def _upstream(self, pkt: Packet, device: DeviceConfig, now: float, token: Any) -> Verdict:
        if self.devices.macs_learned:
            device = self._announce_macs(device)
        proto = pkt.proto
        if device.mode is Mode.OFF or (proto != TCP and proto != UDP):
            return Verdict.ACCEPT
        sport, dport = pkt.sport, pkt.dport
        if proto == UDP and (dport in INFRA_UDP_PORTS or sport in INFRA_UDP_PORTS):
            return Verdict.ACCEPT
        # a plain tuple finds the flow (a FlowKey is one); the key is built for a new flow only
        flow = self.flows.get((proto, pkt.src, sport, pkt.dst, dport))
        if flow is None:
            flow = self._flow(FlowKey(proto, pkt.src, sport, pkt.dst, dport), device, now)
        flow.device = device
        flow.last = now
        flow.packets_up += 1
        payload_len = pkt.payload_len
        flow.bytes_up += payload_len
        if proto == TCP:
            flags = pkt.flags
            if flags & SYN and not flags & ACK:
                flow.midstream = False
                flow.syn_seq = pkt.seq
            if flags & ACK:
                flow.device_ack = pkt.ack
            end = (pkt.seq + payload_len) & 0xFFFFFFFF
            device_next = flow.device_next
            # _seq_after(end, device_next), inlined
            if device_next is None or (
                    ((end - device_next) & 0xFFFFFFFF) < 0x80000000 and end != device_next):
                flow.device_next = end
        if flow.state in _DECIDED:
            return self._decided(flow, pkt, now, token)
        if payload_len:
            # _learn_name only acts on a hello, or on a flow whose hello it is still assembling;
            # once the name is known, SNI work ends
            sni = flow.sni
            if (not sni.done) if sni is not None else (
                    pkt.hint is Hint.TLS_HELLO or pkt.hint is Hint.QUIC_INITIAL):
                self._learn_name(flow, pkt)
        if proto == UDP:
            if pkt.hint in REALTIME_HINTS:
                flow.category = "messaging"
                flow.host = flow.host or None
            if self.config.quic_for(device) == "block" and dport == 443:
                return self._block(flow, now, "quic blocked for this device")
        action = device.category_action(flow.category)
        if action is CategoryAction.BLOCK:
            return self._block(flow, now, f"{flow.category} is blocked")
        if action is CategoryAction.ALLOW and flow.state is FlowState.IDLE:
            if payload_len:  # this packet names it: fast-pathed from now on
                flow.move(FlowEvent.CATEGORY_ALLOWED)
                self.actions.append(MarkFlow(flow.key, "allow"))
            else:
                flow.move(FlowEvent.NAME_ALLOWED)
            return Verdict.ACCEPT
        if not payload_len:
            if (proto == TCP and pkt.flags & FIN and flow.state is FlowState.PROVISIONAL
                    and flow.evidence is not None):
                flow.evidence.ended()  # the sender closed: the held run is all it had
                self._rejudge(flow, now)
            if (self.reset_midstream and flow.midstream and proto == TCP
                    and flow.host is None and flow.state is FlowState.IDLE
                    and not pkt.flags & (SYN | RST | FIN) and pkt.flags & ACK
                    and device.mode in (Mode.STRICT, Mode.FOLLOWUPS)):
                return self._reset_midstream(flow, pkt, now)
            if (proto == TCP and not flow.control_marked and not flow.midstream
                    and flow.state is FlowState.IDLE
                    and pkt.flags & (ACK | SYN | FIN | RST) == ACK):
                # Seen from its SYN: the kernel may pass this connection's pure ACKs (a download's
                # return path) without asking; payload still comes here. A reset after a deny
                # does not need them: the connection is marked blocked then, and the kernel
                # answers either end's next packet with an exact reset.
                flow.control_marked = True
                self.actions.append(MarkFlow(flow.key, "control"))
            return Verdict.ACCEPT  # pure ACK, FIN, RST: never held
        if proto == TCP and pkt.flags & RST:
            return Verdict.ACCEPT
        if _is_handshake(pkt):
            return Verdict.ACCEPT  # a TLS/QUIC handshake carries no audio, and names the flow
        return self._payload(flow, pkt, now, token)

    def _decided(self, flow: Flow, pkt: Packet, now: float, token: Any) -> Verdict:
        """An upstream packet of a flow decided for its lifetime, or lost across a restart."""
        state = flow.state
        if state is FlowState.LOST or state is FlowState.LOST_RESET:
            return self._lost_packet(flow, pkt, now)
        if state is FlowState.BLOCKED:
            return Verdict.REJECT
        if state is FlowState.ALLOWED or not pkt.payload_len:
            return Verdict.ACCEPT
        # ALLOWED_UNCONFIRMED: the first payload of a flow allowed by its DNS name names it for
        # sure (SNI): the name may have been wrong, or a lie. Only now is it fast-pathed.
        self._learn_name(flow, pkt)
        action = flow.device.category_action(flow.category)
        if action is CategoryAction.BLOCK:
            return self._block(flow, now, f"{flow.category} is blocked")
        if action is CategoryAction.ALLOW:
            flow.move(FlowEvent.CONFIRMED)
            self.actions.append(MarkFlow(flow.key, "allow"))
            return Verdict.ACCEPT
        flow.move(FlowEvent.INSPECT)  # an inspected category after all: watch it
        if _is_handshake(pkt):
            return Verdict.ACCEPT
        return self._payload(flow, pkt, now, token)

    # -- the stream path (TCP terminated by the router's kernel, relayed by the shell) ---------

    def stream_syn(self, device_addr: str, device_mac: str | None, remote_addr: str,
                   now: float) -> bool:
        """Should the relay connect upstream before answering a device's SYN (design.md 5a.3)?
        False when no guarded device sent it, or when the destination's DNS-learned name is in a
        category the device blocks: the SYN is then answered without any upstream connect and
        `stream_open` refuses the connection, so the cloud sees not even a handshake. A name
        that only the ClientHello gives is judged by `stream_open`, after the handshake."""
        device = self.devices.find(_canon(device_addr), device_mac)
        if device is None:
            return False
        if device.mode is Mode.OFF:
            return True
        name = self.names.lookup(_canon(remote_addr), now)
        if not name:
            return True
        host, category = self._named_of(name)
        return not host or device.category_action(category) is not CategoryAction.BLOCK

    def stream_open(self, conn: int, device_addr: str, device_port: int, remote_addr: str,
                    remote_port: int, device_mac: str | None, host: str | None, now: float
                    ) -> tuple[Verdict, FlowKey]:
        """A new relayed connection of a device, named by its ClientHello's SNI (`host`) when it
        has one. ACCEPT: relay it at once, both ways; REJECT: refuse it (a blocked category, or
        no guarded device sent it) before any byte leaves; HOLD: inspect its upstream, fed
        record by record to `stream_data` (downstream is always relayed at once)."""
        now = self._tick(now)
        key = FlowKey(TCP, device_addr, device_port, remote_addr, remote_port)
        device = self.devices.find(key.device_addr, device_mac)
        if device is None:
            self.counters["not_ours"] += 1
            return Verdict.REJECT, key
        old = self.flows.pop(key, None)  # a reused port: the old connection is gone
        if old is not None and old.stream is not None:
            self.streams.pop(old.stream, None)
        flow = self._flow(key, device, now, stream=True)
        flow.midstream = False
        flow.stream = conn
        self.last_stream[device.name] = now
        self.streams[conn] = flow
        self.counters["streams"] += 1
        if host:
            self._name_flow(flow, host)
        if device.mode is Mode.OFF:
            return Verdict.ACCEPT, key
        action = device.category_action(flow.category)
        if action is CategoryAction.BLOCK:
            return self._block(flow, now, f"{flow.category} is blocked"), key
        if action is CategoryAction.ALLOW:
            flow.move(FlowEvent.CATEGORY_ALLOWED)
            return Verdict.ACCEPT, key
        return Verdict.HOLD, key

    def stream_data(self, conn: int, end: int, size: int, content_type: int, now: float
                    ) -> Verdict:
        """One whole upstream record of a relayed connection (a TLS record of `size` bytes
        ending at stream offset `end`, or a read when the stream is not TLS: content_type 0).
        ACCEPT: every kept byte up to `end` may go; HOLD: keep it; DROP: discard the kept bytes
        up to `end`; REJECT: abort the connection."""
        if now > self.now:
            self.now = now
        else:
            now = self.now
        if self._timers and self._timers[0][0] <= now:
            self.handle_timer(now)
        flow = self.streams.get(conn)
        if flow is None:
            return Verdict.REJECT
        self.counters["stream_records"] += 1
        flow.last = now
        flow.packets_up += 1
        flow.bytes_up += size
        state = flow.state
        if state is FlowState.BLOCKED:
            return Verdict.REJECT
        if state is FlowState.ALLOWED or flow.device.mode is Mode.OFF:
            return Verdict.ACCEPT
        if state is FlowState.IDLE and (content_type in _TLS_HANDSHAKE_TYPES
                                        or size <= self.stream_detector.control_record_bytes):
            # The handshake carries no audio, and a control record alone can carry none: they
            # pass when nothing is held before them (never ahead of held bytes: no reordering).
            return Verdict.ACCEPT
        pkt = Packet(4 if "." in flow.key.device_addr else 6, flow.key.device_addr,
                     flow.key.remote_addr, TCP, flow.key.device_port, flow.key.remote_port,
                     size, size, flags=ACK, seq=(end - size) & 0xFFFFFFFF)
        return self._payload(flow, pkt, now, StreamBytes(conn, end))

    def stream_down(self, conn: int, nbytes: int, now: float) -> None:
        """Bytes the relay passed from the remote to the device (counted only)."""
        flow = self.streams.get(conn)
        if flow is not None:
            flow.packets_down += 1
            flow.bytes_down += nbytes
            flow.last = max(flow.last, now)

    def stream_closed(self, conn: int, now: float, reset: bool = False) -> None:
        """The device closed its side (`reset`: either leg was reset, or failed). A held burst
        is judged with nothing more to come; a pending upload whose connection was reset can
        deliver nothing any more: it is recorded lost."""
        now = self._tick(now)
        flow = self.streams.pop(conn, None)
        if flow is None:
            return
        if flow.evidence is not None:
            flow.evidence.ended()
        if flow.state is FlowState.PROVISIONAL:
            if reset:
                self._discard_burst(flow)
            else:
                self._rejudge(flow, now)
        elif flow.state is FlowState.PENDING and flow.upload is not None and reset:
            self._deny(flow.upload, now, Outcome.LOST, "connection reset")
        if (self.forget_closed and flow.state in (FlowState.IDLE, FlowState.ALLOWED,
                                                  FlowState.BLOCKED)
                and self.flows.get(flow.key) is flow):
            del self.flows[flow.key]

    def _discard_burst(self, flow: Flow) -> None:
        """A held burst whose connection died: nothing of it can be delivered."""
        if flow.burst:
            self.actions.append(Discard(tuple(h.token for h in flow.burst)))
            self._unhold(flow.burst)
        flow.burst, flow.evidence = [], None
        flow.move(FlowEvent.BURST_DISCARDED)
        self._schedule(flow, None)

    def learn_mac(self, name: str, mac: str) -> None:
        """The shell found an address-only device's MAC (the neighbour table): known by it."""
        updated = self.devices.learn_mac(name, mac)
        self.devices.macs_learned.remove((name, mac))
        for flow in self.flows.values():
            if flow.device.name == name:
                flow.device = updated

    def _announce_macs(self, device: DeviceConfig) -> DeviceConfig:
        for name, mac in self.devices.macs_learned:
            updated = self.devices.by_name[name]
            for flow in self.flows.values():
                if flow.device.name == name:
                    flow.device = updated
            self.actions.append(MacLearned(name, mac))
        self.devices.macs_learned.clear()
        return self.devices.by_name.get(device.name, device)

    def _learn_name(self, flow: Flow, pkt: Packet) -> None:
        if flow.sni is not None and flow.sni.done:
            return
        if pkt.hint is Hint.TLS_HELLO or (flow.sni is not None and pkt.proto == TCP):
            if flow.sni is None:
                flow.sni = SniAssembler()
                if flow.syn_seq is not None:
                    flow.sni.syn(flow.syn_seq)
            name = flow.sni.feed_tcp(pkt.seq, pkt.payload, pkt.payload_len)
        elif pkt.hint is Hint.QUIC_INITIAL:
            flow.sni = flow.sni or SniAssembler()
            name = flow.sni.feed_quic(pkt.payload)
        else:
            return
        if name:
            self._name_flow(flow, name)

    def _downstream(self, pkt: Packet, device: DeviceConfig, now: float) -> Verdict:
        proto = pkt.proto
        if device.mode is Mode.OFF or (proto != TCP and proto != UDP):
            return Verdict.ACCEPT
        sport, dport = pkt.sport, pkt.dport
        if proto == UDP and (sport in INFRA_UDP_PORTS or dport in INFRA_UDP_PORTS):
            return Verdict.ACCEPT
        flow = self.flows.get((proto, pkt.dst, dport, pkt.src, sport))
        if flow is None:
            flow = self._flow(FlowKey(proto, pkt.dst, dport, pkt.src, sport), device, now)
        flow.last = now
        flow.packets_down += 1
        flow.bytes_down += pkt.payload_len
        if proto == TCP and pkt.flags & ACK:
            flow.remote_ack = pkt.ack
            evidence = flow.evidence
            if flow.state is FlowState.PROVISIONAL and flow.burst and evidence is not None:
                # Only in a capture (held bytes never reach the remote live): the remote has
                # the whole run and the sender sent nothing after it, as a tail probe says.
                last = flow.burst[-1]
                if (not evidence.finished
                        and not _seq_after((last.seq + last.payload) & 0xFFFFFFFF, pkt.ack)):
                    evidence.ended()
                    self._rejudge(flow, now)
        if flow.state is FlowState.BLOCKED:
            return Verdict.REJECT
        if proto == UDP and pkt.hint in REALTIME_HINTS:
            flow.category = "messaging"
            if device.category_action("messaging") is CategoryAction.BLOCK:
                return self._block(flow, now, "real-time media")
        return Verdict.ACCEPT  # downstream packets are never held

    def _block(self, flow: Flow, now: float, reason: str) -> Verdict:
        if flow.state is FlowState.BLOCKED:
            return Verdict.REJECT
        if flow.burst:
            self.actions.append(Discard(tuple(h.token for h in flow.burst)))
            self._unhold(flow.burst)
            flow.burst = []
        flow.evidence = None
        if flow.state is FlowState.PENDING and flow.upload is not None:
            self._deny(flow.upload, now, Outcome.DENIED, "policy")
        flow.move(FlowEvent.BLOCKED)
        self.counters["flows_blocked"] += 1
        if flow.stream is None:  # a relayed connection is refused by the relay itself
            self.actions.append(MarkFlow(flow.key, "block"))
        self.actions.append(FlowBlocked(flow.key, flow.device.name, flow.host, flow.category,
                                        reason))
        self._schedule(flow, None)
        return Verdict.REJECT

    def _reset_midstream(self, flow: Flow, pkt: Packet, now: float) -> Verdict:
        """A connection that predates the guard, quiet now: reset it with the exact numbers of
        this packet, so the speaker reconnects through the guard and names the host (SNI)."""
        flow.midstream = False
        flow.move(FlowEvent.MIDSTREAM_RESET)
        flow.last_up = now
        # The remote expects SND.NXT. A pure ACK carries it, a keepalive probe (what a quiet
        # connection sends) carries SND.NXT - 1 and the two look alike: the probe's number + 1
        # first (exact for a probe, in-window for an ACK, whose remote then sends a challenge
        # ACK that the reset device answers exactly), then the packet's own number.
        self.actions.append(Reset(flow.key, pkt.ack, (pkt.seq + 1) & 0xFFFFFFFF, "midstream",
                                  also_to_remote=pkt.seq))
        self.counters["midstream_resets"] += 1
        self._reschedule(flow)
        return Verdict.DROP

    def _lost_packet(self, flow: Flow, pkt: Packet, now: float) -> Verdict:
        """The first packet of an upload that was pending across a restart: reset, deliver
        nothing of it; later packets of the flow (until it goes quiet) are dropped too."""
        if flow.state is FlowState.LOST:
            flow.move(FlowEvent.LOST_RESET)
            self._reset(flow, "lost-on-restart")
        if pkt.payload_len:
            flow.last_up = now
        self._reschedule(flow)
        return Verdict.DROP

    # -- bursts and uploads ----------------------------------------------------------------------

    def _payload(self, flow: Flow, pkt: Packet, now: float, token: Any) -> Verdict:
        """An upstream payload packet (or a relayed record) of an inspected flow: what the
        flow's state does with it."""
        state = flow.state
        if (flow.control_run and pkt.payload_len < self.detector.min_mean_datagram_bytes
                and state is not FlowState.DENIED):
            return self._control_datagram(flow, pkt)
        if state in (FlowState.PASSING, FlowState.DENIED) and now - flow.last_up >= UPLOAD_END_GAP_S:
            self._end_activity(flow)
            state = flow.state
        if now - flow.last_up >= UPLOAD_END_GAP_S or flow.activity_packets == 0:
            flow.activity_start = now
            flow.activity_bytes = 0
            flow.activity_packets = 0
            flow.activity_passed = 0
        flow.last_up = now
        flow.activity_bytes += pkt.payload_len
        flow.activity_packets += 1
        if state is FlowState.DENIED:
            if flow.upload is not None:
                self._count_into(flow.upload, pkt, now)
            self._reschedule(flow)
            return Verdict.DROP
        if state is FlowState.PASSING:
            upload = flow.upload
            if upload is not None:
                self._count_into(upload, pkt, now)
                if (upload.state is UploadState.FIRST_TURN
                        and now - upload.start >= self.config.max_turn_s):
                    self._hold_long_turn(flow, upload, now)
                    return self._hold_into(flow, upload, pkt, now, token)
            flow.activity_passed += pkt.payload_len
            self._reschedule(flow)
            return Verdict.ACCEPT
        if state is FlowState.PENDING:
            upload = flow.upload
            assert upload is not None
            self._count_into(upload, pkt, now)
            verdict = self._hold_into(flow, upload, pkt, now, token)
            self._reschedule(flow)
            return verdict
        return self._burst_payload(flow, pkt, now, token)  # IDLE or PROVISIONAL

    def _control_datagram(self, flow: Flow, pkt: Packet) -> Verdict:
        """The flow was judged from a window of control datagrams; each later datagram is
        judged alone: one too small for a codec frame passes (live, the kernel passes it by
        connmark and it never gets here), a bigger one goes through the detector."""
        if not flow.control_marked:
            flow.control_marked = True
            self.actions.append(MarkFlow(flow.key, "control"))
        flow.activity_passed += pkt.payload_len
        return Verdict.ACCEPT

    def _burst_payload(self, flow: Flow, pkt: Packet, now: float, token: Any) -> Verdict:
        """IDLE or PROVISIONAL: the packet joins the held burst, whose evidence judges it."""
        if flow.state is FlowState.IDLE:
            flow.move(FlowEvent.BURST_STARTED)
            flow.burst = []
            flow.evidence = self._new_evidence(flow)
            flow.nudged = None
        evidence = flow.evidence
        assert evidence is not None
        held = Held(token, pkt.wire_len, pkt.payload_len, pkt.seq, now)
        nudged = flow.nudged
        if (nudged is not None and pkt.proto == TCP
                and ((pkt.seq - nudged.seq) & 0xFFFFFFFF) + pkt.payload_len <= nudged.payload):
            # the nudged segment again (the sender's timer fired before the cloud's ACK came
            # back): it is out already
            self.counters["duplicates"] += 1
            self._reschedule(flow)
            return Verdict.DROP
        if pkt.proto == TCP and flow.burst and _within_held(flow.burst, pkt.seq,
                                                            pkt.payload_len):
            return self._held_again(flow, evidence, pkt, held, now)
        full = self._total_cap(held.size, _packets(held)) is not None
        flow.burst.append(held)
        evidence.record(now, pkt.payload_len)
        self._hold(held)
        monitor = flow.device.mode is Mode.MONITOR
        if full and not monitor:
            # No room in total for this packet. The caps bound memory, so they count held
            # bursts too; and a burst cut short here could not be told from a message, so it
            # is never released on that guess: it is an upload at its cap, denied (fail-closed)
            verdict = NO_ROOM
        else:
            verdict = evidence.judge(now)
        if verdict.judgement is Judgement.MESSAGE:
            self._release_burst(flow, now, verdict.reason, current=held)
            return Verdict.ACCEPT
        if verdict.judgement is Judgement.AUDIO:
            try:
                self._upload_detected(flow, now, verdict.reason, current=held)
            finally:
                self._current = None
            return Verdict.HOLD if flow.state is FlowState.PENDING else (
                Verdict.DROP if flow.state in (FlowState.DENIED, FlowState.BLOCKED)
                else Verdict.ACCEPT)
        if monitor:
            # monitor mode holds nothing: the detector still watches the run it let through
            self._unhold([held])
            flow.burst.pop()
            flow.activity_passed += pkt.payload_len
            self._reschedule(flow)
            return Verdict.ACCEPT
        self._reschedule(flow)
        return Verdict.HOLD

    def _held_again(self, flow: Flow, evidence: Burst, pkt: Packet, held: Held, now: float
                    ) -> Verdict:
        """A retransmission of held bytes (also several held segments collapsed into one, as
        an RTO retransmission does): one copy is enough. It tells the detector the sender is
        stalled by the hold: whatever quiet follows is ours, not its end. A retransmission of
        the last held segment alone is a tail-loss probe: the sender had nothing new to send
        instead, so it finished."""
        burst = flow.burst
        last = burst[-1]
        if (pkt.seq != burst[0].seq
                and (pkt.seq + pkt.payload_len) & 0xFFFFFFFF
                == (last.seq + last.payload) & 0xFFFFFFFF):
            evidence.tail_probe()
            if (not (len(burst) > 1 and burst[-2].seq == last.seq)
                    and self._total_cap(held.size) is None):
                # Kept (one copy) and released after the original: the remote acknowledges it
                # as a duplicate (a D-SACK), which ends the sender's probe episode. Dropped,
                # the episode would stay open and the sender would not probe its next burst
                # (Linux allows one outstanding probe).
                burst.append(held)
                self._hold(held)
                verdict = evidence.judge(now)
                if verdict.judgement is Judgement.MESSAGE:
                    self._release_burst(flow, now, verdict.reason, current=held)
                    return Verdict.ACCEPT
                self._reschedule(flow)
                return Verdict.HOLD
        else:
            evidence.retransmitted()
        self.counters["duplicates"] += 1
        self._rejudge(flow, now)
        return Verdict.DROP

    def _total_cap(self, size: int, count: int = 1) -> str | None:
        """Which cap in total holding `count` more packets of `size` bytes would pass, if any."""
        if self.held_packets + count > self.config.max_held_packets_total:
            return "packets in total"
        if self.held_bytes + size > self.config.max_held_bytes_total:
            return "bytes in total"
        return None

    def _hold(self, held: Held) -> None:
        self.held_packets += _packets(held)
        self.held_bytes += held.size

    def _unhold(self, held: Iterable[Held]) -> None:
        for item in held:
            self.held_packets -= _packets(item)
            self.held_bytes -= item.size

    def _release_burst(self, flow: Flow, now: float, reason: str, current: Held | None = None
                       ) -> None:
        """Not audio: release the held burst in order; `current` gets ACCEPT from the caller."""
        burst = flow.burst
        tokens = tuple(h.token for h in burst if h is not current)
        if tokens:
            self.actions.append(Release(tokens))
        self._unhold(burst)
        run = flow.evidence.records if flow.evidence is not None else ()
        start = run[0][0] if run else now
        # What the burst suffered: a relayed stream's message waits from its last byte (the
        # sender is ACKed and never waits; design.md 5: released <= 0.3 s after its last
        # byte); a held packet burst's sender waits from its first packet.
        since = run[-1][0] if run and flow.stream is not None else start
        # a kept tail probe follows its original: its bytes are not counted twice; a nudged
        # first segment went out earlier
        size = sum(h.payload for i, h in enumerate(burst) if not i or burst[i - 1].seq != h.seq)
        packets = len(burst)
        if flow.nudged is not None:
            size += flow.nudged.payload
            packets += 1
            flow.activity_passed -= flow.nudged.payload  # counted again below, with the rest
            flow.nudged = None
        flow.activity_passed += sum(size for _, size in run) if flow.device.mode is Mode.MONITOR else size
        if packets:
            self.counters["bursts_released"] += 1
            self.actions.append(BurstReleased(
                flow.key, flow.device.name, flow.host, start, now, now - since, size,
                packets, reason))
        flow.burst = []
        flow.evidence = None
        if reason == CONTROL_DATAGRAMS and flow.key.proto != TCP:
            # The mark goes with the flow's next small datagram, not with this one: the held
            # datagrams released just now may still be confirming the connection in conntrack,
            # and a mark saved on this packet's own unconfirmed entry would be lost in the clash.
            flow.control_run = True
        flow.move(FlowEvent.BURST_RELEASED)
        self._schedule(flow, None)

    @property
    def next_upload_id(self) -> int:
        return self.ids.next

    def _take_id_requests(self) -> None:
        if self.ids.requests:
            self.actions.extend(self.ids.requests)
            self.ids.requests.clear()

    def _new_upload(self, flow: Flow, now: float, action: UploadAction, reason: str,
                    state: UploadState = UploadState.PENDING) -> Upload:
        device = flow.device
        previous = self.last_upload.get(device.name)
        turn = 1
        if previous is not None and flow.activity_start - previous[0] <= self.config.followup_window_s:
            turn = previous[1] + 1
        if self.id_source is not None:
            upload_id = self.id_source()
            self.ids.at_least(upload_id + 1)
        else:
            upload_id = self.ids.take()
        self._take_id_requests()  # durable before the fact that announces the id (after this)
        upload = Upload(
            id=upload_id, device=device.name, device_addr=flow.key.device_addr,
            key=flow.key, host=flow.host, category=flow.category, start=flow.activity_start,
            end=now, decided=now, decided_after_packets=self._decided_after, action=action,
            turn=turn, bytes=flow.activity_bytes, packets=flow.activity_packets,
            leaked_bytes=flow.activity_passed, reason=reason, stream=flow.stream is not None,
            state=state,
        )
        self.uploads[upload.id] = upload
        self.last_upload[device.name] = (now, turn)
        return upload

    def _upload_detected(self, flow: Flow, now: float, reason: str, current: Held | None = None
                         ) -> None:
        device = flow.device
        burst, flow.burst = flow.burst, []
        flow.nudged = None  # a nudged segment is out: counted as passed
        self._decided_after = (flow.evidence.count if flow.evidence is not None else 0) or 1
        # the packet being judged gets its verdict from the caller, never also from an action
        self._current = current
        flow.evidence = None
        if device.mode is Mode.MONITOR:
            upload = self._new_upload(flow, now, UploadAction.MONITOR, reason,
                                      UploadState.MONITORED)
            upload.leaked_bytes = 0
            upload.outcome = Outcome.MONITORED
            self._pass_burst(flow, burst, current, upload)
            self.actions.append(UploadSeen(upload.summary()))
            return
        standing = standing_decision(device.name, flow.host, flow.category, now,
                                     tuple(self.windows), tuple(self.standing))
        followup_free = False
        if device.mode is Mode.FOLLOWUPS:
            previous = self.last_upload.get(device.name)
            followup_free = previous is None or (
                flow.activity_start - previous[0] > self.config.followup_window_s)
        if standing is not None and standing[1] is Verb.DENY:
            upload = self._new_upload(flow, now, UploadAction.BLOCK, reason)
            self._hold_list(upload, burst)
            flow.upload = upload
            flow.move(FlowEvent.UPLOAD_HELD)
            self._deny(upload, now, standing[0], "quiet window" if standing[0] is Outcome.QUIET
                       else "rule")
            return
        if standing is not None or followup_free:
            upload = self._new_upload(
                flow, now, UploadAction.PASS, reason,
                UploadState.PASSING if standing is not None else UploadState.FIRST_TURN)
            if standing is not None:
                upload.outcome, upload.decided_by = standing[0], standing[0].value
            else:
                # the mode is the standing rule that lets a first turn through
                upload.outcome, upload.decided_by = Outcome.RULE, "followups"
            upload.decision_time = now
            self._pass_burst(flow, burst, current, upload)
            self.actions.append(UploadSeen(upload.summary()))
            return
        upload = self._new_upload(flow, now, UploadAction.HOLD, reason)
        upload.expires = now + self.config.hold_timeout_s
        self._hold_list(upload, burst)
        flow.upload = upload
        flow.move(FlowEvent.UPLOAD_HELD)
        self._check_caps(upload, now)
        if upload.state is UploadState.PENDING:
            self.actions.append(UploadHeld(upload.summary()))
        self._reschedule(flow)

    def _hold_list(self, upload: Upload, burst: list[Held]) -> None:
        upload.held = list(burst)
        upload.held_bytes = sum(h.size for h in burst)
        upload.seqs = {(h.seq, h.payload) for h in burst}

    def _pass_burst(self, flow: Flow, burst: list[Held], current: Held | None, upload: Upload
                    ) -> None:
        tokens = tuple(h.token for h in burst if h is not current)
        if tokens:
            self.actions.append(Release(tokens, upload.id))
        self._unhold(burst)
        flow.upload = upload
        flow.move(FlowEvent.UPLOAD_PASSED)
        self._reschedule(flow)

    def _count_into(self, upload: Upload, pkt: Packet, now: float) -> None:
        upload.bytes += pkt.payload_len
        upload.packets += 1
        upload.end = max(upload.end, now)
        previous = self.last_upload.get(upload.device)
        if previous is not None and previous[1] == upload.turn:
            self.last_upload[upload.device] = (max(previous[0], now), upload.turn)

    def _hold_into(self, flow: Flow, upload: Upload, pkt: Packet, now: float, token: Any
                   ) -> Verdict:
        if pkt.proto == TCP and (pkt.seq, pkt.payload_len) in upload.seqs:
            self.counters["duplicates"] += 1
            return Verdict.DROP  # retransmission of a held segment: memory grows with unique bytes
        held = Held(token, pkt.wire_len, pkt.payload_len, pkt.seq, now)
        if self._check_caps(upload, now, extra=held):
            return Verdict.DROP  # the upload was denied at its cap; this packet goes with it
        upload.held.append(held)
        upload.held_bytes += held.size
        upload.seqs.add((pkt.seq, pkt.payload_len))
        self._hold(held)
        return Verdict.HOLD

    def _check_caps(self, upload: Upload, now: float, extra: Held | None = None) -> bool:
        """Deny the upload (fail-closed) when holding `extra` too would pass a cap."""
        cfg = self.config
        count, size = (_packets(extra), extra.size) if extra is not None else (0, 0)
        if not upload.stream and len(upload.held) + count > cfg.max_held_packets_per_upload:
            which = "packets per upload"
        elif upload.held_bytes + size > cfg.max_held_bytes_per_upload:
            which = "bytes per upload"
        else:
            which = self._total_cap(size, count)
        if which is None:
            return False
        self.counters["caps_hit"] += 1
        self.actions.append(HeldCapHit(upload.id, which))
        self._deny(upload, now, Outcome.CAPPED, "cap")
        return True

    def _hold_long_turn(self, flow: Flow, upload: Upload, now: float) -> None:
        """followups: a single upload longer than max_turn_s is held from that point on."""
        upload.move(UploadEvent.LONG_TURN)
        upload.action = UploadAction.HOLD
        upload.outcome = None
        upload.decided_by = None
        upload.leaked_bytes = upload.bytes
        upload.expires = now + self.config.hold_timeout_s
        upload.held = []
        upload.held_bytes = 0
        upload.seqs = set()
        upload.decided = now
        flow.move(FlowEvent.UPLOAD_HELD)
        self.actions.append(UploadHeld(upload.summary()))
        self._reschedule(flow)

    # -- decisions ----------------------------------------------------------------------------

    def pending(self) -> list[Upload]:
        return [u for u in self.uploads.values() if u.state is UploadState.PENDING]

    def decide(self, upload_id: int, decision: Decision, now: float,
               standing: Window | StandingRule | None = None) -> Upload:
        """A person's (or a hook's) decision about a pending upload. What its scope leaves
        behind is `policy.standing_for`'s, or `standing` when the caller worked it out (and
        stored it, with its id) already."""
        now = self._tick(now)
        upload = self.uploads.get(upload_id)
        if upload is None or upload.state is not UploadState.PENDING:
            raise UnknownUpload(upload_id)
        if standing is None:
            standing = standing_for(decision, upload.device, upload.host, upload.category, now)
        if isinstance(standing, Window):
            self.windows = [w for w in self.windows if not supersedes(standing, w)]
            self.windows.append(standing)
        elif isinstance(standing, StandingRule):
            self.standing.append(standing)
        if decision.verb is Verb.ALLOW:
            self._allow(upload, now, Outcome.APPROVED, decision.by)
        else:
            self._deny(upload, now, Outcome.DENIED, decision.by)
        return upload

    def _allow(self, upload: Upload, now: float, outcome: Outcome, by: str) -> None:
        upload.move(UploadEvent.ALLOWED)
        upload.outcome, upload.decided_by, upload.decision_time = outcome, by, now
        tokens = tuple(h.token for h in upload.held)
        if tokens:
            self.actions.append(Release(tokens, upload.id))
        self._unhold(upload.held)
        upload.held = []
        upload.held_bytes = 0
        flow = self.flows.get(upload.key)
        if flow is not None and flow.upload is upload:
            flow.move(FlowEvent.UPLOAD_PASSED)
            flow.last_up = max(flow.last_up, now)  # the sender resumes now: the upload goes on
            self._reschedule(flow)
        self.actions.append(UploadDecided(upload.summary(), outcome, by))

    def _deny(self, upload: Upload, now: float, outcome: Outcome, by: str) -> None:
        upload.move(UploadEvent.DENIED)
        upload.outcome, upload.decided_by, upload.decision_time = outcome, by, now
        # The remote has everything before the first held byte and nothing after it: that is
        # exactly the sequence number its side of the connection will accept a reset at.
        first_held = upload.held[0].seq if upload.held else None
        tokens = tuple(h.token for h in upload.held if h is not self._current)
        if tokens:
            self.actions.append(Discard(tokens, upload.id, reject_last=upload.key.proto != TCP))
        self._unhold(upload.held)
        upload.held = []
        upload.held_bytes = 0
        flow = self.flows.get(upload.key)
        if flow is not None and flow.upload is upload:
            flow.move(FlowEvent.UPLOAD_DENIED)
            flow.last_up = max(flow.last_up, now)  # drop the dead connection's leftovers
            self._reset(flow, outcome.value, first_held)
            self._reschedule(flow)
        self.actions.append(UploadDecided(upload.summary(), outcome, by))

    def _reset(self, flow: Flow, reason: str, seq_to_remote: int | None = None) -> None:
        if flow.key.proto == TCP:
            if seq_to_remote is None:
                # nothing held: the remote expects the device's next byte (downstream packets,
                # and so the remote's own ACKs, are usually not queued to userspace)
                seq_to_remote = flow.remote_ack if flow.remote_ack is not None else flow.device_next
            self.actions.append(Reset(flow.key, flow.device_ack, seq_to_remote, reason))
            if flow.stream is None:
                # and the kernel resets whatever either end sends next, with its exact numbers
                # (a relayed connection's two sockets are aborted by the relay: nothing follows)
                self.actions.append(MarkFlow(flow.key, "block", direct=True))
        else:
            self.actions.append(Unreachable(flow.key, reason))

    def _end_activity(self, flow: Flow) -> None:
        upload = flow.upload
        if upload is not None:
            if upload.state in (UploadState.PASSING, UploadState.FIRST_TURN, UploadState.MONITORED,
                                UploadState.DENIED):
                upload.move(UploadEvent.ENDED)
                self.uploads.pop(upload.id, None)
                self.actions.append(UploadEnded(upload.summary()))
            flow.upload = None
        if flow.state in _DROPPING_OR_PASSING:
            flow.move(FlowEvent.ACTIVITY_ENDED)
        self._schedule(flow, None)

    # -- housekeeping ---------------------------------------------------------------------------

    def expire_flows(self, now: float) -> int:
        """Forget idle flows that hold nothing. Call now and then (the daemon does, each minute)."""
        now = self._tick(now)
        self.names.expire(now)
        self.windows = [w for w in self.windows if w.active(now)]
        stale = [
            key for key, flow in self.flows.items()
            if flow.state in _FORGETTABLE
            and now - flow.last >= (TCP_IDLE_S if key.proto == TCP else UDP_IDLE_S)
        ]
        for key in stale:
            del self.flows[key]
        return len(stale)

    def _evict(self, now: float) -> None:
        self.expire_flows(now)
        if len(self.flows) < MAX_FLOWS:
            return
        idle = sorted((f.last, k) for k, f in self.flows.items()
                      if f.state in _FORGETTABLE)
        for _, key in idle[: max(1, len(idle) // 8)]:
            del self.flows[key]

    def take_actions(self) -> list[Any]:
        actions, self.actions = self.actions, []
        return actions

    def iter_flows(self) -> Iterator[Flow]:
        return iter(self.flows.values())

    def held(self) -> tuple[int, int]:
        return self.held_packets, self.held_bytes

    # -- typed queries and settings for the shell (it reads no attribute of the engine) ---------

    def upload(self, upload_id: int) -> Upload | None:
        return self.uploads.get(upload_id)

    def flow(self, key: FlowKey) -> Flow | None:
        return self.flows.get(key)

    def device(self, name: str) -> DeviceConfig | None:
        return self.devices.by_name.get(name)

    def device_list(self) -> list[DeviceConfig]:
        return list(self.devices.by_name.values())

    def find_device(self, address: str, mac: str | None) -> DeviceConfig | None:
        """The device behind a relayed connection or a queued SYN (by MAC, else address)."""
        return self.devices.find(address, mac)

    def has_actions(self) -> bool:
        return bool(self.actions)

    def counter_values(self) -> dict[str, int]:
        return dict(self.counters)

    def last_stream_at(self, device: str) -> float | None:
        """When `device` last opened a relayed TCP connection (None: never)."""
        return self.last_stream.get(device)

    def set_rules(self, rules: RuleSet) -> None:
        self.rules = rules

    def set_mac_gate(self, gate: Callable[[str, str], bool] | None) -> None:
        """The shell's check that a MAC seen from a device's address is that one host's."""
        self.devices.mac_gate = gate

    def unlearn_mac(self, name: str) -> None:
        """Match `name` by its address alone again (its MAC turned out to be shared): the
        device table, the addresses learned for it and its flows."""
        table = self.devices
        device = table.by_name.get(name)
        if device is None or device.mac is None:
            return
        plain = replace(device, mac=None)
        held = table.by_mac.get(device.mac)
        if held is not None and held.name == name:
            del table.by_mac[device.mac]
        table.replace(plain)
        for addr, dev in list(table.learned.items()):
            if dev.name == name:
                del table.learned[addr]
        for flow in self.flows.values():
            if flow.device.name == name:
                flow.device = plain


def _packets(held: Held) -> int:
    """What a held item counts against the packet caps: a queued packet 1, stream bytes 0."""
    return 0 if isinstance(held.token, StreamBytes) else 1


def _seq_after(a: int, b: int) -> bool:
    return ((a - b) & 0xFFFFFFFF) < 0x80000000 and a != b


def _within_held(burst: list[Held], seq: int, length: int) -> bool:
    """Whether TCP bytes [seq, seq + length) lie inside the held burst's bytes (seq arithmetic
    mod 2**32; the burst's segments are in order, retransmissions never join it)."""
    first = burst[0].seq
    end = (burst[-1].seq + burst[-1].payload) & 0xFFFFFFFF
    span = (end - first) & 0xFFFFFFFF
    offset = (seq - first) & 0xFFFFFFFF
    return offset < span and offset + length <= span


def _is_handshake(pkt: Packet) -> bool:
    """TLS handshake / change-cipher-spec / alert records, and QUIC Initial/Handshake packets."""
    payload = pkt.payload
    if not payload:
        return False
    first = payload[0]
    if pkt.proto == TCP:
        return first in (20, 21, 22) and len(payload) >= 3 and payload[1] == 3
    if pkt.dport == 443 or pkt.sport == 443:
        # QUIC long header: Initial (0) and Handshake (2) carry no application data; 0-RTT (1)
        # may, and is inspected like the short-header packets that follow.
        return bool(first & 0x80) and ((first >> 4) & 0x3) in (0, 2) and pkt.hint in (
            Hint.QUIC_INITIAL, Hint.QUIC)
    return False
