"""The config's one declaration (guard/core/schema.py): TOML parsing, UCI and the docs come from it,
and it cannot drift from the config's dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from guard.core import schema
from guard.core.config import (
    AUDIT_MIN_BYTES,
    ConfigError,
    DeviceConfig,
    GuardConfig,
    Hook,
    MqttConfig,
    parse_config,
)
from guard.tools.cli import main
from guard.tools.uci import uci_to_config

REPO = Path(__file__).resolve().parents[1]
# GuardConfig fields that live in other sections, or are arrays of tables, or derived
_ELSEWHERE = {"metrics_listen": ("metrics", "listen"), "web_listen": ("web", "listen"),
              "web_password_hash": ("web", "password_hash"), "web_tls": ("web", "tls"),
              "web_hosts": ("web", "hosts")}
_NOT_KEYS = {"hooks", "mqtt", "devices"}


def test_docs_config_md_is_the_schemas_output() -> None:
    out = CliRunner().invoke(main, ["config", "keys", "--markdown"])
    assert out.exit_code == 0, out.output
    assert (REPO / "docs" / "config.md").read_text(encoding="utf-8") == out.output, (
        "docs/config.md is stale: hushgate config keys --markdown > docs/config.md")


def test_every_config_field_is_declared_once() -> None:
    for f in dataclasses.fields(GuardConfig):
        if f.name in _NOT_KEYS:
            continue
        section, name = _ELSEWHERE.get(f.name, ("guard", f.name))
        assert name in schema.names(section), f"GuardConfig.{f.name} has no key in the schema"
    for cls, section in ((MqttConfig, "mqtt"), (DeviceConfig, "device"), (Hook, "hook")):
        for f in dataclasses.fields(cls):
            assert f.name in schema.names(section), f"{cls.__name__}.{f.name} is not declared"
    keys = [(k.section, k.name) for k in schema.KEYS]
    assert len(keys) == len(set(keys))


def test_documented_defaults_are_the_real_defaults() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(GuardConfig)}
    for k in schema.KEYS:
        if k.section != "guard" or k.kind not in ("int", "float", "bool", "choice", "str"):
            continue
        value = defaults[k.name]
        if value is None:
            assert k.default == "", k
        elif isinstance(value, bool):
            assert k.default == str(value).lower(), k
        elif isinstance(value, str):
            assert k.default == f'"{value}"', k
        else:
            assert k.default == repr(value), k
    assert schema.key("guard", "audit_max_bytes").minimum == AUDIT_MIN_BYTES


def test_a_misspelt_key_or_section_names_the_one_meant() -> None:
    with pytest.raises(ConfigError, match=r"hold_timeout \(did you mean hold_timeout_s\?\)"):
        parse_config({"guard": {"hold_timeout": 5}})
    with pytest.raises(ConfigError, match=r"gaurd \(did you mean guard\?\)"):
        parse_config({"gaurd": {}})
    with pytest.raises(ConfigError, match=r"adress \(did you mean address\?\)"):
        parse_config({"device": [{"name": "echo", "adress": "198.18.10.10"}]})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) zzz$"):  # nothing close: no guess
        parse_config({"guard": {"zzz": 1}})


def test_declared_bounds_are_enforced() -> None:
    with pytest.raises(ConfigError, match=r"guard.relay_port: at most 65535"):
        parse_config({"guard": {"relay_port": 70000}})
    with pytest.raises(ConfigError, match=r"guard.relay_priority: at most 32765"):
        parse_config({"guard": {"relay_priority": 32766}})
    with pytest.raises(ConfigError, match=r"guard.hold_timeout_s: must be at least 0.1"):
        parse_config({"guard": {"hold_timeout_s": 0}})
    assert parse_config({"guard": {"relay_port": 7412}}).relay_port == 7412


def test_uci_takes_every_guard_key_toml_takes() -> None:
    # Before the schema, UCI's own key lists lacked the relay's keys and reset_midstream.
    config = uci_to_config(
        "config guard 'guard'\n"
        "\toption tcp_hold 'packet'\n"
        "\toption reset_midstream '0'\n"
        "\toption relay_port '7412'\n"
        "\toption relay_mark '0x10000000'\n"
        "\toption relay_table '7412'\n"
        "\toption max_relay_connections '100'\n")
    assert config.tcp_hold == "packet" and config.reset_midstream is False
    assert (config.relay_port, config.relay_mark, config.relay_table) == (7412, 0x10000000, 7412)
    assert config.max_relay_connections == 100
