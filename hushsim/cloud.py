"""The simulated vendor cloud: TLS servers per host name, a QUIC-shaped UDP server, and stats.

Rules of this module: the cloud is the witness. It counts every application byte and TCP payload
byte it receives, per connection, and keeps a running SHA-256 of the application bytes, so a test
learns "what left the house" from here and never from the guard. Everything is bounded: the process
exits after `max_seconds`, connections are capped in number, buffers in size, timelines in length.

Run inside the wan namespace:  python -m hushsim.cloud --config JSON_OR_PATH [--max-seconds N]

Config (JSON): {"hosts": [{"name": str, "addrs": [ip, ...], "cert": path, "key": path}],
"control": unix socket path, "tcp_port": 443, "udp_port": 443, "udp": true, "max_seconds": 300}

Control protocol: connect to the Unix socket, send one JSON object and a newline, read one JSON
line back. Requests: {"cmd": "ping"}, {"cmd": "stats", "timeline": bool}, {"cmd": "clear"},
{"cmd": "abort", "id"|"host"|"peer": ...} (reset open connections), {"cmd": "shutdown"}. `stats` answers {"ok": true, "now": t, "tcp": [conn, ...], "udp": [flow, ...]}
(see `_TcpConn.snapshot` and `_UdpFlow.snapshot` for the keys).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hushsim import quic, wire

# Bounds (why: a runaway test must not take the machine down with it).
MAX_TCP_CONNECTIONS = 256  # concurrent; more are closed at once and counted as refused
MAX_KEPT_CONNECTIONS = 4096  # stats entries kept, closed ones dropped oldest-first beyond this
MAX_UDP_FLOWS = 1024
MAX_TIMELINE = 20_000  # (time, cumulative bytes) points per connection
HANDSHAKE_TIMEOUT_S = 5.0
POLL_S = 0.25  # how often blocked threads look at the stop flag
CONTROL_LINE_MAX = 65536
DEFAULT_MAX_SECONDS = 300.0
# QUIC: the server answers each Initial with one ~1,200-B datagram (a real server's Initial +
# Handshake flight) and every 2nd other datagram with an ACK-sized one (~40 B; RFC 9000 section
# 13.2.2 acknowledges every second ack-eliciting packet), so the flow has the two-way shape of a
# real QUIC upload without a real QUIC stack. An ACK datagram is 0x40, then the number of datagrams
# received so far (8 bytes), which the speaker's congestion window runs on.
QUIC_ACK_EVERY = 2
QUIC_ACK_BYTES = 40
QUIC_SERVER_HELLO_BYTES = 1200

# struct tcp_info offsets (include/uapi/linux/tcp.h, stable since Linux 4.6 / 4.19).
_TI_BYTES_RECEIVED = 128  # u64 tcpi_bytes_received (RFC 4898 HCThruOctetsReceived)
_TI_SEGS_IN = 140  # u32 tcpi_segs_in
_TI_DATA_SEGS_IN = 152  # u32 tcpi_data_segs_in
_TI_LEN = 232


def tcp_info(sock: socket.socket) -> dict[str, int]:
    """Kernel TCP counters of `sock` ({} when the kernel's struct is too short or the socket
    is gone)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TI_LEN)
    except OSError:
        return {}
    if len(raw) < _TI_DATA_SEGS_IN + 4:
        return {}
    return {
        "bytes_received": struct.unpack_from("=Q", raw, _TI_BYTES_RECEIVED)[0],
        "segs_in": struct.unpack_from("=I", raw, _TI_SEGS_IN)[0],
        "data_segs_in": struct.unpack_from("=I", raw, _TI_DATA_SEGS_IN)[0],
    }


def _fmt_addr(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Abort(Exception):
    """A control request asked to reset this connection."""


@dataclass(frozen=True, slots=True)
class HostConfig:
    name: str
    addrs: tuple[str, ...]
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class CloudConfig:
    hosts: tuple[HostConfig, ...]
    control: str
    tcp_port: int = 443
    udp_port: int = 443
    udp: bool = True
    max_seconds: float = DEFAULT_MAX_SECONDS

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CloudConfig:
        hosts = tuple(
            HostConfig(str(h["name"]), tuple(h["addrs"]), str(h["cert"]), str(h["key"]))
            for h in raw["hosts"]
        )
        return cls(
            hosts=hosts,
            control=str(raw["control"]),
            tcp_port=int(raw.get("tcp_port", 443)),
            udp_port=int(raw.get("udp_port", 443)),
            udp=bool(raw.get("udp", True)),
            max_seconds=float(raw.get("max_seconds", DEFAULT_MAX_SECONDS)),
        )


@dataclass
class _TcpConn:
    """What the cloud knows about one TCP connection; mutated by its thread under the lock."""

    id: int
    host: str
    local: str
    peer: str
    family: int
    opened: float
    sni: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    handshake_done: float | None = None
    closed: float | None = None
    close_reason: str | None = None
    app_bytes: int = 0
    app_reads: int = 0
    first_byte_at: float | None = None
    last_byte_at: float | None = None
    upload_frames: int = 0
    upload_body_bytes: int = 0
    echo_frames: int = 0
    download_bytes_sent: int = 0
    tcp: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[float, int]] = field(default_factory=list)
    sha: Any = field(default_factory=hashlib.sha256)
    abort_requested: bool = False

    def snapshot(self, timeline: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "proto": "tcp",
            "host": self.host,
            "sni": self.sni,
            "local": self.local,
            "peer": self.peer,
            "family": self.family,
            "opened": self.opened,
            "handshake_done": self.handshake_done,
            "closed": self.closed,
            "close_reason": self.close_reason,
            "tls_version": self.tls_version,
            "cipher": self.cipher,
            "app_bytes": self.app_bytes,
            "app_reads": self.app_reads,
            "sha256": self.sha.copy().hexdigest(),
            "first_byte_at": self.first_byte_at,
            "last_byte_at": self.last_byte_at,
            "upload_frames": self.upload_frames,
            "upload_body_bytes": self.upload_body_bytes,
            "echo_frames": self.echo_frames,
            "download_bytes_sent": self.download_bytes_sent,
            "tcp_bytes_received": self.tcp.get("bytes_received"),
            "tcp_segs_in": self.tcp.get("segs_in"),
            "tcp_data_segs_in": self.tcp.get("data_segs_in"),
        }
        if timeline:
            out["timeline"] = [[round(t, 6), n] for t, n in self.timeline]
        return out


@dataclass
class _UdpFlow:
    id: int
    host: str
    local: str
    peer: str
    family: int
    first: float
    last: float
    datagrams: int = 0
    bytes: int = 0
    initial_sni: str | None = None
    initial_dcid: str | None = None
    replies: int = 0
    sizes_head: list[int] = field(default_factory=list)  # first 32 datagram sizes
    timeline: list[tuple[float, int]] = field(default_factory=list)
    sha: Any = field(default_factory=hashlib.sha256)

    def snapshot(self, timeline: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "proto": "udp",
            "host": self.host,
            "local": self.local,
            "peer": self.peer,
            "family": self.family,
            "first": self.first,
            "last": self.last,
            "datagrams": self.datagrams,
            "bytes": self.bytes,
            "sha256": self.sha.copy().hexdigest(),
            "initial_sni": self.initial_sni,
            "initial_dcid": self.initial_dcid,
            "replies": self.replies,
            "sizes_head": list(self.sizes_head),
        }
        if timeline:
            out["timeline"] = [[round(t, 6), n] for t, n in self.timeline]
        return out


class Cloud:
    """All servers of one simulated cloud in one process: a selector loop for listening sockets,
    UDP and control, and one thread per TLS connection."""

    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._next_id = 1
        self._tcp: dict[int, _TcpConn] = {}
        self._udp: dict[tuple[str, str], _UdpFlow] = {}
        self._threads: list[threading.Thread] = []
        self._refused = 0
        self._started = time.time()
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._sockets: list[socket.socket] = []
        # Random bytes served by downloads: one 64 KB block repeated (the content is not the
        # point, the throughput is).
        self._block = os.urandom(65536)

    # --- setup --------------------------------------------------------------------------------

    def _context(self, host: HostConfig) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(host.cert, host.key)
        ctx.set_alpn_protocols(["h2", "http/1.1"])

        def on_sni(sslsock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
            sslsock._hg_sni = name  # read back by the connection thread

        ctx.sni_callback = on_sni
        return ctx

    def open(self) -> None:
        for host in self.config.hosts:
            self._contexts[host.name] = self._context(host)
            for addr in host.addrs:
                family = socket.AF_INET6 if ":" in addr else socket.AF_INET
                lsock = socket.socket(family, socket.SOCK_STREAM)
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind((addr, self.config.tcp_port))
                lsock.listen(128)
                lsock.setblocking(False)
                self._sockets.append(lsock)
                self._sel.register(lsock, selectors.EVENT_READ, ("accept", host))
                if self.config.udp:
                    usock = socket.socket(family, socket.SOCK_DGRAM)
                    usock.bind((addr, self.config.udp_port))
                    usock.setblocking(False)
                    self._sockets.append(usock)
                    self._sel.register(usock, selectors.EVENT_READ, ("udp", host))
        path = Path(self.config.control)
        path.unlink(missing_ok=True)
        csock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        csock.bind(str(path))
        os.chmod(path, 0o600)
        csock.listen(16)
        csock.setblocking(False)
        self._sockets.append(csock)
        self._sel.register(csock, selectors.EVENT_READ, ("control", None))

    # --- main loop ----------------------------------------------------------------------------

    def serve(self) -> None:
        deadline = time.monotonic() + self.config.max_seconds
        # Bound: one pass per POLL_S at least, so passes <= max_seconds / POLL_S + events.
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in self._sel.select(timeout=min(POLL_S, left)):
                kind, host = key.data
                try:
                    if kind == "accept":
                        self._accept(key.fileobj, host)  # type: ignore[arg-type]
                    elif kind == "udp":
                        self._udp_read(key.fileobj, host)  # type: ignore[arg-type]
                    else:
                        self._control(key.fileobj)  # type: ignore[arg-type]
                except OSError as exc:
                    print(f"cloud: {kind}: {exc}", file=sys.stderr)
        self.close()

    def close(self) -> None:
        self._stop.set()
        for s in self._sockets:
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
        self._sockets.clear()
        for t in self._threads:
            t.join(timeout=POLL_S * 4)
        Path(self.config.control).unlink(missing_ok=True)

    # --- TCP ----------------------------------------------------------------------------------

    def _accept(self, lsock: socket.socket, host: HostConfig) -> None:
        for _ in range(64):  # drain the backlog a bounded number at a time
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            if len(self._threads) >= MAX_TCP_CONNECTIONS:
                self._refused += 1
                sock.close()
                continue
            with self._lock:
                conn = _TcpConn(
                    id=self._next_id,
                    host=host.name,
                    local=_fmt_addr(sock.getsockname()),
                    peer=_fmt_addr(peer),
                    family=6 if sock.family == socket.AF_INET6 else 4,
                    opened=time.time(),
                )
                self._next_id += 1
                self._tcp[conn.id] = conn
                self._trim_tcp()
            t = threading.Thread(
                target=self._serve_conn, args=(sock, host, conn), daemon=True, name=f"c{conn.id}"
            )
            self._threads.append(t)
            t.start()

    def _trim_tcp(self) -> None:
        if len(self._tcp) <= MAX_KEPT_CONNECTIONS:
            return
        for cid in sorted(self._tcp):
            if len(self._tcp) <= MAX_KEPT_CONNECTIONS:
                break
            if self._tcp[cid].closed is not None:
                del self._tcp[cid]

    def _serve_conn(self, raw: socket.socket, host: HostConfig, conn: _TcpConn) -> None:
        reason = "eof"
        tls: ssl.SSLSocket | None = None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(HANDSHAKE_TIMEOUT_S)
            tls = self._contexts[host.name].wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False
            )
            tls.do_handshake()
            with self._lock:
                conn.handshake_done = time.time()
                conn.sni = getattr(tls, "_hg_sni", None)
                conn.tls_version = tls.version()
                cipher = tls.cipher()
                conn.cipher = cipher[0] if cipher else None
            reason = self._conn_loop(tls, conn)
        except _Abort:
            reason = "aborted"
            # SO_LINGER 0: close() sends a RST instead of a FIN (the cloud resetting the session).
            target = tls if tls is not None else raw
            try:
                target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        except ConnectionResetError:
            reason = "reset"
        except (ssl.SSLEOFError, BrokenPipeError):
            reason = "eof"
        except TimeoutError:
            reason = "handshake-timeout" if conn.handshake_done is None else "timeout"
        except (ssl.SSLError, OSError) as exc:
            reason = f"error: {exc}"
        finally:
            sock = tls if tls is not None else raw
            with self._lock:
                conn.tcp = tcp_info(sock) or conn.tcp
                conn.closed = time.time()
                conn.close_reason = reason
            try:
                sock.close()
            except OSError:
                pass

    def _conn_loop(self, tls: ssl.SSLSocket, conn: _TcpConn) -> str:
        reader = wire.FrameReader(streamed=frozenset({wire.UPLOAD}), max_buffered_bytes=1 << 16)
        tls.settimeout(POLL_S)
        # Bound: the loop ends on EOF, error, the stop flag (set at max_seconds) or a peer that
        # stays idle; each pass either reads or waits POLL_S.
        while not self._stop.is_set():
            if conn.abort_requested:
                raise _Abort()
            try:
                data = tls.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return "eof"
            now = time.time()
            info = tcp_info(tls)
            with self._lock:
                conn.app_bytes += len(data)
                conn.app_reads += 1
                conn.sha.update(data)
                conn.first_byte_at = conn.first_byte_at or now
                conn.last_byte_at = now
                if info:
                    conn.tcp = info
                if len(conn.timeline) < MAX_TIMELINE:
                    conn.timeline.append((now, conn.app_bytes))
            before = reader.streamed_bytes
            frames = reader.feed(data)
            with self._lock:
                conn.upload_body_bytes += reader.streamed_bytes - before
            for fr in frames:
                self._answer(tls, conn, fr)
        return "stopped"

    def _answer(self, tls: ssl.SSLSocket, conn: _TcpConn, fr: wire.Frame) -> None:
        if fr.kind == wire.UPLOAD:
            with self._lock:
                conn.upload_frames += 1
                total = conn.upload_body_bytes
            # The ack keeps the session going as the real cloud's directives do.
            tls.sendall(wire.frame(wire.ACK, wire.u64(total)))
        elif fr.kind == wire.ECHO:
            with self._lock:
                conn.echo_frames += 1
            tls.sendall(wire.frame(wire.ECHO_REPLY, fr.body or b""))
        elif fr.kind == wire.DOWNLOAD:
            count = min(wire.parse_u64(fr.body), wire.MAX_DOWNLOAD_BYTES)
            self._send_bulk(tls, conn, count)
        # Unknown kinds are counted (they are bytes received) and otherwise ignored.

    def _send_bulk(self, tls: ssl.SSLSocket, conn: _TcpConn, count: int) -> None:
        tls.settimeout(HANDSHAKE_TIMEOUT_S)  # a stalled reader gets 5 s per write, then we give up
        tls.sendall(wire.header(wire.DATA, count))
        left = count
        block = memoryview(self._block)
        for _ in range(count // len(block) + 2):
            if left <= 0 or self._stop.is_set():
                break
            if conn.abort_requested:
                raise _Abort()
            chunk = block[: min(left, len(block))]
            tls.sendall(chunk)
            left -= len(chunk)
            with self._lock:
                conn.download_bytes_sent += len(chunk)
        tls.settimeout(POLL_S)

    # --- UDP ----------------------------------------------------------------------------------

    def _udp_read(self, usock: socket.socket, host: HostConfig) -> None:
        local = _fmt_addr(usock.getsockname())
        for _ in range(256):  # drain a bounded number of datagrams per wake-up
            try:
                data, peer = usock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            now = time.time()
            key = (local, _fmt_addr(peer))
            reply: bytes | None = None
            with self._lock:
                flow = self._udp.get(key)
                if flow is None:
                    if len(self._udp) >= MAX_UDP_FLOWS:
                        continue
                    flow = _UdpFlow(
                        id=self._next_id,
                        host=host.name,
                        local=local,
                        peer=key[1],
                        family=6 if usock.family == socket.AF_INET6 else 4,
                        first=now,
                        last=now,
                    )
                    self._next_id += 1
                    self._udp[key] = flow
                flow.datagrams += 1
                flow.bytes += len(data)
                flow.last = now
                flow.sha.update(data)
                if len(flow.sizes_head) < 32:
                    flow.sizes_head.append(len(data))
                if len(flow.timeline) < MAX_TIMELINE:
                    flow.timeline.append((now, flow.bytes))
                parsed = quic.read_initial(data) if data[:1] and data[0] & 0x80 else None
                if parsed is not None:
                    if flow.initial_sni is None:
                        flow.initial_dcid = parsed[0].hex()
                        flow.initial_sni = parsed[1]
                    reply = b"\xc0" + os.urandom(QUIC_SERVER_HELLO_BYTES - 1)
                elif flow.datagrams % QUIC_ACK_EVERY == 0:
                    count = wire.u64(flow.datagrams)
                    reply = b"\x40" + count + os.urandom(QUIC_ACK_BYTES - 1 - len(count))
                if reply is not None:
                    flow.replies += 1
            if reply is not None:
                try:
                    usock.sendto(reply, peer)
                except OSError:
                    pass

    # --- control ------------------------------------------------------------------------------

    def _control(self, csock: socket.socket) -> None:
        try:
            conn, _ = csock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.settimeout(1.0)
            buf = b""
            try:
                for _ in range(64):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                    if b"\n" in buf or len(buf) > CONTROL_LINE_MAX:
                        break
                request = json.loads(buf.split(b"\n", 1)[0] or b"{}")
                answer = self.handle(request)
            except (OSError, ValueError) as exc:
                answer = {"ok": False, "error": str(exc)}
            try:
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "ping":
            return {
                "ok": True,
                "pid": os.getpid(),
                "started": self._started,
                "hosts": [h.name for h in self.config.hosts],
            }
        if cmd == "stats":
            timeline = bool(request.get("timeline", False))
            with self._lock:
                return {
                    "ok": True,
                    "now": time.time(),
                    "refused": self._refused,
                    "tcp": [c.snapshot(timeline) for c in self._tcp.values()],
                    "udp": [f.snapshot(timeline) for f in self._udp.values()],
                }
        if cmd == "clear":
            with self._lock:
                for cid in [cid for cid, c in self._tcp.items() if c.closed is not None]:
                    del self._tcp[cid]
                self._udp.clear()
            return {"ok": True}
        if cmd == "abort":
            # Reset matching open connections (by "id", "host" or "peer"; all if none given).
            keys = [k for k in ("id", "host", "peer") if k in request]
            with self._lock:
                hit = [
                    c
                    for c in self._tcp.values()
                    if c.closed is None and all(getattr(c, k) == request[k] for k in keys)
                ]
                for c in hit:
                    c.abort_requested = True
            return {"ok": True, "aborted": [c.id for c in hit]}
        if cmd == "shutdown":
            self._stop.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown cmd {cmd!r}"}


# --- client side (used by tests and the demo, in the root namespace) ---------------------------


class CloudClient:
    """Talks to a running cloud's control socket. Unix sockets ignore network namespaces, so the
    test process reads the cloud's stats directly."""

    def __init__(self, path: str | Path, timeout_s: float = 5.0) -> None:
        self.path = str(path)
        self.timeout_s = timeout_s

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout_s)
            s.connect(self.path)
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            for _ in range(100_000):  # bound: answers are at most a few MB
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                if buf.endswith(b"\n"):
                    break
        answer = json.loads(buf)
        if not answer.get("ok"):
            raise RuntimeError(f"cloud: {answer.get('error')}")
        return answer

    def ping(self) -> dict[str, Any]:
        return self.request({"cmd": "ping"})

    def stats(self, timeline: bool = False) -> dict[str, Any]:
        return self.request({"cmd": "stats", "timeline": timeline})

    def clear(self) -> None:
        self.request({"cmd": "clear"})

    def abort(self, **match: Any) -> list[int]:
        """Reset (RST) the open connections matching id/host/peer; their ids. The connection's
        thread acts within POLL_S (0.25 s)."""
        return list(self.request({"cmd": "abort", **match})["aborted"])

    def shutdown(self) -> None:
        self.request({"cmd": "shutdown"})

    def connections(self, **match: Any) -> list[dict[str, Any]]:
        """TCP connection snapshots whose keys equal every given value (e.g. host=..., peer=...)."""
        return [c for c in self.stats()["tcp"] if all(c.get(k) == v for k, v in match.items())]

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout_s: float = 10.0,
        interval_s: float = 0.05,
    ) -> dict[str, Any]:
        """Poll stats until `predicate(stats)` holds; return those stats or raise TimeoutError."""
        deadline = time.monotonic() + timeout_s
        stats: dict[str, Any] = {}
        for _ in range(int(timeout_s / interval_s) + 2):
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() >= deadline:
                break
            time.sleep(interval_s)
        raise TimeoutError(f"cloud stats did not satisfy the condition in {timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hushsim.cloud", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--config", required=True, help="JSON text or a path to a JSON file")
    ap.add_argument("--max-seconds", type=float, default=None, help="exit after this long")
    args = ap.parse_args(argv)
    text = args.config
    raw = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
    if args.max_seconds is not None:
        raw["max_seconds"] = args.max_seconds
    config = CloudConfig.from_json(raw)
    cloud = Cloud(config)
    try:
        cloud.open()
    except OSError as exc:
        print(f"cloud: cannot listen: {exc}", file=sys.stderr)
        cloud.close()
        return 1
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    try:
        cloud.serve()
    except KeyboardInterrupt:
        cloud.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
