"""The engine's stream path (design.md 5): a relayed connection's records in, verdicts and
actions out, on a virtual clock. Tokens are StreamBytes: the relay releases or discards kept
bytes up to a stream offset, in order."""

from __future__ import annotations

from dataclasses import replace

from guard.core.config import DeviceConfig, GuardConfig
from guard.core.engine import (
    BurstReleased,
    Discard,
    Engine,
    FlowBlocked,
    MarkFlow,
    Release,
    Reset,
    StreamBytes,
    UploadDecided,
    UploadHeld,
    Verdict,
)
from guard.core.policy import Decision, Mode, Outcome, Scope, Verb
from tests.enginekit import CLOUD, ECHO, RULES

VOICE = "bob-dispatch-prod-na.amazon.com"
T0 = 1_000_000.0


class Stream:
    """One relayed connection: records written at virtual times."""

    def __init__(self, eng: Engine, conn: int = 1, host: str | None = VOICE, port: int = 40000,
                 now: float = T0) -> None:
        self.eng, self.conn, self.end = eng, conn, 0
        self.verdict, self.key = eng.stream_open(conn, ECHO, port, CLOUD, 443, None, host, now)

    def record(self, size: int, now: float, content_type: int = 23) -> Verdict:
        self.end += size
        return self.eng.stream_data(self.conn, self.end, size, content_type, now)


def engine(mode: Mode = Mode.STRICT, **guard: object) -> Engine:
    device = DeviceConfig(name="kitchen-echo", address=ECHO, mode=mode)
    return Engine(replace(GuardConfig(), devices=(device,), **guard), RULES)


def upload(s: Stream, start: float, seconds: float = 1.0) -> float:
    """An Echo upload: HEADERS, metadata and pre-roll at once, then 118-B records at 55/s."""
    for size in (233, 136, 4100, 16406):
        s.record(size, start)
    t = start
    for _ in range(int(seconds * 55)):
        t += 1 / 55
        s.record(118, t)
    return t


def test_categories_decide_at_open() -> None:
    eng = engine()
    assert Stream(eng, 1, "api.amazonalexa.com").verdict is Verdict.ACCEPT  # smart-home
    blocked = Stream(eng, 2, "alexa-comms-mobile-service.amazon.com", port=40001)
    assert blocked.verdict is Verdict.REJECT
    actions = eng.take_actions()
    assert [a for a in actions if isinstance(a, FlowBlocked)]
    assert not [a for a in actions if isinstance(a, MarkFlow)]  # the relay refuses it itself
    assert Stream(eng, 3, VOICE, port=40002).verdict is Verdict.HOLD
    assert Stream(eng, 4, None, port=40003).verdict is Verdict.HOLD  # no name: unknown, inspected


def test_a_connection_from_a_device_we_do_not_guard_is_refused() -> None:
    eng = engine()
    verdict, _ = eng.stream_open(1, "198.18.10.99", 40000, CLOUD, 443, None, VOICE, T0)
    assert verdict is Verdict.REJECT


def test_handshake_and_control_records_pass_when_nothing_is_held() -> None:
    s = Stream(engine())
    assert s.record(517, T0, content_type=22) is Verdict.ACCEPT
    assert s.record(45, T0 + 1) is Verdict.ACCEPT  # a PING ack
    assert s.record(300, T0 + 2) is Verdict.HOLD
    assert s.record(45, T0 + 2.01) is Verdict.HOLD  # behind held bytes: kept in order


def test_a_message_is_released_in_order_after_its_quiet_gap() -> None:
    eng = engine()
    s = Stream(eng)
    for size in (233, 136, 4040):
        assert s.record(size, T0) is Verdict.HOLD
    eng.handle_timer(T0 + 0.19)
    assert not eng.take_actions()
    eng.handle_timer(T0 + 0.2)
    actions = eng.take_actions()
    released = [a for a in actions if isinstance(a, Release)]
    assert [t.end for t in released[0].tokens] == [233, 369, 4409]
    [burst] = [a for a in actions if isinstance(a, BurstReleased)]
    assert abs(burst.delay_s - 0.2) < 1e-6 and burst.bytes == 4409


def test_an_upload_is_pending_from_its_first_byte_and_allow_releases_it_whole() -> None:
    eng = engine()
    s = Stream(eng)
    upload(s, T0, 0.6)
    actions = eng.take_actions()
    [held] = [a for a in actions if isinstance(a, UploadHeld)]
    assert held.upload["decided"] - T0 <= 0.5
    assert not [a for a in actions if isinstance(a, Release)]  # nothing of it left
    [pending] = eng.pending()
    assert pending.leaked_bytes == 0 and pending.stream
    eng.decide(pending.id, Decision(Verb.ALLOW, Scope.ONCE, by="test"), T0 + 2)
    actions = eng.take_actions()
    [release] = [a for a in actions if isinstance(a, Release)]
    assert release.tokens[0] == StreamBytes(1, 233) and release.tokens[-1].end == s.end
    assert s.record(118, T0 + 2.01) is Verdict.ACCEPT  # the rest of the upload goes on


def test_deny_discards_and_resets_the_connection() -> None:
    eng = engine()
    s = Stream(eng)
    upload(s, T0, 0.6)
    [pending] = eng.pending()
    eng.take_actions()
    eng.decide(pending.id, Decision(Verb.DENY, Scope.ONCE, by="test"), T0 + 1)
    actions = eng.take_actions()
    [discard] = [a for a in actions if isinstance(a, Discard)]
    assert discard.tokens[-1].end == s.end
    assert [a for a in actions if isinstance(a, Reset)]
    assert not [a for a in actions if isinstance(a, MarkFlow)]  # the relay aborts both legs


def test_a_reset_connection_loses_its_pending_upload() -> None:
    eng = engine()
    s = Stream(eng)
    upload(s, T0, 0.6)
    eng.take_actions()
    eng.stream_closed(1, T0 + 1, reset=True)
    [decided] = [a for a in eng.take_actions() if isinstance(a, UploadDecided)]
    assert decided.outcome is Outcome.LOST and eng.pending() == []


def test_a_sender_that_closes_ends_its_burst_as_a_message_at_once() -> None:
    eng = engine()
    s = Stream(eng)
    s.record(2000, T0)
    eng.stream_closed(1, T0 + 0.05)
    assert [a for a in eng.take_actions() if isinstance(a, Release)]


def test_stream_holds_are_bounded_in_bytes_not_records() -> None:
    eng = engine(max_held_packets_per_upload=16, max_held_bytes_per_upload=64_000)
    s = Stream(eng)
    end = upload(s, T0, 3.0)  # 165 records: far more than 16, far fewer bytes than 64 KB
    assert eng.pending() and eng.held()[0] == 0
    for k in range(400):
        s.record(118, end + (k + 1) / 55)
    assert not eng.pending()  # 64 KB passed: denied at its cap
    assert [a for a in eng.take_actions()
            if isinstance(a, UploadDecided) and a.outcome is Outcome.CAPPED]


def test_monitor_mode_holds_nothing_and_logs_the_upload() -> None:
    eng = engine(Mode.MONITOR)
    s = Stream(eng)
    verdicts = {s.record(size, T0) for size in (233, 136, 4100, 16406)}
    assert verdicts == {Verdict.ACCEPT}


def test_the_daemon_forgets_a_closed_connection_with_nothing_pending() -> None:
    eng = Engine(replace(GuardConfig(), devices=(DeviceConfig("kitchen-echo", address=ECHO),)),
                 RULES, forget_closed=True)
    s = Stream(eng, 1, "api.amazonalexa.com")
    eng.stream_closed(1, T0 + 1)
    assert s.key not in eng.flows and not eng.streams
    kept = Engine(eng.config, RULES)  # analyze keeps every flow for its report
    s = Stream(kept, 1, "api.amazonalexa.com")
    kept.stream_closed(1, T0 + 1)
    assert s.key in kept.flows
