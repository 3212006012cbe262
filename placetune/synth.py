"""Synthetic GGUF models that llama.cpp loads and runs, so placements can be searched without downloads.

Only shapes, types and byte sizes match a real model, because those decide speed. The weights are
random (quant blocks are random bytes with small scales patched in), so the text is gibberish and
expert routing is roughly uniform: every expert is about equally hot, unlike the skewed routing of a
trained model. Data is streamed from small random pools, so a 17 GB clone writes at disk speed.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import string
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    ExpertGatingFuncType,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    TokenType,
)
from gguf.quants import quantize

from placetune.anatomy import Anatomy, read_header_anatomy
from placetune.errors import PlacetuneError

Q = GGMLQuantizationType

ARCHES = ("llama", "qwen3moe", "glm4moe", "gpt-oss", "deepseek2")
_SHARED_EXPERT_ARCHES = ("glm4moe", "deepseek2")
# llama.cpp reads DeepSeek-V2 files of these depths as the "lite" variant, which has no q_lora_rank
_DEEPSEEK2_LITE_LAYERS = (26, 27)

# quant name -> (type of big matrices, type of expert matrices, general.file_type)
QUANTS: dict[str, tuple[Q, Q, LlamaFileType]] = {
    "f32": (Q.F32, Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, Q.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_k": (Q.Q4_K, Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    # as in the published gpt-oss files: MXFP4 experts, Q8_0 elsewhere
    "mxfp4": (Q.Q8_0, Q.MXFP4, LlamaFileType.MOSTLY_MXFP4_MOE),
}

_MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
_MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
_N_SPECIAL = 3 + 256  # <unk> <s> </s> and one token per byte
_POOL_BYTES = 16 << 20  # random data is drawn from pools this big: fast, and no two tensors alike


@dataclass(frozen=True)
class SynthSpec:
    """The shape of a model to synthesize; checked on creation so bad specs fail before any writing."""

    arch: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_expert_shared: int = 0
    n_ff_shexp: int = 0
    n_leading_dense: int = 0
    n_vocab: int = 512
    n_ctx_train: int = 4096
    quant: str = "q8_0"
    seed: int = 0
    name: str = "placetune-synth"
    # MLA (deepseek2): head_dim is the decompressed K head (nope + rope); the cache holds kv_lora_rank + rope_dim
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # 0: one attn_q projection, as DeepSeek-V2-Lite
    rope_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its llama.cpp name, ggml shape (ne0 first) and type."""

    name: str
    shape: tuple[int, ...]
    qtype: Q

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size

    @property
    def fill(self) -> str:
        """Biases start at zero and other vectors (norms, rope factors) at one, so they change nothing."""
        if self.name.endswith(".bias"):
            return "zeros"
        return "ones" if len(self.shape) == 1 else "random"

    @property
    def sigma(self) -> float:
        """Weight scale 1/(8 sqrt(fan_in)): activations shrink layer by layer instead of overflowing."""
        return 1.0 / (8.0 * math.sqrt(self.shape[0]))


@dataclass(frozen=True)
class LikeFile:
    """Metadata, tensor shapes and types copied from a real GGUF, to write a random-weight twin of it."""

    source: Path
    arch: str
    n_layers: int
    n_vocab: int
    kv: tuple[tuple[str, Any, GGUFValueType, GGUFValueType | None], ...]
    tensors: tuple[TensorPlan, ...]
    seed: int = 0


def tiny_spec(arch: str, n_layers: int = 4, quant: str = "q8_0", seed: int = 0, **overrides: Any) -> SynthSpec:
    """A model of about 1 MB for tests: every tensor kind of the arch, and it runs in milliseconds."""
    base: dict[str, Any] = dict(
        arch=arch, n_layers=n_layers, n_embd=128, n_head=4, n_head_kv=2, head_dim=32, n_ff=256,
        quant=quant, seed=seed, name=f"placetune-tiny-{arch}",
    )
    if arch != "llama":
        base |= dict(n_expert=8, n_expert_used=2, n_ff_exp=64)
    if arch in _SHARED_EXPERT_ARCHES:
        base |= dict(n_expert_shared=1, n_ff_shexp=64, n_leading_dense=1)
    if arch == "deepseek2":  # DeepSeek-V2-Lite's layout, shrunk; a q_lora_rank since only 26-27 layers load without
        base |= dict(n_head_kv=1, head_dim=64, kv_lora_rank=64, q_lora_rank=64, rope_dim=32, v_head_dim=32)
    return SynthSpec(**(base | overrides))


def _validate(s: SynthSpec) -> None:
    def bad(msg: str) -> NoReturn:
        raise PlacetuneError(f"bad model spec: {msg}")

    if s.arch not in ARCHES:
        bad(f"unknown arch {s.arch!r}; use one of {', '.join(ARCHES)}")
    if s.quant not in QUANTS:
        bad(f"unknown quant {s.quant!r}; use one of {', '.join(QUANTS)}")
    for key in ("n_embd", "n_head", "n_head_kv", "head_dim", "n_ff", "n_ctx_train"):
        if getattr(s, key) <= 0:
            bad(f"{key} must be positive, got {getattr(s, key)}")
    for key in ("n_expert", "n_expert_used", "n_ff_exp", "n_expert_shared", "n_ff_shexp", "n_leading_dense",
                "seed"):
        if getattr(s, key) < 0:
            bad(f"{key} must not be negative, got {getattr(s, key)}")
    if not 1 <= s.n_layers <= _MAX_LAYERS:
        bad(f"n_layers must be between 1 and {_MAX_LAYERS} (llama.cpp's limit), got {s.n_layers}")
    if s.n_head % s.n_head_kv:
        bad(f"n_head ({s.n_head}) must be a multiple of n_head_kv ({s.n_head_kv}); pick a divisor of n_head")
    if s.head_dim % 4:
        bad(f"head_dim must be a multiple of 4 (RoPE rotates pairs, glm4moe half a head), got {s.head_dim}")
    if s.n_vocab < _N_SPECIAL + 1:
        bad(f"n_vocab must be at least {_N_SPECIAL + 1} (3 special and 256 byte tokens), got {s.n_vocab}")
    if s.arch == "llama":
        if s.n_expert or s.n_expert_used or s.n_expert_shared or s.n_leading_dense:
            bad("llama is the dense arch: leave the expert fields at 0, or use qwen3moe or glm4moe for MoE")
    else:
        if not 1 <= s.n_expert <= _MAX_EXPERTS:
            bad(f"{s.arch} needs n_expert between 1 and {_MAX_EXPERTS}, got {s.n_expert}")
        if not 1 <= s.n_expert_used <= s.n_expert:
            bad(f"n_expert_used must be between 1 and n_expert ({s.n_expert}), got {s.n_expert_used}")
        if s.n_ff_exp <= 0:
            bad(f"{s.arch} needs n_ff_exp (the per-expert FFN size) > 0")
    if s.arch in _SHARED_EXPERT_ARCHES:
        if s.n_expert_shared < 1:
            bad(f"{s.arch} always runs a shared expert: set n_expert_shared >= 1")
        if s.n_ff_shexp != s.n_ff_exp * s.n_expert_shared:
            bad(f"llama.cpp sizes {s.arch}'s shared expert as n_ff_exp * n_expert_shared: "
                f"set n_ff_shexp to {s.n_ff_exp * s.n_expert_shared}, not {s.n_ff_shexp}")
        if s.n_leading_dense >= s.n_layers:
            bad(f"n_leading_dense ({s.n_leading_dense}) must be below n_layers ({s.n_layers}) "
                "so that at least one layer is MoE")
    elif s.n_expert_shared or s.n_ff_shexp or s.n_leading_dense:
        bad(f"{s.arch} has no shared experts or leading dense layers in llama.cpp; use glm4moe for those")
    if s.arch == "deepseek2":
        if s.n_head_kv != 1:
            bad("deepseek2 stores MLA as one KV head (the compressed latent): set n_head_kv to 1")
        if not (s.kv_lora_rank > 0 and 0 < s.rope_dim < s.head_dim and s.v_head_dim > 0):
            bad("deepseek2 needs kv_lora_rank > 0, v_head_dim > 0 and 0 < rope_dim < head_dim (head_dim = nope + rope)")
        if s.q_lora_rank == 0 and s.n_layers not in _DEEPSEEK2_LITE_LAYERS:
            bad(f"llama.cpp reads a deepseek2 file without q_lora_rank only at {_DEEPSEEK2_LITE_LAYERS} layers "
                f"(the Lite variant); set q_lora_rank > 0 for {s.n_layers} layers")
    elif s.kv_lora_rank or s.q_lora_rank or s.rope_dim or s.v_head_dim:
        bad(f"{s.arch} has no MLA attention; kv_lora_rank, q_lora_rank, rope_dim and v_head_dim are for deepseek2")
    for t in _spec_tensors(s):
        block = GGML_QUANT_SIZES[t.qtype][0]
        if t.shape[0] % block:
            bad(f"{t.name} has rows of {t.shape[0]} values, not a multiple of the {t.qtype.name} block "
                f"({block}); pick sizes divisible by {block} or another quant")


def plan_tensors(spec: SynthSpec | LikeFile) -> list[TensorPlan]:
    """Every tensor the file will hold, in file order; sizes come from here without writing anything."""
    return list(spec.tensors) if isinstance(spec, LikeFile) else _spec_tensors(spec)


def _add_mla_attention(s: SynthSpec, add: Callable[[str, tuple[int, ...], Q], None], big: Q) -> None:
    """DeepSeek-V2 attention as llama.cpp loads it (src/models/deepseek2.cpp), wkv_b already split into k_b/v_b."""
    e, nope = s.n_embd, s.head_dim - s.rope_dim
    if s.q_lora_rank:
        add("attn_q_a_norm.weight", (s.q_lora_rank,), Q.F32)
        add("attn_q_a.weight", (e, s.q_lora_rank), big)
        add("attn_q_b.weight", (s.q_lora_rank, s.n_head * s.head_dim), big)
    else:
        add("attn_q.weight", (e, s.n_head * s.head_dim), big)
    add("attn_kv_a_norm.weight", (s.kv_lora_rank,), Q.F32)
    add("attn_kv_a_mqa.weight", (e, s.kv_lora_rank + s.rope_dim), big)
    add("attn_k_b.weight", (nope, s.kv_lora_rank, s.n_head), big)
    add("attn_v_b.weight", (s.kv_lora_rank, s.v_head_dim, s.n_head), big)
    add("attn_output.weight", (s.n_head * s.v_head_dim, e), big)


def _spec_tensors(s: SynthSpec) -> list[TensorPlan]:
    """The tensors llama.cpp's loader for the arch asks for (src/models/<arch>.cpp), no more, no fewer."""
    big, experts, _ = QUANTS[s.quant]
    f32 = Q.F32
    e, q, kv = s.n_embd, s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    biased = s.arch in ("glm4moe", "gpt-oss")  # q/k/v biases, as in the published weights
    out = [TensorPlan("token_embd.weight", (e, s.n_vocab), big)]
    for i in range(s.n_layers):
        def add(name: str, shape: tuple[int, ...], qtype: Q, i: int = i) -> None:
            out.append(TensorPlan(f"blk.{i}.{name}", shape, qtype))

        add("attn_norm.weight", (e,), f32)
        if s.arch == "deepseek2":
            _add_mla_attention(s, add, big)
        else:
            for proj, width in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                add(f"{proj}.weight", (e, width), big)
                if biased:
                    add(f"{proj}.bias", (width,), f32)
            add("attn_output.weight", (q, e), big)
        if s.arch == "qwen3moe":
            add("attn_q_norm.weight", (s.head_dim,), f32)
            add("attn_k_norm.weight", (s.head_dim,), f32)
        if s.arch == "gpt-oss":
            add("attn_output.bias", (e,), f32)
            add("attn_sinks.weight", (s.n_head,), f32)
        add("post_attention_norm.weight" if biased else "ffn_norm.weight", (e,), f32)
        if s.arch == "llama" or i < s.n_leading_dense:
            add("ffn_gate.weight", (e, s.n_ff), big)
            add("ffn_down.weight", (s.n_ff, e), big)
            add("ffn_up.weight", (e, s.n_ff), big)
            continue
        x, ff = s.n_expert, s.n_ff_exp
        add("ffn_gate_inp.weight", (e, x), f32)
        if s.arch == "gpt-oss":
            add("ffn_gate_inp.bias", (x,), f32)
        if s.arch in _SHARED_EXPERT_ARCHES:
            add("exp_probs_b.bias", (x,), f32)
        add("ffn_gate_exps.weight", (e, ff, x), experts)
        add("ffn_down_exps.weight", (ff, e, x), experts)
        add("ffn_up_exps.weight", (e, ff, x), experts)
        if s.arch == "gpt-oss":
            add("ffn_gate_exps.bias", (ff, x), f32)
            add("ffn_down_exps.bias", (e, x), f32)
            add("ffn_up_exps.bias", (ff, x), f32)
        if s.n_expert_shared:
            add("ffn_gate_shexp.weight", (e, s.n_ff_shexp), big)
            add("ffn_down_shexp.weight", (s.n_ff_shexp, e), big)
            add("ffn_up_shexp.weight", (e, s.n_ff_shexp), big)
    out.append(TensorPlan("output_norm.weight", (e,), f32))
    out.append(TensorPlan("output.weight", (e, s.n_vocab), big))
    return out


PRESETS: dict[str, SynthSpec] = {
    # Qwen/Qwen3-30B-A3B config.json (the 2507 refresh only raises the context to 262144)
    "qwen3-30b-a3b": SynthSpec(
        arch="qwen3moe", n_layers=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_ff=6144,
        n_expert=128, n_expert_used=8, n_ff_exp=768, n_vocab=151936, n_ctx_train=40960,
        quant="q4_0", name="placetune-synth-qwen3-30b-a3b",
    ),
    # openai/gpt-oss-20b config.json
    "gpt-oss-20b": SynthSpec(
        arch="gpt-oss", n_layers=24, n_embd=2880, n_head=64, n_head_kv=8, head_dim=64, n_ff=2880,
        n_expert=32, n_expert_used=4, n_ff_exp=2880, n_vocab=201088, n_ctx_train=131072,
        quant="mxfp4", name="placetune-synth-gpt-oss-20b",
    ),
    # zai-org/GLM-4.5-Air config.json, without the MTP layer (llama.cpp skips it unless asked)
    "glm-4.5-air": SynthSpec(
        arch="glm4moe", n_layers=46, n_embd=4096, n_head=96, n_head_kv=8, head_dim=128, n_ff=10944,
        n_expert=128, n_expert_used=8, n_ff_exp=1408, n_expert_shared=1, n_ff_shexp=1408,
        n_leading_dense=1, n_vocab=151552, n_ctx_train=131072, quant="q4_0",
        name="placetune-synth-glm-4.5-air",
    ),
    # deepseek-ai/DeepSeek-V2-Lite config.json: MLA (kv_lora_rank 512, qk_rope 64, qk_nope 128, v_head 128)
    "deepseek-v2-lite": SynthSpec(
        arch="deepseek2", n_layers=27, n_embd=2048, n_head=16, n_head_kv=1, head_dim=192, n_ff=10944,
        n_expert=64, n_expert_used=6, n_ff_exp=1408, n_expert_shared=2, n_ff_shexp=2816, n_leading_dense=1,
        n_vocab=102400, n_ctx_train=163840, quant="q4_0", kv_lora_rank=512, rope_dim=64, v_head_dim=128,
        name="placetune-synth-deepseek-v2-lite",
    ),
    # openai/gpt-oss-120b config.json (36 layers, 128 experts of which 4 are used)
    "gpt-oss-120b": SynthSpec(
        arch="gpt-oss", n_layers=36, n_embd=2880, n_head=64, n_head_kv=8, head_dim=64, n_ff=2880,
        n_expert=128, n_expert_used=4, n_ff_exp=2880, n_vocab=201088, n_ctx_train=131072,
        quant="mxfp4", name="placetune-synth-gpt-oss-120b",
    ),
    # Qwen/Qwen3-235B-A22B config.json (94 layers, 128 experts of which 8 are used)
    "qwen3-235b-a22b": SynthSpec(
        arch="qwen3moe", n_layers=94, n_embd=4096, n_head=64, n_head_kv=4, head_dim=128, n_ff=12288,
        n_expert=128, n_expert_used=8, n_ff_exp=1536, n_vocab=151936, n_ctx_train=40960,
        quant="q4_0", name="placetune-synth-qwen3-235b-a22b",
    ),
}


def preset_spec(name: str, n_layers: int | None = None, quant: str | None = None) -> SynthSpec:
    """A real model's shape, optionally cut to fewer layers or another quant to fit a test or a disk."""
    if name not in PRESETS:
        raise PlacetuneError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    spec = PRESETS[name]
    return replace(spec, n_layers=spec.n_layers if n_layers is None else n_layers,
                   quant=spec.quant if quant is None else quant)


def _add_spec_kv(w: GGUFWriter, s: SynthSpec) -> None:
    """The hyperparameters llama.cpp reads for the arch, with the real models' rope and norm settings."""
    w.add_name(s.name)
    w.add_file_type(QUANTS[s.quant][2])
    w.add_quantization_version(2)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    if s.arch == "deepseek2":  # MLA as MQA: one KV head holding the latent and the rope part
        w.add_key_length(s.kv_lora_rank + s.rope_dim)
        w.add_value_length(s.kv_lora_rank)
        w.add_key_length_mla(s.head_dim)
        w.add_value_length_mla(s.v_head_dim)
        w.add_kv_lora_rank(s.kv_lora_rank)
        if s.q_lora_rank:
            w.add_q_lora_rank(s.q_lora_rank)
    else:
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    w.add_vocab_size(s.n_vocab)
    w.add_layer_norm_rms_eps(1e-6 if s.arch == "qwen3moe" else 1e-5)
    w.add_rope_freq_base({"llama": 500000.0, "gpt-oss": 150000.0, "deepseek2": 10000.0}.get(s.arch, 1000000.0))
    # GLM rotates only half of each head (partial_rotary_factor 0.5); DeepSeek only the rope part
    w.add_rope_dimension_count(s.rope_dim or (s.head_dim // 2 if s.arch == "glm4moe" else s.head_dim))
    if s.arch == "llama":
        return
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_expert_used)
    w.add_expert_feed_forward_length(s.n_ff_exp)
    if s.arch in _SHARED_EXPERT_ARCHES:
        w.add_expert_shared_count(s.n_expert_shared)
        w.add_leading_dense_block_count(s.n_leading_dense)
        w.add_expert_weights_scale(1.0)
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if s.arch == "glm4moe" else ExpertGatingFuncType.SOFTMAX)
    if s.arch == "gpt-oss":
        w.add_sliding_window(128)
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(32.0)
        w.add_rope_scaling_orig_ctx_len(4096)


def _vocab_pieces() -> Iterator[str]:
    """Unique SentencePiece pieces; each longer one joins two earlier ones, so SPM merges can reach it."""
    yield "▁"
    yield from (chr(c) for c in range(0x21, 0x7F))
    letters = string.ascii_lowercase
    yield from ("▁" + c for c in letters)
    for n in itertools.count(2):
        for combo in itertools.product(letters, repeat=n):
            word = "".join(combo)
            yield word
            yield "▁" + word


def _add_tokenizer(w: GGUFWriter, n_vocab: int) -> None:
    """A SentencePiece ("llama") vocab with byte fallback: it tokenizes any text and needs no merges."""
    n_pieces = n_vocab - _N_SPECIAL
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += itertools.islice(_vocab_pieces(), n_pieces)
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * n_pieces
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * _N_SPECIAL + [-float(i) for i in range(n_pieces)])
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)


@dataclass(frozen=True)
class _Layout:
    """Where one quant block keeps its scales, so random bytes decode to weights of a chosen size."""

    code_rms: float  # rms of a decoded weight when the block scale d is 1 (measured with gguf.quants)
    halves: tuple[tuple[int, float], ...] = ()  # (byte offset, multiple of d) of each f16 scale or min
    exponents: tuple[int, ...] = ()  # byte offsets of E8M0 power-of-two scales
    pinned: tuple[tuple[int, bytes], ...] = ()  # sub-scales fixed so that codes centre on zero


_D = ((0, 1.0),)  # an f16 scale at the start of the block, the commonest layout
_LAYOUTS: dict[Q, _Layout] = {
    Q.Q8_0: _Layout(73.9, _D),
    Q.Q4_0: _Layout(4.64, _D),
    Q.Q4_1: _Layout(4.62, ((0, 1.0), (2, -7.5))),
    Q.Q5_0: _Layout(9.24, _D),
    Q.Q5_1: _Layout(9.24, ((0, 1.0), (2, -15.5))),
    Q.Q2_K: _Layout(2.24, ((80, 1.0), (82, 1.0)), pinned=((0, bytes([0x32] * 16)),)),
    Q.Q3_K: _Layout(43.3, ((108, 1.0),)),
    Q.Q4_K: _Layout(36.9, ((0, 1.0), (2, 1.0)), pinned=((4, bytes([8] * 4 + [252] * 4 + [0xC8] * 4)),)),
    Q.Q5_K: _Layout(36.9, ((0, 1.0), (2, 1.0)), pinned=((4, bytes([4] * 4 + [254] * 4 + [0xE4] * 4)),)),
    Q.Q6_K: _Layout(18.5, ((208, 1.0),), pinned=((192, bytes([1] * 16)),)),
    Q.TQ1_0: _Layout(0.82, ((52, 1.0),)),
    Q.TQ2_0: _Layout(1.22, ((64, 1.0),)),
    Q.IQ2_XXS: _Layout(53.3, _D),
    Q.IQ2_XS: _Layout(55.8, _D),
    Q.IQ2_S: _Layout(56.5, _D),
    Q.IQ3_XXS: _Layout(143.0, _D),
    Q.IQ3_S: _Layout(140.0, _D),
    Q.IQ1_S: _Layout(7.2, _D),
    Q.IQ4_NL: _Layout(67.5, _D),
    Q.IQ4_XS: _Layout(1252.0, _D),
    Q.MXFP4: _Layout(5.85, exponents=(0,)),
}
_FLOATS = {Q.F32: np.float32, Q.F16: np.float16}


def _random_data(qtype: Q, n_blocks: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Random weights of rms about sigma, as raw bytes; zeros for types whose block layout is unknown."""
    if qtype in _FLOATS:
        return (rng.standard_normal(n_blocks, dtype=np.float32) * sigma).astype(_FLOATS[qtype]).view(np.uint8)
    if qtype == Q.BF16:
        values = rng.standard_normal(n_blocks, dtype=np.float32) * sigma
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    size = GGML_QUANT_SIZES[qtype][1]
    layout = _LAYOUTS.get(qtype)
    if layout is None:  # zero blocks are valid in every format: such tensors just output zeros
        return np.zeros(n_blocks * size, np.uint8)
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    d = sigma / layout.code_rms
    for offset, mult in layout.halves:
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(d * mult).tobytes(), np.uint8)
    for offset in layout.exponents:
        blocks[:, offset] = 128 + round(math.log2(d))  # ggml decodes E8M0 e as 2^(e-128)
    for offset, raw in layout.pinned:
        blocks[:, offset:offset + len(raw)] = np.frombuffer(raw, np.uint8)
    return blocks.reshape(-1)


def _constant_data(t: TensorPlan, value: float) -> np.ndarray:
    data = np.full(t.shape[::-1], value, np.float32)
    try:
        return quantize(data, t.qtype).view(np.uint8).reshape(-1)
    except NotImplementedError:  # gguf cannot encode this type; zero bytes are still valid weights
        return np.zeros(t.nbytes, np.uint8)


def write_model(
    spec_or_like: SynthSpec | LikeFile, out: str | Path, progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the model to `out`, streaming tensor data so RAM use stays small whatever the model size.

    `progress(done_bytes, total_bytes)` is called after every chunk written. The file appears under
    its final name only when complete, so an interrupted write never leaves a truncated model behind.
    """
    out = Path(out)
    spec = spec_or_like
    plan = plan_tensors(spec)
    total = sum(t.nbytes for t in plan)
    part = out.with_name(out.name + ".part")
    writer = _header_writer(part, spec, plan)
    rng = np.random.default_rng(spec.seed)
    pools = _pools(plan, rng)
    done = 0
    if out.exists() and not out.is_file():
        raise PlacetuneError(f"{out} exists and is not a regular file; pass a path for a new .gguf file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        if free < total:
            raise PlacetuneError(f"{out} needs {total / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free "
                                 "there; free space, write elsewhere, or use fewer layers or a smaller quant")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        for t in plan:
            if t.fill == "random":
                chunks: Iterable[memoryview] = _pool_chunks(pools[t.qtype, t.sigma], t, rng)
            else:
                chunks = [memoryview(_constant_data(t, 1.0 if t.fill == "ones" else 0.0))]
            for chunk in chunks:
                fout.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            writer.write_padding(fout, t.nbytes)
        writer.close()
        os.replace(part, out)
    except OSError as e:
        raise PlacetuneError(f"could not write {out}: {e.strerror or e}; check the path and free space") from e
    finally:
        writer.close()
        part.unlink(missing_ok=True)
    return out


def _header_writer(path: Path, spec: SynthSpec | LikeFile, plan: list[TensorPlan]) -> GGUFWriter:
    """A GGUFWriter holding the model's metadata and tensor table (nothing written yet)."""
    writer = GGUFWriter(path, spec.arch)
    if isinstance(spec, LikeFile):
        for key, value, vtype, sub_type in spec.kv:
            writer.add_key_value(key, value, vtype, sub_type)
    else:
        _add_spec_kv(writer, spec)
    _add_tokenizer(writer, spec.n_vocab)
    for t in plan:
        writer.add_tensor_info(t.name, t.shape[::-1], np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    return writer


def planned_anatomy(spec: SynthSpec | LikeFile, plan: list[TensorPlan] | None = None) -> Anatomy:
    """The Anatomy `write_model(spec)` would produce, read by placetune's own header reader from a header
    written without tensor data: full-size shapes (a 235B clone) in milliseconds, facts exactly as a file's.

    plan: the tensors, when a caller re-types some (default: plan_tensors(spec)).
    """
    plan = plan if plan is not None else plan_tensors(spec)
    with tempfile.TemporaryDirectory(prefix="placetune-plan-") as tmp:
        path = Path(tmp) / "header.gguf"
        writer = _header_writer(path, spec, plan)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        return read_header_anatomy(path, sum(t.nbytes for t in plan))


def _pools(plan: list[TensorPlan], rng: np.random.Generator) -> dict[tuple[Q, float], np.ndarray]:
    """One random pool per (type, scale): as big as the biggest such tensor, capped at _POOL_BYTES."""
    sizes: dict[tuple[Q, float], int] = {}
    for t in plan:
        if t.fill == "random":
            key = (t.qtype, t.sigma)
            sizes[key] = max(sizes.get(key, 0), min(t.nbytes, _POOL_BYTES))
    return {
        (qtype, sigma): _random_data(qtype, max(1, n // GGML_QUANT_SIZES[qtype][1]), sigma, rng)
        for (qtype, sigma), n in sizes.items()
    }


def _pool_chunks(pool: np.ndarray, t: TensorPlan, rng: np.random.Generator) -> Iterator[memoryview]:
    """Slices of the pool adding up to the tensor; each starts at a random block so tensors differ."""
    block = GGML_QUANT_SIZES[t.qtype][1]
    view = memoryview(pool)
    left = t.nbytes
    while left:
        start = int(rng.integers(len(pool) // block)) * block
        n = min(left, len(pool) - start)
        yield view[start:start + n]
        left -= n


_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")
_SHARD_RE = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


def spec_like_gguf(path: str | Path, n_layers: int | None = None) -> LikeFile:
    """Copy a GGUF's metadata, tensor names, shapes and types (optionally fewer layers) for write_model.

    The tokenizer is replaced by the synthetic one of the same size, and split files are read whole.
    """
    path = Path(path)
    if not path.is_file():
        raise PlacetuneError(f"{path}: no such file; pass the path of a .gguf model")
    readers = [_read_gguf(p) for p in _shard_paths(path)]
    fields = readers[0].fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else "?"
    if f"{arch}.block_count" not in fields:
        raise PlacetuneError(f"{path.name} has no {arch}.block_count; only llama.cpp text models can be copied")
    old_layers = int(fields[f"{arch}.block_count"].contents())
    n_layers = old_layers if n_layers is None else n_layers
    if not 1 <= n_layers <= old_layers:
        raise PlacetuneError(f"n_layers must be between 1 and {old_layers} (the layers in {path.name}), "
                             f"got {n_layers}")
    kv = []
    for key, fld in fields.items():
        if key.startswith(("GGUF.", "split.", "tokenizer.")) or key in ("general.architecture", "general.alignment"):
            continue  # the writer adds these itself or they describe the source file, not the model
        value, vtype, sub_type = fld.contents(), fld.types[0], fld.types[-1] if len(fld.types) > 1 else None
        if key == f"{arch}.block_count":
            value = n_layers
        elif n_layers < old_layers and key == f"{arch}.nextn_predict_layers":
            value = 0  # the MTP layers are the last blocks, which are dropped
        elif (n_layers < old_layers and vtype == GGUFValueType.ARRAY and sub_type != GGUFValueType.STRING
              and len(value) == old_layers):
            value = value[:n_layers]  # a per-layer array, which llama.cpp wants block_count long
        kv.append((key, value, vtype, sub_type))
    tensors = []
    for reader in readers:
        for t in reader.tensors:
            block = _BLOCK_RE.match(t.name)
            if block and int(block.group(1)) >= n_layers:
                continue
            tensors.append(TensorPlan(t.name, tuple(int(n) for n in t.shape), Q(t.tensor_type)))
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise PlacetuneError(f"{path.name} has no token_embd.weight; only text models can be copied")
    return LikeFile(path, arch, n_layers, embd.shape[1], tuple(kv), tuple(tensors))


def _read_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as e:
        raise PlacetuneError(f"{path}: not a readable GGUF file ({e})") from e


def _shard_paths(path: Path) -> list[Path]:
    """All files of a split GGUF (name-0000k-of-0000n.gguf), or just the one file."""
    match = _SHARD_RE.match(path.name)
    if not match:
        return [path]
    stem, count = match.group(1), int(match.group(3))
    paths = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise PlacetuneError(f"{path.name} is one part of a split GGUF; put {', '.join(missing)} beside it")
    return paths
