"""What fits on the twin's GPUs: placetune's own memory model, plus an error the search does not know.

A real card runs out of memory where the real allocation exceeds free memory, not where
placetune's estimate does. The twin takes placetune's prediction per card (weights and KV exact,
compute buffer estimated) and adds a hidden per-scenario error to the estimated part of each, so
that near the cliff a search meets OOMs (or, on a machine that spills, the spill cliff) as it would
on a card. Every card is judged on its own: one card over its capacity is enough to fail the load.

`placetune_need` is the only call into placetune.memory, so a change to its signature is one edit.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from placetune.anatomy import Anatomy
from placetune.memory import DeviceNeed, predict_memory
from placetune.placement import Placement
from placetune.twin.machine import MIB, TwinMachine

GPU = "CUDA0"
DEVICES = (GPU,)
OK, SPILL, OOM = "ok", "spill", "oom"
FIT_MARGIN = 1024 * MIB  # llama.cpp's default -fitt target (common/common.h: fit_params_target)


def placetune_need(anatomy: Anatomy, placement: Placement, n_ctx: int,
                   devices: Sequence[str] = DEVICES) -> dict[str, DeviceNeed]:
    """placetune's predicted bytes per device for a placement (placetune.memory.predict_memory)."""
    return predict_memory(anatomy, placement, devices, n_ctx)


@dataclass(frozen=True)
class HiddenError:
    """How the real allocation differs from placetune's estimate on one scenario.

    compute_scale multiplies the estimated compute buffer (real ones depend on kernels and graph
    shape); extra_bytes is what the estimate leaves out (cuBLAS workspace, fragmentation).
    """

    compute_scale: float
    extra_bytes: int

    @classmethod
    def draw(cls, seed: int) -> HiddenError:
        """A scenario's error: compute buffer x 0.8-1.8 and 200-800 MiB unaccounted, fixed by the seed.

        Wide enough that near the cliff the search's 512 MiB margin sometimes does not cover it."""
        rng = random.Random(seed)
        return cls(round(rng.uniform(0.8, 1.8), 3), int(rng.uniform(200, 800)) * MIB)




def true_device_bytes(need: Mapping[str, DeviceNeed], error: HiddenError,
                      devices: Sequence[str] = DEVICES) -> dict[str, int]:
    """What each card really allocates for a placement whose predicted need is `need` (0 for an unused card).

    Each card has its own compute buffer and its own unaccounted bytes (cuBLAS workspace, fragmentation), so
    the error applies to each."""
    out = {}
    for dev in devices:
        n = need.get(dev)
        out[dev] = 0 if n is None or n.total == 0 else \
            n.weights + n.kv + round(n.compute * error.compute_scale) + error.extra_bytes
    return out


def fit_state(device_bytes: Mapping[str, float], cpu_bytes: float, machine: TwinMachine) -> str:
    """ok, spill (some card past capacity, within what the driver spills to shared memory) or oom (any card
    past that, or RAM)."""
    if cpu_bytes > machine.ram_bytes:
        return OOM
    state = OK
    for dev, gpu in zip(machine.devices, machine.gpus, strict=True):
        used = device_bytes.get(dev, 0)
        if used > gpu.free_bytes + machine.spill_bytes:
            return OOM
        if used > gpu.free_bytes:
            state = SPILL
    return state
