"""guard.tools.doctor: each check passing and failing on canned iptables-save / nft / proc output, and
once against a real kernel in a throw-away network namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest

from guard.core.config import DeviceConfig, GuardConfig
from guard.core.policy import Mode
from guard.shell.firewall import (
    Completed,
    FirewallSpec,
    IptablesBackend,
    NftablesBackend,
    build_rules,
    netns_runner,
)
from guard.shell.fwspec import spec_from_config
from guard.tools.doctor import (
    NFQUEUE_PROC,
    Check,
    diagnose,
    diagnose_file,
    exit_code,
    format_report,
    parse_nfqueue_proc,
)
from tests.ci import need_root

ECHO = DeviceConfig("kitchen-echo", address="198.18.10.10", mac="02:00:5e:10:00:10")
NEST = DeviceConfig("nest", mac="02:00:5e:10:00:11", address6=("2001:2:0:10::11",))
LAMP = DeviceConfig("lamp", address="198.18.10.30")
# The packet hold: these checks were written for it (the relay's check has its own tests).
CONFIG = GuardConfig(devices=(ECHO, NEST), socket="/run/hg-test/control.sock", tcp_hold="packet")

# /proc/net/netfilter/nfnetlink_queue as the kernel prints it (queue, portid, waiting, copy mode,
# copy range, queue dropped, user dropped, id sequence, 1): queue 7 bound by portid 27203.
PROC_BOUND = "    7  27203     0 2  4016     0     0        0  1\n"
PROC_DROPS = "    7  27203     3 2  4016    12     2      905  1\n"
PROC_OTHER = "    9   4411     0 2  4016     0     0        0  1\n"


# --------------------------------------------------------------------------- canned kernel


def saved(spec: FirewallSpec, family: int, *, dynamic: bool = True,
          edit: Callable[[list[str]], list[str]] | None = None) -> str:
    """`iptables-save -c` text of a kernel holding exactly the spec's rules (hooks at position
    1), optionally edited line by line."""
    rules = [r for r in build_rules(spec, family) if dynamic or not r.dynamic]
    backend = IptablesBackend(spec, lambda argv, i=None: Completed(tuple(argv), 0))
    builtin = {"filter": ("INPUT", "FORWARD", "OUTPUT"),
               "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")}
    lines: list[str] = []
    for table in ("filter", "mangle"):
        lines.append(f"*{table}")
        lines += [f":{c} ACCEPT [0:0]" for c in builtin[table]]
        ours = [c for t, c in backend.chains.persistent() + backend.chains.dynamic() if t == table]
        lines += [f":{c} - [0:0]" for c in ours]
        lines += [f"[0:0] -A {hook} -j {chain}" for t, hook, chain in backend.chains.hooks()
                  if t == table]
        lines += [f"[5:300] {r.line}" for r in rules if r.table == table]
        lines.append("COMMIT")
    if edit is not None:
        lines = edit(lines)
    return "\n".join(lines) + "\n"


NFT_TABLE = """table inet hushgate {
	set dev_mac {
		type ether_addr
		elements = { 02:00:5e:10:00:10, 02:00:5e:10:00:11 }
	}

	set dev_v4 {
		type ipv4_addr
		elements = { 198.18.10.10 }
	}

	set dev_v6 {
		type ipv6_addr
		elements = { 2001:2:0:10::11 }
	}

	chain forward {
		type filter hook forward priority mangle; policy accept;
		ether saddr @dev_mac goto up
		ip saddr @dev_v4 goto up
		ip6 saddr @dev_v6 goto up
		ip daddr @dev_v4 goto down
		ip6 daddr @dev_v6 goto down
		ct mark & 0x00040000 == 0x00040000 goto down
	}

	chain up {
		ct mark & 0x00040000 == 0x00000000 ct mark set ct mark | 0x00040000
		ct mark & 0x00030000 == 0x00010000 counter packets 0 bytes 0 accept
		ct mark & 0x00030000 == 0x00020000 goto reject_blocked
		jump queue_up
		jump safety_net
	}

	chain down {
		ct mark & 0x00030000 == 0x00010000 counter packets 0 bytes 0 accept
		ct state != { established, related } return
		udp sport 53 jump dns
		jump queue_down
		jump safety_net
	}

	chain reject_blocked {
		meta l4proto tcp counter packets 0 bytes 0 reject with tcp reset
		counter packets 0 bytes 0 drop
	}

	chain queue_up {
		queue to 7
	}

	chain queue_down {
		counter packets 0 bytes 0 accept
	}

	chain dns {
		queue to 7
	}

	chain safety_net {
		counter packets 0 bytes 0 drop comment "hushgate safety net: fail-closed"
	}

	chain input {
		type filter hook input priority mangle; policy accept;
	}

	chain output {
		type filter hook output priority mangle; policy accept;
	}

	chain postrouting {
		type filter hook postrouting priority mangle; policy accept;
	}
}
"""

# fw4's offload rule (firewall4 templates/ruleset.uc) and its flowtable, as nft lists them.
FW4_FLOWTABLE = """table inet fw4 {
	flowtable ft {
		hook ingress priority filter
		devices = { eth0, lan1, lan2 }
	}
}
"""
FW4_OFFLOAD_RULESET = """table inet fw4 {
	chain forward {
		type filter hook forward priority filter; policy drop;
		meta l4proto { tcp, udp } flow add @ft
		ct state established,related accept comment "!fw4: Allow forwarded established and related flows"
	}
}
"""
EXCLUDING_RULESET = """table inet offload_others {
	chain forward {
		type filter hook forward priority filter + 1; policy accept;
		ct mark & 0x00040000 == 0x00000000 meta l4proto { tcp, udp } flow add @ft
	}
}
"""


@dataclass
class Kernel:
    """A fake Runner: canned answers by command, every call recorded."""

    v4: str = ""
    v6: str = ""
    nft_table: str | None = None  # None: no table inet hushgate
    flowtables: str = ""
    ruleset: str = ""
    uci: dict[str, str] = field(default_factory=dict)  # option -> value; empty: no uci (Debian)
    has_nft: bool = True
    save_fails: bool = False
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], input: str | None = None) -> Completed:
        argv = tuple(argv)
        self.calls.append(argv)
        if argv[0] in ("iptables-save", "ip6tables-save"):
            if self.save_fails:
                return Completed(argv, 4, "", "iptables-save: Permission denied (you must be root)")
            return Completed(argv, 0, self.v4 if argv[0] == "iptables-save" else self.v6)
        if argv[-1] == "--version":
            return Completed(argv, 0, "iptables v1.8.9 (nf_tables)\n")
        if argv[:2] == ("ip", "-4"):
            return Completed(argv, 0, "")
        if argv[0] == "nft":
            if not self.has_nft:
                return Completed(argv, 127, "", "nft: not found")
            if argv[1:3] == ("list", "table"):
                if self.nft_table is None:
                    return Completed(argv, 1, "", "Error: No such file or directory")
                return Completed(argv, 0, self.nft_table)
            if argv[1:] == ("list", "flowtables"):
                return Completed(argv, 0, self.flowtables)
            if argv[1:] == ("list", "ruleset"):
                return Completed(argv, 0, self.ruleset)
        if argv[0] == "uci":
            if not self.uci:
                return Completed(argv, 127, "", "uci: not found")
            key = argv[-1].rsplit(".", 1)[-1]
            if key in self.uci:
                return Completed(argv, 0, self.uci[key] + "\n")
            return Completed(argv, 1, "")
        return Completed(argv, 0, "")


def healthy(config: GuardConfig = CONFIG, *, dynamic: bool = True, **kw) -> Kernel:
    spec = spec_from_config(config)
    return Kernel(v4=saved(spec, 4, dynamic=dynamic), v6=saved(spec, 6, dynamic=dynamic), **kw)


def run_doctor(config: GuardConfig = CONFIG, kernel: Kernel | None = None, *,
               socket_up: bool = True, proc: str | None = PROC_BOUND) -> dict[str, Check]:
    checks = diagnose(
        config,
        run=kernel or healthy(config),
        socket_reachable=lambda path: socket_up,
        read_file=lambda path: proc if path == NFQUEUE_PROC else None,
        families=(4, 6),
        config_path="/etc/hushgate/hushgate.toml",
    )
    assert [c.name for c in checks][:1] == ["config"]
    return {c.name: c for c in checks}


def insert_before_jump(table: str, hook: str, rule: str) -> Callable[[list[str]], list[str]]:
    def edit(lines: list[str]) -> list[str]:
        out, current = [], None
        for line in lines:
            if line.startswith("*"):
                current = line[1:]
            if current == table and line.startswith(f"[0:0] -A {hook} -j HUSHGATE"):
                out.append(f"[9:900] -A {hook} {rule}")
            out.append(line)
        return out
    return edit


def drop_lines(needle: str) -> Callable[[list[str]], list[str]]:
    return lambda lines: [ln for ln in lines if needle not in ln]


def add_after(needle: str, extra: str) -> Callable[[list[str]], list[str]]:
    def edit(lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            out.append(line)
            if needle in line:
                out.append(extra)
        return out
    return edit


# --------------------------------------------------------------------------- all good


def test_a_healthy_guard_passes_every_check():
    checks = run_doctor()
    assert [c.name for c in checks.values()] == [
        "config", "rules", "offload", "ipv6", "quic", "listener", "capabilities", "listen",
        "fail_mode"]
    assert all(c.severity == "ok" and c.ok for c in checks.values()), checks
    assert exit_code(list(checks.values())) == 0
    assert "portid 27203" in checks["listener"].message


# --------------------------------------------------------------------------- config


def test_config_without_devices_is_a_warning():
    check = run_doctor(GuardConfig(socket=CONFIG.socket))["config"]
    assert (check.severity, check.ok) == ("warn", True)
    assert "nothing is guarded" in check.message and "discover" in check.fix


def test_config_whose_mark_mask_cannot_hold_three_verdict_bits_fails_alone():
    checks = run_doctor(replace(CONFIG, mark_mask=0x3), Kernel())
    assert list(checks) == ["config"]
    assert checks["config"].severity == "fail"
    assert "mark_mask" in checks["config"].fix


def test_a_config_file_that_does_not_load_is_one_failing_check(tmp_path):
    path = tmp_path / "hushgate.toml"
    path.write_text("[guard]\nfail = 'ajar'\n")
    (check,) = diagnose_file(str(path), run=Kernel(), socket_reachable=lambda p: False)
    assert check.name == "config" and not check.ok and "guard.fail" in check.message


def test_devices_in_mode_off_are_not_counted():
    config = replace(CONFIG, devices=(ECHO, NEST.with_mode(Mode.OFF)))
    assert "1 device(s) inspected" in run_doctor(config)["config"].message


# --------------------------------------------------------------------------- rules (iptables)


def test_a_rule_above_our_jump_fails_rule_order():
    spec = spec_from_config(CONFIG)
    kernel = healthy()
    kernel.v4 = saved(spec, 4, edit=insert_before_jump("mangle", "FORWARD", "-j ACCEPT"))
    check = run_doctor(kernel=kernel)["rules"]
    assert check.severity == "fail"
    assert "v4 mangle/FORWARD: HUSHGATE at position 2, not 1" in check.message
    assert check.fix == "hushgate firewall apply --config /etc/hushgate/hushgate.toml"


def test_a_missing_jump_in_filter_forward_fails():
    spec = spec_from_config(CONFIG)
    kernel = healthy()
    kernel.v6 = saved(spec, 6, edit=drop_lines("-A FORWARD -j HUSHGATE_REJECT"))
    check = run_doctor(kernel=kernel)["rules"]
    assert check.severity == "fail" and "v6 filter/FORWARD: no jump to HUSHGATE_REJECT" in check.message


def test_a_duplicated_jump_fails():
    spec = spec_from_config(CONFIG)
    kernel = healthy()
    kernel.v4 = saved(spec, 4, edit=add_after("-A FORWARD -j HUSHGATE_REJECT",
                                              "[0:0] -A FORWARD -j HUSHGATE_REJECT"))
    assert "2 jumps to HUSHGATE_REJECT" in run_doctor(kernel=kernel)["rules"].message


def test_a_missing_safety_net_rule_fails_and_shows_in_the_fail_mode():
    spec = spec_from_config(CONFIG)
    kernel = healthy()
    kernel.v4 = saved(spec, 4, edit=drop_lines("-A HUSHGATE_NET"))
    checks = run_doctor(kernel=kernel)
    assert checks["rules"].severity == "fail"
    assert "persistent rule(s) missing (e.g. net.drop)" in checks["rules"].message
    assert checks["fail_mode"].severity == "fail"  # v4 none, v6 closed
    assert "disagree" in checks["fail_mode"].message


def test_foreign_and_duplicated_rules_in_our_chains_are_warnings():
    spec = spec_from_config(CONFIG)
    kernel = healthy()
    kernel.v4 = saved(spec, 4, edit=add_after("-A HUSHGATE_UP -j HUSHGATE_NET",
                                              "[0:0] -A HUSHGATE_UP -j ACCEPT"))
    kernel.v6 = saved(spec, 6, edit=add_after("-A HUSHGATE_UP -j HUSHGATE_NET",
                                              "[0:0] -A HUSHGATE_UP -j HUSHGATE_NET"))
    check = run_doctor(kernel=kernel)["rules"]
    assert (check.severity, check.ok) == ("warn", True)
    assert "not from this config" in check.message and "duplicated" in check.message


def test_a_running_guard_without_its_queue_rules_is_told_to_restart_not_to_apply():
    """`firewall apply` installs only the persistent rules: the queue rules come back with a
    restart of the guard (issue 16: the advice must work when followed)."""
    spec = spec_from_config(CONFIG)
    kernel = Kernel(v4=saved(spec, 4, dynamic=False), v6=saved(spec, 6, dynamic=False))
    check = run_doctor(kernel=kernel)["rules"]
    assert check.severity == "fail" and "queue rules are missing" in check.message
    assert "restart" in check.fix and "firewall apply" not in check.fix


def test_capabilities_of_the_running_guard_and_of_this_shell():
    from guard.tools.doctor import _check_capabilities

    full = "Name:\tpython3\nCapEff:\t000001ffffffffff\n"
    no_raw = "CapEff:\t0000000000001000\n"  # CAP_NET_ADMIN only
    files = {"/proc/4242/status": no_raw, "/proc/self/status": full}
    check = _check_capabilities(CONFIG, 4242, files.get)
    assert check.severity == "fail" and "pid 4242" in check.message
    assert "CAP_NET_RAW" in check.message and "CAP_NET_ADMIN" not in check.message
    assert _check_capabilities(CONFIG, None, files.get).severity == "ok"
    files["/proc/self/status"] = "CapEff:\t0000000000000000\n"
    check = _check_capabilities(CONFIG, None, files.get)
    assert check.severity == "warn" and "refuses to start" in check.message


def test_listen_addresses_that_cannot_be_bound_fail_while_no_guard_runs():
    from guard.tools.doctor import _check_listen

    web = replace(CONFIG, metrics_listen="127.0.0.1:9877", web_listen="198.18.1.1:8787")
    why = {"198.18.1.1:8787": "Cannot assign requested address"}
    check = _check_listen(web, False, why.get)
    assert check.severity == "fail" and "web.listen 198.18.1.1:8787" in check.message
    assert "metrics" not in check.message.split("cannot listen on")[1]
    assert _check_listen(web, True, why.get).severity == "ok"  # the guard holds them itself


def test_a_running_guard_without_its_queue_rules_fails():
    check = run_doctor(kernel=healthy(dynamic=False))["rules"]
    assert check.severity == "fail" and "queue rules are missing" in check.message


def test_a_stopped_guard_without_queue_rules_is_fine_for_the_rules():
    check = run_doctor(kernel=healthy(dynamic=False), socket_up=False, proc="")["rules"]
    assert check.severity == "ok" and "guard stopped" in check.message


def test_rules_that_cannot_be_read_fail_with_the_reason():
    check = run_doctor(kernel=Kernel(save_fails=True))["rules"]
    assert check.severity == "fail" and "Permission denied" in check.message


def test_macs_filled_in_by_firewall_apply_are_recognised():
    """`firewall apply` adds a MAC from the neighbour table to an address-only device; the
    doctor compares with that spec too instead of calling every rule foreign."""
    config = replace(CONFIG, devices=(ECHO, LAMP))
    spec = spec_from_config(config)
    lamp_mac = "02:00:5e:10:00:30"
    applied = replace(spec, devices=tuple(
        replace(d, mac=lamp_mac) if d.name == "lamp" else d for d in spec.devices))
    kernel = Kernel(v4=saved(applied, 4), v6=saved(applied, 6))
    neigh = f"198.18.10.30 dev lan0 lladdr {lamp_mac} REACHABLE\n"
    base = kernel.__call__

    def run(argv, input=None):
        if tuple(argv[:4]) == ("ip", "-4", "neigh", "show"):
            return Completed(tuple(argv), 0, neigh)
        return base(argv, input)

    checks = diagnose(config, run=run, socket_reachable=lambda p: True,
                      read_file=lambda p: PROC_BOUND, families=(4, 6))
    assert {c.name: c.severity for c in checks}["rules"] == "ok"


# --------------------------------------------------------------------------- rules (nftables)


def nft_config() -> GuardConfig:
    return replace(CONFIG, backend="nftables")


def test_nftables_table_complete_passes():
    checks = run_doctor(nft_config(), Kernel(nft_table=NFT_TABLE))
    assert checks["rules"].severity == "ok" and "queue rules installed" in checks["rules"].message
    assert checks["fail_mode"].severity == "ok"


def test_nftables_table_missing_fails_rules_and_fail_mode():
    checks = run_doctor(nft_config(), Kernel(nft_table=None))
    assert checks["rules"].severity == "fail" and "not loaded" in checks["rules"].message
    assert checks["fail_mode"].severity == "fail" and "no safety net" in checks["fail_mode"].message


def test_nftables_device_missing_from_the_sets_fails():
    table = NFT_TABLE.replace("02:00:5e:10:00:10, ", "")
    check = run_doctor(nft_config(), Kernel(nft_table=table))["rules"]
    assert check.severity == "fail" and "kitchen-echo" in check.message


def test_nftables_safety_net_open_while_config_says_closed_fails():
    table = NFT_TABLE.replace(
        'counter packets 0 bytes 0 drop comment "hushgate safety net: fail-closed"',
        'counter packets 0 bytes 0 comment "hushgate safety net: fail-open, counts only"')
    check = run_doctor(nft_config(), Kernel(nft_table=table))["fail_mode"]
    assert check.severity == "fail" and "fail-open in force" in check.message


def test_nftables_queue_bypass_while_config_says_closed_fails():
    table = NFT_TABLE.replace("queue to 7", "queue flags bypass to 7")
    check = run_doctor(nft_config(), Kernel(nft_table=table))["fail_mode"]
    assert check.severity == "fail" and "bypass" in check.message


# --------------------------------------------------------------------------- offloading


def test_uci_flow_offloading_fails_with_the_fix():
    check = run_doctor(kernel=healthy(uci={"flow_offloading": "1"}))["offload"]
    assert check.severity == "fail"
    assert check.fix.startswith("exclude configured devices or turn off offloading")
    assert "flow_offloading=0" in check.fix


def test_a_fw4_flowtable_with_its_unconditional_offload_rule_fails():
    kernel = healthy(flowtables=FW4_FLOWTABLE, ruleset=FW4_OFFLOAD_RULESET)
    check = run_doctor(kernel=kernel)["offload"]
    assert check.severity == "fail" and "inet fw4 ft" in check.message


def test_offloading_that_spares_configured_devices_passes():
    kernel = healthy(flowtables=FW4_FLOWTABLE, ruleset=EXCLUDING_RULESET)
    check = run_doctor(kernel=kernel)["offload"]
    assert check.severity == "ok" and "sparing configured devices" in check.message


def test_no_nft_and_no_uci_means_no_offloading():
    assert run_doctor(kernel=healthy(has_nft=False))["offload"].severity == "ok"


# --------------------------------------------------------------------------- ipv6


def test_an_ipv4_only_device_without_mac_is_an_ipv6_warning():
    config = replace(CONFIG, devices=(ECHO, LAMP))
    check = run_doctor(config)["ipv6"]
    assert (check.severity, check.ok) == ("warn", True)
    assert check.message.startswith("lamp:") and "IPv6 cannot be matched" in check.message
    assert "mac" in check.fix


def test_devices_with_mac_or_ipv6_addresses_pass_ipv6():
    assert run_doctor()["ipv6"].severity == "ok"


# --------------------------------------------------------------------------- listener


def test_parse_nfqueue_proc_reads_the_kernels_columns():
    (binding,) = parse_nfqueue_proc(PROC_DROPS).values()
    assert (binding.queue, binding.portid, binding.waiting) == (7, 27203, 3)
    assert (binding.queue_dropped, binding.user_dropped) == (12, 2)
    assert parse_nfqueue_proc("garbage\n\n") == {}


def test_no_guard_and_no_binding_fails_and_says_which_way_it_fails():
    check = run_doctor(socket_up=False, proc="")["listener"]
    assert check.severity == "fail" and "fail-closed" in check.message
    assert "systemctl start hushgate" in check.fix
    open_check = run_doctor(replace(CONFIG, fail="open"), socket_up=False, proc="")["listener"]
    assert "passes unguarded" in open_check.message


def test_socket_answers_but_queue_unbound_fails():
    check = run_doctor(proc=PROC_OTHER)["listener"]
    assert check.severity == "fail" and "queue 7 not bound" not in check.message
    assert "no process bound to queue 7" in check.message


def test_queue_held_by_another_program_fails():
    check = run_doctor(socket_up=False, proc=PROC_BOUND)["listener"]
    assert check.severity == "fail" and "another program" in check.message


def test_every_queue_of_a_range_must_be_bound():
    config = replace(CONFIG, queue_count=2)
    check = run_doctor(config, proc=PROC_BOUND)["listener"]
    assert check.severity == "fail" and "queue 8 not bound" in check.message


def test_kernel_drops_on_the_queue_are_a_warning():
    check = run_doctor(proc=PROC_DROPS)["listener"]
    assert check.severity == "warn" and "dropped 14 packet(s)" in check.message


# --------------------------------------------------------------------------- fail mode


def test_safety_net_open_while_config_says_closed_fails():
    open_spec = spec_from_config(replace(CONFIG, fail="open"))
    kernel = Kernel(v4=saved(open_spec, 4), v6=saved(open_spec, 6))
    check = run_doctor(kernel=kernel)["fail_mode"]
    assert check.severity == "fail" and "fail-open in force" in check.message


def test_no_safety_net_fails_when_closed_and_warns_when_open():
    empty = Kernel(v4="*mangle\n:FORWARD ACCEPT [0:0]\nCOMMIT\n", v6="")
    assert run_doctor(kernel=empty)["fail_mode"].severity == "fail"
    empty2 = Kernel(v4="*mangle\n:FORWARD ACCEPT [0:0]\nCOMMIT\n", v6="")
    assert run_doctor(replace(CONFIG, fail="open"), empty2)["fail_mode"].severity == "warn"


def test_queue_rules_with_bypass_under_a_closed_config_fail():
    spec = spec_from_config(CONFIG)

    def bypass(lines: list[str]) -> list[str]:
        return [ln + " --queue-bypass" if "-j NFQUEUE" in ln else ln for ln in lines]

    kernel = Kernel(v4=saved(spec, 4, edit=bypass), v6=saved(spec, 6, edit=bypass))
    check = run_doctor(kernel=kernel)["fail_mode"]
    assert check.severity == "fail" and "--queue-bypass" in check.message


# --------------------------------------------------------------------------- the report


def test_report_fits_one_screen_and_every_problem_says_what_to_fix():
    kernel = Kernel(v4="", v6="", flowtables=FW4_FLOWTABLE, ruleset=FW4_OFFLOAD_RULESET,
                    uci={"flow_offloading": "1"})
    checks = diagnose(replace(CONFIG, devices=(ECHO, LAMP)), run=kernel,
                      socket_reachable=lambda p: False, read_file=lambda p: PROC_OTHER,
                      families=(4, 6))
    assert exit_code(checks) == 1
    report = format_report(checks)
    lines = report.splitlines()
    assert len(lines) <= 24 and all(len(ln) <= 100 for ln in lines)
    assert lines[0].startswith("hushgate doctor: 4 problem(s), 1 warning(s)")
    for check in checks:
        if check.severity != "ok":
            at = next(i for i, ln in enumerate(lines) if f" {check.name} " in ln)
            following = lines[at + 1:at + 4]
            assert any(ln.strip().startswith("fix: ") for ln in following), (check, report)


def test_report_of_a_healthy_guard():
    report = format_report(list(run_doctor().values()))
    assert report.startswith("hushgate doctor: all good\n")
    assert "fix:" not in report


def test_report_strips_control_characters_from_what_it_prints():
    report = format_report([Check.fail("rules", "evil\x1b[2Jname", "do\x07 this")])
    assert "\x1b" not in report and "\x07" not in report


# --------------------------------------------------------------------------- a real kernel



def test_doctor_against_a_real_kernel_in_a_namespace():
    """The safety net applied in a throw-away namespace passes rules and fail mode; a foreign
    ACCEPT inserted above our jump is then reported at position 2."""
    need_root("the namespace test")
    for tool in ("ip", "iptables", "ip6tables"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed")
    ns = f"hgdoc{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        run = netns_runner(ns)
        spec = spec_from_config(CONFIG)
        IptablesBackend(spec, run).apply_safety_net()

        def read(path: str) -> str | None:
            res = run(["cat", path], None)
            return res.stdout if res.ok else ""

        checks = {c.name: c for c in diagnose(CONFIG, run=run, socket_reachable=lambda p: False,
                                              read_file=read, families=(4, 6))}
        assert checks["rules"].severity == "ok", checks["rules"]
        assert checks["fail_mode"].severity == "ok", checks["fail_mode"]
        assert checks["listener"].severity == "fail"  # nothing bound to queue 7 in there
        res = run(["iptables", "-t", "mangle", "-I", "FORWARD", "1", "-j", "ACCEPT"], None)
        assert res.ok, res.stderr
        checks = {c.name: c for c in diagnose(CONFIG, run=run, socket_reachable=lambda p: False,
                                              read_file=read, families=(4, 6))}
        assert "HUSHGATE at position 2" in checks["rules"].message
        nft = NftablesBackend(spec, run)
        assert nft.offload_status()["offloading"] is False
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_relay_check_names_a_missing_policy_route_and_a_missing_listener() -> None:
    from guard.tools.doctor import _check_relay

    config = GuardConfig(devices=(ECHO,), socket=CONFIG.socket)
    spec = spec_from_config(config)

    def runner(route: bool) -> Callable[..., Completed]:
        def run(argv: Sequence[str], input: str | None = None) -> Completed:  # noqa: A002
            out = ""
            if route and "rule" in argv:
                out = "900:\tfrom all fwmark 0x20000000/0x20000000 lookup 7411\n"
            elif route and "route" in argv:
                out = "local default dev lo scope host\n"
            return Completed(tuple(argv), 0, out)
        return run

    listening = "  sl  local rem st\n   0: 00000000:1CF3 00000000:0000 0A 0\n"
    ok = _check_relay(config, spec, runner(True), (4, 6), True,
                      lambda p: listening if p == "/proc/net/tcp" else None)
    assert ok.ok and ok.severity == "ok", ok
    no_route = _check_relay(config, spec, runner(False), (4, 6), False, lambda p: None)
    assert not no_route.ok and "ip rule add fwmark" in no_route.fix
    no_listener = _check_relay(config, spec, runner(True), (4, 6), True, lambda p: None)
    assert not no_listener.ok and "7411" in no_listener.message


def test_relay_check_warns_when_the_router_routes_by_mark_and_a_device_has_no_route_mark(
) -> None:
    from guard.tools.doctor import _check_relay

    def run(argv: Sequence[str], input: str | None = None) -> Completed:  # noqa: A002
        out = ""
        if "rule" in argv:
            out = ("900:\tfrom all fwmark 0x20000000/0x20000000 lookup 7411\n"
                   "29997:\tfrom all fwmark 0x10000/0xff0000 lookup pbr_wg\n")
        elif "route" in argv:
            out = "local default dev lo scope host\n"
        return Completed(tuple(argv), 0, out)

    listening = "  sl  local rem st\n   0: 00000000:1CF3 00000000:0000 0A 0\n"

    def check(config: GuardConfig) -> Check:
        return _check_relay(config, spec_from_config(config), run, (4, 6), True,
                            lambda p: listening if p == "/proc/net/tcp" else None)

    bare = check(GuardConfig(devices=(ECHO,), socket=CONFIG.socket))
    assert bare.severity == "warn" and "pbr_wg" in bare.message and ECHO.name in bare.message
    assert "route_mark" in bare.fix
    marked = check(GuardConfig(devices=(replace(ECHO, route_mark=0x10000),), socket=CONFIG.socket))
    assert marked.severity == "ok", marked


def test_a_speaker_that_never_falls_back_to_tcp_is_a_warning() -> None:
    status = {"devices": [{"name": "nest", "quic_no_tcp_fallback": True},
                          {"name": "kitchen-echo", "quic_no_tcp_fallback": False}]}

    def quic_check(config: GuardConfig) -> Check:
        checks = diagnose(config, run=healthy(config), socket_reachable=lambda path: True,
                          read_file=lambda path: PROC_BOUND if path == NFQUEUE_PROC else None,
                          families=(4, 6), status_of=lambda path: status)
        return {c.name: c for c in checks}["quic"]

    check = quic_check(CONFIG)
    assert check.severity == "warn" and "nest" in check.message, check
    assert 'quic = "hold"' in check.fix
    status["devices"][0]["quic_no_tcp_fallback"] = False
    assert quic_check(CONFIG).severity == "ok"
    assert "held by packet" in quic_check(replace(CONFIG, quic="hold")).message
