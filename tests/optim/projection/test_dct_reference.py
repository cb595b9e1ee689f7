"""DCT column selection under ``dct_norm`` against DCT-AdamW's code (ista-daslab-optimizers 1.1.15).

The reference scoring is transcribed here from that code as plain float64 math (``utils/dct.py`` and
``fft_low_rank/fft_projector.py``): the side (right when rows >= columns), the coefficients S of G on the basis (by
matmul, or by its Makhoul FFT), the l1 or l2 norm of each basis vector's coefficients, and ``topk(sorted=False)``.
Its Makhoul path always scores with l1; its matmul path with ``ell_norm`` (default 1). Its default matmul basis is
``dct3_matrix(n)`` itself, whose *columns* are DCT-III vectors; the DCT-II basis we select from is that matrix's
transpose, which is the basis its Makhoul path scores. The matmul references here use the DCT-II basis.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.projection.bases import dct_basis, dct_scores, dct_select, is_left, top_indices
from lightning_lowrank.optim.projection.dct_fft import dct_scores_fft

SHAPES = {"tall": (40, 16), "wide": (16, 40), "square": (24, 24), "odd": (17, 33)}
RANK = 5
SEEDS = range(8)
ORDERS = {"l1": 1, "l2": 2}


def _paper_matrix(n: int) -> torch.Tensor:
    """``dct3_matrix(n)``: Q[k, j] = sqrt(2/n) cos(pi k (2j + 1) / (2n)), row 0 times sqrt(1/2) (float64 here)."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    Q = math.sqrt(2 / n) * torch.cos(math.pi * k * (2 * j + 1) / (2 * n))
    Q[0] *= math.sqrt(0.5)
    return Q


def _paper_makhoul(X: torch.Tensor) -> torch.Tensor:
    """``dct_type2_makhoul``: orthonormal DCT-II of each row (even entries, then odd ones reversed; FFT; twiddle)."""
    N = X.shape[1]
    perm = torch.cat([torch.arange(0, N, 2), torch.arange(1, N, 2).flip(0)])
    W = 2 * torch.exp(-1j * math.pi * torch.arange(N, dtype=torch.float64) / (2 * N))
    W[0] /= math.sqrt(4 * N)
    W[1:] /= math.sqrt(2 * N)
    return (torch.fft.fft(X[:, perm], dim=1) * W).real


def _paper_scores(G: torch.Tensor, sim_type: str, norm: str) -> torch.Tensor:
    """``FFTLowRankProjector.compute_similarity_*`` on the DCT-II basis, with the norm given (its Makhoul path: l1)."""
    right = G.shape[0] >= G.shape[1]
    if sim_type == "matmul":
        Q = _paper_matrix(min(G.shape)).T  # the DCT-II vectors as columns: its Makhoul-mode Q
        S = G @ Q if right else Q.T @ G
    else:
        S = _paper_makhoul(G) if right else _paper_makhoul(G.T).T
    return S.norm(p=ORDERS[norm], dim=0 if right else 1)


def _paper_select(G: torch.Tensor, sim_type: str, norm: str) -> list[int]:
    return sorted(torch.topk(_paper_scores(G, sim_type, norm), RANK, sorted=False).indices.tolist())


def _gradient(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Gaussian entries with a heavy-tailed scale per row and per column, so the l1 and l2 rankings often disagree."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(shape[0], 1, generator=g, dtype=torch.float64).pow(3)
    cols = torch.rand(1, shape[1], generator=g, dtype=torch.float64).pow(3)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * (rows + cols)


def _ours(G: torch.Tensor, scorer: str, norm: str) -> torch.Tensor:
    if scorer == "fft":
        return top_indices(dct_scores_fft(G, is_left(G.shape), norm), RANK)
    return dct_select(G, RANK, dct_basis(min(G.shape), torch.float64), norm)


def test_the_two_transcribed_scorers_agree():
    """The reference's matmul and Makhoul paths score the same basis, and it is ours: else the tests below are moot."""
    for shape in SHAPES.values():
        G = _gradient(shape, 0)
        d = min(shape)
        torch.testing.assert_close(_paper_matrix(d).T, dct_basis(d, torch.float64), atol=1e-14, rtol=0)
        for norm in ORDERS:
            torch.testing.assert_close(_paper_scores(G, "makhoul", norm), _paper_scores(G, "matmul", norm))


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("scorer", ["matmul", "fft"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_selection_equals_the_papers_index_for_index(shape, scorer, norm):
    for seed in SEEDS:
        G = _gradient(shape, seed)
        reference = _paper_scores(G, "makhoul" if scorer == "fft" else "matmul", norm)
        ours = _ours(G, scorer, norm)
        assert sorted(ours.tolist()) == _paper_select(G, "makhoul" if scorer == "fft" else "matmul", norm), seed
        assert torch.all(reference[ours].diff() <= 0), "ours are kept best first"


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("scorer", ["matmul", "fft"])
def test_the_optimizer_refreshes_with_its_dct_norm(scorer, norm):
    for name, shape in SHAPES.items():
        G = _gradient(shape, 1)
        W = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        opt = ProjectedOptimizer([W], lr=0.0, rank=RANK, projector="dct", dct_scorer=scorer, dct_norm=norm)
        W.grad = G.clone()
        opt.step()
        assert sorted(opt.state[W]["proj_idx"].tolist()) == _paper_select(G, "matmul", norm), name


def test_l1_and_l2_pick_different_columns():
    """The norm matters on these gradients (so the tests above tell l1 from l2), and l2 captures more energy."""
    differ = 0
    for shape in SHAPES.values():
        for seed in SEEDS:
            G = _gradient(shape, seed)
            l1, l2 = _ours(G, "matmul", "l1"), _ours(G, "matmul", "l2")
            differ += set(l1.tolist()) != set(l2.tolist())
            energy = dct_scores(G, dct_basis(min(shape), torch.float64)).square()
            assert energy[l2].sum() >= energy[l1].sum() - 1e-12
    assert differ >= 4


def test_dct_norm_is_validated():
    with pytest.raises(ValueError, match="Unknown dct_norm"):
        ProjectedOptimizer([torch.zeros(3, 4, requires_grad=True)], projector="dct", dct_norm="linf")


# -- the installed package itself (a benchmark-only peer, absent in CI) ----------------------------------------------


@pytest.fixture
def paper_modules(monkeypatch):
    """``utils/dct.py`` and ``fft_low_rank/fft_projector.py`` loaded by path: the package ``__init__`` imports wandb,
    triton and gpustat. Empty parent packages stand in for it; everything is taken out of sys.modules afterwards."""
    spec = importlib.util.find_spec("ista_daslab_optimizers") if "ista_daslab_optimizers" not in sys.modules else None
    root = None
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
    elif sys.modules.get("ista_daslab_optimizers") is not None:
        root = Path(next(iter(sys.modules["ista_daslab_optimizers"].__path__)))
    if root is None or not (root / "fft_low_rank" / "fft_projector.py").is_file():
        pytest.skip("ista-daslab-optimizers is not installed (scripts/bench_env.sh installs it)")
    for package, folder in (("", root), (".utils", root / "utils"), (".fft_low_rank", root / "fft_low_rank")):
        shell = types.ModuleType(f"ista_daslab_optimizers{package}")
        shell.__path__ = [str(folder)]
        monkeypatch.setitem(sys.modules, shell.__name__, shell)
    modules = {}
    for name in ("utils.global_cache", "utils.dct", "fft_low_rank.fft_projector"):
        full = f"ista_daslab_optimizers.{name}"
        module_spec = importlib.util.spec_from_file_location(full, root / (name.replace(".", "/") + ".py"))
        module = importlib.util.module_from_spec(module_spec)
        monkeypatch.setitem(sys.modules, full, module)
        module_spec.loader.exec_module(module)
        modules[name.split(".")[-1]] = module
    return modules


@pytest.mark.parametrize(
    ("sim_type", "ell_norm", "norm"), [("makhoul", 1, "l1"), ("matmul", 1, "l1"), ("matmul", 2, "l2")]
)
def test_selection_equals_the_installed_projector(paper_modules, sim_type, ell_norm, norm):
    dct, fft_projector = paper_modules["dct"], paper_modules["fft_projector"]
    for name, shape in SHAPES.items():
        d = min(shape)
        paper_Q = dct.dct3_matrix(d, torch.float64, "cpu")  # its matmul-mode basis: our DCT-II basis transposed
        torch.testing.assert_close(paper_Q, dct_basis(d, torch.float64).T, atol=1e-5, rtol=0)  # built in float32
        for seed in SEEDS:
            G = _gradient(shape, seed)
            projector = fft_projector.FFTLowRankProjector(
                torch.zeros(shape, dtype=torch.float64), rank=RANK, proj="dct", rotate_subspace=False,
                sim_type=sim_type, ell_norm=ell_norm,
            )  # fmt: skip
            projector.change_subspace(paper_Q.T, G.clone(), col_norms=None)
            theirs = sorted(projector.indices_crt.tolist())
            for scorer in ("matmul", "fft"):
                assert sorted(_ours(G, scorer, norm).tolist()) == theirs, (name, seed, scorer)


def _paper_default_select(G: torch.Tensor, norm: str) -> list[int]:
    """DCT-AdamW's default ``sim_type="matmul"`` path: G times its matrix Q as built (columns = DCT-III vectors)."""
    Q = _paper_matrix(min(G.shape))
    right = G.shape[0] >= G.shape[1]
    S = G @ Q if right else Q.T @ G
    scores = S.norm(p=ORDERS[norm], dim=0 if right else 1)
    return sorted(torch.topk(scores, RANK, sorted=False).indices.tolist())


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_dct_type_3_equals_the_papers_default_matmul_path(shape, norm):
    """Through the optimizer: ``dct_type=3`` picks DCT-AdamW's default columns, and its P is those columns of Q."""
    mismatched_with_type_2 = 0
    for seed in SEEDS:
        G = _gradient(shape, seed)
        w = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        w.grad = G.clone()
        opt = ProjectedOptimizer([w], rank=RANK, projector="dct", dct_norm=norm, dct_type=3)
        opt.step()
        idx = opt.state[w]["proj_idx"]
        assert sorted(idx.tolist()) == _paper_default_select(G, norm), seed
        torch.testing.assert_close(opt.projection_matrix(w), _paper_matrix(min(shape))[:, idx], atol=1e-12, rtol=0)
        mismatched_with_type_2 += sorted(_ours(G, "matmul", norm).tolist()) != _paper_default_select(G, norm)
    assert mismatched_with_type_2 > 0  # the two bases really are different choices


def test_dct_type_3_needs_the_matmul_scorer():
    with pytest.raises(ValueError, match="dct_scorer='matmul'"):
        ProjectedOptimizer([torch.nn.Parameter(torch.zeros(4, 6))], projector="dct", dct_type=3, dct_scorer="fft")


@pytest.mark.parametrize(("ell_norm", "norm"), [(1, "l1"), (2, "l2")])
def test_dct_type_3_equals_the_installed_default_path(paper_modules, ell_norm, norm):
    dct, fft_projector = paper_modules["dct"], paper_modules["fft_projector"]
    for name, shape in SHAPES.items():
        paper_Q = dct.dct3_matrix(min(shape), torch.float64, "cpu")
        for seed in SEEDS:
            G = _gradient(shape, seed)
            projector = fft_projector.FFTLowRankProjector(
                torch.zeros(shape, dtype=torch.float64), rank=RANK, proj="dct", rotate_subspace=False,
                sim_type="matmul", ell_norm=ell_norm,
            )  # fmt: skip
            projector.change_subspace(paper_Q, G.clone(), col_norms=None)  # Q as DCTAdamW passes it
            ours = dct_select(G, RANK, dct_basis(min(shape), torch.float64).T, norm)
            assert sorted(ours.tolist()) == sorted(projector.indices_crt.tolist()), (name, seed)
