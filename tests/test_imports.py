"""The package's modules import each other without a cycle, and the light ones import no torch.

The graph counts every ``import radpath_fs...`` and ``from radpath_fs... import``, at module level
and inside functions: a function-level import that closes a cycle is still a cycle (the two modules
cannot be understood or changed apart), only one that happens to run late.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "radpath_fs"

# Modules that must stay importable without torch: fusion runs offline on prediction tables, and
# the embedding reader serves fusion-side tools; fusion reads the store's names and the metrics.
# The config takes its embedder defaults from the presets, which are data.
TORCH_FREE = ["radpath_fs.fusion", "radpath_fs.embeddings", "radpath_fs.folds", "radpath_fs.layout",
              "radpath_fs.metrics", "radpath_fs.presets", "radpath_fs.config"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str:
    """The module an imported name lives in (``radpath_fs.store.Store`` -> ``radpath_fs.store``)."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its source}."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("radpath_fs"):
                for alias in node.names:  # `from radpath_fs import embed` imports the submodule
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else _target(node.module, modules))
            elif isinstance(node, ast.Import):
                deps.update(_target(a.name, modules) for a in node.names if a.name.startswith("radpath_fs"))
        graph[module] = deps - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_lazy_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    # store.zarr_store imports linksafe inside the function; predict_models imports the MRI branch there.
    assert "radpath_fs.linksafe" in graph["radpath_fs.store"]
    assert "radpath_fs.mri" in graph["radpath_fs.predict"]


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_light_modules_import_no_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert run.returncode == 0, f"{module} imports torch{': ' + run.stderr[-2000:] if run.stderr else ''}"


def test_the_benchmarks_collect():
    """`make bench` modules import what they use from the tests (collected only, nothing run): a
    helper renamed in a test module must not break them unseen."""
    root = PACKAGE.parent
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", str(root / "tests" / "benchmarks")], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bench_mil.py::test_2_5x_against_permuted_labels" in r.stdout
