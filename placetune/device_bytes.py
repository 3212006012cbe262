"""Which device holds each tensor's bytes under a placement, as llama.cpp assigns and allocates them.

Feasibility checks run this for every candidate placement, so it keeps a per-anatomy index (layer totals
summed once, each pattern's matches computed once) instead of walking every tensor with a regex.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from placetune.anatomy import Anatomy, Group, TensorInfo
from placetune.placement import ExpertRule, Override, Placement, device_of, rule_pattern

_HOST_ALIGNMENT = 32  # ggml's TENSOR_ALIGNMENT: CPU and RPC-over-CPU buffers
_CUDA_ALIGNMENT = 128
_CUDA_ROW_PADDING = 512  # MATRIX_ROW_PADDING: CUDA pads quantized rows so kernels may read past the end
_INDEX_CACHE_SIZE = 8


def layer_devices(n_layers: int, n_gpu_layers: int | None, devices: Sequence[str],
                  tensor_split: Sequence[float] | None = None) -> list[str]:
    """Device of each layer 0..n_layers (the last entry is the output head), as llama.cpp assigns them.

    llama.cpp puts the last `ngl` of the n_layers+1 layers on the accelerators, split across
    devices in proportion to tensor_split (llama.cpp's own default splits by free memory; here
    equal shares stand in for that).
    """
    ngl = n_layers + 1 if n_gpu_layers is None else n_gpu_layers
    if not devices:
        return ["CPU"] * (n_layers + 1)
    start = max(n_layers + 1 - ngl, 0)
    active = min(ngl, n_layers + 1)
    split = list(tensor_split) if tensor_split else [1.0] * len(devices)
    total = sum(split[: len(devices)]) or 1.0
    bounds, acc = [], 0.0
    for share in split[: len(devices)]:
        acc += share / total
        bounds.append(acc)
    out = []
    for il in range(n_layers + 1):
        if il < start:
            out.append("CPU")
            continue
        frac = (il - start) / active
        idx = next((j for j, b in enumerate(bounds) if frac < b), len(devices) - 1)
        out.append(devices[idx])
    return out


def _layer_slot(t: TensorInfo, n_layers: int) -> int:
    """Index into layer_devices' list for a tensor's default device; -1 for the input (always CPU)."""
    if t.layer is not None:
        return min(t.layer, n_layers)
    return n_layers if t.name.startswith("output") else -1


def tensor_buffer(t: TensorInfo, placement: Placement, layer_dev: Sequence[str]) -> str:
    """The device llama.cpp would put this tensor on: first matching override's, else its layer's device."""
    for o in placement.overrides:
        if re.search(rule_pattern(o), t.name):
            return device_of(o.buft)
    slot = _layer_slot(t, len(layer_dev) - 1)
    return "CPU" if slot < 0 else layer_dev[slot]


def allocated_bytes(t: TensorInfo, device: str) -> int:
    """Bytes llama.cpp allocates for a tensor in a device's buffer (ggml_backend_buft_get_alloc_size, aligned)."""
    size = t.n_bytes
    if device.startswith("CUDA"):
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[t.ggml_type]]
        if block > 1 and t.shape and t.shape[0] % _CUDA_ROW_PADDING:
            size += (_CUDA_ROW_PADDING - t.shape[0] % _CUDA_ROW_PADDING) // block * type_size
    return aligned(size, device)


def aligned(size: int, device: str) -> int:
    """A buffer's size in a device's buffers: CUDA aligns to 128 bytes, CPU and RPC-over-CPU to 32."""
    align = _CUDA_ALIGNMENT if device.startswith("CUDA") else _HOST_ALIGNMENT
    return -(-size // align) * align


class _TensorIndex:
    """Per-anatomy arrays for fast accounting: bytes per layer slot, and each override pattern's matches once.

    A feasibility check runs for every candidate placement, so nothing here may walk all tensors with
    a regex per placement: layer totals are summed once, and a pattern's matches are computed once
    (expert rules only against expert tensor names) and then reused by every placement naming it.
    """

    def __init__(self, anatomy: Anatomy) -> None:
        self.anatomy = anatomy
        tensors = anatomy.tensors
        n_layers = anatomy.facts.n_layers
        self.n_layers = n_layers
        self.names = [t.name for t in tensors]
        self.slots = [_layer_slot(t, n_layers) for t in tensors]
        self.raw = [t.n_bytes for t in tensors]
        self.host = [allocated_bytes(t, "CPU") for t in tensors]
        self.cuda = [allocated_bytes(t, "CUDA0") for t in tensors]
        self.expert_ids = [i for i, t in enumerate(tensors) if t.group is Group.EXPERT]  # chexps too
        # weights of matrix products (what op offload copies): 2-D and up, not the get_rows lookup tables
        self.matmul = [len(t.shape) >= 2 and not t.name.startswith("token_embd") for t in tensors]
        self.slot_totals = {kind: self._totals(sizes) for kind, sizes in
                            (("raw", self.raw), ("host", self.host), ("cuda", self.cuda),
                             ("matmul", [n if m else 0 for n, m in zip(self.raw, self.matmul, strict=True)]))}
        embd = next((i for i, n in enumerate(self.names) if n == "token_embd.weight"), None)
        self.tied_head = embd if embd is not None and "output.weight" not in self.names else None
        self.matches: dict[tuple[str, bool], frozenset[int]] = {}

    def _totals(self, sizes: list[int]) -> list[int]:
        totals = [0] * (self.n_layers + 2)  # slots 0..n_layers, then the input at -1
        for slot, size in zip(self.slots, sizes, strict=True):
            totals[slot] += size
        return totals

    def matching(self, o: Override) -> frozenset[int]:
        pattern = rule_pattern(o)
        key = (pattern, isinstance(o, ExpertRule))
        hit = self.matches.get(key)
        if hit is None:
            rx = re.compile(pattern)
            candidates = self.expert_ids if key[1] else range(len(self.names))
            hit = frozenset(i for i in candidates if rx.search(self.names[i]))
            self.matches[key] = hit
        return hit


_INDEXES: dict[int, _TensorIndex] = {}


def _index(anatomy: Anatomy) -> _TensorIndex:
    index = _INDEXES.get(id(anatomy))
    if index is None or index.anatomy is not anatomy:
        if len(_INDEXES) >= _INDEX_CACHE_SIZE:
            del _INDEXES[next(iter(_INDEXES))]
        index = _INDEXES[id(anatomy)] = _TensorIndex(anatomy)
    return index


def _moved(index: _TensorIndex, overrides: Sequence[Override]) -> dict[int, str]:
    """Tensor index -> the device an override puts it on; the first rule naming a tensor wins, as in llama.cpp."""
    out: dict[int, str] = {}
    for o in overrides:
        there = device_of(o.buft)
        for i in index.matching(o):
            out.setdefault(i, there)
    return out


def bytes_per_buffer(anatomy: Anatomy, placement: Placement, devices: Sequence[str] = (),
                     as_allocated: bool = False) -> dict[str, int]:
    """Weight bytes each buffer type holds under this placement (devices: accelerators, e.g. CUDA0, RPC0).

    as_allocated=False: the GGUF's tensor bytes. as_allocated=True: what llama.cpp's buffers hold, the
    figure its `model buffer size` lines print: each tensor aligned to its buffer (CUDA also pads
    quantized rows), and a tied output head (no output.weight) loaded a second time on the output
    layer's device when that is not the CPU.
    """
    index = _index(anatomy)
    layer_dev = layer_devices(index.n_layers, placement.n_gpu_layers, devices, placement.tensor_split)

    def sizes_on(device: str) -> list[int]:
        if not as_allocated:
            return index.raw
        return index.cuda if device.startswith("CUDA") else index.host

    def kind_of(device: str) -> str:
        return "raw" if not as_allocated else "cuda" if device.startswith("CUDA") else "host"

    out: dict[str, int] = {}
    slot_dev = [*layer_dev, "CPU"]  # slot -1 (the input layer) is the last entry
    for slot, device in enumerate(slot_dev):
        out[device] = out.get(device, 0) + index.slot_totals[kind_of(device)][slot]
    moved = _moved(index, placement.overrides)
    for i, there in moved.items():
        home = slot_dev[index.slots[i]]
        out[home] -= sizes_on(home)[i]
        out[there] = out.get(there, 0) + sizes_on(there)[i]
    if as_allocated and index.tied_head is not None and index.tied_head not in moved and layer_dev[-1] != "CPU":
        head = layer_dev[-1]
        out[head] = out.get(head, 0) + sizes_on(head)[index.tied_head]
    return {dev: n for dev, n in out.items() if n}


def matmul_bytes_per_layer(anatomy: Anatomy, placement: Placement, devices: Sequence[str] = (),
                           device: str = "CPU") -> dict[int, int]:
    """Bytes of matrix-product weights each layer keeps in `device`'s buffers (-1: the input layer, n_layers:
    the output head), the weights op offload copies to an accelerator when they sit in RAM."""
    index = _index(anatomy)
    layer_dev = layer_devices(index.n_layers, placement.n_gpu_layers, devices, placement.tensor_split)
    slot_dev = [*layer_dev, "CPU"]
    totals = index.slot_totals["matmul"]
    out = {slot if slot <= index.n_layers else -1: totals[slot]
           for slot, dev in enumerate(slot_dev) if dev == device and totals[slot]}
    for i, there in _moved(index, placement.overrides).items():
        if not index.matmul[i]:
            continue
        slot = index.slots[i]
        key = -1 if slot < 0 else slot
        home = slot_dev[slot]
        if home == device and there != device:
            out[key] -= index.raw[i]
        elif home != device and there == device:
            out[key] = out.get(key, 0) + index.raw[i]
    return {k: v for k, v in out.items() if v}
