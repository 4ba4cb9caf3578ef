"""guard.shell.inject: the TCP resets the guard builds and the Injector that sends them.

`tcp_reset`'s bytes are parsed back with dpkt (independent of guard) and their checksums are
verified twice: by our own ones'-complement sum over the (pseudo-)header and by dpkt recomputing
them. The Injector is given fake sockets (or a fake `socket` module), so nothing touches the
network; whether the kernel accepts these packets on a real raw socket is left to tests/e2e.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
from typing import Any

import dpkt
import pytest

from guard.shell import inject
from guard.shell.inject import Injector, _checksum, tcp_reset

DEVICE4, REMOTE4 = "192.168.86.40", "52.94.233.109"
DEVICE6, REMOTE6 = "2001:db8::40", "2607:f8b0:4005:800::2004"
TH_RST, TH_ACK = dpkt.tcp.TH_RST, dpkt.tcp.TH_ACK


def ones_complement_sum(data: bytes) -> int:
    """RFC 1071, written differently from guard.shell.inject._checksum: a 16-bit end-around carry add."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += int.from_bytes(data[i:i + 2], "big")
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header(src: str, dst: str, length: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        return s.packed + d.packed + struct.pack("!BBH", 0, 6, length)
    return s.packed + d.packed + struct.pack("!IxxxB", length, 6)


def parse(packet: bytes) -> tuple[Any, dpkt.tcp.TCP]:
    ip: Any = dpkt.ip.IP(packet) if packet[0] >> 4 == 4 else dpkt.ip6.IP6(packet)
    assert isinstance(ip.data, dpkt.tcp.TCP)
    return ip, ip.data


def text(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


# ---------------------------------------------------------------------------------------------
# _checksum


def test_checksum_matches_the_rfc_1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (after the carry)
    assert _checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF


def test_checksum_pads_an_odd_length_with_a_zero_byte() -> None:
    assert _checksum(b"\x12") == ~0x1200 & 0xFFFF
    assert _checksum(b"\x12\x34\x56") == _checksum(b"\x12\x34\x56\x00")


def test_checksum_folds_every_carry() -> None:
    assert _checksum(b"\xff\xff" * 3) == 0  # 0x2fffd folds to 0xffff
    assert _checksum(b"\xff\xff\x00\x01") == ~0x0001 & 0xFFFF  # 0x10000 folds to 0x0001
    # 0x1ffff folds to 0x10000, which needs a second fold to 0x0001
    assert _checksum(b"\xff\xff\xff\xff\x00\x01") == ~0x0001 & 0xFFFF


def test_checksum_agrees_with_an_independent_sum_on_random_data() -> None:
    rng = random.Random(1071)
    for size in list(range(0, 8)) + [rng.randrange(8, 2000) for _ in range(200)]:
        data = rng.randbytes(size)
        assert _checksum(data) == ~ones_complement_sum(data) & 0xFFFF


# ---------------------------------------------------------------------------------------------
# tcp_reset


@pytest.mark.parametrize(("src", "dst"), [(REMOTE4, DEVICE4), (DEVICE6, REMOTE6)])
def test_reset_without_ack_carries_rst_only_and_the_exact_sequence_number(
    src: str, dst: str
) -> None:
    ip, tcp = parse(tcp_reset(src, 443, dst, 40001, 0xDEADBEEF))
    assert (text(ip.src), tcp.sport, text(ip.dst), tcp.dport) == (src, 443, dst, 40001)
    assert tcp.flags == TH_RST
    assert tcp.seq == 0xDEADBEEF and tcp.ack == 0
    assert tcp.off == 5 and tcp.data == b"" and tcp.urp == 0


@pytest.mark.parametrize(("src", "dst"), [(DEVICE4, REMOTE4), (REMOTE6, DEVICE6)])
def test_reset_with_ack_carries_rst_ack_and_the_exact_numbers(src: str, dst: str) -> None:
    ip, tcp = parse(tcp_reset(src, 40001, dst, 443, 1000, 5300))
    assert (text(ip.src), tcp.sport, text(ip.dst), tcp.dport) == (src, 40001, dst, 443)
    assert tcp.flags == TH_RST | TH_ACK
    assert (tcp.seq, tcp.ack) == (1000, 5300)


def test_reset_with_ack_zero_still_sets_the_ack_flag() -> None:
    _, tcp = parse(tcp_reset(DEVICE4, 40001, REMOTE4, 443, 1000, 0))
    assert tcp.flags == TH_RST | TH_ACK and tcp.ack == 0


def test_reset_sequence_numbers_wrap_to_32_bits() -> None:
    _, tcp = parse(tcp_reset(DEVICE4, 40001, REMOTE4, 443, 2**32 + 7, 2**32 - 1))
    assert (tcp.seq, tcp.ack) == (7, 2**32 - 1)


def test_ipv4_reset_has_a_plain_20_byte_header_and_40_bytes_in_all() -> None:
    packet = tcp_reset(REMOTE4, 443, DEVICE4, 40001, 1)
    ip, _ = parse(packet)
    assert len(packet) == 40
    assert ip.v == 4 and ip.hl == 5 and ip.len == 40
    assert ip.p == dpkt.ip.IP_PROTO_TCP and ip.ttl == 64
    assert ip.df == 1 and ip.mf == 0 and ip.offset == 0  # don't fragment, not a fragment


def test_ipv6_reset_has_a_40_byte_header_and_a_20_byte_payload() -> None:
    packet = tcp_reset(REMOTE6, 443, DEVICE6, 40001, 1)
    ip, _ = parse(packet)
    assert len(packet) == 60
    assert ip.v == 6 and ip.plen == 20 and ip.nxt == dpkt.ip.IP_PROTO_TCP and ip.hlim == 64
    assert packet[:4] == b"\x60\0\0\0"  # version 6, traffic class 0, flow label 0


@pytest.mark.parametrize("ack", [None, 5300])
@pytest.mark.parametrize(("src", "dst"), [(REMOTE4, DEVICE4), (DEVICE6, REMOTE6)])
def test_reset_checksums_verify_over_the_pseudo_header(
    src: str, dst: str, ack: int | None
) -> None:
    packet = tcp_reset(src, 443, dst, 40001, 0x89ABCDEF, ack)
    header = 20 if packet[0] >> 4 == 4 else 40
    segment = packet[header:]
    if header == 20:
        assert ones_complement_sum(packet[:20]) == 0xFFFF  # the IP header checksum verifies
    assert ones_complement_sum(pseudo_header(src, dst, len(segment)) + segment) == 0xFFFF


@pytest.mark.parametrize(("src", "dst"), [(REMOTE4, DEVICE4), (DEVICE6, REMOTE6)])
def test_reset_checksums_equal_what_dpkt_computes(src: str, dst: str) -> None:
    ip, tcp = parse(tcp_reset(src, 443, dst, 40001, 123456789, 987654321))
    sums = (getattr(ip, "sum", None), tcp.sum)
    if ip.v == 4:
        ip.sum = 0
    tcp.sum = 0
    again, tcp_again = parse(bytes(ip))  # dpkt fills zero checksums in when packing
    assert (getattr(again, "sum", None), tcp_again.sum) == sums


# ---------------------------------------------------------------------------------------------
# Injector


class FakeSocket:
    """A raw socket that records what would be sent, or raises what it is told to."""

    def __init__(self, family: int = socket.AF_INET, raises: OSError | None = None) -> None:
        self.family = family
        self.raises = raises
        self.sent: list[tuple[bytes, tuple[Any, ...]]] = []
        self.closed = False

    def sendto(self, data: bytes, address: tuple[Any, ...]) -> int:
        if self.raises is not None:
            raise self.raises
        self.sent.append((data, address))
        return len(data)

    def close(self) -> None:
        self.closed = True


class FakeSocketModule:
    """Stands in for the `socket` module inside guard.shell.inject: records the sockets it opens."""

    AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
    SOCK_RAW, IPPROTO_RAW = socket.SOCK_RAW, socket.IPPROTO_RAW

    def __init__(self, raises: OSError | None = None) -> None:
        self.raises = raises
        self.opened: list[tuple[tuple[int, int, int], FakeSocket]] = []

    def socket(self, family: int, kind: int, proto: int) -> FakeSocket:
        if self.raises is not None:
            raise self.raises
        sock = FakeSocket(family)
        self.opened.append(((family, kind, proto), sock))
        return sock


@pytest.fixture
def fake_socket_module(monkeypatch: pytest.MonkeyPatch) -> FakeSocketModule:
    module = FakeSocketModule()
    monkeypatch.setattr(inject, "socket", module)
    return module


def test_send_hands_the_packet_to_the_ipv4_raw_socket() -> None:
    sock = FakeSocket()
    injector = Injector(_v4=sock)  # type: ignore[arg-type]
    packet = tcp_reset(REMOTE4, 443, DEVICE4, 40001, 1)
    assert injector.send(packet, DEVICE4) is True
    assert sock.sent == [(packet, (DEVICE4, 0))]
    assert (injector.sent, injector.errors) == (1, 0)


def test_send_hands_the_packet_to_the_ipv6_raw_socket() -> None:
    v4, v6 = FakeSocket(), FakeSocket(socket.AF_INET6)
    injector = Injector(_v4=v4, _v6=v6)  # type: ignore[arg-type]
    packet = tcp_reset(REMOTE6, 443, DEVICE6, 40001, 1)
    assert injector.send(packet, DEVICE6) is True
    assert v6.sent == [(packet, (DEVICE6, 0, 0, 0))] and v4.sent == []
    assert injector.sent == 1


def test_send_returns_false_and_counts_when_the_socket_raises() -> None:
    sock = FakeSocket(raises=OSError(101, "Network is unreachable"))
    injector = Injector(_v4=sock)  # type: ignore[arg-type]
    assert injector.send(tcp_reset(DEVICE4, 40001, REMOTE4, 443, 1), REMOTE4) is False
    assert (injector.sent, injector.errors) == (0, 1)
    assert "Network is unreachable" in injector.last_error


def test_send_returns_false_when_the_raw_socket_cannot_be_opened(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    module = FakeSocketModule(raises=PermissionError(1, "Operation not permitted"))
    monkeypatch.setattr(inject, "socket", module)
    injector = Injector()
    assert injector.send(tcp_reset(DEVICE4, 40001, REMOTE4, 443, 1), REMOTE4) is False
    assert injector.errors == 1 and "Operation not permitted" in injector.last_error
    module.raises = None  # e.g. the capability was granted: the next send opens it
    assert injector.send(tcp_reset(DEVICE4, 40001, REMOTE4, 443, 1), REMOTE4) is True
    assert injector.sent == 1 and len(module.opened) == 1


def test_raw_sockets_are_opened_lazily_once_per_family_and_closed(
    fake_socket_module: FakeSocketModule
) -> None:
    injector = Injector()
    assert fake_socket_module.opened == []
    injector.send(tcp_reset(DEVICE4, 1, REMOTE4, 2, 1), REMOTE4)
    injector.send(tcp_reset(REMOTE4, 2, DEVICE4, 1, 1), DEVICE4)
    injector.send(tcp_reset(DEVICE6, 1, REMOTE6, 2, 1), REMOTE6)
    assert [args for args, _ in fake_socket_module.opened] == [
        (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
        (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW),
    ]
    (_, v4), (_, v6) = fake_socket_module.opened
    assert len(v4.sent) == 2 and len(v6.sent) == 1
    injector.close()
    assert v4.closed and v6.closed
    injector.send(tcp_reset(DEVICE4, 1, REMOTE4, 2, 1), REMOTE4)
    assert len(fake_socket_module.opened) == 3  # reopened after close


@pytest.mark.parametrize(("device", "remote"), [(DEVICE4, REMOTE4), (DEVICE6, REMOTE6)])
def test_reset_both_sends_one_reset_toward_each_end_with_its_own_sequence_number(
    fake_socket_module: FakeSocketModule, device: str, remote: str
) -> None:
    injector = Injector()
    assert injector.reset_both(device, 40001, remote, 443, seq_to_device=5300,
                               seq_to_remote=1000) == 2
    [(_, sock)] = fake_socket_module.opened
    (to_device, addr_device), (to_remote, addr_remote) = sock.sent
    assert addr_device[0] == device and addr_remote[0] == remote
    ip, tcp = parse(to_device)  # as if from the remote, at the device's latest ACK
    assert (text(ip.src), tcp.sport, text(ip.dst), tcp.dport) == (remote, 443, device, 40001)
    assert tcp.seq == 5300 and tcp.flags == TH_RST
    ip, tcp = parse(to_remote)  # from the device's own address, at the remote's latest ACK
    assert (text(ip.src), tcp.sport, text(ip.dst), tcp.dport) == (device, 40001, remote, 443)
    assert tcp.seq == 1000 and tcp.flags == TH_RST
    assert injector.sent == 2


def test_reset_both_skips_a_direction_without_a_sequence_number(
    fake_socket_module: FakeSocketModule
) -> None:
    injector = Injector()
    assert injector.reset_both(DEVICE4, 40001, REMOTE4, 443, None, 1000) == 1
    [(_, sock)] = fake_socket_module.opened
    [(packet, address)] = sock.sent
    assert address == (REMOTE4, 0) and parse(packet)[1].seq == 1000
    assert injector.reset_both(DEVICE4, 40001, REMOTE4, 443, 5300, None) == 1
    assert sock.sent[-1][1] == (DEVICE4, 0) and parse(sock.sent[-1][0])[1].seq == 5300


def test_reset_both_with_no_sequence_numbers_sends_nothing(
    fake_socket_module: FakeSocketModule
) -> None:
    injector = Injector()
    assert injector.reset_both(DEVICE4, 40001, REMOTE4, 443, None, None) == 0
    assert fake_socket_module.opened == [] and injector.sent == 0


def test_reset_both_counts_only_the_resets_that_went_out() -> None:
    class FailToward(FakeSocket):
        def sendto(self, data: bytes, address: tuple[Any, ...]) -> int:
            if address[0] == REMOTE4:
                raise OSError(1, "Operation not permitted")
            return super().sendto(data, address)

    sock = FailToward()
    injector = Injector(_v4=sock)  # type: ignore[arg-type]
    assert injector.reset_both(DEVICE4, 40001, REMOTE4, 443, 5300, 1000) == 1
    assert [address for _, address in sock.sent] == [(DEVICE4, 0)]
    assert (injector.sent, injector.errors) == (1, 1)

