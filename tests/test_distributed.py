"""Distributed studies against a real PostgreSQL server: several workers, killed workers, refusals.

The session starts a throwaway cluster (initdb + pg_ctl) on 127.0.0.1 in a temporary folder, and
installs Debian's postgresql package first if it is missing. Every test gets its own database.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psutil
import pytest

from placetune.anatomy import read_anatomy
from placetune.hardware import LlamaDevice, Machine
from placetune.runners.base import Measurement, Workload
from placetune.search import Search, SearchConfig, counted, retried_numbers, serving_for
from placetune.space import builtin_space

optuna.logging.set_verbosity(optuna.logging.ERROR)

# Tiny measurements, the same on every worker (a study refuses a different workload), and short heartbeats.
WORKLOAD = ["-p", "16", "-n", "4", "-r", "2", "--warmups", "1", "--set", "repack=false", "--top-k", "1"]
HEARTBEAT = ["--heartbeat", "1", "--grace", "4"]
CLI = [sys.executable, "-c", "from placetune.cli import main; main()"]


def _postgres_bin() -> Path:
    """Debian's PostgreSQL server binaries, installed with apt-get when missing."""

    def found() -> list[str]:
        return sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))

    if not found() and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=False, env=env, capture_output=True)
    if not found():
        pytest.fail("PostgreSQL server binaries not found: apt-get install postgresql (make test does it)")
    return Path(found()[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 for this session: the URL of its `postgres` database, trust auth."""
    bin_dir = _postgres_bin()
    # initdb refuses to run as root: run the server as the postgres user, in a folder it owns.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="placetune-pg-"))
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    pg_ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        subprocess.run([*pg_ctl, "-l", str(root / "server.log"), "-o", options, "-w", "-t", "60", "start"],
                       check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres: str, request: pytest.FixtureRequest) -> str:
    """A fresh database for one test, so that studies and worker registries never leak between tests."""
    import psycopg

    name = request.node.name.lower().replace("[", "_").replace("]", "")[:60]
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres.rsplit("/", 1)[0] + f"/{name}"


def search_cmd(model: Path, url: str, out: Path, n_trials: int, *extra: str) -> list[str]:
    return [*CLI, "search", str(model), "--storage", url, "--out", str(out), "--n-trials", str(n_trials),
            *WORKLOAD, *HEARTBEAT, *extra]


def start(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "250"})


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def only_study(url: str) -> optuna.Study:
    (name,) = optuna.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url)


def wait_until_measuring(proc: subprocess.Popen[str], url: str) -> None:
    """Wait until the worker's study has a trial, failing fast if the worker exits first."""
    deadline = time.monotonic() + 120
    while not optuna.get_all_study_names(url) or not only_study(url).trials:
        if proc.poll() is not None or time.monotonic() > deadline:
            rc, out, err = finish(proc)
            pytest.fail(f"the worker exited ({rc}) or never started a trial:\n{err}{out}")
        time.sleep(0.1)


def kill_mid_trial(proc: subprocess.Popen[str], url: str) -> int:
    """SIGKILL a worker (and the llama.cpp run it started) while it measures; return that trial's number."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if optuna.get_all_study_names(url):
            for t in only_study(url).get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                # flags but no status yet: the placement is being measured right now
                if t.user_attrs.get("pid") == proc.pid and "flags" in t.user_attrs and "status" not in t.user_attrs:
                    children = psutil.Process(proc.pid).children(recursive=True)
                    proc.send_signal(signal.SIGKILL)
                    for child in children:
                        child.kill()
                    proc.communicate()
                    return t.number
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    pytest.fail("the worker never measured a trial")


def assert_study_complete(study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """n_trials counted trials, nothing left running or queued, numbers unique, no placement measured twice."""
    trials = study.get_trials(deepcopy=False)
    assert len(counted(trials)) == n_trials, [(t.number, t.state.name) for t in trials]
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state.is_finished() for t in trials), [(t.number, t.state.name) for t in trials]
    measured = [t.user_attrs["flags"] for t in trials
                if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    assert len(measured) == len(set(measured)), measured
    return trials


def test_two_workers_share_one_study(tiny_moe: Path, pg_url: str, tmp_path: Path) -> None:
    colocated = ["--allow-colocated-workers"]  # both run on this host
    workers = [start(search_cmd(tiny_moe, pg_url, tmp_path / f"w{i}", 10, *colocated)) for i in range(2)]
    results = [finish(w) for w in workers]
    for rc, out, err in results:
        assert rc == 0, err + out
    trials = assert_study_complete(only_study(pg_url), 10)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both measured
    seeds = [t.user_attrs["name"] for t in trials if "name" in t.user_attrs]
    assert len(seeds) == len(set(seeds)) > 0  # both enqueued them, each seed once
    assert any("sharing" in out for _, out, _ in results)  # the override is said out loud
    for i in range(2):
        best = json.loads(next((tmp_path / f"w{i}").glob("*/*/best.json")).read_text())
        assert best["study"]["storage"] == pg_url and len(best["study"]["fingerprints"]) == 1


def test_sigkilled_worker_trial_is_failed_by_heartbeat_and_retried(tiny_moe: Path, pg_url: str,
                                                                   tmp_path: Path) -> None:
    # A longer prompt than WORKLOAD's (the last -p/-n win): each measurement then takes a few hundred ms, so the
    # victim is caught mid-measurement, not only between its few-ms measurements.
    colocated = ["--allow-colocated-workers", "-p", "1024", "-n", "128"]
    survivor = start(search_cmd(tiny_moe, pg_url, tmp_path / "b", 20, *colocated))
    # The survivor is already past its start-up check for dead pids on this host, so only the heartbeat can tell.
    wait_until_measuring(survivor, pg_url)
    victim = start(search_cmd(tiny_moe, pg_url, tmp_path / "a", 20, *colocated))
    killed = kill_mid_trial(victim, pg_url)
    done = {t.number: t.values for t in only_study(pg_url).trials if t.state.name == "COMPLETE"}
    rc, out, err = finish(survivor)
    assert rc == 0, err + out
    trials = assert_study_complete(only_study(pg_url), 20)
    assert {t.number: t.values for t in trials if t.number in done} == done  # nothing finished was lost
    dead = trials[killed]
    assert dead.state.name == "FAIL"
    # failed by the heartbeat check, not by the same-host pid check
    assert "reason" not in dead.user_attrs, dead.user_attrs.get("reason")
    retries = [t for t in trials if t.system_attrs.get("retry_history") == [killed]]
    assert len(retries) == 1 and retries[0].params == dead.params
    assert retries[0].user_attrs["pid"] == survivor.pid and retries[0].state.name in ("COMPLETE", "PRUNED")


def test_second_worker_on_one_host_is_refused_until_the_first_dies(tiny_moe: Path, pg_url: str,
                                                                    tmp_path: Path) -> None:
    first = start(search_cmd(tiny_moe, pg_url, tmp_path / "a", 200))
    try:
        wait_until_measuring(first, pg_url)
        rc, out, err = finish(start(search_cmd(tiny_moe, pg_url, tmp_path / "b", 200)))
        assert rc == 2 and len(err.strip().splitlines()) == 1, err + out
        assert f"pid {first.pid}" in err and "--allow-colocated-workers" in err
        killed = kill_mid_trial(first, pg_url)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    # The dead worker's pid is gone: a restart on this host is accepted at once, fails the orphaned
    # trial without waiting for its heartbeat to go stale, and retries it exactly once.
    n = len(only_study(pg_url).trials) + 2
    rc, out, err = finish(start(search_cmd(tiny_moe, pg_url, tmp_path / "b", n)))
    assert rc == 0, err + out
    trials = assert_study_complete(only_study(pg_url), n)
    assert trials[killed].user_attrs["reason"] == "search process died during this trial"
    assert len([t for t in trials if killed in t.system_attrs.get("retry_history", [])]) == 1


def test_fingerprint_mismatch_is_refused(tiny_moe: Path, pg_url: str, tmp_path: Path) -> None:
    rc, out, err = finish(start(search_cmd(tiny_moe, pg_url, tmp_path, 2, "--study-name", "fleet")))
    assert rc == 0, err + out
    study = optuna.load_study(study_name="fleet", storage=pg_url)
    info = study.user_attrs["placetune"]
    ours = info["fingerprint"]
    # as if another kind of machine had created it
    study.set_user_attr("placetune", {**info, "fingerprint": "0123456789ab"})

    rc, out, err = finish(start(search_cmd(tiny_moe, pg_url, tmp_path, 4, "--study-name", "fleet")))
    assert rc == 2 and len(err.strip().splitlines()) == 1, err + out
    assert "0123456789ab" in err and ours in err and "--allow-mixed-hardware" in err

    rc, out, err = finish(start(search_cmd(tiny_moe, pg_url, tmp_path, 4, "--study-name", "fleet",
                                           "--allow-mixed-hardware")))
    assert rc == 0, err + out
    assert "mixing hardware" in out and "0123456789ab" in out
    trials = optuna.load_study(study_name="fleet", storage=pg_url).trials
    assert len(trials) >= 4 and {t.user_attrs.get("fingerprint") for t in trials if t.number >= 2} == {ours}


@pytest.mark.parametrize("what", ["refused port", "silent server", "missing database", "unknown driver"])
def test_bad_or_unreachable_storage_is_one_line(tiny_moe: Path, postgres: str, tmp_path: Path, what: str) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url, why = {
            "refused port": (f"postgresql://postgres:s3cret@127.0.0.1:{_free_port()}/x", "refused"),
            "silent server": (f"postgresql://postgres:s3cret@127.0.0.1:{silent.getsockname()[1]}/x", "timeout"),
            "missing database": (postgres.rsplit("/", 1)[0] + "/no_such_db", "does not exist"),
            "unknown driver": ("postgresql+nosuchdriver://postgres@127.0.0.1/x", "nosuchdriver"),
        }[what]
        began = time.monotonic()
        rc, out, err = finish(start([*CLI, "search", str(tiny_moe), "--storage", url, "--out", str(tmp_path),
                                     *WORKLOAD]), timeout=120)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cannot open storage" in err, err + out
    assert why in err.split("cannot open storage", 1)[1] and "s3cret" not in err, err
    assert time.monotonic() - began < 60


class FailingRunner:
    """Every placement fails the way an OOM does: a result of the placement, not a dead worker."""

    name = "fake"

    def __init__(self) -> None:
        self.calls = 0

    def measure(self, model: Path, placement: object, workload: Workload) -> Measurement:
        self.calls += 1
        return Measurement("fake", "oom", reason="out of memory")


def test_failed_measurements_are_results_not_retries(tiny_moe: Path, pg_url: str) -> None:
    cpu = LlamaDevice("CPU", "test cpu", "CPU", 2**34, 2**34)
    machine = Machine("test", "test cpu", 4, 8, 2**34, 2**34, [], [cpu], {"test": "fake"})
    anatomy, workload = read_anatomy(tiny_moe), Workload(16, 4, 0, 2, 0)
    cfg = SearchConfig(model=tiny_moe, anatomy=anatomy, machine=machine, space=builtin_space("cpu"),
                       workload=workload, serving=serving_for(anatomy, workload), n_trials=5, storage=pg_url,
                       heartbeat_s=1, grace_s=2)
    runner = FailingRunner()
    search = Search(cfg, runner)
    search.enqueue_seeds()
    search.run()
    trials = search.study.trials
    # A failed measurement is pruned with its reason (so the sampler learns), and never retried.
    assert len(trials) == 5 and {t.state.name for t in trials} == {"PRUNED"}
    failed = [t for t in trials if t.user_attrs.get("status") not in (None, "ok")]
    assert not retried_numbers(trials) and runner.calls == len(failed)
