"""The stream judge as a table: bursts of records in, judgements out (guard/core/detector.py)."""

from __future__ import annotations

import pytest

from guard.core.detector import Judgement, StreamConfig, judge_stream, stream_deadline

CFG = StreamConfig()


def opus(start: float, count: int, every_s: float = 0.018, size: int = 118
         ) -> list[tuple[float, int]]:
    return [(start + k * every_s, size) for k in range(1, count + 1)]


HEAD = [(0.0, 233), (0.0, 136), (0.001, 4100), (0.002, 16406)]  # metadata + pre-roll, at once
EVENT = [(0.0, 233), (0.0, 136), (0.001, 4040), (0.001, 82), (0.001, 38)]  # ends with END_STREAM


@pytest.mark.parametrize("name,run,now,expected", [
    ("an upload: head at once, then Opus records at 55/s", HEAD + opus(0.002, 24), 0.434,
     Judgement.AUDIO),
    ("still undecided before sustain_s", HEAD + opus(0.002, 10), 0.182, Judgement.UNDECIDED),
    ("HomePod-like: 21 records/s of ~375 B", opus(0.0, 10, 0.048, 375), 0.48, Judgement.AUDIO),
    ("PCM: 1,062-B records at 33/s", opus(0.0, 15, 0.030, 1062), 0.45, Judgement.AUDIO),
    ("an event, quiet for quiet_s", EVENT, 0.201 + 0.001, Judgement.MESSAGE),
    ("an event, still within quiet_s", EVENT, 0.15, Judgement.UNDECIDED),
    ("three events in 0.5 s: one moment each", EVENT + [(t + 0.09, s) for t, s in EVENT]
     + [(t + 0.5, s) for t, s in EVENT], 0.501 + 0.2, Judgement.MESSAGE),
    ("a slider's events every 100 ms (3 moments per 250 ms)",
     [(k * 0.1, 1500) for k in range(9)], 0.8 + CFG.start_quiet_s, Judgement.MESSAGE),
    ("a big head without END_STREAM waits start_quiet_s", HEAD, 0.002 + 0.3,
     Judgement.UNDECIDED),
    ("... and is a message after it", HEAD, 0.002 + CFG.start_quiet_s, Judgement.MESSAGE),
    ("a big head that closed its stream: quiet_s", HEAD + [(0.002, 38)], 0.002 + 0.2,
     Judgement.MESSAGE),
    ("control records alone are never audio", [(k * 0.02, 45) for k in range(40)], 0.8,
     Judgement.MESSAGE),
    ("a trickle with no quiet gap for decide_within_s", [(k * 0.15, 300) for k in range(8)],
     1.05, Judgement.AUDIO),
    ("a closed sender: what it sent was a message", HEAD + opus(0.002, 5), 0.1,
     Judgement.MESSAGE),
])
def test_judge_stream_table(name: str, run: list, now: float, expected: Judgement) -> None:
    ended = name.startswith("a closed sender")
    assert judge_stream(run, now, CFG, ended).judgement is expected, name


def test_a_400_ms_stall_after_the_head_does_not_release_it() -> None:
    """design.md 5a.4: Wi-Fi stalls of 150-400 ms before the stream phase: the head waits."""
    run = HEAD + [(0.402 + t, s) for t, s in opus(0.0, 24)]
    for now in (0.152, 0.252, 0.40):
        assert judge_stream(HEAD, now, CFG).judgement is Judgement.UNDECIDED
    assert judge_stream(run, run[-1][0], CFG).judgement is Judgement.AUDIO


def test_deadline_is_the_quiet_gap_or_the_decision_window() -> None:
    assert stream_deadline([], CFG) is None
    assert stream_deadline(EVENT, CFG) == pytest.approx(0.001 + CFG.quiet_s)
    assert stream_deadline(HEAD, CFG) == pytest.approx(0.002 + CFG.start_quiet_s)
    trickle = [(k * 0.15, 300) for k in range(8)]
    assert stream_deadline(trickle, CFG) == pytest.approx(CFG.decide_within_s)
