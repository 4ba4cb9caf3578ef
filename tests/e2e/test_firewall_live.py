"""guard.shell.firewall against the real kernel, in throw-away network namespaces.

Topology (all addresses in 198.18.0.0/15 and the 2001:2::/48 benchmarking prefix):
  dev  (a configured speaker, 198.18.10.10, 2001:2:0:10::10)  ─┐
  other (an unconfigured host, 198.18.11.20)                  ─┼─ gw (router, forwarding) ─ wan
                                                                    198.19.0.1          198.19.0.10
Every namespace is deleted in a finally, whatever happens. Skipped only when not root and CI is
not "true"; in CI these tests must run, so lacking root fails them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from guard.shell.firewall import (
    DeviceMatch,
    FirewallSpec,
    IptablesBackend,
    NftablesBackend,
    netns_runner,
)
from tests.ci import IN_CI, IS_ROOT

if not IS_ROOT and not IN_CI:
    pytest.skip(
        "namespace tests need root (they run, and must pass, in CI)", allow_module_level=True
    )


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed")


DEV_MAC = "02:00:5e:10:00:10"
OTHER_MAC = "02:00:5e:11:00:20"
PY = sys.executable
REPO = Path(__file__).resolve().parents[2]


def sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, check=check, capture_output=True, text=True, input=input, timeout=60
    )


@dataclass
class Topo:
    gw: str
    dev: str
    other: str
    wan: str

    def ns(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", ns, *argv, check=check)

    def popen(self, ns: str, code: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run_py(self, ns: str, code: str, timeout: float = 30) -> str:
        res = subprocess.run(
            ["ip", "netns", "exec", ns, PY, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    # -- probes ---------------------------------------------------------------------------

    def ping(self, src: str, dst: str, count: int = 3) -> int:
        """How many ICMP echo replies came back (raw socket: no ping binary needed)."""
        v6 = ":" in dst
        out = self.run_py(
            src,
            f"""
            import os, select, socket, struct, time
            v6 = {v6!r}
            fam, proto = (socket.AF_INET6, 58) if v6 else (socket.AF_INET, 1)
            s = socket.socket(fam, socket.SOCK_RAW, proto)
            ident = os.getpid() & 0xFFFF
            def csum(b):
                b += b"\\0" * (len(b) % 2)
                t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
                t = (t >> 16) + (t & 0xFFFF); t += t >> 16
                return ~t & 0xFFFF
            got = set()
            for seq in range({count}):
                typ = 128 if v6 else 8
                hdr = struct.pack("!BBHHH", typ, 0, 0, ident, seq) + b"hushgate"
                if not v6:  # the kernel fills the ICMPv6 checksum itself
                    hdr = hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:]
                s.sendto(hdr, ({dst!r}, 0))
                end = time.monotonic() + 0.6
                while time.monotonic() < end:
                    r, _, _ = select.select([s], [], [], max(end - time.monotonic(), 0))
                    if not r:
                        break
                    data = s.recv(2048)
                    icmp = data if v6 else data[(data[0] & 0xF) * 4:]
                    t, _, _, i, q = struct.unpack("!BBHHH", icmp[:8])
                    if t == (129 if v6 else 0) and i == ident:
                        got.add(q)
            print(len(got))
            """,
        )
        return int(out)

    def udp(self, src: str, dst: str, addr: str, port: int, n: int = 5, sport: int = 40000) -> int:
        """Send n datagrams on one flow; return how many the receiver in `dst` got."""
        fam = "AF_INET6" if ":" in addr else "AF_INET"
        bind = "::" if ":" in addr else "0.0.0.0"
        rx = self.popen(
            dst,
            f"""
            import socket
            s = socket.socket(socket.{fam}, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(({bind!r}, {port}))
            print("ready", flush=True)
            s.settimeout(1.5)
            n = 0
            try:
                while True:
                    s.recvfrom(4096)
                    n += 1
            except OSError:
                pass
            print(n, flush=True)
            """,
        )
        assert rx.stdout is not None
        assert rx.stdout.readline().strip() == "ready"
        self.run_py(
            src,
            f"""
            import socket, time
            s = socket.socket(socket.{fam}, socket.SOCK_DGRAM)
            s.bind(({bind!r}, {sport}))
            for i in range({n}):
                s.sendto(b"x" * 100, ({addr!r}, {port}))
                time.sleep(0.05)
            """,
        )
        out, _ = rx.communicate(timeout=20)
        return int(out.strip().splitlines()[-1])

    def tcp_connect(self, src: str, dst: str, addr: str, port: int, timeout: float = 3) -> str:
        """'ok', 'refused' (a reset or port-unreachable came back) or 'timeout'."""
        fam = "AF_INET6" if ":" in addr else "AF_INET"
        bind = "::" if ":" in addr else "0.0.0.0"
        srv = self.popen(
            dst,
            f"""
            import socket
            s = socket.socket(socket.{fam}, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(({bind!r}, {port}))
            s.listen()
            print("ready", flush=True)
            s.settimeout({timeout + 2})
            try:
                c, _ = s.accept()
                c.recv(100)
            except OSError:
                pass
            """,
        )
        assert srv.stdout is not None
        assert srv.stdout.readline().strip() == "ready"
        try:
            return self.run_py(
                src,
                f"""
                import socket
                s = socket.socket(socket.{fam}, socket.SOCK_STREAM)
                s.settimeout({timeout})
                try:
                    s.connect(({addr!r}, {port}))
                    s.sendall(b"hello")
                    print("ok")
                except ConnectionRefusedError:
                    print("refused")
                except (TimeoutError, OSError) as e:
                    print("timeout")
                """,
                timeout=timeout + 10,
            )
        finally:
            srv.kill()
            srv.communicate()


def _cleanup_stale() -> None:
    """Namespaces of an earlier run that died before its finally (kill -9): hgfw<pid>[gdow]."""
    listing = sh("ip", "netns", "list", check=False).stdout
    for line in listing.splitlines():
        m = re.match(r"^(hgfw(\d+)[gdow])\b", line)
        if m and not Path(f"/proc/{m[2]}").exists():
            sh("ip", "netns", "del", m[1], check=False)


@contextlib.contextmanager
def make_topo() -> Iterator[Topo]:
    """Build the four namespaces; delete them on the way out, whatever happened."""
    for b in ("ip", "iptables", "ip6tables", "iptables-legacy", "iptables-legacy-restore"):
        _need(b)
    _cleanup_stale()
    base = f"hgfw{os.getpid()}"
    t = Topo(gw=f"{base}g", dev=f"{base}d", other=f"{base}o", wan=f"{base}w")
    names = [t.gw, t.dev, t.other, t.wan]
    try:
        for n in names:
            sh("ip", "netns", "add", n)
        cmds = [
            f"link add lan0 netns {t.gw} type veth peer name eth0 netns {t.dev}",
            f"link add lan1 netns {t.gw} type veth peer name eth0 netns {t.other}",
            f"link add wan0 netns {t.gw} type veth peer name eth0 netns {t.wan}",
        ]
        for c in cmds:
            sh("ip", *c.split())
        setup = {
            t.gw: [
                "addr add 198.18.10.1/24 dev lan0",
                "addr add 198.18.11.1/24 dev lan1",
                "addr add 198.19.0.1/24 dev wan0",
                "addr add 2001:2:0:10::1/64 dev lan0 nodad",
                "addr add 2001:2:0:20::1/64 dev wan0 nodad",
            ],
            t.dev: [
                f"link set eth0 address {DEV_MAC}",
                "addr add 198.18.10.10/24 dev eth0",
                "addr add 2001:2:0:10::10/64 dev eth0 nodad",
            ],
            t.other: [f"link set eth0 address {OTHER_MAC}", "addr add 198.18.11.20/24 dev eth0"],
            t.wan: [
                "addr add 198.19.0.10/24 dev eth0",
                "addr add 2001:2:0:20::10/64 dev eth0 nodad",
            ],
        }
        for ns, lines in setup.items():
            for c in lines:
                t.ns(ns, "ip", *c.split())
            t.ns(ns, "ip", "link", "set", "lo", "up")
            for dev in ("lan0", "lan1", "wan0", "eth0"):
                t.ns(ns, "ip", "link", "set", dev, "up", check=False)
        routes = {
            t.dev: ["route add default via 198.18.10.1", "-6 route add default via 2001:2:0:10::1"],
            t.other: ["route add default via 198.18.11.1"],
            t.wan: [
                "route add 198.18.0.0/15 via 198.19.0.1",
                "-6 route add 2001:2:0:10::/64 via 2001:2:0:20::1",
            ],
        }
        for ns, lines in routes.items():
            for c in lines:
                t.ns(ns, "ip", *c.split())
        t.ns(t.gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        t.ns(t.gw, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        # Wait for the v6 routes to settle (no DAD, but neighbour discovery needs a moment).
        for _ in range(20):
            if t.ping(t.dev, "2001:2:0:20::10", count=1) == 1:
                break
            time.sleep(0.2)
        yield t
    finally:
        for n in names:
            sh("ip", "netns", "del", n, check=False)


@pytest.fixture
def topo() -> Iterator[Topo]:
    with make_topo() as t:
        yield t


def spec(**kw) -> FirewallSpec:
    devices = (DeviceMatch("kitchen-echo", address="198.18.10.10", mac=DEV_MAC),)
    base = FirewallSpec(devices=devices, queue=7)
    return replace(base, **kw)


VARIANTS = ["nft", "legacy"]


def backend(t: Topo, variant: str, **kw) -> IptablesBackend:
    return IptablesBackend(spec(**kw), run=netns_runner(t.gw), variant=variant)


def saved_text(t: Topo, variant: str) -> str:
    return (
        t.ns(t.gw, f"iptables-{variant}-save").stdout
        + t.ns(t.gw, f"ip6tables-{variant}-save").stdout
    )


def ctr(fw: IptablesBackend, label: str, fam: str = "ipv4") -> int:
    return fw.counters()[fam][label][0]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", VARIANTS)
def test_apply_twice_installs_each_rule_once_and_matches_render(topo: Topo, variant: str) -> None:
    fw = backend(topo, variant)
    fw.apply_safety_net()
    fw.apply_safety_net()
    fw.install_dynamic()
    fw.install_dynamic()
    fw.apply_safety_net()  # while "running": keeps the dynamic rules
    st = fw.status()
    for fam, f in st["families"].items():
        assert f["missing"] == [], (fam, f["missing"])
        assert f["unexpected"] == [], (fam, f["unexpected"])
        assert all(r["duplicates"] == 0 for r in f["rules"]), fam
        assert all(h["positions"] == [1] for h in f["hooks"].values()), f["hooks"]
    assert st["safety_net"] and st["dynamic"]
    assert st["installed_fail_mode"] == "closed"
    assert st["backend"] == f"iptables-{variant}"
    # A foreign rule put above our jump is moved below it by the next apply.
    topo.ns(topo.gw, f"iptables-{variant}", "-t", "mangle", "-I", "FORWARD", "1", "-j", "ACCEPT")
    assert fw.status()["families"]["ipv4"]["hooks"]["mangle/FORWARD"]["positions"] == [2]
    fw.apply_safety_net()
    assert fw.status()["families"]["ipv4"]["hooks"]["mangle/FORWARD"]["positions"] == [1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_remove_all_leaves_no_rule_in_either_family(topo: Topo, variant: str) -> None:
    fw = backend(topo, variant)
    fw.install_dynamic()
    assert "HUSHGATE" in saved_text(topo, variant)
    fw.remove_all()
    assert "HUSHGATE" not in saved_text(topo, variant)
    fw.remove_all()  # idempotent
    assert topo.ping(topo.dev, "198.19.0.10") == 3


@pytest.mark.parametrize("variant", VARIANTS)
def test_fail_closed_drops_device_when_no_consumer(topo: Topo, variant: str) -> None:
    fw = backend(topo, variant)
    fw.install_dynamic()
    # An unconfigured host first: its packets never reach any of our rules but the entry chain.
    assert topo.ping(topo.other, "198.19.0.10") == 3
    assert topo.udp(topo.other, topo.wan, "198.19.0.10", 5000) == 5
    c = fw.counters()["ipv4"]
    assert c["queue.up"][0] == 0 and c["queue.dns"][0] == 0 and c["queue.down_kernel"][0] == 0
    assert all(v[0] == 0 for k, v in c.items() if k.startswith("dispatch.")), c
    # The device: queued to a queue nobody listens on, no bypass, so dropped.
    assert topo.ping(topo.dev, "198.19.0.10") == 0
    assert topo.udp(topo.dev, topo.wan, "198.19.0.10", 5000) == 0
    assert ctr(fw, "queue.up") >= 8
    assert ctr(fw, "net.drop") == 0
    # IPv6, matched by MAC: the same.
    assert topo.ping(topo.dev, "2001:2:0:20::10") == 0
    assert ctr(fw, "queue.up", "ipv6") >= 3


@pytest.mark.parametrize("variant", VARIANTS)
def test_safety_net_survives_remove_dynamic(topo: Topo, variant: str) -> None:
    fw = backend(topo, variant)
    fw.install_dynamic()
    fw.remove_dynamic()
    st = fw.status()
    assert st["safety_net"] and not st["dynamic"]
    assert topo.ping(topo.dev, "198.19.0.10") == 0
    assert topo.ping(topo.dev, "2001:2:0:20::10") == 0
    assert ctr(fw, "net.drop") >= 3 and ctr(fw, "net.drop", "ipv6") >= 3
    assert ctr(fw, "queue.up") == 0
    assert topo.ping(topo.other, "198.19.0.10") == 3
    # The run comes back: install_dynamic after remove_dynamic, still one copy of each rule.
    fw.install_dynamic()
    assert fw.status()["families"]["ipv4"]["unexpected"] == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_fail_open_bypass_passes_without_consumer(topo: Topo, variant: str) -> None:
    fw = backend(topo, variant, fail_open=True)
    fw.install_dynamic()
    assert fw.status()["installed_fail_mode"] == "open"
    assert topo.ping(topo.dev, "198.19.0.10") == 3
    assert topo.udp(topo.dev, topo.wan, "198.19.0.10", 5000) == 5
    assert ctr(fw, "queue.up") >= 3
    # Guard stopped in fail-open: the net only counts.
    fw.remove_dynamic()
    assert topo.ping(topo.dev, "198.19.0.10") == 3
    assert ctr(fw, "net.open") >= 3


CONSUMER = """
import sys
from netfilterqueue import NetfilterQueue
from guard.shell.firewall import compose_mark
mode, queue = sys.argv[1], int(sys.argv[2])
seen = 0
def cb(pkt):
    global seen
    seen += 1
    try:
        if mode == "allow":
            pkt.set_mark(compose_mark(pkt.get_mark(), "allow"))
            pkt.accept()
        elif mode == "block":
            pkt.set_mark(compose_mark(pkt.get_mark(), "block"))
            pkt.repeat()
        else:
            pkt.accept()
    finally:
        print(seen, flush=True)
q = NetfilterQueue()
q.bind(queue, cb)
print("ready", flush=True)
try:
    q.run()
finally:
    q.unbind()
"""


def consumer(t: Topo, mode: str) -> subprocess.Popen:
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("netfilterqueue is not installed")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(
        ["ip", "netns", "exec", t.gw, PY, "-c", CONSUMER, mode, "7"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    assert line == "ready", p.stderr.read() if p.stderr else line
    return p


def stop(p: subprocess.Popen) -> int:
    p.terminate()
    out, _ = p.communicate(timeout=10)
    nums = [int(x) for x in out.split() if x.isdigit()]
    return max(nums, default=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_allow_mark_on_accept_moves_flow_to_kernel_fast_path(topo: Topo, variant: str) -> None:
    fw = backend(topo, variant)
    fw.install_dynamic()
    p = consumer(topo, "allow")
    try:
        got = topo.udp(topo.dev, topo.wan, "198.19.0.10", 5001, n=20)
    finally:
        seen = stop(p)
    assert got == 20
    assert seen == 1  # the first packet, accepted with ALLOW, saved in mangle POSTROUTING
    assert ctr(fw, "post.save_verdict") == 1
    assert ctr(fw, "up.fast_allow") == 19
    assert ctr(fw, "queue.up") == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_mark_on_repeat_resets_the_connection(topo: Topo, variant: str) -> None:
    fw = backend(topo, variant)
    fw.install_dynamic()
    p = consumer(topo, "block")
    try:
        t0 = time.monotonic()
        outcome = topo.tcp_connect(topo.dev, topo.wan, "198.19.0.10", 8443)
        elapsed = time.monotonic() - t0
    finally:
        seen = stop(p)
    assert outcome == "refused" and elapsed < 3
    assert seen == 1  # the SYN, repeated with BLOCK; the save rule at the top of UP stored it
    assert ctr(fw, "up.save_verdict") == 1
    assert ctr(fw, "up.fast_block") >= 1
    assert ctr(fw, "reject.tcp") >= 1


@pytest.mark.parametrize("variant", ["nft"])
def test_conntrack_update_with_full_tuple_blocks_flow(topo: Topo, variant: str) -> None:
    _need("conntrack")
    fw = backend(topo, variant)
    fw.install_dynamic()
    p = consumer(topo, "accept")
    try:
        assert topo.udp(topo.dev, topo.wan, "198.19.0.10", 5002, n=3, sport=40002) == 3
        argv = fw.conntrack_mark_argv("udp", "198.18.10.10", "198.19.0.10", 40002, 5002, "block")
        res = topo.ns(topo.gw, *argv, check=False)
        assert res.returncode == 0, res.stderr
        assert topo.udp(topo.dev, topo.wan, "198.19.0.10", 5002, n=3, sport=40002) == 0
    finally:
        seen = stop(p)
    assert seen == 3
    assert ctr(fw, "reject.udp") >= 3


@pytest.mark.parametrize("variant", ["nft"])
def test_dns_answers_to_device_are_queued_forwarded_and_from_router(
    topo: Topo, variant: str
) -> None:
    fw = backend(topo, variant)
    fw.install_dynamic()
    p = consumer(topo, "accept")
    try:
        # A forwarded resolver on the wan side, and the router's own resolver (OUTPUT path).
        code = """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", 53))
            print("ready", flush=True)
            s.settimeout(5)
            try:
                data, peer = s.recvfrom(512)
                s.sendto(b"answer", peer)
            except OSError:
                pass
            """
        for ns, addr in ((topo.wan, "198.19.0.10"), (topo.gw, "198.18.10.1")):
            srv = topo.popen(ns, code)
            assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
            out = topo.run_py(
                topo.dev,
                f"""
                import socket
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(3)
                s.sendto(b"query", ({addr!r}, 53))
                print(s.recvfrom(512)[0].decode())
                """,
            )
            srv.communicate(timeout=10)
            assert out == "answer"
    finally:
        seen = stop(p)
    c = fw.counters()["ipv4"]
    assert c["down.dns_udp"][0] == 1  # forwarded answer
    assert c["output.dns_udp"][0] == 1  # the router's own answer, matched by the INPUT tag
    assert c["queue.dns"][0] == 2
    assert seen == 3  # the forwarded query (upstream) and the two answers


@pytest.mark.parametrize("variant", ["nft"])
def test_quic_block_and_ipv6_off_reject_fast(topo: Topo, variant: str) -> None:
    fw = backend(topo, variant, quic_block_devices=("kitchen-echo",), ipv6=False)
    fw.install_dynamic()
    out = topo.run_py(
        topo.dev,
        """
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.connect(("198.19.0.10", 443))
        s.send(b"quic initial")
        try:
            s.recv(100)
            print("answer")
        except ConnectionRefusedError:
            print("refused")
        except OSError:
            print("timeout")
        """,
    )
    assert out == "refused"
    assert ctr(fw, "reject.udp") >= 1
    # IPv6 off means blocked, not open: a v6 TCP connect is reset at once.
    assert topo.tcp_connect(topo.dev, topo.wan, "2001:2:0:20::10", 8443) == "refused"
    assert ctr(fw, "reject.tcp", "ipv6") >= 1


def test_nft_check_validates_all_but_queue_statements(topo: Topo) -> None:
    _need("nft")
    nft = NftablesBackend(spec(quic_block_devices=("kitchen-echo",)), run=netns_runner(topo.gw))
    res = nft.check()
    assert res.ok, res.message
    assert res.syntax_ok
    if res.queue_supported is False:
        assert res.rest_ok and not res.full_ok
        assert len(res.replaced) == 2  # queue_up and dns; queue_down accepts in the kernel
        assert "NOT checked" in res.message
    off = nft.offload_status()
    assert off["offloading"] is False and off["flowtables"] == []
