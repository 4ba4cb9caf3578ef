"""How the daemon learns an address-only device's MAC (so its IPv6, matched by MAC, is guarded):
the neighbour table first, a probe for an address the table lacks, the DHCP lease last."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from guard.core.config import DeviceConfig, GuardConfig
from guard.core.packet import TCP, Packet
from guard.shell import daemon

ECHO = DeviceConfig(name="echo", address="198.18.10.10")
LAMP = DeviceConfig(name="lamp", address="198.18.10.30", mac="02:00:5e:10:00:30")


def config(*devices: DeviceConfig) -> GuardConfig:
    return replace(GuardConfig(), devices=devices)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A fake neighbour table that a probe can fill in (as ARP would)."""
    state: dict[str, object] = {"table": {}, "answers": {}, "probed": []}

    def neighbour_table() -> dict[str, str]:
        return dict(state["table"])  # type: ignore[call-overload]

    def probe(address: str) -> None:
        state["probed"].append(address)  # type: ignore[union-attr]
        answer = state["answers"].get(address)  # type: ignore[union-attr]
        if answer is not None:
            state["table"][address] = answer  # type: ignore[index]

    monkeypatch.setattr(daemon, "_neighbour_table", neighbour_table)
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


# --------------------------------------------------------------------- a MAC shared by several hosts

EXTENDER = "02:00:5e:ee:00:01"  # a Wi-Fi extender that rewrites its clients' MACs to its own


def test_a_mac_the_table_holds_for_another_address_too_is_not_taken(
    kernel: dict[str, object],
) -> None:
    kernel["table"] = {"198.18.10.10": EXTENDER, "198.18.10.41": EXTENDER}
    shared: dict[str, tuple[str, tuple[str, ...]]] = {}
    out = daemon.with_neighbour_macs(config(ECHO, LAMP), lease_files=[], shared=shared)
    assert out.devices[0].mac is None and out.devices[1] == LAMP
    assert shared == {"echo": (EXTENDER, ("198.18.10.41",))}


def test_a_lease_mac_that_holds_several_leases_or_another_address_is_not_taken(
    kernel: dict[str, object], tmp_path: Path
) -> None:
    files = [leases(tmp_path, f"1796000000 {EXTENDER} 198.18.10.10 echo *",
                    f"1796000000 {EXTENDER} 198.18.10.41 phone *")]
    assert daemon.with_neighbour_macs(config(ECHO), lease_files=files).devices[0].mac is None
    kernel["table"] = {"198.18.10.41": EXTENDER}  # the echo is away; its lease MAC is in use
    files = [leases(tmp_path, f"1796000000 {EXTENDER} 198.18.10.10 echo *")]
    shared: dict[str, tuple[str, tuple[str, ...]]] = {}
    out = daemon.with_neighbour_macs(config(ECHO), lease_files=files, shared=shared)
    assert out.devices[0].mac is None and shared["echo"][1] == ("198.18.10.41",)


class _Backend:
    """A firewall that records what the daemon installs."""

    def __init__(self) -> None:
        self.installs = 0

    def install_dynamic(self) -> None:
        self.installs += 1


@pytest.fixture
def guard(kernel: dict[str, object], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
          ) -> daemon.Daemon:
    """A Daemon (never started) whose firewall records installs."""
    installed: list[GuardConfig] = []

    def backend(cfg: GuardConfig) -> _Backend:
        installed.append(cfg)
        return _Backend()

    monkeypatch.setattr(daemon, "run_backend", backend)
    monkeypatch.setattr(daemon, "NEIGHBOUR_START_WAIT_S", 0.0)
    cfg = replace(GuardConfig(), devices=(ECHO,), state_db=str(tmp_path / "state.db"),
                  socket=str(tmp_path / "control.sock"), metrics_listen=None)
    d = daemon.Daemon(cfg)
    d.installed_configs = installed  # type: ignore[attr-defined]
    yield d
    d.store.close()


def test_the_engine_does_not_learn_a_shared_mac_from_packets_and_warns_once(
    guard: daemon.Daemon, kernel: dict[str, object], capsys: pytest.CaptureFixture[str],
) -> None:
    kernel["table"] = {"198.18.10.10": EXTENDER, "198.18.10.41": EXTENDER}
    guard.neighbours = dict(kernel["table"])  # type: ignore[call-overload]
    table = guard.engine.devices
    pkt = Packet(4, "198.18.10.10", "198.19.0.10", TCP, 40000, 443, 0, 40, src_mac=EXTENDER)
    for _ in range(3):  # every IPv4 packet of the echo asks again
        assert table.upstream(pkt).mac is None  # type: ignore[union-attr]
    assert EXTENDER not in table.by_mac and table.macs_learned == []
    guard._learn_mac("echo", EXTENDER)  # a MacLearned action, were one emitted
    assert guard.config.devices[0].mac is None
    err = capsys.readouterr().err
    assert err.count("shares MAC") == 1 and "198.18.10.41" in err


def test_a_unique_mac_is_learned_and_dropped_again_once_another_host_shows_it(
    guard: daemon.Daemon, kernel: dict[str, object], capsys: pytest.CaptureFixture[str],
) -> None:
    kernel["table"] = {"198.18.10.10": EXTENDER}
    guard._poll_neighbours()
    assert guard.config.devices[0].mac == EXTENDER
    assert guard.engine.devices.by_name["echo"].mac == EXTENDER
    assert guard.learned_macs == {"echo": EXTENDER}
    assert guard.installed_configs[-1].devices[0].mac == EXTENDER  # type: ignore[attr-defined]
    kernel["table"] = {"198.18.10.10": EXTENDER, "198.18.10.41": EXTENDER}
    guard._poll_neighbours()
    assert guard.config.devices[0].mac is None
    assert guard.engine.devices.by_name["echo"].mac is None
    assert EXTENDER not in guard.engine.devices.by_mac and guard.learned_macs == {}
    assert guard.installed_configs[-1].devices[0].mac is None  # type: ignore[attr-defined]
    guard._poll_neighbours()  # still shared: nothing learned, no second warning
    assert guard.config.devices[0].mac is None
    assert capsys.readouterr().err.count("shares MAC") == 1
