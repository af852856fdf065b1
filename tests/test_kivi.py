"""KIVI (arXiv:2402.02750) against a plain reference written from the paper's definition: keys quantized per channel
over groups of tokens, values per token; exact bytes with its full-precision residual; every retention and tier."""

import warnings

import pytest
import torch

from kvcompress import expected_kv_bytes, make_cache, parse_strategy
from kvcompress.accounting import kv_sizer
from kvcompress.cache import seam_retentions
from kvcompress.retention import RETENTIONS

from .conftest import left_padded, tiny_model
from .members import TIERS, strategies
from .test_eviction import MEMBERS

_TINY = torch.finfo(torch.float16).tiny
# the retentions that evict inside `update` (test_eviction's MEMBERS holds the score-based ones)
POSITIONAL = {"full": "full", "window": "window:window=20", "sink": "sink:sinks=2,window=16"}
KIVI = "kivi:bits=2,group=4,residual=4"  # within every MEMBERS window, so it composes with each


def _reference(x: torch.Tensor, group: int, bits: int, along_tokens: bool) -> torch.Tensor:
    """Asymmetric min/max quantization round trip: per channel over `group` tokens (keys), or per `group` channels
    of a token (values); float16 minimum and scale, as stored."""
    g = x.unflatten(2, (-1, group)) if along_tokens else x.unflatten(-1, (-1, group))
    axis = 3 if along_tokens else -1
    lo = g.amin(axis, keepdim=True).half().float()
    levels = 2**bits - 1
    scale = ((g.amax(axis, keepdim=True) - lo) / levels).half().float().clamp_min(_TINY)
    q = ((g - lo) / scale).round().clamp(0, levels)
    return (q * scale + lo).flatten(2, 3) if along_tokens else (q * scale + lo).flatten(-2)


def _kv(seed=0, tokens=64, dim=64):
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, 3, tokens, dim, generator=gen), torch.randn(2, 3, tokens, dim, generator=gen)
    keys[..., 5] = keys[..., 5] * 20 + 30  # an outlier channel, as real keys have
    return keys, values


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [8, 32])
def test_round_trip_is_the_reference_and_within_half_a_step(bits, group):
    codec = parse_strategy(f"kivi:bits={bits},group={group},residual={group}").codec
    keys, values = _kv()
    packed_k, packed_v = codec.encode_pair(keys, values)
    decoded_k = codec.decode(packed_k, torch.empty_like(keys))
    decoded_v = codec.decode(packed_v, torch.empty_like(values))
    torch.testing.assert_close(decoded_k, _reference(keys, group, bits, along_tokens=True), rtol=0, atol=1e-5)
    torch.testing.assert_close(decoded_v, _reference(values, group, bits, along_tokens=False), rtol=0, atol=1e-5)
    levels = 2**bits - 1
    by_channel = keys.unflatten(2, (-1, group))
    step = (by_channel.amax(3, keepdim=True) - by_channel.amin(3, keepdim=True)) / levels
    assert ((decoded_k - keys).unflatten(2, (-1, group)).abs() <= step * 0.5 * 1.01 + 1e-3).all()
    by_token = values.unflatten(-1, (-1, group))
    step = (by_token.amax(-1, keepdim=True) - by_token.amin(-1, keepdim=True)) / levels
    assert ((decoded_v - values).unflatten(-1, (-1, group)).abs() <= step * 0.5 * 1.01 + 1e-3).all()


def test_per_channel_keys_keep_an_outlier_channel_from_the_others():
    """The paper's case for per-channel keys: a per-token 2-bit scale spans the outlier channel's range, so every
    other channel of the token loses its precision; per channel, each keeps its own."""
    keys, values = _kv()
    kivi, int2 = parse_strategy("kivi:bits=2,group=32,residual=32").codec, parse_strategy("int2:group=64").codec
    per_channel = kivi.decode(kivi.encode_pair(keys, values)[0], torch.empty_like(keys))
    per_token = int2.decode(int2.encode(keys), torch.empty_like(keys))
    others = [c for c in range(64) if c != 5]
    assert (per_channel - keys)[..., others].abs().mean() < 0.5 * (per_token - keys)[..., others].abs().mean()


def test_bytes_are_the_codes_and_the_scales():
    codec = parse_strategy("kivi:bits=2,group=8,residual=8").codec
    keys, values = _kv()
    for packed in codec.encode_pair(keys, values):
        assert sum(t.nbytes for t in packed.values()) == 2 * 3 * 64 * codec.bytes_per_token(64, torch.float32)
    assert codec.bytes_per_token(64, torch.float32) == 64 // 4 + 2 * 8 * 2  # codes, 8 scale and 8 minimum slots


def test_bad_parameters_name_the_parameter_and_the_allowed_values():
    with pytest.raises(ValueError, match="kivi:bits must be 2 or 4, got 3"):
        parse_strategy("kivi:bits=3")
    with pytest.raises(ValueError, match="kivi:group must be >= 1"):
        parse_strategy("kivi:group=0,residual=4")
    for residual in (0, 20):
        with pytest.raises(ValueError, match=r"kivi:residual must be a multiple of kivi:group \(8\) and at least one"):
            parse_strategy(f"kivi:group=8,residual={residual}")
    with pytest.raises(ValueError, match=r"kivi:group \(3\) must divide the model's head_dim \(16\)"):
        make_cache(tiny_model(), "kivi:group=3,residual=3")
    with pytest.raises(ValueError, match="kivi encodes keys a group of 8 tokens at a time"):
        parse_strategy("kivi:group=8,residual=8").codec.encode_pair(*_kv(tokens=12))


def test_tokens_enter_the_codes_a_key_group_at_a_time():
    """Up to `residual` recent tokens stay in the model dtype; past that the oldest enter the codes in whole groups."""
    model = tiny_model()
    cache = make_cache(model, "kivi:bits=2,group=8,residual=16")
    codec, encoded = cache.spec.codec, []
    with torch.no_grad():
        out = model(input_ids=torch.randint(3, 512, (1, 30)), cache=cache)
        for _ in range(20):
            layer = cache.layers[0]
            encoded.append(layer.n_encoded)
            assert len(layer.recent_k) <= 16 and layer.n_encoded == codec.encoded_tokens(layer.stored)
            out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=cache)
    assert encoded == [16] * 3 + [24] * 8 + [32] * 8 + [40]  # 30 tokens: 16 encoded, 14 held; a group per 8 steps


def _generate(strategy, ids, mask, **options):
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "host tier on a CPU model")
        cache = make_cache(model, strategy, **options)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                cache=cache,
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
    return cache, model, torch.stack(out.scores).nan_to_num(0.0, 0.0, 0.0)


def test_the_retentions_tables_cover_every_registered_retention():
    assert set(MEMBERS) | set(POSITIONAL) == set(RETENTIONS.names())
    assert set(POSITIONAL).isdisjoint(seam_retentions())


@pytest.mark.parametrize("retention", [*POSITIONAL.values(), *MEMBERS.values()], ids=[*POSITIONAL, *MEMBERS])
def test_composes_with_every_retention(retention):
    """After eviction the codes hold whole key groups again and the bytes are what each layer's count of stored tokens
    makes, exactly (the analytic size of the tokens seen, where a retention holds more than its budget: adakv's
    filler, kvzip's tokens after the prompt, is a lower bound); attending over the codes gives what decoding them
    gives."""
    strategy = f"{retention}+{KIVI}"
    ids, mask = left_padded([52, 37])
    cache, model, scores = _generate(strategy, ids, mask)
    _, _, fused_scores = _generate(strategy, ids, mask, fused=True)
    torch.testing.assert_close(fused_scores, scores, rtol=1e-4, atol=1e-4)
    sizer, codec = kv_sizer(model, strategy), cache.spec.codec
    by_layer, batch = 0, ids.shape[0]
    for layer in cache.layers:
        encoded = codec.encoded_tokens(layer.stored)
        assert layer.n_encoded == encoded and encoded % codec.group == 0 and len(layer.recent_k) <= codec.residual
        by_layer += batch * ((layer.stored - encoded) * sizer.full_token + encoded * sizer.encoded_token)
        by_layer += batch * layer.stored * sizer.state_token
    assert cache.kv_bytes() == {"device": by_layer}
    assert by_layer >= expected_kv_bytes(model, strategy, cache.get_seq_length(), batch=batch)


@pytest.mark.parametrize("tier", strategies(TIERS))
def test_every_tier_gives_the_device_tiers_numbers(tier, tmp_path):
    strategy = f"sink:sinks=2,window=16+{KIVI}"
    ids, mask = left_padded([52, 37])
    device, _, expected = _generate(strategy, ids, mask)
    tiered, _, scores = _generate(f"{strategy}+{tier}", ids, mask, offload_dir=str(tmp_path))
    assert torch.equal(scores, expected)
    assert [layer.stored for layer in tiered.layers] == [layer.stored for layer in device.layers]
    tiered.close()
