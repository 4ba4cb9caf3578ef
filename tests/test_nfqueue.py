"""guard.shell.nfqueue: the NFQUEUE callback, late verdicts and the MAC memo.

Kernel packets are played by `FakeNfPacket`, which behaves like netfilterqueue 1.1.0's Packet where
it matters: a verdict is given at most once (a second one raises, as does one after the queue was
unbound), the mark is whatever `set_mark` put there before the verdict, and the payload is gone
once the callback has returned. Packets are real IPv4/IPv6 bytes built with `struct` and go
through the real parser; the engine is a scripted stub, except in the tests at the end, which
wire the handler to a real `guard.core.engine.Engine`.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guard.core.engine import Discard, Engine, Release, Reset, Verdict
from guard.core.packet import ACK, PSH, TCP, UDP, Malformed, Packet
from guard.core.policy import Decision, Verb
from guard.shell import nfqueue
from guard.shell.nfqueue import (
    COPY_RANGE,
    QueueHandler,
    QueueStats,
    late_reject,
    late_verdict,
    mac_of,
)
from tests.ci import missing_or_fail
from tests.enginekit import CLOUD, ECHO, engine

T0 = 1_000_000.0
ECHO6 = "2001:db8::40"
CLOUD6 = "2607:f8b0:4005:800::2004"
HW = bytes.fromhex("68dbf5901964") + b"\0\0"  # netfilterqueue hands out 8 bytes
HW_MAC = "68:db:f5:90:19:64"


# ---------------------------------------------------------------------------------------------
# Wire bytes


def ipv4(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0,
                       socket.inet_pton(socket.AF_INET, src),
                       socket.inet_pton(socket.AF_INET, dst)) + l4


def ipv6(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + l4


def tcp(sport: int, dport: int, payload: bytes = b"", seq: int = 1000, ack: int = 5000,
        flags: int = ACK | PSH) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def up4(size: int = 100, seq: int = 1000) -> bytes:
    """An upstream IPv4 TCP segment of the speaker carrying `size` payload bytes."""
    return ipv4(ECHO, CLOUD, TCP, tcp(40000, 443, bytes(size), seq=seq))


# ---------------------------------------------------------------------------------------------
# Fakes


class FakeNfPacket:
    """What QueueHandler and late_verdict call on a netfilterqueue Packet, with its rules."""

    def __init__(self, payload: bytes, hw: bytes | None = None, mark: int = 0,
                 log: list[tuple[FakeNfPacket, str]] | None = None) -> None:
        self.payload = payload
        self.hw = hw
        self.mark = mark
        self.calls: list[str] = []  # every set_mark and verdict attempt, in order
        self.verdicts: list[str] = []  # the verdicts the "kernel" took
        self.verdict_mark: int | None = None  # the mark the kernel saw with the verdict
        self.unbound = False
        self.payload_gone = False
        self.log = log

    def get_payload(self) -> bytes:
        if self.payload_gone:
            raise RuntimeError("Payload data is no longer available.")
        return self.payload

    def get_hw(self) -> bytes | None:
        return self.hw

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.calls.append(f"set_mark:{mark:#x}")
        self.mark = mark

    def _verdict(self, name: str) -> None:
        self.calls.append(name)
        if self.verdicts:
            raise RuntimeError("Verdict already given for this packet")
        if self.unbound:
            raise RuntimeError("Parent queue has already been unbound")
        self.verdicts.append(name)
        self.verdict_mark = self.mark
        if self.log is not None:
            self.log.append((self, name))

    def accept(self) -> None:
        self._verdict("accept")

    def drop(self) -> None:
        self._verdict("drop")

    def repeat(self) -> None:
        self._verdict("repeat")

    def callback_returned(self) -> None:
        """netfilterqueue drops its reference to the payload buffer after the callback."""
        self.payload_gone = True


class ScriptedEngine:
    """A `receive` that records its calls and returns (or raises) what it is told to."""

    def __init__(self, verdict: Verdict = Verdict.ACCEPT, raises: Exception | None = None) -> None:
        self.verdict = verdict
        self.raises = raises
        self.calls: list[tuple[Packet | Malformed | None, float, Any]] = []

    def receive(self, pkt: Packet | Malformed | None, now: float, token: Any) -> Verdict:
        self.calls.append((pkt, now, token))
        if self.raises is not None:
            raise self.raises
        return self.verdict


def no_mark(nfpkt: Any) -> int | None:
    return None


def handler_for(receive: Callable[[Packet | Malformed | None, float, Any], Verdict],
                after: Callable[[Any], int | None] = no_mark, fail_open: bool = False,
                observe: Callable[[str, str, float], None] | None = None) -> QueueHandler:
    return QueueHandler(receive, after, fail_open, observe=observe, clock=lambda: T0)


@pytest.fixture(autouse=True)
def fresh_mac_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nfqueue, "_MACS", {})


# ---------------------------------------------------------------------------------------------
# The copy range


def test_copy_range_holds_a_whole_mtu_packet_within_the_library_cap() -> None:
    assert COPY_RANGE >= 1500
    import netfilterqueue  # a dependency of the package: installed wherever the tests run

    source = Path(netfilterqueue.__file__).parent / "_impl.pyx"
    if not source.exists():
        missing_or_fail("netfilterqueue ships without its .pyx source")
    defs = dict(re.findall(r"^DEF (\w+) = (\S+)", source.read_text(), re.M))
    # the library silently caps a larger range to BufferSize - MetadataSize
    assert COPY_RANGE <= int(defs["BufferSize"], 0) - int(defs["MetadataSize"], 0)


# ---------------------------------------------------------------------------------------------
# One verdict per packet


@pytest.mark.parametrize(
    ("wire", "version", "src", "dst", "proto", "sport", "dport"),
    [
        (ipv4(ECHO, CLOUD, TCP, tcp(40000, 443, b"x" * 10)), 4, ECHO, CLOUD, TCP, 40000, 443),
        (ipv4(ECHO, CLOUD, UDP, udp(50000, 443, b"x" * 10)), 4, ECHO, CLOUD, UDP, 50000, 443),
        (ipv6(ECHO6, CLOUD6, TCP, tcp(40000, 443, b"x" * 10)), 6, ECHO6, CLOUD6, TCP, 40000, 443),
        (ipv6(ECHO6, CLOUD6, UDP, udp(50000, 443, b"x" * 10)), 6, ECHO6, CLOUD6, UDP, 50000, 443),
    ],
    ids=["ipv4-tcp", "ipv4-udp", "ipv6-tcp", "ipv6-udp"],
)
def test_accept_verdict_parses_the_packet_and_accepts_it_once(
    wire: bytes, version: int, src: str, dst: str, proto: int, sport: int, dport: int
) -> None:
    eng = ScriptedEngine(Verdict.ACCEPT)
    handler = handler_for(eng.receive)
    pkt = FakeNfPacket(wire, hw=HW)
    handler(pkt)
    assert pkt.verdicts == ["accept"] and pkt.calls == ["accept"]
    [(parsed, now, token)] = eng.calls
    assert isinstance(parsed, Packet)
    assert (parsed.version, parsed.src, parsed.dst, parsed.proto, parsed.sport, parsed.dport) == (
        version, src, dst, proto, sport, dport)
    assert parsed.payload_len == 10 and parsed.src_mac == HW_MAC
    assert now == T0 and token is pkt  # the token kept for a late verdict is the packet itself
    assert handler.stats.packets == 1 and handler.stats.errors == 0
    assert handler.stats.malformed == 0 and handler.stats.late_verdict_errors == 0


def test_drop_verdict_drops_the_packet_once() -> None:
    handler = handler_for(ScriptedEngine(Verdict.DROP).receive)
    pkt = FakeNfPacket(up4())
    handler(pkt)
    assert pkt.verdicts == ["drop"] and pkt.calls == ["drop"]


def test_reject_without_a_mark_drops_the_packet() -> None:
    handler = handler_for(ScriptedEngine(Verdict.REJECT).receive)
    pkt = FakeNfPacket(up4())
    handler(pkt)
    assert pkt.verdicts == ["drop"] and pkt.calls == ["drop"]


def test_reject_with_a_mark_sets_the_mark_then_repeats_the_packet() -> None:
    handler = handler_for(ScriptedEngine(Verdict.REJECT).receive, after=lambda p: 0x20000)
    pkt = FakeNfPacket(up4())
    handler(pkt)
    assert pkt.calls == ["set_mark:0x20000", "repeat"]
    assert pkt.verdicts == ["repeat"] and pkt.verdict_mark == 0x20000


def test_mark_from_after_is_set_on_the_packet_before_accepting() -> None:
    seen: list[Any] = []

    def after(nfpkt: Any) -> int:
        seen.append(nfpkt)
        return 0x10000

    handler = handler_for(ScriptedEngine(Verdict.ACCEPT).receive, after=after)
    pkt = FakeNfPacket(up4())
    handler(pkt)
    assert seen == [pkt]  # `after` gets the current packet (to read its mark)
    assert pkt.calls == ["set_mark:0x10000", "accept"]
    assert pkt.verdicts == ["accept"] and pkt.verdict_mark == 0x10000


def test_drop_verdict_ignores_a_mark_from_after() -> None:
    handler = handler_for(ScriptedEngine(Verdict.DROP).receive, after=lambda p: 0x20000)
    pkt = FakeNfPacket(up4())
    handler(pkt)
    assert pkt.calls == ["drop"] and pkt.mark == 0


@pytest.mark.parametrize(("fail_open", "expected"), [(False, "drop"), (True, "accept")])
def test_malformed_packet_gets_the_fail_mode_verdict(fail_open: bool, expected: str) -> None:
    eng = ScriptedEngine(Verdict.ACCEPT)  # what the engine says does not count for it
    handler = handler_for(eng.receive, fail_open=fail_open)
    # an IPv4 header claiming a 12-byte header: impossible
    pkt = FakeNfPacket(b"\x43" + up4()[1:], hw=HW)
    handler(pkt)
    assert pkt.verdicts == [expected] and len(pkt.calls) == 1
    [(parsed, _, token)] = eng.calls
    assert isinstance(parsed, Malformed) and parsed.src_mac == HW_MAC
    assert token is None  # nothing to hold
    assert handler.stats.malformed == 1 and handler.stats.errors == 0
    assert handler.stats.packets == 1


@pytest.mark.parametrize(("fail_open", "expected"), [(False, "drop"), (True, "accept")])
def test_empty_payload_counts_as_malformed_and_gets_the_fail_mode_verdict(
    fail_open: bool, expected: str
) -> None:
    eng = ScriptedEngine(Verdict.ACCEPT)
    handler = handler_for(eng.receive, fail_open=fail_open)
    pkt = FakeNfPacket(b"")
    handler(pkt)
    assert pkt.verdicts == [expected] and len(pkt.calls) == 1
    assert [c[0] for c in eng.calls] == [None]
    assert handler.stats.malformed == 1


@pytest.mark.parametrize(("fail_open", "expected"), [(False, "drop"), (True, "accept")])
def test_engine_exception_gets_the_fail_mode_verdict(fail_open: bool, expected: str) -> None:
    eng = ScriptedEngine(raises=KeyError("boom"))
    handler = handler_for(eng.receive, fail_open=fail_open)
    pkt = FakeNfPacket(up4())
    handler(pkt)  # does not raise
    assert pkt.verdicts == [expected] and len(pkt.calls) == 1
    assert handler.stats.errors == 1 and handler.stats.malformed == 0


@pytest.mark.parametrize(("fail_open", "expected"), [(False, "drop"), (True, "accept")])
def test_exception_reading_the_packet_gets_the_fail_mode_verdict(
    fail_open: bool, expected: str
) -> None:
    eng = ScriptedEngine(Verdict.ACCEPT)
    handler = handler_for(eng.receive, fail_open=fail_open)
    pkt = FakeNfPacket(up4())
    pkt.payload_gone = True  # get_payload raises, as netfilterqueue does in COPY_META mode
    handler(pkt)
    assert pkt.verdicts == [expected] and len(pkt.calls) == 1
    assert eng.calls == [] and handler.stats.errors == 1


@pytest.mark.parametrize(("fail_open", "expected"), [(False, "drop"), (True, "accept")])
def test_exception_in_after_replaces_the_engine_verdict_with_the_fail_mode(
    fail_open: bool, expected: str
) -> None:
    def after(nfpkt: Any) -> int | None:
        raise OSError("disk full")

    # the engine said REJECT with a mark to set; after() never returned it
    handler = handler_for(ScriptedEngine(Verdict.REJECT).receive, after=after,
                          fail_open=fail_open)
    pkt = FakeNfPacket(up4())
    handler(pkt)
    assert pkt.calls == [expected] and handler.stats.errors == 1


def test_every_packet_is_counted_whatever_its_fate() -> None:
    handler = handler_for(ScriptedEngine(Verdict.ACCEPT).receive)
    for wire in (up4(), b"", b"\x00" * 30, up4(0)):
        handler(FakeNfPacket(wire))
    handler.receive = ScriptedEngine(raises=ValueError()).receive
    handler(FakeNfPacket(up4()))
    stats = handler.stats
    assert (stats.packets, stats.malformed, stats.errors) == (5, 2, 1)


@pytest.mark.parametrize(
    ("verdict", "mark"),
    [(Verdict.ACCEPT, None), (Verdict.ACCEPT, 0x10000), (Verdict.DROP, None),
     (Verdict.REJECT, None), (Verdict.REJECT, 0x20000)],
)
def test_verdict_the_kernel_refuses_in_the_callback_is_counted_not_raised(
    verdict: Verdict, mark: int | None
) -> None:
    handler = handler_for(ScriptedEngine(verdict).receive, after=lambda p: mark)
    pkt = FakeNfPacket(up4())
    pkt.unbound = True
    handler(pkt)  # does not raise
    assert pkt.verdicts == [] and len([c for c in pkt.calls if "mark" not in c]) == 1
    assert handler.stats.late_verdict_errors == 1 and handler.stats.errors == 0


def test_observe_gets_direction_verdict_label_and_duration() -> None:
    observed: list[tuple[str, str, float]] = []

    def observe(direction: str, label: str, seconds: float) -> None:
        observed.append((direction, label, seconds))

    eng = ScriptedEngine(Verdict.HOLD)
    handler = handler_for(eng.receive, observe=observe)
    handler(FakeNfPacket(up4(), hw=HW))  # a frame with the sender's MAC: from the LAN
    eng.verdict = Verdict.ACCEPT
    handler(FakeNfPacket(ipv4(CLOUD, ECHO, TCP, tcp(443, 40000, b"y")), hw=None))
    handler(FakeNfPacket(b""))  # malformed: fail closed
    assert [(d, label) for d, label, _ in observed] == [
        ("up", "hold"), ("down", "accept"), ("up", "drop")]
    assert all(0 <= s < 1 for _, _, s in observed)


# ---------------------------------------------------------------------------------------------
# Held packets and late verdicts


@pytest.mark.parametrize(("accept", "expected"), [(True, "accept"), (False, "drop")])
def test_hold_gives_no_verdict_until_the_late_verdict_gives_exactly_one(
    accept: bool, expected: str
) -> None:
    eng = ScriptedEngine(Verdict.HOLD)
    handler = handler_for(eng.receive, after=lambda p: 0x10000)
    pkt = FakeNfPacket(up4())
    handler(pkt)
    pkt.callback_returned()
    assert pkt.calls == [] and eng.calls[0][2] is pkt  # no verdict, no mark: the engine owns it
    late_verdict(pkt, accept, handler.stats)  # needs no payload
    assert pkt.verdicts == [expected] and pkt.calls == [expected]
    assert handler.stats.late_verdict_errors == 0


@pytest.mark.parametrize("accept", [True, False])
def test_second_verdict_on_a_packet_is_counted_not_raised(accept: bool) -> None:
    stats = QueueStats()
    pkt = FakeNfPacket(up4())
    late_verdict(pkt, True, stats)
    late_verdict(pkt, accept, stats)  # does not raise
    assert pkt.verdicts == ["accept"] and len(pkt.calls) == 2
    assert stats.late_verdict_errors == 1


@pytest.mark.parametrize("accept", [True, False])
def test_late_verdict_after_the_queue_was_unbound_is_counted_not_raised(accept: bool) -> None:
    stats = QueueStats()
    pkt = FakeNfPacket(up4())
    pkt.unbound = True
    late_verdict(pkt, accept, stats)  # does not raise
    assert pkt.verdicts == [] and stats.late_verdict_errors == 1


# A store write failing for UploadHeld (after() raising) must not give a held packet a verdict
# now: the engine keeps it, and its one verdict comes later, in order.
@pytest.mark.parametrize("fail_open", [False, True])
def test_exception_in_after_leaves_a_held_packet_to_its_late_verdict(fail_open: bool) -> None:
    def after(nfpkt: Any) -> int | None:
        raise OSError("disk full")

    handler = handler_for(ScriptedEngine(Verdict.HOLD).receive, after=after, fail_open=fail_open)
    pkt = FakeNfPacket(up4())
    handler(pkt)
    assert handler.stats.errors == 1
    assert pkt.calls == []  # the engine still holds it: its verdict comes later
    late_verdict(pkt, True, handler.stats)
    assert pkt.verdicts == ["accept"] and handler.stats.late_verdict_errors == 0


# ---------------------------------------------------------------------------------------------
# mac_of


@pytest.mark.parametrize("hw", [None, b"", b"\x68\xdb\xf5\x90\x19"])
def test_mac_of_missing_or_short_hw_address_is_none(hw: bytes | None) -> None:
    assert mac_of(hw) is None


def test_mac_of_formats_the_first_six_bytes_of_the_hw_address() -> None:
    assert mac_of(HW) == HW_MAC
    assert mac_of(HW) == HW_MAC  # the memoised answer is the same
    assert mac_of(bytes.fromhex("0a1b2c3d4e5f")) == "0a:1b:2c:3d:4e:5f"


def test_mac_of_memo_stays_bounded() -> None:
    for i in range(3 * nfqueue._MAX_MACS):
        hw = i.to_bytes(6, "big") + b"\0\0"
        assert mac_of(hw) == i.to_bytes(6, "big").hex(":")
        assert len(nfqueue._MACS) <= nfqueue._MAX_MACS
    assert mac_of(HW) == HW_MAC  # still right after the memo was cleared


def test_no_hw_address_reaches_the_engine_as_no_source_mac() -> None:
    eng = ScriptedEngine(Verdict.ACCEPT)
    handler_for(eng.receive)(FakeNfPacket(up4(), hw=None))
    parsed = eng.calls[0][0]
    assert isinstance(parsed, Packet) and parsed.src_mac is None


# ---------------------------------------------------------------------------------------------
# Wired to a real engine


class Shell:
    """The daemon's share, cut down: the handler in front of a real engine, Release/Discard
    actions turned into late verdicts (as Daemon._after_packet/_apply do)."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.now = T0
        self.resets: list[Reset] = []
        self.handler = QueueHandler(eng.receive, self.after, False, clock=lambda: self.now)

    def after(self, nfpkt: Any) -> int | None:
        self.apply()
        return None

    def apply(self) -> None:
        for action in self.eng.take_actions():
            if isinstance(action, Release | Discard):
                for token in action.tokens:
                    late_verdict(token, isinstance(action, Release), self.handler.stats)
            elif isinstance(action, Reset):
                self.resets.append(action)

    def packet(self, wire: bytes, at: float, log: list[tuple[FakeNfPacket, str]]
               ) -> FakeNfPacket:
        self.now = at
        pkt = FakeNfPacket(wire, log=log)
        self.handler(pkt)
        pkt.callback_returned()
        return pkt


def start_burst(shell: Shell, log: list[tuple[FakeNfPacket, str]]) -> list[FakeNfPacket]:
    """The speaker's pre-roll dump: a HEADERS record then MSS-sized segments, 1 ms apart."""
    packets, seq = [], 1000
    for i, size in enumerate([233] + [1460] * 9):
        packets.append(shell.packet(up4(size, seq), T0 + 0.001 * i, log))
        seq += size
    return packets


def test_held_upload_gets_its_verdicts_later_in_arrival_order_once_allowed() -> None:
    eng = engine()
    shell = Shell(eng)
    log: list[tuple[FakeNfPacket, str]] = []
    packets = start_burst(shell, log)
    assert log == []  # all ten held: no verdict yet
    [upload] = eng.pending()
    assert upload.held_bytes and len(upload.held) == 10
    eng.decide(upload.id, Decision(Verb.ALLOW, by="test"), T0 + 3)
    shell.apply()
    assert log == [(p, "accept") for p in packets]  # each exactly once, in arrival order
    assert all(p.verdicts == ["accept"] for p in packets)
    assert shell.handler.stats.late_verdict_errors == 0 and shell.handler.stats.errors == 0
    # the upload passes now: its next segment is accepted in the callback
    nxt = shell.packet(up4(118, 1000 + 233 + 9 * 1460), T0 + 3.01, log)
    assert nxt.verdicts == ["accept"] and log[-1] == (nxt, "accept")


def test_held_upload_gets_dropped_in_order_and_reset_once_denied() -> None:
    eng = engine()
    shell = Shell(eng)
    log: list[tuple[FakeNfPacket, str]] = []
    packets = start_burst(shell, log)
    assert log == []
    eng.decide(eng.pending()[0].id, Decision(Verb.DENY, by="test"), T0 + 3)
    shell.apply()
    assert log == [(p, "drop") for p in packets]
    assert shell.handler.stats.late_verdict_errors == 0
    [reset] = shell.resets
    assert reset.seq_to_remote == 1000  # the first held byte: nothing of the upload got out


def test_late_reject_sends_the_held_packet_back_with_the_mark() -> None:
    pkt = FakeNfPacket(up4())
    stats = QueueStats()
    late_reject(pkt, 0x20000, stats)
    assert pkt.verdict_mark == 0x20000 and pkt.verdicts == ["repeat"]
    assert stats.late_verdict_errors == 0
    late_reject(pkt, 0x20000, stats)  # a second verdict: counted, not raised
    assert stats.late_verdict_errors == 1
