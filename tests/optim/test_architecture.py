"""The optimizer's shape (issue 24): a reader follows one gradient from ``step()`` to the weight in a few files.

Traced with ``sys.setprofile`` on a small MLP: every call into the package's own code (comprehensions included, as
Python 3.11 runs them as calls) is counted, with its file and its depth below ``step()``. docs/architecture.md writes
the path down.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import lightning_lowrank
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.projection.projectors import PROJECTOR_CLASSES

PACKAGE = Path(lightning_lowrank.__file__).parent


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def _backward(model, opt, x):
    opt.zero_grad()
    model(x).pow(2).mean().backward()


def _trace(fn):
    """(files of the package entered, deepest nesting of package calls) while ``fn`` runs."""
    files: set[str] = set()
    depth = deepest = 0
    root = str(PACKAGE)

    def profile(frame, event, arg):
        nonlocal depth, deepest
        if not frame.f_code.co_filename.startswith(root):
            return
        if event == "call":
            depth += 1
            deepest = max(deepest, depth)
            files.add(str(Path(frame.f_code.co_filename).relative_to(PACKAGE)))
        elif event == "return":
            depth -= 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return files, deepest


def test_a_default_dct_refresh_step_touches_at_most_9_files_6_calls_deep():
    model = _mlp()
    opt = ProjectedOptimizer.from_optimizer(
        torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4, projector="dct", update_gap=2
    )
    x = torch.randn(4, 16)
    for _ in range(2):  # the first subspace, then an ordinary step: the next step refreshes from an existing one
        _backward(model, opt, x)
        opt.step()
    _backward(model, opt, x)
    files, deepest = _trace(opt.step)
    assert set(opt.last_refreshes) == set(opt.projected_params())  # it was a refresh step
    assert len(files) <= 9, sorted(files)
    assert deepest <= 6, deepest


@pytest.mark.parametrize("projector", ["svd", "dct", "random", "online_pca"])
def test_p_is_built_once_per_layer_per_step(projector, monkeypatch):
    """An ordinary step builds each layer's P once; a refresh step builds the new one once, and the previous one
    once (its moments are carried from it). Before, a refresh step rebuilt the new P for the update. (Online PCA's
    per-step move of P reads the stored P itself, ``load_matrix``, which is not a rebuild.)"""
    calls: Counter = Counter()
    cls = PROJECTOR_CLASSES[projector]
    real = cls.matrix

    def counting(self, param, state, ctx):
        calls[id(param)] += 1
        return real(self, param, state, ctx)

    monkeypatch.setattr(cls, "matrix", counting)
    model = _mlp()
    opt = ProjectedOptimizer.from_optimizer(
        torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4, projector=projector, update_gap=2
    )
    x = torch.randn(4, 16)
    layers = opt.projected_params()
    expected = {0: 1, 1: 1, 2: 2, 3: 1}  # step -> builds per layer: first subspace, ordinary, refresh, ordinary
    for step, builds in expected.items():
        _backward(model, opt, x)
        calls.clear()
        opt.step()
        assert bool(opt.last_refreshes) == (step % 2 == 0)
        assert [calls[id(p)] for p in layers] == [builds] * len(layers), step


def _is_dataclass(node: ast.ClassDef) -> bool:
    return any("dataclass" in ast.unparse(d) for d in node.decorator_list)


def test_no_class_in_optim_has_more_than_one_base_of_the_package():
    """No mixins: behaviour comes from objects the optimizer holds (``Refresher``, ``RankBudget``), not from base
    classes that call each other. The options dataclasses are exempt: ``LowRankOptions`` gathers the fields of its
    sections (``options.py``) by inheritance, data rather than behaviour, so that every option is defined once and
    LightningCLI reads one signature."""
    defined = {
        node.name
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    }
    offenders = []
    for path in (PACKAGE / "optim").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not _is_dataclass(node):
                ours = [b.id for b in node.bases if isinstance(b, ast.Name) and b.id in defined]
                if len(ours) > 1 or any(name.endswith("Mixin") for name in ours):
                    offenders.append(f"{path.name}: {node.name}({', '.join(ours)})")
    assert not offenders, offenders
