"""Verify a result: start the exported llama-server line exactly as printed and measure it like the search did.

A search may measure with embedded llama.cpp or llama-bench, and those are known to disagree with
llama-server (llama.cpp issue 25121), so the number a user deploys is checked against the number the
search reported (through placetune.compare), and a gap beyond the noise is said plainly rather than averaged away.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.table import Table

from placetune.compare import SAME, Comparison, compare
from placetune.errors import PlacetuneError
from placetune.export import export
from placetune.hardware import Machine
from placetune.results import BestPlan
from placetune.runners.base import Measurement, Stats, Workload
from placetune.runners.binaries import build_label, find_binary
from placetune.runners.llama_server import LlamaServerRunner, free_port, running_server

DISAGREE_ISSUE = "llama.cpp issue 25121"


@dataclass
class MetricCheck:
    """One metric: the search's samples against the exported server line's, compared by placetune.compare."""

    metric: str
    searched: Stats
    measured: Stats
    comparison: Comparison

    @property
    def inside(self) -> bool:
        return self.comparison.verdict == SAME

    def verdict(self) -> str:
        if self.inside:
            return "within noise"
        c = self.comparison
        return f"{c.verdict}: {abs(c.ratio - 1):.0%} {'slower' if c.ratio < 1 else 'faster'} than searched"


@dataclass
class VerifyResult:
    """The exact command started, the workload, and the per-metric comparison with the search."""

    command: list[str]
    workload: Workload
    searched_by: str
    measurement: Measurement
    comparisons: list[MetricCheck]
    notes: list[str] = field(default_factory=list)


def server_argv(plan: BestPlan, bin_dir: str | Path | None = None) -> tuple[list[str], int, str]:
    """The exported server line split back into argv, with a free --port appended when it has none."""
    binary = find_binary("llama-server", bin_dir)
    argv = shlex.split(export(plan, "server", binary=str(binary)))
    if plan.placement.env:  # NAME=VALUE words before the command: run it as a shell would, through env
        argv = ["env", *argv]
    host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
    if "--port" in argv:
        return argv, int(argv[argv.index("--port") + 1]), host
    port = free_port(host)
    return [*argv, "--port", str(port)], port, host


def verify(plan: BestPlan, *, bin_dir: str | Path | None = None, rpc: list[str] | None = None,
           timeout_s: float | None = None, hardware: str | None = None,
           on_launch: Callable[[str], None] | None = None) -> VerifyResult:
    """Launch the exported llama-server line, measure it with the search's workload, and compare.

    rpc replaces the plan's RPC servers (they may live elsewhere now); hardware, when given, is this
    machine's, so a plan verified on other hardware says so; on_launch gets the exact line started.
    """
    if rpc is not None:
        plan = BestPlan({**plan.data, "rpc": list(rpc)})
    workload = Workload.from_dict(plan.data["workload"])
    if timeout_s is not None:
        workload = replace(workload, timeout_s=timeout_s)
    if not Path(plan.model_path).exists():
        raise PlacetuneError(f"model {plan.model_path} from the plan is not there; verify runs it for real")
    argv, port, host = server_argv(plan, bin_dir)
    if on_launch:
        on_launch(shlex.join(argv))
    with running_server(argv, port, workload.timeout_s, host=host) as server:
        m = LlamaServerRunner().measure_running(server.url, workload)
    if not m.ok:
        raise PlacetuneError(f"llama-server started from the exported line, but measuring it failed "
                             f"({m.status}): {m.reason}")
    searched = plan.data.get("measurement") or {}
    searched_by = searched.get("runner") or plan.data.get("runner", "the search")
    comparisons = []
    for metric, stats in (("pp", m.pp), ("tg", m.tg)):
        ref = searched.get(metric) or {}
        samples = tuple(ref.get("samples") or ())
        if not stats.samples or not samples:
            continue
        before = Stats(samples, int(ref.get("tokens_per_sample") or 0))
        comparisons.append(MetricCheck(metric, before, stats, compare(stats.samples, samples)))
    notes = []
    planned = _hardware_of(plan)
    if hardware and planned and planned != hardware:
        notes.append(f"the search ran on hardware {planned}, this is {hardware}: the ratio compares different "
                     "machines")
    searched_build, measured_build = build_label(plan.data.get("llama_build") or {}), build_label(m.build)
    if searched_by == "llama-server" and searched_build != measured_build:
        notes.append(f"the search's llama-server was {searched_build}, this one is {measured_build}: the ratio "
                     "compares two llama.cpp builds")
    outside = [c for c in comparisons if not c.inside]
    if outside:
        gaps = ", ".join(f"{c.metric} {c.comparison.describe()}" for c in outside)
        head = f"llama-server measured {gaps} of what the search's {searched_by} runner reported, beyond the noise"
        if searched_by == "llama-server":
            notes.append(f"{head}; both numbers come from llama-server, so this is drift or load: run verify again")
        else:
            notes.append(f"{head}; llama-bench/embedded llama.cpp and llama-server are known to disagree "
                         f"({DISAGREE_ISSUE}): plan with the llama-server number")
    return VerifyResult(argv, workload, searched_by, m, comparisons, notes)


def _hardware_of(plan: BestPlan) -> str | None:
    """The hardware the plan was measured on; each runner has its own build, so only the hardware compares."""
    machine = plan.data.get("machine") or {}
    if machine.get("hardware_fingerprint"):
        return str(machine["hardware_fingerprint"])
    try:  # a best.json from before the hardware had its own fingerprint
        return Machine.from_dict(machine).hardware_fingerprint()
    except (TypeError, KeyError, ValueError):
        return None


def comparison_table(result: VerifyResult) -> Table:
    """Searched vs measured per metric: the ratio with its 95% interval and the verdict."""
    w = result.workload
    depth = f" at depth {w.depth}" if w.depth else ""
    table = Table(title=f"verify: pp{w.n_prompt} tg{w.n_gen}{depth}, {w.repetitions} repetitions after {w.warmups} "
                        "warm-up(s), as searched")
    for col in ("metric", f"searched ({result.searched_by})", "measured (llama-server)", "measured/searched",
                "95% interval", "verdict"):
        table.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
    for c in result.comparisons:
        style = "" if c.inside else "bold yellow"
        low, high = c.comparison.low, c.comparison.high
        interval = f"{low:.3f}-{high:.3f}" if math.isfinite(low) and math.isfinite(high) else "too few samples"
        table.add_row(c.metric, f"{c.searched.median:.2f} ± {c.searched.spread:.1%}",
                      f"{c.measured.median:.2f} ± {c.measured.spread:.1%}", f"{c.comparison.ratio:.3f}", interval,
                      c.verdict(), style=style)
    return table
