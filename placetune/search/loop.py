"""The search loop: an Optuna study over placements and knobs, every trial a real llama.cpp measurement.

The procedure, in order:
  1. seeds: the baselines a user gets or tries by hand, measured exactly as labelled, and placetune's
     own candidate, so the search can only improve on them;
  2. each trial is checked against the memory model first and pruned without a launch if it cannot fit;
     a placement measured before costs no measurement and no share of --n-trials;
  3. one repetition screens a sampled trial (screening.py): clearly below the best trial (beyond its own spread too),
     it is pruned; otherwise it gets its remaining repetitions, warm;
  4. the final round (finals.py) re-measures the top trials and every baseline interleaved, and names a
     winner only beyond the noise.
Trials live in the study's storage (SQLite by default), so a crash, an OOM, a hang or Ctrl-C never loses
them, and running the same command again resumes; a trial cut short by Ctrl-C or by a missing binary is
not a result, and is measured again on resume.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from placetune.errors import PlacetuneError
from placetune.memory import DeviceNeed, FitVerdict, LoadedEvidence, MarginFeedback, check_fit, predict_memory
from placetune.placement import Placement, render_flags, render_server_command
from placetune.results import BestRecord
from placetune.runners.base import Measurement, Runner, Stats
from placetune.search.config import SearchConfig
from placetune.search.finals import (
    FIRST_ROUND_WIDTH,
    SEARCH,
    Contender,
    Decision,
    Row,
    decide,
    pareto_front,
    run_rounds,
)
from placetune.search.objective import objective_value, speed_samples
from placetune.search.screening import ScreenedOut, measure_screened
from placetune.search.seeds import BASELINE, CANDIDATE, Seed, SeedContext, standard_sources
from placetune.search.staged import Walk, ubatch_sizes
from placetune.search.study import open_storage, open_study
from placetune.search.workers import Workers, counted, retried_numbers
from placetune.storage import mask_url
from placetune.units import human_bytes

POLL_S = 1.0  # how often a worker looks again at trials other workers are running
NEEDS_CACHE = 4096  # predicted needs kept per placement: the staged walk asks about the same ones after every trial
MAX_REPEATS = 30  # the sampler proposing only measured placements this many times in a row: the space is done


class Search:
    """One study: seeds, trials, screening, and the final round that names the winner."""

    def __init__(self, config: SearchConfig, runner: Runner,
                 on_trial: Callable[[FrozenTrial, Search], None] | None = None) -> None:
        self.config = config
        self.runner = runner
        self.on_trial = on_trial
        self.facts = config.facts
        self.stop_requested = False
        self.repeats = 0  # placements proposed again in a row
        self.final_field: list[Contender] = []
        self.storage = open_storage(config)
        self.study, self.notes = open_study(config, self.storage, worker_tag=str(id(self)) + str(time.time()))
        self.workers = Workers(self.study, self.storage, config.machine.fingerprint(), config.grace,
                               config.heartbeat_s)
        self.notes += self.workers.register(config.allow_colocated)
        self.margins = MarginFeedback(base=config.margin)
        self.evidence = LoadedEvidence()
        self._needs: dict[Placement, dict[str, DeviceNeed]] = {}
        self._learn_from_ooms()
        self.walk = Walk(config.space, self.facts, self._params_fit, self._params_flags,
                         lambda params: ubatch_sizes(config.workload, self._params_placement(params))) \
            if config.strategy == "staged" else None
        if self.margins.widened:
            self.notes.append("margins widened by earlier out-of-memory trials: " + ", ".join(
                f"{d} {human_bytes(m)}" for d, m in self.margins.widened.items()))

    def _note(self, text: str) -> None:
        if self.config.on_note:
            self.config.on_note(text)

    # -- feasibility and bandwidths ----------------------------------------------------------

    def feasibility(self, placement: Placement) -> FitVerdict:
        """The memory model's verdict, with the margins out-of-memory trials have widened; a placement needing no
        more than one that loaded fits whatever the margins say (LoadedEvidence).

        llama-server with an explicit -np keeps one cache stream per slot (not unified); so do the runners.
        """
        c = self.config
        need = self._needs.get(placement)
        if need is None:
            if len(self._needs) >= NEEDS_CACHE:
                self._needs.clear()
            need = self._needs[placement] = predict_memory(c.anatomy, placement, c.devices, placement.ctx or c.n_ctx,
                                                           n_seq=placement.parallel or 1, kv_unified=False)
        margins = {d: self.margins.margin(d, need[d].compute if d in need else None) for d in c.devices}
        verdict = check_fit(need, c.capacity(), margins, budgeted=set(c.budgets))
        if not verdict.fits and self.evidence.covers(need):
            return FitVerdict(True, (), dict(need))
        return verdict

    def _learn_from_ooms(self) -> None:
        """Replay the study's out-of-memory trials into the margins, and the placements that loaded into the
        evidence (this worker's or others', before a resume)."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.PRUNED, TrialState.COMPLETE)):
            if "duplicate_of" in t.user_attrs:
                continue
            need = t.user_attrs.get("oom_prediction")
            if need:
                self.margins.record_oom(_needs_from(need), self.config.capacity())
            elif t.user_attrs.get("status") == "ok" and t.user_attrs.get("predicted_need"):
                self.evidence.record(_needs_from(t.user_attrs["predicted_need"]))

    def _params_placement(self, params: dict[str, Any]) -> Placement:
        return self.config.placement_of(params)

    def _params_fit(self, params: dict[str, Any]) -> bool:
        return self.feasibility(self._params_placement(params)).fits

    def _params_flags(self, params: dict[str, Any]) -> str:
        return render_flags(self._params_placement(params))

    @functools.cached_property
    def bandwidths(self) -> dict[str, Any]:
        """Per-device bandwidths for the roofline: given by the caller, or one short RAM probe here."""
        if self.config.bandwidths is not None:
            return self.config.bandwidths
        from placetune.predict import machine_bandwidths

        return machine_bandwidths(self.config.machine, self.config.devices)

    # -- seeds -------------------------------------------------------------------------------

    def seeds(self) -> tuple[list[Seed], list[str]]:
        """Every seed kind's seeds, and notes on the ones that could not be made."""
        context = SeedContext(self.config, self.facts, self.feasibility, lambda: self.bandwidths)
        sources = self.config.seed_sources if self.config.seed_sources is not None else standard_sources()
        # A resumed study already holds each kind's seeds: no llama-fit-params run (up to 2 minutes) again.
        held = {t.user_attrs.get("kind") for t in self.study.get_trials(deepcopy=False)}
        seeds: list[Seed] = []
        for source in sources:
            if source.kind not in held:
                seeds += [replace(seed, kind=source.kind) for seed in source.seeds(context)]
        return seeds, context.notes

    def enqueue_seeds(self) -> list[str]:
        """Queue the seeds this study does not hold yet (by name); any worker may do it, and it is idempotent.

        Returns notes: seeds that could not be made, or that the search space cannot take.
        """
        seeds, notes = self.seeds()
        c = self.config
        dims = set(c.space.dimension_names())
        with self.workers.budget_lock():
            held = {t.user_attrs.get("name") for t in self.study.get_trials(deepcopy=False)}
            for seed in seeds:
                if seed.name in held:
                    continue
                if seed.role == BASELINE:
                    self.study.enqueue_trial({}, user_attrs={"role": BASELINE, "name": seed.name, "kind": seed.kind,
                                                             "candidate": seed.placement.to_dict()},
                                             skip_if_exists=False)
                    continue
                params = {k: v for k, v in (seed.params or {}).items() if k in dims}
                outside = c.space.outside(params, self.facts)
                if outside:
                    notes.append(f"seed '{seed.name}' puts tensors where this search space cannot "
                                 f"({', '.join(outside)}); skipped")
                    continue
                self.study.enqueue_trial(params, user_attrs={"role": CANDIDATE, "name": seed.name, "kind": seed.kind},
                                         skip_if_exists=False)
        return notes

    # -- one trial ---------------------------------------------------------------------------

    def objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        self.workers.release()  # this trial exists now: other workers count it
        try:
            return self._trial(trial)
        except (KeyboardInterrupt, PlacetuneError) as exc:
            # Not a result of the placement: the trial is queued again when the search resumes.
            trial.set_user_attr("retry", True)
            why = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
            trial.set_user_attr("reason", f"not measured: {why}; measured again on resume")
            raise

    def _trial(self, trial: optuna.Trial) -> float | tuple[float, float]:
        c = self.config
        for key, value in self.workers.me.attrs().items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("fingerprint", c.machine.fingerprint())
        role = trial.user_attrs.get("role", SEARCH)
        if role == BASELINE:
            placement = Placement.from_dict(trial.user_attrs["candidate"])
        else:
            placement = c.placement_of(c.space.suggest(trial, self.facts))
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
            return self._repeat_of(trial, previous)
        self.repeats = 0
        m = self._measure_screened(trial, placement, role)
        self._record(trial, m)
        if not m.ok:
            if m.status == "oom":
                trial.set_user_attr("oom_prediction", verdict.to_dict()["need"])
                self._note(self.margins.record_oom(verdict.need, c.capacity()) + " (for the rest of this study)")
            # Pruned, not failed: TPE ignores FAIL trials but learns from pruned ones, so regions that
            # crash or run out of memory are steered away from.
            trial.set_user_attr("reason", f"{m.status}: {m.reason}")
            raise optuna.TrialPruned(trial.user_attrs["reason"])
        pp, tg = m.pp.median, m.tg.median
        if c.min_pp is not None:
            trial.set_user_attr("constraint", [c.min_pp - pp])
        if c.objective == "pareto":
            return pp, tg
        return objective_value(c.objective, pp, tg, c.workload)

    def _repeat_of(self, trial: optuna.Trial, previous: FrozenTrial) -> float | tuple[float, float]:
        """A placement already measured: its result again, no launch, and no share of --n-trials."""
        self.repeats += 1
        trial.set_user_attr("duplicate_of", previous.number)
        for key in ("pp", "tg", "pp_spread", "tg_spread", "status", "constraint"):
            if key in previous.user_attrs:
                trial.set_user_attr(key, previous.user_attrs[key])
        if previous.state == TrialState.PRUNED:
            trial.set_user_attr("reason", f"same placement as trial {previous.number}: "
                                          f"{previous.user_attrs.get('reason', '')}")
            raise optuna.TrialPruned(trial.user_attrs["reason"])
        trial.set_user_attr("reason", f"same placement as trial {previous.number}; not measured again")
        return tuple(previous.values) if self.config.objective == "pareto" else previous.values[0]

    def _measured_before(self, number: int, flags: str) -> FrozenTrial | None:
        """A finished trial of the same placement; waits while an earlier trial of another worker measures it."""
        while True:
            same = [t for t in self.study.get_trials(
                        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
                    if t.user_attrs.get("flags") == flags and t.number != number]
            done = [t for t in same if t.state != TrialState.RUNNING]
            if done:
                return min(done, key=lambda t: t.number)
            if not any(t.number < number for t in same):  # waiting only on earlier trials: no two wait on each other
                return None
            fail_stale_trials(self.study)  # that worker may have died
            time.sleep(POLL_S)

    def _speeds(self, t: FrozenTrial) -> list[float]:
        ua = t.user_attrs
        return speed_samples(self.config.objective, ua.get("pp_samples") or [], ua.get("tg_samples") or [],
                             self.config.workload)

    def _measure_screened(self, trial: optuna.Trial, placement: Placement, role: str) -> Measurement:
        """Sampled trials are screened against the best trial so far (screening.py); seeds never are."""
        c = self.config
        best = self.ranked()[:1]
        screen = c.screen and role == SEARCH and best and c.objective != "pareto"
        result = measure_screened(self.runner, c.model, placement, c.workload, c.objective,
                                  self._speeds(best[0]) if screen else None)
        if isinstance(result, ScreenedOut):
            self._record(trial, result.measurement)
            trial.set_user_attr("reason", f"screened out after 1 repetition: {result.speed:.4g} vs best trial "
                                          f"{best[0].number}'s {result.reference_median:.4g}")
            raise optuna.TrialPruned(trial.user_attrs["reason"])
        return result

    def _record(self, trial: optuna.Trial, m: Measurement) -> None:
        trial.set_user_attr("status", m.status)
        trial.set_user_attr("reason", m.reason)
        trial.set_user_attr("build", m.build)  # a crash or an OOM is a result of that build too
        if m.ok:
            self.evidence.record(_needs_from(trial.user_attrs["predicted_need"]))
            for key, stats in (("pp", m.pp), ("tg", m.tg)):
                trial.set_user_attr(key, stats.median)
                trial.set_user_attr(f"{key}_spread", stats.spread)
                trial.set_user_attr(f"{key}_samples", list(stats.samples))
            trial.set_user_attr("placement_issues", m.placement_issues)
            trial.set_user_attr("device_memory", m.device_memory)

    # -- the loop ----------------------------------------------------------------------------

    def remaining(self, trials: Sequence[FrozenTrial] | None = None) -> int:
        """Trials still to finish, counted in one snapshot of the study (by default, a fresh one)."""
        if trials is None:
            trials = self.study.get_trials(deepcopy=False)
        return max(0, self.config.n_trials - len(counted(trials)))

    def run(self) -> None:
        """Run trials until n_trials are finished, the timeout passes, or Ctrl-C (after the current trial).

        A second Ctrl-C stops at once: the trial it cut short is queued again for the resume. With other
        workers on the study, a worker starts no trial that the ones they are running would make surplus,
        but stays until those finish: if their worker dies, someone must run the retry.
        """
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            if self.stop_requested:  # second Ctrl-C: stop now; the runner kills llama.cpp
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.stop_requested = True
            self._note("Ctrl-C: stopping after the current trial, then the final round runs "
                       "(Ctrl-C again stops at once; finished trials are kept and the same command resumes)")

        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            if self.on_trial:
                self.on_trial(trial, self)

        self.workers.fail_orphans()
        self.workers.requeue_interrupted()
        if self.remaining() == 0:
            return
        deadline = None if self.config.timeout_s is None else time.monotonic() + self.config.timeout_s
        signal.signal(signal.SIGINT, on_sigint)
        try:
            with self.workers.working():
                while not self.stop_requested and (deadline is None or time.monotonic() < deadline):
                    if self.repeats >= MAX_REPEATS:
                        self._note(f"the sampler proposed only placements already measured, {MAX_REPEATS} times "
                                   "in a row: this search space is exhausted; stopping early")
                        break
                    with self.workers.budget_lock():
                        trials = self.study.get_trials(deepcopy=False)  # one snapshot: counts that agree
                        left = self.remaining(trials)
                        if left == 0:
                            break
                        if sum(t.state == TrialState.RUNNING for t in trials) >= left:
                            self.workers.release()
                            fail_stale_trials(self.study)
                            time.sleep(POLL_S)
                            continue
                        self._propose(trials)
                        self.study.optimize(self.objective, n_trials=1, callbacks=[after_trial],
                                            catch=(), gc_after_trial=False, show_progress_bar=False)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _propose(self, trials: Sequence[FrozenTrial]) -> None:
        """Queue the staged walk's next step (staged.py) unless a trial is queued already; with none left, the
        sampler proposes."""
        if self.walk is None or any(t.state == TrialState.WAITING for t in trials):
            return
        proposal = self.walk.propose(trials, self.ranked())
        if proposal is not None:
            params, why = proposal
            self.study.enqueue_trial(params, user_attrs={"proposed": why}, skip_if_exists=False)

    # -- the winner --------------------------------------------------------------------------

    def _complete(self) -> list[FrozenTrial]:
        """Measured, completed trials (a repeat of a placement is its first trial's result, listed once)."""
        return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and "duplicate_of" not in t.user_attrs]

    def ranked(self) -> list[FrozenTrial]:
        """Completed trials, best first (by the search-phase objective; the final round decides)."""
        c = self.config
        trials = self._complete()
        if c.min_pp is not None:
            trials = [t for t in trials if (t.user_attrs.get("pp") or 0) >= c.min_pp]
        if c.objective == "pareto":
            return sorted(trials, key=lambda t: -objective_value("latency", t.values[0], t.values[1], c.workload))
        return sorted(trials, key=lambda t: t.values[0], reverse=c.objective != "latency")

    def contenders(self) -> tuple[list[Contender], list[Row]]:
        """The final round's field: the top trials and every measured baseline, one per placement; and rows
        for the baselines that could not be measured."""
        c = self.config
        if c.objective == "pareto":
            front = [t for t in self.study.best_trials if "duplicate_of" not in t.user_attrs]
            top = [t for t in front if t.user_attrs.get("role") != BASELINE]
        else:
            top = [t for t in self.ranked() if t.user_attrs.get("role") != BASELINE][: self._first_round_width()]
        # Baselines that repeat another's placement were not measured again, but their names still count.
        baselines = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.user_attrs.get("role") == BASELINE]
        field: dict[str, Contender] = {}
        for t in baselines + top:
            flags = t.user_attrs["flags"]
            role = t.user_attrs.get("role", SEARCH)
            name = t.user_attrs.get("name") or f"trial {t.number}"
            if flags in field:  # one placement, measured once: a second baseline's name joins the first
                if role == BASELINE and name not in field[flags].name:
                    field[flags].name += f" = {name}"
                continue
            field[flags] = Contender(name, role, t.number, Placement.from_dict(t.user_attrs["placement"]), flags)
        unmeasured = []
        retried = retried_numbers(self.study.get_trials(deepcopy=False))
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.PRUNED, TrialState.FAIL)):
            ua = t.user_attrs
            if ua.get("role") == BASELINE and t.number not in retried and "duplicate_of" not in ua:
                unmeasured.append(Row(ua.get("name", ""), BASELINE, t.number, ua.get("flags", ""),
                                      "does not fit" if "predicted not to fit" in ua.get("reason", "") else
                                      t.state.name.lower(), ua.get("reason", ""), None, None, {}))
        return list(field.values()), unmeasured

    def _first_round_width(self) -> int:
        """How many search trials the first final round measures: --top-k, and with several rounds twice that
        (the rounds after the first keep the --top-k fastest)."""
        c = self.config
        return c.top_k * FIRST_ROUND_WIDTH if c.final_rounds > 1 else c.top_k

    def final_measure(self, on_measured: Callable[[Contender, int], None] | None = None) -> Decision | None:
        """Re-measure the field interleaved, then decide. None when nothing could be measured."""
        c = self.config
        field, unmeasured = self.contenders()
        if not field:
            return None
        with self.workers.working():
            keep = c.top_k if c.objective != "pareto" and c.final_rounds > 1 else None
            run_rounds(self.runner, c.model, field, c.workload, c.final_rounds, on_measured, keep,
                       "latency" if c.objective == "pareto" else c.objective)
        self.final_field = field
        return decide(field, "latency" if c.objective == "pareto" else c.objective, c.workload, c.min_pp,
                      unmeasured)

    def front(self) -> list[Contender]:
        """For pareto: the final round's own front (no placement twice), --min-pp applied."""
        field = [f for f in self.final_field if not f.is_baseline]
        if self.config.min_pp is not None:
            field = [f for f in field if f.pp and sorted(f.pp)[len(f.pp) // 2] >= self.config.min_pp]
        return pareto_front(field)

    def no_winner_reason(self) -> str:
        """Why no trial could be named the winner, in one line."""
        complete = self._complete()
        if self.config.min_pp is not None and complete:
            best_pp = max(t.user_attrs.get("pp") or 0 for t in complete)
            return (f"no placement reached --min-pp {self.config.min_pp:g} t/s (the fastest prompt processing "
                    f"measured was {best_pp:.1f} t/s); lower --min-pp or widen the search space")
        return "no trial finished successfully; trials.csv lists each one's reason (placetune bench shows one run)"



def _needs_from(record: dict[str, dict[str, int]]) -> dict[str, DeviceNeed]:
    """A FitVerdict.to_dict()'s need, as stored with a trial, back into DeviceNeeds."""
    return {d: DeviceNeed(**{k: v for k, v in n.items() if k != "total"}) for d, n in record.items()}


def best_record(search: Search, decision: Decision) -> BestRecord:
    """best.json for the decision: the winner's final-round measurement and every row against it."""
    from placetune.predict import prediction_record

    c = search.config
    winner = decision.winner
    m = winner.measurement(c.workload)
    objective = "latency" if c.objective == "pareto" else c.objective
    trials = search.study.get_trials(deepcopy=False)
    model = str(c.model.resolve())
    front = [{"name": f.name, "trial": f.trial, "flags": f.flags, "pp": Stats(tuple(f.pp), c.workload.n_prompt)
              .to_dict(), "tg": Stats(tuple(f.tg), c.workload.n_gen).to_dict()}
             for f in search.front()] if c.objective == "pareto" else []
    return BestRecord(
        model={"path": model, "header_hash": c.anatomy.header_hash, "total_bytes": c.anatomy.total_bytes,
               "arch": c.anatomy.facts.arch},
        machine=c.machine.to_dict(),
        llama_build=m.build or c.machine.llama_build,
        study={"name": search.study.study_name, "storage": mask_url(c.storage), "objective": c.objective,
               "trials": len(trials), "winner_trial": winner.trial,
               "fingerprints": sorted({t.user_attrs["fingerprint"] for t in counted(trials)
                                       if "fingerprint" in t.user_attrs})},
        workload=c.workload.to_dict(),
        serving=c.serving.to_dict(),
        runner=c.runner_name,
        rpc=list(c.rpc),
        placement=winner.placement.to_dict(),
        flags=render_flags(winner.placement),
        server_command=render_server_command(model, winner.placement, rpc=c.rpc),
        measurement=m.to_dict(),
        objective_value=objective_value(objective, m.pp.median, m.tg.median, c.workload),
        decision=decision.to_dict(),
        rows=[r.to_dict() for r in decision.rows],
        front=front,
        predicted=prediction_record(c.anatomy, winner.placement, c.devices, search.bandwidths,
                                    measured_tg=m.tg.median or None),
        memory={"predicted": search.feasibility(winner.placement).to_dict()["need"], "reported": m.reported,
                "margins": search.margins.to_dict()},
        notes=[decision.message] + ([decision.noise_warning] if decision.noise_warning else []),
    )
