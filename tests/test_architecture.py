"""The house rules of docs/architecture.md, checked on the source: no import cycle among the
project's modules, method files that import no sibling method file, a core that does not import
the strategies, the apps or the tooling, and a strategy base of at most 250 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("hetfed", "strategies", "client_apps", "server_apps", "tooling")
# Modules of strategies/ that are not methods: what a method file may import from its siblings.
STRATEGY_PLUMBING = {"strategies.base", "strategies.nodes", "strategies.replies"}
# Modules of strategies/ above the methods: the registry finds them by name.
STRATEGY_REGISTRY = {"strategies.registry"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports (anywhere in the file)."""
    modules = {
        module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def test_no_import_cycle():
    graph = project_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module) :]))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_method_files_import_only_the_strategy_plumbing_and_the_core():
    graph = project_imports()
    for module, imported in graph.items():
        if module.startswith("strategies.") and module not in STRATEGY_PLUMBING | STRATEGY_REGISTRY:
            siblings = {m for m in imported if m.startswith("strategies.")}
            allowed = STRATEGY_PLUMBING | {"strategies.layer_base"}  # the layer methods' base
            assert siblings <= allowed, f"{module} imports {sorted(siblings - allowed)}"
            assert module == "strategies.layer_base" or not (siblings - allowed), (
                f"{module} imports a method file"
            )


def test_the_core_never_imports_the_strategies_the_apps_or_the_tooling():
    """Anywhere in a file, lazily too: the registry and the run plan live above the core."""
    graph = project_imports()
    above_the_core = ("strategies", "client_apps", "server_apps", "tooling")
    for module, imported in graph.items():
        if module.startswith("hetfed"):
            above = {m for m in imported if m.split(".")[0] in above_the_core}
            assert not above, f"{module} imports {sorted(above)}"


def test_the_strategy_base_class_is_small():
    tree = ast.parse((REPO / "strategies" / "base.py").read_text(encoding="utf-8"))
    (base,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LoRAStrategy"]
    assert (
        base.end_lineno - base.lineno + 1 <= 250
    )  # hooks and round loop; plumbing is free functions
