"""The subspace families behind ``projector=``: how a layer's P is chosen, stored and rebuilt.

Every projector has the same three methods and keeps nothing per layer itself: what a layer needs lives in
the optimizer's ``state[p]`` under the keys its class declares (``STATE_KEYS``; tensors only), so it checkpoints,
loads with ``weights_only=True`` and can be broadcast between DDP ranks.

* ``refresh``: choose a new subspace from the current gradient (at the schedule's refresh steps).
* ``matrix``: the current P (d x r) rebuilt from the stored keys, d the projected side (``LayerContext.dim``).
* ``after_update``: work done every step (only online PCA has any).

P is built and kept in the layer's state dtype (``LayerContext.dtype``: float32 for bf16/fp16 weights by default, see
``storage.state_dtype``), whatever the gradient's dtype; decompositions of a half-precision gradient run in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.projection.bases import (
    apollo_next_seed,
    dct_columns,
    dct_select,
    derive_seed,
    gaussian_projection,
    is_left,
    online_pca_gradient,
    orthonormalize,
    random_orthonormal,
    randomized_svd_projection,
    seeded_generator,
    svd_projection,
    top_indices,
)
from lightning_lowrank.optim.projection.dct_fft import dct_scores_fft
from lightning_lowrank.optim.state.host_ints import read_int
from lightning_lowrank.optim.state.quantize import dequantize, quantize

# Where ``store_matrix`` keeps P: as it is, or under ``projector_bits`` as its codes, scale and zero.
MATRIX_KEYS = ("proj", "proj_codes", "proj_scale", "proj_zero")
MATRIX_STATE = {"proj": "projection"}  # the STATE_KEYS of a projector that keeps P itself


@dataclass
class LayerContext:
    """What a projector may know about the layer it works on."""

    index: int  # position of the weight among the optimizer's parameters: seeds, refresh sharding
    step: int  # the layer's completed updates (refreshes happen before the update of this step)
    rank: int  # effective rank, <= min(m, n)
    group: dict[str, Any]
    basis: Any  # callable (size, dtype, device) -> the optimizer's shared DCT basis
    dtype: torch.dtype | None = None  # P's dtype, the layer's state dtype (``storage.state_dtype``); None: the weight's
    shard: tuple[int, int, Any] | None = None  # DDP: (rank, world size, process group) work is split over (Trion)

    def dtype_for(self, param: Tensor) -> torch.dtype:
        return param.dtype if self.dtype is None else self.dtype

    @property
    def side(self) -> str:
        """Which side P multiplies G from (``projection.is_left``): the group's ``side`` option."""
        return self.group.get("side", "auto")

    def dim(self, param: Tensor) -> int:
        """d, the rows of this layer's P (``projection.projected_dim``: m on the left, n on the right)."""
        return param.shape[0] if is_left(param.shape, self.group.get("side", "auto")) else param.shape[1]

    def generator(self, device: torch.device, salt: int = 0) -> torch.Generator:
        """A generator on ``device`` seeded by (seed, layer, step, salt): same draws on every rank and after resume
        (on one device type: ``projection.seeded_generator``)."""
        return seeded_generator(derive_seed(self.group["seed"], self.index, self.step, salt), device)


def store_matrix(state: dict[str, Tensor], P: Tensor, ctx: LayerContext, stochastic: bool = False) -> None:
    """Keep P in ``state``: as is, or group-wise quantized to ``projector_bits`` (Q-GaLore's INT8/INT4)."""
    for key in MATRIX_KEYS:
        state.pop(key, None)
    bits = ctx.group["projector_bits"]
    if bits is None:
        state["proj"] = P
        return
    gen = ctx.generator(P.device, salt=1) if stochastic else None  # the noise is drawn where P is
    q = quantize(P, bits, ctx.group["proj_group_size"], stochastic=stochastic, generator=gen)
    state["proj_codes"], state["proj_scale"], state["proj_zero"] = q["codes"], q["scale"], q["zero"]


def load_matrix(param: Tensor, state: dict[str, Tensor], ctx: LayerContext) -> Tensor:
    if "proj" in state:
        return state["proj"]
    q = {"codes": state["proj_codes"], "scale": state["proj_scale"], "zero": state["proj_zero"]}
    return dequantize(q, (ctx.dim(param), ctx.rank), ctx.dtype_for(param))


def decomposed(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """The gradient in the dtype a decomposition for a P of ``dtype`` runs in: float32, or float64 when either is.

    A bf16 gradient becomes the float32 copy ``svd_projection`` would make of it anyway (so a bf16 run decomposes
    as before); a float32 or float64 gradient with P in its own dtype is returned as it is (bit for bit unchanged)."""
    return grad.to(torch.promote_types(torch.promote_types(grad.dtype, dtype), torch.float32))


class Projector:
    name = ""
    # The keys ``refresh``/``after_update`` keep in ``state[p]``, with their kind (``state_layout``: the memory
    # report's "projection"). A projector that keeps P itself declares ``MATRIX_STATE``: ``store_matrix`` keeps it
    # quantized under ``projector_bits`` (``projector_keys``). Nothing else names them.
    STATE_KEYS: dict[str, str] = {}

    def refresh(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], ctx: LayerContext) -> None:
        raise NotImplementedError

    def matrix(self, param: Tensor, state: dict[str, Tensor], ctx: LayerContext) -> Tensor:
        return load_matrix(param, state, ctx)

    def after_update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], ctx: LayerContext) -> None:
        """Per-step work besides the refresh; most projectors have none."""


class SVDProjector(Projector):
    """GaLore: the top-r singular vectors of the gradient. Exact, and the most expensive refresh."""

    name = "svd"
    STATE_KEYS = MATRIX_STATE  # P, or its codes, scale and zero under projector_bits

    def refresh(self, param, grad, state, ctx):
        dtype, signs = ctx.dtype_for(param), ctx.group["svd_signs"]
        store_matrix(state, svd_projection(decomposed(grad, dtype), ctx.rank, ctx.side, signs).to(dtype), ctx)


class RandomizedSVDProjector(Projector):
    """Randomized SVD: near-SVD subspaces for the cost of a few (d x k) @ (k x r) products."""

    name = "rsvd"
    STATE_KEYS = MATRIX_STATE  # P, or its codes, scale and zero under projector_bits

    def refresh(self, param, grad, state, ctx):
        group, dtype = ctx.group, ctx.dtype_for(param)
        work = decomposed(grad, dtype)
        oversample, niter = group["rsvd_oversample"], group["rsvd_niter"]
        generator, signs = ctx.generator(work.device), group["svd_signs"]
        P = randomized_svd_projection(work, ctx.rank, oversample, niter, generator, ctx.side, signs)
        store_matrix(state, P.to(dtype), ctx)


class DCTProjector(Projector):
    """SVD-free: r columns of a fixed DCT-II basis picked by the gradient's energy on them; stores r indices.

    ``dct_scorer="matmul"`` scores with the optimizer's shared d x d basis; ``"fft"`` scores with one FFT per
    row/column (Makhoul) and rebuilds the r columns from the formula, so no d x d basis is ever held.

    ``dct_norm`` is the norm of G's coefficients on a column that ranks it: ``"l2"`` (default) keeps the r columns
    that capture the most energy ||P^T G||_F^2; ``"l1"`` is DCT-AdamW's default (``ell_norm=1``).

    ``dct_type`` is which orthonormal cosine basis: 2 (default), the DCT-II vectors, which DCT-AdamW's
    ``sim_type="makhoul"`` path scores; 3, the DCT-III vectors (the transposed matrix), which its default
    ``sim_type="matmul"`` path scores, since it multiplies G by its DCT-II matrix as is. So ista-daslab-optimizers
    1.1.15's default is ``dct_norm="l1", dct_type=3`` and its makhoul path ``dct_norm="l1"`` (it ignores
    ``ell_norm``). Not reproduced: it projects (512|1024) x (3584|4096) weights on their larger side (a fix for two
    model families' shapes).
    """

    name = "dct"
    STATE_KEYS = {"proj_idx": "projection"}  # r int64 indices, also under projector_bits

    def refresh(self, param, grad, state, ctx):
        norm = ctx.group["dct_norm"]
        if ctx.group["dct_scorer"] == "fft":
            state["proj_idx"] = top_indices(dct_scores_fft(grad, is_left(param.shape, ctx.side), norm), ctx.rank)
        else:
            state["proj_idx"] = dct_select(grad, ctx.rank, self.basis(param, ctx), norm, ctx.side)

    def matrix(self, param, state, ctx):
        d, idx = ctx.dim(param), state["proj_idx"]
        if ctx.group["dct_scorer"] == "fft":
            return dct_columns(d, idx, ctx.dtype_for(param), param.device)
        return self.basis(param, ctx).index_select(1, idx)

    @staticmethod
    def basis(param: Tensor, ctx: LayerContext) -> Tensor:
        """The shared basis, columns = basis vectors: DCT-II, or its transpose (a view) for ``dct_type=3``."""
        basis = ctx.basis(ctx.dim(param), ctx.dtype_for(param), param.device)
        return basis if ctx.group["dct_type"] == 2 else basis.T


def shares_dct_basis(group: Mapping[str, Any]) -> bool:
    """Whether the group's projected layers hold the optimizer's shared d x d DCT basis (``dct_scorer="matmul"``;
    one per size and dtype, ``ProjectedOptimizer.dct_bases``), which ``"fft"`` never builds."""
    return group["projector"] == "dct" and group["dct_scorer"] == "matmul"


class RandomProjector(Projector):
    """A random orthonormal basis (GoLore/Flora style), independent of the gradient: only a seed is stored."""

    name = "random"
    STATE_KEYS = {"proj_seed": "projection"}

    def refresh(self, param, grad, state, ctx):
        seed = derive_seed(ctx.group["seed"], ctx.index, ctx.step)
        state["proj_seed"] = torch.tensor(seed, dtype=torch.int64)

    def matrix(self, param, state, ctx):
        seed = read_int(state["proj_seed"])
        return random_orthonormal(ctx.dim(param), ctx.rank, seed, ctx.dtype_for(param), param.device)


class GaussianProjector(Projector):
    """APOLLO's projection: a Gaussian N(0, 1/r) matrix, not orthonormalized, stored as a seed.

    A layer's first seed is ``seed + index + 1`` (apollo-torch numbers its parameters from 1, so ``seed=0`` gives
    its draws), and each refresh advances it with apollo-torch's ``next_seed``. Not an orthonormal basis: projecting
    back through it (residual ``none``/``frugal``/``fira``) is an unbiased sketch of the gradient, not a projection,
    and ``moments="rotate"`` is refused with it.
    """

    name = "gaussian"
    STATE_KEYS = {"proj_seed": "projection"}

    def refresh(self, param, grad, state, ctx):
        first = ctx.group["seed"] + ctx.index + 1
        seed = apollo_next_seed(read_int(state["proj_seed"])) if "proj_seed" in state else first
        state["proj_seed"] = torch.tensor(seed, dtype=torch.int64)

    def matrix(self, param, state, ctx):
        seed = read_int(state["proj_seed"])
        return gaussian_projection(param.shape, ctx.rank, seed, ctx.dtype_for(param), param.device, ctx.side)


class OnlinePCAProjector(Projector):
    """Online Subspace Descent: P starts from an SVD and then takes one SGD step per update on the online-PCA loss
    ||P P^T G_hat - G_hat||^2, so it follows the gradient's subspace without further SVDs. A scheduled refresh
    re-initialises it by SVD.

    Unlike the paper's code, each step is followed by a QR retraction back to orthonormal columns: without it a
    large ``pca_lr`` lets ||P|| grow until it overflows (the loss is quartic in P), and orthonormal columns keep
    the update's scale and the moment rotation well defined."""

    name = "online_pca"
    STATE_KEYS = MATRIX_STATE  # P, or its codes, scale and zero under projector_bits

    def refresh(self, param, grad, state, ctx):
        dtype, signs = ctx.dtype_for(param), ctx.group["svd_signs"]
        store_matrix(state, svd_projection(decomposed(grad, dtype), ctx.rank, ctx.side, signs).to(dtype), ctx)

    def after_update(self, param, grad, state, ctx):
        P = load_matrix(param, state, ctx)
        step = P - ctx.group["pca_lr"] * online_pca_gradient(P, grad, ctx.side).to(P.dtype)
        P = orthonormalize(step).to(P.dtype)  # the QR retraction
        store_matrix(state, P, ctx, stochastic=True)  # small steps would vanish under round-to-nearest


PROJECTOR_CLASSES: dict[str, type[Projector]] = {
    cls.name: cls
    for cls in (
        SVDProjector,
        RandomizedSVDProjector,
        DCTProjector,
        RandomProjector,
        GaussianProjector,
        OnlinePCAProjector,
    )
}
# Every key some projector keeps: a layer holding one has a subspace; a refresh broadcasts them.
PROJECTOR_KEYS = frozenset(MATRIX_KEYS).union(*(cls.STATE_KEYS for cls in PROJECTOR_CLASSES.values()))


def stores_matrix(projector: str) -> bool:
    """Whether the projector keeps P itself (so ``projector_bits`` applies to it), not indices or a seed."""
    return MATRIX_KEYS[0] in PROJECTOR_CLASSES[projector].STATE_KEYS


def quantized_projection(group: Mapping[str, Any]) -> bool:
    """Whether the group's projector keeps P quantized (it stores a matrix, and ``projector_bits`` is set)."""
    return group["projector_bits"] is not None and stores_matrix(group["projector"])


def projector_keys(group: Mapping[str, Any]) -> dict[str, str]:
    """The keys the group's projector keeps for a layer, with their kind: its ``STATE_KEYS``, a stored P as
    ``store_matrix`` keeps it (its codes, scale and zero under ``projector_bits``)."""
    if quantized_projection(group):
        return dict.fromkeys(MATRIX_KEYS[1:], MATRIX_STATE["proj"])
    return PROJECTOR_CLASSES[group["projector"]].STATE_KEYS


def resolve_projector(group: dict[str, Any]) -> None:
    """Give a param group with ``projector=None`` its default: APOLLO's own projection (``gaussian``) for
    ``residual="apollo"``, the DCT for Trion, GaLore's SVD otherwise."""
    if group["projector"] is None:
        trion = group.get("projected_rule") == "trion"  # Trion's columns are DCT ones
        group["projector"] = "gaussian" if group["residual"] == "apollo" else "dct" if trion else "svd"
