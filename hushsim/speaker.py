"""The speaker simulator: real TLS (or a QUIC-shaped UDP flow) with the upstream shape of a real upload.

Rules of this module: the simulator replays sizes and timing, never content; it writes one TLS
record per profile item (TCP_NODELAY, plaintext = wire size - record overhead) so that on the wire
each item is one record in one segment, as the captured speakers send them. Everything is bounded
by `--max-seconds`; a reset, EOF or ICMP error is noticed within POLL_S (0.2 s) even while
writing, because every socket operation has a timeout. The result is one JSON line on stdout.

Run inside a LAN host's namespace:
  python -m hushsim.speaker --host NAME --ca CA.pem [--addr IP] [-4|-6] MODE ...
Modes: upload, events, rtt N, download BYTES, quic-upload. See `--help` of each.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import select
import signal
import socket
import ssl
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hushsim import profiles, quic, wire

POLL_S = 0.2  # the longest any socket call blocks: reset detection latency is below this
DEFAULT_MAX_SECONDS = 60.0
# struct tcp_info offsets (include/uapi/linux/tcp.h)
_TI_SND_MSS = 16
_TI_TOTAL_RETRANS = 100
_TI_BYTES_ACKED = 120
_TI_DATA_SEGS_OUT = 156
_TI_BYTES_SENT = 200
_TI_LEN = 232


class Stop(Exception):
    """The connection ended (reset, EOF, TLS error) or time ran out; `reason` says which."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class _Terminated(Exception):
    pass


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise _Terminated()


_TCP_CLOSE = 7  # include/net/tcp_states.h


def _tcp_state(sock: socket.socket) -> int | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return None


def _tcp_info(sock: socket.socket) -> dict[str, int]:
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TI_LEN)
    except OSError:
        return {}
    if len(raw) < _TI_BYTES_SENT + 8:
        return {}
    return {
        "snd_mss": struct.unpack_from("=I", raw, _TI_SND_MSS)[0],
        "total_retrans": struct.unpack_from("=I", raw, _TI_TOTAL_RETRANS)[0],
        "bytes_acked": struct.unpack_from("=Q", raw, _TI_BYTES_ACKED)[0],
        "data_segs_out": struct.unpack_from("=I", raw, _TI_DATA_SEGS_OUT)[0],
        "bytes_sent": struct.unpack_from("=Q", raw, _TI_BYTES_SENT)[0],
    }


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with 200 samples p99 is the 198th)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


@dataclass
class Result:
    """Everything the speaker reports; serialised as the one JSON line."""

    mode: str
    host: str
    port: int
    addr: str | None = None
    family: int | None = None
    local: str | None = None
    started_at: float = field(default_factory=time.time)
    connected_at: float | None = None
    handshake_s: float | None = None
    tls_version: str | None = None
    cipher: str | None = None
    record_overhead: int | None = None
    mss: int | None = None
    bytes_sent: int = 0  # application plaintext (TCP) or datagram payload (UDP) bytes handed over
    wire_bytes: int = 0  # the profile's on-the-wire sizes of what was written
    records: int = 0  # writes (TCP) or datagrams (UDP)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    acks: int = 0
    acked_upload_bytes: int = 0
    bytes_received: int = 0
    reset: bool = False
    reset_at: float | None = None
    eof: bool = False
    eof_at: float | None = None
    refused: bool = False  # UDP: ICMP port/host unreachable came back
    refused_at: float | None = None
    error: str | None = None
    ended_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _sha: Any = field(default_factory=hashlib.sha256)

    def note_sent(self, data: bytes | memoryview, wire_size: int) -> None:
        self._sha.update(data)
        self.bytes_sent += len(data)
        self.wire_bytes += wire_size
        self.records += 1

    def to_json(self) -> str:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k != "extra"}
        out["sha256"] = self._sha.hexdigest()
        out.update(self.extra)
        return json.dumps(out)


# --- TCP/TLS ------------------------------------------------------------------------------------


class TlsSpeaker:
    """One TLS connection to a vendor host, written record by record."""

    def __init__(self, args: argparse.Namespace, result: Result) -> None:
        self.args = args
        self.result = result
        self.deadline = time.monotonic() + args.max_seconds
        self.reader = wire.FrameReader(streamed=frozenset({wire.DATA}), max_buffered_bytes=1 << 16)
        self.frames: list[wire.Frame] = []
        self.sock: ssl.SSLSocket | None = None
        self.overhead = 29
        self.mss = profiles.MSS_BYTES

    # connection ---------------------------------------------------------------------------

    def connect(self) -> None:
        args, res = self.args, self.result
        family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(args.family or 0, socket.AF_UNSPEC)
        target = args.addr or args.host
        infos = socket.getaddrinfo(target, args.port, family, socket.SOCK_STREAM)
        if not infos:
            raise Stop("resolve", f"no address for {target}")
        fam, _, _, _, sockaddr = infos[0]
        res.addr, res.family = sockaddr[0], 6 if fam == socket.AF_INET6 else 4
        raw = socket.socket(fam, socket.SOCK_STREAM)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if args.keepalive > 0:
            # TCP keepalive probes (pure ACKs) every `keepalive` s of idleness.
            secs = max(1, int(args.keepalive))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, secs)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, secs)
        raw.settimeout(min(5.0, self._left()))
        t0 = time.monotonic()
        raw.connect(sockaddr[:2] if fam == socket.AF_INET else sockaddr)
        ctx = ssl.create_default_context(cafile=args.ca)
        if args.tls == "1.2":
            # The 2018 Echo's records carry 29 B of overhead: TLS 1.2 with an AES-GCM suite.
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("ECDHE+AESGCM")
        ctx.set_alpn_protocols(["h2"])
        # --sni-hex: these raw bytes (any ASCII but NUL, up to 255) go in the SNI instead of
        # --host (bytes skip the IDNA check); the certificate is then checked against --host.
        sni = bytes.fromhex(args.sni_hex) if args.sni_hex else None
        if sni is not None:
            ctx.check_hostname = False
        sock = ctx.wrap_socket(
            raw,
            server_hostname=sni if sni is not None else args.host,
            do_handshake_on_connect=False,
        )
        # The ClientHello is a payload packet a guard may hold while it decides: wait for the
        # handshake as long as the run may last, not just the connect timeout.
        sock.settimeout(self._left())
        sock.do_handshake()
        self.sock = sock
        if sni is not None:
            cert = sock.getpeercert() or {}
            names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
            if args.host not in names:
                raise Stop("tls", f"certificate is for {names}, not {args.host}")
        res.handshake_s = round(time.monotonic() - t0, 6)
        res.connected_at = time.time()
        res.local = f"{sock.getsockname()[0]}:{sock.getsockname()[1]}"
        res.tls_version = sock.version()
        cipher = sock.cipher()
        res.cipher = cipher[0] if cipher else None
        self.overhead = wire.tls_record_overhead(res.tls_version, res.cipher)
        res.record_overhead = self.overhead
        try:
            self.mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        except OSError:
            pass
        res.mss = self.mss
        sock.settimeout(POLL_S)

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Stop("max-seconds")
        return left

    def _ended(self, exc: BaseException) -> Stop:
        """Map a socket/TLS exception to a Stop, noting reset/EOF and when."""
        res = self.result
        now = time.time()
        if isinstance(exc, ConnectionResetError | BrokenPipeError) or (
            isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)
        ):
            res.reset, res.reset_at = True, now
            return Stop("reset", str(exc))
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return self._closed_by_peer()
        if isinstance(exc, ssl.SSLError) and "reset" in str(exc).lower():
            res.reset, res.reset_at = True, now
            return Stop("reset", str(exc))
        return Stop("error", f"{type(exc).__name__}: {exc}")

    def _closed_by_peer(self) -> Stop:
        """TLS reads report a RST and a FIN alike (ragged EOF): the TCP state tells them apart.
        After a RST the socket is CLOSE (7); after a FIN it is CLOSE_WAIT (8)."""
        state = _tcp_state(self.sock) if self.sock is not None else None
        now = time.time()
        if state == _TCP_CLOSE:
            self.result.reset, self.result.reset_at = True, now
            return Stop("reset", "connection reset by peer")
        self.result.eof, self.result.eof_at = True, now
        return Stop("eof")

    # IO primitives ------------------------------------------------------------------------

    def pump(self, wait_s: float, until: Callable[[], bool] | None = None) -> None:
        """Read whatever the cloud sent for `wait_s` (or until `until()` holds, checked after
        each read); raise Stop on reset/EOF."""
        sock = self.sock
        assert sock is not None
        end = time.monotonic() + max(0.0, wait_s)
        # Bound: each pass waits up to POLL_S or reads a chunk; passes <= wait/POLL_S + reads.
        for _ in range(10_000_000):
            if until is not None and until():
                return
            left = min(end - time.monotonic(), self.deadline - time.monotonic())
            if sock.pending() == 0:
                if left <= 0:
                    break
                readable, _, _ = select.select([sock], [], [], min(left, POLL_S))
                if not readable:
                    continue
            sock.settimeout(0.0)
            try:
                data = sock.recv(1 << 18)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                data = None  # a partial record: wait for the rest
            except (OSError, ssl.SSLError) as exc:
                raise self._ended(exc) from exc
            finally:
                sock.settimeout(POLL_S)
            if data == b"":
                raise self._closed_by_peer()
            if data:
                self._received(data)
        if time.monotonic() >= self.deadline:
            raise Stop("max-seconds")

    def _received(self, data: bytes) -> None:
        self.result.bytes_received += len(data)
        for fr in self.reader.feed(data):
            if fr.kind == wire.ACK and fr.body is not None:
                self.result.acks += 1
                self.result.acked_upload_bytes = wire.parse_u64(fr.body)
            else:
                self.frames.append(fr)

    def write(self, data: bytes, wire_size: int) -> None:
        """Hand `data` to TLS as one record, retrying on timeout; raise Stop on reset/EOF."""
        sock = self.sock
        assert sock is not None
        view = memoryview(data)
        off = 0
        # Bound: each pass writes something or waits POLL_S; the deadline ends it.
        for _ in range(1_000_000):
            if off >= len(view):
                break
            self._left()
            try:
                off += sock.send(view[off:])
            except TimeoutError:
                continue  # blocked by a full send buffer (a held flow): look at the clock again
            except (OSError, ssl.SSLError) as exc:
                raise self._ended(exc) from exc
        self.result.note_sent(data, wire_size)

    # modes --------------------------------------------------------------------------------

    def record_sizes(self, profile: profiles.Profile) -> list[tuple[float, int]]:
        """Profile items clamped to this connection's MSS (a 1,460-B item on a 1,448-B MSS path
        becomes one full segment, not a full one plus a 12-B runt); a profile of whole TLS
        records is written as it is (TLS caps a record at 16 KB of plaintext itself)."""
        if profile.records:
            return list(profile.items)
        out: list[tuple[float, int]] = []
        for t, size in profile.items:
            size = min(size, self.mss) if self.mss > self.overhead else size
            out.append((t, size))
        return out

    def upload(self, profile: profiles.Profile, rng: random.Random) -> None:
        sizes = self.record_sizes(profile)
        plain = [max(1, s - self.overhead) for _, s in sizes]
        total = sum(plain)
        if total < wire.HEADER_BYTES:
            plain[-1] += wire.HEADER_BYTES - total
            total = sum(plain)
        stream = wire.header(wire.UPLOAD, total - wire.HEADER_BYTES) + rng.randbytes(
            total - wire.HEADER_BYTES
        )
        entry: dict[str, Any] = {"profile": profile.name, "start": time.time(), "records": 0}
        self.result.uploads.append(entry)
        # --send-times: when each record's write returned (time.time()), for replays that
        # compare what the cloud received with what the speaker sent (hushsim/timeline.py)
        sent_at: list[float] | None = [] if getattr(self.args, "send_times", False) else None
        if sent_at is not None:
            entry["sent_at"] = sent_at
        t0 = time.monotonic()
        off = 0
        for (t, wire_size), n in zip(sizes, plain):
            wait = t0 + t - time.monotonic()
            if wait > 0:
                self.pump(wait)
            self.write(stream[off : off + n], wire_size)
            if sent_at is not None:
                sent_at.append(round(time.time(), 6))
            off += n
            entry["records"] += 1
            entry["plaintext_bytes"] = off
            entry["wire_bytes"] = entry.get("wire_bytes", 0) + wire_size
        entry["end"] = time.time()

    def rtt(self, rounds: int, size: int, interval_s: float) -> None:
        body = b"\x00" * max(0, size)
        latencies: list[float] = []
        for _ in range(rounds):
            t = time.perf_counter()
            self.write(wire.frame(wire.ECHO, body), len(body) + wire.HEADER_BYTES + self.overhead)
            self.pump(
                self._left(), until=lambda: any(f.kind == wire.ECHO_REPLY for f in self.frames)
            )
            self.frames = [f for f in self.frames if f.kind != wire.ECHO_REPLY]
            latencies.append((time.perf_counter() - t) * 1000)
            if interval_s > 0:
                self.pump(interval_s)
        self.result.extra["rtt_ms"] = {
            "n": len(latencies),
            "min": round(min(latencies), 3),
            "p50": round(_percentile(latencies, 50), 3),
            "p90": round(_percentile(latencies, 90), 3),
            "p99": round(_percentile(latencies, 99), 3),
            "max": round(max(latencies), 3),
            "mean": round(statistics.fmean(latencies), 3),
        }

    def download(self, count: int) -> None:
        t = time.perf_counter()
        before = self.reader.streamed_bytes
        self.write(
            wire.frame(wire.DOWNLOAD, wire.u64(count)), 8 + wire.HEADER_BYTES + self.overhead
        )
        self.pump(self._left(), until=lambda: any(f.kind == wire.DATA for f in self.frames))
        elapsed = time.perf_counter() - t
        got = self.reader.streamed_bytes - before
        self.result.extra["download"] = {
            "bytes": got,
            "seconds": round(elapsed, 6),
            "mbit_s": round(got * 8 / elapsed / 1e6, 1) if elapsed > 0 else None,
        }

    def close(self) -> None:
        if self.sock is None:
            return
        self.result.extra["tcp"] = _tcp_info(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass


def run_tls(args: argparse.Namespace, result: Result) -> None:
    sp = TlsSpeaker(args, result)
    rng = random.Random(args.seed)
    try:
        sp.connect()
        if args.ready_file:
            Path(args.ready_file).write_text(result.to_json())
        if args.mode in ("upload", "events"):
            # The long-lived connection that predates the guard: idle (reading) first.
            idle_end = time.monotonic() + args.idle
            if args.wait_file:
                for _ in range(1_000_000):
                    if Path(args.wait_file).exists() or time.monotonic() >= idle_end:
                        break
                    sp.pump(min(POLL_S, max(0.0, idle_end - time.monotonic())))
            else:
                sp.pump(args.idle)
            profile = profiles.resolve(args.profile, args.captures)
            if profile.transport != profiles.Transport.TCP:
                raise Stop("usage", f"profile {profile.name} is not TCP; use quic-upload")
            for k in range(args.count):
                if k:
                    sp.pump(args.gap)
                sp.upload(profile, rng)
            # Wait (briefly) for the last ack so the result says what the cloud confirmed.
            sp.pump(min(2.0, sp._left()), until=lambda: result.acks >= args.count)
        elif args.mode == "rtt":
            sp.rtt(args.rounds, args.size, args.interval)
        elif args.mode == "download":
            sp.download(args.bytes)
        if args.hold_open > 0:
            sp.pump(args.hold_open)
    except Stop as stop:
        # A reset or EOF is an outcome the test asserts on, not a failure of the simulator.
        if stop.reason not in ("reset", "eof"):
            result.error = stop.reason + (f": {stop.detail}" if stop.detail else "")
    except (OSError, ssl.SSLError) as exc:
        stop = sp._ended(exc) if sp.sock is not None else Stop("connect", str(exc))
        if stop.reason not in ("reset", "eof"):
            result.error = f"{stop.reason}: {stop.detail}"
    finally:
        sp.close()


# --- QUIC-shaped UDP ----------------------------------------------------------------------------


# QUIC loss recovery constants (RFC 9002): the initial RTT estimate is 333 ms, so the first probe
# timeout is ~1 s, doubling after each probe; the initial congestion window is 10 datagrams.
QUIC_PTO_S = 1.0
QUIC_INITIAL_WINDOW = 10
QUIC_MAX_WINDOW = 1000


class QuicSpeaker:
    """A QUIC-shaped UDP sender with QUIC's pacing by acknowledgement: it waits for the server's
    first flight before sending data, keeps at most `cwnd` unacknowledged datagrams in flight
    (slow start: the window grows by one per acknowledged datagram), and sends one probe per
    probe timeout when stalled. So, like a real Nest, a held flow stops after its first window
    instead of pushing the whole upload into the router's queue (design.md section 5). The
    cloud's replies carry the number of datagrams it has received (`cloud.py`)."""

    def __init__(self, args: argparse.Namespace, result: Result) -> None:
        self.args = args
        self.result = result
        self.deadline = time.monotonic() + args.max_seconds
        self.sock: socket.socket | None = None
        self.replies = 0
        self.acked = 0  # datagrams the cloud says it has received
        self.handshake_done = False
        self.probes = 0
        self.stalled_s = 0.0
        self.entry: dict[str, Any] = {}

    def _refused(self) -> Stop:
        self.result.refused, self.result.refused_at = True, time.time()
        return Stop("refused")

    def drain(self, wait_s: float, until: Callable[[], bool] | None = None) -> None:
        """Read replies for `wait_s` or until `until()`; raise Stop on an ICMP error."""
        sock = self.sock
        assert sock is not None
        end = time.monotonic() + max(0.0, wait_s)
        for _ in range(10_000_000):
            if until is not None and until():
                return
            left = min(end, self.deadline) - time.monotonic()
            readable, _, _ = select.select([sock], [], [], max(0.0, min(left, POLL_S)))
            if readable:
                try:
                    data = sock.recv(65535)
                except ConnectionRefusedError:
                    raise self._refused() from None
                except OSError as exc:
                    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES):
                        raise self._refused() from None
                    raise
                self.replies += 1
                self.result.bytes_received += len(data)
                if data[:1] and data[0] & 0x80:
                    self.handshake_done = True  # the server's Initial/Handshake flight
                elif len(data) >= 9:
                    self.acked = max(self.acked, struct.unpack("!Q", data[1:9])[0])
            elif left <= 0:
                break
        if time.monotonic() >= self.deadline:
            raise Stop("max-seconds")

    def send(self, datagram: bytes) -> None:
        sock = self.sock
        assert sock is not None
        for _ in range(100):
            try:
                sock.send(datagram)
                break
            except BlockingIOError:
                select.select([], [sock], [], POLL_S)
            except ConnectionRefusedError:
                raise self._refused() from None
        self.result.note_sent(datagram, len(datagram))
        self.entry["records"] = self.entry.get("records", 0) + 1

    def in_flight(self) -> int:
        return self.result.records - self.acked

    def cwnd(self) -> int:
        return min(QUIC_MAX_WINDOW, QUIC_INITIAL_WINDOW + self.acked)

    def run(self) -> None:
        args, res = self.args, self.result
        family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(args.family or 0, socket.AF_UNSPEC)
        target = args.addr or args.host
        rng = random.Random(args.seed)
        infos = socket.getaddrinfo(target, args.port, family, socket.SOCK_DGRAM)
        fam, _, _, _, sockaddr = infos[0]
        res.addr, res.family = sockaddr[0], 6 if fam == socket.AF_INET6 else 4
        self.sock = sock = socket.socket(fam, socket.SOCK_DGRAM)
        # A connected UDP socket gets ICMP errors back as ECONNREFUSED: how a denied QUIC flow
        # fails fast (design.md section 5, "QUIC deny").
        sock.connect(sockaddr)
        sock.setblocking(False)
        res.connected_at = time.time()
        res.local = f"{sock.getsockname()[0]}:{sock.getsockname()[1]}"
        profile = profiles.resolve(args.profile, args.captures)
        dcid, scid = rng.randbytes(8), rng.randbytes(8)
        filler = rng.randbytes(4096)
        self.entry = {"profile": profile.name, "start": time.time(), "records": 0}
        res.uploads.append(self.entry)
        # The handshake: Initial, then wait for the server's flight, re-sending on each PTO.
        pn = 0
        pto = QUIC_PTO_S
        t_hs = time.monotonic()
        for _ in range(64):
            self.send(quic.build_initial(args.host, dcid, scid, packet_number=pn))
            pn += 1
            self.drain(pto, until=lambda: self.handshake_done)
            if self.handshake_done:
                break
            pto *= 2
        res.handshake_s = round(time.monotonic() - t_hs, 6)
        t0 = time.monotonic()
        for t, size in profile.items:
            wait = t0 + t - time.monotonic()
            if wait > 0:
                self.drain(wait)
            if not args.blind and self.in_flight() >= self.cwnd():
                # Window full: wait for acknowledgements; on each PTO send one probe anyway.
                stalled = time.monotonic()
                pto = QUIC_PTO_S
                try:
                    for _ in range(64):
                        self.drain(pto, until=lambda: self.in_flight() < self.cwnd())
                        if self.in_flight() < self.cwnd():
                            break
                        self.probes += 1
                        self.send(quic.short_header_packet(scid, pn, size, filler[pn % 64 :]))
                        pn += 1
                        pto *= 2
                finally:
                    self.stalled_s += time.monotonic() - stalled
            self.send(quic.short_header_packet(scid, pn, size, filler[pn % 64 :]))
            pn += 1
        self.entry["end"] = time.time()
        # Wait (briefly) until the cloud acknowledged everything, as a real sender would.
        # (The cloud acknowledges every 2nd datagram: one may stay unacknowledged.)
        self.drain(min(1.0, args.max_seconds), until=lambda: self.in_flight() <= 1)
        if args.hold_open > 0:
            self.drain(args.hold_open)


def run_quic(args: argparse.Namespace, result: Result) -> None:
    sp = QuicSpeaker(args, result)
    try:
        sp.run()
    except Stop as stop:
        if stop.reason != "refused":
            result.error = stop.reason
    except OSError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.extra.update(
            replies=sp.replies,
            acked=sp.acked,
            probes=sp.probes,
            stalled_s=round(sp.stalled_s, 3),
        )
        if sp.sock is not None:
            sp.sock.close()


# --- CLI ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hushsim.speaker", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--host", required=True, help="vendor host name: SNI, DNS name, cert check")
    ap.add_argument("--addr", help="connect to this address instead of resolving --host")
    fam = ap.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="family", action="store_const", const=4, help="IPv4 only")
    fam.add_argument("-6", dest="family", action="store_const", const=6, help="IPv6 only")
    ap.add_argument("--port", type=int, default=443)
    ap.add_argument("--ca", help="CA bundle the cloud's certificates chain to (TLS modes)")
    ap.add_argument(
        "--tls",
        choices=("1.2", "1.3"),
        default="1.2",
        help="TLS version; 1.2 (default) gives the 29-B AES-GCM record overhead of the Echo",
    )
    ap.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    ap.add_argument("--seed", type=int, default=1, help="seed of the payload bytes")
    ap.add_argument("--captures", type=Path, default=None, help="captures folder (capture:...)")
    ap.add_argument(
        "--hold-open", type=float, default=0.0, help="keep the connection this long after"
    )
    ap.add_argument("--ready-file", help="write the connection details here once connected")
    ap.add_argument("--sni-hex", help="TLS modes: send these raw bytes (hex) as the SNI")
    ap.add_argument(
        "--keepalive", type=float, default=0.0, help="TLS modes: TCP keepalive every N s idle"
    )
    sub = ap.add_subparsers(dest="mode", required=True)
    for name, default_profile, default_count in (
        ("upload", "echo-opus-118", 1),
        ("events", "event-burst", 3),
    ):
        p = sub.add_parser(name, help=f"replay a profile ({default_profile})")
        p.add_argument("--profile", default=default_profile)
        p.add_argument("--idle", type=float, default=0.0, help="connected idle time before")
        p.add_argument("--wait-file", help="start once this file exists (at most --idle s)")
        p.add_argument("--count", type=int, default=default_count, help="uploads on this conn")
        p.add_argument("--gap", type=float, default=1.0, help="seconds between uploads")
        p.add_argument(
            "--send-times",
            action="store_true",
            help="report when each record was written (uploads[].sent_at, Unix seconds)",
        )
    p = sub.add_parser("rtt", help="N request/response rounds, prints latencies")
    p.add_argument("rounds", type=int)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--interval", type=float, default=0.0)
    p = sub.add_parser("download", help="bulk download, prints throughput")
    p.add_argument("bytes", type=int)
    p = sub.add_parser("quic-upload", help="QUIC-shaped UDP upload (Initial with SNI first)")
    p.add_argument("--profile", default="nest-quic")
    p.add_argument(
        "--blind", action="store_true", help="ignore acknowledgements (no congestion window)"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode in ("upload", "events"):
        if args.wait_file and args.idle <= 0:
            args.idle = args.max_seconds
        args.count = max(1, min(args.count, 1000))
    if args.mode != "quic-upload" and not args.ca:
        print("speaker: --ca is required for TLS modes", file=sys.stderr)
        return 2
    result = Result(mode=args.mode, host=args.host, port=args.port)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.mode == "quic-upload":
            run_quic(args, result)
        else:
            run_tls(args, result)
    except _Terminated:
        result.error = "terminated"
    except (LookupError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.ended_at = time.time()
    sys.stdout.write(result.to_json() + "\n")
    sys.stdout.flush()
    return 0 if result.error is None else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
