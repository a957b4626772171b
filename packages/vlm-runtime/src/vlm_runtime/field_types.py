"""Type checks for the settings dataclasses, read from their field annotations.

Each settings class checks its values' ranges in ``__post_init__``; a value of the wrong type would reach those
comparisons and fail there with a ``TypeError`` about ``<`` (or pass silently, for ``==``). ``check_field_types``
runs first and gives a wrong type the same kind of error as a wrong value: a ``ValueError`` naming the option.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check_field_types"]


def check_field_types(instance: Any, prefix: str = "") -> None:
    """Raise ``ValueError`` for the first field of the dataclass ``instance`` whose value does not fit its
    annotation. ``prefix`` turns a field name into its option name (``ThinkingConfig.budget`` is
    ``thinking_budget``). Annotations this cannot check (callables, arrays, ...) accept anything."""
    for name, hint in _field_hints(type(instance)).items():
        value = getattr(instance, name)
        if not _fits(value, hint):
            raise ValueError(f"{prefix}{name} must be {_describe(hint)}, got {value!r}")


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # numpy integers count; True does not
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        # Settings take any sequence where they store a tuple (the class converts it).
        if not isinstance(value, Sequence):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(item, args[0]) for item in value)
        return len(args) == len(value) and all(_fits(item, arg) for item, arg in zip(value, args, strict=True))
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        if not isinstance(value, Mapping):
            return False
        key, item = args or (Any, Any)
        return all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            pairs = typing.get_origin(args[0]) is tuple and len(typing.get_args(args[0])) == 2
            return f"a sequence of {_PLURALS.get(args[0], 'pairs' if pairs else 'items')}"
        return f"a sequence of {len(args)} items"
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return "a mapping"
    return {bool: "a bool (True or False)", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


_PLURALS = {str: "strings", int: "integers", float: "numbers"}
