"""Vendor rules: which host names, MAC blocks and address prefixes mean what.

Rules of this module: `rules/*.toml` are parsed once into an immutable `RuleSet`; matching is
pure and never raises on hostile input (a name or address that cannot match returns the default).
A broken rule file fails loudly with file and line (`RuleError`). Only `load_rules`, `check_dirs`
and `builtin_rules_dir` touch the file system.

File format (`schema = 1`)::

    schema = 1                 # required, the integer 1
    vendor = "amazon"          # optional, [a-z][a-z0-9-]*; required when the file has [[oui]]

    [[host]]                   # any number
    pattern = "avs-alexa-*.amazon.com"
    category = "voice"         # voice | messaging | smart-home | media | update | telemetry
                               # | connectivity | unknown (names the vendor, still inspected)
    source = "[cap] ..."       # required: where the fact comes from
                               # ([cap] [doc] [code] [issue] [inf], as in endpoints.md)

    [[oui]]                    # MAC blocks (IEEE MA-L, 24 bits) of the file's vendor
    prefix = "68:db:f5"        # three hex octets, ':' or '-', any case
    source = "..."

    [[address_hint]]           # prefixes of voice endpoints, for flows whose name is unknown
    cidr = "52.94.233.0/24"    # IPv4 no wider than /16, IPv6 no wider than /32, no host bits
    category = "voice"         # only "voice": a hint labels, it never allows nor blocks
    source = "..."

    [[device_kind]]            # what kind of device a host of the file's vendor is, by evidence
    kind = "phone"             # speaker | phone | tablet | e-reader | tv | router | computer
                               # | non-speaker (any kind but a speaker)
    hostname = "pixel-*"       # either: the host name it gives in DHCP (a glob: `*` is any
                               # run of characters; letters, digits, . _ - ; case-insensitive)
    dns = "play.googleapis.com"  # or: a name it looks up that speakers do not (a host pattern)
    source = "..."

    A file without `vendor` holds kinds for hosts of any vendor. `devices discover` and
    `analyze` use them to tell speakers from the vendors' other devices: a host name or a lookup
    that says "phone" is never proposed as a speaker. The most specific glob wins (more literal
    characters), and a vendor's own entry beats a vendor-less one.

No other keys are accepted. In one file, or in two files of one directory, an entry may appear
once (same normalised pattern, OUI or network). A later directory replaces the entries of an
earlier one with the same key and adds the others; the built-in directory comes first. A file
with any error contributes no entry: half a vendor's rules is worse than none.

Host patterns (names and patterns: ASCII, case-insensitive, one trailing dot ignored; labels of
`a-z 0-9 - _`; the last two labels of a pattern are literal):

- `api.amazon.com`: exactly that name.
- `*.example.com`: a leading label that is exactly `*` matches one or more whole labels, so any
  subdomain at any depth (`a.example.com`, `a.b.example.com`), never the apex `example.com`.
- `avs-alexa-*.amazon.com`, `alexa.*.gateway.devices.a2z.com`: any other `*` matches one or
  more characters inside one label; it never crosses a dot (`avs-alexa-4-na.amazon.com` matches,
  `avs-alexa-x.y.amazon.com` does not). `**` is refused.

When several patterns match, the most specific wins, deterministically: an exact pattern beats
every wildcard; then the longer literal suffix (the text after the last `*`); then more literal
characters in all; then the lexicographically smaller pattern.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any


class Category(str, Enum):
    """What a remote host does for a speaker; decides the default action (design.md section 6)."""

    VOICE = "voice"
    MESSAGING = "messaging"
    SMART_HOME = "smart-home"
    MEDIA = "media"
    UPDATE = "update"
    TELEMETRY = "telemetry"
    CONNECTIVITY = "connectivity"
    UNKNOWN = "unknown"


class RuleError(Exception):
    """A rule file that cannot be used, with the place to fix it.

    `line` is 1-based; 0 means the problem is the file or directory as a whole.
    """

    def __init__(self, file: str | Path, line: int, message: str) -> None:
        super().__init__(message)
        self.file = str(file)
        self.line = line
        self.message = message

    def __str__(self) -> str:
        if self.line > 0:
            return f"{self.file}:{self.line}: {self.message}"
        return f"{self.file}: {self.message}"

    def __repr__(self) -> str:
        return f"RuleError({self.file!r}, {self.line}, {self.message!r})"


@dataclass(frozen=True, slots=True)
class HostRule:
    """One `[[host]]` entry. `pattern` is normalised (lower case, no trailing dot)."""

    pattern: str
    category: Category
    source: str
    vendor: str | None = None
    file: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class OuiRule:
    """One `[[oui]]` entry. `prefix` is normalised to `aa:bb:cc`."""

    prefix: str
    vendor: str
    source: str
    file: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class AddressHint:
    """One `[[address_hint]]` entry. `cidr` is the network's canonical text."""

    cidr: str
    category: Category
    source: str
    vendor: str | None = None
    file: str = ""
    line: int = 0


class DeviceKind(str, Enum):
    """What a LAN host is, as far as the guard's proposals care."""

    SPEAKER = "speaker"
    PHONE = "phone"
    TABLET = "tablet"
    E_READER = "e-reader"
    TV = "tv"
    ROUTER = "router"
    COMPUTER = "computer"
    NON_SPEAKER = "non-speaker"


@dataclass(frozen=True, slots=True)
class DeviceKindRule:
    """One `[[device_kind]]` entry: `hostname` (a lower-case glob) or `dns` (a host pattern)."""

    kind: DeviceKind
    source: str
    hostname: str | None = None
    dns: str | None = None
    vendor: str | None = None
    file: str = ""
    line: int = 0

    @property
    def evidence(self) -> str:
        return f"host name {self.hostname}" if self.hostname else f"looks up {self.dns}"


_HOSTNAME_GLOB = re.compile(r"[a-z0-9_.*-]+")
_MAX_HOSTNAME_GLOB = 63


def normalize_hostname_glob(glob: str) -> str:
    """Check a `[[device_kind]] hostname` glob; return it lower-cased. ValueError says why."""
    if not isinstance(glob, str) or not glob:
        raise ValueError("empty hostname glob")
    norm = glob.lower()
    if not norm.isascii() or not _HOSTNAME_GLOB.fullmatch(norm):
        raise ValueError(f"hostname glob {glob!r} may hold only a-z 0-9 . _ - and *")
    if len(norm) > _MAX_HOSTNAME_GLOB:
        raise ValueError(f"hostname glob {glob!r} is longer than {_MAX_HOSTNAME_GLOB} characters")
    if len(norm.replace("*", "")) < 3:
        raise ValueError(f"hostname glob {glob!r} needs at least 3 literal characters")
    return norm


def _glob_regex(glob: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(piece) for piece in glob.split("*")))


# ---------------------------------------------------------------------------------------------
# Patterns

_MAX_NAME = 253  # RFC 1035 limit on a name's text form
_MAX_LABEL = 63
_NAME_CHARS = re.compile(r"[a-z0-9_.-]+")
_PATTERN_LABEL = re.compile(r"[a-z0-9_*-]+")
_LABEL_WILD = "[a-z0-9_-]+"  # what one `*` inside a label matches: never a dot


def normalize_name(name: str) -> str | None:
    """Lower-case a host name and drop one trailing dot; None if it cannot match any rule.

    Non-ASCII is refused rather than case-folded: `str.lower()` maps e.g. U+212A KELVIN SIGN to
    `k`, and a speaker-controlled name must not reach an allowed rule through such a mapping.
    """
    if not name or not name.isascii():
        return None
    name = name.lower()
    name = name.removesuffix(".")
    if not name or len(name) > _MAX_NAME or not _NAME_CHARS.fullmatch(name):
        return None
    return name


def normalize_pattern(pattern: str) -> str:
    """Check a host pattern and return its normal form; ValueError says what is wrong."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("empty host pattern")
    if not pattern.isascii():
        raise ValueError(f"host pattern {pattern!r} is not ASCII (use the IDNA xn-- form)")
    norm = pattern.lower()
    norm = norm.removesuffix(".")
    if len(norm) > _MAX_NAME:
        raise ValueError(f"host pattern {pattern!r} is longer than {_MAX_NAME} characters")
    labels = norm.split(".")
    if len(labels) < 2:
        raise ValueError(f"host pattern {pattern!r} needs at least two labels")
    for i, label in enumerate(labels):
        if not label:
            raise ValueError(f"host pattern {pattern!r} has an empty label")
        if len(label) > _MAX_LABEL:
            raise ValueError(f"host pattern {pattern!r} has a label over {_MAX_LABEL} characters")
        if not _PATTERN_LABEL.fullmatch(label):
            raise ValueError(
                f"host pattern {pattern!r}: label {label!r} may hold only a-z 0-9 - _ and *"
            )
        if "**" in label:
            raise ValueError(f"host pattern {pattern!r}: '**' is not allowed")
        # A wildcard in the registrable part (`*.com`, `amazon.*`) would match half the Internet.
        if "*" in label and i >= len(labels) - 2:
            raise ValueError(f"host pattern {pattern!r}: the last two labels must be literal")
    return norm


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A wildcard pattern ready to match. `anchor` is the literal labels right of the last `*`."""

    rule: HostRule
    anchor: str
    regex: re.Pattern[str] | None  # None: a pure `*.anchor` pattern, matched by suffix alone
    rank: tuple[int, int, str]  # smaller is more specific; see `_rank`


def _rank(pattern: str) -> tuple[int, int, str]:
    literal_suffix = len(pattern) - pattern.rfind("*") - 1
    literal_chars = len(pattern) - pattern.count("*")
    return (-literal_suffix, -literal_chars, pattern)


def _compile(rule: HostRule) -> _Compiled:
    labels = rule.pattern.split(".")
    last_wild = max(i for i, label in enumerate(labels) if "*" in label)
    anchor = ".".join(labels[last_wild + 1 :])
    if last_wild == 0 and labels[0] == "*":
        return _Compiled(rule, anchor, None, _rank(rule.pattern))
    parts: list[str] = []
    for i, label in enumerate(labels):
        if i == 0 and label == "*":
            parts.append(rf"(?:{_LABEL_WILD}\.)*{_LABEL_WILD}")
        else:
            parts.append(_LABEL_WILD.join(re.escape(piece) for piece in label.split("*")))
    return _Compiled(rule, anchor, re.compile(r"\.".join(parts)), _rank(rule.pattern))


def _proper_suffixes(name: str) -> Iterable[str]:
    """`a.b.c` yields `b.c`, `c`: longest first."""
    start = name.find(".")
    while start >= 0:
        yield name[start + 1 :]
        start = name.find(".", start + 1)


# ---------------------------------------------------------------------------------------------
# The rule set

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _empty() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RuleSet:
    """All rules, indexed for per-flow lookups. Build it with `load_rules` or directly."""

    hosts: tuple[HostRule, ...] = ()
    ouis: tuple[OuiRule, ...] = ()
    hints: tuple[AddressHint, ...] = ()
    kinds: tuple[DeviceKindRule, ...] = ()
    # Indexes built in __post_init__: exact names, wildcard buckets keyed by anchor, OUIs.
    _exact: Mapping[str, HostRule] = field(
        default_factory=_empty, init=False, repr=False, compare=False
    )
    _by_anchor: Mapping[str, tuple[_Compiled, ...]] = field(
        default_factory=_empty, init=False, repr=False, compare=False
    )
    _oui: Mapping[str, OuiRule] = field(
        default_factory=_empty, init=False, repr=False, compare=False
    )
    # (version, prefix length) -> network address as int -> hint; lengths longest first.
    _nets: tuple[tuple[int, int, Mapping[int, AddressHint]], ...] = field(
        default=(), init=False, repr=False, compare=False
    )
    # [[device_kind]] by hostname glob, most specific first; by looked-up name, as a RuleSet.
    _kind_globs: tuple[tuple[re.Pattern[str], DeviceKindRule], ...] = field(
        default=(), init=False, repr=False, compare=False
    )
    _kind_dns: Mapping[str, tuple[DeviceKindRule, ...]] = field(
        default_factory=_empty, init=False, repr=False, compare=False
    )
    _kind_dns_patterns: RuleSet | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        exact: dict[str, HostRule] = {}
        by_anchor: dict[str, list[_Compiled]] = {}
        # Rules built by hand (tests, callers) get the same normal form as loaded ones.
        normal_hosts: list[HostRule] = []
        for rule in self.hosts:
            pattern = normalize_pattern(rule.pattern)
            if pattern != rule.pattern:
                rule = dataclasses.replace(rule, pattern=pattern)
            normal_hosts.append(rule)
            if "*" in pattern:
                compiled = _compile(rule)
                by_anchor.setdefault(compiled.anchor, []).append(compiled)
            else:
                exact[pattern] = rule
        oui: dict[str, OuiRule] = {}
        normal_ouis: list[OuiRule] = []
        for o in self.ouis:
            if not _OUI.fullmatch(o.prefix):
                raise ValueError(f"bad OUI {o.prefix!r}")
            prefix = o.prefix.lower().replace("-", ":")
            if prefix != o.prefix:
                o = dataclasses.replace(o, prefix=prefix)
            normal_ouis.append(o)
            oui[prefix.replace(":", "")] = o
        nets: dict[tuple[int, int], dict[int, AddressHint]] = {}
        normal_hints: list[AddressHint] = []
        for hint in self.hints:
            net = ipaddress.ip_network(hint.cidr)  # strict: host bits set is a ValueError
            if str(net) != hint.cidr:
                hint = dataclasses.replace(hint, cidr=str(net))
            normal_hints.append(hint)
            nets.setdefault((net.version, net.prefixlen), {})[int(net.network_address)] = hint
        object.__setattr__(self, "hosts", tuple(normal_hosts))
        object.__setattr__(self, "ouis", tuple(normal_ouis))
        object.__setattr__(self, "hints", tuple(normal_hints))
        ordered = tuple(
            (version, plen, MappingProxyType(table))
            for (version, plen), table in sorted(nets.items(), key=lambda kv: -kv[0][1])
        )
        object.__setattr__(self, "_exact", MappingProxyType(exact))
        buckets = {k: tuple(sorted(v, key=lambda c: c.rank)) for k, v in by_anchor.items()}
        object.__setattr__(self, "_by_anchor", MappingProxyType(buckets))
        object.__setattr__(self, "_oui", MappingProxyType(oui))
        object.__setattr__(self, "_nets", ordered)
        normal_kinds: list[DeviceKindRule] = []
        globs: list[tuple[re.Pattern[str], DeviceKindRule]] = []
        by_dns: dict[str, list[DeviceKindRule]] = {}
        for k in self.kinds:
            if (k.hostname is None) == (k.dns is None):
                raise ValueError("a device kind needs exactly one of hostname, dns")
            if k.hostname is not None:
                k = dataclasses.replace(k, hostname=normalize_hostname_glob(k.hostname))
                assert k.hostname is not None
                globs.append((_glob_regex(k.hostname), k))
            else:
                assert k.dns is not None
                k = dataclasses.replace(k, dns=normalize_pattern(k.dns))
                assert k.dns is not None
                by_dns.setdefault(k.dns, []).append(k)
            normal_kinds.append(k)
        object.__setattr__(self, "kinds", tuple(normal_kinds))
        globs.sort(key=lambda g: (-len(g[1].hostname.replace("*", "")),  # type: ignore[union-attr]
                                  g[1].hostname))
        object.__setattr__(self, "_kind_globs", tuple(globs))
        object.__setattr__(self, "_kind_dns",
                           MappingProxyType({p: tuple(v) for p, v in by_dns.items()}))
        if by_dns:  # the looked-up names' patterns, matched as [[host]] patterns are
            object.__setattr__(self, "_kind_dns_patterns", RuleSet(
                hosts=tuple(HostRule(p, Category.UNKNOWN, "") for p in by_dns)))

    # -- host names --------------------------------------------------------------------------

    def match_host(self, name: str) -> HostRule | None:
        """The most specific rule for `name`, or None."""
        norm = normalize_name(name)
        if norm is None:
            return None
        rule = self._exact.get(norm)
        if rule is not None:
            return rule
        # Buckets are visited longest anchor first and each is sorted by rank, so the first match
        # is the most specific: a pattern anchored on a longer suffix always has the longer
        # literal suffix (its extra labels are literal where the other pattern has a wildcard).
        for suffix in _proper_suffixes(norm):
            for compiled in self._by_anchor.get(suffix, ()):
                if compiled.regex is None or compiled.regex.fullmatch(norm):
                    return compiled.rule
        return None

    def category_for_host(self, name: str) -> Category:
        rule = self.match_host(name)
        return rule.category if rule is not None else Category.UNKNOWN

    def vendor_for_host(self, name: str) -> str | None:
        rule = self.match_host(name)
        return rule.vendor if rule is not None else None

    # -- addresses ---------------------------------------------------------------------------

    def match_address(self, addr: str | _IPAddress) -> AddressHint | None:
        """The longest address hint covering `addr` (IPv4-mapped IPv6 counts as IPv4), or None."""
        if not self._nets:
            return None
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        value = int(ip)
        bits = ip.max_prefixlen
        for version, plen, table in self._nets:
            if version != ip.version:
                continue
            hint = table.get(value >> (bits - plen) << (bits - plen))
            if hint is not None:
                return hint
        return None

    def category_for_address(self, addr: str | _IPAddress) -> Category | None:
        """A hint for a flow whose name is unknown; never a reason to allow or block."""
        hint = self.match_address(addr)
        return hint.category if hint is not None else None

    # -- MAC addresses -----------------------------------------------------------------------

    def match_mac(self, mac: str) -> OuiRule | None:
        key = _oui_key(mac)
        return self._oui.get(key) if key is not None else None

    def vendor_for_mac(self, mac: str) -> str | None:
        """Vendor of a MAC (`68:db:f5:90:19:64`, `68-DB-F5-...`, `68dbf5...`), or None."""
        rule = self.match_mac(mac)
        return rule.vendor if rule is not None else None

    # -- device kinds ------------------------------------------------------------------------

    def kind_for_hostname(self, hostname: str | None, vendor: str | None) -> DeviceKindRule | None:
        """The `[[device_kind]]` a DHCP host name says, for a host of `vendor` (its own
        vendor's entries first, then vendor-less ones), or None. Never raises."""
        if not isinstance(hostname, str) or not hostname or len(hostname) > 255:
            return None
        name = hostname.lower()
        if not name.isascii():
            return None
        found = [k for rx, k in self._kind_globs
                 if k.vendor in (vendor, None) and rx.fullmatch(name)]
        own = [k for k in found if k.vendor is not None]
        return (own or found or [None])[0]

    def kind_for_lookups(self, names: Iterable[str], vendor: str | None) -> DeviceKindRule | None:
        """The `[[device_kind]]` that names a host looked up say (the first by name), or None."""
        patterns = self._kind_dns_patterns
        if patterns is None:
            return None
        for name in sorted(set(names)):
            if not isinstance(name, str):
                continue
            rule = patterns.match_host(name)
            if rule is None:
                continue
            for k in self._kind_dns[rule.pattern]:
                if k.vendor in (vendor, None):
                    return k
        return None

    @property
    def vendors(self) -> frozenset[str]:
        found = {r.vendor for r in self.hosts if r.vendor is not None}
        found.update(o.vendor for o in self.ouis)
        found.update(h.vendor for h in self.hints if h.vendor is not None)
        return frozenset(found)


_HEX = frozenset("0123456789abcdef")


def _oui_key(mac: str) -> str | None:
    """Six lower-case hex digits of a MAC or an OUI, any of ':' '-' '.' separators; else None."""
    if not isinstance(mac, str):
        return None
    digits = mac.strip().lower().replace(":", "").replace("-", "").replace(".", "")
    if len(digits) not in (6, 12) or not set(digits) <= _HEX:
        return None
    return digits[:6]


# ---------------------------------------------------------------------------------------------
# Loading

SCHEMA = 1
_TOP_KEYS = ("schema", "vendor", "host", "oui", "address_hint", "device_kind")
_ENTRY_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "host": ("pattern", "category", "source"),
        "oui": ("prefix", "source"),
        "address_hint": ("cidr", "category", "source"),
        "device_kind": ("kind", "source"),  # and one of: hostname, dns
    }
)
_VENDOR = re.compile(r"[a-z][a-z0-9-]*")
_OUI = re.compile(r"[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}\1[0-9a-fA-F]{2}")
_HINT_CATEGORIES = frozenset({Category.VOICE})
_MIN_HINT_PREFIX = {4: 16, 6: 32}  # wider is a mistake: 17.0.0.0/8 is every Apple service
_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")


def builtin_rules_dir() -> Path:
    """The rules shipped with the package, wherever the command runs.

    An installed wheel has them at `guard/rules/` (pyproject force-includes the repo's `rules/`);
    a source checkout or editable install has them at `<repo>/rules` next to `guard/`.
    """
    package = Path(__file__).resolve().parents[1]  # guard/
    candidates = (package / "rules", package.parent / "rules")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise RuleError(candidates[0], 0, f"built-in rules not found (nor at {candidates[1]})")


def load_rules(dirs: Sequence[Path | str] = (), *, builtin: bool = True) -> RuleSet:
    """Load the built-in rules (unless `builtin=False`), then each of `dirs` on top.

    Raises the first `RuleError` found; `check_dirs` reports them all.
    """
    ruleset, errors = _load(dirs, builtin)
    if errors:
        raise errors[0]
    return ruleset


def check_dirs(dirs: Sequence[Path | str] = (), *, builtin: bool = True) -> list[RuleError]:
    """Every error in the built-in rules (unless `builtin=False`) and in `dirs`, in file order."""
    return _load(dirs, builtin)[1]


def _load(dirs: Sequence[Path | str], builtin: bool) -> tuple[RuleSet, list[RuleError]]:
    errors: list[RuleError] = []
    roots: list[Path] = []
    if builtin:
        try:
            roots.append(builtin_rules_dir())
        except RuleError as err:
            errors.append(err)
    roots.extend(Path(d) for d in dirs)
    hosts: dict[str, HostRule] = {}
    ouis: dict[str, OuiRule] = {}
    hints: dict[str, AddressHint] = {}
    kinds: dict[str, DeviceKindRule] = {}
    for root in roots:
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = sorted(p for p in root.glob("*.toml") if not p.name.startswith("."))
        else:
            errors.append(RuleError(root, 0, "no such rules directory"))
            continue
        # Keys seen in this directory: a second definition here is a mistake, not an override.
        seen: dict[tuple[str, str], str] = {}
        layer_hosts: dict[str, HostRule] = {}
        layer_ouis: dict[str, OuiRule] = {}
        layer_hints: dict[str, AddressHint] = {}
        layer_kinds: dict[str, DeviceKindRule] = {}
        for path in files:
            parsed = _parse_file(path, errors)
            if parsed is None:
                continue
            for kind, key, entry in parsed:
                where = f"{entry.file}:{entry.line}"
                first = seen.get((kind, key))
                if first is not None:
                    message = f"duplicate {kind} {key!r} (first at {first})"
                    errors.append(RuleError(entry.file, entry.line, message))
                    continue
                seen[(kind, key)] = where
                if isinstance(entry, HostRule):
                    layer_hosts[key] = entry
                elif isinstance(entry, OuiRule):
                    layer_ouis[key] = entry
                elif isinstance(entry, DeviceKindRule):
                    layer_kinds[key] = entry
                else:
                    layer_hints[key] = entry
        hosts.update(layer_hosts)
        ouis.update(layer_ouis)
        hints.update(layer_hints)
        kinds.update(layer_kinds)
    errors.sort(key=lambda e: (e.file, e.line))
    ruleset = RuleSet(
        hosts=tuple(hosts.values()), ouis=tuple(ouis.values()), hints=tuple(hints.values()),
        kinds=tuple(kinds.values()),
    )
    return ruleset, errors


_Entry = HostRule | OuiRule | AddressHint | DeviceKindRule


def _parse_file(path: Path, errors: list[RuleError]) -> list[tuple[str, str, _Entry]] | None:
    """Parse one file; append its errors; return its valid entries as (kind, key, entry)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        errors.append(RuleError(path, 0, f"cannot read: {err.strerror or err}"))
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        errors.append(RuleError(path, line, "not UTF-8"))
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        errors.append(_toml_error(path, text, err))
        return None
    except RecursionError:
        errors.append(RuleError(path, 1, "values nested too deeply"))
        return None
    locator = _Locator(text)
    file = str(path)
    before = len(errors)

    def fail(line: int, message: str) -> None:
        errors.append(RuleError(file, line, message))

    for key in data:
        if key not in _TOP_KEYS:
            expected = ", ".join(_TOP_KEYS)
            fail(locator.top_key(key), f"unknown key {key!r} (expected one of {expected})")
    schema = data.get("schema")
    if "schema" not in data:
        fail(1, f"missing 'schema = {SCHEMA}'")
    elif type(schema) is not int or schema != SCHEMA:
        fail(locator.top_key("schema"), f"unsupported schema {schema!r} (expected {SCHEMA})")
    vendor = data.get("vendor")
    if vendor is not None and (not isinstance(vendor, str) or not _VENDOR.fullmatch(vendor)):
        message = f"vendor must be a lower-case name like 'amazon', not {vendor!r}"
        fail(locator.top_key("vendor"), message)
        vendor = None
    elif "oui" in data and vendor is None:
        fail(locator.top_key("oui") or 1, "[[oui]] entries need a top-level 'vendor'")

    entries: list[tuple[str, str, _Entry]] = []
    keys_in_file: dict[tuple[str, str], int] = {}
    for kind in ("host", "oui", "address_hint", "device_kind"):
        if kind not in data:
            continue
        items = data[kind]
        if not isinstance(items, list):
            fail(locator.top_key(kind), f"{kind!r} must be an array of tables ([[{kind}]])")
            continue
        for index, item in enumerate(items):
            line = locator.entry(kind, index)
            if not isinstance(item, dict):
                fail(line, f"[[{kind}]] entry must be a table")
                continue
            parsed = _parse_entry(kind, item, vendor, file, line, locator, index, fail)
            if parsed is None:
                continue
            key, entry = parsed
            first = keys_in_file.get((kind, key))
            if first is not None:
                fail(line, f"duplicate {kind} {key!r} (first at line {first})")
                continue
            keys_in_file[(kind, key)] = line
            entries.append((kind, key, entry))
    if len(errors) > before:
        # A file with errors contributes nothing: half a vendor's rules is worse than none.
        return None
    return entries


def _parse_entry(
    kind: str,
    item: dict[str, Any],
    vendor: str | None,
    file: str,
    line: int,
    locator: _Locator,
    index: int,
    fail: Callable[[int, str], None],
) -> tuple[str, _Entry] | None:
    ok = True
    allowed = _ENTRY_KEYS[kind]

    def at(key: str) -> int:
        return locator.entry_key(kind, index, key) or line

    if kind == "device_kind":
        return _parse_device_kind(item, vendor, file, line, at, fail)

    for key in item:
        if key not in allowed:
            fail(at(key), f"unknown key {key!r} in [[{kind}]] (expected {', '.join(allowed)})")
            ok = False
    for key in allowed:
        if key not in item:
            fail(line, f"[[{kind}]] entry has no {key!r}")
            ok = False
        elif not isinstance(item[key], str):
            fail(at(key), f"{key!r} must be a string, not {type(item[key]).__name__}")
            ok = False
    if not ok:
        return None
    source = item["source"]
    if not source.strip():
        fail(at("source"), "empty 'source': say where the fact comes from")
        ok = False
    category: Category | None = None
    if "category" in allowed:
        try:
            category = Category(item["category"])
        except ValueError:
            fail(
                at("category"),
                f"unknown category {item['category']!r} "
                f"(expected one of {', '.join(c.value for c in Category)})",
            )
            ok = False

    if kind == "host":
        try:
            pattern = normalize_pattern(item["pattern"])
        except ValueError as err:
            fail(at("pattern"), str(err))
            return None
        if not ok or category is None:
            return None
        return pattern, HostRule(pattern, category, source, vendor, file, line)

    if kind == "oui":
        prefix = item["prefix"]
        if not _OUI.fullmatch(prefix):
            fail(at("prefix"), f'bad OUI {prefix!r} (expected three hex octets like "68:db:f5")')
            return None
        if not ok or vendor is None:
            return None
        norm = prefix.lower().replace("-", ":")
        return norm, OuiRule(norm, vendor, source, file, line)

    cidr = item["cidr"]
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as err:
        fail(at("cidr"), f"bad CIDR {cidr!r}: {err}")
        return None
    if net.prefixlen < _MIN_HINT_PREFIX[net.version]:
        fail(
            at("cidr"),
            f"CIDR {cidr!r} is too wide for a hint (at most /{_MIN_HINT_PREFIX[net.version]})",
        )
        ok = False
    if category is not None and category not in _HINT_CATEGORIES:
        fail(
            at("category"),
            f"address hints may only say 'voice', not {category.value!r}: "
            "an address never allows or blocks a flow",
        )
        ok = False
    if not ok or category is None:
        return None
    return str(net), AddressHint(str(net), category, source, vendor, file, line)


_KIND_EVIDENCE = ("hostname", "dns")


def _parse_device_kind(
    item: dict[str, Any],
    vendor: str | None,
    file: str,
    line: int,
    at: Callable[[str], int],
    fail: Callable[[int, str], None],
) -> tuple[str, DeviceKindRule] | None:
    allowed = ("kind", *_KIND_EVIDENCE, "source")
    ok = True
    for key in item:
        if key not in allowed:
            fail(at(key), f"unknown key {key!r} in [[device_kind]] (expected {', '.join(allowed)})")
            ok = False
    for key in allowed:
        if key in item and not isinstance(item[key], str):
            fail(at(key), f"{key!r} must be a string, not {type(item[key]).__name__}")
            ok = False
    for key in ("kind", "source"):
        if key not in item:
            fail(line, f"[[device_kind]] entry has no {key!r}")
            ok = False
    evidence = [key for key in _KIND_EVIDENCE if key in item]
    if len(evidence) != 1:
        fail(line, "[[device_kind]] entry needs exactly one of 'hostname', 'dns' "
                   f"(has {', '.join(map(repr, evidence)) or 'neither'})")
        ok = False
    if not ok:
        return None
    if not item["source"].strip():
        fail(at("source"), "empty 'source': say where the fact comes from")
        ok = False
    try:
        kind = DeviceKind(item["kind"])
    except ValueError:
        fail(at("kind"), f"unknown kind {item['kind']!r} "
                         f"(expected one of {', '.join(k.value for k in DeviceKind)})")
        return None
    (field_name,) = evidence
    try:
        if field_name == "hostname":
            value = normalize_hostname_glob(item["hostname"])
        else:
            value = normalize_pattern(item["dns"])
    except ValueError as err:
        fail(at(field_name), str(err))
        return None
    if not ok:
        return None
    rule = DeviceKindRule(kind, item["source"], vendor=vendor, file=file, line=line,
                          **{field_name: value})
    return f"{field_name} {value}", rule


def _toml_error(path: Path, text: str, err: tomllib.TOMLDecodeError) -> RuleError:
    message = str(err)
    match = _TOML_POS.search(message)
    if match:
        line = int(match.group(1))
        message = f"{message[: match.start()]} (column {match.group(2)})"
    elif _TOML_END.search(message):
        line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
        message = _TOML_END.sub("", message) + " (at end of file)"
    else:
        line = 0
    return RuleError(path, line, f"TOML syntax: {message}")


class _Locator:
    """Finds the line of a top-level key, of the i-th `[[kind]]` table, or of a key inside it.

    tomllib keeps no positions, so this scans the text: table headers and `key =` lines, skipping
    comments and multi-line strings. Entries written as inline arrays have no header; their
    errors point at the `kind = [` line.
    """

    _HEADER = re.compile(r"\s*\[\[\s*([A-Za-z0-9_-]+)\s*\]\]\s*(?:#.*)?$")
    _TABLE = re.compile(r"\s*\[")
    _KEY = re.compile(r"\s*[\"']?([A-Za-z0-9_-]+)[\"']?\s*=")

    def __init__(self, text: str) -> None:
        self._top: dict[str, int] = {}
        self._entries: dict[str, list[tuple[int, dict[str, int]]]] = {}
        current: dict[str, int] | None = self._top
        in_string: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_string is not None:
                if line.count(in_string) % 2 == 1:
                    in_string = None
                continue
            header = self._HEADER.match(line)
            if header:
                keys: dict[str, int] = {}
                self._entries.setdefault(header.group(1), []).append((number, keys))
                current = keys
            elif self._TABLE.match(line):
                current = None  # some other table: its keys are not ours
            else:
                key = self._KEY.match(line)
                if key and current is not None:
                    current.setdefault(key.group(1), number)
            for quote in ('"""', "'''"):
                if line.count(quote) % 2 == 1:
                    in_string = quote
                    break

    def top_key(self, key: str) -> int:
        if key in self._top:
            return self._top[key]
        entries = self._entries.get(key)
        return entries[0][0] if entries else 0

    def entry(self, kind: str, index: int) -> int:
        entries = self._entries.get(kind, [])
        if index < len(entries):
            return entries[index][0]
        return self._top.get(kind, 1)

    def entry_key(self, kind: str, index: int, key: str) -> int:
        entries = self._entries.get(kind, [])
        if index < len(entries):
            return entries[index][1].get(key, 0)
        return 0
