"""The Grafana dashboard (deploy/grafana/exfm-dashboard.json) and the `exfm_` metrics the code
records cannot drift apart: every metric made through exfm_ray.observability has a panel, under
the name Ray exports it as, and every panel reads a metric the code records."""

import ast
import json
import re
from pathlib import Path

import pytest

from exfm_ray.observability import exported_name

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "exfm-dashboard.json"
KINDS = ("counter", "gauge", "histogram")
EXPORTED = re.compile(r"\bray_exfm_\w+")


def _loop_values(loop: ast.For, index: int | None) -> list[str]:
    """The literal values a loop variable takes: `for x in ("a", "b")`, or element `index` of
    `for name, text, value in (("a", "...", n), ...)` (the other elements need not be literals)."""
    assert isinstance(loop.iter, ast.Tuple | ast.List), "not a loop over a literal tuple or list"
    items = loop.iter.elts if index is None else [e.elts[index] for e in loop.iter.elts]
    return [str(ast.literal_eval(item)) for item in items]


def _names(arg: ast.AST, loops: list[ast.For], where: str) -> list[str]:
    """Metric names a call's first argument takes: a literal, or a loop variable over literals
    (plain or inside an f-string)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.Name):
        for loop in reversed(loops):
            if isinstance(loop.target, ast.Name) and loop.target.id == arg.id:
                return _loop_values(loop, None)
            if isinstance(loop.target, ast.Tuple):
                ids = [t.id if isinstance(t, ast.Name) else None for t in loop.target.elts]
                if arg.id in ids:
                    return _loop_values(loop, ids.index(arg.id))
    if isinstance(arg, ast.JoinedStr) and len(arg.values) == 2:
        prefix, hole = arg.values
        if isinstance(prefix, ast.Constant) and isinstance(hole, ast.FormattedValue):
            return [prefix.value + v for v in _names(hole.value, loops, where)]
    raise AssertionError(f"{where}: cannot read the metric name statically; use a literal (or a loop over literals)")


def _visit(node: ast.AST, loops: list[ast.For], where: str, found: dict[str, str]) -> None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in KINDS and node.args:
        at = f"{where}:{node.lineno}"
        for name in _names(node.args[0], loops, at):
            assert found.setdefault(name, node.func.id) == node.func.id, f"{at}: {name} changes kind"
    inner = [*loops, node] if isinstance(node, ast.For) else loops
    for child in ast.iter_child_nodes(node):
        _visit(child, inner, where, found)


def code_metrics() -> dict[str, str]:
    """Every metric the code records through exfm_ray.observability: name -> counter/gauge/histogram."""
    found: dict[str, str] = {}
    for path in sorted(p for pkg in ("exfm_ray", "actors", "jobs", "benches") for p in (REPO / pkg).rglob("*.py")):
        text = path.read_text()
        if path.name != "observability.py" and "exfm_ray.observability import" in text:
            _visit(ast.parse(text), [], str(path.relative_to(REPO)), found)
    return found


def dashboard_panels() -> list[dict]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [p for p in panels if p["type"] != "row"]


def panel_series(panel: dict) -> set[str]:
    return {m for t in panel["targets"] for m in EXPORTED.findall(t["expr"])}


def test_the_scan_finds_the_metrics_of_each_stage():
    metrics = code_metrics()
    assert metrics["fm_rows_labeled"] == "counter" and metrics["fm_label_latency_s"] == "histogram"
    assert metrics["das_rows"] == "counter" and metrics["das_rows_per_s"] == "gauge"  # a loop over literals
    assert metrics["tenant_ne"] == "gauge" and metrics["tenant_rows_per_s"] == "gauge"  # an f-string over a loop
    assert metrics["serve_tenant_latency_s"] == "histogram"


def test_every_metric_has_its_own_panel_under_its_exported_name():
    expected = {exported_name(kind, name): name for name, kind in code_metrics().items()}
    panels = dashboard_panels()
    for panel in panels:
        series = {s for s in panel_series(panel) if not s.endswith(("_sum", "_count"))}  # a histogram's parts
        assert len(series) == 1, f"panel {panel['title']!r} reads {sorted(series)}: one metric per panel"
    read = {s for p in panels for s in panel_series(p)}
    missing = sorted(name for series, name in expected.items() if series not in read)
    assert not missing, f"metrics without a panel in {DASHBOARD.name}: {missing}"
    stale = sorted(s for s in read if s not in expected and not s.endswith(("_sum", "_count")))
    assert not stale, f"panels read series the code does not record: {stale}"
    assert len(panels) == len(expected)


def test_the_dashboard_imports_into_grafana():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    (source,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == "${" + source["name"] + "}", panel["title"]
        assert all(t["refId"] for t in panel["targets"]), panel["title"]
