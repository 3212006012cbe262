"""The one adapter between the twin and placetune's search: run the current search on a scenario.

The search takes the twin's machine directly: a synthetic `Machine` (one CUDA device per card with
its free memory, no device or RAM probe), the twin's bandwidths for the roofline seed, and the
twin's --fit answer for the llama-fit-params seed (no binary runs). With two cards the search picks
search_spaces/multi.toml itself, as it does on a real machine with two accelerators. Everything
that knows how the search is built lives here: the rest of the twin never imports placetune.search.

The study lives in Optuna's in-memory storage: one worker, nothing to resume, and SQLite's per-attribute
commits would otherwise take most of a simulated trial's time.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import optuna

from placetune.anatomy import Anatomy
from placetune.fit import FitAnswer
from placetune.hardware import LlamaDevice, Machine
from placetune.placement import render_flags
from placetune.predict import Bandwidth
from placetune.search import Search, serving_for
from placetune.search.config import STRATEGIES, SearchConfig
from placetune.search.seeds import Seed, SeedContext, SeedSource
from placetune.search.seeds.by_hand import ByHand
from placetune.search.seeds.even_split import EvenSplit
from placetune.search.seeds.filled import FilledDefaults
from placetune.search.seeds.fit import LlamaFitParams
from placetune.search.seeds.roofline import Roofline
from placetune.space import SearchSpace, resolve_space
from placetune.storage import MEMORY_STORAGE
from placetune.twin.baselines import fit_placement
from placetune.twin.runner import LABEL, TwinRunner
from placetune.twin.scenarios import Scenario
from placetune.twin.shape import model_shape

__all__ = ["STRATEGIES", "SearchRun", "TrialRecord", "run_search", "space_for", "twin_machine"]
RAM_PROBE_SHARE = 0.75  # what placetune's RAM probe reads of a machine's theoretical bandwidth

@dataclass(frozen=True)
class TrialRecord:
    """One finished trial as the search saw it, with the twin's clock after it."""

    number: int
    state: str  # COMPLETE or PRUNED (Optuna's words)
    value: float | None  # the measured objective (latency s) of a complete, measured trial
    duplicate: bool  # answered from an earlier trial of the same placement
    placement: dict[str, Any] | None
    reason: str
    clock_s: float


@dataclass(frozen=True)
class SearchRun:
    """What one search did and named: every trial in order, the winner, and the simulated time spent."""

    trials: list[TrialRecord]
    winner: dict[str, Any] | None  # the named winner's placement (Placement.to_dict), None if none
    clock_s: float  # simulated seconds: every load, measurement and the final re-measure
    load_s: float  # of which loading models
    notes: list[str]
    baselines: list[dict[str, Any]] | None = None  # every baseline the final round measured (Placement.to_dict)
    beat_baseline: bool = False  # the search named a trial over the best of them, beyond the noise


def twin_machine(scenario: Scenario) -> Machine:
    """The scenario's machine as placetune's hardware record, without probing anything."""
    m = scenario.machine
    return Machine(
        hostname="twin", cpu_model=f"{m.cpu_name} ({LABEL})", physical_cores=m.cores, logical_cores=2 * m.cores,
        ram_total_bytes=m.ram_bytes, ram_available_bytes=m.ram_bytes,
        llama_devices=[LlamaDevice("CPU", m.cpu_name, "CPU", m.ram_bytes, m.ram_bytes),
                       *(LlamaDevice(dev, gpu.name, dev, gpu.free_bytes, gpu.total_bytes)
                         for dev, gpu in zip(m.devices, m.gpus, strict=True))],
        llama_build={"runner": LABEL, "machine": m.name},
    )


@functools.cache
def _twin_fit(scenario: Scenario) -> FitAnswer | None:
    """The twin's --fit answer as llama-fit-params would print it (no binary runs)."""
    placement = fit_placement(scenario)
    if placement is None:
        return None
    return FitAnswer(placement, f"twin --fit: {render_flags(placement)}")


def space_for(anatomy: Anatomy, devices: Sequence[str]) -> SearchSpace:
    """The space the search would pick on the twin's cards (moe on one, multi on several; env knobs included)."""
    space = resolve_space(None, anatomy, devices)
    space.for_devices(devices)
    return space


def run_search(scenario: Scenario, seed: int, n_trials: int, strategy: str = "staged") -> SearchRun:
    """placetune's search on the scenario: seeds included, n_trials trials, then its final re-measure.

    strategy: placetune.search.config.STRATEGIES (the staged walk, or TPE alone, to compare them)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    shape = model_shape(scenario.model)
    machine = twin_machine(scenario)
    runner = TwinRunner(scenario, seed=seed)
    records: list[TrialRecord] = []

    def on_trial(trial: optuna.trial.FrozenTrial, search: Search) -> None:
        attrs = trial.user_attrs
        reason = attrs.get("reason", "")
        records.append(TrialRecord(
            number=trial.number, state=trial.state.name,
            value=trial.values[0] if trial.values else None, duplicate="duplicate_of" in attrs,
            placement=attrs.get("placement"), reason=reason, clock_s=runner.clock_s))

    anatomy = shape.anatomy
    m = scenario.machine
    bandwidths = {"CPU": Bandwidth(m.ram_bw_gbs * RAM_PROBE_SHARE, f"twin RAM probe ({LABEL})"),
                  **{dev: Bandwidth(gpu.bw_gbs, f"twin spec sheet ({LABEL})")
                     for dev, gpu in zip(m.devices, m.gpus, strict=True)}}
    fit = _twin_fit(scenario)
    sources = [LlamaFitParams(fit)] if fit else []
    config = SearchConfig(
        model=Path(f"{scenario.model.name}.gguf"), anatomy=anatomy, machine=machine,
        space=space_for(anatomy, m.devices), workload=scenario.workload,
        serving=serving_for(anatomy, scenario.workload, ctx=scenario.n_ctx), objective=scenario.objective,
        strategy=strategy, n_trials=n_trials, seed=seed, storage=MEMORY_STORAGE, runner_name=TwinRunner.name,
        bandwidths=bandwidths,
        seed_sources=[*sources, ByHand(), EvenSplit(), _Once(Roofline(), scenario.name), FilledDefaults()],
    )
    search = Search(config, runner, on_trial=on_trial)
    notes = [*search.notes, *search.enqueue_seeds()]
    if fit is None:
        notes.append("the twin's --fit found no placement that leaves 1 GiB free")
    search.run()
    decision = search.final_measure()
    winner = decision.winner.placement.to_dict() if decision else None
    baselines = [c.placement.to_dict() for c in search.final_field if c.is_baseline and c.ok]
    return SearchRun(records, winner, runner.clock_s, runner.load_s, notes, baselines,
                     bool(decision and decision.beat_baseline))


class _Once:
    """A seed kind whose seeds are made once per scenario and reused by every search of the benchmark.

    They depend on the scenario alone (a fresh study has no widened margins), and the roofline seed walks
    every -ngl through the memory model and the roofline: seconds on a 94-layer model, twenty times over.
    """

    _made: ClassVar[dict[tuple[str, str], list[Seed]]] = {}

    def __init__(self, source: SeedSource, scenario: str) -> None:
        self.source, self.key, self.kind = source, (scenario, source.kind), source.kind

    def seeds(self, context: SeedContext) -> list[Seed]:
        if self.key not in self._made:
            self._made[self.key] = self.source.seeds(context)
        return self._made[self.key]
