"""Terminal views of placetune's records (rich tables). Nothing here computes a figure."""

from __future__ import annotations

import math
import shlex
import statistics
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from placetune.anatomy import Anatomy, column_of
from placetune.compare import NOISY_SPREAD
from placetune.device_bytes import layer_devices, tensor_buffer
from placetune.placement import Placement
from placetune.runners.base import Measurement, Workload
from placetune.units import UNITS, human_bytes

if TYPE_CHECKING:
    from placetune.hardware import Machine
    from placetune.memory import DeviceNeed
    from placetune.results import BestRecord
    from placetune.search import Contender, Search




def _unit_for(n: float) -> tuple[float, str]:
    """One unit for a whole table, chosen from its largest cell, so columns stay narrow."""
    scale = 1.0
    for unit in UNITS:
        if n < 1024 * scale * 10 or unit == UNITS[-1]:
            return scale, unit
        scale *= 1024
    raise AssertionError("unreachable")


def _column_order(columns: set[str]) -> list[str]:
    preferred = ["embed", "attn", "norm", "ffn", "router", "shexp", "exp_gate", "exp_up", "exp_gate_up", "exp_down"]
    ordered = [c for c in preferred if c in columns]
    return ordered + sorted(columns - set(ordered))


def anatomy_table(anatomy: Anatomy, console: Console) -> None:
    """Model facts, the per-layer byte table, and the totals that the bandwidth model uses."""
    f = anatomy.facts
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("model", " + ".join(anatomy.paths))
    facts.add_row("architecture", f"{f.arch}  ({f.name})" if f.name else f.arch)
    facts.add_row("layers", f"{f.n_layers}  (leading dense: {f.n_leading_dense})" if f.is_moe else str(f.n_layers))
    facts.add_row("context (train)", str(f.n_ctx_train))
    facts.add_row("embedding", str(f.n_embd))
    facts.add_row("heads (q / kv)", f"{f.n_head} / {f.n_head_kv}   head dim k/v {f.head_dim_k}/{f.head_dim_v}")
    if f.is_moe:
        facts.add_row("experts", f"{f.n_expert}, {f.n_expert_used} used per token, {f.n_expert_shared} shared")
    facts.add_row("weight types", f.file_type)
    console.print(facts)

    rows = anatomy.layer_table()
    columns = _column_order({k for r in rows for k in r if k not in ("layer", "types", "total")})
    scale, unit = _unit_for(max(r["total"] for r in rows))
    table = Table(title=f"{unit} per layer and group", show_lines=False, pad_edge=False)
    table.add_column("layer", justify="right")
    for c in columns:
        table.add_column(c.removeprefix("exp_").replace("gate_up", "gate+up") + ("*" if c.startswith("exp_") else ""),
                         justify="right")
    table.add_column("total", justify="right", style="bold")
    table.add_column("types")
    for r in rows:
        label = "-" if r["layer"] is None else str(r["layer"])
        cells = [f"{r[c] / scale:.1f}" if c in r else "" for c in columns]
        table.add_row(label, *cells, f"{r['total'] / scale:.1f}", ",".join(t for t in r["types"] if t != "F32"))
    console.print(table)
    if f.is_moe:
        console.print("* routed experts by kind", highlight=False)

    totals = Table.grid(padding=(0, 2))
    totals.add_column(style="bold")
    totals.add_column(justify="right")
    totals.add_column()
    total = anatomy.total_bytes or 1
    totals.add_row("total", human_bytes(anatomy.total_bytes), f"{anatomy.total_bytes:,} B")
    totals.add_row("common (non-expert)", human_bytes(anatomy.common_bytes), f"{anatomy.common_bytes / total:.1%}")
    totals.add_row("routed experts", human_bytes(anatomy.expert_bytes), f"{anatomy.expert_bytes / total:.1%}")
    totals.add_row(
        "read per token",
        human_bytes(anatomy.active_bytes),
        f"common (one embedding row) + experts x {f.n_expert_used}/{f.n_expert}" if f.is_moe
        else "every tensor, one embedding row",
    )
    console.print(totals)


def measurement_table(m: Measurement, workload: Workload, console: Console) -> None:
    """llama-bench-style rows (test, t/s ± stdev, spread) and the status line when it failed."""
    if not m.ok:
        console.print(f"[bold red]{m.status}[/]: {m.reason}", highlight=False)
        return
    table = Table(title=f"measured by {m.runner}")
    for col in ("test", "t/s (median)", "± stdev", "spread", "time-weighted", "samples"):
        table.add_column(col, justify="right")
    depth = f" @ d{workload.depth}" if workload.depth else ""
    for label, stats in ((f"pp{workload.n_prompt}{depth}", m.pp), (f"tg{workload.n_gen}{depth}", m.tg)):
        if stats.samples:
            table.add_row(label, f"{stats.median:.2f}", f"{stats.stdev:.2f}", f"{stats.spread:.1%}",
                          f"{stats.time_weighted:.2f}", str(len(stats.samples)))
    console.print(table)
    facts = []
    if m.load_s is not None:
        facts.append(f"load {m.load_s:.2f} s")
    if m.peak_rss_bytes:
        facts.append(f"peak RSS {human_bytes(m.peak_rss_bytes)}")
    facts.append(f"wall {m.wall_s:.2f} s, of which measured {m.measure_s:.2f} s")
    console.print(", ".join(facts), highlight=False)
    noisy = [name for name, stats in (("pp", m.pp), ("tg", m.tg)) if stats.spread > NOISY_SPREAD]
    if noisy:
        console.print(f"[yellow]noisy:[/] {' and '.join(noisy)} spread above {NOISY_SPREAD:.0%}; differences "
                      "smaller than that are not real. Close other programs, or add --reps/--warmups.", highlight=False)
    for issue in m.placement_issues:
        console.print(f"[yellow]placement check:[/] {issue}", highlight=False)
    if not m.placement_issues:
        console.print(f"placement check: llama.cpp reported {len(m.tensor_buffers)} overridden tensor(s), "
                      "all where the placement asked", highlight=False)


def placement_table(anatomy: Anatomy, placement: Placement, devices: list[str], reported: dict[str, dict[str, int]],
                    console: Console, need: Mapping[str, DeviceNeed] | None = None) -> None:
    """Where each tensor group lands (from the GGUF), then predicted and llama.cpp-reported bytes per device."""
    layer_dev = layer_devices(anatomy.facts.n_layers, placement.n_gpu_layers, devices, placement.tensor_split)
    grid: dict[str, dict[str, int]] = {}
    for t in anatomy.tensors:
        buft = tensor_buffer(t, placement, layer_dev)
        row = grid.setdefault(column_of(t), {})
        row[buft] = row.get(buft, 0) + t.n_bytes
    seen = {b for row in grid.values() for b in row} | {d for sizes in reported.values() for d in sizes}
    bufts = sorted(seen | set(need or {}), key=lambda b: (b != "CPU", b))
    table = Table(title="where tensors landed, and memory per device: PREDICTED next to llama.cpp's reported")
    table.add_column("group")
    for b in bufts:
        table.add_column(b, justify="right")
    for group in _column_order(set(grid)):
        table.add_row(group, *(human_bytes(grid[group][b]) if b in grid[group] else "" for b in bufts))
    rows = [("weights", "weights", "model"), ("KV cache", "kv", "KV"), ("compute", "compute", "compute"),
            ("output", "output", "output")]
    for label, attr, kind in rows:
        if need is not None:
            table.add_row(f"[bold]{label} PREDICTED[/]",
                          *(human_bytes(getattr(need[b], attr)) if b in need else "-" for b in bufts),
                          end_section=not reported.get(kind))
        if reported.get(kind):
            table.add_row(f"[bold]{label} reported[/]",
                          *(human_bytes(reported[kind][b]) if b in reported[kind] else "-" for b in bufts),
                          end_section=True)
    console.print(table)


def machine_table(machine: Machine, console: Console) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("fingerprint", machine.fingerprint())
    cores = f"{machine.physical_cores} physical / {machine.logical_cores} logical cores"
    grid.add_row("cpu", f"{machine.cpu_model} ({cores})")
    ram = f"{human_bytes(machine.ram_total_bytes)} total, {human_bytes(machine.ram_available_bytes)} available"
    grid.add_row("ram", ram)
    if not machine.gpus:
        grid.add_row("nvidia gpus", "none (no NVIDIA driver or no GPU)")
    for g in machine.gpus:
        grid.add_row(f"gpu {g.index}", f"{g.name}, {human_bytes(g.free_bytes)} free of {human_bytes(g.total_bytes)}, "
                     f"{g.bandwidth_gbs:.0f} GB/s theoretical, driver {g.driver}")
    build = ", ".join(f"{k} {v}" for k, v in machine.llama_build.items() if k != "system_info")
    grid.add_row("llama.cpp", build)
    console.print(grid)
    table = Table(title="devices llama.cpp sees")
    for col in ("device", "description", "buffer type", "free", "total"):
        table.add_column(col)
    for d in machine.llama_devices:
        table.add_row(d.name, d.description, d.buffer_type, human_bytes(d.free_bytes), human_bytes(d.total_bytes))
    console.print(table)


class SearchProgress:
    """A progress bar: trial k of N, the current best pp/tg, and the ETA; then the final round's progress."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[best]}"), console=console,
        )
        self.task: TaskID | None = None

    @contextmanager
    def running(self, search: Search) -> Iterator[None]:
        total = search.config.n_trials
        done = total - search.remaining()
        with self.progress:
            self.task = self.progress.add_task("trials", total=total, completed=done, best=self._best(search))
            yield

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/] {escape(text)}", highlight=False)

    def update(self, trial: FrozenTrial, search: Search) -> None:
        if self.task is None:
            return
        ua = trial.user_attrs
        seed = f" [{ua['name']}]" if ua.get("name") else f" [walk {ua['proposed']}]" if ua.get("proposed") else ""
        if trial.state.name == "COMPLETE":
            what = f"pp {ua.get('pp') or 0:.1f} tg {ua.get('tg') or 0:.1f}"
            if "duplicate_of" in ua:
                what += f" (same placement as trial {ua['duplicate_of']}, not counted)"
        else:
            what = f"{trial.state.name.lower()}: {ua.get('reason', '')[:110]}"
        self.progress.console.print(f"trial {trial.number}{seed}: {ua.get('flags', '')} -> {what}",
                                    highlight=False, markup=False)
        self.progress.update(self.task, completed=search.config.n_trials - search.remaining(), best=self._best(search))

    def final(self, contender: Contender, round_index: int) -> None:
        """One final-round measurement done."""
        state = (f"pp {statistics.median(contender.pp):.1f} tg {statistics.median(contender.tg):.1f}"
                 if contender.ok and contender.pp and contender.tg else f"{contender.status}: {contender.reason}")
        self.console.print(f"final round {round_index + 1}: {contender.name} -> {state}", highlight=False,
                           markup=False)

    @staticmethod
    def _best(search: Search) -> str:
        ranked = search.ranked()
        if not ranked:
            return "best: -"
        ua = ranked[0].user_attrs
        return f"best: pp {ua.get('pp') or 0:.1f} tg {ua.get('tg') or 0:.1f} t/s"


def _ratio_cell(c: dict[str, Any] | None) -> str:
    """A ratio with its interval and verdict, from a Comparison's dict; '' when not compared."""
    if not c:
        return ""
    ratio, low, high = c["ratio"], c["low"], c["high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{ratio:.2f}x (too few samples)"
    verdict = {"faster": "winner faster", "slower": "winner slower"}.get(c["verdict"], "within noise")
    return f"{ratio:.2f}x [{low:.2f}, {high:.2f}] {verdict}"


def search_summary(record: BestRecord, console: Console) -> None:
    """The final round: every contender against the winner with ratio, interval and verdict; the decision;
    then the flags and the llama-server line to paste."""
    w = record.workload
    depth = f" @ d{w['depth']}" if w.get("depth") else ""
    table = Table(title=f"final round, interleaved (pp{w['n_prompt']}, tg{w['n_gen']}{depth}; "
                        f"{record.study.get('objective')} decides; ratios winner/this, 95% interval)")
    for col in ("placement (flags as run)", "pp t/s", "tg t/s", "winner/this (objective)"):
        table.add_column(col, justify="left" if col.startswith("placement") else "right")
    unmeasured = []
    for row in record.rows:
        label = f"[bold]{escape(row['name'])}[/] ({row['role']})\n[dim]{escape(row['flags'])}[/]"
        if row["pp"] is None and row["tg"] is None:
            unmeasured.append(row)
            table.add_row(label, f"[dim]{escape(row['status'])}[/]", "", "")
            continue
        cells = [f"{st['median']:.2f} ±{st['spread']:.1%}" if st else "" for st in (row["pp"], row["tg"])]
        table.add_row(label, *cells, "winner" if row["role"] == "winner" else
                      _ratio_cell(row["vs_winner"].get("objective")) or f"[dim]{escape(row['reason'])}[/]")
    console.print(table)
    for row in unmeasured:
        console.print(f"[dim]{escape(row['name'])}: {escape(row['reason'])}[/]", highlight=False)
    if record.front:
        front = Table(title="Pareto front of the final round: none beaten on both pp and tg")
        for col in ("placement", "pp t/s", "tg t/s", "flags"):
            front.add_column(col, justify="left" if col in ("placement", "flags") else "right")
        for f in record.front:
            front.add_row(f["name"], f"{f['pp']['median']:.2f}", f"{f['tg']['median']:.2f}", f["flags"])
        console.print(front)
        console.print("the server line below is the one with the shortest request for this workload",
                      highlight=False)
    decision = record.decision or {}
    console.print(f"[bold]verdict:[/] {escape(decision.get('message', ''))}", highlight=False)
    if decision.get("noise_warning"):
        console.print(f"[yellow]noisy:[/] {escape(decision['noise_warning'])}", highlight=False)
    console.print("[bold]flags:[/] " + escape(record.flags), highlight=False)
    console.print("[bold]llama-server:[/]", highlight=False)
    console.print(shlex.join(record.server_command), highlight=False, markup=False, soft_wrap=True)
