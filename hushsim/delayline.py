"""A fixed delay for every packet of a namespace's link, for kernels without `sch_netem`.

Rules of this module: a test tool, run inside the simulated world's namespaces only. It binds an
NFQUEUE (the rules that feed it are the caller's: e.g. mangle PREROUTING -i eth0 and OUTPUT -o eth0
in the wan namespace give 20 ms each way on the WAN link) and gives each packet its ACCEPT verdict
`--delay-ms` after it arrived, in arrival order (a constant delay keeps the order, as netem's does
without jitter). Bounded: it exits after `--max-seconds`; beyond `--max-held` waiting packets it
accepts at once (and counts them). Prints "ready" once bound, then one JSON line of counters on exit.

    python -m hushsim.delayline --queue N --delay-ms 20 [--max-seconds 900]
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import sys
import time
from collections import deque
from typing import Any

DEFAULT_MAX_SECONDS = 900.0
MAX_HELD = 100_000


class _Stop(Exception):
    pass


def _on_signal(_signum: int, _frame: Any) -> None:
    raise _Stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hushsim.delayline",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--queue", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    ap.add_argument("--max-held", type=int, default=MAX_HELD)
    args = ap.parse_args(argv)
    from netfilterqueue import COPY_META, NetfilterQueue

    delay = max(0.0, args.delay_ms / 1000.0)
    held: deque[tuple[float, Any]] = deque()
    counters = {"packets": 0, "overflow": 0, "late_ms_max": 0.0}

    def on_packet(pkt: Any) -> None:
        counters["packets"] += 1
        if len(held) >= args.max_held:
            counters["overflow"] += 1
            pkt.accept()
            return
        held.append((time.monotonic() + delay, pkt))

    queue = NetfilterQueue()
    queue.bind(args.queue, on_packet, max_len=65536, mode=COPY_META)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    fd = queue.get_fd()
    end = time.monotonic() + args.max_seconds
    print("ready", flush=True)
    try:
        # Bound: one pass per packet batch or per timeout (<= 50 ms) until max_seconds.
        while time.monotonic() < end:
            now = time.monotonic()
            while held and held[0][0] <= now:
                due, pkt = held.popleft()
                counters["late_ms_max"] = max(counters["late_ms_max"], (now - due) * 1000)
                pkt.accept()
            wait = min(0.05, held[0][0] - now) if held else 0.05
            readable, _, _ = select.select([fd], [], [], max(0.0, wait))
            if readable:
                queue.run(block=False)
    except _Stop:
        pass
    finally:
        for _, pkt in held:  # whatever waits goes on (the caller removed the rules first)
            try:
                pkt.accept()
            except (OSError, RuntimeError):
                pass
        queue.unbind()
        counters["late_ms_max"] = round(counters["late_ms_max"], 3)
        print(json.dumps(counters), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
