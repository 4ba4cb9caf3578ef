"""Is this burst the start of an audio upload? Two judges: whole bursts of a relayed TCP stream
(`judge_stream`), and what a held sender can emit for the packet hold (`judge`, QUIC/UDP and the
legacy `tcp_hold = "packet"` mode). The engine keeps one `Burst` per held burst: it takes in what
was seen (records with sizes and arrival times, retransmissions, the sender's end, a nudge) and
answers `judge(now)` and `deadline(now)`, so the engine computes no evidence itself.

The stream judge (design.md 5, "hold the stream"): the router's kernel terminates the speaker's
TCP and ACKs it, so a held speaker never stalls and the judge sees every record of a burst while
nothing of it leaves. It uses only what survives both a live relay (records arrive at LAN speed,
reads coalesce) and a capture (records paced by the real cloud's ACK clock): whether records keep
coming at a codec's cadence, and a quiet gap. Its physics:
- Audio is produced in real time. Whatever the speaker buffered before the upload (pre-roll, wake
  word, the request's metadata) may arrive at once, but after that a microphone stream can only
  send what it records: one record per codec frame or packet of frames, 20-60 per second (Opus
  20 ms frames, PCM chunks), without a pause, for as long as the person (or the TV) speaks. So a
  burst whose records are still arriving at a stream's cadence `sustain_s` after its first one
  is audio.
- Anything else is a message: an event, a state report, a log: a write of a few records that
  arrives whole (live, within milliseconds; in a capture, within a few round trips) and then
  stops. A burst that has been quiet for `quiet_s` ended as a message and is released in order.
- A record that can carry nothing but an HTTP/2 control frame (PING, SETTINGS ack,
  WINDOW_UPDATE, RST_STREAM, an empty END_STREAM DATA frame: TLS overhead 22-29 B + 9-17 B) holds
  no audio: it never starts, extends or ends a burst by itself (a download's WINDOW_UPDATEs come
  at a stream's cadence too).
- A quiet gap is not always the end (Wi-Fi uplink stalls of 100-300 ms, a pause after the head of
  an upload): a burst whose head is as large as an upload's start (request metadata plus the
  buffered pre-roll) waits `start_quiet_s` before it is released.

Rules of this module: the judge sees only the current run of a flow's upstream payload packets
(sizes and times), never payload bytes, so it works on TLS, QUIC and shape-only traces alike. It
never looks past `window_segments` packets: a held TCP or QUIC sender stops after its congestion
window (about 10 segments after an idle period, RFC 6928 IW10), so the live guard never sees more
before it must decide, and `analyze` is held to the same limit. Pure: callers pass `now`.

The physics it rests on (design.md section 7):
- Audio is a stream. A speaker starts an upload by dumping its pre-roll (the buffered audio since
  the wake word, 8-28 KB of MSS-sized segments within 0.3 s) and then sends a record per codec
  frame at a constant rate (20-60 records/s). Either way the first window fills fast: ten packets
  arrive within about half a second even for the slowest speaker seen (HomePod, ~21 pkt/s).
- Everything else on a voice connection is a message (an event, a state report, a keep-alive):
  a few records, the last of which often is a bare end-of-stream or control frame, then silence.
  A record that can carry nothing but a frame header (TLS overhead 22-29 B + a 9-17 B HTTP/2
  frame: END_STREAM, PING, WINDOW_UPDATE, SETTINGS ack) closes a message: no audio codec emits
  frames that small while speech is streaming.
- A held TCP sender's retransmission timer (~200 ms + RTT) may fire before ten segments are out
  when it streams slowly (HomePod, ~21 records/s); from then on it only retransmits. The quiet
  that follows is the hold's, so a run that was a paced stream until the sender retransmitted
  is judged a stream.
- A held sender that has more to send than its congestion window lets out stops mid-burst: a
  real 2018 Echo's first flight after idle is 5-8 segments, then it waits for ACKs that the hold
  keeps from it. The quiet that follows is the hold's, not the end of a message. A sender that
  did finish says so: Linux (RFC 8985 TLP, on by default with SACK) probes ~2 SRTT after its
  last segment by retransmitting that last segment when it has nothing new (a sender with more
  data sends a new segment instead); in a capture, where nothing was held, the remote's ACK of
  the run's last byte arriving with nothing new after it says the same; so does a FIN. So a
  multi-segment TCP run that goes quiet is a message only when its sender finished.
- But the probe comes ~2 SRTT after the flight, and every hold inflates the sender's SRTT (the
  ACKs of what a hold releases come late): on a connection with many held bursts the probe
  comes after the quiet period, and waiting for it would make the holds, and so the next probe,
  longer still. So when the quiet period ends with no word from the sender, the engine nudges
  it, on the ACK clock instead of the sender's timers: it releases the run's first segment only
  (on an Echo, the HTTP/2 HEADERS record of the new stream) and watches. The cloud's ACK makes
  room in the sender's window: a sender that has more sends new data within a round trip (the
  run was cut off: an upload), one that finished sends nothing (a message: the rest is
  released `nudge_wait_s` later).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class Judgement(str, Enum):
    UNDECIDED = "undecided"  # keep holding, keep watching
    MESSAGE = "message"  # not audio: release in order
    AUDIO = "audio"  # an upload: the policy decides what happens to it
    NUDGE = "nudge"  # release the run's first segment only, and watch the sender's answer


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    window_segments: int = 10
    # A gap this long ends a message. Audio frames are 20-60 ms apart; the longest gap inside the
    # first window of any real upload seen was 105 ms (HomePod, Echo's first HEADERS record).
    quiet_s: float = 0.2
    # Decide within this long whatever happens (design.md section 5 target: under 1 s). A run
    # that is still going after this long without a quiet gap is a stream.
    decide_within_s: float = 0.8
    # The largest record that can only be a control or end-of-stream frame: TLS 1.2 GCM overhead
    # (29 B) + an HTTP/2 frame header (9 B) + at most 8 B of PING data.
    tiny_record_bytes: int = 46
    # QUIC carries ACK-only and control packets of 30-80 B while it downloads: a window made of
    # those is not an upload. Audio datagrams carry at least one codec frame (>= 100 B).
    min_mean_datagram_bytes: int = 100
    # A segment this large is a full one: Ethernet MSS is 1460 (IPv4) or 1440 (IPv6) bytes,
    # QUIC datagrams are 1200-1350 bytes; PPPoE and VPN links shave off up to ~100 more.
    full_segment_bytes: int = 1200
    # Treat a run that stops on a full segment as a sender stalled by our hold (cwnd < window).
    # Off by default: with IW10 senders (Linux, the default since 3.0) a stall happens at the
    # window, and in real captures this rule turns ACK-clocked event bursts into prompts.
    stall_is_audio: bool = False
    # QUIC counts its handshake datagrams against the same window (RFC 9002 7.2: 14,720 B), so a
    # held QUIC sender can stop a datagram or two short of the window, on a full datagram. A
    # QUIC request ends on a partial one; a run of full datagrams that stops was cut off.
    stall_is_audio_udp: bool = True
    # A held TCP sender that retransmits (its RTO, ~200 ms + RTT on Linux, fired before the
    # window filled: HomePod streams ~21 records/s) cannot send anything new: the quiet that
    # follows is the hold's doing. A run that was a paced stream until then (records spread
    # over this long, not one flight written at once) is judged a stream, not a message.
    stalled_stream_s: float = 0.15
    stalled_stream_packets: int = 4
    # A TCP run of at least this many segments that goes quiet without its sender finishing
    # (a tail-loss probe of its last segment, the remote's ACK of its last byte, a FIN) was cut
    # off by the hold: an upload. A single segment cannot be a held sender's whole window.
    unfinished_is_audio: bool = True
    unfinished_packets: int = 2
    # After a nudge, a sender with more to send answers within one round trip of the cloud's
    # ACK (WAN RTT to the voice clouds 10-60 ms, plus up to 40 ms of delayed ACK at a Linux
    # receiver); nothing new in this long: it had finished.
    nudge_wait_s: float = 0.15


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Thresholds of the stream judge; each cites the physics it rests on."""

    # A gap this long with no record ends a message. Codec frames are 20-60 ms apart (Opus 20 ms,
    # 118-B records at 52-59/s; HomePod ~21 records/s: 48 ms); five frame times of silence in
    # the middle of speech are a stall of the link, not the end of the audio.
    quiet_s: float = 0.2
    # The wait for a burst whose head is as large as an upload's start: long enough to ride out
    # a 400 ms Wi-Fi uplink stall before the stream phase (design.md 5a.4).
    start_quiet_s: float = 0.45
    # An upload starts with its request metadata (an HTTP/2 HEADERS record and a JSON event,
    # ~4 KB on Echos) and the pre-roll buffered since before the wake word (500 ms at 32 kbit/s
    # Opus is 2 KB; the wake word itself another 0.5-1 s): 8 KB or more. A smaller head cannot
    # carry a pre-roll, and is released after `quiet_s`.
    start_head_bytes: int = 8000
    # The largest record that carries only a control frame: TLS 1.2 GCM overhead (29 B) + the
    # HTTP/2 frame header (9 B) + at most 17 B of frame (a PING's 8, a WINDOW_UPDATE's 4, a
    # PRIORITY's 5; a GOAWAY with a short reason) rounded up. The smallest codec record is a
    # 20-ms Opus frame at 24 kbit/s: 60 B of audio + 38 B of framing = 98 B.
    control_record_bytes: int = 80
    # Records still arriving this long after the burst's first one, at a stream's cadence: audio.
    # A message arrives whole: live within milliseconds, in a capture paced by the cloud's ACK
    # clock within a few round trips (a 14-16 KB event over 0.05-0.33 s in the 2018 Echo
    # captures); a real-time source is still sending. Leaves room for pending <= 0.5 s.
    sustain_s: float = 0.4
    # The cadence: records that carry data arriving at this many distinct moments (arrivals
    # less than `cluster_s` apart are one moment: one write, one flight, one coalesced read) in
    # the last `cadence_window_s`. A microphone stream spreads its records evenly: the slowest
    # seen is ~20 records/s (5 moments per 250 ms, so 4 leaves one to jitter or a coalesced
    # read); a message is written at once, and a few messages one after another (an Echo sends
    # three 4.5-KB events within 0.5 s after some answers) arrive as one moment each; events
    # paced by a person (a volume slider dragged in the app: one every ~100 ms) make 3 at most.
    cadence_window_s: float = 0.25
    cadence_moments: int = 4
    cluster_s: float = 0.008
    # Decide within this long whatever the cadence: a burst still arriving after this long,
    # with no gap of `quiet_s` at its end, is a stream (a slow trickle of records).
    decide_within_s: float = 1.0


@dataclass(frozen=True, slots=True)
class Verdict:
    judgement: Judgement
    reason: str


# Deadlines are sums of floats: compare with a little slack so a timer set for `last + quiet_s`
# always finds the run quiet when it fires.
_EPSILON_S = 1e-6

UNDECIDED = Verdict(Judgement.UNDECIDED, "watching")
CONTROL_DATAGRAMS = "control datagrams"  # the reason the engine continues a run on


def judge(
    run: Sequence[tuple[float, int]],
    tcp: bool,
    now: float,
    config: DetectorConfig,
    stalled: bool = False,
    finished: bool = False,
    nudged_at: float | None = None,
) -> Verdict:
    """Judge the current run: (time, payload bytes) of its packets, oldest first; `stalled`
    when the sender retransmitted held data (TCP); `finished` when, since the run's last new
    segment, its sender showed it had nothing more to send (TCP: a tail-loss probe of the last
    segment, the remote's ACK of the run's last byte, a FIN); `nudged_at` when the run's first
    segment was released to see whether the sender has more (TCP).

    Called after each new packet of the run (`now` = that packet's time) and from timers.
    """
    if not run:
        return UNDECIDED
    last_time, last_size = run[-1]
    if nudged_at is not None and last_time > nudged_at:
        return Verdict(Judgement.AUDIO, "more after a nudge")
    if tcp and last_size <= config.tiny_record_bytes:
        return Verdict(Judgement.MESSAGE, "end-of-message record")
    count = len(run)
    if count >= config.window_segments:
        if not tcp:
            mean = sum(size for _, size in run[: config.window_segments]) / config.window_segments
            if mean < config.min_mean_datagram_bytes:
                return Verdict(Judgement.MESSAGE, CONTROL_DATAGRAMS)
        return Verdict(Judgement.AUDIO, "window filled")
    if now - last_time >= config.quiet_s - _EPSILON_S:
        stall_rule = config.stall_is_audio if tcp else config.stall_is_audio_udp
        if stall_rule and last_size >= config.full_segment_bytes:
            # A run that stops on a full-sized segment was cut off, not finished: its sender
            # has more to send and is blocked by its congestion window (our hold). A message
            # ends on a partial segment or an end-of-stream record.
            return Verdict(Judgement.AUDIO, "stalled on a full segment")
        if tcp and not finished:
            if (stalled and count >= config.stalled_stream_packets
                    and last_time - run[0][0] >= config.stalled_stream_s - _EPSILON_S):
                return Verdict(Judgement.AUDIO, "stalled stream")
            if config.unfinished_is_audio and count >= config.unfinished_packets:
                # Nudged: only new data counts now (a retransmission may cross the ACK).
                if nudged_at is not None:
                    if now - nudged_at >= config.nudge_wait_s - _EPSILON_S:
                        return Verdict(Judgement.MESSAGE, "nothing more after a nudge")
                    return UNDECIDED
                # No word that it finished: nudge it, then wait for its answer. Also after its
                # RTO: the nudge's ACK is of the original segment, so Linux undoes the spurious
                # timeout (or, by F-RTO, RFC 5682, sends new data first) and a sender that has
                # more sends it.
                return Verdict(Judgement.NUDGE, "quiet, sender silent")
        return Verdict(Judgement.MESSAGE, "quiet")
    if now - run[0][0] >= config.decide_within_s - _EPSILON_S:
        return Verdict(Judgement.AUDIO, "sustained stream")
    return UNDECIDED


def next_deadline(run: Sequence[tuple[float, int]], config: DetectorConfig,
                  now: float | None = None, nudged_at: float | None = None) -> float | None:
    """When `judge` may change its mind without a new packet (a quiet period that has already
    passed at `now` leaves the decision window's end; a nudge, the end of its wait)."""
    if not run:
        return None
    if nudged_at is not None:
        return nudged_at + config.nudge_wait_s
    quiet = run[-1][0] + config.quiet_s
    decide = run[0][0] + config.decide_within_s
    if now is not None and quiet <= now + _EPSILON_S:
        return decide
    return min(quiet, decide)


# ---------------------------------------------------------------------------------------------
# One burst's evidence, and the judge's answers about it


class Burst:
    """What was seen of one held burst, and the judge's answers about it: the engine keeps one
    per burst and tells it what it saw (`record`, `retransmitted`, `tail_probe`, `ended`,
    `nudged`); `judge(now)` and `deadline(now)` answer from that alone.

    `stream` bursts are whole TLS records of a relayed TCP connection (`judge_stream`); the
    others are the packets a held sender could emit (`judge`: TCP when `tcp`, else QUIC/UDP).
    Only sizes and arrival times are kept, never payload bytes."""

    __slots__ = ("config", "stream_config", "tcp", "records", "stalled", "finished",
                 "nudged_at")

    def __init__(self, *, tcp: bool = True, config: DetectorConfig | None = None,
                 stream_config: StreamConfig | None = None) -> None:
        # one per burst, on the packet path: kept cheap
        if stream_config is None:
            if config is None:
                raise ValueError("a burst is judged as packets (config) or as a stream "
                                 "(stream_config)")
            self.tcp = tcp
        elif config is not None:
            raise ValueError("a burst is judged as packets (config) or as a stream "
                             "(stream_config), not both")
        else:
            self.tcp = True
        self.config = config
        self.stream_config = stream_config
        self.records: list[tuple[float, int]] = []  # (arrival time, bytes), oldest first
        # the sender retransmitted held data (TCP): our hold, not its end, stops it
        self.stalled = False
        # since the last new record, the sender showed it sent everything: a tail-loss probe,
        # the remote's ACK of the last byte, a FIN, the relayed stream's end
        self.finished = False
        # when the burst's first segment was released to see whether the sender has more
        self.nudged_at: float | None = None

    @property
    def stream(self) -> bool:
        return self.stream_config is not None

    def record(self, time: float, size: int) -> None:
        """A new record (stream) or payload packet (packet hold) of the burst."""
        self.records.append((time, size))
        self.finished = False

    def retransmitted(self) -> None:
        """The sender sent held bytes again: it is stalled by the hold."""
        self.stalled = True

    def tail_probe(self) -> None:
        """The sender retransmitted the burst's last segment alone: it had nothing new."""
        self.stalled = True
        self.finished = True

    def ended(self) -> None:
        """Nothing more comes after what was seen: a FIN, the stream's end, the remote's ACK of
        the last byte with nothing new after it (a capture)."""
        self.finished = True

    def nudged(self, now: float) -> None:
        """The burst's first segment was released at `now` to see whether the sender has more."""
        self.nudged_at = now

    def judge(self, now: float) -> Verdict:
        if self.stream_config is not None:
            return judge_stream(self.records, now, self.stream_config, self.finished)
        assert self.config is not None
        return judge(self.records, self.tcp, now, self.config, self.stalled, self.finished,
                     self.nudged_at)

    def deadline(self, now: float | None = None) -> float | None:
        """When `judge` may change its mind with nothing new seen."""
        if self.stream_config is not None:
            return stream_deadline(self.records, self.stream_config)
        assert self.config is not None
        return next_deadline(self.records, self.config, now, self.nudged_at)

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def start(self) -> float | None:
        return self.records[0][0] if self.records else None

    @property
    def last(self) -> float | None:
        return self.records[-1][0] if self.records else None

    @property
    def size(self) -> int:
        return sum(size for _, size in self.records)


# ---------------------------------------------------------------------------------------------
# The stream judge: whole bursts of a relayed TCP stream (records, in order, with arrival times)


def _data_records(run: Sequence[tuple[float, int]], config: StreamConfig
                  ) -> list[tuple[float, int]]:
    limit = config.control_record_bytes
    return [(t, size) for t, size in run if size > limit]


def judge_stream(run: Sequence[tuple[float, int]], now: float, config: StreamConfig,
                 ended: bool = False) -> Verdict:
    """Judge a burst of a relayed stream: (arrival time, record bytes) of its records, oldest
    first, control records included; `ended` when the sender closed its side (nothing more can
    come). Called after each record of the burst (`now` = its arrival) and from timers."""
    data = _data_records(run, config)
    if not data:
        # control records alone: nothing that could be audio (the engine passes them when
        # nothing else is held; behind a held burst they wait in order)
        return Verdict(Judgement.MESSAGE, "control records")
    first, last = data[0][0], data[-1][0]
    if ended:
        return Verdict(Judgement.MESSAGE, "sender closed")
    if now - last >= _quiet(run, data, config) - _EPSILON_S:
        return Verdict(Judgement.MESSAGE, "quiet")
    if last - first >= config.sustain_s - _EPSILON_S:
        if _moments(data, last - config.cadence_window_s, config) >= config.cadence_moments:
            return Verdict(Judgement.AUDIO, "sustained stream")
    if (now - first >= config.decide_within_s - _EPSILON_S
            and now - last < config.quiet_s - _EPSILON_S):
        return Verdict(Judgement.AUDIO, "no quiet gap")
    return UNDECIDED


def stream_deadline(run: Sequence[tuple[float, int]], config: StreamConfig) -> float | None:
    """When `judge_stream` may change its mind without a new record: the quiet gap's end, or
    the decision window's."""
    data = _data_records(run, config)
    if not data:
        return None
    first, last = data[0][0], data[-1][0]
    quiet = last + _quiet(run, data, config)
    decide = first + config.decide_within_s
    # the decision window ends a burst that is still arriving (no gap of quiet_s yet)
    return min(quiet, decide) if decide < last + config.quiet_s else quiet


def _moments(data: Sequence[tuple[float, int]], since: float, config: StreamConfig) -> int:
    """Distinct arrival moments of the data records after `since`."""
    count, previous = 0, None
    for t, _ in data:
        if t < since - _EPSILON_S:
            continue
        if previous is None or t - previous >= config.cluster_s:
            count += 1
        previous = t
    return count


def _quiet(run: Sequence[tuple[float, int]], data: Sequence[tuple[float, int]],
           config: StreamConfig) -> float:
    """How long the burst must be quiet to have ended: longer when its head is as large as an
    upload's start, unless its last record closed it. HTTP/2 ends a request with END_STREAM,
    on a last DATA frame or, when the body was written before it ended, an empty DATA frame: a
    record of frame header and TLS overhead alone (38 B on Echos), written right behind the
    body. A stall of the link cuts a stream at an arbitrary record, rarely right after one of
    those; audio keeps its stream open."""
    if (sum(size for _, size in data) >= config.start_head_bytes
            and run[-1][1] > config.control_record_bytes):
        return config.start_quiet_s
    return config.quiet_s
