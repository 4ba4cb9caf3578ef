"""Whole voice-connection timelines from ../shared/captures, cut into bursts, for live replays.

Rules of this module: data from the captures' L4 lengths and timestamps only (like
`profiles.extract`), never their content; pure functions over that data, no sockets, no clock. The
live harness that replays these timelines through a real guard is tests/e2e/replaykit.py.

A capture's *voice connection* is the TCP connection (device, source port -> the labelled remote)
that carries a labelled upload (labels.toml). Its whole upstream timeline (every payload, not just
the labels; retransmissions left out) is cut into bursts: payloads less than `BURST_GAP_S` apart
form one burst; a burst is *audio* when it overlaps a label. A replay is a chosen subset of one
connection's bursts, in order, with the idle time between them shortened to at most `max_gap_s`
(a burst's inside is replayed exactly), as a `Profile` for the speaker simulator
(`python -m hushsim.speaker ... upload --profile FILE.json`).

The speaker writes the whole profile as ONE upload frame, one TLS record per item
(`TlsSpeaker.upload`): item sizes clamped to the connection's MSS, plaintext = wire size - record
overhead (at least 1 B), and the frame's 5-B header is the first bytes of the first item's
plaintext. So item k's plaintext is bytes [start_k, end_k) of the connection's application stream,
which is exactly what the cloud counts (`cloud.py` app_bytes): `plaintext_spans` gives those
offsets, and "the cloud had received item k" reads "the cloud's app_bytes >= end_k".
"""

from __future__ import annotations

import socket
import tomllib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from guard.core.records import CapturedStream
from hushsim import wire
from hushsim.profiles import Profile, Transport, _open_reader

BURST_GAP_S = 1.0  # payloads closer than this are one burst
MAX_GAP_S = 1.5  # idle time between replayed bursts is shortened to this
LABEL_MARGIN_S = 0.01  # labels are rounded to microseconds (as in profiles.extract)
MAX_PACKETS = 5_000_000  # bound on one capture's packets (the shared ones hold a few thousand)
HANDSHAKE_TYPES = frozenset({20, 21, 22})  # change_cipher_spec, alert, handshake


@dataclass(frozen=True, slots=True)
class Label:
    """One labelled upload: `name` is `capture:<stem>#<k>` as in `profiles.capture_labels`."""

    name: str
    start: float
    end: float
    remote: str
    bytes: int


@dataclass(frozen=True, slots=True)
class Burst:
    """Items [first, last] (inclusive, indices into the connection's items) of one burst."""

    index: int  # k-th burst of its connection
    first: int
    last: int
    start: float  # capture time of its first / last item
    end: float
    wire_bytes: int
    labels: tuple[str, ...]  # names of the labels it overlaps (empty: not audio)
    # index of the first item inside the first label (the upload's first byte), audio only
    audio_first: int | None

    @property
    def audio(self) -> bool:
        return bool(self.labels)

    @property
    def records(self) -> int:
        return self.last - self.first + 1

    @property
    def duration_s(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Connection:
    """The whole upstream timeline of one voice connection of a capture."""

    capture: str  # file stem
    path: Path
    vendor: str
    device: str
    remote: str  # "addr:port"
    device_port: int
    items: tuple[tuple[float, int], ...]  # (capture time, L4 payload bytes), in time order
    labels: tuple[Label, ...]
    bursts: tuple[Burst, ...]

    @property
    def name(self) -> str:
        return f"{self.capture}:{self.device_port}"

    @property
    def family(self) -> str:
        """The speaker family, for choosing subsets: echo-2018, echo-dot-pcm, homepod, other."""
        if self.vendor == "apple":
            return "homepod"
        if self.capture.startswith("echodot"):
            return "echo-dot-pcm"
        if self.vendor == "amazon":
            return "echo-2018"
        return "other"


def _ip_of(buf: bytes, linktype: int) -> object | None:
    import dpkt

    try:
        if linktype == dpkt.pcap.DLT_EN10MB:
            return dpkt.ethernet.Ethernet(buf).data
        if linktype == 113:  # Linux cooked capture
            return dpkt.sll.SLL(buf).data
        return dpkt.ip.IP(buf) if buf[:1] and buf[0] >> 4 == 4 else dpkt.ip6.IP6(buf)
    except (dpkt.UnpackError, IndexError, ValueError):
        return None


def _upstream_by_connection(
    path: Path, device: str, remotes: set[str]
) -> dict[tuple[str, int], list[tuple[float, int]]]:
    """(remote "addr:port", device port) -> upstream TLS records (completion time, bytes) from
    `device` to any of `remotes`: what the speaker wrote, the unit the relay and `analyze` judge
    (guard/core/records.py). Each connection's segments are put back in order (retransmissions
    left out) and framed; handshake records are left out (the simulator does its own
    handshake); where the payload does not parse as TLS, segment sizes stand in."""
    import dpkt

    wanted: dict[str, set[int]] = defaultdict(set)
    for remote in remotes:
        addr, _, port = remote.rpartition(":")
        wanted[addr].add(int(port))
    out: dict[tuple[str, int], list[tuple[float, int]]] = defaultdict(list)
    streams: dict[tuple[str, int], CapturedStream] = {}
    with path.open("rb") as fh:
        reader = _open_reader(fh)
        linktype = reader.datalink()
        for count, (ts, buf) in enumerate(reader):
            if count > MAX_PACKETS:
                break
            ip = _ip_of(buf, linktype)
            if isinstance(ip, dpkt.ip.IP):
                src, dst = socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst)
                l4_len = ip.len - ip.hl * 4
            elif isinstance(ip, dpkt.ip6.IP6):
                src = socket.inet_ntop(socket.AF_INET6, ip.src)
                dst = socket.inet_ntop(socket.AF_INET6, ip.dst)
                l4_len = ip.plen
            else:
                continue
            if src != device or dst not in wanted:
                continue
            l4 = ip.data
            if not isinstance(l4, dpkt.tcp.TCP) or l4.dport not in wanted[dst]:
                continue
            size = l4_len - l4.off * 4
            key = (f"{dst}:{l4.dport}", l4.sport)
            if l4.flags & dpkt.tcp.TH_SYN:
                streams.pop(key, None)
            if size <= 0:
                continue
            stream = streams.setdefault(key, CapturedStream())
            for record in stream.segment(l4.seq, bytes(l4.data), size)[1]:
                if record.content_type not in HANDSHAKE_TYPES:
                    out[key].append((float(ts), record.size))
    for items in out.values():
        items.sort(key=lambda item: item[0])  # stable: records of one segment stay in order
    return out


def split_bursts(
    items: Sequence[tuple[float, int]], labels: Sequence[Label], gap_s: float = BURST_GAP_S
) -> tuple[Burst, ...]:
    """Cut `items` (time order) into bursts at gaps of `gap_s` or more; mark those that overlap
    a label (with a margin of LABEL_MARGIN_S) as audio."""
    bursts: list[Burst] = []
    first = 0
    for k in range(1, len(items) + 1):
        if k < len(items) and items[k][0] - items[k - 1][0] < gap_s:
            continue
        last = k - 1
        start, end = items[first][0], items[last][0]
        hits = [
            lab for lab in labels
            if lab.start - LABEL_MARGIN_S <= end and lab.end + LABEL_MARGIN_S >= start
        ]
        audio_first = None
        if hits:
            t0 = min(lab.start for lab in hits) - LABEL_MARGIN_S
            audio_first = next(i for i in range(first, last + 1) if items[i][0] >= t0)
        bursts.append(Burst(
            index=len(bursts), first=first, last=last, start=start, end=end,
            wire_bytes=sum(size for _, size in items[first:last + 1]),
            labels=tuple(lab.name for lab in hits), audio_first=audio_first,
        ))
        first = k
    return tuple(bursts)


def voice_connections(captures_dir: Path, gap_s: float = BURST_GAP_S) -> list[Connection]:
    """Every voice connection of every capture in `captures_dir`/labels.toml, in file order.
    A label belongs to the connection (device port) that carries most of its bytes."""
    with (captures_dir / "labels.toml").open("rb") as fh:
        raw = tomllib.load(fh)
    out: list[Connection] = []
    for cap in raw.get("capture", []):
        path = captures_dir / cap["file"]
        if not path.is_file():
            continue
        labels = [
            Label(f"capture:{path.stem}#{k}", float(v["start"]), float(v["end"]),
                  str(v["remote"]), int(v.get("bytes", 0)))
            for k, v in enumerate(cap.get("voice", []))
        ]
        conns = _upstream_by_connection(path, cap["device"], {lab.remote for lab in labels})
        owner: dict[tuple[str, int], list[Label]] = defaultdict(list)
        for lab in labels:
            inside = {
                key: sum(s for t, s in items
                         if lab.start - LABEL_MARGIN_S <= t <= lab.end + LABEL_MARGIN_S)
                for key, items in conns.items() if key[0] == lab.remote
            }
            best = max(inside, key=lambda k: inside[k], default=None)
            if best is not None and inside[best] > 0:
                owner[best].append(lab)
        for key in sorted(owner, key=lambda k: conns[k][0][0]):
            items = tuple(conns[key])
            labs = tuple(owner[key])
            out.append(Connection(
                capture=path.stem, path=path, vendor=str(cap.get("vendor", "")),
                device=cap["device"], remote=key[0], device_port=key[1], items=items,
                labels=labs, bursts=split_bursts(items, labs, gap_s),
            ))
    return out


# --- replays ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayBurst:
    """A burst as replayed: items [first, last] of the replay's profile, its offsets there."""

    conn: str  # Connection.name
    burst: Burst
    first: int
    last: int
    offset_s: float  # replay offset of its first / last item
    end_s: float
    audio_first: int | None  # profile index of the upload's first item (audio bursts)

    @property
    def audio(self) -> bool:
        return self.burst.audio

    @property
    def label(self) -> str:
        return ",".join(self.burst.labels) if self.burst.labels else f"#{self.burst.index}"


@dataclass(frozen=True, slots=True)
class Replay:
    """One speaker run: a profile of chosen bursts of one connection, and where each burst is."""

    conn: Connection
    profile: Profile
    bursts: tuple[ReplayBurst, ...]

    @property
    def duration_s(self) -> float:
        return self.profile.duration_s


def build_replay(conn: Connection, indices: Sequence[int], max_gap_s: float = MAX_GAP_S
                 ) -> Replay:
    """A replay of bursts `indices` (of `conn.bursts`, played in time order): each burst's
    items at their capture offsets, the idle time before a burst shortened to `max_gap_s`
    (kept when shorter), the first burst at offset 0."""
    chosen = sorted(set(indices))
    if not chosen:
        raise ValueError(f"{conn.name}: no bursts chosen")
    items: list[tuple[float, int]] = []
    out: list[ReplayBurst] = []
    cursor = 0.0  # replay offset of the chosen burst's first item
    prev_end: float | None = None  # capture time of the previous chosen burst's last item
    prev_offset_end = 0.0
    for idx in chosen:
        b = conn.bursts[idx]
        if prev_end is not None:
            cursor = prev_offset_end + min(max_gap_s, b.start - prev_end)
        base = len(items)
        for t, size in conn.items[b.first:b.last + 1]:
            items.append((round(cursor + (t - b.start), 6), size))
        first, last = base, len(items) - 1
        audio_first = None if b.audio_first is None else base + (b.audio_first - b.first)
        out.append(ReplayBurst(conn.name, b, first, last, items[first][0], items[last][0],
                               audio_first))
        prev_end, prev_offset_end = b.end, items[last][0]
    n_audio = sum(1 for b in out if b.audio)
    profile = Profile(
        name=f"timeline:{conn.name}",
        transport=Transport.TCP,
        items=tuple(items),
        description=(f"{conn.capture} {conn.remote} from port {conn.device_port}: "
                     f"{len(out)} bursts ({n_audio} audio), gaps <= {max_gap_s} s"),
        source=str(conn.path),
        audio=n_audio > 0,
        records=True,
    )
    return Replay(conn, profile, tuple(out))


def plaintext_spans(items: Sequence[tuple[float, int]], overhead: int, mss: int | None
                    ) -> list[tuple[int, int]]:
    """[start, end) of each item's plaintext in the connection's application stream, exactly as
    `TlsSpeaker.upload` writes them (MSS clamp unless `mss` is None (a profile of whole
    records), overhead, the frame header in the first item)."""
    sizes = [min(s, mss) if mss is not None and mss > overhead else s for _, s in items]
    plain = [max(1, s - overhead) for s in sizes]
    total = sum(plain)
    if plain and total < wire.HEADER_BYTES:
        plain[-1] += wire.HEADER_BYTES - total
    spans: list[tuple[int, int]] = []
    off = 0
    for n in plain:
        spans.append((off, off + n))
        off += n
    return spans


@dataclass
class Selection:
    """What one live run replays: replays to play one after another."""

    replays: list[Replay] = field(default_factory=list)

    @property
    def uploads(self) -> int:
        return sum(1 for r in self.replays for b in r.bursts if b.audio)

    @property
    def messages(self) -> int:
        return sum(1 for r in self.replays for b in r.bursts if not b.audio)

    @property
    def duration_s(self) -> float:
        return sum(r.duration_s for r in self.replays)


def everything(conns: Sequence[Connection], max_gap_s: float = MAX_GAP_S) -> Selection:
    """Every burst of every voice connection (the benchmark's replay)."""
    return Selection([build_replay(c, range(len(c.bursts)), max_gap_s) for c in conns])


# A non-audio burst this large is a look-alike worth replaying first (a voice connection's events
# are 4-15 KB; its HTTP/2 pings and acks are 40-130 B).
LOOKALIKE_BYTES = 1000


def around(conn: Connection, label_burst: int, messages: int) -> list[int]:
    """Burst `label_burst` and `messages` non-audio bursts of `conn`: those of LOOKALIKE_BYTES
    or more first, nearest to it first (the later one on a tie), then the small ones, nearest
    first: an upload with the traffic around it, look-alikes before pings."""
    others = [b for b in conn.bursts if not b.audio]
    others.sort(key=lambda b: (b.wire_bytes < LOOKALIKE_BYTES, abs(b.index - label_burst),
                               b.index < label_burst))
    return sorted([label_burst, *(b.index for b in others[:max(0, messages)])])


def rotating_subset(conns: Sequence[Connection], turn: int, messages: int = 8,
                    max_gap_s: float = MAX_GAP_S) -> Selection:
    """The subset replayed in setup number `turn` of a test (about 25 s on the Echo, 13 s on the
    HomePod), three uploads of different families, rotating from turn to turn:
      - a HomePod upload (the two in turn), with the rest of its connection;
      - a 2018 Echo upload from a capture with look-alike bursts (those captures in turn, the
        richest first, each one's uploads in turn), with `messages` non-audio bursts (`around`);
      - on even turns the Echo Dot PCM upload, on odd turns a 2018 Echo upload from a capture
        without look-alikes (in turn), each with up to 2 non-audio bursts."""
    by_family: dict[str, list[tuple[Connection, int]]] = defaultdict(list)
    for c in conns:
        for b in c.bursts:
            if b.audio:
                by_family[c.family].append((c, b.index))
    per_conn: dict[str, list[tuple[Connection, int]]] = defaultdict(list)
    for c, i in by_family.get("echo-2018", []):
        per_conn[c.name].append((c, i))

    def lookalikes(name: str) -> int:
        c = per_conn[name][0][0]
        return sum(1 for b in c.bursts if not b.audio and b.wire_bytes >= LOOKALIKE_BYTES)
    rich = sorted((n for n in per_conn if lookalikes(n)), key=lambda n: (-lookalikes(n), n))
    plain = sorted(n for n in per_conn if not lookalikes(n))

    def nth(names: list[str], k: int) -> tuple[Connection, int] | None:
        if not names:
            return None
        pool = per_conn[names[k % len(names)]]
        return pool[(k // len(names)) % len(pool)]
    picks: list[tuple[tuple[Connection, int] | None, int]] = []
    homepod = by_family.get("homepod", [])
    picks.append((homepod[turn % len(homepod)] if homepod else None, messages))
    picks.append((nth(rich, turn) or nth(plain, turn), messages))
    dot = by_family.get("echo-dot-pcm", [])
    if turn % 2 == 0 and dot:
        picks.append((dot[(turn // 2) % len(dot)], 2))
    else:
        picks.append((nth(plain, turn // 2) or nth(rich, turn + 1), 2))
    replays = [build_replay(p[0], around(p[0], p[1], n), max_gap_s)
               for p, n in picks if p is not None]
    return Selection(replays)
