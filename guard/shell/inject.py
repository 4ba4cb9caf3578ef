"""Packets the guard sends itself: TCP resets toward both ends of a denied connection.

Rules of this module: raw sockets and `struct`, no scapy (its import alone takes ~0.5 s and 73 MB;
kernel-facts.md). A reset is accepted only with the exact sequence number the receiver expects
(RFC 5961), so callers pass the numbers the engine took from passing packets. The reset toward the
remote is sent with the device's own (LAN) address: it belongs to the device's conntrack entry,
so the router's NAT translates it like any packet of that connection.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

IPPROTO_TCP = 6
RST_ACK = 0x14
RST = 0x04


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_reset(src: str, sport: int, dst: str, dport: int, seq: int, ack: int | None = None
              ) -> bytes:
    """A complete IPv4 or IPv6 packet carrying a TCP RST (RST|ACK when `ack` is given)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    flags = RST_ACK if ack is not None else RST
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, (ack or 0) & 0xFFFFFFFF,
                      5 << 4, flags, 0, 0, 0)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, IPPROTO_TCP, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64,
                             IPPROTO_TCP, 0, s.packed, d.packed)
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        return header + tcp
    pseudo = s.packed + d.packed + struct.pack("!I3xB", len(tcp), IPPROTO_TCP)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    header = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), IPPROTO_TCP, 64, s.packed, d.packed)
    return header + tcp


@dataclass(slots=True)
class Injector:
    """Sends raw packets; one socket per family, opened lazily, errors counted not raised."""

    sent: int = 0
    errors: int = 0
    last_error: str = ""
    _v4: socket.socket | None = None
    _v6: socket.socket | None = None

    def _socket(self, version: int) -> socket.socket:
        if version == 4:
            if self._v4 is None:
                self._v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            return self._v4
        if self._v6 is None:
            self._v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        return self._v6

    def send(self, packet: bytes, dst: str) -> bool:
        version = ipaddress.ip_address(dst).version
        try:
            sock = self._socket(version)
            sock.sendto(packet, (dst, 0) if version == 4 else (dst, 0, 0, 0))
        except OSError as exc:
            self.errors += 1
            self.last_error = str(exc)
            return False
        self.sent += 1
        return True

    def reset_both(self, device: str, dport: int, remote: str, rport: int,
                   seq_to_device: int | None, seq_to_remote: int | None) -> int:
        """Reset a connection toward the device and toward the remote; returns resets sent."""
        count = 0
        if seq_to_device is not None:
            count += self.send(tcp_reset(remote, rport, device, dport, seq_to_device), device)
        if seq_to_remote is not None:
            count += self.send(tcp_reset(device, dport, remote, rport, seq_to_remote), remote)
        return count

    def close(self) -> None:
        for sock in (self._v4, self._v6):
            if sock is not None:
                sock.close()
        self._v4 = self._v6 = None
