"""Measured resident bytes against the analytic formula, for every codec and tier of the members tables."""

import pytest
import torch

from kvcompress import bytes_per_token, expected_kv_bytes, make_cache, tiers
from kvcompress.models import load_config

from .members import CODECS, TIERS, model_for, strategies

COMPOSED = [
    "window:window=256",
    "sink:sinks=4,window=256",
    "sink:window=256+int8:residual=32",
    "int4:group=16,residual=64",
    "sink:sinks=4,window=256+kivi:bits=2,group=8,residual=16",
    "h2o:budget=100,window=16,when=budget+nf4:residual=16",
    "h2o:budget=100,window=16,when=budget+kivi:group=8,residual=16",
]


def test_members_table_covers_every_registered_tier():
    assert set(TIERS) == set(tiers.TIERS.names())
    assert all(str(name) in strategy for name, row in TIERS.items() for strategy in row)


def _generate(strategy, tmp_path, prompt=260, steps=64):
    """A batch of 2 prompted and decoded `steps` tokens; the cache and its model."""
    model = model_for(strategy)  # accounting is mechanics: the tiny model's geometry is counted the same way
    ids = torch.randint(3, 512, (2, prompt), generator=torch.Generator().manual_seed(0))
    cache = make_cache(model, strategy, offload_dir=str(tmp_path))
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            do_sample=False,
            pad_token_id=0,
        )
    assert cache.get_seq_length() == prompt + steps
    return cache, model


@pytest.mark.parametrize("strategy", strategies(CODECS) + COMPOSED)
def test_measured_agrees_with_analytic_after_prefill_and_64_steps(strategy, tmp_path):
    """Exact, or over by what views of kept tokens may pin of evicted ones (at most 1/64: tiers.base.own)."""
    cache, model = _generate(strategy, tmp_path)
    expected = expected_kv_bytes(model, strategy, 260 + 64, batch=2)
    assert set(cache.kv_bytes()) == {"device"}
    assert expected <= cache.kv_bytes()["device"] <= expected * (1 + 1 / 64)


@pytest.mark.filterwarnings("ignore:host tier on a CPU model")
@pytest.mark.parametrize("tier", strategies(TIERS))
def test_every_tier_holds_at_least_the_analytic_bytes(tier, tmp_path):
    """Off the device a tier reserves room (blocks, rows): its memories together hold at least what is stored; the
    device tier holds exactly that."""
    strategy = f"sink:sinks=4,window=256+int8:residual=8+{tier}"
    cache, model = _generate(strategy, tmp_path, steps=16)
    expected = expected_kv_bytes(model, strategy, 260 + 16, batch=2)
    measured = cache.kv_bytes()
    if tier == "device":
        assert measured == {"device": expected}
    else:
        assert sum(measured.values()) >= expected
    cache.close()


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
    assert bytes_per_token(config, "int2:group=32") == 32 * 8 * 2 * (32 + 4 * 2 * 2)
    # kivi: K's 128 channel scales and minimums per 32 tokens are 4 + 4 float16s a token, as V's 4 groups are
    assert bytes_per_token(config, "kivi") == 32 * 8 * 2 * (32 + 4 * 2 * 2)
    assert bytes_per_token(config, "kivi:bits=4,group=64,residual=128") == 32 * 8 * 2 * (64 + 2 * 2 * 2)
    assert bytes_per_token(config, "sink") == 32 * (8 * 2 * 128 * 2 + 4)
    assert expected_kv_bytes(config, "full", 32768, batch=32) == 128 * 2**30


def test_residual_and_budget_in_expected_bytes():
    config = load_config("llama-3.1-8b")
    full_token = 32 * 8 * 128 * 2 * 2
    assert expected_kv_bytes(config, "int8:residual=128", 100) == 100 * full_token
    assert expected_kv_bytes(config, "int8:residual=128", 1000) == 128 * full_token + 872 * 32 * 8 * 2 * 130
    assert expected_kv_bytes(config, "window:window=512", 10_000) == 512 * full_token
    kivi_token = 32 * 8 * 2 * (32 + 16)  # kivi:bits=2,group=32,residual=128: tokens enter the codes 32 at a time
    assert expected_kv_bytes(config, "kivi", 128) == 128 * full_token
    assert expected_kv_bytes(config, "kivi", 129) == 97 * full_token + 32 * kivi_token
    assert expected_kv_bytes(config, "kivi", 1000) == 104 * full_token + 896 * kivi_token
