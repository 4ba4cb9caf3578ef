"""guard/shell/poller.py: the daemon loop's epoll, with the `selectors` calls the relay makes."""

from __future__ import annotations

import errno
import socket

import pytest

from guard.shell.poller import EVENT_READ, EVENT_WRITE, Poller
from guard.shell.relay import _connect_state


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_events_carry_the_data_and_only_what_is_registered(pair) -> None:
    a, b = pair
    p = Poller()
    try:
        p.register(a, EVENT_READ, "a")
        assert p.poll(0) == []  # nothing to read; writable is not asked for
        b.send(b"x")
        assert p.poll(1.0) == [("a", a, EVENT_READ)]
        p.modify(a, EVENT_READ | EVENT_WRITE, "a2")
        assert p.poll(1.0) == [("a2", a, EVENT_READ | EVENT_WRITE)]
        p.modify(a, EVENT_WRITE, "a3")
        assert p.poll(1.0) == [("a3", a, EVENT_WRITE)]
        p.unregister(a)
        assert p.poll(0) == [] and len(p) == 0
    finally:
        p.close()


def test_misuse_raises_as_selectors_does(pair) -> None:
    a, _ = pair
    p = Poller()
    try:
        with pytest.raises(KeyError):
            p.unregister(a)
        with pytest.raises(KeyError):
            p.modify(a, EVENT_READ)
        p.register(a, EVENT_READ)
        with pytest.raises(KeyError):
            p.register(a, EVENT_WRITE)
        closed = socket.socket()
        closed.close()
        with pytest.raises(ValueError):
            p.register(closed, EVENT_READ)
    finally:
        p.close()


def test_a_hang_up_wakes_every_registered_event_and_a_closed_file_is_forgotten(pair) -> None:
    a, b = pair
    p = Poller()
    try:
        p.register(a, EVENT_WRITE, "w")
        a.shutdown(socket.SHUT_WR)
        b.close()  # the peer is gone: EPOLLHUP, reported as the event registered
        assert p.poll(1.0) == [("w", a, EVENT_WRITE)]
        a.close()  # epoll drops a closed file by itself
        assert p.poll(0) == []
        p.unregister(a)  # found by the object (its fileno() is -1 now): no error
        assert len(p) == 0
        with pytest.raises(KeyError):
            p.unregister(a)
        c, d = socket.socketpair()  # may reuse a's number: registering it works
        try:
            p.register(c, EVENT_READ, "c")
            d.send(b"x")
            assert p.poll(1.0) == [("c", c, EVENT_READ)]
        finally:
            c.close()
            d.close()
    finally:
        p.close()


def test_connect_state_reads_a_connect_that_ended_within_the_call() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        assert s.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
        assert _connect_state(s) == 0  # loopback answers inside connect()
    finally:
        s.close()
    server.close()  # nobody listens there now: the connect is refused within the call
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        err = s.connect_ex(("127.0.0.1", port))
        assert err == errno.ECONNREFUSED or _connect_state(s) == errno.ECONNREFUSED
    finally:
        s.close()
