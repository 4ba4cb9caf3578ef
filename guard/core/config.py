"""The configuration file (TOML, design.md section 8) as frozen values.

Rules of this module: parsing is strict (unknown keys and bad values are errors that name the key),
defaults are the safe ones (fail closed, strict mode, loopback metrics), and nothing here touches
the network or the clock. `load_config(path)` is the only function that reads a file.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from guard.core import schema
from guard.core.policy import CategoryAction, Mode

CATEGORIES = (
    "voice",
    "messaging",
    "smart-home",
    "media",
    "update",
    "telemetry",
    "connectivity",
    "unknown",
)

# Per category defaults (design.md section 6): messaging is blocked; telemetry and connectivity
# must stay allowed because blocking them makes Echos fall offline (StevenBlack/hosts#596).
DEFAULT_CATEGORY_ACTIONS: dict[str, CategoryAction] = {
    "voice": CategoryAction.INSPECT,
    "unknown": CategoryAction.INSPECT,
    "messaging": CategoryAction.BLOCK,
    "smart-home": CategoryAction.ALLOW,
    "media": CategoryAction.ALLOW,
    "update": CategoryAction.ALLOW,
    "telemetry": CategoryAction.ALLOW,
    "connectivity": CategoryAction.ALLOW,
}

AUDIT_MIN_BYTES = 64 << 10  # the smallest guard.audit_max_bytes accepted

_MAC = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConfigError(Exception):
    """A configuration problem, with the key it is about."""


@lru_cache(maxsize=1024)  # on the relay's per-connection path; a LAN has few MACs
def normalize_mac(mac: str) -> str:
    mac = mac.strip().lower().replace("-", ":")
    if not _MAC.match(mac):
        raise ConfigError(f"not a MAC address: {mac!r}")
    return mac


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    name: str
    address: str | None = None  # IPv4 or IPv6 address
    mac: str | None = None  # preferred: survives DHCP changes, resists address spoofing
    address6: tuple[str, ...] = ()  # extra IPv6 addresses when no MAC is given
    mode: Mode = Mode.STRICT
    categories: tuple[tuple[str, CategoryAction], ...] = ()  # per-device overrides
    # hold | block; None: as guard.quic says. Block (the default) refuses QUIC so the speaker
    # falls back to TCP, which the relay holds exactly (design.md 5); hold keeps the packet hold.
    quic: str | None = None
    # The routing mark (SO_MARK) of the relay's upstream leg for this device, for a router that
    # routes it by mark (pbr, mwan3, a VPN kill switch: design.md 5a.2). Through the relay the
    # device's TCP leaves as the router's own traffic and its packets' marks stay behind; this
    # mark goes with it instead (the relay's own bit is added). None: the relay's bit only.
    route_mark: int | None = None

    def category_action(self, category: str) -> CategoryAction:
        for name, action in self.categories:
            if name == category:
                return action
        return DEFAULT_CATEGORY_ACTIONS.get(category, CategoryAction.INSPECT)

    def with_mode(self, mode: Mode) -> DeviceConfig:
        return replace(self, mode=mode)


@dataclass(frozen=True, slots=True)
class Hook:
    events: tuple[str, ...]
    command: tuple[str, ...] = ()
    url: str | None = None  # kind "json": where the event is POSTed; "ntfy": the server's root
    timeout_s: float = 5.0
    kind: str = "json"  # json (the event as JSON) | ntfy (a phone notification with buttons)
    topic: str | None = None  # ntfy: the topic (a password of sorts: pick a long random one)
    token: str | None = field(default=None, repr=False)  # ntfy: an access token (Bearer)
    username: str | None = None  # ntfy: basic auth, with password
    password: str | None = field(default=None, repr=False)
    priority: int = 4  # ntfy: 1 (min) .. 5 (max); 4 is "high", it makes the phone sound
    # ntfy: the web prompt's address as the phone reaches it ("http://192.168.1.1:8787"); the
    # Allow/Deny buttons POST to ACTION_URL/api/act. Default: [web] listen.
    action_url: str | None = None


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """`[mqtt]`: Home Assistant over an MQTT broker (guard/shell/mqtt.py)."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None  # the broker's CA (a self-signed broker); None: the system's CAs
    client_id: str = "hushgate"
    discovery_prefix: str = "homeassistant"
    base_topic: str = "hushgate"
    keepalive_s: int = 60
    mute_for_s: float = 3600.0  # what the mute switch of a device turns on for


@dataclass(frozen=True, slots=True)
class GuardConfig:
    queue: int = 7
    queue_count: int = 1
    fail: str = "closed"  # closed | open
    hold_timeout_s: float = 20.0  # the cloud gives up on an utterance after ~6-8 s anyway
    max_turn_s: float = 8.0  # the longest real command seen was 6.9 s (design.md section 6)
    followup_window_s: float = 10.0
    window_segments: int = 10  # what a held sender can emit before the decision (IW10)
    mark_mask: int = 0x00FF0000
    quic: str = "block"
    socket: str = "/run/hushgate/control.sock"
    socket_group: str | None = None
    state_db: str = "/var/lib/hushgate/state.db"
    rules_dir: str | None = None
    backend: str = "iptables"
    # reset connections that predate the guard (when quiet) so they reconnect with their SNI
    reset_midstream: bool = True
    max_held_packets_per_upload: int = 512
    max_held_bytes_per_upload: int = 1 << 20
    max_held_packets_total: int = 4096
    max_held_bytes_total: int = 8 << 20
    audit_max_age_s: float = 90 * 86400.0
    audit_max_rows: int = 20000
    # Bytes the state database may use (its pages in use; the file shrinks to match when pruning
    # frees space). A realistic audit record takes ~200 bytes with its two index entries, so 4 MiB
    # holds ~21000 records: about the 20000-row bound, which stays the usual limit on a PC. On a
    # router, where the database sits on flash (/etc/hushgate), 4 MiB is a small share of the
    # overlay of any router that can run Python (python3 alone takes over 10 MiB) and leaves room
    # for SQLite's -wal file and the one-time VACUUM copy of a database made before this bound.
    audit_max_bytes: int = 4 << 20
    # TCP of guarded (strict/followups) devices: "relay" terminates it at the router and holds
    # the byte stream (design.md 5); "packet" is the legacy NFQUEUE packet hold.
    tcp_hold: str = "relay"
    relay_port: int = 7411  # the transparent listener (TPROXY --on-port)
    # Marks of the relay (design.md 5a.8): one dedicated bit each, outside mark_mask (pbr's
    # 0x00ff0000), mwan3's 0x3f00, and wg-quick/docker/kube-proxy's low 16 bits. tproxy_mark
    # routes intercepted packets to the local listener (ip rule fwmark -> table relay_table);
    # relay_mark is the bypass bit: connmark of a guarded device's connection that FORWARD may
    # pass (not intercepted: a local destination), and SO_MARK of the relay's upstream leg.
    tproxy_mark: int = 0x20000000
    relay_mark: int = 0x40000000
    relay_table: int = 7411
    # Evaluated before mwan3 (1000-2254) and pbr (30000-ish), after the local table (0).
    relay_priority: int = 900
    max_connections_per_device: int = 512
    max_relay_connections: int = 4096
    metrics_listen: str | None = "127.0.0.1:9877"
    web_listen: str | None = None
    web_password_hash: str | None = None
    web_tls: bool = False
    web_hosts: tuple[str, ...] = ()
    hooks: tuple[Hook, ...] = ()
    mqtt: MqttConfig | None = None
    devices: tuple[DeviceConfig, ...] = field(default_factory=tuple)

    @property
    def fail_open(self) -> bool:
        return self.fail == "open"

    def quic_for(self, device: DeviceConfig) -> str:
        """What a device's QUIC gets: its own setting, else the guard's."""
        return device.quic or self.quic

    def device(self, name: str) -> DeviceConfig | None:
        for device in self.devices:
            if device.name == name:
                return device
        return None


# The keys each section accepts come from the one declaration (guard/core/schema.py).
_GUARD_KEYS = schema.names("guard")
_DEVICE_KEYS = schema.names("device")


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
    return value


def _tables(value: Any, where: str) -> list[dict[str, Any]]:
    """An array of tables (`[[device]]`, `[[hook]]`)."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected [[{where}]] tables, got {type(value).__name__}")
    return [_table(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _check_keys(table: dict[str, Any], allowed: set[str] | frozenset[str], where: str,
                section: str | None = None) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        hints = [f"{u} (did you mean {hint}?)" if (hint := _hint(u, section)) else u
                 for u in unknown]
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}")


def _hint(name: str, section: str | None) -> str | None:
    if section is None:
        close = difflib.get_close_matches(name, schema.SECTIONS, n=1, cutoff=0.7)
        return close[0] if close else None
    return schema.did_you_mean(name, section)


def _bounded(table: dict[str, Any], k: schema.Key, where: str, default: Any = None) -> Any:
    """A plain int or float key, within the bounds its declaration gives (`default` when the
    table does not set it)."""
    if k.name not in table and default is not None:
        return default
    value = _number(table, k.name, where, k.minimum if k.minimum is not None else -math.inf,
                    None, integer=k.kind == "int")
    if k.maximum is not None and value > k.maximum:
        raise ConfigError(f"{where}.{k.name}: at most {k.maximum:.10g}, got {value!r}")
    return value if k.kind == "int" else float(value)


def _number(table: dict[str, Any], key: str, where: str, minimum: float, default: Any,
            integer: bool = False) -> Any:
    value = table.get(key, default)
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.{key}: expected {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}.{key}: expected a finite number, got {value!r}")
    if integer and value != int(value):
        raise ConfigError(f"{where}.{key}: expected {kind}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}.{key}: must be at least {minimum}, got {value!r}")
    return int(value) if integer else value


def _string(table: dict[str, Any], key: str, where: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


def _strings(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table[key]
    if isinstance(value, str) or not isinstance(value, list) \
            or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}.{key}: expected a list of strings, got {value!r}")
    return tuple(value)


def _boolean(table: dict[str, Any], key: str, where: str) -> bool:
    value = table[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _choice(table: dict[str, Any], key: str, where: str, choices: tuple[str, ...],
            default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    if value not in choices:
        raise ConfigError(f"{where}.{key}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _address(value: Any, where: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ConfigError(f"{where}: not an IP address: {value!r}") from None


def _device(table: Any, index: int) -> DeviceConfig:
    where = f"device[{index}]"
    table = _table(table, where)
    _check_keys(table, _DEVICE_KEYS, where, "device")
    name = table.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name: expected a short name of letters, digits, . _ -")
    where = f"device {name!r}"
    address = _address(table["address"], f"{where}.address") if "address" in table else None
    mac = None
    if "mac" in table:
        if not isinstance(table["mac"], str):
            raise ConfigError(f"{where}.mac: expected a MAC address string, got {table['mac']!r}")
        try:
            mac = normalize_mac(table["mac"])
        except ConfigError as exc:
            raise ConfigError(f"{where}.mac: {exc}") from None
    if address is None and mac is None:
        raise ConfigError(f"{where}: needs an address or a mac")
    address6 = tuple(_address(a, f"{where}.address6")
                     for a in (_strings(table, "address6", where) if "address6" in table else ()))
    mode = Mode(_choice(table, "mode", where, tuple(m.value for m in Mode), "strict"))
    overrides = table.get("categories", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}.categories: expected a table like {{ telemetry = \"block\" }}")
    categories = []
    for category, action in overrides.items():
        if category not in CATEGORIES:
            raise ConfigError(f"{where}.categories: unknown category {category!r}")
        try:
            categories.append((category, CategoryAction(action)))
        except ValueError:
            raise ConfigError(
                f"{where}.categories.{category}: expected allow, block or inspect"
            ) from None
    quic = _choice(table, "quic", where, ("hold", "block"), None)
    route_mark = None
    if "route_mark" in table:
        route_mark = _number(table, "route_mark", where, 1, 0, integer=True)
        if route_mark > 0xFFFFFFFF:
            raise ConfigError(f"{where}.route_mark: a mark is 32 bits (at most 0xffffffff)")
    return DeviceConfig(name, address, mac, address6, mode, tuple(categories), quic, route_mark)


def parse_config(data: dict[str, Any]) -> GuardConfig:
    """Validate a parsed TOML document into a GuardConfig."""
    _check_keys(data, frozenset(schema.SECTIONS), "config")
    guard = _table(data.get("guard", {}), "guard")
    _check_keys(guard, _GUARD_KEYS, "guard", "guard")
    kw: dict[str, Any] = {}
    queue = guard.get("queue", 7)
    if isinstance(queue, str) and re.fullmatch(r"\d+-\d+", queue):
        first, last = (int(x) for x in queue.split("-"))
        if last < first:
            raise ConfigError("guard.queue: range must be ascending, e.g. \"7-8\"")
        kw["queue"], kw["queue_count"] = first, last - first + 1
    elif isinstance(queue, str):
        raise ConfigError(f"guard.queue: expected a number or a range like \"7-8\", got {queue!r}")
    else:
        kw["queue"] = _number(guard, "queue", "guard", 0, 7, integer=True)
        kw["queue_count"] = _number(guard, "queue_count", "guard", 1, 1, integer=True)
    if kw["queue"] + kw["queue_count"] - 1 > 65535:
        raise ConfigError("guard.queue: NFQUEUE numbers go up to 65535")
    # the plain keys, as declared (guard/core/schema.py): choices, bounded numbers, strings
    for k in schema.KEYS:
        if k.section != "guard" or k.name not in guard or k.name == "queue_count":
            continue
        if k.kind == "choice":
            kw[k.name] = _choice(guard, k.name, "guard", k.choices, None)
        elif k.kind in ("int", "float"):
            kw[k.name] = _bounded(guard, k, "guard")
        elif k.kind == "bool":
            kw[k.name] = _boolean(guard, k.name, "guard")
        elif k.kind == "str":
            kw[k.name] = _string(guard, k.name, "guard")
    if "mark_mask" in guard:
        raw = guard["mark_mask"]
        try:
            if isinstance(raw, str):
                mask = int(raw, 0)
            elif isinstance(raw, int) and not isinstance(raw, bool):
                mask = raw
            else:
                raise ValueError
        except ValueError:
            raise ConfigError(f"guard.mark_mask: not a 32-bit mask: {raw!r}") from None
        # three bits: allow, block, and "belongs to a configured device" (guard/shell/firewall.py)
        if mask <= 0 or mask > 0xFFFFFFFF or bin(mask).count("1") < 3:
            raise ConfigError("guard.mark_mask: needs at least three bits of a 32-bit mark")
        kw["mark_mask"] = mask
    for key in ("tproxy_mark", "relay_mark"):
        if key in guard:
            kw[key] = _mark_bit(guard[key], f"guard.{key}")
    if "relay_table" in guard:
        kw["relay_table"] = _number(guard, "relay_table", "guard", 1, 0, integer=True)
        if kw["relay_table"] in (253, 254, 255) or kw["relay_table"] > 0xFFFFFFFF:
            raise ConfigError("guard.relay_table: not 253-255 (default, main, local), < 2^32")
    metrics = _table(data.get("metrics", {}), "metrics")
    _check_keys(metrics, schema.names("metrics"), "metrics", "metrics")
    if "listen" in metrics:
        if not isinstance(metrics["listen"], str):
            raise ConfigError(f"metrics.listen: expected \"host:port\" or \"\" to disable, "
                              f"got {metrics['listen']!r}")
        kw["metrics_listen"] = metrics["listen"] or None
    if kw.get("metrics_listen"):
        _metrics_listen(kw["metrics_listen"])
    web = _table(data.get("web", {}), "web")
    _check_keys(web, schema.names("web"), "web", "web")
    if "listen" in web:
        kw["web_listen"] = _string(web, "listen", "web")
    if "password_hash" in web:
        kw["web_password_hash"] = _string(web, "password_hash", "web")
    if "tls" in web:
        kw["web_tls"] = _boolean(web, "tls", "web")
    if "hosts" in web:
        kw["web_hosts"] = _strings(web, "hosts", "web")
    _web_settings(kw)
    hooks = [_hook(hook, index, kw) for index, hook in
             enumerate(_tables(data.get("hook", []), "hook"))]
    kw["hooks"] = tuple(hooks)
    if "mqtt" in data:
        kw["mqtt"] = _mqtt(_table(data["mqtt"], "mqtt"))
    devices = tuple(_device(d, i) for i, d in enumerate(_tables(data.get("device", []), "device")))
    names = [d.name for d in devices]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"device names must be unique: {', '.join(duplicates)}")
    kw["devices"] = devices
    config = GuardConfig(**kw)
    marks = {"guard.tproxy_mark": config.tproxy_mark, "guard.relay_mark": config.relay_mark}
    if config.tproxy_mark == config.relay_mark:
        raise ConfigError("guard.tproxy_mark and guard.relay_mark must be different bits")
    for key, bit in marks.items():
        if bit & config.mark_mask:
            raise ConfigError(f"{key}: {bit:#010x} is inside guard.mark_mask "
                              f"{config.mark_mask:#010x}")
    own = config.tproxy_mark | config.relay_mark
    for d in config.devices:
        if d.route_mark is not None and d.route_mark & own:
            raise ConfigError(f"device {d.name!r}.route_mark: {d.route_mark:#010x} uses the "
                              f"relay's own bits {own:#010x} (guard.tproxy_mark, guard.relay_mark)")
    return config


# the hook keys only an ntfy hook takes (all declared in guard/core/schema.py)
_NTFY_KEYS = {"topic", "token", "username", "password", "priority", "action_url"}
_NTFY_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # ntfy's own rule for topic names


def _hook(hook: dict[str, Any], index: int, kw: dict[str, Any]) -> Hook:
    """One `[[hook]]`: kind "json" (a command and/or a URL get the event as JSON) or "ntfy" (a
    phone notification whose Allow/Deny buttons call the web prompt back)."""
    where = f"hook[{index}]"
    _check_keys(hook, schema.names("hook"), where, "hook")
    kind = _choice(hook, "kind", where, ("json", "ntfy"), "json")
    events = (_strings(hook, "events", where) if "events" in hook
              else ("upload-held", "upload-decided"))
    timeout_s = float(_bounded(hook, schema.key("hook", "timeout_s"), where, 5.0))
    if kind == "json":
        extra = sorted(set(hook) & _NTFY_KEYS)
        if extra:
            raise ConfigError(f"{where}: {', '.join(extra)}: only with kind = \"ntfy\"")
        if "command" not in hook:
            command: tuple[str, ...] = ()
        elif isinstance(hook["command"], str):
            command = (_string(hook, "command", where),)  # a path, never a shell line
        else:
            command = _strings(hook, "command", where)
        url = _string(hook, "url", where) if "url" in hook else None
        if not command and not url:
            raise ConfigError(f"{where}: needs a command or a url")
        return Hook(events, command, url, timeout_s)
    if "command" in hook:
        raise ConfigError(f"{where}.command: an ntfy hook publishes to url; a command goes in "
                          "a hook of its own")
    if "url" not in hook or "topic" not in hook:
        raise ConfigError(f"{where}: kind = \"ntfy\" needs url (the ntfy server, e.g. "
                          "\"https://ntfy.sh\") and topic")
    url = _http_url(_string(hook, "url", where), f"{where}.url").rstrip("/")
    topic = _string(hook, "topic", where)
    if not _NTFY_TOPIC.match(topic):
        raise ConfigError(f"{where}.topic: letters, digits, _ and - only, up to 64, "
                          f"got {topic!r}")
    token = _string(hook, "token", where) if "token" in hook else None
    username = _string(hook, "username", where) if "username" in hook else None
    password = _string(hook, "password", where) if "password" in hook else None
    if token is not None and (username is not None or password is not None):
        raise ConfigError(f"{where}: token or username/password, not both")
    if (username is None) != (password is None):
        raise ConfigError(f"{where}: username and password go together")
    priority = _bounded(hook, schema.key("hook", "priority"), where, 4)
    if not kw.get("web_listen"):
        raise ConfigError(f"{where}: the Allow/Deny buttons of an ntfy hook call the web "
                          "prompt back: set [web] listen")
    action_url = None
    if "action_url" in hook:
        action_url = _http_url(_string(hook, "action_url", where),
                               f"{where}.action_url").rstrip("/")
    return Hook(events, (), url, timeout_s, "ntfy", topic, token, username, password, priority,
                action_url)


def _http_url(value: str, where: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ConfigError(f"{where}: not a URL: {value!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: expected an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: no ?query or #fragment, got {value!r}")
    return value


_MQTT_TOPIC = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def _mqtt(table: dict[str, Any]) -> MqttConfig:
    where = "mqtt"
    _check_keys(table, schema.names("mqtt"), where, "mqtt")
    if "host" not in table:
        raise ConfigError("mqtt.host: the broker's address is needed (e.g. \"192.168.1.2\")")
    host = _string(table, "host", where)
    if any(c in host for c in "/ :") and not _is_ip(host):
        raise ConfigError(f"mqtt.host: a host name or an IP address, got {host!r}")
    kw: dict[str, Any] = {"host": host}
    if "tls" in table:
        kw["tls"] = _boolean(table, "tls", where)
    if "ca_file" in table:
        kw["ca_file"] = _string(table, "ca_file", where)
        if not kw.get("tls", True):
            raise ConfigError("mqtt.ca_file: only with tls = true")
        kw["tls"] = True
    kw["port"] = _bounded(table, schema.key("mqtt", "port"), where,
                          8883 if kw.get("tls") else 1883)
    for key in ("username", "password"):
        if key in table:
            kw[key] = _string(table, key, where)
    if "password" in kw and "username" not in kw:
        raise ConfigError("mqtt.password: needs a username")
    if "client_id" in table:
        kw["client_id"] = _string(table, "client_id", where)
        if len(kw["client_id"]) > 23 or not re.fullmatch(r"[A-Za-z0-9_-]+", kw["client_id"]):
            raise ConfigError("mqtt.client_id: up to 23 letters, digits, _ or -")
    for key in ("discovery_prefix", "base_topic"):
        if key in table:
            kw[key] = _string(table, key, where)
            if not _MQTT_TOPIC.match(kw[key]):
                raise ConfigError(f"mqtt.{key}: a topic like \"homeassistant\" or \"home/hushgate\" "
                                  f"(no wildcards, no leading or trailing /), got {kw[key]!r}")
    for key in ("keepalive_s", "mute_for_s"):
        if key in table:
            kw[key] = _bounded(table, schema.key("mqtt", key), where)
    return MqttConfig(**kw)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _metrics_listen(listen: str) -> None:
    """`[metrics] listen` as the metrics server parses it, plus an IP address (a name would be
    resolved at each start, to whatever it means then)."""
    from guard.core.listen import parse_metrics_listen as parse_listen

    try:
        host, _port = parse_listen(listen)
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"metrics.listen: expected ADDRESS:PORT with an IP address "
                          f"(127.0.0.1:9877, [::1]:9877) or \"\" to disable, got {listen!r}"
                          + (f" ({exc})" if str(exc) and listen not in str(exc) else "")) from None


def _web_settings(kw: dict[str, Any]) -> None:
    """`[web]` as the prompt will take it at start: the listen address (a LAN address with a
    port) and the password hash. `run` refuses nothing here that loading accepted."""
    from guard.core.listen import WebError, _parse_hash, check_listen

    try:
        if kw.get("web_listen"):
            check_listen(kw["web_listen"], kw.get("web_hosts", ()))
        if kw.get("web_password_hash") is not None:
            _parse_hash(kw["web_password_hash"])
    except WebError as exc:
        raise ConfigError(str(exc)) from None


def _mark_bit(raw: Any, where: str) -> int:
    """One bit of the 32-bit packet mark, as a number or a string like "0x20000000"."""
    try:
        if isinstance(raw, str):
            value = int(raw, 0)
        elif isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{where}: not a mark: {raw!r}") from None
    if value <= 0 or value > 0xFFFFFFFF or value & (value - 1):
        raise ConfigError(f"{where}: must be a single bit of the 32-bit mark, got {raw!r}")
    return value


def load_config(path: str | Path) -> GuardConfig:
    """Read and validate a config file; errors name the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
