"""The wire boundary: bytes in, small immutable values out.

Rules of this module: every function here is pure and total. Hostile bytes never raise out of
`parse_ip`/`parse_frame`; they come back as `Malformed`. Nothing here keeps state across packets
(reassembly of a ClientHello that spans segments lives in `guard.core.sni.SniAssembler`); the only
caches are bounded memoisations of pure functions (address text).

Headers are unpacked with `struct` rather than dpkt objects because this is the per-packet hot
path on the router and in `hushgate analyze` (about half the time of a bare dpkt parse), and DNS
answers with a small parser of its own (see `parse_dns_answers` for why not dpkt). Lengths: a header that says the packet is longer than
the bytes we hold is legitimate (a capture's snaplen): lengths then come from the header and
`payload` holds what we have. A header whose own length is impossible (IHL < 5, TCP data offset
beyond the IP payload, UDP length < 8) is `Malformed`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from ipaddress import IPv6Address

TCP = 6
UDP = 17

# TCP flag bits (RFC 9293)
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10


class Hint(str, Enum):
    """What the first bytes of a payload look like; a hint, never a reason to stop inspecting."""

    NONE = "none"
    TLS_HELLO = "tls-hello"  # TLS record type 22, handshake type 1
    TLS = "tls"  # any other TLS record header
    QUIC_INITIAL = "quic-initial"  # QUIC long header, Initial packet type
    QUIC = "quic"  # other QUIC long/short header
    STUN = "stun"  # RFC 5389 magic cookie 0x2112A442
    DTLS = "dtls"  # DTLS record (content type 20-25, version 0xfeff/0xfefd)
    DNS = "dns"


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """One address a DNS response maps a name to. `name` is the name the client asked for
    (the head of any CNAME chain), lower-case, without the trailing dot."""

    name: str
    address: str
    ttl_s: int


@dataclass(frozen=True)
class Packet:
    """One IP packet reduced to what the core needs.

    Frozen, but without slots on purpose: the parser builds one per queued packet with
    `_packet(...)`, which installs the instance dictionary in one step (about a third of the
    frozen `__init__`'s cost, which sets the 15 fields one `object.__setattr__` at a time).
    `Packet(...)` and `dataclasses.replace` work as for any frozen dataclass."""

    version: int  # 4 or 6
    src: str  # textual address
    dst: str
    proto: int  # TCP or UDP (other protocols: sport = dport = 0)
    sport: int
    dport: int
    payload_len: int  # L4 payload bytes (TCP/UDP payload)
    wire_len: int  # IP total length
    src_mac: str | None = None  # "aa:bb:cc:dd:ee:ff" when the frame had one
    flags: int = 0  # TCP flags, 0 for UDP
    seq: int = 0  # TCP sequence number
    ack: int = 0  # TCP acknowledgement number
    hint: Hint = Hint.NONE
    payload: bytes = b""  # the first bytes of the L4 payload (may be truncated, never more)
    dns: tuple[DnsAnswer, ...] = ()  # answers when this is a DNS response (UDP sport 53)


_NO_DNS: tuple[DnsAnswer, ...] = ()
_alloc = object.__new__
_set = object.__setattr__


def _packet(
    version: int, src: str, dst: str, proto: int, sport: int, dport: int, payload_len: int,
    wire_len: int, src_mac: str | None, flags: int = 0, seq: int = 0, ack: int = 0,
    hint: Hint = Hint.NONE, payload: bytes = b"", dns: tuple[DnsAnswer, ...] = _NO_DNS,
) -> Packet:
    """`Packet(...)` for the parser's hot path: the same value, built in one step."""
    pkt = _alloc(Packet)
    _set(pkt, "__dict__", {
        "version": version, "src": src, "dst": dst, "proto": proto, "sport": sport,
        "dport": dport, "payload_len": payload_len, "wire_len": wire_len, "src_mac": src_mac,
        "flags": flags, "seq": seq, "ack": ack, "hint": hint, "payload": payload, "dns": dns,
    })
    return pkt


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that could not be parsed as IP/TCP/UDP. Counted, never fatal."""

    reason: str
    src_mac: str | None = None


# ---------------------------------------------------------------------------------------------
# Names

# Host names that reach the core (SNI, DNS) are attacker-controlled text that ends up in a
# terminal, a web page and a rules match. Only LDH, '.' and '_' survive; every other byte becomes
# '?', so a hostile name stays visible (and never matches a rule) but is inert.
MAX_NAME_CHARS = 253  # RFC 1035 2.3.4: 255 octets on the wire = 253 characters of text
_NAME_TABLE = bytes(
    c + 32 if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122 or c in b"-._") else 63
    for c in range(256)
)


def normalise_name(raw: bytes) -> str | None:
    """Host name bytes -> lower-case text without the trailing dot, capped at 253 characters,
    with every character outside LDH, '.' and '_' replaced by '?'. None when empty."""
    if raw[-1:] == b".":
        raw = raw[:-1]
    if not raw:
        return None
    return raw[:MAX_NAME_CHARS].translate(_NAME_TABLE).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Addresses: bounded memoisation, because a router sees the same few hundred addresses again and
# again and formatting costs more than the rest of the IPv4 header parse.


@lru_cache(maxsize=4096)
def _ip4_text(raw: bytes) -> str:
    return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"


@lru_cache(maxsize=4096)
def _ip6_text(raw: bytes) -> str:
    # RFC 5952 text (compressed, lower-case): the same form DNS AAAA answers are given in, so a
    # flow's address and a cached name match by string.
    return IPv6Address(raw).compressed


# ---------------------------------------------------------------------------------------------
# Payload hints

_QUIC_V1 = 0x00000001
_QUIC_V2 = 0x6B3343CF  # RFC 9369
_TLS_RECORD_TYPES = frozenset((20, 21, 22, 23, 24))  # ccs, alert, handshake, app data, heartbeat
_DTLS_VERSIONS = frozenset((0xFEFF, 0xFEFD, 0xFEFC))  # DTLS 1.0, 1.2, 1.3 (record layer)
_STUN_COOKIE = b"\x21\x12\xa4\x42"  # RFC 5389 section 6
_HINT_FULL = (Hint.TLS_HELLO, Hint.QUIC_INITIAL, Hint.DNS)  # payloads kept whole, for parsing


def _hint_tcp(p: bytes, sport: int, dport: int) -> Hint:
    if len(p) >= 5 and p[0] in _TLS_RECORD_TYPES and p[1] == 3 and p[2] <= 4:
        if p[0] == 22 and len(p) >= 6 and p[5] == 1:
            return Hint.TLS_HELLO
        return Hint.TLS
    if sport == 53 or dport == 53:
        return Hint.DNS if len(p) >= 14 else Hint.NONE  # 2-byte length prefix + 12-byte header
    if len(p) >= 20 and p[4:8] == _STUN_COOKIE and p[0] < 0x40:
        return Hint.STUN  # STUN over TCP (RFC 5389 7.2.2), e.g. a TURN relay
    return Hint.NONE


def _hint_udp(p: bytes, sport: int, dport: int) -> Hint:
    n = len(p)
    if n == 0:
        return Hint.NONE
    b0 = p[0]
    if sport == 53 or dport == 53:
        return Hint.DNS if n >= 12 else Hint.NONE
    # First-byte demultiplexing as in RFC 7983 / RFC 9443: 0-3 STUN, 20-63 DTLS, 64-127 QUIC
    # short header, 128-191 RTP/RTCP, 192-255 QUIC long header (fixed bit set).
    if b0 < 4:
        if n >= 20 and p[4:8] == _STUN_COOKIE and p[3] & 3 == 0:
            return Hint.STUN
        return Hint.NONE
    if 20 <= b0 <= 25:
        if n >= 13 and (p[1] << 8 | p[2]) in _DTLS_VERSIONS:
            return Hint.DTLS
        return Hint.NONE
    if b0 >= 0xC0:
        if n < 7:
            return Hint.NONE
        version = p[1] << 24 | p[2] << 16 | p[3] << 8 | p[4]
        ptype = (b0 >> 4) & 3
        if version == _QUIC_V1:
            return Hint.QUIC_INITIAL if ptype == 0 and p[5] <= 20 else Hint.QUIC
        if version == _QUIC_V2:
            return Hint.QUIC_INITIAL if ptype == 1 and p[5] <= 20 else Hint.QUIC
        if sport == 443 or dport == 443:
            return Hint.QUIC  # draft, gQUIC or version negotiation on the QUIC port
        return Hint.NONE
    if 0x40 <= b0 < 0x80 and (sport == 443 or dport == 443):
        return Hint.QUIC  # short header: nothing to check but the fixed bit and the port
    return Hint.NONE


# ---------------------------------------------------------------------------------------------
# DNS responses. A small parser of the question and answer sections only: dpkt parses every
# section and rejects a whole response for one non-UTF-8 label, while all we need is A/AAAA/CNAME.

_DNS_A = 1
_DNS_CNAME = 5
_DNS_AAAA = 28
_DNS_MAX_ANSWERS = 64  # real responses carry a handful; bounds the work a hostile one can cause
_DNS_MAX_CHAIN = 16  # CNAME hops followed from the question (resolvers stop around 8-16 too)
_DNS_MAX_JUMPS = 127  # compression pointers per name


def _dns_name(msg: bytes, off: int) -> tuple[bytes, int]:
    """Read a (possibly compressed) name; return it and the offset after it in the record.
    Compression pointers must point strictly backwards, so loops are impossible."""
    labels: list[bytes] = []
    end = -1
    limit = off
    total = 0
    jumps = 0
    while True:
        n = msg[off]  # IndexError on truncation: the caller treats it as no answers
        if n == 0:
            off += 1
            break
        if n >= 0xC0:
            ptr = ((n & 0x3F) << 8) | msg[off + 1]
            jumps += 1
            # Backwards only, and a bounded number of times: a name has at most 127 labels,
            # and a chain of pointers 2 bytes apart must not cost a hostile response 30k steps.
            if ptr >= limit or jumps > _DNS_MAX_JUMPS:
                raise ValueError("bad DNS pointer")
            if end < 0:
                end = off + 2
            off = limit = ptr
            continue
        if n > 63:
            raise ValueError("bad DNS label")
        label = msg[off + 1 : off + 1 + n]
        if len(label) != n:
            raise ValueError("truncated DNS label")
        total += n + 1
        if total > 255:
            raise ValueError("DNS name too long")
        labels.append(label)
        off += 1 + n
    return b".".join(labels), (end if end >= 0 else off)


def parse_dns_answers(msg: bytes) -> tuple[DnsAnswer, ...]:
    """A/AAAA answers of a DNS response, for the queried name and every name on its CNAME chain.

    Only records reachable from the question through CNAMEs are believed: an unrelated record
    slipped into the answer section must not map a name the client never asked for. The TTL of a
    mapping reached through CNAMEs is the smallest TTL along the chain. Total: () on any damage.
    """
    try:
        return _parse_dns_answers(msg)
    except (IndexError, ValueError, struct.error):
        return ()


def _parse_dns_answers(msg: bytes) -> tuple[DnsAnswer, ...]:
    if len(msg) < 12:
        return ()
    _, flags, qdcount, ancount = struct.unpack_from("!HHHH", msg, 0)
    # A response (QR) with rcode NOERROR and exactly one question (what every stub resolver sends).
    if not flags & 0x8000 or flags & 0x000F or qdcount != 1 or ancount == 0:
        return ()
    qname, off = _dns_name(msg, 12)
    off += 4  # qtype, qclass
    cnames: dict[bytes, tuple[bytes, int]] = {}
    addresses: list[tuple[bytes, str, int]] = []
    for _ in range(min(ancount, _DNS_MAX_ANSWERS)):
        owner, off = _dns_name(msg, off)
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, off)
        off += 10
        rdata_end = off + rdlen
        if rdata_end > len(msg):
            raise ValueError("truncated DNS rdata")
        owner = owner.lower()
        if ttl & 0x80000000:
            ttl = 0  # RFC 2181 8: a TTL with the top bit set is treated as zero
        if rclass == 1:
            if rtype == _DNS_A and rdlen == 4:
                addresses.append((owner, _ip4_text(msg[off:rdata_end]), ttl))
            elif rtype == _DNS_AAAA and rdlen == 16:
                addresses.append((owner, _ip6_text(msg[off:rdata_end]), ttl))
            elif rtype == _DNS_CNAME and owner not in cnames:
                target, _ = _dns_name(msg, off)
                cnames[owner] = (target.lower(), ttl)
        off = rdata_end
    # Walk the chain forward from the question: chain[i] is a name, hop_ttl[i] the TTL of the
    # CNAME from chain[i] to chain[i + 1].
    name = qname.lower()
    chain = [name]
    hop_ttl: list[int] = []
    while name in cnames and len(chain) <= _DNS_MAX_CHAIN:
        target, ttl = cnames[name]
        if target in chain:
            break  # a CNAME loop: what we have so far is still a chain
        chain.append(target)
        hop_ttl.append(ttl)
        name = target
    position = {n: i for i, n in enumerate(chain)}
    out: list[DnsAnswer] = []
    emitted: set[tuple[str, str]] = set()
    for owner, address, ttl in addresses:
        i = position.get(owner)
        if i is None:
            continue
        # The head's mapping lasts as long as every record between it and the address does.
        found: list[DnsAnswer] = []
        for j in range(i, -1, -1):
            if j < i:
                ttl = min(ttl, hop_ttl[j])
            text = normalise_name(chain[j])
            if text is not None and (text, address) not in emitted:
                emitted.add((text, address))
                found.append(DnsAnswer(text, address, ttl))
        out.extend(reversed(found))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# IP

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBB")
_UDP = struct.Struct("!HHH")
_H = struct.Struct("!H")

# IPv6 extension headers walked to reach the transport header (RFC 8200 4.1). Each is at least
# 8 bytes, so the walk is bounded by the packet length.
_HOPOPTS, _ROUTING, _FRAGMENT, _AH, _DSTOPTS = 0, 43, 44, 51, 60
_IP6_EXT = frozenset((_HOPOPTS, _ROUTING, _DSTOPTS, _AH))

# Reason given when a parser bug (not the input) raised; the fuzz tests assert it never shows.
INTERNAL_ERROR = "internal parser error"


def parse_ip(
    data: bytes, src_mac: str | None = None, keep_payload: int = 64
) -> Packet | Malformed | None:
    """Parse a raw IPv4/IPv6 packet (what NFQUEUE hands out). Total: never raises.

    Returns a `Packet` for any IP packet (ports 0 for protocols other than TCP/UDP and for
    fragments other than the first), `Malformed` when the headers are impossible or too short to
    hold the ports, and None for an empty buffer. `payload` keeps the first `keep_payload` bytes
    of the L4 payload, or all of it when it is a TLS ClientHello, a QUIC Initial or DNS.
    """
    try:
        if type(data) is not bytes:
            data = bytes(data)  # a bytearray/memoryview would make Packet.payload mutable
        if not data:
            return None
        v = data[0] >> 4
        if v == 4:
            return _parse_ip4(data, src_mac, keep_payload)
        if v == 6:
            return _parse_ip6(data, src_mac, keep_payload)
        return Malformed("ip version not 4 or 6", src_mac)
    except Exception:  # noqa: BLE001 - the last line of totality; tests assert it is never reached
        return Malformed(INTERNAL_ERROR, src_mac)


def _parse_ip4(data: bytes, src_mac: str | None, keep: int) -> Packet | Malformed:
    n = len(data)
    if n < 20:
        return Malformed("ipv4 header truncated", src_mac)
    vhl, _, total, _, frag, _, proto, _, s, d = _IP4.unpack_from(data)
    ihl = (vhl & 15) << 2
    if ihl < 20:
        return Malformed("ipv4 ihl < 5", src_mac)
    if total == 0:
        # Segmentation offload on the capturing host leaves 0 here (Wireshark: "assuming TSO").
        total = n
    if total < ihl:
        return Malformed("ipv4 total length < header length", src_mac)
    if ihl > n:
        return Malformed("ipv4 options truncated", src_mac)
    src = _ip4_text(s)
    dst = _ip4_text(d)
    end = min(total, n)  # frames shorter than 64 bytes carry Ethernet padding
    if frag & 0x1FFF:
        return _packet(4, src, dst, proto, 0, 0, total - ihl, total, src_mac)
    return _parse_l4(
        data, ihl, end, total - ihl, 4, src, dst, proto, total, src_mac, keep, frag & 0x2000 != 0
    )


def _parse_ip6(data: bytes, src_mac: str | None, keep: int) -> Packet | Malformed:
    n = len(data)
    if n < 40:
        return Malformed("ipv6 header truncated", src_mac)
    _, plen, nxt, _, s, d = _IP6.unpack_from(data)
    if plen == 0:
        plen = n - 40  # jumbogram (RFC 2675) or segmentation offload: trust what we hold
    total = 40 + plen
    end = min(total, n)
    src = _ip6_text(s)
    dst = _ip6_text(d)
    off = 40
    more_fragments = False
    while nxt in _IP6_EXT or nxt == _FRAGMENT:
        if off + 8 > total:
            return Malformed("ipv6 extension header beyond payload length", src_mac)
        if off + 8 > n:
            return Malformed("ipv6 extension header truncated", src_mac)
        if nxt == _FRAGMENT:
            nxt_next = data[off]
            frag_field = _H.unpack_from(data, off + 2)[0]
            frag_off = frag_field >> 3
            more_fragments = frag_field & 1 == 1
            off += 8
            nxt = nxt_next
            if frag_off:
                return _packet(6, src, dst, nxt, 0, 0, total - off, total, src_mac)
            continue
        hlen = (data[off + 1] + 2) << 2 if nxt == _AH else (data[off + 1] + 1) << 3
        nxt = data[off]
        off += hlen
        if off > total:
            return Malformed("ipv6 extension header beyond payload length", src_mac)
    return _parse_l4(
        data, off, end, total - off, 6, src, dst, nxt, total, src_mac, keep, more_fragments
    )


def _parse_l4(
    data: bytes,
    off: int,
    end: int,
    l4_len: int,
    version: int,
    src: str,
    dst: str,
    proto: int,
    total: int,
    src_mac: str | None,
    keep: int,
    first_fragment: bool,
) -> Packet | Malformed:
    """The transport header at data[off:]; `end` bounds what we hold, `l4_len` is what the IP
    header says the transport segment is (it may be longer than what we hold). In the first
    fragment of a datagram, lengths describe this fragment and the UDP length the whole."""
    if proto == TCP:
        if l4_len < 20:
            return Malformed("tcp header longer than ip payload", src_mac)
        if off + 20 > end:
            return Malformed("tcp header truncated", src_mac)
        sport, dport, seq, ack, doff, flags = _TCP.unpack_from(data, off)
        doff = (doff >> 4) << 2
        if doff < 20:
            return Malformed("tcp data offset < 5", src_mac)
        if doff > l4_len:
            return Malformed("tcp data offset beyond ip payload", src_mac)
        start = off + doff
        plen = l4_len - doff
        payload = data[start:end] if start < end else b""
        hint = _hint_tcp(payload, sport, dport) if payload else Hint.NONE
        if hint not in _HINT_FULL and len(payload) > keep:
            payload = payload[:keep]
        dns: tuple[DnsAnswer, ...] = _NO_DNS
        if hint is Hint.DNS and sport == 53:
            # DNS over TCP: only when the whole message sits in this segment (cheap, optional).
            mlen = _H.unpack_from(payload)[0]
            if mlen + 2 == len(payload):
                dns = parse_dns_answers(payload[2:])
        return _packet(version, src, dst, TCP, sport, dport, plen, total, src_mac, flags, seq, ack,
                       hint, payload, dns)
    if proto == UDP:
        if l4_len < 8:
            return Malformed("udp header longer than ip payload", src_mac)
        if off + 8 > end:
            return Malformed("udp header truncated", src_mac)
        sport, dport, ulen = _UDP.unpack_from(data, off)
        if ulen and not first_fragment:  # 0 in jumbograms and offloaded datagrams: IP rules
            if ulen < 8:
                return Malformed("udp length < 8", src_mac)
            if ulen > l4_len:
                return Malformed("udp length beyond ip payload", src_mac)
            l4_len = ulen
            end = min(end, off + ulen)
        start = off + 8
        payload = data[start:end] if start < end else b""
        hint = _hint_udp(payload, sport, dport)
        if hint not in _HINT_FULL and len(payload) > keep:
            payload = payload[:keep]
        answers = parse_dns_answers(payload) if hint is Hint.DNS and sport == 53 else _NO_DNS
        return _packet(version, src, dst, UDP, sport, dport, l4_len - 8, total, src_mac, 0, 0, 0,
                       hint, payload, answers)
    return _packet(version, src, dst, proto, 0, 0, l4_len, total, src_mac)


# ---------------------------------------------------------------------------------------------
# Link layers (pcap LINKTYPE_* values, https://www.tcpdump.org/linktypes.html)

LINKTYPE_NULL = 0  # BSD loopback: 4-byte address family in the capturing host's byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
# DLT_RAW is 12 on most systems and 14 on OpenBSD; both appear in pcap files in the wild.
_RAW_TYPES = frozenset((LINKTYPE_RAW, 12, 14, LINKTYPE_IPV4, LINKTYPE_IPV6))
SUPPORTED_LINKTYPES = frozenset(
    {LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2} | _RAW_TYPES
)

_ETH_IP4 = 0x0800
_ETH_IP6 = 0x86DD
_VLAN_TAGS = frozenset((0x8100, 0x88A8, 0x9100))  # 802.1Q, 802.1ad (QinQ), legacy QinQ
_MAX_VLAN_TAGS = 4
# BSD AF_INET6 differs per OS (24 NetBSD/OpenBSD, 28 FreeBSD, 30 macOS); AF_INET is 2 everywhere.
_NULL_AF_INET6 = frozenset((24, 28, 30))


def parse_frame(data: bytes, linktype: int, keep_payload: int = 64
                ) -> Packet | Malformed | None:
    """Parse one captured frame of the given pcap link type down to L4. Total: never raises.
    `keep_payload` as for `parse_ip` (`analyze` keeps whole payloads to read TLS records).

    None for frames that carry no IP (ARP, LLDP, 802.3/LLC, EAPOL) and for link types we do not
    know; `Malformed` for IP we cannot parse. The Ethernet (or cooked) source MAC becomes
    `src_mac`, lower-case with colons.
    """
    mac: str | None
    try:
        if type(data) is not bytes:
            data = bytes(data)
        if linktype == LINKTYPE_ETHERNET:
            if len(data) < 14:
                return Malformed("ethernet header truncated") if data else None
            mac = data[6:12].hex(":")
            etype = (data[12] << 8) | data[13]
            off = 14
        elif linktype == LINKTYPE_LINUX_SLL:
            if len(data) < 16:
                return Malformed("sll header truncated") if data else None
            # ARPHRD_ETHER (1) with a 6-byte address: the sender's MAC, outgoing packets included
            mac = data[6:12].hex(":") if data[2:6] == b"\x00\x01\x00\x06" else None
            etype = (data[14] << 8) | data[15]
            off = 16
        elif linktype == LINKTYPE_LINUX_SLL2:
            if len(data) < 20:
                return Malformed("sll2 header truncated") if data else None
            etype = (data[0] << 8) | data[1]
            mac = data[12:18].hex(":") if data[8:10] == b"\x00\x01" and data[11] == 6 else None
            off = 20
        elif linktype in _RAW_TYPES:
            return parse_ip(data, None, keep_payload) if data else None
        elif linktype == LINKTYPE_NULL:
            if len(data) < 4:
                return Malformed("loopback header truncated") if data else None
            family = data[0] if data[0] else data[3]  # either byte order; families are < 256
            if family == 2 or family in _NULL_AF_INET6:
                return parse_ip(data[4:], None, keep_payload)
            return None
        else:
            return None
        tags = 0
        while etype in _VLAN_TAGS:
            tags += 1
            if tags > _MAX_VLAN_TAGS:
                return Malformed("too many vlan tags", mac)
            if off + 4 > len(data):
                return Malformed("vlan tag truncated", mac)
            etype = (data[off + 2] << 8) | data[off + 3]
            off += 4
        if etype == _ETH_IP4 or etype == _ETH_IP6:
            return parse_ip(data[off:], mac, keep_payload)
        return None
    except Exception:  # noqa: BLE001 - the last line of totality; tests assert it is never reached
        return Malformed(INTERNAL_ERROR)
