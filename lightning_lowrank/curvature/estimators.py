"""Curvature estimators over plain tensors: Hessian-vector products and the stochastic estimators built on them.

Everything here works from ``loss_grads = torch.autograd.grad(loss, params, create_graph=True)`` so one graph serves
many probes. Nothing touches ``param.grad`` (only ``torch.autograd.grad`` is used) and all randomness comes from the
caller's CPU ``torch.Generator``, never the global RNG, so probing does not perturb training reproducibility.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_lowrank.optim.projection.bases import is_left


def hvp(loss_grads: Sequence[Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """Hessian-vector product by double backward.

    ``loss_grads`` must come from ``autograd.grad(loss, params, create_graph=True)``. The graph is retained so the
    same gradients can be probed repeatedly. Params the gradients do not depend on (zero Hessian rows) get zeros.
    """
    if not (len(loss_grads) == len(params) == len(vectors)):
        raise ValueError("loss_grads, params and vectors must have the same length")
    outputs = [g for g in loss_grads if g.requires_grad]
    grad_outputs = [v.detach() for g, v in zip(loss_grads, vectors) if g.requires_grad]
    if not outputs:  # loss is at most linear in every param: the Hessian is zero.
        return [torch.zeros_like(p) for p in params]
    result = torch.autograd.grad(outputs, list(params), grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, result)]


def _rademacher(shape: torch.Size | tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    """±1 entries drawn on CPU (so any CPU generator works for any device), then cast to ``like``'s device/dtype."""
    z = torch.randint(0, 2, tuple(shape), generator=generator, device="cpu", dtype=torch.int8) * 2 - 1
    return z.to(device=like.device, dtype=like.dtype)


def rademacher_like(params: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Rademacher probes shaped like ``params``; drawn from ``generator`` only, never the global RNG."""
    return [_rademacher(p.shape, p, generator) for p in params]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Inner product of two vectors stored as lists of tensors (kept as a tensor in the params' dtype)."""
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _normalize(v: list[Tensor]) -> list[Tensor]:
    """Scale a list-of-tensors vector to unit norm (left alone if it is exactly zero)."""
    norm = torch.sqrt(_dot(v, v))
    if norm == 0:
        return v
    return [x / norm for x in v]


def _orthogonalize(v: list[Tensor], basis: Sequence[list[Tensor]]) -> list[Tensor]:
    """Gram-Schmidt ``v`` against orthonormal ``basis`` vectors: the deflation step of PyHessian's power iteration."""
    for u in basis:
        coeff = _dot(v, u)
        v = [x - coeff * y for x, y in zip(v, u)]
    return v


@dataclass
class HutchinsonResult:
    """Hutchinson estimates; ``layer_traces[i]`` is the sum of ``diagonal[i]`` and ``trace`` their total."""

    trace: float
    layer_traces: list[float]
    diagonal: list[Tensor]
    samples: int


def hutchinson(
    loss_grads: Sequence[Tensor], params: Sequence[Tensor], samples: int, generator: torch.Generator
) -> HutchinsonResult:
    """AdaHessian/PyHessian estimator with Rademacher probes: diag ≈ mean(v ⊙ Hv), trace ≈ mean(v·Hv).

    Per-layer traces are the per-param sums of the diagonal estimate, so layer traces add up to the trace exactly.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    acc = [torch.zeros_like(p) for p in params]
    for _ in range(samples):
        v = rademacher_like(params, generator)
        hv = hvp(loss_grads, params, v)
        for a, x, y in zip(acc, v, hv):
            a.add_(x * y)
    diagonal = [a / samples for a in acc]
    layer_traces = [float(d.sum()) for d in diagonal]
    return HutchinsonResult(trace=sum(layer_traces), layer_traces=layer_traces, diagonal=diagonal, samples=samples)


@dataclass
class EigenResult:
    """Eigenpairs sorted by |λ| descending; ``iterations`` counts HVPs over all pairs (the cost actually paid)."""

    eigenvalues: list[float]
    eigenvectors: list[list[Tensor]]
    iterations: int


def top_eigenvalues(
    loss_grads: Sequence[Tensor],
    params: Sequence[Tensor],
    k: int,
    generator: torch.Generator,
    max_iter: int = 100,
    tol: float = 1e-3,
) -> EigenResult:
    """Largest-magnitude Hessian eigenpairs by power iteration with deflation (PyHessian-style).

    Each pair is iterated in the orthogonal complement of those already found (re-orthogonalized every step so
    rounding cannot reintroduce them), stopping when the Rayleigh quotient's relative change drops below ``tol``.
    """
    total = sum(p.numel() for p in params)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    eigenvalues: list[float] = []
    eigenvectors: list[list[Tensor]] = []
    iterations = 0
    for _ in range(k):
        v = _normalize(_orthogonalize(rademacher_like(params, generator), eigenvectors))
        eig: float | None = None
        for _ in range(max_iter):
            hv = hvp(loss_grads, params, v)
            iterations += 1
            new_eig = float(_dot(hv, v))
            v = _normalize(_orthogonalize(hv, eigenvectors))
            converged = eig is not None and abs(new_eig - eig) <= tol * (abs(eig) + 1e-12)
            eig = new_eig
            if converged:
                break
        assert eig is not None
        eigenvalues.append(eig)
        eigenvectors.append(v)
    order = sorted(range(k), key=lambda i: abs(eigenvalues[i]), reverse=True)
    return EigenResult(
        eigenvalues=[eigenvalues[i] for i in order],
        eigenvectors=[eigenvectors[i] for i in order],
        iterations=iterations,
    )


def subspace_diagonal(
    loss_grads: Sequence[Tensor],
    params: Sequence[Tensor],
    bases: Sequence[Tensor | None],
    samples: int,
    generator: torch.Generator,
    sides: Sequence[str] | None = None,
) -> list[Tensor | None]:
    """Hutchinson estimate of each param's Hessian diagonal in its low-rank coordinates (shaped like P^T G or G P).

    For ``W`` (m x n) with orthonormal ``P`` projecting on the left (``sides``: each param's ``side`` option; by
    default the smaller side, ``projection.is_left``) the probe is ``v = P z`` with z (r, n) and the estimate
    ``z ⊙ (P^T Hv)``; on the right ``v = z P^T`` with z (m, r) and ``z ⊙ (Hv P)``. The expectation is the diagonal of
    the Hessian block restricted to that subspace, i.e. the curvature a projected optimizer's moments actually see.
    One joint HVP per sample serves all params; basis-less params get zero probes and ``None`` back.
    """
    if len(bases) != len(params):
        raise ValueError("bases must have one entry (or None) per param")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    left: list[bool | None] = []
    for p, basis, side in zip(params, bases, sides or ["auto"] * len(params)):
        if basis is None:
            left.append(None)
            continue
        if p.dim() != 2 or basis.dim() != 2:
            raise ValueError(f"a basis needs a 2-D param and a 2-D basis, got {tuple(p.shape)} / {tuple(basis.shape)}")
        left_side = is_left(p.shape, side)
        side = p.shape[0] if left_side else p.shape[1]
        if basis.shape[0] != side:
            raise ValueError(f"basis for param {tuple(p.shape)} must have {side} rows, got {tuple(basis.shape)}")
        left.append(left_side)

    acc: list[Tensor | None] = []
    for p, basis, lft in zip(params, bases, left):
        if basis is None:
            acc.append(None)
        else:
            shape = (basis.shape[1], p.shape[1]) if lft else (p.shape[0], basis.shape[1])
            acc.append(torch.zeros(shape, dtype=p.dtype, device=p.device))

    for _ in range(samples):
        zs: list[Tensor | None] = []
        vectors: list[Tensor] = []
        for p, basis, a in zip(params, bases, left):
            if basis is None:
                zs.append(None)
                vectors.append(torch.zeros_like(p))
                continue
            pb = basis.to(device=p.device, dtype=p.dtype)
            shape = (pb.shape[1], p.shape[1]) if a else (p.shape[0], pb.shape[1])
            z = _rademacher(shape, p, generator)
            zs.append(z)
            vectors.append(pb @ z if a else z @ pb.T)
        hv = hvp(loss_grads, params, vectors)
        for i, (basis, a, z) in enumerate(zip(bases, left, zs)):
            if basis is None or z is None:
                continue
            pb = basis.to(device=hv[i].device, dtype=hv[i].dtype)
            projected = pb.T @ hv[i] if a else hv[i] @ pb
            acc[i].add_(z * projected)  # type: ignore[union-attr]
    return [None if a is None else a / samples for a in acc]
