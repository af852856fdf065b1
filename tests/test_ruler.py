"""RULER's synthetic tasks, offline: hand-checked instances, what each plants (and how often), lengths, determinism,
scoring of several answers, and the same tasks through lm-eval."""

import collections
import re

import pytest
from kvcompress.evals.cases import render, score
from kvcompress.evals.ruler import RULER_TASKS
from kvcompress.evals.tasks import TASKS, make_case
from transformers import AutoTokenizer

from kvcompress.models import default_model_dir

NIAH = [t for t in RULER_TASKS if "niah" in t]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(default_model_dir()))


def _text(case) -> str:
    return case.messages[-1]["content"]


def _answers(case) -> tuple:
    return case.answer if isinstance(case.answer, tuple) else (case.answer,)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [600, 1024])
def test_lengths_fit_the_target(tokenizer, task, length):
    for depth in (0.0, 0.5, 1.0):
        case = make_case(task, tokenizer, length, depth, 0)
        tokens = sum(map(len, render(tokenizer, case.messages, case.question)))
        # whole haystack units, then a partial one: within one token of the target
        assert length - 1 <= tokens <= length, (depth, tokens)


@pytest.mark.parametrize("task", ["passkey", "ruler_niah_single_1", "ruler_niah_single_2", "ruler_niah_multikey_2"])
def test_depth_one_puts_the_needle_after_the_partial_unit(tokenizer, task):
    last, first = (make_case(task, tokenizer, 700, depth, 0) for depth in (1.0, 0.0))
    assert _text(last).endswith(f"{last.needle}\n\n{last.question}")
    haystack = _text(first).split(first.needle, 1)[1].removesuffix(f"\n\n{first.question}")
    assert haystack.strip() and not haystack.endswith((".", ".\n")), "the haystack should end in a partial unit"


def test_a_length_too_short_for_the_task_says_so(tokenizer):
    with pytest.raises(ValueError, match="length 300 is too short for this task: its prompt without any haystack"):
        make_case("ruler_cwe", tokenizer, 300, 0.5, 0)


@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_deterministic_per_seed(tokenizer, task):
    first, again, other = (make_case(task, tokenizer, 600, 0.25, seed) for seed in (0, 0, 1))
    assert first == again and first.answer != other.answer


@pytest.mark.parametrize("task", NIAH)
def test_every_needle_value_planted_exactly_once(tokenizer, task):
    for depth in (0.0, 0.5, 1.0):
        case = make_case(task, tokenizer, 600, depth, 3)
        text = _text(case)
        assert all(text.count(value) == 1 for value in _answers(case)), task
        assert case.needle in text and case.question in text


def test_hand_checked_niah_single_1(tokenizer):
    case = make_case("ruler_niah_single_1", tokenizer, 256, 0.5, 0)
    text = _text(case)
    assert text.startswith(
        "Some special magic numbers are hidden within the following text. Make sure to memorize "
        "it. I will quiz you about the numbers afterwards.\nThe grass is green."
    )
    key = re.search(r"for (\S+) mentioned", case.question).group(1)
    assert re.fullmatch(r"[a-z]+-[a-z]+", key) and re.fullmatch(r"\d{7}", case.answer[0])
    assert case.needle == f"One of the special magic numbers for {key} is: {case.answer[0]}."
    before, _, after = text.partition(case.needle)
    assert abs(len(before) - len(after)) < 0.2 * len(text)  # depth 0.5: the middle of the haystack
    assert text.endswith(f"\n\nWhat are all the special magic numbers for {key} mentioned in the provided text?")


def test_multikey_has_distractors_and_multiquery_asks_every_key(tokenizer):
    multikey = make_case("ruler_niah_multikey_1", tokenizer, 600, 0.5, 0)
    assert _text(multikey).count("One of the special magic numbers for") == 4 and len(multikey.answer) == 1
    haystack_of_needles = make_case("ruler_niah_multikey_3", tokenizer, 1024, 0.5, 0)
    assert _text(haystack_of_needles).count("One of the special magic uuids for") > 4
    multiquery = make_case("ruler_niah_multiquery", tokenizer, 600, 0.5, 0)
    assert len(multiquery.answer) == 4 and multiquery.question.count(", ") == 3


def test_variable_tracking_chain(tokenizer):
    case = make_case("ruler_vt", tokenizer, 600, 0.2, 0)
    text = _text(case)
    first, *rest = case.answer
    value = re.search(rf"VAR {first} = (\d+)\.", text).group(1)
    assert value in case.question
    for before, after in zip(case.answer, rest):  # each hop assigns the previous variable, in order
        assert text.index(f"VAR {after} = VAR {before}.") > text.index(f"VAR {before} =")


def test_common_and_frequent_words(tokenizer):
    cwe = make_case("ruler_cwe", tokenizer, 1024, 0.5, 0)
    counts = collections.Counter(re.findall(r"\d+\. (\w+)", _text(cwe)))
    assert len(cwe.answer) == 10 and all(counts[w] == 6 for w in cwe.answer)  # below 4k tokens: 6 and 1, as RULER
    assert max(c for w, c in counts.items() if w not in cwe.answer) == 1
    fwe = make_case("ruler_fwe", tokenizer, 1024, 0.5, 0)
    counts = collections.Counter(re.findall(r"[a-z]{6}", _text(fwe).split("{")[0].split("coded words. ")[1]))
    top = [w for w, _ in counts.most_common(4)]
    assert top[:3] == list(fwe.answer) and counts[top[2]] > counts[top[3]]


def test_several_answers_score_only_when_all_appear():
    assert score(("12", "34"), "values: 34 and 12") and not score(("12", "34"), "values: 12")
    assert score(["12"], "12") and score("12", "x12x")


def test_ruler_tasks_through_lm_eval(tokenizer):
    pytest.importorskip("lm_eval", reason="the lm-eval integration needs the eval extra")
    from kvcompress.evals.lm_eval_recall import recall_docs, task_manager

    docs = recall_docs("ruler_niah_multivalue", tokenizer, [400], 2, 1)
    assert len(docs) == 2 and all(len(d["answer"]) == 4 for d in docs)
    loaded = task_manager(metadata={"lengths": [700], "depths": 1}).load(["kvc_ruler_cwe"])["tasks"]["kvc_ruler_cwe"]
    # the budget the report gives the task (cwe: 120 tokens for ten words), no stop: lists may span lines
    assert len(loaded.test_docs()) == 1 and loaded.config.generation_kwargs == {
        "until": [],
        "max_gen_toks": 120,
        "do_sample": False,
    }
