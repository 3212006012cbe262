"""What a user gets without a search, judged on the twin: --cpu-moe, the best --n-cpu-moe N, and --fit; with
several cards also the per-card -ot recipe.

Each keeps llama.cpp's default knobs (-ub 512, -b 2048, -t = physical cores, -fa auto, mmap, op
offload on). --fit is llama.cpp's own answer (common/fit.cpp): every layer on the cards, filled
front to back, the last layers' experts in RAM, with 1 GiB of margin per card against what really
allocates. The same answer is the search's "llama-fit-params" seed on the twin. With several cards
the layers split evenly (-ts 1,1) for the recipes people write by hand (llama.cpp issues 15263,
15136): --n-cpu-moe, which keeps every card-resident expert on the cards holding the last layers,
or one -ot rule per card keeping the experts of that card's first k layers, the rest in RAM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from placetune.device_bytes import layer_devices
from placetune.memory import DEFAULT_BATCH, DEFAULT_UBATCH
from placetune.monotone import first_true, last_true
from placetune.placement import ALL_LAYERS, ExpertRule, Placement, render_flags
from placetune.space import moe_layers, to_placement
from placetune.twin.capacity import FIT_MARGIN, OK
from placetune.twin.scenarios import Scenario
from placetune.twin.shape import model_shape
from placetune.twin.truth import judge

# Baseline names before any " (detail)", in the benchmark table's column order
CPU_MOE, N_CPU_MOE, PER_CARD, FIT = "--cpu-moe", "best --n-cpu-moe", "best per-card -ot", "--fit"


@dataclass(frozen=True)
class Baseline:
    """One baseline's parameters (or flags) and its true (SIMULATED, noise-free) result."""

    name: str
    params: dict[str, Any]
    flags: str
    state: str
    latency_s: float  # infinite when it does not load


def llama_defaults(scenario: Scenario) -> dict[str, Any]:
    """llama.cpp's knobs when a user sets none, with every layer on the GPU."""
    n = model_shape(scenario.model).n_layers
    return {"n_gpu_layers": n + 1, "cpu_moe_layers": 0, "ubatch": DEFAULT_UBATCH, "batch": DEFAULT_BATCH,
            "threads": scenario.machine.cores, "flash_attn": "auto", "load_mode": "auto", "no_op_offload": False}


def _experts(n: int, position: str) -> dict[str, Any]:
    return {"cpu_moe_layers": n, "cpu_moe_position": position, "cpu_moe_kinds": "all"} if n else {"cpu_moe_layers": 0}


def evaluate_params(scenario: Scenario, name: str, params: dict[str, Any]) -> Baseline:
    anatomy = model_shape(scenario.model).anatomy
    placement = to_placement(params, anatomy)
    truth = judge(scenario, placement)
    return Baseline(name, params, render_flags(placement), truth.state, truth.latency(scenario.workload))


def evaluate_placement(scenario: Scenario, name: str, placement: Placement) -> Baseline:
    truth = judge(scenario, placement)
    return Baseline(name, {}, render_flags(placement), truth.state, truth.latency(scenario.workload))


def fits_with_margin(scenario: Scenario, placement: Placement) -> bool:
    """Loads, and leaves --fit's margin free on every card (by what really allocates)."""
    truth = judge(scenario, placement)
    return truth.state == OK and all(truth.device_bytes[dev] <= gpu.free_bytes - FIT_MARGIN
                                     for dev, gpu in zip(scenario.machine.devices, scenario.machine.gpus, strict=True))


def fit_params(scenario: Scenario) -> dict[str, Any] | None:
    """--fit's answer on one card as search parameters: the fewest last layers' experts in RAM that leave 1 GiB."""
    anatomy = model_shape(scenario.model).anatomy
    defaults = llama_defaults(scenario)

    def params(n: int) -> dict[str, Any]:
        return {**defaults, **_experts(n, "last")}

    n = first_true(lambda n: fits_with_margin(scenario, to_placement(params(n), anatomy)), 0,
                   len(moe_layers(anatomy)))
    return None if n is None else params(n)


def fit_placement(scenario: Scenario) -> Placement | None:
    """--fit's answer as llama.cpp prints it: on one card fit_params'; on several, common/fit.cpp's layout.

    On several cards llama.cpp first puts every layer's dense part on the cards with all experts in RAM, then
    fills the cards front to back with whole layers: the first card takes the most whole layers that fit, the
    next card the following layers, whole ones first and the rest with their experts in RAM (-ts counts each
    card's layers). Left out: its last step, which squeezes part of one more layer's experts onto a card.
    """
    shape = model_shape(scenario.model)
    if not scenario.machine.more_gpus:
        params = fit_params(scenario)
        return None if params is None else to_placement(params, shape.anatomy)
    n = shape.n_layers
    devices = scenario.machine.devices
    base = to_placement(llama_defaults(scenario), shape.anatomy)

    def layout(whole: list[int]) -> Placement:
        """Each card's layer count (the output head on the last) and how many of its first layers are whole."""
        counts = [*whole[:-1], n + 1 - sum(whole[:-1])]
        split = tuple(float(c) for c in counts)
        home = layer_devices(n, ALL_LAYERS, devices, split)
        start = {dev: home.index(dev) for dev in devices if dev in home}
        in_ram = tuple(layer for layer in moe_layers(shape.anatomy)
                       if home[layer] in start and layer - start[home[layer]] >= whole[devices.index(home[layer])])
        overrides = (ExpertRule(layers=in_ram),) if in_ram else ()
        return replace(base, n_gpu_layers=ALL_LAYERS, tensor_split=split, overrides=overrides)

    whole: list[int] = []  # whole layers on each card filled so far; the cards after it hold the rest, dense only
    for i in range(len(devices)):
        later = [0] * (len(devices) - i - 1)

        def fits(k: int) -> bool:
            return fits_with_margin(scenario, layout([*whole, k, *later]))  # noqa: B023 (used in this iteration only)

        if not fits(0):
            return None  # the dense parts alone do not fit where llama.cpp's first step puts them
        rest = n + 1 - sum(whole)
        high = rest if not later else rest - 1  # the last card keeps at least the output head
        whole.append(last_true(fits, 0, high) or 0)  # fits(0) holds here
    return layout(whole)


def baselines(scenario: Scenario) -> list[Baseline]:
    """--cpu-moe, the best --n-cpu-moe N (every N tried, as a user would by hand), on several cards the best
    per-card -ot (every k tried), and --fit."""
    if scenario.machine.more_gpus:
        return _multi_baselines(scenario)
    defaults = llama_defaults(scenario)
    n_moe = len(moe_layers(model_shape(scenario.model).anatomy))
    out = [evaluate_params(scenario, CPU_MOE, {**defaults, **_experts(n_moe, "first")})]
    tried = [evaluate_params(scenario, f"--n-cpu-moe {n}", {**defaults, **_experts(n, "first")})
             for n in range(n_moe + 1)]
    out.append(_best(N_CPU_MOE, tried))
    fit = fit_params(scenario)
    out.append(evaluate_params(scenario, FIT, fit) if fit is not None
               else Baseline(FIT, {}, "", "oom", math.inf))
    return out


def _best(name: str, tried: list[Baseline]) -> Baseline:
    best = min(tried, key=lambda b: b.latency_s)
    return Baseline(f"{name} ({best.name})", best.params, best.flags, best.state, best.latency_s)


def _multi_baselines(scenario: Scenario) -> list[Baseline]:
    """The hand-written recipes on an even split (seeds/even_split.py's, every count tried), and --fit."""
    shape = model_shape(scenario.model)
    devices = scenario.machine.devices
    layers = moe_layers(shape.anatomy)
    even = tuple(1.0 for _ in devices)
    base = replace(to_placement(llama_defaults(scenario), shape.anatomy), n_gpu_layers=ALL_LAYERS,
                   tensor_split=even, split_mode="layer")

    def first_in_ram(n: int) -> Placement:
        return replace(base, overrides=(ExpertRule(layers=tuple(layers[:n])),) if n else ())

    home = layer_devices(shape.n_layers, ALL_LAYERS, devices, even)
    per_card = {d: [layer for layer in layers if home[layer] == d] for d in devices}
    most = max(len(v) for v in per_card.values())

    def kept_per_card(k: int) -> Placement:
        own = tuple(ExpertRule(layers=tuple(ls[:k]), buft=d) for d, ls in per_card.items() if ls[:k])
        return replace(base, overrides=(*own, ExpertRule(layers=None)) if k < most else own)

    out = [evaluate_placement(scenario, CPU_MOE, first_in_ram(len(layers)))]
    out.append(_best(N_CPU_MOE, [evaluate_placement(scenario, f"--n-cpu-moe {n}", first_in_ram(n))
                                 for n in range(len(layers) + 1)]))
    out.append(_best(PER_CARD, [evaluate_placement(scenario, f"{k} per card", kept_per_card(k))
                                for k in range(most + 1)]))
    fit = fit_placement(scenario)
    out.append(evaluate_placement(scenario, FIT, fit) if fit is not None else Baseline(FIT, {}, "", "oom", math.inf))
    return out
