"""`hushgate demo`: a guided tour of the real guard in a throw-away simulated home.

Rules of this module: the demo runs the real `hushgate run` (a subprocess) against the simulated
home of hushsim (network namespaces, an Echo, a router, a cloud), and proves each claim from the
cloud's own counters, never from the guard. Everything it makes is removed when it ends, Ctrl-C
included; it never takes longer than DEMO_BUDGET_S; a failure is one line and exit code 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_BUDGET_S = 55.0  # the whole tour, guard start and clean-up included, stays under a minute
READY_TIMEOUT_S = 10.0
STEP_TIMEOUT_S = 15.0
POLL_S = 0.05
QUEUE = 7
RUN_ARGV = ("-m", "guard.tools.cli", "run")  # the daemon, as `hushgate run` (sys.executable runs it)

ECHO = ("echo", "198.18.10.10", "2001:2:0:10::10", "68:db:f5:90:19:64")  # a real Echo Dot MAC
VOICE = "bob-dispatch-prod-na.amazon.com"
SMART_HOME = "api.amazonalexa.com"
MESSAGING = "alexa-comms-mobile-service.amazon.com"

Out = Callable[[str], Any]


class DemoFailed(Exception):
    """A step did not show what it should; the message is the one-line reason."""


def run_demo(out: Out = print) -> int:
    """Walk a newcomer through hold, allow, deny, block and pass-through with a real guard.
    Returns 0 when every step showed what it should, else 1 after one line saying why."""
    if os.geteuid() != 0:
        out("hushgate demo: needs root (it builds network namespaces): sudo hushgate demo")
        return 1
    from hushsim.topology import Topology, TopologyError, missing_tools

    missing = missing_tools()
    if missing:
        out(f"hushgate demo: missing commands: {', '.join(missing)} (apt-get install them)")
        return 1
    deadline = time.monotonic() + DEMO_BUDGET_S
    topo = Topology(speakers=[ECHO], lifetime_s=DEMO_BUDGET_S + 30)
    try:
        out("hushgate demo: a simulated home in throw-away network namespaces, with a real guard.")
        out("  LAN: an Echo (198.18.10.10); router: `hushgate run`; internet: a simulated cloud")
        out("  that counts every byte it receives. Setting it up...")
        topo.start()
        tour = _Tour(topo, out, deadline)
        try:
            tour.run()
        finally:
            tour.close()
    except DemoFailed as exc:
        out(f"hushgate demo: failed: {exc}")
        return 1
    except KeyboardInterrupt:
        out("hushgate demo: interrupted; everything it made has been removed")
        return 1
    except (TopologyError, OSError, subprocess.SubprocessError, TimeoutError, ValueError) as exc:
        out(f"hushgate demo: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return 1
    finally:
        _close_quietly(topo)
    out("")
    out("That was the real guard. On your router (README, \"Five minutes on a real gateway\"):")
    out("`hushgate firewall apply --config /etc/hushgate/hushgate.toml`, then")
    out("`hushgate run --config /etc/hushgate/hushgate.toml`; `hushgate watch` to answer prompts.")
    return 0


def _close_quietly(topo: Any) -> None:
    """Delete the namespaces and processes; a second Ctrl-C must not interrupt the clean-up."""
    import threading

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        topo.close()
    finally:
        if main:
            signal.signal(signal.SIGINT, old)


class _Tour:
    def __init__(self, topo: Any, out: Out, deadline: float) -> None:
        self.topo = topo
        self.out = out
        self.deadline = deadline
        self.dir = Path(topo.tmp) / "guard"
        self.dir.mkdir(mode=0o700)
        self.socket = self.dir / "control.sock"
        self.config = self.dir / "hushgate.toml"
        self.guard: subprocess.Popen[Any] | None = None
        self.speakers: list[subprocess.Popen[Any]] = []
        self._n = 0

    # plumbing ----------------------------------------------------------------------------

    def left(self, want: float = STEP_TIMEOUT_S) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DemoFailed(f"the demo took longer than {DEMO_BUDGET_S:.0f} s")
        return min(want, left)

    def say(self, text: str = "") -> None:
        self.out(text)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.topo.run(
            "gw", sys.executable, "-m", "guard.tools.cli", *args, "--socket", str(self.socket),
            check=False, timeout=self.left(10.0),
        )  # fmt: skip

    def typed(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a command the way a user would type it, and show it with its output."""
        self.say(f"  $ hushgate {' '.join(args)}")
        res = self.cli(*args)
        for line in (res.stdout + res.stderr).rstrip().splitlines():
            self.say(f"    {line}")
        if res.returncode != 0:
            raise DemoFailed(f"`hushgate {' '.join(args)}` exited with {res.returncode}")
        return res

    def cli_json(self, *args: str) -> Any:
        res = self.cli(*args, "--json")
        if res.returncode != 0:
            raise DemoFailed(f"`hushgate {' '.join(args)} --json`: {res.stderr.strip()[:200]}")
        return json.loads(res.stdout)

    def start_guard(self) -> None:
        v4, mac = ECHO[1], ECHO[3]
        self.config.write_text(
            "[guard]\n"
            f"queue = {QUEUE}\n"
            'fail = "closed"\n'
            "hold_timeout_s = 20\n"
            f'socket = "{self.socket}"\n'
            f'state_db = "{self.dir / "state.db"}"\n'
            "\n[metrics]\n"
            'listen = ""\n'
            "\n[[device]]\n"
            'name = "kitchen-echo"\n'
            f'mac = "{mac}"\n'
            f'address = "{v4}"\n'
            'mode = "strict"\n'
        )
        log = (self.dir / "daemon.log").open("w")
        self.guard = self.topo.popen(
            "gw", sys.executable, *RUN_ARGV, "--config", str(self.config),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        end = time.monotonic() + self.left(READY_TIMEOUT_S)
        for _ in range(int(READY_TIMEOUT_S / POLL_S) + 2):
            if self.guard.poll() is not None:
                tail = (self.dir / "daemon.log").read_text(errors="replace").strip()
                last = tail.splitlines()[-1] if tail else "no output"
                raise DemoFailed(f"`hushgate run` exited with {self.guard.returncode}: {last}")
            if self.socket.exists() and self.cli("status", "--json").returncode == 0:
                return
            if time.monotonic() >= end:
                break
            time.sleep(POLL_S)
        raise DemoFailed(f"`hushgate run` did not answer within {READY_TIMEOUT_S:.0f} s")

    def speaker(self, *args: str, wait: bool = False) -> tuple[subprocess.Popen[str], Path, Path]:
        """The speaker simulator in the Echo's namespace; (process, ready file, go file)."""
        self._n += 1
        ready, go = self.dir / f"speaker{self._n}.ready", self.dir / f"speaker{self._n}.go"
        mode_at = next(i for i, a in enumerate(args) if a in ("upload", "events", "rtt"))
        head, tail = list(args[:mode_at]), list(args[mode_at:])
        if wait:
            tail += ["--wait-file", str(go)]
        proc = self.topo.speaker_popen(
            "echo", *head, "--ready-file", str(ready), "--max-seconds", f"{self.left(30):.0f}",
            *tail,
        )  # fmt: skip
        self.speakers.append(proc)
        return proc, ready, go

    def wait_ready(self, proc: subprocess.Popen[str], ready: Path) -> dict[str, Any]:
        end = time.monotonic() + self.left(10.0)
        for _ in range(int(10.0 / POLL_S) + 2):
            if ready.exists() and ready.read_text().strip():
                try:
                    return dict(json.loads(ready.read_text()))
                except ValueError:
                    pass
            if proc.poll() is not None:
                raise DemoFailed("the simulated Echo could not connect to the cloud")
            if time.monotonic() >= end:
                break
            time.sleep(POLL_S)
        raise DemoFailed("the simulated Echo did not connect within 10 s")

    def result(self, proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
        from hushsim.topology import parse_speaker_output

        try:
            out, err = proc.communicate(timeout=self.left(timeout_s))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)
            raise DemoFailed("the simulated Echo did not finish in time") from None
        return parse_speaker_output(out, err)

    def conn(self, since: float, host: str) -> dict[str, Any]:
        """The cloud's record of the Echo's connection opened at or after `since`: through the
        relay the cloud sees the router's own socket, so it is found by host and time, not by
        the Echo's port."""
        def mine(c: dict[str, Any]) -> bool:
            return c["host"] == host and c["opened"] >= since and c["handshake_done"] is not None

        stats = self.topo.cloud.wait_for(lambda s: any(mine(c) for c in s["tcp"]),
                                         timeout_s=self.left(5.0))
        return max((c for c in stats["tcp"] if mine(c)), key=lambda c: c["id"])

    def cloud_bytes(self, conn_id: int) -> int:
        return int(
            next(c for c in self.topo.cloud.stats()["tcp"] if c["id"] == conn_id)["app_bytes"]
        )

    def held_upload(
        self, hold_open_s: float = 0.0
    ) -> tuple[subprocess.Popen[str], dict[str, Any], dict[str, Any]]:
        """Connect the Echo, start an upload, wait until the guard holds it; (speaker, cloud
        connection, pending upload). `hold_open_s` keeps the connection open after the upload
        (to see a reset that comes later)."""
        since = time.time()
        proc, ready, go = self.speaker(
            "--host", VOICE, "-4", "--hold-open", str(hold_open_s), "upload", wait=True
        )
        self.wait_ready(proc, ready)
        conn = self.conn(since, VOICE)
        go.touch()
        end = time.monotonic() + self.left(5.0)
        for _ in range(int(5.0 / POLL_S) + 2):
            pending = self.cli_json("pending")
            if pending:
                return proc, conn, pending[0]
            if time.monotonic() >= end:
                break
            time.sleep(POLL_S)
        raise DemoFailed("the guard did not hold the Echo's upload within 5 s")

    # the tour ---------------------------------------------------------------------------

    def run(self) -> None:
        self.say(f"  $ hushgate run --config {self.config}   (on the router)")
        self.start_guard()
        self.say(
            "  The guard is running, fail-closed; the Echo ('kitchen-echo') is in strict mode."
        )
        self.say(f"  (The demo adds --socket {self.socket} to every command below.)")

        self.say("")
        self.say(f"Step 1/5: the Echo starts streaming audio to {VOICE}.")
        proc, conn, up = self.held_upload()
        self.say("  hushgate holds it before a single audio byte leaves the house:")
        self.typed("pending")
        time.sleep(0.3)
        if self.cloud_bytes(conn["id"]) != 0:
            raise DemoFailed("step 1: the cloud received bytes of the held upload")
        self.say("  The cloud has received 0 bytes of this upload.")

        self.say("")
        self.say("Step 2/5: you approve it.")
        self.typed("allow", str(up["id"]))
        res = self.result(proc, 15.0)
        if res["error"] or res["reset"]:
            raise DemoFailed(f"step 2: the allowed upload did not complete: {res['error']}")
        final = self.topo.cloud.wait_for(
            lambda s: any(c["id"] == conn["id"] and c["sha256"] == res["sha256"] for c in s["tcp"]),
            timeout_s=self.left(5.0),
        )
        got = next(c for c in final["tcp"] if c["id"] == conn["id"])
        self.say(f"  Released in order: the cloud received all {got['app_bytes']:,} bytes;")
        self.say(f"  SHA-256 at the Echo and at the cloud: {res['sha256'][:16]}... (identical).")

        self.say("")
        self.say(
            "Step 3/5: the Echo wakes again (say, on a word from the TV); this time you say no."
        )
        proc, conn, up = self.held_upload()
        self.typed("pending")
        denied_at = time.time()
        self.typed("deny", str(up["id"]))
        res = self.result(proc, 10.0)
        if not res["reset"]:
            raise DemoFailed("step 3: the denied upload's connection was not reset")
        if self.cloud_bytes(conn["id"]) != 0:
            raise DemoFailed("step 3: the cloud received bytes of the denied upload")
        self.say(
            f"  The Echo's connection was reset {max(0.0, res['reset_at'] - denied_at):.2f} s "
            "later (it reconnects at once,"
        )
        self.say("  as after any network hiccup); the cloud received 0 bytes of the upload.")

        self.say("")
        self.say(
            f"Step 4/5: the Echo opens a messaging connection (calls, Drop-In) to {MESSAGING}."
        )
        proc, _, _ = self.speaker("--host", MESSAGING, "-4", "events", "--count", "1")
        res = self.result(proc, 10.0)
        error = (res["error"] or "").lower()
        if not (res["reset"] or "refused" in error or "reset" in error):
            raise DemoFailed(f"step 4: the messaging connection was not blocked: {res}")
        leaked = [
            c for c in self.topo.cloud.stats()["tcp"] if c["host"] == MESSAGING and c["app_bytes"]
        ]
        if leaked:
            raise DemoFailed("step 4: the messaging host received data")
        self.say(
            f"  Blocked outright: refused after {res['ended_at'] - res['started_at']:.2f} s, "
            "no prompt; the cloud received nothing."
        )
        self.say("  Messaging is blocked by default; smart-home, media and updates are allowed.")

        self.say("")
        self.say(
            f"Step 5/5: an upload is held, and meanwhile a smart-home request to {SMART_HOME}."
        )
        proc, conn, up = self.held_upload(hold_open_s=10.0)
        rtt_proc, _, _ = self.speaker("--host", SMART_HOME, "-4", "rtt", "20")
        res = self.result(rtt_proc, 10.0)
        if res["error"]:
            raise DemoFailed(f"step 5: the smart-home request failed: {res['error']}")
        still = [p["id"] for p in self.cli_json("pending")]
        if up["id"] not in still or self.cloud_bytes(conn["id"]) != 0:
            raise DemoFailed("step 5: the held upload did not stay held")
        self.say(
            f"  20 requests answered, median {res['rtt_ms']['p50']:.2f} ms: smart-home traffic "
            "(lights, thermostat)"
        )
        self.say("  goes through untouched,")
        self.say("  while the upload stays held (the cloud has 0 bytes of it). Dismiss it:")
        self.typed("deny", str(up["id"]))
        self.result(proc, 10.0)
        self.say("")
        self.say("Every step checked against the cloud's own byte counters: the demo passed.")

    def close(self) -> None:
        """Stop the speakers and the guard by PID (the namespaces go with the topology)."""
        for proc in [*self.speakers, *([self.guard] if self.guard else [])]:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=3.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    try:
                        proc.wait(timeout=3.0)
                    except subprocess.TimeoutExpired:
                        pass
                except ProcessLookupError:
                    pass
