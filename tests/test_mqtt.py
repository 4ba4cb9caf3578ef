"""Home Assistant over MQTT (guard/shell/mqtt.py): the discovery payloads, the command parsing, the
config's checks, and the bridge against a real Mosquitto broker on loopback (Debian's
/usr/sbin/mosquitto, started here by PID with a temp config: password auth, and TLS with a CA made
here) with a paho client playing Home Assistant. The live test with a real guard in namespaces is
tests/e2e/test_phone_live.py."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guard.core.config import ConfigError, MqttConfig, parse_config
from guard.shell import mqtt as mqttmod
from guard.shell.mqtt import MqttBridge, discovery_messages, parse_decide, pending_state
from tests.ci import missing_or_fail, need_tool

MOSQUITTO = "/usr/sbin/mosquitto"
BOB = "bob-dispatch-prod-na.amazon.com"
WAIT_S = 10.0


def _need_mosquitto() -> None:
    if not os.path.exists(MOSQUITTO):
        missing_or_fail("mosquitto is not installed (apt-get install mosquitto; "
                        "scripts/bootstrap.sh installs it)")
    need_tool("mosquitto_passwd", "mosquitto")


def wait_for(condition: Callable[[], Any], timeout_s: float = WAIT_S, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout_s} s: {what}")
        time.sleep(0.02)


# -- pure parts --------------------------------------------------------------------------------


def test_discovery_describes_pending_mode_mute_and_buttons_per_device() -> None:
    config = MqttConfig(host="broker", client_id="hushgate")
    messages = dict(discovery_messages(config, ["kitchen-echo", "living.room"], "9.9"))
    pending = messages["homeassistant/sensor/hushgate/pending/config"]
    assert pending["state_topic"] == "hushgate/pending"
    assert pending["json_attributes_topic"] == "hushgate/pending/attributes"
    assert pending["availability_topic"] == "hushgate/status"
    assert pending["device"]["identifiers"] == ["hushgate"] and pending["device"]["sw_version"] \
        == "9.9"
    select = messages["homeassistant/select/hushgate/kitchen_echo_mode/config"]
    assert select["command_topic"] == "hushgate/device/kitchen-echo/mode/set"
    assert select["options"] == ["strict", "followups", "monitor", "off"]
    switch = messages["homeassistant/switch/hushgate/living_room_mute/config"]
    assert switch["state_topic"] == "hushgate/device/living.room/mute"
    assert (switch["payload_on"], switch["payload_off"]) == ("ON", "OFF")
    allow = messages["homeassistant/button/hushgate/kitchen_echo_allow/config"]
    deny = messages["homeassistant/button/hushgate/kitchen_echo_deny/config"]
    assert allow["command_topic"] == "hushgate/device/kitchen-echo/allow/set"
    assert deny["command_topic"] == "hushgate/device/kitchen-echo/deny/set"
    ids = [m["unique_id"] for m in messages.values()]
    assert len(ids) == len(set(ids)) == 1 + 4 * 2
    for topic, body in messages.items():
        assert set(topic.split("/")[3]) <= set("abcdefghijklmnopqrstuvwxyz0123456789_"), topic
        json.dumps(body)


def test_pending_state_lists_uploads_with_hostile_names_inert() -> None:
    hostile = "<script>x</script>\x1b[2J" + "a" * 500
    count, attrs = pending_state([
        {"id": 7, "device": "echo", "host": hostile, "remote": "1.2.3.4:443",
         "category": "voice", "expires": 5.0, "payload": "RAW"},
        {"id": "nope"}, "garbage", {"id": True}])
    assert count == "1" and attrs["ids"] == [7]
    upload = attrs["uploads"][0]
    assert set(upload) == {"id", "device", "host", "remote", "category", "expires"}
    assert "\x1b" not in upload["host"] and len(upload["host"]) <= 120
    assert pending_state(None) == ("0", {"uploads": [], "ids": []})


@pytest.mark.parametrize(("payload", "expected"), [
    (b'{"id": 12, "verb": "allow"}', (12, "allow")),
    (b'{"id": "12", "verb": "deny"}', (12, "deny")),
    (b"12 allow", (12, "allow")),
    (b" deny 3 ", (3, "deny")),
])
def test_decide_command_payloads(payload: bytes, expected: tuple[int, str]) -> None:
    assert parse_decide(payload) == expected


@pytest.mark.parametrize("payload", [
    b"", b"allow", b"12", b"12 maybe", b'{"id": -1, "verb": "allow"}', b'{"id": true, '
    b'"verb": "allow"}', b'{"id": 1.5, "verb": "allow"}', b"\xff\xfe", b"[1, 2]", b"{" * 5000,
    b'{"id": 1, "verb": "allow", "scope": "always"} trailing', b"1 2 allow"])
def test_bad_decide_payloads_are_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_decide(payload)


def test_mqtt_config_is_parsed_with_defaults() -> None:
    config = parse_config({"mqtt": {"host": "192.168.1.2"}}).mqtt
    assert config == MqttConfig(host="192.168.1.2")
    config = parse_config({"mqtt": {"host": "broker.lan", "username": "u", "password": "secret",
                                    "ca_file": "/etc/ssl/ca.pem", "base_topic": "home/hushgate",
                                    "mute_for_s": 600}}).mqtt
    assert config is not None and config.tls and config.port == 8883
    assert config.base_topic == "home/hushgate" and config.mute_for_s == 600.0
    assert "secret" not in repr(config)
    assert parse_config({}).mqtt is None


@pytest.mark.parametrize(("table", "message"), [
    ({}, "mqtt.host"),
    ({"host": "a b"}, "mqtt.host"),
    ({"host": "h", "port": 70000}, "mqtt.port"),
    ({"host": "h", "port": "1883"}, "mqtt.port"),
    ({"host": "h", "tls": "yes"}, "mqtt.tls"),
    ({"host": "h", "tls": False, "ca_file": "/x"}, "mqtt.ca_file"),
    ({"host": "h", "password": "p"}, "mqtt.password"),
    ({"host": "h", "base_topic": "a/+/b"}, "mqtt.base_topic"),
    ({"host": "h", "discovery_prefix": "/ha"}, "mqtt.discovery_prefix"),
    ({"host": "h", "client_id": "x" * 24}, "mqtt.client_id"),
    ({"host": "h", "keepalive_s": 1}, "mqtt.keepalive_s"),
    ({"host": "h", "mute_for_s": 0}, "mqtt.mute_for_s"),
    ({"host": "h", "mute_for_s": 40 * 86400}, "mqtt.mute_for_s"),
    ({"host": "h", "retain": True}, "unknown key"),
])
def test_bad_mqtt_config_is_an_error_naming_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"mqtt": table})
    assert message in str(error.value)


def test_missing_paho_is_one_line_and_the_guard_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "paho" or n.startswith("paho.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "paho", None)
    said: list[str] = []
    config = parse_config({"mqtt": {"host": "127.0.0.1"}})
    assert mqttmod.start_bridge(config, FakeGuard(), None, None, said.append) is None
    assert len(said) == 1 and "paho-mqtt is not installed" in said[0] and "\n" not in said[0]
    assert mqttmod.paho_missing() is not None


# -- a real broker -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_ca(directory: Path, address: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for `address` (IP SAN): (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hushgate test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return paths


class Broker:
    """Mosquitto on 127.0.0.1 with a password file (user "hass" / "ha-pass", user "hushgate" /
    "hg-pass") and, with `tls`, only a TLS listener signed by a CA made here."""

    def __init__(self, directory: Path, *, tls: bool = False, port: int | None = None) -> None:
        self.dir = directory
        self.port = port or _free_port()
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        passwd = directory / "passwd"
        passwd.write_text("")
        for user, password in (("hass", "ha-pass"), ("hushgate", "hg-pass")):
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password],
                           check=True, capture_output=True, timeout=10)
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous false",
                 f"password_file {passwd}", "persistence false", "user root",
                 f"log_dest file {directory / 'mosquitto.log'}"]
        if tls:
            self.ca, cert, key = make_ca(directory, "127.0.0.1")
            lines += [f"cafile {self.ca}", f"certfile {cert}", f"keyfile {key}"]
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            with socket.socket() as s:
                s.settimeout(0.2)
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(up, 5.0, "mosquitto listening")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


@pytest.fixture
def broker_dir(tmp_path: Path) -> Path:
    _need_mosquitto()
    return tmp_path


class HomeAssistant:
    """A paho client as Home Assistant would be: every message kept, commands published."""

    def __init__(self, broker: Broker) -> None:
        import paho.mqtt.client as paho

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="fake-ha")
        self.client.username_pw_set("hass", "ha-pass")
        if broker.tls:
            self.client.tls_set(ca_certs=str(broker.ca))
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("#", qos=1)
        self.client.connect("127.0.0.1", broker.port, 30)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def last(self, topic: str) -> bytes | None:
        with self.lock:
            hits = [m[1] for m in self.messages if m[0] == topic]
        return hits[-1] if hits else None

    def wait(self, topic: str, predicate: Callable[[bytes], bool] = lambda b: True) -> bytes:
        def hit() -> bytes | None:
            with self.lock:
                for t, payload, _ in reversed(self.messages):
                    if t == topic and predicate(payload):
                        return payload
            return None

        return wait_for(hit, WAIT_S, f"a message on {topic}")

    def publish(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5.0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class FakeGuard:
    """The control protocol as the daemon answers it, recording what the bridge asked."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], Any]] = []
        self.pending = [{"id": 5, "device": "echo", "host": BOB, "remote": "1.2.3.4:443",
                         "category": "voice", "expires": time.time() + 20}]
        self.mode = "strict"
        self.mute_until: float | None = None
        self.lock = threading.Lock()

    def __call__(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        with self.lock:
            self.requests.append((request, peer))
            cmd = request["cmd"]
            if cmd == "pending":
                return {"ok": True, "result": list(self.pending)}
            if cmd == "devices":
                return {"ok": True, "result": [{"name": "echo", "mode": self.mode,
                                                "mute_until": self.mute_until}]}
            if cmd == "decide":
                if not any(p["id"] == request["id"] for p in self.pending):
                    return {"ok": False, "error": f"no pending upload {request['id']}"}
                self.pending = [p for p in self.pending if p["id"] != request["id"]]
                return {"ok": True, "result": {"id": request["id"]}}
            if cmd == "mode":
                self.mode = request["mode"]
                return {"ok": True, "result": {"device": "echo", "mode": self.mode}}
            if cmd == "window":
                self.mute_until = time.time() + request["duration_s"]
                return {"ok": True, "result": {"id": "w1"}}
            if cmd == "unmute":
                self.mute_until = None
                return {"ok": True, "result": {"device": "echo", "revoked": ["w1"]}}
            return {"ok": False, "error": f"unknown command {cmd!r}"}

    def asked(self, cmd: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r, _ in self.requests if r["cmd"] == cmd]


def _bridge(broker: Broker, guard: FakeGuard, said: list[str], **kw: Any) -> MqttBridge:
    config = MqttConfig(host="127.0.0.1", port=broker.port, username="hushgate",
                        password="hg-pass", tls=broker.tls,
                        ca_file=str(broker.ca) if broker.tls else None, mute_for_s=600.0, **kw)
    return MqttBridge(config, guard, ["echo"], say=said.append)


@pytest.mark.parametrize("tls", [False, True], ids=["password", "tls+password"])
def test_home_assistant_sees_the_entities_and_its_commands_reach_the_guard(
        broker_dir: Path, tls: bool) -> None:
    broker = Broker(broker_dir, tls=tls).start()
    guard = FakeGuard()
    said: list[str] = []
    bridge = _bridge(broker, guard, said)
    ha = None
    try:
        bridge.start()
        ha = HomeAssistant(broker)
        assert ha.wait("hushgate/status") == b"online"
        config = json.loads(ha.wait("homeassistant/select/hushgate/echo_mode/config"))
        assert config["command_topic"] == "hushgate/device/echo/mode/set"
        assert ha.wait("hushgate/pending") == b"1"
        attrs = json.loads(ha.wait("hushgate/pending/attributes"))
        assert attrs["ids"] == [5] and attrs["uploads"][0]["host"] == BOB
        assert ha.wait("hushgate/device/echo/mode") == b"strict"
        assert ha.wait("hushgate/device/echo/mute") == b"OFF"

        ha.publish("hushgate/decide/set", json.dumps({"id": 5, "verb": "allow"}))
        wait_for(lambda: guard.asked("decide"), what="decide")
        request, peer = next((r, p) for r, p in guard.requests if r["cmd"] == "decide")
        assert request == {"cmd": "decide", "id": 5, "verb": "allow", "scope": "once",
                           "by": "mqtt"}
        assert peer.broker == f"127.0.0.1:{broker.port}"
        assert ha.wait("hushgate/pending", lambda b: b == b"0") == b"0"

        ha.publish("hushgate/device/echo/mute/set", "ON")
        assert ha.wait("hushgate/device/echo/mute", lambda b: b == b"ON") == b"ON"
        assert guard.asked("window")[0] == {"cmd": "window", "device": "echo", "kind": "quiet",
                                            "duration_s": 600.0, "by": "mqtt"}
        ha.publish("hushgate/device/echo/mute/set", "OFF")
        # the state topic said OFF before the mute too: wait for the command itself
        wait_for(lambda: guard.asked("unmute"), what="unmute")
        ha.wait("hushgate/device/echo/mute", lambda b: b == b"OFF")
        assert guard.asked("unmute") == [{"cmd": "unmute", "device": "echo", "by": "mqtt"}]
        ha.publish("hushgate/device/echo/mode/set", "monitor")
        ha.wait("hushgate/device/echo/mode", lambda b: b == b"monitor")

        guard.pending.append({"id": 6, "device": "echo", "host": BOB, "expires": 0})
        ha.publish("hushgate/device/echo/deny/set", "PRESS")
        wait_for(lambda: any(r["id"] == 6 and r["verb"] == "deny"
                             for r in guard.asked("decide")), what="the deny button")

        for topic, payload in (("hushgate/decide/set", "delete everything"),
                               ("hushgate/device/echo/mode/set", "<script>"),
                               ("hushgate/device/ghost/mode/set", "monitor"),
                               ("hushgate/decide/set", '{"id": 999, "verb": "deny"}')):
            ha.publish(topic, payload)
            result = json.loads(ha.wait("hushgate/result", lambda b, t=topic: json.loads(b)[
                "topic"] == t and not json.loads(b)["ok"]))
            assert result["error"], result
        assert not any(r.get("mode") == "<script>" for r in guard.asked("mode"))
        wait_for(lambda: bridge.stats()["command_errors"] >= 4, what="4 refusals counted")
        assert bridge.stats()["connected"]

        bridge.on_event("upload-held", {"id": 8, "device": "echo", "host": BOB,
                                        "expires": 1.0})
        event = json.loads(ha.wait("hushgate/event"))
        assert event["event"] == "upload-held" and event["id"] == 8
    finally:
        bridge.stop()
        if ha is not None:
            assert ha.wait("hushgate/status", lambda b: b == b"offline") == b"offline"
            ha.close()
        broker.kill()
    assert not bridge._worker.is_alive()
    assert said == [], said  # connected at once: nothing to say


def test_a_retained_command_is_never_replayed(broker_dir: Path) -> None:
    broker = Broker(broker_dir).start()
    guard = FakeGuard()
    ha = HomeAssistant(broker)
    ha.client.publish("hushgate/decide/set", "5 allow", qos=1, retain=True).wait_for_publish(5)
    bridge = _bridge(broker, guard, [])
    try:
        bridge.start()
        ha.wait("hushgate/pending")
        time.sleep(0.5)
        assert guard.asked("decide") == []
    finally:
        bridge.stop()
        ha.close()
        broker.kill()


def test_broker_down_never_blocks_and_the_outage_is_said_once_then_it_reconnects(
        broker_dir: Path) -> None:
    broker = Broker(broker_dir)  # not started: nothing listens on its port
    guard = FakeGuard()
    said: list[str] = []
    bridge = _bridge(broker, guard, said)
    try:
        t0 = time.monotonic()
        bridge.start()
        for i in range(2000):  # far more than the queue holds: dropped and counted
            bridge.on_event("upload-held", {"id": i, "device": "echo", "expires": 1.0})
        assert time.monotonic() - t0 < 1.0
        wait_for(lambda: said, what="the outage said")
        time.sleep(2.5)  # a few reconnect attempts
        stats = bridge.stats()
        assert not stats["connected"] and stats["down_s"] > 0 and stats["connect_failures"] >= 1
        assert len(said) == 1 and "uploads are still held" in said[0], said
        broker.start()
        wait_for(lambda: bridge.stats()["connected"], 15.0, "reconnected")
        ha = HomeAssistant(broker)
        assert ha.wait("hushgate/status") == b"online"
        ha.close()
        broker.kill()
        wait_for(lambda: not bridge.stats()["connected"], what="the broker gone")
        assert bridge.stats()["disconnects"] == 1
    finally:
        t0 = time.monotonic()
        bridge.stop()
        assert time.monotonic() - t0 < 6.0
        broker.kill()
    assert any("again after" in line for line in said), said


def test_doctor_says_in_one_line_that_paho_is_missing_and_when_the_broker_is_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from guard.tools.doctor import _check_mqtt

    config = parse_config({"mqtt": {"host": "192.168.1.2"}})
    assert _check_mqtt(config, None).severity == "ok"
    assert _check_mqtt(config, {"mqtt": {"connected": True}}).severity == "ok"
    down = _check_mqtt(config, {"mqtt": {"connected": False, "down_s": 75.2}})
    assert down.severity == "warn" and "unreachable for 75 s" in down.message
    for name in [n for n in sys.modules if n == "paho" or n.startswith("paho.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "paho", None)
    missing = _check_mqtt(config, None)
    assert missing.severity == "warn" and "paho-mqtt is not installed" in missing.message
    assert "\n" not in missing.message and "hushgate[mqtt]" in missing.fix


def test_the_home_assistant_blueprint_is_valid_yaml_wired_to_the_bridge_topics() -> None:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!input", lambda loader, node: {"!input": loader.construct_scalar(
        node)})
    path = Path(__file__).resolve().parents[1] / "packaging/homeassistant/hushgate_held_upload.yaml"
    doc = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - SafeLoader plus !input
    meta = doc["blueprint"]
    assert meta["domain"] == "automation" and set(meta["input"]) == {"notify_service",
                                                                       "base_topic"}
    assert meta["input"]["base_topic"]["default"] == MqttConfig(host="x").base_topic
    assert doc["trigger_variables"]["base"] == {"!input": "base_topic"}
    assert doc["trigger"] == [{"platform": "mqtt", "topic": "{{ base }}/event"}]
    held = doc["action"][0]["default"]
    notify = held[1]["data"]["data"]
    assert [a["title"] for a in notify["actions"]] == ["Allow", "Deny"]
    publish = held[3]["then"][0]
    assert publish["service"] == "mqtt.publish"
    assert publish["data"]["topic"] == "{{ base }}/decide/set"
    # what the template renders to ("12 allow") is what the bridge takes
    rendered = publish["data"]["payload"].replace("{{ upload.id }}", "12")
    rendered = re.sub(r"\{\{ 'allow' if .* else 'deny' \}\}", "allow", rendered)
    assert parse_decide(rendered.encode()) == (12, "allow")
    # the topics the blueprint uses are the bridge's
    t = mqttmod.topics(MqttConfig(host="x"))
    assert (t["event"], t["decide"]) == ("hushgate/event", "hushgate/decide/set")


def test_the_outage_is_in_the_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    bridge = MqttBridge(MqttConfig(host="127.0.0.1", port=9), FakeGuard(), ["echo"],
                        say=lambda text: None)
    registry = CollectorRegistry()
    registry.register(mqttmod.MqttCollector(bridge))
    text = generate_latest(registry).decode()
    assert "hushgate_mqtt_connected 0.0" in text
    assert 'hushgate_mqtt_events_total{event="disconnects"} 0.0' in text
    assert "hushgate_mqtt_down_seconds" in text
