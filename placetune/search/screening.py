"""Screening: a sampled trial measures one repetition first, and gets the rest only if it could still be the best.

Most sampled placements are clearly slower than the best trial so far; one repetition says so at a fraction
of the cost. Clearly means by more than SCREEN_MARGIN and by more than three times the best trial's own
spread (compare.clearly_worse), so a noisy best trial does not cut candidates within its noise. Seeds are
never screened (the caller passes no reference): one repetition is too little to judge what they stand for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from placetune.compare import clearly_worse
from placetune.placement import Placement
from placetune.runners.base import Measurement, Runner, Stats, Workload
from placetune.search.objective import speed_samples

SCREEN_MARGIN = 0.10  # a screened trial must be this much slower than the best (or 3x its spread) to be cut


@dataclass(frozen=True)
class ScreenedOut:
    """A trial cut after its first repetition: that repetition, its speed and the best trial's median."""

    measurement: Measurement
    speed: float
    reference_median: float


def measure_screened(runner: Runner, model: Path, placement: Placement, workload: Workload, objective: str,
                     reference: Sequence[float] | None) -> Measurement | ScreenedOut:
    """All repetitions of the placement, or ScreenedOut after the first when it is clearly slower than
    `reference` (the best trial's speed samples; None: measure everything)."""
    if not reference or workload.repetitions <= 1:
        return runner.measure(model, placement, workload)
    first = runner.measure(model, placement, replace(workload, repetitions=1))
    if not first.ok:
        return first
    speed = speed_samples(objective, first.pp.samples, first.tg.samples, workload)[0]
    if clearly_worse(speed, reference, SCREEN_MARGIN):
        return ScreenedOut(first, speed, float(np.median(reference)))
    # A runner that kept the model loaded is already warm from the first repetition.
    warm = getattr(runner, "reuse", False)
    rest = runner.measure(model, placement, replace(workload, repetitions=workload.repetitions - 1,
                                                    warmups=0 if warm else workload.warmups))
    if not rest.ok:
        return rest
    return replace(rest, pp=Stats(first.pp.samples + rest.pp.samples, rest.pp.tokens_per_sample),
                   tg=Stats(first.tg.samples + rest.tg.samples, rest.tg.tokens_per_sample),
                   measure_s=rest.measure_s + first.measure_s, wall_s=rest.wall_s + first.wall_s)
