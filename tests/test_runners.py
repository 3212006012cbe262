"""The three runners measure tiny models in real llama.cpp, check overrides, fail cleanly and leave no process."""

from __future__ import annotations

import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from placetune.errors import PlacetuneError
from placetune.placement import ExpertRule, Placement, RawOverride
from placetune.runners import RUNNERS, binaries, get_runner
from placetune.runners.base import BAD_ARGS, ERROR, OK, TIMEOUT, Workload
from placetune.runners.binaries import find_binary, run_to_end
from placetune.runners.llama_server import LlamaServerRunner, ServerStartError, free_port, running_server

# AMX weight repack faults on this kind of VM in both llama.cpp builds (ggml-org/llama.cpp#20824).
BASE = Placement(threads=1, repack=False)
TINY = Workload(n_prompt=16, n_gen=4, repetitions=2, warmups=1, timeout_s=120)
LAYER0_CPU = tuple(f"blk.0.ffn_{k}_exps.weight" for k in ("gate", "up", "down"))


def _processes_with(text: str) -> list[psutil.Process]:
    """Live processes whose command line mentions `text` (orphans included, which children() would miss)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(text in arg for arg in p.info["cmdline"] or ()):
            found.append(p)
    return [p for p in found if p.pid != os.getpid()]


@pytest.fixture
def no_leftovers(tiny_moe: Path, tiny_dense: Path) -> Iterator[None]:
    yield
    for model in (tiny_moe, tiny_dense):
        assert not [p for p in _processes_with(str(model)) if p.pid != os.getpid()]


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("which", ["dense", "moe"])
def test_runner_measures_tiny_models(runner: str, which: str, tiny_dense: Path, tiny_moe: Path,
                                     no_leftovers: None) -> None:
    model = tiny_dense if which == "dense" else tiny_moe
    m = get_runner(runner).measure(model, BASE, TINY)
    assert m.status == OK, (m.reason, m.log_tail)
    assert m.runner == runner
    assert len(m.pp.samples) == len(m.tg.samples) == TINY.repetitions
    assert all(s > 0 for s in m.pp.samples + m.tg.samples)
    assert (m.pp.tokens_per_sample, m.tg.tokens_per_sample) == (16, 4)
    assert m.measure_s > 0 and m.wall_s >= m.measure_s
    assert m.device_memory.get("CPU", 0) > 0
    assert m.build and m.command and not m.placement_issues


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("rules", [
    (ExpertRule(layers=(0,)),),  # spelled --n-cpu-moe 1 / -ncmoe 1
    (ExpertRule(layers=(0,), kinds=("up",)), ExpertRule(layers=(0,), kinds=("gate", "down"))),  # spelled -ot
], ids=["n-cpu-moe", "ot"])
def test_layer0_experts_pinned_to_cpu_are_reported_applied(runner: str, rules: tuple[ExpertRule, ...],
                                                           tiny_moe: Path, no_leftovers: None) -> None:
    m = get_runner(runner).measure(tiny_moe, Placement(threads=1, repack=False, overrides=rules), TINY)
    assert m.status == OK, (m.reason, m.log_tail)
    assert {name: m.tensor_buffers.get(name) for name in LAYER0_CPU} == dict.fromkeys(LAYER0_CPU, "CPU")
    assert m.placement_issues == []


@pytest.mark.parametrize("runner", RUNNERS)
def test_override_matching_nothing_is_flagged(runner: str, tiny_moe: Path, no_leftovers: None) -> None:
    placement = Placement(threads=1, repack=False, overrides=(RawOverride(r"blk\.99\.ffn_up_exps", "CPU"),))
    m = get_runner(runner).measure(tiny_moe, placement, TINY)
    assert m.status == OK, (m.reason, m.log_tail)
    assert any("matched no tensor" in issue for issue in m.placement_issues)


@pytest.mark.parametrize("runner", RUNNERS)
def test_unknown_buffer_type_is_bad_args_in_one_line(runner: str, tiny_moe: Path, no_leftovers: None) -> None:
    placement = Placement(threads=1, repack=False, overrides=(RawOverride(r"blk\.0\.ffn_up_exps", "NOPE"),))
    m = get_runner(runner).measure(tiny_moe, placement, TINY)
    assert m.status == BAD_ARGS
    assert m.reason and "\n" not in m.reason and "buffer type" in m.reason


def test_embedded_timeout_kills_the_child(tiny_moe: Path) -> None:
    big = Workload(n_prompt=512, n_gen=2000, repetitions=50, warmups=0, timeout_s=1.0)
    m = get_runner("embedded").measure(tiny_moe, BASE, big)
    assert m.status == TIMEOUT
    assert m.wall_s < 30
    # Only this test's own children: other test sessions on the machine may run their own.
    mine = psutil.Process().children(recursive=True)
    assert not [p for p in mine if "placetune.runners.embedded_child" in " ".join(p.cmdline())]


def test_llama_bench_timeout_kills_the_process(tiny_moe: Path, no_leftovers: None) -> None:
    big = Workload(n_prompt=512, n_gen=512, repetitions=1000, warmups=1, timeout_s=1.0)
    m = get_runner("llama-bench").measure(tiny_moe, BASE, big)
    assert m.status == TIMEOUT and m.wall_s < 30


def test_llama_server_not_ready_in_time_is_a_timeout(tiny_moe: Path, no_leftovers: None) -> None:
    m = get_runner("llama-server").measure(tiny_moe, BASE, Workload(n_prompt=16, n_gen=4, timeout_s=0.01))
    assert m.status == TIMEOUT


def test_llama_bench_warmups_and_depth(tiny_moe: Path) -> None:
    runner = get_runner("llama-bench")
    none = runner.measure(tiny_moe, BASE, Workload(n_prompt=16, n_gen=4, repetitions=2, warmups=0, depth=8))
    assert none.status == OK, none.reason
    assert "--no-warmup" in none.command and none.command[none.command.index("-d") + 1] == "8"
    three = runner.measure(tiny_moe, BASE, Workload(n_prompt=16, n_gen=4, repetitions=2, warmups=3))
    assert three.status == OK, three.reason
    assert three.command[three.command.index("-r") + 1] == "4"  # two extra passes, dropped from the samples
    assert len(three.pp.samples) == len(three.tg.samples) == 2


def test_llama_server_depth_reuses_the_cached_prefix(tiny_moe: Path, no_leftovers: None) -> None:
    m = get_runner("llama-server").measure(tiny_moe, BASE, Workload(n_prompt=16, n_gen=4, repetitions=2,
                                                                     warmups=1, depth=32))
    assert m.status == OK, m.reason
    assert len(m.pp.samples) == len(m.tg.samples) == 2


def test_llama_server_context_too_small_is_bad_args(tiny_moe: Path) -> None:
    m = get_runner("llama-server").measure(tiny_moe, Placement(threads=1, repack=False, ctx=8), TINY)
    assert m.status == BAD_ARGS and "-c 8" in m.reason


def test_llama_server_that_cannot_load_leaves_no_process(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_text("this is not a GGUF file\n")
    m = LlamaServerRunner().measure(bad, Placement(threads=1), TINY)
    assert m.status == ERROR and "\n" not in m.reason
    assert "model" in m.log_tail
    assert not _processes_with(str(bad))


def test_running_server_stops_on_keyboard_interrupt(tiny_moe: Path) -> None:
    runner = LlamaServerRunner()
    port = free_port()
    command = runner.command(tiny_moe, BASE, TINY, port)
    with pytest.raises(KeyboardInterrupt), running_server(command, port, timeout_s=60) as server:
        assert psutil.pid_exists(server.proc.pid)
        raise KeyboardInterrupt
    assert server.returncode is not None
    assert not _processes_with(str(tiny_moe))


def test_running_server_reports_early_exit_in_one_line(tiny_moe: Path) -> None:
    port = free_port()
    command = [*LlamaServerRunner().command(tiny_moe, BASE, TINY, port), "--no-such-flag"]
    with pytest.raises(ServerStartError) as info, running_server(command, port, timeout_s=60):
        pass
    assert "\n" not in str(info.value) and "--no-such-flag" in str(info.value)
    assert info.value.returncode not in (None, 0)
    assert not _processes_with(str(tiny_moe))


def test_run_to_end_kills_the_group_on_timeout_and_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    marker = "31.4159"
    run = run_to_end(["sleep", marker], timeout_s=0.2)
    assert run.timed_out and run.returncode == -signal.SIGKILL
    assert not _processes_with(marker)

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(binaries.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_to_end(["sleep", marker], timeout_s=30)
    assert not _processes_with(marker)


def test_missing_binary_is_a_one_line_error(tmp_path: Path, tiny_moe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(binaries, "package_bin_dir", lambda: None)
    for runner in ("llama-bench", "llama-server"):
        with pytest.raises(PlacetuneError) as info:
            get_runner(runner, bin_dir=empty).measure(tiny_moe, BASE, TINY)
        message = str(info.value)
        assert "\n" not in message and f"no executable {runner} there" in message
        assert "--llama-bin-dir" in message and "the only place looked" in message
        with pytest.raises(PlacetuneError) as info:  # without --llama-bin-dir: PATH, then the package
            get_runner(runner).measure(tiny_moe, BASE, TINY)
        assert f"{runner} not found in PATH" in str(info.value)


def test_find_binary_looks_only_in_bin_dir_else_path_then_package(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    assert find_binary("llama-bench", tmp_path) == fake.resolve()
    packaged = find_binary("llama-bench")
    assert packaged.name == "llama-bench" and packaged.parent == binaries.package_bin_dir()
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_binary("llama-bench") == fake.resolve()
    with pytest.raises(PlacetuneError, match="only place looked"):  # a named folder never falls back to PATH
        find_binary("llama-server", tmp_path)


def test_binary_build_reads_version_and_backends() -> None:
    build = binaries.binary_build(find_binary("llama-server"))
    assert "version" in build and "commit" in build and "CPU" in build["backends"]


def test_get_runner_by_name() -> None:
    with pytest.raises(PlacetuneError, match="llama-bench, llama-server"):
        get_runner("llamafile")
    for name in ("embedded", "llama-bench", "llama-server"):
        assert get_runner(name, rpc=["127.0.0.1:50052"]).name == name
