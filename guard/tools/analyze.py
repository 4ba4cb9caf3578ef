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
"""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

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


def device_configs(specs: list[str], mode: Mode) -> list[DeviceConfig]:
    """`--device` values (addresses or MACs) as device configs named after themselves."""
    devices = []
    for spec in specs:
        if _is_mac(spec):
            devices.append(DeviceConfig(name=normalize_mac(spec), mac=normalize_mac(spec),
                                        mode=mode))
        else:
            try:
                address = str(ipaddress.ip_address(spec))
            except ValueError:
                raise ValueError(f"--device {spec!r}: not an IP or MAC address") from None
            devices.append(DeviceConfig(name=address, address=address, mode=mode))
    return devices


def discover(packets: list[tuple[float, Packet | Malformed | None]], rules: RuleSet
             ) -> list[dict[str, Any]]:
    """Find speakers in a capture: vendor OUIs (not routers), and hosts that ask for or connect
    to vendor voice hosts."""
    addrs_by_mac: dict[str, set[str]] = defaultdict(set)
    voice_clients: Counter[str] = Counter()
    named: dict[str, str] = {}
    for _, pkt in packets:
        if not isinstance(pkt, Packet):
            continue
        if pkt.src_mac:
            seen = addrs_by_mac[pkt.src_mac]
            if len(seen) <= ROUTER_ADDRESSES:
                seen.add(pkt.src)
        for answer in pkt.dns:
            named[answer.address] = answer.name
    found: dict[str, dict[str, Any]] = {}
    for mac, addrs in addrs_by_mac.items():
        vendor = rules.vendor_for_mac(mac)
        if vendor is None or len(addrs) > ROUTER_ADDRESSES:
            continue
        for addr in sorted(addrs):
            if _lan(addr):
                found[addr] = {"address": addr, "mac": mac, "vendor": vendor}
    # Hosts talking to a vendor's voice endpoints (by DNS name), even without a known OUI.
    for _, pkt in packets:
        if not isinstance(pkt, Packet) or pkt.src in found or not _lan(pkt.src):
            continue
        name = named.get(pkt.dst)
        if name and rules.category_for_host(name) is Category.VOICE:
            voice_clients[pkt.src] += 1
    macs = {addr: mac for mac, addrs in addrs_by_mac.items() for addr in addrs}
    for addr, count in voice_clients.items():
        if count >= 3 and addr not in found:
            name = named.get(addr)
            found[addr] = {"address": addr, "mac": macs.get(addr),
                           "vendor": rules.vendor_for_host(name) if name else None}
    return sorted(found.values(), key=lambda d: d["address"])


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


def _lan(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return (ip.is_private or ip.is_link_local) and not ip.is_multicast and not ip.is_loopback \
        and not ip.is_unspecified


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
    packets = list(read_capture(str(path), keep_payload=1 << 16))
    if devices:
        configs = device_configs(list(devices), mode)
        found = []
    else:
        found = discover(packets, rules)
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
        "devices": found,
        "uploads": [_upload_json(u) for u in sorted(uploads.values(), key=lambda u: (u.start, u.id))],
        "releases": releases,
        "flows": [
            {k: v for k, v in f.summary().items() if k not in ("device_name", "state", "proto")}
            for f in flows
        ],
    }


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


def format_table(result: dict[str, Any]) -> str:
    """A readable report of an analyze result."""
    lines = [f"{result['capture']}: {result['packets']} packets, "
             f"{len(result['devices'])} speaker(s), {len(result['uploads'])} upload(s), "
             f"{len(result['releases'])} burst(s) held and released"]
    for device in result["devices"]:
        lines.append(f"  speaker {device['address']}  mac {device['mac'] or '-'}  "
                     f"vendor {device['vendor'] or '-'}")
    if result["uploads"]:
        lines.append("")
        lines.append(f"{'START':>12} {'DUR':>5} {'DEVICE':<16} {'TO':<40} {'WHAT':<10} "
                     f"{'KB':>6} {'ACTION':<8} {'LEAK':>5} {'TURN':>4} {'DECIDED':>8}")
        t0 = result["uploads"][0]["start"]
        for u in result["uploads"]:
            to = (u["host"] or u["remote"])[:40]
            lines.append(
                f"{u['start'] - t0:12.2f} {u['end'] - u['start']:5.1f} {u['device']:<16} "
                f"{to:<40} {u['category']:<10} {u['bytes'] / 1000:6.1f} {u['action']:<8} "
                f"{u['leaked_bytes']:5d} {u['turn']:4d} "
                f"{(u['decided'] - u['start']) * 1000:6.0f}ms")
        if any(u["leaked_bytes"] for u in result["uploads"]):
            lines.append("LEAK: bytes that passed before the hold within the upload's activity "
                         "(upstream with no gap of 1 s),")
            lines.append("      bursts released as not audio included (see below); START and "
                         "DECIDED count from its first packet")
    blocked = [f for f in result["flows"] if f["category"] == "messaging"]
    if blocked:
        lines.append("")
        for f in blocked:
            lines.append(f"blocked (messaging): {f['device']} -> {f['host'] or f['remote']}, "
                         f"{f['packets_up']} packet(s) refused")
    if result["releases"]:
        delays = sorted(r["delay_s"] for r in result["releases"])
        p95 = delays[min(len(delays) - 1, int(0.95 * len(delays)))]
        lines.append("")
        lines.append(f"released as not audio: {len(delays)} burst(s), delay median "
                     f"{delays[len(delays) // 2] * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    return "\n".join(lines)
