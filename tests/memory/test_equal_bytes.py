"""``equal_memory_rank`` (issue 27): the DCT rank that holds SVD's optimizer bytes, against a count by hand."""

import pytest
from torch import nn

from lightning_lowrank import equal_memory_rank


def _stack() -> nn.Sequential:
    """Eight projected weights, alternately 96 x 64 and 64 x 96 (no bias, no head): d = 64, max side 96."""
    shapes = [(64, 96) if i % 2 == 0 else (96, 64) for i in range(8)]
    return nn.Sequential(*(nn.Linear(n_in, n_out, bias=False) for n_in, n_out in shapes))


@pytest.mark.parametrize("rank", [24, 32, 40])
def test_the_dct_rank_at_svds_bytes_matches_a_count_by_hand(rank):
    """Per weight, both keep Adam's two moments, r x 96 float32 each (768 r bytes). SVD adds P, 64 x r float32
    (256 r); the DCT adds r int64 indices (8 r) and, once for all eight, the 64 x 64 float32 basis (16384). So the DCT
    at rank q fits SVD's bytes at rank r while 8 x 776 q + 16384 <= 8 x 1024 r (the step counters are the same)."""
    expected = (8 * 1024 * rank - 16384) // (8 * 776)
    assert equal_memory_rank(_stack(), rank) == expected


def test_the_search_stays_below_the_smaller_side_and_refuses_a_larger_projector():
    """At SVD rank 52 the DCT's bytes would allow rank 65, but at 64 every weight would stay dense: 63. SVD against
    the DCT at rank 16: SVD holds 8 x 1024 x 16 = 131072 bytes, the DCT 8 x 776 x 16 + 16384 = 115712: refused."""
    assert equal_memory_rank(_stack(), 52) == 63
    with pytest.raises(ValueError, match="already holds more optimizer state"):
        equal_memory_rank(_stack(), 16, projector="svd", like="dct")
