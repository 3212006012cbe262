"""Opening a study: create or join it, describe it once, and refuse to mix what must not be mixed.

A study is one model, one machine and llama.cpp build, one runner, one workload, one serving context
and one search space. Its description is written as a single typed attribute, so a worker that joins
while the creator is still starting sees all of it or none of it.
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.storages import BaseStorage, InMemoryStorage
from pydantic import BaseModel, ConfigDict, ValidationError

from placetune.errors import PlacetuneError
from placetune.records import one_line_error
from placetune.runners.binaries import build_label
from placetune.search.config import SearchConfig
from placetune.search.objective import directions
from placetune.search.workers import retry_trial
from placetune.storage import MEMORY_STORAGE, open_rdb

INFO_KEY = "placetune"
INFO_WAIT_S = 10.0  # how long a joining worker waits for the creator to describe the study
STARTUP_TRIALS = 6


class StudyInfo(BaseModel):
    """What a study measures, written once by its creator and checked by every worker that resumes or joins."""

    model_config = ConfigDict(extra="ignore")

    version: int = 1
    fingerprint: str
    machine: dict[str, Any]
    model: dict[str, Any]
    workload: dict[str, Any]
    serving: dict[str, int]
    objective: str
    runner: str
    build: dict[str, Any]
    space: dict[str, Any]
    rpc: list[str]

    @classmethod
    def of(cls, c: SearchConfig) -> StudyInfo:
        return cls(
            fingerprint=c.machine.fingerprint(), machine=c.machine.to_dict(),
            model={"path": str(c.model.resolve()), "header_hash": c.anatomy.header_hash},
            workload=c.workload.to_dict(), serving=c.serving.to_dict(), objective=c.objective,
            runner=c.runner_name, build=c.machine.llama_build, space=c.space.identity(), rpc=list(c.rpc),
        )


def read_info(study: optuna.Study) -> StudyInfo | None:
    raw = study.user_attrs.get(INFO_KEY)
    if raw is None:
        return None
    try:
        return StudyInfo.model_validate(raw)
    except ValidationError as exc:
        raise PlacetuneError(f"study {study.study_name!r} has a description placetune cannot read "
                             f"({one_line_error(exc)}); pick another --study-name") from None


def _sampler(c: SearchConfig, seed: int) -> optuna.samplers.BaseSampler:
    constraints = _min_pp_constraint if c.min_pp is not None else None
    with warnings.catch_warnings():  # multivariate and group TPE are marked experimental; they are what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constraints_func=constraints,
                                          n_startup_trials=STARTUP_TRIALS)


def _min_pp_constraint(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    return trial.user_attrs.get("constraint") or [0.0]


def open_storage(c: SearchConfig) -> BaseStorage:
    """The study storage with trial heartbeats: a trial whose worker stopped beating is failed and retried.

    "memory" keeps the study in this process only (the twin benchmark: thousands of short searches).
    """
    if c.storage == MEMORY_STORAGE:
        return InMemoryStorage()
    # heartbeats and fail_stale_trials are marked experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return open_rdb(c.storage, heartbeat_interval=c.heartbeat_s, grace_period=c.grace,
                    heartbeat_stale_trial_callback=retry_trial)


def open_study(c: SearchConfig, storage: BaseStorage, worker_tag: str) -> tuple[optuna.Study, list[str]]:
    """Create or join the study, describe it if new, and check this run against its description.

    Returns the study and notes to print (mixed hardware allowed on purpose).
    """
    name = c.study_name or c.default_study_name()
    want = StudyInfo.of(c)
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions(c.objective),
                                    sampler=_sampler(c, c.seed))
    except DuplicatedStudyError:
        # Workers that share a seed would sample the same startup trials: a joiner draws its own.
        seed = (c.seed + zlib.crc32(worker_tag.encode())) % 2**32
        study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(c, seed))
    else:
        study.set_user_attr(INFO_KEY, want.model_dump())
        return study, []
    deadline = time.monotonic() + INFO_WAIT_S
    have = read_info(study)
    while have is None and time.monotonic() < deadline:
        time.sleep(0.2)  # its creator is still describing it
        have = read_info(study)
    if have is None:
        raise PlacetuneError(f"study {name!r} has no placetune description (made by another tool or an older "
                             "placetune); pick another --study-name")
    return study, check_resume(name, have, want, c.allow_mixed_hardware)


def check_resume(name: str, have: StudyInfo, want: StudyInfo, allow_mixed: bool) -> list[str]:
    """Refuse to add trials to a study that measured something else; the message says what differs."""
    other = "or pick another --study-name"
    if have.model.get("header_hash") != want.model.get("header_hash"):
        raise PlacetuneError(f"study {name!r} measured model {have.model.get('path')}, this is "
                             f"{want.model.get('path')} (a different file); {other}")
    if have.objective != want.objective:
        raise PlacetuneError(f"study {name!r} optimises {have.objective}; resume with --objective {have.objective} "
                             f"{other}")
    if have.runner != want.runner:
        raise PlacetuneError(f"study {name!r} was measured with --runner {have.runner}, this run asks for "
                             f"{want.runner}; resume with --runner {have.runner} {other}")
    notes = []
    if have.fingerprint != want.fingerprint:
        what = "llama.cpp build" if have.machine.get("cpu_model") == want.machine.get("cpu_model") else "hardware"
        if not allow_mixed:
            raise PlacetuneError(
                f"study {name!r} was measured on machine {have.fingerprint}, this is {want.fingerprint} "
                f"(different {what}: build {build_label(have.build)} vs {build_label(want.build)}); "
                f"{other}, or pass --allow-mixed-hardware to mix them on purpose")
        notes.append(f"mixing hardware (--allow-mixed-hardware): study {name!r} was measured on machine "
                     f"{have.fingerprint}, this worker is {want.fingerprint}; each trial records its own")
    if have.workload != want.workload:
        raise PlacetuneError(f"study {name!r} used workload {have.workload}; resume with the same "
                             f"--prompt-tokens/--gen-tokens/--depth/--reps/--warmups/--trial-timeout {other}")
    if have.serving != want.serving:
        raise PlacetuneError(f"study {name!r} measured a serving context of {have.serving}; resume with the same "
                             f"--ctx/--slots {other}")
    if have.space != want.space:
        raise PlacetuneError(f"study {name!r} searched space {have.space['name']} with pins {have.space['pinned']}; "
                             f"resume with the same --space and --set {other}")
    return notes

