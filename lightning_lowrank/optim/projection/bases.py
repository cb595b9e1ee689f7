"""Subspace projections for a 2-D gradient ``G`` of shape (m, n).

A projection is a matrix ``P`` (d x r) with orthonormal columns on one side of G:

* "left":  R = P^T G  has shape (r, n), and the update maps back as P R; d = m.
* "right": R = G P    has shape (m, r), and the update maps back as R P^T; d = n.

``side="auto"`` (the default) projects the *smaller* side, d = min(m, n), which keeps the stored P small (GaLore's
choice): left when m < n, right otherwise. A square weight goes right, as in GaLore's and DCT-AdamW's code: on the
byte LM that trained better than projecting it left (see ``docs/benchmarks.md``). ``side="right"`` or ``"left"``
fixes the side whatever the shape: FSDP2 shards a weight's rows, and only a right projection is then shard-local.
Everything here is plain torch over tensors, without Lightning, so it can be tested alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PROJECTORS = ("svd", "rsvd", "dct", "random", "gaussian", "online_pca")
_MASK64 = (1 << 64) - 1
DCT_NORM_ORDERS = {"l2": 2, "l1": 1}  # dct_norm: the norm of G's coefficients that ranks the DCT columns


def derive_seed(*parts: int) -> int:
    """Mix integers (seed, layer, step, ...) into one 63-bit seed (splitmix64 rounds).

    Randomness is drawn from generators seeded this way, never from the global RNG, so a resumed run and every
    DDP rank draw the same numbers.
    """
    h = 0x9E3779B97F4A7C15
    for x in parts:
        h = ((h ^ (x & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def seeded_generator(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on ``device`` (default the CPU) seeded with ``seed``, so that draws are made where they are used:
    a draw on the CPU copied to a GPU is a blocking copy (a stream sync) per draw. The same seed gives different
    numbers on different device types, as torch's generators do. Meta tensors have no generator of their own;
    they take a CPU one, which their draws accept (and ignore): the path is the same as on a GPU."""
    device = torch.device("cpu" if device is None else device)
    generator = torch.Generator() if device.type == "meta" else torch.Generator(device=device)
    return generator.manual_seed(seed)


SIDES = ("auto", "left", "right")


def is_left(shape: torch.Size | tuple[int, ...], side: str = "auto") -> bool:
    """Whether P multiplies G from the left: as ``side`` says, or with ``"auto"`` when the rows are the smaller side
    (a square G goes right)."""
    if side == "auto":
        return shape[0] < shape[1]
    return side == "left"


def projected_dim(shape: torch.Size | tuple[int, ...], side: str = "auto") -> int:
    """d, the rows of P: m for a left projection, n for a right one (min(m, n) with ``"auto"``)."""
    return shape[0] if is_left(shape, side) else shape[1]


def effective_rank(shape: torch.Size | tuple[int, ...], rank: int) -> int:
    """The rank actually used for a matrix: never more than its smaller side."""
    return min(rank, min(shape))


def projected_shape(shape: torch.Size | tuple[int, ...], rank: int, side: str = "auto") -> tuple[int, int]:
    """Shape of the projected gradient of an (m, n) matrix at ``rank`` (clamped to the smaller side): (r, n) when P
    acts on the left, (m, r) on the right."""
    m, n = shape
    rank = effective_rank(shape, rank)
    return (rank, n) if is_left(shape, side) else (m, rank)


def project(grad: Tensor, P: Tensor, side: str = "auto") -> Tensor:
    """Map a full gradient (m, n) into the subspace: (r, n) or (m, r)."""
    return P.T @ grad if is_left(grad.shape, side) else grad @ P


def project_back(low_rank: Tensor, P: Tensor, full_shape: torch.Size, side: str = "auto") -> Tensor:
    """Map a low-rank tensor back to the full (m, n) shape."""
    return P @ low_rank if is_left(full_shape, side) else low_rank @ P.T


SVD_SIGNS = ("none", "max_abs")


def signed(P: Tensor, signs: str) -> Tensor:
    """P's columns with a deterministic sign: ``"max_abs"`` makes each column's largest-magnitude entry positive
    (scikit-learn's ``svd_flip``), so two decompositions of gradients that differ by rounding give the same P rather
    than columns of opposite sign; ``"none"``: as the decomposition returned them (galore-torch's). No host read."""
    if signs == "none":
        return P
    peak = P.gather(0, P.abs().argmax(dim=0, keepdim=True))
    return P * torch.where(peak < 0, -1.0, 1.0).to(P.dtype)


def svd_projection(grad: Tensor, rank: int, side: str = "auto", signs: str = "none") -> Tensor:
    """Top-``rank`` singular vectors of ``grad`` on its projected side (GaLore: the smaller one), with ``signs``'s
    convention (``signed``).

    Half-precision gradients are decomposed in float32 (CPU has no bf16 SVD); P is returned in the
    gradient's dtype.
    """
    work = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
    U, _, Vh = torch.linalg.svd(work, full_matrices=False)
    P = U[:, :rank] if is_left(grad.shape, side) else Vh[:rank].T
    return signed(P, signs).to(grad.dtype).contiguous()


def dct_basis(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Orthonormal DCT-II basis as a (size, size) matrix whose *columns* are the basis vectors.

    Column k is sqrt(2/size) * cos(pi * k * (2j + 1) / (2 size)) over j, with column 0 scaled by
    1/sqrt(2). Built in float64 so the cast to ``dtype`` is the only rounding.
    """
    j = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    basis = math.sqrt(2.0 / size) * torch.cos(math.pi * k * (2 * j + 1) / (2 * size))
    basis[:, 0] /= math.sqrt(2.0)
    return basis.to(dtype=dtype, device=device)


def dct_columns(size: int, indices: Tensor, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """Only the chosen columns of ``dct_basis(size)``, from the formula: (size, len(indices)), no size x size basis."""
    j = torch.arange(size, dtype=torch.float64, device=indices.device).unsqueeze(1)
    k = indices.to(torch.float64).unsqueeze(0)
    cols = math.sqrt(2.0 / size) * torch.cos(math.pi * k * (2 * j + 1) / (2 * size))
    cols = torch.where(k == 0, cols / math.sqrt(2.0), cols)
    return cols.to(dtype=dtype, device=device)


def dct_norm_order(norm: str) -> int:
    """The vector-norm order of a ``dct_norm`` name: ``"l2"`` -> 2, ``"l1"`` -> 1."""
    if norm not in DCT_NORM_ORDERS:
        raise ValueError(f"Unknown dct_norm {norm!r}; choose one of {', '.join(map(repr, DCT_NORM_ORDERS))}")
    return DCT_NORM_ORDERS[norm]


def dct_scores(grad: Tensor, basis: Tensor, norm: str = "l2", side: str = "auto") -> Tensor:
    """Alignment of each basis column with ``grad``: the l2 (or l1) norm of G's coefficients on it.

    Picking the top-r by l2 score maximises the captured energy ||P^T G||_F^2 over subsets of the basis, which is
    why it is the default. ``"l1"`` is what DCT-AdamW's code (ista-daslab-optimizers 1.1.15) scores with by default.
    """
    order = dct_norm_order(norm)
    if is_left(grad.shape, side):
        return torch.linalg.vector_norm(basis.T @ grad, ord=order, dim=1)
    return torch.linalg.vector_norm(grad @ basis, ord=order, dim=0)


def top_indices(scores: Tensor, rank: int) -> Tensor:
    """The ``rank`` best-scored indices (int64), best first, so column 0 of P is the leading direction."""
    return torch.topk(scores, rank, sorted=True).indices


def dct_select(grad: Tensor, rank: int, basis: Tensor, norm: str = "l2", side: str = "auto") -> Tensor:
    """Indices (int64, best first) of the ``rank`` DCT basis columns best aligned with ``grad`` (``norm``: see
    ``dct_scores``)."""
    return top_indices(dct_scores(grad.to(basis.dtype), basis, norm, side), rank)


def randomized_svd_projection(
    grad: Tensor,
    rank: int,
    oversample: int,
    niter: int,
    generator: torch.Generator,
    side: str = "auto",
    signs: str = "none",
) -> Tensor:
    """Top-``rank`` singular vectors of ``grad`` on its projected side by randomized SVD (Halko et al. 2011).

    A Gaussian sketch of ``rank + oversample`` columns, ``niter`` power iterations (re-orthonormalized), then an
    exact SVD of the small projected matrix. The sketch comes from ``generator`` (on ``grad``'s device: see
    ``seeded_generator``), not the global RNG.
    """
    work = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
    A = work if is_left(grad.shape, side) else work.T  # (d, k): we want A's left singular vectors
    d, k = A.shape
    width = min(rank + oversample, d, k)
    omega = torch.randn(k, width, generator=generator, dtype=A.dtype, device=A.device)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(A @ torch.linalg.qr(A.T @ Q).Q).Q
    U_small, _, _ = torch.linalg.svd(Q.T @ A, full_matrices=False)
    return signed(Q @ U_small[:, :rank], signs).to(grad.dtype).contiguous()


def random_orthonormal(
    size: int, rank: int, seed: int, dtype: torch.dtype, device: torch.device | str | None
) -> Tensor:
    """A (size, rank) matrix with orthonormal columns: QR of a Gaussian drawn from ``seed``, both on ``device``.

    The basis is rebuilt from its seed at every step (that is the projector's point: one integer of state), so the
    draw and the QR run where P is used: drawn on the CPU, they cost a QR on the host and a blocking copy per layer
    and step on a GPU. A device's generator gives its own numbers for a seed (``seeded_generator``): a run keeps
    its bases on one device type, and one resumed on another draws different ones. Drawn and factored in float32
    unless the weight is float64: float64 made it several times slower for the same float32 result."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    gaussian = torch.randn(size, rank, generator=seeded_generator(seed, device), dtype=work, device=device)
    return torch.linalg.qr(gaussian).Q.to(dtype=dtype)


APOLLO_SEED_ADVANCE = 0xF  # apollo-torch's next_seed draws this many integers and keeps the last


def apollo_next_seed(seed: int) -> int:
    """The seed of a layer's next APOLLO projection, as apollo-torch 1.0.3 derives it from the current one."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (APOLLO_SEED_ADVANCE,), generator=gen)[-1])


def gaussian_projection(
    shape: torch.Size | tuple[int, ...],
    rank: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device | str,
    side: str = "auto",
) -> Tensor:
    """APOLLO's projection for an (m, n) weight as our P (d x r): entries N(0, 1/r), NOT orthonormalized.

    Drawn exactly as apollo-torch 1.0.3 draws it: float32 from a generator on the weight's device seeded with
    ``seed``, in its own layout ((m, r) on the left, (r, n) on the right, here transposed), divided by sqrt(r) in
    float32, then cast to the weight's dtype. So with the same seeds a run matches apollo-torch's draws on CPU and
    on CUDA alike (the two devices' generators give different numbers, as in apollo-torch). E[P P^T] = I, so the
    projected gradient keeps about the norm of G, which is what APOLLO's scale factors assume.
    """
    m, n = shape
    gen = seeded_generator(seed, device)
    left = is_left(shape, side)
    layout = (m, rank) if left else (rank, n)
    draw = torch.randn(layout, generator=gen, device=device, dtype=torch.float32) / math.sqrt(rank)
    draw = draw.to(dtype)
    return draw if left else draw.T


def orthonormalize(P: Tensor) -> Tensor:
    """Orthonormal basis of P's column space, in float32 (P may have drifted, as online PCA's does): QR, with each
    column's sign chosen so that Q stays close to P (R's diagonal made non-negative), so online PCA's retraction moves P
    no further than it has drifted. Signs change no projection P P^T and no principal angle."""
    Q, R = torch.linalg.qr(P.float())
    signs = torch.sign(torch.diagonal(R))
    return Q * torch.where(signs == 0, 1.0, signs)  # not signs[signs == 0] = 1: a boolean index syncs on a GPU


def subspace_similarity(P_old: Tensor, P_new: Tensor, orthonormal: bool = False) -> tuple[float, float]:
    """(principal, leading cosine): mean squared cosine of the principal angles between the two column spaces, in
    [0, 1], and the *signed* cosine between the two leading columns (Q-GaLore's measure; its absolute value is the
    sign-free one, since an SVD may flip a vector's sign).

    ``orthonormal=True`` says both already have orthonormal columns (SVD, DCT and random bases), which saves the two
    QR factorizations: they were most of a DCT refresh's time on 1024-wide layers. Float64 inputs stay float64 so
    a threshold test on the result matches a float64 reference; all numbers come to the host in one sync."""
    work = torch.float64 if P_old.dtype == P_new.dtype == torch.float64 else torch.float32
    Q_old, Q_new = (P_old.to(work), P_new.to(work)) if orthonormal else (orthonormalize(P_old), orthonormalize(P_new))
    a, b = P_old[:, 0].to(work), P_new[:, 0].to(work)
    overlap, dot, norms = torch.stack([(Q_old.T @ Q_new).pow(2).sum().to(work), a @ b, a.norm() * b.norm()]).tolist()
    return overlap / Q_new.shape[1], dot / max(norms, 1e-30)


def online_pca_gradient(P: Tensor, grad: Tensor, side: str = "auto") -> Tensor:
    """d/dP of ||P P^T G_hat - G_hat||_F^2 (left side) or ||G_hat P P^T - G_hat||_F^2 (right side), G_hat = G/||G||.

    Written with products of (d, r) and (d, k) matrices only, never the d x d Gram matrix C = G_hat G_hat^T:
    grad = 2 [ (P P^T - I) C P + C (P P^T - I) P ].
    """
    g = grad.float() / grad.float().norm().clamp_min(1e-30)
    A = g if is_left(grad.shape, side) else g.T  # (d, k)
    P = P.float()

    def gram(X: Tensor) -> Tensor:
        return A @ (A.T @ X)

    CP = gram(P)
    term1 = P @ (P.T @ CP) - CP
    term2 = gram(P @ (P.T @ P) - P)
    return 2 * (term1 + term2)
