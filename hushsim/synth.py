"""Synthetic captures of a home network with smart speakers, for tests, demos and benchmarks.

Rules of this module: output is a pure function of the seed (the same bytes within one
environment: TCP ClientHellos come from the local OpenSSL, and their random fields, the session
id and the key shares, are overwritten with seeded bytes); every shape comes from the facts in
design.md section 7, never from a capture's bytes; the ground truth is recorded by the very code
that emits the packets, so it cannot drift from them. Nothing here touches the disk except the
`write_*` functions.

Times in the comments are seconds after `EPOCH`. Addresses are private LAN addresses for the
home and public-looking addresses for the cloud; none of this is live traffic.
"""

from __future__ import annotations

import argparse
import functools
import random
import socket
import ssl
import struct
from bisect import bisect_right, insort
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dpkt
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from guard.tools.capture import write_pcap

__all__ = [
    "ECHO",
    "EPOCH",
    "NEST",
    "QUIC_V1_INITIAL_SALT",
    "ROUTER",
    "QuicKeys",
    "Station",
    "generate_nest_quic",
    "generate_session",
    "nest_quic_truth",
    "quic_initial_keys",
    "session_activities",
    "session_labels",
    "session_truth",
    "write_nest_quic",
    "write_session",
]

EPOCH = 1_700_000_000.0  # first packet of every synthetic session (2023-11-14 22:13:20 UTC)
MSS_BYTES = 1460  # Ethernet MTU 1500 - 20 (IPv4) - 20 (TCP, no timestamps): design.md section 7
INITIAL_WINDOW_SEGMENTS = 10  # RFC 6928; design.md section 5 "about 10 segments after idle"
WAN_RTT_S = 0.040  # router <-> AVS front end; "realistic RTT ~40 ms"
GOOGLE_RTT_S = 0.018  # Google front ends are usually closer than AVS
LAN_RTT_S = 0.002  # router <-> speaker over Wi-Fi
DNS_DELAY_S = (0.008, 0.030)  # the router's dnsmasq forwarding to its upstream
QUIC_V1_INITIAL_SALT = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")  # RFC 9001 5.2


@dataclass(frozen=True, slots=True)
class Station:
    """A host as the router sees it: LAN hosts have a MAC, cloud hosts are behind the router."""

    name: str
    ip: str
    mac: str | None = None

    @property
    def raw_ip(self) -> bytes:
        return socket.inet_aton(self.ip)

    @property
    def raw_mac(self) -> bytes:
        return bytes.fromhex((self.mac or ROUTER.mac or "").replace(":", ""))


# The home. 68:db:f5 is an Amazon Technologies Inc. OUI (IEEE MA-L; an Echo Dot in
# smart-speakers-study carries it); 20:df:b9 is a Google, Inc. OUI (IEEE MA-L). The router and the
# laptop use locally administered addresses (bit 0x02 of the first octet), as modern laptops
# randomise theirs, so no vendor rule can mistake them for speakers.
ROUTER = Station("router", "192.168.1.1", "a2:5e:60:00:00:01")
ECHO = Station("kitchen-echo", "192.168.1.50", "68:db:f5:4a:19:07")
LAPTOP = Station("laptop", "192.168.1.20", "ae:3f:12:6b:90:d2")
NEST = Station("living-room-nest", "192.168.1.60", "20:df:b9:3c:51:0e")

# The cloud (addresses chosen for this simulation, in the providers' public ranges).
AVS = Station("bob-dispatch-prod-na.amazon.com", "52.94.236.248")
METRICS = Station("device-metrics-us.amazon.com", "54.239.19.200")
UNAGI = Station("unagi-na.amazon.com", "54.239.29.14")
ALEXA_API = Station("api.amazonalexa.com", "13.33.126.40")
ALEXA_API_EDGE = "d1x7k3hq2m5n8p.cloudfront.net"  # the end of the CNAME chain
COMMS = Station("alexa-comms-mobile-service.amazon.com", "52.119.196.77")
CONNCHECK = Station("d3p8zr0ffa9t17.cloudfront.net", "13.33.164.120")
CONNCHECK_2 = "13.33.164.121"
RELAY = Station("turn-relay", "3.226.88.19")  # the Drop-In STUN/TURN relay (no DNS name here)
WIKIPEDIA = Station("www.wikipedia.org", "208.80.154.224")
PHOTOS = Station("photos.example.net", "203.0.113.20")
ASSISTANT = Station("embeddedassistant.googleapis.com", "142.250.72.106")
FOYER = Station("googlehomefoyer-pa.googleapis.com", "142.250.72.138")

_PUBLIC_ADDRESS = "198.51.100.7"  # the router's WAN address, as a STUN server reports it


# ---------------------------------------------------------------------------------------------
# Wire encoding: Ethernet, IPv4, TCP, UDP with valid checksums.


def _ipv4(src: bytes, dst: bytes, proto: int, l4: bytes, ident: int, ttl: int) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident & 0xFFFF, 0x4000, ttl, proto, 0, src, dst
    )
    return hdr[:10] + struct.pack("!H", dpkt.in_cksum(hdr)) + hdr[12:] + l4


def _l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    return dpkt.in_cksum(struct.pack("!4s4sBBH", src, dst, 0, proto, len(segment)) + segment)


def _tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: bytes,
    options: bytes = b"",
) -> bytes:
    off = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0)
    seg = hdr + options + payload
    csum = _l4_checksum(src, dst, 6, seg)
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


def _udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = _l4_checksum(src, dst, 17, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
# MSS 1460, SACK permitted, NOP, window scale 7, NOP, NOP; no timestamps, so MSS payloads are 1460.
_SYN_OPTIONS = bytes.fromhex("020405b40402010303070101")


# ---------------------------------------------------------------------------------------------
# TLS bytes.


@functools.cache
def _tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])  # AVS is HTTP/2 over TLS
    return ctx


@functools.lru_cache(maxsize=64)
def _openssl_client_hello(host: str) -> bytes:
    """The first flight OpenSSL sends for `host`: a real ClientHello record (memory only)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _tls_context().wrap_bio(incoming, outgoing, server_hostname=host)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def tls_client_hello(host: str, rng: random.Random) -> bytes:
    """A real OpenSSL ClientHello for `host` whose random, session id and key shares are replaced
    by bytes from `rng`, so that a seed gives the same capture every time."""
    out = bytearray(_openssl_client_hello(host))
    if out[0] != 22 or out[5] != 1:  # a TLS handshake record holding a ClientHello
        raise RuntimeError("OpenSSL's first flight is not a ClientHello")
    p = 5 + 4 + 2  # record header, handshake header, legacy_version
    out[p : p + 32] = rng.randbytes(32)
    p += 32
    sid_len = out[p]
    out[p + 1 : p + 1 + sid_len] = rng.randbytes(sid_len)
    p += 1 + sid_len
    p += 2 + int.from_bytes(out[p : p + 2], "big")  # cipher suites
    p += 1 + out[p]  # compression methods
    end = p + 2 + int.from_bytes(out[p : p + 2], "big")
    p += 2
    while p + 4 <= end:
        ext_type, ext_len = struct.unpack_from("!HH", out, p)
        body = p + 4
        if ext_type == 51:  # key_share: client_shares<2> of (group, key_exchange<2>)
            q = body + 2
            while q + 4 <= body + ext_len:
                key_len = int.from_bytes(out[q + 2 : q + 4], "big")
                out[q + 4 : q + 4 + key_len] = rng.randbytes(key_len)
                q += 4 + key_len
        p = body + ext_len
    return bytes(out)


def _record(rng: random.Random, total_bytes: int, content_type: int = 23) -> bytes:
    """One TLS record of exactly `total_bytes` on the wire (header included), opaque body."""
    body = max(total_bytes - 5, 1)
    return struct.pack("!BHH", content_type, 0x0303, body) + rng.randbytes(body)


def _records(rng: random.Random, total_bytes: int, max_record_bytes: int = 16_406) -> bytes:
    """A run of application-data records of exactly `total_bytes` (16,384 B of plaintext plus
    type byte and 16-B tag is the largest TLS 1.3 record)."""
    out = []
    left = total_bytes
    while left > 0:
        n = min(left, max_record_bytes)
        if 0 < left - n < 22:  # keep the last record a plausible size
            n = left - 22
        out.append(_record(rng, n))
        left -= n
    return b"".join(out)


def _server_flight(rng: random.Random, client_hello: bytes) -> bytes:
    """ServerHello (plain), ChangeCipherSpec, then the encrypted rest of the server's flight
    (EncryptedExtensions, certificate chain, CertificateVerify, Finished): 2.5-4.5 KB."""
    sid_len = client_hello[43]
    sid = client_hello[44 : 44 + sid_len]
    exts = struct.pack("!HHH", 43, 2, 0x0304) + struct.pack("!HHHH", 51, 36, 0x001D, 32)
    exts += rng.randbytes(32)
    body = struct.pack("!H", 0x0303) + rng.randbytes(32) + bytes([sid_len]) + sid
    body += struct.pack("!HBH", 0x1301, 0, len(exts)) + exts
    hello = b"\x02" + len(body).to_bytes(3, "big") + body
    flight = struct.pack("!BHH", 22, 0x0303, len(hello)) + hello
    flight += bytes.fromhex("140303000101")
    return flight + _records(rng, rng.randint(2_500, 4_500))


# ---------------------------------------------------------------------------------------------
# The world: a list of frames with a clock, and TCP connections with consistent sequence numbers.


@dataclass(frozen=True, slots=True)
class Sent:
    """What one write put on the wire."""

    first: float  # router time of the first segment, seconds after EPOCH
    last: float
    bytes: int  # L4 payload
    packets: int


class _World:
    """Frames are scripted in any order and built when `frames()` is called: IP identifiers
    then count up in time order, and TCP acknowledgement numbers can depend on data scripted
    after the ACK itself (events on one connection overlap)."""

    def __init__(self, seed: int, epoch: float = EPOCH) -> None:
        self.rng = random.Random(seed)
        self._epoch_us = round(epoch * 1e6)
        # (time in us, order, src, dst, proto, L4 bytes or a function building the TCP segment)
        self._frames: list[tuple[int, int, Station, Station, int, bytes | _Segment]] = []
        self._ports: dict[str, int] = {}
        self._ident_base: dict[str, int] = {}
        self.activities: list[dict] = []

    # Time: relative seconds in, whole microseconds on the wire (what a pcap stores).
    def us(self, t: float) -> int:
        return self._epoch_us + round(t * 1e6)

    def ts(self, t: float) -> float:
        return self.us(t) / 1e6

    def frames(self) -> list[tuple[float, bytes]]:
        """The frames in time order. A scripted pure ACK that acknowledges nothing new (the
        receiver's own data already carried that ACK) is dropped: TCP would not send it."""
        self._frames.sort(key=lambda f: (f[0], f[1]))
        ident = dict(self._ident_base)
        acked: dict[tuple[int, bool], int] = {}
        out = []
        for us, _, src, dst, proto, l4 in self._frames:
            if not isinstance(l4, bytes):
                key, ack, pure = l4.conn_side, l4.ack(), l4.pure
                prev = acked.get(key)
                if pure and prev is not None and ack <= prev:
                    continue
                acked[key] = ack if prev is None else max(prev, ack)
                l4 = l4.build(ack)
            if src.ip not in ident:
                ident[src.ip] = self._ident_base.setdefault(src.ip, self.rng.getrandbits(16))
            ident[src.ip] += 1
            ttl = 64 if src.mac else 52  # cloud packets arrive after a dozen hops
            ip = _ipv4(src.raw_ip, dst.raw_ip, proto, l4, ident[src.ip], ttl)
            out.append((us / 1e6, dst.raw_mac + src.raw_mac + b"\x08\x00" + ip))
        return out

    def send_ip(
        self, t: float, src: Station, dst: Station, proto: int, l4: bytes | _Segment
    ) -> None:
        if src.ip not in self._ident_base:
            self._ident_base[src.ip] = self.rng.getrandbits(16)
        self._frames.append((self.us(t), len(self._frames), src, dst, proto, l4))

    def port(self, station: Station) -> int:
        if station.ip not in self._ports:
            self._ports[station.ip] = self.rng.randrange(33_000, 52_000)
        self._ports[station.ip] += self.rng.randint(1, 9)
        return self._ports[station.ip]

    def send_udp(
        self, t: float, src: Station, sport: int, dst: Station, dport: int, payload: bytes
    ) -> None:
        self.send_ip(t, src, dst, 17, _udp(src.raw_ip, dst.raw_ip, sport, dport, payload))

    def note(
        self,
        kind: str,
        device: Station,
        remote: Station,
        rport: int,
        t0: float,
        t1: float,
        bytes_up: int,
        bytes_down: int,
        **extra: object,
    ) -> None:
        self.activities.append(
            {
                "kind": kind,
                "device": device.ip,
                "remote": f"{remote.ip}:{rport}",
                "host": None if remote.name in ("turn-relay",) else remote.name,
                "start": self.ts(t0),
                "end": self.ts(t1),
                "bytes_up": bytes_up,
                "bytes_down": bytes_down,
                **extra,
            }
        )

    # DNS through the router's resolver.
    def dns(
        self, t: float, client: Station, name: str, answers: Sequence[tuple[str, str, str, int]]
    ) -> float:
        """Query `name` (type A) at t; `answers` are (owner, "A"|"CNAME", value, ttl).
        Returns the time the answer reaches the router's LAN side."""
        qid = self.rng.getrandbits(16)
        sport = self.port(client)
        q = dpkt.dns.DNS(
            id=qid,
            op=dpkt.dns.DNS_RD,
            qd=[dpkt.dns.DNS.Q(name=name, type=dpkt.dns.DNS_A, cls=dpkt.dns.DNS_IN)],
        )
        self.send_udp(t, client, sport, ROUTER, 53, bytes(q))
        r = dpkt.dns.DNS(id=qid, op=dpkt.dns.DNS_QR | dpkt.dns.DNS_RD | dpkt.dns.DNS_RA, qd=q.qd)
        rrs = []
        for owner, rtype, value, ttl in answers:
            if rtype == "A":
                rr = dpkt.dns.DNS.RR(
                    name=owner,
                    type=dpkt.dns.DNS_A,
                    cls=dpkt.dns.DNS_IN,
                    ttl=ttl,
                    ip=socket.inet_aton(value),
                )
            else:
                rr = dpkt.dns.DNS.RR(
                    name=owner, type=dpkt.dns.DNS_CNAME, cls=dpkt.dns.DNS_IN, ttl=ttl
                )
                rr.cname = value
            rrs.append(rr)
        r.an = rrs
        t_answer = t + self.rng.uniform(*DNS_DELAY_S)
        self.send_udp(t_answer, ROUTER, 53, client, sport, bytes(r))
        return t_answer

    def tls_connect(
        self,
        t: float,
        client: Station,
        server: Station,
        host: str | None = None,
        rtt_s: float = WAN_RTT_S,
    ) -> tuple[_Tcp, float]:
        """TCP handshake, a real ClientHello with SNI, the server's flight, the client's
        Finished. Returns the connection and the time the client may send application data."""
        conn = _Tcp(self, client, server, self.port(client), 443, rtt_s)
        t = conn.open(t)
        hello = tls_client_hello(host or server.name, self.rng)
        sent = conn.write(t + 0.001, hello)
        sent = conn.write(
            sent.last + rtt_s + self.rng.uniform(0.004, 0.012),
            _server_flight(self.rng, hello),
            from_client=False,
        )
        finished = bytes.fromhex("140303000101") + _record(self.rng, 74)
        sent = conn.write(sent.last + LAN_RTT_S + 0.004, finished)
        return conn, sent.last + 0.002


class _Tcp:
    """One TCP connection seen at the router. Data written per direction must be written in
    time order; acknowledgement numbers are computed from what each end can have received by
    then (the server sees the router's packets rtt/2 later, the device LAN_RTT_S/2 later)."""

    def __init__(
        self, world: _World, client: Station, server: Station, sport: int, dport: int, rtt_s: float
    ) -> None:
        self.w = world
        self.client, self.server = client, server
        self.sport, self.dport = sport, dport
        self.rtt_s = rtt_s
        self._isn = {True: world.rng.getrandbits(32), False: world.rng.getrandbits(32)}
        self._next = {side: isn + 1 for side, isn in self._isn.items()}
        # per side: sorted (router time in us, sequence number after this data)
        self._sent: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        self.bytes = {True: 0, False: 0}

    def _delay(self, from_client: bool) -> float:
        """How long after a packet passes the router the other end's reaction passes it."""
        return self.rtt_s if from_client else LAN_RTT_S

    def _seq_at(self, side: bool, t_us: int) -> int:
        hist = self._sent[side]
        i = bisect_right(hist, (t_us, 1 << 40))
        return hist[i - 1][1] if i else self._isn[side] + 1

    def _emit(
        self,
        t: float,
        from_client: bool,
        flags: int,
        payload: bytes = b"",
        options: bytes = b"",
        seq: int | None = None,
        ack: int | None = None,
    ) -> None:
        t_us = self.w.us(t)
        if payload:
            hist = self._sent[from_client]
            if hist and hist[-1][0] > t_us:  # a bug in a scenario, not a property of the data
                raise RuntimeError("data of one direction must be written in time order")
            seq = self._next[from_client]
            self._next[from_client] += len(payload)
            self.bytes[from_client] += len(payload)
            insort(hist, (t_us, self._next[from_client]))
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        self.w.send_ip(
            t, src, dst, 6, _Segment(self, from_client, t_us, flags, payload, options, seq, ack)
        )

    def open(self, t: float) -> float:
        c, s = self._isn[True], self._isn[False]
        self._emit(t, True, TCP_SYN, options=_SYN_OPTIONS, seq=c, ack=0)
        t_synack = t + self.rtt_s
        self._emit(t_synack, False, TCP_SYN | TCP_ACK, options=_SYN_OPTIONS, seq=s, ack=c + 1)
        t_ack = t_synack + LAN_RTT_S
        self._emit(t_ack, True, TCP_ACK, seq=c + 1, ack=s + 1)
        return t_ack

    def send_at(
        self,
        times: Sequence[float],
        chunks: Sequence[bytes],
        from_client: bool = True,
        push_each: bool = False,
    ) -> Sent:
        """Each chunk is one segment at its time (PSH on the last, or on each when every chunk
        is its own write); the receiver ACKs every second segment and, after a delayed-ACK
        pause, the last odd one."""
        delay = self._delay(from_client)
        for i, (t, chunk) in enumerate(zip(times, chunks, strict=True)):
            last = i == len(chunks) - 1
            self._emit(t, from_client, TCP_ACK | (TCP_PSH if last or push_each else 0), chunk)
            if i % 2 == 1:
                self._emit(t + delay, not from_client, TCP_ACK)
            elif last:
                self._emit(t + delay + 0.020, not from_client, TCP_ACK)
        return Sent(times[0], times[-1], sum(map(len, chunks)), len(chunks))

    def write(
        self,
        t: float,
        data: bytes,
        from_client: bool = True,
        gap_s: float | None = None,
        window_segments: int = INITIAL_WINDOW_SEGMENTS,
    ) -> Sent:
        """Send `data` as MSS segments from t, paced `gap_s` apart and limited by slow start
        (the window doubles each round trip)."""
        if gap_s is None:
            gap_s = 0.0008 if from_client else 0.0004
        chunks = [data[i : i + MSS_BYTES] for i in range(0, len(data), MSS_BYTES)]
        times: list[float] = []
        round_start, in_round, window, now = t, 0, window_segments, t
        for _ in chunks:
            if in_round == window:
                round_start = max(now, round_start + self.rtt_s)
                now, in_round, window = round_start, 0, window * 2
            times.append(now)
            now += gap_s
            in_round += 1
        return self.send_at(times, chunks, from_client)

    def close(self, t: float, from_client: bool = True) -> float:
        self._emit(t, from_client, TCP_FIN | TCP_ACK, seq=self._next[from_client])
        self._next[from_client] += 1
        insort(self._sent[from_client], (self.w.us(t), self._next[from_client]))
        t_peer = t + self._delay(from_client)
        self._emit(t_peer, not from_client, TCP_FIN | TCP_ACK, seq=self._next[not from_client])
        self._next[not from_client] += 1
        insort(self._sent[not from_client], (self.w.us(t_peer), self._next[not from_client]))
        t_last = t_peer + self._delay(not from_client)
        self._emit(t_last, from_client, TCP_ACK)
        return t_last


class _Segment:
    """A TCP segment whose acknowledgement number (and, for a pure ACK, sequence number) is
    worked out when the capture is assembled, from everything scripted on its connection."""

    __slots__ = ("ack_fixed", "conn", "flags", "from_client", "options", "payload", "seq", "t_us")

    def __init__(
        self,
        conn: _Tcp,
        from_client: bool,
        t_us: int,
        flags: int,
        payload: bytes,
        options: bytes,
        seq: int | None,
        ack_fixed: int | None,
    ) -> None:
        self.conn, self.from_client, self.t_us = conn, from_client, t_us
        self.flags, self.payload, self.options = flags, payload, options
        self.seq, self.ack_fixed = seq, ack_fixed

    @property
    def conn_side(self) -> tuple[int, bool]:
        return id(self.conn), self.from_client

    @property
    def pure(self) -> bool:
        return self.flags == TCP_ACK and not self.payload

    def ack(self) -> int:
        if self.ack_fixed is not None:
            return self.ack_fixed
        # What this end has received: the peer's data that passed the router early enough.
        c = self.conn
        cutoff = self.t_us - round(c._delay(not self.from_client) * 1e6) + 5
        return c._seq_at(not self.from_client, cutoff)

    def build(self, ack: int) -> bytes:
        c = self.conn
        seq = self.seq if self.seq is not None else c._seq_at(self.from_client, self.t_us)
        src, dst = (c.client, c.server) if self.from_client else (c.server, c.client)
        sport, dport = (c.sport, c.dport) if self.from_client else (c.dport, c.sport)
        window = 2_053 if self.from_client else 1_040  # scaled by 2**7 on both ends
        return _tcp(
            src.raw_ip,
            dst.raw_ip,
            sport,
            dport,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            self.flags,
            window,
            self.payload,
            self.options,
        )


# ---------------------------------------------------------------------------------------------
# The Echo session.


def _echo_event(w: _World, conn: _Tcp, t: float, total_bytes: int) -> Sent:
    """An AVS event (SpeechStarted, SynchronizeState, a smart-home report): a few records sent
    back to back, the cloud's short HTTP/2 response, then silence (2-6 KB: design.md 7)."""
    weights = [w.rng.uniform(0.5, 1.5) for _ in range(w.rng.randint(2, 4))]
    sizes = [int(total_bytes * x / sum(weights)) for x in weights]
    sizes[-1] = total_bytes - sum(sizes[:-1])
    first = t
    for size in sizes:
        sent = conn.write(t, _record(w.rng, size))
        t = sent.last + w.rng.uniform(0.002, 0.020)
    conn.write(
        sent.last + conn.rtt_s + 0.015, _record(w.rng, w.rng.randint(60, 140)), from_client=False
    )
    return Sent(first, sent.last, total_bytes, 0)


def _voice_upload(
    w: _World,
    conn: _Tcp,
    t: float,
    *,
    burst_bytes: int,
    record_bytes: int,
    rate_hz: float,
    duration_s: float,
) -> Sent:
    """Echo (2018, Opus CBR) upload, design.md 7: a start burst of MSS segments within 0.3 s
    (500 ms pre-roll + wake word, sent as fast as the initial window allows), then one
    constant-size record per Opus packet group at `rate_hz` until the cloud's StopCapture."""
    data = _records(w.rng, burst_bytes)
    n_burst = -(-burst_bytes // MSS_BYTES)
    gap = w.rng.uniform(0.06, 0.25) / max(n_burst - 1, 1)
    burst = conn.write(t, data, gap_s=gap)
    assert burst.last - burst.first < 0.3
    n_records = round(duration_s * rate_hz)
    times = [
        burst.last + k / rate_hz + w.rng.uniform(-0.0015, 0.0015) for k in range(1, n_records + 1)
    ]
    chunks = [_record(w.rng, record_bytes) for _ in times]
    # The cloud's StopCapture directive crosses the router just before the last record.
    conn.write(times[-1] - 0.004, _record(w.rng, w.rng.randint(180, 260)), from_client=False)
    recs = conn.send_at(times, chunks, push_each=True)
    return Sent(burst.first, recs.last, burst.bytes + recs.bytes, burst.packets + recs.packets)


def _interaction(
    w: _World,
    conn: _Tcp,
    t: float,
    *,
    utterance: str,
    turn: int,
    record_bytes: int,
    rate_hz: float,
    duration_s: float,
    tts_bytes: int,
    truth: list[dict],
) -> tuple[Sent, Sent, float]:
    """One voice turn: upload, the spoken reply (TTS) downstream, SpeechStarted and
    SpeechFinished events. Returns (upload, tts, playback end)."""
    burst_bytes = w.rng.randint(8_000, 28_000)
    up = _voice_upload(
        w,
        conn,
        t,
        burst_bytes=burst_bytes,
        record_bytes=record_bytes,
        rate_hz=rate_hz,
        duration_s=duration_s,
    )
    truth.append(
        {
            "device": ECHO.ip,
            "mac": ECHO.mac,
            "remote": f"{AVS.ip}:443",
            "host": AVS.name,
            "category": "voice",
            "start": w.ts(up.first),
            "end": w.ts(up.last),
            "bytes": up.bytes,
            "packets": up.packets,
            "record_bytes": record_bytes,
            "rate_hz": rate_hz,
            "burst_bytes": burst_bytes,
            "turn": turn,
            "utterance": utterance,
        }
    )
    w.note("voice-upload", ECHO, AVS, 443, up.first, up.last, up.bytes, 0, turn=turn)
    # The reply: a Speak directive then MP3 audio, after the cloud's processing time.
    t_tts = up.last + w.rng.uniform(0.45, 0.8)
    tts = conn.write(t_tts, _records(w.rng, tts_bytes), from_client=False)
    w.note("tts-response", ECHO, AVS, 443, tts.first, tts.last, 0, tts.bytes)
    started = _echo_event(
        w, conn, tts.first + w.rng.uniform(0.25, 0.35), w.rng.randint(2_000, 3_500)
    )
    w.note(
        "event", ECHO, AVS, 443, started.first, started.last, started.bytes, 0, what="SpeechStarted"
    )
    playback_end = tts.first + min(8.0, tts_bytes / 8_000)  # ~64 kbit/s MP3
    return up, tts, playback_end


def _speech_finished(w: _World, conn: _Tcp, t: float) -> None:
    ev = _echo_event(w, conn, t, w.rng.randint(2_000, 3_500))
    w.note("event", ECHO, AVS, 443, ev.first, ev.last, ev.bytes, 0, what="SpeechFinished")


def _ping(w: _World, conn: _Tcp, t: float) -> None:
    """HTTP/2 PING on the AVS connection (AVS asks for one at least every 5 minutes; we ping each
    minute so short runs see some): 39-B records, 5 header + 9 frame + 8 data + 1 + 16 tag."""
    t = t + w.rng.uniform(-0.5, 0.5)
    conn.send_at([t], [_record(w.rng, 39)])
    conn.send_at([t + conn.rtt_s + 0.001], [_record(w.rng, 39)], from_client=False)
    w.note("keepalive", ECHO, AVS, 443, t, t, 39, 39)


def _short_exchange(
    w: _World,
    t: float,
    station: Station,
    host: str,
    kind: str,
    up_bytes: int,
    down_bytes: int,
    close_after_s: float = 1.5,
    dns: Sequence[tuple[str, str, str, int]] | None = None,
    client: Station = ECHO,
) -> tuple[_Tcp, float]:
    """DNS, TLS, one request and its response, close."""
    if dns is not None:
        t = w.dns(t, client, host, dns) + 0.003
    conn, t = w.tls_connect(t, client, station, host)
    req = conn.write(t, _records(w.rng, up_bytes))
    resp = conn.write(
        req.last + conn.rtt_s + w.rng.uniform(0.01, 0.08),
        _records(w.rng, down_bytes),
        from_client=False,
    )
    end = conn.close(resp.last + close_after_s)
    w.note(kind, client, station, 443, req.first, resp.last, req.bytes, resp.bytes)
    return conn, end


def _telemetry(w: _World, t: float) -> float:
    """device-metrics-us: 22-100 KB of MSS segments in well under 0.3 s on a fresh connection,
    a short reply, close (design.md 7)."""
    t = w.dns(t, ECHO, METRICS.name, [(METRICS.name, "A", METRICS.ip, w.rng.randint(30, 60))])
    conn, t = w.tls_connect(t + 0.003, ECHO, METRICS)
    burst = conn.write(t, _records(w.rng, w.rng.randint(22_000, 100_000)), gap_s=0.0006)
    assert burst.last - burst.first < 0.3
    resp = conn.write(
        burst.last + conn.rtt_s + 0.03, _record(w.rng, w.rng.randint(200, 400)), from_client=False
    )
    w.note("telemetry", ECHO, METRICS, 443, burst.first, burst.last, burst.bytes, resp.bytes)
    return conn.close(resp.last + w.rng.uniform(1.0, 2.0))


def _unagi(w: _World, t: float) -> float:
    """unagi-na: 6-9 KB over ~1 s, symmetric (design.md 7): request/response pairs."""
    t = w.dns(t, ECHO, UNAGI.name, [(UNAGI.name, "A", UNAGI.ip, w.rng.randint(20, 50))])
    conn, t = w.tls_connect(t + 0.003, ECHO, UNAGI)
    total = w.rng.randint(6_000, 9_000)
    n = 5
    first, up_bytes, down_bytes = t, 0, 0
    for i in range(n):
        size = total // n + (total % n if i == 0 else 0)
        up = conn.write(t, _records(w.rng, size))
        down = conn.write(
            up.last + conn.rtt_s + 0.01,
            _records(w.rng, size + w.rng.randint(-300, 300)),
            from_client=False,
        )
        up_bytes += up.bytes
        down_bytes += down.bytes
        t = first + (i + 1) * 0.22
    w.note("telemetry", ECHO, UNAGI, 443, first, down.last, up_bytes, down_bytes)
    return conn.close(down.last + 1.0)


def _dropin(w: _World, t: float, duration_s: float) -> float:
    """A Drop-In call: STUN binding (RFC 5389, magic cookie 0x2112A442), a DTLS handshake, then
    two-way constant-rate SRTP (Opus, 20-ms packets) on the same 5-tuple (design.md 7)."""
    rng = w.rng
    port, rport = rng.randrange(50_000, 60_000), 3478
    txid = rng.randbytes(12)
    stun_at = t
    w.send_udp(t, ECHO, port, RELAY, rport, struct.pack("!HHI", 0x0001, 0, 0x2112A442) + txid)
    xport = rng.randrange(20_000, 60_000) ^ 0x2112
    xaddr = int.from_bytes(socket.inet_aton(_PUBLIC_ADDRESS), "big") ^ 0x2112A442
    attr = struct.pack("!HHBBHI", 0x0020, 8, 0, 1, xport, xaddr)  # XOR-MAPPED-ADDRESS
    t_resp = t + WAN_RTT_S
    w.send_udp(
        t_resp,
        RELAY,
        rport,
        ECHO,
        port,
        struct.pack("!HHI", 0x0101, len(attr), 0x2112A442) + txid + attr,
    )
    up_bytes, down_bytes = 20, 20 + len(attr)

    def dtls(seq: int, size: int) -> bytes:  # DTLS 1.2 handshake record, epoch 0
        return (
            struct.pack("!BHH", 22, 0xFEFD, 0)
            + seq.to_bytes(6, "big")
            + struct.pack("!H", size - 13)
            + rng.randbytes(size - 13)
        )

    t = t_resp + 0.01
    for i, (frm_echo, size) in enumerate([(True, 190), (False, 1_120), (True, 560), (False, 120)]):
        src, sp, dst, dp = (ECHO, port, RELAY, rport) if frm_echo else (RELAY, rport, ECHO, port)
        w.send_udp(t, src, sp, dst, dp, dtls(i, size))
        if frm_echo:
            up_bytes += size
        else:
            down_bytes += size
        t += WAN_RTT_S if frm_echo else 0.004
    ssrc = {True: rng.getrandbits(32), False: rng.getrandbits(32)}
    seq = {True: rng.getrandbits(16), False: rng.getrandbits(16)}
    for k in range(round(duration_s / 0.020)):
        for frm_echo, offset in ((True, 0.0), (False, 0.007)):
            ts_k = t + k * 0.020 + offset + rng.uniform(-0.002, 0.002)
            body = rng.randbytes(rng.randint(95, 125) + 10)  # Opus ~32-48 kbit/s + SRTP tag
            rtp = (
                struct.pack(
                    "!BBHII",
                    0x80,
                    111,
                    (seq[frm_echo] + k) & 0xFFFF,
                    (k * 960) & 0xFFFFFFFF,
                    ssrc[frm_echo],
                )
                + body
            )
            if frm_echo:
                w.send_udp(ts_k, ECHO, port, RELAY, rport, rtp)
                up_bytes += len(rtp)
            else:
                w.send_udp(ts_k, RELAY, rport, ECHO, port, rtp)
                down_bytes += len(rtp)
    end = t + duration_s
    w.note("dropin", ECHO, RELAY, rport, stun_at, end, up_bytes, down_bytes, category="messaging")
    return end


def _echo_session(seed: int) -> tuple[list[tuple[float, bytes]], list[dict], list[dict]]:
    w = _World(seed)
    rng = w.rng
    truth: list[dict] = []
    ping_times = [30, 90, 150, 210, 270, 360, 450, 510, 570, 600]

    # 0 s: connectivity check (polled every 5 minutes), the AVS connection comes up.
    conncheck_dns = [
        (CONNCHECK.name, "A", CONNCHECK.ip, 60),
        (CONNCHECK.name, "A", CONNCHECK_2, 60),
    ]
    _short_exchange(
        w,
        0.0,
        CONNCHECK,
        CONNCHECK.name,
        "connectivity",
        rng.randint(300, 420),
        rng.randint(500, 700),
        dns=conncheck_dns,
    )
    t = w.dns(1.0, ECHO, AVS.name, [(AVS.name, "A", AVS.ip, rng.randint(40, 60))])
    avs, t = w.tls_connect(t + 0.003, ECHO, AVS)
    # HTTP/2 preface + SETTINGS, then the downchannel GET; the cloud's SETTINGS and headers.
    sent = avs.write(t, _records(rng, rng.randint(110, 140)))
    sent = avs.write(sent.last + 0.01, _records(rng, rng.randint(400, 520)))
    avs.write(sent.last + avs.rtt_s, _records(rng, rng.randint(150, 260)), from_client=False)
    ev = _echo_event(w, avs, sent.last + 0.4, rng.randint(3_000, 6_000))
    w.note("event", ECHO, AVS, 443, ev.first, ev.last, ev.bytes, 0, what="SynchronizeState")

    # 3 s: smart-home capability report; the DNS answer is a CNAME chain.
    api_dns = [
        (ALEXA_API.name, "CNAME", f"{ALEXA_API.name}.cdn.amazon.com", 1_200),
        (f"{ALEXA_API.name}.cdn.amazon.com", "CNAME", ALEXA_API_EDGE, 50),
        (ALEXA_API_EDGE, "A", ALEXA_API.ip, 59),
    ]
    _short_exchange(
        w,
        3.0,
        ALEXA_API,
        ALEXA_API.name,
        "smart-home",
        rng.randint(2_400, 3_200),
        rng.randint(800, 1_500),
        dns=api_dns,
    )
    _unagi(w, 8.0)
    _telemetry(w, 20.0)
    _ping(w, avs, ping_times[0])

    # 45 s: "what's the weather" (118-B records at ~55/s).
    up1, _, play_end = _interaction(
        w,
        avs,
        45.0,
        utterance="what's the weather",
        turn=1,
        record_bytes=118,
        rate_hz=rng.uniform(52, 59),
        duration_s=rng.uniform(1.6, 2.9),
        tts_bytes=rng.randint(50_000, 80_000),
        truth=truth,
    )
    _speech_finished(w, avs, play_end)
    # ~9 KB on the voice connection 13-20 s after a query (a look-alike, design.md 7).
    report = avs.write(
        up1.first + rng.uniform(15.0, 17.0), _records(rng, rng.randint(8_500, 9_500))
    )
    w.note("post-query-report", ECHO, AVS, 443, report.first, report.last, report.bytes, 0)
    _ping(w, avs, ping_times[1])
    _telemetry(w, 100.0)

    # 130 s: "set volume to five" (437-B records at ~25/s, the other Echo framing).
    _, _, play_end = _interaction(
        w,
        avs,
        130.0,
        utterance="set volume to five",
        turn=1,
        record_bytes=437,
        rate_hz=rng.uniform(22, 27),
        duration_s=rng.uniform(2.0, 3.4),
        tts_bytes=rng.randint(20_000, 26_000),
        truth=truth,
    )
    _speech_finished(w, avs, play_end)
    _ping(w, avs, ping_times[2])

    # 180 s: volume slider in the app: a SetVolume directive, then 13.5 KB of VolumeChanged
    # events over 0.8 s (design.md 7).
    t = 180.0
    avs.write(t, _record(rng, rng.randint(300, 420)), from_client=False)
    volume = [
        avs.write(t + 0.05 + k * 0.1 + rng.uniform(-0.004, 0.004), _record(rng, 1_500))
        for k in range(9)
    ]
    w.note("volume-change", ECHO, AVS, 443, volume[0].first, volume[-1].last, 9 * 1_500, 0)

    # 200 s: the laptop reads Wikipedia and uploads photos (not a speaker: never inspected).
    _short_exchange(
        w,
        200.0,
        WIKIPEDIA,
        WIKIPEDIA.name,
        "laptop-browse",
        rng.randint(900, 1_400),
        rng.randint(55_000, 65_000),
        client=LAPTOP,
        dns=[(WIKIPEDIA.name, "A", WIKIPEDIA.ip, 600)],
    )
    _short_exchange(
        w,
        205.0,
        PHOTOS,
        PHOTOS.name,
        "laptop-upload",
        rng.randint(380_000, 420_000),
        rng.randint(400, 800),
        client=LAPTOP,
        dns=[(PHOTOS.name, "A", PHOTOS.ip, 300)],
    )
    _ping(w, avs, ping_times[3])

    # 240 s: "send a message to Mom", the reply asks "what's the message?", and the dictation
    # follows ~4 s after the reply's download ends: a dialogue's second turn.
    _, tts3, _ = _interaction(
        w,
        avs,
        240.0,
        utterance="send a message to mom",
        turn=1,
        record_bytes=118,
        rate_hz=rng.uniform(52, 59),
        duration_s=rng.uniform(1.8, 2.6),
        tts_bytes=rng.randint(20_000, 25_000),
        truth=truth,
    )
    t_follow = tts3.last + rng.uniform(3.8, 4.2)
    _speech_finished(w, avs, t_follow - 0.8)
    _, tts4, play_end = _interaction(
        w,
        avs,
        t_follow,
        utterance="(message dictation)",
        turn=2,
        record_bytes=118,
        rate_hz=rng.uniform(52, 59),
        duration_s=rng.uniform(3.5, 4.8),
        tts_bytes=rng.randint(20_000, 30_000),
        truth=truth,
    )
    _speech_finished(w, avs, play_end)
    comms_dns = [(COMMS.name, "A", COMMS.ip, 60)]
    _short_exchange(
        w,
        tts4.last + 2.0,
        COMMS,
        COMMS.name,
        "messaging",
        rng.randint(1_500, 2_500),
        rng.randint(3_000, 6_000),
        close_after_s=3.0,
        dns=comms_dns,
    )
    _ping(w, avs, ping_times[4])

    # 300 s: connectivity check again; telemetry.
    _short_exchange(
        w,
        300.0,
        CONNCHECK,
        CONNCHECK.name,
        "connectivity",
        rng.randint(300, 420),
        rng.randint(500, 700),
        dns=conncheck_dns,
    )
    _telemetry(w, 330.0)
    _unagi(w, 335.0)
    _ping(w, avs, ping_times[5])

    # 398 s: a Drop-In: the cloud's directive, the Echo's event, signalling, then the media.
    avs.write(398.0, _records(rng, rng.randint(1_200, 1_800)), from_client=False)
    ev = _echo_event(w, avs, 398.3, rng.randint(2_000, 3_000))
    w.note("event", ECHO, AVS, 443, ev.first, ev.last, ev.bytes, 0, what="DropIn")
    _short_exchange(
        w,
        398.5,
        COMMS,
        COMMS.name,
        "messaging",
        rng.randint(1_500, 2_500),
        rng.randint(2_500, 4_000),
        close_after_s=1.0,
        dns=comms_dns,
    )
    _dropin(w, 400.5, rng.uniform(25.0, 35.0))
    _ping(w, avs, ping_times[6])

    # 480 s: a smart-home state report on the voice connection.
    ev = _echo_event(w, avs, 480.0, rng.randint(2_000, 4_000))
    w.note("event", ECHO, AVS, 443, ev.first, ev.last, ev.bytes, 0, what="StateReport")
    _ping(w, avs, ping_times[7])
    _telemetry(w, 540.0)
    for t in ping_times[8:]:
        _ping(w, avs, t)
    return w.frames(), truth, sorted(w.activities, key=lambda a: a["start"])


@functools.lru_cache(maxsize=8)
def _echo_session_cached(seed: int) -> tuple[tuple[tuple[float, bytes], ...], tuple, tuple]:
    frames, truth, activities = _echo_session(seed)
    return tuple(frames), tuple(truth), tuple(activities)


def generate_session(seed: int = 1) -> list[tuple[float, bytes]]:
    """(timestamp, Ethernet frame) pairs of ~10 minutes of a home network with an Echo: see
    `session_activities` for what happens when, `session_truth` for the voice uploads."""
    return list(_echo_session_cached(seed)[0])


def session_truth(seed: int = 1) -> list[dict]:
    """The Echo's voice uploads in `generate_session(seed)`: device, remote ("addr:port"), host,
    start and end (capture timestamps of the first and last upstream payload packet), bytes and
    packets (upstream L4 payload), record_bytes, rate_hz, burst_bytes, turn (2 = a follow-up)."""
    return [dict(t) for t in _echo_session_cached(seed)[1]]


def session_activities(seed: int = 1) -> list[dict]:
    """Everything scripted in the session, voice or not, in time order: kind, device, remote,
    host, start, end, bytes_up, bytes_down. Kinds: voice-upload, tts-response, event, keepalive,
    post-query-report, volume-change, telemetry, smart-home, connectivity, messaging, dropin,
    laptop-browse, laptop-upload."""
    return [dict(a) for a in _echo_session_cached(seed)[2]]


def session_labels(seed: int = 1, file: str | None = None) -> dict:
    """The session's voice uploads in the form of one `[[capture]]` of labels.toml."""
    return {
        "file": file,
        "device": ECHO.ip,
        "vendor": "amazon",
        "voice": [
            {k: t[k] for k in ("start", "end", "remote", "bytes")} for t in session_truth(seed)
        ],
    }


# ---------------------------------------------------------------------------------------------
# QUIC v1 Initial packets (RFC 9000, RFC 9001).


@dataclass(frozen=True, slots=True)
class QuicKeys:
    key: bytes  # AES-128-GCM packet protection key
    iv: bytes
    hp: bytes  # AES-128-ECB header protection key


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    h = hmac.HMAC(salt, hashes.SHA256())
    h.update(ikm)
    return h.finalize()


def _hkdf_expand_label(secret: bytes, label: str, length: int, context: bytes = b"") -> bytes:
    full = b"tls13 " + label.encode()
    info = struct.pack("!HB", length, len(full)) + full + bytes([len(context)]) + context
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def quic_initial_keys(dcid: bytes, client: bool = True) -> QuicKeys:
    """RFC 9001 5.2: keys protecting Initial packets, derived from the client's first DCID."""
    initial = _hkdf_extract(QUIC_V1_INITIAL_SALT, dcid)
    secret = _hkdf_expand_label(initial, "client in" if client else "server in", 32)
    return QuicKeys(
        _hkdf_expand_label(secret, "quic key", 16),
        _hkdf_expand_label(secret, "quic iv", 12),
        _hkdf_expand_label(secret, "quic hp", 16),
    )


def _varint(n: int) -> bytes:
    if n < 0x40:
        return bytes([n])
    if n < 0x4000:
        return struct.pack("!H", 0x4000 | n)
    if n < 0x4000_0000:
        return struct.pack("!I", 0x8000_0000 | n)
    return struct.pack("!Q", 0xC000_0000_0000_0000 | n)


def _long_header_packet(
    keys: QuicKeys,
    packet_type: int,
    dcid: bytes,
    scid: bytes,
    pn: int,
    payload: bytes,
    pad_to: int = 0,
) -> bytes:
    """A protected long-header packet (Initial = 0, Handshake = 2) with a 4-byte packet number.
    PADDING frames are appended to reach `pad_to` bytes."""
    pn_len = 4
    token = b"\x00" if packet_type == 0 else b""  # Initial: empty token
    head = bytes([0xC0 | packet_type << 4 | (pn_len - 1)]) + struct.pack("!I", 1)
    head += bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid + token
    fixed = len(head) + 2 + pn_len + 16  # 2-byte Length varint, AEAD tag
    if pad_to > fixed + len(payload):
        payload += bytes(pad_to - fixed - len(payload))
    head += struct.pack("!H", 0x4000 | (pn_len + len(payload) + 16))
    pn_offset = len(head)
    head += pn.to_bytes(pn_len, "big")
    nonce = bytes(a ^ b for a, b in zip(keys.iv, pn.to_bytes(12, "big")))
    sealed = AESGCM(keys.key).encrypt(nonce, payload, head)
    sample = sealed[4 - pn_len : 4 - pn_len + 16]  # RFC 9001 5.4.2: 4 bytes after the PN start
    mask = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor().update(sample)
    first = bytes([head[0] ^ (mask[0] & 0x0F)])
    pn_bytes = bytes(a ^ b for a, b in zip(head[pn_offset:], mask[1 : 1 + pn_len]))
    return first + head[1:pn_offset] + pn_bytes + sealed


def tls13_client_hello(host: str, rng: random.Random, transport_params: bytes = b"") -> bytes:
    """A TLS 1.3 ClientHello handshake message (no record layer, as QUIC carries it) with SNI,
    ALPN h3, X25519 key share and QUIC transport parameters, built by hand (RFC 8446 4.1.2)."""
    name = host.encode()

    def ext(ext_type: int, body: bytes) -> bytes:
        return struct.pack("!HH", ext_type, len(body)) + body

    sni = struct.pack("!HBH", len(name) + 3, 0, len(name)) + name
    groups = struct.pack("!HHHH", 6, 0x001D, 0x0017, 0x0018)
    sigs = bytes.fromhex("0403080404010503080505010806060102010201")
    sigs = struct.pack("!H", len(sigs)) + sigs
    alpn = b"\x02h3"
    key_share = struct.pack("!HHH", 36, 0x001D, 32) + rng.randbytes(32)
    exts = b"".join(
        [
            ext(0, sni),
            ext(10, groups),
            ext(13, sigs),
            ext(16, struct.pack("!H", len(alpn)) + alpn),
            ext(43, b"\x02\x03\x04"),
            ext(45, b"\x01\x01"),
            ext(51, key_share),
            ext(0x39, transport_params),
        ]
    )
    body = struct.pack("!H", 0x0303) + rng.randbytes(32) + b"\x00"  # empty legacy_session_id
    body += struct.pack("!H", 6) + bytes.fromhex("130113021303") + b"\x01\x00"
    body += struct.pack("!H", len(exts)) + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def _tls13_server_hello(rng: random.Random) -> bytes:
    exts = struct.pack("!HHH", 43, 2, 0x0304) + struct.pack("!HHHH", 51, 36, 0x001D, 32)
    exts += rng.randbytes(32)
    body = struct.pack("!H", 0x0303) + rng.randbytes(32) + b"\x00"
    body += struct.pack("!HBH", 0x1301, 0, len(exts)) + exts
    return b"\x02" + len(body).to_bytes(3, "big") + body


def _transport_params(scid: bytes) -> bytes:
    def param(pid: int, value: bytes) -> bytes:
        return _varint(pid) + _varint(len(value)) + value

    return b"".join(
        [
            param(0x01, _varint(30_000)),  # max_idle_timeout (ms)
            param(0x04, _varint(15_728_640)),  # initial_max_data
            param(0x05, _varint(6_291_456)),  # initial_max_stream_data_bidi_local
            param(0x06, _varint(6_291_456)),  # initial_max_stream_data_bidi_remote
            param(0x08, _varint(100)),  # initial_max_streams_bidi
            param(0x0F, scid),  # initial_source_connection_id
        ]
    )


def _nest_session(seed: int) -> tuple[list[tuple[float, bytes]], list[dict], list[dict]]:
    """A Nest Mini (2021) query over QUIC (design.md 7): 183-217 KB in under 3 s as ~1,350-B
    datagrams at 78-126 pkt/s, plus an 8-16 KB side flow."""
    w = _World(seed)
    rng = w.rng
    truth: list[dict] = []
    t = w.dns(0.0, NEST, ASSISTANT.name, [(ASSISTANT.name, "A", ASSISTANT.ip, 300)])
    port = w.port(NEST)
    dcid, scid, server_cid = rng.randbytes(8), rng.randbytes(8), rng.randbytes(8)

    sent = {True: 0, False: 0}  # UDP payload bytes per direction (True: upstream)

    def up(t: float, payload: bytes) -> None:
        w.send_udp(t, NEST, port, ASSISTANT, 443, payload)
        sent[True] += len(payload)

    def down(t: float, payload: bytes) -> None:
        w.send_udp(t, ASSISTANT, 443, NEST, port, payload)
        sent[False] += len(payload)

    def short_header(size: int) -> bytes:  # 1-RTT packet: protected bits, DCID, ciphertext
        return bytes([0x40 | rng.getrandbits(6)]) + server_cid + rng.randbytes(size - 9)

    # Handshake: the client's Initial (CRYPTO ClientHello, padded to 1,200 B), the server's
    # Initial (ACK + ServerHello) coalesced with Handshake packets, the client's answers.
    hello = tls13_client_hello(ASSISTANT.name, rng, _transport_params(scid))
    crypto = b"\x06" + _varint(0) + _varint(len(hello)) + hello
    ckeys, skeys = quic_initial_keys(dcid, client=True), quic_initial_keys(dcid, client=False)
    t_initial = t = t + 0.004
    up(t, _long_header_packet(ckeys, 0, dcid, scid, 0, crypto, pad_to=1_200))
    t_srv = t + GOOGLE_RTT_S + 0.002
    sh = _tls13_server_hello(rng)
    s_initial = _long_header_packet(
        skeys,
        0,
        scid,
        server_cid,
        0,
        b"\x02\x00\x00\x00\x00" + b"\x06" + _varint(0) + _varint(len(sh)) + sh,
    )
    hs_keys = QuicKeys(rng.randbytes(16), rng.randbytes(12), rng.randbytes(16))  # unknown to us
    # Handshake packet overhead: 23 B of header, 2 B Length, 4 B packet number, 16 B tag.
    down(
        t_srv,
        s_initial
        + _long_header_packet(
            hs_keys, 2, scid, server_cid, 0, rng.randbytes(1_200 - len(s_initial) - 45)
        ),
    )
    down(t_srv + 0.0005, _long_header_packet(hs_keys, 2, scid, server_cid, 1, rng.randbytes(900)))
    t = t_srv + LAN_RTT_S + 0.003
    up(t, _long_header_packet(ckeys, 0, server_cid, scid, 1, b"\x02\x00\x00\x00\x00", pad_to=1_200))
    up(t + 0.0005, _long_header_packet(hs_keys, 2, server_cid, scid, 0, rng.randbytes(60)))
    up(t + 0.001, short_header(rng.randint(220, 320)))  # SETTINGS, request headers
    down(t + GOOGLE_RTT_S, short_header(rng.randint(60, 140)))  # HANDSHAKE_DONE, SETTINGS
    w.note(
        "quic-handshake", NEST, ASSISTANT, 443, t_initial, t + GOOGLE_RTT_S, sent[True], sent[False]
    )

    # 3 s: "Hey Google, ...": ~200 KB of 1,350-B datagrams at ~100/s; the front end ACKs every
    # second packet.
    t = 3.0 + rng.uniform(0, 0.2)
    n = rng.randint(140, 160)
    first, total = t, 0
    for k in range(n):
        size = 1_350 if k < n - 1 else rng.randint(300, 1_350)
        up(t, short_header(size))
        total += size
        if k % 2 == 1:
            down(t + GOOGLE_RTT_S, short_header(rng.randint(40, 50)))
        last = t
        t += rng.uniform(0.0085, 0.0115)
    truth.append(
        {
            "device": NEST.ip,
            "mac": NEST.mac,
            "remote": f"{ASSISTANT.ip}:443",
            "host": ASSISTANT.name,
            "category": "voice",
            "start": w.ts(first),
            "end": w.ts(last),
            "bytes": total,
            "packets": n,
            "turn": 1,
            "utterance": "what's the weather",
        }
    )
    w.note("voice-upload", NEST, ASSISTANT, 443, first, last, total, 0, turn=1)
    # The reply: ~30 KB down, the speaker ACKs every second datagram.
    t = last + rng.uniform(0.35, 0.6)
    reply_first, reply = t, 0
    for k in range(rng.randint(18, 26)):
        down(t, short_header(1_350))
        reply += 1_350
        if k % 2 == 1:
            up(t + LAN_RTT_S, short_header(rng.randint(38, 46)))
        t += rng.uniform(0.0015, 0.003)
    w.note("tts-response", NEST, ASSISTANT, 443, reply_first, t, 0, reply)

    # 6 s: the 8-16 KB side flow over TCP/TLS (device management).
    _short_exchange(
        w,
        last + 2.5,
        FOYER,
        FOYER.name,
        "smart-home",
        rng.randint(3_000, 5_000),
        rng.randint(5_000, 9_000),
        client=NEST,
        dns=[(FOYER.name, "A", FOYER.ip, 300)],
    )
    return w.frames(), truth, sorted(w.activities, key=lambda a: a["start"])


@functools.lru_cache(maxsize=8)
def _nest_session_cached(seed: int) -> tuple[tuple, tuple, tuple]:
    frames, truth, activities = _nest_session(seed)
    return tuple(frames), tuple(truth), tuple(activities)


def generate_nest_quic(seed: int = 1) -> list[tuple[float, bytes]]:
    """(timestamp, Ethernet frame) pairs of ~10 s of a Nest Mini answering one query over QUIC:
    DNS, a real QUIC v1 Initial with SNI embeddedassistant.googleapis.com, the upload, the reply
    and a small TCP side flow."""
    return list(_nest_session_cached(seed)[0])


def nest_quic_truth(seed: int = 1) -> list[dict]:
    """The Nest's voice upload(s) in `generate_nest_quic(seed)` (UDP payload bytes)."""
    return [dict(t) for t in _nest_session_cached(seed)[1]]


# ---------------------------------------------------------------------------------------------
# Files.


def _write(path: str | Path, frames: Sequence[tuple[float, bytes]]) -> Path:
    """An Ethernet pcap, written by the project's one pcap writer (guard/tools/capture.py)."""
    path = Path(path)
    write_pcap(path, frames, linktype=dpkt.pcap.DLT_EN10MB, snaplen=65_535)
    return path


def write_session(path: str | Path, seed: int = 1) -> Path:
    """Write `generate_session(seed)` as an Ethernet pcap."""
    return _write(path, generate_session(seed))


def write_nest_quic(path: str | Path, seed: int = 1) -> Path:
    """Write `generate_nest_quic(seed)` as an Ethernet pcap."""
    return _write(path, generate_nest_quic(seed))


def main(argv: Sequence[str] | None = None) -> int:
    """python -m hushsim.synth OUT.pcap [--seed N] [--nest]: write a synthetic capture."""
    ap = argparse.ArgumentParser(prog="python -m hushsim.synth", description=main.__doc__)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--nest", action="store_true", help="the Nest QUIC session instead")
    args = ap.parse_args(argv)
    (write_nest_quic if args.nest else write_session)(args.out, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
