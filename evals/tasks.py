"""Long-context recall tasks, generated offline and deterministically from a seed: ours (passkey, multikey,
vartrack, multiturn) and RULER's synthetic family (ruler.py). What a case is and how it is scored: cases.py."""

from __future__ import annotations

import random
from collections.abc import Callable

from .cases import (
    TAIL_UNITS,
    Case,
    _fit,
    _single_turn,
    fill,
    one_token_words,
    partial,
)
from .ruler import RULER_TASKS


def passkey(tokenizer, length: int, depth: float, seed: int) -> Case:
    key = str(random.Random(f"passkey-{seed}-{depth}").randint(10000, 99999))
    intro = (
        "There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about it."
    )

    question = "What is the pass key? Answer with the number only."

    def build(n, tail):
        needle = f"The pass key is {key}. Remember it."
        return _single_turn(f"{intro}\n{fill('noise', n, [(depth, needle)], tail)}", question), question, key, needle

    return Case("passkey", length, depth, seed, *_fit(build, tokenizer, length))


def multikey(tokenizer, length: int, depth: float, seed: int, keys: int = 4) -> Case:
    rng = random.Random(f"multikey-{seed}-{depth}")
    names = rng.sample(one_token_words(tokenizer), keys)
    values = [str(rng.randint(1000000, 9999999)) for _ in names]
    others = [rng.random() for _ in names[1:]]

    question = f"What is the special magic number for {names[0]}? Answer with the number only."

    def build(n, tail):
        needles = [(depth, f"The special magic number for {names[0]} is: {values[0]}.")]
        needles += [(d, f"The special magic number for {k} is: {v}.") for d, k, v in zip(others, names[1:], values[1:])]
        context = (
            f"Some special magic numbers are hidden in this text. Memorize them.\n{fill('noise', n, needles, tail)}"
        )
        return _single_turn(context, question), question, values[0], needles[0][1]

    return Case("multikey", length, depth, seed, *_fit(build, tokenizer, length))


def vartrack(tokenizer, length: int, depth: float, seed: int, hops: int = 3) -> Case:
    rng = random.Random(f"vartrack-{seed}-{depth}")
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(4)) for _ in range(hops + 1)]
    value = str(rng.randint(10000, 99999))

    question = f"What is the value of VAR {names[-1]}? Answer with the number only."

    def build(n, tail):
        chain = [(depth, f"VAR {names[0]} = {value}.")]
        chain += [
            (depth + (1 - depth) * (i + 1) / (hops + 1), f"VAR {names[i + 1]} = VAR {names[i]}.") for i in range(hops)
        ]
        context = "Track the variable assignments in this text.\n" + fill("noise", n, chain, tail)
        return _single_turn(context, question), question, value, chain[0][1]

    return Case("vartrack", length, depth, seed, *_fit(build, tokenizer, length))


def multiturn(tokenizer, length: int, depth: float, seed: int) -> Case:
    """A chat whose early turn states a fact a late turn asks for: what a sliding window silently drops."""
    code = str(random.Random(f"multiturn-{seed}-{depth}").randint(10000, 99999))
    small_talk = [
        ("Tell me something about the weather.", "The sky is blue and the sun is yellow today."),
        ("What color is grass?", "The grass is green."),
        ("Any plans?", "Here we go, there and back again."),
    ]

    question = "What is my locker code? Answer with the number only."

    def build(n, tail):
        turns = [small_talk[i % len(small_talk)] for i in range(n)]
        if turns:  # the partial unit: the last small-talk reply goes on with what the next turns would say
            following = [" ".join(small_talk[i % len(small_talk)]) for i in range(n, n + TAIL_UNITS)]
            user, reply = turns[-1]
            turns[-1] = (user, " ".join([reply] + partial(following, tail)))
        fact = (f"Please remember this: my locker code is {code}.", "Noted, I will remember your locker code.")
        turns.insert(round(depth * len(turns)), fact)
        messages = [
            m
            for user, assistant in turns
            for m in ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})
        ]
        return tuple(messages) + ({"role": "user", "content": question},), question, code, fact[0]

    return Case("multiturn", length, depth, seed, *_fit(build, tokenizer, length))


TASKS: dict[str, Callable[..., Case]] = {
    "passkey": passkey,
    "multikey": multikey,
    "vartrack": vartrack,
    "multiturn": multiturn,
    **RULER_TASKS,
}


def depths(count: int) -> list[float]:
    """`count` relative depths evenly spread over [0, 1]."""
    return [0.5] if count == 1 else [round(i / (count - 1), 4) for i in range(count)]


def make_case(task: str, tokenizer, length: int, depth: float, seed: int = 0) -> Case:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    return TASKS[task](tokenizer, length, depth, seed)
