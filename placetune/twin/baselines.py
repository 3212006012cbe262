"""What a user gets without a search, judged on the twin: --cpu-moe, the best --n-cpu-moe N, and --fit.

Each keeps llama.cpp's default knobs (-ub 512, -b 2048, -t = physical cores, -fa auto, mmap, op
offload on). --fit is llama.cpp's own answer (common/fit.cpp): every layer on the GPU, filled
front to back, the last layers' experts in RAM, with 1 GiB of margin against what really
allocates. The same answer is the search's "llama-fit-params" seed on the twin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from placetune.placement import render_flags
from placetune.space import moe_layers, to_placement
from placetune.twin.capacity import FIT_MARGIN, OK
from placetune.twin.scenarios import Scenario
from placetune.twin.shape import model_shape
from placetune.twin.truth import judge


@dataclass(frozen=True)
class Baseline:
    """One baseline's parameters and its true (SIMULATED, noise-free) result."""

    name: str
    params: dict[str, Any]
    flags: str
    state: str
    latency_s: float  # infinite when it does not load


def llama_defaults(scenario: Scenario) -> dict[str, Any]:
    """llama.cpp's knobs when a user sets none, with every layer on the GPU."""
    n = model_shape(scenario.model).n_layers
    return {"n_gpu_layers": n + 1, "cpu_moe_layers": 0, "ubatch": 512, "batch": 2048,
            "threads": scenario.machine.cores, "flash_attn": "auto", "load_mode": "auto", "no_op_offload": False}


def _experts(n: int, position: str) -> dict[str, Any]:
    return {"cpu_moe_layers": n, "cpu_moe_position": position, "cpu_moe_kinds": "all"} if n else {"cpu_moe_layers": 0}


def evaluate_params(scenario: Scenario, name: str, params: dict[str, Any]) -> Baseline:
    anatomy = model_shape(scenario.model).anatomy
    placement = to_placement(params, anatomy)
    truth = judge(scenario, placement)
    return Baseline(name, params, render_flags(placement), truth.state, truth.latency(scenario.workload))


def fit_params(scenario: Scenario) -> dict[str, Any] | None:
    """--fit's answer as search parameters: the fewest last layers' experts in RAM that leave 1 GiB free."""
    anatomy = model_shape(scenario.model).anatomy
    free = scenario.machine.gpu_free_bytes - FIT_MARGIN
    defaults = llama_defaults(scenario)
    for n in range(len(moe_layers(anatomy)) + 1):
        params = {**defaults, **_experts(n, "last")}
        truth = judge(scenario, to_placement(params, anatomy))
        if truth.state == OK and truth.gpu_bytes <= free:
            return params
    return None


def baselines(scenario: Scenario) -> list[Baseline]:
    """--cpu-moe, the best --n-cpu-moe N (every N tried, as a user would by hand) and --fit."""
    defaults = llama_defaults(scenario)
    n_moe = len(moe_layers(model_shape(scenario.model).anatomy))
    out = [evaluate_params(scenario, "--cpu-moe", {**defaults, **_experts(n_moe, "first")})]
    tried = [evaluate_params(scenario, f"--n-cpu-moe {n}", {**defaults, **_experts(n, "first")})
             for n in range(n_moe + 1)]
    best = min(tried, key=lambda b: b.latency_s)
    out.append(Baseline(f"best --n-cpu-moe ({best.name})", best.params, best.flags, best.state, best.latency_s))
    fit = fit_params(scenario)
    out.append(evaluate_params(scenario, "--fit", fit) if fit is not None
               else Baseline("--fit", {}, "", "oom", math.inf))
    return out
