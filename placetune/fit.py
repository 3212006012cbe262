"""llama.cpp's own answer, as a seed: run `llama-fit-params` and read its flags back into search parameters.

`--fit` fills device memory by llama.cpp's memory model and never measures speed. Seeding the search
with its answer means placetune can only match or beat it. Both see the same memory: a placetune
budget becomes llama-fit-params' per-device margin (free memory minus the budget).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from placetune.anatomy import Anatomy, Group
from placetune.errors import PlacetuneError
from placetune.placement import layer_devices, parse_flags, tensor_buffer
from placetune.runners.binaries import find_binary, run_to_end
from placetune.space import moe_layers

MIB = 2**20


def fit_margins(devices: Sequence[tuple[str, int]], budgets: Mapping[str, int], default_margin: int) -> list[int]:
    """Per-device -fitt margins in MiB, in llama.cpp's device order: free memory minus the budget."""
    margins = []
    for name, free in devices:
        budget = budgets.get(name)
        margin = free - budget if budget is not None else default_margin
        margins.append(max(0, -(-margin // MIB)))  # rounded up: fit may use no more than the budget
    return margins


def fit_params(model: Path, anatomy: Anatomy, margins: Sequence[int], n_ctx: int, rpc: Sequence[str] = (),
               bin_dir: str | Path | None = None, timeout_s: float = 120.0) -> tuple[dict[str, Any] | None, str]:
    """Search parameters for llama-fit-params' answer, or None and why not."""
    try:
        binary = find_binary("llama-fit-params", bin_dir)
    except PlacetuneError as exc:
        return None, str(exc)
    command = [str(binary), "-m", str(model), "-fitt", ",".join(map(str, margins)), "-fitc", str(n_ctx)]
    if rpc:
        command += ["--rpc", ",".join(rpc)]
    run = run_to_end(command, timeout_s)
    if run.timed_out:
        return None, f"llama-fit-params did not answer in {timeout_s:.0f} s"
    lines = [line for line in run.stdout.splitlines() if line.strip().startswith("-")]
    if run.returncode != 0 or not lines:
        tail = (run.log.strip().splitlines() or ["no output"])[-1]
        return None, f"llama-fit-params failed: {tail[:200]}"
    try:
        placement = parse_flags(lines[-1])
    except PlacetuneError as exc:
        return None, f"llama-fit-params answered {lines[-1]!r}, which placetune cannot read: {exc}"
    n = anatomy.facts.n_layers
    ngl = placement.n_gpu_layers
    params: dict[str, Any] = {"n_gpu_layers": n + 1 if ngl is None or ngl < 0 or ngl > n else ngl,
                              "cpu_moe_layers": 0}
    # fit writes its own -ot rules (they may also catch a layer's router); the nearest point of the
    # search space is: which MoE layers have every routed-expert tensor sent to CPU.
    layer_dev = layer_devices(n, params["n_gpu_layers"], ["ACCEL"])
    on_cpu = []
    for layer in moe_layers(anatomy):
        experts = [t for t in anatomy.tensors if t.layer == layer and t.group is Group.EXPERT]
        if experts and all(tensor_buffer(t, placement, layer_dev) == "CPU" for t in experts):
            on_cpu.append(layer)
    if on_cpu:
        layers = moe_layers(anatomy)
        idx = [layers.index(x) for x in on_cpu]
        position = "first" if idx == list(range(len(idx))) else (
            "last" if idx == list(range(len(layers) - len(idx), len(layers))) else "block")
        params.update(cpu_moe_layers=len(on_cpu), cpu_moe_position=position, cpu_moe_kinds="all")
        if position == "block":
            params["cpu_moe_start"] = idx[0]
    return params, lines[-1]
