"""The engine scripted with a virtual clock: packets in, verdicts and actions out."""

from __future__ import annotations

import pytest

from guard.core.engine import (
    BurstReleased,
    Discard,
    Engine,
    FlowBlocked,
    FlowEvent,
    FlowState,
    IllegalTransition,
    MarkFlow,
    Release,
    ReserveUploadIds,
    Reset,
    UnknownUpload,
    Unreachable,
    UploadDecided,
    UploadHeld,
    UploadIds,
    UploadSeen,
    Verdict,
)
from guard.core.packet import ACK, FIN, TCP, Hint, Malformed, Packet
from guard.core.policy import Decision, Mode, Outcome, Scope, StandingRule, Verb, Window, WindowKind
from tests.enginekit import CLOUD, ECHO, ECHO_MAC, Conn, engine, of, udp

T0 = 1_000_000.0


def start_burst(conn: Conn, now: float, count: int = 10) -> list[tuple[Verdict, object]]:
    """An Echo's pre-roll dump: a HEADERS record and MSS-sized segments within a few ms."""
    out = [conn.up(233, now)]
    for i in range(count - 1):
        out.append(conn.up(1460, now + 0.001 * (i + 1)))
    return out


def test_first_payload_of_a_new_burst_is_held() -> None:
    eng = engine()
    conn = Conn(eng)
    verdict, _ = conn.up(233, T0)
    assert verdict is Verdict.HOLD
    assert eng.flows[next(iter(eng.flows))].state is FlowState.PROVISIONAL


def test_pure_acks_and_downstream_are_never_held() -> None:
    eng = engine()
    conn = Conn(eng)
    assert conn.up(0, T0, flags=ACK)[0] is Verdict.ACCEPT
    assert conn.down(1400, T0 + 0.01) is Verdict.ACCEPT
    assert conn.up(0, T0 + 0.02, flags=ACK | FIN)[0] is Verdict.ACCEPT


def test_event_burst_then_silence_is_released_in_order_after_quiet() -> None:
    """A held Linux sender that sent all it had probes ~2 SRTT later by retransmitting its last
    segment (a tail-loss probe): the quiet after that is the end of a message."""
    eng = engine()
    conn = Conn(eng)
    tokens = [conn.up(size, T0 + i * 0.002)[1] for i, size in enumerate((233, 136, 1460, 900))]
    # the tail probe: one copy is kept, to be released after the original (the remote's D-SACK
    # of it ends the sender's probe episode); a second copy is dropped
    verdict, probe = conn.up(900, T0 + 0.05, seq=conn.seq - 900)
    assert verdict is Verdict.HOLD
    tokens.append(probe)
    assert conn.up(900, T0 + 0.09, seq=conn.seq - 900)[0] is Verdict.DROP
    assert eng.take_actions() == []
    eng.handle_timer(T0 + 0.1)
    assert eng.take_actions() == []  # still inside the quiet period
    assert eng.next_timer() == pytest.approx(T0 + 0.006 + eng.detector.quiet_s)
    eng.handle_timer(T0 + 0.3)
    actions = eng.take_actions()
    assert of(actions, Release)[0].tokens == tuple(tokens)
    released = of(actions, BurstReleased)[0]
    assert released.reason == "quiet" and released.bytes == 233 + 136 + 1460 + 900
    assert released.delay_s == pytest.approx(0.006 + eng.detector.quiet_s)
    assert eng.held() == (0, 0)
    assert not of(actions, UploadHeld)


def test_end_of_stream_record_releases_the_message_at_once() -> None:
    eng = engine()
    conn = Conn(eng)
    held = [conn.up(size, T0 + i * 0.001)[1] for i, size in enumerate((233, 136, 1460, 1120, 82))]
    verdict, _ = conn.up(38, T0 + 0.006)  # a bare HTTP/2 END_STREAM frame in a TLS record
    assert verdict is Verdict.ACCEPT
    actions = eng.take_actions()
    assert of(actions, Release)[0].tokens == tuple(held)
    assert of(actions, BurstReleased)[0].reason == "end-of-message record"
    # the next message starts a new held burst: nothing passes without being watched
    assert conn.up(234, T0 + 0.09)[0] is Verdict.HOLD


def test_start_burst_filling_the_window_becomes_a_pending_upload() -> None:
    eng = engine()
    conn = Conn(eng)
    verdicts = start_burst(conn, T0)
    assert all(v is Verdict.HOLD for v, _ in verdicts)
    actions = eng.take_actions()
    held = of(actions, UploadHeld)
    assert len(held) == 1
    upload = held[0].upload
    assert upload["device"] == "kitchen-echo" and upload["remote"] == f"{CLOUD}:443"
    assert upload["held_packets"] == 10 and upload["decided_after_packets"] == 10
    assert upload["expires"] == pytest.approx(T0 + 0.009 + 20)
    assert [u.id for u in eng.pending()] == [upload["id"]]
    # the sender's later packets (retransmissions, a tail-loss probe) are held too
    assert conn.up(118, T0 + 0.2)[0] is Verdict.HOLD


def test_allow_releases_everything_held_in_order_then_lets_the_upload_pass() -> None:
    eng = engine()
    conn = Conn(eng)
    tokens = [t for _, t in start_burst(conn, T0)]
    tokens.append(conn.up(118, T0 + 0.05)[1])
    upload_id = eng.pending()[0].id
    eng.take_actions()
    eng.decide(upload_id, Decision(Verb.ALLOW, by="cli:0"), T0 + 3)
    actions = eng.take_actions()
    assert of(actions, Release)[0].tokens == tuple(tokens)
    decided = of(actions, UploadDecided)[0]
    assert decided.outcome is Outcome.APPROVED and decided.by == "cli:0"
    assert conn.up(118, T0 + 3.01)[0] is Verdict.ACCEPT
    assert eng.held() == (0, 0)
    with pytest.raises(UnknownUpload):
        eng.decide(upload_id, Decision(Verb.DENY), T0 + 4)


def test_deny_discards_and_resets_both_ends_with_exact_sequence_numbers() -> None:
    eng = engine()
    conn = Conn(eng)
    conn.up(0, T0 - 1, flags=ACK)
    conn.down(300, T0 - 0.5)  # the cloud's last data: the device will ACK 5300
    conn.up(0, T0 - 0.49, flags=ACK)
    tokens = [t for _, t in start_burst(conn, T0)]
    upload_id = eng.pending()[0].id
    eng.take_actions()
    eng.decide(upload_id, Decision(Verb.DENY, by="web"), T0 + 2)
    actions = eng.take_actions()
    assert of(actions, Discard)[0].tokens == tuple(tokens)
    assert not of(actions, Discard)[0].reject_last  # TCP: the resets tell both ends
    reset = of(actions, Reset)[0]
    assert reset.seq_to_device == 5300  # the device's latest ACK
    assert reset.seq_to_remote == 1000  # the cloud's latest ACK: the first held byte
    # and the connection is marked blocked at once (not by a packet's verdict): the kernel
    # resets whatever either end sends next, with that packet's exact numbers
    assert [(m.verdict, m.direct) for m in of(actions, MarkFlow)] == [("block", True)]
    assert of(actions, UploadDecided)[0].outcome is Outcome.DENIED
    # the dead connection's leftovers are dropped, never delivered
    assert conn.up(118, T0 + 2.1)[0] is Verdict.DROP


def test_unanswered_upload_expires_as_deny() -> None:
    eng = engine(hold_timeout_s=5.0)
    conn = Conn(eng)
    start_burst(conn, T0)
    eng.take_actions()
    assert eng.next_timer() == pytest.approx(T0 + 0.009 + 5.0)
    eng.handle_timer(T0 + 6)
    actions = eng.take_actions()
    decided = of(actions, UploadDecided)[0]
    assert decided.outcome is Outcome.EXPIRED and decided.by == "expiry"
    assert of(actions, Discard) and of(actions, Reset)
    assert eng.pending() == []


def test_a_paced_stream_stalled_by_the_hold_is_an_upload_not_a_message() -> None:
    """HomePod-like: records ~50 ms apart; the sender's RTO fires before ten are out and it
    retransmits the held bytes collapsed into one segment. The quiet after that is the hold's."""
    eng = engine()
    conn = Conn(eng)
    conn.syn(T0 - 1)
    first_seq = conn.seq
    for i, size in enumerate((93, 146, 241, 604, 1460, 1460, 1460, 128)):
        assert conn.up(size, T0 + 0.05 * i)[0] is Verdict.HOLD
    # the RTO retransmission: the first four held records collapsed into one segment
    verdict, _ = conn.up(93 + 146 + 241 + 604, T0 + 0.37, seq=first_seq)
    assert verdict is Verdict.DROP and eng.counters["duplicates"] == 1
    eng.handle_timer(T0 + 0.35 + 0.2)
    assert eng.pending() and eng.pending()[0].reason == "stalled stream"
    assert not of(eng.take_actions(), BurstReleased)


def test_one_flight_then_quiet_is_a_message_even_when_retransmitted() -> None:
    """An event written at once (a few KB in 3 ms), held past the sender's RTO: its tail-loss
    probe said it had nothing more, so it is released."""
    eng = engine()
    conn = Conn(eng)
    conn.syn(T0 - 1)
    first_seq = conn.seq
    for i, size in enumerate((233, 1460, 1460, 700)):
        conn.up(size, T0 + 0.001 * i)
    conn.up(700, T0 + 0.05, seq=conn.seq - 700)  # the tail probe
    conn.up(233, T0 + 0.15, seq=first_seq)  # the RTO's retransmission: stalled, but finished
    eng.handle_timer(T0 + 0.5)
    assert not eng.pending() and of(eng.take_actions(), BurstReleased)


@pytest.mark.parametrize("flight", [
    (232, 136, 1460, 1460),  # a sender whose restart window is 4 segments
    (241, 1460, 1460, 1460, 90, 82),  # a 2018 Echo's first flight after idle (6)
    (232, 136, 1460, 1460, 1460, 245, 78, 126),  # and another one (8)
])
def test_a_flight_cut_off_by_the_hold_is_an_upload(flight: tuple[int, ...]) -> None:
    """A sender whose congestion window is smaller than the detector's window stops mid-burst,
    waiting for ACKs the hold keeps from it; its tail-loss probe carries new data (it has more),
    not its last segment. At the end of the quiet period the guard nudges it: only the first
    segment is released, the cloud's ACK gives the sender room, and it sends new data at once:
    an upload, of which only that first segment passed."""
    eng = engine()
    conn = Conn(eng)
    tokens = [conn.up(size, T0 + 0.001 * i)[1] for i, size in enumerate(flight)]
    assert conn.up(1460, T0 + 0.07)[0] is Verdict.HOLD  # the probe: new data
    eng.handle_timer(T0 + 0.07 + eng.detector.quiet_s)
    actions = eng.take_actions()
    assert of(actions, Release) == [Release((tokens[0],))]  # the nudge
    assert not of(actions, BurstReleased) and not eng.pending()
    assert eng.next_timer() == pytest.approx(T0 + 0.07 + eng.detector.quiet_s
                                             + eng.detector.nudge_wait_s)
    nudged_at = T0 + 0.07 + eng.detector.quiet_s
    assert conn.up(1460, nudged_at + 0.03)[0] is Verdict.HOLD  # the sender's answer
    (up,) = eng.pending()
    assert up.reason == "more after a nudge"
    assert len(up.held) == len(flight) + 1  # the rest of the flight, the probe, the answer
    assert up.leaked_bytes == flight[0]
    assert not of(eng.take_actions(), Release)


def test_a_silent_sender_is_nudged_and_then_released() -> None:
    """No probe came (holds have inflated the sender's RTT: its probe timer is slower than the
    quiet period): the nudge's ACK gets no new data out of it within `nudge_wait_s`, so it had
    finished: the rest of the run is released in order, after the nudged segment."""
    eng = engine()
    conn = Conn(eng)
    tokens = [conn.up(size, T0 + 0.001 * i)[1] for i, size in enumerate((241, 1460, 1460, 700))]
    quiet_end = T0 + 0.003 + eng.detector.quiet_s
    eng.handle_timer(quiet_end)
    assert of(eng.take_actions(), Release) == [Release((tokens[0],))]
    first_seq = conn.seq - 700 - 1460 - 1460 - 241
    # the sender's RTO crossing the cloud's ACK: the nudged segment again changes nothing
    assert conn.up(241, quiet_end + 0.05, seq=first_seq)[0] is Verdict.DROP
    eng.handle_timer(quiet_end + eng.detector.nudge_wait_s)
    actions = eng.take_actions()
    assert of(actions, Release) == [Release(tuple(tokens[1:]))]
    released = of(actions, BurstReleased)[0]
    assert released.reason == "nothing more after a nudge"
    assert released.bytes == 241 + 1460 + 1460 + 700 and released.packets == 4
    assert released.delay_s == pytest.approx(0.003 + eng.detector.quiet_s
                                             + eng.detector.nudge_wait_s)
    assert not eng.pending() and eng.held() == (0, 0)
    assert eng.counters["nudges"] == 1


def test_monitor_mode_never_nudges() -> None:
    """Monitor mode holds nothing, so its runs are not cut off: quiet is the end."""
    eng = engine(mode=Mode.MONITOR)
    conn = Conn(eng)
    for i, size in enumerate((241, 1460, 1460, 700)):
        assert conn.up(size, T0 + 0.001 * i)[0] is Verdict.ACCEPT
    eng.handle_timer(T0 + 0.5)
    assert eng.counters["nudges"] == 0 and not of(eng.take_actions(), Release)


@pytest.mark.parametrize("finish", ["tail probe", "remote ack", "fin"])
def test_a_run_whose_sender_finished_is_released(finish: str) -> None:
    """The same flight, but its sender showed it had sent everything: a tail-loss probe of its
    last segment (live), the remote's ACK of its last byte (a capture: nothing was held), or a
    FIN. New data after that evidence would cancel it (see the next test)."""
    eng = engine()
    conn = Conn(eng)
    flight = (241, 1460, 1460, 1460, 90, 82)
    tokens = [conn.up(size, T0 + 0.001 * i)[1] for i, size in enumerate(flight)]
    if finish == "tail probe":
        tokens.append(conn.up(82, T0 + 0.07, seq=conn.seq - 82)[1])
    elif finish == "remote ack":
        conn.down(0, T0 + 0.04)
    else:
        conn.up(0, T0 + 0.01, flags=ACK | FIN)
    eng.handle_timer(T0 + 0.3)
    actions = eng.take_actions()
    assert not eng.pending()
    assert of(actions, Release)[0].tokens == tuple(tokens)


def test_new_data_after_the_evidence_of_an_end_cancels_it() -> None:
    """A tail probe while the app had nothing, then more data (a paced sender's next write),
    then quiet without a new probe: not finished."""
    eng = engine()
    conn = Conn(eng)
    tokens = [conn.up(size, T0 + 0.001 * i)[1] for i, size in enumerate((241, 1460, 1460))]
    conn.up(1460, T0 + 0.02, seq=conn.seq - 1460)  # tail probe: finished for now
    conn.up(600, T0 + 0.05)  # but then new data
    eng.handle_timer(T0 + 0.05 + eng.detector.quiet_s)
    actions = eng.take_actions()
    assert of(actions, Release) == [Release((tokens[0],))]  # not finished: nudged
    assert not of(actions, BurstReleased) and not eng.pending()


def test_in_a_capture_a_late_ack_of_the_run_releases_it() -> None:
    """analyze: the remote's ACK of the run's last byte, even after the quiet period, is the
    evidence that the sender finished (a held sender would have probed its tail)."""
    eng = engine()
    conn = Conn(eng)
    for i, size in enumerate((241, 1460, 1460, 700)):
        conn.up(size, T0 + 0.001 * i)
    eng.handle_timer(T0 + 0.3)
    assert not of(eng.take_actions(), BurstReleased)
    conn.down(0, T0 + 0.35)
    released = of(eng.take_actions(), BurstReleased)
    assert released and released[0].delay_s == pytest.approx(0.35)
    assert not eng.pending()


@pytest.mark.parametrize("answer", [True, False])
def test_a_head_retransmission_is_no_evidence_either_way(answer: bool) -> None:
    """The RTO retransmits from the first unacknowledged byte whether or not the sender has
    more: the sender is nudged all the same. The nudge's ACK is of the original segment, so a
    Linux sender undoes the spurious timeout (or, by F-RTO, sends new data first): one with
    more sends it (an upload), one without stays silent (a message)."""
    eng = engine()
    conn = Conn(eng)
    first_seq = conn.seq
    tokens = [conn.up(size, T0 + 0.001 * i)[1] for i, size in enumerate((241, 1460, 1460))]
    assert conn.up(241, T0 + 0.15, seq=first_seq)[0] is Verdict.DROP
    nudged_at = T0 + 0.002 + eng.detector.quiet_s
    eng.handle_timer(nudged_at)
    assert of(eng.take_actions(), Release) == [Release((tokens[0],))]
    if answer:
        conn.up(1460, nudged_at + 0.01)
        assert [u.reason for u in eng.pending()] == ["more after a nudge"]
    else:
        eng.handle_timer(nudged_at + eng.detector.nudge_wait_s)
        assert of(eng.take_actions(), Release) == [Release(tuple(tokens[1:]))]
        assert not eng.pending()


def test_a_single_segment_going_quiet_is_a_message() -> None:
    """No sender's window is one segment: a lone record then quiet ends a message, probe or
    not (its probe would come only after 2 SRTT + 200 ms)."""
    eng = engine()
    conn = Conn(eng)
    conn.up(700, T0)
    eng.handle_timer(T0 + 0.3)
    assert not eng.pending() and of(eng.take_actions(), BurstReleased)


def test_retransmitted_segment_is_held_once() -> None:
    eng = engine()
    conn = Conn(eng)
    start_burst(conn, T0)
    upload = eng.pending()[0]
    first_seq = 1000
    for attempt in range(5):  # RTO retransmissions of the first segment
        verdict, _ = conn.up(233, T0 + 0.3 * (attempt + 1), seq=first_seq)
        assert verdict is Verdict.DROP
    assert len(upload.held) == 10
    assert eng.counters["duplicates"] == 5


def test_cap_on_held_packets_denies_the_upload_fail_closed() -> None:
    eng = engine(max_held_packets_per_upload=12)
    conn = Conn(eng)
    start_burst(conn, T0)
    upload = eng.pending()[0]
    conn.up(118, T0 + 0.1)
    conn.up(118, T0 + 0.12)
    eng.take_actions()
    verdict, _ = conn.up(118, T0 + 0.14)
    actions = eng.take_actions()
    assert verdict is Verdict.DROP
    assert of(actions, UploadDecided)[0].outcome is Outcome.CAPPED
    assert len(of(actions, Discard)[0].tokens) == 12
    assert upload.state.value == "denied" and eng.held() == (0, 0)


def test_cap_in_total_counts_held_bursts_and_denies_the_burst_that_finds_no_room() -> None:
    """The caps in total bound memory, so a burst held while the detector watches counts
    against them too. A burst that finds no room is cut short before its window: it could not
    be told from a message, so it is never released on that guess. It is an upload at its cap,
    denied (fail-closed, design.md 5), and the upload already pending is left alone."""
    eng = engine(max_held_packets_total=13)
    first = Conn(eng)
    start_burst(first, T0)
    upload = eng.pending()[0]
    eng.take_actions()
    assert eng.held()[0] == 10
    second = Conn(eng, sport=40001)
    verdicts = [v for v, _ in start_burst(second, T0 + 0.05)]
    assert verdicts == [Verdict.HOLD] * 3 + [Verdict.DROP] * 7
    actions = eng.take_actions()
    assert not of(actions, Release) and not of(actions, BurstReleased)
    decided = of(actions, UploadDecided)
    assert [(d.outcome, d.upload["decided_by"]) for d in decided] == [(Outcome.CAPPED, "cap")]
    assert len(of(actions, Discard)[0].tokens) == 3 and of(actions, Reset)
    assert eng.counters["caps_hit"] == 1
    assert eng.held()[0] == 10 and [u.id for u in eng.pending()] == [upload.id]
    # with room again (the pending upload denied), a new burst is held and judged as usual
    eng.decide(upload.id, Decision(Verb.DENY), T0 + 0.1)
    third = Conn(eng, sport=40002)
    assert [v for v, _ in start_burst(third, T0 + 0.2)] == [Verdict.HOLD] * 10
    assert len(eng.pending()) == 1 and eng.held()[0] == 10


def test_messaging_host_is_blocked_at_once() -> None:
    eng = engine()
    dns = Packet(4, "198.18.10.1", ECHO, 17, 53, 40001, 80, 108,
                 dns=(_answer("alexa-comms-mobile-service.amazon.com", CLOUD),))
    assert eng.receive(dns, T0) is Verdict.ACCEPT
    conn = Conn(eng)
    assert conn.syn(T0 + 0.01) is Verdict.REJECT
    actions = eng.take_actions()
    blocked = of(actions, FlowBlocked)[0]
    assert blocked.category == "messaging" and blocked.host.startswith("alexa-comms")
    assert of(actions, MarkFlow)[0].verdict == "block"


def test_allowed_category_passes_and_is_fast_pathed_after_its_first_payload() -> None:
    eng = engine()
    dns = Packet(4, "198.18.10.1", ECHO, 17, 53, 40001, 80, 108,
                 dns=(_answer("api.amazonalexa.com", CLOUD),))
    eng.receive(dns, T0)
    conn = Conn(eng)
    assert conn.syn(T0 + 0.01) is Verdict.ACCEPT
    assert eng.take_actions() == []  # no mark before the first payload (its SNI may differ)
    flow = next(iter(eng.flows.values()))
    assert flow.state is FlowState.ALLOWED_UNCONFIRMED
    for i in range(20):
        assert conn.up(1460, T0 + 0.02 + i * 0.001)[0] is Verdict.ACCEPT
    marks = of(eng.take_actions(), MarkFlow)
    assert [m.verdict for m in marks] == ["allow"]
    assert flow.state is FlowState.ALLOWED


def test_sni_names_the_flow_and_decides_its_category(client_hello) -> None:
    eng = engine()
    conn = Conn(eng)
    verdict, _ = conn.up(len(client_hello), T0, payload=client_hello, hint=Hint.TLS_HELLO)
    assert verdict is Verdict.ACCEPT  # a handshake record carries no audio
    flow = next(iter(eng.flows.values()))
    assert flow.host == "bob-dispatch-prod-na.amazon.com" and flow.category == "voice"


def test_followups_first_turn_passes_a_followup_is_held() -> None:
    eng = engine(mode=Mode.FOLLOWUPS)
    conn = Conn(eng)
    start_burst(conn, T0)
    actions = eng.take_actions()
    assert of(actions, UploadSeen)[0].upload["action"] == "pass"
    assert of(actions, Release)  # the first window is released at once
    for i in range(100):  # 2 s of 118-B Opus records
        assert conn.up(118, T0 + 0.02 + i * 0.02)[0] is Verdict.ACCEPT
    eng.handle_timer(T0 + 4)  # the turn ends
    # "What's the message?" ... the follow-up turn starts 4 s later
    start_burst(conn, T0 + 6.0)
    held = of(eng.take_actions(), UploadHeld)
    assert len(held) == 1 and held[0].upload["turn"] == 2


def test_followups_a_turn_longer_than_max_turn_is_held_from_that_point() -> None:
    eng = engine(mode=Mode.FOLLOWUPS, max_turn_s=8.0)
    conn = Conn(eng)
    start_burst(conn, T0)
    verdicts = [conn.up(118, T0 + 0.02 + i * 0.02)[0] for i in range(500)]  # 10 s of audio
    passed = verdicts.index(Verdict.HOLD)
    assert 0.02 + passed * 0.02 == pytest.approx(8.0, abs=0.05)
    assert all(v is Verdict.HOLD for v in verdicts[passed:])
    held = of(eng.take_actions(), UploadHeld)
    assert held and held[-1].upload["action"] == "hold"


def test_monitor_mode_holds_nothing_but_logs_the_upload() -> None:
    eng = engine(mode=Mode.MONITOR)
    conn = Conn(eng)
    verdicts = [v for v, _ in start_burst(conn, T0)]
    assert all(v is Verdict.ACCEPT for v in verdicts)
    seen = of(eng.take_actions(), UploadSeen)
    assert seen[0].upload["action"] == "monitor" and seen[0].upload["outcome"] == "monitored"


def test_quiet_window_denies_uploads_at_once_while_other_traffic_goes_on() -> None:
    eng = engine()
    eng.set_windows([Window("kitchen-echo", WindowKind.QUIET, T0 + 3600)])
    conn = Conn(eng)
    start_burst(conn, T0)
    actions = eng.take_actions()
    assert of(actions, UploadDecided)[0].outcome is Outcome.QUIET
    assert not of(actions, UploadHeld)
    assert of(actions, Reset)
    # a small event burst on another connection is still released normally
    other = Conn(eng, sport=40002)
    other.up(400, T0 + 1)
    eng.handle_timer(T0 + 2)
    assert of(eng.take_actions(), BurstReleased)


def test_allow_window_lets_uploads_pass_and_logs_them() -> None:
    eng = engine()
    eng.set_windows([Window("kitchen-echo", WindowKind.ALLOW, T0 + 1800)])
    conn = Conn(eng)
    start_burst(conn, T0)
    seen = of(eng.take_actions(), UploadSeen)[0]
    assert seen.upload["outcome"] == "window" and seen.upload["action"] == "pass"
    eng.set_windows([Window("kitchen-echo", WindowKind.ALLOW, T0 - 1)])  # expired
    start_burst(Conn(eng, sport=40003), T0 + 100)
    assert of(eng.take_actions(), UploadHeld)


def test_a_connection_seen_from_its_syn_is_marked_so_its_pure_acks_stay_in_the_kernel() -> None:
    eng = engine()
    conn = Conn(eng)
    conn.syn(T0)
    eng.take_actions()
    assert conn.up(0, T0 + 0.01, flags=ACK)[0] is Verdict.ACCEPT  # the handshake's ACK
    assert [(m.verdict, m.direct) for m in of(eng.take_actions(), MarkFlow)] == [
        ("control", False)]  # carried by this packet's verdict: its connection is confirmed
    conn.up(0, T0 + 0.02, flags=ACK)
    assert not of(eng.take_actions(), MarkFlow)  # once
    # payload still comes through the engine: a window of full segments is an upload
    start_burst(conn, T0 + 1)
    assert eng.pending()


def test_a_connection_first_seen_midstream_is_not_marked() -> None:
    eng = engine()
    conn = Conn(eng)  # no SYN: it predates the guard, its pure ACKs must keep coming
    conn.up(0, T0, flags=ACK)
    conn.up(0, T0 + 0.5, flags=ACK)
    assert not of(eng.take_actions(), MarkFlow)


def test_deny_beats_allow_between_standing_decisions() -> None:
    eng = engine()
    eng.set_windows([Window("kitchen-echo", WindowKind.ALLOW, T0 + 1800)])
    eng.set_standing([StandingRule("kitchen-echo", Verb.DENY, category="unknown")])
    start_burst(Conn(eng), T0)
    assert of(eng.take_actions(), UploadDecided)[0].outcome is Outcome.RULE


def test_allow_always_adds_a_standing_rule() -> None:
    eng = engine()
    start_burst(Conn(eng), T0)
    upload_id = eng.pending()[0].id
    eng.decide(upload_id, Decision(Verb.ALLOW, Scope.ALWAYS), T0 + 1)
    assert eng.standing[0].verb is Verb.ALLOW
    start_burst(Conn(eng, sport=40004), T0 + 60)
    assert of(eng.take_actions(), UploadSeen)[-1].upload["outcome"] == "rule"


def test_upload_pending_across_restart_is_reset_as_lost_and_nothing_delivered() -> None:
    eng = engine()
    eng.expect_lost([(41, TCP, ECHO, 40000, CLOUD, 443)])
    conn = Conn(eng)
    verdict, _ = conn.up(1460, T0)  # the speaker retransmits into the new guard
    actions = eng.take_actions()
    assert verdict is Verdict.DROP
    assert of(actions, Reset)[0].reason == "lost-on-restart"
    lost = of(actions, UploadDecided)[0]
    assert lost.outcome is Outcome.LOST and lost.upload["id"] == 41
    assert conn.up(1460, T0 + 0.2)[0] is Verdict.DROP


def test_quic_upload_deny_answers_unreachable() -> None:
    eng = engine()
    for i in range(10):
        assert udp(eng, 1350, T0 + i * 0.01) is Verdict.HOLD
    upload_id = eng.pending()[0].id
    eng.take_actions()
    eng.decide(upload_id, Decision(Verb.DENY), T0 + 1)
    actions = eng.take_actions()
    discard = of(actions, Discard)[0]
    # all ten dropped, the last one handed back to the kernel's reject rule: the device hears
    # port-unreachable at once, not at its next probe
    assert len(discard.tokens) == 10 and discard.reject_last
    assert of(actions, Unreachable)


def test_quic_acks_during_a_download_are_not_an_upload() -> None:
    eng = engine()
    for i in range(30):
        udp(eng, 1350, T0 + i * 0.003, up=False)
        udp(eng, 40, T0 + i * 0.003 + 0.001)
    eng.handle_timer(T0 + 2)
    actions = eng.take_actions()
    assert not of(actions, UploadHeld) and of(actions, BurstReleased)


def test_a_control_datagram_flow_is_marked_and_its_small_datagrams_pass_unheld() -> None:
    eng = engine()
    t = T0
    for _ in range(9):
        assert udp(eng, 40, t) is Verdict.HOLD
        t += 0.003
    assert udp(eng, 40, t) is Verdict.ACCEPT  # the window judged: control datagrams
    actions = eng.take_actions()
    assert len(of(actions, BurstReleased)) == 1 and not of(actions, MarkFlow)
    t += 0.003
    assert udp(eng, 40, t) is Verdict.ACCEPT
    # the next small datagram carries the mark (its connection is confirmed by then): from now
    # on the kernel passes the small ones
    assert [m.verdict for m in of(eng.take_actions(), MarkFlow)] == ["control"]
    for _ in range(50):  # judged already: nothing held, nothing released, no second mark
        t += 0.003
        assert udp(eng, 40, t) is Verdict.ACCEPT
    t += 5.0  # a pause does not matter: the size does
    assert udp(eng, 99, t) is Verdict.ACCEPT
    assert eng.held_packets == 0 and not eng.take_actions()


def test_a_big_datagram_on_a_control_flow_is_held_and_judged() -> None:
    eng = engine()
    t = T0
    for _ in range(10):
        udp(eng, 40, t)
        t += 0.003
    eng.take_actions()
    assert udp(eng, 1350, t) is Verdict.HOLD  # room for a codec frame: held
    t += 0.003
    assert udp(eng, 40, t) is Verdict.ACCEPT  # the small ones keep passing beside the burst
    for _ in range(9):
        t += 0.003
        udp(eng, 1350, t)
    assert eng.pending(), "a window of full datagrams on a control flow is an upload"
    upload_id = eng.pending()[0].id
    eng.decide(upload_id, Decision(Verb.DENY), t + 1)
    assert of(eng.take_actions(), Unreachable)
    assert udp(eng, 40, t + 1.1) is Verdict.DROP  # denied: nothing passes any more


def test_a_window_of_mixed_datagrams_on_a_control_flow_is_judged_by_its_big_ones() -> None:
    eng = engine()
    t = T0
    for _ in range(10):
        udp(eng, 40, t)
        t += 0.003
    eng.take_actions()
    assert udp(eng, 300, t) is Verdict.HOLD
    eng.handle_timer(t + eng.detector.quiet_s + 0.01)  # one request datagram, then quiet
    assert of(eng.take_actions(), BurstReleased) and not eng.pending()


def test_stun_from_a_speaker_is_messaging_and_blocked() -> None:
    eng = engine()
    stun = bytes.fromhex("0001000021122a442a442a442a442a442a442a44")
    assert udp(eng, 20, T0, dport=3478, hint=Hint.STUN, payload=stun) is Verdict.REJECT
    assert of(eng.take_actions(), FlowBlocked)[0].category == "messaging"


def test_quic_block_device_rejects_udp_443() -> None:
    eng = engine()
    device = eng.devices.by_name["kitchen-echo"]
    from dataclasses import replace

    eng.devices.replace(replace(device, quic="block"))
    assert udp(eng, 1200, T0, hint=Hint.QUIC_INITIAL) is Verdict.REJECT


def test_time_running_backwards_is_tolerated() -> None:
    eng = engine()
    conn = Conn(eng)
    conn.up(233, T0)
    conn.up(136, T0 - 50)  # a damaged capture
    conn.down(0, T0 - 49)  # the remote has it all
    eng.handle_timer(T0 - 100)
    eng.handle_timer(T0 + 1)
    assert of(eng.take_actions(), BurstReleased)


def test_malformed_and_unconfigured_packets() -> None:
    eng = engine()
    assert eng.receive(Malformed("truncated"), T0) is Verdict.DROP
    stranger = Packet(4, "198.18.10.99", CLOUD, TCP, 1234, 443, 500, 540)
    assert eng.receive(stranger, T0) is Verdict.ACCEPT
    assert eng.counters["malformed"] == 1 and eng.counters["not_ours"] == 1


def test_device_by_mac_ignores_a_spoofer_with_its_address() -> None:
    from dataclasses import replace

    from guard.core.config import DeviceConfig, GuardConfig
    from guard.core.engine import Engine
    from tests.enginekit import RULES

    device = DeviceConfig(name="echo", mac=ECHO_MAC)
    eng = Engine(replace(GuardConfig(), devices=(device,)), RULES)
    eng.set_windows([Window("echo", WindowKind.ALLOW, T0 + 3600)])
    real = Conn(eng, mac=ECHO_MAC)
    assert real.up(233, T0)[0] is Verdict.HOLD
    spoof = Conn(eng, sport=40009, mac="02:00:00:00:00:01")
    verdict, _ = spoof.up(233, T0 + 0.1)
    assert verdict is Verdict.ACCEPT  # treated as an unconfigured host, not as the speaker
    assert all(f.key.device_port != 40009 for f in eng.flows.values())


def test_illegal_transition_raises() -> None:
    eng = engine()
    conn = Conn(eng)
    conn.up(233, T0)
    flow = next(iter(eng.flows.values()))
    assert flow.state is FlowState.PROVISIONAL
    with pytest.raises(IllegalTransition, match="category allowed is illegal when provisional"):
        flow.move(FlowEvent.CATEGORY_ALLOWED)
    assert flow.state is FlowState.PROVISIONAL  # an illegal move changes nothing


def _answer(name: str, address: str):
    from guard.core.packet import DnsAnswer

    return DnsAnswer(name, address, 300)


def test_quiet_connection_that_predates_the_guard_is_reset_with_exact_numbers() -> None:
    from dataclasses import replace

    from guard.core.config import DeviceConfig, GuardConfig
    from guard.core.engine import Engine
    from tests.enginekit import RULES

    device = DeviceConfig(name="kitchen-echo", address=ECHO)
    eng = Engine(replace(GuardConfig(), devices=(device,)), RULES, reset_midstream=True)
    conn = Conn(eng)  # no SYN seen, no name: it predates the guard
    verdict, _ = conn.up(0, T0, flags=ACK)
    assert verdict is Verdict.DROP
    reset = of(eng.take_actions(), Reset)[0]
    # toward the remote: 1001 first (exact if the packet was a keepalive probe, SND.NXT - 1),
    # then 1000 (exact if it was an ACK)
    assert (reset.reason, reset.seq_to_device, reset.seq_to_remote, reset.also_to_remote) == (
        "midstream", 5000, 1001, 1000)
    # a connection that opened through the guard is never reset that way
    fresh = Conn(eng, sport=40100)
    fresh.syn(T0)
    assert fresh.up(0, T0 + 0.1, flags=ACK)[0] is Verdict.ACCEPT


def test_predating_connection_that_uploads_first_is_inspected_by_shape() -> None:
    from dataclasses import replace

    from guard.core.config import DeviceConfig, GuardConfig
    from guard.core.engine import Engine
    from tests.enginekit import RULES

    device = DeviceConfig(name="kitchen-echo", address=ECHO)
    eng = Engine(replace(GuardConfig(), devices=(device,)), RULES, reset_midstream=True)
    conn = Conn(eng)
    start_burst(conn, T0)
    assert of(eng.take_actions(), UploadHeld)
    assert not of(eng.take_actions(), Reset)


def test_quic_run_cut_off_on_a_full_datagram_is_an_upload() -> None:
    """A held QUIC sender may stop short of the window (its handshake counts against it)."""
    eng = engine()
    for i in range(8):
        assert udp(eng, 1350, T0 + i * 0.01) is Verdict.HOLD
    eng.handle_timer(T0 + 1)
    actions = eng.take_actions()
    assert of(actions, UploadHeld) and not of(actions, Release)


def test_quic_request_ending_on_a_partial_datagram_is_released() -> None:
    eng = engine()
    for i, size in enumerate((1350, 1350, 420)):
        udp(eng, size, T0 + i * 0.01)
    eng.handle_timer(T0 + 1)
    actions = eng.take_actions()
    assert of(actions, BurstReleased) and not of(actions, UploadHeld)


def test_address_only_device_is_known_by_its_mac_once_seen_ipv6_included() -> None:
    from guard.core.engine import MacLearned

    eng = engine()  # kitchen-echo configured by IPv4 address only
    v4 = Conn(eng, mac=ECHO_MAC)
    v4.syn(T0)
    learned = of(eng.take_actions(), MacLearned)
    assert [(m.device, m.mac) for m in learned] == [("kitchen-echo", ECHO_MAC)]
    # its IPv6 upload (no configured v6 address) is now recognised by MAC and held
    v6 = Conn(eng, sport=41000, src="2001:2:0:10::10", remote="2001:2:0:20::10", mac=ECHO_MAC)
    verdicts = [v for v, _ in start_burst(v6, T0 + 1)]
    assert verdicts[-1] is Verdict.HOLD and of(eng.take_actions(), UploadHeld)
    # and a host claiming the speaker's IPv4 address from another MAC is somebody else
    spoof = Conn(eng, sport=41001, mac="02:00:00:00:00:02")
    assert spoof.up(233, T0 + 2)[0] is Verdict.ACCEPT


# -- upload ids: allocated in the core, durable in blocks the shell reserves ------------------


def _engine(**kwargs: object) -> Engine:
    base = engine()
    return Engine(base.config, base.rules, **kwargs)  # type: ignore[arg-type]


def _uploads(eng, count: int, first_port: int = 41000) -> list[object]:
    """`count` uploads on new connections, one after another; the actions in order."""
    actions: list[object] = []
    for k in range(count):
        start_burst(Conn(eng, sport=first_port + k), T0 + k * 10.0)
        actions += eng.take_actions()
    return actions


def test_upload_ids_start_at_the_floor_and_nothing_is_reserved_without_a_block() -> None:
    eng = _engine(next_upload_id=41)
    actions = _uploads(eng, 3)
    assert [a.upload["id"] for a in of(actions, UploadHeld)] == [41, 42, 43]
    assert not of(actions, ReserveUploadIds)
    assert eng.next_upload_id == 44


def test_each_id_is_reserved_ahead_of_the_fact_that_announces_it() -> None:
    eng = _engine(next_upload_id=7, id_block=4)
    first = eng.take_actions()
    assert first == [ReserveUploadIds(10)]  # 7..10, asked for at start
    reserved = 10
    actions = _uploads(eng, 9)
    ids = []
    for action in actions:
        if isinstance(action, ReserveUploadIds):
            assert action.through > reserved
            reserved = action.through
        elif isinstance(action, UploadHeld):
            assert action.upload["id"] <= reserved  # durable before it is announced
            ids.append(action.upload["id"])
    assert ids == list(range(7, 16))
    # the next block while half of the current one is left: one durable write per block
    assert [a.through for a in of(actions, ReserveUploadIds)] == [14, 18]


def test_ids_stay_unique_across_a_restart_from_the_reserved_mark() -> None:
    eng = _engine(next_upload_id=1, id_block=8)
    actions = eng.take_actions() + _uploads(eng, 5)
    mark = max(a.through for a in of(actions, ReserveUploadIds))  # what the store kept
    before = {a.upload["id"] for a in of(actions, UploadHeld)}
    again = _engine(next_upload_id=mark + 1, id_block=8)
    after = {a.upload["id"] for a in of(again.take_actions() + _uploads(again, 5), UploadHeld)}
    assert before and after and not before & after and min(after) > max(before)


def test_an_id_source_still_works_and_the_core_counts_past_it() -> None:
    handed = iter((100, 200))
    eng = _engine(id_source=lambda: next(handed))
    assert [a.upload["id"] for a in of(_uploads(eng, 2), UploadHeld)] == [100, 200]
    assert eng.next_upload_id == 201


@pytest.mark.parametrize("floor,block", [(0, None), (1, 1), (-5, 8)])
def test_upload_ids_refuse_a_bad_floor_or_block(floor: int, block: int | None) -> None:
    with pytest.raises(ValueError):
        UploadIds(floor, block)
