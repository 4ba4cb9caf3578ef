"""Managing hushgate from its web page, live (issue 15 point 1's acceptance): a real Chromium on
the simulated LAN (tests/e2e/manage_browser.py in the LAN host's namespace, phone-sized, then
desktop-sized) in front of a real `hushgate run` with the stream hold (`tcp_hold = "relay"`).

One walk, each step checked against the live guard: what the cloud received (through the relay
the cloud sees the router's socket, so connections are found by host and opening time) and what
`hushgate status|rules list|devices|log --json` say. Held uploads are answered with every scope
(once, for 10 min, always; deny, deny always) and each standing decision is shown to act on the
next upload and then revoked from the page; the echo is muted and unmuted from the page, and put
in monitor mode and back to its config file's mode; the log is filtered to blocked messaging
attempts; the screenshots are decoded and checked, and kept in
artifacts/manage/ (docs/img/ holds copies of the phone ones for docs/phone.md).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hushsim.topology import Topology
from tests.e2e.guardkit import ARTIFACTS, Guard, MakeGuard, SpeakerRun, record

VOICE = "bob-dispatch-prod-na.amazon.com"
MESSAGING = "alexa-comms-mobile-service.amazon.com"
QUEUE = 59  # this module's NFQUEUE number (other modules use their own)
RELAY_PORT = 7459
GW_LAN_V4 = "198.18.10.1"
WEB_PORT = 8797
WEB_LISTEN = f"{GW_LAN_V4}:{WEB_PORT}"
PROFILE = "echo-opus-118"
DRIVER = Path(__file__).with_name("manage_browser.py")
SHOTS = ARTIFACTS / "manage"
PHONE = (390, 844)
DESKTOP = (1280, 800)


# --- the browser ---------------------------------------------------------------------------------


class ManageBrowser:
    """manage_browser.py in the LAN host's namespace: commands in, one JSON answer each."""

    def __init__(self, topo: Topology, workdir: Path, url: str, token: str) -> None:
        from tests.browser.chromium import require_browser

        require_browser()  # skip off CI / fail in CI when chromium, the driver or selenium lack
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = workdir / "browser.stderr"
        with self.stderr_path.open("w") as err:
            self.proc = topo.popen(
                "lan", sys.executable, str(DRIVER), "--url", url, "--workdir", str(workdir),
                "--width", str(PHONE[0]), "--height", str(PHONE[1]), "--scale", "1",
                stdin=subprocess.PIPE, stderr=err)
        assert self.proc.stdin is not None
        self.proc.stdin.write(token + "\n")
        self.proc.stdin.flush()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "noise", "line": line.rstrip()})
        self.events.put(None)

    def next(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ev = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the browser said nothing within {timeout_s} s; "
                                     f"stderr: {self._stderr()}") from None
            if ev is None:
                raise AssertionError(f"the browser exited ({self.proc.poll()}); "
                                     f"stderr: {self._stderr()}")
            if ev.get("event") == "error":
                raise AssertionError(f"the browser failed at {ev.get('do')}: {ev['message']}\n"
                                     f"{ev.get('traceback', '')}\npage:\n{ev.get('page', '')}")
            if ev.get("event") != "noise":
                return ev

    def do(self, what: str, timeout_s: float = 30.0, **args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"do": what, **args}) + "\n")
        self.proc.stdin.flush()
        ev = self.next(timeout_s)
        assert ev["event"] == "ok" and ev["do"] == what, ev
        return ev.get("result")

    def _stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(none)"

    def close(self) -> int | None:
        try:
            self.do("quit", timeout_s=10.0)
            return self.proc.wait(timeout=15.0)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the script and what it started (chromedriver, Chromium), by PID: found before
        the kill, since orphans are reparented and could not be found after it."""
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


# --- the guard and the cloud ---------------------------------------------------------------------


def _upload(g: Guard, *, hold_open: bool = False) -> tuple[SpeakerRun, float]:
    """An echo upload to the voice host, started now (no wait file: the page waits for it)."""
    since = time.time()
    extra = ("--hold-open", "15") if hold_open else ()
    sp = g.speaker("echo", "--host", VOICE, "-4", *extra, "--max-seconds", "30", "upload",
                   "--profile", PROFILE)
    return sp, since


def _cloud_bytes(topo: Topology, host: str, since: float) -> int:
    assert topo.cloud is not None
    return sum(c["app_bytes"] for c in topo.cloud.stats()["tcp"]
               if c["host"] == host and c["opened"] >= since - 0.05)


def _delivered(topo: Topology, sp: SpeakerRun, since: float) -> dict[str, Any]:
    """The upload reached the cloud whole: one connection since `since` with the speaker's
    SHA-256 and every byte."""
    assert topo.cloud is not None
    result = sp.result(timeout_s=30.0)
    assert result["error"] is None and not result["reset"], result
    final = topo.cloud.wait_for(
        lambda s: any(c["host"] == VOICE and c["opened"] >= since - 0.05
                      and c["sha256"] == result["sha256"] for c in s["tcp"]), timeout_s=10.0)
    conn = next(c for c in final["tcp"] if c["host"] == VOICE and c["opened"] >= since - 0.05
                and c["sha256"] == result["sha256"])
    assert conn["app_bytes"] == result["bytes_sent"] > 0, (conn, result)
    return result


def _refused(topo: Topology, sp: SpeakerRun, since: float) -> dict[str, Any]:
    """The upload was refused: the speaker reset (or cut off) and not one byte at the cloud."""
    result = sp.result(timeout_s=30.0)
    assert result["reset"] or result["error"] is not None, result
    time.sleep(0.3)
    got = _cloud_bytes(topo, VOICE, since)
    assert got == 0, f"the cloud received {got} bytes of a refused upload"
    return result


def _log_for(g: Guard, pred: Any, what: str, timeout_s: float = 8.0) -> dict[str, Any]:
    try:
        return g.wait_log(pred, timeout_s=timeout_s)
    except TimeoutError as exc:
        raise AssertionError(f"no log record for {what}: {exc}") from None


def _entries(g: Guard) -> list[dict[str, Any]]:
    return list(g.cli_json("rules", "list"))


def _assert_pending_none(g: Guard) -> None:
    status = g.cli_json("status")
    assert status["pending"] == 0, status["pending"]


def _check_shot(path: Path, width: int, height: int, rects: list[list[int]]) -> None:
    """The PNG decodes, has the viewport's size, and every given area holds drawn content."""
    from tests.browser.chromium import png_size, region_colours

    data = path.read_bytes()
    assert png_size(data) == (width, height), (path, png_size(data))
    for x, y, w, h in rects:
        w, h = min(w, width - x), min(h, height - y)
        assert w > 100 and h > 40, (path, x, y, w, h)
        colours = region_colours(data, x, y, w, h)
        assert colours >= 20, f"{path.name}: area {(x, y, w, h)} has {colours} colours"


# --- the walk ------------------------------------------------------------------------------------


def test_the_phone_page_answers_with_every_scope_mutes_revokes_and_filters_the_log(
    topology: Topology, guards: MakeGuard, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    g = guards(tcp_hold="relay", relay_port=RELAY_PORT, hold_timeout_s=20.0,
               sections={"web": {"listen": WEB_LISTEN}})
    res = g.cli_ok("web", "token", "--config", str(g.config_path), socket=False)
    m = re.search(r"^token: ([A-Za-z0-9_-]{32,})$", res.stdout, re.M)
    assert m, res.stdout
    assert g.cli_json("status")["tcp_hold"] == "relay"
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    b = ManageBrowser(topology, tmp_path / "browser", f"http://{WEB_LISTEN}/", m.group(1))
    timings: dict[str, float] = {}
    try:
        assert b.next(40.0)["event"] == "signed_in"

        # 1. allow once: delivered whole; the log names the web and the true size
        sp, since = _upload(g)
        ev = b.do("answer", action="allow-once", shot=str(SHOTS / "phone-held.png"))
        assert "echo" in ev["card_text"] and VOICE in ev["card_text"], ev["card_text"]
        assert ev["title"] == "(1) hushgate", ev["title"]
        once = _delivered(topology, sp, since)
        rec = _log_for(g, lambda r: str(r.get("id")) == ev["id"] and r.get("outcome")
                       == "approved" and (r.get("bytes") or 0) >= once["bytes_sent"],
                       "the allowed upload with its true size")
        assert str(rec["decided_by"]).startswith("web"), rec
        _assert_pending_none(g)
        _check_shot(Path(ev["shot"]), *PHONE, [ev["card_rect"]])
        timings["shown_after_start_s"] = round(ev["seen_at"] - since, 3)

        # 2. deny: the speaker is reset, the cloud gets nothing
        sp, since = _upload(g, hold_open=True)
        ev = b.do("answer", action="deny")
        _refused(topology, sp, since)
        rec = _log_for(g, lambda r: str(r.get("id")) == ev["id"] and r.get("outcome"),
                       "the denied upload")
        assert rec["outcome"] == "denied" and str(rec["decided_by"]).startswith("web"), rec

        # 3. allow for 10 min: an allow window the next upload passes through, then revoked
        sp, since = _upload(g)
        ev = b.do("answer", action="allow-10min")
        clicked = ev["clicked_at"]
        _delivered(topology, sp, since)
        (window,) = [e for e in _entries(g) if e["kind"] == "allow-window"]
        assert window["device"] == "echo" and abs(window["until"] - clicked - 600) < 30, window
        sp, since = _upload(g)
        _delivered(topology, sp, since)  # no card: nobody clicked
        _log_for(g, lambda r: r.get("outcome") == "window" and (r.get("started") or 0) >= since
                 - 1, "the upload the window let pass")
        gone = b.do("revoke", kind="allow-window", device="echo")
        assert gone["revoked"]["id"] == window["id"], gone
        assert [e for e in _entries(g) if e["kind"] == "allow-window"] == []

        # 4. deny always: reset now and the next upload to the host refused at once
        sp, since = _upload(g, hold_open=True)
        ev = b.do("answer", action="deny-always")
        _refused(topology, sp, since)
        (rule,) = [e for e in _entries(g) if e["kind"] == "always-deny"]
        assert rule["device"] == "echo" and rule["host"] == VOICE, rule
        sp, since = _upload(g, hold_open=True)
        _refused(topology, sp, since)
        _assert_pending_none(g)
        gone = b.do("revoke", kind="always-deny", device="echo")
        assert gone["revoked"]["id"] == rule["id"]

        # 5. allow always: delivered now and the next upload passes at once; the rule revoked
        sp, since = _upload(g)
        ev = b.do("answer", action="allow-always")
        _delivered(topology, sp, since)
        (rule,) = [e for e in _entries(g) if e["kind"] == "always-allow"]
        assert rule["device"] == "echo" and rule["host"] == VOICE, rule
        sp, since = _upload(g)
        _delivered(topology, sp, since)
        _log_for(g, lambda r: r.get("outcome") == "rule" and (r.get("started") or 0) >= since
                 - 1, "the upload the always-rule let pass")
        shown = b.do("rules")
        assert [r["id"] for r in shown] == [e["id"] for e in _entries(g)], shown
        rules_shot = b.do("shot", tab="rules", path=str(SHOTS / "phone-rules.png"))
        gone = b.do("revoke", kind="always-allow", device="echo")
        assert gone["revoked"]["id"] == rule["id"]
        assert _entries(g) == []

        # 6. mute from the page: the next upload refused with no prompt; unmuted, it is held again
        muted = b.do("mute", device="echo", seconds=3600)
        assert "Muted until" in muted["card_text"], muted
        (mute,) = _entries(g)
        assert mute["kind"] == "mute" and mute["device"] == "echo", mute
        (dev,) = [d for d in g.cli_json("devices") if d["name"] == "echo"]
        assert dev["mute_until"] is not None and abs(dev["mute_until"] - time.time() - 3600) < 60
        devices_shot = b.do("shot", tab="devices", path=str(SHOTS / "phone-devices.png"))
        sp, since = _upload(g, hold_open=True)
        _refused(topology, sp, since)
        _log_for(g, lambda r: r.get("outcome") == "quiet" and (r.get("started") or 0) >= since
                 - 1, "the muted upload")
        _assert_pending_none(g)
        b.do("unmute", device="echo")
        assert _entries(g) == []
        (dev,) = [d for d in g.cli_json("devices") if d["name"] == "echo"]
        assert dev["mute_until"] is None, dev
        sp, since = _upload(g)
        ev = b.do("answer", action="allow-once")  # held again: the always-allow is gone too
        _delivered(topology, sp, since)

        # 7. monitor mode from the page: the next upload passes unheld (logged as monitored);
        #    back to the config file's mode (strict), the override is gone
        shown = b.do("mode", device="echo", mode="monitor", expect="monitor")
        assert "config" in shown["options"], shown  # the way back to the config file's mode
        (dev,) = [d for d in g.cli_json("status")["devices"] if d["name"] == "echo"]
        assert dev["mode"] == "monitor" and dev["mode_overridden"] is True, dev
        sp, since = _upload(g)
        _delivered(topology, sp, since)
        _log_for(g, lambda r: r.get("outcome") == "monitored"
                 and (r.get("started") or 0) >= since - 1, "the monitored upload")
        b.do("mode", device="echo", mode="config", expect="strict")
        (dev,) = [d for d in g.cli_json("status")["devices"] if d["name"] == "echo"]
        assert dev["mode"] == "strict" and dev["mode_overridden"] is False, dev

        # 8. a blocked messaging attempt, found in the log filtered to blocked
        res = topology.run_speaker("echo", "--host", MESSAGING, "-4", "--max-seconds", "10",
                                   "events", "--count", "1", timeout=20.0)
        assert res["bytes_sent"] == 0, res
        blocked = _log_for(g, lambda r: r.get("outcome") == "blocked"
                           and r.get("host") == MESSAGING, "the blocked messaging attempt")
        assert blocked["device"] == "echo", blocked
        shown = b.do("log", outcome="blocked", text="")
        assert all(e["outcome"] == "blocked" for e in shown["entries"]), shown
        assert any(MESSAGING in e["text"] and "echo" in e["text"] for e in shown["entries"])
        log_shot = b.do("shot", tab="log", path=str(SHOTS / "phone-log.png"))

        # the per-device counts of the last 24 h on the page are the guard's
        (dev,) = [d for d in g.cli_json("devices") if d["name"] == "echo"]
        counts = dev["counts_24h"]
        assert counts.get("approved", 0) >= 2 and counts.get("blocked", 0) >= 1, counts
        assert counts.get("monitored", 0) >= 1 and counts.get("quiet", 0) >= 1, counts
        (card,) = [d for d in b.do("devices") if d["device"] == "echo"]
        for outcome, n in counts.items():
            label = {"quiet": "muted"}.get(outcome, outcome)
            if n:
                assert f"{label} {n}" in card["text"], (outcome, n, card["text"])

        for shot in (rules_shot, devices_shot, log_shot):
            rects = [r for r in shot["panels"].values() if r]
            assert len(rects) == 1 and shot["tabs"], shot  # one section and the tab bar
            tabs = shot["tabs"]
            assert tabs[1] + tabs[3] >= PHONE[1] - 2 and tabs[3] >= 52, tabs  # at the thumb
            assert shot["scroll_width"] <= PHONE[0], shot  # nothing wider than the phone
            _check_shot(Path(shot["path"]), *PHONE, [[0, 0, PHONE[0], 300], tabs])

        # 9. the same page on a desktop: every section at once, side by side
        view = b.do("viewport", width=DESKTOP[0], height=DESKTOP[1], scale=1, mobile=False)
        assert view["inner"][:2] == list(DESKTOP), view
        desk = b.do("shot", tab="log", path=str(SHOTS / "desktop.png"))
        assert not desk["tabs"] and all(desk["panels"].values()), desk
        held, rules = desk["panels"]["held"], desk["panels"]["rules"]
        assert rules[0] >= held[0] + held[2], (held, rules)  # two columns
        _check_shot(Path(desk["path"]), *DESKTOP, [desk["panels"]["rules"][:2] + [400, 100]])
        shown = b.do("log", outcome="blocked", text="comms")
        assert any(MESSAGING in e["text"] for e in shown["entries"]), shown
    except BaseException:
        b.kill()
        raise
    assert b.close() == 0
    elapsed = time.monotonic() - t0
    record("manage_browser", elapsed_s=round(elapsed, 1), **timings)
    assert elapsed < 240, f"the walk took {elapsed:.0f} s"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
