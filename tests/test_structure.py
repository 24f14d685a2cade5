"""The package's shape, checked from its source with `ast`: short functions, each unit importing exactly
what docs/architecture.md's layer table says, no import cycles (between modules or between units), and the
library never importing the data_tools scripts."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "taid_vlm"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imported(module: str, is_package: bool, node: ast.AST, known: dict) -> list[str]:
    """Module names an import statement loads (every import counts, also those inside functions)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, (path, is_package) in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(t for t in _imported(module, is_package, node, known) if t != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_lazy_import_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


DOC = PACKAGE.parent / "docs" / "architecture.md"
TABLE_HEADER = "| unit | imports of the package (exactly these) |"


def unit_of(module: str) -> str:
    """``taid_vlm.train.trainer`` -> ``train``: a top-level package or module of taid_vlm."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between units: which other units each one imports (the package root excluded)."""
    out: dict[str, set[str]] = {unit_of(m): set() for m in graph if m != "taid_vlm"}
    for module, targets in graph.items():
        for target in targets:
            if target.startswith("taid_vlm.") and unit_of(target) != unit_of(module) and module != "taid_vlm":
                out[unit_of(module)].add(unit_of(target))
    return out


def doc_layers() -> dict[str, set[str]]:
    """docs/architecture.md's layer table, the one statement of what each unit imports: unit -> its units."""
    lines = DOC.read_text().splitlines()
    start = lines.index(TABLE_HEADER) + 2
    rows: dict[str, set[str]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        units, imports = (cell.strip() for cell in line.strip("|").split("|")[:2])
        names = [u.strip("`").removesuffix("/").removesuffix(".py") for u in units.split(", ")]
        allowed = {u.strip("`").removesuffix("/").removesuffix(".py") for u in imports.split(", ") if u != "—"}
        for name in names:
            assert name not in rows, f"{name} has two rows in docs/architecture.md"
            rows[name] = allowed
    return rows


def test_the_doc_table_reads_as_written():
    rows = doc_layers()
    assert rows["cli"] == {"experiments", "train"} and rows["losses"] == set()


def test_every_unit_imports_exactly_its_row_of_the_doc_table():
    actual, rows = unit_graph(import_graph()), doc_layers()
    assert sorted(actual) == sorted(rows), "a unit of taid_vlm without a row (or a row without a unit)"
    wrong = {u: {"imports but the row does not say": sorted(actual[u] - rows[u]),
                 "the row says but it does not import": sorted(rows[u] - actual[u])}
             for u in actual if actual[u] != rows[u]}
    assert wrong == {}


def test_no_two_way_tie_between_units():
    """Not even through a third unit: the units form layers (train never imports cli, the cache writer sits
    above the trainer whose pieces it reuses)."""
    assert cycles(unit_graph(import_graph())) == []


def test_a_tie_between_units_is_seen():
    graph = {"taid_vlm.train.a": {"taid_vlm.cli"}, "taid_vlm.cli": {"taid_vlm.train.b"}, "taid_vlm.train.b": set()}
    assert cycles(unit_graph(graph)) == [["cli", "train"]]


def test_the_package_never_imports_data_tools():
    graph = import_graph()
    to_scripts = sorted((m, t) for m, ts in graph.items() for t in ts if t.split(".")[0] == "data_tools")
    assert to_scripts == []


def test_every_function_is_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
