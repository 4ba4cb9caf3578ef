"""Server names from the first flight of a connection: TLS ClientHello SNI over TCP, and the
ClientHello inside QUIC v1/v2 Initial packets (RFC 9001, RFC 9369).

Rules of this module: pure and total, nothing here raises on any input and nothing reads the
clock; the only state is per flow (`SniAssembler`) and bounded (16 KiB of stream, 256
out-of-order pieces). Names are attacker-controlled text and leave this module through
`guard.core.packet.normalise_name` only (lower-case, LDH + '.' + '_', others '?', at most 253 chars).
"""

from __future__ import annotations

import hmac
import struct
from hashlib import sha256
from typing import Any, ClassVar, Final, Self

from guard.core.packet import normalise_name

__all__ = ["NEED_MORE", "NeedMore", "SniAssembler", "client_hello_sni", "parse_client_hello"]

# How much of a client's first flight we are willing to buffer per flow. Real ClientHellos are
# 0.2-2 KB (post-quantum key shares push them to ~1.8 KB); 16 KiB is one maximal TLS record.
MAX_STREAM_BYTES: Final = 16384
MAX_HELLO_BYTES: Final = MAX_STREAM_BYTES
_MAX_RECORD: Final = 16384  # RFC 8446 5.1: TLSPlaintext.length MUST NOT exceed 2^14
_MAX_PIECES: Final = 256  # out-of-order pieces held per flow; real hellos arrive in < 20
_MAX_QUIC_DATAGRAMS: Final = 16  # client Initials before we stop trying (a hello needs 1-3)


class NeedMore:
    """Sentinel: the bytes so far are a valid prefix of a ClientHello; feed more.

    Falsy, so `if name:` never mistakes it for a name."""

    __slots__ = ()
    _instance: ClassVar[NeedMore | None] = None  # one instance: compare with `is`

    def __new__(cls) -> Self:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance  # type: ignore[return-value]

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore()


# ---------------------------------------------------------------------------------------------
# ClientHello


def parse_client_hello(body: bytes) -> str | None:
    """The server_name of a ClientHello message body (after the 4-byte handshake header), as in
    RFC 8446 4.1.2 and RFC 6066 3. None when it has no SNI or does not parse."""
    try:
        return _parse_client_hello(body)
    except (IndexError, struct.error, ValueError):
        return None


def _parse_client_hello(body: bytes) -> str | None:
    n = len(body)
    off = 34  # legacy_version (2) + random (32)
    if off >= n:
        return None
    sid_len = body[off]
    if sid_len > 32:
        return None
    off += 1 + sid_len
    (cs_len,) = struct.unpack_from("!H", body, off)
    if cs_len < 2 or cs_len & 1:
        return None
    off += 2 + cs_len
    if off >= n:
        return None
    comp_len = body[off]
    if comp_len < 1:
        return None
    off += 1 + comp_len
    if off + 2 > n:
        return None  # no extensions at all (legal before TLS 1.3): no SNI
    (ext_len,) = struct.unpack_from("!H", body, off)
    off += 2
    end = off + ext_len
    if end > n:
        return None
    while off + 4 <= end:
        etype, elen = struct.unpack_from("!HH", body, off)
        off += 4
        if off + elen > end:
            return None
        if etype == 0:  # server_name
            (list_len,) = struct.unpack_from("!H", body, off)
            p = off + 2
            list_end = p + list_len
            if list_end > off + elen:
                return None
            while p + 3 <= list_end:
                name_type = body[p]
                (name_len,) = struct.unpack_from("!H", body, p + 1)
                p += 3
                if p + name_len > list_end:
                    return None
                if name_type == 0:  # host_name
                    return normalise_name(bytes(body[p : p + name_len]))
                p += name_len
            return None
        off += elen
    return None


class _RecordReader:
    """Incremental walk over TLS records, collecting handshake bytes until the first handshake
    message (which must be a ClientHello) is complete. Each record is read once, so feeding a
    stream in many small pieces stays linear."""

    __slots__ = ("_hs", "_pos")

    def __init__(self) -> None:
        self._pos = 0
        self._hs = bytearray()

    def advance(self, stream: bytes | bytearray) -> str | None | NeedMore:
        n = len(stream)
        pos = self._pos
        hs = self._hs
        try:
            while True:
                if len(hs) >= 4:
                    mlen = (hs[1] << 16) | (hs[2] << 8) | hs[3]
                    if mlen > MAX_HELLO_BYTES:
                        return None
                    if len(hs) >= 4 + mlen:
                        return parse_client_hello(bytes(hs[4 : 4 + mlen]))
                avail = n - pos
                # Judge each header byte as soon as it arrives, so a flow that is not TLS (or
                # joined mid-stream) is given up on at its first segment.
                if avail < 1:
                    return NEED_MORE
                if stream[pos] != 22:  # handshake
                    return None
                if avail >= 2 and stream[pos + 1] != 3:
                    return None
                if avail >= 3 and stream[pos + 2] > 4:  # record version 3.0 to 3.4
                    return None
                if avail >= 5:
                    rlen = (stream[pos + 3] << 8) | stream[pos + 4]
                    if rlen == 0 or rlen > _MAX_RECORD:
                        return None
                if not hs and avail >= 6 and stream[pos + 5] != 1:  # ClientHello
                    return None
                if avail < 5 or avail < 5 + rlen:
                    return NEED_MORE
                hs += stream[pos + 5 : pos + 5 + rlen]
                pos += 5 + rlen
                if hs[0] != 1:
                    return None
        finally:
            self._pos = pos


def client_hello_sni(data: bytes) -> str | None | NeedMore:
    """The SNI of the ClientHello at the start of a TLS client stream (records included).

    A hello split over several records or segments is handled; `NEED_MORE` when `data` is a
    valid but incomplete prefix; None when it is not a ClientHello or carries no server name."""
    try:
        return _RecordReader().advance(data)
    except Exception:  # noqa: BLE001 - totality; the tests assert it is never reached
        return None


# ---------------------------------------------------------------------------------------------
# Reassembly


class _Reassembly:
    """Contiguous prefix of a byte stream rebuilt from pieces at offsets, capped. Overlaps keep
    the bytes that arrived first (what the receiver's stack does for in-order data)."""

    __slots__ = ("_pending", "_pending_bytes", "data", "overflow")

    def __init__(self) -> None:
        self.data = bytearray()
        self._pending: dict[int, bytes] = {}
        self._pending_bytes = 0
        self.overflow = False  # more out-of-order data than we are willing to hold

    def add(self, off: int, chunk: bytes) -> bool:
        """Add `chunk` at stream offset `off` (>= 0). True when the contiguous prefix grew."""
        if off >= MAX_STREAM_BYTES or not chunk:
            return False
        if off + len(chunk) > MAX_STREAM_BYTES:
            chunk = chunk[: MAX_STREAM_BYTES - off]
        have = len(self.data)
        if off + len(chunk) <= have:
            return False  # a retransmission of what we have
        if off > have:
            prev = self._pending.get(off)
            if prev is None or len(prev) < len(chunk):
                self._pending_bytes += len(chunk) - (len(prev) if prev else 0)
                self._pending[off] = chunk
                if self._pending_bytes > MAX_STREAM_BYTES or len(self._pending) > _MAX_PIECES:
                    self.overflow = True
            return False
        self.data += chunk[have - off :]
        if self._pending:
            for start in sorted(self._pending):
                if start > len(self.data):
                    break
                piece = self._pending.pop(start)
                self._pending_bytes -= len(piece)
                have = len(self.data)
                if start + len(piece) > have:
                    self.data += piece[have - start :]
        return True

    @property
    def full(self) -> bool:
        return len(self.data) >= MAX_STREAM_BYTES


# ---------------------------------------------------------------------------------------------
# QUIC Initial protection (RFC 9001 5.2, 5.3, 5.4; RFC 9369 3.3)

QUIC_V1: Final = 0x00000001
QUIC_V2: Final = 0x6B3343CF
_SALTS: Final = {
    QUIC_V1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    QUIC_V2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
}
_LABELS: Final = {
    QUIC_V1: (b"quic key", b"quic iv", b"quic hp"),
    QUIC_V2: (b"quicv2 key", b"quicv2 iv", b"quicv2 hp"),
}
_INITIAL_TYPE: Final = {QUIC_V1: 0, QUIC_V2: 1}  # long-header packet type bits of an Initial
_RETRY_TYPE: Final = {QUIC_V1: 3, QUIC_V2: 0}


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1) with an empty context; every output here is <= 32 bytes,
    so one HMAC-SHA256 block suffices."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    return hmac.new(secret, info + b"\x01", sha256).digest()[:length]


_CRYPTO: tuple[Any, ...] = ()


def _crypto() -> tuple[Any, ...]:
    """(AESGCM, a function making an AES-ECB encryptor, InvalidTag), imported on the first QUIC
    Initial: `cryptography` costs the daemon ~8.5 MiB of RSS (docs/performance.md), and a guard
    whose speakers never speak QUIC never needs it."""
    global _CRYPTO
    if not _CRYPTO:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        def ecb(key: bytes) -> Any:
            return Cipher(algorithms.AES(key), modes.ECB()).encryptor()

        _CRYPTO = (AESGCM, ecb, InvalidTag)
    return _CRYPTO


class _InitialKeys:
    """Client Initial packet protection keys for one (version, original DCID)."""

    __slots__ = ("aead", "hp", "invalid", "iv", "_ecb")

    def __init__(self, version: int, dcid: bytes) -> None:
        aesgcm, self._ecb, self.invalid = _crypto()
        initial = hmac.new(_SALTS[version], dcid, sha256).digest()  # HKDF-Extract
        client = _expand_label(initial, b"client in", 32)
        key_label, iv_label, hp_label = _LABELS[version]
        self.aead = aesgcm(_expand_label(client, key_label, 16))
        self.iv = _expand_label(client, iv_label, 12)
        self.hp = _expand_label(client, hp_label, 16)

    def mask(self, sample: bytes) -> bytes:
        return self._ecb(self.hp).update(sample)


def _varint(buf: bytes, off: int) -> tuple[int, int]:
    """RFC 9000 16 variable-length integer at buf[off]; IndexError when truncated."""
    b0 = buf[off]
    size = 1 << (b0 >> 6)
    if off + size > len(buf):
        raise IndexError("truncated varint")
    value = b0 & 0x3F
    for i in range(1, size):
        value = (value << 8) | buf[off + i]
    return value, off + size


def _decode_pn(truncated: int, pn_len: int, largest: int) -> int:
    """RFC 9000 A.3: the full packet number closest to the next expected one."""
    expected = largest + 1
    win = 1 << (pn_len * 8)
    hwin = win // 2
    candidate = (expected & ~(win - 1)) | truncated
    if candidate <= expected - hwin and candidate < (1 << 62) - win:
        return candidate + win
    if candidate > expected + hwin and candidate >= win:
        return candidate - win
    return candidate


# ---------------------------------------------------------------------------------------------
# Per-flow assembler


class SniAssembler:
    """Finds the server name of one flow from its client-to-server payloads.

    TCP: call `syn(seq)` for the client's SYN if seen, then `feed_tcp(seq, payload)` for each
    client segment with payload (a SYN carrying data is fed at `seq + 1`). Without a SYN the
    first payload segment seen is taken as the start of the stream; if it was not (capture joined
    mid-connection), the flow gives up at once: there is no hello to read.
    QUIC: `feed_quic(datagram)` for each client datagram (keys come from the DCID of the first
    client Initial, so server datagrams must not be fed).
    `done` is True once a name was found or the flow was given up on; feeding then is a no-op.
    """

    __slots__ = (
        "_done",
        "_isn",
        "_keys",
        "_largest_pn",
        "_name",
        "_odcid",
        "_quic_seen",
        "_reader",
        "_stream",
    )

    def __init__(self) -> None:
        self._isn: int | None = None
        self._stream: _Reassembly | None = None
        self._reader: _RecordReader | None = None
        self._name: str | None = None
        self._done = False
        self._quic_seen = 0
        self._odcid: tuple[int, bytes] | None = None
        self._keys: dict[tuple[int, bytes], _InitialKeys] = {}
        self._largest_pn = -1

    @property
    def done(self) -> bool:
        return self._done

    @property
    def name(self) -> str | None:
        return self._name

    def _finish(self, name: str | None) -> str | None:
        self._name = name
        self._done = True
        self._stream = None  # free the buffers: a finished flow keeps nothing
        self._reader = None
        self._keys = {}
        return name

    # -- TCP ------------------------------------------------------------------------------------

    def syn(self, seq: int) -> None:
        """The client's SYN: its sequence number + 1 is the first payload byte."""
        if self._isn is None and not self._done:
            self._isn = (seq + 1) & 0xFFFFFFFF

    def feed_tcp(self, seq: int, payload: bytes, payload_len: int | None = None) -> str | None:
        """Add one client segment; the name once found (and on every later call), else None.

        `payload_len` is the segment's real payload length (`Packet.payload_len`) for callers
        whose `payload` may be cut short (`parse_ip` keeps 64 bytes of segments that do not
        start a ClientHello): bytes never kept can never complete a hello, so a flow that
        needs them gives up at once instead of waiting for data that will not come."""
        if self._done:
            return self._name
        if payload_len is None or payload_len < len(payload):
            payload_len = len(payload)
        if not payload_len:
            return None
        try:
            return self._feed_tcp(seq & 0xFFFFFFFF, payload, payload_len)
        except Exception:  # noqa: BLE001 - totality; the tests assert it is never reached
            return self._finish(None)

    def _feed_tcp(self, seq: int, payload: bytes, payload_len: int) -> str | None:
        if self._isn is None:
            self._isn = seq
        if self._stream is None:
            self._stream = _Reassembly()
            self._reader = _RecordReader()
        rel = (seq - self._isn) & 0xFFFFFFFF
        if rel >= 0x80000000:  # before the stream start (sequence space wraps at 2^32)
            rel -= 0x100000000
            if -rel >= payload_len:
                return None
            payload = payload[-rel:]
            payload_len += rel
            rel = 0
        stream = self._stream
        grew = stream.add(rel, payload)
        if stream.overflow:
            return self._finish(None)
        if grew:
            assert self._reader is not None
            result = self._reader.advance(stream.data)
            if result is not NEED_MORE:
                return self._finish(result)  # type: ignore[arg-type]
            if stream.full:
                return self._finish(None)  # a hello longer than we are willing to buffer
        if payload_len > len(payload) and rel + payload_len > len(stream.data):
            return self._finish(None)  # the hello needs bytes the caller did not keep
        return None

    # -- QUIC -----------------------------------------------------------------------------------

    def feed_quic(self, datagram: bytes) -> str | None:
        """Add one client UDP datagram; the name once found (and on every later call)."""
        if self._done:
            return self._name
        try:
            return self._feed_quic(bytes(datagram))
        except Exception:  # noqa: BLE001 - totality; the tests assert it is never reached
            return self._finish(None)

    def _feed_quic(self, dgram: bytes) -> str | None:
        self._quic_seen += 1
        progressed = False
        for version, dcid, start, pn_off, end in _initial_packets(dgram):
            plain = self._decrypt(dgram, version, dcid, start, pn_off, end)
            if plain is None:
                continue
            progressed = True
            if self._stream is None:
                self._stream = _Reassembly()
            for off, data in _crypto_frames(plain):
                self._stream.add(off, data)
            if self._stream.overflow:
                return self._finish(None)
        if not progressed:
            if self._stream is None or self._quic_seen >= _MAX_QUIC_DATAGRAMS:
                # The flow's first datagram is not a client Initial we can read: joined late,
                # not QUIC, or a version we do not know. Nothing to wait for.
                return self._finish(None)
            return None
        assert self._stream is not None
        hs = self._stream.data
        if len(hs) >= 1 and hs[0] != 1:
            return self._finish(None)
        if len(hs) >= 4:
            mlen = (hs[1] << 16) | (hs[2] << 8) | hs[3]
            if mlen > MAX_HELLO_BYTES:
                return self._finish(None)
            if len(hs) >= 4 + mlen:
                return self._finish(parse_client_hello(bytes(hs[4 : 4 + mlen])))
        if self._stream.full or self._quic_seen >= _MAX_QUIC_DATAGRAMS:
            return self._finish(None)
        return None

    def _keys_for(self, version: int, dcid: bytes) -> _InitialKeys:
        keys = self._keys.get((version, dcid))
        if keys is None:
            if len(self._keys) >= 4:  # a flow tries the original DCID and maybe a Retry's
                self._keys.clear()
            keys = self._keys[(version, dcid)] = _InitialKeys(version, dcid)
        return keys

    def _decrypt(
        self, dgram: bytes, version: int, dcid: bytes, start: int, pn_off: int, end: int
    ) -> bytes | None:
        """Remove header protection and decrypt one Initial; None if it is not ours to read.

        Keys come from the DCID of the client's first Initial (RFC 9001 5.2), which later
        Initials no longer carry once the server picked its own connection ID; after a Retry the
        client starts over with a new DCID, so this packet's own DCID is tried next."""
        if pn_off + 4 + 16 > end:
            return None
        sample = dgram[pn_off + 4 : pn_off + 20]
        candidates = []
        if self._odcid is not None and self._odcid[0] == version:
            candidates.append(self._odcid[1])
        if dcid not in candidates:
            candidates.append(dcid)
        for odcid in candidates:
            keys = self._keys_for(version, odcid)
            mask = keys.mask(sample)
            first = dgram[start] ^ (mask[0] & 0x0F)
            pn_len = (first & 3) + 1
            pn_bytes = bytes(b ^ m for b, m in zip(dgram[pn_off : pn_off + pn_len], mask[1:]))
            header = bytes((first,)) + dgram[start + 1 : pn_off] + pn_bytes
            pn = _decode_pn(int.from_bytes(pn_bytes, "big"), pn_len, self._largest_pn)
            nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
            try:
                plain = keys.aead.decrypt(nonce, dgram[pn_off + pn_len : end], header)
            except keys.invalid:
                continue
            self._odcid = (version, odcid)
            self._largest_pn = max(self._largest_pn, pn)
            return plain
        return None


def _initial_packets(dgram: bytes) -> list[tuple[int, bytes, int, int, int]]:
    """The QUIC v1/v2 Initial packets coalesced in a datagram (RFC 9000 12.2), as (version,
    dcid, start, packet-number offset, end). Stops at the first thing that is not a long-header
    packet of a known version (a short header, padding, garbage): nothing after it is readable."""
    out: list[tuple[int, bytes, int, int, int]] = []
    off = 0
    n = len(dgram)
    try:
        while off + 7 <= n:
            b0 = dgram[off]
            if b0 & 0xC0 != 0xC0:  # long header with the fixed bit
                break
            (version,) = struct.unpack_from("!I", dgram, off + 1)
            if version not in _SALTS:
                break
            p = off + 5
            dcil = dgram[p]
            if dcil > 20:
                break
            dcid = dgram[p + 1 : p + 1 + dcil]
            p += 1 + dcil
            scil = dgram[p]
            if scil > 20:
                break
            p += 1 + scil
            ptype = (b0 >> 4) & 3
            if ptype == _RETRY_TYPE[version]:
                break  # a Retry has no length field and is never coalesced before others
            initial = ptype == _INITIAL_TYPE[version]
            if initial:
                token_len, p = _varint(dgram, p)
                p += token_len
            length, p = _varint(dgram, p)
            if p + length > n:
                break
            if initial:
                out.append((version, dcid, off, p, p + length))
            off = p + length
    except IndexError:
        pass
    return out


def _crypto_frames(plain: bytes) -> list[tuple[int, bytes]]:
    """(offset, data) of the CRYPTO frames in a decrypted Initial payload. PADDING, PING and ACK
    are skipped; anything else (CONNECTION_CLOSE, or a frame not allowed in Initials) ends the
    walk, keeping what came before it."""
    out: list[tuple[int, bytes]] = []
    off = 0
    n = len(plain)
    try:
        while off < n:
            ftype = plain[off]
            if ftype == 0x00:  # PADDING: skip the whole run at C speed
                off = n - len(plain[off:].lstrip(b"\x00"))
            elif ftype == 0x01:  # PING
                off += 1
            elif ftype in (0x02, 0x03):  # ACK, ACK with ECN counts
                _, off = _varint(plain, off + 1)  # largest acknowledged
                _, off = _varint(plain, off)  # ack delay
                ranges, off = _varint(plain, off)
                _, off = _varint(plain, off)  # first range
                if ranges > n:
                    break
                for _ in range(2 * ranges + (3 if ftype == 0x03 else 0)):
                    _, off = _varint(plain, off)
            elif ftype == 0x06:  # CRYPTO
                offset, off = _varint(plain, off + 1)
                length, off = _varint(plain, off)
                data = plain[off : off + length]
                if len(data) != length:
                    break
                out.append((offset, data))
                off += length
            else:
                break
    except IndexError:
        pass
    return out
