"""Upstream traffic shapes for the speaker simulator: what a speaker's upload looks like on the wire.

Rules of this module: a `Profile` is data (a list of (offset_s, size_bytes) of upstream L4 payloads),
never code. Sizes are on-the-wire TCP payload (TLS record) or UDP payload (QUIC datagram) lengths;
the speaker turns them into plaintext writes. Built-in profiles are synthetic, made deterministically
from the facts in design.md section 7, so the simulator works without ../shared; capture profiles
are extracted from ../shared/captures (labels.toml) when that folder is present, never copied.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tomllib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

# A full-sized segment on the captured Echos' 1500-byte Ethernet without TCP timestamps (every
# capture in ../shared shows 1,460-B segments). The speaker clamps to its own connection's MSS.
MSS_BYTES = 1460
# QUIC datagrams seen from the Nest Mini (design.md section 7: "~1,350-B datagrams").
QUIC_DATAGRAM_BYTES = 1350


class Transport(str, Enum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True, slots=True)
class Profile:
    """An upstream shape: `items` are (offset from the first payload in s, L4 payload bytes)."""

    name: str
    transport: Transport
    items: tuple[tuple[float, int], ...]
    description: str = ""
    source: str = "builtin"
    audio: bool = True  # ground truth for tests: is this shape an audio upload?
    # items are whole TLS records (as the speaker wrote them), not TCP segments: written at
    # their own size, never clamped to the connection's MSS
    records: bool = False

    @property
    def duration_s(self) -> float:
        return self.items[-1][0] if self.items else 0.0

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.items)

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "transport": self.transport.value,
                "items": [[round(t, 6), s] for t, s in self.items],
                "description": self.description,
                "source": self.source,
                "audio": self.audio,
                "records": self.records,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Profile:
        raw = json.loads(text)
        items = tuple((float(t), int(s)) for t, s in raw["items"])
        if not items or any(s <= 0 for _, s in items):
            raise ValueError(f"profile {raw.get('name')!r}: items must be non-empty, sizes > 0")
        return cls(
            name=str(raw["name"]),
            transport=Transport(raw.get("transport", "tcp")),
            items=tuple(sorted(items, key=lambda it: it[0])),
            description=str(raw.get("description", "")),
            source=str(raw.get("source", "file")),
            audio=bool(raw.get("audio", True)),
            records=bool(raw.get("records", False)),
        )


# ---------------------------------------------------------------------------------------------
# Built-in synthetic profiles (design.md section 7). Every generator is seeded: same bytes, same
# timing, every run, so a test failure reproduces.


def _burst(t: float, total_bytes: int, seg: int = MSS_BYTES) -> list[tuple[float, int]]:
    """`total_bytes` as back-to-back full segments at offset `t` (the speaker writes them as fast
    as it can), the remainder as a last short segment."""
    out: list[tuple[float, int]] = []
    left = total_bytes
    while left > 0:
        size = min(seg, left)
        out.append((t, size))
        left -= size
    return out


def _records(
    rng: random.Random, start: float, end: float, size: int, rate_per_s: float, jitter: float
) -> list[tuple[float, int]]:
    """Constant-size records at `rate_per_s` from `start` to `end` with +-`jitter` of the period."""
    out: list[tuple[float, int]] = []
    period = 1.0 / rate_per_s
    t = start
    for _ in range(100_000):  # bound: no profile is longer than a few minutes
        if t >= end:
            break
        out.append((round(t + rng.uniform(-jitter, jitter) * period, 6), size))
        t += period
    return out


def _echo_opus_118() -> Profile:
    # Captures (vcfingerprinting sean_kennedy__*): a ~233-B header record, 3-4 clumps of 1,460-B
    # segments within ~0.13 s (pre-roll + wake word, 8-28 KB), then 118-B records at 52-59/s;
    # median 2.95 s / 48 KB.
    rng = random.Random(118)
    items = [(0.0, 233), (0.0005, 136)]
    items += _burst(0.001, 4 * MSS_BYTES)
    items += _burst(0.045, 4 * MSS_BYTES)
    items += _burst(0.10, 5 * MSS_BYTES)
    items += _records(rng, 0.12, 2.7, 118, 55.0, 0.3)
    return Profile(
        "echo-opus-118",
        Transport.TCP,
        tuple(sorted(items)),
        "Echo (2018) Opus: start burst of 13 MSS segments in 0.1 s, then 118-B records at 55/s",
    )


def _echo_preroll() -> Profile:
    # The same upload as the app would write it: the pre-roll (the 500 ms before the wake word
    # and the wake word itself) is audio already recorded when the upload starts, so it goes
    # into the socket at once; the captures' clumps within it are their ACK clock, not the
    # app's writes. Then a 118-B record per Opus frame at 55/s.
    rng = random.Random(1180)
    items = [(0.0, 233), (0.0, 136)]
    items += _burst(0.0, 13 * MSS_BYTES)
    items += _records(rng, 0.12, 2.7, 118, 55.0, 0.3)
    return Profile(
        "echo-preroll",
        Transport.TCP,
        tuple(sorted(items)),
        "Echo (2018) Opus: header records and a 13-segment pre-roll written at once, then "
        "118-B records at 55/s",
    )


def _echo_opus_437() -> Profile:
    # Captures (vcfingerprinting haipeng_li__*): ~230-B header, a few 1,460-B clumps in 0.2 s,
    # then 437-B records at 20-29/s; 2.0-3.4 s, 30-55 KB.
    rng = random.Random(437)
    items = [(0.0, 227), (0.03, 942)]
    items += _burst(0.06, 3 * MSS_BYTES)
    items += _burst(0.12, 6 * MSS_BYTES)
    items += _records(rng, 0.2, 2.6, 437, 25.0, 0.3)
    return Profile(
        "echo-opus-437",
        Transport.TCP,
        tuple(sorted(items)),
        "Echo (2018) 437-B mode: 10 MSS segments in 0.2 s, then 437-B records at 25/s",
    )


def _echo_dot_pcm() -> Profile:
    # echodot3a.pcap: 1,062-B records at ~35 KB/s, 76 KB in the first second, 4.4 s / 221 KB.
    rng = random.Random(1062)
    items = [(0.0, 366)]
    items += _burst(0.001, 30 * MSS_BYTES)
    items += _records(rng, 0.05, 4.4, 1062, 37.0, 0.2)
    return Profile(
        "echo-dot-pcm",
        Transport.TCP,
        tuple(sorted(items)),
        "Echo Dot 3 (2019) PCM: 44 KB start burst, then 1,062-B records at ~35 KB/s for 4.4 s",
    )


def _homepod() -> Profile:
    # homepod_friday_night_tykes.pcap: a new connection per activation, ~21 pkt/s of variable
    # record sizes (38-1,460 B), ~36-38 KB in ~5.5 s, a few full segments early on.
    rng = random.Random(21)
    items: list[tuple[float, int]] = [(0.0, 38), (0.3, 93), (0.3, 146), (0.3, 241), (0.4, 604)]
    items += _burst(0.45, 3 * MSS_BYTES)
    t = 0.5
    for _ in range(1000):
        if t >= 5.5:
            break
        items.append((round(t, 6), rng.choice((86, 101, 128, 247, 257, 265, 282, 329, 604))))
        t += rng.uniform(0.02, 0.075)  # mean ~0.048 s => ~21 pkt/s
    return Profile(
        "homepod",
        Transport.TCP,
        tuple(sorted(items)),
        "HomePod (guzzoni.apple.com): new connection per activation, ~21 pkt/s, ~5.5 s",
    )


def _nest_quic() -> Profile:
    # Nest Mini (2021): QUIC over UDP 443, 183-217 KB in under 3 s as ~1,350-B datagrams at
    # 78-126 pkt/s. 150 datagrams at 100/s = 202 KB in 1.5 s.
    rng = random.Random(1350)
    items = _records(rng, 0.0, 1.5, QUIC_DATAGRAM_BYTES, 100.0, 0.2)
    return Profile(
        "nest-quic",
        Transport.UDP,
        tuple(sorted((max(0.0, t), s) for t, s in items)),
        "Nest Mini QUIC: ~1,350-B datagrams at 100 pkt/s for 1.5 s, ~200 KB",
    )


def _event_burst() -> Profile:
    # A smart-home state report / event on the voice connection: a few KB at once, then silence.
    return Profile(
        "event-burst",
        Transport.TCP,
        ((0.0, 233), (0.001, MSS_BYTES), (0.002, MSS_BYTES), (0.003, 700)),
        "event: ~3.8 KB in 3 ms, then silence",
        audio=False,
    )


def _telemetry() -> Profile:
    # device-metrics-us.amazon.com: 22-100 KB MSS-sized bursts, usually under 0.3 s (a 74 KB
    # burst in 0.26 s in sean_kennedy__what_is_the_weather).
    items: list[tuple[float, int]] = []
    for k in range(4):
        items += _burst(round(k * 0.06, 6), 12 * MSS_BYTES)
    return Profile(
        "telemetry",
        Transport.TCP,
        tuple(items),
        "telemetry: 70 KB of MSS segments in 0.18 s",
        audio=False,
    )


def _volume_change() -> Profile:
    # App-driven volume change: 13.5 KB over 0.8 s (design.md section 7 look-alikes).
    rng = random.Random(135)
    items = _records(rng, 0.0, 0.8, 675, 25.0, 0.2)
    return Profile(
        "volume-change",
        Transport.TCP,
        tuple(sorted((max(0.0, t), s) for t, s in items)),
        "app volume change: 20 records of 675 B over 0.8 s (13.5 KB)",
        audio=False,
    )


def _unagi() -> Profile:
    # unagi-na.amazon.com: 6-9 KB over ~1 s.
    rng = random.Random(6)
    items = _records(rng, 0.0, 1.0, 512, 15.0, 0.3)
    return Profile(
        "unagi",
        Transport.TCP,
        tuple(sorted((max(0.0, t), s) for t, s in items)),
        "unagi: 15 records of 512 B over 1 s (7.7 KB)",
        audio=False,
    )


def _followup_9k() -> Profile:
    # ~9 KB bursts on the voice connection 13-20 s after a query.
    return Profile(
        "followup-9k",
        Transport.TCP,
        tuple(_burst(0.0, 9000)),
        "post-query burst: ~9 KB at once",
        audio=False,
    )


BUILTIN: dict[str, Profile] = {
    p.name: p
    for p in (
        _echo_opus_118(),
        _echo_preroll(),
        _echo_opus_437(),
        _echo_dot_pcm(),
        _homepod(),
        _nest_quic(),
        _event_burst(),
        _telemetry(),
        _volume_change(),
        _unagi(),
        _followup_9k(),
    )
}


# ---------------------------------------------------------------------------------------------
# Capture-derived profiles. Extraction reads L4 lengths from the IP header, not the captured
# bytes, so traces with truncated or zeroed payloads give the same shape.


def default_captures_dir() -> Path | None:
    """$HUSHGATE_CAPTURES, else ../shared/captures beside the repository, else None."""
    env = os.environ.get("HUSHGATE_CAPTURES")
    if env:
        path = Path(env)
        return path if path.is_dir() else None
    here = Path(__file__).resolve()
    for parent in here.parents[:5]:
        candidate = parent / "shared" / "captures"
        if (candidate / "labels.toml").is_file():
            return candidate
    return None


def _open_reader(fh: BinaryIO) -> Any:  # dpkt's readers are untyped
    import dpkt

    magic = fh.read(4)
    fh.seek(0)
    if magic == b"\x0a\x0d\x0d\x0a":
        return dpkt.pcapng.Reader(fh)
    return dpkt.pcap.Reader(fh)


def extract(
    path: Path, device: str, remote: str, start: float, end: float, name: str | None = None
) -> Profile:
    """Upstream payload sizes from `device` to `remote` ("addr:port") between `start` and `end`
    (capture time), retransmissions (a sequence range already seen) left out."""
    import dpkt

    r_addr, _, r_port = remote.rpartition(":")
    r_port_n = int(r_port)
    seen: set[tuple[int, int]] = set()
    items: list[tuple[float, int]] = []
    transport = Transport.TCP
    margin = 0.01  # labels are rounded to microseconds
    with path.open("rb") as fh:
        reader = _open_reader(fh)
        linktype = reader.datalink()
        for count, (ts, buf) in enumerate(reader):
            if count > 5_000_000:  # bound: the shared captures hold a few thousand packets
                break
            if ts < start - margin or ts > end + margin:
                continue
            try:
                if linktype == dpkt.pcap.DLT_EN10MB:
                    ip = dpkt.ethernet.Ethernet(buf).data
                elif linktype == 113:  # Linux cooked capture
                    ip = dpkt.sll.SLL(buf).data
                else:  # raw IP
                    ip = dpkt.ip.IP(buf) if buf[:1] and buf[0] >> 4 == 4 else dpkt.ip6.IP6(buf)
            except (dpkt.UnpackError, IndexError, ValueError):
                continue
            if isinstance(ip, dpkt.ip.IP):
                src, dst = socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst)
                l4_len = ip.len - ip.hl * 4
            elif isinstance(ip, dpkt.ip6.IP6):
                src = socket.inet_ntop(socket.AF_INET6, ip.src)
                dst = socket.inet_ntop(socket.AF_INET6, ip.dst)
                l4_len = ip.plen
            else:
                continue
            if src != device or dst != r_addr:
                continue
            l4 = ip.data
            if isinstance(l4, dpkt.tcp.TCP):
                if l4.dport != r_port_n:
                    continue
                size = l4_len - l4.off * 4
                if size <= 0 or (l4.seq, size) in seen:
                    continue
                seen.add((l4.seq, size))
            elif isinstance(l4, dpkt.udp.UDP):
                if l4.dport != r_port_n:
                    continue
                transport = Transport.UDP
                size = l4_len - 8
                if size <= 0:
                    continue
            else:
                continue
            items.append((ts, size))
    if not items:
        raise ValueError(f"{path.name}: no upstream payload from {device} to {remote}")
    items.sort()
    t0 = items[0][0]
    rel = tuple((round(t - t0, 6), s) for t, s in items)
    return Profile(
        name or f"capture:{path.stem}",
        transport,
        rel,
        f"{len(rel)} payloads, {sum(s for _, s in rel)} B in {rel[-1][0]:.2f} s",
        source=str(path),
    )


def capture_labels(captures_dir: Path) -> list[tuple[str, Path, str, dict]]:
    """(profile name, pcap path, device, voice label) for every labelled voice upload.

    Names are `capture:<file stem>#<k>` with k counting from 0 in labels.toml order."""
    with (captures_dir / "labels.toml").open("rb") as fh:
        labels = tomllib.load(fh)
    out: list[tuple[str, Path, str, dict]] = []
    for cap in labels.get("capture", []):
        path = captures_dir / cap["file"]
        for k, voice in enumerate(cap.get("voice", [])):
            out.append((f"capture:{path.stem}#{k}", path, cap["device"], voice))
    return out


def capture_profiles(captures_dir: Path | None = None) -> dict[str, Profile]:
    """Every labelled voice upload as a profile; {} when no captures folder is around."""
    directory = captures_dir or default_captures_dir()
    if directory is None:
        return {}
    out: dict[str, Profile] = {}
    for name, path, device, voice in capture_labels(directory):
        if path.is_file():
            out[name] = extract(
                path, device, voice["remote"], voice["start"], voice["end"], name=name
            )
    return out


def resolve(name: str, captures_dir: Path | None = None) -> Profile:
    """A built-in profile by name, `capture:<stem>#<k>` from the captures, or a JSON file path."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith("capture:"):
        directory = captures_dir or default_captures_dir()
        if directory is None:
            raise LookupError(f"{name}: no captures folder (set HUSHGATE_CAPTURES)")
        for cname, path, device, voice in capture_labels(directory):
            if cname == name:
                return extract(path, device, voice["remote"], voice["start"], voice["end"], name)
        raise LookupError(f"{name}: no such labelled upload in {directory}")
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return Profile.from_json(path.read_text())
    raise LookupError(f"unknown profile {name!r}; built-in: {', '.join(sorted(BUILTIN))}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hushsim.profiles",
        description="List speaker profiles or dump one as JSON.",
    )
    ap.add_argument("name", nargs="?", help="a profile to print as JSON")
    ap.add_argument("--captures", type=Path, default=None, help="captures folder")
    args = ap.parse_args(argv)
    try:
        if args.name:
            print(resolve(args.name, args.captures).to_json())
            return 0
        every = [*BUILTIN.values(), *capture_profiles(args.captures).values()]
    except (LookupError, ValueError, OSError) as exc:
        print(f"profiles: {exc}", file=sys.stderr)
        return 1
    for p in every:
        kind = "audio" if p.audio else "other"
        print(
            f"{p.name:64} {p.transport.value} {len(p.items):4} items {p.total_bytes:7} B "
            f"{p.duration_s:5.2f} s {kind}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
