"""Export a search result as something a user pastes: a llama-server or llama-bench line, flags, an -ot
value, llama-cpp-python arguments, a llama-swap entry, or the plan as JSON.

The line we print is the line we measured: the serving context (-c, -np), -fit off and flash
attention are spelled out, and where a form cannot carry a setting it says so in a comment. Command
lines come from placement.py's renderers joined with shlex; every outside string that lands in a
comment goes through escape.py, so a file name with a newline cannot run anything.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

from placetune.errors import PlacetuneError
from placetune.escape import comment, yaml_string
from placetune.placement import (
    Placement,
    python_kwargs,
    render_args,
    render_bench_command,
    render_env,
    render_flags,
    render_ot,
    render_server_command,
    shell_line,
)
from placetune.results import BEST_KEY, BestPlan, load_best
from placetune.runners.base import Stats, Workload
from placetune.runners.llama_bench import NO_WARMUP
from placetune.storage import DEFAULT_STORAGE, load_existing_study, mask_url

FORMATS = ("server", "bench", "flags", "ot", "python", "llama-swap", "json")
# llama-swap replaces ${PORT} with the port it assigns (its docs: "Writing the cmd for a model").
LLAMA_SWAP_PORT = "${PORT}"


def load_result(result: str, storage: str | None = None) -> BestPlan:
    """A best.json, a results folder holding one, or the name of a study in `storage`."""
    path = Path(result).expanduser()
    if path.exists():
        return load_best(path)
    if "://" in result or "@" in result:
        raise PlacetuneError(f"{mask_url(result)} looks like a storage URL; give the study's name and the URL as "
                             "--storage URL")
    if result.endswith(".json") or "/" in result:
        raise PlacetuneError(f"{result} not found; give a best.json, a results folder or a study name")
    return plan_from_study(result, storage or DEFAULT_STORAGE)


def plan_from_study(name: str, storage: str) -> BestPlan:
    """The study's own copy of its best.json: the winner its final round named, only beyond the noise.

    A study whose search has not reached its final round yet (stopped, or still running elsewhere) gives its
    best measured trial instead, and the plan's notes say so.
    """
    import optuna

    from placetune.search.objective import objective_value
    from placetune.search.study import read_info

    study = load_existing_study(storage, name)
    stored = study.user_attrs.get(BEST_KEY)
    if isinstance(stored, dict):
        return BestPlan(stored, f"study {name!r}")
    info = read_info(study)
    if info is None:
        raise PlacetuneError(f"study {name!r} in {mask_url(storage)} was not made by this placetune")
    workload = Workload.from_dict(info.workload)
    measured = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs.get("pp_samples") and t.user_attrs.get("tg_samples")
                and "duplicate_of" not in t.user_attrs]
    if not measured:
        raise PlacetuneError(f"study {name!r} has no completed, measured trial yet; run or resume the search")

    def latency(t: optuna.trial.FrozenTrial) -> float:
        return objective_value("latency", t.user_attrs["pp"], t.user_attrs["tg"], workload)

    if info.objective == "pareto":
        best = min(measured, key=latency)
    else:
        sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
        best = min(measured, key=lambda t: sign * t.values[0])
    ua = best.user_attrs
    placement = Placement.from_dict(ua["placement"])
    model = info.model["path"]
    pp = Stats(tuple(ua["pp_samples"]), workload.n_prompt)
    tg = Stats(tuple(ua["tg_samples"]), workload.n_gen)
    return BestPlan({
        "model": dict(info.model),
        "machine": info.machine,
        "llama_build": ua.get("build", {}),
        "study": {"name": name, "storage": mask_url(storage), "objective": info.objective,
                  "trials": len(study.trials), "winner_trial": best.number},
        "workload": workload.to_dict(),
        "serving": info.serving,
        "runner": info.runner,
        "rpc": info.rpc,
        "placement": placement.to_dict(),
        "flags": render_flags(placement),
        "server_command": render_server_command(model, placement, rpc=info.rpc),
        "measurement": {"runner": info.runner, "status": ua.get("status", "ok"),
                        "pp": pp.to_dict(), "tg": tg.to_dict(), "build": ua.get("build", {})},
        "objective_value": latency(best),
        "notes": [f"study {name!r} has no final round yet: this is its best search trial (trial {best.number}), "
                  "not a winner named beyond the noise; run the search to its end for that"],
    }, f"study {name!r}")


def export(plan: BestPlan, fmt: str = "server", host: str = "127.0.0.1", port: int | None = None,
           binary: str = "llama-server") -> str:
    """The plan in format `fmt` (one of FORMATS), ready to paste; no trailing newline.

    For `bench`, a binary ending in llama-server is swapped for the llama-bench next to it.
    """
    if port is not None and not 1 <= port <= 65535:
        raise PlacetuneError(f"--port {port}: a TCP port is 1 to 65535")
    placement = plan.placement
    model = plan.model_path
    rpc = list(plan.data.get("rpc") or [])
    if fmt == "server":
        return shell_line(placement, render_server_command(model, placement, binary=binary, host=host, port=port,
                                                           rpc=rpc))
    if fmt == "bench":
        return _bench_line(plan, binary)
    if fmt == "flags":
        flags = shlex.join(render_args(placement, rpc=rpc))
        return flags + ("\n" + comment(f"and in the environment: {shell_line(placement, [])}")
                        if placement.env else "")
    if fmt == "ot":
        if not placement.overrides:
            raise PlacetuneError("this plan has no tensor overrides (-ot); use --format flags for its other flags")
        return shlex.quote(render_ot(placement, rpc))
    if fmt == "python":
        return _python_snippet(model, placement)
    if fmt == "llama-swap":
        return _llama_swap_entry(plan, host, binary)
    if fmt == "json":
        return json.dumps(plan.data, indent=2)
    raise PlacetuneError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _bench_line(plan: BestPlan, binary: str) -> str:
    """The llama-bench line at the searched depth, and a note on what it cannot carry."""
    w = Workload.from_dict(plan.data["workload"])
    bench = binary[: -len("llama-server")] + "llama-bench" if binary.endswith("llama-server") else binary
    cmd = render_bench_command(plan.model_path, plan.placement, binary=bench, n_prompt=w.n_prompt, n_gen=w.n_gen,
                               depth=w.depth, repetitions=w.repetitions, rpc=plan.data.get("rpc") or (),
                               output=None)
    if w.warmups == 0:
        cmd.append(NO_WARMUP)
    p = plan.placement
    serving = f"-c {p.ctx} -np {p.parallel or 1}" if p.ctx else "the serving context"
    note = (f"llama-bench has no -c or -np: it sizes its KV cache to each test, not to {serving}, and places "
            "tensors as given (no --fit)")
    return shell_line(p, cmd) + "\n" + comment(note)


def _python_snippet(model: str, placement: Placement) -> str:
    """Llama(...) with the keyword arguments llama-cpp-python takes; what it cannot take is said, not dropped.

    Llama() silently ignores unknown keywords, so nothing it lacks is passed as one.
    """
    kw, cannot = python_kwargs(placement)
    lines = [comment(f"llama-cpp-python equivalent of: {render_flags(placement) or '(llama.cpp defaults)'}")]
    if placement.env:  # backend knobs are read when llama.cpp starts: set them before it is imported
        lines += ["import os", *(f"os.environ[{name!r}] = {value!r}" for name, value in placement.env)]
    lines += ["from llama_cpp import Llama", ""]
    if cannot:
        lines.append(comment("Llama() cannot express these settings of the measured line; use --format server "
                             "to deploy them:"))
        lines += [comment(f"  {item}") for item in cannot]
    lines.append("llm = Llama(")
    lines.append(f"    model_path={model!r},")
    lines += [f"    {key}={value!r}," for key, value in kw.items()]
    lines.append(")")
    return "\n".join(lines)


def _llama_swap_entry(plan: BestPlan, host: str, binary: str) -> str:
    """A `models:` entry for llama-swap: `cmd` holds the server line with llama-swap's ${PORT} macro.

    llama-swap splits cmd with POSIX shell rules, so the shlex-quoted line survives; the line is written
    as a double-quoted YAML scalar, which escapes any control character. llama-swap also replaces any
    ${NAME} it sees, so a path containing one cannot be expressed and is refused.
    """
    argv = render_server_command(plan.model_path, plan.placement, binary=binary, host=host,
                                 rpc=plan.data.get("rpc") or ())
    line = f"{shlex.join(argv)} --port {LLAMA_SWAP_PORT}"
    if "${" in line.replace(LLAMA_SWAP_PORT, ""):
        raise PlacetuneError("the command contains '${', which llama-swap reads as a macro; "
                             "rename the model path or use --format server")
    proxy_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    proxy_host = f"[{proxy_host}]" if ":" in proxy_host else proxy_host
    name = Path(plan.model_path).stem
    env = [f"      - {yaml_string(word)}" for word in render_env(plan.placement)]
    return "\n".join([
        comment(f"llama-swap model entry by placetune ({_summary(plan)})"),
        "models:",
        f"  {yaml_string(name)}:",
        f"    cmd: {yaml_string(line)}",
        *(["    env:", *env] if env else []),
        f"    proxy: {yaml_string(f'http://{proxy_host}:{LLAMA_SWAP_PORT}')}",
    ])


def _summary(plan: BestPlan) -> str:
    m: dict[str, Any] = plan.data.get("measurement") or {}
    pp = (m.get("pp") or {}).get("median")
    tg = (m.get("tg") or {}).get("median")
    rates = [f"{k} {v:.1f} t/s" for k, v in (("pp", pp), ("tg", tg)) if isinstance(v, float) and math.isfinite(v)]
    return ", ".join(rates) or "not measured"
