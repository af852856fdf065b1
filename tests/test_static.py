"""The static decode step (make_cache(..., compile=True)): storage allocated once and written in place gives what the
growing cache gives, counts exactly its room, and compiles whole into one graph that later steps and caches reuse."""

import re
from contextlib import nullcontext

import pytest
import torch
from transformers import DynamicCache

from kvcompress import compiled_step, expected_kv_bytes, make_cache, parse_strategy
from kvcompress.cache import static_refusal

from .conftest import left_padded, tiny_model
from .members import CODECS, model_for, strategies


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def tiny(request):
    """Models of this module's own: a static cache switches an sdpa model to `grouped_sdpa`."""
    return tiny_model(request.param)


def _generate(model, ids, mask, strategy, generate=None, **options):
    with (
        make_cache(model, strategy, **options) if strategy else nullcontext(DynamicCache(config=model.config)) as cache
    ):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            cache=cache,
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
            **(generate or {}),
        )
        return out.sequences, torch.stack(out.scores).nan_to_num(0.0, 0.0, 0.0)  # -inf: tokens min_new_tokens bans


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("strategy", strategies(CODECS))
def test_static_storage_generates_what_the_growing_cache_does(attn, strategy):
    """Every codec that stores each token encoded (no residual) has a static step giving what the growing cache
    gives; the others are refused with the reason."""
    model = model_for(strategy, attn)
    ids, mask = left_padded([45, 30])
    refusal = static_refusal(parse_strategy(strategy))
    assert (refusal is not None) == (parse_strategy(strategy).codec.residual_tokens > 0)
    if refusal is not None:
        with pytest.raises(ValueError, match=re.escape(refusal)):
            make_cache(model, strategy, compile=True, max_tokens=70)
    else:
        tokens, scores = _generate(model, ids, mask, strategy)
        static_tokens, static_scores = _generate(model, ids, mask, strategy, compile=True, max_tokens=70)
        assert torch.equal(static_tokens, tokens)
        torch.testing.assert_close(static_scores, scores, rtol=0, atol=1e-5)  # masked slots of the room add nothing


def test_static_storage_under_beam_search(tiny):
    ids, mask = left_padded([30, 22])
    beams = {"num_beams": 3}
    torch.testing.assert_close(
        _generate(tiny, ids, mask, "int8", beams, compile=True, max_tokens=60)[1],
        _generate(tiny, ids, mask, "int8", beams)[1],
        rtol=0,
        atol=1e-5,
    )


@torch.no_grad()
@pytest.mark.parametrize("strategy", ["full", "int4"])
def test_static_storage_is_written_in_place_and_counts_its_room(strategy):
    model = tiny_model()
    with make_cache(model, strategy, compile=True, max_tokens=128) as cache:
        model(input_ids=torch.randint(3, 512, (2, 100)), cache=cache)
        storage = next(iter(cache.layers[0].k.values())).data_ptr()
        for token in range(3, 23):
            model(input_ids=torch.full((2, 1), token), cache=cache)
        assert next(iter(cache.layers[0].k.values())).data_ptr() == storage
        assert int(cache.get_seq_length()) == cache.stored_tokens() == 120
        assert sum(cache.kv_bytes().values()) == expected_kv_bytes(model, strategy, 128, batch=2)  # the room, exactly
        with pytest.raises(ValueError, match="holds max_tokens=128 tokens per sequence; this step would make it 130"):
            model(input_ids=torch.full((2, 10), 5), cache=cache)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU-only: inductor's CPU code for this step (torch 2.13) "
    "gave NaN logits under AVX2 code generation and corrupted the heap now and then (README)",
)
@torch.no_grad()
def test_compiled_step_matches_eager_and_compiles_once():
    model = tiny_model().cuda()
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1)).cuda()

    def decode(step, **options):
        logits = []
        with make_cache(model, "full", **options) as cache:
            last = model(input_ids=ids, cache=cache).logits[:, -1:]
            for _ in range(10):
                last = step(input_ids=last.argmax(-1), cache=cache).logits
                logits.append(last)
        return torch.cat(logits, dim=1)

    eager = decode(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = [decode(compiled_step(model), compile=True, max_tokens=50) for _ in range(2)]  # two caches
    # `full`: inductor's code for int8 codes gave NaN logits when it generated AVX2 code (torch 2.13; README)
    assert torch.equal(compiled[0].argmax(-1), eager.argmax(-1))
    torch.testing.assert_close(compiled[0], eager, rtol=0, atol=1e-4)
    torch.testing.assert_close(compiled[1], compiled[0], rtol=0, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # every step of both caches, one graph
    assert not torch._dynamo.utils.counters["graph_break"]


def test_grouped_sdpa_attends_as_sdpa_does_and_the_seam_still_routes():
    ids, mask = left_padded([45, 30])
    reference, model = tiny_model("sdpa"), tiny_model("sdpa")  # the same weights; 4 query heads over 2 KV heads
    before = {strategy: _generate(reference, ids, mask, strategy) for strategy in (None, "snapkv:budget=32,window=8")}
    make_cache(model, "int8", compile=True, max_tokens=70)
    assert model.config._attn_implementation == "kvcompress_grouped_sdpa"
    after = _generate(model, ids, mask, None)  # DynamicCache, padding mask: now the grouped rows
    assert torch.equal(after[0], before[None][0])
    torch.testing.assert_close(after[1], before[None][1], rtol=0, atol=1e-5)
    snapkv = _generate(model, ids, mask, "snapkv:budget=32,window=8")  # the seam wraps the sdpa it stands for
    assert model.config._attn_implementation == "kvcompress_sdpa"
    assert torch.equal(snapkv[0], before["snapkv:budget=32,window=8"][0])


def test_bad_compile_input_names_the_parameter(tiny):
    with pytest.raises(ValueError, match="compile must be True .* or False"):
        make_cache(tiny, "full", compile="yes")
    with pytest.raises(ValueError, match="retention full on the device tier, got sink"):
        make_cache(tiny, "sink+int8", compile=True, max_tokens=64)
    with pytest.raises(ValueError, match="retention full on the device tier"):
        make_cache(tiny, "full+host", compile=True, max_tokens=64)
    with pytest.raises(ValueError, match="int8:residual must be 0, got 16"):
        make_cache(tiny, "int8:residual=16", compile=True, max_tokens=64)
    with pytest.raises(ValueError, match="max_tokens must be the most tokens a sequence will hold"):
        make_cache(tiny, "int8", compile=True)
    with pytest.raises(ValueError, match="leave grow out, got grow=16"):
        make_cache(tiny, "int8", compile=True, max_tokens=64, grow=16)
