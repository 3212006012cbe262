"""Runners measure a placement with real llama.cpp; this picks one by the name the CLI takes.

Imports are inside get_runner so that the embedded runner's child process, which imports this
package, does not pay for the others.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from placetune.errors import PlacetuneError
from placetune.runners.base import Runner

RUNNERS = ("embedded", "llama-bench", "llama-server")


def default_runner(name: str | None, bin_dir: str | Path | None = None) -> str:
    """The runner named, else llama-bench when --llama-bin-dir names the user's own build, else the embedded one
    where llama-cpp-python is installed, else llama-bench (a machine with only its own llama.cpp build).

    A named --llama-bin-dir must exist whatever the runner: it is the only place binaries are looked for.
    """
    if bin_dir is not None and not Path(bin_dir).expanduser().is_dir():
        raise PlacetuneError(f"--llama-bin-dir {bin_dir}: no such folder; point it at the folder holding your "
                             "llama.cpp build's binaries (e.g. llama.cpp/build/bin); it is the only place looked")
    if name is not None:
        if name not in RUNNERS:
            raise PlacetuneError(f"unknown runner {name!r}; choose one of {', '.join(RUNNERS)}")
        return name
    if bin_dir is not None:
        return "llama-bench"
    return "embedded" if importlib.util.find_spec("llama_cpp") is not None else "llama-bench"


def get_runner(name: str, *, bin_dir: str | Path | None = None, rpc: Sequence[str] = (),
               reuse: bool = False) -> Runner:
    """The runner called `name`. bin_dir (--llama-bin-dir) goes to the binary runners; reuse lets the
    embedded runner keep a model loaded between measurements that differ only in context knobs."""
    if name == "embedded":
        from placetune.runners.embedded import EmbeddedRunner

        return EmbeddedRunner(rpc=rpc, reuse=reuse)
    if name == "llama-bench":
        from placetune.runners.llama_bench import LlamaBenchRunner

        return LlamaBenchRunner(bin_dir=bin_dir, rpc=rpc)
    if name == "llama-server":
        from placetune.runners.llama_server import LlamaServerRunner

        return LlamaServerRunner(bin_dir=bin_dir, rpc=rpc)
    raise PlacetuneError(f"unknown runner {name!r}; choose one of {', '.join(RUNNERS)}")


def get_fit_runner(name: str, *, bin_dir: str | Path | None = None, rpc: Sequence[str] = (),
                   margins_mib: Sequence[int] = ()) -> Runner | None:
    """The runner `name` with llama.cpp's --fit on (what a user who sets nothing gets); None for the embedded
    runner, which cannot run --fit. margins_mib: --fit's margin per device, in llama.cpp's device order
    (none: llama.cpp's own)."""
    if name == "llama-bench":
        from placetune.runners.llama_bench import LlamaBenchRunner

        return LlamaBenchRunner(bin_dir=bin_dir, rpc=rpc, fit_on=True, fit_margins_mib=margins_mib)
    if name == "llama-server":
        from placetune.runners.llama_server import LlamaServerRunner

        return LlamaServerRunner(bin_dir=bin_dir, rpc=rpc, fit_on=True, fit_margins_mib=margins_mib)
    return None
