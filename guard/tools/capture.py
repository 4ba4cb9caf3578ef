"""Read pcap and pcapng captures into parsed packets; write small pcap files.

Rules of this module: the format is recognised by its magic number, never by the file name; a file
that is not a capture, or whose structure is damaged, raises `CaptureError` with a one-line
message (a bad header as soon as `read_capture` is called, damage further on when iteration
reaches it); a file cut short at the end (a capture still being written, a full disk) yields what
it holds and stops quietly. Frames go to `guard.core.packet.parse_frame` and nothing else is done per
packet, because `hushgate analyze` runs over whole captures.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from guard.core.packet import SUPPORTED_LINKTYPES, Malformed, Packet, parse_frame

__all__ = ["CaptureError", "read_capture", "write_pcap"]

Parsed = Packet | Malformed | None

_CHUNK_BYTES = 1 << 20  # read-ahead: large enough that file reads vanish from the profile
# A record or block larger than this is damage, not data: libpcap's own ceiling for one packet
# is 256 KiB (MAXIMUM_SNAPLEN), and a pcapng block holding one packet stays near that.
_MAX_RECORD_BYTES = 16 << 20

_PCAPNG_SHB = 0x0A0D0D0A  # a palindrome: it reads the same in either byte order
_PCAP_MAGICS = {
    # magic read little-endian -> (byte order, sub-second ticks per second, record header bytes)
    0xA1B2C3D4: ("<", 1_000_000, 16),
    0xD4C3B2A1: (">", 1_000_000, 16),
    0xA1B23C4D: ("<", 1_000_000_000, 16),
    0x4D3CB2A1: (">", 1_000_000_000, 16),
    0xA1B2CD34: ("<", 1_000_000, 24),  # Kuznetzov's modified pcap: 8 more bytes per record
    0x34CDB2A1: (">", 1_000_000, 24),
}


class CaptureError(Exception):
    """The file is not a readable pcap/pcapng capture; the message says why, in one line."""


class _Buffer:
    """Read-ahead over a file: `take(n)` gives the next n bytes, or None at (maybe early) EOF."""

    __slots__ = ("_base", "_buf", "_f", "_pos")

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._buf = b""
        self._pos = 0
        self._base = 0  # file offset of _buf[0]

    @property
    def offset(self) -> int:
        """File offset of the next byte `take` returns (for error messages)."""
        return self._base + self._pos

    def take(self, n: int) -> bytes | None:
        pos = self._pos
        end = pos + n
        if end > len(self._buf):
            self._base += pos
            self._buf = self._buf[pos:] + self._f.read(max(_CHUNK_BYTES, n))
            pos, end = 0, n
            if end > len(self._buf):
                self._pos = 0
                return None
        self._pos = end
        return self._buf[pos:end]


def read_capture(path: str, keep_payload: int = 64) -> Iterator[tuple[float, Parsed]]:
    """(timestamp, parsed frame) for every packet of a pcap or pcapng file, lazily.

    Timestamps are Unix seconds honouring the file's resolution (pcap micro/nano, pcapng
    if_tsresol and if_tsoffset). The parsed frame is what `parse_frame` returns for the
    interface's link type (None for non-IP frames and for pcapng interfaces of link types we
    do not parse); `keep_payload` bytes of each payload are kept (see `parse_ip`). Raises
    `CaptureError` at once when the file cannot be opened or does not
    start like a capture, and during iteration when it is damaged further on.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the generator below, or here on error
    except OSError as e:
        raise CaptureError(f"{path}: cannot open: {e.strerror or e}") from None
    try:
        buf = _Buffer(f)
        head = buf.take(4)
        if head is None:
            raise CaptureError(f"{path}: not a capture (shorter than a file header)")
        (magic,) = struct.unpack("<I", head)
        if magic == _PCAPNG_SHB:
            more = buf.take(4)
            order = None if more is None else _section_header(path, buf, head + more, 0)
            if order is None:
                raise CaptureError(f"{path}: pcapng section header truncated")
            packets = _pcapng_packets(path, buf, order, keep_payload)
        elif magic in _PCAP_MAGICS:
            order, tps, rec_len = _PCAP_MAGICS[magic]
            header = buf.take(20)
            if header is None:
                raise CaptureError(f"{path}: pcap file header truncated")
            # The low 16 bits are the link type; the high bits may carry FCS information.
            linktype = struct.unpack(order + "I", header[16:20])[0] & 0xFFFF
            if linktype not in SUPPORTED_LINKTYPES:
                raise CaptureError(f"{path}: unsupported link type {linktype}")
            packets = _pcap_packets(path, buf, order, tps, rec_len, linktype, keep_payload)
        else:
            raise CaptureError(f"{path}: not a pcap or pcapng file (magic {head.hex()})")
    except OSError as e:
        f.close()
        raise CaptureError(f"{path}: cannot read: {e.strerror or e}") from None
    except BaseException:
        f.close()
        raise
    return _closing(path, f, packets)


def _closing(
    path: str, f: BinaryIO, packets: Iterator[tuple[float, Parsed]]
) -> Iterator[tuple[float, Parsed]]:
    with f:
        try:
            yield from packets
        except OSError as e:
            raise CaptureError(f"{path}: read error: {e.strerror or e}") from None


def _pcap_packets(
    path: str, buf: _Buffer, order: str, tps: int, rec_len: int, linktype: int,
    keep_payload: int = 64,
) -> Iterator[tuple[float, Parsed]]:
    rec = struct.Struct(order + "IIII")
    take = buf.take
    while True:
        hdr = take(rec_len)
        if hdr is None:
            return  # end of file, or a record header cut short: stop quietly
        sec, frac, caplen, _ = rec.unpack_from(hdr)
        if caplen > _MAX_RECORD_BYTES:
            raise CaptureError(
                f"{path}: damaged record at offset {buf.offset - rec_len} (length {caplen})"
            )
        frame = take(caplen)
        if frame is None:
            return  # the last record was cut short
        yield sec + frac / tps, parse_frame(frame, linktype, keep_payload)


def _section_header(path: str, buf: _Buffer, head: bytes, start: int) -> str | None:
    """Finish reading a Section Header Block whose first 8 bytes are `head`; return its byte
    order ("<" or ">"), or None when the file ends inside it."""
    bom = buf.take(4)
    if bom is None:
        return None
    if bom == b"\x4d\x3c\x2b\x1a":
        order = "<"
    elif bom == b"\x1a\x2b\x3c\x4d":
        order = ">"
    else:
        raise CaptureError(f"{path}: bad pcapng byte-order magic at offset {start}")
    (blen,) = struct.unpack_from(order + "I", head, 4)
    if blen < 28 or blen % 4 or blen > _MAX_RECORD_BYTES:
        raise CaptureError(f"{path}: bad pcapng section header length at offset {start}")
    if buf.take(blen - 12) is None:
        return None
    return order


def _pcapng_packets(path: str, buf: _Buffer, order: str, keep_payload: int = 64
                    ) -> Iterator[tuple[float, Parsed]]:
    # per interface: (link type, ticks per second, offset in seconds)
    interfaces: list[tuple[int, int, int]] = []
    last_ts = 0.0
    take = buf.take
    epb = struct.Struct(order + "IIII")
    while True:
        start = buf.offset
        head = take(8)
        if head is None:
            return  # end of file, or a block header cut short
        btype, blen = struct.unpack(order + "II", head)
        if btype == _PCAPNG_SHB:
            # A new section: its own byte order, and no interfaces until it defines them.
            new_order = _section_header(path, buf, head, start)
            if new_order is None:
                return
            order = new_order
            epb = struct.Struct(order + "IIII")
            interfaces = []
            continue
        if blen < 12 or blen % 4 or blen > _MAX_RECORD_BYTES:
            raise CaptureError(f"{path}: damaged pcapng block at offset {start} (length {blen})")
        body = take(blen - 8)
        if body is None:
            return  # the last block was cut short
        if btype == 6:  # Enhanced Packet Block
            if blen < 32:
                raise CaptureError(f"{path}: damaged packet block at offset {start}")
            iface, hi, lo, caplen = epb.unpack_from(body)
            if caplen > blen - 32:
                raise CaptureError(f"{path}: packet block at offset {start} overruns itself")
            if iface >= len(interfaces):
                raise CaptureError(f"{path}: packet at offset {start} names an unknown interface")
            linktype, tps, tsoff = interfaces[iface]
            # Split before converting: nanosecond tick counts exceed a float's 53-bit mantissa.
            sec, frac = divmod((hi << 32) | lo, tps)
            last_ts = sec + frac / tps + tsoff
            yield last_ts, parse_frame(body[20 : 20 + caplen], linktype, keep_payload)
        elif btype == 1:  # Interface Description Block
            if blen < 20:
                raise CaptureError(f"{path}: damaged interface block at offset {start}")
            interfaces.append(_interface(body, order))
        elif btype == 3:  # Simple Packet Block: interface 0, no timestamp (keep the last one)
            if blen < 16 or not interfaces:
                raise CaptureError(f"{path}: damaged packet block at offset {start}")
            (wire,) = struct.unpack_from(order + "I", body)
            yield last_ts, parse_frame(body[4 : 4 + min(wire, blen - 16)], interfaces[0][0],
                                       keep_payload)
        elif btype == 2:  # Packet Block, obsolete since pcapng 1.0 but still written by some
            if blen < 32:
                raise CaptureError(f"{path}: damaged packet block at offset {start}")
            iface, _, hi, lo, caplen = struct.unpack_from(order + "HHIII", body)
            if caplen > blen - 32 or iface >= len(interfaces):
                raise CaptureError(f"{path}: damaged packet block at offset {start}")
            linktype, tps, tsoff = interfaces[iface]
            sec, frac = divmod((hi << 32) | lo, tps)
            last_ts = sec + frac / tps + tsoff
            yield last_ts, parse_frame(body[20 : 20 + caplen], linktype, keep_payload)
        # Other blocks (statistics, name resolution, decryption secrets, custom) carry no packets.


def _interface(body: bytes, order: str) -> tuple[int, int, int]:
    """(link type, ticks per second, offset in seconds) from an IDB body (the block without its
    type and length; it still ends with the trailing length)."""
    (linktype,) = struct.unpack_from(order + "H", body)
    tps = 1_000_000  # if_tsresol default: microseconds
    tsoff = 0
    off = 8
    end = len(body) - 4
    while off + 4 <= end:
        code, olen = struct.unpack_from(order + "HH", body, off)
        if code == 0:  # opt_endofopt
            break
        value = body[off + 4 : off + 4 + olen]
        if code == 9 and olen >= 1:  # if_tsresol: MSB clear = 10^-n, MSB set = 2^-n
            r = value[0]
            # Capped so a hostile exponent cannot build a huge integer; 10^-18 s is plenty.
            tps = 2 ** min(r & 0x7F, 63) if r & 0x80 else 10 ** min(r, 18)
        elif code == 14 and olen >= 8:  # if_tsoffset: seconds added to every timestamp
            (tsoff,) = struct.unpack_from(order + "q", value)
        off += 4 + ((olen + 3) & ~3)
    return linktype, tps, tsoff


def write_pcap(
    path: str | os.PathLike[str], frames: Iterable[tuple[float, bytes]], linktype: int = 1,
    nano: bool = False, snaplen: int = 262144,
) -> None:
    """Write (timestamp, frame) pairs as a little-endian classic pcap, in microseconds unless
    `nano`; e.g. to cut a test fixture out of a larger capture.

    The project's one pcap writer: the simulator's synthetic captures (hushsim.synth) and the
    tests write with it too. It is the standard library's, not dpkt's, because it lives next to
    the reader it must round-trip with in a module the router runs without dpkt, and because
    dpkt 1.9.8's Writer does not carry a sub-second part that rounds up to a whole second (it
    writes ts_usec = 1000000 for 9.9999999 s) and writes in the host's byte order."""
    tps = 1_000_000_000 if nano else 1_000_000
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    rec = struct.Struct("<IIII")
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
        for ts, frame in frames:
            sec = int(ts // 1)
            frac = round((ts - sec) * tps)  # split first: ts * 1e9 would lose precision
            if frac >= tps:
                sec, frac = sec + 1, frac - tps
            f.write(rec.pack(sec, frac, len(frame), len(frame)))
            f.write(frame)
