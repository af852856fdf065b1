"""Model geometry from a config alone: which decoder config holds the KV, its head size and the dtype it declares.
The cache, the accounting and the model loader all read it; it imports none of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import get_layer_types_and_kwargs


def decoder_config(model_or_config: Any):
    """The text decoder's config of a causal LM, or a ValueError saying why there is no KV to compress."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model type {config.model_type!r} is encoder-decoder; kvcompress handles decoder-only models")
    can_generate = getattr(model_or_config, "can_generate", None)
    if can_generate is not None and not can_generate():
        raise ValueError(
            f"{type(model_or_config).__name__} cannot generate (encoder-only or not a causal LM): there is no KV "
            "cache to compress; load it with AutoModelForCausalLM"
        )
    text = config.get_text_config(decoder=True)
    if getattr(text, "is_causal", True) is False:
        raise ValueError(f"model type {text.model_type!r} is not causal: there is no KV cache to compress")
    layer_types, _ = get_layer_types_and_kwargs(text)
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        raise ValueError(
            f"model type {text.model_type!r} has {', '.join(other)} layers; kvcompress compresses full-attention "
            "layers only (yet)"
        )
    return text


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def config_dtype(config) -> torch.dtype:
    """The dtype a config declares for its weights (and so its KV), float32 when it declares none."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


@dataclass(frozen=True)
class KVGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model_or_config, dtype: torch.dtype | None = None) -> KVGeometry:
        config = decoder_config(model_or_config)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim(config), dtype or config_dtype(config))
