"""Constructor specs, ``{"class_path": ..., "init_args": {...}}``: how a part was built, as plain JSON.

The same form as a recipe's ``class_path`` entries, so a spec written into a checkpoint or an exported
directory is read back by the code that reads recipes (``lightning.pytorch.cli.instantiate_class``).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from lightning.pytorch.cli import instantiate_class

_MISSING = object()


def class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def init_args(obj: object) -> dict[str, Any]:
    """Constructor arguments read back from same-named attributes (schedulers keep theirs); a ValueError names
    the first one that cannot be read back as plain JSON."""
    args: dict[str, Any] = {}
    for name, parameter in inspect.signature(type(obj).__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = getattr(obj, name, _MISSING)
        if value is _MISSING or callable(value) or not _is_plain(value):  # absent, or a same-named method
            raise ValueError(f"cannot read {type(obj).__name__}'s constructor argument {name!r} back from the object")
        args[name] = value
    return args


def spec_of(obj: object) -> dict[str, Any]:
    """``obj``'s spec (a ValueError where :func:`init_args` cannot read its arguments back)."""
    return {"class_path": class_path(obj), "init_args": init_args(obj)}


def instantiate(spec: dict[str, Any]) -> Any:
    """A new object from a spec."""
    return instantiate_class((), {"class_path": spec["class_path"], "init_args": spec.get("init_args") or {}})


def _is_plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
