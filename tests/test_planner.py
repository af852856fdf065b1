"""The capacity planner against hand-computed figures."""

import json
import math

import pytest

from kvcompress.cli import main
from kvcompress.models import load_config
from kvcompress.planner import GIB, gpu_memory, kv_capacity, parameter_count, parse_memory, plan, plan_record

# (arch, parameters as published, layers x KV heads x head dim) -- all bfloat16
MODELS = [
    ("llama-3.1-8b", 8_030_261_248, 32 * 8 * 128),
    ("qwen2.5-7b", 7_615_616_512, 28 * 4 * 128),
    ("mistral-7b", 7_248_023_552, 32 * 8 * 128),
]


@pytest.mark.parametrize("arch, params, kv_width", MODELS)
def test_plan_matches_hand_computed(arch, params, kv_width):
    config = load_config(arch)
    assert parameter_count(config) == params
    gpu = 80e9
    rows = {r.strategy: r for r in plan(config, ["full", "int8"], gpu, context=32768, sessions=32)}
    full_token = kv_width * 2 * 2  # K and V, 2 bytes each
    int8_token = kv_width // 128 * 2 * (128 + 2)  # int8 codes + one float16 scale per token and head
    assert rows["full"].bytes_per_token == full_token
    assert rows["int8"].bytes_per_token == int8_token
    assert rows["full"].kv_bytes == full_token * 32768 * 32
    assert rows["full"].weights_bytes == params * 2
    free = gpu - params * 2 - 0.1 * gpu
    assert rows["full"].max_sessions == math.floor(free / (full_token * 32768))
    assert rows["int8"].max_sessions == math.floor(free / (int8_token * 32768))
    assert rows["full"].max_context == math.floor(free / (full_token * 32))
    assert rows["full"].fits == (full_token * 32768 * 32 <= free)


def test_llama_32k_by_32_sessions_is_128_gib():
    row = plan(load_config("llama-3.1-8b"), ["full"], 80e9, 32768, 32)[0]
    assert row.bytes_per_token == 131_072 and row.kv_bytes == 128 * GIB
    assert not row.fits and row.verdict.startswith("allocation failures")


def test_retention_budget_unbounds_context():
    row = plan(load_config("llama-3.1-8b"), ["sink:window=4096"], 80e9, 32768, 32)[0]
    assert row.max_context is None and row.fits
    assert row.kv_bytes == (4 + 4096) * 32 * (8 * 128 * 2 * 2 + 4) * 32


def test_weights_and_memory_parsing():
    config = load_config("llama-3.1-8b")
    nf4 = plan(config, ["full"], 24e9, 4096, 1, weights="nf4")[0]
    assert nf4.weights_bytes == round(8_030_261_248 * (0.5 + 0.5 / 64))
    assert parse_memory("80GiB") == 80 * GIB and parse_memory("141GB") == 141e9
    assert gpu_memory("H100-80GB") == 80e9


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: gpu_memory("H100"), "unknown gpu 'H100'; known: .*H100-80GB"),
        (lambda: parse_memory("lots"), "gpu-mem must look like 80GiB"),
        (lambda: plan(load_config("tiny"), ["full"], 1e9, 10, 1, weights="int3"), "weights must be one of"),
        (lambda: plan(load_config("tiny"), ["full"], 1e9, 0, 1), "context and sessions must be positive"),
        (lambda: load_config("random:gpt-9"), "unknown architecture 'gpt-9'.*known:"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_cli_json_has_integer_bytes(capsys):
    main(
        [
            "plan",
            "--model",
            "random:llama-3.1-8b",
            "--gpu",
            "H100-80GB",
            "--context",
            "32k",
            "--sessions",
            "32",
            "--strategies",
            "full,int8,fp8,sink:window=4096",
            "--json",
        ]
    )
    data = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in data["rows"]] == ["full", "int8", "fp8", "sink:window=4096"]
    assert data["rows"][0]["kv_bytes"] == 137_438_953_472 and isinstance(data["rows"][0]["weights_bytes"], int)
    strategies = ["full", "int8", "fp8", "sink:window=4096"]
    rows = plan(load_config("llama-3.1-8b"), strategies, 80e9, 32768, 32)
    assert data == plan_record("random:llama-3.1-8b", 80e9, 32768, 32, "bf16", rows)


def test_kv_capacity_is_the_gpu_less_its_reserve_and_the_weights():
    config = load_config("llama-3.1-8b")
    weights = 8_030_261_248 * 2
    assert kv_capacity(config, "H100-80GB") == 80e9 * 0.9 - weights
    assert kv_capacity(config, "H100-80GB", "141GB", "bf16", 0.2) == 141e9 * 0.8 - weights
    with pytest.raises(ValueError, match=r"the weights \(bf16\) and reserve leave no memory for KV on 16GiB"):
        kv_capacity(config, "H100-80GB", "16GiB")


def test_cli_tables(capsys):
    main(["plan", "--model", "random:llama-3.1-8b", "--gpu-mem", "80GiB"])
    out = capsys.readouterr().out
    assert "128.0" in out and "KV alone exceeds the GPU: needs sharding or offload" in out
    assert "unbounded" in out and "fits (" in out
    with pytest.raises(SystemExit, match="unknown gpu 'X1'"):
        main(["plan", "--gpu", "X1"])


def test_offload_tiers_keep_kv_off_the_gpu():
    full, host, cold = plan(
        load_config("llama-3.1-8b"), ["full", "full+host", "full+disk:policy=cold,window=4096"], 80e9, 32768, 32
    )
    assert host.kv_bytes == 0 and host.fits and host.max_sessions is None and host.max_context is None
    assert "host holds 128.0 GiB" in host.verdict and "disk holds 112.0 GiB" in cold.verdict
    assert cold.kv_bytes == 32 * 131_072 * (4 + 4096)  # sinks + window of each sequence stay on the device
    assert not full.fits
