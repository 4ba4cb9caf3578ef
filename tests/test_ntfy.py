"""Phone prompts through ntfy (issue 15 point 3): the action tokens (guard/shell/actions.py), the
ntfy publish JSON and hook (guard/shell/hooks.py), the web prompt's POST /api/act, and the
config's checks. The live test with a real guard is tests/e2e/test_phone_live.py."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guard.core.config import ConfigError, Hook, parse_config
from guard.shell.actions import ActionTokens, TokenRefused
from guard.shell.hooks import Hooks, action_base, ntfy_message
from guard.shell.web import Request, WebPrompt

BOB = "bob-dispatch-prod-na.amazon.com"
NOW = 1_700_000_000.0
BASE = "http://192.168.1.1:8787"
UPLOAD = {"id": 42, "device": "kitchen-echo", "host": BOB, "remote": "52.94.233.109:443",
          "category": "voice", "expires": NOW + 20.0, "start": NOW - 0.5}
HOSTILE = '<b>x</b>\x1b[2J\u202eevil' + "a" * 400


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ntfy_hook(**kw: Any) -> Hook:
    base = dict(events=("upload-held", "upload-decided"), url="http://127.0.0.1:1",
                kind="ntfy", topic="hushgate_test_topic")
    base.update(kw)
    return Hook(**base)  # type: ignore[arg-type]


# -- tokens -----------------------------------------------------------------------------------


def test_a_token_answers_its_upload_and_verb_once_and_kills_its_sibling() -> None:
    tokens = ActionTokens(clock=Clock())
    pair = tokens.mint(42, NOW + 20)
    assert set(pair) == {"allow", "deny"} and pair["allow"] != pair["deny"]
    assert len(pair["allow"]) >= 32  # 192 random bits
    assert tokens.redeem(pair["deny"]) == (42, "deny")
    for token in (pair["deny"], pair["allow"]):  # replay, and the other button after an answer
        with pytest.raises(TokenRefused) as refused:
            tokens.redeem(token)
        assert refused.value.reason == "used"
    assert tokens.stats() == {"minted": 2, "redeemed": 1, "refused": 2, "live": 0}


def test_forged_and_malformed_tokens_are_refused() -> None:
    tokens = ActionTokens(clock=Clock())
    real = tokens.mint(7, NOW + 20)["allow"]
    forged = real[:-1] + ("A" if real[-1] != "A" else "B")
    for bad in (forged, "", None, 7, ["x"], "x" * 10_000, real.upper()):
        with pytest.raises(TokenRefused) as refused:
            tokens.redeem(bad)
        assert refused.value.reason == "unknown", bad
    assert tokens.redeem(real) == (7, "allow")  # the forgeries spent nothing


def test_tokens_die_with_the_hold_and_when_decided_elsewhere() -> None:
    clock = Clock()
    tokens = ActionTokens(clock=clock)
    expiring = tokens.mint(1, NOW + 20)
    decided = tokens.mint(2, NOW + 20)
    assert tokens.revoke(2) == 2
    clock.now = NOW + 20.0  # the hold's end
    for token in (expiring["allow"], decided["deny"]):
        with pytest.raises(TokenRefused) as refused:
            tokens.redeem(token)
        assert refused.value.reason == "expired"
    assert len(tokens) == 0


def test_a_token_never_outlives_the_cap_and_the_table_is_bounded() -> None:
    clock = Clock()
    tokens = ActionTokens(clock=clock, max_tokens=10)
    far = tokens.mint(1, None)
    first = [tokens.mint(i, NOW + 20) for i in range(2, 8)]
    assert len(tokens) == 10  # the oldest two (upload 1) pushed out
    with pytest.raises(TokenRefused):
        tokens.redeem(far["allow"])
    assert tokens.redeem(first[-1]["allow"]) == (7, "allow")
    later = tokens.mint(99, NOW + 10 * 86400)
    clock.now = NOW + 3601
    with pytest.raises(TokenRefused):
        tokens.redeem(later["allow"])


# -- the ntfy message -------------------------------------------------------------------------


def test_held_upload_is_an_ntfy_json_publish_with_allow_and_deny_http_buttons() -> None:
    msg = ntfy_message(ntfy_hook(priority=5), "upload-held", UPLOAD,
                       {"allow": "TOKEN-A", "deny": "TOKEN-D"}, BASE, now=NOW)
    assert msg["topic"] == "hushgate_test_topic"
    assert msg["priority"] == 5 and "studio_microphone" in msg["tags"]
    assert msg["sequence_id"] == "hushgate-upload-42" and msg["click"] == BASE + "/"
    assert "kitchen-echo" in msg["title"] and BOB in msg["message"] and "20 s" in msg["message"]
    allow, deny = msg["actions"]
    for action, label, token in ((allow, "Allow", "TOKEN-A"), (deny, "Deny", "TOKEN-D")):
        assert action["action"] == "http" and action["label"] == label
        assert action["method"] == "POST" and action["url"] == BASE + "/api/act"
        assert action["headers"] == {"Content-Type": "application/json"}
        assert json.loads(action["body"])["token"] == token
        assert action["clear"] is True
    json.dumps(msg)  # serialisable as is


def test_decided_upload_replaces_the_prompt_without_buttons() -> None:
    msg = ntfy_message(ntfy_hook(), "upload-decided",
                       {**UPLOAD, "outcome": "denied", "decided_by": "mqtt"}, None, BASE, now=NOW)
    assert msg["sequence_id"] == "hushgate-upload-42" and "actions" not in msg
    assert "denied" in msg["title"] and "mqtt" in msg["message"] and msg["priority"] == 2


def test_hostile_host_names_are_inert_and_capped_in_the_notification() -> None:
    msg = ntfy_message(ntfy_hook(), "upload-held", {**UPLOAD, "host": HOSTILE},
                       {"allow": "A", "deny": "D"}, BASE, now=NOW)
    text = msg["message"]
    assert "\x1b" not in text and "\u202e" not in text and "\\x1b" in text
    assert len(text) < 300


def test_action_base_follows_the_web_listen_and_tls() -> None:
    config = parse_config({"web": {"listen": "192.168.1.1:8787"}})
    assert action_base(config) == "http://192.168.1.1:8787"
    config = parse_config({"web": {"listen": "192.168.1.1:8787", "tls": True}})
    assert action_base(config) == "https://192.168.1.1:8787"
    assert action_base(parse_config({})) is None


# -- the hook, against a local stand-in for an ntfy server -------------------------------------


class _Ntfy(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).received.append((self.path, dict(self.headers), body))
        reply = b'{"id":"x"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def ntfy_server() -> Iterator[tuple[str, type[_Ntfy]]]:
    handler = type("Ntfy", (_Ntfy,), {"received": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _wait(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_ntfy_hook_publishes_to_the_server_root_with_a_token_and_buttons_that_redeem(
        ntfy_server: tuple[str, type[_Ntfy]]) -> None:
    url, handler = ntfy_server
    hooks = Hooks([ntfy_hook(url=url, token="tk_secret")], clock=lambda: NOW, action_base=BASE)
    try:
        hooks.emit("upload-held", UPLOAD)
        _wait(lambda: hooks.stats()["sent"] == 1)
        path, headers, body = handler.received[0]
        assert path == "/" and headers["Authorization"] == "Bearer tk_secret"
        msg = json.loads(body)
        tokens = {a["label"]: json.loads(a["body"])["token"] for a in msg["actions"]}
        assert hooks.tokens.redeem(tokens["Allow"]) == (42, "allow")
        hooks.emit("upload-decided", {**UPLOAD, "outcome": "approved", "decided_by": "ntfy"})
        _wait(lambda: hooks.stats()["sent"] == 2)
        assert json.loads(handler.received[1][2])["sequence_id"] == "hushgate-upload-42"
    finally:
        hooks.close(2.0)


def test_ntfy_hook_basic_auth_and_decided_elsewhere_kills_the_buttons(
        ntfy_server: tuple[str, type[_Ntfy]]) -> None:
    url, handler = ntfy_server
    hooks = Hooks([ntfy_hook(url=url, username="hush", password="p:w")], clock=lambda: NOW,
                  action_base=BASE)
    try:
        hooks.emit("upload-held", UPLOAD)
        _wait(lambda: hooks.stats()["sent"] == 1)
        headers = handler.received[0][1]
        assert headers["Authorization"] == "Basic " + base64.b64encode(b"hush:p:w").decode()
        token = json.loads(json.loads(handler.received[0][2])["actions"][0]["body"])["token"]
        hooks.emit("upload-decided", {**UPLOAD, "outcome": "approved", "decided_by": "web"})
        with pytest.raises(TokenRefused) as refused:
            hooks.tokens.redeem(token)
        assert refused.value.reason == "expired"
    finally:
        hooks.close(2.0)


def test_ntfy_hook_never_blocks_emit_when_the_server_is_down() -> None:
    hooks = Hooks([ntfy_hook(url="http://127.0.0.1:9", timeout_s=0.5)], clock=lambda: NOW,
                  action_base=BASE)
    try:
        t0 = time.monotonic()
        for i in range(50):
            hooks.emit("upload-held", {**UPLOAD, "id": i})
        assert time.monotonic() - t0 < 0.5
        _wait(lambda: hooks.stats()["failed"] >= 1)
    finally:
        hooks.close(1.0)


def test_an_ntfy_hook_without_a_web_prompt_address_is_refused() -> None:
    with pytest.raises(ValueError, match="web prompt"):
        Hooks([ntfy_hook()])


# -- POST /api/act ---------------------------------------------------------------------------


class FakeGuard:
    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], Any]] = []
        self.pending = {42, 43}

    def __call__(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        self.requests.append((request, peer))
        if request["cmd"] == "decide":
            if request["id"] not in self.pending:
                return {"ok": False, "error": f"no pending upload {request['id']}"}
            self.pending.discard(request["id"])
            return {"ok": True, "result": {"id": request["id"]}}
        return {"ok": True, "result": []}


@pytest.fixture
def prompt(tmp_path: Path) -> Iterator[tuple[WebPrompt, FakeGuard, ActionTokens]]:
    guard = FakeGuard()
    web = WebPrompt("127.0.0.1:0", guard, secret_file=str(tmp_path / "t"),
                    state_dir=str(tmp_path))
    tokens = ActionTokens()
    web.action_tokens = tokens  # type: ignore[attr-defined]
    yield web, guard, tokens


def act(web: WebPrompt, body: Any, *, host: str = "127.0.0.1:8787", method: str = "POST",
        raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else json.dumps(body).encode()
    response = web.respond(Request(method, "/api/act", {"host": host,
                                                        "content-type": "text/plain"},
                                   data, "192.168.1.50", 40000), time.time())
    return response.status, json.loads(response.body)


def test_a_button_decides_its_upload_once_without_a_session(prompt: Any) -> None:
    web, guard, tokens = prompt
    pair = tokens.mint(42, time.time() + 20)
    status, body = act(web, {"token": pair["allow"], "verb": "allow"})
    assert status == 200 and body == {"ok": True, "id": 42, "verb": "allow"}
    request, peer = guard.requests[-1]
    assert request == {"cmd": "decide", "id": 42, "verb": "allow", "scope": "once",
                       "by": "ntfy"}
    assert peer.address == "192.168.1.50"
    seen = len(guard.requests)
    for token in (pair["allow"], pair["deny"]):  # replayed, and the other button
        status, body = act(web, {"token": token})
        assert status == 403 and "already used" in body["error"]
    assert len(guard.requests) == seen  # nothing reached the guard


def test_forged_expired_and_garbage_tokens_are_403_with_no_effect(prompt: Any) -> None:
    web, guard, tokens = prompt
    real = tokens.mint(43, time.time() + 20)["deny"]
    stale = tokens.mint(42, time.time() - 1)["allow"]
    for body, raw in (({"token": real[::-1]}, None), ({"token": stale}, None), ({}, None),
                      (None, b"\xff\xfe not json"), ({"token": {"$ne": 1}}, None),
                      ([real], None)):
        status, reply = act(web, body, raw=raw)
        assert status == 403, (body, reply)
    assert guard.requests == []
    assert act(web, {"token": real})[0] == 200  # still good after the forgeries


def test_act_keeps_the_host_allowlist_and_the_method(prompt: Any) -> None:
    web, guard, tokens = prompt
    token = tokens.mint(42, time.time() + 20)["allow"]
    assert act(web, {"token": token}, host="evil.example")[0] == 421
    assert act(web, {"token": token}, method="GET")[0] == 405
    assert guard.requests == [] and act(web, {"token": token})[0] == 200


def test_an_upload_already_decided_is_409_and_the_token_is_spent(prompt: Any) -> None:
    web, guard, tokens = prompt
    guard.pending.clear()
    token = tokens.mint(42, time.time() + 20)["allow"]
    status, body = act(web, {"token": token})
    assert status == 409 and "no pending upload 42" in body["error"]
    assert act(web, {"token": token})[0] == 403


def test_without_tokens_act_is_refused(tmp_path: Path) -> None:
    guard = FakeGuard()
    web = WebPrompt("127.0.0.1:0", guard, secret_file=str(tmp_path / "t"),
                    state_dir=str(tmp_path))
    assert act(web, {"token": "x" * 32})[0] == 403 and guard.requests == []


# -- config --------------------------------------------------------------------------------


WEB = {"listen": "192.168.1.1:8787"}


def test_ntfy_hook_config_is_parsed() -> None:
    config = parse_config({"web": WEB, "hook": [
        {"kind": "ntfy", "url": "https://ntfy.sh/", "topic": "hush-123", "token": "tk_1",
         "priority": 5, "events": ["upload-held"]},
        {"kind": "ntfy", "url": "http://ntfy.lan", "topic": "t", "username": "u",
         "password": "p", "action_url": "https://router.lan:8787"},
        {"url": "http://ha.lan/hook"}]})
    first, second, plain = config.hooks
    assert (first.kind, first.url, first.topic, first.token, first.priority, first.events) == \
        ("ntfy", "https://ntfy.sh", "hush-123", "tk_1", 5, ("upload-held",))
    assert (second.username, second.password, second.action_url) == \
        ("u", "p", "https://router.lan:8787")
    assert plain.kind == "json" and "tk_1" not in repr(first) and "'p'" not in repr(second)


@pytest.mark.parametrize(("hook", "web", "message"), [
    ({"kind": "ntfy", "topic": "t"}, WEB, "needs url"),
    ({"kind": "ntfy", "url": "https://ntfy.sh"}, WEB, "and topic"),
    ({"kind": "ntfy", "url": "https://ntfy.sh", "topic": "a/b"}, WEB, "hook[0].topic"),
    ({"kind": "ntfy", "url": "ntfy.sh", "topic": "t"}, WEB, "hook[0].url"),
    ({"kind": "ntfy", "url": "https://ntfy.sh", "topic": "t"}, None, "set [web] listen"),
    ({"kind": "ntfy", "url": "https://ntfy.sh", "topic": "t", "token": "x", "username": "u",
      "password": "p"}, WEB, "not both"),
    ({"kind": "ntfy", "url": "https://ntfy.sh", "topic": "t", "username": "u"}, WEB,
     "go together"),
    ({"kind": "ntfy", "url": "https://ntfy.sh", "topic": "t", "priority": 9}, WEB,
     "hook[0].priority"),
    ({"kind": "ntfy", "url": "https://ntfy.sh", "topic": "t", "command": "/bin/x"}, WEB,
     "hook[0].command"),
    ({"kind": "ntfy", "url": "https://ntfy.sh", "topic": "t", "action_url": "x"}, WEB,
     "hook[0].action_url"),
    ({"kind": "gotify", "url": "https://x"}, WEB, "hook[0].kind"),
    ({"url": "http://x", "topic": "t"}, WEB, "only with kind"),
])
def test_bad_ntfy_hooks_are_config_errors_naming_the_key(hook: dict[str, Any],
                                                         web: Any, message: str) -> None:
    doc: dict[str, Any] = {"hook": [hook]}
    if web:
        doc["web"] = web
    with pytest.raises(ConfigError) as error:
        parse_config(doc)
    assert message in str(error.value)
