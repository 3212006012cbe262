"""The command line as a user drives it: bench with each runner, Ctrl-C during a search, hw."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

CLI = [sys.executable, "-c", "from placetune.cli import main; main()"]
ENV = {**os.environ, "COLUMNS": "200"}


@pytest.mark.parametrize("runner", ["embedded", "llama-bench", "llama-server"])
def test_bench_with_each_runner(runner: str, tiny_moe: Path) -> None:
    proc = subprocess.run(
        [*CLI, "bench", str(tiny_moe), "--runner", runner, "-p", "16", "-n", "4", "-r", "2", "--warmups", "1",
         "--json", "--", "-t", "2", "--no-repack", "-ot", r"blk\.0\.ffn_(gate|up)_exps=CPU"],
        capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads(proc.stdout)
    m = doc["measurement"]
    assert m["status"] == "ok" and m["runner"] == runner
    assert len(m["pp"]["samples"]) == 2 and m["tg"]["median"] > 0
    assert m["tensor_buffers"] == {"blk.0.ffn_gate_exps.weight": "CPU", "blk.0.ffn_up_exps.weight": "CPU"}
    assert m["placement_issues"] == []


def test_bench_table_shows_where_tensors_landed(tiny_moe: Path) -> None:
    proc = subprocess.run([*CLI, "bench", str(tiny_moe), "-p", "16", "-n", "4", "-r", "2", "--warmups", "1",
                           "--", "-t", "2", "--no-repack"], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    for text in ("pp16", "tg4", "time-weighted", "where tensors landed", "llama.cpp reported"):
        assert text in proc.stdout


def test_ctrl_c_stops_after_the_current_trial(tiny_moe: Path, tmp_path: Path) -> None:
    args = [*CLI, "search", str(tiny_moe), "--out", str(tmp_path), "--n-trials", "60", "-p", "128", "-n", "32",
            "-r", "3", "--warmups", "1", "--top-k", "1", "--set", "repack=false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    assert proc.stdout is not None
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("trial 2"):
            proc.send_signal(signal.SIGINT)
            break
    output += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 0, "".join(output)
    text = "".join(output)
    assert "stopped after the current trial" in text and "llama-server -m" in text
    storage = f"sqlite:///{tmp_path / 'placetune.db'}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    trials = study.trials
    assert 3 <= len(trials) < 60
    assert not [t for t in trials if t.state.name == "RUNNING"]


def test_hw_json() -> None:
    proc = subprocess.run([*CLI, "hw", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["fingerprint"] and doc["physical_cores"] >= 1
    assert doc["llama_devices"][0]["name"] == "CPU"
    assert doc["gpus"] == []  # no NVIDIA driver here: no GPUs, not an error


def test_hw_lists_rpc_devices(rpc_server: str) -> None:
    proc = subprocess.run([*CLI, "hw", "--json", "--rpc", rpc_server], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = [d["name"] for d in json.loads(proc.stdout)["llama_devices"]]
    assert names == ["CPU", "RPC0"]


def test_second_ctrl_c_stops_at_once_and_the_cut_trial_is_measured_on_resume(tiny_moe: Path, tmp_path: Path) -> None:
    args = [*CLI, "search", str(tiny_moe), "--out", str(tmp_path), "--n-trials", "8", "-p", "2048", "-n", "256",
            "-r", "5", "--warmups", "4", "--top-k", "1", "--set", "repack=false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None and proc.stderr is not None
    output = []
    for line in proc.stdout:
        output.append(line)
        # Each trial takes about a second even when screening stops it after one repetition (4 warm-ups
        # first), so both signals land inside the next trial's measurement.
        if line.startswith("trial 1"):
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
        if "Ctrl-C again stops at once" in line:
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            break
    output += proc.stdout.readlines()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(output) + err
    assert "interrupted" in err and "resume" in err and "Traceback" not in err
    storage = f"sqlite:///{tmp_path / 'placetune.db'}"
    name = optuna.get_all_study_names(storage)[0]
    cut = [t for t in optuna.load_study(study_name=name, storage=storage).trials if t.state.name == "FAIL"]
    assert len(cut) == 1 and "interrupted (Ctrl-C)" in cut[0].user_attrs["reason"]
    # Resuming measures the cut trial again (with its parameters, and its baseline placement if it was one).
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr + done.stdout
    trials = optuna.load_study(study_name=name, storage=storage).trials
    (retry,) = [t for t in trials if t.system_attrs.get("retry_history") == [cut[0].number]]
    assert retry.state.name in ("COMPLETE", "PRUNED") and retry.params == cut[0].params
    assert retry.user_attrs.get("name") == cut[0].user_attrs.get("name")


def test_bench_predicts_every_device_the_runner_fills(tiny_moe: Path, rpc_server: str) -> None:
    """The prediction names the devices llama.cpp fills, not only the CPU: weights predicted on RPC0 equal what
    llama.cpp reported there."""
    proc = subprocess.run([*CLI, "bench", str(tiny_moe), "--rpc", rpc_server, "-p", "16", "-n", "4", "-r", "1",
                           "--warmups", "0", "--", "-ngl", "99", "--no-repack"], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    header = next(line for line in proc.stdout.splitlines() if "RPC0" in line and "group" in line)
    rpc_column = [c.strip() for c in header.split("┃")].index("RPC0")

    def cell(label: str) -> str:
        row = next(line for line in proc.stdout.splitlines() if line.strip("│ ").startswith(label))
        return [c.strip() for c in row.split("│")][rpc_column]

    assert cell("weights PREDICTED") == cell("weights reported") != "-"
