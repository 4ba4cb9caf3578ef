"""Hooks (design.md sections 8 and 10): JSON on stdin, no shell, bounded time, never blocking."""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guard.core.config import Hook
from guard.shell.hooks import Hooks

NOW = 1_700_000_000.5
UPLOAD = {
    "id": 7,
    "device": "kitchen-echo",
    "remote": "52.94.233.109:443",
    "host": "bob-dispatch-prod-na.amazon.com",
    "category": "voice",
    "held_packets": 11,
    "held_bytes": 14336,
    "started": 1_700_000_000.0,
    "expires": 1_700_000_020.0,
}
# Writes its stdin to argv[1] (via a temporary name, so a reader never sees half a file).
WRITE_STDIN = ("import os, sys; data = sys.stdin.buffer.read(); "
               "open(sys.argv[1] + '.tmp', 'wb').write(data); "
               "os.replace(sys.argv[1] + '.tmp', sys.argv[1])")


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def expected_body(event: str, upload: dict[str, Any]) -> bytes:
    message = {"event": event, "upload": upload, "time": NOW}
    return (json.dumps(message, sort_keys=True, separators=(",", ":")) + "\n").encode()


@pytest.fixture
def make_hooks() -> Iterator[Callable[..., Hooks]]:
    made: list[Hooks] = []

    def make(*hooks: Hook, **kwargs: Any) -> Hooks:
        made.append(Hooks(hooks, clock=lambda: NOW, **kwargs))
        return made[-1]

    yield make
    for hooks in made:
        hooks.close(2.0)


def test_command_hook_gets_the_event_as_json_on_stdin(tmp_path: Path, make_hooks) -> None:
    out = tmp_path / "event.json"
    hooks = make_hooks(Hook(("upload-held",), (sys.executable, "-c", WRITE_STDIN, str(out))))
    hooks.emit("upload-held", UPLOAD)
    wait_for(lambda: hooks.stats()["sent"] == 1)
    assert out.read_bytes() == expected_body("upload-held", UPLOAD)
    assert json.loads(out.read_bytes()) == {"event": "upload-held", "upload": UPLOAD, "time": NOW}
    assert hooks.stats() == {"sent": 1, "failed": 0, "timeouts": 0, "dropped": 0}


def test_hooks_only_run_for_their_events(tmp_path: Path, make_hooks) -> None:
    out = tmp_path / "event.json"
    hooks = make_hooks(Hook(("upload-decided",), (sys.executable, "-c", WRITE_STDIN, str(out))))
    hooks.emit("upload-held", UPLOAD)
    decided = dict(UPLOAD, outcome="denied", decided_by="watch")
    hooks.emit("upload-decided", decided)
    wait_for(lambda: hooks.stats()["sent"] == 1)
    assert json.loads(out.read_bytes())["upload"] == decided
    assert json.loads(out.read_bytes())["event"] == "upload-decided"
    time.sleep(0.2)
    assert hooks.stats()["sent"] == 1


def test_slow_command_is_killed_at_its_timeout_and_emit_never_waits(
        tmp_path: Path, make_hooks) -> None:
    pid_file = tmp_path / "pid"
    script = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
              "time.sleep(10)")
    hooks = make_hooks(Hook(("upload-held",), (sys.executable, "-c", script, str(pid_file)),
                            timeout_s=0.5))
    started = time.monotonic()
    t0 = time.perf_counter()
    hooks.emit("upload-held", UPLOAD)
    first_emit_s = time.perf_counter() - t0
    wait_for(lambda: pid_file.exists() and pid_file.read_text() != "", 5.0)
    # the hook is running now (its pid read before the second run can overwrite the file) ...
    pid = int(pid_file.read_text())
    t0 = time.perf_counter()
    hooks.emit("upload-held", UPLOAD)  # ... and emit still returns at once
    second_emit_s = time.perf_counter() - t0
    assert first_emit_s < 0.010 and second_emit_s < 0.010, (first_emit_s, second_emit_s)
    wait_for(lambda: hooks.stats()["timeouts"] >= 1, 5.0)
    assert time.monotonic() - started < 5.0
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left sleeping
        os.kill(pid, 0)
    wait_for(lambda: hooks.stats()["timeouts"] == 2, 5.0)
    assert hooks.stats()["sent"] == 0


def test_shell_metacharacters_in_the_payload_stay_inert(tmp_path: Path, make_hooks) -> None:
    out = tmp_path / "event.json"
    pwned = [tmp_path / f"pwned{i}" for i in range(4)]
    host = (f"$(touch {pwned[0]}); touch {pwned[1]} `touch {pwned[2]}` | touch {pwned[3]} "
            "&& echo '\"' \\ > x")
    upload = dict(UPLOAD, host=host, device=f"$(touch {pwned[0]})")
    hooks = make_hooks(Hook(("upload-held",), (sys.executable, "-c", WRITE_STDIN, str(out))))
    hooks.emit("upload-held", upload)
    wait_for(lambda: hooks.stats()["sent"] == 1)
    received = json.loads(out.read_bytes())
    assert received["upload"]["host"] == host
    assert received["upload"]["device"] == upload["device"]
    assert not any(p.exists() for p in pwned)


def test_missing_and_failing_commands_are_counted_not_raised(tmp_path: Path, make_hooks) -> None:
    hooks = make_hooks(
        Hook(("upload-held",), (str(tmp_path / "no-such-hook"),)),
        Hook(("upload-held",), (sys.executable, "-c", "import sys; sys.exit(3)")),
    )
    hooks.emit("upload-held", UPLOAD)
    wait_for(lambda: hooks.stats()["failed"] == 2)
    assert hooks.stats() == {"sent": 0, "failed": 2, "timeouts": 0, "dropped": 0}


def test_full_queue_drops_and_counts(make_hooks) -> None:
    hooks = make_hooks(Hook(("upload-held",), (sys.executable, "-c", "import time; time.sleep(10)"),
                            timeout_s=10.0), max_queue=1)
    t0 = time.perf_counter()
    for _ in range(10):
        hooks.emit("upload-held", UPLOAD)
    assert time.perf_counter() - t0 < 0.050
    # one is running (or about to), one waits in the queue, the rest were dropped
    assert hooks.stats()["dropped"] >= 8
    started = time.monotonic()
    hooks.close(0.5)
    assert time.monotonic() - started < 3.0
    stats = hooks.stats()
    assert stats["dropped"] + stats["timeouts"] + stats["failed"] + stats["sent"] == 10


def test_events_after_close_are_ignored(tmp_path: Path, make_hooks) -> None:
    out = tmp_path / "event.json"
    hooks = make_hooks(Hook(("upload-held",), (sys.executable, "-c", WRITE_STDIN, str(out))))
    hooks.close(1.0)
    hooks.emit("upload-held", UPLOAD)
    time.sleep(0.2)
    assert not out.exists() and hooks.stats()["sent"] == 0


class _Recorder(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str, dict[str, str], bytes]] = []
    status = 204
    delay_s = 0.0

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).received.append((self.command, self.path, dict(self.headers), body))
        time.sleep(self.delay_s)
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Recorder", (_Recorder,), {"received": [], "status": 204, "delay_s": 0.0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hushgate", handler
    finally:
        server.shutdown()
        server.server_close()


def test_url_hook_posts_the_json(http_server, make_hooks) -> None:
    url, handler = http_server
    hooks = make_hooks(Hook(("upload-held",), url=url))
    hooks.emit("upload-held", UPLOAD)
    wait_for(lambda: hooks.stats()["sent"] == 1)
    method, path, headers, body = handler.received[0]
    assert (method, path) == ("POST", "/hushgate")
    assert headers["Content-Type"] == "application/json"
    assert body == expected_body("upload-held", UPLOAD)


def test_url_hook_errors_and_timeouts_are_counted(http_server, make_hooks) -> None:
    url, handler = http_server
    handler.status = 500
    hooks = make_hooks(Hook(("upload-held",), url=url, timeout_s=0.3))
    hooks.emit("upload-held", UPLOAD)
    wait_for(lambda: hooks.stats()["failed"] == 1)
    handler.status, handler.delay_s = 204, 2.0
    hooks.emit("upload-held", UPLOAD)
    wait_for(lambda: hooks.stats()["timeouts"] == 1, 5.0)
    assert hooks.stats()["sent"] == 0


def test_unreachable_url_is_counted(make_hooks) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hooks = make_hooks(Hook(("upload-held",), url=f"http://127.0.0.1:{port}/", timeout_s=1.0))
    hooks.emit("upload-held", UPLOAD)
    wait_for(lambda: hooks.stats()["failed"] == 1)


def test_only_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="http"):
        Hooks((Hook(("upload-held",), url="file:///etc/passwd"),))


# -- listeners and the UCI mapping (issue 15 point 3) ----------------------------------------


def test_listeners_get_every_event_and_a_broken_one_harms_nothing(tmp_path: Path,
                                                                  make_hooks) -> None:
    seen: list[tuple[str, int]] = []
    hooks = make_hooks()

    def broken(event: str, payload: Any) -> None:
        raise RuntimeError("listener bug")

    hooks.add_listener(broken)
    hooks.add_listener(lambda event, payload: seen.append((event, payload["id"])))
    hooks.emit("upload-held", UPLOAD)
    hooks.emit("upload-decided", {**UPLOAD, "outcome": "approved"})
    assert seen == [("upload-held", UPLOAD["id"]), ("upload-decided", UPLOAD["id"])]


def test_uci_maps_ntfy_hooks_and_the_mqtt_section_with_line_numbers() -> None:
    from guard.tools.uci import UciError, uci_to_config

    text = "\n".join([
        "config web 'web'", "\toption listen '192.168.1.1:8787'",
        "config mqtt 'mqtt'", "\toption host '192.168.1.2'", "\toption username 'hushgate'",
        "\toption password 'pw'", "\toption ca_file '/etc/hushgate/mqtt-ca.pem'",
        "\toption mute_for_s '600'",
        "config hook", "\toption kind 'ntfy'", "\toption url 'https://ntfy.sh'",
        "\toption topic 'hushgate-abc123'", "\toption token 'tk_x'", "\toption priority '5'",
        "config device 'echo'", "\toption mac '68:db:f5:90:19:64'", ""])
    config = uci_to_config(text)
    assert config.mqtt is not None and config.mqtt.tls and config.mqtt.mute_for_s == 600.0
    (hook,) = config.hooks
    assert (hook.kind, hook.topic, hook.token, hook.priority) == ("ntfy", "hushgate-abc123",
                                                                  "tk_x", 5)
    with pytest.raises(UciError) as bad:
        uci_to_config(text.replace("option priority '5'", "option priority '9'"))
    assert bad.value.line == 14 and "priority" in str(bad.value)
    with pytest.raises(UciError) as bad:
        uci_to_config(text.replace("option host", "option hots"))
    assert bad.value.line == 4 and "config mqtt" in str(bad.value)
