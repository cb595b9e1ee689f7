"""Each option's help text, read from the docstrings of the options' dataclasses (``options.py``, ``LowRankConfig``).

A section documents its fields in a Google-style ``Args:`` block: the one text of each option. LightningCLI's
``--help`` reads these blocks through jsonargparse (with ``docstring_parser``, which ``jsonargparse[signatures]``
installs); this reader needs only the standard library, for ``python -m lightning_lowrank plan --help`` and for
``args_docstring``, an ``Args:`` block of every option for a signature built from the fields (the strategies').
"""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Mapping
from dataclasses import fields

_ENTRY = re.compile(r"^(\w+)(?: \([^)]*\))?: (.*)$")  # "name: text" or "name (type): text"


def docstring_args(doc: str | None) -> dict[str, str]:
    """The entries of the ``Args:`` block of a Google-style docstring: name -> description, on one line."""
    entries: dict[str, str] = {}
    name = None
    inside = False
    for line in inspect.cleandoc(doc or "").splitlines():
        indent = len(line) - len(line.lstrip())
        if not inside:
            inside = line.strip() == "Args:" and indent == 0
            continue
        if not line.strip():
            continue
        if indent == 0:
            break  # the next section (or the end of the block)
        entry = _ENTRY.match(line.strip()) if indent == 4 else None
        if entry:
            name = entry.group(1)
            entries[name] = entry.group(2)
        elif name is not None:
            entries[name] += " " + line.strip()
    return entries


def option_docs(cls: type, renamed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each field of dataclass ``cls`` -> its description: the entry of the ``Args:`` block of the nearest class of
    its MRO that documents it. ``renamed``: a field -> the option whose description it shares (``inner`` ->
    ``projected_rule``). A field that no class documents is missing from the result (a test checks there is none)."""
    documented: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        documented.update(docstring_args(vars(base).get("__doc__")))
    renamed = renamed or {}
    docs = {f.name: documented.get(renamed.get(f.name, f.name)) for f in fields(cls)}
    return {name: text for name, text in docs.items() if text}


def args_docstring(summary: str, docs: Mapping[str, str], width: int = 116) -> str:
    """A docstring: ``summary``, then an ``Args:`` block of ``docs`` (name -> description) wrapped at ``width``,
    which ``docstring_args`` and ``docstring_parser`` read back as ``docs``."""
    lines = [summary, "", "Args:"]
    for name, text in docs.items():
        lines += textwrap.wrap(
            f"{name}: {text}", width, initial_indent="    ", subsequent_indent="        ", break_on_hyphens=False
        )
    return "\n".join(lines)
