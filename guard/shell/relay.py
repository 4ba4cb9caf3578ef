"""The transparent TCP relay: guarded devices' TCP, terminated at the router, relayed byte for byte.

Rules of this module:
- Shell only. It moves bytes and asks the engine; every decision (accept, hold, release, drop,
  reject) is the engine's (`stream_open`, `stream_data`, late `Release`/`Discard`/`Reset`).
  Nothing is decrypted: TLS records are framed by their 5-byte headers (guard/core/records.py, the
  framer `analyze` uses) and moved as opaque bytes.
- Single thread, no asyncio: it lives in the daemon's epoll loop (guard/shell/poller.py), and
  every call into it (socket events, timers, late actions) is made under the daemon's lock. No
  exception leaves it: a connection whose socket fails is aborted (RST on both legs) and counted.
- Upstream bytes of a held flow are kept from their first byte and leave only in stream order,
  when the engine releases them; downstream is relayed at once, always. Every buffer is bounded
  (backpressure by reading less); both legs carry SO_LINGER {1, 0}, so an abort, a crash or a
  kill -9 resets them and never flushes kept bytes (design.md 5a.5).
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import os
import resource
import selectors
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from guard.core import records
from guard.core.engine import StreamBytes, Verdict
from guard.core.records import Record
from guard.core.sni import NeedMore, client_hello_sni

__all__ = ["RecordFramer", "Relay", "RelayTag", "StreamBytes", "StreamEngine"]

# --- bounds and timings (why each value) ------------------------------------------------------

LISTEN_BACKLOG = 1024  # a burst of reconnects after a restart must not overflow the accept queue
# Server-speaks-first protocols (SMTP, SSH, some MQTT brokers) send nothing until the server does:
# waiting longer for a ClientHello would deadlock them (design.md 5a.9).
FIRST_BYTES_WAIT_S = 0.3
# A ClientHello that began but has not completed (it may span segments, or records): how long it
# may take before the flow is opened without a name. Real hellos arrive within one RTT of LAN.
HELLO_WAIT_S = 2.0  # ... and past it the connection is aborted (a trickled hello: slowloris)
HELLO_CAP_BYTES = 16384 + 5  # one whole TLS record (RFC 8446 5.1: at most 2^14 plaintext)
CONNECT_TIMEOUT_S = 20.0  # below the device's own SYN retry budget (Linux ~127 s, iOS ~75 s)
# The SYN hold (design.md 5a.3): a device's SYN waits in the queue while the relay connects
# upstream, at most this long; then it is dropped, as a path that does not answer drops it (the
# device's own retries, 1 s then doubling, are each answered by the same connect attempt).
SYN_CONNECT_WAIT_S = 10.0
# An upstream leg connected for a SYN whose handshake with the router never completed.
PRECONNECTED_TTL_S = 5.0
SYN_TOKENS_MAX = 8  # retransmitted SYNs kept per waiting connect (the rest are dropped)
# Both legs: a vanished speaker must not pin an upstream socket, and the router answers the
# speaker's keepalives, so a dead cloud must be noticed by the relay (design.md 5a.5).
USER_TIMEOUT_MS = 60_000
KEEPIDLE_S, KEEPINTVL_S, KEEPCNT = 60, 10, 5
READ_BYTES = 256 << 10  # pass-through reads (one scratch buffer for the whole relay)
HOLD_READ_BYTES = 64 << 10  # reads of held flows (kept bytes grow by at most this per read)
# splice() (design.md 5a.7) once a direction of a connection carried this much: a pipe costs two
# descriptors and two syscalls to set up, worth it for bulk only.
SPLICE_AFTER_BYTES = 256 << 10
PIPE_BYTES = 256 << 10  # F_SETPIPE_SZ of those pipes (kernel memory; the default is 64 KiB)
# A held record (TLS header read, body not complete) must complete within this: a real sender
# writes records whole, at line rate; a trickled one pins kept bytes (issue 16 point 6).
RECORD_WAIT_S = 10.0
# Half-open connections (issue 16 point 6): one side closed and nothing moved since, or nothing
# moved either way since the accept. Long-lived idle connections with both sides open (an Echo's
# HTTP/2 connection pings every 5 min) are the keepalive's and TCP_USER_TIMEOUT's to judge.
HALF_CLOSED_IDLE_S = 60.0
SILENT_IDLE_S = 60.0
IDLE_SWEEP_S = 2.0
OUT_HIGH_BYTES = 256 << 10  # stop reading a leg while the other leg's outgoing queue is above
HOLD_SLACK_BYTES = 64 << 10  # kept bytes above the engine's per-upload cap stop the reads
MAC_CACHE_S = 60.0
MAC_MISS_CACHE_S = 5.0
IPV6_TRANSPARENT = 75  # linux/in6.h; not in the socket module
_LINGER_ABORT = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


class StreamEngine(Protocol):
    """What the relay needs of the engine (guard/core/engine.py implements it)."""

    def stream_open(self, conn: int, device_addr: str, device_port: int, remote_addr: str,
                    remote_port: int, device_mac: str | None, host: str | None,
                    now: float) -> tuple[Verdict, Any]: ...

    def stream_data(self, conn: int, end: int, size: int, content_type: int,
                    now: float) -> Verdict: ...

    def stream_down(self, conn: int, nbytes: int, now: float) -> None: ...

    def stream_closed(self, conn: int, now: float, reset: bool) -> None: ...

    def stream_syn(self, device_addr: str, device_mac: str | None, remote_addr: str,
                   now: float) -> bool: ...


# --- framing ------------------------------------------------------------------------------------


class RecordFramer(records.RecordFramer):
    """guard/core/records.py's framer (the one `analyze` uses too, so both judge the same records),
    plus what the relay needs of it: how many bytes belong to an unfinished record, and that
    unfinished record as one when the stream ends mid-record."""

    @property
    def partial(self) -> int:
        return self.pending

    def flush(self) -> Record | None:
        n = self.pending
        if not n:
            return None
        ctype = self._content_type if self._need else records.NOT_TLS
        self._need = 0
        self._header = bytearray()
        return Record(self.offset, n, ctype)


# --- connections ----------------------------------------------------------------------------------


class Phase(str, Enum):
    HEAD = "head"  # reading the first bytes (ClientHello) before asking the engine
    CONNECTING = "connecting"  # upstream connect in progress
    OPEN = "open"
    DONE = "done"


HEAD, CONNECTING, OPEN, DONE = Phase.HEAD, Phase.CONNECTING, Phase.OPEN, Phase.DONE
_AF4, _AF6 = int(socket.AF_INET), int(socket.AF_INET6)
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_T_PHASE, _T_RECORD = 0, 1  # timer kinds: the phase's deadline, an unfinished held record
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031  # linux/fcntl.h
_PEER_GONE = frozenset({errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                        errno.ECONNRESET, errno.EPIPE})
# What the relay counts per device (stats()["devices"]) and as hushgate_relay_limited_total.
LIMITS = ("over_cap_device", "over_cap_total", "head_timeout", "record_timeout",
          "idle_half_closed", "idle_silent", "kept_device_cap")
MAX_DEVICE_ROWS = 256  # per-device rows kept; devices beyond are counted under "other"


class Selector(Protocol):
    """What the relay asks of its loop's poller: guard.shell.poller.Poller, or a `selectors`
    selector (the tests')."""

    def register(self, fileobj: Any, events: int, data: Any = None) -> Any: ...

    def modify(self, fileobj: Any, events: int, data: Any = None) -> Any: ...

    def unregister(self, fileobj: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class RelayTag:
    """Selector data of the relay's sockets: which connection (None: a listener) and leg."""

    conn: int | None
    leg: str  # "listen" | "dev" | "up"


_LISTEN_TAG = RelayTag(None, "listen")


class SynOutcome(str, Enum):
    """How a device's held SYN is answered (design.md 5a.3): as the path answered the relay."""

    PASS = "pass"  # the upstream leg is connected: deliver the SYN to the relay's listener
    REFUSED = "refused"  # the cloud reset the connect: the device gets a reset
    UNREACHABLE = "unreachable"  # no route, or a router rule refused it: ICMP unreachable
    SILENT = "silent"  # no answer within SYN_CONNECT_WAIT_S: dropped, as the path dropped it


@dataclass(slots=True, eq=False)
class _Syn:
    """A device's SYN waiting for its upstream connect."""

    id: int
    key: tuple[str, int, str, int]  # device address, port, remote address, port
    sock: socket.socket
    device_id: str
    deadline: float
    tokens: list[Any] = field(default_factory=list)
    waiting: bool = False  # registered with the selector for its connect's end


_TCP_ESTABLISHED, _TCP_CLOSE = 1, 7  # include/net/tcp_states.h


def _connect_state(sock: socket.socket) -> int | None:
    """A non-blocking connect's result without waiting: 0 when connected, the error when it
    failed, None while it is still in progress (the first byte of TCP_INFO is the state)."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    if state == _TCP_ESTABLISHED:
        return 0
    if state == _TCP_CLOSE:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNREFUSED
    return None


def _syn_outcome(err: int) -> SynOutcome:
    if err in (errno.ECONNREFUSED, errno.ECONNRESET):
        return SynOutcome.REFUSED
    if err == errno.ETIMEDOUT:
        return SynOutcome.SILENT
    return SynOutcome.UNREACHABLE  # EHOSTUNREACH, ENETUNREACH, EACCES/EPERM (prohibit, reject)


@dataclass(slots=True, eq=False)
class _Conn:
    id: int
    dev: socket.socket
    device_addr: str
    device_port: int
    remote_addr: str
    remote_port: int
    accepted: float
    device_id: str
    mac: str | None
    dtag: RelayTag
    utag: RelayTag
    deadline: float = 0.0  # the phase's (HEAD: first bytes or hello; CONNECTING: connect)
    phase: Phase = HEAD
    up: socket.socket | None = None
    key: Any = None
    hold: bool = False  # upstream bytes go through the engine (HOLD), else relayed at once
    opened: bool = False  # stream_open was called: stream_closed is owed
    head: bytes = b""
    kept: bytearray = field(default_factory=bytearray)  # stream [sent_upto, read_upto)
    sent_upto: int = 0
    read_upto: int = 0
    to_up: bytearray = field(default_factory=bytearray)
    to_dev: bytearray = field(default_factory=bytearray)
    framer: RecordFramer | None = None  # held flows only
    dev_eof: bool = False
    up_eof: bool = False
    up_shut: bool = False
    dev_shut: bool = False
    dev_events: int = 0
    up_events: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    active: float = 0.0  # the last time a byte moved (idle timeouts)
    rec_deadline: float = 0.0  # an unfinished held record must complete by then
    rec_start: int = -1  # the stream offset of that record
    paused: bool = False  # reads stopped by the device's kept-bytes cap
    # splice() pass-through (design.md 5a.7): a pipe per direction once it carried bulk
    pdown: tuple[int, int] | None = None
    pdown_n: int = 0
    pup: tuple[int, int] | None = None
    pup_n: int = 0


class _Abort(Exception):
    """Internal: abort this connection (RST on both legs); `reset` for the engine."""


def _tune(sock: socket.socket) -> None:
    """Both legs: non-blocking, and _tune_options. The listeners carry the same options, which
    accepted sockets inherit."""
    sock.setblocking(False)
    _tune_options(sock)


def _tune_options(sock: socket.socket) -> None:
    """Abort on close (design.md 5a.5), keepalive with a user timeout, no Nagle (records are
    relayed as they come; a held burst leaves in one go anyway). None of them changes a
    connect: a held SYN's upstream leg gets them after its verdict, off the SYN's path."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def neighbour_mac_any(address: str) -> str | None:
    """The MAC the neighbour table holds for an IPv4 or IPv6 address (None when unresolved)."""
    from guard.shell.firewall import neighbour_mac

    if ":" not in address:
        return neighbour_mac(address)
    try:
        res = subprocess.run(["ip", "-6", "neigh", "show", address], capture_output=True,
                             text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    words = res.stdout.lower().split()
    if "lladdr" in words and words.index("lladdr") + 1 < len(words):
        return words[words.index("lladdr") + 1]
    return None


class Relay:
    """Listeners and relayed connections. `engine` follows StreamEngine; `clock` gives `now`.

    Costs, per connection: the device leg inherits its options from the listener (one
    fcntl), the first read is tried at accept (a client that sent at once costs no loop turn),
    the upstream connect is not waited for when the first send already goes through, and each
    leg's epoll interest changes only on backpressure. Bulk goes through one scratch buffer
    (recv_into, send from a memoryview; only what the peer's socket did not take is copied),
    and through splice() once a direction carried SPLICE_AFTER_BYTES (downstream always;
    upstream when the flow is relayed at once).

    Flood bounds (issue 16 point 6): connections per device and in total; kept bytes per
    connection and per device (reads stop); a ClientHello that does not complete within
    HELLO_WAIT_S and a held record that does not complete within RECORD_WAIT_S abort the
    connection; a half-closed connection quiet for HALF_CLOSED_IDLE_S, and one where no byte
    moved either way for SILENT_IDLE_S, are aborted. Each is counted (LIMITS), per device too."""

    def __init__(
        self,
        engine: StreamEngine,
        *,
        port: int,
        upstream_mark: int = 0,
        route_mark: Callable[[str, str | None], int] | None = None,
        max_per_device: int = 512,
        max_total: int = 4096,
        max_kept_bytes: int = (1 << 20) + HOLD_SLACK_BYTES,
        max_kept_per_device: int = (8 << 20) + HOLD_SLACK_BYTES,
        families: tuple[int, ...] = (4, 6),
        clock: Callable[[], float] = time.time,
        neighbour: Callable[[str], str | None] = neighbour_mac_any,
        log: Callable[[str], None] = lambda message: None,
        splice: bool = True,
        hello_wait_s: float | None = None,
        record_wait_s: float | None = None,
        half_closed_idle_s: float | None = None,
        silent_idle_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.port = port
        self.upstream_mark = upstream_mark
        # the device's own routing mark for its upstream leg (design.md 5a.2), by address and MAC
        self.route_mark = route_mark
        # The SYN hold (design.md 5a.3): held SYNs by id and by 4-tuple, the upstream legs they
        # connected (taken by the accept that follows), and how a held SYN is answered (the
        # daemon's queue verdict; None: no SYN hold, the relay connects after the accept).
        # syn_per_device counts a device's held SYNs and its connected legs not yet accepted:
        # with its relayed connections, they are bounded by max_per_device (descriptors).
        self.syn_verdict: Callable[[Any, SynOutcome], None] | None = None
        self.syns: dict[int, _Syn] = {}
        self.syn_by_key: dict[tuple[str, int, str, int], int] = {}
        self.syn_per_device: dict[str, int] = {}
        self.preconnected: dict[tuple[str, int, str, int], tuple[socket.socket, float, str]] = {}
        self._syn_timers: list[tuple[float, int]] = []
        self._next_syn = 1
        self.max_per_device = max_per_device
        self.max_total = max_total
        self.max_kept_bytes = max_kept_bytes
        self.max_kept_per_device = max_kept_per_device
        self.families = families
        self.clock = clock
        self.neighbour = neighbour
        self.log = log
        self.splice = splice and hasattr(os, "splice")
        self.hello_wait_s = HELLO_WAIT_S if hello_wait_s is None else hello_wait_s
        self.record_wait_s = RECORD_WAIT_S if record_wait_s is None else record_wait_s
        self.half_closed_idle_s = (HALF_CLOSED_IDLE_S if half_closed_idle_s is None
                                   else half_closed_idle_s)
        self.silent_idle_s = SILENT_IDLE_S if silent_idle_s is None else silent_idle_s
        self.selector: Selector | None = None
        self.listeners: dict[int, socket.socket] = {}  # address family -> listener
        self.conns: dict[int, _Conn] = {}
        self.by_key: dict[Any, int] = {}
        self.per_device: dict[str, int] = {}
        self.dev_kept: dict[str, int] = {}
        self._paused: dict[str, set[int]] = {}
        self._timers: list[tuple[float, int, int]] = []
        self._next_sweep = 0.0
        self._next_id = 1
        self._macs: dict[str, tuple[str | None, float]] = {}
        self._buf = bytearray(READ_BYTES)
        self._view = memoryview(self._buf)
        self.device_limits: dict[str, dict[str, int]] = {}
        self.counters: dict[str, int] = {
            "connections_total": 0, "rejected": 0, "held": 0, "passed": 0, "over_cap": 0,
            "connect_failed": 0, "aborted": 0, "reset_by_peer": 0, "errors": 0,
            "bytes_up": 0, "bytes_down": 0, "bytes_discarded": 0, "spliced": 0,
            "syn_held": 0, "syn_connected": 0, "syn_refused": 0, "syn_unreachable": 0,
            "syn_silent": 0, "syn_unconnected": 0, "preconnected_used": 0,
            "preconnected_expired": 0,
            **{name: 0 for name in LIMITS},
        }

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, selector: Selector) -> None:
        """Open the transparent listeners (needs CAP_NET_ADMIN) and register them. A family
        whose listener cannot be opened raises OSError: the daemon refuses to start."""
        self.selector = selector
        _raise_nofile()
        for family in self.families:
            fam = socket.AF_INET if family == 4 else socket.AF_INET6
            sock = socket.socket(fam, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == 4:
                    sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
                    sock.bind(("0.0.0.0", self.port))
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                    sock.bind(("::", self.port))
                _tune(sock)  # inherited by every accepted device leg
                sock.listen(LISTEN_BACKLOG)
            except OSError:
                sock.close()
                raise
            self.listeners[int(fam)] = sock
            selector.register(sock, _READ, _LISTEN_TAG)

    def close(self) -> None:
        """Abort every relayed connection (nothing kept is delivered) and close the listeners.
        Held SYNs are dropped (the queue goes with the guard: the kernel drops them anyway)."""
        for syn in list(self.syns.values()):
            self._syn_done(syn, SynOutcome.SILENT, count=False)
        for sock, _, _ in self.preconnected.values():
            _close_abort(sock)
        self.preconnected.clear()
        self.syn_per_device.clear()
        for conn in list(self.conns.values()):
            self._abort(conn, reset=True, count=False)
        for sock in self.listeners.values():
            if self.selector is not None:
                try:
                    self.selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
            sock.close()
        self.listeners = {}

    def stats(self) -> dict[str, Any]:
        devices: dict[str, dict[str, int]] = {}
        for dev_id, n in self.per_device.items():
            devices[dev_id] = {"connections": n, "kept_bytes": self.dev_kept.get(dev_id, 0)}
        for dev_id, limits in self.device_limits.items():
            devices.setdefault(dev_id, {"connections": 0, "kept_bytes": 0}).update(limits)
        return {
            "port": self.port,
            "listening": bool(self.listeners),
            "connections_open": len(self.conns),
            "held_connections": sum(1 for c in self.conns.values() if c.hold),
            "kept_bytes": sum(self.dev_kept.values()),
            **self.counters,
            "limits": {
                "max_connections_per_device": self.max_per_device,
                "max_connections": self.max_total,
                "max_kept_bytes_per_connection": self.max_kept_bytes,
                "max_kept_bytes_per_device": self.max_kept_per_device,
                "hello_wait_s": self.hello_wait_s, "record_wait_s": self.record_wait_s,
                "half_closed_idle_s": self.half_closed_idle_s,
                "silent_idle_s": self.silent_idle_s,
            },
            "devices": devices,
        }

    def _limited(self, device_id: str, what: str) -> None:
        self.counters[what] += 1
        row = self.device_limits.get(device_id)
        if row is None:
            if len(self.device_limits) >= MAX_DEVICE_ROWS:
                device_id = "other"
                row = self.device_limits.setdefault("other", {})
            else:
                row = self.device_limits[device_id] = {}
        row[what] = row.get(what, 0) + 1

    # -- timers ---------------------------------------------------------------------------------

    def _arm(self, conn: _Conn, when: float) -> None:
        conn.deadline = when
        heapq.heappush(self._timers, (when, conn.id, _T_PHASE))

    def next_deadline(self) -> float | None:
        syn_timers = self._syn_timers
        while syn_timers and syn_timers[0][1] not in self.syns:
            heapq.heappop(syn_timers)
        own = self._conn_deadline()
        if syn_timers:
            return syn_timers[0][0] if own is None else min(own, syn_timers[0][0])
        if self.preconnected:  # inserted in expiry order (one TTL): the first expires first
            soonest = next(iter(self.preconnected.values()))[1]
            return soonest if own is None else min(own, soonest)
        return own

    def _conn_deadline(self) -> float | None:
        timers, conns = self._timers, self.conns
        while timers:
            when, cid, kind = timers[0]
            conn = conns.get(cid)
            if conn is not None and (conn.deadline if kind == _T_PHASE
                                     else conn.rec_deadline) == when:
                return when
            heapq.heappop(timers)
        return None

    def tick(self, now: float) -> None:
        """Timers: a first read that never came (server speaks first), a hello or a held record
        that never completes, a connect that hangs; every few seconds the idle sweep."""
        self._syn_tick(now)
        timers, conns = self._timers, self.conns
        while timers and timers[0][0] <= now:
            when, cid, kind = heapq.heappop(timers)
            conn = conns.get(cid)
            if conn is None:
                continue
            if kind == _T_PHASE:
                if conn.deadline == when:
                    self._phase_timeout(conn, now)
            elif conn.rec_deadline == when:
                self._record_timeout(conn, now)
        if now >= self._next_sweep:
            self._next_sweep = now + min(IDLE_SWEEP_S, self.half_closed_idle_s / 4,
                                         self.silent_idle_s / 4)
            self._sweep(now)

    def _phase_timeout(self, conn: _Conn, now: float) -> None:
        conn.deadline = 0.0
        if conn.phase is HEAD:
            if conn.head:  # a ClientHello began and never completed: slowloris
                self._limited(conn.device_id, "head_timeout")
                self._abort(conn, reset=True, count=False)
                return
            try:  # server speaks first: open without a name
                self._open(conn, now, timed_out=True)
                self._settle(conn, now)
            except Exception as exc:  # noqa: BLE001 - one connection fails, the relay goes on
                self._fail(conn, exc)
        elif conn.phase is CONNECTING:
            self.counters["connect_failed"] += 1
            self._abort(conn, reset=True, count=False)

    def _record_timeout(self, conn: _Conn, now: float) -> None:
        conn.rec_deadline = 0.0
        framer = conn.framer
        if framer is None or not framer.partial or conn.phase is DONE:
            return
        start = conn.read_upto - framer.partial
        if start != conn.rec_start or not conn.dev_events & _READ:
            # another record by now, or we stopped reading it (backpressure): wait again
            conn.rec_start = start
            conn.rec_deadline = now + self.record_wait_s
            heapq.heappush(self._timers, (conn.rec_deadline, conn.id, _T_RECORD))
            return
        self._limited(conn.device_id, "record_timeout")
        self._abort(conn, reset=True, count=False)

    def _sweep(self, now: float) -> None:
        """Half-open connections: one side closed and nothing moved for half_closed_idle_s, or
        nothing moved either way since the accept for silent_idle_s (a held burst's kept bytes
        are the engine's: its hold timeout ends them)."""
        half, silent = now - self.half_closed_idle_s, now - self.silent_idle_s
        cutoff = max(half, silent)
        for conn in [c for c in self.conns.values() if c.active < cutoff]:
            if conn.kept:
                continue
            if (conn.dev_eof or conn.up_eof) and conn.active < half:
                self._limited(conn.device_id, "idle_half_closed")
            elif not conn.read_upto and not conn.bytes_down and conn.active < silent:
                self._limited(conn.device_id, "idle_silent")
            else:
                continue
            self._abort(conn, reset=True, count=False)

    # -- events -------------------------------------------------------------------------------

    def on_event(self, tag: RelayTag, sock: Any, mask: int) -> None:
        if tag.leg == "syn":
            syn = self.syns.get(tag.conn)  # type: ignore[arg-type]
            if syn is not None and sock is syn.sock:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                self._syn_done(syn, SynOutcome.PASS if err == 0 else _syn_outcome(err))
            return
        if tag.conn is None:
            self._accept(sock, self.clock())
            return
        conn = self.conns.get(tag.conn)
        if conn is None:
            return  # a stale event of a connection already gone
        now = self.clock()
        try:
            if tag.leg == "dev":
                if sock is not conn.dev:
                    return
                if mask & _WRITE:
                    self._flush_dev(conn)
                if mask & _READ and conn.phase is not DONE and not conn.dev_eof:
                    self._read_dev(conn, now)
            else:
                if sock is not conn.up:
                    return
                if conn.phase is CONNECTING:
                    self._connected(conn)
                elif mask & _WRITE and conn.phase is OPEN:
                    self._flush_up(conn)
                if mask & _READ and conn.phase is OPEN and not conn.up_eof:
                    self._read_up(conn, now)
            if conn.phase is not DONE:
                self._settle(conn, now)
        except Exception as exc:  # noqa: BLE001 - one connection fails, the relay goes on
            self._fail(conn, exc)

    def _fail(self, conn: _Conn, exc: Exception) -> None:
        """A step of `conn` failed: abort it (RST on both legs), counted by cause."""
        if conn.phase is DONE:
            return
        if isinstance(exc, _Abort):
            pass
        elif isinstance(exc, ConnectionError) or (isinstance(exc, OSError)
                                                  and exc.errno in _PEER_GONE):
            self.counters["reset_by_peer"] += 1
        else:
            self.counters["errors"] += 1
            self.log(f"relay: connection {conn.id} failed: {exc!r}")
        self._abort(conn, reset=True, count=False)

    def _guard(self, conn: _Conn, step: Callable[[], None]) -> None:
        """Run one step of a connection; any failure aborts that connection, never the loop."""
        if conn.phase is DONE:
            return
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - one connection fails, the relay goes on
            self._fail(conn, exc)

    def _accept(self, listener: socket.socket, now: float, limit: int = 64) -> None:
        family = _AF6 if listener is self.listeners.get(_AF6) else _AF4
        for _ in range(limit):  # bounded per turn: other sockets get their turn too
            try:
                # socket.accept() less its per-call family and type lookups (enum conversions)
                fd, peer = listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENOBUFS: counted, the listener stays
                self.counters["errors"] += 1
                self.log(f"relay: accept failed: {exc}")
                return
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
            try:
                local = sock.getsockname()
            except OSError:
                sock.close()  # SO_LINGER {1, 0} inherited: a reset
                self.counters["errors"] += 1
                continue
            self.adopt(sock, (peer[0], peer[1]), (local[0], local[1]), now, tuned=True)

    def adopt(self, sock: socket.socket, device: tuple[str, int], remote: tuple[str, int],
              now: float, tuned: bool = False) -> int | None:
        """Relay an accepted device socket whose original destination is `remote` (the
        listener's getsockname under TPROXY); its connection id, or None over a cap (reset).
        `tuned`: it inherited _tune's options from the listener (only non-blocking is set)."""
        device_addr, device_port = device
        mac = self._mac(device_addr, now)
        device_id = mac or device_addr
        if len(self.conns) >= self.max_total:
            self.counters["over_cap"] += 1
            self._limited(device_id, "over_cap_total")
            _close_abort(sock)
            return None
        if self.per_device.get(device_id, 0) >= self.max_per_device:
            self.counters["over_cap"] += 1
            self._limited(device_id, "over_cap_device")
            _close_abort(sock)
            return None
        try:
            if tuned:
                sock.setblocking(False)
            else:
                _tune(sock)
        except OSError:
            _close_abort(sock)
            self.counters["errors"] += 1
            return None
        cid = self._next_id
        self._next_id += 1
        conn = _Conn(cid, sock, device_addr, device_port, remote[0], remote[1], now, device_id,
                     mac, RelayTag(cid, "dev"), RelayTag(cid, "up"), active=now)
        self.conns[cid] = conn
        self.per_device[device_id] = self.per_device.get(device_id, 0) + 1
        self.counters["connections_total"] += 1
        try:
            self._read_dev(conn, now)  # a client that sent at once: no loop turn lost
            if conn.phase is HEAD and not conn.deadline:
                self._arm(conn, now + FIRST_BYTES_WAIT_S)
            if conn.phase is not DONE:
                self._settle(conn, now)
        except Exception as exc:  # noqa: BLE001 - one connection fails, the relay goes on
            self._fail(conn, exc)
        return cid

    def _mac(self, address: str, now: float) -> str | None:
        hit = self._macs.get(address)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            mac = self.neighbour(address)
        except Exception:  # noqa: BLE001 - a missing `ip`: the engine matches by address
            mac = None
        self._macs[address] = (mac, now + (MAC_CACHE_S if mac else MAC_MISS_CACHE_S))
        if len(self._macs) > 4096:
            self._macs = {a: v for a, v in self._macs.items() if v[1] > now}
        return mac

    # -- the device leg -------------------------------------------------------------------------

    def _read_dev(self, conn: _Conn, now: float) -> None:
        if conn.phase is HEAD:
            try:
                data = conn.dev.recv(max(HELLO_CAP_BYTES - len(conn.head), 1))
            except (BlockingIOError, InterruptedError):
                return
            conn.active = now
            if not data:
                conn.dev_eof = True
                self._open(conn, now, timed_out=True)
                return
            if not conn.head and data[0] == 0x16:
                self._arm(conn, conn.accepted + self.hello_wait_s)
            conn.head = conn.head + data if conn.head else data
            self._open(conn, now, timed_out=False)
            return
        if conn.hold:
            try:
                data = conn.dev.recv(HOLD_READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            conn.active = now
            if not data:
                self._dev_eof(conn, now)
                return
            self._upstream_bytes(conn, data, now)
            return
        if conn.phase is OPEN and not conn.to_up and conn.up is not None:
            if conn.pup is not None or (self.splice and conn.bytes_up >= SPLICE_AFTER_BYTES):
                self._splice_up(conn, now)
                return
            view = self._view
            try:
                n = conn.dev.recv_into(view, READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            conn.active = now
            if not n:
                self._dev_eof(conn, now)
                return
            conn.read_upto += n
            conn.sent_upto = conn.read_upto
            try:
                sent = conn.up.send(view[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            conn.bytes_up += sent
            self.counters["bytes_up"] += sent
            if sent < n:
                conn.to_up += view[sent:n]
            return
        try:  # connecting, or the upstream leg is full: queue (bounded by _settle)
            data = conn.dev.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        conn.active = now
        if not data:
            self._dev_eof(conn, now)
            return
        self._upstream_bytes(conn, data, now)

    def _dev_eof(self, conn: _Conn, now: float) -> None:
        conn.dev_eof = True
        if conn.hold and conn.framer is not None:
            rec = conn.framer.flush()
            if rec is not None:  # the stream ended mid-record: judge what there is
                self._judge(conn, rec.end, rec.size, rec.content_type, now)

    def _open(self, conn: _Conn, now: float, timed_out: bool) -> None:
        """Ask the engine once the first bytes are in (or the wait is over)."""
        host: str | None = None
        head = conn.head
        if head and head[0] == 0x16:
            found = client_hello_sni(head)
            if isinstance(found, NeedMore):
                if len(head) < HELLO_CAP_BYTES and not timed_out and not conn.dev_eof:
                    return  # the hello spans segments: wait for the rest
            else:
                host = found
        elif not head and not timed_out and not conn.dev_eof:
            return
        conn.deadline = 0.0
        verdict, key = self.engine.stream_open(conn.id, conn.device_addr, conn.device_port,
                                               conn.remote_addr, conn.remote_port, conn.mac,
                                               host, now)
        conn.opened = True
        conn.key = key
        if key is not None:
            self.by_key[key] = conn.id
        if verdict is Verdict.HOLD:
            conn.hold = True
            conn.framer = RecordFramer()
            self.counters["held"] += 1
        elif verdict is Verdict.ACCEPT:
            self.counters["passed"] += 1
        else:
            self.counters["rejected"] += 1
            raise _Abort()
        self._connect(conn)
        conn.head = b""
        if head:
            self._upstream_bytes(conn, head, now)
        if conn.phase is CONNECTING:
            self._arm(conn, now + CONNECT_TIMEOUT_S)

    def _connect(self, conn: _Conn) -> None:
        """The upstream leg: the router's own connection to the original destination (the
        router's NAT applies). Usually connected already, while the device's SYN waited
        (design.md 5a.3); one without such a leg (it expired, or the SYN passed unconnected)
        connects here, and the first send is tried at once: on a fast path the handshake is
        done by then."""
        ready = self._take_preconnected(conn)
        if ready is not None:  # connected while the device's SYN waited (design.md 5a.3)
            conn.up = ready
            conn.phase = OPEN
            self.counters["preconnected_used"] += 1
            return
        up = self._upstream_socket(conn.device_addr, conn.mac, conn.remote_addr)
        conn.up = up
        err = up.connect_ex((conn.remote_addr, conn.remote_port))
        if err not in (0, errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
            self.counters["connect_failed"] += 1
            raise _Abort()
        conn.phase = OPEN if err == 0 else CONNECTING

    def _upstream_socket(self, device_addr: str, mac: str | None, remote_addr: str,
                         tune: bool = True) -> socket.socket:
        """A new upstream leg: non-blocking, marked with the relay's bit and the device's
        route_mark (design.md 5a.2), and with _tune_options unless `tune` is false."""
        fam = socket.AF_INET6 if ":" in remote_addr else socket.AF_INET
        up = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            if tune:
                _tune_options(up)
            mark = self.upstream_mark
            if self.route_mark is not None:
                mark |= self.route_mark(device_addr, mac)
            if mark:
                up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        except OSError:
            up.close()
            raise
        return up

    # -- the SYN hold (design.md 5a.3) --------------------------------------------------------

    def syn(self, device_addr: str, device_port: int, remote_addr: str, remote_port: int,
            mac: str | None, token: Any, now: float) -> None:
        """A guarded device's SYN, held in the queue (`token`): connect upstream first, and
        answer it (through `syn_verdict`) as the path answered that connect. The accept that
        follows a PASS takes the connected leg. A SYN the rules will refuse anyway (a blocked
        category by its DNS-learned name, a device that is not guarded) passes unconnected:
        the relay refuses it once it opens, and nothing reaches the cloud, not even a SYN."""
        verdict = self.syn_verdict
        assert verdict is not None
        key = (device_addr, device_port, remote_addr, remote_port)
        if key in self.preconnected:  # a retransmission after the connect: the listener answers
            verdict(token, SynOutcome.PASS)
            return
        sid = self.syn_by_key.get(key)
        if sid is not None:  # a retransmission while connecting: answered with the first
            syn = self.syns[sid]
            if len(syn.tokens) < SYN_TOKENS_MAX:
                syn.tokens.append(token)
            else:
                verdict(token, SynOutcome.SILENT)
            return
        if mac is None:
            mac = self._mac(device_addr, now)
        device_id = mac or device_addr
        total = len(self.syns) + len(self.conns)
        if (total >= self.max_total
                or self.per_device.get(device_id, 0) + self.syn_per_device.get(device_id, 0)
                >= self.max_per_device):
            self.counters["over_cap"] += 1
            self._limited(device_id, "over_cap_total" if total >= self.max_total
                          else "over_cap_device")
            verdict(token, SynOutcome.REFUSED)
            return
        try:
            connect = self.engine.stream_syn(device_addr, mac, remote_addr, now)
        except Exception as exc:  # noqa: BLE001 - the relay's own rules still apply at accept
            self.counters["errors"] += 1
            self.log(f"relay: stream_syn failed: {exc!r}")
            connect = False
        if not connect:
            self.counters["syn_unconnected"] += 1
            verdict(token, SynOutcome.PASS)
            return
        try:  # its options after the verdict (_syn_done): the SYN waits for the connect only
            up = self._upstream_socket(device_addr, mac, remote_addr, tune=False)
        except OSError as exc:  # EMFILE: counted; the SYN is dropped and will be retried
            self.counters["errors"] += 1
            self.log(f"relay: no socket for a held SYN: {exc}")
            verdict(token, SynOutcome.SILENT)
            return
        sid = self._next_syn
        self._next_syn += 1
        syn = _Syn(sid, key, up, device_id, now + SYN_CONNECT_WAIT_S, [token])
        self.syns[sid] = syn
        self.syn_by_key[key] = sid
        self._syn_count(device_id, 1)
        self.counters["syn_held"] += 1
        err = up.connect_ex((remote_addr, remote_port))
        if err in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
            # A path inside the router's reach (another LAN, a local cloud) answers within the
            # connect call itself: ask the socket once instead of waiting for a loop turn.
            err = _connect_state(up)
            if err is None:
                assert self.selector is not None
                self.selector.register(up, _WRITE, RelayTag(sid, "syn"))
                syn.waiting = True
                heapq.heappush(self._syn_timers, (syn.deadline, sid))
                return
        self._syn_done(syn, SynOutcome.PASS if err == 0 else _syn_outcome(err))

    def _take_preconnected(self, conn: _Conn) -> socket.socket | None:
        """The upstream leg connected for `conn`'s SYN, out of the waiting set (and the
        device's count), or None."""
        ready = self.preconnected.pop(
            (conn.device_addr, conn.device_port, conn.remote_addr, conn.remote_port), None)
        if ready is None:
            return None
        self._syn_count(ready[2], -1)
        return ready[0]

    def _syn_count(self, device_id: str, delta: int) -> None:
        left = self.syn_per_device.get(device_id, 0) + delta
        if left > 0:
            self.syn_per_device[device_id] = left
        else:
            self.syn_per_device.pop(device_id, None)

    def _syn_done(self, syn: _Syn, outcome: SynOutcome, count: bool = True) -> None:
        self.syns.pop(syn.id, None)
        if self.syn_by_key.get(syn.key) == syn.id:
            del self.syn_by_key[syn.key]
        if outcome is not SynOutcome.PASS:  # a connected leg counts on until its accept
            self._syn_count(syn.device_id, -1)
        if syn.waiting and self.selector is not None:
            syn.waiting = False
            try:
                self.selector.unregister(syn.sock)
            except (KeyError, ValueError):
                pass
        if outcome is SynOutcome.PASS:
            self.counters["syn_connected"] += 1
            old = self.preconnected.pop(syn.key, None)
            if old is not None:  # a port reused before its accept: the older leg goes
                _close_abort(old[0])
                self._syn_count(old[2], -1)
            self.preconnected[syn.key] = (syn.sock, self.clock() + PRECONNECTED_TTL_S,
                                          syn.device_id)
        else:
            if count:
                self.counters[f"syn_{outcome.value}"] += 1
            _close_abort(syn.sock)
        verdict = self.syn_verdict
        if verdict is not None:
            for token in syn.tokens:
                verdict(token, outcome)
        syn.tokens = []
        if outcome is SynOutcome.PASS:
            try:
                _tune_options(syn.sock)
            except OSError as exc:  # the accept connects a fresh leg instead (_connect)
                self.counters["errors"] += 1
                self.log(f"relay: could not tune a connected leg: {exc}")
                if self.preconnected.pop(syn.key, None) is not None:
                    self._syn_count(syn.device_id, -1)
                _close_abort(syn.sock)
            if verdict is not None:
                # A device next door completes its handshake within the verdict call: take its
                # connection now rather than a loop turn later (nothing waiting costs one accept).
                listener = self.listeners.get(_AF6 if ":" in syn.key[0] else _AF4)
                if listener is not None:
                    self._accept(listener, self.clock(), limit=1)

    def _syn_tick(self, now: float) -> None:
        timers = self._syn_timers
        while timers and timers[0][0] <= now:
            _, sid = heapq.heappop(timers)
            syn = self.syns.get(sid)
            if syn is not None:
                self._syn_done(syn, SynOutcome.SILENT)
        pre = self.preconnected
        while pre:  # in expiry order: stop at the first that has time left
            key, (sock, expires, device_id) = next(iter(pre.items()))
            if expires > now:
                break
            del pre[key]
            self._syn_count(device_id, -1)
            _close_abort(sock)
            self.counters["preconnected_expired"] += 1

    def _connected(self, conn: _Conn) -> None:
        """An event on a connecting upstream leg: connected, or failed."""
        assert conn.up is not None
        err = conn.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.counters["connect_failed"] += 1
            raise _Abort()
        conn.phase = OPEN
        conn.deadline = 0.0
        self._flush_up(conn)

    def _upstream_bytes(self, conn: _Conn, data: bytes, now: float) -> None:
        conn.read_upto += len(data)
        if not conn.hold:
            conn.to_up += data
            conn.sent_upto = conn.read_upto
            self._flush_up(conn)
            return
        conn.kept += data
        self._kept_delta(conn.device_id, len(data))
        framer = conn.framer
        assert framer is not None
        for rec in framer.feed(data):
            self._judge(conn, rec.end, rec.size, rec.content_type, now)
            if conn.phase is DONE:
                return
        if framer.partial:
            if not conn.rec_deadline:  # an unfinished record: it must complete in time
                conn.rec_start = conn.read_upto - framer.partial
                conn.rec_deadline = now + self.record_wait_s
                heapq.heappush(self._timers, (conn.rec_deadline, conn.id, _T_RECORD))
        else:
            conn.rec_deadline = 0.0

    def _judge(self, conn: _Conn, end: int, size: int, content_type: int, now: float) -> None:
        verdict = self.engine.stream_data(conn.id, end, size, content_type, now)
        if verdict is Verdict.ACCEPT:
            self._release(conn, end)
        elif verdict is Verdict.DROP:
            self._discard(conn, end)
        elif verdict is Verdict.REJECT:
            raise _Abort()

    # -- kept bytes -----------------------------------------------------------------------------

    def _kept_delta(self, device_id: str, delta: int) -> None:
        cap = self.max_kept_per_device
        before = self.dev_kept.get(device_id, 0)
        after = before + delta
        if after > 0:
            self.dev_kept[device_id] = after
        else:
            self.dev_kept.pop(device_id, None)
        if before >= cap > after:  # under the device's cap again: its paused reads resume
            for cid in self._paused.pop(device_id, ()):
                conn = self.conns.get(cid)
                if conn is not None:
                    conn.paused = False
                    self._guard(conn, lambda c=conn: self._settle(c, self.clock()))

    def _release(self, conn: _Conn, end: int) -> None:
        framer = conn.framer
        partial = framer.partial if framer is not None else 0
        # never past what was read, nor into a record the engine has not seen yet
        n = min(end, conn.read_upto - partial) - conn.sent_upto
        if n <= 0:
            return
        conn.to_up += conn.kept[:n]
        del conn.kept[:n]
        conn.sent_upto += n
        self._kept_delta(conn.device_id, -n)
        self._flush_up(conn)

    def _discard(self, conn: _Conn, end: int) -> None:
        n = min(end, conn.read_upto) - conn.sent_upto
        if n <= 0:
            return
        del conn.kept[:n]
        conn.sent_upto += n
        self.counters["bytes_discarded"] += n
        self._kept_delta(conn.device_id, -n)

    def release(self, conn_id: int, end: int) -> None:
        """Late action: forward the kept bytes before stream offset `end`, in order."""
        conn = self.conns.get(conn_id)
        if conn is not None:
            self._guard(conn, lambda: self._release(conn, end))
            self._guard(conn, lambda: self._settle(conn, self.clock()))

    def discard(self, conn_id: int, end: int) -> None:
        """Late action: drop the kept bytes before stream offset `end`."""
        conn = self.conns.get(conn_id)
        if conn is not None:
            self._guard(conn, lambda: self._discard(conn, end))
            self._guard(conn, lambda: self._settle(conn, self.clock()))

    def relayed(self, key: Any) -> int | None:
        """The relayed connection of a FlowKey, if any."""
        conn_id = self.by_key.get(key)
        return conn_id if conn_id in self.conns else None

    def abort(self, conn_id: int) -> bool:
        """Late action (deny, expiry, a block): reset both legs."""
        conn = self.conns.get(conn_id)
        if conn is None:
            return False
        self._abort(conn, reset=True, count=True)
        return True

    # -- moving bytes -----------------------------------------------------------------------------

    def _flush_up(self, conn: _Conn) -> None:
        up = conn.up
        if up is None or conn.phase is DONE:
            return
        if conn.pup_n:
            self._drain_pipe_up(conn)
            if conn.pup_n:
                return
        while conn.to_up:
            try:
                n = up.send(conn.to_up)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                if conn.phase is CONNECTING:  # the first send found the connect failed
                    self.counters["connect_failed"] += 1
                    raise _Abort() from None
                raise
            if conn.phase is CONNECTING:  # the first send went through: connected
                conn.phase = OPEN
                conn.deadline = 0.0
            if not n:
                return
            del conn.to_up[:n]
            conn.bytes_up += n
            self.counters["bytes_up"] += n

    def _read_up(self, conn: _Conn, now: float) -> None:
        up = conn.up
        assert up is not None
        if conn.to_dev or conn.pdown_n:
            return  # backpressure: the device leg first
        if conn.pdown is not None or (self.splice and conn.bytes_down >= SPLICE_AFTER_BYTES):
            self._splice_down(conn, now)
            return
        view = self._view
        try:
            n = up.recv_into(view, READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        conn.active = now
        if not n:
            conn.up_eof = True
            return
        self.engine.stream_down(conn.id, n, now)
        try:
            sent = conn.dev.send(view[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        conn.bytes_down += sent
        self.counters["bytes_down"] += sent
        if sent < n:
            conn.to_dev += view[sent:n]

    def _flush_dev(self, conn: _Conn) -> None:
        if conn.pdown_n:
            self._drain_pipe_down(conn)
            return
        while conn.to_dev:
            try:
                n = conn.dev.send(conn.to_dev)
            except (BlockingIOError, InterruptedError):
                return
            if not n:
                return
            del conn.to_dev[:n]
            conn.bytes_down += n
            self.counters["bytes_down"] += n

    # -- splice: bulk pass-through without copies through Python ----------------------------------

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # the default (64 KiB) or pipe-user-pages-soft: still correct
        self.counters["spliced"] += 1
        return r, w

    def _splice_down(self, conn: _Conn, now: float) -> None:
        assert conn.up is not None
        if conn.pdown is None:
            conn.pdown = self._pipe()
        try:
            n = os.splice(conn.up.fileno(), conn.pdown[1], PIPE_BYTES, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        conn.active = now
        if not n:
            conn.up_eof = True
            return
        conn.pdown_n += n
        self.engine.stream_down(conn.id, n, now)
        self._drain_pipe_down(conn)

    def _drain_pipe_down(self, conn: _Conn) -> None:
        assert conn.pdown is not None
        try:
            n = os.splice(conn.pdown[0], conn.dev.fileno(), conn.pdown_n, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        conn.pdown_n -= n
        conn.bytes_down += n
        self.counters["bytes_down"] += n

    def _splice_up(self, conn: _Conn, now: float) -> None:
        assert conn.up is not None
        if conn.pup is None:
            conn.pup = self._pipe()
        try:
            n = os.splice(conn.dev.fileno(), conn.pup[1], PIPE_BYTES, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        conn.active = now
        if not n:
            self._dev_eof(conn, now)
            return
        conn.pup_n += n
        conn.read_upto += n
        conn.sent_upto = conn.read_upto
        self._drain_pipe_up(conn)

    def _drain_pipe_up(self, conn: _Conn) -> None:
        assert conn.pup is not None and conn.up is not None
        try:
            n = os.splice(conn.pup[0], conn.up.fileno(), conn.pup_n, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        conn.pup_n -= n
        conn.bytes_up += n
        self.counters["bytes_up"] += n

    # -- interest -----------------------------------------------------------------------------------

    def _settle(self, conn: _Conn, now: float) -> None:
        """Pass on half-closes once their side's bytes are out, finish a connection closed on
        both sides, and keep exactly the events the buffers allow registered (backpressure);
        epoll is touched only when that changes."""
        up = conn.up
        if (conn.dev_eof and not conn.up_shut and conn.phase is OPEN and not conn.kept
                and not conn.to_up and not conn.pup_n and up is not None):
            up.shutdown(socket.SHUT_WR)  # the device's FIN, after every kept byte
            conn.up_shut = True
        if conn.up_eof and not conn.dev_shut and not conn.to_dev and not conn.pdown_n:
            conn.dev.shutdown(socket.SHUT_WR)
            conn.dev_shut = True
        if conn.up_shut and conn.dev_shut and conn.dev_eof and conn.up_eof:
            self._finish(conn, now)
            return
        up_ev = 0
        if conn.phase is HEAD:
            dev_ev = _READ
        else:
            dev_ev = 0
            if not conn.dev_eof:
                if conn.hold:
                    room = (len(conn.to_up) < OUT_HIGH_BYTES
                            and len(conn.kept) < self.max_kept_bytes)
                    if room and self.dev_kept.get(conn.device_id, 0) >= self.max_kept_per_device:
                        room = False
                        if not conn.paused:
                            conn.paused = True
                            self._paused.setdefault(conn.device_id, set()).add(conn.id)
                            self._limited(conn.device_id, "kept_device_cap")
                elif conn.phase is OPEN:
                    room = not conn.to_up and not conn.pup_n
                else:
                    room = len(conn.to_up) < OUT_HIGH_BYTES
                if room:
                    dev_ev = _READ
            if conn.to_dev or conn.pdown_n:
                dev_ev |= _WRITE
            if conn.phase is CONNECTING or conn.to_up or conn.pup_n:
                up_ev = _WRITE
            if not conn.up_eof and not conn.to_dev and not conn.pdown_n:
                up_ev |= _READ
        if dev_ev != conn.dev_events:
            self._set(conn.dev, conn.dev_events, dev_ev, conn.dtag)
            conn.dev_events = dev_ev
        if up is not None and up_ev != conn.up_events:
            self._set(up, conn.up_events, up_ev, conn.utag)
            conn.up_events = up_ev

    def _set(self, sock: socket.socket, have: int, want: int, tag: RelayTag) -> None:
        sel = self.selector
        if sel is None:
            return
        if not want:
            sel.unregister(sock)
        elif not have:
            sel.register(sock, want, tag)
        else:
            sel.modify(sock, want, tag)

    # -- the end ------------------------------------------------------------------------------

    def _release_sockets(self, conn: _Conn, orderly: bool) -> None:
        sel = self.selector
        for sock, events in ((conn.dev, conn.dev_events), (conn.up, conn.up_events)):
            if sock is None:
                continue
            if events and sel is not None:  # only what is registered: no KeyError to format
                try:
                    sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
            if orderly:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
                except OSError:
                    pass
                sock.close()
            else:
                _close_abort(sock)
        conn.dev_events = conn.up_events = 0
        for pipe in (conn.pdown, conn.pup):
            if pipe is not None:
                os.close(pipe[0])
                os.close(pipe[1])
        conn.pdown = conn.pup = None

    def _finish(self, conn: _Conn, now: float) -> None:
        """Both sides closed and every byte out: an orderly close (no reset)."""
        self._release_sockets(conn, orderly=True)
        self._forget(conn, now, reset=False)

    def _abort(self, conn: _Conn, reset: bool, count: bool) -> None:
        if conn.phase is DONE:
            return
        if count:
            self.counters["aborted"] += 1
        self._release_sockets(conn, orderly=False)
        self._forget(conn, self.clock(), reset=reset)

    def _forget(self, conn: _Conn, now: float, reset: bool) -> None:
        conn.phase = DONE
        if self.preconnected:  # refused before it took the leg its SYN connected: reset that too
            ready = self._take_preconnected(conn)
            if ready is not None:
                _close_abort(ready)
        self.conns.pop(conn.id, None)
        if conn.key is not None and self.by_key.get(conn.key) == conn.id:
            del self.by_key[conn.key]
        left = self.per_device.get(conn.device_id, 1) - 1
        if left > 0:
            self.per_device[conn.device_id] = left
        else:
            self.per_device.pop(conn.device_id, None)
        if conn.paused:
            waiting = self._paused.get(conn.device_id)
            if waiting is not None:
                waiting.discard(conn.id)
        kept = len(conn.kept)
        conn.kept = bytearray()
        conn.to_up = bytearray()
        conn.to_dev = bytearray()
        if kept:
            self.counters["bytes_discarded"] += kept
            self._kept_delta(conn.device_id, -kept)
        if conn.opened:
            conn.opened = False
            try:
                self.engine.stream_closed(conn.id, now, reset)
            except Exception as exc:  # noqa: BLE001 - the relay goes on
                self.counters["errors"] += 1
                self.log(f"relay: stream_closed({conn.id}) failed: {exc!r}")


# --- socket helpers -----------------------------------------------------------------------------


def _close_abort(sock: socket.socket) -> None:
    """Close with SO_LINGER {1, 0}: the peer gets a reset, queued bytes are thrown away."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _raise_nofile() -> None:
    """Two descriptors per relayed connection: take the hard limit of open files."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
