"""The LAN web prompt: held uploads on a phone, with Allow and Deny buttons.

Rules of this module: it owns HTTP, TLS, sessions and the browser-facing checks, never a decision
(every read and every decision is one `handler(request, peer)` call in the control protocol of
guard/shell/control.py). GET never changes state; every POST needs the session cookie, its CSRF token and
a same-origin Origin (or Referer); every Host header is checked against an allowlist. What reaches
a browser is rebuilt from an allowlist of fields, with attacker-controlled text (host names come
from the speaker) escaped and length-capped: no raw packet, no unexpected field, no markup. Only a
LAN address is bound unless the caller says `allow_public`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import importlib.resources
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import ssl
import tempfile
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from guard.core.listen import (
    WebError,
    _parse_hash,
    check_listen,
    parse_listen,
)

__all__ = [
    "Certificate",
    "LoginLimiter",
    "Sessions",
    "WebError",
    "WebPeer",
    "WebPrompt",
    "display_text",
    "ensure_certificate",
    "hash_password",
    "load_token",
    "parse_listen",
    "check_listen",
    "verify_password",
    "web_token",
]

log = logging.getLogger("guard.shell.web")

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]

TOKEN_BYTES = 32  # 256 bits: guessing is hopeless even without the login rate limit
SESSION_TTL_S = 12 * 3600.0  # one sign-in per day on the phone, never a session that lives on
MAX_SESSIONS = 32  # a household's phones and laptops; the oldest is dropped beyond that
# Login slowing: 5 free mistakes (typos), then 1 s, 2 s, 4 s ... up to 5 min between attempts from
# one client (an IPv4 address or an IPv6 /64, since one host can hold a whole /64). Forgotten 15
# min after the last failure.
LOGIN_FREE_FAILURES = 5
LOGIN_WINDOW_S = 900.0
LOGIN_MAX_DELAY_S = 300.0
MAX_BODY_BYTES = 16 * 1024  # the largest legitimate body is a decide of ~100 bytes
MAX_CONNECTIONS = 32  # each is a thread; a phone polling uses one or two
IO_TIMEOUT_S = 15.0  # an idle keep-alive or a stalled TLS handshake gives its thread back
MAX_WEB_WINDOW_S = 86400.0  # "allow for" from the web is capped at a day; longer is the CLI's
MAX_WEB_MUTE_S = 7 * 86400.0  # a mute from the web: at most a week (the guard's own cap is 30 d)
MIN_WEB_DURATION_S = 1.0  # the guard refuses shorter windows too
MODES = ("strict", "followups", "monitor", "off", "config")  # config: the config file's mode
LOG_OUTCOMES = ("approved", "denied", "expired", "window", "quiet", "rule", "monitored", "capped",
                "lost", "blocked")
LOG_LIMIT_MAX = 500
LOG_TEXT_MAX_CHARS = 100
HOST_MAX_CHARS = 255  # the longest DNS name (RFC 1035 2.3.4); SNI can claim more
TEXT_MAX_CHARS = 255
TOKEN_FILE_MODE = 0o600
# scrypt at N=2**14, r=8: 16 MiB and ~50 ms per check. That fits a 128 MB router, and bad logins
# are rate-limited anyway (RFC 7914 section 2 suggests these values for interactive logins).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
PBKDF2_ITERATIONS = 600_000  # OWASP's 2023 figure for PBKDF2-HMAC-SHA256

# What the browser may name: device names as the config allows them, window/rule ids as the guard
# makes them (w12, r3), durations as typed (10m, 1h, today), reply keys of the guard's shape.
_DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
_ENTRY_ID = re.compile(r"[wr][0-9]{1,12}\Z")
_DURATION_TEXT = re.compile(r"[0-9A-Za-z. ]{1,16}\Z")
_RESULT_KEY = re.compile(r"[a-z_]{1,32}\Z")

CERT_FILE = "web-cert.pem"
KEY_FILE = "web-key.pem"
CERT_VALID_DAYS = 3650  # pinned by fingerprint: a renewal would make every phone re-pin

CSRF_HEADER = "X-CSRF-Token"
COOKIE = "hushgate_session"
COOKIE_TLS = "__Host-hushgate_session"  # the prefix makes browsers insist on Secure, Path=/

SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy",
     "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
     "object-src 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=()"),
)


@dataclass(frozen=True, slots=True)
class WebPeer:
    """The browser at the other end, as the handler's `peer` (the control socket passes a Peer)."""

    address: str
    port: int


# -- secrets ----------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """A salted hash for `[web] password_hash`: "scrypt$N$r$p$SALT$HASH" (base64 parts)."""
    if not password:
        raise ValueError("the password must not be empty")
    salt = secrets.token_bytes(16)
    if hasattr(hashlib, "scrypt"):
        digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                                p=SCRYPT_P, dklen=32)
        return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"pbkdf2_sha256${PBKDF2_ITERATIONS}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches `stored` (from `hash_password`); constant-time compare."""
    kind, params, salt, expected = _parse_hash(stored)
    if kind == "scrypt":
        n, r, p = params
        digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p,
                                dklen=len(expected), maxmem=256 * n * r + (1 << 20))
    else:
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, params[0],
                                     dklen=len(expected))
    return hmac.compare_digest(digest, expected)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")





def load_token(secret_file: str, *, create: bool = True) -> str:
    """The login token in `secret_file`, created (random, mode 0600) on first use."""
    try:
        return _read_token(secret_file)
    except FileNotFoundError:
        if not create:
            raise WebError(f"{secret_file}: no token yet (run `hushgate web token`)") from None
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        _write_new(secret_file, (token + "\n").encode(), TOKEN_FILE_MODE)
    except FileExistsError:  # someone else created it meanwhile: theirs wins
        return _read_token(secret_file)
    except OSError as exc:
        raise WebError(f"cannot create {secret_file}: {exc.strerror or exc}") from None
    return token


def _read_token(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise WebError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise WebError(f"{path} is readable by others (mode {mode & 0o777:o}): chmod 600 it")
        raw = f.read(4096)
    token = raw.decode("ascii", "replace").strip()
    if len(token) < 32 or not all(c.isalnum() or c in "-_" for c in token):
        raise WebError(f"{path} does not hold a token (delete it to make a new one)")
    return token


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create `path` atomically with `data` and `mode`; FileExistsError when it already exists."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".hushgate-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if it exists: never a half-written or replaced secret
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# -- TLS --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Certificate:
    cert_path: str
    key_path: str
    fingerprint: str  # SHA-256 of the DER certificate, "AB:CD:...", as browsers show it


def ensure_certificate(state_dir: str, names: tuple[str, ...] = ()) -> Certificate:
    """The prompt's self-signed certificate in `state_dir`, created on first use.

    `names` (addresses or host names) go into the subjectAltName of a new certificate; an
    existing one is kept as it is, so its fingerprint, once checked on a phone, stays valid.
    """
    cert_path = os.path.join(state_dir, CERT_FILE)
    key_path = os.path.join(state_dir, KEY_FILE)
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        _create_certificate(cert_path, key_path, names)
    try:
        with open(cert_path, "rb") as f:
            pem = f.read()
        der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise WebError(f"cannot read the web certificate {cert_path}: {exc}") from None
    return Certificate(cert_path, key_path, fingerprint(der))


def fingerprint(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _create_certificate(cert_path: str, key_path: str, names: tuple[str, ...]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    # P-256: quick on a router's CPU and accepted by every browser.
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hushgate")])
    alt: list[x509.GeneralName] = [x509.DNSName("hushgate")]
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
        except ValueError:
            with contextlib.suppress(ValueError):
                alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    try:
        # The key first, then the certificate: a certificate on disk always has its key.
        for path, data, mode in ((key_path, key_pem, 0o600), (cert_path, cert_pem, 0o644)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a leftover half (one of the two files) is replaced
            _write_new(path, data, mode)
    except OSError as exc:
        raise WebError(f"cannot create the web certificate in "
                       f"{os.path.dirname(cert_path)}: {exc.strerror or exc}") from None


def web_token(secret_file: str, state_dir: str, *, tls: bool = True,
              names: tuple[str, ...] = ()) -> dict[str, Any]:
    """What `hushgate web token` prints: {"token", "fingerprint" (None without TLS),
    "certificate" (its path, or None)}, creating the token and the certificate if needed."""
    token = load_token(secret_file)
    if not tls:
        return {"token": token, "fingerprint": None, "certificate": None}
    cert = ensure_certificate(state_dir, names)
    return {"token": token, "fingerprint": cert.fingerprint, "certificate": cert.cert_path}


# -- addresses --------------------------------------------------------------------------------


def _host_form(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def _split_host(value: str) -> str | None:
    """The host part of a Host header ("a.lan:8787" -> "a.lan", "[::1]:80" -> "[::1]")."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not _is_port(value[end + 1:])):
            return None
        try:
            return _host_form(ipaddress.ip_address(value[1:end]))
        except ValueError:
            return None
    host, sep, port = value.partition(":")
    if sep and not _is_port(sep + port):
        return None
    host = host.rstrip(".")
    return host or None


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and len(text) <= 6


def _normal_host(name: str) -> str:
    """An allowed_hosts entry as `_split_host` would see it in a Host header."""
    name = name.strip().lower()
    try:
        return _host_form(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return _split_host(name) or name


def _client_key(address: str) -> str:
    """Rate-limit bucket: the IPv4 address, or the IPv6 /64 (one host can own all of it)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


# -- display text ---------------------------------------------------------------------------


def display_text(value: str, limit: int = TEXT_MAX_CHARS) -> str:
    """Attacker-controlled text made inert for display: control, format and bidi characters
    become visible escapes ("\\x1b", "\\u202e"), and it is cut to `limit` characters ("..." at
    the end). Markup stays as text here; JSON and textContent keep it inert on the way."""
    out = []
    for ch in value[: limit * 2]:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            out.append(f"\\x{code:02x}")
        elif unicodedata.category(ch) in ("Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    text = "".join(out)
    if len(text) > limit or len(value) > limit * 2:
        text = text[: limit - 1] + "\u2026"
    return text


_TEXT, _INT, _NUM = "text", "int", "num"
PENDING_FIELDS = {
    "id": _INT, "device": _TEXT, "remote": _TEXT, "host": _TEXT, "category": _TEXT,
    "held_packets": _INT, "held_bytes": _INT, "started": _NUM, "expires": _NUM,
}
_BOOL, _COUNTS = "bool", "counts"
LOG_FIELDS = {
    "id": _INT, "device": _TEXT, "host": _TEXT, "remote": _TEXT, "category": _TEXT,
    "bytes": _INT, "packets": _INT, "started": _NUM, "decided_at": _NUM, "outcome": _TEXT,
    "decided_by": _TEXT, "kind": _TEXT, "via": _TEXT, "reason": _TEXT, "attempts": _INT,
}
DEVICE_FIELDS = {
    "name": _TEXT, "address": _TEXT, "mac": _TEXT, "mode": _TEXT, "configured_mode": _TEXT,
    "mode_overridden": _BOOL, "online": _BOOL, "last_seen": _NUM, "last_upload": _NUM,
    "pending": _INT, "flows": _INT, "uploads": _INT, "mute_until": _NUM, "windows": _INT,
    "rules": _INT, "counts_24h": _COUNTS,
}
RULE_FIELDS = {
    "id": _TEXT, "kind": _TEXT, "device": _TEXT, "host": _TEXT, "category": _TEXT,
    "created": _NUM, "until": _NUM, "duration_text": _TEXT, "source": _TEXT,
}
COUNT_KEYS_MAX = 32  # outcomes per device: a dozen today; a longer map is cut, not trusted


def clean_record(record: Any, fields: dict[str, str]) -> dict[str, Any] | None:
    """Only the listed fields, each of its kind or None; None for a non-object."""
    if not isinstance(record, dict):
        return None
    out: dict[str, Any] = {}
    for name, kind in fields.items():
        value = record.get(name)
        if kind == _TEXT:
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # ids may be numbers or "kind:number" strings
            out[name] = display_text(value, HOST_MAX_CHARS) if isinstance(value, str) else None
        elif kind == _BOOL:
            out[name] = value if isinstance(value, bool) else None
        elif kind == _COUNTS:
            out[name] = _clean_counts(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            out[name] = None
        elif kind == _INT:
            out[name] = int(value) if math.isfinite(value) else None
        else:
            out[name] = float(value) if math.isfinite(value) else None
    return out


def _clean_counts(value: Any) -> dict[str, int] | None:
    """A {name: count} map (outcomes per device): short names, whole non-negative counts."""
    if not isinstance(value, dict):
        return None
    out: dict[str, int] = {}
    for key, count in list(value.items())[:COUNT_KEYS_MAX]:
        if isinstance(key, str) and isinstance(count, int) and not isinstance(count, bool) \
                and count >= 0:
            out[display_text(key, 32)] = count
    return out


def json_bytes(obj: Any) -> bytes:
    """JSON with "<", ">" and "&" escaped too: no response ever carries markup bytes, whatever
    a browser might sniff (nosniff says it must not)."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


# -- sessions and login slowing (pure: every entry point takes `now`) -----------------------


@dataclass(slots=True)
class Session:
    csrf: str
    created: float
    expires: float


class Sessions:
    """Signed-in browsers, by a digest of their cookie (so lookups leak nothing by timing)."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._by_digest: dict[bytes, Session] = {}
        self._lock = threading.Lock()

    def create(self, now: float) -> tuple[str, Session]:
        cookie = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), now, now + self.ttl_s)
        with self._lock:
            self._expire(now)
            while len(self._by_digest) >= self.max_sessions:
                oldest = min(self._by_digest, key=lambda d: self._by_digest[d].created)
                del self._by_digest[oldest]
            self._by_digest[_digest(cookie)] = session
        return cookie, session

    def get(self, cookie: str | None, now: float) -> Session | None:
        if not cookie:
            return None
        with self._lock:
            session = self._by_digest.get(_digest(cookie))
            if session is not None and now >= session.expires:
                del self._by_digest[_digest(cookie)]
                return None
            return session

    def drop(self, cookie: str | None) -> None:
        if cookie:
            with self._lock:
                self._by_digest.pop(_digest(cookie), None)

    def __len__(self) -> int:
        return len(self._by_digest)

    def _expire(self, now: float) -> None:
        for digest in [d for d, s in self._by_digest.items() if now >= s.expires]:
            del self._by_digest[digest]


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@dataclass(slots=True)
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


@dataclass
class LoginLimiter:
    """Slows repeated bad logins per client: after `free_failures` mistakes within `window_s`,
    each further attempt must wait 1 s, 2 s, 4 s ... (at most `max_delay_s`) after the last one."""

    free_failures: int = LOGIN_FREE_FAILURES
    window_s: float = LOGIN_WINDOW_S
    max_delay_s: float = LOGIN_MAX_DELAY_S
    max_clients: int = 4096
    _clients: dict[str, _Failures] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, client: str, now: float) -> float:
        """Seconds `client` must still wait before its next attempt (0: go ahead)."""
        with self._lock:
            entry = self._fresh(client, now)
            return max(0.0, entry.blocked_until - now) if entry else 0.0

    def failed(self, client: str, now: float) -> float:
        """Count a bad attempt; returns the wait it imposes (0 while still free)."""
        with self._lock:
            entry = self._fresh(client, now)
            if entry is None:
                if len(self._clients) >= self.max_clients:
                    self._evict(now)
                entry = self._clients[client] = _Failures()
            entry.count += 1
            entry.last = now
            over = entry.count - self.free_failures
            if over < 0:
                return 0.0
            delay = min(2.0 ** min(over, 32), self.max_delay_s)
            entry.blocked_until = now + delay
            return delay

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)

    def _fresh(self, client: str, now: float) -> _Failures | None:
        entry = self._clients.get(client)
        if entry is not None and now - entry.last > self.window_s and now >= entry.blocked_until:
            del self._clients[client]
            return None
        return entry

    def _evict(self, now: float) -> None:
        for client in [c for c, e in self._clients.items()
                       if now - e.last > self.window_s and now >= e.blocked_until]:
            del self._clients[client]
        if len(self._clients) >= self.max_clients:
            del self._clients[min(self._clients, key=lambda c: self._clients[c].last)]


# -- requests and responses -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps its first value
    body: bytes
    client: str  # the peer's address
    port: int = 0
    query: str = ""  # what followed "?" in the request target (GET filters)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def _json(status: int, obj: Any, *headers: tuple[str, str]) -> Response:
    return Response(status, json_bytes(obj), "application/json", list(headers))


def _error(status: int, message: str, *headers: tuple[str, str]) -> Response:
    return _json(status, {"error": message}, *headers)


_ASSETS = {
    "/": ("webpage.html", "text/html; charset=utf-8"),
    "/app.js": ("webpage.js", "text/javascript; charset=utf-8"),
    "/app.css": ("webpage.css", "text/css; charset=utf-8"),
}
_ROUTES = {
    "/": "GET", "/app.js": "GET", "/app.css": "GET",
    "/api/session": "GET", "/api/pending": "GET", "/api/log": "GET",
    "/api/devices": "GET", "/api/rules": "GET",
    "/api/login": "POST", "/api/logout": "POST", "/api/decide": "POST",
    "/api/act": "POST",  # an ntfy button: the token is the credential (no session)
    "/api/mode": "POST", "/api/mute": "POST", "/api/unmute": "POST", "/api/revoke": "POST",
}


def _load_assets() -> dict[str, bytes]:
    package = importlib.resources.files("guard.shell")
    try:
        return {path: package.joinpath(name).read_bytes() for path, (name, _) in _ASSETS.items()}
    except OSError as exc:
        raise WebError(f"the web page is missing from the installation: {exc}") from None


class WebPrompt:
    """The LAN prompt, served in a background thread.

    `handler(request, peer)` is the control protocol's handler (the daemon's `handle_request`,
    or a client of the control socket); it is called from the server's threads with a `WebPeer`.
    """

    def __init__(
        self,
        listen: str,
        handler: Handler,
        *,
        secret_file: str,
        password_hash: str | None = None,
        allowed_hosts: tuple[str, ...] = (),
        tls: bool = False,
        state_dir: str,
        allow_public: bool = False,
        log_limit: int = 20,
    ) -> None:
        self.address, self.port = check_listen(listen, allowed_hosts, allow_public)
        self.handler = handler
        self.secret_file = secret_file
        self.password_hash = password_hash
        if password_hash is not None:
            _parse_hash(password_hash)  # a broken hash fails at start-up, not at the first login
        self.tls = tls
        self.state_dir = state_dir
        self.log_limit = log_limit
        self.scheme = "https" if tls else "http"
        self.cookie_name = COOKIE_TLS if tls else COOKIE
        hosts = {_normal_host(h) for h in allowed_hosts if h.strip()}
        if not self.address.is_unspecified:
            hosts.add(_host_form(self.address))
        if self.address.is_loopback or self.address.is_unspecified:
            hosts.update(("localhost", "127.0.0.1", "[::1]"))
        self.allowed_hosts = frozenset(hosts)
        self.sessions = Sessions()
        self.limiter = LoginLimiter()
        self.certificate: Certificate | None = None
        self._assets = _load_assets()
        self._token: str | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise WebError("web prompt already started")
        self._token = load_token(self.secret_file)
        context = None
        if self.tls:
            names = tuple(sorted(self.allowed_hosts - {"localhost", "127.0.0.1", "[::1]"}))
            self.certificate = ensure_certificate(self.state_dir, names)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(self.certificate.cert_path, self.certificate.key_path)
            except (OSError, ssl.SSLError) as exc:
                raise WebError(f"cannot load the web certificate: {exc}") from None
        family = socket.AF_INET6 if self.address.version == 6 else socket.AF_INET
        try:
            server = _Server((str(self.address), self.port), family, self, context)
        except OSError as exc:
            raise WebError(f"web prompt cannot listen on {_host_form(self.address)}:"
                           f"{self.port}: {exc.strerror or exc}") from None
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="hushgate-web", daemon=True)
        self._thread.start()
        log.info("web prompt on %s", self.url)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join(timeout=5.0)
        self._server = self._thread = None

    def __enter__(self) -> WebPrompt:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{_host_form(self.address)}:{self.port}/"

    # -- one request (the HTTP server calls this; tests may too) -----------------------------

    def respond(self, req: Request, now: float) -> Response:
        host = _split_host(req.headers.get("host", ""))
        if host is None or host not in self.allowed_hosts:
            # 421: this server is not the one the name was meant for (a DNS rebinding page).
            return _error(421, "unknown host name; use the address the prompt listens on")
        allowed = _ROUTES.get(req.path)
        if allowed is None:
            return _error(404, "not found")
        if req.method != allowed:
            return _error(405, "method not allowed", ("Allow", allowed))
        if req.path in _ASSETS:
            return Response(200, self._assets[req.path], _ASSETS[req.path][1])
        if req.path == "/api/act":
            return self._act(req)
        cookie = _cookie(req.headers.get("cookie", ""), self.cookie_name)
        if req.method == "POST":
            refused = self._cross_site(req)
            if refused is not None:
                return _error(403, refused)
            if req.headers.get("content-type", "").split(";")[0].strip().lower() \
                    != "application/json":
                return _error(415, "send application/json")
            if req.path == "/api/login":
                return self._login(req, now)
        session = self.sessions.get(cookie, now)
        if session is None:
            return _error(401, "sign in first")
        if req.method == "POST" and not hmac.compare_digest(
                req.headers.get(CSRF_HEADER.lower(), "").encode(), session.csrf.encode()):
            return _error(403, "missing or wrong CSRF token")
        peer = WebPeer(req.client, req.port)
        if req.path == "/api/session":
            return _json(200, {"csrf": session.csrf, "expires": session.expires})
        if req.path == "/api/logout":
            self.sessions.drop(cookie)
            return _json(200, {"ok": True}, ("Set-Cookie", self._cookie_header("", 0)))
        if req.path == "/api/pending":
            return self._listing({"cmd": "pending"}, peer, "pending", PENDING_FIELDS, now)
        if req.path == "/api/log":
            return self._log(req, peer, now)
        if req.path == "/api/devices":
            return self._listing({"cmd": "devices"}, peer, "devices", DEVICE_FIELDS, now)
        if req.path == "/api/rules":
            return self._listing({"cmd": "rules"}, peer, "rules", RULE_FIELDS, now)
        if req.path == "/api/decide":
            return self._decide(req, peer)
        return self._manage(req, peer)

    def _cross_site(self, req: Request) -> str | None:
        """Why a POST looks cross-site, or None: its Origin (or, without one, its Referer) must
        be this very origin, as reached (the Host header, already allowlisted)."""
        own = f"{self.scheme}://{req.headers.get('host', '').strip().lower()}"
        fetch_site = req.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.strip().lower() != "same-origin":
            return "cross-site request refused"
        origin = req.headers.get("origin")
        if origin is not None:
            if origin.strip().lower() != own:
                return "cross-origin request refused"
            return None
        referer = req.headers.get("referer", "").strip().lower()
        if referer == own or referer.startswith(own + "/"):
            return None
        return "request without a same-origin Origin or Referer refused"

    def _login(self, req: Request, now: float) -> Response:
        client = _client_key(req.client)
        wait = self.limiter.retry_after(client, now)
        if wait > 0:
            return _error(429, f"too many failed sign-ins; try again in {math.ceil(wait)} s",
                          ("Retry-After", str(math.ceil(wait))))
        body = _json_body(req.body)
        secret = body.get("secret") if isinstance(body, dict) else None
        if not isinstance(secret, str) or not secret or len(secret) > 1024:
            return _error(400, "send {\"secret\": TOKEN_OR_PASSWORD}")
        if not self._secret_ok(secret):
            delay = self.limiter.failed(client, now)
            log.warning("web prompt: failed sign-in from %s", req.client)
            headers = [("Retry-After", str(math.ceil(delay)))] if delay else []
            return _error(403, "wrong token or password", *headers)
        self.limiter.succeeded(client)
        cookie, session = self.sessions.create(now)
        log.info("web prompt: signed in from %s", req.client)
        return _json(200, {"csrf": session.csrf, "expires": session.expires},
                     ("Set-Cookie", self._cookie_header(cookie, int(self.sessions.ttl_s))))

    def _secret_ok(self, secret: str) -> bool:
        with contextlib.suppress(WebError, OSError):
            self._token = load_token(self.secret_file, create=False)  # picks up a new token
        ok = False
        if self._token is not None:
            ok |= hmac.compare_digest(secret.encode(), self._token.encode())
        if self.password_hash is not None:
            ok |= verify_password(secret, self.password_hash)
        return ok

    def _cookie_header(self, value: str, max_age: int) -> str:
        header = f"{self.cookie_name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"
        return header + "; Secure" if self.tls else header

    def _call(self, request: dict[str, Any], peer: WebPeer) -> dict[str, Any] | None:
        try:
            reply = self.handler(request, peer)
        except Exception:  # noqa: BLE001 - a handler bug answers 500, the server lives on
            log.exception("web prompt: handler failed on %s", request.get("cmd"))
            return None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            log.error("web prompt: handler gave a malformed reply to %s", request.get("cmd"))
            return None
        return reply

    def _listing(self, request: dict[str, Any], peer: WebPeer, key: str,
                 fields: dict[str, str], now: float) -> Response:
        reply = self._call(request, peer)
        if reply is None:
            return _error(500, "internal error")
        if not reply["ok"]:
            return _error(502, f"guard: {display_text(str(reply.get('error')))}")
        items = reply.get("result")
        cleaned = [c for c in (clean_record(r, fields) for r in
                               (items if isinstance(items, list) else [])) if c is not None]
        return _json(200, {"now": now, key: cleaned})

    def _log(self, req: Request, peer: WebPeer, now: float) -> Response:
        """The audit log, filtered: ?device=&outcome=&since=&until=&text=&limit= (all optional)."""
        request, problem = log_filters(req.query, self.log_limit)
        if problem is not None:
            return _error(400, problem)
        return self._listing(request, peer, "log", LOG_FIELDS, now)

    def _act(self, req: Request) -> Response:
        """POST /api/act {"token": T}: an ntfy notification's Allow or Deny button. No session,
        CSRF token or Origin (the phone's ntfy app sends it): the token is the credential, good
        once, for one upload and one verb, until the hold ends (guard/shell/actions.py). A
        forged, spent or expired token is refused with 403 and decides nothing."""
        from guard.shell.actions import TokenRefused

        tokens = getattr(self, "action_tokens", None)  # the daemon's ActionTokens, when set
        body = _json_body(req.body)
        token = body.get("token") if isinstance(body, dict) else None
        if tokens is None:
            return _error(403, "no notification buttons are configured")
        try:
            upload_id, verb = tokens.redeem(token)
        except TokenRefused as exc:
            log.warning("web prompt: notification button refused from %s: %s", req.client,
                        exc.reason)
            return _error(403, str(exc))
        reply = self._call({"cmd": "decide", "id": upload_id, "verb": verb, "scope": "once",
                            "by": "ntfy"}, WebPeer(req.client, req.port))
        if reply is None:
            return _error(500, "internal error")
        if not reply["ok"]:
            return _error(409, display_text(str(reply.get("error"))))
        log.info("web prompt: %s %s upload %d from a notification", req.client, verb, upload_id)
        return _json(200, {"ok": True, "id": upload_id, "verb": verb})

    def _decide(self, req: Request, peer: WebPeer) -> Response:
        body = _json_body(req.body)
        if not isinstance(body, dict):
            return _error(400, "send a JSON object")
        upload_id, verb, scope = body.get("id"), body.get("verb"), body.get("scope", "once")
        duration = body.get("duration_s")
        if isinstance(upload_id, bool) or not isinstance(upload_id, int) or upload_id < 0:
            return _error(400, "id: expected an upload id")
        if verb not in ("allow", "deny"):
            return _error(400, "verb: expected allow or deny")
        request: dict[str, Any] = {"cmd": "decide", "id": upload_id, "verb": verb,
                                   "scope": scope, "duration_s": None, "by": "web"}
        if scope == "for":
            duration, problem = _duration(body, MAX_WEB_WINDOW_S)
            if problem is not None:
                return _error(400, problem)
            request["duration_s"] = duration
            text = _duration_text(body.get("duration_text"))
            if text:
                request["duration_text"] = text
        elif scope not in ("once", "always"):
            return _error(400, "scope: expected once, for or always")
        reply = self._call(request, peer)
        if reply is None:
            return _error(500, "internal error")
        if not reply["ok"]:
            return _error(409, display_text(str(reply.get("error"))))
        log.info("web prompt: %s %s upload %d (%s)", req.client, verb, upload_id, scope)
        return _json(200, {"ok": True, "upload": clean_record(reply.get("result"), PENDING_FIELDS)})

    def _manage(self, req: Request, peer: WebPeer) -> Response:
        """/api/mode, /api/mute, /api/unmute, /api/revoke: checked here, done by the guard."""
        body = _json_body(req.body)
        if not isinstance(body, dict):
            return _error(400, "send a JSON object")
        request: dict[str, Any]
        if req.path == "/api/revoke":
            entry = body.get("id")
            if not isinstance(entry, str) or not _ENTRY_ID.match(entry):
                return _error(400, "id: expected a window or rule id such as w12 or r3")
            request = {"cmd": "revoke", "id": entry}
        else:
            device = body.get("device")
            if not isinstance(device, str) or not _DEVICE_NAME.match(device):
                return _error(400, "device: expected a device name")
            if req.path == "/api/mode":
                mode = body.get("mode")
                if mode not in MODES:
                    return _error(400, f"mode: expected one of {', '.join(MODES)}")
                request = {"cmd": "mode", "device": device, "mode": mode}
            elif req.path == "/api/mute":
                duration, problem = _duration(body, MAX_WEB_MUTE_S)
                if problem is not None:
                    return _error(400, problem)
                request = {"cmd": "window", "device": device, "kind": "quiet",
                           "duration_s": duration}
                text = _duration_text(body.get("duration_text"))
                if text:
                    request["duration_text"] = text
            else:
                request = {"cmd": "unmute", "device": device}
        request["by"] = "web"
        reply = self._call(request, peer)
        if reply is None:
            return _error(500, "internal error")
        if not reply["ok"]:
            return _error(409, display_text(str(reply.get("error"))))
        log.info("web prompt: %s %s %s", req.client, request["cmd"],
                 request.get("device") or request.get("id"))
        return _json(200, {"ok": True, "result": _clean_result(reply.get("result"))})


def log_filters(query: str, default_limit: int) -> tuple[dict[str, Any], str | None]:
    """The control request for a filtered log, from a query string; (request, problem)."""
    request: dict[str, Any] = {"cmd": "log", "limit": default_limit}
    if len(query) > 2048:
        return request, "query too long"
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False,
                                       max_num_fields=16)
    except ValueError:
        return request, "too many query fields"
    seen: set[str] = set()
    for name, value in pairs:
        if name in seen:
            return request, f"{display_text(name, 32)}: given twice"
        seen.add(name)
        if value == "":
            continue
        if name == "device":
            if not _DEVICE_NAME.match(value):
                return request, "device: expected a device name"
            request["device"] = value
        elif name == "outcome":
            if value not in LOG_OUTCOMES:
                return request, f"outcome: expected one of {', '.join(LOG_OUTCOMES)}"
            request["outcome"] = value
        elif name in ("since", "until"):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number) or not 0 <= number < 1e11:
                return request, f"{name}: expected a Unix time in seconds"
            request[name] = number
        elif name == "text":
            if len(value) > LOG_TEXT_MAX_CHARS:
                return request, f"text: at most {LOG_TEXT_MAX_CHARS} characters"
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
                return request, "text: control characters are not allowed"
            request["text"] = value
        elif name == "limit":
            if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= LOG_LIMIT_MAX:
                return request, f"limit: expected 1 to {LOG_LIMIT_MAX}"
            request["limit"] = int(value)
        else:
            return request, f"unknown filter {display_text(name, 32)!r}"
    if "since" in request and "until" in request and request["since"] > request["until"]:
        return request, "since is after until"
    return request, None


def _duration(body: dict[str, Any], limit: float) -> tuple[float, str | None]:
    duration = body.get("duration_s")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) \
            or not math.isfinite(duration) or not MIN_WEB_DURATION_S <= duration <= limit:
        return 0.0, (f"duration_s: expected {MIN_WEB_DURATION_S:g} <= seconds <= {limit:g} "
                     f"({_plain_duration(limit)})")
    return float(duration), None


def _plain_duration(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 2 * 86400 else f"{seconds / 3600:g} h"


def _duration_text(value: Any) -> str | None:
    """What the person chose ("10m", "today"), echoed back by the guard; None when unusable."""
    if isinstance(value, str) and _DURATION_TEXT.match(value):
        return value
    return None


def _clean_result(result: Any) -> Any:
    """A management reply for the browser: one level of listed shapes, text made inert."""
    if not isinstance(result, dict):
        return None
    out: dict[str, Any] = {}
    for key, value in list(result.items())[:32]:
        if not isinstance(key, str) or not _RESULT_KEY.match(key):
            continue
        if isinstance(value, str):
            out[key] = display_text(value, HOST_MAX_CHARS)
        elif isinstance(value, bool) or value is None:
            out[key] = value
        elif isinstance(value, (int, float)):
            out[key] = value if math.isfinite(value) else None
        elif isinstance(value, list):
            out[key] = [display_text(v, 64) for v in value[:64] if isinstance(v, str)]
    return out


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # 16 KB of "[" nests too deep
        return None


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip() or None
    return None


# -- the HTTP shell ---------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 prompt: WebPrompt, context: ssl.SSLContext | None) -> None:
        self.address_family = family
        self.prompt = prompt
        self.context = context
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _RequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve our own name (getfqdn): a DNS query at start-up.
        # IP_FREEBIND: at boot the LAN address may not be configured yet; bind anyway rather
        # than restart-looping until it appears (Linux; elsewhere a plain bind).
        freebind = getattr(socket, "IP_FREEBIND", 15)
        try:  # SOL_IP's flag is the one IPv6 binds check too
            self.socket.setsockopt(socket.IPPROTO_IP, freebind, 1)
        except OSError:
            pass
        # a phone with the page open keeps a connection: without this a restart cannot bind
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name = str(self.server_address[0])
        self.server_port = self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: this client retries, the others carry on
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread with a timeout, so a
        # client that stalls it holds one slot, never the accept loop.
        request.settimeout(IO_TIMEOUT_S)
        if self.context is not None:
            try:
                request = self.context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        with self._open_lock:
            self._open.add(request)
        try:
            self.RequestHandlerClass(request, client_address, self)
        finally:
            with self._open_lock:
                self._open.discard(request)
            if self.context is not None:
                with contextlib.suppress(OSError):
                    request.close()

    def close_connections(self) -> None:
        with self._open_lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "hushgate"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = IO_TIMEOUT_S

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._handle(b"")

    def do_POST(self) -> None:  # noqa: N802
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.strip().isdigit():
            self._send(_error(411, "Content-Length required"))
            return
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read: the connection is unusable
            self._send(_error(413, "request body too large"))
            return
        self._handle(self.rfile.read(length))

    def _handle(self, body: bytes) -> None:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), value)
        if len(self.headers.get_all("Host") or []) > 1:
            headers["host"] = ""  # two Host headers: which one a proxy saw is anybody's guess
        path, _, query = self.path.partition("?")
        req = Request(self.command, path, headers, body, str(self.client_address[0]),
                      int(self.client_address[1]), query)
        try:
            response = self.server.prompt.respond(req, time.time())
        except Exception:  # noqa: BLE001 - a bug answers 500, never a traceback to the browser
            log.exception("web prompt: request failed")
            response = _error(500, "internal error")
        self._send(response)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(response.body)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """The stdlib's own errors (bad request line, unknown method...) with our headers."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # unparsable line: still a status line and headers
        try:
            self._send(_error(code, message or self.responses.get(code, ("error",))[0]))
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)
