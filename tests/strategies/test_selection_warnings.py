"""Issue 28: what the default selection leaves dense is said at setup, once, and every warning of the strategy points
at the user's own line (here: this file), not into Lightning."""

import os
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowrank import LowRankStrategy
from lightning_lowrank.selection import dense_selection_note, select_lowrank_params
from tests.models import QUIET, RMSpropNet, TinyNet

LIGHTNING = os.path.dirname(L.__file__)


class ConvNet(L.LightningModule):
    """A small image classifier: two convolutions, and a Linear output head (``inner=True``: a hidden Linear too)."""

    def __init__(self, inner: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.hidden = nn.Linear(8, 16) if inner else nn.Identity()
        self.classifier = nn.Linear(16 if inner else 8, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3))
        return self.classifier(torch.relu(self.hidden(h)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(8, 3, 6, 6, generator=g), torch.arange(8) % 10), batch_size=4)


class EmbedHead(nn.Module):
    """Only an embedding and an output head (the last Linear, mapping to the vocabulary)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 50)


def _fit(strategy, model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(strategy=strategy, max_steps=1, **QUIET).fit(model)
    return [w for w in caught if "LeafSpec" not in str(w.message)]  # a deprecation inside Lightning itself


def _ours(caught, text):
    return [w for w in caught if text in str(w.message)]


def test_a_conv_net_with_nothing_selected_says_so_once_naming_the_candidates():
    model = ConvNet()
    caught = _fit(LowRankStrategy(rank=4, memory_report=False, memory_json=False), model)
    said = _ours(caught, "No weight was selected")
    assert len(said) == 1, [str(w.message) for w in caught]
    message = str(said[0].message)
    assert "conv1 (Conv2d 8x3x3x3: a 4-D kernel; only 2-D weights are projected)" in message
    assert "conv2 (Conv2d 8x8x3x3" in message
    assert "classifier (Linear 10x8: an output head (named 'classifier'))" in message
    assert "3 one-dimensional weight(s) (norms, biases), which are never projected" in message
    assert said[0].filename == __file__
    assert not model.trainer.optimizers[0].projected_params()  # plain dense AdamW, as said


def test_an_embedding_and_a_head_only_say_why_each_was_left_out():
    model = EmbedHead()
    message = dense_selection_note(model, select_lowrank_params(model))
    assert message.startswith("No weight was selected for a low-rank subspace (the default: every nn.Linear but")
    assert "embed (Embedding 50x16: an embedding, not projected by default)" in message
    assert "out (Linear 50x16: an output head (the last nn.Linear, 50 outputs: an embedding's vocabulary))" in message
    assert "3 one-dimensional weight(s) (norms, biases)" in message
    model.out.requires_grad_(False)
    assert "out (Linear 50x16: frozen)" in dense_selection_note(model, select_lowrank_params(model))
    assert dense_selection_note(model, select_lowrank_params(model, ["embed"]), ["embed"]) is None  # selected


def test_conv_kernels_left_dense_beside_projected_linears_are_named_at_setup():
    caught = _fit(LowRankStrategy(rank=4, memory_report=False, memory_json=False), ConvNet(inner=True))
    said = _ours(caught, "more than two dimensions stay dense")
    assert len(said) == 1 and not _ours(caught, "No weight was selected")
    message = str(said[0].message)
    assert message.startswith("2 weight(s) of more than two dimensions stay dense")
    assert "conv1 (Conv2d 8x3x3x3), conv2 (Conv2d 8x8x3x3)" in message and "1 2-D weight(s) are selected" in message
    assert said[0].filename == __file__


def test_rank_warning_is_said_once_from_the_users_line_with_memory_plan():
    strategy = LowRankStrategy(rank=24, memory_plan=True, memory_report=False, memory_json=False)
    caught = _fit(strategy, TinyNet(scheduler=None, width=24, hidden=40))
    said = _ours(caught, "is not below the smaller side")
    assert len(said) == 1, [(w.filename, str(w.message)[:60]) for w in caught]
    assert said[0].filename == __file__ and not said[0].filename.startswith(LIGHTNING)
    assert strategy.planned is not None
    for w in caught:  # every warning of the strategy: none points into Lightning's files
        assert not w.filename.startswith(LIGHTNING), (w.filename, str(w.message)[:80])


def test_negative_saving_is_said_once_across_plan_and_end_of_training():
    strategy = LowRankStrategy(rank=23, memory_plan=True, memory_report=False, memory_json=False)
    caught = _fit(strategy, TinyNet(scheduler=None, width=24, hidden=40))
    said = _ours(caught, "negative saving")
    assert len(said) == 1 and said[0].filename == __file__


def test_fallback_dense_warning_points_at_the_users_line():
    caught = _fit(LowRankStrategy(rank=4, fallback="dense", memory_report=False, memory_json=False), RMSpropNet())
    said = _ours(caught, "RMSprop cannot be projected")
    assert len(said) == 1 and said[0].filename == __file__


def test_no_low_rank_state_asked_for_says_nothing_about_the_selection():
    caught = _fit(LowRankStrategy(rank=None, memory_report=False, memory_json=False), ConvNet())
    assert not _ours(caught, "No weight was selected") and not _ours(caught, "stay dense")
