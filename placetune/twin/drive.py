"""The one adapter between the twin and placetune's search: run the current search on a scenario.

The search takes the twin's machine directly: a synthetic `Machine` (one CUDA0 device with the
card's free memory, no device or RAM probe), the twin's bandwidths for the roofline seed, and the
twin's --fit answer for the llama-fit-params seed (no binary runs). Everything that knows how the
search is built lives here, because its API is being restructured: the rest of the twin never
imports placetune.search.

Two things make a simulated search cheap without changing what it decides:
  - feasibility checks are memoised per placement for the whole process (the search's bandwidth-model
    seed walks every (-ngl, experts) pair, and placetune's memory model takes 5-40 ms per check on a
    48-layer anatomy); the memo returns exactly what the search's own check returns;
  - the study lives in Optuna's in-memory storage: one worker, nothing to resume, and SQLite's
    per-attribute commits would otherwise take most of a simulated trial's time.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from placetune.hardware import LlamaDevice, Machine
from placetune.memory import FitVerdict
from placetune.placement import Placement
from placetune.predict import Bandwidth
from placetune.search import Search, SearchConfig, directions
from placetune.space import resolve_space
from placetune.twin.baselines import fit_params
from placetune.twin.capacity import GPU
from placetune.twin.runner import LABEL, TwinRunner
from placetune.twin.scenarios import Scenario
from placetune.twin.shape import model_shape

RAM_PROBE_SHARE = 0.75  # what placetune's RAM probe reads of a machine's theoretical bandwidth

_FEASIBILITY: dict[tuple[Scenario, int, Placement], FitVerdict] = {}


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


def twin_machine(scenario: Scenario) -> Machine:
    """The scenario's machine as placetune's hardware record, without probing anything."""
    m = scenario.machine
    return Machine(
        hostname="twin", cpu_model=f"{m.cpu_name} ({LABEL})", physical_cores=m.cores, logical_cores=2 * m.cores,
        ram_total_bytes=m.ram_bytes, ram_available_bytes=m.ram_bytes,
        llama_devices=[LlamaDevice("CPU", m.cpu_name, "CPU", m.ram_bytes, m.ram_bytes),
                       LlamaDevice(GPU, m.gpu_name, GPU, m.gpu_free_bytes, m.gpu_total_bytes)],
        llama_build={"runner": LABEL, "machine": m.name},
    )


class _TwinSearch(Search):
    """The current search with the twin's bandwidths and --fit answer, and memoised feasibility."""

    def __init__(self, scenario: Scenario, config: SearchConfig, runner: TwinRunner,
                 on_trial: Callable[[optuna.trial.FrozenTrial, Search], None]) -> None:
        self.scenario = scenario
        super().__init__(config, runner, on_trial=on_trial)

    @functools.cached_property
    def bandwidths(self) -> dict[str, Any]:
        m = self.scenario.machine
        return {"CPU": Bandwidth(m.ram_bw_gbs * RAM_PROBE_SHARE, f"twin RAM probe ({LABEL})"),
                GPU: Bandwidth(m.gpu_bw_gbs, f"twin spec sheet ({LABEL})")}

    def _fit_answer(self) -> tuple[dict[str, Any] | None, str]:
        params = fit_params(self.scenario)
        if params is None:
            return None, "the twin's --fit found no placement that leaves 1 GiB free"
        return ({k: v for k, v in params.items() if k.startswith(("n_gpu_layers", "cpu_moe"))},
                f"twin --fit: last {params['cpu_moe_layers']} layers' experts in RAM")

    def _open_study(self) -> optuna.Study:
        """A fresh in-memory study (Search._open_study opens or joins one in an RDB storage)."""
        c = self.config
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.storage = optuna.storages.InMemoryStorage()
        study = optuna.create_study(study_name=c.study_name or c.default_study_name(), storage=self.storage,
                                    directions=directions(c.objective), sampler=self._sampler(c.seed))
        self.created = True
        self._describe(study)
        return study

    def _lock_budget(self) -> None:
        """One worker per study: no trial budget to share."""

    def feasibility(self, placement: Placement) -> FitVerdict:
        key = (self.scenario, self.config.n_ctx, placement)
        if key not in _FEASIBILITY:
            _FEASIBILITY[key] = super().feasibility(placement)
        return _FEASIBILITY[key]


def run_search(scenario: Scenario, seed: int, n_trials: int) -> SearchRun:
    """placetune's current search on the scenario: seeds included, n_trials trials, then its final re-measure."""
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
            value=trial.values[0] if trial.values else None, duplicate="same placement" in reason,
            placement=attrs.get("placement"), reason=reason, clock_s=runner.clock_s))

    config = SearchConfig(
        model=Path(f"{scenario.model.name}.gguf"), anatomy=shape.anatomy, machine=machine,
        space=resolve_space(None, shape.anatomy, has_accelerator=True), workload=scenario.workload,
        objective=scenario.objective, n_trials=n_trials, seed=seed, storage="memory", runner_name=TwinRunner.name,
    )
    search = _TwinSearch(scenario, config, runner, on_trial)
    notes = [*search.notes, *search.enqueue_seeds()]
    search.run()
    finals = search.final_measure()
    winner = finals[0][0].user_attrs["placement"] if finals else None
    return SearchRun(records, winner, runner.clock_s, sum(e.load_s for e in runner.events), notes)
