"""Addresses and secrets the shell's servers will take, checked where the config is loaded.

Rules of this module: pure (no sockets, no clock): `load_config` (and so `run`, `doctor`,
`firewall show`, `web token`) and the servers themselves apply these same checks, so nothing that
loads is refused at start, and the reverse. Errors are one line, never a traceback.
"""

from __future__ import annotations

import base64
import ipaddress


class WebError(Exception):
    """A one-line, user-facing problem with the web prompt's setup (address, secret, cert)."""


def parse_listen(listen: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """"192.168.1.1:8787" or "[fd00::1]:8787" -> (address, port)."""
    host, sep, port_text = listen.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        if not sep or not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError
        if ":" in host and not bracketed:
            raise ValueError  # "fd00::1:8787" is ambiguous
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise WebError(f"web.listen: expected ADDRESS:PORT with an IP address "
                       f"(192.168.1.1:8787 or [fd00::1]:8787), got {listen!r}") from None
    return address, int(port_text)


def check_listen(listen: str, hosts: tuple[str, ...] = (), allow_public: bool = False,
                 ) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """`[web] listen` as the prompt will use it, or WebError: the one check that config loading
    (so `doctor`, `firewall show`, `web token`) and the prompt itself apply alike."""
    address, port = parse_listen(listen)
    if not allow_public and not _is_lan(address):
        what = ("every interface, the WAN side included" if address.is_unspecified
                else "not a LAN address")
        raise WebError(f"web.listen: refusing to listen on {address} ({what}); give "
                       f"the router's LAN address, e.g. 192.168.1.1:8787")
    if address.is_unspecified and not any(h.strip() for h in hosts):
        raise WebError("web.hosts: list the names and addresses the prompt is reached by "
                       "when it listens on every interface")
    return address, port


def _is_lan(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified or address.is_multicast:
        return False
    return address.is_private or address.is_loopback or address.is_link_local


def _parse_hash(stored: str) -> tuple[str, tuple[int, ...], bytes, bytes]:
    """Split a stored hash; WebError (never a traceback) when it is not one of ours."""
    parts = stored.strip().split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            # Bounds keep a typo in the config from costing gigabytes per login.
            if n < 2 or n & (n - 1) or n > 1 << 20 or not 1 <= r <= 32 or not 1 <= p <= 16:
                raise ValueError("scrypt parameters out of range")
            salt, expected = _unb64(parts[4]), _unb64(parts[5])
            params: tuple[int, ...] = (n, r, p)
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            iterations = int(parts[1])
            if not 1000 <= iterations <= 10_000_000:
                raise ValueError("pbkdf2 iterations out of range")
            salt, expected = _unb64(parts[2]), _unb64(parts[3])
            params = (iterations,)
        else:
            raise ValueError("unknown format")
        if len(salt) < 8 or len(expected) < 16:
            raise ValueError("salt or hash too short")
    except (ValueError, IndexError):
        raise WebError(
            "web.password_hash: not a hash from `hash_password` "
            "(expected scrypt$N$r$p$SALT$HASH or pbkdf2_sha256$ITERATIONS$SALT$HASH)"
        ) from None
    return parts[0], params, salt, expected


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (ValueError, TypeError):
        raise ValueError("bad base64") from None


def parse_metrics_listen(listen: str) -> tuple[str, int]:
    """"host:port", "[v6]:port" or ":port" (loopback) -> (host, port). Raises ValueError."""
    text = listen.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"metrics listen address must be host:port, not {listen!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port out of range in {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # ValueError names the bad address
    elif ":" in host:  # "::1:9877": is 9877 the port or part of the address? refuse to guess
        raise ValueError(f"write an IPv6 metrics address in brackets: [{host}]:{port}")
    host = host or "127.0.0.1"  # metrics are loopback unless asked otherwise (design.md 10)
    return host, port
