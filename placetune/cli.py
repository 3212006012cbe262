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
console = Console()
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
    return [s.strip() for s in rpc.split(",") if s.strip()] if rpc else []


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


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        app()
    except PlacetuneError as exc:
        err_console.print(f"placetune: error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
