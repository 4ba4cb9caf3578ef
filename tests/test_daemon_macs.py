"""How the daemon learns an address-only device's MAC (so its IPv6, matched by MAC, is guarded):
the neighbour table first, a probe for an address the table lacks, the DHCP lease last."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from guard import daemon
from guard.config import DeviceConfig, GuardConfig

ECHO = DeviceConfig(name="echo", address="198.18.10.10")
LAMP = DeviceConfig(name="lamp", address="198.18.10.30", mac="02:00:5e:10:00:30")


def config(*devices: DeviceConfig) -> GuardConfig:
    return replace(GuardConfig(), devices=devices)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A fake neighbour table that a probe can fill in (as ARP would)."""
    state: dict[str, object] = {"table": {}, "answers": {}, "probed": []}

    def neighbour(address: str) -> str | None:
        return state["table"].get(address)  # type: ignore[union-attr]

    def probe(address: str) -> None:
        state["probed"].append(address)  # type: ignore[union-attr]
        answer = state["answers"].get(address)  # type: ignore[union-attr]
        if answer is not None:
            state["table"][address] = answer  # type: ignore[index]

    monkeypatch.setattr(daemon, "_neighbour_mac", neighbour)
    monkeypatch.setattr(daemon, "_probe", probe)
    return state


def leases(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "dhcp.leases"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_the_neighbour_table_gives_the_mac_without_a_probe(kernel: dict[str, object]) -> None:
    kernel["table"] = {"198.18.10.10": "68:db:f5:90:19:64"}
    out = daemon.with_neighbour_macs(config(ECHO, LAMP), lease_files=[])
    assert out.devices[0].mac == "68:db:f5:90:19:64" and out.devices[1] == LAMP
    assert kernel["probed"] == []


def test_an_address_the_table_lacks_is_probed_and_resolved_within_the_wait(
    kernel: dict[str, object],
) -> None:
    kernel["answers"] = {"198.18.10.10": "68:db:f5:90:19:64"}
    out = daemon.with_neighbour_macs(config(ECHO), wait_s=1.0, lease_files=[])
    assert kernel["probed"] == ["198.18.10.10"]
    assert out.devices[0].mac == "68:db:f5:90:19:64"


def test_a_device_that_is_away_takes_the_mac_of_its_dhcp_lease(
    kernel: dict[str, object], tmp_path: Path
) -> None:
    files = [leases(tmp_path, "1796000000 68:db:f5:90:19:64 198.18.10.10 echo-dot 01:68:db",
                    "1796000000 02:00:5e:00:00:99 198.18.10.99 laptop *")]
    out = daemon.with_neighbour_macs(config(ECHO), wait_s=0.0, lease_files=files)
    assert kernel["probed"] == ["198.18.10.10"]  # asked first: the wire is preferred
    assert out.devices[0].mac == "68:db:f5:90:19:64"


def test_the_neighbour_table_wins_over_a_stale_lease(
    kernel: dict[str, object], tmp_path: Path
) -> None:
    kernel["table"] = {"198.18.10.10": "68:db:f5:90:19:64"}
    files = [leases(tmp_path, "1796000000 02:00:5e:00:00:01 198.18.10.10 old-host *")]
    out = daemon.with_neighbour_macs(config(ECHO), lease_files=files)
    assert out.devices[0].mac == "68:db:f5:90:19:64"


def test_an_address_leased_to_two_macs_stays_unresolved(
    kernel: dict[str, object], tmp_path: Path
) -> None:
    files = [leases(tmp_path, "1796000000 02:00:5e:00:00:01 198.18.10.10 a *",
                    "1796000000 02:00:5e:00:00:02 198.18.10.10 b *"),
             str(tmp_path / "missing.leases")]  # a lease file that does not exist is skipped
    out = daemon.with_neighbour_macs(config(ECHO), lease_files=files)
    assert out.devices[0].mac is None
