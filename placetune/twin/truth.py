"""The noise-free verdict on a placement in a scenario: does it load, spill or run out of memory, and how fast.

The runner draws noisy samples around this; the benchmark scores the search's named winner, the
baselines and the exhaustive optimum by it (SIMULATED, never measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from placetune.memory import DeviceNeed
from placetune.placement import Placement
from placetune.runners.base import Workload
from placetune.twin.capacity import GPU, OOM, fit_state, placetune_need, true_device_bytes
from placetune.twin.model import Speeds, speeds
from placetune.twin.scenarios import Scenario
from placetune.twin.shape import model_shape


@dataclass(frozen=True)
class Truth:
    """What really happens to one placement: its state, what it allocates, and its speeds if it loads."""

    state: str  # ok, spill or oom
    device_bytes: dict[str, int]  # the real allocation on each card
    need: dict[str, DeviceNeed]  # placetune's prediction for the same placement
    speeds: Speeds | None

    @property
    def gpu_bytes(self) -> int:
        """The first card's real allocation (the only card's, on a one-GPU machine)."""
        return self.device_bytes.get(GPU, 0)

    def latency(self, workload: Workload) -> float:
        """Seconds for the workload's request; infinite when the placement does not load."""
        return math.inf if self.speeds is None else self.speeds.latency(workload)


def context_of(placement: Placement, workload: Workload) -> int:
    """The context llama.cpp is given: -c if set, else room for one request (the search's serving context, which
    the exhaustive grid sizes every point for too)."""
    return max(placement.ctx or 0, workload.context_needed)


def judge(scenario: Scenario, placement: Placement, workload: Workload | None = None) -> Truth:
    """The verdict on a placement for the scenario's workload (or another one, e.g. a screening run)."""
    w = workload or scenario.workload
    shape = model_shape(scenario.model)
    devices = scenario.machine.devices
    need = placetune_need(shape.anatomy, placement, context_of(placement, w), devices)
    used = true_device_bytes(need, scenario.hidden_error, devices)
    state = fit_state(used, need["CPU"].total, scenario.machine)
    if state == OOM:
        return Truth(state, used, need, None)
    return Truth(state, used, need, speeds(shape, placement, w, scenario.machine, state))
