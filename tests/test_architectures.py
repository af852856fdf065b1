"""The cache on other decoder families' attention code (tiny random configs): `full` equals DynamicCache, an
evicting + quantizing strategy generates within its budget, and the attention seam (score-based retention) computes
the family's attention: with nothing to evict it equals the full cache, and once routed the model's own attention
still serves a cache that is not kvcompress's."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from kvcompress import expected_kv_bytes, make_cache

from .conftest import left_padded

SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
)
FAMILIES = {
    "llama": dict(head_dim=16),
    "qwen2": dict(use_sliding_window=False),
    "qwen3": dict(head_dim=16),
    "mistral": dict(sliding_window=None, head_dim=16),
    "phi3": dict(),
    "gemma": dict(head_dim=32),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family):
    config = AutoConfig.for_model(family, **SMALL, **FAMILIES[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids, mask = left_padded([30, 21])
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    ours = model.generate(cache=make_cache(model, "full"), **kwargs)
    reference = model.generate(cache=DynamicCache(config=model.config), **kwargs)
    assert torch.equal(ours.sequences, reference.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ours.logits, reference.logits)) <= 1e-5

    cache = make_cache(model, "sink:sinks=2,window=16+int8")
    model.generate(cache=cache, **kwargs)
    assert cache.stored_tokens() == 18
    assert cache.kv_bytes()["device"] == expected_kv_bytes(model, "sink:sinks=2,window=16+int8", 41, batch=2)

    model.set_attn_implementation("eager")
    routed = model.generate(cache=make_cache(model, "h2o:budget=1000"), **kwargs)  # routes the model's attention
    assert model.config._attn_implementation == "kvcompress_eager"
    assert torch.equal(routed.sequences, reference.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(routed.logits, reference.logits)) <= 1e-4
    own = model.generate(cache=DynamicCache(config=model.config), **kwargs)
    assert max((a - b).abs().max().item() for a, b in zip(own.logits, reference.logits)) <= 1e-4

    strategy = "snapkv:budget=24,sinks=2,window=8,when=budget+int8:residual=4"
    cache = make_cache(model, strategy)
    model.generate(cache=cache, **kwargs)
    assert [layer.stored for layer in cache.layers] == [24, 24]
    assert cache.kv_bytes()["device"] == expected_kv_bytes(model, strategy, 41, batch=2)
