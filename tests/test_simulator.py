"""The serving-fleet simulator: conservation, allocator invariants, a hand-checked trace, bad route files."""

import math

import pytest

from kvcompress.accounting import kv_sizer
from kvcompress.cli import main
from kvcompress.models import load_config
from kvcompress.simulator import Route, SimConfig, Simulation, load_routes

CONFIG = load_config("llama-3.1-8b")
ROUTES = "experiments/routes/support_fleet.yaml"
TOKEN = 131_072  # bytes per token, Llama-3.1-8B bf16


def _run(strategy="full", routes=None, **settings):
    settings.setdefault("gpu_bytes", 40 * 2**30)
    settings.setdefault("minutes", 20)
    return Simulation(CONFIG, strategy, routes or load_routes(ROUTES), SimConfig(**settings))


@pytest.mark.parametrize("idle_policy", ["ttl", "release"])
@pytest.mark.parametrize("allocator", ["paged", "contiguous"])
def test_memory_returns_to_zero_when_every_session_has_ended(allocator, idle_policy):
    sim = _run(allocator=allocator, idle_policy=idle_policy, admission="queue")
    result = sim.run()
    assert result.final_bytes == 0 and sim.held == 0 and not sim.live
    assert result.samples[-1][1] == 0 and result.peak_bytes > 0


@pytest.mark.parametrize("strategy", ["full", "int8", "sink:window=8192"])
def test_paged_never_overcommits(strategy):
    capacity = 20 * 2**30
    sim = _run(strategy, gpu_bytes=capacity)
    result = sim.run()
    assert result.peak_bytes <= capacity
    assert all(held <= capacity for _, held in result.samples)


def test_paged_fragmentation_is_under_one_block_per_session():
    sim = _run(block_tokens=16)
    sizer = kv_sizer(CONFIG, "full")
    checked = 0
    original = sim._resize

    def checked_resize(session, tokens):
        ok = original(session, tokens)
        if ok:
            nonlocal checked
            waste = session.bytes - sizer.bytes(tokens)
            assert 0 <= waste < 16 * TOKEN
            checked += 1
        return ok

    sim._resize = checked_resize
    sim.run()
    assert checked > 100


def test_contiguous_reserves_the_longest_context_and_fragments_more():
    paged, contiguous = _run().run(), _run(allocator="contiguous").run()
    assert contiguous.fragmentation_pct > 10 * max(paged.fragmentation_pct, 0.1)


def test_hand_checked_trace():
    """Two sessions, fixed sizes: 1000 prompt + 100 output tokens per turn, 2 turns, 10 s thinking, 50 tok/s."""
    route = Route("trace", 0.0, (1000, 1000), (100, 100), (2, 2), (10.0, 10.0), 0.0, arrivals_s=(0.0, 1.0))
    capacity = 3000 * TOKEN  # room for one two-turn session (2200 tokens) plus one turn of the other (1100)
    sim = Simulation(CONFIG, "full", [route], SimConfig(gpu_bytes=capacity, minutes=1, block_tokens=100,
                                                         decode_tps=50.0, idle_policy="release", sample_s=1.0))
    result = sim.run()
    held = dict(result.samples)
    assert held[0.0] == 0
    assert held[1.0] == 1100 * TOKEN  # first session's first turn
    assert held[2.0] == 2200 * TOKEN  # both sessions on their first turn
    # at t=12 s (answer 2 s + think 10 s) the first session's second turn needs 1100 more: 3300 > 3000 -> failure
    assert result.allocation_failures == 1 and result.evictions == 0
    assert held[13.0] == 1100 * TOKEN  # the failed session was dropped; the second still holds its first turn
    assert result.final_bytes == 0


def test_queue_admission_waits_instead_of_failing():
    route = Route("trace", 0.0, (1000, 1000), (100, 100), (1, 1), (0.0, 0.0), 0.0, arrivals_s=(0.0, 0.5))
    sim = Simulation(CONFIG, "full", [route], SimConfig(gpu_bytes=1500 * TOKEN, minutes=1, block_tokens=100,
                                                         decode_tps=50.0, admission="queue", idle_policy="release"))
    result = sim.run()
    assert result.allocation_failures == 0 and len(result.queue_waits_s) == 1
    assert result.queue_waits_s[0] == pytest.approx(2.0 - 0.5)


def test_disconnected_streams_leak_until_released():
    keep = _run(idle_policy="ttl", ttl_s=600, gpu_bytes=1e15).run()
    release = _run(idle_policy="release", gpu_bytes=1e15).run()
    assert keep.per_route["disconnected-streams"]["outcome"].startswith("leaked state")
    assert release.per_route["disconnected-streams"]["outcome"] == "healthy"
    assert (keep.per_route["disconnected-streams"]["kv_bytes"]
            > 3 * release.per_route["disconnected-streams"]["kv_bytes"])


def test_deterministic_for_a_seed_and_same_workload_for_every_strategy():
    a, b = _run(seed=3).run(), _run(seed=3).run()
    assert a.samples == b.samples and a.per_route == b.per_route
    full, int8 = _run(gpu_bytes=1e15).run(), _run("int8", gpu_bytes=1e15).run()
    assert full.per_route["short-chat"]["avg_active_tokens"] == int8.per_route["short-chat"]["avg_active_tokens"]
    assert int8.peak_bytes < 0.55 * full.peak_bytes


@pytest.mark.parametrize("text, message", [
    ("routes:\n  - name: a\n    rate_per_min: 1\n", r"line 2: route is missing field\(s\) disconnect_p, output_tokens"),
    ("routes:\n  - name: a\n    rate_per_min: -1\n    prompt_tokens: 5\n    output_tokens: 5\n    turns: 1\n"
     "    think_s: 1\n    disconnect_p: 0\n", "line 2: rate_per_min must be >= 0"),
    ("routes:\n  - name: a\n    rate_per_min: 1\n    prompt_tokens: [9, 5]\n    output_tokens: 5\n    turns: 1\n"
     "    think_s: 1\n    disconnect_p: 0\n", "line 2: prompt_tokens must be a non-negative number or"),
    ("routes:\n  - name: a\n    rate: 1\n", r"line 2: route is missing field\(s\)"),
    ("other: 1\n", "needs a non-empty 'routes:' list"),
])
def test_bad_route_files_name_the_field_and_line(tmp_path, text, message):
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_routes(path)


def test_bad_settings():
    with pytest.raises(ValueError, match="allocator must be one of paged, contiguous"):
        SimConfig(gpu_bytes=1, allocator="slab")
    with pytest.raises(ValueError, match="idle_policy must be one of ttl, release"):
        SimConfig(gpu_bytes=1, idle_policy="never")


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    main(["simulate", "--routes", ROUTES, "--model", "random:llama-3.1-8b", "--gpu", "H100-80GB", "--minutes", "10",
          "--strategies", "full,int8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "GiB for KV after weights and reserve" in out and "disconnected-streams" in out
    assert (tmp_path / "simulate.json").stat().st_size > 0 and (tmp_path / "kv_memory.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="unknown gpu"):
        main(["simulate", "--routes", ROUTES, "--gpu", "H1"])
