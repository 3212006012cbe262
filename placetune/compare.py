"""The one statistics module: two sets of speed samples in, their ratio with a confidence interval and a
verdict out. Search, verify, regress, the shootout and every table compare through it.

Speeds are rates (tokens/s, requests/s), so higher is better and a ratio above 1 means faster. Run-time
noise is multiplicative, so samples are compared on a log scale: the ratio is that of the geometric means,
and its interval comes from Welch's t-test on the logs (scipy), which needs no equal spreads and
widens with outliers instead of being fooled by them. Fewer than two samples on a side, or an interval
that contains 1, is "not distinguishable": a difference is only called when it is beyond the noise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from placetune.runners.base import Stats

FASTER, SLOWER, SAME = "faster", "slower", "not distinguishable"
CONFIDENCE = 0.95
NOISY_SPREAD = 0.05  # relative spread above which a measurement is flagged (see the notes on measuring)


@dataclass(frozen=True)
class Comparison:
    """How a's speed relates to b's: ratio = a / b, its confidence interval, and the verdict for a."""

    ratio: float
    low: float
    high: float
    verdict: str
    confidence: float
    n_a: int
    n_b: int

    @property
    def half_width(self) -> float:
        """Half the interval's relative width: about how big a difference this pair could have seen."""
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low <= 0:
            return math.inf
        return (self.high / self.low) ** 0.5 - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """'1.23x [1.10, 1.38] faster', or 'not distinguishable' with the interval."""
        if not math.isfinite(self.low) or not math.isfinite(self.high):
            return f"{self.ratio:.2f}x, {self.verdict} (too few samples)"
        level = "" if math.isclose(self.confidence, CONFIDENCE) else f" ({self.confidence:.1%} interval)"
        return f"{self.ratio:.2f}x [{self.low:.2f}, {self.high:.2f}] {self.verdict}{level}"


def compare(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Comparison:
    """Speed samples a against speed samples b (both rates, higher is better)."""
    la = np.log(np.asarray([x for x in a if x > 0], dtype=float))
    lb = np.log(np.asarray([x for x in b if x > 0], dtype=float))
    if not len(la) or not len(lb):
        return Comparison(math.nan, math.nan, math.nan, SAME, confidence, len(la), len(lb))
    ratio = math.exp(float(la.mean() - lb.mean()))
    if len(la) < 2 or len(lb) < 2:
        return Comparison(ratio, -math.inf, math.inf, SAME, confidence, len(la), len(lb))
    if la.std() == 0 and lb.std() == 0:  # exact figures (a simulation): any difference is real
        verdict = FASTER if ratio > 1 else SLOWER if ratio < 1 else SAME
        return Comparison(ratio, ratio, ratio, verdict, confidence, len(la), len(lb))
    with warnings.catch_warnings():  # one side may be constant (repeated exact figures): a valid, if loud, case
        warnings.simplefilter("ignore", RuntimeWarning)
        interval = stats.ttest_ind(la, lb, equal_var=False).confidence_interval(confidence)
    low, high = math.exp(float(interval.low)), math.exp(float(interval.high))
    verdict = FASTER if low > 1 else SLOWER if high < 1 else SAME
    return Comparison(ratio, low, high, verdict, confidence, len(la), len(lb))


@dataclass(frozen=True)
class Estimate:
    """One rate from its samples: the geometric mean and its confidence interval (how sure the figure is)."""

    center: float
    low: float
    high: float
    n: int

    def describe(self, digits: int = 1) -> str:
        """'1880.0 [1862.1, 1898.0]'; the bounds are left out with fewer than two samples."""
        if not self.n:
            return "no samples"
        if self.n < 2:
            return f"{self.center:.{digits}f} (one sample)"
        return f"{self.center:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def inverse(self) -> Estimate:
        """The estimate of 1/x (seconds per request from requests per second): the interval turns round."""
        if self.n < 2:
            return Estimate(1 / self.center if self.n else math.nan, self.low, self.high, self.n)
        return Estimate(1 / self.center, 1 / self.high, 1 / self.low, self.n)


def estimate(samples: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """The geometric mean of positive rate samples with Student's t interval on their logs, like `compare`."""
    logs = np.log(np.asarray([x for x in samples if x > 0], dtype=float))
    if not len(logs):
        return Estimate(math.nan, math.nan, math.nan, 0)
    center = math.exp(float(logs.mean()))
    if len(logs) < 2:
        return Estimate(center, -math.inf, math.inf, 1)
    sem = float(logs.std(ddof=1)) / math.sqrt(len(logs))
    if sem == 0:
        return Estimate(center, center, center, len(logs))
    low, high = stats.t.interval(confidence, len(logs) - 1, loc=float(logs.mean()), scale=sem)
    return Estimate(center, math.exp(float(low)), math.exp(float(high)), len(logs))


def corrected_confidence(n_comparisons: int, confidence: float = CONFIDENCE) -> float:
    """Bonferroni: the level each of n comparisons needs so that, together, a false 'faster' stays rare.

    A winner picked as the best of several candidates looks better than it is; testing it at this
    stricter level keeps the chance of naming a candidate that is merely lucky at 1 - confidence.
    """
    return 1 - (1 - confidence) / max(n_comparisons, 1)


def clearly_worse(value: float, reference: Sequence[float], margin: float) -> bool:
    """Screening: one speed sample is clearly below the reference samples' median.

    Clearly means by more than `margin` and by more than three times the reference's own relative spread,
    so a noisy best trial does not screen out candidates that are within its noise.
    """
    if not reference or value <= 0:
        return value <= 0
    median = float(np.median(reference))
    spread = relative_spread(reference)
    return value < median * (1 - max(margin, 3 * spread))


def relative_spread(samples: Sequence[float]) -> float:
    """Standard deviation over median of the samples (0 with fewer than two): a runner's Stats.spread."""
    return Stats(tuple(samples), 0).spread


def request_seconds(pp: float, tg: float, n_prompt: int, n_gen: int) -> float:
    """Seconds one request of the workload takes at these rates: n_prompt/pp + n_gen/tg (inf for a rate of 0)."""
    seconds = 0.0
    if n_prompt:
        seconds += n_prompt / pp if pp > 0 else math.inf
    if n_gen:
        seconds += n_gen / tg if tg > 0 else math.inf
    return seconds


def latency_rates(pp: Sequence[float], tg: Sequence[float], n_prompt: int, n_gen: int) -> list[float]:
    """Requests per second of the workload, one per repetition: 1 / request_seconds.

    A runner measures prompt and generation once per repetition, so the i-th pp and tg samples pair up;
    a missing sample counts as a rate of 0.
    """
    n = max(len(pp) if n_prompt else 0, len(tg) if n_gen else 0)
    out = []
    for i in range(n):
        seconds = request_seconds(pp[i] if i < len(pp) else 0.0, tg[i] if i < len(tg) else 0.0, n_prompt, n_gen)
        out.append(1 / seconds if seconds > 0 else math.inf)
    return out
