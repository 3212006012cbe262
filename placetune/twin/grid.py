"""The true optimum: the twin's model evaluated on every point of a fixed reference space, vectorised.

REFERENCE SPACE v1 (keep it fixed: results stay comparable when the search space grows)
  n_gpu_layers     0 .. n_layers + 1
  experts in RAM   none, or a contiguous block of n MoE layers starting at MoE layer s (first N is
                   s = 0, last N is s = N_moe - n), for every n >= 1 and s, with kinds all, gate_up
                   or down: search_spaces/moe.toml's cpu_moe_* parameters with position "block"
  ubatch           256, 512, 1024, 2048
  batch            2048, 4096 (never binds: every ubatch is at most 2048, so it is evaluated once)
  threads          1 .. physical cores
  flash_attn       auto, on, off (auto is on for CUDA: evaluated once with on)
  load_mode        auto (mmap), none (--no-mmap)
  no_op_offload    false, true
KV cache types stay f16 and ctx is the scenario's (SearchConfig.n_ctx).

Threads enter the model only as one divisor of the CPU-side time (model.thread_scale), so the
best thread count is the same for every point and the grid evaluates that one: exact, not a
shortcut. A placement that does not load (OOM) has infinite latency; one that spills is slowed
as model.speeds slows it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from placetune.anatomy import Group
from placetune.placement import Placement, allocated_bytes
from placetune.runners.base import Workload
from placetune.twin.capacity import GPU, HiddenError, placetune_need
from placetune.twin.machine import TwinMachine
from placetune.twin.model import (
    SPILL_PP,
    SPILL_TG,
    Features,
    Knobs,
    kv_row_bytes,
    thread_scale,
    token_times,
)
from placetune.twin.shape import KIND_PARTS, ModelShape, expert_part

REFERENCE_SPACE = "v1"
UBATCHES = (256, 512, 1024, 2048)
BATCH = 2048
FLASH = (True, False)  # on ("auto" on CUDA), off
PINNED = (False, True)  # load_mode auto, none
OP_OFFLOAD = (True, False)  # no_op_offload false, true
KINDS = ("all", "gate_up", "down")


@dataclass(frozen=True)
class ExpertSets:
    """Every expert set of the reference space: MoE-index start, count and kind (count 0: none)."""

    start: np.ndarray
    count: np.ndarray
    kind: np.ndarray  # index into KINDS

    @classmethod
    def of(cls, n_moe: int) -> ExpertSets:
        start, count, kind = [0], [0], [0]
        for k in range(len(KINDS)):
            for n in range(1, n_moe + 1):
                for s in range(n_moe - n + 1):
                    start.append(s)
                    count.append(n)
                    kind.append(k)
        return cls(np.array(start), np.array(count), np.array(kind))

    def __len__(self) -> int:
        return len(self.start)


@dataclass
class GridResult:
    """Latency (seconds for the scenario's request) of every reference point; inf where it does not load.

    latency[ngl] has shape (sets, ubatch, flash_attn, load_mode, no_op_offload), indexed like the
    module's tuples; threads are at `threads` everywhere.
    """

    latency: list[np.ndarray]
    sets: ExpertSets
    threads: int
    n_layers: int

    def optimum(self) -> tuple[float, dict[str, Any]]:
        """The fastest point's latency and its search parameters."""
        best = min(range(len(self.latency)), key=lambda ngl: float(self.latency[ngl].min()))
        flat = int(np.argmin(self.latency[best]))
        index = (best, *np.unravel_index(flat, self.latency[best].shape))
        return float(self.latency[best].flat[flat]), self.params(index)

    def params(self, index: tuple[int, ...]) -> dict[str, Any]:
        """Search parameters (search_spaces/moe.toml names) of a grid index (ngl, set, ub, fa, lm, nopo)."""
        ngl, i, u, f, lm, o = (int(x) for x in index)
        params: dict[str, Any] = {"n_gpu_layers": ngl, "cpu_moe_layers": int(self.sets.count[i])}
        if self.sets.count[i]:
            params.update(cpu_moe_position="block", cpu_moe_start=int(self.sets.start[i]),
                          cpu_moe_kinds=KINDS[self.sets.kind[i]])
        params.update(ubatch=UBATCHES[u], batch=BATCH, threads=self.threads,
                      flash_attn="auto" if FLASH[f] else "off", load_mode="none" if PINNED[lm] else "auto",
                      no_op_offload=not OP_OFFLOAD[o])
        return params

    def count_within(self, share: float) -> int:
        """Points whose speed is at least `share` of the optimum's: how flat the top of the landscape is."""
        best, _ = self.optimum()
        return int(sum((lat <= best / share).sum() for lat in self.latency))


def best_threads(cores: int) -> int:
    return int(np.argmax(thread_scale(np.arange(1, cores + 1), cores))) + 1


def _prefix(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, axis=0)])


def evaluate(shape: ModelShape, machine: TwinMachine, workload: Workload, n_ctx: int,
             error: HiddenError) -> GridResult:
    """Latency of every point of the reference space (REFERENCE_SPACE) for one scenario."""
    facts = shape.anatomy.facts
    n = facts.n_layers
    af = shape.active_fraction
    moe = shape.moe_layers
    sets = ExpertSets.of(len(moe))
    parts = np.zeros((len(KINDS), 4))
    for k, kind in enumerate(KINDS):
        parts[k, list(KIND_PARTS[kind])] = 1.0
    param_parts = parts[:, :2]  # gate_up and down weights (biases are no matrix)

    # per layer, then prefix sums: over layer ids (CPU layers are a prefix) and over MoE index (sets are blocks)
    expert_all = shape.expert_bytes.sum(axis=1)
    params_tok = shape.common_params + af * shape.expert_params.sum(axis=1)
    by_layer = _prefix(np.stack([shape.common_bytes, expert_all, params_tok, shape.full_attention,
                                 ~shape.full_attention], axis=1))
    per_set_bytes = _prefix(shape.expert_bytes[moe])  # (n_moe+1, 4)
    per_set_params = _prefix(shape.expert_params[moe])  # (n_moe+1, 2)
    total_read = by_layer[-1, 0] + af * by_layer[-1, 1] + shape.output_read + shape.host_read
    total_params = by_layer[-1, 2]

    knobs = Knobs(ubatch=np.minimum(np.array(UBATCHES, dtype=float), max(workload.n_prompt, 1))[:, None, None, None],
                  flash_attn=np.array(FLASH)[None, :, None, None], pinned=np.array(PINNED)[None, None, :, None],
                  op_offload=np.array(OP_OFFLOAD)[None, None, None, :], kv_row=kv_row_bytes(shape, Placement()))
    threads = best_threads(machine.cores)
    scale = float(thread_scale(threads, machine.cores))
    memory = _Memory.of(shape, n_ctx)

    latency = []
    for ngl in range(n + 2):
        cpu_layers = min(max(0, n + 1 - ngl), n)
        out_gpu = ngl >= 1
        k_c = int(np.searchsorted(moe, cpu_layers))
        a = np.maximum(sets.start, k_c)
        b = np.maximum(sets.start + sets.count, a)
        moved_bytes = ((per_set_bytes[b] - per_set_bytes[a]) * parts[sets.kind]).sum(axis=1)
        moved_params = ((per_set_params[b] - per_set_params[a]) * param_parts[sets.kind]).sum(axis=1)
        splits = (b - a).astype(float)
        lead = np.where(splits > 0, moe[np.minimum(a, len(moe) - 1)] - cpu_layers, 0).astype(float)
        gpu_layer = by_layer[-1] - by_layer[cpu_layers]  # sums over the GPU layers
        cpu_layer = by_layer[cpu_layers]
        gpu_read = gpu_layer[0] + af * (gpu_layer[1] - moved_bytes) + shape.output_read * out_gpu
        features = Features(
            gpu_read=_col(gpu_read), cpu_read=_col(total_read - gpu_read), gpu_layers=float(n - cpu_layers),
            gpu_full=gpu_layer[3], gpu_windowed=gpu_layer[4], cpu_full=cpu_layer[3], cpu_windowed=cpu_layer[4],
            splits=_col(splits), lead=_col(lead), stream_experts=_col(cpu_layer[1] + moved_bytes),
            stream_common=cpu_layer[0], gpu_params=_col(total_params - cpu_layer[2] - af * moved_params),
            cpu_params=_col(cpu_layer[2] + af * moved_params),
        )
        times = token_times(features, knobs, workload, shape, machine)
        pp_s = np.broadcast_to(times.pp_seconds(scale), (len(sets), *knobs_shape()))
        tg_s = np.broadcast_to(times.tg_seconds(scale), (len(sets), *knobs_shape()))

        gpu_need, cpu_need = memory.at(ngl, a, b, sets.kind, error)
        spill = gpu_need > machine.gpu_free_bytes
        oom = (gpu_need > machine.gpu_free_bytes + machine.spill_bytes) | (cpu_need > machine.ram_bytes)
        seconds = workload.n_prompt * pp_s * np.where(spill, SPILL_PP, 1.0) if workload.n_prompt else 0.0
        if workload.n_gen:
            seconds = seconds + workload.n_gen * tg_s * np.where(spill, SPILL_TG, 1.0)
        latency.append(np.where(oom, np.inf, seconds).astype(np.float32 if n > 60 else np.float64))
    return GridResult(latency, sets, threads, n)


def knobs_shape() -> tuple[int, int, int, int]:
    return len(UBATCHES), len(FLASH), len(PINNED), len(OP_OFFLOAD)


def _col(x: Any) -> Any:
    """A per-set array as a column that broadcasts against the knob axes."""
    x = np.asarray(x, dtype=float)
    return x.reshape(*x.shape, 1, 1, 1, 1) if x.ndim else x


@dataclass(frozen=True)
class _Memory:
    """placetune's predicted bytes for every reference point, split so that expert sets vectorise.

    Per -ngl, ubatch and flash attention, one placetune_need call without expert rules gives weights, KV and
    compute per device, and a second one op offload's weight copies for the layers in RAM. An expert set
    then moves its tensors' allocated bytes from the GPU's buffer to the CPU's, and op offload copies the
    largest layer's matmul weights in RAM (memory.op_offload_copies): the set's own largest layer, or a
    CPU layer's. The hidden error applies to the compute part as capacity.true_gpu_bytes applies it.
    """

    gpu_fixed: np.ndarray  # (ngl, ub, fa): weights + KV on the GPU without expert rules
    gpu_compute: np.ndarray  # (ngl, ub, fa): compute buffer without op offload
    gpu_copies: np.ndarray  # (ngl,): op offload's copies for the CPU layers (and the head at -ngl 0)
    cpu_total: np.ndarray  # (ngl, ub, fa)
    moved_cuda: np.ndarray  # (n_moe + 1, 4) prefix sums over MoE index of the expert parts' CUDA-allocated bytes
    moved_host: np.ndarray  # (n_moe + 1, 4) ... host-allocated bytes
    largest: np.ndarray  # (kind, a, b): the largest matmul bytes one MoE layer in [a, b) moves for that kind
    parts: np.ndarray  # (kind, 4): which expert parts a kind moves

    @classmethod
    def of(cls, shape: ModelShape, n_ctx: int) -> _Memory:
        anatomy = shape.anatomy
        n = shape.n_layers
        moe = shape.moe_layers
        index = {int(layer): i for i, layer in enumerate(moe)}
        cuda, host, matmul = (np.zeros((len(moe), 4)) for _ in range(3))
        for t in anatomy.tensors:
            if t.layer in index and t.group is Group.EXPERT:
                i, part = index[t.layer], expert_part(t)
                cuda[i, part] += allocated_bytes(t, GPU)
                host[i, part] += allocated_bytes(t, "CPU")
                matmul[i, part] += t.n_bytes if len(t.shape) >= 2 else 0
        parts = np.zeros((len(KINDS), 4))
        for k, kind in enumerate(KINDS):
            parts[k, list(KIND_PARTS[kind])] = 1.0
        per_kind = matmul @ parts.T  # (n_moe, kind)
        largest = np.zeros((len(KINDS), len(moe) + 1, len(moe) + 1))
        for a in range(len(moe)):
            largest[:, a, a + 1:] = np.maximum.accumulate(per_kind[a:], axis=0).T
        shape3 = (n + 2, len(UBATCHES), len(FLASH))
        gpu_fixed, gpu_compute, cpu_total = np.zeros(shape3), np.zeros(shape3), np.zeros(shape3)
        copies = np.zeros(n + 2)
        for ngl in range(n + 2):
            for u, ub in enumerate(UBATCHES):
                for f, flash in enumerate(FLASH):
                    plain = Placement(n_gpu_layers=ngl, ubatch=ub, batch=BATCH, flash_attn="auto" if flash else "off",
                                      no_op_offload=True)
                    need = placetune_need(anatomy, plain, n_ctx)
                    gpu = need.get(GPU)
                    if gpu is not None:
                        gpu_fixed[ngl, u, f] = gpu.weights + gpu.kv
                        gpu_compute[ngl, u, f] = gpu.compute
                    cpu_total[ngl, u, f] = need["CPU"].total
                    if u == f == 0:
                        offloading = placetune_need(anatomy, replace(plain, no_op_offload=False), n_ctx)
                        copies[ngl] = (offloading[GPU].compute if GPU in offloading else 0) - gpu_compute[ngl, u, f]
        return cls(gpu_fixed, gpu_compute, copies, cpu_total, _prefix(cuda), _prefix(host), largest, parts)

    def at(self, ngl: int, a: np.ndarray, b: np.ndarray, kind: np.ndarray,
           error: HiddenError) -> tuple[np.ndarray, np.ndarray]:
        """True GPU bytes (with the hidden error) and predicted CPU bytes of every set at this -ngl, on the
        knob axes; a, b: the MoE-index range each set really moves (layers on the GPU only)."""
        cuda = ((self.moved_cuda[b] - self.moved_cuda[a]) * self.parts[kind]).sum(axis=1)
        host = ((self.moved_host[b] - self.moved_host[a]) * self.parts[kind]).sum(axis=1)
        copies = np.maximum(self.largest[kind, a, b], self.gpu_copies[ngl])
        op = np.array(OP_OFFLOAD, dtype=float)[None, None, None, None, :]
        compute = self.gpu_compute[ngl][None, :, :, None, None] + _col(copies) * op
        weights_kv = self.gpu_fixed[ngl][None, :, :, None, None] - _col(cuda)
        predicted = weights_kv + compute
        gpu = np.where(predicted > 0, weights_kv + np.round(compute * error.compute_scale) + error.extra_bytes, 0.0)
        cpu = self.cpu_total[ngl][None, :, :, None, None] + _col(host)
        return gpu, cpu
