"""What a test does when something it needs is missing: skip on a developer's machine, fail in
CI (CI=true), where everything the suite needs is installed and a skip would hide a feature.
Every test module takes this rule from here."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI") == "true"
IS_ROOT = os.geteuid() == 0


def missing_or_fail(reason: str, in_ci: str | None = None) -> NoReturn:
    """Skip with `reason`; in CI fail instead, with `in_ci` when given."""
    if IN_CI:
        pytest.fail(in_ci or f"{reason} (CI must run this test)")
    pytest.skip(reason)


def need_root(what: str = "this test") -> None:
    """Go on as root; otherwise skip, or fail in CI (which runs .ci/run as root)."""
    if not IS_ROOT:
        missing_or_fail(f"{what} needs root (it runs, and must pass, in CI)",
                        f"{what} needs root in CI (run .ci/run as root)")


def need_tool(name: str, package: str) -> str:
    """The path of command `name`; otherwise skip, or fail in CI (apt-get install `package`)."""
    path = shutil.which(name)
    if path is None:
        missing_or_fail(f"{name} is not installed (apt-get install {package})")
    return path
