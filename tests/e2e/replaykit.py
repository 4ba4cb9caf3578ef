"""Replay whole captured voice connections through a live guard and measure what the cloud got.

Shared by tests/e2e/test_replay_live.py (a rotating subset per sender setup, in CI) and
bench/replay_live.py (every burst, every setup). The replays come from hushsim/timeline.py.

How a run goes: replays are grouped in lanes, one per LAN speaker (the Echo's replays one after
another on the echo host, the HomePod's on the homepod host, the two lanes at the same time, as
in a house with two speakers). Each replay is one speaker connection through the relay, writing
its profile with `--send-times`. A decider thread polls the daemon's `pending` every 20 ms over
the control socket (the request `hushgate pending --json` sends; a CLI process per poll would
take ~0.1 s of a shared CPU each time) and on each new pending upload records when it saw it, the
daemon's `started`, and the cloud's application bytes of that connection, then allows it (the
request of `hushgate allow ID`), so the replay goes on on the same connection. Afterwards the
cloud's per-read timeline (time, bytes so far), the speaker's send times and the exact plaintext
offsets of each record (timeline.plaintext_spans) say, burst by burst:
  - which burst each pending upload held (the first byte the cloud did not have when the upload
    was decided: while an upload is pending nothing behind it reaches the cloud);
  - for labelled uploads: pending or not, when (the daemon's `started` minus when the upload's
    first record was written), and how many bytes from the upload's first byte on were at the
    cloud before the decision (the leak);
  - for other bursts: prompted or not, and when the cloud had its last byte minus when the
    speaker wrote it (the release delay).
Every wait is bounded; every process is the Guard's (killed by PID when it closes).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from guard.core.detector import StreamConfig
from guard.shell.control import ControlError, request
from hushsim import timeline as tl
from hushsim.topology import GW_LAN_V4, GW_LAN_V6, WAN_IF, Topology, TopologyError
from tests.e2e.guardkit import Guard, cloud_conn_since

VOICE_AMAZON = "bob-dispatch-prod-na.amazon.com"
VOICE_APPLE = "guzzoni.apple.com"
POLL_S = 0.02  # the decider's poll interval
# The decider reads the cloud's count this long after the daemon's judgement, then allows: what
# the relay released before the upload went pending may still be on the wire (20 ms of WAN delay)
SETTLE_S = 0.1

# The sender setups of issue 13's live acceptance, applied in the speakers' namespaces (the WAN
# delay on the router's uplink and the cloud's side of it).
SETUPS: tuple[str, ...] = (
    "defaults",
    "early_retrans_0",
    "initcwnd_4",
    "slow_start_after_idle_0",
    "bbr",
    "wan_delay_20ms",
)
WAN_DELAY = "20ms"
DELAY_QUEUE = 4242  # the delay line's NFQUEUE number, in the wan namespace (no guard there)

# Records this small carry a control frame, never audio (the stream judge's own bound); the
# figures say how much of a leak, and of the time to pending, is due to them.
CONTROL_RECORD_BYTES = StreamConfig().control_record_bytes

# Targets (issue 13)
MAX_PROMPT_RATIO = 1 / 20
RELEASE_P95_S = 0.3
PENDING_P95_S = 0.5


class SetupUnavailable(RuntimeError):
    """The kernel cannot do this sender setup (bbr missing, no netem): the caller skips or fails."""


def _host_for(conn: tl.Connection) -> tuple[str, str]:
    """(LAN host, SNI host name) a connection of this family is replayed from and to."""
    if conn.family == "homepod":
        return "homepod", VOICE_APPLE
    return "echo", VOICE_AMAZON


# --- sender setups ---------------------------------------------------------------------------


def _sysctl_get(topo: Topology, ns: str, key: str) -> str:
    return topo.run(ns, "sysctl", "-n", key).stdout.strip()


@contextlib.contextmanager
def sender_setup(topo: Topology, name: str, hosts: Sequence[str] = ("echo", "homepod")
                 ) -> Iterator[str]:
    """Apply sender setup `name` (one of SETUPS) to LAN hosts `hosts` (and, for the WAN delay,
    to the router's uplink and the cloud's side of it); undo it on exit. Yields a description
    of what was set."""
    undo: list[Callable[[], object]] = []

    def sysctl(key: str, value: str) -> str:
        for ns in hosts:
            old = _sysctl_get(topo, ns, key)
            topo.run(ns, "sysctl", "-q", "-w", f"{key}={value}")
            undo.append(_later(topo, ns, "sysctl", "-q", "-w", f"{key}={old}"))
        return f"{key}={value} in {', '.join(hosts)}"

    try:
        if name == "defaults":
            what = "Linux defaults"
        elif name == "early_retrans_0":
            what = sysctl("net.ipv4.tcp_early_retrans", "0")
        elif name == "slow_start_after_idle_0":
            what = sysctl("net.ipv4.tcp_slow_start_after_idle", "0")
        elif name == "initcwnd_4":
            for ns in hosts:
                for fam, gw in (("-4", GW_LAN_V4), ("-6", GW_LAN_V6)):
                    topo.run(ns, "ip", fam, "route", "change", "default", "via", gw, "dev",
                             "eth0", "initcwnd", "4")
                    undo.append(_later(topo, ns, "ip", fam, "route", "change", "default",
                                       "via", gw, "dev", "eth0"))
            what = f"initcwnd 4 on the default routes of {', '.join(hosts)}"
        elif name == "bbr":
            avail = _sysctl_get(topo, hosts[0], "net.ipv4.tcp_available_congestion_control")
            if "bbr" not in avail.split():
                topo.run(hosts[0], "modprobe", "tcp_bbr", check=False)
                avail = _sysctl_get(topo, hosts[0], "net.ipv4.tcp_available_congestion_control")
            if "bbr" not in avail.split():
                raise SetupUnavailable(
                    f"bbr is not available (tcp_available_congestion_control: {avail}; "
                    "modprobe tcp_bbr failed): the kernel needs CONFIG_TCP_CONG_BBR")
            what = sysctl("net.ipv4.tcp_congestion_control", "bbr")
        elif name == "wan_delay_20ms":
            what = _wan_delay(topo, undo)
            rtt = wan_rtt_ms(topo)
            if rtt < 2 * float(WAN_DELAY.removesuffix("ms")) * 0.9:
                raise RuntimeError(f"{what}: the router's RTT to the cloud is {rtt:.1f} ms")
            what += f"; router-cloud RTT {rtt:.1f} ms"
        else:
            raise ValueError(f"unknown sender setup {name!r}; one of {', '.join(SETUPS)}")
        yield what
    finally:
        for step in reversed(undo):
            try:
                step()
            except (OSError, TopologyError, subprocess.SubprocessError):
                pass


def _netem_works(topo: Topology) -> bool:
    res = topo.run("wan", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                   check=False)
    if res.returncode == 0:
        topo.run("wan", "tc", "qdisc", "del", "dev", "lo", "root", check=False)
    return res.returncode == 0


def _later(topo: Topology, ns: str, *cmd: str) -> Callable[[], object]:
    """`cmd` in `ns`, to run when a setup is undone (never raising on a failing exit)."""
    return lambda: topo.run(ns, *cmd, check=False)


def _wan_delay(topo: Topology, undo: list[Callable[[], object]]) -> str:
    """WAN_DELAY each way between the router and the cloud: netem on gw's uplink and the
    cloud's side of it; on a kernel without sch_netem, a delay line (hushsim.delayline, an
    NFQUEUE whose verdicts come WAN_DELAY late) on the cloud's side, both directions."""
    if _netem_works(topo):
        for ns, dev in (("gw", WAN_IF), ("wan", "eth0")):
            topo.run(ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", WAN_DELAY)
            undo.append(_later(topo, ns, "tc", "qdisc", "del", "dev", dev, "root"))
        return f"netem delay {WAN_DELAY} on gw {WAN_IF} and wan eth0 (RTT +40 ms)"
    delay_ms = WAN_DELAY.removesuffix("ms")
    proc = topo.popen("wan", sys.executable, "-m", "hushsim.delayline", "--queue",
                      str(DELAY_QUEUE), "--delay-ms", delay_ms, "--max-seconds", "900")
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10.0)
    line = proc.stdout.readline().strip() if ready else ""
    if line != "ready":
        proc.kill()
        raise SetupUnavailable(f"no netem (sch_netem) and the NFQUEUE delay line did not start: "
                               f"{line!r} {proc.stderr.read()[-500:] if proc.stderr else ''}")

    def stop_delayline() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
    undo.append(stop_delayline)
    for tool in (topo.iptables, topo.ip6tables):
        for chain, where in (("PREROUTING", "-i"), ("OUTPUT", "-o")):
            rule = (chain, where, "eth0", "-j", "NFQUEUE", "--queue-num", str(DELAY_QUEUE))
            topo.run("wan", tool, "-t", "mangle", "-A", *rule)
            undo.append(_later(topo, "wan", tool, "-t", "mangle", "-D", *rule))
    return (f"{WAN_DELAY} each way on the wan side of the uplink: an NFQUEUE delay line "
            "(hushsim/delayline.py; this kernel has no sch_netem)")


def wan_rtt_ms(topo: Topology, host: str = VOICE_AMAZON) -> float:
    """The smallest of 5 TCP connect times from the router to the cloud's `host`:443 (ms)."""
    addr = topo.hosts[host][0]

    def connects() -> float:
        best = float("inf")
        for _ in range(5):
            with socket.socket() as s:
                s.settimeout(2.0)
                t = time.perf_counter()
                s.connect((addr, 443))
                best = min(best, time.perf_counter() - t)
        return best * 1000
    return float(topo.call_in("gw", connects, timeout_s=15.0))


def check_setup_tools() -> list[str]:
    """Commands the setups need that are missing."""
    return [c for c in ("tc", "sysctl") if shutil.which(c) is None]


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Decision:
    """One pending upload the decider saw (and allowed)."""

    id: int
    device: str
    remote: str
    started: float  # the daemon's time of the judgement (`pending`'s "started")
    seen: float  # when the decider's poll returned it
    cloud_bytes: int | None  # the cloud's app bytes on the lane's connection then
    conn_id: int | None
    lane: str | None
    held_bytes: int
    allow_sent: float | None = None  # when the allow request went out
    allowed: float | None = None  # when its answer came back (the kept bytes are out by then)
    error: str | None = None


@dataclass
class ReplayRun:
    """One replay's raw results."""

    replay: tl.Replay
    host: str  # LAN host
    sni: str
    since: float = 0.0
    conn_id: int | None = None
    speaker: dict[str, Any] = field(default_factory=dict)
    cloud: dict[str, Any] = field(default_factory=dict)  # the cloud's record, with timeline
    error: str | None = None


class Decider(threading.Thread):
    """Polls `pending` every POLL_S; records each new pending upload and allows it."""

    def __init__(self, guard: Guard, topo: Topology) -> None:
        super().__init__(daemon=True, name="replay-decider")
        self.guard = guard
        self.topo = topo
        self.stop = threading.Event()
        self.decisions: list[Decision] = []
        self.errors: list[str] = []
        self.polls = 0
        self._lanes: dict[str, tuple[str, int]] = {}  # device -> (lane name, cloud conn id)
        self._lock = threading.Lock()

    def register(self, device: str, lane: str, conn_id: int) -> None:
        with self._lock:
            self._lanes[device] = (lane, conn_id)

    def _cloud_bytes(self, conn_id: int) -> int | None:
        assert self.topo.cloud is not None
        for c in self.topo.cloud.stats()["tcp"]:
            if c["id"] == conn_id:
                return int(c["app_bytes"])
        return None

    def run(self) -> None:
        seen: set[int] = set()
        path = str(self.guard.socket)
        # Bound: the owner sets `stop`; each pass sleeps POLL_S or does a request (timeout 5 s).
        for _ in range(100_000_000):
            if self.stop.is_set():
                break
            try:
                pending = request(path, {"cmd": "pending"}, timeout_s=5.0)
                self.polls += 1
            except ControlError as exc:
                self.errors.append(f"pending: {exc}")
                if not self.guard.running:
                    break
                time.sleep(0.2)
                continue
            now = time.time()
            for p in pending:
                pid = int(p["id"])
                if pid in seen:
                    continue
                seen.add(pid)
                with self._lock:
                    lane, conn_id = self._lanes.get(p["device"], (None, None))
                d = Decision(id=pid, device=p["device"], remote=p["remote"],
                             started=float(p["started"]), seen=now, cloud_bytes=None,
                             conn_id=conn_id, lane=lane, held_bytes=int(p["held_bytes"] or 0))
                try:
                    # nothing of the connection passes while this upload is pending, so the
                    # cloud's count (once what was released before is off the wire) is what
                    # passed before the decision
                    settle = d.started + SETTLE_S - time.time()
                    if 0 < settle <= SETTLE_S:
                        time.sleep(settle)
                    d.cloud_bytes = self._cloud_bytes(conn_id) if conn_id is not None else None
                    d.allow_sent = time.time()
                    request(path, {"cmd": "decide", "id": pid, "verb": "allow",
                                   "scope": "once", "duration_s": None, "by": "replay-test"},
                            timeout_s=5.0)
                    d.allowed = time.time()
                except (ControlError, OSError, RuntimeError) as exc:
                    d.error = str(exc)
                self.decisions.append(d)
            self.stop.wait(POLL_S)


def lanes_of(selection: tl.Selection) -> dict[str, list[ReplayRun]]:
    """Replays grouped by LAN host, in selection order."""
    lanes: dict[str, list[ReplayRun]] = {}
    for replay in selection.replays:
        host, sni = _host_for(replay.conn)
        lanes.setdefault(host, []).append(ReplayRun(replay, host, sni))
    return lanes


def _play(guard: Guard, topo: Topology, run: ReplayRun, decider: Decider,
          say: Callable[[str], None]) -> None:
    profile_path = guard.dir / f"replay-{run.host}-{int(time.time() * 1000)}.json"
    profile_path.write_text(run.replay.profile.to_json())
    duration = run.replay.duration_s
    run.since = time.time()
    sp = guard.speaker(run.host, "--host", run.sni, "-4", "--max-seconds", f"{duration + 60:.0f}",
                       "upload", "--profile", str(profile_path), "--send-times", wait_file=True)
    sp.ready(timeout_s=15.0)
    conn = cloud_conn_since(topo, run.sni, run.since, timeout_s=10.0, handshake=True)
    run.conn_id = int(conn["id"])
    decider.register(run.host, run.host, run.conn_id)
    sp.go()
    run.speaker = sp.result(timeout_s=duration + 90)
    sent = int(run.speaker.get("bytes_sent") or 0)
    assert topo.cloud is not None
    # everything allowed reaches the cloud: wait (bounded) for the last byte, then read the
    # connection's timeline
    with contextlib.suppress(TimeoutError):
        topo.cloud.wait_for(lambda s: any(c["id"] == run.conn_id and c["app_bytes"] >= sent
                                          for c in s["tcp"]), timeout_s=10.0)
    run.cloud = next(c for c in topo.cloud.stats(timeline=True)["tcp"] if c["id"] == run.conn_id)
    say(f"  {run.replay.conn.name}: {len(run.replay.bursts)} bursts, {sent} B sent, "
        f"{run.cloud['app_bytes']} B at the cloud, speaker error {run.speaker.get('error')}")


def play(guard: Guard, topo: Topology, selection: tl.Selection, *,
         say: Callable[[str], None] = print, time_bound_s: float | None = None
         ) -> tuple[list[ReplayRun], list[Decision], Decider]:
    """Replay `selection` through `guard` (lanes in parallel, replays of a lane in order) while
    the decider allows every pending upload. Returns the runs, the decisions and the decider."""
    lanes = lanes_of(selection)
    decider = Decider(guard, topo)
    decider.start()
    errors: dict[str, str] = {}

    def lane(host: str, runs: list[ReplayRun]) -> None:
        for run in runs:
            try:
                _play(guard, topo, run, decider, say)
            except Exception as exc:  # noqa: BLE001 - reported with the figures
                run.error = f"{type(exc).__name__}: {exc}"
                errors[host] = run.error
                say(f"  {run.replay.conn.name}: {run.error}")

    longest = max((sum(r.replay.duration_s + 20 for r in runs) for runs in lanes.values()),
                  default=0.0)
    bound = time_bound_s if time_bound_s is not None else longest + 120
    threads = [threading.Thread(target=lane, args=(h, rs), daemon=True, name=f"lane-{h}")
               for h, rs in lanes.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + bound
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    # let a last pending upload (a burst judged at the very end) be seen
    time.sleep(0.3)
    decider.stop.set()
    decider.join(10.0)
    if stuck:
        for runs in lanes.values():
            for r in runs:
                if not r.speaker and r.error is None:
                    r.error = f"lane did not finish within {bound:.0f} s"
    runs = [r for rs in lanes.values() for r in rs]
    return runs, list(decider.decisions), decider


# --- figures ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (with 14 samples the p95 is the largest)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


@dataclass
class BurstResult:
    conn: str
    label: str
    audio: bool
    records: int
    wire_bytes: int
    duration_s: float
    decisions: list[int] = field(default_factory=list)  # ids of pending uploads that held it
    pending_after_s: float | None = None  # daemon's started - first byte written (audio)
    seen_after_s: float | None = None  # decider saw it - first byte written (audio)
    # daemon's started - first record larger than a control record written (audio)
    pending_after_data_s: float | None = None
    leaked_bytes: int = 0  # audio: bytes from the upload's first byte at the cloud before
    leaked_data_bytes: int = 0  # of those, bytes of records larger than a control record
    release_s: float | None = None  # non-audio: cloud had the last byte - written
    note: str = ""


@dataclass
class Figures:
    setup: str
    uploads: int = 0
    uploads_pending: int = 0
    leaked_bytes: int = 0
    leaked_data_bytes: int = 0
    messages: int = 0
    messages_prompted: int = 0
    release_p50_s: float | None = None
    release_p95_s: float | None = None
    release_max_s: float | None = None
    pending_p50_s: float | None = None
    pending_p95_s: float | None = None
    pending_max_s: float | None = None
    seen_p95_s: float | None = None
    pending_data_p95_s: float | None = None
    extra_prompts_on_uploads: int = 0
    unattributed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # replay errors, undelivered bytes
    bursts: list[BurstResult] = field(default_factory=list)
    wall_s: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # runs, decisions, polls

    def failures(self) -> list[str]:
        """What misses issue 13's targets (empty: all met)."""
        out = list(self.problems)
        if self.uploads_pending < self.uploads:
            missed = [b.label for b in self.bursts if b.audio and not b.decisions]
            out.append(f"{self.uploads - self.uploads_pending} of {self.uploads} labelled "
                       f"uploads never pending: {missed}")
        # What may pass before the decision: records of at most CONTROL_RECORD_BYTES that
        # come while nothing is held (an HTTP/2 frame header in TLS: no room for a codec frame;
        # a HomePod opens each activation with one, 0.18-0.30 s before its audio). Any byte of
        # a larger record of the upload at the cloud before the decision is a leak.
        if self.leaked_data_bytes:
            leaks = [f"{b.label}: {b.leaked_data_bytes} B ({b.note})" for b in self.bursts
                     if b.leaked_data_bytes]
            out.append(f"{self.leaked_data_bytes} B of upload audio at the cloud before the "
                       f"decision: {leaks}")
        if self.messages_prompted > self.messages * MAX_PROMPT_RATIO:
            prompted = [f"{b.conn} {b.label} ({b.records} rec, {b.wire_bytes} B, "
                        f"{b.duration_s:.2f} s)" for b in self.bursts
                        if not b.audio and b.decisions]
            out.append(f"{self.messages_prompted} of {self.messages} non-audio bursts prompted "
                       f"(at most 1 in 20): {prompted}")
        if self.release_p95_s is None or self.release_p95_s > RELEASE_P95_S:
            slow = sorted((b for b in self.bursts if not b.audio),
                          key=lambda b: -(b.release_s if b.release_s is not None else 1e9))[:4]
            out.append(f"release p95 {self.release_p95_s} s > {RELEASE_P95_S} s; slowest: "
                       + ", ".join(f"{b.conn} {b.label} {b.release_s} s ({b.records} rec, "
                                   f"{b.wire_bytes} B{', ' + b.note if b.note else ''})"
                                   for b in slow))
        # Pending is timed from the upload's first record that can carry audio (a control
        # record before it, as above, is not the upload's start); pending_p95_s, from the very
        # first byte, is reported beside it.
        if self.pending_data_p95_s is None or self.pending_data_p95_s > PENDING_P95_S:
            slow = sorted((b for b in self.bursts if b.audio),
                          key=lambda b: -(b.pending_after_data_s or 1e9))[:4]
            out.append(f"pending p95 {self.pending_data_p95_s} s > {PENDING_P95_S} s; slowest: "
                       + ", ".join(f"{b.label} {b.pending_after_data_s} s" for b in slow))
        return out

    def row(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)
        return {
            "setup": self.setup,
            "uploads_pending": f"{self.uploads_pending}/{self.uploads}",
            "leaked_bytes": self.leaked_bytes,
            "leaked_data_bytes": self.leaked_data_bytes,
            "prompted": f"{self.messages_prompted}/{self.messages}",
            "release_p50_s": r(self.release_p50_s),
            "release_p95_s": r(self.release_p95_s),
            "release_max_s": r(self.release_max_s),
            "pending_p50_s": r(self.pending_p50_s),
            "pending_p95_s": r(self.pending_p95_s),
            "pending_max_s": r(self.pending_max_s),
            "seen_p95_s": r(self.seen_p95_s),
            "pending_data_p95_s": r(self.pending_data_p95_s),
            "extra_prompts_on_uploads": self.extra_prompts_on_uploads,
            "wall_s": round(self.wall_s, 1),
        }

    def summary(self) -> str:
        row = self.row()
        return ", ".join(f"{k} {v}" for k, v in row.items())

    def details(self) -> str:
        """One line per burst (for a failing run's message and the bench's --details)."""
        lines = []
        for b in self.bursts:
            kind = "AUDIO" if b.audio else "other"
            what = (f"pending +{b.pending_after_s} s (+{b.pending_after_data_s} s after the "
                    f"first data record), leak {b.leaked_bytes} B" if b.audio
                    else f"release {b.release_s} s")
            lines.append(f"    {b.conn:58} {b.label[-40:]:40} {kind} {b.records:4} rec "
                         f"{b.wire_bytes:7} B {b.duration_s:5.2f} s  {what}"
                         f"{'  PROMPTED ' + str(b.decisions) if b.decisions and not b.audio else ''}"
                         f"{'  ' + b.note if b.note else ''}")
        return "\n".join(lines)


def _time_reached(timeline: Sequence[Sequence[float]], offset: int) -> float | None:
    """When the cloud's app bytes first reached `offset` (timeline: (time, bytes so far))."""
    counts = [int(n) for _, n in timeline]
    k = bisect.bisect_left(counts, offset)
    return float(timeline[k][0]) if k < len(timeline) else None


def figures(setup: str, runs: Sequence[ReplayRun], decisions: Sequence[Decision]) -> Figures:
    """The issue's figures from raw results (see the module docstring)."""
    fig = Figures(setup)
    release: list[float] = []
    pending: list[float] = []
    seen: list[float] = []
    pending_data: list[float] = []
    by_conn: dict[int, list[Decision]] = {}
    for d in decisions:
        if d.error:
            fig.problems.append(f"allow of upload {d.id} failed: {d.error}")
        if d.conn_id is None or d.cloud_bytes is None:
            fig.unattributed.append(f"upload {d.id} on {d.device} {d.remote}: no connection")
            continue
        by_conn.setdefault(d.conn_id, []).append(d)
    attributed: set[int] = set()
    for run in runs:
        replay = run.replay
        sp = run.speaker
        results = [BurstResult(b.conn, b.label, b.audio, b.burst.records, b.burst.wire_bytes,
                               round(b.burst.duration_s, 3)) for b in replay.bursts]
        fig.bursts += results
        fig.uploads += sum(1 for b in replay.bursts if b.audio)
        fig.messages += sum(1 for b in replay.bursts if not b.audio)
        if run.error or not sp or not sp.get("uploads"):
            fig.problems.append(f"{replay.conn.name}: replay failed: {run.error or sp}")
            continue
        if sp.get("error") or sp.get("reset"):
            fig.problems.append(f"{replay.conn.name}: speaker error {sp.get('error')}, "
                                f"reset {sp.get('reset')}")
        sent_at: list[float] = sp["uploads"][0].get("sent_at") or []
        spans = tl.plaintext_spans(replay.profile.items, int(sp["record_overhead"]),
                                   None if replay.profile.records else sp.get("mss"))
        timeline = run.cloud.get("timeline") or []
        got = int(run.cloud.get("app_bytes") or 0)
        if got != int(sp.get("bytes_sent") or 0) or run.cloud.get("sha256") != sp.get("sha256"):
            fig.problems.append(f"{replay.conn.name}: the cloud has {got} B "
                                f"(sha {str(run.cloud.get('sha256'))[:12]}), the speaker sent "
                                f"{sp.get('bytes_sent')} B (sha {str(sp.get('sha256'))[:12]})")
        if spans and spans[-1][1] != int(sp.get("bytes_sent") or 0):
            fig.problems.append(f"{replay.conn.name}: plaintext map says {spans[-1][1]} B, the "
                                f"speaker sent {sp.get('bytes_sent')} B")
        starts = [s for s, _ in spans]
        item_burst = [0] * len(spans)
        for j, b in enumerate(replay.bursts):
            for k in range(b.first, b.last + 1):
                item_burst[k] = j
        # which burst each pending upload held: the first byte the cloud did not have
        for d in sorted(by_conn.get(run.conn_id or -1, []), key=lambda d: d.started):
            attributed.add(d.id)
            assert d.cloud_bytes is not None
            k = bisect.bisect_right(starts, d.cloud_bytes) - 1
            if k < 0 or d.cloud_bytes >= spans[-1][1]:
                fig.unattributed.append(f"upload {d.id}: cloud had {d.cloud_bytes} B, nothing "
                                        f"of {replay.conn.name} left to hold")
                continue
            res = results[item_burst[k]]
            res.decisions.append(d.id)
            if d.allow_sent is not None:
                at_allow = max((int(n) for t, n in timeline if t <= d.allow_sent), default=0)
                if at_allow != d.cloud_bytes:
                    fig.problems.append(
                        f"{replay.conn.name}: upload {d.id}: the cloud had {d.cloud_bytes} B "
                        f"{SETTLE_S} s after the judgement and {at_allow} B when the allow was "
                        "sent: bytes moved while the upload was pending")
            if spans[k][0] != d.cloud_bytes:
                res.note += f" upload {d.id} held from mid-record ({d.cloud_bytes} B)"
        for j, b in enumerate(replay.bursts):
            res = results[j]
            if b.audio:
                assert b.audio_first is not None
                first_byte = spans[b.audio_first][0]
                t_first = sent_at[b.audio_first] if b.audio_first < len(sent_at) else None
                mine = [d for d in by_conn.get(run.conn_id or -1, []) if d.id in res.decisions]
                if mine:
                    d0 = min(mine, key=lambda d: d.started)
                    fig.uploads_pending += 1
                    fig.extra_prompts_on_uploads += len(mine) - 1
                    assert d0.cloud_bytes is not None
                    res.leaked_bytes = max(0, d0.cloud_bytes - first_byte)
                    if res.leaked_bytes:
                        passed = [k for k in range(b.audio_first, b.last + 1)
                                  if spans[k][1] <= d0.cloud_bytes]
                        sizes = [replay.profile.items[k][1] for k in passed]
                        res.leaked_data_bytes = sum(
                            spans[k][1] - spans[k][0] for k in passed
                            if replay.profile.items[k][1] > CONTROL_RECORD_BYTES)
                        res.note += (f" passed before pending: {len(passed)} records "
                                     f"{sizes[:12]}{'...' if len(sizes) > 12 else ''}")
                    data_first = next((k for k in range(b.audio_first, b.last + 1)
                                       if replay.profile.items[k][1] > CONTROL_RECORD_BYTES),
                                      None)
                    if data_first is not None and data_first < len(sent_at):
                        res.pending_after_data_s = round(d0.started - sent_at[data_first], 4)
                        pending_data.append(d0.started - sent_at[data_first])
                    if t_first is not None:
                        res.pending_after_s = round(d0.started - t_first, 4)
                        res.seen_after_s = round(d0.seen - t_first, 4)
                        pending.append(d0.started - t_first)
                        seen.append(d0.seen - t_first)
                else:
                    end = spans[b.last][1]
                    res.leaked_bytes = max(0, min(got, end) - first_byte)
                    res.leaked_data_bytes = res.leaked_bytes
                    res.note += " never pending"
                fig.leaked_bytes += res.leaked_bytes
                fig.leaked_data_bytes += res.leaked_data_bytes
            else:
                if res.decisions:
                    fig.messages_prompted += 1
                t_last = sent_at[b.last] if b.last < len(sent_at) else None
                t_cloud = _time_reached(timeline, spans[b.last][1])
                if t_last is not None and t_cloud is not None:
                    res.release_s = round(t_cloud - t_last, 4)
                    release.append(t_cloud - t_last)
                else:
                    res.note += " never at the cloud"
                    release.append(float("inf"))
    for d in decisions:
        if d.id not in attributed and d.conn_id is not None and d.cloud_bytes is not None:
            fig.unattributed.append(f"upload {d.id} on {d.device}: connection {d.conn_id} "
                                    "not replayed")
    if fig.unattributed:
        fig.problems.append(f"pending uploads matched to no burst: {fig.unattributed}")
    fig.release_p50_s, fig.release_p95_s = percentile(release, 50), percentile(release, 95)
    fig.release_max_s = max(release) if release else None
    fig.pending_p50_s, fig.pending_p95_s = percentile(pending, 50), percentile(pending, 95)
    fig.pending_max_s = max(pending) if pending else None
    fig.seen_p95_s = percentile(seen, 95)
    fig.pending_data_p95_s = percentile(pending_data, 95)
    return fig


def run_setup(guard: Guard, topo: Topology, setup: str, selection: tl.Selection, *,
              say: Callable[[str], None] = print) -> Figures:
    """Apply `setup`, replay `selection` through the running `guard`, undo the setup; the
    figures (the raw runs and decisions in `.raw`)."""
    t0 = time.monotonic()
    with sender_setup(topo, setup) as what:
        say(f"[{setup}] {what}: {selection.uploads} uploads, {selection.messages} other bursts, "
            f"{selection.duration_s:.1f} s of replay")
        runs, decisions, decider = play(guard, topo, selection, say=say)
    fig = figures(setup, runs, decisions)
    fig.wall_s = time.monotonic() - t0
    if decider.errors:
        fig.problems.append(f"decider: {decider.errors[:3]}")
    fig.raw = {"runs": runs, "decisions": decisions, "polls": decider.polls}
    return fig


def table(rows: Sequence[Figures]) -> str:
    """One line per setup: the issue's figures (leak: all bytes from the upload's first byte,
    in brackets those of records larger than a control record; pending: from the upload's first
    byte, in brackets the p95 from its first data record)."""
    heads = ["setup", "uploads pending", "leaked B (data)", "non-audio prompted",
             "release p50/p95/max s", "pending p50/p95/max s (p95 data)", "wall s"]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"
    body = [[r.setup, f"{r.uploads_pending}/{r.uploads}",
             f"{r.leaked_bytes} ({r.leaked_data_bytes})",
             f"{r.messages_prompted}/{r.messages}",
             f"{f(r.release_p50_s)}/{f(r.release_p95_s)}/{f(r.release_max_s)}",
             f"{f(r.pending_p50_s)}/{f(r.pending_p95_s)}/{f(r.pending_max_s)} "
             f"({f(r.pending_data_p95_s)})",
             f"{r.wall_s:.0f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in [heads, *body]]
    return "\n".join(lines)


def dump(fig: Figures) -> str:
    """The figures as JSON (bursts included), for artifacts."""
    out = fig.row()
    out["problems"] = fig.problems
    out["bursts"] = [b.__dict__ for b in fig.bursts]
    return json.dumps(out)
