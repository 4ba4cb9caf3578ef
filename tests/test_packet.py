"""guard.core.packet: wire bytes in, Packet/Malformed/None out; never an exception.

Fixtures are built byte by byte here (so lengths can lie on purpose) or taken from the shared
captures under ../shared/captures, which are read in place and never copied into the repo.
"""

from __future__ import annotations

import struct
from pathlib import Path

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.core.packet import (
    ACK,
    INTERNAL_ERROR,
    PSH,
    SYN,
    TCP,
    UDP,
    DnsAnswer,
    Hint,
    Malformed,
    Packet,
    _dns_name,
    normalise_name,
    parse_dns_answers,
    parse_frame,
    parse_ip,
)

FIXTURES = Path(__file__).parent / "fixtures"

SRC4 = bytes([192, 168, 86, 40])
DST4 = bytes([52, 94, 233, 109])
SRC6 = bytes.fromhex("20010db8000000000000000000000001")
DST6 = bytes.fromhex("2607f8b0400508000000000000002004")
MAC = bytes.fromhex("68dbf5901964")
GW_MAC = bytes.fromhex("001122334455")


# ---------------------------------------------------------------------------------------------
# Builders (lengths are parameters so tests can make them lie)


def ip4(
    proto: int,
    l4: bytes,
    *,
    ihl: int = 5,
    total: int | None = None,
    frag: int = 0,
    options: bytes = b"",
    src: bytes = SRC4,
    dst: bytes = DST4,
) -> bytes:
    if total is None:
        total = 20 + len(options) + len(l4)
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 7, frag, 64, proto, 0, src, dst)
    return head + options + l4


def ip6(nxt: int, rest: bytes, *, plen: int | None = None) -> bytes:
    if plen is None:
        plen = len(rest)
    return struct.pack("!IHBB16s16s", 0x60000000, plen, nxt, 64, SRC6, DST6) + rest


def tcp(
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    seq: int = 1000,
    ack: int = 2000,
    flags: int = ACK | PSH,
    doff: int = 5,
    options: bytes = b"",
) -> bytes:
    return (
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 65535, 0, 0)
        + options
        + payload
    )


def udp(sport: int, dport: int, payload: bytes, *, length: int | None = None) -> bytes:
    if length is None:
        length = 8 + len(payload)
    return struct.pack("!HHHH", sport, dport, length, 0) + payload


def eth(payload: bytes, etype: int = 0x0800, *, tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    head = GW_MAC + MAC
    for tpid, vid in tags:
        head += struct.pack("!HH", tpid, vid)
    return head + struct.pack("!H", etype) + payload


def tls_hello() -> bytes:
    return (FIXTURES / "tls_client_hello_bob_dispatch.bin").read_bytes()


def dns_response(qname: str, answers: list[dpkt.dns.DNS.RR]) -> bytes:
    msg = dpkt.dns.DNS(id=7, op=dpkt.dns.DNS_QR | dpkt.dns.DNS_RD | dpkt.dns.DNS_RA, rcode=0)
    msg.qd = [dpkt.dns.DNS.Q(name=qname, type=dpkt.dns.DNS_A, cls=dpkt.dns.DNS_IN)]
    msg.an = answers
    return bytes(msg)


def rr_cname(name: str, target: str, ttl: int) -> dpkt.dns.DNS.RR:
    return dpkt.dns.DNS.RR(
        name=name, type=dpkt.dns.DNS_CNAME, cls=dpkt.dns.DNS_IN, ttl=ttl, cname=target
    )


def rr_a(name: str, addr: bytes, ttl: int) -> dpkt.dns.DNS.RR:
    return dpkt.dns.DNS.RR(name=name, type=dpkt.dns.DNS_A, cls=dpkt.dns.DNS_IN, ttl=ttl, ip=addr)


def rr_aaaa(name: str, addr: bytes, ttl: int) -> dpkt.dns.DNS.RR:
    return dpkt.dns.DNS.RR(
        name=name, type=dpkt.dns.DNS_AAAA, cls=dpkt.dns.DNS_IN, ttl=ttl, ip6=addr
    )


def capture_frames(captures: Path, name: str) -> list[bytes]:
    """Raw frames of a shared capture, read with dpkt (independent of guard.tools.capture)."""
    with (captures / name).open("rb") as f:
        return [bytes(buf) for _, buf in dpkt.pcapng.Reader(f)]


WEATHER = "vcfingerprinting/sean_kennedy__what_is_the_weather_5_60_80_100_120_140_capture.pcap"
HOMEPOD = "smart-speakers-study/homepod_friday_night_tykes.pcap"
SONG = "vcfingerprinting/haipeng_li__what_is_the_number_one_song_this_week_5_30s.pcap"


# ---------------------------------------------------------------------------------------------
# IPv4 / TCP / UDP


def test_tcp_segment_is_reduced_to_addresses_ports_and_lengths() -> None:
    pkt = parse_ip(ip4(TCP, tcp(50000, 443, b"\x17\x03\x03\x00\x10" + bytes(16), seq=7, ack=9)))
    assert pkt == Packet(
        version=4,
        src="192.168.86.40",
        dst="52.94.233.109",
        proto=TCP,
        sport=50000,
        dport=443,
        payload_len=21,
        wire_len=61,
        flags=ACK | PSH,
        seq=7,
        ack=9,
        hint=Hint.TLS,
        payload=b"\x17\x03\x03\x00\x10" + bytes(16),
    )


def test_src_mac_is_passed_through_and_taken_from_ethernet() -> None:
    assert parse_ip(ip4(TCP, tcp(1, 2)), "aa:bb:cc:dd:ee:ff").src_mac == "aa:bb:cc:dd:ee:ff"
    assert parse_frame(eth(ip4(TCP, tcp(1, 2))), 1).src_mac == "68:db:f5:90:19:64"


def test_tcp_options_are_skipped_by_data_offset() -> None:
    options = b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps
    pkt = parse_ip(ip4(TCP, tcp(1, 443, b"hello", doff=8, options=options)))
    assert (pkt.payload, pkt.payload_len) == (b"hello", 5)


def test_ipv4_options_are_skipped_by_ihl() -> None:
    router_alert = b"\x94\x04\x00\x00"  # IGMP reports carry this (seen in the weather capture)
    pkt = parse_ip(ip4(UDP, udp(5000, 6000, b"xy"), ihl=6, options=router_alert))
    assert (pkt.sport, pkt.dport, pkt.payload) == (5000, 6000, b"xy")


def test_syn_carries_flags_and_sequence_number() -> None:
    pkt = parse_ip(ip4(TCP, tcp(40000, 443, seq=0xFFFFFFF0, ack=0, flags=SYN)))
    assert (pkt.flags, pkt.seq, pkt.payload_len, pkt.payload) == (SYN, 0xFFFFFFF0, 0, b"")


def test_ethernet_padding_is_not_payload() -> None:
    # A bare ACK is 54 bytes; Ethernet pads it to 60. The IP total length says where it ends.
    frame = eth(ip4(TCP, tcp(1, 443))) + b"\x00" * 6
    pkt = parse_frame(frame, 1)
    assert (pkt.payload_len, pkt.payload, pkt.wire_len) == (0, b"", 40)


def test_udp_length_bounds_the_datagram_inside_padding() -> None:
    frame = eth(ip4(UDP, udp(5353, 5353, b"ab"))) + bytes(16)
    pkt = parse_frame(frame, 1)
    assert (pkt.payload_len, pkt.payload) == (2, b"ab")


def test_payload_is_cut_to_keep_payload_but_length_is_whole() -> None:
    data = b"\x17\x03\x03\x04\x00" + bytes(1024)
    pkt = parse_ip(ip4(TCP, tcp(1, 443, data)), keep_payload=16)
    assert (len(pkt.payload), pkt.payload_len, pkt.hint) == (16, 1029, Hint.TLS)
    assert parse_ip(ip4(TCP, tcp(1, 443, data)), keep_payload=0).payload == b""


def test_client_hello_payload_is_kept_whole() -> None:
    hello = tls_hello()
    pkt = parse_ip(ip4(TCP, tcp(50000, 443, hello)), keep_payload=8)
    assert pkt.hint is Hint.TLS_HELLO
    assert pkt.payload == hello


def test_snaplen_truncated_packet_takes_lengths_from_the_header() -> None:
    # A capture with snaplen 96 keeps the headers and 42 payload bytes of a 1448-byte segment.
    full = ip4(TCP, tcp(1, 443, b"\x17\x03\x03\x05\xa3" + bytes(1443)))
    pkt = parse_ip(full[:96])
    assert (pkt.payload_len, pkt.wire_len, len(pkt.payload)) == (1448, 1488, 56)


def test_tcp_header_cut_by_snaplen_is_malformed_not_an_exception() -> None:
    full = ip4(TCP, tcp(1, 443, bytes(100)))
    assert isinstance(parse_ip(full[:30]), Malformed)


def test_tcp_options_cut_by_snaplen_still_give_ports() -> None:
    full = ip4(TCP, tcp(1, 443, b"data", doff=15, options=bytes(40)))
    pkt = parse_ip(full[:45])
    assert (pkt.sport, pkt.dport, pkt.payload_len, pkt.payload) == (1, 443, 4, b"")


def test_total_length_zero_is_segmentation_offload() -> None:
    # Captured on the sending host with TSO, the IPv4 total length reads 0 (Wireshark: "TSO").
    pkt = parse_ip(ip4(TCP, tcp(1, 443, bytes(3000)), total=0))
    assert (pkt.payload_len, pkt.wire_len) == (3000, 3040)


def test_other_protocols_have_no_ports() -> None:
    icmp = b"\x08\x00\x00\x00\x00\x01\x00\x01" + b"ping"
    pkt = parse_ip(ip4(1, icmp))
    assert (pkt.proto, pkt.sport, pkt.dport, pkt.payload_len, pkt.payload) == (1, 0, 0, 12, b"")


def test_first_fragment_has_ports_later_fragments_do_not() -> None:
    first = parse_ip(ip4(UDP, udp(40000, 443, bytes(1472), length=3008), frag=0x2000))
    assert (first.sport, first.dport, first.payload_len) == (40000, 443, 1472)
    later = parse_ip(ip4(UDP, bytes(1480), frag=0x2000 | 185))
    assert (later.proto, later.sport, later.dport, later.payload_len) == (UDP, 0, 0, 1480)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (ip4(TCP, tcp(1, 2), ihl=4), "ipv4 ihl < 5"),
        (ip4(TCP, tcp(1, 2), ihl=15, total=80), "ipv4 options truncated"),
        (ip4(TCP, tcp(1, 2), total=12), "ipv4 total length < header length"),
        (ip4(TCP, tcp(1, 2), total=30), "tcp header longer than ip payload"),
        (ip4(TCP, tcp(1, 2, doff=3)), "tcp data offset < 5"),
        (ip4(TCP, tcp(1, 2, b"abcd", doff=15)), "tcp data offset beyond ip payload"),
        (ip4(UDP, udp(1, 2, b"x", length=4)), "udp length < 8"),
        (ip4(UDP, udp(1, 2, b"x", length=200)), "udp length beyond ip payload"),
        (ip4(UDP, b"\x00\x35"), "udp header longer than ip payload"),
        (b"\x45\x00\x00", "ipv4 header truncated"),
        (b"\x75" + bytes(40), "ip version not 4 or 6"),
        (ip6(TCP, tcp(1, 2))[:39], "ipv6 header truncated"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_impossible_lengths_are_malformed(data: bytes, reason: str) -> None:
    assert parse_ip(data) == Malformed(reason)


def test_malformed_keeps_the_source_mac_for_counting_per_device() -> None:
    result = parse_frame(eth(ip4(TCP, tcp(1, 2), ihl=3)), 1)
    assert result == Malformed("ipv4 ihl < 5", "68:db:f5:90:19:64")


def test_bytearray_input_gives_immutable_payload() -> None:
    pkt = parse_ip(bytearray(ip4(UDP, udp(1, 2, b"abc"))))
    assert type(pkt.payload) is bytes
    hash(pkt)


# ---------------------------------------------------------------------------------------------
# IPv6


def test_ipv6_addresses_are_rfc5952_text() -> None:
    pkt = parse_ip(ip6(UDP, udp(5000, 443, b"q")))
    assert (pkt.version, pkt.src, pkt.dst) == (6, "2001:db8::1", "2607:f8b0:4005:800::2004")
    assert pkt.wire_len == 40 + 9


def test_ipv6_extension_headers_are_walked() -> None:
    hop = bytes([60, 0]) + bytes(6)  # hop-by-hop -> destination options, 8 bytes
    dst = bytes([43, 1]) + bytes(14)  # destination options -> routing, 16 bytes
    rt = bytes([TCP, 0, 0, 0]) + bytes(4)  # routing -> TCP, 8 bytes
    pkt = parse_ip(ip6(0, hop + dst + rt + tcp(1234, 443, b"hi")))
    assert (pkt.proto, pkt.sport, pkt.dport, pkt.payload, pkt.payload_len) == (
        TCP,
        1234,
        443,
        b"hi",
        2,
    )


def test_ipv6_fragments() -> None:
    first = struct.pack("!BBHI", UDP, 0, 0x0001, 99)  # offset 0, more fragments
    pkt = parse_ip(ip6(44, first + udp(7000, 443, bytes(100), length=3000)))
    assert (pkt.proto, pkt.sport, pkt.dport) == (UDP, 7000, 443)
    later = struct.pack("!BBHI", UDP, 0, (1448 // 8) << 3, 99)
    pkt = parse_ip(ip6(44, later + bytes(200)))
    assert (pkt.proto, pkt.sport, pkt.dport, pkt.payload_len) == (UDP, 0, 0, 200)


def test_ipv6_extension_header_beyond_payload_is_malformed() -> None:
    hop = bytes([TCP, 30]) + bytes(6)  # claims 248 bytes
    assert parse_ip(ip6(0, hop + tcp(1, 2))) == Malformed(
        "ipv6 extension header beyond payload length"
    )
    assert parse_ip(ip6(0, b"\x06\x00", plen=8)) == Malformed("ipv6 extension header truncated")


# ---------------------------------------------------------------------------------------------
# Link layers


def test_vlan_and_qinq_tags_are_skipped() -> None:
    inner = ip4(UDP, udp(1, 2, b"v"))
    for tags in (((0x8100, 10),), ((0x88A8, 100), (0x8100, 10)), ((0x9100, 1), (0x8100, 2))):
        frame = eth(inner, tags=tags)
        assert parse_frame(frame, 1).payload == b"v"
    too_many = eth(inner, tags=((0x8100, 1),) * 5)
    assert parse_frame(too_many, 1) == Malformed("too many vlan tags", "68:db:f5:90:19:64")


def test_linux_cooked_v1_and_v2() -> None:
    inner = ip4(TCP, tcp(1, 443))
    sll = struct.pack("!HHH8sH", 4, 1, 6, MAC + b"\x00\x00", 0x0800) + inner
    assert parse_frame(sll, 113).src_mac == "68:db:f5:90:19:64"
    sll_any = struct.pack("!HHH8sH", 0, 772, 0, bytes(8), 0x0800) + inner  # loopback: no MAC
    assert parse_frame(sll_any, 113).src_mac is None
    sll2 = struct.pack("!HHIHBB8s", 0x86DD, 0, 3, 1, 4, 6, MAC + b"\x00\x00") + ip6(
        UDP, udp(1, 2, b"")
    )
    pkt = parse_frame(sll2, 276)
    assert (pkt.version, pkt.src_mac) == (6, "68:db:f5:90:19:64")


@pytest.mark.parametrize("linktype", [101, 12, 14, 228, 229])
def test_raw_ip_link_types(linktype: int) -> None:
    data = ip4(UDP, udp(1, 2, b"r")) if linktype != 229 else ip6(UDP, udp(1, 2, b"r"))
    assert parse_frame(data, linktype).payload == b"r"


def test_bsd_loopback_in_either_byte_order() -> None:
    inner4 = ip4(UDP, udp(1, 2, b"4"))
    inner6 = ip6(UDP, udp(1, 2, b"6"))
    assert parse_frame(struct.pack("<I", 2) + inner4, 0).payload == b"4"
    assert parse_frame(struct.pack(">I", 2) + inner4, 0).payload == b"4"
    for family in (24, 28, 30):
        assert parse_frame(struct.pack("<I", family) + inner6, 0).payload == b"6"
    assert parse_frame(struct.pack("<I", 7) + inner4, 0) is None


def test_frames_without_ip_are_none() -> None:
    arp = eth(bytes(28), 0x0806)
    lldp = eth(bytes(30), 0x88CC)
    llc = GW_MAC + MAC + struct.pack("!H", 39) + b"\x42\x42\x03" + bytes(36)  # 802.3 + LLC (STP)
    assert parse_frame(arp, 1) is None
    assert parse_frame(lldp, 1) is None
    assert parse_frame(llc, 1) is None
    assert parse_frame(b"", 1) is None
    assert parse_frame(ip4(UDP, udp(1, 2, b"")), 127) is None  # radiotap: not ours
    assert parse_ip(b"") is None


# ---------------------------------------------------------------------------------------------
# Payload hints


def test_stun_binding_request_is_hinted() -> None:
    stun = struct.pack("!HHI12s", 0x0001, 0, 0x2112A442, bytes(range(12)))
    assert parse_ip(ip4(UDP, udp(50000, 3478, stun))).hint is Hint.STUN
    assert (
        parse_ip(ip4(UDP, udp(50000, 3478, stun[:4] + b"\x00\x00\x00\x00" + stun[8:]))).hint
        is Hint.NONE
    )


def test_dtls_record_is_hinted() -> None:
    record = b"\x16\xfe\xfd" + bytes(8) + b"\x00\x10" + bytes(16)
    assert parse_ip(ip4(UDP, udp(50000, 50001, record))).hint is Hint.DTLS


def test_quic_initial_is_hinted_and_kept_whole() -> None:
    initial = (FIXTURES / "rfc9001_a2_client_initial.bin").read_bytes()
    pkt = parse_ip(ip4(UDP, udp(50000, 443, initial)))
    assert (pkt.hint, pkt.payload) == (Hint.QUIC_INITIAL, initial)
    v2 = (FIXTURES / "rfc9369_a2_client_initial.bin").read_bytes()
    assert parse_ip(ip4(UDP, udp(50000, 443, v2))).hint is Hint.QUIC_INITIAL


def test_quic_short_header_is_hinted_only_on_port_443() -> None:
    short = b"\x41" + bytes(40)
    assert parse_ip(ip4(UDP, udp(50000, 443, short))).hint is Hint.QUIC
    assert parse_ip(ip4(UDP, udp(50000, 8443, short))).hint is Hint.NONE


def test_rtp_is_not_mistaken_for_quic() -> None:
    rtp = b"\x80\x6f" + bytes(170)  # RTP v2, dynamic payload type
    assert parse_ip(ip4(UDP, udp(50000, 443, rtp))).hint is Hint.NONE


# ---------------------------------------------------------------------------------------------
# DNS


def test_dns_cname_chain_maps_every_name_on_it() -> None:
    msg = dns_response(
        "a.example.com",
        [
            rr_cname("a.example.com", "b.cdn.net", 300),
            rr_a("b.cdn.net", bytes([1, 2, 3, 4]), 60),
        ],
    )
    pkt = parse_ip(ip4(UDP, udp(53, 40000, msg), src=bytes([192, 168, 86, 1]), dst=SRC4))
    assert pkt.hint is Hint.DNS
    assert pkt.dns == (
        DnsAnswer("a.example.com", "1.2.3.4", 60),
        DnsAnswer("b.cdn.net", "1.2.3.4", 60),
    )


def test_dns_ttl_of_the_head_is_the_smallest_on_the_chain() -> None:
    msg = dns_response(
        "Bob-Dispatch-Prod-NA.amazon.com",
        [  # 0x20 mixed case
            rr_cname("bob-dispatch-prod-na.amazon.com", "edge.amazon.com", 20),
            rr_cname("edge.amazon.com", "x.akamai.net", 600),
            rr_a("x.akamai.net", bytes([52, 94, 233, 109]), 3600),
            rr_aaaa("x.akamai.net", DST6, 3600),
        ],
    )
    assert parse_dns_answers(msg) == (
        DnsAnswer("bob-dispatch-prod-na.amazon.com", "52.94.233.109", 20),
        DnsAnswer("edge.amazon.com", "52.94.233.109", 600),
        DnsAnswer("x.akamai.net", "52.94.233.109", 3600),
        DnsAnswer("bob-dispatch-prod-na.amazon.com", "2607:f8b0:4005:800::2004", 20),
        DnsAnswer("edge.amazon.com", "2607:f8b0:4005:800::2004", 600),
        DnsAnswer("x.akamai.net", "2607:f8b0:4005:800::2004", 3600),
    )


def test_dns_records_unrelated_to_the_question_are_ignored() -> None:
    msg = dns_response(
        "a.example.com",
        [
            rr_a("a.example.com", bytes([1, 1, 1, 1]), 60),
            rr_a("bank.example.org", bytes([6, 6, 6, 6]), 60),  # an injected answer
        ],
    )
    assert parse_dns_answers(msg) == (DnsAnswer("a.example.com", "1.1.1.1", 60),)


def test_dns_cname_loop_ends() -> None:
    msg = dns_response(
        "a.test",
        [
            rr_cname("a.test", "b.test", 60),
            rr_cname("b.test", "a.test", 60),
            rr_a("b.test", bytes([9, 9, 9, 9]), 60),
        ],
    )
    assert [a.name for a in parse_dns_answers(msg)] == ["a.test", "b.test"]


def test_dns_queries_errors_and_garbage_give_no_answers() -> None:
    query = bytes(dpkt.dns.DNS(id=1, qd=[dpkt.dns.DNS.Q(name="a.test")]))
    assert parse_dns_answers(query) == ()
    nxdomain = bytearray(dns_response("a.test", [rr_a("a.test", bytes(4), 1)]))
    nxdomain[3] |= 3
    assert parse_dns_answers(bytes(nxdomain)) == ()
    # A question name that is a compression pointer to itself must not loop.
    looping = bytes.fromhex("000781800001000100000000") + b"\xc0\x0c" + bytes.fromhex("00010001")
    assert parse_dns_answers(looping) == ()


def test_dns_hostile_names_are_made_inert() -> None:
    msg = dns_response("a.example.com", [rr_a("a.example.com", bytes([1, 2, 3, 4]), 5)])
    # Replace the question's first label "a" by "\x1b" (an escape character).
    hostile = msg.replace(b"\x01a\x07example", b"\x01\x1b\x07example")
    assert parse_dns_answers(hostile) == (DnsAnswer("?.example.com", "1.2.3.4", 5),)


def test_dns_over_tcp_in_one_segment() -> None:
    msg = dns_response("a.test", [rr_a("a.test", bytes([10, 0, 0, 1]), 30)])
    pkt = parse_ip(ip4(TCP, tcp(53, 40000, struct.pack("!H", len(msg)) + msg)))
    assert pkt.dns == (DnsAnswer("a.test", "10.0.0.1", 30),)


def test_normalise_name() -> None:
    assert normalise_name(b"Example.COM.") == "example.com"
    assert normalise_name(b"_dns.resolver.arpa") == "_dns.resolver.arpa"
    assert normalise_name(b"ev\xc3\xa9l/<b>.com") == "ev??l??b?.com"
    assert normalise_name(b"a" * 300) == "a" * 253
    assert normalise_name(b".") is None
    assert normalise_name(b"") is None


# ---------------------------------------------------------------------------------------------
# The shared captures


def test_parse_frame_agrees_with_dpkt_on_shared_captures(captures: Path) -> None:
    frames = capture_frames(captures, WEATHER) + capture_frames(captures, SONG)
    checked = 0
    for frame in frames:
        pkt = parse_frame(frame, 1)
        ip = dpkt.ethernet.Ethernet(frame).data
        if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)):
            assert pkt is None
            continue
        assert isinstance(pkt, Packet)
        l4 = ip.data
        if isinstance(l4, dpkt.tcp.TCP):
            assert (pkt.sport, pkt.dport, pkt.seq, pkt.ack, pkt.flags, pkt.payload_len) == (
                l4.sport,
                l4.dport,
                l4.seq,
                l4.ack,
                l4.flags,
                len(l4.data),
            )
            checked += 1
        elif isinstance(l4, dpkt.udp.UDP):
            assert (pkt.sport, pkt.dport, pkt.payload_len) == (l4.sport, l4.dport, len(l4.data))
            checked += 1
    assert checked > 5000


def test_shared_capture_dns_names_bob_dispatch(captures: Path) -> None:
    frames = capture_frames(captures, WEATHER)
    names = {a.name for f in frames if (p := parse_frame(f, 1)) for a in p.dns}
    assert "bob-dispatch-prod-na.amazon.com" in names
    assert "device-metrics-us.amazon.com" in names


def test_shared_capture_has_hellos_and_ipv6(captures: Path) -> None:
    parsed = [parse_frame(f, 1) for f in capture_frames(captures, HOMEPOD)]
    assert sum(1 for p in parsed if isinstance(p, Packet) and p.hint is Hint.TLS_HELLO) > 10
    assert any(isinstance(p, Packet) and p.version == 6 for p in parsed)
    assert not any(isinstance(p, Malformed) for p in parsed)


# ---------------------------------------------------------------------------------------------
# Hostile input: nothing raises, and the last-resort handler is never what answered.


@pytest.fixture(scope="module")
def sample_frames(request: pytest.FixtureRequest) -> list[bytes]:
    """Built frames, plus real ones from a shared capture when it is there."""
    frames = [
        eth(ip4(TCP, tcp(50000, 443, tls_hello()))),
        eth(
            ip6(
                0,
                bytes([44, 0])
                + bytes(6)
                + struct.pack("!BBHI", UDP, 0, 1, 5)
                + udp(
                    53,
                    1,
                    dns_response(
                        "a.test", [rr_cname("a.test", "b.test", 5), rr_a("b.test", bytes(4), 5)]
                    ),
                ),
            )
        ),
        eth(
            ip4(
                UDP,
                udp(50000, 443, (FIXTURES / "rfc9001_a2_client_initial.bin").read_bytes()[:300]),
            ),
            tags=((0x8100, 5),),
        ),
    ]
    try:
        real = capture_frames(request.getfixturevalue("captures"), WEATHER)
    except pytest.skip.Exception:
        real = []
    # A TLS ClientHello, a DNS response, and a plain ACK from the real capture.
    hello = next((f for f in real if (p := parse_frame(f, 1)) and p.hint is Hint.TLS_HELLO), None)
    dns = next((f for f in real if (p := parse_frame(f, 1)) and p.dns), None)
    return frames + [f for f in (hello, dns, real[0] if real else None) if f]


def _assert_total(result: object) -> None:
    assert result is None or isinstance(result, (Packet, Malformed))
    if isinstance(result, Malformed):
        assert result.reason != INTERNAL_ERROR


def test_every_truncation_of_real_frames_is_handled(sample_frames: list[bytes]) -> None:
    for frame in sample_frames:
        for n in range(len(frame) + 1):
            _assert_total(parse_frame(frame[:n], 1))
            _assert_total(parse_ip(frame[14:n]))


def test_every_single_byte_flip_of_real_frames_is_handled(sample_frames: list[bytes]) -> None:
    for frame in sample_frames:
        for i in range(min(len(frame), 200)):
            for value in (0x00, 0xFF, frame[i] ^ 0x80):
                mutated = frame[:i] + bytes([value]) + frame[i + 1 :]
                _assert_total(parse_frame(mutated, 1))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=256), linktype=st.sampled_from([0, 1, 12, 101, 113, 228, 229, 276]))
def test_random_bytes_never_raise(data: bytes, linktype: int) -> None:
    _assert_total(parse_frame(data, linktype))
    _assert_total(parse_ip(data))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    version=st.sampled_from([0x45, 0x46, 0x4F, 0x60]),
    proto=st.sampled_from([TCP, UDP, 0, 1, 43, 44, 60]),
    lengths=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
    rest=st.binary(max_size=120),
)
def test_random_headers_with_plausible_starts_never_raise(
    version: int, proto: int, lengths: tuple[int, int], rest: bytes
) -> None:
    if version == 0x60:
        data = struct.pack("!IHBB", 0x60000000, lengths[0], proto, 64) + bytes(32) + rest
    else:
        data = (
            struct.pack("!BBHHHBBH", version, 0, lengths[0], 0, lengths[1] & 0x3FFF, 64, proto, 0)
            + bytes(8)
            + rest
        )
    _assert_total(parse_ip(data))


def test_dns_pointer_chains_are_bounded() -> None:
    # 200 pointers each 2 bytes behind the next: legal-looking, but a CPU sink if followed.
    header = bytes.fromhex("000781800001000100000000")
    question = b"\x01a\x00" + bytes.fromhex("00010001")
    chain = b"".join(
        struct.pack("!H", 0xC000 | (12 + len(question) + 2 * i - 2)) for i in range(200)
    )
    answer = (
        struct.pack("!H", 0xC000 | (12 + len(question) + 2 * 199))
        + bytes.fromhex("00010001000000050004")
        + bytes(4)
    )
    msg = header + question + chain + answer
    with pytest.raises(ValueError, match="bad DNS pointer"):
        _dns_name(msg, len(msg) - len(answer))
    assert parse_dns_answers(msg) == ()
    assert _dns_name(msg, len(msg) - len(answer) - 2 * 150) == (b"", len(msg) - len(answer) - 298)
