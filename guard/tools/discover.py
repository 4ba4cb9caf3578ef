"""`hushgate devices discover`: speakers on the LAN, from DHCP leases and the neighbour table.

Rules of this module: every input (lease files, `ip neigh`) is written by or about LAN hosts, so
it is hostile: unparsable lines are skipped, host names are reduced to a safe alphabet before
they become config names or TOML comments. Parsing is pure; only `read_sources` does IO.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guard.shell.firewall import Runner, run_command
from guard.shell.neighbours import (
    DEFAULT_LEASE_FILES,
    Sighting,
    parse_dnsmasq,
    parse_leases,
    parse_neigh,
    parse_odhcpd,
)

_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")

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
