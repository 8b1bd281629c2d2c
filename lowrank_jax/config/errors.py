"""One-line configuration errors: pydantic's ``ValidationError`` as ``ConfigError("<field>: <message>")``.

The schema classes are wrapped with :func:`one_line_errors`, so building a section or a whole
config in any way (the YAML loader, :func:`dataclasses.replace`, a direct call) raises
:class:`ConfigError` naming the dotted field (``model.heads``, ``steps``), which the CLI prints on
one line. The messages read like the rules: ``must be positive, got 0``, ``must be in [0, 1), got
1.0``, ``expected an integer, got 2.5``, ``must be one of ('float32', 'bfloat16'), got 'float16'``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

T = TypeVar("T", bound=type)


class ConfigError(ValueError):
    """A configuration problem; the message names the offending field."""

    @classmethod
    def from_exception(cls, e: BaseException) -> ConfigError:
        """The first line of ``e``'s message (its type name if it has none), as a ConfigError."""
        return cls(first_line(e))


def first_line(e: BaseException) -> str:
    """The first line of ``str(e)``, or the exception's type name when the message is empty."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# pydantic error type -> what the field expected
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
}
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def one_line_errors(section: str) -> Callable[[T], T]:
    """Make a pydantic dataclass raise :class:`ConfigError` naming ``section.field`` ("" for the top level)."""

    def wrap(cls: T) -> T:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as e:
                raise _config_error(e, cls, section) from None

        cls.__init__ = __init__
        return cls

    return wrap


def _config_error(e: ValidationError, cls: type, section: str) -> ConfigError:
    err = e.errors(include_url=False)[0]
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):  # a cross-field rule: its message already names the field
        return cause
    names = [p for p in err["loc"] if isinstance(p, str)]  # tuple items are reported as the field
    name = names[0] if names else ""
    key = ".".join(([section] if section else []) + names)
    return ConfigError(f"{key}: {_message(err, cls, section, name)}")


def _message(err: dict[str, Any], cls: type, section: str, name: str) -> str:
    kind, value = err["type"], err["input"]
    if kind == "unexpected_keyword_argument":
        return _unknown_key(cls, section)
    if kind in _BOUND_ERRORS:
        info = cls.__pydantic_fields__[name]
        hint = f" ({info.description})" if info.description else ""
        return f"must be {_bounds(_constraints(info))}{hint}, got {value}"
    if kind == "literal_error":
        return f"must be one of {_choices(cls, name)}, got {value!r}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {value!r}"
    return f"{err['msg']}, got {value!r}"


def _unknown_key(cls: type, section: str) -> str:
    fields = dataclasses.fields(cls)
    if section:
        return f"unknown key (known {section}.* keys: {', '.join(sorted(f.name for f in fields))})"
    hints = typing.get_type_hints(cls)
    plain = sorted(f.name for f in fields if not dataclasses.is_dataclass(hints[f.name]))
    sections = [f"{f.name}.*" for f in fields if dataclasses.is_dataclass(hints[f.name])]
    return f"unknown key (known: {', '.join(plain)}, {', '.join(sections)})"


def _constraints(info: Any) -> list[Any]:
    """A field's constraint metadata, also from inside an optional type (``Annotated[float, Field(ge=0)] | None``)."""
    union = typing.get_origin(info.annotation) in (typing.Union, types.UnionType)
    inner = [m for arm in typing.get_args(info.annotation) if union for m in getattr(arm, "__metadata__", ())]
    return [*info.metadata, *(c for m in inner for c in getattr(m, "metadata", [m]))]  # a Field's own constraints


def _bounds(metadata: list[Any]) -> str:
    """``positive``, ``>= 0``, ``in [0, 1)``, ... from a field's ``Field(gt=, ge=, lt=, le=)``."""
    b = {k: getattr(m, k) for m in metadata for k in ("gt", "ge", "lt", "le") if getattr(m, k, None) is not None}
    low = ("(", b["gt"]) if "gt" in b else ("[", b["ge"]) if "ge" in b else None
    high = (")", b["lt"]) if "lt" in b else ("]", b["le"]) if "le" in b else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return "positive" if low == ("(", 0) else f"{'>' if low[0] == '(' else '>='} {low[1]}"
    assert high is not None
    return f"{'<' if high[0] == ')' else '<='} {high[1]}"


def _choices(cls: type, name: str) -> tuple[Any, ...]:
    typ = typing.get_type_hints(cls)[name]
    while typing.get_origin(typ) is not Literal and typing.get_args(typ):  # tuple[Literal[...], ...]
        typ = typing.get_args(typ)[0]
    return typing.get_args(typ)
