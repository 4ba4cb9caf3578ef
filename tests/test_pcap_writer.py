"""One pcap writer (issue 14 point 6): guard/tools/capture.py `write_pcap`, which the simulator's
synthetic captures and the tests use too; nothing else in guard/ or hushsim/ writes pcap."""

from __future__ import annotations

import struct
from pathlib import Path

from guard.tools.capture import read_capture, write_pcap

REPO = Path(__file__).resolve().parents[1]
WRITER = REPO / "guard" / "tools" / "capture.py"


def test_nothing_else_writes_a_pcap() -> None:
    others = []
    for path in sorted([*REPO.glob("guard/**/*.py"), *REPO.glob("hushsim/**/*.py")]):
        text = path.read_text()
        # dpkt's writer, or a pcap file header packed by hand (magic, 2, 4, zone, sigfigs,
        # snaplen, link type): reading the magic is fine
        if path != WRITER and ("pcap.Writer" in text or "IHHiIII" in text):
            others.append(str(path.relative_to(REPO)))
    assert others == []


def test_the_header_says_the_link_type_and_snaplen_it_was_given(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    write_pcap(path, [(1.5, bytes(60))], linktype=1, snaplen=65_535)
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII",
                                                                      path.read_bytes())
    assert (magic, major, minor, snaplen, linktype) == (0xA1B2C3D4, 2, 4, 65_535, 1)
    sec, usec, caplen, length = struct.unpack_from("<IIII", path.read_bytes(), 24)
    assert (sec, usec, caplen, length) == (1, 500_000, 60, 60)
    assert [ts for ts, _ in read_capture(str(path))] == [1.5]


def test_the_synthetic_session_is_written_by_it(tmp_path: Path) -> None:
    from hushsim import synth  # dpkt: the test and sim extras

    path = synth.write_nest_quic(tmp_path / "nest.pcap", seed=1)
    header = path.read_bytes()[:24]
    assert header == struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65_535, 1)
