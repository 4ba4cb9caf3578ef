"""`hushgate watch`: an interactive terminal prompt for pending uploads.

Rules of this module: it is a control-socket client and nothing more (the daemon decides; we send
`decide` with by="watch"). Every string the daemon hands us is shown through `clean()` (host names
come from the speaker: SNI, DNS), so nothing a speaker sends can move the cursor, retitle the
window or clear the screen, and watch itself writes no escape sequences at all (a status line is
rewritten and wiped with CR and spaces only). The terminal is restored on every way out (return,
exception, SIGINT, SIGTERM, SIGHUP).

When the guard goes away (a restart, an upgrade), watch says so on its status line and tries
again with backoff (RETRY_S, doubling up to RETRY_MAX_S) for at most `retry_for_s` seconds, then
gives up with one line and exit 1; keys are read meanwhile, so `q` still quits. An upload that
leaves the pending list without a key pressed here was decided elsewhere: watch reads who did
from the daemon's audit log (`log`: outcome and `decided_by`) and says so.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

from guard.shell.control import ControlError, request

__all__ = ["KEYS", "RETRY_FOR_S", "WINDOW_S", "clean", "run_watch"]

WINDOW_S = 1800.0  # `w`: allow this device+category for 30 minutes
RETRY_S = 0.5  # first wait before reconnecting to a guard that went away
RETRY_MAX_S = 5.0  # the longest wait between two attempts
RETRY_FOR_S = 600.0  # give up when the guard stays unreachable this long
LOG_TRIES = 3  # polls to wait for a decision to reach the audit log before saying "unknown"
HOST_CHARS = 80
KEYS = "a = allow once, d = deny, w = allow 30 min, s = skip, q = quit"

# An escape sequence as terminals parse it: CSI (ESC [ params final), OSC/DCS/PM/APC/SOS strings
# (ended by BEL or ST), or a two-byte ESC sequence. Each is replaced by one '?' as a whole, so a
# hostile name reads "?x" rather than "?[2Jx".
_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[ -~]?"
)


def clean(text: object, cap: int = HOST_CHARS) -> str:
    """`text` as printable ASCII only, at most `cap` characters; escapes and controls -> '?'."""
    if text is None:
        return ""
    value = str(text)[: cap * 8]  # bound the work on a 10 kB name before the regex runs
    value = _ESCAPE.sub("?", value)
    value = "".join(c if " " <= c <= "~" else "?" for c in value)
    if len(value) > cap:
        value = value[: max(0, cap - 3)] + "..."
    return value


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if number == number else 0.0


def _size(n_bytes: float) -> str:
    if n_bytes < 1024:
        return f"{int(n_bytes)} B"
    if n_bytes < 1024 * 1024:
        return f"{round(n_bytes / 1024)} KB"
    return f"{n_bytes / (1024 * 1024):.1f} MB"


class _Interrupted(Exception):
    """SIGTERM or SIGHUP arrived: leave like Ctrl-C does."""


class _Keys:
    """Key presses from stdin: single keys in cbreak mode on a TTY, first characters of lines
    otherwise. `get(timeout_s)` -> the keys read (possibly ""), or None at end of input."""

    def __init__(self, stdin: TextIO) -> None:
        self.stdin = stdin
        try:
            self.fd: int | None = stdin.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self.fd = None
        self.tty = self.fd is not None and os.isatty(self.fd)
        self._saved: Any = None
        self._line = b""

    @contextlib.contextmanager
    def active(self) -> Iterator[_Keys]:
        if not self.tty:
            yield self
            return
        import termios
        import tty

        assert self.fd is not None
        try:
            self._saved = termios.tcgetattr(self.fd)
        except termios.error:  # a terminal we may not configure: read lines instead
            self.tty = False
            yield self
            return
        try:
            tty.setcbreak(self.fd, termios.TCSANOW)  # keeps ISIG: Ctrl-C still interrupts
            yield self
        finally:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def flush(self) -> None:
        """Forget typeahead: a key pressed for one upload must not decide the next one."""
        if self.tty:
            import termios

            with contextlib.suppress(termios.error, OSError):
                termios.tcflush(self.fd, termios.TCIFLUSH)

    def get(self, timeout_s: float) -> str | None:
        if self.fd is None:  # a file-like object without a descriptor: plain blocking lines
            line = self.stdin.readline()
            return None if not line else line.strip()[:1]
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout_s))
        if not ready:
            return ""
        data = os.read(self.fd, 1024)
        if not data:
            if self._line.strip():  # a last line without a newline still counts
                key, self._line = self._line.decode("ascii", "replace").strip()[:1], b""
                return key
            return None
        if self.tty:
            # An escape sequence (arrow keys, function keys) ends the useful part of the read:
            # its letters must not count as keys.
            return data.split(b"\x1b", 1)[0].decode("ascii", "replace")
        self._line += data
        keys = []
        while b"\n" in self._line:
            line, self._line = self._line.split(b"\n", 1)
            keys.append(line.decode("ascii", "replace").strip()[:1])
        self._line = self._line[-1024:]
        return "".join(keys)


_UNSET = object()


class _Screen:
    """Plain text output; on a terminal the status line is rewritten in place with CR only."""

    def __init__(self, stdout: TextIO) -> None:
        self.out = stdout
        try:
            self.tty = stdout.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._status_len = 0
        self._text = ""
        self._topic: Any = _UNSET

    def line(self, text: str) -> None:
        self._end_status()
        self.out.write(text + "\n")
        self.out.flush()

    def status(self, text: str, topic: Any) -> None:
        """Show `text`: rewritten in place on a terminal; elsewhere once per `topic`, since a
        countdown printed every second would bury everything else."""
        if self.tty:
            if topic == self._topic and text == self._text:
                return
            pad = " " * max(0, self._status_len - len(text))
            self.out.write("\r" + text + pad + "\r" + text)
            self._status_len = len(text)
            self._text = text
            self._topic = topic
        elif topic != self._topic:
            self.out.write(text + "\n")
            self._topic = topic
        self.out.flush()

    def _end_status(self) -> None:
        # A status line is transient ("no uploads pending", a countdown, "guard unreachable"):
        # it is wiped, not left above what comes next, so it never reads as current.
        if self.tty and self._status_len:
            self.out.write("\r" + " " * self._status_len + "\r")
        self._status_len = 0
        self._topic = _UNSET
        self._text = ""

    def close(self) -> None:
        self._end_status()
        self.out.flush()


def _describe(upload: dict[str, Any]) -> list[str]:
    target = clean(upload.get("host")) or clean(upload.get("remote"), 60)
    lines = [
        f"upload {clean(upload.get('id'), 20)} from {clean(upload.get('device'), 64)} "
        f"({clean(upload.get('category'), 32) or 'unknown'})",
        f"  to   {target}",
    ]
    if upload.get("host"):
        lines.append(f"  at   {clean(upload.get('remote'), 60)}")
    lines.append(f"  keys {KEYS}")
    return lines


def _status(upload: dict[str, Any], others: int, now: float) -> str:
    waiting = max(0, int(now - _number(upload.get("started"))))
    left = max(0, int(round(_number(upload.get("expires")) - now)))
    held = f"{int(_number(upload.get('held_packets')))} pkt/{_size(_number(upload.get('held_bytes')))}"
    more = f", +{others} more" if others else ""
    return f"  waiting {waiting} s, {held} held, expires in {left} s{more} > "


def run_watch(
    socket_path: str,
    *,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    stderr: TextIO | None = None,
    poll_s: float = 0.5,
    once: bool = False,
    retry_for_s: float = RETRY_FOR_S,
) -> int:
    """Prompt for pending uploads until `q`, end of input or Ctrl-C. Returns the exit code:
    0 on `q`/end of input (or after the first decision with `once`), 1 when the daemon cannot be
    reached at start, or stays unreachable for `retry_for_s` seconds later on (one line on
    stderr), 130 on SIGINT/SIGTERM/SIGHUP."""
    err = stderr if stderr is not None else sys.stderr
    try:
        pending = _pending(socket_path)
    except ControlError as exc:
        err.write(f"hushgate: {clean(exc, 200)}\n")
        err.flush()
        return 1
    except KeyboardInterrupt:
        return 130
    keys = _Keys(stdin)
    screen = _Screen(stdout)
    restore = _trap_signals()
    try:
        with keys.active():
            return _Watch(socket_path, keys, screen, err, poll_s, once, retry_for_s).run(pending)
    except (KeyboardInterrupt, _Interrupted):
        return 130
    finally:
        screen.close()
        restore()


def _pending(socket_path: str) -> list[dict[str, Any]]:
    result = request(socket_path, {"cmd": "pending"})
    if not isinstance(result, list):
        raise ControlError("bad reply to pending: not a list")
    return sorted((u for u in result if isinstance(u, dict) and "id" in u),
                  key=lambda u: _number(u.get("id")))


# What an audit record's outcome says about an upload decided elsewhere (policy.Outcome values).
_OUTCOME_TEXT = {
    "approved": "was allowed",
    "denied": "was denied",
    "expired": "expired (nobody answered in time): denied",
    "window": "passed: an allow window was open",
    "quiet": "was denied: a quiet window (mute) was on",
    "rule": "was decided by an always-rule",
    "monitored": "passed: monitor mode",
    "capped": "was denied: held memory was full",
    "lost": "was lost: the guard restarted",
}


def decided_elsewhere(upload_id: Any, device: Any, record: dict[str, Any] | None) -> str:
    """The line for an upload that left the pending list without a key pressed here."""
    name = f"upload {clean(upload_id, 20)} ({clean(device, 64)})"
    if record is None:
        return f"{name} is no longer pending (decided elsewhere; not in the audit log yet)"
    outcome = clean(record.get("outcome"), 32)
    what = _OUTCOME_TEXT.get(outcome, f"was decided: {outcome or 'unknown outcome'}")
    # `via` is the channel (web, mqtt, ntfy, cli, watch, expiry, window, rule...); `decided_by`
    # says who in full ("cli:anna (uid 1000)"). Older daemons send decided_by only.
    via = clean(record.get("via"), 16)
    by = clean(record.get("decided_by"), 64)
    if via and by and by != via:
        return f"{name} {what}, decided by {via} ({by})"
    return f"{name} {what}, decided by {via or by or 'unknown'}"


class _Watch:
    """The prompt loop and its connection state."""

    def __init__(self, socket_path: str, keys: _Keys, screen: _Screen, err: TextIO,
                 poll_s: float, once: bool, retry_for_s: float) -> None:
        self.socket_path = socket_path
        self.keys = keys
        self.screen = screen
        self.err = err
        self.poll_s = poll_s
        self.once = once
        self.retry_for_s = retry_for_s
        self.down_since: float | None = None  # monotonic time the guard went away
        self.attempts = 0
        self.next_try = 0.0
        # uploads shown here that left the pending list: id -> (device, polls left to find it)
        self.vanished: dict[Any, tuple[Any, int]] = {}

    def run(self, pending: list[dict[str, Any]]) -> int:
        keys, screen = self.keys, self.screen
        current: Any = None  # the id on screen
        shown: Any = object()  # what the screen shows: an id, or None for "nothing pending"
        redraw = False  # show the current upload again (after a reconnection)
        devices: dict[Any, Any] = {}
        last_poll = time.monotonic()
        while True:
            now = time.monotonic()
            if self.down_since is None:
                ids = [u["id"] for u in pending]
                devices.update((u["id"], u.get("device")) for u in pending)
                if current not in ids:
                    if current is not None and current == shown:
                        self.vanished[current] = (devices.get(current), LOG_TRIES)
                    later = [i for i in ids if current is not None and _number(i) > _number(current)]
                    current = later[0] if later else (ids[0] if ids else None)
                self._report_vanished()
                upload = next((u for u in pending if u["id"] == current), None)
                if current != shown or redraw:
                    redraw = False
                    keys.flush()
                    if upload is not None:
                        for text in _describe(upload):
                            screen.line(text)
                    shown = current
                if upload is None:
                    screen.status("no uploads pending (q to quit) > ", None)
                else:
                    screen.status(_status(upload, len(pending) - 1, time.time()), current)
                wake = last_poll + (min(self.poll_s, 1.0) if screen.tty else self.poll_s)
            else:
                upload = None
                left = max(0.0, self.next_try - now)
                screen.status(f"guard unreachable, retrying in {left:.0f} s "
                              f"(attempt {self.attempts}; q to quit) > ",
                              ("down", self.attempts))
                wake = min(self.next_try, now + 1.0)

            got = keys.get(max(0.0, wake - time.monotonic()))
            if got is None:
                return 0  # end of input
            for key in got:
                if key == "q":
                    return 0
                if upload is None or key not in "adws":
                    continue
                if key == "s":
                    later = [u["id"] for u in pending if _number(u["id"]) > _number(current)]
                    current = later[0] if later else pending[0]["id"]
                    break
                if not _decide(self.socket_path, upload, key, screen):
                    break  # refused (decided elsewhere meanwhile?): the next poll tells
                if self.once:
                    return 0
                current = None  # go on with the next one after a fresh poll
                shown = object()
                break
            now = time.monotonic()
            if self.down_since is not None:
                if now < self.next_try:
                    continue
            elif not got and now - last_poll < self.poll_s:
                continue
            try:
                pending = _pending(self.socket_path)
            except ControlError as exc:
                if self._went_away(exc):
                    return 1
                pending = []
                continue
            finally:
                last_poll = time.monotonic()
            if self.down_since is not None:
                self.down_since = None
                self.attempts = 0
                screen.line("reconnected to the guard")
                redraw = True

    def _went_away(self, exc: ControlError) -> bool:
        """The guard did not answer: note it and plan the next try; True to give up."""
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            self.screen.line(f"guard unreachable: {clean(exc, 200)}")
        elif now - self.down_since >= self.retry_for_s:
            self.screen.close()
            self.err.write(f"hushgate: gave up: the guard was unreachable for "
                           f"{now - self.down_since:.0f} s ({clean(exc, 200)})\n")
            self.err.flush()
            return True
        self.attempts += 1
        wait = min(RETRY_MAX_S, RETRY_S * 2 ** (self.attempts - 1))
        self.next_try = now + min(wait, max(0.0, self.down_since + self.retry_for_s - now))
        return False

    def _report_vanished(self) -> None:
        """Say who decided the uploads that left the list; the audit log may lag a poll."""
        if not self.vanished:
            return
        try:
            records = request(self.socket_path, {"cmd": "log", "limit": 200})
        except ControlError:
            records = []
        by_id = {}
        if isinstance(records, list):
            for r in records:
                if isinstance(r, dict) and r.get("id") is not None:
                    by_id.setdefault(r["id"], r)  # newest first: the final decision
        for upload_id, (device, tries) in list(self.vanished.items()):
            record = by_id.get(upload_id)
            if record is None and tries > 1:
                self.vanished[upload_id] = (device, tries - 1)
                continue
            del self.vanished[upload_id]
            self.screen.line(decided_elsewhere(upload_id, device, record))


def _decide(socket_path: str, upload: dict[str, Any], key: str, screen: _Screen) -> bool:
    verb = "deny" if key == "d" else "allow"
    scope = "for" if key == "w" else "once"
    payload = {"cmd": "decide", "id": upload["id"], "verb": verb, "scope": scope,
               "duration_s": WINDOW_S if key == "w" else None, "by": "watch"}
    name = f"upload {clean(upload['id'], 20)} ({clean(upload.get('device'), 64)})"
    try:
        request(socket_path, payload)
    except ControlError as exc:
        screen.line(f"could not decide {name}: {clean(exc, 200)}")
        return False
    done = {"a": "allowed once", "d": "denied",
            "w": "allowed, and this device and category for 30 min"}[key]
    screen.line(f"{name} {done}")
    return True


def _trap_signals() -> Any:
    """SIGTERM/SIGHUP leave through the same `finally` as Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupted(signum: int, frame: Any) -> None:
        raise _Interrupted(signum)

    saved = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            saved[sig] = signal.signal(sig, interrupted)

    def restore() -> None:
        for sig, handler in saved.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)

    return restore
