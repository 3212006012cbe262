"""Export a search result as something a user pastes: a llama-server or llama-bench line, flags, an -ot
value, llama-cpp-python arguments, a llama-swap entry, or the plan as JSON.

Every command-line form is built from placement.py's renderers and joined with shlex, so a model path
with spaces, quotes or `$` reaches llama.cpp unchanged when the line is pasted into a POSIX shell.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

from placetune.errors import PlacetuneError
from placetune.placement import (
    Placement,
    python_kwargs,
    render_bench_command,
    render_flags,
    render_ot,
    render_server_command,
)
from placetune.results import BestPlan, load_best
from placetune.runners.base import Stats, Workload
from placetune.runners.llama_bench import NO_WARMUP

FORMATS = ("server", "bench", "flags", "ot", "python", "llama-swap", "json")
DEFAULT_STORAGE = "sqlite:///results/placetune.db"
# llama-swap replaces ${PORT} with the port it assigns (its docs: "Writing the cmd for a model").
LLAMA_SWAP_PORT = "${PORT}"


def load_result(result: str, storage: str | None = None) -> BestPlan:
    """A best.json, a results folder holding one, or the name of a study in `storage`."""
    path = Path(result).expanduser()
    if path.is_dir() and not (path / "best.json").exists():
        found = sorted(path.rglob("best.json"))
        if len(found) > 1:
            listed = ", ".join(str(p.parent) for p in found[:5])
            raise PlacetuneError(f"{path} holds {len(found)} results ({listed}); give one of those folders")
        path = found[0] if found else path
    if path.exists():
        return load_best(path)
    if result.endswith(".json") or "/" in result:
        raise PlacetuneError(f"{result} not found; give a best.json, a results folder or a study name")
    return plan_from_study(result, storage or DEFAULT_STORAGE)


def plan_from_study(name: str, storage: str) -> BestPlan:
    """Rebuild a best.json-like plan from a study's best measured trial and the study's own attributes.

    This is the trial as the search measured it; best.json also carries the final interleaved re-measure.
    """
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from placetune.search import objective_value

    try:
        url = make_url(storage)
    except SQLAlchemyError:
        raise PlacetuneError(
            f"--storage {storage!r} is not a database URL such as sqlite:///results/placetune.db") from None
    if url.drivername.startswith("sqlite") and url.database and not Path(url.database).exists():
        raise PlacetuneError(f"{name!r} is neither a file nor a folder, and there is no study storage at "
                             f"{url.database} to look it up in; pass --storage URL or a best.json")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        names = optuna.study.get_all_study_names(storage)
    except (ImportError, SQLAlchemyError, ValueError) as exc:
        raise PlacetuneError(f"cannot open study storage {storage!r}: {str(exc).splitlines()[0]}") from None
    if name not in names:
        known = ", ".join(names) or "none"
        raise PlacetuneError(f"no study {name!r} in {storage} (studies there: {known})")
    study = optuna.load_study(study_name=name, storage=storage)
    attrs = study.user_attrs
    workload = Workload.from_dict(attrs["workload"])
    objective = attrs.get("objective", "latency")
    measured = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs.get("pp_samples") and t.user_attrs.get("tg_samples")]
    if not measured:
        raise PlacetuneError(f"study {name!r} has no completed, measured trial yet; run or resume the search")

    def latency(t: optuna.trial.FrozenTrial) -> float:
        return objective_value("latency", t.user_attrs["pp"], t.user_attrs["tg"], workload)

    if objective == "pareto":
        best = min(measured, key=latency)
    else:
        sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
        best = min(measured, key=lambda t: sign * t.values[0])
    ua = best.user_attrs
    placement = Placement.from_dict(ua["placement"])
    model = attrs["model"]["path"]
    rpc = list(attrs.get("rpc") or [])
    pp = Stats(tuple(ua["pp_samples"]), workload.n_prompt)
    tg = Stats(tuple(ua["tg_samples"]), workload.n_gen)
    return BestPlan({
        "model": dict(attrs["model"]),
        "machine": attrs.get("machine", {}),
        "llama_build": ua.get("build", {}),
        "study": {"name": name, "storage": storage, "objective": objective, "trials": len(study.trials),
                  "winner_trial": best.number},
        "workload": workload.to_dict(),
        "runner": attrs.get("runner", "embedded"),
        "rpc": rpc,
        "placement": placement.to_dict(),
        "flags": render_flags(placement),
        "server_command": render_server_command(model, placement, rpc=rpc),
        "measurement": {"runner": attrs.get("runner", "embedded"), "status": ua.get("status", "ok"),
                        "pp": pp.to_dict(), "tg": tg.to_dict(), "build": ua.get("build", {})},
        "objective_value": latency(best),
    })


def export(plan: BestPlan, fmt: str = "server", host: str = "127.0.0.1", port: int | None = None,
           binary: str = "llama-server") -> str:
    """The plan in format `fmt` (one of FORMATS), ready to paste; no trailing newline.

    For `bench`, a binary ending in llama-server is swapped for the llama-bench next to it.
    """
    placement = plan.placement
    model = plan.model_path
    rpc = list(plan.data.get("rpc") or [])
    if fmt == "server":
        return shlex.join(render_server_command(model, placement, binary=binary, host=host, port=port, rpc=rpc))
    if fmt == "bench":
        return shlex.join(_bench_command(plan, binary))
    if fmt == "flags":
        return render_flags(placement)
    if fmt == "ot":
        if not placement.overrides:
            raise PlacetuneError("this plan has no tensor overrides (-ot); use --format flags for its other flags")
        return shlex.quote(render_ot(placement))
    if fmt == "python":
        return _python_snippet(model, placement)
    if fmt == "llama-swap":
        return _llama_swap_entry(plan, host, binary)
    if fmt == "json":
        return json.dumps(plan.data, indent=2)
    raise PlacetuneError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _bench_command(plan: BestPlan, binary: str) -> list[str]:
    w = Workload.from_dict(plan.data["workload"])
    bench = binary[: -len("llama-server")] + "llama-bench" if binary.endswith("llama-server") else binary
    cmd = render_bench_command(plan.model_path, plan.placement, binary=bench, n_prompt=w.n_prompt, n_gen=w.n_gen,
                               depth=w.depth, repetitions=w.repetitions, rpc=plan.data.get("rpc") or (),
                               output=None)
    return [*cmd, NO_WARMUP] if w.warmups == 0 else cmd


def _python_snippet(model: str, placement: Placement) -> str:
    """Llama(...) with the keyword arguments llama-cpp-python takes; what it cannot take is said, not dropped.

    Llama() silently ignores unknown keywords, so tensor overrides must not be passed as one.
    """
    kw = python_kwargs(placement)
    overrides = kw.pop("tensor_buft_overrides", [])
    comments = {"type_k": placement.cache_type_k, "type_v": placement.cache_type_v}
    lines = [f"# llama-cpp-python equivalent of: {render_flags(placement) or '(llama.cpp defaults)'}",
             "from llama_cpp import Llama", ""]
    if overrides:
        lines += ["# Llama() has no tensor override argument, so these -ot rules are not applied here;",
                  "# use --format server to deploy them:"]
        lines += [f"#   {pattern}={buft}" for pattern, buft in overrides]
    if placement.repack is False:
        lines.append("# Llama() cannot turn weight repacking off (--no-repack); the server line can.")
    lines.append("llm = Llama(")
    lines.append(f"    model_path={model!r},")
    for key, value in kw.items():
        note = f"  # {comments[key]}" if comments.get(key) else ""
        lines.append(f"    {key}={value!r},{note}")
    lines.append(")")
    return "\n".join(lines)


def _llama_swap_entry(plan: BestPlan, host: str, binary: str) -> str:
    """A `models:` entry for llama-swap: `cmd` holds the server line with llama-swap's ${PORT} macro.

    llama-swap splits cmd with POSIX shell rules, so the shlex-quoted line survives; it also replaces any
    ${NAME} it sees, so a path containing one cannot be expressed and is refused.
    """
    argv = render_server_command(plan.model_path, plan.placement, binary=binary, host=host,
                                 rpc=plan.data.get("rpc") or ())
    line = f"{shlex.join(argv)} --port {LLAMA_SWAP_PORT}"
    if "${" in line.replace(LLAMA_SWAP_PORT, ""):
        raise PlacetuneError("the command contains '${', which llama-swap reads as a macro; "
                             "rename the model path or use --format server")
    if any(ord(c) < 32 and c != "\t" for c in line):
        raise PlacetuneError("the command contains a control character (newline?) that YAML cannot hold "
                             "in a cmd block; rename the model path")
    proxy_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    proxy_host = f"[{proxy_host}]" if ":" in proxy_host else proxy_host
    name = Path(plan.model_path).stem
    return "\n".join([
        f"# llama-swap model entry by placetune ({_summary(plan)})",
        "models:",
        f"  {json.dumps(name)}:",
        "    cmd: |",
        f"      {line}",
        f"    proxy: {json.dumps(f'http://{proxy_host}:{LLAMA_SWAP_PORT}')}",
    ])


def _summary(plan: BestPlan) -> str:
    m: dict[str, Any] = plan.data.get("measurement") or {}
    pp = (m.get("pp") or {}).get("median")
    tg = (m.get("tg") or {}).get("median")
    rates = [f"{k} {v:.1f} t/s" for k, v in (("pp", pp), ("tg", tg)) if isinstance(v, float) and math.isfinite(v)]
    return ", ".join(rates) or "not measured"
