"""OpenWrt's `/etc/config/hushgate` (UCI) as the guard's TOML config (design.md section 8).

Rules of this module: the converter is pure (text in, text out; only the `*_file` helpers touch
the disk) and strict like `guard.core.config`: an unknown option, a bad value or a broken line is an
error that names the UCI line. The result is always a document `guard.core.config.parse_config`
accepts, because the converter validates it with that very function before returning it.

The UCI syntax is libuci's (openwrt/uci file.c): one statement per line (`;` separates more),
`package NAME`, `config TYPE ['NAME']`, `option NAME VALUE`, `list NAME VALUE`; a value is any
concatenation of 'single-quoted' (no escapes), "double-quoted" (backslash escapes) and bare text
(backslash escapes, `#` starts a comment); quotes may span lines, a backslash at the end of a
line continues it. A repeated `option` replaces the earlier value, `list` appends.

Mapping (one UCI section per TOML table, keys as in the TOML file):

    config guard 'guard'    -> [guard]     every guard key; `option enabled` and `option jail` are
                                           the init script's
    config metrics 'metrics'-> [metrics]   option listen ('' turns metrics off)
    config web 'web'        -> [web]       listen, password_hash, tls, list host
    config hook             -> [[hook]]    list event, option command (a path) or list command
                                           (an argv), option url, option timeout_s; an ntfy hook:
                                           option kind 'ntfy', topic, token (or username and
                                           password), priority, action_url
    config mqtt 'mqtt'      -> [mqtt]      host, port, username, password, tls, ca_file,
                                           client_id, discovery_prefix, base_topic, keepalive_s,
                                           mute_for_s (Home Assistant)
    config device           -> [[device]]  name (else the section's name), mac, address,
                                           list address6, mode, quic, route_mark (0x100),
                                           list category 'telemetry=block'; enabled '0' skips it
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.core import schema
from guard.core.config import ConfigError, GuardConfig, normalize_mac, parse_config

__all__ = [
    "OPENWRT_DEFAULTS",
    "UciError",
    "UciOption",
    "UciSection",
    "dumps_toml",
    "fw4_include",
    "parse_uci",
    "uci_file_to_config",
    "uci_to_config",
    "uci_to_dict",
    "uci_to_toml",
    "write_openwrt_files",
]

# Where things live on OpenWrt: /var is a tmpfs (lost at reboot), /etc is flash. Always-rules and
# windows must survive a reboot (design.md section 8), so the store is on flash; the socket is
# runtime state. fw4 (OpenWrt 22.03+) is nftables.
OPENWRT_DEFAULTS: Mapping[str, Any] = {
    "state_db": "/etc/hushgate/state.db",
    "socket": "/var/run/hushgate/control.sock",
    "backend": "nftables",
}

INIT_ONLY = frozenset({"enabled", "jail"})  # booleans read by /etc/init.d/hushgate only

_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")  # libuci: option and section names
_TYPE_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # libuci: section types
_INT_RE = re.compile(r"^[+]?[0-9]+$")
_QUEUE_RANGE_RE = re.compile(r"^[0-9]+-[0-9]+$")
_TRUE = {"1", "yes", "on", "true", "enabled"}
_FALSE = {"0", "no", "off", "false", "disabled"}


class UciError(ConfigError):
    """A UCI problem; `line` is the 1-based line it is about (None when it has none)."""

    def __init__(self, message: str, line: int | None = None, source: str | None = None):
        self.line = line
        self.source = source
        self.detail = message
        where = ":".join(str(p) for p in (source, line) if p is not None)
        super().__init__(f"{where}: {message}" if where else message)

    def with_source(self, source: str) -> UciError:
        return UciError(self.detail, self.line, source)


@dataclass(slots=True)
class UciOption:
    name: str
    values: list[str]
    is_list: bool
    line: int

    @property
    def value(self) -> str:
        return self.values[-1] if self.values else ""


@dataclass(slots=True)
class UciSection:
    type: str
    name: str | None  # None: anonymous
    line: int
    options: dict[str, UciOption] = field(default_factory=dict)


# --------------------------------------------------------------------------- the UCI parser


class _Reader:
    """libuci's tokenizer over the whole text, keeping line numbers."""

    def __init__(self, text: str) -> None:
        self.text = text.replace("\r\n", "\n")
        self.pos = 0
        self.line = 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        c = self.peek()
        self.pos += 1
        if c == "\n":
            self.line += 1
        return c

    def skip_blanks(self) -> None:
        while self.peek() in (" ", "\t", "\v", "\f", "\r"):
            self.pos += 1

    def skip_comment(self) -> None:
        while self.peek() and self.peek() != "\n":
            self.pos += 1

    def word(self) -> tuple[str, bool] | None:
        """The next argument on this line: (text, quoted). None at the end of the statement
        (end of line, `;`, a comment or the end of the text). Quoted text may span lines."""
        self.skip_blanks()
        c = self.peek()
        if c in ("", "\n", ";") or c == "#":
            return None
        start_line = self.line
        out: list[str] = []
        quoted = False
        while True:
            c = self.peek()
            if c in ("", "\n", " ", "\t", "\v", "\f", "\r", ";"):
                break
            if c == "#":  # libuci: a `#` inside a bare word ends the line
                self.skip_comment()
                break
            if c == "'":
                quoted = True
                self.take()
                while True:
                    if self.peek() == "":
                        raise UciError("unterminated ' (quote opened here)", start_line)
                    ch = self.take()
                    if ch == "'":
                        break
                    out.append(ch)
                continue
            if c == '"':
                quoted = True
                self.take()
                while True:
                    if self.peek() == "":
                        raise UciError('unterminated " (quote opened here)', start_line)
                    ch = self.take()
                    if ch == '"':
                        break
                    if ch == "\\":
                        nxt = self._escaped()
                        if nxt is not None:
                            out.append(nxt)
                        continue
                    out.append(ch)
                continue
            if c == "\\":
                self.take()
                nxt = self._escaped()
                if nxt is not None:
                    out.append(nxt)
                continue
            out.append(self.take())
        return "".join(out), quoted

    def _escaped(self) -> str | None:
        """After a backslash: the escaped character, or None for a line continuation."""
        c = self.peek()
        if c == "":
            return None
        if c == "\n":
            self.take()
            return None
        return self.take()

    def end_statement(self) -> None:
        """Consume the rest of a statement: a `;`, a comment, or the newline."""
        self.skip_blanks()
        c = self.peek()
        if c == ";":
            self.take()
        elif c == "#":
            self.skip_comment()
            if self.peek() == "\n":
                self.take()
        elif c == "\n":
            self.take()


def parse_uci(text: str, package: str = "hushgate") -> list[UciSection]:
    """Parse a UCI file (or `uci export` output) into sections, in file order. Errors name the
    line. A `package` statement for another package is an error."""
    r = _Reader(text)
    sections: list[UciSection] = []
    by_name: dict[str, UciSection] = {}
    current: UciSection | None = None
    while r.peek():
        r.skip_blanks()
        c = r.peek()
        if c == "\n" or c == ";":
            r.take()
            continue
        if c == "#":
            r.skip_comment()
            continue
        line = r.line
        token = r.word()
        if token is None:
            r.end_statement()
            continue
        command, _ = token
        args: list[tuple[str, bool]] = []
        while (arg := r.word()) is not None:
            args.append(arg)
        r.end_statement()
        if command in ("package", "p"):
            if len(args) != 1:
                raise UciError("package takes exactly one name", line)
            if args[0][0] != package:
                raise UciError(f"this is package {args[0][0]!r}, expected {package!r}", line)
        elif command in ("config", "c"):
            if not args or len(args) > 2:
                raise UciError("config takes a type and an optional name", line)
            stype = args[0][0]
            if not _TYPE_RE.match(stype):
                raise UciError(f"invalid section type {stype!r}", line)
            name = args[1][0] if len(args) == 2 and args[1][0] else None
            if name is not None and not _NAME_RE.match(name):
                raise UciError(
                    f"invalid section name {name!r} (letters, digits and _ only)", line
                )
            if name is not None and name in by_name:
                current = by_name[name]
                if current.type != stype:
                    raise UciError(
                        f"section {name!r} was a {current.type!r} on line {current.line}, "
                        f"now a {stype!r}",
                        line,
                    )
            else:
                current = UciSection(stype, name, line)
                sections.append(current)
                if name is not None:
                    by_name[name] = current
        elif command in ("option", "o", "list", "l"):
            is_list = command in ("list", "l")
            if current is None:
                raise UciError(f"{command} before the first config section", line)
            if not args:
                raise UciError(f"{command} without a name", line)
            if len(args) > 2:
                raise UciError(
                    f"{command} {args[0][0]}: too many values (quote a value with spaces)", line
                )
            oname = args[0][0]
            if not _NAME_RE.match(oname):
                raise UciError(f"invalid option name {oname!r}", line)
            value = args[1][0] if len(args) == 2 else ""
            existing = current.options.get(oname)
            if is_list:
                if existing is None:
                    current.options[oname] = UciOption(oname, [value], True, line)
                else:  # libuci: a list appends to an option or list of that name
                    existing.values.append(value)
                    existing.is_list = True
                    existing.line = line
            else:
                current.options[oname] = UciOption(oname, [value], False, line)
        else:
            raise UciError(f"invalid command {command!r} (expected config, option or list)", line)
    return sections


# --------------------------------------------------------------------------- UCI -> TOML dict

# Every option comes from the one declaration of the config (guard/core/schema.py): a TOML key is
# a UCI option of the same name (plus UCI's singular list names, e.g. `list category`).
_UCI_KINDS = {"int": "int", "float": "float", "bool": "bool", "strings": "list", "argv": "argv",
              "categories": "categories", "mark": "mark"}
# special keys (parsed by their own code in config.py) as UCI carries them
_UCI_SPECIAL = {("guard", "queue"): "queue", ("guard", "relay_table"): "int",
                ("device", "address6"): "list"}


def _uci_kind(k: schema.Key) -> str:
    return _UCI_SPECIAL.get((k.section, k.name)) or _UCI_KINDS.get(k.kind, "str")


_GUARD_KINDS: dict[str, str] = {k.name: _uci_kind(k) for k in schema.KEYS if k.section == "guard"}
_GUARD_KEYS = frozenset(_GUARD_KINDS)

# (uci name -> (toml key, kind)); kinds: str, int, mark, float, bool, list, argv, categories
_SECTION_SCHEMA: dict[str, dict[str, tuple[str, str]]] = {
    section: {name: (k.name, _uci_kind(k)) for name, k in schema.uci_options(section).items()}
    for section in ("metrics", "web", "hook", "mqtt", "device")
}
_SECTION_SCHEMA["device"]["enabled"] = ("enabled", "bool")  # UCI's own: '0' skips the device
_SINGLETONS = ("guard", "metrics", "web", "mqtt")


def _bool(opt: UciOption) -> bool:
    v = opt.value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise UciError(f"option {opt.name} {opt.value!r}: expected 1 or 0", opt.line)


def _number(opt: UciOption, integer: bool) -> int | float:
    text = opt.value.strip()
    if integer:
        if not _INT_RE.match(text):
            raise UciError(f"option {opt.name} {opt.value!r}: expected a whole number", opt.line)
        return int(text)
    try:
        value = float(text)
    except ValueError:
        raise UciError(f"option {opt.name} {opt.value!r}: expected a number", opt.line) from None
    if not math.isfinite(value):
        raise UciError(f"option {opt.name} {opt.value!r}: expected a finite number", opt.line)
    return int(value) if value.is_integer() and _INT_RE.match(text) else value


def _mark(opt: UciOption) -> int:
    """A mark as fw4 and pbr write them: 0x100 or 256."""
    try:
        return int(opt.value.strip(), 0)
    except ValueError:
        raise UciError(f"option {opt.name} {opt.value!r}: expected a mark like 0x100",
                       opt.line) from None


def _scalar(opt: UciOption) -> None:
    if opt.is_list and len(opt.values) > 1:
        raise UciError(f"{opt.name} takes one value: use `option`, not `list`", opt.line)


def _split(opt: UciOption) -> list[str]:
    """List values: every `list` entry, or an `option` split at whitespace."""
    if opt.is_list:
        return list(opt.values)
    return opt.value.split()


@dataclass(slots=True)
class _Lines:
    """Where each TOML key came from, to name the line in a validation error."""

    sections: dict[tuple[str, int], int] = field(default_factory=dict)
    keys: dict[tuple[str, int, str], int] = field(default_factory=dict)
    device_names: dict[str, list[int]] = field(default_factory=dict)


def _guard_table(section: UciSection, out: dict[str, Any], lines: _Lines) -> None:
    for opt in section.options.values():
        if opt.name in INIT_ONLY:
            _bool(opt)  # validated here, read by the init script
            continue
        if opt.name not in _GUARD_KEYS:
            raise UciError(f"unknown option {opt.name!r} in config guard", opt.line)
        _scalar(opt)
        lines.keys[("guard", 0, opt.name)] = opt.line
        kind = _GUARD_KINDS[opt.name]
        if kind == "queue":
            text = opt.value.strip()
            if _QUEUE_RANGE_RE.match(text):
                out["queue"] = text
            else:
                out["queue"] = _number(opt, integer=True)
        elif kind in ("int", "float"):
            out[opt.name] = _number(opt, integer=kind == "int")
        elif kind == "bool":
            out[opt.name] = _bool(opt)
        elif kind == "mark":
            out[opt.name] = _mark(opt)
        else:
            out[opt.name] = opt.value


def _table(section: UciSection, index: int, lines: _Lines) -> dict[str, Any]:
    schema = _SECTION_SCHEMA[section.type]
    out: dict[str, Any] = {}
    for opt in section.options.values():
        if opt.name not in schema:
            known = ", ".join(sorted(schema))
            raise UciError(
                f"unknown option {opt.name!r} in config {section.type} (known: {known})",
                opt.line,
            )
        key, kind = schema[opt.name]
        lines.keys[(section.type, index, key)] = opt.line
        if kind in ("list", "categories"):
            values = _split(opt)
            if kind == "list":
                out.setdefault(key, []).extend(values)
                continue
            cats = out.setdefault(key, {})
            for item in values:
                cat, sep, action = item.partition("=")
                if not sep or not cat.strip() or not action.strip():
                    raise UciError(
                        f"{opt.name} {item!r}: expected CATEGORY=ACTION, e.g. 'telemetry=block'",
                        opt.line,
                    )
                cats[cat.strip()] = action.strip()
            continue
        if kind == "argv":
            out[key] = list(opt.values) if opt.is_list else opt.value
            continue
        _scalar(opt)
        if kind == "bool":
            out[key] = _bool(opt)
        elif kind == "float":
            out[key] = _number(opt, integer=False)
        elif kind == "int":
            out[key] = _number(opt, integer=True)
        elif kind == "mark":
            out[key] = _mark(opt)
        else:
            out[key] = opt.value
    return out


def _convert(text: str, defaults: Mapping[str, Any]) -> tuple[dict[str, Any], _Lines]:
    sections = parse_uci(text)
    lines = _Lines()
    doc: dict[str, Any] = {}
    seen: dict[str, UciSection] = {}
    hooks: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    for section in sections:
        if section.type in _SINGLETONS:
            if section.type in seen:
                first = seen[section.type]
                raise UciError(
                    f"a second config {section.type} section (the first is on line "
                    f"{first.line}); there is only one",
                    section.line,
                )
            seen[section.type] = section
            lines.sections[(section.type, 0)] = section.line
            if section.type == "guard":
                table: dict[str, Any] = {}
                _guard_table(section, table, lines)
            else:
                table = _table(section, 0, lines)
            doc[section.type] = table
        elif section.type == "hook":
            lines.sections[("hook", len(hooks))] = section.line
            hooks.append(_table(section, len(hooks), lines))
        elif section.type == "device":
            index = len(devices)
            table = _table(section, index, lines)
            if not table.pop("enabled", True):
                # Keep the numbering of the devices that remain consistent with their lines.
                for stale in [k for k in lines.keys if k[0] == "device" and k[1] == index]:
                    del lines.keys[stale]
                continue
            lines.sections[("device", index)] = section.line
            if "name" not in table and section.name is not None:
                table["name"] = section.name
            if "mac" in table:
                try:
                    table["mac"] = normalize_mac(str(table["mac"]))
                except ConfigError as exc:
                    raise UciError(str(exc), lines.keys[("device", index, "mac")]) from None
            if isinstance(table.get("name"), str):
                lines.device_names.setdefault(table["name"], []).append(section.line)
            devices.append(table)
        else:
            raise UciError(
                f"unknown section type {section.type!r} (expected guard, metrics, web, mqtt, hook or "
                "device)",
                section.line,
            )
    guard = doc.setdefault("guard", {})
    for key, value in defaults.items():
        guard.setdefault(key, value)
    ordered: dict[str, Any] = {name: doc[name] for name in _SINGLETONS if name in doc}
    if hooks:
        ordered["hook"] = hooks
    if devices:
        ordered["device"] = devices
    return ordered, lines


_LOCATORS = (
    (re.compile(r"^(guard|metrics|web|mqtt)(?:\.(\w+))?"), "table"),
    (re.compile(r"^(hook|device)\[(\d+)\](?:\.(\w+))?"), "indexed"),
    (re.compile(r"^device '([^']*)'(?:\.(\w+))?"), "device"),
    (re.compile(r"^device names must be unique: ([^,]+)"), "duplicate"),
)


def _locate(message: str, lines: _Lines) -> int | None:
    """The UCI line a `parse_config` error is about, from the key path it starts with."""
    for pattern, kind in _LOCATORS:
        m = pattern.match(message)
        if not m:
            continue
        if kind == "table":
            table, key = m.group(1), m.group(2)
            return lines.keys.get((table, 0, key or "")) or lines.sections.get((table, 0))
        if kind == "indexed":
            table, index, key = m.group(1), int(m.group(2)), m.group(3)
            return lines.keys.get((table, index, key or "")) or lines.sections.get((table, index))
        name = m.group(1)
        starts = lines.device_names.get(name, [])
        if kind == "duplicate":
            return starts[-1] if starts else None
        if not starts:
            return None
        section_line = starts[0]
        found = next(
            (i for (t, i), ln in lines.sections.items() if t == "device" and ln == section_line),
            None,
        )
        key = m.group(2)
        if found is not None and key:
            return lines.keys.get(("device", found, key), section_line)
        return section_line
    return None


def uci_to_dict(text: str, *, defaults: Mapping[str, Any] = OPENWRT_DEFAULTS) -> dict[str, Any]:
    """The TOML-shaped document for a UCI text, validated with `parse_config`. `defaults` fill
    guard keys the UCI file leaves out (OpenWrt paths by default; pass {} for none)."""
    from guard.shell.fwspec import spec_from_config

    doc, lines = _convert(text, defaults)
    try:
        config = parse_config(doc)
    except ConfigError as exc:
        raise UciError(str(exc), _locate(str(exc), lines)) from None
    try:
        spec_from_config(config)  # what the kernel rules need on top (mark bits, names)
    except ValueError as exc:
        key = "mark_mask" if "mark_mask" in str(exc) else ""
        line = lines.keys.get(("guard", 0, key)) or lines.sections.get(("guard", 0))
        raise UciError(f"guard: {exc}", line) from None
    return doc


def uci_to_toml(text: str, *, defaults: Mapping[str, Any] = OPENWRT_DEFAULTS) -> str:
    """Convert `/etc/config/hushgate` (or `uci export hushgate`) text to the TOML config.
    Raises UciError (a ConfigError) naming the line on any problem."""
    doc = uci_to_dict(text, defaults=defaults)
    header = (
        "# Generated from /etc/config/hushgate by `hushgate config from-uci`.\n"
        "# Edit the UCI file (or use `uci set hushgate...`), not this one: it is rewritten on\n"
        "# every start of /etc/init.d/hushgate.\n"
    )
    return header + dumps_toml(doc)


def uci_to_config(text: str, *, defaults: Mapping[str, Any] = OPENWRT_DEFAULTS) -> GuardConfig:
    return parse_config(tomllib.loads(uci_to_toml(text, defaults=defaults)))


def uci_file_to_config(
    path: str | Path, *, defaults: Mapping[str, Any] = OPENWRT_DEFAULTS
) -> GuardConfig:
    """Read a UCI file and validate it into a GuardConfig; errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UciError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UciError(f"{path}: cannot read: {exc}") from None
    try:
        return uci_to_config(text, defaults=defaults)
    except UciError as exc:
        raise exc.with_source(str(path)) from None


# --------------------------------------------------------------------------- TOML output

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_str(value: str) -> str:
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML cannot hold {value!r} here")
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dumps_toml(doc: Mapping[str, Any]) -> str:
    """A small TOML writer for config documents: tables of scalars, lists and inline tables,
    and arrays of such tables. Round-trips through tomllib."""
    parts: list[str] = []
    for name, table in doc.items():
        if isinstance(table, Mapping):
            parts.append(f"[{_toml_key(name)}]")
            parts += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
            parts.append("")
        elif isinstance(table, list):
            for item in table:
                parts.append(f"[[{_toml_key(name)}]]")
                parts += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
                parts.append("")
        else:
            parts.append(f"{_toml_key(name)} = {_toml_value(table)}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- fw4 and files


def fw4_include(config: GuardConfig) -> str:
    """The nftables file fw4 includes on every start and reload (through
    /usr/share/nftables.d/ruleset-post/90-hushgate.nft, which includes /var/etc/hushgate/*.nft).

    It is the persistent part of `table inet hushgate` (sets, dispatch, fast path, safety net)
    as one idempotent transaction that keeps the dynamic chains a running guard filled: an fw4
    reload never duplicates a rule and never empties the queue chains. It holds no `queue`
    statement, so a kernel without kmod-nft-queue can never make fw4's whole ruleset fail."""
    from guard.shell.firewall import NftablesBackend
    from guard.shell.fwspec import nft_persistent_script, spec_from_config

    spec = spec_from_config(config)
    body = nft_persistent_script(NftablesBackend(spec))
    head = (
        "# hushgate: persistent rules, (re)loaded by fw4 with its own ruleset; written by\n"
        "# /etc/init.d/hushgate. Remove with `hushgate firewall remove` and by deleting this file.\n"
    )
    return head + body


def _write_atomic(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_openwrt_files(
    uci_path: str | Path,
    toml_path: str | Path,
    fw4_path: str | Path | None = None,
    *,
    defaults: Mapping[str, Any] = OPENWRT_DEFAULTS,
) -> GuardConfig:
    """What `hushgate config from-uci --input UCI --output TOML [--fw4-include NFT]` does for
    the init script: convert, validate, then write the TOML (mode 0600: it may hold the web
    password hash) and, when asked and the backend is nftables, the fw4 include, each replaced
    atomically. Nothing is written when the UCI file is invalid."""
    uci_path = Path(uci_path)
    try:
        text = uci_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UciError(f"{uci_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UciError(f"{uci_path}: cannot read: {exc}") from None
    try:
        toml_text = uci_to_toml(text, defaults=defaults)
    except UciError as exc:
        raise exc.with_source(str(uci_path)) from None
    config = parse_config(tomllib.loads(toml_text))
    include = None
    if fw4_path is not None and config.backend == "nftables":
        include = fw4_include(config)  # may raise ValueError (e.g. a mark mask of 2 bits)
    _write_atomic(Path(toml_path), toml_text, 0o600)
    if fw4_path is not None:
        fw4 = Path(fw4_path)
        if include is not None:
            _write_atomic(fw4, include, 0o644)
        else:  # the iptables backend: fw4 must not load a stale nftables table
            with contextlib.suppress(OSError):
                fw4.unlink()
    return config
