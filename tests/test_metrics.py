"""Metrics (design.md section 8): exact exposition, every family from the first scrape, promtool,
bounded and inert labels."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from guard.core.policy import Outcome
from guard.shell.metrics import (
    MAX_LABEL_CHARS,
    GuardCollector,
    Metrics,
    parse_listen,
    sanitize_label,
    serve_metrics,
)
from tests.ci import need_tool

MONITORING = Path(__file__).resolve().parents[1] / "packaging" / "monitoring"

FAMILIES = {
    "hushgate_packets_total": "counter",
    "hushgate_flows": "gauge",
    "hushgate_uploads_total": "counter",
    "hushgate_pending_uploads": "gauge",
    "hushgate_held_packets": "gauge",
    "hushgate_held_bytes": "gauge",
    "hushgate_hold_seconds": "histogram",
    "hushgate_release_delay_seconds": "histogram",
    "hushgate_verdict_seconds": "histogram",
    "hushgate_blocked_flows_total": "counter",
    "hushgate_malformed_packets_total": "counter",
    "hushgate_relay_connections": "gauge",
    "hushgate_relay_kept_bytes": "gauge",
    "hushgate_relay_connections_total": "counter",
    "hushgate_relay_bytes_total": "counter",
    "hushgate_relay_limited_total": "counter",
    "hushgate_relay_device_limited_total": "counter",
    "hushgate_quic_refused_packets_total": "counter",
    "hushgate_quic_no_tcp_fallback": "gauge",
    "hushgate_fail_mode": "gauge",
    "hushgate_build_info": "gauge",
}

HOSTILE = [
    'a"b',
    "line\nbreak",
    "back\\slash",
    "<script>alert(1)</script>",
    "\x1b[2J\x1b]0;pwn\x07",
    "caf\u00e9 \u202e\u0000",
    "x" * 10_000,
]


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def fresh(fail_mode: str = "closed", **kwargs: object) -> tuple[Metrics, CollectorRegistry]:
    metrics = Metrics(**kwargs)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    GuardCollector(metrics, fail_mode, "0.1.0", registry=registry)
    return metrics, registry


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> None:
    """Run promtool and require success; a missing promtool fails in CI, skips elsewhere."""
    path = need_tool("promtool", "prometheus")
    done = subprocess.run([path, *args], input=stdin.encode() if stdin is not None else None,
                          capture_output=True, timeout=60, cwd=cwd)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def promtool_check(text: str) -> None:
    promtool("check", "metrics", stdin=text)


EXPECTED = """\
# HELP hushgate_packets_total Packets given a verdict, by direction and verdict.
# TYPE hushgate_packets_total counter
hushgate_packets_total{direction="down",verdict="accept"} 1.0
hushgate_packets_total{direction="down",verdict="drop"} 0.0
hushgate_packets_total{direction="down",verdict="hold"} 0.0
hushgate_packets_total{direction="down",verdict="reject"} 0.0
hushgate_packets_total{direction="other",verdict="accept"} 0.0
hushgate_packets_total{direction="other",verdict="drop"} 0.0
hushgate_packets_total{direction="other",verdict="hold"} 0.0
hushgate_packets_total{direction="other",verdict="reject"} 0.0
hushgate_packets_total{direction="up",verdict="accept"} 1.0
hushgate_packets_total{direction="up",verdict="drop"} 0.0
hushgate_packets_total{direction="up",verdict="hold"} 1.0
hushgate_packets_total{direction="up",verdict="reject"} 0.0
# HELP hushgate_flows Tracked flows by state.
# TYPE hushgate_flows gauge
hushgate_flows{state="allowed"} 0.0
hushgate_flows{state="allowed-unconfirmed"} 0.0
hushgate_flows{state="blocked"} 0.0
hushgate_flows{state="denied"} 0.0
hushgate_flows{state="idle"} 3.0
hushgate_flows{state="lost"} 0.0
hushgate_flows{state="lost-reset"} 0.0
hushgate_flows{state="passing"} 0.0
hushgate_flows{state="pending"} 1.0
hushgate_flows{state="provisional"} 0.0
# HELP hushgate_uploads_total Uploads by device, category and outcome.
# TYPE hushgate_uploads_total counter
hushgate_uploads_total{category="voice",device="kitchen-echo",outcome="approved"} 1.0
hushgate_uploads_total{category="voice",device="kitchen-echo",outcome="expired"} 1.0
hushgate_uploads_total{category="voice",device="kitchen-echo",outcome="monitored"} 1.0
# HELP hushgate_pending_uploads Uploads waiting for a decision.
# TYPE hushgate_pending_uploads gauge
hushgate_pending_uploads 1.0
# HELP hushgate_held_packets Packets held without a verdict.
# TYPE hushgate_held_packets gauge
hushgate_held_packets 11.0
# HELP hushgate_held_bytes Bytes of the packets held.
# TYPE hushgate_held_bytes gauge
hushgate_held_bytes 14336.0
# HELP hushgate_hold_seconds Time from hold start to decision.
# TYPE hushgate_hold_seconds histogram
hushgate_hold_seconds_bucket{le="0.5"} 0.0
hushgate_hold_seconds_bucket{le="1.0"} 0.0
hushgate_hold_seconds_bucket{le="2.0"} 0.0
hushgate_hold_seconds_bucket{le="3.0"} 0.0
hushgate_hold_seconds_bucket{le="5.0"} 1.0
hushgate_hold_seconds_bucket{le="8.0"} 1.0
hushgate_hold_seconds_bucket{le="10.0"} 1.0
hushgate_hold_seconds_bucket{le="15.0"} 1.0
hushgate_hold_seconds_bucket{le="20.0"} 2.0
hushgate_hold_seconds_bucket{le="30.0"} 2.0
hushgate_hold_seconds_bucket{le="45.0"} 2.0
hushgate_hold_seconds_bucket{le="60.0"} 2.0
hushgate_hold_seconds_bucket{le="+Inf"} 2.0
hushgate_hold_seconds_count 2.0
hushgate_hold_seconds_sum 24.0
# HELP hushgate_release_delay_seconds Delay added to bursts held provisionally and released as not audio.
# TYPE hushgate_release_delay_seconds histogram
hushgate_release_delay_seconds_bucket{le="0.001"} 0.0
hushgate_release_delay_seconds_bucket{le="0.0025"} 0.0
hushgate_release_delay_seconds_bucket{le="0.005"} 1.0
hushgate_release_delay_seconds_bucket{le="0.01"} 1.0
hushgate_release_delay_seconds_bucket{le="0.025"} 1.0
hushgate_release_delay_seconds_bucket{le="0.05"} 1.0
hushgate_release_delay_seconds_bucket{le="0.1"} 1.0
hushgate_release_delay_seconds_bucket{le="0.25"} 1.0
hushgate_release_delay_seconds_bucket{le="0.5"} 1.0
hushgate_release_delay_seconds_bucket{le="1.0"} 1.0
hushgate_release_delay_seconds_bucket{le="2.0"} 1.0
hushgate_release_delay_seconds_bucket{le="+Inf"} 1.0
hushgate_release_delay_seconds_count 1.0
hushgate_release_delay_seconds_sum 0.00390625
# HELP hushgate_verdict_seconds Time from packet in to verdict out.
# TYPE hushgate_verdict_seconds histogram
hushgate_verdict_seconds_bucket{le="1e-05"} 0.0
hushgate_verdict_seconds_bucket{le="2.5e-05"} 1.0
hushgate_verdict_seconds_bucket{le="5e-05"} 1.0
hushgate_verdict_seconds_bucket{le="0.0001"} 1.0
hushgate_verdict_seconds_bucket{le="0.00025"} 2.0
hushgate_verdict_seconds_bucket{le="0.0005"} 2.0
hushgate_verdict_seconds_bucket{le="0.001"} 2.0
hushgate_verdict_seconds_bucket{le="0.0025"} 2.0
hushgate_verdict_seconds_bucket{le="0.005"} 2.0
hushgate_verdict_seconds_bucket{le="0.01"} 2.0
hushgate_verdict_seconds_bucket{le="0.025"} 2.0
hushgate_verdict_seconds_bucket{le="0.05"} 2.0
hushgate_verdict_seconds_bucket{le="0.1"} 2.0
hushgate_verdict_seconds_bucket{le="+Inf"} 3.0
hushgate_verdict_seconds_count 3.0
hushgate_verdict_seconds_sum 0.2502593994140625
# HELP hushgate_blocked_flows_total Flows blocked for their lifetime, by device and category.
# TYPE hushgate_blocked_flows_total counter
hushgate_blocked_flows_total{category="messaging",device="kitchen-echo"} 1.0
# HELP hushgate_malformed_packets_total Packets that could not be parsed.
# TYPE hushgate_malformed_packets_total counter
hushgate_malformed_packets_total 2.0
# HELP hushgate_relay_connections TCP connections the relay holds open, by kind.
# TYPE hushgate_relay_connections gauge
hushgate_relay_connections{kind="open"} 0.0
hushgate_relay_connections{kind="held"} 0.0
# HELP hushgate_relay_kept_bytes Upstream bytes the relay keeps while bursts are judged or held.
# TYPE hushgate_relay_kept_bytes gauge
hushgate_relay_kept_bytes 0.0
# HELP hushgate_relay_connections_total TCP connections the relay accepted, by what became of them.
# TYPE hushgate_relay_connections_total counter
hushgate_relay_connections_total{outcome="passed"} 0.0
hushgate_relay_connections_total{outcome="held"} 0.0
hushgate_relay_connections_total{outcome="rejected"} 0.0
hushgate_relay_connections_total{outcome="over_cap"} 0.0
hushgate_relay_connections_total{outcome="connect_failed"} 0.0
hushgate_relay_connections_total{outcome="aborted"} 0.0
# HELP hushgate_relay_bytes_total Bytes relayed, by direction.
# TYPE hushgate_relay_bytes_total counter
hushgate_relay_bytes_total{direction="up"} 0.0
hushgate_relay_bytes_total{direction="down"} 0.0
hushgate_relay_bytes_total{direction="discarded"} 0.0
# HELP hushgate_relay_limited_total Times a relay limit acted (a connection reset over a cap, a trickled hello or record or an idle half-open connection aborted, reads stopped at a device's kept-bytes cap), by limit.
# TYPE hushgate_relay_limited_total counter
hushgate_relay_limited_total{limit="over_cap_device"} 0.0
hushgate_relay_limited_total{limit="over_cap_total"} 0.0
hushgate_relay_limited_total{limit="head_timeout"} 0.0
hushgate_relay_limited_total{limit="record_timeout"} 0.0
hushgate_relay_limited_total{limit="idle_half_closed"} 0.0
hushgate_relay_limited_total{limit="idle_silent"} 0.0
hushgate_relay_limited_total{limit="kept_device_cap"} 0.0
# HELP hushgate_relay_device_limited_total hushgate_relay_limited per device (MAC, or address when the MAC is unknown).
# TYPE hushgate_relay_device_limited_total counter
# HELP hushgate_quic_refused_packets_total QUIC packets refused (quic = block), per device.
# TYPE hushgate_quic_refused_packets_total counter
# HELP hushgate_quic_no_tcp_fallback 1 while a device keeps trying QUIC and opens no TCP instead.
# TYPE hushgate_quic_no_tcp_fallback gauge
# HELP hushgate_fail_mode 1 for the fail mode in force.
# TYPE hushgate_fail_mode gauge
hushgate_fail_mode{mode="closed"} 1.0
hushgate_fail_mode{mode="open"} 0.0
# HELP hushgate_build_info Always 1; the version as a label.
# TYPE hushgate_build_info gauge
hushgate_build_info{version="0.1.0"} 1.0
"""


def feed_known_sequence(metrics: Metrics) -> None:
    # Durations are powers of two so every sum is exact in binary.
    metrics.packet("up", "accept", 2**-16)  # 15 us: the 25 us bucket
    metrics.packet("up", "hold", 2**-12)  # 244 us: the 250 us bucket
    metrics.packet("down", "accept", 0.25)  # past the last bucket: +Inf only
    metrics.upload_outcome("kitchen-echo", "voice", Outcome.APPROVED, 4.0)
    metrics.upload_outcome("kitchen-echo", "voice", "expired", 20.0)
    metrics.upload_outcome("kitchen-echo", "voice", "monitored", None)  # never held
    metrics.released(2**-8)
    metrics.blocked_flow("kitchen-echo", "messaging")
    metrics.malformed()
    metrics.malformed()
    metrics.set_gauges_source(lambda: {"pending": 1, "held_packets": 11, "held_bytes": 14336,
                                       "flows": {"pending": 1, "idle": 3}})


def test_known_sequence_renders_exactly() -> None:
    metrics, registry = fresh()
    feed_known_sequence(metrics)
    assert scrape(registry) == EXPECTED


def test_every_family_is_present_on_the_first_scrape() -> None:
    _, registry = fresh()
    text = scrape(registry)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert types == FAMILIES
    assert 'hushgate_fail_mode{mode="closed"} 1.0' in text
    assert 'hushgate_fail_mode{mode="open"} 0.0' in text
    assert "hushgate_pending_uploads 0.0" in text
    assert "hushgate_malformed_packets_total 0.0" in text
    promtool_check(text)


def test_fail_open_is_the_mode_in_force() -> None:
    _, registry = fresh("open")
    text = scrape(registry)
    assert 'hushgate_fail_mode{mode="open"} 1.0' in text
    assert 'hushgate_fail_mode{mode="closed"} 0.0' in text


def test_configured_devices_start_with_every_outcome_at_zero() -> None:
    _, registry = fresh(devices=["kitchen-echo", "den-dot"])
    text = scrape(registry)
    zeros = re.findall(r'^hushgate_uploads_total\{category="(\w+)",device="([\w-]+)",'
                       r'outcome="(\w+)"\} 0\.0$', text, re.M)
    assert set(zeros) == {(c, d, o.value) for c in ("voice", "unknown")
                          for d in ("kitchen-echo", "den-dot") for o in Outcome}


def test_gauge_source_failure_does_not_break_the_scrape() -> None:
    metrics, registry = fresh()

    def broken() -> dict[str, int]:
        raise RuntimeError("daemon not ready")

    metrics.set_gauges_source(broken)
    text = scrape(registry)
    assert "hushgate_pending_uploads 0.0" in text and 'hushgate_flows{state="pending"} 0.0' in text


def test_live_scrape_passes_promtool() -> None:
    metrics, registry = fresh(devices=["kitchen-echo"])
    feed_known_sequence(metrics)
    server = serve_metrics("127.0.0.1:0", registry)
    assert server is not None
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(server.url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
    finally:
        server.shutdown()
    assert "hushgate_build_info" in text
    promtool_check(text)


def test_no_listen_address_means_no_server() -> None:
    assert serve_metrics("", CollectorRegistry()) is None
    assert serve_metrics(None, CollectorRegistry()) is None


def test_listen_addresses_default_to_loopback() -> None:
    assert parse_listen(":9877") == ("127.0.0.1", 9877)
    assert parse_listen("127.0.0.1:9877") == ("127.0.0.1", 9877)
    assert parse_listen("[::1]:9877") == ("::1", 9877)
    for bad in ("9877", "host:port", "127.0.0.1:70000", "::1:9877"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_label_sets_are_capped_and_the_rest_folds_into_other() -> None:
    metrics, registry = fresh(max_label_sets=10)
    for i in range(50):
        metrics.blocked_flow("kitchen-echo", f"category-{i}")
        metrics.upload_outcome(f"device-{i}", "voice", "denied", None)
    families = {f.name: f for f in text_string_to_metric_families(scrape(registry))}
    blocked = families["hushgate_blocked_flows"].samples
    assert len(blocked) == 11  # ten real label sets and the fold
    other = [s for s in blocked if s.labels == {"device": "other", "category": "other"}]
    assert len(other) == 1 and other[0].value == 40
    uploads = families["hushgate_uploads"].samples
    assert len([s for s in uploads if s.name.endswith("_total")]) == 11
    folded = [s for s in uploads if s.labels["device"] == "other"]
    assert folded[0].labels == {"device": "other", "category": "other", "outcome": "denied"}
    assert folded[0].value == 40
    assert sum(s.value for s in uploads if s.name.endswith("_total")) == 50


def test_unknown_directions_verdicts_and_outcomes_fold_into_other() -> None:
    metrics, registry = fresh()
    metrics.packet("sideways", "teleport", 0.001)
    metrics.upload_outcome("kitchen-echo", "voice", "vaporised", None)
    text = scrape(registry)
    assert 'hushgate_packets_total{direction="other",verdict="other"} 1.0' in text
    assert ('hushgate_uploads_total{category="voice",device="kitchen-echo",outcome="other"} 1.0'
            in text)


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_label_values_render_validly(value: str) -> None:
    metrics = Metrics(devices=[value])
    registry = CollectorRegistry()
    GuardCollector(metrics, "closed", value, registry=registry)
    metrics.upload_outcome(value, value, Outcome.DENIED, 1.0)
    metrics.blocked_flow(value, value)
    metrics.set_gauges_source(lambda: {"flows": {value: 1}})
    text = scrape(registry)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label in sample.labels.values():
                assert re.fullmatch(r"[A-Za-z0-9_.:+-]{1,%d}" % MAX_LABEL_CHARS, label), label
    assert "\x1b" not in text and "<script>" not in text
    promtool_check(text)


def test_sanitize_label_keeps_plain_names() -> None:
    assert sanitize_label("kitchen-echo") == "kitchen-echo"
    assert sanitize_label("smart-home") == "smart-home"
    assert sanitize_label(Outcome.APPROVED) == "approved"
    assert sanitize_label("") == "unknown"
    assert sanitize_label(None) == "unknown"
    assert len(sanitize_label("x" * 10_000)) == MAX_LABEL_CHARS


def test_concurrent_feeding_loses_no_counts() -> None:
    metrics, registry = fresh()

    def feed() -> None:
        for _ in range(5000):
            metrics.packet("up", "accept", 0.0001)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    text = scrape(registry)
    assert 'hushgate_packets_total{direction="up",verdict="accept"} 20000.0' in text
    assert "hushgate_verdict_seconds_count 20000.0" in text


# ------------------------------------------------------------------ packaging/monitoring


def referenced_families(text: str) -> set[str]:
    names = set(re.findall(r"hushgate_[a-z_]+", text))
    return {re.sub(r"_(bucket|count|sum)$", "", n) if "seconds_" in n else n for n in names}


def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool("check", "rules", str(MONITORING / "alerts.yml"))
    promtool("test", "rules", "alerts_test.yml", cwd=MONITORING)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 5
    # Grafana's variables, as Grafana would fill them in
    filled = [e.replace("$__rate_interval", "5m").replace("$instance", ".*") for e in exprs]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(filled)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules))  # YAML is a superset of JSON
    promtool("check", "rules", str(path))


def test_monitoring_uses_only_exported_families() -> None:
    for name in ("alerts.yml", "grafana-dashboard.json"):
        used = referenced_families((MONITORING / name).read_text())
        assert used and used <= set(FAMILIES), (name, used - set(FAMILIES))


def test_relay_and_quic_families_read_the_daemons_snapshot() -> None:
    metrics, registry = fresh()
    metrics.set_gauges_source(lambda: {
        "relay": {"connections_open": 3, "held_connections": 1, "kept_bytes": 14000,
                  "passed": 7, "held": 2, "rejected": 1, "bytes_up": 900, "bytes_down": 5000},
        "quic": {"nest": {"refused": 12, "no_tcp_fallback": True},
                 "echo": {"refused": 0, "no_tcp_fallback": False}},
    })
    text = scrape(registry)
    for line in ('hushgate_relay_connections{kind="open"} 3.0',
                 'hushgate_relay_connections{kind="held"} 1.0',
                 "hushgate_relay_kept_bytes 14000.0",
                 'hushgate_relay_connections_total{outcome="rejected"} 1.0',
                 'hushgate_relay_bytes_total{direction="down"} 5000.0',
                 'hushgate_quic_refused_packets_total{device="nest"} 12.0',
                 'hushgate_quic_no_tcp_fallback{device="nest"} 1.0',
                 'hushgate_quic_no_tcp_fallback{device="echo"} 0.0'):
        assert line in text, line
    promtool_check(text)
