"""A model's shape without a GGUF file: placetune's Anatomy built from a synth spec's tensor plan.

The twin judges the search on full-size models (48 to 94 layers, tens of GB) that nobody should
have to write to disk, so the Anatomy comes from `synth.plan_tensors`, the same tensor list
`placetune synth --like` would write. Only the header-derived facts and tensor table matter to
the search and to the memory model, and both are exact here.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

import numpy as np
from gguf import GGMLQuantizationType

from placetune.anatomy import Anatomy, Group, TensorInfo, classify
from placetune.space import moe_layers
from placetune.synth import SynthSpec, TensorPlan, plan_tensors, planned_anatomy, preset_spec

_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def anatomy_from_spec(spec: SynthSpec, dense_type: str | None = None) -> Anatomy:
    """The Anatomy placetune would read from the file `write_model(spec)` writes (synth.planned_anatomy).

    dense_type re-types the 2-D non-expert matrices (say "F16" for gpt-oss's published F16 file,
    whose experts stay MXFP4), for calibration points measured on such a file.
    """
    plans = plan_tensors(spec)
    if dense_type is not None:
        plans = [_retyped(p, GGMLQuantizationType[dense_type.upper()]) for p in plans]
    return planned_anatomy(spec, plans)


def _retyped(plan: TensorPlan, qtype: GGMLQuantizationType) -> TensorPlan:
    group, _, _ = classify(plan.name)
    if group is Group.EXPERT or len(plan.shape) < 2 or plan.qtype == GGMLQuantizationType.F32:
        return plan
    return replace(plan, qtype=qtype)


@dataclass(frozen=True)
class TwinModel:
    """A model the twin runs: a synth spec, plus the attention layout an Anatomy does not record.

    Layers whose index i satisfies i % full_every == full_offset attend to the whole context; the
    others see at most `window` tokens (gpt-oss alternates 128-token sliding windows with full
    attention; linear-attention layers are a window of 0). Only speed at depth reads this.
    """

    name: str
    spec: SynthSpec
    dense_type: str | None = None
    full_every: int = 1
    full_offset: int = 0
    window: int = 0


MODELS: dict[str, TwinModel] = {
    "qwen3-30b-a3b": TwinModel("qwen3-30b-a3b", preset_spec("qwen3-30b-a3b")),
    # openai/gpt-oss-120b config.json: layer_types alternate sliding_attention (window 128) and full_attention
    "gpt-oss-120b": TwinModel("gpt-oss-120b", preset_spec("gpt-oss-120b"), full_every=2, full_offset=1,
                              window=128),
    "glm-4.5-air": TwinModel("glm-4.5-air", preset_spec("glm-4.5-air")),
    "qwen3-235b-a22b": TwinModel("qwen3-235b-a22b", preset_spec("qwen3-235b-a22b")),
}


@dataclass(frozen=True, eq=False)
class ModelShape:
    """Per-layer bytes and weights of a model, as arrays: what the performance model and the grid read.

    Layer arrays have n_layers entries. Expert bytes come in four parts, the way placetune's expert
    rules can move them: gate/up weights, down weights, gate/up biases, down biases.
    """

    model: TwinModel
    anatomy: Anatomy
    common_bytes: np.ndarray  # non-expert tensors of each layer (attention, norms, router, shared expert)
    expert_bytes: np.ndarray  # (n_layers, 4): gate_up weights, down weights, gate_up biases, down biases
    common_params: np.ndarray  # matrix elements of the non-expert tensors (2-D and up)
    expert_params: np.ndarray  # (n_layers, 2): matrix elements of gate_up and down expert weights
    full_attention: np.ndarray  # bool per layer
    moe_layers: np.ndarray  # layer ids that hold routed experts, ascending
    output_read: float  # bytes one generated token reads of the output head and its norm (a tied head counts again)
    host_read: float  # bytes one generated token reads of the other tensors without a layer (one embedding row)

    @property
    def n_layers(self) -> int:
        return self.anatomy.facts.n_layers

    @property
    def active_fraction(self) -> float:
        return self.anatomy.active_fraction


EXPERT_PARTS = ("gate_up", "down", "gate_up_bias", "down_bias")
# cpu_moe_kinds -> which of the four parts an expert rule moves (placetune.space: only "all" moves biases)
KIND_PARTS: dict[str, tuple[int, ...]] = {"all": (0, 1, 2, 3), "gate_up": (0,), "down": (1,)}


def expert_part(t: TensorInfo) -> int:
    """Which of EXPERT_PARTS a routed-expert tensor is."""
    return int(t.expert_kind == "down") + 2 * int(t.is_bias)


@functools.cache
def model_shape(model: TwinModel) -> ModelShape:
    """The arrays for a model (cached: scenarios share them)."""
    anatomy = anatomy_from_spec(model.spec, model.dense_type)
    n = anatomy.facts.n_layers
    common_bytes = np.zeros(n)
    expert_bytes = np.zeros((n, 4))
    common_params = np.zeros(n)
    expert_params = np.zeros((n, 2))
    output_read = host_read = 0.0
    for t, read in anatomy.reads_per_token():  # the output head on the GPU whenever -ngl >= 1, the rest in RAM
        if t.layer is None:
            if t.name.startswith("output"):
                output_read += read
            else:
                host_read += read
    for t in anatomy.tensors:
        elements = float(np.prod(t.shape)) if len(t.shape) >= 2 and not t.is_bias else 0.0
        if t.layer is None:
            continue
        if t.group is Group.EXPERT:
            expert_bytes[t.layer, expert_part(t)] += t.n_bytes
            expert_params[t.layer, expert_part(t) % 2] += elements
        else:
            common_bytes[t.layer] += t.n_bytes
            common_params[t.layer] += elements
    layers = np.arange(n)
    return ModelShape(
        model=model, anatomy=anatomy, common_bytes=common_bytes, expert_bytes=expert_bytes,
        common_params=common_params, expert_params=expert_params,
        full_attention=(layers % model.full_every) == model.full_offset,
        moe_layers=np.array(moe_layers(anatomy), dtype=int), output_read=output_read, host_read=host_read,
    )
