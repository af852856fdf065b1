"""What every recall task is made of: a Case, its scoring, rendering in the model's chat template, and fitting a
haystack to a token length. The tasks themselves live in tasks.py (ours) and ruler.py (RULER's).

Each case is split into a context (prefilled as one step) and a question (a second step), so a retention that
evicts at decode time has done its evicting before the question arrives, as it would in a chat. Lengths count the
model's own tokens, chat template included, and a prompt reaches its target length within a token. Scoring: the
planted answer appears in the generated text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import haystack_text

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = (
    "amber",
    "birch",
    "cobalt",
    "delta",
    "ember",
    "falcon",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lantern",
    "meadow",
    "nickel",
    "orchid",
    "pepper",
    "quartz",
    "raven",
    "saffron",
    "tundra",
    "umber",
    "violet",
)
# The generators' version: bumped whenever a seed's prompt changes, so a resumed run never mixes two versions' cases
# under one cell id (3: multikey asks for a name that is one token; 2: prompts end in a partial haystack unit and
# reach their length within a token; 1: before).
CASES = 3


def one_token_words(tokenizer, words: tuple[str, ...] = WORDS) -> list[str]:
    """The words the tokenizer reads as one token after a space (all of them where fewer than half are): questions
    that name one have as many tokens whichever it is, so a task's cases batch together (`Harness._batch`)."""
    one = [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]
    return one if 2 * len(one) >= len(words) else list(words)


TAIL_UNITS = 3  # the partial unit that ends a haystack is cut from the next 3 units: one alone may tokenize short
TAIL_CHARS = 1024  # the most characters the fit tries for it (a build clips it to the text it has)


@dataclass(frozen=True)
class Followup:
    """A later question about the same context: its text, the answer it plants and the needle that holds it."""

    question: str
    answer: str | tuple[str, ...]
    needle: str


@dataclass(frozen=True)
class Case:
    task: str
    length: int
    depth: float
    seed: int
    messages: tuple[dict, ...]  # the chat, ending with the user turn that asks
    question: str  # where the context step ends: the text of the asking turn from here on
    answer: str | tuple[str, ...]  # several: every one must appear (RULER's multi-answer tasks)
    needle: str  # the sentence of the context that holds the answer (needle survival is measured on its tokens)
    answer_tokens: int | None = None  # tokens an answer needs, when more than the run's max_new_tokens
    followups: tuple[Followup, ...] = ()  # the questions asked after the first one, each about another needle

    def turn(self, index: int) -> Followup:
        """Question `index` of the case (0: the first, `question`), with its answer and needle."""
        return Followup(self.question, self.answer, self.needle) if index == 0 else self.followups[index - 1]

    @property
    def key(self) -> tuple:
        return (self.task, self.length, round(self.depth, 4), self.seed)


def score(answer: str | tuple[str, ...] | list[str], output: str) -> bool:
    """Exact match of the planted answer anywhere in the output; of every one of them, for several."""
    return answer in output if isinstance(answer, str) else all(a in output for a in answer)


def _fit(build: Callable[[int, int], tuple], tokenizer, length: int) -> tuple:
    """The longest prompt within `length` tokens, found by binary search on the real tokenizer: the largest count of
    whole haystack units, then the most characters of what the haystack would go on with (`build(units, chars)`),
    so the prompt ends within a token of the target. Raises ValueError naming the shortest length when even no
    haystack does not fit."""

    def tokens(units: int, chars: int = 0) -> int:
        return sum(map(len, render(tokenizer, *build(units, chars)[:2])))

    shortest = tokens(0)
    if shortest > length:
        raise ValueError(
            f"length {length} is too short for this task: its prompt without any haystack takes {shortest} tokens"
        )
    units = _largest(lambda n: tokens(n) <= length, max(1, length))
    return build(units, _largest(lambda c: tokens(units, c) <= length, TAIL_CHARS))


def _largest(ok: Callable[[int], bool], hi: int) -> int:
    """The largest n in [0, hi] with ok(n), given ok(0), by bisection (token counts only nearly grow with text)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def partial(following: list[str], chars: int, separator: str = " ") -> list[str]:
    """The first `chars` characters of the units that would follow, as the one partial unit that ends a haystack
    (none for 0 characters)."""
    text = separator.join(following)[:chars].rstrip()
    return [text] if text else []


def haystack_units(haystack: str) -> list[str]:
    """What a haystack grows by: noise sentences, or the essay's words (as RULER cuts its essays, so the length fits
    to a word)."""
    if haystack == "noise":
        return [s.strip().rstrip(".") + "." for s in FILLER.split(". ") if s.strip()]
    return haystack_text().split()


def fill(
    haystack: str,
    count: int,
    needles: list[tuple[float, str]],
    tail: int = 0,
    distractor: Callable[[], str] | None = None,
) -> str:
    """`count` haystack units (noise sentences, essay words, or distractor needles, each a `distractor()` call) and
    the first `tail` characters of the units that would follow, with each needle at its relative depth (the partial
    unit counts as the last one, so depth 1 is still the end)."""
    if haystack == "needle":
        parts = [distractor() for _ in range(count + TAIL_UNITS)]
    else:
        source = haystack_units(haystack)
        parts = (source * ((count + TAIL_UNITS) // len(source) + 1))[: count + TAIL_UNITS]
    parts = parts[:count] + partial(parts[count:], tail)
    for depth, needle in sorted(needles, reverse=True):
        parts.insert(round(depth * len(parts)), needle)
    return " ".join(parts)


def _chat_text(tokenizer, messages) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages, question: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, question): the chat template (when the tokenizer has one) is applied to the whole
    chat, and the text is cut where the question begins."""
    text = _chat_text(tokenizer, messages)
    cut = text.rindex(question)
    return _encode(tokenizer, text[:cut]), _encode(tokenizer, text[cut:])


def asked_in_place(tokenizer, case: Case, question: str) -> list[int]:
    """Token ids of `question` asked where the case's first question is (the same context before it): what a
    follow-up adds to the stored context when the previous question and answer are dropped."""
    *before, last = case.messages
    if not last["content"].endswith(case.question):
        raise ValueError(f"{case.task}: its last turn does not end with its question, so another cannot replace it")
    messages = (*before, {**last, "content": last["content"][: -len(case.question)] + question})
    return render(tokenizer, messages, question)[1]


ANSWER_MARK = "@@previous-answer@@"  # stands for the previous answer while a chat's next turn is rendered


def next_turn(tokenizer, case: Case, question: str) -> list[int]:
    """Token ids that follow an assistant's answer to the case's first question when the user then asks `question`:
    the end of the answer's turn, the new user turn and the prompt for the next answer, as the chat template
    renders them."""
    messages = (*case.messages, {"role": "assistant", "content": ANSWER_MARK}, {"role": "user", "content": question})
    text = _chat_text(tokenizer, messages)
    return _encode(tokenizer, text[text.rindex(ANSWER_MARK) + len(ANSWER_MARK) :])


def needle_positions(tokenizer, case: Case, needle: str | None = None) -> range:
    """Token positions of the case's needle (or another sentence of its context) in its rendered context: every
    token that overlaps its characters."""
    needle = needle or case.needle
    text = _chat_text(tokenizer, case.messages)
    start = text.index(needle)
    end = start + len(needle)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return range(inside[0], inside[-1] + 1)


def _single_turn(context: str, question: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": f"{context}\n\n{question}"},)
