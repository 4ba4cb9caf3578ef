"""QUIC v1 Initial packets for the simulated Nest: build one with a real TLS ClientHello, read one.

Rules of this module: pure functions of their inputs (randomness is passed in), no sockets.
`build_initial` protects the packet with the RFC 9001 section 5.2 initial keys derived from the
destination connection ID, so anything on the path that knows QUIC (the guard) can decrypt it and
read the SNI, exactly as with a real Google speaker. The ClientHello comes from the stdlib ssl
module (OpenSSL), reshaped for QUIC: empty legacy_session_id (RFC 9001 section 8.4) and a
quic_transport_parameters extension (RFC 9001 section 8.2). Only what the simulator needs is here:
no handshake, no 1-RTT keys; later datagrams are opaque short-header packets.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

QUIC_V1 = 0x00000001
# RFC 9001 section 5.2
INITIAL_SALT_V1 = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")
# RFC 9000 section 14.1: a client's Initial datagram is padded to at least 1200 bytes.
MIN_INITIAL_DATAGRAM = 1200
TLS_EXT_SERVER_NAME = 0x0000
TLS_EXT_QUIC_TRANSPORT_PARAMETERS = 0x0039


# --- HKDF (RFC 5869) with the TLS 1.3 label format (RFC 8446 section 7.1) --------------------


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def _hkdf_expand_label(secret: bytes, label: str, length: int) -> bytes:
    full = b"tls13 " + label.encode()
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    out, block = b"", b""
    for i in range(1, 256):
        if len(out) >= length:
            break
        block = hmac.new(secret, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
    return out[:length]


def initial_keys(dcid: bytes, server: bool = False) -> tuple[bytes, bytes, bytes]:
    """(key, iv, hp) protecting Initial packets sent by the client (or the server)."""
    initial_secret = _hkdf_extract(INITIAL_SALT_V1, dcid)
    secret = _hkdf_expand_label(initial_secret, "server in" if server else "client in", 32)
    return (
        _hkdf_expand_label(secret, "quic key", 16),
        _hkdf_expand_label(secret, "quic iv", 12),
        _hkdf_expand_label(secret, "quic hp", 16),
    )


def _hp_mask(hp_key: bytes, sample: bytes) -> bytes:
    enc = Cipher(algorithms.AES(hp_key), modes.ECB()).encryptor()
    return enc.update(sample) + enc.finalize()


# --- variable-length integers (RFC 9000 section 16) -------------------------------------------


def encode_varint(value: int) -> bytes:
    if value < 0x40:
        return bytes([value])
    if value < 0x4000:
        return struct.pack("!H", 0x4000 | value)
    if value < 0x40000000:
        return struct.pack("!I", 0x80000000 | value)
    return struct.pack("!Q", 0xC000000000000000 | value)


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, new position); raises ValueError on truncation."""
    if pos >= len(buf):
        raise ValueError("truncated varint")
    first = buf[pos]
    size = 1 << (first >> 6)
    if pos + size > len(buf):
        raise ValueError("truncated varint")
    value = first & 0x3F
    for b in buf[pos + 1 : pos + size]:
        value = (value << 8) | b
    return value, pos + size


# --- the ClientHello ---------------------------------------------------------------------------


def client_hello(sni: str, alpn: tuple[str, ...] = ("h3",)) -> bytes:
    """A TLS 1.3 ClientHello handshake message (no record header) as OpenSSL writes it, with an
    empty session id and a quic_transport_parameters extension, ready for a CRYPTO frame."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    records = outgoing.read()
    # Collect the handshake bytes from the record(s): type 22, then a 2-byte version, length.
    hs = b""
    pos = 0
    for _ in range(16):
        if pos + 5 > len(records):
            break
        rtype, _ver, rlen = struct.unpack("!BHH", records[pos : pos + 5])
        if rtype == 22:
            hs += records[pos + 5 : pos + 5 + rlen]
        pos += 5 + rlen
    if hs[:1] != b"\x01":
        raise RuntimeError("OpenSSL did not produce a ClientHello")
    body = hs[4 : 4 + int.from_bytes(hs[1:4], "big")]
    # legacy_version(2) random(32) session_id<0..32>
    p = 34
    sid_len = body[p]
    head = body[:p] + b"\x00"  # empty legacy_session_id: no middlebox compatibility mode in QUIC
    p += 1 + sid_len
    cs_len = struct.unpack("!H", body[p : p + 2])[0]
    p_cs_end = p + 2 + cs_len
    comp_len = body[p_cs_end]
    p_ext = p_cs_end + 1 + comp_len
    middle = body[p:p_ext]
    ext_len = struct.unpack("!H", body[p_ext : p_ext + 2])[0]
    extensions = body[p_ext + 2 : p_ext + 2 + ext_len]
    # Transport parameters a Chrome-like client sends (RFC 9000 section 18.2): max_idle_timeout
    # 30 s, initial_max_data 15 MB, initial_max_stream_data_bidi_local 6 MB, streams 100.
    params = b"".join(
        encode_varint(pid) + encode_varint(len(val)) + val
        for pid, val in (
            (0x01, encode_varint(30_000)),
            (0x04, encode_varint(15_728_640)),
            (0x05, encode_varint(6_291_456)),
            (0x08, encode_varint(100)),
        )
    )
    extensions += struct.pack("!HH", TLS_EXT_QUIC_TRANSPORT_PARAMETERS, len(params)) + params
    new_body = head + middle + struct.pack("!H", len(extensions)) + extensions
    return b"\x01" + len(new_body).to_bytes(3, "big") + new_body


def sni_from_client_hello(hs: bytes) -> str | None:
    """The server_name of a ClientHello handshake message, or None. Total on hostile input."""
    try:
        if hs[:1] != b"\x01":
            return None
        body = hs[4 : 4 + int.from_bytes(hs[1:4], "big")]
        p = 34
        p += 1 + body[p]
        p += 2 + struct.unpack("!H", body[p : p + 2])[0]
        p += 1 + body[p]
        end = p + 2 + struct.unpack("!H", body[p : p + 2])[0]
        p += 2
        for _ in range(128):
            if p + 4 > end:
                break
            etype, elen = struct.unpack("!HH", body[p : p + 4])
            p += 4
            if etype == TLS_EXT_SERVER_NAME:
                # server_name_list<1..2^16-1>: name_type(1) host_name<1..2^16-1>
                q = p + 2
                if body[q] == 0:
                    nlen = struct.unpack("!H", body[q + 1 : q + 3])[0]
                    return body[q + 3 : q + 3 + nlen].decode("ascii", "replace")
                return None
            p += elen
    except (IndexError, struct.error):
        return None
    return None


# --- Initial packets ---------------------------------------------------------------------------


def build_initial(
    sni: str, dcid: bytes, scid: bytes, packet_number: int = 0, alpn: tuple[str, ...] = ("h3",)
) -> bytes:
    """A client Initial datagram (>= 1200 bytes) carrying a ClientHello with `sni`."""
    hello = client_hello(sni, alpn)
    crypto = b"\x06" + encode_varint(0) + encode_varint(len(hello)) + hello
    pn_len = 4
    pn_bytes = packet_number.to_bytes(pn_len, "big")
    first = 0xC0 | (0 << 4) | (pn_len - 1)  # long header, fixed bit, type Initial
    prefix = (
        bytes([first])
        + struct.pack("!I", QUIC_V1)
        + bytes([len(dcid)])
        + dcid
        + bytes([len(scid)])
        + scid
        + encode_varint(0)  # token length
    )
    # Pad the payload so the whole datagram reaches the minimum: header + 2-byte length field +
    # packet number + payload + 16-byte tag.
    overhead = len(prefix) + 2 + pn_len + 16
    padding = max(0, MIN_INITIAL_DATAGRAM - overhead - len(crypto))
    payload = crypto + b"\x00" * padding
    length = pn_len + len(payload) + 16
    hdr = prefix + struct.pack("!H", 0x4000 | length) + pn_bytes
    key, iv, hp = initial_keys(dcid)
    nonce = (int.from_bytes(iv, "big") ^ packet_number).to_bytes(12, "big")
    sealed = AESGCM(key).encrypt(nonce, payload, hdr)
    pn_offset = len(hdr) - pn_len
    packet = bytearray(hdr + sealed)
    sample = bytes(packet[pn_offset + 4 : pn_offset + 20])
    mask = _hp_mask(hp, sample)
    packet[0] ^= mask[0] & 0x0F
    for i in range(pn_len):
        packet[pn_offset + i] ^= mask[1 + i]
    return bytes(packet)


def read_initial(datagram: bytes) -> tuple[bytes, str | None] | None:
    """(dcid, SNI or None) of a client Initial datagram, or None when it is not one we can
    decrypt. Reads the CRYPTO frames of the first packet only (ours fit in one)."""
    try:
        if len(datagram) < 7 or datagram[0] & 0xC0 != 0xC0 or (datagram[0] >> 4) & 0x3 != 0:
            return None
        if struct.unpack("!I", datagram[1:5])[0] != QUIC_V1:
            return None
        p = 5
        dcid = datagram[p + 1 : p + 1 + datagram[p]]
        p += 1 + datagram[p]
        p += 1 + datagram[p]  # scid
        token_len, p = decode_varint(datagram, p)
        p += token_len
        length, p = decode_varint(datagram, p)
        pn_offset = p
        key, iv, hp = initial_keys(dcid)
        mask = _hp_mask(hp, datagram[pn_offset + 4 : pn_offset + 20])
        first = datagram[0] ^ (mask[0] & 0x0F)
        pn_len = (first & 0x03) + 1
        pn = int.from_bytes(
            bytes(datagram[pn_offset + i] ^ mask[1 + i] for i in range(pn_len)), "big"
        )
        hdr = bytes([first]) + datagram[1:pn_offset] + pn.to_bytes(pn_len, "big")
        nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
        sealed = datagram[pn_offset + pn_len : pn_offset + length]
        payload = AESGCM(key).decrypt(nonce, sealed, hdr)
    except Exception:  # noqa: BLE001 - hostile bytes: any failure means "not a readable Initial"
        return None
    crypto: dict[int, bytes] = {}
    q = 0
    try:
        for _ in range(256):
            if q >= len(payload):
                break
            ftype = payload[q]
            if ftype in (0x00, 0x01):  # PADDING, PING
                q += 1
                continue
            if ftype != 0x06:
                break
            off, q = decode_varint(payload, q + 1)
            flen, q = decode_varint(payload, q)
            crypto[off] = payload[q : q + flen]
            q += flen
    except ValueError:
        pass
    stream = b""
    for off in sorted(crypto):
        if off != len(stream):
            break
        stream += crypto[off]
    return dcid, sni_from_client_hello(stream)


def short_header_packet(dcid: bytes, packet_number: int, size: int, filler: bytes) -> bytes:
    """An opaque 1-RTT-looking datagram of exactly `size` bytes (first byte 0b01xxxxxx)."""
    head = (
        bytes([0x40 | (packet_number & 0x1F) | 0x03])
        + dcid
        + (packet_number & 0xFFFFFFFF).to_bytes(4, "big")
    )
    if size <= len(head):
        return head[:size]
    body = (filler * (1 + (size - len(head)) // max(1, len(filler))))[: size - len(head)]
    return head + body
