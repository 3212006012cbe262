"""Synthetic models: llama.cpp loads and runs them, shapes and types are as asked, and writing is fast."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from placetune.errors import PlacetuneError
from placetune.synth import (
    _LAYOUTS,
    ARCHES,
    PRESETS,
    _random_data,
    plan_tensors,
    preset_spec,
    spec_like_gguf,
    tiny_spec,
    write_model,
)

PROMPT = "Hello wörld, the quick brown fox ✓\n123"


def tensors(path: Path) -> dict[str, tuple[tuple[int, ...], Q]]:
    return {t.name: (tuple(int(n) for n in t.shape), Q(t.tensor_type)) for t in GGUFReader(path).tensors}


def kv(path: Path, key: str) -> Any:
    return GGUFReader(path).fields[key].contents()


@pytest.mark.parametrize("arch", ARCHES)
def test_each_arch_runs_in_llama_cpp(arch: str, make_model: Callable[..., Path], llama_generate) -> None:
    result = llama_generate(make_model(arch), PROMPT)
    assert result["finish_reason"] == "length"  # all 4 tokens generated
    assert result["finite"], "random weights must not overflow to inf or NaN"
    assert result["roundtrip"].strip() == PROMPT  # byte fallback covers any text


@pytest.mark.parametrize(("arch", "quant", "sizes"), [
    ("qwen3moe", "f16", {}),
    ("qwen3moe", "q4_0", {}),
    ("qwen3moe", "q4_k", dict(n_embd=256, head_dim=64, n_ff_exp=256)),
    ("gpt-oss", "mxfp4", {}),
])
def test_quants_run_in_llama_cpp(arch: str, quant: str, sizes: dict[str, int], make_model, llama_generate) -> None:
    result = llama_generate(make_model(arch, quant=quant, **sizes))
    assert result["finish_reason"] == "length"  # all 4 tokens generated
    assert result["finite"]


def test_tiny_moe_tensors(tiny_moe: Path) -> None:
    found = tensors(tiny_moe)
    assert len(found) == 3 + 4 * 12
    block = {name.removeprefix("blk.3."): v for name, v in found.items() if name.startswith("blk.3.")}
    assert block == {
        "attn_norm.weight": ((128,), Q.F32),
        "attn_q.weight": ((128, 128), Q.Q8_0),
        "attn_k.weight": ((128, 64), Q.Q8_0),
        "attn_v.weight": ((128, 64), Q.Q8_0),
        "attn_output.weight": ((128, 128), Q.Q8_0),
        "attn_q_norm.weight": ((32,), Q.F32),
        "attn_k_norm.weight": ((32,), Q.F32),
        "ffn_norm.weight": ((128,), Q.F32),
        "ffn_gate_inp.weight": ((128, 8), Q.F32),
        "ffn_gate_exps.weight": ((128, 64, 8), Q.Q8_0),
        "ffn_down_exps.weight": ((64, 128, 8), Q.Q8_0),
        "ffn_up_exps.weight": ((128, 64, 8), Q.Q8_0),
    }
    assert found["token_embd.weight"] == ((128, 512), Q.Q8_0)
    assert found["output.weight"] == ((128, 512), Q.Q8_0)
    assert kv(tiny_moe, "qwen3moe.expert_count") == 8
    assert kv(tiny_moe, "qwen3moe.expert_used_count") == 2
    assert len(kv(tiny_moe, "tokenizer.ggml.tokens")) == 512


def test_shared_experts_and_leading_dense_layer(tiny_shexp: Path) -> None:
    found = tensors(tiny_shexp)
    assert "blk.0.ffn_gate.weight" in found
    assert not any(name.startswith("blk.0.") and "exps" in name for name in found)
    assert found["blk.1.ffn_up_shexp.weight"] == ((128, 64), Q.Q8_0)
    assert found["blk.1.ffn_down_shexp.weight"] == ((64, 128), Q.Q8_0)
    assert found["blk.1.exp_probs_b.bias"] == ((8,), Q.F32)
    assert kv(tiny_shexp, "glm4moe.leading_dense_block_count") == 1


def test_quant_is_honoured_and_weights_are_small(make_model: Callable[..., Path]) -> None:
    path = make_model("qwen3moe", quant="q4_0", seed=1)
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    for name, t in by_name.items():
        expected = Q.F32 if name.endswith("norm.weight") or "gate_inp" in name else Q.Q4_0
        assert t.tensor_type == expected, name
    weights = dequantize(by_name["blk.0.ffn_gate_exps.weight"].data, Q.Q4_0)
    sigma = 1 / (8 * np.sqrt(128))
    assert np.isfinite(weights).all()
    assert 0.7 * sigma < np.sqrt(np.mean(weights**2)) < 1.3 * sigma
    assert np.all(by_name["blk.0.attn_norm.weight"].data == 1.0)


@pytest.mark.parametrize("qtype", sorted(_LAYOUTS, key=lambda q: q.value), ids=lambda q: q.name)
def test_random_blocks_decode_to_the_chosen_scale(qtype: Q) -> None:
    """The hand-written scale offsets agree with gguf's own decoders, for every type spec_like_gguf copies."""
    sigma = 1 / (8 * np.sqrt(2048))
    data = _random_data(qtype, 256, sigma, np.random.default_rng(0))
    weights = dequantize(data.reshape(256, -1), qtype).astype(np.float64)
    assert np.isfinite(weights).all()
    assert 0.5 * sigma < np.sqrt(np.mean(weights**2)) < 2 * sigma


def test_spec_like_gguf_with_fewer_layers(tiny_moe: Path, tmp_path: Path, llama_generate) -> None:
    like = spec_like_gguf(tiny_moe, n_layers=2)
    out = write_model(like, tmp_path / "like.gguf")
    original, copied = tensors(tiny_moe), tensors(out)
    kept = {n: v for n, v in original.items() if not n.startswith(("blk.2.", "blk.3."))}
    assert copied == kept
    assert kv(out, "qwen3moe.block_count") == 2
    assert kv(out, "qwen3moe.expert_count") == 8
    assert llama_generate(out)["finite"]


def test_spec_like_gguf_keeps_everything_by_default(tiny_shexp: Path, tmp_path: Path) -> None:
    out = write_model(spec_like_gguf(tiny_shexp), tmp_path / "same.gguf")
    assert tensors(out) == tensors(tiny_shexp)
    a, b = GGUFReader(tiny_shexp).fields, GGUFReader(out).fields
    assert [k for k in a if not k.startswith("GGUF.")] == [k for k in b if not k.startswith("GGUF.")]
    assert all(a[k].contents() == b[k].contents() for k in a if not k.startswith("GGUF."))


def test_spec_like_gguf_truncates_per_layer_arrays(tiny_dense: Path, tmp_path: Path) -> None:
    like = spec_like_gguf(tiny_dense)
    per_layer = ("llama.attention.head_count_kv", [2, 2], GGUFValueType.ARRAY, GGUFValueType.UINT32)
    kv_pairs = (*(x for x in like.kv if x[0] != per_layer[0]), per_layer)
    source = write_model(replace(like, kv=kv_pairs), tmp_path / "arrays.gguf")
    out = write_model(spec_like_gguf(source, n_layers=1), tmp_path / "one.gguf")
    assert kv(out, "llama.attention.head_count_kv") == [2]


def test_spec_like_gguf_errors(tiny_dense: Path, tmp_path: Path) -> None:
    with pytest.raises(PlacetuneError, match="no such file"):
        spec_like_gguf(tmp_path / "missing.gguf")
    with pytest.raises(PlacetuneError, match="between 1 and 2"):
        spec_like_gguf(tiny_dense, n_layers=3)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(PlacetuneError, match="not a readable GGUF"):
        spec_like_gguf(tmp_path / "junk.gguf")


def test_presets() -> None:
    q4 = sum(t.nbytes for t in plan_tensors(preset_spec("qwen3-30b-a3b", quant="q4_0")))
    assert 16.5e9 < q4 < 18e9  # about the size of the published Q4_0 files
    q8 = sum(t.nbytes for t in plan_tensors(preset_spec("qwen3-30b-a3b", quant="q8_0")))
    assert q8 / q4 == pytest.approx(34 / 18, rel=0.01)
    assert preset_spec("qwen3-30b-a3b", n_layers=2).n_layers == 2
    with pytest.raises(PlacetuneError, match="n_layers must be between 1 and 512"):
        preset_spec("qwen3-30b-a3b", n_layers=0)
    assert set(PRESETS) == {"qwen3-30b-a3b", "gpt-oss-20b", "glm-4.5-air", "gpt-oss-120b", "qwen3-235b-a22b",
                            "deepseek-v2-lite"}
    with pytest.raises(PlacetuneError, match=r"known presets: deepseek-v2-lite, glm-4\.5-air, gpt-oss-120b"):
        preset_spec("llama-405b")


def test_deepseek_v2_lite_preset_is_mla_shaped() -> None:
    plan = {t.name: t for t in plan_tensors(preset_spec("deepseek-v2-lite"))}
    assert plan["blk.1.attn_kv_a_mqa.weight"].shape == (2048, 512 + 64)  # the cached latent plus the rope part
    assert plan["blk.1.attn_k_b.weight"].shape == (128, 512, 16)
    assert "blk.1.attn_q_a.weight" not in plan  # Lite has no q_lora_rank
    assert 8e9 < sum(t.nbytes for t in plan.values()) < 10e9  # ~15.7B parameters at 4.5 bits
    with pytest.raises(PlacetuneError, match="q_lora_rank"):
        preset_spec("deepseek-v2-lite", n_layers=4)


@pytest.mark.parametrize(("name", "low", "high", "n_layers", "n_expert"), [
    ("gpt-oss-120b", 62e9, 65e9, 36, 128),  # the published MXFP4 files are about 63 GB
    ("qwen3-235b-a22b", 130e9, 135e9, 94, 128),  # the published Q4_0 files are about 133 GB
])
def test_large_presets(name: str, low: float, high: float, n_layers: int, n_expert: int) -> None:
    spec = preset_spec(name)
    assert low < sum(t.nbytes for t in plan_tensors(spec)) < high
    assert (spec.n_layers, spec.n_expert) == (n_layers, n_expert)


def test_two_layer_preset_writes_fast(tmp_path: Path) -> None:
    spec = preset_spec("qwen3-30b-a3b", n_layers=2)
    calls: list[tuple[int, int]] = []
    start = time.perf_counter()
    out = write_model(spec, tmp_path / "qwen3-2l.gguf", progress=lambda done, total: calls.append((done, total)))
    elapsed = time.perf_counter() - start
    total = sum(t.nbytes for t in plan_tensors(spec))
    assert elapsed < 30, f"{total / 1e9:.2f} GB took {elapsed:.1f} s"
    assert calls[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))
    assert total < out.stat().st_size < total + (8 << 20)  # data plus header and tokenizer
    assert not out.with_name(out.name + ".part").exists()


def test_write_model_refuses_to_replace_a_directory(tmp_path: Path) -> None:
    with pytest.raises(PlacetuneError, match="not a regular file"):
        write_model(tiny_spec("llama"), tmp_path)


def test_tiny_moe_writes_in_well_under_a_second(tmp_path: Path) -> None:
    start = time.perf_counter()
    write_model(tiny_spec("qwen3moe", seed=7), tmp_path / "t.gguf")
    assert time.perf_counter() - start < 0.5


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_model(tiny_spec("qwen3moe", seed=3), tmp_path / "a.gguf").read_bytes()
    b = write_model(tiny_spec("qwen3moe", seed=3), tmp_path / "b.gguf").read_bytes()
    c = write_model(tiny_spec("qwen3moe", seed=4), tmp_path / "c.gguf").read_bytes()
    assert a == b != c


@pytest.mark.parametrize(("args", "match"), [
    (dict(arch="mamba"), "unknown arch 'mamba'"),
    (dict(quant="q3_xs"), "unknown quant 'q3_xs'"),
    (dict(n_layers=0), "n_layers must be between 1 and 512"),
    (dict(n_expert_used=9), r"n_expert_used must be between 1 and n_expert \(8\)"),
    (dict(n_head=6, n_head_kv=4), r"n_head \(6\) must be a multiple of n_head_kv \(4\)"),
    (dict(arch="glm4moe", n_leading_dense=4), r"n_leading_dense \(4\) must be below n_layers \(4\)"),
    (dict(arch="glm4moe", n_ff_shexp=32), "set n_ff_shexp to 64"),
    (dict(arch="qwen3moe", n_expert_shared=1, n_ff_shexp=64), "use glm4moe"),
    (dict(arch="llama", n_expert=8), "llama is the dense arch"),
    (dict(quant="q4_k"), "not a multiple of the Q4_K block"),
    (dict(n_vocab=100), "n_vocab must be at least 260"),
    (dict(n_embd=0), "n_embd must be positive"),
    (dict(seed=-1), "seed must not be negative"),
    (dict(head_dim=30, n_embd=120), "head_dim must be a multiple of 4"),
])
def test_bad_specs_raise(args: dict[str, Any], match: str) -> None:
    arch = args.pop("arch", "qwen3moe")
    with pytest.raises(PlacetuneError, match=match) as err:
        tiny_spec(arch, **args)
    assert "\n" not in str(err.value)
