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
from typing import Any

from guard.engine import Verdict
from guard.packet import Malformed, Packet, parse_ip

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
    return ":".join(f"{b:02x}" for b in hw[:6])


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
        started = time.perf_counter()
        verdict = Verdict.DROP if not self.fail_open else Verdict.ACCEPT
        mark: int | None = None
        direction = "up"
        try:
            self.stats.packets += 1
            # the whole payload (<= MTU): a ClientHello that spans segments is named too
            parsed = parse_ip(nfpkt.get_payload(), mac_of(nfpkt.get_hw()), keep_payload=2048)
            if isinstance(parsed, Malformed) or parsed is None:
                self.stats.malformed += 1
                # a packet we cannot read is never let through in fail-closed mode
                verdict = Verdict.ACCEPT if self.fail_open else Verdict.DROP
                self.receive(parsed, self.clock(), None)  # counted by the engine
            else:
                if parsed.src_mac is None:
                    direction = "down"
                verdict = self.receive(parsed, self.clock(), nfpkt)
                if verdict is Verdict.HOLD:
                    nfpkt.retain()
            mark = self.after(nfpkt)
        except Exception:  # noqa: BLE001 - the packet loop must never die on one packet
            self.stats.errors += 1
            verdict = Verdict.ACCEPT if self.fail_open else Verdict.DROP
        finally:
            self._verdict(nfpkt, verdict, mark)
            elapsed = time.perf_counter() - started
            if self.observe is not None:
                self.observe(direction, verdict.value, elapsed)

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
