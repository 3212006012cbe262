"""Memory model: predicted bytes per device for a placement, and whether that fits.

A trial predicted not to fit is pruned without launching llama.cpp. Every figure here is a
prediction (weights are exact from the GGUF; KV cache is exact for standard attention; the
compute buffer is an estimate), and launched trials that still run out of memory are recorded
with the prediction so the margin can be calibrated.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from placetune.anatomy import Anatomy
from placetune.placement import Placement, bytes_per_buffer, layer_devices
from placetune.units import human_bytes

DEFAULT_UBATCH = 512
DEFAULT_MARGIN = 512 * 2**20  # per accelerator, for the CUDA/driver context and fragmentation


@dataclass(frozen=True)
class DeviceNeed:
    """Predicted bytes on one device."""

    weights: int
    kv: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


def _bytes_per_element(type_name: str) -> float:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return size / block


def predict_memory(anatomy: Anatomy, placement: Placement, devices: Sequence[str], n_ctx: int) -> dict[str, DeviceNeed]:
    """Weights, KV cache and compute buffer per device (CPU plus the accelerators in `devices`)."""
    f = anatomy.facts
    weights = bytes_per_buffer(anatomy, placement, devices)
    layer_dev = layer_devices(f.n_layers, placement.n_gpu_layers, devices, placement.tensor_split)
    k_elt = _bytes_per_element(placement.cache_type_k or "f16")
    v_elt = _bytes_per_element(placement.cache_type_v or "f16")
    kv_per_layer = n_ctx * f.n_head_kv * (f.head_dim_k * k_elt + f.head_dim_v * v_elt)
    kv: dict[str, int] = {}
    for il in range(f.n_layers):
        kv[layer_dev[il]] = kv.get(layer_dev[il], 0) + round(kv_per_layer)

    ubatch = min(placement.ubatch or DEFAULT_UBATCH, n_ctx)
    ffn_width = max(f.n_embd * 4, anatomy_ffn_width(anatomy))
    activations = 4 * ubatch * (ffn_width + 4 * f.n_embd)
    if placement.flash_attn != "off":  # llama.cpp's default "auto" turns it on where supported
        attention = 4 * ubatch * f.n_head * max(f.head_dim_k, 1) * 2
    else:  # without flash attention the KQ matrix is materialised in f32
        attention = 4 * ubatch * n_ctx * f.n_head
    out_dev = layer_dev[f.n_layers]
    used = set(weights) | set(kv) | {"CPU"}
    need = {}
    for dev in used:
        compute = activations + attention if dev in kv or dev == out_dev else 0
        if dev == out_dev:
            compute += 4 * ubatch * f.n_vocab
        need[dev] = DeviceNeed(weights.get(dev, 0), kv.get(dev, 0), compute)
    return need


def anatomy_ffn_width(anatomy: Anatomy) -> int:
    """Widest FFN intermediate one token touches: dense n_ff, or experts used x expert width."""
    widths = [0]
    for t in anatomy.tensors:
        if t.name.endswith("ffn_up.weight") and len(t.shape) >= 2:
            widths.append(t.shape[1])
        elif t.name.endswith("ffn_up_exps.weight") and len(t.shape) >= 2:
            widths.append(t.shape[1] * max(anatomy.facts.n_expert_used, 1))
    return max(widths)


@dataclass(frozen=True)
class FitVerdict:
    """Whether a placement fits, and why not: one line per device that overflows."""

    fits: bool
    reasons: tuple[str, ...]
    need: dict[str, DeviceNeed]

    def to_dict(self) -> dict[str, object]:
        return {"fits": self.fits, "reasons": list(self.reasons),
                "need": {k: {**asdict(v), "total": v.total} for k, v in self.need.items()}}


def check_fit(need: Mapping[str, DeviceNeed], capacity: Mapping[str, int], margin: int = DEFAULT_MARGIN,
              budgeted: Collection[str] = ()) -> FitVerdict:
    """Compare predicted needs with capacities. Free memory an accelerator reports loses a safety margin;
    CPU RAM and budgets the user set (`budgeted`) are taken as given."""
    reasons = []
    for dev, n in sorted(need.items()):
        if dev not in capacity or n.total == 0:
            continue
        room = capacity[dev] - (0 if dev == "CPU" or dev in budgeted else margin)
        if n.total > room:
            reasons.append(
                f"{dev}: predicted {human_bytes(n.total)} (weights {human_bytes(n.weights)}, KV {human_bytes(n.kv)}, "
                f"compute {human_bytes(n.compute)}) > {human_bytes(room)} available"
            )
    return FitVerdict(not reasons, tuple(reasons), dict(need))
