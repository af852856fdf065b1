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
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), cache=cache,
                             max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        logits[device] = torch.stack(out.logits, 1).cpu()
        assert all(t.is_cuda == (device == "cuda") for layer in cache.layers for t in layer._tensors())
    assert (logits["cpu"] - logits["cuda"]).abs().max() <= 5e-3
