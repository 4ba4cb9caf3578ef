"""The import contract of the layers (issue 14, design.md 3): the core imports neither the shell
nor the tools; the shell never the tools; nothing in guard/ imports the simulator (hushsim) at
module level, and only the tools import it at all (inside the commands that need it). Checked on
the source with ast, so a new import that breaks the layering fails here, in CI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUARD = REPO / "guard"
LAYERS = ("core", "shell", "tools")
# what each layer may import from guard (besides itself and the top-level `guard`)
ALLOWED = {"core": set(), "shell": {"core"}, "tools": {"core", "shell"}}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module, at module level?) for every import in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "guard":
                out += [(f"guard.{alias.name}", id(node) in top) for alias in node.names]
            else:
                out.append((node.module, id(node) in top))
    return out


def violations(layer: str, path: Path) -> list[str]:
    out = []
    for module, top_level in imports(path):
        parts = module.split(".")
        if parts[0] == "hushsim" and (layer != "tools" or top_level):
            out.append(f"{path.relative_to(REPO)} imports {module}"
                       + (" at module level" if top_level else ""))
        if parts[0] == "guard" and len(parts) > 1 and parts[1] in LAYERS:
            if parts[1] != layer and parts[1] not in ALLOWED[layer]:
                out.append(f"{path.relative_to(REPO)} ({layer}) imports {module}")
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_follow_the_contract(layer: str) -> None:
    found = [v for path in sorted((GUARD / layer).glob("*.py")) for v in violations(layer, path)]
    assert not found, "\n".join(found)


def test_every_module_of_guard_lives_in_a_layer() -> None:
    loose = sorted(p.name for p in GUARD.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside core/shell/tools: {loose}"


@pytest.mark.parametrize("source,layer,expected", [
    ("from guard.shell.store import Store\n", "core", "(core) imports guard.shell.store"),
    ("from guard.tools import cli\n", "shell", "(shell) imports guard.tools"),
    ("import hushsim.topology\n", "tools", "imports hushsim.topology at module level"),
    ("def f():\n    from hushsim import synth\n", "shell", "imports hushsim"),
])
def test_the_contract_can_fail(tmp_path: Path, source: str, layer: str, expected: str) -> None:
    bad = GUARD / layer / "_layer_probe.py"
    bad.write_text(source)
    try:
        found = violations(layer, bad)
    finally:
        bad.unlink()
    assert any(expected in v for v in found), found


# The engine's state the shell must not reach into: it asks typed queries (engine.upload(id),
# engine.device(name), engine.find_device, engine.has_actions, ...) instead (issue 14 point 4).
ENGINE_STATE = {"uploads", "flows", "actions", "rules", "counters", "devices", "last_stream",
                "streams", "windows", "standing", "timers", "now"}


def engine_reads(path: Path) -> list[str]:
    """`self.engine.X` / `engine.X` attribute reads of engine state in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_STATE:
            base = node.value
            name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
            if name == "engine":
                found.append(f"{path.name}:{node.lineno} engine.{node.attr}")
    return found


def test_the_shell_reads_no_engine_state() -> None:
    reads = [r for path in sorted((GUARD / "shell").glob("*.py")) for r in engine_reads(path)]
    assert reads == []


def test_the_engine_state_check_can_fail(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f(self):\n    return self.engine.uploads.get(1)\n")
    assert engine_reads(probe) == ["probe.py:2 engine.uploads"]
