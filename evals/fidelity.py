"""Teacher-forced fidelity of a strategy against the full cache: the same tokens go in, next-token distributions
are compared step by step (top-1 agreement and KL divergence), and the text's perplexity under each."""

from __future__ import annotations

import math

import torch

from ..cache import make_cache
from ..prefill import Prefill
from ..strategy import StrategySpec


@torch.no_grad()
def step_logits(
    model, input_ids: torch.Tensor, strategy: str | StrategySpec, prefill: int, prefix: Prefill | None = None
) -> torch.Tensor:
    """Prefill `prefill` tokens of each row (windows of a text, equal lengths, no padding), then feed the rest one
    token per step through the strategy's cache. Returns float32 logits [rows * steps, vocab] predicting tokens
    prefill .. end of each row. `prefix`: the rows' prefill, made once (`Prefill.of`) and shared by strategies."""
    prefix = prefix or Prefill.of(model, input_ids[:, :prefill])
    with make_cache(model, strategy) as cache:
        logits = [prefix.fill(model, cache)]
        for t in range(prefill, input_ids.shape[1] - 1):
            logits.append(model(input_ids=input_ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1).flatten(0, 1).float()


def compare(reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor | None = None) -> dict[str, float]:
    """top1: share of steps whose argmax agrees; kl: mean KL(reference || candidate) in nats. With the tokens that
    actually follow (`targets`, one per step): the text's perplexity under each and its change in percent."""
    log_ref, log_cand = reference.log_softmax(-1), candidate.log_softmax(-1)
    kl = (log_ref.exp() * (log_ref - log_cand)).sum(-1)
    result = {
        "top1": (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item(),
        "kl": kl.mean().item(),
        "steps": reference.shape[0],
    }
    if targets is not None:
        nll_ref = -log_ref.gather(-1, targets[:, None]).mean().item()
        nll_cand = -log_cand.gather(-1, targets[:, None]).mean().item()
        result.update(
            ppl_full=math.exp(nll_ref), ppl=math.exp(nll_cand), ppl_change_pct=100 * (math.exp(nll_cand - nll_ref) - 1)
        )
    return result
