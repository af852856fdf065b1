"""`full` through kvcompress must be indistinguishable from transformers' DynamicCache."""

import pytest
import torch
from transformers import DynamicCache

from kvcompress import make_cache

from .conftest import left_padded


def _generate(model, ids, mask, cache, steps=24):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=cache,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )


def _max_logit_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


def test_full_equals_dynamic_cache_left_padded_batch(tiny):
    ids, mask = left_padded([40, 29])
    ours = _generate(tiny, ids, mask, make_cache(tiny, "full"))
    reference = _generate(tiny, ids, mask, DynamicCache(config=tiny.config))
    assert torch.equal(ours.sequences, reference.sequences)
    assert _max_logit_diff(ours, reference) <= 1e-5


def test_full_equals_dynamic_cache_chunked_prefill(tiny):
    ids = torch.randint(3, 512, (1, 70), generator=torch.Generator().manual_seed(1))
    caches = [make_cache(tiny, "full"), DynamicCache(config=tiny.config)]
    logits = [[], []]
    with torch.no_grad():
        for start, stop in [(0, 17), (17, 18), (18, 40), (40, 41), (41, 70)]:
            for i, cache in enumerate(caches):
                logits[i].append(tiny(input_ids=ids[:, start:stop], cache=cache, use_cache=True).logits)
    assert caches[0].get_seq_length() == caches[1].get_seq_length() == 70
    assert torch.cat(logits[0], 1).sub(torch.cat(logits[1], 1)).abs().max() <= 1e-5


def test_full_equals_dynamic_cache_on_default_model(default_model):
    model, tokenizer = default_model
    inputs = tokenizer(
        ["The capital of France is", "In a hole in the ground there lived a"],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    ours = _generate(model, inputs.input_ids, inputs.attention_mask, make_cache(model, "full"), steps=16)
    reference = _generate(model, inputs.input_ids, inputs.attention_mask, DynamicCache(config=model.config), steps=16)
    assert torch.equal(ours.sequences, reference.sequences)
    assert _max_logit_diff(ours, reference) <= 1e-5


def test_generate_keeps_working_when_resumed(tiny):
    """A second generate call on the same cache slices its input by get_seq_length and continues."""
    ids, mask = left_padded([30])
    resumed = []
    for cache in (make_cache(tiny, "full"), DynamicCache(config=tiny.config)):
        first = _generate(tiny, ids, mask, cache, steps=5).sequences
        extended = torch.cat([first, torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(2))], 1)
        resumed.append(_generate(tiny, extended, torch.ones_like(extended), cache, steps=5).sequences)
    assert torch.equal(*resumed)  # ours, then DynamicCache's


def test_beam_search_and_multiple_sequences_match_dynamic_cache(tiny):
    ids, mask = left_padded([25, 19])
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=10,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        pad_token_id=0,
    )
    ours = tiny.generate(cache=make_cache(tiny, "full"), **kwargs)
    reference = tiny.generate(cache=DynamicCache(config=tiny.config), **kwargs)
    assert torch.equal(ours, reference)


def test_crop_rolls_back_like_dynamic_cache(tiny):
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(4))
    for strategy in ("full", "int8:residual=8"):
        ours, reference = make_cache(tiny, strategy), DynamicCache(config=tiny.config)
        with torch.no_grad():
            for cache in (ours, reference):
                tiny(input_ids=ids[:, :30], cache=cache, use_cache=True)
                cache.crop(-7)
            assert ours.get_seq_length() == reference.get_seq_length() == 23
            assert all(layer.stored == 23 for layer in ours.layers)
            logits = [tiny(input_ids=ids[:, 23:40], cache=c, use_cache=True).logits for c in (ours, reference)]
        tolerance = 1e-5 if strategy == "full" else 5e-2
        assert (logits[0] - logits[1]).abs().max() <= tolerance


def test_evicting_cache_refuses_to_crop_after_eviction(tiny):
    cache = make_cache(tiny, "window:window=8")
    with torch.no_grad():
        tiny(input_ids=torch.randint(3, 512, (1, 20)), cache=cache, use_cache=True)
    assert not cache.is_croppable
    with pytest.raises(RuntimeError, match="cannot crop a window cache that has already evicted tokens"):
        cache.crop(-2)
