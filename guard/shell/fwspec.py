"""From a GuardConfig to firewall rules: the spec, the backend, and nftables' persistent apply.

Rules of this module: the config decides which devices are matched and how (mode `off` is not
inspected at all, so it is left out of the kernel rules); nothing here chooses a verdict. Commands
run only through `guard.shell.firewall`'s Runner, so everything is testable without root.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil

from guard.core.config import GuardConfig
from guard.core.policy import Mode
from guard.shell.firewall import (
    DeviceMatch,
    FirewallError,
    FirewallSpec,
    IptablesBackend,
    NftablesBackend,
    Runner,
    run_command,
)

__all__ = ["NftRunBackend", "apply_persistent", "ip_families", "nft_persistent_script",
           "remove_everything", "run_backend", "spec_from_config"]

# Chains `hushgate run` owns in the nftables table (see NftablesBackend.dynamic_script).
NFT_DYNAMIC_CHAINS = ("queue_up", "queue_down", "dns", "syn_hold")


def spec_from_config(config: GuardConfig) -> FirewallSpec:
    """The kernel-side view of the config. A device's `address` may be IPv6 (DeviceConfig allows
    it): it is then matched as an extra IPv6 address. QUIC is blocked for a device when its own
    `quic` says "block", or it says nothing and `guard.quic` does (the default)."""
    devices: list[DeviceMatch] = []
    quic_block: list[str] = []
    relay: list[str] = []
    for d in config.devices:
        if d.mode is Mode.OFF:
            continue
        if config.tcp_hold == "relay" and d.mode in (Mode.STRICT, Mode.FOLLOWUPS):
            relay.append(d.name)  # monitor stays a passive dry run on the queue (design 5)
        address, address6 = d.address, tuple(d.address6)
        if address is not None and ipaddress.ip_address(address).version == 6:
            address, address6 = None, (address, *address6)
        devices.append(DeviceMatch(d.name, address=address, mac=d.mac, address6=address6))
        if config.quic_for(d) == "block":
            quic_block.append(d.name)
    return FirewallSpec(
        devices=tuple(devices),
        queue=config.queue,
        queue_count=config.queue_count,
        fail_open=config.fail_open,
        mark_mask=config.mark_mask,
        quic_block_devices=tuple(quic_block),
        relay_devices=tuple(relay),
        relay_port=config.relay_port,
        tproxy_mark=config.tproxy_mark,
        relay_mark=config.relay_mark,
        relay_table=config.relay_table,
        relay_priority=config.relay_priority,
    )


def ip_families() -> tuple[int, ...]:
    """(4, 6), or (4,) on a kernel built without IPv6 (nothing to guard or block there)."""
    return (4, 6) if os.path.exists("/proc/sys/net/ipv6") else (4,)


def nft_persistent_script(backend: NftablesBackend) -> str:
    """`nft -f` input that installs or refreshes the persistent part of the table in one
    transaction: sets and every chain but the dynamic ones are flushed and refilled; the dynamic
    chains are created empty when missing and otherwise kept as a running guard filled them."""
    table = f"inet {backend.table}"
    lines = backend.render().splitlines()
    skeleton: list[str] = []
    full: list[str] = []
    flushes: list[str] = []
    block: str | None = None  # "set NAME" / "chain NAME" being copied
    for line in lines:
        if line.startswith("#"):
            continue
        m = re.match(r"^\t(set|chain) (\S+) \{$", line)
        if m:
            kind, name = m.groups()
            block = f"{kind} {name}"
            dynamic = kind == "chain" and name in NFT_DYNAMIC_CHAINS
            if not dynamic:
                flushes.append(f"flush {kind} {table} {name}")
            skeleton.append(line)
            full.append(line)
            continue
        if block is not None:
            if line == "\t}":
                skeleton.append(line)
                full.append(line)
                block = None
                continue
            kind, name = block.split(" ", 1)
            body = line.strip()
            if (kind == "set" and body.startswith("type ")) or body.startswith("type filter hook"):
                skeleton.append(line)  # declarations only: creates what is missing
                full.append(line)
            elif not (kind == "chain" and name in NFT_DYNAMIC_CHAINS):
                full.append(line)
            continue
        skeleton.append(line)
        full.append(line)
    head = [f"# hushgate persistent rules for {table}; the dynamic chains are left to `run`"]
    return "\n".join(head + skeleton + flushes + full) + "\n"


def apply_persistent(config: GuardConfig, run: Runner = run_command) -> FirewallSpec:
    """`firewall apply`: dispatch, fast path and the fail-closed safety net, kept until
    `firewall remove`; a running guard's queue rules are kept as they are. The spec is exactly
    the one `run` installs (no MACs filled in from the neighbour table), so a later `run` start
    refreshes these rules without changing them."""
    spec = spec_from_config(config)
    if config.backend == "nftables":
        res = run(["nft", "-f", "-"], nft_persistent_script(NftablesBackend(spec, run)))
        if not res.ok:
            raise FirewallError.from_result("cannot apply rules", res)
        return spec
    IptablesBackend(spec, run, families=ip_families()).apply_safety_net()
    return spec


def remove_everything(config: GuardConfig, run: Runner = run_command) -> list[str]:
    """`firewall remove`: every hushgate chain of iptables and ip6tables, and the nftables table.
    The configured backend must succeed; the other one (leftovers of an earlier config) is
    cleaned on a best-effort basis when its tool is installed. Returns what was cleaned."""
    spec = spec_from_config(config)
    done: list[str] = []
    for backend in (config.backend, *({"iptables", "nftables"} - {config.backend})):
        tool = "iptables" if backend == "iptables" else "nft"
        if backend != config.backend and shutil.which(tool) is None:
            continue
        try:
            if backend == "iptables":
                IptablesBackend(spec, run, families=ip_families()).remove_all()
                done.append("iptables" + (" and ip6tables" if 6 in ip_families() else ""))
            else:
                t = f"inet {spec.tag}"
                # Declaring the table first makes the delete succeed when it was never there.
                res = run(["nft", "-f", "-"], f"table {t} {{}}\ndelete table {t}\n")
                if not res.ok:
                    raise FirewallError.from_result("cannot remove rules", res)
                if spec.relay:  # `run`'s policy routing (NftRunBackend adds it with `ip`)
                    IptablesBackend(spec, run, families=ip_families()).remove_relay_routing()
                done.append(f"nftables table {t}")
        except FirewallError:
            if backend == config.backend:
                raise
    return done


class NftRunBackend:
    """`hushgate run`'s lifecycle on nftables (OpenWrt's fw4): the same four steps as
    IptablesBackend, each one `nft -f` transaction on the guard's own `inet` table. The queue
    statements need kmod-nft-queue: this test kernel lacks them (CONFIG_NFT_QUEUE off), so the
    generated scripts are unit-tested and syntax-checked here, and run for real only on a router.
    """

    def __init__(self, spec: FirewallSpec, run: Runner = run_command) -> None:
        self.spec = spec
        self.run = run
        self.nft = NftablesBackend(spec, run)
        # for its pure conntrack argv and the relay's policy routing (`ip rule`/`ip route`)
        self._iptables = IptablesBackend(spec, run, families=ip_families())

    def _apply(self, what: str, script: str) -> None:
        res = self.run(["nft", "-f", "-"], script)
        if not res.ok:
            raise FirewallError.from_result(what, res)

    def backend_name(self) -> str:
        return "nftables"

    def quic_refusals(self) -> dict[str, int]:
        return self.nft.quic_refusals()

    def apply_safety_net(self) -> None:
        self._apply("cannot apply the persistent rules", nft_persistent_script(self.nft))
        if self.spec.relay:  # the relay's policy routing: same `ip` commands as with iptables
            self._iptables.install_relay_routing()

    def install_dynamic(self) -> None:
        # refresh the persistent part too (a crash followed by a restart leaves nothing stale)
        self.apply_safety_net()
        self._apply("cannot install the queue rules", self.nft.dynamic_script(install=True))

    def remove_dynamic(self) -> None:
        self._apply("cannot remove the queue rules", self.nft.dynamic_script(install=False))

    def remove_all(self) -> None:
        t = f"inet {self.spec.tag}"
        if self.spec.relay:
            self._iptables.remove_relay_routing()
        self._apply("cannot remove the table", f"table {t} {{}}\ndelete table {t}\n")

    def conntrack_mark_argv(self, proto: str, src: str, dst: str, sport: int, dport: int,
                            kind: str) -> list[str]:
        return self._iptables.conntrack_mark_argv(proto, src, dst, sport, dport, kind)


def run_backend(config: GuardConfig, run: Runner = run_command) -> IptablesBackend | NftRunBackend:
    """The firewall backend `hushgate run` drives, as the config says."""
    spec = spec_from_config(config)
    if config.backend == "nftables":
        return NftRunBackend(spec, run)
    return IptablesBackend(spec, run, families=ip_families())
