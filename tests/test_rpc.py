"""The RPC device rig: a real second device (ggml-rpc-server on 127.0.0.1) so placement really moves bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import on_rpc_cpu

from placetune.anatomy import Group, read_anatomy
from placetune.device_bytes import bytes_per_buffer
from placetune.memory import predict_memory
from placetune.placement import ExpertRule, Placement, render_server_command
from placetune.runners import get_runner
from placetune.runners.base import Workload
from placetune.runners.binaries import find_binary
from placetune.runners.llama_server import free_port, running_server
from placetune.space import to_placement

# -lm none: with mmap, llama.cpp reports the mapped file span of CPU tensors (which can include
# tensors that live elsewhere), not their exact bytes.
ALL_ON_RPC = Placement(n_gpu_layers=999, threads=1, repack=False, load_mode="none")
EXPERTS_ON_CPU = Placement(n_gpu_layers=999, overrides=(ExpertRule(layers=None),), threads=1, repack=False,
                           load_mode="none")
WORKLOAD = Workload(n_prompt=32, n_gen=32, repetitions=5, warmups=2, timeout_s=120)


def close(reported: int, predicted: int) -> bool:
    """llama.cpp pads each tensor to its buffer's alignment; allow that and nothing more."""
    return abs(reported - predicted) <= 0.02 * predicted + 64 * 1024


@pytest.mark.parametrize("runner_name", ["embedded", "llama-bench"])
def test_rpc_placement_moves_real_bytes_and_changes_speed(runner_name: str, tiny_moe: Path, rpc_server: str) -> None:
    anatomy = read_anatomy(tiny_moe)
    runner = get_runner(runner_name, rpc=[rpc_server])
    with on_rpc_cpu():
        on_rpc = runner.measure(tiny_moe, ALL_ON_RPC, WORKLOAD)
        on_cpu = runner.measure(tiny_moe, EXPERTS_ON_CPU, WORKLOAD)
    assert on_rpc.ok and on_cpu.ok, (on_rpc.reason, on_cpu.reason)
    for m, placement in ((on_rpc, ALL_ON_RPC), (on_cpu, EXPERTS_ON_CPU)):
        predicted = bytes_per_buffer(anatomy, placement, ["RPC0"])
        assert set(m.device_memory) == set(predicted)
        for device, size in predicted.items():
            assert close(m.device_memory[device], size), (device, m.device_memory, predicted)
    assert on_cpu.device_memory["CPU"] - on_rpc.device_memory["CPU"] > 0.9 * anatomy.expert_bytes
    assert not on_cpu.placement_issues
    # Different devices, different speed: here about 4-5x apart, far beyond run-to-run noise.
    fast, slow = sorted((on_rpc.tg.median, on_cpu.tg.median), reverse=True)
    assert fast > 1.5 * slow, (on_rpc.tg.samples, on_cpu.tg.samples)


def test_search_with_rpc_budget_prunes_and_respects_it(tiny_moe: Path, rpc_server: str, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    budget = anatomy.total_bytes // 2
    proc = subprocess.run(
        [sys.executable, "-c", "from placetune.cli import main; main()", "search", str(tiny_moe),
         "--rpc", rpc_server, "--budget", f"RPC0={budget}", "--out", str(tmp_path), "--n-trials", "10",
         "-p", "16", "-n", "4", "-r", "2", "--warmups", "1", "--top-k", "2", "--set", "repack=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "space moe" in proc.stdout
    trials = pd.read_csv(next(tmp_path.glob("*/*/trials.csv")))
    infeasible = trials[trials["reason"].fillna("").str.startswith("predicted not to fit")]
    assert len(infeasible) > 0 and infeasible["pp"].isna().all()  # pruned before any launch: nothing measured
    seeds = " = ".join(trials["name"].dropna())
    assert "best by the bandwidth model" in seeds and "llama-fit-params for the budget" in seeds
    best = json.loads(next(tmp_path.glob("*/*/best.json")).read_text())
    assert best["predicted"]["label"] == "PREDICTED" and best["predicted"]["tg"] > 0
    placement = Placement.from_dict(best["placement"])
    need = predict_memory(anatomy, placement, ["RPC0"], placement.ctx)
    assert "RPC0" not in need or need["RPC0"].total <= budget
    assert best["measurement"]["device_memory"].get("RPC0", 0) <= budget


def test_exported_server_line_with_rpc_answers_health(tiny_moe: Path, rpc_server: str) -> None:
    port = free_port()
    command = render_server_command(str(tiny_moe), ALL_ON_RPC, binary=str(find_binary("llama-server")),
                                    port=port, rpc=[rpc_server])
    with running_server(command, port, timeout_s=120) as server, \
            urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
        assert response.status == 200


def test_unreachable_rpc_endpoint_is_one_line_not_a_hang(tiny_moe: Path) -> None:
    closed = free_port()
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", "from placetune.cli import main; main()", "bench", str(tiny_moe),
         "--rpc", f"127.0.0.1:{closed}", "--", "-ngl", "99"],
        capture_output=True, text=True, timeout=60,
    )
    assert time.monotonic() - started < 30
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{closed} is unreachable" in lines[0]


@pytest.mark.parametrize("runner_name", ["embedded", "llama-bench"])
def test_interleaved_experts_land_where_asked_on_the_rpc_rig(runner_name: str, tiny_moe: Path,
                                                            rpc_server: str) -> None:
    """The search space's interleaved family (every k-th layer from s) as llama.cpp receives it: its -ot rule
    moves exactly those layers' experts to the CPU, and llama.cpp's log says so."""
    anatomy = read_anatomy(tiny_moe)
    params = {"n_gpu_layers": anatomy.facts.n_layers + 1, "cpu_moe_layers": 2, "cpu_moe_position": "interleaved",
              "cpu_moe_start": 1, "cpu_moe_stride": 2, "cpu_moe_kinds": "all", "threads": 1, "repack": False,
              "load_mode": "none"}
    placement = to_placement(params, anatomy)
    assert placement.overrides[0].layers == (1, 3)
    m = get_runner(runner_name, rpc=[rpc_server]).measure(tiny_moe, placement, WORKLOAD)
    assert m.ok, m.reason
    assert not m.placement_issues  # every "buffer type overridden" line matches the rule, and nothing else moved
    predicted = bytes_per_buffer(anatomy, placement, ["RPC0"])
    for device, size in predicted.items():
        assert close(m.device_memory[device], size), (device, m.device_memory, predicted)
    per_layer = {t.layer: 0 for t in anatomy.tensors if t.group is Group.EXPERT}
    for t in anatomy.tensors:
        if t.group is Group.EXPERT:
            per_layer[t.layer] += t.n_bytes
    in_ram = per_layer[1] + per_layer[3]
    all_on_rpc = bytes_per_buffer(anatomy, ALL_ON_RPC, ["RPC0"])
    assert close(all_on_rpc["RPC0"] - m.device_memory["RPC0"], in_ram)
