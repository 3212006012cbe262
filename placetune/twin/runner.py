"""TwinRunner: placetune's Runner protocol on the twin, returning SIMULATED samples, load and wall times.

A benchmark and test instrument only: `placetune --runner` never offers it, and what it returns is
labelled SIMULATED wherever it is shown. Samples scatter log-normally around the model's speeds,
with a per-load offset and occasional slow outliers; an allocation past the card's capacity is an
OOM (or, on a machine that spills, a tenfold slower run). Loading a model is the dominant cost of a
trial on a big model, so the runner keeps a simulated clock of load, measurement and process time,
and, like the embedded runner with reuse=True, keeps a model loaded while the model-level
placement stays the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from placetune.memory import DeviceNeed
from placetune.placement import Placement, render_flags
from placetune.runners.base import OK, OOM, TIMEOUT, Measurement, Stats, Workload
from placetune.twin.model import speeds
from placetune.twin.scenarios import Scenario
from placetune.twin.shape import model_shape
from placetune.twin.truth import judge
from placetune.units import human_bytes

LABEL = "SIMULATED"
PROCESS_S = 0.5  # starting and stopping the measuring process (once per load)
CONTEXT_S = 0.3  # re-creating a context on a model that stays loaded
WARMUP_GEN = 16  # the embedded runner's warm-up generates at most 16 tokens
OUTLIER_SLOWDOWN = (0.55, 0.85)
# runners/embedded_child.MODEL_KEYS: what forces a reload when it changes (the environment knobs are read when the
# backends start, so a new value needs a new process)
MODEL_KEYS = ("n_gpu_layers", "overrides", "load_mode", "repack", "tensor_split", "split_mode", "env")


class TwinRunner:
    """Runner protocol (placetune.runners.base.Runner) on a scenario's simulated machine."""

    name = "twin"

    def __init__(self, scenario: Scenario, seed: int = 0, reuse: bool = True) -> None:
        self.scenario = scenario
        self.reuse = reuse
        self.rng = np.random.default_rng(seed)
        self.clock_s = 0.0  # simulated seconds since the runner started
        self.load_s = 0.0  # of which loading models
        self._loaded: tuple[object, ...] | None = None
        self._offset = 1.0  # this load's speed offset: two loads of one placement differ a little
        self._file_cached = False  # the first load reads the file from disk, later ones from the page cache

    def measure(self, model: Path, placement: Placement, workload: Workload) -> Measurement:
        truth = judge(self.scenario, placement, workload)
        machine = self.scenario.machine
        key = tuple(getattr(placement, k) for k in MODEL_KEYS)
        reload = not (self.reuse and self._loaded == key)
        load_s = self._load_seconds(placement, truth.need) if reload else 0.0
        m = Measurement(runner=self.name, status=OK, command=[self.name, render_flags(placement)],
                        build={"runner": LABEL, "machine": machine.name, "scenario": self.scenario.name})
        m.device_memory = {dev: n.weights for dev, n in truth.need.items()}
        if truth.speeds is None:
            self._loaded = None
            m.status = OOM
            m.reason = self._oom_reason(truth.device_bytes, truth.need["CPU"].total)
            m.load_s = load_s / 2  # the allocation fails part-way through loading
            return self._finish(m, m.load_s + PROCESS_S)
        if reload:
            self._loaded = key
            self._offset = float(np.exp(self.rng.normal(0.0, machine.load_sigma)))
        m.load_s = load_s
        pp = self._samples(truth.speeds.pp, machine.pp_sigma, workload.repetitions) if workload.n_prompt else []
        tg = self._samples(truth.speeds.tg, machine.tg_sigma, workload.repetitions) if workload.n_gen else []
        timed = sum(workload.n_prompt / s for s in pp) + sum(workload.n_gen / s for s in tg)
        untimed = workload.warmups * self._warmup_seconds(truth.speeds.pp, truth.speeds.tg, workload)
        passes = (workload.warmups + workload.repetitions) * (bool(pp) + bool(tg))
        untimed += passes * self._depth_seconds(placement, workload, truth.state)
        if timed + untimed > workload.timeout_s:
            self._loaded = None
            m.status, m.reason = TIMEOUT, "llama.cpp did not finish within the timeout and was killed"
            return self._finish(m, load_s + workload.timeout_s + PROCESS_S)
        m.pp = Stats(tuple(pp), workload.n_prompt)
        m.tg = Stats(tuple(tg), workload.n_gen)
        m.measure_s = timed
        started = load_s + PROCESS_S if reload else CONTEXT_S  # a kept model only needs a new context
        return self._finish(m, started + timed + untimed)

    def close(self) -> None:
        self._loaded = None

    def _finish(self, m: Measurement, wall_s: float) -> Measurement:
        m.wall_s = wall_s
        self.clock_s += wall_s
        self.load_s += m.load_s or 0.0
        return m

    def _oom_reason(self, device_bytes: Mapping[str, int], cpu_bytes: int) -> str:
        """The first card that ran out, as llama.cpp names it (or RAM)."""
        machine = self.scenario.machine
        for dev, gpu in zip(machine.devices, machine.gpus, strict=True):
            if device_bytes.get(dev, 0) > gpu.free_bytes + machine.spill_bytes:
                return (f"{dev}: out of memory ({LABEL}: needs {human_bytes(device_bytes[dev])}, "
                        f"{human_bytes(gpu.free_bytes)} free)")
        return f"CPU: out of memory ({LABEL}: needs {human_bytes(cpu_bytes)}, {human_bytes(machine.ram_bytes)} RAM)"

    def _samples(self, rate: float, sigma: float, n: int) -> list[float]:
        noise = np.exp(self.rng.normal(0.0, sigma, n))
        slow = np.where(self.rng.random(n) < self.scenario.machine.outlier_rate,
                        self.rng.uniform(*OUTLIER_SLOWDOWN, n), 1.0)
        return [float(x) for x in rate * self._offset * noise * slow]

    def _load_seconds(self, placement: Placement, need: Mapping[str, DeviceNeed]) -> float:
        """CUDA start-up, the GPU's weights through the staging buffer, RAM-resident weights copied
        into pinned buffers with --no-mmap, and the first read of the file from disk."""
        m = self.scenario.machine
        on_cards = sum(need[dev].weights for dev in m.devices if dev in need)
        seconds = m.init_s + on_cards / (m.upload_gbs * 1e9)
        if placement.load_mode == "none":
            seconds += need["CPU"].weights / (m.host_copy_gbs * 1e9)
        if not self._file_cached:
            seconds += model_shape(self.scenario.model).anatomy.total_bytes / (m.disk_gbs * 1e9)
            self._file_cached = True
        return seconds

    @staticmethod
    def _warmup_seconds(pp: float, tg: float, w: Workload) -> float:
        return w.n_prompt / pp + min(w.n_gen, WARMUP_GEN) / tg

    def _depth_seconds(self, placement: Placement, w: Workload, state: str) -> float:
        """Filling the KV cache to the workload's depth before each timed pass (llama-bench -d), untimed."""
        if not w.depth:
            return 0.0
        fill = Workload(n_prompt=w.depth, n_gen=0, depth=0)
        shape = model_shape(self.scenario.model)
        return w.depth / speeds(shape, placement, fill, self.scenario.machine, state).pp
