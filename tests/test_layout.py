"""The package layout's rules (sdpo/__init__.py, README "Layout"), read from the source with `ast`:
every `import` counts, at module level or inside a function."""

import ast
from pathlib import Path

import pytest

SDPO = Path(__file__).resolve().parents[1] / "sdpo"
METHOD = {"stepwise", "reference", "loop", "logprobs", "loss", "metrics"}
WINGS = {"models", "data", "eval", "runtime"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SDPO.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """sdpo module -> the sdpo modules it imports (`from sdpo.x import y` counts as sdpo.x.y when
    that is a module, else as sdpo.x)."""
    files = {_module_name(p): p for p in SDPO.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        tree = ast.parse(path.read_text(), str(path))
        # imports under `if TYPE_CHECKING:` (annotations only) never run: they close no circle
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", None) == "TYPE_CHECKING" for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "sdpo":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in files else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "sdpo")
        assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(path.read_text()))), \
            f"{path}: relative import (write the absolute sdpo.… name)"
        graph[name] = {d for d in deps if d != name and d != "sdpo"}
    return graph


def where(module: str) -> str:
    """'method', a wing's name, or 'package' for sdpo itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return parts[1] if parts[1] in WINGS else "method"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "sdpo.models.model" in graph["sdpo.models.checkpoint"]
    assert "sdpo.data.read" in graph["sdpo.data.pairs"]
    assert "sdpo.loop" in graph["sdpo.stepwise"]
    assert set(graph) >= {f"sdpo.{m}" for m in METHOD}


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("wing, forbidden", [
    ("models", {"data", "eval", "runtime", "method"}),
    ("data", {"models", "eval", "runtime", "method"}),
    ("eval", set()),
    ("runtime", set()),
])
def test_wing_imports(wing, forbidden):
    bad = [(m, d) for m, deps in import_graph().items() if where(m) == wing for d in deps if where(d) in forbidden]
    assert not bad, f"sdpo/{wing}/ imports what it must not: {bad}"


def test_no_wing_imports_the_loop_or_the_driver():
    bad = [(m, d) for m, deps in import_graph().items() if where(m) in WINGS
           for d in deps if d in ("sdpo.loop", "sdpo.stepwise")]
    assert not bad, bad


def test_package_inits_are_docstrings_only():
    for init in SDPO.rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), \
            f"{init}: holds code or re-exports; import names from the module that defines them"
