"""Placement: rendered regexes select exactly the intended tensors, and flags round-trip."""

from __future__ import annotations

import re
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placetune.anatomy import Group, classify, read_anatomy
from placetune.device_bytes import bytes_per_buffer
from placetune.errors import PlacetuneError
from placetune.placement import (
    ALL_EXPERT_KINDS,
    ExpertRule,
    Placement,
    RawOverride,
    check_buffer_types,
    layers_regex,
    parse_flags,
    python_kwargs,
    render_args,
    render_flags,
    render_ot,
    render_server_command,
    split_rules,
)

N_LAYERS = 64
NON_EXPERT = ["attn_q.weight", "attn_norm.weight", "ffn_gate_inp.weight", "ffn_up.weight", "ffn_up_shexp.weight",
              "ffn_gate_shexp.weight", "exp_probs_b.bias", "ffn_norm.weight"]
NAMES = (
    ["token_embd.weight", "output.weight", "output_norm.weight"]
    + [f"blk.{i}.ffn_{k}_{ch}exps.{s}" for i in range(N_LAYERS) for k in ALL_EXPERT_KINDS for s in ("weight", "bias")
       for ch in ("", "ch")]
    + [f"blk.{i}.{leaf}" for i in range(N_LAYERS) for leaf in NON_EXPERT]
)

layer_sets = st.sets(st.integers(0, N_LAYERS - 1), min_size=1, max_size=N_LAYERS)
kind_sets = st.sets(st.sampled_from(ALL_EXPERT_KINDS), min_size=1)
rules = st.builds(
    ExpertRule,
    layers=st.one_of(st.none(), layer_sets.map(tuple)),
    kinds=kind_sets.map(tuple),
    buft=st.sampled_from(["CPU", "CUDA0", "RPC0"]),
    include_bias=st.booleans(),
)
placements = st.builds(
    Placement,
    n_gpu_layers=st.one_of(st.none(), st.integers(0, 999)),
    overrides=st.lists(rules, max_size=3).map(tuple),
    threads=st.one_of(st.none(), st.integers(1, 64)),
    batch=st.one_of(st.none(), st.sampled_from([512, 2048])),
    ubatch=st.one_of(st.none(), st.sampled_from([128, 512, 2048])),
    flash_attn=st.one_of(st.none(), st.sampled_from(["on", "off", "auto"])),
    cache_type_k=st.one_of(st.none(), st.sampled_from(["f16", "q8_0"])),
    cache_type_v=st.one_of(st.none(), st.sampled_from(["f16", "q4_0"])),
    load_mode=st.one_of(st.none(), st.sampled_from(["none", "mmap", "auto"])),
    no_op_offload=st.booleans(),
    repack=st.one_of(st.none(), st.booleans()),
    ctx=st.one_of(st.none(), st.sampled_from([4096, 8192])),
    parallel=st.one_of(st.none(), st.integers(1, 4)),
)


def intended(rule: ExpertRule, name: str) -> bool:
    m = re.fullmatch(r"blk\.(\d+)\.ffn_(gate_up|gate|up|down)_(?:ch|)exps\.(weight|bias)", name)
    if not m:
        return False
    layer, kind, suffix = int(m[1]), m[2], m[3]
    in_layers = rule.layers is None or layer in rule.layers
    return in_layers and kind in rule.kinds and (suffix == "weight" or rule.include_bias)


@settings(max_examples=150, deadline=None)
@given(rules)
def test_rendered_regex_selects_exactly_the_intended_tensors(rule: ExpertRule) -> None:
    rx = re.compile(rule.pattern())  # llama.cpp applies -ot with regex *search*, not full match
    selected = {n for n in NAMES if rx.search(n)}
    assert selected == {n for n in NAMES if intended(rule, n)}


@settings(max_examples=150, deadline=None)
@given(layer_sets)
def test_layer_regex_matches_exactly_those_layers(layers: set[int]) -> None:
    rx = re.compile(rf"^blk\.{layers_regex(layers)}\.")
    assert {i for i in range(300) if rx.search(f"blk.{i}.x")} == layers


@settings(max_examples=200, deadline=None)
@given(placements)
def test_parse_render_round_trip(p: Placement) -> None:
    assert parse_flags(render_flags(p)) == p
    # The server line spells out flash attention at its default and turns --fit off: the line as measured.
    line = render_server_command("m.gguf", p)
    assert line[-2:] == ["-fit", "off"]
    assert parse_flags(shlex.join(line)) == replace(p, flash_attn=p.flash_attn or "auto")


@settings(max_examples=100, deadline=None)
@given(placements)
def test_bench_spelling_round_trips_the_overrides(p: Placement) -> None:
    back = parse_flags(render_args(p, "bench"), tool="bench")
    # llama-bench has no -c or -np; everything else survives, --cpu-moe included (written as a regex).
    assert back.overrides == p.overrides or render_ot(back) == render_ot(p)
    assert (back.threads, back.ubatch, back.flash_attn, back.repack) == (p.threads, p.ubatch, p.flash_attn, p.repack)


def test_compact_regex_and_n_cpu_moe() -> None:
    p = Placement(n_gpu_layers=99, overrides=(
        ExpertRule(layers=tuple(range(10, 24)), kinds=("gate", "up"), include_bias=False),
        ExpertRule(layers=(0, 1, 2)),
    ))
    assert render_flags(p) == r"-ngl 99 -ot 'blk\.(1[0-9]|2[0-3])\.ffn_(up|gate)_(ch|)exps\.weight=CPU' --n-cpu-moe 3"
    bench = render_args(p, "bench")
    assert bench[bench.index("-ncmoe") + 1] == "3"
    # --n-cpu-moe is only used when it is the last rule: llama.cpp appends it after every -ot.
    swapped = Placement(overrides=tuple(reversed(p.overrides)))
    assert "--n-cpu-moe" not in render_flags(swapped)
    assert parse_flags(render_flags(swapped)) == swapped


def test_several_rules_join_with_comma_for_server_and_semicolon_for_bench() -> None:
    p = Placement(overrides=(ExpertRule(layers=(1,), kinds=("down",)), RawOverride(r"attn_.*", "CPU")))
    server = render_args(p, "server")
    assert server[server.index("-ot") + 1].count(",") == 1
    bench = render_args(p, "bench")
    assert bench[bench.index("-ot") + 1].count(";") == 1


def test_hand_written_rules_are_applied_verbatim_never_narrowed() -> None:
    # llama.cpp's own --cpu-moe pattern, and placetune's own rendering, are structural rules.
    p = parse_flags(["-ngl", "99", "-ot", r"\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"])
    assert p.overrides == (ExpertRule(layers=None),) and "--cpu-moe" in render_flags(p)
    p = parse_flags(["-ot", r"blk\.(2[0-9]|3[0-9])\.ffn_(up|gate)_(ch|)exps=CPU"])
    assert p.overrides == (ExpertRule(layers=tuple(range(20, 40)), kinds=("up", "gate")),)
    # Anything else stays exactly as written: it may move more than experts, or fewer.
    for pattern in (r"blk\.3\.(ffn_.*_exps|attn_kv_a_mqa)", r"\.ffn_.*_exps\.", r"blk\.1\.ffn_.*",
                    r"blk\.(2[0-9]|3[0-9])\.ffn_(up|gate)_exps"):
        p = parse_flags(["-ot", f"{pattern}=CPU"])
        assert p.overrides == (RawOverride(pattern, "CPU"),)
        assert render_args(p) == ["-ot", f"{pattern}=CPU"]


def test_expert_rules_cover_chunk_experts_like_llama_cpp() -> None:
    # GroveMoE's chunk experts: --n-cpu-moe moves them in llama.cpp, so placetune's rules must too.
    rule = parse_flags("--n-cpu-moe 2").overrides[0]
    rx = re.compile(rule.pattern())
    assert rx.search("blk.1.ffn_up_chexps.weight") and not rx.search("blk.2.ffn_up_chexps.weight")
    assert classify("blk.1.ffn_down_chexps.weight")[:2] == (Group.EXPERT, "down")


def test_chunk_experts_move_in_the_byte_accounting_too(tiny_moe: Path) -> None:
    """--cpu-moe moves GroveMoE's chexps tensors, so the per-device bytes must move them as for _exps."""
    anatomy = read_anatomy(tiny_moe)
    chunked = replace(anatomy, tensors=[replace(t, name=t.name.replace("_exps", "_chexps")) for t in anatomy.tensors])
    placement = parse_flags("-ngl 99 --cpu-moe")
    assert bytes_per_buffer(chunked, placement, ["RPC0"]) == bytes_per_buffer(anatomy, placement, ["RPC0"])


def test_rules_split_as_each_tool_splits_them() -> None:
    assert split_rules("a=CPU,b=c=RPC0[127.0.0.1:5]") == [("a", "CPU"), ("b", "c=RPC0[127.0.0.1:5]")]
    assert split_rules("a=CPU;b=CPU", "bench") == [("a", "CPU"), ("b", "CPU")]
    with pytest.raises(PlacetuneError, match="test configurations"):
        split_rules("a=CPU,b=CPU", "bench")
    # llama-server splits at ',' only, so a ';' list is one rule with an impossible buffer type.
    p = parse_flags(["-ot", "a=CPU;b=CPU"])
    with pytest.raises(PlacetuneError, match="llama-bench's separator"):
        check_buffer_types(p, ["CPU", "RPC0[127.0.0.1:5]"])
    with pytest.raises(PlacetuneError, match=r"'FOO0' is not one this llama\.cpp offers"):
        check_buffer_types(parse_flags(["-ot", "x=FOO0"]), ["CPU"])
    # An RPC buffer type is read as its device (RPCk, by the endpoint's place in --rpc) and rendered back.
    ep = ["127.0.0.1:4", "127.0.0.1:5"]
    p = parse_flags(["-ot", "x=RPC0[127.0.0.1:5]"], rpc=ep)
    assert p.overrides[0].buft == "RPC1" and render_args(p, rpc=ep) == ["-ot", "x=RPC0[127.0.0.1:5]"]
    check_buffer_types(p, ["CPU", "RPC0", "RPC0[127.0.0.1:4]", "RPC1", "RPC0[127.0.0.1:5]"])


def test_older_spellings_are_read() -> None:
    p = parse_flags("llama-server -m x.gguf --port 8080 -ngl all --no-mmap -fa 1 --cpu-moe -nr")
    assert p.load_mode == "none" and p.flash_attn == "on" and p.repack is False
    assert p.overrides == (ExpertRule(layers=None),)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("-ngl lots", "-ngl takes a layer count"),
        ("-ngl -5", "-ngl takes a layer count"),
        ("-fit on", "re-place the tensors"),
        ("-ot nobuffer", "has no '=BUFTYPE'"),
        ("-ot '(=CPU'", "not a valid regex"),
        ("--mystery 3", "unsupported llama.cpp flag"),
        ("-fa maybe", "takes on, off or auto"),
        ("-t", "needs a value"),
        ("-ctk q9_9", "KV cache type"),
    ],
)
def test_bad_flags_say_what_is_wrong(flags: str, message: str) -> None:
    with pytest.raises(PlacetuneError, match=re.escape(message)):
        parse_flags(flags)


def test_python_kwargs() -> None:
    kw, cannot = python_kwargs(parse_flags("-ngl 20 -t 8 -ub 1024 -fa on -ctk q8_0 --no-mmap --n-cpu-moe 2 -c 4096"))
    assert kw["n_gpu_layers"] == 20 and kw["n_threads"] == 8 and kw["n_ubatch"] == 1024 and kw["n_ctx"] == 4096
    assert kw["flash_attn"] is True and kw["use_mmap"] is False and kw["type_k"] == 8
    assert cannot == [r"-ot blk\.[0-1]\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"]
    # What Llama() cannot say is named, never approximated: auto flash attention is not flash_attn=False.
    kw, cannot = python_kwargs(parse_flags("-fa auto --no-repack -np 4"))
    assert "flash_attn" not in kw and len(cannot) == 3 and "-fa auto" in cannot[0]


def test_bytes_per_buffer_follows_llama_cpp_layer_rules(tiny_moe: Path) -> None:
    a = read_anatomy(tiny_moe)
    n = a.facts.n_layers
    assert bytes_per_buffer(a, Placement(n_gpu_layers=0), ["RPC0"]) == {"CPU": a.total_bytes}
    everything = bytes_per_buffer(a, Placement(n_gpu_layers=n + 1), ["RPC0"])
    embd = sum(t.n_bytes for t in a.tensors if t.name == "token_embd.weight")
    assert everything == {"CPU": embd, "RPC0": a.total_bytes - embd}  # the input embedding always stays on CPU
    pinned = bytes_per_buffer(a, parse_flags(f"-ngl {n + 1} --cpu-moe"), ["RPC0"])
    assert pinned["CPU"] == embd + a.expert_bytes
    assert sum(pinned.values()) == a.total_bytes
    # -ngl 1 offloads only the output head; -ngl 2 also the last repeating layer.
    last = sum(t.n_bytes for t in a.tensors if t.layer == n - 1)
    head = sum(t.n_bytes for t in a.tensors if t.name.startswith("output"))
    assert bytes_per_buffer(a, Placement(n_gpu_layers=1), ["RPC0"])["RPC0"] == head
    assert bytes_per_buffer(a, Placement(n_gpu_layers=2), ["RPC0"])["RPC0"] == head + last


def test_placement_json_round_trip() -> None:
    p = parse_flags(r"-ngl 30 -ot 'blk\.[0-3]\.ffn_down_exps\.weight=CPU' -ot 'attn=CPU' -ts 3,1 -ub 512")
    assert Placement.from_dict(p.to_dict()) == p
    with pytest.raises(PlacetuneError, match="unknown keys"):
        Placement.from_dict({"ngl": 3})
