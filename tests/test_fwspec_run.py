"""`hushgate run` on nftables: the lifecycle scripts it sends to `nft -f`, and their syntax."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace

import pytest

from guard.core.config import DeviceConfig, GuardConfig
from guard.shell.firewall import Completed, IptablesBackend
from guard.shell.fwspec import NftRunBackend, run_backend
from tests.ci import missing_or_fail


def config(backend: str, tcp_hold: str = "packet") -> GuardConfig:
    devices = (DeviceConfig(name="echo", mac="68:db:f5:90:19:64", address="198.18.10.10"),)
    return replace(GuardConfig(), devices=devices, backend=backend, tcp_hold=tcp_hold)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv, input=None):  # noqa: A002 - the Runner signature
        self.calls.append((list(argv), input))
        return Completed(tuple(argv), 0)


def test_config_backend_picks_the_run_backend() -> None:
    assert isinstance(run_backend(config("nftables")), NftRunBackend)
    assert isinstance(run_backend(config("iptables")), IptablesBackend)


def test_lifecycle_sends_one_transaction_per_step() -> None:
    rec = Recorder()
    backend = run_backend(config("nftables"), rec)
    backend.install_dynamic()
    persistent, dynamic = rec.calls[0][1], rec.calls[1][1]
    assert all(argv == ["nft", "-f", "-"] for argv, _ in rec.calls)
    assert "table inet hushgate" in persistent and "queue num" not in persistent
    assert "add rule inet hushgate queue_up" in dynamic and "queue num 7" in dynamic
    assert "bypass" not in dynamic  # fail-closed: no bypass
    rec.calls.clear()
    backend.remove_dynamic()
    assert "add rule" not in rec.calls[0][1] and "flush chain inet hushgate queue_up" in rec.calls[0][1]
    rec.calls.clear()
    backend.remove_all()
    assert rec.calls[0][1].endswith("delete table inet hushgate\n")


def test_fail_open_queue_has_bypass() -> None:
    rec = Recorder()
    backend = run_backend(replace(config("nftables"), fail="open"), rec)
    backend.install_dynamic()
    assert "bypass" in rec.calls[1][1]


def test_relay_on_nftables_adds_policy_routing_and_removes_it() -> None:
    rec = Recorder()
    backend = run_backend(config("nftables", tcp_hold="relay"), rec)
    backend.install_dynamic()
    nft = [inp for argv, inp in rec.calls if argv[0] == "nft"]
    ip = [argv for argv, _ in rec.calls if argv[0] == "ip"]
    assert "tproxy ip to :7411" in nft[0] and "chain prerouting" in nft[0]
    assert ["ip", "-4", "rule", "add", "fwmark", "0x20000000/0x20000000", "lookup", "7411",
            "priority", "900"] in ip
    assert ["ip", "-4", "route", "replace", "local", "default", "dev", "lo", "table",
            "7411"] in ip
    rec.calls.clear()
    backend.remove_all()
    assert ["ip", "-4", "route", "flush", "table", "7411"] in [a for a, _ in rec.calls]


def test_a_failing_nft_is_a_firewall_error() -> None:
    from guard.shell.firewall import FirewallError

    def broken(argv, input=None):  # noqa: A002
        return Completed(tuple(argv), 1, "", "Error: Could not process rule")

    with pytest.raises(FirewallError):
        run_backend(config("nftables"), broken).apply_safety_net()


def test_persistent_script_passes_nft_syntax_check() -> None:
    if shutil.which("nft") is None:
        missing_or_fail("nft not installed (apt-get install nftables)")
    rec = Recorder()
    run_backend(config("nftables"), rec).apply_safety_net()
    proc = subprocess.run(["nft", "-c", "-f", "-"], input=rec.calls[0][1], text=True,
                          capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
