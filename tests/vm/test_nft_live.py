"""The nftables backend, live: each check of tests/vm/guest.py, run in a qemu VM booting Debian's
stock kernel (nft `queue` and `tproxy`, which this host's kernel lacks), is one test here. The VM
boots once per module (tests/vm/harness.py); a second, short boot with the fail-closed elements
sabotaged shows the checks can fail. Root only; in CI (CI=true) anything missing fails.
Wall time on a 2-vCPU TCG host: ~40 s for the checks, ~30 s for the sabotaged run."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.ci import IN_CI, IS_ROOT, missing_or_fail, need_root
from tests.vm import guest, harness

if not IS_ROOT and not IN_CI:
    pytest.skip("the VM suite needs root (it runs, and must pass, in CI)",
                allow_module_level=True)

SABOTAGED = ("fail_closed_without_guard", "queue_without_consumer_drops")


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


@pytest.fixture(scope="module")
def vm(request: pytest.FixtureRequest):
    t0 = time.monotonic()
    run = _boot(request)
    _report(request, f"vm suite: one boot, {len(run.results.get('checks', []))} checks, "
                     f"{time.monotonic() - t0:.1f} s wall")
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


def test_the_checks_catch_a_missing_fail_closed_element(request: pytest.FixtureRequest) -> None:
    """With every fail-closed element sabotaged (the safety net's drop, the drop after nft
    `tproxy` and FORWARD's reset of unrelayed TCP removed, `bypass` on the queue statements),
    the fail-closed checks fail: the speaker's UDP (and, with no guard, TCP) reach the cloud."""
    run = _boot(request, checks=SABOTAGED, sabotage=tuple(harness.SABOTAGE))
    by_name = {c["name"]: c for c in run.results.get("checks", [])}
    for name in ("topology", "rules_load"):
        if name in by_name:  # listed only when a prerequisite failed
            pytest.fail(f"{name} failed in the sabotaged run: {by_name[name]['detail']}")
    for name in SABOTAGED:
        assert name in by_name, f"{name} did not report\n{_explain(run)}"
        rec = by_name[name]
        assert not rec["ok"], f"{name} passed with the fail-closed element removed"
        assert "UDP datagrams reached the cloud" in rec["detail"], rec["detail"]
    if run.results.get("relayed", True):
        detail = by_name["fail_closed_without_guard"]["detail"]
        assert "TCP reached the cloud" in detail, detail
    shutil.rmtree(run.out, ignore_errors=True)


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
