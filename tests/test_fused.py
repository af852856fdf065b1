"""Fused decode over encoded KV: the chunked torch path and the Triton kernel (interpreted on CPU, compiled on a GPU)
equal dequantise-then-attend, and a cache decoding fused generates what the decoding one does while never holding
the decoded history."""

import importlib
import os
import subprocess
import sys

import pytest
import torch
from kvcompress.kernels import decode
from kvcompress.kernels.decode import NEGLIGIBLE, attend_encoded, supports

from kvcompress import make_cache, parse_strategy
from kvcompress.attention import _fused, grouped_attention

from .conftest import left_padded, tiny_model
from .members import TIERS, model_for, quantizing, strategies

CODECS = quantizing()
KERNEL_CODECS = [name for name in CODECS if parse_strategy(name).codec.layout(64) is not None]  # what it reads


def _case(codec_name, batch=2, kv_heads=2, group=2, q=1, n=150, tail=5, dim=64, seed=0, per_head=False, device="cpu"):
    """Query, encoded history with its decoded twin, a model-dtype tail and the masks of a left-padded batch (row 0
    has 11 pad tokens; per_head: heads hold different tokens, as a score-based retention leaves them)."""
    gen = torch.Generator().manual_seed(seed)
    codec = parse_strategy(f"full+{codec_name}").codec
    n = n // codec.token_block * codec.token_block  # a codec encoding blocks of tokens gets whole ones

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    query = randn(batch, kv_heads * group, q, dim)
    keys, values = randn(batch, kv_heads, n, dim), randn(batch, kv_heads, n, dim)
    keys[..., 3] *= 10  # an outlier channel, as real keys have
    packed_k, packed_v = codec.encode_pair(keys, values)
    decoded_k = codec.decode(packed_k, torch.empty_like(keys))
    decoded_v = codec.decode(packed_v, torch.empty_like(values))
    tail_k, tail_v = randn(batch, kv_heads, tail + q, dim), randn(batch, kv_heads, tail + q, dim)
    valid = torch.ones(batch, kv_heads if per_head else 1, n, dtype=torch.bool, device=device)
    valid[0, :, :11] = False
    if per_head:
        valid[:, -1, 40:70] = False
    causal = torch.ones(q, tail + q, dtype=torch.bool, device=device).tril(tail)
    tail_visible = causal.expand(batch, 1, q, tail + q)
    return codec, query, packed_k, packed_v, decoded_k, decoded_v, valid, tail_k, tail_v, tail_visible


def _visible(valid, tail_visible, heads, q):
    """[b, heads, q, n + t]: what each query sees of [encoded | tail]."""
    batch, n = valid.shape[0], valid.shape[2]
    return torch.cat([valid[:, :, None].expand(batch, heads, q, n), tail_visible.expand(batch, heads, q, -1)], -1)


def _reference(query, decoded_k, decoded_v, valid, tail_k, tail_v, tail_visible):
    visible = _visible(valid, tail_visible, decoded_k.shape[1], query.shape[2])
    out, _, _, _ = grouped_attention(
        query, torch.cat([decoded_k, tail_k], 2), torch.cat([decoded_v, tail_v], 2), visible, 0.125
    )
    return out


@pytest.mark.parametrize("codec_name", CODECS)
@pytest.mark.parametrize("group, q, per_head", [(1, 1, False), (2, 1, True), (4, 3, False)])
def test_torch_path_equals_dequantize_then_attend(codec_name, group, q, per_head):
    codec, query, pk, pv, dk, dv, valid, tk, tv, tvis = _case(codec_name, group=group, q=q, per_head=per_head)
    expected = _reference(query, dk, dv, valid, tk, tv, tvis)
    for chunk in (32, 1000):  # several chunks, and one
        out = attend_encoded(query, codec, pk, pv, valid, tk, tv, tvis, 0.125, backend="torch", chunk=chunk)
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("codec_name", CODECS + ["int8:group=64", "fp8:format=e5m2,group=64"])
def test_unscaled_codes_times_their_scales_are_the_decoded_tokens(codec_name):
    """Codes with one scale per token of a head and no minimum come unscaled; other codes decode in full."""
    codec = parse_strategy(f"full+{codec_name}").codec
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    for packed in codec.encode_pair(x, x):
        decoded = codec.decode(packed, torch.empty_like(x))
        codes = torch.empty_like(x)
        unscaled = codec.decode_unscaled(packed, codes)
        one_scale = codec.layout(64) is not None and all(
            layout.scale == "token" and layout.group == 64 and layout.code != "affine" for layout in codec.layout(64)
        )
        assert (unscaled is not None) == one_scale
        if one_scale:
            scale, exponent = unscaled
            assert torch.equal(codes * scale.float()[..., None] * 2.0**exponent, decoded)


@pytest.mark.parametrize("codec_name", ["int8", "fp8", "fp8:format=e5m2"])
@pytest.mark.parametrize("magnitude", ["sharp", "huge"])
def test_torch_path_keeps_large_and_peaked_inputs_exact(codec_name, magnitude):
    """fp8's codes enter the matmuls laid in float32 bits worth code / 2**120: the queries and weights are lifted by as
    much as keeps them finite (all of it, or half for scales over 2**8 and queries over 2**8), and weights too small to
    count are dropped, so that no product is subnormal. Both stay the reference's attention."""
    codec, query, pk, pv, dk, dv, valid, tk, tv, tvis = _case(codec_name, group=4)
    if magnitude == "sharp":  # most weights far below 2**-100
        query = query * 40
    else:  # e4m3's scales over 2**8 (int8's still within float16), queries over 2**8
        keys, values = dk * 3e4, dv * 3e4
        pk, pv = codec.encode(keys), codec.encode(values)
        dk, dv = codec.decode(pk, torch.empty_like(keys)), codec.decode(pv, torch.empty_like(values))
        assert pk["scale"].isfinite().all() and (codec_name != "fp8" or pk["scale"].max() > 2**8)
        query, tk, tv = query * 400, tk * 3e4, tv * 3e4
    expected = _reference(query, dk, dv, valid, tk, tv, tvis)
    out = attend_encoded(query, codec, pk, pv, valid, tk, tv, tvis, 0.125, backend="torch")
    assert torch.isfinite(out).all()
    scores = _reference_scores(query, dk, tk, valid, tvis)
    if magnitude == "sharp":
        assert ((scores.softmax(-1) > 0) & (scores.softmax(-1) < NEGLIGIBLE)).any()  # the case drops weights
    # a score's rounding (float32's 2**-24 of its magnitude) is its weight's relative error: sharp scores are large
    largest_score = scores[scores.isfinite()].abs().max().item()
    atol = 4 * 2**-24 * max(largest_score, 1.0) * expected.abs().max().item()
    torch.testing.assert_close(out, expected, atol=atol, rtol=1e-5)


def _reference_scores(query, keys, tail_k, valid, tail_visible):
    b, h = keys.shape[:2]
    q = query.shape[2]
    rows = query.reshape(b, h, -1, keys.shape[-1])
    scores = rows @ torch.cat([keys, tail_k], 2).transpose(-1, -2) * 0.125
    visible = _visible(valid, tail_visible, h, q)
    return scores.masked_fill(~visible.repeat(1, 1, rows.shape[2] // q, 1), float("-inf"))  # rows: query heads, then q


def test_a_row_that_sees_nothing_attends_to_nothing():
    codec, query, pk, pv, dk, dv, valid, tk, tv, tvis = _case("int8")
    valid[1] = False
    tvis = tvis.clone()
    tvis[1] = False
    out = attend_encoded(query, codec, pk, pv, valid, tk, tv, tvis, 0.125, backend="torch", chunk=64)
    assert out[1].abs().max() == 0 and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def triton_decode():
    """The kernel module and the device its tests run on: compiled on a GPU; on CPU, run by Triton's interpreter when
    this process started under TRITON_INTERPRET=1 (triton reads it at import, which transformers already did)."""
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' installs it)")
    if torch.cuda.is_available():
        return importlib.import_module("kvcompress.kernels.triton_decode"), "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "no GPU: the kernel runs under TRITON_INTERPRET=1 in a process of its own "
            "(test_triton_kernel_under_the_interpreter)"
        )
    return importlib.import_module("kvcompress.kernels.triton_decode"), "cpu"


@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="the kernel tests run in this process (GPU, or already interpreted)",
)
def test_triton_kernel_under_the_interpreter(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' installs it)")
    # run from elsewhere: `python -m` puts the working directory on sys.path, where the repo's kernels/ would shadow
    # the PyPI package of that name
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--import-mode=importlib",
            "-n",
            "0",  # a handful of small cases: pyproject's two xdist workers would cost more to start than they save
            f"{__file__}::test_triton_kernel_equals_the_torch_path",
        ],
        cwd=tmp_path,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert f"{len(KERNEL_CODECS) * 2} passed" in run.stdout


@pytest.mark.parametrize("codec_name", KERNEL_CODECS)
@pytest.mark.parametrize("group, q, per_head, dim", [(1, 1, False, 64), (4, 2, True, 16)])
def test_triton_kernel_equals_the_torch_path(triton_decode, codec_name, group, q, per_head, dim):
    module, device = triton_decode
    codec, query, pk, pv, dk, dv, valid, tk, tv, tvis = _case(
        codec_name, group=group, q=q, per_head=per_head, n=200, dim=dim, device=device
    )
    expected = attend_encoded(query, codec, pk, pv, valid, tk, tv, tvis, 0.125, backend="torch")
    out = attend_encoded(query, codec, pk, pv, valid, tk, tv, tvis, 0.125, backend="triton")
    # on a GPU tl.dot multiplies float32 in TF32 (10-bit mantissa); the interpreter multiplies in float32
    tolerance = dict(atol=2e-2, rtol=2e-2) if device == "cuda" else dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, expected, **tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 kernel numerics are checked on a GPU only")
def test_triton_kernel_in_bfloat16_on_gpu(triton_decode):
    codec, query, pk, pv, dk, dv, valid, tk, tv, tvis = _case("int8", group=4, n=4096, dim=128, device="cuda")
    expected = _reference(query, dk, dv, valid, tk, tv, tvis)
    out = attend_encoded(
        query.bfloat16(), codec, pk, pv, valid, tk.bfloat16(), tv.bfloat16(), tvis, 0.125, backend="triton"
    )
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_triton_backend_refuses_what_it_cannot_read():
    codec, query, pk, pv, dk, dv, valid, tk, tv, tvis = _case("nf4")
    assert codec.layout(64) is None  # bitsandbytes' codes: only its own decode reads them
    assert not supports(codec, 64) and not supports(parse_strategy("int8").codec, 48)
    with pytest.raises(ValueError, match="triton decode kernel reads codecs that declare their code layout"):
        attend_encoded(query, codec, pk, pv, valid, tk, tv, tvis, 0.125, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton"):
        attend_encoded(query, codec, pk, pv, valid, tk, tv, tvis, 0.125, backend="cuda")


# -- in the cache ---------------------------------------------------------------------------------------------------
def _generate(model, strategy, fused, ids, mask, offload_dir=None, **kwargs):
    cache = make_cache(model, strategy, fused=fused, offload_dir=offload_dir)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=cache,
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out, cache


COMPOSED = [
    "sink:sinks=4,window=24+int8",
    "sink:sinks=2,window=8+int4:residual=4",
    "window:window=20+int4:group=8",
    "knorm:budget=24,window=8+int8:residual=8",
    "window:window=20+kivi:bits=2,group=4,residual=8",
    "knorm:budget=24,window=8+kivi:group=4,residual=8",
]


@pytest.mark.parametrize(
    "strategy",
    CODECS + COMPOSED + [f"int8:residual=8+{tier}" for tier in strategies(TIERS)],
)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.filterwarnings("ignore:host tier on a CPU model")
def test_fused_cache_generates_what_the_decoding_one_does(attn, strategy, tmp_path):
    model = model_for(strategy, attn)
    ids, mask = left_padded([40, 27])
    plain, plain_cache = _generate(model, strategy, False, ids, mask, offload_dir=str(tmp_path))
    fused, fused_cache = _generate(model, strategy, True, ids, mask, offload_dir=str(tmp_path))
    assert fused_cache.fused and not plain_cache.fused
    assert torch.equal(fused.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(fused.scores), torch.stack(plain.scores), atol=1e-4, rtol=1e-4)
    assert fused_cache.kv_bytes() == plain_cache.kv_bytes()
    fused_cache.close()
    plain_cache.close()


def test_fused_cache_under_beam_search(tiny):
    ids, mask = left_padded([30, 22])
    plain, _ = _generate(tiny, "int8", False, ids, mask, num_beams=3)
    fused, _ = _generate(tiny, "int8", True, ids, mask, num_beams=3)
    assert torch.equal(fused.sequences, plain.sequences)


def test_fused_decode_never_holds_the_decoded_history(monkeypatch):
    monkeypatch.setattr(decode, "CHUNK_BYTES", 1024 * 2 * 16 * 4)  # 1,024 tokens of the tiny model's heads a chunk
    model = tiny_model()
    ids = torch.randint(3, 512, (1, 2000), generator=torch.Generator().manual_seed(0))
    peaks = {}
    for fused in (False, True):
        with make_cache(model, "int8", fused=fused) as cache, torch.no_grad():
            model(input_ids=ids, cache=cache)
            cache.peak_bytes = 0  # the prefill step decodes nothing (nothing is encoded yet); decode steps count
            for token in range(3, 8):
                model(input_ids=torch.tensor([[token]]), cache=cache)
            peaks[fused] = cache.peak_bytes - sum(cache.kv_bytes().values())
    decoded_history = 2 * 2 * 2000 * 16 * 4  # K and V, 2 heads, 2,000 tokens, head_dim 16, float32: one layer's
    assert peaks[False] >= decoded_history
    assert peaks[True] < decoded_history * 0.6  # one 1,024-token chunk and the residual


def test_fused_where_the_model_allows(tiny):
    assert make_cache(tiny, "int8").fused == torch.cuda.is_available()  # CPU: decoding into sdpa is faster
    assert make_cache(tiny, "int8", fused=True).fused
    assert not make_cache(tiny, "full", fused=True).fused  # nothing to decode
    assert not make_cache(tiny.config, "int8").fused  # a config cannot be routed: decoded as before
    with pytest.raises(ValueError, match="pass the model to make_cache"):
        make_cache(tiny.config, "int8", fused=True)
    with pytest.raises(ValueError, match="fused must be None"):
        make_cache(tiny, "int8", fused="yes")


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("q", [1, 5])
def test_shared_kv_heads_attend_without_repeating_kv(per_head, q):
    """The seam's fused attention over GQA heads equals attention with K/V and the mask repeated per query head, and
    copies nothing under one mask for all heads (CPU), only the mask per group of query heads under a mask per KV
    head."""
    gen = torch.Generator().manual_seed(0)
    b, h, group, s, d = 2, 2, 3, 40, 16
    query = torch.randn(b, h * group, q, d, generator=gen)
    keys, values = torch.randn(b, h, s, d, generator=gen), torch.randn(b, h, s, d, generator=gen)
    visible = torch.rand(b, h if per_head else 1, q, s, generator=gen) < 0.7
    visible[..., -1] = True  # every query sees itself
    out, copied = _fused(query, keys, values, visible, 0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query,
        keys.repeat_interleave(group, 1),
        values.repeat_interleave(group, 1),
        attn_mask=visible.expand(b, h, q, s).repeat_interleave(group, 1),
        scale=0.25,
    )
    torch.testing.assert_close(out, expected)
    assert copied == (b * h * group * q * s if per_head else 0)
