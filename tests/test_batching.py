"""Sessions decoding together through `decode_rows`: each keeps its own cache, they join and leave between steps, and
every session's tokens, logits and bytes are those it gets decoding alone, for every members-table row."""

import pytest
import torch

from kvcompress import make_cache
from kvcompress.batching import decode_rows

from .members import model_for
from .test_saving import EVERY_ROW

PROMPTS = (30, 23, 41)  # three sessions of different contexts
STEPS = 8


def _prompts(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, n), generator=generator) for n in PROMPTS]


@torch.no_grad()
def _prefill(model, cache, prompt) -> torch.Tensor:
    return model(input_ids=prompt, cache=cache, use_cache=True).logits[0, -1]


@torch.no_grad()
def _alone(model, strategy: str, prompt: torch.Tensor) -> tuple[list[int], torch.Tensor, dict]:
    """One session decoded alone by plain forwards, as generate does: tokens, logits and its final bytes."""
    with make_cache(model, strategy) as cache:
        logits = [_prefill(model, cache, prompt)]
        for _ in range(STEPS - 1):
            token = torch.tensor([[int(logits[-1].argmax())]])
            logits.append(model(input_ids=token, cache=cache, use_cache=True).logits[0, -1])
        return [int(row.argmax()) for row in logits], torch.stack(logits), cache.kv_bytes()


@pytest.mark.parametrize("strategy", EVERY_ROW)
def test_sessions_joining_and_leaving_a_batch_decode_as_alone(strategy):
    model = model_for(strategy)
    prompts = _prompts(model.config.vocab_size)
    alone = [_alone(model, strategy, prompt) for prompt in prompts]
    caches = [make_cache(model, strategy) for _ in prompts]
    logits = [[_prefill(model, cache, prompt)] for cache, prompt in zip(caches, prompts)]
    batches = []
    for step in range(STEPS + 3):
        # sessions 0 and 1 start together, session 2 joins at the fourth step, each leaves when its answer is done
        rows = [i for i in ((0, 1, 2) if step >= 3 else (0, 1)) if len(logits[i]) < STEPS]
        if not rows:
            break
        batches.append(len(rows))
        out = decode_rows(model, [caches[i] for i in rows], [int(logits[i][-1].argmax()) for i in rows])
        for row, i in enumerate(rows):
            logits[i].append(out[row])
    assert 3 in batches and 2 in batches  # the batch grew and shrank
    for i, (tokens, reference, kv_bytes) in enumerate(alone):
        assert [int(row.argmax()) for row in logits[i]] == tokens, f"session {i}"
        torch.testing.assert_close(torch.stack(logits[i]), reference, rtol=0, atol=1e-5)
        assert caches[i].kv_bytes() == kv_bytes, f"session {i}"
        caches[i].close()


def test_refuses_what_it_cannot_batch():
    model = model_for("full")
    one, two = make_cache(model, "full"), make_cache(model, "full", batch_size=2)
    with pytest.raises(ValueError, match="one token per cache"):
        decode_rows(model, [one], [1, 2])
    with pytest.raises(ValueError, match="batch_size=1"):
        decode_rows(model, [one, two], [1, 2])
    with pytest.raises(ValueError, match="at least one"):
        decode_rows(model, [], [])
