"""Shared fixtures: wire bytes and the location of the shared captures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from tests.ci import missing_or_fail

# Property tests check results, not speed: no per-example deadline (the VM's boot runs beside the
# unit tests, tests/vm/early.py, and a 200 ms deadline would measure the machine's load).
settings.register_profile("hushgate", deadline=None)
settings.load_profile("hushgate")

FIXTURES = Path(__file__).parent / "fixtures"
# CI runs in a fresh clone with ../shared beside it; the captures are never copied here.
SHARED = Path(os.environ.get("HUSHGATE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CAPTURES = SHARED / "captures"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Start the VM suite's boot in the background when the unit tests begin (tests/vm/early.py):
    only top-level tests/test_*.py modules run beside it, never the timing-sensitive live ones."""
    path = Path(str(item.fspath))
    if path.parent != Path(__file__).parent or not path.name.startswith("test_"):
        return
    session = item.session
    if getattr(session, "_vm_early_checked", False):
        return
    session._vm_early_checked = True  # type: ignore[attr-defined]
    if not any("tests/vm/" in str(i.fspath).replace(os.sep, "/") for i in session.items):
        return
    from tests.vm import early, harness

    if early.wanted():
        early.start(sabotage_pass=tuple(harness.SABOTAGE))


@pytest.fixture(scope="session")
def client_hello() -> bytes:
    """A real TLS ClientHello (Python's ssl) with SNI bob-dispatch-prod-na.amazon.com."""
    return (FIXTURES / "tls_client_hello_bob_dispatch.bin").read_bytes()


@pytest.fixture(scope="session")
def captures() -> Path:
    if not (CAPTURES / "labels.toml").exists():
        missing_or_fail(f"shared captures not found at {CAPTURES} (set HUSHGATE_SHARED)")
    return CAPTURES
