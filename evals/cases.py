"""What every recall task is made of: a Case, its scoring, rendering in the model's chat template, and fitting a
haystack to a token length. The tasks themselves live in tasks.py (ours) and ruler.py (RULER's).

Each case is split into a context (prefilled as one step) and a question (a second step), so a retention that
evicts at decode time has done its evicting before the question arrives, as it would in a chat. Lengths count the
model's own tokens, chat template included. Scoring: the planted answer appears in the generated text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
WORDS = ("amber", "birch", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lantern", "meadow", "nickel", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet")


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

    @property
    def key(self) -> tuple:
        return (self.task, self.length, round(self.depth, 4), self.seed)


def score(answer: str | tuple[str, ...] | list[str], output: str) -> bool:
    """Exact match of the planted answer anywhere in the output; of every one of them, for several."""
    return answer in output if isinstance(answer, str) else all(a in output for a in answer)


def _fit(build: Callable[[int], tuple], tokenizer, length: int) -> tuple:
    """Largest filler count whose prompt stays within `length` tokens (binary search on the real tokenizer). Raises
    ValueError naming the shortest length when even no filler does not fit."""
    shortest = sum(map(len, render(tokenizer, *build(0)[:2])))
    if shortest > length:
        raise ValueError(f"length {length} is too short for this task: its prompt without any haystack takes "
                         f"{shortest} tokens")
    lo, hi = 0, max(1, length)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        messages, question, *_ = build(mid)
        if sum(map(len, render(tokenizer, messages, question))) <= length:
            lo = mid
        else:
            hi = mid - 1
    return build(lo)


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


def needle_positions(tokenizer, case: Case) -> range:
    """Token positions of the case's needle in its rendered context: every token that overlaps its characters."""
    text = _chat_text(tokenizer, case.messages)
    start = text.index(case.needle)
    end = start + len(case.needle)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return range(inside[0], inside[-1] + 1)


def _single_turn(context: str, question: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": f"{context}\n\n{question}"},)
