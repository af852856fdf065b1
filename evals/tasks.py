"""Long-context recall tasks, generated offline and deterministically from a seed: ours (passkey, multikey,
vartrack, multiturn) and RULER's synthetic family (ruler.py). What a case is and how it is scored: cases.py."""

from __future__ import annotations

import random
from collections.abc import Callable

from .cases import (
    TAIL_UNITS,
    Case,
    Followup,
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


def multikey(tokenizer, length: int, depth: float, seed: int, keys: int = 4, turns: int = 1) -> Case:
    """Several keys with a magic number each; the first question asks for the key at `depth`, follow-up question i
    (turns > 1) for key i, planted elsewhere."""
    rng = random.Random(f"multikey-{seed}-{depth}")
    names = rng.sample(one_token_words(tokenizer), max(keys, turns))
    values = [str(rng.randint(1000000, 9999999)) for _ in names]
    others = [rng.random() for _ in names[1:]]

    def ask(name: str) -> str:
        return f"What is the special magic number for {name}? Answer with the number only."

    question = ask(names[0])
    needles = [(depth, f"The special magic number for {names[0]} is: {values[0]}.")]
    needles += [(d, f"The special magic number for {k} is: {v}.") for d, k, v in zip(others, names[1:], values[1:])]
    followups = tuple(Followup(ask(names[i]), values[i], needles[i][1]) for i in range(1, turns))

    def build(n, tail):
        context = (
            f"Some special magic numbers are hidden in this text. Memorize them.\n{fill('noise', n, needles, tail)}"
        )
        return _single_turn(context, question), question, values[0], needles[0][1]

    return Case("multikey", length, depth, seed, *_fit(build, tokenizer, length), followups=followups)


def vartrack(tokenizer, length: int, depth: float, seed: int, hops: int = 3, turns: int = 1) -> Case:
    """A chain of `hops` assignments from a value, starting at `depth`; the question asks for its last variable.
    Follow-up question i (turns > 1) asks for the last variable of chain i, another chain from another value."""
    rng = random.Random(f"vartrack-{seed}-{depth}")

    def draw_chain() -> tuple[list[str], str]:
        return ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(4)) for _ in range(hops + 1)], str(
            rng.randint(10000, 99999)
        )

    def ask(name: str) -> str:
        return f"What is the value of VAR {name}? Answer with the number only."

    chains = [draw_chain()]
    while len(chains) < turns:  # drawn after the first chain, so the first question's case is the one-turn case's
        names, value = draw_chain()
        if not {*names} & {name for chain, _ in chains for name in chain}:
            chains.append((names, value))
    starts = [depth] + [rng.random() for _ in chains[1:]]
    statements = [
        [(start + (1 - start) * i / (hops + 1), f"VAR {names[i]} = VAR {names[i - 1]}.") for i in range(1, hops + 1)]
        for start, (names, value) in zip(starts, chains)
    ]
    heads = [(start, f"VAR {names[0]} = {value}.") for start, (names, value) in zip(starts, chains)]
    question = ask(chains[0][0][-1])
    followups = tuple(Followup(ask(names[-1]), value, heads[i][1]) for i, (names, value) in enumerate(chains) if i)

    def build(n, tail):
        planted = [s for head, chain in zip(heads, statements) for s in [head, *chain]]
        context = "Track the variable assignments in this text.\n" + fill("noise", n, planted, tail)
        return _single_turn(context, question), question, chains[0][1], heads[0][1]

    return Case("vartrack", length, depth, seed, *_fit(build, tokenizer, length), followups=followups)


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


# the tasks whose cases plant a needle for every question of a follow-up run (`turns` > 1): a different key, chain
# or variable each time
FOLLOWUP_TASKS = (
    "multikey",
    "vartrack",
    "ruler_niah_multikey_1",
    "ruler_niah_multikey_2",
    "ruler_niah_multikey_3",
    "ruler_niah_multivalue",
    "ruler_niah_multiquery",
    "ruler_vt",
)


def depths(count: int) -> list[float]:
    """`count` relative depths evenly spread over [0, 1]."""
    return [0.5] if count == 1 else [round(i / (count - 1), 4) for i in range(count)]


def make_case(task: str, tokenizer, length: int, depth: float, seed: int = 0, turns: int = 1) -> Case:
    """The case of `task` at this length, depth and seed; with turns > 1 it asks `turns` questions, each about
    another needle (`Case.followups`: the questions after the first)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    if turns == 1:
        return TASKS[task](tokenizer, length, depth, seed)
    if task not in FOLLOWUP_TASKS:
        raise ValueError(
            f"task {task!r} has one needle to ask about; follow-up questions need one of: {', '.join(FOLLOWUP_TASKS)}"
        )
    return TASKS[task](tokenizer, length, depth, seed, turns=turns)
