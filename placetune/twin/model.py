"""The twin's performance model: noise-free pp and tg for a placement of a model on a TwinMachine.

Per generated token (tg), every active weight and the KV cache up to the current depth is read
once from the memory that holds it, at that memory's bandwidth x efficiency (summed over the
cards and RAM: under -sm layer one token passes through them in turn), plus fixed costs per GPU
layer, per hand-over between devices and per token. Per prompt token (pp), the cards compute every
matrix product (op offload copies CPU-resident weights to the first card, over its PCIe link, once
per ubatch: so pp grows almost linearly with -ub while experts live in RAM, llama.cpp PR 15346),
attention grows with depth, and CPU-resident layers attend on the CPU. Op offload takes a matrix
product only from a batch of GGML_OP_OFFLOAD_MIN_BATCH tokens (default 32; PR 18535, ggml-cuda.cu's
offload_op compares the op's batch with it); a smaller ubatch multiplies weights in RAM on the CPU.
Pinned host buffers (--no-mmap) copy faster (PR 14990). A copy can hide behind the compute of the
GPU layers that precede it, which is why experts of the last layers in RAM cost less pp than of the
first (ik_llama PR 2262). Several cards work one after the other, never together: llama.cpp's
pipeline parallelism is off whenever tensor overrides are given (llama-context.cpp), and every
placement that leaves experts in RAM has them (the twin leaves it out altogether: only a model that
fits the cards whole, with no override, would use it). Activations cross the link between cards at
each hand-over. Threads only change the CPU side, through one curve, `thread_scale`.

Every function here works on floats and on numpy arrays alike, so the exhaustive grid (grid.py)
and the runner (runner.py) share one set of formulas; they differ only in how a placement is
turned into Features, and a test holds the two routes equal.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from placetune.anatomy import Group
from placetune.device_bytes import layer_devices, tensor_buffer
from placetune.memory import DEFAULT_BATCH, DEFAULT_UBATCH, OP_OFFLOAD_MIN_BATCH, op_offload_min_batch
from placetune.placement import Placement
from placetune.predict import device_of, read_bytes_by_device
from placetune.runners.base import Workload
from placetune.twin.capacity import DEVICES, SPILL
from placetune.twin.machine import GB, TwinMachine
from placetune.twin.shape import ModelShape

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
ACTIVATION_BYTES = 4  # f32 activations cross PCIe at each GPU<->CPU hand-over, and the link at each card<->card one


@dataclass(frozen=True)
class Features:
    """What the model needs from a placement. Floats for one placement, arrays for the grid.

    The gpu_read, gpu_full, gpu_windowed and gpu_params tuples hold one entry per card (CUDA0, CUDA1, ...).
    """

    gpu_read: tuple[Any, ...]  # weight bytes one generated token reads from each card's memory
    cpu_read: Any  # ... from system RAM
    gpu_layers: Any  # layers (of n_layers) on the cards
    gpu_full: tuple[Any, ...]  # full-attention layers on each card
    gpu_windowed: tuple[Any, ...]  # windowed-attention layers on each card
    cpu_full: Any
    cpu_windowed: Any
    splits: Any  # GPU layers with some routed experts in RAM: two hand-overs each
    lead: Any  # GPU layers before the first of those, whose compute can hide its copy
    stream_experts: Any  # routed-expert bytes in RAM: op offload copies the used ones to the GPU per ubatch
    stream_common: Any  # other layer weights in RAM (layers not on the GPU): copied whole per ubatch
    gpu_params: tuple[Any, ...]  # matrix weights one token multiplies (experts x used/count) that live on each card
    cpu_params: Any  # ... that live in RAM
    hops: Any = 0.0  # card-to-card hand-overs per token: each -sm layer boundary, two per layer whose experts
    #                  sit on another card


@dataclass(frozen=True)
class Knobs:
    """The runtime knobs of a placement, resolved to what llama.cpp would use (threads: see thread_scale)."""

    ubatch: Any  # effective: min(-ub, -b, prompt length)
    flash_attn: Any  # bool; "auto" is on for CUDA
    pinned: Any  # bool: --no-mmap
    op_offload: Any  # bool
    kv_row: float  # KV bytes per token per attention layer
    offload_min_batch: Any = OP_OFFLOAD_MIN_BATCH  # GGML_OP_OFFLOAD_MIN_BATCH: smaller ubatches multiply on the CPU


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
    gpus = m.gpus
    ram_bw = m.ram_bw_gbs * GB * m.ram_bw_eff
    flash = np.asarray(k.flash_attn, dtype=bool)

    # -- generation: at the mean depth of the generated tokens (llama-bench: tg starts at -d) --
    d_tg = w.depth + w.n_gen / 2
    kv_factor = np.where(flash, 1.0, FA_OFF_KV)
    gpu_reads = sum((f.gpu_read[i] + k.kv_row * (f.gpu_full[i] * d_tg + f.gpu_windowed[i] * min(d_tg, window))
                     * kv_factor) / (gpu.bw_gbs * GB * m.gpu_bw_eff) for i, gpu in enumerate(gpus))
    kv_cpu = k.kv_row * (f.cpu_full * d_tg + f.cpu_windowed * min(d_tg, window)) * kv_factor
    tg_fixed = (gpu_reads + f.gpu_layers * m.gpu_layer_overhead_s
                + (2 * f.splits + f.hops) * m.split_overhead_s + m.token_overhead_s)
    tg_cpu = (f.cpu_read + kv_cpu) / ram_bw

    # -- prompt: at the mean depth of the prompt's tokens --
    d_pp = w.depth + w.n_prompt / 2
    attention = 4.0 * facts.n_head * facts.head_dim_k * np.where(flash, 1.0, FA_OFF_ATTENTION)
    attn_cpu = attention * (f.cpu_full * d_pp + f.cpu_windowed * min(d_pp, window))
    ub = np.maximum(np.asarray(k.ubatch, dtype=float), 1.0)
    offload = np.asarray(k.op_offload, dtype=bool) & (ub >= k.offload_min_batch)
    pcie = m.pcie_gbs * GB * np.where(k.pinned, m.pcie_pinned_eff, m.pcie_pageable_eff)  # the first card's link
    compute = 0.0
    for i, gpu in enumerate(gpus):
        # op offload runs matmuls on weights in RAM on the first card that takes them (ggml-backend.cpp)
        params = f.gpu_params[i] + np.where(offload, f.cpu_params, 0.0) if i == 0 else f.gpu_params[i]
        attn = attention * (f.gpu_full[i] * d_pp + f.gpu_windowed[i] * min(d_pp, window))
        compute = compute + (2.0 * params / (gpu.tflops * 1e12 * m.compute_eff * matmul_efficiency(ub))
                             + attn / (gpu.tflops * 1e12 * m.attention_eff))
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
    if len(gpus) > 1:
        activations = activations + f.hops * ACTIVATION_BYTES * facts.n_embd / (m.link_gbs * GB * m.pcie_pinned_eff)
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
    """llama.cpp's effective knobs: -ub is capped by -b and by the prompt; the op offload threshold comes from the
    environment the placement runs with."""
    ub = min(placement.ubatch or DEFAULT_UBATCH, placement.batch or DEFAULT_BATCH, max(workload.n_prompt, 1))
    return Knobs(ubatch=ub, flash_attn=placement.flash_attn != "off", pinned=placement.load_mode == "none",
                 op_offload=not placement.no_op_offload, kv_row=kv_row_bytes(shape, placement),
                 offload_min_batch=op_offload_min_batch(placement))


@functools.lru_cache(maxsize=8192)
def placement_features(shape: ModelShape, placement: Placement, devices: tuple[str, ...] = DEVICES) -> Features:
    """Features of one placement, by placetune's own tensor accounting (tensor_buffer, read_bytes_by_device).

    devices: the machine's cards in llama.cpp's order. Cached: a search measures a placement several times
    (screening, the rest, the final rounds), and the accounting matches every tensor name against every rule.
    """
    anatomy = shape.anatomy
    n = anatomy.facts.n_layers
    layer_dev = layer_devices(n, placement.n_gpu_layers, devices, placement.tensor_split)
    home = np.array([devices.index(layer_dev[i]) if layer_dev[i] in devices else -1 for i in range(n)])
    on_gpu = home >= 0
    af = anatomy.active_fraction
    reads = read_bytes_by_device(anatomy, placement, devices)
    stream_experts = stream_common = cpu_params = 0.0
    gpu_params = [0.0] * len(devices)
    split_layers: set[int] = set()
    away_layers: set[int] = set()  # GPU layers with some routed experts on another card
    for t in anatomy.tensors:
        if t.layer is None:
            continue
        where = device_of(tensor_buffer(t, placement, layer_dev))
        expert = t.group is Group.EXPERT
        params = float(np.prod(t.shape)) * (af if expert else 1.0) if len(t.shape) >= 2 and not t.is_bias else 0.0
        if where == "CPU":
            if expert:
                stream_experts += t.n_bytes
            else:
                stream_common += t.n_bytes
            cpu_params += params
            if expert and on_gpu[t.layer]:
                split_layers.add(t.layer)
        else:
            gpu_params[devices.index(where)] += params
            if expert and on_gpu[t.layer] and where != layer_dev[t.layer]:
                away_layers.add(t.layer)
    gpu_ids = np.flatnonzero(on_gpu)
    first_gpu = int(gpu_ids[0]) if gpu_ids.size else n
    lead = min(split_layers) - first_gpu if split_layers else 0
    # -sm layer boundaries: consecutive layers (the output head last) on two different cards
    chain = [d for d in layer_dev if d in devices]
    boundaries = sum(a != b for a, b in itertools.pairwise(chain))
    full = shape.full_attention
    return Features(
        gpu_read=tuple(reads.get(d, (0.0, 0.0))[0] for d in devices), cpu_read=reads.get("CPU", (0.0, 0.0))[0],
        gpu_layers=float(on_gpu.sum()), gpu_full=tuple(float(((home == i) & full).sum()) for i in range(len(devices))),
        gpu_windowed=tuple(float(((home == i) & ~full).sum()) for i in range(len(devices))),
        cpu_full=float((~on_gpu & full).sum()), cpu_windowed=float((~on_gpu & ~full).sum()),
        splits=float(len(split_layers)), lead=float(lead), stream_experts=stream_experts,
        stream_common=stream_common, gpu_params=tuple(gpu_params), cpu_params=cpu_params,
        hops=float(boundaries + 2 * len(away_layers)),
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
    times = token_times(placement_features(shape, placement, machine.devices), knobs_of(shape, placement, workload),
                        workload, shape, machine)
    scale = thread_scale(placement.threads or machine.cores, machine.cores)  # -t defaults to the physical cores
    pp_s, tg_s = float(times.pp_seconds(scale)), float(times.tg_seconds(scale))
    if state == SPILL:
        pp_s, tg_s = pp_s * SPILL_PP, tg_s * SPILL_TG
    return Speeds(1.0 / pp_s, 1.0 / tg_s)
