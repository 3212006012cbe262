"""llama.cpp's own answer: run `llama-fit-params` and read the flags it prints back into a Placement, exactly.

`--fit` (on by default in llama-server) fills device memory by llama.cpp's memory model and never
measures speed. Its answer is what a user gets out of the box, so the search measures it as printed:
its own -ot rules are carried verbatim, never mapped to the nearest point of a search space. Both see
the same memory: a placetune budget becomes llama-fit-params' per-device margin (see budgets.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from placetune.errors import PlacetuneError
from placetune.placement import Placement, parse_flags, render_fit_target
from placetune.runners.binaries import find_binary, run_to_end


@dataclass(frozen=True)
class FitAnswer:
    """What llama-fit-params printed, as a Placement, with the line itself."""

    placement: Placement
    line: str


class FitUnavailable(Exception):
    """llama-fit-params could not give an answer; the message says why in one line."""


def fit_params(model: Path, margins: Sequence[int], n_ctx: int, slots: int = 1, rpc: Sequence[str] = (),
               bin_dir: str | Path | None = None, timeout_s: float = 120.0) -> FitAnswer:
    """llama-fit-params' placement for this model, context and per-device margins (MiB)."""
    try:
        binary = find_binary("llama-fit-params", bin_dir)
    except PlacetuneError as exc:
        raise FitUnavailable(str(exc)) from None
    command = [str(binary), "-m", str(model), "-c", str(n_ctx), "-fitc", str(n_ctx), "-np", str(slots)]
    command += render_fit_target(margins)
    if rpc:
        command += ["--rpc", ",".join(rpc)]
    run = run_to_end(command, timeout_s)
    if run.timed_out:
        raise FitUnavailable(f"llama-fit-params did not answer in {timeout_s:.0f} s")
    lines = [line.strip() for line in run.stdout.splitlines() if line.strip().startswith("-")]
    if run.returncode != 0 or not lines:
        tail = (run.log.strip().splitlines() or ["no output"])[-1]
        raise FitUnavailable(f"llama-fit-params failed: {tail[:200]}")
    try:
        placement = parse_flags(lines[-1], rpc=rpc)
    except PlacetuneError as exc:
        raise FitUnavailable(f"llama-fit-params answered {lines[-1]!r}, which placetune cannot read: {exc}") from None
    return FitAnswer(placement, lines[-1])
