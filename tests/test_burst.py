"""One burst's evidence as a table (guard/core/detector.py `Burst`): what was seen in, `judge(now)`
and `deadline(now)` out. The engine keeps one per held burst and computes no evidence itself."""

from __future__ import annotations

from typing import Any

import pytest

from guard.core.detector import Burst, DetectorConfig, Judgement, StreamConfig

PKT = DetectorConfig()
STREAM = StreamConfig()

# What was seen, in order: ("record", time, bytes) | ("retransmitted",) | ("tail_probe",)
# | ("ended",) | ("nudged", time)
Seen = list[tuple[Any, ...]]


def seen(burst: Burst, events: Seen) -> Burst:
    for name, *args in events:
        getattr(burst, name)(*args)
    return burst


def packets(tcp: bool = True) -> Burst:
    return Burst(tcp=tcp, config=PKT)


def records() -> Burst:
    return Burst(stream_config=STREAM)


def paced(count: int, every_s: float, size: int, start: float = 0.0) -> Seen:
    return [("record", start + k * every_s, size) for k in range(count)]


FLIGHT = [("record", 0.0, 1448), ("record", 0.001, 1448), ("record", 0.002, 600)]
HEAD = [("record", 0.0, 233), ("record", 0.0, 136), ("record", 0.001, 4100),
        ("record", 0.002, 16406)]


@pytest.mark.parametrize("name,make,events,now,judgement,reason", [
    # the packet hold (TCP)
    ("nothing seen", packets, [], 0.0, Judgement.UNDECIDED, "watching"),
    ("a flight, still within quiet_s", packets, FLIGHT, 0.1, Judgement.UNDECIDED, "watching"),
    ("a flight gone quiet, sender silent: nudge", packets, FLIGHT, 0.21, Judgement.NUDGE,
     "quiet, sender silent"),
    ("... that finished (a FIN): a message", packets, [*FLIGHT, ("ended",)], 0.21,
     Judgement.MESSAGE, "quiet"),
    ("... that sent a tail-loss probe: a message", packets, [*FLIGHT, ("tail_probe",)], 0.21,
     Judgement.MESSAGE, "quiet"),
    ("a new record after the end clears it", packets,
     [*FLIGHT, ("ended",), ("record", 0.05, 900)], 0.26, Judgement.NUDGE,
     "quiet, sender silent"),
    ("nudged, nothing new within nudge_wait_s", packets, [*FLIGHT, ("nudged", 0.21)],
     0.21 + PKT.nudge_wait_s, Judgement.MESSAGE, "nothing more after a nudge"),
    ("nudged, still waiting", packets, [*FLIGHT, ("nudged", 0.21)], 0.3, Judgement.UNDECIDED,
     "watching"),
    ("nudged, then more came", packets, [*FLIGHT, ("nudged", 0.21), ("record", 0.25, 1448)],
     0.25, Judgement.AUDIO, "more after a nudge"),
    ("a paced stream stalled by the hold", packets,
     [*paced(5, 0.048, 375), ("retransmitted",)], 0.192 + 0.2, Judgement.AUDIO,
     "stalled stream"),
    ("the window filled", packets, paced(10, 0.01, 1448), 0.09, Judgement.AUDIO,
     "window filled"),
    ("an end-of-message record", packets, [*FLIGHT, ("record", 0.003, 38)], 0.003,
     Judgement.MESSAGE, "end-of-message record"),
    ("a trickle past decide_within_s", packets, paced(6, 0.15, 300), 0.8, Judgement.AUDIO,
     "sustained stream"),
    # the packet hold (QUIC)
    ("QUIC: a window of control datagrams", lambda: packets(tcp=False), paced(10, 0.01, 60),
     0.09, Judgement.MESSAGE, "control datagrams"),
    ("QUIC: a run cut off on a full datagram", lambda: packets(tcp=False),
     paced(4, 0.01, 1350), 0.03 + 0.2, Judgement.AUDIO, "stalled on a full segment"),
    # the stream hold (whole records of a relayed connection)
    ("stream: a head at once, then Opus at 55/s", records,
     [*HEAD, *paced(24, 0.018, 118, 0.02)], 0.434, Judgement.AUDIO, "sustained stream"),
    ("stream: a big head waits start_quiet_s", records, HEAD, 0.302, Judgement.UNDECIDED,
     "watching"),
    ("stream: ... and is a message after it", records, HEAD, 0.002 + STREAM.start_quiet_s,
     Judgement.MESSAGE, "quiet"),
    ("stream: the sender closed", records, [*HEAD, ("ended",)], 0.01, Judgement.MESSAGE,
     "sender closed"),
    ("stream: control records alone", records, paced(5, 0.02, 45), 0.1, Judgement.MESSAGE,
     "control records"),
    ("stream: retransmissions mean nothing to a relayed stream", records,
     [*HEAD, ("retransmitted",)], 0.302, Judgement.UNDECIDED, "watching"),
])
def test_burst_table(name: str, make: Any, events: Seen, now: float, judgement: Judgement,
                     reason: str) -> None:
    verdict = seen(make(), events).judge(now)
    assert (verdict.judgement, verdict.reason) == (judgement, reason), name


@pytest.mark.parametrize("name,make,events,now,deadline", [
    ("nothing seen", packets, [], 0.0, None),
    ("a flight: its quiet gap", packets, FLIGHT, 0.002, 0.002 + PKT.quiet_s),
    ("a flight whose quiet passed: the decision window", packets, FLIGHT, 0.3,
     PKT.decide_within_s),
    ("nudged: the end of the nudge's wait", packets, [*FLIGHT, ("nudged", 0.21)], 0.21,
     0.21 + PKT.nudge_wait_s),
    ("stream: nothing that can carry audio", records, paced(3, 0.01, 40), 0.05, None),
    ("stream: a big head: start_quiet_s", records, HEAD, 0.002, 0.002 + STREAM.start_quiet_s),
    ("stream: a trickle: the decision window", records, paced(8, 0.15, 300), 1.05,
     STREAM.decide_within_s),
])
def test_burst_deadline_table(name: str, make: Any, events: Seen, now: float,
                              deadline: float | None) -> None:
    got = seen(make(), events).deadline(now)
    if deadline is None:
        assert got is None, name
    else:
        assert got == pytest.approx(deadline), name


def test_a_deadline_is_when_the_judgement_changes_with_nothing_new_seen() -> None:
    burst = seen(packets(), FLIGHT)
    deadline = burst.deadline(0.002)
    assert deadline is not None
    assert burst.judge(deadline - 0.01).judgement is Judgement.UNDECIDED
    assert burst.judge(deadline).judgement is Judgement.NUDGE


def test_what_it_keeps() -> None:
    burst = seen(records(), HEAD)
    assert (burst.count, burst.start, burst.last, burst.size) == (4, 0.0, 0.002, 20875)
    assert burst.stream and burst.tcp
    empty = packets(tcp=False)
    assert (empty.count, empty.start, empty.last, empty.size) == (0, None, None, 0)


def test_a_burst_is_judged_one_way() -> None:
    with pytest.raises(ValueError):
        Burst()
    with pytest.raises(ValueError):
        Burst(config=PKT, stream_config=STREAM)
