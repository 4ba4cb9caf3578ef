"""The NFQUEUE adapter: kernel packets in, the engine's verdicts out.

Rules of this module (kernel-facts.md): every packet gets exactly one verdict, also when parsing
or the engine fails (then the fail mode decides, in a `finally`); held packets are kept as
netfilterqueue Packet objects and given their verdict later, in order; a verdict that the kernel
no longer wants (the queue was unbound, a second verdict) is counted, never fatal. Only the
packet path lives here: the daemon owns the loop, the lock and the actions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter as _perf_counter
from typing import Any

from guard.core.engine import Verdict
from guard.core.packet import Malformed, Packet, parse_ip

# The copy range is capped at 4016 bytes by netfilterqueue 1.1.0 (a fixed 4096-byte buffer);
# a full Ethernet frame's IP packet (1500) fits, so SNI and DNS answers are always whole.
COPY_RANGE = 4016


@dataclass(slots=True)
class QueueStats:
    packets: int = 0
    errors: int = 0  # the engine or the parser raised: the fail mode gave the verdict
    late_verdict_errors: int = 0  # a held packet's verdict the kernel did not take any more
    malformed: int = 0
    verdict_seconds: list[float] = field(default_factory=list)


def mac_of(hw: bytes | None) -> str | None:
    if not hw or len(hw) < 6:
        return None
    mac = _MACS.get(hw)
    if mac is None:
        if len(_MACS) >= _MAX_MACS:
            _MACS.clear()  # a bounded memo: a router sees a handful of LAN MACs
        mac = _MACS[hw] = hw[:6].hex(":")
    return mac


_MACS: dict[bytes, str] = {}
_MAX_MACS = 1024
# Verdict -> the label metrics count it under (an Enum's `.value` is a property: slower)
_LABELS = {v: v.value for v in Verdict}
_ACCEPT, _DROP, _HOLD = Verdict.ACCEPT, Verdict.DROP, Verdict.HOLD


class QueueHandler:
    """The netfilterqueue callback. `receive` is the engine's, `apply` handles its actions and
    returns the mark to put on the current packet (or None)."""

    def __init__(
        self,
        receive: Callable[[Packet | Malformed | None, float, Any], Verdict],
        after: Callable[[Any], int | None],
        fail_open: bool,
        observe: Callable[[str, str, float], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.receive = receive
        self.after = after
        self.fail_open = fail_open
        self.observe = observe
        self.clock = clock
        self.stats = QueueStats()

    def __call__(self, nfpkt: Any) -> None:
        # The hot path: every queued packet runs this. Kept flat (locals, identity tests, no
        # per-packet objects beyond the parsed Packet) on purpose; see docs/performance.md.
        started = _perf_counter()
        verdict = _ACCEPT if self.fail_open else _DROP
        mark: int | None = None
        direction = "up"
        stats = self.stats
        try:
            stats.packets += 1
            hw = nfpkt.get_hw()
            # the whole payload (<= MTU): a ClientHello that spans segments is named too
            parsed = parse_ip(nfpkt.get_payload(), mac_of(hw) if hw else None, 2048)
            if parsed is None or parsed.__class__ is Malformed:
                stats.malformed += 1
                # a packet we cannot read is never let through in fail-closed mode
                self.receive(parsed, self.clock(), None)  # counted by the engine
            else:
                if parsed.src_mac is None:
                    direction = "down"
                # A held packet is kept for its late verdict only, which needs its id, not its
                # payload: no retain() (that would copy the payload, ~1.5 KB per held packet).
                verdict = self.receive(parsed, self.clock(), nfpkt)
            mark = self.after(nfpkt)
        except Exception:  # noqa: BLE001 - the packet loop must never die on one packet
            stats.errors += 1
            if verdict is not _HOLD:
                verdict = _ACCEPT if self.fail_open else _DROP
            # else the engine keeps the packet: its one verdict comes later, in order
        finally:
            if verdict is _ACCEPT and mark is None:
                try:
                    nfpkt.accept()
                except Exception:  # noqa: BLE001
                    stats.late_verdict_errors += 1
            else:
                self._verdict(nfpkt, verdict, mark)
            if self.observe is not None:
                label = _LABELS.get(verdict)
                try:
                    self.observe(direction, label if label is not None else str(verdict),
                                 _perf_counter() - started)
                except Exception:  # noqa: BLE001 - metrics never stop the packet loop
                    stats.errors += 1

    def _verdict(self, nfpkt: Any, verdict: Verdict, mark: int | None) -> None:
        try:
            if verdict is Verdict.HOLD:
                return
            if verdict is Verdict.ACCEPT:
                if mark is not None:
                    nfpkt.set_mark(mark)
                nfpkt.accept()
            elif verdict is Verdict.REJECT:
                # back through the rules with the BLOCK bit: the kernel stores it on the
                # connection and its REJECT rule answers the sender (reset / unreachable)
                if mark is not None:
                    nfpkt.set_mark(mark)
                    nfpkt.repeat()
                else:
                    nfpkt.drop()
            else:
                nfpkt.drop()
        except Exception:  # noqa: BLE001
            self.stats.late_verdict_errors += 1


def late_verdict(nfpkt: Any, accept: bool, stats: QueueStats) -> None:
    """The verdict for a packet the engine held earlier."""
    try:
        if accept:
            nfpkt.accept()
        else:
            nfpkt.drop()
    except Exception:  # noqa: BLE001 - e.g. the queue was rebound: the kernel dropped it already
        stats.late_verdict_errors += 1


def late_reject(nfpkt: Any, mark: int, stats: QueueStats) -> None:
    """Send a held packet back through the rules with the BLOCK mark: the kernel stores it on the
    connection and its reject rule answers the sender (port-unreachable, or a reset)."""
    try:
        nfpkt.set_mark(mark)
        nfpkt.repeat()
    except Exception:  # noqa: BLE001 - as late_verdict
        stats.late_verdict_errors += 1


# The kernel's table of bound queues (doctor and the daemon read it to see who holds a queue).
NFQUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"


@dataclass(frozen=True, slots=True)
class QueueBinding:
    """One line of /proc/net/netfilter/nfnetlink_queue (net/netfilter/nfnetlink_queue.c:
    queue number, peer portid, queued now, copy mode, copy range, dropped because the queue was
    full, dropped because the listener's socket buffer was full, id sequence, 1)."""

    queue: int
    portid: int
    waiting: int
    queue_dropped: int
    user_dropped: int


def parse_nfqueue_proc(text: str) -> dict[int, QueueBinding]:
    out: dict[int, QueueBinding] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 7 or not all(f.lstrip("-").isdigit() for f in fields[:7]):
            continue
        q, portid, waiting, _mode, _range, qdrop, udrop = (int(f) for f in fields[:7])
        out[q] = QueueBinding(q, portid, waiting, qdrop, udrop)
    return out
