"""A name -> class registry with strict lookups (lm-eval style): unknown names fail with the allowed ones."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def did_you_mean(name: str, candidates) -> str:
    """' Did you mean 'int8'?' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    def __init__(self, axis: str):
        self.axis = axis
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str):
        def decorator(cls: type[T]) -> type[T]:
            if name in self._classes:
                raise ValueError(f"{self.axis} {name!r} is registered twice")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        return list(self._classes)

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def get(self, name: str) -> type[T]:
        if name not in self._classes:
            raise ValueError(
                f"unknown {self.axis} {name!r}; allowed: {', '.join(self._classes)}."
                + did_you_mean(name, self._classes)
            )
        return self._classes[name]

    def build(self, name: str, params: dict[str, Any]) -> T:
        """Instantiate `name` from string or typed parameters; unknown parameters name the allowed ones."""
        cls = self.get(name)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in params.items():
            if key not in fields:
                allowed = ", ".join(fields) or "none"
                raise ValueError(
                    f"unknown parameter {key!r} for {self.axis} {name!r}; allowed: {allowed}."
                    + did_you_mean(key, fields)
                )
            kwargs[key] = _coerce(value, hints[key], f"{name}:{key}")
        return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    target = hint if isinstance(hint, type) else str
    try:
        if target is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        return target(value)
    except ValueError:
        raise ValueError(f"parameter {where} must be {target.__name__}, got {value!r}") from None
