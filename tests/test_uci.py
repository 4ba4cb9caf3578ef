"""guard.tools.uci: OpenWrt's /etc/config/hushgate to the TOML config, pure and line-exact."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guard.core.config import ConfigError, GuardConfig, parse_config
from guard.core.policy import CategoryAction, Mode
from guard.tools.uci import (
    OPENWRT_DEFAULTS,
    UciError,
    dumps_toml,
    fw4_include,
    parse_uci,
    uci_file_to_config,
    uci_to_config,
    uci_to_dict,
    uci_to_toml,
    write_openwrt_files,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "packaging/openwrt/hushgate/files/hushgate.config"


def shipped_text(enable_device: bool = False) -> str:
    text = SHIPPED.read_text(encoding="utf-8")
    if enable_device:
        text = text.replace("option enabled '0'\n\toption name 'kitchen-echo'",
                            "option name 'kitchen-echo'")
    return text


def config_of(text: str) -> GuardConfig:
    """What the guard sees: the TOML text the converter wrote, through tomllib and
    parse_config, exactly as `hushgate run --config /var/etc/hushgate.toml` would."""
    return parse_config(tomllib.loads(uci_to_toml(text)))


def error_line(text: str) -> int | None:
    with pytest.raises(UciError) as info:
        uci_to_toml(text)
    return info.value.line


# --------------------------------------------------------------------------- the shipped file


def test_shipped_config_converts_to_a_valid_safe_config():
    config = config_of(shipped_text())
    assert config.fail == "closed"
    assert config.backend == "nftables"
    assert config.state_db == "/etc/hushgate/state.db"  # on flash: rules survive a reboot
    assert config.socket == "/var/run/hushgate/control.sock"
    assert config.metrics_listen == "127.0.0.1:9877"
    assert (config.audit_max_age_s, config.audit_max_rows) == (2592000.0, 5000)
    assert config.queue == 7 and config.hold_timeout_s == 20
    assert config.devices == ()  # the example device ships disabled


def test_shipped_example_device_once_enabled_is_a_monitor_mode_mac_device():
    config = config_of(shipped_text(enable_device=True))
    (device,) = config.devices
    assert device.name == "kitchen-echo"
    assert device.mac == "68:db:f5:90:19:64"
    assert device.mode is Mode.MONITOR


def test_shipped_config_round_trips_through_uci_export_form():
    """`uci export hushgate` prints the same data with a package line, tabs and every value
    single-quoted: both forms give the same document."""
    from_file = uci_to_dict(shipped_text(enable_device=True))
    lines = ["package hushgate", ""]
    for section in parse_uci(shipped_text(enable_device=True)):
        lines.append(f"config {section.type}" + (f" '{section.name}'" if section.name else ""))
        for opt in section.options.values():
            for value in opt.values:
                kind = "list" if opt.is_list else "option"
                quoted = value.replace("'", "'\\''")
                lines.append(f"\t{kind} {opt.name} '{quoted}'")
        lines.append("")
    assert uci_to_dict("\n".join(lines)) == from_file


def test_enabled_and_jail_are_the_init_scripts_options_and_never_reach_the_toml():
    toml = uci_to_toml(shipped_text())
    assert "enabled" not in toml and "jail" not in toml
    assert "\toption jail '1'\n" in shipped_text()  # the procd jail, on by default
    assert "jail" not in uci_to_toml("config guard 'guard'\n\toption jail '0'\n")
    assert error_line("config guard 'guard'\n\toption enabled 'maybe'\n") == 2
    assert error_line("config guard 'guard'\n\n\toption jail 'maybe'\n") == 3


# --------------------------------------------------------------------------- quoting


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("'plain'", "plain"),
        ("bare", "bare"),
        ('"double"', "double"),
        ("'with spaces inside'", "with spaces inside"),
        ("'it'\\''s'", "it's"),  # libuci's own escape for a single quote
        ('"say \\"hi\\" \\\\ now"', 'say "hi" \\ now'),
        ("'#not-a-comment'", "#not-a-comment"),
        ("ab'c d'\"e\"", "abc de"),  # pieces concatenate until whitespace
        ("back\\ slash", "back slash"),
        ("'semi;colon'", "semi;colon"),
    ],
)
def test_quoting_follows_libuci(raw, value):
    sections = parse_uci(f"config hook\n\toption url {raw}\n")
    assert sections[0].options["url"].value == value


def test_comments_and_semicolons_split_and_end_statements():
    text = (
        "# a comment line\n"
        "config guard 'guard' # trailing comment\n"
        "\toption queue 8; option fail open   # two statements on one line\n"
        "\toption quic hold#glued comment\n"
    )
    guard = uci_to_dict(text)["guard"]
    assert (guard["queue"], guard["fail"], guard["quic"]) == (8, "open", "hold")


def test_quoted_value_may_span_lines_and_backslash_continues_a_line():
    # as in libuci, a backslash-newline continues the word it is in
    text = "config hook\n\toption url 'http://a\nb'\n\tlist event upload\\\n-held\n"
    (hook,) = parse_uci(text)
    assert hook.options["url"].value == "http://a\nb"
    assert hook.options["event"].values == ["upload-held"]
    assert hook.options["event"].line == 4
    # ... and a word that starts after it on the next line is one argument too many
    with pytest.raises(UciError, match="too many values"):
        uci_to_toml("config metrics 'metrics'\n\toption listen a \\\n b\n")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=40))
def test_any_value_quoted_like_uci_export_parses_back_unchanged(value):
    quoted = "'" + value.replace("'", "'\\''") + "'"
    (section,) = parse_uci(f"config hook\n\toption url {quoted}\n")
    assert section.options["url"].value == value.replace("\r\n", "\n")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_toml_writer_round_trips_any_string(value):
    doc = {"guard": {"socket": value}, "hook": [{"command": [value, "x"]}]}
    assert tomllib.loads(dumps_toml(doc)) == doc


# --------------------------------------------------------------------------- lists and types


def test_lists_options_and_their_replacement_rules():
    text = """
config guard 'guard'
	option queue '7-8'
	option mark_mask '0x0000ff00'
	option hold_timeout_s '12.5'

config web 'web'
	option listen '198.18.0.1:8787'
	option tls 'yes'
	list host '198.18.0.1'
	list host 'router.lan'

config hook
	list event 'upload-held'
	list event 'upload-decided'
	list command '/usr/bin/notify'
	list command '--quiet'
	option timeout_s '2'

config hook
	option events 'upload-held upload-decided'
	option url 'http://198.18.0.2/hook'

config device 'nest_mini'
	option mac 'F4-F5-D8-0A-00-12'
	option mode 'strict'
	option mode 'followups'
	list address6 '2001:2:0:10::12'
	list address6 '2001:2:0:10::13'
	option quic 'block'
	option route_mark '0x100'
	list category 'telemetry=block'
	list category 'update=inspect'
"""
    config = config_of(text)
    assert (config.queue, config.queue_count) == (7, 2)
    assert config.mark_mask == 0xFF00
    assert config.hold_timeout_s == 12.5
    assert config.web_tls is True and config.web_hosts == ("198.18.0.1", "router.lan")
    first, second = config.hooks
    assert first.events == ("upload-held", "upload-decided")
    assert first.command == ("/usr/bin/notify", "--quiet") and first.timeout_s == 2.0
    assert second.events == ("upload-held", "upload-decided") and second.url
    (nest,) = config.devices
    assert nest.name == "nest_mini"  # the section's name when there is no option name
    assert nest.mac == "f4:f5:d8:0a:00:12"
    assert nest.mode is Mode.FOLLOWUPS  # a repeated option replaces
    assert nest.address6 == ("2001:2:0:10::12", "2001:2:0:10::13")
    assert nest.quic == "block"
    assert nest.route_mark == 0x100  # as fw4 and pbr write marks
    assert nest.category_action("telemetry") is CategoryAction.BLOCK
    assert nest.category_action("update") is CategoryAction.INSPECT


def test_a_hook_command_option_is_one_path_not_a_shell_line():
    config = config_of("config hook\n\toption command '/usr/bin/notify --x'\n")
    assert config.hooks[0].command == ("/usr/bin/notify --x",)


def test_empty_metrics_listen_turns_metrics_off():
    assert config_of("config metrics 'metrics'\n\toption listen ''\n").metrics_listen is None


def test_defaults_fill_only_what_the_file_leaves_out():
    doc = uci_to_dict("config guard 'guard'\n\toption state_db '/mnt/usb/state.db'\n")
    assert doc["guard"]["state_db"] == "/mnt/usb/state.db"
    assert doc["guard"]["socket"] == OPENWRT_DEFAULTS["socket"]
    assert uci_to_dict("", defaults={}) == {"guard": {}}


def test_disabled_devices_are_left_out_and_later_errors_still_name_their_line():
    text = (
        "config device\n\toption enabled '0'\n\toption name 'a'\n\toption address '198.18.10.1'\n"
        "config device\n\toption name 'b'\n\toption address '198.18.10.2'\n"
        "\toption mode 'loud'\n"
    )
    assert error_line(text) == 8
    config = config_of(text.replace("\toption mode 'loud'\n", ""))
    assert [d.name for d in config.devices] == ["b"]


# --------------------------------------------------------------------------- errors name lines


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("config guard 'guard'\n\toption queue 'seven'\n", 2, "whole number"),
        ("config guard 'guard'\n\n\toption hold_timeout_s '2o'\n", 3, "number"),
        ("config guard 'guard'\n\toption colour 'red'\n", 2, "unknown option"),
        ("\toption queue '7'\n", 1, "before the first config"),
        ("config guard 'guard'\n\tflag queue 7\n", 2, "invalid command"),
        ("config guard 'guard'\n\toption fail 'ajar'\n", 2, "closed, open"),
        ("config guard 'guard'\n\toption mark_mask '0x3'\n", 2, "mark_mask"),
        ("config guard 'guard'\n\toption socket 'a' 'b'\n", 2, "too many values"),
        ("config guard 'guard'\n\toption quic 'hold\n", 2, "unterminated '"),
        ('config hook\n\toption url "http://x\n', 2, 'unterminated "'),
        ("config guard 'guard'\nconfig guard 'other'\n", 2, "second config guard"),
        ("config speaker\n", 1, "unknown section type"),
        ("config device 'bad-name'\n", 1, "invalid section name"),
        ("config guard 'guard'\n\tlist fail 'closed'\n\tlist fail 'open'\n", 3, "one value"),
        ("package network\n", 1, "expected 'hushgate'"),
        ("config device\n\toption name 'x'\n\toption mac '68:db:f5'\n", 3, "MAC"),
        ("config device\n\toption name 'x'\n\toption address '198.18.10.300'\n", 3, "address"),
        ("config device\n\toption name 'x'\n", 1, "needs an address or a mac"),
        ("config device\n\toption name 'x'\n\toption mac '68:db:f5:90:19:64'\n"
         "\tlist category 'telemetry'\n", 4, "CATEGORY=ACTION"),
        ("config device\n\toption name 'x'\n\toption mac '68:db:f5:90:19:64'\n"
         "\tlist category 'weather=block'\n", 4, "unknown category"),
        ("config device\n\toption name 'e'\n\toption mac '68:db:f5:90:19:64'\n"
         "config device\n\toption name 'e'\n\toption mac '68:db:f5:90:19:65'\n", 4, "unique"),
        ("config hook\n\toption timeout_s '5'\n", 1, "command or a url"),
        ("config web 'web'\n\toption tls 'sometimes'\n", 2, "1 or 0"),
    ],
)
def test_bad_input_names_its_line(text, line, words):
    with pytest.raises(UciError) as info:
        uci_to_toml(text)
    assert info.value.line == line, str(info.value)
    assert words in str(info.value)
    assert str(info.value).startswith(f"{line}: ")


def test_uci_error_is_a_config_error_so_the_cli_reports_it_in_one_line():
    with pytest.raises(ConfigError):
        uci_to_config("config guard 'guard'\n\toption queue x\n")


def test_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "hushgate"
    path.write_text("config guard 'guard'\n\toption fail 'ajar'\n")
    with pytest.raises(UciError) as info:
        uci_file_to_config(path)
    assert str(info.value).startswith(f"{path}:2: ")
    with pytest.raises(UciError, match="no such file"):
        uci_file_to_config(tmp_path / "missing")


# --------------------------------------------------------------------------- files for the init script


def test_write_openwrt_files_writes_a_private_toml_and_the_fw4_include(tmp_path):
    uci = tmp_path / "hushgate"
    uci.write_text(shipped_text(enable_device=True))
    toml_path, nft_path = tmp_path / "var/etc/hushgate.toml", tmp_path / "var/etc/hushgate/fw4.nft"
    config = write_openwrt_files(uci, toml_path, nft_path)
    assert config.devices[0].name == "kitchen-echo"
    assert stat.S_IMODE(toml_path.stat().st_mode) == 0o600  # may hold the web password hash
    assert parse_config(tomllib.loads(toml_path.read_text())) == config
    include = nft_path.read_text()
    assert include == fw4_include(config)
    assert "68:db:f5:90:19:64" in include
    assert "queue" not in include.replace("queue_", "")  # no queue statement: fw4 never breaks
    assert "flush chain inet hushgate safety_net" in include  # idempotent on every fw4 reload
    assert "flush chain inet hushgate queue_up" not in include  # keeps the running guard's


def test_write_openwrt_files_writes_nothing_for_an_invalid_file(tmp_path):
    uci = tmp_path / "hushgate"
    uci.write_text("config guard 'guard'\n\toption fail 'ajar'\n")
    toml_path = tmp_path / "hushgate.toml"
    toml_path.write_text("# the last good one\n")
    with pytest.raises(UciError) as info:
        write_openwrt_files(uci, toml_path, tmp_path / "fw4.nft")
    assert str(info.value).startswith(f"{uci}:2:")
    assert toml_path.read_text() == "# the last good one\n"
    assert not (tmp_path / "fw4.nft").exists()


def test_the_iptables_backend_removes_a_stale_fw4_include(tmp_path):
    uci = tmp_path / "hushgate"
    uci.write_text("config guard 'guard'\n\toption backend 'iptables'\n")
    nft_path = tmp_path / "fw4.nft"
    nft_path.write_text("table inet hushgate {}\n")
    write_openwrt_files(uci, tmp_path / "hushgate.toml", nft_path)
    assert not nft_path.exists()


_UCI_PIECES = st.sampled_from([
    "config ", "option ", "list ", "package ", "guard", "device", "hook", "'", '"', "\\", "#",
    ";", "\n", "\t", " ", "=", "name", "mac", "queue", "7", "x", "68:db:f5:90:19:64",
])


@given(st.lists(_UCI_PIECES, max_size=60).map("".join))
def test_any_text_converts_or_fails_with_a_uci_error(text):
    try:
        uci_to_toml(text)
    except UciError as exc:
        assert exc.line is None or exc.line >= 1
