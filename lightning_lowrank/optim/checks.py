"""Value checks shared by the options tree (``options.py``) and the strategies' config: each raises a ``ValueError``
that names the option, the value given and what is allowed."""

from __future__ import annotations

from typing import Any


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {key} {value!r}; choose one of {', '.join(map(repr, allowed))}")


def check_int(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {key}: {value!r} (must be an int >= {low})")


def check_positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Invalid {key}: {value!r} (must be a number > 0)")


def check_compile(value: Any) -> None:
    """``compile`` is a bool or the name of a ``torch.compile`` backend (``torch._dynamo`` imported for a name only)."""
    if isinstance(value, bool):
        return
    if isinstance(value, str):
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if value in backends:
            return
        raise ValueError(f"Unknown compile backend {value!r}; choose True, False or one of {', '.join(backends)}")
    raise ValueError(f"Invalid compile: {value!r} (must be True, False or a torch.compile backend's name)")


def check_fraction(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {key}: {value!r} (must be in [0, 1))")
