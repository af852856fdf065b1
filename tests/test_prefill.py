"""One prefill serves every strategy: replaying its K/V into a strategy's cache is the same as prefilling through it."""

import pytest
import torch
from kvcompress.evals.prefill import Prefill

from kvcompress import make_cache

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
