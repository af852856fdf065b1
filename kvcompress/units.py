"""Token counts as people write them: `512`, `4k`, `1.5k`, `32K` (k = 1024). One parser for the CLI, sweep files,
report settings and lm-eval metadata."""

from __future__ import annotations


def parse_tokens(value: int | str, name: str = "token count") -> int:
    """'4k' -> 4096, '512' -> 512, 512 -> 512; anything else raises ValueError naming `name`."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer or NNk (e.g. 512, 4k), got {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    try:
        tokens = float(text[:-1]) * 1024 if text.endswith("k") else float(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer or NNk (e.g. 512, 4k), got {value!r}") from None
    if tokens != int(tokens):
        raise ValueError(f"{name} must be a whole number of tokens, got {value!r}")
    return int(tokens)


def parse_token_list(value: int | str | list, name: str = "lengths") -> list[int]:
    """'512,4k' or [512, '4k'] -> [512, 4096]."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    return [parse_tokens(item, name) for item in items if str(item).strip()]
