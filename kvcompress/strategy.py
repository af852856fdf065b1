"""StrategySpec: one point of retention x codec x tier, and its string grammar.

    sink:sinks=4,window=1024+int8:group=64,residual=128+device

Parts are joined by `+`; each names a member of one axis, with optional `key=value` parameters after `:`.
Axes left out take their default (full retention, no codec, device tier).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .codecs import CODECS, Codec
from .registry import Registry, did_you_mean
from .retention import RETENTIONS, Retention
from .tiers import TIERS, Tier

AXES: dict[str, Registry] = {"retention": RETENTIONS, "codec": CODECS, "tier": TIERS}
PRESETS = ("full", "int8", "fp8", "int4", "window", "sink")


def _member_params(member: Any) -> dict[str, Any]:
    return {f.name: getattr(member, f.name) for f in dataclasses.fields(member) if f.init}


def _format_member(member: Any) -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(member) if f.init}
    changed = {k: v for k, v in _member_params(member).items() if v != defaults[k]}
    return member.name + (":" + ",".join(f"{k}={v}" for k, v in changed.items()) if changed else "")


@dataclass(frozen=True)
class StrategySpec:
    retention: Retention = field(default_factory=lambda: RETENTIONS.build("full", {}))
    codec: Codec = field(default_factory=lambda: CODECS.build("none", {}))
    tier: Tier = field(default_factory=lambda: TIERS.build("device", {}))

    def __post_init__(self):
        residual, retention = self.codec.residual_tokens, self.retention
        if retention.seam and residual > retention.window:  # per-head eviction never splits the residual
            raise ValueError(
                f"{self.codec.name}:residual ({residual}) must not exceed {retention.name}:window "
                f"({retention.window}): the residual tokens must be the protected recent ones"
            )
        budget = retention.capacity(residual + 1)
        if budget is not None and residual > budget:
            raise ValueError(
                f"{self.codec.name}:residual ({residual}) must not exceed the {retention.name} budget ({budget} tokens)"
            )

    @property
    def params(self) -> dict[str, dict[str, Any]]:
        return {axis: _member_params(getattr(self, axis)) for axis in AXES}

    def __str__(self) -> str:
        """Canonical form: axes at their default member and parameters at their default value are left out."""
        default = StrategySpec()
        shown = [_format_member(getattr(self, a)) for a in AXES if getattr(self, a) != getattr(default, a)]
        return "+".join(shown) or "full"


def parse_strategy(text: str | StrategySpec) -> StrategySpec:
    """Parse the strategy grammar; unknown names or parameters raise ValueError listing what is allowed."""
    if isinstance(text, StrategySpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"strategy must be a non-empty string such as {' or '.join(PRESETS[:3])}, got {text!r}")
    members: dict[str, Any] = {}
    for part in text.strip().split("+"):
        name, _, arg_text = part.strip().partition(":")
        axis = next((a for a, reg in AXES.items() if name in reg), None)
        if axis is None:
            allowed = "; ".join(f"{a}: {', '.join(reg.names())}" for a, reg in AXES.items())
            raise ValueError(
                f"unknown strategy part {name!r} in {text!r}; allowed ({allowed})."
                + did_you_mean(name, [n for reg in AXES.values() for n in reg.names()])
            )
        if axis in members:
            raise ValueError(f"strategy {text!r} names two {axis} members: {members[axis].name} and {name}")
        params = {}
        for item in filter(None, arg_text.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"parameter {item!r} of {name!r} must be written key=value")
            params[key.strip()] = value.strip()
        members[axis] = AXES[axis].build(name, params)
    return StrategySpec(**members)


def split_strategies(text: str) -> list[str]:
    """Split a comma-separated list of strategies, keeping the commas between one member's parameters:
    `full,sink:sinks=4,window=512+int8,fp8` -> ['full', 'sink:sinks=4,window=512+int8', 'fp8']."""
    items: list[str] = []
    for piece in text.split(","):
        piece = piece.strip()
        is_parameter = re.match(r"\w+=", piece) is not None  # `key=value`, not `member:key=value` nor `a+b:k=v`
        if is_parameter and items:
            items[-1] += "," + piece
        elif piece:
            items.append(piece)
    return items


def list_strategies() -> list[StrategySpec]:
    """The named presets, each with its default parameters."""
    return [parse_strategy(name) for name in PRESETS]
