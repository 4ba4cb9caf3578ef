"""The person's side of the daemon (issue 15): windows, mutes and always-rules listed and
revoked, a mute lifted, bounded durations kept as typed, modes changed at run time, per-device
figures, blocked attempts and true sizes in the log, and who decided. Against a real Daemon (never
started: no kernel) whose firewall records installs; uploads come from the engine's stream path
on the real clock (the daemon's commands read it)."""

from __future__ import annotations

import sqlite3
import time
import types
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from guard.core.config import DeviceConfig, GuardConfig
from guard.core.engine import (
    BurstReleased,
    Discard,
    FlowBlocked,
    HeldCapHit,
    MacLearned,
    MarkFlow,
    Release,
    Reset,
    Unreachable,
    UploadDecided,
    UploadEnded,
    UploadHeld,
    UploadSeen,
)
from guard.core.policy import channel
from guard.shell import daemon
from guard.shell.store import Store

ECHO = "198.18.10.10"
CLOUD = "198.19.0.10"
VOICE = "bob-dispatch-prod-na.amazon.com"
COMMS = "alexa-comms-mobile-service.amazon.com"
DEVICE = DeviceConfig(name="kitchen-echo", address=ECHO, mac="68:db:f5:90:19:64")
DEN = DeviceConfig(name="den-echo", address="198.18.10.11", mac="68:db:f5:90:19:65")


class _Backend:
    def __init__(self) -> None:
        self.installs = 0

    def install_dynamic(self) -> None:
        self.installs += 1

    def backend_name(self) -> str:
        return "fake"


class Clock:
    """The daemon's clock, moved by the test (the engine is given the same times)."""

    def __init__(self) -> None:
        self.now = 1_796_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


CLOCK = Clock()


def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *devices: DeviceConfig
         ) -> daemon.Daemon:
    monkeypatch.setattr(daemon, "time", types.SimpleNamespace(
        time=CLOCK, monotonic=time.monotonic, sleep=time.sleep))
    monkeypatch.setattr(daemon, "run_backend", lambda cfg: _Backend())
    monkeypatch.setattr(daemon, "NEIGHBOUR_START_WAIT_S", 0.0)
    monkeypatch.setattr(daemon, "_neighbour_table", lambda: {})
    cfg = replace(GuardConfig(), devices=devices or (DEVICE, DEN),
                  state_db=str(tmp_path / "state.db"), socket=str(tmp_path / "control.sock"),
                  metrics_listen=None)
    d = daemon.Daemon(cfg)
    d.relay = None  # never started: the stream tokens go nowhere
    return d


@pytest.fixture
def guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[daemon.Daemon]:
    d = make(tmp_path, monkeypatch)
    yield d
    d.store.close()


class Uploads:
    """Echo uploads on relayed connections of the daemon's engine, on the real clock."""

    def __init__(self, d: daemon.Daemon) -> None:
        self.d, self.conn, self.port = d, 0, 40000

    def open(self, host: str | None = VOICE, device_addr: str = ECHO) -> tuple[int, Any]:
        self.conn += 1
        self.port += 1
        verdict, _ = self.d.engine.stream_open(self.conn, device_addr, self.port, CLOUD, 443,
                                               None, host, CLOCK.advance(0.01))
        self.d._apply(self.d.engine.take_actions())
        return self.conn, verdict

    def upload(self, device_addr: str = ECHO, records: int = 30) -> tuple[int, int]:
        """One upload: a burst a detector calls audio. Returns (conn, bytes sent)."""
        conn, _ = self.open(device_addr=device_addr)
        end = 0
        for size in (233, 136, 4100, 16406, *[118] * records):
            end += size
            self.d.engine.stream_data(conn, end, size, 23, CLOCK.advance(1 / 55))
        self.d._apply(self.d.engine.take_actions())
        self._end = {conn: end}
        return conn, end

    def more(self, conn: int, records: int) -> int:
        """The sender goes on (after an allow): `records` more records."""
        end = self._end[conn]
        for _ in range(records):
            end += 118
            self.d.engine.stream_data(conn, end, 118, 23, CLOCK.advance(1 / 55))
        self.d._apply(self.d.engine.take_actions())
        self._end[conn] = end
        return end

    def finish(self, after: float = 5.0) -> None:
        """Time passes: the uploads' activity ends (the engine's timers)."""
        self.d.engine.handle_timer(CLOCK.advance(after))
        self.d._apply(self.d.engine.take_actions())


def ask(d: daemon.Daemon, cmd: str, uid: int | None = 0, **kw: Any) -> Any:
    peer = type("Peer", (), {"uid": uid})()
    reply = d.handle_request({"cmd": cmd, **kw}, peer)
    assert reply["ok"], reply
    return reply["result"]


def refused(d: daemon.Daemon, cmd: str, **kw: Any) -> str:
    reply = d.handle_request({"cmd": cmd, **kw}, None)
    assert not reply["ok"], reply
    return str(reply["error"])


def last_log(d: daemon.Daemon, **kw: Any) -> dict[str, Any]:
    return ask(d, "log", limit=1, **kw)[0]


# ----------------------------------------------------------------------------- lifting a mute


def test_an_allow_window_after_a_mute_lifts_the_mute(guard: daemon.Daemon) -> None:
    """Issue 15: `deny --device X --for 1h` then `allow --device X --for 1s` said "uploads pass"
    and the next upload was still logged quiet."""
    up = Uploads(guard)
    mute = ask(guard, "window", device="kitchen-echo", kind="quiet", duration_s=3600,
               duration_text="1h")
    up.upload()
    assert last_log(guard)["outcome"] == "quiet"
    opened = ask(guard, "window", device="kitchen-echo", kind="allow", duration_s=1)
    assert opened["superseded"] == [mute["id"]]
    assert [e["kind"] for e in ask(guard, "rules")] == ["allow-window"]
    up.upload()  # within the second: judged an upload after ~0.4 s of it
    assert last_log(guard)["outcome"] == "window"  # the allow window, not the mute
    CLOCK.advance(1.05)  # the 1 s window ends: the next upload waits for a person again
    up.finish()
    up.upload()
    assert [u.device for u in guard.engine.pending()] == ["kitchen-echo"]


def test_a_mute_ends_an_allow_window_and_unmute_ends_the_mute(guard: daemon.Daemon) -> None:
    up = Uploads(guard)
    allow = ask(guard, "window", device="kitchen-echo", kind="allow", duration_s=600)
    ask(guard, "window", device="den-echo", kind="quiet", duration_s=600)  # another device's
    mute = ask(guard, "window", device="kitchen-echo", kind="quiet", duration_s=600)
    assert mute["superseded"] == [allow["id"]]
    assert ask(guard, "unmute", device="kitchen-echo") == {"device": "kitchen-echo",
                                                           "revoked": [mute["id"]]}
    assert ask(guard, "unmute", device="kitchen-echo")["revoked"] == []  # not an error
    assert [e["device"] for e in ask(guard, "rules")] == ["den-echo"]
    up.upload()
    assert len(guard.engine.pending()) == 1  # held for a person, not quiet
    assert "no device named 'nope'" in refused(guard, "unmute", device="nope")


def test_a_mute_survives_a_restart_and_unmute_after_it(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    d = make(tmp_path, monkeypatch)
    ask(d, "window", device="kitchen-echo", kind="quiet", duration_s=3600)
    d.store.close()
    d = make(tmp_path, monkeypatch)
    try:
        assert [w.kind.value for w in d.engine.windows] == ["quiet"]
        ask(d, "unmute", device="kitchen-echo")
        assert d.engine.windows == []
    finally:
        d.store.close()


# ------------------------------------------------------------------------------ rules, revoke


def test_rules_list_every_kind_and_revoke_removes_from_store_and_engine(
        guard: daemon.Daemon) -> None:
    up = Uploads(guard)
    up.upload()
    [pending] = guard.engine.pending()
    decided = ask(guard, "decide", id=pending.id, verb="allow", scope="always", by="web")
    assert decided["rule"] == "r1" and decided["via"] == "web"
    ask(guard, "window", device="den-echo", kind="allow", duration_s=7200, duration_text="2h")
    entries = ask(guard, "rules")
    assert [(e["id"], e["kind"], e["device"], e["host"], e["until"] is None) for e in entries] \
        == [("r1", "always-allow", "kitchen-echo", VOICE, True),
            ("w1", "allow-window", "den-echo", None, False)]
    assert entries[0]["source"] == "web (uid 0)" and entries[1]["duration_text"] == "2h"
    assert set(entries[0]) == {"id", "kind", "device", "host", "category", "created", "until",
                               "duration_text", "source"}
    assert [e["id"] for e in ask(guard, "rules", device="den-echo")] == ["w1"]
    up.finish()
    up.upload()
    assert last_log(guard)["outcome"] == "rule"
    assert ask(guard, "revoke", id="r1")["kind"] == "always-allow"
    assert guard.store.rules() == [] and guard.engine.standing == []
    up.finish()
    up.upload()
    assert len(guard.engine.pending()) == 1  # waits for a person again
    assert "no active window or rule 'r1'" in refused(guard, "revoke", id="r1")
    assert "bad id 'x7'" in refused(guard, "revoke", id="x7")
    assert "no active window or rule 'w99'" in refused(guard, "revoke", id="w99")


def test_an_expired_window_is_not_listed_nor_revocable(guard: daemon.Daemon) -> None:
    window = ask(guard, "window", device="den-echo", kind="allow", duration_s=1)
    CLOCK.advance(1.05)
    assert ask(guard, "rules") == []
    assert "no active window" in refused(guard, "revoke", id=window["id"])


# ---------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(("seconds", "text", "message"), [
    (0, "0s", "duration 0s is below the minimum of 1s"),
    (0.5, None, "below the minimum of 1s"),
    (400 * 86400, "400d", "duration 400d is above the maximum of 30d"),
    ("NaN", None, "below the minimum of 1s"),
    ("soon", None, "duration_s must be a number of seconds"),
    (True, None, "duration_s must be a number of seconds"),
])
def test_window_durations_are_bounded(guard: daemon.Daemon, seconds: Any, text: str | None,
                                      message: str) -> None:
    error = refused(guard, "window", device="kitchen-echo", kind="quiet", duration_s=seconds,
                    duration_text=text)
    assert message in error and not error.startswith("bad request")
    assert guard.store.active_windows(CLOCK()) == []


def test_a_duration_is_shown_as_typed(guard: daemon.Daemon) -> None:
    """Issue 15: `--for 400d` was taken and shown as "9600.0h"; 30d is the bound now, and what
    the person typed is what they see."""
    reply = ask(guard, "window", device="kitchen-echo", kind="quiet", duration_s=30 * 86400,
                duration_text="30d")
    assert reply["duration_text"] == "30d"
    assert ask(guard, "rules")[0]["duration_text"] == "30d"
    made = ask(guard, "window", device="den-echo", kind="quiet", duration_s=5400)
    assert made["duration_text"] == "90m"  # none typed: ours


# --------------------------------------------------------------------------------------- mode


def test_mode_changes_now_is_shown_and_survives_a_restart(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    d = make(tmp_path, monkeypatch)
    reply = ask(d, "mode", device="kitchen-echo", mode="monitor")
    assert reply == {"device": "kitchen-echo", "mode": "monitor", "configured_mode": "strict",
                     "mode_overridden": True}
    [status] = [x for x in ask(d, "status")["devices"] if x["name"] == "kitchen-echo"]
    assert status["mode"] == "monitor" and status["mode_overridden"]
    up = Uploads(d)
    up.upload()
    assert d.engine.pending() == [] and last_log(d)["outcome"] == "monitored"
    d.store.close()
    d = make(tmp_path, monkeypatch)
    try:
        assert d.engine.devices.by_name["kitchen-echo"].mode.value == "monitor"
        assert "kitchen-echo" not in d.spec.relay_devices  # the kernel rules follow it too
        assert ask(d, "mode", device="kitchen-echo", mode="config")["mode_overridden"] is False
        assert d.store.modes() == {}
        assert "mode must be one of" in refused(d, "mode", device="kitchen-echo", mode="loud")
    finally:
        d.store.close()


def test_mode_change_reinstalls_the_rules_of_a_running_guard(guard: daemon.Daemon) -> None:
    guard.installed_dynamic = True  # as after start()
    before = guard.firewall.installs  # type: ignore[attr-defined]
    ask(guard, "mode", device="den-echo", mode="off")
    assert "den-echo" not in guard.spec.relay_devices
    assert [d.name for d in guard.spec.devices] == ["kitchen-echo"]
    assert guard.firewall.installs == before + 1  # type: ignore[attr-defined]


def test_no_device_relayed_any_more_empties_and_unhooks_the_relay_chains(
        guard: daemon.Daemon) -> None:
    """Found live: switching the only relayed device to monitor left the TPROXY chains in
    place (the relay kept taking its TCP, and what bypassed it was reset)."""
    from guard.shell.firewall import IptablesBackend, parse_save
    from guard.shell.fwspec import spec_from_config

    relayed = IptablesBackend(spec_from_config(guard.config), lambda *a, **k: None,
                              families=(4,))
    before = parse_save(relayed.restore_text(4).replace("-I PREROUTING 1", "-A PREROUTING"))
    assert "HUSHGATE_TPROXY" in before["mangle"].chains
    ask(guard, "mode", device="kitchen-echo", mode="monitor")
    ask(guard, "mode", device="den-echo", mode="monitor")
    assert guard.spec.relay_devices == ()
    text = IptablesBackend(guard.spec, lambda *a, **k: None, families=(4,)).restore_text(4, before)
    assert ":HUSHGATE_TPROXY - [0:0]" in text and ":HUSHGATE_RELAY - [0:0]" in text
    assert ":HUSHGATE_RELAYFWD - [0:0]" in text
    assert "-D PREROUTING -j HUSHGATE_TPROXY" in text
    assert "TPROXY --on-port" not in text


# ------------------------------------------------------------------------------------ devices


def test_devices_counts_come_from_the_store(guard: daemon.Daemon) -> None:
    """Issue 15: `devices` showed UPLOADS 0 after ten uploads (it counted the engine's uploads
    in memory, which are forgotten when they end)."""
    up = Uploads(guard)
    ask(guard, "mode", device="kitchen-echo", mode="monitor")
    for _ in range(3):
        up.upload()
        up.finish()
    up.open(COMMS)  # a blocked messaging attempt
    ask(guard, "window", device="kitchen-echo", kind="quiet", duration_s=600)
    [kitchen, den] = ask(guard, "devices")
    assert kitchen["uploads"] == 3 and den["uploads"] == 0
    assert kitchen["counts_24h"] == {"monitored": 3, "blocked": 1}
    assert kitchen["online"] is True and kitchen["last_seen"] is not None
    assert den["online"] is False and den["last_seen"] is None
    assert kitchen["last_upload"] is not None and kitchen["pending"] == 0
    assert kitchen["mute_until"] > CLOCK() + 500 and den["mute_until"] is None
    assert kitchen["windows"] == 1 and kitchen["rules"] == 0
    assert {"name", "address", "mac", "mode", "flows"} <= set(kitchen)  # design.md 8 kept


# ---------------------------------------------------------------------------------------- log


def test_blocked_attempts_are_in_the_log(guard: daemon.Daemon) -> None:
    """Issue 15: a blocked messaging attempt was only a passing row in `flows` and a hook."""
    up = Uploads(guard)
    _, verdict = up.open(COMMS)
    assert verdict.value == "reject"
    entry = last_log(guard)
    assert entry["outcome"] == "blocked" and entry["host"] == COMMS
    assert entry["bytes"] == 0 and entry["id"] is None and entry["kind"] == "blocked"
    assert entry["category"] == "messaging" and entry["attempts"] == 1
    for _ in range(4):  # a speaker retrying: counted, not one write each
        up.open(COMMS)
    assert ask(guard, "log", outcome="blocked")[0]["attempts"] == 1
    guard._flush_blocked(CLOCK())
    [entry] = ask(guard, "log", outcome="blocked")
    assert entry["attempts"] == 5
    assert ask(guard, "log", outcome="denied") == []
    assert ask(guard, "log", text="COMMS")[0]["host"] == COMMS
    assert ask(guard, "log", text="voice") == []
    assert ask(guard, "log", until=CLOCK() - 3600) == []
    assert ask(guard, "log", since=CLOCK() - 3600)[0]["outcome"] == "blocked"
    assert "outcome must be one of" in refused(guard, "log", outcome="maybe")
    assert "until must be a Unix time" in refused(guard, "log", until="later")


def test_the_log_has_the_true_size_of_an_allowed_upload(guard: daemon.Daemon) -> None:
    """Issue 15: an upload the cloud received as 23,984 B was logged "10 pkt/10 KB": the size
    when it was decided, not what it sent after the allow."""
    up = Uploads(guard)
    conn, _ = up.upload()
    [pending] = guard.engine.pending()
    ask(guard, "decide", id=pending.id, verb="allow")
    at_decision = last_log(guard)["bytes"]
    end = up.more(conn, 100)
    up.finish()
    entry = last_log(guard)
    assert entry["bytes"] > at_decision
    assert entry["bytes"] == end - 0  # every record of the connection belongs to the upload
    assert entry["packets"] == 4 + 30 + 100


def test_the_log_has_the_true_size_of_a_monitored_upload(guard: daemon.Daemon) -> None:
    up = Uploads(guard)
    ask(guard, "mode", device="kitchen-echo", mode="monitor")
    conn, _ = up.upload()
    end = up.more(conn, 50)
    up.finish()
    assert last_log(guard)["bytes"] == end


def test_who_decided_is_in_the_log_and_the_hook(guard: daemon.Daemon,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(guard.hooks, "emit", lambda event, payload: events.append((event, payload)))
    up = Uploads(guard)
    up.upload()
    [pending] = guard.engine.pending()
    ask(guard, "decide", id=pending.id, verb="deny", by="mqtt:home-assistant")
    entry = last_log(guard)
    assert entry["decided_by"] == "mqtt:home-assistant (uid 0)" and entry["via"] == "mqtt"
    decided = [p for e, p in events if e == "upload-decided"]
    assert decided[0]["via"] == "mqtt" and decided[0]["decided_by"].startswith("mqtt:")
    up.open(COMMS)
    blocked = [p for e, p in events if e == "flow-blocked"]
    assert blocked[0]["host"] == COMMS and blocked[0]["at"] > 0
    ask(guard, "window", device="kitchen-echo", kind="quiet", duration_s=60)
    up.finish()
    up.upload()
    assert last_log(guard)["via"] == "quiet"
    assert [e for e, _ in events if e in ("window-opened", "standing-revoked")] == \
        ["window-opened"]


@pytest.mark.parametrize(("by", "via"), [
    ("cli:root (uid 0)", "cli"), ("web", "web"), ("watch (uid 1000)", "watch"),
    ("ntfy", "ntfy"), ("expiry", "expiry"), ("quiet window", "quiet"), ("rule", "rule"),
    ("window", "window"), ("followups", "followups"), ("restart", "restart"),
    ("connection reset", "lost"), ("cap", "cap"), ("\x1b[31mevil", "other"), ("", "other"),
])
def test_channel(by: str, via: str) -> None:
    assert channel(by) == via


# ------------------------------------------------------------------------- facts, subscribers


def test_every_engine_fact_has_subscribers_registered_in_one_place(guard: daemon.Daemon) -> None:
    kinds = {Release, Discard, Reset, Unreachable, MarkFlow, UploadHeld, UploadDecided,
             UploadSeen, UploadEnded, BurstReleased, FlowBlocked, MacLearned, HeldCapHit,
             daemon.WindowOpened, daemon.RuleAdded, daemon.StandingRevoked, daemon.ModeChanged}
    assert kinds <= set(guard.subscribers)
    for kind, subscribers in guard.subscribers.items():
        assert kind is HeldCapHit or subscribers, kind  # HeldCapHit: its UploadDecided follows


def test_a_failing_subscriber_does_not_stop_the_others(guard: daemon.Daemon,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(event: str, payload: Any) -> None:
        raise RuntimeError("hook down")

    monkeypatch.setattr(guard, "_hook_decided", broken)
    guard.subscribers = guard._subscribers()
    up = Uploads(guard)
    up.upload()
    [pending] = guard.engine.pending()
    ask(guard, "decide", id=pending.id, verb="deny")
    assert last_log(guard)["outcome"] == "denied"  # persisted all the same
    assert guard.errors["actions"] == 1


def test_a_schema_1_database_is_migrated(tmp_path: Path) -> None:
    """A state database from before (schema 1) keeps its windows and rules and gains the new
    tables; the daemon reads it as it reads a new one."""
    db = tmp_path / "state.db"
    with Store.open(db, 1000.0) as s:
        s.add_window("kitchen-echo", "quiet", 1e12, 1000.0, source="cli")
        s.add_rule("kitchen-echo", "deny", 1000.0, host=COMMS, source="cli")
    conn = sqlite3.connect(db)
    conn.executescript("DROP TABLE modes; DROP TABLE blocked; ALTER TABLE windows DROP COLUMN "
                       "duration_text; PRAGMA user_version = 1;")
    conn.close()
    with Store.open(db, 2000.0) as s:
        assert s.schema_version == 2
        [window] = s.active_windows(2000.0)
        assert window.kind.value == "quiet" and window.duration_text is None
        assert s.rules()[0].host == COMMS
        s.record_blocked("kitchen-echo", COMMS, "198.19.0.10:443", "messaging", "blocked", 2000.0)
        assert s.blocked()[0].attempts == 1


def test_stop_wakes_the_loop_at_once_instead_of_at_its_select_timeout(
        guard: daemon.Daemon) -> None:
    """A signal's stop (and a reload) writes to the loop's wake socket, which the loop's select
    watches: the guard stops within a turn, not up to 0.5 s later (Python retries an interrupted
    select). Without the wake the loop sleeps out its timeout."""
    import selectors
    import threading

    sel = selectors.DefaultSelector()
    sel.register(guard._wake_r, selectors.EVENT_READ)
    try:
        assert sel.select(0) == []
        threading.Timer(0.05, guard.stop).start()
        t0 = time.monotonic()
        ready = sel.select(2.0)
        assert ready and guard.stopping.is_set()
        assert time.monotonic() - t0 < 1.0
    finally:
        sel.close()
