"""A compressed cache saved and loaded: as stored (never decoded), continued bit for bit, and refused by name when the
file is truncated, corrupt, or made for another model, strategy or K/V dtype."""

import os
import threading

import pytest
import torch

import kvcompress
from kvcompress import load_cache, make_cache, parse_strategy
from kvcompress.attention import position_ids
from kvcompress.tiers import merge_bytes

from .conftest import left_padded, tiny_model
from .members import CODECS, TIERS, model_for, strategies
from .test_eviction import MEMBERS

POSITIONAL = ["full", "window:window=16", "sink:sinks=2,window=12"]
EVERY_ROW = POSITIONAL + list(MEMBERS.values()) + strategies(CODECS) + ["full+" + t for t in strategies(TIERS)]
LENGTHS = [30, 23]  # two rows, the second left-padded
STEPS = 6


def _prefill(model, cache):
    ids, mask = left_padded(LENGTHS)
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), cache=cache, use_cache=True
        ).logits
    return logits[:, -1:].argmax(-1), mask


@torch.no_grad()
def _step(model, cache, ids, mask):
    """A forward of `ids` [rows, n] after what `cache` holds (its rows' mask so far: `mask`); logits, and the mask."""
    mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids(mask)[:, -ids.shape[1] :],
        cache=cache,
        use_cache=True,
    ).logits
    return logits, mask


def _continue(model, cache, token, mask, steps=STEPS):
    """`steps` greedy decode steps after the prompt; every step's logits."""
    out = []
    for _ in range(steps):
        logits, mask = _step(model, cache, token, mask)
        out.append(logits)
        token = logits[:, -1:].argmax(-1)
    return torch.cat(out, dim=1)


def _layers_bytes(cache) -> dict[str, int]:
    return merge_bytes(*(layer.kv_bytes() for layer in cache.layers))


def _strategy_of(row: str) -> str:
    # a codec row names a codec: on the full retention (a residual must fit a positional budget)
    return row if "+" in row or row in POSITIONAL or row in MEMBERS.values() else "full+" + row


@pytest.mark.parametrize("row", EVERY_ROW)
def test_a_loaded_or_copied_cache_continues_bit_for_bit_as_stored(row, tmp_path):
    strategy = _strategy_of(row)
    model = model_for(strategy)
    cache = make_cache(model, strategy, offload_dir=tmp_path)
    token, mask = _prefill(model, cache)
    held = _layers_bytes(cache)  # what the layers hold (an offloading store's staging pool aside)
    file_bytes = cache.save(tmp_path / "cache.kvc")
    assert file_bytes == (tmp_path / "cache.kvc").stat().st_size and _layers_bytes(cache) == held
    loaded = load_cache(model, tmp_path / "cache.kvc", offload_dir=tmp_path)
    copied = cache.copy()  # the same without the file
    assert _layers_bytes(cache) == held
    for restored_cache in (loaded, copied):
        assert str(restored_cache.spec) == str(cache.spec) and _layers_bytes(restored_cache) == held
        assert restored_cache.get_seq_length() == cache.get_seq_length()
        assert restored_cache.stored_tokens() == cache.stored_tokens()
        for original, restored in zip(cache.layers, restored_cache.layers):
            assert original.dtype == restored.dtype
            for name in ("k", "v"):  # the codes themselves, not their decoding
                assert set(getattr(original, f"encoded_{name}")) == set(getattr(restored, f"encoded_{name}"))
                for key, part in getattr(original, f"encoded_{name}").items():
                    assert torch.equal(part.read(), getattr(restored, f"encoded_{name}")[key].read())
            if original.positions is not None:
                assert torch.equal(original.positions, restored.positions)
    continued = _continue(model, cache, token, mask)
    assert torch.equal(continued, _continue(model, loaded, token, mask))
    assert torch.equal(continued, _continue(model, copied, token, mask))
    for c in (cache, loaded, copied):
        c.close()


def test_the_file_holds_the_codes_and_says_what_they_are(tmp_path):
    model = tiny_model()
    cache = make_cache(model, "int8:group=8")
    _prefill(model, cache)
    size = cache.save(tmp_path / "c.kvc")
    full = make_cache(model, "full")
    _prefill(model, full)
    assert size < 0.6 * full.save(tmp_path / "f.kvc")  # int8 codes with their scales, not decoded K/V
    header, tensors = kvcompress.saving.read(tmp_path / "c.kvc")
    assert header["strategy"] == "int8:group=8" and header["seen"] == 30 and header["batch"] == 2
    assert header["kv_dtype"] == "float32" and header["kvcompress"] == kvcompress.__version__
    assert header["model"]["num_hidden_layers"] == model.config.num_hidden_layers and header["model"]["weights"]
    assert {t.dtype for name, t in tensors.items() if ".encoded_k." in name} >= {torch.int8}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def _saved(tmp_path, strategy="int8:group=8"):
    model = tiny_model()
    cache = make_cache(model, strategy)
    _prefill(model, cache)
    path = tmp_path / "cache.kvc"
    cache.save(path)
    return model, path


def _unchanged(path, call, match):
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match):
        call()
    assert path.read_bytes() == before


def test_truncated_and_corrupt_files_are_one_error_naming_the_file(tmp_path):
    model, path = _saved(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.kvc"
    truncated.write_bytes(data[: len(data) - 100])
    _unchanged(truncated, lambda: load_cache(model, truncated), "truncated.kvc.*not a complete saved cache")
    corrupt = tmp_path / "corrupt.kvc"
    corrupt.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))  # the last tensor's bytes
    _unchanged(corrupt, lambda: load_cache(model, corrupt), "corrupt.kvc.*is corrupt: tensor .* checksum")
    with pytest.raises(ValueError, match="no saved cache at"):
        load_cache(model, tmp_path / "missing.kvc")


def test_a_file_for_another_model_strategy_or_dtype_is_refused_naming_what_differs(tmp_path):
    model, path = _saved(tmp_path)
    other_weights = tiny_model()
    with torch.no_grad():
        other_weights.model.layers[0].self_attn.k_proj.weight.add_(1.0)
    _unchanged(path, lambda: load_cache(other_weights, path), "saved for another model .its weights differ")
    deeper = tiny_model()
    deeper.config.num_hidden_layers += 1
    _unchanged(path, lambda: load_cache(deeper.config, path), "its num_hidden_layers differ: saved 2, this model 3")
    _unchanged(path, lambda: load_cache(model, path, strategy="int4"), "holds a int8:group=8 cache, not int4")
    _unchanged(path, lambda: load_cache(model, path, kv_dtype="bfloat16"), "stores K/V in float32, not bfloat16")
    assert str(load_cache(model, path, strategy=parse_strategy("int8:group=8")).spec) == "int8:group=8"


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    before = path.read_bytes()
    cache = make_cache(model, "full")
    _prefill(model, cache)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kvcompress.saving, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cache.save(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["cache.kvc"]


def test_an_empty_or_compiled_cache_is_refused(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="holds no tokens yet"):
        make_cache(model, "int8").save(tmp_path / "empty.kvc")
    static = make_cache(model, "int8:residual=0", compile=True, max_tokens=64)
    with pytest.raises(ValueError, match="compile=True cache"):
        static.save(tmp_path / "static.kvc")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tier", ["disk", "host:policy=cold,sinks=2,window=8"])
def test_a_saved_cache_loads_onto_another_tier_and_decodes_the_same(tier, tmp_path):
    """Parking a session: saved from the device, loaded with its tokens on the disk or host tier."""
    model = tiny_model()
    cache = make_cache(model, "sink:sinks=2,window=24+int8:group=8,residual=4")
    token, mask = _prefill(model, cache)
    cache.save(tmp_path / "c.kvc")
    loaded = load_cache(model, tmp_path / "c.kvc", tier=tier, offload_dir=tmp_path)
    assert str(loaded.spec) == f"{cache.spec}+{tier}"
    assert set(loaded.kv_bytes()) - {"device"}  # tokens off the device now
    assert torch.equal(_continue(model, cache, token, mask), _continue(model, loaded, token, mask))
    loaded.close()
    with pytest.raises(ValueError, match="tier must name a tier alone"):
        load_cache(model, tmp_path / "c.kvc", tier="int8")


@pytest.mark.parametrize("tier", ["disk", "host"])
def test_saving_an_offloaded_cache_holds_none_of_it_on_the_device_afterwards(tier, tmp_path):
    model = tiny_model()
    cache = make_cache(model, "full+" + tier, offload_dir=tmp_path)
    _prefill(model, cache)

    def fetched():  # parts whose tokens sit on the device, read back for a step
        return sum(getattr(part, "_device", None) is not None for layer in cache.layers for part in layer._parts())

    assert fetched() == 0
    cache.save(tmp_path / "c.kvc")
    assert fetched() == 0
    cache.close()


@pytest.mark.parametrize(
    "kwargs", [{"fused": True}, {"grow": 64}, {"prefill_chunk": 8}], ids=["fused", "grow", "prefill_chunk"]
)
def test_a_loaded_cache_is_made_as_the_saved_one_was(kwargs, tmp_path):
    """Fused decode, in-place growth and a chunked prefill change what the next steps compute or hold: the loaded
    cache keeps them, and a second turn (a multi-token step) gives the same logits."""
    strategy = "h2o:budget=20,sinks=2,window=8" if "prefill_chunk" in kwargs else "int8:group=8,residual=4"
    model = tiny_model()
    cache = make_cache(model, strategy, **kwargs)
    token, mask = _prefill(model, cache)
    cache.save(tmp_path / "c.kvc")
    loaded = load_cache(model, tmp_path / "c.kvc")
    assert (loaded.fused, loaded.store.grow, loaded.layers[0].prefill_chunk) == (
        cache.fused,
        cache.store.grow,
        cache.layers[0].prefill_chunk,
    )
    assert _layers_bytes(loaded) == _layers_bytes(cache)
    turn = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(5))
    assert torch.equal(_step(model, cache, turn, mask)[0], _step(model, loaded, turn, mask)[0])


def test_concurrent_saves_to_one_path_each_write_a_whole_file(tmp_path):
    model = tiny_model()
    caches = []
    for strategy in ("int8:group=8", "full"):
        caches.append(make_cache(model, strategy))
        _prefill(model, caches[-1])
    errors = []

    def saving(cache):
        try:
            for _ in range(10):
                cache.save(tmp_path / "c.kvc")
        except Exception as err:  # noqa: BLE001 - the test reports any
            errors.append(err)

    threads = [threading.Thread(target=saving, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert str(load_cache(model, tmp_path / "c.kvc").spec) in ("int8:group=8", "full")  # one whole file, verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.kvc"]


def test_the_rotary_settings_are_part_of_the_model(tmp_path):
    model, path = _saved(tmp_path)
    other = tiny_model()
    field = "rope_parameters" if getattr(other.config, "rope_parameters", None) is not None else "rope_theta"
    value = getattr(other.config, field)
    if isinstance(value, dict):
        setattr(other.config, field, {**value, "rope_theta": float(value.get("rope_theta", 10000.0)) * 2})
    else:
        setattr(other.config, field, value * 2)
    _unchanged(path, lambda: load_cache(other, path), "its rope_[a-z]+ differ")  # transformers aliases them
