"""The daemon loop's readiness poller: epoll behind the three calls the relay makes.

`selectors.EpollSelector` builds a SelectorKey per registration and looks one up per event; a
relayed connection registers and unregisters two or three sockets and wakes the loop two or three
times, and those objects were a measurable part of its CPU (bench/relay.py). This keeps the
`selectors` interface the relay uses (`register`, `modify`, `unregister`, the EVENT_READ and
EVENT_WRITE masks, KeyError for what is not registered) and hands events out as plain tuples.
Rules of this module: an error or hang-up on a socket is reported as every event it is registered
for (as `selectors` does: the handler's next call sees the error); a file closed before it was
unregistered is still unregistered by its object, so its number can be registered again.
"""

from __future__ import annotations

import select
from selectors import EVENT_READ, EVENT_WRITE
from typing import Any

__all__ = ["EVENT_READ", "EVENT_WRITE", "Poller"]

_TO_EPOLL = {EVENT_READ: select.EPOLLIN, EVENT_WRITE: select.EPOLLOUT,
             EVENT_READ | EVENT_WRITE: select.EPOLLIN | select.EPOLLOUT}
_AS_READ = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
_AS_WRITE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


def _fd(fileobj: Any) -> int:
    fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
    if fd < 0:
        raise ValueError(f"invalid file descriptor {fd}")
    return fd


class Poller:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._fds: dict[int, tuple[Any, Any, int]] = {}  # fd -> (file object, data, events)

    def register(self, fileobj: Any, events: int, data: Any = None) -> None:
        fd = _fd(fileobj)
        if fd in self._fds:
            raise KeyError(f"file descriptor {fd} is already registered")
        self._epoll.register(fd, _TO_EPOLL[events])
        self._fds[fd] = (fileobj, data, events)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> None:
        fd = _fd(fileobj)
        if fd not in self._fds:
            raise KeyError(f"file descriptor {fd} is not registered")
        self._epoll.modify(fd, _TO_EPOLL[events])
        self._fds[fd] = (fileobj, data, events)

    def unregister(self, fileobj: Any) -> None:
        try:
            fd = _fd(fileobj)
        except ValueError:  # closed before it was unregistered: found by the object itself
            fd = next((f for f, entry in self._fds.items() if entry[0] is fileobj), -1)
        del self._fds[fd]  # KeyError when it is not registered
        try:
            self._epoll.unregister(fd)
        except OSError:  # closed already: epoll forgot it with the file
            pass

    def poll(self, timeout: float | None) -> list[tuple[Any, Any, int]]:
        """(data, file object, EVENT_* mask) of each ready registration; waits at most
        `timeout` seconds (None: until one is ready)."""
        try:
            events = self._epoll.poll(-1 if timeout is None else max(timeout, 0.0))
        except InterruptedError:
            return []
        fds = self._fds
        ready = []
        for fd, ev in events:
            entry = fds.get(fd)
            if entry is None:
                continue
            mask = (EVENT_READ if ev & _AS_READ else 0) | (EVENT_WRITE if ev & _AS_WRITE else 0)
            mask &= entry[2]
            if mask:
                ready.append((entry[1], entry[0], mask))
        return ready

    def __len__(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        self._epoll.close()
        self._fds.clear()
