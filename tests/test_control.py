"""The control socket over real Unix sockets: protocol, hostile clients, access control, lifecycle."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guard.shell.control import ControlError, ControlServer, Peer, reply_error, reply_ok, request
from tests import ci

NOBODY = 65534


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short and world-traversable: AF_UNIX paths stop at 107 bytes, and the refused-peer test
    # connects as nobody (pytest's tmp_path lives under a 0700 directory).
    path = Path(tempfile.mkdtemp(prefix="hg-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def handler(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
    cmd = req["cmd"]
    if cmd == "ping":
        return reply_ok("pong")
    if cmd == "whoami":
        return reply_ok({"pid": peer.pid, "uid": peer.uid, "gid": peer.gid})
    if cmd == "echo":
        return reply_ok(req.get("value"))
    if cmd == "boom":
        raise RuntimeError("secret detail from /var/lib/hushgate")
    if cmd == "refuse":
        raise ControlError("no pending upload 9")
    if cmd == "bad-reply":
        return ["not", "a", "reply"]  # type: ignore[return-value]
    if cmd == "slow":
        time.sleep(float(req.get("s", 1.0)))
        return reply_ok("late")
    return reply_error(f"unknown command: {cmd}")


@pytest.fixture
def server(sockdir: Path) -> Iterator[ControlServer]:
    srv = ControlServer(str(sockdir / "run" / "control.sock"), handler, read_timeout_s=0.5,
                        max_line_bytes=1024)
    srv.start()
    yield srv
    srv.stop()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(path)
    return sock


def read_lines(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    buf = b""
    while buf.count(b"\n") < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    return [json.loads(line) for line in buf.split(b"\n")[:count]]


def at_eof(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


# ------------------------------------------------------------------------------- the protocol


def test_round_trip_returns_the_result_and_knows_the_peer(server: ControlServer) -> None:
    assert request(server.path, {"cmd": "ping"}) == "pong"
    me = request(server.path, {"cmd": "whoami"})
    assert me == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    assert request(server.path, {"cmd": "echo", "value": {"ä": [1, None]}}) == {"ä": [1, None]}


def test_socket_is_private_and_its_directory_is_created(server: ControlServer) -> None:
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o755


def test_many_requests_on_one_connection_are_answered_in_order(server: ControlServer) -> None:
    with connect(server.path) as sock:
        sock.sendall(b'{"cmd":"echo","value":1}\n{"cmd":"echo","value":2}\r\n\n{"cmd":"ping"}\n')
        assert read_lines(sock, 3) == [
            {"ok": True, "result": 1}, {"ok": True, "result": 2}, {"ok": True, "result": "pong"}]
        # One request split over many writes is still one request.
        for piece in (b'{"cmd":', b' "ec', b'ho", "value": 3}', b"\n"):
            sock.sendall(piece)
            time.sleep(0.01)
        assert read_lines(sock, 1) == [{"ok": True, "result": 3}]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"hello", "bad request: not JSON"),
        (b"\xff\xfe{}", "bad request: not UTF-8"),
        (b"[1, 2]", "bad request: expected a JSON object"),
        (b'{"verb": "allow"}', 'bad request: no "cmd"'),
        (b'{"cmd": 7}', 'bad request: no "cmd"'),
        (b"[" * 100000, "bad request: not JSON"),  # nesting deeper than the recursion limit
        (b'{"cmd": "nonsense"}', "unknown command: nonsense"),
    ],
)
def test_garbage_gets_an_error_reply_and_the_server_keeps_serving(
    sockdir: Path, line: bytes, error: str
) -> None:
    with ControlServer(str(sockdir / "c.sock"), handler, max_line_bytes=200000) as srv:
        with connect(srv.path) as sock:
            sock.sendall(line + b"\n")
            [reply] = read_lines(sock, 1)
            assert reply["ok"] is False and reply["error"].startswith(error)
            sock.sendall(b'{"cmd": "ping"}\n')  # the same connection still works
            assert read_lines(sock, 1) == [{"ok": True, "result": "pong"}]
        assert request(srv.path, {"cmd": "ping"}) == "pong"  # and so does the next client
        assert srv.errors == 0


def test_oversized_line_gets_an_error_and_is_disconnected(server: ControlServer) -> None:
    with connect(server.path) as sock:
        try:
            sock.sendall(b'{"cmd": "echo", "value": "' + b"x" * 4000)  # no newline, > 1024
        except BrokenPipeError:
            pass  # the server may hang up while we are still writing
        [reply] = read_lines(sock, 1)
        assert reply == {"ok": False, "error": "request line too long: more than 1024 bytes"}
        assert at_eof(sock)
    with connect(server.path) as sock:  # a complete line that is too long, newline and all
        sock.sendall(b"x" * 2000 + b"\n" + b'{"cmd": "ping"}\n')
        [reply] = read_lines(sock, 1)
        assert reply["error"].startswith("request line too long")
        assert at_eof(sock)  # what followed the oversized line is not served
    assert request(server.path, {"cmd": "ping"}) == "pong"


def test_half_written_line_times_out_while_another_client_is_served(sockdir: Path) -> None:
    with ControlServer(str(sockdir / "c.sock"), handler, read_timeout_s=1.5) as srv, \
            connect(srv.path) as stalled:
        stalled.sendall(b'{"cmd": "pi')
        started = time.monotonic()
        # Meanwhile others are served at once, over and over, well before the stalled line's
        # timeout: a server that waited on it would take 1.5 s per request here.
        for _ in range(20):
            t0 = time.monotonic()
            assert request(srv.path, {"cmd": "ping"}) == "pong"
            assert time.monotonic() - t0 < 0.5
        assert time.monotonic() - started < 1.4
        [reply] = read_lines(stalled, 1)
        waited = time.monotonic() - started
        assert reply == {"ok": False,
                         "error": "incomplete request line: no newline within 1.5 s"}
        assert 1.4 <= waited < 4.0
        assert at_eof(stalled)


def test_an_idle_connection_is_not_a_half_written_line(server: ControlServer) -> None:
    with connect(server.path) as sock:
        time.sleep(0.8)  # longer than read_timeout_s, but nothing was started
        sock.sendall(b'{"cmd": "ping"}\n')
        assert read_lines(sock, 1) == [{"ok": True, "result": "pong"}]


def test_a_client_that_stops_writing_still_gets_its_answer(server: ControlServer) -> None:
    with connect(server.path) as sock:  # like `printf '{"cmd":"ping"}' | socat - UNIX:...`
        sock.sendall(b'{"cmd": "ping"}')
        sock.shutdown(socket.SHUT_WR)
        assert read_lines(sock, 1) == [{"ok": True, "result": "pong"}]
        assert at_eof(sock)


def test_handler_exception_is_an_internal_error_without_details(server: ControlServer) -> None:
    with pytest.raises(ControlError) as exc:
        request(server.path, {"cmd": "boom"})
    assert str(exc.value) == "internal error: RuntimeError"
    with pytest.raises(ControlError, match=r"^internal error: TypeError$"):
        request(server.path, {"cmd": "bad-reply"})
    assert server.errors == 2
    with pytest.raises(ControlError, match=r"^no pending upload 9$"):
        request(server.path, {"cmd": "refuse"})  # a refusal is an answer, not an error
    assert server.errors == 2
    assert request(server.path, {"cmd": "ping"}) == "pong"


def test_too_many_clients_are_refused_with_a_reply(sockdir: Path) -> None:
    with ControlServer(str(sockdir / "c.sock"), handler, max_clients=2) as srv:
        held = [connect(srv.path), connect(srv.path)]
        time.sleep(0.1)
        with pytest.raises(ControlError, match="too many clients"):
            request(srv.path, {"cmd": "ping"})
        for sock in held:
            sock.close()
        time.sleep(0.1)
        assert request(srv.path, {"cmd": "ping"}) == "pong"


# ---------------------------------------------------------------------------- the client side


def test_client_says_how_to_start_the_guard_when_nothing_listens(sockdir: Path) -> None:
    path = str(sockdir / "missing.sock")
    with pytest.raises(ControlError) as exc:
        request(path, {"cmd": "ping"})
    assert str(exc.value) == f"cannot reach hushgate at {path}: is `hushgate run` running?"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sockdir / "stale.sock"))
    stale.close()  # the file stays, nobody listens: connection refused
    with pytest.raises(ControlError, match=r"cannot reach hushgate at .*stale\.sock: is"):
        request(str(sockdir / "stale.sock"), {"cmd": "ping"})


def test_client_times_out_in_one_line(server: ControlServer) -> None:
    t0 = time.monotonic()
    with pytest.raises(ControlError) as exc:
        request(server.path, {"cmd": "slow", "s": 1.0}, timeout_s=0.2)
    assert time.monotonic() - t0 < 0.8
    assert str(exc.value) == f"hushgate at {server.path} did not answer within 0.2 s"


# -------------------------------------------------------------------------------- the lifecycle


def test_stale_socket_file_is_replaced(sockdir: Path) -> None:
    path = str(sockdir / "c.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    with ControlServer(path, handler) as srv:
        assert request(srv.path, {"cmd": "ping"}) == "pong"
    assert not os.path.exists(path)  # stop() removes it


def test_second_server_on_a_live_socket_is_refused(server: ControlServer) -> None:
    second = ControlServer(server.path, handler)
    with pytest.raises(ControlError, match=f"^another hushgate is running on {server.path}$"):
        second.start()
    second.stop()  # harmless, and it must not remove the first server's socket
    assert request(server.path, {"cmd": "ping"}) == "pong"


def test_a_file_that_is_not_a_socket_is_left_alone(sockdir: Path) -> None:
    path = sockdir / "c.sock"
    path.write_text("important")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(str(path), handler).start()
    assert path.read_text() == "important"


def test_stop_leaves_a_successors_socket_in_place(sockdir: Path) -> None:
    path = str(sockdir / "c.sock")
    first = ControlServer(path, handler)
    first.start()
    os.unlink(path)  # e.g. removed by hand, and a new guard started meanwhile
    with ControlServer(path, handler) as second:
        first.stop()
        assert os.path.exists(path)
        assert request(second.path, {"cmd": "ping"}) == "pong"


def test_stop_closes_open_connections(server: ControlServer) -> None:
    sock = connect(server.path)
    time.sleep(0.05)
    server.stop()
    assert at_eof(sock)
    sock.close()
    assert not os.path.exists(server.path)


def test_concurrent_clients_are_all_answered(server: ControlServer) -> None:
    results: list[Any] = []

    def worker(n: int) -> None:
        for i in range(20):
            results.append(request(server.path, {"cmd": "echo", "value": n * 100 + i}))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(n * 100 + i for n in range(8) for i in range(20))


# --------------------------------------------------------------------------- access control


def need_root() -> None:
    ci.need_root("running a client as another user")


CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print(json.dumps({"connect": "EACCES"}))
    raise SystemExit(0)
try:
    s.sendall(b'{"cmd": "whoami"}\n')
except BrokenPipeError:
    pass
buf = b""
while not buf.endswith(b"\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    buf += chunk
s.settimeout(1)
try:
    eof = s.recv(4096) == b""
except TimeoutError:
    eof = False
print(json.dumps({"reply": json.loads(buf), "eof": eof}))
"""


def run_as(uid: int, gid: int, path: str) -> dict[str, Any]:
    """Run the stdlib-only client above as uid/gid (no supplementary groups)."""

    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    # The dev interpreter may live under /root (0700): use one `nobody` can execute.
    for exe in (sys.executable, "/usr/bin/python3"):
        try:
            proc = subprocess.run([exe, "-I", "-c", CLIENT, path], preexec_fn=drop, cwd="/",
                                  capture_output=True, text=True, timeout=20, env={})
        except PermissionError:
            continue
        if proc.returncode == 0:
            return json.loads(proc.stdout)
        if "Permission denied" not in proc.stderr:
            raise AssertionError(proc.stderr)
    pytest.fail(f"no Python interpreter that uid {uid} may run")


def test_non_root_peer_is_refused_by_its_credentials(server: ControlServer) -> None:
    need_root()
    assert run_as(NOBODY, NOBODY, server.path) == {"connect": "EACCES"}  # 0600: the first wall
    os.chmod(server.path, 0o666)  # a loosened mode must not open the door: SO_PEERCRED
    out = run_as(NOBODY, NOBODY, server.path)
    assert out["reply"] == {"ok": False, "error": "permission denied: uid 65534 is not root"}
    assert out["eof"] is True
    assert server.refused == 1
    assert request(server.path, {"cmd": "ping"}) == "pong"  # root still is served


def test_members_of_the_group_are_served(sockdir: Path) -> None:
    need_root()
    import grp

    group = grp.getgrgid(NOBODY).gr_name
    with ControlServer(str(sockdir / "c.sock"), handler, group=group) as srv:
        st = os.stat(srv.path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY
        out = run_as(NOBODY, NOBODY, srv.path)
        assert out["reply"]["ok"] is True
        assert out["reply"]["result"]["uid"] == NOBODY
        assert out["eof"] is False  # served, and kept for more requests
        # Another user outside the group is refused even with a world-writable socket.
        os.chmod(srv.path, 0o666)
        out = run_as(NOBODY - 1, NOBODY - 1, srv.path)
        assert out["reply"]["error"] == f"permission denied: uid {NOBODY - 1} is neither root nor in group {group}"


def test_unknown_group_fails_at_start(sockdir: Path) -> None:
    with pytest.raises(ControlError, match="group 'no-such-group-hg' does not exist"):
        ControlServer(str(sockdir / "c.sock"), handler, group="no-such-group-hg").start()
    assert not os.path.exists(sockdir / "c.sock")
