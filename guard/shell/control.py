"""The control socket: how the CLI, `watch` and scripts talk to a running `hushgate run`.

Rules of this module: the server owns the socket's IO and access control, never a decision (it
hands each request to the daemon's handler); a client that misbehaves (garbage, an endless line, a
half-written line, a peer without rights) gets one error line and never stalls another client;
nothing a client sends can make the server print a traceback to anyone but the daemon's log.

Protocol (version 1). JSON lines over a Unix stream socket: one UTF-8 JSON object per line, any
number of requests per connection, exactly one reply line per request, in order.

    request  {"cmd": NAME, ...arguments}
    reply    {"ok": true, "result": RESULT}   or   {"ok": false, "error": "one line"}

Only uid 0, the daemon's own uid and members of the configured group are served (the file mode
is 0600, or 0660 with the group; SO_PEERCRED is checked again on every connection). A request
line is at most 65,536 bytes and must be complete within 2 s of its first byte. Times are Unix
seconds, durations end in `_s`, sizes in `_bytes`. Commands (implemented by the daemon):

    ping                                   -> "pong"
    status                                 -> {"version", "fail_mode": "closed"|"open",
                                               "devices": [{"name", "address", "mac", "mode"}],
                                               "pending": int, "held_bytes": int,
                                               "held_packets": int, "uptime_s", "queue",
                                               "backend"}
    pending                                -> [{"id", "device", "remote" ("addr:port"), "host"
                                               (or null), "category", "held_packets",
                                               "held_bytes", "started", "expires"}]
    decide   {"id": int, "verb": "allow"|"deny", "scope": "once"|"for"|"always",
              "duration_s": float|null (with "for"), "by": str}
                                           -> the upload, as in `pending`
    window   {"device": str, "kind": "allow"|"quiet", "duration_s": float, "by": str}
                                           -> {"device", "kind", "until"}
    devices                                -> [{"name", "address", "mac", "mode", "flows",
                                               "uploads"}]
    flows    {"device": str|null}          -> [{"device", "remote", "proto", "host", "category",
                                               "state", "bytes_up", "bytes_down", "packets_up",
                                               "packets_down", "first", "last"}]
    log      {"device": str|null, "since": float|null, "outcome": str|null, "limit": int}
                                           -> audit records, newest first: [{"id", "device",
                                               "host", "remote", "category", "bytes", "packets",
                                               "started", "decided_at", "outcome", "decided_by"}]

Errors the server itself answers: "bad request: ...", "request line too long ...", "incomplete
request line ...", "permission denied: ...", "too many clients", "internal error: <Exception>".
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ControlError",
    "ControlServer",
    "Handler",
    "Peer",
    "reply_error",
    "reply_ok",
    "request",
]

log = logging.getLogger("guard.shell.control")

_PEERCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_RECV_BYTES = 65536
# A client that sends requests but does not read its replies stops being read from once this
# much is queued for it: memory per client stays bounded, other clients are unaffected.
_OUT_HIGH_WATER = 1 << 20
# A reply larger than this is refused by the client (a `log` of 20,000 records is ~5 MB).
_MAX_REPLY_BYTES = 64 << 20


class ControlError(Exception):
    """A one-line, user-facing problem with the control socket or a refused request."""


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end, from SO_PEERCRED (as of its connect())."""

    pid: int
    uid: int
    gid: int


Handler = Callable[[dict[str, Any], Peer], dict[str, Any]]


def reply_ok(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def reply_error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


@dataclass(slots=True, eq=False)
class _Client:
    sock: socket.socket
    peer: Peer
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    partial_since: float | None = None  # monotonic time the unfinished line began
    closing_since: float | None = None  # set: flush outbuf, then close
    events: int = 0


class ControlServer:
    """Serves the control protocol on `path` in a background thread.

    `handler(request, peer)` is called from the server thread and returns the whole reply
    (`reply_ok(result)` or `reply_error(message)`); raising `ControlError` answers its message
    as an error; any other exception answers "internal error: <Name>", is logged and counted in
    `errors`. Refused peers are counted in `refused`.
    """

    def __init__(
        self,
        path: str,
        handler: Handler,
        *,
        group: str | None = None,
        max_line_bytes: int = 65536,
        read_timeout_s: float = 2.0,
        max_clients: int = 32,
    ) -> None:
        self.path = str(path)
        self.handler = handler
        self.group = group
        self.max_line_bytes = max_line_bytes
        self.read_timeout_s = read_timeout_s
        self.max_clients = max_clients
        self.errors = 0
        self.refused = 0
        self._last_refusal_log: dict[str, float] = {}
        self._gid: int | None = None
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise ControlError("control server already started")
        self._stopping.clear()
        if self.group is not None:
            try:
                self._gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ControlError(f"control socket group {self.group!r} does not exist") from None
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, mode=0o755, exist_ok=True)
                os.chmod(parent, 0o755)  # makedirs applies the umask
            except OSError as exc:
                raise ControlError(f"cannot create {parent}: {exc.strerror}") from None
        self._remove_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bind, restrict, then listen: until listen() nobody can connect, so the socket is
            # never reachable with the umask's mode.
            listener.bind(self.path)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)  # from here on the file is ours to remove
            os.chmod(self.path, 0o660 if self._gid is not None else 0o600)
            if self._gid is not None:
                os.chown(self.path, -1, self._gid)
            listener.listen(64)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            self._unlink_ours()
            raise ControlError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._serve, name="hushgate-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close every connection and the socket, and remove the socket file (if still ours)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            assert self._wake_w is not None
            self._wake_w.send(b"x")
        thread.join(timeout=5.0)
        self._thread = None
        self._unlink_ours()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: nobody listens
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ControlError(f"cannot check {self.path}: {exc.strerror or exc}") from None
        else:
            raise ControlError(f"another hushgate is running on {self.path}")
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _unlink_ours(self) -> None:
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if self._inode is not None and (st.st_dev, st.st_ino) == self._inode:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self._inode = None

    # -- the loop -----------------------------------------------------------------------------

    def _serve(self) -> None:
        sel = self._selector
        assert sel is not None
        try:
            while not self._stopping.is_set():
                for key, events in sel.select(self._next_timeout()):
                    if key.data == "listen":
                        try:
                            self._accept()
                        except Exception:  # pragma: no cover - keep serving the others
                            self.errors += 1
                            log.exception("control socket accept failed")
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)  # type: ignore[union-attr]
                    else:
                        client: _Client = key.data
                        try:
                            if events & selectors.EVENT_READ:
                                self._read(client)
                            if events & selectors.EVENT_WRITE:
                                self._flush(client)
                        except OSError:
                            self._close(client)
                        except Exception:  # a bug must cost one connection, not the socket
                            self.errors += 1
                            log.exception("control connection failed")
                            self._close(client)
                self._expire(time.monotonic())
        except Exception:  # pragma: no cover - a bug here must not kill the daemon silently
            log.exception("control server loop failed")
            self.errors += 1
        finally:
            for client in list(self._clients.values()):
                self._close(client)
            for sock in (self._listener, self._wake_r, self._wake_w):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
            sel.close()

    def _next_timeout(self) -> float | None:
        deadlines = [
            c.partial_since for c in self._clients.values() if c.partial_since is not None
        ] + [c.closing_since for c in self._clients.values() if c.closing_since is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) + self.read_timeout_s - time.monotonic())

    def _expire(self, now: float) -> None:
        for client in list(self._clients.values()):
            if client.closing_since is not None:
                if now - client.closing_since >= self.read_timeout_s:
                    self._close(client)  # it does not read its last reply: give up on it
            elif client.partial_since is not None and now - client.partial_since >= self.read_timeout_s:
                self._fail(
                    client,
                    f"incomplete request line: no newline within {self.read_timeout_s:g} s",
                )

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next event
                log.warning("control socket accept failed: %s", exc)
                return
            sock.setblocking(False)
            try:
                raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                peer = Peer(*_PEERCRED.unpack(raw))
            except OSError:
                sock.close()
                continue
            denied = self._denied(peer)
            if denied is None and len(self._clients) >= self.max_clients:
                denied = "too many clients"
            if denied is not None:
                self.refused += 1
                # one line per reason per 10 s at most: a client storm must not flood the log
                # (on a router that is flash or a small tmpfs)
                now = time.monotonic()
                if now - self._last_refusal_log.get(denied, -1e9) >= 10.0:
                    self._last_refusal_log[denied] = now
                    log.warning("control socket: refused pid %d uid %d: %s (%d refused so far)",
                                peer.pid, peer.uid, denied, self.refused)
                with contextlib.suppress(OSError):
                    sock.send(_encode(reply_error(denied)), socket.MSG_NOSIGNAL)
                _hang_up(sock)
                sock.close()
                continue
            client = _Client(sock, peer)
            self._clients[sock.fileno()] = client
            self._update(client)

    def _denied(self, peer: Peer) -> str | None:
        """None when `peer` may use the socket, else the reason."""
        if peer.uid in (0, os.geteuid()):
            return None
        if self._gid is not None:
            if peer.gid == self._gid:
                return None
            try:
                user = pwd.getpwuid(peer.uid)
                if self._gid in os.getgrouplist(user.pw_name, user.pw_gid):
                    return None
            except (KeyError, OSError):
                pass
            return f"permission denied: uid {peer.uid} is neither root nor in group {self.group}"
        return f"permission denied: uid {peer.uid} is not root"

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        if not data:  # the client finished writing: answer what it sent, then close
            if client.inbuf:
                line = bytes(client.inbuf)
                client.inbuf.clear()
                self._answer(client, line)
            client.partial_since = None
            client.closing_since = time.monotonic()
            self._flush(client)
            return
        client.inbuf += data
        while client.closing_since is None:
            newline = client.inbuf.find(b"\n")
            if newline < 0:
                break
            if newline > self.max_line_bytes:
                break
            line = bytes(client.inbuf[:newline])
            del client.inbuf[: newline + 1]
            self._answer(client, line)
        if client.closing_since is None:
            pending = client.inbuf.find(b"\n")
            if len(client.inbuf) > self.max_line_bytes and (
                pending < 0 or pending > self.max_line_bytes
            ):
                self._fail(
                    client, f"request line too long: more than {self.max_line_bytes} bytes"
                )
                return
            if not client.inbuf:
                client.partial_since = None
            elif client.partial_since is None:
                client.partial_since = time.monotonic()
        self._flush(client)

    def _answer(self, client: _Client, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return  # blank lines are keep-alives, not requests
        client.outbuf += _encode(self._reply(line, client.peer))

    def _reply(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            req = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            return reply_error("bad request: not UTF-8")
        except (ValueError, RecursionError):
            return reply_error("bad request: not JSON")
        if not isinstance(req, dict):
            return reply_error('bad request: expected a JSON object like {"cmd": "ping"}')
        if not isinstance(req.get("cmd"), str) or not req["cmd"]:
            return reply_error('bad request: no "cmd"')
        try:
            reply = self.handler(req, peer)
            if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
                raise TypeError(f"handler returned {type(reply).__name__}, not a reply")
            if reply["ok"] and "result" not in reply:
                raise TypeError("handler's reply has no result")
            _encode(reply)  # not serialisable: an internal error, not a half-written line
            return reply
        except ControlError as exc:
            return reply_error(_one_line(str(exc)))
        except Exception as exc:
            self.errors += 1
            log.exception("control handler failed on %r", req.get("cmd"))
            return reply_error(f"internal error: {type(exc).__name__}")

    def _fail(self, client: _Client, message: str) -> None:
        """Answer one error line, then disconnect (after the line is flushed)."""
        client.inbuf.clear()
        client.partial_since = None
        client.outbuf += _encode(reply_error(message))
        client.closing_since = time.monotonic()
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        if client.sock.fileno() < 0:
            return
        while client.outbuf:
            try:
                sent = client.sock.send(client.outbuf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(client)
                return
            del client.outbuf[:sent]
        if client.closing_since is not None and not client.outbuf:
            _hang_up(client.sock)
            self._close(client)
            return
        self._update(client)

    def _update(self, client: _Client) -> None:
        events = 0
        if client.closing_since is None and len(client.outbuf) < _OUT_HIGH_WATER:
            events |= selectors.EVENT_READ
        if client.outbuf:
            events |= selectors.EVENT_WRITE
        if events == client.events:
            return
        assert self._selector is not None
        if client.events == 0:
            self._selector.register(client.sock, events, client)
        elif events == 0:
            self._selector.unregister(client.sock)
        else:
            self._selector.modify(client.sock, events, client)
        client.events = events

    def _close(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd < 0:
            return
        if client.events and self._selector is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(client.sock)
        client.events = 0
        self._clients.pop(fd, None)
        with contextlib.suppress(OSError):
            client.sock.close()


def _hang_up(sock: socket.socket) -> None:
    """Shut down after the last reply. What the client sent and we did not read is drained
    first (a little, without blocking): closing a Unix socket with unread data makes the
    client's next read fail with ECONNRESET instead of a clean end of file."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        for _ in range(16):
            if not sock.recv(_RECV_BYTES):
                break


def _encode(reply: dict[str, Any]) -> bytes:
    # ensure_ascii: host names are attacker-controlled; escaped, they cannot carry terminal
    # control sequences to whoever prints a raw reply.
    return (json.dumps(reply, ensure_ascii=True, allow_nan=False, separators=(",", ":")) + "\n").encode()


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "error"


# ------------------------------------------------------------------------------------- client


def request(path: str, payload: dict[str, Any], timeout_s: float = 5.0) -> Any:
    """Send one request and return its `result`; any failure is a one-line ControlError."""
    line = (json.dumps(payload, ensure_ascii=True) + "\n").encode()
    deadline = time.monotonic() + timeout_s
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise ControlError(
                f"cannot reach hushgate at {path}: is `hushgate run` running?"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path}: run as root or as a member of the control group"
            ) from None
        except TimeoutError:
            raise ControlError(f"hushgate at {path} did not accept within {timeout_s:g} s") from None
        except OSError as exc:
            raise ControlError(f"cannot reach hushgate at {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused or cut off: the server's one error line may still be waiting
        except TimeoutError:
            raise ControlError(f"hushgate at {path} did not answer within {timeout_s:g} s") from None
        buf = bytearray()
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControlError(f"hushgate at {path} did not answer within {timeout_s:g} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(_RECV_BYTES)
            except TimeoutError:
                raise ControlError(
                    f"hushgate at {path} did not answer within {timeout_s:g} s"
                ) from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ControlError(f"hushgate at {path} closed the connection without a reply")
            buf += chunk
            if len(buf) > _MAX_REPLY_BYTES:
                raise ControlError(f"reply from hushgate at {path} is too large")
    finally:
        sock.close()
    try:
        reply = json.loads(buf[: buf.index(b"\n")].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ControlError(f"bad reply from hushgate at {path}: not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError(f"bad reply from hushgate at {path}: not a reply object")
    if not reply["ok"]:
        raise ControlError(_one_line(str(reply.get("error") or "request failed")))
    return reply.get("result")
