"""Home Assistant over MQTT (issue 15 point 3): held uploads, per-device mode and mute as entities
(MQTT discovery), and allow/deny/mute/mode as commands.

Rules of this module: the broker never holds up the guard. paho-mqtt (the `mqtt` extra) is
imported only when `[mqtt]` is configured; its network loop runs in its own thread
(`loop_start`), connects in the background and reconnects with a growing delay (1 s to 60 s);
the daemon only ever queues events here (`on_event`, a bounded queue that drops and counts when
full). Commands from the broker are answered in this module's worker thread through the same
`handler(request, peer)` the web page uses (the control protocol of guard/shell/control.py), with
`by = "mqtt"` for the audit log. What is published is rebuilt from an allowlist of fields, host
names (attacker-controlled) cleaned and capped. The availability topic is the will: Home
Assistant greys the entities out when the guard goes away.

Topics (BASE = `[mqtt] base_topic`, "hushgate" unless set):
    BASE/status                          online | offline (retained; the last will)
    BASE/pending, BASE/pending/attributes  count of held uploads; {"uploads": [...], "ids": [...]}
    BASE/event                           each upload-held / upload-decided, as JSON (not retained)
    BASE/decide/set                      command: {"id": 12, "verb": "allow"} (or "12 allow")
    BASE/device/NAME/mode[/set]          strict | followups | monitor | off
    BASE/device/NAME/mute[/set]          ON | OFF (ON mutes for `[mqtt] mute_for_s`)
    BASE/device/NAME/allow/set, .../deny/set  buttons: answer NAME's held uploads (once)
    BASE/result                          what each command got: {"ok", "command", "error"}
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from guard import __version__
from guard.core.config import GuardConfig, MqttConfig

__all__ = ["MqttBridge", "MqttPeer", "MqttUnavailable", "discovery_messages", "paho_missing",
           "parse_decide"]

log = logging.getLogger("guard.shell.mqtt")

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]

MODES = ("strict", "followups", "monitor", "off")
MAX_QUEUE = 256  # events and commands waiting for the worker; beyond that: dropped, counted
MAX_LISTED = 20  # uploads listed in the pending sensor's attributes
REFRESH_S = 15.0  # states are re-read this often anyway (a mute that ran out, a CLI change)
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 60
STOP_WAIT_S = 2.0
TEXT_MAX_CHARS = 120
_STOP = object()


class MqttUnavailable(Exception):
    """paho-mqtt is not installed (the message says how to get it)."""


@dataclass(frozen=True, slots=True)
class MqttPeer:
    """The `peer` of a request that came from the broker (the audit log records by="mqtt")."""

    broker: str


def paho_missing() -> str | None:
    """One line saying paho-mqtt is missing, or None when it can be imported."""
    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        return ("[mqtt] is configured but paho-mqtt is not installed: pip install "
                "'hushgate[mqtt]' (or apt install python3-paho-mqtt); Home Assistant stays off")
    return None


def slug(name: str) -> str:
    """A device name as Home Assistant's object ids take it ([a-z0-9_])."""
    return re.sub(r"[^a-z0-9_]", "_", name.lower())


def _clean(value: Any, limit: int = TEXT_MAX_CHARS) -> str | None:
    if not isinstance(value, str):
        return None
    from guard.shell.web import display_text

    return display_text(value, limit)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# -- what Home Assistant is told (pure) ------------------------------------------------------


def topics(config: MqttConfig) -> dict[str, str]:
    base = config.base_topic
    return {"status": f"{base}/status", "pending": f"{base}/pending",
            "pending_attrs": f"{base}/pending/attributes", "event": f"{base}/event",
            "decide": f"{base}/decide/set", "result": f"{base}/result",
            "device": f"{base}/device"}


def discovery_messages(config: MqttConfig, devices: list[str],
                       version: str = __version__) -> list[tuple[str, dict[str, Any]]]:
    """(topic, config) for every entity: Home Assistant's MQTT discovery, retained."""
    t = topics(config)
    node = slug(config.client_id)
    device = {"identifiers": [node], "name": "hushgate", "manufacturer": "hushgate",
              "model": "smart speaker guard", "sw_version": version}
    common = {"availability_topic": t["status"], "payload_available": "online",
              "payload_not_available": "offline", "device": device}
    prefix = config.discovery_prefix
    out: list[tuple[str, dict[str, Any]]] = [(
        f"{prefix}/sensor/{node}/pending/config",
        {**common, "name": "Held uploads", "unique_id": f"{node}_pending",
         "state_topic": t["pending"], "json_attributes_topic": t["pending_attrs"],
         "icon": "mdi:microphone-message", "state_class": "measurement"},
    )]
    for name in devices:
        s = slug(name)
        d = f"{t['device']}/{name}"
        out += [
            (f"{prefix}/select/{node}/{s}_mode/config",
             {**common, "name": f"{name} mode", "unique_id": f"{node}_{s}_mode",
              "state_topic": f"{d}/mode", "command_topic": f"{d}/mode/set",
              "options": list(MODES), "icon": "mdi:shield-lock"}),
            (f"{prefix}/switch/{node}/{s}_mute/config",
             {**common, "name": f"{name} mute", "unique_id": f"{node}_{s}_mute",
              "state_topic": f"{d}/mute", "command_topic": f"{d}/mute/set",
              "json_attributes_topic": f"{d}/mute/attributes",
              "payload_on": "ON", "payload_off": "OFF", "icon": "mdi:microphone-off"}),
            (f"{prefix}/button/{node}/{s}_allow/config",
             {**common, "name": f"{name} allow held upload", "unique_id": f"{node}_{s}_allow",
              "command_topic": f"{d}/allow/set", "payload_press": "PRESS",
              "icon": "mdi:check-circle"}),
            (f"{prefix}/button/{node}/{s}_deny/config",
             {**common, "name": f"{name} deny held upload", "unique_id": f"{node}_{s}_deny",
              "command_topic": f"{d}/deny/set", "payload_press": "PRESS",
              "icon": "mdi:close-circle"}),
        ]
    return out


def pending_state(items: Any) -> tuple[str, dict[str, Any]]:
    """The pending sensor's state (the count) and attributes, from a `pending` reply."""
    uploads = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or _num(item.get("id")) is None:
            continue
        uploads.append({"id": int(item["id"]), "device": _clean(item.get("device")),
                        "host": _clean(item.get("host")), "remote": _clean(item.get("remote")),
                        "category": _clean(item.get("category"), 40),
                        "expires": _num(item.get("expires"))})
    return str(len(uploads)), {"uploads": uploads[:MAX_LISTED],
                               "ids": [u["id"] for u in uploads]}


def event_payload(event: str, upload: Mapping[str, Any]) -> dict[str, Any]:
    """An upload event as published on BASE/event (what the blueprint's trigger reads)."""
    return {"event": event, "id": int(upload["id"]), "device": _clean(upload.get("device")),
            "host": _clean(upload.get("host")), "remote": _clean(upload.get("remote")),
            "category": _clean(upload.get("category"), 40),
            "expires": _num(upload.get("expires")), "outcome": _clean(upload.get("outcome"), 40),
            "decided_by": _clean(upload.get("decided_by"), 60)}


def parse_decide(payload: bytes) -> tuple[int, str]:
    """BASE/decide/set's payload: {"id": 12, "verb": "allow"} or "12 allow" / "allow 12".
    ValueError (with what is expected) for anything else."""
    text = payload.decode("utf-8", "replace").strip()[:200]
    upload_id: Any = None
    verb: Any = None
    if text.startswith("{"):
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict):
            upload_id, verb = body.get("id"), body.get("verb")
    else:
        words = text.split()
        if len(words) == 2:
            first, second = words
            upload_id, verb = (first, second) if first.isdigit() else (second, first)
            upload_id = int(upload_id) if str(upload_id).isdigit() else None
    if isinstance(upload_id, str) and upload_id.isdigit():
        upload_id = int(upload_id)
    if isinstance(upload_id, bool) or not isinstance(upload_id, int) or upload_id < 0 \
            or verb not in ("allow", "deny"):
        raise ValueError('expected {"id": N, "verb": "allow"|"deny"} or "N allow"')
    return upload_id, verb


# -- the bridge ------------------------------------------------------------------------------


class MqttBridge:
    """The guard's side of Home Assistant. `start()` returns at once; `on_event` only queues;
    `stop()` says offline and returns within a few seconds whatever the broker does."""

    def __init__(self, config: MqttConfig, handler: Handler, devices: list[str], *,
                 client_factory: Callable[[], Any] | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.handler = handler
        self.devices = list(devices)
        self.topics = topics(config)
        self.peer = MqttPeer(f"{config.host}:{config.port}")
        self.say = say or (lambda text: log.warning("%s", text))
        self._client_factory = client_factory
        self.client: Any = None
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=MAX_QUEUE)
        self._lock = threading.Lock()
        self._stats = {"connects": 0, "disconnects": 0, "connect_failures": 0, "published": 0,
                       "dropped": 0, "commands": 0, "command_errors": 0}
        self.connected = False
        self._down_since: float | None = time.time()  # until the first connection
        self._said_down = False
        self._last: dict[str, str] = {}  # topic -> payload last published (retained states)
        self._worker = threading.Thread(target=self._run, name="hushgate-mqtt", daemon=True)
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.client = (self._client_factory or self._make_client)()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        with contextlib.suppress(AttributeError):
            self.client.on_connect_fail = self._on_connect_fail
        self._worker.start()
        self.client.connect_async(self.config.host, self.config.port, self.config.keepalive_s)
        self.client.loop_start()  # paho's own thread: connects, reconnects with backoff

    def _make_client(self) -> Any:
        try:
            import paho.mqtt.client as paho
        except ImportError:
            raise MqttUnavailable(paho_missing() or "paho-mqtt is missing") from None
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.config.client_id,
                             protocol=paho.MQTTv311)
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        if self.config.tls:
            client.tls_set(ca_certs=self.config.ca_file)  # checks the name; None: system CAs
        client.will_set(self.topics["status"], "offline", qos=1, retain=True)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.max_queued_messages_set(MAX_QUEUE)
        return client

    def stop(self) -> None:
        """Offline (retained), disconnect, stop both threads; bounded by STOP_WAIT_S each."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(_STOP)
        self._worker.join(STOP_WAIT_S)
        client = self.client
        if client is None:
            return

        def close() -> None:
            with contextlib.suppress(Exception):
                if self.connected:
                    info = client.publish(self.topics["status"], "offline", qos=1, retain=True)
                    info.wait_for_publish(1.0)
            with contextlib.suppress(Exception):
                client.disconnect()
            with contextlib.suppress(Exception):
                client.loop_stop()

        closer = threading.Thread(target=close, name="hushgate-mqtt-stop", daemon=True)
        closer.start()
        closer.join(STOP_WAIT_S + 1.0)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            down = self._down_since
            return {**self._stats, "connected": self.connected,
                    "down_s": round(time.time() - down, 1) if down is not None else 0.0,
                    "broker": self.peer.broker}

    # -- from the daemon (any thread; never blocks) ------------------------------------------

    def on_event(self, event: str, payload: Mapping[str, Any]) -> None:
        if event in ("upload-held", "upload-decided"):
            try:
                item: Any = ("event", event_payload(event, payload))
            except (KeyError, TypeError, ValueError):
                return
        elif event in ("mode-changed", "window-opened", "window-revoked", "rule-added",
                       "rule-revoked"):
            item = ("refresh",)
        else:
            return
        self._put(item)

    def _put(self, item: Any) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self._count("dropped")

    # -- paho's thread -------------------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            self._count("connect_failures")
            self._down(f"refused by the broker: {reason}")
            return
        with self._lock:
            self.connected = True
            self._stats["connects"] += 1
            down = self._down_since
            self._down_since = None
            said = self._said_down
            self._said_down = False
        if said and down is not None:
            self.say(f"mqtt: connected to {self.peer.broker} again after "
                     f"{time.time() - down:.0f} s")
        else:
            log.info("mqtt: connected to %s", self.peer.broker)
        base = self.topics
        client.subscribe([(base["decide"], 1), (f"{base['device']}/+/+/set", 1),
                          (f"{self.config.discovery_prefix}/status", 1)])
        self._put(("connected",))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any = None,
                       properties: Any = None) -> None:
        was = self.connected
        with self._lock:
            self.connected = False
            if was:
                self._stats["disconnects"] += 1
        if not self._stopping.is_set():
            self._down(f"connection lost ({reason})" if was else f"cannot connect ({reason})")

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._count("connect_failures")
        self._down("cannot connect")

    def _down(self, why: str) -> None:
        """Log an outage once (and when it has lasted a minute, once more), never per retry."""
        with self._lock:
            if self._down_since is None:
                self._down_since = time.time()
            said = self._said_down
            self._said_down = True
        if not said:
            self.say(f"mqtt: broker {self.peer.broker} {why}; uploads are still held and can "
                     f"be answered on the web page or the CLI; retrying every "
                     f"{RECONNECT_MIN_S}-{RECONNECT_MAX_S} s")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == f"{self.config.discovery_prefix}/status":
            if bytes(msg.payload).strip() == b"online":  # Home Assistant restarted
                self._put(("connected",))
            return
        if getattr(msg, "retain", False):
            return  # a retained command is an old one: never replayed at (re)connection
        self._put(("command", str(msg.topic), bytes(msg.payload[:1024])))

    # -- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        next_refresh = time.monotonic() + REFRESH_S
        while True:
            try:
                item = self.queue.get(timeout=max(0.1, next_refresh - time.monotonic()))
            except queue.Empty:
                item = ("refresh",)
            if item is _STOP:
                return
            try:
                kind = item[0]
                if kind == "connected":
                    self._last.clear()
                    self._publish_discovery()
                    self._publish(self.topics["status"], "online", retain=True, qos=1)
                    self._refresh()
                elif kind == "event":
                    self._publish(self.topics["event"], json.dumps(item[1]), retain=False)
                    self._refresh()
                elif kind == "command":
                    self._command(item[1], item[2])
                    self._refresh()
                else:
                    self._refresh()
            except Exception:  # noqa: BLE001 - the worker outlives any one bad message
                log.exception("mqtt: worker failed on %s", item[0])
            if item[0] == "refresh" or time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + REFRESH_S

    def _publish(self, topic: str, payload: str, *, retain: bool, qos: int = 0) -> None:
        if not self.connected:
            return
        if retain and self._last.get(topic) == payload:
            return
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if getattr(info, "rc", 0) == 0:
            self._count("published")
            if retain:
                self._last[topic] = payload

    def _publish_discovery(self) -> None:
        for topic, body in discovery_messages(self.config, self.devices):
            self._publish(topic, json.dumps(body, sort_keys=True), retain=True, qos=1)

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = self.handler(request, self.peer)
        except Exception as exc:  # noqa: BLE001 - the daemon's bug is a failed command here
            log.exception("mqtt: handler failed on %s", request.get("cmd"))
            return {"ok": False, "error": f"internal error: {type(exc).__name__}"}
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            return {"ok": False, "error": "malformed reply"}
        return reply

    def _refresh(self) -> None:
        if not self.connected:
            return
        reply = self._ask({"cmd": "pending"})
        if reply["ok"]:
            count, attrs = pending_state(reply.get("result"))
            self._publish(self.topics["pending"], count, retain=True)
            self._publish(self.topics["pending_attrs"], json.dumps(attrs, sort_keys=True),
                          retain=True)
        reply = self._ask({"cmd": "devices"})
        if not reply["ok"] or not isinstance(reply.get("result"), list):
            return
        now = time.time()
        for item in reply["result"]:
            if not isinstance(item, dict) or item.get("name") not in self.devices:
                continue
            d = f"{self.topics['device']}/{item['name']}"
            if item.get("mode") in MODES:
                self._publish(f"{d}/mode", str(item["mode"]), retain=True)
            until = _num(item.get("mute_until"))
            muted = until is not None and until > now
            self._publish(f"{d}/mute", "ON" if muted else "OFF", retain=True)
            self._publish(f"{d}/mute/attributes",
                          json.dumps({"until": until if muted else None}), retain=True)

    def _command(self, topic: str, payload: bytes) -> None:
        self._count("commands")
        base = self.topics
        request: dict[str, Any] | None = None
        results: list[dict[str, Any]] = []
        try:
            if topic == base["decide"]:
                upload_id, verb = parse_decide(payload)
                request = {"cmd": "decide", "id": upload_id, "verb": verb, "scope": "once"}
            else:
                rest = topic[len(base["device"]) + 1:] if topic.startswith(
                    base["device"] + "/") else ""
                name, _, what = rest.rpartition("/set")[0].rpartition("/")
                if name not in self.devices:
                    raise ValueError(f"no device named {name!r} here")
                text = payload.decode("utf-8", "replace").strip()
                if what == "mode":
                    if text not in MODES:
                        raise ValueError(f"mode: expected one of {', '.join(MODES)}")
                    request = {"cmd": "mode", "device": name, "mode": text}
                elif what == "mute":
                    if text.upper() == "ON":
                        request = {"cmd": "window", "device": name, "kind": "quiet",
                                   "duration_s": self.config.mute_for_s}
                    elif text.upper() == "OFF":
                        request = {"cmd": "unmute", "device": name}
                    else:
                        raise ValueError("mute: expected ON or OFF")
                elif what in ("allow", "deny"):
                    results = self._answer_device(name, what)
                else:
                    raise ValueError(f"unknown command topic {topic!r}")
        except ValueError as exc:
            self._count("command_errors")
            self._publish(base["result"], json.dumps({"ok": False, "topic": topic,
                                                      "error": str(exc)}), retain=False)
            return
        if request is not None:
            request["by"] = "mqtt"
            reply = self._ask(request)
            results = [{"ok": reply["ok"], "command": request["cmd"],
                        "error": None if reply["ok"] else _clean(str(reply.get("error")), 200),
                        "id": request.get("id"), "device": request.get("device")}]
        for result in results:
            if not result["ok"]:
                self._count("command_errors")
                log.warning("mqtt: %s refused: %s", result["command"], result["error"])
            self._publish(base["result"], json.dumps({**result, "topic": topic}),
                          retain=False)

    def _answer_device(self, name: str, verb: str) -> list[dict[str, Any]]:
        """A device's Allow/Deny button: every upload of it that is held now, once."""
        reply = self._ask({"cmd": "pending"})
        items = reply.get("result") if reply["ok"] else None
        ids = [int(i["id"]) for i in (items if isinstance(items, list) else [])
               if isinstance(i, dict) and i.get("device") == name and _num(i.get("id")) is not None]
        if not ids:
            return [{"ok": False, "command": "decide", "device": name, "id": None,
                     "error": f"nothing of {name} is held"}]
        out = []
        for upload_id in ids:
            r = self._ask({"cmd": "decide", "id": upload_id, "verb": verb, "scope": "once",
                           "by": "mqtt"})
            out.append({"ok": r["ok"], "command": "decide", "device": name, "id": upload_id,
                        "error": None if r["ok"] else _clean(str(r.get("error")), 200)})
        return out

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1


# -- the daemon's side -----------------------------------------------------------------------


def start_bridge(config: GuardConfig, handler: Handler, hooks: Any, registry: Any = None,
                 say: Callable[[str], None] | None = None) -> MqttBridge | None:
    """Start the bridge for `config.mqtt` (None when not configured, or when paho-mqtt is
    missing: then one line says so and the guard runs on without Home Assistant)."""
    if config.mqtt is None:
        return None
    say = say or (lambda text: log.warning("%s", text))
    missing = paho_missing()
    if missing is not None:
        say(missing)
        return None
    bridge = MqttBridge(config.mqtt, handler, [d.name for d in config.devices], say=say)
    bridge.start()
    hooks.add_listener(bridge.on_event)
    if registry is not None:
        with contextlib.suppress(ValueError):  # registered twice: a test's second daemon
            registry.register(MqttCollector(bridge))
    say(f"mqtt: Home Assistant via {bridge.peer.broker} (connecting in the background)")
    return bridge


class MqttCollector:
    """Prometheus: hushgate_mqtt_connected, hushgate_mqtt_down_seconds and the bridge's
    counters (hushgate_mqtt_events_total{event})."""

    def __init__(self, bridge: MqttBridge) -> None:
        self.bridge = bridge

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.bridge.stats()
        yield GaugeMetricFamily("hushgate_mqtt_connected",
                                "1 while the MQTT broker (Home Assistant) is connected.",
                                value=1.0 if stats["connected"] else 0.0)
        yield GaugeMetricFamily("hushgate_mqtt_down_seconds",
                                "Seconds the MQTT broker has been unreachable (0 when connected).",
                                value=float(stats["down_s"]))
        events = CounterMetricFamily("hushgate_mqtt_events",
                                     "MQTT bridge events: connects, disconnects, connect_failures, "
                                     "published, dropped, commands, command_errors.",
                                     labels=("event",))
        for key in ("connects", "disconnects", "connect_failures", "published", "dropped",
                    "commands", "command_errors"):
            events.add_metric([key], float(stats[key]))
        yield events

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only (not checked at registration)
