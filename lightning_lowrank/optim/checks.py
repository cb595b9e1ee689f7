"""Value checks shared by the options tree (``options.py``) and the strategies' config: each raises a ``ValueError``
that names the option, the value given and what is allowed. An option's allowed values are its ``Literal`` type
(``check_choices``), so the check and LightningCLI's parser read one list."""

from __future__ import annotations

from functools import cache
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


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


def literal_choices(hint: Any) -> tuple | None:
    """The values a ``Literal[...]`` type hint allows, None first where the hint allows it (``Literal[...] | None``);
    None for a hint that is not a choice."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    if get_origin(hint) in (Union, UnionType):
        literals = [a for a in get_args(hint) if get_origin(a) is Literal]
        if len(literals) == 1 and set(get_args(hint)) == {literals[0], type(None)}:
            return (None, *get_args(literals[0]))
    return None


@cache
def field_choices(cls: type) -> dict[str, tuple]:
    """``literal_choices`` of each field that ``cls`` itself declares (not those of its bases), by name."""
    hints = get_type_hints(cls)
    own = vars(cls).get("__annotations__", {})
    choices = {name: literal_choices(hints[name]) for name in own}
    return {name: found for name, found in choices.items() if found is not None}


def check_choices(obj: Any, cls: type) -> None:
    """Refuse a value of a ``Literal``-typed field of ``cls`` that the type does not list (``check_choice``'s
    message): the type is the one list of an option's values, read here and by LightningCLI."""
    for name, allowed in field_choices(cls).items():
        check_choice(name, getattr(obj, name), allowed)
