"""Action tokens: what a phone notification's Allow and Deny buttons carry (issue 15 point 3).

Rules of this module: a token is 192 random bits kept only in this process's memory, mapped to
one (upload id, verb) and to the moment the upload's hold ends; nothing about it can be derived
or forged from what it answers. A token is good once: the first use of either of an upload's
tokens spends them all (the other button is dead too), and a token dies when its hold ends or when
the upload is decided some other way (`revoke`). Tokens are stored by their SHA-256, so a lookup
leaks nothing by timing. Redeeming never decides anything: it names the upload and the verb, and
the caller asks the daemon (the control protocol's `decide`), which still refuses an upload that
is no longer pending.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ActionTokens", "TokenRefused", "VERBS"]

VERBS = ("allow", "deny")
TOKEN_BYTES = 24  # 192 bits
MAX_TOKENS = 1024  # live tokens; the oldest go first beyond that (a flood of held uploads)
MAX_SPENT = 4096  # digests of spent tokens remembered, to say "already used" rather than unknown
MAX_LIFETIME_S = 3600.0  # a hold never lasts this long; a token never outlives it either
TOKEN_MAX_CHARS = 64  # what a redeem even looks at (urlsafe base64 of 24 bytes is 32)


class TokenRefused(Exception):
    """A token that does not answer anything: forged, spent, expired or revoked. `reason` is one
    of "unknown", "used", "expired" (the message says it in words)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Entry:
    upload_id: int
    verb: str
    expires: float


class ActionTokens:
    """The live tokens of held uploads. Thread-safe: hooks mint from their worker threads, the
    web server redeems from its connection threads, the daemon revokes from its loop."""

    def __init__(self, *, clock: Callable[[], float] = time.time,
                 max_tokens: int = MAX_TOKENS) -> None:
        self.clock = clock
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._live: OrderedDict[bytes, _Entry] = OrderedDict()
        self._spent: OrderedDict[bytes, str] = OrderedDict()  # digest -> why it is dead
        self._stats = {"minted": 0, "redeemed": 0, "refused": 0}

    def mint(self, upload_id: int, expires: float | None) -> dict[str, str]:
        """One token per verb for `upload_id`, good until `expires` (the hold's end; None or a
        time further than MAX_LIFETIME_S away is capped): {"allow": token, "deny": token}."""
        now = self.clock()
        limit = now + MAX_LIFETIME_S
        until = limit if expires is None or not expires < limit else float(expires)
        out = {}
        with self._lock:
            self._prune(now)
            for verb in VERBS:
                token = secrets.token_urlsafe(TOKEN_BYTES)
                self._live[_digest(token)] = _Entry(int(upload_id), verb, until)
                out[verb] = token
            while len(self._live) > self.max_tokens:
                digest, _ = self._live.popitem(last=False)
                self._remember(digest, "expired")
            self._stats["minted"] += len(out)
        return out

    def redeem(self, token: object) -> tuple[int, str]:
        """(upload id, verb) for a live token, spending it and its siblings; TokenRefused else."""
        now = self.clock()
        with self._lock:
            if not isinstance(token, str) or not 0 < len(token) <= TOKEN_MAX_CHARS:
                self._stats["refused"] += 1
                raise TokenRefused("unknown", "not an action token")
            digest = _digest(token)
            entry = self._live.pop(digest, None)
            if entry is None:
                self._stats["refused"] += 1
                why = self._spent.get(digest)
                if why == "used":
                    raise TokenRefused("used", "this button was already used")
                if why == "expired":
                    raise TokenRefused("expired", "this upload is no longer waiting")
                raise TokenRefused("unknown", "unknown action token")
            if now >= entry.expires:
                self._remember(digest, "expired")
                self._stats["refused"] += 1
                raise TokenRefused("expired", "this upload is no longer waiting")
            self._remember(digest, "used")
            self._drop_upload(entry.upload_id, "used")
            self._stats["redeemed"] += 1
            return entry.upload_id, entry.verb

    def revoke(self, upload_id: int) -> int:
        """The upload was decided (or ended) another way: its tokens die. How many did."""
        with self._lock:
            return self._drop_upload(int(upload_id), "expired")

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._prune(self.clock())
            return {**self._stats, "live": len(self._live)}

    def __len__(self) -> int:
        with self._lock:
            self._prune(self.clock())
            return len(self._live)

    # -- under the lock -------------------------------------------------------------------------

    def _drop_upload(self, upload_id: int, why: str) -> int:
        dead = [d for d, e in self._live.items() if e.upload_id == upload_id]
        for digest in dead:
            del self._live[digest]
            self._remember(digest, why)
        return len(dead)

    def _prune(self, now: float) -> None:
        for digest in [d for d, e in self._live.items() if now >= e.expires]:
            del self._live[digest]
            self._remember(digest, "expired")

    def _remember(self, digest: bytes, why: str) -> None:
        self._spent[digest] = why
        self._spent.move_to_end(digest)
        while len(self._spent) > MAX_SPENT:
            self._spent.popitem(last=False)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()
