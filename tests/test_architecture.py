"""The house rules of docs/architecture.md, checked on the source: no import cycle among the
project's modules, method files that import no sibling method file, a core that does not import
the strategies, the apps or the tooling, and no free function that reads a private field of
its arguments (a method in disguise)."""

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


def private_reads_of_parameters(source: str, label: str) -> list[str]:
    """Module-level functions of ``source`` (a module, ``label`` in the messages) that read a
    private field (``param._name``) of one of their parameters: methods in disguise."""
    found = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        params = {a.arg for a in arguments}
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.Attribute)
                and isinstance(sub.value, ast.Name)
                and sub.value.id in params
                and sub.attr.startswith("_")
                and not sub.attr.startswith("__")
            ):
                found.append(f"{label}: {node.name} reads {sub.value.id}.{sub.attr}")
    return found


def test_no_module_level_function_reads_a_private_field_of_its_arguments():
    """A class keeps its mechanics as methods and its working state in objects it owns (the
    strategy's round: RoundState), not in free functions that reach into its private fields."""
    found = [
        line
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for line in private_reads_of_parameters(
            path.read_text(encoding="utf-8"), str(path.relative_to(REPO))
        )
    ]
    assert not found, "\n".join(found)


def test_the_private_field_check_finds_a_method_in_disguise():
    source = "def prepare(strategy, t):\n    return strategy._sent[t]\n"
    assert private_reads_of_parameters(source, "m.py") == ["m.py: prepare reads strategy._sent"]
    method = "class S:\n    def prepare(self, t):\n        return self._sent[t]\n"
    assert private_reads_of_parameters(method, "m.py") == []
