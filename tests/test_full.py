"""`full` through kvcompress must be indistinguishable from transformers' DynamicCache."""

import torch
from transformers import DynamicCache

from kvcompress import make_cache

from .conftest import left_padded


def _generate(model, ids, mask, cache, steps=24):
    return model.generate(
        input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=steps, min_new_tokens=steps,
        do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
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
    inputs = tokenizer(["The capital of France is", "In a hole in the ground there lived a"], return_tensors="pt",
                       padding=True, padding_side="left")
    ours = _generate(model, inputs.input_ids, inputs.attention_mask, make_cache(model, "full"), steps=16)
    reference = _generate(model, inputs.input_ids, inputs.attention_mask, DynamicCache(config=model.config), steps=16)
    assert torch.equal(ours.sequences, reference.sequences)
    assert _max_logit_diff(ours, reference) <= 1e-5


def test_generate_keeps_working_when_resumed(tiny):
    """A second generate call on the same cache slices its input by get_seq_length and continues."""
    ids, mask = left_padded([30])
    for cache in (make_cache(tiny, "full"), DynamicCache(config=tiny.config)):
        first = _generate(tiny, ids, mask, cache, steps=5).sequences
        extended = torch.cat([first, torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(2))], 1)
        out = _generate(tiny, extended, torch.ones_like(extended), cache, steps=5)
        if isinstance(cache, DynamicCache):
            assert torch.equal(out.sequences, ours)
        else:
            ours = out.sequences
