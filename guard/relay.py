"""The transparent TCP relay: guarded devices' TCP, terminated at the router, relayed byte for byte.

Rules of this module:
- Shell only. It moves bytes and asks the engine; every decision (accept, hold, release, drop,
  reject) is the engine's (`stream_open`, `stream_data`, late `Release`/`Discard`/`Reset`).
  Nothing is decrypted: TLS records are framed by their 5-byte headers (guard/records.py, the
  framer `analyze` uses) and moved as opaque bytes.
- Single thread, no asyncio: it lives in the daemon's `selectors` loop, and every call into it
  (socket events, timers, late actions) is made under the daemon's lock. No exception leaves it:
  a connection whose socket fails is aborted (RST on both legs) and counted.
- Upstream bytes of a held flow are kept from their first byte and leave only in stream order,
  when the engine releases them; downstream is relayed at once, always. Every buffer is bounded
  (backpressure by reading less); both legs carry SO_LINGER {1, 0}, so an abort, a crash or a
  kill -9 resets them and never flushes kept bytes (design.md 5a.5).
"""

from __future__ import annotations

import errno
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

from guard import records
from guard.engine import StreamBytes, Verdict
from guard.records import Record
from guard.sni import NeedMore, client_hello_sni

__all__ = ["RecordFramer", "Relay", "RelayTag", "StreamBytes", "StreamEngine"]

# --- bounds and timings (why each value) ------------------------------------------------------

LISTEN_BACKLOG = 1024  # a burst of reconnects after a restart must not overflow the accept queue
# Server-speaks-first protocols (SMTP, SSH, some MQTT brokers) send nothing until the server does:
# waiting longer for a ClientHello would deadlock them (design.md 5a.9).
FIRST_BYTES_WAIT_S = 0.3
# A ClientHello that began but has not completed (it may span segments, or records): how long it
# may take before the flow is opened without a name. Real hellos arrive within one RTT of LAN.
HELLO_WAIT_S = 2.0
HELLO_CAP_BYTES = 16384 + 5  # one whole TLS record (RFC 8446 5.1: at most 2^14 plaintext)
CONNECT_TIMEOUT_S = 20.0  # below the device's own SYN retry budget (Linux ~127 s, iOS ~75 s)
# Both legs: a vanished speaker must not pin an upstream socket, and the router answers the
# speaker's keepalives, so a dead cloud must be noticed by the relay (design.md 5a.5).
USER_TIMEOUT_MS = 60_000
KEEPIDLE_S, KEEPINTVL_S, KEEPCNT = 60, 10, 5
READ_BYTES = 64 << 10
OUT_HIGH_BYTES = 256 << 10  # stop reading a leg while the other leg's outgoing queue is above
HOLD_SLACK_BYTES = 64 << 10  # kept bytes above the engine's per-upload cap stop the reads
MAC_CACHE_S = 60.0
MAC_MISS_CACHE_S = 5.0
IPV6_TRANSPARENT = 75  # linux/in6.h; not in the socket module
_LINGER_ABORT = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


class StreamEngine(Protocol):
    """What the relay needs of the engine (guard/engine.py implements it)."""

    def stream_open(self, conn: int, device_addr: str, device_port: int, remote_addr: str,
                    remote_port: int, device_mac: str | None, host: str | None,
                    now: float) -> tuple[Verdict, Any]: ...

    def stream_data(self, conn: int, end: int, size: int, content_type: int,
                    now: float) -> Verdict: ...

    def stream_down(self, conn: int, nbytes: int, now: float) -> None: ...

    def stream_closed(self, conn: int, now: float, reset: bool) -> None: ...


# --- framing ------------------------------------------------------------------------------------


class RecordFramer(records.RecordFramer):
    """guard/records.py's framer (the one `analyze` uses too, so both judge the same records),
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


@dataclass(frozen=True, slots=True)
class RelayTag:
    """Selector data of the relay's sockets: which connection (None: a listener) and leg."""

    conn: int | None
    leg: str  # "listen" | "dev" | "up"


@dataclass(slots=True, eq=False)
class _Conn:
    id: int
    dev: socket.socket
    device_addr: str
    device_port: int
    remote_addr: str
    remote_port: int
    accepted: float
    deadline: float
    device_id: str
    phase: Phase = Phase.HEAD
    up: socket.socket | None = None
    key: Any = None
    hold: bool = False  # upstream bytes go through the engine (HOLD), else relayed at once
    opened: bool = False  # stream_open was called: stream_closed is owed
    head: bytearray = field(default_factory=bytearray)
    kept: bytearray = field(default_factory=bytearray)  # stream [sent_upto, read_upto)
    sent_upto: int = 0
    read_upto: int = 0
    to_up: bytearray = field(default_factory=bytearray)
    to_dev: bytearray = field(default_factory=bytearray)
    framer: RecordFramer = field(default_factory=RecordFramer)
    dev_eof: bool = False
    up_eof: bool = False
    up_shut: bool = False
    dev_shut: bool = False
    dev_events: int = 0
    up_events: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class _Abort(Exception):
    """Internal: abort this connection (RST on both legs); `reset` for the engine."""


def _tune(sock: socket.socket) -> None:
    """Both legs: abort on close (design.md 5a.5), keepalive with a user timeout, no Nagle
    (records are relayed as they come; a held burst leaves in one go anyway)."""
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def neighbour_mac_any(address: str) -> str | None:
    """The MAC the neighbour table holds for an IPv4 or IPv6 address (None when unresolved)."""
    from guard.firewall import neighbour_mac

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
    """Listeners and relayed connections. `engine` follows StreamEngine; `clock` gives `now`."""

    def __init__(
        self,
        engine: StreamEngine,
        *,
        port: int,
        upstream_mark: int = 0,
        max_per_device: int = 512,
        max_total: int = 4096,
        max_kept_bytes: int = (1 << 20) + HOLD_SLACK_BYTES,
        families: tuple[int, ...] = (4, 6),
        clock: Callable[[], float] = time.time,
        neighbour: Callable[[str], str | None] = neighbour_mac_any,
        log: Callable[[str], None] = lambda message: None,
        splice: bool = True,
    ) -> None:
        self.engine = engine
        self.port = port
        self.upstream_mark = upstream_mark
        self.max_per_device = max_per_device
        self.max_total = max_total
        self.max_kept_bytes = max_kept_bytes
        self.families = families
        self.clock = clock
        self.neighbour = neighbour
        self.log = log
        self.splice = splice and hasattr(os, "splice")
        self.selector: selectors.BaseSelector | None = None
        self.listeners: list[socket.socket] = []
        self.conns: dict[int, _Conn] = {}
        self.by_key: dict[Any, int] = {}
        self.per_device: dict[str, int] = {}
        self._next_id = 1
        self._macs: dict[str, tuple[str | None, float]] = {}
        self.counters: dict[str, int] = {
            "connections_total": 0, "rejected": 0, "held": 0, "passed": 0, "over_cap": 0,
            "connect_failed": 0, "aborted": 0, "reset_by_peer": 0, "errors": 0,
            "bytes_up": 0, "bytes_down": 0, "bytes_discarded": 0,
        }

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, selector: selectors.BaseSelector) -> None:
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
                sock.setblocking(False)
                sock.listen(LISTEN_BACKLOG)
            except OSError:
                sock.close()
                raise
            self.listeners.append(sock)
            selector.register(sock, selectors.EVENT_READ, RelayTag(None, "listen"))

    def close(self) -> None:
        """Abort every relayed connection (nothing kept is delivered) and close the listeners."""
        for conn in list(self.conns.values()):
            self._abort(conn, reset=True, count=False)
        for sock in self.listeners:
            self._unregister(sock)
            sock.close()
        self.listeners = []

    def stats(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "listening": bool(self.listeners),
            "connections_open": len(self.conns),
            "held_connections": sum(1 for c in self.conns.values() if c.hold),
            "kept_bytes": sum(len(c.kept) for c in self.conns.values()),
            **self.counters,
        }

    def next_deadline(self) -> float | None:
        waits = [c.deadline for c in self.conns.values()
                 if c.phase in (Phase.HEAD, Phase.CONNECTING)]
        return min(waits) if waits else None

    def tick(self, now: float) -> None:
        """Timers: a first read that never came (server speaks first), a connect that hangs."""
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            if conn.phase is Phase.HEAD:
                self._guard(conn, lambda c=conn: self._open(c, now, timed_out=True))
                self._guard(conn, lambda c=conn: self._settle(c, now))
            elif conn.phase is Phase.CONNECTING:
                self.counters["connect_failed"] += 1
                self._abort(conn, reset=True, count=False)

    # -- events -------------------------------------------------------------------------------

    def on_event(self, tag: RelayTag, sock: Any, mask: int) -> None:
        now = self.clock()
        if tag.conn is None:
            self._accept(sock, now)
            return
        conn = self.conns.get(tag.conn)
        if conn is None or (sock is not conn.dev and sock is not conn.up):
            return  # a stale event of a connection already gone
        if tag.leg == "dev":
            if mask & selectors.EVENT_WRITE:
                self._guard(conn, lambda: self._flush_dev(conn))
            if mask & selectors.EVENT_READ and conn.phase is not Phase.DONE:
                self._guard(conn, lambda: self._read_dev(conn, now))
        else:
            if mask & selectors.EVENT_WRITE:
                if conn.phase is Phase.CONNECTING:
                    self._guard(conn, lambda: self._connected(conn))
                elif conn.phase is not Phase.DONE:
                    self._guard(conn, lambda: self._flush_up(conn))
            if mask & selectors.EVENT_READ and conn.phase is Phase.OPEN:
                self._guard(conn, lambda: self._read_up(conn, now))
        if conn.phase is not Phase.DONE:
            self._guard(conn, lambda: self._settle(conn, now))

    def _guard(self, conn: _Conn, step: Callable[[], None]) -> None:
        """Run one step of a connection; any failure aborts that connection, never the loop."""
        if conn.phase is Phase.DONE:
            return
        try:
            step()
        except _Abort:
            self._abort(conn, reset=True, count=False)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            self.counters["reset_by_peer"] += 1
            self._abort(conn, reset=True, count=False)
        except Exception as exc:  # noqa: BLE001 - one connection fails, the relay goes on
            self.counters["errors"] += 1
            self.log(f"relay: connection {conn.id} failed: {exc!r}")
            self._abort(conn, reset=True, count=False)

    def _accept(self, listener: socket.socket, now: float) -> None:
        for _ in range(64):  # bounded per turn: other sockets get their turn too
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENOBUFS: counted, the listener stays
                self.counters["errors"] += 1
                self.log(f"relay: accept failed: {exc}")
                return
            try:
                local = sock.getsockname()
            except OSError:
                _close_abort(sock)
                self.counters["errors"] += 1
                continue
            self.adopt(sock, (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])), now)

    def adopt(self, sock: socket.socket, device: tuple[str, int], remote: tuple[str, int],
              now: float) -> int | None:
        """Relay a tuned, accepted device socket whose original destination is `remote` (the
        listener's getsockname under TPROXY); its connection id, or None over a cap (reset)."""
        device_addr, device_port = device
        try:
            _tune(sock)
        except OSError:
            _close_abort(sock)
            self.counters["errors"] += 1
            return None
        mac = self._mac(device_addr, now)
        device_id = mac or device_addr
        if (len(self.conns) >= self.max_total
                or self.per_device.get(device_id, 0) >= self.max_per_device):
            self.counters["over_cap"] += 1
            _close_abort(sock)
            return None
        conn = _Conn(self._next_id, sock, device_addr, device_port, remote[0], remote[1], now,
                     now + FIRST_BYTES_WAIT_S, device_id)
        self._next_id += 1
        self.conns[conn.id] = conn
        self.per_device[device_id] = self.per_device.get(device_id, 0) + 1
        self.counters["connections_total"] += 1
        self._guard(conn, lambda: self._settle(conn, now))
        return conn.id

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
        if conn.phase is Phase.HEAD:
            want = HELLO_CAP_BYTES - len(conn.head)
            data = _recv(conn.dev, max(want, 1))
            if data is None:
                return
            if not data:
                conn.dev_eof = True
                self._open(conn, now, timed_out=True)
                return
            if not conn.head and data[0] == 0x16:
                conn.deadline = conn.accepted + HELLO_WAIT_S
            conn.head += data
            self._open(conn, now, timed_out=False)
            return
        data = _recv(conn.dev, READ_BYTES)
        if data is None:
            return
        if not data:
            conn.dev_eof = True
            if conn.hold:
                rec = conn.framer.flush()
                if rec is not None:  # the stream ended mid-record: judge what there is
                    self._judge(conn, rec.end, rec.size, rec.content_type, now)
            return
        self._upstream_bytes(conn, data, now)

    def _open(self, conn: _Conn, now: float, timed_out: bool) -> None:
        """Ask the engine once the first bytes are in (or the wait is over)."""
        host: str | None = None
        head = conn.head
        if head and head[0] == 0x16:
            found = client_hello_sni(bytes(head))
            if isinstance(found, NeedMore):
                if len(head) < HELLO_CAP_BYTES and not timed_out and not conn.dev_eof:
                    return  # the hello spans segments: wait for the rest
            else:
                host = found
        elif not head and not timed_out and not conn.dev_eof:
            return
        mac = self._mac(conn.device_addr, now)
        verdict, key = self.engine.stream_open(conn.id, conn.device_addr, conn.device_port,
                                               conn.remote_addr, conn.remote_port, mac, host,
                                               now)
        conn.opened = True
        conn.key = key
        if key is not None:
            self.by_key[key] = conn.id
        if verdict not in (Verdict.ACCEPT, Verdict.HOLD):
            self.counters["rejected"] += 1
            raise _Abort()
        conn.hold = verdict is Verdict.HOLD
        self.counters["held" if conn.hold else "passed"] += 1
        self._connect(conn, now)
        head, conn.head = conn.head, bytearray()
        if head:
            self._upstream_bytes(conn, bytes(head), now)

    def _connect(self, conn: _Conn, now: float) -> None:
        """The upstream leg: the router's own connection to the original destination (the
        router's NAT applies). The device's SYN was already answered by the router's kernel;
        holding it until this connect succeeds (design.md 5a.3) is not done yet."""
        fam = socket.AF_INET6 if ":" in conn.remote_addr else socket.AF_INET
        up = socket.socket(fam, socket.SOCK_STREAM)
        conn.up = up
        _tune(up)
        if self.upstream_mark:
            up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.upstream_mark)
        err = up.connect_ex((conn.remote_addr, conn.remote_port))
        if err not in (0, errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
            self.counters["connect_failed"] += 1
            raise _Abort()
        conn.phase = Phase.CONNECTING
        conn.deadline = now + CONNECT_TIMEOUT_S

    def _connected(self, conn: _Conn) -> None:
        assert conn.up is not None
        err = conn.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.counters["connect_failed"] += 1
            raise _Abort()
        conn.phase = Phase.OPEN
        self._flush_up(conn)

    def _upstream_bytes(self, conn: _Conn, data: bytes, now: float) -> None:
        conn.read_upto += len(data)
        if not conn.hold:
            conn.to_up += data
            conn.sent_upto = conn.read_upto
            self._flush_up(conn)
            return
        conn.kept += data
        for rec in conn.framer.feed(data):
            self._judge(conn, rec.end, rec.size, rec.content_type, now)
            if conn.phase is Phase.DONE:
                return

    def _judge(self, conn: _Conn, end: int, size: int, content_type: int, now: float) -> None:
        verdict = self.engine.stream_data(conn.id, end, size, content_type, now)
        if verdict is Verdict.ACCEPT:
            self._release(conn, end)
        elif verdict is Verdict.DROP:
            self._discard(conn, end)
        elif verdict is Verdict.REJECT:
            raise _Abort()

    # -- kept bytes -----------------------------------------------------------------------------

    def _release(self, conn: _Conn, end: int) -> None:
        # never past what was read, nor into a record the engine has not seen yet
        n = min(end, conn.read_upto - conn.framer.partial) - conn.sent_upto
        if n <= 0:
            return
        conn.to_up += conn.kept[:n]
        del conn.kept[:n]
        conn.sent_upto += n
        if conn.phase is Phase.OPEN:
            self._flush_up(conn)

    def _discard(self, conn: _Conn, end: int) -> None:
        n = min(end, conn.read_upto) - conn.sent_upto
        if n <= 0:
            return
        del conn.kept[:n]
        conn.sent_upto += n
        self.counters["bytes_discarded"] += n

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
        if conn.phase is not Phase.OPEN or conn.up is None:
            return
        while conn.to_up:
            n = _send(conn.up, conn.to_up)
            if n is None:
                break
            del conn.to_up[:n]
            conn.bytes_up += n
            self.counters["bytes_up"] += n

    def _read_up(self, conn: _Conn, now: float) -> None:
        assert conn.up is not None
        data = _recv(conn.up, READ_BYTES)
        if data is None:
            return
        if not data:
            conn.up_eof = True
            return
        conn.to_dev += data
        self.engine.stream_down(conn.id, len(data), now)
        self._flush_dev(conn)

    def _flush_dev(self, conn: _Conn) -> None:
        while conn.to_dev:
            n = _send(conn.dev, conn.to_dev)
            if n is None:
                break
            del conn.to_dev[:n]
            conn.bytes_down += n
            self.counters["bytes_down"] += n

    def _settle(self, conn: _Conn, now: float) -> None:
        """Pass on half-closes once their side's bytes are out, finish a connection closed on
        both sides, and register exactly the events the buffers allow (backpressure)."""
        if conn.phase is Phase.DONE:
            return
        if (conn.phase is Phase.OPEN and conn.dev_eof and not conn.up_shut and not conn.kept
                and not conn.to_up and conn.up is not None):
            conn.up.shutdown(socket.SHUT_WR)  # the device's FIN, after every kept byte
            conn.up_shut = True
        if conn.up_eof and not conn.dev_shut and not conn.to_dev:
            conn.dev.shutdown(socket.SHUT_WR)
            conn.dev_shut = True
        if conn.up_shut and conn.dev_shut and conn.dev_eof and conn.up_eof:
            self._finish(conn, now)
            return
        dev_ev = up_ev = 0
        if conn.phase is Phase.HEAD:
            dev_ev = selectors.EVENT_READ
        else:
            room = len(conn.to_up) < OUT_HIGH_BYTES and len(conn.kept) < self.max_kept_bytes
            if not conn.dev_eof and room:
                dev_ev |= selectors.EVENT_READ
            if conn.to_dev:
                dev_ev |= selectors.EVENT_WRITE
            if conn.phase is Phase.CONNECTING or conn.to_up:
                up_ev |= selectors.EVENT_WRITE
            if conn.phase is Phase.OPEN and not conn.up_eof and len(conn.to_dev) < OUT_HIGH_BYTES:
                up_ev |= selectors.EVENT_READ
        conn.dev_events = self._set(conn.dev, conn.dev_events, dev_ev, RelayTag(conn.id, "dev"))
        if conn.up is not None:
            conn.up_events = self._set(conn.up, conn.up_events, up_ev, RelayTag(conn.id, "up"))

    def _set(self, sock: socket.socket, have: int, want: int, tag: RelayTag) -> int:
        if self.selector is None or have == want:
            return want
        if not want:
            self.selector.unregister(sock)
        elif not have:
            self.selector.register(sock, want, tag)
        else:
            self.selector.modify(sock, want, tag)
        return want

    def _unregister(self, sock: socket.socket | None) -> None:
        if sock is None or self.selector is None:
            return
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    # -- the end ------------------------------------------------------------------------------

    def _finish(self, conn: _Conn, now: float) -> None:
        """Both sides closed and every byte out: an orderly close (no reset)."""
        for sock in (conn.dev, conn.up):
            if sock is not None:
                self._unregister(sock)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
                except OSError:
                    pass
                sock.close()
        self._forget(conn, now, reset=False)

    def _abort(self, conn: _Conn, reset: bool, count: bool) -> None:
        if conn.phase is Phase.DONE:
            return
        if count:
            self.counters["aborted"] += 1
        for sock in (conn.dev, conn.up):
            if sock is not None:
                self._unregister(sock)
                _close_abort(sock)
        self._forget(conn, self.clock(), reset=reset)

    def _forget(self, conn: _Conn, now: float, reset: bool) -> None:
        conn.phase = Phase.DONE
        self.conns.pop(conn.id, None)
        if conn.key is not None and self.by_key.get(conn.key) == conn.id:
            del self.by_key[conn.key]
        left = self.per_device.get(conn.device_id, 1) - 1
        if left > 0:
            self.per_device[conn.device_id] = left
        else:
            self.per_device.pop(conn.device_id, None)
        kept = len(conn.kept)
        conn.kept = bytearray()
        conn.to_up = bytearray()
        conn.to_dev = bytearray()
        if kept:
            self.counters["bytes_discarded"] += kept
        if conn.opened:
            conn.opened = False
            try:
                self.engine.stream_closed(conn.id, now, reset)
            except Exception as exc:  # noqa: BLE001 - the relay goes on
                self.counters["errors"] += 1
                self.log(f"relay: stream_closed({conn.id}) failed: {exc!r}")


# --- socket helpers -----------------------------------------------------------------------------


def _recv(sock: socket.socket, n: int) -> bytes | None:
    """Bytes, b"" at EOF, None when nothing is there. A reset raises ConnectionResetError."""
    try:
        return sock.recv(n)
    except (BlockingIOError, InterruptedError):
        return None


def _send(sock: socket.socket, data: bytearray) -> int | None:
    try:
        n = sock.send(data)
    except (BlockingIOError, InterruptedError):
        return None
    return n or None


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
