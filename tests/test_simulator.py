"""The serving-fleet simulator: conservation, allocator invariants, hand-checked traces, bad route and costs files,
the host and disk tiers, the park policy, and measured step costs (with the benchmark that measures them)."""

import dataclasses
import json
import math
import runpy
import statistics
import sys

import pytest

from kvcompress import expected_kv_bytes, load_model
from kvcompress.accounting import kv_sizer
from kvcompress.cli import main
from kvcompress.models import load_config
from kvcompress.provenance import provenance
from kvcompress.simulator import (
    ParkCosts,
    Route,
    SimConfig,
    Simulation,
    StepCosts,
    load_routes,
    simulate,
    write_simulation,
)
from kvcompress.tiers import TIERS

from .conftest import ROOT as REPO
from .conftest import png_size

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
    sim = Simulation(
        CONFIG,
        "full",
        [route],
        SimConfig(
            gpu_bytes=capacity, minutes=1, block_tokens=100, decode_tps=50.0, idle_policy="release", sample_s=1.0
        ),
    )
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
    sim = Simulation(
        CONFIG,
        "full",
        [route],
        SimConfig(
            gpu_bytes=1500 * TOKEN,
            minutes=1,
            block_tokens=100,
            decode_tps=50.0,
            admission="queue",
            idle_policy="release",
        ),
    )
    result = sim.run()
    assert result.allocation_failures == 0 and len(result.queue_waits_s) == 1
    assert result.queue_waits_s[0] == pytest.approx(2.0 - 0.5)


def test_disconnected_streams_leak_until_released():
    keep = _run(idle_policy="ttl", ttl_s=600, gpu_bytes=1e15).run()
    release = _run(idle_policy="release", gpu_bytes=1e15).run()
    assert keep.per_route["disconnected-streams"]["outcome"].startswith("leaked state")
    assert release.per_route["disconnected-streams"]["outcome"] == "healthy"
    assert (
        keep.per_route["disconnected-streams"]["kv_bytes"] > 3 * release.per_route["disconnected-streams"]["kv_bytes"]
    )


def test_deterministic_for_a_seed_and_same_workload_for_every_strategy():
    a, b = _run(seed=3).run(), _run(seed=3).run()
    assert a.samples == b.samples and a.per_route == b.per_route
    full, int8 = _run(gpu_bytes=1e15).run(), _run("int8", gpu_bytes=1e15).run()
    assert full.per_route["short-chat"]["avg_active_tokens"] == int8.per_route["short-chat"]["avg_active_tokens"]
    assert int8.peak_bytes < 0.55 * full.peak_bytes


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "routes:\n  - name: a\n    rate_per_min: 1\n",
            r"line 2: route is missing field\(s\) disconnect_p, output_tokens",
        ),
        (
            "routes:\n  - name: a\n    rate_per_min: -1\n    prompt_tokens: 5\n    output_tokens: 5\n    turns: 1\n"
            "    think_s: 1\n    disconnect_p: 0\n",
            "line 2: rate_per_min must be >= 0",
        ),
        (
            "routes:\n  - name: a\n    rate_per_min: 1\n    prompt_tokens: [9, 5]\n    output_tokens: 5\n    turns: 1\n"
            "    think_s: 1\n    disconnect_p: 0\n",
            "line 2: prompt_tokens must be a non-negative number or",
        ),
        ("routes:\n  - name: a\n    rate: 1\n", r"line 2: route is missing field\(s\)"),
        ("other: 1\n", "needs a non-empty 'routes:' list"),
    ],
)
def test_bad_route_files_name_the_field_and_line(tmp_path, text, message):
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_routes(path)


def test_bad_settings():
    with pytest.raises(ValueError, match="allocator must be one of paged, contiguous"):
        SimConfig(gpu_bytes=1, allocator="slab")
    with pytest.raises(ValueError, match="idle_policy must be one of ttl, release, park"):
        SimConfig(gpu_bytes=1, idle_policy="never")
    with pytest.raises(ValueError, match="idle_policy park needs park_costs"):
        SimConfig(gpu_bytes=1, idle_policy="park", prefill_tps=1e4)
    with pytest.raises(ValueError, match="idle_policy park needs prefill_tps"):
        SimConfig(gpu_bytes=1, idle_policy="park", park_costs=ParkCosts(1e9, 1e9, 0.0), prefill_tps=0)
    with pytest.raises(ValueError, match="read only by idle_policy park, not ttl"):
        SimConfig(gpu_bytes=1, park_costs=ParkCosts(1e9, 1e9, 0.0))


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    main(
        [
            "simulate",
            "--routes",
            ROUTES,
            "--model",
            "random:llama-3.1-8b",
            "--gpu",
            "H100-80GB",
            "--minutes",
            "10",
            "--strategies",
            "full,int8",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "GiB for KV after weights and reserve" in out and "disconnected-streams" in out
    full, int8 = json.loads((tmp_path / "simulate.json").read_text())["results"]
    assert (full["strategy"], int8["strategy"]) == ("full", "int8")
    assert 0 < int8["peak_bytes"] <= full["peak_bytes"]  # the same sessions in half the bytes per token
    assert min(png_size(tmp_path / "kv_memory.png")) >= 200
    with pytest.raises(SystemExit, match="unknown gpu"):
        main(["simulate", "--routes", ROUTES, "--gpu", "H1"])


def test_write_simulation_keeps_each_record_and_the_capacity(tmp_path):
    config = SimConfig(gpu_bytes=20 * 2**30 + 0.4, minutes=5)
    results = simulate(CONFIG, ["full", "int8+host"], load_routes(ROUTES), config)
    path, png = write_simulation(tmp_path, results, config, "llama-3.1-8b", "H100-80GB", ["kvcompress", "simulate"])
    data = json.loads(path.read_text())
    assert path == tmp_path / "simulate.json" and png == tmp_path / "kv_memory.png"
    assert data["results"] == json.loads(json.dumps([r.record() for r in results]))
    meta = data["meta"]
    assert (meta["model"], meta["gpu"], meta["command"]) == ("llama-3.1-8b", "H100-80GB", "kvcompress simulate")
    assert meta["kv_capacity_bytes"] == 20 * 2**30 and list(meta)[-2:] == ["gpu", "kv_capacity_bytes"]


# -- host and disk tiers: capacity and link bandwidth -------------------------------------------------------------
FAST_LINK = 1e15  # B/s: no fleet here asks for a thousandth of it, so decode runs at full speed


@pytest.mark.parametrize(
    "strategy, capacity, link",
    [("full+host", "host_bytes", "pcie_bytes_per_s"), ("full+disk", "disk_bytes", "disk_bytes_per_s")],
)
def test_offload_tier_capacity_fails_admissions_like_device_memory(strategy, capacity, link):
    """`layers` offload keeps nothing on the device, so a 20 GiB tier fails exactly where a 20 GiB GPU does, and the
    failures are the tier's; the same workload on a big GPU fails nothing."""
    tier = strategy.split("+")[1]
    offload = _run(strategy, gpu_bytes=1, **{capacity: 20 * 2**30, link: FAST_LINK}).run()
    device = _run("full", gpu_bytes=20 * 2**30).run()
    big = _run("full", gpu_bytes=1e15).run()
    assert big.allocation_failures == 0
    assert device.failures_by_memory == {"device": device.allocation_failures} and device.allocation_failures > 10
    assert offload.failures_by_memory == {tier: device.allocation_failures}
    assert offload.evictions == device.evictions and offload.offload_samples == device.samples
    assert offload.peak_bytes == 0 and 0 < offload.peak_off_device_bytes[tier] <= 20 * 2**30
    label = "host-memory-bound" if tier == "host" else "disk-space-bound"
    for name, row in offload.per_route.items():
        failed = device.per_route[name]["allocation_failures"]["device"]
        assert row["allocation_failures"] == {tier: failed}
        assert row["outcome"] == f"{label} ({failed} allocation failures)"
        assert device.per_route[name]["outcome"] == f"allocation failures ({failed})"


@pytest.mark.parametrize("strategy", ["full+host", "int8+host:policy=cold,window=256"])
def test_offloaded_memory_returns_to_zero_and_never_overcommits_the_tier(strategy):
    capacity = 30 * 2**30
    sim = _run(strategy, host_bytes=capacity, admission="queue", idle_policy="release")
    result = sim.run()
    assert result.final_offload_bytes == 0 and sim.off_held == 0 and result.final_bytes == 0
    assert set(result.peak_off_device_bytes) == {"host"} and 0 < result.peak_off_device_bytes["host"] <= capacity
    assert all(held <= capacity for _, held in result.offload_samples)


def test_hand_checked_bandwidth_trace():
    """full+host, 1000 prompt + 100 output tokens, 50 tok/s: a decode step reads 1100 tokens' KV back, 50 times a
    second. The link carries exactly one session's demand: the first decodes at full speed (0-2 s); the second,
    arriving at 1 s, finds the link already full and decodes at half speed, 4 s instead of 2, holding its KV longer."""
    route = Route("trace", 0.0, (1000, 1000), (100, 100), (1, 1), (0.0, 0.0), 0.0, arrivals_s=(0.0, 1.0))
    one = 1100 * TOKEN * 50.0
    settings = dict(gpu_bytes=1, minutes=1, block_tokens=100, decode_tps=50.0, idle_policy="release", sample_s=1.0)
    result = Simulation(CONFIG, "full+host", [route], SimConfig(**settings, pcie_bytes_per_s=one)).run()
    held = dict(result.offload_samples)
    assert [held[float(t)] for t in range(7)] == [0, 1100 * TOKEN, 2200 * TOKEN] + [1100 * TOKEN] * 3 + [0]
    assert all(b == 0 for _, b in result.samples)  # nothing on the device between steps
    assert result.link_utilisation["peak"] == pytest.approx(2.0)
    assert result.link_utilisation["mean"] == pytest.approx((1 * 1 + 2 * 1 + 1 * 3) / 5)  # over 0-5 s
    assert result.decode_speed["min"] == pytest.approx(0.5)
    assert result.decode_speed["mean"] == pytest.approx((2 * 1.0 + 4 * 0.5) / 6)  # over 6 s of decoding
    # the route's answers saw the link asked for 1x, 2x (0-2 s) and 2x, 1x, 1x, 1x (1-5 s): 8/6 on average
    assert result.per_route["trace"]["outcome"] == "bandwidth-bound (decode 0.67x, PCIe 133% demanded)"
    fast = Simulation(CONFIG, "full+host", [route], SimConfig(**settings, pcie_bytes_per_s=4 * one)).run()
    assert dict(fast.offload_samples)[4.0] == 0  # both answers done at 3 s, where the slow link holds on to 5 s
    assert fast.decode_speed == {"mean": 1.0, "min": 1.0} and fast.link_utilisation["peak"] == pytest.approx(0.5)
    assert fast.per_route["trace"]["outcome"] == "healthy"


def test_full_host_fleet_is_bandwidth_bound_on_a_slow_link_and_healthy_on_a_fast_one():
    """Every decode step of `layers` offload reads the whole KV back over PCIe: at the measured 55 GB/s of an H200
    this fleet asks for about a hundred times what the link carries."""
    slow = _run("full+host", minutes=10, pcie_bytes_per_s=55e9).run()
    fast = _run("full+host", minutes=10, pcie_bytes_per_s=FAST_LINK).run()
    assert slow.link_utilisation["peak"] > slow.link_utilisation["mean"] > 1
    assert slow.decode_speed["min"] <= slow.decode_speed["mean"] < 0.5
    for row in slow.per_route.values():
        assert row["decode_speed"] < 0.5 and row["link_demand"] > 1
        assert row["outcome"].startswith("bandwidth-bound (decode ") and "% demanded" in row["outcome"]
    assert fast.link_utilisation["peak"] < 0.01 and fast.decode_speed == {"mean": 1.0, "min": 1.0}
    assert all(row["outcome"] == "healthy" for row in fast.per_route.values())
    # slower answers keep KV resident longer: the fleet's last KV leaves the host later (the hand-checked trace
    # above checks it per session)
    assert slow.offload_samples[-1][0] > fast.offload_samples[-1][0] + 60


def test_int8_offload_asks_about_half_the_link_of_full():
    """int8 stores 128 bytes + a 2-byte scale per head where bf16 stores 256: 130/256 = 0.508 of the bytes to read
    back per step (the GPU check measured 545.8 / 1074.9 MB per step at 8k, the same 0.508)."""
    full = _run("full+host", pcie_bytes_per_s=FAST_LINK).run()
    int8 = _run("int8+host", pcie_bytes_per_s=FAST_LINK).run()
    for key in ("mean", "peak"):
        assert int8.link_utilisation[key] / full.link_utilisation[key] == pytest.approx(130 / 256, rel=0.01)
    assert int8.peak_off_device_bytes["host"] / full.peak_off_device_bytes["host"] == pytest.approx(130 / 256, rel=0.01)


def test_device_strategies_have_no_tier_and_no_link():
    result = _run("int8", gpu_bytes=20 * 2**30).run()
    assert result.peak_off_device_bytes == {} and result.final_offload_bytes == 0
    assert result.link_utilisation == {"peak": 0.0, "mean": 0.0} and result.decode_speed == {"mean": 1.0, "min": 1.0}
    assert set(result.failures_by_memory) <= {"device"}


@pytest.mark.parametrize("name", ["host_bytes", "pcie_bytes_per_s", "disk_bytes", "disk_bytes_per_s"])
@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, "55e9", True])
def test_bad_tier_settings_name_the_parameter(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be a positive, finite number"):
        SimConfig(gpu_bytes=1, **{name: value})


def test_every_off_device_tier_declares_what_the_simulator_reads():
    """The simulator never names a tier: each one that keeps tokens off the device names its memory, link, the
    outcome when that memory runs out, and the machine settings that size it; a tier missing one fails here."""
    settings = {f.name for f in dataclasses.fields(SimConfig)}
    for name in TIERS.names():
        tier = TIERS.get(name)
        if tier.memory == "device":
            continue
        assert tier.link and tier.shortage and tier.memory in tier.shortage
        assert {tier.capacity_setting, tier.link_setting} <= settings
        result = _run(f"full+{name}", gpu_bytes=1, **{tier.capacity_setting: 2**30, tier.link_setting: FAST_LINK})
        outcomes = {row["outcome"] for row in result.run().per_route.values()}
        assert any(outcome.startswith(tier.shortage) for outcome in outcomes), outcomes


# -- the park policy: idle and thinking sessions moved to host memory, restored on their next turn ----------------
def _reuse_row(length, save_mb_per_s, load_mb_per_s, load_s, restore_s, strategy="full"):
    """One row of experiments/bench_reuse.py's reuse.json, with the fields the simulator reads given."""
    return {
        "strategy": strategy,
        "length": length,
        "prefill_s": 1.0,
        "save_s": 0.01,
        "load_s": load_s,
        "restore_s": restore_s,
        "file_bytes": 10**6,
        "kv_bytes": 10**6,
        "save_mb_per_s": save_mb_per_s,
        "load_mb_per_s": load_mb_per_s,
        "restore_vs_prefill": 0.1,
    }


# At 4096 tokens the medians are save 500 MB/s, load 1000 MB/s and restore - load 0.05 s; the 1024-token row, far
# off, must be left out.
REUSE_ROWS = [
    _reuse_row(1024, 1.0, 1.0, 0.001, 9.0),
    _reuse_row(4096, 400.0, 800.0, 0.02, 0.06),
    _reuse_row(4096, 500.0, 1000.0, 0.01, 0.06, "int8"),
    _reuse_row(4096, 600.0, 1200.0, 0.03, 0.09, "kvzip:ratio=0.5"),
]


def _costs_file(folder, rows=REUSE_ROWS):
    path = folder / "reuse.json"
    path.write_text(json.dumps({"meta": {"command": "python experiments/bench_reuse.py"}, "rows": rows}))
    return path


def _park(tmp_path, strategy="full", routes=None, prefill_tps=10_000.0, **settings):
    costs = ParkCosts.read(_costs_file(tmp_path))
    return _run(strategy, routes, idle_policy="park", park_costs=costs, prefill_tps=prefill_tps, **settings)


def test_park_costs_are_the_medians_at_the_largest_length(tmp_path):
    costs = ParkCosts.read(_costs_file(tmp_path))
    assert (costs.save_bytes_per_s, costs.load_bytes_per_s) == (500e6, 1000e6)
    assert costs.restore_overhead_s == pytest.approx(0.05) and costs.length == 4096
    assert costs.park_s(10**9) == 2.0 and costs.restore_s(10**9) == pytest.approx(1.05)


def test_hand_checked_park_trace(tmp_path):
    """One session, 1000 prompt + 100 output tokens per turn, 2 turns, 10 s thinking, 50 tok/s, ttl 5 s. Its first
    answer ends at 2 s; parking 1100 tokens' KV at 500 MB/s takes 0.29 s, then the GPU holds nothing. Its second
    turn (12 s) allocates 2200 tokens and waits for the restore, 1100 tokens' bytes / 1000 MB/s + 0.05 s; the host
    copy goes and the answer ends 2 s later, at 14.19 s; the last park ends at 14.77 s, and the TTL at 19.19 s."""
    route = Route("trace", 0.0, (1000, 1000), (100, 100), (2, 2), (10.0, 10.0), 0.0, arrivals_s=(0.0,))
    settings = dict(gpu_bytes=10**12, minutes=1, block_tokens=100, decode_tps=50.0, ttl_s=5.0, sample_s=1.0)
    sim = _park(tmp_path, routes=[route], prefill_tps=2000.0, **settings)
    result = sim.run()
    restore_s = 1100 * TOKEN / 1000e6 + 0.05
    row = result.per_route["trace"]
    assert row["restores"] == 1 and row["restore_failures"] == 0 and row["park_refusals"] == 0
    assert row["restore_ttft_mean_s"] == row["restore_ttft_p95_s"] == round(restore_s, 4)
    assert row["reprefill_ttft_mean_s"] == row["reprefill_ttft_p95_s"] == 1100 / 2000.0  # its context, prefilled again
    one, two = 1100 * TOKEN, 2200 * TOKEN
    device, host = dict(result.samples), dict(result.parked_samples)
    assert [device[float(t)] for t in (1, 2, 3, 12, 13, 14, 15, 20)] == [one, one, 0, 0, two, two, 0, 0]
    assert [host[float(t)] for t in (1, 2, 3, 12, 13, 14, 15, 19, 20)] == [0, 0, one, one, 0, 0, two, two, 0]
    assert result.park["peak_parked_bytes"] == two and result.park["restores"] == 1
    assert sim.now == pytest.approx(14 + restore_s + 5)  # the TTL ran from the end of the restore-delayed answer


def test_a_parked_session_never_holds_device_bytes(tmp_path):
    sim = _park(tmp_path)
    seen = 0
    sample = sim._sample

    def checked_sample(t):
        nonlocal seen
        for s in sim.live.values():
            if s.park == "parked":
                assert s.bytes == 0 and s.parked == sim.kv_bytes(s.tokens) > 0
                seen += 1
        assert sim.held == sum(s.bytes for s in sim.live.values())
        assert sim.parked_held == sum(s.parked for s in sim.live.values())
        sample(t)

    sim._sample = checked_sample
    result = sim.run()
    assert seen > 1000 and result.park["restores"] > 100
    assert result.final_bytes == 0 and sim.parked_held == 0 and result.parked_samples[-1][1] == 0


def test_park_lowers_the_hbm_peak_on_routes_with_think_time_and_moves_idle_state_to_the_host(tmp_path):
    ttl = _run(gpu_bytes=1e15).run()
    park = _park(tmp_path, gpu_bytes=1e15).run()
    assert park.peak_bytes < 0.75 * ttl.peak_bytes
    for name, row in park.per_route.items():
        assert row["kv_bytes"] < ttl.per_route[name]["kv_bytes"] and row["parked_bytes"] > 0
        assert 0 < row["restore_ttft_mean_s"] <= row["restore_ttft_p95_s"]
    # disconnected clients leak on the device under ttl; parked, their state waits on the host instead
    assert ttl.per_route["disconnected-streams"]["outcome"].startswith("leaked state")
    assert park.per_route["disconnected-streams"]["outcome"] == "healthy"


@pytest.mark.parametrize("strategy", ["full", "int8+host:policy=cold,window=256", "int8+disk:policy=cold,window=256"])
def test_park_never_overcommits_host_memory_and_returns_to_zero(tmp_path, strategy):
    """A small host refuses parks (the session stays on the device); with a host tier the park shares its memory,
    a disk tier's KV stays on the disk."""
    host = 2**28  # 256 MiB: a full session of 2k tokens holds as much
    sim = _park(tmp_path, strategy, host_bytes=host, pcie_bytes_per_s=FAST_LINK, disk_bytes_per_s=FAST_LINK)
    result = sim.run()
    shared = [b if "+host" in strategy else 0 for _, b in result.offload_samples]
    assert all(parked + off <= host for (_, parked), off in zip(result.parked_samples, shared))
    assert result.park["park_refusals"] > 0 and 0 < result.park["peak_parked_bytes"] <= host
    assert result.final_bytes == result.final_offload_bytes == sim.parked_held == 0 and not sim.live


def test_restores_without_device_room_fail_like_any_allocation(tmp_path):
    park = _park(tmp_path, gpu_bytes=10 * 2**30).run()
    assert park.park["restore_failures"] > 0
    assert park.park["restore_failures"] <= park.allocation_failures == park.failures_by_memory["device"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("{not json", "not a JSON file"),
        ({"meta": {}, "rows": []}, "needs a non-empty 'rows' list"),
        ({"rows": [{"strategy": "full"}]}, r"rows\[0\]\.length must be a positive integer, got None"),
        ({"rows": [REUSE_ROWS[0], {**REUSE_ROWS[1], "load_mb_per_s": None}]}, r"rows\[1\]\.load_mb_per_s must be"),
        ({"rows": [{**REUSE_ROWS[1], "save_mb_per_s": -3}]}, r"rows\[0\]\.save_mb_per_s must be a positive"),
        ({"rows": [{**REUSE_ROWS[1], "restore_s": 0.001}]}, r"rows\[0\]\.restore_s \(0\.001\) is below its load_s"),
    ],
)
def test_bad_park_costs_files_name_the_file_and_field(tmp_path, content, message):
    _refused(ParkCosts.read, tmp_path / "reuse.json", content, message)


def _refused(read, path, content, message) -> None:
    """`read` refuses `path` holding `content` (None: no file; a string as written, else as JSON), naming the file."""
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        read(path)


def test_ttl_and_release_records_carry_no_park_fields():
    routes = {"active_sessions", "avg_active_tokens", "kv_bytes", "offload_bytes", "evictions"}
    routes |= {"allocation_failures", "decode_speed", "link_demand", "outcome"}
    for policy in ("ttl", "release"):
        record = _run(idle_policy=policy, minutes=5).run().record()
        assert "park" not in record and "parked_samples" not in record
        assert all(set(row) == routes for row in record["routes"].values())


def _simulate_argv(tmp_path, *extra):
    args = ["simulate", "--routes", ROUTES, "--minutes", "5", "--strategies", "int8", "--out", str(tmp_path / "o")]
    return [*args, *extra]


def test_cli_park_run_prints_and_records_what_park_relieves_and_creates(tmp_path, capsys):
    costs = _costs_file(tmp_path)
    main(_simulate_argv(tmp_path, "--idle-policy", "park", "--park-costs", str(costs), "--prefill-tps", "12000"))
    out = capsys.readouterr().out
    assert f"park costs from {costs} (4096 tokens): save 500 MB/s, load 1,000 MB/s" in out
    assert "restores add" in out and "re-prefill s" in out
    data = json.loads((tmp_path / "o" / "simulate.json").read_text())
    assert data["meta"]["park_costs"] == ParkCosts.read(costs).record() and data["meta"]["prefill_tps"] == 12000
    (result,) = data["results"]
    assert result["park"]["restores"] == sum(row["restores"] for row in result["routes"].values()) > 0
    assert len(result["parked_samples"]) == len(result["samples"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--idle-policy", "park", "--prefill-tps", "1e4"], "--idle-policy park needs --park-costs"),
        (["--idle-policy", "park", "--park-costs", "{costs}"], "--idle-policy park needs --prefill-tps"),
        (["--park-costs", "{costs}"], "--park-costs is read only with --idle-policy park, not ttl"),
        (["--idle-policy", "release", "--prefill-tps", "1e4"], "--prefill-tps is read only with --idle-policy park"),
        (["--idle-policy", "park", "--park-costs", "{costs}", "--prefill-tps", "0"], "--prefill-tps must be a posit"),
        (
            ["--idle-policy", "park", "--park-costs", "{bad}", "--prefill-tps", "1e4"],
            r"{bad}: rows\[0\]\.load_mb_per_s",
        ),
    ],
)
def test_cli_park_flags_are_checked(tmp_path, extra, message):
    costs = _costs_file(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{**REUSE_ROWS[1], "load_mb_per_s": "fast"}]}))
    fill = {"{costs}": str(costs), "{bad}": str(bad)}
    with pytest.raises(SystemExit, match=message.replace("{bad}", str(bad))):
        main(_simulate_argv(tmp_path, *(fill.get(arg, arg) for arg in extra)))
    assert not (tmp_path / "o" / "simulate.json").exists()


# -- measured step costs: a decode step by batch and context, a prefill by prompt length --------------------------
def _steps_file(folder, decode, prefill, name="steps.json", meta=None):
    """A steps.json as experiments/bench_steps.py writes it: decode {(strategy, batch, context): s}, prefill
    {(strategy, tokens): s}."""
    path = folder / name
    data = {
        "meta": meta
        if meta is not None
        else {"model": "default", "device": "a test CPU", "calibration": {"prefill_1k_s": 1.5}},
        "decode": [{"strategy": s, "batch": b, "context": c, "step_s": t} for (s, b, c), t in decode.items()],
        "prefill": [{"strategy": s, "tokens": n, "prefill_s": t} for (s, n), t in prefill.items()],
    }
    path.write_text(json.dumps(data))
    return path


def _grid(step_s, strategies=("full",), batches=(1, 4), contexts=(100, 10_000), prefill_s=0.5):
    """Decode seconds step_s(batch, context) at every grid point, and a prefill of `prefill_s` at 100 and 10k
    tokens, for each strategy."""
    decode = {(s, b, c): step_s(b, c) for s in strategies for b in batches for c in contexts}
    return decode, {(s, n): prefill_s for s in strategies for n in (100, 10_000)}


def test_step_costs_are_linear_in_context_then_batch_and_say_when_they_extrapolate(tmp_path):
    decode = {("full", 1, 100): 0.010, ("full", 1, 300): 0.030, ("full", 4, 100): 0.040, ("full", 4, 300): 0.120}
    costs = StepCosts.read(_steps_file(tmp_path, decode, {("full", 100): 0.1, ("full", 1000): 1.0}))
    step = costs.decode_step_s
    assert step("full", 1, 100) == (0.010, False) and step("full", 4, 300) == (0.120, False)
    assert step("full", 1, 200) == (pytest.approx(0.020), False)
    # at context 200: 0.020 at batch 1 and 0.080 at batch 4; a third of the way to 4
    assert step("full", 2, 200) == (pytest.approx(0.040), False)
    # above the grid the last segment's rise goes on; below it the first value holds
    assert step("full", 1, 500) == (pytest.approx(0.050), True)
    assert step("full", 8, 300) == (pytest.approx(0.240), True)
    assert step("full", 1, 50) == (0.010, True)
    assert costs.prefill_s("full", 550) == (pytest.approx(0.55), False)
    assert costs.prefill_s("full", 2000) == (pytest.approx(2.0), True) and costs.prefill_s("full", 10) == (0.1, True)
    assert costs.prefill_s("full+none", 1000) == (1.0, False)  # the strategy as parsed, not as spelled
    assert costs.grid("full") == {"batches": [1, 4], "contexts": [100, 300], "prompts": [100, 1000]}
    # a noisy fall between the last two contexts is not extended: the last value holds
    falling = {("full", 1, 100): 0.03, ("full", 1, 300): 0.02}
    costs = StepCosts.read(_steps_file(tmp_path, falling, {("full", 100): 0.1}, "falling.json"))
    assert costs.decode_step_s("full", 1, 5000) == (0.02, True)
    assert costs.decode_step_s("full", 3, 200) == (pytest.approx(0.025), True)  # one batch measured: it holds


def test_hand_checked_step_costs_trace(tmp_path):
    """Two sessions of 1000 prompt + 100 output tokens, arriving at 0 and 1 s; a prefill takes 0.5 s at any length,
    a decode step 20 ms alone and 40 ms in a batch of two, at any context. The first prefills to 0.5 s and decodes
    alone, 100 x 20 ms, to 2.5 s; the second prefills from 1 to 1.5 s and joins the first: 100 x 40 ms, to 5.5 s."""
    route = Route("trace", 0.0, (1000, 1000), (100, 100), (1, 1), (0.0, 0.0), 0.0, arrivals_s=(0.0, 1.0))
    costs = StepCosts.read(_steps_file(tmp_path, *_grid(lambda b, c: 0.02 * b, batches=(1, 2))))
    settings = dict(gpu_bytes=10**12, minutes=1, block_tokens=100, idle_policy="release", sample_s=1.0)
    result = Simulation(CONFIG, "full", [route], SimConfig(**settings, step_costs=costs)).run()
    held = dict(result.samples)
    assert [held[float(t)] for t in range(7)] == [0, 1100 * TOKEN, 2200 * TOKEN] + [1100 * TOKEN] * 3 + [0]
    row = result.per_route["trace"]
    assert row["answers"] == 2 and row["decode_tps"] == (50 + 25) / 2 and row["batch_mean"] == 1.5
    assert row["ttft_mean_s"] == row["ttft_p95_s"] == 0.5
    totals = result.step_costs
    assert totals["lookups"] == {"decode": 2, "prefill": 2} and totals["extrapolated"] == {"decode": 0, "prefill": 0}
    assert totals["largest"] == {"batch": 2, "context": 1050, "prompt": 1000} and totals["batch_max"] == 2
    # the constant rate (no file) knows neither: both decode at decode_tps from their arrival
    plain = Simulation(CONFIG, "full", [route], SimConfig(**settings, decode_tps=50.0)).run()
    assert [dict(plain.samples)[float(t)] for t in range(5)] == [0, 1100 * TOKEN, 2200 * TOKEN, 1100 * TOKEN, 0]
    assert "decode_tps" not in plain.per_route["trace"] and not plain.step_costs


def test_batches_that_cost_more_lower_each_sessions_tokens_per_s_at_higher_concurrency(tmp_path):
    """Eight sessions arriving together, against one alone. With a step that costs as much at batch 4 as at
    batch 1 (flat), every answer decodes at 50 tokens/s; where batch 4 costs four times batch 1 (and the rise goes
    on past the grid), the k-th answer to start joins k - 1 others and decodes at 50 / k tokens/s."""
    flat = StepCosts.read(_steps_file(tmp_path, *_grid(lambda b, c: 0.02), name="flat.json"))
    costly = StepCosts.read(_steps_file(tmp_path, *_grid(lambda b, c: 0.02 * b), name="costly.json"))

    def run(costs, sessions):
        route = Route("r", 0.0, (1000, 1000), (100, 100), (1, 1), (0.0, 0.0), 0.0, arrivals_s=(0.0,) * sessions)
        config = SimConfig(gpu_bytes=10**12, minutes=1, idle_policy="release", step_costs=costs)
        return Simulation(CONFIG, "full", [route], config).run()

    assert run(flat, 1).per_route["r"]["decode_tps"] == run(costly, 1).per_route["r"]["decode_tps"] == 50
    together_flat, together_costly = run(flat, 8), run(costly, 8)
    assert together_flat.per_route["r"]["decode_tps"] == 50
    harmonic = sum(50 / k for k in range(1, 9)) / 8
    assert together_costly.per_route["r"]["decode_tps"] == pytest.approx(harmonic, abs=0.01)
    assert together_costly.per_route["r"]["batch_mean"] == together_flat.per_route["r"]["batch_mean"] == 4.5
    assert together_costly.step_costs["extrapolated"]["decode"] == 4  # batches 5 to 8 lie past the grid's 4


def test_a_costlier_batch_slows_a_whole_fleet_and_keeps_its_kv_resident_longer(tmp_path):
    flat = StepCosts.read(_steps_file(tmp_path, *_grid(lambda b, c: 0.02), name="flat.json"))
    costly = StepCosts.read(_steps_file(tmp_path, *_grid(lambda b, c: 0.005 * (3 + b)), name="costly.json"))
    fast = _run(gpu_bytes=1e15, minutes=10, step_costs=flat).run()
    slow = _run(gpu_bytes=1e15, minutes=10, step_costs=costly).run()
    for name, row in slow.per_route.items():
        assert row["decode_tps"] < 0.5 * fast.per_route[name]["decode_tps"] == 25
        assert row["batch_mean"] > fast.per_route[name]["batch_mean"] > 1
        assert row["kv_bytes"] > fast.per_route[name]["kv_bytes"]
    assert slow.step_costs["extrapolated"]["decode"] > 0 and slow.step_costs["largest"]["batch"] > 4


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("{not json", "not a JSON file"),
        ({"decode": [], "prefill": []}, "needs a non-empty 'decode' list"),
        ({"decode": [{"strategy": "full", "batch": 1, "context": 9, "step_s": 0.1}]}, "needs a non-empty 'prefill'"),
        ({"decode": [{"strategy": "full", "batch": 1, "context": 9}]}, r"decode\[0\]\.step_s must be a positive"),
        ({"decode": [{"strategy": "full", "batch": 1.5, "context": 9, "step_s": 1}]}, r"decode\[0\]\.batch must be"),
        ({"decode": [{"strategy": "fast", "batch": 1, "context": 9, "step_s": 1}]}, r"decode\[0\]\.strategy: unknown"),
    ],
)
def test_bad_step_costs_files_name_the_file_and_field(tmp_path, content, message):
    _refused(StepCosts.read, tmp_path / "steps.json", content, message)


def test_step_costs_with_a_hole_or_half_a_strategy_are_refused(tmp_path):
    decode, prefill = _grid(lambda b, c: 0.02)
    del decode["full", 4, 100]
    with pytest.raises(ValueError, match=r"'full' has no decode step at batch 4, context 100: its grid must hold"):
        StepCosts.read(_steps_file(tmp_path, decode, prefill))
    decode, prefill = _grid(lambda b, c: 0.02, strategies=("full", "int8"))
    del prefill["int8", 100], prefill["int8", 10_000]
    path = _steps_file(tmp_path, decode, prefill)
    with pytest.raises(ValueError, match=f"^{path}: strategy 'int8' has decode steps but no prefill rows"):
        StepCosts.read(path)


def test_a_strategy_the_file_lacks_is_refused_before_anything_runs(tmp_path, capsys):
    path = _steps_file(tmp_path, *_grid(lambda b, c: 0.02, strategies=("full", "int8")))
    costs = StepCosts.read(path)
    message = f"^{path}: no step costs for strategy 'fp8'; it has full, int8 .python experiments/bench_steps.py"
    with pytest.raises(ValueError, match=message):
        simulate(CONFIG, ["full", "fp8"], load_routes(ROUTES), SimConfig(gpu_bytes=2**30, step_costs=costs))
    with pytest.raises(SystemExit, match=f"kvcompress simulate: {path}: no step costs for strategy 'fp8'"):
        main(_simulate_argv(tmp_path, "--strategies", "full,fp8", "--step-costs", str(path)))
    assert not (tmp_path / "o" / "simulate.json").exists() and "full: peak" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match=f"kvcompress simulate: {tmp_path / 'none.json'}: no such file"):
        main(_simulate_argv(tmp_path, "--step-costs", str(tmp_path / "none.json")))


def test_cli_step_costs_run_prints_and_records_the_file_and_its_machine(tmp_path, capsys):
    path = _steps_file(tmp_path, *_grid(lambda b, c: 0.02 * b + 1e-6 * c, strategies=("int8",)))
    main(_simulate_argv(tmp_path, "--step-costs", str(path)))
    out = capsys.readouterr().out
    assert f"step costs from {path}: measured with default on a test CPU (1k-token prefill 1.50 s there)" in out
    assert "not --model random:llama-3.1-8b" in out and "tokens/s per session" in out and "outside the measured" in out
    data = json.loads((tmp_path / "o" / "simulate.json").read_text())
    assert data["meta"]["step_costs"] == {
        "source": str(path),
        "model": "default",
        "device": "a test CPU",
        "calibration_prefill_1k_s": 1.5,
        "strategies": ["int8"],
    }
    (result,) = data["results"]
    assert result["step_costs"]["lookups"]["decode"] == sum(r["answers"] for r in result["routes"].values()) > 0
    assert all(0 < r["decode_tps"] < 50 and r["ttft_mean_s"] >= 0.5 for r in result["routes"].values())


def test_cli_park_prices_its_re_prefill_from_the_step_costs(tmp_path, capsys):
    steps = _steps_file(tmp_path, *_grid(lambda b, c: 0.02, strategies=("int8",), prefill_s=0.25))
    park = ["--idle-policy", "park", "--park-costs", str(_costs_file(tmp_path))]
    main(_simulate_argv(tmp_path, *park, "--step-costs", str(steps)))
    assert "re-prefill at the step costs' prefill" in capsys.readouterr().out
    (result,) = json.loads((tmp_path / "o" / "simulate.json").read_text())["results"]
    assert result["park"]["restores"] > 0 and result["park"]["reprefill_ttft_mean_s"] == 0.25
    with pytest.raises(SystemExit, match="--prefill-tps is not read with --step-costs"):
        main(_simulate_argv(tmp_path / "again", *park, "--step-costs", str(steps), "--prefill-tps", "1e4"))
    with pytest.raises(ValueError, match="prefill_tps is not read with step_costs"):
        SimConfig(
            gpu_bytes=1,
            idle_policy="park",
            park_costs=ParkCosts(1e9, 1e9, 0.0),
            prefill_tps=1e4,
            step_costs=StepCosts.read(steps),
        )


def test_bench_steps_measures_a_tiny_grid_the_simulator_reads(tmp_path, monkeypatch):
    """experiments/bench_steps.py on a tiny random model: every cell of every round kept, each figure the median of
    its rounds' samples inside its interval, the cache's bytes as the config says, and a file StepCosts reads."""
    argv = ["--model", "random:tiny", "--strategies", "full,int8", "--batches", "1,2", "--contexts", "16,32"]
    argv += ["--prompts", "16,32", "--rounds", "2", "--steps", "3", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["bench_steps.py", *argv])
    runpy.run_path(str(REPO / "experiments" / "bench_steps.py"), run_name="__main__")
    data = json.loads((tmp_path / "steps.json").read_text())
    meta, model = data["meta"], load_model("random:tiny")[0]
    assert meta["model"] == "random:tiny" and meta["calibration"]["prefill_1k_s"] > 0
    assert meta["git_commit"] == provenance("random:tiny", "cpu")["git_commit"] and meta["grid"]["batches"] == [1, 2]
    assert [(r["strategy"], r["batch"], r["context"]) for r in data["decode"]] == [
        (s, b, c) for s in ("full", "int8") for b in (1, 2) for c in (16, 32)
    ]
    for row in data["decode"]:
        assert [len(r) for r in row["rounds"]] == [3, 3]
        low, high = row["step_s_interval"]
        assert low <= row["step_s"] <= high
        assert row["step_s"] == pytest.approx(statistics.median(sum(row["rounds"], [])), abs=2e-6)
        # the cell held `batch` rows of its context plus the steps decoded (one untimed, three timed)
        assert row["kv_bytes"] == row["batch"] * expected_kv_bytes(model, row["strategy"], row["context"] + 4)
    assert [(r["strategy"], r["tokens"], len(r["rounds"])) for r in data["prefill"]] == [
        (s, n, 2) for s in ("full", "int8") for n in (16, 32)
    ]
    costs = StepCosts.read(tmp_path / "steps.json")
    int8 = next(r for r in data["decode"] if (r["strategy"], r["batch"], r["context"]) == ("int8", 2, 32))
    assert costs.decode_step_s("int8", 2, 32) == (int8["step_s"], False) and costs.device == meta["device"]
    text = (tmp_path / "steps.md").read_text()
    assert "| `int8` | 2 | " in text and "calibration: 1k-token prefill" in text
    with pytest.raises(SystemExit, match="already holds steps.json"):
        runpy.run_path(str(REPO / "experiments" / "bench_steps.py"), run_name="__main__")
