"""The configuration's one declaration: every key of every section, its type, bounds and meaning.

Rules of this module: it is data plus small pure helpers. `guard/core/config.py` parses and
validates TOML from it (the keys a section accepts, the bounds of plain numbers, "did you mean"
for a misspelt key), `guard/tools/uci.py` maps OpenWrt's UCI options from it, and `hushgate config
keys --markdown` prints docs/config.md from it (a test keeps that file equal to the output).
Checks that relate keys to each other (a queue range, mark bits that must not overlap, an ntfy
hook that needs [web]) stay code in config.py; their keys are declared here all the same, as
kind "special", so that no key exists in one place only.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

__all__ = ["KEYS", "SECTIONS", "Key", "did_you_mean", "markdown", "names", "uci_options"]

# Sections in the order a config file shows them; "hook" and "device" are arrays of tables.
SECTIONS = ("guard", "metrics", "web", "hook", "mqtt", "device")
ARRAYS = frozenset({"hook", "device"})


@dataclass(frozen=True, slots=True)
class Key:
    """One key. `kind`: int, float, bool, str, choice, strings (a list of strings), mark (a
    32-bit packet mark, a number or "0x..."), argv, categories or special (parsed by its own code
    in config.py). `minimum`/`maximum` bound int and float keys (config.py checks them for
    every key that has them); `choices` are a choice key's values; `uci` are extra UCI option
    names for it (UCI's singular list names)."""

    section: str
    name: str
    kind: str
    default: str  # as the docs show it ("" for none)
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    uci: tuple[str, ...] = ()


def _k(section: str, name: str, kind: str, default: str, doc: str, **kw: object) -> Key:
    return Key(section, name, kind, default, doc, **kw)  # type: ignore[arg-type]


KEYS: tuple[Key, ...] = (
    # [guard] -------------------------------------------------------------------------------
    _k("guard", "queue", "special", "7",
       "NFQUEUE number, or a range \"7-8\" (several queues, --queue-balance)"),
    _k("guard", "queue_count", "int", "1", "number of queues from `queue` (a range sets it)",
       minimum=1),
    _k("guard", "fail", "choice", "\"closed\"",
       "closed: with no guard running, guarded devices' traffic is dropped; open: it flows",
       choices=("closed", "open")),
    _k("guard", "hold_timeout_s", "float", "20.0",
       "seconds a pending upload waits for a person; then it is denied (expired)", minimum=0.1),
    _k("guard", "max_turn_s", "float", "8.0",
       "the longest voice turn passed in followups mode", minimum=0.1),
    _k("guard", "followup_window_s", "float", "10.0",
       "followups mode: how long after an answer a turn needs no prompt", minimum=0.1),
    _k("guard", "window_segments", "int", "10",
       "packet hold only (tcp_hold = \"packet\", QUIC hold): what a held sender may emit",
       minimum=1),
    _k("guard", "mark_mask", "special", "0x00ff0000",
       "the packet-mark bits hushgate's verdicts use (at least three bits)"),
    _k("guard", "quic", "choice", "\"block\"",
       "block: refuse QUIC so speakers fall back to TCP (held exactly); hold: hold its datagrams",
       choices=("hold", "block")),
    _k("guard", "socket", "str", "\"/run/hushgate/control.sock\"", "the control socket"),
    _k("guard", "socket_group", "str", "", "a group allowed to use the control socket"),
    _k("guard", "state_db", "str", "\"/var/lib/hushgate/state.db\"",
       "the state database (pending uploads, rules, windows, the audit log)"),
    _k("guard", "rules_dir", "str", "", "vendor rule files (default: the shipped rules)"),
    _k("guard", "backend", "choice", "\"iptables\"", "the kernel rules: iptables or nftables",
       choices=("iptables", "nftables")),
    _k("guard", "reset_midstream", "bool", "true",
       "reset connections that predate the guard so they reconnect through it"),
    _k("guard", "max_held_packets_per_upload", "int", "512",
       "packets held per upload before it is denied (capped)", minimum=1),
    _k("guard", "max_held_bytes_per_upload", "int", "1048576",
       "bytes held per upload before it is denied (capped)", minimum=1),
    _k("guard", "max_held_packets_total", "int", "4096", "packets held in total", minimum=1),
    _k("guard", "max_held_bytes_total", "int", "8388608", "bytes held in total", minimum=1),
    _k("guard", "audit_max_age_s", "float", "7776000.0", "audit records older than this go",
       minimum=0.1),
    _k("guard", "audit_max_rows", "int", "20000", "audit records kept at most", minimum=1),
    _k("guard", "audit_max_bytes", "int", "4194304",
       "bytes the state database may use (at least 65536)", minimum=65536),
    _k("guard", "tcp_hold", "choice", "\"relay\"",
       "relay: terminate guarded devices' TCP and hold the byte stream; packet: the legacy hold",
       choices=("relay", "packet")),
    _k("guard", "relay_port", "int", "7411", "the relay's transparent listener", minimum=1,
       maximum=65535),
    _k("guard", "tproxy_mark", "special", "0x20000000",
       "one mark bit: routes intercepted packets to the relay"),
    _k("guard", "relay_mark", "special", "0x40000000",
       "one mark bit: the relay's bypass connmark and its upstream leg's SO_MARK"),
    _k("guard", "relay_table", "special", "7411",
       "the policy-routing table of the relay (not 253-255)"),
    _k("guard", "relay_priority", "int", "900", "the relay's ip rule priority", minimum=1,
       maximum=32765),
    _k("guard", "max_connections_per_device", "int", "512",
       "relayed connections (and held SYNs) per device", minimum=1),
    _k("guard", "max_relay_connections", "int", "4096", "relayed connections in total",
       minimum=1),
    # [metrics] -----------------------------------------------------------------------------
    _k("metrics", "listen", "special", "\"127.0.0.1:9877\"",
       "Prometheus metrics ADDRESS:PORT; \"\" turns them off"),
    # [web] ---------------------------------------------------------------------------------
    _k("web", "listen", "special", "", "the LAN web page ADDRESS:PORT (off when unset)"),
    _k("web", "password_hash", "special", "",
       "a password for the page (`hushgate web hash-password`); else the token"),
    _k("web", "tls", "bool", "false", "serve HTTPS with a self-signed, pinned certificate"),
    _k("web", "hosts", "strings", "[]", "extra Host names the page answers to (router.lan)",
       uci=("host",)),
    # [[hook]] ------------------------------------------------------------------------------
    _k("hook", "kind", "choice", "\"json\"",
       "json: the event as JSON to a command or URL; ntfy: a phone notification with buttons",
       choices=("json", "ntfy")),
    _k("hook", "events", "strings", "[\"upload-held\", \"upload-decided\"]",
       "the events this hook gets", uci=("event",)),
    _k("hook", "command", "argv", "", "json: a program (a path or an argv list, never a shell)"),
    _k("hook", "url", "str", "", "json: a URL to POST to; ntfy: the ntfy server"),
    _k("hook", "timeout_s", "float", "5.0", "seconds one delivery may take", minimum=0.1),
    _k("hook", "topic", "special", "", "ntfy: the topic (pick a long random one)"),
    _k("hook", "token", "str", "", "ntfy: an access token"),
    _k("hook", "username", "str", "", "ntfy: basic auth user (with password)"),
    _k("hook", "password", "str", "", "ntfy: basic auth password"),
    _k("hook", "priority", "int", "4", "ntfy: 1 (min) to 5 (max)", minimum=1, maximum=5),
    _k("hook", "action_url", "special", "",
       "ntfy: the web page as the phone reaches it (default: [web] listen)"),
    # [mqtt] --------------------------------------------------------------------------------
    _k("mqtt", "host", "special", "", "the MQTT broker (Home Assistant), needed for [mqtt]"),
    _k("mqtt", "port", "int", "1883 (8883 with tls)", "the broker's port", minimum=1,
       maximum=65535),
    _k("mqtt", "username", "str", "", "broker user"),
    _k("mqtt", "password", "str", "", "broker password (needs username)"),
    _k("mqtt", "tls", "bool", "false", "connect with TLS"),
    _k("mqtt", "ca_file", "str", "", "the broker's CA file (implies tls)"),
    _k("mqtt", "client_id", "special", "\"hushgate\"", "up to 23 letters, digits, _ or -"),
    _k("mqtt", "discovery_prefix", "special", "\"homeassistant\"",
       "Home Assistant's discovery prefix"),
    _k("mqtt", "base_topic", "special", "\"hushgate\"", "where hushgate's topics live"),
    _k("mqtt", "keepalive_s", "int", "60", "MQTT keepalive", minimum=5),
    _k("mqtt", "mute_for_s", "float", "3600.0", "what a device's mute switch turns on for",
       minimum=1, maximum=30 * 86400),
    # [[device]] ----------------------------------------------------------------------------
    _k("device", "name", "special", "", "a short name (letters, digits, . _ -)"),
    _k("device", "mac", "special", "", "its MAC (preferred: survives DHCP, resists spoofing)"),
    _k("device", "address", "special", "", "its IPv4 or IPv6 address"),
    _k("device", "address6", "special", "[]", "extra IPv6 addresses when no MAC is given"),
    _k("device", "mode", "choice", "\"strict\"",
       "strict, followups, monitor or off", choices=("strict", "followups", "monitor", "off")),
    _k("device", "categories", "categories", "{}",
       "per-category overrides: { telemetry = \"block\" } (allow, block, inspect)",
       uci=("category",)),
    _k("device", "quic", "choice", "guard.quic", "hold or block, for this device",
       choices=("hold", "block")),
    _k("device", "route_mark", "mark", "",
       "the mark a policy routes it by (pbr, mwan3, VPN): carried by the relay's upstream leg"),
)

_BY_SECTION: dict[str, dict[str, Key]] = {}
for _key in KEYS:
    _BY_SECTION.setdefault(_key.section, {})[_key.name] = _key
del _key


def names(section: str) -> frozenset[str]:
    """The keys `section` accepts."""
    return frozenset(_BY_SECTION.get(section, {}))


def key(section: str, name: str) -> Key:
    return _BY_SECTION[section][name]


def did_you_mean(name: str, section: str) -> str | None:
    """The known key of `section` closest to a misspelt `name`, if one is close."""
    close = difflib.get_close_matches(name, sorted(names(section)), n=1, cutoff=0.7)
    return close[0] if close else None


def uci_options(section: str) -> dict[str, Key]:
    """UCI option name -> Key for `section` (each key under its own name and its aliases)."""
    out: dict[str, Key] = {}
    for k in _BY_SECTION.get(section, {}).values():
        out[k.name] = k
        for alias in k.uci:
            out[alias] = k
    return out


def markdown() -> str:
    """docs/config.md: every key of every section, from this declaration."""
    lines = [
        "# Configuration keys",
        "",
        "Generated from `guard/core/schema.py` by `hushgate config keys --markdown`; a test keeps",
        "this file equal to that output. The TOML file is `/etc/hushgate/hushgate.toml`; on",
        "OpenWrt the same keys are UCI options in `/etc/config/hushgate` (`config guard 'guard'`,",
        "`config web 'web'`, ..., lists as `list`).",
        "",
    ]
    for section in SECTIONS:
        header = f"[[{section}]]" if section in ARRAYS else f"[{section}]"
        lines += [f"## `{header}`", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        for k in _BY_SECTION.get(section, {}).values():
            kind = k.kind
            if k.choices:
                kind = " \\| ".join(k.choices)
            elif k.minimum is not None or k.maximum is not None:
                lo = "" if k.minimum is None else f"{k.minimum:g}"
                hi = "" if k.maximum is None else f"{k.maximum:g}"
                kind = f"{kind} {lo}..{hi}"
            alias = f" (UCI also `{'`, `'.join(k.uci)}`)" if k.uci else ""
            default = f"`{k.default}`" if k.default else ""
            lines.append(f"| `{k.name}` | {kind} | {default} | {k.doc}{alias} |")
        lines.append("")
    return "\n".join(lines)
