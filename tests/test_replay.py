"""The measured trace replay on the tiny model: the budget holds at every step, released and expired sessions give
their bytes back, a seed's replay is the same run after run, the simulator predicts the same trace, bad input is
refused before any work, and an interrupted replay keeps what it finished."""

import json

import pytest
import torch
from kvcompress.evals.replay import RECORD_FILE, Replay, compress_time, relative_errors, replay

from kvcompress.cli import main
from kvcompress.simulator import Route, SimConfig, plan_sessions

from .conftest import tiny_model

MIB = 2**20
ROUTES = [
    Route("chat", 6.0, (8, 20), (3, 8), (1, 3), (1.0, 4.0), 0.0),
    Route("long", 2.0, (40, 80), (4, 10), (2, 3), (2.0, 6.0), 0.0),
    Route("gone", 3.0, (20, 40), (6, 12), (1, 1), (1.0, 1.0), 1.0),  # every client leaves mid-answer
]
ROUTE_FILE = (
    "routes:\n  - {{name: a, rate_per_min: 1, prompt_tokens: 8, output_tokens: 2, turns: 1, think_s: 1, "
    "disconnect_p: {disconnect}}}\n"
)
FIXED = {"prefill": 0.05, "decode": 0.02}  # seconds a step moves the clock: the schedule is the same every run


def fixed_clock(kind: str, measured: float) -> float:
    return FIXED[kind]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _text(model):
    return torch.randint(0, model.config.vocab_size, (2048,), generator=torch.Generator().manual_seed(0))


def _run(model, strategy="full", budget=0.5 * MIB, clock=fixed_clock, **settings):
    settings = {"minutes": 2.0, "seed": 0, **settings}
    config = SimConfig(gpu_bytes=budget, **settings)
    sessions = plan_sessions(ROUTES, config.minutes, config.seed)
    return Replay(model, strategy, sessions, config, _text(model), clock)


@pytest.mark.parametrize("strategy", ["full", "int8", "window:window=16", "tova:budget=20,sinks=2,window=4"])
def test_measured_kv_never_exceeds_the_budget(model, strategy):
    unconstrained = _run(model, strategy, budget=64 * MIB).run()
    replayer = _run(model, strategy, budget=0.4 * unconstrained["peak_kv_bytes"])
    record = replayer.run()
    assert max(step["batch"] for step in unconstrained["steps"]) > 1  # sessions decode together where they fit
    assert all(step["kv_bytes"] <= replayer.config.gpu_bytes for step in record["steps"])
    assert record["peak_kv_bytes"] <= replayer.config.gpu_bytes
    assert record["peak_reserved_bytes"] <= replayer.config.gpu_bytes
    # the budget binds: sessions were turned away or idle ones evicted to make room
    assert record["allocation_failures"] + record["evictions"] > 0
    assert not any(reason.startswith("over budget") for reason in record["failures"])
    assert sum(record["failures"].values()) == record["allocation_failures"]
    assert record["final_kv_bytes"] == 0


def test_an_undercounting_reservation_is_caught_by_the_measured_check(model):
    replayer = _run(model, budget=0.1 * MIB)
    replayer.sizing.allocation = lambda session, tokens: 0  # the allocator believes every turn is free
    record = replayer.run()
    over = {reason: n for reason, n in record["failures"].items() if "budget" in reason}
    assert over, record["failures"]
    assert record["final_kv_bytes"] == 0


def test_disconnected_sessions_give_their_bytes_back_at_their_ttl(model):
    record = _run(model, budget=64 * MIB, ttl_s=3.0).run()
    expired = [r for r in record["released"] if r["why"] == "ttl"]
    gone = sum(1 for s in plan_sessions(ROUTES, 2.0, 0) if s.route.name == "gone")
    assert gone and len(expired) >= gone  # every session ends up expiring (nothing evicts at this budget)
    assert all(r["bytes"] > 0 and r["idle_s"] == pytest.approx(3.0) for r in expired)  # held exactly its TTL
    assert record["routes"]["gone"]["outcome"].startswith("leaked state")  # held for clients that left
    released = _run(model, budget=64 * MIB, idle_policy="release").run()
    assert {r["why"] for r in released["released"]} == {"released"}
    assert released["routes"]["gone"]["outcome"] == "healthy"
    assert record["final_kv_bytes"] == released["final_kv_bytes"] == 0


def test_a_seed_replays_the_same(model):
    first, second = _run(model).run(), _run(model).run()
    for record in (first, second):
        record.pop("wall_s")
    assert first == second
    other = _run(model, seed=1).run()
    assert other["steps"] != first["steps"]  # another seed, another trace


def test_the_simulator_predicts_the_same_trace(model, tmp_path):
    config = SimConfig(gpu_bytes=64 * MIB, minutes=2.0, seed=0, step_costs=None)
    record = replay(model, None, ["full"], ROUTES, config, tmp_path, {"model": "tiny", "settings": {}}, fixed_clock)
    result = record["results"][0]
    planned = plan_sessions(ROUTES, 2.0, 0)
    assert result["answers"] == sum(len(s.turns) for s in planned)  # every turn answered at a budget that holds all
    assert result["predicted"]["allocation_failures"] == result["allocation_failures"] == 0
    assert {name for name in result["predicted"]["routes"]} == {r.name for r in ROUTES}
    assert result["relative_error"]["allocation_failures"] == 0.0
    assert json.loads((tmp_path / RECORD_FILE).read_text()) == record


def test_relative_errors():
    errors = relative_errors(
        {"peak_kv_bytes": 100, "allocation_failures": 0, "ttft_p95_s": 2.0},
        {"peak_kv_bytes": 110, "allocation_failures": 3, "ttft_p95_s": 1.5},
    )
    assert errors["peak_kv_bytes"] == pytest.approx(0.10)
    assert errors["ttft_p95_s"] == pytest.approx(-0.25)
    assert errors["allocation_failures"] is None  # none measured, some predicted: no ratio
    assert errors["evictions"] == 0.0  # none either way


def test_time_compressed_routes_draw_the_same_sessions():
    fast = plan_sessions(compress_time(ROUTES, 4.0), 2.0 / 4, 0)
    slow = plan_sessions(ROUTES, 2.0, 0)
    assert [(s.route.name, s.turns[0].prompt) for s in fast] == [(s.route.name, s.turns[0].prompt) for s in slow]
    assert [s.arrival_s for s in fast] == pytest.approx([s.arrival_s / 4 for s in slow])
    with pytest.raises(ValueError, match="speedup"):
        compress_time(ROUTES, 0)


def test_bad_input_is_refused_before_work(model, tmp_path):
    config = SimConfig(gpu_bytes=1000, minutes=2.0, seed=0)
    with pytest.raises(ValueError, match="kv_budget .* holds no session"):
        replay(model, None, ["full"], ROUTES, config, tmp_path, {"model": "tiny", "settings": {}})
    assert not (tmp_path / RECORD_FILE).exists()
    parks = SimConfig(gpu_bytes=MIB)
    parks.idle_policy = "park"  # past SimConfig's own check, which asks for park costs the replay never reads
    with pytest.raises(ValueError, match="idle_policy must be one of ttl, release for a replay, got 'park'"):
        Replay(model, "full", [], parks, _text(model))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv-budget", "lots"], "--kv-budget must look like"),
        (["--kv-budget", "0MiB"], "--kv-budget must be a positive size"),
        (["--kv-budget", "1MiB", "--strategies", "nosuch"], "nosuch"),
        (["--kv-budget", "1MiB", "--speedup", "0"], "speedup must be a positive number"),
        (["--kv-budget", "1MiB", "--admission", "maybe"], "admission must be one of reject, queue"),
        (["--kv-budget", "1MiB", "--idle-policy", "park"], "--idle-policy must be one of ttl, release"),
    ],
)
def test_cli_refuses_bad_values_naming_them(tmp_path, flags, message, capsys):
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTE_FILE.format(disconnect=0))
    with pytest.raises(SystemExit, match=message):
        main(["replay", "--routes", str(routes), "--out", str(tmp_path / "out"), *flags])


def test_cli_names_a_bad_route_field(tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTE_FILE.format(disconnect=2))
    with pytest.raises(SystemExit, match="line 2: disconnect_p must be within"):
        main(["replay", "--routes", str(routes), "--kv-budget", "1MiB", "--out", str(tmp_path / "out")])


def test_an_interrupted_replay_keeps_what_it_finished(model, tmp_path, monkeypatch):
    config = SimConfig(gpu_bytes=MIB, minutes=1.0, seed=0)
    meta = {"model": "tiny", "settings": {"kv_budget": MIB}}
    ran = []
    real_run = Replay.run

    def counted(self):
        ran.append(self.strategy)
        if self.strategy == "int8" and len(ran) == 2:
            raise KeyboardInterrupt  # the run stops during its second strategy
        return real_run(self)

    monkeypatch.setattr(Replay, "run", counted)
    with pytest.raises(KeyboardInterrupt):
        replay(model, None, ["full", "int8"], ROUTES, config, tmp_path, meta, fixed_clock)
    kept = json.loads((tmp_path / RECORD_FILE).read_text())
    assert [r["strategy"] for r in kept["results"]] == ["full"]
    record = replay(model, None, ["full", "int8"], ROUTES, config, tmp_path, meta, fixed_clock)
    assert ran == ["full", "int8", "int8"]  # full was not replayed again
    assert [r["strategy"] for r in record["results"]] == ["full", "int8"]
    assert record["results"][0] == kept["results"][0]
    with pytest.raises(ValueError, match="other settings"):
        replay(model, None, ["full"], ROUTES, config, tmp_path, {"model": "tiny", "settings": {"kv_budget": 1}})
