"""SQLite store: upload ids, always-rules, windows, pending uploads and the audit log.

Rules of this module:
- Every write commits before it returns, under WAL with synchronous=FULL: once a method has
  returned, a kill -9 or power cut cannot lose it (an acknowledged decision stays decided).
- The store never reads the clock: every time is a `now`/`decided_at` argument (Unix seconds).
- A database that is not ours (garbage, failed quick_check, foreign or damaged schema) is moved
  aside as `<name>.corrupt-<now>` (with its -wal/-shm) and reported as `StoreCorrupt`; the caller
  decides what to do (come up fail-closed on a new store). Nothing is ever silently reset.
- Upload ids come from a persisted sequence, never from rowids of pruned tables: never reused.
- The audit log is bounded by age, rows and bytes (`prune`); only audit records are ever pruned
  for size, and the file is shrunk only when pruning freed enough to matter (flash wear).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from guard.core.policy import Outcome, Verb, WindowKind

SCHEMA_VERSION = 2  # 2: windows.duration_text, mode overrides, blocked connection attempts
APPLICATION_ID = 0x48534754  # "HSGT": marks the file as ours (PRAGMA application_id)

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "Action",
    "AlwaysRule",
    "AuditRecord",
    "BlockedAttempt",
    "ModeOverride",
    "Outcome",
    "PendingUpload",
    "Pruned",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "StoreTooNew",
    "Window",
    "WindowKind",
]


# One vocabulary: outcomes, verbs and window kinds are defined once, in the core.
Action = Verb


class StoreError(RuntimeError):
    """The store cannot be used as asked."""


class StoreTooNew(StoreError):
    """The database was written by a newer hushgate (schema version above ours); left untouched."""


class StoreCorrupt(StoreError):
    """The database was unusable and has been moved aside to `moved_to`.

    `last_upload_id` is the sequence value salvaged from the old file when it could still be
    read; `next_id_floor` is what to pass as `upload_id_floor` when opening a fresh store so
    upload ids are never reused (falls back to int(now): per-upload ids never reach that)."""

    def __init__(
        self, path: Path, moved_to: Path, reason: str, last_upload_id: int | None, now: float
    ) -> None:
        super().__init__(f"state database {path} unusable ({reason}); moved to {moved_to}")
        self.path = path
        self.moved_to = moved_to
        self.reason = reason
        self.last_upload_id = last_upload_id
        self.next_id_floor = last_upload_id if last_upload_id is not None else int(now)


@dataclass(frozen=True, slots=True)
class AlwaysRule:
    id: int
    device: str
    action: Action
    created: float
    source: str
    category: str | None = None
    host: str | None = None


@dataclass(frozen=True, slots=True)
class Window:
    id: int
    device: str
    kind: WindowKind
    until: float
    created: float
    category: str | None = None  # None: every category of the device
    source: str = ""
    duration_text: str | None = None  # the duration as the person typed it ("400d", "90s")


@dataclass(frozen=True, slots=True)
class PendingUpload:
    """An upload waiting for a decision, as written when it starts (design 5: after a restart its
    connection is reset as lost, so the 5-tuple and sequence numbers are kept)."""

    id: int
    device: str
    proto: str  # "tcp" | "udp"
    src: str
    sport: int
    dst: str
    dport: int
    started: float
    host: str | None = None
    category: str | None = None
    seq_up: int | None = None  # next sequence number device -> remote
    ack_up: int | None = None  # latest ack device -> remote (= remote's next sequence number)
    seq_down: int | None = None
    ack_down: int | None = None

    @property
    def remote(self) -> str:
        return f"[{self.dst}]:{self.dport}" if ":" in self.dst else f"{self.dst}:{self.dport}"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    upload_id: int | None
    device: str
    outcome: Outcome
    decided_by: str
    decided_at: float
    host: str | None = None
    remote: str | None = None
    category: str | None = None
    upload_bytes: int = 0
    packets: int = 0
    started: float | None = None


@dataclass(frozen=True, slots=True)
class BlockedAttempt:
    """Connection attempts of a blocked category (messaging, calling) refused to a device.
    Attempts to the same host within BLOCKED_COALESCE_S of the last are one row."""

    id: int
    device: str
    host: str | None
    remote: str | None
    category: str | None
    reason: str
    first_at: float
    last_at: float
    attempts: int


@dataclass(frozen=True, slots=True)
class ModeOverride:
    """A device's mode as set at run time (`hushgate mode`), over the config file's."""

    device: str
    mode: str
    set_at: float
    source: str


# Blocked attempts to one host closer together than this are counted in one row (a speaker that
# retries a blocked host in a loop writes one row a minute, not one per attempt).
BLOCKED_COALESCE_S = 60.0


@dataclass(frozen=True, slots=True)
class Pruned:
    """What `Store.prune` did. `used_bytes`: the database's pages in use; `file_bytes`: its pages
    in all, which is the main file's size once the WAL is checkpointed (done after a reclaim)."""

    removed: int  # audit records removed, for age, rows and size together
    removed_for_size: int
    used_bytes: int
    file_bytes: int
    reclaimed: bool  # free pages were handed back to the file system
    over_bound: bool  # the data that is never pruned for size alone exceeds max_bytes
    # for the log: the first prune that finds the bound unreachable, or a failed VACUUM
    warning: str | None = None


# The byte bound deletes the oldest tenth of the audit log (as counted when it starts) per round:
# at most this many rounds empty it, so the loop is bounded whatever the b-tree does.
_SIZE_ROUNDS = 10
# Free pages are handed back to the file system (the file shrinks) only when the file exceeds the
# byte bound or the free pages reach a quarter of it: the routine trickle freed by age pruning is
# reused by new records instead of rewriting pages on flash every housekeeping round.
_RECLAIM_SHARE = 4
# SQLite lets the -wal grow to 1000 pages (~4 MiB) before a checkpoint and keeps the file at its
# high-water size; with a byte bound it is held to a quarter of the bound instead (16 pages at
# least). Checkpoints come more often, but each copies only the distinct pages changed since the
# last one (mostly the same few tail pages of the audit log and its indexes), while what goes
# into the WAL is the same either way.
_WAL_SHARE = 4
_WAL_MIN_PAGES = 16
_WAL_MAX_PAGES = 1000  # SQLite's default wal_autocheckpoint: never a bigger WAL than without bound
# A failed VACUUM (flash full, say) is retried no sooner than this.
_VACUUM_RETRY_S = 3600.0

# The pending table's columns, in PendingUpload's field order.
_P_FIELDS = (
    "id",
    "device",
    "proto",
    "src",
    "sport",
    "dst",
    "dport",
    "started",
    "host",
    "category",
    "seq_up",
    "ack_up",
    "seq_down",
    "ack_down",
)
_P_COLS = ", ".join(_P_FIELDS)

# Columns per table: checked on open, so a same-named file of another program (or a damaged
# schema) is never written to.
_SCHEMA: dict[str, str] = {
    "upload_seq": """
        CREATE TABLE upload_seq (
            one INTEGER PRIMARY KEY CHECK (one = 1),
            last INTEGER NOT NULL)""",
    "rules": """
        CREATE TABLE rules (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device TEXT NOT NULL,
            category TEXT,
            host TEXT,
            action TEXT NOT NULL CHECK (action IN ('allow', 'deny')),
            created REAL NOT NULL,
            source TEXT NOT NULL,
            CHECK ((category IS NULL) <> (host IS NULL)))""",
    "windows": """
        CREATE TABLE windows (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('allow', 'quiet')),
            until REAL NOT NULL,
            created REAL NOT NULL,
            category TEXT,
            source TEXT NOT NULL,
            duration_text TEXT)""",
    "audit": """
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            upload_id INTEGER UNIQUE,
            device TEXT NOT NULL,
            host TEXT,
            remote TEXT,
            category TEXT,
            bytes INTEGER NOT NULL,
            packets INTEGER NOT NULL,
            started REAL,
            decided_at REAL NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('approved', 'denied', 'expired', 'window',
                'quiet', 'rule', 'monitored', 'capped', 'lost')),
            decided_by TEXT NOT NULL)""",
    "pending": """
        CREATE TABLE pending (
            id INTEGER PRIMARY KEY,
            device TEXT NOT NULL,
            proto TEXT NOT NULL,
            src TEXT NOT NULL,
            sport INTEGER NOT NULL,
            dst TEXT NOT NULL,
            dport INTEGER NOT NULL,
            started REAL NOT NULL,
            host TEXT,
            category TEXT,
            seq_up INTEGER,
            ack_up INTEGER,
            seq_down INTEGER,
            ack_down INTEGER)""",
    "modes": """
        CREATE TABLE modes (
            device TEXT PRIMARY KEY,
            mode TEXT NOT NULL,
            set_at REAL NOT NULL,
            source TEXT NOT NULL)""",
    "blocked": """
        CREATE TABLE blocked (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device TEXT NOT NULL,
            host TEXT,
            remote TEXT,
            category TEXT,
            reason TEXT NOT NULL,
            first_at REAL NOT NULL,
            last_at REAL NOT NULL,
            attempts INTEGER NOT NULL)""",
}
_INDEXES = (
    "CREATE INDEX audit_decided ON audit (decided_at)",
    "CREATE INDEX audit_device ON audit (device, decided_at)",
    "CREATE INDEX blocked_last ON blocked (last_at)",
)
# Schema migrations: version -> the statements that bring a database of that version to the next
# (each run in one transaction).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE windows ADD COLUMN duration_text TEXT",
        _SCHEMA["modes"], _SCHEMA["blocked"], "CREATE INDEX blocked_last ON blocked (last_at)"),
}
_COLUMNS = {
    "upload_seq": ["one", "last"],
    "rules": ["id", "device", "category", "host", "action", "created", "source"],
    "windows": ["id", "device", "kind", "until", "created", "category", "source",
                "duration_text"],
    "audit": [
        "id",
        "upload_id",
        "device",
        "host",
        "remote",
        "category",
        "bytes",
        "packets",
        "started",
        "decided_at",
        "outcome",
        "decided_by",
    ],
    "pending": list(_P_FIELDS),
    "modes": ["device", "mode", "set_at", "source"],
    "blocked": ["id", "device", "host", "remote", "category", "reason", "first_at", "last_at",
                "attempts"],
}


class _Unusable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so no write is left in an implicit
    # transaction that a later crash could roll back after the caller was told it was stored.
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


class Store:
    """The one writer of the state database. Thread-safe (one lock around the connection)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, lost: list[PendingUpload]) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self._lost = lost
        self._over_bound = False  # warned that max_bytes is below the data kept regardless
        self._vacuum_not_before = float("-inf")

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], now: float, *, upload_id_floor: int = 0) -> Store:
        """Open or create the store at `path` (directory 0700, file 0600 when created).

        Raises StoreCorrupt after moving an unusable file aside, StoreTooNew for a newer schema.
        `upload_id_floor`: a fresh store hands out ids above it (see StoreCorrupt)."""
        p = Path(path)
        if not p.parent.exists():
            p.parent.mkdir(parents=True, mode=0o700)
            os.chmod(p.parent, 0o700)  # mkdir's mode is filtered by the umask
        if p.is_dir():
            raise StoreError(f"the state database path {p} is a directory")
        created = not p.exists()
        if not created:
            reason = _precheck(p)
            if reason is not None:
                # judged without letting SQLite touch the file or its -wal (it would consume
                # them): the bytes are moved aside exactly as they were
                moved = _move_aside(p, now)
                raise StoreCorrupt(p, moved, reason, None, now)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the state database {p}: {exc.strerror}") from None
        try:
            if created:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        conn: sqlite3.Connection | None = None
        try:
            try:
                conn = _connect(p)
                cls._check_or_create(conn, upload_id_floor)
            except sqlite3.DatabaseError as exc:
                _raise_if_damaged(exc)
                raise StoreError(f"cannot open the state database {p}: {exc}") from None
        except _Unusable as exc:
            salvaged = _salvage_last_id(conn)
            if conn is not None:
                conn.close()
            moved = _move_aside(p, now)
            raise StoreCorrupt(p, moved, exc.reason, salvaged, now) from None
        except StoreError:  # too new, locked, unreadable: not ours to move
            if conn is not None:
                conn.close()
            raise
        lost = [_pending(r) for r in conn.execute(f"SELECT {_P_COLS} FROM pending ORDER BY id")]
        return cls(conn, p, lost)

    @staticmethod
    def _check_or_create(conn: sqlite3.Connection, upload_id_floor: int) -> None:
        try:
            check = conn.execute("PRAGMA quick_check").fetchall()
            if [r[0] for r in check] != ["ok"]:
                raise _Unusable("quick_check: " + "; ".join(str(r[0]) for r in check[:3]))
            app = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%'"
                )
            }
        except sqlite3.DatabaseError as exc:
            _raise_if_damaged(exc)
            raise StoreError(f"cannot read the state database: {exc}") from None
        if not tables and app == 0:
            _create(conn, upload_id_floor)
            return
        if app != APPLICATION_ID:
            raise _Unusable(f"not a hushgate database (application_id {app:#x})")
        if version > SCHEMA_VERSION:
            raise StoreTooNew(
                f"schema version {version} is newer than this hushgate's {SCHEMA_VERSION}"
            )
        if version < 1:
            raise _Unusable(f"unknown schema version {version}")
        while version < SCHEMA_VERSION:  # older versions, one step per transaction
            steps = _MIGRATIONS.get(version)
            if steps is None:
                raise _Unusable(f"no migration from schema version {version}")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for sql in steps:
                        conn.execute(sql)
                    conn.execute(f"PRAGMA user_version = {version + 1}")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise StoreError(f"cannot migrate the state database: {exc}") from None
                raise _Unusable(f"migration from schema version {version}: {exc}") from None
            version += 1
        for table, cols in _COLUMNS.items():
            have = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            if have != cols:
                raise _Unusable(f"table {table} has columns {have}, expected {cols}")
        if conn.execute("SELECT COUNT(*) FROM upload_seq").fetchone()[0] != 1:
            raise _Unusable("upload id sequence missing")
        _pragmas(conn)

    # -- plumbing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (and fsynced) before the caller gets control back."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    # -- upload ids ------------------------------------------------------------------------------

    def next_upload_id(self) -> int:
        """A new upload id, durable before it is returned: never handed out twice."""
        with self._tx() as c:
            c.execute("UPDATE upload_seq SET last = last + 1 WHERE one = 1")
            return int(c.execute("SELECT last FROM upload_seq WHERE one = 1").fetchone()[0])

    def last_upload_id(self) -> int:
        return int(self._query("SELECT last FROM upload_seq WHERE one = 1")[0][0])

    def reserve_upload_ids(self, through: int) -> None:
        """Upload ids up to `through` are taken (the engine hands them out, guard/core/engine.py
        `UploadIds`): durable before this returns; the sequence never goes back, and the next
        start (and `next_upload_id`) begins after them."""
        with self._tx() as c:
            c.execute("UPDATE upload_seq SET last = MAX(last, ?) WHERE one = 1", (int(through),))

    # -- always-rules ------------------------------------------------------------------------------

    def add_rule(
        self,
        device: str,
        action: Action | str,
        now: float,
        *,
        category: str | None = None,
        host: str | None = None,
        source: str,
    ) -> AlwaysRule:
        """A persisted rule for a device and exactly one of category or host."""
        action = Action(action)
        if (category is None) == (host is None):
            raise ValueError("an always-rule names exactly one of category or host")
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO rules (device, category, host, action, created, source) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (device, category, host, action.value, now, source),
            )
            rid = cur.lastrowid
        assert rid is not None
        return AlwaysRule(rid, device, action, now, source, category, host)

    def remove_rule(self, rule_id: int) -> bool:
        with self._tx() as c:
            return c.execute("DELETE FROM rules WHERE id = ?", (rule_id,)).rowcount == 1

    def rules(self, device: str | None = None) -> list[AlwaysRule]:
        sql = "SELECT id, device, action, created, source, category, host FROM rules"
        args: tuple[Any, ...] = ()
        if device is not None:
            sql += " WHERE device = ?"
            args = (device,)
        return [
            AlwaysRule(r[0], r[1], Action(r[2]), r[3], r[4], r[5], r[6])
            for r in self._query(sql + " ORDER BY id", args)
        ]

    # -- windows ------------------------------------------------------------------------------------

    def add_window(
        self,
        device: str,
        kind: WindowKind | str,
        until: float,
        now: float,
        *,
        category: str | None = None,
        source: str = "",
        duration_text: str | None = None,
    ) -> Window:
        return self.open_window(device, kind, until, now, category=category, source=source,
                                duration_text=duration_text)[0]

    def open_window(
        self,
        device: str,
        kind: WindowKind | str,
        until: float,
        now: float,
        *,
        category: str | None = None,
        source: str = "",
        duration_text: str | None = None,
        supersede: bool = False,
    ) -> tuple[Window, list[Window]]:
        """A new window; with `supersede`, the device's active windows of the other kind that it
        overlaps (policy.supersedes) end now, in the same transaction. Returns the window and
        the ones it ended."""
        kind = WindowKind(kind)
        if until <= now:
            raise ValueError("a window must end in the future")
        ended: list[Window] = []
        with self._tx() as c:
            if supersede:
                rows = c.execute(
                    f"SELECT {_W_COLS} FROM windows WHERE device = ? AND kind <> ? AND until > ? "
                    "AND (category IS NULL OR ? IS NULL OR category = ?) ORDER BY id",
                    (device, kind.value, now, category, category)).fetchall()
                ended = [_window(r) for r in rows]
                c.executemany("DELETE FROM windows WHERE id = ?", [(w.id,) for w in ended])
            cur = c.execute(
                "INSERT INTO windows (device, kind, until, created, category, source, "
                "duration_text) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (device, kind.value, until, now, category, source, duration_text),
            )
            wid = cur.lastrowid
        assert wid is not None
        return Window(wid, device, kind, until, now, category, source, duration_text), ended

    def remove_window(self, window_id: int) -> bool:
        with self._tx() as c:
            return c.execute("DELETE FROM windows WHERE id = ?", (window_id,)).rowcount == 1

    def active_windows(self, now: float, device: str | None = None) -> list[Window]:
        sql = f"SELECT {_W_COLS} FROM windows WHERE until > ?"
        args: tuple[Any, ...] = (now,)
        if device is not None:
            sql += " AND device = ?"
            args = (now, device)
        return [_window(r) for r in self._query(sql + " ORDER BY id", args)]

    def window(self, window_id: int) -> Window | None:
        rows = self._query(f"SELECT {_W_COLS} FROM windows WHERE id = ?", (window_id,))
        return _window(rows[0]) if rows else None

    def rule(self, rule_id: int) -> AlwaysRule | None:
        rows = self._query("SELECT id, device, action, created, source, category, host FROM rules "
                           "WHERE id = ?", (rule_id,))
        if not rows:
            return None
        r = rows[0]
        return AlwaysRule(r[0], r[1], Action(r[2]), r[3], r[4], r[5], r[6])

    # -- mode overrides --------------------------------------------------------------------------

    def set_mode(self, device: str, mode: str, now: float, source: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO modes (device, mode, set_at, source) "
                      "VALUES (?, ?, ?, ?)", (device, mode, now, source))

    def clear_mode(self, device: str) -> bool:
        with self._tx() as c:
            return c.execute("DELETE FROM modes WHERE device = ?", (device,)).rowcount == 1

    def modes(self) -> dict[str, ModeOverride]:
        return {r[0]: ModeOverride(*r) for r in self._query(
            "SELECT device, mode, set_at, source FROM modes ORDER BY device")}

    # -- blocked connection attempts ---------------------------------------------------------------

    def record_blocked(self, device: str, host: str | None, remote: str | None,
                       category: str | None, reason: str, now: float, attempts: int = 1
                       ) -> BlockedAttempt:
        """One (or `attempts`) refused connection attempt(s): counted into the device's row for
        the same host (or remote, when there is no name) if its last attempt is less than
        BLOCKED_COALESCE_S old, else a new row."""
        with self._tx() as c:
            row = c.execute(
                f"SELECT {_B_COLS} FROM blocked WHERE device = ? AND host IS ? "
                "AND (host IS NOT NULL OR remote IS ?) AND last_at >= ? "
                "ORDER BY last_at DESC LIMIT 1",
                (device, host, remote, now - BLOCKED_COALESCE_S)).fetchone()
            if row is not None:
                c.execute("UPDATE blocked SET last_at = MAX(last_at, ?), attempts = attempts + ?, "
                          "remote = ? WHERE id = ?", (now, attempts, remote, row[0]))
                return BlockedAttempt(row[0], row[1], row[2], remote, row[4], row[5], row[6],
                                      max(row[7], now), row[8] + attempts)
            cur = c.execute(
                "INSERT INTO blocked (device, host, remote, category, reason, first_at, last_at,"
                " attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (device, host, remote, category, reason, now, now, attempts))
            bid = cur.lastrowid
        assert bid is not None
        return BlockedAttempt(bid, device, host, remote, category, reason, now, now, attempts)

    def blocked(self, device: str | None = None, since: float | None = None,
                until: float | None = None, text: str | None = None, limit: int = 100
                ) -> list[BlockedAttempt]:
        """Blocked attempts, the latest first."""
        where, args = _filters(device, since, until, text, "last_at")
        sql = f"SELECT {_B_COLS} FROM blocked"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY last_at DESC, id DESC LIMIT ?"
        return [BlockedAttempt(*r) for r in self._query(sql, (*args, max(int(limit), 0)))]

    # -- per-device figures ------------------------------------------------------------------------

    def device_figures(self, since: float) -> dict[str, dict[str, Any]]:
        """Per device, from the audit log and the blocked attempts: `uploads` (all kept),
        `last_upload` (when the latest started), and `counts` {outcome: n} since `since`,
        blocked attempts included (as "blocked")."""
        out: dict[str, dict[str, Any]] = {}

        def entry(device: str) -> dict[str, Any]:
            return out.setdefault(device, {"uploads": 0, "last_upload": None, "counts": {}})

        for device, n, last in self._query(
                "SELECT device, COUNT(*), MAX(COALESCE(started, decided_at)) FROM audit "
                "GROUP BY device"):
            e = entry(device)
            e["uploads"], e["last_upload"] = int(n), last
        for device, outcome, n in self._query(
                "SELECT device, outcome, COUNT(*) FROM audit WHERE decided_at >= ? "
                "GROUP BY device, outcome", (since,)):
            entry(device)["counts"][outcome] = int(n)
        for device, n in self._query(
                "SELECT device, SUM(attempts) FROM blocked WHERE last_at >= ? GROUP BY device",
                (since,)):
            entry(device)["counts"]["blocked"] = int(n or 0)
        return out

    # -- pending uploads ---------------------------------------------------------------------------------

    def record_upload_start(self, upload: PendingUpload) -> None:
        """Written when an upload starts, so a restart knows to reset its connection."""
        with self._tx() as c:
            c.execute(
                f"INSERT INTO pending ({_P_COLS}) VALUES ({', '.join('?' * len(_P_FIELDS))})",
                tuple(getattr(upload, f) for f in _P_FIELDS),
            )

    def update_pending_seq(
        self,
        upload_id: int,
        *,
        seq_up: int | None = None,
        ack_up: int | None = None,
        seq_down: int | None = None,
        ack_down: int | None = None,
    ) -> bool:
        """Refresh the sequence numbers kept for a pending upload (None leaves a value as is)."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE pending SET seq_up = COALESCE(?, seq_up), ack_up = COALESCE(?, ack_up), "
                "seq_down = COALESCE(?, seq_down), ack_down = COALESCE(?, ack_down) WHERE id = ?",
                (seq_up, ack_up, seq_down, ack_down, upload_id),
            )
            return cur.rowcount == 1

    def pending(self) -> list[PendingUpload]:
        return [_pending(r) for r in self._query(f"SELECT {_P_COLS} FROM pending ORDER BY id")]

    def lost_pending(self) -> list[PendingUpload]:
        """Uploads that were pending when the store was opened: the previous run died before
        deciding them. Decide each as Outcome.LOST (which removes it)."""
        return list(self._lost)

    # -- decisions and the audit log -------------------------------------------------------------------

    def record_decision(
        self,
        upload_id: int | None,
        *,
        device: str,
        outcome: Outcome | str,
        decided_by: str,
        decided_at: float,
        host: str | None = None,
        remote: str | None = None,
        category: str | None = None,
        upload_bytes: int = 0,
        packets: int = 0,
        started: float | None = None,
    ) -> AuditRecord:
        """Log how an upload ended and drop it from pending, in one committed transaction.
        A second decision for the same upload id raises StoreError."""
        outcome = Outcome(outcome)
        with self._tx() as c:
            try:
                cur = c.execute(
                    "INSERT INTO audit (upload_id, device, host, remote, category, bytes, packets,"
                    " started, decided_at, outcome, decided_by)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        upload_id,
                        device,
                        host,
                        remote,
                        category,
                        upload_bytes,
                        packets,
                        started,
                        decided_at,
                        outcome.value,
                        decided_by,
                    ),
                )
            except sqlite3.IntegrityError:
                raise StoreError(f"upload {upload_id} is already decided") from None
            if upload_id is not None:
                c.execute("DELETE FROM pending WHERE id = ?", (upload_id,))
            aid = cur.lastrowid
        assert aid is not None
        self._lost = [p for p in self._lost if p.id != upload_id]
        return AuditRecord(
            aid,
            upload_id,
            device,
            outcome,
            decided_by,
            decided_at,
            host,
            remote,
            category,
            upload_bytes,
            packets,
            started,
        )

    def update_size(self, upload_id: int, upload_bytes: int, packets: int) -> bool:
        """An upload's true size, known when it ends (what passed after an allow included).
        Sizes only grow: a smaller figure leaves the record as it is."""
        with self._tx() as c:
            return c.execute(
                "UPDATE audit SET bytes = MAX(bytes, ?), packets = MAX(packets, ?) "
                "WHERE upload_id = ?", (int(upload_bytes), int(packets), upload_id)).rowcount == 1

    def log(
        self,
        device: str | None = None,
        since: float | None = None,
        outcome: Outcome | str | None = None,
        limit: int = 100,
        until: float | None = None,
        text: str | None = None,
    ) -> list[AuditRecord]:
        """Audit records, newest first. `text`: a case-insensitive substring of the device,
        host or category."""
        where, args = _filters(device, since, until, text, "decided_at")
        if outcome is not None:
            where.append("outcome = ?")
            args.append(Outcome(outcome).value)
        sql = (
            "SELECT id, upload_id, device, outcome, decided_by, decided_at, host, remote, "
            "category, bytes, packets, started FROM audit"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY decided_at DESC, id DESC LIMIT ?"
        args.append(max(int(limit), 0))
        return [
            AuditRecord(r[0], r[1], r[2], Outcome(r[3]), *r[4:])
            for r in self._query(sql, tuple(args))
        ]

    def prune(
        self, now: float, max_age_s: float, max_rows: int, max_bytes: int | None = None
    ) -> Pruned:
        """Retention for the audit log (spares flash): drop records decided before now-max_age_s,
        then all but the newest max_rows, then, while the database uses more than max_bytes, the
        oldest tenth of the records at a time; expired windows go too. Always-rules, windows and
        pending uploads are never removed for size: when they alone exceed max_bytes they are
        kept and the result says so (`over_bound`, and `warning` the first time).

        Freed pages are reused by new records; the file shrinks (incremental vacuum, then a WAL
        checkpoint that truncates the -wal) only when it exceeds max_bytes or a quarter of
        max_bytes is free. A database made without auto_vacuum is VACUUMed once, into
        auto_vacuum=INCREMENTAL, the first time it needs shrinking. SQLite errors (disk full,
        damage found at run time) are raised as StoreError: the caller logs them and goes on."""
        try:
            return self._prune(now, max_age_s, max_rows, max_bytes)
        except sqlite3.Error as exc:
            raise StoreError(f"pruning the audit log failed: {exc}") from None

    def _prune(
        self, now: float, max_age_s: float, max_rows: int, max_bytes: int | None
    ) -> Pruned:
        bound = None if max_bytes is None else max(int(max_bytes), 0)
        reclaimed = False
        warnings: list[str] = []
        if bound is not None:
            self._limit_wal(bound)
        if bound is not None and not self._incremental() and self._wants_reclaim(bound, 0):
            # an old database: convert it (and compact it) before pruning, so the byte count
            # below already includes the pointer-map pages auto_vacuum adds
            reclaimed = self._convert(now, warnings)
        with self._tx() as c:
            n = c.execute("DELETE FROM audit WHERE decided_at < ?", (now - max_age_s,)).rowcount
            n += c.execute(
                "DELETE FROM audit WHERE id NOT IN "
                "(SELECT id FROM audit ORDER BY decided_at DESC, id DESC LIMIT ?)",
                (max(int(max_rows), 0),),
            ).rowcount
            c.execute("DELETE FROM windows WHERE until <= ?", (now,))
            n += c.execute("DELETE FROM blocked WHERE last_at < ?", (now - max_age_s,)).rowcount
            n += c.execute(
                "DELETE FROM blocked WHERE id NOT IN "
                "(SELECT id FROM blocked ORDER BY last_at DESC, id DESC LIMIT ?)",
                (max(int(max_rows), 0),),
            ).rowcount
            by_size = 0
            if bound is not None and _used_bytes(c) > bound:
                rows = int(c.execute("SELECT COUNT(*) FROM audit").fetchone()[0])
                batch = max(1, -(-rows // _SIZE_ROUNDS))
                for _ in range(_SIZE_ROUNDS + 1):  # the last round finds nothing left
                    if _used_bytes(c) <= bound:
                        break
                    deleted = c.execute(
                        "DELETE FROM audit WHERE id IN "
                        "(SELECT id FROM audit ORDER BY decided_at, id LIMIT ?)",
                        (batch,),
                    ).rowcount
                    if deleted <= 0:
                        break
                    by_size += deleted
            used = _used_bytes(c)
        over = bound is not None and used > bound  # only when no audit record is left
        if bound is not None and self._wants_reclaim(bound):
            reclaimed = (self._incremental_vacuum() if self._incremental()
                         else self._convert(now, warnings)) or reclaimed
        if over and not self._over_bound:
            kept = self._query(
                "SELECT (SELECT COUNT(*) FROM rules), (SELECT COUNT(*) FROM windows), "
                "(SELECT COUNT(*) FROM pending)"
            )[0]
            warnings.append(
                f"the state database needs {used} bytes without any audit record, more than "
                f"audit_max_bytes ({bound}): kept {kept[0]} always-rules, {kept[1]} windows and "
                f"{kept[2]} pending uploads, and no audit record fits; raise audit_max_bytes"
            )
        self._over_bound = over
        with self._lock:
            page_count, free, page_size = _pages(self._conn)
        return Pruned(
            n + by_size,
            by_size,
            (page_count - free) * page_size,
            page_count * page_size,
            reclaimed,
            over,
            "; ".join(warnings) or None,
        )

    def _limit_wal(self, bound: int) -> None:
        """Hold the -wal to a quarter of the byte bound (see _WAL_SHARE); connection settings,
        cheap to repeat."""
        with self._lock:
            page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
            pages = min(_WAL_MAX_PAGES, max(_WAL_MIN_PAGES, bound // _WAL_SHARE // page_size))
            self._conn.execute(f"PRAGMA wal_autocheckpoint = {pages}").fetchall()
            self._conn.execute(f"PRAGMA journal_size_limit = {pages * page_size}").fetchall()

    def _incremental(self) -> bool:
        return int(self._query("PRAGMA auto_vacuum")[0][0]) == 2  # INCREMENTAL

    def _wants_reclaim(self, bound: int, min_free: int = 1) -> bool:
        """Free pages worth handing back: the file is over the bound, or a quarter of it is free.
        min_free=0: also a file over the bound with nothing free yet (it is about to be pruned)."""
        with self._lock:
            page_count, free, page_size = _pages(self._conn)
        return free >= min_free and (
            page_count * page_size > bound or free * page_size >= bound / _RECLAIM_SHARE
        )

    def _incremental_vacuum(self) -> bool:
        with self._lock:
            # executescript steps the pragma to the end: execute() frees a single page
            self._conn.executescript("PRAGMA incremental_vacuum")
            self._checkpoint()
        return True

    def _convert(self, now: float, warnings: list[str]) -> bool:
        """VACUUM once into auto_vacuum=INCREMENTAL (the only way to change it for a database
        with tables). It rewrites the whole file and needs room for a copy, so a failure (flash
        full) is a warning, retried no sooner than an hour later; pruning goes on meanwhile."""
        with self._lock:
            if now < self._vacuum_not_before:
                return False
            try:
                self._conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                self._conn.execute("VACUUM")
            except sqlite3.Error as exc:
                self._vacuum_not_before = now + _VACUUM_RETRY_S
                warnings.append(f"could not shrink the state database (VACUUM: {exc}); "
                                f"retrying in {_VACUUM_RETRY_S / 3600:g} h")
                return False
            self._checkpoint()
        return True

    def _checkpoint(self) -> None:
        """Copy the WAL into the file and truncate the -wal (caller holds the lock): a shrunk
        database is only shrunk on flash once its truncation has left the WAL."""
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _pages(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """page_count, freelist_count, page_size (as the connection sees them, in a transaction too)."""
    return (
        int(conn.execute("PRAGMA page_count").fetchone()[0]),
        int(conn.execute("PRAGMA freelist_count").fetchone()[0]),
        int(conn.execute("PRAGMA page_size").fetchone()[0]),
    )


def _used_bytes(conn: sqlite3.Connection) -> int:
    page_count, free, page_size = _pages(conn)
    return (page_count - free) * page_size


def _pending(row: tuple[Any, ...]) -> PendingUpload:
    return PendingUpload(*row)


# Only these mean the file itself is damaged or foreign; "locked", "busy", "readonly" and IO
# errors must never get a healthy database moved aside.
_DAMAGED = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB


_W_COLS = "id, device, kind, until, created, category, source, duration_text"
_B_COLS = "id, device, host, remote, category, reason, first_at, last_at, attempts"


def _window(row: tuple[Any, ...]) -> Window:
    return Window(row[0], row[1], WindowKind(row[2]), *row[3:])


def _filters(device: str | None, since: float | None, until: float | None, text: str | None,
             time_col: str) -> tuple[list[str], list[object]]:
    where: list[str] = []
    args: list[object] = []
    if device is not None:
        where.append("device = ?")
        args.append(device)
    if since is not None:
        where.append(f"{time_col} >= ?")
        args.append(float(since))
    if until is not None:
        where.append(f"{time_col} <= ?")
        args.append(float(until))
    if text:
        pattern = "%" + _LIKE_SPECIAL.sub(r"!\g<0>", str(text).lower()) + "%"
        where.append("(LOWER(device) LIKE ? ESCAPE '!' OR LOWER(COALESCE(host, '')) LIKE ? "
                     "ESCAPE '!' OR LOWER(COALESCE(category, '')) LIKE ? ESCAPE '!')")
        args.extend([pattern] * 3)
    return where, args


_LIKE_SPECIAL = re.compile(r"[!%_]")


def _raise_if_damaged(exc: sqlite3.DatabaseError) -> None:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _DAMAGED:
        raise _Unusable(str(exc)) from None
    if code is None and ("not a database" in str(exc) or "malformed" in str(exc)):
        raise _Unusable(str(exc)) from None


def _pragmas(conn: sqlite3.Connection) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"cannot switch the state database to WAL (got {mode})")
    # FULL: the WAL is fsynced at every commit, so a returned write survives power loss.
    conn.execute("PRAGMA synchronous = FULL")


def _create(conn: sqlite3.Connection, upload_id_floor: int) -> None:
    # Before anything writes the header (the switch to WAL does): free pages can then be handed
    # back to the file system by `PRAGMA incremental_vacuum` instead of a VACUUM of the file.
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    _pragmas(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql in _SCHEMA.values():
            conn.execute(sql)
        for sql in _INDEXES:
            conn.execute(sql)
        conn.execute("INSERT INTO upload_seq (one, last) VALUES (1, ?)", (max(upload_id_floor, 0),))
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


SQLITE_HEADER = b"SQLite format 3\x00"


def _precheck(path: Path) -> str | None:
    """Why an existing file cannot be our database, judged without SQLite writing anything:
    the header bytes, then a read-only immutable look (no WAL replay). None: open it normally."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as exc:
        raise StoreError(f"cannot read the state database {path}: {exc.strerror}") from None
    if not head:
        return None  # an empty file is a new database
    if len(head) < 100 or not head.startswith(SQLITE_HEADER):
        return "not an SQLite database"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error:
        return None
    try:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    except sqlite3.DatabaseError as exc:
        return f"unreadable: {exc}"
    finally:
        conn.close()
    if app not in (0, APPLICATION_ID):
        return f"not a hushgate database (application_id {app:#x})"
    if app == 0 and tables:
        return "not a hushgate database (foreign tables)"
    return None


def _salvage_last_id(conn: sqlite3.Connection | None) -> int | None:
    """Best effort: the highest upload id the unusable file still shows."""
    if conn is None:
        return None
    best: int | None = None
    for sql in (
        "SELECT last FROM upload_seq",
        "SELECT MAX(upload_id) FROM audit",
        "SELECT MAX(id) FROM pending",
    ):
        try:
            row = conn.execute(sql).fetchone()
        except sqlite3.Error:
            continue
        if row and isinstance(row[0], int):
            best = row[0] if best is None else max(best, row[0])
    return best


def _move_aside(path: Path, now: float) -> Path:
    """Rename the file (and its -wal/-shm, which must never meet a new database) out of the way."""
    base = f"{path.name}.corrupt-{int(now)}"
    target = path.with_name(base)
    n = 1
    while target.exists():
        target = path.with_name(f"{base}.{n}")
        n += 1
    os.replace(path, target)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    return target
