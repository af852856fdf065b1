"""Host and disk tiers: bit-identical to the device tier, faults caught, nothing leaked, RAM saved by disk."""

import gc
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from kvcompress.evals import reference_text, text_ids
from transformers import AutoConfig, AutoModelForCausalLM

from kvcompress import make_cache
from kvcompress.models import CONFIG_DIR
from kvcompress.tiers.disk import CorruptOffloadError, DiskTier
from kvcompress.tiers.transfer import HostMemory

from .conftest import left_padded, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:host tier on a CPU model")


@torch.no_grad()
def _logits(model, ids, mask, strategy, steps, **cache_args):
    """Prefill, then `steps` greedy decode steps; every step's last-position logits, stacked."""
    with make_cache(model, strategy, **cache_args) as cache:
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = [model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]]
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            token = out[-1].argmax(-1, keepdim=True)
            out.append(
                model(
                    input_ids=token, attention_mask=mask, position_ids=positions[:, -1:] + len(out), cache=cache
                ).logits[:, -1]
            )
        return torch.stack(out)


def _text_batch(tokenizer, lengths):
    """Rows of the shipped text of different lengths, left-padded into one batch."""
    tokens = torch.tensor(tokenizer(reference_text())["input_ids"])
    width = max(lengths)
    ids = torch.full((len(lengths), width), tokenizer.eos_token_id or 0)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = text_ids(tokens[row * 50 :], length)[0]
        mask[row, width - length :] = 1
    return ids, mask


_REFERENCE_LOGITS: dict = {}


@pytest.mark.slow
def test_offloaded_logits_are_bit_identical_on_the_default_model(default_model, tmp_path):
    """The real model's K/V through the disk: a left-padded batch of two rows (the unpadded row is what batch 1 sees),
    300 + 40 tokens, several 64 KiB blocks per part and a tail block."""
    model, tokenizer = default_model
    ids, mask = _text_batch(tokenizer, [300, 260])
    expected = _logits(model, ids, mask, "full", steps=40)
    assert torch.equal(_logits(model, ids, mask, "full+disk", steps=40, offload_dir=tmp_path), expected)
    assert list(tmp_path.iterdir()) == []  # the session file is gone once the cache is closed


def wide_tiny_model():
    """The tiny architecture with wide heads: 1 KiB of K per token, so 64 KiB disk blocks fill every 64 tokens (and
    every 256 with int8 codes) and a few hundred tokens exercise blocks, extents and tail blocks cheaply."""
    config = AutoConfig.for_model(
        **{
            **json.loads((CONFIG_DIR / "tiny.json").read_text()),
            "hidden_size": 256,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 64,
        }
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "reference, offloaded",
    [
        ("full", "full+host"),
        ("full", "full+disk"),
        ("int8", "int8+disk"),
        ("sink:sinks=4,window=128", "sink:sinks=4,window=128+disk"),
    ],
)
def test_offloaded_logits_are_bit_identical_left_padded(reference, offloaded, tmp_path):
    model = wide_tiny_model()
    ids, mask = left_padded([700, 620])
    if reference not in _REFERENCE_LOGITS:  # `full` is the reference of two cases: computed once
        _REFERENCE_LOGITS[reference] = _logits(model, ids, mask, reference, steps=100)
    expected = _REFERENCE_LOGITS[reference]
    assert torch.equal(_logits(model, ids, mask, offloaded, steps=100, offload_dir=tmp_path), expected)
    assert list(tmp_path.iterdir()) == []  # the session file is gone once the cache is closed


@pytest.mark.parametrize(
    "reference, offloaded",
    [
        ("full", "full+host:policy=cold,sinks=4,window=16"),
        ("full", "full+disk:policy=cold,sinks=2,window=8"),
        ("int4", "int4+host:policy=cold,window=8"),
        ("window:window=24", "window:window=24+disk"),
        ("sink:sinks=2,window=20+int8", "sink:sinks=2,window=20+int8+host"),
        ("int8:residual=8", "int8:residual=8+disk:policy=cold,window=4"),
    ],
)
def test_policies_and_compositions_match_the_device_tier(reference, offloaded):
    model = tiny_model()
    ids, mask = left_padded([90, 57])
    assert torch.equal(_logits(model, ids, mask, offloaded, steps=40), _logits(model, ids, mask, reference, steps=40))


def test_generate_with_beams_and_chunked_prefill_through_an_offloaded_cache():
    model = tiny_model()
    ids, mask = left_padded([40, 33])
    kwargs = dict(
        attention_mask=mask, max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0
    )
    expected = model.generate(input_ids=ids, cache=make_cache(model, "full"), **kwargs)
    with make_cache(model, "full+disk:policy=cold,window=8") as cache:
        assert torch.equal(model.generate(input_ids=ids, cache=cache, **kwargs), expected)


def test_disk_layers_live_on_disk_and_reads_are_counted():
    model = tiny_model()
    ids = torch.randint(3, 500, (1, 3000), generator=torch.Generator().manual_seed(0))
    with make_cache(model, "full+disk") as cache, torch.no_grad():
        model(input_ids=ids, cache=cache)
        before = cache.transfer_stats()
        model(input_ids=ids[:, :1], cache=cache)
        after = cache.transfer_stats()
        tiers = cache.kv_bytes()
        per_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads x 16 dims, float32, per layer
        stored = 2 * per_token * 3001  # 2 layers
        assert tiers.get("device", 0) == 0
        parts, block = 4, 64 * 1024  # K and V of 2 layers; each keeps its last partial block in RAM
        assert stored - parts * block <= tiers["disk"] <= stored <= tiers["disk"] + tiers["host"]
        # one decode step reads every stored token back (from disk or the tail block) and writes the new one
        assert after["h2d_bytes"] - before["h2d_bytes"] == 2 * per_token * 3000
        assert after["d2h_bytes"] - before["d2h_bytes"] == 2 * per_token
        assert after["disk_read_bytes"] > before["disk_read_bytes"]
        path = cache.store.file.path
        assert path.exists() and cache.store.file.check_header() == cache.store.file.session
        assert cache.store.file.session.hex in path.name
    assert not path.exists()


def _rss_bytes() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_disk_tier_keeps_the_kv_out_of_ram(tmp_path):
    store = DiskTier().open(offload_dir=str(tmp_path))
    part = store.part(torch.zeros(1, 8, 0, 128))
    chunk = torch.randn(1, 8, 1024, 128)  # 4 MiB
    rss = _rss_bytes()
    for _ in range(64):  # 256 MiB written
        part.append(chunk)
    grown = _rss_bytes() - rss
    assert part.nbytes()["disk"] >= 250 * 2**20
    # the device tier would grow by all 256 MiB; what grows here is the allocator keeping freed temporaries
    assert grown < 128 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB for 256 MiB of KV"
    assert part.nbytes().get("host", 0) <= 64 * 1024  # at most the tail block
    assert torch.equal(part.read()[:, :, -1024:], chunk)
    part.close()
    store.close()


def _flip_first_block(cache) -> None:
    rows = cache.layers[0].recent_k.rows
    offset = rows.blocks[0][0]
    rows.blocks[0][1].result()  # written
    with open(cache.store.file.path, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["checksum", "short read"])
def test_damaged_offload_file_raises_instead_of_returning_garbage(damage):
    model = tiny_model()
    ids = torch.randint(3, 500, (1, 2000), generator=torch.Generator().manual_seed(0))
    with make_cache(model, "full+disk") as cache, torch.no_grad():
        model(input_ids=ids, cache=cache)
        if damage == "checksum":
            _flip_first_block(cache)
        else:
            for layer in cache.layers:  # every write done: one landing after the cut would refill it with zeros
                for part in (layer.recent_k, layer.recent_v):
                    for _, written in part.rows.blocks:
                        written.result()
            os.truncate(cache.store.file.path, 4096 + 10)
        with pytest.raises(CorruptOffloadError, match="checksum mismatch" if damage == "checksum" else "short read"):
            for _ in range(2):  # the first step may use layer 0 as prefetched before the damage
                model(input_ids=ids[:, :1], cache=cache)


def test_disk_directory_faults_are_caught_before_generation(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="does not exist"):
        make_cache(model, "full+disk", offload_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"needs [\d,]+ bytes"):
        make_cache(model, "full+disk", offload_dir=tmp_path, max_tokens=10**13)
    with pytest.raises(ValueError, match="cannot create an offload file in offload_dir '/proc'"):
        make_cache(model, "full+disk", offload_dir="/proc")
    with pytest.raises(ValueError, match="unknown parameter 'dir' for tier 'disk'"):  # one spelling: offload_dir
        make_cache(model, f"full+disk:dir={tmp_path}")
    make_cache(model, "full+host", offload_dir=tmp_path).close()  # tiers that write no file ignore it
    with pytest.raises(ValueError, match="host:policy must be one of layers, cold"):
        make_cache(model, "full+host:policy=hot")
    with pytest.raises(ValueError, match="host:engine must be one of auto, cupy, torch"):
        make_cache(model, "full+host:engine=cuda")
    assert list(tmp_path.iterdir()) == []


def test_pinned_allocation_failure_names_the_size():
    if torch.cuda.is_available():
        pytest.skip("needs a machine where pinned allocation fails (no CUDA)")
    with pytest.raises(MemoryError, match="could not allocate 1,048,576 bytes of pinned host memory"):
        HostMemory.pinned(1 << 20, use_cupy=False)


def test_host_tier_on_cpu_warns_that_it_saves_nothing():
    model = tiny_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with make_cache(model, "full+host") as cache, torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]), cache=cache)
    assert any("saves no memory" in str(w.message) for w in caught)


def test_no_pinned_blocks_or_files_left_after_100_sessions(tmp_path):
    model = tiny_model()
    ids = torch.randint(3, 500, (1, 300), generator=torch.Generator().manual_seed(0))
    gc.collect()
    start = HostMemory.bytes_in_use()
    with torch.no_grad():
        for session in range(100):
            strategy = ["full+host", "int8+disk", "full+disk:policy=cold,window=16", "sink:window=64+host"][session % 4]
            cache = make_cache(model, strategy, offload_dir=tmp_path)
            model(input_ids=ids, cache=cache)
            model(input_ids=ids[:, :1], cache=cache)
            if session % 2:
                cache.close()  # the other half are only dropped: garbage collection releases them
            del cache
    gc.collect()
    assert HostMemory.bytes_in_use() == start
    assert list(tmp_path.iterdir()) == []
