"""The `hushgate analyze` report (issue 15, point 5): clock times, a legend for every column,
monitor mode said as monitor does it, LAN-to-LAN traffic left out, the Google Wifi gateway not
taken for a speaker, and usage errors and cut captures said plainly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from guard.core.packet import UDP, DnsAnswer, Packet
from guard.core.ruleset import load_rules
from guard.tools.analyze import analyze_capture, capture_truncation, discover, format_table
from guard.tools.cli import main

ALEXA = "vcfingerprinting/sean_kennedy__alexa_5_40s.pcap"  # behind a Google Wifi gateway
ECHODOT = "smart-speakers-study/echodot3a.pcap"  # four Echos talking to each other too


def run(*args: str):
    return CliRunner().invoke(main, ["analyze", *args])


def table_of(captures: Path, name: str, *args: str) -> str:
    result = run(str(captures / name), *args)
    assert result.exit_code == 0, result.output
    return result.output


def test_start_is_clock_time_from_the_capture(captures: Path) -> None:
    out = table_of(captures, ALEXA)
    rows = [line for line in out.splitlines() if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", line)]
    # the labelled interactions of this capture start at 16:54:02 UTC, not at "0.00"
    assert [r.split()[0] for r in rows] == ["16:54:02.254", "16:54:43.695", "16:55:16.193",
                                            "16:55:52.911", "16:56:35.589"]
    assert "captured 2018-10-15 16:53:56.071 to 2018-10-15 16:56:56.121 UTC" in out


def test_every_column_is_explained_and_the_legend_always_shows(captures: Path) -> None:
    out = table_of(captures, ALEXA)
    result = json.loads(run(str(captures / ALEXA), "--json").output)
    assert not any(u["leaked_bytes"] for u in result["uploads"])  # no leak, legend anyway
    header = next(line for line in out.splitlines() if line.startswith("START "))
    legend = out[out.index(header) + len(header):]
    for column in header.split():
        assert re.search(rf"^{column}\s|\b{column}: ", legend, re.M), column
    assert "TURN    1: the device's first upload in 10 s" in legend
    assert "LEAK    bytes that passed before the hold" in legend


def test_monitor_mode_reports_no_held_bursts(captures: Path) -> None:
    out = table_of(captures, ALEXA, "--mode", "monitor")
    assert "held and released" not in out and "released as not audio:" not in out
    assert "monitor mode holds nothing" in out
    assert "DECIDED time from START to when monitor mode would log it" in out
    strict = table_of(captures, ALEXA)
    assert "1 burst(s) held and released as not audio" in strict


def test_lan_to_lan_bursts_are_not_counted_as_held(captures: Path) -> None:
    result = analyze_capture(captures / ECHODOT, devices=["192.168.12.112"])
    lan = [r for r in result["releases"] if r["remote"].startswith("192.168.12.")]
    assert len(lan) == 5 and len(result["releases"]) == 6  # JSON unchanged (design.md 8)
    out = format_table(result)
    assert "1 upload(s), 1 burst(s) held and released as not audio" in out.splitlines()[0]
    assert "not counted: 0 upload(s) and 5 burst(s) between LAN hosts" in out
    assert "released as not audio: 1 burst(s)" in out


def test_the_google_wifi_gateway_is_not_a_google_speaker(captures: Path) -> None:
    result = analyze_capture(captures / ALEXA)
    assert [d["address"] for d in result["devices"]] == ["192.168.86.40"]
    (router,) = result["other_devices"]
    assert router["address"] == "192.168.86.1" and router["mac"] == "70:3a:cb:6c:c6:8c"
    assert router["vendor"] == "google" and router["kind"] == "router"
    out = table_of(captures, ALEXA)
    assert "speaker 192.168.86.1" not in out
    assert "not a speaker: 192.168.86.1" in out


def test_a_host_that_looks_up_play_store_names_is_not_a_speaker() -> None:
    mac_phone, mac_speaker = "08:9e:08:00:00:01", "08:9e:08:00:00:02"  # both Google OUIs

    def dns_reply(to: str, name: str) -> Packet:
        return Packet(4, "192.168.1.1", to, UDP, 53, 5353, 60, 88, "02:00:00:00:00:01",
                      dns=(DnsAnswer(name, "142.250.0.1", 60),))

    packets = [(0.0, Packet(4, "192.168.1.31", "8.8.8.8", UDP, 5000, 53, 30, 58, mac_phone)),
               (0.1, Packet(4, "192.168.1.32", "8.8.8.8", UDP, 5001, 53, 30, 58, mac_speaker)),
               (0.2, dns_reply("192.168.1.31", "play.googleapis.com")),
               (0.3, dns_reply("192.168.1.32", "clients3.google.com"))]
    others: list[dict] = []
    found = discover(packets, load_rules(), others)
    assert [d["address"] for d in found] == ["192.168.1.32"]
    assert [(o["address"], o["kind"]) for o in others] == [("192.168.1.31", "non-speaker")]
    assert "looks up play.googleapis.com" in others[0]["evidence"]


def test_a_device_absent_from_the_capture_is_a_usage_error(captures: Path) -> None:
    result = run(str(captures / ALEXA), "--device", "192.168.86.99")
    assert result.exit_code == 2
    assert result.output.startswith("hushgate: --device 192.168.86.99: no packet from or to it")
    assert result.output.count("\n") == 1
    by_mac = run(str(captures / ALEXA), "--device", "02:00:00:00:00:99", "--json")
    assert by_mac.exit_code == 2 and "no packet" in by_mac.output


def test_a_device_that_is_no_address_is_a_usage_error(captures: Path) -> None:
    result = run(str(captures / ALEXA), "--device", "notanaddr")
    assert result.exit_code == 2
    assert result.output == "hushgate: --device 'notanaddr': not an IP or MAC address\n"


def test_a_truncated_pcapng_capture_is_read_with_a_warning(captures: Path,
                                                            tmp_path: Path) -> None:
    whole = (captures / ALEXA).read_bytes()  # pcapng, 2780 packets, then a statistics block
    assert capture_truncation(captures / ALEXA) is None
    stats_cut = tmp_path / "stats-cut.pcapng"
    stats_cut.write_bytes(whole[:-100])
    warning = capture_truncation(stats_cut)
    assert warning == ("capture truncated: a block of type 5 (not a packet) at byte 578664 is "
                       "cut short (8 of 108 bytes); read all 2780 packet(s) before it, anything "
                       "after it is lost")
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(whole[:-150])
    warning = capture_truncation(cut)
    assert warning is not None
    assert "the packet block at byte" in warning and "read 2779 packet(s)" in warning
    result = run(str(cut), "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["packets"] == 2779 and data["warnings"] == [warning]
    table = run(str(cut))
    assert table.exit_code == 0 and table.output.startswith(f"warning: {warning}\n")


def test_a_truncated_pcap_is_read_with_a_warning(tmp_path: Path) -> None:
    from hushsim.synth import write_session

    whole_path = tmp_path / "session.pcap"
    write_session(str(whole_path))
    whole = whole_path.read_bytes()
    assert whole[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1")  # a pcap, not pcapng
    assert capture_truncation(whole_path) is None
    total = json.loads(run(str(whole_path), "--json").output)["packets"]
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(whole[:-7])
    warning = capture_truncation(cut)
    assert warning is not None and f"packet record {total} is cut short" in warning
    assert f"read {total - 1} packet(s)" in warning
    data = json.loads(run(str(cut), "--json").output)
    assert data["packets"] == total - 1 and data["warnings"] == [warning]
    in_header = tmp_path / "header.pcap"
    in_header.write_bytes(whole[:24 + 10])  # ends inside the first record's header
    assert "10 byte(s) into the header of packet record 1" in (capture_truncation(in_header) or "")


def _pcapng(blocks: list[bytes]) -> bytes:
    return b"".join(blocks)


def _block(btype: int, body: bytes) -> bytes:
    import struct

    body += b"\0" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack("<II", btype, length) + body + struct.pack("<I", length)


def test_a_truncated_pcapng_is_read_with_a_warning(tmp_path: Path) -> None:
    import struct

    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = _block(1, struct.pack("<HHI", 1, 0, 65535))
    frame = bytes(14) + bytes(20)
    epb = _block(6, struct.pack("<IIIII", 0, 0, 0, len(frame), len(frame)) + frame)
    good = tmp_path / "good.pcapng"
    good.write_bytes(_pcapng([shb, idb, epb, epb]))
    assert capture_truncation(good) is None
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(_pcapng([shb, idb, epb, epb])[:-10])
    warning = capture_truncation(cut)
    assert warning is not None and "read 1 packet(s)" in warning and "cut short" in warning


@pytest.mark.parametrize("mode", ["strict", "followups", "monitor"])
def test_json_keeps_the_contract_fields(captures: Path, mode: str) -> None:
    data = json.loads(run(str(captures / ALEXA), "--json", "--mode", mode).output)
    assert {"capture", "packets", "devices", "uploads", "releases", "flows"} <= set(data)
    assert data["mode"] == mode and data["warnings"] == []
