"""Bad input, as a hostile new user types it: one line saying what is wrong, exit 2, nothing launched or
written, and never a password in clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-c", "from placetune.cli import main; main()"]
SECRET = "postgresql://u:Secret@127.0.0.1:1/x"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("command", [
    ["export", "nosuchstudy", "--storage", SECRET],
    ["verify", "nosuchstudy", "--storage", SECRET],
    ["report", SECRET],
    ["regress", "--show", "c", "--history", SECRET],
])
def test_a_storage_password_is_never_printed(command: list[str], tmp_path: Path) -> None:
    proc = run(*command, cwd=tmp_path)
    line = one_line(proc)
    assert "Secret" not in proc.stdout + proc.stderr and "u:***@" in line


@pytest.mark.parametrize(("args", "message"), [
    (["-p", "-5"], "--prompt-tokens/-p must be a whole number >= 0"),
    (["-r", "0"], "--reps/-r must be a whole number >= 1"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["--", "-ngl", "-5"], "-ngl takes a layer count"),
    (["--", "-ot", "x=FOO0"], "'FOO0' is not one this llama.cpp offers"),
    (["--", "-ot", r"blk\.0\.ffn_up_exps=CPU;blk\.1\.ffn_up_exps=CPU"], "llama-bench's separator"),
    (["--llama-bin-dir", "/nonexistent", "--runner", "llama-bench"], "the only place looked"),
])
def test_bench_refuses_before_launching(args: list[str], message: str, tiny_moe: Path) -> None:
    proc = run("bench", str(tiny_moe), *args)
    assert message in one_line(proc)
    assert "measured by" not in proc.stdout  # nothing ran


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "=5GiB"], "must look like DEVICE=SIZE"),
    (["--budget", "CUDA0=5GiB"], "no such device here"),
    (["--budget", "RPC0=1GiB"], "RPC devices need --rpc"),
    (["--ctx", "100", "-p", "512"], "raise --ctx"),
    (["--set", "ctx=4096"], "--ctx N"),
    (["--n-trials", "0"], "--n-trials must be at least 1"),
])
def test_search_refuses_bad_options(args: list[str], message: str, tiny_moe: Path, tmp_path: Path) -> None:
    proc = run("search", str(tiny_moe), "--out", str(tmp_path), *args)
    assert message in one_line(proc)
    assert not (tmp_path / "placetune.db").exists()


def test_export_checks_the_port(tmp_path: Path) -> None:
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"model": {"path": "/m.gguf"}, "placement": {"threads": 1},
                                "workload": {"n_prompt": 16, "n_gen": 4}}))
    for port in ("99999", "-1", "0"):
        assert "a TCP port is 1 to 65535" in one_line(run("export", str(best), "--port", port))
    assert run("export", str(best), "--port", "8080").stdout.strip().endswith("-fa auto -fit off")


@pytest.mark.parametrize("command", [
    ["export", "{binary}"],
    ["verify", "{binary}"],
    ["shootout", "{model}", "--best", "{binary}"],
    ["predict", "{model}", "--measured", "{binary}"],
    ["search", "{model}", "--space", "{binary}"],
    ["regress", "{binary}"],
    ["search", "{model}", "--space", "{folder}"],
])
def test_a_binary_or_a_folder_where_a_text_file_belongs_is_one_line(command: list[str], tiny_moe: Path,
                                                                    tmp_path: Path) -> None:
    """A GGUF (binary) or a folder given where a best.json, space or suite belongs: no UnicodeDecodeError."""
    binary = tmp_path / "best.json"
    binary.write_bytes(tiny_moe.read_bytes()[:4096])
    names = {"binary": str(binary), "model": str(tiny_moe), "folder": str(tmp_path / "d")}
    (tmp_path / "d").mkdir()
    line = one_line(run(*[arg.format(**names) for arg in command], cwd=tmp_path))
    assert "give" in line


@pytest.mark.parametrize(("args", "message"), [
    (["--search-minutes", "-1"], "--search-minutes must be more than 0"),
    (["--depth", "0,abc"], "give whole numbers separated by commas"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--line", "mine"], "write it as NAME='FLAGS'"),
    (["--line", "mine=--bogus"], "unsupported llama.cpp flag '--bogus'"),
    (["--line", "mine=-ot x=FOO0"], "'FOO0' is not one this llama.cpp offers"),
])
def test_shootout_refuses_bad_options(args: list[str], message: str, tiny_moe: Path, tmp_path: Path) -> None:
    proc = run("shootout", str(tiny_moe), "--out", str(tmp_path), *args)
    assert message in one_line(proc)
    assert not (tmp_path / "shootout.journal.jsonl").exists()
