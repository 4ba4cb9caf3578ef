"""`hushgate run`: the composition root, and the one place that reads the clock.

Rules of this module: it wires the shell around the engine and makes no decisions of its own.
One thread owns the packet loop; the control server's thread reaches the engine only under the
same lock, and every action the engine emits is carried out before the lock is released (so a
decision is acted on and persisted before its reply is sent). Start-up order keeps the guard
closed: store first (a corrupt one is moved aside, never silently reset), then the persistent
safety net, then the queue rules, then traffic.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from prometheus_client import CollectorRegistry

from guard import __version__
from guard.core.config import GuardConfig
from guard.core.engine import (
    BurstReleased,
    Discard,
    Engine,
    FlowBlocked,
    HeldCapHit,
    MacLearned,
    MarkFlow,
    Release,
    ReserveUploadIds,
    Reset,
    StreamBytes,
    UnknownUpload,
    Unreachable,
    UploadDecided,
    UploadEnded,
    UploadHeld,
    UploadSeen,
    UploadState,
    Verdict,
)
from guard.core.packet import TCP, Malformed
from guard.core.policy import (
    BLOCKED,
    LOG_OUTCOMES,
    Decision,
    Mode,
    Outcome,
    Scope,
    StandingRule,
    Verb,
    Window,
    WindowKind,
    channel,
    check_window_duration,
    format_duration,
    standing_for,
)
from guard.core.ruleset import RuleError, load_rules
from guard.shell.control import ControlError
from guard.shell.firewall import FirewallError, IptablesBackend, compose_mark
from guard.shell.firewall import mac_sharers as _mac_sharers
from guard.shell.firewall import neighbour_table as _neighbour_table
from guard.shell.fwspec import run_backend, spec_from_config
from guard.shell.hooks import Hooks
from guard.shell.inject import Injector
from guard.shell.metrics import GuardCollector, Metrics, serve_metrics
from guard.shell.nfqueue import COPY_RANGE, QueueHandler, late_reject, late_verdict
from guard.shell.poller import EVENT_READ, Poller
from guard.shell.relay import Relay, RelayTag, SynOutcome
from guard.shell.store import AlwaysRule, PendingUpload, Store, StoreCorrupt, StoreError
from guard.shell.store import Window as StoredWindow
from guard.shell.web import WebError

# TCP flags: a SYN without ACK opens a connection
_SYN, _SYN_ACK = 0x02, 0x12
_WAKE = object()  # selector data of the loop's wake-up socket


def log(message: str) -> None:
    print(f"hushgate: {message}", file=sys.stderr, flush=True)


class Daemon:
    def __init__(self, config: GuardConfig, *, backend: IptablesBackend | None = None) -> None:
        self.config = config
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        # A signal (stop, reload) wakes the loop at once instead of at its next select timeout
        # (up to 0.5 s: Python retries an interrupted select, PEP 475). Written from handlers.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.started = time.time()
        self.loop_at = time.monotonic()  # the packet loop's last turn (`hushgate health`)
        self.notifier = Notifier()
        self.installed_dynamic = False  # our queue rules: only a guard that installed them removes
        self.close_failed = False
        self.rules = load_rules([config.rules_dir] if config.rules_dir else [])
        # An address-only device's MAC is matched only while that MAC is that one address's in
        # the neighbour table (design.md 4): a MAC shared by several addresses (clients behind a
        # MAC-rewriting Wi-Fi extender) would pull every one of them in. Warned once each.
        self.shared_macs: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.neighbours: dict[str, str] = {}
        self.learned_macs: dict[str, str] = {}  # device -> MAC learned at run time (not config)
        self._warned_shared: set[tuple[str, str]] = set()
        self.configured = config  # as written: which devices are address-only
        config = self.config = with_neighbour_macs(config, wait_s=NEIGHBOUR_START_WAIT_S,
                                                   shared=self.shared_macs)
        self.learned_macs = {d.name: d.mac for d, c in zip(config.devices, self.configured.devices)
                             if c.mac is None and d.mac is not None}
        self._warn_shared()
        self.neighbours = _neighbour_table() if _macless(config) or self.learned_macs else {}
        self.spec = spec_from_config(config)
        self.marks = self.spec.marks
        self.firewall = backend or run_backend(config)
        self.injector = Injector()
        self.store = self._open_store()
        if self._apply_mode_overrides() and backend is None:
            self.firewall = run_backend(self.config)
        self.subscribers = self._subscribers()
        self.last_seen: dict[str, float] = {}  # device -> when it was last seen (`devices`)
        # refused connection attempts not yet written: (device, host) -> [written, count, fact]
        self._blocked_backlog: dict[tuple[str, str], list[Any]] = {}
        self.errors: dict[str, int] = {"store": 0, "reset": 0, "conntrack": 0}
        # QUIC refused per device (kernel counters) and whether it fell back to TCP
        self.quic: dict[str, dict[str, Any]] = {}
        self.quic_checked = time.time()
        # the last bursts released as not audio, for `status --json` (what was judged a message)
        self.releases: deque[dict[str, Any]] = deque(maxlen=RECENT_RELEASES)
        self.engine = self._engine()
        self._gate_engine_macs()
        self.queues: list[Any] = []
        self.handler: QueueHandler | None = None
        self.control: Any = None
        self.reload_requested = threading.Event()
        self.metrics = Metrics(devices=[d.name for d in config.devices])
        self.registry = CollectorRegistry()
        GuardCollector(self.metrics, "open" if config.fail_open else "closed", __version__,
                       registry=self.registry)
        self.metrics.set_gauges_source(self._gauges)
        self.metrics_server: Any = None
        self.web: Any = None
        self.hooks = Hooks.from_config(config)  # an ntfy hook's buttons call the web prompt
        self.mqtt: Any = None  # Home Assistant (guard/shell/mqtt.py), started in start()
        self.selector = Poller()
        # The stream hold (design.md 5): relayed devices' TCP, when the rules intercept any.
        self.relay: Relay | None = None
        if self.spec.relay:
            self.relay = self._make_relay()

    def _make_relay(self) -> Relay:
        config = self.config
        relay = Relay(
            self.engine, port=config.relay_port, upstream_mark=config.relay_mark,
            route_mark=self._route_mark,
            max_per_device=config.max_connections_per_device,
            max_total=config.max_relay_connections,
            max_kept_bytes=config.max_held_bytes_per_upload + RELAY_KEPT_SLACK_BYTES,
            families=(4, 6) if os.path.exists("/proc/sys/net/ipv6") else (4,), log=log)
        relay.syn_verdict = self._syn_verdict
        return relay

    def _syn_verdict(self, token: Any, outcome: SynOutcome) -> None:
        """Answer a held SYN (design.md 5a.3; the rules are firewall.relay_rules): PASS goes back
        through PREROUTING with the packet mark B, past the SYN rule, to the relay's listener;
        REFUSED goes on unintercepted and FORWARD resets it; UNREACHABLE goes on with B and
        FORWARD answers ICMP unreachable; SILENT is dropped."""
        b = self.config.relay_mark
        try:
            if outcome is SynOutcome.PASS:
                token.set_mark(token.get_mark() | b)
                token.repeat()
            elif outcome is SynOutcome.UNREACHABLE:
                token.set_mark(token.get_mark() | b)
                token.accept()
            elif outcome is SynOutcome.REFUSED:
                token.accept()
            else:
                token.drop()
        except Exception:  # noqa: BLE001 - the queue was rebound: the kernel dropped it already
            if self.handler is not None:
                self.handler.stats.late_verdict_errors += 1

    def _route_mark(self, address: str, mac: str | None) -> int:
        """The routing mark a device's relayed upstream leg carries besides the relay's bit
        (`route_mark` in its [[device]] table; design.md 5a.2): 0 when none is set."""
        device = self.engine.find_device(address, mac)
        return device.route_mark or 0 if device is not None else 0

    # -- start-up ---------------------------------------------------------------------------

    def _open_store(self) -> Store:
        now = time.time()
        try:
            return Store.open(self.config.state_db, now)
        except StoreCorrupt as exc:
            log(f"state database {exc.path} is corrupt ({exc.reason}); moved aside to "
                f"{exc.moved_to}; starting with an empty one, fail-closed")
            return Store.open(self.config.state_db, now, upload_id_floor=exc.next_id_floor)

    def _engine(self) -> Engine:
        now = time.time()
        # upload ids come from the engine, made durable 16 at a time (ReserveUploadIds)
        engine = Engine(self.config, self.rules, next_upload_id=self.store.last_upload_id() + 1,
                        id_block=16, forget_closed=True,
                        reset_midstream=self.config.reset_midstream)
        self._load_standing(engine, now)
        lost = self.store.lost_pending()
        relayed = [p for p in lost if p.proto == "tcp" and self.config.tcp_hold == "relay"]
        for p in relayed:
            # The relay's sockets died with the previous run (SO_LINGER 0: reset, nothing kept
            # was delivered); the speaker reconnects through the relay. Lost now, with its bytes.
            self._persist_decision({"id": p.id, "device": p.device, "host": p.host,
                                    "remote": f"{p.dst}:{p.dport}", "category": p.category,
                                    "start": p.started}, Outcome.LOST, "restart")
        engine.expect_lost(
            (p.id, TCP if p.proto == "tcp" else 17, p.src, p.sport, p.dst, p.dport)
            for p in lost if p not in relayed)
        if lost:
            log(f"{len(lost)} upload(s) were pending when the guard stopped: nothing of them is "
                "delivered; recorded as lost")
        return engine

    def _apply_mode_overrides(self) -> bool:
        """Modes set at run time (`hushgate mode`) override the config file's, from start-up
        on. True when one did (the kernel rules are then worked out again)."""
        try:
            overrides = self.store.modes()
        except StoreError as exc:
            log(f"store: could not read the mode overrides: {exc}")
            return False
        changed = False
        devices = []
        for d in self.config.devices:
            override = overrides.get(d.name)
            mode = d.mode
            if override is not None:
                try:
                    mode = Mode(override.mode)
                except ValueError:
                    log(f"store: ignoring an unknown mode {override.mode!r} for {d.name}")
            if override is not None and mode is not d.mode:
                log(f"{d.name}: mode {mode.value} (set by {override.source}; the config file "
                    f"says {d.mode.value}; `hushgate mode --device {d.name} config` reverts)")
                changed = True
                d = replace(d, mode=mode)
            devices.append(d)
        if changed:
            self.config = replace(self.config, devices=tuple(devices))
            self.spec = spec_from_config(self.config)
            self.marks = self.spec.marks
        return changed

    def _set_mode(self, name: str, mode: Mode) -> None:
        """A device's mode changed at run time: the engine, and the kernel rules (which devices
        are queued and which relayed) follow at once."""
        devices = tuple(replace(d, mode=mode) if d.name == name else d
                        for d in self.config.devices)
        self.config = replace(self.config, devices=devices)
        self.engine.set_mode(name, mode)
        if not self.installed_dynamic:
            self.spec = spec_from_config(self.config)
            return
        spec = spec_from_config(self.config)
        if spec.relay and self.relay is None:
            self.relay = self._make_relay()
            self.relay.start(self.selector)
        self._reinstall(f"{name}: mode {mode.value}")
        if name in self.spec.relay_devices:
            self._flush_relayed_conntrack()

    def _load_standing(self, engine: Engine, now: float) -> None:
        engine.set_windows(
            Window(w.device, WindowKind(w.kind), w.until, w.category, w.id)
            for w in self.store.active_windows(now))
        engine.set_standing(
            StandingRule(r.device, Verb(r.action), r.host, r.category, r.id)
            for r in self.store.rules())

    def start(self) -> None:
        from netfilterqueue import COPY_PACKET, NetfilterQueue

        from guard.shell.control import ControlServer
        from guard.shell.web import WebPrompt

        # What can fail for reasons outside the kernel rules fails before they are touched.
        try:
            self.metrics_server = serve_metrics(self.config.metrics_listen or "", self.registry)
        except (OSError, ValueError) as exc:
            raise StartError(f"metrics.listen {self.config.metrics_listen}: cannot listen: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        if self.config.web_listen:
            probe_listen(self.config.web_listen, "web.listen")
        self.firewall.apply_safety_net()
        self.handler = QueueHandler(self._receive, self._after_packet, self.config.fail_open,
                                    observe=self.metrics.packet)
        max_len = self.config.max_held_packets_total + 1024  # a full queue drops other flows
        for number in range(self.config.queue, self.config.queue + self.config.queue_count):
            queue = NetfilterQueue()
            try:
                queue.bind(number, self._callback, max_len=max_len, mode=COPY_PACKET,
                           range=COPY_RANGE)
            except OSError as exc:
                raise StartError(f"cannot bind NFQUEUE {number}: {exc.strerror or exc} (another "
                                 "program holds it, or CAP_NET_ADMIN is missing)") from None
            self.queues.append(queue)
        self.installed_dynamic = True  # from here on the queue rules are ours, even half applied
        self.firewall.install_dynamic()
        if self.relay is not None:
            self.relay.start(self.selector)
            self._flush_relayed_conntrack()
        if self.config.web_listen:
            state_dir = web_state_dir(self.config)
            self.web = WebPrompt(self.config.web_listen, self.handle_request,
                                 secret_file=os.path.join(state_dir, "web-token"),
                                 password_hash=self.config.web_password_hash,
                                 allowed_hosts=self.config.web_hosts, tls=self.config.web_tls,
                                 state_dir=state_dir)
            self.web.action_tokens = self.hooks.tokens  # ntfy buttons: POST /api/act
            self.web.start()
            log(f"web prompt on {self.web.url}")
        if self.config.mqtt is not None:  # never blocks: connects in the background
            from guard.shell.mqtt import start_bridge
            self.mqtt = start_bridge(self.config, self.handle_request, self.hooks,
                                     self.registry, log)
        # the control socket last: once `status` answers, everything is up
        self.control = ControlServer(self.config.socket, self.handle_request,
                                     group=self.config.socket_group)
        self.control.start()
        log(f"guarding {len(self.config.devices)} device(s) on queue {self.config.queue}, "
            f"fail-{'open' if self.config.fail_open else 'closed'}, control {self.config.socket}")

    def _flush_relayed_conntrack(self) -> None:
        """Fresh start: forget the relayed devices' TCP connections, so ones opened before the
        guard meet the interception at their next packet and are reset (design.md 5). A device
        known by MAC only has no address to name here: its old connections are reset when their
        next packet reaches the listener anyway (TPROXY catches non-SYN packets too)."""
        relayed = set(self.spec.relay_devices)
        for d in self.spec.devices:
            if d.name not in relayed:
                continue
            for addr in ([d.address] if d.address else []) + list(d.address6):
                argv = ["conntrack", "-D", "-f", "ipv6" if ":" in addr else "ipv4", "-p", "tcp",
                        "-s", addr]
                try:
                    subprocess.run(argv, capture_output=True, timeout=5, check=False)
                except (OSError, subprocess.TimeoutExpired):
                    self.errors["conntrack"] += 1

    def _receive(self, pkt: Any, now: float, token: Any) -> Any:
        if pkt is None or isinstance(pkt, Malformed):
            self.metrics.malformed()
        elif (pkt.proto == TCP and pkt.flags & _SYN_ACK == _SYN and self.relay is not None
              and token is not None and pkt.src_mac is not None and self._relayed_source(pkt)):
            # a relayed device's SYN, queued before its interception (design.md 5a.3)
            self.relay.syn(pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.src_mac, token, now)
            return Verdict.HOLD
        return self.engine.receive(pkt, now, token)

    def _relayed_source(self, pkt: Any) -> bool:
        device = self.engine.find_device(pkt.src, pkt.src_mac)
        return device is not None and device.name in self.spec.relay_devices

    def _gauges(self) -> dict[str, Any]:
        with self.lock:
            packets, held = self.engine.held()
            flows: dict[str, int] = {}
            for flow in self.engine.iter_flows():
                flows[flow.state.value] = flows.get(flow.state.value, 0) + 1
            return {"pending": len(self.engine.pending()), "held_packets": packets,
                    "held_bytes": held, "flows": flows,
                    "quic": {name: dict(state) for name, state in self.quic.items()},
                    "relay": self.relay.stats() if self.relay is not None else None}

    def _callback(self, nfpkt: Any) -> None:
        with self.lock:
            self.handler(nfpkt)  # type: ignore[misc]  # set before any queue is bound

    # -- the loop -----------------------------------------------------------------------------

    def serve(self) -> None:
        selector = self.selector
        # One queue: netfilterqueue's own C loop reads until the socket is empty. Several
        # queues (guard.queue = "7-8", --queue-balance): each turn reads at most QUEUE_BATCH
        # packets per queue, round robin, because under sustained load a socket is never
        # empty and the queue read first would starve the others (their flows stall, then
        # the kernel drops them when the queue is full).
        batches = [_QueueBatch(q.get_fd()) for q in self.queues] if len(self.queues) > 1 else []
        for i, queue in enumerate(self.queues):
            selector.register(queue.get_fd(), EVENT_READ,
                              (queue, batches[i] if batches else None))
        selector.register(self._wake_r, EVENT_READ, _WAKE)
        try:
            self._serve(selector)
        finally:
            selector.close()
            for batch in batches:
                batch.close()

    def _serve(self, selector: Poller) -> None:
        last_housekeeping = last_neighbours = time.time()
        with self.lock:
            deadline = self._next_deadline()
        while not self.stopping.is_set():
            # The liveness beat comes from this loop itself: a loop that hangs stops it, and the
            # service manager restarts the guard (systemd WatchdogSec; `hushgate health` on
            # OpenWrt). At most 0.5 s apart while the loop turns (the select timeout below).
            self.loop_at = time.monotonic()
            self.notifier.beat(self.loop_at)
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
                with self.lock:
                    deadline = self._next_deadline()
            timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.time()))
            relay_events: list[tuple[Any, Any, int]] = []
            for data, fileobj, mask in selector.poll(timeout):
                if data.__class__ is RelayTag:
                    relay_events.append((data, fileobj, mask))
                    continue
                if data is _WAKE:
                    try:
                        self._wake_r.recv(64)
                    except OSError:
                        pass
                    continue
                queue, batch = data
                try:
                    if batch is None:
                        queue.run(block=False)  # each packet's callback takes the lock
                    else:
                        queue.run_socket(batch.start())
                except OSError as exc:  # ENOBUFS and friends: counted, survived
                    self.errors["queue"] = self.errors.get("queue", 0) + 1
                    log(f"queue read error: {exc}")
            # One lock for the rest of the turn: the relay's sockets, the timers, the actions
            # they caused, and the next deadline (a request the control thread makes meanwhile
            # wakes the loop through the wake socket).
            with self.lock:
                if relay_events:
                    self._relay_events(relay_events)
                now = time.time()
                self.engine.handle_timer(now)
                if self.relay is not None:
                    self.relay.tick(now)
                self._drain()
                if now - last_neighbours >= NEIGHBOUR_POLL_S:
                    last_neighbours = now  # with every device known by MAC too: not every turn
                    if self._macless():
                        self._poll_neighbours()
                if now - last_housekeeping >= 60:
                    last_housekeeping = now
                    self._note_flows()  # before idle flows are forgotten
                    self.engine.expire_flows(now)
                    self._housekeeping(now)
                if now - self.quic_checked >= QUIC_CHECK_S:
                    self._check_quic(now)
                deadline = self._next_deadline()

    def _next_deadline(self) -> float | None:
        """The earliest timer of the engine and the relay (under the lock)."""
        deadline = self.engine.next_timer()
        if self.relay is not None:
            relay_deadline = self.relay.next_deadline()
            if relay_deadline is not None:
                deadline = min(deadline or relay_deadline, relay_deadline)
        return deadline

    def _relay_events(self, events: list[tuple[Any, Any, int]]) -> None:
        """The relay sockets one poll found ready (under the lock): the relay moves bytes and
        asks the engine; the actions that caused are carried out before the lock is released."""
        relay = self.relay
        assert relay is not None
        for tag, sock, mask in events:
            try:
                relay.on_event(tag, sock, mask)
            except Exception as exc:  # noqa: BLE001 - the relay catches per connection
                self.errors["relay"] = self.errors.get("relay", 0) + 1
                log(f"relay: {exc!r}")
        self._drain()

    def _drain(self) -> None:
        """Carry out the engine's actions, and those they cause (a release that completes a
        close tells the engine, which may act again); bounded."""
        for _ in range(8):
            actions = self.engine.take_actions()
            if not actions:
                return
            self._apply(actions)

    def _macless(self) -> bool:
        return bool(_macless(self.config)) or bool(self.learned_macs)

    def _address_of(self, name: str) -> str | None:
        device = self.configured.device(name)
        return device.address if device is not None else None

    def _gate_engine_macs(self) -> None:
        """The engine learns an address-only device's MAC from its IPv4 packets (and matches it
        by that MAC from then on). Only a MAC the neighbour table holds for that one address is
        learned: one it holds for several addresses stands for several hosts, and the device
        stays known by its address alone (warned once)."""
        self.engine.set_mac_gate(self._mac_unique)

    def _mac_unique(self, name: str, mac: str) -> bool:
        """Whether `mac` is, in the last neighbour table read, `name`'s address's and no other
        address's. Unknown yet: not now (the next neighbour poll decides, within 2 s)."""
        address = self._address_of(name)
        if address is None or self.neighbours.get(address) != mac.lower():
            return False
        others = _mac_sharers(self.neighbours, mac, address)
        if others:
            self.shared_macs[name] = (mac, others)
            self._warn_shared()
            return False
        return True

    def _warn_shared(self) -> None:
        for name, (mac, others) in self.shared_macs.items():
            if (name, mac) in self._warned_shared:
                continue
            self._warned_shared.add((name, mac))
            log(f"warning: {name} ({self._address_of(name)}) shares MAC {mac} with "
                f"{', '.join(others)} (a MAC-rewriting Wi-Fi extender or bridge?): {name} stays "
                f"matched by its address alone, so the other hosts are not guarded; its IPv6 is "
                f"matched only by address6 (set it, or give {name} its own MAC)")

    def _poll_neighbours(self) -> None:
        """An address-only device's MAC, as soon as the router's neighbour table knows it (its
        IPv6 traffic cannot be matched before): each one learned is matched by MAC from then on,
        while the table holds that MAC for that one address. A learned MAC that the table comes
        to hold for another address too is dropped again (the device back to its address)."""
        table = _neighbour_table()
        self.neighbours = table
        for name, mac in list(self.learned_macs.items()):
            address = self._address_of(name)
            others = _mac_sharers(table, mac, address) if address else ()
            if others:
                self.shared_macs[name] = (mac, others)
                self._warn_shared()
                self._unlearn_mac(name, mac)
        found = with_neighbour_macs(self.config, wait_s=0.0, shared=self.shared_macs,
                                    table=table)
        self._warn_shared()
        for before, after in zip(self.config.devices, found.devices):
            if before.mac is None and after.mac is not None:
                try:
                    self.engine.learn_mac(after.name, after.mac)
                except ValueError:  # the engine's gate refused it: the tables disagree, next poll
                    continue
                self._learn_mac(after.name, after.mac)

    def _unlearn_mac(self, name: str, mac: str) -> None:
        """Back to matching `name` by its address alone, in the kernel and in the engine."""
        self.learned_macs.pop(name, None)
        devices = tuple(replace(d, mac=None) if d.name == name and d.mac == mac else d
                        for d in self.config.devices)
        self.config = replace(self.config, devices=devices)
        self.engine.unlearn_mac(name)
        self._reinstall(f"{name} is matched by its address alone again (MAC {mac} is shared)")

    def _reinstall(self, what: str) -> None:
        self.spec = spec_from_config(self.config)
        self.firewall = run_backend(self.config)
        try:
            self.firewall.install_dynamic()
            log(what)
        except FirewallError as exc:
            self.errors["firewall"] = self.errors.get("firewall", 0) + 1
            log(f"could not update the rules ({what}): {exc}")

    def _check_quic(self, now: float) -> None:
        """Which devices keep trying QUIC and never fall back to TCP: refused QUIC packets
        counted by the kernel since the last look, and no relayed TCP connection from the
        device within QUIC_FALLBACK_S. Such a device has no voice service while QUIC is
        refused; status, metrics and doctor say so."""
        self.quic_checked = now
        try:
            refused = self.firewall.quic_refusals()
        except (FirewallError, OSError) as exc:
            self.errors["firewall"] = self.errors.get("firewall", 0) + 1
            log(f"could not read the QUIC counters: {exc}")
            return
        for name, count in refused.items():
            state = self.quic.setdefault(name, {"refused": 0, "no_tcp_fallback": False})
            trying = count > state["refused"]
            last = self.engine.last_stream_at(name)
            tcp = last is not None and last >= now - QUIC_FALLBACK_S
            was = state["no_tcp_fallback"]
            state["refused"] = count
            state["no_tcp_fallback"] = (trying and not tcp) or (was and not tcp)
            if state["no_tcp_fallback"] and not was:
                log(f"{name} keeps trying QUIC ({count} packets refused) and has not fallen back "
                    "to TCP: it has no voice service while QUIC is refused; set quic = \"hold\" "
                    "for it to hold QUIC uploads by packet instead")

    def _housekeeping(self, now: float) -> None:
        self._flush_blocked(now)
        try:
            pruned = self.store.prune(now, self.config.audit_max_age_s,
                                      self.config.audit_max_rows, self.config.audit_max_bytes)
            if pruned.warning:
                log(f"store: {pruned.warning}")
            self._load_standing(self.engine, now)
        except StoreError as exc:
            self.errors["store"] += 1
            log(f"store: {exc}")

    def stop(self) -> None:
        self.stopping.set()
        self.wake()

    def wake(self) -> None:
        """Make the loop turn now (safe in a signal handler: one non-blocking send)."""
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake is pending anyway) or closed
            pass

    def reload(self) -> bool:
        """Re-read the rule files (SIGHUP). A broken rule set is reported and the last good
        one stays in force."""
        try:
            rules = load_rules([self.config.rules_dir] if self.config.rules_dir else [])
        except RuleError as exc:
            log(f"reload refused, keeping the rules in force: {exc}")
            return False
        with self.lock:
            self.rules = rules
            self.engine.set_rules(rules)
        log("rules reloaded")
        return True

    def close(self) -> None:
        """Leave the kernel as the fail mode says: closed keeps the safety net, open removes all.
        Only a guard that installed its queue rules removes them (a second `run` that was
        refused, or failed before that, leaves the running guard's rules alone). Never raises:
        a step that fails is one line in the log."""
        self.notifier.send("STOPPING=1")
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        steps: list[tuple[str, Any]] = [
            ("control socket", self.control.stop if self.control is not None else None),
            ("web prompt", self.web.stop if self.web is not None else None),
            ("metrics", self.metrics_server.shutdown if self.metrics_server is not None else None),
            ("mqtt", self.mqtt.stop if self.mqtt is not None else None),
            ("hooks", lambda: self.hooks.close(2.0)),
            ("relay", self._close_relay if self.relay is not None else None),
        ]
        for what, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - one line, and the rest still runs
                log(f"stopping: {what}: {exc}")
        for queue in self.queues:
            try:
                queue.unbind()
            except Exception:  # noqa: BLE001
                pass
        self.queues = []
        try:
            if self.installed_dynamic:
                if self.config.fail_open:
                    self.firewall.remove_all()
                else:
                    self.firewall.remove_dynamic()
        except (FirewallError, OSError) as exc:
            self.close_failed = True
            log(f"could not remove the queue rules: {_one_line(str(exc))}; remove them with "
                f"`hushgate firewall remove` (fail-{'open' if self.config.fail_open else 'closed'})")
        finally:
            self.injector.close()
            self.store.close()
            self.notifier.close()

    def _close_relay(self) -> None:
        with self.lock:  # every relayed connection reset; what was pending is recorded lost
            self.relay.close()  # type: ignore[union-attr]
            self._drain()

    # -- actions ------------------------------------------------------------------------------

    def _after_packet(self, nfpkt: Any) -> int | None:
        """Carry out the actions the current packet caused; the mark for its own verdict."""
        if not self.engine.has_actions():
            return None  # most packets cause none: skip the list swap
        mark = None
        for action in self.engine.take_actions():
            if isinstance(action, MarkFlow) and not action.direct:
                mark = compose_mark(nfpkt.get_mark(), action.verdict, self.config.mark_mask)
            else:
                self._apply([action])
        return mark

    def _apply(self, actions: list[Any]) -> None:
        """Carry out the engine's actions. One that fails is logged and counted, and the rest
        still run: they include the late verdicts of held packets."""
        for action in actions:
            try:
                self._apply_one(action)
            except Exception as exc:  # noqa: BLE001 - the packet loop and the timers go on
                self.errors["actions"] = self.errors.get("actions", 0) + 1
                log(f"could not carry out {type(action).__name__}: {exc!r}")

    def _stream_tokens(self, tokens: tuple[Any, ...]) -> tuple[dict[int, int], list[Any]]:
        """Split tokens: the relay's (the furthest end per connection) and NFQUEUE packets."""
        ends: dict[int, int] = {}
        rest: list[Any] = []
        for token in tokens:
            if isinstance(token, StreamBytes):
                ends[token.conn] = max(ends.get(token.conn, 0), token.end)
            elif token is not None:
                rest.append(token)
        return ends, rest

    def _relayed(self, key: Any) -> int | None:
        return self.relay.relayed(key) if self.relay is not None else None

    def _apply_one(self, action: Any) -> None:
        """Hand one fact to its subscribers (one behaviour each, listed in `_subscribers`). A
        subscriber that fails is logged and counted; the others still run."""
        for subscriber in self.subscribers.get(type(action), ()):
            try:
                subscriber(action)
            except Exception as exc:  # noqa: BLE001 - the packet loop and the timers go on
                self.errors["actions"] = self.errors.get("actions", 0) + 1
                log(f"could not carry out {type(action).__name__} "
                    f"({getattr(subscriber, '__name__', subscriber)}): {exc!r}")

    def _subscribers(self) -> dict[type, list[Callable[[Any], None]]]:
        """Who does what with each fact: the engine's actions and decisions, and the facts the
        control commands produce. The one place a new fact or a new behaviour is registered."""
        return {
            Release: [self._kernel_release],
            Discard: [self._kernel_discard],
            Reset: [self._kernel_reset],
            Unreachable: [self._kernel_unreachable],
            MarkFlow: [self._kernel_mark],
            UploadHeld: [self._persist_held, self._hook_held, self._log_held, self._seen],
            UploadDecided: [self._persist_decided, self._metric_decided, self._hook_decided],
            UploadSeen: [self._persist_seen, self._metric_seen, self._seen],
            UploadEnded: [self._persist_size],
            BurstReleased: [self._metric_released, self._remember_release],
            FlowBlocked: [self._metric_blocked, self._persist_blocked, self._hook_blocked,
                          self._seen],
            MacLearned: [lambda fact: self._learn_mac(fact.device, fact.mac)],
            ReserveUploadIds: [lambda fact: self.store.reserve_upload_ids(fact.through)],
            HeldCapHit: [],
            WindowOpened: [self._hook_standing],
            RuleAdded: [self._hook_standing],
            StandingRevoked: [self._hook_standing],
            ModeChanged: [self._hook_mode],
        }

    def _publish(self, fact: Any) -> None:
        self._apply_one(fact)

    # kernel marks and the relay

    def _split_stream(self, action: Release | Discard) -> Release | Discard | None:
        """Hand the relay its connections' ends; what is left: the NFQUEUE packets (or None)."""
        ends, packets = self._stream_tokens(action.tokens)
        if ends and self.relay is not None:
            for conn, end in ends.items():
                if isinstance(action, Release):
                    self.relay.release(conn, end)
                else:
                    self.relay.discard(conn, end)
        if ends and not packets:
            return None
        return replace(action, tokens=tuple(packets)) if ends else action

    def _kernel_release(self, action: Release) -> None:
        rest = self._split_stream(action)
        stats = self.handler.stats if self.handler is not None else None
        if rest is None or stats is None:
            return
        for token in rest.tokens:
            if token is not None:
                late_verdict(token, True, stats)

    def _kernel_discard(self, action: Discard) -> None:
        rest = self._split_stream(action)
        stats = self.handler.stats if self.handler is not None else None
        if rest is None or stats is None:
            return
        tokens = [t for t in rest.tokens if t is not None]
        last = tokens.pop() if rest.reject_last and tokens else None
        for token in tokens:
            late_verdict(token, False, stats)
        if last is not None:
            late_reject(last, compose_mark(last.get_mark(), "block", self.config.mark_mask), stats)

    def _abort_relayed(self, key: Any) -> bool:
        conn = self._relayed(key)
        if conn is None:
            return False
        self.relay.abort(conn)  # type: ignore[union-attr]  # a relayed connection: both sockets
        return True

    def _kernel_reset(self, action: Reset) -> None:
        if self._abort_relayed(action.key):
            return
        key = action.key
        sent = self.injector.reset_both(key.device_addr, key.device_port, key.remote_addr,
                                        key.remote_port, action.seq_to_device,
                                        action.seq_to_remote)
        if action.also_to_remote is not None:
            sent += self.injector.reset_both(key.device_addr, key.device_port, key.remote_addr,
                                             key.remote_port, None, action.also_to_remote)
        if sent == 0:
            self.errors["reset"] += 1
            log(f"could not reset {key.remote}: {self.injector.last_error}")

    def _kernel_unreachable(self, action: Unreachable) -> None:
        self._conntrack_block(action.key)

    def _kernel_mark(self, action: MarkFlow) -> None:
        if action.verdict == "block" and not self._abort_relayed(action.key):
            self._conntrack_block(action.key)

    # persistence

    def _persist_held(self, fact: UploadHeld) -> None:
        self._persist_pending(fact.upload)

    def _persist_decided(self, fact: UploadDecided) -> None:
        self._persist_decision(fact.upload, fact.outcome, fact.by)

    def _persist_seen(self, fact: UploadSeen) -> None:
        upload = fact.upload
        if upload.get("outcome"):
            self._persist_decision(upload, Outcome(upload["outcome"]),
                                   upload.get("decided_by") or upload["outcome"])

    def _persist_size(self, fact: UploadEnded) -> None:
        """The upload's true size, now that it ended: everything that passed after an allow (or
        in monitor mode) counted, not only what was seen when it was decided."""
        upload = fact.upload
        try:
            self.store.update_size(upload["id"], upload.get("bytes", 0), upload.get("packets", 0))
        except StoreError as exc:
            self.errors["store"] += 1
            log(f"store: could not record the size of upload {upload['id']}: {exc}")

    def _persist_blocked(self, fact: FlowBlocked) -> None:
        """A refused connection attempt in the audit log. At most one write per device and host
        each BLOCKED_WRITE_S: attempts in between are counted and written with the next one (or
        at housekeeping), so a speaker retrying in a loop does not wear the flash."""
        now = time.time()
        key = (fact.device, fact.host or fact.key.remote)
        backlog = self._blocked_backlog.get(key)
        if backlog is not None and now - backlog[0] < BLOCKED_WRITE_S:
            backlog[1] += 1
            backlog[2] = fact
            return
        attempts = 1 + (backlog[1] if backlog is not None else 0)
        self._blocked_backlog[key] = [now, 0, fact]
        self._write_blocked(fact, now, attempts)

    def _write_blocked(self, fact: FlowBlocked, now: float, attempts: int) -> None:
        try:
            self.store.record_blocked(fact.device, fact.host, fact.key.remote, fact.category,
                                      fact.reason, now, attempts)
        except StoreError as exc:
            self.errors["store"] += 1
            log(f"store: could not record a blocked attempt of {fact.device}: {exc}")

    def _flush_blocked(self, now: float) -> None:
        for key, (at, count, fact) in list(self._blocked_backlog.items()):
            if count:
                self._write_blocked(fact, now, count)
                self._blocked_backlog[key] = [now, 0, fact]
            elif now - at >= BLOCKED_WRITE_S:
                del self._blocked_backlog[key]

    # metrics

    def _metric_decided(self, fact: UploadDecided) -> None:
        held_since = fact.upload.get("decided")
        self.metrics.upload_outcome(
            fact.upload["device"], fact.upload.get("category") or "unknown", fact.outcome,
            time.time() - held_since if held_since is not None else None)

    def _metric_seen(self, fact: UploadSeen) -> None:
        upload = fact.upload
        if upload.get("outcome"):
            self.metrics.upload_outcome(upload["device"], upload.get("category") or "unknown",
                                        upload["outcome"], None)

    def _metric_released(self, fact: BurstReleased) -> None:
        self.metrics.released(fact.delay_s)

    def _metric_blocked(self, fact: FlowBlocked) -> None:
        self.metrics.blocked_flow(fact.device, fact.category)

    def _remember_release(self, fact: BurstReleased) -> None:
        self.releases.append({"device": fact.device, "remote": fact.key.remote,
                              "host": fact.host, "start": fact.start, "decided": fact.decided,
                              "bytes": fact.bytes, "records": fact.packets,
                              "delay_s": round(fact.delay_s, 6), "reason": fact.reason})

    # hooks, the log line, what was seen

    def _hook_held(self, fact: UploadHeld) -> None:
        self.hooks.emit("upload-held", fact.upload)

    def _hook_decided(self, fact: UploadDecided) -> None:
        self.hooks.emit("upload-decided", {**fact.upload, "outcome": fact.outcome.value,
                                           "decided_by": fact.by, "via": channel(fact.by)})

    def _hook_blocked(self, fact: FlowBlocked) -> None:
        self.hooks.emit("flow-blocked", {"device": fact.device, "remote": fact.key.remote,
                                         "host": fact.host, "category": fact.category,
                                         "reason": fact.reason, "at": time.time()})

    def _hook_standing(self, fact: WindowOpened | RuleAdded | StandingRevoked) -> None:
        self.hooks.emit(fact.event, fact.entry)

    def _hook_mode(self, fact: ModeChanged) -> None:
        self.hooks.emit("mode-changed", fact.reply)

    def _log_held(self, fact: UploadHeld) -> None:
        upload = fact.upload
        log(f"upload {upload['id']} held: {upload['device']} -> "
            f"{upload['host'] or upload['remote']}")

    def _seen(self, fact: UploadHeld | UploadSeen | FlowBlocked) -> None:
        device = fact.device if isinstance(fact, FlowBlocked) else fact.upload["device"]
        self.last_seen[device] = time.time()

    def _learn_mac(self, name: str, mac: str) -> None:
        """An address-only device showed its MAC: match it by MAC in the kernel too, so its
        IPv6 traffic is guarded (design.md 4: never left open). Only a MAC that is that one
        address's (the engine's gate and the neighbour poll check it)."""
        if self._address_of(name) is None or not self._mac_unique(name, mac):
            return
        devices = tuple(replace(d, mac=mac) if d.name == name and d.mac is None else d
                        for d in self.config.devices)
        self.config = replace(self.config, devices=devices)
        self.learned_macs[name] = mac
        self._reinstall(f"{name} is {mac}: now matched by MAC (IPv6 included)")

    def _conntrack_block(self, key: Any) -> None:
        proto = "tcp" if key.proto == TCP else "udp"
        argv = self.firewall.conntrack_mark_argv(proto, key.device_addr, key.remote_addr,
                                                 key.device_port, key.remote_port, "block")
        try:
            subprocess.run(argv, capture_output=True, timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired):
            self.errors["conntrack"] += 1

    def _persist_pending(self, upload: dict[str, Any]) -> None:
        held = self.engine.upload(upload["id"])
        key = held.key if held is not None else None
        flow = self.engine.flow(key) if key is not None else None
        if key is None:
            return
        try:
            self.store.record_upload_start(PendingUpload(
                upload["id"], upload["device"], upload["proto"], key.device_addr, key.device_port,
                key.remote_addr, key.remote_port, upload["decided"], upload["host"],
                upload["category"],
                seq_up=flow.device_next if flow else None,
                ack_up=flow.device_ack if flow else None))
        except StoreError as exc:
            self.errors["store"] += 1
            log(f"store: could not record pending upload {upload['id']}: {exc}")

    def _persist_decision(self, upload: dict[str, Any], outcome: Outcome, by: str) -> None:
        kwargs = dict(device=upload["device"], outcome=outcome, decided_by=by,
                      decided_at=time.time(), host=upload.get("host"),
                      remote=upload.get("remote"), category=upload.get("category"),
                      upload_bytes=upload.get("bytes", 0), packets=upload.get("packets", 0),
                      started=upload.get("start"))
        try:
            self.store.record_decision(upload["id"], **kwargs)
        except StoreError:
            try:  # a first turn that was logged as passed and later held: log it again
                self.store.record_decision(None, **kwargs)
            except StoreError as exc:
                self.errors["store"] += 1
                log(f"store: could not record decision for upload {upload['id']}: {exc}")

    # -- control requests ------------------------------------------------------------------------

    def handle_request(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        cmd = request.get("cmd")
        handler = getattr(self, f"_cmd_{cmd}", None) if isinstance(cmd, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        try:
            with self.lock:
                result = handler(request, peer)
                self._apply(self.engine.take_actions())
        except UnknownUpload as exc:
            return {"ok": False, "error": f"no pending upload {exc.args[0]}"}
        except RequestError as exc:
            return {"ok": False, "error": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        except StoreError as exc:
            return {"ok": False, "error": f"store: {exc}"}
        return {"ok": True, "result": result}

    def _cmd_ping(self, request: dict[str, Any], peer: Any) -> str:
        return "pong"

    def _cmd_health(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        """How long ago the packet loop last turned (answered under the engine's lock: a loop
        stuck holding it makes this time out, one stuck elsewhere shows a growing age)."""
        return {"pid": os.getpid(), "loop_age_s": round(time.monotonic() - self.loop_at, 3)}

    def _cmd_status(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        packets, held = self.engine.held()
        stats = self.handler.stats if self.handler else None
        return {
            "version": __version__,
            "fail_mode": "open" if self.config.fail_open else "closed",
            "devices": [{"name": d.name, "address": d.address, "mac": d.mac, "mode": d.mode.value,
                         **self._mode_fields(d.name),
                         "quic": self.config.quic_for(d),
                         "quic_refused": self.quic.get(d.name, {}).get("refused", 0),
                         "quic_no_tcp_fallback": self.quic.get(d.name, {}).get(
                             "no_tcp_fallback", False)}
                        for d in self.engine.device_list()],
            "pending": len(self.engine.pending()),
            "held_bytes": held,
            "held_packets": packets,
            "uptime_s": round(time.time() - self.started, 1),
            "queue": self.config.queue,
            "backend": self.firewall.backend_name(),
            "packets": stats.packets if stats else 0,
            "errors": {**self.errors, "packet": stats.errors if stats else 0},
            "counters": self.engine.counter_values(),
            "hooks": self.hooks.stats(),
            "actions": self.hooks.action_stats(),  # the ntfy buttons' tokens
            "mqtt": self.mqtt.stats() if self.mqtt is not None else None,
            "metrics": self.metrics_server.url if self.metrics_server is not None else None,
            "tcp_hold": self.config.tcp_hold,
            "relay": self.relay.stats() if self.relay is not None else None,
            "recent_releases": list(self.releases),
        }

    def _cmd_pending(self, request: dict[str, Any], peer: Any) -> list[dict[str, Any]]:
        out = []
        for upload in sorted(self.engine.pending(), key=lambda u: u.id):
            out.append({
                "id": upload.id, "device": upload.device, "remote": upload.key.remote,
                "host": upload.host, "category": upload.category,
                "held_packets": len(upload.held), "held_bytes": upload.held_bytes,
                "started": upload.decided, "expires": upload.expires,
            })
        return out

    def _cmd_decide(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        upload_id = int(request["id"])
        verb = Verb(request["verb"])
        scope = Scope(request.get("scope") or "once")
        by = _by(request, peer)
        now = time.time()
        upload = self.engine.upload(upload_id)
        if upload is None or upload.state is not UploadState.PENDING:
            raise UnknownUpload(upload_id)
        duration = text = None
        if scope is Scope.FOR:
            if request.get("duration_s") is None:
                raise RequestError("scope 'for' needs duration_s (1s to 30d)")
            duration, text = _duration(request)
        decision = Decision(verb, scope, duration, by)
        # The scope's standing decision, worked out once (policy.standing_for), stored first
        # (it gets its id there), then handed to the engine as it is.
        standing = standing_for(decision, upload.device, upload.host, upload.category, now)
        made: dict[str, Any] = {}
        if isinstance(standing, Window):
            stored, ended = self.store.open_window(
                standing.device, standing.kind, standing.until, now, category=standing.category,
                source=by, duration_text=text, supersede=True)
            standing = replace(standing, id=stored.id)
            made["window"] = f"w{stored.id}"
            self._publish(WindowOpened(_window_entry(stored), [f"w{w.id}" for w in ended]))
        elif isinstance(standing, StandingRule):
            rule = self.store.add_rule(standing.device, standing.verb, now, host=standing.host,
                                       category=standing.category, source=by)
            standing = replace(standing, id=rule.id)
            made["rule"] = f"r{rule.id}"
            self._publish(RuleAdded(_rule_entry(rule)))
        before = upload.summary()  # what was held, before the decision releases or drops it
        self.engine.decide(upload_id, decision, now, standing=standing)
        if isinstance(standing, Window):
            self._load_standing(self.engine, now)  # the superseded windows leave the engine too
        return {**upload.summary(), "held_packets": before["held_packets"],
                "held_bytes": before["held_bytes"], "via": channel(by), **made}

    def _device(self, request: dict[str, Any]) -> str:
        device = request.get("device")
        if not isinstance(device, str) or self.engine.device(device) is None:
            raise RequestError(f"no device named {str(device)[:64]!r}")
        return device

    def _cmd_window(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        """A window for a device (allow: uploads pass, logged; quiet: a mute). It ends the
        device's overlapping windows of the other kind (policy.supersedes): an allow window
        lifts a mute."""
        device = self._device(request)
        kind = WindowKind(request["kind"])
        duration, text = _duration(request)
        category = request.get("category")
        if category is not None and not isinstance(category, str):
            raise RequestError("category must be a string")
        now = time.time()
        by = _by(request, peer)
        window, ended = self.store.open_window(device, kind, now + duration, now,
                                               category=category, source=by,
                                               duration_text=text, supersede=True)
        self._load_standing(self.engine, now)
        superseded = [f"w{w.id}" for w in ended]
        self._publish(WindowOpened(_window_entry(window), superseded))
        return {"id": f"w{window.id}", "device": device, "kind": kind.value,
                "until": window.until, "duration_text": text, "category": category,
                "superseded": superseded}

    def _cmd_unmute(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        """End every active mute (quiet window) of a device; none is not an error."""
        device = self._device(request)
        now = time.time()
        revoked = []
        for window in self.store.active_windows(now, device):
            if window.kind is WindowKind.QUIET and self.store.remove_window(window.id):
                revoked.append(window)
        self._load_standing(self.engine, now)
        for window in revoked:
            self._publish(StandingRevoked(_window_entry(window), _by(request, peer)))
        return {"device": device, "revoked": [f"w{w.id}" for w in revoked]}

    def _cmd_rules(self, request: dict[str, Any], peer: Any) -> list[dict[str, Any]]:
        """Active windows, mutes and always-rules (what `revoke` takes), oldest first."""
        device = request.get("device")
        if device is not None:
            device = self._device(request)
        entries = ([_window_entry(w) for w in self.store.active_windows(time.time(), device)]
                   + [_rule_entry(r) for r in self.store.rules(device)])
        return sorted(entries, key=lambda e: (e["created"], e["id"]))

    def _cmd_revoke(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        """Remove one window or always-rule, from the store and the running engine at once."""
        raw = str(request.get("id") or "")[:32]
        match = _ENTRY_ID.match(raw)
        if match is None:
            raise RequestError(f"bad id {raw!r}: use w<N> or r<N> (see `hushgate rules list`)")
        number, now = int(match.group(2)), time.time()
        entry: dict[str, Any] | None = None
        if match.group(1) == "w":
            window = self.store.window(number)
            if window is not None and window.until > now and self.store.remove_window(number):
                entry = _window_entry(window)
        else:
            rule = self.store.rule(number)
            if rule is not None and self.store.remove_rule(number):
                entry = _rule_entry(rule)
        if entry is None:
            raise RequestError(f"no active window or rule {raw!r} (see `hushgate rules list`)")
        self._load_standing(self.engine, now)
        self._publish(StandingRevoked(entry, _by(request, peer)))
        return entry

    def _cmd_mode(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        """Change a device's mode at run time, kept in the state database over the config file's
        (it survives restarts); mode "config" goes back to the config file's."""
        device = self._device(request)
        wanted = str(request.get("mode"))
        names = [m.value for m in Mode]
        if wanted not in (*names, "config"):
            raise RequestError(f"mode must be one of {', '.join(names)} or config, not "
                               f"{wanted[:32]!r}")
        configured = self._configured_mode(device)
        mode = configured if wanted == "config" else Mode(wanted)
        if mode is configured:
            self.store.clear_mode(device)
        else:
            self.store.set_mode(device, mode.value, time.time(), _by(request, peer))
        self._set_mode(device, mode)
        reply = {"device": device, "mode": mode.value, **self._mode_fields(device)}
        self._publish(ModeChanged(reply))
        return reply

    def _configured_mode(self, name: str) -> Mode:
        return next((d.mode for d in self.configured.devices if d.name == name), Mode.STRICT)

    def _mode_fields(self, name: str) -> dict[str, Any]:
        configured = self._configured_mode(name)
        device = self.engine.device(name)
        current = device.mode if device is not None else configured
        return {"configured_mode": configured.value, "mode_overridden": current is not configured}

    def _cmd_devices(self, request: dict[str, Any], peer: Any) -> list[dict[str, Any]]:
        now = time.time()
        self._note_flows()
        flows: dict[str, int] = {}
        for flow in self.engine.iter_flows():
            flows[flow.device.name] = flows.get(flow.device.name, 0) + 1
        pending: dict[str, int] = {}
        for upload in self.engine.pending():
            pending[upload.device] = pending.get(upload.device, 0) + 1
        figures = self.store.device_figures(now - COUNTS_WINDOW_S)
        windows = self.store.active_windows(now)
        rules = self.store.rules()
        out = []
        for d in self.engine.device_list():
            fig = figures.get(d.name, {"uploads": 0, "last_upload": None, "counts": {}})
            mutes = [w.until for w in windows if w.device == d.name
                     and w.kind is WindowKind.QUIET and w.category is None]
            seen = self.last_seen.get(d.name)
            out.append({
                "name": d.name, "address": d.address, "mac": d.mac, "mode": d.mode.value,
                **self._mode_fields(d.name),
                "flows": flows.get(d.name, 0),
                "uploads": fig["uploads"],
                "online": seen is not None and now - seen <= ONLINE_S,
                "last_seen": seen,
                "last_upload": fig["last_upload"],
                "pending": pending.get(d.name, 0),
                "mute_until": max(mutes) if mutes else None,
                "windows": sum(1 for w in windows if w.device == d.name),
                "rules": sum(1 for r in rules if r.device == d.name),
                "counts_24h": fig["counts"],
            })
        return out

    def _note_flows(self) -> None:
        """When each device was last seen, from its flows (kept past their forgetting)."""
        for flow in self.engine.iter_flows():
            name = flow.device.name
            if flow.last > self.last_seen.get(name, float("-inf")):
                self.last_seen[name] = flow.last

    def _cmd_flows(self, request: dict[str, Any], peer: Any) -> list[dict[str, Any]]:
        device = request.get("device")
        out = []
        for flow in self.engine.iter_flows():
            if device and flow.device.name != device:
                continue
            item = flow.summary()
            item["device"] = item.pop("device_name")
            out.append(item)
        return out

    def _cmd_log(self, request: dict[str, Any], peer: Any) -> list[dict[str, Any]]:
        """Uploads and how they ended, and refused connection attempts (outcome "blocked"),
        newest first."""
        device = request.get("device")
        outcome = request.get("outcome")
        if outcome is not None and outcome not in LOG_OUTCOMES:
            raise RequestError(f"outcome must be one of {', '.join(LOG_OUTCOMES)}")
        since, until = _time(request, "since"), _time(request, "until")
        text = request.get("text")
        if text is not None and not isinstance(text, str):
            raise RequestError("text must be a string")
        text = text[:MAX_TEXT] if text else None
        limit = max(1, min(int(request.get("limit") or 100), MAX_LOG_LIMIT))
        entries: list[dict[str, Any]] = []
        if outcome != BLOCKED:
            entries += [{"id": r.upload_id, "device": r.device, "host": r.host,
                         "remote": r.remote, "category": r.category, "bytes": r.upload_bytes,
                         "packets": r.packets, "started": r.started,
                         "decided_at": r.decided_at, "outcome": r.outcome.value,
                         "decided_by": r.decided_by, "kind": "upload",
                         "via": channel(r.decided_by), "reason": None, "attempts": 1}
                        for r in self.store.log(device=device, since=since, outcome=outcome,
                                                limit=limit, until=until, text=text)]
        if outcome in (None, BLOCKED):
            entries += [{"id": None, "device": b.device, "host": b.host, "remote": b.remote,
                         "category": b.category, "bytes": 0, "packets": 0,
                         "started": b.first_at, "decided_at": b.last_at, "outcome": BLOCKED,
                         "decided_by": "rule", "kind": "blocked", "via": "rule",
                         "reason": b.reason, "attempts": b.attempts}
                        for b in self.store.blocked(device=device, since=since, until=until,
                                                    text=text, limit=limit)]
        entries.sort(key=lambda e: e["decided_at"], reverse=True)
        return entries[:limit]


class RequestError(ValueError):
    """A request the daemon refuses, worded for the person (no "bad request:" prefix)."""


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """A window (allow window or mute) was opened; `superseded`: the ones it ended."""

    entry: dict[str, Any]
    superseded: list[str]
    event: str = "window-opened"


@dataclass(frozen=True, slots=True)
class RuleAdded:
    entry: dict[str, Any]
    event: str = "rule-added"


@dataclass(frozen=True, slots=True)
class StandingRevoked:
    """A window or always-rule was removed by a person (`revoke`, `unmute`)."""

    entry: dict[str, Any]
    by: str
    event: str = "standing-revoked"


@dataclass(frozen=True, slots=True)
class ModeChanged:
    reply: dict[str, Any]


def _window_entry(w: StoredWindow) -> dict[str, Any]:
    return {"id": f"w{w.id}", "kind": "allow-window" if w.kind is WindowKind.ALLOW else "mute",
            "device": w.device, "host": None, "category": w.category, "created": w.created,
            "until": w.until, "duration_text": w.duration_text, "source": w.source}


def _rule_entry(r: AlwaysRule) -> dict[str, Any]:
    return {"id": f"r{r.id}", "kind": f"always-{r.action.value}", "device": r.device,
            "host": r.host, "category": r.category, "created": r.created, "until": None,
            "duration_text": None, "source": r.source}


def _duration(request: dict[str, Any]) -> tuple[float, str]:
    """A window's duration from a request (duration_s, bounded 1 s..30 d) and the text to show
    for it: the person's own (`duration_text`, e.g. "400d") when it is sane, else ours."""
    typed = request.get("duration_text")
    text = "".join(ch for ch in str(typed) if ch.isprintable())[:16] if typed else None
    raw = request.get("duration_s")
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise RequestError("duration_s must be a number of seconds (1s to 30d)")
    try:
        seconds = float(raw)
    except ValueError:
        raise RequestError(f"duration_s must be a number of seconds, not {str(raw)[:16]!r}"
                           ) from None
    try:
        seconds = check_window_duration(seconds, text)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    return seconds, text or format_duration(seconds)


def _time(request: dict[str, Any], name: str) -> float | None:
    value = request.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a Unix time")
    return float(value)


_ENTRY_ID = re.compile(r"^\s*([wr])(\d{1,18})\s*$")


# How often the neighbour table is read (and a missing entry probed for) while a device is known
# by address only.
NEIGHBOUR_POLL_S = 2.0
# How often the QUIC block rules' counters are read, and how recent a relayed TCP connection
# must be to count as the device's fallback (Chromium's stack marks QUIC broken and uses TCP
# for new requests at once: design.md 5).
QUIC_CHECK_S = 10.0
QUIC_FALLBACK_S = 300.0
# At start, how long to wait for the router to resolve the address-only devices it was asked to:
# an ARP round trip on a LAN takes milliseconds; a device that is away does not answer at all.
NEIGHBOUR_START_WAIT_S = 1.0
# `devices`: a device is online when it was seen this recently; counts cover this long.
ONLINE_S = 600.0
COUNTS_WINDOW_S = 86400.0
# A refused attempt to a host is written at most this often per device and host (see
# _persist_blocked); `log` answers at most MAX_LOG_LIMIT entries, and `text` is capped.
BLOCKED_WRITE_S = 5.0
MAX_LOG_LIMIT = 10000
MAX_TEXT = 200


def _macless(config: GuardConfig) -> list[str]:
    return [d.address for d in config.devices
            if d.mac is None and d.address and ":" not in d.address]


def _probe(address: str) -> None:
    """Make the kernel resolve an address: a datagram to the discard port needs the neighbour's
    MAC before it can leave (ARP), and the device at most answers port-unreachable."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(b"", (address, 9))
    except OSError:
        pass  # no route, a down link: the device is not there, the next poll asks again


def _lease_macs(lease_files: Sequence[str]) -> dict[str, str]:
    """IPv4 address -> MAC from the DHCP lease files that exist (dnsmasq, odhcpd), for the
    addresses exactly one MAC holds a lease on, and whose MAC holds a lease on no other address
    (an extender that rewrites the DHCP client's MAC too gets one MAC for many hosts)."""
    from guard.shell.neighbours import parse_leases

    sightings = []
    for name in lease_files:
        try:
            with open(name, encoding="utf-8", errors="replace") as f:
                sightings += parse_leases(f.read(1 << 20), name)
        except OSError:
            continue  # no such file (another DHCP server), or unreadable: nothing from it
    holders: dict[str, set[str]] = {}
    addresses: dict[str, set[str]] = {}
    for sighting in sightings:
        if sighting.address and ":" not in sighting.address:
            holders.setdefault(sighting.address, set()).add(sighting.mac)
            addresses.setdefault(sighting.mac, set()).add(sighting.address)
    return {addr: next(iter(macs)) for addr, macs in holders.items()
            if len(macs) == 1 and len(addresses[next(iter(macs))]) == 1}


def with_neighbour_macs(config: GuardConfig, wait_s: float = 0.0,
                        lease_files: Sequence[str] | None = None,
                        shared: dict[str, tuple[str, tuple[str, ...]]] | None = None,
                        table: dict[str, str] | None = None) -> GuardConfig:
    """Address-only devices get their MAC from the router's neighbour table, so their IPv6
    traffic (matched by MAC) is guarded from its first packet. An address the table does not
    know is probed, so the kernel resolves it: within `wait_s` here, or for the next poll. An
    address still unresolved takes the MAC of its DHCP lease, if the router handed one out: a
    device that is away now gets matched by MAC the moment it comes back, before its first
    packet (the neighbour table, when it answers, is preferred: it is what is on the wire).

    A MAC that the table also holds for another IPv4 address is never taken: it stands for
    several hosts (clients behind a MAC-rewriting Wi-Fi extender), and matching it would guard
    them all. Such a device stays matched by its address alone; `shared` (if given) gets
    device name -> (MAC, the other addresses). `table` is a neighbour table already read."""
    table = dict(table) if table is not None else _neighbour_table()
    wanted = _macless(config)
    missing = [address for address in wanted if address not in table]
    for address in missing:
        _probe(address)
    deadline = time.monotonic() + wait_s
    while missing and time.monotonic() < deadline:
        time.sleep(0.05)
        table = _neighbour_table()
        missing = [address for address in missing if address not in table]
    macs: dict[str, str] = {}
    sharers: dict[str, tuple[str, tuple[str, ...]]] = {}
    for address in wanted:
        mac = table.get(address)
        if mac is None:
            continue
        others = _mac_sharers(table, mac, address)
        if others:
            sharers[address] = (mac, others)
        else:
            macs[address] = mac
    if missing:
        from guard.shell.neighbours import DEFAULT_LEASE_FILES

        leased = _lease_macs(DEFAULT_LEASE_FILES if lease_files is None else lease_files)
        for address in missing:
            mac = leased.get(address)
            if mac is None:
                continue
            others = _mac_sharers(table, mac, address)
            if others:
                sharers[address] = (mac, others)
            else:
                macs[address] = mac
    if shared is not None:
        for d in config.devices:
            if d.mac is None and d.address in sharers:
                shared[d.name] = sharers[d.address]
    devices = tuple(replace(d, mac=macs[d.address]) if macs.get(d.address or "") else d
                    for d in config.devices)
    return replace(config, devices=devices)


# Second guard on a held connection's kept bytes, above the engine's per-upload cap: the relay
# stops reading it there (the engine denies at its cap; this only bounds a bug's damage).
RELAY_KEPT_SLACK_BYTES = 64 << 10
RECENT_RELEASES = 64  # bursts released as not audio kept for `status --json`

QUEUE_BATCH = 64  # packets read from one queue per turn when serving several


class _QueueBatch:
    """What NetfilterQueue.run_socket reads from: the queue's own netlink socket (not a copy
    of it), non-blocking, that reports EAGAIN after QUEUE_BATCH reads so run_socket returns."""

    def __init__(self, fd: int) -> None:
        import socket

        self._flags = socket.MSG_DONTWAIT
        self._sock = socket.socket(fileno=fd)
        self._left = 0

    def start(self) -> _QueueBatch:
        self._left = QUEUE_BATCH
        return self

    def recv(self, size: int) -> bytes:
        if self._left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self._left -= 1
        return self._sock.recv(size, self._flags)

    def close(self) -> None:
        self._sock.detach()  # the fd is the queue's: unbind closes it


def web_state_dir(config: GuardConfig) -> str:
    """Where the web prompt keeps its token and certificate: beside the state database, so on
    OpenWrt (state_db under /etc/hushgate) they survive reboots and the fingerprint stays."""
    return os.path.dirname(os.path.abspath(config.state_db)) or "."


def _by(request: dict[str, Any], peer: Any) -> str:
    """Who decided, for the audit log: what the client says, and the uid the kernel vouches for."""
    said = "".join(ch for ch in str(request.get("by") or "cli") if ch.isprintable())[:48]
    uid = getattr(peer, "uid", None)
    return f"{said} (uid {uid})" if uid is not None else said


# `hushgate run`'s exit code for a configuration it cannot use (sysexits' EX_CONFIG). The service
# units do not restart on it: systemd's RestartPreventExitStatus=78, and on OpenWrt procd's
# respawn limit (packaging/); restarting would only fail again, with the speakers offline.
EXIT_CONFIG = 78
CONFIG_ERROR_NOTE = ("configuration error (exit 78): the service is not restarted until the "
                     "config is fixed")

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
# What each capability is needed for, in the words `run` and `doctor` use.
CAPABILITIES = {
    CAP_NET_ADMIN: ("CAP_NET_ADMIN", "the firewall rules, NFQUEUE, conntrack and the relay's "
                    "IP_TRANSPARENT and SO_MARK"),
    CAP_NET_RAW: ("CAP_NET_RAW", "the TCP resets that deny and block send"),
}
LOCK_NAME = "hushgate.lock"


class StartError(Exception):
    """A start-up failure already worded for the one-line log."""


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


def capabilities(pid: int | str = "self") -> int | None:
    """The effective capability set of a process (/proc/PID/status CapEff), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def missing_capabilities(pid: int | str = "self") -> list[str]:
    """["CAP_NET_RAW (what it is for)", ...]: what a guard (this process, or `pid`) lacks."""
    caps = capabilities(pid)
    if caps is None:
        return []  # no /proc: nothing to say; the first kernel call tells
    return [f"{name} ({why})" for bit, (name, why) in CAPABILITIES.items()
            if not caps & (1 << bit)]


def probe_listen(listen: str, what: str) -> None:
    """Bind (and close) a TCP socket on a listen address, so a web prompt that could not listen
    is refused before any rule is touched. Raises StartError naming the address."""
    from guard.shell.web import WebError, parse_listen

    try:
        address, port = parse_listen(listen)
    except WebError as exc:
        raise StartError(str(exc)) from None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((str(address), port))
    except OSError as exc:
        raise StartError(f"{what} {listen}: cannot listen: {exc.strerror or exc}") from None


class Notifier:
    """sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET (a path, or an abstract
    socket written "@name"). READY=1 once started, WATCHDOG=1 from the packet loop at a quarter
    of $WATCHDOG_USEC, STOPPING=1 on the way out. Without NOTIFY_SOCKET it does nothing. The
    variables are taken out of the environment, so hooks (children) cannot speak for the guard."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        target = env.pop("NOTIFY_SOCKET", "") or ""
        usec = env.pop("WATCHDOG_USEC", "") or ""
        pid = env.pop("WATCHDOG_PID", "") or ""
        self.address: str | bytes | None = None
        if target.startswith("@"):
            self.address = b"\0" + target[1:].encode()
        elif target.startswith("/"):
            self.address = target
        self.interval: float | None = None
        try:
            if usec and (not pid or int(pid) == os.getpid()) and int(usec) > 0:
                self.interval = int(usec) / 1e6 / 4
        except ValueError:
            self.interval = None
        self.last_beat = float("-inf")
        self.sent = 0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, message: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self.address)
        except OSError:
            return False  # the manager is gone or busy: the next beat tries again
        self.sent += 1
        return True

    def beat(self, now: float) -> None:
        if self.interval is not None and now - self.last_beat >= self.interval:
            self.last_beat = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class GuardRunning(Exception):
    def __init__(self, pid: int | None, socket_path: str | None) -> None:
        super().__init__(pid, socket_path)
        self.pid = pid
        self.socket = socket_path


def lock_path(config: GuardConfig) -> str:
    """One guard per router: the lock lives beside the control socket (/run/hushgate), so
    guards that share a socket directory exclude each other."""
    return os.path.join(os.path.dirname(os.path.abspath(config.socket)), LOCK_NAME)


def lock_holder(path: str) -> tuple[int | None, str | None]:
    """(pid, socket) written in a lock file by the guard that holds it; (None, None) unknown."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            fields = f.read(4096).split("\n")
        return int(fields[0]), (fields[1] if len(fields) > 1 and fields[1] else None)
    except (OSError, ValueError):
        return None, None


def running_guard(config: GuardConfig) -> int | None:
    """The pid of the guard that holds this config's lock, or None (`doctor`)."""
    path = lock_path(config)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:  # a shared lock is taken only while nobody holds the exclusive one
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock_holder(path)[0]
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class GuardLock:
    """An exclusive flock(2) held for the daemon's life; the kernel drops it when the process
    dies however it dies, so a crashed guard never blocks the next one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, socket_path: str) -> None:
        directory = os.path.dirname(self.path)
        if directory and not os.path.isdir(directory):
            os.makedirs(directory, mode=0o755, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GuardRunning(*lock_holder(self.path)) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{socket_path}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes with it; the file stays (unlinking would race)
            self.fd = None


def _bound_queue(config: GuardConfig) -> tuple[int, int] | None:
    """(queue, netlink portid) of a queue of ours some other process has bound already."""
    from guard.shell.nfqueue import NFQUEUE_PROC, parse_nfqueue_proc

    try:
        with open(NFQUEUE_PROC, encoding="ascii", errors="replace") as f:
            bindings = parse_nfqueue_proc(f.read())
    except OSError:
        return None
    for number in range(config.queue, config.queue + config.queue_count):
        if number in bindings:
            return number, bindings[number].portid
    return None


def run(config: GuardConfig) -> int:
    """Run the guard in the foreground until SIGTERM/SIGINT. Returns the exit code: 0 after a
    clean stop, 1 when it could not start (one line in the log), EXIT_CONFIG for a config it
    cannot use. Nothing on a start or stop path prints a traceback."""
    if os.geteuid() != 0:
        log("run needs root (NFQUEUE, iptables, raw sockets)")
        return 1
    missing = missing_capabilities()
    if missing:
        text = f"missing capabilities: {'; '.join(missing)}"
        if not config.fail_open:
            log(f"refusing to start: {text} (run it as root with them; the service units grant "
                "them)")
            return 1
        log(f"WARNING: {text}. fail = \"open\": going on, but what needs them will fail and "
            "the devices may pass unguarded")
    lock = GuardLock(lock_path(config))
    try:
        lock.acquire(config.socket)
    except GuardRunning as exc:
        pid = exc.pid if exc.pid is not None else "unknown"
        log(f"refusing to start: a guard is already running (pid {pid}, control socket "
            f"{exc.socket or config.socket}); stop it first. Nothing was changed")
        return 1
    except OSError as exc:
        log(f"refusing to start: cannot take the lock {lock.path}: {exc.strerror or exc}")
        return 1
    try:
        return _run_locked(config)
    finally:
        lock.release()


def _run_locked(config: GuardConfig) -> int:
    bound = _bound_queue(config)
    if bound is not None:
        log(f"refusing to start: NFQUEUE {bound[0]} is already bound by another process "
            f"(netlink portid {bound[1]}): another guard or NFQUEUE program runs; stop it or "
            "set another guard.queue. Nothing was changed")
        return 1
    try:
        daemon = Daemon(config)
    except RuleError as exc:
        log(f"refusing to start: {_one_line(str(exc))}; {CONFIG_ERROR_NOTE}")
        return EXIT_CONFIG
    except ValueError as exc:  # the rules cannot be built from this config (doctor says so too)
        log(f"refusing to start: {_one_line(str(exc))}; {CONFIG_ERROR_NOTE}")
        return EXIT_CONFIG
    except StoreError as exc:
        log(f"refusing to start: state database: {_one_line(str(exc))}")
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback (design.md 8)
        log(f"refusing to start: {type(exc).__name__}: {_one_line(str(exc))}")
        return 1
    reload_requested = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        daemon.stop()

    def on_hup(signum: int, frame: Any) -> None:
        reload_requested.set()
        daemon.wake()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    daemon.reload_requested = reload_requested
    code = 0
    try:
        try:
            daemon.start()
        except (StartError, WebError, ControlError, FirewallError, OSError, ValueError) as exc:
            log(f"refusing to start: {_one_line(str(exc))}")  # one line, exit 1 (design.md 8)
            return 1
        except Exception as exc:  # noqa: BLE001
            log(f"refusing to start: {type(exc).__name__}: {_one_line(str(exc))}")
            return 1
        daemon.notifier.send(f"READY=1\nSTATUS=guarding {len(daemon.config.devices)} device(s)"
                             f"\nMAINPID={os.getpid()}")
        daemon.serve()
    finally:
        daemon.close()
    if daemon.close_failed:
        code = 1
    log("stopped")
    return code


def main(argv: list[str] | None = None) -> int:
    import argparse

    from guard.core.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="hushgate-run")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log(f"refusing to start: {exc}; {CONFIG_ERROR_NOTE}")
        return EXIT_CONFIG
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
