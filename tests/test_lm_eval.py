"""lm-evaluation-harness integration: model plugin, cache-routed log-likelihoods, recall tasks, the CLI."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval integration needs the eval extra")

from kvcompress.evals import harness as harness_module  # noqa: E402
from kvcompress.evals.lm_eval_model import KVCompressLM  # noqa: E402
from kvcompress.evals.lm_eval_recall import recall_docs, task_manager  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from kvcompress.cli import main  # noqa: E402

from .conftest import head_commit  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_lm():
    # float32: the 1e-4 agreement with lm-eval's one-forward scoring holds in float32 (bfloat16 steps drift ~0.5 nats)
    return KVCompressLM(pretrained="default", strategy="full", device="cpu", dtype="float32")


def _chat(lm, text: str) -> str:
    return lm.apply_chat_template([{"role": "user", "content": text}])


def _loglikelihood_requests():
    pairs = [
        ("The capital of France is", " Paris"),
        ("1, 2, 3, 4,", " 5, 6"),
        ("We hold these truths", " to be"),
        ("Question: what colour is grass? Answer:", " green"),
        ("", "Hello world"),
        ("The sky is", " blue."),
        ("def add(a, b):\n    return", " a + b"),
        ("Once upon a", " time there was"),
        ("The quick brown fox", " jumps over the lazy dog"),
        ("Water boils at 100 degrees", " Celsius"),
    ]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def test_full_matches_lm_evals_hf_model(full_lm):
    reference = HFLM(pretrained=full_lm.model, tokenizer=full_lm.tokenizer, batch_size=1)
    requests = _loglikelihood_requests()
    ours, theirs = full_lm.loglikelihood(requests), reference.loglikelihood(requests)
    assert max(abs(a[0] - b[0]) for a, b in zip(ours, theirs)) <= 1e-4
    assert [a[1] for a in ours] == [b[1] for b in theirs]
    assert sum(r["kind"] == "loglikelihood" for r in full_lm.requests) == len(requests)  # each through a cache

    gen = [
        Instance("generate_until", {}, (_chat(full_lm, doc["input"]), {"until": ["\n"], "max_gen_toks": 12}), i)
        for i, doc in enumerate(recall_docs("passkey", full_lm.tokenizer, [200], 2, 1))
    ]
    gen.append(
        Instance("generate_until", {}, ("The three primary colours are", {"until": ["."], "max_gen_toks": 12}), 2)
    )
    outputs = full_lm.generate_until(gen)
    assert outputs == reference.generate_until(gen) and all(outputs)
    record = full_lm.requests[-1]
    assert record["kind"] == "generate_until" and record["kv_bytes"]["device"] > 0 and record["ttft_s"] > 0


def test_window_loses_a_needle_outside_it(full_lm):
    docs = recall_docs("passkey", full_lm.tokenizer, [300], 2, 1)  # depth 0: the needle opens the context
    request = [
        Instance(
            "generate_until", docs[0], (_chat(full_lm, docs[0]["input"]), {"until": ["\n"], "max_gen_toks": 12}), 0
        )
    ]
    window = KVCompressLM(pretrained="default", strategy="window:window=64", device="cpu")
    assert docs[0]["answer"] in full_lm.generate_until(request)[0]
    assert docs[0]["answer"] not in window.generate_until(request)[0]


def test_recall_tasks_are_deterministic_for_a_seed(full_lm):
    first = recall_docs("multikey", full_lm.tokenizer, [200, 300], 2, 2)
    assert first == recall_docs("multikey", full_lm.tokenizer, [200, 300], 2, 2)
    assert len(first) == 2 * 2 * 2 and len({d["answer"] for d in first}) > 1
    assert all(d["prompt_tokens"] <= d["length"] for d in first)


def test_bad_model_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="unknown retention|unknown strategy part 'sinc'"):
        KVCompressLM(pretrained="default", strategy="sinc")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        KVCompressLM(pretrained="default", batch_size="auto")
    with pytest.raises(ValueError, match="has no tokenizer"):
        KVCompressLM(pretrained="random:tiny")


def _offline(monkeypatch):
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(offline, "1")  # the tasks are generated here: nothing is downloaded


def test_cli_runs_lm_eval_end_to_end_with_per_cell_metrics(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    out = tmp_path / "run"
    main(
        [
            "lm-eval",
            "run",
            "--model",
            "kvcompress",
            "--model_args",
            "pretrained=default,strategy=sink:sinks=4,window=128+int8,dtype=float32",
            "--tasks",
            "kvc_passkey,kvc_vartrack",
            "--metadata",
            json.dumps({"lengths": [200], "depths": 2}),
            "--apply_chat_template",
            "--device",
            "cpu",
            "--output_path",
            str(out),
        ]
    )
    written = json.loads(next(out.glob("**/results_*.json")).read_text())
    assert written["kvcompress"]["command"].startswith("kvcompress lm-eval run --model kvcompress")
    # lm-eval splits --model_args at commas: its results config and printout still show the strategy whole
    assert written["config"]["model_args"]["strategy"] == "sink:sinks=4,window=128+int8"
    assert "'strategy': 'sink:sinks=4,window=128+int8'" in capsys.readouterr().out
    results = written["results"]
    assert set(results) == {"kvc_passkey", "kvc_vartrack"}
    assert {"acc,none", "acc_L200_D0,none", "acc_L200_D100,none"} <= set(results["kvc_passkey"])
    meta, *records = [json.loads(line) for line in (out / "kvcompress_requests.jsonl").read_text().splitlines()]
    assert meta["kind"] == "meta" and meta["git_commit"] == head_commit() and "versions" in meta
    assert len(records) == 4 and {r["strategy"] for r in records} == {"sink:window=128+int8"}
    assert all(r["kv_bytes"]["device"] > 0 and r["decode_ms_per_token"] > 0 for r in records)


def test_lm_evals_own_ruler_task_runs_offline_with_the_default_model(tmp_path, monkeypatch):
    """lm-eval's RULER loads a tokenizer by the name in the model args: `pretrained=default` alone must do, offline."""
    _offline(monkeypatch)
    out = tmp_path / "ruler"
    main(
        [
            "lm-eval",
            "run",
            "--model",
            "kvcompress",
            "--model_args",
            "pretrained=default,dtype=float32",
            "--tasks",
            "niah_single_1",
            "--metadata",
            json.dumps({"max_seq_lengths": [512]}),
            "--limit",
            "1",
            "--device",
            "cpu",
            "--output_path",
            str(out),
        ]
    )
    written = json.loads(next(out.glob("**/results_*.json")).read_text())
    assert "512,none" in written["results"]["niah_single_1"]
    assert written["config"]["model_args"]["tokenizer"].endswith("smollm2-135m-instruct")


def test_our_tasks_come_through_lm_evals_include_path(tmp_path):
    tasks = task_manager().all_tasks
    assert "kvc_passkey" in tasks and "niah_single_1" in tasks
    with pytest.raises(ValueError, match="lm-eval's CLI takes one task directory"):
        main(["lm-eval", "run", "--model", "kvcompress", "--tasks", "kvc_passkey", "--include_path", str(tmp_path)])


def test_task_files_are_parsed_once_per_process_until_one_changes(tmp_path, monkeypatch):
    """lm-eval's task index is built once for the same task files (every run's TaskManager would parse all of lm-eval's
    YAML files again); a task file added or edited under a root is parsed anew, and is what the next manager loads."""
    from lm_eval.tasks import _index

    task_manager(include_path=tmp_path)  # indexed once, whatever ran before
    parsed = []
    original = _index.load_yaml
    monkeypatch.setattr(_index, "load_yaml", lambda path, **kw: (parsed.append(path), original(path, **kw))[1])
    assert "kvc_passkey" in task_manager(include_path=tmp_path).all_tasks and parsed == []

    task = "task: {name}\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: x\ndoc_to_target: y\n"
    (tmp_path / "mine.yaml").write_text(task.format(name="my_task"))
    assert "my_task" in task_manager(include_path=tmp_path).all_tasks and tmp_path / "mine.yaml" in parsed
    parsed.clear()
    (tmp_path / "mine.yaml").write_text(task.format(name="my_renamed_task"))
    tasks = task_manager(include_path=tmp_path).all_tasks
    assert "my_renamed_task" in tasks and "my_task" not in tasks and "kvc_passkey" in tasks


def test_left_padded_batches_match_batch_one(full_lm):
    docs = recall_docs("passkey", full_lm.tokenizer, [120, 200], 1, 1)
    requests = [
        Instance("generate_until", d, (_chat(full_lm, d["input"]), {"until": ["\n"], "max_gen_toks": 10}), i)
        for i, d in enumerate(docs)
    ]
    batched = KVCompressLM(pretrained="default", strategy="sink:sinks=4,window=64", device="cpu", batch_size=2)
    single = KVCompressLM(pretrained="default", strategy="sink:sinks=4,window=64", device="cpu", batch_size=1)
    assert batched.generate_until(requests) == single.generate_until(requests)


def test_metadata_lengths_accept_k_counts():
    task = task_manager(metadata={"lengths": ["1k"], "depths": 1}).load(["kvc_passkey"])["tasks"]["kvc_passkey"]
    assert [(d["length"], d["depth"]) for d in task.test_docs()] == [(1024, 0.5)]
    assert "acc_L1024_D50" in task.aggregation()


def _fake_fidelity(monkeypatch) -> list:
    """Harness.fidelity without its 16 x 64 teacher-forced steps: the calls, and figures a row can be judged on."""
    computed = []

    def fidelity(self, strategy):
        computed.append((strategy, self.config.compute_dtype))
        return {
            "top1": 1.0 if strategy == "full" else 0.9,
            "kl": 0.0 if strategy == "full" else 0.1,
            "steps": 1024,
            "ppl_change_pct": 0.0 if strategy == "full" else 5.0,
        }

    monkeypatch.setattr(harness_module.Harness, "fidelity", fidelity)
    return computed


def test_strategies_give_the_reports_records_and_table(tmp_path, monkeypatch):
    _offline(monkeypatch)
    computed = _fake_fidelity(monkeypatch)
    out = tmp_path / "strategies"

    def run(model_args: str) -> list[dict]:
        main(
            [
                "lm-eval",
                "--strategies",
                "full,window:window=64",
                "--model_args",
                model_args,
                "--tasks",
                "kvc_passkey",
                "--metadata",
                json.dumps({"lengths": [120], "depths": 2}),
                "--apply_chat_template",
                "--device",
                "cpu",
                "--output_path",
                str(out),
            ]
        )
        return json.loads((out / "summary.json").read_text())["rows"]

    first = run("pretrained=default,dtype=float32")
    assert computed == [("full", "float32"), ("window:window=64", "float32")]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    meta, records = records[0], records[1:]
    assert meta["kind"] == "meta" and meta["lm_eval"]["tasks"] == ["kvc_passkey"] and meta["compute_dtype"] == "float32"
    recall = [r for r in records if r["kind"] == "recall"]
    assert sorted((r["strategy"], r["doc_id"]) for r in recall) == [
        (s, d) for s in ("full", "window:window=64") for d in (0, 1)
    ]
    latency = {r["strategy"]: r for r in records if r["kind"] == "latency"}
    assert all(len(r["decode_ms"]) == 2 and r["kv_bytes_final"]["device"] > 0 for r in latency.values())
    full, window = first  # the report's own rows, paired by document, bytes from the requests
    assert full["recall_n"] == window["recall_n"] == 2 and full["verdict"] == "baseline"
    assert 0 < window["hbm_saved_pct"] < 100 and window["top1"] == 0.9
    for samples in (out / "full").glob("**/samples_*.jsonl"):  # lm-eval's per-document file says what made it
        opening = json.loads(samples.read_text().splitlines()[0])
        assert opening["kind"] == "meta" and "strategy=full" in opening["command"]
        assert opening["git_commit"] == head_commit()
    text = (out / "pressure_transfer.md").read_text()
    assert "lm-eval's score of each document" in text and "## Recall by task" in text and "| `full` | " in text

    computed.clear()
    again = run("pretrained=default,dtype=float32")  # fidelity records kept by their ids
    assert computed == [] and [(r["top1"], r["kl"]) for r in again] == [(r["top1"], r["kl"]) for r in first]
    run("pretrained=default,dtype=bfloat16")  # another setting: other ids, measured again
    assert computed == [("full", "bfloat16"), ("window:window=64", "bfloat16")]


@pytest.mark.xdist_group("ray")  # with the sweep tests: one Ray at a time
def test_strategies_run_as_ray_tasks(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray backend needs ray")
    _offline(monkeypatch)
    _fake_fidelity(monkeypatch)  # the driver's part; the lm-eval runs are Ray's
    out = tmp_path / "strategies"
    main(
        [
            "lm-eval",
            "--strategies",
            "full,window:window=64",
            "--model_args",
            "pretrained=default,dtype=float32",
            "--tasks",
            "kvc_passkey",
            "--metadata",
            json.dumps({"lengths": [120], "depths": 1}),
            "--device",
            "cpu",
            "--output_path",
            str(out),
            "--backend",
            "ray",
            "--cpus-per-worker",
            "1",
        ]
    )
    assert not ray.is_initialized()  # the run stopped the Ray it started
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["full", "window:window=64"]
    for folder, strategy in (("full", "full"), ("window_window_64", "window:window=64")):
        # each strategy's lm-eval run wrote its results and request records, made by that strategy
        (results,) = (out / folder).glob("**/results_*.json")
        assert json.loads(results.read_text())["config"]["model_args"]["strategy"] == strategy
        lines = (out / folder / "kvcompress_requests.jsonl").read_text().splitlines()
        meta, *requests = [json.loads(line) for line in lines]
        assert meta["kind"] == "meta" and {r["strategy"] for r in requests} == {strategy}


def test_a_run_without_per_document_samples_is_refused_by_name(tmp_path):
    from kvcompress.evals.lm_eval_model import REQUESTS_FILE
    from kvcompress.evals.lm_eval_records import run_records

    folder = tmp_path / "int8"
    (folder / "default").mkdir(parents=True)
    (folder / "default" / "results_2026-01-01.json").write_text("{}")
    (folder / REQUESTS_FILE).write_text("")
    with pytest.raises(
        ValueError, match="int8 holds lm-eval results without per-document samples .* remove the folder"
    ):
        run_records(folder, "int8", 512, [])
