"""Throughput of `hushgate analyze` against a bare dpkt loop over the same capture.

Rules of this file: the big capture is built from the shared captures' frames (repeated, with
timestamps shifted so time runs forward) in a temporary directory, never in the repo, and removed
at the end; both contenders read that same file in the same run; each is timed `--runs` times
(default 3) and the median is reported.

    python bench/analyze_bench.py [--packets N] [--runs R] [--shared DIR] [--json]

(a) bare: dpkt.pcap.Reader, then dpkt.ethernet.Ethernet(buf).data.data and the L4 payload's
    length for every frame: the least any Python analysis of the file must do;
(b) analyze: guard.tools.analyze.analyze_capture(path) with automatic device discovery.
The ratio is analyze time / bare time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dpkt

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared"
DEFAULT_PACKETS = 200_000
GAP_BETWEEN_COPIES_S = 1.0


def _frames(path: Path) -> Iterator[tuple[float, bytes]]:
    """(timestamp, frame) of an Ethernet pcap or pcapng; other link types are skipped."""
    with path.open("rb") as f:
        magic = f.read(4)
        f.seek(0)
        reader = dpkt.pcapng.Reader(f) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(f)
        if reader.datalink() != dpkt.pcap.DLT_EN10MB:
            return
        yield from reader


def build_capture(shared: Path, packets: int, out: Path) -> dict[str, Any]:
    """Concatenate the shared captures' frames, over and over, until `packets` frames are
    written to `out`; each copy starts GAP_BETWEEN_COPIES_S after the previous one ended."""
    sources = sorted(
        p for p in (shared / "captures").rglob("*") if p.suffix in (".pcap", ".pcapng")
    )
    if not sources:
        raise FileNotFoundError(f"no captures under {shared / 'captures'}")
    written, copies, clock = 0, 0, None
    with out.open("wb") as f:
        writer = dpkt.pcap.Writer(f, snaplen=262_144, linktype=dpkt.pcap.DLT_EN10MB)
        while written < packets:
            before = written
            for src in sources:
                frames = list(_frames(src))
                if not frames:
                    continue
                first = frames[0][0]
                shift = 0.0 if clock is None else clock - first
                last = first + shift
                for ts, buf in frames:
                    writer.writepkt(buf, ts + shift)
                    last = max(last, ts + shift)
                    written += 1
                    if written >= packets:
                        break
                clock = last + GAP_BETWEEN_COPIES_S
                copies += 1
                if written >= packets:
                    break
            if written == before:
                raise ValueError("the shared captures hold no Ethernet frames")
    return {
        "path": str(out),
        "packets": written,
        "bytes": out.stat().st_size,
        "sources": len(sources),
        "copies": copies,
    }


def bare_loop(path: str) -> int:
    """Parse every frame down to L4 with dpkt and touch the payload length."""
    n = payload = 0
    with open(path, "rb") as f:
        for _ts, buf in dpkt.pcap.Reader(f):
            n += 1
            try:
                l4 = dpkt.ethernet.Ethernet(buf).data.data
            except (AttributeError, dpkt.UnpackError):
                continue
            payload += len(l4) if isinstance(l4, bytes) else len(l4.data)
    return n


def analyze(path: str) -> int:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from guard.tools.analyze import analyze_capture

    return int(analyze_capture(path)["packets"])


def timed(fn: Callable[[str], int], path: str, runs: int) -> tuple[float, list[float], int]:
    times, n = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        n = fn(path)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, n


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--packets",
        type=int,
        default=DEFAULT_PACKETS,
        help="frames in the built capture (default: %(default)s)",
    )
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each (median reported)")
    ap.add_argument(
        "--shared",
        type=Path,
        default=DEFAULT_SHARED,
        help="the shared folder holding captures/ (default: %(default)s)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.packets < 1 or args.runs < 1:
        print("analyze_bench: --packets and --runs must be positive", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="hushgate-bench-") as tmp:
            built = build_capture(args.shared, args.packets, Path(tmp) / "bench.pcap")
            bare_s, bare_runs, bare_n = timed(bare_loop, built["path"], args.runs)
            analyze_s, analyze_runs, analyze_n = timed(analyze, built["path"], args.runs)
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        print(f"analyze_bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    out = {
        "packets": built["packets"],
        "capture_bytes": built["bytes"],
        "copies_of_shared_captures": built["copies"],
        "runs": args.runs,
        "bare_s": bare_s,
        "bare_runs_s": bare_runs,
        "bare_pps": bare_n / bare_s,
        "analyze_s": analyze_s,
        "analyze_runs_s": analyze_runs,
        "analyze_pps": analyze_n / analyze_s,
        "ratio_analyze_over_bare": analyze_s / bare_s,
    }
    if bare_n != analyze_n:
        out["note"] = f"bare loop read {bare_n} frames, analyze reported {analyze_n} packets"
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"capture: {out['packets']:,} packets, {out['capture_bytes'] / 1e6:.1f} MB "
        f"({built['copies']} captures concatenated, temporary)"
    )
    print(
        f"bare dpkt loop : {bare_s:7.3f} s median of {args.runs}  "
        f"{out['bare_pps']:>10,.0f} packets/s"
    )
    print(
        f"analyze_capture: {analyze_s:7.3f} s median of {args.runs}  "
        f"{out['analyze_pps']:>10,.0f} packets/s"
    )
    print(f"ratio analyze/bare (time): {out['ratio_analyze_over_bare']:.2f}")
    if "note" in out:
        print(f"note: {out['note']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
