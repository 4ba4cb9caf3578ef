"""`hushgate analyze`: the very same engine, run over a capture on the capture's own clock.

Rules of this module: the engine is driven exactly as the daemon drives it (receive, timers,
actions); the only difference is that nobody answers prompts, so a held upload expires when its
traffic ends (`expire_on_idle`) and what follows on its flow is inspected as the speaker's
reconnection would be. A guarded device's TCP is what the live relay would see (design.md 5):
each connection is put back in order (`StreamAssembler`: retransmissions dropped, picked up
mid-stream when it predates the capture) and cut into TLS records by the relay's own framer, fed
to the engine's stream path with no window limit; segment sizes stand in for records where the
payload does not parse (shape-only traces). UDP (QUIC) is judged as `quic = "hold"` would, the
packet hold. The result is the JSON object of the contract in design.md section 8.

What the live guard would never see is not reported as held: LAN-to-LAN traffic (both ends
private or link-local) is bridged on the LAN and never crosses the router's forward hook, and
monitor mode holds nothing (it logs). A capture cut short is read up to the cut and said so
(`warnings`). Found speakers exclude the vendors' other devices: a MAC that forwards Internet
traffic or answers DNS is a router, and `[[device_kind]]` rules name phones and the like by the
names they look up (`other_devices`).
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import click

from guard.core.config import DeviceConfig, GuardConfig, normalize_mac
from guard.core.engine import BurstReleased, Engine, Upload, UploadHeld, UploadSeen, Verdict
from guard.core.packet import ACK, FIN, RST, SYN, TCP, Malformed, Packet
from guard.core.policy import Mode
from guard.core.records import CapturedStream
from guard.core.ruleset import Category, RuleSet, load_rules
from guard.core.sni import NeedMore, client_hello_sni
from guard.tools.capture import read_capture

# A MAC that sends from more distinct addresses than this is a router forwarding the Internet's
# traffic (the Google Wifi gateway in the shared captures has a Google OUI), not a speaker.
ROUTER_ADDRESSES = 8


def _is_mac(text: str) -> bool:
    try:
        normalize_mac(text)
        return True
    except Exception:
        return False


class DeviceError(click.ClickException):
    """A `--device` that cannot be analyzed: a usage error (exit 2), said in one line."""

    exit_code = 2

    def show(self, file: TextIO | None = None) -> None:
        click.echo(f"hushgate: {self.format_message()}", err=True, file=file)


def device_configs(specs: list[str], mode: Mode) -> list[DeviceConfig]:
    """`--device` values (addresses or MACs) as device configs named after themselves.
    Raises DeviceError for a value that is neither."""
    devices = []
    for spec in specs:
        if _is_mac(spec):
            devices.append(DeviceConfig(name=normalize_mac(spec), mac=normalize_mac(spec),
                                        mode=mode))
        else:
            try:
                address = str(ipaddress.ip_address(spec))
            except ValueError:
                raise DeviceError(f"--device {_printable(spec)!r}: not an IP or MAC address"
                                  ) from None
            devices.append(DeviceConfig(name=address, address=address, mode=mode))
    return devices


def discover(packets: list[tuple[float, Packet | Malformed | None]], rules: RuleSet,
             others: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Find speakers in a capture: vendor OUIs (not routers, not the vendors' other devices),
    and hosts that ask for or connect to vendor voice hosts. The vendors' hosts that are not
    speakers go to `others` (address, mac, vendor, kind, evidence)."""
    addrs_by_mac: dict[str, set[str]] = defaultdict(set)
    forwards: set[str] = set()  # MACs that sent packets from Internet addresses: routers
    dns_servers: set[str] = set()  # LAN addresses that answered DNS: the gateway/resolver
    looked_up: dict[str, set[str]] = defaultdict(set)  # LAN address -> names it resolved
    voice_clients: Counter[str] = Counter()
    named: dict[str, str] = {}
    for _, pkt in packets:
        if not isinstance(pkt, Packet):
            continue
        if pkt.src_mac:
            seen = addrs_by_mac[pkt.src_mac]
            if len(seen) <= ROUTER_ADDRESSES:
                seen.add(pkt.src)
            if not _lan(pkt.src) and _public(pkt.src):
                forwards.add(pkt.src_mac)
        if pkt.sport == 53 and pkt.dns and _lan(pkt.src):
            dns_servers.add(pkt.src)
        for answer in pkt.dns:
            named[answer.address] = answer.name
            if len(looked_up[pkt.dst]) < 4096:
                looked_up[pkt.dst].add(answer.name)
    found: dict[str, dict[str, Any]] = {}
    for mac, addrs in addrs_by_mac.items():
        vendor = rules.vendor_for_mac(mac)
        if vendor is None:
            continue
        router = (len(addrs) > ROUTER_ADDRESSES or mac in forwards
                  or any(a in dns_servers for a in addrs))
        for addr in sorted(addrs):
            if not _lan(addr):
                continue
            entry = {"address": addr, "mac": mac, "vendor": vendor}
            if router:
                why = ("forwards Internet traffic" if mac in forwards or
                       len(addrs) > ROUTER_ADDRESSES else "answers DNS for the LAN")
                _other(others, entry, "router", why)
                continue
            kind = rules.kind_for_lookups(looked_up.get(addr, ()), vendor)
            if kind is not None and kind.kind.value != "speaker":
                _other(others, entry, kind.kind.value,
                       f"{kind.evidence} ({Path(kind.file).name}:{kind.line})")
                continue
            found[addr] = entry
    not_speakers = {o["address"] for o in others or ()}
    # Hosts talking to a vendor's voice endpoints (by DNS name), even without a known OUI.
    for _, pkt in packets:
        if not isinstance(pkt, Packet) or pkt.src in found or not _lan(pkt.src):
            continue
        name = named.get(pkt.dst)
        if name and rules.category_for_host(name) is Category.VOICE:
            voice_clients[pkt.src] += 1
    macs = {addr: mac for mac, addrs in addrs_by_mac.items() for addr in addrs}
    for addr, count in voice_clients.items():
        if count >= 3 and addr not in found and addr not in not_speakers \
                and addr not in dns_servers and macs.get(addr) not in forwards:
            name = named.get(addr)
            found[addr] = {"address": addr, "mac": macs.get(addr),
                           "vendor": rules.vendor_for_host(name) if name else None}
    return sorted(found.values(), key=lambda d: d["address"])


def _other(others: list[dict[str, Any]] | None, entry: dict[str, Any], kind: str,
           evidence: str) -> None:
    if others is not None:
        others.append({**entry, "kind": kind, "evidence": evidence})


def _public(addr: str) -> bool:
    """An Internet IPv4 address. (IPv6 is left out: a speaker's own global IPv6 address would
    look like forwarded traffic.)"""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip.version == 4 and ip.is_global


def busiest_lan_hosts(path: str | Path, limit: int = 5) -> list[dict[str, Any]]:
    """The LAN hosts that sent the most payload to non-LAN addresses, most first: the
    candidates for `--device` when no speaker was recognised (a capture whose MACs were
    rewritten, with no DNS or TLS names in it)."""
    sent: Counter[str] = Counter()
    remotes: dict[str, set[str]] = defaultdict(set)
    for _, pkt in read_capture(str(path)):
        if (isinstance(pkt, Packet) and pkt.payload_len and _lan(pkt.src)
                and not _lan(pkt.dst)):
            sent[pkt.src] += pkt.payload_len
            remotes[pkt.src].add(pkt.dst)
    return [{"address": addr, "bytes_up": up, "remotes": len(remotes[addr])}
            for addr, up in sent.most_common(limit)]


def _printable(text: str, cap: int = 80) -> str:
    value = "".join(c if " " <= c <= "~" else "?" for c in text)
    return value if len(value) <= cap else value[: cap - 3] + "..."


def _host_of(remote: str) -> str:
    """The address of an `addr:port` or `[v6]:port`."""
    return remote.rsplit(":", 1)[0].strip("[]")


def lan_to_lan(device: str | None, remote: str) -> bool:
    """Both ends on the LAN: bridged, never seen by the router's forward hook."""
    return bool(device) and _lan(str(device)) and _lan(_host_of(remote))


# Addresses a home LAN uses (RFC 1918, link-local, ULA). Not every "private" range: 198.18.0.0/15
# (benchmarking) is a WAN here, as in the relay's bypass list (guard/shell/firewall.py), and the
# test topologies and synthetic captures put the cloud there.
_LAN_NETS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fc00::/7", "fe80::/10"))


def _lan(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in _LAN_NETS)


def _upload_json(upload: Upload) -> dict[str, Any]:
    return {
        "device": upload.device_addr,
        "remote": upload.key.remote,
        "host": upload.host,
        "category": upload.category,
        "start": upload.start,
        "end": upload.end,
        "bytes": upload.bytes,
        "packets": upload.packets,
        "action": upload.action.value,
        "leaked_bytes": upload.leaked_bytes,
        "turn": upload.turn,
        "decided": upload.decided,
        "decided_after_packets": upload.decided_after_packets,
    }


def analyze_capture(
    path: str | Path,
    devices: list[str] | tuple[str, ...] = (),
    mode: str | Mode = Mode.STRICT,
    config: GuardConfig | None = None,
    rules: RuleSet | None = None,
) -> dict[str, Any]:
    """Run the engine over a capture; returns the `analyze --json` object."""
    mode = Mode(mode)
    rules = rules if rules is not None else load_rules()
    configs = device_configs(list(devices), mode) if devices else []
    packets = list(read_capture(str(path), keep_payload=1 << 16))
    warnings = [w for w in [capture_truncation(path)] if w]
    others: list[dict[str, Any]] = []
    if devices:
        _check_present(path, packets, configs)
        found = []
    else:
        found = discover(packets, rules, others)
        configs = [DeviceConfig(name=d["address"], address=d["address"], mode=mode)
                   for d in found]
    # QUIC: the capture shows a speaker that was allowed it; judged as quic = "hold" would
    config = replace(config or GuardConfig(),
                     devices=tuple(replace(c, quic="hold") for c in configs))
    engine = Engine(config, rules, expire_on_idle=True)
    streams = _Streams(engine)
    uploads: dict[int, Upload] = {}
    releases: list[dict[str, Any]] = []
    macs: dict[str, str] = {}
    wanted = {c.address for c in configs if c.address} | {c.mac for c in configs if c.mac}
    for index, (ts, pkt) in enumerate(packets):
        if not (isinstance(pkt, Packet) and pkt.proto == TCP and streams.take(pkt, ts)):
            engine.receive(pkt, ts, index)
        if isinstance(pkt, Packet) and pkt.src_mac and pkt.src in wanted and pkt.src not in macs:
            macs[pkt.src] = pkt.src_mac
        if engine.actions:
            _collect(engine, uploads, releases)
    if packets:
        engine.handle_timer(engine.now + 3600.0)
        _collect(engine, uploads, releases)
    if not found:
        for c in configs:
            address = c.address or next(
                (a for a, m in engine.devices.learned.items() if m.name == c.name), None)
            mac = c.mac or (macs.get(address) if address else None)
            found.append({"address": address, "mac": mac,
                          "vendor": rules.vendor_for_mac(mac) if mac else None})
    flows = sorted(engine.iter_flows(), key=lambda f: f.first)
    return {
        "capture": str(path),
        "packets": len(packets),
        "mode": mode.value,
        "followup_window_s": config.followup_window_s,
        "first": packets[0][0] if packets else None,
        "last": packets[-1][0] if packets else None,
        "warnings": warnings,
        "devices": found,
        "other_devices": others,
        "uploads": [_upload_json(u) for u in sorted(uploads.values(), key=lambda u: (u.start, u.id))],
        "releases": releases,
        "flows": [
            {k: v for k, v in f.summary().items() if k not in ("device_name", "state", "proto")}
            for f in flows
        ],
    }


def _check_present(path: str | Path, packets: list[tuple[float, Any]],
                   configs: list[DeviceConfig]) -> None:
    """Every `--device` must appear in the capture (as a source or destination address, or a
    source MAC): an absent one is a typo, not an empty result."""
    addresses: set[str] = set()
    macs: set[str] = set()
    for _, pkt in packets:
        if isinstance(pkt, Packet):
            addresses.add(pkt.src)
            addresses.add(pkt.dst)
            if pkt.src_mac:
                macs.add(pkt.src_mac)
    for c in configs:
        if (c.address and c.address not in addresses) or (c.mac and c.mac not in macs):
            what = c.address or c.mac
            raise DeviceError(f"--device {what}: no packet from or to it in {path} "
                              f"(see the hosts it holds with: hushgate analyze {path})")


def capture_truncation(path: str | Path) -> str | None:
    """What a capture cut short loses (read_capture stops quietly at the cut), or None when it
    ends on a record boundary. Walks the record headers only."""
    try:
        with open(path, "rb") as f:
            data_len = f.seek(0, 2)
            f.seek(0)
            head = f.read(24)
            if len(head) < 4:
                return None
            magic = int.from_bytes(head[:4], "little")
            if magic == 0x0A0D0D0A:
                return _pcapng_truncation(f, data_len)
            orders = {0xA1B2C3D4: "<", 0xA1B23C4D: "<", 0xD4C3B2A1: ">", 0x4D3CB2A1: ">"}
            order = orders.get(magic)
            if order is None or len(head) < 24:
                return None
            offset, count = 24, 0
            while offset < data_len:
                f.seek(offset)
                rec = f.read(16)
                if len(rec) < 16:
                    return (f"capture truncated: it ends {len(rec)} byte(s) into the header of "
                            f"packet record {count + 1}; read {count} packet(s), the rest of "
                            "the capture is lost")
                caplen = int.from_bytes(rec[8:12], "little" if order == "<" else "big")
                if offset + 16 + caplen > data_len:
                    have = data_len - offset - 16
                    return (f"capture truncated: packet record {count + 1} is cut short "
                            f"({have} of {caplen} bytes); read {count} packet(s), the cut "
                            "packet and anything after it are lost")
                if caplen > 1 << 26:
                    return None  # damaged: read_capture says so itself
                offset += 16 + caplen
                count += 1
    except OSError:
        return None
    return None


def _pcapng_truncation(f: Any, data_len: int) -> str | None:
    offset, packets, order = 0, 0, "<"
    while offset < data_len:
        f.seek(offset)
        head = f.read(12)
        if len(head) < 8:
            return (f"capture truncated: it ends inside a block header (at byte {offset}); "
                    f"read {packets} packet(s), the rest of the capture is lost")
        btype = int.from_bytes(head[:4], "little")
        if btype == 0x0A0D0D0A and len(head) >= 12:
            order = "<" if head[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
        else:
            (btype,) = struct.unpack(order + "I", head[:4])
        (blen,) = struct.unpack(order + "I", head[4:8])
        if blen < 12 or blen % 4 or blen > 1 << 26:
            return None  # damaged: read_capture says so itself
        if offset + blen > data_len:
            cut = f"at byte {offset} is cut short ({data_len - offset} of {blen} bytes)"
            if btype in (3, 6):
                return (f"capture truncated: the packet block {cut}; read {packets} "
                        "packet(s), the cut packet and anything after it are lost")
            return (f"capture truncated: a block of type {btype} (not a packet) {cut}; read "
                    f"all {packets} packet(s) before it, anything after it is lost")
        packets += btype in (3, 6)
        offset += blen
    return None


class _Streams:
    """Guarded devices' TCP connections in a capture, fed to the engine as the relay would feed
    them: in order, record by record (design.md 5)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.conns: dict[tuple[str, int, str, int], _Conn] = {}
        self.next_id = 1

    def take(self, pkt: Packet, now: float) -> bool:
        """Handle a TCP packet if it belongs to a guarded device's connection."""
        engine = self.engine
        device = engine.devices.upstream(pkt)
        if device is not None:
            self._upstream(pkt, now)
            return True
        if engine.devices.downstream(pkt) is not None:
            conn = self.conns.get((pkt.dst, pkt.dport, pkt.src, pkt.sport))
            if conn is not None and conn.id is not None and pkt.payload_len:
                engine.stream_down(conn.id, pkt.payload_len, now)
            return True
        return False

    def _upstream(self, pkt: Packet, now: float) -> None:
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        conn = self.conns.get(key)
        flags = pkt.flags
        if flags & SYN and not flags & ACK:
            if conn is not None and conn.id is not None:
                self.engine.stream_closed(conn.id, now)
            conn = self.conns[key] = _Conn()
            conn.stream.syn(pkt.seq)
            conn.started_at_syn = True
            return
        if conn is None:
            conn = self.conns[key] = _Conn()  # predates the capture: picked up mid-stream
        if conn.refused:
            return
        if pkt.payload_len:
            data, records = conn.stream.segment(pkt.seq, pkt.payload, pkt.payload_len)
            if data:
                if conn.id is None:
                    self._open(conn, pkt, data, now)
                    if conn.refused:
                        return
                assert conn.id is not None
                for r in records:
                    self.engine.stream_data(conn.id, r.end, r.size, r.content_type, now)
        if flags & (FIN | RST) and conn.id is not None:
            self.engine.stream_closed(conn.id, now, reset=bool(flags & RST))
            del self.conns[key]

    def _open(self, conn: _Conn, pkt: Packet, first: bytes, now: float) -> None:
        host = None
        if conn.started_at_syn:
            name = client_hello_sni(first)
            host = name if isinstance(name, str) else None
            if isinstance(name, NeedMore):
                host = None  # a ClientHello over several segments: the DNS name stands in
        conn.id, self.next_id = self.next_id, self.next_id + 1
        verdict, _ = self.engine.stream_open(conn.id, pkt.src, pkt.sport, pkt.dst, pkt.dport,
                                             pkt.src_mac, host, now)
        conn.refused = verdict is Verdict.REJECT


class _Conn:
    __slots__ = ("id", "stream", "refused", "started_at_syn")

    def __init__(self) -> None:
        self.id: int | None = None
        self.stream = CapturedStream()
        self.refused = False
        self.started_at_syn = False


def _collect(engine: Engine, uploads: dict[int, Upload], releases: list[dict[str, Any]]) -> None:
    for action in engine.take_actions():
        if isinstance(action, (UploadHeld, UploadSeen)):
            upload = engine.uploads.get(action.upload["id"])
            if upload is not None:
                uploads.setdefault(upload.id, upload)
        elif isinstance(action, BurstReleased):
            releases.append({
                "device": action.key.device_addr,
                "remote": action.key.remote,
                "host": action.host,
                "start": action.start,
                "bytes": action.bytes,
                "delay_s": round(action.delay_s, 6),
                "decided": action.decided,
                "decided_after_packets": action.packets,
            })


def clock(ts: float) -> str:
    """A capture timestamp as UTC clock time, HH:MM:SS.mmm."""
    ms = int(round(ts * 1000))
    return time.strftime("%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}"


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def format_table(result: dict[str, Any]) -> str:
    """A readable report of an analyze result: a summary, the uploads, and a legend that
    explains every column and count it shows."""
    mode = result.get("mode", "strict")
    monitor = mode == "monitor"
    uploads = result["uploads"]
    releases = result["releases"]
    lan_releases = [r for r in releases if lan_to_lan(r.get("device"), r.get("remote", ""))]
    wan_releases = [r for r in releases if r not in lan_releases]
    lan_uploads = [u for u in uploads if lan_to_lan(u.get("device"), u.get("remote", ""))]
    shown = [u for u in uploads if u not in lan_uploads]
    bursts = (f"{len(wan_releases)} burst(s) judged not audio (monitor mode holds nothing: "
              "it logs uploads)" if monitor else
              f"{len(wan_releases)} burst(s) held and released as not audio")
    lines = [f"warning: {w}" for w in result.get("warnings", ())]
    lines.append(f"{result['capture']}: {result['packets']} packets, "
                 f"{len(result['devices'])} speaker(s), {len(shown)} upload(s), {bursts}")
    if lan_releases or lan_uploads:
        lines.append(f"  not counted: {len(lan_uploads)} upload(s) and {len(lan_releases)} "
                     "burst(s) between LAN hosts (the guard never sees LAN-to-LAN traffic)")
    first, last = result.get("first"), result.get("last")
    if first is not None and last is not None:
        lines.append(f"  captured {_day(first)} {clock(first)} to {_day(last)} {clock(last)} "
                     f"UTC, mode {mode}")
    for device in result["devices"]:
        lines.append(f"  speaker {device['address']}  mac {device['mac'] or '-'}  "
                     f"vendor {device['vendor'] or '-'}")
    for other in result.get("other_devices", ()):
        lines.append(f"  not a speaker: {other['address']}  mac {other['mac'] or '-'}  "
                     f"vendor {other['vendor'] or '-'}  {other['kind']} "
                     f"({other['evidence']})")
    window = result.get("followup_window_s", 10.0)
    if shown:
        lines.append("")
        lines.append(f"{'START':<12} {'DUR':>5} {'DEVICE':<16} {'TO':<40} {'WHAT':<10} "
                     f"{'KB':>6} {'ACTION':<8} {'LEAK':>5} {'TURN':>4} {'DECIDED':>8}")
        for u in shown:
            to = (u["host"] or u["remote"])[:40]
            lines.append(
                f"{clock(u['start']):<12} {u['end'] - u['start']:5.1f} {u['device']:<16} "
                f"{to:<40} {u['category']:<10} {u['bytes'] / 1000:6.1f} {u['action']:<8} "
                f"{u['leaked_bytes']:5d} {u['turn']:4d} "
                f"{(u['decided'] - u['start']) * 1000:6.0f}ms")
        decided = ("when monitor mode would log it" if monitor else
                   "when the guard held it (or let it pass)")
        lines += [
            "",
            "START   clock time of the upload's first packet (UTC, from the capture)",
            "DUR     seconds from its first to its last upstream packet",
            "DEVICE  the speaker. TO: the remote's name (TLS SNI or DNS), else address:port",
            "WHAT    the remote's category in the rules (unknown: no rule, judged by shape)",
            "KB      upstream bytes of the upload, in kB (1000 bytes)",
            "ACTION  hold: held for a person (nobody answers here: it expires, denied),",
            "        pass: passed by the mode (followups: a first turn), monitor: logged only,",
            "        block: refused (a blocked category)",
            "LEAK    bytes that passed before the hold within the upload's activity (upstream",
            "        with no gap of 1 s), bursts released as not audio included",
            f"TURN    1: the device's first upload in {window:g} s. 2, 3...: a follow-up turn of",
            f"        the same conversation (started within {window:g} s of the previous upload's "
            "end)",
            f"DECIDED time from START to {decided}",
        ]
    blocked = [f for f in result["flows"] if f["category"] == "messaging"]
    if blocked:
        lines.append("")
        for f in blocked:
            lines.append(f"blocked (messaging): {f['device']} to {f['host'] or f['remote']}, "
                         f"{f['packets_up']} packet(s) refused")
    if wan_releases and not monitor:
        delays = sorted(r["delay_s"] for r in wan_releases)
        p95 = delays[min(len(delays) - 1, int(0.95 * len(delays)))]
        lines.append("")
        lines.append(f"released as not audio: {len(delays)} burst(s), delay median "
                     f"{delays[len(delays) // 2] * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms "
                     "(how long each was held before it went on)")
    elif wan_releases:
        lines.append("")
        lines.append(f"not audio: {len(wan_releases)} burst(s), in strict or followups mode each "
                     "would be held until judged, then released")
    return "\n".join(lines)
