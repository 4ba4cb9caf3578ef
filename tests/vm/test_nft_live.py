"""The nftables backend, live: each check of tests/vm/guest.py, run in a qemu VM booting Debian's
stock kernel (nft `queue` and `tproxy`, which this host's kernel lacks), is one test here. ONE
boot (tests/vm/harness.py) runs every check, the real `hushgate run` (backend nftables, the TCP
relay) among them, and then a sabotaged pass: the fail-closed checks again with every fail-closed
element taken out of the rendered rules, each of which must then fail. Root only; in CI
(CI=true) anything missing fails. Wall time on a 2-vCPU TCG host: ~2-2.5 min for the boot.
The rulesets loaded and results.json are copied to artifacts/vm/ (gitignored) for the record."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.ci import IN_CI, IS_ROOT, missing_or_fail, need_root
from tests.vm import early, guest, harness

if not IS_ROOT and not IN_CI:
    pytest.skip("the VM suite needs root (it runs, and must pass, in CI)",
                allow_module_level=True)

# What the sabotaged pass's checks must report: what reached the cloud.
SABOTAGED_LEAKS = {
    "fail_closed_without_guard": ("TCP reached the cloud", "UDP datagrams reached the cloud"),
    "queue_without_consumer_drops": ("UDP datagrams reached the cloud",),
    "relay_fail_closed_after_kill9": ("TCP reached the cloud",),
}
assert set(SABOTAGED_LEAKS) == set(guest.SABOTAGE_PASS_CHECKS)
KEPT = ("results.json", "hushgate-fw4.nft", "loaded-persistent.nft", "loaded-by-run.nft",
        "loaded-after-fw4-reload.nft", "ruleset-after-remove.nft",
        "sabotaged-loaded-after-fw4-reload.nft", "guard.log")


def _report(request: pytest.FixtureRequest, text: str) -> None:
    """Print past pytest's capture: the checks' details and the wall time belong in CI's log."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None:
        return
    with capman.global_and_fixture_disabled():
        tr.write_line("")
        for line in text.splitlines():
            tr.write_line(line)


def _boot(request: pytest.FixtureRequest, **kw) -> harness.VmRun:
    need_root("the VM suite")
    missing = harness.missing_tools()
    if missing:
        missing_or_fail("the VM suite needs " + ", ".join(missing)
                        + " (scripts/bootstrap.sh installs them)")
    try:
        run = harness.run_vm(log=lambda msg: _report(request, msg), **kw)
    except harness.HarnessError as exc:
        pytest.fail(f"the VM could not start: {exc}")
    _report(request, harness.summary(run))
    return run


def _explain(run: harness.VmRun) -> str:
    return (f"{run.results.get('error', '')}\n--- console (tail)\n{run.console[-2000:]}"
            f"\n--- guest.log (tail)\n{run.guest_log[-2000:]}\n(files in {run.out})")


def _early_or_boot(request: pytest.FixtureRequest) -> harness.VmRun:
    """The boot tests/conftest.py started in the background (tests/vm/early.py), else one now."""
    if not early.started():
        return _boot(request, sabotage_pass=tuple(harness.SABOTAGE))
    run, error, lines = early.result(harness.DEFAULT_TIMEOUT_S + 60)
    _report(request, "\n".join(["(booted in the background, beside the unit tests)", *lines]))
    if error is not None or run is None:
        pytest.fail(f"the VM could not start: {error}")
    _report(request, harness.summary(run))
    return run


@pytest.fixture(scope="module")
def vm(request: pytest.FixtureRequest):
    t0 = time.monotonic()
    run = _early_or_boot(request)
    kept = harness.REPO / "artifacts" / "vm"
    kept.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        if (run.out / name).exists():
            shutil.copy(run.out / name, kept / name)
    _report(request, f"vm suite: one boot, {len(run.results.get('checks', []))} checks and "
                     f"{len(run.results.get('sabotaged', []))} sabotaged, "
                     f"{time.monotonic() - t0:.1f} s wall; rulesets and results in {kept}")
    yield run
    checks = run.results.get("checks", [])
    if checks and all(c["ok"] for c in checks):  # a failed run's files stay, for reading
        shutil.rmtree(run.out, ignore_errors=True)


@pytest.mark.parametrize("name", [c.name for c in guest.CHECKS])
def test_vm_check(vm: harness.VmRun, name: str) -> None:
    by_name = {c["name"]: c for c in vm.results.get("checks", [])}
    if name not in by_name:
        pytest.fail(f"check {name} did not report (the VM stopped early?)\n{_explain(vm)}")
    rec = by_name[name]
    assert rec["ok"], f"{name}: {rec['detail']}"


@pytest.mark.parametrize("name", guest.SABOTAGE_PASS_CHECKS)
def test_the_check_catches_a_missing_fail_closed_element(vm: harness.VmRun, name: str) -> None:
    """With every fail-closed element sabotaged (the safety net's drop, the drop after nft
    `tproxy` and FORWARD's reset of unrelayed TCP removed, `bypass` on the queue statements),
    the fail-closed checks fail: the speaker's traffic reaches the cloud. For the real guard
    killed with -9, only the drop after tproxy and FORWARD's reset stand between its new TCP
    connections and the cloud."""
    assert vm.results.get("sabotage_pass") == list(harness.SABOTAGE), vm.results.get("error")
    by_name = {c["name"]: c for c in vm.results.get("sabotaged", [])}
    assert name in by_name, f"{name} did not report in the sabotaged pass\n{_explain(vm)}"
    rec = by_name[name]
    assert not rec["ok"], f"{name} passed with the fail-closed elements removed: {rec['detail']}"
    for leak in SABOTAGED_LEAKS[name]:
        assert leak in rec["detail"], rec["detail"]


def test_the_kernel_has_what_openwrt_needs() -> None:
    """The VM's kernel config has what the OpenWrt package depends on (kmod-nft-queue,
    kmod-nft-tproxy, conntrack), so the live checks test those statements for real."""
    need_root("the VM suite")
    if harness.missing_tools():
        missing_or_fail("the VM suite's tools are missing (scripts/bootstrap.sh)")
    kernel = harness.ensure_kernel()
    config = kernel.config.read_text()
    for opt in ("NFT_QUEUE", "NETFILTER_NETLINK_QUEUE", "NFT_CT", "NFT_TPROXY", "NFT_REJECT_INET",
                "NF_CONNTRACK", "VETH", "NET_9P_VIRTIO", "OVERLAY_FS"):
        assert f"CONFIG_{opt}=" in config, f"{kernel.package} lacks CONFIG_{opt}"
