"""The relay's record framer (pure) and its buffer bookkeeping over real loopback sockets, with a
fake engine: what is kept, released, discarded, and when a FIN or a reset passes on."""

from __future__ import annotations

import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from guard.core.engine import Verdict
from guard.shell.relay import Record, RecordFramer, Relay, RelayTag, SynOutcome


def tls(ctype: int, body: bytes) -> bytes:
    return struct.pack("!BBBH", ctype, 3, 3, len(body)) + body


# --- framer ---------------------------------------------------------------------------------------


def test_records_split_and_joined_across_reads_are_framed_whole() -> None:
    stream = tls(22, b"h" * 300) + tls(23, b"a" * 1000) + tls(21, b"xx")
    f = RecordFramer()
    out: list[Record] = []
    for cut in (1, 4, 7, 305, 306, 900, 1312, len(stream)):  # arbitrary read boundaries
        out += f.feed(stream[f.offset:cut])
    assert [(r.end, r.size, r.content_type) for r in out] == [
        (305, 305, 22), (1310, 1005, 23), (1317, 7, 21)]
    assert f.tls and f.partial == 0


def test_a_stream_that_is_not_tls_is_one_record_per_read() -> None:
    f = RecordFramer()
    assert f.feed(b"GET / HTTP/1.1\r\n") == [Record(16, 16, 0)]
    assert f.feed(b"Host: x\r\n") == [Record(25, 9, 0)]
    assert not f.tls
    # a read that starts with a whole plausible header is framed as TLS again (records.py)
    assert f.feed(tls(23, b"x")) == [Record(31, 6, 23)]


@pytest.mark.parametrize("header", [
    bytes([24, 3, 3, 0, 1]),  # type 24 (heartbeat) is not one we frame
    bytes([23, 2, 0, 0, 1]),  # SSLv2-ish version
    bytes([23, 3, 9, 0, 1]),  # unknown minor
    struct.pack("!BBBH", 23, 3, 3, 16384 + 2049),  # longer than any TLS record
])
def test_a_bad_header_after_good_records_falls_back_covering_every_byte(header: bytes) -> None:
    f = RecordFramer()
    good = tls(22, b"h" * 10)
    out = f.feed(good + header[:3])
    assert out == [Record(15, 15, 22)] and f.partial == 3
    out = f.feed(header[3:] + b"rest")
    assert out == [Record(15 + 5 + 4, 9, 0)]  # the bad header and the rest of this read
    assert f.feed(b"more") == [Record(28, 4, 0)]


def test_an_unfinished_record_is_flushed_at_the_end() -> None:
    f = RecordFramer()
    assert f.feed(tls(23, b"x" * 100)[:50]) == []
    assert f.flush() == Record(50, 50, 23)
    assert f.flush() is None


# --- the relay over loopback ----------------------------------------------------------------------


class FakeEngine:
    def __init__(self, open_verdict: Verdict = Verdict.HOLD,
                 data: Callable[[int, int, int], Verdict] | None = None) -> None:
        self.open_verdict = open_verdict
        self.data = data or (lambda end, size, ctype: Verdict.HOLD)
        self.calls: list[tuple[Any, ...]] = []

    def stream_open(self, conn: int, device_addr: str, device_port: int, remote_addr: str,
                    remote_port: int, device_mac: str | None, host: str | None,
                    now: float) -> tuple[Verdict, Any]:
        self.calls.append(("open", conn, host))
        return self.open_verdict, ("key", conn)

    def stream_data(self, conn: int, end: int, size: int, content_type: int,
                    now: float) -> Verdict:
        self.calls.append(("data", conn, end, size, content_type))
        return self.data(end, size, content_type)

    def stream_down(self, conn: int, nbytes: int, now: float) -> None:
        self.calls.append(("down", conn, nbytes))

    def stream_closed(self, conn: int, now: float, reset: bool) -> None:
        self.calls.append(("closed", conn, reset))

    connect_first = True

    def stream_syn(self, device_addr: str, device_mac: str | None, remote_addr: str,
                   now: float) -> bool:
        self.calls.append(("syn", device_addr, remote_addr))
        return self.connect_first


class World:
    """A device socket, the relay's device leg, and a cloud listener on loopback."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.sel = selectors.DefaultSelector()
        self.relay = Relay(engine, port=0, neighbour=lambda a: None)
        self.relay.selector = self.sel
        self.cloud_l = socket.create_server(("127.0.0.1", 0))
        lst = socket.create_server(("127.0.0.1", 0))
        self.device = socket.create_connection(lst.getsockname())
        leg, peer = lst.accept()
        lst.close()
        self.conn = self.relay.adopt(leg, peer, self.cloud_l.getsockname(), time.time())
        self.cloud: socket.socket | None = None

    def pump(self, until: Callable[[], bool], timeout_s: float = 2.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for key, mask in self.sel.select(0.02):
                assert isinstance(key.data, RelayTag)
                self.relay.on_event(key.data, key.fileobj, mask)
            self.relay.tick(time.time())
            if self.cloud is None and self.cloud_l.fileno() != -1:
                self.cloud_l.setblocking(False)
                try:
                    self.cloud, _ = self.cloud_l.accept()
                    self.cloud.settimeout(0.01)
                except BlockingIOError:
                    pass
            if until():
                return
        raise AssertionError("condition not met in time")

    def cloud_read(self, want: int, timeout_s: float = 2.0) -> bytes:
        got = b""
        self.pump(lambda: self.cloud is not None)
        assert self.cloud is not None
        deadline = time.monotonic() + timeout_s
        while len(got) < want and time.monotonic() < deadline:
            self.pump(lambda: True)
            try:
                chunk = self.cloud.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            got += chunk
        return got

    def close(self) -> None:
        self.relay.close()
        for s in (self.device, self.cloud, self.cloud_l):
            if s is not None:
                s.close()
        self.sel.close()


@pytest.fixture
def world() -> Iterator[Callable[..., World]]:
    made: list[World] = []

    def make(engine: FakeEngine) -> World:
        w = World(engine)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def test_held_records_reach_the_cloud_only_when_released_in_order(world: Any) -> None:
    e = FakeEngine(Verdict.HOLD, lambda end, size, ctype: Verdict.HOLD)
    w = world(e)
    hello, a, b = tls(22, b"h" * 50), tls(23, b"a" * 2000), tls(23, b"b" * 3000)
    w.device.sendall(hello + a + b + tls(23, b"c" * 100)[:40])  # and half a record
    n = len(hello + a + b)
    w.pump(lambda: sum(1 for c in e.calls if c[0] == "data") == 3)
    assert [c for c in e.calls if c[0] == "data"] == [
        ("data", w.conn, 55, 55, 22), ("data", w.conn, 55 + 2005, 2005, 23),
        ("data", w.conn, n, 3005, 23)]
    assert w.relay.stats()["kept_bytes"] == n + 40
    assert w.cloud_read(1, timeout_s=0.3) == b""  # nothing left while held
    w.relay.release(w.conn, 55 + 2005)
    assert w.cloud_read(55 + 2005) == hello + a
    w.relay.discard(w.conn, n)  # b dropped, the half record still kept
    assert w.relay.stats()["kept_bytes"] == 40
    w.relay.release(w.conn, n + 10_000)  # never past what was read nor into an unjudged record
    assert w.cloud_read(1, timeout_s=0.3) == b""


def test_accepted_flow_relays_both_ways_without_asking(world: Any) -> None:
    e = FakeEngine(Verdict.ACCEPT)
    w = world(e)
    w.device.sendall(tls(22, b"h" * 10) + b"x" * 100_000)
    assert len(w.cloud_read(15 + 100_000)) == 15 + 100_000
    assert not [c for c in e.calls if c[0] == "data"]
    assert w.cloud is not None
    w.cloud.sendall(b"y" * 5000)
    w.device.settimeout(2)
    got = b""
    while len(got) < 5000:
        w.pump(lambda: True)
        got += w.device.recv(65536)
    assert got == b"y" * 5000
    assert sum(c[2] for c in e.calls if c[0] == "down") == 5000


def test_server_speaks_first_opens_without_a_name_after_the_wait(world: Any) -> None:
    e = FakeEngine(Verdict.ACCEPT)
    w = world(e)
    t0 = time.monotonic()
    w.pump(lambda: any(c[0] == "open" for c in e.calls))
    assert 0.25 <= time.monotonic() - t0 < 1.0
    assert e.calls[0] == ("open", w.conn, None)


def test_device_fin_passes_on_only_after_the_kept_bytes(world: Any) -> None:
    e = FakeEngine(Verdict.HOLD)
    w = world(e)
    rec = tls(23, b"z" * 500)
    w.device.sendall(rec)
    w.device.shutdown(socket.SHUT_WR)
    w.pump(lambda: w.cloud is not None and any(c[0] == "data" for c in e.calls))
    assert w.cloud_read(1, timeout_s=0.3) == b""  # held, and no FIN yet
    w.relay.release(w.conn, len(rec))
    assert w.cloud_read(len(rec) + 1) == rec  # the bytes, then EOF
    assert w.cloud is not None
    w.cloud.close()
    w.cloud = None
    w.pump(lambda: ("closed", w.conn, False) in e.calls)
    assert w.relay.stats()["connections_open"] == 0


def test_reject_aborts_the_device_with_a_reset_and_no_upstream(world: Any) -> None:
    e = FakeEngine(Verdict.REJECT)
    w = world(e)
    w.device.sendall(tls(22, b"h" * 10))
    w.pump(lambda: ("closed", w.conn, True) in e.calls)
    w.device.settimeout(1)
    with pytest.raises(ConnectionResetError):
        w.device.recv(10)
    w.cloud_l.setblocking(False)
    with pytest.raises(BlockingIOError):
        w.cloud_l.accept()


def test_a_late_abort_resets_both_legs_and_tells_the_engine_once(world: Any) -> None:
    e = FakeEngine(Verdict.HOLD)
    w = world(e)
    w.device.sendall(tls(23, b"q" * 100))
    w.pump(lambda: w.cloud is not None and any(c[0] == "data" for c in e.calls))
    assert w.relay.abort(w.conn)
    assert not w.relay.abort(w.conn)
    assert [c for c in e.calls if c[0] == "closed"] == [("closed", w.conn, True)]
    w.device.settimeout(1)
    with pytest.raises(ConnectionResetError):
        w.device.recv(10)
    assert w.cloud is not None
    with pytest.raises(ConnectionResetError):
        w.cloud.settimeout(1)
        w.cloud.recv(10)


def test_a_reset_from_the_cloud_resets_the_device(world: Any) -> None:
    e = FakeEngine(Verdict.ACCEPT)
    w = world(e)
    w.device.sendall(b"x")
    w.pump(lambda: w.cloud is not None)
    assert w.cloud is not None
    w.cloud.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.cloud.close()
    w.cloud = None
    w.pump(lambda: ("closed", w.conn, True) in e.calls)
    w.device.settimeout(1)
    with pytest.raises(ConnectionResetError):
        w.device.recv(10)


def test_a_failed_connect_resets_the_device(world: Any) -> None:
    e = FakeEngine(Verdict.ACCEPT)
    w = world(e)
    w.cloud_l.close()  # nobody listens: connection refused
    w.device.sendall(b"hello")
    w.pump(lambda: ("closed", w.conn, True) in e.calls)
    assert w.relay.counters["connect_failed"] == 1


def test_reading_stops_when_the_kept_bytes_pass_the_cap(world: Any) -> None:
    e = FakeEngine(Verdict.HOLD)
    w = world(e)
    w.relay.max_kept_bytes = 100_000
    w.device.setblocking(False)
    sent = 0
    with pytest.raises(BlockingIOError):
        for _ in range(10_000):
            sent += w.device.send(tls(23, b"k" * 16000))
            w.pump(lambda: True, timeout_s=0.05)
    kept = w.relay.stats()["kept_bytes"]
    assert 100_000 <= kept <= 100_000 + 65536 + 16005, kept
    assert sent > kept  # the rest waits in the kernel's buffers, not in ours


# --- flood bounds (issue 16 point 6) and splice ----------------------------------------------------


def test_a_trickled_hello_is_aborted_at_the_hello_wait_and_counted(world: Any) -> None:
    e = FakeEngine(Verdict.ACCEPT)
    w = world(e)
    w.relay.hello_wait_s = 0.3
    w.device.sendall(bytes([0x16, 3, 1, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff]))  # 16 MB hello
    w.pump(lambda: w.relay.counters["head_timeout"] == 1)
    assert not [c for c in e.calls if c[0] == "open"]  # never opened, never connected
    w.device.settimeout(1)
    with pytest.raises(ConnectionResetError):
        w.device.recv(10)
    assert list(w.relay.stats()["devices"].values())[0]["head_timeout"] == 1


def test_a_trickled_held_record_is_aborted_at_the_record_wait(world: Any) -> None:
    e = FakeEngine(Verdict.HOLD)
    w = world(e)
    w.relay.record_wait_s = 0.4
    w.device.sendall(tls(22, b"h" * 10) + bytes([23, 3, 3, 0x40, 0x00]) + b"x")
    t0 = time.monotonic()
    for _ in range(20):  # a byte every 0.1 s: never completes
        sent = time.monotonic()
        while time.monotonic() - sent < 0.1 and not w.relay.counters["record_timeout"]:
            w.pump(lambda: True)
        if w.relay.counters["record_timeout"]:
            break
        w.device.send(b"x")
    assert w.relay.counters["record_timeout"] == 1
    assert 0.35 <= time.monotonic() - t0 < 1.5
    assert ("closed", w.conn, True) in e.calls and w.relay.stats()["kept_bytes"] == 0


def test_half_closed_and_silent_connections_are_aborted_when_idle(world: Any) -> None:
    e = FakeEngine(Verdict.ACCEPT)
    w = world(e)
    w.relay.half_closed_idle_s = w.relay.silent_idle_s = 0.5
    w.relay._next_sweep = 0.0
    w.device.sendall(b"x")
    w.device.shutdown(socket.SHUT_WR)  # half-closed; the cloud never answers nor closes
    w.pump(lambda: w.relay.counters["idle_half_closed"] == 1, timeout_s=3.0)
    w2 = world(FakeEngine(Verdict.ACCEPT))  # never sends a byte, nor does the cloud
    w2.relay.half_closed_idle_s = w2.relay.silent_idle_s = 0.5
    w2.pump(lambda: w2.relay.counters["idle_silent"] == 1, timeout_s=3.0)


def test_kept_bytes_are_capped_per_device_across_its_connections(world: Any) -> None:
    e = FakeEngine(Verdict.HOLD)
    w = world(e)
    w.relay.max_kept_per_device = 50_000
    w.device.setblocking(False)
    with pytest.raises(BlockingIOError):
        for _ in range(10_000):
            w.device.send(tls(23, b"k" * 16000))
            w.pump(lambda: True, timeout_s=0.05)
    assert 50_000 <= w.relay.stats()["kept_bytes"] <= 50_000 + 65536 + 16005
    assert w.relay.counters["kept_device_cap"] == 1
    w.relay.discard(w.conn, 10**9)  # under the cap again: reading resumes
    w.pump(lambda: w.relay.stats()["kept_bytes"] > 0)


def test_bulk_passes_through_splice_in_order(world: Any, monkeypatch: Any) -> None:
    import guard.shell.relay as relay_mod

    monkeypatch.setattr(relay_mod, "SPLICE_AFTER_BYTES", 1000)
    e = FakeEngine(Verdict.ACCEPT)
    w = world(e)
    up = bytes(range(256)) * 4000
    w.device.sendall(up[:2000])
    assert w.cloud_read(2000) == up[:2000]
    w.device.sendall(up[2000:])
    assert w.cloud_read(len(up) - 2000) == up[2000:]
    assert w.cloud is not None
    w.cloud.sendall(up)
    w.device.settimeout(2)
    got = b""
    for _ in range(1000):
        if len(got) >= len(up):
            break
        w.pump(lambda: True)
        try:
            got += w.device.recv(1 << 20)
        except TimeoutError:
            pass
    assert got == up
    assert w.relay.counters["spliced"] == 2
    assert sum(c[2] for c in e.calls if c[0] == "down") == len(up)


# --- the SYN hold (design.md 5a.3) ----------------------------------------------------------------


def _syn_relay(engine: FakeEngine, **kw: Any) -> tuple[Relay, selectors.BaseSelector,
                                                      list[tuple[str, SynOutcome]]]:
    sel = selectors.DefaultSelector()
    relay = Relay(engine, port=0, neighbour=lambda a: None, **kw)
    relay.selector = sel
    answers: list[tuple[str, SynOutcome]] = []
    relay.syn_verdict = lambda token, outcome: answers.append((token, outcome))
    return relay, sel, answers


def _pump_syns(relay: Relay, sel: selectors.BaseSelector, until: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 2.0
    while not until() and time.monotonic() < deadline:
        for key, mask in sel.select(0.02):
            relay.on_event(key.data, key.fileobj, mask)
        relay.tick(time.time())
    assert until(), "condition not met in time"


def test_a_syn_is_answered_only_once_the_upstream_connect_is_settled() -> None:
    cloud = socket.create_server(("127.0.0.1", 0))
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: the connect is refused
    relay, sel, answers = _syn_relay(FakeEngine())
    try:
        now = time.time()
        relay.syn("127.0.0.1", 40000, "127.0.0.1", cloud.getsockname()[1], None, "a", now)
        relay.syn("127.0.0.1", 40000, "127.0.0.1", cloud.getsockname()[1], None, "a2", now)
        relay.syn("127.0.0.1", 40001, "127.0.0.1", closed_port, None, "b", now)
        _pump_syns(relay, sel, lambda: len(answers) == 3)
        assert sorted(answers) == [("a", SynOutcome.PASS), ("a2", SynOutcome.PASS),
                                   ("b", SynOutcome.REFUSED)]
        key = ("127.0.0.1", 40000, "127.0.0.1", cloud.getsockname()[1])
        assert key in relay.preconnected and not relay.syns
        # a SYN retransmitted after the connect is passed at once
        relay.syn(*key, None, "a3", now)
        assert answers[-1] == ("a3", SynOutcome.PASS)
        # an unused connected leg is closed after its TTL
        relay.tick(now + 60.0)
        assert not relay.preconnected and relay.counters["preconnected_expired"] == 1
        assert relay.counters["syn_connected"] == 1 and relay.counters["syn_refused"] == 1
    finally:
        relay.close()
        cloud.close()
        sel.close()


def test_the_leg_a_syn_connected_has_the_relays_options_once_the_syn_passed() -> None:
    """The options come after the verdict (off the SYN's path), but before the leg is used:
    abort on close (a crash resets the cloud, design.md 5a.5), keepalive, user timeout, no Nagle."""
    from guard.shell.relay import KEEPIDLE_S, USER_TIMEOUT_MS

    cloud = socket.create_server(("127.0.0.1", 0))
    relay, sel, answers = _syn_relay(FakeEngine())
    try:
        key = ("127.0.0.1", 40000, "127.0.0.1", cloud.getsockname()[1])
        relay.syn(*key, None, "a", time.time())
        _pump_syns(relay, sel, lambda: len(answers) == 1)
        assert answers == [("a", SynOutcome.PASS)]
        leg = relay.preconnected[key][0]
        assert leg.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert leg.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPIDLE_S
        assert leg.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == USER_TIMEOUT_MS
        assert leg.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        onoff, linger = struct.unpack("ii", leg.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
        assert (onoff, linger) == (1, 0)
    finally:
        relay.close()
        cloud.close()
        sel.close()


def test_a_syn_the_rules_refuse_anyway_passes_without_any_upstream_connect() -> None:
    engine = FakeEngine()
    engine.connect_first = False
    relay, sel, answers = _syn_relay(engine)
    try:
        relay.syn("127.0.0.1", 40000, "127.0.0.1", 9, None, "t", time.time())
        assert answers == [("t", SynOutcome.PASS)]
        assert not relay.preconnected and not relay.syns
        assert relay.counters["syn_unconnected"] == 1
    finally:
        relay.close()
        sel.close()


def test_held_syns_count_against_the_per_device_cap_and_a_silent_path_times_out() -> None:
    # A listener whose accept queue is full drops further SYNs: the relay's connect hangs.
    full = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(full.getsockname())
        fillers.append(f)
    time.sleep(0.2)
    relay, sel, answers = _syn_relay(FakeEngine(), max_per_device=2)
    try:
        now = time.time()
        port = full.getsockname()[1]
        relay.syn("127.0.0.1", 40000, "127.0.0.1", port, None, "x", now)
        relay.syn("127.0.0.1", 40001, "127.0.0.1", port, None, "y", now)
        for key, mask in sel.select(0.2):
            relay.on_event(key.data, key.fileobj, mask)
        assert answers == [] and len(relay.syns) == 2  # both wait for their connect
        relay.syn("127.0.0.1", 40002, "127.0.0.1", port, None, "z", now)
        assert answers == [("z", SynOutcome.REFUSED)] and relay.counters["over_cap"] == 1
        relay.tick(now + 60.0)  # no answer from the path: dropped, as the path drops them
        assert sorted(answers[1:]) == [("x", SynOutcome.SILENT), ("y", SynOutcome.SILENT)]
        assert not relay.syns and relay.counters["syn_silent"] == 2
    finally:
        relay.close()
        sel.close()
        for f in fillers:
            f.close()
        full.close()


def test_a_connection_refused_at_open_resets_the_leg_its_syn_connected() -> None:
    """Messaging named only by its ClientHello: the SYN hold connected upstream, the relay then
    refuses the stream; the connected leg is reset at once, not left open until its TTL."""
    cloud = socket.create_server(("127.0.0.1", 0))
    relay, sel, answers = _syn_relay(FakeEngine(open_verdict=Verdict.REJECT))
    lst = socket.create_server(("127.0.0.1", 0))
    device = socket.create_connection(lst.getsockname())
    leg, peer = lst.accept()
    lst.close()
    try:
        now = time.time()
        remote = cloud.getsockname()
        relay.syn(peer[0], peer[1], remote[0], remote[1], None, "t", now)
        _pump_syns(relay, sel, lambda: bool(answers))
        assert answers == [("t", SynOutcome.PASS)] and relay.preconnected
        upstream, _ = cloud.accept()
        device.sendall(tls(22, b"h" * 40))
        relay.adopt(leg, peer, remote, now)
        assert not relay.preconnected and relay.syn_per_device == {}
        upstream.settimeout(2.0)
        with pytest.raises(ConnectionResetError):
            while upstream.recv(100):
                pass
        upstream.close()
    finally:
        relay.close()
        device.close()
        cloud.close()
        sel.close()
