"""Shared fixtures: wire bytes and the location of the shared captures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ci import missing_or_fail

FIXTURES = Path(__file__).parent / "fixtures"
# CI runs in a fresh clone with ../shared beside it; the captures are never copied here.
SHARED = Path(os.environ.get("HUSHGATE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CAPTURES = SHARED / "captures"


@pytest.fixture(scope="session")
def client_hello() -> bytes:
    """A real TLS ClientHello (Python's ssl) with SNI bob-dispatch-prod-na.amazon.com."""
    return (FIXTURES / "tls_client_hello_bob_dispatch.bin").read_bytes()


@pytest.fixture(scope="session")
def captures() -> Path:
    if not (CAPTURES / "labels.toml").exists():
        missing_or_fail(f"shared captures not found at {CAPTURES} (set HUSHGATE_SHARED)")
    return CAPTURES
