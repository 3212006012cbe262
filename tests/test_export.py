"""export and verify: every form survives a shell (or YAML, or Python), the server line really serves, and
verify compares a real llama-server with a real search result."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from placetune.errors import PlacetuneError
from placetune.export import FORMATS, export, load_result
from placetune.placement import (
    ExpertRule,
    Placement,
    RawOverride,
    parse_flags,
    python_kwargs,
    render_args,
    render_bench_command,
    render_server_command,
)
from placetune.results import BestPlan, best_script, find_best, load_best
from placetune.runners.binaries import package_bin_dir
from placetune.runners.llama_server import free_port, running_server

PLACETUNE = str(Path(sys.executable).parent / "placetune")
# A folder name a careless export would break: spaces, both quotes, $VAR, $(...), backticks, a backslash.
AWKWARD = "my models/it's \"q8\" $HOME $(touch pwned) `id` back\\slash"
PLACEMENT = Placement(threads=1, repack=False, overrides=(
    ExpertRule(layers=(0, 1), kinds=("gate", "up")), RawOverride(r"blk\.2\.ffn_down_exps", "CPU")))
TINY = {"n_prompt": 16, "n_gen": 4, "depth": 0, "repetitions": 2, "warmups": 1, "timeout_s": 120.0}


def make_plan(model: Path | str, placement: Placement = PLACEMENT) -> BestPlan:
    stats = {"samples": [100.0, 110.0], "tokens_per_sample": 16, "median": 105.0, "spread": 0.067}
    return BestPlan({
        "model": {"path": str(model)}, "workload": dict(TINY), "runner": "embedded", "rpc": [],
        "placement": placement.to_dict(), "machine": {"fingerprint": "test"},
        "measurement": {"runner": "embedded", "pp": stats, "tg": stats},
    })


@pytest.fixture
def stub_bin(tmp_path: Path) -> Path:
    """llama-server and llama-bench stand-ins that print the argv they received as JSON."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("llama-server", "llama-bench"):
        stub = folder / name
        stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
        stub.chmod(0o755)
    return folder


def through_bash(line: str, cwd: Path) -> list[str]:
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=cwd, timeout=30, check=True)
    return json.loads(done.stdout)


def test_every_shell_form_survives_bash(tmp_path: Path, stub_bin: Path) -> None:
    model = str(tmp_path / AWKWARD / "m.gguf")
    plan = make_plan(model)
    server = str(stub_bin / "llama-server")

    line = export(plan, "server", binary=server, port=8080)
    assert through_bash(line, tmp_path) == render_server_command(model, PLACEMENT, port=8080)[1:]
    line = export(plan, "bench", binary=server)
    expected = render_bench_command(model, PLACEMENT, n_prompt=16, n_gen=4, repetitions=2, output=None)[1:]
    assert through_bash(line, tmp_path) == expected
    flags = through_bash(f"{shlex.quote(server)} {export(plan, 'flags')}", tmp_path)
    assert flags == render_args(PLACEMENT)  # the placement itself: the server line adds -fa and -fit off
    ot = through_bash(f"{shlex.quote(server)} -ot {export(plan, 'ot')}", tmp_path)
    assert ot == ["-ot", r"blk\.[0-1]\.ffn_(up|gate)_(ch|)exps=CPU,blk\.2\.ffn_down_exps=CPU"]
    assert not (tmp_path / "pwned").exists()
    assert "--host" in (argv := through_bash(export(plan, "server", binary=server), tmp_path))
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--port" not in argv


def test_llama_swap_entry_is_yaml_whose_cmd_splits_back(tmp_path: Path) -> None:
    model = str(tmp_path / AWKWARD / "m.gguf")
    text = export(make_plan(model), "llama-swap", host="0.0.0.0")
    doc = yaml.safe_load(text)
    (name, entry), = doc["models"].items()
    assert name == "m" and entry["proxy"] == "http://127.0.0.1:${PORT}"
    # llama-swap substitutes ${PORT} in the string, then splits it with POSIX shell rules.
    argv = shlex.split(entry["cmd"].replace("${PORT}", "5800"))
    assert argv == [*render_server_command(model, PLACEMENT, host="0.0.0.0"), "--port", "5800"]
    with pytest.raises(PlacetuneError, match="macro"):
        export(make_plan("/models/${oops}/m.gguf"), "llama-swap")


def test_python_snippet_runs_and_passes_the_path_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = str(tmp_path / AWKWARD / "m.gguf")
    seen: dict = {}
    fake = types.ModuleType("llama_cpp")
    fake.Llama = lambda **kw: seen.update(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    snippet = export(make_plan(model), "python")
    exec(compile(snippet, "<export>", "exec"), {})
    assert seen["model_path"] == model and seen["n_threads"] == 1
    assert "tensor_buft_overrides" not in seen  # Llama() would silently ignore it
    assert r"#   -ot blk\.2\.ffn_down_exps=CPU" in snippet and "--no-repack" in snippet


def test_json_and_errors(tmp_path: Path) -> None:
    plan = make_plan(tmp_path / "m.gguf")
    assert json.loads(export(plan, "json")) == json.loads(json.dumps(plan.data))
    with pytest.raises(PlacetuneError, match="no tensor overrides"):
        export(make_plan(tmp_path / "m.gguf", Placement(threads=2)), "ot")
    with pytest.raises(PlacetuneError, match=", ".join(FORMATS)):
        export(plan, "yaml")
    with pytest.raises(PlacetuneError, match="not found"):
        load_result(str(tmp_path / "missing" / "best.json"))


def test_exported_server_line_pasted_into_bash_answers_health(tmp_path: Path, tiny_moe: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / AWKWARD
    folder.mkdir(parents=True)
    model = folder / "tiny moe.gguf"
    shutil.copy(tiny_moe, model)
    best = tmp_path / "best.json"
    best.write_text(json.dumps(make_plan(model).data))
    port = free_port()
    line = subprocess.run([PLACETUNE, "export", str(best), "--port", str(port)], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert line.startswith("llama-server -m ") and "\n" not in line
    monkeypatch.setenv("PATH", f"{package_bin_dir()}{os.pathsep}{os.environ['PATH']}")
    with running_server(["bash", "-c", line], port, timeout_s=120) as server, \
            urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
        assert resp.status == 200
    assert not (tmp_path / "pwned").exists()


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory: pytest.TempPathFactory, tiny_moe: Path) -> Path:
    """A real (short) search on the tiny MoE model: its results root, holding best.json and placetune.db.

    The model is given as typed in its own folder (a relative path), as users do.
    """
    out = tmp_path_factory.mktemp("search")
    subprocess.run([PLACETUNE, "search", tiny_moe.name, "--out", str(out), "--n-trials", "3", "-p", "16", "-n", "4",
                    "-r", "2", "--warmups", "1", "--top-k", "1", "--set", "repack=false", "--set", "threads=1"],
                   capture_output=True, text=True, check=True, timeout=600, cwd=tiny_moe.parent)
    return out


def test_export_by_study_name_matches_the_search(tiny_search: Path) -> None:
    best = next(tiny_search.rglob("best.json"))
    record = json.loads(best.read_text())
    storage = f"sqlite:///{tiny_search / 'placetune.db'}"
    plan = load_result(record["study"]["name"], storage)
    assert Path(plan.model_path).is_absolute() and Path(plan.model_path).is_file()  # searched as a relative path
    assert plan.model_path == record["model"]["path"]
    assert plan.data["workload"] == record["workload"]
    # The study's answer is its final round's winner (as best.json), not its fastest search-phase trial.
    assert plan.data["decision"] == record["decision"] and plan.data["flags"] == record["flags"]
    assert export(plan, "server").startswith(shlex.join(["llama-server", "-m", record["model"]["path"]]))
    with pytest.raises(PlacetuneError, match="studies there"):
        load_result("no-such-study", storage)


def test_a_search_out_folder_finds_its_one_best_json(tiny_search: Path, tmp_path: Path) -> None:
    """Users give search's --out; the best.json lies two folders down (<model>/<machine>)."""
    best = next(tiny_search.rglob("best.json"))
    assert find_best(tiny_search) == best
    assert load_best(tiny_search).data == load_best(best).data
    twice = tmp_path / "two"
    for sub in ("a", "b"):
        shutil.copytree(best.parent, twice / sub)
    with pytest.raises(PlacetuneError, match="holds 2 results"):
        load_best(twice)


def test_verify_prints_searched_measured_and_ratio(tiny_search: Path) -> None:
    best = next(tiny_search.rglob("best.json"))
    done = subprocess.run([PLACETUNE, "verify", str(best.parent)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"launching: \S*llama-server -m .* --port \d+", out)
    record = json.loads(best.read_text())["measurement"]
    for metric in ("pp", "tg"):
        row = next(line for line in out.splitlines() if re.match(rf"\W*{metric}\b", line.strip("│ ")))
        numbers = [float(x) for x in re.findall(r"\d+\.\d+(?![\d%])", row)]
        assert numbers[0] == pytest.approx(record[metric]["median"], abs=0.01)  # searched
        assert numbers[1] > 0  # measured by llama-server
        assert numbers[2] == pytest.approx(numbers[1] / numbers[0], rel=0.3)  # ratio of geometric means
        assert numbers[3] <= numbers[2] <= numbers[4]  # its 95% interval
    assert "beyond the noise" not in out or "25121" in out
    assert "the search ran on hardware" not in out  # searched by embedded llama.cpp, verified by llama-server
    # The line launched is the exported one: the searched serving context and --fit off.
    assert f"-c {json.loads(best.read_text())['serving']['ctx']} -np 1" in out and "-fit off" in out


# Every kind of trouble an outside string can bring into a generated script, snippet or config: a newline
# followed by a command, a carriage return, a terminal escape, a Unicode line separator, quotes, $(...) and
# backticks, and a comment marker.
HOSTILE = "x\ntouch PWNED1 #\r\x1b[31m\u2028\u2029\x85$(touch PWNED2)`touch PWNED3`'\"\\ #"


def hostile_plan(tmp_path: Path) -> tuple[BestPlan, Placement, str]:
    model = str(tmp_path / f"models{HOSTILE}" / f"m{HOSTILE}.gguf")
    placement = Placement(threads=1, ctx=4096, parallel=1, overrides=(RawOverride(f"blk\\.0\\.{HOSTILE}", "CPU"),))
    plan = make_plan(model, placement)
    data = {**plan.data, "machine": {"cpu_model": HOSTILE, "fingerprint": HOSTILE},
            "study": {"name": HOSTILE, "storage": f"sqlite:///{HOSTILE}"},
            "server_command": render_server_command(model, placement), "flags": HOSTILE}
    return BestPlan(data), placement, model


def test_no_outside_string_escapes_any_export_or_best_sh(tmp_path: Path, stub_bin: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    plan, placement, model = hostile_plan(tmp_path)
    server = str(stub_bin / "llama-server")
    # Shell forms: bash runs the whole text, comment lines included, and passes every string through unchanged.
    assert through_bash(export(plan, "server", binary=server), tmp_path) == render_server_command(model, placement)[1:]
    bench = export(plan, "bench", binary=server)
    assert through_bash(bench, tmp_path)[:2] == ["-m", model]
    note = bench.rsplit("\n", 1)[1]
    assert note.startswith("# ") and note.isprintable()
    assert through_bash(f"{shlex.quote(server)} {export(plan, 'flags')}", tmp_path) == render_args(placement)
    assert through_bash(f"{shlex.quote(server)} -ot {export(plan, 'ot')}", tmp_path)[1] == f"blk\\.0\\.{HOSTILE}=CPU"
    # Python: the snippet is the import and one call, whatever the comments say; the strings arrive intact.
    seen: dict = {}
    fake = types.ModuleType("llama_cpp")
    fake.Llama = lambda **kw: seen.update(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    snippet = export(plan, "python")
    assert all(line.isprintable() for line in snippet.split("\n") if line.startswith("#"))
    tree = ast.parse(snippet)
    assert [type(node).__name__ for node in tree.body] == ["ImportFrom", "Assign"]
    exec(compile(snippet, "<export>", "exec"), {})
    assert seen["model_path"] == model
    # YAML: the entry has exactly its keys, and its cmd splits back into the exact server line.
    doc = yaml.safe_load(export(plan, "llama-swap", binary=server))
    (entry,) = doc["models"].values()
    assert set(entry) == {"cmd", "proxy"}
    expected = [*render_server_command(model, placement, binary=server), "--port", "1"]
    assert shlex.split(entry["cmd"].replace("${PORT}", "1")) == expected
    assert json.loads(export(plan, "json"))["machine"]["cpu_model"] == HOSTILE
    # best.sh: its comments hold the file name and the CPU string, and running it runs only the server line.
    script = tmp_path / "best.sh"
    script.write_text(best_script(plan.record))
    header = script.read_text().split("\nexec ", 1)[0].split("\n")
    assert len(header) == 3 and all(line.startswith("#") and line.isprintable() for line in header), header
    monkeypatch.setenv("PATH", f"{stub_bin}{os.pathsep}{os.environ['PATH']}")
    ran = subprocess.run(["sh", str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=30, check=True)
    assert json.loads(ran.stdout) == render_server_command(model, placement)[1:]
    assert not list(tmp_path.glob("PWNED*"))


KNOB = "GGML_OP_OFFLOAD_MIN_BATCH"


def test_env_knobs_and_rpc_endpoints_with_hostile_values_survive_every_form(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An env knob's value and an RPC endpoint come from best.json: each form passes them through unchanged,
    as an assignment the shell understands (a quoted 'NAME=value' word would be a command name), and runs
    nothing else."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("llama-server", "llama-bench"):
        stub = folder / name
        stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"print(json.dumps({{'argv': sys.argv[1:], 'knob': os.environ.get({KNOB!r})}}))\n")
        stub.chmod(0o755)
    model = str(tmp_path / "m.gguf")
    placement = Placement(threads=1, ctx=4096, parallel=1, env=((KNOB, HOSTILE),))
    rpc = [f"h{HOSTILE}:1"]
    plan = BestPlan({**make_plan(model, placement).data, "rpc": rpc})

    def run(text: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != KNOB}  # only the line may set it
        done = subprocess.run(["bash", "-c", text], capture_output=True, text=True, cwd=tmp_path, timeout=30,
                              check=True, env=env)
        return json.loads(done.stdout)

    server = str(folder / "llama-server")
    assert run(export(plan, "server", binary=server)) == {
        "argv": render_server_command(model, placement, rpc=rpc)[1:], "knob": HOSTILE}
    bench = run(export(plan, "bench", binary=server))
    assert bench["knob"] == HOSTILE and bench["argv"][bench["argv"].index("--rpc") + 1] == rpc[0]
    flags = export(plan, "flags")
    assert all(line.isprintable() for line in flags.split("\n")[1:])
    assert run(f"{shlex.quote(server)} {flags}") == {"argv": render_args(placement, rpc=rpc), "knob": None}
    doc = yaml.safe_load(export(plan, "llama-swap", binary=server))
    (entry,) = doc["models"].values()
    assert entry["env"] == [f"{KNOB}={HOSTILE}"]
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=lambda **kw: None))
    monkeypatch.setenv(KNOB, "")  # recorded, so the value the snippet sets is undone after the test
    monkeypatch.delenv(KNOB)
    exec(compile(export(plan, "python"), "<export>", "exec"), {})
    assert os.environ[KNOB] == HOSTILE
    script = tmp_path / "best.sh"
    script.write_text(best_script(BestPlan({**plan.data, "server_command": render_server_command(
        model, placement, binary=server, rpc=rpc)}).record))
    assert run(f"sh {shlex.quote(str(script))}") == {
        "argv": render_server_command(model, placement, rpc=rpc)[1:], "knob": HOSTILE}
    assert not list(tmp_path.glob("PWNED*"))


def test_python_export_maps_the_split_mode() -> None:
    for mode, value in (("none", 0), ("layer", 1), ("row", 2)):  # llama.h's enum llama_split_mode
        kw, cannot = python_kwargs(parse_flags(["-sm", mode, "-fa", "on"]))
        assert kw == {"split_mode": value, "flash_attn": True} and not cannot


def test_each_form_carries_exactly_what_it_can(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    placement = Placement(n_gpu_layers=20, threads=2, ubatch=1024, flash_attn="on", ctx=8192, parallel=2,
                          overrides=(ExpertRule(layers=(0, 1)),))
    plan = BestPlan({**make_plan(tmp_path / "m.gguf", placement).data,
                     "workload": {**TINY, "depth": 512}})
    # The server line and llama-swap carry everything: the serving context, -fa and -fit off.
    server = shlex.split(export(plan, "server"))
    assert parse_flags(server) == placement and server[-2:] == ["-fit", "off"]
    cmd = yaml.safe_load(export(plan, "llama-swap"))["models"]["m"]["cmd"]
    assert parse_flags(cmd.replace("${PORT}", "1")) == placement and "-fit off" in cmd
    # The bench line carries the placement and knobs at the searched depth; no -c, no -np (llama-bench has none).
    bench_line, note = export(plan, "bench").split("\n")
    bench = shlex.split(bench_line)
    assert bench[bench.index("-d") + 1] == "512" and "-c 8192 -np 2" in note
    assert parse_flags(bench, tool="bench") == replace(placement, ctx=None, parallel=None)
    # flags: the placement itself; ot: only the overrides.
    assert parse_flags(export(plan, "flags")) == placement
    assert parse_flags(["-ot", shlex.split(export(plan, "ot"))[0]]).overrides == placement.overrides
    # python: n_ctx and flash_attn as Llama() takes them; the rest named in comments.
    seen: dict = {}
    fake = types.ModuleType("llama_cpp")
    fake.Llama = lambda **kw: seen.update(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    snippet = export(plan, "python")
    exec(compile(snippet, "<export>", "exec"), {})
    assert seen["n_ctx"] == 8192 and seen["flash_attn"] is True and seen["n_gpu_layers"] == 20
    assert "# Llama() cannot express" in snippet and "-np 2" in snippet and "--n-cpu-moe" not in seen
