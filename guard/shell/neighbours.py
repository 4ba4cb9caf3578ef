"""The router's tables of LAN hosts: DHCP leases (dnsmasq, odhcpd) and the neighbour table
(`ip neigh`), parsed into sightings of (MAC, address, host name).

Rules of this module: every input is written by or about LAN hosts, so it is hostile:
unparsable lines are skipped, host names are reduced to a safe alphabet. Pure parsing, no IO:
the daemon (address-only devices' MACs) and `devices discover` read the files themselves.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass

# dnsmasq on OpenWrt, dnsmasq on Debian, odhcpd's leasefile on OpenWrt (`option leasefile`).
DEFAULT_LEASE_FILES = ("/tmp/dhcp.leases", "/var/lib/misc/dnsmasq.leases", "/tmp/hosts/odhcpd")



@dataclass(frozen=True, slots=True)
class Sighting:
    mac: str
    address: str | None
    hostname: str | None
    source: str


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
