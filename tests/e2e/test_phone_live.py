"""Prompts that reach a phone, live (issue 15 point 3): a real `hushgate run` (tcp_hold "relay") in
the simulated home, a real Mosquitto broker (Debian's /usr/sbin/mosquitto, started here by PID in
the router's namespace on its LAN address, password auth and TLS with a CA made here), a paho
client in the LAN acting as Home Assistant, and a local HTTP server in the LAN standing in for an
ntfy server: it checks the publish format and then "presses" a button by sending the action's
HTTP request itself, exactly as the ntfy app on a phone would.

What left the house is read from the cloud's own counters. Every wait is bounded; the broker, the
fake ntfy server and the guard are stopped by PID / closed when a test ends, pass or fail.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from hushsim.topology import GW_LAN_V4, UNGUARDED_V4, Topology
from tests.ci import missing_or_fail, need_tool
from tests.e2e.guardkit import (
    Guard,
    MakeGuard,
    SpeakerRun,
    cloud_bytes_stay,
    cloud_conn_by_id,
    cloud_conn_since,
    record,
)
from tests.test_mqtt import make_ca

QUEUE = 61  # this module's NFQUEUE number
VOICE = "bob-dispatch-prod-na.amazon.com"
MOSQUITTO = "/usr/sbin/mosquitto"
BROKER_PORT = 18883  # TLS, on the router's LAN address
WEB_PORT = 8795
METRICS_PORT = 9881  # in the router's namespace
WEB = f"http://{GW_LAN_V4}:{WEB_PORT}"
NTFY_PORT = 18080  # the fake ntfy server, on the unguarded LAN host
NTFY_TOPIC = "hushgate-live-topic_1"
NTFY_TOKEN = "tk_livetestsecret"
HOLD_TIMEOUT_S = 30.0
WAIT_S = 10.0


def wait_for(condition: Callable[[], Any], timeout_s: float = WAIT_S, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


# -- the broker --------------------------------------------------------------------------------


class Broker:
    """Mosquitto in gw on GW_LAN_V4:BROKER_PORT, TLS only (a CA made here), password auth."""

    def __init__(self, topo: Topology, directory: Path) -> None:
        if not os.path.exists(MOSQUITTO):
            missing_or_fail("mosquitto is not installed (apt-get install mosquitto; "
                            "scripts/bootstrap.sh installs it)")
        need_tool("mosquitto_passwd", "mosquitto")
        self.topo = topo
        self.dir = directory
        self.ca, cert, key = make_ca(directory, GW_LAN_V4)
        passwd = directory / "passwd"
        passwd.write_text("")
        for user, password in (("hushgate", "hg-live-pass"), ("hass", "ha-live-pass")):
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password],
                           check=True, capture_output=True, timeout=10)
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text("\n".join([
            f"listener {BROKER_PORT} {GW_LAN_V4}", "allow_anonymous false",
            f"password_file {passwd}", "persistence false", "user root",
            f"cafile {self.ca}", f"certfile {cert}", f"keyfile {key}",
            f"log_dest file {directory / 'mosquitto.log'}"]) + "\n")
        self.proc: subprocess.Popen[Any] | None = None

    def start(self) -> Broker:
        self.proc = self.topo.popen("gw", MOSQUITTO, "-c", str(self.conf),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()

            def probe() -> bool:
                with socket.socket() as s:
                    s.settimeout(0.3)
                    return s.connect_ex((GW_LAN_V4, BROKER_PORT)) == 0

            return self.topo.call_in("gw", probe, timeout_s=5.0)

        wait_for(up, 5.0, "mosquitto listening")
        return self

    def kill(self) -> None:
        """SIGKILL by PID: the broker vanishes without a goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text(errors="replace")[-1500:] if path.exists() else ""


class HomeAssistant:
    """A paho client in the LAN host "lan" (its socket made in that namespace)."""

    def __init__(self, topo: Topology, broker: Broker) -> None:
        import paho.mqtt.client as paho

        self.messages: list[tuple[str, bytes]] = []
        self.first_seen: dict[tuple[str, bytes], float] = {}  # when each message first came
        self.lock = threading.Lock()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="live-ha")
        client.username_pw_set("hass", "ha-live-pass")
        client.tls_set(ca_certs=str(broker.ca))
        client.on_message = self._on_message
        client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("#", qos=1)
        client.reconnect_delay_set(60, 60)  # a reconnect would open its socket outside "lan"
        self.client = client
        topo.call_in("lan", lambda: client.connect(GW_LAN_V4, BROKER_PORT, 30), timeout_s=10.0)
        client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.first_seen.setdefault((msg.topic, bytes(msg.payload)), time.time())

    def wait(self, topic: str, predicate: Callable[[bytes], bool] = lambda b: True,
             timeout_s: float = WAIT_S) -> bytes:
        def hit() -> bytes | None:
            with self.lock:
                for t, payload in reversed(self.messages):
                    if t == topic and predicate(payload):
                        return payload
            return None

        return wait_for(hit, timeout_s, f"MQTT message on {topic}")

    def publish(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5.0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(topology: Topology, tmp_path: Path) -> Iterator[Broker]:
    b = Broker(topology, tmp_path).start()
    try:
        yield b
    finally:
        b.kill()


# -- the fake ntfy server ----------------------------------------------------------------------


class FakeNtfy:
    """An ntfy server's publish endpoint on UNGUARDED_V4:NTFY_PORT (the LAN host "lan"): keeps
    every publish (path, headers, JSON); `press(action)` sends an http action as the app does."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.published: list[tuple[str, dict[str, str], Any]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(min(int(self.headers.get("Content-Length", "0")), 65536))
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = None
                with owner.lock:
                    owner.published.append((self.path, dict(self.headers), parsed))
                reply = json.dumps({"id": f"m{len(owner.published)}", "event": "message"})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply.encode())

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        sock = topo.socket_in("lan")  # the listening socket lives in the LAN host's namespace
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((UNGUARDED_V4, NTFY_PORT))
        sock.listen(16)
        self.server = http.server.ThreadingHTTPServer((UNGUARDED_V4, NTFY_PORT), Handler,
                                                      bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = sock
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{UNGUARDED_V4}:{NTFY_PORT}"

    def wait_publish(self, predicate: Callable[[Any], bool]) -> tuple[str, dict[str, str], Any]:
        def hit() -> Any:
            with self.lock:
                return next((p for p in self.published if predicate(p[2])), None)

        return wait_for(hit, WAIT_S, "an ntfy publish")

    def press(self, action: dict[str, Any]) -> tuple[int, Any]:
        """What the ntfy app does for an http action: METHOD URL, its headers, its body, from
        the phone on the LAN."""
        parts = urlsplit(action["url"])

        def go() -> tuple[int, Any]:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
            try:
                conn.request(action.get("method", "POST"), parts.path or "/",
                             body=action.get("body", "").encode(),
                             headers=action.get("headers", {}))
                resp = conn.getresponse()
                return resp.status, json.loads(resp.read() or b"null")
            finally:
                conn.close()

        return self.topo.call_in("lan", go, timeout_s=15.0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ntfy(topology: Topology) -> Iterator[FakeNtfy]:
    server = FakeNtfy(topology)
    try:
        yield server
    finally:
        server.close()


# -- the guard ---------------------------------------------------------------------------------


def _phone_guard(guards: MakeGuard, broker: Broker | None, ntfy: FakeNtfy | None) -> Guard:
    sections: dict[str, dict[str, Any]] = {"web": {"listen": f"{GW_LAN_V4}:{WEB_PORT}",
                                                   "tls": False},
                                           "metrics": {"listen": f"127.0.0.1:{METRICS_PORT}"}}
    if broker is not None:
        sections["mqtt"] = {"host": GW_LAN_V4, "port": BROKER_PORT, "username": "hushgate",
                            "password": "hg-live-pass", "ca_file": str(broker.ca)}
    g = guards(autostart=False, tcp_hold="relay", hold_timeout_s=HOLD_TIMEOUT_S,
               sections=sections)
    if ntfy is not None:
        with g.config_path.open("a") as f:
            f.write("\n[[hook]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in {
                "kind": "ntfy", "url": ntfy.url, "topic": NTFY_TOPIC, "token": NTFY_TOKEN,
                "priority": 5}.items()) + "\n")
    g.start()
    return g


def _held_upload(g: Guard, *, hold_open: bool = False
                 ) -> tuple[SpeakerRun, dict[str, Any], dict[str, Any]]:
    """A speaker's upload through the relay, held: (the run, the cloud's connection with 0
    application bytes, the pending upload). `hold_open`: the speaker stays connected after its
    upload (so a deny's reset reaches it)."""
    since = time.time()
    extra = ("--hold-open", "20") if hold_open else ()
    sp = g.speaker("echo", "--host", VOICE, "-4", *extra, "--max-seconds", "60",
                   "upload", "--profile", "echo-opus-118", wait_file=True)
    sp.ready(timeout_s=10.0)
    conn = cloud_conn_since(g.topo, VOICE, since, handshake=True)
    assert conn["app_bytes"] == 0, conn
    known = {p["id"] for p in g.pending()}
    sp.go()
    pending, _ = g.wait_pending(1, timeout_s=5.0, exclude=known)
    cloud_bytes_stay(g.topo, conn["id"], 0, 0.5, "held upload")
    return sp, conn, pending[0]


def _delivered(g: Guard, sp: SpeakerRun, conn: dict[str, Any]) -> dict[str, Any]:
    result = sp.result(timeout_s=40.0)
    assert result["error"] is None and not result["reset"], result
    g.topo.cloud.wait_for(  # type: ignore[union-attr]
        lambda s: any(c["id"] == conn["id"] and c["sha256"] == result["sha256"]
                      for c in s["tcp"]), timeout_s=10.0)
    got = cloud_conn_by_id(g.topo, conn["id"])
    assert got["app_bytes"] == result["bytes_sent"], (got, result)
    return result


def _denied(g: Guard, sp: SpeakerRun, conn: dict[str, Any]) -> None:
    result = sp.result(timeout_s=20.0)
    assert result["reset"], f"the speaker was not reset: {result}"
    assert cloud_conn_by_id(g.topo, conn["id"])["app_bytes"] == 0


# -- (a) Home Assistant answers over MQTT ------------------------------------------------------


def test_home_assistant_allows_a_held_upload_over_mqtt_and_the_cloud_gets_every_byte(
    topology: Topology, guards: MakeGuard, broker: Broker
) -> None:
    g = _phone_guard(guards, broker, None)
    wait_for(lambda: (g.cli_json("status").get("mqtt") or {}).get("connected"), WAIT_S,
             "the guard connected to the broker")
    ha = HomeAssistant(topology, broker)
    try:
        assert ha.wait("hushgate/status") == b"online"
        discovery = json.loads(ha.wait("homeassistant/sensor/hushgate/pending/config"))
        assert discovery["state_topic"] == "hushgate/pending"
        assert json.loads(ha.wait("homeassistant/switch/hushgate/echo_mute/config"))[
            "command_topic"] == "hushgate/device/echo/mute/set"
        assert ha.wait("hushgate/device/echo/mode") == b"strict"
        sp, conn, upload = _held_upload(g)
        raw = ha.wait("hushgate/pending/attributes", lambda b: upload["id"] in json.loads(b)["ids"])
        attrs = json.loads(raw)
        assert sp.went_at is not None
        seen_s = ha.first_seen[("hushgate/pending/attributes", raw)] - sp.went_at
        assert attrs["uploads"][0]["host"] == VOICE and attrs["uploads"][0]["device"] == "echo"
        event = json.loads(ha.wait("hushgate/event",
                                   lambda b: json.loads(b)["id"] == upload["id"]))
        assert event["event"] == "upload-held"
        ha.publish("hushgate/decide/set", json.dumps({"id": upload["id"], "verb": "allow"}))
        result = _delivered(g, sp, conn)
        rec = g.wait_log(lambda r: r.get("id") == upload["id"])
        assert rec["outcome"] == "approved" and str(rec["decided_by"]).startswith("mqtt"), rec
        assert ha.wait("hushgate/pending", lambda b: b == b"0") == b"0"
        record("phone_mqtt_allow", held_upload_in_ha_after_go_s=round(seen_s, 3),
               upload_bytes=result["bytes_sent"])

        # the mute switch and the mode select act on the live guard, and their states follow
        def echo() -> dict[str, Any]:
            return next(d for d in g.cli_json("devices") if d["name"] == "echo")

        ha.publish("hushgate/device/echo/mute/set", "ON")
        assert ha.wait("hushgate/device/echo/mute", lambda b: b == b"ON") == b"ON"
        assert echo()["mute_until"] > time.time() + 3000  # [mqtt] mute_for_s: an hour
        ha.publish("hushgate/device/echo/mute/set", "OFF")
        assert ha.wait("hushgate/device/echo/mute", lambda b: b == b"OFF") == b"OFF"
        assert echo()["mute_until"] is None
        ha.publish("hushgate/device/echo/mode/set", "monitor")
        assert ha.wait("hushgate/device/echo/mode", lambda b: b == b"monitor") == b"monitor"
        assert echo()["mode"] == "monitor"
    finally:
        ha.close()


# -- (b) and (c) the ntfy buttons --------------------------------------------------------------


def test_the_ntfy_deny_button_denies_and_a_replayed_or_forged_button_does_nothing(
    topology: Topology, guards: MakeGuard, ntfy: FakeNtfy
) -> None:
    g = _phone_guard(guards, None, ntfy)
    sp, conn, upload = _held_upload(g, hold_open=True)
    path, headers, msg = ntfy.wait_publish(
        lambda m: isinstance(m, dict) and m.get("sequence_id") == f"hushgate-upload-{upload['id']}"
        and "actions" in m)
    # the publish format: JSON at the server's root, authenticated, topic, buttons
    assert path == "/" and headers.get("Authorization") == f"Bearer {NTFY_TOKEN}"
    assert headers.get("Content-Type") == "application/json"
    assert msg["topic"] == NTFY_TOPIC and msg["priority"] == 5
    assert "echo" in msg["title"] and VOICE in msg["message"]
    buttons = {a["label"]: a for a in msg["actions"]}
    assert set(buttons) == {"Allow", "Deny"}
    for action in buttons.values():
        assert action["action"] == "http" and action["method"] == "POST"
        assert action["url"] == f"{WEB}/api/act" and "token" in json.loads(action["body"])
    # the phone presses Deny
    denied_at = time.time()
    status, body = ntfy.press(buttons["Deny"])
    assert status == 200 and body == {"ok": True, "id": upload["id"], "verb": "deny"}, body
    _denied(g, sp, conn)
    rec = g.wait_log(lambda r: r.get("id") == upload["id"])
    assert rec["outcome"] == "denied" and str(rec["decided_by"]).startswith("ntfy"), rec
    _, _, after = ntfy.wait_publish(
        lambda m: isinstance(m, dict) and m.get("sequence_id") == f"hushgate-upload-{upload['id']}"
        and "actions" not in m)
    assert "denied" in after["title"]
    record("phone_ntfy_deny", answered_after_press_s=round(time.time() - denied_at, 3))

    # (c) a second upload is held; a forged token, the spent Deny and its dead Allow sibling
    # are refused with 403 and change nothing
    sp2, conn2, upload2 = _held_upload(g)
    _, _, msg2 = ntfy.wait_publish(
        lambda m: isinstance(m, dict)
        and m.get("sequence_id") == f"hushgate-upload-{upload2['id']}" and "actions" in m)
    buttons2 = {a["label"]: a for a in msg2["actions"]}
    real = json.loads(buttons2["Allow"]["body"])["token"]
    forged = {**buttons2["Allow"], "body": json.dumps({"token": real[:-2] + (
        "AA" if real[-2:] != "AA" else "BB"), "verb": "allow"})}
    for attempt in (forged, buttons["Deny"], buttons["Allow"],
                    {**buttons2["Allow"], "body": "not json"}):
        status, body = ntfy.press(attempt)
        assert status == 403, (status, body)
    assert [p["id"] for p in g.pending()] == [upload2["id"]]
    cloud_bytes_stay(topology, conn2["id"], 0, 0.5, "after forged and replayed buttons")
    status, body = ntfy.press(buttons2["Allow"])
    assert status == 200 and body["verb"] == "allow", body
    _delivered(g, sp2, conn2)
    status, body = ntfy.press(buttons2["Allow"])  # replayed after it worked
    assert status == 403 and "already used" in body["error"], body
    actions = g.cli_json("status")["actions"]
    assert actions["redeemed"] == 2 and actions["refused"] >= 5, actions


# -- (d) the broker dies -----------------------------------------------------------------------


def _web_login(topo: Topology, token: str) -> tuple[str, str]:
    """Sign in to the web prompt from the LAN: (cookie, csrf)."""

    def go() -> tuple[str, str]:
        conn = http.client.HTTPConnection(GW_LAN_V4, WEB_PORT, timeout=5)
        try:
            conn.request("POST", "/api/login", body=json.dumps({"secret": token}),
                         headers={"Content-Type": "application/json", "Origin": WEB})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            assert resp.status == 200, body
            cookie = resp.getheader("Set-Cookie", "").split(";")[0]
            return cookie, body["csrf"]
        finally:
            conn.close()

    return topo.call_in("lan", go, timeout_s=15.0)


def _web_decide(topo: Topology, cookie: str, csrf: str, upload_id: int,
                verb: str) -> tuple[int, Any]:
    def go() -> tuple[int, Any]:
        conn = http.client.HTTPConnection(GW_LAN_V4, WEB_PORT, timeout=5)
        try:
            conn.request("POST", "/api/decide",
                         body=json.dumps({"id": upload_id, "verb": verb, "scope": "once"}),
                         headers={"Content-Type": "application/json", "Origin": WEB,
                                  "Cookie": cookie, "X-CSRF-Token": csrf})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    return topo.call_in("lan", go, timeout_s=15.0)


def test_with_the_broker_killed_uploads_are_still_held_and_answered_on_the_web_page(
    topology: Topology, guards: MakeGuard, broker: Broker
) -> None:
    g = _phone_guard(guards, broker, None)
    wait_for(lambda: (g.cli_json("status").get("mqtt") or {}).get("connected"), WAIT_S,
             "the guard connected to the broker")
    broker.kill()
    mqtt = wait_for(lambda: (lambda m: m if m and not m["connected"] else None)(
        g.cli_json("status").get("mqtt")), WAIT_S, "the guard saw the broker go")
    assert mqtt["disconnects"] == 1, mqtt
    t0 = time.monotonic()
    health = g.cli_ok("health", "--max-loop-age", "2").stdout
    assert time.monotonic() - t0 < 2.0 and health.startswith("healthy"), health
    sp, conn, upload = _held_upload(g)
    res = g.cli_ok("web", "token", "--config", str(g.config_path), socket=False)
    token = re.search(r"^token: ([A-Za-z0-9_-]{32,})$", res.stdout, re.M)
    assert token, res.stdout
    cookie, csrf = _web_login(topology, token.group(1))
    status, body = _web_decide(topology, cookie, csrf, upload["id"], "allow")
    assert status == 200, body
    _delivered(g, sp, conn)
    rec = g.wait_log(lambda r: r.get("id") == upload["id"])
    assert rec["outcome"] == "approved" and str(rec["decided_by"]).startswith("web"), rec
    status = g.cli_json("status")["mqtt"]
    assert not status["connected"] and status["down_s"] > 0, status
    metrics = _metrics(topology)
    assert "hushgate_mqtt_connected 0.0" in metrics, metrics[-2000:]
    assert 'hushgate_mqtt_events_total{event="disconnects"} 1.0' in metrics
    log = g.log_tail(200)
    outage = [line for line in log.splitlines() if "mqtt: broker" in line]
    assert len(outage) == 1 and "still held" in outage[0], log

    # a restart with the broker still dead starts at once; the broker back, the guard is too
    t0 = time.monotonic()
    g.restart()
    restart_s = time.monotonic() - t0
    assert not g.cli_json("status")["mqtt"]["connected"]
    broker.start()
    wait_for(lambda: g.cli_json("status")["mqtt"]["connected"], 30.0, "reconnected")
    ha = HomeAssistant(topology, broker)
    try:
        assert ha.wait("hushgate/status", lambda b: b == b"online") == b"online"
    finally:
        ha.close()
    assert "hushgate_mqtt_connected 1.0" in _metrics(topology)
    assert any("again after" in line for line in g.log_tail(200).splitlines())
    record("phone_broker_down", held_and_answered=True, mqtt=status,
           restart_with_broker_down_s=round(restart_s, 3))


def _metrics(topo: Topology) -> str:
    def get() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=5)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    return topo.call_in("gw", get, timeout_s=10.0)
