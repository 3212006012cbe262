"""The one statistics module: ratios with intervals, verdicts only beyond the noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from placetune.compare import (
    FASTER,
    SAME,
    SLOWER,
    clearly_worse,
    compare,
    corrected_confidence,
    latency_rates,
)


def noisy(value: float, n: int, sigma: float, seed: int) -> list[float]:
    return list(value * np.random.default_rng(seed).lognormal(0.0, sigma, n))


def test_a_real_difference_is_called_and_its_interval_holds_the_truth() -> None:
    c = compare(noisy(110, 10, 0.03, 1), noisy(100, 10, 0.03, 2))
    assert c.verdict == FASTER and c.low < 1.10 < c.high and c.low > 1
    assert compare(noisy(100, 10, 0.03, 2), noisy(110, 10, 0.03, 1)).verdict == SLOWER


def test_equal_speeds_are_not_distinguishable_almost_always() -> None:
    calls = [compare(noisy(100, 6, 0.05, s), noisy(100, 6, 0.05, 1000 + s)).verdict for s in range(200)]
    assert calls.count(SAME) >= 180  # 95% intervals: about 5% false calls, never a systematic one


def test_outliers_widen_the_interval_instead_of_faking_a_win() -> None:
    a = [100, 101, 99, 100, 60]  # one disturbed run
    b = [98, 99, 97, 98, 99]
    assert compare(a, b).verdict == SAME


def test_too_few_samples_and_exact_figures() -> None:
    c = compare([120.0], [100.0])
    assert c.verdict == SAME and c.ratio == pytest.approx(1.2) and math.isinf(c.half_width)
    assert compare([120.0, 120.0], [100.0, 100.0]).verdict == FASTER  # a simulation's exact figures
    assert compare([], [1.0]).verdict == SAME


def test_bonferroni_and_screening_and_latency() -> None:
    assert corrected_confidence(1) == pytest.approx(0.95) and corrected_confidence(5) == pytest.approx(0.99)
    assert clearly_worse(80.0, [100.0, 101.0, 99.0], margin=0.10)
    assert not clearly_worse(92.0, [100.0, 101.0, 99.0], margin=0.10)
    assert not clearly_worse(80.0, [100.0, 130.0, 75.0], margin=0.10)  # a noisy best screens nothing out
    assert latency_rates([100.0], [10.0], 100, 10) == [pytest.approx(0.5)]  # 1 s + 1 s per request


def test_a_figure_carries_its_interval() -> None:
    from placetune.compare import estimate

    e = estimate([100.0, 110.0, 90.0, 105.0])
    assert e.low < e.center < e.high and e.n == 4
    assert math.isclose(e.center, math.exp(sum(map(math.log, (100.0, 110.0, 90.0, 105.0))) / 4))
    seconds = e.inverse()  # requests per second -> seconds per request: the bounds turn round
    assert math.isclose(seconds.low, 1 / e.high) and math.isclose(seconds.high, 1 / e.low)
    assert estimate([5.0]).describe() == "5.0 (one sample)" and estimate([]).describe() == "no samples"
    assert estimate([3.0, 3.0]).describe() == "3.0 [3.0, 3.0]"  # exact figures (a simulation)


def test_a_wider_interval_says_its_level() -> None:
    assert "(98.3% interval)" in compare([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], confidence=1 - 0.05 / 3).describe()
    assert "interval)" not in compare([2.0, 2.1, 1.9], [1.0, 1.1, 0.9]).describe()
