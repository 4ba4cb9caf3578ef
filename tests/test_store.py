"""guard.shell.store: persistence, id sequence, corruption handling, durability under kill -9, retention."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from guard.core.config import AUDIT_MIN_BYTES, ConfigError, GuardConfig, parse_config
from guard.shell.store import (
    SCHEMA_VERSION,
    Action,
    Outcome,
    PendingUpload,
    Store,
    StoreCorrupt,
    StoreError,
    StoreTooNew,
    WindowKind,
)
from guard.tools.uci import uci_to_config

NOW = 1_700_000_000.0


def pending(uid: int, **kw) -> PendingUpload:
    base: dict[str, object] = {
        "id": uid,
        "device": "kitchen-echo",
        "proto": "tcp",
        "src": "198.18.10.10",
        "sport": 40000 + uid,
        "dst": "198.19.0.10",
        "dport": 443,
        "started": NOW,
        "host": "bob-dispatch-prod-na.amazon.com",
        "category": "voice",
        "seq_up": 1000,
        "ack_up": 2000,
    }
    base.update(kw)
    return PendingUpload(**base)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


def test_open_creates_private_dir_and_file(db: Path) -> None:
    old = os.umask(0o022)
    try:
        Store.open(db, NOW).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_everything_survives_reopen(db: Path) -> None:
    with Store.open(db, NOW) as s:
        uid = s.next_upload_id()
        rule = s.add_rule("kitchen-echo", Action.DENY, NOW, category="messaging", source="cli:root")
        s.add_rule("kitchen-echo", "allow", NOW, host="api.amazon.com", source="web")
        win = s.add_window("kitchen-echo", WindowKind.QUIET, NOW + 3600, NOW, source="cli:root")
        s.record_upload_start(pending(uid))
        s.record_decision(
            uid,
            device="kitchen-echo",
            outcome=Outcome.DENIED,
            decided_by="cli:root",
            decided_at=NOW + 5,
            host="bob-dispatch-prod-na.amazon.com",
            remote="198.19.0.10:443",
            category="voice",
            upload_bytes=14000,
            packets=11,
            started=NOW,
        )
    with Store.open(db, NOW + 10) as s:
        assert s.schema_version == SCHEMA_VERSION == 2
        assert [r.id for r in s.rules()] == [rule.id, rule.id + 1]
        assert s.rules("kitchen-echo")[0].category == "messaging"
        assert s.rules()[1].action is Action.ALLOW and s.rules()[1].host == "api.amazon.com"
        assert s.active_windows(NOW + 10) == [win]
        assert s.active_windows(NOW + 3600) == []
        (rec,) = s.log()
        assert rec.upload_id == uid and rec.outcome is Outcome.DENIED
        assert rec.upload_bytes == 14000 and rec.packets == 11 and rec.remote == "198.19.0.10:443"
        assert s.pending() == [] and s.lost_pending() == []


def test_upload_ids_are_never_reused_across_reopen_and_prune(db: Path) -> None:
    with Store.open(db, NOW) as s:
        ids = [s.next_upload_id() for _ in range(5)]
        for i in ids:
            s.record_decision(i, device="d", outcome="expired", decided_by="expiry", decided_at=NOW)
        s.prune(NOW + 10**6, max_age_s=1, max_rows=0)
        assert s.log() == []
    with Store.open(db, NOW) as s:
        nxt = s.next_upload_id()
    assert ids == [1, 2, 3, 4, 5] and nxt == 6


def test_pending_upload_is_lost_after_restart_until_decided(db: Path) -> None:
    with Store.open(db, NOW) as s:
        a, b = s.next_upload_id(), s.next_upload_id()
        s.record_upload_start(pending(a))
        s.record_upload_start(pending(b, proto="udp", dst="2001:2:0:20::10"))
        assert s.update_pending_seq(a, seq_up=5000, ack_down=5000)
        assert s.lost_pending() == []  # this run's own pending uploads are not lost
    with Store.open(db, NOW + 60) as s:
        lost = s.lost_pending()
        assert [p.id for p in lost] == [a, b]
        assert lost[0].seq_up == 5000 and lost[0].ack_up == 2000 and lost[0].ack_down == 5000
        assert lost[1].remote == "[2001:2:0:20::10]:443"
        s.record_decision(
            a,
            device="kitchen-echo",
            outcome=Outcome.LOST,
            decided_by="restart",
            decided_at=NOW + 60,
        )
        assert [p.id for p in s.lost_pending()] == [b]
        assert [p.id for p in s.pending()] == [b]


def test_second_decision_for_an_upload_raises(db: Path) -> None:
    with Store.open(db, NOW) as s:
        uid = s.next_upload_id()
        s.record_decision(uid, device="d", outcome="approved", decided_by="web", decided_at=NOW)
        with pytest.raises(StoreError):
            s.record_decision(uid, device="d", outcome="denied", decided_by="web", decided_at=NOW)
        assert len(s.log()) == 1


def test_invalid_values_are_refused(db: Path) -> None:
    with Store.open(db, NOW) as s:
        with pytest.raises(ValueError):
            s.record_decision(1, device="d", outcome="maybe", decided_by="x", decided_at=NOW)
        with pytest.raises(ValueError):
            s.add_rule("d", "allow", NOW, source="x")  # neither category nor host
        with pytest.raises(ValueError):
            s.add_rule("d", "allow", NOW, category="voice", host="h", source="x")
        with pytest.raises(ValueError):
            s.add_window("d", "allow", NOW - 1, NOW)
        with pytest.raises(ValueError):
            s.add_window("d", "forever", NOW + 1, NOW)


def test_remove_rule_and_window(db: Path) -> None:
    with Store.open(db, NOW) as s:
        r = s.add_rule("d", "deny", NOW, category="messaging", source="cli:root")
        w = s.add_window("d", "allow", NOW + 1800, NOW, category="voice")
        assert s.remove_rule(r.id) and not s.remove_rule(r.id)
        assert s.remove_window(w.id) and not s.remove_window(w.id)
        assert s.rules() == [] and s.active_windows(NOW) == []


def test_log_filters_and_orders_newest_first(db: Path) -> None:
    with Store.open(db, NOW) as s:
        for i, (dev, out) in enumerate(
            [("a", "approved"), ("b", "denied"), ("a", "denied"), ("a", "window")]
        ):
            s.record_decision(
                s.next_upload_id(), device=dev, outcome=out, decided_by="web", decided_at=NOW + i
            )
        assert [r.decided_at for r in s.log()] == [NOW + 3, NOW + 2, NOW + 1, NOW]
        assert [r.outcome.value for r in s.log(device="a")] == ["window", "denied", "approved"]
        assert [r.device for r in s.log(outcome=Outcome.DENIED)] == ["a", "b"]
        assert len(s.log(since=NOW + 2)) == 2
        assert len(s.log(limit=1)) == 1


def test_prune_bounds_age_and_rows(db: Path) -> None:
    with Store.open(db, NOW) as s:
        for i in range(100):
            s.record_decision(
                None, device="d", outcome="monitored", decided_by="rule:1", decided_at=float(i)
            )
        s.add_window("d", "allow", 150.0, 0.0)
        s.add_window("d", "quiet", 50.0, 0.0)
        removed = s.prune(now=100.0, max_age_s=50, max_rows=30).removed
        assert removed == 70
        kept = [r.decided_at for r in s.log(limit=1000)]
        assert kept == [float(i) for i in range(99, 69, -1)]
        assert [w.until for w in s.active_windows(0.0)] == [150.0]
        assert s.prune(now=100.0, max_age_s=10, max_rows=1000).removed == 20  # age alone
        assert s.prune(now=100.0, max_age_s=10, max_rows=1000).removed == 0


# -- the byte bound ------------------------------------------------------------------------------

BOUND = 256 << 10  # small enough to fill quickly, 64 pages of 4 KiB


def decide_many(s: Store, count: int, t0: float = NOW) -> None:
    """Realistic records through the store's own API: an id, a pending row, then the decision."""
    for i in range(count):
        uid = s.next_upload_id()
        s.record_upload_start(pending(uid, started=t0 + i))
        s.record_decision(
            uid,
            device="kitchen-echo",
            outcome="approved" if i % 3 else "denied",
            decided_by="web:192.168.1.23",
            decided_at=t0 + i,
            host="bob-dispatch-prod-eu.amazon.com",
            remote="[2a01:4f8:c2c:123f::1]:443",
            category="voice",
            upload_bytes=14000 + i,
            packets=11 + i % 50,
            started=t0 + i - 3,
        )


def on_disk(db: Path) -> int:
    """The database's bytes on flash: the file and its -wal (the store runs in WAL mode). The
    -shm is left out: SQLite's fixed 32 KiB WAL index, not data."""
    wal = db.with_name(db.name + "-wal")
    return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def standing(s: Store) -> tuple[list[object], list[object], list[object]]:
    return s.rules(), s.active_windows(NOW), s.pending()


def make_standing(s: Store) -> None:
    s.add_rule("kitchen-echo", "deny", NOW, category="messaging", source="cli:root")
    s.add_rule("kitchen-echo", "allow", NOW, host="api.amazonalexa.com", source="web")
    s.add_window("kitchen-echo", "quiet", NOW + 10**6, NOW, source="cli:root")
    s.record_upload_start(pending(s.next_upload_id()))  # undecided: pending, never pruned


def test_prune_bounds_bytes_on_disk_keeping_newest_records_and_rules(db: Path) -> None:
    with Store.open(db, NOW) as s:
        assert s._query("PRAGMA journal_mode")[0][0] == "wal"
        assert s._query("PRAGMA auto_vacuum")[0][0] == 2  # INCREMENTAL from the start
        make_standing(s)
        before = standing(s)
        decide_many(s, 3000)
        filled = on_disk(db)
        assert filled > 2 * BOUND
        result = s.prune(NOW + 3000, max_age_s=10**9, max_rows=10**6, max_bytes=BOUND)
        size = on_disk(db)
        print(f"filled {filled} bytes on disk; after prune {size} (bound {BOUND}): {result}")
        # No slack: the incremental vacuum cuts the file to its pages in use, which the loop
        # brought under the bound, and the TRUNCATE checkpoint leaves an empty -wal.
        assert size <= BOUND
        assert result.file_bytes == db.stat().st_size and result.used_bytes <= BOUND
        assert result.reclaimed and not result.over_bound and result.warning is None
        assert result.removed == result.removed_for_size > 0
        # batches of a tenth (300 records, ~60 KiB): what is left still fills most of the bound
        assert result.used_bytes > BOUND * 0.6
        kept = [r.decided_at for r in s.log(limit=10**6)]
        assert len(kept) == 3000 - result.removed
        assert kept == [NOW + i for i in range(2999, 2999 - len(kept), -1)]  # the newest, in order
        assert standing(s) == before
    with Store.open(db, NOW + 3000) as s:  # and it is all still there after a reopen
        assert len(s.log(limit=10**6)) == len(kept) and standing(s) == before
        assert [p.id for p in s.lost_pending()] == [p.id for p in before[2]]


def test_prune_under_the_bound_neither_deletes_nor_rewrites(db: Path) -> None:
    with Store.open(db, NOW) as s:
        decide_many(s, 200)  # ~60 KiB
        result = s.prune(NOW + 200, max_age_s=10**9, max_rows=10**6, max_bytes=BOUND)
        assert (result.removed, result.reclaimed) == (0, False)
        # a few records aged out leave free pages for the next ones: no rewrite of the file
        result = s.prune(NOW + 200 + 10**6, max_age_s=10**6 + 190, max_rows=10**6,
                         max_bytes=BOUND)
        assert result.removed == 10 and not result.reclaimed
        assert len(s.log(limit=10**6)) == 190


def test_prune_keeps_non_audit_data_larger_than_the_bound_and_terminates(db: Path) -> None:
    small = 64 << 10
    with Store.open(db, NOW) as s:
        for i in range(400):
            s.add_rule(f"device-{i:03}", "deny", NOW, host=f"{'x' * 150}.{i}.example",
                       source="cli:root")
        s.add_window("kitchen-echo", "allow", NOW + 3600, NOW, category="voice")
        s.record_upload_start(pending(s.next_upload_id()))
        decide_many(s, 100)
        before = standing(s)
        result = s.prune(NOW + 100, max_age_s=10**9, max_rows=10**6, max_bytes=small)
        print(result)
        assert result.over_bound and result.used_bytes > small
        assert result.warning is not None and "audit_max_bytes" in result.warning
        assert "400 always-rules" in result.warning
        assert s.log() == [] and standing(s) == before and len(before[0]) == 400
        assert on_disk(db) == result.used_bytes  # what is left is still compacted
        # the next rounds: nothing loops, the warning is not repeated, new records still go
        decide_many(s, 5, t0=NOW + 200)
        again = s.prune(NOW + 300, max_age_s=10**9, max_rows=10**6, max_bytes=small)
        assert again.over_bound and again.warning is None and again.removed == 5
        assert s.log() == [] and standing(s) == before
        # once the bound fits again, records are kept and a later overflow warns anew
        decide_many(s, 5, t0=NOW + 400)
        fits = s.prune(NOW + 500, max_age_s=10**9, max_rows=10**6, max_bytes=4 << 20)
        assert not fits.over_bound and fits.removed == 0 and len(s.log()) == 5
        assert s.prune(NOW + 500, 10**9, 10**6, small).warning is not None


def test_prune_shrinks_a_database_made_without_auto_vacuum(db: Path) -> None:
    Store.open(db, NOW).close()
    conn = sqlite3.connect(db)  # as hushgate made it before the byte bound: auto_vacuum NONE
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    with Store.open(db, NOW) as s:
        make_standing(s)
        before = standing(s)
        decide_many(s, 3000)
        filled = on_disk(db)
        result = s.prune(NOW + 3000, max_age_s=10**9, max_rows=10**6, max_bytes=BOUND)
        size = on_disk(db)
        print(f"old database: filled {filled} bytes on disk; after prune {size}: {result}")
        assert filled > 2 * BOUND and size <= BOUND and result.reclaimed
        assert s._query("PRAGMA auto_vacuum")[0][0] == 2  # converted, once: incremental now
        kept = [r.decided_at for r in s.log(limit=10**6)]
        assert kept and kept[0] == NOW + 2999 and len(kept) == 3000 - result.removed
        assert standing(s) == before
        # later rounds shrink it by incremental vacuum, like a new database
        decide_many(s, 1000, t0=NOW + 5000)
        assert on_disk(db) > BOUND
        later = s.prune(NOW + 6000, max_age_s=10**9, max_rows=10**6, max_bytes=BOUND)
        assert later.reclaimed and on_disk(db) <= BOUND and standing(s) == before


def test_prune_holds_the_wal_to_a_fraction_of_the_bound(db: Path) -> None:
    bound = 1 << 20
    wal = db.with_name(db.name + "-wal")
    with Store.open(db, NOW) as s:
        s.prune(NOW, max_age_s=10**9, max_rows=10**6, max_bytes=bound)  # sets the WAL limits
        largest = 0
        for start in range(0, 2000, 100):
            decide_many(s, 100, t0=NOW + start)
            largest = max(largest, wal.stat().st_size)
    print(f"largest -wal {largest} bytes with a {bound}-byte bound")
    # a quarter of the bound (256 KiB), plus the commits since the last checkpoint; SQLite's
    # default would have let it reach ~4 MiB (1000 pages)
    assert largest <= bound // 2


class _FailingConnection:
    """The store's connection, failing the statements that start with `fail`."""

    def __init__(self, conn: sqlite3.Connection, fail: str) -> None:
        self._conn, self._fail, self.attempts = conn, fail, 0

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql.startswith(self._fail):
            self.attempts += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


def test_a_failed_vacuum_is_a_warning_and_pruning_goes_on(db: Path) -> None:
    Store.open(db, NOW).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")
    conn.close()
    with Store.open(db, NOW) as s:
        decide_many(s, 1500)
        failing = _FailingConnection(s._conn, "VACUUM")
        s._conn = failing  # type: ignore[assignment]
        result = s.prune(NOW + 1500, max_age_s=10**9, max_rows=10**6, max_bytes=BOUND)
        assert result.warning is not None and "VACUUM" in result.warning
        assert result.used_bytes <= BOUND and result.removed_for_size > 0  # pruned all the same
        assert failing.attempts == 1
        again = s.prune(NOW + 1560, max_age_s=10**9, max_rows=10**6, max_bytes=BOUND)
        assert failing.attempts == 1 and not again.reclaimed  # not retried within the hour
        s._conn = failing._conn
        later = s.prune(NOW + 1500 + 3600, max_age_s=10**9, max_rows=10**6, max_bytes=BOUND)
        assert later.reclaimed and on_disk(db) <= BOUND


def test_sqlite_errors_while_pruning_are_store_errors(db: Path) -> None:
    """The daemon's housekeeping catches StoreError and goes on; a bare sqlite3 error would end
    the guard."""
    with Store.open(db, NOW) as s:
        decide_many(s, 10)
        real = s._conn
        s._conn = _FailingConnection(real, "DELETE FROM audit")  # type: ignore[assignment]
        with pytest.raises(StoreError, match="pruning the audit log failed"):
            s.prune(NOW, max_age_s=1, max_rows=0, max_bytes=BOUND)
        s._conn = real
        assert len(s.log()) == 10  # rolled back whole
        assert s.prune(NOW + 10**6, max_age_s=1, max_rows=0, max_bytes=BOUND).removed == 10


@pytest.mark.parametrize("value", [0, -1, -(4 << 20), 1.5, 4194304.5, "4MiB", "4194304", True,
                                   1000, float("inf")])
def test_config_rejects_a_bad_audit_max_bytes(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^guard\.audit_max_bytes: "):
        parse_config({"guard": {"audit_max_bytes": value}})


def test_config_audit_max_bytes_default_toml_and_uci() -> None:
    assert GuardConfig().audit_max_bytes == parse_config({}).audit_max_bytes == 4 << 20
    assert parse_config({"guard": {"audit_max_bytes": 1 << 20}}).audit_max_bytes == 1 << 20
    assert parse_config({"guard": {"audit_max_bytes": AUDIT_MIN_BYTES}}).audit_max_bytes \
        == AUDIT_MIN_BYTES
    uci = "config guard 'guard'\n\toption audit_max_bytes '2097152'\n"
    assert uci_to_config(uci).audit_max_bytes == 2 << 20
    with pytest.raises(ConfigError, match="audit_max_bytes"):
        uci_to_config("config guard 'guard'\n\toption audit_max_bytes '0'\n")


def test_garbage_file_is_moved_aside_and_reported(db: Path) -> None:
    db.parent.mkdir(mode=0o700)
    db.write_bytes(os.urandom(8192))
    with pytest.raises(StoreCorrupt) as exc:
        Store.open(db, NOW)
    moved = exc.value.moved_to
    assert moved == db.with_name(f"state.db.corrupt-{int(NOW)}") and moved.exists()
    assert not db.exists()  # never silently reset: the caller decides to start a new store
    assert exc.value.last_upload_id is None and exc.value.next_id_floor == int(NOW)
    # The caller comes up on a fresh store whose ids cannot collide with the lost ones.
    with Store.open(db, NOW, upload_id_floor=exc.value.next_id_floor) as s:
        assert s.next_upload_id() == int(NOW) + 1


def test_foreign_sqlite_database_is_moved_aside(db: Path) -> None:
    db.parent.mkdir(mode=0o700)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreCorrupt) as exc:
        Store.open(db, NOW)
    assert "not a hushgate database" in exc.value.reason
    with pytest.raises(StoreCorrupt):  # a second corruption in the same second gets its own name
        db.write_bytes(b"not sqlite at all" * 100)
        Store.open(db, NOW)
    names = sorted(p.name for p in db.parent.iterdir())
    assert names == [f"state.db.corrupt-{int(NOW)}", f"state.db.corrupt-{int(NOW)}.1"]


def test_damaged_schema_is_moved_aside_with_salvaged_id(db: Path) -> None:
    with Store.open(db, NOW) as s:
        for _ in range(41):
            s.next_upload_id()
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE windows")
    conn.execute("CREATE TABLE windows (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreCorrupt) as exc:
        Store.open(db, NOW)
    assert "windows" in exc.value.reason
    assert exc.value.last_upload_id == 41 and exc.value.next_id_floor == 41
    with Store.open(db, NOW, upload_id_floor=exc.value.next_id_floor) as s:
        assert s.next_upload_id() == 42


def test_page_level_corruption_fails_quick_check(db: Path) -> None:
    with Store.open(db, NOW) as s:
        for i in range(300):
            s.record_decision(
                None,
                device="d" * 50,
                outcome="monitored",
                decided_by="rule:1",
                decided_at=float(i),
                host="h" * 100,
            )
    size = db.stat().st_size
    with open(db, "r+b") as f:  # scribble over the middle pages, keep the header valid
        f.seek(size // 2)
        f.write(b"\xff" * 4096)
    with pytest.raises(StoreCorrupt):
        Store.open(db, NOW)


def test_newer_schema_is_left_in_place(db: Path) -> None:
    Store.open(db, NOW).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreTooNew):
        Store.open(db, NOW)
    assert db.exists()


def test_empty_existing_file_is_initialised(db: Path) -> None:
    db.parent.mkdir(mode=0o700)
    db.touch(mode=0o600)
    with Store.open(db, NOW) as s:
        assert s.next_upload_id() == 1


CHILD = """
import sys
from guard.shell.store import Store, PendingUpload
s = Store.open(sys.argv[1], 1.0)
while True:
    uid = s.next_upload_id()
    s.record_upload_start(PendingUpload(uid, "d", "tcp", "198.18.10.10", 40000, "198.19.0.10",
                                        443, float(uid)))
    s.record_decision(uid, device="d", outcome="denied", decided_by="cli:root",
                      decided_at=float(uid))
    print(uid, flush=True)
"""


def test_kill_9_loses_no_acknowledged_decision(db: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    acked: list[int] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) >= 200:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(acked) >= 200, proc.stderr.read() if proc.stderr else ""
    with Store.open(db, 2.0) as s:
        logged = {r.upload_id for r in s.log(limit=10**6)}
        assert set(acked) <= logged
        # An upload killed between start and decision is pending, never lost silently.
        assert {p.id for p in s.lost_pending()} <= {max(logged) + 1}
        assert s.next_upload_id() > max(acked)


def test_blocked_attempts_are_coalesced_filtered_and_pruned(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db", NOW) as s:
        comms = "alexa-comms-mobile-service.amazon.com"
        s.record_blocked("echo", comms, "198.19.0.20:443", "messaging", "blocked", NOW)
        s.record_blocked("echo", comms, "198.19.0.21:443", "messaging", "blocked", NOW + 30, 4)
        s.record_blocked("echo", comms, "198.19.0.20:443", "messaging", "blocked", NOW + 200)
        s.record_blocked("den", None, "198.19.0.30:5222", "messaging", "blocked", NOW + 201)
        [den, later, first] = s.blocked()
        assert first.attempts == 5 and first.last_at == NOW + 30 and later.attempts == 1
        assert den.host is None and den.remote == "198.19.0.30:5222"
        assert [b.device for b in s.blocked(text="COMMS")] == ["echo", "echo"]
        assert s.blocked(text="%") == [] and s.blocked(text="_") == []  # LIKE specials are text
        assert [b.id for b in s.blocked(until=NOW + 100)] == [first.id]
        assert s.device_figures(NOW)["echo"]["counts"] == {"blocked": 6}
        s.prune(NOW + 300, max_age_s=200, max_rows=1)
        assert [b.device for b in s.blocked()] == ["den"]


def test_windows_supersede_and_sizes_only_grow(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db", NOW) as s:
        mute, _ = s.open_window("echo", "quiet", NOW + 3600, NOW, duration_text="1h")
        voice, _ = s.open_window("echo", "quiet", NOW + 3600, NOW, category="voice")
        other, _ = s.open_window("den", "quiet", NOW + 3600, NOW)
        allow, ended = s.open_window("echo", "allow", NOW + 60, NOW + 1, category="telemetry",
                                     supersede=True)
        assert ended == [mute]  # the device-wide mute overlaps; the voice-only one does not
        assert [w.id for w in s.active_windows(NOW + 2)] == [voice.id, other.id, allow.id]
        assert s.window(allow.id).duration_text is None and s.window(mute.id) is None
        s.record_decision(9, device="echo", outcome="approved", decided_by="web",
                          decided_at=NOW, upload_bytes=10000, packets=10)
        assert s.update_size(9, 23984, 40) and not s.update_size(10, 1, 1)
        assert s.update_size(9, 5, 5)  # smaller: left as it is
        [record] = s.log()
        assert (record.upload_bytes, record.packets) == (23984, 40)
        assert s.log(until=NOW - 1) == [] and s.log(text="ech")[0].upload_id == 9
