"""What a search optimises: the scalar Optuna sees, and the speed samples the final decision compares."""

from __future__ import annotations

from collections.abc import Sequence

from placetune.compare import latency_rates, request_seconds
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
    return request_seconds(pp, tg, workload.n_prompt, workload.n_gen)


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

