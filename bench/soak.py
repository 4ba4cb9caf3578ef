"""A bounded soak of the real daemon: mixed traffic through `hushgate run` for N minutes, sampled.

Rules of this file: like the other live benchmarks (bench/README.md). All traffic stays inside
namespaces this script creates (hushsim.topology, prefix `hgs`, addresses in 198.18.0.0/15 and
2001:2::/48). Every process is started through the topology and killed by PID. The namespaces
are deleted on any exit: normal end, exception, Ctrl-C, SIGTERM and the hard time bound
(`--max-seconds`, default the soak plus 110 s). Every wait is bounded.

    python bench/soak.py [--minutes 10] [--sample-s 15] [--seed 1] [--json]

The daemon runs in strict mode with hold_timeout_s = 5 and metrics on. It guards three speakers:
echo and homepod (TLS over TCP) and nest (QUIC, `quic = "hold"`). The traffic:

- uploads: each speaker uploads every 10-20 s (echo `echo-opus-118` and homepod `homepod` over
  IPv4 TCP, nest `nest-quic` over QUIC). A driver thread watches `pending` and decides each one
  by its plan, cycling through allow (`hushgate allow ID`), deny (`hushgate deny ID`) and expire
  (no answer). Twice in the run the homepod gets `hushgate allow --device homepod --for 1m`, and
  its uploads in that window must pass with no prompt;
- non-audio event bursts on echo's voice connection (IPv6), every 6-10 s;
- a smart-home rtt loop (echo, one round every 0.2 s) and a media download loop (homepod, 20 MB
  every ~5 s), running throughout;
- DNS lookups (known names and NXDOMAIN names, A and AAAA) from every speaker, once a second;
- short connections that open, exchange a message and close: smart-home, telemetry,
  connectivity, update and voice hosts (IPv6), and the blocked messaging host.

Uploads go over IPv4 and every other voice-host connection over IPv6, so each prompt is
attributed to its upload by (device, remote). Every `--sample-s` (15 s) the script samples the
daemon's VmRSS and open fds (/proc/PID), `status --json` (pending, held packets and bytes), the
engine's flow count (`hushgate_flows` from the metrics endpoint and the `devices` command) and
the live uploads.

Verdict (exit 1 if any check fails):

1. RSS flat: after the warm-up (`--warmup-s`, 60 s) the median of the last third of the samples
   is at most 10 % above the median of the first third.
2. fds flat: the same medians, at most 5 fds apart.
3. Held back to 0: at every sample where nothing is pending, held packets and bytes are 0
   (within a few re-polls: a non-audio burst is held briefly while it is judged), and so at the
   end after the traffic stopped.
4. No upload released without a decision. Each upload has one audit record (`log --json`) whose
   outcome is what the driver did: approved, denied, expired or window. For approved and window
   outcomes, the cloud had 0 bytes of the upload when the allow was sent, and in the end it had
   every byte with the speaker's sha256. For any other outcome it has 0 bytes of it (TCP: the
   connection's application bytes; QUIC: the datagrams after the Initials).
5. The rest of the traffic worked: no unexpected prompt, and no failed rtt, download, event
   burst, DNS lookup or short connection (the messaging host must be refused, with 0 bytes at
   the cloud). The daemon ran to the end and exited 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from guard.core.detector import DetectorConfig  # noqa: E402
from guard.shell.control import ControlError  # noqa: E402
from guard.shell.control import request as control_request  # noqa: E402
from hushsim import profiles, quic  # noqa: E402
from hushsim.topology import GW_LAN_V4, Topology, cleanup_stale  # noqa: E402
from tests.e2e.guardkit import Guard, GuardError, SpeakerRun, device  # noqa: E402

PREFIX = "hgs"
QUEUE = 31
METRICS_LISTEN = "127.0.0.1:9877"  # inside gw
HOLD_TIMEOUT_S = 5.0
SPEAKERS = (  # tests/e2e/conftest.py's speakers, with their vendors' OUIs
    ("echo", "198.18.10.10", "2001:2:0:10::10", "68:db:f5:90:19:64"),
    ("homepod", "198.18.10.11", "2001:2:0:10::11", "d4:a3:3d:6b:1e:97"),
    ("nest", "198.18.10.12", "2001:2:0:10::12", "f4:f5:d8:0a:00:12"),
)
VOICE = "bob-dispatch-prod-na.amazon.com"
SMART_HOME = "api.amazonalexa.com"
MESSAGING = "alexa-comms-mobile-service.amazon.com"
TELEMETRY = "device-metrics-us.amazon.com"
MEDIA = "amzdigital-a.akamaihd.net"
APPLE_VOICE = "guzzoni.apple.com"
APPLE_UPDATE = "mesu.apple.com"
GOOGLE_VOICE = "embeddedassistant.googleapis.com"
CONNECTIVITY = "www.gstatic.com"
INITIAL_BYTES = len(quic.build_initial(GOOGLE_VOICE, bytes(8), bytes(8)))  # 1,200

# Who uploads what (all over IPv4; every other voice-host connection is IPv6).
UPLOADERS = {
    "echo": ("tcp", VOICE, "echo-opus-118"),
    "homepod": ("tcp", APPLE_VOICE, "homepod"),
    "nest": ("quic", GOOGLE_VOICE, "nest-quic"),
}
PLANS = ("allow", "deny", "expire")
EXPECTED_OUTCOME = {"allow": "approved", "deny": "denied", "expire": "expired",
                    "window": "window"}
UPLOAD_PERIOD_S = (10.0, 20.0)
WINDOW_S = 60.0
DOWNLOAD_BYTES = 20_000_000
STOP_UPLOADS_BEFORE_END_S = 20.0  # no upload starts that could not end before the soak does
RSS_GROWTH = 0.10
FD_GROWTH = 5


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


# The longest a burst is held while it is judged, with nothing pending: the detector decides
# within decide_within_s (0.8 s) of its first packet, or quiet_s (0.2 s) after its last; a
# stalled stream is judged at its quiet deadline. With slack for the control round trips.
PROVISIONAL_MAX_S = 2.0


def control_lead_bytes(device: str, result: dict[str, Any]) -> int:
    """Plaintext bytes of the records an upload profile starts with that are too small for
    anything but a control frame (the detector's end-of-message size, e.g. the HomePod's
    38-byte record, an HTTP/2 SETTINGS ack): the guard passes them by design, before the upload
    begins. Only these may reach the cloud before a decision; they are reported, not hidden."""
    proto, _, name = UPLOADERS[device]
    if proto != "tcp":
        return 0
    tiny = DetectorConfig().tiny_record_bytes
    overhead = int(result.get("record_overhead") or 0)
    lead = 0
    for _, size in profiles.BUILTIN[name].items:
        if size > tiny:
            break
        lead += max(0, size - overhead)
    return lead

class TimeBound:
    """SIGALRM after `seconds`: raises in the main thread, so every `with`/`finally` cleans up."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> TimeBound:
        def expired(signum: int, frame: Any) -> None:
            raise TimeoutError(f"soak exceeded its hard bound of {self.seconds:.0f} s")

        signal.signal(signal.SIGALRM, expired)
        signal.alarm(max(1, int(self.seconds)))
        return self

    def __exit__(self, *exc: object) -> None:
        signal.alarm(0)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (kB), Threads and open fds of `pid`; {} once it is gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return {}
    return out


def _addr(remote: str) -> str:
    """'198.19.0.10:443' or '[2001:2::10]:443' -> the address."""
    return remote.rsplit(":", 1)[0].strip("[]")


def _port(local: str) -> int:
    return int(local.rsplit(":", 1)[1])


def dns_query(name: str, qtype: int, qid: int) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


@dataclass
class Upload:
    """One upload and everything observed about it."""

    n: int
    device: str
    proto: str  # tcp | quic
    host: str
    plan: str  # allow | deny | expire | window
    remote_addr: str
    went: float = 0.0  # time.time() the upload was started
    local: str | None = None
    conn_id: int | None = None  # the cloud's TCP connection id
    pending_id: int | None = None
    pending_after_s: float | None = None
    extra_ids: list[int] = field(default_factory=list)  # later prompts of the same upload
    decision_rc: int | None = None
    cloud_bytes_at_decision: int | None = None
    result: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


class Soak:
    def __init__(self, topo: Topology, g: Guard, args: argparse.Namespace) -> None:
        self.topo = topo
        self.g = g
        self.args = args
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.end = self.t0 + args.minutes * 60
        self.uploads: list[Upload] = []
        self.inflight: dict[str, Upload] = {}
        self.unexpected: list[dict[str, Any]] = []  # prompts that match no upload in flight
        self.windows: list[tuple[float, float]] = []  # homepod allow windows: (open, until)
        self.bg: dict[str, dict[str, Any]] = {
            k: {"runs": 0, "failures": []}
            for k in ("events", "rtt", "download", "dns", "churn", "driver", "sampler")
        }
        self.bg["rtt"]["p50_ms"] = []
        self.bg["rtt"]["p99_ms"] = []
        self.bg["download"]["mbit_s"] = []
        self.bg["churn"]["by_target"] = {}
        self.checks_later: list[tuple[str, dict[str, Any]]] = []  # (kind, speaker result)
        self.current: dict[str, SpeakerRun] = {}  # each loop's running speaker (killed at stop)
        self.samples: list[dict[str, Any]] = []
        self.held_violations: list[str] = []
        self.cli_calls = 0
        self._spk_lock = threading.Lock()
        self.tmp = g.dir  # ready/go files of the speakers; deleted with the guard

    # helpers ------------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.end - time.monotonic()

    def fail(self, loop: str, msg: str) -> None:
        with self.lock:
            self.bg[loop]["failures"].append(f"t={self.now():.0f}s {msg}")
        log(f"{loop}: FAIL {msg}")

    def speaker(self, host: str, *args: str, wait_file: bool = False) -> SpeakerRun:
        with self._spk_lock:  # SpeakerRun numbers its ready/go files with a class counter
            return SpeakerRun(self.topo, host, *args, wait_file=wait_file, tmp=self.tmp)

    def control(self, cmd: str, **kw: Any) -> Any:
        return control_request(str(self.g.socket), {"cmd": cmd, **kw}, timeout_s=5.0)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        with self.lock:
            self.cli_calls += 1
        return self.g.cli(*args)

    def cloud_tcp(self, conn_id: int) -> dict[str, Any] | None:
        assert self.topo.cloud is not None
        return next((c for c in self.topo.cloud.stats()["tcp"] if c["id"] == conn_id), None)

    def cloud_tcp_by_local(self, local: str, host: str) -> dict[str, Any] | None:
        """The cloud's newest connection from `local` (the speaker's address:port) to `host`."""
        assert self.topo.cloud is not None
        port = _port(local)
        conns = [c for c in self.topo.cloud.stats()["tcp"]
                 if c["host"] == host and _port(c["peer"]) == port]
        return max(conns, key=lambda c: c["id"]) if conns else None

    @staticmethod
    def quic_data(flow: dict[str, Any]) -> tuple[int, int]:
        """(data datagrams, data bytes) of a cloud UDP flow: what came after the Initials."""
        initials = sum(1 for s in flow["sizes_head"] if s == INITIAL_BYTES)
        return flow["datagrams"] - initials, flow["bytes"] - initials * INITIAL_BYTES

    def quic_flow(self, since: float, local: str | None = None) -> dict[str, Any] | None:
        assert self.topo.cloud is not None
        flows = [f for f in self.topo.cloud.stats()["udp"]
                 if f["host"] == GOOGLE_VOICE and f["first"] >= since - 0.5
                 and (local is None or _port(f["peer"]) == _port(local))]
        return max(flows, key=lambda f: f["id"]) if flows else None

    def run_bg(self, loop: str, sp: SpeakerRun, timeout_s: float) -> dict[str, Any] | None:
        """Wait for a background speaker; None when it was stopped at the end of the soak."""
        with self.lock:
            self.current[loop] = sp
        if self.stop.is_set():  # started while the soak was stopping: missed by the kill
            sp.kill()
        try:
            res = sp.result(timeout_s=timeout_s)
        except TimeoutError as exc:
            if self.stop.is_set():
                return None
            self.fail(loop, f"speaker timed out: {str(exc)[:200]}")
            return None
        finally:
            with self.lock:
                self.current.pop(loop, None)
        if self.stop.is_set() and res.get("error") in ("terminated", "max-seconds"):
            return None
        return res

    def sleep(self, seconds: float) -> bool:
        """Sleep unless the soak stops first; True when it should go on."""
        return not self.stop.wait(max(0.0, seconds))

    # the uploads --------------------------------------------------------------------------

    def window_state(self, at: float) -> str:
        """'in' when an upload starting at time.time() `at` is surely inside a homepod allow
        window, 'edge' when it is too close to an edge to tell, else 'out'."""
        for opened, until in self.windows:
            if opened + 0.5 <= at <= until - 8.0:  # the homepod upload lasts ~5.5 s
                return "in"
            if opened - 1.0 <= at <= until + 1.5:
                return "edge"
        return "out"

    def open_window(self) -> None:
        before = time.time()
        res = self.cli("allow", "--device", "homepod", "--for", f"{int(WINDOW_S)}s")
        after = time.time()
        if res.returncode != 0:
            self.fail("driver", f"allow --device homepod failed: {res.stderr.strip()[-200:]}")
            return
        with self.lock:
            self.windows.append((after, before + WINDOW_S))
        log(f"driver: allow window for homepod until +{WINDOW_S:.0f}s: {res.stdout.strip()}")

    def uploader(self, dev: str) -> None:
        proto, host, profile = UPLOADERS[dev]
        remote_addr = self.topo.hosts[host][0]
        cycle = 0
        # the homepod's windows: at about 30 % and 70 % of the run
        window_at = [self.t0 + f * self.args.minutes * 60 for f in (0.3, 0.7)]
        next_at = time.monotonic() + {"echo": 2.0, "homepod": 6.0, "nest": 10.0}[dev]
        while self.sleep(next_at - time.monotonic()):
            if self.left() < STOP_UPLOADS_BEFORE_END_S:
                break
            if dev == "homepod" and window_at and time.monotonic() >= window_at[0]:
                window_at.pop(0)
                self.open_window()
            state = self.window_state(time.time()) if dev == "homepod" else "out"
            if state == "edge":
                next_at = time.monotonic() + 2.0
                continue
            plan = "window" if state == "in" else PLANS[cycle % len(PLANS)]
            if plan != "window":
                cycle += 1
            with self.lock:
                up = Upload(len(self.uploads) + 1, dev, proto, host, plan, remote_addr)
                self.uploads.append(up)
            try:
                if proto == "tcp":
                    self._tcp_upload(up, profile)
                else:
                    self._quic_upload(up, profile)
            except Exception as exc:  # noqa: BLE001 - noted on the upload, the soak goes on
                up.notes.append(f"driver error: {type(exc).__name__}: {str(exc)[:300]}")
                log(f"upload #{up.n} {dev}: {up.notes[-1]}")
            finally:
                with self.lock:
                    if self.inflight.get(dev) is up:
                        del self.inflight[dev]
                up.done.set()
            r = up.result or {}
            log(f"upload #{up.n} {dev:7s} plan={plan:6s} pending_id={up.pending_id} "
                f"pending_after={up.pending_after_s} sent={r.get('bytes_sent')} "
                f"reset={r.get('reset')} refused={r.get('refused')} err={r.get('error')}")
            next_at += self.rng.uniform(*UPLOAD_PERIOD_S)
            next_at = max(next_at, time.monotonic() + 1.0)

    def _tcp_upload(self, up: Upload, profile: str) -> None:
        sp = self.speaker(up.device, "--host", up.host, "-4", "--max-seconds", "45",
                          "upload", "--profile", profile, wait_file=True)
        try:
            info = sp.ready(timeout_s=15.0)
            up.local = info["local"]
            conn = None
            for _ in range(50):  # the cloud's thread records the connection after its handshake
                conn = self.cloud_tcp_by_local(info["local"], up.host)
                if conn is not None:
                    break
                time.sleep(0.1)
            if conn is None:
                up.notes.append("the cloud has no record of the upload's connection")
            else:
                up.conn_id = conn["id"]
                if conn["app_bytes"]:
                    up.notes.append(f"{conn['app_bytes']} app bytes at the cloud before the "
                                    "upload started")
            with self.lock:
                self.inflight[up.device] = up
            up.went = sp.go()
            up.result = sp.result(timeout_s=60.0)
        finally:
            sp.kill()

    def _quic_upload(self, up: Upload, profile: str) -> None:
        with self.lock:
            self.inflight[up.device] = up
        up.went = time.time()
        sp = self.speaker(up.device, "--host", up.host, "-4", "--max-seconds", "30",
                          "quic-upload", "--profile", profile)
        try:
            up.result = sp.result(timeout_s=45.0)
            up.local = up.result.get("local")
        finally:
            sp.kill()

    # the driver ---------------------------------------------------------------------------

    def driver(self) -> None:
        """Poll `pending`; attribute each new prompt to the upload in flight (device and remote)
        and answer it by the upload's plan after a short, random delay."""
        seen: set[int] = set()
        due: list[tuple[float, Upload, int]] = []  # (monotonic time, upload, prompt id)
        while self.sleep(0.15):
            try:
                pending = self.control("pending")
            except ControlError as exc:
                self.fail("driver", f"pending: {exc}")
                self.sleep(1.0)
                continue
            now = time.monotonic()
            for p in pending:
                if p["id"] in seen:
                    continue
                seen.add(p["id"])
                with self.lock:
                    up = self.inflight.get(p["device"])
                if not (up is not None and up.went and _addr(p["remote"]) == up.remote_addr
                        and p["started"] >= up.went - 1.0):
                    with self.lock:
                        self.unexpected.append({**p, "t": round(self.now(), 1)})
                    log(f"driver: UNEXPECTED prompt {p} (left to expire)")
                    continue
                if up.pending_id is None:
                    up.pending_id = p["id"]
                    up.pending_after_s = round(time.time() - up.went, 3)
                    delay = self.rng.uniform(0.3, 2.0)
                else:
                    # A second prompt on the upload's flow: the sender paused for more than
                    # UPLOAD_END_GAP_S (1 s, e.g. descheduled on a busy box), so the engine
                    # ended one upload and started another. Answered the same way.
                    up.extra_ids.append(p["id"])
                    up.notes.append(f"split: prompt {p['id']} {time.time() - up.went:.1f} s in")
                    delay = 0.3
                if up.plan == "window":
                    up.notes.append(f"held although an allow window was open: {p}")
                    due.append((now, up, p["id"]))  # answered as a person would: allow
                elif up.plan in ("allow", "deny"):
                    due.append((now + delay, up, p["id"]))
            for item in [d for d in due if now >= d[0]]:
                due.remove(item)
                self.decide(item[1], item[2])

    def decide(self, up: Upload, upload_id: int) -> None:
        if upload_id == up.pending_id:  # what reached the cloud before the answer
            try:
                if up.proto == "tcp" and up.conn_id is not None:
                    conn = self.cloud_tcp(up.conn_id)
                    up.cloud_bytes_at_decision = conn["app_bytes"] if conn else None
                elif up.proto == "quic":
                    flow = self.quic_flow(up.went)
                    up.cloud_bytes_at_decision = self.quic_data(flow)[1] if flow else 0
            except (OSError, RuntimeError, ValueError) as exc:
                up.notes.append(f"cloud read at decision failed: {exc}")
        verb = "deny" if up.plan == "deny" else "allow"
        res = self.cli(verb, str(upload_id))
        if upload_id == up.pending_id:
            up.decision_rc = res.returncode
        if res.returncode != 0:
            up.notes.append(f"`{verb} {upload_id}` exit {res.returncode}: "
                            f"{res.stderr.strip()[-200:]}")

    # background traffic -------------------------------------------------------------------

    def events_loop(self) -> None:
        while self.sleep(self.rng.uniform(6.0, 10.0)) and self.left() > 8:
            sp = self.speaker("echo", "--host", VOICE, "-6", "--max-seconds", "25",
                              "events", "--count", "3", "--gap", "1.0")
            res = self.run_bg("events", sp, 35.0)
            if res is None:
                continue
            with self.lock:
                self.bg["events"]["runs"] += 1
            if res["error"] or res["reset"] or res["acks"] != 3:
                self.fail("events", f"error={res['error']} reset={res['reset']} "
                                    f"acks={res['acks']}")
            else:
                with self.lock:
                    self.checks_later.append(("events", res))

    def rtt_loop(self) -> None:
        while not self.stop.is_set() and self.left() > 5:
            rounds = max(10, min(300, int((self.left() - 3) / 0.2)))
            sp = self.speaker("echo", "--host", SMART_HOME, "-4", "--max-seconds",
                              str(int(rounds * 0.2 + 30)), "rtt", str(rounds), "--interval", "0.2")
            res = self.run_bg("rtt", sp, rounds * 0.2 + 40)
            if res is None:
                continue
            with self.lock:
                self.bg["rtt"]["runs"] += 1
            rtt = res.get("rtt_ms") or {}
            if res["error"] or res["reset"] or rtt.get("n") != rounds:
                self.fail("rtt", f"error={res['error']} reset={res['reset']} "
                                 f"rounds={rtt.get('n')}/{rounds}")
            else:
                with self.lock:
                    self.bg["rtt"]["p50_ms"].append(rtt["p50"])
                    self.bg["rtt"]["p99_ms"].append(rtt["p99"])

    def download_loop(self) -> None:
        fam = 4
        while self.sleep(self.rng.uniform(3.0, 7.0)) and self.left() > 5:
            sp = self.speaker("homepod", "--host", MEDIA, f"-{fam}", "--max-seconds", "30",
                              "download", str(DOWNLOAD_BYTES))
            fam = 10 - fam  # 4, 6, 4, ...
            res = self.run_bg("download", sp, 40.0)
            if res is None:
                continue
            with self.lock:
                self.bg["download"]["runs"] += 1
            got = (res.get("download") or {}).get("bytes")
            if res["error"] or res["reset"] or got != DOWNLOAD_BYTES:
                self.fail("download", f"error={res['error']} reset={res['reset']} bytes={got}")
            else:
                with self.lock:
                    self.bg["download"]["mbit_s"].append(res["download"]["mbit_s"])

    def dns_loop(self) -> None:
        known = list(self.topo.hosts)
        qid = 0
        while self.sleep(1.0):
            dev = self.rng.choice(list(UPLOADERS))
            qid = (qid + 1) & 0xFFFF
            nx = self.rng.random() < 0.25
            name = f"soak-{qid}.example.net" if nx else self.rng.choice(known)
            qtype = self.rng.choice((1, 28))  # A, AAAA
            query = dns_query(name, qtype, qid)

            def ask(query: bytes = query) -> bytes | None:
                for _ in range(2):  # as the resolver would: 1 s, then once more
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.settimeout(1.0)
                        s.sendto(query, (GW_LAN_V4, 53))
                        try:
                            return s.recv(4096)
                        except TimeoutError:
                            continue
                return None

            try:
                data = self.topo.call_in(dev, ask, timeout_s=5.0)
            except (OSError, TimeoutError) as exc:
                if not self.stop.is_set():
                    self.fail("dns", f"{dev} {name}: {exc}")
                continue
            with self.lock:
                self.bg["dns"]["runs"] += 1
            if data is None:
                self.fail("dns", f"{dev} {name} type {qtype}: no answer")
                continue
            rid, flags, _, ancount = struct.unpack("!HHHH", data[:8])
            rcode = flags & 0x0F
            if rid != qid or (nx and rcode != 3) or (not nx and (rcode != 0 or ancount < 1)):
                self.fail("dns", f"{dev} {name} type {qtype}: id {rid}/{qid} rcode {rcode} "
                                 f"answers {ancount}")

    CHURN_TARGETS = (  # (devices, host, families, speaker args, kind)
        (("echo", "homepod", "nest"), SMART_HOME, (4, 6), ("rtt", "2"), "ok"),
        (("echo",), TELEMETRY, (4, 6), ("rtt", "2"), "ok"),
        (("nest", "homepod"), CONNECTIVITY, (4, 6), ("rtt", "1"), "ok"),
        (("homepod",), APPLE_UPDATE, (4, 6), ("rtt", "1"), "ok"),
        (("echo",), VOICE, (6,), ("rtt", "3"), "ok"),  # inspected, released: not an upload
        (("homepod",), APPLE_VOICE, (6,), ("rtt", "2"), "ok"),
        (("echo",), MESSAGING, (4, 6), ("events", "--count", "1"), "blocked"),
    )

    def churn_loop(self) -> None:
        while self.sleep(self.rng.uniform(1.5, 3.5)) and self.left() > 5:
            devices, host, fams, mode, kind = self.rng.choice(self.CHURN_TARGETS)
            dev = self.rng.choice(devices)
            fam = self.rng.choice(fams)
            sp = self.speaker(dev, "--host", host, f"-{fam}", "--max-seconds", "10", *mode)
            res = self.run_bg("churn", sp, 20.0)
            if res is None:
                continue
            label = f"{dev}->{host}/v{fam}"
            with self.lock:
                self.bg["churn"]["runs"] += 1
                by = self.bg["churn"]["by_target"]
                by[host] = by.get(host, 0) + 1
            if kind == "ok":
                n = int(mode[1])
                if res["error"] or res["reset"] or (res.get("rtt_ms") or {}).get("n") != n:
                    self.fail("churn", f"{label}: error={res['error']} reset={res['reset']}")
            else:
                refused = res["reset"] or res["connected_at"] is None or res["error"]
                if not refused or res.get("acks"):
                    self.fail("churn", f"{label}: the messaging host was not refused: "
                                       f"reset={res['reset']} acks={res.get('acks')}")
                if res.get("local"):
                    with self.lock:
                        self.checks_later.append(("blocked", res))

    # sampling -----------------------------------------------------------------------------

    def metrics_flows(self) -> int | None:
        def scrape() -> str:
            with urllib.request.urlopen(f"http://{METRICS_LISTEN}/metrics", timeout=3) as r:
                return r.read().decode()

        try:
            text = self.topo.call_in("gw", scrape, timeout_s=5.0)
        except (OSError, TimeoutError, ValueError) as exc:
            self.fail("sampler", f"metrics scrape: {exc}")
            return None
        return sum(int(float(m.group(1))) for m in
                   re.finditer(r"^hushgate_flows\{[^}]*\} (\S+)$", text, re.MULTILINE))

    def held_settles(self, timeout_s: float = 8.0) -> tuple[str, dict[str, Any]]:
        """Re-poll status until a reading with nothing pending has nothing held: 'ok'. Packets
        held with nothing pending belong to a burst being judged, which lasts at most
        PROVISIONAL_MAX_S (the detector's quiet and decide bounds): 'stuck' if readings with
        nothing pending and something held run on for longer than that without a break.
        After `timeout_s` with neither: 'busy' (each burst was judged, and became a pending
        upload or was released, but new ones kept coming: the traffic, not the guard)."""
        deadline = time.monotonic() + timeout_s
        st: dict[str, Any] = {}
        idle_since: float | None = None
        for _ in range(int(timeout_s / 0.1) + 2):
            st = self.control("status")
            now = time.monotonic()
            if st["pending"] == 0:
                if st["held_packets"] == 0 and st["held_bytes"] == 0:
                    return "ok", st
                idle_since = now if idle_since is None else idle_since
                if now - idle_since > PROVISIONAL_MAX_S:
                    return "stuck", st
            else:
                idle_since = None  # the burst became an upload: its packets are held rightly
            if now >= deadline:
                break
            time.sleep(0.1)
        return "busy", st

    def sample(self, label: str = "") -> dict[str, Any]:
        pid = self.g.pid
        assert pid is not None
        ps = proc_status(pid)
        row: dict[str, Any] = {"t_s": round(self.now(), 1), "label": label, **ps}
        res = self.cli("status", "--json")
        if res.returncode != 0:
            self.fail("sampler", f"status --json exit {res.returncode}: {res.stderr[-200:]}")
            st: dict[str, Any] = {}
        else:
            st = json.loads(res.stdout)
        row.update(pending=st.get("pending"), held_packets=st.get("held_packets"),
                   held_bytes=st.get("held_bytes"), packets=st.get("packets"),
                   duplicates=(st.get("counters") or {}).get("duplicates"))
        try:
            devs = self.control("devices")
            row["flows"] = sum(d["flows"] for d in devs)
            row["live_uploads"] = sum(d["uploads"] for d in devs)
        except ControlError as exc:
            self.fail("sampler", f"devices: {exc}")
        row["metrics_flows"] = self.metrics_flows()
        row["load"] = loadavg()
        if st and st.get("pending") == 0 and (st.get("held_packets") or st.get("held_bytes")):
            how, again = self.held_settles()
            row["held_recheck"] = {"result": how, **{k: again.get(k) for k in (
                "pending", "held_packets", "held_bytes")}}
            if how == "stuck":
                self.held_violations.append(
                    f"t={row['t_s']}s: nothing pending but {st['held_packets']} packets / "
                    f"{st['held_bytes']} B held, and re-polls saw packets held with nothing "
                    f"pending for over {PROVISIONAL_MAX_S} s (last: {row['held_recheck']})")
        self.samples.append(row)
        log(f"sample {json.dumps({k: v for k, v in row.items() if k != 'label'})}")
        return row

    # the run ------------------------------------------------------------------------------

    def run(self) -> None:
        loops = [threading.Thread(target=self.driver, name="driver", daemon=True)]
        loops += [threading.Thread(target=self.uploader, args=(d,), name=f"up-{d}", daemon=True)
                  for d in UPLOADERS]
        loops += [threading.Thread(target=fn, name=fn.__name__, daemon=True) for fn in
                  (self.events_loop, self.rtt_loop, self.download_loop, self.dns_loop,
                   self.churn_loop)]
        self.sample("start")
        for t in loops:
            t.start()
        next_sample = self.t0 + self.args.sample_s
        try:
            while time.monotonic() < self.end:
                time.sleep(max(0.0, min(next_sample, self.end) - time.monotonic()))
                if time.monotonic() >= next_sample:
                    self.sample()
                    next_sample += self.args.sample_s
                if not self.g.running:
                    raise GuardError("hushgate run exited during the soak\n" + self.g.log_tail())
        finally:
            log("stopping the traffic")
            self.stop.set()
            with self.lock:
                running = list(self.current.values())
            for sp in running:
                sp.kill()
            join_until = time.monotonic() + 45.0  # an upload in flight ends within ~15 s
            for t in loops:
                t.join(timeout=max(0.1, join_until - time.monotonic()))
            alive = [t.name for t in loops if t.is_alive()]
            if alive:
                log(f"threads still running after the stop: {alive}")
        # quiet: nothing pending (the last holds expire within hold_timeout_s), nothing held
        deadline = time.monotonic() + HOLD_TIMEOUT_S + 10
        while time.monotonic() < deadline and self.control("status")["pending"]:
            time.sleep(0.2)
        time.sleep(2.0)
        end_row = self.sample("end")
        if end_row.get("pending") or end_row.get("held_packets") or end_row.get("held_bytes"):
            how, st = self.held_settles(8.0)
            if how != "ok":
                self.held_violations.append(f"at the end, after the traffic stopped: {st}")

    # verdict ------------------------------------------------------------------------------

    def check_uploads(self) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
        """Cross-check every upload: audit outcome vs plan, the cloud's bytes vs the outcome."""
        assert self.topo.cloud is not None
        records = self.g.cli_json("log", "--limit", "10000")
        stats = self.topo.cloud.stats()
        by_id = {r["id"]: r for r in records}
        prompted = {i for u in self.uploads for i in (u.pending_id, *u.extra_ids) if i is not None}
        claimed: set[int] = set()
        rows: list[dict[str, Any]] = []
        problems: list[str] = []
        for up in self.uploads:
            if not up.went:
                problems.append(f"#{up.n} {up.device}: never started ({'; '.join(up.notes)})")
                continue
            recs = [by_id[i] for i in (up.pending_id, *up.extra_ids) if i in by_id]
            ended = (up.result or {}).get("ended_at") or up.went + 15.0

            def ours(r: dict[str, Any], up: Upload = up, ended: float = ended) -> bool:
                return (r["device"] == up.device and r["id"] not in claimed
                        and r["id"] not in prompted and _addr(r["remote"]) == up.remote_addr
                        and up.went - 1.0 <= r["started"] <= ended + 1.0)

            if not recs:  # passed by a window, or never seen pending: by flow and time
                near = [r for r in records if ours(r)]
                if near:
                    recs = [min(near, key=lambda r: abs(r["started"] - up.went))]
            claimed.update(r["id"] for r in recs)
            # A window upload the engine split in two (a pause of more than 1 s): both pass.
            more = sorted((r for r in records if ours(r)), key=lambda r: r["started"])
            if more and recs:
                up.notes.append("split: " + ", ".join(
                    f"record {r['id']} {r['started'] - up.went:.1f} s in" for r in more))
                recs += more
                claimed.update(r["id"] for r in more)
            rec = recs[0] if recs else None
            outcome = rec["outcome"] if rec else None
            res = up.result or {}
            sent = res.get("bytes_sent")
            delivered: int | None = None  # of the upload (QUIC: what came after the Initials)
            whole: bool | None = None  # the cloud got all of it: same bytes, same sha256
            if up.proto == "tcp":
                conn = next((c for c in stats["tcp"] if c["id"] == up.conn_id), None)
                if conn is not None:
                    delivered = conn["app_bytes"]
                    whole = delivered == sent and conn["sha256"] == res.get("sha256")
            else:
                flow = None
                if up.local:
                    flow = next((f for f in stats["udp"] if f["host"] == up.host
                                 and _port(f["peer"]) == _port(up.local)
                                 and f["first"] >= up.went - 0.5), None)
                if flow is not None:
                    delivered = self.quic_data(flow)[1]
                    whole = (flow["bytes"] == sent and flow["datagrams"] == res.get("records")
                             and flow["sha256"] == res.get("sha256"))
                elif up.result is not None:
                    delivered = 0  # not one datagram of it reached the cloud
            want = EXPECTED_OUTCOME[up.plan]
            lead = control_lead_bytes(up.device, res)
            bad: list[str] = [n for n in up.notes if not n.startswith(("split:", "control:"))]
            if rec is None:
                bad.append("no audit record")
            elif any(r["outcome"] != want for r in recs):
                got = "/".join(r["outcome"] for r in recs)
                bad.append(f"outcome {got}, the driver's plan was {up.plan} ({want})")
            if up.plan != "window" and up.pending_id is None:
                bad.append("never pending")
            if outcome in ("approved", "window"):
                if (up.cloud_bytes_at_decision or 0) > lead:
                    bad.append(f"{up.cloud_bytes_at_decision} B at the cloud before the allow")
                elif up.cloud_bytes_at_decision:
                    up.notes.append(f"control: {up.cloud_bytes_at_decision} B before the allow")
                if not whole:
                    bad.append(f"the cloud has {delivered} B, not all {sent} B with the "
                               "speaker's sha256")
                if res.get("error") or res.get("reset") or res.get("refused"):
                    bad.append(f"speaker: error={res.get('error')} reset={res.get('reset')} "
                               f"refused={res.get('refused')}")
            else:
                if delivered is None:
                    bad.append("the cloud has no record of the connection")
                elif delivered > lead:
                    bad.append(f"LEAK: {delivered} B of a {outcome or 'undecided'} upload "
                               "reached the cloud")
                elif delivered:
                    up.notes.append(f"control: {delivered} B (the leading control record)")
            rows.append({"n": up.n, "device": up.device, "proto": up.proto, "plan": up.plan,
                         "id": "+".join(str(r["id"]) for r in recs) if recs else up.pending_id,
                         "outcome": outcome,
                         "notes": [n for n in up.notes if n.startswith(("split:", "control:"))],
                         "pending_after_s": up.pending_after_s,
                         "at_decision_B": up.cloud_bytes_at_decision, "sent_B": sent,
                         "delivered_B": delivered, "whole": whole, "problems": bad})
            if bad:
                problems.append(f"#{up.n} {up.device} {up.proto} plan={up.plan} "
                                f"id={rows[-1]['id']}: {'; '.join(bad)}")
        run_start = time.time() - (time.monotonic() - self.t0)
        extra = [r for r in records if r["id"] not in claimed and r["started"] >= run_start - 5]
        return rows, problems, extra

    def check_background(self) -> list[str]:
        """Event bursts arrived whole (the cloud's sha256); the messaging host got 0 bytes."""
        assert self.topo.cloud is not None
        stats = self.topo.cloud.stats()
        out: list[str] = []
        for kind, res in self.checks_later:
            host = res["host"]
            port = _port(res["local"])
            conns = [c for c in stats["tcp"] if c["host"] == host and _port(c["peer"]) == port
                     and c["opened"] >= res["started_at"] - 1]
            if kind == "events":
                if not conns or conns[-1]["sha256"] != res["sha256"]:
                    out.append(f"event bursts from {res['local']}: the cloud has "
                               f"{conns[-1]['app_bytes'] if conns else None} B, not the "
                               f"speaker's {res['bytes_sent']} B")
            elif any(c["app_bytes"] for c in conns):
                out.append(f"messaging connection {res['local']}: "
                           f"{sum(c['app_bytes'] for c in conns)} B reached the cloud")
        return out


def flat(samples: list[dict[str, Any]], key: str, warmup_s: float
         ) -> tuple[float | None, float | None, int]:
    post = [s[key] for s in samples if s.get("label") != "end" and s["t_s"] >= warmup_s
            and s.get(key) is not None]
    third = len(post) // 3
    if third < 1:
        return None, None, len(post)
    return statistics.median(post[:third]), statistics.median(post[-third:]), len(post)


def verdict(soak: Soak, args: argparse.Namespace) -> dict[str, Any]:
    """The checks; reads the audit log, so the daemon must still be running."""
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": ok, "detail": detail})

    rss_a, rss_b, n = flat(soak.samples, "rss_kb", args.warmup_s)
    if rss_a is None:
        check("RSS flat", False, f"only {n} samples after the warm-up")
    else:
        assert rss_b is not None
        check("RSS flat", rss_b <= rss_a * (1 + RSS_GROWTH),
              f"median {rss_a / 1024:.1f} MB (first third) -> {rss_b / 1024:.1f} MB (last "
              f"third), {100 * (rss_b / rss_a - 1):+.1f} % (limit +{100 * RSS_GROWTH:.0f} %), "
              f"{n} samples after {args.warmup_s:.0f} s")
    fd_a, fd_b, n = flat(soak.samples, "fds", args.warmup_s)
    if fd_a is None:
        check("fds flat", False, f"only {n} samples after the warm-up")
    else:
        assert fd_b is not None
        check("fds flat", fd_b <= fd_a + FD_GROWTH,
              f"median {fd_a:g} (first third) -> {fd_b:g} (last third), limit +{FD_GROWTH}")
    zero_rows = sum(1 for s in soak.samples if s.get("pending") == 0)
    check("held back to 0 when nothing is pending", not soak.held_violations,
          "; ".join(soak.held_violations) or
          f"{zero_rows} samples with nothing pending, all with 0 held after re-polls; 0 at end")
    rows, problems, extra = soak.check_uploads()
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[str(r["outcome"])] = outcomes.get(str(r["outcome"]), 0) + 1
    check("no upload released without a decision", not problems and bool(rows),
          f"{len(rows)} uploads, outcomes {outcomes}" + (": " + " | ".join(problems)
                                                          if problems else ""))
    bg_problems = soak.check_background()
    for loop, st in soak.bg.items():
        bg_problems += [f"{loop}: {f}" for f in st["failures"]]
    if soak.unexpected:
        bg_problems.append(f"{len(soak.unexpected)} unexpected prompts: {soak.unexpected[:5]}")
    if extra:
        bg_problems.append(f"{len(extra)} audit records of no upload of ours: {extra[:5]}")
    runs = {k: v["runs"] for k, v in soak.bg.items() if k not in ("driver", "sampler")}
    check("the rest of the traffic worked", not bg_problems,
          f"runs {runs}" + (": " + " | ".join(bg_problems[:20]) if bg_problems else ""))
    return {"checks": checks, "uploads": rows}


def print_report(soak: Soak, v: dict[str, Any], meta: dict[str, Any]) -> None:
    print(f"soak: {meta['minutes']:g} min of mixed traffic through `hushgate run` (strict, "
          f"hold_timeout_s {HOLD_TIMEOUT_S:g}, metrics on), daemon PID {meta['pid']}; "
          f"{meta['nproc']} vCPU, 1-min load {meta['load_start']:.2f} at start, "
          f"{meta['load_end']:.2f} at end; wall {meta['wall_s']:.0f} s")
    print()
    print(f"{'t (s)':>7s}{'RSS MB':>8s}{'fds':>5s}{'thr':>5s}{'pend':>6s}{'held pkt':>9s}"
          f"{'held B':>9s}{'flows':>7s}{'m.flows':>8s}{'live up':>8s}{'queued pkts':>12s}"
          f"{'load':>6s}")
    for s in soak.samples:
        def num(k: str, s: dict[str, Any] = s) -> str:
            return "-" if s.get(k) is None else str(s[k])
        t = "end" if s.get("label") == "end" else f"{s['t_s']:.0f}"
        rss = f"{s['rss_kb'] / 1024:.1f}" if s.get("rss_kb") else "-"
        print(f"{t:>7s}{rss:>8s}{num('fds'):>5s}{num('threads'):>5s}{num('pending'):>6s}"
              f"{num('held_packets'):>9s}{num('held_bytes'):>9s}{num('flows'):>7s}"
              f"{num('metrics_flows'):>8s}{num('live_uploads'):>8s}{num('packets'):>12s}"
              f"{s.get('load', 0):>6.2f}"
              + (f"  (re-poll: {s['held_recheck']})" if s.get("held_recheck") else ""))
    print()
    ups = v["uploads"]
    print(f"uploads: {len(ups)}")
    print(f"{'#':>4s} {'device':8s}{'proto':6s}{'plan':7s}{'id':>7s} {'outcome':9s}"
          f"{'pending s':>10s}{'B@allow':>8s}{'sent B':>8s}{'cloud B':>8s}  whole problems, notes")
    for r in ups:
        def cell(k: str, r: dict[str, Any] = r) -> str:
            return "-" if r.get(k) is None else str(r[k])
        sha = "-" if r["whole"] is None else ("yes" if r["whole"] else "no")
        print(f"{r['n']:>4d} {r['device']:8s}{r['proto']:6s}{r['plan']:7s}{cell('id'):>7s} "
              f"{cell('outcome'):9s}{cell('pending_after_s'):>10s}{cell('at_decision_B'):>8s}"
              f"{cell('sent_B'):>8s}{cell('delivered_B'):>8s}  {sha:5s} "
              f"{'; '.join(r['problems'] + r['notes'])}")
    held = [r["pending_after_s"] for r in ups if r["pending_after_s"] is not None]
    bg = soak.bg
    print()
    if held:
        print(f"prompt after upload start: p50 {statistics.median(held):.2f} s, "
              f"max {max(held):.2f} s over {len(held)} held uploads")
    if bg["rtt"]["p50_ms"]:
        print(f"smart-home rtt: {bg['rtt']['runs']} runs, p50 {min(bg['rtt']['p50_ms']):.2f}-"
              f"{max(bg['rtt']['p50_ms']):.2f} ms, p99 {min(bg['rtt']['p99_ms']):.2f}-"
              f"{max(bg['rtt']['p99_ms']):.2f} ms")
    if bg["download"]["mbit_s"]:
        m = bg["download"]["mbit_s"]
        print(f"media downloads: {bg['download']['runs']} x {DOWNLOAD_BYTES / 1e6:.0f} MB, "
              f"median {statistics.median(m):.0f} Mbit/s (min {min(m):.0f})")
    print(f"event bursts: {bg['events']['runs']} runs of 3; DNS lookups: {bg['dns']['runs']}; "
          f"short connections: {bg['churn']['runs']} {bg['churn']['by_target']}; "
          f"CLI calls: {soak.cli_calls}")
    print()
    for c in v["checks"]:
        print(f"[{'PASS' if c['ok'] else 'FAIL'}] {c['check']}: {c['detail']}")
    print(f"\nverdict: {'PASS' if v['ok'] else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sample-s", type=float, default=15.0, help="seconds between samples")
    ap.add_argument("--warmup-s", type=float, default=60.0,
                    help="samples before this are left out of the flatness checks")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="hard bound on the whole run (default: the soak + 110 s)")
    ap.add_argument("--json", action="store_true", help="print the samples and verdict as JSON")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak.py needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 2
    bound = args.max_seconds or args.minutes * 60 + 110
    # Ctrl-C cleans up even when started with SIGINT ignored (e.g. `cmd &` from a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    wall0 = time.monotonic()
    load_start = loadavg()
    cleanup_stale(PREFIX)
    try:
        topo = Topology(speakers=SPEAKERS, prefix=PREFIX, lifetime_s=bound + 60)
        g: Guard | None = None
        try:
            # The bound covers the run, not the clean-up below (which has its own bounds).
            with TimeBound(bound):
                topo.start()
                devices = [device(topo, "echo"), device(topo, "homepod"),
                           device(topo, "nest", quic="hold")]
                g = Guard(topo, devices, queue=QUEUE, hold_timeout_s=HOLD_TIMEOUT_S,
                          sections={"metrics": {"listen": METRICS_LISTEN}})
                g.start()
                pid = g.pid
                log(f"hushgate run PID {pid}; soak for {args.minutes:g} min")
                soak = Soak(topo, g, args)
                soak.run()
                v = verdict(soak, args)  # reads the audit log: the daemon still runs
                exit_code = g.stop()
                v["checks"].append({
                    "check": "the daemon ran to the end and exited 0 on SIGTERM",
                    "ok": exit_code == 0, "detail": f"exit code {exit_code}"})
        finally:
            if g is not None:
                g.close()
            topo.close()
    except (KeyboardInterrupt, TimeoutError, GuardError) as exc:
        # Everything is cleaned up by now (the `finally` above ran).
        print(f"soak aborted: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    v["ok"] = all(c["ok"] for c in v["checks"])
    meta = {"minutes": args.minutes, "pid": pid, "nproc": os.cpu_count(),
            "load_start": load_start, "load_end": loadavg(),
            "wall_s": time.monotonic() - wall0, "exit_code": exit_code}
    if args.json:
        print(json.dumps({"meta": meta, "samples": soak.samples, **v}, indent=1))
    else:
        print_report(soak, v, meta)
    return 0 if v["ok"] else 1

if __name__ == "__main__":
    sys.exit(main())
