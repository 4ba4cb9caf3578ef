"""`hushgate devices discover`: speakers on the LAN, from DHCP leases and the neighbour table.

Rules of this module: every input (lease files, `ip neigh`) is written by or about LAN hosts, so
it is hostile: unparsable lines are skipped, host names are reduced to a safe alphabet before
they become config names or TOML comments. Parsing is pure; only `read_sources` does IO.

A MAC block names the maker, not the product: Google's blocks hold Pixel phones and Google Wifi
routers, Amazon's hold Kindles, Apple's iPhones. So each host of a speaker vendor gets a kind from
the rules' `[[device_kind]]` entries (the DHCP host name it gave): a speaker, a known non-speaker
(phone, tablet, e-reader, TV, router, computer: listed, never proposed) or unknown (proposed as a
possible speaker). Every proposal starts in `mode = "monitor"` (uploads logged, never held), as
the README says: switch a device to strict once `hushgate log` shows what it does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guard.core.ruleset import DeviceKindRule
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
    "report",
    "toml_snippet",
]

# A host of a speaker vendor whose kind no rule names: proposed, as a possible speaker.
UNKNOWN = "unknown"
PROPOSED_KINDS = ("speaker", UNKNOWN)

@dataclass(frozen=True, slots=True)
class Found:
    name: str  # a suggested config name, safe for [[device]] name
    mac: str
    vendor: str
    addresses: tuple[str, ...]
    hostname: str | None  # as the lease said, reduced to printable ASCII
    sources: tuple[str, ...]
    kind: str = UNKNOWN  # a DeviceKind value, or "unknown"
    evidence: str | None = None  # why: "host name pixel* (rules/google.toml:400)"

    @property
    def proposed(self) -> bool:
        """Whether it is offered as a [[device]]: a speaker, or possibly one."""
        return self.kind in PROPOSED_KINDS

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "mac": self.mac, "vendor": self.vendor,
                "addresses": list(self.addresses), "hostname": self.hostname,
                "sources": list(self.sources), "kind": self.kind, "evidence": self.evidence,
                "proposed": self.proposed}


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


def _where(rule: DeviceKindRule) -> str:
    name = Path(rule.file).name if rule.file else "rules"
    return f"{rule.evidence} ({name}:{rule.line})" if rule.line else rule.evidence


def find_speakers(
    sightings: Iterable[Sighting],
    vendor_for_mac: Callable[[str], str | None],
    kind_for_hostname: Callable[[str | None, str | None], DeviceKindRule | None] | None = None,
) -> list[Found]:
    """Hosts whose MAC belongs to a vendor of the rules, one per MAC, in MAC order, each with
    its kind (`kind_for_hostname`: `RuleSet.kind_for_hostname`; without it every host's kind
    is unknown). Non-speakers are returned too: callers show them and propose only
    `Found.proposed` ones."""
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
        kind, evidence = UNKNOWN, None
        if kind_for_hostname is not None:
            for name in dict.fromkeys(s.hostname for s in seen if s.hostname):
                rule = kind_for_hostname(name, vendor)
                if rule is not None:
                    kind, evidence = rule.kind.value, _where(rule)
                    break
        found.append(Found(_suggest(hostname, vendor, mac, taken), mac, vendor, addresses,
                           hostname, sources, kind, evidence))
    return found


def _safe(text: object, cap: int = 64) -> str:
    """Printable ASCII only, capped: lease names are written by LAN hosts."""
    value = "".join(c if " " <= c <= "~" else "?" for c in str(text))
    return value if len(value) <= cap else value[: cap - 3] + "..."


def toml_snippet(found: Sequence[Found]) -> str:
    """Ready-to-paste [[device]] tables for the proposed hosts (speakers and possible ones), in
    monitor mode. Names and comments hold only safe characters."""
    blocks = []
    for f in found:
        if not f.proposed:
            continue
        seen = ", ".join(f.addresses) or "no address"
        label = f" as {_NAME_BAD.sub('-', f.hostname)}" if f.hostname else ""
        what = "speaker" if f.kind == "speaker" else "possibly a speaker (no rule names its kind)"
        blocks.append(
            f"[[device]]\n"
            f"# {f.vendor} {what}, seen{label} at {seen}\n"
            f'name = "{f.name}"\n'
            f'mac = "{f.mac}"\n'
            f'mode = "monitor"  # then "strict" once `hushgate log` shows what it sends\n'
        )
    return "\n".join(blocks)


def report(found: Sequence[Found], read: Sequence[str], hosts: int) -> str:
    """What `hushgate devices discover` prints: the hosts of speaker vendors with their kinds,
    the non-speakers left out and why, then the [[device]] tables to paste."""
    where = ", ".join(_safe(r, 60) for r in read) or "nothing (no lease file, no neighbours)"
    if not found:
        return f"no speakers among {hosts} hosts in {where}\n"
    proposed = [f for f in found if f.proposed]
    speakers = sum(1 for f in proposed if f.kind == "speaker")
    lines = [f"{len(found)} host(s) of speaker vendors in {where}: {speakers} speaker(s), "
             f"{len(proposed) - speakers} possible speaker(s), "
             f"{len(found) - len(proposed)} other device(s) (not proposed)", ""]
    headers = ["MAC", "VENDOR", "KIND", "ADDRESS", "HOSTNAME", "WHY"]
    rows = [[f.mac, f.vendor, f.kind if f.proposed else f"{f.kind} (not a speaker)",
             _safe(", ".join(f.addresses) or "-", 40), _safe(f.hostname or "-", 32),
             f.evidence or "no rule names this host's kind"] for f in found]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
              for row in [headers, *rows]]
    lines.append("")
    lines.append("KIND: what the host is, from its DHCP host name and the rules' [[device_kind]]")
    lines.append("      entries (WHY names the entry); unknown: a speaker vendor's host no rule")
    lines.append("      names, proposed as a possible speaker. Phones, tablets, e-readers, TVs,")
    lines.append("      routers and computers are listed but never proposed.")
    if not proposed:
        lines.append("")
        lines.append("no speakers to propose: every host above is another kind of device")
        return "\n".join(lines) + "\n"
    lines.append("")
    lines.append('# Paste into the config. Each device starts in mode = "monitor": its uploads are')
    lines.append("# logged (`hushgate log`), never held; switch it to strict (or followups) once the")
    lines.append("# log shows what it sends. Remove any host that is not a speaker.")
    lines.append("")
    return "\n".join(lines) + "\n" + toml_snippet(found)
