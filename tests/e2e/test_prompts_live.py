"""The three ways a person sees the guard, live: Prometheus metrics, `hushgate watch` in a real
terminal, and the LAN web prompt in a real Chromium on a LAN host.

Every test starts a real `hushgate run` in the router namespace of one module-wide topology
(tests/e2e/guardkit.py), drives the speaker simulator in the echo's namespace and reads what left
the house from the cloud's own counters. The decisions are made through the interface under test
(a key in the pseudo-terminal, a click in the browser) and the audit log must name it as the
decider. Measured numbers are printed and appended to artifacts/e2e-guard-live.jsonl.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import pytest

from hushsim.topology import Topology
from tests.ci import IN_CI
from tests.e2e.guardkit import (
    ARTIFACTS,
    Guard,
    GuardError,
    MakeGuard,
    SpeakerRun,
    cloud_conn_by_id,
    cloud_conn_since,
    hushgate_rules,
    record,
)

VOICE = "bob-dispatch-prod-na.amazon.com"
QUEUE = 13  # this module's NFQUEUE number (other modules use their own)
METRICS_PORT = 9877
GW_LAN_V4 = "198.18.10.1"
WEB_PORT = 8787
WEB_LISTEN = f"{GW_LAN_V4}:{WEB_PORT}"
RESTART_PORT = 8789  # the restart test's own port: a failure there must not block 8787
BUSY_PORT = 8790
PROFILE = "echo-opus-118"
HOLD_TIMEOUT_S = 3.0  # the metrics test lets one upload expire

# The web page polls once a second and watch every 0.5 s; the upload is pending within 1 s of its
# start (test_guard_live). So the prompt must show within these bounds of the upload's start.
WATCH_WITHIN_S = 2.0
WEB_WITHIN_S = 2.5
SCREEN_WAIT_S = 8.0
BROWSER_SCRIPT = Path(__file__).with_name("web_prompt_browser.py")
SCREENSHOT = ARTIFACTS / "web-prompt-live.png"
OUTCOMES = (
    "approved",
    "denied",
    "expired",
    "window",
    "quiet",
    "rule",
    "monitored",
    "capped",
    "lost",
)
# design.md section 8: every family is declared (# TYPE) from the first scrape. A labelled family
# whose label values are not known yet (no flow blocked yet) has no sample line, only the TYPE.
FAMILIES = (
    "hushgate_packets_total",
    "hushgate_flows",
    "hushgate_uploads_total",
    "hushgate_pending_uploads",
    "hushgate_held_packets",
    "hushgate_held_bytes",
    "hushgate_hold_seconds",
    "hushgate_release_delay_seconds",
    "hushgate_verdict_seconds",
    "hushgate_blocked_flows_total",
    "hushgate_malformed_packets_total",
    "hushgate_fail_mode",
    "hushgate_build_info",
)


# --- speakers and the cloud ----------------------------------------------------------------------


def _connected_speaker(g: Guard, *args: str) -> tuple[SpeakerRun, dict[str, Any]]:
    """An echo that has connected to the voice host and waits for `go()`; (the run, the cloud's
    record of the connection, with no application byte received yet). Found at the cloud by
    host and opening time: through the relay the cloud sees the router's socket, not the
    speaker's port."""
    since = time.time()
    sp = g.speaker("echo", "--host", VOICE, "-4", *args, wait_file=True)
    sp.ready(timeout_s=10.0)
    conn = cloud_conn_since(g.topo, VOICE, since, handshake=True)
    assert conn["handshake_done"] and conn["app_bytes"] == 0, conn
    return sp, conn


def _allowed_speaker(g: Guard) -> tuple[SpeakerRun, dict[str, Any]]:
    return _connected_speaker(g, "--max-seconds", "30", "upload", "--profile", PROFILE)


def _denied_speaker(g: Guard) -> tuple[SpeakerRun, dict[str, Any]]:
    # --hold-open: the speaker stays on the connection, so the reset reaches it.
    return _connected_speaker(
        g, "--hold-open", "20", "--max-seconds", "30", "upload", "--profile", PROFILE
    )


def _check_delivered(topo: Topology, sp: SpeakerRun, conn: dict[str, Any]) -> dict[str, Any]:
    """The allowed upload arrived whole and in order: the cloud's SHA-256 is the speaker's."""
    assert topo.cloud is not None
    result = sp.result(timeout_s=20.0)
    assert result["error"] is None and not result["reset"], result
    assert result["acks"] == 1, result
    final = topo.cloud.wait_for(
        lambda s: any(c["id"] == conn["id"] and c["sha256"] == result["sha256"]
                      for c in s["tcp"]), timeout_s=5.0)  # fmt: skip
    c = next(c for c in final["tcp"] if c["id"] == conn["id"])
    assert c["app_bytes"] == result["bytes_sent"] > 0, (c, result)
    return result


def _check_reset(topo: Topology, sp: SpeakerRun, conn: dict[str, Any]) -> dict[str, Any]:
    """The denied (or expired) upload: the speaker was reset and the cloud got none of it."""
    assert topo.cloud is not None
    result = sp.result(timeout_s=15.0)
    assert result["reset"], f"the speaker was not reset: {result}"
    topo.cloud.wait_for(
        lambda s: any(c["id"] == conn["id"] and c["closed"] for c in s["tcp"]), timeout_s=3.0
    )
    got = cloud_conn_by_id(topo, conn["id"])["app_bytes"]
    assert got == 0, f"the cloud received {got} bytes of a refused upload"
    return result


def _log_record(g: Guard, upload_id: int, timeout_s: float = 5.0) -> dict[str, Any]:
    return g.wait_log(
        lambda r: str(r.get("id")) == str(upload_id) and bool(r.get("outcome")), timeout_s=timeout_s
    )


# --- 1. metrics ----------------------------------------------------------------------------------


def _scrape(topo: Topology, port: int = METRICS_PORT) -> str:
    """GET /metrics from inside gw (the listener is on gw's loopback)."""

    def get() -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200, resp.status
            ctype = resp.headers.get("Content-Type", "")
            assert ctype.startswith("text/plain"), ctype
            return resp.read().decode()

    return topo.call_in("gw", get, timeout_s=10.0)


Samples = list[tuple[str, dict[str, str], float]]


def _parse(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (s.name, dict(s.labels), float(s.value))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    ]


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over samples named `name` whose labels include `labels` (labels may grow)."""
    return sum(
        v
        for n, lab, v in samples
        if n == name and all(lab.get(k) == want for k, want in labels.items())
    )


def _upload_deltas(before: Samples, after: Samples) -> dict[tuple[str, str, str], float]:
    """hushgate_uploads_total per (device, category, outcome): after - before, non-zero only."""

    def per_key(samples: Samples) -> dict[tuple[str, str, str], float]:
        out: dict[tuple[str, str, str], float] = {}
        for n, lab, v in samples:
            if n == "hushgate_uploads_total":
                key = (lab.get("device", ""), lab.get("category", ""), lab.get("outcome", ""))
                out[key] = out.get(key, 0.0) + v
        return out

    b, a = per_key(before), per_key(after)
    return {
        k: a.get(k, 0.0) - b.get(k, 0.0) for k in set(a) | set(b) if a.get(k, 0.0) != b.get(k, 0.0)
    }


def _promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail(
                "promtool is missing (apt-get install prometheus): CI must lint the live scrape"
            )
        warnings.warn("promtool not found: the live scrape was not linted", stacklevel=2)
        return
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert res.returncode == 0, (
        f"promtool check metrics: exit {res.returncode}\n{res.stdout}{res.stderr}"
    )


@pytest.mark.parametrize("tcp_hold", ["relay", "packet"])
def test_metrics_count_one_approved_one_denied_one_expired_upload_exactly(
    topology: Topology, guards: MakeGuard, tcp_hold: str
) -> None:
    g = guards(
        hold_timeout_s=HOLD_TIMEOUT_S, sections={"metrics": {"listen": f"127.0.0.1:{METRICS_PORT}"}},
        tcp_hold=tcp_hold,
    )
    status = g.cli_json("status")
    first_text = _scrape(topology)
    before = _parse(first_text)
    declared = set(re.findall(r"^# TYPE (\S+) ", first_text, re.M))
    declared |= {f"{n}_total" for n in declared}  # older clients declare counters without it
    missing = [f for f in FAMILIES if f not in declared]
    assert not missing, f"families missing from the first scrape: {missing}"
    assert _value(before, "hushgate_fail_mode", mode="closed") == 1, status
    assert _value(before, "hushgate_pending_uploads") == 0

    # Approved.
    sp, conn = _allowed_speaker(g)
    sp.go()
    (up1,), _ = g.wait_pending(1, timeout_s=4.0)
    g.cli_ok("allow", str(up1["id"]))
    allowed_hold_max = time.time() - up1["started"]
    _check_delivered(topology, sp, conn)
    # Denied.
    sp, conn = _denied_speaker(g)
    sp.go()
    (up2,), _ = g.wait_pending(1, timeout_s=4.0, exclude={up1["id"]})
    g.cli_ok("deny", str(up2["id"]))
    denied_hold_max = time.time() - up2["started"]
    _check_reset(topology, sp, conn)
    # Expired: nobody answers for hold_timeout_s.
    sp, conn = _denied_speaker(g)
    sp.go()
    (up3,), _ = g.wait_pending(1, timeout_s=4.0, exclude={up1["id"], up2["id"]})
    _check_reset(topology, sp, conn)
    outcomes = {r["id"]: r["outcome"] for r in (_log_record(g, u["id"]) for u in (up1, up2, up3))}
    assert outcomes == {up1["id"]: "approved", up2["id"]: "denied", up3["id"]: "expired"}

    # The counters follow the decisions at once; poll briefly, then demand exact values.
    deadline = time.monotonic() + 3.0
    for _ in range(40):
        text = _scrape(topology)
        after = _parse(text)
        done = (
            _value(after, "hushgate_hold_seconds_count")
            - _value(before, "hushgate_hold_seconds_count")
        ) >= 3
        if (done and _value(after, "hushgate_pending_uploads") == 0) or (
            time.monotonic() >= deadline
        ):
            break
        time.sleep(0.1)
    deltas = _upload_deltas(before, after)
    hold_count = _value(after, "hushgate_hold_seconds_count") - _value(
        before, "hushgate_hold_seconds_count"
    )
    hold_sum = _value(after, "hushgate_hold_seconds_sum") - _value(
        before, "hushgate_hold_seconds_sum"
    )
    hold_inf = _value(after, "hushgate_hold_seconds_bucket", le="+Inf") - _value(
        before, "hushgate_hold_seconds_bucket", le="+Inf"
    )
    record("metrics", upload_deltas={"/".join(k): v for k, v in deltas.items()},
           hold_count_delta=hold_count, hold_sum_delta_s=round(hold_sum, 3),
           allowed_hold_max_s=round(allowed_hold_max, 3),
           denied_hold_max_s=round(denied_hold_max, 3))  # fmt: skip
    assert deltas == {
        ("echo", "voice", "approved"): 1.0,
        ("echo", "voice", "denied"): 1.0,
        ("echo", "voice", "expired"): 1.0,
    }, f"hushgate_uploads_total changed by {deltas}"
    for outcome in OUTCOMES:  # the label sets the design lists, present or not: +0 but these
        want = 1.0 if outcome in ("approved", "denied", "expired") else 0.0
        got = _value(after, "hushgate_uploads_total", device="echo", outcome=outcome) - _value(
            before, "hushgate_uploads_total", device="echo", outcome=outcome
        )
        assert got == want, f"outcome={outcome}: +{got}, expected +{want}"
    assert _value(after, "hushgate_pending_uploads") == 0
    assert _value(after, "hushgate_held_packets") == 0, "packets still held with nothing pending"
    assert hold_count == 3, f"hushgate_hold_seconds_count +{hold_count}, expected +3"
    assert hold_inf == 3, f"hushgate_hold_seconds_bucket{{le=+Inf}} +{hold_inf}, expected +3"
    # The expired hold alone lasted hold_timeout_s; the other two at most until their CLI call.
    assert (
        HOLD_TIMEOUT_S - 0.3
        <= hold_sum
        <= (HOLD_TIMEOUT_S + 0.5 + allowed_hold_max + denied_hold_max)
    ), hold_sum
    assert _value(after, "hushgate_fail_mode", mode="closed") == 1
    assert _value(after, "hushgate_fail_mode", mode="open") == 0
    assert _value(after, "hushgate_build_info") == 1
    _promtool_check(text)


# --- 2. watch in a pseudo-terminal ---------------------------------------------------------------


class PtyProcess:
    """A command in a namespace with a real pseudo-terminal as stdin/stdout/stderr; everything it
    writes is collected (with arrival times) by a reader thread."""

    def __init__(self, topo: Topology, ns: str, *cmd: str, rows: int = 40, cols: int = 120):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        try:
            self.proc = topo.popen(
                ns,
                *cmd,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                text=False,
                start_new_session=True,
            )
        finally:
            os.close(slave)
        self.master = master
        self.buf = bytearray()
        self.chunks: list[tuple[float, int]] = []  # (arrival time.time(), buffer length after)
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the last holder of the slave side is gone
                return
            if not data:
                return
            with self.lock:
                self.buf += data
                self.chunks.append((time.time(), len(self.buf)))

    @property
    def text(self) -> str:
        with self.lock:
            return self.buf.decode("utf-8", "replace")

    def arrived_at(self, offset: int) -> float:
        """When the byte at `offset` (of the decoded-as-ASCII buffer) arrived."""
        with self.lock:
            return next(t for t, end in self.chunks if end > offset)

    def expect(
        self, pattern: str, start: int = 0, timeout_s: float = SCREEN_WAIT_S
    ) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            m = rx.search(self.text, start)
            if m:
                return m
            if time.monotonic() >= deadline or (
                self.proc.poll() is not None and not self.reader.is_alive()
            ):
                raise AssertionError(
                    f"the terminal never showed /{pattern}/ (after offset {start}) within "
                    f"{timeout_s} s; screen:\n{self.text[-3000:]!r}"
                )
            time.sleep(0.02)

    def press(self, key: str) -> None:
        os.write(self.master, key.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
                self.proc.wait(timeout=5.0)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        os.close(self.master)
        self.reader.join(timeout=2.0)


def _watch_prompt_shows(term: PtyProcess, start: int, exclude: set[str]) -> tuple[str, int]:
    """Wait for a new upload on the watch screen: (its id, the offset of its last character)."""
    rx = r"upload (\d+) from echo \(voice\)\r*\n\s*to\s+" + re.escape(VOICE) + r"\r*\n"
    while True:
        m = term.expect(rx, start)
        if m.group(1) not in exclude:
            return m.group(1), m.end() - 1
        start = m.end()


def test_watch_in_a_terminal_allows_with_a_and_denies_with_d(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards()
    term = PtyProcess(
        topology, "gw", sys.executable, "-m", "guard.tools.cli", "watch", "--socket", str(g.socket)
    )
    try:
        term.expect(r"no uploads pending")
        # a: allow once.
        sp, conn = _allowed_speaker(g)
        sp.go()
        id1, at1 = _watch_prompt_shows(term, 0, set())
        shown1 = term.arrived_at(at1)  # when the host line was complete
        assert cloud_conn_by_id(topology, conn["id"])["app_bytes"] == 0, "leaked while shown"
        pend = g.pending()
        assert [str(p["id"]) for p in pend] == [id1], pend
        mark = len(term.text)
        term.press("a")
        term.expect(rf"upload {id1} \(echo\) allowed once", mark)
        r1 = _check_delivered(topology, sp, conn)
        rec1 = _log_record(g, int(id1))
        assert rec1["outcome"] == "approved", rec1
        assert str(rec1["decided_by"]).startswith("watch"), rec1
        # d: deny.
        sp2, conn2 = _denied_speaker(g)
        mark = len(term.text)
        sp2.go()
        id2, at2 = _watch_prompt_shows(term, mark, {id1})
        shown2 = term.arrived_at(at2)
        mark = len(term.text)
        denied_at = time.time()
        term.press("d")
        term.expect(rf"upload {id2} \(echo\) denied", mark)
        r2 = _check_reset(topology, sp2, conn2)
        rec2 = _log_record(g, int(id2))
        assert rec2["outcome"] == "denied", rec2
        assert str(rec2["decided_by"]).startswith("watch"), rec2
        # q: quit, exit code 0.
        term.press("q")
        rc = term.proc.wait(timeout=5.0)
        screen = term.text
    finally:
        term.close()
    lat1 = shown1 - r1["uploads"][0]["start"]
    lat2 = shown2 - r2["uploads"][0]["start"]
    record("watch_prompt", shown_after_upload_start_s=[round(lat1, 3), round(lat2, 3)],
           reset_after_d_s=round(r2["reset_at"] - denied_at, 3),
           upload_bytes=r1["bytes_sent"])  # fmt: skip
    assert rc == 0, f"watch exited {rc} on q; screen:\n{screen[-1500:]!r}"
    assert "\x1b" not in screen, "watch wrote an escape sequence"
    assert 0 < lat1 <= WATCH_WITHIN_S and 0 < lat2 <= WATCH_WITHIN_S, (lat1, lat2)


# --- 3. the web prompt in Chromium on a LAN host -------------------------------------------------


def _web_guard(guards: MakeGuard, tls: bool) -> tuple[Guard, str, str | None]:
    """A guard with the web prompt on gw's LAN address; (guard, token, TLS fingerprint)."""
    g = guards(sections={"web": {"listen": WEB_LISTEN, "tls": tls}})
    res = g.cli_ok("web", "token", "--config", str(g.config_path), socket=False)
    m = re.search(r"^token: ([A-Za-z0-9_-]{32,})$", res.stdout, re.M)
    assert m, f"`hushgate web token` printed no token: {res.stdout!r}"
    fp = re.search(r"fingerprint: ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})$", res.stdout, re.M)
    if tls:
        assert fp, f"`hushgate web token` printed no fingerprint with tls: {res.stdout!r}"
    return g, m.group(1), fp.group(1) if fp else None


def _lan_request(
    topo: Topology,
    method: str,
    path: str,
    host: str,
    *,
    tls: bool = False,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    port: int = WEB_PORT,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request from the unguarded LAN host to the web prompt with a given Host header."""

    def go() -> tuple[int, dict[str, str], bytes]:
        conn: http.client.HTTPConnection
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection(GW_LAN_V4, port, timeout=5, context=ctx)
        else:
            conn = http.client.HTTPConnection(GW_LAN_V4, port, timeout=5)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Type", "application/json")
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    return topo.call_in("lan", go, timeout_s=15.0)


def _served_fingerprint(topo: Topology) -> str:
    def get() -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # pinned by fingerprint, as a phone would
        with socket.create_connection((GW_LAN_V4, WEB_PORT), timeout=5) as raw:
            with ctx.wrap_socket(raw) as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    der = topo.call_in("lan", get, timeout_s=15.0)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


class Browser:
    """tests/e2e/web_prompt_browser.py running in the LAN host's namespace; its JSON events."""

    def __init__(
        self,
        topo: Topology,
        workdir: Path,
        url: str,
        token: str,
        actions: list[str],
        *,
        screenshot: Path | None = None,
        insecure: bool = False,
    ) -> None:
        from tests.browser.chromium import require_browser

        require_browser()  # skip off CI / fail in CI when chromium, the driver or selenium lack
        args = ["--url", url, "--workdir", str(workdir)]
        for a in actions:
            args += ["--action", a]
        if screenshot is not None:
            args += ["--screenshot", str(screenshot)]
        if insecure:
            args.append("--ignore-certificate-errors")
        self.stderr_path = workdir / "browser.stderr"
        workdir.mkdir(parents=True, exist_ok=True)
        with self.stderr_path.open("w") as err:
            self.proc = topo.popen(
                "lan", sys.executable, str(BROWSER_SCRIPT), *args, stdin=subprocess.PIPE, stderr=err
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(token + "\n")
        self.proc.stdin.close()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "noise", "line": line.rstrip()})
        self.events.put(None)

    def next(self, want: str, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ev = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"the browser sent no {want!r} within {timeout_s} s; stderr: {self._stderr()}"
                ) from None
            if ev is None:
                raise AssertionError(
                    f"the browser exited ({self.proc.poll()}) before {want!r}; "
                    f"stderr: {self._stderr()}"
                )
            if ev.get("event") == "error":
                raise AssertionError(
                    f"the browser failed: {ev.get('message')}\n{ev.get('traceback', '')}"
                )
            if ev.get("event") == want:
                return ev

    def _stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(none)"

    def close(self) -> int | None:
        """Wait for the script to finish (it quits Chromium itself); kill it if it does not."""
        try:
            return self.proc.wait(timeout=15.0)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the script and everything it started (chromedriver, Chromium), by PID: found
        before the kill, since orphans are reparented and could not be found after it."""
        pids = _descendants(self.proc.pid)
        for pid in [self.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass


def _descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _check_card(ev: dict[str, Any], upload_id: int) -> None:
    assert ev["id"] == str(upload_id), ev
    assert ev["no_reload_marker"] == "still-here", "the page reloaded to show the upload"
    for text in (ev["card_text"], ev["page_text"]):
        assert "echo" in text and VOICE in text, ev
    assert ev["title"] == "(1) hushgate", ev["title"]


def test_web_prompt_in_chromium_on_the_lan_allows_and_denies(
    topology: Topology, guards: MakeGuard, tmp_path: Path
) -> None:
    from tests.browser.chromium import png_size, region_colours

    g, token, _ = _web_guard(guards, tls=False)
    # DNS rebinding: a foreign Host header is refused, the router's own address is served.
    status, _, _ = _lan_request(topology, "GET", "/", f"{GW_LAN_V4}:{WEB_PORT}")
    assert status == 200, status
    status, _, body = _lan_request(topology, "GET", "/", "evil.example")
    assert status in (421, 403), (status, body[:200])
    status, _, body = _lan_request(topology, "GET", "/api/pending", f"evil.example:{WEB_PORT}")
    assert status in (421, 403), (status, body[:200])
    status, headers, _ = _lan_request(
        topology, "POST", "/api/login", "evil.example", body=json.dumps({"secret": token}).encode()
    )
    assert status in (421, 403) and "set-cookie" not in headers, (status, headers)

    sp1, conn1 = _allowed_speaker(g)
    SCREENSHOT.unlink(missing_ok=True)
    browser = Browser(
        topology,
        tmp_path / "browser",
        f"http://{WEB_LISTEN}/",
        token,
        ["allow", "deny"],
        screenshot=SCREENSHOT,
    )
    try:
        browser.next("signed_in", timeout_s=40.0)
        sp1.go()
        (up1,), _ = g.wait_pending(1, timeout_s=4.0)
        ev1 = browser.next("decided")
        _check_card(ev1, up1["id"])
        assert ev1["action"] == "allow"
        r1 = _check_delivered(topology, sp1, conn1)
        rec1 = _log_record(g, up1["id"])
        assert rec1["outcome"] == "approved" and str(rec1["decided_by"]).startswith("web"), rec1

        sp2, conn2 = _denied_speaker(g)
        sp2.go()
        (up2,), _ = g.wait_pending(1, timeout_s=4.0, exclude={up1["id"]})
        ev2 = browser.next("decided")
        _check_card(ev2, up2["id"])
        assert ev2["action"] == "deny"
        r2 = _check_reset(topology, sp2, conn2)
        rec2 = _log_record(g, up2["id"])
        assert rec2["outcome"] == "denied" and str(rec2["decided_by"]).startswith("web"), rec2
        browser.next("done")
    except BaseException:
        browser.kill()
        raise
    rc = browser.close()
    assert rc == 0, rc
    lat1 = ev1["seen_at"] - r1["uploads"][0]["start"]
    lat2 = ev2["seen_at"] - r2["uploads"][0]["start"]
    record("web_prompt", shown_after_upload_start_s=[round(lat1, 3), round(lat2, 3)],
           click_to_gone_s=[round(ev1["gone_at"] - ev1["clicked_at"], 3),
                            round(ev2["gone_at"] - ev2["clicked_at"], 3)],
           reset_after_click_s=round(r2["reset_at"] - ev2["clicked_at"], 3))  # fmt: skip
    assert 0 < lat1 <= WEB_WITHIN_S and 0 < lat2 <= WEB_WITHIN_S, (lat1, lat2)
    assert ev1["screenshot"] == str(SCREENSHOT) and SCREENSHOT.exists()
    shot = SCREENSHOT.read_bytes()
    width, height = png_size(shot)
    assert width >= 400 and height >= 800, (width, height)
    # The screenshot shows the card: its area is drawn (text, buttons), not blank, and it lies
    # inside the image.
    x, y, w, h = ev1["card_rect"]
    assert w > 100 and h > 40 and x + w <= width and y + h <= height, (ev1["card_rect"], width)
    colours = region_colours(shot, x, y, w, h)
    assert colours >= 20, f"the card's area has {colours} colours: not rendered"


def test_web_prompt_over_tls_serves_the_pinned_certificate_and_allows(
    topology: Topology, guards: MakeGuard, tmp_path: Path
) -> None:
    g, token, printed = _web_guard(guards, tls=True)
    assert printed is not None
    served = _served_fingerprint(topology)
    assert served == printed, f"served {served}, `web token` printed {printed}"
    status, _, body = _lan_request(topology, "GET", "/", "evil.example", tls=True)
    assert status in (421, 403), (status, body[:200])
    status, headers, _ = _lan_request(
        topology,
        "POST",
        "/api/login",
        f"{GW_LAN_V4}:{WEB_PORT}",
        tls=True,
        body=json.dumps({"secret": token}).encode(),
        headers={"Origin": f"https://{WEB_LISTEN}"},
    )
    assert status == 200, status
    cookie = headers.get("set-cookie", "")
    assert cookie.startswith("__Host-hushgate_session=") and "; Secure" in cookie, cookie

    sp, conn = _allowed_speaker(g)
    browser = Browser(
        topology,
        tmp_path / "browser-tls",
        f"https://{WEB_LISTEN}/",
        token,
        ["allow"],
        insecure=True,
    )
    try:
        browser.next("signed_in", timeout_s=40.0)
        sp.go()
        (up,), _ = g.wait_pending(1, timeout_s=4.0)
        ev = browser.next("decided")
        _check_card(ev, up["id"])
        assert ev["url"].startswith("https://"), ev["url"]
        r = _check_delivered(topology, sp, conn)
        rec = _log_record(g, up["id"])
        assert rec["outcome"] == "approved" and str(rec["decided_by"]).startswith("web"), rec
        browser.next("done")
    except BaseException:
        browser.kill()
        raise
    rc = browser.close()
    assert rc == 0, rc
    record(
        "web_prompt_tls",
        shown_after_upload_start_s=round(ev["seen_at"] - r["uploads"][0]["start"], 3),
    )


# --- the web prompt's listener across restarts and errors ---------------------------------------


def _daemon_output(g: Guard) -> str:
    """What the daemon wrote since its last start."""
    text = g.log_path.read_text(errors="replace")
    return text.rsplit("--- start ", 1)[-1].split("\n", 1)[-1]


def test_web_prompt_comes_back_after_a_restart_while_a_browser_is_connected(
    topology: Topology, guards: MakeGuard
) -> None:
    """A phone with the page open holds a keep-alive connection; the daemon closes it on the way
    out, which leaves the server side of it in TIME_WAIT. The restarted daemon must still bind
    (SO_REUSEADDR), as `systemctl restart hushgate` or a config reload would need."""
    listen = f"{GW_LAN_V4}:{RESTART_PORT}"
    g = guards(sections={"web": {"listen": listen, "tls": False}})

    def open_page() -> http.client.HTTPConnection:
        c = http.client.HTTPConnection(GW_LAN_V4, RESTART_PORT, timeout=5)
        c.request("GET", "/", headers={"Host": listen})
        resp = c.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        return c  # HTTP/1.1: the connection stays open, as a browser's does

    page = topology.call_in("lan", open_page, timeout_s=15.0)
    status: int | str
    try:
        assert g.stop() == 0
        try:
            g.start()
        except GuardError:
            pass
        try:
            status, _, _ = _lan_request(topology, "GET", "/", listen, port=RESTART_PORT)
        except OSError as exc:
            status = f"{type(exc).__name__}: {exc}"
    finally:
        page.close()
    if status != 200 or not g.running:
        # `status` may have answered before the web prompt failed: wait for the verdict.
        rc = g.proc.wait(timeout=10.0) if g.proc is not None else None
        out = _daemon_output(g).strip()
        last = out.splitlines()[-1] if out else "(nothing)"
        pytest.fail(
            f"`hushgate run` did not come back after a restart with a LAN client "
            f"connected to [web] listen = {listen!r}: page {status}, exit {rc}, "
            f"{'a traceback' if 'Traceback' in out else 'no traceback'}, last line: "
            f"{last}"
        )


def test_run_with_a_taken_web_port_exits_1_with_one_line_and_leaves_no_queue_rules(
    topology: Topology, guards: MakeGuard
) -> None:
    """Contract (design.md section 8): a failure is exit 1 with a one-line error, never a
    traceback; and a daemon that could not start leaves none of its queue rules behind."""
    blocker = topology.socket_in("gw")
    try:
        blocker.bind((GW_LAN_V4, BUSY_PORT))
        blocker.listen(1)
        g = guards(
            autostart=False, sections={"web": {"listen": f"{GW_LAN_V4}:{BUSY_PORT}", "tls": False}}
        )
        try:
            g.start()  # `status` may answer before the web prompt tries to listen
        except GuardError:
            pass
        assert g.proc is not None
        try:
            rc = g.proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            pytest.fail("`hushgate run` kept running although its [web] listen port is taken")
        out = _daemon_output(g)
        queue_rules = [r for r in hushgate_rules(topology) if "NFQUEUE" in r]
    finally:
        blocker.close()
    assert rc == 1, (rc, out)
    assert "Traceback" not in out, f"the daemon died with a traceback:\n{out[-1500:]}"
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and str(BUSY_PORT) in lines[0], lines
    assert queue_rules == [], f"queue rules left by the daemon that failed to start: {queue_rules}"
