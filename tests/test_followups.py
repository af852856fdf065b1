"""Follow-up questions (`--followups K`): every question of a case asks for another needle; `reuse` questions start
from the compressed context as stored, `chat` questions continue one conversation; cells tell questions apart."""

import pytest
import torch
from kvcompress.evals.cases import asked_in_place, next_turn, render
from kvcompress.evals.cells import cell_keys
from kvcompress.evals.config import ReportConfig
from kvcompress.evals.followups import first_questions, followup_section
from kvcompress.evals.harness import Harness
from kvcompress.evals.tasks import FOLLOWUP_TASKS, make_case

from kvcompress import make_cache


@pytest.mark.parametrize("task", FOLLOWUP_TASKS)
def test_every_question_asks_for_another_needle_planted_in_the_context(default_model, task):
    _, tokenizer = default_model
    for depth, seed in ((0.0, 0), (0.5, 1), (1.0, 2)):
        case = make_case(task, tokenizer, 768, depth, seed, turns=4)
        turns = [case.turn(i) for i in range(4)]
        context = case.messages[-1]["content"]
        assert len({t.question for t in turns}) == 4
        assert len({t.answer for t in turns}) == 4
        assert len({t.needle for t in turns}) == 4
        for i, t in enumerate(turns):
            assert t.needle in context
            answers = (t.answer,) if isinstance(t.answer, str) else t.answer
            assert all(a in context for a in answers)
            assert (t.question in context) == (i == 0)  # a later question is asked, never planted


def test_a_case_asked_once_is_the_case_without_followups(default_model):
    _, tokenizer = default_model
    one, four = make_case("multikey", tokenizer, 384, 0.25, 3), make_case("multikey", tokenizer, 384, 0.25, 3, 4)
    assert one.messages == four.messages and one.answer == four.answer and one.followups == ()


def test_followups_refuse_a_task_with_one_needle_naming_the_allowed_ones(default_model):
    _, tokenizer = default_model
    with pytest.raises(ValueError, match="follow-up questions need one of: multikey"):
        make_case("passkey", tokenizer, 384, 0.5, 0, turns=2)
    with pytest.raises(ValueError, match="followups needs tasks .*passkey cannot"):
        ReportConfig(tasks=["passkey", "multikey"], followups=2)
    with pytest.raises(ValueError, match="modes must list follow-up modes among reuse, chat"):
        ReportConfig(tasks=["multikey"], followups=2, modes=["replay"])
    with pytest.raises(ValueError, match="followups must be a number"):
        ReportConfig(tasks=["multikey"], followups=0)


def test_cells_carry_the_question_index_and_mode_and_one_question_cells_keep_their_ids():
    one = ReportConfig(tasks=["multikey"], lengths=[256], depths=1, seeds=1, strategies=["full"])
    assert all("turn" not in c for c in cell_keys(one))
    many = ReportConfig(tasks=["multikey"], lengths=[256], depths=1, seeds=1, strategies=["full"], followups=3)
    recall = [c for c in cell_keys(many) if c["kind"] == "recall"]
    assert sorted((c["mode"], c["turn"]) for c in recall) == [(m, t) for m in ("chat", "reuse") for t in range(3)]
    assert len({c["id"] for c in recall}) == 6
    assert not {c["id"] for c in recall} & {c["id"] for c in cell_keys(one)}
    both = ReportConfig(**{**vars(many), "questions": ["after", "inside"]})
    modes = {(c["question"], c["mode"]) for c in cell_keys(both) if c["kind"] == "recall"}
    assert modes == {("after", "chat"), ("after", "reuse"), ("inside", "chat")}  # reuse asks in the first's place
    with pytest.raises(ValueError, match="modes reuse asks follow-ups only with questions after"):
        ReportConfig(tasks=["multikey"], followups=2, questions=["inside"], modes=["reuse"])


@pytest.fixture(scope="module")
def followup_run():
    config = ReportConfig(
        strategies=["full"],
        tasks=["multikey"],
        lengths=[256],
        depths=1,
        seeds=2,
        followups=3,
        recall_batch=2,
    )
    harness = Harness(config)
    records = [harness.run(c) for c in cell_keys(config) if c["kind"] == "recall"]
    return config, harness, records


def _generate(harness, ids: list[int], strategy: str = "full") -> str:
    model, tokenizer = harness.model, harness.tokenizer
    tensor = torch.tensor([ids])
    with make_cache(model, strategy) as cache:
        out = model.generate(
            input_ids=tensor, cache=cache, max_new_tokens=18, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, tensor.shape[1] :], skip_special_tokens=True)


def test_a_reuse_question_sees_the_stored_context_and_not_the_previous_answer(followup_run):
    config, harness, records = followup_run
    tokenizer = harness.tokenizer
    case = make_case("multikey", tokenizer, 256, 0.5, 1, turns=3)
    context, asked = render(tokenizer, case.messages, case.question)
    for turn in (1, 2):
        record = next(
            r for r in records if (r["strategy"], r["seed"], r["mode"], r["turn"]) == ("full", 1, "reuse", turn)
        )
        in_place = asked_in_place(tokenizer, case, case.turn(turn).question)
        assert record["prompt_tokens"] == len(context) + len(in_place)  # no earlier question or answer
        assert record["answer"] == case.turn(turn).answer
        # the same answer as a fresh cache asked this question alone (a row of a batch: up to its early stop)
        alone = _generate(harness, context + in_place)
        assert alone.startswith(record["output"]) or record["output"].startswith(alone)


def test_a_chat_question_follows_the_previous_answer_in_one_conversation(followup_run):
    config, harness, records = followup_run
    tokenizer = harness.tokenizer
    case = make_case("multikey", tokenizer, 256, 0.5, 0, turns=3)
    chat = sorted(
        (r for r in records if (r["strategy"], r["seed"], r["mode"]) == ("full", 0, "chat")), key=lambda r: r["turn"]
    )
    for before, after in zip(chat, chat[1:]):
        generated = after["seen_tokens"] - after["prompt_tokens"]  # what the model said to this question, but one
        assert generated >= 0
        assert after["prompt_tokens"] > before["prompt_tokens"] + len(next_turn(tokenizer, case, case.turn(1).question))
    # the first question is one computation, recorded in both modes
    first = [r for r in records if r["turn"] == 0 and r["strategy"] == "full" and r["seed"] == 0]
    assert len(first) == 2 and first[0]["output"] == first[1]["output"]


def test_the_report_keeps_first_questions_in_its_table_and_follow_ups_in_their_section(followup_run):
    config, _, records = followup_run
    firsts = first_questions(records, config)
    assert {r["turn"] for r in firsts} == {0} and {r["mode"] for r in firsts} == {"reuse"}
    section = followup_section(records, config)
    assert "## Follow-up questions (3 per case)" in section
    full_rows = [line for line in section.splitlines() if line.startswith("| `full`")]
    assert len(full_rows) == 2  # a row per mode
    assert all("+0.0 pts" in line for line in full_rows)  # full against itself
