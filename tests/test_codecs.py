"""Codecs: error bounds on tensors, bytes against the model dtype, fidelity on the default model, and the promise
that appending a token encodes only that token."""

import pytest
import torch
from kvcompress.evals import haystack_text, text_ids
from kvcompress.evals.fidelity import compare, step_logits
from kvcompress.kernels import pack_nibbles, unpack_nibbles
from kvcompress.kernels.quant import pack_codes, unpack_codes

from kvcompress import codecs, expected_kv_bytes, load_model, make_cache, parse_strategy
from kvcompress.prefill import Prefill

from .conftest import left_padded, tiny_model
from .members import CODECS, model_for, strategies


def test_members_table_covers_every_registered_codec():
    assert set(CODECS) == set(codecs.CODECS.names())
    assert all(parse_strategy(strategy).codec.name == name for name, row in CODECS.items() for strategy in row)


def _roundtrip(codec, x):
    return codec.decode(codec.encode(x), torch.empty_like(x))


def _kv_like(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 50, 64, generator=gen)
    x[..., 5] *= 20  # an outlier channel, as real keys have
    return x


@pytest.mark.parametrize("codec, levels", [("int8", 127), ("int8:group=16", 127)])
def test_int8_error_is_half_a_step(codec, levels):
    spec = parse_strategy(codec).codec
    x = _kv_like()
    group = spec.group_size(64)
    step = x.unflatten(-1, (64 // group, group)).abs().amax(-1, keepdim=True) / levels
    err = (_roundtrip(spec, x) - x).unflatten(-1, (64 // group, group)).abs()
    assert (err <= step * 0.5 * 1.002 + 1e-6).all()


@pytest.mark.parametrize("codec", ["int4:group=16", "int2:group=16", "kivi:bits=4,group=16", "kivi:bits=2,group=16"])
def test_affine_error_is_half_a_step(codec):
    """Per token, over groups of 16 channels (kivi: its values)."""
    spec = parse_strategy(codec).codec
    x = _kv_like()
    g = x.unflatten(-1, (4, 16))
    step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / (2**spec.bits - 1)
    err = (_roundtrip(spec, x) - x).unflatten(-1, (4, 16)).abs()
    assert (err <= step * 0.5 * 1.01 + 1e-3).all()


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_bitsandbytes_4bit_error_is_half_the_widest_gap(name):
    """One block per token and head: the error is at most half the widest gap between the format's 16 levels,
    times that block's absmax; tokens encode independently, so appending one encodes only it."""
    from bitsandbytes.functional import get_4bit_type

    spec = parse_strategy(name).codec
    levels = get_4bit_type(name, device="cpu").float().sort().values
    x = _kv_like()
    absmax = x.abs().amax(-1, keepdim=True)
    err = (_roundtrip(spec, x) - x).abs()
    assert (err <= absmax * levels.diff().max() / 2 * 1.001 + 1e-6).all()
    assert err.mean() < 0.05 * absmax.mean()
    whole, parts = spec.encode(x), [spec.encode(x[:, :, :20]), spec.encode(x[:, :, 20:])]
    assert all(torch.equal(whole[k], torch.cat([p[k] for p in parts], 2)) for k in whole)
    assert spec.bytes_per_token(64, torch.bfloat16) == 32 + 4
    with pytest.raises(ValueError, match=r"head_dim \(16\) must be one of bitsandbytes' block sizes"):
        make_cache(tiny_model(), name)


@pytest.mark.parametrize("fmt, mantissa_bits", [("e4m3", 3), ("e5m2", 2)])
def test_fp8_relative_error(fmt, mantissa_bits):
    spec = parse_strategy(f"fp8:format={fmt}").codec
    x = _kv_like()
    absmax = x.abs().amax(-1, keepdim=True)
    err = (_roundtrip(spec, x) - x).abs()
    # normal numbers round to half a mantissa ulp; the float16 scale adds ~1e-3; subnormals get an absolute floor
    assert (err <= x.abs() * 2.0 ** -(mantissa_bits + 1) * 1.01 + absmax * 2e-3).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_decode_equals_conversion_for_every_code(fmt, dtype):
    """CPU decode lays the codes' bits into the output; it must give float8's own conversion for every finite code
    (all an encoder given finite values makes), into a view of a larger buffer (as into the workspace), under small
    scales and under scales whose product with the layout's power of two overflows (e4m3 into float32 over 2**8)."""
    spec = parse_strategy(f"fp8:format={fmt}").codec
    bits = torch.arange(256, dtype=torch.uint8)
    codes = bits.masked_fill(~bits.view(spec.qdtype).float().isfinite(), 0).view(spec.qdtype).view(1, 1, 4, 64)
    for high in (1.5, 60000.0 if dtype != torch.float16 else 1.0):
        scale = torch.linspace(0.5, high, 8, dtype=torch.float16).view(1, 1, 4, 2)
        direct = codes.to(dtype) * scale.to(dtype).repeat_interleave(32, -1)
        room = torch.full((1, 1, 6, 64), float("nan"), dtype=dtype)
        decoded = spec.decode({"q": codes, "scale": scale}, room[:, :, 1:5])
        assert torch.equal(decoded, direct), high
        assert room[:, :, [0, 5]].isnan().all()  # nothing written outside the view
    # a non-finite input makes a non-finite scale: its group decodes non-finite, the other groups as they were
    x = torch.randn(1, 1, 2, 64, dtype=dtype)
    x[0, 0, 0, 3] = float("inf")
    decoded = spec.decode(spec.encode(x), torch.empty_like(x))
    assert not decoded[0, 0, 0].isfinite().all() and decoded[0, 0, 1].isfinite().all()


def test_nibbles_round_trip():
    q = torch.randint(0, 16, (2, 3, 5, 32), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape[-1] == 16 and torch.equal(unpack_nibbles(packed), q)
    assert torch.equal(packed, q[..., :16] | q[..., 16:] << 4)  # channel c low, c + 16 high
    room = torch.full((2, 3, 7, 32), float("nan"))  # widened into a view, as a decode writes into the workspace
    assert torch.equal(unpack_nibbles(packed, room[:, :, 1:6]), q.float()) and room[:, :, [0, 6]].isnan().all()
    with pytest.raises(ValueError, match=r"int4 packs 2 channels per byte: the model's head_dim \(63\) must be a mul"):
        parse_strategy("int4:group=0").codec.check(63, torch.float32)


def test_two_bit_codes_round_trip():
    q = torch.randint(0, 4, (2, 3, 5, 32), dtype=torch.uint8)
    packed = pack_codes(q, 2)
    assert torch.equal(packed, q[..., :8] | q[..., 8:16] << 2 | q[..., 16:24] << 4 | q[..., 24:] << 6)
    room = torch.full((2, 3, 7, 32), float("nan"))
    assert torch.equal(unpack_codes(packed, 2, room[:, :, 1:6]), q.float()) and room[:, :, [0, 6]].isnan().all()
    with pytest.raises(ValueError, match=r"int2 packs 4 channels per byte: the model's head_dim \(62\) must be a mul"):
        parse_strategy("int2:group=0").codec.check(62, torch.float32)


@pytest.fixture(scope="module")
def smollm_geometry():
    return load_model("random:smollm2-135m", kv_dtype="bfloat16")[0]


@pytest.mark.parametrize("strategy, max_ratio", [("int8", 0.53), ("fp8", 0.53), ("int4", 0.32)])
def test_bytes_per_token_against_model_dtype(smollm_geometry, strategy, max_ratio):
    """Measured on the default model's geometry with KV held in bfloat16 (the dtype KV caches use on GPUs), whatever
    this CPU computes in."""
    model = smollm_geometry
    ids = torch.randint(3, 1000, (1, 200))
    sizes = {}
    for name in ("full", strategy):
        cache = make_cache(model, name)
        with torch.no_grad():
            model(input_ids=ids, cache=cache, use_cache=True)
        sizes[name] = cache.kv_bytes()["device"]
    assert sizes[strategy] <= max_ratio * sizes["full"]
    assert sizes[strategy] == expected_kv_bytes(model, strategy, 200)


def test_appending_encodes_only_the_new_token():
    model = tiny_model()
    cache = make_cache(model, "int8:residual=4")
    spec = cache.spec.codec
    encoded_lengths = []
    original_encode = type(spec).encode

    def spy(self, x):
        encoded_lengths.append(x.shape[2])
        return original_encode(self, x)

    type(spec).encode = spy
    try:
        with torch.no_grad():
            out = model(input_ids=torch.randint(3, 512, (1, 30)), cache=cache, use_cache=True)
            history = cache.layers[0].encoded_k["q"].read().clone()
            encoded_lengths.clear()
            for _ in range(10):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
    finally:
        type(spec).encode = original_encode
    assert encoded_lengths == [1] * (10 * 2)  # steps x layers (K and V in one call)
    assert torch.equal(cache.layers[0].encoded_k["q"].read()[:, :, :26], history)  # old codes never re-quantized
    assert cache.layers[0].recent_k.read().shape[2] == 4


# Teacher-forced fidelity on the default model: 8 windows of the shipped Declaration of Independence (the bounds
# below were measured on it), each 384 tokens prefilled (one prefill
# shared by every strategy), then 32 fed one per step: 256 predictions. Measured (top-1, mean KL nats) on 2 threads
# AVX512 / 1 thread AVX2: int8 0.969 / 0.969, 2.2e-3 / 2.0e-3; int8:residual=32 0.992 / 0.992, 1.9e-4; fp8 e4m3
# 0.941 / 0.949, 1.1e-2; fp8 e5m2 0.902 / 0.910, 5.1e-2 / 4.7e-2; int4 0.852 / 0.863, 1.2e-1 / 1.1e-1. Bounds sit
# ~3 points (8 near-tie flips) below the lower measurement and KL at ~2x. One window of 200 steps used to give int8
# 0.99 on one thread and 0.98 on two: a single window is too few near-ties to set a bound on.
FIDELITY = {
    "int8": (0.94, 5e-3),
    "int8:residual=32": (0.96, 5e-4),
    "fp8": (0.91, 2.5e-2),
    "fp8:format=e5m2": (0.87, 1e-1),
    "int4": (0.82, 2.5e-1),
}
WINDOWS, PREFILL, STEPS = 8, 384, 32


@pytest.fixture(scope="module")
def fidelity_inputs(default_model):
    model, tokenizer = default_model
    ids = text_ids(tokenizer(haystack_text(), return_tensors="pt").input_ids[0], PREFILL + STEPS, WINDOWS)
    prefix = Prefill.of(model, ids[:, :PREFILL])
    return model, ids, prefix, step_logits(model, ids, "full", PREFILL, prefix)


@pytest.mark.parametrize("strategy", list(FIDELITY))
def test_teacher_forced_fidelity(fidelity_inputs, strategy):
    model, ids, prefix, reference = fidelity_inputs
    result = compare(reference, step_logits(model, ids, strategy, PREFILL, prefix))
    min_top1, max_kl = FIDELITY[strategy]
    assert result["steps"] == WINDOWS * STEPS
    assert result["top1"] >= min_top1 and result["kl"] <= max_kl, result


def test_perplexity_change_against_full(fidelity_inputs):
    """The text's perplexity: exp of the mean negative log-likelihood of the tokens that follow, under each cache."""
    model, ids, prefix, reference = fidelity_inputs
    targets = ids[:, PREFILL:].flatten()
    assert targets.shape[0] == reference.shape[0]
    same = compare(reference, reference, targets)
    assert same["ppl_change_pct"] == 0 and 1 < same["ppl"] < 100  # a 135M model reading prose
    by_hand = torch.exp(torch.nn.functional.cross_entropy(reference, targets)).item()
    assert same["ppl_full"] == pytest.approx(by_hand, rel=1e-5)
    window = compare(reference, step_logits(model, ids, "window:window=64", PREFILL, prefix), targets)
    assert window["ppl_change_pct"] > 1  # a 64-token window loses context the text's continuation uses


def test_sink_plus_int8_obeys_both_contracts(fidelity_inputs):
    """The composition keeps the sink budget and loses no more to int8 than int8 loses on its own (measured: top-1
    0.992, KL 2.3e-3 against sink alone)."""
    model, ids, prefix, _ = fidelity_inputs
    sink = step_logits(model, ids, "sink:window=256", PREFILL, prefix)
    both = step_logits(model, ids, "sink:window=256+int8", PREFILL, prefix)
    result = compare(sink, both)
    assert result["top1"] >= 0.96 and result["kl"] <= 5e-3, result
    cache = prefix.replay(make_cache(model, "sink:window=256+int8"))
    assert cache.stored_tokens() == 260
    assert cache.kv_bytes()["device"] == expected_kv_bytes(model, "sink:window=256+int8", PREFILL, batch=WINDOWS)


@pytest.mark.parametrize("strategy", strategies(CODECS))
def test_quantized_generate_on_padded_batch_stays_near_full(strategy):
    """Every codec generates a padded batch, its first step's logits near the full cache's (the prompt attends to
    itself exact; the step after attends to the codes)."""
    model = model_for(strategy)
    ids, mask = left_padded([30, 18])

    def generate(name):
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            cache=make_cache(model, name),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )

    out, full = generate(strategy), generate("full")
    assert out.sequences.shape == (2, 50)
    torch.testing.assert_close(out.scores[0], full.scores[0], rtol=0, atol=1e-5)
    logits, reference = out.scores[1].nan_to_num(0, 0, 0), full.scores[1].nan_to_num(0, 0, 0)
    assert (logits - reference).abs().max() <= 0.1 * reference.abs().max()  # a window of 8 tokens: 0.2
