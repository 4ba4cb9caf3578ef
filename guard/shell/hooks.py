"""Local hooks (design.md sections 8 and 10): tell a script, a URL or a phone that an upload is
waiting.

Rules of this module: `emit()` never waits (it serialises the event and queues it; a full queue
drops and counts), so a hook can never delay a verdict. Each hook has its own worker thread, so a
slow URL does not hold up a command. A command gets the event as one JSON object on stdin, runs
from its argv with no shell, and is killed (with its process group) at its timeout; host names
are attacker-controlled and reach a hook only inside that JSON.

An ntfy hook (`kind = "ntfy"`) publishes each held upload to an ntfy server as a notification
with Allow and Deny buttons: http actions that POST a single-use token (guard/shell/actions.py,
minted in `emit()`, before any other channel can decide the upload) to the web prompt's
`/api/act`. A decided upload's tokens die at once; its notification is replaced in place by the
outcome (same sequence_id: ntfy 2.16 and later). Listeners (the MQTT bridge) get every event
through `add_listener`; they must not block either.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from guard import __version__
from guard.core.config import GuardConfig, Hook
from guard.shell.actions import ActionTokens

__all__ = ["EVENTS", "Hooks", "action_base", "ntfy_message"]

log = logging.getLogger("guard.shell.hooks")

# Event name -> the key its subject goes under in the JSON ({"event", SUBJECT: {...}, "time"}).
EVENTS: dict[str, str] = {
    "upload-held": "upload",  # an upload is waiting for a decision
    "upload-decided": "upload",  # ... and was decided (the upload carries its outcome)
    "flow-blocked": "flow",  # a flow of a blocked category (e.g. messaging) was refused
    "window-opened": "entry",  # an allow window or a mute (`rules list` shape)
    "rule-added": "entry",  # an always-rule
    "standing-revoked": "entry",  # a window, mute or always-rule was revoked
    "mode-changed": "device",  # a device's mode changed at run time
}
_RESPONSE_CAP_BYTES = 65536  # what we read of a URL hook's answer before closing it
_STOP = object()


class _Worker:
    """One hook: a bounded queue of serialised events and the thread that delivers them."""

    def __init__(self, owner: Hooks, hook: Hook, index: int, max_queue: int) -> None:
        self.owner = owner
        self.hook = hook
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread = threading.Thread(target=self.run, name=f"hushgate-hook-{index}",
                                       daemon=True)

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            if self.owner._abandon.is_set():
                self.owner._count("dropped")
                continue
            event, body = item
            try:
                if self.hook.kind == "ntfy":
                    self.owner._count(self.post(body, self.owner._ntfy_headers(self.hook)))
                    continue
                if self.hook.command:
                    self.owner._count(self.run_command(event, body))
                if self.hook.url:
                    self.owner._count(self.post(body))
            except Exception:  # noqa: BLE001 - a hook must never take the worker down
                log.exception("hook %s failed", self.describe())
                self.owner._count("failed")

    def describe(self) -> str:
        return self.hook.command[0] if self.hook.command else str(self.hook.url)

    def run_command(self, event: str, body: bytes) -> str:
        env = dict(os.environ, HUSHGATE_EVENT=event)
        try:
            proc = subprocess.Popen(
                list(self.hook.command),  # argv, never a shell: payloads stay inert
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,  # unread output would block it or grow our memory
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,  # its own process group: a timeout kills its children too
                env=env,
            )
        except OSError as exc:
            log.warning("hook %s could not start: %s", self.describe(), exc.strerror or exc)
            return "failed"
        self.proc = proc
        if self.owner._abandon.is_set():  # close() gave up while we were starting it
            self.kill(proc)
        try:
            proc.communicate(body, timeout=self.hook.timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            log.warning("hook %s killed after %g s", self.describe(), self.hook.timeout_s)
            return "timeouts"
        finally:
            self.proc = None
        if proc.returncode != 0:
            log.warning("hook %s exited with %s", self.describe(), proc.returncode)
            return "failed"
        return "sent"

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            proc.wait(timeout=5.0)

    def post(self, body: bytes, headers: Mapping[str, str] | None = None) -> str:
        request = urllib.request.Request(
            str(self.hook.url), data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": f"hushgate/{__version__}",
                     **(headers or {})})
        try:
            with self.owner._opener.open(request, timeout=self.hook.timeout_s) as response:
                response.read(_RESPONSE_CAP_BYTES)
                status = response.status
        except urllib.error.HTTPError as exc:
            log.warning("hook %s answered HTTP %s", self.describe(), exc.code)
            return "failed"
        except TimeoutError:
            return "timeouts"
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                return "timeouts"
            log.warning("hook %s unreachable: %s", self.describe(), exc.reason)
            return "failed"
        except (OSError, ValueError) as exc:
            log.warning("hook %s failed: %s", self.describe(), exc)
            return "failed"
        return "sent" if 200 <= status < 300 else "failed"


class Hooks:
    """Runs the configured hooks for events, in the background.

    `emit(event, payload)` returns at once. `stats()` counts deliveries: `sent`, `failed`
    (could not start, non-zero exit, HTTP error), `timeouts` (killed / no answer in time) and
    `dropped` (queue full, or still queued at close). A url must be http(s) (ValueError).
    """

    def __init__(
        self,
        hooks: tuple[Hook, ...] | list[Hook],
        max_queue: int = 100,
        *,
        clock: Callable[[], float] = time.time,
        tokens: ActionTokens | None = None,
        action_base: str | None = None,
    ) -> None:
        self.clock = clock
        self.tokens = tokens if tokens is not None else ActionTokens(clock=clock)
        self.action_base = action_base  # the web prompt as a phone reaches it, for ntfy buttons
        self._listeners: list[Callable[[str, Mapping[str, Any]], None]] = []
        self._lock = threading.Lock()
        self._stats = {"sent": 0, "failed": 0, "timeouts": 0, "dropped": 0}
        self._closed = False
        self._abandon = threading.Event()
        # Hook URLs are on the LAN (Home Assistant and the like): an http_proxy in the daemon's
        # environment must not carry upload notices elsewhere.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._workers: list[_Worker] = []
        for index, hook in enumerate(hooks):
            if hook.url is not None:
                scheme = urllib.parse.urlsplit(hook.url).scheme
                if scheme not in ("http", "https"):
                    raise ValueError(f"hook[{index}]: url must be http or https, not {hook.url!r}")
            if hook.kind == "ntfy" and not (hook.action_url or action_base):
                raise ValueError(f"hook[{index}]: an ntfy hook needs the web prompt's address "
                                 "for its buttons ([web] listen, or action_url)")
            unknown = sorted(set(hook.events) - set(EVENTS))
            if unknown:
                log.warning("hook[%d]: unknown event(s) %s; known: %s", index,
                            ", ".join(unknown), ", ".join(EVENTS))
            self._workers.append(_Worker(self, hook, index, max_queue))
        for worker in self._workers:
            worker.thread.start()

    @classmethod
    def from_config(cls, config: GuardConfig, tokens: ActionTokens | None = None) -> Hooks:
        """The config's hooks, ntfy buttons pointing at its web prompt."""
        return cls(config.hooks, tokens=tokens, action_base=action_base(config))

    def add_listener(self, listener: Callable[[str, Mapping[str, Any]], None]) -> None:
        """`listener(event, payload)` for every event, in `emit()`'s thread: it must only queue."""
        self._listeners.append(listener)

    def emit(self, event: str, payload: Mapping[str, Any]) -> None:
        """Queue `event` for every hook that wants it; never blocks, never raises."""
        if event == "upload-decided":
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self.tokens.revoke(int(payload["id"]))  # the buttons die with the hold
        for listener in self._listeners:
            try:
                listener(event, payload)
            except Exception:  # noqa: BLE001 - a listener's bug must not reach the packet loop
                log.exception("hook listener failed on %s", event)
        workers = [w for w in self._workers if event in w.hook.events]
        if not workers or self._closed:
            return
        plain: bytes | None = None
        for worker in workers:
            try:
                if worker.hook.kind == "ntfy":
                    body = self._ntfy_body(worker.hook, event, payload)
                    if body is None:
                        continue
                else:
                    if plain is None:
                        message = {"event": event, EVENTS.get(event, "data"): dict(payload),
                                   "time": self.clock()}
                        plain = (json.dumps(message, ensure_ascii=True, sort_keys=True,
                                            separators=(",", ":"), default=str) + "\n").encode()
                    body = plain
            except (TypeError, ValueError, KeyError) as exc:  # a bug, not an outage
                log.warning("hook event %s not serialisable: %s", event, exc)
                self._count("failed")
                continue
            try:
                worker.queue.put_nowait((event, body))
            except queue.Full:
                self._count("dropped")

    def _ntfy_body(self, hook: Hook, event: str, payload: Mapping[str, Any]) -> bytes | None:
        if event not in ("upload-held", "upload-decided"):
            return None  # other events have no phone shape (yet)
        upload_id = int(payload["id"])
        tokens = None
        if event == "upload-held":
            expires = payload.get("expires")
            tokens = self.tokens.mint(upload_id, float(expires) if isinstance(
                expires, (int, float)) and not isinstance(expires, bool) else None)
        message = ntfy_message(hook, event, payload, tokens,
                               hook.action_url or self.action_base or "", now=self.clock())
        return json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode()

    @staticmethod
    def _ntfy_headers(hook: Hook) -> dict[str, str]:
        if hook.token:
            return {"Authorization": f"Bearer {hook.token}"}
        if hook.username is not None and hook.password is not None:
            raw = f"{hook.username}:{hook.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def action_stats(self) -> dict[str, int]:
        """The ntfy buttons' tokens: minted, redeemed, refused (forged, replayed, expired), live."""
        return self.tokens.stats()

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued for up to `timeout_s`, then kill what runs and drop the rest."""
        self._closed = True
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            try:
                worker.queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                pass
        for worker in self._workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        if any(w.thread.is_alive() for w in self._workers):
            self._abandon.set()
            for worker in self._workers:
                proc = worker.proc
                if proc is not None:
                    _Worker.kill(proc)
                while True:  # make room for the stop marker; what was queued is dropped
                    try:
                        item = worker.queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        self._count("dropped")
                with contextlib.suppress(queue.Full):
                    worker.queue.put_nowait(_STOP)
            for worker in self._workers:
                worker.thread.join(1.0)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n


# -- ntfy -------------------------------------------------------------------------------------

NTFY_TEXT_MAX_CHARS = 120  # a host name in a notification line; the page shows it whole
OUTCOME_WORDS = {
    "approved": "allowed", "denied": "denied", "expired": "not answered in time: dropped",
    "window": "allowed by an open window", "quiet": "denied (muted)", "lost": "lost",
}


def action_base(config: GuardConfig) -> str | None:
    """The web prompt's root as `[web] listen` says ("http://192.168.1.1:8787"), or None."""
    if not config.web_listen:
        return None
    return f"{'https' if config.web_tls else 'http'}://{config.web_listen}"


def ntfy_message(hook: Hook, event: str, upload: Mapping[str, Any],
                 tokens: Mapping[str, str] | None, base: str, *, now: float) -> dict[str, Any]:
    """The JSON an ntfy server takes at its root (docs.ntfy.sh/publish, "Publish as JSON").

    upload-held: a high-priority prompt with Allow and Deny http actions (each POSTs its own
    single-use token to BASE/api/act) and a tap that opens the web page. upload-decided: the same
    sequence_id with the outcome and no buttons (ntfy 2.16+ replaces the prompt in place; an older
    server shows it as a second, quiet notification)."""
    from guard.shell.web import display_text

    upload_id = int(upload["id"])
    device = display_text(str(upload.get("device") or "?"), NTFY_TEXT_MAX_CHARS)
    target = display_text(str(upload.get("host") or upload.get("remote") or "?"),
                          NTFY_TEXT_MAX_CHARS)
    category = display_text(str(upload.get("category") or "unknown"), 40)
    message: dict[str, Any] = {
        "topic": hook.topic,
        "sequence_id": f"hushgate-upload-{upload_id}",
        "click": f"{base}/" if base else None,
    }
    if event == "upload-held":
        expires = upload.get("expires")
        left = ""
        if isinstance(expires, (int, float)) and not isinstance(expires, bool):
            left = f" Unanswered, it is dropped in {max(0, round(expires - now))} s."
        message.update({
            "title": f"{device} is sending audio",
            "message": f"Upload {upload_id} from {device} to {target} ({category}) is held "
                       f"until you answer.{left}",
            "priority": hook.priority,
            "tags": ["studio_microphone", "hushgate"],
            "actions": [_ntfy_button(verb, label, (tokens or {}).get(verb), base)
                        for verb, label in (("allow", "Allow"), ("deny", "Deny"))
                        if (tokens or {}).get(verb)],
        })
    else:
        outcome = str(upload.get("outcome") or "decided")
        by = display_text(str(upload.get("decided_by") or ""), 40)
        word = OUTCOME_WORDS.get(outcome, display_text(outcome, 40))
        message.update({
            "title": f"{device}: upload {word}",
            "message": f"Upload {upload_id} from {device} to {target}: {word}"
                       + (f" (by {by})." if by else "."),
            "priority": 2,
            "tags": ["white_check_mark" if outcome in ("approved", "window") else "no_entry",
                     "hushgate"],
        })
    return {k: v for k, v in message.items() if v is not None}


def _ntfy_button(verb: str, label: str, token: str | None, base: str) -> dict[str, Any]:
    """An http action: the ntfy app sends METHOD URL with these headers and body itself."""
    return {
        "action": "http", "label": label, "url": f"{base}/api/act", "method": "POST",
        "headers": {"Content-Type": "application/json"},
        "body": json.dumps({"token": token, "verb": verb}, separators=(",", ":")),
        "clear": True,
    }
