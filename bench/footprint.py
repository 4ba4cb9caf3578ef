"""The daemon's memory and the CLI's start-up time.

Rules of this file: like bench/forwarding.py (namespaces it creates, prefix `hgb`, addresses in
198.18.0.0/15, every process killed by PID, namespaces deleted on any exit, a hard time bound).

    python bench/footprint.py [--repeat 15] [--json]

- RSS of a real `hushgate run` (VmRSS, and VmHWM: the peak) idle, then under load: iperf3 through
  the inspected path for `--load-seconds` (a download on a voice connection, whose ACKs the guard
  inspects, then 64-byte UDP to an unknown host). Target: under 40 MB; printed in MiB (the
  kernel's kB are KiB) and in SI MB.
- What the running daemon imported: it is started with `python -X importtime`, whose log lists
  every module the process imported; scapy must not be among them (kernel-facts: 73 MB, 0.5 s).
  The same check in a fresh interpreter that imports guard.shell.daemon and guard.tools.cli (what `run`
  loads), with its RSS.
- Wall time of `hushgate --help` and `hushgate pending --socket S` against the running daemon,
  median of `--repeat` (15) runs each. Target: under 0.25 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.forwarding import (  # noqa: E402
    UNKNOWN_V4,
    VOICE,
    TimeBound,
    World,
    loadavg,
    machine,
)

HEAVY = ("scapy", "dpkt", "prometheus_client", "click", "sqlite3", "cryptography", "ssl",
         "asyncio", "http", "wsgiref", "email", "ipaddress", "tomllib", "netfilterqueue")

IMPORT_CHECK = r"""
import json, sys
import guard.shell.daemon, guard.tools.cli  # what `hushgate run` loads before its first packet
tops = sorted({m.split(".")[0] for m in sys.modules})
rss = 0
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        rss = int(line.split()[1])
print(json.dumps({"modules": len(sys.modules), "top": tops, "rss_kb": rss}))
"""


def proc_mem(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1])
    return out


def imported_from_log(text: str) -> list[str]:
    """Module names from `-X importtime` lines: 'import time: self | cumulative | name'."""
    mods = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s+(\S.*)$", line)
        if m:
            mods.append(m.group(1).strip())
    return mods


def timed(argv: list[str], repeat: int, env: dict[str, str]) -> dict[str, Any]:
    times = []
    rc = None
    for _ in range(repeat):
        t = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env,
                              check=False)
        times.append(time.perf_counter() - t)
        rc = proc.returncode
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "rc": rc}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--load-seconds", type=float, default=5.0)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("footprint.py needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 1
    report: dict[str, Any] = {"machine": machine(), "load_start": loadavg()}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # a fresh interpreter importing what `run` imports
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True,
                         timeout=60, env=env, check=True).stdout
    report["import_check"] = json.loads(out)
    with TimeBound(args.max_seconds), World() as world:
        world.setup("guard", start=False)
        g = world.guard
        assert g is not None
        g.command = ("-X", "importtime", "-m", "guard.tools.cli", "run")
        g.start()
        pid = g.pid
        assert pid is not None
        time.sleep(2.0)
        report["idle"] = proc_mem(pid)
        voice = world.resolve("echo", VOICE)
        samples: list[dict[str, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(proc_mem(pid))
                time.sleep(0.25)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            loads = {
                "tcp_down": world.iperf3("echo", voice, "tcp_down", args.load_seconds),
                "udp64": world.iperf3("echo", UNKNOWN_V4, "udp64", args.load_seconds),
            }
        finally:
            stop.set()
            t.join(5)
        report["load_traffic"] = {k: {"value": v.get("value"), "unit": v.get("unit"),
                                      "queued": v.get("queued")} for k, v in loads.items()}
        report["under_load"] = {"max_rss_kb": max(s["VmRSS"] for s in samples),
                                "hwm_kb": proc_mem(pid)["VmHWM"], "samples": len(samples)}
        maps = Path(f"/proc/{pid}/maps").read_text()
        report["maps_mention_scapy"] = "scapy" in maps
        hushgate = shutil.which("hushgate", path=str(Path(sys.executable).parent)) or ""
        cli = [hushgate] if hushgate else [sys.executable, "-m", "guard.tools.cli"]
        report["cli"] = {
            "command": " ".join(cli),
            "help": timed([*cli, "--help"], args.repeat, env),
            "pending": timed([*cli, "pending", "--socket", str(g.socket)], args.repeat, env),
        }
        text = Path(g.log_path).read_text(errors="replace")
        world.teardown()
    mods = imported_from_log(text) if text else []
    report["daemon_imports"] = {
        "modules": len(mods),
        "scapy": sorted({m for m in mods if m.split(".")[0] == "scapy"}),
        "heavy_present": sorted({m.split(".")[0] for m in mods} & set(HEAVY)),
    }
    report["load_end"] = loadavg()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print_report(report)
    return 0


def print_report(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"machine: {m['nproc']} vCPU, {m['cpu']}, kernel {m['kernel']}, Python {m['python']}; "
          f"1-min load {r['load_start']:.2f} at start, {r['load_end']:.2f} at end")
    idle, load = r["idle"], r["under_load"]
    ok = ("ok" if load["hwm_kb"] * 1024 < 40e6 else
          "ok in MiB, missed in SI MB" if load["hwm_kb"] < 40 * 1024 else "MISSED")
    print(f"\ndaemon RSS idle {idle['VmRSS'] / 1024:.1f} MiB (anon {idle['RssAnon'] / 1024:.1f}, "
          f"file {idle['RssFile'] / 1024:.1f}); under load max {load['max_rss_kb'] / 1024:.1f} MiB, "
          f"peak (VmHWM) {load['hwm_kb'] / 1024:.1f} MiB = {load['hwm_kb'] * 1024 / 1e6:.1f} MB  "
          f"[target < 40 MB: {ok}]")
    lt = r["load_traffic"]
    print("  load: " + ", ".join(f"{k} {v['value']:.2f} {v['unit']} ({v['queued']} queued)"
                                 for k, v in lt.items() if v["value"] is not None))
    di = r["daemon_imports"]
    print(f"daemon imported {di['modules']} modules; scapy: {di['scapy'] or 'none'}; "
          f"of {', '.join(HEAVY)}: {', '.join(di['heavy_present'])}; scapy in /proc/PID/maps: "
          f"{r['maps_mention_scapy']}")
    ic = r["import_check"]
    print(f"fresh interpreter importing guard.shell.daemon + guard.tools.cli: {ic['modules']} modules, "
          f"RSS {ic['rss_kb'] / 1024:.1f} MiB, scapy {'present' if 'scapy' in ic['top'] else 'absent'}")
    c = r["cli"]
    for k in ("help", "pending"):
        v = c[k]
        ok = "ok" if v["median_s"] < 0.25 else "MISSED"
        print(f"`{c['command']} {'pending --socket S' if k == 'pending' else '--help'}`: median "
              f"{v['median_s']:.3f} s (min {v['min_s']:.3f}, max {v['max_s']:.3f}, rc {v['rc']}) "
              f"[target < 0.25 s: {ok}]")


if __name__ == "__main__":
    sys.exit(main())
