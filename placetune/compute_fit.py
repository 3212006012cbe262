"""Fit memory.COMPUTE_FIT: the compute-buffer constants, from llama.cpp's own reported sizes.

llama.cpp's compute buffer is ggml-alloc's peak over the graphs it reserves; no closed form gives it,
so memory.ComputeTerms weighs the activations each graph phase holds with fitted coefficients. This
module measures them: it writes generated models of varied shapes, has the embedded runner create a
context for every (placement, context, ubatch, flash attention) in a grid (one token is decoded),
reads the compute buffer sizes llama.cpp prints, and fits the coefficients by coordinate descent on
the worst error relative to max(10%, 64 KiB).

    python -m placetune.compute_fit --rpc   # about a minute; --rpc adds an RPC device (ggml-rpc-server)

Last run (b11434, 9 models x 3 placements x 18 contexts, 19 s on 2 cores), the constants in memory.py:
    COMPUTE_FIT = (1.95, 1.45, 1.6, 3.3, 1.15, 0.15, 0.0, 3.05, 2.7, 0.35)
    810 samples, relative error -26% to +27%, median 0%: within memory.COMPUTE_TOLERANCE (30%) or 64 KiB.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from placetune.anatomy import Anatomy, read_anatomy
from placetune.device_bytes import layer_devices
from placetune.memory import COMPUTE_FIT, ComputeTerms, compute_terms, context_shape, kv_layers
from placetune.placement import Placement, parse_flags
from placetune.runners.base import Workload
from placetune.runners.embedded import EmbeddedRunner
from placetune.synth import SynthSpec, tiny_spec, write_model

SHAPES: dict[str, SynthSpec] = {
    "moe": tiny_spec("qwen3moe"),
    "moe-vocab": tiny_spec("qwen3moe", n_vocab=4096),
    "moe-wide": tiny_spec("qwen3moe", n_embd=256, n_ff_exp=128),
    "moe-many": tiny_spec("qwen3moe", n_expert=32, n_expert_used=8),
    "moe-heads": tiny_spec("qwen3moe", n_head=8, n_head_kv=2, head_dim=64),
    "dense": tiny_spec("llama", n_ff=1024),
    "swa": tiny_spec("gpt-oss", quant="mxfp4"),
    "shexp": tiny_spec("glm4moe"),
    "dense-wide": tiny_spec("llama", n_embd=256, n_head=8, n_head_kv=8, head_dim=32, n_ff=512, n_vocab=2048),
}
CONTEXTS = (256, 1000, 2048)
UBATCHES = (32, 128, 512)
CREATE_ONLY = Workload(n_prompt=1, n_gen=0, repetitions=1, warmups=0, timeout_s=120)  # the context, one token


@dataclass(frozen=True)
class Sample:
    """One device's reported compute buffer and the terms the model weighs for it."""

    label: str
    device: str
    reported: int
    terms: ComputeTerms


def terms_for(anatomy: Anatomy, placement: Placement, devices: Sequence[str], n_ctx: int) -> dict[str, ComputeTerms]:
    f = anatomy.facts
    shape = context_shape(n_ctx, 1, False, placement.batch, placement.ubatch, f.n_ctx_train)
    flash_attn = placement.flash_attn != "off"
    layers = kv_layers(f, shape, flash_attn=flash_attn)
    swa_cells = next((lk.cells for lk in layers if lk.swa), None)
    layer_dev = layer_devices(f.n_layers, placement.n_gpu_layers, devices, placement.tensor_split)
    return compute_terms(anatomy, layer_dev, shape, flash_attn, swa_cells)


def sweep(models: dict[str, Path], rpc: Sequence[str]) -> Iterator[Sample]:
    """Create a context for every grid point; yield each device's reported size with its terms."""
    placements = ["-lm none --no-repack -ngl 0"]
    if rpc:
        placements += ["-lm none --no-repack -ngl 999", "-lm none --no-repack -ngl 3"]
    anatomies = {name: read_anatomy(path) for name, path in models.items()}
    for (name, path), base in itertools.product(models.items(), placements):
        anatomy = anatomies[name]
        devices = ["RPC0"] if rpc else []
        runner = EmbeddedRunner(rpc=rpc, reuse=True)  # one model load per placement, a context per point
        try:
            for n_ctx, ub, fa in itertools.product(CONTEXTS, UBATCHES, ("on", "off")):
                placement = parse_flags(f"{base} -c {n_ctx} -ub {ub} -fa {fa}")
                m = runner.measure(path, placement, CREATE_ONLY)
                if not m.ok:
                    raise SystemExit(f"{name} {placement}: {m.status}: {m.reason}")
                terms = terms_for(anatomy, placement, devices, n_ctx)
                for dev, size in m.reported.get("compute", {}).items():
                    yield Sample(f"{name} {base} -c {n_ctx} -ub {ub} -fa {fa}", dev, size, terms[dev])
        finally:
            runner.close()


def worst_error(samples: Sequence[Sample], coefficients: Sequence[float]) -> tuple[float, float]:
    """(worst, mean) of |predicted - reported| / max(10% of reported, 64 KiB)."""
    errors = [abs(s.terms.bytes(coefficients) - s.reported) / max(0.10 * s.reported, 65536) for s in samples]
    return max(errors), sum(errors) / len(errors)


def fit(samples: Sequence[Sample], start: Sequence[float] = COMPUTE_FIT, rounds: int = 6) -> tuple[float, ...]:
    """Coordinate descent on the worst error, then the mean, in steps down to 0.05."""
    best_c = list(start)
    best = worst_error(samples, best_c)
    for _ in range(rounds):
        for i, step, sign in itertools.product(range(len(best_c)), (1.0, 0.5, 0.25, 0.1, 0.05), (1, -1)):
            trial = list(best_c)
            trial[i] = max(0.0, round(trial[i] + sign * step, 2))
            score = worst_error(samples, trial)
            if score < best:
                best, best_c = score, trial
    return tuple(best_c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc", action="store_true", help="also fit placements on an RPC device")
    args = parser.parse_args()
    from placetune.runners.rpc import rpc_server

    with tempfile.TemporaryDirectory() as tmp:
        models = {name: write_model(spec, Path(tmp) / f"{name}.gguf") for name, spec in SHAPES.items()}
        with rpc_server() if args.rpc else contextlib.nullcontext() as endpoint:
            samples = list(sweep(models, [endpoint] if endpoint else []))
    coefficients = fit(samples)
    worst, mean = worst_error(samples, coefficients)
    errors = sorted((s.terms.bytes(coefficients) - s.reported) / s.reported for s in samples)
    print(f"{len(samples)} samples; COMPUTE_FIT = {coefficients}")
    print(f"relative error: min {errors[0]:+.0%}, median {errors[len(errors) // 2]:+.0%}, max {errors[-1]:+.0%}; "
          f"worst / max(10%, 64 KiB) = {worst:.2f}, mean {mean:.2f}")


if __name__ == "__main__":
    main()
