"""One prefill serves every strategy: replaying its K/V into a strategy's cache is the same as prefilling through it."""

import pytest
import torch

import kvcompress
from kvcompress import make_cache
from kvcompress.prefill import ATTENTION_ROWS, Prefill, Recording
from kvcompress.retention import RETENTIONS

from .conftest import tiny_model


@pytest.mark.parametrize(
    "strategy",
    [
        "full",
        "int8:residual=4",
        "window:window=16",
        "sink:sinks=2,window=16+int4",
        "full+disk",
        "int8+disk:policy=cold,window=4",
    ],
)
def test_replayed_prefill_is_bit_identical_to_a_prefill(strategy, tmp_path):
    model = tiny_model()
    ids = torch.randint(3, 512, (2, 50), generator=torch.Generator().manual_seed(2))
    prefix = Prefill.of(model, ids[:, :40])
    outputs = []
    with torch.no_grad():
        for replayed in (False, True):
            with make_cache(model, strategy, offload_dir=tmp_path) as cache:
                if replayed:
                    prefix.replay(cache)
                    logits = [prefix.last_logits]
                else:
                    logits = [
                        model(
                            input_ids=ids[:, :40],
                            cache=cache,
                            use_cache=True,  # as generate prefills
                            logits_to_keep=1,
                        ).logits[:, -1]
                    ]
                kv_bytes, stored = cache.kv_bytes(), cache.stored_tokens()
                for t in range(40, 50):  # then decode steps read what the prefill left
                    logits.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1])
                outputs.append((torch.stack(logits), kv_bytes, stored, cache.get_seq_length()))
    (direct, *facts), (replayed, *replayed_facts) = outputs
    assert torch.equal(direct, replayed) and facts == replayed_facts


def test_a_recording_keeps_the_last_queries_attention_of_every_layer_and_is_no_strategy():
    """`kvcompress.Prefill.of(..., attention=True)` records, per layer, the pooled attention of the prompt's last
    ATTENTION_ROWS queries (rows that sum to 1 over the keys they see) and each token's attention mass; the retention
    that records is not a member anyone can ask for."""
    model = tiny_model()
    ids = torch.randint(3, 512, (1, 80), generator=torch.Generator().manual_seed(3))
    prefill = kvcompress.Prefill.of(model, ids, attention=True)
    assert len(prefill.attention) == model.config.num_hidden_layers
    heads = model.config.num_key_value_heads
    for (rows, mass), (keys, _) in zip(prefill.attention, prefill.kv):
        assert rows.shape == (1, heads, ATTENTION_ROWS, 80) and keys.shape[2] == 80
        torch.testing.assert_close(rows.sum(-1), torch.ones(1, heads, ATTENTION_ROWS))
        assert bool((rows[..., -ATTENTION_ROWS:].triu(1) == 0).all())  # causal: no query sees a later token
        torch.testing.assert_close(mass.sum(-1), torch.full((1, heads), 80.0))  # each query gives out 1
    assert Recording.name not in RETENTIONS.names()
    assert Prefill.of(model, ids, attention=True, mass=False).attention[0][1] is None
