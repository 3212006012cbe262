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


@pytest.mark.parametrize("url", [
    SECRET,  # as the positional argument, where a study name or a best.json belongs
    "postgresql://127.0.0.1:1/x?password=Secret",  # a password in the query string, as libpq takes it
    "u:Secret@127.0.0.1:1/x",  # typed without its scheme
    "postgresql://u:Secret@[::1/x",  # a URL SQLAlchemy cannot parse
])
@pytest.mark.parametrize("command", [["export", "nosuchstudy", "--storage", "{url}"], ["export", "{url}"],
                                     ["verify", "{url}"], ["report", "{url}"],
                                     ["regress", "--show", "c", "--history", "{url}"]])
def test_no_spelling_of_a_storage_password_is_printed(command: list[str], url: str, tmp_path: Path) -> None:
    proc = run(*[arg.format(url=url) for arg in command], cwd=tmp_path)
    one_line(proc)
    assert "Secret" not in proc.stdout + proc.stderr


def test_a_plan_never_carries_a_storage_password(tiny_moe: Path, tmp_path: Path) -> None:
    """A best.json written by hand or by an older placetune: export --format json and report mask it."""
    folder = tmp_path / "result"
    folder.mkdir()
    (folder / "best.json").write_text(json.dumps({
        "model": {"path": str(tiny_moe)}, "placement": {"n_gpu_layers": 0}, "workload": {"n_prompt": 16, "n_gen": 4},
        "study": {"name": "s", "storage": SECRET, "objective": "latency"}}))
    (folder / "trials.csv").write_text("trial,state,role,name,pp,tg,value,flags\n"
                                       "0,COMPLETE,search,,10.0,5.0,1.0,-ngl 0\n")
    proc = run("export", str(folder), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["study"]["storage"] == "postgresql://u:***@127.0.0.1:1/x"
    proc = run("report", str(folder), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "report").rglob("*.html"))
    assert "u:***@" in written and "Secret" not in written + proc.stdout + proc.stderr


@pytest.mark.parametrize(("placement", "message"), [
    ({"threads": -5}, "threads must be a whole number of 1 or more"),
    ({"n_gpu_layers": -5}, "n_gpu_layers (-ngl) must be 0 or more"),
    ({"flash_attn": "maybe"}, "flash_attn takes one of on, off, auto"),
    ({"tensor_split": ["a"]}, "tensor_split is a list of numbers"),
    ({"tensor_split": [-1, 2]}, "tensor split (-ts) takes shares of 0 or more"),
    ({"overrides": [{"type": "raw"}]}, "an override is experts"),
    ({"overrides": [{"type": "experts", "layers": [-1]}]}, "layer numbers (0 or more)"),
    ({"repack": "yes"}, "repack are true or false"),
])
def test_placement_files_are_checked_value_by_value(placement: dict[str, object], message: str, tiny_moe: Path,
                                                    tmp_path: Path) -> None:
    """A placement file or a best.json reaches llama.cpp and every export only with values llama.cpp accepts."""
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps(placement))
    proc = run("bench", str(tiny_moe), "--placement", str(plan), "-p", "8", "-n", "2", "-r", "1")
    assert message in one_line(proc)
    assert "measured by" not in proc.stdout
    plan.write_text(json.dumps({"model": {"path": str(tiny_moe)}, "placement": placement,
                                "workload": {"n_prompt": 16, "n_gen": 4}}))
    for fmt in ("server", "python"):
        assert message in one_line(run("export", str(plan), "--format", fmt))


@pytest.mark.parametrize(("args", "message"), [
    (["--", "-ts", "-1,2"], "tensor split (-ts) takes shares of 0 or more"),
    (["--", "-ts", "nan,1"], "tensor split (-ts) takes shares of 0 or more"),
    (["--", "-ts", "0,0"], "not all 0"),
    (["--", "-p", "4096"], "-p after -- would be ignored"),
    (["--rpc", "127.0.0.1:99999"], "a port of 1 to 65535"),
    (["--llama-bin-dir", "/nonexistent"], "the only place looked"),
    (["--llama-bin-dir", "/nonexistent", "--runner", "embedded"], "the only place looked"),
    (["--timeout", "nan"], "the timeout must be a positive number"),
])
def test_bench_checks_every_option_before_launching(args: list[str], message: str, tiny_moe: Path) -> None:
    proc = run("bench", str(tiny_moe), *args)
    assert message in one_line(proc)
    assert "measured by" not in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "CPU=1.2.3GiB"], "cannot read size '1.2.3GiB'"),
    (["--min-pp", "nan"], "--min-pp must be a positive number"),
    (["--min-pp", "-1"], "--min-pp must be a positive number"),
    (["--timeout", "-1"], "--timeout must be a positive number"),
    (["--timeout", "inf"], "--timeout must be a positive number"),
    (["--grace", "1", "--heartbeat", "5"], "--grace 1 must be longer than --heartbeat 5"),
    (["--strategy", "bogus"], "--strategy 'bogus'"),
    (["--objective", "bogus"], "--objective 'bogus'"),
    (["--set", "threads=4..1"], "threads"),
    (["--llama-bin-dir", "/nonexistent"], "the only place looked"),
])
def test_search_checks_every_option_before_writing(args: list[str], message: str, tiny_moe: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run("search", str(tiny_moe), "--out", str(out), *args)
    assert message in one_line(proc)
    assert not out.exists()  # no study, no folder


def test_hw_takes_the_named_bin_dir_or_nothing() -> None:
    assert "the only place looked" in one_line(run("hw", "--llama-bin-dir", "/nonexistent"))


def test_a_named_bin_dir_means_its_binaries(tmp_path: Path) -> None:
    from placetune.runners import default_runner

    assert default_runner(None, tmp_path) == "llama-bench"  # the user's own build, not llama-cpp-python
    assert default_runner("embedded", tmp_path) == "embedded"


def test_a_model_name_that_is_not_utf8_is_one_line(tiny_moe: Path, tmp_path: Path) -> None:
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/m\xff.gguf"))
    odd.write_bytes(tiny_moe.read_bytes())
    for command in (["inspect", str(odd)], ["search", str(odd), "--out", str(tmp_path / "out")]):
        assert "is not valid UTF-8; rename the file" in one_line(run(*command))
    assert not (tmp_path / "out").exists()


def test_shootout_lines_need_their_own_names(tiny_moe: Path, tmp_path: Path) -> None:
    proc = run("shootout", str(tiny_moe), "--out", str(tmp_path), "--line", "a=-t 1", "--line", "a=-t 2")
    assert "--line names 'a' more than once" in one_line(proc)


def test_regress_and_verify_check_buffer_types_before_launching(tiny_moe: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(f'[[case]]\nname = "bad"\nmodel = "{tiny_moe}"\nflags = "-ot x=FOO0"\n'
                     '[case.workload]\nn_prompt = 8\nn_gen = 2\nrepetitions = 1\nwarmups = 0\n')
    proc = run("regress", str(suite), "--history", str(tmp_path / "h.db"))
    assert proc.returncode == 2 and "'FOO0' is not one this llama.cpp offers" in proc.stdout + proc.stderr
    assert "unrecognized buffer type" not in proc.stdout + proc.stderr  # llama.cpp never saw it
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"model": {"path": str(tiny_moe)}, "workload": {"n_prompt": 8, "n_gen": 2},
                                "placement": {"overrides": [{"type": "raw", "pattern": "x", "buft": "FOO0"}]}}))
    assert "'FOO0' is not one this llama.cpp offers" in one_line(run("verify", str(best)))


def test_junit_holds_outside_strings_as_valid_xml(tmp_path: Path) -> None:
    """A case name or a message with control characters still gives JUnit XML that CI can read."""
    import xml.etree.ElementTree as ET

    suite = tmp_path / "suite.toml"
    suite.write_text('[[case]]\nname = "bad\\u001b[31m\\u0000case"\nmodel = "missing.gguf"\nflags = "-t 1"\n')
    junit = tmp_path / "junit.xml"
    proc = run("regress", str(suite), "--history", str(tmp_path / "h.db"), "--junit", str(junit))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    case = ET.parse(junit).getroot().find(".//testcase")
    assert case is not None and case.get("classname") == "bad\\x1b[31m\\x00case"
