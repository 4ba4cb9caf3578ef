"""`hushgate watch` in a real pseudo-terminal against a real control socket (design.md 8, 10)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guard.shell.control import ControlServer, reply_error, reply_ok
from guard.tools.watch import clean, run_watch

REPO = Path(__file__).resolve().parents[1]
HOSTILE_HOST = "<b>x</b>\x1b[2J\x1b]0;pwn\x07" + "A" * 255


class FakeDaemon:
    """Serves one pending upload until it is decided; records every decide."""

    def __init__(self, host: str | None = HOSTILE_HOST) -> None:
        now = time.time()
        self.upload = {"id": 7, "device": "kitchen-echo", "remote": "52.94.233.109:443",
                       "host": host, "category": "voice", "held_packets": 11,
                       "held_bytes": 14336, "started": now - 3, "expires": now + 17}
        self.decided: list[dict[str, Any]] = []
        self.refuse = False
        self.hidden = False  # not held yet: `pending` answers []
        self.elsewhere: dict[str, Any] | None = None  # decided by someone else: its log record
        self.log_calls = 0
        self.server: ControlServer | None = None
        self.lock = threading.Lock()

    def decide_elsewhere(self, outcome: str, by: str, via: str | None = None) -> None:
        with self.lock:
            self.elsewhere = {"id": 7, "device": "kitchen-echo", "host": "x", "remote": "y",
                              "category": "voice", "bytes": 1, "packets": 1, "started": 0.0,
                              "decided_at": 1.0, "outcome": outcome, "decided_by": by}
            if via is not None:
                self.elsewhere["via"] = via

    def handle(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        with self.lock:
            if request["cmd"] == "pending":
                gone = self.decided or self.hidden or self.elsewhere
                return reply_ok([] if gone else [self.upload])
            if request["cmd"] == "log":
                self.log_calls += 1
                other = {"id": 6, "device": "kitchen-echo", "outcome": "denied",
                         "decided_by": "web"}
                return reply_ok([self.elsewhere, other] if self.elsewhere else [other])
            if request["cmd"] == "decide":
                if self.refuse or self.decided or request.get("id") != 7:
                    return reply_error(f"no pending upload {request.get('id')}")
                self.decided.append(request)
                return reply_ok(self.upload)
        return reply_error("unknown command")


@pytest.fixture
def daemon() -> Iterator[tuple[str, FakeDaemon]]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer
    directory = tempfile.mkdtemp(prefix="hg-watch-", dir="/tmp")
    path = os.path.join(directory, "control.sock")
    fake = FakeDaemon()
    server = ControlServer(path, fake.handle)
    server.start()
    fake.server = server
    try:
        yield path, fake
    finally:
        server.stop()
        os.rmdir(directory)


class Terminal:
    """`run_watch` in a child process whose stdin/stdout/stderr are a pseudo-terminal."""

    def __init__(self, socket_path: str, retry_for_s: float = 600.0) -> None:
        self.master, self.slave = os.openpty()
        self.before = termios.tcgetattr(self.slave)
        code = ("import sys; from guard.tools.watch import run_watch; "
                f"sys.exit(run_watch({socket_path!r}, poll_s=0.1, retry_for_s={retry_for_s!r}))")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=self.slave,
                                     stdout=self.slave, stderr=self.slave, cwd=REPO, env=env,
                                     start_new_session=True)
        self.screen = b""

    def read_until(self, condition: Callable[[bytes], bool], timeout_s: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout_s
        while not condition(self.screen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"screen never matched; it shows {self.screen!r}")
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.2))
            if ready:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    time.sleep(0.05)
        return self.screen

    def press(self, key: bytes) -> None:
        os.write(self.master, key)

    def wait(self, timeout_s: float = 10.0) -> int:
        code = self.proc.wait(timeout=timeout_s)
        with contextlib.suppress(AssertionError):
            self.read_until(lambda s: False, 0.2)  # whatever it printed last
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal(daemon: tuple[str, FakeDaemon]) -> Iterator[Terminal]:
    term = Terminal(daemon[0])
    try:
        yield term
    finally:
        term.close()


def shows_the_upload(screen: bytes) -> bool:
    return b"upload 7 from kitchen-echo" in screen and b"expires in" in screen


def wait_decided(fake: FakeDaemon, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not fake.decided:
        assert time.monotonic() < deadline, "no decide arrived"
        time.sleep(0.02)
    return fake.decided[0]


def test_hostile_host_is_shown_inert(daemon, terminal: Terminal) -> None:
    screen = terminal.read_until(shows_the_upload)
    assert clean(HOSTILE_HOST).encode() in screen
    assert b"<b>x</b>??AAAA" in screen
    assert b"\x1b" not in screen and b"\x07" not in screen and b"pwn" not in screen
    assert b"A" * 81 not in screen  # capped at 80 characters
    assert b"11 pkt/14 KB held" in screen
    terminal.press(b"q")
    assert terminal.wait() == 0
    assert daemon[1].decided == []


@pytest.mark.parametrize(("key", "verb", "scope", "duration_s"), [
    (b"a", "allow", "once", None),
    (b"d", "deny", "once", None),
    (b"w", "allow", "for", 1800.0),
])
def test_a_key_sends_its_decision(daemon, terminal: Terminal, key: bytes, verb: str, scope: str,
                                  duration_s: float | None) -> None:
    terminal.read_until(shows_the_upload)
    terminal.press(key)
    decided = wait_decided(daemon[1])
    assert decided == {"cmd": "decide", "id": 7, "verb": verb, "scope": scope,
                       "duration_s": duration_s, "by": "watch"}
    terminal.read_until(lambda s: b"no uploads pending" in s)
    terminal.press(b"q")
    assert terminal.wait() == 0
    assert termios.tcgetattr(terminal.slave) == terminal.before  # the terminal is restored


def test_other_keys_and_escape_sequences_decide_nothing(daemon, terminal: Terminal) -> None:
    terminal.read_until(shows_the_upload)
    terminal.press(b"xz\x1b[A\x1bOA\x1b[D")  # arrow keys end in letters: they are not keys
    time.sleep(0.5)
    assert daemon[1].decided == []
    terminal.press(b"s")  # skip: with one upload it stays the current one
    time.sleep(0.3)
    terminal.press(b"q")
    assert terminal.wait() == 0
    assert daemon[1].decided == []


def test_sigint_restores_the_terminal(daemon, terminal: Terminal) -> None:
    terminal.read_until(shows_the_upload)
    assert not termios.tcgetattr(terminal.slave)[3] & termios.ICANON  # cbreak while running
    terminal.proc.send_signal(signal.SIGINT)
    assert terminal.wait() == 130
    assert termios.tcgetattr(terminal.slave) == terminal.before


def test_sigterm_restores_the_terminal(daemon, terminal: Terminal) -> None:
    terminal.read_until(shows_the_upload)
    terminal.proc.send_signal(signal.SIGTERM)
    assert terminal.wait() == 130
    assert termios.tcgetattr(terminal.slave) == terminal.before


def test_unreachable_daemon_is_one_line_and_exit_1(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = run_watch(str(tmp_path / "nobody.sock"), stdin=io.StringIO("a\n"), stdout=out,
                     stderr=err)
    assert code == 1
    assert out.getvalue() == ""
    assert err.getvalue().startswith("hushgate: cannot reach hushgate at ")
    assert err.getvalue().count("\n") == 1


def test_line_mode_without_a_terminal(daemon) -> None:
    path, fake = daemon
    out = io.StringIO()
    code = run_watch(path, stdin=io.StringIO("d\n"), stdout=out, poll_s=0.05)
    assert code == 0
    assert fake.decided[0]["verb"] == "deny" and fake.decided[0]["id"] == 7
    assert "\x1b" not in out.getvalue() and "denied" in out.getvalue()


def test_once_returns_after_the_first_decision(daemon) -> None:
    path, fake = daemon
    code = run_watch(path, stdin=io.StringIO("a\nd\n"), stdout=io.StringIO(), poll_s=0.05,
                     once=True)
    assert code == 0 and [d["verb"] for d in fake.decided] == ["allow"]


def test_a_refused_decision_is_one_line_and_watch_goes_on(daemon) -> None:
    path, fake = daemon
    fake.refuse = True  # e.g. it expired between the screen and the key
    out = io.StringIO()
    code = run_watch(path, stdin=io.StringIO("a\nq\n"), stdout=out, poll_s=0.05)
    assert code == 0 and fake.decided == []
    assert "could not decide upload 7 (kitchen-echo): no pending upload 7\n" in out.getvalue()


@pytest.mark.parametrize("text", [
    "\x1b[31mred\x1b[0m", "\x1b]0;title\x07x", "\x1bPdcs\x1b\\y", "a\x9bb", "tab\there",
    "nul\x00", "\u202eevil", "\r\nline",
])
def test_clean_leaves_printable_ascii_only(text: str) -> None:
    shown = clean(text)
    assert all(" " <= c <= "~" for c in shown) and len(shown) <= 80


def test_clean_caps_long_names() -> None:
    assert clean("A" * 255) == "A" * 77 + "..."
    assert clean("bob-dispatch-prod-na.amazon.com") == "bob-dispatch-prod-na.amazon.com"
    assert json.dumps(clean(None)) == '""'


# --- the guard restarts; uploads decided elsewhere; stale status lines (issue 15, point 4) ------


def visible(screen: bytes, width: int = 200) -> list[str]:
    """What a terminal shows after `screen`: CR returns to the line's start, LF moves down,
    characters overwrite (watch writes nothing else: no escape sequences)."""
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
            if col >= width:
                continue
            line.extend(" " * (col + 1 - len(line)))
            line[col] = ch
            col += 1
    return ["".join(line).rstrip() for line in lines]


def test_watch_reconnects_when_the_guard_comes_back(daemon, terminal: Terminal) -> None:
    path, fake = daemon
    terminal.read_until(shows_the_upload)
    server = ControlServer(path, fake.handle)
    # The fixture's server goes away (a restart), then a new one answers on the same path.
    assert fake.server is not None
    fake.server.stop()
    terminal.read_until(lambda s: b"guard unreachable" in s and b"retrying in" in s)
    assert terminal.proc.poll() is None, "watch exited when the guard went away"
    mark = len(terminal.screen)
    server.start()
    try:
        terminal.read_until(lambda s: b"reconnected to the guard" in s[mark:])
        terminal.read_until(lambda s: b"expires in" in s[s.index(b"reconnected", mark):])
        shown = [line for line in visible(terminal.screen) if line]
        assert not any("retrying" in line for line in shown), shown  # the state line is gone
        terminal.press(b"a")  # and the upload shown again can be answered
        assert wait_decided(fake)["verb"] == "allow"
        terminal.press(b"q")
        assert terminal.wait() == 0
        assert termios.tcgetattr(terminal.slave) == terminal.before
        assert b"\x1b" not in terminal.screen
    finally:
        server.stop()


def test_watch_gives_up_after_retry_for_s(tmp_path: Path) -> None:
    directory = tempfile.mkdtemp(prefix="hg-watch-", dir="/tmp")
    path = os.path.join(directory, "control.sock")
    fake = FakeDaemon()
    server = ControlServer(path, fake.handle)
    server.start()
    read_fd, write_fd = os.pipe()  # input that never ends and never says anything
    out, err = io.StringIO(), io.StringIO()
    result: list[int] = []
    with os.fdopen(read_fd, "r") as stdin:
        thread = threading.Thread(target=lambda: result.append(run_watch(
            path, stdin=stdin, stdout=out, stderr=err, poll_s=0.05, retry_for_s=1.5)))
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while "expires in" not in out.getvalue():
                assert time.monotonic() < deadline, out.getvalue()
                time.sleep(0.02)
            server.stop()
            started = time.monotonic()
            thread.join(timeout=15)
            took = time.monotonic() - started
        finally:
            os.close(write_fd)
            thread.join(timeout=5)
            os.rmdir(directory)
    assert result == [1], out.getvalue()
    assert 1.0 <= took <= 6.0, took  # bounded: gave up after about retry_for_s
    assert "guard unreachable: cannot reach hushgate" in out.getvalue()
    assert "retrying in" in out.getvalue()
    assert err.getvalue().startswith("hushgate: gave up: the guard was unreachable for ")
    assert err.getvalue().count("\n") == 1


@pytest.mark.parametrize(("outcome", "by", "via", "says"), [
    ("approved", "web", None, "upload 7 (kitchen-echo) was allowed, decided by web"),
    ("denied", "mqtt", "mqtt", "upload 7 (kitchen-echo) was denied, decided by mqtt"),
    ("expired", "expiry", "expiry", "upload 7 (kitchen-echo) expired (nobody answered in time): "
                                    "denied, decided by expiry"),
    ("window", "window", None, "upload 7 (kitchen-echo) passed: an allow window was open, "
                               "decided by window"),
    ("denied", "cli:anna (uid 1000)", "cli",
     "upload 7 (kitchen-echo) was denied, decided by cli (cli:anna (uid 1000))"),
    ("quiet", "quiet window", "quiet", "upload 7 (kitchen-echo) was denied: a quiet window (mute) "
                                       "was on, decided by quiet (quiet window)"),
    ("approved", "ntfy\x1b[2J<i>", None, "upload 7 (kitchen-echo) was allowed, decided by ntfy?<i>"),
])
def test_an_upload_decided_elsewhere_says_who_decided_it(daemon, terminal: Terminal,
                                                         outcome: str, by: str, via: str | None,
                                                         says: str) -> None:
    fake = daemon[1]
    terminal.read_until(shows_the_upload)
    fake.decide_elsewhere(outcome, by, via)
    screen = terminal.read_until(lambda s: says.encode() in s)
    assert b"no longer pending" not in screen
    terminal.read_until(lambda s: b"no uploads pending" in s)
    terminal.press(b"q")
    assert terminal.wait() == 0
    assert b"\x1b" not in terminal.screen and fake.decided == []


def test_an_upload_missing_from_the_log_is_still_reported(daemon) -> None:
    path, fake = daemon
    read_fd, write_fd = os.pipe()
    out = io.StringIO()
    result: list[int] = []
    with os.fdopen(read_fd, "r") as stdin:
        thread = threading.Thread(target=lambda: result.append(run_watch(
            path, stdin=stdin, stdout=out, poll_s=0.05)))
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while "expires in" not in out.getvalue():
                assert time.monotonic() < deadline
                time.sleep(0.02)
            fake.hidden = True  # gone, and the log knows nothing about it
            while "no longer pending" not in out.getvalue():
                assert time.monotonic() < deadline, out.getvalue()
                time.sleep(0.02)
        finally:
            os.write(write_fd, b"q\n")
            os.close(write_fd)
            thread.join(timeout=5)
    assert result == [0]
    assert ("upload 7 (kitchen-echo) is no longer pending (decided elsewhere; not in the audit "
            "log yet)") in out.getvalue()
    assert fake.log_calls >= 2  # it waited a poll or two for the log to catch up


def test_no_stale_status_line_stays_on_screen(daemon, terminal: Terminal) -> None:
    fake = daemon[1]
    with fake.lock:
        fake.hidden = True
    terminal.read_until(lambda s: b"no uploads pending" in s)
    with fake.lock:
        fake.hidden = False  # an upload arrives
    terminal.read_until(shows_the_upload)
    shown = visible(terminal.screen)
    assert not any("no uploads pending" in line for line in shown), shown
    assert any(line.startswith("upload 7 from kitchen-echo") for line in shown), shown
    fake.decide_elsewhere("denied", "web")  # and goes
    terminal.read_until(lambda s: b"decided by web" in s
                        and b"no uploads pending" in s[s.index(b"decided by web"):])
    shown = visible(terminal.screen)
    assert not any("expires in" in line for line in shown), shown  # its countdown is gone
    assert sum("no uploads pending" in line for line in shown) == 1, shown
    terminal.press(b"q")
    assert terminal.wait() == 0


def test_giving_up_restores_the_terminal(daemon) -> None:
    path, fake = daemon
    term = Terminal(path, retry_for_s=1.0)
    try:
        term.read_until(shows_the_upload)
        assert fake.server is not None
        fake.server.stop()
        assert term.wait(timeout_s=10) == 1
        assert b"hushgate: gave up: the guard was unreachable for " in term.screen
        assert termios.tcgetattr(term.slave) == term.before
        assert b"\x1b" not in term.screen
    finally:
        term.close()
