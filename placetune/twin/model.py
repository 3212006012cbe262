"""The twin's performance model: noise-free pp and tg for a placement of a model on a TwinMachine.

Per generated token (tg), every active weight and the KV cache up to the current depth is read
once from the memory that holds it, at that memory's bandwidth x efficiency, plus fixed costs per
GPU layer, per GPU<->CPU hand-over and per token. Per prompt token (pp), the GPU computes every
matrix product (op offload copies CPU-resident weights to it, over PCIe, once per ubatch: so pp
grows almost linearly with -ub while experts live in RAM, llama.cpp PR 15346), attention grows
with depth, and CPU-resident layers attend on the CPU. Pinned host buffers (--no-mmap) copy
faster (PR 14990). A copy can hide behind the compute of the GPU layers that precede it, which
is why experts of the last layers in RAM cost less pp than of the first (ik_llama PR 2262).
Threads only change the CPU side, through one curve, `thread_scale`.

Every function here works on floats and on numpy arrays alike, so the exhaustive grid (grid.py)
and the runner (runner.py) share one set of formulas; they differ only in how a placement is
turned into Features, and a test holds the two routes equal.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from placetune.anatomy import Group
from placetune.placement import Placement, layer_devices, tensor_buffer
from placetune.predict import device_of, read_bytes_by_device
from placetune.runners.base import Workload
from placetune.twin.capacity import DEVICES, GPU, SPILL
from placetune.twin.machine import GB, TwinMachine
from placetune.twin.shape import ModelShape

DEFAULT_UBATCH, DEFAULT_BATCH = 512, 2048  # llama.cpp's defaults (common/common.h)
OP_OFFLOAD_MIN_BATCH = 32  # ggml-cuda: smaller batches compute CPU-resident weights on the CPU (PR 18535)
UB_HALF = 96  # ubatch at which GPU matmul kernels reach half their large-batch efficiency
UB_DECLINE = 0.05  # efficiency lost per doubling of ubatch above 1024: "a larger ub can be slower" on the GPU
FA_OFF_ATTENTION = 1.6  # attention time without flash attention (shared notes: FA is +2 to +29% on CUDA)
FA_OFF_KV = 1.25  # KV-cache traffic per generated token without flash attention
OVERLAP = 0.6  # share of a weight copy that the compute of earlier GPU layers can hide
# ggml-backend copies only the experts a ubatch uses ("copying only the experts that are used",
# ggml/src/ggml-backend.cpp). Trained routers reuse experts across neighbouring tokens (seed 000:
# "experts can be stable across more than one token"), so a ubatch of n tokens routes like
# ROUTING_SCALE * n**ROUTING_EXPONENT independent ones; fitted to the RTX 3090 ub sweep (calibration.py).
ROUTING_SCALE, ROUTING_EXPONENT = 5.0, 0.25
SPILL_PP, SPILL_TG = 10.0, 4.0  # past capacity into shared memory: pp / 10 (shared notes: 10-20x), tg / 4
ACTIVATION_BYTES = 4  # f32 activations cross PCIe at each GPU<->CPU hand-over


@dataclass(frozen=True)
class Features:
    """What the model needs from a placement. Floats for one placement, arrays for the grid."""

    gpu_read: Any  # weight bytes one generated token reads from GPU memory
    cpu_read: Any  # ... from system RAM
    gpu_layers: Any  # layers (of n_layers) on the GPU
    gpu_full: Any  # full-attention layers on the GPU
    gpu_windowed: Any  # windowed-attention layers on the GPU
    cpu_full: Any
    cpu_windowed: Any
    splits: Any  # GPU layers with some routed experts in RAM: two hand-overs each
    lead: Any  # GPU layers before the first of those, whose compute can hide its copy
    stream_experts: Any  # routed-expert bytes in RAM: op offload copies the used ones to the GPU per ubatch
    stream_common: Any  # other layer weights in RAM (layers not on the GPU): copied whole per ubatch
    gpu_params: Any  # matrix weights one token multiplies (experts x used/count) that live on the GPU
    cpu_params: Any  # ... that live in RAM


@dataclass(frozen=True)
class Knobs:
    """The runtime knobs of a placement, resolved to what llama.cpp would use (threads: see thread_scale)."""

    ubatch: Any  # effective: min(-ub, -b, prompt length)
    flash_attn: Any  # bool; "auto" is on for CUDA
    pinned: Any  # bool: --no-mmap
    op_offload: Any  # bool
    kv_row: float  # KV bytes per token per attention layer


@dataclass(frozen=True)
class TokenTimes:
    """Seconds per token, split into a thread-independent part and the CPU side (divided by thread_scale)."""

    pp_fixed: Any
    pp_cpu: Any
    tg_fixed: Any
    tg_cpu: Any

    def pp_seconds(self, scale: Any) -> Any:
        return self.pp_fixed + self.pp_cpu / scale

    def tg_seconds(self, scale: Any) -> Any:
        return self.tg_fixed + self.tg_cpu / scale


def thread_scale(threads: Any, cores: int) -> Any:
    """Share of the CPU side's best speed reached with `threads`: saturating, best a little below the core count.

    Memory-bound CPU work saturates the channels with fewer threads than cores; using every core
    competes with the thread that drives the GPU (shared notes: best -t often 13 of 16).
    """
    t = np.asarray(threads, dtype=float)
    rise = 1.0 - np.exp(-t / (0.25 * cores))
    crowd = np.clip((t - 0.75 * cores) / (0.25 * cores), 0.0, 1.0)
    smt = np.maximum(t - cores, 0.0) / cores
    return rise * (1.0 - 0.06 * crowd**2) * (1.0 - 0.05 * smt)


def matmul_efficiency(ubatch: Any) -> Any:
    """GPU matmul efficiency at a ubatch size: rises to ~1024, then declines a little."""
    ub = np.asarray(ubatch, dtype=float)
    return ub / (ub + UB_HALF) * (1.0 - UB_DECLINE * np.maximum(np.log2(np.maximum(ub, 1.0) / 1024.0), 0.0))


def used_expert_fraction(ubatch: Any, n_used: int, n_expert: int) -> Any:
    """Expected share of a layer's experts that a ubatch of this many tokens routes to."""
    if not n_expert:
        return 1.0
    draws = ROUTING_SCALE * np.asarray(ubatch, dtype=float) ** ROUTING_EXPONENT
    return 1.0 - (1.0 - n_used / n_expert) ** draws


def token_times(f: Features, k: Knobs, w: Workload, shape: ModelShape, m: TwinMachine) -> TokenTimes:
    """Per-token seconds of prompt processing and generation, before threads and spilling."""
    facts = shape.anatomy.facts
    window = shape.model.window
    gpu_bw = m.gpu_bw_gbs * GB * m.gpu_bw_eff
    ram_bw = m.ram_bw_gbs * GB * m.ram_bw_eff
    flash = np.asarray(k.flash_attn, dtype=bool)

    # -- generation: at the mean depth of the generated tokens (llama-bench: tg starts at -d) --
    d_tg = w.depth + w.n_gen / 2
    kv_factor = np.where(flash, 1.0, FA_OFF_KV)
    kv_gpu = k.kv_row * (f.gpu_full * d_tg + f.gpu_windowed * min(d_tg, window)) * kv_factor
    kv_cpu = k.kv_row * (f.cpu_full * d_tg + f.cpu_windowed * min(d_tg, window)) * kv_factor
    tg_fixed = ((f.gpu_read + kv_gpu) / gpu_bw + f.gpu_layers * m.gpu_layer_overhead_s
                + 2 * f.splits * m.split_overhead_s + m.token_overhead_s)
    tg_cpu = (f.cpu_read + kv_cpu) / ram_bw

    # -- prompt: at the mean depth of the prompt's tokens --
    d_pp = w.depth + w.n_prompt / 2
    attention = 4.0 * facts.n_head * facts.head_dim_k * np.where(flash, 1.0, FA_OFF_ATTENTION)
    attn_gpu = attention * (f.gpu_full * d_pp + f.gpu_windowed * min(d_pp, window))
    attn_cpu = attention * (f.cpu_full * d_pp + f.cpu_windowed * min(d_pp, window))
    ub = np.maximum(np.asarray(k.ubatch, dtype=float), 1.0)
    offload = np.asarray(k.op_offload, dtype=bool) & (ub >= OP_OFFLOAD_MIN_BATCH)
    matmul_rate = m.gpu_tflops * 1e12 * m.compute_eff
    attention_rate = m.gpu_tflops * 1e12 * m.attention_eff
    pcie = m.pcie_gbs * GB * np.where(k.pinned, m.pcie_pinned_eff, m.pcie_pageable_eff)
    gpu_params = f.gpu_params + np.where(offload, f.cpu_params, 0.0)
    compute = 2.0 * gpu_params / (matmul_rate * matmul_efficiency(ub)) + attn_gpu / attention_rate
    used = used_expert_fraction(ub, facts.n_expert_used, facts.n_expert)
    copied = f.stream_experts * used + f.stream_common
    stream = np.where(offload, copied / pcie / ub, 0.0)
    earlier = compute * f.lead / np.maximum(f.gpu_layers, 1.0)
    hidden = OVERLAP * np.minimum(stream, earlier)
    # Without op offload the CPU multiplies its own weights: compute- or bandwidth-bound, reading them once per ubatch.
    cpu_matmul = np.where(offload, 0.0,
                          np.maximum(2.0 * f.cpu_params / (m.cpu_gflops * 1e9), copied / ram_bw / ub))
    handovers = np.where(offload, f.cpu_full + f.cpu_windowed, f.splits + (f.cpu_full + f.cpu_windowed > 0))
    activations = handovers * 2 * ACTIVATION_BYTES * facts.n_embd / pcie
    pp_fixed = compute + stream - hidden + activations + m.ubatch_overhead_s / ub
    pp_cpu = attn_cpu / (m.cpu_gflops * 1e9) + cpu_matmul
    return TokenTimes(pp_fixed, pp_cpu, tg_fixed, tg_cpu)


def kv_row_bytes(shape: ModelShape, placement: Placement) -> float:
    """KV-cache bytes per token per attention layer, for the placement's cache types."""
    facts = shape.anatomy.facts
    k_elt = _bytes_per_element(placement.cache_type_k or "f16")
    v_elt = _bytes_per_element(placement.cache_type_v or "f16")
    return facts.n_head_kv * (facts.head_dim_k * k_elt + facts.head_dim_v * v_elt)


def _bytes_per_element(type_name: str) -> float:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return size / block


def knobs_of(shape: ModelShape, placement: Placement, workload: Workload) -> Knobs:
    """llama.cpp's effective knobs: -ub is capped by -b and by the prompt."""
    ub = min(placement.ubatch or DEFAULT_UBATCH, placement.batch or DEFAULT_BATCH, max(workload.n_prompt, 1))
    return Knobs(ubatch=ub, flash_attn=placement.flash_attn != "off", pinned=placement.load_mode == "none",
                 op_offload=not placement.no_op_offload, kv_row=kv_row_bytes(shape, placement))


@functools.lru_cache(maxsize=8192)
def placement_features(shape: ModelShape, placement: Placement) -> Features:
    """Features of one placement, by placetune's own tensor accounting (tensor_buffer, read_bytes_by_device).

    Cached: a search measures a placement several times (screening, the rest, the final rounds), and
    the accounting matches every tensor name against every rule.
    """
    anatomy = shape.anatomy
    n = anatomy.facts.n_layers
    layer_dev = layer_devices(n, placement.n_gpu_layers, DEVICES, placement.tensor_split)
    on_gpu = np.array([layer_dev[i] == GPU for i in range(n)])
    af = anatomy.active_fraction
    reads = read_bytes_by_device(anatomy, placement, DEVICES)
    stream_experts = stream_common = gpu_params = cpu_params = 0.0
    split_layers: set[int] = set()
    for t in anatomy.tensors:
        if t.layer is None:
            continue
        in_ram = device_of(tensor_buffer(t, placement, layer_dev)) == "CPU"
        expert = t.group is Group.EXPERT
        params = float(np.prod(t.shape)) * (af if expert else 1.0) if len(t.shape) >= 2 and not t.is_bias else 0.0
        if in_ram:
            if expert:
                stream_experts += t.n_bytes
            else:
                stream_common += t.n_bytes
            cpu_params += params
            if expert and on_gpu[t.layer]:
                split_layers.add(t.layer)
        else:
            gpu_params += params
    gpu_ids = np.flatnonzero(on_gpu)
    first_gpu = int(gpu_ids[0]) if gpu_ids.size else n
    lead = min(split_layers) - first_gpu if split_layers else 0
    full = shape.full_attention
    return Features(
        gpu_read=reads.get(GPU, (0.0, 0.0))[0], cpu_read=reads.get("CPU", (0.0, 0.0))[0],
        gpu_layers=float(on_gpu.sum()), gpu_full=float((on_gpu & full).sum()),
        gpu_windowed=float((on_gpu & ~full).sum()), cpu_full=float((~on_gpu & full).sum()),
        cpu_windowed=float((~on_gpu & ~full).sum()), splits=float(len(split_layers)), lead=float(lead),
        stream_experts=stream_experts, stream_common=stream_common, gpu_params=gpu_params, cpu_params=cpu_params,
    )


@dataclass(frozen=True)
class Speeds:
    """Noise-free pp and tg in tokens/s (SIMULATED)."""

    pp: float
    tg: float

    def latency(self, workload: Workload) -> float:
        """placetune's default objective: seconds for the workload's request."""
        seconds = 0.0
        if workload.n_prompt:
            seconds += workload.n_prompt / self.pp
        if workload.n_gen:
            seconds += workload.n_gen / self.tg
        return seconds


def speeds(shape: ModelShape, placement: Placement, workload: Workload, machine: TwinMachine,
           state: str = "ok") -> Speeds:
    """pp and tg of one placement that loaded (state ok or spill), without noise."""
    times = token_times(placement_features(shape, placement), knobs_of(shape, placement, workload), workload, shape,
                        machine)
    scale = thread_scale(placement.threads or machine.cores, machine.cores)  # -t defaults to the physical cores
    pp_s, tg_s = float(times.pp_seconds(scale)), float(times.tg_seconds(scale))
    if state == SPILL:
        pp_s, tg_s = pp_s * SPILL_PP, tg_s * SPILL_TG
    return Speeds(1.0 / pp_s, 1.0 / tg_s)
