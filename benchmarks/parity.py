"""Parity: ``ProjectedOptimizer`` against the installed reference packages, step by step, in float64.

    bash scripts/bench_env.sh                  # the peers, with --no-deps (once)
    python benchmarks/parity.py                # ~1 min on 2 CPU cores
    python benchmarks/parity.py --quick        # 12 steps, fewer streams and gradients: a smoke run

Prints Markdown tables and writes them to ``benchmarks/results/parity.md``, every figure to
``benchmarks/results/parity.json``. A peer that is not installed, or fails, is a "not run: reason" row.

Setup. float64; a bias-free MLP 16 -> 24 -> 16 -> 16 (tanh), so its three weights are tall (24 x 16), wide
(16 x 24) and square (16 x 16) and every one is projected; a regression loss on fixed torch-generated data; 24 steps
(12 with ``--quick``), a refresh every 4 steps, lr 1e-2, weight decay 0.1, eps 1e-6, betas (0.9, 0.999) and a scale
other than 1 where the method has one. Each side computes its own gradients on its own weights at every step, so a
difference compounds as it would in training; no projection matrix is shared (APOLLO's Gaussian P is redrawn on each
side from apollo-torch's seed chain: seed = parameter number from 1 in optimizer order, then ``next_seed`` at every
refresh, on the weight's device). The figure is the maximum over steps and weights of
||W_ours - W_ref||_F / ||W_ref||_F.

Float32 floor. Each reference is also run in float32 and compared with its own float64 run: that is how far two
correct implementations can drift apart over the same run when they round differently. A row agrees "at float64"
when its float64 difference is <= 1e-10 and far below that floor (at most 1e-3 of it).

Rows (reference -> ours):

* galore-torch ``GaLoreAdamW`` (rank, update_proj_gap, scale 0.25, proj_type "std") -> ``projector="svd"``,
  ``residual="none"``, ``adam_form="hf"``. galore-torch (and fira, which copies its projector) take the SVD of any
  gradient that is not float32 in float32; the main row runs its code with that SVD in float64 (see the next note), a
  second row as installed. Also ours with the default ``adam_form="torch"``: a documented deviation
  (torch's AdamW adds eps after the bias correction, transformers' AdamW, which galore-torch copies, before it and
  decays the weight after the update).
* fira ``FiraAdamW`` (alpha 0.5) -> ``residual="fira"`` (whose default Adam form is "hf").
* apollo-torch ``APOLLOAdamW`` (proj "random", scale_type "channel", scale 4) -> ``residual="apollo"`` (whose default
  projector is "gaussian"); APOLLO-Mini: rank 1, scale_type "tensor", scale 128.
* ista-daslab-optimizers ``DCTAdamW`` (l1 scoring, ``ell_norm=1``, its default) -> ``projector="dct"``,
  ``dct_norm="l1"``, default (torch) Adam form, which is DCTAdamW's: eps * sqrt(1 - beta2^t) added to sqrt(v), decay
  before the update. DCTAdamW counts the step it is taking, so it refreshes one step earlier in each cycle
  (``refresh_lag`` in peers.py): ours is driven through ``request_refresh`` on the same steps. Its matmul path runs
  with Q set, before its first step, to the DCT-II basis computed in float64 (``dct_basis``; its own ``dct3_matrix``
  is computed in float32 arithmetic), or to its transpose, the DCT-III columns its default matmul path multiplies by
  (ours ``dct_type=3``); its Makhoul path with its own.
  Rows with moments kept and rotated (``rotate_subspace`` / ``moments="rotate"``).
* sophia-opt ``SophiaG`` -> ``preconditioner="lazy_hessian"``, ``hessian_bias_correction=False``. Sophia is
  elementwise in the weight's coordinates, ours in P's, so the two agree exactly only where P is a full-rank basis
  whose change of coordinates commutes with elementwise operations. Ours runs at rank = min(m, n) = 16 with
  ``projector="dct"``: P is then every column of the orthonormal DCT-II basis B in score order, i.e. B times a
  permutation, and with ``moments="rotate"`` a refresh moves m and h through R = P_old^T P_new, itself a permutation,
  so exactly. SophiaG runs on Z = W B (Z = B^T W for the wide weight): its gradient is G B, its curvature estimate D
  is taken in B's coordinates, and the weights compared are Z B^T. Elementwise operations commute with the
  permutation, so each side needs only its own basis. Every 2 steps each side measures a Gauss-Newton-Bartlett style
  estimate on its own weights (the gradient of the loss against targets resampled around the model's output, the
  same noise on both sides), squares it and feeds it: SophiaG through ``update_hessian`` with p.grad = |estimate|
  (it squares p.grad), ours through ``update_curvature``. Constants: ours ``rho`` = SophiaG's rho * bs, ours
  ``hessian_beta`` = its beta2, ours ``betas[0]`` = its beta1, ours ``eps`` = its 1e-15 (it adds it to rho bs h, ours
  clamps rho h from below: the same where rho h >> 1e-15, and both give the sign step where h = 0); decoupled decay
  before the update on both sides.
* torch.optim.Muon (lr 1e-2, weight decay 0.1, momentum 0.95, its defaults otherwise: Nesterov, 5 quintic steps, eps
  1e-7) -> ``ProjectedOptimizer.from_optimizer`` on the same Muon. "muon (dense)": nothing projected (mask False),
  torch's Newton-Schulz in bfloat16 on both sides: bit for bit. "muon (full basis)": every weight at rank = min(m, n)
  = 16 with ``projector="svd"``, ``moments="rotate"``, ``ns_dtype="float64"`` (a full orthonormal basis, refreshed
  every 4 steps), against Muon with ``torch.optim._muon._zeropower_via_newtonschulz`` replaced by the same iteration
  in the gradient's dtype (``replaced``): Newton-Schulz commutes with an orthogonal change of basis, and the momentum
  rotated into each new basis stays Muon's, so only rounding differs.
* ista-daslab-optimizers ``Trion`` (one ``use_muon`` group: rank 4, lr, weight decay, momentum 0.95, scaling_type
  "kj", ns_type "torch"; ``use_makhoul`` for the Makhoul rows) -> ``from_optimizer(torch.optim.Muon(...),
  projected_rule="trion", rank=4, dct_scorer="matmul" | "fft", trion_scaling="kj", ns_dtype="float64")``. It cannot
  run as published; ``trion_runnable`` does what tests/parity/test_trion_parity.py does: its ``GlobalCache`` filled at
  (16, 4) with what its uncached path (a NameError) would store, Q = its ``dct3_matrix(16)`` computed in float64
  (``dct_basis(16).T``; its own is computed in float32), Q^T for Makhoul; ``get_dct_matrix`` (called, defined
  nowhere) a read of that cache; ``torch.distributed`` a world of one; torch's default dtype the run's (its Makhoul
  twiddles follow it); ``wandb`` and ``utils.newton_schulz_triton`` stubbed for the import. Its Newton-Schulz
  (bfloat16, X / (||X||_F + 1e-7)) is replaced by torch's form of the same iteration (X / max(||X||_F, 1e-7), ours)
  in the run's dtype; with its eps form in float64 the rows differ by 1e-7 / ||X||_F relative at every step, which
  dominates: "trion (matmul, its NS eps)". For a wide weight, Trion's Makhoul path scores with Q^T's columns but maps
  back through Q's (``lightning_lowrank/optim/update/trion.py``), ours through the scoring columns: "trion (makhoul)"
  is a documented deviation; "trion (makhoul, tall+square)" leaves the wide weight out of both optimizers (it stays
  at its initial value, the gradients still flow through it), so it compares the tall and the square weight.

Rows marked * run the installed code with one function replaced inside one of its modules: a torch function through
``torch_seen_by``, to take galore-torch's and fira's SVD in float64, and to isolate the two causes of DCTAdamW's
differences, which the unpatched rows show: the slot order of ``torch.topk(sorted=False)``, and ``torch.matmul(w, R,
out=w)`` in its ``rotate_subspace``, whose output aliases its input (torch then computes a wrong product); Muon's and
Trion's Newton-Schulz, and what Trion needs to run at all, through ``replaced``.

Two comparisons are not of parameters:

* Q-GaLore's adaptive refresh: q-galore-torch's ``GaLoreProjector.project(grad, iter)`` (cos_threshold 0.4,
  gamma_proj 2, queue_size 5, quant=False) against ours (``projector="svd"`` with ``RefreshSchedule`` under
  ``RefreshPolicy(adaptive=True, rule="qgalore")``, driven as the ``SubspaceRefresh`` callback drives it: request
  the due layers, step, record ``opt.last_refreshes`` with the signed leading cosine), on a stable, a noisy, a
  drifting and a sign-flipping gradient stream of 300 steps (tall and wide weights); the figure is the number of
  steps on which one refreshes and the other does not. Its SVD runs in float32 even for float64 gradients.
* DCT column selection: the indices ``FFTLowRankProjector.change_subspace`` picks against ours (``dct_norm`` "l1" and
  "l2", ``dct_scorer`` "matmul" and "fft", the indices read from ``ProjectedOptimizer`` state) over many random
  gradients of tall, wide, square and odd shapes; the figure is the number of differing index sets. Its default
  matmul basis ``dct3_matrix`` has DCT-III vectors as columns: ours ``dct_type=3`` (matmul scorer) against it, and
  ``dct_type=2`` against its DCT-II basis (the transposed matrix, which its Makhoul path uses).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from peers import PeerUnavailable  # noqa: E402

from lightning_lowrank.optim.projected import ProjectedOptimizer  # noqa: E402
from lightning_lowrank.optim.projection.bases import dct_basis, is_left  # noqa: E402
from lightning_lowrank.schedule import RefreshPolicy, RefreshSchedule  # noqa: E402

PATCH_NOTE = (
    "the installed reference's own code, with functions replaced in its modules for this run: galore-torch's "
    "and fira's projector read torch.float as float64 (so they decompose a float64 gradient in float64, not float32); "
    "DCTAdamW's FFTLowRankProjector gets a sorted torch.topk, or a torch.matmul whose out= may alias an input; "
    "torch.optim._muon's _zeropower_via_newtonschulz iterates in the gradient's dtype (float64), not bfloat16; "
    "Trion's zeropower_via_newtonschulz5 is the same iteration in the run's dtype (float64), not bfloat16, in torch's "
    "form (X / max(||X||_F, 1e-7), not X / (||X||_F + 1e-7)) unless 'with its eps', and Trion is made runnable: its "
    "GlobalCache filled with its DCT matrix (computed in float64), get_dct_matrix (missing) a read of it, "
    "torch.distributed a world of one."
)
RESULTS = Path(__file__).resolve().parent / "results"
PEER_PACKAGES = ("galore-torch", "q-galore-torch", "fira", "apollo-torch", "ista-daslab-optimizers", "sophia-opt")

SHAPES = [(24, 16), (16, 24), (16, 16)]  # nn.Linear (out, in) of 16 -> 24 -> 16 -> 16: tall, wide, square
STEPS, QUICK_STEPS = 24, 12
GAP, RANK = 4, 5
LR, WD, EPS, BETAS = 1e-2, 0.1, 1e-6, (0.9, 0.999)
AT_FLOAT64 = 1e-10  # at most this, and at most FLOOR_SHARE of the float32 floor: "at float64"
FLOOR_SHARE = 1e-3

SOPHIA_BETAS, SOPHIA_RHO, SOPHIA_BS, SOPHIA_EPS, CURVATURE_EVERY = (0.965, 0.99), 0.04, 512, 1e-15, 2
QGALORE = dict(cos_threshold=0.4, gamma_proj=2, queue_size=5)
STREAM_STEPS, QUICK_STREAM_STEPS, STREAM_RANK = 300, 120, 4
DCT_SHAPES = {"tall": (40, 16), "wide": (16, 40), "square": (24, 24), "odd": (17, 33)}
DCT_GRADIENTS, QUICK_DCT_GRADIENTS, DCT_RANK = 100, 20, 5
MUON_MOMENTUM, TRION_RANK, TRION_SCALING = 0.95, 4, "kj"
NS_COEFFICIENTS, NS_STEPS, NS_EPS = (3.4445, -4.7750, 2.0315), 5, 1e-7  # torch.optim.Muon's and Trion's


# -- the model both sides train ------------------------------------------------------------------------------------


def initial_weights(dtype: torch.dtype) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) / math.sqrt(s[1])).to(dtype) for s in SHAPES]


def _data(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    Y = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    return X.to(dtype), Y.to(dtype)


def _forward(weights: list[Tensor], X: Tensor) -> Tensor:
    h = torch.tanh(X @ weights[0].T)
    h = torch.tanh(h @ weights[1].T)
    return h @ weights[2].T


def gradients(weights: list[Tensor]) -> list[Tensor]:
    """Gradients of the regression loss at these weights (computed on a detached copy)."""
    X, Y = _data(weights[0].dtype)
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    loss = (_forward(ws, X) - Y).pow(2).mean()
    return list(torch.autograd.grad(loss, ws))


def curvature_gradients(weights: list[Tensor], step: int) -> list[Tensor]:
    """A Gauss-Newton-Bartlett style sample: the gradient of the loss against targets drawn around the model's own
    output (the same draws on both sides). Its square is the curvature diagonal estimate."""
    X, _ = _data(weights[0].dtype)
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    out = _forward(ws, X)
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(1000 + step), dtype=torch.float64)
    loss = 0.5 * (out - (out.detach() + noise.to(out.dtype))).pow(2).sum() / X.shape[0]
    return list(torch.autograd.grad(loss, ws))


def relative_difference(a: list[Tensor], b: list[Tensor]) -> float:
    """max over weights of ||a - b||_F / ||b||_F, in float64."""
    return max(float((x.double() - y.double()).norm() / y.double().norm()) for x, y in zip(a, b))


def max_over_steps(a: list[list[Tensor]], b: list[list[Tensor]]) -> float:
    return max(relative_difference(x, y) for x, y in zip(a, b))


# -- trajectories ---------------------------------------------------------------------------------------------------


Hook = Callable[[torch.optim.Optimizer, list[Tensor], int], None]


def trajectory(
    make: Callable[[list[Tensor]], torch.optim.Optimizer],
    dtype: torch.dtype,
    steps: int,
    before: Hook | None = None,
    after: Hook | None = None,
) -> list[list[Tensor]]:
    """Train the MLP's weights with the optimizer ``make`` builds; the weights after every step."""
    params = [torch.nn.Parameter(w) for w in initial_weights(dtype)]
    opt = make(params)
    snapshots = []
    for step in range(steps):
        for p, g in zip(params, gradients(params)):
            p.grad = g
        if before is not None:
            before(opt, params, step)
        with peers.maybe_quiet(True):
            opt.step()
        if after is not None:
            after(opt, params, step)
        snapshots.append([p.detach().clone() for p in params])
    return snapshots


def _group(params: list[Tensor], rank: int, **keys: Any) -> list[dict[str, Any]]:
    return [{"params": params, "rank": rank, "update_proj_gap": GAP, "proj_type": "std", **keys}]


def _ours(rank: int = RANK, **options: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        # svd_signs='none': the references take their SVD's columns as they come
        keys = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, rank=rank, update_gap=GAP, svd_signs="none")
        return ProjectedOptimizer(params, **{**keys, **options})

    return make


class _TorchShim(types.ModuleType):
    """``torch`` as a peer module sees it, with a few attributes replaced (the rest is torch's own)."""

    def __init__(self, **overrides: Any) -> None:
        super().__init__("torch")
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def torch_seen_by(module: types.ModuleType, **overrides: Any) -> Iterator[None]:
    """Run with ``module.torch`` replaced by a shim that differs from torch only in ``overrides``."""
    saved = module.torch
    module.torch = _TorchShim(**overrides)
    try:
        yield
    finally:
        module.torch = saved


def _svd_in_float64(package: str, module: str) -> contextlib.AbstractContextManager:
    """galore-torch's and fira's ``get_orthogonal_matrix`` decompose any gradient that is not ``torch.float`` in
    float32 (``matrix = weights.float()``, cast back afterwards). With ``torch.float`` read as float64 their own code
    decomposes a float64 gradient as it is; a float32 one still goes through float32. Nothing else changes."""
    return torch_seen_by(peers._import(package, module), float=torch.float64)


def _reference(
    make_factory: Callable[[], Callable[[list[Tensor]], torch.optim.Optimizer]],
    patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Callable[[torch.dtype, int], list[list[Tensor]]]:
    def run(dtype: torch.dtype, steps: int) -> list[list[Tensor]]:
        make = make_factory()  # imports the peer here, so a missing one is this row's "not run"
        with patch():
            return trajectory(make, dtype, steps)

    return run


def _sorted_topk() -> contextlib.AbstractContextManager:
    """FFTLowRankProjector picks its columns with ``torch.topk(sorted=False)``; this makes that call sorted (best
    first, ours' order). Only the order of the chosen columns changes, not the set."""

    def topk(*args: Any, **kwargs: Any) -> Any:
        return torch.topk(*args, **{**kwargs, "sorted": True})

    return torch_seen_by(peers._import("ista_daslab_optimizers", "fft_low_rank.fft_projector"), topk=topk)


def _unaliased_matmul() -> contextlib.AbstractContextManager:
    """FFTLowRankProjector.rotate_subspace writes ``torch.matmul(w, R, out=w)``, an output that aliases its input,
    which torch computes wrongly; this computes the product first and then copies it into ``out``."""

    def matmul(a: Tensor, b: Tensor, *, out: Tensor | None = None) -> Tensor:
        product = torch.matmul(a, b)
        return product if out is None else out.copy_(product)

    return torch_seen_by(peers._import("ista_daslab_optimizers", "fft_low_rank.fft_projector"), matmul=matmul)


def galore_ref(scale: float) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    mod = peers._import("galore_torch", "adamw")
    return lambda params: mod.AdamW(_group(params, RANK, scale=scale), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)


def fira_ref(alpha: float) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    mod = peers._import("fira", "fira_adamw")
    return lambda params: mod.AdamW(_group(params, RANK, alpha=alpha), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)


def apollo_ref(rank: int, scale: float, scale_type: str) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    mod = peers._import("apollo_torch", "apollo")
    keys = dict(proj="random", scale_type=scale_type, scale=scale)
    return lambda params: mod.AdamW(_group(params, rank, **keys), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)


def dct_adamw_ref(
    sim_type: str, rotate: bool, exact_basis: bool, dct_type: int = 2
) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    """DCTAdamW scoring with l1 (``ell_norm=1``): ``sim_type="makhoul"`` with its own Q, or ``"matmul"`` with Q set
    (before its first step, which then keeps it) to the DCT-II basis computed in float64 (``dct_type=2``), or to its
    transpose, the matrix its default matmul path multiplies by (``dct_type=3``: columns = DCT-III vectors)."""
    mod = peers._import("ista_daslab_optimizers", "fft_low_rank.dct_adamw")

    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        opt = mod.DCTAdamW(
            params, lr=LR, weight_decay=WD, rank=RANK, proj="dct", update_proj_gap=GAP, sim_type=sim_type,
            ell_norm=1, rotate_subspace=rotate, betas=BETAS, eps=EPS,
        )  # fmt: skip
        if exact_basis:
            basis = dct_basis(min(SHAPES[0]), dtype=params[0].dtype)
            opt.Q = basis if dct_type == 2 else basis.T.contiguous()
        return opt

    return make


def dct_lagged_schedule(opt: ProjectedOptimizer, params: list[Tensor], step: int) -> None:
    """Refresh ours where DCTAdamW does: at its first step and where (step + 1) % gap == 0 (it counts one ahead)."""
    if step == 0:
        opt.external_schedule()
    elif (step + 1) % GAP == 0:
        opt.request_refresh(params)


# -- Sophia: both sides in the DCT-II basis's coordinates -----------------------------------------------------------


def _to_basis(W: Tensor, B: Tensor) -> Tensor:
    return B.T @ W if is_left(W.shape) else W @ B


def _from_basis(Z: Tensor, B: Tensor, shape: torch.Size) -> Tensor:
    return B @ Z if is_left(shape) else Z @ B.T


def sophia_reference(dtype: torch.dtype, steps: int) -> list[list[Tensor]]:
    """SophiaG on Z = W B (B^T W for the wide weight), B the full orthonormal DCT-II basis; weights mapped back."""
    sophia = _import_sophia()
    B = dct_basis(min(SHAPES[0]), dtype=dtype)
    W0 = initial_weights(dtype)
    Z = [torch.nn.Parameter(_to_basis(w, B)) for w in W0]
    opt = sophia.SophiaG(Z, lr=LR, betas=SOPHIA_BETAS, rho=SOPHIA_RHO, weight_decay=WD)
    snapshots = []
    for step in range(steps):
        W = [_from_basis(z.detach(), B, w.shape) for z, w in zip(Z, W0)]
        for z, g in zip(Z, gradients(W)):
            z.grad = _to_basis(g, B)
        opt.step(bs=SOPHIA_BS)
        W = [_from_basis(z.detach(), B, w.shape) for z, w in zip(Z, W0)]
        if step % CURVATURE_EVERY == CURVATURE_EVERY - 1:
            for z, g in zip(Z, curvature_gradients(W, step)):
                z.grad = _to_basis(g, B).abs()  # update_hessian folds in p.grad ** 2
            opt.update_hessian()
        snapshots.append(W)
    return snapshots


def _import_sophia() -> Any:
    if importlib.util.find_spec("sophia_opt") is None:
        raise PeerUnavailable("sophia_opt is not installed (scripts/bench_env.sh installs it)")
    try:
        return importlib.import_module("sophia_opt")
    except ImportError as err:
        raise PeerUnavailable(f"import sophia_opt failed: {err}") from err


def sophia_ours(dtype: torch.dtype, steps: int) -> list[list[Tensor]]:
    """Ours at full rank with the DCT projector (P = B permuted), curvature fed in P's coordinates."""
    make = _ours(
        rank=min(SHAPES[0]), projector="dct", moments="rotate", preconditioner="lazy_hessian",
        hessian_bias_correction=False, hessian_beta=SOPHIA_BETAS[1], rho=SOPHIA_RHO * SOPHIA_BS,
        betas=SOPHIA_BETAS, eps=SOPHIA_EPS,
    )  # fmt: skip

    def feed(opt: ProjectedOptimizer, params: list[Tensor], step: int) -> None:
        if step % CURVATURE_EVERY == CURVATURE_EVERY - 1:
            grads = curvature_gradients(params, step)
            opt.update_curvature({p: _to_basis(g, opt.projection_matrix(p)).square() for p, g in zip(params, grads)})

    return trajectory(make, dtype, steps, after=feed)


# -- Muon and Trion ------------------------------------------------------------------------------------------------


def newton_schulz(
    X: Tensor,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = NS_STEPS,
    eps: float = NS_EPS,
    eps_added: bool = False,
) -> Tensor:
    """torch.optim._muon's ``_zeropower_via_newtonschulz`` op for op, iterating in X's dtype where torch casts to
    bfloat16. ``eps_added``: divide by ||X||_F + eps (Trion's ``zeropower_via_newtonschulz5``), not max(||X||_F, eps)
    (torch's); Trion's writes the same iteration as b A + c A A and a X + B X."""
    a, b, c = coefficients
    tall = X.size(0) > X.size(1)
    Y = X.T if tall else X
    Y = Y / (Y.norm() + eps) if eps_added else Y.div(Y.norm().clamp(min=eps))
    for _ in range(steps):
        gram = Y @ Y.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        Y = torch.addmm(Y, update, Y, beta=a)
    return Y.T if tall else Y


@contextlib.contextmanager
def replaced(module: Any, **attributes: Any) -> Iterator[None]:
    """Run with ``module``'s ``attributes`` replaced (or added); restored (or removed) afterwards."""
    missing = object()
    saved = {name: getattr(module, name, missing) for name in attributes}
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(module, name)
            else:
                setattr(module, name, value)


def _torch_muon() -> types.ModuleType:
    """``torch.optim._muon`` (torch.optim.Muon and its Newton-Schulz), imported as a peer is: torch before 2.9 has no
    Muon (this package supports torch >= 2.4), and the Muon rows are then "not run"."""
    return peers._import("torch", "optim._muon")


def _muon_ns_in_run_dtype() -> contextlib.AbstractContextManager:
    """torch.optim.Muon's Newton-Schulz (``torch.optim._muon._zeropower_via_newtonschulz``, bfloat16) replaced by the
    same iteration in the gradient's dtype: float64 in the float64 run."""
    return replaced(_torch_muon(), _zeropower_via_newtonschulz=newton_schulz)


def muon_ref() -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    muon = _torch_muon().Muon
    return lambda params: muon(params, lr=LR, weight_decay=WD, momentum=MUON_MOMENTUM)


def muon_ours(projected: bool, **options: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    """Ours over torch.optim.Muon's groups (``from_optimizer``): every weight projected, or none."""

    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        base = torch.optim.Muon(params, lr=LR, weight_decay=WD, momentum=MUON_MOMENTUM)
        return ProjectedOptimizer.from_optimizer(base, lambda p: projected, **options)

    return make


class _OneProcess:
    """``torch.distributed`` for a world of one: all_gather copies the tensor into each slot that is not itself."""

    @staticmethod
    def get_world_size() -> int:
        return 1

    @staticmethod
    def get_rank() -> int:
        return 0

    @staticmethod
    def all_gather(tensor_list: list[Tensor], tensor: Tensor) -> None:
        for slot in tensor_list:
            if slot is not tensor:
                slot.copy_(tensor)


def _import_trion() -> types.ModuleType:
    """ista-daslab-optimizers' ``fft_low_rank.trion``, imported as tests/parity/test_trion_parity.py does: without
    the package's ``__init__`` (``peers._import``), with ``wandb`` (imported, never used) and
    ``utils.newton_schulz_triton`` (needs triton; only ``ns_type="triton"`` calls it) stubbed for the import only."""
    name = "ista_daslab_optimizers.fft_low_rank.trion"
    if name in sys.modules:
        return sys.modules[name]
    stubs: dict[str, types.ModuleType] = {}
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        stubs["wandb"] = types.ModuleType("wandb")
    triton_name = "ista_daslab_optimizers.utils.newton_schulz_triton"
    if triton_name not in sys.modules:
        stubs[triton_name] = types.ModuleType(triton_name)
        stubs[triton_name].newton_schulz_triton = None  # type: ignore[attr-defined]
    sys.modules.update(stubs)
    try:
        return peers._import("ista_daslab_optimizers", "fft_low_rank.trion")
    finally:
        for stub in stubs:
            sys.modules.pop(stub, None)


@contextlib.contextmanager
def trion_runnable(mod: types.ModuleType, dtype: torch.dtype, makhoul: bool, eps_added: bool) -> Iterator[None]:
    """What the reference Trion needs to run here, in ``dtype`` (see the module docstring): an empty ``GlobalCache``
    filled at (d, rank) with what its uncached path would store (Q = its ``dct3_matrix(d)``, computed in float64 as
    ``dct_basis(d).T``; Q^T for Makhoul), ``get_dct_matrix`` as a read of that cache, ``torch.distributed`` as a
    world of one, its Newton-Schulz in ``dtype`` (not bfloat16; torch's form unless ``eps_added``) and torch's
    default dtype set to ``dtype`` (its Makhoul twiddles follow it). All restored afterwards."""
    cache = mod.GlobalCache
    d = min(SHAPES[0])
    Q = dct_basis(d, dtype=dtype).T.contiguous()

    def get_dct_matrix(size: int, key: tuple[int, int], device: Any, dtype: torch.dtype) -> Tensor:
        return cache.get(category="ortho", key=key)

    def zeropower(G: Tensor, steps: int) -> Tensor:
        return newton_schulz(G, steps=steps, eps_added=eps_added)

    default = torch.get_default_dtype()
    with replaced(cache, _instance=None):
        cache.add(category="ortho", key=(d, TRION_RANK), item=Q.T if makhoul else Q)
        with replaced(mod, get_dct_matrix=get_dct_matrix, dist=_OneProcess, zeropower_via_newtonschulz5=zeropower):
            torch.set_default_dtype(dtype)
            try:
                yield
            finally:
                torch.set_default_dtype(default)


def _trion_weights(params: list[Tensor], tall_square: bool) -> list[Tensor]:
    """The weights the optimizer trains: all, or (``tall_square``) all but the wide one, which then stays at its
    initial value on both sides."""
    return [p for p in params if not (tall_square and is_left(p.shape))]


def trion_reference(
    makhoul: bool, eps_added: bool = False, tall_square: bool = False
) -> Callable[[torch.dtype, int], list[list[Tensor]]]:
    def run(dtype: torch.dtype, steps: int) -> list[list[Tensor]]:
        mod = _import_trion()

        def make(params: list[Tensor]) -> torch.optim.Optimizer:
            group = {
                "params": _trion_weights(params, tall_square), "use_muon": True, "rank": TRION_RANK,
                "ns_type": "torch", "use_makhoul": makhoul, "lr": LR, "momentum": MUON_MOMENTUM,
                "weight_decay": WD, "scaling_type": TRION_SCALING,
            }  # fmt: skip
            return mod.Trion([group])

        with trion_runnable(mod, dtype, makhoul, eps_added):
            return trajectory(make, dtype, steps)

    return run


def trion_ours(scorer: str, tall_square: bool = False) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        base = torch.optim.Muon(_trion_weights(params, tall_square), lr=LR, weight_decay=WD, momentum=MUON_MOMENTUM)
        return ProjectedOptimizer.from_optimizer(
            base, lambda p: True, rank=TRION_RANK, projected_rule="trion", ns_dtype="float64", dct_scorer=scorer,
            trion_scaling=TRION_SCALING,
        )  # fmt: skip

    return make


# -- the parameter rows ---------------------------------------------------------------------------------------------


@dataclass
class ParamCase:
    name: str
    reference: str
    ours: str
    run_reference: Callable[[torch.dtype, int], list[list[Tensor]]]
    run_ours: Callable[[torch.dtype, int], list[list[Tensor]]]
    deviation: str | None = None  # set: a documented difference is expected, and this says which


def _traj(make_factory: Callable[[], Any], before: Hook | None = None) -> Callable[[torch.dtype, int], Any]:
    """Ours: a runner that builds its optimizer factory when called (an error is then the row's, not the script's)."""
    return lambda dtype, steps: trajectory(make_factory(), dtype, steps, before=before)


def param_cases() -> list[ParamCase]:
    hf = dict(projector="svd", residual="none", adam_form="hf")
    galore64 = partial(_svd_in_float64, "galore_torch", "galore_projector")
    fira64 = partial(_svd_in_float64, "fira", "gradient_projection")
    dct = dict(projector="dct", dct_norm="l1")
    full = min(SHAPES[0])
    muon_full = dict(rank=full, projector="svd", moments="rotate", ns_dtype="float64", update_gap=GAP)

    def trion_keys(scorer: str) -> str:
        return f"trion, dct_scorer {scorer}, rank {TRION_RANK}, trion_scaling {TRION_SCALING}, ns_dtype float64"

    return [
        ParamCase(
            "galore", "galore-torch GaLoreAdamW, scale 0.25 (SVD in float64*)", "svd, residual none, adam_form hf",
            _reference(lambda: galore_ref(0.25), galore64), _traj(lambda: _ours(scale=0.25, **hf)),
        ),
        ParamCase(
            "galore (its SVD)", "galore-torch GaLoreAdamW, scale 0.25 (as installed)",
            "svd, residual none, adam_form hf",
            _reference(lambda: galore_ref(0.25)), _traj(lambda: _ours(scale=0.25, **hf)),
            deviation="galore-torch (and fira) take the SVD of a float64 gradient in float32, so its float64 run "
            "refreshes with float32 singular vectors",
        ),
        ParamCase(
            "galore (torch form)", "galore-torch GaLoreAdamW, scale 0.25 (SVD in float64*)", "svd, adam_form torch",
            _reference(lambda: galore_ref(0.25), galore64), _traj(lambda: _ours(scale=0.25, projector="svd")),
            deviation="ours' default adam_form='torch' is torch.optim.AdamW's form: eps added after the bias "
            "correction of sqrt(v), decay before the update; galore-torch copies transformers' AdamW",
        ),
        ParamCase(
            "fira", "fira FiraAdamW, alpha 0.5 (SVD in float64*)", "residual fira, scale 0.5",
            _reference(lambda: fira_ref(0.5), fira64), _traj(lambda: _ours(scale=0.5, residual="fira")),
        ),
        ParamCase(
            "apollo", "apollo-torch APOLLOAdamW, random, channel, scale 4", "residual apollo, scale 4",
            _reference(lambda: apollo_ref(RANK, 4.0, "channel")), _traj(lambda: _ours(scale=4.0, residual="apollo")),
        ),
        ParamCase(
            "apollo-mini", "apollo-torch APOLLOAdamW, rank 1, tensor, scale 128",
            "residual apollo, rank 1, apollo_scale_type tensor, scale 128",
            _reference(lambda: apollo_ref(1, 128.0, "tensor")),
            _traj(lambda: _ours(rank=1, scale=128.0, residual="apollo", apollo_scale_type="tensor")),
        ),
        ParamCase(
            "dct-adamw (keep)", "DCTAdamW matmul, ell_norm 1, DCT-II Q in float64, topk sorted*",
            "dct, dct_norm l1, refresh lag 1",
            _reference(lambda: dct_adamw_ref("matmul", rotate=False, exact_basis=True), _sorted_topk),
            _traj(lambda: _ours(**dct), before=dct_lagged_schedule),
        ),
        ParamCase(
            "dct-adamw (default basis)", "DCTAdamW matmul, ell_norm 1, its DCT-III Q in float64, topk sorted*",
            "dct, dct_norm l1, dct_type 3, refresh lag 1",
            _reference(lambda: dct_adamw_ref("matmul", rotate=False, exact_basis=True, dct_type=3), _sorted_topk),
            _traj(lambda: _ours(dct_type=3, **dct), before=dct_lagged_schedule),
        ),
        ParamCase(
            "dct-adamw (keep, its topk)", "DCTAdamW matmul, ell_norm 1, DCT-II Q in float64",
            "dct, dct_norm l1, refresh lag 1",
            _reference(lambda: dct_adamw_ref("matmul", rotate=False, exact_basis=True)),
            _traj(lambda: _ours(**dct), before=dct_lagged_schedule),
            deviation="the same column sets in another slot order: ours orders the chosen columns best first, "
            "DCTAdamW keeps torch.topk(sorted=False)'s order; with the moments kept (not rotated) at a refresh, slot "
            "j's moments then continue on different columns from the first refresh on",
        ),
        ParamCase(
            "dct-adamw (rotate)", "DCTAdamW matmul, ell_norm 1, DCT-II Q in float64, rotate_subspace, matmul fixed*",
            "dct, dct_norm l1, moments rotate, refresh lag 1",
            _reference(lambda: dct_adamw_ref("matmul", rotate=True, exact_basis=True), _unaliased_matmul),
            _traj(lambda: _ours(moments="rotate", **dct), before=dct_lagged_schedule),
        ),
        ParamCase(
            "dct-adamw (rotate, its matmul)", "DCTAdamW matmul, ell_norm 1, DCT-II Q in float64, rotate_subspace",
            "dct, dct_norm l1, moments rotate, refresh lag 1",
            _reference(lambda: dct_adamw_ref("matmul", rotate=True, exact_basis=True)),
            _traj(lambda: _ours(moments="rotate", **dct), before=dct_lagged_schedule),
            deviation="a bug in the reference: FFTLowRankProjector.rotate_subspace runs torch.matmul(w, R, out=w), "
            "whose output aliases its input; some CPU kernels then rotate the moments wrongly at every refresh after "
            "the first (1.2e-1 on the 2026-12-01 machine), others happen to get it right (AVX-512 MKL: at float64)",
        ),
        ParamCase(
            "dct-adamw (makhoul)", "DCTAdamW makhoul (always l1), its own Q, topk sorted*",
            "dct, dct_norm l1, refresh lag 1",
            _reference(lambda: dct_adamw_ref("makhoul", rotate=False, exact_basis=False), _sorted_topk),
            _traj(lambda: _ours(**dct), before=dct_lagged_schedule),
            deviation="its dct3_matrix and its Makhoul twiddles are computed in float32 arithmetic, so its float64 "
            "run projects with a DCT basis rounded to float32",
        ),
        ParamCase(
            "sophia", f"sophia-opt SophiaG, rho {SOPHIA_RHO}, bs {SOPHIA_BS}, on Z = W B",
            f"lazy_hessian, hessian_bias_correction False, rho {SOPHIA_RHO * SOPHIA_BS:g}, rank 16 dct, rotate",
            sophia_reference, sophia_ours,
        ),
        ParamCase(
            "muon (dense)", "torch.optim.Muon (as installed: Newton-Schulz in bfloat16)", "muon, nothing projected",
            _reference(muon_ref), _traj(lambda: muon_ours(False)),
        ),
        ParamCase(
            "muon (full basis)", "torch.optim.Muon, Newton-Schulz in float64*",
            f"muon, rank {full} svd, moments rotate, ns_dtype float64",
            _reference(muon_ref, _muon_ns_in_run_dtype),
            _traj(lambda: muon_ours(True, **muon_full)),
        ),
        ParamCase(
            "trion (matmul)", f"ista-daslab Trion, rank {TRION_RANK}, {TRION_SCALING}, runnable, NS in float64*",
            trion_keys("matmul"), trion_reference(makhoul=False), _traj(lambda: trion_ours("matmul")),
        ),
        ParamCase(
            "trion (matmul, its NS eps)",
            f"ista-daslab Trion, rank {TRION_RANK}, {TRION_SCALING}, runnable, NS in float64 with its eps*",
            trion_keys("matmul"), trion_reference(makhoul=False, eps_added=True), _traj(lambda: trion_ours("matmul")),
            deviation="Trion's Newton-Schulz divides by ||X||_F + 1e-7, torch's (ours) by max(||X||_F, 1e-7): a "
            "relative 1e-7 / ||X||_F apart at every step",
        ),
        ParamCase(
            "trion (makhoul)",
            f"ista-daslab Trion use_makhoul, rank {TRION_RANK}, {TRION_SCALING}, runnable, NS in float64*",
            trion_keys("fft"), trion_reference(makhoul=True), _traj(lambda: trion_ours("fft")),
            deviation="for a wide weight Trion scores with Q^T's columns (the DCT-II of M's columns) but maps back, "
            "in its error feedback and its update, through Q's (it caches Q^T for Makhoul and reads rows of it); ours "
            "maps back through the scoring columns (lightning_lowrank/optim/update/trion.py)",
        ),
        ParamCase(
            "trion (makhoul, tall+square)",
            f"ista-daslab Trion use_makhoul, rank {TRION_RANK}, {TRION_SCALING}, runnable, NS in float64*; "
            "wide weight frozen",
            trion_keys("fft") + "; wide weight frozen",
            trion_reference(makhoul=True, tall_square=True), _traj(lambda: trion_ours("fft", tall_square=True)),
        ),
    ]  # fmt: skip


def _reason(err: BaseException) -> str:
    if isinstance(err, PeerUnavailable):
        return str(err)
    return f"failed: {type(err).__name__}: {err}"


def run_param_case(case: ParamCase, steps: int) -> dict[str, Any]:
    row: dict[str, Any] = {"method": case.name, "reference": case.reference, "ours": case.ours}
    try:
        ref64 = case.run_reference(torch.float64, steps)
    except Exception as err:  # noqa: BLE001 - a reference that cannot run is a row, never a crash
        return {**row, "status": "not run", "reason": _reason(err)}
    try:
        ours64 = case.run_ours(torch.float64, steps)
    except Exception as err:  # noqa: BLE001
        return {**row, "status": "not run", "reason": "ours " + _reason(err), "trace": traceback.format_exc()}
    per_step = [relative_difference(a, b) for a, b in zip(ours64, ref64)]
    try:
        floor = max_over_steps(case.run_reference(torch.float32, steps), ref64)
    except Exception as err:  # noqa: BLE001
        floor, row["floor_error"] = None, _reason(err)
    diff = max(per_step)
    at64 = diff <= AT_FLOAT64 and (floor is None or diff <= FLOOR_SHARE * floor)
    if at64:
        verdict = "at float64"
    elif case.deviation:
        verdict = "documented deviation"
    elif floor is not None and diff <= floor:
        verdict = "within float32 floor"
    else:
        verdict = "differs"
    return {
        **row,
        "status": "ok",
        "max_rel_diff": diff,
        "float32_floor": floor,
        "verdict": verdict,
        "per_step": per_step,
        "note": case.deviation,
    }


# -- Q-GaLore's adaptive refresh schedule ---------------------------------------------------------------------------


def gradient_stream(kind: str, shape: tuple[int, int], steps: int) -> list[Tensor]:
    """float64 gradients: ``stable`` (a fixed rank-2 signal plus 1% noise), ``noisy`` (fresh Gaussian every step),
    ``drifting`` (a rank-2 signal whose directions rotate slowly, plus noise), ``sign-flip`` (the stable signal with
    a random sign every step, which flips the SVD's leading vector and so Q-GaLore's signed cosine)."""
    gen = torch.Generator().manual_seed({"stable": 1, "noisy": 2, "drifting": 3, "sign-flip": 4}[kind])
    m, n = shape

    def randn(*s: int) -> Tensor:
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    U, V = torch.linalg.qr(randn(m, 2)).Q, torch.linalg.qr(randn(n, 2)).Q
    U2, V2 = torch.linalg.qr(randn(m, 2)).Q, torch.linalg.qr(randn(n, 2)).Q
    S = torch.diag(torch.tensor([3.0, 1.5], dtype=torch.float64))
    signs = torch.randint(0, 2, (steps,), generator=gen) * 2 - 1
    stream = []
    for t in range(steps):
        if kind == "noisy":
            stream.append(randn(m, n))
            continue
        if kind == "drifting":
            a = t * math.pi / (2 * steps)
            Ut, Vt = math.cos(a) * U + math.sin(a) * U2, math.cos(a) * V + math.sin(a) * V2
        else:
            Ut, Vt = U, V
        G = Ut @ S @ Vt.T + 0.01 * randn(m, n) * (10 if kind == "drifting" else 1)
        stream.append(G * float(signs[t]) if kind == "sign-flip" else G)
    return stream


def qgalore_refresh_steps(stream: list[Tensor]) -> tuple[list[int], int]:
    mod = peers._import("q_galore_torch", "q_galore_projector")
    proj = mod.GaLoreProjector(STREAM_RANK, update_proj_gap=GAP, proj_type="std", quant=False, **QGALORE)
    steps = []
    for t, G in enumerate(stream):
        before = proj.svd_count
        proj.project(G, t)
        if proj.svd_count > before:
            steps.append(t)
    return steps, proj.update_proj_gap


def ours_refresh_steps(stream: list[Tensor]) -> tuple[list[int], int]:
    """Ours under RefreshSchedule(rule="qgalore"), driven as SubspaceRefresh drives it (lr 0: the weight stays)."""
    w = torch.nn.Parameter(torch.zeros(stream[0].shape, dtype=stream[0].dtype))
    opt = ProjectedOptimizer(
        [w], lr=0.0, weight_decay=0.0, rank=STREAM_RANK, projector="svd", update_gap=GAP, svd_signs="none"
    )
    opt.external_schedule()
    schedule = RefreshSchedule(RefreshPolicy(every=GAP, adaptive=True, rule="qgalore", **QGALORE))
    steps = []
    for G in stream:
        w.grad = G
        if "step" in opt.state[w] and schedule.is_due("w", int(opt.state[w]["step"])):
            opt.request_refresh([w])
        opt.step()
        for info in opt.last_refreshes.values():
            schedule.record("w", info.step, info.leading_cosine, info.seconds)
            steps.append(info.step)
    return steps, schedule.layer("w").gap


def run_schedule_rows(steps: int) -> list[dict[str, Any]]:
    rows = []
    for kind in ("stable", "noisy", "drifting", "sign-flip"):
        for label, shape in (("tall", (24, 16)), ("wide", (16, 24))):
            row: dict[str, Any] = {"stream": kind, "shape": label, "steps": steps}
            stream = gradient_stream(kind, shape, steps)
            try:
                theirs, their_gap = qgalore_refresh_steps(stream)
            except Exception as err:  # noqa: BLE001
                rows.append({**row, "status": "not run", "reason": _reason(err)})
                continue
            try:
                ours, our_gap = ours_refresh_steps(stream)
            except Exception as err:  # noqa: BLE001
                rows.append({**row, "status": "not run", "reason": "ours " + _reason(err)})
                continue
            mismatches = sorted(set(theirs) ^ set(ours))
            rows.append(
                {
                    **row,
                    "status": "ok",
                    "refreshes_ref": len(theirs),
                    "refreshes_ours": len(ours),
                    "final_gap_ref": their_gap,
                    "final_gap_ours": our_gap,
                    "mismatching_steps": len(mismatches),
                    "first_mismatches": mismatches[:8],
                }
            )
    return rows


# -- DCT column selection -------------------------------------------------------------------------------------------


def dct_gradient(shape: tuple[int, int], seed: int) -> Tensor:
    """Gaussian entries with heavy-tailed row and column scales, so the l1 and l2 rankings often disagree."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.rand(shape[0], 1, generator=gen, dtype=torch.float64).pow(3)
    cols = torch.rand(1, shape[1], generator=gen, dtype=torch.float64).pow(3)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * (rows + cols)


# (row name, its sim_type, its ell_norm, its Q: "dct2" = dct3_matrix(n).T, "dct3" = dct3_matrix(n), deviation).
# Ours scores with dct_type=2 against a DCT-II Q and dct_type=3 (matmul scorer only) against its default Q.
DCT_REFERENCES = [
    ("makhoul (l1)", "makhoul", 1, "dct2", None),
    ("matmul, DCT-II Q, ell_norm 1", "matmul", 1, "dct2", None),
    ("matmul, DCT-II Q, ell_norm 2", "matmul", 2, "dct2", None),
    ("matmul, its default Q (DCT-III columns), ell_norm 1", "matmul", 1, "dct3", None),
    ("matmul, its default Q (DCT-III columns), ell_norm 2", "matmul", 2, "dct3", None),
]


def their_dct_indices(G: Tensor, sim_type: str, ell_norm: int, basis: str) -> list[int]:
    projector = peers._import("ista_daslab_optimizers", "fft_low_rank.fft_projector")
    dct = peers._import("ista_daslab_optimizers", "utils.dct")
    Q = dct.dct3_matrix(min(G.shape), G.dtype, G.device)
    Q = Q.t() if basis == "dct2" else Q
    lrp = projector.FFTLowRankProjector(G, rank=DCT_RANK, proj="dct", rotate_subspace=False, sim_type=sim_type,
                                        ell_norm=ell_norm)  # fmt: skip
    lrp.inc_step()
    lrp.change_subspace(Q, G.clone(), col_norms=None)
    return sorted(lrp.indices_crt.tolist())


def our_dct_indices(G: Tensor, norm: str, scorer: str, dct_type: int) -> list[int]:
    w = torch.nn.Parameter(torch.zeros_like(G))
    opt = ProjectedOptimizer([w], lr=0.0, weight_decay=0.0, rank=DCT_RANK, projector="dct", dct_norm=norm,
                             dct_scorer=scorer, dct_type=dct_type)  # fmt: skip
    w.grad = G
    opt.step()
    return sorted(opt.state[w]["proj_idx"].tolist())


def run_dct_rows(count: int) -> list[dict[str, Any]]:
    gradients_by_shape = {label: [dct_gradient(s, seed) for seed in range(count)] for label, s in DCT_SHAPES.items()}
    ours_cache: dict[tuple[str, str], list[list[int]]] = {}
    rows = []
    for name, sim_type, ell_norm, basis, deviation in DCT_REFERENCES:
        norm = {1: "l1", 2: "l2"}[ell_norm]
        dct_type = 2 if basis == "dct2" else 3
        for scorer in ("matmul", "fft") if dct_type == 2 else ("matmul",):
            row: dict[str, Any] = {
                "reference": name,
                "ours": f"dct_norm {norm}, dct_scorer {scorer}, dct_type {dct_type}",
            }
            try:
                theirs = {
                    label: [their_dct_indices(G, sim_type, ell_norm, basis) for G in grads]
                    for label, grads in gradients_by_shape.items()
                }
            except Exception as err:  # noqa: BLE001
                rows.append({**row, "status": "not run", "reason": _reason(err)})
                continue
            try:
                ours = {}
                for label, grads in gradients_by_shape.items():
                    key = (label, f"{norm}/{scorer}/{dct_type}")
                    if key not in ours_cache:
                        ours_cache[key] = [our_dct_indices(G, norm, scorer, dct_type) for G in grads]
                    ours[label] = ours_cache[key]
            except Exception as err:  # noqa: BLE001
                rows.append({**row, "status": "not run", "reason": "ours " + _reason(err)})
                continue
            per_shape = {label: sum(a != b for a, b in zip(theirs[label], ours[label])) for label in theirs}
            rows.append(
                {
                    **row,
                    "status": "ok",
                    "gradients": count * len(DCT_SHAPES),
                    "mismatching_sets": sum(per_shape.values()),
                    "per_shape": per_shape,
                    "note": deviation,
                }
            )
    return rows


# -- output ---------------------------------------------------------------------------------------------------------


def _sci(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def format_tables(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"Parameters, {cfg['steps']} steps in float64 (refresh every {cfg['gap']}, lr {cfg['lr']}, wd "
        f"{cfg['weight_decay']}, eps {cfg['eps']}): max over steps and weights of ||W_ours - W_ref||_F / ||W_ref||_F. "
        f'Float32 floor: the reference in float32 against itself in float64. "at float64": <= {AT_FLOAT64:g} and '
        f"<= {FLOOR_SHARE:g} x the floor.",
        "",
        "| method | reference | ours | max rel. diff (float64) | float32 floor | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["parameters"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['reference']} | {r['ours']} | not run: {r['reason']} | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['reference']} | {r['ours']} | {_sci(r['max_rel_diff'])} | "
            f"{_sci(r['float32_floor'])} | {r['verdict']} |"
        )
    notes = [f"- {r['method']}: {r['note']}" for r in result["parameters"] if r.get("note")]
    if notes:
        lines += ["", *notes]
    lines += ["", f"* {PATCH_NOTE}"]
    lines += [
        "",
        f"Q-GaLore's adaptive refresh (cos_threshold {QGALORE['cos_threshold']}, gamma_proj {QGALORE['gamma_proj']}, "
        f"queue_size {QGALORE['queue_size']}, start gap {GAP}, rank {STREAM_RANK}): steps on which exactly one of the "
        "two refreshes.",
        "",
        "| stream | weight | steps | refreshes (ref / ours) | final gap (ref / ours) | mismatching steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["schedule"]:
        if r["status"] != "ok":
            lines.append(f"| {r['stream']} | {r['shape']} | {r['steps']} | not run: {r['reason']} | | |")
            continue
        lines.append(
            f"| {r['stream']} | {r['shape']} | {r['steps']} | {r['refreshes_ref']} / {r['refreshes_ours']} | "
            f"{r['final_gap_ref']} / {r['final_gap_ours']} | {r['mismatching_steps']} |"
        )
    lines += [
        "",
        f"DCT column selection (rank {DCT_RANK}; shapes {', '.join(f'{k} {m}x{n}' for k, (m, n) in DCT_SHAPES.items())}"
        "): index sets that differ between ista-daslab-optimizers' FFTLowRankProjector and ours.",
        "",
        "| reference | ours | gradients | mismatching sets |",
        "|---|---|---|---|",
    ]
    for r in result["dct_indices"]:
        if r["status"] != "ok":
            lines.append(f"| {r['reference']} | {r['ours']} | not run: {r['reason']} | |")
            continue
        suffix = " (documented deviation)" if r.get("note") else ""
        lines.append(f"| {r['reference']} | {r['ours']} | {r['gradients']} | {r['mismatching_sets']}{suffix} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 steps, shorter streams, fewer DCT gradients")
    parser.add_argument("--only", nargs="+", choices=("parameters", "schedule", "dct"), default=None)
    parser.add_argument("--json", type=Path, default=RESULTS / "parity.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "parity.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    parts = set(args.only or ("parameters", "schedule", "dct"))
    steps = QUICK_STEPS if args.quick else STEPS
    stream_steps = QUICK_STREAM_STEPS if args.quick else STREAM_STEPS
    count = QUICK_DCT_GRADIENTS if args.quick else DCT_GRADIENTS
    result: dict[str, Any] = {
        "machine": peers.machine_info(PEER_PACKAGES),
        "config": {
            "steps": steps,
            "gap": GAP,
            "rank": RANK,
            "lr": LR,
            "weight_decay": WD,
            "eps": EPS,
            "betas": BETAS,
            "shapes": SHAPES,
            "at_float64": AT_FLOAT64,
            "stream_steps": stream_steps,
            "dct_gradients_per_shape": count,
        },
        "parameters": [run_param_case(c, steps) for c in param_cases()] if "parameters" in parts else [],
        "schedule": run_schedule_rows(stream_steps) if "schedule" in parts else [],
        "dct_indices": run_dct_rows(count) if "dct" in parts else [],
    }
    table = format_tables(result)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(table + "\n")
    print(f"wrote {args.json} and {args.markdown}")
    return result


if __name__ == "__main__":
    main()
