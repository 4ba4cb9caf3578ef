"""Issue 13's live acceptance, in full: every labelled upload and every non-audio burst of the
captures' voice connections replayed through a real `hushgate run`, under every sender setup.

Rules of this file: like bench/soak.py (namespaces it creates, prefix `hgr`, addresses in
198.18.0.0/15 and 2001:2::/48, every process killed by PID, namespaces deleted on any exit, a
hard time bound). The harness is tests/e2e/replaykit.py (shared with
tests/e2e/test_replay_live.py, which replays a rotating subset per setup in CI); the replays come
from hushsim/timeline.py (../shared/captures, idle gaps between bursts shortened to 1.5 s).

    python bench/replay_live.py [--setups defaults,bbr,...] [--only TEXT] [--max-gap 1.5]
                                [--details] [--json FILE]

Prints one table: per setup, labelled uploads pending / total, bytes from an upload's first byte
at the cloud before its decision (in brackets: of records larger than a control record), non-audio
bursts prompted / total, release delay of non-audio bursts (cloud has the last byte - speaker wrote
it) p50/p95/max, time to pending (daemon's judgement - the upload's first byte written)
p50/p95/max (in brackets: p95 from the upload's first data record). Targets: every upload pending,
0 B, at most 1 in 20 prompted, release p95 <= 0.3 s, pending p95 <= 0.5 s. About 7 minutes per
setup (400 s of replay); exit status 1 when a setup misses a target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hushsim import timeline as tl  # noqa: E402
from hushsim.profiles import default_captures_dir  # noqa: E402
from hushsim.topology import Topology, cleanup_stale  # noqa: E402
from tests.e2e import replaykit as rk  # noqa: E402
from tests.e2e.guardkit import Guard, device  # noqa: E402

PREFIX = "hgr"
QUEUE = 33
RELAY_PORT = 7433
SPEAKERS = (
    ("echo", "198.18.10.10", "2001:2:0:10::10", "68:db:f5:90:19:64"),
    ("homepod", "198.18.10.11", "2001:2:0:10::11", "d4:a3:3d:6b:1e:97"),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setups", default=",".join(rk.SETUPS),
                    help=f"comma-separated, of: {', '.join(rk.SETUPS)}")
    ap.add_argument("--only", default="", help="only captures whose name contains this")
    ap.add_argument("--shared", type=Path, default=None, help="captures folder")
    ap.add_argument("--max-gap", type=float, default=tl.MAX_GAP_S,
                    help="idle time between replayed bursts shortened to this (s)")
    ap.add_argument("--details", action="store_true", help="one line per burst after each setup")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here (JSON lines)")
    args = ap.parse_args(argv)
    setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in setups if s not in rk.SETUPS]
    if unknown:
        ap.error(f"unknown setups {unknown}; one of {', '.join(rk.SETUPS)}")
    captures = args.shared or default_captures_dir()
    if captures is None:
        print("replay_live: no ../shared/captures (use --shared)", file=sys.stderr)
        return 2
    conns = [c for c in tl.voice_connections(Path(captures)) if args.only in c.capture]
    selection = tl.everything(conns, args.max_gap)
    lanes = rk.lanes_of(selection)
    longest = max(sum(r.replay.duration_s for r in runs) for runs in lanes.values())
    print(f"replay_live: {len(conns)} voice connections, {selection.uploads} labelled uploads, "
          f"{selection.messages} non-audio bursts; {selection.duration_s:.0f} s of replay "
          f"({longest:.0f} s for the longest lane) per setup, {len(setups)} setups", flush=True)
    bound = len(setups) * (longest + 120) + 120
    cleanup_stale(PREFIX)
    rows: list[rk.Figures] = []
    t_start = time.monotonic()
    with Topology(speakers=SPEAKERS, prefix=PREFIX, lifetime_s=bound + 60) as topo:
        for setup in setups:
            if time.monotonic() - t_start > bound:
                print(f"replay_live: time bound ({bound:.0f} s) reached", file=sys.stderr)
                break
            devices = [device(topo, "echo"), device(topo, "homepod")]
            with Guard(topo, devices, queue=QUEUE, tcp_hold="relay",
                       relay_port=RELAY_PORT) as g:
                try:
                    fig = rk.run_setup(g, topo, setup, selection,
                                       say=lambda m: print(m, flush=True))
                except rk.SetupUnavailable as exc:
                    print(f"[{setup}] unavailable: {exc}", flush=True)
                    continue
                status = g.cli_json("status")
            rows.append(fig)
            print(f"[{setup}] {fig.summary()}", flush=True)
            relay = status.get("relay") or {}
            print(f"[{setup}] relay counters: "
                  + json.dumps({k: v for k, v in relay.items() if isinstance(v, int | float)}),
                  flush=True)
            if args.details:
                print(fig.details(), flush=True)
            for line in fig.failures():
                print(f"[{setup}] MISSED: {line[:2000]}", flush=True)
            if args.json:
                with args.json.open("a") as fh:
                    fh.write(rk.dump(fig) + "\n")
    print()
    print(rk.table(rows))
    print(f"\nwall time {time.monotonic() - t_start:.0f} s")
    return 0 if rows and not any(r.failures() for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
