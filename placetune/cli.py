"""The `placetune` command line. It parses arguments and calls the pipeline modules, nothing more."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from placetune.errors import PlacetuneError

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


RunnerOpt = Annotated[str, typer.Option("--runner", help="embedded (llama-cpp-python), llama-bench or llama-server.")]
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
    runner: RunnerOpt = "embedded",
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
    from placetune.placement import parse_flags
    from placetune.results import load_placement
    from placetune.runners import get_runner
    from placetune.runners.base import Workload
    from placetune.views import measurement_table, placement_table

    anatomy = read_anatomy(model)
    if placement_file is not None and ctx.args:
        raise PlacetuneError("give the placement either as --placement FILE or as flags after --, not both")
    placement = load_placement(placement_file) if placement_file else parse_flags(ctx.args)
    workload = Workload(prompt_tokens, gen_tokens, depth, reps, warmups, timeout)
    measurer = get_runner(runner, bin_dir=llama_bin_dir, rpc=_rpc_list(rpc))
    if not as_json:
        console.print(f"measuring with {runner}: {' '.join(ctx.args) or '(llama.cpp defaults)'}", highlight=False)
    m = measurer.measure(model, placement, workload)
    if as_json:
        typer.echo(json.dumps({"placement": placement.to_dict(), "workload": workload.to_dict(),
                               "measurement": m.to_dict()}, indent=2))
    else:
        measurement_table(m, workload, console)
        devices = [f"RPC{i}" for i in range(len(_rpc_list(rpc)))] if rpc else []
        placement_table(anatomy, placement, devices, m.device_memory, console)
    if not m.ok:
        raise typer.Exit(1)


@app.command()
def hw(
    rpc: RpcOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the machine record as JSON.")] = False,
) -> None:
    """CPU, RAM, NVIDIA GPUs and the devices llama.cpp sees: the fingerprint every result carries."""
    from placetune.hardware import probe_machine
    from placetune.views import machine_table

    machine = probe_machine(_rpc_list(rpc))
    if as_json:
        typer.echo(json.dumps(machine.to_dict(), indent=2))
    else:
        machine_table(machine, console)


@app.command()
def search(
    model: Annotated[Path, typer.Argument(help="GGUF model to place.")],
    objective: Annotated[str, typer.Option(help="latency (time of a typical request), tg, pp, or pareto.")] = "latency",
    n_trials: Annotated[int, typer.Option("--n-trials", help="Trials in the study (a resumed study counts its own).")] = 30,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Stop starting trials after this many seconds.")] = None,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    space: Annotated[str | None, typer.Option(help="Search space: moe, dense, cpu or a .toml file (default: by model and hardware).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Pin a parameter, e.g. --set ctx=32768 (repeatable).")] = None,
    budget: Annotated[list[str] | None, typer.Option("--budget", help="Memory budget per device, e.g. CUDA0=20GiB or RPC0=64MiB.")] = None,
    min_pp: Annotated[float | None, typer.Option("--min-pp", help="Constraint: prompt processing of at least this many t/s.")] = None,
    prompt_tokens: PromptOpt = 512,
    gen_tokens: GenOpt = 128,
    depth: DepthOpt = 0,
    reps: RepsOpt = 5,
    warmups: WarmOpt = 3,
    trial_timeout: Annotated[float, typer.Option("--trial-timeout", help="Seconds before one llama.cpp run is killed.")] = 900.0,
    runner: RunnerOpt = "embedded",
    llama_bin_dir: BinDirOpt = None,
    rpc: RpcOpt = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: sqlite:///<out>/placetune.db).")] = None,
    study_name: Annotated[str | None, typer.Option("--study-name", help="Default: model, header hash, machine fingerprint, objective.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Results root; files go to OUT/<model>/<machine>/.")] = Path("results"),
    top_k: Annotated[int, typer.Option("--top-k", help="Candidates re-measured interleaved at the end.")] = 3,
    no_screen: Annotated[bool, typer.Option("--no-screen", help="Give every trial all its repetitions.")] = False,
) -> None:
    """Search placements and knobs with real measurements; write the best as flags and a llama-server line.

    Running the same command again resumes the study: finished trials are kept.
    """
    import optuna

    from placetune.anatomy import read_anatomy
    from placetune.hardware import probe_machine
    from placetune.memory import parse_budgets
    from placetune.results import results_dir, write_results
    from placetune.runners import get_runner
    from placetune.runners.base import Workload
    from placetune.search import Search, SearchConfig
    from placetune.space import resolve_space
    from placetune.views import SearchProgress, search_summary

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial is reported on the progress line
    anatomy = read_anatomy(model)
    rpc_servers = _rpc_list(rpc)
    machine = probe_machine(rpc_servers)
    chosen = resolve_space(space, anatomy, bool(machine.accelerators))
    for item in set_ or []:
        if "=" not in item:
            raise PlacetuneError(f"--set {item!r}: write it as NAME=VALUE, e.g. --set ctx=32768")
        chosen.pin(*item.split("=", 1))
    out.mkdir(parents=True, exist_ok=True)
    config = SearchConfig(
        model=model, anatomy=anatomy, machine=machine, space=chosen,
        workload=Workload(prompt_tokens, gen_tokens, depth, reps, warmups, trial_timeout),
        objective=objective, n_trials=n_trials, timeout_s=timeout, seed=seed,
        storage=storage or f"sqlite:///{out / 'placetune.db'}", study_name=study_name,
        budgets=parse_budgets(budget or []), min_pp=min_pp, top_k=top_k, screen=not no_screen,
        rpc=rpc_servers, runner_name=runner,
    )
    measurer = get_runner(runner, bin_dir=llama_bin_dir, rpc=rpc_servers)
    progress = SearchProgress(console)
    engine = Search(config, measurer, on_trial=progress.update)
    console.print(
        f"[bold]placetune search[/] {model.name}: space {chosen.name}, objective {objective}, "
        f"runner {runner}, study {engine.study.study_name} ({len(engine.study.trials)} trials so far)",
        highlight=False,
    )
    for note in engine.enqueue_seeds():
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    with progress.running(engine):
        engine.run()
    if engine.stop_requested:
        console.print("stopped after the current trial; run the same command again to resume", highlight=False)
    finals = engine.final_measure()
    if not finals:
        raise PlacetuneError("no trial finished successfully; see trials.csv reasons (placetune inspect, bench)")
    winner, measurement = finals[0]
    record = engine.best_record(winner, measurement)
    paths = write_results(results_dir(out, model.stem, machine.short_name()), engine.study, record)
    search_summary(record, finals, config.workload, console)
    for kind, path in paths.items():
        console.print(f"{kind:>7}: {path}", highlight=False)


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a pipe (tee, CI logs) as they happen
    try:
        app()
    except PlacetuneError as exc:
        err_console.print(f"placetune: error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
