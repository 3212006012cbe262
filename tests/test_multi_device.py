"""Several accelerators, on two real RPC devices (RPC0, RPC1): layers split by -ts, experts pinned to another
device or to RAM, every rule where llama.cpp's own log and buffer sizes say it went."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from placetune.anatomy import read_anatomy
from placetune.device_bytes import bytes_per_buffer, layer_devices
from placetune.memory import check_fit, predict_memory
from placetune.placement import ExpertRule, Placement, parse_flags, render_args
from placetune.runners import get_runner
from placetune.runners.base import Workload

DEVICES = ["RPC0", "RPC1"]
QUICK = Workload(n_prompt=16, n_gen=4, repetitions=1, warmups=0, timeout_s=120)


def split_placement() -> Placement:
    """Layers 0-1 on RPC0 and 2-3 plus the head on RPC1 (-ts 2,3 of 5 slots); layer 0's experts on RPC1,
    layer 3's gate and up in RAM. -lm none: llama.cpp then reports exact bytes, not a mapped span."""
    return Placement(n_gpu_layers=999, tensor_split=(2.0, 3.0), split_mode="layer", threads=1, repack=False,
                     load_mode="none", overrides=(ExpertRule(layers=(0,), buft="RPC1"),
                                                  ExpertRule(layers=(3,), kinds=("up", "gate"), include_bias=False)))


def test_a_split_placement_lands_where_the_plan_says(tiny_moe: Path, rpc_pair: tuple[str, str]) -> None:
    anatomy = read_anatomy(tiny_moe)
    placement = split_placement()
    assert layer_devices(anatomy.facts.n_layers, 999, DEVICES, placement.tensor_split) == \
        ["RPC0", "RPC0", "RPC1", "RPC1", "RPC1"]
    # llama.cpp names the second server's buffer type RPC0[its endpoint]; placetune writes and reads it so.
    args = render_args(placement, rpc=rpc_pair)
    assert f"=RPC0[{rpc_pair[1]}]" in args[args.index("-ot") + 1]
    assert parse_flags(args, rpc=rpc_pair) == placement  # -ts, -sm and a per-device -ot round-trip
    for runner in ("embedded", "llama-bench"):
        m = get_runner(runner, rpc=list(rpc_pair)).measure(tiny_moe, placement, QUICK)
        assert m.ok, (runner, m.reason)
        assert m.placement_issues == [], (runner, m.placement_issues)  # llama.cpp's override lines agree
        assert m.tensor_buffers["blk.0.ffn_down_exps.weight"] == "RPC1"
        assert m.tensor_buffers["blk.3.ffn_gate_exps.weight"] == "CPU"
        predicted = bytes_per_buffer(anatomy, placement, DEVICES, as_allocated=True)
        reported = m.reported["model"]
        assert set(reported) == set(predicted), (reported, predicted)
        for device, size in predicted.items():  # to the 0.01 MiB llama.cpp prints
            assert abs(reported[device] - size) <= 0.01 * 2**20, (runner, device, reported, predicted)


def test_per_device_budgets_prune_as_predicted(tiny_moe: Path, rpc_pair: tuple[str, str]) -> None:
    anatomy = read_anatomy(tiny_moe)
    placement = split_placement()
    need = predict_memory(anatomy, placement, DEVICES, 512)
    roomy = {"CPU": 2**34, "RPC0": need["RPC0"].total, "RPC1": need["RPC1"].total}
    assert check_fit(need, roomy, budgeted={"RPC0", "RPC1"}).fits
    tight = {**roomy, "RPC1": need["RPC1"].total - 1}
    verdict = check_fit(need, tight, budgeted={"RPC0", "RPC1"})
    assert not verdict.fits and verdict.reasons[0].startswith("RPC1:")
    # Moving layer 0's experts back home moves their bytes from RPC1 to RPC0, and only those.
    home = Placement(**{**placement.__dict__, "overrides": placement.overrides[1:]})
    moved = bytes_per_buffer(anatomy, home, DEVICES)
    before = bytes_per_buffer(anatomy, placement, DEVICES)
    layer0 = sum(t.n_bytes for t in anatomy.tensors if t.layer == 0 and t.group.value == "expert")
    assert moved["RPC0"] - before["RPC0"] == layer0 == before["RPC1"] - moved["RPC1"]


def test_a_search_on_two_devices_exports_a_line_verify_launches(tiny_moe: Path, rpc_pair: tuple[str, str],
                                                                 tmp_path: Path) -> None:
    rpc = ",".join(rpc_pair)
    cli = [sys.executable, "-c", "from placetune.cli import main; main()"]
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([*cli, "search", str(tiny_moe), "--rpc", rpc, "--out", str(tmp_path), "--n-trials", "10",
                           "-p", "16", "-n", "4", "-r", "2", "--warmups", "1", "--top-k", "2",
                           "--set", "repack=false"], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "space multi" in done.stdout and "GGML_OP_OFFLOAD_MIN_BATCH is not searched" in done.stdout
    trials = pd.read_csv(next(tmp_path.glob("*/*/trials.csv")))
    names = " ".join(trials["name"].dropna())
    assert "even -ts with --n-cpu-moe" in names and "per card" in names
    assert trials["flags"].str.contains("-ts ").any()  # the sampler splits layers between the two devices
    best = next(tmp_path.glob("*/*/best.json"))
    checked = subprocess.run([*cli, "verify", str(best.parent), "--rpc", rpc], capture_output=True, text=True,
                             timeout=600, env=env)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    assert f"--rpc {rpc}" in checked.stdout and "measured/searched" in checked.stdout
