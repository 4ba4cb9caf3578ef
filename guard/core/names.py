"""Which name an address stands for, learned from DNS answers, with their TTLs.

Rules of this module: entries expire (OpenSnitch's cache never does, and goes stale); the cache is
bounded (a LAN host flooding answers cannot grow it without limit); lookups take `now`.
"""

from __future__ import annotations

from collections import OrderedDict

# A TTL of 0 still names the connection that follows the answer at once; keep every answer at
# least this long, and no answer longer than a day, whatever the (attacker-controlled) TTL says.
MIN_TTL_S = 60.0
MAX_TTL_S = 86400.0


class NameCache:
    """address -> (name, expires). The newest answer for an address wins."""

    def __init__(self, max_entries: int = 8192) -> None:
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._max = max_entries

    def learn(self, address: str, name: str, ttl_s: float, now: float) -> None:
        ttl = min(max(float(ttl_s), MIN_TTL_S), MAX_TTL_S)
        self._entries[address] = (name, now + ttl)
        self._entries.move_to_end(address)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def lookup(self, address: str, now: float) -> str | None:
        entry = self._entries.get(address)
        if entry is None:
            return None
        name, expires = entry
        if now >= expires:
            del self._entries[address]
            return None
        return name

    def expire(self, now: float) -> int:
        stale = [a for a, (_, expires) in self._entries.items() if now >= expires]
        for address in stale:
            del self._entries[address]
        return len(stale)

    def __len__(self) -> int:
        return len(self._entries)
