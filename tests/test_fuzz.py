"""Fuzzing the parsers, the SNI assembler and the engine with hostile input.

What is pinned: `parse_frame`/`parse_ip` never raise and their last-resort handler never answers;
what they return keeps its own invariants (lengths, inert names); `SniAssembler` never raises and
never buffers more than its caps; the engine lets no exception escape `receive`/`handle_timer`,
gives every held token exactly one Release or Discard, releases nothing of a denied upload, and
garbage from other hosts changes nothing for the well-formed flows around it.

Two kinds of cases. Bulk mutations of real frames from the shared captures (truncations, byte
flips, insertions, lying length fields, random bytes) run in seeded `random.Random` loops, because
they cost ~30 us each; structured inputs (Packet values, segmentations, QUIC frames) use
hypothesis with explicit, derandomized settings. Every case is counted and the last test asserts
the total (>= 100,000), so a refactor cannot quietly shrink the fuzzing. The internals without a
catch-all (`_RecordReader.advance`, `SniAssembler._feed_tcp/_feed_quic`) are driven directly, so a
bug shows here as an exception instead of hiding behind the public functions' last resort.
"""

from __future__ import annotations

import hmac
import ipaddress
import random
import re
import struct
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from hashlib import sha256
from pathlib import Path
from typing import Any

import dpkt
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.core.config import DeviceConfig, GuardConfig
from guard.core.engine import (
    Discard,
    Engine,
    FlowState,
    Release,
    UnknownUpload,
    UploadDecided,
    UploadHeld,
    UploadSeen,
    UploadState,
    Verdict,
)
from guard.core.packet import (
    ACK,
    FIN,
    INTERNAL_ERROR,
    PSH,
    RST,
    SYN,
    TCP,
    UDP,
    DnsAnswer,
    Hint,
    Malformed,
    Packet,
    parse_dns_answers,
    parse_frame,
    parse_ip,
)
from guard.core.policy import (
    DENYING_OUTCOMES,
    Decision,
    Mode,
    Scope,
    StandingRule,
    Verb,
    Window,
    WindowKind,
)
from guard.core.ruleset import load_rules
from guard.core.sni import (
    MAX_STREAM_BYTES,
    NEED_MORE,
    SniAssembler,
    _RecordReader,
    client_hello_sni,
)
from tests.ci import missing_or_fail

FIXTURES = Path(__file__).parent / "fixtures"
RULES = load_rules()
BOB = "bob-dispatch-prod-na.amazon.com"
HELLO = (FIXTURES / "tls_client_hello_bob_dispatch.bin").read_bytes()  # TLS records, SNI BOB
QUIC_V1_FIXTURE = (FIXTURES / "rfc9001_a2_client_initial.bin").read_bytes()  # SNI example.com
QUIC_V2_FIXTURE = (FIXTURES / "rfc9369_a2_client_initial.bin").read_bytes()

# What a host name may look like once it leaves the parsers (guard.core.packet.normalise_name).
INERT_NAME = re.compile(r"[a-z0-9._?-]{1,253}")
FULL_HINTS = (Hint.TLS_HELLO, Hint.QUIC_INITIAL, Hint.DNS)  # payloads kept whole
KEEP = 64  # parse_ip's default keep_payload
# A parse that takes this long is a CPU sink (a DNS pointer walk, say), not noise: real frames
# parse in ~10 us; a GC pause or a busy CI box stays far below this.
SLOW_CALL_S = 0.25

CASES: Counter[str] = Counter()
TOTAL_CASES_MIN = 100_000


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# ---------------------------------------------------------------------------------------------
# Frame builders (lengths are parameters so they can lie)

SRC_MAC = bytes.fromhex("68dbf5901964")
GW_MAC = bytes.fromhex("001122334455")
LAN4, CLOUD4 = bytes([192, 168, 86, 40]), bytes([52, 94, 233, 109])
LAN6 = bytes.fromhex("20010db8000000000000000000000001")
CLOUD6 = bytes.fromhex("2607f8b0400508000000000000002004")
ETH_IP4, ETH_IP6 = 0x0800, 0x86DD
VLAN_TAGS = (0x8100, 0x88A8, 0x9100)
IP6_EXT = (0, 43, 44, 51, 60)  # hop-by-hop, routing, fragment, AH, destination options


def eth(l3: bytes, etype: int, tags: tuple[int, ...] = ()) -> bytes:
    head = GW_MAC + SRC_MAC
    for tpid in tags:
        head += struct.pack("!HH", tpid, 7)
    return head + struct.pack("!H", etype) + l3


def ip4(proto: int, l4: bytes, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    total = 20 + len(options) + len(l4)
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, 0x4000, 64, proto, 0, LAN4, CLOUD4)
    return head + options + l4


def ip6(proto: int, l4: bytes, ext: tuple[int, ...] = ()) -> bytes:
    """IPv6 with a chain of extension headers (kinds from IP6_EXT) before the transport."""
    chain = b""
    kinds = list(ext)
    for i, kind in enumerate(kinds):
        nxt = kinds[i + 1] if i + 1 < len(kinds) else proto
        if kind == 44:
            chain += struct.pack("!BBHI", nxt, 0, 0, 0x1234)  # offset 0, no more fragments
        elif kind == 51:
            chain += bytes([nxt, 4]) + bytes(22)  # AH: (4 + 2) * 4 = 24 bytes
        else:
            chain += bytes([nxt, 0, 1, 4]) + bytes(4)  # 8 bytes: a PadN option
    first = kinds[0] if kinds else proto
    rest = chain + l4
    return struct.pack("!IHBB16s16s", 0x60000000, len(rest), first, 64, LAN6, CLOUD6) + rest


def tcp(sport: int, dport: int, payload: bytes, seq: int = 1000, flags: int = ACK | PSH) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 5000, 5 << 4, flags, 65535, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


# ---------------------------------------------------------------------------------------------
# QUIC Initial protection (RFC 9001 5), written here independently of guard.core.sni

QUIC_V1, QUIC_V2 = 0x00000001, 0x6B3343CF
_SALT = {
    QUIC_V1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    QUIC_V2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
}
_PREFIX = {QUIC_V1: b"quic ", QUIC_V2: b"quicv2 "}
_INITIAL_TYPE = {QUIC_V1: 0, QUIC_V2: 1}
_KEYS: dict[tuple[int, bytes], tuple[AESGCM, bytes, Any]] = {}


def _expand(secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([i]), sha256).digest()
        out += block
        i += 1
    return out[:length]


def _client_keys(version: int, dcid: bytes) -> tuple[AESGCM, bytes, Any]:
    keys = _KEYS.get((version, dcid))
    if keys is None:
        client = _expand(hmac.new(_SALT[version], dcid, sha256).digest(), b"client in", 32)
        prefix = _PREFIX[version]
        hp = Cipher(algorithms.AES(_expand(client, prefix + b"hp", 16)), modes.ECB())
        key, iv = _expand(client, prefix + b"key", 16), _expand(client, prefix + b"iv", 12)
        keys = (AESGCM(key), iv, hp)
        _KEYS[(version, dcid)] = keys
    return keys


def varint(n: int, size: int | None = None) -> bytes:
    if size is None:
        size = 1 if n < 0x40 else 2 if n < 0x4000 else 4 if n < 0x40000000 else 8
    prefix = {1: 0, 2: 1, 4: 2, 8: 3}[size]
    return ((prefix << (8 * size - 2)) | n).to_bytes(size, "big")


def crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def initial(version: int, dcid: bytes, frames: bytes, pn: int = 0, pn_len: int = 2,
            token: bytes = b"", scid: bytes = b"\x01\x02\x03\x04", pad_to: int = 0) -> bytes:
    """One protected client Initial carrying `frames` (padded to `pad_to` bytes of datagram)."""
    aead, iv, hp = _client_keys(version, dcid)
    head_len = 1 + 4 + 1 + len(dcid) + 1 + len(scid) + len(varint(len(token))) + len(token) + 2
    need = pad_to - (head_len + pn_len + len(frames) + 16)
    if need > 0:
        frames += bytes(need)
    if pn_len + len(frames) < 4:
        frames += bytes(4 - pn_len - len(frames))  # room for the header-protection sample
    first = 0xC0 | (_INITIAL_TYPE[version] << 4) | (pn_len - 1)
    pn_bytes = pn.to_bytes(pn_len, "big")
    header = (bytes([first]) + struct.pack("!I", version) + bytes([len(dcid)]) + dcid
              + bytes([len(scid)]) + scid + varint(len(token)) + token
              + varint(pn_len + len(frames) + 16, 2) + pn_bytes)
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    sealed = aead.encrypt(nonce, frames, header)
    mask = hp.encryptor().update(sealed[4 - pn_len : 20 - pn_len])
    masked = bytes(b ^ m for b, m in zip(pn_bytes, mask[1:]))
    return bytes([first ^ (mask[0] & 0x0F)]) + header[1:-pn_len] + masked + sealed


HELLO_MSG = HELLO[5:]  # the handshake message inside the fixture's single TLS record
assert HELLO[0] == 22 and len(HELLO_MSG) == struct.unpack("!H", HELLO[3:5])[0]
DCID = bytes.fromhex("8394c8f03e515708")


def quic_hello(version: int = QUIC_V1, dcid: bytes = DCID, pieces: int = 1) -> list[bytes]:
    """Client Initials carrying HELLO_MSG in `pieces` CRYPTO frames, one datagram each."""
    step = -(-len(HELLO_MSG) // pieces)
    return [
        initial(version, dcid, crypto(off, HELLO_MSG[off : off + step]), pn=i, pad_to=1200)
        for i, off in enumerate(range(0, len(HELLO_MSG), step))
    ]


# ---------------------------------------------------------------------------------------------
# The shared captures, read with dpkt (independent of guard.tools.capture)


@dataclass(frozen=True, slots=True)
class Trace:
    name: str
    device: str
    linktype: int
    frames: tuple[tuple[float, bytes], ...]


def _read_frames(path: Path) -> tuple[int, list[tuple[float, bytes]]]:
    with path.open("rb") as f:
        magic = f.read(4)
        f.seek(0)
        reader = dpkt.pcapng.Reader(f) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(f)
        return reader.datalink(), [(float(ts), bytes(buf)) for ts, buf in reader]


@pytest.fixture(scope="module")
def traces(captures: Path) -> list[Trace]:
    labels = tomllib.loads((captures / "labels.toml").read_text())
    out = []
    for entry in labels["capture"]:
        linktype, frames = _read_frames(captures / entry["file"])
        out.append(Trace(entry["file"], entry["device"], linktype, tuple(frames)))
    assert out and all(t.linktype == 1 for t in out)  # the builders below assume Ethernet
    return out


def _kind(pkt: Packet) -> tuple[Any, ...]:
    size = 0 if not pkt.payload_len else 1 if pkt.payload_len < 200 else 2
    return pkt.version, pkt.proto, pkt.hint, bool(pkt.dns), size, pkt.sport == 53


@pytest.fixture(scope="module")
def seeds(traces: list[Trace]) -> list[bytes]:
    """Ethernet frames of every kind the captures hold (three of each), plus built ones for what
    they do not: IPv6 extension headers and fragments, QUIC Initials, DNS over TCP, VLAN tags,
    IPv4 options."""
    picked: list[bytes] = []
    kinds: Counter[tuple[Any, ...]] = Counter()
    dns_payload = hello_payload = None
    for trace in traces:
        for _, frame in trace.frames:
            pkt = parse_frame(frame, 1)
            if not isinstance(pkt, Packet):
                continue
            if pkt.dns and dns_payload is None and pkt.proto == UDP:
                dns_payload = pkt.payload
            if pkt.hint is Hint.TLS_HELLO and hello_payload is None:
                hello_payload = pkt.payload
            if kinds[_kind(pkt)] < 3:
                kinds[_kind(pkt)] += 1
                picked.append(frame)
    assert dns_payload is not None and hello_payload is not None
    data = bytes(range(256)) * 2
    built = [
        eth(ip6(TCP, tcp(50000, 443, HELLO), (0, 60, 43, 44, 51)), ETH_IP6),
        eth(ip6(UDP, udp(53, 40000, dns_payload), (0, 44)), ETH_IP6),
        eth(ip6(TCP, tcp(50000, 443, data[:300]), (60,)), ETH_IP6),
        eth(ip6(UDP, udp(50000, 443, QUIC_V1_FIXTURE)), ETH_IP6),
        eth(ip4(UDP, udp(50000, 443, QUIC_V2_FIXTURE)), ETH_IP4),
        eth(ip4(UDP, udp(50000, 443, quic_hello(QUIC_V1, pieces=2)[0])), ETH_IP4),
        eth(ip4(TCP, tcp(53, 40000, struct.pack("!H", len(dns_payload)) + dns_payload)), ETH_IP4),
        eth(ip4(TCP, tcp(50000, 443, hello_payload), options=bytes([1, 1, 1, 0])), ETH_IP4,
            tags=(0x88A8, 0x8100)),
        eth(ip4(UDP, udp(50000, 3478, b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12))), ETH_IP4),
    ]
    for frame in built:
        assert isinstance(parse_frame(frame, 1), Packet), frame.hex()
    return picked + built


@pytest.fixture(scope="module")
def all_frames(traces: list[Trace]) -> list[bytes]:
    return [frame for trace in traces for _, frame in trace.frames]


@pytest.fixture(scope="module")
def hellos(traces: list[Trace]) -> list[bytes]:
    """ClientHello payloads (TLS records) seen in the captures, and the fixture's."""
    found = {HELLO}
    for trace in traces:
        for _, frame in trace.frames:
            pkt = parse_frame(frame, 1)
            if isinstance(pkt, Packet) and pkt.hint is Hint.TLS_HELLO:
                found.add(pkt.payload)
    assert len(found) > 20
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Where the length fields are: a map of a well-formed frame, so mutations can lie on purpose


@dataclass(frozen=True, slots=True)
class Field:
    offset: int
    size: int  # bytes
    kind: str  # "int" big-endian, "lo"/"hi" nibble, "varint" (QUIC), "label"/"ptr" (DNS)
    base: int = 0  # start of the DNS message (pointers are relative to it)


def frame_fields(frame: bytes) -> list[Field]:
    """The length-bearing fields of a well-formed Ethernet frame, outermost first."""
    try:
        return _frame_fields(frame)
    except (IndexError, struct.error):
        return []


def _frame_fields(frame: bytes) -> list[Field]:
    fields: list[Field] = []
    off = 14
    etype = struct.unpack_from("!H", frame, 12)[0]
    while etype in VLAN_TAGS:
        etype = struct.unpack_from("!H", frame, off + 2)[0]
        off += 4
    l3 = off
    if frame[l3] >> 4 == 4:
        fields += [Field(l3, 1, "lo"), Field(l3 + 2, 2, "int"), Field(l3 + 6, 2, "int")]
        proto = frame[l3 + 9]
        l4 = l3 + (frame[l3] & 15) * 4
        end = l3 + struct.unpack_from("!H", frame, l3 + 2)[0]
    else:
        fields += [Field(l3 + 4, 2, "int"), Field(l3 + 6, 1, "int")]
        end = l3 + 40 + struct.unpack_from("!H", frame, l3 + 4)[0]
        proto, l4 = frame[l3 + 6], l3 + 40
        while proto in IP6_EXT:
            fields.append(Field(l4, 1, "int"))
            if proto == 44:
                fields.append(Field(l4 + 2, 2, "int"))
                size = 8
            else:
                fields.append(Field(l4 + 1, 1, "int"))
                size = (frame[l4 + 1] + 2) * 4 if proto == 51 else (frame[l4 + 1] + 1) * 8
            proto = frame[l4]
            l4 += size
    if proto == TCP:
        fields.append(Field(l4 + 12, 1, "hi"))
        start = l4 + (frame[l4 + 12] >> 4) * 4
    elif proto == UDP:
        fields.append(Field(l4 + 4, 2, "int"))
        start = l4 + 8
    else:
        return fields
    sport, dport = struct.unpack_from("!HH", frame, l4)
    if proto == TCP and 53 in (sport, dport) and end - start >= 2:
        fields.append(Field(start, 2, "int"))  # DNS over TCP: the message length prefix
        start += 2
    return fields + payload_fields(frame, start, min(end, len(frame)), proto, sport, dport)


def payload_fields(buf: bytes, start: int, end: int, proto: int, sport: int, dport: int
                   ) -> list[Field]:
    try:
        if 53 in (sport, dport):
            return _dns_fields(buf, start, end)
        if proto == TCP and buf[start] == 22 and buf[start + 1] == 3:
            return tls_fields(buf, start)
        if proto == UDP and buf[start] & 0xC0 == 0xC0:
            return _quic_fields(buf, start, end)
    except (IndexError, struct.error):
        pass
    return []


def tls_fields(buf: bytes, p: int) -> list[Field]:
    """The record, handshake, hello and server_name lengths of a ClientHello at buf[p:]."""
    fields: list[Field] = []
    try:
        _tls_fields(buf, p, fields)
    except (IndexError, struct.error):
        pass
    return fields


def _tls_fields(buf: bytes, p: int, fields: list[Field]) -> None:
    fields.append(Field(p + 3, 2, "int"))  # record length
    if buf[p + 5] != 1:
        return
    fields.append(Field(p + 6, 3, "int"))  # handshake length
    h = p + 9 + 34  # legacy version + random
    fields.append(Field(h, 1, "int"))  # session id length
    h += 1 + buf[h]
    fields.append(Field(h, 2, "int"))  # cipher suites length
    h += 2 + struct.unpack_from("!H", buf, h)[0]
    fields.append(Field(h, 1, "int"))  # compression methods length
    h += 1 + buf[h]
    fields.append(Field(h, 2, "int"))  # extensions length
    h += 2
    while h + 4 <= len(buf):
        etype, elen = struct.unpack_from("!HH", buf, h)
        fields.append(Field(h + 2, 2, "int"))
        if etype == 0:  # server_name: list length, name type, name length
            fields += [Field(h + 4, 2, "int"), Field(h + 6, 1, "int"), Field(h + 7, 2, "int")]
        h += 4 + elen


def _quic_fields(buf: bytes, p: int, end: int) -> list[Field]:
    fields: list[Field] = []
    while p + 7 <= end and buf[p] & 0xC0 == 0xC0:
        fields += [Field(p, 1, "int"), Field(p + 1, 4, "int"), Field(p + 5, 1, "int")]
        q = p + 6 + buf[p + 5]
        fields.append(Field(q, 1, "int"))  # SCID length
        q += 1 + buf[q]
        if (buf[p] >> 4) & 3 == _INITIAL_TYPE.get(struct.unpack_from("!I", buf, p + 1)[0], -1):
            size = 1 << (buf[q] >> 6)
            fields.append(Field(q, size, "varint"))  # token length
            token = int.from_bytes(buf[q : q + size], "big") & ((1 << (8 * size - 2)) - 1)
            q += size + token
        size = 1 << (buf[q] >> 6)
        fields.append(Field(q, size, "varint"))  # length
        length = int.from_bytes(buf[q : q + size], "big") & ((1 << (8 * size - 2)) - 1)
        p = q + size + length
    return fields


def _dns_fields(buf: bytes, p: int, end: int) -> list[Field]:
    fields = [Field(p + i, 2, "int") for i in (4, 6, 8, 10)]  # qd, an, ns, ar counts

    def name(q: int) -> int:
        for _ in range(128):
            n = buf[q]
            if n >= 0xC0:
                fields.append(Field(q, 2, "ptr", p))
                return q + 2
            fields.append(Field(q, 1, "label", p))
            if n == 0:
                return q + 1
            q += 1 + n
        return q

    q = name(p + 12) + 4
    for _ in range(struct.unpack_from("!H", buf, p + 6)[0]):
        if q >= end:
            break
        q = name(q)
        fields += [Field(q, 2, "int"), Field(q + 8, 2, "int")]  # type, rdlength
        q += 10 + struct.unpack_from("!H", buf, q + 8)[0]
    return fields


def lie(rng: random.Random, buf: bytes, field: Field) -> bytes:
    """Overwrite one length field with a value chosen to hurt: off by one, zero, maximal..."""
    off, size = field.offset, field.size
    if off + size > len(buf):
        return buf
    true = int.from_bytes(buf[off : off + size], "big")
    if field.kind in ("lo", "hi"):
        nib = rng.choice((0, 1, 4, 5, 6, 15, rng.randrange(16)))
        value = (true & 0xF0) | nib if field.kind == "lo" else (true & 0x0F) | nib << 4
    elif field.kind == "varint":
        prefix = true >> (8 * size - 2)
        payload_max = (1 << (8 * size - 2)) - 1
        low = true & payload_max
        choice = rng.randrange(4)
        if choice == 0:  # another width: what follows is read with the wrong framing
            value = (rng.randrange(4) << (8 * size - 2)) | low
        else:
            lied = rng.choice((0, 1, low - 1, low + 1, payload_max, rng.randrange(payload_max + 1)))
            value = (prefix << (8 * size - 2)) | (lied & payload_max)
    elif field.kind == "ptr":
        here = off - field.base
        target = rng.choice((here, here - 2, here + 2, 12, 0, 0x3FFF, len(buf) - field.base,
                             rng.randrange(0x4000)))
        value = 0xC000 | (target & 0x3FFF)
    elif field.kind == "label":
        value = rng.choice((0, 1, 63, 64, 0x80, 0xC0, 0xFF, true - 1, true + 1))
    else:
        top = (1 << (8 * size)) - 1
        value = rng.choice((0, 1, true - 1, true + 1, true * 2, true // 2, top, top - 1,
                            true + rng.randrange(1, 200), rng.randrange(top + 1)))
    value &= (1 << (8 * size)) - 1
    return buf[:off] + value.to_bytes(size, "big") + buf[off + size :]


# ---------------------------------------------------------------------------------------------
# Generic mutations


def _truncate(rng: random.Random, b: bytes) -> bytes:
    return b[: rng.randrange(len(b) + 1)]


def _flip(rng: random.Random, b: bytes) -> bytes:
    if not b:
        return b
    i = rng.randrange(len(b))
    return b[:i] + bytes([b[i] ^ (1 << rng.randrange(8))]) + b[i + 1 :]


def _set_byte(rng: random.Random, b: bytes) -> bytes:
    if not b:
        return b
    i = rng.randrange(min(len(b), 128)) if rng.random() < 0.7 else rng.randrange(len(b))
    return b[:i] + bytes([rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))]) + b[i + 1 :]


def _insert(rng: random.Random, b: bytes) -> bytes:
    i = rng.randrange(len(b) + 1)
    return b[:i] + rng.randbytes(rng.choice((1, 2, 4, rng.randrange(1, 64)))) + b[i:]


def _delete(rng: random.Random, b: bytes) -> bytes:
    if not b:
        return b
    i = rng.randrange(len(b))
    return b[:i] + b[i + rng.randrange(1, 16) :]


def _duplicate(rng: random.Random, b: bytes) -> bytes:
    if not b:
        return b
    i = rng.randrange(len(b))
    j = min(len(b), i + rng.randrange(1, 64))
    return b[:j] + b[i:j] + b[j:]


def _random_tail(rng: random.Random, b: bytes) -> bytes:
    i = rng.randrange(len(b) + 1)
    return b[:i] + rng.randbytes(rng.randrange(0, 200))


def _lie_field(rng: random.Random, b: bytes) -> bytes:
    fields = frame_fields(b)
    return lie(rng, b, rng.choice(fields)) if fields else _flip(rng, b)


MUTATIONS: tuple[Callable[[random.Random, bytes], bytes], ...] = (
    _truncate, _flip, _flip, _set_byte, _set_byte, _insert, _delete, _duplicate, _random_tail,
    _lie_field, _lie_field, _lie_field, _lie_field,
)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        frame = rng.choice(MUTATIONS)(rng, frame)
    return frame


def relink(rng: random.Random, frame: bytes) -> tuple[bytes, int]:
    """The frame under another pcap link type (cooked v1/v2, BSD loopback, raw IP)."""
    if len(frame) < 14:
        return frame, 1
    etype, l3 = frame[12:14], frame[14:]
    choice = rng.randrange(5)
    if choice == 0:
        return struct.pack("!HHH", 0, 1, 6) + frame[6:12] + b"\x00\x00" + etype + l3, 113
    if choice == 1:
        head = etype + b"\x00\x00" + struct.pack("!IHBB", 2, 1, 0, 6) + frame[6:12] + b"\x00\x00"
        return head + l3, 276
    if choice == 2:
        family = 2 if etype == b"\x08\x00" else rng.choice((24, 28, 30))
        order = "<I" if rng.random() < 0.5 else ">I"  # the capturing host's byte order
        return struct.pack(order, family) + l3, 0
    if choice == 3:
        return l3, rng.choice((101, 12, 14, 228, 229))
    return frame, 1


# ---------------------------------------------------------------------------------------------
# What a parse may return


def check_parsed(result: object) -> None:
    if result is None:
        return
    if isinstance(result, Malformed):
        assert result.reason != INTERNAL_ERROR, "the parser's last-resort handler answered"
        return
    assert isinstance(result, Packet), result
    assert result.version in (4, 6)
    assert 0 <= result.sport <= 0xFFFF and 0 <= result.dport <= 0xFFFF
    assert 0 <= result.proto <= 0xFF and 0 <= result.flags <= 0xFF
    assert 0 <= result.seq < 1 << 32 and 0 <= result.ack < 1 << 32
    assert type(result.payload) is bytes
    assert 0 <= len(result.payload) <= result.payload_len <= result.wire_len, result
    if result.hint not in FULL_HINTS:
        assert len(result.payload) <= KEEP
    assert isinstance(result.hint, Hint)
    if result.dns:
        assert result.sport == 53 and result.proto in (TCP, UDP)
        assert len(result.dns) <= 64 * 17  # 64 answers, each for at most the whole CNAME chain
    for answer in result.dns:
        check_answer(answer)


def check_answer(answer: DnsAnswer) -> None:
    assert INERT_NAME.fullmatch(answer.name), answer
    ipaddress.ip_address(answer.address)
    assert 0 <= answer.ttl_s < 1 << 31


class Stopwatch:
    """The slowest call seen, in CPU time (a busy CI box does not count against the parser): a
    parser that can be made to spin shows up here."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.what: object = None

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        started = time.process_time()
        result = fn(*args)
        elapsed = time.process_time() - started
        if elapsed > self.worst:
            self.worst, self.what = elapsed, args
        return result

    def check(self) -> None:
        assert self.worst < SLOW_CALL_S, f"{self.worst:.3f} s for {self.what!r:.300}"


# ---------------------------------------------------------------------------------------------
# parse_frame / parse_ip


def test_every_truncation_of_a_sample_of_real_frames_is_handled(seeds: list[bytes]) -> None:
    n = 0
    for frame in seeds:
        for cut in range(len(frame) + 1):
            check_parsed(parse_frame(frame[:cut], 1))
            check_parsed(parse_ip(frame[14:cut]))
            n += 1
    CASES["truncations"] += n
    assert n > 15_000


def test_mutated_real_frames_never_raise(seeds: list[bytes], all_frames: list[bytes]) -> None:
    rng = random.Random(0x5EED_0001)
    watch = Stopwatch()
    n = 60_000
    for _ in range(n):
        frame = rng.choice(seeds) if rng.random() < 0.6 else rng.choice(all_frames)
        mutated = mutate(rng, frame)
        check_parsed(watch(parse_frame, mutated, 1))
        check_parsed(parse_ip(mutated[14:]))
        if rng.random() < 0.2:
            relinked, linktype = relink(rng, mutated)
            check_parsed(parse_frame(relinked, linktype))
    watch.check()
    CASES["frame mutations"] += n


def test_lying_length_fields_never_raise(seeds: list[bytes]) -> None:
    """Every length field of every sample frame, made to lie many ways: IPv4 IHL and total
    length, IPv6 payload and extension header lengths, TCP data offset, UDP length, TLS record,
    handshake and extension lengths, QUIC DCID/SCID/token/length fields, DNS counts, labels and
    compression pointers (loops included)."""
    rng = random.Random(0x5EED_0002)
    watch = Stopwatch()
    kinds: Counter[str] = Counter()
    n = 0
    for frame in seeds:
        fields = frame_fields(frame)
        for field in fields:
            kinds[field.kind] += 1
            for _ in range(40):
                lied = lie(rng, frame, field)
                if rng.random() < 0.3:  # and a second lie elsewhere
                    lied = lie(rng, lied, rng.choice(fields))
                check_parsed(watch(parse_frame, lied, 1))
                check_parsed(parse_ip(lied[14:]))
                n += 1
    watch.check()
    assert {"lo", "hi", "int", "varint", "label", "ptr"} <= set(kinds), kinds
    CASES["lying length fields"] += n
    assert n > 10_000


def test_random_bytes_never_raise() -> None:
    rng = random.Random(0x5EED_0003)
    n = 20_000
    linktypes = (0, 1, 12, 14, 101, 113, 228, 229, 276, 9999)
    starts = (b"", b"\x45", b"\x46", b"\x4f", b"\x60", b"\x45\x00\x00\x00", b"\x60\x00\x00\x00")
    for i in range(n):
        data = rng.choice(starts) + rng.randbytes(rng.choice((0, 1, 13, 19, 20, 39, 40, 60, 200)))
        check_parsed(parse_ip(data))
        check_parsed(parse_frame(data, linktypes[i % len(linktypes)]))
    CASES["random bytes"] += n


# ---------------------------------------------------------------------------------------------
# DNS: counts, names, pointers


def dns_message(rng: random.Random) -> bytes:
    """A response with hostile structure: lying counts, pointers anywhere (backwards, forwards,
    at themselves), 63-byte labels, CNAME chains and loops."""
    names: list[int] = []
    out = bytearray(struct.pack("!HHHHHH", 7, 0x8180, rng.choice((1, 1, 1, 0, 2, 0xFFFF)),
                                rng.choice((1, 2, 5, 64, 65, 0xFFFF)), 0, 0))

    def name() -> None:
        names.append(len(out))
        for _ in range(rng.choice((0, 1, 2, 3, 6))):
            size = rng.choice((1, 3, 63, 63, rng.randrange(1, 64)))
            out.append(size)
            out.extend(rng.choice((b"a", b"\x1b", b"<", b".", b"Z", b"-")) * size)
        if rng.random() < 0.5 and names:
            target = rng.choice((rng.choice(names), len(out), len(out) + 2, 12, 0x3FFF))
            out.extend(struct.pack("!H", 0xC000 | (target & 0x3FFF)))
        else:
            out.append(0)

    name()
    out.extend(struct.pack("!HH", 1, 1))
    for _ in range(rng.choice((0, 1, 3, 8, 70))):
        name()
        rtype = rng.choice((1, 5, 28, 5, 2, 0xFF))
        if rtype == 5:
            start = len(out) + 10
            names.append(start)
            body = bytes([3]) + b"cdn" + struct.pack("!H", 0xC000 | rng.choice(names))
        else:
            body = rng.randbytes(rng.choice((4, 16, 0, 3)))
        rdlen = len(body) if rng.random() < 0.9 else rng.randrange(0x10000)
        out.extend(struct.pack("!HHIH", rtype, 1, rng.choice((0, 60, 0xFFFFFFFF)), rdlen) + body)
    if rng.random() < 0.2:
        del out[rng.randrange(len(out)) :]
    return bytes(out)


def test_hostile_dns_responses_give_inert_answers_quickly() -> None:
    rng = random.Random(0x5EED_0004)
    watch = Stopwatch()
    n = 10_000
    for _ in range(n):
        msg = dns_message(rng)
        answers = watch(parse_dns_answers, msg)
        assert isinstance(answers, tuple)
        for answer in answers:
            check_answer(answer)
        frame = eth(ip4(UDP, udp(53, 40000, msg)), ETH_IP4)
        check_parsed(parse_frame(frame, 1))
    watch.check()
    CASES["dns messages"] += n


def test_dns_compression_loops_end() -> None:
    header = struct.pack("!HHHHHH", 7, 0x8180, 1, 1, 0, 0)
    question = b"\x01a\x00" + struct.pack("!HH", 1, 1)
    rr = struct.pack("!HHIH", 1, 1, 60, 4) + bytes(4)
    cases = [
        header + b"\xc0\x0c" + struct.pack("!HH", 1, 1) + b"\xc0\x0c" + rr,  # question -> itself
        header + question + b"\xc0\x13" + rr,  # answer name -> itself
        header + question + b"\x01b\xc0\x13" + rr,  # label then a pointer back to that label
        header + b"\xc0\x0e\xc0\x0c" + struct.pack("!HH", 1, 1) + b"\xc0\x0c" + rr,  # 2-cycle
        header + question + b"\xff\xff" + rr,  # pointer far beyond the message
        header + question + b"\x40abc\x00" + rr,  # reserved label type
    ]
    for msg in cases:
        assert parse_dns_answers(msg) == ()
        check_parsed(parse_frame(eth(ip4(UDP, udp(53, 1, msg)), ETH_IP4), 1))
    CASES["dns loops"] += len(cases)


@fuzz_settings(1000)
@given(
    labels=st.lists(st.binary(min_size=1, max_size=63), max_size=6),
    pointers=st.lists(st.integers(0, 0x3FFF), max_size=4),
    counts=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
    tail=st.binary(max_size=64),
)
def test_structured_dns_names_never_raise(
    labels: list[bytes], pointers: list[int], counts: tuple[int, int], tail: bytes
) -> None:
    qname = b"".join(bytes([len(label)]) + label for label in labels)
    ptrs = b"".join(struct.pack("!H", 0xC000 | p) for p in pointers)
    msg = (struct.pack("!HHHHHH", 1, 0x8180, *counts, 0, 0) + qname + ptrs + b"\x00"
           + struct.pack("!HH", 1, 1) + ptrs + qname + b"\x00" + struct.pack("!HHIH", 1, 1, 5, 4)
           + bytes(4) + tail)
    for answer in parse_dns_answers(msg):
        check_answer(answer)
    check_parsed(parse_frame(eth(ip6(UDP, udp(53, 1, msg)), ETH_IP6), 1))
    CASES["dns structured"] += 1


# ---------------------------------------------------------------------------------------------
# SNI: ClientHellos over TCP, QUIC Initials


def check_name(result: object) -> None:
    assert result is None or result is NEED_MORE or (
        isinstance(result, str) and INERT_NAME.fullmatch(result)), result


def assert_bounded(asm: SniAssembler) -> None:
    """The module's caps: 16 KiB of stream, 256 out-of-order pieces, a few key sets."""
    stream = asm._stream
    if stream is not None:
        assert len(stream.data) <= MAX_STREAM_BYTES
        assert len(stream._pending) <= 256
        assert 0 <= stream._pending_bytes <= MAX_STREAM_BYTES
        assert stream._pending_bytes == sum(len(v) for v in stream._pending.values())
    if asm._reader is not None:
        assert len(asm._reader._hs) <= MAX_STREAM_BYTES
    assert len(asm._keys) <= 4
    if asm.done:
        assert stream is None and not asm._keys  # a finished flow keeps nothing


def feed_tcp_strict(asm: SniAssembler, seq: int, payload: bytes, payload_len: int) -> str | None:
    """`feed_tcp` without its last-resort handler: a bug raises here."""
    if asm.done:
        return asm.name
    payload_len = max(payload_len, len(payload))
    if not payload_len:
        return None
    return asm._feed_tcp(seq & 0xFFFFFFFF, payload, payload_len)


def feed_quic_strict(asm: SniAssembler, datagram: bytes) -> str | None:
    if asm.done:
        return asm.name
    return asm._feed_quic(bytes(datagram))


def segments(rng: random.Random, stream: bytes, isn: int) -> list[tuple[int, bytes, int]]:
    """(seq, payload, payload_len) pieces of a stream: cut, reordered, duplicated, overlapping,
    and sometimes cut short by the caller as parse_ip does (payload_len > len(payload))."""
    inner = (rng.randrange(len(stream) + 1) for _ in range(rng.randrange(4)))
    cuts = sorted({0, len(stream), *inner})
    out = [(isn + 1 + a, stream[a:b], b - a) for a, b in zip(cuts, cuts[1:]) if b > a]
    if rng.random() < 0.3 and stream:
        a = rng.randrange(len(stream))
        b = min(len(stream), a + rng.randrange(1, 600))
        out.append((isn + 1 + a, stream[a:b], b - a))
    if rng.random() < 0.3:
        out = [(s, p[:KEEP], n) if rng.random() < 0.5 else (s, p, n) for s, p, n in out]
    if rng.random() < 0.2:
        out = [(s, p, n + rng.randrange(0, 3000)) for s, p, n in out]
    if rng.random() < 0.5:
        rng.shuffle(out)
    return out


def _tls_lie(rng: random.Random, hello: bytes) -> bytes:
    fields = tls_fields(hello, 0)
    if fields and rng.random() < 0.6:
        hello = lie(rng, hello, rng.choice(fields))
        return lie(rng, hello, rng.choice(fields)) if rng.random() < 0.2 else hello
    return mutate(rng, hello)


def test_mutated_client_hellos_never_raise_nor_grow(hellos: list[bytes]) -> None:
    rng = random.Random(0x5EED_0005)
    watch = Stopwatch()
    n = 15_000
    for _ in range(n):
        hello = _tls_lie(rng, rng.choice(hellos))
        result = watch(_RecordReader().advance, hello)
        check_name(result)
        assert client_hello_sni(hello) == result
        asm = SniAssembler()
        isn = rng.choice((0, 0xFFFFFFFF, 0xFFFFFF00, rng.randrange(1 << 32)))
        syn = rng.random() < 0.7
        if syn:
            asm.syn(isn)
        for seq, payload, payload_len in segments(rng, hello, isn):
            if rng.random() < 0.1:
                name = asm.feed_tcp(seq, payload, payload_len)  # the public entry point
            else:
                name = feed_tcp_strict(asm, seq, payload, payload_len)
            check_name(name)
            assert_bounded(asm)
    watch.check()
    CASES["client hello mutations"] += n


def test_endless_and_scattered_streams_stay_within_the_caps() -> None:
    rng = random.Random(0x5EED_0006)
    n = 0
    for _ in range(200):
        asm = SniAssembler()
        asm.syn(rng.randrange(1 << 32))
        isn = asm._isn
        assert isn is not None
        # A record header that promises a maximal hello, then pieces scattered everywhere.
        feed_tcp_strict(asm, isn, b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc", 9)
        for _ in range(400):
            off = rng.choice((rng.randrange(1 << 15), rng.randrange(1 << 32),
                              9 + rng.randrange(64)))
            size = rng.choice((1, 100, 1460, 16384, 40000))
            check_name(feed_tcp_strict(asm, isn + off, rng.randbytes(min(size, 2000)), size))
            assert_bounded(asm)
            n += 1
            if asm.done:
                break
    CASES["scattered streams"] += n


@fuzz_settings(800)
@given(
    cuts=st.lists(st.integers(1, len(HELLO) - 1), max_size=12, unique=True),
    retransmits=st.lists(st.tuples(st.integers(0, len(HELLO) - 1), st.integers(1, 400)),
                         max_size=4),
    isn=st.one_of(st.integers(0, (1 << 32) - 1), st.sampled_from([0xFFFFFFFF, 0xFFFFFF00])),
    order=st.randoms(use_true_random=False),
)
def test_any_order_of_faithful_segments_after_a_syn_gives_the_name(
    cuts: list[int], retransmits: list[tuple[int, int]], isn: int, order: random.Random
) -> None:
    bounds = [0, *sorted(cuts), len(HELLO)]
    pieces = [(a, HELLO[a:b]) for a, b in zip(bounds, bounds[1:])]
    pieces += [(a, HELLO[a : a + size]) for a, size in retransmits]
    order.shuffle(pieces)
    asm = SniAssembler()
    asm.syn(isn)
    for off, data in pieces:
        check_name(feed_tcp_strict(asm, isn + 1 + off, data, len(data)))
        assert_bounded(asm)
    assert asm.name == BOB
    CASES["faithful tcp segmentations"] += 1


@pytest.fixture(scope="module")
def initials() -> list[bytes]:
    """Client Initial datagrams: the RFC vectors, and ours with other DCID and PN lengths, a
    token, a hello in two datagrams, and a coalesced Initial + garbage."""
    out = [QUIC_V1_FIXTURE, QUIC_V2_FIXTURE]
    for version in (QUIC_V1, QUIC_V2):
        out += quic_hello(version, DCID, pieces=1)
        out += quic_hello(version, b"", pieces=2)
        out += quic_hello(version, bytes(range(20)), pieces=3)
        out.append(initial(version, DCID, crypto(0, HELLO_MSG), pn=7, pn_len=4, token=b"t" * 40))
        out.append(initial(version, DCID, b"\x01" + crypto(0, HELLO_MSG)) + bytes(50))
    return out


def test_mutated_quic_initials_never_raise_nor_grow(initials: list[bytes]) -> None:
    rng = random.Random(0x5EED_0007)
    n = 3_000
    for _ in range(n):
        asm = SniAssembler()
        for _ in range(rng.choice((1, 1, 2, 3))):
            dgram = rng.choice(initials)
            fields = _quic_fields(dgram, 0, len(dgram))
            if fields and rng.random() < 0.6:
                dgram = lie(rng, dgram, rng.choice(fields))
            elif rng.random() < 0.8:
                dgram = mutate(rng, dgram)
            if rng.random() < 0.1:
                check_name(asm.feed_quic(dgram))
            else:
                check_name(feed_quic_strict(asm, dgram))
            assert_bounded(asm)
    CASES["quic initial mutations"] += n


def hostile_frames(rng: random.Random) -> bytes:
    """Decrypted-Initial payloads that lie: CRYPTO offsets near and past the cap, lengths longer
    or shorter than the data, ACK frames with absurd range counts, frames not allowed in
    Initials, truncated varints."""
    out = b""
    for _ in range(rng.randrange(1, 7)):
        kind = rng.randrange(7)
        if kind == 0:
            out += bytes(rng.choice((1, 20, 500)))
        elif kind == 1:
            out += b"\x01"
        elif kind == 2:
            out += bytes([rng.choice((2, 3))]) + b"".join(
                varint(rng.choice((0, 1, 63, 1 << 20, (1 << 62) - 1))) for _ in range(4))
        elif kind == 3:
            off = rng.choice((0, 1, 100, MAX_STREAM_BYTES - 1, MAX_STREAM_BYTES, (1 << 62) - 1,
                              rng.randrange(MAX_STREAM_BYTES)))
            data = HELLO_MSG[off % len(HELLO_MSG) :][: rng.randrange(1, 600)]
            length = rng.choice((len(data), len(data) + 1, max(0, len(data) - 1), (1 << 30) - 1))
            out += b"\x06" + varint(off) + varint(length) + data
        elif kind == 4:
            out += bytes([rng.choice((0x08, 0x1C, 0x1E, 0x40, 0xFF))]) + rng.randbytes(8)
        elif kind == 5:
            out += bytes([0x06, 0xC0])  # a varint cut short
        else:
            out += crypto(0, b"\x01\xff\xff\xff" + rng.randbytes(40))  # a hello of 16 MB
    return out


def test_hostile_initial_payloads_never_raise_nor_grow() -> None:
    rng = random.Random(0x5EED_0008)
    n = 3_000
    for _ in range(n):
        asm = SniAssembler()
        version = rng.choice((QUIC_V1, QUIC_V2))
        for pn in range(rng.choice((1, 2, 4))):
            frames = hostile_frames(rng)
            if rng.random() < 0.3:
                frames = crypto(0, HELLO_MSG[: rng.randrange(len(HELLO_MSG))]) + frames
            dgram = initial(version, DCID, frames, pn=pn, pn_len=rng.choice((1, 2, 4)))
            check_name(feed_quic_strict(asm, dgram))
            assert_bounded(asm)
    CASES["hostile initial payloads"] += n


@fuzz_settings(400)
@given(
    version=st.sampled_from([QUIC_V1, QUIC_V2]),
    pieces=st.integers(1, 5),
    dcid=st.binary(max_size=20),
    order=st.randoms(use_true_random=False),
)
def test_any_order_of_faithful_initials_gives_the_name(
    version: int, pieces: int, dcid: bytes, order: random.Random
) -> None:
    datagrams = quic_hello(version, dcid, pieces)
    order.shuffle(datagrams)
    asm = SniAssembler()
    for dgram in datagrams:
        check_name(feed_quic_strict(asm, dgram))
        assert_bounded(asm)
    assert asm.name == BOB
    CASES["faithful quic initials"] += 1


# ---------------------------------------------------------------------------------------------
# The engine: a ledger of held tokens


class Ledger:
    """Every HOLD token comes back exactly once, as a Release or a Discard; nothing is released
    for an upload once it was denied; the held counters equal what the engine holds."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.outstanding: set[Any] = set()
        self.denied: set[int] = set()
        self.released = 0
        self.discarded = 0

    def verdict(self, token: Any, verdict: Verdict) -> None:
        assert isinstance(verdict, Verdict)
        if verdict is Verdict.HOLD:
            assert token is not None and token not in self.outstanding, token
            self.outstanding.add(token)

    def drain(self) -> list[Any]:
        actions = self.engine.take_actions()
        for action in actions:
            if isinstance(action, Release):
                assert action.upload_id not in self.denied, f"released for denied {action}"
                self._give_back(action.tokens)
                self.released += len(action.tokens)
            elif isinstance(action, Discard):
                tokens = action.tokens
                self._give_back(tokens)
                self.discarded += len(tokens)
            elif isinstance(action, UploadDecided) and action.outcome in DENYING_OUTCOMES:
                self.denied.add(action.upload["id"])
        return actions

    def _give_back(self, tokens: Iterable[Any]) -> None:
        for token in tokens:
            assert token in self.outstanding, f"token {token!r} was not held (or came back twice)"
            self.outstanding.remove(token)

    def check(self) -> None:
        eng = self.engine
        assert eng.held_packets >= 0 and eng.held_bytes >= 0
        held = []
        for upload in eng.uploads.values():
            assert upload.held_bytes == sum(h.size for h in upload.held)
            if upload.held:
                assert upload.state is UploadState.PENDING, upload
            held += upload.held
        for flow in eng.flows.values():
            if flow.burst:
                assert flow.state is FlowState.PROVISIONAL, flow.key
            held += flow.burst
        assert eng.held_packets == len(held)
        assert eng.held_bytes == sum(h.size for h in held)
        # the caps in total bound memory: provisional bursts count too (design.md 5)
        cfg = eng.config
        assert eng.held_packets <= cfg.max_held_packets_total, (eng.held_packets, cfg)
        assert eng.held_bytes <= cfg.max_held_bytes_total, (eng.held_bytes, cfg)
        tokens = [h.token for h in held]
        assert len(set(tokens)) == len(tokens) and set(tokens) == self.outstanding
        when = eng.next_timer()
        assert when is None or when == when  # never NaN

    def finish(self, decide: Callable[[int], Verb] = lambda _: Verb.DENY) -> None:
        """An hour later, with every pending upload decided: nothing may be left held."""
        eng = self.engine
        now = eng.now if eng.now > float("-inf") else 0.0
        eng.handle_timer(now + 3600.0)
        self.drain()
        for upload in eng.pending():
            eng.decide(upload.id, Decision(decide(upload.id), by="fuzz"), now + 3600.0)
            self.drain()
        eng.handle_timer(now + 7200.0)
        self.drain()
        self.check()
        lost = sorted(map(repr, self.outstanding))[:5]
        assert not self.outstanding, f"tokens never given back: {lost}"


# ---------------------------------------------------------------------------------------------
# Engine over real captures: garbage around well-formed flows changes nothing


OTHER_HOSTS = ("192.0.2.7", "198.51.100.9", "10.254.0.1", "2001:db8::bad", "203.0.113.5")


@dataclass
class Run:
    verdicts: list[Verdict]
    actions: list[Any]
    uploads: dict[int, tuple[Any, ...]]
    flows: list[dict[str, Any]]


def run_engine(packets: list[tuple[float, Packet]], device: str, mode: Mode,
               garbage: dict[int, list[tuple[float, Packet | Malformed | None]]] | None = None
               ) -> Run:
    config = replace(GuardConfig(), devices=(DeviceConfig(name="speaker", address=device,
                                                          mode=mode),))
    eng = Engine(config, RULES, expire_on_idle=True)
    ledger = Ledger(eng)
    verdicts: list[Verdict] = []
    actions: list[Any] = []
    uploads: dict[int, Any] = {}

    def collect() -> None:
        for action in ledger.drain():
            actions.append(action)
            if isinstance(action, (UploadHeld, UploadSeen, UploadDecided)):
                upload = eng.uploads.get(action.upload["id"])
                if upload is not None:
                    uploads[upload.id] = upload

    for index, (ts, pkt) in enumerate(packets):
        for j, (gts, junk) in enumerate((garbage or {}).get(index, ())):
            verdict = eng.receive(junk, gts, ("garbage", index, j))
            assert verdict in (Verdict.ACCEPT, Verdict.DROP), (junk, verdict)
            ledger.verdict(("garbage", index, j), verdict)
            collect()
        verdict = eng.receive(pkt, ts, index)
        ledger.verdict(index, verdict)
        verdicts.append(verdict)
        collect()
    ledger.finish()
    collect()
    summary = {
        u.id: (u.start, u.end, u.bytes, u.packets, u.action, u.outcome, u.leaked_bytes, u.host,
               u.category, u.turn)
        for u in uploads.values()
    }
    return Run(verdicts, actions, summary, [f.summary() for f in eng.iter_flows()])


def garbage_for(rng: random.Random, trace: Trace, packets: list[tuple[float, Packet]],
                seeds: list[bytes]) -> dict[int, list[tuple[float, Packet | Malformed | None]]]:
    """Malformed frames, mutated frames and re-addressed real packets, none of them from or to
    the speaker, at times between the well-formed packets around them (or earlier: clamped)."""
    known = {p.src for _, p in packets} | {p.dst for _, p in packets}
    frames = [f for _, f in trace.frames]
    out: dict[int, list[tuple[float, Packet | Malformed | None]]] = {}
    for index in range(1, len(packets)):
        if rng.random() >= 0.8:
            continue
        before, after = packets[index - 1][0], packets[index][0]
        junk: list[tuple[float, Packet | Malformed | None]] = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            when = rng.choice((before, after, before + (after - before) * rng.random(),
                               before - rng.random() * 30))
            kind = rng.randrange(4)
            if kind == 0:
                parsed: Packet | Malformed | None = parse_frame(
                    mutate(rng, rng.choice(frames) if rng.random() < 0.7 else rng.choice(seeds)), 1)
            elif kind == 1:
                parsed = parse_frame(rng.randbytes(rng.randrange(80)), rng.choice((1, 101)))
            elif kind == 2:
                parsed = rng.choice((None, Malformed("fuzz"),
                                     Malformed("fuzz", "68:db:f5:00:00:01")))
            else:
                parsed = packets[rng.randrange(len(packets))][1]
            if isinstance(parsed, Packet):
                # From and to somebody else, and no DNS answer about an address the speaker uses.
                parsed = replace(
                    parsed,
                    src=rng.choice(OTHER_HOSTS) if parsed.src == trace.device or rng.random() < 0.5
                    else parsed.src,
                    dst=rng.choice(OTHER_HOSTS) if parsed.dst == trace.device else parsed.dst,
                    dns=tuple(a for a in parsed.dns if a.address not in known),
                    # somebody else's frame: another MAC too (the engine knows a device
                    # configured by address by its MAC once it has seen one)
                    src_mac="02:00:5e:00:53:01" if parsed.src_mac else None,
                )
                if trace.device in (parsed.src, parsed.dst):
                    continue
            junk.append((when, parsed))
        out[index] = junk
    return out


def test_garbage_from_other_hosts_changes_no_verdict_of_real_flows(
    traces: list[Trace], seeds: list[bytes]
) -> None:
    rng = random.Random(0x5EED_0009)
    n = 0
    modes = (Mode.STRICT, Mode.FOLLOWUPS, Mode.MONITOR)
    uploads_seen = 0
    for i, trace in enumerate(traces):
        packets = [(ts, p) for ts, f in trace.frames if isinstance(p := parse_frame(f, 1), Packet)]
        mode = modes[i % len(modes)]
        clean = run_engine(packets, trace.device, mode)
        garbage = garbage_for(rng, trace, packets, seeds)
        noisy = run_engine(packets, trace.device, mode, garbage)
        assert noisy.verdicts == clean.verdicts, trace.name
        assert noisy.uploads == clean.uploads, trace.name
        assert noisy.actions == clean.actions, trace.name
        assert noisy.flows == clean.flows, trace.name
        uploads_seen += len(clean.uploads)
        n += sum(len(v) for v in garbage.values())
    assert uploads_seen >= 10  # the comparison covered real uploads, not only idle flows
    CASES["engine garbage packets"] += n


def test_mutated_speaker_packets_never_break_the_engine(traces: list[Trace]) -> None:
    """The speaker's own packets, mutated (so lengths, flags, seqs and payloads lie), through a
    strict engine: nothing escapes, the ledger balances."""
    rng = random.Random(0x5EED_000A)
    n = 0
    for i, trace in enumerate(traces):
        config = replace(GuardConfig(), devices=(DeviceConfig(name="speaker", address=trace.device,
                                                              mode=Mode.STRICT),),
                         max_held_packets_per_upload=rng.choice((4, 512)))
        eng = Engine(config, RULES, expire_on_idle=i % 2 == 0)
        ledger = Ledger(eng)
        for index, (ts, frame) in enumerate(trace.frames):
            if rng.random() < 0.5:
                frame = mutate(rng, frame)
                n += 1
            parsed = parse_frame(frame, 1)
            token = ("p", index)
            ledger.verdict(token, eng.receive(parsed, ts + rng.choice((0, 0, -1, 0.5)), token))
            ledger.drain()
            if index % 50 == 0:
                ledger.check()
                for upload in eng.pending()[:1]:
                    eng.decide(upload.id, Decision(rng.choice((Verb.ALLOW, Verb.DENY))), ts)
                    ledger.drain()
        ledger.finish(lambda _: rng.choice((Verb.ALLOW, Verb.DENY)))
    CASES["engine mutated speaker packets"] += n


# ---------------------------------------------------------------------------------------------
# The engine fed Packet values directly

DEV4, DEV6, DEV_MAC = "198.18.10.10", "2001:2:0:10::10", "68:db:f5:90:19:64"
MAC_ONLY, MAC_ONLY_ADDR = "f4:f5:d8:00:00:01", "198.18.10.11"
OTHER_MAC = "02:00:00:00:00:99"
REMOTES = ("198.19.0.10", "198.19.0.11", "2001:2:0:20::10", "198.18.10.99")
QUIC_DGRAM = quic_hello(QUIC_V1, DCID)[0]

PAYLOADS = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.just(HELLO),
    st.just(HELLO[:100]),
    st.just(QUIC_DGRAM),
    st.just(b"\x17\x03\x03" + bytes(61)),
    st.just(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)),
)
NAMES = st.one_of(
    st.sampled_from(["bob-dispatch-prod-na.amazon.com", "device-metrics-us.amazon.com",
                     "guzzoni.apple.com", "x.example", "<b>\x1b[2J;rm -rf /", "a" * 300]),
    st.text(max_size=40),
)


# Strategies are built once: hypothesis validates each strategy object on first use, and a
# composite that builds its strategies per draw spends most of its time doing that.
_BOOLS = st.booleans()
_DEVICES = st.sampled_from([DEV4, DEV4, DEV6, MAC_ONLY_ADDR, "198.18.10.99"])
_REMOTES = st.sampled_from(REMOTES)
_PROTOS = st.sampled_from([TCP, TCP, UDP, 1])
_DEV_PORTS = st.sampled_from([40000, 40001, 50000])
_REM_PORTS = st.sampled_from([443, 443, 53, 123, 5353, 3478, 8080])
_SIZES = st.one_of(st.just(0), st.integers(1, 46), st.integers(47, 1460),
                   st.sampled_from([1448, 1460, 65535]))
_SEQS = st.one_of(st.sampled_from([1000 + 1448 * k for k in range(14)]),
                  st.integers(0, (1 << 32) - 1))
_U32 = st.integers(0, (1 << 32) - 1)
_MACS = st.sampled_from([None, DEV_MAC, MAC_ONLY, OTHER_MAC])
_ANSWERS = st.lists(st.builds(DnsAnswer, NAMES, _REMOTES, st.integers(0, 1 << 31)), max_size=3)
_HEADER_BYTES = st.sampled_from([20, 28, 40, 60, 0])
_FLAGS = st.sampled_from([ACK, ACK | PSH, SYN, SYN | ACK, FIN | ACK, RST, RST | ACK, 0, 0xFF])
_HINTS = st.sampled_from(list(Hint))


@st.composite
def packets(draw: st.DrawFn) -> Packet:
    """Any Packet the parser could hand the engine, and some it could not (a payload cut to
    the length, addresses of either family, MACs of the speaker, of another speaker, of a
    spoofer), between the configured speakers, a stranger and a few remotes."""
    up = draw(_BOOLS)
    device, remote, proto = draw(_DEVICES), draw(_REMOTES), draw(_PROTOS)
    dev_port, rem_port = draw(_DEV_PORTS), draw(_REM_PORTS)
    size, payload = draw(_SIZES), draw(PAYLOADS)
    if draw(_BOOLS):
        size = max(size, len(payload))
    mac = draw(_MACS) if up else None
    dns: tuple[DnsAnswer, ...] = ()
    if rem_port == 53 and not up and draw(_BOOLS):
        dns = tuple(draw(_ANSWERS))
    src, sport, dst, dport = ((device, dev_port, remote, rem_port) if up
                              else (remote, rem_port, device, dev_port))
    tcp_ = proto == TCP
    return Packet(
        version=6 if ":" in src else 4, src=src, dst=dst, proto=proto,
        sport=sport if proto != 1 else 0, dport=dport if proto != 1 else 0,
        payload_len=size, wire_len=size + draw(_HEADER_BYTES), src_mac=mac,
        flags=draw(_FLAGS) if tcp_ else 0, seq=draw(_SEQS) if tcp_ else 0,
        ack=draw(_U32) if tcp_ else 0, hint=draw(_HINTS), payload=payload[:size], dns=dns,
    )


# A few flows that bursts and names are aimed at, so uploads form within a handful of steps:
# (device address, MAC, remote, proto, device port, remote port).
FLOWS = (
    (DEV4, None, REMOTES[0], TCP, 40000, 443),
    (DEV4, None, REMOTES[0], TCP, 40001, 443),
    (DEV6, None, REMOTES[2], TCP, 40000, 443),
    (DEV4, None, REMOTES[1], UDP, 50000, 443),
    (MAC_ONLY_ADDR, MAC_ONLY, REMOTES[0], TCP, 40000, 443),
    (MAC_ONLY_ADDR, OTHER_MAC, REMOTES[0], TCP, 40002, 443),  # a spoofer with its address
)
HOSTS = (BOB, "device-metrics-us.amazon.com", "alexa-comms-mobile-service.amazon.com",
         "x.example", "\x1b]0;<b>evil</b>;$(reboot)")
_DT = st.one_of(st.floats(0, 0.06), st.floats(0, 0.06), st.floats(0, 2), st.floats(-5, 0),
                st.sampled_from([0.0, 0.2, 1.0, 8.0, 20.0, 130.0, 1000.0]))
STEPS = st.one_of(
    st.tuples(st.just("packet"), _DT, packets()),
    # a run of upstream payload on one flow: the detector's food
    st.tuples(st.just("burst"), _DT, st.integers(0, len(FLOWS) - 1), st.integers(1, 14),
              st.sampled_from([1460, 1460, 1200, 437, 118, 30]),
              st.sampled_from([0.001, 0.02, 0.05, 0.3]), st.integers(0, 3),
              st.sampled_from([None, None, Verb.ALLOW, Verb.DENY])),  # then a person answers
    # a DNS answer naming a remote (flows opened afterwards take the name and its category)
    st.tuples(st.just("name"), _DT, st.integers(0, len(FLOWS) - 1), st.sampled_from(HOSTS)),
    st.tuples(st.just("timer"), st.floats(-1, 30)),
    st.tuples(st.just("decide"), st.integers(0, 5), st.sampled_from(list(Verb)),
              st.sampled_from([Scope.ONCE, Scope.ONCE, Scope.FOR, Scope.ALWAYS])),
    st.tuples(st.just("expire"), st.sampled_from([0.0, 200.0, 1000.0])),
    st.tuples(st.just("mode"), st.sampled_from(["kitchen", "bedroom"]),
              st.sampled_from(list(Mode))),
    st.tuples(st.just("window"), st.sampled_from(list(WindowKind)), st.floats(0.5, 60)),
)


class Script:
    """Turns burst and name steps into packets, keeping each flow's sequence numbers right."""

    def __init__(self) -> None:
        self.seq: dict[int, int] = {}

    def burst(self, flow: int, count: int, size: int, retransmits: int) -> Iterable[Packet]:
        dev, mac, remote, proto, dport, rport = FLOWS[flow]
        seq = self.seq.get(flow, 1000)
        for k in range(count):
            pkt = Packet(6 if ":" in dev else 4, dev, remote, proto, dport, rport, size,
                         size + 40, src_mac=mac, flags=ACK | PSH if proto == TCP else 0,
                         seq=seq if proto == TCP else 0, ack=7 if proto == TCP else 0,
                         hint=Hint.TLS if proto == TCP else Hint.QUIC,
                         payload=(b"\x17\x03\x03" + bytes(61))[:size] if proto == TCP
                         else (b"\x40" + bytes(63))[:size])
            yield pkt
            if k < retransmits:
                yield pkt  # the same segment again: held once
            seq = (seq + size) & 0xFFFFFFFF
        self.seq[flow] = seq

    @staticmethod
    def name(flow: int, host: str) -> Packet:
        dev, _, remote, _, _, _ = FLOWS[flow]
        return Packet(4, "198.18.10.1", dev, UDP, 53, 33333, 60, 88, hint=Hint.DNS,
                      dns=(DnsAnswer(host, remote, 300),))


_MODES = st.sampled_from([Mode.STRICT, Mode.STRICT, Mode.FOLLOWUPS, Mode.MONITOR, Mode.OFF])
_QUIC = st.sampled_from(["hold", "block"])
_CONFIG = st.fixed_dictionaries({
    "window_segments": st.sampled_from([1, 2, 3, 10]),
    "hold_timeout_s": st.sampled_from([0.5, 5.0, 20.0]),
    "max_turn_s": st.sampled_from([0.3, 8.0]),
    "followup_window_s": st.sampled_from([0.5, 10.0]),
    "max_held_packets_per_upload": st.sampled_from([1, 5, 512, 512, 512]),
    "max_held_bytes_per_upload": st.sampled_from([1500, 1 << 20, 1 << 20]),
    "max_held_packets_total": st.sampled_from([3, 4096, 4096]),
    "max_held_bytes_total": st.sampled_from([3000, 8 << 20, 8 << 20]),
})
_STANDING = st.lists(st.builds(StandingRule, st.sampled_from(["kitchen", "bedroom"]),
                               st.sampled_from(list(Verb)),
                               st.sampled_from([None, BOB, "guzzoni.apple.com"]),
                               st.sampled_from([None, "voice", "unknown"])), max_size=1)
_IDS = st.integers(1, 1 << 40)


@st.composite
def engines(draw: st.DrawFn) -> Engine:
    """Two speakers (one by address, one by MAC only) in any mode, with small caps and short
    timeouts so that caps, expiries and long turns happen within a few steps."""
    devices = (
        DeviceConfig(name="kitchen", address=DEV4, address6=(DEV6,), mode=draw(_MODES),
                     quic=draw(_QUIC)),
        DeviceConfig(name="bedroom", mac=MAC_ONLY, mode=draw(_MODES)),
    )
    config = replace(GuardConfig(), devices=devices, **draw(_CONFIG))
    standing = [r for r in draw(_STANDING) if (r.host is None) != (r.category is None)]
    return Engine(config, RULES, standing=standing, expire_on_idle=draw(_BOOLS),
                  next_upload_id=draw(_IDS))


@fuzz_settings(4000)
@given(eng=engines(), steps=st.lists(STEPS, min_size=1, max_size=40),
       start=st.sampled_from([0.0, 1_541_712_345.0]), verbs=st.randoms(use_true_random=False))
def test_engine_invariants_under_arbitrary_packets_and_decisions(
    eng: Engine, steps: list[tuple[Any, ...]], start: float, verbs: random.Random
) -> None:
    ledger = Ledger(eng)
    script = Script()
    now = start
    token = 0
    for step in steps:
        kind = step[0]
        if kind == "packet":
            now += step[1]
            token += 1
            ledger.verdict(token, eng.receive(step[2], now, token))
        elif kind == "burst":
            now += step[1]
            for pkt in script.burst(step[2], step[3], step[4], step[6]):
                token += 1
                ledger.verdict(token, eng.receive(pkt, now, token))
                ledger.drain()
                now += step[5]
            pending = eng.pending()
            if step[7] is not None and pending:
                eng.decide(pending[-1].id, Decision(step[7], by="person"), now)
        elif kind == "name":
            now += step[1]
            ledger.verdict(None, eng.receive(script.name(step[2], step[3]), now))
        elif kind == "timer":
            now += step[1]
            eng.handle_timer(now)
        elif kind == "decide":
            pending = eng.pending()
            upload_id = pending[step[1] % len(pending)].id if pending and step[1] < 5 else 10**15
            decision = Decision(step[2], step[3], 60.0 if step[3] is Scope.FOR else None, "fuzz")
            try:
                eng.decide(upload_id, decision, now)
            except UnknownUpload:
                assert upload_id == 10**15
        elif kind == "expire":
            eng.expire_flows(now + step[1])
        elif kind == "mode":
            eng.set_mode(step[1], step[2])
        else:
            eng.set_windows([*eng.windows, Window("kitchen", step[1], now + step[2])])
        ledger.drain()
        ledger.check()
    ledger.finish(lambda _: verbs.choice((Verb.ALLOW, Verb.DENY)))
    CASES["engine step sequences"] += 1


@fuzz_settings(800)
@given(pkts=st.lists(st.tuples(st.floats(-2, 0.3), packets()), max_size=30))
def test_engine_never_raises_on_packets_alone(pkts: list[tuple[float, Packet]]) -> None:
    devices = (DeviceConfig(name="kitchen", address=DEV4, address6=(DEV6,)),
               DeviceConfig(name="bedroom", mac=MAC_ONLY, mode=Mode.FOLLOWUPS))
    eng = Engine(replace(GuardConfig(), devices=devices, window_segments=3), RULES)
    ledger = Ledger(eng)
    now = 1000.0
    for i, (dt, pkt) in enumerate(pkts):
        now += dt
        ledger.verdict(i, eng.receive(pkt, now, i))
        ledger.drain()
    ledger.check()
    ledger.finish()
    CASES["engine packet sequences"] += 1


@pytest.mark.parametrize("how", ["quiet window", "cap"])
def test_packet_that_completes_a_denied_window_gets_one_verdict(how: str) -> None:
    devices = (DeviceConfig(name="echo", address=DEV4),)
    config = replace(GuardConfig(), devices=devices,
                     max_held_packets_per_upload=4 if how == "cap" else 512)
    eng = Engine(config, RULES)
    if how == "quiet window":
        eng.set_windows([Window("echo", WindowKind.QUIET, 10_000.0)])
    verdicts = {}
    for k in range(10):  # a start burst: ten full segments within 10 ms fill the window
        pkt = Packet(4, DEV4, REMOTES[0], TCP, 40000, 443, 1460, 1500, flags=ACK | PSH,
                     seq=1000 + 1460 * k)
        verdicts[k] = eng.receive(pkt, 100.0 + 0.001 * k, k)
    returned = [t for a in eng.take_actions() if isinstance(a, (Release, Discard))
                for t in a.tokens]
    assert sorted(returned) == sorted(t for t, v in verdicts.items() if v is Verdict.HOLD)


# ---------------------------------------------------------------------------------------------
# The total


def test_total_fuzz_cases_is_at_least_100000(capsys: pytest.CaptureFixture[str]) -> None:
    expected = {
        "truncations", "frame mutations", "lying length fields", "random bytes", "dns messages",
        "dns loops", "dns structured", "client hello mutations", "scattered streams",
        "faithful tcp segmentations", "quic initial mutations", "hostile initial payloads",
        "faithful quic initials", "engine garbage packets", "engine mutated speaker packets",
        "engine step sequences", "engine packet sequences",
    }
    if not expected <= set(CASES):
        missing_or_fail(f"only part of the module ran (missing {sorted(expected - set(CASES))})")
    total = sum(CASES.values())
    with capsys.disabled():
        print(f"\nfuzz cases: {total:,} in total")
        for name, count in sorted(CASES.items(), key=lambda kv: -kv[1]):
            print(f"  {count:>8,}  {name}")
    assert total >= TOTAL_CASES_MIN
