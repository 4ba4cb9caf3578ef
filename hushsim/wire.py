"""The simulated world's application protocol, shared by the speaker and the cloud.

Rules of this module: pure functions and small incremental parsers, no sockets, no clock.
Inside TLS the speaker and the cloud exchange frames `kind (1 byte) | length (4 bytes, big
endian) | body`. The frame stream is independent of TLS record boundaries: the speaker shapes
records by slicing the byte stream, the cloud parses it as a stream. A parser never buffers more
than `max_buffered_bytes` of one frame body; bulk bodies are counted, not kept.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!cI")
HEADER_BYTES = HEADER.size  # 5

# Speaker -> cloud.
UPLOAD = b"U"  # body: opaque upload bytes; the cloud answers ACK when the frame is complete
ECHO = b"E"  # body: echoed back in an ECHO_REPLY (RTT rounds)
DOWNLOAD = b"D"  # body: 8-byte count; the cloud answers with a DATA frame of that many bytes
# Cloud -> speaker.
ACK = b"A"  # body: 8-byte total upload body bytes received so far on this connection
ECHO_REPLY = b"e"
DATA = b"d"

# The largest download the cloud serves: a test needs tens of MB at most; more is a bug.
MAX_DOWNLOAD_BYTES = 2 * 1024**3
MAX_FRAME_BYTES = 2**32 - 1


def header(kind: bytes, length: int) -> bytes:
    if not 0 <= length <= MAX_FRAME_BYTES:
        raise ValueError(f"frame length {length} out of range")
    return HEADER.pack(kind, length)


def frame(kind: bytes, body: bytes) -> bytes:
    return header(kind, len(body)) + body


@dataclass(frozen=True, slots=True)
class Frame:
    """A completed frame. `body` is None for kinds whose bodies are streamed (counted only)."""

    kind: bytes
    length: int
    body: bytes | None


class FrameReader:
    """Incremental parser: `feed(data)` returns the frames completed by `data`.

    Bodies of kinds in `streamed` are not kept (an upload of 200 KB, a download of 50 MB);
    others are kept up to `max_buffered_bytes`, beyond which the body is dropped and `body` is
    None (a misbehaving peer cannot make the parser grow without bound)."""

    def __init__(self, streamed: frozenset[bytes], max_buffered_bytes: int = 1 << 20) -> None:
        self._streamed = streamed
        self._max = max_buffered_bytes
        self._head = bytearray()
        self._kind: bytes | None = None
        self._length = 0
        self._left = 0
        self._body: bytearray | None = None
        self.streamed_bytes = 0  # body bytes of streamed kinds seen so far (all frames)

    @property
    def in_frame(self) -> bytes | None:
        """The kind of the frame being received, or None between frames."""
        return self._kind

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        out: list[Frame] = []
        view = memoryview(data)
        pos = 0
        # Bound: each pass consumes at least one byte or completes a zero-length frame, and a
        # zero-length frame needs a 5-byte header, so passes <= len(data) + 1.
        for _ in range(len(view) + 2):
            if self._kind is None:
                if pos >= len(view):
                    break
                need = HEADER_BYTES - len(self._head)
                self._head += view[pos : pos + need]
                pos += min(need, len(view) - pos)
                if len(self._head) < HEADER_BYTES:
                    break
                kind, length = HEADER.unpack(bytes(self._head))
                self._head.clear()
                self._kind, self._length, self._left = kind, length, length
                keep = kind not in self._streamed and length <= self._max
                self._body = bytearray() if keep else None
            if self._left:
                take = min(self._left, len(view) - pos)
                if take <= 0:
                    break
                if self._body is not None:
                    self._body += view[pos : pos + take]
                elif self._kind in self._streamed:
                    self.streamed_bytes += take
                pos += take
                self._left -= take
            if self._left == 0:
                assert self._kind is not None
                body = bytes(self._body) if self._body is not None else None
                out.append(Frame(self._kind, self._length, body))
                self._kind, self._body = None, None
        return out


def u64(value: int) -> bytes:
    return struct.pack("!Q", value)


def parse_u64(body: bytes | None) -> int:
    if body is None or len(body) != 8:
        raise ValueError("expected an 8-byte body")
    return struct.unpack("!Q", body)[0]


# ---------------------------------------------------------------------------------------------
# TLS record overhead, to turn an on-the-wire record length into a plaintext write length.


def tls_record_overhead(version: str | None, cipher: str | None) -> int:
    """Bytes a TLS record adds to its plaintext: header, explicit nonce / inner type, AEAD tag.

    TLS 1.2 AES-GCM: 5 header + 8 explicit nonce + 16 tag = 29 (what the 2018 Echo's 118-B
    records carry: 89 B of plaintext). TLS 1.2 ChaCha20-Poly1305: 5 + 16 = 21. TLS 1.3 (any
    AEAD): 5 header + 1 inner content type + 16 tag = 22 (no padding is added by OpenSSL)."""
    if version == "TLSv1.3":
        return 22
    if cipher and "CHACHA20" in cipher:
        return 21
    if cipher and "GCM" in cipher:
        return 29
    # CBC suites are not offered by our contexts; assume GCM.
    return 29
