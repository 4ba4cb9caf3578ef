"""The `hushgate` command through click's CliRunner: contract output, errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from guard.tools.analyze import format_table
from guard.tools.cli import main

UPLOAD_KEYS = {"device", "remote", "host", "category", "start", "end", "bytes", "packets",
               "action", "leaked_bytes", "turn", "decided", "decided_after_packets"}
RELEASE_KEYS = {"device", "remote", "host", "start", "bytes", "delay_s", "decided",
                "decided_after_packets"}
FLOW_KEYS = {"device", "remote", "host", "category", "bytes_up", "bytes_down", "packets_up",
             "packets_down", "first", "last"}


def test_analyze_json_follows_the_contract(captures: Path) -> None:
    path = captures / "vcfingerprinting/sean_kennedy__what_is_the_weather_5_60_80_100_120_140_capture.pcap"
    result = CliRunner().invoke(main, ["analyze", str(path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["packets"] == 3114 and out["capture"] == str(path)
    assert out["devices"][0]["address"] == "192.168.86.40"
    assert out["devices"][0]["vendor"] == "amazon"
    assert len(out["uploads"]) == 5
    for upload in out["uploads"]:
        assert UPLOAD_KEYS <= set(upload)
        assert upload["action"] == "hold" and upload["leaked_bytes"] == 0
        assert upload["decided"] - upload["start"] < 1.0
        assert upload["decided_after_packets"] >= 1  # records of the burst: no window limit
    assert out["releases"] and all(RELEASE_KEYS <= set(r) for r in out["releases"])
    assert all(FLOW_KEYS <= set(f) for f in out["flows"])
    hosts = {f["host"]: f["category"] for f in out["flows"] if f["host"]}
    assert hosts.get("device-metrics-us.amazon.com") == "telemetry"


def test_analyze_without_capture_runs_the_simulated_session() -> None:
    result = CliRunner().invoke(main, ["analyze", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    holds = [u for u in out["uploads"] if u["action"] == "hold"]
    assert len(holds) == 4
    assert {u["host"] for u in holds} == {"bob-dispatch-prod-na.amazon.com"}
    assert [u["turn"] for u in holds] == [1, 1, 1, 2]
    categories = {f["host"]: f["category"] for f in out["flows"] if f["host"]}
    assert categories["alexa-comms-mobile-service.amazon.com"] == "messaging"


def test_analyze_followups_mode_passes_first_turns_and_holds_the_follow_up() -> None:
    result = CliRunner().invoke(main, ["analyze", "--json", "--mode", "followups"])
    out = json.loads(result.output)
    assert [u["action"] for u in out["uploads"]] == ["pass", "pass", "pass", "hold"]


def test_analyze_table_is_readable() -> None:
    result = CliRunner().invoke(main, ["analyze"])
    assert result.exit_code == 0
    assert "bob-dispatch-prod-na.amazon.com" in result.output and "hold" in result.output


def test_analyze_table_explains_bytes_passed_before_a_hold() -> None:
    """The simulated dialogue's second turn starts 0.8 s after a SpeechFinished event that was
    released as not audio: within one activity, so its bytes are the upload's `leaked_bytes`
    (counted conservatively: a misjudged audio head would be a real leak). The table says so."""
    out = json.loads(CliRunner().invoke(main, ["analyze", "--json"]).output)
    leaky = [u for u in out["uploads"] if u["leaked_bytes"]]
    assert [u["turn"] for u in leaky] == [2]
    (upload,) = leaky
    released = [r for r in out["releases"]
                if r["remote"] == upload["remote"] and r["start"] == upload["start"]]
    assert [r["bytes"] for r in released] == [upload["leaked_bytes"]]
    table = format_table(out)  # what `hushgate analyze` prints, from the same result
    assert "LEAK    bytes that passed before the hold" in table
    assert "released as not audio included" in table
    unleaky = dict(out, uploads=[dict(u, leaked_bytes=0) for u in out["uploads"]])
    assert "LEAK    bytes that passed" in format_table(unleaky)  # the legend always shows


def test_analyze_missing_file_is_one_line_exit_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["analyze", str(tmp_path / "nope.pcap")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_analyze_garbage_file_is_one_line_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"this is not a capture at all" * 10)
    result = CliRunner().invoke(main, ["analyze", str(bad)])
    assert result.exit_code == 1 and result.output.startswith("hushgate: ")


def test_analyze_bad_device_is_a_usage_error_exit_2() -> None:
    result = CliRunner().invoke(main, ["analyze", "--device", "kitchen"])
    assert result.exit_code == 2 and "not an IP or MAC" in result.output
    assert result.output.endswith("\nhushgate: --device 'kitchen': not an IP or MAC address\n")


def test_usage_error_is_exit_2() -> None:
    assert CliRunner().invoke(main, ["analyze", "--mode", "loud"]).exit_code == 2


def test_rules_check_shipped_rules_ok() -> None:
    result = CliRunner().invoke(main, ["rules", "check"])
    assert result.exit_code == 0 and result.output.startswith("ok: ")


def test_rules_check_reports_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('schema = 1\n[[host]]\npattern = "x.example.com"\n'
                                       'category = "voise"\nsource = "[inf]"\n')
    result = CliRunner().invoke(main, ["rules", "check", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{tmp_path / 'bad.toml'}:4:" in result.output


def test_analyze_names_the_candidates_when_no_speaker_is_recognised(tmp_path: Path) -> None:
    """A shape-only capture whose MACs were rewritten names nothing: the table says so and lists
    the LAN hosts that sent the most to the Internet, the speaker first; --device then works."""
    import sys

    import dpkt

    from guard.tools.capture import write_pcap
    from hushsim import synth

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.shape_only import shape_only_frame

    def anonymous(frame: bytes) -> bytes | None:
        shaped = shape_only_frame(frame)
        if shaped is None:
            return None
        eth = dpkt.ethernet.Ethernet(shaped)
        eth.src, eth.dst = b"\x02" + eth.src[1:], b"\x02" + eth.dst[1:]
        return bytes(eth)

    path = tmp_path / "anonymous.pcap"
    write_pcap(str(path), [(ts, f) for ts, frame in synth.generate_session(1)
                           if (f := anonymous(frame)) is not None])
    result = CliRunner().invoke(main, ["analyze", str(path)])
    assert result.exit_code == 0, result.output
    assert "0 speaker(s), 0 upload(s)" in result.output
    assert "No speaker recognised" in result.output
    candidates = result.output.split("--device ADDR:\n", 1)[1].split()
    assert candidates[0] == synth.ECHO.ip, result.output
    named = CliRunner().invoke(main, ["analyze", str(path), "--device", candidates[0], "--json"])
    assert named.exit_code == 0, named.output
    assert json.loads(named.output)["uploads"]
    quiet = CliRunner().invoke(main, ["analyze", str(path), "--json"])
    assert json.loads(quiet.output)["devices"] == []  # the JSON contract is unchanged
