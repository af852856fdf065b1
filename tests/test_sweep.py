"""Sweeps on the `ray` backend, 2 workers: on a local Ray of 2 CPUs that the module starts once and each run joins,
and one run that starts Ray itself (and stops it)."""

import json
import subprocess
import time

import pytest
from kvcompress.evals.backends import Backend
from kvcompress.evals.cells import cell_keys
from kvcompress.evals.config import ReportConfig
from kvcompress.evals.records import RecordStore
from kvcompress.evals.run import run_report

ray = pytest.importorskip("ray", reason="the ray backend needs ray (pip install -e '.[test]')")

# one pytest-xdist worker runs every test that starts Ray, one after another: none runs beside another Ray
pytestmark = pytest.mark.xdist_group("ray")
RAY = Backend("ray", workers=2)
# random weights: recall and fidelity cells are recorded as skipped at once; latency cells time a real decode
TINY = dict(
    model="random:tiny",
    strategies=["full", "int8", "window:window=32"],
    tasks=["passkey"],
    lengths=[64, 96],
    depths=2,
    seeds=1,
    decode_steps=4,
)


def _records(folder):
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()][1:]


def _ray_processes() -> list[str]:
    return subprocess.run(
        ["pgrep", "-f", "ray/core/src/ray/(raylet|gcs)"], capture_output=True, text=True
    ).stdout.split()


def _wait_until(done, seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while not done() and time.time() < deadline:  # Ray's processes and actor names go a moment after a kill returns
        time.sleep(0.5)
    return done()


@pytest.fixture
def own_ray():
    """A run that starts Ray itself: none runs before it, and the run stops it, leaving no Ray process behind."""
    assert not ray.is_initialized() and not _ray_processes(), "a Ray cluster was running before the test"
    yield
    assert not ray.is_initialized()
    assert _wait_until(lambda: not _ray_processes()), "the test left Ray processes behind"


@pytest.fixture(scope="module")
def cluster():
    """One local Ray of 2 CPUs for the module's other runs (started once: a Ray start and stop per run would cost more
    than the runs), stopped at the module's end with nothing of it left behind. The tests that start their own Ray
    come before the first that takes this fixture."""
    assert not ray.is_initialized() and not _ray_processes(), "a Ray cluster was running before the tests"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    assert _wait_until(lambda: not _ray_processes()), "the module left Ray processes behind"


@pytest.fixture
def joined(cluster):
    """A run that joins the running Ray: it leaves that Ray running, and kills every worker it started."""
    yield
    assert ray.is_initialized(), "a run stopped a Ray it did not start"
    assert _wait_until(lambda: not ray.util.list_named_actors()), "the run left its workers alive"


def _appends(monkeypatch) -> list[dict]:
    appended = []
    original = RecordStore.append
    monkeypatch.setattr(RecordStore, "append", lambda self, r: (appended.append(r), original(self, r)))
    return appended


# first, before the module's cluster starts: a run that starts Ray itself (and stops it, failing)
def test_a_model_that_does_not_load_on_a_worker_is_one_clear_error(tmp_path, own_ray):
    config = ReportConfig(**{**TINY, "model": "random:no-such-arch"})
    with pytest.raises(
        ValueError,
        match=r"Ray worker worker-\d could not start \(model 'random:no-such-arch'\): "
        r"ValueError: .*no-such-arch",
    ):
        run_report(config, tmp_path, backend=RAY)
    assert not (tmp_path / "records.jsonl").exists()


def test_bad_backend_settings_name_the_flag():
    with pytest.raises(ValueError, match="backend must be one of local, ray, got 'slurm'"):
        Backend("slurm")
    with pytest.raises(ValueError, match="--workers and --gpus-per-worker need --backend ray"):
        Backend("local", workers=2)
    with pytest.raises(ValueError, match="workers must be a positive number"):
        Backend("ray", workers=0)


@pytest.mark.slow
def test_ray_runs_the_same_cells_with_the_same_recall_outcomes_as_local(tmp_path, joined):
    config = ReportConfig(
        strategies=["full", "window:window=64"],
        tasks=["passkey"],
        lengths=[160],
        depths=2,
        seeds=1,
        max_new_tokens=12,  # the default model's passkey answers take 10 tokens
        decode_steps=4,
        fidelity_windows=2,
        fidelity_prefill=64,
        fidelity_steps=8,
        compute_dtype="float32",
        latency_rounds=1,  # latency is not what is compared: one round of each cell
        kv_budget=None,  # nor capacity: no capacity cells
    )
    run_report(config, tmp_path / "local")
    run_report(config, tmp_path / "ray", backend=RAY)
    local, on_ray = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert (
        sorted(r["id"] for r in local) == sorted(r["id"] for r in on_ray) == sorted(c["id"] for c in cell_keys(config))
    )
    outcome = {r["id"]: (r["outcome"], r.get("correct"), r.get("output")) for r in local if r["kind"] == "recall"}
    assert outcome == {
        r["id"]: (r["outcome"], r.get("correct"), r.get("output")) for r in on_ray if r["kind"] == "recall"
    }
    assert {r["worker"] for r in on_ray} == {"worker-0", "worker-1"}  # both workers ran cells
    assert any(r["correct"] for r in on_ray if r["kind"] == "recall")  # the outcomes compared are not all misses
    meta = json.loads((tmp_path / "ray" / "records.jsonl").read_text().splitlines()[0])
    assert meta["backend"] == {"name": "ray", "workers": 2, "cpus_per_worker": 1, "retries": 2}
    assert meta["device"].endswith("(1 threads)")  # a worker's device, computing on the one CPU it was given


# latency cells of one length run as one unit on one worker: killing it when its first one comes back leaves the
# others in flight (each times 64 decode steps)
KILLED = ReportConfig(
    **{
        **TINY,
        "decode_steps": 64,
        "strategies": ["full", "int8", "fp8", "int4", "window:window=32", "window:window=48"],
    }
)


def _kill_on_first_latency(monkeypatch) -> list[str]:
    original, killed = RecordStore.append, []

    def kill(self, record):
        original(self, record)
        if record["kind"] == "latency" and not killed:
            killed.append(record["worker"])
            name = next(n for n in ray.util.list_named_actors() if n.endswith(f"-{record['worker']}"))
            ray.kill(ray.get_actor(name))

    monkeypatch.setattr(RecordStore, "append", kill)
    return killed


def test_a_killed_worker_loses_no_cell(tmp_path, monkeypatch, joined):
    config, killed = KILLED, _kill_on_first_latency(monkeypatch)
    run_report(config, tmp_path, backend=RAY)
    records = _records(tmp_path)
    assert sorted(r["id"] for r in records) == sorted(c["id"] for c in cell_keys(config))  # each cell once, none lost
    assert all(r["outcome"] in ("ok", "skipped") for r in records)
    retried = [r for r in records if r.get("attempt") == 2]
    assert retried and all(r["kind"] == "latency" and r["worker"] not in killed for r in retried)


def test_cells_past_their_retries_are_recorded_as_errors_and_rerun_on_resume(tmp_path, monkeypatch, joined):
    killed = _kill_on_first_latency(monkeypatch)
    path = run_report(KILLED, tmp_path, backend=Backend("ray", workers=2, retries=0))
    errors = [r for r in _records(tmp_path) if r["outcome"] == "error"]
    assert errors and all(r["worker"] == killed[0] and "died 1 times" in r["error"] for r in errors)
    assert "cells lost with their worker (--resume reruns them)" in path.read_text()

    monkeypatch.undo()
    appended = _appends(monkeypatch)
    path = run_report(None, tmp_path, resume=True)  # which cells a resume runs is the records', on any backend
    assert sorted(r["id"] for r in appended) == sorted(r["id"] for r in errors)  # only the lost cells ran again
    assert "cells lost" not in path.read_text()


def test_an_interrupted_sweep_resumes_only_the_missing_cells_and_a_widened_grid_only_the_new(
    tmp_path, monkeypatch, joined
):
    config = ReportConfig(**TINY)
    original, written = RecordStore.append, []

    def stop_after_five(self, record):
        original(self, record)
        written.append(record)
        if len(written) == 5:
            raise KeyboardInterrupt  # Ctrl-C in the driver

    monkeypatch.setattr(RecordStore, "append", stop_after_five)
    with pytest.raises(KeyboardInterrupt):
        run_report(config, tmp_path, backend=RAY)
    assert len(_records(tmp_path)) == 5
    assert _wait_until(lambda: not ray.util.list_named_actors())  # the interrupted run killed its workers

    monkeypatch.setattr(RecordStore, "append", original)
    appended = _appends(monkeypatch)
    run_report(None, tmp_path, resume=True, backend=RAY)
    everything = {c["id"] for c in cell_keys(config)}
    assert len(appended) == len(everything) - 5 and {r["id"] for r in _records(tmp_path)} == everything

    wider = ReportConfig(**{**TINY, "strategies": [*TINY["strategies"], "fp8"], "lengths": [64, 96, 128]})
    appended.clear()
    run_report(wider, tmp_path, resume=True)  # widened on the local backend: the cells to run are the records'
    new = {c["id"] for c in cell_keys(wider)} - everything
    assert {r["id"] for r in appended} == new and len(appended) == len(new)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["strategy"] for r in summary["rows"]] == wider.strategies and summary["meta"]["config"]["lengths"] == [
        64,
        96,
        128,
    ]


def test_the_sweep_command_runs_a_file_on_ray_and_resumes_a_widened_grid(tmp_path, capsys, joined):
    from kvcompress.cli import main

    sweep = tmp_path / "sweep.yaml"
    report = "report: {tasks: [passkey], lengths: [64], depths: 1, seeds: 1, decode_steps: 4}\n"
    sweep.write_text(f"models: [random:tiny]\nstrategies: [window]\ngrid: {{window.window: [32]}}\n{report}")
    out = tmp_path / "out"
    main(["sweep", str(sweep), "--backend", "ray", "--workers", "2", "--out", str(out)])
    first = _records(out)
    assert {r["strategy"] for r in first} == {"full", "window:window=32"} and {r["worker"] for r in first} <= {
        "worker-0",
        "worker-1",
    }
    assert "wrote" in capsys.readouterr().out
    sweep.write_text(f"models: [random:tiny]\nstrategies: [window]\ngrid: {{window.window: [32, 48]}}\n{report}")
    main(["sweep", str(sweep), "--out", str(out), "--resume"])  # widened, finished on the local backend
    added = _records(out)[len(first) :]
    assert added and {r["strategy"] for r in added} == {"window:window=48"} and all("worker" not in r for r in added)
