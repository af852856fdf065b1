"""Measured resident bytes against the analytic formula."""

import pytest
import torch

from kvcompress import bytes_per_token, expected_kv_bytes, make_cache
from kvcompress.models import load_config

from .conftest import tiny_model

STRATEGIES = [
    "full",
    "int8",
    "fp8",
    "int4",
    "window:window=256",
    "sink:sinks=4,window=256",
    "sink:window=256+int8:residual=32",
    "int4:group=16,residual=64",
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_measured_agrees_with_analytic_after_prefill_and_64_steps(strategy):
    model = tiny_model()  # accounting is mechanics: the tiny model's geometry is counted the same way
    ids = torch.randint(3, 512, (2, 260), generator=torch.Generator().manual_seed(0))
    cache = make_cache(model, strategy)
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            max_new_tokens=65,
            min_new_tokens=65,
            do_sample=False,
            pad_token_id=0,
        )
    seen = cache.get_seq_length()
    assert seen == ids.shape[1] + 64
    measured = cache.kv_bytes()["device"]
    expected = expected_kv_bytes(model, strategy, seen, batch=2)
    assert abs(measured - expected) <= 0.01 * expected


@pytest.mark.parametrize("strategy", ["nf4", "fp4:residual=16", "h2o:budget=100,window=16,when=budget+nf4:residual=16"])
def test_bitsandbytes_codecs_measured_agrees_with_analytic(strategy):
    from transformers import AutoModelForCausalLM

    config = tiny_model().config
    config.head_dim = 32  # bitsandbytes quantises one head per block: 32 is its smallest block
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 512, (2, 140), generator=torch.Generator().manual_seed(0))
    cache = make_cache(model, strategy)
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            max_new_tokens=9,
            min_new_tokens=9,
            do_sample=False,
            pad_token_id=0,
        )
    assert cache.kv_bytes()["device"] == expected_kv_bytes(model, strategy, 148, batch=2)


@pytest.mark.parametrize(
    "arch, per_token",
    [
        ("llama-3.1-8b", 32 * 8 * 128 * 2 * 2),  # 131,072 B
        ("qwen2.5-7b", 28 * 4 * 128 * 2 * 2),  # 57,344 B
        ("mistral-7b", 32 * 8 * 128 * 2 * 2),
        ("smollm2-135m", 30 * 3 * 64 * 2 * 2),  # bfloat16, as the published checkpoint
    ],
)
def test_full_bytes_per_token_by_hand(arch, per_token):
    assert bytes_per_token(load_config(arch), "full") == per_token


def test_codec_bytes_per_token_by_hand():
    config = load_config("llama-3.1-8b")  # bfloat16, head_dim 128
    assert bytes_per_token(config, "int8") == 32 * 8 * 2 * (128 + 2)
    assert bytes_per_token(config, "int8:group=32") == 32 * 8 * 2 * (128 + 4 * 2)
    assert bytes_per_token(config, "int4:group=32") == 32 * 8 * 2 * (64 + 4 * 2 * 2)
    assert bytes_per_token(config, "sink") == 32 * (8 * 2 * 128 * 2 + 4)
    assert expected_kv_bytes(config, "full", 32768, batch=32) == 128 * 2**30


def test_residual_and_budget_in_expected_bytes():
    config = load_config("llama-3.1-8b")
    full_token = 32 * 8 * 128 * 2 * 2
    assert expected_kv_bytes(config, "int8:residual=128", 100) == 100 * full_token
    assert expected_kv_bytes(config, "int8:residual=128", 1000) == 128 * full_token + 872 * 32 * 8 * 2 * 130
    assert expected_kv_bytes(config, "window:window=512", 10_000) == 512 * full_token
