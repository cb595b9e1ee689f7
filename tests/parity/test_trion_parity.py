"""``optim.update.trion`` against its definition (always) and against the reference Trion (when installed), in float64.

The reference is ista-daslab-optimizers 1.1.15 (``fft_low_rank/trion.py``), installed with ``--no-deps``; CI does
not have it, so those tests skip. It is imported as ``benchmarks/peers.py`` does, without the package's
``__init__`` (which imports CUDA extensions): an empty package shell, ``wandb`` stubbed when it is missing (imported,
never used), and ``utils.newton_schulz_triton`` stubbed (it needs triton; only ``ns_type="triton"`` calls it). The
presence check is ``importlib.util.find_spec``: ``pytest.importorskip`` would run that ``__init__``.

What the reference tests replace in the reference, and why (all through ``monkeypatch``, undone after each test):

* ``zeropower_via_newtonschulz5`` (bfloat16) by the same iteration in float64 (``newton_schulz_eps`` with
  dtype=float64; its bfloat16 form is checked bit for bit against the reference's first);
* its ``GlobalCache`` is emptied, then filled at key (d, rank) with Q for matmul and Q^T for Makhoul, exactly what
  its uncached path would store if it ran: that path calls ``dct3_matrix(..., device=device, dtype=dtype)`` with
  neither name defined (NameError, checked below). Q is the float64 ``dct3_matrix`` (``trion_dct_matrix``; the
  reference's is computed in float32, checked to 2e-6); torch's default dtype is float64 while the reference runs,
  so its Makhoul twiddles are complex128 (they are complex64 otherwise);
* for ``Trion.step`` only: ``get_dct_matrix`` (called there, defined nowhere) is supplied as a read of that cache,
  and ``torch.distributed`` as one process (world size 1, rank 0, all_gather a copy).

Tolerance: 1e-12 (float64 rounding; measured differences are about 1e-15).
"""

import importlib
import importlib.util
import math
import sys
import types
from functools import partial

import pytest
import torch

from lightning_lowrank.optim.projection.bases import dct_basis
from lightning_lowrank.optim.projection.dct_fft import dct2
from lightning_lowrank.optim.update.muon import newton_schulz
from lightning_lowrank.optim.update.trion import (
    NS_COEFFICIENTS,
    newton_schulz_eps,
    trion_dct_matrix,
    trion_direction,
    trion_update,
)

F64 = torch.float64
TOL = 1e-12
SHAPES = [(24, 16), (16, 24), (16, 16)]  # right (tall), left (wide), square (right)
SCORERS = ["matmul", "makhoul"]
RANK, MU, LR, WD, STEPS = 5, 0.9, 0.02, 0.1, 6
NS64 = partial(newton_schulz_eps, dtype=F64)


def identity(X):
    return X.clone()


def definition_dct(d):
    """Q[k, j] = c_k cos(pi k (2j + 1) / (2d)), c_0 = sqrt(1/d), else sqrt(2/d): the reference's ``dct3_matrix``."""
    Q = torch.empty(d, d, dtype=F64)
    for k in range(d):
        for j in range(d):
            Q[k, j] = math.sqrt((1 if k == 0 else 2) / d) * math.cos(math.pi * k * (2 * j + 1) / (2 * d))
    return Q


def grads(shape, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(steps)]


# -- without the reference (these run in CI) -------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 7, 16])
def test_dct_helpers_equal_the_definition(d):
    Q = definition_dct(d)
    X = torch.randn(5, d, generator=torch.Generator().manual_seed(d), dtype=F64)
    assert (trion_dct_matrix(d, F64) - Q).abs().max() < 1e-14
    assert (dct_basis(d, F64).T - Q).abs().max() < 1e-14
    assert (dct2(X, dim=-1) - X @ Q.T).abs().max() < 1e-13  # what dct_type2_makhoul computes
    assert (dct2(X.T, dim=0) - Q @ X.T).abs().max() < 1e-13


def expected_coefficients(M, scorer):
    """(coefficients, uses Q's columns) of each case, from the definition matrix (see the module table in trion.py)."""
    Q = definition_dct(min(M.shape))
    if M.shape[0] < M.shape[1]:
        return Q @ M, False
    return (M @ Q, True) if scorer == "matmul" else (M @ Q.T, False)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_takes_every_column_and_the_whole_transform(scorer, shape):
    G = grads(shape, 1)[0]
    buffer = torch.zeros(shape, dtype=F64)
    low, indices = trion_direction(G, buffer, min(shape), MU, scorer, identity)
    S, _ = expected_coefficients(G, scorer)
    left = shape[0] < shape[1]
    assert sorted(indices.tolist()) == list(range(min(shape)))
    assert (low - (S[indices] if left else S[:, indices])).abs().max() < TOL
    assert (buffer - MU * G).abs().max() < TOL  # the whole of M was used: a fraction mu stays


@pytest.mark.parametrize("as_reference", [False, True])
@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_buffer_keeps_what_was_not_applied(scorer, shape, as_reference):
    """M <- M_prev + G - (1 - mu) * (low-rank part mapped back), over several steps, from the definition of Q."""
    left = shape[0] < shape[1]
    buffer, expected = torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64)
    for G in grads(shape):
        low, indices = trion_direction(G, buffer, RANK, MU, scorer, identity, makhoul_left_as_reference=as_reference)
        expected += G
        S, q_columns = expected_coefficients(expected, scorer)
        scores = S.abs().sum(dim=1 if left else 0)
        assert set(indices.tolist()) == set(scores.argsort(descending=True)[:RANK].tolist())
        Q = definition_dct(min(shape))
        if left and scorer == "makhoul" and as_reference:
            q_columns = True  # the reference's Makhoul-left map-back
        P = (Q if q_columns else Q.T)[:, indices]
        m = S[indices] if left else S[:, indices]
        assert (low - m).abs().max() < TOL
        expected -= (1 - MU) * (P @ m if left else m @ P.T)
        assert (buffer - expected).abs().max() < TOL


SCALES = {  # trion_scale by hand: kj max(1, R/C)^.5, none 1, kimi 0.2 sqrt(max(R, C)), dion (R/C)^.5
    (24, 16): {"kj": 1.5**0.5, "none": 1.0, "kimi": 0.2 * 24**0.5, "dion": 1.5**0.5},
    (16, 24): {"kj": 1.0, "none": 1.0, "kimi": 0.2 * 24**0.5, "dion": (2 / 3) ** 0.5},
    (16, 16): {"kj": 1.0, "none": 1.0, "kimi": 0.8, "dion": 1.0},
}


@pytest.mark.parametrize("scaling", ["kj", "none", "kimi", "dion"])
@pytest.mark.parametrize("shape", SHAPES)
def test_update_decays_then_steps_along_the_mapped_back_direction(shape, scaling):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    param, buffer, probe = W.clone(), torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64)
    for G in grads(shape):
        ortho, indices = trion_update(param, G, buffer, RANK, LR, MU, WD, scaling, "matmul", NS64)
        ortho_probe, _ = trion_direction(G, probe, RANK, MU, "matmul", NS64)
        assert (ortho - ortho_probe).abs().max() < TOL
        Q = definition_dct(min(shape))
        left = shape[0] < shape[1]
        update = Q.T[:, indices] @ ortho if left else ortho @ Q[:, indices].T
        W = (1 - LR * WD) * W - LR * SCALES[shape][scaling] * update
        assert (param - W).abs().max() < TOL


def test_newton_schulz_forms_differ_only_in_eps():
    X = torch.randn(16, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    ours = newton_schulz_eps(X, 5, eps=0.0, dtype=F64)
    torch_form = newton_schulz(X, NS_COEFFICIENTS, 5, eps=1e-300, dtype=F64)
    assert (ours - torch_form).abs().max() < TOL
    # With eps = 1e-7 on both: x / (|x| + eps) against x / max(|x|, eps), a relative 1e-7 / |x| apart.
    gap = (newton_schulz_eps(X, 5, dtype=F64) - newton_schulz(X, NS_COEFFICIENTS, 5, 1e-7, F64)).abs().max()
    assert gap < 1e-7


def test_bad_arguments_raise_before_touching_the_buffer():
    param, G, buffer = torch.zeros(8, 4, dtype=F64), torch.ones(8, 4, dtype=F64), torch.zeros(8, 4, dtype=F64)
    for kwargs in ({"scaling": "muon"}, {"scorer": "svd"}, {"rank": 5}, {"rank": 0}):
        args = {"rank": 2, "lr": LR, "ns": NS64, **kwargs}
        with pytest.raises(ValueError):
            trion_update(param, G, buffer, **args)
        assert buffer.abs().max() == 0


# -- against the reference (skipped without ista_daslab_optimizers) --------------------------------------------------


@pytest.fixture(scope="module")
def ref():
    if importlib.util.find_spec("ista_daslab_optimizers") is None:
        pytest.skip("ista-daslab-optimizers (the reference Trion) is not installed; CI does not have it")
    before = set(sys.modules)
    if sys.modules.get("ista_daslab_optimizers") is None:
        shell = types.ModuleType("ista_daslab_optimizers")
        shell.__path__ = list(importlib.util.find_spec("ista_daslab_optimizers").submodule_search_locations)
        sys.modules["ista_daslab_optimizers"] = shell
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        sys.modules["wandb"] = types.ModuleType("wandb")
    triton_name = "ista_daslab_optimizers.utils.newton_schulz_triton"
    if triton_name not in sys.modules:
        stub = types.ModuleType(triton_name)
        stub.newton_schulz_triton = None
        sys.modules[triton_name] = stub
    try:
        trion = importlib.import_module("ista_daslab_optimizers.fft_low_rank.trion")
        dct = importlib.import_module("ista_daslab_optimizers.utils.dct")
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
    return types.SimpleNamespace(trion=trion, dct=dct, cache=trion.GlobalCache)


@pytest.fixture
def reference(ref, monkeypatch):
    """The reference with an empty cache, a float64 NS and float64 default dtype (see the module docstring)."""
    monkeypatch.setattr(ref.cache, "_instance", None)
    monkeypatch.setattr(ref.trion, "zeropower_via_newtonschulz5", lambda G, steps: NS64(G, steps))
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield ref
    torch.set_default_dtype(default)


def prefill(ref, d, scorer):
    """What the reference's uncached path would cache at (d, RANK): Q for matmul, Q^T for Makhoul."""
    Q = trion_dct_matrix(d, F64)
    ref.cache.add(category="ortho", key=(d, RANK), item=Q if scorer == "matmul" else Q.T)


def test_reference_dct_helpers(ref, monkeypatch):
    for d in (7, 16, 24):
        assert (ref.dct.dct3_matrix(d, dtype=F64, device="cpu") - trion_dct_matrix(d, F64)).abs().max() < 2e-6
    monkeypatch.setattr(ref.cache, "_instance", None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        for d in (7, 16, 24):
            X = torch.randn(9, d, generator=torch.Generator().manual_seed(d), dtype=F64)
            assert (ref.dct.dct_type2_makhoul(X) - dct2(X, dim=-1)).abs().max() < TOL
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_reference_newton_schulz_bfloat16_bit_for_bit(ref, shape):
    X = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ref.trion.zeropower_via_newtonschulz5(X, steps=5), newton_schulz_eps(X))


def test_reference_uncached_path_fails_as_published(reference):
    G = torch.ones(8, 12, dtype=F64)
    out = (torch.zeros(RANK, 12, dtype=F64), torch.zeros(RANK, dtype=torch.int32))
    with pytest.raises(NameError):
        reference.trion.trion_update(G, torch.zeros_like(G), RANK, "torch", MU, False, 5, *out)
    assert not hasattr(reference.trion, "get_dct_matrix")


def run_reference_direction(ref, G, M, scorer):
    left = G.shape[0] < G.shape[1]
    out = torch.zeros((RANK, G.shape[1]) if left else (G.shape[0], RANK), dtype=F64)
    idx = torch.zeros(RANK, dtype=torch.int32)
    ref.trion.trion_update(G, M, RANK, "torch", MU, scorer == "makhoul", 5, out, idx)
    return out, idx.long()


def aligned(ortho, indices, left):
    """The direction with its rows (left) or columns (right) in increasing frequency order."""
    order = indices.argsort()
    return ortho[order] if left else ortho[:, order]


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_trion_update_matches_reference(reference, scorer, shape):
    prefill(reference, min(shape), scorer)
    left = shape[0] < shape[1]
    quirk = left and scorer == "makhoul"
    M_ref, M = torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64)
    for G in grads(shape):
        o_ref, i_ref = run_reference_direction(reference, G, M_ref, scorer)
        o, i = trion_direction(G, M, RANK, MU, scorer, NS64, makhoul_left_as_reference=quirk)
        assert sorted(i.tolist()) == sorted(i_ref.tolist())
        assert (aligned(o, i, left) - aligned(o_ref, i_ref, left)).abs().max() < TOL
        assert (M - M_ref).abs().max() < TOL


def test_reference_makhoul_left_map_back_is_not_the_scoring_basis(reference):
    """At full rank every case leaves mu * M in the buffer, except the reference's Makhoul-left."""
    shape, d = (8, 12), 8
    G = grads(shape, 1)[0]
    Q = trion_dct_matrix(d, F64)
    reference.cache.add(category="ortho", key=(d, d), item=Q.T)
    M_ref = torch.zeros(shape, dtype=F64)
    out = (torch.zeros(d, 12, dtype=F64), torch.zeros(d, dtype=torch.int32))
    reference.trion.trion_update(G, M_ref, d, "torch", MU, True, 5, *out)
    M, M_quirk = torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64)
    trion_direction(G, M, d, MU, "makhoul", NS64)
    trion_direction(G, M_quirk, d, MU, "makhoul", NS64, makhoul_left_as_reference=True)
    assert (M - MU * G).abs().max() < TOL
    assert (M_quirk - M_ref).abs().max() < TOL
    assert (M_ref - MU * G).abs().max() > 0.1


class OneProcess:
    """``torch.distributed`` for a world of one: all_gather copies the tensor into each slot that is not itself."""

    @staticmethod
    def get_world_size():
        return 1

    @staticmethod
    def get_rank():
        return 0

    @staticmethod
    def all_gather(tensor_list, tensor):
        for slot in tensor_list:
            if slot is not tensor:
                slot.copy_(tensor)


@pytest.mark.parametrize("scaling", ["kj", "none", "kimi", "dion"])
@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_trion_step_matches_reference(reference, monkeypatch, shape, scorer, scaling):
    monkeypatch.setattr(reference.trion, "dist", OneProcess)

    def get_dct_matrix(size, key, device, dtype):
        return reference.cache.get(category="ortho", key=key)

    monkeypatch.setattr(reference.trion, "get_dct_matrix", get_dct_matrix, raising=False)
    prefill(reference, min(shape), scorer)
    W = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    p_ref = torch.nn.Parameter(W.clone())
    group = {"params": [p_ref], "use_muon": True, "rank": RANK, "ns_type": "torch", "use_makhoul": scorer == "makhoul"}
    group.update(lr=LR, momentum=MU, weight_decay=WD, scaling_type=scaling)
    optimizer = reference.trion.Trion([group])
    param, buffer = W.clone(), torch.zeros(shape, dtype=F64)
    quirk = shape[0] < shape[1] and scorer == "makhoul"
    for G in grads(shape):
        p_ref.grad = G.clone()
        optimizer.step()
        trion_update(param, G, buffer, RANK, LR, MU, WD, scaling, scorer, NS64, makhoul_left_as_reference=quirk)
        assert (param - p_ref.detach()).abs().max() < TOL
        assert (buffer - optimizer.state[p_ref]["momentum_buffer"]).abs().max() < TOL
