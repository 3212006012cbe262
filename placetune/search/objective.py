"""What a search optimises: the scalar Optuna sees, and the speed samples the final decision compares."""

from __future__ import annotations

import math
from collections.abc import Sequence

from placetune.compare import latency_rates
from placetune.errors import PlacetuneError
from placetune.runners.base import Workload

OBJECTIVES = ("latency", "tg", "pp", "pareto")


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise PlacetuneError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    return objective


def objective_value(objective: str, pp: float, tg: float, workload: Workload) -> float:
    """The scalar a single-objective search optimises (latency in seconds is minimised, rates maximised)."""
    if objective == "tg":
        return tg
    if objective == "pp":
        return pp
    seconds = 0.0
    if workload.n_prompt:
        seconds += workload.n_prompt / pp if pp > 0 else math.inf
    if workload.n_gen:
        seconds += workload.n_gen / tg if tg > 0 else math.inf
    return seconds


def directions(objective: str) -> list[str]:
    if objective == "pareto":
        return ["maximize", "maximize"]
    return ["minimize" if objective == "latency" else "maximize"]


def speed_samples(objective: str, pp: Sequence[float], tg: Sequence[float], workload: Workload) -> list[float]:
    """Per-repetition speeds (higher is better) that decide between placements.

    latency and pareto: requests per second of the workload; tg and pp: their own token rates.
    """
    if objective == "tg":
        return list(tg)
    if objective == "pp":
        return list(pp)
    return latency_rates(pp, tg, workload.n_prompt, workload.n_gen)


def speed_label(objective: str, workload: Workload) -> str:
    """What speed_samples measures, for tables."""
    if objective in ("tg", "pp"):
        return f"{objective} t/s"
    return f"requests/s (p{workload.n_prompt} + g{workload.n_gen})"
