"""The search: an Optuna study over placements and knobs, every trial a real llama.cpp measurement.

The procedure, in order:
  1. seed trials (llama.cpp's defaults, everything on the accelerator, all experts in RAM, the
     fullest placement the memory model says fits, llama-fit-params' answer) so the search can
     only improve on what a user would try by hand;
  2. each trial is checked against the memory model first and pruned without a launch if it
     cannot fit; an identical placement is never measured twice;
  3. one repetition screens a trial: clearly worse than the best by more than the measured
     noise, it is pruned; otherwise it gets its remaining repetitions;
  4. the top few are re-measured interleaved (A B C A B C) before the winner is named.
Finished trials live in the study's storage (SQLite by default), so a crash, an OOM, a hang or
Ctrl-C never loses them, and running the same command again resumes.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from placetune.anatomy import Anatomy
from placetune.errors import PlacetuneError
from placetune.hardware import Machine
from placetune.memory import DEFAULT_MARGIN, FitVerdict, check_fit, predict_memory
from placetune.placement import Placement, bytes_per_buffer, render_flags, render_server_command
from placetune.runners.base import Measurement, Runner, Stats, Workload
from placetune.space import SearchSpace, facts_for, to_placement

OBJECTIVES = ("latency", "tg", "pp", "pareto")
SCREEN_MARGIN = 0.10  # a screened trial must be this much worse than the best (or 3x the noise) to be cut


@dataclass
class SearchConfig:
    """Everything one search needs besides the runner."""

    model: Path
    anatomy: Anatomy
    machine: Machine
    space: SearchSpace
    workload: Workload
    objective: str = "latency"
    n_trials: int = 30
    timeout_s: float | None = None
    seed: int = 0
    storage: str = "sqlite:///results/placetune.db"
    study_name: str | None = None
    budgets: dict[str, int] = field(default_factory=dict)
    margin: int = DEFAULT_MARGIN
    min_pp: float | None = None
    top_k: int = 3
    final_rounds: int = 2
    screen: bool = True
    rpc: Sequence[str] = ()
    runner_name: str = "embedded"
    extra_seeds: dict[str, Placement] = field(default_factory=dict)

    @property
    def devices(self) -> list[str]:
        """Accelerators llama.cpp will fill, in its order (RPC servers first)."""
        names = [d.name for d in self.machine.accelerators]
        return sorted(names, key=lambda n: not n.startswith("RPC"))

    @property
    def n_ctx(self) -> int:
        w = self.workload
        return max(int(self.space.pinned.get("ctx") or 0), w.depth + w.n_prompt + w.n_gen)

    def capacity(self) -> dict[str, int]:
        """Budget if given, else what the device reports free; CPU: total RAM (mmap pages are reclaimable)."""
        cap = {d.name: d.free_bytes for d in self.machine.accelerators}
        cap["CPU"] = self.machine.ram_total_bytes
        cap.update(self.budgets)
        return cap

    def default_study_name(self) -> str:
        return f"{self.model.stem}-{self.anatomy.header_hash[:8]}-{self.machine.fingerprint()}-{self.objective}"


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


def better(objective: str, a: float, b: float) -> bool:
    return a < b if objective == "latency" else a > b


def directions(objective: str) -> list[str]:
    if objective == "pareto":
        return ["maximize", "maximize"]
    return ["minimize" if objective == "latency" else "maximize"]


class TrialFailed(Exception):
    """A llama.cpp run that failed (OOM, crash, timeout, bad arguments): the trial is FAIL, the search goes on."""


class Search:
    """One study: seeds, trials, screening, the final re-measure and the result record."""

    def __init__(self, config: SearchConfig, runner: Runner,
                 on_trial: Callable[[optuna.trial.FrozenTrial, Search], None] | None = None) -> None:
        if config.objective not in OBJECTIVES:
            raise PlacetuneError(f"--objective {config.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        self.config = config
        self.runner = runner
        self.on_trial = on_trial
        self.facts = facts_for(config.anatomy, config.machine.physical_cores)
        self.stop_requested = False
        self.study = self._open_study()

    # -- study and storage -------------------------------------------------------------------

    def _open_study(self) -> optuna.Study:
        c = self.config
        name = c.study_name or c.default_study_name()
        constraints = _min_pp_constraint if c.min_pp is not None else None
        # multivariate/group TPE models the conditional expert parameters jointly; both are marked experimental.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=c.seed, multivariate=True, group=True, constraints_func=constraints, n_startup_trials=6
        )
        try:
            study = optuna.create_study(
                study_name=name, storage=c.storage, load_if_exists=True,
                directions=directions(c.objective), sampler=sampler,
            )
        except (ValueError, ImportError, optuna.exceptions.StorageInternalError, SQLAlchemyError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PlacetuneError(f"cannot open storage {c.storage!r}: {first}") from None
        attrs = study.user_attrs
        fingerprint = c.machine.fingerprint()
        if attrs.get("fingerprint") not in (None, fingerprint):
            raise PlacetuneError(
                f"study {name!r} was measured on machine {attrs['fingerprint']}, this is {fingerprint}; "
                "use another --study-name so different hardware or llama.cpp builds are never mixed"
            )
        if "fingerprint" not in attrs:
            study.set_user_attr("fingerprint", fingerprint)
            study.set_user_attr("machine", c.machine.to_dict())
            study.set_user_attr("model", {"path": str(c.model), "header_hash": c.anatomy.header_hash})
            study.set_user_attr("workload", c.workload.to_dict())
            study.set_user_attr("objective", c.objective)
            study.set_user_attr("runner", c.runner_name)
        elif attrs.get("workload") != c.workload.to_dict():
            raise PlacetuneError(
                f"study {name!r} used workload {attrs.get('workload')}; resume with the same "
                "--prompt-tokens/--gen-tokens/--depth/--reps, or pick another --study-name"
            )
        self._fail_orphans(study)
        return study

    def _fail_orphans(self, study: optuna.Study) -> None:
        """Trials left RUNNING by a search on this host that was killed: mark them FAIL so counts are right."""
        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if t.user_attrs.get("host") == host and pid and not _pid_alive(int(pid)):
                study._storage.set_trial_user_attr(t._trial_id, "reason", "search process died during this trial")
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)

    # -- seeds -------------------------------------------------------------------------------

    def seeds(self) -> dict[str, dict[str, Any]]:
        """Named baseline parameter sets a user would try by hand."""
        f = self.facts
        defaults = {"n_gpu_layers": f["n_gpu_layers_max"], "cpu_moe_layers": 0, "ubatch": 512, "batch": 2048,
                    "threads": f["physical_cores"], "flash_attn": "auto", "load_mode": "auto",
                    "no_op_offload": False, "repack": True}
        # Here llama.cpp's defaults put every layer on the accelerator (-ngl all), so one seed is both.
        seeds = {"llama.cpp defaults (everything on the accelerator)" if self.config.devices
                 else "llama.cpp defaults": defaults}
        if self.config.devices and f["n_moe_layers"]:
            experts = {"cpu_moe_position": "first", "cpu_moe_kinds": "all"}
            seeds["all experts in RAM (-ngl all --cpu-moe)"] = {
                **defaults, **experts, "cpu_moe_layers": f["n_moe_layers"]}
            fit = self._fullest_fit(defaults)
            if fit is not None:
                seeds[f"fullest fit by the memory model (-ngl {fit['n_gpu_layers']} "
                      f"--n-cpu-moe {fit['cpu_moe_layers']})"] = fit
        return seeds

    def _fullest_fit(self, defaults: dict[str, Any]) -> dict[str, Any] | None:
        """The fitting (-ngl, --n-cpu-moe) pair with the most bytes on the accelerators.

        Token generation reads every active byte once, so with bandwidth as the bottleneck the
        placement that keeps the most weight on the fast device is the model's best guess.
        """
        c = self.config
        best: tuple[int, dict[str, Any]] | None = None
        for ngl in range(self.facts["n_gpu_layers_max"], -1, -1):
            for n in range(self.facts["n_moe_layers"] + 1):
                params = {**defaults, "n_gpu_layers": ngl, "cpu_moe_layers": n,
                          "cpu_moe_position": "first", "cpu_moe_kinds": "all"}
                placement = to_placement(params, c.anatomy)
                if self.feasibility(placement).fits:
                    weights = bytes_per_buffer(c.anatomy, placement, c.devices)
                    on_accel = sum(b for d, b in weights.items() if d != "CPU")
                    if best is None or on_accel > best[0]:
                        best = (on_accel, params)
                    break  # more experts in RAM only moves bytes off the accelerator
        return best[1] if best else None

    def enqueue_seeds(self) -> list[str]:
        """Enqueue the seeds a fresh study has not run yet; return notes on any that were skipped."""
        notes = []
        done = {t.user_attrs.get("seed_name") for t in self.study.get_trials(deepcopy=False)}
        for name, params in self.seeds().items():
            if name in done:
                continue
            params = {k: v for k, v in params.items() if k in self.config.space.dimension_names()}
            params = {k: v for k, v in params.items() if k not in self.config.space.pinned}
            if not self.config.space.contains(params, self.facts):
                notes.append(f"seed '{name}' lies outside this search space; skipped")
                continue
            self.study.enqueue_trial(params, user_attrs={"seed_name": name}, skip_if_exists=False)
        return notes

    # -- one trial ---------------------------------------------------------------------------

    def feasibility(self, placement: Placement) -> FitVerdict:
        c = self.config
        need = predict_memory(c.anatomy, placement, c.devices, c.n_ctx)
        return check_fit(need, c.capacity(), c.margin, budgeted=set(c.budgets))

    def _measured_before(self, flags: str) -> optuna.trial.FrozenTrial | None:
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("flags") == flags:
                return t
        return None

    def noise(self) -> float:
        """Median relative spread of the objective's rates over completed trials (0.05 until known)."""
        spreads = [t.user_attrs.get(k) for t in self._complete() for k in ("pp_spread", "tg_spread")]
        spreads = [s for s in spreads if s]
        return statistics.median(spreads) if spreads else 0.05

    def _complete(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def best_value(self) -> float | None:
        if self.config.objective == "pareto":
            return None
        values = [t.values[0] for t in self._complete() if t.values]
        if not values:
            return None
        return min(values) if self.config.objective == "latency" else max(values)

    def _record(self, trial: optuna.Trial, m: Measurement) -> None:
        trial.set_user_attr("status", m.status)
        trial.set_user_attr("reason", m.reason)
        if m.ok:
            for key, stats in (("pp", m.pp), ("tg", m.tg)):
                trial.set_user_attr(key, stats.median)
                trial.set_user_attr(f"{key}_spread", stats.spread)
                trial.set_user_attr(f"{key}_samples", list(stats.samples))
            trial.set_user_attr("placement_issues", m.placement_issues)
            trial.set_user_attr("device_memory", m.device_memory)
            trial.set_user_attr("build", m.build)

    def objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        c = self.config
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = c.space.suggest(trial, self.facts)
        placement = to_placement(params, c.anatomy)
        flags = render_flags(placement)
        trial.set_user_attr("flags", flags)
        trial.set_user_attr("placement", placement.to_dict())

        verdict = self.feasibility(placement)
        trial.set_user_attr("predicted_need", verdict.to_dict()["need"])
        if not verdict.fits:
            trial.set_user_attr("reason", "predicted not to fit: " + "; ".join(verdict.reasons))
            raise optuna.TrialPruned(trial.user_attrs["reason"])

        previous = self._measured_before(flags)
        if previous is not None:
            for key in ("pp", "tg", "pp_spread", "tg_spread", "status"):
                trial.set_user_attr(key, previous.user_attrs.get(key))
            trial.set_user_attr("reason", f"same placement as trial {previous.number}; not measured again")
            if c.min_pp is not None:
                trial.set_user_attr("constraint", previous.user_attrs.get("constraint"))
            return tuple(previous.values) if c.objective == "pareto" else previous.values[0]

        m = self._measure_screened(trial, placement)
        self._record(trial, m)
        if not m.ok:
            if m.status == "oom":
                trial.set_user_attr("oom_prediction", verdict.to_dict()["need"])
            raise TrialFailed(f"{m.status}: {m.reason}")
        pp, tg = m.pp.median, m.tg.median
        if c.min_pp is not None:
            trial.set_user_attr("constraint", [c.min_pp - pp])
        if c.objective == "pareto":
            return pp, tg
        return objective_value(c.objective, pp, tg, c.workload)

    def _measure_screened(self, trial: optuna.Trial, placement: Placement) -> Measurement:
        """One repetition first; the rest only if the trial could still be the best."""
        c = self.config
        w = c.workload
        best = self.best_value()
        if not c.screen or best is None or w.repetitions <= 1 or c.objective == "pareto":
            return self.runner.measure(c.model, placement, w)
        first = self.runner.measure(c.model, placement, replace(w, repetitions=1))
        if not first.ok:
            return first
        value = objective_value(c.objective, first.pp.median, first.tg.median, w)
        threshold = max(SCREEN_MARGIN, 3 * self.noise())
        clearly_worse = value > best * (1 + threshold) if c.objective == "latency" else value < best * (1 - threshold)
        if clearly_worse:
            self._record(trial, first)
            trial.set_user_attr(
                "reason", f"screened out after 1 repetition: {value:.4g} vs best {best:.4g} (margin {threshold:.0%})"
            )
            raise optuna.TrialPruned(trial.user_attrs["reason"])
        rest = self.runner.measure(c.model, placement, replace(w, repetitions=w.repetitions - 1))
        if not rest.ok:
            return rest
        rest.pp = Stats(first.pp.samples + rest.pp.samples, rest.pp.tokens_per_sample)
        rest.tg = Stats(first.tg.samples + rest.tg.samples, rest.tg.tokens_per_sample)
        rest.measure_s += first.measure_s
        rest.wall_s += first.wall_s
        return rest

    # -- the loop ----------------------------------------------------------------------------

    def remaining(self) -> int:
        finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return max(0, self.config.n_trials - len(self.study.get_trials(deepcopy=False, states=finished)))

    def run(self) -> None:
        """Run trials until n_trials are finished, the timeout passes, or Ctrl-C (after the current trial)."""
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            if self.stop_requested:  # second Ctrl-C: stop now; the runner kills llama.cpp
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.stop_requested = True

        def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if self.on_trial:
                self.on_trial(trial, self)
            if self.stop_requested or self.remaining() == 0:
                study.stop()

        if self.remaining() == 0:
            return
        signal.signal(signal.SIGINT, on_sigint)
        try:
            self.study.optimize(
                self.objective, n_trials=self.remaining(), timeout=self.config.timeout_s,
                callbacks=[after_trial], catch=(TrialFailed,), gc_after_trial=False, show_progress_bar=False,
            )
        finally:
            signal.signal(signal.SIGINT, previous)

    # -- the winner --------------------------------------------------------------------------

    def ranked(self) -> list[optuna.trial.FrozenTrial]:
        """Completed, measured (not duplicate) trials, best first; Pareto-optimal ones for pareto."""
        c = self.config
        if c.objective == "pareto":
            return list(self.study.best_trials)
        trials = [t for t in self._complete() if t.values and "same placement" not in t.user_attrs.get("reason", "")]
        if c.min_pp is not None:
            trials = [t for t in trials if (t.user_attrs.get("pp") or 0) >= c.min_pp]
        return sorted(trials, key=lambda t: t.values[0], reverse=c.objective != "latency")

    def final_measure(self) -> list[tuple[optuna.trial.FrozenTrial, Measurement]]:
        """Re-measure the top candidates interleaved (A B C A B C) so drift hits them all alike."""
        c = self.config
        top = self.ranked()[: c.top_k]
        if not top:
            return []
        combined: dict[int, Measurement] = {}
        for _ in range(c.final_rounds):
            for t in top:
                m = self.runner.measure(c.model, Placement.from_dict(t.user_attrs["placement"]), c.workload)
                if t.number not in combined:
                    combined[t.number] = m
                elif m.ok and combined[t.number].ok:
                    prev = combined[t.number]
                    prev.pp = Stats(prev.pp.samples + m.pp.samples, m.pp.tokens_per_sample)
                    prev.tg = Stats(prev.tg.samples + m.tg.samples, m.tg.tokens_per_sample)
                elif not m.ok:
                    combined[t.number] = m
        results = [(t, combined[t.number]) for t in top if combined[t.number].ok]
        if c.objective != "pareto":
            results.sort(key=lambda r: objective_value(c.objective, r[1].pp.median, r[1].tg.median, c.workload),
                         reverse=c.objective != "latency")
        return results

    def baselines(self) -> list[dict[str, Any]]:
        """Each seed's measured result, for the summary table and best.json."""
        out = []
        for t in self.study.get_trials(deepcopy=False):
            name = t.user_attrs.get("seed_name")
            if not name:
                continue
            out.append({
                "name": name, "trial": t.number, "state": t.state.name, "flags": t.user_attrs.get("flags", ""),
                "pp": t.user_attrs.get("pp"), "tg": t.user_attrs.get("tg"),
                "pp_spread": t.user_attrs.get("pp_spread"), "tg_spread": t.user_attrs.get("tg_spread"),
                "reason": t.user_attrs.get("reason", ""),
            })
        return out

    def best_record(self, winner: optuna.trial.FrozenTrial, m: Measurement) -> dict[str, Any]:
        """The best.json document."""
        c = self.config
        placement = Placement.from_dict(winner.user_attrs["placement"])
        value = objective_value(c.objective if c.objective != "pareto" else "latency", m.pp.median, m.tg.median,
                                c.workload)
        return {
            "model": {"path": str(c.model.resolve()), "header_hash": c.anatomy.header_hash,
                      "total_bytes": c.anatomy.total_bytes, "arch": c.anatomy.facts.arch},
            "machine": c.machine.to_dict(),
            "llama_build": m.build or c.machine.llama_build,
            "study": {"name": self.study.study_name, "storage": c.storage, "objective": c.objective,
                      "trials": len(self.study.trials), "winner_trial": winner.number},
            "workload": c.workload.to_dict(),
            "runner": c.runner_name,
            "rpc": list(c.rpc),
            "placement": placement.to_dict(),
            "flags": render_flags(placement),
            "server_command": render_server_command(str(c.model.resolve()), placement, rpc=c.rpc),
            "measurement": m.to_dict(),
            "objective_value": value,
            "baselines": self.baselines(),
        }


def _min_pp_constraint(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    return trial.user_attrs.get("constraint") or [0.0]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
