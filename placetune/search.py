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

Several workers join one study by sharing its storage (PostgreSQL across hosts). Optuna's trial
heartbeats let a surviving worker fail a dead worker's trial and queue it again; placetune adds a
worker registry in the study, so that two workers on one host or on different hardware are refused.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import signal
import socket
import statistics
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError, StorageInternalError, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, ProgrammingError, SQLAlchemyError

from placetune.anatomy import Anatomy
from placetune.errors import PlacetuneError
from placetune.hardware import Machine
from placetune.memory import DEFAULT_MARGIN, FitVerdict, check_fit, predict_memory
from placetune.placement import Placement, render_flags, render_server_command
from placetune.runners.base import Measurement, Runner, Stats, Workload
from placetune.space import SearchSpace, facts_for, to_placement

OBJECTIVES = ("latency", "tg", "pp", "pareto")
PLACEMENT_PARAMS = ("n_gpu_layers", "cpu_moe_layers", "cpu_moe_position", "cpu_moe_start", "cpu_moe_kinds")
SCREEN_MARGIN = 0.10  # a screened trial must be this much worse than the best (or 3x the noise) to be cut
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
MAX_RETRY = 3  # a trial whose worker died is run again at most this many times
CONNECT_TIMEOUT_S = 5  # an unreachable database fails the command instead of hanging it
POLL_S = 1.0  # how often a worker looks again at trials other workers are running
ATTRS_WAIT_S = 10.0  # how long a joining worker waits for the study's creator to describe it
WORKER_KEY = "placetune:worker:"  # study system attrs: one entry per worker process
BUDGET_LOCK = 0x706C7475  # PostgreSQL advisory lock class ("pltu"); its object id is the study's id


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
    heartbeat_s: int = 60
    grace_s: int | None = None
    allow_mixed_hardware: bool = False
    allow_colocated: bool = False

    @property
    def grace(self) -> int:
        """Seconds without a heartbeat after which a worker, and its running trial, count as dead."""
        return self.grace_s or 3 * self.heartbeat_s

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
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.notes: list[str] = []  # said once at the start: mixed hardware, colocated workers
        self.seed_notes: list[str] = []  # seeds that could not be made (no llama-fit-params answer)
        self.created = False  # this worker created the study, so it alone enqueues the seeds
        self._budget: Connection | None = None  # holds the trial-budget lock while a trial is being created
        self.study = self._open_study()
        self._register()

    # -- study and storage -------------------------------------------------------------------

    def _open_study(self) -> optuna.Study:
        c = self.config
        name = c.study_name or c.default_study_name()
        # multivariate/group TPE, heartbeats and fail_stale_trials are all marked experimental.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        try:
            self.storage = storage = open_storage(c.storage, c.heartbeat_s, c.grace)
            try:
                study = optuna.create_study(study_name=name, storage=storage, directions=directions(c.objective),
                                            sampler=self._sampler(c.seed))
                self.created = True
            except DuplicatedStudyError:
                # Workers that share a seed would sample the same startup trials: a joiner draws its own.
                seed = (c.seed + zlib.crc32(f"{self.host}:{self.pid}".encode())) % 2**32
                study = optuna.load_study(study_name=name, storage=storage, sampler=self._sampler(seed))
        except (ValueError, ImportError, StorageInternalError, SQLAlchemyError) as exc:
            raise PlacetuneError(f"cannot open storage {safe_url(c.storage)!r}: {_why(exc, c.storage)}") from None
        attrs = self._describe(study)
        fingerprint = c.machine.fingerprint()
        if attrs["fingerprint"] != fingerprint:
            if not c.allow_mixed_hardware:
                raise PlacetuneError(
                    f"study {name!r} was measured on machine {attrs['fingerprint']}, this is {fingerprint} "
                    "(different hardware or llama.cpp build); use another --study-name, or pass "
                    "--allow-mixed-hardware to mix them on purpose"
                )
            self.notes.append(f"mixing hardware (--allow-mixed-hardware): study {name!r} was measured on machine "
                              f"{attrs['fingerprint']}, this worker is {fingerprint}; each trial records its own")
        if attrs.get("workload") != c.workload.to_dict():
            raise PlacetuneError(
                f"study {name!r} used workload {attrs.get('workload')}; resume with the same "
                "--prompt-tokens/--gen-tokens/--depth/--reps/--warmups/--trial-timeout, or pick another --study-name"
            )
        return study

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        constraints = _min_pp_constraint if self.config.min_pp is not None else None
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constraints_func=constraints, n_startup_trials=6
        )

    def _describe(self, study: optuna.Study) -> dict[str, Any]:
        """The study's machine, model and workload; the creator writes them, a joiner waits for them."""
        c = self.config
        deadline = time.monotonic() + (0 if self.created else ATTRS_WAIT_S)
        while "fingerprint" not in study.user_attrs and time.monotonic() < deadline:
            time.sleep(0.2)
        if "fingerprint" not in study.user_attrs:  # created here, or by hand with optuna
            study.set_user_attr("fingerprint", c.machine.fingerprint())
            study.set_user_attr("machine", c.machine.to_dict())
            study.set_user_attr("model", {"path": str(c.model), "header_hash": c.anatomy.header_hash})
            study.set_user_attr("workload", c.workload.to_dict())
            study.set_user_attr("objective", c.objective)
            study.set_user_attr("runner", c.runner_name)
        return study.user_attrs

    # -- workers -----------------------------------------------------------------------------

    def _worker_key(self) -> str:
        return f"{WORKER_KEY}{self.host}:{self.pid}"

    def _set_worker(self, **fields: Any) -> None:
        entry = {"host": self.host, "pid": self.pid, "fingerprint": self.config.machine.fingerprint(), **fields}
        self.study._storage.set_study_system_attr(self.study._study_id, self._worker_key(), entry)

    def _register(self) -> None:
        """Join the study's worker registry; refuse when another live worker of the study is on this host.

        Each worker registers before it looks, so two started together can both refuse, never both run.
        """
        self._set_worker(seen=time.time())
        others = self._colocated()
        if others and not self.config.allow_colocated:
            self._set_worker(seen=None)  # refused: not a worker of this study
            raise PlacetuneError(
                f"another placetune worker (pid {others[0]['pid']}) is running study {self.study.study_name!r} "
                f"on {self.host}; two workers on one host disturb each other's measurements. "
                "Pass --allow-colocated-workers only if each worker has its own CPU cores and devices"
            )
        if others:
            self.notes.append(f"sharing {self.host} with worker pid {others[0]['pid']} (--allow-colocated-workers)")

    def _colocated(self) -> list[dict[str, Any]]:
        """Other live workers of this study on this host: process alive and heartbeat fresh."""
        attrs = self.study._storage.get_study_system_attrs(self.study._study_id)
        now = time.time()  # entries from this host were stamped by this host's clock
        return [w for k, w in attrs.items()
                if k.startswith(WORKER_KEY) and k != self._worker_key() and w.get("host") == self.host
                and w.get("seen") is not None and now - w["seen"] <= self.config.grace and _pid_alive(w["pid"])]

    @contextmanager
    def _working(self) -> Iterator[None]:
        """Keep this worker's registry entry fresh while it measures."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.config.heartbeat_s):
                # A database hiccup: the next beat tries again, and the trials themselves fail loudly meanwhile.
                with suppress(StorageInternalError, SQLAlchemyError):
                    self._set_worker(seen=time.time())

        self._set_worker(seen=time.time())
        thread = threading.Thread(target=beat, name="placetune-worker-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _fail_orphans(self) -> None:
        """Trials left RUNNING by a killed search on this host: fail and requeue them now.

        Same host, dead pid: certain without waiting out the heartbeat grace period, so a restarted
        worker resumes at once. Whichever path fails a trial first wins; the other sees it finished.
        """
        storage = self.study._storage
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if t.user_attrs.get("host") == self.host and pid and not _pid_alive(int(pid)):
                try:
                    storage.set_trial_user_attr(t._trial_id, "reason", "search process died during this trial")
                    storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                except UpdateFinishedTrialError:
                    continue  # another worker's heartbeat check failed it first and requeued it
                retry_dead_worker_trial(self.study, storage.get_trial(t._trial_id))

    # -- seeds -------------------------------------------------------------------------------

    def seeds(self) -> dict[str, dict[str, Any]]:
        """Named baseline parameter sets: what a user would try by hand, and llama.cpp's own answer."""
        f = self.facts
        defaults = {"n_gpu_layers": f["n_gpu_layers_max"], "cpu_moe_layers": 0, "ubatch": 512, "batch": 2048,
                    "threads": f["physical_cores"], "flash_attn": "auto", "load_mode": "auto",
                    "no_op_offload": False, "repack": True}
        # Here llama.cpp's defaults put every layer on the accelerator (-ngl all), so one seed is both.
        seeds = {"llama.cpp defaults (everything on the accelerator)" if self.config.devices
                 else "llama.cpp defaults": defaults}
        if not self.config.devices:
            return seeds
        seeds["no offload (-ngl 0)"] = {**defaults, "n_gpu_layers": 0}
        experts = {"cpu_moe_position": "first", "cpu_moe_kinds": "all"}
        if f["n_moe_layers"]:
            seeds["all experts in RAM (-ngl all --cpu-moe)"] = {
                **defaults, **experts, "cpu_moe_layers": f["n_moe_layers"]}
        best = self._model_best(defaults)
        if best is not None:
            seeds[f"best by the bandwidth model (-ngl {best['n_gpu_layers']} "
                  f"--n-cpu-moe {best.get('cpu_moe_layers', 0)})"] = best
        fit, answer = self._fit_answer()
        if fit is not None:
            seeds[f"llama-fit-params ({answer})"] = {**defaults, **experts, **fit}
        else:
            self.seed_notes.append(f"no llama-fit-params seed: {answer}")
        return seeds

    def _model_best(self, defaults: dict[str, Any]) -> dict[str, Any] | None:
        """Among (-ngl, --n-cpu-moe) pairs the memory model says fit, the one the roofline predicts fastest.

        For each -ngl only the fewest experts in RAM that fit is a candidate: with RAM slower than the
        accelerator, more experts in RAM never helps under the roofline.
        """
        from placetune.predict import rank_by_prediction

        c = self.config
        candidates = []
        for ngl in range(self.facts["n_gpu_layers_max"], -1, -1):
            for n in range(self.facts["n_moe_layers"] + 1):
                params = {**defaults, "n_gpu_layers": ngl, "cpu_moe_layers": n,
                          "cpu_moe_position": "first", "cpu_moe_kinds": "all"}
                placement = to_placement(params, c.anatomy)
                if self.feasibility(placement).fits:
                    candidates.append((params, placement))
                    break
        ranked = rank_by_prediction(c.anatomy, candidates, c.devices, self.bandwidths)
        return ranked[0][0] if ranked else None

    def _fit_answer(self) -> tuple[dict[str, Any] | None, str]:
        """llama-fit-params' placement for the same memory (budgets become its margins)."""
        from placetune.fit import fit_margins, fit_params

        c = self.config
        free = [(d.name, d.free_bytes) for d in c.machine.accelerators]
        free.sort(key=lambda d: not d[0].startswith("RPC"))
        margins = fit_margins(free, c.budgets, c.margin)
        return fit_params(c.model, c.anatomy, margins, c.n_ctx, rpc=c.rpc)

    @functools.cached_property
    def bandwidths(self) -> dict[str, Any]:
        """Per-device bandwidths for the roofline (one short RAM probe, measured once)."""
        from placetune.predict import machine_bandwidths

        return machine_bandwidths(self.config.machine, self.config.devices)

    def enqueue_seeds(self) -> list[str]:
        """Enqueue the seeds into a study this worker created; return notes on any that were skipped.

        Only the creator enqueues: workers that join at the same moment would otherwise queue every seed twice.
        """
        if not self.created:
            return []
        notes: list[str] = []
        # Seeds that land on the same parameters (the bandwidth model's pick is often llama.cpp's
        # defaults or --cpu-moe) are measured once, under all their names.
        merged: list[tuple[list[str], dict[str, Any]]] = []
        for name, params in self.seeds().items():
            params = {k: v for k, v in params.items() if k in self.config.space.dimension_names()}
            params = {k: v for k, v in params.items() if k not in self.config.space.pinned}
            same = next((names for names, p in merged if p == params), None)
            if same is not None:
                same.append(name)
            else:
                merged.append(([name], params))
        for names, params in merged:
            name = " = ".join(names)
            outside = self.config.space.outside(params, self.facts)
            if any(k in PLACEMENT_PARAMS for k in outside):
                notes.append(f"seed '{name}' puts tensors where this search space cannot ({', '.join(outside)}); "
                             "skipped")
                continue
            # A runtime knob the space does not offer (say -ub 512 when it searches 64 and 256) is left
            # to the sampler: the seed is about where tensors go.
            params = {k: v for k, v in params.items() if k not in outside}
            self.study.enqueue_trial(params, user_attrs={"seed_name": name}, skip_if_exists=False)
        return notes + self.seed_notes

    # -- one trial ---------------------------------------------------------------------------

    def feasibility(self, placement: Placement) -> FitVerdict:
        c = self.config
        need = predict_memory(c.anatomy, placement, c.devices, c.n_ctx)
        return check_fit(need, c.capacity(), c.margin, budgeted=set(c.budgets))

    def _measured_before(self, number: int, flags: str) -> optuna.trial.FrozenTrial | None:
        """A completed trial of the same placement; waits while an earlier trial of another worker measures it."""
        while True:
            same = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                    if t.user_attrs.get("flags") == flags and t.number != number]
            done = [t for t in same if t.state == TrialState.COMPLETE]
            if done:
                return done[0]
            if not any(t.number < number for t in same):  # waiting only on earlier trials: no two wait on each other
                return None
            fail_stale_trials(self.study)  # that worker may have died
            time.sleep(POLL_S)

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
        self._unlock_budget()  # this trial exists now: other workers count it
        c = self.config
        trial.set_user_attr("host", self.host)
        trial.set_user_attr("pid", self.pid)
        trial.set_user_attr("fingerprint", c.machine.fingerprint())
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

        previous = self._measured_before(trial.number, flags)
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
            # Pruned, not failed: TPE ignores FAIL trials but learns from pruned ones, so regions that
            # crash or run out of memory are steered away from; and a failed measurement is a result
            # of its placement, never retried like the trial of a worker that died.
            trial.set_user_attr("reason", f"{m.status}: {m.reason}")
            raise optuna.TrialPruned(trial.user_attrs["reason"])
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
        # A runner that kept the model loaded is already warm from the first repetition.
        warm = getattr(self.runner, "reuse", False)
        rest = self.runner.measure(c.model, placement,
                                   replace(w, repetitions=w.repetitions - 1, warmups=0 if warm else w.warmups))
        if not rest.ok:
            return rest
        rest.pp = Stats(first.pp.samples + rest.pp.samples, rest.pp.tokens_per_sample)
        rest.tg = Stats(first.tg.samples + rest.tg.samples, rest.tg.tokens_per_sample)
        rest.measure_s += first.measure_s
        rest.wall_s += first.wall_s
        return rest

    # -- the loop ----------------------------------------------------------------------------

    def remaining(self, trials: Sequence[optuna.trial.FrozenTrial] | None = None) -> int:
        """Trials still to finish, counted in one snapshot of the study (by default, a fresh one)."""
        if trials is None:
            trials = self.study.get_trials(deepcopy=False)
        return max(0, self.config.n_trials - len(counted(trials)))

    def run(self) -> None:
        """Run trials until n_trials are finished, the timeout passes, or Ctrl-C (after the current trial).

        With other workers on the study, a worker starts no trial that the ones they are running would
        make surplus, but stays until those finish: if their worker dies, someone must run the retry.
        """
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            if self.stop_requested:  # second Ctrl-C: stop now; the runner kills llama.cpp
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.stop_requested = True

        def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if self.on_trial:
                self.on_trial(trial, self)

        self._fail_orphans()
        if self.remaining() == 0:
            return
        deadline = None if self.config.timeout_s is None else time.monotonic() + self.config.timeout_s
        signal.signal(signal.SIGINT, on_sigint)
        try:
            with self._working():
                while not self.stop_requested and (deadline is None or time.monotonic() < deadline):
                    self._lock_budget()
                    try:
                        trials = self.study.get_trials(deepcopy=False)  # one snapshot: counts that agree
                        left = self.remaining(trials)
                        if left == 0:
                            break
                        if sum(t.state == TrialState.RUNNING for t in trials) >= left:
                            self._unlock_budget()
                            fail_stale_trials(self.study)
                            time.sleep(POLL_S)
                            continue
                        self.study.optimize(self.objective, n_trials=1, callbacks=[after_trial],
                                            catch=(), gc_after_trial=False, show_progress_bar=False)
                    finally:
                        self._unlock_budget()
        finally:
            signal.signal(signal.SIGINT, previous)

    def _lock_budget(self) -> None:
        """Take the study's trial-budget lock, held from counting trials until the next trial exists.

        Without it, two workers that both see one trial left would both start one. PostgreSQL only:
        on SQLite (one host) a second worker is refused unless --allow-colocated-workers is given.
        """
        if self.storage.engine.dialect.name == "postgresql":
            self._budget = self.storage.engine.connect()
            self._budget.execute(text("SELECT pg_advisory_xact_lock(:lock, :study)"),
                                 {"lock": BUDGET_LOCK, "study": self.study._study_id})

    def _unlock_budget(self) -> None:
        if self._budget is not None:
            self._budget.close()  # ends the transaction, and the lock with it
            self._budget = None

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
        with self._working():
            self._final_rounds(top, combined)
        results = [(t, combined[t.number]) for t in top if combined[t.number].ok]
        # Pareto: every front member is a winner; the one printed as the server line is the one with
        # the shortest request for the workload given (--prompt-tokens/--gen-tokens).
        objective = "latency" if c.objective == "pareto" else c.objective
        results.sort(key=lambda r: objective_value(objective, r[1].pp.median, r[1].tg.median, c.workload),
                     reverse=objective != "latency")
        return results

    def no_winner_reason(self) -> str:
        """Why no trial could be named the winner, in one line."""
        complete = self._complete()
        if self.config.min_pp is not None and complete:
            best_pp = max(t.user_attrs.get("pp") or 0 for t in complete)
            return (f"no trial reached --min-pp {self.config.min_pp:g} t/s (the fastest prompt processing measured "
                    f"was {best_pp:.1f} t/s); lower --min-pp or widen the search space")
        return "no trial finished successfully; trials.csv lists each one's reason (placetune bench shows one run)"

    def _final_rounds(self, top: list[optuna.trial.FrozenTrial], combined: dict[int, Measurement]) -> None:
        c = self.config
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

    def baselines(self) -> list[dict[str, Any]]:
        """Each seed's measured result, for the summary table and best.json."""
        out = []
        trials = self.study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        for t in trials:
            name = t.user_attrs.get("seed_name")
            if not name or t.number in retried:
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
        from placetune.predict import prediction_record

        c = self.config
        placement = Placement.from_dict(winner.user_attrs["placement"])
        value = objective_value(c.objective if c.objective != "pareto" else "latency", m.pp.median, m.tg.median,
                                c.workload)
        return {
            "model": {"path": str(c.model.resolve()), "header_hash": c.anatomy.header_hash,
                      "total_bytes": c.anatomy.total_bytes, "arch": c.anatomy.facts.arch},
            "machine": c.machine.to_dict(),
            "llama_build": m.build or c.machine.llama_build,
            "study": {"name": self.study.study_name, "storage": safe_url(c.storage), "objective": c.objective,
                      "trials": len(self.study.trials), "winner_trial": winner.number,
                      "fingerprints": sorted({t.user_attrs["fingerprint"] for t in counted(self.study.trials)
                                              if "fingerprint" in t.user_attrs})},
            "workload": c.workload.to_dict(),
            "runner": c.runner_name,
            "rpc": list(c.rpc),
            "placement": placement.to_dict(),
            "flags": render_flags(placement),
            "server_command": render_server_command(str(c.model.resolve()), placement, rpc=c.rpc),
            "measurement": m.to_dict(),
            "objective_value": value,
            "predicted": prediction_record(c.anatomy, placement, c.devices, self.bandwidths, measured_tg=m.tg.median),
            "baselines": self.baselines(),
        }


def open_storage(url: str, heartbeat_s: int, grace_s: int) -> RDBStorage:
    """An Optuna RDB storage with trial heartbeats; a trial whose worker stopped beating is failed and retried."""
    engine_kwargs: dict[str, Any] = {}
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        # pre-ping: a connection idle through a long trial may have been dropped by the server or a firewall.
        engine_kwargs["pool_pre_ping"] = True
        if "connect_timeout" not in parsed.query:
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    attempts = 3
    while True:
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                              heartbeat_stale_trial_callback=retry_dead_worker_trial)
        except (IntegrityError, ProgrammingError):
            # Workers starting together on a fresh database race to create its tables; the loser finds them made.
            attempts -= 1
            if not attempts:
                raise
            time.sleep(0.5)


def retry_dead_worker_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a dead worker's trial again with its parameters, up to MAX_RETRY times.

    Only trials whose worker died come here (heartbeat or dead pid): a llama.cpp OOM or crash is a
    result of the placement, recorded as FAIL by a live worker, and never retried.
    """
    fresh = copy.copy(trial)
    fresh.user_attrs = {k: v for k, v in trial.user_attrs.items() if k == "seed_name"}  # not the dead run's notes
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, fresh)


def counted(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Finished trials that count towards n_trials: a dead worker's trial that was queued again does not."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.state in FINISHED and t.number not in retried]


def retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were queued again (each retry lists the trials it replaces)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def safe_url(url: str) -> str:
    """The storage URL without its password, for messages and result files."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _why(exc: BaseException, url: str) -> str:
    """One line on why a storage would not open, with the password hidden."""
    if isinstance(exc, ImportError):
        return f"no database driver ({exc.__cause__ or exc}); for PostgreSQL: pip install 'placetune[postgres]'"
    text = str(exc).replace(url, safe_url(url))
    return text.splitlines()[0] if text else type(exc).__name__


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
