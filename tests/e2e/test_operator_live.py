"""Operator mistakes and partial failures, live (issue 16 points 1-5): a real `hushgate run` in
the simulated home's router namespace, on this module's queue.

1. A second `run` (same config) refuses in one line naming the running guard and touches no
   rule: the first guard's upload stays held, smart-home is still relayed. A second guard on
   another socket directory but the same queue is refused before any rule too.
2. Every bad listen config is refused alike by `doctor`, `firewall show` and `run` (exit 78, one
   line, no rule); `web token` prints no token without [web] listen; an address that is valid
   but not on this router is a one-line `run` failure before any rule, and a `doctor` failure.
3. `run` without CAP_NET_ADMIN/CAP_NET_RAW (capsh): one line, exit 1, no traceback, no rule.
4. sd_notify: READY=1 and WATCHDOG=1 from the packet loop reach a NOTIFY_SOCKET listener; a
   SIGSTOPped guard sends none, its devices stay fail-closed and an unguarded host is untouched.
5. Two LAN hosts behind one MAC (a MAC-rewriting extender): the address-only device is not
   matched by that MAC, and the other host is not guarded.

Bounded waits everywhere; processes are killed by PID (the Guard's, and the topology's own).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hushsim.topology import Topology
from tests.e2e.guardkit import (
    Guard,
    MakeGuard,
    SpeakerRun,
    cloud_bytes_stay,
    cloud_conn_since,
    hushgate_rules,
    record,
    ruleset,
)

QUEUE = 41  # this module's NFQUEUE number (other modules use their own)
RELAY_PORT = 7441
VOICE = "bob-dispatch-prod-na.amazon.com"
SMART_HOME = "api.amazonalexa.com"
EXTENDER_MAC = "02:68:67:0a:ee:01"


def _relay_guard(guards: MakeGuard, **kw: Any) -> Guard:
    return guards(tcp_hold="relay", relay_port=RELAY_PORT, **kw)


def _held_upload(g: Guard) -> tuple[SpeakerRun, dict[str, Any], dict[str, Any]]:
    since = time.time()
    sp = g.speaker("echo", "--host", VOICE, "-4", "--max-seconds", "60", "upload", "--profile",
                   "echo-opus-118", wait_file=True)
    sp.ready(timeout_s=10.0)
    conn = cloud_conn_since(g.topo, VOICE, since, handshake=True)
    sp.go()
    pend, _ = g.wait_pending(1, timeout_s=5.0)
    return sp, conn, pend[0]


def _smart_home(topology: Topology, host: str = "echo", seconds: int = 10) -> dict[str, Any]:
    return topology.run_speaker(host, "--host", SMART_HOME, "-4", "--max-seconds", str(seconds),
                                "events", "--count", "1", timeout=seconds + 10.0)


def _rules(topology: Topology) -> dict[int, list[str]]:
    """The router's rules of both families, without iptables-save's dated comments."""
    return {fam: [ln for ln in text.splitlines() if not ln.startswith("#")]
            for fam, text in ruleset(topology).items()}


def _run_once(topology: Topology, config: Path, *prefix: str, timeout: float = 30.0
              ) -> subprocess.CompletedProcess[str]:
    """A foreground `hushgate run` that is expected to refuse (bounded)."""
    return topology.run("gw", *prefix, sys.executable, "-m", "guard.tools.cli", "run", "--config",
                        str(config), check=False, timeout=timeout)


def _one_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1, lines
    return lines[0]


# --- 1. one guard per router ---------------------------------------------------------------------


def test_a_second_run_refuses_and_leaves_the_first_guards_rules_and_traffic_intact(
    topology: Topology, guards: MakeGuard
) -> None:
    g = _relay_guard(guards)
    sp, conn, pending = _held_upload(g)
    before = _rules(topology)
    t0 = time.monotonic()
    res = _run_once(topology, g.config_path)
    line = _one_line(res)
    record("second_run_refused", seconds=round(time.monotonic() - t0, 2), line=line)
    assert res.returncode == 1, res
    assert f"pid {g.pid}" in line and str(g.socket) in line and "already running" in line, line
    assert _rules(topology) == before  # not one rule touched
    # the first guard goes on: the upload is still held, nothing of it at the cloud ...
    assert [p["id"] for p in g.pending()] == [pending["id"]]
    cloud_bytes_stay(topology, conn["id"], 0, 1.0, "held upload after a second run")
    # ... and smart-home is still relayed
    res_sh = _smart_home(topology)
    assert res_sh["error"] is None and not res_sh["reset"], res_sh
    status = g.cli_json("status")
    assert status["relay"]["passed"] >= 1 and g.running
    # a guard with its own socket directory but the same queue is refused before any rule too
    other = Guard(topology, g.devices, queue=QUEUE, autostart=False, tcp_hold="relay",
                  relay_port=RELAY_PORT)
    try:
        res2 = _run_once(topology, other.config_path)
        line2 = _one_line(res2)
        assert res2.returncode == 1 and f"NFQUEUE {QUEUE} is already bound" in line2, line2
        assert _rules(topology) == before
        assert [p["id"] for p in g.pending()] == [pending["id"]]
    finally:
        other._closed = True  # never started: its `close` would remove the first guard's rules
        shutil.rmtree(other.dir, ignore_errors=True)
    g.cli_ok("deny", str(pending["id"]))
    sp.kill()


# --- 2. one validation path ----------------------------------------------------------------------

BAD_CONFIGS = {
    "web-every-interface": {"web": {"listen": "0.0.0.0:8787"}},
    "web-no-port": {"web": {"listen": "198.18.1.1"}},
    "web-wan-address": {"web": {"listen": "8.8.8.8:8787"}},
    "metrics-no-port": {"metrics": {"listen": "9877"}},
    "metrics-hostname": {"metrics": {"listen": "localhost:9877"}},
    "web-bad-password-hash": {"web": {"listen": "198.18.10.1:8787", "password_hash": "x"}},
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_a_bad_listen_config_is_refused_alike_by_doctor_firewall_show_and_run(
    topology: Topology, guards: MakeGuard, name: str
) -> None:
    g = guards(autostart=False, sections=BAD_CONFIGS[name])
    cfg = str(g.config_path)
    doctor = g.cli("doctor", "--config", cfg, socket=False)
    show = g.cli("firewall", "show", "--config", cfg, socket=False)
    run = _run_once(topology, g.config_path)
    line = _one_line(run)
    record("bad_listen_config", case=name, doctor=doctor.returncode, show=show.returncode,
           run=run.returncode, line=line)
    assert doctor.returncode == 1 and "config" in doctor.stdout, doctor.stdout
    assert show.returncode == 1 and show.stdout == "", show
    assert run.returncode == 78 and "configuration error (exit 78)" in line, line
    key = next(iter(BAD_CONFIGS[name]))
    assert key in doctor.stdout and key in show.stderr and key in line
    assert hushgate_rules(topology) == []
    g.sections = {}  # so the fixture's `firewall remove --config` can load it
    g.write_config()


def test_web_token_needs_a_web_listen_and_never_prints_an_unusable_url(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards(autostart=False)
    res = g.cli("web", "token", "--config", str(g.config_path), socket=False)
    assert res.returncode == 1 and "token" not in res.stdout and "[web]" in res.stderr, res
    g2 = guards(autostart=False, sections={"web": {"listen": "198.18.10.1:8787"}})
    res = g2.cli("web", "token", "--config", str(g2.config_path), socket=False)
    assert res.returncode == 0, res
    assert "open: http://198.18.10.1:8787/#token=" in res.stdout and "0.0.0.0" not in res.stdout


def test_a_listen_address_not_on_this_router_fails_run_before_any_rule_and_doctor_says_so(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards(autostart=False, sections={"web": {"listen": "198.18.10.99:8787"}})
    res = _run_once(topology, g.config_path)
    line = _one_line(res)
    assert res.returncode == 1 and "web.listen 198.18.10.99:8787: cannot listen" in line, line
    assert hushgate_rules(topology) == []
    doctor = g.cli("doctor", "--config", str(g.config_path), "--json", socket=False)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert checks["listen"]["severity"] == "fail", checks["listen"]
    assert "198.18.10.99:8787" in checks["listen"]["message"]


# --- 3. capabilities -----------------------------------------------------------------------------

CAPSH = ("capsh", "--drop=cap_net_admin,cap_net_raw", "--")


@pytest.mark.parametrize("fail", ["closed", "open"])
def test_run_without_the_network_capabilities_is_one_line_exit_1_and_no_rule(
    topology: Topology, guards: MakeGuard, fail: str
) -> None:
    g = guards(autostart=False, fail=fail, tcp_hold="relay", relay_port=RELAY_PORT)
    res = topology.run("gw", *CAPSH, "-c", f"exec {sys.executable} -m guard.tools.cli run --config "
                       f"{g.config_path}", check=False, timeout=30.0)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    record("no_capabilities", fail=fail, rc=res.returncode, lines=lines)
    assert res.returncode == 1, res
    if fail == "closed":
        assert len(lines) == 1 and "missing capabilities" in lines[0], lines
        assert "CAP_NET_ADMIN" in lines[0] and "CAP_NET_RAW" in lines[0]
    else:  # warned loudly, went on, and failed at the first rule: one more line, no traceback
        assert "WARNING" in lines[0] and "missing capabilities" in lines[0], lines
        assert len(lines) <= 3 and "refusing to start" in "\n".join(lines), lines
    assert hushgate_rules(topology) == []
    doctor = topology.run("gw", *CAPSH, "-c", f"exec {sys.executable} -m guard.tools.cli doctor "
                          f"--json --config {g.config_path}", check=False, timeout=30.0)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert checks["capabilities"]["severity"] == "warn", checks["capabilities"]
    assert "CAP_NET_RAW" in checks["capabilities"]["message"]


# --- 4. the watchdog -----------------------------------------------------------------------------


def _notifications(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    out: list[tuple[float, str]] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        out.append((time.monotonic(), data.decode(errors="replace")))
    return out


def test_watchdog_pings_come_from_the_loop_and_stop_while_it_is_stopped(
    topology: Topology, guards: MakeGuard
) -> None:
    g = guards(autostart=False, tcp_hold="relay", relay_port=RELAY_PORT)
    path = g.dir / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    os.chmod(path, 0o777)
    stopped = False
    try:
        env = {**topology._env, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
        with g.log_path.open("a") as log:
            g.proc = topology.popen("gw", sys.executable, "-m", "guard.tools.cli", "run", "--config",
                                    str(g.config_path), stdout=log, stderr=subprocess.STDOUT,
                                    env=env)
        g.wait_ready()
        got = _notifications(listener, 2.5)
        ready = [t for t, m in got if "READY=1" in m]
        beats = [t for t, m in got if m == "WATCHDOG=1"]
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        record("watchdog_running", ready=len(ready), beats=len(beats),
               max_gap_s=round(max(gaps), 3) if gaps else None)
        assert len(ready) == 1 and f"MAINPID={g.pid}" in next(m for _, m in got if "READY" in m)
        assert len(beats) >= 3 and max(gaps) < 1.0, got  # within WatchdogSec (1 s here)
        health = g.cli("health", "--config", str(g.config_path), socket=False)
        assert health.returncode == 0 and "healthy" in health.stdout, health
        # hung: SIGSTOP. No ping within the interval; the guarded echo stays closed, the
        # homepod (not configured) is untouched.
        os.kill(g.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        stopped = True
        _notifications(listener, 0.1)  # whatever was in flight
        since = time.time()
        homepod = _smart_home(topology, "homepod", seconds=8)
        echo = _smart_home(topology, "echo", seconds=3)
        quiet = _notifications(listener, max(0.0, 1.5 - (time.time() - since)))
        health = g.cli("health", "--config", str(g.config_path), "--timeout", "1", socket=False)
        assert health.returncode == 1 and "unhealthy" in health.stderr, health
        assert f"guard pid {g.pid} holds the lock" in health.stderr, health.stderr
        record("watchdog_stopped", pings=len(quiet), homepod_error=homepod["error"],
               echo_error=echo["error"])
        assert quiet == [], quiet
        assert homepod["error"] is None and not homepod["reset"], homepod
        assert echo["error"] is not None or echo["reset"] or echo.get("bytes_sent", 0) == 0, echo
        conns = [c for c in topology.cloud.stats()["tcp"]  # type: ignore[union-attr]
                 if c["host"] == SMART_HOME and c["opened"] >= since]
        assert len(conns) == 1, conns  # the homepod's; nothing of the echo's reached the cloud
        os.kill(g.pid, signal.SIGCONT)  # type: ignore[arg-type]
        stopped = False
        again = [m for _, m in _notifications(listener, 1.5) if m == "WATCHDOG=1"]
        assert again, "no ping after SIGCONT"
        g.stop()
        tail = [m for _, m in _notifications(listener, 0.5)]
        assert any("STOPPING=1" in m for m in tail) or g.exit_codes[-1] == 0
    finally:
        if stopped and g.running:
            os.kill(g.pid, signal.SIGCONT)  # type: ignore[arg-type]
        listener.close()


# --- 5. a MAC shared by several hosts ------------------------------------------------------------


def _resolve_from_gw(topology: Topology, address: str) -> None:
    def poke() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hushgate", (address, 9))

    for _ in range(60):
        topology.call_in("gw", poke)
        out = topology.run("gw", "ip", "-4", "neigh", "show", address).stdout
        if "lladdr" in out:
            return
        time.sleep(0.05)
    raise TimeoutError(f"gw did not resolve {address}")


def _wait_log(g: Guard, pattern: str, timeout_s: float = 8.0) -> list[str]:
    rx = re.compile(pattern)
    for _ in range(int(timeout_s / 0.1) + 1):
        hits = [ln for ln in g.log_path.read_text(errors="replace").splitlines() if rx.search(ln)]
        if hits:
            return hits
        time.sleep(0.1)
    raise TimeoutError(f"no log line {pattern!r}\n{g.log_tail()}")


def test_an_address_only_device_behind_a_shared_mac_never_pulls_the_other_host_in(
    topology: Topology, guards: MakeGuard
) -> None:
    one = topology.add_speaker("extone", v4="198.18.10.40", mac=EXTENDER_MAC)
    _resolve_from_gw(topology, one.v4)
    g = _relay_guard(guards, devices=[{"name": "extone", "address": one.v4, "mode": "strict"}])
    # alone behind its MAC: learned at start, matched by MAC (its IPv6 too)
    rules = ruleset(topology)
    assert EXTENDER_MAC in rules[4].lower() and EXTENDER_MAC in rules[6].lower()
    assert g.cli_json("status")["devices"][0]["mac"] == EXTENDER_MAC
    # a second host appears behind the same MAC (the extender's next client)
    two = topology.add_speaker("exttwo", v4="198.18.10.41", mac=EXTENDER_MAC)
    gw = topology.ns("gw")
    for port in (one.port, two.port):  # both ports flooded: frames for the MAC reach both
        subprocess.run(["ip", "-n", gw, "link", "set", "dev", port, "type", "bridge_slave",
                        "learning", "off", "flood", "on", "fdb_flush"], check=True, timeout=10)
    _resolve_from_gw(topology, two.v4)
    warned = _wait_log(g, r"extone .* shares MAC")
    _wait_log(g, r"extone is matched by its address alone again")
    rules = ruleset(topology)
    record("shared_mac", warning=warned[0])
    assert EXTENDER_MAC not in rules[4].lower() and EXTENDER_MAC not in rules[6].lower()
    assert f"-s {one.v4}/32" in rules[4]
    devices = {d["name"]: d for d in g.cli_json("status")["devices"]}
    assert devices["extone"]["mac"] is None, devices
    relayed = g.cli_json("status")["relay"]["passed"]
    # the other host behind the MAC is not guarded: its smart-home goes straight to the cloud
    since = time.time()
    res = _smart_home(topology, "exttwo")
    assert res["error"] is None and not res["reset"], res
    cloud_conn_since(topology, SMART_HOME, since)  # it arrived (the router NATs every host)
    assert g.cli_json("status")["relay"]["passed"] == relayed
    # the device itself is still guarded (relayed)
    res = _smart_home(topology, "extone")
    assert res["error"] is None and not res["reset"], res
    assert g.cli_json("status")["relay"]["passed"] == relayed + 1
    time.sleep(2.5)  # more neighbour polls: still one warning
    assert len(_wait_log(g, r"extone .* shares MAC")) == 1
