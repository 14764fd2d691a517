"""The layout holds: layers import only downward, no package cycle, modules within the line budget.

Layers, lowest first: exfm_ray (the library) < actors (Ray actors and supervisors) < benches
(benchmark harnesses) < jobs (argument parsing and wiring). Imports inside functions count too:
a lazy import that points upward is still a circle at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["exfm_ray", "actors", "benches", "jobs"]
MAX_LINES = 400
# Modules allowed over the budget, each with its reason. Empty today: keep it that way.
OVER_BUDGET: dict[str, str] = {}

pytestmark = pytest.mark.unit


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Dotted names of every absolute import in the file, at any depth."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downward(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _modules(layer)
        for name in _imports(path)
        if name.split(".")[0] in above
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _graph(package: str, depth: int) -> dict[str, set[str]]:
    """Import graph between the units of a package: its sub-packages (depth 2) or modules."""
    graph: dict[str, set[str]] = {}
    for path in _modules(package):
        rel = path.relative_to(ROOT).with_suffix("").parts
        src = ".".join(rel[:depth]) if len(rel) > depth else ".".join(rel).removesuffix(".__init__")
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == package and len(parts) >= depth:
                dst = ".".join(parts[:depth])
                if dst != src:
                    graph.setdefault(src, set()).add(dst)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package, depth", [("exfm_ray", 2), ("actors", 2), ("benches", 2), ("jobs", 2)])
def test_no_import_cycle(package, depth):
    cycle = _cycle(_graph(package, depth))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_remote_wrappers_are_a_leaf_of_actors():
    """Supervisors import the wrappers; the wrappers import no supervisor (no reach-back)."""
    names = _imports(ROOT / "actors" / "remote.py")
    assert {n for n in names if n.startswith("actors.")} <= {"actors.fm_shard"}


def test_modules_within_the_line_budget():
    over = {
        str(p.relative_to(ROOT)): n
        for pkg in [*LAYERS, "tests"]
        for p in _modules(pkg)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert set(over) <= set(OVER_BUDGET), f"modules over {MAX_LINES} lines (split them, or list why): {over}"


def test_jobs_stay_thin():
    total = sum(len(p.read_text().splitlines()) for p in _modules("jobs"))
    assert total <= 1400, f"jobs/ holds {total} lines: library logic belongs in exfm_ray/, actors/ or benches/"
