"""Drive a real `hushgate run` inside a Topology's router namespace (the live end-to-end suite).

Rules of this file: every process it starts is known by PID and killed by PID; every wait has a
bound; a `Guard` always leaves the router as it found it (no daemon left running, no HUSHGATE rule
in either family), whatever the test did, and says so (a warning) when it had to clean up behind
the CLI. What left the house is read from the cloud's own counters, never from the guard.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from guard.shell.control import ControlError
from guard.shell.control import request as control_request
from hushsim.topology import Topology, TopologyError, parse_speaker_output

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"

READY_TIMEOUT_S = 10.0  # the daemon answering `status` after start (contract: poll up to 10 s)
STOP_TIMEOUT_S = 10.0  # SIGTERM -> exit; the daemon removes its rules on the way out
CLI_TIMEOUT_S = 10.0  # any single CLI call (they take ~0.1 s)
POLL_S = 0.02  # between polls; a CLI round trip itself takes ~0.07 s


class GuardError(RuntimeError):
    """The daemon or its CLI did not do what the contract says (the message has the log tail)."""


# --- configuration --------------------------------------------------------------------------------


def device(topo: Topology, name: str, mode: str = "strict", **extra: Any) -> dict[str, Any]:
    """A [[device]] table for LAN host `name` of `topo`: matched by its MAC and its IPv4 address."""
    host = topo.lan_hosts[name]
    return {"name": name, "mac": host.mac, "address": host.v4, "mode": mode, **extra}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def render_config(
    guard: Mapping[str, Any],
    devices: Iterable[Mapping[str, Any]],
    metrics_listen: str = "",
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The TOML config. `sections` adds tables ({"web": {"listen": ...}}); a "metrics" table
    there replaces the default one (metrics off: `listen = ""`)."""
    extra = dict(sections or {})
    metrics = extra.pop("metrics", {"listen": metrics_listen})
    lines = ["[guard]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in guard.items()]
    lines += ["", "[metrics]"] + [f"{k} = {_toml_value(v)}" for k, v in metrics.items()]
    for name, table in extra.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for dev in devices:
        lines += ["", "[[device]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in dev.items()]
    return "\n".join(lines) + "\n"


# --- the guard ------------------------------------------------------------------------------------


class Guard:
    """A `hushgate run` in the topology's gw namespace, with its own config, socket and store in a
    temp dir named after the topology (so `cleanup_stale` finds leftovers of a crashed run).
    `command` is how the daemon is started: `python -m guard.tools.cli run --config FILE`.

    Use as a context manager: entering starts the daemon (unless `autostart=False`) and waits
    until `status` answers; leaving stops it, removes its firewall and kills the speakers started
    through `speaker()`, even when the test failed."""

    def __init__(
        self,
        topo: Topology,
        devices: Sequence[Mapping[str, Any]],
        *,
        queue: int,
        fail: str = "closed",
        hold_timeout_s: float = 20.0,
        autostart: bool = True,
        sections: Mapping[str, Mapping[str, Any]] | None = None,
        **guard_keys: Any,
    ) -> None:
        self.command: tuple[str, ...] = ("-m", "guard.tools.cli", "run")
        self.topo = topo
        self.devices = [dict(d) for d in devices]
        self.dir = Path(tempfile.mkdtemp(prefix=f"{topo.prefix}-guard-"))
        os.chmod(self.dir, 0o700)
        self.config_path = self.dir / "hushgate.toml"
        self.socket = self.dir / "control.sock"
        self.state_db = self.dir / "state.db"
        self.log_path = self.dir / "daemon.log"
        self.guard_keys: dict[str, Any] = {
            # The suites written for the packet hold pin it; relay tests pass tcp_hold="relay".
            "tcp_hold": "packet",
            "quic": "hold",  # likewise the QUIC packet hold (the default refuses QUIC)
            "queue": queue,
            "fail": fail,
            "hold_timeout_s": float(hold_timeout_s),
            "socket": str(self.socket),
            "state_db": str(self.state_db),
            **guard_keys,
        }
        self.sections = {k: dict(v) for k, v in (sections or {}).items()}  # [metrics], [web]
        self.autostart = autostart
        self.proc: subprocess.Popen[Any] | None = None
        self.exit_codes: list[int | None] = []
        self.speakers: list[SpeakerRun] = []
        self.cli_rtt_s: float | None = None  # the fastest `status` round trip seen
        self.cleanup_notes: list[str] = []
        self._closed = False
        self.write_config()

    # lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Guard:
        try:
            if self.autostart:
                self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_config(self) -> None:
        self.config_path.write_text(
            render_config(self.guard_keys, self.devices, sections=self.sections)
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> dict[str, Any]:
        """Start the daemon (the PID is the daemon's: `ip netns exec` execs it in place) and wait
        until `status --json` succeeds; returns that status."""
        if self.running:
            raise GuardError("guard already running")
        if self._closed:
            raise GuardError("guard is closed")
        with self.log_path.open("a") as log:
            log.write(f"--- start {time.time():.3f}\n")
            log.flush()
            self.proc = self.topo.popen(
                "gw",
                sys.executable,
                *self.command,
                "--config",
                str(self.config_path),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.wait_ready()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        last = ""
        for _ in range(int(timeout_s / POLL_S) + 2):
            if self.proc.poll() is not None:
                raise GuardError(
                    f"hushgate run exited with {self.proc.returncode} before it was ready\n"
                    + self.log_tail()
                )
            if self.socket.exists():
                t0 = time.monotonic()
                try:
                    status = self.request("status")
                except ControlError as exc:
                    last = str(exc)[-300:]
                else:
                    rtt = time.monotonic() - t0
                    self.cli_rtt_s = rtt if self.cli_rtt_s is None else min(self.cli_rtt_s, rtt)
                    return status
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        raise GuardError(
            f"hushgate run not ready within {timeout_s} s (last: {last})\n" + self.log_tail()
        )

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Send `sig` to the daemon and wait for it to exit; its exit code. A daemon that does
        not exit in time is killed (SIGKILL) and GuardError raised."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill(proc)
                self.exit_codes.append(proc.returncode)
                raise GuardError(
                    f"hushgate run did not exit within {timeout_s} s of signal {sig}\n"
                    + self.log_tail()
                ) from None
        self.exit_codes.append(proc.returncode)
        return proc.returncode

    def kill9(self) -> None:
        """SIGKILL: no clean-up by the daemon at all (a crash)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            raise GuardError("guard is not running")
        _kill(proc)
        self.exit_codes.append(proc.returncode)

    def restart(self) -> dict[str, Any]:
        """Stop (if running) and start again with the same config, socket and store."""
        if self.running:
            self.stop()
        return self.start()

    def close(self) -> None:
        """Kill the speakers, stop the daemon (SIGTERM, then SIGKILL), remove every HUSHGATE rule
        (`hushgate firewall remove --config`, then a check, then a direct removal if the CLI left
        anything), delete the temp dir. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        for sp in self.speakers:
            sp.kill()
        if self.running:
            try:
                self.stop(timeout_s=5.0)
            except GuardError as exc:
                self.cleanup_notes.append(str(exc).splitlines()[0])
        try:
            res = self.cli("firewall", "remove", "--config", str(self.config_path), socket=False)
            if res.returncode != 0:
                self.cleanup_notes.append(f"firewall remove: exit {res.returncode}: {res.stderr}")
        except (OSError, subprocess.SubprocessError, TopologyError) as exc:
            self.cleanup_notes.append(f"firewall remove: {exc}")
        try:
            left = hushgate_rules(self.topo)
        except (OSError, subprocess.SubprocessError, TopologyError) as exc:
            left = [f"(cannot read rules: {exc})"]
        if left:
            self.cleanup_notes.append(f"rules left after `firewall remove`: {left[:5]}")
            _remove_rules_directly(self.topo)
        if self.cleanup_notes:
            warnings.warn("Guard clean-up: " + "; ".join(self.cleanup_notes), stacklevel=2)
        self.final_log = self.log_tail(60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return getattr(self, "final_log", "(no daemon log)")
        tail = text.splitlines()[-lines:]
        return "daemon log (tail):\n" + "\n".join("  | " + line for line in tail)

    # the CLI ------------------------------------------------------------------------------

    def cli(
        self, *args: str, socket: bool = True, timeout: float = CLI_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """`python -m guard.tools.cli ARGS [--socket S]` inside gw; never raises on a failing exit."""
        extra = ["--socket", str(self.socket)] if socket else []
        return self.topo.run(
            "gw", sys.executable, "-m", "guard.tools.cli", *args, *extra, check=False, timeout=timeout
        )

    def cli_ok(self, *args: str, socket: bool = True) -> subprocess.CompletedProcess[str]:
        """`cli` that raises GuardError (with stderr and the log tail) unless the exit code is 0."""
        res = self.cli(*args, socket=socket)
        if res.returncode != 0:
            raise GuardError(
                f"hushgate {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()[-500:]}\n"
                + self.log_tail(15)
            )
        return res

    def cli_json(self, *args: str) -> Any:
        """`cli` with `--json` (added when missing), exit code 0 required, stdout parsed."""
        if "--json" not in args:
            args = (*args, "--json")
        res = self.cli_ok(*args)
        try:
            return json.loads(res.stdout)
        except ValueError:
            raise GuardError(
                f"hushgate {' '.join(args)} printed no JSON: {res.stdout[:300]!r}"
            ) from None

    def request(self, cmd: str, **args: Any) -> Any:
        """One control request over the guard's socket, from this process (a Unix socket needs
        no namespace): the result `hushgate CMD --json` prints, without starting a CLI process
        (~0.3 s each; the CLI's own output is tested where a test calls `cli`)."""
        return control_request(str(self.socket), {"cmd": cmd, **args})

    def pending(self) -> list[dict[str, Any]]:
        return list(self.request("pending"))

    def log(self) -> list[dict[str, Any]]:
        out = self.request("log")
        if isinstance(out, dict):  # tolerate {"records": [...]}
            out = next((v for v in out.values() if isinstance(v, list)), [])
        return list(out)

    def wait_pending(
        self, n: int = 1, timeout_s: float = 5.0, exclude: Iterable[int] = ()
    ) -> tuple[list[dict[str, Any]], float]:
        """Poll `pending --json` until at least `n` uploads (ids not in `exclude`) are pending;
        (those uploads, the time.time() the answer came back)."""
        skip = set(exclude)
        deadline = time.monotonic() + timeout_s
        seen: list[dict[str, Any]] = []
        for _ in range(int(timeout_s / POLL_S) + 2):
            seen = [p for p in self.pending() if p.get("id") not in skip]
            if len(seen) >= n:
                return seen, time.time()
            if time.monotonic() >= deadline or not self.running:
                break
            time.sleep(POLL_S)
        raise TimeoutError(
            f"{len(seen)} of {n} uploads pending after {timeout_s} s: {seen}\n" + self.log_tail(15)
        )

    def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 5.0
    ) -> dict[str, Any]:
        """Poll `log --json` until a record satisfies `predicate`; that record."""
        deadline = time.monotonic() + timeout_s
        records: list[dict[str, Any]] = []
        for _ in range(int(timeout_s / 0.1) + 2):
            records = self.log()
            hit = next((r for r in records if predicate(r)), None)
            if hit is not None:
                return hit
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise TimeoutError(f"no matching log record in {timeout_s} s; log: {records[:10]}")

    # speakers -----------------------------------------------------------------------------

    def speaker(self, host: str, *args: str, wait_file: bool = False) -> SpeakerRun:
        """A speaker simulator in LAN host `host` (killed when the guard closes)."""
        sp = SpeakerRun(self.topo, host, *args, wait_file=wait_file, tmp=self.dir)
        self.speakers.append(sp)
        return sp


def _kill(proc: subprocess.Popen[Any]) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass


# --- rules in the router --------------------------------------------------------------------------


def ruleset(topo: Topology, counters: bool = False) -> dict[int, str]:
    """`iptables-save` and `ip6tables-save` of gw: {4: text, 6: text}."""
    flag = ["-c"] if counters else []
    return {
        4: topo.run("gw", f"{topo.iptables}-save", *flag).stdout,
        6: topo.run("gw", f"{topo.ip6tables}-save", *flag).stdout,
    }


def hushgate_rules(topo: Topology) -> list[str]:
    """Every line of gw's rules (both families) that mentions HUSHGATE."""
    return [
        f"ipv{fam}: {line}"
        for fam, text in ruleset(topo).items()
        for line in text.splitlines()
        if "HUSHGATE" in line.upper()
    ]


def queue_counters(topo: Topology) -> dict[str, int]:
    """Packets counted by every NFQUEUE rule in gw, per family and chain: {"ipv4 CHAIN": n}.
    Only the guard's rules queue, so these count every packet that reached userspace."""
    from guard.shell.firewall import parse_save

    out: dict[str, int] = {}
    for fam, text in ruleset(topo, counters=True).items():
        for table in parse_save(text).values():
            for rule in table.rules:
                if "NFQUEUE" in rule.spec:
                    key = f"ipv{fam} {rule.chain}"
                    out[key] = out.get(key, 0) + rule.packets
    return out


def _remove_rules_directly(topo: Topology) -> None:
    """Last resort when the CLI left rules: remove every HUSHGATE chain and jump ourselves."""
    from guard.shell.firewall import FirewallSpec, IptablesBackend, netns_runner

    spec = FirewallSpec(devices=(), queue=0)
    backend = IptablesBackend(
        spec, run=netns_runner(topo.ns("gw")), binaries=(topo.iptables, topo.ip6tables)
    )
    try:
        backend.remove_all()
    except Exception as exc:  # noqa: BLE001 - clean-up must not raise
        warnings.warn(f"could not remove HUSHGATE rules: {exc}", stacklevel=2)


# --- speakers -------------------------------------------------------------------------------------


class SpeakerRun:
    """One run of the speaker simulator: started at once; `ready()` waits for its connection,
    `go()` releases a `--wait-file` speaker, `result()` waits for its JSON line."""

    _n = 0

    def __init__(
        self, topo: Topology, host: str, *args: str, wait_file: bool = False, tmp: Path
    ) -> None:
        SpeakerRun._n += 1
        self.topo = topo
        self.host = host
        self.ready_file = tmp / f"speaker{SpeakerRun._n}.ready"
        self.go_file = tmp / f"speaker{SpeakerRun._n}.go"
        # Global options go before the mode; --wait-file belongs to the mode (after it).
        mode_at = next((i for i, a in enumerate(args) if a in _MODES), len(args))
        head, tail = list(args[:mode_at]), list(args[mode_at:])
        if wait_file:
            tail += ["--wait-file", str(self.go_file)]
        if tail and tail[0] != "quic-upload":
            head += ["--ready-file", str(self.ready_file)]
        self.args = [*head, *tail]
        self.proc = topo.speaker_popen(host, *self.args)
        self.went_at: float | None = None
        self._result: dict[str, Any] | None = None

    def ready(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The speaker's connection details once its TLS handshake is done."""
        deadline = time.monotonic() + timeout_s
        for _ in range(int(timeout_s / POLL_S) + 2):
            if self.ready_file.exists():
                text = self.ready_file.read_text()
                if text.strip():
                    try:
                        return dict(json.loads(text))
                    except ValueError:
                        pass  # being written
            if self.proc.poll() is not None:
                raise GuardError(f"speaker exited before it connected: {self.result()}")
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        raise TimeoutError(f"speaker in {self.host} not connected within {timeout_s} s")

    def go(self) -> float:
        """Create the wait file; the speaker starts within its poll interval (0.2 s)."""
        self.went_at = time.time()
        self.go_file.touch()
        return self.went_at

    def result(self, timeout_s: float = 30.0) -> dict[str, Any]:
        if self._result is None:
            try:
                out, err = self.proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                out, err = self.proc.communicate(timeout=5.0)
                self._result = parse_speaker_output(out, err)
                raise TimeoutError(
                    f"speaker in {self.host} still running after {timeout_s} s: {self._result}"
                ) from None
            self._result = parse_speaker_output(out, err)
        return self._result

    @property
    def done(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=2.0)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                _kill(self.proc)


_MODES = frozenset({"upload", "events", "rtt", "download", "quic-upload"})


# --- the cloud's view -----------------------------------------------------------------------------


def _port(local: str) -> int:
    return int(local.rsplit(":", 1)[1])


def cloud_conn(topo: Topology, local: str, host: str, timeout_s: float = 5.0,
               handshake: bool = False) -> dict[str, Any]:
    """The cloud's record of the TCP connection the speaker knows as `local` ("addr:port"):
    same host, and the peer port is the speaker's (IPv6 is routed as is; the router's IPv4
    masquerade keeps free source ports). The newest such connection if there are several.
    With `handshake`, only once the cloud has finished its TLS handshake: the speaker's end
    of TLS 1.3 is done a moment before the cloud has read its Finished."""
    assert topo.cloud is not None
    port = _port(local)

    def matches(c: dict[str, Any]) -> bool:
        return (c["host"] == host and _port(c["peer"]) == port
                and (not handshake or c["handshake_done"] is not None))

    stats = topo.cloud.wait_for(lambda s: any(matches(c) for c in s["tcp"]), timeout_s=timeout_s)
    return max((c for c in stats["tcp"] if matches(c)), key=lambda c: c["id"])


def cloud_conn_since(topo: Topology, host: str, since: float, timeout_s: float = 5.0,
                     handshake: bool = False) -> dict[str, Any]:
    """The cloud's newest connection for `host` opened at or after `since`: through the relay
    the cloud sees the router's upstream socket, whose port is not the speaker's."""
    assert topo.cloud is not None

    def matches(c: dict[str, Any]) -> bool:
        return (c["host"] == host and c["opened"] >= since
                and (not handshake or c["handshake_done"] is not None))

    stats = topo.cloud.wait_for(lambda s: any(matches(c) for c in s["tcp"]), timeout_s=timeout_s)
    return max((c for c in stats["tcp"] if matches(c)), key=lambda c: c["id"])


def cloud_conn_by_id(topo: Topology, conn_id: int) -> dict[str, Any]:
    assert topo.cloud is not None
    return next(c for c in topo.cloud.stats(timeline=True)["tcp"] if c["id"] == conn_id)


def udp_flow(topo: Topology, local: str, host: str) -> dict[str, Any] | None:
    assert topo.cloud is not None
    port = _port(local)
    flows = [f for f in topo.cloud.stats()["udp"] if f["host"] == host and _port(f["peer"]) == port]
    return max(flows, key=lambda f: f["id"]) if flows else None


# --- measurements ---------------------------------------------------------------------------------


def record(test: str, **values: Any) -> None:
    """Print a measurement (pytest -s shows it) and append it as a JSON line to
    artifacts/e2e-guard-live.jsonl (gitignored)."""
    entry = {"test": test, "time": round(time.time(), 3), **values}
    print(f"\n[measure] {json.dumps(entry)}")
    try:
        ARTIFACTS.mkdir(exist_ok=True)
        with (ARTIFACTS / "e2e-guard-live.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
    except OSError as exc:
        print(f"[measure] cannot write artifacts: {exc}")


# What the `guards` fixture (tests/e2e/conftest.py) hands a test: start a guard with
# `make(devices=None, **config)`; every guard started is stopped when the test ends.
MakeGuard = Callable[..., Guard]


def cloud_bytes_stay(
    topology: Topology, conn_id: int, expected: int, duration_s: float, what: str
) -> None:
    """The cloud's app bytes on `conn_id` stay `expected` for `duration_s` (sampled)."""
    end = time.monotonic() + duration_s
    for _ in range(int(duration_s / 0.05) + 2):
        got = cloud_conn_by_id(topology, conn_id)["app_bytes"]
        assert got == expected, f"{what}: the cloud received {got - expected} bytes while held"
        if time.monotonic() >= end:
            return
        time.sleep(0.05)
