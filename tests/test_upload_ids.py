"""Upload ids are allocated in the core (guard/core/engine.py `UploadIds`) and made durable in
blocks by the shell's store (`Store.reserve_upload_ids`): unique across restarts, with no disk
write per upload on the packet path."""

from __future__ import annotations

from pathlib import Path

from guard.core.engine import Engine, ReserveUploadIds, UploadHeld
from guard.shell.store import Store
from tests.enginekit import Conn, engine, of

NOW = 1_700_000_000.0


def _run(eng: Engine, store: Store, uploads: int, port: int) -> list[int]:
    """Uploads on new connections, each fact handed to the store as the daemon does."""
    ids: list[int] = []
    for k in range(uploads):
        conn = Conn(eng, sport=port + k)
        conn.up(233, NOW + k * 10.0)
        for i in range(9):
            conn.up(1460, NOW + k * 10.0 + 0.001 * (i + 1))
        for action in eng.take_actions():
            if isinstance(action, ReserveUploadIds):
                store.reserve_upload_ids(action.through)
            elif isinstance(action, UploadHeld):
                # durable before it is announced
                assert action.upload["id"] <= store.last_upload_id()
                ids.append(action.upload["id"])
    return ids


def _engine(store: Store, block: int) -> Engine:
    base = engine()
    return Engine(base.config, base.rules, next_upload_id=store.last_upload_id() + 1,
                  id_block=block)


def test_ids_are_unique_across_restarts_with_one_write_per_block(tmp_path: Path) -> None:
    seen: list[int] = []
    for run in range(3):
        with Store.open(tmp_path / "state.db", NOW) as store:
            eng = _engine(store, block=4)
            for action in of(eng.take_actions(), ReserveUploadIds):  # the first block, at start
                store.reserve_upload_ids(action.through)
            ids = _run(eng, store, 5, 41000 + 100 * run)
            assert ids == sorted(ids) and len(ids) == 5
            seen += ids
    assert len(set(seen)) == len(seen) and seen == sorted(seen)
    assert seen[:5] == [1, 2, 3, 4, 5]  # a fresh store starts at 1


def test_the_store_mark_never_goes_back(tmp_path: Path) -> None:
    with Store.open(tmp_path / "state.db", NOW) as store:
        store.reserve_upload_ids(20)
        store.reserve_upload_ids(8)
        assert store.last_upload_id() == 20
        assert store.next_upload_id() == 21
    with Store.open(tmp_path / "state.db", NOW) as store:
        assert store.last_upload_id() == 21
