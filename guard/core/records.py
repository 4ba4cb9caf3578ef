"""TLS records from a byte stream: what the stream judge is fed, live and from a capture.

Rules of this module: pure (no IO, no clock). A `RecordFramer` is fed one direction of a TCP
stream in order, chunk by chunk, and answers each chunk with the records it completed: (end
offset, size including the 5-byte header, content type). Nothing is decrypted; only record
headers are read. A stream that is not TLS (a header that does not parse: plain HTTP, MQTT, a
capture whose payloads were zeroed or cut by its snap length) falls back to "each chunk is a
record" with content type 0 until a chunk starts with a plausible header again, so a payload that
does not parse never stops inspection (design.md 7). The relay (guard/shell/relay.py) and `analyze`
(guard/tools/analyze.py) use this one framer, so they judge the same records.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADER_BYTES = 5
# RFC 8446 5.2: TLSCiphertext.length <= 2^14 + 256; TLS 1.2 allows 2^14 + 2048 (RFC 5246 6.2.3).
MAX_RECORD_BODY = (1 << 14) + 2048
# change_cipher_spec, alert, handshake, application_data (heartbeat 24 is never seen here).
CONTENT_TYPES = frozenset({20, 21, 22, 23})
NOT_TLS = 0  # the content type of a chunk taken as a record when the stream is not TLS


@dataclass(frozen=True, slots=True)
class Record:
    end: int  # stream offset just after the record
    size: int  # bytes on the wire, header included
    content_type: int  # TLS content type, or NOT_TLS


def _tls_start(data: bytes | bytearray | memoryview) -> bool:
    """Whether a chunk at a record boundary may start a TLS record: its header in full when it
    has one, else as much of it as there is (a header split across reads)."""
    if len(data) >= HEADER_BYTES:
        return plausible_header(data)
    return data[0] in CONTENT_TYPES and (len(data) < 2 or data[1] == 3)


def plausible_header(data: bytes | bytearray | memoryview, at: int = 0) -> bool:
    """Whether `data[at:at+5]` can be a TLS record header (type, version 3.x, length)."""
    if len(data) - at < HEADER_BYTES:
        return False
    length = (data[at + 3] << 8) | data[at + 4]
    return (data[at] in CONTENT_TYPES and data[at + 1] == 3 and data[at + 2] <= 4
            and length <= MAX_RECORD_BODY)  # TLS 1.2 allows empty application_data


class RecordFramer:
    """Complete records of one direction of a stream, chunk by chunk."""

    def __init__(self, tls: bool | None = None) -> None:
        # None: decide from the first chunk (a stream seen from its start: a TLS client speaks
        # first with a handshake record); True/False: known
        self.tls = tls
        self.offset = 0  # bytes fed so far
        self._record_start = 0  # offset of the record being assembled
        self._need = 0  # bytes of it still missing (0: at a record boundary)
        self._header = bytearray()  # a header split across chunks
        self._content_type = 0
        self.records = 0
        self.desyncs = 0

    def resync(self) -> None:
        """Bytes are missing before the next chunk (a capture lost them, or picked the stream up
        mid-way): forget the record in progress and find step again at a chunk's start."""
        self._need = 0
        self._header = bytearray()
        self.tls = None

    def feed(self, data: bytes | bytearray | memoryview, length: int | None = None
             ) -> list[Record]:
        """The next chunk, in order. `length` is the chunk's real size when `data` holds less
        (a capture's snap length): the framer cannot follow records through missing bytes, so
        such a chunk is a record of its own and the framer resynchronises after it."""
        size = len(data) if length is None else length
        start = self.offset
        self.offset += size
        if size == 0:
            return []
        if len(data) < size:
            return self._chunk(start, size, resync=True)
        if self.tls is None:
            self.tls = self._need == 0 and not self._header and _tls_start(data)
        if not self.tls:
            if self._need == 0 and not self._header and plausible_header(data):
                self.tls = True  # a chunk that starts with a whole header: in step again
            else:
                return self._chunk(start, size)
        out: list[Record] = []
        pos = 0
        while pos < size:
            if self._need:
                take = min(self._need, size - pos)
                self._need -= take
                pos += take
                if not self._need:
                    out.append(self._done(start + pos))
                continue
            # at a record boundary: read (the rest of) a header
            want = HEADER_BYTES - len(self._header)
            piece = data[pos:pos + want]
            self._header += piece
            pos += len(piece)
            if len(self._header) < HEADER_BYTES:
                break
            header, self._header = bytes(self._header), bytearray()
            if not plausible_header(header):
                # lost step (or never TLS): the rest of this chunk is one record
                self.desyncs += 1
                self.tls = False
                first = start + pos - HEADER_BYTES
                out.append(self._count(Record(start + size, start + size - first, NOT_TLS)))
                return out
            self._record_start = start + pos - HEADER_BYTES
            self._need = (header[3] << 8) | header[4]
            self._content_type = header[0]
            if not self._need:
                out.append(self._done(start + pos))
        return out

    def _done(self, end: int) -> Record:
        return self._count(Record(end, end - self._record_start, self._content_type))

    def _count(self, record: Record) -> Record:
        self.records += 1
        return record

    def _chunk(self, start: int, size: int, resync: bool = False) -> list[Record]:
        if resync:
            self.tls = False
        self._need = 0
        self._header = bytearray()
        return [self._count(Record(start + size, size, NOT_TLS))]

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record (header included) held back so far."""
        if self._need:
            return self.offset - self._record_start
        return len(self._header)


class StreamAssembler:
    """One direction of a captured TCP connection put back in order (for `analyze`):
    retransmitted bytes dropped, overlaps trimmed, a gap (bytes the capture lost, or a stream
    picked up mid-way) skipped by resynchronising. Sequence numbers are mod 2**32."""

    def __init__(self, next_seq: int | None = None) -> None:
        self.next_seq = next_seq

    def syn(self, seq: int) -> None:
        self.next_seq = (seq + 1) & 0xFFFFFFFF

    def segment(self, seq: int, payload: bytes, length: int) -> tuple[bytes, int, bool]:
        """The new in-order part of a segment: (bytes kept of it, its length, whether a gap
        came before it). Length 0: nothing new (a retransmission)."""
        if self.next_seq is None:
            self.next_seq = seq
        offset = (seq - self.next_seq) & 0xFFFFFFFF
        gap = False
        if offset >= 0x80000000:  # starts before what we have: trim the old part
            old = 0x100000000 - offset
            if old >= length:
                return b"", 0, False
            payload, length, seq = payload[old:], length - old, (seq + old) & 0xFFFFFFFF
        elif offset:
            gap = True  # bytes missing: go on from here (the framer resynchronises)
        self.next_seq = (seq + length) & 0xFFFFFFFF
        return payload, length, gap


class CapturedStream:
    """One direction of a captured TCP connection, segment by segment: put back in order by a
    `StreamAssembler` and framed by a `RecordFramer`, which finds step again after a gap. What
    `analyze` and the replays of captured shapes (hushsim/timeline.py) both read."""

    def __init__(self) -> None:
        self.assembler = StreamAssembler()
        self.framer = RecordFramer()

    def syn(self, seq: int) -> None:
        self.assembler.syn(seq)

    def segment(self, seq: int, payload: bytes, length: int) -> tuple[bytes, list[Record]]:
        """The segment's new in-order bytes (b"" for a retransmission) and the records they
        complete."""
        data, length, gap = self.assembler.segment(seq, payload, length)
        if not length:
            return b"", []
        if gap:
            self.framer.resync()
        return data, self.framer.feed(data, length)
