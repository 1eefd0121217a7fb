"""A paired difference over prompts with its confidence interval (Student's t).

Method A and baseline B are scored on the same prompts (and seeds); the claim "A scores x
higher than B" is the mean of the per-prompt differences d_i = a_i - b_i, with the interval

    mean(d) +- t_{(1 + confidence) / 2, n - 1} * sd(d) / sqrt(n)      (sd with n - 1)

Student's t rather than a bootstrap: it is exact for normal differences, close for the
hundreds of prompts of a benchmark, and it needs no random numbers, so anyone recomputes the
same interval. Several images of one prompt (seeds) are averaged into one value per prompt
first: prompts, not images, are the independent units.

The t quantile is found by bisection on the exact two-sided probability P(|T| <= t) for an
integer number of degrees of freedom nu, a finite series in theta = atan(t / sqrt(nu))
(Abramowitz & Stegun 26.7.3 and 26.7.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PairedDifference:
    mean: float        # mean over prompts of a - b
    low: float         # the confidence interval of that mean
    high: float
    std: float         # sample standard deviation of the differences (n - 1)
    n: int             # prompts
    confidence: float  # e.g. 0.95


def t_probability_within(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` degrees of freedom (t >= 0)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:  # (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), (df - 1) / 2 terms
        term, series = 1.0, 0.0
        for k in range((df - 1) // 2):
            series += term
            term *= cos2 * (2 * k + 2) / (2 * k + 3)
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    term, series = 1.0, 0.0  # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df / 2 terms
    for k in range(df // 2):
        series += term
        term *= cos2 * (2 * k + 1) / (2 * k + 2)
    return math.sin(theta) * series


def t_quantile(probability: float, df: int) -> float:
    """The t with P(T <= t) = probability (> 0.5), for an integer df >= 1."""
    if not 0.5 < probability < 1 or df < 1:
        raise ValueError(f"need 0.5 < probability < 1 and df >= 1, got {probability} and {df}")
    within = 2 * probability - 1
    low, high = 0.0, 1.0
    while t_probability_within(high, df) < within:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if t_probability_within(middle, df) < within:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Mean of a - b over prompts (one value per prompt each, same order) and its Student-t interval."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b):
        raise ValueError(f"{len(a)} scores against {len(b)}: pair them prompt by prompt")
    n = len(a)
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 prompts, got {n}")
    if not all(math.isfinite(x) for x in a + b):
        raise ValueError("a score is not finite (PSNR of identical images is +inf): leave such pairs out")
    differences = [x - y for x, y in zip(a, b)]
    mean = sum(differences) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return PairedDifference(mean=mean, low=mean - half, high=mean + half, std=std, n=n, confidence=confidence)
