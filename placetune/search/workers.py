"""Workers of one study: a registry with heartbeats, the trial-budget lock, and retries of lost trials.

Several workers join one study by sharing its storage (PostgreSQL across hosts). Optuna's trial
heartbeats let a surviving worker fail a dead worker's trial and queue it again. placetune adds a
registry in the study, so that two workers on one machine, or on different hardware, are refused.

Machines are told apart by the kernel's boot id, not the hostname: containers on one machine share a
boot id (and disturb each other's measurements), while two machines may carry the same hostname. A
process id means something only inside its own pid namespace on that boot, so a worker's death is
decided from its pid only there; anywhere else its heartbeat decides.
"""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from placetune.errors import PlacetuneError

MAX_RETRY = 3  # a trial whose worker died, or that was interrupted, is run again at most this many times
WORKER_KEY = "placetune:worker:"  # study system attrs: one entry per worker process
LOCK_CLASS = 0x706C7475  # PostgreSQL advisory lock class ("pltu"); its object id is the study's id
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# User attributes a retried trial keeps: what it is (a baseline's exact placement), not the lost run's notes.
KEPT_ON_RETRY = ("role", "name", "kind", "candidate")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return socket.gethostname()


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


class Identity:
    """This worker process: a unique id, its machine (boot id), pid namespace and pid."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.host = socket.gethostname()
        self.boot = _boot_id()
        self.pidns = _pid_namespace()
        self.pid = os.getpid()

    def attrs(self) -> dict[str, Any]:
        return {"worker": self.id, "host": self.host, "boot": self.boot, "pidns": self.pidns, "pid": self.pid}

    def same_machine(self, other: dict[str, Any]) -> bool:
        return other.get("boot") == self.boot

    def certainly_dead(self, other: dict[str, Any]) -> bool:
        """True only where the other's pid can be checked: same machine, same pid namespace, pid gone."""
        pid = other.get("pid")
        if not pid or not self.same_machine(other) or other.get("pidns") != self.pidns:
            return False
        return not pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Workers:
    """The study's worker registry, this worker's heartbeat, and the lock around trial creation."""

    def __init__(self, study: optuna.Study, storage: BaseStorage, fingerprint: str, grace_s: int,
                 heartbeat_s: int) -> None:
        self.study, self.storage = study, storage
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.me = Identity()
        self.fingerprint, self.grace_s, self.heartbeat_s = fingerprint, grace_s, heartbeat_s
        self._lock: Connection | None = None

    @property
    def key(self) -> str:
        return f"{WORKER_KEY}{self.me.id}"

    def _set(self, **fields: Any) -> None:
        entry = {**self.me.attrs(), "fingerprint": self.fingerprint, **fields}
        self.storage.set_study_system_attr(self.study_id, self.key, entry)

    def register(self, allow_colocated: bool) -> list[str]:
        """Join the registry; refuse when another live worker of the study runs on this machine.

        Each worker registers before it looks, so two started together can both refuse, never both run.
        Returns notes to print (a colocated worker that was allowed in).
        """
        self._set(seen=time.time())
        others = self.colocated()
        if others and not allow_colocated:
            self._set(seen=None)  # refused: not a worker of this study
            raise PlacetuneError(
                f"another placetune worker (pid {others[0]['pid']} on {others[0]['host']}) is running study "
                f"{self.study.study_name!r} on this machine; two workers on one machine disturb each other's "
                "measurements. Pass --allow-colocated-workers only if each worker has its own CPU cores and devices"
            )
        return [f"sharing this machine with worker pid {w['pid']} (--allow-colocated-workers)" for w in others[:1]]

    def colocated(self) -> list[dict[str, Any]]:
        """Other live workers of this study on this machine: heartbeat fresh, and pid alive where checkable."""
        attrs = self.storage.get_study_system_attrs(self.study_id)
        now = time.time()  # entries from this machine were stamped by this machine's clock
        return [w for k, w in attrs.items()
                if k.startswith(WORKER_KEY) and k != self.key and self.me.same_machine(w)
                and w.get("seen") is not None and now - w["seen"] <= self.grace_s and not self.me.certainly_dead(w)]

    @contextmanager
    def working(self) -> Iterator[None]:
        """Keep this worker's registry entry fresh while it measures."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                # A database hiccup: the next beat tries again, and the trials themselves fail loudly meanwhile.
                with suppress(StorageInternalError, SQLAlchemyError):
                    self._set(seen=time.time())

        self._set(seen=time.time())
        thread = threading.Thread(target=beat, name="placetune-worker-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def fail_orphans(self) -> None:
        """Trials left RUNNING by a killed worker whose death is certain here: fail and requeue them now.

        That spares a restarted worker the heartbeat grace period. Whichever path fails a trial first
        wins; the other sees it finished.
        """
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not self.me.certainly_dead(t.user_attrs):
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
            try:
                self.storage.set_trial_user_attr(trial_id, "reason", "search process died during this trial")
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # another worker's heartbeat check failed it first and requeued it
            retry_trial(self.study, self.storage.get_trial(trial_id))

    def requeue_interrupted(self) -> None:
        """Trials stopped by Ctrl-C or by a missing binary are not results: queue each again, once."""
        trials = self.study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        for t in trials:
            if t.state == TrialState.FAIL and t.user_attrs.get("retry") and t.number not in retried:
                retry_trial(self.study, t)

    @contextmanager
    def budget_lock(self) -> Iterator[None]:
        """Hold the study's lock from counting trials until the next trial exists (PostgreSQL only).

        Without it, two workers that both see one trial left would both start one; and two workers
        enqueueing the same seeds would queue them twice. On SQLite (one machine) a second worker is
        refused unless --allow-colocated-workers is given.
        """
        engine = getattr(self.storage, "engine", None)
        if engine is None or engine.dialect.name != "postgresql":
            yield
            return
        self._lock = engine.connect()
        try:
            self._lock.execute(text("SELECT pg_advisory_xact_lock(:lock, :study)"),
                               {"lock": LOCK_CLASS, "study": self.study_id})
            yield
        finally:
            self.release()

    def release(self) -> None:
        """End the lock's transaction early (the trial being created exists now: others may count it)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a lost trial again with its parameters (and, for a baseline, its exact placement).

    Only trials whose worker died or that were interrupted come here: a llama.cpp OOM or crash is a
    result of the placement, recorded by a live worker, and never retried.
    """
    fresh = copy.copy(trial)
    fresh.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in KEPT_ON_RETRY}
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, fresh)


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were queued again (each retry lists the trials it replaces)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Finished trials that count towards n_trials: not a retried one, not a repeat of a measured placement."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.state in FINISHED and t.number not in retried
            and "duplicate_of" not in t.user_attrs]
