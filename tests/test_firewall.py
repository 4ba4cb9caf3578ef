"""guard.shell.firewall without root: generated rules and commands, through a scripted runner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from guard.shell.firewall import (
    Completed,
    DeviceMatch,
    FirewallError,
    FirewallSpec,
    IptablesBackend,
    MarkKind,
    Marks,
    NftablesBackend,
    build_rules,
    compose_mark,
    mac_sharers,
    mark_value,
    neighbour_table,
    parse_save,
    with_neighbour_macs,
)

ECHO = DeviceMatch("kitchen-echo", address="198.18.10.10", mac="02:00:5E:10:00:10")
NEST = DeviceMatch("nest", mac="02:00:5e:10:00:11", address6=("2001:2:0:10::11",))
LAMP = DeviceMatch("lamp", address="198.18.10.30")


def spec(**kw) -> FirewallSpec:
    return replace(FirewallSpec(devices=(ECHO, NEST), queue=7), **kw)


@dataclass
class FakeRunner:
    """Answers commands from a table (by argv[0]) and records what was run."""

    saves: dict[str, str] = field(default_factory=dict)
    fail: dict[str, Completed] = field(default_factory=dict)
    calls: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], input: str | None = None) -> Completed:
        argv = tuple(argv)
        self.calls.append((argv, input))
        if argv[0] in self.fail:
            return self.fail[argv[0]]
        if argv[0].endswith("-save"):
            return Completed(argv, 0, self.saves.get(argv[0], ""))
        if argv[-1] == "--version":
            return Completed(argv, 0, "iptables v1.8.9 (nf_tables)\n")
        return Completed(argv, 0, "")

    def restores(self) -> list[tuple[str, str]]:
        return [(a[0], i or "") for a, i in self.calls if "restore" in a[0]]


def rule_lines(s: FirewallSpec, family: int, chain: str) -> list[str]:
    return [r.spec for r in build_rules(s, family) if r.chain == chain]


# --------------------------------------------------------------------------- marks


def test_marks_take_the_lowest_bits_of_the_mask() -> None:
    m = Marks.from_mask(0x00FF0000)
    assert (m.allow, m.block, m.device, m.verdict_mask) == (0x10000, 0x20000, 0x40000, 0x30000)
    assert mark_value("allow") == 0x10000 and mark_value(MarkKind.BLOCK) == 0x20000
    sparse = Marks.from_mask(0x80000101)  # bits need not be contiguous
    assert (sparse.allow, sparse.block, sparse.device) == (0x1, 0x100, 0x80000000)
    assert spec(mark_mask=0xF0).mark_value("block") == 0x20


def test_compose_mark_keeps_foreign_bits_and_replaces_the_verdict() -> None:
    assert compose_mark(0x0000_00A5, "allow") == 0x0001_00A5
    assert compose_mark(0x0001_00A5, "block") == 0x0002_00A5
    assert compose_mark(0x0002_0000, "device") == 0x0006_0000


@pytest.mark.parametrize("mask", [0, 0x3, 0x1_0000_0000])
def test_mask_needs_three_bits_within_32(mask: int) -> None:
    with pytest.raises(ValueError):
        Marks.from_mask(mask)


# --------------------------------------------------------------------------- spec


def test_device_match_normalises_and_validates() -> None:
    assert ECHO.mac == "02:00:5e:10:00:10"
    assert DeviceMatch("x", address6=("2001:2:0:10:0:0:0:11",)).address6 == ("2001:2:0:10::11",)
    for bad in (
        {},
        {"mac": "zz:00:00:00:00:00"},
        {"address": "198.18.10.300"},
        {"address": "2001:2::1"},
        {"address6": ("198.18.10.1",)},
    ):
        with pytest.raises(ValueError):
            DeviceMatch("x", **bad)


def test_spec_rejects_bad_queue_tag_and_unknown_quic_device() -> None:
    with pytest.raises(ValueError):
        spec(queue=65535, queue_count=2)
    with pytest.raises(ValueError):
        spec(tag="Hush Gate")
    with pytest.raises(ValueError):
        spec(quic_block_devices=("kitchen-hub",))
    with pytest.raises(ValueError):
        spec(devices=(ECHO, ECHO))


def test_warnings_name_devices_whose_ipv6_cannot_be_matched() -> None:
    w = spec(devices=(ECHO, LAMP)).warnings()
    assert len([x for x in w if "IPv6" in x]) == 1 and "lamp" in w[0]


def test_neighbour_table_fills_a_missing_mac() -> None:
    def run(argv: Sequence[str], input: str | None = None) -> Completed:
        out = "198.18.10.30 dev br-lan lladdr 02:00:5e:10:00:30 REACHABLE\n"
        return Completed(tuple(argv), 0, out if tuple(argv) == ("ip", "-4", "neigh", "show")
                         else "")

    s = with_neighbour_macs(spec(devices=(ECHO, LAMP)), run)
    assert s.devices[1].mac == "02:00:5e:10:00:30" and s.devices[0] == ECHO


def test_a_mac_the_neighbour_table_holds_for_two_addresses_is_not_filled_in() -> None:
    """Clients behind a MAC-rewriting extender share its MAC: matching it for one address-only
    device would guard them all (issue 16 point 5)."""
    table = ("198.18.10.30 dev br-lan lladdr 02:00:5e:10:00:30 REACHABLE\n"
             "198.18.10.31 dev br-lan lladdr 02:00:5e:10:00:30 STALE\n"
             "198.18.10.32 dev br-lan FAILED\n")

    def run(argv: Sequence[str], input: str | None = None) -> Completed:
        return Completed(tuple(argv), 0, table)

    s = with_neighbour_macs(spec(devices=(ECHO, LAMP)), run)
    assert s.devices[1].mac is None and s.devices[0] == ECHO
    assert neighbour_table(run) == {"198.18.10.30": "02:00:5e:10:00:30",
                                    "198.18.10.31": "02:00:5e:10:00:30"}
    assert mac_sharers(neighbour_table(run), "02:00:5E:10:00:30", "198.18.10.30") == (
        "198.18.10.31",)


# --------------------------------------------------------------------------- rule layout


def test_pipeline_order_is_fast_path_then_queue_then_safety_net() -> None:
    up = rule_lines(spec(), 4, "HUSHGATE_UP")
    assert up == [
        "-m connmark ! --mark 0x40000/0x40000 -j CONNMARK --set-xmark 0x40000/0x40000",
        "-m mark ! --mark 0x0/0x30000 -j CONNMARK --save-mark --nfmask 0x30000 --ctmask 0x30000",
        "-m connmark --mark 0x10000/0x30000 -j ACCEPT",
        "-m connmark --mark 0x20000/0x30000 -j ACCEPT",
        # control-marked UDP flows: datagrams with at most 99 B of payload stay in the kernel
        "-p udp -m connmark --mark 0x30000/0x30000 -m length --length 0:127 -j ACCEPT",
        # control-marked TCP connections: segments flagged ACK alone, at most 80 B (pure ACKs)
        "-p tcp -m connmark --mark 0x30000/0x30000 -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG ACK"
        " -m length --length 0:80 -j ACCEPT",
        "-j HUSHGATE_QUEUE",
        "-j HUSHGATE_NET",
    ]
    up6 = rule_lines(spec(), 6, "HUSHGATE_UP")
    assert "-m length --length 0:147 -j ACCEPT" in up6[4]
    assert "-m length --length 0:100 -j ACCEPT" in up6[5]
    down = rule_lines(spec(), 4, "HUSHGATE_DOWN")
    assert down.index("-p udp -m udp --sport 53 -j HUSHGATE_DNS") < down.index("-j HUSHGATE_DOWNQ")
    assert down[-1] == "-j HUSHGATE_NET"


def test_devices_are_matched_by_mac_and_address_both_ways() -> None:
    entry = rule_lines(spec(), 4, "HUSHGATE")
    assert entry == [
        "-m mac --mac-source 02:00:5e:10:00:10 -g HUSHGATE_UP",
        "-s 198.18.10.10/32 -g HUSHGATE_UP",
        "-m mac --mac-source 02:00:5e:10:00:11 -g HUSHGATE_UP",
        "-d 198.18.10.10/32 -g HUSHGATE_DOWN",
        "-m connmark --mark 0x40000/0x40000 -g HUSHGATE_DOWN",
    ]
    entry6 = rule_lines(spec(), 6, "HUSHGATE")
    assert "-s 2001:2:0:10::11/128 -g HUSHGATE_UP" in entry6
    assert "-d 2001:2:0:10::11/128 -g HUSHGATE_DOWN" in entry6
    assert not any("198.18" in r for r in entry6)


def test_fail_closed_has_no_bypass_and_a_dropping_net() -> None:
    rules = build_rules(spec(), 4)
    queue = [r.spec for r in rules if r.label == "queue.up"]
    assert queue == ["-j NFQUEUE --queue-num 7"]
    net = [r.spec for r in rules if r.chain == "HUSHGATE_NET"]
    assert net == ['-m comment --comment "hushgate safety net: fail-closed" -j DROP']


def test_fail_open_bypasses_and_the_net_only_counts() -> None:
    rules = build_rules(spec(fail_open=True, queue_count=2), 4)
    assert [r.spec for r in rules if r.label == "queue.up"] == [
        "-j NFQUEUE --queue-balance 7:8 --queue-bypass"
    ]
    assert next(r.spec for r in rules if r.chain == "HUSHGATE_NET").endswith("-j RETURN")


def test_dynamic_rules_are_only_the_queue_chains() -> None:
    dyn = {(r.chain, r.label) for r in build_rules(spec(), 4) if r.dynamic}
    assert dyn == {
        ("HUSHGATE_QUEUE", "queue.up"),
        ("HUSHGATE_DOWNQ", "queue.down_kernel"),
        ("HUSHGATE_DNS", "queue.dns"),
    }
    dyn_q = [r.spec for r in build_rules(spec(queue_downstream=True), 4) if r.label == "queue.down"]
    assert dyn_q == ["-j NFQUEUE --queue-num 7"]


def test_block_is_rejected_in_filter_with_reset_or_port_unreachable() -> None:
    assert rule_lines(spec(), 4, "HUSHGATE_REJECT") == [
        "-m conntrack --ctstate INVALID,UNTRACKED -j RETURN",
        "-m connmark ! --mark 0x20000/0x30000 -j RETURN",
        "-p tcp -j REJECT --reject-with tcp-reset",
        "-p udp -j REJECT --reject-with icmp-port-unreachable",
        "-j DROP",
    ]
    assert "-p udp -j REJECT --reject-with icmp6-port-unreachable" in rule_lines(
        spec(), 6, "HUSHGATE_REJECT"
    )
    assert all(r.table == "filter" for r in build_rules(spec(), 4) if "REJECT" in r.spec)
    assert all(r.table == "mangle" for r in build_rules(spec(), 4) if "NFQUEUE" in r.spec)


def test_quic_block_marks_udp_443_of_that_device_only() -> None:
    entry = rule_lines(spec(quic_block_devices=("nest",)), 4, "HUSHGATE")
    quic = [r for r in entry if "--dport 443" in r]
    assert quic == [
        (
            "-p udp -m mac --mac-source 02:00:5e:10:00:11 -m udp --dport 443 "
            "-j CONNMARK --set-xmark 0x20000/0x30000"
        )
    ]
    assert entry.index(quic[0]) < entry.index(
        "-m mac --mac-source 02:00:5e:10:00:11 -g HUSHGATE_UP"
    )


def test_ipv6_off_blocks_the_devices_v6_instead_of_leaving_it_open() -> None:
    rules = build_rules(spec(ipv6=False), 6)
    entry = [r.spec for r in rules if r.chain == "HUSHGATE"]
    assert "-m mac --mac-source 02:00:5e:10:00:10 -j CONNMARK --set-xmark 0x20000/0x30000" in entry
    assert not any(r.label == "queue.up" for r in rules)
    assert any(r.label == "queue.up" for r in build_rules(spec(ipv6=False), 4))


def test_dns_from_the_routers_resolver_is_observed() -> None:
    assert rule_lines(spec(), 4, "HUSHGATE_INPUT")[0] == (
        "-m mac --mac-source 02:00:5e:10:00:10 -j CONNMARK --set-xmark 0x40000/0x40000"
    )
    assert rule_lines(spec(), 4, "HUSHGATE_OUTPUT") == [
        "-p udp -m udp --sport 53 -m connmark --mark 0x40000/0x40000 -j HUSHGATE_DNS",
        "-p tcp -m tcp --sport 53 -m connmark --mark 0x40000/0x40000 -j HUSHGATE_DNS",
    ]


def test_custom_tag_and_mask_flow_through_every_rule() -> None:
    rules = build_rules(spec(tag="hg2", mark_mask=0x70), 4)
    assert all(r.chain.startswith("HG2") for r in rules)
    assert any("--mark 0x10/0x30" in r.spec for r in rules)
    assert not any("HUSHGATE" in r.spec or "0x30000" in r.spec for r in rules)


def test_device_names_cannot_inject_into_rule_text() -> None:
    with pytest.raises(ValueError):
        DeviceMatch('x" -j ACCEPT\n-A FORWARD', address="198.18.10.99")
    odd = DeviceMatch('x" -j ACCEPT', address="198.18.10.99")
    rules = build_rules(spec(devices=(odd,)), 4)
    assert all('"' not in r.label and " " not in r.label for r in rules)
    assert not any("x" in r.spec and "ACCEPT" in r.spec and "10.99" in r.spec for r in rules)


# --------------------------------------------------------------------------- commands


def test_render_runs_nothing_and_shows_both_families() -> None:
    runner = FakeRunner()
    text = IptablesBackend(spec(), run=runner).render()
    assert runner.calls == []
    assert "# IPv4: iptables-restore --noflush" in text
    assert "# IPv6: ip6tables-restore --noflush" in text
    assert text.count("-I FORWARD 1 -j HUSHGATE\n") == 2
    assert "-A HUSHGATE_QUEUE -j NFQUEUE --queue-num 7" in text


def test_install_dynamic_on_empty_kernel_is_one_restore_per_family() -> None:
    runner = FakeRunner()
    IptablesBackend(spec(), run=runner).install_dynamic()
    restores = runner.restores()
    assert [r[0] for r in restores] == ["iptables-restore", "ip6tables-restore"]
    assert all(a[1:] == ("-w", "--noflush") for a, _ in runner.calls if "restore" in a[0])
    text = restores[0][1]
    assert text.index("*filter") < text.index("*mangle")  # REJECT exists before BLOCK passes
    assert "-I FORWARD 1 -j HUSHGATE" in text and "-D FORWARD" not in text
    assert ":HUSHGATE_QUEUE - [0:0]" in text


def _saved_after(s: FirewallSpec, family: int = 4, extra: str = "") -> str:
    """An iptables-save -c of a kernel where `s` is fully installed."""
    be = IptablesBackend(s, run=FakeRunner())
    rules = be.rules(family)
    out = []
    for table in ("filter", "mangle"):
        out.append(f"*{table}")
        out += [f":{b} ACCEPT [0:0]" for b in ("INPUT", "FORWARD", "OUTPUT", "POSTROUTING")]
        names = {r.chain for r in rules if r.table == table}
        names |= {c for t, c in be.chains.dynamic() if t == table}
        out += [f":{c} - [0:0]" for c in sorted(names)]
        for t, hook, chain in be.chains.hooks():
            if t == table:
                out.append(f"[0:0] -A {hook} -j {chain}")
        out += [f"[3:180] {r.line}" for r in rules if r.table == table]
        if table == "mangle":
            out.append(extra)
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def test_apply_when_installed_keeps_jumps_and_running_queue() -> None:
    s = spec()
    runner = FakeRunner(
        saves={"iptables-save": _saved_after(s), "ip6tables-save": _saved_after(s, 6)}
    )
    IptablesBackend(s, run=runner).apply_safety_net()
    text = runner.restores()[0][1]
    assert "-I FORWARD" not in text and "-D FORWARD" not in text  # jumps already first, once
    assert ":HUSHGATE_QUEUE" not in text and "NFQUEUE" not in text  # run's rules untouched
    assert ":HUSHGATE_UP - [0:0]" in text  # persistent chains flushed and refilled


def test_apply_moves_a_displaced_or_duplicated_jump_back_to_the_top() -> None:
    s = spec()
    saved = _saved_after(s).replace(
        "[0:0] -A FORWARD -j HUSHGATE\n",
        "[0:0] -A FORWARD -j DOCKER-USER\n[0:0] -A FORWARD -j HUSHGATE\n[0:0] -A FORWARD -j HUSHGATE\n",
    )
    runner = FakeRunner(saves={"iptables-save": saved})
    IptablesBackend(s, run=runner).apply_safety_net()
    mangle = runner.restores()[0][1].split("*mangle")[1]
    assert mangle.count("-D FORWARD -j HUSHGATE\n") == 2
    assert mangle.count("-I FORWARD 1 -j HUSHGATE\n") == 1


def test_remove_dynamic_flushes_only_existing_dynamic_chains() -> None:
    s = spec()
    runner = FakeRunner(saves={"iptables-save": _saved_after(s)})
    IptablesBackend(s, run=runner).remove_dynamic()
    restores = runner.restores()
    assert len(restores) == 1  # ip6tables has none: nothing to do there
    assert restores[0][1] == (
        "*mangle\n:HUSHGATE_QUEUE - [0:0]\n:HUSHGATE_DNS - [0:0]\n:HUSHGATE_DOWNQ - [0:0]\nCOMMIT\n"
    )


def test_remove_all_deletes_jumps_then_flushes_then_deletes_every_own_chain() -> None:
    s = spec()
    saved = _saved_after(s, extra=":HUSHGATE_OLD - [0:0]\n[0:0] -A PREROUTING -j HUSHGATE_OLD")
    runner = FakeRunner(saves={"iptables-save": saved})
    IptablesBackend(s, run=runner).remove_all()
    text = runner.restores()[0][1]
    mangle = text.split("*mangle")[1]
    assert "-D FORWARD -j HUSHGATE\n" in mangle and "-D PREROUTING -j HUSHGATE_OLD" in mangle
    assert mangle.index("-D ") < mangle.index("-F ") < mangle.index("-X ")
    assert "-X HUSHGATE_OLD" in mangle and "-X HUSHGATE_REJECT" in text.split("*filter")[1]
    assert "-F FORWARD" not in text and "-X FORWARD" not in text


def test_status_reports_presence_counters_and_fail_mode() -> None:
    s = spec()
    saved4 = _saved_after(s)
    saved6 = _saved_after(s, 6).replace("[3:180] -A HUSHGATE_QUEUE -j NFQUEUE --queue-num 7\n", "")
    runner = FakeRunner(saves={"iptables-save": saved4, "ip6tables-save": saved6})
    be = IptablesBackend(s, run=runner)
    st = be.status()
    assert st["backend"] == "iptables-nft" and st["installed_fail_mode"] == "closed"
    assert st["families"]["ipv4"]["dynamic"] and not st["families"]["ipv6"]["dynamic"]
    assert st["families"]["ipv6"]["missing"] == ["-A HUSHGATE_QUEUE -j NFQUEUE --queue-num 7"]
    assert st["safety_net"] and not st["dynamic"]
    assert be.counters()["ipv4"]["queue.up"] == (3, 180)


def test_variant_and_binaries_pick_the_commands() -> None:
    runner = FakeRunner()
    IptablesBackend(spec(), run=runner, variant="legacy").install_dynamic()
    assert [a[0] for a, _ in runner.calls] == [
        "iptables-legacy-save",
        "iptables-legacy-restore",
        "ip6tables-legacy-save",
        "ip6tables-legacy-restore",
    ]
    with pytest.raises(ValueError):
        IptablesBackend(spec(), variant="xtables")
    runner = FakeRunner()
    IptablesBackend(spec(), run=runner, families=(4,)).install_dynamic()
    assert [a[0] for a, _ in runner.calls] == ["iptables-save", "iptables-restore"]


def test_a_failing_restore_raises_one_line() -> None:
    bad = Completed(("iptables-restore",), 2, "", "iptables-restore: line 7 failed\nmore\n")
    runner = FakeRunner(fail={"iptables-restore": bad})
    with pytest.raises(FirewallError, match=r"line 7 failed$"):
        IptablesBackend(spec(), run=runner).install_dynamic()


def test_parse_save_reads_counters_and_plain_lines() -> None:
    tabs = parse_save(
        "# x\n*mangle\n:FORWARD ACCEPT [1:2]\n:HG - [0:0]\n[5:300] -A HG -j ACCEPT\n"
        "-A FORWARD -j HG\nCOMMIT\n"
    )
    t = tabs["mangle"]
    assert t.chains == {"FORWARD": "ACCEPT", "HG": "-"}
    assert [(r.chain, r.spec, r.packets, r.bytes) for r in t.rules] == [
        ("HG", "-j ACCEPT", 5, 300),
        ("FORWARD", "-j HG", 0, 0),
    ]


def test_conntrack_update_uses_the_full_tuple_and_our_bits_only() -> None:
    be = IptablesBackend(spec(), run=FakeRunner())
    argv = be.conntrack_mark_argv("tcp", "198.18.10.10", "198.19.0.10", 40000, 443, "allow")
    assert argv[-2:] == ["-m", "0x10000/0x30000"]
    assert argv[:4] == ["conntrack", "-U", "-f", "ipv4"]


# --------------------------------------------------------------------------- nftables


def test_nft_render_is_one_inet_table_with_sets_queue_and_net() -> None:
    text = NftablesBackend(spec(quic_block_devices=("nest",))).render()
    assert text.count("table inet hushgate {") == 1
    assert "elements = { 02:00:5e:10:00:10, 02:00:5e:10:00:11 }" in text
    assert "type filter hook forward priority mangle; policy accept;" in text
    assert "\t\tqueue num 7\n" in text and "bypass" not in text
    assert 'counter drop comment "hushgate safety net: fail-closed"' in text
    assert "ct mark & 0x30000 == 0x10000 counter accept" in text
    assert "meta l4proto tcp counter reject with tcp reset" in text
    assert "elements = { 02:00:5e:10:00:11 }" in text  # quic_block_mac
    assert "flow add @ft" in text and "ct mark & 0x40000 == 0" in text
    assert text.count("{") == text.count("}")


def test_nft_queue_statement_forms() -> None:
    assert NftablesBackend(spec(fail_open=True)).queue_statement() == "queue num 7 bypass"
    assert (
        NftablesBackend(spec(queue_count=4, fail_open=True)).queue_statement()
        == "queue num 7-10 fanout,bypass"
    )


def test_nft_check_reports_what_was_and_was_not_checked() -> None:
    calls: list[str] = []

    def run(argv: Sequence[str], input: str | None = None) -> Completed:
        calls.append(input or "")
        if "queue num" in (input or ""):
            err = (
                "/dev/stdin:60:3-7: Error: No such file or directory; did you mean chain 'up'?\n"
                "\t\tqueue num 7\n\t\t^^^^^\n"
            )
            return Completed(tuple(argv), 1, "", err)
        return Completed(tuple(argv), 0, "")

    res = NftablesBackend(spec(), run=run).check()
    assert res.ok and res.syntax_ok and res.full_ok is False and res.rest_ok
    assert res.queue_supported is False and res.replaced == ("queue num 7", "queue num 7")
    assert "NOT checked" in res.message and "CONFIG_NFT_QUEUE" in res.message
    assert "queue num" not in calls[1] and calls[1].count("counter accept") >= 2


def test_nft_check_fails_on_syntax_errors_and_missing_nft() -> None:
    def syntax(argv: Sequence[str], input: str | None = None) -> Completed:
        return Completed(tuple(argv), 1, "", "/dev/stdin:3:1: Error: syntax error, unexpected x\n")

    assert not NftablesBackend(spec(), run=syntax).check().ok

    def missing(argv: Sequence[str], input: str | None = None) -> Completed:
        return Completed(tuple(argv), 127, "", "not found")

    res = NftablesBackend(spec(), run=missing).check()
    assert not res.ok and "nothing was checked" in res.message


def test_offload_status_reads_flowtables_and_uci() -> None:
    def run(argv: Sequence[str], input: str | None = None) -> Completed:
        if argv[:3] == ("nft", "list", "flowtables"):
            out = "table inet fw4 {\n\tflowtable ft {\n\t\thook ingress priority filter\n\t}\n}\n"
            return Completed(tuple(argv), 0, out)
        if argv[-1].endswith(".flow_offloading"):
            return Completed(tuple(argv), 0, "1\n")
        return Completed(tuple(argv), 1, "")

    st = NftablesBackend(spec(), run=lambda a, i=None: run(tuple(a), i)).offload_status()
    assert st["offloading"] and st["flowtables"] == ["inet fw4 ft"]
    assert st["uci_flow_offloading"] is True and st["uci_flow_offloading_hw"] is None
    assert "flow add @ft" in st["detail"]


def test_nft_dynamic_script_flushes_then_refills() -> None:
    script = NftablesBackend(spec()).dynamic_script()
    assert script.splitlines()[0] == "flush chain inet hushgate queue_up"
    assert "add rule inet hushgate dns queue num 7" in script
    assert "add rule" not in NftablesBackend(spec()).dynamic_script(install=False)


# --------------------------------------------------------------------------- the stream hold


def _labels(rules: list) -> list[str]:
    return [r.label for r in rules]


def test_relay_rules_intercept_wan_tcp_and_reset_what_reaches_forward() -> None:
    rules = build_rules(spec(relay_devices=("kitchen-echo",)), 4)
    lines = {r.label: r for r in rules}
    tp = lines["relay.tproxy"]
    assert tp.chain == "HUSHGATE_RELAY" and not tp.dynamic
    assert tp.spec == ("-p tcp -j TPROXY --on-port 7411 --on-ip 0.0.0.0 "
                       "--tproxy-mark 0x20000000/0x20000000")
    bypass = [r.spec for r in rules if r.label.startswith("relay.bypass.")]
    assert any("-d 10.0.0.0/8 " in b for b in bypass)
    assert not any("198.18." in b for b in bypass)  # the benchmark range is the tests' WAN
    # only the relayed device is intercepted, by MAC and address
    assert lines["tproxy.kitchen-echo.mac"].spec == (
        "-p tcp -m mac --mac-source 02:00:5e:10:00:10 -j HUSHGATE_RELAY")
    assert lines["tproxy.kitchen-echo.addr"].spec == "-s 198.18.10.10/32 -p tcp -j HUSHGATE_RELAY"
    assert not any(label.startswith("tproxy.nest") for label in lines)
    # the FORWARD guarantee comes before every other rule of the reject chain
    reject = [r for r in rules if r.chain == "HUSHGATE_REJECT"]
    assert reject[0].label == "relay.forward"
    assert lines["relayfwd.kitchen-echo.addr.reset"].spec == (
        "-s 198.18.10.10/32 -p tcp -m connmark ! --mark 0x40000000/0x40000000 "
        "-j REJECT --reject-with tcp-reset")
    assert lines["input.relay_port"].spec == (
        "-p tcp -m tcp --dport 7411 -m mark ! --mark 0x20000000/0x20000000 -j DROP")
    # its TCP is never queued; its UDP still is
    assert lines["dispatch.kitchen-echo.addr.tcp"].spec == "-s 198.18.10.10/32 -p tcp -j ACCEPT"
    assert "dispatch.kitchen-echo.addr.up" in lines


def test_relay_rules_v6_and_packet_mode_has_none() -> None:
    six = build_rules(spec(relay_devices=("nest",)), 6)
    tp = next(r for r in six if r.label == "relay.tproxy")
    assert "--on-ip ::" in tp.spec
    assert any(r.spec.startswith("-d fc00::/7 ") for r in six)
    packet = build_rules(spec(), 4)
    assert not any("relay" in r.label or "tproxy" in r.label for r in packet)
    assert "PREROUTING" not in IptablesBackend(spec()).restore_text(4)


def test_relay_is_dynamic_when_fail_open() -> None:
    closed = IptablesBackend(spec(relay_devices=("kitchen-echo",)))
    opened = IptablesBackend(spec(relay_devices=("kitchen-echo",), fail_open=True))
    assert ("mangle", "HUSHGATE_TPROXY") in closed.chains.persistent()
    assert ("mangle", "HUSHGATE_TPROXY") in opened.chains.dynamic()
    tp = next(r for r in opened.rules(4) if r.label == "relay.tproxy")
    assert tp.dynamic
    assert "-I PREROUTING 1 -j HUSHGATE_TPROXY" in closed.restore_text(4)


def test_relay_marks_must_be_single_bits_outside_the_mask() -> None:
    with pytest.raises(ValueError):
        spec(relay_devices=("kitchen-echo",), tproxy_mark=0x00010000)  # inside mark_mask
    with pytest.raises(ValueError):
        spec(relay_devices=("kitchen-echo",), relay_mark=0x3)
    with pytest.raises(ValueError):
        spec(relay_devices=("ghost",))


def test_a_relayed_devices_syn_waits_in_the_queue_before_its_interception() -> None:
    """design.md 5a.3: the SYN rule sits before TPROXY in the relay chain, skips a SYN that
    comes back with the relay's bit, and has no bypass unless fail = "open"; FORWARD answers
    an unreachable SYN with ICMP before the reset."""
    for family, icmp in ((4, "icmp-host-unreachable"), (6, "icmp6-addr-unreachable")):
        rules = build_rules(spec(relay_devices=("kitchen-echo",)), family)
        relay = [r for r in rules if r.chain == "HUSHGATE_RELAY"]
        labels = [r.label for r in relay]
        assert labels.index("relay.syn") == labels.index("relay.tproxy") - 1
        assert relay[labels.index("relay.syn")].spec == (
            "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m mark ! --mark 0x40000000/0x40000000 "
            "-j HUSHGATE_SYN")
        (hold,) = [r for r in rules if r.chain == "HUSHGATE_SYN"]
        assert hold.dynamic and hold.spec == "-j NFQUEUE --queue-num 7"  # `run`'s only
        fwd = [r for r in rules if r.chain == "HUSHGATE_RELAYFWD"]
        assert fwd[0].label == "relayfwd.syn_unreachable" and icmp in fwd[0].spec
        assert "-m mark --mark 0x40000000/0x40000000" in fwd[0].spec
    opened = build_rules(spec(relay_devices=("kitchen-echo",), fail_open=True), 4)
    assert next(r.spec for r in opened if r.label == "relay.syn_hold").endswith("--queue-bypass")
    text = NftablesBackend(spec(relay_devices=("kitchen-echo",))).render()
    lines = [ln.strip() for ln in text.splitlines()]
    syn = next(i for i, ln in enumerate(lines) if "tcp flags & (syn | ack) == syn meta mark"
               in ln and ln.endswith("jump syn_hold"))
    assert lines[syn + 1].startswith("meta l4proto tcp tproxy ip to :7411")
    hold = lines.index("chain syn_hold {")
    assert lines[hold + 1] == "queue num 7"  # filled by `run` only (a dynamic chain)
    assert "add rule inet hushgate syn_hold queue num 7" in NftablesBackend(
        spec(relay_devices=("kitchen-echo",))).dynamic_script()
    assert any("reject with icmpx type host-unreachable" in ln for ln in lines)


def test_nft_relay_drops_explicitly_after_tproxy_when_fail_closed() -> None:
    text = NftablesBackend(spec(relay_devices=("kitchen-echo",))).render()
    all_lines = text.splitlines()
    start = all_lines.index("\tchain relay {")
    lines = [ln.strip() for ln in all_lines[start + 1:all_lines.index("\t}", start)]]
    assert lines[-3].startswith("meta l4proto tcp tproxy ip to :7411 meta mark set")
    assert lines[-1].startswith("meta l4proto tcp counter drop")
    assert "fib daddr type local return" in text
    assert "ct mark & 0x40000000 != 0x40000000 counter reject with tcp reset" in text
    opened = NftablesBackend(spec(relay_devices=("kitchen-echo",), fail_open=True)).render()
    assert "counter drop comment \"hushgate relay" not in opened


def test_nft_relay_ruleset_passes_nft_check() -> None:
    import shutil

    if shutil.which("nft") is None:
        from tests.ci import missing_or_fail

        missing_or_fail("nft not installed (scripts/bootstrap.sh installs nftables)")
    for fail_open in (False, True):
        check = NftablesBackend(spec(relay_devices=("kitchen-echo", "nest"),
                                     fail_open=fail_open)).check()
        assert check.ok and check.syntax_ok, check.message
