"""The LAN web prompt (guard/shell/web.py): login, sessions, CSRF, Host allowlist, escaping, TLS, and a
real headless Chromium that signs in, sees a held upload appear and answers it.

Every server here listens on 127.0.0.1 with an ephemeral port and talks to a fake handler that
speaks the control protocol (guard/shell/control.py) and records what the page asked for.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from guard.shell.web import (
    HOST_MAX_CHARS,
    LoginLimiter,
    Sessions,
    WebError,
    WebPrompt,
    display_text,
    hash_password,
    verify_password,
    web_token,
)
from tests.browser.chromium import chromium, png_size, wait_for

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
BOB = "bob-dispatch-prod-na.amazon.com"
# A host name as a hostile speaker could claim it in SNI or DNS: markup, a script, terminal
# escapes, an entity, a bidi override, and more than 255 characters.
HOSTILE = ('<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
           '\x1b[2J\x1b]0;owned\x07&amp;\u202egnp.exe' + "a" * 300)
SHOWN_HOSTILE = display_text(HOSTILE, HOST_MAX_CHARS)


class FakeGuard:
    """A control-protocol handler with pending uploads, an audit log, and a record of requests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[int, dict[str, Any]] = {}
        self.log: list[dict[str, Any]] = []
        self.requests: list[tuple[dict[str, Any], Any]] = []
        self.fail_with: str | None = None
        self.crash = False
        self.manage_replies: dict[str, Any] = {}
        self.setup_manage()

    def add(self, upload_id: int, device: str = "kitchen-echo", host: str | None = BOB, *,
            held_packets: int = 11, held_bytes: int = 14_336, waiting_s: float = 3.0,
            timeout_s: float = 20.0) -> None:
        now = time.time()
        with self.lock:
            self.pending[upload_id] = {
                "id": upload_id, "device": device, "remote": "52.94.233.109:443", "host": host,
                "category": "voice", "held_packets": held_packets, "held_bytes": held_bytes,
                "started": now - waiting_s, "expires": now - waiting_s + timeout_s,
                # Fields the page must never see, whatever the daemon may one day return:
                "payload": "RAW-PACKET-BYTES", "proto": "tcp", "tokens": [1, 2, 3],
            }

    def logged(self, upload_id: int, outcome: str, device: str, host: str | None,
               ago_s: float, by: str) -> None:
        now = time.time()
        with self.lock:
            self.log.insert(0, {"id": upload_id, "device": device, "host": host,
                                "remote": "52.94.233.109:443", "category": "voice",
                                "bytes": 9120, "packets": 9, "started": now - ago_s - 4,
                                "decided_at": now - ago_s, "outcome": outcome,
                                "decided_by": by, "raw": "RAW-PACKET-BYTES"})

    def decisions(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r, _ in self.requests if r.get("cmd") == "decide"]

    def __call__(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        with self.lock:
            self.requests.append((dict(request), peer))
            if self.crash:
                raise RuntimeError("handler bug")
            if self.fail_with:
                return {"ok": False, "error": self.fail_with}
            cmd = request.get("cmd")
            if cmd == "pending":
                return {"ok": True, "result": [dict(u) for u in self.pending.values()]}
            if cmd == "log":
                rows = [dict(r) for r in self.log
                        if request.get("outcome") in (None, r.get("outcome"))
                        and request.get("device") in (None, r.get("device"))]
                return {"ok": True, "result": rows[: request["limit"]]}
            if cmd == "decide":
                upload = self.pending.pop(request["id"], None)
                if upload is None:
                    return {"ok": False, "error": f"no pending upload {request['id']}"}
                outcome = "approved" if request["verb"] == "allow" else "denied"
                self.log.insert(0, {**upload, "bytes": upload["held_bytes"],
                                    "packets": upload["held_packets"], "outcome": outcome,
                                    "decided_at": time.time(), "decided_by": request["by"]})
                return {"ok": True, "result": upload}
            if cmd in self.manage_replies:
                return {"ok": True, "result": self.manage_replies[cmd](request)}
            return {"ok": False, "error": f"unknown command {cmd!r}"}

    # -- the management commands (guard/shell/daemon.py's contract, in miniature) ------------

    def setup_manage(self) -> None:
        now = time.time()
        self.devices = [{
            "name": "kitchen-echo", "address": "198.18.10.10", "mac": "68:db:f5:90:19:64",
            "mode": "strict", "configured_mode": "strict", "mode_overridden": False,
            "online": True, "last_seen": now - 2, "last_upload": now - 60, "pending": 1,
            "flows": 3, "uploads": 10, "mute_until": None, "windows": 0, "rules": 1,
            "counts_24h": {"approved": 4, "denied": 2, "blocked": 3},
            "secret": "RAW-PACKET-BYTES"}]
        self.rules = [{"id": "r3", "kind": "always-allow", "device": "kitchen-echo",
                       "host": BOB, "category": None, "created": now - 300, "until": None,
                       "duration_text": None, "source": "web", "internal": "RAW-PACKET-BYTES"}]
        self.manage_replies = {
            "devices": lambda r: [dict(d) for d in self.devices],
            "rules": lambda r: [dict(x) for x in self.rules],
            "mode": lambda r: {"device": r["device"], "mode": r["mode"],
                               "configured": "strict", "overridden": r["mode"] != "config"},
            "window": lambda r: {"id": "w9", "device": r["device"], "kind": r["kind"],
                                 "until": time.time() + r["duration_s"],
                                 "duration_text": r.get("duration_text") or "?",
                                 "superseded": []},
            "unmute": lambda r: {"device": r["device"], "revoked": ["w9"]},
            "revoke": lambda r: {**self.rules[0], "id": r["id"]},
        }

    def manage(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r, _ in self.requests
                    if r.get("cmd") in ("mode", "window", "unmute", "revoke", "decide")]


class Reply:
    def __init__(self, response: http.client.HTTPResponse, elapsed_s: float) -> None:
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        self.body = response.read()
        self.elapsed_s = elapsed_s

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A browser stand-in: keeps the session cookie and CSRF token, sends same-origin headers."""

    def __init__(self, prompt: WebPrompt, *, source: str | None = None,
                 context: ssl.SSLContext | None = None) -> None:
        self.prompt = prompt
        self.source = source
        self.context = context
        self.host = f"127.0.0.1:{prompt.port}"
        self.origin = f"{prompt.scheme}://{self.host}"
        self.cookie: str | None = None
        self.csrf: str | None = None
        self.replies: list[Reply] = []

    def connection(self) -> http.client.HTTPConnection:
        source = (self.source, 0) if self.source else None
        if self.context is not None:
            return http.client.HTTPSConnection("127.0.0.1", self.prompt.port, timeout=5,
                                               source_address=source, context=self.context)
        return http.client.HTTPConnection("127.0.0.1", self.prompt.port, timeout=5,
                                          source_address=source)

    def request(self, method: str, path: str, body: Any = None, *,
                headers: dict[str, str] | None = None, cookie: bool = True, csrf: bool = True,
                origin: str | None | bool = True) -> Reply:
        sent = {"Host": self.host}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        if method == "POST" and origin:
            sent["Origin"] = self.origin if origin is True else str(origin)
        if cookie and self.cookie:
            sent["Cookie"] = self.cookie
        if csrf and self.csrf and method == "POST":
            sent["X-CSRF-Token"] = self.csrf
        sent.update(headers or {})
        conn = self.connection()
        started = time.monotonic()
        try:
            conn.request(method, path, body=data if data is not None else
                         (b"" if method == "POST" else None), headers=sent)
            reply = Reply(conn.getresponse(), time.monotonic() - started)
        finally:
            conn.close()
        self.replies.append(reply)
        return reply

    def login(self, secret: str) -> Reply:
        reply = self.request("POST", "/api/login", {"secret": secret})
        if reply.status == 200:
            self.cookie = reply.headers["set-cookie"].split(";")[0]
            self.csrf = reply.json()["csrf"]
        return reply

    def decide(self, upload_id: int, verb: str = "allow", scope: str = "once",
               duration_s: float | None = None, **kw: Any) -> Reply:
        return self.request("POST", "/api/decide", {"id": upload_id, "verb": verb,
                                                    "scope": scope, "duration_s": duration_s},
                            **kw)


@pytest.fixture
def fake() -> FakeGuard:
    guard = FakeGuard()
    guard.add(7)
    guard.logged(5, "approved", "kitchen-echo", BOB, 120, "cli:0")
    return guard


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def prompt(fake: FakeGuard, secrets_dir: Path):
    server = WebPrompt("127.0.0.1:0", fake, secret_file=str(secrets_dir / "web.token"),
                       state_dir=str(secrets_dir))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def token(prompt: WebPrompt, secrets_dir: Path) -> str:
    return web_token(prompt.secret_file, str(secrets_dir), tls=False)["token"]


@pytest.fixture
def client(prompt: WebPrompt, token: str) -> Client:
    c = Client(prompt)
    assert c.login(token).status == 200
    return c


# -- login and sessions -------------------------------------------------------------------------


def test_wrong_secret_is_refused_without_a_cookie(prompt: WebPrompt, token: str) -> None:
    reply = Client(prompt).login("not-the-token-" + "x" * 40)
    assert reply.status == 403
    assert "set-cookie" not in reply.headers


def test_token_login_sets_a_strict_httponly_session_cookie(prompt: WebPrompt, token: str) -> None:
    c = Client(prompt)
    reply = c.login(token)
    assert reply.status == 200
    cookie = reply.headers["set-cookie"]
    assert cookie.startswith("hushgate_session=")
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert "SameSite=Strict" in cookie and "Max-Age=43200" in cookie
    assert "secure" not in attributes  # plain HTTP: a Secure cookie would never come back
    session = c.request("GET", "/api/session").json()
    assert session["csrf"] == c.csrf
    assert c.request("GET", "/api/pending").status == 200


def test_password_from_config_signs_in(fake: FakeGuard, secrets_dir: Path) -> None:
    stored = hash_password("correct horse battery")
    server = WebPrompt("127.0.0.1:0", fake, secret_file=str(secrets_dir / "web.token"),
                       password_hash=stored, state_dir=str(secrets_dir))
    with server:
        assert Client(server).login("correct horse").status == 403
        assert Client(server).login("correct horse battery").status == 200


def test_password_hash_round_trip_and_formats() -> None:
    stored = hash_password("s3cret")
    assert stored.startswith("scrypt$16384$8$1$")
    assert verify_password("s3cret", stored)
    assert not verify_password("s3cret ", stored)
    assert hash_password("s3cret") != stored  # salted
    salt = b"0123456789abcdef"
    digest = hashlib.pbkdf2_hmac("sha256", b"pw", salt, 1000)
    import base64
    pbkdf2 = f"pbkdf2_sha256$1000${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert verify_password("pw", pbkdf2) and not verify_password("pW", pbkdf2)
    for broken in ("", "plain", "scrypt$3$8$1$AAAA$AAAA", "md5$abc$def"):
        with pytest.raises(WebError):
            verify_password("pw", broken)
    with pytest.raises(ValueError):
        hash_password("")


def test_a_broken_password_hash_fails_at_construction(fake: FakeGuard, secrets_dir: Path) -> None:
    with pytest.raises(WebError, match="password_hash"):
        WebPrompt("127.0.0.1:0", fake, secret_file=str(secrets_dir / "t"),
                  password_hash="scrypt$nope", state_dir=str(secrets_dir))


def test_sixth_bad_login_is_slowed_and_other_clients_are_not(prompt: WebPrompt,
                                                             token: str) -> None:
    attacker = Client(prompt)
    for _ in range(5):
        assert attacker.login("wrong-" + "x" * 40).status == 403
    sixth = attacker.login("wrong-" + "x" * 40)
    assert sixth.status == 429 or sixth.elapsed_s >= 1.0
    assert sixth.status == 429 and int(sixth.headers["retry-after"]) >= 1
    # While slowed, even the right secret is not checked: guessing gains nothing by speed.
    assert attacker.login(token).status == 429
    # Another address on the LAN is its own bucket.
    assert Client(prompt, source="127.0.0.2").login(token).status == 200


def test_login_limiter_doubles_the_wait_and_forgets() -> None:
    limiter = LoginLimiter(free_failures=5, window_s=900, max_delay_s=300)
    now = 1000.0
    waits = [limiter.failed("a", now + i) for i in range(4)]
    assert waits == [0, 0, 0, 0]
    assert limiter.retry_after("a", now + 4) == 0
    # From the fifth mistake on, each one makes the next attempt wait twice as long.
    waits = []
    t = now + 4
    for _ in range(12):
        waits.append(limiter.failed("a", t))
        t += waits[-1]
    assert waits[:5] == [1, 2, 4, 8, 16] and max(waits) == 300
    assert limiter.retry_after("a", t - 1) == 1
    assert limiter.retry_after("b", t) == 0
    assert limiter.retry_after("a", t + 901) == 0  # forgotten after the window
    limiter.failed("c", 0)
    limiter.succeeded("c")
    assert limiter.retry_after("c", 0) == 0


def test_sessions_expire_after_twelve_hours() -> None:
    sessions = Sessions()
    cookie, session = sessions.create(now=0.0)
    assert sessions.get(cookie, 43199.0) is session
    assert sessions.get(cookie, 43200.0) is None
    assert sessions.get("forged", 1.0) is None and sessions.get(None, 1.0) is None


def test_logout_ends_the_session(client: Client) -> None:
    assert client.request("POST", "/api/logout", {}).status == 200
    assert client.request("GET", "/api/pending").status == 401


# -- CSRF and GET --------------------------------------------------------------------------------


def test_decide_with_session_csrf_and_origin_reaches_the_handler_as_web(
        client: Client, fake: FakeGuard) -> None:
    reply = client.decide(7, "allow", "once")
    assert reply.status == 200 and reply.json()["upload"]["id"] == 7
    assert fake.decisions() == [{"cmd": "decide", "id": 7, "verb": "allow", "scope": "once",
                                 "duration_s": None, "by": "web"}]
    fake.add(8)
    assert client.decide(8, "allow", "for", 1800).status == 200
    assert fake.decisions()[-1]["scope"] == "for"
    assert fake.decisions()[-1]["duration_s"] == 1800.0
    peer = fake.requests[-1][1]
    assert peer.address == "127.0.0.1"


def test_decide_without_cookie_is_401(client: Client, fake: FakeGuard) -> None:
    assert client.decide(7, cookie=False).status == 401
    assert fake.decisions() == []


def test_decide_without_csrf_token_is_403(client: Client, fake: FakeGuard) -> None:
    assert client.decide(7, csrf=False).status == 403
    assert client.decide(7, headers={"X-CSRF-Token": "guessed"}).status == 403
    assert fake.decisions() == []


def test_decide_with_a_foreign_origin_is_403(client: Client, fake: FakeGuard) -> None:
    port = client.prompt.port
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null",
                   f"https://127.0.0.1:{port}"):
        assert client.decide(7, origin=origin).status == 403, origin
    # No Origin: a same-origin Referer will do, a foreign one or none will not.
    assert client.decide(7, origin=False).status == 403
    assert client.decide(7, origin=False,
                         headers={"Referer": "http://evil.example/x"}).status == 403
    assert client.decide(7, headers={"Sec-Fetch-Site": "cross-site"}).status == 403
    assert fake.decisions() == []
    assert client.decide(7, origin=False,
                         headers={"Referer": f"{client.origin}/"}).status == 200


def test_login_from_a_foreign_origin_is_refused(prompt: WebPrompt, token: str) -> None:
    c = Client(prompt)
    assert c.request("POST", "/api/login", {"secret": token}, origin="http://evil.example"
                     ).status == 403
    assert c.request("POST", "/api/login", {"secret": token},
                     headers={"Content-Type": "application/x-www-form-urlencoded"}).status == 415


def test_get_never_changes_state(client: Client, fake: FakeGuard) -> None:
    for path in ("/api/decide", "/api/login", "/api/logout", "/api/decide?id=7&verb=allow",
                 "/api/mode?device=kitchen-echo&mode=off", "/api/mute", "/api/unmute",
                 "/api/revoke?id=r3"):
        assert client.request("GET", path).status == 405
    for path in ("/api/pending", "/api/devices", "/api/rules", "/api/log?outcome=blocked"):
        assert client.request("GET", path).status == 200, path
    assert fake.manage() == []
    assert client.request("GET", "/api/session").status == 200  # still signed in
    for path in ("/api/devices", "/api/rules", "/api/log"):
        assert client.request("POST", path, {}).status == 405, path


def test_decide_refuses_bad_arguments(client: Client, fake: FakeGuard) -> None:
    for body in ({"id": "7", "verb": "allow"}, {"id": True, "verb": "allow"},
                 {"id": -1, "verb": "allow"}, {"id": 7, "verb": "maybe"},
                 {"id": 7, "verb": "allow", "scope": "for"},
                 {"id": 7, "verb": "allow", "scope": "for", "duration_s": 10 ** 9},
                 {"id": 7, "verb": "allow", "scope": "for", "duration_s": 0},
                 {"id": 7, "verb": "allow", "scope": "for", "duration_s": 0.5},
                 {"id": 7, "verb": "allow", "scope": "for", "duration_s": "1h"},
                 {"id": 7, "verb": "allow", "scope": "for", "duration_s": True},
                 {"id": 7, "verb": "allow", "scope": "forever"},
                 {"id": 7, "verb": "allow", "scope": ["always"]}, [7], "7", b"null"):
        reply = client.request("POST", "/api/decide", body)
        assert reply.status == 400, body
        assert reply.json()["error"], body
    # Python's json reads NaN and Infinity: a duration must still be a real number.
    for raw in (b'{"id": 7, "verb": "allow", "scope": "for", "duration_s": NaN}',
                b'{"id": 7, "verb": "allow", "scope": "for", "duration_s": Infinity}',
                b"{not json", b"\xff\xfe", b"", b"[" * 8000 + b"]" * 8000):
        assert client.request("POST", "/api/decide", raw).status == 400, raw[:20]
    assert client.request("POST", "/api/login", b"[" * 8000 + b"]" * 8000).status == 400
    assert client.request("POST", "/api/decide", b"x" * 20000).status == 413
    assert fake.decisions() == []


def test_decide_always_and_deny_always_make_rules_from_the_web(client: Client,
                                                               fake: FakeGuard) -> None:
    assert client.decide(7, "allow", "always").status == 200
    fake.add(8)
    assert client.decide(8, "deny", "always").status == 200
    fake.add(9)
    reply = client.request("POST", "/api/decide", {"id": 9, "verb": "allow", "scope": "for",
                                                   "duration_s": 600, "duration_text": "10m"})
    assert reply.status == 200
    assert fake.decisions() == [
        {"cmd": "decide", "id": 7, "verb": "allow", "scope": "always", "duration_s": None,
         "by": "web"},
        {"cmd": "decide", "id": 8, "verb": "deny", "scope": "always", "duration_s": None,
         "by": "web"},
        {"cmd": "decide", "id": 9, "verb": "allow", "scope": "for", "duration_s": 600.0,
         "duration_text": "10m", "by": "web"},
    ]
    # a duration text that is not one is dropped, never passed on
    fake.add(10)
    client.request("POST", "/api/decide", {"id": 10, "verb": "allow", "scope": "for",
                                           "duration_s": 60, "duration_text": "<b>1m</b>"})
    assert "duration_text" not in fake.decisions()[-1]


def test_handler_errors_are_answered_not_raised(client: Client, fake: FakeGuard) -> None:
    assert client.decide(99).status == 409
    assert client.decide(99).json()["error"] == "no pending upload 99"
    fake.crash = True
    assert client.request("GET", "/api/pending").status == 500
    fake.crash = False
    assert client.request("GET", "/api/pending").status == 200


# -- managing: devices, modes, mutes, windows and rules, the filtered log --------------------------

MANAGE = (  # (path, a good body, the control request it must become)
    ("/api/mode", {"device": "kitchen-echo", "mode": "monitor"},
     {"cmd": "mode", "device": "kitchen-echo", "mode": "monitor", "by": "web"}),
    ("/api/mute", {"device": "kitchen-echo", "duration_s": 3600, "duration_text": "1h"},
     {"cmd": "window", "device": "kitchen-echo", "kind": "quiet", "duration_s": 3600.0,
      "duration_text": "1h", "by": "web"}),
    ("/api/unmute", {"device": "kitchen-echo"},
     {"cmd": "unmute", "device": "kitchen-echo", "by": "web"}),
    ("/api/revoke", {"id": "r3"}, {"cmd": "revoke", "id": "r3", "by": "web"}),
)


def test_devices_listing_has_state_counts_and_only_listed_fields(client: Client) -> None:
    reply = client.request("GET", "/api/devices")
    assert reply.status == 200 and b"RAW-PACKET-BYTES" not in reply.body
    (device,) = reply.json()["devices"]
    assert device["name"] == "kitchen-echo" and device["mode"] == "strict"
    assert device["online"] is True and device["pending"] == 1 and device["mute_until"] is None
    assert device["counts_24h"] == {"approved": 4, "denied": 2, "blocked": 3}
    assert "secret" not in device


def test_devices_listing_cleans_what_the_guard_sends(client: Client, fake: FakeGuard) -> None:
    fake.devices[0].update(online="yes", pending=True, mute_until=float("inf"),
                           counts_24h={"approved": -1, "denied": 2.5, HOSTILE: 1, "quiet": True,
                                       **{f"k{i}": i for i in range(40)}})
    reply = client.request("GET", "/api/devices")
    assert reply.status == 200
    assert b"<" not in reply.body and b"\x1b" not in reply.body
    (device,) = reply.json()["devices"]
    assert device["online"] is None and device["pending"] is None
    assert device["mute_until"] is None
    counts = device["counts_24h"]
    assert "approved" not in counts and "denied" not in counts and "quiet" not in counts
    assert len(counts) <= 32 and all(len(k) <= 32 for k in counts)


def test_rules_listing_shows_windows_mutes_and_always_rules(client: Client,
                                                            fake: FakeGuard) -> None:
    now = time.time()
    fake.rules.append({"id": "w12", "kind": "mute", "device": "kitchen-echo", "host": None,
                       "category": None, "created": now, "until": now + 3600,
                       "duration_text": "1h", "source": "cli:root (uid 0)"})
    reply = client.request("GET", "/api/rules")
    assert reply.status == 200 and b"RAW-PACKET-BYTES" not in reply.body
    rules = reply.json()["rules"]
    assert [r["id"] for r in rules] == ["r3", "w12"]
    assert set(rules[0]) == {"id", "kind", "device", "host", "category", "created", "until",
                             "duration_text", "source"}
    assert rules[1]["kind"] == "mute" and rules[1]["duration_text"] == "1h"


@pytest.mark.parametrize(("path", "body", "request_"), MANAGE)
def test_each_change_reaches_the_guard_as_web(client: Client, fake: FakeGuard, path: str,
                                              body: dict[str, Any],
                                              request_: dict[str, Any]) -> None:
    reply = client.request("POST", path, body)
    assert reply.status == 200, reply.body
    assert reply.json()["ok"] is True and isinstance(reply.json()["result"], dict)
    assert fake.manage() == [request_]
    assert fake.requests[-1][1].address == "127.0.0.1"


@pytest.mark.parametrize(("path", "body", "request_"), MANAGE)
def test_each_change_needs_session_csrf_same_origin_and_a_known_host(
        client: Client, fake: FakeGuard, path: str, body: dict[str, Any],
        request_: dict[str, Any]) -> None:
    assert client.request("POST", path, body, cookie=False).status == 401
    assert client.request("POST", path, body, csrf=False).status == 403
    assert client.request("POST", path, body, headers={"X-CSRF-Token": "guess"}).status == 403
    assert client.request("POST", path, body, origin="http://evil.example").status == 403
    assert client.request("POST", path, body, origin=False).status == 403
    assert client.request("POST", path, body,
                          headers={"Sec-Fetch-Site": "cross-site"}).status == 403
    assert client.request("POST", path, body, headers={"Host": "evil.example"}).status == 421
    assert client.request("POST", path, body,
                          headers={"Content-Type": "text/plain"}).status == 415
    assert client.request("GET", path).status == 405
    assert fake.manage() == []


HOSTILE_BODIES = (b"null", [], "x", 7, {}, {"device": None}, {"device": 7}, {"device": ""},
                  {"device": "-echo"}, {"device": "kitchen echo"}, {"device": "a" * 64},
                  {"device": "kitchen-echo\n"}, {"device": HOSTILE}, {"device": ["kitchen-echo"]},
                  {"device": "../../etc"}, {"device": "kitchen-echo", "mode": "STRICT"},
                  {"device": "kitchen-echo", "mode": None}, {"device": "kitchen-echo", "mode": 1},
                  {"device": "kitchen-echo", "duration_s": 0},
                  {"device": "kitchen-echo", "duration_s": -60},
                  {"device": "kitchen-echo", "duration_s": 8 * 86400},
                  {"device": "kitchen-echo", "duration_s": "1h"},
                  {"device": "kitchen-echo", "duration_s": None},
                  {"device": "kitchen-echo", "duration_s": False},
                  {"id": None}, {"id": 3}, {"id": "3"}, {"id": "r"}, {"id": "x3"},
                  {"id": "r3 "}, {"id": "r3\n"}, {"id": "w" + "9" * 13}, {"id": "R3"},
                  {"id": "r-3"}, {"id": ["r3"]}, {"id": HOSTILE})


@pytest.mark.parametrize("path", [m[0] for m in MANAGE])
def test_hostile_input_to_each_change_is_400_and_never_reaches_the_guard(
        client: Client, fake: FakeGuard, path: str) -> None:
    good = {m[0]: m[1] for m in MANAGE}[path]
    for body in HOSTILE_BODIES:
        merged = {**good, **body} if isinstance(body, dict) and body else body
        if merged == good:
            continue
        reply = client.request("POST", path, merged)
        if reply.status == 200:  # a field the endpoint does not read: the good body went on
            assert set(body) - set(good), (path, body)
            continue
        assert reply.status == 400, (path, body, reply.status)
        error = reply.json()["error"]
        assert error and "Traceback" not in error and b"<" not in reply.body, (path, body)
    raws = [b"{", b"\x00\xff", b"[" * 5000 + b"]" * 5000, b'{"duration_s": NaN}']
    if path == "/api/mute":
        raws += [b'{"device": "kitchen-echo", "duration_s": Infinity}',
                 b'{"device": "kitchen-echo", "duration_s": NaN}',
                 b'{"device": "kitchen-echo", "duration_s": 1e400}']
    for raw in raws:
        assert client.request("POST", path, raw).status == 400, (path, raw[:20])
    assert [r for r in fake.manage() if r != {m[0]: m[2] for m in MANAGE}[path]] == []


def test_guard_refusals_are_409_with_inert_text(client: Client, fake: FakeGuard) -> None:
    fake.fail_with = f"no device named {HOSTILE!r}"
    for path, body, _ in MANAGE:
        reply = client.request("POST", path, body)
        assert reply.status == 409, path
        assert b"<" not in reply.body and b"\x1b" not in reply.body
        assert reply.json()["error"].startswith("no device named")
    fake.fail_with = None
    fake.crash = True
    for path, body, _ in MANAGE:
        assert client.request("POST", path, body).status == 500, path
    assert client.request("GET", "/api/devices").status == 500
    fake.crash = False
    fake.manage_replies["revoke"] = lambda r: ["not", "an", "object"]
    reply = client.request("POST", "/api/revoke", {"id": "r3"})
    assert reply.status == 200 and reply.json()["result"] is None
    fake.manage_replies["revoke"] = lambda r: {HOSTILE: 1, "id": HOSTILE, "n": float("nan"),
                                               "revoked": [HOSTILE, 3], "nested": {"a": 1}}
    reply = client.request("POST", "/api/revoke", {"id": "r3"})
    assert reply.status == 200 and b"<" not in reply.body
    result = reply.json()["result"]
    assert set(result) == {"id", "n", "revoked"} and result["n"] is None
    assert result["revoked"] == [display_text(HOSTILE, 64)]


@pytest.mark.parametrize("path", ["/api/devices", "/api/rules", "/api/log?outcome=blocked"])
def test_listings_need_a_session_and_a_known_host(client: Client, fake: FakeGuard,
                                                  path: str) -> None:
    before = len(fake.requests)
    assert client.request("GET", path, cookie=False).status == 401
    assert client.request("GET", path, headers={"Cookie": "hushgate_session=forged"}
                          ).status == 401
    assert client.request("GET", path, headers={"Host": "evil.example"}).status == 421
    assert len(fake.requests) == before
    assert client.request("GET", path).status == 200


def _log_request(fake: FakeGuard) -> dict[str, Any]:
    return [r for r, _ in fake.requests if r.get("cmd") == "log"][-1]


def test_log_filters_reach_the_guard(client: Client, fake: FakeGuard) -> None:
    fake.logged(20, "blocked", "kitchen-echo", "msg.example", 10, "rule")
    reply = client.request("GET", "/api/log?outcome=blocked&device=kitchen-echo&since=1000"
                                  "&until=2000000000&text=Bob%20dispatch&limit=100")
    assert reply.status == 200
    assert _log_request(fake) == {"cmd": "log", "limit": 100, "outcome": "blocked",
                                  "device": "kitchen-echo", "since": 1000.0,
                                  "until": 2000000000.0, "text": "Bob dispatch"}
    assert [r["outcome"] for r in reply.json()["log"]] == ["blocked"]
    # no filter: the configured number of recent records; empty values are no filter
    assert client.request("GET", "/api/log?device=&text=").status == 200
    assert _log_request(fake) == {"cmd": "log", "limit": 20}


@pytest.mark.parametrize("query", [
    "outcome=maybe", "outcome=BLOCKED", "device=" + "a" * 70, "device=%3Cscript%3E",
    "device=kitchen-echo%0A", "since=yesterday", "since=nan", "since=inf", "since=-5",
    "until=1e400", "since=2000&until=1000", "limit=0", "limit=501", "limit=-1", "limit=1.5",
    "limit=%EF%BC%91", "text=" + "x" * 101, "text=%00", "text=a%1Bb", "colour=red",
    "device=a&device=b", "&".join(f"f{i}=1" for i in range(20)), "text=" + "%ff" * 2000,
])
def test_hostile_log_filters_are_400(client: Client, fake: FakeGuard, query: str) -> None:
    before = len(fake.requests)
    reply = client.request("GET", "/api/log?" + query)
    assert reply.status == 400, (query, reply.status, reply.body[:100])
    assert reply.json()["error"] and b"<" not in reply.body
    assert len(fake.requests) == before


# -- Host allowlist ------------------------------------------------------------------------------


def test_foreign_host_header_is_refused(client: Client, fake: FakeGuard,
                                        token: str) -> None:
    before = len(fake.requests)
    for host in ("evil.example", f"evil.example:{client.prompt.port}", "127.0.0.1.evil.example",
                 "", "192.168.1.1", "localhost:1:2"):
        for method, path, body in (("GET", "/", None), ("GET", "/api/pending", None),
                                   ("POST", "/api/decide", {"id": 7, "verb": "allow"}),
                                   ("POST", "/api/login", {"secret": token})):
            reply = client.request(method, path, body, headers={"Host": host})
            assert reply.status == 421, (host, path)
    assert len(fake.requests) == before
    # Loopback names are fine when the prompt listens on loopback.
    assert client.request("GET", "/", headers={"Host": f"localhost:{client.prompt.port}"}
                          ).status == 200


def test_configured_host_names_are_allowed(fake: FakeGuard, secrets_dir: Path) -> None:
    server = WebPrompt("127.0.0.1:0", fake, secret_file=str(secrets_dir / "t"),
                       allowed_hosts=("Hushgate.LAN", "fd00::1"), state_dir=str(secrets_dir))
    with server:
        c = Client(server)
        assert c.request("GET", "/", headers={"Host": "hushgate.lan:8787"}).status == 200
        assert c.request("GET", "/", headers={"Host": "[fd00::1]:8787"}).status == 200
        assert c.request("GET", "/", headers={"Host": "other.lan"}).status == 421


# -- listening ------------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:8787", "[::]:8787", "8.8.8.8:8787",
                                    "[2001:4860::1]:8787", "[::ffff:8.8.8.8]:8787",
                                    "224.0.0.1:8787"])
def test_binding_every_interface_or_a_public_address_is_refused(
        listen: str, fake: FakeGuard, secrets_dir: Path) -> None:
    with pytest.raises(WebError, match="refusing to listen"):
        WebPrompt(listen, fake, secret_file=str(secrets_dir / "t"), state_dir=str(secrets_dir))


def test_listen_must_be_an_address_and_port(fake: FakeGuard, secrets_dir: Path) -> None:
    for listen in ("router.lan:8787", "192.168.1.1", "fd00::1:8787", "192.168.1.1:99999"):
        with pytest.raises(WebError, match="ADDRESS:PORT"):
            WebPrompt(listen, fake, secret_file=str(secrets_dir / "t"),
                      state_dir=str(secrets_dir))


def test_lan_addresses_are_accepted_and_public_only_when_allowed(
        fake: FakeGuard, secrets_dir: Path) -> None:
    kw: dict[str, Any] = {"secret_file": str(secrets_dir / "t"), "state_dir": str(secrets_dir)}
    for listen in ("192.168.1.1:8787", "10.0.0.1:80", "[fd00::1]:8787", "[fe80::1]:8787"):
        assert WebPrompt(listen, fake, **kw).port in (8787, 80)
    with pytest.raises(WebError, match="web.hosts"):
        WebPrompt("0.0.0.0:8787", fake, allow_public=True, **kw)
    everywhere = WebPrompt("0.0.0.0:8787", fake, allow_public=True,
                           allowed_hosts=("router.lan",), **kw)
    assert "router.lan" in everywhere.allowed_hosts


# -- what a browser receives ----------------------------------------------------------------------


def test_every_response_is_no_store_with_security_headers(client: Client, prompt: WebPrompt,
                                                          token: str) -> None:
    client.request("GET", "/")
    client.request("GET", "/app.js")
    client.request("GET", "/app.css")
    client.request("GET", "/api/pending")
    client.request("GET", "/api/log")
    client.request("GET", "/nope")
    client.decide(7, csrf=False)
    client.request("GET", "/", headers={"Host": "evil.example"})
    anonymous = Client(prompt)
    anonymous.request("GET", "/api/pending")
    for _ in range(6):
        anonymous.login("wrong-" + "x" * 40)
    statuses = {r.status for r in client.replies + anonymous.replies}
    assert {200, 401, 403, 404, 421, 429} <= statuses
    for reply in client.replies + anonymous.replies:
        h = reply.headers
        assert h["cache-control"] == "no-store", reply.status
        assert h["x-frame-options"] == "DENY"
        assert h["x-content-type-options"] == "nosniff"
        assert h["referrer-policy"] == "no-referrer"
        csp = h["content-security-policy"]
        assert "default-src 'self'" in csp and "unsafe-inline" not in csp
        assert h["server"] == "hushgate"
    # The stdlib's own error path (a request it cannot parse) carries them too.
    for line, status in ((b"GARBAGE / HTTP/1.1 extra", "400"), (b"BREW / HTTP/1.1", "501")):
        with socket.create_connection(("127.0.0.1", prompt.port), timeout=5) as sock:
            sock.sendall(line + b"\r\nHost: " + client.host.encode() + b"\r\n\r\n")
            raw = sock.recv(65536).decode("latin-1").lower()
        assert raw.startswith("http/1.") and raw.split()[1] == status, raw[:60]
        assert "cache-control: no-store" in raw and "x-frame-options: deny" in raw


def test_page_loads_its_script_and_style_from_files_not_inline(client: Client) -> None:
    page = client.request("GET", "/")
    assert page.headers["content-type"].startswith("text/html")
    html = page.body.decode()
    assert '<script src="/app.js"' in html
    assert re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) is None  # no inline script
    assert "<style" not in html and " style=" not in html and "onclick" not in html.lower()
    script = client.request("GET", "/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    js = script.body.decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function"):
        assert sink not in js, sink
    assert "textContent" in js


def test_only_listed_fields_reach_the_browser(client: Client) -> None:
    pending = client.request("GET", "/api/pending")
    assert b"RAW-PACKET-BYTES" not in pending.body and b"tokens" not in pending.body
    item = pending.json()["pending"][0]
    assert set(item) == {"id", "device", "remote", "host", "category", "held_packets",
                         "held_bytes", "started", "expires"}
    assert item["held_packets"] == 11 and item["held_bytes"] == 14_336
    log = client.request("GET", "/api/log")
    assert b"RAW-PACKET-BYTES" not in log.body
    assert "raw" not in log.json()["log"][0]


def test_display_text_makes_hostile_text_inert() -> None:
    shown = display_text(HOSTILE)
    assert len(shown) <= HOST_MAX_CHARS and shown.endswith("\u2026")
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "\\x1b[2J" in shown and "\\u202e" in shown
    assert shown.startswith('<img src=x onerror="window.__pwned=1">')  # text, shown as text
    assert display_text("bob.amazon.com") == "bob.amazon.com"


def test_hostile_host_name_is_escaped_in_every_response(fake: FakeGuard, client: Client) -> None:
    fake.add(9, device="den-echo", host=HOSTILE)
    fake.logged(6, "denied", "den-echo", HOSTILE, 30, "web")
    bodies = [client.request("GET", "/api/pending"), client.request("GET", "/api/log"),
              client.decide(9, "deny")]
    fake.fail_with = f"no pending upload for {HOSTILE}"
    bodies += [client.decide(7), client.request("GET", "/api/pending")]
    for reply in bodies:
        assert reply.status in (200, 409, 502)
        raw = reply.body
        assert b"<" not in raw and b">" not in raw and b"&" not in raw, raw[:200]
        assert b"\x1b" not in raw and b"\x07" not in raw
        assert b"\\u003cimg src=x onerror=" in raw  # the JSON escape, not the markup
    assert any(p["host"] == SHOWN_HOSTILE for p in bodies[0].json()["pending"])
    assert bodies[1].json()["log"][0]["host"] == SHOWN_HOSTILE
    assert bodies[2].json()["upload"]["host"] == SHOWN_HOSTILE


# -- secrets on disk and TLS ----------------------------------------------------------------------


def test_token_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    secret_file = tmp_path / "etc" / "web.token"
    first = web_token(str(secret_file), str(tmp_path), tls=False)
    assert first["fingerprint"] is None
    assert len(first["token"]) >= 43 and re.fullmatch(r"[A-Za-z0-9_-]+", first["token"])
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    assert web_token(str(secret_file), str(tmp_path), tls=False)["token"] == first["token"]
    os.chmod(secret_file, 0o644)
    with pytest.raises(WebError, match="chmod 600"):
        web_token(str(secret_file), str(tmp_path), tls=False)


def test_tls_serves_the_certificate_whose_fingerprint_web_token_reports(
        fake: FakeGuard, secrets_dir: Path) -> None:
    secret_file = str(secrets_dir / "web.token")
    server = WebPrompt("127.0.0.1:0", fake, secret_file=secret_file, tls=True,
                       state_dir=str(secrets_dir))
    with server:
        info = web_token(secret_file, str(secrets_dir))
        assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", info["fingerprint"])
        assert stat.S_IMODE(os.stat(secrets_dir / "web-key.pem").st_mode) == 0o600
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # pinned by fingerprint below, as a phone would
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        served = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
        assert served == info["fingerprint"]
        c = Client(server, context=context)
        assert c.origin.startswith("https://")
        reply = c.login(info["token"])
        assert reply.status == 200
        cookie = reply.headers["set-cookie"]
        assert cookie.startswith("__Host-hushgate_session=") and "; Secure" in cookie
        assert c.request("GET", "/api/pending").status == 200
        # Plain HTTP to the TLS port gets nothing useful.
        plain = Client(server)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/")
    # The certificate survives restarts: a phone that pinned it keeps trusting it.
    assert web_token(secret_file, str(secrets_dir))["fingerprint"] == info["fingerprint"]


# -- a real browser -------------------------------------------------------------------------------


def _sign_in(driver: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    secret = wait_for(lambda: _visible(driver, "secret"), "the sign-in form")
    secret.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait_for(lambda: _visible(driver, "empty") or _visible(driver, "pending"),
             "the list after signing in")


def _visible(driver: Any, element_id: str) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        element = driver.find_element(By.ID, element_id)
        return element if element.is_displayed() else None
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def _card(driver: Any, upload_id: int) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        cards = driver.find_elements(By.CSS_SELECTOR, f'li.card[data-id="{upload_id}"]')
        return cards[0] if cards and cards[0].is_displayed() else None
    except StaleElementReferenceException:  # removed between finding and asking: gone
        return None


def _texts(driver: Any, selector: str) -> list[str]:
    """textContent of every match, read in one step (the log list is rebuilt every few s)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector)


def _click(driver: Any, upload_id: int, action: str) -> None:
    from selenium.webdriver.common.by import By

    card = wait_for(lambda: _card(driver, upload_id), f"upload {upload_id} on the page")
    card.find_element(By.CSS_SELECTOR, f'button[data-action="{action}"]').click()


def _csp_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser")
            if "Content Security Policy" in e["message"] or "Refused to" in e["message"]]


def test_browser_shows_a_held_upload_live_and_sends_the_decisions(
        tmp_path: Path, fake: FakeGuard, prompt: WebPrompt, token: str) -> None:
    fake.pending.clear()
    fake.log.clear()
    fake.logged(3, "expired", "living-room-echo", "avs-alexa-4-na.amazon.com", 900, "expired")
    fake.logged(4, "denied", "kitchen-echo", BOB, 420, "web")
    fake.logged(5, "approved", "kitchen-echo", BOB, 120, "cli:0")
    with chromium(tmp_path) as driver:
        _sign_in(driver, prompt.url, token)
        assert _visible(driver, "empty") is not None  # nothing held yet
        # The upload is held after the page loaded: it must appear without a reload.
        fake.add(7, "kitchen-echo", BOB, held_packets=11, held_bytes=14_336, waiting_s=4)
        card = wait_for(lambda: _card(driver, 7), "the held upload to appear")
        text = card.text
        assert "kitchen-echo" in text and BOB in text
        assert "11 packets" in text and "14 KB held" in text
        assert "left, then denied" in text and "Allow once" in text
        wait_for(lambda: driver.title == "(1) hushgate", "the title to count the upload")
        wait_for(lambda: "living-room-echo" in _texts(driver, "#log .device"),
                 "the recent decisions")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "web-prompt.png"
        assert driver.save_screenshot(str(shot))
        png = shot.read_bytes()
        width, height = png_size(png)
        assert width >= 400 and height >= 800 and len(png) > 20_000
        dom = driver.execute_script("return document.body.innerText")
        assert "kitchen-echo" in dom and BOB in dom

        _click(driver, 7, "allow-once")
        wait_for(lambda: fake.decisions(), "the handler to receive the decision")
        assert fake.decisions() == [{"cmd": "decide", "id": 7, "verb": "allow",
                                     "scope": "once", "duration_s": None, "by": "web"}]
        wait_for(lambda: _card(driver, 7) is None and _visible(driver, "empty"),
                 "the answered upload to leave the list")

        fake.add(8, "kitchen-echo", BOB)
        _click(driver, 8, "deny")
        wait_for(lambda: len(fake.decisions()) == 2, "the deny to reach the handler")
        assert fake.decisions()[1] == {"cmd": "decide", "id": 8, "verb": "deny",
                                       "scope": "once", "duration_s": None, "by": "web"}

        fake.add(9, "kitchen-echo", BOB)
        _click(driver, 9, "allow-30min")
        wait_for(lambda: len(fake.decisions()) == 3, "the 30 min allow to reach the handler")
        assert fake.decisions()[2]["scope"] == "for"
        assert fake.decisions()[2]["duration_s"] == 1800.0
        assert _csp_errors(driver) == []


def test_browser_shows_a_hostile_host_name_as_inert_text(
        tmp_path: Path, fake: FakeGuard, prompt: WebPrompt, token: str) -> None:
    from selenium.webdriver.common.by import By

    fake.pending.clear()
    fake.add(11, "den-echo", HOSTILE)
    fake.logged(10, "denied", "den-echo", HOSTILE, 60, "web")
    with chromium(tmp_path) as driver:
        _sign_in(driver, prompt.url, token)
        card = wait_for(lambda: _card(driver, 11), "the hostile upload to appear")
        host = card.find_element(By.CSS_SELECTOR, ".host")
        assert host.get_attribute("textContent") == SHOWN_HOSTILE
        wait_for(lambda: _texts(driver, "#log .host"), "the log entry")
        assert SHOWN_HOSTILE in _texts(driver, "#log .host")
        assert driver.execute_script("return document.querySelectorAll('img').length") == 0
        assert driver.execute_script("return document.scripts.length") == 1
        assert driver.execute_script("return window.__pwned === undefined") is True
        assert driver.title == "(1) hushgate"
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "web-prompt-hostile.png"))
        _click(driver, 11, "deny")
        wait_for(lambda: fake.decisions(), "the deny to reach the handler")
        assert fake.decisions()[0]["id"] == 11 and fake.decisions()[0]["verb"] == "deny"


def test_browser_shows_hostile_names_in_rules_and_log_as_text_that_wraps(
        tmp_path: Path, fake: FakeGuard, prompt: WebPrompt, token: str) -> None:
    fake.rules[0]["host"] = HOSTILE
    fake.rules[0]["source"] = HOSTILE
    fake.logged(12, "blocked", "den-echo", HOSTILE, 5, "rule")
    fake.log[0].update(kind="blocked", reason=HOSTILE, attempts=2)
    with chromium(tmp_path, width=390, height=844) as driver:
        _sign_in(driver, prompt.url, token)
        _tab(driver, "rules")
        wait_for(lambda: _texts(driver, "#rules .host"), "the rule")
        assert _texts(driver, "#rules .host") == [SHOWN_HOSTILE]
        _tab(driver, "log")
        wait_for(lambda: SHOWN_HOSTILE in _texts(driver, "#log .host"), "the blocked entry")
        for _ in ("rules", "log"):
            _tab(driver, _)
            assert driver.execute_script("return document.documentElement.scrollWidth") <= 390
        assert driver.execute_script("return document.querySelectorAll('img').length") == 0
        assert driver.execute_script("return window.__pwned === undefined") is True
        assert _csp_errors(driver) == []


def _stateful(fake: FakeGuard) -> None:
    """The fake's management commands change what its listings show, as the daemon's do."""
    dev = fake.devices[0]

    def mute(r: dict[str, Any]) -> dict[str, Any]:
        dev["mute_until"] = time.time() + r["duration_s"]
        fake.rules.append({"id": "w9", "kind": "mute", "device": r["device"], "host": None,
                           "category": None, "created": time.time(),
                           "until": dev["mute_until"], "duration_text": r.get("duration_text"),
                           "source": r["by"]})
        return {"id": "w9", "device": r["device"], "kind": "quiet", "until": dev["mute_until"]}

    def unmute(r: dict[str, Any]) -> dict[str, Any]:
        dev["mute_until"] = None
        fake.rules[:] = [x for x in fake.rules if x["kind"] != "mute"]
        return {"device": r["device"], "revoked": ["w9"]}

    def revoke(r: dict[str, Any]) -> dict[str, Any]:
        gone = next(x for x in fake.rules if x["id"] == r["id"])
        fake.rules.remove(gone)
        return gone

    def mode(r: dict[str, Any]) -> dict[str, Any]:
        dev["mode"] = r["mode"]
        return {"device": r["device"], "mode": r["mode"], "configured": "strict",
                "overridden": True}

    fake.manage_replies.update(window=mute, unmute=unmute, revoke=revoke, mode=mode)


def _tab(driver: Any, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, f"tab-{name}").click()
    wait_for(lambda: _visible(driver, f"panel-{name}"), f"the {name} section")


def _device_card(driver: Any, name: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        cards = driver.find_elements(By.CSS_SELECTOR, f'li.device-card[data-device="{name}"]')
        return cards[0] if cards and cards[0].is_displayed() else None
    except StaleElementReferenceException:
        return None


def _device_text(driver: Any, name: str) -> str:
    return driver.execute_script(
        "const e = document.querySelector(`li.device-card[data-device=\"${arguments[0]}\"]`);"
        "return e ? e.textContent : ''", name)


def _press(driver: Any, root_css: str, action: str) -> None:
    """Click the `action` button inside the element `root_css` (found afresh: lists redraw)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def go() -> bool:
        try:
            driver.find_element(By.CSS_SELECTOR,
                                f'{root_css} button[data-action="{action}"]').click()
            return True
        except (StaleElementReferenceException, Exception):  # noqa: BLE001 - redrawn: retry
            return False

    wait_for(go, f"the {action} button in {root_css}")


def test_browser_manages_devices_rules_and_the_log_on_a_phone(
        tmp_path: Path, fake: FakeGuard, prompt: WebPrompt, token: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _stateful(fake)
    fake.pending.clear()
    fake.logged(20, "blocked", "kitchen-echo", "dp-gw-na.amazon.com", 30, "rule")
    with chromium(tmp_path, width=390, height=844) as driver:
        _sign_in(driver, prompt.url, token)
        # a phone shows one section at a time, the tabs at the bottom within thumb reach
        assert _visible(driver, "panel-devices") is None and _visible(driver, "tabs")
        tabs = driver.find_element(By.ID, "tabs").rect
        assert tabs["y"] + tabs["height"] >= 844 - 2 and tabs["height"] >= 52, tabs
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390
        # an upload held while another tab shows: a banner says so
        _tab(driver, "devices")
        fake.add(7)
        banner = wait_for(lambda: _visible(driver, "held-banner"), "the held banner")
        assert "held" in banner.text
        card = wait_for(lambda: _device_card(driver, "kitchen-echo"), "the device card")
        assert "online" in card.text and "approved 4" in card.text and "blocked 3" in card.text
        _press(driver, 'li.device-card[data-device="kitchen-echo"]', "mute")
        wait_for(lambda: fake.manage(), "the mute")
        assert fake.manage()[-1] == {"cmd": "window", "device": "kitchen-echo", "kind": "quiet",
                                     "duration_s": 3600.0, "duration_text": "1h", "by": "web"}
        wait_for(lambda: "Muted until" in _device_text(driver, "kitchen-echo"),
                 "the muted-until line")
        _press(driver, 'li.device-card[data-device="kitchen-echo"]', "unmute")
        wait_for(lambda: fake.manage()[-1]["cmd"] == "unmute", "the unmute")
        wait_for(lambda: "Mute for" in _device_text(driver, "kitchen-echo")
                 and "Muted until" not in _device_text(driver, "kitchen-echo"),
                 "the mute to be lifted on the page")
        select = Select(_device_card(driver, "kitchen-echo").find_element(By.CSS_SELECTOR,
                                                                         "select.mode"))
        select.select_by_value("monitor")
        wait_for(lambda: fake.manage()[-1]["cmd"] == "mode", "the mode change")
        assert fake.manage()[-1] == {"cmd": "mode", "device": "kitchen-echo",
                                     "mode": "monitor", "by": "web"}
        # rules: the always-rule is listed and revoked
        _tab(driver, "rules")
        wait_for(lambda: _texts(driver, '#rules li[data-id="r3"]'), "the always-rule")
        assert BOB in _texts(driver, '#rules li[data-id="r3"]')[0]
        _press(driver, '#rules li[data-id="r3"]', "revoke")
        wait_for(lambda: fake.manage()[-1] == {"cmd": "revoke", "id": "r3", "by": "web"},
                 "the revoke")
        wait_for(lambda: not _texts(driver, '#rules li[data-id="r3"]')
                 and _visible(driver, "rules-empty"), "the revoked rule to leave the list")
        # the log, filtered to blocked messaging
        _tab(driver, "log")
        Select(driver.find_element(By.ID, "f-outcome")).select_by_value("blocked")
        wait_for(lambda: [r for r, _ in fake.requests if r.get("cmd") == "log"
                          and r.get("outcome") == "blocked"], "the filtered log request")
        wait_for(lambda: _texts(driver, "#log .outcome") == ["blocked"], "only blocked entries")
        assert "connection refused" in _texts(driver, "#log .size")[0]
        driver.find_element(By.ID, "f-text").send_keys("dp-gw")
        wait_for(lambda: [r for r, _ in fake.requests if r.get("text") == "dp-gw"],
                 "the text filter")
        # back to the held upload: answered "always allow" from its card
        driver.find_element(By.ID, "held-banner").click()
        _click(driver, 7, "allow-always")
        wait_for(lambda: fake.decisions(), "the always-allow")
        assert fake.decisions()[-1] == {"cmd": "decide", "id": 7, "verb": "allow",
                                        "scope": "always", "duration_s": None, "by": "web"}
        fake.add(8)
        _click(driver, 8, "allow-10min")
        wait_for(lambda: len(fake.decisions()) == 2, "the 10 min allow")
        assert fake.decisions()[-1]["duration_s"] == 600.0
        assert fake.decisions()[-1]["duration_text"] == "10m"
        fake.add(9)
        _click(driver, 9, "deny-always")
        wait_for(lambda: len(fake.decisions()) == 3, "the always-deny")
        assert fake.decisions()[-1]["scope"] == "always"
        assert fake.decisions()[-1]["verb"] == "deny"
        assert _csp_errors(driver) == []


def test_browser_on_a_wide_screen_shows_every_section_at_once(
        tmp_path: Path, fake: FakeGuard, prompt: WebPrompt, token: str) -> None:
    with chromium(tmp_path, width=1280, height=800, scale=1.0) as driver:
        _sign_in(driver, prompt.url, token)
        for panel in ("held", "devices", "rules", "log"):
            wait_for(lambda p=panel: _visible(driver, f"panel-{p}"), f"the {panel} section")
        assert _visible(driver, "tabs") is None
        left = driver.find_element("id", "panel-held").rect
        right = driver.find_element("id", "panel-rules").rect
        assert right["x"] > left["x"] + left["width"] - 1, (left, right)
        wait_for(lambda: _device_card(driver, "kitchen-echo"), "the device card")
