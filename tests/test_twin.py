"""The machine twin: its model behaves like a machine, matches what it was calibrated on, and drives the search."""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from placetune.anatomy import read_anatomy
from placetune.memory import DEFAULT_MARGIN, check_fit
from placetune.placement import Placement, parse_flags
from placetune.runners import RUNNERS
from placetune.runners.base import Workload
from placetune.space import to_placement
from placetune.synth import preset_spec, tiny_spec, write_model
from placetune.twin.baselines import baselines, fit_params, fit_placement
from placetune.twin.calibration import calibrate
from placetune.twin.capacity import OK, OOM, SPILL, placetune_need
from placetune.twin.drive import run_search, space_for
from placetune.twin.grid import DESTINATIONS, REFERENCE_SPACE_MULTI, evaluate, reference_space
from placetune.twin.machine import GIB, MACHINES
from placetune.twin.model import SPILL_PP, speeds
from placetune.twin.runner import TwinRunner
from placetune.twin.scenarios import SCENARIOS, Scenario
from placetune.twin.shape import MODELS, TwinModel, anatomy_from_spec, model_shape
from placetune.twin.truth import judge

MODEL = Path("twin.gguf")  # the twin never opens the model file
CHAT = Workload(n_prompt=1024, n_gen=128, depth=0, repetitions=5, warmups=1)
QWEN = MODELS["qwen3-30b-a3b"]
EXPERTS_IN_RAM = parse_flags("-ngl 99 --n-cpu-moe 30 -ub 1024")


def small_scenario(model: TwinModel, gpu_gib: float, spill_gib: float = 0.0, workload: Workload = CHAT) -> Scenario:
    """A few-layer model on a card sized so that part of the reference space runs out of memory."""
    machine = replace(MACHINES["rtx5080-ddr5x2"], name="test", gpu_total_bytes=int(gpu_gib * GIB) + GIB,
                      gpu_free_bytes=int(gpu_gib * GIB), spill_bytes=int(spill_gib * GIB))
    return Scenario(f"test-{model.name}-{gpu_gib}", machine, model, workload, memory_seed=7, why="test")


def two_gpu_scenario(model: TwinModel, gpu_gib: tuple[float, float], spill_gib: float = 0.0,
                     workload: Workload = CHAT, second_bw_gbs: float | None = None) -> Scenario:
    """Two cards of the given free sizes (the second one's bandwidth optionally changed)."""
    base = MACHINES["rtx4090x2-ddr5x2"]
    second = replace(base.more_gpus[0], total_bytes=int(gpu_gib[1] * GIB) + GIB, free_bytes=int(gpu_gib[1] * GIB),
                     bw_gbs=second_bw_gbs or base.more_gpus[0].bw_gbs)
    machine = replace(base, name="test2", gpu_total_bytes=int(gpu_gib[0] * GIB) + GIB,
                      gpu_free_bytes=int(gpu_gib[0] * GIB), spill_bytes=int(spill_gib * GIB), more_gpus=(second,))
    return Scenario(f"test2-{model.name}-{gpu_gib}", machine, model, workload, memory_seed=7, why="test")


def test_anatomy_from_spec_is_what_placetune_reads_from_the_written_file(tmp_path: Path) -> None:
    spec = tiny_spec("gpt-oss", n_layers=3)
    written = read_anatomy(write_model(spec, tmp_path / "m.gguf"))
    built = anatomy_from_spec(spec)
    assert built.tensors == written.tensors
    assert built.facts == written.facts
    assert built.total_bytes == written.total_bytes


@pytest.mark.parametrize("field", ["ram_bw_gbs", "gpu_bw_gbs"])
def test_tg_grows_with_bandwidth(field: str) -> None:
    base = MACHINES["rtx5080-ddr5x2"]
    tgs = [speeds(model_shape(QWEN), EXPERTS_IN_RAM, CHAT, replace(base, **{field: getattr(base, field) * f})).tg
           for f in (0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in itertools.pairwise(tgs)), tgs


def test_pp_grows_with_pcie_bandwidth_and_ubatch_while_experts_are_in_ram() -> None:
    base = MACHINES["rtx5080-ddr5x2"]
    shape = model_shape(QWEN)
    by_pcie = [speeds(shape, EXPERTS_IN_RAM, CHAT, replace(base, pcie_gbs=g)).pp for g in (8.0, 16.0, 32.0, 64.0)]
    assert all(a < b for a, b in itertools.pairwise(by_pcie)), by_pcie
    # llama.cpp PR 15346: gpt-oss-20b with experts in RAM, 203 t/s at -ub 128 and 2090 t/s at -ub 2048
    oss20 = model_shape(TwinModel("gpt-oss-20b", preset_spec("gpt-oss-20b"), full_every=2, full_offset=1, window=128))
    by_ub = [speeds(oss20, parse_flags(f"-ngl 99 --cpu-moe -ub {ub}"), Workload(2048, 0), MACHINES["rtx3090-ddr5x2"]).pp
             for ub in (128, 256, 512, 1024, 2048)]
    assert all(a < b for a, b in itertools.pairwise(by_ub)), by_ub
    assert by_ub[-1] / by_ub[0] == pytest.approx(2090 / 203, rel=0.15)


def test_pinned_buffers_and_last_layers_help_prompt_processing_only() -> None:
    shape, machine = model_shape(QWEN), MACHINES["rtx5080-ddr5x2"]
    w = replace(CHAT, n_prompt=4096)
    mmap = speeds(shape, parse_flags("-ngl 99 --cpu-moe"), w, machine)
    pinned = speeds(shape, parse_flags("-ngl 99 --cpu-moe --no-mmap"), w, machine)
    assert 1.25 < pinned.pp / mmap.pp < 1.45  # PR 14990: +35-40% with experts in RAM
    assert pinned.tg == mmap.tg
    first = speeds(shape, parse_flags("-ngl 99 --n-cpu-moe 24 -ub 2048"), w, machine)
    last = speeds(shape, to_placement({"n_gpu_layers": 49, "cpu_moe_layers": 24, "cpu_moe_position": "last",
                                       "ubatch": 2048}, shape.anatomy), w, machine)
    assert 1.03 < last.pp / first.pp < 1.2  # ik_llama PR 2262: about +10%
    assert last.tg == pytest.approx(first.tg, rel=0.02)


def test_out_of_memory_above_capacity_and_the_spill_cliff() -> None:
    everything = parse_flags("-ngl 99")  # 17 GB of weights
    scenario = small_scenario(QWEN, gpu_gib=12)
    runner = TwinRunner(scenario, seed=0)
    m = runner.measure(MODEL, everything, CHAT)
    assert m.status == "oom" and "SIMULATED" in m.reason and not m.pp.samples
    assert runner.measure(MODEL, EXPERTS_IN_RAM, CHAT).status == "ok"
    assert judge(small_scenario(QWEN, gpu_gib=24), everything).state == OK
    # Past capacity by less than the driver spills: it runs, a tenfold slower prompt.
    spills = small_scenario(QWEN, gpu_gib=16, spill_gib=4)
    assert judge(spills, everything).state == SPILL
    ratio = judge(small_scenario(QWEN, gpu_gib=24), everything).speeds.pp / judge(spills, everything).speeds.pp
    assert ratio == pytest.approx(SPILL_PP)
    assert judge(small_scenario(QWEN, gpu_gib=10, spill_gib=4), everything).state == OOM


def test_hidden_error_makes_some_predicted_fits_run_out_of_memory() -> None:
    """Near the cliff the real allocation exceeds placetune's prediction: the search meets OOMs there."""
    scenario = SCENARIOS["qwen3-30b-16gb"]
    anatomy = model_shape(scenario.model).anatomy
    capacity = {"CUDA0": scenario.machine.gpu_free_bytes, "CPU": scenario.machine.ram_bytes}
    surprises = []
    for n in range(49):
        truth = judge(scenario, to_placement({"n_gpu_layers": 49, "cpu_moe_layers": n, "ubatch": 2048}, anatomy))
        assert truth.gpu_bytes > truth.need["CUDA0"].total  # this scenario's error adds to every prediction
        if check_fit(truth.need, capacity, DEFAULT_MARGIN).fits and truth.state == OOM:
            surprises.append(n)
    assert surprises and surprises == list(range(surprises[0], surprises[-1] + 1))  # a band at the cliff
    assert judge(scenario, to_placement({"n_gpu_layers": 49, "cpu_moe_layers": surprises[-1] + 4, "ubatch": 2048},
                                        anatomy)).state == OK


@pytest.mark.parametrize("row", calibrate(), ids=lambda r: r.label[:60])
def test_calibration_within_tolerance(row) -> None:
    assert row.ok, f"{row.label}: twin {row.simulated:.2f} vs published {row.published:.2f} ({row.source})"


def test_seed_004_consistency_gain_of_a_faster_gpu() -> None:
    """Seed 004's formula: a 5090 instead of a 3090 gains about 12% with Kimi K2's experts in RAM; so does the twin."""
    rows = {r.label: r for r in calibrate() if r.kind == "consistency"}
    gain = (rows["kimi-k2 rtx5090 experts in RAM: roofline (efficiency 1, no fixed costs)"].simulated
            / rows["kimi-k2 rtx3090 experts in RAM: roofline (efficiency 1, no fixed costs)"].simulated)
    assert gain == pytest.approx(36.0 / 32.2, rel=0.05)


@pytest.mark.parametrize(("model", "gpu_gib", "spill_gib"), [
    (TwinModel("glm-5l", preset_spec("glm-4.5-air", n_layers=5)), 6.0, 1.0),  # leading dense layer, shared experts
    (replace(MODELS["gpt-oss-120b"], name="oss-4l", spec=preset_spec("gpt-oss-120b", n_layers=4)), 5.0, 0.0),
])
def test_vectorised_grid_equals_the_scalar_model(model: TwinModel, gpu_gib: float, spill_gib: float) -> None:
    workload = Workload(n_prompt=1024, n_gen=64, depth=2048)
    scenario = small_scenario(model, gpu_gib, spill_gib, workload)
    shape = model_shape(model)
    grid = evaluate(shape, scenario.machine, workload, scenario.n_ctx, scenario.hidden_error)
    rng = random.Random(0)
    states = set()
    for _ in range(150):
        ngl = rng.randrange(len(grid.latency))
        index = tuple(rng.randrange(d) for d in grid.latency[ngl].shape)
        truth = judge(scenario, to_placement(grid.params((ngl, *index)), shape.anatomy))
        states.add(truth.state)
        expected = truth.latency(workload)
        got = float(grid.latency[ngl][index])
        assert (math.isinf(got), got) == (math.isinf(expected), pytest.approx(expected, rel=1e-9))
    assert states == ({OK, OOM, SPILL} if spill_gib else {OK, OOM})
    best, params = grid.optimum()
    assert judge(scenario, to_placement(params, shape.anatomy)).latency(workload) == pytest.approx(best)


def test_noise_is_lognormal_around_the_model_with_rare_slow_outliers() -> None:
    scenario = SCENARIOS["qwen3-30b-16gb"]
    truth = judge(scenario, EXPERTS_IN_RAM, CHAT).speeds
    runner = TwinRunner(scenario, seed=3, reuse=False)
    pp, tg, loads = [], [], []
    for _ in range(200):
        m = runner.measure(MODEL, EXPERTS_IN_RAM, CHAT)
        pp += m.pp.samples
        tg += m.tg.samples
        loads.append(m.load_s)
    machine = scenario.machine
    log_tg = np.log(np.array(tg) / truth.tg)
    assert abs(np.median(log_tg)) < 0.01
    core = log_tg[log_tg > np.log(0.9)]  # outliers are at least 10% slow
    assert np.std(core) == pytest.approx(math.hypot(machine.tg_sigma, machine.load_sigma), rel=0.2)
    slow = np.mean(np.array(pp) / truth.pp < 0.87)
    assert 0.5 * machine.outlier_rate < slow < 2 * machine.outlier_rate
    assert all(x > 0 for x in pp + tg)
    assert loads[0] > loads[1] > 0  # the first load also reads the file from disk


def test_runner_keeps_a_model_loaded_and_times_out_like_llama_cpp() -> None:
    scenario = SCENARIOS["qwen3-30b-16gb"]
    runner = TwinRunner(scenario, seed=0)
    assert runner.name == "twin" and runner.name not in RUNNERS  # never offered by --runner
    first = runner.measure(MODEL, EXPERTS_IN_RAM, CHAT)
    knob = runner.measure(MODEL, replace(EXPERTS_IN_RAM, ubatch=512, threads=8), CHAT)
    moved = runner.measure(MODEL, replace(EXPERTS_IN_RAM, n_gpu_layers=40), CHAT)
    assert first.load_s > 0 and knob.load_s == 0 and moved.load_s > 0
    assert runner.clock_s == pytest.approx(first.wall_s + knob.wall_s + moved.wall_s)
    assert first.wall_s > first.load_s + first.measure_s
    slow = runner.measure(MODEL, parse_flags("-ngl 0"), replace(CHAT, n_prompt=8192, timeout_s=60))
    assert slow.status == "timeout" and slow.wall_s > 60


def test_baselines_and_fit_seed() -> None:
    scenario = SCENARIOS["qwen3-30b-16gb"]
    by_name = {b.name.split(" (")[0]: b for b in baselines(scenario)}
    assert set(by_name) == {"--cpu-moe", "best --n-cpu-moe", "--fit"}
    assert by_name["best --n-cpu-moe"].latency_s < by_name["--cpu-moe"].latency_s
    fit = fit_params(scenario)
    assert fit["cpu_moe_position"] == "last" and 0 < fit["cpu_moe_layers"] < 48
    truth = judge(scenario, to_placement(fit, model_shape(scenario.model).anatomy))
    assert truth.state == OK and truth.gpu_bytes <= scenario.machine.gpu_free_bytes - GIB


def test_a_short_search_on_the_twin_completes() -> None:
    model = TwinModel("qwen-8l", preset_spec("qwen3-30b-a3b", n_layers=8))
    scenario = small_scenario(model, gpu_gib=2.5, workload=replace(CHAT, repetitions=2, warmups=0))
    run = run_search(scenario, seed=1, n_trials=8)
    assert len(run.trials) == 8 and any(t.state == "COMPLETE" for t in run.trials)
    assert run.clock_s >= run.trials[-1].clock_s > 0
    # The reference space holds the search space (interleaved sets aside, which the twin never makes faster than
    # the block ending at the same layer): no winner beats the exhaustive optimum.
    shape = model_shape(model)
    optimum, _ = evaluate(shape, scenario.machine, scenario.workload, scenario.n_ctx, scenario.hidden_error).optimum()
    winner = judge(scenario, Placement.from_dict(run.winner)).latency(scenario.workload)
    assert optimum <= winner < math.inf


def test_bench_writes_its_table_json_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from placetune.twin import bench

    args = ["--out", str(tmp_path), "--scenarios", "qwen3-30b-16gb", "--seeds", "2", "--trials", "6", "--jobs", "1"]
    monkeypatch.setattr("sys.argv", ["bench", *args])
    bench.main()
    table = (tmp_path / "twin.md").read_text()
    assert "SIMULATED" in table and "| qwen3-30b-16gb |" in table and "seed0-gpu-pp" in table
    assert "Is the named winner real?" in table
    data = json.loads((tmp_path / "twin.json").read_text())
    runs = data["scenarios"][0]["runs"]
    assert len(runs) == 2 and all(0 < r["quality"] <= 1 and len(r["curve"]) == 6 for r in runs)
    assert data["scenarios"][0]["summary"]["judged_runs"] == 2
    assert (tmp_path / "twin.png").stat().st_size > 10_000
    monkeypatch.setattr("sys.argv", ["bench", *args, "--seeds", "1", "--compare", str(tmp_path / "twin.json")])
    bench.main()
    assert "qwen3-30b-16gb: median" in capsys.readouterr().out


@pytest.mark.parametrize("seed", [0, 1])
def test_the_staged_search_finds_the_optimum_of_a_48_layer_moe_in_40_trials(seed: int) -> None:
    """issue 17's target on its hardest scenario: ubatch, which expert tensors and how many share 16 GB."""
    scenario = SCENARIOS["qwen3-30b-16gb"]
    shape = model_shape(scenario.model)
    optimum, _ = evaluate(shape, scenario.machine, scenario.workload, scenario.n_ctx, scenario.hidden_error).optimum()
    run = run_search(scenario, seed=seed, n_trials=40)
    winner = judge(scenario, Placement.from_dict(run.winner)).latency(scenario.workload)
    assert optimum / winner >= 0.95
    assert sum(not t.duplicate for t in run.trials) == 40
    predicted_out = [t for t in run.trials if t.reason.startswith("predicted not to fit")]
    assert len(predicted_out) <= 2  # the walk proposes only what the memory model says fits (seeds may not)


def test_op_offload_threshold_moves_prompt_speed_only_below_it() -> None:
    """GGML_OP_OFFLOAD_MIN_BATCH (PR 18535): a ubatch below it multiplies the experts in RAM on the CPU."""
    shape, machine = model_shape(QWEN), MACHINES["rtx5080-ddr5x2"]
    w = replace(CHAT, n_prompt=4096)

    def at(ub: int, threshold: int | None) -> tuple[float, float]:
        env = () if threshold is None else (("GGML_OP_OFFLOAD_MIN_BATCH", str(threshold)),)
        s = speeds(shape, replace(parse_flags(f"-ngl 99 --n-cpu-moe 30 -ub {ub}"), env=env), w, machine)
        return s.pp, s.tg

    assert at(256, None) == at(256, 32) == at(256, 256)  # the default is 32; a ubatch of 256 reaches 256
    below, offloaded = at(256, 512), at(256, 32)
    assert below[0] < 0.75 * offloaded[0] and below[1] == offloaded[1]  # the CPU multiplies slower; tg is batch 1
    assert below[0] == pytest.approx(speeds(shape, parse_flags("-ngl 99 --n-cpu-moe 30 -ub 256 --no-op-offload"), w,
                                            machine).pp)
    assert at(1024, 512) == at(1024, 32)  # every ubatch of the prompt reaches either threshold
    # and the memory model reserves no copies of RAM-resident weights for a threshold above the ubatch
    placement = parse_flags("-ngl 99 --n-cpu-moe 30 -ub 256")
    copies = placetune_need(shape.anatomy, placement, 4096)["CUDA0"].compute
    above = replace(placement, env=(("GGML_OP_OFFLOAD_MIN_BATCH", "512"),))
    assert placetune_need(shape.anatomy, above, 4096)["CUDA0"].compute < copies
    assert placetune_need(shape.anatomy, above, 4096) == placetune_need(shape.anatomy, replace(
        placement, no_op_offload=True), 4096)


def test_two_gpus_memory_and_out_of_memory_per_card() -> None:
    """Each card: placetune's prediction for it plus the hidden error; one card over its capacity fails the load."""
    placement = parse_flags("-ngl 99 -ts 1,1")
    roomy = two_gpu_scenario(QWEN, (24.0, 24.0))
    truth = judge(roomy, placement)
    error = roomy.hidden_error
    assert truth.state == OK and set(truth.device_bytes) == {"CUDA0", "CUDA1"}
    for dev, used in truth.device_bytes.items():
        need = truth.need[dev]
        assert need.weights > GIB
        assert used == need.weights + need.kv + round(need.compute * error.compute_scale) + error.extra_bytes
    # the weights split as -ts says: half the layers on each card (the output head on the second)
    assert truth.need["CUDA0"].weights == pytest.approx(truth.need["CUDA1"].weights, rel=0.1)
    for small in (0, 1):
        sizes = [24.0, 24.0]
        sizes[small] = (truth.device_bytes[f"CUDA{small}"] - GIB) / GIB  # a GiB short on one card only
        scenario = two_gpu_scenario(QWEN, (sizes[0], sizes[1]))
        assert judge(scenario, placement).state == OOM
        m = TwinRunner(scenario, seed=0).measure(MODEL, placement, CHAT)
        assert m.status == "oom" and m.reason.startswith(f"CUDA{small}: out of memory")
        # moving layers off the short card makes it load
        lighter = replace(placement, tensor_split=(1.0, 3.0) if small == 0 else (3.0, 1.0))
        assert judge(scenario, lighter).state == OK
    spills = two_gpu_scenario(QWEN, ((truth.device_bytes["CUDA0"] - GIB) / GIB, 24.0), spill_gib=2.0)
    assert judge(spills, placement).state == SPILL


def test_tg_grows_with_the_second_cards_bandwidth() -> None:
    placement = parse_flags("-ngl 99 -ts 1,1 --n-cpu-moe 20")
    shape = model_shape(QWEN)
    runs = [speeds(shape, placement, CHAT, two_gpu_scenario(QWEN, (24.0, 24.0), second_bw_gbs=bw).machine)
            for bw in (250.0, 500.0, 1000.0, 2000.0)]
    assert all(a.tg < b.tg for a, b in itertools.pairwise(runs)), [r.tg for r in runs]
    assert len({r.pp for r in runs}) == 1  # prompt speed is compute and PCIe, not memory bandwidth
    # a card that holds no layer does not matter
    first_only = replace(placement, tensor_split=(1.0, 0.0))
    assert len({speeds(shape, first_only, CHAT, two_gpu_scenario(QWEN, (24.0, 24.0), second_bw_gbs=bw).machine).tg
                for bw in (250.0, 2000.0)}) == 1


@pytest.mark.parametrize(("model", "gpu_gib", "spill_gib"), [
    (TwinModel("glm-6l", preset_spec("glm-4.5-air", n_layers=6)), (3.0, 4.0), 0.5),
    (replace(MODELS["gpt-oss-120b"], name="oss-5l", spec=preset_spec("gpt-oss-120b", n_layers=5)), (2.5, 3.0), 0.0),
])
def test_two_gpu_grid_equals_the_scalar_model(model: TwinModel, gpu_gib: tuple[float, float], spill_gib: float) -> None:
    workload = Workload(n_prompt=1024, n_gen=64, depth=2048)
    scenario = two_gpu_scenario(model, gpu_gib, spill_gib, workload, second_bw_gbs=700.0)
    assert reference_space(scenario.machine) == REFERENCE_SPACE_MULTI
    shape = model_shape(model)
    devices = scenario.machine.devices
    grid = evaluate(shape, scenario.machine, workload, scenario.n_ctx, scenario.hidden_error)
    rng = random.Random(0)
    states, loaded_to = set(), set()
    for _ in range(200):
        ngl = rng.randrange(len(grid.latency))
        index = tuple(rng.randrange(d) for d in grid.latency[ngl].shape)
        params = grid.params((ngl, *index))
        truth = judge(scenario, to_placement(params, shape.anatomy, devices))
        states.add(truth.state)
        if truth.state != OOM and params["cpu_moe_layers"]:
            loaded_to.add(params["experts_to"])
        expected = truth.latency(workload)
        got = float(grid.latency[ngl][index])  # float32 on several cards
        assert (math.isinf(got), got) == (math.isinf(expected), pytest.approx(expected, rel=1e-5))
    assert states == ({OK, OOM, SPILL} if spill_gib else {OK, OOM})
    assert loaded_to == set(DESTINATIONS)  # experts to RAM and to the next card both load somewhere
    best, params = grid.optimum()
    assert judge(scenario, to_placement(params, shape.anatomy, devices)).latency(workload) == pytest.approx(best,
                                                                                                           rel=1e-5)


def test_two_gpu_fit_fills_the_first_card_with_whole_layers() -> None:
    """llama.cpp's --fit on two cards (common/fit.cpp): -ts counts layers, the first card's are whole, the last
    card's trailing layers keep their experts in RAM, and every card keeps 1 GiB free."""
    scenario = SCENARIOS["glm-4.5-air-2x24gb"]
    shape = model_shape(scenario.model)
    fit = fit_placement(scenario)
    assert fit.n_gpu_layers == 999 and sum(fit.tensor_split) == shape.n_layers + 1
    first = int(fit.tensor_split[0])
    (rule,) = fit.overrides
    assert rule.buft == "CPU" and min(rule.layers) > first and max(rule.layers) == shape.n_layers - 1
    assert list(rule.layers) == list(range(min(rule.layers), shape.n_layers))
    truth = judge(scenario, fit)
    assert truth.state == OK
    assert all(truth.device_bytes[d] <= g.free_bytes - GIB for d, g in zip(scenario.machine.devices,
                                                                         scenario.machine.gpus, strict=True))
    names = [b.name.split(" (")[0] for b in baselines(scenario)]
    assert names == ["--cpu-moe", "best --n-cpu-moe", "best per-card -ot", "--fit"]


def test_a_search_on_two_twin_gpus_splits_layers_between_them() -> None:
    """The search picks search_spaces/multi.toml itself when the machine lists two CUDA devices."""
    model = TwinModel("qwen-8l", preset_spec("qwen3-30b-a3b", n_layers=8))
    scenario = two_gpu_scenario(model, (1.5, 1.5), workload=replace(CHAT, repetitions=2, warmups=0))
    run = run_search(scenario, seed=1, n_trials=12)
    assert len(run.trials) == 12 and any(t.state == "COMPLETE" for t in run.trials)
    shape = model_shape(model)
    assert space_for(shape.anatomy, scenario.machine.devices).name == "multi"
    points = [Placement.from_dict(t.placement) for t in run.trials if t.placement and t.placement["env"]]
    assert points and all(p.tensor_split and p.split_mode == "layer" for p in points)  # split_first, -ts
    optimum, _ = evaluate(shape, scenario.machine, scenario.workload, scenario.n_ctx, scenario.hidden_error).optimum()
    winner = judge(scenario, Placement.from_dict(run.winner)).latency(scenario.workload)
    assert optimum <= winner * (1 + 1e-5) and winner < math.inf
