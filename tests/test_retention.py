"""Evicting retentions against a full-sequence forward whose visibility is spelled out as an explicit 4D mask."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from kvcompress import make_cache, parse_strategy

from .conftest import left_padded

STRATEGIES = ["window:window=16", "sink:sinks=4,window=16", "sink:sinks=3,window=9"]


def resident(retention, seen: int, pad: int) -> set[int]:
    """What the retention keeps after `seen` tokens of a row with `pad` left-padding tokens, from its definition."""
    if retention.name == "window":
        return set(range(max(0, seen - retention.window), seen))
    if seen <= retention.capacity(seen):
        return set(range(seen))
    sinks = range(pad, min(pad + retention.sinks, seen))
    return set(sinks) | set(range(seen - retention.window, seen))


def reference_logits(model, ids, mask, steps, retention):
    """One forward over the whole sequence; query t of step [start, stop) sees what was resident after `start`
    tokens plus the step's tokens up to t, minus padding."""
    batch, total = ids.shape
    visible = torch.zeros(batch, 1, total, total, dtype=torch.bool)
    for start, stop in steps:
        for row in range(batch):
            pad = int((mask[row] == 0).sum())
            before = sorted(resident(retention, start, pad))
            for t in range(start, stop):
                keys = torch.tensor(before + list(range(start, t + 1)))
                visible[row, 0, t, keys] = mask[row, keys].bool()
                visible[row, 0, t, t] = True  # a pad query sees itself, so its (unused) softmax is defined
    bias = torch.zeros(visible.shape, dtype=model.dtype).masked_fill(~visible, torch.finfo(model.dtype).min)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=bias, position_ids=positions).logits


def cached_logits(model, ids, mask, steps, cache, budget):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = []
    with torch.no_grad():
        for start, stop in steps:
            out = model(
                input_ids=ids[:, start:stop],
                attention_mask=mask[:, :stop],
                position_ids=positions[:, start:stop],
                cache=cache,
                use_cache=True,
            )
            logits.append(out.logits)
            assert all(layer.stored <= budget for layer in cache.layers)
            assert cache.get_seq_length() == stop
    return torch.cat(logits, 1)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "steps",
    [
        [(0, 40)] + [(t, t + 1) for t in range(40, 60)],  # prefill, then decode
        [(0, 7), (7, 8), (8, 25), (25, 26), (26, 27), (27, 45), (45, 60)],  # multi-token steps across the budget
    ],
)
def test_matches_masked_full_forward_left_padded(tiny, strategy, steps):
    ids, mask = left_padded([60, 47, 31])
    retention = parse_strategy(strategy).retention
    ours = cached_logits(tiny, ids, mask, steps, make_cache(tiny, strategy), retention.capacity(0))
    reference = reference_logits(tiny, ids, mask, steps, retention)
    real = mask.bool()
    assert (ours - reference)[real].abs().max() <= 1e-4


def test_sinks_are_chosen_after_the_padding(tiny):
    ids, mask = left_padded([60, 40])
    cache = make_cache(tiny, "sink:sinks=4,window=16")
    steps = [(0, 30)] + [(t, t + 1) for t in range(30, 60)]
    cached_logits(tiny, ids, mask, steps, cache, 20)
    positions = cache.layers[0].positions
    assert positions[0, :4].tolist() == [0, 1, 2, 3]
    assert positions[1, :4].tolist() == [20, 21, 22, 23]  # 20 pad tokens, then the first real ones
    assert positions[:, 4:].tolist() == [list(range(44, 60))] * 2


class _RecordStored(LogitsProcessor):
    def __init__(self, cache):
        self.cache, self.stored = cache, []

    def __call__(self, input_ids, scores):
        self.stored.append(max(layer.stored for layer in self.cache.layers))
        return scores


@pytest.mark.parametrize(
    "strategy", ["window:window=32", "sink:sinks=4,window=32", "sink:sinks=4,window=32+int8:residual=8"]
)
def test_budget_holds_over_300_generated_tokens(tiny, strategy):
    ids, mask = left_padded([50, 20])
    cache = make_cache(tiny, strategy)
    recorder = _RecordStored(cache)
    out = tiny.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=cache,
        max_new_tokens=300,
        min_new_tokens=300,
        do_sample=False,
        logits_processor=LogitsProcessorList([recorder]),
        pad_token_id=0,
    )
    budget = parse_strategy(strategy).retention.capacity(0)
    assert len(recorder.stored) == 300 and max(recorder.stored) <= budget
    assert cache.get_seq_length() == out.shape[1] - 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_and_resume_match_masked_reference(tiny, strategy):
    ids, mask = left_padded([30, 22])
    retention = parse_strategy(strategy).retention
    cache = make_cache(tiny, strategy)
    kwargs = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    first = tiny.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=6, min_new_tokens=6, **kwargs)
    extra = torch.randint(3, 512, (2, 5), generator=torch.Generator().manual_seed(3))
    ids2 = torch.cat([first.sequences, extra], 1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    second = tiny.generate(
        input_ids=ids2, attention_mask=mask2, cache=cache, max_new_tokens=6, min_new_tokens=6, **kwargs
    )

    n, n2 = ids.shape[1], ids2.shape[1]
    steps = [(0, n)] + [(t, t + 1) for t in range(n, n + 5)] + [(n + 5, n2)] + [(t, t + 1) for t in range(n2, n2 + 5)]
    reference = reference_logits(
        tiny, second.sequences, torch.cat([mask2, torch.ones(2, 6, dtype=mask.dtype)], 1), steps, retention
    )
    ours = torch.stack(first.logits + second.logits, 1)
    expected = reference[:, [n - 1 + i for i in range(6)] + [n2 - 1 + i for i in range(6)]]
    assert (ours - expected).abs().max() <= 1e-4


def test_eviction_frees_memory(tiny):
    ids, mask = left_padded([20])
    cache = make_cache(tiny, "window:window=16")
    sizes = []
    with torch.no_grad():
        out = tiny(input_ids=ids, cache=cache, use_cache=True)
        for _ in range(40):
            token = out.logits[:, -1:].argmax(-1)
            out = tiny(input_ids=token, cache=cache, use_cache=True)
            sizes.append(cache.kv_bytes()["device"])
    assert cache.get_seq_length() == 60 and cache.stored_tokens() == 16
    assert max(sizes) == min(sizes)  # rolling: no growth however long the sequence
    full = make_cache(tiny, "full")
    with torch.no_grad():
        tiny(input_ids=torch.randint(3, 512, (1, 60)), cache=full, use_cache=True)
    assert sizes[-1] < full.kv_bytes()["device"] * 16 / 60 * 1.1
