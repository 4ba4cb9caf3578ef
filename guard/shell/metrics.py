"""Prometheus metrics (design.md section 8): counters fed by the daemon, families built at scrape.

Rules of this module: `Metrics` only counts (under one lock, O(1) per call, never IO), and
`GuardCollector` turns a snapshot of it into the fixed families at scrape time, so every family is
present from the first scrape and a test can use a fresh registry. Label values are sanitized and
the number of label sets per family is capped: a hostile speaker cannot grow our memory or the
scrape through them.
"""

from __future__ import annotations

import bisect
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.utils import floatToGoString

from guard.core.engine import FlowState
from guard.core.policy import Outcome

__all__ = [
    "DIRECTIONS",
    "HOLD_BUCKETS_S",
    "MAX_LABEL_SETS",
    "OTHER",
    "RELEASE_BUCKETS_S",
    "VERDICTS",
    "VERDICT_BUCKETS_S",
    "GuardCollector",
    "Metrics",
    "MetricsServer",
    "parse_listen",
    "sanitize_label",
    "serve_metrics",
]

from guard.core.listen import parse_metrics_listen as parse_listen

DIRECTIONS = ("up", "down", "other")
VERDICTS = ("accept", "drop", "reject", "hold")
FAIL_MODES = ("closed", "open")
# Uploads of a configured device are pre-populated for these categories: the two the rules send
# to inspection by default (config.DEFAULT_CATEGORY_ACTIONS), so rate() works from the first one.
PREPOPULATED_CATEGORIES = ("voice", "unknown")
OTHER = "other"  # what a label value becomes once its family is full, or when it is not allowed

# A label set costs ~200 bytes in memory and one line per scrape; 1000 per family keeps a full
# scrape well under a megabyte even with every family at its cap.
MAX_LABEL_SETS = 1000
MAX_LABEL_CHARS = 64  # device names are at most 63 characters (config._NAME)

# Packet in to verdict out. The engine's per-packet path is tens of microseconds on a PC; a router
# core is several times slower; past 100 ms the queue backs up at a few thousand packets per
# second, so everything above is one bucket (+Inf).
VERDICT_BUCKETS_S = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)
# Hold start to decision. A person answers in seconds; the cloud gives up on an utterance after
# ~6-8 s (design.md section 7) and unanswered holds expire at hold_timeout_s (20 s default, at
# most 60 s is sensible), so the buckets resolve 0.5 s .. 60 s.
HOLD_BUCKETS_S = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0)
# Delay added to a provisionally held burst that turned out not to be audio: a few round trips
# (ms) when the detector decides quickly, up to max_turn_s-ish when it cannot; 2 s is already bad.
RELEASE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def sanitize_label(value: object, *, default: str = "unknown") -> str:
    """A label value that is short and plain: [A-Za-z0-9_.:-] only, at most 64 characters.

    Anything else (quotes, newlines, HTML, terminal escapes, non-ASCII) becomes `_`, so a value is
    inert wherever it is shown (Grafana, a terminal, an alert e-mail) on top of the text format's
    own escaping.
    """
    if isinstance(value, Outcome | FlowState):
        value = value.value
    text = value if isinstance(value, str) else str(value) if value is not None else ""
    text = _UNSAFE.sub("_", text[:MAX_LABEL_CHARS])
    return text or default


class _Histogram:
    """Bucket counts, sum and count of one unlabelled histogram."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if value != value:  # NaN: counting it would poison the sum forever
            return
        value = max(0.0, value)
        index = bisect.bisect_left(self.bounds, value)  # the first bound >= value
        if index < len(self.bounds):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def snapshot(self) -> _HistogramSnapshot:
        cumulative = []
        running = 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            cumulative.append((floatToGoString(bound), running))
        cumulative.append(("+Inf", self.count))
        return _HistogramSnapshot(tuple(cumulative), self.total)


@dataclass(frozen=True, slots=True)
class _HistogramSnapshot:
    buckets: tuple[tuple[str, int], ...]
    total: float


class _Family:
    """Counts by label set, at most `cap` sets; later new sets fold into `fold(labels)`."""

    __slots__ = ("cap", "fold", "values")

    def __init__(self, cap: int, fold: Callable[[tuple[str, ...]], tuple[str, ...]]) -> None:
        self.cap = cap
        self.fold = fold
        self.values: dict[tuple[str, ...], float] = {}

    def add(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        if labels not in self.values and len(self.values) >= self.cap:
            labels = self.fold(labels)  # the folded set may exceed the cap by a bounded few
        self.values[labels] = self.values.get(labels, 0.0) + amount


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a scrape shows, copied under the lock."""

    packets: dict[tuple[str, ...], float]
    uploads: dict[tuple[str, ...], float]
    blocked: dict[tuple[str, ...], float]
    malformed: float
    hold: _HistogramSnapshot
    release: _HistogramSnapshot
    verdict: _HistogramSnapshot
    gauges: Mapping[str, Any]


def _fold_all(labels: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(OTHER for _ in labels)


def _fold_keep_outcome(labels: tuple[str, ...]) -> tuple[str, ...]:
    return (OTHER, OTHER, labels[2])  # outcome comes from a closed list: keep it


class Metrics:
    """What the daemon counts. Thread-safe; every method is O(1) and does no IO."""

    def __init__(self, devices: Iterable[str] = (), *, max_label_sets: int = MAX_LABEL_SETS) -> None:
        self._lock = threading.Lock()
        self._packets = _Family(max_label_sets, _fold_all)
        self._uploads = _Family(max_label_sets, _fold_keep_outcome)
        self._blocked = _Family(max_label_sets, _fold_all)
        self._malformed = 0.0
        self._hold = _Histogram(HOLD_BUCKETS_S)
        self._release = _Histogram(RELEASE_BUCKETS_S)
        self._verdict = _Histogram(VERDICT_BUCKETS_S)
        self._gauges_source: Callable[[], Mapping[str, Any]] | None = None
        for direction in DIRECTIONS:
            for verdict in VERDICTS:
                self._packets.add((direction, verdict), 0.0)
        for device in devices:
            for category in PREPOPULATED_CATEGORIES:
                for outcome in Outcome:
                    self._uploads.add((sanitize_label(device), category, outcome.value), 0.0)

    # -- fed by the daemon --------------------------------------------------------------------

    def packet(self, direction: str, verdict: str, seconds: float) -> None:
        """One packet's verdict; `seconds` from packet in to verdict out (QueueHandler.observe)."""
        d = direction if direction in DIRECTIONS else OTHER
        v = getattr(verdict, "value", verdict)
        v = v if v in VERDICTS else OTHER
        with self._lock:
            self._packets.add((d, v))
            self._verdict.observe(float(seconds))

    def upload_outcome(
        self, device: str, category: str, outcome: str | Outcome, hold_seconds: float | None
    ) -> None:
        """An upload was decided (or passed by policy); `hold_seconds` when it was held."""
        value = getattr(outcome, "value", outcome)
        known = {o.value for o in Outcome}
        labels = (
            sanitize_label(device),
            sanitize_label(category),
            value if value in known else OTHER,
        )
        with self._lock:
            self._uploads.add(labels)
            if hold_seconds is not None:
                self._hold.observe(float(hold_seconds))

    def released(self, delay_s: float) -> None:
        """A provisionally held burst was released as not audio after `delay_s`."""
        with self._lock:
            self._release.observe(float(delay_s))

    def blocked_flow(self, device: str, category: str) -> None:
        with self._lock:
            self._blocked.add((sanitize_label(device), sanitize_label(category)))

    def malformed(self) -> None:
        with self._lock:
            self._malformed += 1

    def set_gauges_source(self, fn: Callable[[], Mapping[str, Any]] | None) -> None:
        """`fn()` -> {"pending", "held_packets", "held_bytes", "flows": {state: count}}, called
        at scrape time from the HTTP server's thread (so it must take the daemon's lock itself)."""
        with self._lock:
            self._gauges_source = fn

    # -- read at scrape time ------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            source = self._gauges_source
        gauges: Mapping[str, Any] = {}
        if source is not None:
            try:  # outside our lock: the source takes the daemon's
                gauges = source() or {}
            except Exception:  # noqa: BLE001 - a scrape must not fail on the daemon's state
                gauges = {}
        with self._lock:
            return Snapshot(
                dict(self._packets.values),
                dict(self._uploads.values),
                dict(self._blocked.values),
                self._malformed,
                self._hold.snapshot(),
                self._release.snapshot(),
                self._verdict.snapshot(),
                gauges if isinstance(gauges, Mapping) else {},
            )


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if number == number else 0.0


class GuardCollector:
    """Builds the hushgate_* families from a `Metrics` snapshot at every scrape."""

    def __init__(
        self,
        metrics: Metrics,
        fail_mode: str,
        version: str,
        *,
        registry: CollectorRegistry | None = None,
        max_label_sets: int = MAX_LABEL_SETS,
    ) -> None:
        if fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {FAIL_MODES}, not {fail_mode!r}")
        self.metrics = metrics
        self.fail_mode = fail_mode
        self.version = sanitize_label(version)
        self.max_label_sets = max_label_sets
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect() at register time, which calls
        # the daemon's gauge source before the daemon is ready.
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.snapshot()

        packets = CounterMetricFamily(
            "hushgate_packets_total", "Packets given a verdict, by direction and verdict.",
            labels=("direction", "verdict"))
        for labels, value in sorted(snap.packets.items()):
            packets.add_metric(labels, value)
        yield packets

        flows = GaugeMetricFamily("hushgate_flows", "Tracked flows by state.", labels=("state",))
        states: dict[str, float] = {state.value: 0.0 for state in FlowState}
        raw_flows = snap.gauges.get("flows")
        if isinstance(raw_flows, Mapping):
            for state, count in raw_flows.items():
                key = sanitize_label(state)
                if key not in states and len(states) >= self.max_label_sets:
                    key = OTHER
                states[key] = states.get(key, 0.0) + _number(count)
        for state, count in sorted(states.items()):
            flows.add_metric((state,), count)
        yield flows

        uploads = CounterMetricFamily(
            "hushgate_uploads_total", "Uploads by device, category and outcome.",
            labels=("device", "category", "outcome"))
        for labels, value in sorted(snap.uploads.items()):
            uploads.add_metric(labels, value)
        yield uploads

        yield GaugeMetricFamily("hushgate_pending_uploads", "Uploads waiting for a decision.",
                                value=_number(snap.gauges.get("pending")))
        yield GaugeMetricFamily("hushgate_held_packets", "Packets held without a verdict.",
                                value=_number(snap.gauges.get("held_packets")))
        yield GaugeMetricFamily("hushgate_held_bytes", "Bytes of the packets held.",
                                value=_number(snap.gauges.get("held_bytes")))

        yield HistogramMetricFamily(
            "hushgate_hold_seconds", "Time from hold start to decision.",
            buckets=list(snap.hold.buckets), sum_value=snap.hold.total)
        yield HistogramMetricFamily(
            "hushgate_release_delay_seconds",
            "Delay added to bursts held provisionally and released as not audio.",
            buckets=list(snap.release.buckets), sum_value=snap.release.total)
        yield HistogramMetricFamily(
            "hushgate_verdict_seconds", "Time from packet in to verdict out.",
            buckets=list(snap.verdict.buckets), sum_value=snap.verdict.total)

        blocked = CounterMetricFamily(
            "hushgate_blocked_flows_total",
            "Flows blocked for their lifetime, by device and category.",
            labels=("device", "category"))
        for labels, value in sorted(snap.blocked.items()):
            blocked.add_metric(labels, value)
        yield blocked

        yield CounterMetricFamily("hushgate_malformed_packets_total",
                                  "Packets that could not be parsed.", value=snap.malformed)

        yield from _relay_families(snap.gauges.get("relay"), snap.gauges.get("quic"))

        fail = GaugeMetricFamily("hushgate_fail_mode", "1 for the fail mode in force.",
                                 labels=("mode",))
        for mode in FAIL_MODES:
            fail.add_metric((mode,), 1.0 if mode == self.fail_mode else 0.0)
        yield fail

        info = GaugeMetricFamily("hushgate_build_info", "Always 1; the version as a label.",
                                 labels=("version",))
        info.add_metric((self.version,), 1.0)
        yield info


def _relay_families(relay: Any, quic: Any) -> Iterator[Metric]:
    """The stream hold's families (design.md 5): present from the first scrape, empty when the
    guard holds packets only."""
    stats = relay if isinstance(relay, Mapping) else {}
    conns = GaugeMetricFamily("hushgate_relay_connections",
                              "TCP connections the relay holds open, by kind.", labels=("kind",))
    conns.add_metric(("open",), _number(stats.get("connections_open")))
    conns.add_metric(("held",), _number(stats.get("held_connections")))
    yield conns
    yield GaugeMetricFamily("hushgate_relay_kept_bytes",
                            "Upstream bytes the relay keeps while bursts are judged or held.",
                            value=_number(stats.get("kept_bytes")))
    total = CounterMetricFamily("hushgate_relay_connections_total",
                                "TCP connections the relay accepted, by what became of them.",
                                labels=("outcome",))
    for outcome in ("passed", "held", "rejected", "over_cap", "connect_failed", "aborted"):
        total.add_metric((outcome,), _number(stats.get(outcome)))
    yield total
    relayed = CounterMetricFamily("hushgate_relay_bytes_total", "Bytes relayed, by direction.",
                                  labels=("direction",))
    relayed.add_metric(("up",), _number(stats.get("bytes_up")))
    relayed.add_metric(("down",), _number(stats.get("bytes_down")))
    relayed.add_metric(("discarded",), _number(stats.get("bytes_discarded")))
    yield relayed
    # flood bounds (issue 16 point 6): each limit the relay enforced, in total and per device
    limited = CounterMetricFamily(
        "hushgate_relay_limited", "Times a relay limit acted (a connection reset over a cap, a "
        "trickled hello or record or an idle half-open connection aborted, reads stopped at a "
        "device's kept-bytes cap), by limit.", labels=("limit",))
    per_device = CounterMetricFamily(
        "hushgate_relay_device_limited", "hushgate_relay_limited per device (MAC, or address "
        "when the MAC is unknown).", labels=("device", "limit"))
    for name in ("over_cap_device", "over_cap_total", "head_timeout", "record_timeout",
                 "idle_half_closed", "idle_silent", "kept_device_cap"):
        limited.add_metric((name,), _number(stats.get(name)))
    devices = stats.get("devices")
    for dev_id, row in sorted(devices.items()) if isinstance(devices, Mapping) else ():
        for name, value in sorted(row.items()) if isinstance(row, Mapping) else ():
            if name not in ("connections", "kept_bytes"):
                per_device.add_metric((sanitize_label(str(dev_id)), str(name)), _number(value))
    yield limited
    yield per_device
    states = quic if isinstance(quic, Mapping) else {}
    refused = CounterMetricFamily("hushgate_quic_refused_packets",
                                  "QUIC packets refused (quic = block), per device.",
                                  labels=("device",))
    stuck = GaugeMetricFamily("hushgate_quic_no_tcp_fallback",
                              "1 while a device keeps trying QUIC and opens no TCP instead.",
                              labels=("device",))
    for name, state in sorted(states.items()):
        if isinstance(state, Mapping):
            refused.add_metric((sanitize_label(str(name)),), _number(state.get("refused")))
            stuck.add_metric((sanitize_label(str(name)),),
                             1.0 if state.get("no_tcp_fallback") else 0.0)
    yield refused
    yield stuck


# ------------------------------------------------------------------------------------ server


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class MetricsServer:
    """prometheus_client's WSGI app on a threading server in a daemon thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class _Server(ThreadingWSGIServer):
            address_family = family

        self._httpd = make_server(host, port, make_wsgi_app(registry), _Server,
                                  handler_class=_QuietHandler)
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="hushgate-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)


def serve_metrics(listen: str | None, registry: CollectorRegistry) -> MetricsServer | None:
    """Serve `registry` on "host:port" ("" or None: no server). Raises OSError/ValueError."""
    if not listen:
        return None
    host, port = parse_listen(listen)
    return MetricsServer(host, port, registry)
