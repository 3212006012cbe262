"""Reading llama.cpp's own log: where tensors landed, buffer sizes, and whether that matches the plan.

Every runner sees the same log lines (embedded llama.cpp, llama-bench and llama-server share the
model loader), so one parser and one checker serve all three.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from placetune.anatomy import Anatomy, read_anatomy
from placetune.placement import Placement, device_of, rule_pattern

_OVERRIDDEN = re.compile(r"tensor (\S+) \([^)]*\) buffer type overridden to (\S+)")
_BUFFER_SIZE = re.compile(r"^\S+:\s+(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+) MiB", re.M)
# At teardown llama.cpp repeats each compute buffer with 4 decimals (DEBUG level, or WARN when it grew).
_COMPUTE_FINE = re.compile(r"^~llama_context:\s+(\S+) compute buffer size (?:is|of)\s+([\d.]+) MiB", re.M)
_MODEL_START = "load_tensors: loading model tensors"
_CONTEXT_START = "llama_context: constructing llama_context"


def overridden_tensors(log: str, rpc: Sequence[str] = ()) -> dict[str, str]:
    """Tensor name -> buffer type, for every `buffer type overridden` line llama.cpp printed."""
    return {m.group(1): device_of(m.group(2), rpc) for m in _OVERRIDDEN.finditer(log)}


def buffer_sizes(log: str, peak: bool = False, rpc: Sequence[str] = ()) -> dict[str, dict[str, int]]:
    """Kind (model, KV, compute, output, RS) -> device -> bytes, from llama.cpp's buffer size lines.

    Every device is listed, RPC servers included (`RPC0[host:port]` -> RPC0), and one device's lines of
    a kind are summed (an SWA model has two KV caches). A log may hold several loads and contexts: model
    sizes come from the last load, the others from the last context (a reused embedded child logs
    earlier placements too) or, with peak=True, the largest context per device (llama-bench makes one
    context per test, sized for that test alone). Compute sizes are 0.01 MiB figures unless the
    context's teardown repeated them with 4 decimals.
    """
    model_log = log[log.rfind(_MODEL_START):] if _MODEL_START in log else log
    model_log = model_log.split(_CONTEXT_START, 1)[0]
    out: dict[str, dict[str, int]] = {}
    for buft, kind, mib in _BUFFER_SIZE.findall(model_log):
        if kind == "model":
            _add(out.setdefault(kind, {}), device_of(buft, rpc), mib)
    contexts = log.split(_CONTEXT_START)[1:] or [log]
    for context in contexts if peak else contexts[-1:]:
        for kind, sizes in _context_sizes(context, rpc).items():
            for dev, size in sizes.items():
                out.setdefault(kind, {})[dev] = max(out.get(kind, {}).get(dev, 0), size)
    return out


def _context_sizes(context_log: str, rpc: Sequence[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for buft, kind, mib in _BUFFER_SIZE.findall(context_log):
        if kind != "model":
            _add(out.setdefault(kind, {}), device_of(buft, rpc), mib)
    fine: dict[str, int] = {}
    for buft, mib in _COMPUTE_FINE.findall(context_log):
        if float(mib) > 0:  # llama.cpp prints a line for every backend, also the ones that compute nothing
            _add(fine, device_of(buft, rpc), mib)
    if fine:
        out["compute"] = {**out.get("compute", {}), **fine}
    return out


def _add(sizes: dict[str, int], device: str, mib: str) -> None:
    """One buffer size line's MiB added to its device: a device's lines of one kind are summed."""
    sizes[device] = sizes.get(device, 0) + round(float(mib) * 1024 * 1024)


def expected_overrides(anatomy: Anatomy, placement: Placement) -> tuple[dict[str, str], list[str]]:
    """Tensor -> buffer type that the placement's -ot rules ask for, and the rules that match nothing."""
    rules = [(rule_pattern(o), o.buft) for o in placement.overrides]
    compiled = [(re.compile(p), p, b) for p, b in rules]
    asked: dict[str, str] = {}
    used: set[int] = set()
    for t in anatomy.tensors:
        for i, (rx, _, buft) in enumerate(compiled):
            if rx.search(t.name):
                asked[t.name] = buft
                used.add(i)
                break
    unmatched = [f"{p}={b}" for i, (_, p, b) in enumerate(compiled) if i not in used]
    return asked, unmatched


def check_placement(model: Path | str, placement: Placement, log: str,
                    rpc: Sequence[str] = ()) -> tuple[dict[str, str], list[str]]:
    """Compare what llama.cpp reported with what the placement asked for; return reported map and issues."""
    reported = overridden_tensors(log, rpc)
    asked, unmatched = expected_overrides(read_anatomy(model), placement)
    issues = [f"override {rule} matched no tensor in this model" for rule in unmatched]
    wrong = [
        f"{name}: asked for {buft}, llama.cpp put it on {reported.get(name, 'its layer device (no override applied)')}"
        for name, buft in asked.items()
        if reported.get(name) != device_of(buft, rpc)
    ]
    stray = [f"{name}: overridden to {dev} though the placement did not ask for it"
             for name, dev in reported.items() if name not in asked]
    for group in (wrong, stray):
        issues += group[:5]
        if len(group) > 5:
            issues.append(f"... and {len(group) - 5} more like that")
    return reported, issues


def log_tail(log: str, lines: int = 40) -> str:
    return "\n".join(log.splitlines()[-lines:])
