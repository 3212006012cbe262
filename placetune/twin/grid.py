"""The true optimum: the twin's model evaluated on every point of a fixed reference space, vectorised.

REFERENCE SPACE v1, one GPU (keep it fixed: results stay comparable when the search space grows)
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
KV cache types stay f16 and ctx is the scenario's (SearchConfig.n_ctx). GGML_OP_OFFLOAD_MIN_BATCH stays
at its default 32: every ubatch here is at least 256, so a threshold above the ubatch is op offload
off for that ubatch, which no_op_offload already covers (speed and memory alike).

REFERENCE SPACE v1-multi, two or more GPUs: v1, and
  split_first      1 .. 9: tenths of the offloaded layers on the first card, the others sharing the
                   rest (-ts under -sm layer; search_spaces/multi.toml's split_first, whose 2 .. 8 it holds)
  experts_to       CPU, next: the block's experts go to RAM, or each to the card after its layer's own
                   (the last card's to the first), as multi.toml's experts_to does
so a block of expert layers is (start, count, kinds, destination).

Threads enter the model only as one divisor of the CPU-side time (model.thread_scale), so the
best thread count is the same for every point and the grid evaluates that one: exact, not a
shortcut. A placement that does not load (OOM on any card or in RAM) has infinite latency; one that
spills is slowed as model.speeds slows it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from placetune.anatomy import Group
from placetune.device_bytes import allocated_bytes, layer_devices
from placetune.placement import Placement
from placetune.runners.base import Workload
from placetune.space import to_placement
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
REFERENCE_SPACE_MULTI = "v1-multi"
UBATCHES = (256, 512, 1024, 2048)
BATCH = 2048
FLASH = (True, False)  # on ("auto" on CUDA), off
PINNED = (False, True)  # load_mode auto, none
OP_OFFLOAD = (True, False)  # no_op_offload false, true
KINDS = ("all", "gate_up", "down")
KIND_MASK = np.array([[float(part in KIND_PARTS[kind]) for part in range(4)] for kind in KINDS])  # (kind, 4 parts)
SPLITS = tuple(range(1, 10))  # split_first: tenths of the offloaded layers on the first card
DESTINATIONS = ("CPU", "next")  # experts_to


def reference_space(machine: TwinMachine) -> str:
    """The name of the reference space the grid enumerates on this machine."""
    return REFERENCE_SPACE_MULTI if machine.more_gpus else REFERENCE_SPACE


@dataclass(frozen=True)
class ExpertSets:
    """Every expert set of the reference space: MoE-index start, count, kind and destination (count 0: none)."""

    start: np.ndarray
    count: np.ndarray
    kind: np.ndarray  # index into KINDS
    dest: np.ndarray  # index into DESTINATIONS

    @classmethod
    def of(cls, n_moe: int, n_destinations: int = 1) -> ExpertSets:
        start, count, kind, dest = [0], [0], [0], [0]
        for d in range(n_destinations):
            for k in range(len(KINDS)):
                for n in range(1, n_moe + 1):
                    for s in range(n_moe - n + 1):
                        start.append(s)
                        count.append(n)
                        kind.append(k)
                        dest.append(d)
        return cls(np.array(start), np.array(count), np.array(kind), np.array(dest))

    def __len__(self) -> int:
        return len(self.start)


@dataclass
class GridResult:
    """Latency (seconds for the scenario's request) of every reference point; inf where it does not load.

    latency[ngl] has shape (sets, ubatch, flash_attn, load_mode, no_op_offload) on one GPU, and
    (split_first, sets, ...) on several, indexed like the module's tuples; threads are at `threads`.
    """

    latency: list[np.ndarray]
    sets: ExpertSets
    threads: int
    n_layers: int
    splits: tuple[int, ...] = ()  # split_first values on several GPUs; none on one

    def optimum(self) -> tuple[float, dict[str, Any]]:
        """The fastest point's latency and its search parameters."""
        best = min(range(len(self.latency)), key=lambda ngl: float(self.latency[ngl].min()))
        flat = int(np.argmin(self.latency[best]))
        index = (best, *np.unravel_index(flat, self.latency[best].shape))
        return float(self.latency[best].flat[flat]), self.params(index)

    def params(self, index: tuple[int, ...]) -> dict[str, Any]:
        """Search parameters (moe.toml and multi.toml names) of a grid index: (ngl, set, ub, fa, lm, nopo), with
        the split_first index after ngl on several GPUs."""
        ngl, *rest = (int(x) for x in index)
        params: dict[str, Any] = {"n_gpu_layers": ngl}
        if self.splits:
            params["split_first"] = self.splits[rest.pop(0)]
        i, u, f, lm, o = rest
        params["cpu_moe_layers"] = int(self.sets.count[i])
        if self.sets.count[i]:
            params.update(cpu_moe_position="block", cpu_moe_start=int(self.sets.start[i]),
                          cpu_moe_kinds=KINDS[self.sets.kind[i]])
            if self.splits:
                params["experts_to"] = DESTINATIONS[self.sets.dest[i]]
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


def _ranges(layer_dev: list[str], devices: tuple[str, ...]) -> list[tuple[int, int]]:
    """Each card's slice [lo, hi) of layer_devices' list (the output head is entry n_layers); empty as (n+1, n+1)."""
    end = len(layer_dev)
    out = []
    for dev in devices:
        mine = [i for i, d in enumerate(layer_dev) if d == dev]
        out.append((mine[0], mine[-1] + 1) if mine else (end, end))
    return out


def evaluate(shape: ModelShape, machine: TwinMachine, workload: Workload, n_ctx: int,
             error: HiddenError) -> GridResult:
    """Latency of every point of the machine's reference space (see the module docstring) for one scenario."""
    facts = shape.anatomy.facts
    n = facts.n_layers
    devices = machine.devices
    multi = len(devices) > 1
    af = shape.active_fraction
    moe = shape.moe_layers
    sets = ExpertSets.of(len(moe), len(DESTINATIONS) if multi else 1)
    splits = SPLITS if multi else ()
    to_cpu = sets.dest == 0

    # per layer, then prefix sums: over layer ids (each device holds a slice) and over MoE index (sets are blocks)
    expert_all = shape.expert_bytes.sum(axis=1)
    params_tok = shape.common_params + af * shape.expert_params.sum(axis=1)
    by_layer = _prefix(np.stack([shape.common_bytes, expert_all, params_tok, shape.full_attention,
                                 ~shape.full_attention], axis=1))
    per_set_bytes = _prefix(shape.expert_bytes[moe])  # (n_moe+1, 4)
    per_set_params = _prefix(shape.expert_params[moe])  # (n_moe+1, 2)
    total_read = by_layer[-1, 0] + af * by_layer[-1, 1] + shape.output_read + shape.host_read

    knobs = Knobs(ubatch=np.minimum(np.array(UBATCHES, dtype=float), max(workload.n_prompt, 1))[:, None, None, None],
                  flash_attn=np.array(FLASH)[None, :, None, None], pinned=np.array(PINNED)[None, None, :, None],
                  op_offload=np.array(OP_OFFLOAD)[None, None, None, :], kv_row=kv_row_bytes(shape, Placement()))
    threads = best_threads(machine.cores)
    scale = float(thread_scale(threads, machine.cores))
    memory = _Memory.of(shape, n_ctx, devices, splits)
    free = [g.free_bytes for g in machine.gpus]

    latency = []
    for ngl in range(n + 2):
        cpu_layers = min(max(0, n + 1 - ngl), n)
        k_c = int(np.searchsorted(moe, cpu_layers))
        a = np.maximum(sets.start, k_c)  # the MoE-index range each set really moves (layers on the cards only)
        b = np.maximum(sets.start + sets.count, a)
        cpu_layer = by_layer[cpu_layers]
        moved_cpu = np.where(to_cpu, b - a, 0)
        out = []
        for s, split in enumerate(splits or (None,)):
            tensor_split = None if split is None else \
                to_placement({"split_first": split}, shape.anatomy, devices).tensor_split
            layer_dev = layer_devices(n, ngl, devices, tensor_split)
            per_device = []
            for lo, hi in _ranges(layer_dev, devices):
                k_lo, k_hi = (int(np.searchsorted(moe, x)) for x in (lo, hi))
                pa = np.maximum(a, k_lo)
                pb = np.maximum(np.minimum(b, k_hi), pa)
                per_device.append((lo, hi, pa, pb))
            features = _features(shape, per_device, sets, to_cpu, per_set_bytes, per_set_params, by_layer, cpu_layer,
                                 cpu_layers, a, moved_cpu, total_read)
            times = token_times(features, knobs, workload, shape, machine)
            pp_s = np.broadcast_to(times.pp_seconds(scale), (len(sets), *knobs_shape()))
            tg_s = np.broadcast_to(times.tg_seconds(scale), (len(sets), *knobs_shape()))

            gpu_need, cpu_need = memory.at(ngl, s, per_device, a, b, sets, error)
            spill = functools.reduce(np.logical_or, [used > room for used, room in zip(gpu_need, free, strict=True)])
            oom = functools.reduce(np.logical_or, [cpu_need > machine.ram_bytes, *(
                used > room + machine.spill_bytes for used, room in zip(gpu_need, free, strict=True))])
            seconds = workload.n_prompt * pp_s * np.where(spill, SPILL_PP, 1.0) if workload.n_prompt else 0.0
            if workload.n_gen:
                seconds = seconds + workload.n_gen * tg_s * np.where(spill, SPILL_TG, 1.0)
            out.append(np.where(oom, np.inf, seconds).astype(np.float32 if n > 60 or multi else np.float64))
        latency.append(np.stack(out) if multi else out[0])
    return GridResult(latency, sets, threads, n, splits)


def _features(shape: ModelShape, per_device: list[tuple[int, int, np.ndarray, np.ndarray]], sets: ExpertSets,
              to_cpu: np.ndarray, per_set_bytes: np.ndarray, per_set_params: np.ndarray, by_layer: np.ndarray,
              cpu_layer: np.ndarray, cpu_layers: int, a: np.ndarray, moved_cpu: np.ndarray,
              total_read: float) -> Features:
    """The model's Features for every expert set at one -ngl and split (columns that broadcast on the knob axes)."""
    n = shape.n_layers
    af = shape.active_fraction
    moe = shape.moe_layers
    count = len(per_device)
    moved_bytes = [((per_set_bytes[pb] - per_set_bytes[pa]) * KIND_MASK[sets.kind]).sum(axis=1)
                   for _, _, pa, pb in per_device]
    # gate_up and down weights only: biases are no matrix
    moved_params = [((per_set_params[pb] - per_set_params[pa]) * KIND_MASK[sets.kind, :2]).sum(axis=1)
                    for _, _, pa, pb in per_device]
    gpu_read, gpu_params, gpu_full, gpu_windowed = [], [], [], []
    for j, (lo, hi, _, _) in enumerate(per_device):
        into = (j - 1) % count  # a "next" set sends card j-1's experts to card j
        arrived = np.where(to_cpu, 0.0, moved_bytes[into]) if count > 1 else 0.0
        arrived_params = np.where(to_cpu, 0.0, moved_params[into]) if count > 1 else 0.0
        mine = by_layer[min(hi, n)] - by_layer[min(lo, n)]  # sums over the card's layers
        on_output = lo < hi == n + 1
        gpu_read.append(_col(mine[0] + af * (mine[1] - moved_bytes[j] + arrived) + shape.output_read * on_output))
        gpu_params.append(_col(mine[2] - af * moved_params[j] + af * arrived_params))
        gpu_full.append(mine[3])
        gpu_windowed.append(mine[4])
    to_ram_bytes = sum(np.where(to_cpu, m, 0.0) for m in moved_bytes)
    to_ram_params = sum(np.where(to_cpu, m, 0.0) for m in moved_params)
    holding = sum(hi > lo for lo, hi, _, _ in per_device)
    lead = np.where(moved_cpu > 0, moe[np.minimum(a, len(moe) - 1)] - cpu_layers, 0).astype(float)
    hops = max(holding - 1, 0) + 2.0 * np.where(to_cpu, 0, sum(pb - pa for _, _, pa, pb in per_device))
    return Features(
        gpu_read=tuple(gpu_read), cpu_read=total_read - sum(gpu_read),
        gpu_layers=float(n - cpu_layers), gpu_full=tuple(gpu_full), gpu_windowed=tuple(gpu_windowed),
        cpu_full=cpu_layer[3], cpu_windowed=cpu_layer[4], splits=_col(moved_cpu.astype(float)), lead=_col(lead),
        stream_experts=_col(cpu_layer[1] + to_ram_bytes), stream_common=cpu_layer[0], gpu_params=tuple(gpu_params),
        cpu_params=_col(cpu_layer[2] + af * to_ram_params), hops=_col(np.asarray(hops, dtype=float)),
    )


def knobs_shape() -> tuple[int, int, int, int]:
    return len(UBATCHES), len(FLASH), len(PINNED), len(OP_OFFLOAD)


def _col(x: Any) -> Any:
    """A per-set array as a column that broadcasts against the knob axes."""
    x = np.asarray(x, dtype=float)
    return x.reshape(*x.shape, 1, 1, 1, 1) if x.ndim else x


@dataclass(frozen=True)
class _Memory:
    """placetune's predicted bytes for every reference point, split so that expert sets vectorise.

    Per -ngl, split, ubatch and flash attention, one placetune_need call without expert rules gives weights, KV
    and compute per device, and per -ngl a second one op offload's weight copies for the layers in RAM. An
    expert set then moves its tensors' allocated bytes from its cards' buffers to the CPU's (or to the next
    card's), and op offload copies the largest layer's matmul weights in RAM onto the first card
    (memory.op_offload_copies): the set's own largest layer, or a CPU layer's. The hidden error applies to each
    card's compute part as capacity.true_device_bytes applies it.
    """

    fixed: np.ndarray  # (ngl, split, device, ub, fa): weights + KV without expert rules
    compute: np.ndarray  # (ngl, split, device, ub, fa): compute buffer without op offload
    copies: np.ndarray  # (ngl,): op offload's copies on the first card for the CPU layers (and the head at -ngl 0)
    cpu_total: np.ndarray  # (ngl, split, ub, fa)
    moved_cuda: np.ndarray  # (n_moe + 1, 4) prefix sums over MoE index of the expert parts' CUDA-allocated bytes
    moved_host: np.ndarray  # (n_moe + 1, 4) ... host-allocated bytes
    largest: np.ndarray  # (kind, a, b): the largest matmul bytes one MoE layer in [a, b) moves for that kind

    @classmethod
    def of(cls, shape: ModelShape, n_ctx: int, devices: tuple[str, ...], splits: tuple[int, ...]) -> _Memory:
        anatomy = shape.anatomy
        n = shape.n_layers
        moe = shape.moe_layers
        index = {int(layer): i for i, layer in enumerate(moe)}
        cuda, host, matmul = (np.zeros((len(moe), 4)) for _ in range(3))
        for t in anatomy.tensors:
            if t.layer in index and t.group is Group.EXPERT:
                i, part = index[t.layer], expert_part(t)
                cuda[i, part] += allocated_bytes(t, GPU)  # every CUDA buffer pads and aligns alike
                host[i, part] += allocated_bytes(t, "CPU")
                matmul[i, part] += t.n_bytes if len(t.shape) >= 2 else 0
        per_kind = matmul @ KIND_MASK.T  # (n_moe, kind)
        largest = np.zeros((len(KINDS), len(moe) + 1, len(moe) + 1))
        for a in range(len(moe)):
            largest[:, a, a + 1:] = np.maximum.accumulate(per_kind[a:], axis=0).T
        split_values = splits or (None,)
        shape5 = (n + 2, len(split_values), len(devices), len(UBATCHES), len(FLASH))
        fixed, compute = np.zeros(shape5), np.zeros(shape5)
        cpu_total = np.zeros(shape5[:2] + shape5[3:])
        copies = np.zeros(n + 2)
        for ngl in range(n + 2):
            for s, split in enumerate(split_values):
                multi = {} if split is None else {"tensor_split": to_placement(
                    {"split_first": split}, anatomy, devices).tensor_split, "split_mode": "layer"}
                for u, ub in enumerate(UBATCHES):
                    for f, flash in enumerate(FLASH):
                        plain = Placement(n_gpu_layers=ngl, ubatch=ub, batch=BATCH, no_op_offload=True,
                                          flash_attn="auto" if flash else "off", **multi)
                        need = placetune_need(anatomy, plain, n_ctx, devices)
                        for d, dev in enumerate(devices):
                            if dev in need:
                                fixed[ngl, s, d, u, f] = need[dev].weights + need[dev].kv
                                compute[ngl, s, d, u, f] = need[dev].compute
                        cpu_total[ngl, s, u, f] = need["CPU"].total
                        if s == u == f == 0:
                            offloading = placetune_need(anatomy, replace(plain, no_op_offload=False), n_ctx, devices)
                            with_copies = offloading[GPU].compute if GPU in offloading else 0
                            copies[ngl] = with_copies - compute[ngl, s, 0, u, f]
        return cls(fixed, compute, copies, cpu_total, _prefix(cuda), _prefix(host), largest)

    def at(self, ngl: int, s: int, per_device: list[tuple[int, int, np.ndarray, np.ndarray]], a: np.ndarray,
           b: np.ndarray, sets: ExpertSets, error: HiddenError) -> tuple[list[np.ndarray], np.ndarray]:
        """True bytes on each card (with the hidden error) and predicted CPU bytes of every set at this -ngl and
        split, on the knob axes; a, b: the MoE-index range each set really moves (layers on the cards only),
        per_device: each card's part of it."""
        kind = sets.kind
        to_cpu = sets.dest == 0
        count = len(per_device)
        out_cuda = [((self.moved_cuda[pb] - self.moved_cuda[pa]) * KIND_MASK[kind]).sum(axis=1)
                    for _, _, pa, pb in per_device]
        host = sum(np.where(to_cpu, ((self.moved_host[pb] - self.moved_host[pa]) * KIND_MASK[kind]).sum(axis=1), 0.0)
                   for _, _, pa, pb in per_device)
        copies = np.where(to_cpu, np.maximum(self.largest[kind, a, b], self.copies[ngl]), self.copies[ngl])
        op = np.array(OP_OFFLOAD, dtype=float)[None, None, None, None, :]
        gpus = []
        for j in range(count):
            arrived = np.where(to_cpu, 0.0, out_cuda[(j - 1) % count]) if count > 1 else 0.0
            weights_kv = self.fixed[ngl, s, j][None, :, :, None, None] - _col(out_cuda[j]) + _col(arrived)
            compute = self.compute[ngl, s, j][None, :, :, None, None]
            if j == 0:
                compute = compute + _col(copies) * op
            predicted = weights_kv + compute
            gpus.append(np.where(predicted > 0,
                                 weights_kv + np.round(compute * error.compute_scale) + error.extra_bytes, 0.0))
        cpu = self.cpu_total[ngl, s][None, :, :, None, None] + _col(host)
        return gpus, cpu
