"""RULER's synthetic tasks, generated offline in the model's own tokenizer.

Definitions after NVIDIA/RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv:2404.06654; scripts/data/synthetic/constants.py and synthetic.yaml): the same templates, needle
counts and haystacks, with two substitutions: RULER's "essay" haystack (Paul Graham's essays) is the shipped
public-domain text (the US Declaration of Independence, repeated as needed), and RULER's random words come from a
fixed word list, so nothing is downloaded. As in our other tasks the context is prefilled before the question (a
chat turn asking it), lengths count the chat template and reach the target within a token (whole haystack units,
then part of the next, where RULER stops at the last whole unit), and `depth` places the queried needle (cwe and
fwe have no needle: their depth only seeds the instance). A case is correct when every expected answer appears in
the output (RULER's string_match_all, all-or-nothing per case so recall stays paired per case).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .cases import TAIL_UNITS, WORDS, Case, Followup, _fit, _single_turn, fill, partial

ADJECTIVES = (
    "ancient",
    "bitter",
    "calm",
    "dusty",
    "eager",
    "fierce",
    "gentle",
    "hollow",
    "icy",
    "jolly",
    "keen",
    "lively",
    "mellow",
    "noisy",
    "odd",
    "proud",
    "quiet",
    "rapid",
    "silent",
    "tidy",
    "upbeat",
    "vivid",
)
NIAH = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the {kind} afterwards.\n{context}"
)
NIAH_QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text?"
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
VT = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}"
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
CWE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}"
)
CWE_QUESTION = "Question: What are the {count} most common words in the above list?"
FWE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}"
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
    "frequently appeared words in the above coded text?"
)


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(WORDS)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1000000, 9999999))


def _uuid(rng: random.Random) -> str:
    digits = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def niah(
    name: str,
    haystack: str,
    keys: str = "words",
    values: str = "numbers",
    needle_keys: int = 1,
    needle_values: int = 1,
    queries: int = 1,
) -> Callable[..., Case]:
    """A needle-in-a-haystack task: `needle_keys` keys (the first `queries` of them asked for), each with
    `needle_values` values; the other keys are distractors. With turns > 1 each question asks for one key (RULER's
    multi-query split over the turns): the first for the key at `depth`, follow-up i for key i, planted elsewhere
    (at least `turns` keys, each with its `needle_values` values)."""
    make_key = _word_key if keys == "words" else _uuid
    make_value = _number if values == "numbers" else _uuid

    def task(tokenizer, length: int, depth: float, seed: int, turns: int = 1) -> Case:
        rng = random.Random(f"{name}-{seed}-{depth}")
        chosen = []
        while len(chosen) < max(needle_keys, turns):
            key = make_key(rng)
            chosen += [key] if key not in chosen else []
        planted = [[make_value(rng) for _ in range(needle_values)] for _ in chosen]
        places = [depth] + [rng.random() for _ in range(len(chosen) * needle_values - 1)]
        needles = [
            NEEDLE.format(kind=values, key=key, value=value) for key, vals in zip(chosen, planted) for value in vals
        ]
        asked = chosen[: 1 if turns > 1 else queries]
        question = NIAH_QUESTION.format(kind=values, query=", ".join(asked))
        answers = tuple(value for vals in planted[: len(asked)] for value in vals)
        followups = tuple(
            Followup(NIAH_QUESTION.format(kind=values, query=key), tuple(vals), needles[i * needle_values])
            for i, (key, vals) in enumerate(zip(chosen, planted))
            if 0 < i < turns
        )

        def build(n, tail):
            hay = random.Random(f"{name}-{seed}-{depth}-hay")  # the same distractors for every n tried

            def distractor():  # a needle for a key that is never asked about
                key = make_key(hay)
                while key in chosen:
                    key = make_key(hay)
                return NEEDLE.format(kind=values, key=key, value=make_value(hay))

            context = fill(haystack, n, list(zip(places, needles)), tail, distractor)
            return _single_turn(NIAH.format(kind=values, context=context), question), question, answers, needles[0]

        return Case(
            name,
            length,
            depth,
            seed,
            *_fit(build, tokenizer, length),
            answer_tokens=24 + 16 * len(answers),
            followups=followups,
        )

    return task


def variable_tracking(
    tokenizer, length: int, depth: float, seed: int, chains: int = 1, hops: int = 4, turns: int = 1
) -> Case:
    """VT: chains of `hops` assignments (VAR B = VAR A) from a value; the answer is every variable of the chain that
    holds the asked value. The chains start at `depth` and spread to the end of the noise haystack. With turns > 1
    there are at least `turns` chains and follow-up question i asks for chain i's value."""
    chains = max(chains, turns)
    rng = random.Random(f"ruler_vt-{seed}-{depth}")
    names = set()
    while len(names) < chains * (hops + 1):
        names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    names = sorted(names)
    rng.shuffle(names)
    values = [str(rng.randint(10000, 99999)) for _ in range(chains)]
    chain = names[: hops + 1]
    statements = []
    for c in range(chains):
        group = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        statements += [
            (
                depth + (1 - depth) * i / (hops + 1) + (c * (hops + 1) + i) * 1e-9,  # strictly in order
                f"VAR {group[0]} = {values[c]}." if i == 0 else f"VAR {group[i]} = VAR {group[i - 1]}.",
            )
            for i in range(hops + 1)
        ]
    question = VT_QUESTION.format(value=values[0])
    followups = tuple(
        Followup(VT_QUESTION.format(value=values[c]), tuple(names[c * (hops + 1) : (c + 1) * (hops + 1)]), head)
        for c, (_, head) in enumerate(statements[:: hops + 1][1:turns], start=1)
    )

    def build(n, tail):
        context = VT.format(context=fill("noise", n, statements, tail))
        return _single_turn(context, question), question, tuple(chain), statements[0][1]

    case = _fit(build, tokenizer, length)
    return Case("ruler_vt", length, depth, seed, *case, answer_tokens=60, followups=followups)


def common_words(tokenizer, length: int, depth: float, seed: int, count: int = 10) -> Case:
    """CWE: a numbered list where `count` words appear often and every other word rarely (30 and 3 times; below 4k
    tokens 6 and 1, as RULER does); the answer is the `count` common words. The haystack grows by rare words."""
    common, uncommon = (30, 3) if length >= 4096 else (6, 1)
    rng = random.Random(f"ruler_cwe-{seed}-{depth}")
    vocabulary = [f"{a}{b}" for a in ADJECTIVES for b in WORDS]
    rng.shuffle(vocabulary)
    frequent, rare = vocabulary[:count], vocabulary[count:]
    question = CWE_QUESTION.format(count=count)

    def build(n, tail):
        words = frequent * common + rare[: min(n, len(rare))] * uncommon
        random.Random(f"ruler_cwe-{seed}-{depth}-{n}").shuffle(words)
        entries = [f"{i + 1}. {w}" for i, w in enumerate(words + rare[n : n + TAIL_UNITS])]
        context = CWE.format(context=" ".join(entries[: len(words)] + partial(entries[len(words) :], tail)))
        return _single_turn(context, question), question, tuple(frequent), f"1. {words[0]}"

    return Case("ruler_cwe", length, depth, seed, *_fit(build, tokenizer, length), answer_tokens=120)


def frequent_words(tokenizer, length: int, depth: float, seed: int, alpha: float = 2.0, vocabulary: int = 200) -> Case:
    """FWE: coded words drawn with Zipf frequencies (rank r appears ~ 1 / r**alpha of the time); the answer is the
    three most frequent. The haystack grows by drawn words (a word whose share rounds to none is left out)."""
    rng = random.Random(f"ruler_fwe-{seed}-{depth}")
    coded = []
    while len(coded) < vocabulary:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
        coded += [word] if word not in coded else []
    weights = [1 / (rank + 1) ** alpha for rank in range(vocabulary)]
    total = sum(weights)

    def build(n, tail):
        words = [w for w, p in zip(coded, weights) for _ in range(round(n * p / total))] or coded[:1]
        random.Random(f"ruler_fwe-{seed}-{depth}-{n}").shuffle(words)
        following = coded[: -TAIL_UNITS - 1 : -1]  # the rarest words: a partial one changes no frequent word's count
        context = FWE.format(context=" .... ".join(words + partial(following, tail, " .... ")))
        return _single_turn(context, question=FWE_QUESTION), FWE_QUESTION, tuple(coded[:3]), words[0]

    return Case("ruler_fwe", length, depth, seed, *_fit(build, tokenizer, length), answer_tokens=50)


RULER_TASKS: dict[str, Callable[..., Case]] = {
    "ruler_niah_single_1": niah("ruler_niah_single_1", "noise"),
    "ruler_niah_single_2": niah("ruler_niah_single_2", "essay"),
    "ruler_niah_single_3": niah("ruler_niah_single_3", "essay", values="uuids"),
    "ruler_niah_multikey_1": niah("ruler_niah_multikey_1", "essay", needle_keys=4),
    "ruler_niah_multikey_2": niah("ruler_niah_multikey_2", "needle"),
    "ruler_niah_multikey_3": niah("ruler_niah_multikey_3", "needle", keys="uuids", values="uuids"),
    "ruler_niah_multivalue": niah("ruler_niah_multivalue", "essay", needle_values=4),
    "ruler_niah_multiquery": niah("ruler_niah_multiquery", "essay", needle_keys=4, queries=4),
    "ruler_vt": variable_tracking,
    "ruler_cwe": common_words,
    "ruler_fwe": frequent_words,
}
