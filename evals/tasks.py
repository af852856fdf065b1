"""Long-context recall tasks, generated offline and deterministically from a seed.

Each case is split into a context (prefilled as one step) and a question (a second step), so a retention that
evicts at decode time has done its evicting before the question arrives, as it would in a chat. Lengths count the
model's own tokens, chat template included. Scoring: the planted answer appears in the generated text.
"""

from __future__ import annotations

import random
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
    answer: str
    needle: str  # the sentence of the context that holds the answer (needle survival is measured on its tokens)

    @property
    def key(self) -> tuple:
        return (self.task, self.length, round(self.depth, 4), self.seed)


def score(answer: str, output: str) -> bool:
    """Exact match of the planted answer anywhere in the output."""
    return answer in output


def _fit(build: Callable[[int], tuple], tokenizer, length: int) -> tuple:
    """Largest filler count whose prompt stays within `length` tokens (binary search on the real tokenizer)."""
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


def _haystack(sentences: int, needles: list[tuple[float, str]]) -> str:
    """`sentences` filler sentences with each needle inserted at its relative depth."""
    parts = (FILLER.split(". ") * (sentences // 5 + 1))[:sentences]
    parts = [p.strip().rstrip(".") + "." for p in parts]
    for depth, needle in sorted(needles, reverse=True):
        parts.insert(round(depth * len(parts)), needle)
    return " ".join(parts)


def passkey(tokenizer, length: int, depth: float, seed: int) -> Case:
    key = str(random.Random(f"passkey-{seed}-{depth}").randint(10000, 99999))
    intro = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
             "memorize it. I will quiz you about it.")

    question = "What is the pass key? Answer with the number only."

    def build(n):
        needle = f"The pass key is {key}. Remember it."
        return _single_turn(f"{intro}\n{_haystack(n, [(depth, needle)])}", question), question, key, needle

    return Case("passkey", length, depth, seed, *_fit(build, tokenizer, length))


def multikey(tokenizer, length: int, depth: float, seed: int, keys: int = 4) -> Case:
    rng = random.Random(f"multikey-{seed}-{depth}")
    names = rng.sample(WORDS, keys)
    values = [str(rng.randint(1000000, 9999999)) for _ in names]
    others = [rng.random() for _ in names[1:]]

    question = f"What is the special magic number for {names[0]}? Answer with the number only."

    def build(n):
        needles = [(depth, f"The special magic number for {names[0]} is: {values[0]}.")]
        needles += [(d, f"The special magic number for {k} is: {v}.") for d, k, v in zip(others, names[1:], values[1:])]
        context = "Some special magic numbers are hidden in this text. Memorize them.\n" + _haystack(n, needles)
        return _single_turn(context, question), question, values[0], needles[0][1]

    return Case("multikey", length, depth, seed, *_fit(build, tokenizer, length))


def vartrack(tokenizer, length: int, depth: float, seed: int, hops: int = 3) -> Case:
    rng = random.Random(f"vartrack-{seed}-{depth}")
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(4)) for _ in range(hops + 1)]
    value = str(rng.randint(10000, 99999))

    question = f"What is the value of VAR {names[-1]}? Answer with the number only."

    def build(n):
        chain = [(depth, f"VAR {names[0]} = {value}.")]
        chain += [(depth + (1 - depth) * (i + 1) / (hops + 1), f"VAR {names[i + 1]} = VAR {names[i]}.")
                  for i in range(hops)]
        context = "Track the variable assignments in this text.\n" + _haystack(n, chain)
        return _single_turn(context, question), question, value, chain[0][1]

    return Case("vartrack", length, depth, seed, *_fit(build, tokenizer, length))


def multiturn(tokenizer, length: int, depth: float, seed: int) -> Case:
    """A chat whose early turn states a fact a late turn asks for: what a sliding window silently drops."""
    code = str(random.Random(f"multiturn-{seed}-{depth}").randint(10000, 99999))
    small_talk = [("Tell me something about the weather.", "The sky is blue and the sun is yellow today."),
                  ("What color is grass?", "The grass is green."),
                  ("Any plans?", "Here we go, there and back again.")]

    question = "What is my locker code? Answer with the number only."

    def build(n):
        turns = [small_talk[i % len(small_talk)] for i in range(n)]
        fact = (f"Please remember this: my locker code is {code}.", "Noted, I will remember your locker code.")
        turns.insert(round(depth * len(turns)), fact)
        messages = [m for user, assistant in turns for m in ({"role": "user", "content": user},
                                                              {"role": "assistant", "content": assistant})]
        return tuple(messages) + ({"role": "user", "content": question},), question, code, fact[0]

    return Case("multiturn", length, depth, seed, *_fit(build, tokenizer, length))


def _single_turn(context: str, question: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": f"{context}\n\n{question}"},)


TASKS: dict[str, Callable[..., Case]] = {"passkey": passkey, "multikey": multikey, "vartrack": vartrack,
                                         "multiturn": multiturn}


def depths(count: int) -> list[float]:
    """`count` relative depths evenly spread over [0, 1]."""
    return [0.5] if count == 1 else [round(i / (count - 1), 4) for i in range(count)]


def make_case(task: str, tokenizer, length: int, depth: float, seed: int = 0) -> Case:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    return TASKS[task](tokenizer, length, depth, seed)
