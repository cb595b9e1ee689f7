"""Byte-level corpus from the Python standard library's own source: real text, no download.

The interpreter running this script ships ~12 MB of ``.py`` files, so every machine that can run the demo
already has its data set. Bytes are the tokens (vocab = 256), so there is no tokenizer either.
"""

from __future__ import annotations

import pathlib
import sysconfig

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

VOCAB_SIZE = 256
_SKIP_DIRS = {"test", "tests", "idle_test"}


def stdlib_files() -> list[pathlib.Path]:
    """The stdlib's ``.py`` files in a fixed order, without third-party packages or the test suites."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and not _SKIP_DIRS & set(p.parts))


def load_stdlib_bytes(max_bytes: int | None = None) -> Tensor:
    """All stdlib source as one uint8 tensor; ``max_bytes`` keeps a deterministic prefix (for quick runs)."""
    data = bytearray()
    for path in stdlib_files():
        data += path.read_bytes()
        if max_bytes is not None and len(data) >= max_bytes:
            break
    if max_bytes is not None:
        del data[max_bytes:]
    if not data:
        raise RuntimeError(f"No .py files found under {sysconfig.get_paths()['stdlib']}")
    return torch.frombuffer(data, dtype=torch.uint8)


def train_val_split(data: Tensor, val_fraction: float = 0.05) -> tuple[Tensor, Tensor]:
    """Contiguous split: the last ``val_fraction`` of the bytes is validation, so no window straddles both."""
    n_val = int(len(data) * val_fraction)
    return data[: len(data) - n_val], data[len(data) - n_val :]


class RandomWindows(Dataset):
    """``num_samples`` windows of ``block_size + 1`` bytes at random offsets, returned as (input, target).

    The offsets are drawn once from a seeded generator, so the data order is fixed by ``seed`` alone and the
    DataLoader needs no shuffling (and no RNG state of its own).
    """

    def __init__(self, data: Tensor, block_size: int, num_samples: int, seed: int = 0) -> None:
        if len(data) <= block_size + 1:
            raise ValueError(f"need more than {block_size + 1} bytes, got {len(data)}")
        self.data = data
        self.block_size = block_size
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(data) - block_size - 1, (num_samples,), generator=generator)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = int(self.offsets[i])
        chunk = self.data[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


class StdlibDataModule(L.LightningDataModule):
    """Train/val windows over the stdlib corpus.

    ``train_samples`` is usually ``max_steps * batch_size``: one epoch is then exactly the run, every
    batch is fresh, and validation sees the same ``val_samples`` windows each time it runs.
    """

    def __init__(
        self,
        block_size: int = 128,
        batch_size: int = 32,
        train_samples: int = 10_000,
        val_samples: int = 512,
        max_bytes: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.batch_size = batch_size
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.max_bytes = max_bytes
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: RandomWindows | None = None
        self.val_set: RandomWindows | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        train, val = train_val_split(load_stdlib_bytes(self.max_bytes))
        self.train_set = RandomWindows(train, self.block_size, self.train_samples, seed=self.seed)
        self.val_set = RandomWindows(val, self.block_size, self.val_samples, seed=self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
