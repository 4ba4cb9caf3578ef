"""Packaging: the OpenWrt feed, the systemd unit, the default config and the documented
Debian-style install, checked as far as this machine allows.

What runs here: shellcheck and `sh -n` on every shell script (the procd init script with the
directives rc.common scripts need), the feed Makefiles through GNU make against a stub TOPDIR
(their install recipes really run), the init script's start/stop logic against stubbed procd
and uci (the procd jail's flags, mounts, capability file and no_new_privs, and the fallbacks
without it), the jail's capability file against the kernel's capability names and the unit's
CapabilityBoundingSet, `systemd-analyze verify` and `security` on the unit, and a real install:
a clean venv, `pip install` of this repository (non-editable), then in a throw-away network
namespace the installed `hushgate firewall apply`, `hushgate run` and `doctor` inside an
emulation of the unit's sandbox (the capability sets of the jail's capability file, no new
privileges, read-only /, /proc/sys read-only), and the uninstall script, after which no rule,
socket or process may remain.

What cannot run here: an OpenWrt SDK build (no SDK: python3-package.mk, the cross compiler),
procd and ujail themselves (the jail's mounts are checked as the init script's requests, not
as a jail), fw4, and systemd as PID 1 (this container has none: the unit's sandbox is
emulated with unshare/setpriv, not enforced by systemd; SystemCallFilter, PrivateTmp,
PrivateDevices, ProtectProc and the namespace restrictions are not exercised).

Kernel tests are skipped only when not root and $CI is not "true"; in CI they must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from guard.core.config import GuardConfig, load_config, parse_config
from guard.tools.uci import OPENWRT_DEFAULTS
from tests.ci import missing_or_fail, need_root, need_tool

REPO = Path(__file__).resolve().parents[1]
OPENWRT = REPO / "packaging/openwrt"
FILES = OPENWRT / "hushgate/files"
UNIT = REPO / "packaging/systemd/hushgate.service"
CAPS_JSON = FILES / "hushgate.capabilities.json"
CAP_HEADER = Path("/usr/include/linux/capability.h")
CAP_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
UNINSTALL = REPO / "packaging/systemd/uninstall.sh"
DEFAULT_TOML = REPO / "packaging/hushgate.toml"


def sh(*argv: str | Path, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                         **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} -> {res.returncode}\n"
                             f"stdout: {res.stdout}\nstderr: {res.stderr}")
    return res


def shellcheck(path: Path) -> None:
    tool = need_tool("shellcheck", "shellcheck")
    res = sh(tool, "-s", "sh", path, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sh("sh", "-n", path, check=False).returncode == 0


# --------------------------------------------------------------------------- default config


def test_default_config_spells_out_the_safe_defaults():
    config = load_config(DEFAULT_TOML)
    assert config == GuardConfig()  # every written value is the built-in default
    assert config.fail == "closed"
    assert config.metrics_listen == "127.0.0.1:9877"
    assert config.web_listen is None
    text = DEFAULT_TOML.read_text()
    assert 'mode = "monitor"' in text and "first day" in text.lower()


def test_default_config_commented_examples_are_valid_when_uncommented():
    lines = DEFAULT_TOML.read_text().splitlines()
    uncommented = []
    for line in lines:
        m = re.match(r"^# (\[\[?\w+\]\]?|\w+ = .*)$", line)
        if m and not line.startswith("# socket_group") and not line.startswith("# rules_dir"):
            uncommented.append(re.sub(r"\s+# .*$", "", m.group(1)))
        else:
            uncommented.append(line)
    data = tomllib.loads("\n".join(uncommented))
    # the placeholder stands for a real hash, which loading checks as `run` would (issue 16)
    assert data["web"]["password_hash"] == "…"
    from guard.shell.web import hash_password

    data["web"]["password_hash"] = hash_password("correct horse")
    config = parse_config(data)
    assert config.web_listen == "192.168.1.1:8787"
    assert config.hooks[0].command == ("/usr/local/bin/notify",)
    assert config.devices[0].mac == "68:db:f5:90:19:64"


# --------------------------------------------------------------------------- shell scripts


@pytest.mark.parametrize(
    "path",
    [FILES / "hushgate.init", FILES / "hushgate.profile", UNINSTALL],
    ids=["init", "profile", "uninstall"],
)
def test_shell_scripts_pass_shellcheck_and_parse(path):
    shellcheck(path)


def test_init_script_declares_what_rc_common_and_shellcheck_need():
    text = (FILES / "hushgate.init").read_text()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    assert "# shellcheck shell=sh disable=SC2034,SC3043" in text
    for needed in ("USE_PROCD=1", "START=19", "procd_add_reload_trigger \"hushgate\"",
                   "procd_set_param respawn", "firewall apply --config",
                   "config from-uci --input"):
        assert needed in text, needed


# --------------------------------------------------------------------------- init script logic

INIT_HARNESS = r"""
LOG=$1; STUB=$2; TMP=$3; shift 3
# The script must not touch the host: mkdir, chmod and rm outside $TMP are refused and logged.
outside_tmp() {
	for a in "$@"; do
		case "$a" in -* | [0-7][0-7][0-7] | [0-7][0-7][0-7][0-7] | "$TMP"/*) ;; *) return 0 ;; esac
	done
	return 1
}
for tool in mkdir chmod rm; do
	eval "$tool() {
		if outside_tmp \"\$@\"; then echo \"refused: $tool \$*\" >>\"\$LOG\"; return 1; fi
		command $tool \"\$@\"
	}"
done
config_load() { :; }
config_get_bool() {
	case "$3" in
	enabled) eval "$1=\${STUB_ENABLED:-0}" ;;
	jail) eval "$1=\${STUB_JAIL:-\$4}" ;;
	*) eval "$1=\$4" ;;
	esac
}
config_get() { eval "$1=\${STUB_OPT_$3-\$4}"; }
procd_open_instance() { echo "procd_open_instance" >>"$LOG"; }
procd_set_param() { echo "procd_set_param $*" >>"$LOG"; }
procd_add_jail() { echo "procd_add_jail $*" >>"$LOG"; }
procd_add_jail_mount() { echo "procd_add_jail_mount $*" >>"$LOG"; }
procd_add_jail_mount_rw() { echo "procd_add_jail_mount_rw $*" >>"$LOG"; }
procd_close_instance() { echo "procd_close_instance" >>"$LOG"; }
procd_add_reload_trigger() { echo "reload_trigger $*" >>"$LOG"; }
extra_command() { echo "extra_command $1" >>"$LOG"; }
logger() { echo "logger $*" >>"$LOG"; }
uci() {
	case "$*" in
	*flow_offloading_hw*) [ -n "${STUB_OFFLOAD_HW:-}" ] && echo "$STUB_OFFLOAD_HW" ;;
	*flow_offloading*) [ -n "${STUB_OFFLOAD:-}" ] && echo "$STUB_OFFLOAD" ;;
	esac
	return 0
}
. "$INIT"
HUSHGATE=$STUB
UCI_FILE=$TMP/etc/config/hushgate
TOML=$TMP/var/etc/hushgate.toml
FW4_DIR=$TMP/var/etc/hushgate
FW4_INCLUDE=$TMP/var/etc/hushgate/fw4.nft
STATE_DB=$TMP/etc/hushgate/state.db
SOCKET=$TMP/var/run/hushgate/control.sock
UJAIL=$TMP/sbin/ujail
CAPABILITIES=$TMP/etc/capabilities/hushgate.json
"$@"
echo "rc=$?" >>"$LOG"
"""

STUB_HUSHGATE = r"""#!/bin/sh
echo "hushgate $*" >>"$LOG"
case "$*" in
"config from-uci"*) [ -n "${STUB_FAIL_UCI:-}" ] && { echo "hushgate: 12: bad" >&2; exit 1; }
	touch "$TOML_OUT" ;;
"firewall apply"*) [ -n "${STUB_FAIL_APPLY:-}" ] && exit 1 ;;
esac
exit 0
"""


def run_init(tmp_path: Path, function: str, **env: str) -> list[str]:
    log = tmp_path / "log"
    log.write_text("")
    stub = tmp_path / "hushgate-stub"
    stub.write_text(STUB_HUSHGATE)
    stub.chmod(0o755)
    harness = tmp_path / "harness.sh"
    harness.write_text(INIT_HARNESS)
    full_env = {"PATH": os.environ["PATH"], "INIT": str(FILES / "hushgate.init"),
                "LOG": str(log), "TOML_OUT": str(tmp_path / "var/etc/hushgate.toml"), **env}
    sh("sh", harness, log, stub, tmp_path, function, env=full_env)
    lines = log.read_text().splitlines()
    assert not [ln for ln in lines if ln.startswith("refused:")], lines
    return lines


def test_init_start_converts_applies_the_safety_net_then_starts_the_guard(tmp_path):
    log = run_init(tmp_path, "start_service", STUB_ENABLED="1")
    toml = f"{tmp_path}/var/etc/hushgate.toml"
    calls = [ln for ln in log if ln.startswith(("hushgate ", "procd_open"))]
    assert calls == [
        f"hushgate config from-uci --input {tmp_path}/etc/config/hushgate --output {toml} "
        f"--fw4-include {tmp_path}/var/etc/hushgate/fw4.nft",
        f"hushgate firewall apply --config {toml}",
        "procd_open_instance",
        "procd_open_instance",  # the health check's
    ]
    assert f"procd_set_param command {tmp_path}/hushgate-stub run --config {toml}" in log
    # respawned, but not forever: a config error (exit 78) must not loop (issue 16)
    assert "procd_set_param respawn 60 10 10" in log
    health = next(ln for ln in log if ln.startswith("procd_set_param command /bin/sh"))
    assert f"health --config {toml} --kill-hung" in health and "while sleep 60" in health
    assert f"procd_set_param file {tmp_path}/etc/config/hushgate {toml}" in log
    assert log[-1] == "rc=0"
    assert stat.S_IMODE((tmp_path / "etc/hushgate").stat().st_mode) == 0o700
    assert (tmp_path / "var/run/hushgate").is_dir()
    # no ujail here: unjailed, and the log says so
    assert not [ln for ln in log if "jail" in ln and ln.startswith("procd_")]
    assert any("procd-ujail" in ln and "full root" in ln for ln in log if ln.startswith("logger"))


def test_init_start_does_nothing_while_disabled(tmp_path):
    log = run_init(tmp_path, "start_service", STUB_ENABLED="0")
    assert not [ln for ln in log if ln.startswith(("hushgate ", "procd_open"))]
    assert any("disabled" in ln for ln in log) and log[-1] == "rc=0"


def test_init_start_with_an_invalid_uci_file_changes_nothing(tmp_path):
    log = run_init(tmp_path, "start_service", STUB_ENABLED="1", STUB_FAIL_UCI="1")
    assert not [ln for ln in log if "firewall apply" in ln or ln == "procd_open_instance"]
    assert any(ln.startswith("logger -t hushgate -p daemon.err") for ln in log)
    assert log[-1] == "rc=1"


def test_init_start_refuses_the_guard_while_flow_offloading_is_on(tmp_path):
    for flag in ("STUB_OFFLOAD", "STUB_OFFLOAD_HW"):
        log = run_init(tmp_path, "start_service", STUB_ENABLED="1", **{flag: "1"})
        assert any("firewall apply" in ln for ln in log)  # the safety net is installed ...
        assert "procd_open_instance" not in log  # ... but no guard pretends to guard
        err = next(ln for ln in log if "daemon.err" in ln)
        assert "flow_offloading=0" in err and "fw4 reload" in err
        assert log[-1] == "rc=1"


def with_jail_tools(tmp_path: Path, ujail: bool = True, capabilities: bool = True) -> None:
    """What the harness's UJAIL and CAPABILITIES point at: an executable ujail, the shipped
    capability file."""
    if ujail:
        tool = tmp_path / "sbin/ujail"
        tool.parent.mkdir(parents=True, exist_ok=True)
        tool.write_text("#!/bin/sh\nexit 1\n")
        tool.chmod(0o755)
    if capabilities:
        caps = tmp_path / "etc/capabilities/hushgate.json"
        caps.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CAPS_JSON, caps)


def instance_calls(log: list[str]) -> list[str]:
    """The procd calls between procd_open_instance and procd_close_instance."""
    start, end = log.index("procd_open_instance"), log.index("procd_close_instance")
    return log[start + 1:end]


def jail_mounts(calls: list[str]) -> tuple[list[str], list[str]]:
    ro = [w for ln in calls if ln.startswith("procd_add_jail_mount ") for w in ln.split()[1:]]
    rw = [w for ln in calls if ln.startswith("procd_add_jail_mount_rw ") for w in ln.split()[1:]]
    return ro, rw


# What the guard needs in the jail and where OpenWrt keeps it: python3 and its modules and C
# extensions (/usr/bin, /usr/lib; musl and libgcc in /lib), the tools it runs (nft, iptables,
# conntrack in /usr/sbin; ip in /sbin, a link into /usr/libexec or to busybox in /bin), the DHCP
# leases it reads for address-only devices (guard.shell.neighbours.DEFAULT_LEASE_FILES on OpenWrt).
JAIL_NEEDS_RO = {"/usr/bin", "/usr/lib", "/lib", "/usr/sbin", "/sbin", "/bin", "/usr/libexec",
                 "/tmp/dhcp.leases", "/tmp/hosts"}
# What must never be visible writable (secrets, other daemons' state, ubus) or at all (ubus:
# root on ubus may call anything, e.g. rc or file.write).
JAIL_NEVER = {"/", "/etc", "/etc/config", "/tmp", "/var", "/var/run", "/tmp/run",
              "/var/run/ubus", "/var/run/ubus/ubus.sock", "/overlay", "/root", "/dev"}


def test_init_jails_the_guard_with_only_the_capabilities_and_paths_it_needs(tmp_path):
    with_jail_tools(tmp_path)
    log = run_init(tmp_path, "start_service", STUB_ENABLED="1")
    assert log[-1] == "rc=0"
    toml = f"{tmp_path}/var/etc/hushgate.toml"
    calls = instance_calls(log)
    command = next(ln for ln in calls if ln.startswith("procd_set_param command "))
    argv = command.split()[2:]
    assert argv[0] == "/usr/bin/env" and argv[1].startswith("PATH=")
    assert argv[2:] == [f"{tmp_path}/hushgate-stub", "run", "--config", toml]
    jails = [ln for ln in calls if ln.startswith("procd_add_jail ")]
    assert len(jails) == 1
    name, *flags = jails[0].split()[1:]
    # the host's network namespace (no netns), no ubus; /proc for /proc/sys/net/ipv6
    assert name == "hushgate" and set(flags) == {"log", "procfs"}
    ro, rw = jail_mounts(calls)
    assert len(ro) == len(set(ro)) and len(rw) == len(set(rw))
    assert JAIL_NEEDS_RO <= set(ro)
    assert toml in ro
    assert set(argv[1].removeprefix("PATH=").split(":")) <= set(ro)  # every tool it looks up
    assert set(rw) == {f"{tmp_path}/etc/hushgate", f"{tmp_path}/var/run/hushgate",
                       "/run/xtables.lock", "/var/run/xtables.lock"}
    assert not (set(ro) | set(rw)) & JAIL_NEVER
    assert f"procd_set_param capabilities {tmp_path}/etc/capabilities/hushgate.json" in calls
    assert "procd_set_param no_new_privs 1" in calls
    # the mounted directories exist before the jail starts (a missing one would be skipped)
    assert stat.S_IMODE((tmp_path / "etc/hushgate").stat().st_mode) == 0o700
    assert (tmp_path / "var/run/hushgate").is_dir()
    assert not [ln for ln in log if ln.startswith("logger")]


def test_init_jail_mounts_follow_the_configured_state_socket_and_rules(tmp_path):
    with_jail_tools(tmp_path)
    state_db = tmp_path / "mnt/usb/hushgate/state.db"
    socket = tmp_path / "tmp/run/hg/guard.sock"
    log = run_init(tmp_path, "start_service", STUB_ENABLED="1", STUB_OPT_state_db=str(state_db),
                   STUB_OPT_socket=str(socket), STUB_OPT_rules_dir="/etc/hushgate-rules")
    ro, rw = jail_mounts(instance_calls(log))
    assert set(rw) == {str(state_db.parent), str(socket.parent),
                       "/run/xtables.lock", "/var/run/xtables.lock"}
    assert "/etc/hushgate-rules" in ro and f"{tmp_path}/etc/hushgate" not in rw
    assert state_db.parent.is_dir() and socket.parent.is_dir()
    assert stat.S_IMODE(state_db.parent.stat().st_mode) == 0o700
    # the socket next to the database: one writable directory
    log = run_init(tmp_path, "start_service", STUB_ENABLED="1", STUB_OPT_state_db=str(state_db),
                   STUB_OPT_socket=str(state_db.parent / "control.sock"))
    _, rw = jail_mounts(instance_calls(log))
    assert rw.count(str(state_db.parent)) == 1


@pytest.mark.parametrize(
    ("setup", "env", "reason"),
    [
        ({"ujail": False}, {}, "procd-ujail"),
        ({}, {"STUB_JAIL": "0"}, "hushgate.guard.jail=0"),
        ({"capabilities": False}, {}, "hushgate.json is missing"),
        ({}, {"STUB_OPT_socket_group": "hushgate"}, "CAP_CHOWN"),
        ({}, {"STUB_OPT_state_db": "state.db"}, "not relative"),
        ({}, {"STUB_OPT_socket": "/var/run/control.sock"}, "not /var/run"),
        ({}, {"STUB_OPT_state_db": "/etc/state.db"}, "not /etc"),
    ],
    ids=["no-ujail", "jail-0", "no-capability-file", "socket-group", "relative-state-db",
         "socket-beside-ubus", "state-db-in-etc"],
)
def test_init_without_the_jail_runs_the_guard_as_before_and_says_so(tmp_path, setup, env, reason):
    with_jail_tools(tmp_path, **setup)
    log = run_init(tmp_path, "start_service", STUB_ENABLED="1", **env)
    assert log[-1] == "rc=0"
    calls = instance_calls(log)
    toml = f"{tmp_path}/var/etc/hushgate.toml"
    assert f"procd_set_param command {tmp_path}/hushgate-stub run --config {toml}" in calls
    assert not [ln for ln in calls if ln.startswith("procd_add_jail")]
    assert not [ln for ln in calls if ln.split()[1:2] in (["capabilities"], ["no_new_privs"])]
    said = [ln for ln in log if ln.startswith("logger -t hushgate") and "full root" in ln]
    assert len(said) == 1 and reason in said[0], log


def init_values(*names: str) -> dict[str, str]:
    """Variables the init script sets for itself (sourced with rc.common's extra_command)."""
    script = f'extra_command() {{ :; }}\n. "{FILES / "hushgate.init"}"\n' + "".join(
        f'printf "%s=%s\\n" {n} "${n}"\n' for n in names)
    out = sh("sh", "-c", script).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_init_paths_agree_with_the_converter_procd_and_the_package():
    values = init_values("STATE_DB", "SOCKET", "UJAIL", "CAPABILITIES", "JAIL_ENV")
    # the UCI file may leave state_db and socket out: the converter then uses its defaults
    assert values["STATE_DB"] == OPENWRT_DEFAULTS["state_db"]
    assert values["SOCKET"] == OPENWRT_DEFAULTS["socket"]
    assert values["UJAIL"] == "/sbin/ujail"  # procd's UJAIL_BIN_PATH (service/instance.c)
    assert values["JAIL_ENV"] == "/usr/bin/env"  # busybox's env applet on OpenWrt
    _, defines, _ = makefile_vars(OPENWRT / "hushgate/Makefile")
    recipe = defines["Py3Package/hushgate/install"]
    installed = re.search(r"\./files/hushgate\.capabilities\.json \$\(1\)(\S+)", recipe)
    assert installed and installed.group(1) == values["CAPABILITIES"]


def test_init_reloads_on_config_changes_and_remove_takes_the_safety_net_away(tmp_path):
    assert "reload_trigger hushgate" in run_init(tmp_path, "service_triggers")
    (tmp_path / "var/etc/hushgate").mkdir(parents=True)
    (tmp_path / "var/etc/hushgate.toml").write_text("")
    include = tmp_path / "var/etc/hushgate/fw4.nft"
    include.write_text("table inet hushgate {}\n")
    log = run_init(tmp_path, "remove")
    assert f"hushgate firewall remove --config {tmp_path}/var/etc/hushgate.toml" in log
    assert not include.exists()


# --------------------------------------------------------------------------- feed Makefiles


def makefile_vars(path: Path) -> tuple[dict[str, str], dict[str, str], str]:
    """(simple `NAME:=value` assignments, `define NAME ... endef` bodies, the text)."""
    text = path.read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    defines = dict(re.findall(r"^define (\S+)\n(.*?)^endef$", text, re.S | re.M))
    outside = re.sub(r"^define .*?^endef$", "", joined, flags=re.S | re.M)
    assigns = {k: v.strip() for k, v in re.findall(r"^([A-Z0-9_]+)\s*:?=\s*(.*)$", outside, re.M)}
    return assigns, defines, text


FEED = {
    "hushgate": ("hushgate", None),
    "python-netfilterqueue": ("python3-netfilterqueue", "NetfilterQueue"),
    "python-dpkt": ("python3-dpkt", "dpkt"),
    "python-prometheus-client": ("python3-prometheus-client", "prometheus_client"),
}


@pytest.mark.parametrize("directory", sorted(FEED))
def test_feed_makefiles_follow_the_packages_feed_conventions(directory):
    package, pypi = FEED[directory]
    assigns, defines, text = makefile_vars(OPENWRT / directory / "Makefile")
    first = next(ln for ln in text.splitlines() if ln and not ln.startswith("#"))
    assert first == "include $(TOPDIR)/rules.mk"
    for var in ("PKG_NAME", "PKG_VERSION", "PKG_RELEASE", "PKG_LICENSE", "PKG_MAINTAINER"):
        assert assigns.get(var), var
    assert assigns["PKG_NAME"] == directory
    assert "include $(INCLUDE_DIR)/package.mk" in text
    assert "include $(TOPDIR)/feeds/packages/lang/python/python3-package.mk" in text
    assert text.index("include $(INCLUDE_DIR)/package.mk") < text.index(
        "include $(TOPDIR)/feeds/packages/lang/python/python3-package.mk")
    for field_ in ("SECTION", "CATEGORY", "TITLE", "URL", "DEPENDS"):
        assert re.search(rf"^\s+{field_}:=", defines[f"Package/{package}"], re.M), field_
    assert f"Package/{package}/description" in defines
    assert f"$(eval $(call Py3Package,{package}))" in text
    assert f"$(eval $(call BuildPackage,{package}))" in text
    assert "+python3-light" in defines[f"Package/{package}"]
    if pypi is not None:
        assert assigns["PYPI_NAME"] == pypi
        assert re.fullmatch(r"[0-9a-f]{64}", assigns["PKG_HASH"])
        assert "include $(TOPDIR)/feeds/packages/lang/python/pypi.mk" in text
        assert text.index("lang/python/pypi.mk") < text.index("include $(INCLUDE_DIR)/package.mk")
    for recipe in [body for name, body in defines.items() if "install" in name or "Build/" in name]:
        for line in recipe.splitlines():
            assert not line or line.startswith(("\t", "+|", "-|", "#")), (directory, line)


def test_hushgate_package_depends_on_the_runtime_and_the_nft_queue():
    _, defines, text = makefile_vars(OPENWRT / "hushgate/Makefile")
    depends = defines["Package/hushgate"]
    for dep in ("+python3-light", "+python3-sqlite3", "+python3-click", "+python3-logging",
                "+python3-cryptography", "+python3-netfilterqueue", "+python3-prometheus-client",
                "+kmod-nft-queue", "+libnetfilter-queue", "+conntrack"):
        assert dep in depends, dep
    assert "kmod-ipt-nfqueue" in text  # the documented iptables alternative
    assert defines["Package/hushgate/conffiles"].strip() == "/etc/config/hushgate"
    # the feed provides what the packages feed lacks
    for dep in ("python3-netfilterqueue", "python3-prometheus-client"):
        assert any(FEED[d][0] == dep for d in FEED)


def test_hushgate_package_version_is_the_projects():
    assigns, _, _ = makefile_vars(OPENWRT / "hushgate/Makefile")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert assigns["PKG_VERSION"] == project["version"]


def test_every_file_the_install_recipe_names_exists():
    _, defines, _ = makefile_vars(OPENWRT / "hushgate/Makefile")
    named = re.findall(r"\./files/(\S+)", defines["Py3Package/hushgate/install"])
    assert named and all((FILES / n).is_file() for n in named)
    assert sorted(named) == sorted(p.name for p in FILES.iterdir())


# A stub of the OpenWrt build system: just enough of rules.mk, package.mk and the packages feed
# for GNU make to parse the feed Makefiles and run their install and prepare recipes.
STUB_RULES = """\
INCLUDE_DIR:=$(TOPDIR)/include
BUILD_DIR:=$(TOPDIR)/build
INSTALL_DIR:=install -d -m0755
INSTALL_BIN:=install -m0755
INSTALL_DATA:=install -m0644
INSTALL_CONF:=install -m0600
CP:=cp -fpR
"""
STUB_PACKAGE = """\
PKG_BUILD_DIR ?= $(BUILD_DIR)/$(PKG_NAME)-$(PKG_VERSION)
PKG_INSTALL_DIR ?= $(PKG_BUILD_DIR)/ipkg-install
define Build/Prepare/Default
	mkdir -p $(PKG_BUILD_DIR)
endef
define BuildPackage
stub-info-$(1):
	@echo 'DEPENDS=$$(strip $$(DEPENDS))'
stub-install-$(1):
	$$(call Py3Package/$(1)/install,$$(DEST))
stub-scripts-$(1):
	$$(file >$$(DEST)/prerm,$$(Package/$(1)/prerm))
	$$(file >$$(DEST)/conffiles,$$(Package/$(1)/conffiles))
stub-prepare-$(1):
	$$(Build/Prepare)
$$(eval $$(Package/$(1)))
endef
"""
STUB_PY3 = """\
PYTHON3_PKG_DIR:=/usr/lib/python3.11/site-packages
define Py3Package
endef
"""


@pytest.fixture()
def topdir(tmp_path: Path) -> Path:
    need_tool("make", "make")
    top = tmp_path / "top"
    (top / "include").mkdir(parents=True)
    (top / "rules.mk").write_text(STUB_RULES)
    (top / "include/package.mk").write_text(STUB_PACKAGE)
    py = top / "feeds/packages/lang/python"
    py.mkdir(parents=True)
    (py / "python3-package.mk").write_text(STUB_PY3)
    (py / "pypi.mk").write_text("PKG_SOURCE?=$(PYPI_NAME)-$(PKG_VERSION).tar.gz\n")
    return top


def stub_make(topdir: Path, directory: str, target: str, **variables: str) -> str:
    args = [f"TOPDIR={topdir}", *(f"{k}={v}" for k, v in variables.items())]
    res = sh("make", "--no-print-directory", "-C", OPENWRT / directory, "-f", "Makefile", *args,
             target)
    return res.stdout


@pytest.mark.parametrize("directory", sorted(FEED))
def test_feed_makefiles_parse_with_gnu_make(topdir, directory):
    out = stub_make(topdir, directory, f"stub-info-{FEED[directory][0]}")
    assert "+python3-light" in out


def test_hushgate_install_recipe_puts_every_file_in_place(topdir, tmp_path):
    build = tmp_path / "build"
    (build / "ipkg-install/usr/bin").mkdir(parents=True)
    (build / "ipkg-install/usr/bin/hushgate").write_text("#!/usr/bin/python3\n")
    dest = tmp_path / "root"
    stub_make(topdir, "hushgate", "stub-install-hushgate", DEST=str(dest),
              PKG_BUILD_DIR=str(build))
    modes = {
        "usr/bin/hushgate": None,
        "etc/init.d/hushgate": 0o755,
        "etc/config/hushgate": 0o600,
        "usr/share/nftables.d/ruleset-post/90-hushgate.nft": 0o644,
        "etc/profile.d/hushgate.sh": 0o644,
        "etc/capabilities/hushgate.json": 0o644,
    }
    for rel, mode in modes.items():
        path = dest / rel
        assert path.is_file(), rel
        if mode is not None:
            assert stat.S_IMODE(path.stat().st_mode) == mode, rel
    assert (dest / "etc/hushgate").is_dir()
    assert (dest / "etc/config/hushgate").read_text() == (FILES / "hushgate.config").read_text()
    # where the init script looks for the jail's capability file
    caps = init_values("CAPABILITIES")["CAPABILITIES"]
    assert (dest / caps.lstrip("/")).read_bytes() == CAPS_JSON.read_bytes()


def test_hushgate_prerm_and_conffiles(topdir, tmp_path):
    stub_make(topdir, "hushgate", "stub-scripts-hushgate", DEST=str(tmp_path))
    prerm = tmp_path / "prerm"
    text = prerm.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert '[ -n "${IPKG_INSTROOT}" ] && exit 0' in text  # $$ became $
    assert "hushgate firewall remove" in text and "rm -rf /var/etc/hushgate" in text
    shellcheck(prerm)
    assert (tmp_path / "conffiles").read_text().strip() == "/etc/config/hushgate"


def test_netfilterqueue_prepare_drops_the_stale_generated_c(topdir, tmp_path):
    build = tmp_path / "nfq"
    (build / "netfilterqueue").mkdir(parents=True)
    (build / "netfilterqueue/_impl.c").write_text("/* Generated by Cython 0.29.26 */\n")
    (build / "netfilterqueue/_impl.pyx").write_text("# source\n")
    stub_make(topdir, "python-netfilterqueue", "stub-prepare-python3-netfilterqueue",
              PKG_BUILD_DIR=str(build))
    assert not (build / "netfilterqueue/_impl.c").exists()
    assert (build / "netfilterqueue/_impl.pyx").exists()
    assigns, _, _ = makefile_vars(OPENWRT / "python-netfilterqueue/Makefile")
    assert "python-cython/host" in assigns["PKG_BUILD_DEPENDS"]
    assert "libnetfilter-queue" in assigns["PKG_BUILD_DEPENDS"]


# --------------------------------------------------------------------------- the jail's capabilities


def kernel_capabilities() -> dict[str, int]:
    """CAP_* name -> number, from the kernel's UAPI header (what procd's capabilities-names.h
    is generated from)."""
    if not CAP_HEADER.is_file():
        missing_or_fail(f"{CAP_HEADER} is missing (apt-get install linux-libc-dev)")
    found = re.findall(r"^#define\s+(CAP_[A-Z0-9_]+)\s+(\d+)\s*$", CAP_HEADER.read_text(), re.M)
    return {name: int(number) for name, number in found}


def jail_capabilities() -> dict[str, list[str]]:
    return json.loads(CAPS_JSON.read_text())


def unit_capabilities() -> set[str]:
    (bound,) = unit_directives(UNIT.read_text())["CapabilityBoundingSet"]
    return set(bound.split())


def test_jail_capability_file_names_real_capabilities_in_every_set():
    kernel = kernel_capabilities()
    assert len(kernel) > 30 and kernel["CAP_NET_ADMIN"] == 12  # the header was parsed
    caps = jail_capabilities()
    # ujail reads these five arrays; a misspelt key would silently mean an empty set
    assert sorted(caps) == sorted(CAP_SETS)
    for key, names in caps.items():
        assert isinstance(names, list) and len(names) == len(set(names)), key
        for name in names:
            # ujail compares case-insensitively; the file spells them as the kernel does
            assert name in kernel, f"{key}: {name!r} is not a capability of this kernel"
    sets = {key: set(names) for key, names in caps.items()}
    # what the kernel allows: nothing outside the bounding set, ambient only within permitted
    # and inheritable (PR_CAP_AMBIENT_RAISE), effective within permitted
    for key in ("effective", "inheritable", "permitted", "ambient"):
        assert sets[key] <= sets["bounding"], key
    assert sets["ambient"] <= sets["permitted"] & sets["inheritable"]
    assert sets["effective"] <= sets["permitted"]


def test_jail_capabilities_are_the_units_capability_bound():
    """One set of privileges for both packagings: every set of the jail's file is the unit's
    CapabilityBoundingSet (which the sandboxed lifecycle test below proves sufficient)."""
    unit = unit_capabilities()
    assert unit  # the unit does bound them
    for key, names in jail_capabilities().items():
        assert set(names) == unit, key


def test_default_listen_ports_need_no_bind_capability():
    """Neither packaging grants CAP_NET_BIND_SERVICE: every shipped listen address (metrics,
    and the commented web examples) must use a port of 1024 or more."""
    assert "CAP_NET_BIND_SERVICE" not in unit_capabilities()
    listens = [GuardConfig().metrics_listen]
    for path in (DEFAULT_TOML, FILES / "hushgate.config"):
        listens += re.findall(r"""listen[ =]+['"]([^'"]+)['"]""", path.read_text())
    ports = [int(a.rpartition(":")[2]) for a in listens if a]
    assert len(ports) >= 5 and min(ports) >= 1024, listens


# --------------------------------------------------------------------------- systemd unit


def unit_directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_is_hardened_and_runs_the_documented_commands():
    d = unit_directives(UNIT.read_text())
    cfg = "/etc/hushgate/hushgate.toml"
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] == ["30s"]  # pinged from the packet loop (issue 16 point 4)
    assert d["ExecStartPre"] == [f"-/opt/hushgate/bin/hushgate firewall apply --config {cfg}"]
    assert d["ExecStart"] == [f"/opt/hushgate/bin/hushgate run --config {cfg}"]
    assert d["Restart"] == ["on-failure"]
    from guard.shell.daemon import EXIT_CONFIG

    assert d["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]  # no restart loop on bad config
    assert d["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert d["StateDirectory"] == ["hushgate"] and d["RuntimeDirectory"] == ["hushgate"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                "ProtectControlGroups", "RestrictNamespaces", "LockPersonality",
                "MemoryDenyWriteExecute", "ProtectKernelModules", "PrivateDevices"):
        assert d[key] == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
    assert d["SystemCallArchitectures"] == ["native"]
    assert "User" not in d  # root with a bounded capability set: `run` requires uid 0
    assert "ProcSubset" not in d  # would hide /proc/sys/net/ipv6 and skip the IPv6 rules
    assert "network-pre.target" in " ".join(d["Before"])
    assert "nftables.service" in " ".join(d["After"])


def verify_unit(text: str, directory: Path) -> None:
    tool = need_tool("systemd-analyze", "systemd")
    unit = directory / "hushgate.service"
    unit.write_text(text)
    res = sh(tool, "verify", unit, check=False)
    # verify exits 0 even for ignored unknown keys: demand silence, not only success
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), (
        res.stdout + res.stderr)
    sec = sh(tool, "security", "--offline=yes", unit, check=False)
    m = re.search(r"Overall exposure level for hushgate\.service: ([0-9.]+)", sec.stdout)
    assert m, sec.stdout + sec.stderr
    assert float(m.group(1)) <= 3.0, sec.stdout


def rewrite_unit(hushgate: Path, config: Path) -> str:
    """The unit with its binary and config pointing at an install that exists (verify checks
    that ExecStart's binary is executable): the only difference from the shipped unit."""
    text = UNIT.read_text()
    text = text.replace("/opt/hushgate/bin/hushgate", str(hushgate))
    return text.replace("/etc/hushgate/hushgate.toml", str(config))


def test_unit_passes_systemd_analyze_verify_pointed_at_this_venv(tmp_path):
    hushgate = Path(sys.executable).parent / "hushgate"
    if not hushgate.exists():
        missing_or_fail("no hushgate console script next to this interpreter")
    verify_unit(rewrite_unit(hushgate, DEFAULT_TOML), tmp_path)


# --------------------------------------------------------------------------- the Debian-style install


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A clean venv with this repository pip-installed (not editable), like /opt/hushgate."""
    root = tmp_path_factory.mktemp("install")
    venv = root / "opt/hushgate"
    sh(sys.executable, "-m", "venv", venv, timeout=300)
    res = sh(venv / "bin/python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             REPO, check=False, timeout=900)
    assert res.returncode == 0, f"pip install {REPO} failed:\n{res.stdout}\n{res.stderr}"
    return venv


def test_installed_wheel_ships_the_rules_and_works_from_any_directory(installed, tmp_path):
    site = next((installed / "lib").glob("python3*/site-packages"))
    assert (site / "guard/rules/amazon.toml").is_file()
    assert not (site / "guard/__init__.py").resolve().is_relative_to(REPO)  # not editable
    res = sh(installed / "bin/hushgate", "rules", "check", cwd=tmp_path)
    assert res.stdout.startswith("ok:") and "amazon" in res.stdout
    assert "0.1.0" in sh(installed / "bin/hushgate", "--version", cwd=tmp_path).stdout


def test_installed_unit_and_config_verify(installed, tmp_path):
    root = tmp_path / "root"
    (root / "etc/hushgate").mkdir(parents=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    config = root / "etc/hushgate/hushgate.toml"
    shutil.copy(DEFAULT_TOML, config)
    verify_unit(rewrite_unit(installed / "bin/hushgate", config), root / "etc/systemd/system")
    shown = sh(installed / "bin/hushgate", "firewall", "show", "--config", config, cwd=tmp_path)
    assert "HUSHGATE_NET" in shown.stdout


# The unit's sandbox, emulated (there is no systemd here): the directories of StateDirectory= and
# RuntimeDirectory= stay writable, everything else but /dev, /proc and /sys becomes read-only
# (ProtectSystem=strict), /proc/sys too (ProtectKernelTunables=yes), and the command runs as root
# with no new privileges and the capability sets of the OpenWrt jail's file (what ujail applies:
# bounding, inheritable, ambient; root's permitted and effective sets follow from them at exec),
# which tests above hold equal to the unit's CapabilityBoundingSet: one live proof for both. (The
# unit leaves inheritable and ambient empty; for root, permitted and effective are the bounding
# set at every exec either way, so the guard and its children hold the same privileges.)
SANDBOX = r"""#!/bin/sh
set -eu
writable=""
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do writable="$writable $1"; shift; done
shift
for d in $writable; do mount --bind "$d" "$d"; done
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
awk '{print $2}' /proc/self/mounts | sort -u | while read -r m; do
	case "$m" in /proc | /proc/* | /sys | /sys/* | /dev | /dev/*) continue ;; esac
	for d in $writable; do [ "$m" = "$d" ] && continue 2; done
	mount -o remount,bind,ro "$m" 2>/dev/null || true
done
exec setpriv @CAPS@ --no-new-privs -- "$@"
"""


def setpriv_caps(caps: dict[str, list[str]]) -> str:
    """setpriv's options for the jail file's bounding, inheritable and ambient sets."""

    def spec(names: list[str]) -> str:
        return ",".join(["-all", *(f"+{n.lower().removeprefix('cap_')}" for n in names)])

    return (f"--bounding-set={spec(caps['bounding'])} --inh-caps={spec(caps['inheritable'])} "
            f"--ambient-caps={spec(caps['ambient'])}")


def process_capabilities(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    found = dict(re.findall(r"^Cap(Inh|Prm|Eff|Bnd|Amb):\s+([0-9a-f]+)$", status, re.M))
    return {key: int(value, 16) for key, value in found.items()}


def test_debian_install_lifecycle_in_a_namespace_leaves_nothing_behind(installed, tmp_path):
    """Safety net, guard and doctor under the unit's (emulated) sandbox in a throw-away
    namespace, then the uninstall script: no rule, no socket, no process may remain."""
    need_root()
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"), ("unshare", "util-linux"),
                          ("setpriv", "util-linux")):
        need_tool(tool, package)
    ns = f"hgpkg{os.getpid()}"
    state, runtime, etc = tmp_path / "state", tmp_path / "run", tmp_path / "etc/hushgate"
    for d in (state, runtime, etc):
        d.mkdir(parents=True)
    config = etc / "hushgate.toml"
    config.write_text(
        DEFAULT_TOML.read_text()
        .replace('socket = "/run/hushgate/control.sock"', f'socket = "{runtime}/control.sock"')
        .replace('state_db = "/var/lib/hushgate/state.db"', f'state_db = "{state}/state.db"')
        + '\n[[device]]\nname = "kitchen-echo"\nmac = "02:00:5e:10:00:10"\n'
        'address = "198.18.10.10"\nmode = "strict"\n'
    )
    caps = jail_capabilities()
    kernel = kernel_capabilities()
    sandbox = tmp_path / "sandbox.sh"
    sandbox.write_text(SANDBOX.replace("@CAPS@", setpriv_caps(caps)))
    sandbox.chmod(0o755)
    unit = tmp_path / "systemd/hushgate.service"
    unit.parent.mkdir()
    unit.write_text(rewrite_unit(installed / "bin/hushgate", config))
    link = tmp_path / "bin/hushgate"
    link.parent.mkdir()
    link.symlink_to(installed / "bin/hushgate")
    hushgate = str(installed / "bin/hushgate")

    def in_ns(*argv: str | Path) -> list[str]:
        return ["ip", "netns", "exec", ns, *map(str, argv)]

    def sandboxed(*argv: str | Path) -> list[str]:
        return in_ns("unshare", "-m", "--propagation", "private", sandbox, state, runtime, "--",
                     *argv)

    guard: subprocess.Popen | None = None
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # ExecStartPre: the persistent safety net, with the installed command.
        res = sh(*sandboxed(hushgate, "firewall", "apply", "--config", config))
        assert "fail mode closed" in res.stdout
        # ExecStart: the guard itself.
        guard = subprocess.Popen(sandboxed(hushgate, "run", "--config", config),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sock = runtime / "control.sock"
        deadline = time.monotonic() + 30
        while not sock.exists() and guard.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sock.exists(), f"the guard did not start: {guard.poll()}\n" + (
            guard.stdout.read() if guard.poll() is not None and guard.stdout else "")
        # the running guard holds exactly the file's sets (ip netns exec, unshare, the sandbox
        # script and setpriv all exec: the child is the guard's own python)
        def mask(key: str) -> int:
            return sum(1 << kernel[name] for name in caps[key])

        assert process_capabilities(guard.pid) == {
            "Bnd": mask("bounding"), "Inh": mask("inheritable"), "Amb": mask("ambient"),
            "Prm": mask("permitted"), "Eff": mask("effective")}
        # doctor, from the installed package, inside the namespace: everything in place
        doctor = sh(*in_ns(installed / "bin/python", "-c", textwrap.dedent(f"""
            import sys
            from guard.tools.doctor import diagnose_file, exit_code, format_report
            checks = diagnose_file({str(config)!r})
            print(format_report(checks), end="")
            sys.exit(exit_code(checks))
        """)), check=False)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert doctor.stdout.startswith("hushgate doctor: all good"), doctor.stdout
        # metrics on the namespace's loopback, served from inside the sandbox
        scrape = sh(*in_ns(installed / "bin/python", "-c",
                           "import urllib.request as u; print(u.urlopen("
                           "'http://127.0.0.1:9877/metrics', timeout=5).read().decode())"))
        assert 'hushgate_fail_mode{mode="closed"} 1.0' in scrape.stdout
        # the uninstall script, as documented, inside the namespace
        env = {**os.environ, "HUSHGATE_VENV": str(installed), "HUSHGATE_CONFIG": str(config),
               "HUSHGATE_UNIT": str(unit), "HUSHGATE_LINK": str(link)}
        res = sh(*in_ns("sh", UNINSTALL, "--purge"), env=env, check=False, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "no hushgate rule, socket or process left" in res.stdout
        assert guard.wait(timeout=20) == 0  # SIGTERM: a clean stop
        for save in ("iptables-save", "ip6tables-save"):
            dump = sh(*in_ns(save)).stdout
            assert "hushgate" not in dump.lower(), dump
        if shutil.which("nft"):
            assert "hushgate" not in sh(*in_ns("nft", "list", "ruleset")).stdout
        assert not sock.exists()
        assert not installed.exists() and not unit.exists() and not link.is_symlink()
        assert not etc.exists() and not state.exists()  # --purge
    finally:
        if guard is not None and guard.poll() is None:
            os.kill(guard.pid, signal.SIGKILL)
            guard.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# --------------------------------------------------------------------------- fw4 include


def test_fw4_include_loads_idempotently_in_a_namespace(tmp_path):
    """What fw4 includes on every reload (the glob stub, then the table the init script wrote)
    is valid, loads twice without duplicating a rule, and a missing file is no error."""
    need_root()
    nft = need_tool("nft", "nftables")
    from guard.tools.uci import write_openwrt_files

    uci = tmp_path / "hushgate"
    uci.write_text((FILES / "hushgate.config").read_text().replace(
        "option enabled '0'\n\toption name 'kitchen-echo'", "option name 'kitchen-echo'"))
    includes = tmp_path / "var/etc/hushgate"
    write_openwrt_files(uci, tmp_path / "hushgate.toml", includes / "fw4.nft")
    stub = (FILES / "hushgate.fw4.nft").read_text()
    assert 'include "/var/etc/hushgate/*.nft"' in stub
    ruleset_post = tmp_path / "90-hushgate.nft"
    ruleset_post.write_text(stub.replace("/var/etc/hushgate", str(includes)))
    empty = tmp_path / "empty.nft"
    empty.write_text(stub.replace("/var/etc/hushgate", str(tmp_path / "nothing-yet")))
    ns = f"hgfw4{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "netns", "exec", ns, nft, "-c", "-f", empty)
        sh("ip", "netns", "exec", ns, nft, "-c", "-f", ruleset_post)
        sh("ip", "netns", "exec", ns, nft, "-f", ruleset_post)
        first = sh("ip", "netns", "exec", ns, nft, "list", "table", "inet", "hushgate").stdout
        sh("ip", "netns", "exec", ns, nft, "-f", ruleset_post)
        second = sh("ip", "netns", "exec", ns, nft, "list", "table", "inet", "hushgate").stdout
        assert first == second
        assert "68:db:f5:90:19:64" in first and "drop" in first
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
