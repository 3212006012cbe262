"""No llama.cpp child outlives placetune: kill -9 of placetune or of its group, SIGTERM or SIGHUP.

Each test starts a real `placetune` doing long work on a tiny model, waits until its llama.cpp child
runs, ends placetune one way, and checks that the child is gone within seconds and that placetune
left nothing in its temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

CLI = [sys.executable, "-c", "from placetune.cli import main; main()"]
# What tells each runner's llama.cpp child apart in its command line.
CHILD = {"embedded": "placetune.runners.embedded_child", "llama-bench": "llama-bench", "llama-server": "llama-server"}
LONG_BENCH = ["-p", "64", "-n", "16", "-r", "100000", "--warmups", "0", "--", "-t", "1", "--no-repack"]
GONE_WITHIN_S = 15.0  # llama-server gets SIGTERM and a grace period; a killed child goes at once


def start(args: list[str], tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    """placetune in its own session (a group to kill) with a temporary folder of its own to inspect."""
    tmpdir = tmp / "tmp"
    tmpdir.mkdir()
    log = tmp / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([*CLI, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                text=True, start_new_session=True, env={**os.environ, "TMPDIR": str(tmpdir)})
    return proc, tmpdir


def llama_child(proc: subprocess.Popen[str], runner: str, model: Path, timeout_s: float = 120.0) -> psutil.Process:
    """The runner's llama.cpp child among placetune's descendants, once it runs on the model."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"placetune exited with {proc.returncode} before starting llama.cpp"
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                command = child.cmdline()
            except psutil.Error:
                continue
            # llama-server --help and llama-bench --version come first; the measuring child names the model
            if any(CHILD[runner] in part for part in command) and (runner == "embedded" or str(model) in command):
                return child
        time.sleep(0.05)
    raise AssertionError(f"no {runner} child appeared within {timeout_s:.0f} s")


def gone(child: psutil.Process, within_s: float = GONE_WITHIN_S) -> bool:
    """The child has exited (a zombie waiting for init to reap it counts: it holds no memory or port)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def end(proc: subprocess.Popen[str], how: str) -> None:
    if how == "kill -9":
        os.kill(proc.pid, signal.SIGKILL)
    elif how == "kill -9 group":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.Signals[how])


def check_nothing_left(proc: subprocess.Popen[str], child: psutil.Process, tmpdir: Path, how: str) -> None:
    try:
        assert gone(child), f"{child.cmdline()[:3]} still runs {GONE_WITHIN_S:.0f} s after {how} of placetune"
        returncode = proc.wait(timeout=GONE_WITHIN_S)
        assert list(tmpdir.iterdir()) == [], "placetune left temporary files behind"
        if how.startswith("SIG"):  # the Ctrl-C path: cleanup ran, no traceback
            assert returncode != 0 and returncode != -signal.Signals[how]
            stderr = (tmpdir.parent / "stderr.txt").read_text()
            assert "Traceback" not in stderr, stderr
    finally:
        with contextlib.suppress(psutil.Error):
            child.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.parametrize("how", ["kill -9", "kill -9 group", "SIGTERM"])
@pytest.mark.parametrize("runner", ["embedded", "llama-bench", "llama-server"])
def test_bench_child_dies_with_placetune(runner: str, how: str, tiny_moe: Path, tmp_path: Path) -> None:
    proc, tmpdir = start(["bench", str(tiny_moe), "--runner", runner, *LONG_BENCH], tmp_path)
    child = llama_child(proc, runner, tiny_moe)
    end(proc, how)
    check_nothing_left(proc, child, tmpdir, how)


def test_sighup_takes_the_ctrl_c_path(tiny_moe: Path, tmp_path: Path) -> None:
    proc, tmpdir = start(["bench", str(tiny_moe), "--runner", "llama-server", *LONG_BENCH], tmp_path)
    child = llama_child(proc, "llama-server", tiny_moe)
    end(proc, "SIGHUP")
    check_nothing_left(proc, child, tmpdir, "SIGHUP")


def test_search_with_llama_server_killed_as_a_group(tiny_moe: Path, tmp_path: Path) -> None:
    """The issue's repro: `setsid placetune search M --runner llama-server`, then kill -9 -- -PGID."""
    proc, tmpdir = start(["search", str(tiny_moe), "--runner", "llama-server", "--out", str(tmp_path / "out"),
                          "--n-trials", "50", "-p", "64", "-n", "16", "-r", "100000", "--warmups", "0",
                          "--set", "repack=false"], tmp_path)
    child = llama_child(proc, "llama-server", tiny_moe)
    end(proc, "kill -9 group")
    check_nothing_left(proc, child, tmpdir, "kill -9 group")
