"""Issue 13's live acceptance: captured voice connections replayed through a real `hushgate run`.

A speaker replays labelled uploads and the non-audio bursts around them on the same connection
(hushsim/timeline.py: the captures' voice connections, idle gaps shortened to 1.5 s) through
the relay (`tcp_hold = "relay"`, strict), under each sender setup: Linux defaults,
tcp_early_retrans=0, initcwnd 4, tcp_slow_start_after_idle=0, bbr, 20 ms of WAN delay each way
(netem, or where the kernel has no sch_netem an NFQUEUE delay line in the wan namespace).
Each setup replays a different subset (one Echo Dot PCM, one HomePod and one 2018 Echo upload,
rotating through the captures; ~25 s). A decider allows every pending upload at once. The cloud's
own counters say, per setup: every labelled upload pending, 0 bytes of upload audio at the cloud
before the decision, at most 1 in 20 non-audio bursts prompted, non-audio bursts at the cloud
within 0.3 s of their last byte (p95), pending within 0.5 s of the upload's first byte (p95).
How the figures are read: tests/e2e/replaykit.py. All of it: bench/replay_live.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hushsim import timeline as tl
from hushsim.profiles import default_captures_dir
from hushsim.topology import Topology
from tests.ci import missing_or_fail
from tests.e2e import replaykit as rk
from tests.e2e.guardkit import MakeGuard, device, record

QUEUE = 29  # this module's NFQUEUE number (other modules use their own)
RELAY_PORT = 7419
MESSAGES_PER_UPLOAD = 8  # non-audio bursts replayed with each upload (nearest ones)


@pytest.fixture(scope="module")
def connections() -> list[tl.Connection]:
    captures = default_captures_dir()
    if captures is None:
        missing_or_fail("../shared/captures is not there (set HUSHGATE_CAPTURES)")
    assert captures is not None
    conns = tl.voice_connections(Path(captures))
    families = {c.family for c in conns}
    assert {"echo-2018", "echo-dot-pcm", "homepod"} <= families, families
    return conns


@pytest.mark.parametrize("setup", rk.SETUPS)
def test_replayed_voice_connections_meet_the_targets(
    topology: Topology, guards: MakeGuard, connections: list[tl.Connection], setup: str
) -> None:
    missing = rk.check_setup_tools()
    if missing:
        missing_or_fail(f"missing commands: {', '.join(missing)} (apt-get install iproute2 procps)")
    turn = rk.SETUPS.index(setup)
    selection = tl.rotating_subset(connections, turn, messages=MESSAGES_PER_UPLOAD)
    g = guards(devices=[device(topology, "echo"), device(topology, "homepod")],
               tcp_hold="relay", relay_port=RELAY_PORT)
    t0 = time.monotonic()
    try:
        fig = rk.run_setup(g, topology, setup, selection)
    except rk.SetupUnavailable as exc:
        missing_or_fail(str(exc))
    wall = time.monotonic() - t0
    print(f"\n[{setup}] {fig.summary()}\n{fig.details()}")
    record("replay_live", **fig.row(), test_wall_s=round(wall, 1))
    failures = fig.failures()
    assert not failures, (
        f"[{setup}] " + "\n".join(failures) + f"\nfigures: {fig.summary()}\n{fig.details()}\n"
        + g.log_tail(25))
