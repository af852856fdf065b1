"""The members tables the codec and tier tests iterate: every registered codec with its strategies from easy (the
defaults) to hard (small groups, other formats, a residual the tiny model's few tokens fill), and every tier with
its placements. A registered member missing here fails a completeness test (test_codecs, test_accounting), as a
score-based retention missing from test_eviction's MEMBERS does."""

import torch
from transformers import AutoModelForCausalLM

from kvcompress import parse_strategy

from .conftest import tiny_model

CODECS = {
    "none": ["none"],
    "int8": ["int8", "int8:group=8", "int8:group=8,residual=4"],
    "fp8": ["fp8", "fp8:format=e5m2,group=8", "fp8:group=8,residual=4"],
    "int4": ["int4", "int4:group=8", "int4:group=8,residual=4"],
    "int2": ["int2", "int2:group=8", "int2:group=8,residual=4"],
    "nf4": ["nf4", "nf4:residual=4"],
    "fp4": ["fp4", "fp4:residual=4"],
    # kivi's default residual (128) outlasts the tiny model's prompts: smaller ones put tokens in the codes
    "kivi": ["kivi:group=8,residual=16", "kivi:bits=4,group=4,residual=8", "kivi:bits=2,group=4,residual=4"],
}
TIERS = {
    "device": ["device"],
    "host": ["host", "host:policy=cold,sinks=2,window=8"],
    "disk": ["disk", "disk:policy=cold,sinks=2,window=8"],
}


def strategies(table: dict[str, list[str]]) -> list[str]:
    """Every strategy of an axis's table, easy to hard, member after member."""
    return [strategy for row in table.values() for strategy in row]


def quantizing() -> list[str]:
    """The codec strategies that encode tokens (every codec but the lossless ones)."""
    return [strategy for strategy in strategies(CODECS) if not parse_strategy(strategy).codec.lossless]


def model_for(strategy: str, attn: str = "sdpa"):
    """The tiny model, or its twin with head_dim 32 where the codec cannot store the tiny model's 16-wide heads (its
    `check` refuses them: bitsandbytes quantises blocks of 32 channels at least). A fresh model: a cache may route
    its attention."""
    model = tiny_model(attn)
    try:
        parse_strategy(strategy).codec.check(model.config.head_dim, torch.float32)
    except ValueError:
        model.config.head_dim = 32
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(model.config, attn_implementation=attn).eval()
    return model
