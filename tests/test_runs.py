"""What a newcomer meets on the command line: the main job writes a fresh run folder every time, resumes the newest
unfinished one, starts over a run that finished nothing, and bad input ends in one line naming the parameter."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from kvcompress.evals import harness as harness_module
from kvcompress.evals.config import ReportConfig
from kvcompress.evals.sweep import load_sweep

from kvcompress.cli import main

REPO = Path(__file__).resolve().parent.parent
# the smoke grid narrowed to one strategy and one depth: every stage of the main job, in seconds
TINY = ["report", "--smoke", "--strategies", "full", "--depths", "1", "--lengths", "160"]


def _meta(folder: Path) -> dict:
    return json.loads((folder / "records.jsonl").read_text().splitlines()[0])


def test_main_job_writes_a_fresh_folder_each_time(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(TINY)
    main(TINY)
    runs = sorted((tmp_path / "results" / "runs").iterdir())
    assert len(runs) == 2 and all((run / "pressure_transfer.md").is_file() for run in runs)
    out = capsys.readouterr().out
    assert out.count("wrote results/runs/report-") == 2 and "verdict" in out
    meta = _meta(runs[0])
    assert meta["command"] == "kvcompress " + " ".join(TINY)  # its own arguments, not pytest's sys.argv
    assert meta["kv_dtype"] == "bfloat16" and meta["compute_dtype"] in ("float32", "bfloat16") and meta["dtype_reason"]
    text = (runs[0] / "pressure_transfer.md").read_text()
    assert (
        "\n\n| strategy |" in text
    )  # a blank line, so CommonMark renders the table instead of folding it into the list


def test_resume_alone_finishes_the_newest_unfinished_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = harness_module.Harness.fidelity

    def interrupted(self, **cell):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness_module.Harness, "fidelity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(TINY)
    monkeypatch.setattr(harness_module.Harness, "fidelity", original)
    (run,) = (tmp_path / "results" / "runs").iterdir()
    kept = (run / "records.jsonl").read_text()
    main(["report", "--resume"])
    assert (run / "records.jsonl").read_text().startswith(kept) and (run / "pressure_transfer.md").is_file()
    with pytest.raises(SystemExit, match="--resume: no unfinished run under results/runs/"):
        main(["report", "--resume"])


def test_a_run_that_finished_nothing_starts_over(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="model '/no/such/model': no such directory"):
        main([*TINY, "--model", "/no/such/model", "--out", str(out)])
    assert not (out / "records.jsonl").exists()  # the model fails before a records file is made
    out.mkdir(exist_ok=True)
    (out / "records.jsonl").write_text(json.dumps({"kind": "meta", "format": "kvcompress-records/1"}) + "\n")
    main([*TINY, "--out", str(out)])  # only a meta line: nothing finished, so the run simply starts over
    assert len((out / "records.jsonl").read_text().splitlines()) == 1 + 5  # recall, 2 latency, capacity, fidelity
    with pytest.raises(SystemExit, match="already holds records: resume it"):
        main([*TINY, "--out", str(out)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "/proc/kvcompress-run"], "--out '/proc/kvcompress-run': cannot create the folder"),
        (["--model", "no-such-org/no-such-model"], "model 'no-such-org/no-such-model': could not load its config"),
        (["--model", "/path/that/does/not/exist"], "model '/path/that/does/not/exist': no such directory"),
        (["--strategies", "full,sinc"], "unknown strategy part 'sinc'.*Did you mean 'sink'"),
        (["--lengths", "4q"], None),  # argparse: names --lengths and exits 2
        (["--workers", "2"], "--address, --workers and --gpus-per-worker need --backend ray"),
        (["--backend", "ray", "--device", "cuda:1"], "device 'cuda:1': on --backend ray give --device cuda"),
    ],
)
def test_bad_report_input_is_one_line(argv, message, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--smoke", *argv])
    if message is None:
        assert (
            exit_info.value.code == 2
            and "argument --lengths: token count must be an integer or NNk" in capsys.readouterr().err
        )
    else:
        assert exit_info.match(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(SystemExit, match="device 'cuda' is not available: this torch build has no CUDA support"):
        main(["report", "--smoke", "--device", "cuda"])


def test_token_counts_parse_the_same_everywhere(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "sweep:\n  - template: 'window:window={w}'\n    grid: {w: [64]}\nreport: {lengths: [512, 4k], context: 32k}\n"
    )
    (config,), _ = load_sweep(sweep)
    assert config.lengths == [512, 4096] and config.context == 32768
    assert ReportConfig(lengths="1k,1.5k").lengths == [1024, 1536]
    with pytest.raises(ValueError, match="lengths must be an integer or NNk"):
        ReportConfig(lengths=["4q"])


def test_simulate_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [
        "simulate",
        "--routes",
        str(REPO / "experiments/routes/support_fleet.yaml"),
        "--minutes",
        "2",
        "--strategies",
        "full,full+host",
    ]
    main(args)
    (run,) = (tmp_path / "results" / "runs").iterdir()
    assert "off the GPU: peak host" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already holds simulate.json"):
        main([*args, "--out", str(run)])


@pytest.mark.parametrize("name", ["kernels", "evals"])
def test_repo_folders_do_not_shadow_pypi_packages(name):
    """bitsandbytes does `from kernels import ...`: under pytest the repo's kernels/ and evals/ must not be importable
    as top-level modules (they ship as kvcompress.kernels and kvcompress.evals). Started with the repo root on
    sys.path (`python -m pytest`), the folders are found and load the installed package instead: test_layout."""
    if any(Path(p or ".").resolve() == REPO for p in sys.path):
        pytest.skip("the repo root is on sys.path (python -m pytest): test_layout checks what those imports load")
    spec = importlib.util.find_spec(name)
    assert spec is None or not any(
        REPO in Path(p).parents or Path(p) == REPO / name
        for p in [spec.origin or "", *(spec.submodule_search_locations or [])]
    )
