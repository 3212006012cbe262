"""Terminal views of placetune's records (rich tables). Nothing here computes a figure."""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial
from rich.console import Console
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
from placetune.placement import Placement, layer_devices, tensor_buffer
from placetune.runners.base import Measurement, Workload
from placetune.units import UNITS, human_bytes

if TYPE_CHECKING:
    from placetune.hardware import Machine
    from placetune.memory import DeviceNeed
    from placetune.search import Search


NOISY = 0.05  # relative spread above which a measurement is flagged (see the notes on measuring)


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
    noisy = [name for name, stats in (("pp", m.pp), ("tg", m.tg)) if stats.spread > NOISY]
    if noisy:
        console.print(f"[yellow]noisy:[/] {' and '.join(noisy)} spread above {NOISY:.0%}; differences smaller than "
                      "that are not real. Close other programs, or add --reps/--warmups.", highlight=False)
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
    """A progress bar: trial k of N, the current best pp/tg, and the ETA."""

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

    def update(self, trial: FrozenTrial, search: Search) -> None:
        if self.task is None:
            return
        ua = trial.user_attrs
        seed = f" [{ua['seed_name']}]" if ua.get("seed_name") else ""
        if trial.state.name == "COMPLETE":
            what = f"pp {ua.get('pp') or 0:.1f} tg {ua.get('tg') or 0:.1f}"
        else:
            what = f"{trial.state.name.lower()}: {ua.get('reason', '')[:90]}"
        self.progress.console.print(f"trial {trial.number}{seed}: {ua.get('flags', '')} -> {what}",
                                    highlight=False, markup=False)
        self.progress.update(self.task, completed=search.config.n_trials - search.remaining(), best=self._best(search))

    @staticmethod
    def _best(search: Search) -> str:
        ranked = search.ranked()
        if not ranked:
            return "best: -"
        ua = ranked[0].user_attrs
        return f"best: pp {ua.get('pp') or 0:.1f} tg {ua.get('tg') or 0:.1f} t/s"


def search_summary(record: dict[str, Any], finals: list[tuple[FrozenTrial, Measurement]], workload: Workload,
                   console: Console) -> None:
    """The winner against each baseline, with ratios and spreads, then the llama-server line."""
    m = record["measurement"]
    pp, tg = m["pp"]["median"], m["tg"]["median"]
    table = Table(title=f"best placement vs baselines (pp{workload.n_prompt}, tg{workload.n_gen}, measured)")
    for col in ("placement", "pp t/s", "± spread", "tg t/s", "± spread", "best/this pp", "best/this tg"):
        table.add_column(col, justify="right" if col != "placement" else "left")
    table.add_row(f"[bold]best (trial {record['study']['winner_trial']})[/]", f"{pp:.2f}", f"{m['pp']['spread']:.1%}",
                  f"{tg:.2f}", f"{m['tg']['spread']:.1%}", "1.00", "1.00")
    failed = []
    for b in record["baselines"]:
        if b["pp"] and b["tg"] and b["state"] == "COMPLETE":
            table.add_row(b["name"], f"{b['pp']:.2f}", f"{(b['pp_spread'] or 0):.1%}", f"{b['tg']:.2f}",
                          f"{(b['tg_spread'] or 0):.1%}", f"{pp / b['pp']:.2f}", f"{tg / b['tg']:.2f}")
        else:
            table.add_row(b["name"], f"[dim]{b['state'].lower()}[/]", "", "", "", "", "")
            failed.append(f"{b['name']}: {b['reason']}")
    console.print(table)
    for line in failed:
        console.print(f"[dim]{line}[/]", highlight=False)
    if record["study"]["objective"] == "pareto":
        front = Table(title="Pareto front: no trial here is beaten on both pp and tg (re-measured, interleaved)")
        for col in ("trial", "pp t/s", "tg t/s", "flags"):
            front.add_column(col, justify="left" if col == "flags" else "right")
        for t, fm in finals:
            front.add_row(str(t.number), f"{fm.pp.median:.2f}", f"{fm.tg.median:.2f}", t.user_attrs.get("flags", ""))
        console.print(front)
        console.print("the server line below is the front member with the shortest request for this workload",
                      highlight=False)
    elif len(finals) > 1:
        console.print("final interleaved re-measure: " + ", ".join(
            f"trial {t.number} pp {fm.pp.median:.1f} tg {fm.tg.median:.1f}" for t, fm in finals), highlight=False)
    console.print("[bold]flags:[/] " + record["flags"], highlight=False, markup=True)
    console.print("[bold]llama-server:[/]", highlight=False)
    console.print(shlex.join(record["server_command"]), highlight=False, markup=False, soft_wrap=True)
