"""The package's import graph: no cycle, and the tensor math in optim/ does not need Lightning."""

import ast
import subprocess
import sys
from pathlib import Path

from tests import ROOT

PACKAGE = ROOT / "lightning_lowrank"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (``from pkg import sub`` counts as ``pkg.sub``)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):  # also imports inside functions (deferred cycles)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_lowrank"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[name].add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    return graph


def test_the_import_graph_has_no_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # The root package imports its parts to register the strategies; parts never import the root back.
    cycles = [c for c in cycles if "lightning_lowrank" not in c]
    assert not cycles, cycles


def test_the_optimizer_core_imports_no_lightning_of_its_own():
    """optim/ modules import torch only (and the package __init__ does not load Lightning: see the next tests)."""
    graph = _graph()
    offenders = []
    for path in (PACKAGE / "optim").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")]
        name = _module_name(path)
        offenders += [f"{name} -> {m}" for m in graph[name] if not m.startswith("lightning_lowrank.optim")]
    assert not offenders, offenders


def test_the_package_imports_in_a_fresh_interpreter():
    code = "import lightning_lowrank.memory.plan, lightning_lowrank.optim, lightning_lowrank.strategies"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True).stdout


def test_importing_the_optimizer_core_or_the_planner_does_not_load_lightning():
    out = _run(
        "import sys, lightning_lowrank.optim, lightning_lowrank.memory\n"
        "from lightning_lowrank import ProjectedOptimizer, plan\n"
        "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith('lightning.')))"
    )
    assert out.strip() == "[]"


def test_strategy_names_are_registered_whichever_is_imported_first():
    """The names must be in Lightning's registry once both packages are imported, in either order, also when the
    first use of the package is one of its Lightning names."""
    check = "from lightning.pytorch.strategies import StrategyRegistry\nprint('lowrank' in StrategyRegistry)"
    for first in (
        "import lightning_lowrank\nimport lightning as L",
        "import lightning as L\nimport lightning_lowrank",
        "import lightning_lowrank.optim\nimport lightning.pytorch",
        "from lightning_lowrank import LowRankStrategy, SubspaceRefresh",
        "from lightning_lowrank import SubspaceRefresh, CurvatureProbe",  # a callback first: was a circular import
        "from lightning_lowrank import CurvatureProbe",
        "import lightning_lowrank.callbacks",
    ):
        assert _run(f"{first}\n{check}").strip() == "True", first
