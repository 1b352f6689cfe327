"""`filled(T)`: a value of type T with every field of every nested dataclass set to a non-default value, built by
introspection, so that a test that pushes it through a mapping (proto, JSON) adds nothing by hand and a field added
anywhere is covered at once. Shared by the contract's tests (deliberation, monitoring)."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from datetime import UTC, datetime

from services.deliberation.domain import Phase


def filled(tp: typing.Any, name: str = "x") -> typing.Any:
    """A non-default value of type `tp` (every dataclass field set, recursively)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return filled(next(a for a in args if a is not type(None)), name)
    if origin is typing.Literal:
        return args[-1]
    if origin is tuple:
        return (filled(args[0], name),)
    if origin is dict:
        key = Phase.CHECK if args[0] is Phase else f"{name}-key"
        return {key: filled(args[1], name)}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: filled(hints[f.name], f.name) for f in dataclasses.fields(tp) if f.init})
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return list(tp)[-1]
    if tp is bool:
        return True
    if tp is int:
        return 3
    if tp is float:
        return 2.5
    if tp is str:
        return "def test_it():\n    assert True\n" if name == "tests" else f"{name}-value"
    if tp is datetime:
        return datetime(2026, 12, 4, 20, 30, 15, 123456, tzinfo=UTC)
    raise TypeError(f"no filler for {tp!r} ({name})")
