"""The daemon-facing CLI (`status`, `pending`, `allow`, `deny`, windows, listings), `firewall show`
and `devices discover`, through CliRunner against a real control socket with a recording handler."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from guard.core.config import parse_config
from guard.shell.control import ControlServer, Peer, reply_error, reply_ok
from guard.tools.cli import main, printable


class FakeDaemon:
    """Answers with canned results and records every request it was sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.path = ""

    def handle(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.requests.append(req)
        if req["cmd"] not in self.results:
            return reply_error(f"unknown command: {req['cmd']}")
        result = self.results[req["cmd"]]
        if isinstance(result, Exception):
            return reply_error(str(result))
        return reply_ok(result(req) if callable(result) else result)


def upload(id: int = 7, host: str | None = "bob-dispatch-prod-na.amazon.com", **kw: Any) -> dict:
    now = time.time()
    out = {"id": id, "device": "kitchen-echo", "remote": "52.94.233.109:443", "host": host,
           "category": "voice", "held_packets": 11, "held_bytes": 14480, "started": now - 12.2,
           "expires": now + 7.8}
    out.update(kw)
    return out


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDaemon]:
    monkeypatch.delenv("HUSHGATE_SOCKET", raising=False)
    fake = FakeDaemon()
    directory = tempfile.mkdtemp(prefix="hg-", dir="/tmp")  # AF_UNIX paths stop at 107 bytes
    fake.path = os.path.join(directory, "control.sock")
    server = ControlServer(fake.path, fake.handle)
    server.start()
    yield fake
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)
    assert server.errors == 0


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def columns(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


# --------------------------------------------------------------------------------- listings


def test_pending_table_reads_like_the_design_scene(daemon: FakeDaemon) -> None:
    daemon.results["pending"] = [upload(), upload(8, host=None, category="unknown",
                                                held_packets=2, held_bytes=900)]
    result = run("pending", "--socket", daemon.path)
    assert result.exit_code == 0, result.output
    header, first, second = result.stdout.splitlines()
    assert columns(header) == ["ID", "DEVICE", "TO", "WHAT", "HELD", "WAITING"]
    assert columns(first) == ["7", "kitchen-echo", "bob-dispatch-prod-na.amazon.com",
                              "audio upload", "11 pkt/14 KB", "12 s"]
    # Without a host name, TO is the remote address.
    assert columns(second)[2:5] == ["52.94.233.109:443", "upload (unknown)", "2 pkt/900 B"]
    assert daemon.requests == [{"cmd": "pending"}]


def test_pending_json_is_the_array_as_returned(daemon: FakeDaemon) -> None:
    daemon.results["pending"] = [upload()]
    result = run("pending", "--json", "--socket", daemon.path)  # --socket after the subcommand
    assert result.exit_code == 0
    assert json.loads(result.stdout) == daemon.results["pending"]
    daemon.results["pending"] = []
    assert json.loads(run("pending", "--json", "--socket", daemon.path).stdout) == []
    assert run("pending", "--socket", daemon.path).stdout == "no pending uploads\n"


def test_socket_comes_from_env_then_config(daemon: FakeDaemon, tmp_path: Path) -> None:
    daemon.results["pending"] = []
    assert run("pending", env={"HUSHGATE_SOCKET": daemon.path}).exit_code == 0
    config = tmp_path / "hushgate.toml"
    config.write_text(f'[guard]\nsocket = "{daemon.path}"\n')
    assert run("pending", "--config", str(config)).exit_code == 0
    # The environment wins over the config file; --socket wins over both.
    missing = str(tmp_path / "nope.sock")
    result = run("pending", "--config", str(config), env={"HUSHGATE_SOCKET": missing})
    assert result.exit_code == 1 and missing in result.stderr
    result = run("pending", "--socket", daemon.path, env={"HUSHGATE_SOCKET": missing})
    assert result.exit_code == 0
    assert len(daemon.requests) == 3


def test_status_shows_fail_mode_devices_and_what_is_held(daemon: FakeDaemon) -> None:
    daemon.results["status"] = {
        "version": "0.1.0", "fail_mode": "closed", "pending": 1, "held_bytes": 14480,
        "held_packets": 11, "uptime_s": 3700, "queue": 7, "backend": "iptables-nft",
        "devices": [{"name": "kitchen-echo", "address": None, "mac": "68:db:f5:90:19:64",
                     "mode": "strict"},
                    {"name": "den-nest", "address": "198.18.10.11", "mac": None,
                     "mode": "followups"}],
    }
    result = run("status", "--socket", daemon.path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "fail mode: closed" in lines[0] and "iptables-nft" in lines[0]
    assert lines[1] == "pending uploads: 1 (11 pkt/14 KB held)"
    assert columns(lines[4]) == ["kitchen-echo", "strict", "68:db:f5:90:19:64", "-"]
    assert columns(lines[5]) == ["den-nest", "followups", "-", "198.18.10.11"]
    assert json.loads(run("status", "--json", "--socket", daemon.path).stdout) == \
        daemon.results["status"]


def test_devices_flows_and_log_send_their_filters(daemon: FakeDaemon) -> None:
    now = time.time()
    daemon.results["devices"] = [{"name": "kitchen-echo", "address": "198.18.10.10",
                                  "mac": None, "mode": "strict", "flows": 4, "uploads": 12}]
    daemon.results["flows"] = [{"device": "kitchen-echo", "remote": "52.94.233.109:443",
                                "proto": "tcp", "host": None, "category": "voice",
                                "state": "inspected", "bytes_up": 120000, "bytes_down": 5000000,
                                "packets_up": 90, "packets_down": 4000, "first": now - 600,
                                "last": now - 3}]
    daemon.results["log"] = [{"id": 3, "device": "kitchen-echo", "host": "avs-alexa-4-na.amazon.com",
                              "remote": "52.94.233.109:443", "category": "voice", "bytes": 41230,
                              "packets": 131, "started": now - 60, "decided_at": now - 50,
                              "outcome": "denied", "decided_by": "cli:root"}]
    out = run("devices", "--socket", daemon.path)
    assert out.exit_code == 0
    assert columns(out.stdout.splitlines()[1])[:6] == ["kitchen-echo", "strict", "-",
                                                       "198.18.10.10", "4", "12"]
    out = run("flows", "--device", "kitchen-echo", "--socket", daemon.path)
    assert columns(out.stdout.splitlines()[1])[1:7] == [
        "52.94.233.109:443", "tcp", "voice", "inspected", "120 KB", "5.0 MB"]
    out = run("log", "--device", "kitchen-echo", "--since", "2h", "--outcome", "Denied",
              "--limit", "5", "--socket", daemon.path)
    assert out.exit_code == 0, out.output
    assert columns(out.stdout.splitlines()[1])[1:] == [
        "kitchen-echo", "avs-alexa-4-na.amazon.com", "voice", "131 pkt/41 KB", "denied",
        "cli:root"]
    for args in (["devices", "--json"], ["flows", "--json"], ["log", "--json"]):
        out = run(*args, "--socket", daemon.path)
        assert json.loads(out.stdout) == daemon.results[args[0]]
    devices, flows, log = daemon.requests[:3]
    assert devices == {"cmd": "devices"}
    assert flows == {"cmd": "flows", "device": "kitchen-echo"}
    assert log["cmd"] == "log" and log["device"] == "kitchen-echo"
    assert log["outcome"] == "denied" and log["limit"] == 5
    assert abs(log["since"] - (time.time() - 7200)) < 60
    assert daemon.requests[4] == {"cmd": "flows", "device": None}
    assert daemon.requests[5] == {"cmd": "log", "device": None, "since": None, "outcome": None,
                                  "limit": 50}


# ----------------------------------------------------------------------------------- decisions


@pytest.mark.parametrize(
    ("args", "verb", "scope", "duration_s"),
    [
        (["allow", "7"], "allow", "once", None),
        (["allow", "7", "--for", "30m"], "allow", "for", 1800.0),
        (["allow", "7", "--always"], "allow", "always", None),
        (["deny", "7"], "deny", "once", None),
        (["deny", "7", "--always"], "deny", "always", None),
        (["deny", "7", "--for", "90s"], "deny", "for", 90.0),
    ],
)
def test_allow_and_deny_send_the_right_decision(
    daemon: FakeDaemon, args: list[str], verb: str, scope: str, duration_s: float | None
) -> None:
    daemon.results["decide"] = lambda req: upload(req["id"])
    result = run(*args, "--socket", daemon.path)
    assert result.exit_code == 0, result.output
    [req] = daemon.requests
    by = req.pop("by")
    typed = {"duration_text": args[3]} if scope == "for" else {}
    assert req == {"cmd": "decide", "id": 7, "verb": verb, "scope": scope,
                   "duration_s": duration_s, **typed}
    assert by.startswith("cli:")
    assert result.stdout.startswith(("allowed 7: " if verb == "allow" else "denied 7: ")
                                    + "kitchen-echo to bob-dispatch-prod-na.amazon.com")


@pytest.mark.parametrize(
    ("args", "kind", "duration_s"),
    [
        (["allow", "--device", "kitchen-echo", "--for", "30m"], "allow", 1800.0),
        (["deny", "--device", "kitchen-echo", "--for", "8h"], "quiet", 28800.0),
    ],
)
def test_device_windows(daemon: FakeDaemon, args: list[str], kind: str, duration_s: float) -> None:
    daemon.results["window"] = lambda req: {"device": req["device"], "kind": req["kind"],
                                            "until": time.time() + req["duration_s"]}
    result = run(*args, "--socket", daemon.path)
    assert result.exit_code == 0, result.output
    [req] = daemon.requests
    assert req.pop("by").startswith("cli:")
    assert req == {"cmd": "window", "device": "kitchen-echo", "kind": kind,
                   "duration_s": duration_s, "duration_text": args[-1]}
    assert result.stdout.startswith(f"{kind} window for kitchen-echo until ")


@pytest.mark.parametrize(
    "args",
    [
        ["allow"],
        ["deny"],
        ["allow", "--for", "30m"],
        ["allow", "--device", "kitchen-echo"],
        ["allow", "--device", "kitchen-echo", "--always", "--for", "1m"],
        ["deny", "7", "--device", "kitchen-echo", "--for", "1m"],
        ["allow", "7", "--for", "30m", "--always"],
        ["allow", "7", "--for", "soon"],
        ["allow", "7", "--for", "0s"],
        ["deny", "--device", "kitchen-echo", "--for", "-5m"],
        ["allow", "seven"],
        ["log", "--since", "yesterday"],
        ["log", "--outcome", "maybe"],
        ["log", "--limit", "0"],
        ["pending", "extra"],
        ["firewall", "show", "--backend", "pf"],
    ],
)
def test_usage_errors_exit_2_and_never_reach_the_daemon(daemon: FakeDaemon,
                                                        args: list[str]) -> None:
    result = run(*args, "--socket", daemon.path) if args[0] != "firewall" else run(*args)
    assert result.exit_code == 2, result.output
    assert "Error:" in result.stderr and result.stdout == ""
    assert daemon.requests == []


def test_bad_duration_says_what_a_duration_looks_like(daemon: FakeDaemon) -> None:
    result = run("allow", "--device", "kitchen-echo", "--for", "soon", "--socket", daemon.path)
    assert "not a duration: 'soon' (use e.g. 90s, 30m, 2h)" in result.stderr


def test_unreachable_daemon_is_one_line_and_exit_1(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    for args in (["pending"], ["status", "--json"], ["allow", "7"], ["log"],
                 ["deny", "--device", "x", "--for", "1h"]):
        result = run(*args, "--socket", path)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr == (f"hushgate: cannot reach hushgate at {path}: "
                                 "is `hushgate run` running?\n")


def test_daemon_refusal_is_one_line_and_exit_1(daemon: FakeDaemon) -> None:
    daemon.results["decide"] = LookupError("no pending upload 99 (decided or expired)")
    result = run("allow", "99", "--socket", daemon.path)
    assert result.exit_code == 1
    assert result.stderr == "hushgate: no pending upload 99 (decided or expired)\n"


def test_a_reply_of_the_wrong_shape_is_one_line_not_a_traceback(daemon: FakeDaemon) -> None:
    daemon.results["pending"] = [{"id": 7}]  # no "started"
    result = run("pending", "--socket", daemon.path)
    assert result.exit_code == 1
    assert result.stderr.startswith("hushgate: unexpected reply from hushgate")
    assert len(result.stderr.splitlines()) == 1


# ------------------------------------------------------------------------- hostile host names

HOSTILE = [
    "<script>alert(document.cookie)</script>.example",
    "\x1b[2J\x1b]0;pwned\x07evil.example",
    "a" * 251 + ".com",
    "fake.example\nID  DEVICE  TO",
    "\u009b31mcsi.example\u202eexe.txt",
]


def assert_inert(text: str) -> None:
    assert all(" " <= c <= "~" or c == "\n" for c in text), repr(text)


def test_hostile_host_names_are_printed_inert(daemon: FakeDaemon) -> None:
    daemon.results["pending"] = [upload(i, host=h) for i, h in enumerate(HOSTILE, 1)]
    daemon.results["flows"] = [{"device": "kitchen-echo", "remote": "1.2.3.4:443", "proto": "tcp",
                                "host": h, "category": "unknown", "state": "inspected",
                                "bytes_up": 1, "bytes_down": 2, "packets_up": 1,
                                "packets_down": 1, "first": 0.0, "last": time.time()}
                               for h in HOSTILE]
    daemon.results["log"] = [{"id": i, "device": "kitchen-echo\x1b[31m", "host": h, "remote": None,
                              "category": "voice", "bytes": 1, "packets": 1, "started": 0.0,
                              "decided_at": time.time(), "outcome": "denied",
                              "decided_by": "web\x1b[0m"} for i, h in enumerate(HOSTILE)]
    for cmd in ("pending", "flows", "log"):
        result = run(cmd, "--socket", daemon.path)
        assert result.exit_code == 0, result.output
        assert_inert(result.stdout)
        lines = result.stdout.splitlines()
        assert len(lines) == 1 + len(HOSTILE)  # a newline in a name adds no row
        assert all(len(line) < 200 for line in lines)  # 255 characters are capped
        assert "?[2J" in result.stdout and "<script>alert(doc" in result.stdout
        # --json keeps the values exactly, with control characters escaped by JSON
        raw = run(cmd, "--json", "--socket", daemon.path).stdout
        assert_inert(raw)
        assert json.loads(raw) == daemon.results[cmd]


def test_hostile_text_in_an_error_and_a_decision_is_inert(daemon: FakeDaemon) -> None:
    daemon.results["decide"] = lambda req: upload(req["id"], host=HOSTILE[1])
    result = run("allow", "7", "--socket", daemon.path)
    assert_inert(result.stdout)
    daemon.results["decide"] = LookupError("no upload \x1b[2J" + "x" * 20)
    result = run("deny", "7", "--socket", daemon.path)
    assert result.exit_code == 1
    assert_inert(result.stderr) and len(result.stderr.splitlines()) == 1


def test_printable_caps_and_replaces() -> None:
    assert printable("\x1b[2Jhi") == "?[2Jhi"
    assert printable("é\u202e") == "??"
    assert printable("x" * 100, 10) == "xxxxxxx..."
    assert printable(None) == "-"


# ------------------------------------------------------------------------------ firewall show

CONFIG = """\
[guard]
queue = 7
mark_mask = "0x00ff0000"

[[device]]
name = "kitchen-echo"
mac = "68:db:f5:90:19:64"

[[device]]
name = "den-nest"
address = "198.18.10.11"
quic = "block"

[[device]]
name = "not-inspected"
address = "198.18.10.12"
mode = "off"
"""


def test_firewall_show_renders_iptables_and_nftables(tmp_path: Path) -> None:
    config = tmp_path / "hushgate.toml"
    config.write_text(CONFIG)
    ipt = run("firewall", "show", "--config", str(config))
    assert ipt.exit_code == 0, ipt.output
    assert "*mangle" in ipt.stdout and "ip6tables-restore --noflush" in ipt.stdout
    assert "-m mac --mac-source 68:db:f5:90:19:64 -g HUSHGATE_UP" in ipt.stdout
    assert "-s 198.18.10.11/32 -g HUSHGATE_UP" in ipt.stdout
    assert "--queue-num 7" in ipt.stdout
    assert "-s 198.18.10.11/32 -p udp -m udp --dport 443" in ipt.stdout  # QUIC blocked
    assert "198.18.10.12" not in ipt.stdout  # mode off: never reaches the queue
    nft = run("firewall", "show", "--backend", "nftables", "--config", str(config))
    assert nft.exit_code == 0, nft.output
    assert "table inet hushgate {" in nft.stdout
    assert "elements = { 68:db:f5:90:19:64 }" in nft.stdout
    assert "elements = { 198.18.10.11 }" in nft.stdout
    assert "queue num 7" in nft.stdout
    assert "198.18.10.12" not in nft.stdout


def test_firewall_show_follows_the_configured_backend(tmp_path: Path) -> None:
    config = tmp_path / "hushgate.toml"
    config.write_text(CONFIG.replace("queue = 7", 'queue = "7-8"\nbackend = "nftables"'))
    out = run("firewall", "show", "--config", str(config))
    assert "queue num 7-8 fanout" in out.stdout


def test_firewall_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[guard]\nfail = "sometimes"\n')
    for args in (["show", "--config", str(bad)], ["show", "--config", str(tmp_path / "x.toml")],
                 ["apply", "--config", str(bad)]):
        result = run("firewall", *args)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("hushgate: ") and len(result.stderr.splitlines()) == 1
    assert run("firewall", "apply").exit_code == 2  # --config is required to apply


def test_nft_persistent_script_keeps_the_dynamic_chains(tmp_path: Path) -> None:
    from guard.core.config import load_config
    from guard.shell.firewall import NftablesBackend
    from guard.shell.fwspec import nft_persistent_script, spec_from_config

    config = tmp_path / "hushgate.toml"
    config.write_text(CONFIG)
    script = nft_persistent_script(NftablesBackend(spec_from_config(load_config(config))))
    assert "queue num" not in script  # `run` owns the queue rules
    assert "flush chain inet hushgate safety_net" in script
    assert "flush chain inet hushgate queue_up" not in script  # kept as `run` filled them
    assert "flush set inet hushgate dev_mac" in script
    assert 'counter drop comment "hushgate safety net: fail-closed"' in script


# --------------------------------------------------------------------------- devices discover

DNSMASQ = """\
1700000000 68:db:f5:90:19:64 192.168.1.23 Echo-Kitchen 01:68:db:f5:90:19:64
1700000000 02:00:5e:10:00:10 192.168.1.50 laptop *
1700000000 08:9e:08:aa:bb:cc 192.168.1.60 * *
1700000000 68:db:f5:00:00:02 192.168.1.61 "]\x1b[2J;name=x *
duid 00:01:00:01:2c:00:00:00:11:22:33:44:55:66
1700000000 1234 2001:db8::23 Echo-Kitchen 00:01:00:01:2c:00:00:00:68:db:f5:90:19:64
garbage line
"""
ODHCPD = """\
# br-lan 68dbf5000001 ipv4 echo-dot 1700000000 c0a80118 32 192.168.1.24/32
# br-lan 00030001089e08000001 1 nest-mini 1700000000 1 128 2001:db8::99/128
"""


def test_devices_discover_prints_a_config_snippet(tmp_path: Path) -> None:
    leases = tmp_path / "dhcp.leases"
    leases.write_text(DNSMASQ)
    odhcpd = tmp_path / "odhcpd"
    odhcpd.write_text(ODHCPD)
    result = run("devices", "discover", "--leases", str(leases), "--leases", str(odhcpd),
                 "--no-neigh")
    assert result.exit_code == 0, result.output
    assert_inert(result.stdout)
    assert "5 host(s) of speaker vendors" in result.stdout  # all proposed: none is a non-speaker
    assert "3 speaker(s), 2 possible speaker(s), 0 other device(s)" in result.stdout
    assert "laptop" not in result.stdout and "02:00:5e:10:00:10" not in result.stdout
    snippet = result.stdout[result.stdout.index("[[device]]"):]
    devices = tomllib.loads(snippet)["device"]
    assert {d["mac"]: d["name"] for d in devices} == {
        "08:9e:08:00:00:01": "nest-mini",
        "08:9e:08:aa:bb:cc": "google-aabbcc",
        "68:db:f5:00:00:01": "echo-dot",
        "68:db:f5:00:00:02": "2J-name-x",  # what is left of `"]ESC[2J;name=x`
        "68:db:f5:90:19:64": "Echo-Kitchen",
    }
    parse_config({"device": devices})  # the snippet is a valid config as it stands
    listing = run("devices", "discover", "--json", "--leases", str(leases), "--no-neigh")
    found = {d["mac"]: d for d in json.loads(listing.stdout)}
    assert found["68:db:f5:90:19:64"]["addresses"] == ["192.168.1.23", "2001:db8::23"]
    assert found["68:db:f5:90:19:64"]["vendor"] == "amazon"
    assert found["08:9e:08:aa:bb:cc"]["vendor"] == "google"


def test_devices_discover_without_speakers_and_with_a_missing_file(tmp_path: Path) -> None:
    leases = tmp_path / "dhcp.leases"
    leases.write_text("1700000000 02:00:5e:10:00:10 192.168.1.50 laptop *\n")
    result = run("devices", "discover", "--leases", str(leases), "--no-neigh")
    assert result.exit_code == 0
    assert result.stdout.startswith("no speakers among 1 hosts in ")
    missing = run("devices", "discover", "--leases", str(tmp_path / "nope"), "--no-neigh")
    assert missing.exit_code == 1
    assert missing.stderr.startswith("hushgate: ") and "nope" in missing.stderr


def test_neighbour_table_is_parsed_in_both_formats() -> None:
    from guard.shell.neighbours import parse_neigh

    as_json = json.dumps([
        {"dst": "192.168.1.23", "dev": "br-lan", "lladdr": "68:db:f5:90:19:64",
         "state": ["REACHABLE"]},
        {"dst": "192.168.1.99", "dev": "br-lan", "state": ["FAILED"]},
    ])
    assert [(s.mac, s.address) for s in parse_neigh(as_json)] == [
        ("68:db:f5:90:19:64", "192.168.1.23")]
    text = ("192.168.1.23 dev br-lan lladdr 68:db:f5:90:19:64 STALE\n"
            "fe80::1 dev br-lan lladdr 68:db:f5:90:19:64 router REACHABLE\n"
            "192.168.1.99 dev br-lan FAILED\n")
    assert [(s.mac, s.address) for s in parse_neigh(text)] == [
        ("68:db:f5:90:19:64", "192.168.1.23"), ("68:db:f5:90:19:64", "fe80::1")]


# ------------------------------------------------------------------------------------ startup


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from guard.tools.cli import main\n"
        "for args in (['--help'], ['pending', '--help'], ['firewall', 'show', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = {'dpkt', 'prometheus_client', 'netfilterqueue', 'scapy', 'sqlite3',\n"
        "         'guard.core.engine', 'guard.shell.control', 'guard.shell.firewall'}\n"
        "print(sorted(heavy & set(sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stderr.strip() == "[]"


class Recorder:
    """A firewall Runner that records commands and answers from a table (default: success)."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self.fail = fail

    def __call__(self, argv: Any, input: str | None = None) -> Any:
        from guard.shell.firewall import Completed

        argv = tuple(argv)
        self.calls.append((argv, input))
        if argv[0] in self.fail:
            return Completed(argv, 1, "", "Error: Could not process rule: Operation not supported")
        return Completed(argv, 0, "", "")


def test_firewall_apply_installs_no_queue_rules(tmp_path: Path) -> None:
    from guard.core.config import load_config
    from guard.shell.fwspec import apply_persistent

    config = tmp_path / "hushgate.toml"
    config.write_text(CONFIG)
    ipt = Recorder()
    apply_persistent(load_config(config), ipt)
    restores = [text for argv, text in ipt.calls if argv[0].endswith("-restore")]
    assert restores and all(text is not None for text in restores)
    assert all("NFQUEUE" not in text and "HUSHGATE_NET" in text for text in restores)  # type: ignore[operator]
    nft = Recorder()
    config.write_text(CONFIG.replace("queue = 7", 'queue = 7\nbackend = "nftables"'))
    apply_persistent(load_config(config), nft)
    [(argv, script)] = nft.calls
    assert argv == ("nft", "-f", "-") and script is not None and "queue num" not in script


def test_firewall_remove_needs_the_configured_backend_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guard.core.config import load_config
    from guard.shell.firewall import FirewallError
    from guard.shell.fwspec import remove_everything

    monkeypatch.setattr("guard.shell.fwspec.shutil.which", lambda tool: f"/usr/sbin/{tool}")
    config = tmp_path / "hushgate.toml"
    config.write_text(CONFIG)
    # nft failing (a kernel without nf_tables) does not fail an iptables remove
    done = remove_everything(load_config(config), Recorder(fail=("nft",)))
    assert done and done[0].startswith("iptables")
    config.write_text(CONFIG.replace("queue = 7", 'queue = 7\nbackend = "nftables"'))
    with pytest.raises(FirewallError, match="cannot remove rules"):
        remove_everything(load_config(config), Recorder(fail=("nft",)))
    rec = Recorder()
    assert remove_everything(load_config(config), rec)[0] == "nftables table inet hushgate"
    assert rec.calls[0] == (("nft", "-f", "-"),
                            "table inet hushgate {}\ndelete table inet hushgate\n")


# ------------------------------------------------------------- windows, mutes, rules, modes


def test_rules_list_and_revoke(daemon: FakeDaemon) -> None:
    now = time.time()
    daemon.results["rules"] = [
        {"id": "r1", "kind": "always-allow", "device": "kitchen-echo",
         "host": "bob-dispatch-prod-na.amazon.com", "category": None, "created": now - 60,
         "until": None, "duration_text": None, "source": "cli:root (uid 0)"},
        {"id": "w3", "kind": "mute", "device": "den-echo", "host": None, "category": None,
         "created": now - 10, "until": now + 3600, "duration_text": "1h", "source": "web"}]
    daemon.results["revoke"] = lambda req: {**daemon.results["rules"][0], "id": req["id"]}
    out = run("rules", "list", "--socket", daemon.path)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert columns(lines[0]) == ["ID", "KIND", "DEVICE", "FOR", "LASTS", "MADE BY"]
    assert columns(lines[1])[:5] == ["r1", "always-allow", "kitchen-echo",
                                     "bob-dispatch-prod-na.amazon.com", "always"]
    assert columns(lines[2])[:4] == ["w3", "mute", "den-echo", "every upload"]
    assert columns(lines[2])[4].endswith(", 1h") and "left" in columns(lines[2])[4]
    out = run("rules", "list", "--device", "den-echo", "--json", "--socket", daemon.path)
    assert json.loads(out.stdout) == daemon.results["rules"]
    assert daemon.requests[-1] == {"cmd": "rules", "device": "den-echo"}
    out = run("rules", "revoke", "R1", "--socket", daemon.path)
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("revoked r1: always-allow for kitchen-echo")
    assert daemon.requests[-1]["id"] == "r1" and daemon.requests[-1]["by"].startswith("cli:")
    before = len(daemon.requests)
    out = run("rules", "revoke", "7", "--socket", daemon.path)
    assert out.exit_code == 2 and "use w<N> or r<N>" in out.stderr
    assert len(daemon.requests) == before
    daemon.results["revoke"] = RuntimeError("no active window or rule 'w9' (see `hushgate rules "
                                            "list`)")
    out = run("rules", "revoke", "w9", "--socket", daemon.path)
    assert out.exit_code == 1 and "no active window or rule 'w9'" in out.stderr


def test_unmute_and_an_allow_window_that_ends_a_mute(daemon: FakeDaemon) -> None:
    daemon.results["unmute"] = lambda req: {"device": req["device"], "revoked": ["w3"]}
    out = run("unmute", "--device", "kitchen-echo", "--socket", daemon.path)
    assert out.exit_code == 0 and out.stdout == "unmuted kitchen-echo (ended w3)\n"
    daemon.results["unmute"] = {"device": "kitchen-echo", "revoked": []}
    out = run("unmute", "--device", "kitchen-echo", "--socket", daemon.path)
    assert out.stdout == "kitchen-echo was not muted\n"
    assert run("unmute", "--socket", daemon.path).exit_code == 2  # --device is required
    daemon.results["window"] = lambda req: {
        "id": "w4", "device": req["device"], "kind": req["kind"], "until": time.time() + 1,
        "duration_text": req["duration_text"], "superseded": ["w3"]}
    out = run("allow", "--device", "kitchen-echo", "--for", "1s", "--socket", daemon.path)
    assert out.exit_code == 0
    assert "(1s): uploads pass, logged [w4]; ended the mute w3" in out.stdout


@pytest.mark.parametrize(("value", "message"), [
    ("400d", "duration 400d is above the maximum of 30d"),
    ("0s", "duration 0s is below the minimum of 1s"),
    ("0.5s", "below the minimum of 1s"),
])
def test_window_durations_are_bounded_and_said_as_typed(daemon: FakeDaemon, value: str,
                                                        message: str) -> None:
    """Issue 15: `--for 400d` was taken and shown as "9600.0h"."""
    for args in (["deny", "--device", "kitchen-echo"], ["allow", "7"]):
        out = run(*args, "--for", value, "--socket", daemon.path)
        assert out.exit_code == 2 and message in " ".join(out.stderr.split())
    assert "unmute" in " ".join(run("deny", "--device", "x", "--for", "0s", "--socket",
                                    daemon.path).stderr.split())
    assert daemon.requests == []


def test_a_window_is_said_as_typed(daemon: FakeDaemon) -> None:
    daemon.results["window"] = lambda req: {"device": req["device"], "kind": req["kind"],
                                            "until": time.time() + req["duration_s"]}
    out = run("deny", "--device", "kitchen-echo", "--for", "30d", "--socket", daemon.path)
    assert out.exit_code == 0 and "(30d): uploads denied at once" in out.stdout
    assert daemon.requests[0]["duration_text"] == "30d"
    assert daemon.requests[0]["duration_s"] == 30 * 86400


def test_mode_command(daemon: FakeDaemon) -> None:
    daemon.results["mode"] = lambda req: {"device": req["device"], "mode": req["mode"],
                                          "configured_mode": "strict",
                                          "mode_overridden": req["mode"] != "strict"}
    out = run("mode", "--device", "kitchen-echo", "monitor", "--socket", daemon.path)
    assert out.exit_code == 0
    assert out.stdout == ("kitchen-echo: mode monitor (the config file says strict; kept across "
                          "restarts)\n")
    assert daemon.requests[0]["mode"] == "monitor"
    assert run("mode", "--device", "kitchen-echo", "loud", "--socket", daemon.path).exit_code == 2


def test_devices_show_state_counts_and_mute(daemon: FakeDaemon) -> None:
    now = time.time()
    daemon.results["devices"] = [
        {"name": "kitchen-echo", "address": "198.18.10.10", "mac": None, "mode": "monitor",
         "configured_mode": "strict", "mode_overridden": True, "flows": 2, "uploads": 10,
         "online": True, "last_seen": now - 5, "last_upload": now - 60, "pending": 1,
         "mute_until": now + 3600, "windows": 1, "rules": 0,
         "counts_24h": {"monitored": 9, "blocked": 3, "approved": 0}},
        {"name": "den-echo", "address": "198.18.10.11", "mac": None, "mode": "strict",
         "configured_mode": "strict", "mode_overridden": False, "flows": 0, "uploads": 0,
         "online": False, "last_seen": None, "last_upload": None, "pending": 0,
         "mute_until": None, "windows": 0, "rules": 0, "counts_24h": {}}]
    out = run("devices", "--socket", daemon.path)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    kitchen, den = columns(lines[1]), columns(lines[2])
    assert kitchen[:7] == ["kitchen-echo", "monitor*", "-", "198.18.10.10", "2", "10", "online"]
    assert kitchen[8] == "1" and kitchen[-1] == "blocked 3, monitored 9"
    assert den[6] == "not seen" and den[-1] == "-"
    assert "the config file says kitchen-echo: strict" in out.stdout


def test_log_shows_blocked_attempts_and_sends_the_new_filters(daemon: FakeDaemon) -> None:
    now = time.time()
    daemon.results["log"] = [
        {"id": None, "device": "kitchen-echo", "host": "alexa-comms-mobile-service.amazon.com",
         "remote": "198.19.0.20:443", "category": "messaging", "bytes": 0, "packets": 0,
         "started": now - 100, "decided_at": now - 50, "outcome": "blocked",
         "decided_by": "rule", "kind": "blocked", "via": "rule", "reason": "messaging is "
         "blocked", "attempts": 3},
        {"id": 5, "device": "kitchen-echo", "host": "bob-dispatch-prod-na.amazon.com",
         "remote": "198.19.0.10:443", "category": "voice", "bytes": 23984, "packets": 40,
         "started": now - 200, "decided_at": now - 190, "outcome": "approved",
         "decided_by": "web", "kind": "upload", "via": "web", "reason": None, "attempts": 1}]
    out = run("log", "--outcome", "blocked", "--text", "comms", "--since", "1d", "--until",
              "1h", "--socket", daemon.path)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert columns(lines[1])[1:] == ["kitchen-echo", "alexa-comms-mobile-service.amazon.com",
                                     "messaging", "0 B, 3 attempts", "blocked", "rule"]
    assert columns(lines[2])[4] == "40 pkt/24 KB"
    [req] = daemon.requests
    assert req["outcome"] == "blocked" and req["text"] == "comms"
    assert abs(req["until"] - (time.time() - 3600)) < 60
    assert abs(req["since"] - (time.time() - 86400)) < 60
