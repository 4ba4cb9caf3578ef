"""`hushgate doctor`: is the guard really in the packet path, and does it fail the way it says?

Rules of this module: it only looks (every command goes through a `Runner`, every file read
through `read_file`, the control socket through `socket_reachable`), so each check is unit-tested
with canned `iptables-save`/`nft` output; it never changes a rule. Each check says what it saw in
one line and, when something is wrong, one command or setting that fixes it.

Checks, in order: config (valid, and what the kernel rules need on top), rules (our jumps at
position 1 of their built-in chains, nothing missing, duplicated or foreign in our chains), offload
(fw4 flowtables or uci flow_offloading move established flows past every queue), ipv6 (a device
known only by IPv4 address cannot have its IPv6 matched), listener (the control socket answers and
a process is bound to every configured queue), fail_mode (the safety net in the kernel is the one
the config asks for).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from guard.core.config import ConfigError, GuardConfig, load_config
from guard.core.policy import Mode
from guard.shell import firewall
from guard.shell.firewall import (
    FirewallError,
    FirewallSpec,
    IptablesBackend,
    NftablesBackend,
    Runner,
)
from guard.shell.nfqueue import NFQUEUE_PROC, parse_nfqueue_proc

__all__ = [
    "Check",
    "NFQUEUE_PROC",
    "diagnose",
    "diagnose_file",
    "exit_code",
    "format_report",
    "parse_nfqueue_proc",
    "ping_socket",
]

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True, slots=True)
class Check:
    """One finding. `severity` is "ok", "warn" or "fail"; `ok` is False only for "fail";
    `fix` is the one thing to do about it (empty when there is nothing to do)."""

    name: str
    ok: bool
    severity: str
    message: str
    fix: str = ""

    @classmethod
    def good(cls, name: str, message: str) -> Check:
        return cls(name, True, OK, message)

    @classmethod
    def warn(cls, name: str, message: str, fix: str) -> Check:
        return cls(name, True, WARN, message, fix)

    @classmethod
    def fail(cls, name: str, message: str, fix: str) -> Check:
        return cls(name, False, FAIL, message, fix)


def ping_socket(path: str) -> bool:
    """True when a guard answers `ping` on the control socket within 2 s."""
    from guard.shell.control import ControlError, request

    try:
        return request(path, {"cmd": "ping"}, timeout_s=2.0) == "pong"
    except (ControlError, OSError, ValueError):
        return False


def daemon_status(path: str) -> dict | None:
    """The running guard's `status`, or None when none answers."""
    from guard.shell.control import ControlError, request

    try:
        status = request(path, {"cmd": "status"}, timeout_s=2.0)
    except (ControlError, OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def _check_quic(config: GuardConfig, status: dict | None) -> Check:
    """A device whose QUIC is refused and that never falls back to TCP has no voice service."""
    if not any(config.quic_for(d) == "block" for d in config.devices):
        return Check.good("quic", "QUIC is held by packet for every device (quic = \"hold\")")
    if status is None:
        return Check.good("quic", "QUIC is refused; whether speakers fall back to TCP is known "
                        "while the guard runs")
    stuck = [d.get("name") for d in status.get("devices", [])
             if isinstance(d, dict) and d.get("quic_no_tcp_fallback")]
    if stuck:
        names = ", ".join(str(n) for n in stuck)
        return Check.warn("quic", f"{names} keep(s) trying QUIC and open(s) no TCP instead: no "
                          "voice service while QUIC is refused",
                          "set quic = \"hold\" in that [[device]] to hold its QUIC uploads by "
                          "packet")
    return Check.good("quic", "QUIC is refused; every speaker that tried it fell back to TCP")


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


# --------------------------------------------------------------------------- helpers


def _apply_cmd(config_path: str | None) -> str:
    return f"hushgate firewall apply --config {config_path or 'FILE'}"


def _restart_cmd() -> str:
    return "systemctl restart hushgate (OpenWrt: /etc/init.d/hushgate restart)"


def _rules_fix(apply_fix: str, persistent: bool, queue: bool) -> str:
    """Queue rules are `run`'s own (`firewall apply` installs only the persistent ones): a
    running guard that lost them gets them back by a restart."""
    if queue and not persistent:
        return f"{_restart_cmd()}: the queue rules are the guard's own; it reinstalls them"
    if queue:
        return f"{apply_fix}, then {_restart_cmd()} (it reinstalls its queue rules)"
    return apply_fix


def _start_cmd() -> str:
    return "systemctl start hushgate (OpenWrt: /etc/init.d/hushgate start)"


def _spec(config: GuardConfig) -> FirewallSpec:
    from guard.shell.fwspec import spec_from_config

    return spec_from_config(config)


def _families(families: tuple[int, ...] | None) -> tuple[int, ...]:
    if families is not None:
        return families
    from guard.shell.fwspec import ip_families

    return ip_families()


def _problems(status: dict[str, Any]) -> int:
    count = 0
    for fam in status["families"].values():
        count += sum(1 for r in fam["rules"] if not r["present"] and not r["dynamic"])
        count += len(fam["unexpected"])
    return count


# --------------------------------------------------------------------------- checks


def _check_config(config: GuardConfig, spec: FirewallSpec | None, error: str | None) -> Check:
    if error is not None:
        fix = (
            "give guard.mark_mask at least 3 bits (allow, block, device), e.g. 0x00ff0000"
            if "mark_mask" in error else "fix the config, then re-run"
        )
        return Check.fail("config", error, fix)
    assert spec is not None
    inspected = [d for d in config.devices if d.mode is not Mode.OFF]
    queue = (
        f"{config.queue}" if config.queue_count == 1
        else f"{config.queue}-{config.queue + config.queue_count - 1}"
    )
    message = (
        f"{len(inspected)} device(s) inspected, queue {queue}, fail {config.fail}, "
        f"backend {config.backend}"
    )
    if not inspected:
        return Check.warn(
            "config", message + ": nothing is guarded",
            "add [[device]] tables (see `hushgate devices discover`)",
        )
    return Check.good("config", message)


def _status_for(
    config: GuardConfig, run: Runner, families: tuple[int, ...]
) -> tuple[IptablesBackend, dict[str, Any]]:
    """Status against the spec as `run` installs it and as `firewall apply` does (MACs filled in
    from the neighbour table): whichever explains the kernel's rules better."""
    spec = _spec(config)
    candidates = [spec]
    try:
        with_macs = firewall.with_neighbour_macs(spec, run)
        if with_macs != spec:
            candidates.append(with_macs)
    except (OSError, ValueError):
        pass
    best: tuple[IptablesBackend, dict[str, Any]] | None = None
    for candidate in candidates:
        backend = IptablesBackend(candidate, run, families=families)
        status = backend.status()
        if best is None or _problems(status) < _problems(best[1]):
            best = (backend, status)
    assert best is not None
    return best


def _check_rules_iptables(
    status: dict[str, Any], config_path: str | None, guard_running: bool
) -> Check:
    fix = _apply_cmd(config_path)
    problems: list[str] = []
    queue_missing: list[str] = []
    warnings: list[str] = []
    for fam_name, fam in status["families"].items():
        v = fam_name.replace("ipv", "v")
        for where, hook in fam["hooks"].items():
            positions = hook["positions"]
            if not positions:
                problems.append(f"{v} {where}: no jump to {hook['chain']}")
            elif len(positions) > 1:
                problems.append(
                    f"{v} {where}: {len(positions)} jumps to {hook['chain']} "
                    f"(positions {', '.join(map(str, positions))})"
                )
            elif positions != [1]:
                problems.append(
                    f"{v} {where}: {hook['chain']} at position {positions[0]}, not 1 "
                    f"({positions[0] - 1} rule(s) above it see the packets first)"
                )
        missing = [r for r in fam["rules"] if not r["present"] and not r["dynamic"]]
        if missing:
            problems.append(
                f"{v}: {len(missing)} persistent rule(s) missing (e.g. {missing[0]['label']})"
            )
        dups = [r for r in fam["rules"] if r["duplicates"]]
        if dups:
            warnings.append(f"{v}: {len(dups)} rule(s) duplicated (e.g. {dups[0]['label']})")
        if fam["unexpected"]:
            warnings.append(
                f"{v}: {len(fam['unexpected'])} rule(s) in our chains not from this config"
            )
        dyn = [r for r in fam["rules"] if r["dynamic"]]
        if guard_running and dyn and not all(r["present"] for r in dyn):
            queue_missing.append(f"{v}: the running guard's queue rules are missing")
    if problems or queue_missing:
        return Check.fail("rules", "; ".join(problems + queue_missing),
                          _rules_fix(fix, bool(problems), bool(queue_missing)))
    if warnings:
        return Check.warn("rules", "; ".join(warnings), fix + " (refills our chains)")
    state = "queue rules installed" if status["dynamic"] else "no queue rules (guard stopped)"
    return Check.good(
        "rules", f"{status['backend']}: our jumps first in every hook, safety net complete, {state}"
    )


_NFT_CHAINS = ("forward", "up", "down", "reject_blocked", "queue_up", "queue_down", "dns",
               "safety_net", "input", "output", "postrouting")


def _nft_chains(listing: str) -> dict[str, list[str]]:
    chains: dict[str, list[str]] = {}
    current: str | None = None
    for raw in listing.splitlines():
        line = raw.strip()
        m = re.match(r"^chain (\S+) \{$", line)
        if m:
            current = m.group(1)
            chains[current] = []
        elif line == "}":
            current = None
        elif current is not None and line:
            chains[current].append(line)
    return chains


def _nft_state(config: GuardConfig, run: Runner) -> tuple[dict[str, list[str]] | None, str]:
    spec = _spec(config)
    res = run(["nft", "list", "table", "inet", spec.tag], None)
    if res.returncode == 127:
        return None, "nft not found"
    if not res.ok:
        return None, f"table inet {spec.tag} is not loaded"
    return _nft_chains(res.stdout), res.stdout


def _check_rules_nft(
    config: GuardConfig, run: Runner, config_path: str | None, guard_running: bool
) -> tuple[Check, str, bool | None]:
    """(the check, the installed fail mode, whether the queue statements bypass)."""
    chains, text = _nft_state(config, run)
    fix = _apply_cmd(config_path)
    if chains is None:
        return Check.fail("rules", text, fix), "none", None
    problems = [f"chain {c} missing" for c in _NFT_CHAINS if c not in chains]
    fwd = chains.get("forward", [])
    if fwd and not any("hook forward priority mangle" in ln or "hook forward priority -150" in ln
                       for ln in fwd):
        problems.append("forward chain is not at priority mangle")
    spec = _spec(config)
    for d in spec.devices:
        for value in (d.mac, d.address, *d.address6):
            if value and value not in text:
                problems.append(f"{d.name}: {value} not in the device sets")
                break
    queue_missing = guard_running and not any("queue" in ln for ln in chains.get("queue_up", []))
    if queue_missing:
        problems.append("the running guard's queue rules are missing")
    net = chains.get("safety_net", [])
    installed = "closed" if any(re.search(r"\bdrop\b", ln) for ln in net) else (
        "open" if net else "none")
    queues = [ln for c in ("queue_up", "queue_down", "dns") for ln in chains.get(c, [])
              if re.search(r"\bqueue\b", ln)]
    bypass = any(re.search(r"\bbypass\b", ln) for ln in queues) if queues else None
    if problems:
        return (Check.fail("rules", "; ".join(problems),
                           _rules_fix(fix, len(problems) > int(queue_missing), queue_missing)),
                installed, bypass)
    state = "queue rules installed" if queues else "no queue rules (guard stopped)"
    return Check.good("rules", f"nftables: table inet hushgate complete, {state}"), installed, bypass


def _offload_excludes_devices(ruleset: str, device_bit: int) -> tuple[bool, list[str]]:
    """(every flow-offload rule spares connections carrying the device bit, the rules)."""
    rules = [ln.strip() for ln in ruleset.splitlines()
             if re.search(r"\bflow (add|offload) @", ln)]
    bit = re.compile(rf"ct mark (?:&|and) 0x0*{device_bit:x} == (?:0x)?0+\b")
    return all(bit.search(r) for r in rules), rules


def _check_offload(config: GuardConfig, run: Runner) -> Check:
    spec = _spec(config)
    status = NftablesBackend(spec, run).offload_status()
    fix = (
        "exclude configured devices or turn off offloading: uci set "
        "firewall.@defaults[0].flow_offloading=0; uci set firewall.@defaults[0]."
        "flow_offloading_hw=0; uci commit firewall; fw4 reload"
    )
    uci_on = bool(status.get("uci_flow_offloading") or status.get("uci_flow_offloading_hw"))
    if not status["offloading"]:
        return Check.good("offload", "no flow offloading")
    ruleset = run(["nft", "list", "ruleset"], None)
    excluded, rules = (
        _offload_excludes_devices(ruleset.stdout, spec.marks.device) if ruleset.ok else (False, [])
    )
    if not uci_on and rules and excluded:
        return Check.good(
            "offload", f"{len(rules)} offload rule(s), each sparing configured devices"
        )
    where = ", ".join(status["flowtables"]) or "uci firewall defaults"
    return Check.fail(
        "offload",
        f"flow offloading is on ({where}): configured devices' established flows bypass the queue",
        fix,
    )


def _relay_listening(port: int, read_file: Callable[[str], str | None]) -> bool:
    """A TCP socket in LISTEN (state 0A) on `port`, in /proc/net/tcp or tcp6."""
    want = f":{port:04X}"
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in (read_file(path) or "").splitlines()[1:]:
            parts = line.split()
            if len(parts) > 3 and parts[1].endswith(want) and parts[3] == "0A":
                return True
    return False


def _check_relay(config: GuardConfig, spec: FirewallSpec, run: Runner, families: tuple[int, ...],
                 socket_up: bool, read_file: Callable[[str], str | None]) -> Check:
    """The stream hold (design.md 5a.1): the policy route TPROXY needs, and, while the guard
    runs, its transparent listener. Without the route, intercepted packets are routed on and
    FORWARD resets them (closed, but nothing works); without the listener TPROXY drops."""
    from guard.shell.firewall import IptablesBackend

    try:
        routing = IptablesBackend(spec, run, families=families).relay_routing_status()
    except (OSError, FirewallError) as exc:
        return Check.fail("relay", f"cannot read the relay's policy routing: {exc}",
                          "run as root; install iproute2")
    missing = [fam for fam, ok in routing.items() if not ok]
    rule = (f"ip rule add fwmark {spec.tproxy_mark:#x}/{spec.tproxy_mark:#x} lookup "
            f"{spec.relay_table} priority {spec.relay_priority}; ip route replace local "
            f"default dev lo table {spec.relay_table}")
    if missing and (socket_up or not spec.fail_open):
        return Check.fail("relay", f"the relay's policy route is missing ({', '.join(missing)}): "
                          "relayed devices' TCP is reset instead of relayed",
                          f"restart the guard or `hushgate firewall apply`; by hand: {rule}")
    if socket_up and not _relay_listening(config.relay_port, read_file):
        return Check.fail("relay", f"no listener on the relay port {config.relay_port}: "
                          "relayed devices' TCP goes nowhere", "restart the guard")
    marked = _mark_routing(run, families, spec)
    unmarked = [d.name for d in config.devices
                if d.name in spec.relay_devices and d.route_mark is None]
    if marked and unmarked:
        return Check.warn(
            "relay", f"this router routes by mark ({marked[0]}); the relay's upstream leg is the "
            f"router's own traffic and does not carry a device's packet marks, so "
            f"{', '.join(unmarked)} may leave by the main route (a VPN or kill switch by mark "
            "does not apply to them)",
            "set route_mark = <the mark your policy gives the device> in its [[device]] table "
            "(design.md 5a.2), or leave such devices unguarded")
    return Check.good("relay", f"TCP of {len(spec.relay_devices)} device(s) relayed on port "
                      f"{config.relay_port} (policy route table {spec.relay_table})")


def _mark_routing(run: Runner, families: tuple[int, ...], spec: FirewallSpec) -> list[str]:
    """`ip rule` lines that route by fwmark, other than the relay's own."""
    found = []
    for family in families:
        res = run(["ip", f"-{family}", "rule", "show"], None)
        if not res.ok:
            continue
        for line in res.stdout.splitlines():
            if "fwmark" in line and f"lookup {spec.relay_table}" not in line:
                found.append(" ".join(line.split()))
    return found


def _check_ipv6(config: GuardConfig) -> Check:
    blind = [
        d.name for d in config.devices
        if d.mode is not Mode.OFF and d.mac is None and not d.address6
        and d.address is not None and ":" not in d.address
    ]
    if blind:
        names = ", ".join(blind[:4]) + (f" and {len(blind) - 4} more" if len(blind) > 4 else "")
        return Check.warn(
            "ipv6",
            f"{names}: IPv4 address and no MAC, so their IPv6 cannot be matched",
            "set mac for them (see `hushgate devices discover`), or list address6",
        )
    return Check.good("ipv6", "every device is matched by MAC or by its IPv6 addresses")


def _check_listener(
    config: GuardConfig,
    socket_up: bool,
    read_file: Callable[[str], str | None],
) -> Check:
    wanted = list(range(config.queue, config.queue + config.queue_count))
    text = read_file(NFQUEUE_PROC)
    bindings = parse_nfqueue_proc(text) if text is not None else {}
    bound = [q for q in wanted if q in bindings]
    unbound = [q for q in wanted if q not in bindings]
    dropped = sum(b.queue_dropped + b.user_dropped for q, b in bindings.items() if q in wanted)
    listed = f"queue {', '.join(map(str, wanted))}"
    if text is None:
        binding = f"{NFQUEUE_PROC} unreadable"
    elif not unbound:
        ports = ", ".join(str(bindings[q].portid) for q in wanted)
        binding = f"{listed} bound (portid {ports})"
    elif bound:
        binding = f"queue {', '.join(map(str, unbound))} not bound"
    else:
        binding = f"no process bound to {listed}"
    if socket_up and text is not None and unbound:
        return Check.fail(
            "listener", f"control socket answers but {binding}",
            "restart the guard (systemctl restart hushgate / /etc/init.d/hushgate restart)",
        )
    if not socket_up:
        if bound:
            return Check.fail(
                "listener",
                f"{config.socket} does not answer, yet {binding}: another program holds the "
                "queue",
                "stop the other NFQUEUE listener or give hushgate another guard.queue",
            )
        closed = (
            "fail-closed: configured devices' traffic is dropped" if not config.fail_open
            else "fail-open: configured devices' traffic passes unguarded"
        )
        return Check.fail("listener", f"no guard answers on {config.socket}; {closed}",
                          _start_cmd())
    if dropped:
        return Check.warn(
            "listener", f"{binding}; the kernel dropped {dropped} packet(s): queue was full",
            "lower max_held_packets_total or spread flows: guard.queue = \"7-8\"",
        )
    return Check.good("listener", f"guard answers on {config.socket}; {binding}")


def _check_capabilities(
    config: GuardConfig, guard_pid: int | None, read_file: Callable[[str], str | None]
) -> Check:
    """What the running guard (the lock's holder), or a `run` started from here, lacks of
    CAP_NET_ADMIN and CAP_NET_RAW: without them the rules, the queue, the relay or the resets
    fail (`run` refuses to start fail-closed)."""
    from guard.shell.daemon import CAPABILITIES

    whose = f"the running guard (pid {guard_pid})" if guard_pid is not None else "this shell"
    text = read_file(f"/proc/{guard_pid if guard_pid is not None else 'self'}/status")
    caps = None
    for line in (text or "").splitlines():
        if line.startswith("CapEff:"):
            try:
                caps = int(line.split()[1], 16)
            except (IndexError, ValueError):
                caps = None
    if caps is None:
        return Check.good("capabilities", f"not checked: cannot read {whose}'s capabilities")
    missing = [f"{name} ({why})" for bit, (name, why) in CAPABILITIES.items()
               if not caps & (1 << bit)]
    if not missing:
        return Check.good("capabilities", f"{whose} has CAP_NET_ADMIN and CAP_NET_RAW")
    fix = ("run the guard as root with CAP_NET_ADMIN and CAP_NET_RAW (the systemd unit's "
           "CapabilityBoundingSet and the OpenWrt jail's capability file grant exactly these)")
    if guard_pid is None:
        return Check.warn("capabilities", f"{whose} lacks {'; '.join(missing)}: `hushgate run` "
                          "from here refuses to start", fix)
    return Check.fail("capabilities", f"{whose} lacks {'; '.join(missing)}", fix)


def probe_bind(listen: str) -> str | None:
    """None when a TCP socket can be bound on "addr:port", else why not (one line)."""
    import socket

    from guard.shell.metrics import parse_listen

    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        return str(exc)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _check_listen(
    config: GuardConfig, socket_up: bool, probe: Callable[[str], str | None]
) -> Check:
    """The metrics and web addresses can be listened on (only probed while no guard runs: a
    running guard holds them itself)."""
    wanted = [(what, addr) for what, addr in (("metrics.listen", config.metrics_listen),
                                              ("web.listen", config.web_listen)) if addr]
    if not wanted:
        return Check.good("listen", "no metrics or web listener configured")
    listed = ", ".join(f"{what} {addr}" for what, addr in wanted)
    if socket_up:
        return Check.good("listen", f"{listed} (held by the running guard)")
    failures = [f"{what} {addr}: {why}" for what, addr in wanted
                if (why := probe(addr)) is not None]
    if failures:
        return Check.fail("listen", "cannot listen on " + "; ".join(failures) + ": `run` "
                          "refuses to start", "give an address of this router's LAN interface "
                          "and a free port (ss -ltnp shows who holds it), or \"\" for metrics")
    return Check.good("listen", f"{listed} can be listened on")


def _check_fail_mode(
    config: GuardConfig, installed: str, queue_bypass: bool | None, config_path: str | None
) -> Check:
    fix = _apply_cmd(config_path)
    if installed == "none":
        if config.fail_open:
            return Check.warn("fail_mode", "no safety net installed (config says open)", fix)
        return Check.fail(
            "fail_mode",
            "no safety net installed: with no guard listening, devices are not held back",
            fix,
        )
    if installed == "mixed":
        return Check.fail("fail_mode", "IPv4 and IPv6 safety nets disagree", fix)
    if installed != config.fail:
        return Check.fail(
            "fail_mode", f"fail-{installed} in force, but the config says {config.fail}", fix
        )
    if queue_bypass and not config.fail_open:
        return Check.fail(
            "fail_mode", "queue rules carry --queue-bypass (fail-open) but the config says closed",
            "restart the guard so it reinstalls its queue rules",
        )
    return Check.good("fail_mode", f"fail-{installed} in force, as configured")


# --------------------------------------------------------------------------- entry points


def _check_mqtt(config: GuardConfig, status: dict | None) -> Check:
    """[mqtt] (Home Assistant): paho-mqtt installed, and the broker reached while the guard runs."""
    from guard.shell.mqtt import paho_missing

    assert config.mqtt is not None
    missing = paho_missing()
    if missing is not None:
        return Check.warn("mqtt", missing, "pip install 'hushgate[mqtt]' (or apt install "
                          "python3-paho-mqtt), then restart the guard")
    broker = f"{config.mqtt.host}:{config.mqtt.port}"
    mqtt = status.get("mqtt") if isinstance(status, dict) else None
    if not isinstance(mqtt, dict):
        return Check.good("mqtt", f"paho-mqtt is installed; the broker {broker} is checked "
                          "while the guard runs")
    if mqtt.get("connected"):
        return Check.good("mqtt", f"connected to the broker {broker}")
    return Check.warn("mqtt", f"the broker {broker} has been unreachable for "
                      f"{mqtt.get('down_s', 0):.0f} s (uploads are still held: answer them on "
                      "the web page or the CLI)",
                      "check [mqtt] host, port, credentials and ca_file, and that the broker runs")


def diagnose(
    config: GuardConfig,
    *,
    run: Runner = firewall.run_command,
    socket_reachable: Callable[[str], bool] = ping_socket,
    read_file: Callable[[str], str | None] = _read_text,
    families: tuple[int, ...] | None = None,
    config_path: str | None = None,
    status_of: Callable[[str], dict | None] = daemon_status,
    guard_pid: Callable[[GuardConfig], int | None] | None = None,
    probe: Callable[[str], str | None] = probe_bind,
) -> list[Check]:
    """Every check, in a fixed order. `families` defaults to what the kernel has (IPv6 or not);
    `config_path` only makes the suggested commands exact."""
    checks: list[Check] = []
    spec: FirewallSpec | None = None
    error = None
    try:
        spec = _spec(config)
    except ValueError as exc:
        error = f"the firewall rules cannot be built: {exc}"
    checks.append(_check_config(config, spec, error))
    if spec is None:
        return checks
    socket_up = socket_reachable(config.socket)
    installed = "none"
    queue_bypass: bool | None = None
    if config.backend == "nftables":
        rules_check, installed, queue_bypass = _check_rules_nft(
            config, run, config_path, socket_up)
        checks.append(rules_check)
    else:
        try:
            _, status = _status_for(config, run, _families(families))
        except FirewallError as exc:
            checks.append(Check.fail("rules", f"cannot read the rules: {exc}",
                                     "run as root; install iptables"))
            status = None
        if status is not None:
            checks.append(_check_rules_iptables(status, config_path, socket_up))
            installed = status["installed_fail_mode"]
            # What the kernel has in our chains: the expected queue rules and any other.
            queue_rules = [
                r["rule"] for fam in status["families"].values() for r in fam["rules"]
                if r["dynamic"] and r["present"] and "NFQUEUE" in r["rule"]
            ] + [
                line for fam in status["families"].values() for line in fam["unexpected"]
                if "NFQUEUE" in line
            ]
            if queue_rules:
                queue_bypass = any("--queue-bypass" in line for line in queue_rules)
    checks.append(_check_offload(config, run))
    if spec.relay:
        checks.append(_check_relay(config, spec, run, _families(families), socket_up, read_file))
    checks.append(_check_ipv6(config))
    checks.append(_check_quic(config, status_of(config.socket) if socket_up else None))
    checks.append(_check_listener(config, socket_up, read_file))
    if guard_pid is None:
        from guard.shell.daemon import running_guard as guard_pid
    pid = guard_pid(config)
    checks.append(_check_capabilities(config, pid, read_file))
    checks.append(_check_listen(config, socket_up, probe))
    checks.append(_check_fail_mode(config, installed, queue_bypass, config_path))
    if config.mqtt is not None:
        checks.append(_check_mqtt(config, status_of(config.socket) if socket_up else None))
    return checks


def diagnose_file(
    path: str,
    *,
    run: Runner = firewall.run_command,
    socket_reachable: Callable[[str], bool] = ping_socket,
    read_file: Callable[[str], str | None] = _read_text,
    families: tuple[int, ...] | None = None,
) -> list[Check]:
    """`hushgate doctor --config FILE`: a config that does not load is the one failing check."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return [Check.fail("config", str(exc), f"fix {path}, then re-run")]
    return diagnose(config, run=run, socket_reachable=socket_reachable, read_file=read_file,
                    families=families, config_path=path)


def exit_code(checks: Sequence[Check]) -> int:
    """0 when nothing failed (warnings allowed), else 1."""
    return 0 if all(c.ok for c in checks) else 1


_LABEL = {OK: "ok", WARN: "warn", FAIL: "FAIL"}


def _wrap(text: str, first: str, indent: str, width: int, max_lines: int) -> list[str]:
    """`text` after `first`, wrapped at `width` under `indent`, at most `max_lines` lines."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    lines = textwrap.wrap(text, width=width, initial_indent=first, subsequent_indent=indent,
                          break_on_hyphens=False) or [first.rstrip()]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1].rstrip() + "…"
    return lines


def format_report(checks: Sequence[Check], width: int = 100) -> str:
    """One screen: a summary line, each check on one line (two when long), and under every
    warning or failure a `fix:` line saying what to do."""
    fails = sum(1 for c in checks if c.severity == FAIL)
    warns = sum(1 for c in checks if c.severity == WARN)
    if fails:
        head = f"hushgate doctor: {fails} problem(s), {warns} warning(s)"
    elif warns:
        head = f"hushgate doctor: no problems, {warns} warning(s)"
    else:
        head = "hushgate doctor: all good"
    lines = [head]
    name_w = max((len(c.name) for c in checks), default=0)
    for c in checks:
        prefix = f"  {_LABEL.get(c.severity, c.severity):<4}  {c.name:<{name_w}}  "
        indent = " " * len(prefix)
        lines += _wrap(c.message, prefix, indent, width, 2)
        if c.severity != OK and c.fix:
            lines += _wrap("fix: " + c.fix, indent, indent + "     ", width, 2)
    return "\n".join(lines) + "\n"
