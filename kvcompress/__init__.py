"""kvcompress: KV-cache retention x codec x tier strategies for Hugging Face transformers.

import kvcompress as kc
model, tokenizer = kc.load_model("default")
out = model.generate(**inputs, cache=kc.make_cache(model, "sink:window=256+int8"))
"""

from .accounting import bytes_per_token, expected_kv_bytes
from .cache import KVCache, KVLayer, load_cache, make_cache
from .models import load_model
from .prefill import Prefill
from .retention.kvzip import reconstruct
from .static import compiled_step
from .strategy import PRESETS, StrategySpec, list_strategies, parse_strategy
from .version import __version__ as __version__

__all__ = [
    "PRESETS",
    "Prefill",
    "KVCache",
    "KVLayer",
    "StrategySpec",
    "bytes_per_token",
    "compiled_step",
    "expected_kv_bytes",
    "list_strategies",
    "load_cache",
    "load_model",
    "make_cache",
    "parse_strategy",
    "reconstruct",
]
