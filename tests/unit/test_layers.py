"""The layout shows the architecture: dependencies point one way and there are no import cycles.

    engine  <-  sources  <-  runtime  <-  sinks  <-  domains  <-  health  <-  agent  <-  cli (main, registry)

A tool's command uses the option vocabulary (cli/options.py, which imports nothing of bpfscope's but
errors and runtime types); the CLI and the health check find tools and rules by name in the domains'
manifests, never by import. Imports under ``if TYPE_CHECKING:`` are for type checkers only and do not
count; imports inside functions (lazy, for start-up time) count for the layers but not for cycles.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import bpfscope

PACKAGE = Path(bpfscope.__file__).resolve().parent

# A layer may import from the layers listed for it (and from itself, errors, build).
ALLOWED = {
    "engine": set(),
    "sources": {"engine"},
    "runtime": {"engine", "sources"},
    "sinks": {"runtime", "engine", "sources"},
    "domains": {"runtime", "engine", "sinks", "sources", "cli.options", "health.rule", "health.verdict"},
    "health": {"runtime", "engine", "sinks", "sources", "domains"},
    "agent": {"runtime", "engine", "sinks", "sources", "domains", "health"},
    "cli": {"runtime", "engine", "sinks", "sources", "domains", "health", "agent"},
    "__main__": {"cli"},
}
COMMON = {"errors", "build", "__main__", "__init__"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level imports, imports inside functions) of bpfscope modules, TYPE_CHECKING left out."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    lazy: set[str] = set()
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)

    def visit(node: ast.AST, inside_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for orelse in child.orelse:
                    visit(orelse, inside_function)
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                names = [f"{base}.{a.name}" for a in child.names] + [base]
            for name in names:
                if name.startswith("bpfscope"):
                    (lazy if inside_function else top).add(name)
            function = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inside_function or function)

    visit(tree, False)
    return top, lazy


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported name lives in (``bpfscope.runtime.schema.Field`` -> its module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _layer(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"
    if (
        parts[0] in ("cli", "health")
        and len(parts) > 1
        and f"{parts[0]}.{parts[1]}"
        in (
            "cli.options",
            "health.rule",
            "health.verdict",
        )
    ):
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def test_dependencies_point_one_way() -> None:
    modules = _modules()
    wrong = set()
    for module, path in modules.items():
        layer = _layer(module)
        top, lazy = _imports(path)
        for name in top | lazy:
            target = _resolve(name, modules)
            if target is None or target == "bpfscope":
                continue
            target_layer = _layer(target)
            if target_layer in COMMON or target_layer == layer or target.startswith(module):
                continue
            own = layer.split(".")[0]
            allowed = ALLOWED.get(own, set()) | {own}
            if target_layer not in allowed and target_layer.split(".")[0] not in allowed:
                wrong.add(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {
        module: {t for name in _imports(path)[0] if (t := _resolve(name, modules)) and t != module}
        for module, path in modules.items()
    }
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                if not all(b.startswith(a + ".") for a, b in itertools.pairwise(cycle)):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_every_domain_has_a_manifest_of_tools_that_exist() -> None:
    from bpfscope import domains

    for name, entry in domains.tools().items():
        path = PACKAGE.joinpath(*entry.module.split(".")[1:]).with_suffix(".py")
        assert path.exists(), f"{name}: {path} is missing"
        assert "def command(" in path.read_text(), f"{name}: {path} has no command"
    for entry in domains.rules():
        module, cls = entry.path.split(":")
        path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
        assert f"class {cls}(" in path.read_text(), f"rule {entry.path} is missing"
