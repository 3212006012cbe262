"""The benchmark's scenarios: a machine, a model, a request to optimise for, and a hidden memory error.

Each is a place where the placement question is real: the model does not fit the card (or only
just does), so the search must trade experts in RAM against layers, ubatch and knobs near a
memory cliff. The objective is placetune's default: the latency of the scenario's request.
"""

from __future__ import annotations

from dataclasses import dataclass

from placetune.runners.base import Workload
from placetune.twin.capacity import HiddenError
from placetune.twin.machine import MACHINES, TwinMachine
from placetune.twin.shape import MODELS, TwinModel

# placetune search's defaults: 5 repetitions after 3 warm-ups, 900 s before a run is killed
REPS, WARMUPS, TIMEOUT_S = 5, 3, 900.0


@dataclass(frozen=True)
class Scenario:
    """One benchmark case."""

    name: str
    machine: TwinMachine
    model: TwinModel
    workload: Workload
    memory_seed: int  # draws the scenario's HiddenError
    why: str
    objective: str = "latency"

    @property
    def hidden_error(self) -> HiddenError:
        return HiddenError.draw(self.memory_seed)

    @property
    def n_ctx(self) -> int:
        """The serving context the search sizes the KV cache for: just room for one request."""
        return self.workload.context_needed


def _request(n_prompt: int, n_gen: int, depth: int) -> Workload:
    return Workload(n_prompt=n_prompt, n_gen=n_gen, depth=depth, repetitions=REPS, warmups=WARMUPS,
                    timeout_s=TIMEOUT_S)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("qwen3-30b-32gb", MACHINES["rtx5090-ddr5x2"], MODELS["qwen3-30b-a3b"], _request(8192, 512, 16384), 1,
             "fits whole: the search must find the ubatch and not leave speed in RAM"),
    Scenario("qwen3-30b-16gb", MACHINES["rtx5080-ddr5x2"], MODELS["qwen3-30b-a3b"], _request(2048, 512, 0), 2,
             "a chat request on a card one third too small"),
    Scenario("qwen3-30b-12gb", MACHINES["rtx4070-ddr5x2-wddm"], MODELS["qwen3-30b-a3b"], _request(4096, 256, 4096),
             3, "a 12 GB card that spills to shared memory past capacity: the spill cliff"),
    Scenario("gpt-oss-120b-24gb", MACHINES["rtx3090-ddr5x2"], MODELS["gpt-oss-120b"], _request(4096, 256, 8192), 4,
             "two thirds of the experts in RAM: ubatch against expert layers"),
    Scenario("glm-4.5-air-24gb", MACHINES["rtx4090-ddr5x2"], MODELS["glm-4.5-air"], _request(2048, 512, 0), 5,
             "46 layers, a dense first layer and shared experts"),
    Scenario("glm-4.5-air-2x24gb", MACHINES["rtx4090x2-ddr5x2"], MODELS["glm-4.5-air"], _request(2048, 512, 0), 7,
             "the same request on two 24 GB cards: the split between them, and which card's experts go to RAM"),
    Scenario("qwen3-235b-80gb", MACHINES["h100-ddr5x8"], MODELS["qwen3-235b-a22b"], _request(8192, 512, 8192), 6,
             "94 layers and 8-channel RAM: the largest space"),
)}

