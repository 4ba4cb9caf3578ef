"""The core never does IO nor reads the clock (design.md section 3): checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GUARD = Path(__file__).resolve().parents[1] / "guard" / "core"
CORE = ("packet", "sni", "names", "ruleset", "detector", "records", "policy", "engine", "config")
BANNED = {"netfilterqueue", "socket", "asyncio", "click", "prometheus_client", "time",
          "select", "subprocess", "threading", "scapy", "sqlite3", "datetime"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_io(module: str) -> None:
    banned = imported_modules(GUARD / f"{module}.py") & BANNED
    assert not banned, f"guard/core/{module}.py imports {sorted(banned)}"


def test_the_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom socket import socket\n")
    assert imported_modules(bad) & BANNED == {"time", "socket"}
