"""The final round and the decision: the top trials and every baseline that fits, re-measured interleaved,
then a winner only when it is faster than the best baseline beyond the noise.

Every ratio shown or written comes from these rounds (A B C D, A B C D, ...), where drift hits every
contender alike; nothing divides a final median by a search-phase one. The winner is the best candidate
when `compare` says it is faster than the best baseline at a confidence corrected for how many
candidates were in the running; otherwise the baseline is named, and the output says plainly that
nothing beat it. That is an honest result, not a failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from placetune.compare import FASTER, NOISY_SPREAD, Comparison, compare, corrected_confidence, relative_spread
from placetune.placement import Placement
from placetune.runners.base import Measurement, Runner, Stats, Workload
from placetune.search.objective import speed_samples
from placetune.search.seeds import BASELINE

SEARCH = "search"  # role of a trial the sampler proposed
DROPPED = "dropped"  # status of a trial the first final round left out of the later ones
FIRST_ROUND_WIDTH = 2  # the first final round measures this many times --top-k trials


@dataclass
class Contender:
    """One placement in the final round: who it is, and every sample the round gave it."""

    name: str
    role: str
    trial: int
    placement: Placement
    flags: str
    pp: list[float] = field(default_factory=list)
    tg: list[float] = field(default_factory=list)
    last: Measurement | None = None
    status: str = "ok"
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.pp or self.tg)

    @property
    def is_baseline(self) -> bool:
        return self.role == BASELINE

    def speeds(self, objective: str, workload: Workload) -> list[float]:
        return speed_samples(objective, self.pp, self.tg, workload)

    def typical(self, objective: str, workload: Workload) -> float:
        """Geometric mean of the speeds: what `compare`'s ratios are ratios of."""
        s = [x for x in self.speeds(objective, workload) if x > 0 and math.isfinite(x)]
        return float(np.exp(np.mean(np.log(s)))) if s else 0.0

    def measurement(self, workload: Workload) -> Measurement:
        """The final round's samples as one Measurement (the last run's metadata, every run's samples)."""
        base = self.last or Measurement(runner="", status=self.status, reason=self.reason)
        return replace(base, pp=Stats(tuple(self.pp), workload.n_prompt), tg=Stats(tuple(self.tg), workload.n_gen))


def run_rounds(runner: Runner, model: Path, contenders: Sequence[Contender], workload: Workload, rounds: int,
               on_measured: Callable[[Contender, int], None] | None = None, keep: int | None = None,
               objective: str = "latency") -> None:
    """Measure each contender once per round, in the same order every round; a failure drops it.

    keep: after the first of several rounds, only the `keep` fastest search trials (by that round) go on,
    beside every baseline. The search phase measured each trial once, in its own load, so its top few are
    partly luck; a wider first round, on which they are measured side by side, picks the finalists better.
    """
    for r in range(rounds):
        if r == 1 and keep is not None:
            trials = sorted((c for c in contenders if c.ok and not c.is_baseline),
                            key=lambda c: c.typical(objective, workload), reverse=True)
            for c in trials[keep:]:
                c.status, c.reason = DROPPED, f"not among the {keep} fastest trials of the first final round"
        for c in contenders:
            if c.status != "ok":
                continue
            m = runner.measure(model, c.placement, workload)
            if not m.ok:
                c.status, c.reason = m.status, m.reason
            else:
                c.pp += m.pp.samples
                c.tg += m.tg.samples
                c.last = m
            if on_measured:
                on_measured(c, r)


@dataclass
class Row:
    """One contender against the winner, as the summary table and best.json show it."""

    name: str
    role: str
    trial: int | None
    flags: str
    status: str
    reason: str
    pp: Stats | None
    tg: Stats | None
    vs_winner: dict[str, Comparison]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "trial": self.trial, "flags": self.flags,
                "status": self.status, "reason": self.reason,
                "pp": self.pp.to_dict() if self.pp else None, "tg": self.tg.to_dict() if self.tg else None,
                "vs_winner": {k: v.to_dict() for k, v in self.vs_winner.items()}}


@dataclass
class Decision:
    """Who won, against which baseline, by how much, and whether that is beyond the noise."""

    winner: Contender
    best_candidate: Contender | None
    best_baseline: Contender | None
    versus_baseline: Comparison | None
    beat_baseline: bool
    message: str
    noise_warning: str | None
    rows: list[Row]

    def to_dict(self) -> dict[str, Any]:
        return {
            "winner": self.winner.name, "winner_role": self.winner.role, "winner_trial": self.winner.trial,
            "best_candidate": self.best_candidate.name if self.best_candidate else None,
            "best_baseline": self.best_baseline.name if self.best_baseline else None,
            "versus_baseline": self.versus_baseline.to_dict() if self.versus_baseline else None,
            "beat_baseline": self.beat_baseline, "message": self.message, "noise_warning": self.noise_warning,
        }


def decide(contenders: Sequence[Contender], objective: str, workload: Workload, min_pp: float | None = None,
           unmeasured: Sequence[Row] = ()) -> Decision | None:
    """Name the winner from the final round; None when no contender was measured successfully.

    unmeasured: baselines that could not run (predicted not to fit, crashed), listed with their reason.
    """
    measured = [c for c in contenders if c.ok]
    eligible = [c for c in measured if min_pp is None or (c.pp and float(np.median(c.pp)) >= min_pp)]
    if not eligible:
        return None

    def typical(c: Contender) -> float:
        return c.typical(objective, workload)

    candidates = sorted((c for c in eligible if not c.is_baseline), key=typical, reverse=True)
    baselines = sorted((c for c in eligible if c.is_baseline), key=typical, reverse=True)
    best_candidate = candidates[0] if candidates else None
    best_baseline = baselines[0] if baselines else None
    versus = None
    noise = None
    if best_candidate and best_baseline:
        confidence = corrected_confidence(len(candidates))
        versus = compare(best_candidate.speeds(objective, workload), best_baseline.speeds(objective, workload),
                         confidence)
        beat = versus.verdict == FASTER
        winner = best_candidate if beat else best_baseline
        # The table's rows are 95% intervals; this one is wider when several trials ran for the title.
        wider = f", widened for the {len(candidates)} trials in the final round" if len(candidates) > 1 else ""
        if beat:
            message = f"{best_candidate.name} beats {best_baseline.name}: {versus.describe()}{wider}"
        else:
            message = (f"nothing beat {best_baseline.name} beyond the noise (best trial: {versus.describe()}{wider}); "
                       "it is the placement to use")
        if not beat and versus.ratio > 1 and versus.half_width > NOISY_SPREAD:
            noise = (f"the measurements are too noisy to separate {best_candidate.name} from {best_baseline.name} "
                     f"(interval ±{versus.half_width:.0%}); add --reps or --final-rounds, or close other programs")
    elif best_candidate:
        winner, beat = best_candidate, False
        message = f"{best_candidate.name} wins; no baseline could be measured to compare it with"
    else:
        assert best_baseline is not None
        winner, beat = best_baseline, False
        message = f"no search trial finished; {best_baseline.name} is the placement to use"
    spreads = [relative_spread(c.speeds(objective, workload)) for c in measured]
    if noise is None and spreads and max(spreads) > NOISY_SPREAD:
        noise = (f"some final measurements spread by up to {max(spreads):.0%}; differences smaller than that are "
                 "not real. Close other programs, or add --reps/--final-rounds")
    ordered = sorted(contenders, key=lambda c: (c is not winner, -typical(c)))
    rows = [_row(c, winner, objective, workload) for c in ordered]
    return Decision(winner, best_candidate, best_baseline, versus, beat, message, noise, rows + list(unmeasured))


def _row(c: Contender, winner: Contender, objective: str, workload: Workload) -> Row:
    vs: dict[str, Comparison] = {}
    if c.ok:
        vs["objective"] = compare(winner.speeds(objective, workload), c.speeds(objective, workload))
        if c.pp and winner.pp:
            vs["pp"] = compare(winner.pp, c.pp)
        if c.tg and winner.tg:
            vs["tg"] = compare(winner.tg, c.tg)
    pp = Stats(tuple(c.pp), workload.n_prompt) if c.pp else None
    tg = Stats(tuple(c.tg), workload.n_gen) if c.tg else None
    role = "winner" if c is winner else c.role
    return Row(c.name, role, c.trial, c.flags, c.status, c.reason, pp, tg, vs)


def pareto_front(contenders: Sequence[Contender]) -> list[Contender]:
    """Measured contenders that no other beats on both pp and tg medians (one per placement)."""
    measured = [c for c in contenders if c.ok and c.pp and c.tg]
    med = {id(c): (float(np.median(c.pp)), float(np.median(c.tg))) for c in measured}
    front = []
    for c in measured:
        pp, tg = med[id(c)]
        dominated = any(med[id(o)][0] >= pp and med[id(o)][1] >= tg and med[id(o)] != (pp, tg) for o in measured)
        if not dominated and all(f.flags != c.flags for f in front):
            front.append(c)
    return front
