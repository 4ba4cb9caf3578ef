"""`hushgate watch` in a real pseudo-terminal across a real guard restart (issue 15, point 4).

A real `hushgate run` in the router namespace (tests/e2e/guardkit.py) is stopped and started
again with the same socket and store while watch runs: watch must say the guard is unreachable,
keep going, say it reconnected, and then show a real held upload; that upload is decided from the
CLI (elsewhere), and watch must name the CLI as the decider, as the audit log does. The screen is
read as a terminal shows it (CR and LF only: watch writes no escape sequences).
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from hushsim.topology import Topology
from tests.e2e.guardkit import Guard, MakeGuard, SpeakerRun, cloud_conn

QUEUE = 67  # this module's NFQUEUE number
VOICE = "bob-dispatch-prod-na.amazon.com"
PROFILE = "echo-opus-118"
SCREEN_WAIT_S = 15.0


class Pty:
    """A command in a namespace on a real pseudo-terminal; `screen` is every byte it wrote."""

    def __init__(self, topo: Topology, ns: str, *cmd: str) -> None:
        self.master, slave = os.openpty()
        try:
            self.proc = topo.popen(ns, *cmd, stdin=slave, stdout=slave, stderr=slave, text=False,
                                   start_new_session=True)
        finally:
            os.close(slave)
        self.screen = b""

    def read_until(self, condition: Callable[[bytes], bool],
                   timeout_s: float = SCREEN_WAIT_S) -> bytes:
        deadline = time.monotonic() + timeout_s
        while not condition(self.screen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the terminal never matched; it shows {self.screen[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.2))
            if ready:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    time.sleep(0.05)
        return self.screen

    def after(self, mark: int, text: bytes) -> Callable[[bytes], bool]:
        return lambda s: text in s[mark:]

    def press(self, key: bytes) -> None:
        os.write(self.master, key)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
                self.proc.wait(timeout=5.0)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        os.close(self.master)


def visible(screen: bytes) -> list[str]:
    """The lines a terminal shows after `screen` (CR returns, LF moves down, text overwrites)."""
    lines: list[list[str]] = [[]]
    col = 0
    for ch in screen.decode("ascii", "replace"):
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append([])
            col = 0
        else:
            line = lines[-1]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = ch
            col += 1
    return ["".join(line).rstrip() for line in lines if "".join(line).strip()]


def _held_upload(g: Guard) -> SpeakerRun:
    sp = g.speaker("echo", "--host", VOICE, "-4", "--hold-open", "20", "--max-seconds", "30",
                   "upload", "--profile", PROFILE, wait_file=True)
    info = sp.ready(timeout_s=10.0)
    conn = cloud_conn(g.topo, info["local"], VOICE, handshake=True)
    assert conn["app_bytes"] == 0, conn
    sp.go()
    return sp


def test_watch_survives_a_guard_restart_and_names_who_decided(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards()
    term = Pty(topology, "gw", sys.executable, "-m", "guard.tools.cli", "watch", "--socket",
               str(g.socket))
    try:
        term.read_until(lambda s: b"no uploads pending" in s)
        restart_at = time.monotonic()
        g.stop()  # SIGTERM: the socket goes away
        term.read_until(lambda s: b"guard unreachable" in s and b"retrying in" in s)
        assert term.proc.poll() is None, "watch exited when the guard stopped"
        mark = len(term.screen)
        g.start()  # same config, socket and store
        term.read_until(term.after(mark, b"reconnected to the guard"))
        reconnected_s = time.monotonic() - restart_at
        term.read_until(lambda s: b"no uploads pending" in s[s.rindex(b"reconnected"):])
        shown = visible(term.screen)
        assert not any("retrying" in line for line in shown), shown  # the state line is gone

        mark = len(term.screen)
        sp = _held_upload(g)
        term.read_until(lambda s: re.search(rb"upload (\d+) from echo \(voice\)", s[mark:])
                        is not None)
        m = re.search(rb"upload (\d+) from echo \(voice\)", term.screen[mark:])
        assert m is not None
        upload_id = m.group(1).decode()
        shown = visible(term.screen)
        assert not any("no uploads pending" in line for line in shown), shown  # not stale
        mark = len(term.screen)
        g.cli_ok("deny", upload_id)  # decided elsewhere: the CLI
        record: dict[str, Any] = g.wait_log(
            lambda r: str(r.get("id")) == upload_id and bool(r.get("outcome")), timeout_s=5.0)
        assert record["outcome"] == "denied", record
        said = term.read_until(term.after(mark, f"upload {upload_id} (echo) was denied, "
                                                f"decided by ".encode()))[mark:]
        line = next(x for x in said.decode("ascii", "replace").splitlines()
                    if f"upload {upload_id} (echo) was denied" in x)
        assert "decided by cli" in line, line
        assert "no longer pending" not in said.decode("ascii", "replace")
        result = sp.result(timeout_s=15.0)
        assert result["reset"], result
        term.read_until(term.after(mark, b"no uploads pending"))
        term.press(b"q")
        rc = term.proc.wait(timeout=5.0)
        screen = term.screen
    finally:
        term.close()
    assert rc == 0, screen[-1500:]
    assert b"\x1b" not in screen, "watch wrote an escape sequence"
    print(f"\nwatch reconnected {reconnected_s:.2f} s after the guard was stopped")
    assert reconnected_s < 30.0
