"""Which weights are projected by default and with patterns."""

import pytest
import torch
from torch import nn

from lightning_lowrank.memory import format_bytes
from lightning_lowrank.selection import select_lowrank_params


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "o_proj": nn.Linear(8, 8)})
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)


class Net(nn.Module):
    def __init__(self, tie: bool = False):
        super().__init__()
        self.tok = nn.Embedding(50, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.conv = nn.Conv1d(8, 8, 3)
        self.decoder = nn.Linear(8, 50, bias=False)
        if tie:
            self.decoder.weight = self.tok.weight


def _names(selected):
    return sorted(selected.values())


def test_default_is_every_linear_but_heads_and_embeddings():
    names = _names(select_lowrank_params(Net()))
    # "decoder" maps to the embedding's 50-token vocabulary, so it is an output head.
    assert names == [f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.o_proj", "attn.q_proj", "mlp.0", "mlp.2")]


def test_heads_are_recognised_by_name_tie_or_vocabulary_size():
    inner_vocab_sized = Net()
    inner_vocab_sized.blocks[0].mlp[0] = nn.Linear(8, 50)  # same width as the vocabulary, but not the last Linear
    assert "blocks.0.mlp.0" in _names(select_lowrank_params(inner_vocab_sized))
    untied_other_size = Net()
    untied_other_size.decoder = nn.Linear(8, 40)
    assert "decoder" in _names(select_lowrank_params(untied_other_size))
    named = Net()
    named.decoder = nn.Linear(8, 40)
    named.classifier = nn.Linear(8, 40)
    assert "classifier" not in _names(select_lowrank_params(named))
    tied = Net(tie=True)
    tied.tok = nn.Embedding(60, 8)  # vocabulary no longer matches, but the weight is still shared
    tied.tok.weight = tied.decoder.weight
    assert "decoder" not in _names(select_lowrank_params(tied))


def test_patterns_are_globs_or_substrings_and_exclude_wins():
    net = Net()
    assert _names(select_lowrank_params(net, ["attn"])) == [
        "blocks.0.attn.o_proj",
        "blocks.0.attn.q_proj",
        "blocks.1.attn.o_proj",
        "blocks.1.attn.q_proj",
    ]
    assert _names(select_lowrank_params(net, ["blocks.1.*"], exclude=["q_proj", "mlp.0"])) == [
        "blocks.1.attn.o_proj",
        "blocks.1.mlp.2",
    ]
    # Naming an embedding explicitly is allowed: any module with a 2-D weight can be a target.
    assert _names(select_lowrank_params(net, ["tok"])) == ["tok"]


def test_frozen_weights_are_skipped():
    net = Net()
    net.blocks[0].mlp[0].weight.requires_grad_(False)
    assert "blocks.0.mlp.0" not in _names(select_lowrank_params(net))


@pytest.mark.parametrize("kwargs", [dict(target_modules=["atn"]), dict(exclude=["nothing_here"])])
def test_pattern_matching_nothing_is_an_error_listing_candidates(kwargs):
    with pytest.raises(ValueError, match="matches no module.*blocks.0.attn.q_proj"):
        select_lowrank_params(Net(), **kwargs)


def test_conv_weights_cannot_be_targets():
    with pytest.raises(ValueError, match="'conv' matches no module"):
        select_lowrank_params(Net(), ["conv"])


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (5 * 2**20, "5.00 MiB"),
        (-2048, "-2.00 KiB"),
        (1000 * 2**20, "1000 MiB"),  # not "1e+03 MiB"
        (123.4 * 2**30, "123 GiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


class Compiled(nn.Module):
    """A model holding a torch.compile'd part: its module names gain an ``_orig_mod`` part."""

    def __init__(self):
        super().__init__()
        self.net = torch.compile(Net())


def test_patterns_match_compiled_names_without_orig_mod():
    model = Compiled()
    assert "net._orig_mod.blocks.0.mlp.0" in dict(model.named_modules())
    selected = _names(select_lowrank_params(model, ["net.blocks.*"], exclude=["net.blocks.1.*"]))
    # The names stay the modules' own (as named_modules and the report give them); only matching drops _orig_mod.
    assert selected == [f"net._orig_mod.blocks.0.{m}" for m in ("attn.o_proj", "attn.q_proj", "mlp.0", "mlp.2")]
    plain = [name.replace("_orig_mod.", "") for name in _names(select_lowrank_params(model))]
    assert plain == [f"net.{name}" for name in _names(select_lowrank_params(Net()))]  # the default: heads as before
    with pytest.raises(ValueError, match=r"candidates are: net\.blocks\.0\.attn\.o_proj"):
        select_lowrank_params(model, ["nothing_here"])
