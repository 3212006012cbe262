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
    from placetune.views import human_bytes

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


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        app()
    except PlacetuneError as exc:
        err_console.print(f"placetune: error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
