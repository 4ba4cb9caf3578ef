"""`hushgate devices discover`: speakers on the LAN, from DHCP leases and the neighbour table.

Rules of this module: every input (lease files, `ip neigh`) is written by or about LAN hosts, so
it is hostile: unparsable lines are skipped, host names are reduced to a safe alphabet before
they become config names or TOML comments. Parsing is pure; only `read_sources` does IO.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guard.firewall import Runner, run_command

__all__ = [
    "DEFAULT_LEASE_FILES",
    "Found",
    "Sighting",
    "find_speakers",
    "parse_dnsmasq",
    "parse_leases",
    "parse_neigh",
    "parse_odhcpd",
    "read_sources",
    "toml_snippet",
]

# dnsmasq on OpenWrt, dnsmasq on Debian, odhcpd's leasefile on OpenWrt (`option leasefile`).
DEFAULT_LEASE_FILES = ("/tmp/dhcp.leases", "/var/lib/misc/dnsmasq.leases", "/tmp/hosts/odhcpd")

_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True, slots=True)
class Sighting:
    mac: str
    address: str | None
    hostname: str | None
    source: str


@dataclass(frozen=True, slots=True)
class Found:
    name: str  # a suggested config name, safe for [[device]] name
    mac: str
    vendor: str
    addresses: tuple[str, ...]
    hostname: str | None  # as the lease said, reduced to printable ASCII
    sources: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "mac": self.mac, "vendor": self.vendor,
                "addresses": list(self.addresses), "hostname": self.hostname,
                "sources": list(self.sources)}


def normalize_mac(text: str) -> str | None:
    """`68:db:f5:90:19:64`, `68-DB-F5-...`, ether_ntoa's `68:db:f5:9:19:64`, or 12 hex digits."""
    text = text.strip().lower()
    if re.fullmatch(r"[0-9a-f]{12}", text):
        return ":".join(text[i : i + 2] for i in range(0, 12, 2))
    parts = re.split(r"[:-]", text)
    if len(parts) == 6 and all(re.fullmatch(r"[0-9a-f]{1,2}", p) for p in parts):
        return ":".join(p.zfill(2) for p in parts)
    return None


def mac_from_duid(duid: str) -> str | None:
    """The MAC inside a DUID-LLT (type 1) or DUID-LL (type 3) of hardware type Ethernet."""
    hexd = duid.strip().lower().replace(":", "")
    if not re.fullmatch(r"[0-9a-f]+", hexd):
        return None
    if hexd.startswith("00010001") and len(hexd) == 28:
        return normalize_mac(hexd[16:])
    if hexd.startswith("00030001") and len(hexd) == 20:
        return normalize_mac(hexd[8:])
    return None


def _address(text: str | None) -> str | None:
    try:
        return str(ipaddress.ip_address((text or "").split("%")[0]))
    except ValueError:
        return None


def _hostname(text: str) -> str | None:
    if text in ("", "*", "-"):
        return None
    clean = "".join(c if 0x20 < ord(c) < 0x7F else "?" for c in text)[:63]
    return clean or None


def parse_dnsmasq(text: str, source: str) -> list[Sighting]:
    """dnsmasq's lease file: `EXPIRY MAC ADDR HOSTNAME CLIENTID`; IPv6 leases (after a `duid`
    line) are `EXPIRY IAID ADDR HOSTNAME DUID`, whose DUID may carry the MAC."""
    out: list[Sighting] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0] == "duid":
            continue
        mac = normalize_mac(fields[1])
        if mac is None and len(fields) >= 5:
            mac = mac_from_duid(fields[4])
        if mac is not None:
            out.append(Sighting(mac, _address(fields[2]), _hostname(fields[3]), source))
    return out


def parse_odhcpd(text: str, source: str) -> list[Sighting]:
    """odhcpd's leasefile: `# IFACE HWADDR ipv4 HOSTNAME VALID HEXADDR 32 ADDR/32` for DHCPv4,
    `# IFACE DUID IAID HOSTNAME VALID ASSIGNED LENGTH ADDR/LEN...` for DHCPv6."""
    out: list[Sighting] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8 or fields[0] != "#":
            continue
        if fields[3] == "ipv4":
            mac = normalize_mac(fields[2])
            hostname = fields[4]
        else:
            mac = mac_from_duid(fields[2])
            hostname = fields[4]
        if mac is None:
            continue
        hostname = hostname.removeprefix("broken\\x20")
        addresses = [f.split("/")[0] for f in fields[8:]] or [None]
        for address in addresses:
            out.append(Sighting(mac, _address(address), _hostname(hostname), source))
    return out


def parse_leases(text: str, source: str) -> list[Sighting]:
    """Either lease format, told apart by odhcpd's leading `# `."""
    if any(line.startswith("# ") for line in text.splitlines()[:5]):
        return parse_odhcpd(text, source)
    return parse_dnsmasq(text, source)


def parse_neigh(text: str, source: str = "ip neigh") -> list[Sighting]:
    """`ip -j neigh` (JSON) or plain `ip neigh` output."""
    out: list[Sighting] = []
    try:
        entries = json.loads(text)
    except ValueError:
        entries = None
    if isinstance(entries, list):
        for e in entries:
            if not isinstance(e, dict) or "FAILED" in (e.get("state") or []):
                continue
            mac = normalize_mac(str(e.get("lladdr", "")))
            if mac is not None:
                out.append(Sighting(mac, _address(str(e.get("dst") or "")), None, source))
        return out
    for line in text.splitlines():
        m = re.match(r"^(\S+) .*\blladdr (\S+)", line)
        if m and "FAILED" not in line:
            mac = normalize_mac(m.group(2))
            if mac is not None:
                out.append(Sighting(mac, _address(m.group(1)), None, source))
    return out


def read_sources(
    lease_files: Sequence[str], neigh: bool = True, run: Runner = run_command
) -> tuple[list[Sighting], list[str]]:
    """Sightings from the lease files that exist and the neighbour table; and what was read.
    Raises OSError for a named lease file that cannot be read."""
    explicit = bool(lease_files)
    sightings: list[Sighting] = []
    read: list[str] = []
    for name in lease_files or DEFAULT_LEASE_FILES:
        path = Path(name)
        if not explicit and not path.is_file():
            continue
        sightings += parse_leases(path.read_text(encoding="utf-8", errors="replace"), str(path))
        read.append(str(path))
    if neigh:
        res = run(["ip", "-j", "neigh", "show"], None)
        if not res.ok:
            res = run(["ip", "neigh", "show"], None)  # busybox ip has no -j
        if res.ok:
            sightings += parse_neigh(res.stdout)
            read.append("ip neigh")
    return sightings, read


def _suggest(hostname: str | None, vendor: str, mac: str, taken: set[str]) -> str:
    base = _NAME_BAD.sub("-", hostname or "").strip("-._")[:48]
    if not base or not base[0].isalnum():
        base = f"{vendor}-{mac.replace(':', '')[6:]}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def find_speakers(
    sightings: Iterable[Sighting], vendor_for_mac: Callable[[str], str | None]
) -> list[Found]:
    """Hosts whose MAC belongs to a vendor of the rules, one per MAC, in MAC order."""
    by_mac: dict[str, list[Sighting]] = {}
    for s in sightings:
        by_mac.setdefault(s.mac, []).append(s)
    taken: set[str] = set()
    found: list[Found] = []
    for mac in sorted(by_mac):
        vendor = vendor_for_mac(mac)
        if vendor is None:
            continue
        seen = by_mac[mac]
        addresses = tuple(dict.fromkeys(s.address for s in seen if s.address))
        hostname = next((s.hostname for s in seen if s.hostname), None)
        sources = tuple(dict.fromkeys(s.source for s in seen))
        found.append(Found(_suggest(hostname, vendor, mac, taken), mac, vendor, addresses,
                           hostname, sources))
    return found


def toml_snippet(found: Sequence[Found]) -> str:
    """Ready-to-paste [[device]] tables. Names and comments hold only safe characters."""
    blocks = []
    for f in found:
        seen = ", ".join(f.addresses) or "no address"
        label = f" as {f.hostname}" if f.hostname else ""
        blocks.append(
            f"[[device]]\n"
            f"# {f.vendor}, seen{label} at {seen}\n"
            f'name = "{f.name}"\n'
            f'mac = "{f.mac}"\n'
            f'mode = "strict"\n'
        )
    return "\n".join(blocks)
