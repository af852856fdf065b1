"""The lm-eval model `kvcompress`: lm-eval's HF model (any `load_model` spec) whose every request runs through a fresh
kvcompress cache under a strategy, with per-request records of resident KV bytes, TTFT and decode ms/token.

lm-eval 0.4.13 finds a model only once its module is imported: importing this one registers `kvcompress`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(f"the lm-eval integration needs lm-eval: pip install -e '.[eval]' ({error})") from None

from ..cache import make_cache
from ..models import load_model
from ..strategy import AXES, parse_strategy

REQUESTS_FILE = "kvcompress_requests.jsonl"  # the request records' file in a run's --output_path
# the strategy parameters' names: lm-eval splits --model_args at their commas, and they are joined back
_STRATEGY_KEYS = {
    f.name
    for registry in AXES.values()
    for name in registry.names()
    for f in dataclasses.fields(registry.get(name))
    if f.init
}


def usable_device(device: str | None) -> str:
    """The device asked for, or the CPU where it is CUDA and there is none (lm-eval's CLI defaults to cuda:0)."""
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return device or "cpu"


class _StepClock(LogitsProcessor):
    """Called once per generated token: time to the first one (TTFT) and between the next ones (decode)."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, [time.perf_counter()]

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def summary(self) -> dict[str, float | None]:
        gaps = [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]
        return {
            "ttft_s": self.stamps[1] - self.stamps[0] if len(self.stamps) > 1 else None,
            "decode_ms_per_token": 1e3 * sum(gaps) / len(gaps) if gaps else None,
        }


@register_model("kvcompress")
class KVCompressLM(HFLM):
    """lm-eval's HF model whose every request runs through a fresh kvcompress cache.

    generate_until goes through `generate(cache=...)`; log-likelihoods prefill the context into the cache and score
    the continuation token by token through it (lm-eval's HF model scores in one uncompressed forward). Per request it
    records resident KV bytes per tier, TTFT and decode ms/token, in `self.requests` and, with `requests_file`, one
    JSON line each.
    """

    def __init__(
        self,
        pretrained: str = "default",
        strategy: str = "full",
        dtype: str | None = None,
        kv_dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        requests_file: str | None = None,
        offload_dir: str | None = None,
        weights: str | None = None,
        tokenizer: str | None = None,
        **kwargs: Any,
    ):
        # tokenizer: read by lm-eval's synthetic tasks (RULER) to size their prompts; the model uses its own
        strategy_parts = [str(strategy)]
        for key in [k for k in kwargs if k in _STRATEGY_KEYS]:  # lm-eval split `strategy=sink:sinks=4,window=512`
            strategy_parts.append(f"{key}={kwargs.pop(key)}")
        self.spec = parse_strategy(",".join(strategy_parts))
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer for the kvcompress model, got {batch_size!r}")
        if usable_device(device) != (device or "cpu"):
            warnings.warn(f"device={device!r} but CUDA is not available: running on the CPU", stacklevel=2)
        model, tokenizer = load_model(
            pretrained, dtype=dtype, device=usable_device(device), kv_dtype=kv_dtype, weights=weights
        )
        if tokenizer is None:
            raise ValueError(f"pretrained={pretrained!r} has no tokenizer; lm-eval needs text in and out")
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), **kwargs)
        self.pretrained, self.offload_dir = pretrained, offload_dir
        self.requests_file = Path(requests_file) if requests_file else None
        self.requests: list[dict] = []

    def _cache(self):
        return make_cache(self.model, self.spec, offload_dir=self.offload_dir)

    def _record(self, kind: str, cache, tokens: int, **timing: float | None) -> None:
        record = {
            "strategy": str(self.spec),
            "kind": kind,
            "seen_tokens": cache.get_seq_length(),
            "stored_tokens": cache.stored_tokens(),
            "kv_bytes": cache.kv_bytes(),
            "new_tokens": tokens,
            **timing,
        }
        self.requests.append(record)
        if self.requests_file is not None:
            self.requests_file.parent.mkdir(parents=True, exist_ok=True)
            with self.requests_file.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        clock = _StepClock(self.model.device)
        with self._cache() as cache:
            out = super()._model_generate(
                context,
                max_length,
                stop,
                cache=cache,
                logits_processor=LogitsProcessorList([clock]),
                **generation_kwargs,
            )
            self._record("generate_until", cache, out.shape[1] - context.shape[1], **clock.summary())
        return out

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        results = []
        for request, context_enc, continuation_enc in tqdm(
            requests, disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests"
        ):
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            count = min(len(continuation_enc), len(tokens) - 1)
            inputs, targets = tokens[:-1], torch.tensor(tokens[-count:], device=self.model.device)
            split = len(inputs) - count + 1  # the context, through the token that predicts the first target
            with self._cache() as cache:
                start = time.perf_counter()
                logits = [
                    self.model(input_ids=torch.tensor([inputs[:split]], device=self.model.device), cache=cache).logits[
                        0, -1:
                    ]
                ]
                prefilled = time.perf_counter()
                for token in inputs[split:]:
                    step = torch.tensor([[token]], device=self.model.device)
                    logits.append(self.model(input_ids=step, cache=cache).logits[0, -1:])
                logprobs = F.log_softmax(torch.cat(logits).to(self.softmax_dtype or torch.float32), dim=-1)
                answer = (
                    logprobs.gather(-1, targets[:, None]).sum().item(),
                    bool((logprobs.argmax(-1) == targets).all()),
                )
                steps = len(inputs) - split
                self._record(
                    "loglikelihood",
                    cache,
                    count,
                    ttft_s=prefilled - start,
                    decode_ms_per_token=1e3 * (time.perf_counter() - prefilled) / steps if steps else None,
                )
            results.append(answer)
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results
