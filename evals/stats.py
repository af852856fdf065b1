"""Intervals and guardrail verdicts for the pressure-transfer report.

Every strategy is judged against `full` on the same cases, and a verdict is `fail` only when the data rule out the
guardrail: a verdict is taken from a confidence interval, never from a point estimate, so a 1-in-20 miss reads
`inconclusive`, not `fail`. Exact (Clopper-Pearson) intervals are used for counts, because the report's cells are
small (tens of cases) where normal approximations undercover; latency uses a seeded bootstrap, because decode times
are skewed and their spread is all we know about them. Pure Python (math) plus numpy for the bootstrap: scipy is
not a dependency, so the binomial tail is computed here from the regularized incomplete beta function.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

PASS = "pass"
FAIL = "fail"
INCONCLUSIVE = "inconclusive"


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    return float(confidence)


def _check_count(name: str, value: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_resamples(resamples: int) -> int:
    resamples = _check_count("resamples", resamples)
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    return resamples


def _percentile_interval(ratios, confidence: float) -> tuple[float, float]:
    """The bootstrap percentile interval of resampled ratios."""
    alpha = 1.0 - confidence
    low, high = np.quantile(ratios, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def _outcomes(name: str, values: list[bool]) -> list[bool]:
    values = list(values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    for i, v in enumerate(values):
        if not (v is True or v is False or (not isinstance(v, str) and v in (0, 1))):
            raise ValueError(f"{name}[{i}] must be a bool (or 0/1), got {v!r}")
    return [bool(v) for v in values]


# --- the binomial tail, via the regularized incomplete beta function -------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b), evaluated by the modified Lentz method (Numerical Recipes, 3rd ed., 6.4).
    It converges in O(sqrt(max(a, b))) terms where x < (a + 1) / (a + b + 2), the only place it is called."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), 1 <= k <= n: I_p(k, n - k + 1)."""
    return _betainc(k, n - k + 1, p)


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), 0 <= k < n: I_{1-p}(n - k, k + 1), taken directly (no 1 - tiny)."""
    return _betainc(n - k, k + 1, 1.0 - p)


def _solve_increasing(f, target: float) -> float:
    """The p in [0, 1] with f(p) = target for an increasing f, by bisection to about 1e-13 relative (enough for
    points rounded to two decimals; bisection because it cannot diverge, at ~45 evaluations)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def _clopper_pearson(x: int, n: int, tail: float) -> tuple[float, float]:
    """Exact interval for a binomial proportion with `tail` probability cut from each side (Clopper & Pearson,
    Biometrika 1934): the p at which observing >= x (lower end) or <= x (upper end) has probability `tail`.
    n = 0 carries no information: [0, 1]."""
    if n == 0:
        return 0.0, 1.0
    # the ends at x = 0 and x = n have closed forms; using them keeps the textbook values exact
    if x == 0:
        low = 0.0
    elif x == n:
        low = tail ** (1.0 / n)
    else:
        low = _solve_increasing(lambda p: _binom_sf(x, n, p), tail)
    if x == n:
        high = 1.0
    elif x == 0:
        high = 1.0 - tail ** (1.0 / n)
    else:
        high = _solve_increasing(lambda p: -_binom_cdf(x, n, p), -tail)
    return low, high


def proportion_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided Clopper-Pearson interval (Clopper & Pearson, Biometrika 1934) for a proportion such as
    teacher-forced top-1 agreement with `full`.

    Clopper-Pearson rather than Wilson: it never covers less than `confidence`, so a `fail` read from it is never a
    small-sample artifact; it is known to be conservative (wider than Wilson), which can only move verdicts towards
    `inconclusive`. Returns (low, high) as proportions in [0, 1]; 0 of 10 gives (0, 0.3085) at 95 %.
    """
    confidence = _check_confidence(confidence)
    n = _check_count("n", n)
    successes = _check_count("successes", successes)
    if n == 0:
        raise ValueError("n must be >= 1")
    if successes > n:
        raise ValueError(f"successes must be <= n ({n}), got {successes}")
    return _clopper_pearson(successes, n, (1.0 - confidence) / 2)


# --- paired recall: a strategy against `full` on the same cases -----------------------------------------------------


def mcnemar_exact_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: under "no difference" each of the b + c discordant cases is equally likely
    to go either way, so min(b, c) is Binomial(b + c, 1/2); p = min(1, 2 P(X <= min(b, c))). 1 when b + c = 0.
    Exact integer arithmetic, so it is right at any count (McNemar, Psychometrika 1947; exact form as in
    Fagerland, Lydersen & Laake, BMC Med Res Methodol 2013)."""
    b, c = _check_count("b", b), _check_count("c", c)
    m, k = b + c, min(b, c)
    term, total = 1, 1  # C(m, 0)
    for i in range(k):
        term = term * (m - i) // (i + 1)
        total += term
    return min(1.0, 2 * total / 2**m)


def _loss_interval(b: int, c: int, n: int, confidence: float) -> tuple[float, float]:
    """(low, high) of the loss p_b - p_c as proportions; see paired_recall for the method."""
    if c > b:  # computed in one orientation and mirrored, so swapping the two strategies negates it exactly
        low, high = _loss_interval(c, b, n, confidence)
        return -high, -low
    tail = (1.0 - confidence) / 4  # two intervals at 1 - alpha/2 each: Bonferroni, joint coverage >= 1 - alpha
    d_low, d_high = _clopper_pearson(b + c, n, tail)
    t_low, t_high = _clopper_pearson(b, b + c, tail)
    # the loss d * (2t - 1) is bilinear in (d, t), so over the box of the two intervals it peaks at a corner
    corners = [d * (2.0 * t - 1.0) for d in (d_low, d_high) for t in (t_low, t_high)]
    return min(corners), max(corners)


@dataclass(frozen=True)
class PairedRecall:
    """A candidate strategy's recall against `full` on the same n cases.

    b: cases `full` got right and the candidate got wrong; c: the reverse. loss_pts = 100 (b - c) / n, positive when
    the candidate recalls less. [low_pts, high_pts]: its `confidence` interval in points. p_value: exact McNemar.
    """

    n: int
    b: int
    c: int
    loss_pts: float
    low_pts: float
    high_pts: float
    p_value: float
    confidence: float


def paired_recall(full: list[bool], candidate: list[bool], confidence: float = 0.95) -> PairedRecall:
    """Recall loss of `candidate` against `full` (case i of one list is case i of the other), with an exact
    interval and the exact McNemar p-value.

    Interval: the loss is p_b - p_c = d (2t - 1), where d = p_b + p_c is the chance a case is discordant and
    t = p_b / d the chance a discordant case is one the candidate lost. b + c ~ Binomial(n, d) and, given b + c,
    b ~ Binomial(b + c, t), so each gets an exact Clopper-Pearson interval at confidence 1 - alpha/2; by Bonferroni
    both hold together with probability >= 1 - alpha, and the loss interval is the range of d (2t - 1) over them.
    Why this and not the conditional interval (Clopper-Pearson on b / (b + c) scaled by the observed (b + c) / n):
    that one treats the discordance rate as known, so identical outcomes on 3 cases would give [0, 0] and `pass`,
    and one lost case of 50 would pass a 2-point guardrail. Here identical outcomes give [-u, u] with u the exact
    upper bound of a 0-of-n rate, which shrinks with n: at 95 % it is <= 2 points from n = 217 on
    (min_cases_for_pass). The price is width: the interval is conservative, which only moves verdicts towards
    `inconclusive`. It excludes 0 only when the exact McNemar p < alpha / 2, so a `fail` against a limit >= 0
    always comes with a significant McNemar test.
    """
    confidence = _check_confidence(confidence)
    full, candidate = _outcomes("full", full), _outcomes("candidate", candidate)
    if len(full) != len(candidate):
        raise ValueError(
            f"full and candidate must have the same length (the same cases), got {len(full)} and {len(candidate)}"
        )
    n = len(full)
    b = sum(f and not k for f, k in zip(full, candidate))
    c = sum(k and not f for f, k in zip(full, candidate))
    low, high = _loss_interval(b, c, n, confidence)
    return PairedRecall(
        n=n,
        b=b,
        c=c,
        loss_pts=100.0 * (b - c) / n,
        low_pts=100.0 * low,
        high_pts=100.0 * high,
        p_value=mcnemar_exact_p(b, c),
        confidence=confidence,
    )


def min_cases_for_pass(limit_pts: float = 2.0, confidence: float = 0.95) -> int:
    """The fewest cases on which identical outcomes (b = c = 0) `pass` a recall-loss guardrail of `limit_pts`
    with paired_recall's interval: its upper end is then 1 - (alpha/4)^(1/n), so
    n = ceil(ln(alpha/4) / ln(1 - limit/100)); 217 for 2 points at 95 %, 86 for 5 points. A report cell with fewer
    cases can at best be `inconclusive`, however well the strategy does."""
    confidence = _check_confidence(confidence)
    if isinstance(limit_pts, bool) or not isinstance(limit_pts, (int, float)) or not 0 < limit_pts < 100:
        raise ValueError(f"limit_pts must be a number in (0, 100), got {limit_pts!r}")
    n = max(1, math.ceil(math.log((1.0 - confidence) / 4) / math.log1p(-limit_pts / 100)))
    # the closed form is exact in real numbers; settle floating-point ties against the interval itself
    while n > 1 and 100.0 * _loss_interval(0, 0, n - 1, confidence)[1] <= limit_pts:
        n -= 1
    while 100.0 * _loss_interval(0, 0, n, confidence)[1] > limit_pts:
        n += 1
    return n


# --- verdicts ------------------------------------------------------------------------------------------------------


def verdict(low: float, high: float, limit: float, higher_is_better: bool = False) -> str:
    """`pass`, `fail` or `inconclusive` for a guardrail, judged by the whole interval [low, high], never by the
    point estimate, so a difference the data cannot tell from the limit is `inconclusive`, not `fail`.

    Lower is better (recall loss <= 2 points, decode slowdown <= 15 %): pass when high <= limit, fail when
    low > limit. Higher is better (top-1 agreement >= 0.98): pass when low >= limit, fail when high < limit.
    A value exactly at the limit meets it in both directions. The report may print `inconclusive` as
    `inconclusive (n too small)`: more cases (or repeats) is what narrows the interval.
    """
    for name, value in (("low", low), ("high", high), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if low > high:
        raise ValueError(f"low must be <= high, got low={low} and high={high}")
    if higher_is_better:
        return PASS if low >= limit else FAIL if high < limit else INCONCLUSIVE
    return PASS if high <= limit else FAIL if low > limit else INCONCLUSIVE


# --- latency: ratio of medians of repeated measurements ------------------------------------------------------------


def _samples(name: str, values: list[float]) -> np.ndarray:
    try:
        arr = np.asarray(list(values), dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty list of numbers")
    if not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        raise ValueError(f"{name} must hold finite positive times")
    return arr


def ratio_interval(
    samples_a: list[float], samples_b: list[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Ratio of medians median(b) / median(a) (e.g. decode ms per step of a strategy over `full`) with a bootstrap
    percentile interval (Efron & Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13).

    Medians because step times have a long right tail (a stray page fault or GC pause should not move the verdict);
    a bootstrap because the medians' ratio has no convenient exact distribution. The two lists are resampled
    independently (they are separate runs, not pairs) with numpy's PCG64 seeded by `seed`, so the interval is the
    same every run. Returns (ratio, low, high); the change in percent is 100 (ratio - 1) and its interval
    100 (low - 1), 100 (high - 1), to be judged with verdict(..., limit=15).
    """
    confidence = _check_confidence(confidence)
    a, b = _samples("samples_a", samples_a), _samples("samples_b", samples_b)
    resamples = _check_resamples(resamples)
    seed = _check_count("seed", seed)
    rng = np.random.default_rng(seed)
    med_a = np.median(a[rng.integers(0, a.size, size=(resamples, a.size))], axis=1)
    med_b = np.median(b[rng.integers(0, b.size, size=(resamples, b.size))], axis=1)
    return float(np.median(b) / np.median(a)), *_percentile_interval(med_b / med_a, confidence)


def rounds_ratio_interval(
    rounds_a: list[list[float]],
    rounds_b: list[list[float]],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Ratio of medians median(b) / median(a) over every step of every round, with a bootstrap interval that resamples
    whole rounds, paired: round i of `a` and round i of `b` ran one after the other (a benchmark's interleaved passes).

    Steps of one pass share its cache, its allocator state and the machine's mood of that minute, so they are not
    independent draws: resampling steps (`ratio_interval`) gives intervals far narrower than the spread between runs
    of the same benchmark. Resampling rounds carries that spread; pairing them cancels drift common to both.
    Returns (ratio, low, high); with a single round the interval is that round's ratio alone.
    """
    confidence = _check_confidence(confidence)
    if not rounds_a or len(rounds_a) != len(rounds_b):
        raise ValueError(
            f"rounds_a and rounds_b must be the same non-zero number of rounds, got {len(rounds_a)} and {len(rounds_b)}"
        )
    a = [_samples(f"rounds_a[{i}]", r) for i, r in enumerate(rounds_a)]
    b = [_samples(f"rounds_b[{i}]", r) for i, r in enumerate(rounds_b)]
    resamples = _check_resamples(resamples)
    rng = np.random.default_rng(_check_count("seed", seed))
    ratios = []
    for _ in range(resamples):
        chosen = rng.integers(0, len(a), size=len(a))
        ratios.append(
            np.median(np.concatenate([b[i] for i in chosen])) / np.median(np.concatenate([a[i] for i in chosen]))
        )
    return float(np.median(np.concatenate(b)) / np.median(np.concatenate(a))), *_percentile_interval(ratios, confidence)


def paired_mean_ratio_interval(
    a: list[float], b: list[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Ratio of means mean(b) / mean(a) over pairs (a[i], b[i]) measured on the same case (e.g. a strategy's output
    tokens over `full`'s on the same prompt), with a bootstrap percentile interval that resamples whole pairs, so what
    a case shares between the two (a prompt that invites a long answer) cancels. Returns (ratio, low, high)."""
    confidence = _check_confidence(confidence)
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 1 or x.size == 0 or x.shape != y.shape or not x.sum() > 0:
        raise ValueError(f"a and b must be as many numbers, a's summing above 0, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(_check_count("seed", seed))
    chosen = rng.integers(0, x.size, size=(_check_resamples(resamples), x.size))
    totals = x[chosen].sum(axis=1)
    ratios = y[chosen].sum(axis=1) / np.where(totals > 0, totals, np.nan)
    return float(y.sum() / x.sum()), *_percentile_interval(ratios[np.isfinite(ratios)], confidence)
