"""Memory model: predicted bytes per device for a placement, and whether that fits.

A trial predicted not to fit is pruned without launching llama.cpp, so this model decides where the
search may go: over-predicting prunes feasible placements for good, under-predicting crashes trials
at the VRAM cliff. Each part follows llama.cpp's own sizing (build b11434):

- weights: every tensor in its buffer, aligned as ggml allocates it (placement.bytes_per_buffer);
- KV cache: llama_kv_cache / llama_kv_cache_iswa exactly: the context padded to 256 cells, per-layer
  KV heads and head sizes, sliding-window layers in their own smaller cache, MLA's K-only latent
  cache, the K/V types (quantized ones included), and `-np` slots in one unified stream or one
  stream per slot;
- compute buffer: not computable from the GGUF alone (it is ggml-alloc's peak over the reserved
  graphs), so it is a formula over the tensors that peak holds, with constants fitted to llama.cpp's
  reported sizes (COMPUTE_FIT below says how). A measured trial's own sizes beat this estimate;
- op offload: with a CUDA-like accelerator, matmuls on CPU-resident weights run on the accelerator
  from a ubatch of 32 tokens, and each such weight is copied into its compute buffer (PREDICTED from
  ggml-backend's scheduler, not measured here: the RPC rig does not offload ops).

Launched trials that still run out of memory feed `MarginFeedback`, which widens that device's
margin for the rest of a study.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from placetune.anatomy import Anatomy, ModelFacts
from placetune.device_bytes import aligned, bytes_per_buffer, layer_devices, matmul_bytes_per_layer
from placetune.errors import PlacetuneError
from placetune.placement import Placement
from placetune.units import human_bytes

DEFAULT_UBATCH = 512
DEFAULT_BATCH = 2048
DEFAULT_MARGIN = 512 * 2**20  # per accelerator, for the CUDA/driver context and fragmentation
CTX_PAD = 256  # llama_context pads n_ctx (and each slot's share) to this many cells
OP_OFFLOAD_MIN_BATCH = 32  # GGML_OP_OFFLOAD_MIN_BATCH's default
OP_OFFLOAD_ENV = "GGML_OP_OFFLOAD_MIN_BATCH"


@dataclass(frozen=True)
class DeviceNeed:
    """Predicted bytes on one device."""

    weights: int
    kv: int
    compute: int
    output: int = 0  # llama.cpp's host-side logits buffer (CPU only)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.output


# ---------------------------------------------------------------------------------------------
# Context: what llama_context makes of -c, -np, -kvu, -b and -ub (src/llama-context.cpp)


@dataclass(frozen=True)
class ContextShape:
    """The cache and batch sizes llama.cpp actually uses for a requested context."""

    n_ctx: int  # total cells after padding
    cells: int  # cells per stream (llama.cpp's n_ctx_seq, the kv_size of each cache)
    n_stream: int  # 1 with a unified cache, else one stream per slot
    n_seq: int
    n_batch: int
    n_ubatch: int


def context_shape(n_ctx: int, n_seq: int = 1, kv_unified: bool = False, batch: int | None = None,
                  ubatch: int | None = None, n_ctx_train: int = 0) -> ContextShape:
    """llama_context's arithmetic: n_ctx 0 means the training context; each size is padded to 256 cells."""
    n_ctx = n_ctx or n_ctx_train
    if n_ctx <= 0:
        raise PlacetuneError("context size must be positive; pass -c N (or a model with a training context)")
    if n_seq < 1:
        raise PlacetuneError(f"the number of slots (-np) must be at least 1, got {n_seq}")
    n_batch = min(n_ctx, batch or DEFAULT_BATCH)  # causal attention: a batch never exceeds the context
    n_ubatch = min(n_batch, ubatch or DEFAULT_UBATCH)
    padded = _pad(n_ctx, CTX_PAD)
    if kv_unified:
        return ContextShape(padded, padded, 1, n_seq, n_batch, n_ubatch)
    per_seq = _pad(padded // n_seq, CTX_PAD)
    return ContextShape(per_seq * n_seq, per_seq, n_seq, n_seq, n_batch, n_ubatch)


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def _row_bytes(type_name: str, n: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    if n % block:
        raise PlacetuneError(f"KV cache type {type_name} needs rows that are a multiple of {block} values, "
                             f"and this model's are {n}; pick f16, bf16 or q8_0")
    return n // block * size


# ---------------------------------------------------------------------------------------------
# KV cache (src/llama-kv-cache.cpp, src/llama-kv-cache-iswa.cpp)


@dataclass(frozen=True)
class LayerKV:
    """One layer's cache tensors: bytes of K and of V in one stream, and how many cells they hold."""

    layer: int
    k_bytes: int
    v_bytes: int
    cells: int
    swa: bool


def kv_layers(facts: ModelFacts, shape: ContextShape, type_k: str = "f16", type_v: str = "f16",
              flash_attn: bool = True, swa_full: bool = False) -> list[LayerKV]:
    """Every layer's K and V tensors as llama.cpp allocates them (per stream; multiply by shape.n_stream).

    flash_attn: whether llama.cpp creates the cache for flash attention, which it does for -fa on and
    -fa auto alike (the V cache is transposed, at the widest layer's size, only with -fa off).
    swa_full: --swa-full (llama-server and llama-bench default to off; llama_context_default_params,
    which the Python bindings use, to on).
    """
    n = facts.n_layers
    heads_kv = facts.n_head_kv_layers or (facts.n_head_kv,) * n
    swa_layers = facts.swa_layers or (False,) * n
    swa_cells = shape.cells
    if any(swa_layers) and not swa_full:
        window = facts.swa_window * (shape.n_seq if shape.n_stream == 1 else 1) + shape.n_ubatch
        swa_cells = _pad(min(shape.cells, window), CTX_PAD)

    def dims(il: int) -> tuple[int, int]:
        swa = swa_layers[il]
        return ((facts.head_dim_k_swa or facts.head_dim_k) if swa else facts.head_dim_k,
                (facts.head_dim_v_swa or facts.head_dim_v) if swa else facts.head_dim_v)

    v_width_max = max((dims(il)[1] * heads_kv[il] for il in range(n)), default=0)
    out = []
    for il in range(n):
        if heads_kv[il] == 0:
            continue
        dk, dv = dims(il)
        cells = swa_cells if swa_layers[il] else shape.cells
        k = _row_bytes(type_k, dk * heads_kv[il]) * cells
        # MLA caches the compressed latent (and the rope part) as K only; attention reads V from it
        v = 0 if facts.is_mla else _row_bytes(type_v, dv * heads_kv[il] if flash_attn else v_width_max) * cells
        out.append(LayerKV(il, k, v, cells, swa_layers[il]))
    return out


def kv_per_device(layers: Sequence[LayerKV], layer_dev: Sequence[str], shape: ContextShape) -> dict[str, int]:
    """KV buffer bytes per device: each layer's cache lives with the layer (offload_kqv, llama.cpp's default)."""
    out: dict[str, int] = {}
    for lk in layers:
        dev = layer_dev[lk.layer]
        size = sum(aligned(b * shape.n_stream, dev) for b in (lk.k_bytes, lk.v_bytes) if b)
        out[dev] = out.get(dev, 0) + size
    return out


# ---------------------------------------------------------------------------------------------
# Compute buffer (ggml-alloc's peak over the graphs llama_context::sched_reserve reserves)


# Fitted by `python -m placetune.compute_fit` (its docstring has the command line and the result): coefficients
# of the per-token activations each phase of the graph holds, in units of 4 * ubatch * width bytes, for
# widths (in order) n_embd and q heads x head size and kv heads x (k + v size) in the attention phase;
# the FFN width, n_embd, experts used x n_embd and shared-expert width in the FFN phase; n_embd beside
# the logits in the output phase; n_embd in a CPU buffer that only holds the inputs; and the extra
# activations a device keeps when its layers start after another device's (copies across the split).
COMPUTE_FIT: tuple[float, ...] = (1.95, 1.45, 1.6, 3.3, 1.15, 0.15, 0.0, 3.05, 2.7, 0.35)
# What the fit achieved on its sweep (9 generated models, CPU and RPC, ctx 256-2048, ubatch 32-512, fa on/off).
COMPUTE_TOLERANCE = 0.30
COMPUTE_TOLERANCE_ABS = 64 * 1024


@dataclass(frozen=True)
class ComputeTerms:
    """The byte terms of one device's compute buffer phases; `compute_bytes` weighs them with COMPUTE_FIT.

    Exact terms (the logits, the attention masks, the KQ matrix without flash attention) enter with
    weight 1: they dominate on real models, so the fitted part matters most on tiny ones.
    """

    mask: int  # the attention masks, inputs that live through every layer
    kq: int  # the KQ matrix, materialised in f32 without flash attention
    attn: tuple[int, int, int]  # 4*T*n_embd, 4*T*q width, 4*T*kv width
    ffn: tuple[tuple[int, int, int, int], ...]  # per distinct layer kind: width, n_embd, used*n_embd, shexp
    logits: int  # 4 * T * n_vocab on the output device, else 0
    out_embd: int
    inputs_only: bool  # the CPU holding no layer keeps only the inputs
    boundary: int  # activations copied in when this device's first layer follows another device's

    def bytes(self, c: Sequence[float] = COMPUTE_FIT) -> int:
        phases = []
        if self.ffn:
            a = self.mask + self.boundary * c[9]
            phases.append(a + self.kq + c[0] * self.attn[0] + c[1] * self.attn[1] + c[2] * self.attn[2])
            phases += [a + c[3] * w + c[4] * e + c[5] * ue + c[6] * sh for w, e, ue, sh in self.ffn]
        if self.logits:
            phases.append(self.logits + c[7] * self.out_embd)
        if self.inputs_only:
            phases.append(self.mask + c[8] * self.out_embd)
        return round(max(phases, default=0))


def compute_terms(anatomy: Anatomy, layer_dev: Sequence[str], shape: ContextShape, flash_attn: bool,
                  swa_cells: int | None = None) -> dict[str, ComputeTerms]:
    """The compute-buffer terms of every device that computes something (the CPU always: it holds the inputs)."""
    f = anatomy.facts
    t, e = shape.n_ubatch, f.n_embd
    n_layers = f.n_layers
    swa = f.swa_layers or (False,) * n_layers
    full_cells = shape.cells * shape.n_stream
    cells = {False: full_cells, True: (swa_cells or shape.cells) * shape.n_stream}
    kinds = {swa[il] for il in range(n_layers)}
    mask = sum(cells[k] * t * (2 if flash_attn else 4) for k in kinds)
    kq = 0 if flash_attn else max(cells[k] for k in kinds) * t * f.n_head * 4
    width_q = f.n_head * (f.head_dim_k_mla or f.head_dim_k)
    width_kv = f.n_head_kv * (f.head_dim_k + f.head_dim_v)
    unit = 4 * t
    moe = (unit * f.n_expert_used * f.n_ff_exp, unit * e, unit * f.n_expert_used * e,
           unit * f.n_expert_shared * f.n_ff_exp)
    dense = (unit * f.n_ff, unit * e, 0, 0)
    by_dev: dict[str, list[int]] = {}
    for il in range(n_layers):
        by_dev.setdefault(layer_dev[il], []).append(il)
    out_dev = layer_dev[n_layers]
    out: dict[str, ComputeTerms] = {}
    for dev in {*by_dev, out_dev, "CPU"}:
        mine = by_dev.get(dev, [])
        ffn = tuple({moe if f.is_moe and il >= f.n_leading_dense else dense for il in mine})
        follows = bool(mine) and mine[0] > 0 and layer_dev[mine[0] - 1] != dev
        out[dev] = ComputeTerms(
            mask=mask, kq=kq, attn=(unit * e, unit * width_q, unit * width_kv), ffn=ffn,
            logits=unit * f.n_vocab if dev == out_dev else 0, out_embd=unit * e,
            inputs_only=dev == "CPU" and not mine,
            boundary=unit * (f.n_expert_used * e + e) if follows or (dev == "CPU" and 0 < len(mine) < n_layers) else 0,
        )
    return out


def compute_per_device(anatomy: Anatomy, layer_dev: Sequence[str], shape: ContextShape, flash_attn: bool,
                       swa_cells: int | None = None) -> dict[str, int]:
    """Estimated compute buffer per device (see COMPUTE_FIT)."""
    return {dev: terms.bytes() for dev, terms in compute_terms(anatomy, layer_dev, shape, flash_attn,
                                                                swa_cells).items()}


def op_offload_min_batch(placement: Placement) -> int:
    """The batch from which op offload takes a matmul: GGML_OP_OFFLOAD_MIN_BATCH as the placement sets it, read
    with C's atoi as the CUDA, Vulkan, SYCL and CANN backends read it (ggml-cuda.cu), else its default."""
    value = dict(placement.env).get(OP_OFFLOAD_ENV)
    if value is None:
        return OP_OFFLOAD_MIN_BATCH
    digits = re.match(r"\s*[+-]?\d+", value)
    return int(digits[0]) if digits else 0


def op_offload_copies(anatomy: Anatomy, placement: Placement, devices: Sequence[str], ubatch: int) -> dict[str, int]:
    """PREDICTED extra compute-buffer bytes for op offload's weight copies, on the first CUDA-like device.

    From a ubatch of GGML_OP_OFFLOAD_MIN_BATCH tokens (op_offload_min_batch), ggml's scheduler runs matmuls
    whose weights sit in RAM on the accelerator and copies those weights into its compute buffer for the
    split that needs them; the splits of one layer run back to back, so the peak is about the largest
    layer's CPU-resident weights. A ubatch below the threshold reserves no copies: the worst-case graph
    llama.cpp reserves has n_ubatch tokens. RPC devices do not offload ops.
    """
    accel = next((d for d in devices if not d.startswith("RPC")), None)
    if accel is None or placement.no_op_offload or ubatch < op_offload_min_batch(placement):
        return {}
    per_layer = matmul_bytes_per_layer(anatomy, placement, devices, "CPU")
    return {accel: max(per_layer.values())} if per_layer else {}


# ---------------------------------------------------------------------------------------------
# The whole prediction


def predict_memory(anatomy: Anatomy, placement: Placement, devices: Sequence[str], n_ctx: int, *,
                   n_seq: int = 1, kv_unified: bool = False, swa_full: bool = False) -> dict[str, DeviceNeed]:
    """Weights, KV cache, compute and output buffers per device (CPU plus the accelerators in `devices`).

    n_ctx: the context llama.cpp is given (-c; 0 for the model's training context), before padding.
    n_seq / kv_unified: llama-server's `-np N` slots and `-kvu` (llama-server's own default with no
    -np is 4 slots, unified; placetune's runners use 1). swa_full: `--swa-full`.
    """
    f = anatomy.facts
    shape = context_shape(n_ctx, n_seq, kv_unified, placement.batch, placement.ubatch, f.n_ctx_train)
    layer_dev = layer_devices(f.n_layers, placement.n_gpu_layers, devices, placement.tensor_split)
    flash_attn = placement.flash_attn != "off"
    weights = bytes_per_buffer(anatomy, placement, devices, as_allocated=True)
    layers = kv_layers(f, shape, placement.cache_type_k or "f16", placement.cache_type_v or "f16", flash_attn, swa_full)
    kv = kv_per_device(layers, layer_dev, shape)
    swa_cells = next((lk.cells for lk in layers if lk.swa), None)
    compute = compute_per_device(anatomy, layer_dev, shape, flash_attn, swa_cells)
    for dev, extra in op_offload_copies(anatomy, placement, devices, shape.n_ubatch).items():
        compute[dev] = compute.get(dev, 0) + extra
    output = {"CPU": 4 * f.n_vocab * shape.n_seq}
    used = set(weights) | set(kv) | {d for d, n in compute.items() if n} | {"CPU"}
    return {dev: DeviceNeed(weights.get(dev, 0), kv.get(dev, 0), compute.get(dev, 0), output.get(dev, 0))
            for dev in used}


# ---------------------------------------------------------------------------------------------
# Fit verdicts and what out-of-memory trials teach


@dataclass(frozen=True)
class FitVerdict:
    """Whether a placement fits, and why not: one line per device that overflows."""

    fits: bool
    reasons: tuple[str, ...]
    need: dict[str, DeviceNeed]

    def to_dict(self) -> dict[str, object]:
        return {"fits": self.fits, "reasons": list(self.reasons),
                "need": {k: {**asdict(v), "total": v.total} for k, v in self.need.items()}}


def check_fit(need: Mapping[str, DeviceNeed], capacity: Mapping[str, int],
              margin: int | Mapping[str, int] = DEFAULT_MARGIN, budgeted: Collection[str] = ()) -> FitVerdict:
    """Compare predicted needs with capacities. Free memory an accelerator reports loses a safety margin
    (one figure, or one per device, e.g. MarginFeedback.margins()); CPU RAM and budgets the user set
    (`budgeted`) are taken as given."""
    reasons = []
    for dev, n in sorted(need.items()):
        if dev not in capacity or n.total == 0:
            continue
        dev_margin = margin.get(dev, DEFAULT_MARGIN) if isinstance(margin, Mapping) else margin
        room = capacity[dev] - (0 if dev == "CPU" or dev in budgeted else dev_margin)
        if n.total > room:
            reasons.append(
                f"{dev}: predicted {human_bytes(n.total)} (weights {human_bytes(n.weights)}, KV {human_bytes(n.kv)}, "
                f"compute {human_bytes(n.compute)}) > {human_bytes(room)} available"
            )
    return FitVerdict(not reasons, tuple(reasons), dict(need))


@dataclass
class MarginFeedback:
    """Per-device margins that out-of-memory trials widen for the rest of a study.

    A trial predicted to fit that still ran out of memory shows the model under-predicted that
    device by at least the room it had left. `record_oom` widens the device's margin by that
    shortfall plus `step` (so the same placement is pruned next time) and returns a line saying so,
    for the search to print. Margins only grow; `to_dict` goes into a study's record.

    The estimate's error sits mostly in the compute buffer (the weights and KV are exact), so it grows
    with it: asked about a placement with a smaller predicted compute buffer than the one that ran out
    (a smaller -ub), the widening shrinks in proportion. Otherwise one out-of-memory trial at -ub 2048
    would push every -ub 512 placement gigabytes back from where it really fits; if the error did not
    shrink, that placement runs out of memory too and brings its own, full widening.
    """

    base: int = DEFAULT_MARGIN
    step: int = 256 * 2**20
    widened: dict[str, int] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    calls: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # device: (compute, margin) per OOM

    def margin(self, device: str, compute: int | None = None) -> int:
        """The device's margin; given the predicted compute buffer of a placement, the margin for it."""
        if compute is None or device not in self.calls:
            return self.widened.get(device, self.base)
        out = self.base
        for oom_compute, wanted in self.calls[device]:
            share = 1.0 if compute >= oom_compute or oom_compute <= 0 else compute / oom_compute
            out = max(out, self.base + round((wanted - self.base) * share))
        return out

    def margins(self) -> dict[str, int]:
        return dict(self.widened)

    def record_oom(self, need: Mapping[str, DeviceNeed], capacity: Mapping[str, int],
                   device: str | None = None) -> str:
        """Widen the margin of the device that ran out (or, not knowing which, of every accelerator that was
        within its margin's reach) and return what changed, in one line."""
        devices = [device] if device else [d for d in need if d != "CPU" and d in capacity]
        changes = []
        for dev in devices:
            if dev not in need or dev not in capacity:
                continue
            left = capacity[dev] - need[dev].total  # what the model thought was still free
            compute = need[dev].compute
            new = max(self.margin(dev, compute), left + self.step)
            if new > self.margin(dev, compute):
                changes.append(f"{dev} margin {human_bytes(self.margin(dev, compute))} -> {human_bytes(new)}"
                               f" (compute buffer {human_bytes(compute)} and above)")
                self.calls.setdefault(dev, []).append((compute, new))
                self.widened[dev] = max(new, self.margin(dev))
        line = ("out of memory where the memory model predicted a fit: " + ", ".join(changes)
                if changes else "out of memory where the memory model predicted a fit; margins already cover it")
        self.events.append(line)
        return line

    def to_dict(self) -> dict[str, object]:
        return {"base": self.base, "step": self.step, "widened": dict(self.widened), "events": list(self.events)}


@dataclass
class LoadedEvidence:
    """What placements that loaded prove: a placement needing no more, part by part, on any accelerator fits too.

    The counterpart of MarginFeedback. A margin widened by one out-of-memory trial (often one with a larger
    compute buffer, where the estimate errs most) would otherwise also rule out placements whose twin already
    ran: a change of threads or of -fa keeps the same bytes. Weights with KV, and the compute buffer, are
    compared apart, since the estimate's error sits in the compute part.
    """

    loaded: list[dict[str, tuple[int, int]]] = field(default_factory=list)

    def record(self, need: Mapping[str, DeviceNeed]) -> None:
        parts = {dev: (n.weights + n.kv, n.compute) for dev, n in need.items() if dev != "CPU"}
        if parts and parts not in self.loaded:
            self.loaded.append(parts)

    def covers(self, need: Mapping[str, DeviceNeed]) -> bool:
        """Whether a placement that loaded needed at least this much of each part on every accelerator."""
        wanted = {dev: (n.weights + n.kv, n.compute) for dev, n in need.items() if dev != "CPU" and n.total}
        return any(all(dev in seen and w <= seen[dev][0] and c <= seen[dev][1] for dev, (w, c) in wanted.items())
                   for seen in self.loaded)
