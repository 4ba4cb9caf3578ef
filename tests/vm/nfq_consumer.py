"""A minimal NFQUEUE consumer for the VM checks (tests/vm/guest.py), run in the router's
namespace: binds the queue, accepts every packet, and sets a verdict mark by the cloud port
(allow -> the connmark fast path, block -> the kernel refuses the rest of the flow). Counts
upstream packets per cloud port in a JSON file, whose first write says it is bound.

argv: QUEUE MASK ALLOW BLOCK SPEAKER_IP PLAIN_PORTS ALLOW_PORTS BLOCK_PORTS STATE_FILE
"""

from __future__ import annotations

import json
import os
import sys

from netfilterqueue import NetfilterQueue


def main() -> None:
    q, mask, allow, block = (int(a) for a in sys.argv[1:5])
    speaker = bytes(int(x) for x in sys.argv[5].split("."))
    ports = [{int(p) for p in a.split(",") if p} for a in sys.argv[6:9]]
    state = sys.argv[9]
    counts: dict[str, dict[int, int]] = {"up": {}, "down": {}}

    def save() -> None:
        tmp = state + ".tmp"
        with open(tmp, "w") as f:
            json.dump(counts, f)
        os.replace(tmp, state)

    def verdict(pkt) -> None:
        data = pkt.get_payload()
        ihl = (data[0] & 15) * 4
        up = data[12:16] == speaker
        port = 0
        if data[9] in (6, 17) and len(data) >= ihl + 4:
            port = int.from_bytes(data[ihl + 2:ihl + 4] if up else data[ihl:ihl + 2], "big")
        side = counts["up" if up else "down"]
        side[port] = side.get(port, 0) + 1
        if up and port in ports[1]:
            pkt.set_mark((pkt.get_mark() & ~mask & 0xFFFFFFFF) | allow)
        elif up and port in ports[2]:
            pkt.set_mark((pkt.get_mark() & ~mask & 0xFFFFFFFF) | block)
        pkt.accept()
        save()

    nfq = NetfilterQueue()
    nfq.bind(q, verdict)
    save()
    print(f"bound queue {q}", flush=True)
    try:
        nfq.run()
    finally:
        nfq.unbind()


if __name__ == "__main__":
    main()
