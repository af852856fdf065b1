"""Preallocated device storage (make_cache(..., grow=N)): the same outputs bit for bit as exact storage, appends
written in place, the room counted in kv_bytes() and given back after eviction."""

import pytest
import torch

from kvcompress import expected_kv_bytes, make_cache

from .conftest import left_padded, tiny_model

STRATEGIES = [
    "full",
    "int8:residual=16",
    "fp8",
    "sink:sinks=4,window=20",
    "window:window=24+int4:group=8",
    "knorm:budget=24,window=8",
    "h2o:budget=24,window=8+int8:residual=8",
    "full+disk",
]


def _generate(model, strategy, grow, ids, mask, **kwargs):
    with make_cache(model, strategy, grow=grow) as cache:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            cache=cache,
            max_new_tokens=40,
            min_new_tokens=40,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
        return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grown_storage_generates_bit_identical_outputs(tiny, strategy):
    ids, mask = left_padded([45, 30])
    exact = _generate(tiny, strategy, 0, ids, mask)
    grown = _generate(tiny, strategy, 16, ids, mask)
    assert torch.equal(grown[0], exact[0]) and torch.equal(grown[1], exact[1])


def test_grown_storage_under_beam_search(tiny):
    ids, mask = left_padded([30, 22])
    assert torch.equal(
        _generate(tiny, "int8", 16, ids, mask, num_beams=3)[1], _generate(tiny, "int8", 0, ids, mask, num_beams=3)[1]
    )


@torch.no_grad()
def test_appends_write_in_place_and_the_room_is_counted():
    model = tiny_model()
    full_bytes = expected_kv_bytes(model, "full", 1)  # one token, every layer, K and V
    with make_cache(model, "full", grow=64) as cache:
        model(input_ids=torch.randint(3, 512, (1, 100)), cache=cache)
        storage = cache.layers[0].recent_k.read().untyped_storage().data_ptr()
        assert sum(cache.kv_bytes().values()) == 128 * full_bytes  # room for 128 tokens, 100 held
        for token in range(3, 31):  # tokens 101..128 fit in the room: no new buffer
            model(input_ids=torch.tensor([[token]]), cache=cache)
        assert cache.layers[0].recent_k.read().untyped_storage().data_ptr() == storage
        model(input_ids=torch.tensor([[7]]), cache=cache)  # the 129th grows it by 64
        assert sum(cache.kv_bytes().values()) == 192 * full_bytes
        assert cache.get_seq_length() == len(cache.layers[0].recent_k) == 129


@torch.no_grad()
def test_eviction_gives_the_room_back():
    model = tiny_model()
    with make_cache(model, "window:window=16", grow=64) as cache:
        model(input_ids=torch.randint(3, 512, (1, 300)), cache=cache)
        for token in range(3, 10):
            model(input_ids=torch.tensor([[token]]), cache=cache)
        held = sum(cache.kv_bytes().values())
    room = expected_kv_bytes(model, "full", 64)  # 16 tokens kept in room for 64: not the 320 the prefill needed
    positions = expected_kv_bytes(model, "window:window=16", 300) - expected_kv_bytes(model, "full", 16)
    assert held <= room + positions


def test_bad_grow_names_the_parameter(tiny):
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="grow must be a number of tokens >= 0"):
            make_cache(tiny, "full", grow=bad)


def _decode_steps(model, strategy: str, steps: int, grad: bool):
    """Greedy decode steps by hand (generate always runs without autograd): the logits of every step, the addresses
    of the workspace buffers seen, and the bytes the cache's peak holds beside its storage."""
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with make_cache(model, strategy) as cache, torch.set_grad_enabled(grad):
        logits, out, addresses = model(input_ids=ids, cache=cache).logits[:, -1:], [], set()
        for _ in range(steps):
            logits = model(input_ids=logits.argmax(-1), cache=cache).logits
            out.append(logits.detach())
            addresses |= {buffer.data_ptr() for buffer in cache.workspace.buffers.values()}
        return torch.cat(out, 1), addresses, cache.peak_bytes - sum(cache.kv_bytes().values()), cache.workspace


@pytest.mark.parametrize(
    "strategy", ["int8", "fp8:format=e5m2", "int4:group=8", "int8:residual=8", "h2o:budget=24,window=8+int8"]
)
def test_decode_steps_decode_the_history_into_one_reused_workspace(strategy):
    model = tiny_model()
    reused, addresses, beside, workspace = _decode_steps(model, strategy, 20, grad=False)
    fresh, none, _, _ = _decode_steps(model, strategy, 20, grad=True)  # autograd may keep them: fresh memory
    assert torch.equal(reused, fresh)
    assert len(addresses) == 2 and not none  # K's and V's, shared by every layer, for every step (60 tokens < 256)
    assert beside >= sum(buffer.untyped_storage().nbytes() for buffer in workspace.buffers.values())
