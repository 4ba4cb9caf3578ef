"""Helpers to script the engine with a virtual clock: packets in, actions out."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from guard.core.config import DeviceConfig, GuardConfig
from guard.core.engine import Engine, Verdict
from guard.core.packet import ACK, PSH, SYN, TCP, UDP, Hint, Packet
from guard.core.policy import Mode
from guard.core.ruleset import load_rules

ECHO = "198.18.10.10"
ECHO_MAC = "68:db:f5:90:19:64"
CLOUD = "198.19.0.10"
RULES = load_rules()


def engine(mode: Mode = Mode.STRICT, **guard: Any) -> Engine:
    """An engine for the packet path's tests: QUIC held as `quic = "hold"` (the default refuses
    it) unless a test says otherwise."""
    device = DeviceConfig(name="kitchen-echo", address=ECHO, mode=mode)
    config = replace(GuardConfig(), devices=(device,), **{"quic": "hold", **guard})
    return Engine(config, RULES)


class Conn:
    """One TCP connection of the speaker, with sequence numbers kept right."""

    def __init__(self, eng: Engine, sport: int = 40000, remote: str = CLOUD, dport: int = 443,
                 src: str = ECHO, mac: str | None = None) -> None:
        self.eng, self.sport, self.remote, self.dport = eng, sport, remote, dport
        self.src, self.mac = src, mac
        self.seq, self.rseq = 1000, 5000
        self.tokens = 0

    def up(self, size: int, now: float, flags: int = ACK | PSH, payload: bytes = b"",
           hint: Hint = Hint.NONE, seq: int | None = None) -> tuple[Verdict, int]:
        self.tokens += 1
        token = (self.sport, self.tokens)
        pkt = Packet(4, self.src, self.remote, TCP, self.sport, self.dport, size, size + 40,
                     src_mac=self.mac, flags=flags, seq=self.seq if seq is None else seq,
                     ack=self.rseq, hint=hint, payload=payload or bytes(min(size, 64)))
        if seq is None:
            self.seq += size
        return self.eng.receive(pkt, now, token), token

    def down(self, size: int, now: float, flags: int = ACK) -> Verdict:
        pkt = Packet(4, self.remote, self.src, TCP, self.dport, self.sport, size, size + 40,
                     flags=flags, seq=self.rseq, ack=self.seq)
        self.rseq += size
        return self.eng.receive(pkt, now)

    def syn(self, now: float) -> Verdict:
        pkt = Packet(4, self.src, self.remote, TCP, self.sport, self.dport, 0, 60,
                     src_mac=self.mac, flags=SYN, seq=self.seq - 1)
        return self.eng.receive(pkt, now)


def udp(eng: Engine, size: int, now: float, sport: int = 50000, dport: int = 443,
        remote: str = CLOUD, hint: Hint = Hint.NONE, payload: bytes = b"", up: bool = True
        ) -> Verdict:
    if up:
        pkt = Packet(4, ECHO, remote, UDP, sport, dport, size, size + 28, hint=hint,
                     payload=payload or bytes(min(size, 64)))
    else:
        pkt = Packet(4, remote, ECHO, UDP, dport, sport, size, size + 28, hint=hint,
                     payload=payload or bytes(min(size, 64)))
    return eng.receive(pkt, now, ("udp", now))


def of(actions: list[Any], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]
