"""The distributed refresh pieces for a right projection of a row-sharded gradient, against single-device math on the
full gradient, 2 CPU ranks with gloo (docs/fsdp2-design.md, fact 5).

Each rank builds the same full G (m x n, seeded) and keeps its rows (``tensor_split``, as ``fully_shard`` splits
them). Compared with the single-device functions of ``lightning_lowrank.optim.projection``:

* DCT column scores: one all-reduce of the n per-column partial sums of |G_local Q|^p (p = 2, 1), then the p-th root;
  also with the FFT scorer (``dct_fft.dct_scores_fft`` per shard);
* SVD: the right singular subspace from the all-reduced Gram G^T G (n x n) and ``torch.linalg.eigh``, vs
  ``svd_projection`` (``torch.linalg.svd(G).Vh[:r].T``): column signs, max difference after aligning them, and the
  projector P P^T (sign-free); also from the all-gathered local R factors of a QR (TSQR-style) instead of the Gram;
* SVD and randomized SVD of the all-gathered gradient (``full_tensor()``), bit for bit;
* randomized SVD (niter power iterations): the sketch G^T Omega all-reduced (n x k), orthonormalization of row-sharded
  (m x k) blocks by Cholesky-QR (a k x k all-reduce), the small SVD from a k x k Gram, vs ``randomized_svd_projection``
  with the same Omega;
* Fira's limiter norm ||S||_F from a scalar all-reduce;

and prints the bytes each all-reduce moves (payload per rank). float32 and float64.

    .venv/bin/python benchmarks/fsdp2_probe/refresh_exact.py [--rows 161]
"""

from __future__ import annotations

import argparse

import spawn
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from lightning_lowrank.optim.projection.bases import dct_basis, dct_scores, randomized_svd_projection, svd_projection
from lightning_lowrank.optim.projection.dct_fft import dct_scores_fft

N, R = 64, 8
M = 161  # rows (--rows): 161 = 81 + 80, uneven as FSDP2 splits them


def all_reduce(t: torch.Tensor, log: list[int]) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t)
    log.append(t.numel() * t.element_size())
    return t


def gradient(dtype: torch.dtype) -> torch.Tensor:
    """A gradient with a decaying spectrum (as real ones have), the same on every rank."""
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(M, N, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64)).Q
    S = torch.logspace(0, -3, N, dtype=torch.float64)
    return ((U * S) @ V.T).to(dtype)


def align(P: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, int]:
    """P with each column's sign flipped to agree with ref's; and how many columns already agreed."""
    signs = torch.sign((P * ref).sum(0))
    return P * signs, int((signs > 0).sum())


def cholesky_qr(B_local: torch.Tensor, log: list[int]) -> torch.Tensor:
    """Orthonormal columns for a row-sharded (m x k) B: B R^-1 with R from the all-reduced k x k Gram."""
    C = all_reduce(B_local.T @ B_local, log)
    L = torch.linalg.cholesky(C)
    return torch.linalg.solve_triangular(L, B_local.T, upper=False).T


def probe(rank: int, rows_total: int) -> None:
    global M
    M = rows_total  # spawned processes re-import this module
    lines = []
    for dtype in (torch.float32, torch.float64):
        G = gradient(dtype)
        rows = G.tensor_split(2, dim=0)[rank]
        offset = sum(b.shape[0] for b in G.tensor_split(2, dim=0)[:rank])
        name = str(dtype)[6:]

        # DCT scores
        Q = dct_basis(N, dtype=dtype)
        for norm, p in (("l2", 2), ("l1", 1)):
            log: list[int] = []
            scores = all_reduce((rows @ Q).abs().pow(p).sum(0), log).pow(1 / p)
            ref = dct_scores(G, Q, norm)
            fft = all_reduce(dct_scores_fft(rows, False, norm).pow(p), []).pow(1 / p)
            same_top = torch.equal(scores.topk(R).indices, ref.topk(R).indices)
            lines.append(
                f"{name} dct {norm}: max rel diff {((scores - ref).abs() / ref).max():.1e} (fft scorer "
                f"{((fft - ref).abs() / ref).max():.1e}); same top-{R} indices in order: {same_top}; bytes {log}"
            )

        # SVD via the Gram
        ref = svd_projection(G, R)  # Vh[:R].T
        log = []
        gram = all_reduce(rows.T @ rows, log)
        _, vecs = torch.linalg.eigh(gram)
        P = vecs[:, -R:].flip(1)
        aligned, agreed = align(P, ref)
        both = [torch.empty_like(P) for _ in range(2)]
        dist.all_gather(both, P)
        lines.append(f"{name} svd via Gram+eigh: P bitwise identical on both ranks: {torch.equal(*both)}")
        proj_diff = (P @ P.T - ref @ ref.T).abs().max()
        lines.append(
            f"{name} svd via Gram+eigh: signs agreed {agreed}/{R}; max |P - P_svd| after aligning "
            f"{(aligned - ref).abs().max():.1e}; max |PP^T - P_svd P_svd^T| {proj_diff:.1e}; bytes {log}"
        )
        # SVD via the local R factors (all-gather, then one small SVD)
        R_local = torch.linalg.qr(rows).R
        gathered = [torch.empty_like(R_local) for _ in range(2)]
        dist.all_gather(gathered, R_local)
        P2 = torch.linalg.svd(torch.cat(gathered), full_matrices=False).Vh[:R].T
        aligned2, agreed2 = align(P2, ref)
        lines.append(
            f"{name} svd via all-gathered QR R factors: signs agreed {agreed2}/{R}; max |P - P_svd| after aligning "
            f"{(aligned2 - ref).abs().max():.1e}; bytes sent {R_local.numel() * R_local.element_size()}"
        )

        # SVD and rsvd of the all-gathered gradient (DTensor.full_tensor handles the uneven split)
        sharded = DTensor.from_local(rows, spawn.mesh(), [Shard(0)], shape=G.shape, stride=G.stride())
        full = sharded.full_tensor()
        same_svd = torch.equal(svd_projection(full, R), ref)
        gen = torch.Generator().manual_seed(7)
        same_rsvd = torch.equal(
            randomized_svd_projection(full, R, 8, 2, gen),
            randomized_svd_projection(G, R, 8, 2, torch.Generator().manual_seed(7)),
        )
        lines.append(
            f"{name} gathered G: svd P bitwise equal to single-device: {same_svd}; rsvd (niter=2): {same_rsvd}; "
            f"bytes received {(M - rows.shape[0]) * N * G.element_size()} (G is {M * N * G.element_size()})"
        )

        # randomized SVD (right side: A = G^T, n x m), niter power iterations, the same Omega
        for niter in (0, 2):
            k = R + 8
            ref_r = randomized_svd_projection(G, R, 8, niter, torch.Generator().manual_seed(7))
            omega = torch.randn(M, k, generator=torch.Generator().manual_seed(7), dtype=dtype)
            omega_rows = omega[offset : offset + rows.shape[0]]  # each rank its rows of Omega
            log = []
            Qn = torch.linalg.qr(all_reduce(rows.T @ omega_rows, log)).Q  # (n, k), replicated
            for _ in range(niter):
                B = cholesky_qr(rows @ Qn, log)  # qr(A^T Q): row-sharded (m, k)
                Qn = torch.linalg.qr(all_reduce(rows.T @ B, log)).Q  # qr(A @ .)
            Bk = rows @ Qn  # (Q^T A)^T, row-sharded (m, k)
            _, small = torch.linalg.eigh(all_reduce(Bk.T @ Bk, log))  # left singular vectors of Q^T A
            P3 = Qn @ small[:, -R:].flip(1)
            aligned3, agreed3 = align(P3, ref_r)
            lines.append(
                f"{name} rsvd niter={niter}: signs agreed {agreed3}/{R}; max |P - P_rsvd| after aligning "
                f"{(aligned3 - ref_r).abs().max():.1e}; bytes {log}"
            )

        # Fira's limiter: the Frobenius norm of the full (m x n) scaled residual
        log = []
        norm = all_reduce(rows.pow(2).sum().reshape(1), log).sqrt()
        rel = ((norm - G.norm()).abs() / G.norm()).item()
        lines.append(f"{name} Frobenius norm from a scalar all-reduce: rel diff {rel:.1e}; bytes {log}")
    spawn.ordered(rank, lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=M, help="m, the gradient's rows (at least 2 x 64 for the QR part)")
    M = parser.parse_args().rows
    spawn.run(probe, M)
