"""GPU paths: the same strategies on CUDA must match the CPU run. Skipped where torch sees no GPU."""

import pytest
import torch

from kvcompress import make_cache

from .conftest import left_padded, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible to torch")


@pytest.mark.parametrize("strategy", ["full", "int8", "fp8", "int4", "sink:sinks=4,window=16+int8:residual=4"])
def test_cuda_matches_cpu(strategy):
    ids, mask = left_padded([40, 28])
    logits = {}
    for device in ("cpu", "cuda"):
        model = tiny_model().to(device)
        cache = make_cache(model, strategy)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            cache=cache,
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        logits[device] = torch.stack(out.logits, 1).cpu()
        assert all(part.read().is_cuda == (device == "cuda") for layer in cache.layers for part in layer._parts())
    assert (logits["cpu"] - logits["cuda"]).abs().max() <= 5e-3


@pytest.mark.parametrize(
    "reference, offloaded",
    [
        ("full", "full+host"),
        ("full", "full+host:engine=torch"),
        ("int8", "int8+host:policy=cold,window=8"),
        ("full", "full+disk"),
    ],
)
def test_offload_tiers_on_cuda_are_bit_identical(reference, offloaded):
    ids, mask = left_padded([40, 28])
    model = tiny_model().to("cuda")
    logits = {}
    for strategy in (reference, offloaded):
        with make_cache(model, strategy) as cache:
            out = model.generate(
                input_ids=ids.cuda(),
                attention_mask=mask.cuda(),
                cache=cache,
                max_new_tokens=20,
                min_new_tokens=20,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            logits[strategy] = torch.stack(out.logits, 1)
            if strategy == offloaded and "cold" not in strategy:
                assert cache.kv_bytes().get("device", 0) == 0
    assert torch.equal(logits[reference], logits[offloaded])
