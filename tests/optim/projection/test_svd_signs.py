"""``svd_signs``: an SVD-derived P with a deterministic sign per column, so gradients that differ by rounding (or a
decomposition that flips a vector) give the same P. Checked by hand, against flipped inputs, through the optimizer,
and (tests/strategies/test_svd_signs_runs.py) as lowrank_ddp and lowrank_fsdp agreeing after refreshes."""

from __future__ import annotations

import pytest
import torch

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.projection.bases import randomized_svd_projection, signed, svd_projection


def test_each_columns_largest_entry_is_made_positive():
    P = torch.tensor([[0.6, -0.1], [-0.8, 0.2], [0.0, -0.9]])
    expected = torch.tensor([[-0.6, 0.1], [0.8, -0.2], [0.0, 0.9]])  # by hand: -0.8 and -0.9 are the peaks
    assert torch.equal(signed(P, "max_abs"), expected)
    assert torch.equal(signed(P, "none"), P)


def test_a_flipped_column_gives_the_same_P():
    P = torch.linalg.qr(torch.randn(9, 4, generator=torch.Generator().manual_seed(0))).Q
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert torch.equal(signed(P * flips, "max_abs"), signed(P, "max_abs"))


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_decompositions_of_g_and_of_minus_g_agree(side):
    """-G has the same singular subspaces and the decomposition returns them with other signs on one side."""
    G = torch.randn(12, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for decompose in (
        lambda g, s: svd_projection(g, 4, side, s),
        lambda g, s: randomized_svd_projection(g, 4, 8, 2, torch.Generator().manual_seed(2), side, s),
    ):
        plain = decompose(G, "none"), decompose(-G, "none")
        fixed = decompose(G, "max_abs"), decompose(-G, "max_abs")
        torch.testing.assert_close(fixed[0], fixed[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(fixed[0].abs(), plain[0].abs(), rtol=0, atol=0)  # only signs change


@pytest.mark.parametrize("projector", ["svd", "rsvd", "online_pca"])
def test_the_option_reaches_every_svd_projector(projector):
    W = torch.nn.Parameter(torch.randn(16, 24, generator=torch.Generator().manual_seed(0)))
    opt = ProjectedOptimizer([W], rank=4, projector=projector, svd_signs="max_abs")
    W.grad = torch.randn(16, 24, generator=torch.Generator().manual_seed(3))
    opt.step()
    P = opt.projection_matrix(W)
    assert (P.gather(0, P.abs().argmax(dim=0, keepdim=True)) > 0).all()


def test_a_bad_value_is_refused():
    with pytest.raises(ValueError, match="svd_signs"):
        ProjectedOptimizer([torch.nn.Parameter(torch.zeros(4, 6))], rank=2, svd_signs="positive")
