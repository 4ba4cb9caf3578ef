"""The VM suite's one boot, started in the background while the unit tests run.

The boot takes ~2 min of wall time under TCG, nearly all of it inside qemu. tests/conftest.py
starts it when the first top-level unit test module (tests/test_*.py) begins, if the session
also selected tests/vm; the `vm` fixture of tests/vm/test_nft_live.py then takes its result (or
boots in the foreground when nothing started it: `pytest tests/vm` alone). The live suites in
tests/e2e run before it starts and never beside it: they measure timings. HUSHGATE_VM_EARLY=0
turns this off.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from tests.vm import harness

_lock = threading.Lock()
_state: dict[str, Any] = {"thread": None, "run": None, "error": None, "log": []}


def wanted() -> bool:
    return os.environ.get("HUSHGATE_VM_EARLY", "1") != "0" and os.geteuid() == 0 \
        and not harness.missing_tools()


def start(**kw: Any) -> bool:
    """Start the boot once (idempotent); False when it was already started."""
    with _lock:
        if _state["thread"] is not None:
            return False
        thread = threading.Thread(target=_boot, kwargs=kw, name="vm-boot", daemon=True)
        _state["thread"] = thread
    thread.start()
    return True


def _boot(**kw: Any) -> None:
    try:
        _state["run"] = harness.run_vm(log=_state["log"].append, **kw)
    except BaseException as exc:  # noqa: BLE001 - handed to the fixture, which fails the test
        _state["error"] = exc


def started() -> bool:
    return _state["thread"] is not None


def result(timeout_s: float) -> tuple[harness.VmRun | None, BaseException | None, list[str]]:
    """Wait for the background boot (bounded): (run, error, log lines)."""
    thread = _state["thread"]
    assert thread is not None
    thread.join(timeout_s)
    if thread.is_alive():
        return None, TimeoutError(f"the background VM boot took more than {timeout_s:.0f} s"), \
            list(_state["log"])
    return _state["run"], _state["error"], list(_state["log"])
