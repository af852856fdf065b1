"""Guardrail statistics: exact intervals on constructed outcome tables, McNemar, the latency bootstrap, bad input."""

import math
import random
import time

import pytest
from kvcompress.evals.stats import (
    PairedRecall,
    mcnemar_exact_p,
    min_cases_for_pass,
    paired_recall,
    proportion_interval,
    ratio_interval,
    rounds_ratio_interval,
    verdict,
)


def table(n: int, b: int, c: int) -> tuple[list[bool], list[bool]]:
    """n cases: b that only `full` gets right, c that only the candidate gets right, the rest both right."""
    full = [True] * b + [False] * c + [True] * (n - b - c)
    candidate = [False] * b + [True] * c + [True] * (n - b - c)
    return full, candidate


# --- the acceptance cases, with the report's 2-point guardrail ----------------------------------------------


def test_one_miss_in_twenty_is_inconclusive():
    r = paired_recall(*table(20, 1, 0))
    assert (r.n, r.b, r.c, r.loss_pts) == (20, 1, 0, 5.0)
    assert r.low_pts < 0 < 2 < r.high_pts
    assert verdict(r.low_pts, r.high_pts, 2.0) == "inconclusive"


def test_fifteen_lost_in_sixty_is_fail():
    r = paired_recall(*table(60, 15, 0))
    assert (r.b, r.c, r.loss_pts) == (15, 0, 25.0)
    assert 2 < r.low_pts < r.loss_pts < r.high_pts
    assert verdict(r.low_pts, r.high_pts, 2.0) == "fail"


def test_identical_outcomes_pass_from_217_cases():
    assert min_cases_for_pass(2.0, 0.95) == 217
    small = paired_recall(*table(216, 0, 0))
    enough = paired_recall(*table(217, 0, 0))
    assert small.loss_pts == enough.loss_pts == 0.0
    assert verdict(small.low_pts, small.high_pts, 2.0) == "inconclusive"
    assert verdict(enough.low_pts, enough.high_pts, 2.0) == "pass"
    # the closed form the docstring states: upper end 1 - (alpha/4)^(1/n), symmetric around 0
    assert enough.high_pts == pytest.approx(100 * (1 - 0.0125 ** (1 / 217)), rel=1e-12)
    assert enough.low_pts == -enough.high_pts


def test_identical_outcomes_on_few_cases_are_never_pass():
    # the conditional interval would give [0, 0] here; ours must not pass on 3 cases
    r = paired_recall([True, False, True], [True, False, True])
    assert r.high_pts > 50
    assert verdict(r.low_pts, r.high_pts, 2.0) == "inconclusive"


def test_min_cases_for_pass_follows_limit_and_confidence():
    assert min_cases_for_pass(5.0) == 86
    assert min_cases_for_pass(2.0, 0.90) == 183
    for limit, confidence in [(2.0, 0.95), (5.0, 0.95), (1.0, 0.99), (2.0, 0.90)]:
        n = min_cases_for_pass(limit, confidence)
        assert paired_recall(*table(n, 0, 0), confidence).high_pts <= limit
        assert paired_recall(*table(n - 1, 0, 0), confidence).high_pts > limit


# --- McNemar and Clopper-Pearson against hand-computed and published values ----------------------------------------


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (5, 0, 2 * 0.5**5),  # 0.0625
        (0, 0, 1.0),
        (3, 7, 2 * (1 + 10 + 45 + 120) / 2**10),  # 2 P(X <= 3), X ~ Bin(10, 1/2) = 0.34375
        (4, 4, 1.0),
        (1, 0, 1.0),
        (15, 0, 2 * 0.5**15),
    ],
)
def test_mcnemar_exact_p(b, c, expected):
    assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact_p(c, b) == pytest.approx(expected, rel=1e-12)
    assert paired_recall(*table(40, b, c)).p_value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "x, n, low, high",
    [
        (0, 10, 0.0, 0.3085),
        (10, 10, 0.6915, 1.0),
        (5, 10, 0.1871, 0.8129),
        (1, 20, 0.0013, 0.2487),
        (50, 100, 0.3983, 0.6017),
    ],
)
def test_clopper_pearson_known_values(x, n, low, high):
    got = proportion_interval(x, n, 0.95)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_clopper_pearson_matches_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    for _ in range(40):
        n = rng.choice([1, 3, 20, 60, 500, 4000])
        x = rng.randint(0, n)
        confidence = rng.choice([0.8, 0.95, 0.99])
        ref = stats.binomtest(x, n).proportion_ci(confidence, method="exact")
        assert proportion_interval(x, n, confidence) == pytest.approx((ref.low, ref.high), abs=1e-10)


def test_intervals_stay_fast_at_thousands_of_cases():
    full = [i % 5 != 0 for i in range(4000)]
    candidate = [f if i % 13 else not f for i, f in enumerate(full)]
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        proportion_interval(1234, 4000)
        paired_recall(full, candidate)
        best = min(best, time.perf_counter() - start)
    assert best < 0.05  # ~5 ms measured on one core; the bound only catches an O(n)-per-step tail


# --- properties of the paired interval ------------------------------------------------------------------------------


@pytest.mark.parametrize("n, b, c", [(20, 1, 0), (60, 15, 0), (100, 7, 3), (50, 0, 0), (30, 10, 12)])
def test_swapping_full_and_candidate_negates_the_loss(n, b, c):
    full, candidate = table(n, b, c)
    r, s = paired_recall(full, candidate), paired_recall(candidate, full)
    assert (s.b, s.c) == (r.c, r.b)
    assert s.loss_pts == -r.loss_pts
    assert (s.low_pts, s.high_pts) == (-r.high_pts, -r.low_pts)
    assert s.p_value == r.p_value


def test_case_order_does_not_matter_and_contradicting_cases_count():
    rng = random.Random(0)
    pairs = [(True, False)] * 6 + [(False, True)] * 2 + [(True, True)] * 30 + [(False, False)] * 12
    rng.shuffle(pairs)
    r = paired_recall([f for f, _ in pairs], [k for _, k in pairs])
    assert r == paired_recall(*table(50, 6, 2))
    assert isinstance(r, PairedRecall)
    assert r.loss_pts == pytest.approx(8.0)


def _trinomial(n: int, b: int, c: int, pb: float, pc: float) -> float:
    return math.comb(n, b) * math.comb(n - b, c) * pb**b * pc**c * (1 - pb - pc) ** (n - b - c)


def test_paired_interval_covers_at_least_its_confidence_and_fails_only_when_mcnemar_agrees():
    n, confidence = 20, 0.95
    intervals = {}
    for b in range(n + 1):
        for c in range(n + 1 - b):
            r = paired_recall(*table(n, b, c), confidence)
            intervals[b, c] = (r.low_pts / 100, r.high_pts / 100)
            if r.low_pts > 0 or r.high_pts < 0:  # a verdict of fail against any limit >= 0 needs this
                assert r.p_value < (1 - confidence) / 2
    # exact coverage: the probability, summed over every outcome table, that the interval holds the true loss
    for pb, pc in [(0.05, 0.0), (0.1, 0.05), (0.3, 0.3), (0.5, 0.1), (0.02, 0.2)]:
        covered = sum(_trinomial(n, b, c, pb, pc) for (b, c), (lo, hi) in intervals.items() if lo <= pb - pc <= hi)
        assert covered >= confidence


# --- verdicts -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "low, high, limit, higher_is_better, expected",
    [
        (-1.0, 1.5, 2.0, False, "pass"),
        (-1.0, 2.0, 2.0, False, "pass"),  # at the limit meets it
        (1.0, 3.0, 2.0, False, "inconclusive"),
        (2.0, 3.0, 2.0, False, "inconclusive"),
        (2.5, 3.0, 2.0, False, "fail"),
        (0.985, 0.999, 0.98, True, "pass"),
        (0.98, 0.999, 0.98, True, "pass"),
        (0.95, 0.99, 0.98, True, "inconclusive"),
        (0.90, 0.979, 0.98, True, "fail"),
    ],
)
def test_verdict_both_directions(low, high, limit, higher_is_better, expected):
    assert verdict(low, high, limit, higher_is_better=higher_is_better) == expected


def test_top1_agreement_verdicts_from_counts():
    assert verdict(*proportion_interval(995, 1000), 0.98, higher_is_better=True) == "pass"
    assert verdict(*proportion_interval(20, 20), 0.98, higher_is_better=True) == "inconclusive"
    assert verdict(*proportion_interval(950, 1000), 0.98, higher_is_better=True) == "fail"


# --- latency: ratio of medians with a seeded bootstrap --------------------------------------------------------------


def _noisy(level: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0, 0.3) for _ in range(n)]


def test_ratio_interval_is_deterministic_per_seed():
    a, b = _noisy(10, 20, 1), _noisy(12, 20, 2)
    assert ratio_interval(a, b, seed=7) == ratio_interval(a, b, seed=7)
    assert ratio_interval(a, b, seed=7)[1:] != ratio_interval(a, b, seed=8)[1:]
    assert ratio_interval(a, b, seed=7)[0] == ratio_interval(a, b, seed=8)[0]


def test_ratio_interval_separates_clearly_different_latencies():
    a, b = _noisy(10, 20, 1), _noisy(12, 20, 2)
    ratio, low, high = ratio_interval(a, b)
    assert low <= ratio <= high
    assert low <= 1.2 <= high
    assert low > 1.0
    # a 20 % slowdown against the 15 % guardrail
    assert verdict(100 * (low - 1), 100 * (high - 1), 15.0) == "fail"
    ratio, low, high = ratio_interval(b, a)
    assert high < 1.0 and low <= 1 / 1.2 <= high


def test_ratio_interval_holds_one_for_the_same_distribution():
    ratio, low, high = ratio_interval(_noisy(10, 30, 3), _noisy(10, 30, 4))
    assert low < 1.0 < high
    assert high - low < 0.1  # and is narrow: the noise is 3 % of the level
    assert verdict(100 * (low - 1), 100 * (high - 1), 15.0) == "pass"


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: paired_recall([True, False], [True]), "same length"),
        (lambda: paired_recall([], []), "full"),
        (lambda: paired_recall([True], []), "candidate"),
        (lambda: paired_recall([True, "yes"], [True, True]), r"full\[1\]"),
        (lambda: paired_recall([True], [0.5]), r"candidate\[0\]"),
        (lambda: paired_recall([True], [True], confidence=1.0), "confidence"),
        (lambda: paired_recall([True], [True], confidence=0), "confidence"),
        (lambda: proportion_interval(3, 2), "successes"),
        (lambda: proportion_interval(-1, 2), "successes"),
        (lambda: proportion_interval(0, 0), "n"),
        (lambda: proportion_interval(1, 2, confidence=95), "confidence"),
        (lambda: mcnemar_exact_p(-1, 0), "b"),
        (lambda: min_cases_for_pass(0.0), "limit_pts"),
        (lambda: min_cases_for_pass(2.0, 1.5), "confidence"),
        (lambda: verdict(3.0, 1.0, 2.0), "low must be <= high"),
        (lambda: verdict(float("nan"), 1.0, 2.0), "low"),
        (lambda: ratio_interval([], [1.0]), "samples_a"),
        (lambda: ratio_interval([1.0], []), "samples_b"),
        (lambda: ratio_interval([1.0], [0.0]), "samples_b"),
        (lambda: ratio_interval([1.0], [1.0], confidence=-0.1), "confidence"),
        (lambda: ratio_interval([1.0], [1.0], resamples=0), "resamples"),
    ],
)
def test_bad_input_raises_naming_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_zero_one_outcomes_are_accepted_as_bools():
    assert paired_recall([1, 1, 0], [1, 0, 0]) == paired_recall([True, True, False], [True, False, False])


def test_rounds_ratio_interval_carries_the_spread_between_rounds():
    # each round: 20 steps around its own level; b is 1.1x a in every round, but the rounds' levels differ by 30 %
    levels = [10, 13, 10.5, 12, 11]
    a = [_noisy(level, 20, i) for i, level in enumerate(levels)]
    b = [_noisy(1.1 * level, 20, 10 + i) for i, level in enumerate(levels)]
    ratio, low, high = rounds_ratio_interval(a, b)
    assert low <= 1.1 <= high and high < 1.25  # paired rounds: the common level cancels
    unpaired = rounds_ratio_interval(a, b[::-1])  # rounds matched to the wrong partners
    assert unpaired[2] - unpaired[1] > high - low
    steps = ratio_interval(sum(a, []), sum(b, []))  # steps as independent draws
    assert steps[0] == ratio
    same_level = rounds_ratio_interval(
        [_noisy(10, 20, i) for i in range(5)], [_noisy(10, 20, 20 + i) for i in range(5)]
    )
    assert same_level[1] < 1.0 < same_level[2]
    with pytest.raises(
        ValueError, match="rounds_a and rounds_b must be the same non-zero number of rounds, got 5 and 4"
    ):
        rounds_ratio_interval(a, b[:4])
