"""guard.tools.capture: pcap and pcapng in, (timestamp, parsed frame) out; damaged files say so.

Small captures are written byte by byte into tmp_path; the shared captures are read in place.
"""

from __future__ import annotations

import bisect
import struct
import tomllib
from itertools import pairwise
from pathlib import Path

import pytest

from guard.core.packet import UDP, Malformed, Packet
from guard.tools.capture import CaptureError, read_capture, write_pcap

MAC = bytes.fromhex("68dbf5901964")


def udp_ip4(payload: bytes, sport: int = 5000, dport: int = 6000) -> bytes:
    l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(l4),
            0,
            0,
            64,
            UDP,
            0,
            bytes([10, 0, 0, 1]),
            bytes([10, 0, 0, 2]),
        )
        + l4
    )


def eth_frame(payload: bytes) -> bytes:
    return bytes(6) + MAC + b"\x08\x00" + udp_ip4(payload)


# ---------------------------------------------------------------------------------------------
# pcapng builder


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def block(btype: int, body: bytes, order: str = "<") -> bytes:
    body = _pad(body)
    total = 12 + len(body)
    return struct.pack(order + "II", btype, total) + body + struct.pack(order + "I", total)


def option(code: int, value: bytes, order: str = "<") -> bytes:
    return struct.pack(order + "HH", code, len(value)) + _pad(value)


def shb(order: str = "<") -> bytes:
    return block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)


def idb(linktype: int, options: bytes = b"", order: str = "<") -> bytes:
    if options:
        options += struct.pack(order + "HH", 0, 0)
    return block(1, struct.pack(order + "HHI", linktype, 0, 262144) + options, order)


def epb(iface: int, ticks: int, frame: bytes, order: str = "<", wire: int | None = None) -> bytes:
    body = (
        struct.pack(
            order + "IIIII",
            iface,
            ticks >> 32,
            ticks & 0xFFFFFFFF,
            len(frame),
            len(frame) if wire is None else wire,
        )
        + frame
    )
    return block(6, body, order)


def write(tmp_path: Path, data: bytes, name: str = "x.pcapng") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def payloads(path: str) -> list[tuple[float, bytes | None]]:
    return [(ts, p.payload if isinstance(p, Packet) else None) for ts, p in read_capture(path)]


# ---------------------------------------------------------------------------------------------
# pcapng


def test_pcapng_interfaces_keep_their_own_link_type_and_clock(tmp_path: Path) -> None:
    data = (
        shb()
        + idb(1)  # Ethernet, microseconds
        + idb(101, option(9, b"\x09") + option(14, struct.pack("<q", 100)))  # raw IP, ns, +100 s
        + idb(1, option(9, bytes([0x80 | 20])))  # Ethernet, 2^-20 s
        + epb(0, 1_540_483_112_577_057, eth_frame(b"a"))
        + epb(1, 1_540_483_112_577_057_123, udp_ip4(b"b"))
        + epb(2, 3 << 20 | 1 << 19, eth_frame(b"c"))
    )
    got = payloads(write(tmp_path, data))
    assert [p for _, p in got] == [b"a", b"b", b"c"]
    assert got[0][0] == 1540483112.577057
    assert got[1][0] == pytest.approx(1540483212.577057123, abs=1e-6)
    assert got[2][0] == 3.5


def test_pcapng_big_endian_and_a_second_section(tmp_path: Path) -> None:
    data = (
        shb(">")
        + idb(101, order=">")
        + epb(0, 2_000_000, udp_ip4(b"be"), ">")
        + shb("<")
        + idb(1)
        + epb(0, 3_000_000, eth_frame(b"le"))
    )
    assert payloads(write(tmp_path, data)) == [(2.0, b"be"), (3.0, b"le")]


def test_pcapng_blocks_without_packets_are_skipped(tmp_path: Path) -> None:
    data = (
        shb()
        + idb(1)
        + block(4, b"\x00\x00\x00\x00")  # name resolution
        + block(5, struct.pack("<III", 0, 0, 0))  # interface statistics
        + block(0x00000BAD, b"custom")  # custom block
        + epb(0, 1, eth_frame(b"p"))
        + block(3, struct.pack("<I", len(eth_frame(b"s"))) + eth_frame(b"s"))  # simple packet block
        + block(
            2,
            struct.pack("<HHIIII", 0, 0, 0, 5_000_000, len(eth_frame(b"o")), len(eth_frame(b"o")))
            + eth_frame(b"o"),
        )  # obsolete packet block
    )
    assert payloads(write(tmp_path, data)) == [(0.000001, b"p"), (0.000001, b"s"), (5.0, b"o")]


def test_pcapng_interface_of_an_unknown_link_type_gives_none(tmp_path: Path) -> None:
    data = shb() + idb(147) + epb(0, 1, b"\x01\x02\x03")  # LINKTYPE_USER0
    assert list(read_capture(write(tmp_path, data))) == [(0.000001, None)]


def test_pcapng_snaplen_truncated_packets_keep_header_lengths(tmp_path: Path) -> None:
    frame = eth_frame(bytes(1000))
    data = shb() + idb(1) + epb(0, 1, frame[:96], wire=len(frame))
    [(_, pkt)] = read_capture(write(tmp_path, data))
    assert (pkt.payload_len, len(pkt.payload)) == (1000, 54)


def test_pcapng_cut_anywhere_yields_the_whole_packets_before_the_cut(tmp_path: Path) -> None:
    head = shb() + idb(1)
    packets = [epb(0, i, eth_frame(bytes([i]) * 30)) for i in range(1, 4)]
    data = head + b"".join(packets)
    ends = [len(head) + sum(len(p) for p in packets[: i + 1]) for i in range(3)]
    for n in range(len(shb()), len(data) + 1):
        got = payloads(write(tmp_path, data[:n]))
        assert len(got) == sum(1 for end in ends if end <= n), n


def test_pcapng_cut_inside_the_section_header_is_an_error(tmp_path: Path) -> None:
    for n in (4, 10, len(shb()) - 1):
        with pytest.raises(CaptureError, match="truncated"):
            read_capture(write(tmp_path, shb()[:n]))


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (struct.pack("<II", 6, 5) + bytes(8), "damaged pcapng block at offset 124 \\(length 5\\)"),
        (struct.pack("<II", 6, 0x7FFFFFF0), "damaged pcapng block"),
        (epb(3, 1, b"x"), "unknown interface"),
        (block(6, struct.pack("<IIIII", 0, 0, 0, 500, 500)), "overruns itself"),
    ],
    ids=["length-below-minimum", "absurd-length", "unknown-interface", "caplen-overrun"],
)
def test_pcapng_damage_mid_file_is_an_error_after_the_good_packets(
    tmp_path: Path, tail: bytes, message: str
) -> None:
    path = write(tmp_path, shb() + idb(1) + epb(0, 1, eth_frame(b"ok")) + tail)
    packets = read_capture(path)
    assert next(packets)[1].payload == b"ok"
    with pytest.raises(CaptureError, match=message):
        next(packets)


def test_pcapng_bad_byte_order_magic_is_an_error(tmp_path: Path) -> None:
    bad = bytearray(shb())
    bad[8:12] = b"ABCD"
    with pytest.raises(CaptureError, match="byte-order"):
        read_capture(write(tmp_path, bytes(bad)))


# ---------------------------------------------------------------------------------------------
# classic pcap


def test_write_pcap_round_trips_microseconds_and_nanoseconds(tmp_path: Path) -> None:
    frames = [(1540483112.577057, eth_frame(b"one")), (1540483113.000001, eth_frame(b"two"))]
    for nano in (False, True):
        path = str(tmp_path / f"out-{nano}.pcap")
        write_pcap(path, frames, nano=nano)
        got = payloads(path)
        assert [p for _, p in got] == [b"one", b"two"]
        assert [ts for ts, _ in got] == pytest.approx([ts for ts, _ in frames], abs=1e-6)


def test_write_pcap_rounds_up_into_the_next_second(tmp_path: Path) -> None:
    path = str(tmp_path / "carry.pcap")
    write_pcap(path, [(9.9999999, eth_frame(b"c"))])
    assert payloads(path) == [(10.0, b"c")]


@pytest.mark.parametrize(
    ("magic", "order", "tps", "extra"),
    [
        (0xA1B2C3D4, ">", 1_000_000, 0),
        (0xA1B23C4D, ">", 1_000_000_000, 0),
        (0xA1B23C4D, "<", 1_000_000_000, 0),
        (0xA1B2CD34, "<", 1_000_000, 8),
    ],
    ids=["big-endian-us", "big-endian-ns", "little-endian-ns", "kuznetzov"],
)
def test_pcap_byte_orders_and_resolutions(
    tmp_path: Path, magic: int, order: str, tps: int, extra: int
) -> None:
    frame = udp_ip4(b"raw")
    data = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, 101)
    data += (
        struct.pack(order + "IIII", 100, tps // 4, len(frame), len(frame)) + bytes(extra) + frame
    )
    assert payloads(write(tmp_path, data, "x.cap")) == [(100.25, b"raw")]


def test_pcap_link_type_keeps_only_the_low_16_bits(tmp_path: Path) -> None:
    fcs_flagged = 1 | 0x14000000  # Ethernet, with "FCS present, 4 bytes" in the high bits
    frame = eth_frame(b"f") + b"\xde\xad\xbe\xef"
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, fcs_flagged)
    data += struct.pack("<IIII", 1, 0, len(frame), len(frame)) + frame
    assert payloads(write(tmp_path, data)) == [(1.0, b"f")]


def test_pcap_with_an_unsupported_link_type_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "radiotap.pcap")
    write_pcap(path, [], linktype=127)
    with pytest.raises(CaptureError, match="unsupported link type 127"):
        read_capture(path)


def test_pcap_cut_anywhere_stops_quietly(tmp_path: Path) -> None:
    path = str(tmp_path / "whole.pcap")
    write_pcap(path, [(float(i), eth_frame(bytes(20))) for i in range(3)])
    data = Path(path).read_bytes()
    record = 16 + len(eth_frame(bytes(20)))
    for n in range(24, len(data) + 1):
        assert len(payloads(write(tmp_path, data[:n]))) == (n - 24) // record


def test_pcap_record_with_an_absurd_length_is_an_error(tmp_path: Path) -> None:
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + struct.pack(
        "<IIII", 0, 0, 1 << 30, 60
    )
    with pytest.raises(CaptureError, match="damaged record at offset 24"):
        list(read_capture(write(tmp_path, data)))


# ---------------------------------------------------------------------------------------------
# Not captures


def test_format_comes_from_the_magic_not_the_name(tmp_path: Path) -> None:
    path = str(tmp_path / "really-a-pcap.pcapng")
    write_pcap(path, [(1.0, eth_frame(b"m"))])
    assert payloads(path) == [(1.0, b"m")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "shorter than a file header"),
        (b"abc", "shorter than a file header"),
        (b"# not a capture\n", "not a pcap or pcapng file"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "pcap file header truncated"),
    ],
    ids=["empty", "tiny", "text", "pcap-header-cut"],
)
def test_files_that_are_not_captures_are_errors(
    tmp_path: Path, content: bytes, message: str
) -> None:
    with pytest.raises(CaptureError, match=message):
        read_capture(write(tmp_path, content, "x.pcap"))


def test_missing_file_and_directory_are_errors(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="cannot open"):
        read_capture(str(tmp_path / "nope.pcap"))
    with pytest.raises(CaptureError, match="cannot"):
        read_capture(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The shared captures (pcapng despite the .pcap names; nanosecond clocks in vcfingerprinting)


@pytest.mark.parametrize(
    ("name", "count", "duration_s"),
    [
        ("smart-speakers-study/echodot3a.pcap", 2778, 47.9),
        ("smart-speakers-study/homepod_friday_night_tykes.pcap", 4257, 43.7 * 60),
        ("vcfingerprinting/haipeng_li__set_volume_to_five_5_30s.pcap", 766, 157),
        (
            "vcfingerprinting/sean_kennedy__what_is_the_weather_5_60_80_100_120_140_capture.pcap",
            3114,
            164,
        ),
    ],
)
def test_shared_captures_read_completely(
    captures: Path, name: str, count: int, duration_s: float
) -> None:
    results = list(read_capture(str(captures / name)))
    # The packet counts and durations SOURCES.md verified with dpkt.
    assert len(results) == count
    assert not any(isinstance(p, Malformed) for _, p in results)
    times = [ts for ts, _ in results]
    assert max(times) - min(times) == pytest.approx(duration_s, rel=0.02)
    # These captures run backwards by a few microseconds now and then (packets from different
    # CPU queues); consumers must tolerate it, and it must never be more than that.
    assert all(b - a > -0.001 for a, b in pairwise(times))


def test_shared_capture_clocks_match_the_labelled_upload_times(captures: Path) -> None:
    labels = tomllib.loads((captures / "labels.toml").read_text())
    for capture in labels["capture"]:
        times = sorted(ts for ts, _ in read_capture(str(captures / capture["file"])))
        for voice in capture.get("voice", []):
            # Each label's start is a packet's time, written to the microsecond (truncated from
            # nanoseconds in vcfingerprinting); a wrong if_tsresol would be off by 1000x.
            i = bisect.bisect_left(times, voice["start"] - 1e-6)
            assert i < len(times) and abs(times[i] - voice["start"]) < 1e-6, (
                capture["file"],
                voice,
            )


def test_shared_capture_cut_short_yields_what_it_holds(captures: Path, tmp_path: Path) -> None:
    path = captures / "vcfingerprinting/haipeng_li__what_time_is_it_5_30s.pcap"
    data = path.read_bytes()
    whole = len(list(read_capture(str(path))))
    for cut in (len(data) // 3, len(data) // 2 + 1):
        n = len(list(read_capture(write(tmp_path, data[:cut]))))
        assert 0 < n < whole
    # The file ends with a statistics block: losing its tail loses no packet.
    assert len(list(read_capture(write(tmp_path, data[:-3])))) == whole
