"""Shape-only copies of the labelled captures, to check that detection rests on lengths and timing.

The issue's hidden test set includes "shape-only traces with no handshake, no names and zeroed
payloads, under neutral file names". This makes such copies of the shared captures: every TCP
and UDP payload is overwritten with zeros (its length kept, so IP and L4 lengths, sequence
numbers and timing are untouched), TCP segments with SYN are dropped (no connection is seen
from its start), each file's clock starts at 0, and the files are renamed `traceNN.pcap`. With the payloads go the TLS and QUIC
names (SNI), the DNS answers and every record header: only the rules' address prefixes and MAC
OUIs are left to name anything.

Rules of this file: `shape_only_frame` is a pure function of one frame; the copies are written
only where the caller says (a temporary directory), never into the repository, and the labels
are carried over with their times moved by the same offset as the clock (each copy's label
says it: `offset`, the original time of its first packet; `original`, the capture it copies).

    python bench/shape_only.py OUT_DIR [--shared DIR]   # writes OUT_DIR/captures/...
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import dpkt

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared"

ETHERNET = 1  # DLT_EN10MB: the only link type the shared captures use


def shape_only_frame(frame: bytes) -> bytes | None:
    """The frame with its TCP/UDP payload zeroed (same length); None for a TCP SYN (dropped).
    A frame that is not Ethernet/IP/TCP-or-UDP, or does not parse, is returned unchanged."""
    try:
        eth = dpkt.ethernet.Ethernet(frame)
    except (dpkt.UnpackError, IndexError, ValueError):
        return frame
    ip = eth.data
    if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)):
        return frame
    l4 = ip.data
    if isinstance(l4, dpkt.tcp.TCP):
        if l4.flags & dpkt.tcp.TH_SYN:
            return None
    elif not isinstance(l4, dpkt.udp.UDP):
        return frame
    l4.data = bytes(len(l4.data))
    l4.sum = 0  # recomputed by dpkt on serialisation
    if isinstance(ip, dpkt.ip.IP):
        ip.sum = 0
    return bytes(eth)


def write_shape_only(shared: Path, out: Path) -> list[dict]:
    """Shape-only copies of every capture in `shared`/captures/labels.toml, written to
    `out`/captures/traceNN.pcap with a labels.toml beside them; returns the new labels, each
    with `offset` (what was subtracted from its times) and `original` (the file it copies)."""
    captures_in = shared / "captures"
    labels = tomllib.loads((captures_in / "labels.toml").read_text())["capture"]
    captures_out = out / "captures"
    captures_out.mkdir(parents=True, exist_ok=True)
    renamed = []
    for index, cap in enumerate(labels):
        name = f"trace{index:02d}.pcap"
        with open(captures_in / cap["file"], "rb") as f:
            reader = dpkt.pcap.UniversalReader(f)
            if reader.datalink() != ETHERNET:
                raise ValueError(f"{cap['file']}: link type {reader.datalink()}, not Ethernet")
            offset = None
            with open(captures_out / name, "wb") as g:
                writer = dpkt.pcap.Writer(g, linktype=ETHERNET, nano=True)
                for ts, frame in reader:
                    if offset is None:
                        offset = float(ts)
                    shaped = shape_only_frame(frame)
                    if shaped is not None:
                        writer.writepkt(shaped, float(ts) - offset)
        offset = offset or 0.0
        voice = [{**v, "start": v["start"] - offset, "end": v["end"] - offset}
                 for v in cap.get("voice", [])]
        renamed.append({**cap, "file": name, "voice": voice, "offset": offset,
                        "original": cap["file"]})
    (captures_out / "labels.toml").write_text("".join(_toml(cap) for cap in renamed))
    return renamed


def _toml(cap: dict) -> str:
    text = (f'[[capture]]\nfile = "{cap["file"]}"\ndevice = "{cap["device"]}"\n'
            f'vendor = "{cap["vendor"]}"\noffset = {cap["offset"]!r}\n'
            f'original = "{cap["original"]}"\n')
    for v in cap.get("voice", []):
        text += (f'[[capture.voice]]\nstart = {v["start"]!r}\nend = {v["end"]!r}\n'
                 f'remote = "{v["remote"]}"\nbytes = {v["bytes"]}\n')
    return text + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="directory to write captures/ into (not the repo)")
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                    help="the shared folder holding captures/labels.toml (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.out.resolve().is_relative_to(REPO):
        print("shape_only: write the copies outside the repository", file=sys.stderr)
        return 2
    try:
        labels = write_shape_only(args.shared, args.out)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"shape_only: {exc}", file=sys.stderr)
        return 1
    print(f"{len(labels)} shape-only captures in {args.out / 'captures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
