"""guard.store: persistence, id sequence, corruption handling, durability under kill -9, retention."""

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

from guard.store import (
    Action,
    Outcome,
    PendingUpload,
    Store,
    StoreCorrupt,
    StoreError,
    StoreTooNew,
    WindowKind,
)

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
        assert s.schema_version == 1
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
        removed = s.prune(now=100.0, max_age_s=50, max_rows=30)
        assert removed == 70
        kept = [r.decided_at for r in s.log(limit=1000)]
        assert kept == [float(i) for i in range(99, 69, -1)]
        assert [w.until for w in s.active_windows(0.0)] == [150.0]
        assert s.prune(now=100.0, max_age_s=10, max_rows=1000) == 20  # age alone
        assert s.prune(now=100.0, max_age_s=10, max_rows=1000) == 0


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
from guard.store import Store, PendingUpload
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
