"""The `placetune` command line. It parses arguments and calls the pipeline modules, nothing more."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from placetune.errors import PlacetuneError
from placetune.escape import one_line
from placetune.runners import default_runner

app = typer.Typer(
    name="placetune",
    help="Measure, don't guess: find the fastest llama.cpp tensor placement for this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (logs, CI) gets room for the tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="GGUF model (first shard of a split model is enough).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the anatomy as a JSON document.")] = False,
) -> None:
    """Model facts, every tensor's group, and bytes per layer, read from the GGUF header only."""
    from placetune.anatomy import read_anatomy
    from placetune.views import anatomy_table

    anatomy = read_anatomy(model)
    if as_json:
        typer.echo(json.dumps(anatomy.to_dict(), indent=2))
    else:
        anatomy_table(anatomy, console)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Where to write the .gguf file.")],
    like: Annotated[
        str | None, typer.Option(help="Shape clone of a preset (qwen3-30b-a3b, ...) or of another .gguf file.")
    ] = None,
    arch: Annotated[str, typer.Option(help="llama (dense), qwen3moe (MoE), glm4moe (shared experts).")] = "qwen3moe",
    layers: Annotated[int | None, typer.Option(help="Number of layers (with --like: keep the first N).")] = None,
    embd: Annotated[int | None, typer.Option(help="Embedding size.")] = None,
    experts: Annotated[int | None, typer.Option(help="Routed experts per layer.")] = None,
    experts_used: Annotated[int | None, typer.Option(help="Experts used per token.")] = None,
    expert_ff: Annotated[int | None, typer.Option(help="FFN size of one expert.")] = None,
    quant: Annotated[str | None, typer.Option(help="Weight type: f16, q8_0 or q4_0.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
) -> None:
    """Write a valid GGUF model with random weights and a small tokenizer that llama.cpp runs.

    The weights are random, so expert routing is roughly uniform: a clone measures placement
    speed faithfully, not output quality.
    """
    from placetune import synth as gen
    from placetune.units import human_bytes

    overrides = {
        k: v
        for k, v in {"n_embd": embd, "n_expert": experts, "n_expert_used": experts_used, "n_ff_exp": expert_ff}.items()
        if v is not None
    }
    if like is not None:
        if overrides:
            raise PlacetuneError("--like copies every shape; drop --embd/--experts/--experts-used/--expert-ff")
        source = gen.spec_like_gguf(like, layers) if like.endswith(".gguf") else gen.preset_spec(like, layers, quant)
    else:
        source = gen.tiny_spec(arch, n_layers=layers or 4, quant=quant or "q8_0", seed=seed, **overrides)
    path = gen.write_model(source, out)
    console.print(f"wrote {path} ({human_bytes(path.stat().st_size)})")


RunnerOpt = Annotated[str | None, typer.Option("--runner", help="embedded (llama-cpp-python), llama-bench or llama-server (default: llama-bench with --llama-bin-dir or without llama-cpp-python, else embedded).")]
BinDirOpt = Annotated[Path | None, typer.Option("--llama-bin-dir", help="Directory holding llama-bench/llama-server.")]
RpcOpt = Annotated[str | None, typer.Option("--rpc", help="RPC servers HOST:PORT[,HOST:PORT] (devices RPC0, ...).")]
PromptOpt = Annotated[int, typer.Option("--prompt-tokens", "-p", help="Prompt tokens per pp test.")]
GenOpt = Annotated[int, typer.Option("--gen-tokens", "-n", help="Generated tokens per tg test.")]
DepthOpt = Annotated[int, typer.Option("--depth", "-d", help="Tokens already in the KV cache (llama-bench -d).")]
RepsOpt = Annotated[int, typer.Option("--reps", "-r", help="Timed repetitions.")]
WarmOpt = Annotated[int, typer.Option("--warmups", help="Untimed warm-up passes before the repetitions.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds before one llama.cpp run is killed.")]


def _rpc_list(rpc: str | None) -> list[str]:
    from placetune.hardware import rpc_endpoints

    return rpc_endpoints(rpc)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="GGUF model.")],
    runner: RunnerOpt = None,
    placement_file: Annotated[
        Path | None, typer.Option("--placement", help="A placement JSON (or a best.json) instead of flags.")
    ] = None,
    prompt_tokens: PromptOpt = 512,
    gen_tokens: GenOpt = 128,
    depth: DepthOpt = 0,
    reps: RepsOpt = 5,
    warmups: WarmOpt = 3,
    timeout: TimeoutOpt = 900.0,
    llama_bin_dir: BinDirOpt = None,
    rpc: RpcOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the Measurement as JSON.")] = False,
) -> None:
    """Measure one placement, given as the llama.cpp flags you use today after `--`.

    Example: placetune bench model.gguf -- -ngl 99 --n-cpu-moe 20 -fa on -ub 2048
    """
    from placetune.anatomy import read_anatomy
    from placetune.hardware import probe_machine
    from placetune.memory import predict_memory
    from placetune.placement import check_buffer_types, parse_flags
    from placetune.results import load_placement
    from placetune.runners import get_runner
    from placetune.runners.base import Workload
    from placetune.views import measurement_table, placement_table

    anatomy = read_anatomy(model)
    if placement_file is not None and ctx.args:
        raise PlacetuneError("give the placement either as --placement FILE or as flags after --, not both")
    workload_flags = sorted({"-p", "-n", "-r", "-d", "--repetitions", "-m", "--model"} & set(ctx.args))
    if workload_flags:
        raise PlacetuneError(f"{', '.join(workload_flags)} after -- would be ignored: the model and the workload are "
                             "placetune's own options, before --, e.g. placetune bench MODEL -p 4096 -n 64 -- -ngl 99")
    rpc_servers = _rpc_list(rpc)
    placement = load_placement(placement_file) if placement_file else parse_flags(ctx.args, rpc=rpc_servers)
    workload = Workload(prompt_tokens, gen_tokens, depth, reps, warmups, timeout)
    runner = default_runner(runner, llama_bin_dir)
    machine = probe_machine(rpc_servers, runner, llama_bin_dir)  # the devices this runner's llama.cpp fills
    check_buffer_types(placement, machine.override_targets)
    measurer = get_runner(runner, bin_dir=llama_bin_dir, rpc=rpc_servers)
    if not as_json:
        console.print(f"measuring with {runner}: {' '.join(ctx.args) or '(llama.cpp defaults)'}", highlight=False)
    m = measurer.measure(model, placement, workload)
    if as_json:
        typer.echo(json.dumps({"placement": placement.to_dict(), "workload": workload.to_dict(),
                               "measurement": m.to_dict()}, indent=2))
    else:
        measurement_table(m, workload, console)
        devices = [d.name for d in machine.accelerators]
        # the context each runner gives llama.cpp: llama-bench sizes one per test, the largest being pp's
        n_ctx = (depth + prompt_tokens if runner == "llama-bench"
                 else max(placement.ctx or 0, depth + prompt_tokens + gen_tokens))
        need = predict_memory(anatomy, placement, devices, n_ctx, n_seq=placement.parallel or 1)
        placement_table(anatomy, placement, devices, m.reported, console, need)
    if not m.ok:
        raise typer.Exit(1)


@app.command()
def hw(
    rpc: RpcOpt = None,
    runner: RunnerOpt = None,
    llama_bin_dir: BinDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the machine record as JSON.")] = False,
) -> None:
    """CPU, RAM, NVIDIA GPUs and the devices llama.cpp sees: the fingerprint every result carries.

    The devices and the build are those of the runner: llama-cpp-python's, or your llama-bench/llama-server's.
    """
    from placetune.hardware import probe_machine
    from placetune.views import machine_table

    machine = probe_machine(_rpc_list(rpc), default_runner(runner, llama_bin_dir), llama_bin_dir)
    if as_json:
        typer.echo(json.dumps(machine.to_dict(), indent=2))
    else:
        machine_table(machine, console)


@app.command()
def search(
    model: Annotated[Path, typer.Argument(help="GGUF model to place.")],
    objective: Annotated[str, typer.Option(help="latency (time of a typical request), tg, pp, or pareto.")] = "latency",
    strategy: Annotated[str, typer.Option(help="staged (a walk along the memory frontier from llama.cpp's defaults, then TPE) or tpe.")] = "staged",
    n_trials: Annotated[int, typer.Option("--n-trials", help="Trials in the study (a resumed study counts its own; a placement proposed again is not counted).")] = 30,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Stop starting trials after this many seconds.")] = None,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    space: Annotated[str | None, typer.Option(help="Search space: moe, dense, cpu or a .toml file (default: by model and hardware).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Pin a parameter, e.g. --set ubatch=512 (repeatable).")] = None,
    budget: Annotated[list[str] | None, typer.Option("--budget", help="Memory budget per device, e.g. CUDA0=20GiB or RPC0=64MiB.")] = None,
    min_pp: Annotated[float | None, typer.Option("--min-pp", help="Constraint: prompt processing of at least this many t/s.")] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", "-c", help="Serving context the placement is sized, measured and exported for (default: 8192, or the model's training context if smaller).")] = None,
    slots: Annotated[int, typer.Option("--slots", help="llama-server slots (-np) sharing the serving context.")] = 1,
    prompt_tokens: PromptOpt = 512,
    gen_tokens: GenOpt = 128,
    depth: DepthOpt = 0,
    reps: RepsOpt = 5,
    warmups: WarmOpt = 3,
    trial_timeout: Annotated[float, typer.Option("--trial-timeout", help="Seconds before one llama.cpp run is killed.")] = 900.0,
    runner: RunnerOpt = None,
    llama_bin_dir: BinDirOpt = None,
    rpc: RpcOpt = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: sqlite:///<out>/placetune.db); postgresql://USER:PASS@HOST/DB lets workers on several hosts share one study.")] = None,
    study_name: Annotated[str | None, typer.Option("--study-name", help="Default: model, header hash, machine fingerprint, objective.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Results root; files go to OUT/<model>/<machine>/.")] = Path("results"),
    top_k: Annotated[int, typer.Option("--top-k", help="Best trials that meet the baselines in the final round.")] = 3,
    final_rounds: Annotated[int, typer.Option("--final-rounds", help="Interleaved rounds of the final re-measure.")] = 2,
    no_screen: Annotated[bool, typer.Option("--no-screen", help="Give every trial all its repetitions.")] = False,
    heartbeat: Annotated[int, typer.Option("--heartbeat", min=1, help="Seconds between a worker's heartbeats in the storage.")] = 60,
    grace: Annotated[int | None, typer.Option("--grace", min=1, help="Seconds without a heartbeat before a worker's trial is failed and retried (default: 3 x --heartbeat).")] = None,
    allow_mixed_hardware: Annotated[bool, typer.Option("--allow-mixed-hardware", help="Join a study measured on another machine fingerprint (each trial records its own).")] = False,
    allow_colocated_workers: Annotated[bool, typer.Option("--allow-colocated-workers", help="Allow a second worker of the study on this host (only with CPU cores and devices isolated per worker).")] = False,
) -> None:
    """Search placements and knobs with real measurements; write the best as flags and a llama-server line.

    Running the same command again resumes the study: finished trials are kept.
    """
    import optuna

    from placetune.anatomy import read_anatomy
    from placetune.budgets import parse_budgets
    from placetune.hardware import probe_machine
    from placetune.results import results_dir, write_results
    from placetune.runners import get_runner
    from placetune.runners.base import Workload
    from placetune.search import Search, SearchConfig, serving_for
    from placetune.search.loop import best_record
    from placetune.space import resolve_space
    from placetune.views import SearchProgress, search_summary

    if slots < 1:
        raise PlacetuneError(f"--slots must be at least 1, got {slots}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial is reported on the progress line
    anatomy = read_anatomy(model)
    workload = Workload(prompt_tokens, gen_tokens, depth, reps, warmups, trial_timeout)
    serving = serving_for(anatomy, workload, ctx, slots)
    rpc_servers = _rpc_list(rpc)
    runner = default_runner(runner, llama_bin_dir)
    machine = probe_machine(rpc_servers, runner, llama_bin_dir)
    budgets = parse_budgets(budget or [], [d.name for d in machine.llama_devices])
    accelerators = [d.name for d in machine.accelerators]
    chosen = resolve_space(space, anatomy, accelerators)
    space_notes = chosen.for_devices(accelerators)
    _pin(chosen, set_ or [])
    progress = SearchProgress(console)
    config = SearchConfig(
        model=model.resolve(), anatomy=anatomy, machine=machine, space=chosen, workload=workload, serving=serving,
        objective=objective, strategy=strategy, n_trials=n_trials, timeout_s=timeout, seed=seed,
        storage=storage or f"sqlite:///{(out / 'placetune.db').resolve()}", study_name=study_name,
        budgets=budgets, min_pp=min_pp, top_k=top_k, final_rounds=final_rounds, screen=not no_screen,
        rpc=rpc_servers, runner_name=runner, bin_dir=llama_bin_dir, heartbeat_s=heartbeat, grace_s=grace,
        allow_mixed_hardware=allow_mixed_hardware, allow_colocated=allow_colocated_workers, on_note=progress.note,
    )
    out.mkdir(parents=True, exist_ok=True)
    measurer = get_runner(runner, bin_dir=llama_bin_dir, rpc=rpc_servers, reuse=True)
    folder = results_dir(out, model.stem, machine.short_name())
    try:
        engine = Search(config, measurer, on_trial=progress.update)
        console.print(
            f"[bold]placetune search[/] {escape(model.name)}: space {chosen.name}, objective {objective}, runner "
            f"{runner}, serving -c {serving.ctx} -np {serving.slots}, study {escape(engine.study.study_name)} "
            f"({len(engine.study.trials)} trials so far)", highlight=False)
        for note in [*space_notes, *engine.notes, *engine.enqueue_seeds()]:
            progress.note(note)
        with progress.running(engine):
            engine.run()
        if engine.stop_requested:
            progress.note("stopped after the current trial; run the same command again to resume")
        decision = engine.final_measure(on_measured=progress.final)
    except KeyboardInterrupt:
        if "engine" in locals():
            write_results(folder, engine.study, None)
        err_console.print("placetune: interrupted; the trial in progress is measured again when you run the same "
                          "command to resume (finished trials are kept)", highlight=False, markup=False)
        raise typer.Exit(130) from None
    finally:
        if hasattr(measurer, "close"):
            measurer.close()
    if decision is None:
        write_results(folder, engine.study, None)
        raise PlacetuneError(engine.no_winner_reason())
    record = best_record(engine, decision)
    paths = write_results(folder, engine.study, record)
    search_summary(record, console)
    for kind, path in paths.items():
        console.print(f"{kind:>7}: {path}", highlight=False, markup=False)


@app.command()
def shootout(
    model: Annotated[Path, typer.Argument(help="GGUF model.")],
    budget: Annotated[list[str] | None, typer.Option("--budget", help="Memory per device for every contender, e.g. CUDA0=12GiB (a CUDA card's rest is held back).")] = None,
    depth: Annotated[str, typer.Option("--depth", help="Context depths, one workload each, e.g. 0,4096,32768.")] = "0",
    best: Annotated[Path | None, typer.Option("--best", help="placetune's winner from this best.json (or results folder).")] = None,
    search_minutes: Annotated[float | None, typer.Option("--search-minutes", help="Run placetune's search here for this long and use its winner.")] = None,
    line: Annotated[list[str] | None, typer.Option("--line", help="Your own contender: NAME='FLAGS' (repeatable).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Pin a parameter of the --search-minutes search, e.g. --set repack=false (repeatable).")] = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved rounds per depth.")] = 2,
    ctx: Annotated[int | None, typer.Option("--ctx", "-c", help="Serving context (default: covers the largest depth).")] = None,
    prompt_tokens: PromptOpt = 512,
    gen_tokens: GenOpt = 128,
    reps: RepsOpt = 5,
    warmups: WarmOpt = 3,
    timeout: TimeoutOpt = 900.0,
    runner: RunnerOpt = None,
    llama_bin_dir: BinDirOpt = None,
    rpc: RpcOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for shootout.md and shootout.jsonl (default: results/shootout/<model>).")] = Path(),
    resume: Annotated[bool, typer.Option("--resume", help="Keep the measurements already in OUT/shootout.journal.jsonl (same model, workload, budgets, runner and machine) and take only the rest.")] = False,
) -> None:
    """placetune's winner against llama.cpp's own answers (--fit, llama-fit-params, --cpu-moe, the best
    --n-cpu-moe N first and last) and your lines, interleaved, on equal memory, with intervals.

    Every measurement is journaled as it is taken: after a stop, add --resume to go on where it stopped."""
    from placetune import shootout as so
    from placetune.anatomy import read_anatomy
    from placetune.budgets import parse_budgets
    from placetune.hardware import probe_machine
    from placetune.placement import check_buffer_types
    from placetune.results import load_best
    from placetune.runners import get_fit_runner, get_runner
    from placetune.runners.base import Workload
    from placetune.search import serving_for

    if rounds < 1:
        raise PlacetuneError(f"--rounds must be at least 1, got {rounds}")
    try:
        depths = tuple(sorted({int(d) for d in depth.split(",") if d.strip()}))
    except ValueError:
        raise PlacetuneError(f"--depth {depth!r}: give whole numbers separated by commas, e.g. 0,4096") from None
    if not depths or depths[0] < 0:
        raise PlacetuneError(f"--depth {depth!r}: give depths of 0 or more, e.g. 0,4096")
    if best is not None and search_minutes is not None:
        raise PlacetuneError("give placetune's winner either as --best or by --search-minutes, not both")
    if search_minutes is not None and not search_minutes > 0:
        raise PlacetuneError(f"--search-minutes must be more than 0, got {search_minutes:g}")
    if set_ and search_minutes is None:
        raise PlacetuneError("--set pins a parameter of the search that --search-minutes runs; give --search-minutes, "
                             "or write the knob into a --line")
    anatomy = read_anatomy(model)
    workload = Workload(prompt_tokens, gen_tokens, 0, reps, warmups, timeout)
    serving = serving_for(anatomy, replace(workload, depth=depths[-1]), ctx)
    rpc_servers = _rpc_list(rpc)
    lines = [so.parse_line(text, rpc_servers) for text in line or []]
    names = [name for name, _ in lines]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise PlacetuneError(f"--line names {', '.join(map(repr, twice))} more than once; give each line its own name")
    runner = default_runner(runner, llama_bin_dir)
    machine = probe_machine(rpc_servers, runner, llama_bin_dir)
    budgets = parse_budgets(budget or [], [d.name for d in machine.llama_devices])
    for _, placement in lines:
        check_buffer_types(placement, machine.override_targets)
    folder = out if out != Path() else Path("results") / "shootout" / model.stem
    margins = so.fit_params_margins(machine, budgets, so.held_devices(machine, budgets))
    config = so.ShootoutConfig(
        model=model.resolve(), anatomy=anatomy, machine=machine, workload=workload, depths=depths, serving=serving,
        runner=get_runner(runner, bin_dir=llama_bin_dir, rpc=rpc_servers),
        fit_runner=get_fit_runner(runner, bin_dir=llama_bin_dir, rpc=rpc_servers, margins_mib=margins),
        budgets=budgets, rpc=rpc_servers, bin_dir=llama_bin_dir, rounds=rounds, lines=lines,
        journal=folder / so.JOURNAL, resume=resume)
    if best is not None:
        config.winner = ("placetune's winner (best.json)", serving.apply(load_best(best).placement))
        check_buffer_types(config.winner[1], machine.override_targets)
    elif search_minutes is not None:
        config.winner = _search_for_shootout(config, search_minutes, folder, runner, set_ or [])

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False)

    result = so.run(config, on_progress=say)
    label = (f"{', '.join(g.name for g in machine.gpus) or 'no GPU'}, {machine.cpu_model}, "
             f"{machine.physical_cores} cores (fingerprint {machine.fingerprint()})")
    paths = so.write(result, folder, label)
    console.print(result.markdown(label), highlight=False, markup=False, soft_wrap=True)
    for kind, path in paths.items():
        console.print(f"{kind:>8}: {path}", highlight=False, markup=False)


def _pin(space: Any, items: list[str]) -> None:
    """--set NAME=VALUE pins, each checked by the space itself."""
    for item in items:
        if "=" not in item:
            raise PlacetuneError(f"--set {item!r}: write it as NAME=VALUE, e.g. --set ubatch=512")
        space.pin(*item.split("=", 1))


def _space_for(anatomy: Any, machine: Any, pins: list[str]) -> Any:
    """The default search space for this model on this machine's accelerators, with the user's pins."""
    from placetune.space import resolve_space

    accelerators = [d.name for d in machine.accelerators]
    space = resolve_space(None, anatomy, accelerators)
    space.for_devices(accelerators)
    _pin(space, pins)
    return space


def _search_for_shootout(config: Any, minutes: float, folder: Path, runner_name: str,
                         pins: list[str]) -> tuple[str, Any]:
    """Run placetune's search on the shootout's model, memory and serving context; its winner's name and placement."""
    import optuna

    from placetune.runners import get_runner
    from placetune.search import Search, SearchConfig

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search's own progress lines say what happens
    folder = folder.resolve()  # the shootout's own folder: its journal and the search's study side by side
    folder.mkdir(parents=True, exist_ok=True)
    measurer = get_runner(runner_name, bin_dir=config.bin_dir, rpc=config.rpc, reuse=True)
    search_config = SearchConfig(
        model=config.model, anatomy=config.anatomy, machine=config.machine,
        space=_space_for(config.anatomy, config.machine, pins),
        workload=config.workload, serving=config.serving, n_trials=10_000, timeout_s=minutes * 60,
        storage=f"sqlite:///{folder / 'search.db'}", budgets=config.budgets, rpc=config.rpc, runner_name=runner_name,
        bin_dir=config.bin_dir)
    try:
        engine = Search(search_config, measurer)
        engine.enqueue_seeds()
        engine.run()
        decision = engine.final_measure()
    finally:
        if hasattr(measurer, "close"):
            measurer.close()
    if decision is None:
        raise PlacetuneError(engine.no_winner_reason())
    return f"placetune's winner (searched {minutes:g} min)", decision.winner.placement


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def predict(
    ctx: typer.Context,
    model: Annotated[Path | None, typer.Argument(help="GGUF model (not needed with --what-if).")] = None,
    gpu_bw: Annotated[float | None, typer.Option("--gpu-bw", help="GPU bandwidth in GB/s (default: pynvml's theoretical peak).")] = None,
    ram_bw: Annotated[float | None, typer.Option("--ram-bw", help="RAM bandwidth in GB/s (default: a measured 256 MiB read, under 1 s).")] = None,
    bw: Annotated[list[str] | None, typer.Option("--bw", help="One device's bandwidth, e.g. RPC0=25 or CPU=80 (repeatable).")] = None,
    rpc: RpcOpt = None,
    measured: Annotated[Path | None, typer.Option("--measured", help="best.json or `bench --json` output: its placement, and measured/predicted.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the prediction as JSON.")] = False,
    what_if: Annotated[bool, typer.Option("--what-if", help="Hypothetical model and machine, no GGUF: needs --active-params, --common-fraction, --bits.")] = False,
    active_params: Annotated[float | None, typer.Option("--active-params", help="What-if: parameters read per token, e.g. 3.3e9.")] = None,
    common_fraction: Annotated[float | None, typer.Option("--common-fraction", help="What-if: non-expert share of the active parameters.")] = None,
    bits: Annotated[float | None, typer.Option("--bits", help="What-if: bits per weight, e.g. 4.5 for Q4_K_M.")] = None,
    experts_on_gpu: Annotated[float, typer.Option("--experts-on-gpu", help="What-if: share of expert bytes on the GPU.")] = 0.0,
    second_gpu_bw: Annotated[float | None, typer.Option("--second-gpu-bw", help="What-if: a second GPU's GB/s; prints how much it helps.")] = None,
) -> None:
    """Predicted tg (bandwidth roofline) of a placement, with the per-device share of each token's time.

    Example: placetune predict model.gguf -- -ngl 99 --n-cpu-moe 20
    """
    from placetune import predict as pm

    if what_if:
        if model is not None or ctx.args or measured is not None:
            raise PlacetuneError("--what-if takes no model, placement flags or --measured; it needs no GGUF")
        if active_params is None or common_fraction is None or bits is None:
            raise PlacetuneError("--what-if needs --active-params, --common-fraction and --bits")
        ram = ram_bw if ram_bw is not None else pm.probe_ram_bandwidth()
        p = pm.what_if(active_params, common_fraction, bits, gpu_bw, ram, experts_on_gpu)
        rows = None
        if second_gpu_bw is not None:
            if gpu_bw is None:
                raise PlacetuneError("--second-gpu-bw needs --gpu-bw for the first GPU")
            rows = pm.second_gpu_table(active_params, common_fraction, bits, gpu_bw, ram, experts_on_gpu, second_gpu_bw)
        if as_json:
            doc = {"what_if": p.to_dict()}
            if rows:
                doc["second_gpu"] = [{"experts_on_second_gpu": s, **q.to_dict()} for s, q in rows]
            typer.echo(json.dumps(doc, indent=2))
            return
        console.print(pm.prediction_table(p, "what-if"))
        if rows:
            console.print(pm.second_gpu_view(rows))
        return
    if model is None:
        raise PlacetuneError("give a GGUF model, or --what-if with hypothetical numbers")
    from placetune.anatomy import read_anatomy
    from placetune.hardware import probe_gpus
    from placetune.placement import parse_flags

    anatomy = read_anatomy(model)
    measured_tg = None
    n_rpc = len([s for s in (rpc or "").split(",") if s.strip()])  # only counted: predict contacts no server
    if measured is not None:
        placement, measured_tg, best_rpc = pm.load_measured(measured)
        if ctx.args and parse_flags(ctx.args) != placement:
            raise PlacetuneError(f"the flags after -- differ from the placement measured in {measured}; drop one")
        n_rpc = n_rpc or best_rpc
    else:
        placement = parse_flags(ctx.args)
    overrides = pm.parse_bandwidths(bw or [])
    gpus = probe_gpus()
    devices = pm.devices_for(gpus, n_rpc, list(overrides), hypothetical_gpu=gpu_bw is not None)
    bandwidths = pm.resolve_bandwidths(devices, gpus, ram_gbs=ram_bw, gpu_gbs=gpu_bw, overrides=overrides)
    if as_json:
        typer.echo(json.dumps({"placement": placement.to_dict(), "devices": devices,
                               "predicted": pm.prediction_record(anatomy, placement, devices, bandwidths, measured_tg)},
                              indent=2))
        return
    p = pm.predict_tg(anatomy, placement, devices, bandwidths)
    console.print(pm.prediction_table(p, model.name, measured_tg))
    console.print("token_embd counts one row per token (get_rows); KV-cache reads and latencies are not in the model",
                  style="dim", highlight=False)


@app.command()
def report(
    results: Annotated[str, typer.Argument(help="A search's results folder (best.json, trials.csv), its placetune.db, or a storage URL.")],
    out: Annotated[Path | None, typer.Option("--out", help="Folder for report.html and the PNGs (default: RESULTS/report).")] = None,
    history: Annotated[Path | None, typer.Option("--history", help="A `placetune regress` history SQLite file to plot.")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study name, when the storage holds several.")] = None,
    ram_bw: Annotated[float | None, typer.Option("--ram-bw", help="RAM GB/s for the predicted tg (default: as recorded, else probed here).")] = None,
    bw: Annotated[list[str] | None, typer.Option("--bw", help="One device's GB/s for the predicted tg, e.g. RPC0=25 (repeatable).")] = None,
) -> None:
    """One self-contained HTML page (opens offline) plus PNGs: history, pp vs tg, importances, predicted tg."""
    from placetune.predict import parse_bandwidths
    from placetune.report import write_report

    files = write_report(results, out, history=history, study_name=study, ram_gbs=ram_bw,
                         bandwidth_overrides=parse_bandwidths(bw or []) or None)
    console.print(f"report: {files.html}", highlight=False)
    for png in files.pngs:
        console.print(f"   png: {png}", highlight=False)


@app.command()
def export(
    result: Annotated[str, typer.Argument(help="A best.json, a results folder, or a study name (looked up in --storage).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="server, bench, flags, ot, python, llama-swap or json.")] = "server",
    host: Annotated[str, typer.Option("--host", help="Address the server line binds to.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option("--port", help="Port for the server line (default: llama-server's own).")] = None,
    storage: Annotated[str | None, typer.Option("--storage", help="Optuna storage URL for a study name (default: sqlite:///results/placetune.db).")] = None,
) -> None:
    """Print a search result ready to paste: shell-quoted command lines, Python arguments, a llama-swap entry or JSON.

    Example: placetune export results/model/machine --format llama-swap >> llama-swap.yaml
    """
    from placetune.export import export as render
    from placetune.export import load_result

    plan = load_result(result, storage)
    if plan.record.decision is None:  # no final round behind it: say what it is, beside the pasteable output
        for note in plan.record.notes:
            err_console.print(f"note: {one_line(note)}", highlight=False, markup=False, soft_wrap=True)
    typer.echo(render(plan, fmt, host=host, port=port))


@app.command()
def verify(
    result: Annotated[str, typer.Argument(help="A best.json, a results folder, or a study name (looked up in --storage).")],
    rpc: RpcOpt = None,
    llama_bin_dir: BinDirOpt = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds for the server to start and answer (default: the search's).")] = None,
    storage: Annotated[str | None, typer.Option("--storage", help="Optuna storage URL for a study name (default: sqlite:///results/placetune.db).")] = None,
) -> None:
    """Start the exported llama-server line as printed, measure it with the search's workload, compare with the search.

    Exits 0 when the comparison ran, also when it lands beyond the noise (it says so); 2 on errors.
    """
    from placetune.export import load_result
    from placetune.hardware import probe_machine
    from placetune.placement import check_buffer_types
    from placetune.verify import comparison_table
    from placetune.verify import verify as run_verify

    plan = load_result(result, storage)
    # The plan's own endpoints get the same handshake as --rpc: a silent server is one line, not a hang.
    endpoints = _rpc_list(rpc or ",".join(plan.data.get("rpc") or []) or None)
    machine = probe_machine(endpoints, "llama-server", llama_bin_dir)
    check_buffer_types(plan.placement, machine.override_targets)

    def launching(line: str) -> None:
        console.print(f"launching: {line}", highlight=False, markup=False, soft_wrap=True)

    outcome = run_verify(plan, bin_dir=llama_bin_dir, rpc=endpoints if rpc else None, timeout_s=timeout,
                         hardware=machine.hardware_fingerprint(), on_launch=launching)
    console.print(comparison_table(outcome))
    for note in outcome.notes:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def regress(
    suite: Annotated[Path | None, typer.Argument(help="Suite .toml (cases: name, model, flags or best, workload) or a results folder of best.json files.")] = None,
    history: Annotated[str, typer.Option("--history", help="History store: a SQLite file path or a SQLAlchemy URL (postgresql://...).")] = "results/history.db",
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML here: one testcase per case and metric.")] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Write a markdown summary here.")] = None,
    runner: Annotated[str | None, typer.Option("--runner", help="Runner for cases that name none: embedded (default), llama-bench, llama-server.")] = None,
    llama_bin_dir: BinDirOpt = None,
    rpc: RpcOpt = None,
    baseline: Annotated[str, typer.Option("--baseline", help="recent: median of the last --last runs; pinned: the run pinned with --pin.")] = "recent",
    last: Annotated[int, typer.Option("--last", help="Runs in a recent baseline (same machine fingerprint, build, runner, workload).")] = 5,
    threshold: Annotated[float, typer.Option("--threshold", help="Smallest change that counts, relative (0.05 = 5%), besides being beyond the noise.")] = 0.05,
    no_confirm: Annotated[bool, typer.Option("--no-confirm", help="Do not re-measure a case to confirm a drop.")] = False,
    show: Annotated[str | None, typer.Option("--show", help="Print the stored history of CASE and exit.")] = None,
    pin: Annotated[str | None, typer.Option("--pin", help="Pin the latest run of CASE as its baseline for --baseline pinned, and exit.")] = None,
) -> None:
    """Re-measure a suite, append it to the history, and flag drops beyond both the threshold and the noise.

    Rows are compared only with runs on the same machine fingerprint, llama.cpp build, runner and workload; anything else says what changed and starts a new baseline. A drop must replicate on a re-measure.

    Exit codes: 0 no regression, 1 regression, 2 a case could not run (or another error).

    Pinned baselines: `placetune regress --pin CASE` pins CASE's latest run; then run with --baseline pinned.
    """
    from placetune import regress as rg

    if show is not None or pin is not None:
        if suite is not None:
            raise PlacetuneError("--show and --pin read the history only; drop SUITE")
        store = rg.History(history)
        try:
            if show is not None:
                console.print(rg.history_table(store, show))
            if pin is not None:
                rows = store.pin(pin)
                rates = ", ".join(f"{r.metric} {r.median:.1f} t/s" for r in rows)
                console.print(f"pinned {pin} run of {rows[0].time:%Y-%m-%d %H:%M} UTC ({rates}; machine {rows[0].fingerprint}, build {rows[0].build})", highlight=False)
        finally:
            store.close()
        return
    if suite is None:
        raise PlacetuneError("give a SUITE (.toml or results folder), or --show CASE / --pin CASE")
    settings = rg.Settings(last=last, baseline=baseline, threshold=threshold, confirm=not no_confirm,
                           runner=default_runner(runner, llama_bin_dir), bin_dir=llama_bin_dir, rpc=tuple(_rpc_list(rpc)))

    def progress(case: rg.Case, outcomes: list[rg.Outcome]) -> None:
        console.print(f"{case.name}: " + "; ".join(f"{o.metric} {o.status}" for o in outcomes), highlight=False, markup=False)

    result = rg.regress(suite, history, settings, on_case=progress)
    console.print(rg.report_table(result))
    for o in result.outcomes:
        if o.status == rg.ERROR:
            console.print(f"error: {o.message}", style="red", highlight=False, markup=False, soft_wrap=True)
    console.print(result.summary(), highlight=False)
    if junit is not None:
        junit.parent.mkdir(parents=True, exist_ok=True)
        rg.junit_xml(result).write(junit, encoding="utf-8", xml_declaration=True)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(rg.markdown(result), encoding="utf-8")
    raise typer.Exit(result.exit_code)


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    from placetune.runners.process import interrupt_on_termination

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a pipe (tee, CI logs) as they happen
    interrupt_on_termination()
    try:
        app()
    except PlacetuneError as exc:
        # One line, whatever a file name in the message holds (a newline, a terminal escape).
        err_console.print(f"placetune: error: {one_line(str(exc))}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
