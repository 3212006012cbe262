"""The search: the optimiser on a synthetic landscape (fake runner), feasibility pruning, and real runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from placetune.anatomy import read_anatomy
from placetune.errors import PlacetuneError
from placetune.hardware import LlamaDevice, Machine
from placetune.memory import check_fit, parse_budgets, predict_memory
from placetune.placement import Placement, bytes_per_buffer, render_flags
from placetune.runners.base import Measurement, Stats, Workload
from placetune.search import Search, SearchConfig
from placetune.space import SPACES_DIR, load_space, resolve_space, to_placement

optuna.logging.set_verbosity(optuna.logging.ERROR)
GIB = 2**30


def fake_machine(accel_free: int | None = 8 * GIB) -> Machine:
    devices = [LlamaDevice("CPU", "test cpu", "CPU", 16 * GIB, 16 * GIB)]
    if accel_free is not None:
        devices.append(LlamaDevice("RPC0", "127.0.0.1:1", "RPC0[127.0.0.1:1]", accel_free, accel_free))
    return Machine("test", "test cpu", 4, 8, 16 * GIB, 16 * GIB, [], devices, {"test": "fake"})


class LandscapeRunner:
    """A fake runner with a known optimum: tg grows with bytes on the accelerator, pp peaks at ubatch 1024,
    and 3 threads are best. Counts calls so tests can prove pruned trials never launch."""

    name = "fake"

    def __init__(self, anatomy, devices: list[str]) -> None:
        self.anatomy, self.devices, self.calls = anatomy, devices, 0
        self.launched: list[str] = []

    def measure(self, model: Path, placement: Placement, workload: Workload) -> Measurement:
        self.calls += 1
        self.launched.append(render_flags(placement))
        on_accel = sum(v for k, v in bytes_per_buffer(self.anatomy, placement, self.devices).items() if k != "CPU")
        share = on_accel / self.anatomy.total_bytes
        tg = 100 + 900 * share - 40 * abs((placement.threads or 4) - 3)
        pp = 1000 - abs((placement.ubatch or 512) - 1024) / 2
        n = workload.repetitions
        return Measurement("fake", "ok", pp=Stats((pp,) * n, workload.n_prompt), tg=Stats((tg,) * n, workload.n_gen))


def config(anatomy, model: Path, tmp_path: Path, **kw) -> SearchConfig:
    base = dict(
        model=model, anatomy=anatomy, machine=fake_machine(), space=load_space(SPACES_DIR / "moe.toml"),
        workload=Workload(n_prompt=64, n_gen=16, repetitions=2, warmups=0), objective="tg", n_trials=40,
        storage=f"sqlite:///{tmp_path / 'study.db'}", final_rounds=1,
    )
    base.update(kw)
    return SearchConfig(**base)


def test_optimizer_finds_the_known_optimum(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path)
    runner = LandscapeRunner(anatomy, cfg.devices)
    search = Search(cfg, runner)
    search.enqueue_seeds()
    search.run()
    best = search.ranked()[0]
    placement = Placement.from_dict(best.user_attrs["placement"])
    # The optimum: every layer and the output head on the accelerator, no experts in RAM, 3 threads.
    assert placement.n_gpu_layers == anatomy.facts.n_layers + 1
    assert not placement.overrides
    assert placement.threads == 3
    # Duplicates are answered from storage: no placement is launched more than screen + rest.
    assert max(runner.launched.count(f) for f in runner.launched) <= 2
    optimum = runner.measure(tiny_moe, Placement(n_gpu_layers=anatomy.facts.n_layers + 1, threads=3), cfg.workload)
    assert best.values[0] == pytest.approx(optimum.tg.median)


def test_infeasible_trials_are_pruned_without_a_launch(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    budget = anatomy.total_bytes // 3
    cfg = config(anatomy, tiny_moe, tmp_path, budgets={"RPC0": budget}, margin=0, n_trials=25)
    runner = LandscapeRunner(anatomy, cfg.devices)
    search = Search(cfg, runner)
    search.enqueue_seeds()
    search.run()
    pruned = [t for t in search.study.trials if t.state.name == "PRUNED"]
    infeasible = [t for t in pruned if t.user_attrs["reason"].startswith("predicted not to fit")]
    screened = [t for t in pruned if t.user_attrs["reason"].startswith("screened out")]
    assert infeasible and len(infeasible) + len(screened) == len(pruned)
    assert not {t.user_attrs["flags"] for t in infeasible} & set(runner.launched)
    measured = [t for t in search.study.trials if t.state.name == "COMPLETE"]
    assert set(runner.launched) == {t.user_attrs["flags"] for t in measured + screened}
    for t in measured:
        p = Placement.from_dict(t.user_attrs["placement"])
        need = predict_memory(anatomy, p, ["RPC0"], cfg.n_ctx)
        assert check_fit(need, {"RPC0": budget}, margin=0).fits
    # The all-on-accelerator seed cannot fit and was pruned; the bandwidth model offered one that fits.
    seeds = {t.user_attrs.get("seed_name"): t.state.name for t in search.study.trials}
    assert seeds["llama.cpp defaults (everything on the accelerator)"] == "PRUNED"
    model_best = [name for name in seeds if name and "best by the bandwidth model" in name]
    assert model_best and seeds[model_best[0]] == "COMPLETE"


def test_space_validation_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    for text, message in [
        ('[params.ubatchh]\nchoices = [1]', "ubatchh"),
        ('[params.flash_attn]\nchoices = ["sometimes"]', "sometimes"),
        ('[params.threads]\ntype = "int"\nlow = 1\nhigh = "cores"', "cores"),
        ('[params.threads]\nlow = 1', "give choices"),
        ("[params", "not valid TOML"),
    ]:
        bad.write_text(text)
        with pytest.raises(PlacetuneError, match=message):
            load_space(bad)


def test_default_space_follows_model_and_hardware(tiny_moe: Path, tiny_dense: Path) -> None:
    assert resolve_space(None, read_anatomy(tiny_moe), True).name == "moe"
    assert resolve_space(None, read_anatomy(tiny_dense), True).name == "dense"
    assert resolve_space(None, read_anatomy(tiny_moe), False).name == "cpu"
    space = resolve_space("moe", read_anatomy(tiny_moe), True)
    space.pin("ctx", "32768")
    assert space.pinned == {"ctx": 32768} and "ctx" not in space.dimension_names()
    with pytest.raises(PlacetuneError, match="unknown parameter"):
        space.pin("warp", "9")


def test_params_to_placement_positions(tiny_shexp: Path) -> None:
    a = read_anatomy(tiny_shexp)  # layer 0 is dense: the MoE layers are 1..3
    first = to_placement({"cpu_moe_layers": 2, "cpu_moe_position": "first", "cpu_moe_kinds": "all"}, a)
    assert first.overrides[0].layers == (1, 2)
    last = to_placement({"cpu_moe_layers": 2, "cpu_moe_position": "last", "cpu_moe_kinds": "down"}, a)
    assert last.overrides[0].layers == (2, 3) and last.overrides[0].kinds == ("down",)
    block = to_placement({"cpu_moe_layers": 1, "cpu_moe_position": "block", "cpu_moe_start": 1,
                          "cpu_moe_kinds": "gate_up"}, a)
    assert block.overrides[0].layers == (2,)


def test_budgets_and_sizes() -> None:
    assert parse_budgets(["CUDA0=20GiB", "RPC0=64MiB,CPU=1.5G"]) == {
        "CUDA0": 20 * GIB, "RPC0": 64 * 2**20, "CPU": int(1.5 * GIB)}
    with pytest.raises(PlacetuneError, match="DEVICE=SIZE"):
        parse_budgets(["20GiB"])
    with pytest.raises(PlacetuneError, match="cannot read size"):
        parse_budgets(["CUDA0=lots"])


def test_kv_cache_prediction_is_exact_for_f16(tiny_moe: Path) -> None:
    a = read_anatomy(tiny_moe)
    f = a.facts
    need = predict_memory(a, Placement(n_gpu_layers=0), [], 4096)
    assert need["CPU"].kv == f.n_layers * 4096 * f.n_head_kv * (f.head_dim_k + f.head_dim_v) * 2


# ---- real searches -----------------------------------------------------------------------------

SEARCH_ARGS = ["--n-trials", "6", "-p", "16", "-n", "4", "-r", "2", "--warmups", "1", "--top-k", "2",
               "--set", "repack=false"]


def placetune(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from placetune.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "250"}, **kw)


def test_real_search_writes_all_three_files(tiny_moe: Path, tmp_path: Path) -> None:
    proc = placetune("search", str(tiny_moe), "--out", str(tmp_path), *SEARCH_ARGS)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    best_json = next(tmp_path.glob("*/*/best.json"))
    folder = best_json.parent
    best = json.loads(best_json.read_text())
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) >= 6 and (trials["state"] == "COMPLETE").any()
    assert best["measurement"]["status"] == "ok" and best["measurement"]["tg"]["median"] > 0
    assert best["machine"]["fingerprint"] and best["model"]["header_hash"]
    script = (folder / "best.sh").read_text()
    assert "llama-server" in script and str(tiny_moe.resolve()) in script
    assert "llama-server -m" in proc.stdout  # the winning line is printed


def test_sigkill_mid_study_then_resume(tiny_moe: Path, tmp_path: Path) -> None:
    args = ["search", str(tiny_moe), "--out", str(tmp_path), "--n-trials", "40", "-p", "256", "-n", "64",
            "-r", "3", "--warmups", "2", "--set", "repack=false", "--top-k", "1"]
    proc = subprocess.Popen([sys.executable, "-c", "from placetune.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    done = 0
    assert proc.stdout is not None
    for line in proc.stdout:  # each finished trial prints one "trial N ..." line
        done += line.startswith("trial ")
        if done >= 5:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    db = tmp_path / "placetune.db"
    assert done >= 5, "the search did not finish five trials before the kill"
    study_name = optuna.get_all_study_names(f"sqlite:///{db}")[0]
    before = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db}")
    snapshot = before.trials  # Study.trials reads storage on every access: keep the state at the kill
    kept = {t.number: t.values for t in snapshot if t.state.name == "COMPLETE"}
    assert len(snapshot) < 40

    again = placetune(*args)
    assert again.returncode == 0, again.stderr + again.stdout
    assert f"({len(snapshot)} trials so far)" in " ".join(again.stdout.split())
    after = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db}")
    assert {t.number: t.values for t in after.trials if t.number in kept} == kept
    assert not [t for t in after.trials if t.state.name == "RUNNING"]
    finished = [t for t in after.trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    assert len(finished) >= 40 and max(t.number for t in after.trials) >= len(snapshot)


def test_bad_storage_url_is_one_line(tiny_moe: Path, tmp_path: Path) -> None:
    proc = placetune("search", str(tiny_moe), "--storage", "nosuchdb://x", "--out", str(tmp_path), *SEARCH_ARGS)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot open storage" in proc.stderr
