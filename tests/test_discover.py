"""`hushgate devices discover` tells speakers from the vendors' other devices (issue 15, point 5),
and the `[[device_kind]]` rules it reads are checked like every other rule."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from guard.core.config import parse_config
from guard.core.ruleset import DeviceKind, check_dirs, load_rules
from guard.shell.neighbours import Sighting
from guard.tools.cli import main
from guard.tools.discover import find_speakers, report, toml_snippet

# The leases of the issue: a Pixel, an iPhone, a Google Wifi point and a Kindle, all with their
# vendors' MAC blocks; and two real speakers (an Echo renamed "Echo-Kitchen", a Nest Mini) and an
# Echo with its default name (amazon-<hex>: no rule can tell it from a Fire TV).
LEASES = """\
1700000000 08:9e:08:00:00:01 192.168.1.31 Pixel-7 01:08:9e:08:00:00:01
1700000000 d4:a3:3d:00:00:02 192.168.1.32 Annas-iPhone *
1700000000 70:3a:cb:6c:c6:8c 192.168.1.2 Google-Wifi *
1700000000 68:db:f5:00:00:04 192.168.1.34 kindle-4a1b2c3d *
1700000000 68:db:f5:90:19:64 192.168.1.23 Echo-Kitchen *
1700000000 20:df:b9:ce:f4:74 192.168.1.70 Google-Home-Mini *
1700000000 68:db:f5:00:00:07 192.168.1.37 amazon-5e2f9a1b *
1700000000 02:00:5e:10:00:10 192.168.1.50 laptop *
"""
NON_SPEAKERS = {"08:9e:08:00:00:01": "phone", "d4:a3:3d:00:00:02": "phone",
                "70:3a:cb:6c:c6:8c": "router", "68:db:f5:00:00:04": "e-reader"}


def discover(tmp_path: Path, *extra: str):
    leases = tmp_path / "dhcp.leases"
    leases.write_text(LEASES)
    return CliRunner().invoke(main, ["devices", "discover", "--leases", str(leases), "--no-neigh",
                                     *extra])


def test_phones_routers_and_e_readers_are_not_proposed_as_speakers(tmp_path: Path) -> None:
    result = discover(tmp_path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "7 host(s) of speaker vendors" in out
    assert "2 speaker(s), 1 possible speaker(s), 4 other device(s) (not proposed)" in out
    snippet = out[out.index("[[device]]"):]
    devices = tomllib.loads(snippet)["device"]
    assert {d["mac"] for d in devices} == {"68:db:f5:90:19:64", "20:df:b9:ce:f4:74",
                                          "68:db:f5:00:00:07"}
    for mac, kind in NON_SPEAKERS.items():
        row = next(line for line in out.splitlines() if line.startswith(mac))
        assert f"{kind} (not a speaker)" in row, row
        assert ".toml:" in row  # the rule that said so
    parse_config({"device": devices})


def test_every_proposal_starts_in_monitor_mode(tmp_path: Path) -> None:
    out = discover(tmp_path).stdout
    devices = tomllib.loads(out[out.index("[[device]]"):])["device"]
    assert devices and {d["mode"] for d in devices} == {"monitor"}
    assert 'mode = "strict"' not in out
    assert 'starts in mode = "monitor"' in out


def test_json_carries_kind_evidence_and_proposed(tmp_path: Path) -> None:
    found = {d["mac"]: d for d in json.loads(discover(tmp_path, "--json").stdout)}
    for mac, kind in NON_SPEAKERS.items():
        assert found[mac]["kind"] == kind and found[mac]["proposed"] is False
        assert found[mac]["evidence"].startswith("host name ")
    assert found["68:db:f5:90:19:64"]["kind"] == "speaker"
    assert found["68:db:f5:00:00:07"]["kind"] == "unknown"
    assert found["68:db:f5:00:00:07"]["proposed"] is True


def test_only_non_speakers_is_said_plainly() -> None:
    rules = load_rules()
    sightings = [Sighting("08:9e:08:00:00:01", "192.168.1.31", "Pixel-7", "leases")]
    found = find_speakers(sightings, rules.vendor_for_mac, rules.kind_for_hostname)
    text = report(found, ["leases"], 1)
    assert "no speakers to propose" in text and "[[device]]" not in text
    assert toml_snippet(found) == ""


@pytest.mark.parametrize(("hostname", "vendor", "kind"), [
    ("Pixel-7-Pro", "google", DeviceKind.PHONE),
    ("android-3f2a9c1d0e4b5a6f", "google", DeviceKind.PHONE),
    ("Google-Wifi", "google", DeviceKind.ROUTER),
    ("Nest-Wifi-Point", "google", DeviceKind.ROUTER),
    ("Google-Nest-Mini", "google", DeviceKind.SPEAKER),
    ("Kindle-Paperwhite", "amazon", DeviceKind.E_READER),
    ("eero-gateway", "amazon", DeviceKind.ROUTER),
    ("Johns-iPad", "apple", DeviceKind.TABLET),
    ("HomePod-mini", "apple", DeviceKind.SPEAKER),
    ("Pixel-7", "amazon", None),  # a vendor's kinds apply to its own hosts only
    ("android-3f2a9c1d0e4b5a6f", "amazon", None),  # Fire OS is Android: says nothing there
    ("amazon-5e2f9a1b", "amazon", None),
    ("\x1b[2J\u202e" + "x" * 300, "google", None),  # hostile: no match, no crash
    (None, "google", None),
])
def test_kind_for_hostname(hostname, vendor: str, kind) -> None:
    rule = load_rules().kind_for_hostname(hostname, vendor)
    assert (rule.kind if rule else None) is kind


def test_kind_for_lookups() -> None:
    rules = load_rules()
    rule = rules.kind_for_lookups(["play.googleapis.com", "clients3.google.com"], "google")
    assert rule is not None and rule.kind is DeviceKind.NON_SPEAKER
    assert rules.kind_for_lookups(["kindle-time.amazon.com"], "amazon") is None  # Echos do too
    assert rules.kind_for_lookups(["\x00bad", "a" * 400], "google") is None


@pytest.mark.parametrize(("entry", "line", "message"), [
    ('kind = "phone"\nhostname = "pixel*"\ndns = "x.example.com"\nsource = "[inf] x"', 4,
     "exactly one of 'hostname', 'dns'"),
    ('kind = "phone"\nsource = "[inf] x"', 4, "exactly one of 'hostname', 'dns'"),
    ('kind = "toaster"\nhostname = "pixel*"\nsource = "[inf] x"', 5, "unknown kind 'toaster'"),
    ('kind = "phone"\nhostname = "pix el*"\nsource = "[inf] x"', 6, "may hold only"),
    ('kind = "phone"\nhostname = "p*"\nsource = "[inf] x"', 6, "at least 3 literal"),
    ('kind = "phone"\nhostname = "pixel*"', 4, "has no 'source'"),
    ('kind = "phone"\nhostname = "pixel*"\nsource = " "', 7, "empty 'source'"),
    ('kind = "phone"\ndns = "*.com"\nsource = "[inf] x"', 6, "last two labels must be literal"),
    ('kind = "phone"\nhostname = "pixel*"\nsource = "[inf] x"\nmodel = "7"', 8,
     "unknown key 'model'"),
    ('kind = 3\nhostname = "pixel*"\nsource = "[inf] x"', 5, "'kind' must be a string"),
])
def test_bad_device_kind_entries_fail_with_file_and_line(tmp_path: Path, entry: str, line: int,
                                                         message: str) -> None:
    path = tmp_path / "x.toml"
    path.write_text(f'schema = 1\nvendor = "x"\n\n[[device_kind]]\n{entry}\n')
    errors = check_dirs([tmp_path], builtin=False)
    assert errors, "accepted"
    assert any(message in e.message and e.line == line for e in errors), [str(e) for e in errors]
    assert str(errors[0]).startswith(f"{path}:")


def test_a_duplicate_device_kind_is_refused(tmp_path: Path) -> None:
    entry = '[[device_kind]]\nkind = "phone"\nhostname = "Pixel*"\nsource = "[inf] x"\n'
    (tmp_path / "a.toml").write_text(f"schema = 1\n{entry}\n{entry.replace('phone', 'tablet')}")
    errors = check_dirs([tmp_path], builtin=False)
    assert [e.line for e in errors] == [7] and "duplicate device_kind" in errors[0].message


def test_every_builtin_device_kind_has_a_tagged_source() -> None:
    rules = load_rules()
    assert len(rules.kinds) >= 15
    for rule in rules.kinds:
        assert any(tag in rule.source for tag in ("[cap]", "[doc]", "[code]", "[issue]", "[inf]"))
    assert {k.kind for k in rules.kinds} >= {DeviceKind.SPEAKER, DeviceKind.PHONE,
                                             DeviceKind.ROUTER, DeviceKind.E_READER,
                                             DeviceKind.TABLET, DeviceKind.TV}
