"""Backend environment knobs (GGML_OP_OFFLOAD_MIN_BATCH, ...): they reach the llama.cpp process of every
runner, count in the embedded runner's reuse key, and every export carries them."""

from __future__ import annotations

import shlex
import sys
import threading
import time
import types
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import yaml

from placetune.export import export
from placetune.placement import Placement, parse_flags
from placetune.results import BestPlan
from placetune.runners import get_runner
from placetune.runners.base import Workload

KNOB = ("GGML_OP_OFFLOAD_MIN_BATCH", "96")
# Long enough that the child is still there when it is looked at.
SLOW = Workload(n_prompt=512, n_gen=64, repetitions=3, warmups=1, timeout_s=120)


def child_environments(runner_name: str, model: Path, placement: Placement) -> list[dict[str, str]]:
    """Run one measurement and, meanwhile, read the environment of every llama.cpp child it starts."""
    seen: list[dict[str, str]] = []
    done = threading.Event()

    def watch() -> None:
        me = psutil.Process()
        while not done.is_set():
            for child in me.children(recursive=True):
                try:
                    line = child.cmdline()
                    # Measuring, not a probe (--version), and past exec (a fork still runs pytest's command line).
                    measuring = line and Path(line[0]).name.startswith("llama-") and "-m" in line
                    if measuring or "placetune.runners.embedded_child" in line:
                        seen.append(child.environ())
                except psutil.Error:
                    pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    runner = get_runner(runner_name)
    try:
        m = runner.measure(model, placement, SLOW)
    finally:
        done.set()
        watcher.join()
        if hasattr(runner, "close"):
            runner.close()
    assert m.ok, m.reason
    return seen


@pytest.mark.parametrize("runner", ["embedded", "llama-bench", "llama-server"])
def test_knobs_reach_the_llama_cpp_process(runner: str, tiny_moe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_ARG_N_GPU_LAYERS", "7")  # the user's environment must not change the measured line
    placement = Placement(repack=False, threads=1, env=(KNOB,))
    envs = child_environments(runner, tiny_moe, placement)
    assert envs and all(e.get(KNOB[0]) == KNOB[1] for e in envs)
    assert all("LLAMA_ARG_N_GPU_LAYERS" not in e for e in envs)


def test_a_changed_knob_starts_a_new_embedded_child(tiny_moe: Path) -> None:
    runner = get_runner("embedded", reuse=True)
    quick = Workload(n_prompt=16, n_gen=4, repetitions=1, warmups=0)
    try:
        first = runner.measure(tiny_moe, Placement(repack=False, env=(KNOB,)), quick)
        same = runner.measure(tiny_moe, Placement(repack=False, env=(KNOB,), threads=1), quick)
        other = runner.measure(tiny_moe, Placement(repack=False, env=(("GGML_OP_OFFLOAD_MIN_BATCH", "32"),)), quick)
    finally:
        runner.close()
    assert not first.build["reused_model"] and same.build["reused_model"] and not other.build["reused_model"]


def test_every_export_carries_the_knobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    placement = Placement(n_gpu_layers=10, ctx=4096, parallel=1, env=(KNOB,))
    plan = BestPlan({"model": {"path": str(tmp_path / "m.gguf")}, "placement": placement.to_dict(),
                     "workload": {"n_prompt": 16, "n_gen": 4}})
    server = export(plan, "server")
    assert server.startswith("GGML_OP_OFFLOAD_MIN_BATCH=96 llama-server ")
    assert parse_flags(server) == replace(placement, flash_attn="auto")
    assert shlex.split(export(plan, "bench").split("\n")[0])[0] == "GGML_OP_OFFLOAD_MIN_BATCH=96"
    entry = yaml.safe_load(export(plan, "llama-swap"))["models"]["m"]
    assert entry["env"] == ["GGML_OP_OFFLOAD_MIN_BATCH=96"] and "GGML_OP" not in entry["cmd"]
    assert "GGML_OP_OFFLOAD_MIN_BATCH=96" in export(plan, "flags")  # as a comment after the flags
    seen: dict = {}
    fake = types.ModuleType("llama_cpp")
    fake.Llama = lambda **kw: seen.update(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    monkeypatch.setenv(KNOB[0], "")  # recorded, so the value the snippet sets is undone after the test
    monkeypatch.delenv(KNOB[0])
    import os

    exec(compile(export(plan, "python"), "<export>", "exec"), {})
    assert os.environ[KNOB[0]] == "96" and seen["n_gpu_layers"] == 10
    with pytest.raises(Exception, match="not a variable name"):
        Placement(env=(("BAD NAME", "1"),))
